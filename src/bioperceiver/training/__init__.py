"""Training helpers shared by the pretraining and finetuning scripts."""

from .pretraining import (
    ContrastivePretrainer,
    ManifestTorchDataset,
    build_loss,
    parameter_groups,
    plot_history,
    plot_similarity,
    retrieval_metrics,
)

__all__ = [
    "ContrastivePretrainer",
    "ManifestTorchDataset",
    "build_loss",
    "parameter_groups",
    "plot_history",
    "plot_similarity",
    "retrieval_metrics",
]
