"""Training pieces the pretraining and finetuning scripts call.

- :mod:`.config`: the typed pretraining run config (:class:`PretrainConfig`, :func:`load_run_config`).
- :mod:`.loop`: the Accelerate pretraining loop (:func:`run_pretraining`) and its data preparation.
- :mod:`.pretraining`: :class:`ContrastivePretrainer`, the loss registry, held-out retrieval evaluation.
- :mod:`.padding`: same module calls on every rank under ZeRO/FSDP (:class:`RankPadder`, :class:`PaddedPretrainer`).
- :mod:`.checkpointing`: atomic, rotated checkpoints and resume.
- :mod:`.metering`: tokens per modality (:class:`TokenCounter`) and the card's compute facts.
- :mod:`.finetuning`: finetuning modes (linear probe, full, LoRA).
"""

from .checkpointing import CheckpointWriteError, latest_checkpoint, load_checkpoint, resolve_resume, save_checkpoint
from .config import RESUME_MUTABLE_KEYS, PretrainConfig, RunConfigError, load_run_config
from .finetuning import (
    DEFAULT_LORA_TARGETS,
    FINETUNING_MODES,
    compute_latents,
    configure_finetuning,
    count_parameters,
    fit_linear_term,
    merge_lora,
)
from .loop import NonFiniteLossError, prepare_data, run_pretraining, training_data
from .metering import TokenCounter, compute_facts
from .padding import PaddedPretrainer, RankPadder
from .pretraining import (
    LOSSES,
    ContrastivePretrainer,
    build_loss,
    evaluate,
    forward_as,
    parameter_groups,
    plot_history,
    plot_similarity,
    retrieval_metrics,
)

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "FINETUNING_MODES",
    "LOSSES",
    "RESUME_MUTABLE_KEYS",
    "CheckpointWriteError",
    "ContrastivePretrainer",
    "NonFiniteLossError",
    "PaddedPretrainer",
    "PretrainConfig",
    "RankPadder",
    "RunConfigError",
    "TokenCounter",
    "build_loss",
    "compute_facts",
    "compute_latents",
    "configure_finetuning",
    "count_parameters",
    "evaluate",
    "fit_linear_term",
    "forward_as",
    "latest_checkpoint",
    "load_checkpoint",
    "load_run_config",
    "merge_lora",
    "parameter_groups",
    "plot_history",
    "plot_similarity",
    "prepare_data",
    "resolve_resume",
    "retrieval_metrics",
    "run_pretraining",
    "save_checkpoint",
    "training_data",
]
