"""The typed pretraining run config: a tree of dataclasses read from YAML, with dotted ``key.sub=value`` overrides.

    config = load_run_config("pretrain/configs/demo.yaml", ["optim.max_steps=200", "loss.name=siglip"])
    config.optim.max_steps            # 200
    print(config.to_yaml())           # the resolved config (what --print_config shows, what checkpoints keep)

Every key is a field below, with its type, default and docstring. A key the schema does not know, in the file or in
an override, raises :class:`RunConfigError` before any work, naming the key, its section and the closest valid key
(``optim.max_step=3`` -> "did you mean 'max_steps'?"); so does a value of the wrong type (``optim.lr=abc``).
Override values are parsed as YAML (``optim.betas=[0.9,0.95]``, ``logging.report_to=none``); a float field also
takes a number written as text (``1e-3``, which YAML 1.1 reads as a string). Free-form sections stay dicts
(``model.overrides``: any :class:`~bioperceiver.BioPerceiverConfig` argument, e.g. ``model.overrides.d_latents=64``).

Defaults: where the loop had a default for an absent key, the same one; keys the loop required take the values of
``pretrain/configs/demo.yaml``.

Relative paths (``output_dir``, ``data.manifest``, ``data.processor_dir``, ``data.processor_settings``) written in a
config FILE resolve against that file's folder (``pretrain/configs/demo.yaml`` says ``../../outputs/demo/pretrain``,
so ``make demo`` writes ``outputs/demo/...`` from the repository root, and a copied config keeps pointing next to
itself wherever the command runs); the same keys given as command-line overrides (``output_dir=runs/a``) resolve
against the working directory, like any path typed in a shell; a key left at its default resolves against the working
directory too. :func:`load_run_config` returns them absolute (the resolved config saved with every checkpoint and in
the card shows where the run really read and wrote). Absolute paths and ``~`` are used as given.

Resuming (``--resume``) checks the checkpoint's saved config against the current one: only the keys of
:data:`RESUME_MUTABLE_KEYS` (run length, logging, checkpoint cadence, evaluation cadence, output paths) may differ;
any other change is refused, naming the keys (:func:`resume_conflicts`).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "PATH_KEYS",
    "RESUME_MUTABLE_KEYS",
    "CheckpointConfig",
    "DataConfig",
    "EvalConfig",
    "LoggingConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "PretrainConfig",
    "RunConfigError",
    "TrainConfig",
    "apply_override",
    "changed_keys",
    "config_hash",
    "load_run_config",
    "resume_conflicts",
]

PATH_KEYS = ("output_dir", "data.manifest", "data.processor_dir", "data.processor_settings", "data.shards")
"""Path-valued keys: relative values resolve against the config file's folder (file) or the working directory
(command-line overrides, defaults); URLs (``scheme://...``) are used as given."""

RESUME_MUTABLE_KEYS = (
    "output_dir",
    "optim.max_steps",
    "checkpoint.save_steps",
    "checkpoint.keep_last",
    "eval.steps",
    "eval.n_bootstrap",
    "eval.training_patients",
    "logging.*",
)
"""Keys a resumed run may change (``section.*``: the whole section). Everything else (model, data, loss, optimiser
settings other than the run length, batch sizes, precision, seed) must equal the checkpoint's config, or the resumed
run would silently be a different experiment. Changing ``optim.max_steps`` re-shapes the cosine schedule from the
resumed step on; the result then differs from an uninterrupted run of either length."""


class RunConfigError(ValueError):
    """An unknown key or a value of the wrong type in a run config (file or command line)."""


@dataclass
class ModelConfig:
    preset: str = "bioperceiver_debug"
    """Architecture preset (``bioperceiver.list_models()``), e.g. ``bioperceiver_debug``."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Free-form :class:`~bioperceiver.BioPerceiverConfig` arguments over the preset (``d_latents``...)."""


@dataclass
class DataConfig:
    manifest: str = "outputs/demo/cohort/manifest.parquet"
    """The manifest (Parquet/CSV/JSONL); patient-level splits are assigned when it has no ``split`` column."""
    build_demo_cohort: bool = False
    """Build the bundled demo cohort at ``manifest``'s folder first when the manifest does not exist."""
    processor_dir: str | None = None
    """Fitted processors (``BioPerceiverProcessor.from_pretrained``); fitted on the train split and saved there when
    the folder holds none. ``None``: ``<output_dir>/processor``."""
    processor_settings: str | None = None
    """Processor and embedder settings YAML (``tokenizers/demo_processors.yaml``); ``None``: library defaults."""
    modality_dropout: float = 0.2
    """Probability of dropping each present modality of a training sample (at least one is kept)."""
    on_error: Literal["skip_modality", "skip_sample", "skip", "raise"] = "skip_modality"
    """Per-sample content problems (an empty note, a NaN omics value, an unreadable file): ``skip_modality`` drops
    only the bad modality of the sample (its other modalities are kept), ``skip_sample`` (alias ``skip``) drops the
    whole sample, both counted and logged; ``raise`` stops at the first one, and also makes every problem the cheap
    manifest validation finds before the run a blocking one. Manifest-level problems (duplicate or empty
    ``sample_id``, bad split names, a patient in several splits) always stop the run before any work, whatever this
    says. Where the data layer does not implement ``skip_modality`` yet, it falls back to ``skip_sample`` (logged)."""
    num_workers: int = 0
    """``DataLoader`` worker processes."""
    shards: str | None = None
    """Pre-tokenised shards of the training split (a folder, or an fsspec URL such as ``s3://b/shards``, written by
    ``python -m bioperceiver.data.shards write``), streamed instead of processing the train rows on the fly; the
    manifest and processors still give the held-out split and the saved processors. The data position (a global
    sample position, :class:`~bioperceiver.data.shards.ShardedDataset`) is saved in every checkpoint."""
    shard_shuffle_buffer: int = 1024
    """Rows of the bounded shuffle buffer over the shard stream (with ``shards``)."""
    cached_features: bool = False
    """With ``shards`` written with ``--cache_features``: the step reads the stored outputs of frozen encoders (e.g.
    a frozen timm image backbone) instead of their inputs; checked against the shards and the model's weights."""


@dataclass
class LossConfig:
    name: str = "clip"
    """A loss of :data:`bioperceiver.training.pretraining.LOSSES`: ``clip``, ``siglip`` or ``multiview``."""
    fused_view: bool = True
    """Add the fused embedding of all present modalities as one more view."""
    init_temperature: float | None = None
    """Initial temperature; ``None``: the loss's own default (clip 0.07, siglip and multiview 0.1)."""
    leave_one_out: float = 0.0
    """Weight of the leave-one-out term (each modality vs. the fused view of the others); 0 turns it off."""
    init_bias: float | None = None
    """SigLIP only: initial logit bias; ``None``: the loss's default (-10)."""
    max_scale: float | None = None
    """Upper bound of the learnable logit scale (1 / temperature); ``None``: the loss's default (100)."""
    learnable_temperature: bool | None = None
    """clip and multiview: learn the temperature (``None``: the loss's default, learnable)."""
    subset_views: int = 0
    """Masked-token-subset views (``multiview`` only): per training sample having ``subset_modality``, this many
    extra views of that modality alone, each keeping a random ``subset_fraction`` of its tokens (genes of a profile,
    words of a report), through the backbone; two subsets of one profile (or report) are then positives, next to the
    modality <-> modality pairs, so the encoder must keep what tells one sample's tokens from another's. Deterministic
    given ``seed``; held-out retrieval leaves them out. 0 (default): off, the step is exactly as without it."""
    subset_modality: str | None = None
    """The modality (manifest column, e.g. ``omics_expression`` or ``text_report``) whose token subsets make
    ``subset_views``: any kind with a per-token keep-mask (omics, tabular, text, signal)."""
    subset_fraction: float = 0.5
    """Share of a sample's tokens kept in each subset view (at least one token), in (0, 1)."""
    decorrelation: float = 0.0
    """Weight of a redundancy-reduction term on the latent views (before the projection head, i.e. what ``embed``
    returns): the mean squared off-diagonal correlation of each view's dimensions over the batch
    (:func:`bioperceiver.losses.decorrelation_loss`; Barlow Twins' / VICReg's covariance term, scale-free), against
    dimensional collapse. Logged as ``loss_decorrelation``; computed per process; the held-out ``eval_loss`` leaves it
    out. 0 (default): off, the step is exactly as without it."""
    reconstruction: float = 0.0
    """Weight of a masked-value reconstruction term (needs ``subset_views`` on an omics or tabular modality): each
    subset view also predicts, from its latents, the values of the tokens it hid (the genes left out of that
    subset), queried by their identity embeddings through a small Perceiver IO decoder; mean squared error of the
    normalised values. A masked autoencoder's objective beside the contrastive one, so the latents keep what predicts
    the rest of a profile. Logged as ``loss_reconstruction``; the decoder is pretraining-only (in checkpoints, not in
    ``final/``); the held-out ``eval_loss`` leaves it out. 0 (default): off, the step is exactly as without it."""

    def __post_init__(self) -> None:
        if self.subset_views < 0:
            raise RunConfigError(f"loss.subset_views: a number of extra views >= 0, got {self.subset_views}")
        if self.subset_views and not self.subset_modality:
            raise RunConfigError("loss.subset_views: set loss.subset_modality to the modality to subsample")
        if not 0 < self.subset_fraction < 1:
            raise RunConfigError(
                f"loss.subset_fraction: the share of tokens kept, in (0, 1); got {self.subset_fraction}"
            )
        if not self.decorrelation >= 0:
            raise RunConfigError(f"loss.decorrelation: a loss weight >= 0 (0 turns it off), got {self.decorrelation}")
        if not self.reconstruction >= 0:
            raise RunConfigError(f"loss.reconstruction: a loss weight >= 0 (0 turns it off), got {self.reconstruction}")
        if self.reconstruction and not self.subset_views:
            raise RunConfigError(
                "loss.reconstruction predicts the tokens a subset view hides: set loss.subset_views (and "
                "loss.subset_modality), or loss.reconstruction=0"
            )

    def check_run(self) -> None:
        """Checks of the loss section as a whole, at run start (a config file stays loadable with any
        ``loss.name`` override): ``subset_views`` needs ``multiview``."""
        if self.subset_views and self.name != "multiview":
            raise RunConfigError(
                f"loss.subset_views={self.subset_views} needs loss.name=multiview (every view of a patient is a "
                f"positive), got {self.name!r}; set loss.subset_views=0 for {self.name}"
            )

    def subset_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~bioperceiver.training.pretraining.ContrastivePretrainer` for subset views and
        the reconstruction of what they hide (none when off)."""
        if not self.subset_views:
            return {}
        return {
            "subset_views": self.subset_views,
            "subset_modality": self.subset_modality,
            "subset_fraction": self.subset_fraction,
            **({"reconstruction": self.reconstruction} if self.reconstruction else {}),
        }

    def loss_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the loss constructor: the loss-specific keys that are set."""
        keys = ("init_temperature", "init_bias", "max_scale", "learnable_temperature")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


@dataclass
class OptimConfig:
    lr: float = 1.0e-3
    """Peak AdamW learning rate (after warm-up, then cosine decay to 0 at ``max_steps``)."""
    weight_decay: float = 0.05
    """AdamW weight decay (not applied to biases, norms, embeddings, latents, loss temperatures)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    """AdamW ``(beta1, beta2)``."""
    warmup_steps: int = 10
    """Linear warm-up, in optimizer steps."""
    max_steps: int = 150
    """Optimizer steps of the whole run."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value; ``None`` or 0: no clipping."""

    def __post_init__(self) -> None:
        if len(self.betas) != 2:
            raise RunConfigError(f"optim.betas: expected two numbers [beta1, beta2], got {self.betas!r}")


@dataclass
class TrainConfig:
    batch_size: int = 32
    """Samples per process and forward (the global batch is ``batch_size x accumulation x processes``). A run with
    ``data.shards`` resumed on another number of processes keeps its global batch: the per-process batch becomes
    that global batch divided by the new number of processes (logged; saved as ``global_batch_size``)."""
    gradient_accumulation_steps: int = 1
    """Forwards per optimizer step."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Accelerate mixed precision."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (less memory, ~30% more compute)."""
    packed: bool = False
    """Padding-free encoder passes: each sample's real tokens only, all views of the batch in one pass
    (``BioPerceiverModel.set_packed``); equal to the padded path to float tolerance. ``False``: the padded batch."""
    max_tokens_per_batch: int | None = None
    """Token budget of a micro-batch: each batch of ``batch_size`` samples (the contrastive batch, unchanged) is
    split into groups of at most this many real tokens, embedded one group at a time with gradient caching (the
    gradients of the whole-batch step, the memory of one group). ``None``: the batch in one forward. Not with
    DeepSpeed or FSDP."""
    compile: bool = False
    """``torch.compile`` the backbone's encoder (dynamic shapes); equal to eager to float tolerance."""

    def __post_init__(self) -> None:
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch <= 0:
            raise RunConfigError(
                f"train.max_tokens_per_batch: a positive token count or null, got {self.max_tokens_per_batch}"
            )


@dataclass
class CheckpointConfig:
    save_steps: int = 50
    """Write ``output_dir/checkpoints/checkpoint-<step>`` every this many optimizer steps (and at the end)."""
    keep_last: int = 2
    """Checkpoints kept; older ones are deleted."""


@dataclass
class EvalConfig:
    split: str = "validation"
    """Manifest split of the held-out patients for retrieval evaluation."""
    steps: int = 0
    """Evaluate every this many optimizer steps; 0: only at the end."""
    n_bootstrap: int = 1000
    """Bootstrap resamples (by patient) of the retrieval R@k intervals; 0: no intervals."""
    training_patients: bool = False
    """Also run the same evaluation, at every evaluation, on as many training samples as the held-out split holds
    (whole training patients, drawn once with ``seed``): logged as ``train_patients/<key>`` (e.g.
    ``train_patients/eval_loss``) beside ``eval_gap``, the held-out − training contrastive loss. Unlike the logged
    training loss (other views, added terms, another uniform level), this is the held-out number's like for like: the
    objective's generalisation gap, drawn on ``loss_curves.png``. Costs a second evaluation; training is unchanged
    (the evaluation draws from its own random stream)."""
    load_best_model_at_end: bool = False
    """As transformers' ``TrainingArguments.load_best_model_at_end``: ``final/`` holds the weights of the evaluation
    with the best ``metric_for_best_model`` (ties keep the earlier), not the last step's; that checkpoint is written
    when it is evaluated and never rotated away. Needs ``eval.steps`` > 0. The card, ``eval_results.json`` and
    ``loss_curves.png`` say which step was kept."""
    metric_for_best_model: str = "eval_loss"
    """The held-out number that chooses: ``eval_loss``, ``eval_loss_reconstruction`` (with ``loss.reconstruction``)
    or a pair's retrieval ``R@k/<view>-<view>`` (k = 1, 5, 10)."""
    greater_is_better: bool | None = None
    """``None``: lower is better for ``eval_loss*``, higher for ``R@k``."""
    early_stopping_patience: int = 0
    """As transformers' ``EarlyStoppingCallback``: stop after this many evaluations in a row without a better
    ``metric_for_best_model``; 0: run all ``optim.max_steps``. Needs ``load_best_model_at_end``."""

    def __post_init__(self) -> None:
        if self.early_stopping_patience < 0:
            raise RunConfigError(
                f"eval.early_stopping_patience: 0 or more evaluations, got {self.early_stopping_patience}"
            )
        if self.early_stopping_patience and not self.load_best_model_at_end:
            raise RunConfigError(
                "eval.early_stopping_patience needs eval.load_best_model_at_end=true (as transformers' "
                "EarlyStoppingCallback): a stopped run keeps its best evaluation, not its last step"
            )
        if self.load_best_model_at_end and self.steps <= 0:
            raise RunConfigError(
                "eval.load_best_model_at_end: the run evaluates only at its end (eval.steps=0), so there is nothing to "
                "choose among; set eval.steps to evaluate every that many optimizer steps"
            )
        if self.training_patients and self.split == "train":
            raise RunConfigError(
                "eval.training_patients compares the held-out split with training patients, but eval.split=train "
                "evaluates on training patients already (no held-out − training gap to measure); set eval.split to "
                "a held-out split or eval.training_patients=false"
            )


@dataclass
class LoggingConfig:
    log_steps: int = 10
    """Log loss, learning rate, throughput every this many optimizer steps."""
    report_to: str | list[str] | None = None
    """Trackers: ``tensorboard``, ``wandb``, a list of them, or ``none``."""
    project: str | None = None
    """Tracker project name; ``None``: ``bioperceiver-pretrain``."""
    run_name: str | None = None
    """W&B run name; ``None``: W&B names it."""


@dataclass
class PretrainConfig:
    """A contrastive pretraining run (``pretrain/run_pretrain.py``)."""

    seed: int = 0
    """Seed of the model initialisation, data order, augmentations and modality dropout."""
    output_dir: str = "outputs/demo/pretrain"
    """Run folder: checkpoints, ``final/`` (backbone, processors, card), history, plots, tracker logs."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        from .pretraining import LOSSES

        if self.loss.name not in LOSSES:
            close = difflib.get_close_matches(self.loss.name, list(LOSSES), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise RunConfigError(f"loss.name: unknown loss {self.loss.name!r}{hint} Choose one of {sorted(LOSSES)}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "the config") -> PretrainConfig:
        """Build and check a config from nested dicts (a parsed YAML); ``source`` names where they came from."""
        return _build(cls, raw, "", source)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_run_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> PretrainConfig:
    """Read a run YAML (``None``: all defaults), apply ``key.sub=value`` overrides in order and check everything.

    Relative paths (:data:`PATH_KEYS`) come back absolute: those written in the file resolved against the file's
    folder, those of overrides and defaults against the working directory.

    Raises :class:`RunConfigError` naming the offending key, its section, where it came from and the closest valid
    key."""
    raw: dict[str, Any] = {}
    cwd = Path.cwd()
    if path is not None:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise RunConfigError(f"{path}: a run config is a YAML mapping of sections, got {type(raw).__name__}")
        PretrainConfig.from_dict(raw, source=str(path))  # file errors are reported as the file's
        _resolve_paths(raw, Path(path).resolve().parent, PATH_KEYS)
    for item in overrides:
        apply_override(raw, item)
        _resolve_paths(raw, cwd, [item.partition("=")[0]])
    _resolve_paths(raw, cwd, PATH_KEYS, defaults=True)
    return PretrainConfig.from_dict(raw, source=f"{path or 'the defaults'} with overrides {list(overrides)}")


def _resolve_paths(raw: dict[str, Any], base: Path, keys, defaults: bool = False) -> None:
    """Make the relative path values at dotted ``keys`` of ``raw`` absolute against ``base`` (in place); with
    ``defaults``, keys absent from ``raw`` take their schema default first (when it is a path)."""
    for key in keys:
        if key not in PATH_KEYS:
            continue
        *parents, leaf = key.split(".")
        node, cls = raw, PretrainConfig
        for name in parents:
            cls = _hints(cls)[name]
            node = node.setdefault(name, {}) if defaults else node.get(name)
            if not isinstance(node, dict):
                break
        else:
            if leaf not in node and defaults:
                node[leaf] = next(f for f in dataclasses.fields(cls) if f.name == leaf).default
            value = node.get(leaf)
            if isinstance(value, str) and value.lower() not in ("none", "null") and "://" not in value:
                p = Path(value).expanduser()
                node[leaf] = p.as_posix() if p.is_absolute() else os.path.normpath(base / p)


def _flat(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, dict) and value and key != "overrides":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_hash(config: PretrainConfig | dict[str, Any]) -> str:
    """SHA-256 (hex) of the resolved config, key order independent: recorded with every checkpoint."""
    data = config.to_dict() if isinstance(config, PretrainConfig) else config
    return hashlib.sha256(yaml.safe_dump(data, sort_keys=True).encode()).hexdigest()


def changed_keys(old: PretrainConfig | dict[str, Any], new: PretrainConfig | dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two resolved configs (``model.overrides`` compared as one key)."""
    a = _flat(old.to_dict() if isinstance(old, PretrainConfig) else old)
    b = _flat(new.to_dict() if isinstance(new, PretrainConfig) else new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k, _MISSING) != b.get(k, _MISSING))


def resume_conflicts(saved: PretrainConfig | dict[str, Any], current: PretrainConfig | dict[str, Any]) -> list[str]:
    """The changed keys (:func:`changed_keys`) that a resumed run may NOT change (not in
    :data:`RESUME_MUTABLE_KEYS`)."""

    def allowed(key: str) -> bool:
        return any(key == a or (a.endswith(".*") and key.startswith(a[:-1])) for a in RESUME_MUTABLE_KEYS)

    return [k for k in changed_keys(saved, current) if not allowed(k)]


_MISSING = object()


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``key.sub=value`` (value parsed as YAML) in the nested dict ``raw``, checking the key path first."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise RunConfigError(f"override {item!r} must look like key.sub=value, e.g. optim.max_steps=200")
    *parents, leaf = key.split(".")
    cls: Any = PretrainConfig
    node = raw
    for depth, name in enumerate([*parents, leaf]):
        if cls is not None:  # inside the schema: the key must exist
            fields = {f.name: f for f in dataclasses.fields(cls)}
            section = ".".join(parents[:depth])
            if name not in fields:
                raise _unknown(name, section, list(fields), f"the command-line override {item!r}")
            hint = _hints(cls)[name]
            cls = hint if dataclasses.is_dataclass(hint) else None
        if depth < len(parents):
            nxt = node.get(name)
            if nxt is None:
                nxt = node[name] = {}
            elif not isinstance(nxt, dict):
                raise RunConfigError(f"override {item!r}: {'.'.join(parents[: depth + 1])} is not a section")
            node = nxt
    try:
        node[leaf] = yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise RunConfigError(f"override {item!r}: the value is not valid YAML ({err})") from None


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown(name: str, section: str, valid: list[str], source: str) -> RunConfigError:
    where = f"section {section!r}" if section else "the top level"
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    full = f"{section}.{name}" if section else name
    return RunConfigError(
        f"unknown key {name!r} ({full}) in {where} of {source}.{hint} Valid keys of {where}: {', '.join(valid)}"
    )


def _build(cls: type, raw: Any, section: str, source: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RunConfigError(f"{section or 'the config'} in {source} must be a mapping of keys, got {raw!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in hints:
            raise _unknown(str(key), section, names, source)
    kwargs = {}
    for key, value in raw.items():
        path = f"{section}.{key}" if section else key
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, path, source)
        else:
            kwargs[key] = _coerce(value, hint, path, source)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, path: str, source: str) -> Any:
    """``value`` checked against the annotation ``hint`` (and converted where lossless: int -> float, "1e-3" ->
    float, a YAML ``no`` (False) -> "no" for a choice that has it)."""
    ok, out = _match(value, hint)
    if ok:
        return out
    raise RunConfigError(
        f"{path}: expected {_describe(hint)}, got {value!r} ({type(value).__name__}) in {source}. "
        f"Fix the value, e.g. {path}=<{_describe(hint)}>"
    )


def _match(value: Any, hint: Any) -> tuple[bool, Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, out = _match(value, arg)
            if ok:
                return True, out
        return False, None
    if hint is type(None):
        return value is None or (isinstance(value, str) and value.lower() in ("none", "null")), None
    if origin is Literal:
        if value is False and "no" in args:
            return True, "no"
        return value in args, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return False, None
    if hint is str:
        return isinstance(value, str), value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return False, None
        items = [_match(v, args[0]) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if origin is dict:
        return isinstance(value, dict), dict(value) if isinstance(value, dict) else None
    raise TypeError(f"run config annotation {hint!r} is not supported by the checker; add it to _match")


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "none"
    if origin is Literal:
        return "one of " + "|".join(map(str, args))
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if origin is dict:
        return "a mapping"
    return getattr(hint, "__name__", str(hint))
