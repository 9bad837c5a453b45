#!/usr/bin/env python
"""Finetune a (pretrained or randomly initialised) BioPerceiver with a lightweight head on a labelled manifest.

    python finetune/run_finetune.py finetune/configs/demo_survival.yaml [--key value overrides]
    python finetune/run_finetune.py --model_name_or_path outputs/demo/pretrain/final --manifest cohort.parquet \
        --task classification --label_column label_diagnosis --output_dir runs/dx --do_train --do_eval --do_predict
    accelerate launch --num_processes 4 finetune/run_finetune.py args.yaml      # multi-GPU, Trainer handles DDP

Arguments are ``ModelArguments``, ``DataArguments`` and transformers' ``TrainingArguments`` (parsed with
``HfArgumentParser``; a single ``.yaml``/``.json`` argument is an argument file, and further ``--key value``
arguments override it). Tasks: ``classification`` (binary/multiclass), ``multilabel``, ``regression``,
``survival`` (Cox or discrete-time). Finetuning modes: ``linear_probe`` (frozen backbone, cached embeddings),
``partial``, ``full``, ``lora``. Without ``--model_name_or_path`` the backbone is randomly initialised from
``--preset`` (the no-pretraining baseline).

Outputs in ``output_dir``: the model (``save_pretrained``, LoRA merged) + processors + ``finetuning_task.json`` +
``README.md`` (model card); ``all_results.json`` (train/validation/test metrics, test with bootstrap 95% CIs);
``predictions_test.csv`` (per sample); ``results_by_pattern.csv`` (metrics per missing-modality pattern);
``ablation.csv`` (each modality removed / alone); PNGs (ROC/PR, calibration, Kaplan–Meier, ablation).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import HfArgumentParser, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

import bioperceiver as bp
from bioperceiver.cards import finetuning_card
from bioperceiver.data import (
    BioPerceiverProcessor,
    assign_splits,
    load_processor_settings,
    read_manifest,
)
from bioperceiver.data.manifest import is_missing
from bioperceiver.evaluation import compute_task_metrics, metrics_with_ci
from bioperceiver.evaluation.plots import (
    plot_ablation,
    plot_calibration,
    plot_km_by_risk,
    plot_regression,
    plot_roc_pr,
)
from bioperceiver.losses.survival import make_time_bins
from bioperceiver.training import compute_latents, configure_finetuning, count_parameters, merge_lora
from bioperceiver.training.tasks import (
    LabelSpec,
    LatentDataset,
    ProcessedDataset,
    TaskCollator,
    TaskDataset,
    TaskTrainer,
    labelled_records,
    pattern_table,
    predict,
    presence_pattern,
    write_predictions,
)

logger = logging.getLogger("run_finetune")
ROOT = Path(__file__).resolve().parents[1]
PRIMARY = {"classification": "auroc", "multilabel": "auroc", "regression": "rmse", "survival": "c_index"}


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
    survival_loss: str = field(default="cox", metadata={"help": "cox | discrete"})
    survival_ties: str = field(default="efron", metadata={"help": "efron | breslow"})
    num_time_bins: int = field(default=10, metadata={"help": "discrete survival: bins (quantiles of event times)"})
    license: str = field(default="other", metadata={"help": "licence in the model card metadata"})


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
    train_split: str = "train"
    eval_split: str = "validation"
    test_split: str = "test"
    label_fraction: float = field(
        default=1.0, metadata={"help": "share of training patients whose labels are used (label efficiency)"}
    )
    modality_dropout: float = 0.0
    on_error: str = field(default="raise", metadata={"help": "raise | skip (counted and logged)"})
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


class EpochSetter(TrainerCallback):
    """Fresh, reproducible augmentations each epoch (the dataset's RNG is seeded by (seed, epoch, index))."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(int(state.epoch or 0))


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        import yaml

        values = yaml.safe_load(Path(argv[0]).read_text())  # YAML is a superset of JSON
        extra = parser.parse_args_into_dataclasses(
            args=[*_to_cli(values), *argv[1:]], look_for_args_file=False
        )  # later flags win
        return tuple(extra)  # type: ignore[return-value]
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)  # type: ignore[return-value]


def _to_cli(values: dict[str, Any]) -> list[str]:
    out = []
    for k, v in values.items():
        if v is None:  # `key: null` in an argument file = not given (the field's default), never the text "None"
            continue
        if isinstance(v, list):
            out += [f"--{k}", *map(str, v)]
        elif isinstance(v, dict):
            out += [f"--{k}", json.dumps(v)]
        else:
            out += [f"--{k}", str(v)]
    return out


def subsample_patients(records: list[dict], fraction: float, seed: int) -> list[dict]:
    """Keep a seeded ``fraction`` of training *patients* (all their rows): the label-efficiency setting."""
    if fraction >= 1.0:
        return records
    if fraction <= 0:
        raise ValueError(f"label_fraction must be in (0, 1], got {fraction}")
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
    for candidate in (data_args.processor_dir, model_args.model_name_or_path):
        if candidate and (Path(candidate) / "bioperceiver_processor.json").exists():
            logger.info("processors from %s", candidate)
            return BioPerceiverProcessor.from_pretrained(candidate), embedders
    logger.info("fitting processors on the %s split", data_args.train_split)
    wanted = set(data_args.modalities or manifest.modalities)
    settings = {k: v for k, v in settings.items() if k in manifest.modalities and k in wanted}  # others: unused here
    proc = BioPerceiverProcessor.from_manifest(manifest, settings)
    if data_args.modalities:
        proc = BioPerceiverProcessor({m: p for m, p in proc.processors.items() if m in data_args.modalities})
    return proc.fit(manifest, split=data_args.train_split), embedders


def _path(p: str | None) -> Path | None:
    if p is None:
        return None
    return Path(p) if Path(p).exists() else ROOT / p


def build_model(model_args, spec: LabelSpec, processor, embedders, train_records, used: list[str]):
    cls = bp.BioPerceiverForSurvival if spec.task == "survival" else bp.BioPerceiverForSequenceClassification
    head = {
        "head_type": model_args.head_type,
        "head_hidden_size": model_args.head_hidden_size,
        "head_dropout": model_args.head_dropout,
    }
    if spec.task == "survival":
        head.update(survival_loss=model_args.survival_loss, survival_ties=model_args.survival_ties)
        if model_args.survival_loss == "discrete":
            times = [float(r[spec.time_column]) for r in train_records]
            events = [int(r[spec.event_column]) for r in train_records]
            head["survival_time_bins"] = [float(b) for b in make_time_bins(times, events, model_args.num_time_bins)]
    else:
        head.update(num_labels=spec.num_labels, problem_type=spec.problem_type)
        if spec.task != "regression":
            head.update(id2label=dict(enumerate(map(str, spec.classes))))
    if model_args.model_name_or_path:
        config = transformers.AutoConfig.from_pretrained(model_args.model_name_or_path, **head)
        missing = sorted(set(used) - set(config.modality_names))
        if missing:
            raise ValueError(
                f"modalities {missing} are used but {model_args.model_name_or_path} was not built with them; "
                f"restrict --modalities to {config.modality_names} or pretrain with them"
            )
        model = cls.from_pretrained(model_args.model_name_or_path, config=config)
    else:
        config = bp.create_config(model_args.preset, modalities=processor.model_modalities(embedders), **head)
        model = cls(config)
    return model


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, training_args = parse_args(argv)
    if str(model_args.model_name_or_path).lower() in ("", "none", "null", "random"):
        model_args.model_name_or_path = None  # `--model_name_or_path none` overrides an argument file's backbone
    logging.basicConfig(
        level=logging.INFO if training_args.should_log else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    transformers.utils.logging.set_verbosity_warning()
    lower = ("loss", "mse", "rmse", "mae", "brier", "log_loss")
    if training_args.metric_for_best_model and training_args.metric_for_best_model.removeprefix("eval_") in lower:
        training_args.greater_is_better = False  # transformers' default (True unless "loss") would keep the worst
    training_args.remove_unused_columns = False
    training_args.label_names = ["labels"]
    out = Path(training_args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(training_args.seed)
    t0 = time.perf_counter()

    # ---- data -------------------------------------------------------------------------------------------------
    manifest_path = Path(data_args.manifest)
    with training_args.main_process_first(desc="building the demo cohort"):
        if not manifest_path.exists() and data_args.build_demo_cohort:
            from bioperceiver.data.recipes.demo import build_demo_cohort

            build_demo_cohort(manifest_path.parent, seed=0)
    manifest = read_manifest(manifest_path)
    manifest = assign_splits(manifest)  # adds hashed patient-level splits, or checks the manifest's own
    if data_args.modalities:
        unknown = sorted(set(data_args.modalities) - set(manifest.modalities))
        if unknown:
            raise ValueError(
                f"--modalities {unknown} are not modality columns of the manifest {list(manifest.modalities)}"
            )
    spec = LabelSpec(
        task=data_args.task,
        label_column=data_args.label_column,
        time_column=data_args.time_column if data_args.task == "survival" else None,
        event_column=data_args.event_column if data_args.task == "survival" else None,
        classes=list(data_args.label_values or []),
        positive_label=data_args.positive_label,
        top_k=data_args.top_k_labels,
    )
    for c in spec.columns:
        if c not in manifest.table:
            raise ValueError(f"label column {c!r} is not in the manifest; label columns: {manifest.label_columns}")
    splits = {
        s: manifest.split(s).records() for s in (data_args.train_split, data_args.eval_split, data_args.test_split)
    }
    train_raw = [r for r in splits[data_args.train_split] if not any(is_missing(r.get(c)) for c in spec.columns)]
    # the label set (classes, top-k) is the task's definition: fixed from the whole training split, so that every
    # --label_fraction solves the same task (pass --label_values to fix it yourself); the patients whose labels
    # are used, and the regression scaling, come from the kept fraction only
    spec.fit(train_raw)
    splits[data_args.train_split] = subsample_patients(train_raw, data_args.label_fraction, training_args.seed)
    if spec.task == "regression":
        spec.fit(splits[data_args.train_split])
    labelled = {s: labelled_records(recs, spec, s, on_error=data_args.on_error) for s, recs in splits.items()}
    train_recs, train_targets = labelled[data_args.train_split]
    if not train_recs:
        raise ValueError(f"no labelled rows in the {data_args.train_split} split for {spec.columns}")

    processor, embedders = load_processor(model_args, data_args, manifest)
    if data_args.modalities and set(data_args.modalities) - set(processor.modalities):
        raise ValueError(
            f"--modalities {sorted(set(data_args.modalities) - set(processor.modalities))} have no processor in "
            f"{data_args.processor_dir or model_args.model_name_or_path} (it has {list(processor.modalities)})"
        )
    used = [m for m in processor.modalities if not data_args.modalities or m in data_args.modalities]
    modalities = {m: processor.modalities[m] for m in used}
    model = build_model(model_args, spec, processor, embedders, train_recs, used)
    model = configure_finetuning(
        model,
        model_args.finetuning_mode,
        unfreeze_last_n_layers=model_args.unfreeze_last_n_layers,
        lora_r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
    )
    base_dir = manifest.base_dir
    train_ds = TaskDataset(
        train_recs,
        train_targets,
        processor,
        base_dir=base_dir,
        train=True,
        seed=training_args.seed,
        modalities=used,
        on_error=data_args.on_error,
    )
    evals = {
        s: ProcessedDataset(*labelled[s], processor, base_dir=base_dir, modalities=used, on_error=data_args.on_error)
        for s in (data_args.eval_split, data_args.test_split)
    }
    eval_ds = evals[data_args.eval_split]
    test_ds = evals[data_args.test_split]
    logger.info(
        "rows: train %d, %s %d, %s %d",
        len(train_ds),
        data_args.eval_split,
        len(eval_ds),
        data_args.test_split,
        len(test_ds),
    )

    collator = TaskCollator(
        modalities, modality_dropout=data_args.modality_dropout, on_error=data_args.on_error, seed=training_args.seed
    )
    trainer_train, trainer_eval = train_ds, eval_ds
    if model_args.finetuning_mode == "linear_probe" and model_args.cache_embeddings:
        if data_args.modality_dropout > 0:
            logger.warning(
                "linear probe on cached latents: --modality_dropout %.2f and augmentations cannot apply (every "
                "sample is embedded once); pass --cache_embeddings false to use them",
                data_args.modality_dropout,
            )
        # frozen backbone: embed every sample once (no augmentation, no modality dropout), train the head on that
        plain = TaskCollator(modalities, train=False)
        bs = training_args.per_device_eval_batch_size
        train_fixed = ProcessedDataset(
            train_recs, train_targets, processor, base_dir=base_dir, modalities=used, on_error=data_args.on_error
        )

        def latents(ds):
            batches = (
                plain.collator([ds[i] for i in range(s, min(s + bs, len(ds)))], train=False)
                for s in range(0, len(ds), bs)
            )
            return LatentDataset(compute_latents(model, batches), [s["__target__"] for s in ds.samples])

        trainer_train, trainer_eval = latents(train_fixed), latents(eval_ds) if len(eval_ds) else None
        logger.info(
            "linear probe: cached the frozen backbone's latents of %d + %d samples", len(trainer_train), len(eval_ds)
        )

    def compute_metrics(eval_pred) -> dict[str, float]:
        preds = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        preds, labels = np.asarray(preds), np.asarray(eval_pred.label_ids)
        if spec.task == "regression":  # logged in the label's own units, as in all_results.json
            preds, labels = spec.decode_regression(preds.reshape(len(labels), -1)[:, 0]), spec.decode_regression(labels)
        return compute_task_metrics(spec.task, preds, labels, num_labels=spec.num_labels)

    if training_args.eval_strategy != "no" and not len(eval_ds):
        raise ValueError(f"eval_strategy={training_args.eval_strategy} but the {data_args.eval_split} split is empty")
    trainer = TaskTrainer(
        model=model,
        args=training_args,
        train_dataset=trainer_train,
        eval_dataset=trainer_eval if len(eval_ds) else None,
        data_collator=collator,
        eval_data_collator=TaskCollator(modalities, train=False, on_error=data_args.on_error),
        compute_metrics=compute_metrics,
        callbacks=[EpochSetter(trainer_train)],
    )

    results: dict[str, Any] = {
        "task": spec.task,
        "finetuning_mode": model_args.finetuning_mode,
        "pretrained": model_args.model_name_or_path,
        "parameters": count_parameters(model),
    }
    results["manifest"] = str(manifest_path.resolve())
    results["modalities"] = used
    results["split_sizes"] = {
        data_args.train_split: _rows_patients(train_recs),
        data_args.eval_split: _rows_patients(eval_ds.samples),
        data_args.test_split: _rows_patients(test_ds.samples),
    }
    if training_args.do_train:
        last = None
        if training_args.resume_from_checkpoint:
            last = training_args.resume_from_checkpoint
        elif out.is_dir():
            last = get_last_checkpoint(str(out))
            if last:
                logger.info("resuming from the last checkpoint %s", last)
        train_result = trainer.train(resume_from_checkpoint=last)
        results["train"] = train_result.metrics
        trainer.log_metrics("train", train_result.metrics)

    final_model = merge_lora(trainer.model)
    device = training_args.device
    final_model.to(device)
    if trainer.is_world_process_zero():
        results.update(
            evaluate_and_report(
                final_model, spec, modalities, processor, data_args, training_args, evals, manifest, out
            )
        )
        results["wall_clock_s"] = round(time.perf_counter() - t0, 1)
        final_model.save_pretrained(out)
        processor.save_pretrained(out)
        spec.save(out)
        card = finetuning_card(
            config=final_model.config,
            manifest=manifest,
            spec=spec,
            results=results,
            model_args=asdict(model_args),
            data_args=asdict(data_args),
            training_args=training_args,
            compute=_compute_facts(training_args, results),
            train_manifest=manifest.subset(manifest.table["sample_id"].isin({r["sample_id"] for r in train_recs})),
            license=model_args.license,
        )
        card.save(out / "README.md")
        (out / "all_results.json").write_text(json.dumps(results, indent=1, default=_json_default) + "\n")
        print("\n".join(_summary(out, results, spec, data_args)), flush=True)
    return results


def _summary(out: Path, results: dict, spec: LabelSpec, data_args) -> list[str]:
    """Where everything is, and the headline test metric, printed at the end of the run."""
    test = results.get(data_args.test_split, {})
    metric = PRIMARY[spec.task]
    headline = "no labelled test rows"
    if metric in test:
        headline = f"{metric} {test[metric]:.4f}"
        if f"{metric}_ci_low" in test:
            headline += f" (95% CI {test[f'{metric}_ci_low']:.4f}-{test[f'{metric}_ci_high']:.4f}, n={test.get('n')})"
    files = [
        ("model + processors", "config.json, model.safetensors, bioperceiver_processor.json, finetuning_task.json"),
        ("model card", "README.md"),
        ("all metrics", "all_results.json"),
        ("per-sample predictions", "predictions_test.csv"),
        ("per missing-modality pattern", "results_by_pattern.csv"),
        ("modality ablation", "ablation.csv"),
    ]
    lines = ["", "=" * 100, f"Finetuning ({spec.task}) finished: test {headline}", f"  folder  {out.resolve()}"]
    lines += [f"  {what:<30}{name}" for what, name in files if (out / name.split(",")[0]).exists()]
    lines += [f"  {'plot':<30}{p}" for p in results.get("plots", [])]
    lines.append("=" * 100)
    return lines


def _rows_patients(rows) -> str:
    return f"{len(rows)} rows / {len({str(r.get('patient_id')) for r in rows})} patients"


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _compute_facts(training_args, results) -> dict[str, Any]:
    device = training_args.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores visible)"
    return {
        "hardware": name,
        "processes": training_args.world_size,
        "wall-clock": f"{results.get('wall_clock_s', float('nan'))} s",
        "train runtime": f"{results.get('train', {}).get('train_runtime', float('nan'))} s",
        "precision": "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32",
        "torch / transformers": f"{torch.__version__} / {transformers.__version__}",
    }


def evaluate_and_report(
    model, spec, modalities, processor, data_args, training_args, evals, manifest, out: Path
) -> dict:
    """Validation and test metrics (test with patient-bootstrap CIs), predictions file, per-pattern results,
    modality ablations and plots."""
    res: dict[str, Any] = {}
    records_by_id = {r["sample_id"]: r for r in manifest.records()}
    device = training_args.device
    bs = training_args.per_device_eval_batch_size
    names = list(modalities)

    def targets(ds) -> np.ndarray:
        return torch.stack([s["__target__"] for s in ds.samples]).numpy() if len(ds) else np.empty(0)

    def score(pred: np.ndarray, y: np.ndarray, groups=None, ci: bool = True) -> dict[str, float]:
        p = pred[:, 0] if spec.task in ("survival", "regression") else pred
        if spec.task == "survival":
            labels = y
        elif spec.task == "regression":
            p, labels = spec.decode_regression(p), spec.decode_regression(y)
        else:
            labels = y
        if not ci:
            return compute_task_metrics(spec.task, p, labels, num_labels=spec.num_labels)
        return metrics_with_ci(
            spec.task,
            p,
            labels,
            num_labels=spec.num_labels,
            n_resamples=data_args.n_bootstrap,
            groups=groups,
            seed=training_args.seed,
        )

    val_pred = val_y = None
    for split, ds in evals.items():
        if not len(ds):
            logger.warning("the %s split has no labelled rows: no metrics", split)
            continue
        pred, _ = predict(model, ds, modalities, batch_size=bs, device=device)
        y = targets(ds)
        is_test = split == data_args.test_split
        groups = np.array([str(s.get("patient_id")) for s in ds.samples])
        res[split] = score(pred, y, groups=groups, ci=is_test)
        logger.info("%s: %s", split, {k: round(v, 4) for k, v in res[split].items() if isinstance(v, float)})
        if not is_test:
            val_pred, val_y = pred, y
            continue
        extra = None
        if data_args.uncertainty:
            rep = _uncertainty(model, spec, ds, modalities, data_args, training_args, val_pred, val_y, pred, y, out)
            if rep is not None:
                res["uncertainty"] = rep.metrics
                res["uncertainty_card"] = rep.card_rows()
                extra = {c: rep.table[c].to_numpy() for c in rep.table.columns}
                if rep.plot:
                    res.setdefault("plots", []).append(Path(rep.plot).name)
        if data_args.interpret:
            shap_cols = _interpret(model, spec, ds, modalities, processor, data_args, training_args, val_pred, res, out)
            extra = {**(extra or {}), **shap_cols}
        write_predictions(out / "predictions_test.csv", ds, records_by_id, spec, pred, modalities, extra=extra)
        patterns = [presence_pattern(s, modalities) for s in ds.samples]
        by_pattern = pattern_table(
            patterns, lambda idx, pred=pred, y=y: score(pred[idx], y[idx], ci=False), data_args.min_pattern_samples
        )
        _write_csv(out / "results_by_pattern.csv", by_pattern)
        res["by_pattern"] = by_pattern
        res["plots"] = res.get("plots", []) + _plots(spec, pred, y, out)
        if data_args.ablations and len(names) > 1:
            rows = [{"condition": "all modalities", **score(pred, y, groups=groups)}]
            for m in names:
                for label, kw in ((f"without {m}", {"drop": [m]}), (f"{m} alone", {"keep_only": [m]})):
                    p2, keep = predict(model, ds, modalities, batch_size=bs, device=device, **kw)
                    if keep.sum() < data_args.min_pattern_samples:
                        rows.append({"condition": label, "n": int(keep.sum())})
                        continue
                    rows.append({"condition": label, **score(p2[keep], y[keep], groups=groups[keep])})
            _write_csv(out / "ablation.csv", rows)
            res["ablation"] = rows
            plot = plot_ablation(rows, PRIMARY[spec.task], out / "ablation.png")
            if plot:
                res["plots"].append(plot.name)
    return res


def _uncertainty(model, spec, ds, modalities, data_args, training_args, val_pred, val_y, pred, y, out: Path):
    """Calibration (temperature fitted on validation), conformal sets/intervals calibrated on validation, and
    MC-dropout spread on the test split. Validation also chose the checkpoint, so coverage is approximate."""
    from bioperceiver.uncertainty import mc_dropout_predict, uncertainty_report

    if val_pred is None:
        logger.warning("no labelled validation rows: no calibration or conformal sets (they are fitted there)")
        return None
    mc = None
    if data_args.mc_dropout_samples > 0:
        bs, device = training_args.per_device_eval_batch_size, training_args.device
        mc = mc_dropout_predict(
            model,
            lambda m: predict(m, ds, modalities, batch_size=bs, device=device),
            n_samples=data_args.mc_dropout_samples,
            seed=training_args.seed,
            task=spec.task,
        )
    rep = uncertainty_report(
        spec.task,
        val_pred,
        val_y,
        pred,
        y,
        alpha=data_args.conformal_alpha,
        mc=mc,
        class_names=[str(c) for c in spec.classes] or None,
        decode=spec.decode_regression if spec.task == "regression" else None,
        plot_path=out / "reliability_diagram.png" if spec.task in ("classification", "multilabel") else None,
        seed=training_args.seed,
    )
    logger.info("uncertainty: %s", {k: v for k, v in rep.metrics.items() if isinstance(v, float)})
    return rep


def _explained_score(spec: LabelSpec):
    """What the explanations explain, as a function of the head output: the risk (survival), the log-odds of the
    positive class (binary), the prediction (regression), or the predicted class's logit (multiclass/multilabel)."""
    if spec.task == "survival":
        return "risk", lambda pred: pred[:, 0], "predicted risk (log hazard ratio)"
    if spec.task == "regression":
        return 0, lambda pred: pred[:, 0], f"predicted {spec.label_column} (standardised)"
    if spec.num_labels == 2 and spec.task == "classification":
        log_odds = lambda out: out.logits[:, 1] - out.logits[:, 0]  # noqa: E731  (of the model's output)
        return log_odds, lambda pred: pred[:, 1] - pred[:, 0], f"log-odds of {spec.classes[1]}"
    return None, None, "logit of the predicted class"


def _interpret(model, spec, ds, modalities, processor, data_args, training_args, val_pred, res, out: Path) -> dict:
    """Exact modality Shapley values for every test sample (columns ``shapley_<modality>`` of the predictions
    file), integrated-gradients figures for a few patients and a top-k vs. random token deletion test."""
    import pandas as pd

    from bioperceiver.interpret import (
        ModalityShapley,
        deletion_test,
        explain_sample,
        integrated_gradients,
        modality_shapley,
    )
    from bioperceiver.interpret.figures import plot_modality_shapley

    bs = training_args.per_device_eval_batch_size  # interpret moves the batches to the model's device
    collator = TaskCollator(modalities, train=False).collator
    target, score_fn, meaning = _explained_score(spec)
    # f(no modality): the mean explained score on validation (the "average patient"), 0 when it is per class
    empty = float(np.mean(score_fn(val_pred))) if score_fn is not None and val_pred is not None else 0.0
    frames, shapleys = [], []
    for start in range(0, len(ds), bs):
        batch = collator([ds[i] for i in range(start, min(start + bs, len(ds)))], train=False)
        sh = modality_shapley(model, batch, target=target, empty_value=empty)
        shapleys.append(sh)
        frames.append(sh.to_frame())
    sh = ModalityShapley.concat(shapleys)
    table = sh.summary()
    used = [n for n in sh.names if n in modalities]
    table = table[table["modality"].isin(used)].reset_index(drop=True)
    _write_csv(out / "modality_shapley.csv", pd.concat(frames).to_dict("records"))
    plots = [plot_modality_shapley(sh, out / "modality_shapley.png").name]
    baseline = "the mean over the validation split" if score_fn is not None and val_pred is not None else "a zero logit"
    res["interpretation"] = {
        "explained": meaning,
        "empty_value": empty,
        "empty_value_is": baseline,
        "shapley": table.to_dict("records"),
    }

    # a few patients: the highest, median and lowest explained score
    full = sh.full.numpy()
    order = np.argsort(-full)
    picks = list(dict.fromkeys([order[0], order[len(order) // 2], order[-1]]))[: data_args.explain_samples]
    if picks:
        batch = collator([ds[int(i)] for i in picks], train=False)
        attr = integrated_gradients(model, batch, target=target, processors=processor)
        picked = sh.select([int(i) for i in picks])
        for j in range(len(picks)):
            written = explain_sample(attr, j, out / "explanations", shapley=picked)
            plots += [f"explanations/{p.name}" for p in written.values()]
        faith = deletion_test(model, batch, attr, k=(1, 5, 10), n_random=10, seed=training_args.seed, target=target)
        res["interpretation"]["deletion_test"] = faith.to_dict("records")
        res["interpretation"]["ig_convergence_delta"] = float(np.abs(attr.delta.numpy()).max())
    res.setdefault("plots", []).extend(plots)
    values = sh.values.numpy()
    return {f"shapley_{n}": values[:, k] for k, n in enumerate(sh.names) if n in modalities}


def _plots(spec: LabelSpec, pred: np.ndarray, y: np.ndarray, out: Path) -> list[str]:
    from scipy.special import expit, softmax

    made = []
    if spec.task == "survival":
        km = plot_km_by_risk(y[:, 0], y[:, 1], pred[:, 0], out / "km_by_risk_group.png")
        if km:
            made.append(km[0].name)
    elif spec.task == "regression":
        made.append(
            plot_regression(
                spec.decode_regression(y),
                spec.decode_regression(pred[:, 0]),
                out / "predicted_vs_true.png",
                spec.label_column,
            ).name
        )
    else:
        prob = expit(pred) if spec.task == "multilabel" else softmax(pred, axis=1)
        for fn, name in ((plot_roc_pr, "roc_pr.png"), (plot_calibration, "calibration.png")):
            path = fn(y, prob, spec.classes, out / name)
            if path:
                made.append(path.name)
    return made


def _write_csv(path: Path, rows: list[dict]) -> None:
    import pandas as pd

    pd.DataFrame(rows).to_csv(path, index=False)


if __name__ == "__main__":
    main()
