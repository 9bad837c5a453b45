"""Typed arguments of ``finetune/run_finetune.py`` (parsed with ``HfArgumentParser`` next to transformers'
``TrainingArguments``): what model to finetune and how (:class:`ModelArguments`), and on which data, task and
evaluation (:class:`DataArguments`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ..data.errors import DEFAULT_ON_ERROR, ON_ERROR_CHOICES, check_on_error
from .finetuning import LINEAR_TERM_L2

logger = logging.getLogger(__name__)

# which of tied best evaluations --load_best_model_at_end keeps (DataArguments.best_model_ties)
BEST_MODEL_TIES = ("first", "last", "loss")

# ``skip`` is the older name of ``skip_sample``


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "pretrained BioPerceiver folder (backbone or finetuned); unset or 'none' = random init"},
    )
    preset: str = field(default="bioperceiver_debug", metadata={"help": "preset for random initialisation"})
    finetuning_mode: str = field(default="full", metadata={"help": "linear_probe | partial | full | lora"})
    unfreeze_last_n_layers: int = field(default=1, metadata={"help": "partial: latent layers to train"})
    cache_embeddings: bool = field(default=True, metadata={"help": "linear_probe: embed every sample once"})
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    head_type: str = field(default="pooled", metadata={"help": "pooled | query (Perceiver IO decoder)"})
    head_hidden_size: int = field(default=0, metadata={"help": "pooled head MLP width; 0 = linear"})
    head_dropout: float = 0.1
    head_linear_modalities: list[str] | None = field(
        default=None,
        metadata={
            "help": "tabular or omics modalities (e.g. tabular_clinical) that also reach the output through a "
            "linear term beside the head (wide & deep): the backbone learns what their linear effect leaves "
            "unexplained"
        },
    )
    head_linear_fit: bool = field(
        default=True,
        metadata={
            "help": "fit the linear term alone on the training rows before finetuning (full-batch L-BFGS on the "
            "task loss, ridge penalty chosen on validation from --head_linear_l2); false: it starts at zero"
        },
    )
    head_linear_l2: list[float] = field(
        default_factory=lambda: list(LINEAR_TERM_L2),
        metadata={"help": "ridge penalties tried for --head_linear_fit (the best validation metric is kept)"},
    )
    head_linear_l2_per_modality: bool = field(
        default=False,
        metadata={
            "help": "a linear term on several modalities gets one ridge penalty per modality, every combination of "
            "--head_linear_l2 tried on validation (e.g. a few strong clinical covariates beside hundreds of genes)"
        },
    )
    survival_loss: str = field(default="cox", metadata={"help": "survival task: cox | discrete"})
    survival_ties: str = field(default="efron", metadata={"help": "efron | breslow"})
    num_time_bins: int = field(default=10, metadata={"help": "discrete survival: bins (quantiles of event times)"})
    license: str = field(default="other", metadata={"help": "licence in the model card metadata"})
    dp_target_epsilon: float | None = field(
        default=None,
        metadata={
            "help": "differential privacy (DP-SGD, Opacus): the epsilon spent by the end of training; the noise is "
            "calibrated for it. Unset (and no --dp_noise_multiplier) = no DP"
        },
    )
    dp_delta: float = field(default=1e-5, metadata={"help": "DP: the delta of the (epsilon, delta) guarantee"})
    dp_max_grad_norm: float = field(default=1.0, metadata={"help": "DP: per-sample gradient clipping norm"})
    dp_noise_multiplier: float | None = field(
        default=None,
        metadata={"help": "DP: noise standard deviation / clipping norm, instead of --dp_target_epsilon"},
    )
    dp_accountant: str = field(default="rdp", metadata={"help": "DP accountant: rdp | prv"})


@dataclass
class DataArguments:
    manifest: str = field(metadata={"help": "labelled manifest (Parquet/CSV/JSONL)"})
    task: str = field(metadata={"help": "classification | multilabel | regression | survival"})
    label_column: str | None = field(default=None, metadata={"help": "label_* column (not for survival)"})
    time_column: str = "label_survival_time"
    event_column: str = "label_survival_event"
    label_values: list[str] | None = field(default=None, metadata={"help": "classes (default: from train split)"})
    positive_label: str | None = field(
        default=None, metadata={"help": "binary 'contains this label' task over a list-valued column"}
    )
    top_k_labels: int | None = field(default=None, metadata={"help": "multilabel: keep the k most frequent"})
    modalities: list[str] | None = field(default=None, metadata={"help": "restrict to these modality columns"})
    build_demo_cohort: bool = field(default=False, metadata={"help": "build the bundled demo cohort if missing"})
    processor_dir: str | None = field(default=None, metadata={"help": "fitted processors (default: the model's)"})
    processor_settings: str | None = field(default=None, metadata={"help": "YAML of processor/embedder settings"})
    extend_vocabulary: bool = field(
        default=True,
        metadata={
            "help": "with a pretrained model: genes / tabular features of the training split missing from its "
            "vocabulary are added (new embeddings initialised, existing ones kept; counts logged and in the card); "
            "false keeps the pretrained vocabulary (unknown ones are out-of-vocabulary)"
        },
    )
    train_split: str = "train"
    eval_split: str = "validation"
    test_split: str = "test"
    label_fraction: float = field(
        default=1.0, metadata={"help": "share of training patients whose labels are used (label efficiency)"}
    )
    modality_dropout: float = 0.0
    on_error: str = field(
        default=DEFAULT_ON_ERROR,
        metadata={
            "help": "bad per-sample content: skip_modality (default: only the unreadable modality of a sample is "
            "dropped, its other modalities kept; counted per reason) | skip_sample (= skip; the whole sample is left "
            "out, counted and logged) | raise. "
            "Manifest-level problems (duplicate ids, bad splits) always stop the run"
        },
    )
    best_model_ties: str = field(
        default="first",
        metadata={
            "help": "--load_best_model_at_end: which of several validation evaluations tied on "
            "--metric_for_best_model is kept: first (transformers' rule: the earliest) | last (the latest) | loss "
            "(the lowest validation loss among them, the earliest on equal losses). Small validation splits tie "
            "often (a C-index or AUROC over few pairs takes few values)"
        },
    )
    n_bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples for the test CIs (by patient)"})
    ablations: bool = field(default=True, metadata={"help": "test metric with each modality removed / alone"})
    min_pattern_samples: int = field(default=10, metadata={"help": "smallest pattern group that gets metrics"})
    uncertainty: bool = field(
        default=True,
        metadata={"help": "temperature scaling, ECE, conformal sets/intervals, MC-dropout on the test split"},
    )
    mc_dropout_samples: int = field(default=20, metadata={"help": "MC-dropout forward passes (0 = off)"})
    conformal_alpha: float = field(default=0.1, metadata={"help": "conformal miscoverage: sets cover 1 - alpha"})
    interpret: bool = field(
        default=True, metadata={"help": "modality Shapley values, integrated gradients and a deletion test on test"}
    )
    explain_samples: int = field(default=3, metadata={"help": "test patients with explanation figures (0 = none)"})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "clear an output_dir that already holds a run and start again (without it, such a folder is "
            "refused unless --resume_from_checkpoint)"
        },
    )

    def __post_init__(self) -> None:
        try:
            self.on_error = check_on_error(self.on_error)
        except ValueError:
            raise ValueError(f"--on_error {self.on_error!r}: choose one of {ON_ERROR_CHOICES}") from None
        if self.best_model_ties not in BEST_MODEL_TIES:
            raise ValueError(f"--best_model_ties {self.best_model_ties!r}: choose one of {BEST_MODEL_TIES}")


def task_settings(model_args: ModelArguments, data_args: DataArguments) -> dict[str, Any]:
    """The settings of ``data_args.task`` from the arguments: every task takes the ones it names (see
    :meth:`bioperceiver.tasks.Task.from_dict`)."""
    return {
        "task": data_args.task,
        "label_column": data_args.label_column,
        "time_column": data_args.time_column,
        "event_column": data_args.event_column,
        "classes": list(data_args.label_values or []),
        "positive_label": data_args.positive_label,
        "top_k": data_args.top_k_labels,
        "loss": model_args.survival_loss,
        "ties": model_args.survival_ties,
        "num_time_bins": model_args.num_time_bins,
    }
