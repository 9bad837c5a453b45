"""The finetuning run behind ``finetune/run_finetune.py``, as a library function: :func:`run_finetuning`.

Checks before any work (model/processor folders, output folder, resume, manifest), data preparation (splits, task
fitting, ``--label_fraction``), processors and model, the Hugging Face ``Trainer`` (cached latents for a linear
probe), training, and the report: metrics with bootstrap CIs, per-pattern results, ablations, plots, the saved
model + processors + task, the model card and ``all_results.json``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm
from transformers import TrainingArguments, set_seed

from ..cards import KEPT_AMONG_TIES, finetuning_card
from ..data import (
    BioPerceiverProcessor,
    ManifestDataset,
    assign_splits,
    check_manifest_before_work,
    load_processor_settings,
    read_manifest,
)
from ..data.errors import DataError
from ..data.manifest import is_missing
from ..data.processing import same_setting
from ..data.validate import ManifestError
from ..evaluation.plots import plot_learning_curves
from ..evaluation.report import ReportSettings, evaluate_and_report, headline
from ..factory import create_config
from ..jsonio import dumps
from ..losses.distributed import world as distributed_world
from ..tasks import Task
from .arguments import DataArguments, ModelArguments, task_settings
from .finetuning import (
    LEARNING_CURVES,
    RUN_RECORD,
    FinetuneInputError,
    check_modalities_match,
    check_model_path,
    check_not_a_pretraining_run,
    check_output_dir,
    compute_latents,
    configure_finetuning,
    count_parameters,
    fit_linear_term,
    merge_lora,
    processor_folder,
    resolve_resume_checkpoint,
    resolved_arguments,
    saved_processor_modalities,
    start_run,
)
from .metering import numerics_facts
from .privacy import DPSettings, DPTaskTrainer, check_dp_run, clear_grad_samples
from .tasks import (
    EpochSetter,
    LatentDataset,
    ProcessedDataset,
    RunRecordSaver,
    TaskCollator,
    TaskTrainer,
    labelled_records,
    tied,
)

logger = logging.getLogger("run_finetune")  # the name the script's log lines have always carried
ROOT = Path(__file__).resolve().parents[3]
LOWER_IS_BETTER = ("loss", "mse", "rmse", "mae", "brier", "log_loss")


@contextlib.contextmanager
def input_errors():
    """The ``ValueError`` of a check of the user's settings or labels made by another module (the task, the DP
    settings) as a :class:`~.finetuning.FinetuneInputError` (``DataError``/``ManifestError`` pass unchanged): wrap only
    calls whose every ``ValueError`` is such a check, so that a bug elsewhere still shows its traceback."""
    try:
        yield
    except (FinetuneInputError, DataError, ManifestError):
        raise
    except ValueError as err:
        raise FinetuneInputError(str(err)) from err


def subsample_patients(records: list[dict], fraction: float, seed: int) -> list[dict]:
    """Keep a seeded ``fraction`` of training *patients* (all their rows): the label-efficiency setting."""
    if fraction >= 1.0:
        return records
    if fraction <= 0:
        raise FinetuneInputError(f"label_fraction must be in (0, 1], got {fraction}")
    patients = sorted({str(r.get("patient_id")) for r in records})
    rng = np.random.default_rng(seed)
    kept = set(rng.choice(patients, size=max(2, math.ceil(fraction * len(patients))), replace=False).tolist())
    rows = [r for r in records if str(r.get("patient_id")) in kept]
    logger.info("label_fraction %.3f: %d of %d patients, %d rows", fraction, len(kept), len(patients), len(rows))
    return rows


def load_processor(model_args, data_args, manifest) -> tuple[BioPerceiverProcessor, dict]:
    """The model's (or ``--processor_dir``'s) fitted processors; otherwise processors fitted on the training split
    of the used modalities with ``--processor_settings``."""
    settings, embedders = load_processor_settings(_path(data_args.processor_settings))
    folder = processor_folder(data_args.processor_dir, model_args.model_name_or_path)
    if folder is not None:
        logger.info("processors from %s", folder)
        proc = BioPerceiverProcessor.from_pretrained(folder)
        fitted = {m: asdict(p.settings) for m, p in proc.processors.items()}
        warn_ignored_settings("processors", settings, fitted, f"the fitted processors of {folder} are used")
        return proc, embedders
    logger.info("fitting processors on the %s split", data_args.train_split)
    wanted = set(data_args.modalities or manifest.modalities)
    settings = {k: v for k, v in settings.items() if k in manifest.modalities and k in wanted}  # others: unused here
    proc = BioPerceiverProcessor.from_manifest(manifest, settings)
    if data_args.modalities:
        proc = BioPerceiverProcessor({m: p for m, p in proc.processors.items() if m in data_args.modalities})
    return proc.fit(manifest, split=data_args.train_split), embedders


def warn_ignored_settings(section: str, given: dict, used: dict, why: str) -> list[str]:
    """Warn about ``--processor_settings`` entries of ``section`` that differ from what the run uses (``used``:
    ``{column: {key: value}}``) because it loads them from a folder; returns the differences. Columns the run
    does not have are left out (a shared settings file covers many cohorts; the manifest check reports those)."""
    differ = []
    for column, entries in sorted(given.items()):
        if column not in used:
            continue
        for key, value in sorted((entries or {}).items()):
            if key == "kind":
                continue
            have = used[column].get(key, "<unset>")
            if not same_setting(key, have, value):
                differ.append(f"{section}.{column}.{key}: {value!r} given, {have!r} used")
    if differ:
        logger.warning(
            "--processor_settings entries ignored (%s; change them by fitting or pretraining anew): %s",
            why,
            "; ".join(differ),
        )
    return differ


def _path(p: str | None) -> Path | None:
    if p is None:
        return None
    return Path(p) if Path(p).exists() else ROOT / p


def check_before_work(model_args, data_args, training_args):
    """What can be checked before any work: the model folder, saved processors against the model's modalities,
    the output folder (runs never mix) and ``--resume_from_checkpoint``. Returns ``(run record, clear output_dir
    first, checkpoint to resume)``; raises ``ValueError`` saying what to pass instead."""
    if model_args.model_name_or_path:
        check_model_path(model_args.model_name_or_path)
    check_something_to_evaluate(model_args, training_args)
    with input_errors():  # a mistyped --task (or task setting) before the manifest is read
        Task.from_dict(task_settings(model_args, data_args))
    folder = processor_folder(data_args.processor_dir, model_args.model_name_or_path)
    if folder is not None:
        check_modalities(model_args, data_args, saved_processor_modalities(folder), f"the processors in {folder}")
    out = Path(training_args.output_dir)
    check_not_a_pretraining_run(out)  # before resolving --resume_from_checkpoint in it
    resume = resolve_resume_checkpoint(training_args.resume_from_checkpoint, out)
    arguments = resolved_arguments(model_args, data_args, training_args)
    protected = (model_args.model_name_or_path, data_args.processor_dir, data_args.manifest)
    record, clear = check_output_dir(
        out, arguments, resume=resume, overwrite=data_args.overwrite_output_dir, protected=protected
    )
    return record, clear, resume


def has_trained_head(model_name_or_path: str | None) -> bool:
    """Whether ``model_name_or_path`` is a finetuned model (a ``run_finetune.py`` output folder, with its
    ``finetuning_task.json``; on the hub, a config of a task architecture) rather than a backbone, whose task head
    would start at random."""
    from ..tasks import SPEC_NAME

    if not model_name_or_path:
        return False
    if Path(model_name_or_path).expanduser().is_dir():
        return (Path(model_name_or_path).expanduser() / SPEC_NAME).exists()
    architectures = transformers.AutoConfig.from_pretrained(model_name_or_path).architectures or []
    return any(a != "BioPerceiverModel" for a in architectures)


def check_something_to_evaluate(model_args, training_args) -> None:
    """Without ``--do_train`` (transformers' ``TrainingArguments`` defaults it to false) a run only evaluates and
    saves the model it is given: refused for a backbone (a pretraining ``final/`` folder) or ``none``, whose task head
    would be random and yet be saved and reported as a finished finetune; allowed for a finetuned folder (evaluation
    on this manifest). ``--resume_from_checkpoint`` without ``--do_train`` would load no checkpoint: refused."""
    if training_args.do_train:
        return
    resume = training_args.resume_from_checkpoint
    if resume is not None and str(resume).lower() not in ("", "false", "none", "no"):
        raise FinetuneInputError(
            f"--resume_from_checkpoint {resume} without --do_train: only training loads a checkpoint, so the run "
            "would evaluate the model it starts from. Pass --do_train true to continue the run"
        )
    path = model_args.model_name_or_path
    if has_trained_head(path):
        logger.info("no --do_train: evaluating the finetuned model %s as it is (no training)", path)
        return
    what = (
        f"the backbone {path} (no finetuning_task.json: not a run_finetune.py output folder)"
        if path
        else "a randomly initialised model (--model_name_or_path not given or none)"
    )
    raise FinetuneInputError(
        f"--do_train is not set (transformers' TrainingArguments default it to false), so nothing would be trained: "
        f"{what} would be evaluated and saved with a random task head as if finetuned. Pass --do_train true to "
        "finetune; to evaluate without training, give a finetuned folder (the --output_dir of an earlier "
        "run_finetune.py run) as --model_name_or_path"
    )


def check_modalities(model_args, data_args, modalities: list[str], source: str) -> list[str]:
    """The modalities the run uses (``modalities`` restricted to ``--modalities``), each with an embedder in the
    model (from ``--model_name_or_path``; a randomly initialised model is built for them)."""
    model_modalities = modalities
    if model_args.model_name_or_path:
        model_modalities = list(transformers.AutoConfig.from_pretrained(model_args.model_name_or_path).modality_names)
    return check_modalities_match(
        modalities,
        model_modalities,
        wanted=data_args.modalities,
        processor_source=source,
        model_source=model_args.model_name_or_path,
    )


def trained_id_rows(model_dir, processor) -> dict[str, np.ndarray]:
    """``{modality: per vocabulary id, whether pretraining trained its embedding row}`` from the backbone's
    ``trained_vocabulary_rows.safetensors`` (:func:`~bioperceiver.training.pretraining.save_trained_rows`); ``{}``
    for a backbone without it (not pretrained here, or before it was recorded). A mask whose length is not the
    processor's vocabulary (processors from elsewhere) is left out, with a warning."""
    from .pretraining import TRAINED_ROWS_FILE, load_trained_rows

    masks = load_trained_rows(model_dir) if model_dir and Path(model_dir).is_dir() else None
    out = {}
    for name, proc in processor.processors.items() if masks else ():
        if proc.vocabulary_ids is None or not proc.is_fitted:
            continue
        size_field, table = proc.vocabulary_ids
        mask = masks.get(f"{name}.{table}")
        if mask is None:
            continue
        size = proc.model_settings().get(size_field)
        if size != len(mask):
            logger.warning(
                "%s has %d rows for %r, its processor %s ids: trained-row counts left out (processors from another "
                "run?)",
                TRAINED_ROWS_FILE,
                len(mask),
                name,
                size,
            )
            continue
        out[name] = mask
    return out


def carry_trained_rows(model_dir, model, out) -> None:
    """A finetuned model's folder keeps its backbone's record of which vocabulary rows *pretraining* trained
    (``trained_vocabulary_rows.safetensors``), each mask grown with untrained rows for the ids the vocabulary extension
    appended (:meth:`~bioperceiver.modalities.embedder.ModalityEmbedder.resize_vocabulary` keeps existing rows
    first), so that finetuning this folder on another cohort reports the trained overlap too. Nothing when the
    backbone has no record; a mask longer than the model's table (not this backbone's) is left out, with a warning."""
    from .pretraining import TRAINED_ROWS_FILE, load_trained_rows, save_trained_rows

    masks = load_trained_rows(model_dir) if model_dir and Path(model_dir).is_dir() else None
    if not masks:
        return
    embedders = getattr(model, model.base_model_prefix, model).embedders  # a task model or the backbone itself
    carried = {}
    for key, mask in masks.items():
        name, table = key.rsplit(".", 1)
        emb = getattr(embedders[name], table, None) if name in embedders else None
        if emb is None or emb.num_embeddings < len(mask):
            logger.warning(
                "%s: %r has no table of at least %d rows in the finetuned model; not carried over",
                TRAINED_ROWS_FILE,
                key,
                len(mask),
            )
            continue
        grown = torch.zeros(emb.num_embeddings, dtype=torch.bool)
        grown[: len(mask)] = torch.from_numpy(mask)
        carried[key] = grown
    if carried:
        save_trained_rows(carried, out)


def extend_vocabulary(model_args, data_args, processor, manifest, used: list[str]) -> dict[str, dict]:
    """With a pretrained model and ``--extend_vocabulary`` (default): extend its saved processors' vocabularies
    (genes, tabular features) with the training split (:meth:`BioPerceiverProcessor.extend`); the model's embeddings
    are grown to match after loading. ``{modality: counts}`` of the extended modalities (logged)."""
    if not model_args.model_name_or_path or not data_args.extend_vocabulary:
        return {}
    if processor_folder(data_args.processor_dir, model_args.model_name_or_path) is None:
        return {}  # fitted on this training split: nothing to extend
    trained = trained_id_rows(model_args.model_name_or_path, processor)
    report = processor.extend(
        manifest, split=data_args.train_split, modalities=used, trained=trained, on_error=data_args.on_error
    )
    for name, counts in report.items():
        logger.info(
            "vocabulary of %r extended on the %s split: %d added, %d overlapping with the pretrained vocabulary%s "
            "(%d -> %d)",
            name,
            data_args.train_split,
            counts["added"],
            counts["overlap"],
            f", {counts['overlap_trained']} of them trained in pretraining," if "overlap_trained" in counts else "",
            counts["vocabulary_before"],
            counts["vocabulary_after"],
        )
        if counts.get("token_share_trained") is not None:
            logger.info(
                "%r: %.0f%% of the %s profiles' tokens use embeddings pretraining trained (the rest start random)",
                name,
                100 * counts["token_share_trained"],
                data_args.train_split,
            )
    if model_args.finetuning_mode != "full" and any(c["added"] for c in report.values()):
        logger.warning(
            "finetuning_mode %s: the added vocabulary embeddings stay at their random initialisation (only "
            "--finetuning_mode full trains the embedders); --extend_vocabulary false leaves the new genes/features out",
            model_args.finetuning_mode,
        )
    return report


def build_model(model_args, task: Task, processor, embedders, train_records, used: list[str], strict: bool = False):
    """The task model: from ``--model_name_or_path`` (a backbone gets a new head; ``strict``: every weight must come
    from the folder, for evaluating a finetuned model) or randomly initialised from ``--preset``."""
    cls = task.model_class()
    head = {
        "head_type": model_args.head_type,
        "head_hidden_size": model_args.head_hidden_size,
        "head_dropout": model_args.head_dropout,
        **task.config_settings(train_records),
    }
    if model_args.head_linear_modalities:  # unset: a finetuned model's own setting stays
        head["head_linear_modalities"] = sorted({m for m in model_args.head_linear_modalities if m in used})
        if dropped := sorted(set(model_args.head_linear_modalities) - set(used)):
            logger.warning("--head_linear_modalities %s are not used in this run; left out of the linear term", dropped)
    if model_args.model_name_or_path:
        config = transformers.AutoConfig.from_pretrained(model_args.model_name_or_path, **head)
        missing = sorted(set(used) - set(config.modality_names))
        if missing:
            raise FinetuneInputError(
                f"modalities {missing} are used but {model_args.model_name_or_path} was not built with them; "
                f"restrict --modalities to {config.modality_names} or pretrain with them"
            )
        model, loading = cls.from_pretrained(model_args.model_name_or_path, config=config, output_loading_info=True)
        missing = sorted(loading["missing_keys"])
        if strict and missing:  # evaluating a finetuned model: nothing of it may start at random
            raise FinetuneInputError(
                f"evaluating {model_args.model_name_or_path} (no --do_train): the head the arguments describe "
                f"(--head_type {model_args.head_type}, ...) is not the one it was finetuned with, so "
                f"{len(missing)} weight(s) would start at random ({missing[:3]}); "
                "pass the head arguments of its finetuning_run.json"
            )
        warn_ignored_settings(
            "embedders", embedders, config.modalities, f"the embedders of {model_args.model_name_or_path} are used"
        )
    else:
        config = create_config(model_args.preset, modalities=processor.model_modalities(embedders), **head)
        model = cls(config)
    return model


def run_finetuning(
    model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments
) -> dict[str, Any]:
    """One finetuning run; returns the results written to ``output_dir/all_results.json`` (on the main process,
    with the test metrics; on the others, what was known before the report)."""
    normalise_arguments(model_args, training_args)
    out = Path(training_args.output_dir)
    with input_errors():
        dp = DPSettings.from_arguments(model_args)  # None: no differential privacy
    if dp is not None and model_args.head_linear_modalities and model_args.head_linear_fit:
        raise FinetuneInputError(
            "--head_linear_fit fits the linear term on the training rows outside DP-SGD, which the privacy "
            "guarantee would not cover; pass --head_linear_fit false (the term then starts at zero and trains "
            "under DP-SGD with the rest)"
        )
    # before any work: paths, processors vs. model, the output folder (runs never mix), resume
    record, clear, resume = check_before_work(model_args, data_args, training_args)
    set_seed(training_args.seed)
    t0 = time.perf_counter()
    eval_only = evaluate_only(model_args, training_args)  # a finetuned folder evaluated as it was trained
    manifest, task = load_manifest_and_task(model_args, data_args, training_args, eval_only)
    if dp is not None:
        with input_errors():
            check_dp_run(training_args, task, resume)
    with training_args.main_process_first(desc="every process checked output_dir"):
        pass
    with training_args.main_process_first(desc="preparing output_dir"):
        if training_args.should_save:
            start_run(out, record, clear)
    labelled, labels_left_out = labelled_splits(manifest, task, data_args, training_args.seed, fit=not eval_only)
    train_recs = labelled[data_args.train_split][0]
    processor, embedders = load_processor(model_args, data_args, manifest)
    used = used_modalities(model_args, data_args, processor)
    modalities = {m: processor.modalities[m] for m in used}
    extension = extend_vocabulary(model_args, data_args, processor, manifest, used)
    model = build_model(model_args, task, processor, embedders, train_recs, used, strict=eval_only)
    if extension:
        model.resize_modality_vocabularies(processor.model_modalities())
    train_ds, evals = build_datasets(labelled, processor, manifest.base_dir, used, data_args, training_args)
    eval_ds, test_ds = evals[data_args.eval_split], evals[data_args.test_split]
    dropped = dropped_modality_values(
        labelled,
        evals,
        processor,
        manifest.base_dir,
        used,
        data_args,
        num_workers=training_args.dataloader_num_workers,
        progress=training_args.process_index == 0,
    )
    linear_fit = None
    if getattr(model, "linear_term", None) is not None and model_args.head_linear_fit and training_args.do_train:
        if dp is not None:  # a finetuned folder's own linear term (no --head_linear_modalities given)
            raise FinetuneInputError(
                f"{model_args.model_name_or_path} has a linear term on {model.linear_term.names}; fitting it outside "
                "DP-SGD is not covered by the privacy guarantee: pass --head_linear_fit false"
            )
        if resume:
            logger.info("resuming: the linear term comes from the checkpoint, not refitted")
        else:
            linear_fit = linear_term_start(
                model, task, modalities, train_ds, eval_ds, model_args, data_args, test_ds=test_ds
            )
    model = configure_finetuning(
        model,
        model_args.finetuning_mode,
        unfreeze_last_n_layers=model_args.unfreeze_last_n_layers,
        lora_r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
    )
    trainer = build_trainer(
        model, task, modalities, train_ds, eval_ds, record, model_args, data_args, training_args, dp=dp
    )
    results: dict[str, Any] = {
        "task": task.name,
        "finetuning_mode": model_args.finetuning_mode,
        "pretrained": model_args.model_name_or_path,
        "parameters": count_parameters(model),
    }
    if extension:
        results["vocabulary_extension"] = extension
    if linear_fit is not None:
        results["linear_term"] = linear_fit
    results["manifest"] = str(Path(data_args.manifest).resolve())
    results["modalities"] = used
    if labels_left_out:
        results["label_rows_left_out"] = labels_left_out
    results["dropped_modality_values"] = dropped  # {} when nothing was dropped
    results["split_sizes"] = {
        data_args.train_split: _rows_patients(train_recs),
        data_args.eval_split: _rows_patients(eval_ds.samples),
        data_args.test_split: _rows_patients(test_ds.samples),
    }
    plots: list[str] = []  # figures training writes (learning_curves.png), listed in all_results.json
    if training_args.do_train:
        if resume:
            logger.info("resuming run %s from %s", record["run_id"], resume)
        train_result = trainer.train(resume_from_checkpoint=resume)
        results["train"] = dict(train_result.metrics)
        trainer.log_metrics("train", train_result.metrics)
        kept = best_checkpoint(trainer.state, training_args, data_args.best_model_ties)
        if kept:
            results["train"]["best_checkpoint"] = kept
            log_kept_checkpoint(kept)
        # trainer_state.json: the whole log history (training loss, every evaluation), as HF's example scripts save it
        trainer.save_state()
        if trainer.is_world_process_zero():
            curves = plot_learning_curves(
                trainer.state.log_history,
                Path(training_args.output_dir) / LEARNING_CURVES,
                training_args.metric_for_best_model or task.primary_metric,
                kept=kept,
                split=data_args.eval_split,
            )
            plots = [curves.name] if curves else []
    if dp is not None:
        results["privacy"] = privacy_results(trainer, model_args, data_args, train_recs)
        clear_grad_samples(trainer.model)
    final_model = merge_lora(trainer.model)
    final_model.to(training_args.device)
    if trainer.is_world_process_zero():
        report_run(
            final_model,
            task,
            modalities,
            processor,
            evals,
            manifest,
            results,
            t0,
            model_args,
            data_args,
            training_args,
            train_recs,
            plots=plots,
        )
    return results


def best_checkpoint(state, training_args: TrainingArguments, ties: str = "first") -> dict | None:
    """The checkpoint ``--load_best_model_at_end`` kept (``all_results.json["train"]["best_checkpoint"]``, the card):
    its step and epoch, the metric and its value, how many evaluations there were, how many tied with the kept one
    and the rule that chose among them (``--best_model_ties``). transformers keeps the *first* of tied bests, so with
    a small validation split (few ranked pairs, a C-index of 1.0 at several epochs) many ties under that rule mean
    the earliest checkpoint was kept, not a better one. ``None`` when no best checkpoint was tracked."""
    if not training_args.load_best_model_at_end or not state.best_model_checkpoint:
        return None
    metric = training_args.metric_for_best_model or "loss"
    key = metric if metric.startswith("eval_") else f"eval_{metric}"
    evals = [h for h in state.log_history if key in h]
    step = getattr(state, "best_global_step", None)
    if step is None:  # states saved before transformers tracked it: the folder is checkpoint-<global step>
        step = int(Path(state.best_model_checkpoint).name.rsplit("-", 1)[-1])
    at = next((h for h in evals if h.get("step") == step), {})
    best = float(state.best_metric)
    return {
        "metric": key,
        "value": best,
        "step": step,
        "epoch": at.get("epoch"),
        "evaluations": len(evals),
        "tied_evaluations": sum(1 for h in evals if tied(h[key], best)),
        "ties": ties,
    }


def log_kept_checkpoint(kept: dict) -> None:
    """Which checkpoint was kept; a warning when later evaluations tied with it (the first of tied bests is kept)."""
    text = (
        f"kept the checkpoint of epoch {kept['epoch']} (validation {kept['metric']} {kept['value']:.4f}, best of "
        f"{kept['evaluations']} evaluations)"
    )
    if kept["tied_evaluations"] > 1:
        logger.warning(
            "%s; %d other evaluations tied with it and %s. A validation split this small cannot tell these "
            "checkpoints apart: enlarge it, choose among ties otherwise (--best_model_ties first|last|loss) or keep "
            "the last epoch (--load_best_model_at_end false)",
            text,
            kept["tied_evaluations"] - 1,
            KEPT_AMONG_TIES[kept.get("ties", "first")],
        )
    else:
        logger.info(text)


def normalise_arguments(model_args: ModelArguments, training_args: TrainingArguments) -> None:
    """``--model_name_or_path none`` (overrides an argument file's backbone) means random init; the Trainer keeps
    the ``labels`` column and the best checkpoint by a lower-is-better metric."""
    if str(model_args.model_name_or_path).lower() in ("", "none", "null", "random"):
        model_args.model_name_or_path = None
    metric = training_args.metric_for_best_model
    if metric and metric.removeprefix("eval_") in LOWER_IS_BETTER:
        training_args.greater_is_better = False  # transformers' default (True unless "loss") would keep the worst
    training_args.remove_unused_columns = False
    training_args.label_names = ["labels"]


def load_manifest_and_task(model_args, data_args, training_args, eval_only: bool = False):
    """The manifest (the demo cohort built first if asked), validated cheaply and split by patient, and the task,
    checked against its columns; modalities fitted here are checked against the model's."""
    manifest_path = Path(data_args.manifest)
    with training_args.main_process_first(desc="building the demo cohort"):
        if not manifest_path.exists() and data_args.build_demo_cohort:
            from ..data.recipes.demo import build_demo_cohort

            build_demo_cohort(manifest_path.parent, seed=0)
    if not manifest_path.exists():
        raise FinetuneInputError(
            f"--manifest {data_args.manifest} does not exist (check the path and the working directory {Path.cwd()}"
            "); the demo cohort is built there with --build_demo_cohort true"
        )
    manifest = read_manifest(manifest_path)
    # cheap validation: manifest-level problems stop here with the full list; per-sample ones follow --on_error
    check_manifest_before_work(manifest, on_error=data_args.on_error, what="finetuning")
    manifest = assign_splits(manifest)  # adds hashed patient-level splits, or checks the manifest's own
    if data_args.modalities:
        unknown = sorted(set(data_args.modalities) - set(manifest.modalities))
        if unknown:
            raise FinetuneInputError(
                f"--modalities {unknown} are not modality columns of the manifest {list(manifest.modalities)}"
            )
    with input_errors():  # a mistyped --task or label column
        task = Task.from_dict(task_settings(model_args, data_args))
        task.check_columns(list(manifest.table.columns), manifest.label_columns)
    if eval_only:  # the task the finetuned folder was trained with, not one refitted on this manifest
        task = saved_task(model_args.model_name_or_path, task)
    if processor_folder(data_args.processor_dir, model_args.model_name_or_path) is None:  # to be fitted here
        check_modalities(model_args, data_args, list(manifest.modalities), f"the modality columns of {manifest_path}")
    return manifest, task


def evaluate_only(model_args, training_args) -> bool:
    """No ``--do_train`` on a finetuned folder (:func:`check_something_to_evaluate` refused anything else): the
    folder's model is evaluated as it was trained, its task (label encoding) and head included."""
    return not training_args.do_train and has_trained_head(model_args.model_name_or_path)


def saved_task(folder, asked: Task) -> Task:
    """The fitted task saved in the finetuned ``folder`` (its classes, its regression scaling: refitting them on
    another manifest's training rows would decode the model's outputs wrongly), after checking that the arguments
    ask for the same task on the same label columns."""
    if not Path(folder).expanduser().is_dir():  # a hub model: its task is not saved with it
        return asked
    saved = Task.load(Path(folder).expanduser())
    if (saved.name, list(saved.columns)) != (asked.name, list(asked.columns)):
        raise FinetuneInputError(
            f"evaluating {folder} (no --do_train): it was finetuned for {saved.name} on {list(saved.columns)}, the "
            f"arguments ask for {asked.name} on {list(asked.columns)}; pass its --task and label column(s)"
        )
    logger.info("evaluating %s with the label encoding it was trained with (its finetuning_task.json)", folder)
    return saved


def labelled_splits(
    manifest, task: Task, data_args, seed: int, *, fit: bool = True
) -> tuple[dict[str, tuple[list[dict], list]], dict[str, dict[str, Any]]]:
    """``({split: (records, targets)}, {split: rows left out})`` of the train/eval/test splits. Every split's labels
    are checked first (:func:`rows_with_labels`: rows without a label counted and logged, unusable labels an error
    or, with ``--on_error skip_sample``, a counted skip); then ``task`` is fitted on the training rows and
    ``--label_fraction`` of their patients kept."""
    names = (data_args.train_split, data_args.eval_split, data_args.test_split)
    checked = {s: rows_with_labels(manifest.split(s).records(), task, s, data_args.on_error) for s in names}
    splits = {s: rows for s, (rows, _) in checked.items()}
    left_out = {s: report for s, (_, report) in checked.items() if report}
    train_raw = splits[data_args.train_split]
    # the label set (classes, top-k) is the task's definition: fixed from the whole training split, so that every
    # --label_fraction solves the same task (pass --label_values to fix it yourself); the patients whose labels
    # are used, and the regression scaling, come from the kept fraction only
    if fit:  # (evaluating a finetuned folder: its saved task, fitted where it was trained)
        with input_errors():  # e.g. a single class in the training split
            task.fit(train_raw)
    splits[data_args.train_split] = subsample_patients(train_raw, data_args.label_fraction, seed)
    if fit:
        task.refit_on_subset(splits[data_args.train_split])  # regression: scaling of the rows actually trained on
    labelled = {s: labelled_records(recs, task, s, on_error=data_args.on_error) for s, recs in splits.items()}
    if not labelled[data_args.train_split][0]:
        raise FinetuneInputError(f"no labelled rows in the {data_args.train_split} split for {task.columns}")
    return labelled, left_out


def rows_with_labels(records: list[dict], task: Task, split: str, on_error: str) -> tuple[list[dict], dict[str, Any]]:
    """The rows of ``split`` whose label ``task`` can use (:meth:`~bioperceiver.tasks.Task.check_label`, before the
    task is fitted: an inf or a text label must never reach the fit or the loss), and what was left out. Rows without
    a label are counted and logged (every split alike). A row whose label is unusable (text in a numeric column, inf,
    a negative survival time) is an error naming the sample, the column and the fix, or, with ``--on_error
    skip_sample`` (a label belongs to the whole sample), a counted skip logged with the first sample ids."""
    kept, missing, bad, examples = [], 0, Counter(), {}
    for r in records:
        try:
            has = task.check_label(r)
        except DataError as err:
            if on_error not in ("skip", "skip_sample"):
                fix = f"{err.fix.rstrip('.')}; or pass --on_error skip_sample to leave such rows out (counted)"
                raise DataError(
                    err.reason, err.message, sample_id=err.sample_id, modality=err.modality, fix=fix
                ) from None
            bad[err.reason] += 1
            examples.setdefault(err.reason, [])
            if len(examples[err.reason]) < 3:
                examples[err.reason].append(str(r.get("sample_id")))
            continue
        if has:
            kept.append(r)
        else:
            missing += 1
    if missing:
        logger.info("%s: %d of %d rows have no %s label and are left out", split, missing, len(records), task.columns)
    if bad:
        logger.warning(
            "%s: %d of %d rows with an unusable %s label skipped (--on_error %s): %s",
            split,
            sum(bad.values()),
            len(records),
            task.columns,
            on_error,
            "; ".join(f"{reason} {n} (e.g. {', '.join(examples[reason])})" for reason, n in sorted(bad.items())),
        )
    report = {"no_label": missing} if missing else {}
    if bad:
        report["bad_label"] = {reason: {"rows": n, "examples": examples[reason]} for reason, n in sorted(bad.items())}
    return kept, report


def used_modalities(model_args, data_args, processor: BioPerceiverProcessor) -> list[str]:
    """The processor's modalities restricted to ``--modalities`` (each must have a processor)."""
    if data_args.modalities and set(data_args.modalities) - set(processor.modalities):
        raise FinetuneInputError(
            f"--modalities {sorted(set(data_args.modalities) - set(processor.modalities))} have no processor in "
            f"{data_args.processor_dir or model_args.model_name_or_path} (it has {list(processor.modalities)})"
        )
    return [m for m in processor.modalities if not data_args.modalities or m in data_args.modalities]


def build_datasets(labelled, processor, base_dir, used: list[str], data_args, training_args):
    """``(training ManifestDataset (augmented), {eval/test split: ProcessedDataset})``."""
    train_recs, train_targets = labelled[data_args.train_split]
    on_error = data_args.on_error
    train_ds = ManifestDataset(
        train_recs,
        processor,
        base_dir=base_dir,
        train=True,
        seed=training_args.seed,
        modalities=used,
        on_error=on_error,
        targets=train_targets,
    )
    evals = {
        s: ProcessedDataset(*labelled[s], processor, base_dir=base_dir, modalities=used, on_error=on_error)
        for s in (data_args.eval_split, data_args.test_split)
    }
    logger.info(
        "rows: train %d, %s %d, %s %d",
        len(train_ds),
        data_args.eval_split,
        len(evals[data_args.eval_split]),
        data_args.test_split,
        len(evals[data_args.test_split]),
    )
    return train_ds, evals


def _dropped(err: DataError) -> tuple[str | None, str, str | None]:
    """What the dropped-value summary reads of an error: ``(modality, reason, sample_id)``."""
    return err.modality, err.reason, None if err.sample_id is None else str(err.sample_id)


class _DroppedValues(torch.utils.data.Dataset):
    """Per row of a :class:`ManifestDataset`, the values processing dropped, as ``(modality, reason, sample_id)``
    (plain tuples: all the summary reads, and cheap to send back from dataloader workers)."""

    def __init__(self, rows: ManifestDataset):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[tuple[str | None, str, str | None]]:
        from ..data.dataset import ERROR_COLUMN
        from ..data.processing import SKIPPED_KEY

        out = self.rows[i]
        found = list(out.get(SKIPPED_KEY) or ())
        if (err := out.get(ERROR_COLUMN)) is not None:
            found += list(getattr(err, "skipped", ())) or [err]
        return [_dropped(e) for e in found]


def _as_is(item):
    """The dataloader's ``collate_fn`` for unbatched items: each item as it is."""
    return item


def _all_gather_objects(obj) -> list:
    """``obj`` of every process, in rank order (``torch.distributed.all_gather_object``, a collective)."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def dropped_modality_values(
    labelled,
    evals,
    processor,
    base_dir,
    used: list[str],
    data_args,
    num_workers: int = 0,
    progress: bool = False,
    share: tuple[int, int] | None = None,
    gather=None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per split and modality, the values dropped while processing (``--on_error skip_modality``: the sample goes on
    without them; a sample left with none, or under ``skip_sample``, is dropped whole and its values count too):
    ``{split: {modality: {"values", "dropped", "reasons", "examples"}}}``, only modalities that lost some. Logged
    with the first sample ids. The training rows are processed once more here, unaugmented (training processes
    them on the fly), in ``num_workers`` dataloader workers (``--dataloader_num_workers``; on an image cohort this
    is a full decoding pass), with a progress bar when ``progress``; the evaluation splits' were processed already
    and only their rows dropped whole are processed again. A modality that loses every value of the training split
    is an error (the model would train without it while the run and its card say it is used); of an evaluation
    split, a warning (its metrics are those of the model without it).

    In a multi-process run (``share``: ``(rank, world size)``, by default the initialised process group's) each
    process scans every ``world``-th row from its rank and the per-row findings are gathered (``gather``: obj ->
    every process's obj in rank order, by default ``torch.distributed.all_gather_object``, a collective: every process
    calls this), so the pass costs each process 1/world of it and every process gets the whole summary, in row order
    as one process would find it."""
    from ..data.processing import SKIPPED_KEY

    rank, world = share or distributed_world()
    gather = gather or (_all_gather_objects if world > 1 else (lambda obj: [obj]))

    def scan(records, split: str) -> list[tuple[str | None, str, str | None]]:
        positions = range(rank, len(records), world)
        rows = ManifestDataset(
            [records[i] for i in positions],
            processor,
            base_dir=base_dir,
            train=False,
            modalities=used,
            on_error=data_args.on_error,
        )
        loader = torch.utils.data.DataLoader(
            _DroppedValues(rows),
            batch_size=None,
            num_workers=num_workers if len(rows) else 0,
            collate_fn=_as_is,
            # its own generator: iterating a loader draws a seed, which from the global one would shift every later
            # random draw of the run (initialisation, shuffling) and change its results
            generator=torch.Generator().manual_seed(0),
        )
        bar = tqdm(loader, total=len(rows), desc=f"checking the {split} values", disable=not progress or not rows)
        mine = [(i, found) for i, found in zip(positions, bar, strict=True) if found]
        return [e for _, found in sorted(f for part in gather(mine) for f in part) for e in found]

    out = {}
    for split, (records, _) in labelled.items():
        if split in evals:
            kept = {s["sample_id"] for s in evals[split].samples}
            errors = [_dropped(e) for s in evals[split].samples for e in s.get(SKIPPED_KEY) or ()]
            errors += scan([r for r in records if r.get("sample_id") not in kept], split)
        else:
            errors = scan(records, split)
        per = {}
        for modality, reason, sample_id in errors:
            if modality not in used:
                continue
            entry = per.setdefault(modality, {"values": 0, "dropped": 0, "reasons": Counter(), "examples": []})
            entry["dropped"] += 1
            entry["reasons"][reason] += 1
            if len(entry["examples"]) < 3:
                entry["examples"].append(str(sample_id))
        for name, entry in per.items():
            entry["values"] = sum(not is_missing(r.get(name)) for r in records)
            entry["reasons"] = dict(entry["reasons"])
            lost_all = entry["dropped"] >= entry["values"] > 0
            text = (
                f"{split}: dropped {entry['dropped']} of {entry['values']} {name!r} value(s) "
                f"({', '.join(f'{r} {n}' for r, n in sorted(entry['reasons'].items()))}; e.g. samples "
                f"{', '.join(entry['examples'])}) under --on_error {data_args.on_error}"
            )
            if lost_all and split == data_args.train_split:
                raise FinetuneInputError(
                    f"{text}: every training value of {name!r} was dropped, so the model would train without it. Fix "
                    f"the values (the errors are logged above), or leave the modality out with --modalities "
                    f"{' '.join(m for m in used if m != name)}"
                )
            if lost_all:
                logger.warning(
                    "%s: EVERY value of %r in this split was dropped: its metrics are without it", text, name
                )
            else:
                logger.warning("%s: those samples went on without it", text)
        if per:
            out[split] = per
    return out


def linear_term_start(
    model, task: Task, modalities, train_ds, eval_ds, model_args, data_args, test_ds=None
) -> dict[str, Any]:
    """Fit the wide & deep model's linear term (``--head_linear_modalities``) on the training rows, its ridge
    penalty (or one per modality, ``--head_linear_l2_per_modality``) chosen on the validation split's primary
    metric (:func:`~.finetuning.fit_linear_term`); the rows unaugmented, every training row in one full-batch fit.
    The fitted term alone is also scored on the validation and test splits (``term_alone``): a report of what the
    finetuned model adds to its linear part, never used to choose anything."""
    fixed = ProcessedDataset(
        train_ds.records,
        train_ds.targets,
        train_ds.processor,
        base_dir=train_ds.base_dir,
        modalities=list(modalities),
        on_error=data_args.on_error,
    )
    plain = TaskCollator(modalities, train=False)

    def batches(ds) -> list[dict]:
        return [plain([ds[i] for i in range(s, min(s + 256, len(ds)))]) for s in range(0, len(ds), 256)]

    metric = task.primary_metric
    sign = -1.0 if metric in task.lower_is_better else 1.0

    def score(outputs: torch.Tensor, labels: torch.Tensor) -> float:
        values = task.evaluate(outputs.detach().cpu().numpy(), labels.cpu().numpy(), ci=False)
        return sign * float(values.get(metric, float("nan")))

    held_out = {  # each split processed once: the validation batches serve the choice and the report
        name: batches(ds)
        for name, ds in ((data_args.eval_split, eval_ds), (data_args.test_split, test_ds))
        if ds is not None and len(ds)
    }
    fit = fit_linear_term(
        model,
        batches(fixed),
        held_out.get(data_args.eval_split, []),
        l2=model_args.head_linear_l2,
        per_modality=model_args.head_linear_l2_per_modality,
        score=score,
        also_score=held_out,
    )
    if "term_alone" in fit:  # back in the metric's own units (the choice maximised sign * metric)
        fit["term_alone"] = {split: sign * v for split, v in fit["term_alone"].items()}
    fit["metric"] = metric
    fit["selected_on"] = f"{data_args.eval_split} {metric}" if len(eval_ds) else "no validation rows: the first penalty"
    return fit


def cached_latents(model, modalities, train_ds, eval_ds, processor, base_dir, used, data_args, training_args):
    """Linear probe with a frozen backbone: every sample embedded once (no augmentation, no modality dropout);
    ``(train LatentDataset, eval LatentDataset or None)``."""
    if data_args.modality_dropout > 0:
        logger.warning(
            "linear probe on cached latents: --modality_dropout %.2f and augmentations cannot apply (every "
            "sample is embedded once); pass --cache_embeddings false to use them",
            data_args.modality_dropout,
        )
    plain = TaskCollator(modalities, train=False)
    bs = training_args.per_device_eval_batch_size
    train_fixed = ProcessedDataset(
        train_ds.records, train_ds.targets, processor, base_dir=base_dir, modalities=used, on_error=data_args.on_error
    )

    def latents(ds):
        batches = (
            plain.collator([ds[i] for i in range(s, min(s + bs, len(ds)))], train=False) for s in range(0, len(ds), bs)
        )
        return LatentDataset(compute_latents(model, batches), [s["__target__"] for s in ds.samples])

    trainer_train, trainer_eval = latents(train_fixed), latents(eval_ds) if len(eval_ds) else None
    logger.info(
        "linear probe: cached the frozen backbone's latents of %d + %d samples", len(trainer_train), len(eval_ds)
    )
    return trainer_train, trainer_eval


def privacy_results(trainer: DPTaskTrainer, model_args, data_args, train_recs) -> dict[str, Any]:
    """The DP guarantee of a run (``all_results.json["privacy"]``, the card's privacy section), logged."""
    report = trainer.privacy_report()
    # the guarantee is per training row; a patient with k rows is protected as a group of k (epsilon grows ~k-fold)
    rows_per_patient = Counter(str(r.get("patient_id")) for r in train_recs)
    report["max_training_rows_per_patient"] = max(rows_per_patient.values(), default=0)
    fitted_here = processor_folder(data_args.processor_dir, model_args.model_name_or_path) is None
    report["not covered"] = (
        "the label encoding fitted on the training split (classes, top-k labels, regression scaling, survival time "
        "bins)"
        + (", the processors fitted on the training split (vocabularies, statistics)" if fitted_here else "")
        + (
            ", the vocabulary extension of the pretrained processors on the training split (added genes/features, "
            "their statistics)"
            if not fitted_here and data_args.extend_vocabulary
            else ""
        )
        + "; validation rows (checkpoint choice, calibration) and test rows; the logged training loss"
    )
    logger.info(
        "differential privacy: (epsilon %.4f, delta %g) spent in %d steps (target epsilon %s)",
        report["epsilon"],
        report["delta"],
        report["steps"],
        report["target_epsilon"],
    )
    return report


def build_trainer(
    model, task: Task, modalities, train_ds, eval_ds, record, model_args, data_args, training_args, dp=None
):
    """The :class:`TaskTrainer`: the task's metrics on validation, modality dropout in training, cached latents for
    a linear probe (``--cache_embeddings``), the run record saved with every checkpoint; with ``dp``
    (:class:`~.privacy.DPSettings`) the :class:`~.privacy.DPTaskTrainer` (DP-SGD)."""
    on_error = data_args.on_error
    collator = TaskCollator(
        modalities, modality_dropout=data_args.modality_dropout, on_error=on_error, seed=training_args.seed
    )
    trainer_train, trainer_eval = train_ds, eval_ds
    linear = getattr(model, "linear_term", None) is not None
    if model_args.finetuning_mode == "linear_probe" and model_args.cache_embeddings and linear:
        logger.info("linear probe: latents not cached, the head's linear term reads its modalities' inputs every step")
    if model_args.finetuning_mode == "linear_probe" and model_args.cache_embeddings and not linear:
        trainer_train, trainer_eval = cached_latents(
            model,
            modalities,
            train_ds,
            eval_ds,
            train_ds.processor,
            train_ds.base_dir,
            list(modalities),
            data_args,
            training_args,
        )

    def compute_metrics(eval_pred) -> dict[str, float]:
        preds = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        preds, labels = np.asarray(preds), np.asarray(eval_pred.label_ids)
        # the task's metrics in the label's own units, as in all_results.json
        return task.evaluate(preds.reshape(len(labels), -1), labels, ci=False)

    if training_args.eval_strategy != "no" and not len(eval_ds):
        raise FinetuneInputError(
            f"eval_strategy={training_args.eval_strategy} but the {data_args.eval_split} split is empty"
        )
    kwargs = {"dp": dp} if dp is not None else {}
    return (DPTaskTrainer if dp is not None else TaskTrainer)(
        model=model,
        args=training_args,
        train_dataset=trainer_train,
        eval_dataset=trainer_eval if len(eval_ds) else None,
        data_collator=collator,
        eval_data_collator=TaskCollator(modalities, train=False, on_error=on_error),
        compute_metrics=compute_metrics,
        callbacks=[EpochSetter(trainer_train), RunRecordSaver(record, RUN_RECORD)],
        best_model_ties=data_args.best_model_ties,
        **kwargs,
    )


def report_run(
    final_model,
    task,
    modalities,
    processor,
    evals,
    manifest,
    results,
    t0,
    model_args,
    data_args,
    training_args,
    train_recs,
    plots=(),
) -> None:
    """Main process: evaluation and reports into ``output_dir`` (added to ``results``), then the model,
    processors, task, model card and ``all_results.json``. ``plots``: figures training wrote (file names in
    ``output_dir``), listed before the evaluation's."""
    out = Path(training_args.output_dir)
    settings = ReportSettings(
        test_split=data_args.test_split,
        n_bootstrap=data_args.n_bootstrap,
        seed=training_args.seed,
        batch_size=training_args.per_device_eval_batch_size,
        device=training_args.device,
        min_pattern_samples=data_args.min_pattern_samples,
        ablations=data_args.ablations,
        uncertainty=data_args.uncertainty,
        mc_dropout_samples=data_args.mc_dropout_samples,
        conformal_alpha=data_args.conformal_alpha,
        interpret=data_args.interpret,
        explain_samples=data_args.explain_samples,
    )
    results.update(evaluate_and_report(final_model, task, modalities, processor, evals, manifest, out, settings))
    results["plots"] = [*plots, *results.get("plots", [])]
    results["wall_clock_s"] = round(time.perf_counter() - t0, 1)
    final_model.save_pretrained(out)
    processor.save_pretrained(out)
    carry_trained_rows(model_args.model_name_or_path, final_model, out)
    task.save(out)
    card = finetuning_card(
        config=final_model.config,
        manifest=manifest,
        task=task,
        results=results,
        model_args=asdict(model_args),
        data_args=asdict(data_args),
        training_args=training_args,
        compute=_compute_facts(training_args, results),
        train_manifest=manifest.subset(manifest.table["sample_id"].isin({r["sample_id"] for r in train_recs})),
        license=model_args.license,
        processor_notes=processor.card_notes(modalities),
    )
    card.save(out / "README.md")
    (out / "all_results.json").write_text(dumps(results) + "\n")  # strict JSON (NaN / inf as null)


def finetuning_summary(output_dir: str | os.PathLike, results: dict, test_split: str) -> list[str]:
    """Where everything is, and the headline test metric (of the task saved in ``output_dir``)."""
    return _summary(Path(output_dir), results, Task.load(output_dir), test_split)


def _summary(out: Path, results: dict, task: Task, test_split: str) -> list[str]:
    """Where everything is, and the headline test metric, printed at the end of the run."""
    files = [
        ("model + processors", "config.json, model.safetensors, bioperceiver_processor.json, finetuning_task.json"),
        ("model card", "README.md"),
        ("all metrics", "all_results.json"),
        ("log history (every evaluation)", "trainer_state.json"),
        ("per-sample predictions (ids: keep local)", "local_only/predictions_test.csv"),
        ("per missing-modality pattern", "results_by_pattern.csv"),
        ("modality ablation", "ablation.csv"),
    ]
    test = headline(task, results, test_split)
    lines = ["", "=" * 100, f"Finetuning ({task.name}) finished: test {test}", f"  folder  {out.resolve()}"]
    width = max(len(what) for what, _ in files) + 2
    lines += [f"  {what:<{width}}{name}" for what, name in files if (out / name.split(",")[0]).exists()]
    lines += [f"  {'plot':<{width}}{p}" for p in results.get("plots", [])]
    lines.append("=" * 100)
    return lines


def _rows_patients(rows) -> str:
    return f"{len(rows)} rows / {len({str(r.get('patient_id')) for r in rows})} patients"


def _compute_facts(training_args, results) -> dict[str, Any]:
    device = training_args.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores visible)"
    return {
        "hardware": name,
        "processes": training_args.world_size,
        "wall-clock": f"{results.get('wall_clock_s', float('nan'))} s",
        "train runtime": f"{results.get('train', {}).get('train_runtime', float('nan'))} s",
        "precision": "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32",
        **numerics_facts(),
        **(
            {"modality values dropped (the presence tables count the manifest's cells)": dropped_text(dropped)}
            if (dropped := results.get("dropped_modality_values"))
            else {}
        ),
    }


def dropped_text(dropped: dict[str, dict[str, dict[str, Any]]]) -> str:
    """``all_results.json["dropped_modality_values"]`` in one line for the card: ``train: 2 of 40 text_note (...)``."""

    def reasons(entry: dict) -> str:
        return ", ".join(f"{r} {n}" for r, n in sorted(entry["reasons"].items()))

    return "; ".join(
        f"{split}: {e['dropped']} of {e['values']} {name} ({reasons(e)})"
        for split, per in dropped.items()
        for name, e in per.items()
    )
