"""Training helpers shared by the pretraining and finetuning scripts."""

from .finetuning import (
    DEFAULT_LORA_TARGETS,
    FINETUNING_MODES,
    compute_latents,
    configure_finetuning,
    count_parameters,
    merge_lora,
)
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
    "DEFAULT_LORA_TARGETS",
    "FINETUNING_MODES",
    "ContrastivePretrainer",
    "ManifestTorchDataset",
    "build_loss",
    "compute_latents",
    "configure_finetuning",
    "count_parameters",
    "merge_lora",
    "parameter_groups",
    "plot_history",
    "plot_similarity",
    "retrieval_metrics",
]
