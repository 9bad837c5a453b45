"""Supervised tasks on a manifest: label encoding, datasets and collation for the HF ``Trainer``, prediction,
and the analyses a finetuning run reports (per missing-modality pattern, modality ablations)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from ..data.collator import BioPerceiverCollator, num_tokens
from ..data.errors import DataError
from ..data.manifest import is_missing

logger = logging.getLogger(__name__)

TASKS = ("classification", "multilabel", "regression", "survival")
SPEC_NAME = "finetuning_task.json"


@dataclass
class LabelSpec:
    """How manifest label columns become model targets; saved next to the model (``finetuning_task.json``).

    * ``classification``: ``label_column`` values (ints or strings) -> class index over ``classes``; with
      ``positive_label`` the column may hold lists (e.g. findings) and the task is "contains it" (binary).
    * ``multilabel``: a list-valued column -> multi-hot over ``classes`` (given, or the ``top_k`` most frequent in
      the training split).
    * ``regression``: a number, standardised with the training mean/std (predictions are mapped back).
    * ``survival``: ``time_column`` and ``event_column`` -> ``(time, event)``.
    """

    task: str
    label_column: str | None = None
    time_column: str | None = None
    event_column: str | None = None
    classes: list[Any] = field(default_factory=list)
    positive_label: Any = None
    top_k: int | None = None
    target_mean: float = 0.0
    target_std: float = 1.0

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r}; choose one of {TASKS}")
        if self.task == "survival":
            if not (self.time_column and self.event_column):
                raise ValueError("task 'survival' needs time_column and event_column (e.g. label_survival_time)")
        elif not self.label_column:
            raise ValueError(f"task {self.task!r} needs label_column (a label_* column of the manifest)")

    @property
    def columns(self) -> list[str]:
        return [self.time_column, self.event_column] if self.task == "survival" else [self.label_column]

    @property
    def num_labels(self) -> int:
        if self.task == "survival":
            return 1
        if self.task == "regression":
            return 1
        return len(self.classes)

    @property
    def problem_type(self) -> str | None:
        return {
            "classification": "single_label_classification",
            "multilabel": "multi_label_classification",
            "regression": "regression",
        }.get(self.task)

    # ---- fitting on the training split --------------------------------------------------------------------------
    def fit(self, records: Sequence[dict]) -> LabelSpec:
        values = [r.get(self.label_column) for r in records] if self.label_column else []
        values = [v for v in values if not is_missing(v)]
        if self.task == "classification":
            if self.positive_label is not None:
                self.classes = [f"not {self.positive_label}", str(self.positive_label)]
            elif not self.classes:
                self.classes = sorted({_scalar(v) for v in values}, key=lambda x: (str(type(x)), x))
            if len(self.classes) < 2:
                raise ValueError(
                    f"{self.label_column}: the training split has {len(self.classes)} class(es) {self.classes}; a "
                    "classifier needs at least two (check the split or the column)"
                )
        elif self.task == "multilabel":
            if not self.classes:
                counts = Counter(str(x) for v in values for x in _as_list(v))
                if not counts:
                    raise ValueError(f"{self.label_column}: no labels in the training split")
                self.classes = [c for c, _ in counts.most_common(self.top_k)]
        elif self.task == "regression":
            y = np.asarray([float(v) for v in values], dtype=np.float64)
            if len(y) < 2:
                raise ValueError(f"{self.label_column}: fewer than two training targets")
            self.target_mean, self.target_std = float(y.mean()), float(y.std() or 1.0)
        return self

    # ---- encoding ---------------------------------------------------------------------------------------------
    def encode(self, record: dict) -> torch.Tensor | None:
        """The target of one row, or ``None`` when its label is missing (the row is left out and counted)."""
        if self.task == "survival":
            t, e = record.get(self.time_column), record.get(self.event_column)
            if is_missing(t) or is_missing(e):
                return None
            if not math.isfinite(float(t)) or float(t) < 0:
                raise DataError(
                    "bad_label",
                    f"{self.time_column}={t!r} is not a non-negative number",
                    sample_id=record.get("sample_id"),
                    modality=self.time_column,
                    fix="fix the follow-up time or leave the cell empty to drop the row from this task",
                )
            return torch.tensor([float(t), _event(e, record, self.event_column)], dtype=torch.float32)
        v = record.get(self.label_column)
        if is_missing(v):
            return None
        if self.task == "regression":
            return torch.tensor((float(v) - self.target_mean) / self.target_std, dtype=torch.float32)
        if self.task == "multilabel":
            have = {str(x) for x in _as_list(v)}
            return torch.tensor([float(c in have) for c in self.classes], dtype=torch.float32)
        if self.positive_label is not None:
            have = {str(x) for x in _as_list(v)}
            return torch.tensor(int(str(self.positive_label) in have), dtype=torch.long)
        # classes compare as text: `--label_values 1 2 3` (strings) matches an integer column, 2.0 matches "2"
        value, names = str(_scalar(v)), [str(_scalar(c)) for c in self.classes]
        if value not in names:
            raise DataError(
                "unknown_class",
                f"{self.label_column}={value!r} is not one of the training classes {names}",
                sample_id=record.get("sample_id"),
                modality=self.label_column,
                fix="give the classes explicitly (label_values) or drop rows of classes unseen in training",
            )
        return torch.tensor(names.index(value), dtype=torch.long)

    def decode_regression(self, pred: np.ndarray) -> np.ndarray:
        return pred * self.target_std + self.target_mean

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / SPEC_NAME
        path.write_text(json.dumps(asdict(self), indent=1, default=str) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> LabelSpec:
        return cls(**json.loads((Path(directory) / SPEC_NAME).read_text()))


def _event(value: Any, record: dict, column: str) -> float:
    """1.0 (event) or 0.0 (censored) from 1/0, True/False, 1.0/0.0 or their text forms."""
    text = str(value).strip().lower()
    if text in ("1", "1.0", "true", "yes"):
        return 1.0
    if text in ("0", "0.0", "false", "no"):
        return 0.0
    raise DataError(
        "bad_label",
        f"{column}={value!r} is not an event indicator",
        sample_id=record.get("sample_id"),
        modality=column,
        fix="use 1 (event) / 0 (censored), or leave the cell empty to drop the row from this task",
    )


def _as_list(v: Any) -> list:
    if isinstance(v, (list, tuple, np.ndarray)):
        return list(v)
    return [v]


def _scalar(v: Any) -> Any:
    if isinstance(v, (np.integer, bool, np.bool_)):
        return int(v)
    if isinstance(v, np.floating):
        return int(v) if float(v).is_integer() else float(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def labelled_records(
    records: Sequence[dict], spec: LabelSpec, split: str, on_error: str = "raise"
) -> tuple[list[dict], list[torch.Tensor]]:
    """Rows of a split that have this task's label, with their targets; unlabelled rows are counted and logged.
    A bad label (e.g. a class unseen in training) raises, or with ``on_error="skip"`` is counted and logged."""
    kept, targets, missing, bad = [], [], 0, Counter()
    for r in records:
        try:
            t = spec.encode(r)
        except DataError as err:
            if on_error != "skip":
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
        logger.info("%s: %d of %d rows have no %s label and are left out", split, missing, len(records), spec.columns)
    if bad:
        logger.warning("%s: %d rows with a bad label skipped: %s", split, sum(bad.values()), dict(bad))
    return kept, targets


class TaskDataset(torch.utils.data.Dataset):
    """Manifest rows processed on the fly (train: fresh augmentations per epoch, seeded by ``(seed, epoch, idx)``)
    with their targets. ``modalities`` restricts what the model sees."""

    def __init__(
        self, records, targets, processor, *, base_dir=None, train=False, seed=0, modalities=None, on_error="raise"
    ):
        self.records, self.targets = list(records), list(targets)
        self.processor, self.base_dir, self.train, self.seed = processor, base_dir, train, seed
        self.modalities, self.on_error, self.epoch = modalities, on_error, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, i])
        try:
            out = self.processor(
                self.records[i], base_dir=self.base_dir, train=self.train, rng=rng, modalities=self.modalities
            )
        except DataError as err:
            if self.on_error == "raise":
                raise
            return {"sample_id": self.records[i].get("sample_id"), "__error__": err}
        out["__target__"] = self.targets[i]
        out["__view_seed__"] = int(rng.integers(2**62))
        return out


class ProcessedDataset(torch.utils.data.Dataset):
    """Evaluation rows processed once (deterministic); rows that fail are skipped with a count when asked."""

    def __init__(self, records, targets, processor, *, base_dir=None, modalities=None, on_error="raise"):
        self.samples, self.report = [], Counter()
        for rec, target in zip(records, targets):
            try:
                out = processor(rec, base_dir=base_dir, train=False, modalities=modalities)
            except DataError as err:
                if on_error == "raise":
                    raise
                self.report[(err.modality, err.reason)] += 1
                logger.warning("skipped: %s", err)
                continue
            out["__target__"] = target
            self.samples.append(out)
        if self.report:
            logger.warning("skipped %d evaluation rows: %s", sum(self.report.values()), dict(self.report))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]

    @property
    def sample_ids(self) -> list[str]:
        return [s["sample_id"] for s in self.samples]


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
        out = np.full((len(feats), _width(model)), np.nan, dtype=np.float64)
        if rows:
            batch = collate(rows, train=False)
            inputs = {n: {k: v.to(device) for k, v in a.items()} for n, a in batch["inputs"].items()}
            result = model(inputs=inputs)
            value = result.risk[:, None] if hasattr(result, "risk") and result.risk is not None else result.logits
            out[has_any] = value.float().cpu().numpy()
        preds.append(out)
    return np.concatenate(preds), np.concatenate(keep)


def _width(model) -> int:
    return 1 if hasattr(model, "config") and type(model).__name__.endswith("Survival") else model.config.num_labels


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
    spec: LabelSpec,
    preds: np.ndarray,
    modalities: Sequence[str],
    extra: dict[str, np.ndarray] | None = None,
):
    """One row per sample: ids, presence pattern, label(s), prediction(s) (probabilities / original-scale values /
    risk) — a CSV anyone can re-score."""
    import pandas as pd
    from scipy.special import expit, softmax

    rows = []
    for i, s in enumerate(dataset.samples):
        rec = records_by_id[s["sample_id"]]
        row = {
            "sample_id": s["sample_id"],
            "patient_id": s.get("patient_id"),
            "modalities": presence_pattern(s, modalities),
        }
        for c in spec.columns:
            v = rec.get(c)
            row[c] = json.dumps(list(map(str, v))) if isinstance(v, (list, tuple, np.ndarray)) else v
        p = preds[i]
        if spec.task == "survival":
            row["risk"] = p[0]
        elif spec.task == "regression":
            row["prediction"] = float(spec.decode_regression(p[:1])[0])
        elif spec.task == "multilabel":
            row.update({f"prob_{c}": float(x) for c, x in zip(spec.classes, expit(p))})
        else:
            row.update({f"prob_{c}": float(x) for c, x in zip(spec.classes, softmax(p))})
            row["predicted"] = spec.classes[int(np.argmax(p))]
        for k, v in (extra or {}).items():
            row[k] = v[i]
        rows.append(row)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


class TaskTrainer(transformers.Trainer):
    """``transformers.Trainer`` for BioPerceiver task models. Only the FLOP estimate differs: the model's input is
    a dict of modalities, not a token tensor, so ``6 × parameters × positions`` is counted over the latent
    positions every sample runs through (``num_latents``), the term that dominates a Perceiver's cost."""

    def __init__(self, *args, eval_data_collator=None, **kwargs):
        super().__init__(*args, **kwargs)
        # evaluation and prediction batches: no modality dropout, no augmentation (train collator otherwise)
        self.eval_data_collator = eval_data_collator

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
