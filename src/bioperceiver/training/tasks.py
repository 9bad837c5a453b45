"""Supervised tasks on a manifest: labelled rows, datasets and collation for the HF ``Trainer``, prediction, and
the grouping a finetuning run reports by (missing-modality patterns). Label encoding is the task object's
(:mod:`bioperceiver.tasks`); the report is :mod:`bioperceiver.evaluation.report`."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy

from ..data.collator import BioPerceiverCollator, num_tokens
from ..data.dataset import ERROR_COLUMN, ManifestDataset
from ..data.errors import DataError
from ..data.processing import SKIPPED_KEY
from ..tasks import Task, get_task

logger = logging.getLogger(__name__)


def labelled_records(
    records: Sequence[dict], task: Task, split: str, on_error: str = "raise"
) -> tuple[list[dict], list[torch.Tensor]]:
    """Rows of a split that have this task's label, with their targets; unlabelled rows are counted and logged.
    A bad label (e.g. a class unseen in training) raises, or with any skipping ``on_error`` (``"skip"``,
    ``"skip_sample"``, ``"skip_modality"``: a label belongs to the whole sample) is counted and logged."""
    kept, targets, missing, bad = [], [], 0, Counter()
    for r in records:
        try:
            t = task.encode(r)
        except DataError as err:
            if on_error == "raise":
                raise
            bad[err.reason] += 1
            logger.warning("%s: skipped: %s", split, err)
            continue
        if t is None:
            missing += 1
            continue
        kept.append(r)
        targets.append(t)
    if missing:
        logger.info("%s: %d of %d rows have no %s label and are left out", split, missing, len(records), task.columns)
    if bad:
        logger.warning("%s: %d rows with a bad label skipped: %s", split, sum(bad.values()), dict(bad))
    return kept, targets


class ProcessedDataset(torch.utils.data.Dataset):
    """Evaluation rows processed once (deterministic): :class:`~bioperceiver.data.ManifestDataset` with
    ``train=False``, materialised. Under a skipping ``on_error`` rows that fail are left out and modalities that fail
    are dropped from their row (``skip_modality``), both counted per ``(modality, reason)`` in ``report``."""

    def __init__(self, records, targets, processor, *, base_dir=None, modalities=None, on_error="raise"):
        rows = ManifestDataset(
            records,
            processor,
            base_dir=base_dir,
            train=False,
            on_error=on_error,
            modalities=modalities,
            targets=targets,
        )
        self.samples, self.report = [], Counter()
        for i in range(len(rows)):
            out = rows[i]
            err = out.get(ERROR_COLUMN)
            if err is not None:
                self.report[(err.modality, err.reason)] += 1
                continue
            for dropped in out.get(SKIPPED_KEY) or ():
                self.report[(dropped.modality, dropped.reason)] += 1
            self.samples.append(out)
        if self.report:
            logger.warning("evaluation rows skipped or modalities dropped: %s", dict(self.report))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]

    @property
    def sample_ids(self) -> list[str]:
        return [s["sample_id"] for s in self.samples]

    def targets(self) -> np.ndarray:
        """The encoded targets, stacked."""
        return torch.stack([s["__target__"] for s in self.samples]).numpy() if self.samples else np.empty(0)


class LatentDataset(torch.utils.data.Dataset):
    """Cached backbone latents + targets (linear probing)."""

    def __init__(self, latents: torch.Tensor, targets: Sequence[torch.Tensor]):
        self.latents, self.targets = latents, list(targets)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict:
        return {"latents": self.latents[i], "__target__": self.targets[i]}


class TaskCollator:
    """``BioPerceiverCollator`` for a task: returns only what the model's ``forward`` takes (``inputs``/``latents``
    and ``labels``), so it plugs into ``Trainer``; skipped rows (``on_error="skip"``) drop their targets too."""

    def __init__(self, modalities: dict[str, str], *, modality_dropout=0.0, on_error="raise", seed=0, train=True):
        self.collator = BioPerceiverCollator(
            modalities, modality_dropout=modality_dropout, on_error=on_error, seed=seed
        )
        self.train = train

    def __call__(self, features: Sequence[dict]) -> dict[str, Any]:
        if features and "latents" in features[0]:
            return {
                "latents": torch.stack([f["latents"] for f in features]),
                "labels": torch.stack([f["__target__"] for f in features]),
            }
        targets = {f["sample_id"]: f.get("__target__") for f in features}
        batch = self.collator(features, train=self.train)
        if batch is None:
            raise DataError(
                "empty_batch",
                f"every sample of a batch was skipped ({[f.get('sample_id') for f in features]})",
                fix="see the skip report above; fix those rows or use a larger batch",
            )
        return {"inputs": batch["inputs"], "labels": torch.stack([targets[s] for s in batch["sample_id"]])}


# ---- prediction and analyses ----------------------------------------------------------------------------------------
@torch.no_grad()
def predict(
    model,
    dataset: ProcessedDataset,
    modalities: dict[str, str],
    *,
    batch_size: int = 64,
    drop: Sequence[str] = (),
    keep_only: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """``(predictions, keep)`` over ``dataset`` with modalities removed (``drop``) or kept (``keep_only``).
    Predictions: logits (classification), standardised values (regression) or risks (survival). Samples left
    with no modality get no prediction (``keep`` False)."""
    model.eval()
    width = get_task(model.output_task).output_width(model.config)
    collate = BioPerceiverCollator(modalities)
    preds, keep = [], []
    for start in range(0, len(dataset), batch_size):
        feats = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        masked = []
        for f in feats:
            g = dict(f)
            for name in modalities:
                if name in drop or (keep_only is not None and name not in keep_only):
                    g[name] = None
            masked.append(g)
        has_any = np.array([any(has_tokens(g, n, k) for n, k in modalities.items()) for g in masked])
        keep.append(has_any)
        rows = [g for g, ok in zip(masked, has_any) if ok]
        out = np.full((len(feats), width), np.nan, dtype=np.float64)
        if rows:
            batch = collate(rows, train=False)
            inputs = {n: {k: v.to(device) for k, v in a.items()} for n, a in batch["inputs"].items()}
            result = model(inputs=inputs)
            value = result.risk[:, None] if hasattr(result, "risk") and result.risk is not None else result.logits
            out[has_any] = value.float().cpu().numpy()
        preds.append(out)
    return np.concatenate(preds), np.concatenate(keep)


def has_tokens(sample: dict, name: str, kind: str | None = None) -> bool:
    """Whether the processed ``sample`` has modality ``name`` with at least one token: the collator's notion of
    present (a tabular cell whose fields are all null, for example, is processed but has no token)."""
    value = sample.get(name)
    if value is None:
        return False
    if kind is None:
        return True
    try:
        return num_tokens(kind, {k: np.asarray(v) for k, v in value.items()}) > 0
    except (KeyError, AttributeError):  # malformed: let the collator raise its clear error
        return True


def presence_pattern(sample: dict, modalities: Mapping[str, str] | Sequence[str]) -> str:
    """``"a + b"``: the modalities (``{name: kind}``, or names) ``sample`` has tokens for; ``"(none)"``."""
    kinds = dict(modalities) if isinstance(modalities, Mapping) else dict.fromkeys(modalities)
    return " + ".join(n for n, k in kinds.items() if has_tokens(sample, n, k)) or "(none)"


def pattern_table(
    patterns: Sequence[str],
    metric: Callable[[np.ndarray], dict[str, float]],
    min_samples: int = 10,
) -> list[dict[str, Any]]:
    """The task metrics for every missing-modality pattern with at least ``min_samples`` test samples (``metric``
    takes the row indices of a group)."""
    rows = []
    for pattern, n in Counter(patterns).most_common():
        idx = np.array([i for i, p in enumerate(patterns) if p == pattern])
        row: dict[str, Any] = {"modalities present": pattern, "n": n}
        if n >= min_samples:
            row.update(metric(idx))
        rows.append(row)
    return rows


def write_predictions(
    path: Path,
    dataset: ProcessedDataset,
    records_by_id: dict,
    task: Task,
    preds: np.ndarray,
    modalities: Sequence[str],
    extra: dict[str, np.ndarray] | None = None,
):
    """One row per sample: ids, presence pattern, label(s), the task's prediction columns (probabilities /
    original-scale values / risk) and ``extra`` columns — a CSV anyone can re-score."""
    import pandas as pd

    columns = task.prediction_columns(np.asarray(preds)) if len(dataset) else {}
    rows = []
    for i, s in enumerate(dataset.samples):
        row = {
            "sample_id": s["sample_id"],
            "patient_id": s.get("patient_id"),
            "modalities": presence_pattern(s, modalities),
        }
        row.update(task.label_cells(records_by_id[s["sample_id"]]))
        row.update({k: v[i] for k, v in columns.items()})
        for k, v in (extra or {}).items():
            row[k] = v[i]
        rows.append(row)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


class EpochSetter(transformers.TrainerCallback):
    """Fresh, reproducible augmentations each epoch (the dataset's RNG is seeded by (seed, epoch, index))."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(int(state.epoch or 0))


class RunRecordSaver(transformers.TrainerCallback):
    """Writes the run record (run id + hash of the resolved arguments, :func:`~.finetuning.check_output_dir`) into
    every checkpoint, so that resuming from a checkpoint folder checks the arguments it was written with."""

    def __init__(self, record: dict[str, Any], filename: str):
        self.record, self.filename = record, filename

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            (folder / self.filename).write_text(json.dumps(self.record, indent=1, sort_keys=True) + "\n")


def tied(a: float, b: float) -> bool:
    """Two validation metric values that :class:`TaskTrainer` (``best_model_ties``) and the kept-checkpoint record
    treat as a tie: equal up to float rounding (a C-index over few pairs repeats exactly)."""
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)


class TaskTrainer(transformers.Trainer):
    """``transformers.Trainer`` for BioPerceiver task models. Three things differ: evaluation batches use their own
    collator (no modality dropout or augmentation); ``best_model_ties`` chooses among evaluations tied on
    ``metric_for_best_model`` (:meth:`_determine_best_metric`); and the FLOP estimate: the model's input is a dict
    of modalities, not a token tensor, so ``6 × parameters × positions`` is counted over the latent positions every
    sample runs through (``num_latents``), the term that dominates a Perceiver's cost."""

    def __init__(self, *args, eval_data_collator=None, best_model_ties: str = "first", **kwargs):
        super().__init__(*args, **kwargs)
        # evaluation and prediction batches: no modality dropout, no augmentation (train collator otherwise)
        self.eval_data_collator = eval_data_collator
        self.best_model_ties = best_model_ties

    def _determine_best_metric(self, metrics: dict[str, float], trial) -> bool:
        """transformers' rule (a strictly better ``metric_for_best_model`` replaces the kept evaluation), and for an
        evaluation that *ties* with the kept one, ``best_model_ties``: ``first`` keeps the earlier (transformers),
        ``last`` takes the new one, ``loss`` takes it when its ``eval_loss`` is lower than the kept evaluation's
        (read back from ``state.log_history``, so a resumed run decides the same way)."""
        metric = self.args.metric_for_best_model
        if self.best_model_ties == "first" or metric is None or self.state.best_metric is None:
            return super()._determine_best_metric(metrics, trial)
        key = metric if metric.startswith("eval_") else f"eval_{metric}"
        value = metrics.get(key)
        if value is None or not tied(value, self.state.best_metric):
            return super()._determine_best_metric(metrics, trial)
        if self.best_model_ties == "loss":
            kept = next(
                (
                    h["eval_loss"]
                    for h in self.state.log_history
                    if h.get("step") == self.state.best_global_step and "eval_loss" in h
                ),
                None,
            )
            if kept is None or metrics.get("eval_loss") is None or not metrics["eval_loss"] < kept:
                return False
        self.state.best_metric = value
        if self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST):
            self.state.best_global_step = self.state.global_step
        return True

    @contextlib.contextmanager
    def _evaluation_collator(self):
        if self.eval_data_collator is None:
            yield
            return
        train_collator, self.data_collator = self.data_collator, self.eval_data_collator
        try:
            yield
        finally:
            self.data_collator = train_collator

    def get_eval_dataloader(self, eval_dataset=None):
        with self._evaluation_collator():
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        with self._evaluation_collator():
            return super().get_test_dataloader(test_dataset)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        config = getattr(model, "config", None)
        labels = inputs.get("labels")
        if config is None or labels is None or not hasattr(model, "num_parameters"):
            return 0
        if "latents" in inputs:  # cached latents (linear probe): only the head runs
            head = getattr(model, "head", None)
            params = sum(p.numel() for p in head.parameters()) if head is not None else 0
        else:
            params = model.num_parameters(exclude_embeddings=True)
        return 6 * labels.shape[0] * config.num_latents * params
