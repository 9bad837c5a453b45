"""Finetuning modes for the task models: linear probe, partial unfreezing, full finetuning and LoRA (``peft``)."""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

FINETUNING_MODES = ("linear_probe", "partial", "full", "lora")


class FinetuneInputError(ValueError):
    """A finetuning run's input cannot be used as given (an argument, the model or processor folder, the output
    folder, the manifest's columns); the message names it and what to pass instead. ``run_finetune.py`` prints it
    as one ``error:`` line with exit status 2, as argparse does, instead of a traceback."""


# LoRA goes on the latent path (queries, fused QKV, outputs, MLPs). The cross-attention's k_proj/v_proj are applied
# inside a fused LayerNorm+projection kernel that reads their weights directly (layers.attention._NormKV), so an
# adapter on them would be silently bypassed: they are never targeted.
DEFAULT_LORA_TARGETS = r".*encoder\..*\.(q_proj|qkv_proj|out_proj|fc1|fc2)"
_BYPASSED = ("k_proj", "v_proj")


def count_parameters(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total}


def configure_finetuning(
    model: nn.Module,
    mode: str = "full",
    *,
    unfreeze_last_n_layers: int = 1,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    lora_target_modules: str | list[str] | None = None,
) -> nn.Module:
    """Set what trains; returns the model to train (a ``peft.PeftModel`` for ``mode="lora"``).

    * ``linear_probe``: only the head (the backbone is frozen and kept in eval mode by the caller, so its
      embeddings can be computed once and cached).
    * ``partial``: the head, the last ``unfreeze_last_n_layers`` latent self-attention layers and the final norm.
    * ``full``: everything.
    * ``lora``: low-rank adapters on the encoder's latent-path linear layers (``peft``) and a fully trained head;
      merge them after training with ``merge_and_unload()`` to get a plain model again.
    """
    if mode not in FINETUNING_MODES:
        raise FinetuneInputError(f"finetuning mode {mode!r}; choose one of {FINETUNING_MODES}")
    backbone = model.bioperceiver
    if mode == "full":
        model.requires_grad_(True)
        for embedder in backbone.embedders.values():
            embedder.apply_trainability()  # a frozen pretrained part of an embedder stays frozen
    elif mode in ("linear_probe", "partial"):
        backbone.requires_grad_(False)
        model.head.requires_grad_(True)
        if getattr(model, "linear_term", None) is not None:
            model.linear_term.requires_grad_(True)
        if mode == "partial":
            layers = list(backbone.encoder.self_layers)
            if not 0 < unfreeze_last_n_layers <= len(layers):
                raise FinetuneInputError(
                    f"unfreeze_last_n_layers={unfreeze_last_n_layers}: the encoder has {len(layers)} latent "
                    "self-attention layers"
                )
            for layer in layers[-unfreeze_last_n_layers:]:
                layer.requires_grad_(True)
            backbone.encoder.norm.requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model

        targets = lora_target_modules or DEFAULT_LORA_TARGETS
        names = [targets] if isinstance(targets, str) else list(targets)
        if any(n.split(".")[-1] in _BYPASSED for n in names):
            raise FinetuneInputError(
                "LoRA on the cross-attention's k_proj/v_proj would be bypassed by the fused LayerNorm+KV kernel; "
                f"target other layers (default {DEFAULT_LORA_TARGETS!r})"
            )
        config = LoraConfig(
            r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=targets,
            modules_to_save=["head", *(["linear_term"] if getattr(model, "linear_term", None) is not None else [])],
        )
        model = get_peft_model(model, config)
        wrapped = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and n.split(".")[-1] in _BYPASSED]
        if wrapped:  # a regex matched them anyway
            raise FinetuneInputError(f"LoRA target pattern also matched fused projections {wrapped[:3]}; narrow it")
    counts = count_parameters(model)
    logger.info(
        "finetuning mode %s: %d of %d parameters trainable (%.2f%%)",
        mode,
        counts["trainable"],
        counts["total"],
        100 * counts["trainable"] / max(counts["total"], 1),
    )
    return model


LINEAR_TERM_L2 = (0.01, 0.1, 1.0, 10.0)


def fit_linear_term(
    model: nn.Module,
    train_batches: list[dict],
    eval_batches: list[dict] = (),
    *,
    l2: tuple[float, ...] | list[float] = LINEAR_TERM_L2,
    per_modality: bool = False,
    score=None,
    also_score: dict[str, list[dict]] | None = None,
    max_iter: int = 100,
) -> dict[str, Any]:
    """Fit a wide & deep model's linear term (``model.linear_term``, see
    :class:`~bioperceiver.modeling_tasks.LinearTerm`) alone, before finetuning: the task's own loss on the linear
    term's outputs over *all* training rows at once (for a Cox head the exact partial likelihood of the training
    set, as a Cox model on the covariates is fitted), plus a ridge penalty ``l2 / 2 * ||w||^2``, minimised with
    full-batch L-BFGS, one fit per penalty in ``l2``.

    ``per_modality``: a term on several modalities gets one penalty per modality, every combination of ``l2``
    tried (``len(l2) ** n_modalities`` fits), as integrative penalised models do for clinical + omics blocks
    (IPF-Lasso, Boulesteix et al. 2017): five strong clinical covariates and hundreds of weak genes need different
    shrinkage, and one shared penalty suits whichever block dominates the validation score.

    With ``eval_batches`` and ``score(outputs, labels) -> float`` (higher is better) the penalties with the best
    validation score are kept (ties and NaN: the larger total penalty); otherwise the first. ``also_score``
    (``{split name: batches}``) scores the kept fit alone on other splits, e.g. the test split, so a report can say
    how much the finetuned model adds to its linear part; those scores are reported only, never used to choose.
    The fitted intercept goes into the head's output bias, so the model starts as the fitted linear model plus the
    (small) deep head. Batches are ``TaskCollator`` outputs (``inputs``, ``labels``); the rows must not be
    augmented. Returns the penalty kept (a number, or ``{modality: penalty}`` with ``per_modality``), every
    candidate's validation score and training loss."""
    term = getattr(model, "linear_term", None)
    if term is None:
        raise ValueError("the model has no linear term (config.head_linear_modalities is unset)")
    if not train_batches:
        raise ValueError("fit_linear_term needs training batches")
    params = list(term.parameters())
    device, dtype = params[0].device, params[0].dtype
    blocks = {  # each modality's coefficient tables: what one penalty covers
        name: [t[name] for t in (term.numeric, term.categorical) if name in t] for name in term.names
    }

    def outputs(batches) -> torch.Tensor:
        rows = []
        for b in batches:
            inputs = {m: {k: v.to(device) for k, v in a.items()} for m, a in b["inputs"].items() if a is not None}
            rows.append(term(inputs, len(b["labels"]), params[0]))
        return torch.cat(rows)

    y_train = torch.cat([b["labels"] for b in train_batches]).to(device)
    y_eval = torch.cat([b["labels"] for b in eval_batches]).to(device) if eval_batches else None
    intercept = torch.zeros(term.out_features, device=device, dtype=dtype, requires_grad=True)
    grid = [float(x) for x in l2]
    if not grid or any(x < 0 for x in grid):
        raise FinetuneInputError(f"linear term penalties must be >= 0, got {grid}")
    if per_modality and len(blocks) > 1:
        candidates = [dict(zip(blocks, combo, strict=True)) for combo in itertools.product(grid, repeat=len(blocks))]
    else:
        per_modality = False
        candidates = [dict.fromkeys(blocks, x) for x in grid]

    def label(penalties: dict[str, float]) -> str:
        if not per_modality:
            return f"{next(iter(penalties.values())):g}"
        return ",".join(f"{name}={x:g}" for name, x in penalties.items())

    fits = []
    with torch.enable_grad():
        for penalties in candidates:
            with torch.no_grad():
                for p in (*params, intercept):
                    p.zero_()
            opt = torch.optim.LBFGS(
                [*params, intercept], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-6
            )

            def closure(penalties=penalties, opt=opt):
                opt.zero_grad()
                loss = model._loss(outputs(train_batches) + intercept, y_train)
                for name, tables in blocks.items():
                    loss = loss + 0.5 * penalties[name] * sum((p.float() ** 2).sum() for p in tables)
                loss.backward()
                return loss

            opt.step(closure)
            with torch.no_grad():
                train_loss = float(model._loss(outputs(train_batches) + intercept, y_train))
                val = float(score(outputs(eval_batches) + intercept, y_eval)) if y_eval is not None and score else None
            state = [p.detach().clone() for p in (*params, intercept)]
            fits.append({"l2": penalties, "train_loss": train_loss, "validation": val, "state": state})
    if any(f["validation"] is not None for f in fits):
        best = max(
            range(len(fits)),
            key=lambda i: (
                v if (v := fits[i]["validation"]) is not None and v == v else -float("inf"),
                sum(fits[i]["l2"].values()),
                tuple(fits[i]["l2"].values()),
            ),
        )
    else:
        best = 0
    chosen = fits[best]
    with torch.no_grad():
        for p, v in zip((*params, intercept), chosen["state"], strict=True):
            p.copy_(v)
        scored = {
            split: float(score(outputs(batches) + intercept, torch.cat([b["labels"] for b in batches]).to(device)))
            for split, batches in (also_score or {}).items()
            if batches and score
        }
        last = [m for m in model.head.modules() if isinstance(m, nn.Linear)][-1]
        last.bias.add_(intercept.to(last.bias.dtype))
    used = sum(int((p.detach() != 0).any(dim=1).sum()) for p in params)
    logger.info(
        "linear term on %s fitted on %d training rows: penalty %s kept (%s), %d nonzero coefficient rows%s",
        term.names,
        len(y_train),
        label(chosen["l2"]),
        "; ".join(
            f"l2 {label(f['l2'])}: "
            + (f"validation {f['validation']:.4f}" if f["validation"] is not None else "no validation")
            for f in fits
        ),
        used,
        "".join(f"; the term alone on {split}: {v:.4f}" for split, v in scored.items()),
    )
    out = {
        "modalities": list(term.names),
        "l2": dict(chosen["l2"]) if per_modality else next(iter(chosen["l2"].values())),
        "per_modality": per_modality,
        "validation": {label(f["l2"]): f["validation"] for f in fits},
        "train_loss": {label(f["l2"]): f["train_loss"] for f in fits},
        "nonzero_coefficient_rows": used,
    }
    if scored:
        out["term_alone"] = scored
    return out


def merge_lora(model: Any) -> nn.Module:
    """A plain task model from a ``PeftModel`` (adapters merged into the weights); other models pass through."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


@torch.no_grad()
def compute_latents(model: nn.Module, batches, device: torch.device | str | None = None) -> torch.Tensor:
    """The frozen backbone's ``last_hidden_state`` for every batch (``{"inputs": ...}``), concatenated on CPU:
    the cache a linear probe trains on instead of re-running the encoder every epoch. ``device``: where the
    batches go (default: the backbone's, e.g. the GPU the model was moved to)."""
    backbone = model.bioperceiver
    device = next(backbone.parameters()).device if device is None else device
    was_training = backbone.training
    backbone.eval()
    out = []
    for batch in batches:
        inputs = {n: {k: v.to(device) for k, v in a.items()} for n, a in batch["inputs"].items()}
        out.append(backbone(inputs=inputs).last_hidden_state.cpu())
    backbone.train(was_training)
    return torch.cat(out)


# ---- safety before any work: model/processor paths, the output folder, resume ------------------------------------

RUN_RECORD = "finetuning_run.json"
LEARNING_CURVES = "learning_curves.png"  # training loss, validation loss and metric per evaluation
# files whose presence means a folder already holds a finetuning run (or a model): never mixed into silently
RUN_MARKERS = ("all_results.json", "model.safetensors", "config.json", "finetuning_task.json", RUN_RECORD)
# arguments a resumed run may change: how long to train, logging, saving and what is reported at the end
RESUMABLE_ARGUMENTS = frozenset(
    {
        "num_train_epochs",
        "max_steps",
        "logging_steps",
        "logging_strategy",
        "logging_first_step",
        "logging_nan_inf_filter",
        "log_level",
        "log_level_replica",
        "log_on_each_node",
        "disable_tqdm",
        "report_to",
        "run_name",
        "project",
        "save_steps",
        "save_strategy",
        "save_total_limit",
        "save_on_each_node",
        "eval_steps",
        "per_device_eval_batch_size",
        "eval_accumulation_steps",
        "dataloader_num_workers",
        "dataloader_pin_memory",
        "dataloader_persistent_workers",
        "dataloader_prefetch_factor",
        "do_eval",
        "do_predict",
        "output_dir",
        "resume_from_checkpoint",
        "overwrite_output_dir",
        "n_bootstrap",
        "ablations",
        "min_pattern_samples",
        "uncertainty",
        "mc_dropout_samples",
        "conformal_alpha",
        "interpret",
        "explain_samples",
        "license",
        "push_to_hub",
        "hub_model_id",
        "hub_strategy",
        "hub_token",
        "hub_private_repo",
        "hub_always_push",
        "hub_revision",
    }
)
LATEST = ("latest", "last", "true")  # --resume_from_checkpoint values meaning "the last checkpoint in output_dir"
# what a finetuning run writes into its output_dir (file names or fnmatch patterns): --overwrite_output_dir removes
# these and nothing else (a user's notes or data beside a run stay), plus the plots the old all_results.json lists
RUN_OUTPUTS = (
    RUN_RECORD,
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
    "training_args.bin",
    "bioperceiver_processor.json",
    "bioperceiver_processor.json.tmp",
    "processors",
    "finetuning_task.json",
    "trained_vocabulary_rows.safetensors",
    "README.md",
    "all_results.json",
    "trainer_state.json",
    LEARNING_CURVES,
    "results_by_pattern.csv",
    "ablation.csv",
    "calibration_set.npz",
    "predictions_test.csv",
    "local_only",
    "explanations",
    "ablation.png",
    "roc_pr.png",
    "calibration.png",
    "reliability_diagram.png",
    "km_by_risk_group.png",
    "predicted_vs_true.png",
    "modality_shapley.png",
    "checkpoint-*",
    "tmp-checkpoint-*",
)


def check_model_path(path: str, *, argument: str = "--model_name_or_path") -> None:
    """Fail before any work when ``path`` cannot be a BioPerceiver model folder: a folder without ``config.json``,
    a file, a ``config.json`` of another model type, or a path that does not exist locally (a hub repo id is tried
    only when the hub can be reached)."""
    p = Path(path).expanduser()
    if p.is_dir():
        config = p / "config.json"
        if not config.exists():
            hints = sorted(str(c.parent) for c in p.glob("*/config.json"))[:3]
            hint = f" (folders below it that do: {hints})" if hints else ""
            raise FinetuneInputError(
                f"{argument} {path} is a folder but holds no config.json: pass the `final/` folder of a pretraining "
                f"run or a finetuned model folder{hint}"
            )
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (OSError, ValueError) as err:
            raise FinetuneInputError(
                f"{argument} {path}: config.json cannot be read ({err}); re-save the model"
            ) from err
        if model_type != "bioperceiver":
            raise FinetuneInputError(
                f"{argument} {path} holds a {model_type!r} model, not a BioPerceiver one: pass the `final/` folder "
                "of a pretraining run or a folder written by run_finetune.py"
            )
        return
    if p.exists():
        raise FinetuneInputError(f"{argument} {path} is a file; pass the model's folder (the one holding config.json)")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    looks_like_repo = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    message = (
        f"{argument} {path} does not exist locally. Pass the `final/` folder of a pretraining run or a finetuned "
        "model folder (check the path and the working directory); a Hugging Face hub id (org/name) needs network "
        "access"
    )
    if offline or not looks_like_repo:
        raise FinetuneInputError(message + (" and HF_HUB_OFFLINE is set" if offline else ""))
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path)
    except Exception as err:  # every hub failure gets the same advice, the cause chained
        raise FinetuneInputError(f"{message}, and fetching it from the hub failed: {err}") from err


def processor_folder(processor_dir: str | None, model_name_or_path: str | None) -> Path | None:
    """The folder whose fitted processors a run uses: ``processor_dir`` (which must hold them), else the model's
    folder when it holds them, else ``None`` (processors are fitted on the training split)."""
    if processor_dir:
        p = Path(processor_dir)
        if not (p / "bioperceiver_processor.json").exists():
            raise FinetuneInputError(
                f"--processor_dir {processor_dir} holds no bioperceiver_processor.json: pass the folder a pretraining "
                "run or run_finetune.py saved processors in (e.g. the pretraining run's `final/`), or leave "
                "--processor_dir unset to use the model's processors or fit new ones"
            )
        return p
    if model_name_or_path and (Path(model_name_or_path) / "bioperceiver_processor.json").exists():
        return Path(model_name_or_path)
    return None


def saved_processor_modalities(folder: str | os.PathLike) -> list[str]:
    """The modality columns of the processors saved in ``folder`` (reads the JSON only; nothing is loaded)."""
    return list(json.loads((Path(folder) / "bioperceiver_processor.json").read_text())["modalities"])


def check_modalities_match(
    processor_modalities: list[str],
    model_modalities: list[str],
    *,
    wanted: list[str] | None,
    processor_source: str,
    model_source: str,
) -> list[str]:
    """The modalities a run uses (``processor_modalities``, restricted to ``wanted``), checked against the model's:
    every one needs a processor and an embedder in the model. ``processor_source`` names where the processors come
    from (``"the processors in DIR"``). Raises ``ValueError`` naming both sets and what to pass instead."""
    if wanted:
        lacking = sorted(set(wanted) - set(processor_modalities))
        if lacking:
            raise FinetuneInputError(
                f"--modalities {lacking} are not among {processor_source} {sorted(processor_modalities)}: restrict "
                "--modalities to those, or pass a --processor_dir fitted with them"
            )
    used = [m for m in processor_modalities if not wanted or m in wanted]
    extra = sorted(set(used) - set(model_modalities))
    if extra:
        shared = [m for m in used if m in model_modalities]
        raise FinetuneInputError(
            f"{processor_source} cover modalities {sorted(used)} but the model {model_source} was built with "
            f"{sorted(model_modalities)} ({extra} have no embedder in it): pass --processor_dir with the processors "
            f"saved beside the model (its own folder), or restrict --modalities to {shared}"
        )
    return used


def resolved_arguments(*groups: Any) -> dict[str, Any]:
    """One flat, JSON-safe dict of argument dataclasses (``TrainingArguments`` through its ``to_dict``)."""
    from dataclasses import asdict, is_dataclass

    out: dict[str, Any] = {}
    for g in groups:
        values = g.to_dict() if hasattr(g, "to_dict") else asdict(g) if is_dataclass(g) else dict(g)
        out.update(values)
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def arguments_hash(arguments: dict[str, Any], resumable: frozenset[str] = RESUMABLE_ARGUMENTS) -> str:
    """sha256 of the arguments that define a run (the ``resumable`` ones left out)."""
    kept = {k: v for k, v in arguments.items() if k not in resumable}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


# what pretrain/run_pretrain.py writes into its output_dir: a folder holding any of them is a pretraining run
PRETRAINING_MARKERS = ("checkpoints", "final", "history.json")


def pretraining_markers(folder: str | os.PathLike) -> list[str]:
    """The entries of ``folder`` that show it holds a pretraining run (``checkpoints/``, ``final/``,
    ``history.json``), folders with a trailing ``/``."""
    p = Path(folder)
    return [m + ("/" if (p / m).is_dir() else "") for m in PRETRAINING_MARKERS if (p / m).exists()]


def check_not_a_pretraining_run(output_dir: str | os.PathLike) -> None:
    """Refuse an ``output_dir`` holding a pretraining run (:func:`pretraining_markers`): never written into, resumed
    or cleared by finetuning, since it holds the backbone being finetuned (or another one)."""
    out = Path(output_dir)
    pretraining = pretraining_markers(out)
    if pretraining:
        raise FinetuneInputError(
            f"--output_dir {out} holds a pretraining run of pretrain/run_pretrain.py ({', '.join(pretraining)}): a "
            "finetuning run never writes into one, not with --overwrite_output_dir or --resume_from_checkpoint "
            f"either. Pass a new --output_dir (e.g. {out.parent / (out.name + '_finetuned')})"
            + (f"; its backbone is --model_name_or_path {out / 'final'}" if (out / "final").is_dir() else "")
        )


def run_markers(folder: str | os.PathLike) -> list[str]:
    """The files and checkpoints in ``folder`` that show it already holds a finetuning run or a model."""
    p = Path(folder)
    if not p.is_dir():
        return []
    found = [m for m in RUN_MARKERS if (p / m).exists()]
    return found + sorted(c.name for c in p.glob("checkpoint-*") if c.is_dir())


def resolve_resume_checkpoint(resume_from_checkpoint: str | None, output_dir: str | os.PathLike) -> str | None:
    """``--resume_from_checkpoint``: ``latest`` (or ``last``/``true``) = the last *complete* ``checkpoint-*`` in
    ``output_dir`` (one holding ``trainer_state.json``, which the Trainer writes last: a run killed while saving
    leaves a folder without it, which is passed over with a warning, as pretraining's ``--resume latest`` does);
    otherwise a checkpoint folder that must be complete. ``None``/``false`` = no resume."""
    from .checkpointing import TRAINER_STATE, latest_checkpoint

    value = resume_from_checkpoint
    if value is None or str(value).lower() in ("", "false", "none", "no"):
        return None
    if str(value).lower() in LATEST:
        out = Path(output_dir)
        last = latest_checkpoint(out) if out.is_dir() else None
        done = int(last.name.rsplit("-", 1)[1]) if last is not None else -1
        partial = sorted(  # checkpoint-<step> folders newer than the last complete one, without trainer_state.json
            (int(c.name.rsplit("-", 1)[1]), c.name)
            for c in (out.glob("checkpoint-*") if out.is_dir() else ())
            if c.is_dir() and c.name.rsplit("-", 1)[1].isdigit() and not (c / TRAINER_STATE).is_file()
        )
        newer = [name for step, name in partial if step > done]
        why = f"{', '.join(newer)} incomplete (no {TRAINER_STATE}: the run stopped while writing it)"
        if last is None:
            raise FinetuneInputError(
                f"--resume_from_checkpoint {value}: {output_dir} holds no complete checkpoint-* folder to resume"
                + (f" ({why})" if newer else "")
                + "; start a new run without it (or in another --output_dir), or pass a checkpoint folder"
            )
        if newer:
            logger.warning(
                "--resume_from_checkpoint %s: %s; resuming from %s, the last complete checkpoint (training writes the "
                "incomplete one again when it gets there)",
                value,
                why,
                last.name,
            )
        return str(last)
    if not (Path(value) / "trainer_state.json").exists():
        raise FinetuneInputError(
            f"--resume_from_checkpoint {value} is not a complete checkpoint folder (no trainer_state.json: not a "
            "checkpoint, or one whose writing was interrupted): pass `latest` (the last complete one) or one of the "
            "checkpoint-* folders of the run's output_dir"
        )
    return str(value)


def check_output_dir(
    output_dir: str | os.PathLike,
    arguments: dict[str, Any],
    *,
    resume: str | None,
    overwrite: bool,
    protected: tuple[str | os.PathLike | None, ...] = (),
    resumable: frozenset[str] = RESUMABLE_ARGUMENTS,
) -> tuple[dict[str, Any], bool]:
    """Decide what a run may do with ``output_dir`` without touching it: returns ``(run record, clear first)``.

    A pretraining run's folder (:func:`pretraining_markers`) is always refused. A folder that already holds a run
    (:func:`run_markers`) is refused unless ``resume`` (the run's record, when it
    has one, must match ``arguments`` up to the ``resumable`` keys: changed ones are named) or ``overwrite`` (the
    folder is cleared first; never a folder that holds one of the ``protected`` paths, e.g. the model being
    finetuned or the manifest)."""
    out = Path(output_dir)
    check_not_a_pretraining_run(out)
    found = run_markers(out)
    record = {"run_id": uuid.uuid4().hex[:12], "arguments_hash": arguments_hash(arguments, resumable)}
    record["arguments"] = arguments
    if resume is None:
        if not found:
            return record, False
        if not overwrite:
            raise FinetuneInputError(
                f"--output_dir {out} already holds a finetuning run or a model ({', '.join(found[:6])}): runs are "
                "never mixed. Pass --resume_from_checkpoint latest to continue it, --overwrite_output_dir true to "
                "clear the folder and start again, or another --output_dir"
            )
        here = out.resolve()
        for p in protected:
            if p is not None and Path(p).exists() and Path(p).resolve().is_relative_to(here):
                raise FinetuneInputError(
                    f"--overwrite_output_dir would delete {p}, which this run reads: pass another --output_dir"
                )
        return record, True
    previous = Path(resume) / RUN_RECORD if resume and (Path(resume) / RUN_RECORD).exists() else out / RUN_RECORD
    if not previous.exists():
        logger.warning("%s has no %s (written by an older version): resuming without checking it", out, RUN_RECORD)
        return record, False
    old = json.loads(previous.read_text())
    if old["arguments_hash"] != record["arguments_hash"]:
        before, now = old.get("arguments", {}), arguments
        changed = sorted(k for k in set(before) | set(now) if k not in resumable and before.get(k) != now.get(k))
        detail = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed) or "(unknown keys)"
        raise FinetuneInputError(
            f"--resume_from_checkpoint: the run in {previous.parent} (run id {old['run_id']}) was started with other "
            f"arguments: {detail}. Only the training length, logging, saving and reporting arguments may change on "
            "resume (bioperceiver.training.finetuning.RESUMABLE_ARGUMENTS): restore the others, or start a new run "
            "(--overwrite_output_dir true or another --output_dir)"
        )
    record["run_id"] = old["run_id"]
    return record, False


def run_outputs(folder: str | os.PathLike, patterns=RUN_OUTPUTS) -> tuple[list[Path], list[Path]]:
    """``(written by a run, anything else)``: the entries of ``folder`` matching ``patterns`` (file names or fnmatch
    patterns; default a finetuning run's, :data:`RUN_OUTPUTS`, plus the plots named in its ``all_results.json``),
    and the rest (a user's notes, data), each sorted by name."""
    out = Path(folder)
    names = set(patterns)
    try:  # plots a run recorded (a task's own plot names too)
        results = json.loads((out / "all_results.json").read_text())
        plots = [*results.get("plots", []), *results.get("test", {}).get("plots", [])]
        names |= {p for p in plots if isinstance(p, str) and Path(p).name == p}
    except (OSError, ValueError, AttributeError):
        pass
    ours, others = [], []
    for child in sorted(out.iterdir()) if out.is_dir() else ():
        (ours if any(fnmatch.fnmatchcase(child.name, n) for n in names) else others).append(child)
    return ours, others


def remove_run_outputs(folder: str | os.PathLike, patterns=RUN_OUTPUTS, what: str = "finetuning") -> None:
    """``--overwrite_output_dir``: remove what a ``what`` run writes in ``folder`` (:func:`run_outputs` with
    ``patterns``) and nothing else; the rest is kept and named in the log. Both scripts use it."""
    out = Path(folder)
    ours, others = run_outputs(out, patterns)
    logger.warning("--overwrite_output_dir: removing the previous run's %d files/folders from %s", len(ours), out)
    for child in ours:
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    if others:
        logger.warning(
            "--overwrite_output_dir: kept %d entries of %s that a %s run does not write: %s",
            len(others),
            out,
            what,
            ", ".join(c.name + ("/" if c.is_dir() else "") for c in others[:10]) + (" ..." if len(others) > 10 else ""),
        )


def start_run(output_dir: str | os.PathLike, record: dict[str, Any], clear: bool) -> None:
    """Clear ``output_dir`` if asked (what a finetuning run writes, :func:`run_outputs`; anything else is kept and
    named in the log), create it and write the run record (call on the main process only)."""
    out = Path(output_dir)
    if clear and out.is_dir():
        remove_run_outputs(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
