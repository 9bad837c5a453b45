"""The contrastive pretraining loop with Accelerate, as a library function: :func:`run_pretraining`.

One CPU, one GPU, DDP, FSDP, DeepSpeed ZeRO-2/3, one node or many, with no code change (the launcher decides).
Evaluation runs its forwards on every rank and the final backbone is gathered with ``accelerator.get_state_dict``,
so ZeRO-3 and FSDP (sharded parameters) work like DDP.

Checkpoints (``save_state``: model, optimiser, scheduler, RNG, plus the data position and the resolved run config)
are written atomically to ``output_dir/checkpoints/checkpoint-<step>`` every ``checkpoint.save_steps`` steps;
``resume="latest"`` continues mid-epoch with ``skip_first_batches`` and ends with exactly the parameters of an
uninterrupted run. At the end the backbone is saved with ``save_pretrained`` (safetensors) together with its
processors, the resolved run config and a model card in ``output_dir/final`` (loadable by
``AutoModel.from_pretrained``), written into a temporary folder and renamed, so a crash never leaves half of it.

Safety before any work:

* **Runs never mix.** An ``output_dir`` that already holds a run (``checkpoints/checkpoint-*`` or ``final/``) is
  refused unless ``resume`` is given (continue it) or ``overwrite_output_dir`` (delete it first). Each checkpoint
  records the run id (made at the start of a fresh run, kept across resumes), the SHA-256 of the resolved config
  and the number of processes; resuming refuses a changed config, naming the keys (only
  :data:`~bioperceiver.training.config.RESUME_MUTABLE_KEYS` may change), and a different number of processes
  unless the run streams shards (below): without ``data.shards`` the data position and the RNG streams are per
  process, so exact resume needs the same count and another one is refused rather than silently inexact. Rotation
  only deletes checkpoints of the current run id.
* **Another number of processes with ``data.shards``** (DDP or one process): the stream's state is a global sample
  position, so the resumed run consumes exactly the samples the checkpoint had not seen. The **global contrastive
  batch stays the run's** (``train.batch_size`` x the processes the run started with, recorded in the checkpoint as
  ``global_batch_size``): the per-process batch becomes ``global_batch_size / num_processes`` (refused when it does
  not divide), so 2 x 8 resumed on 1 process steps with 16 per process (bound its memory with
  ``train.max_tokens_per_batch``). Model, optimiser and scheduler load as usual and the step counter continues;
  a process with no saved RNG state (a new rank) gets one derived from ``(seed, step, rank)``
  (:func:`derived_seed`), so dropout and other random draws differ from an uninterrupted run (warned). Every
  change is recorded in the checkpoint (``world_size_changes``) and the model card.
* **The manifest is validated** (cheap mode, :func:`~bioperceiver.data.validate.check_manifest_before_work`)
  before processors are fitted: manifest-level problems (duplicate ``sample_id`` ...) stop the run with the full
  list; per-sample ones are left to ``data.on_error``.
* **A non-finite loss stops the run** before the backward pass (no update, no checkpoint from the bad step) with
  :class:`NonFiniteLossError` naming the step, the batch's sample ids and the views that went non-finite.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs, InitProcessGroupKwargs
from accelerate.state import AcceleratorState
from accelerate.utils import RNG_STATE_NAME, DistributedType, broadcast_object_list, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from ..cards import pretraining_card
from ..data import (
    BioPerceiverCollator,
    BioPerceiverProcessor,
    ManifestDataset,
    assign_splits,
    load_processor_settings,
    read_manifest,
)
from ..data.errors import check_on_error
from ..data.processing import PROCESSOR_INDEX, same_setting
from ..data.sampler import token_budget_chunks
from ..data.shards import ShardedDataset, batch_to_device, check_cached_features
from ..data.validate import ManifestError, check_manifest_before_work
from ..factory import create_model
from ..jsonio import dumps
from ..layers.projection import PROJECTION_HEAD_FILE, save_projection_head
from .checkpointing import (
    RUN_CONFIG,
    atomic_dir,
    checkpoints,
    load_checkpoint,
    new_run_id,
    read_history,
    read_trainer_state,
    resolve_resume,
    save_checkpoint,
)
from .config import LoggingConfig, OptimConfig, PretrainConfig, RunConfigError, config_hash, resume_conflicts
from .finetuning import PRETRAINING_MARKERS, remove_run_outputs, run_markers
from .keep_best import BestModel
from .metering import TokenCounter, compute_facts, cpu_load_warning
from .padding import PaddedPretrainer, RankPadder
from .pretraining import (
    TRAIN_PATIENTS,
    TRAINED_ROWS_FILE,
    ContrastivePretrainer,
    evaluate,
    parameter_groups,
    plot_history,
    plot_similarity,
    save_trained_rows,
    trained_vocabulary_masks,
    trained_vocabulary_rows,
)

logger = logging.getLogger(__name__)

DEFAULT_PROJECT = "bioperceiver-pretrain"


class NonFiniteLossError(FloatingPointError):
    """The training loss went NaN/inf; raised before the backward pass, so no parameter or checkpoint is touched."""


def existing_run(out: Path) -> list[str]:
    """What of a run ``out`` already holds: checkpoint folders (complete or not) and ``final/``."""
    found = (
        sorted(p.name for p in (out / "checkpoints").glob("*checkpoint-*")) if (out / "checkpoints").is_dir() else []
    )
    return found + (["final/"] if (out / "final").exists() else [])


PRETRAINING_OUTPUTS = (
    *PRETRAINING_MARKERS,  # checkpoints/, final/, history.json
    "processor",
    "eval_results.json",
    "loss_curves.png",
    "similarity_*.png",
    ".tmp-*",
)
"""What a pretraining run writes in its ``output_dir`` (and its tracker's project folder): what
``--overwrite_output_dir`` deletes (:func:`~bioperceiver.training.finetuning.remove_run_outputs`)."""


def check_output_dir(config: PretrainConfig, resume, overwrite_output_dir: bool) -> None:
    """Refuse to start a fresh run into an ``output_dir`` that holds one (unless ``overwrite_output_dir``), and
    refuse an overwrite that would delete the run's own inputs or the working directory. Reads only."""
    out = Path(config.output_dir)
    if resume and overwrite_output_dir:
        raise RunConfigError("--resume and --overwrite_output_dir contradict each other: pass one of them")
    finetuned = run_markers(out)  # a finetuning run's or a saved model's files: never written into, nor deleted
    if finetuned:
        raise RunConfigError(
            f"output_dir {out} holds a finetuning run or a saved model ({', '.join(finetuned[:6])}); a pretraining "
            "run never writes into one, not even with --overwrite_output_dir: choose another output_dir=..."
        )
    found = existing_run(out)
    if found and not resume and not overwrite_output_dir:
        raise RunConfigError(
            f"output_dir {out} already holds a run ({', '.join(found)}); runs are never mixed. Pass --resume latest "
            "(or --resume PATH) to continue it, --overwrite_output_dir to delete it and start afresh, or choose "
            "another output_dir=..."
        )
    if overwrite_output_dir and out.exists():
        here = out.resolve()
        inputs = {
            "data.manifest": config.data.manifest,
            "data.processor_settings": config.data.processor_settings,
            "data.processor_dir": config.data.processor_dir,
        }
        inside = [k for k, v in inputs.items() if v and Path(v).resolve().is_relative_to(here)]
        if Path.cwd().resolve().is_relative_to(here) or inside:
            what = f"the run's inputs ({', '.join(inside)})" if inside else "the working directory"
            raise RunConfigError(
                f"--overwrite_output_dir would delete {out}, which holds {what}; choose another output_dir"
            )


def check_resume(config: PretrainConfig, path: Path, num_processes: int) -> dict[str, Any]:
    """The checkpoint's trainer state, after checking that this run may continue it: the same resolved config
    except :data:`~bioperceiver.training.config.RESUME_MUTABLE_KEYS`, and the same number of processes unless the
    run streams ``data.shards`` (whose position is global; see :func:`resumed_batch`)."""
    import yaml

    state = read_trainer_state(path)
    saved_path = path / RUN_CONFIG
    if saved_path.is_file() and state.get("config_hash") != config_hash(config):
        conflicts = resume_conflicts(yaml.safe_load(saved_path.read_text()), config.to_dict())
        if conflicts:
            raise RunConfigError(
                f"--resume {path}: the run config changed since that checkpoint in {', '.join(conflicts)}; a resumed "
                "run must be the same experiment. Put these keys back as they are in "
                f"{saved_path} (only run length, logging, checkpoint and evaluation cadence and output paths may "
                "change), or start a new run in another output_dir"
            )
    saved_procs = state.get("num_processes")
    if saved_procs is not None and saved_procs != num_processes and not config.data.shards:
        raise RunConfigError(
            f"--resume {path}: the checkpoint was written by {saved_procs} process(es), this launch has "
            f"{num_processes}. Without data.shards exact resume needs the same number (the data position and random "
            f"streams are per process): launch with --num_processes {saved_procs}, or stream pre-tokenised shards "
            "(data.shards, whose position is global: a run that streams them from its start may resume on any "
            "number of processes), or start a new run from the weights in final/"
        )
    return state


def derived_seed(seed: int, step: int, rank: int) -> int:
    """The seed of a process that has no saved RNG state after a resume on another number of processes: a function
    of the run seed, the resumed step and the rank only (the same on every relaunch), distinct per rank."""
    import numpy as np

    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def resumed_batch(state: dict[str, Any], config: PretrainConfig, num_processes: int, path: Path) -> int:
    """The per-process batch of a run resumed from ``state`` on ``num_processes`` processes: the run's global
    contrastive batch (``global_batch_size`` of the checkpoint, else ``train.batch_size`` x its processes) divided
    among them. Equal to ``train.batch_size`` when the number of processes did not change."""
    saved_procs = state.get("num_processes") or num_processes
    global_batch = int(state.get("global_batch_size") or config.train.batch_size * saved_procs)
    if global_batch % num_processes:
        divisors = [k for k in range(1, global_batch + 1) if global_batch % k == 0]
        raise RunConfigError(
            f"--resume {path}: the run's global contrastive batch is {global_batch} samples per step "
            f"({saved_procs} process(es) when saved), which does not divide among {num_processes} processes; the "
            f"global batch stays the run's, so launch with a number of processes dividing it ({divisors})"
        )
    return global_batch // num_processes


def save_processor_atomically(processor: BioPerceiverProcessor, directory: Path) -> None:
    """``processor.save_pretrained(directory)`` written into a temporary sibling first and then moved in, its index
    (what ``from_pretrained`` requires) last: a crash midway leaves no index, so the processors are refitted next
    time instead of half-read. ``directory`` may hold other files (a model)."""
    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}-processor")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        processor.save_pretrained(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        for entry in sorted(tmp.iterdir(), key=lambda e: e.name == PROCESSOR_INDEX):  # the index last
            dest = directory / entry.name
            if dest.is_dir():
                shutil.rmtree(dest)
            os.replace(entry, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def kept_weights_text(best_model: dict) -> str:
    """The summary's line on which weights ``final/`` holds under ``eval.load_best_model_at_end``."""
    last = best_model["last_step"]
    if best_model.get("step") is None:
        return f"step {last} (the last): no held-out evaluation reported {best_model['metric']}"
    if best_model.get("checkpoint_missing"):
        return (
            f"step {last} (the last): the best held-out {best_model['metric']} was step {best_model['step']}'s, whose "
            f"checkpoint {best_model['checkpoint_missing']} was deleted"
        )
    return (
        f"step {best_model['step']} of {last}: the best held-out {best_model['metric']} ({best_model['value']:.4f}) "
        f"of {best_model['evaluations']} evaluations" + (" (stopped early)" if best_model["stopped_early"] else "")
    )


def keep_best_checkpoint_at_hand(best: BestModel, resume_path: Path, ckpt_dir: Path, accelerator) -> None:
    """On resume, the best checkpoint the saved state names must be in this run's ``checkpoints/`` for ``final/`` to
    load it at the end. Resumed from another run's folder (``--resume PATH``), it is copied over from beside
    ``PATH``; gone altogether (deleted by hand), the run says so now: unless a later evaluation is better, ``final/``
    will hold the last step's weights."""
    if best.checkpoint is None or (ckpt_dir / best.checkpoint).is_dir():
        return
    source = Path(resume_path).parent / best.checkpoint
    if source.is_dir():
        if accelerator.is_main_process:
            shutil.copytree(source, ckpt_dir / best.checkpoint)
            logger.info("copied the best checkpoint so far, %s, into %s", source, ckpt_dir)
        accelerator.wait_for_everyone()
    elif accelerator.is_main_process:
        logger.warning(
            "the best held-out %s so far (%.4f) was step %d's, but %s is gone: unless a later evaluation is better, "
            "final/ will hold the last step's weights",
            best.metric,
            best.value,
            best.step,
            ckpt_dir / best.checkpoint,
        )


def _broadcast(value: Any, accelerator) -> Any:
    """``value`` of the main process on every process (one object)."""
    if getattr(accelerator, "num_processes", 1) <= 1:
        return value
    box = [value]
    broadcast_object_list(box)
    return box[0]


def raise_if_non_finite(outputs, batch, step: int, trainer, accelerator) -> None:
    """Stop the run when the loss of this forward is NaN/inf on any process (all processes stop together, before the
    backward pass) with the step, the batch's sample ids and the views whose embeddings went non-finite."""
    bad = torch.tensor([float(not torch.isfinite(outputs["loss"].detach()).all())], device=accelerator.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if not bad.item():
        return
    unwrapped = accelerator.unwrap_model(trainer)
    ids = list(batch["sample_id"])
    with torch.no_grad():
        views, mask = unwrapped.views(batch["inputs"])  # (B, V, P), (B, V)
        rows = ~torch.isfinite(views).all(-1) & mask.bool()  # (B, V)
    per_view = {
        name: [ids[i] for i in rows[:, v].nonzero().flatten().tolist()]
        for v, name in enumerate(unwrapped.view_names)
        if rows[:, v].any()
    }
    where = (
        "; ".join(f"view {name!r} non-finite for {', '.join(map(str, s))}" for name, s in per_view.items())
        if per_view
        else "every view is finite on this process (the loss itself, or another process's batch, went non-finite)"
    )
    loss = float(outputs["loss"].detach())
    raise NonFiniteLossError(
        f"non-finite training loss ({loss:.4g}) at step {step + 1} (batch {len(ids)} samples on "
        f"process {accelerator.process_index}: {', '.join(map(str, ids))}); {where}. Nothing of this step was "
        "applied or saved. Check those samples' values (bioperceiver-validate MANIFEST --deep), lower optim.lr or "
        "set optim.grad_clip, then continue with --resume latest"
    )


def prepare_data(config: PretrainConfig, accelerator, out: Path, settings_root: str | os.PathLike | None = None):
    """The manifest (built first for the demo cohort when asked), with patient-level splits, the fitted processors
    and the embedder settings. Processors are read from ``data.processor_dir``; when it holds none yet, the main
    process fits them on the train split and saves them there. A relative ``data.processor_settings`` resolves
    against ``settings_root`` (default: the working directory).

    ``accelerator`` needs only ``is_main_process`` and ``wait_for_everyone`` (a stub does for one process)."""
    data = config.data
    manifest_path = Path(data.manifest)
    if not manifest_path.exists() and data.build_demo_cohort:
        if accelerator.is_main_process:
            from ..data.recipes.demo import build_demo_cohort

            manifest_path = build_demo_cohort(manifest_path.parent, seed=config.seed)
        accelerator.wait_for_everyone()
    manifest = assign_splits(read_manifest(manifest_path))
    # cheap validation before any work: manifest-level problems stop here with the full list, on every process
    error, problem = None, None
    if accelerator.is_main_process:
        try:
            check_manifest_before_work(manifest, on_error=data.on_error, what="pretraining")
        except ManifestError as err:
            error, problem = err, str(err)
    problem = _broadcast(problem, accelerator)  # the message (the report does not travel)
    if error is not None:
        raise error
    if problem is not None:
        raise ManifestError(problem, None)
    settings = data.processor_settings
    settings_path = Path(settings_root or ".") / settings if settings else None
    processors, embedders = load_processor_settings(settings_path)
    proc_dir = Path(data.processor_dir) if data.processor_dir else out / "processor"
    reused = (proc_dir / PROCESSOR_INDEX).exists()
    if accelerator.is_main_process and not reused:
        fitted = BioPerceiverProcessor.from_manifest(manifest, processors).fit(manifest, split="train")
        save_processor_atomically(fitted, proc_dir)
    accelerator.wait_for_everyone()
    processor = BioPerceiverProcessor.from_pretrained(proc_dir)
    if reused:
        check_reused_processors(processor, BioPerceiverProcessor.from_manifest(manifest, processors), proc_dir)
    return manifest, processor, embedders


def check_reused_processors(saved: BioPerceiverProcessor, wanted: BioPerceiverProcessor, proc_dir: Path) -> None:
    """Processors already in ``data.processor_dir`` (an earlier run's, or fitted by ``fit_processors.py``) are
    reused only when they were fitted with this run's settings for every modality of the manifest; otherwise a
    :class:`RunConfigError` names each modality and setting that differs (reusing them silently trained on the
    old settings while the card showed the new settings file)."""
    problems = []
    for name, proc in wanted.processors.items():
        if name not in saved.processors:
            problems.append(f"{name}: no saved processor (the manifest has this modality column)")
            continue
        # as saved (JSON: a default tuple comes back a list)
        have, want = (
            json.loads(json.dumps(p.to_dict()["settings"], default=str)) for p in (saved.processors[name], proc)
        )
        # a processor saved before a setting existed loads with its old behaviour ("legacy", e.g. the image
        # axis order): that is the version it was fitted with, not a changed setting (it warns on its own)
        diff = [
            f"{k} {have.get(k)!r} (saved) vs {want.get(k)!r} (now)"
            for k in sorted(want)
            if have.get(k) != want[k] and have.get(k) != "legacy" and not same_setting(k, have.get(k), want[k])
        ]
        if diff:
            problems.append(f"{name}: " + ", ".join(diff))
    if problems:
        raise RunConfigError(
            f"data.processor_dir {proc_dir} holds processors fitted with other settings than this run's "
            f"(data.processor_settings): {'; '.join(problems)}. Delete that folder to refit them, point "
            "data.processor_dir at a new folder, or restore the settings they were fitted with"
        )
    logger.info("reusing the processors in %s (fitted with this run's settings)", proc_dir)


def build_pretrainer(config: PretrainConfig, model, padded: bool = False) -> ContrastivePretrainer:
    """The pretrainer ``config`` describes around the backbone ``model``: its loss, views and added terms (projection
    head, subset views, decoder). ``padded``: the rank-padding one ZeRO and FSDP need on several processes
    (:class:`~bioperceiver.training.padding.PaddedPretrainer`)."""
    loss = config.loss
    return (PaddedPretrainer if padded else ContrastivePretrainer)(
        model,
        loss=loss.name,
        fused_view=loss.fused_view,
        leave_one_out=loss.leave_one_out,
        decorrelation=loss.decorrelation,
        **loss.subset_kwargs(),
        **loss.loss_kwargs(),
    )


def training_data(config: PretrainConfig, manifest, processor) -> tuple[ManifestDataset, BioPerceiverCollator]:
    """The training split as an augmenting dataset, and its collator (modality dropout, skip policy)."""
    on_error = check_on_error(config.data.on_error)
    train_ds = ManifestDataset.from_manifest(
        manifest.split("train"), processor, train=True, seed=config.seed, on_error=on_error
    )
    collator = BioPerceiverCollator(
        processor.modalities,
        modality_dropout=config.data.modality_dropout,
        on_error=on_error,
        seed=config.seed,
        count_tokens=config.train.max_tokens_per_batch is not None,
    )
    return train_ds, collator


def evaluation_data(config: PretrainConfig, manifest, processor) -> tuple[ManifestDataset, BioPerceiverCollator]:
    """``manifest``'s rows (the evaluation split, or any other) as pretraining's held-out evaluation reads them: no
    augmentation, no modality dropout, a sample that cannot be processed skipped."""
    dataset = ManifestDataset.from_manifest(manifest, processor, train=False, seed=config.seed, on_error="skip")
    return dataset, BioPerceiverCollator(processor.modalities, on_error="skip")


def training_sample(train, n: int, seed: int):
    """``n`` samples of the training split ``train`` (a :class:`~bioperceiver.data.Manifest`), whole patients drawn in
    an order seeded by ``seed`` (the last one cut to make ``n``): as many samples as the held-out evaluation, so
    that its batches, and so its loss's level, are alike (``eval.training_patients``)."""
    table = train.table
    patients = table["patient_id"].drop_duplicates().to_numpy()
    order = np.random.default_rng(seed).permutation(len(patients))
    rank = {p: i for i, p in enumerate(patients[order])}
    rows = table.index[np.argsort(table["patient_id"].map(rank).to_numpy(), kind="stable")][:n]
    return train.subset(rows)


def sharded_training_data(
    config: PretrainConfig, accelerator, processor, model, pad_ranks: bool, batch_size: int | None = None
):
    """The training stream of ``data.shards`` for this rank (``None`` without shards), after checking that the
    shards were written for these processors and that cached features match the model's frozen encoders.
    ``batch_size``: samples per process and step (default ``train.batch_size``; other after a resume on another
    number of processes, :func:`resumed_batch`)."""
    batch_size = batch_size or config.train.batch_size
    data = config.data
    if not data.shards:
        if data.cached_features:
            raise RunConfigError("data.cached_features=true needs data.shards (written with --cache_features)")
        return None
    if pad_ranks:
        raise RunConfigError(
            "data.shards with DeepSpeed/FSDP on several processes is not supported yet (their batches are padded "
            "per rank from a map-style dataset); use DDP or one process, or data.shards=null"
        )
    stream = ShardedDataset(
        data.shards,
        batch_size=batch_size,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        seed=config.seed,
        shuffle_buffer=data.shard_shuffle_buffer,
    )
    if stream.index["modalities"] != dict(processor.modalities):
        raise RunConfigError(
            f"data.shards {data.shards} holds modalities {stream.index['modalities']}, the processors have "
            f"{dict(processor.modalities)}: write the shards with this run's processors (--processors)"
        )
    written_with = stream.index.get("processors_fingerprint")
    if written_with is None:
        logger.warning("data.shards %s were written before shards recorded their processors: not checked", data.shards)
    elif written_with != processor.fingerprint():
        raise RunConfigError(
            f"data.shards {data.shards} were written with other processors than this run's (settings, fitted state "
            "or vocabulary differ): the model would train on tokens its processors do not produce. Write the "
            "shards with this run's processors (--processors <data.processor_dir>), or point data.processor_dir at "
            "the processors the shards were written with"
        )
    try:
        check_cached_features(stream.index, model, data.cached_features)
    except ValueError as err:
        raise RunConfigError(f"data.shards {data.shards}: {err}") from err
    if stream.steps_left() == 0:
        raise RunConfigError(
            f"data.shards {data.shards} holds {stream.num_rows} rows, fewer than one step of {batch_size} samples "
            f"per process x {accelerator.num_processes} process(es)"
        )
    logger.info("training data: %d rows in %d shards from %s", stream.num_rows, len(stream.row_counts), data.shards)
    return stream


def trackers_from_config(lg: LoggingConfig) -> list[str]:
    """``logging.report_to`` (a name, a list, or none) -> tracker names; fails early when a tracker's package is
    missing (accelerate would only warn and train without it)."""
    report_to = lg.report_to
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    names = [n for n in names if n not in (None, "none")]
    if "wandb" in names and importlib.util.find_spec("wandb") is None:
        raise RunConfigError(
            "logging.report_to: wandb needs the wandb package: pip install 'bioperceiver[wandb]' "
            "(then `wandb login`, or WANDB_MODE=offline)"
        )
    if "tensorboard" in names and not (
        importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")
    ):
        raise RunConfigError("logging.report_to: tensorboard needs the tensorboard package: pip install tensorboard")
    return names


def flat_config(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """Nested run config -> ``{"a.b": scalar}`` (what TensorBoard's hparams accept; W&B takes it too)."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def deepspeed_setup(accelerator, trainer: torch.nn.Module, opt: OptimConfig) -> None:
    """What the DeepSpeed JSON leaves to the run config, before ``prepare``.

    * ``"gradient_clipping": "auto"`` becomes ``optim.grad_clip`` (accelerate would fill in 1.0 whatever the run
      config says); DeepSpeed then clips inside its step and ``clip_grad_norm_`` only reports the norm.
    * DeepSpeed 0.19 broadcasts every parameter from rank 0 as ``p.data.view(torch.uint8)``, which fails on 0-dim
      tensors ("self.dim() cannot be 0 to view Float as Byte"): the losses' learnable temperature and bias are
      scalars, so they get shape ``(1,)`` here (same values and maths; only DeepSpeed checkpoints see the shape).
    * Every rank must make the same module calls (ZeRO's gradient buckets and ZeRO-3's parameter gathers): the
      training batches are padded by :class:`~bioperceiver.training.padding.RankPadder`.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin.is_auto("gradient_clipping"):
        plugin.deepspeed_config["gradient_clipping"] = float(opt.grad_clip or 0.0)
    for name, param in trainer.named_parameters():
        if param.dim() == 0:
            param.data = param.data.reshape(1)
            logger.debug("DeepSpeed: %s reshaped to (1,)", name)


def all_reduce_gradients(accelerator, module: torch.nn.Module) -> None:
    """Average the gradients over processes once (what DDP does per backward; gradient caching runs its backwards
    under ``no_sync``). A parameter without a gradient on this process joins with zeros, so every rank reduces the
    same tensors whatever modalities its batch held."""
    if accelerator.num_processes <= 1:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    torch.distributed.all_reduce(flat)
    flat /= accelerator.num_processes
    start = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[start : start + n].view_as(p.grad))
        start += n


def compile_backbone(model: torch.nn.Module, backend: str = "inductor") -> None:
    """``torch.compile`` the encoder in place (``Module.compile``: parameter names, hence checkpoints, unchanged),
    with dynamic shapes (batch and token counts vary). On the packed path only the latent self-attention layers are
    compiled: the packed cross-attention loops over segments whose lengths change every batch, which would make
    dynamo specialise and recompile per batch."""
    targets = list(model.encoder.self_layers) if model.packed else [model.encoder]
    for module in targets:
        module.compile(backend=backend, dynamic=True)


def make_accelerator(config: PretrainConfig, trackers: list[str]) -> Accelerator:
    """The run's Accelerator: gloo for CPU-only distributed runs, unused parameters allowed under DDP, seedable
    sampler (exact resume), the scheduler stepped once per optimizer step."""
    tr = config.train
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # gloo on CPU-only distributed runs (DeepSpeed's CPU accelerator needs it explicitly, see ../shared ENVIRONMENT)
    handlers = [InitProcessGroupKwargs(backend="gloo")] if distributed and not torch.cuda.is_available() else []
    # a batch rarely holds every modality: the embedders of absent ones get no gradient that step
    handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    # a second run in the same process (a notebook, a sweep) may want another precision or DeepSpeed plugin: forget
    # the previous run's accelerator settings, as transformers' TrainingArguments does, but keep the process group
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        gradient_accumulation_steps=tr.gradient_accumulation_steps,
        mixed_precision=tr.mixed_precision,
        log_with=trackers or None,
        project_dir=str(config.output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=handlers,
        # optim.warmup_steps/max_steps count optimizer steps: the loop steps the scheduler once per optimizer step
        # (accelerate's default would step it num_processes times per step, for schedules written per sample)
        step_scheduler_with_optimizer=False,
    )


class RunStopped(RuntimeError):
    """The run stopped on a signal after saving a checkpoint of its last step (see :func:`run_pretraining`)."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved in {checkpoint}: continue "
            "with --resume latest"
        )


class StopRequest:
    """While active (a ``with`` block on the main thread), SIGTERM and a first SIGINT only record that the run
    should stop (``signum``); a second SIGINT raises ``KeyboardInterrupt`` at once. The previous handlers are put
    back on exit."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        import threading

        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread only
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning(
            "%s received: finishing this step, saving a checkpoint and stopping (Ctrl-C again to stop at once)",
            signal.Signals(signum).name,
        )

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def run_pretraining(
    config: PretrainConfig,
    *,
    resume: str | os.PathLike | None = None,
    overwrite_output_dir: bool = False,
    settings_root: str | os.PathLike | None = None,
    crash_after_step: int | None = None,
) -> dict[str, Any]:
    """Pretrain a backbone contrastively as ``config`` says; every rank of a launch calls it.

    Args:
        config: the checked run config (:func:`~bioperceiver.training.config.load_run_config`).
        resume: ``"latest"`` or a checkpoint folder to continue from (bit-identical to an uninterrupted run); the
            checkpoint's config and number of processes are checked first (another number only with ``data.shards``:
            the same samples and global batch, other random draws; see the module docstring).
        overwrite_output_dir: delete ``output_dir`` first when it holds a run (without it, or ``resume``, such an
            ``output_dir`` is refused with :class:`~bioperceiver.training.config.RunConfigError`).
        settings_root: folder a relative ``data.processor_settings`` resolves against (default: working directory;
            :func:`~bioperceiver.training.config.load_run_config` already makes paths absolute).
        crash_after_step: tests only: SIGKILL this process right after the checkpoint of this step is written.

    SIGTERM (a scheduler's notice before it kills a job: SLURM preemption or time limit with ``--signal``) or a
    first Ctrl-C stops the run gracefully: it finishes the current step, saves a checkpoint of it (every process
    agrees on the step) and raises :class:`RunStopped`; ``--resume latest`` continues exactly. A second Ctrl-C
    interrupts at once (the last regular checkpoint stays).

    Returns:
        ``{"final": folder of the saved backbone, "history": logged records, "steps", "summary": lines saying where
        everything is, "losses_finite"}``.
    """
    with StopRequest() as stop:
        return _run_pretraining(
            config,
            resume=resume,
            overwrite_output_dir=overwrite_output_dir,
            settings_root=settings_root,
            crash_after_step=crash_after_step,
            stop=stop,
        )


def _run_pretraining(
    config: PretrainConfig,
    *,
    resume: str | os.PathLike | None,
    overwrite_output_dir: bool,
    settings_root: str | os.PathLike | None,
    crash_after_step: int | None,
    stop: StopRequest,
) -> dict[str, Any]:
    """:func:`run_pretraining`'s body (``stop`` holds a signal that asked the run to stop)."""
    t_start = time.perf_counter()
    cfg = config
    cfg.loss.check_run()
    out = Path(cfg.output_dir)
    tr, opt, ck, lg, eval_cfg = cfg.train, cfg.optim, cfg.checkpoint, cfg.logging, cfg.eval
    run_config_yaml = cfg.to_yaml()
    trackers = trackers_from_config(lg)
    project = lg.project or DEFAULT_PROJECT
    check_output_dir(cfg, resume, overwrite_output_dir)  # before any work, on every process
    ckpt_dir = out / "checkpoints"
    resume_path = resolve_resume(resume, ckpt_dir) if resume else None
    if resume_path is not None and Path(resume_path).resolve().parent != ckpt_dir.resolve() and existing_run(out):
        raise RunConfigError(
            f"--resume {resume_path}: that checkpoint is not in {ckpt_dir}, and output_dir {out} holds another run "
            f"({', '.join(existing_run(out))}); runs are never mixed. Resume into an empty output_dir"
        )
    accelerator = make_accelerator(cfg, trackers)
    world = accelerator.num_processes
    local_batch, world_changes, saved_procs = tr.batch_size, [], world
    if resume_path is not None:
        saved = check_resume(cfg, resume_path, world)
        run_id = saved.get("run_id") or new_run_id()
        saved_procs = saved.get("num_processes") or world
        local_batch = resumed_batch(saved, cfg, world, resume_path)
        world_changes = list(saved.get("world_size_changes") or [])
        if saved_procs != world:
            if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
                raise RunConfigError(
                    f"--resume {resume_path}: DeepSpeed/FSDP save their states sharded per process, so a run written "
                    f"by {saved_procs} process(es) cannot load on {world}; resume with DDP or one process"
                )
            world_changes.append(
                {
                    "step": saved["step"],
                    "from_processes": saved_procs,
                    "to_processes": world,
                    "per_process_batch": local_batch,
                    "global_batch": local_batch * world,
                }
            )
            if accelerator.is_main_process:
                logger.warning(
                    "resuming a run of %d process(es) on %d at step %d (data.shards: the stream continues at its "
                    "global sample position). The global contrastive batch stays %d samples: %d per process now "
                    "(was %d per process on %d). Processes without a saved random state get one "
                    "derived from (seed, step, rank): dropout and other random draws differ from an uninterrupted "
                    "run on %d process(es)",
                    saved_procs,
                    world,
                    saved["step"],
                    local_batch * world,
                    local_batch,
                    local_batch * world // saved_procs,
                    saved_procs,
                    world,
                )
    else:
        if overwrite_output_dir and existing_run(out) and accelerator.is_main_process:
            remove_run_outputs(out, (*PRETRAINING_OUTPUTS, cfg.logging.project or DEFAULT_PROJECT), "pretraining")
        accelerator.wait_for_everyone()
        run_id = _broadcast(new_run_id(), accelerator)
    run_facts = {
        "run_id": run_id,
        "config_hash": config_hash(cfg),
        "num_processes": world,
        # samples of one forward over all processes (the contrastive batch); kept across resumes on other counts
        "global_batch_size": local_batch * world,
        "world_size_changes": world_changes,
    }
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    logger.info(
        "%s, %d process(es), device %s, mixed precision %s; contrastive batch %d samples (%d per process)",
        accelerator.distributed_type.value,
        accelerator.num_processes,
        accelerator.device,
        accelerator.mixed_precision,
        local_batch * world,
        local_batch,
    )
    contention = cpu_load_warning(accelerator.device.type)
    if contention and accelerator.is_main_process:
        logger.warning(contention)
    set_seed(cfg.seed)
    manifest, processor, embedders = prepare_data(cfg, accelerator, out, settings_root)
    model = create_model(cfg.model.preset, modalities=processor.model_modalities(embedders), **cfg.model.overrides)
    num_parameters = sum(p.numel() for p in model.parameters())  # before ZeRO-3/FSDP shard them
    if tr.gradient_checkpointing:
        model.activation_checkpointing_enable()
    model.set_packed(tr.packed)
    if tr.compile:
        compile_backbone(model)
    tokens = TokenCounter(model)
    # ZeRO and FSDP need every rank to make the same module calls: see RankPadder
    sharded = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    pad_ranks = sharded and accelerator.num_processes > 1
    if tr.max_tokens_per_batch is not None and sharded:
        raise RunConfigError(
            "train.max_tokens_per_batch (gradient caching) runs its own backward passes and reduces gradients once, "
            "which DeepSpeed and FSDP do not allow; use DDP or one process, or set train.max_tokens_per_batch=null"
        )
    trainer = build_pretrainer(cfg, model, padded=pad_ranks)
    best = BestModel.from_config(eval_cfg, trainer.view_names, bool(cfg.loss.reconstruction))  # None: keep the last
    if deepspeed:
        deepspeed_setup(accelerator, trainer, opt)
    train_ds, collator = training_data(cfg, manifest, processor)
    stream = sharded_training_data(cfg, accelerator, processor, model, pad_ranks, local_batch)  # None: manifest rows
    padder = (
        RankPadder(train_ds, BioPerceiverCollator(processor.modalities), model.modality_names) if pad_ranks else None
    )
    loader = DataLoader(
        stream or train_ds,
        batch_size=local_batch,
        shuffle=stream is None,
        drop_last=stream is None,  # the stream yields whole batches (drop_last of its own, the same on every rank)
        collate_fn=collator,
        num_workers=cfg.data.num_workers,
    )
    optimizer = torch.optim.AdamW(parameter_groups(trainer, opt.weight_decay), lr=opt.lr, betas=tuple(opt.betas))
    scheduler = get_cosine_schedule_with_warmup(optimizer, opt.warmup_steps, opt.max_steps)
    if stream is None:
        trainer, optimizer, loader, scheduler = accelerator.prepare(trainer, optimizer, loader, scheduler)
    else:  # the stream splits the data across ranks itself (accelerate would dispatch an IterableDataset's batches)
        trainer, optimizer, scheduler = accelerator.prepare(trainer, optimizer, scheduler)

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    step, batches_seen = 0, 0
    samples_before, seconds_before, samples_local = 0, 0.0, 0  # run totals over resumes (model card)
    if resume_path is not None:
        state = load_checkpoint(accelerator, resume_path)
        step, batches_seen = state["step"], state["batches_seen"]
        if saved_procs != world and not (resume_path / f"{RNG_STATE_NAME}_{accelerator.process_index}.pkl").is_file():
            set_seed(derived_seed(cfg.seed, step, accelerator.process_index))  # a new rank: no saved random state
        samples_before, seconds_before = state.get("samples_seen", 0), state.get("train_seconds", 0.0)
        if best is not None:
            best.load_state_dict(state.get("best_model"))
            keep_best_checkpoint_at_hand(best, resume_path, ckpt_dir, accelerator)
        if stream is not None:
            stream.load_state_dict(state["data_state"])
    if trackers:
        init_kwargs = {"wandb": {"name": lg.run_name}} if lg.run_name and "wandb" in trackers else {}
        accelerator.init_trackers(project, config=flat_config(cfg.to_dict()), init_kwargs=init_kwargs)

    held_out = manifest.split(eval_cfg.split)
    eval_ds, eval_collator = evaluation_data(cfg, held_out, processor)
    train_eval_ds = train_eval_collator = None
    if eval_cfg.training_patients and len(held_out):
        train_eval_ds, train_eval_collator = evaluation_data(
            cfg, training_sample(manifest.split("train"), len(held_out), cfg.seed), processor
        )

    def run_totals() -> dict[str, float]:
        """Samples seen (all processes, all run segments) and training seconds so far: one all-reduce."""
        seen = accelerator.reduce(torch.tensor([samples_local], device=accelerator.device), reduction="sum")
        return {
            "samples_seen": samples_before + int(seen.item()),
            "train_seconds": seconds_before + time.perf_counter() - t_start,
        }

    def choose(step: int, metrics: dict, final: bool = False) -> bool:
        """Count an evaluation for ``eval.load_best_model_at_end``: ``True`` when it is the new best. The main
        process decides and every process takes its state, so all of them save, stop and load alike. ``final``: the
        last step's evaluation, which does not stop the run early."""
        if best is None or not metrics:
            return False
        best.update(step, metrics, final=final)
        best.load_state_dict(_broadcast(best.state_dict(), accelerator))
        if best.step == step and accelerator.is_main_process:
            logger.info("step %d: the best held-out %s so far (%.4f)", step, best.metric, best.value)
        return best.step == step

    def run_eval(step: int, track: bool = True) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """Every rank runs the same forwards (sharded parameters are gathered collectively); the main one logs (to
        the trackers too unless ``track`` is false: the kept weights' evaluation repeats an earlier step's)."""
        metrics, v, m = ({}, None, None)
        if len(eval_ds):
            with accelerator.autocast():
                metrics, v, m = evaluate(
                    accelerator.unwrap_model(trainer),
                    eval_ds,
                    eval_collator,
                    local_batch * world,  # the contrastive batch of a training step
                    n_bootstrap=eval_cfg.n_bootstrap,
                    seed=cfg.seed,
                    device=accelerator.device,
                )
                if train_eval_ds is not None:  # the same evaluation on training patients (eval.training_patients)
                    on_train, _, _ = evaluate(
                        accelerator.unwrap_model(trainer),
                        train_eval_ds,
                        train_eval_collator,
                        local_batch * world,
                        n_bootstrap=0,
                        seed=cfg.seed,
                        device=accelerator.device,
                    )
                    metrics |= {TRAIN_PATIENTS + k: x for k, x in on_train.items() if not k.startswith("queries/")}
                    # how many: fewer training than held-out samples when the training split is the smaller
                    metrics[TRAIN_PATIENTS + "samples"] = len(train_eval_ds)
                    metrics[TRAIN_PATIENTS + "held_out_samples"] = len(eval_ds)
                    if "eval_loss" in on_train and "eval_loss" in metrics:
                        metrics["eval_gap"] = metrics["eval_loss"] - on_train["eval_loss"]
        if accelerator.is_main_process and metrics:
            r1 = {
                k.split("/", 1)[
                    1
                ]: f"{x:.3f} (chance {metrics.get('chance_R@1/' + k.split('/', 1)[1], float('nan')):.3f})"
                for k, x in metrics.items()
                if k.startswith("R@1/")
            }
            logger.info("step %d held-out loss %.4f, R@1 %s", step, metrics.get("eval_loss", float("nan")), r1)
            if "eval_gap" in metrics:
                logger.info(
                    "step %d the same evaluation on %d training samples: loss %.4f (gap %.4f)",
                    step,
                    len(train_eval_ds),
                    metrics[TRAIN_PATIENTS + "eval_loss"],
                    metrics["eval_gap"],
                )
            if trackers and track:
                accelerator.log({k: x for k, x in metrics.items() if not k.startswith("queries")}, step=step)
        accelerator.wait_for_everyone()
        return metrics, v, m

    n_batches = len(loader) if stream is None else None
    accum = tr.gradient_accumulation_steps
    history: list[dict] = []
    if resume_path is not None:  # the records before the resumed step, so history.json and the plots start at step 1
        earlier = read_history(resume_path)
        if earlier is None:
            logger.warning(
                "%s holds no history.json (an older checkpoint): the history starts at step %d", resume_path, step
            )
        history = earlier or []
    bar = tqdm(total=opt.max_steps, initial=step, disable=not accelerator.is_local_main_process, desc="pretrain")
    t_last, samples_since, grad_norm = time.perf_counter(), 0, None
    stopped_early = best is not None and best.stopped_early  # a resumed run that had stopped: nothing left to train
    final_eval = None  # the last step's evaluation (metrics, views, masks), when this segment trains up to it
    while step < opt.max_steps and not stopped_early:
        if stream is not None:  # the stream's own position says where the epoch continues
            if stream.steps_left() == 0:
                stream.set_epoch(stream.epoch + 1)
            epoch_loader = loader
        else:
            epoch, skip = divmod(batches_seen, n_batches)
            train_ds.set_epoch(epoch)
            loader.set_epoch(epoch)
            epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        trainer.train()
        for batch in epoch_loader:
            batches_seen += 1
            if stream is not None:
                stream.advance(local_batch * world)  # one global step of the stream
                batch = batch_to_device(batch, accelerator.device)
            # every sample of the batch was skipped (counted by the collator): all processes skip it together, else
            # from here on their gradient all-reduces would pair different batches and their step counts drift
            n_empty = int(batch is None)
            if accelerator.num_processes > 1:
                flag = torch.tensor([float(n_empty)], device=accelerator.device)
                n_empty = int(accelerator.reduce(flag, reduction="sum").item())
            if n_empty:
                if accelerator.is_main_process:
                    logger.warning(
                        "batch %d: every sample skipped on %d process(es); all skip it", batches_seen, n_empty
                    )
                continue
            extra = {}
            if padder is not None:
                batch, extra = padder(batch), {"num_pad": 1}
            tokens.skip_last = extra.get("num_pad", 0)
            with accelerator.accumulate(trainer):
                if tr.max_tokens_per_batch is not None:
                    # the contrastive batch stays batch_size samples; it is embedded in token-budget groups
                    chunks = token_budget_chunks(batch["num_tokens"], tr.max_tokens_per_batch)
                    with accelerator.no_sync(trainer):
                        outputs = accelerator.unwrap_model(trainer).grad_cached_step(
                            batch["inputs"],
                            batch["patient_id"],
                            chunks,
                            backward=accelerator.backward,
                            before_backward=lambda o, b=batch, s=step: raise_if_non_finite(
                                o, b, s, trainer, accelerator
                            ),
                            autocast=accelerator.autocast,
                        )
                    if accelerator.sync_gradients:
                        all_reduce_gradients(accelerator, trainer)
                else:
                    outputs = trainer(inputs=batch["inputs"], patient_id=batch["patient_id"], **extra)
                    raise_if_non_finite(outputs, batch, step, trainer, accelerator)
                    accelerator.backward(outputs["loss"])  # DeepSpeed: also steps (clipping from its JSON) here
                if accelerator.sync_gradients and opt.grad_clip:
                    # clips (DeepSpeed: returns the norm it clipped with); the pre-clip norm is logged
                    grad_norm = accelerator.clip_grad_norm_(trainer.parameters(), opt.grad_clip)
                optimizer.step()
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                optimizer.zero_grad()
            samples_since += len(batch["sample_id"])
            samples_local += len(batch["sample_id"])
            if batches_seen % accum:
                continue
            step += 1
            bar.update(1)
            if step % lg.log_steps == 0 or step == opt.max_steps:
                loss = accelerator.reduce(outputs["loss"].detach(), reduction="mean").item()
                # samples and per-modality tokens summed over processes (one all-reduce)
                counts = torch.cat(
                    [tokens.take(accelerator.device), torch.tensor([samples_since], device=accelerator.device)]
                )
                counts = accelerator.reduce(counts, reduction="sum").tolist()
                now = time.perf_counter()
                dt = now - t_last
                rec = {
                    "step": step,
                    "loss": loss,
                    "lr": scheduler.get_last_lr()[0],
                    "temperature": float(outputs["temperature"]),
                    "samples_per_s": counts[-1] / dt,
                    "tokens_per_s": sum(counts[:-1]) / dt,
                    **{f"tokens_per_s/{n}": c / dt for n, c in zip(tokens.names, counts[:-1], strict=True)},
                    **{k: float(v) for k, v in outputs.items() if k.startswith("loss_")},
                }
                if "uniform_loss" in outputs:  # the level of a uniform guess on this batch (softmax losses)
                    rec["uniform_loss"] = accelerator.reduce(outputs["uniform_loss"].detach(), "mean").item()
                if grad_norm is not None:
                    rec["grad_norm"] = float(grad_norm)
                if accelerator.device.type == "cuda":
                    peak = torch.tensor([torch.cuda.max_memory_allocated(accelerator.device) / 2**30])
                    rec["gpu_mem_gib"] = accelerator.gather(peak.to(accelerator.device)).max().item()
                t_last, samples_since = now, 0
                history.append(rec)
                bar.set_postfix(loss=f"{loss:.3f}")
                if trackers:
                    accelerator.log(rec, step=step)
            t_pause = time.perf_counter()  # evaluation and checkpoints do not count against the throughput
            improved = False
            last = step >= opt.max_steps
            # the last step is evaluated here too, before its checkpoint is written, so that the checkpoint's history
            # and best-model state include it (a run resumed from it with more steps chooses as an uninterrupted one)
            if (eval_cfg.steps and step % eval_cfg.steps == 0) or last:
                metrics, views, masks = run_eval(step)
                if last:
                    final_eval = (metrics, views, masks)
                if metrics:
                    history.append({"step": step, **metrics})
                improved = choose(step, metrics, final=last)
                stopped_early = best is not None and best.stopped_early
                if stopped_early and accelerator.is_main_process:
                    logger.warning(
                        "step %d: early stopping, %d evaluations in a row without a better held-out %s than step "
                        "%d's %.4f (eval.early_stopping_patience)",
                        step,
                        best.since_best,
                        best.metric,
                        best.step,
                        best.value,
                    )
            stopping = stop.signum is not None
            if world > 1:  # a signal reaches the processes at different steps: they stop at the same one
                flag = torch.tensor([float(stop.signum is not None)], device=accelerator.device)
                stopping = accelerator.reduce(flag, reduction="sum").item() > 0  # one scalar, every step
                if stopping and stop.signum is None:
                    stop.signum = signal.SIGTERM  # another process got the signal
            if step % ck.save_steps == 0 or step == opt.max_steps or stopping or improved or stopped_early:
                save_checkpoint(
                    accelerator,
                    ckpt_dir,
                    step,
                    batches_seen,
                    ck.keep_last,
                    run_config_yaml,
                    history,
                    protect=best.checkpoint if best is not None else None,
                    **run_facts,
                    **({"best_model": best.state_dict()} if best is not None else {}),
                    **run_totals(),
                    **({"data_state": stream.state_dict()} if stream is not None else {}),
                )
                if crash_after_step == step:
                    os.kill(os.getpid(), signal.SIGKILL)
                if stopping and step < opt.max_steps:
                    bar.close()
                    raise RunStopped(stop.signum, step, ckpt_dir / f"checkpoint-{step}")
            t_last += time.perf_counter() - t_pause
            if step >= opt.max_steps or stopped_early:
                break
    bar.close()
    skipped = collator.report
    if skipped.total or skipped.modality_total:  # samples dropped whole, or modality values (the default policy)
        skipped.log("pretraining batches (this process, this run segment; each sample counted once)")
    final = out / "final"
    metrics, views, masks = final_eval if final_eval is not None else ({}, None, None)
    if final_eval is None and not stopped_early:  # an early stop ends on an evaluation the loop already counted
        # this segment trained no step (a finished run resumed, or optim.max_steps lowered to a saved step): the
        # checkpoint's own evaluation, if it has one, was counted when it was first run; it is repeated for the
        # held-out numbers and views only
        if any(h.get("step") == step and "eval_loss" in h for h in history):
            metrics, views, masks = run_eval(step, track=False)
        else:
            metrics, views, masks = run_eval(step)
            if metrics:
                history.append({"step": step, **metrics})
            choose(step, metrics, final=True)
    kept_step, best_missing = step, None
    if best is not None and best.step is not None and best.step != step:
        if (ckpt_dir / best.checkpoint).is_dir():
            # final/ gets the best evaluation's weights (and its optimizer state, which the trained-rows count reads)
            accelerator.load_state(str(ckpt_dir / best.checkpoint))
            kept_step = best.step
        else:  # deleted by hand after it was chosen: the run keeps its last weights and says so, it does not fail
            best_missing = str(ckpt_dir / best.checkpoint)
            if accelerator.is_main_process:
                logger.error(
                    "the best held-out %s (%.4f) was step %d's, but %s is gone: final/ holds the last step's (%d) "
                    "weights instead",
                    best.metric,
                    best.value,
                    best.step,
                    best_missing,
                    step,
                )
    if kept_step != step or stopped_early:  # the held-out numbers (and views for the plots) of the kept weights
        metrics, views, masks = run_eval(kept_step, track=False)
        if kept_step != step and accelerator.is_main_process:
            logger.info(
                "kept step %d's weights: the best held-out %s (%.4f) of %d evaluations; the last step was %d",
                kept_step,
                best.metric,
                best.value,
                best.evaluations,
                step,
            )
    best_model = {**best.summary(), "last_step": step} if best is not None else None
    if best_missing:
        best_model["checkpoint_missing"] = best_missing
    # The full state dict, gathered from the shards under ZeRO-3/FSDP: a collective, every rank calls it.
    state_dict = accelerator.get_state_dict(trainer)
    unwrapped = accelerator.unwrap_model(trainer)
    # A fact for the card (a collective under FSDP2, like the state dict): an error must not lose the model. One raised
    # by a single process is shared before the gather (trained_vocabulary_masks agrees first), so every process
    # raises here and none waits in the gather; the checkpoint of the last step is already written.
    try:
        trained_masks = trained_vocabulary_masks(unwrapped.model, optimizer)
        vocabulary_trained = trained_vocabulary_rows(trained_masks)
    except Exception:
        if accelerator.is_main_process:
            logger.exception("could not count the trained vocabulary rows; the card leaves them out")
        trained_masks, vocabulary_trained = {}, {}
    totals = run_totals()
    plots: list[Path] = []
    if accelerator.is_main_process:
        kept = {"step": kept_step, **({"best_model": best_model} if best_model else {})}
        (out / "eval_results.json").write_text(dumps({**metrics, **kept}) + "\n")
        plot_history(
            history,
            out / "loss_curves.png",
            batch_size=local_batch * world,
            loss_name=cfg.loss.name,
            dropout=cfg.data.modality_dropout,
            best_model=best_model,
        )
        plots.append(out / "loss_curves.png")
        names = unwrapped.view_names
        pairs = sorted(
            (k.split("/", 1)[1] for k in metrics if k.startswith("queries/") and not k.endswith("-fused")),
            key=lambda key: -metrics[f"queries/{key}"],
        )
        for key in pairs[:3]:
            a, b = _split_pair(key, names)
            if plot_similarity(views, masks, names, a, b, out / f"similarity_{a}__{b}.png"):
                plots.append(out / f"similarity_{a}__{b}.png")
        backbone = {k[len("model.") :]: v for k, v in state_dict.items() if k.startswith("model.")}
        for table, n in vocabulary_trained.items():
            logger.info(
                "%s: %d of %d rows trained; the others keep their random initialisation", table, n["trained"], n["rows"]
            )
        compute = compute_facts(accelerator, step, totals, cfg, local_batch=local_batch, world_changes=world_changes)
        if skipped.total or skipped.modality_total:  # the presence tables count manifest cells, not what was fed
            compute["skipped in training (main process, last run segment)"] = skipped.short()
        with atomic_dir(final) as tmp:  # all of final/ or none of it: a crash keeps the previous one
            unwrapped.model.save_pretrained(tmp, state_dict=backbone)
            head = {k[len("projection.") :]: v for k, v in state_dict.items() if k.startswith("projection.")}
            try:  # embed --space projected: the trained space; a problem here must not lose the saved backbone
                save_projection_head(head, tmp, unwrapped.model.config)
            except Exception:
                logger.exception("could not save the projection head in %s (embed --space projected refuses it)", final)
            processor.save_pretrained(tmp)
            (tmp / RUN_CONFIG).write_text(run_config_yaml)
            if trained_masks:
                try:  # finetuning reports the overlap with trained rows from it; never worth losing the model for
                    save_trained_rows(trained_masks, tmp)
                except Exception:
                    logger.exception("could not save %s in %s", TRAINED_ROWS_FILE, final)
            try:
                card = pretraining_card(
                    config=unwrapped.model.config,
                    manifest=manifest,
                    run_config=cfg.to_dict(),
                    metrics=metrics,
                    compute=compute,
                    num_parameters=num_parameters,
                    eval_split=eval_cfg.split,
                    vocabulary_trained=vocabulary_trained,
                    best_model=best_model,
                    processor_notes=processor.card_notes(),
                )
                card.save(tmp / "README.md")
            except Exception:  # the trained model is saved; a card problem must not lose the run
                logger.exception("could not write the model card %s", final / "README.md")
        (out / "history.json").write_text(json.dumps(history, indent=1) + "\n")
        logger.info("saved the pretrained backbone and processors to %s", final)
    accelerator.wait_for_everyone()
    if trackers:
        accelerator.end_training()
    summary = _summary(out, final, ckpt_dir, plots, trackers, project, lg, accelerator, best_model)
    return {
        "final": str(final),
        "history": history,
        "steps": step,
        "summary": summary,
        "losses_finite": all(math.isfinite(h["loss"]) for h in history if "loss" in h),
        "is_main_process": accelerator.is_main_process,
    }


def _summary(
    out: Path, final: Path, ckpt_dir: Path, plots, trackers, project, lg, accelerator, best_model: dict | None = None
) -> list[str]:
    """Where everything is, for the script to print at the end of the run."""
    ckpts = checkpoints(ckpt_dir)
    lines = [
        "",
        "=" * 100,
        f"Pretraining finished. Run directory: {out.resolve()}",
        f"  backbone (AutoModel)   {final.resolve()}  (config.json + model.safetensors)",
        *([f"  kept weights           {kept_weights_text(best_model)}"] if best_model else []),
        f"  processors             {final.resolve()}  (BioPerceiverProcessor.from_pretrained)",
        f"  projection head        {(final / PROJECTION_HEAD_FILE).resolve()}  (embed --space projected)",
        f"  run config             {(final / RUN_CONFIG).resolve()}  (also in every checkpoint)",
        f"  held-out evaluation    {(out / 'eval_results.json').resolve()}",
        f"  step history           {(out / 'history.json').resolve()}",
    ]
    lines += [f"  plot                   {p.resolve()}" for p in plots]
    lines.append(
        f"  checkpoints            {ckpt_dir.resolve()}  ({', '.join(c.name for c in ckpts) or 'none'}; "
        "continue with --resume latest)"
    )
    if "tensorboard" in trackers:
        logdir = Path(accelerator.logging_dir or out) / project
        lines.append(f"  TensorBoard logs       {logdir.resolve()}")
        lines.append(f"                         tensorboard --logdir {logdir.resolve()}")
    if "wandb" in trackers:
        lines.append(f"  Weights & Biases       project {project!r}, run {lg.run_name or '(auto-named)'}")
    lines += [
        "  load it:  import bioperceiver; from transformers import AutoModel; "
        f"AutoModel.from_pretrained({str(final)!r})",
        "=" * 100,
    ]
    return lines


def _split_pair(key: str, names: list[str]) -> tuple[str, str]:
    for a in names:
        if key.startswith(a + "-") and key[len(a) + 1 :] in names:
            return a, key[len(a) + 1 :]
    raise ValueError(f"retrieval pair {key!r} is not two of the views {names}")
