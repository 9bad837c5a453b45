"""Single-label classification (binary and multiclass, softmax over ``num_labels`` logits) and the one-logit binary
output kind the uncertainty code also accepts; :class:`ProbabilisticTask` holds what they share with multilabel."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.special import entr, expit, logsumexp, softmax

from ..data.errors import DataError
from ..data.manifest import is_missing
from .base import Task, register_task

logger = logging.getLogger(__name__)
# a numeric label column with at least this many distinct values (or any fractional one) reads as a measurement,
# not categories: classification is warned about (--task regression predicts the number)
MANY_NUMERIC_CLASSES = 10


def as_list(v: Any) -> list:
    if isinstance(v, (list, tuple, np.ndarray)):
        return list(v)
    return [v]


def scalar(v: Any) -> Any:
    if isinstance(v, (np.integer, bool, np.bool_)):
        return int(v)
    if isinstance(v, np.floating):
        return int(v) if float(v).is_integer() else float(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def categorical_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy (nats) over the last axis, ``0 log 0 = 0``."""
    return entr(p).sum(axis=-1)


def bernoulli_entropy(p: np.ndarray) -> np.ndarray:
    return entr(p) + entr(1.0 - p)


class ProbabilisticTask(Task):
    """A task whose outputs are logits of probabilities: temperature scaling, ECE, entropies."""

    has_probabilities = True
    ece_mode = "top_label"
    primary_metric = "auroc"

    def __init__(self, label_column: str | None = None, classes: Sequence[Any] | None = None):
        self.label_column = label_column
        self.classes = list(classes or [])

    @property
    def num_labels(self) -> int:
        return len(self.classes)

    def class_names(self) -> list[str] | None:
        return [str(c) for c in self.classes] or None

    # ---- uncertainty: per-kind numerics ---------------------------------------------------------------------
    def entropy(self, p: np.ndarray) -> np.ndarray:
        return bernoulli_entropy(p)

    def summarize(self, x: np.ndarray, *, from_logits: bool = True, temperature=None):
        from ..uncertainty.sampling import PredictiveUncertainty, _mean_std

        x = self.select_outputs(x)
        if from_logits:
            p = self.probabilities(x, temperature)
        else:
            if temperature is not None:
                raise ValueError("temperature needs logit samples (from_logits=True)")
            p = x
        p = self.squeeze_probabilities(p)
        mean, std = _mean_std(p)
        h = self.entropy(mean)
        eh, _ = _mean_std(self.entropy(p))
        mi = np.maximum(h - eh, 0.0)
        return PredictiveUncertainty(
            self.kind,
            mean,
            std,
            x,
            from_logits=from_logits,
            predictive_entropy=h,
            expected_entropy=eh,
            mutual_information=mi,
            temperature=temperature,
        )

    def select_outputs(self, x: np.ndarray) -> np.ndarray:
        return x

    def squeeze_probabilities(self, p: np.ndarray) -> np.ndarray:
        return p

    def nll(self, z: np.ndarray, y: np.ndarray, beta=1.0) -> float:
        """Mean negative log-likelihood of ``beta * logits`` (Bernoulli per observed entry; ``-1`` = unknown)."""
        from scipy.special import log_expit

        s = z * beta
        observed = np.isfinite(y) & (y >= 0)
        if not observed.any():
            return float("nan")
        ll = np.where(observed, np.nan_to_num(y) * log_expit(s) + (1 - np.nan_to_num(y)) * log_expit(-s), 0.0)
        return float(-ll.sum() / observed.sum())

    def calibrate(self, ctx) -> None:
        """Temperature on validation, ECE before/after, a reliability diagram, calibrated probabilities and the
        task's conformal sets (:meth:`conformal`)."""
        from ..uncertainty.calibration import expected_calibration_error, fit_temperature, plot_reliability_diagram

        zv, yv, zt, yt, ok_v, ok_t = ctx.zv, ctx.yv, ctx.zt, ctx.yt, ctx.ok_v, ctx.ok_t
        if ctx.temperature_scaling and len(ctx.temp_idx):
            ctx.scaler = fit_temperature(zv[ctx.temp_idx], yv[ctx.temp_idx], self, per_label=ctx.per_label_temperature)
            t = ctx.scaler.temperature
            ctx.metrics.update(
                {
                    "temperature": t.tolist() if isinstance(t, np.ndarray) else float(t),
                    "val_nll_before": ctx.scaler.nll_before,
                    "val_nll_after": ctx.scaler.nll_after,
                }
            )
        temp = ctx.scaler.temperature if ctx.scaler is not None else None
        pv_raw, pt_raw = self.probabilities(zv), self.probabilities(zt)
        pv, pt = self.probabilities(zv, temp), self.probabilities(zt, temp)
        mode, n_bins = self.ece_mode, ctx.n_bins
        ctx.metrics.update({"ece_mode": mode, "ece_bins": n_bins})
        ctx.metrics["val_ece_before"] = expected_calibration_error(pv_raw[ok_v], yv[ok_v], n_bins, mode)
        ctx.metrics["val_ece_after"] = expected_calibration_error(pv[ok_v], yv[ok_v], n_bins, mode)
        if yt is not None:
            ctx.metrics["ece_before"] = expected_calibration_error(pt_raw[ok_t], yt[ok_t], n_bins, mode)
            ctx.metrics["ece_after"] = expected_calibration_error(pt[ok_t], yt[ok_t], n_bins, mode)
            if mode != "classwise":
                ctx.metrics["classwise_ece_before"] = expected_calibration_error(
                    pt_raw[ok_t], yt[ok_t], n_bins, "classwise"
                )
                ctx.metrics["classwise_ece_after"] = expected_calibration_error(pt[ok_t], yt[ok_t], n_bins, "classwise")
            if ctx.plot_path is not None and ok_t.any():
                ctx.plot = plot_reliability_diagram(
                    yt[ok_t],
                    pt_raw[ok_t],
                    ctx.plot_path,
                    pt[ok_t] if ctx.scaler is not None else None,
                    n_bins=n_bins,
                    mode=mode,
                )
        self.calibrated_columns(ctx, pt)
        self.conformal(ctx, pv, pt)
        if ctx.mc is not None and ctx.scaler is not None and ctx.mc.from_logits:
            ctx.mc = ctx.mc.with_temperature(ctx.scaler.temperature)

    def calibrated_columns(self, ctx, pt: np.ndarray) -> None:
        raise NotImplementedError

    def conformal(self, ctx, pv: np.ndarray, pt: np.ndarray) -> None:
        """Split-conformal prediction sets calibrated on ``ctx.conf_idx`` of the validation rows."""

    def uncertainty_plot_name(self) -> str | None:
        return "reliability_diagram.png"

    # ---- plots ------------------------------------------------------------------------------------------------
    def plots(self, outputs: np.ndarray, targets: np.ndarray, out: Path) -> list[str]:
        from ..evaluation.plots import plot_calibration, plot_roc_pr

        prob = self.probabilities(outputs)
        made = []
        for fn, name in ((plot_roc_pr, "roc_pr.png"), (plot_calibration, "calibration.png")):
            path = fn(targets, prob, self.classes, out / name)
            if path:
                made.append(path.name)
        return made

    def card_labels(self) -> str:
        return f"`{self.label_column}`" + (f", classes {self.classes}" if self.classes else "")


@register_task
class ClassificationTask(ProbabilisticTask):
    """Single-label classification over ``classes`` (softmax over ``num_labels`` logits, cross-entropy).

    ``label_column`` values (ints or strings) become class indices over ``classes`` (given, or the sorted values
    of the training split). With ``positive_label`` the column may hold lists (e.g. findings) and the task is
    "contains it": two classes ``["not <label>", "<label>"]``.
    """

    name = "classification"
    kind = "multiclass"
    aliases = ("multiclass", "single_label_classification")
    card_metrics = ("auroc", "auprc", "accuracy", "f1", "f1_macro")

    def __init__(
        self, label_column: str | None = None, classes: Sequence[Any] | None = None, positive_label: Any = None
    ):
        super().__init__(label_column, classes)
        self.positive_label = positive_label

    def for_outputs(self, outputs: np.ndarray | None) -> Task:
        if outputs is not None and (outputs.ndim == 1 or outputs.shape[-1] == 1):
            return BinaryClassificationTask(self.label_column, self.classes, self.positive_label)
        return self

    # ---- labels -----------------------------------------------------------------------------------------------
    def fit(self, records: Sequence[dict]) -> ClassificationTask:
        values = [v for v in (r.get(self.label_column) for r in records) if not is_missing(v)]
        if self.positive_label is not None:
            self.classes = [f"not {self.positive_label}", str(self.positive_label)]
        elif not self.classes:
            self.classes = sorted({scalar(v) for v in values}, key=lambda x: (str(type(x)), x))
            self._warn_if_continuous(len(values))
        if len(self.classes) < 2:
            raise ValueError(
                f"{self.label_column}: the training split has {len(self.classes)} class(es) {self.classes}; a "
                "classifier needs at least two (check the split or the column)"
            )
        return self

    def _warn_if_continuous(self, rows: int) -> None:
        """Classes found in a column of numbers that looks like a measurement (many distinct values, or fractional
        ones): each value would be an unrelated class with a handful of rows. Warned, not refused (ages in years as
        classes can be meant)."""
        numbers = [c for c in self.classes if isinstance(c, (int, float)) and not isinstance(c, bool)]
        fractional = any(isinstance(c, float) for c in numbers)  # scalar() turned whole floats into ints
        if len(numbers) == len(self.classes) > 2 and (fractional or len(numbers) >= MANY_NUMERIC_CLASSES):
            logger.warning(
                "%s: %d classes (%s) from %d training rows (%.1f rows per class): the column holds %s numbers, a "
                "measurement rather than categories? Pass --task regression to predict the number (or --label_values "
                "to fix the classes)",
                self.label_column,
                len(numbers),
                ", ".join(map(str, numbers[:5])) + (", ..." if len(numbers) > 5 else ""),
                rows,
                rows / len(numbers),
                "fractional" if fractional else "many distinct",
            )

    def encode(self, record: dict) -> torch.Tensor | None:
        v = record.get(self.label_column)
        if is_missing(v):
            return None
        if self.positive_label is not None:
            have = {str(x) for x in as_list(v)}
            return torch.tensor(int(str(self.positive_label) in have), dtype=torch.long)
        # classes compare as text: `--label_values 1 2 3` (strings) matches an integer column, 2.0 matches "2"
        value, names = str(scalar(v)), [str(scalar(c)) for c in self.classes]
        if value not in names:
            raise DataError(
                "unknown_class",
                f"{self.label_column}={value!r} is not one of the training classes {names}",
                sample_id=record.get("sample_id"),
                modality=self.label_column,
                fix="give the classes explicitly (label_values) or drop rows of classes unseen in training",
            )
        return torch.tensor(names.index(value), dtype=torch.long)

    def decode(self, index: int) -> Any:
        """The class of a class index."""
        return self.classes[int(index)]

    # ---- model and metrics ------------------------------------------------------------------------------------
    def config_settings(self, train_records: Sequence[dict] = (), **model_settings: Any) -> dict[str, Any]:
        return {
            "num_labels": self.num_labels,
            "problem_type": "single_label_classification",
            "id2label": dict(enumerate(map(str, self.classes))),
        }

    def compute_metrics(self, predictions, labels, *, num_labels=None, from_logits=True, threshold=0.5, **_):
        from ..evaluation.metrics import classification_metrics

        return classification_metrics(
            predictions,
            labels,
            "single_label_classification",
            num_labels,
            from_logits=from_logits,
            threshold=threshold,
        )

    def bootstrap_kernel(self, predictions, labels, *, num_labels=None, from_logits=True, threshold=0.5, **_):
        from ..evaluation.bootstrap import classification_kernel

        return classification_kernel(
            self, "single_label_classification", predictions, labels, num_labels, from_logits, threshold
        )

    def probabilities(self, outputs: np.ndarray, temperature=None) -> np.ndarray:
        z = np.asarray(outputs, dtype=np.float64)
        if temperature is not None:
            z = z / np.asarray(temperature, dtype=np.float64)
        return softmax(z, axis=-1)

    def prediction_columns(self, outputs: np.ndarray) -> dict[str, np.ndarray]:
        prob = softmax(outputs, axis=-1)
        cols = {f"prob_{c}": prob[:, k].astype(float) for k, c in enumerate(self.classes)}
        cols["predicted"] = np.array([self.classes[int(k)] for k in np.argmax(outputs, axis=1)], dtype=object)
        return cols

    def ensemble_metrics(self, unc, targets: np.ndarray, **bootstrap: Any) -> dict[str, float]:
        from ..evaluation.bootstrap import metrics_with_ci

        mean = unc.mean if unc.mean.ndim == 2 else np.stack([1 - unc.mean, unc.mean], axis=1)
        return metrics_with_ci(self, mean, targets, num_labels=self.num_labels, from_logits=False, **bootstrap)

    def ensemble_table_columns(self, unc) -> dict[str, np.ndarray]:
        mean = unc.mean if unc.mean.ndim == 2 else np.stack([1 - unc.mean, unc.mean], axis=1)
        return {f"ensemble_prob_{c}": mean[:, k] for k, c in enumerate(self.classes)}

    def explained_score(self):
        if self.num_labels == 2:
            log_odds = lambda out: out.logits[:, 1] - out.logits[:, 0]  # noqa: E731  (of the model's output)
            return log_odds, lambda pred: pred[:, 1] - pred[:, 0], f"log-odds of {self.classes[1]}"
        return None, None, "logit of the predicted class"

    # ---- uncertainty ------------------------------------------------------------------------------------------
    def entropy(self, p: np.ndarray) -> np.ndarray:
        return categorical_entropy(p)

    def nll(self, z: np.ndarray, y: np.ndarray, beta=1.0) -> float:
        s = z * beta
        return float(np.mean(logsumexp(s, axis=1) - np.take_along_axis(s, y[:, None], axis=1)[:, 0]))

    def prepare_calibration(self, logits, labels):
        from ..uncertainty.sampling import _valid_rows

        z, y = logits, labels.reshape(-1)
        ok = _valid_rows(z) & np.isfinite(y) & (y >= 0)
        z, y = z[ok], y[ok].astype(np.int64)
        if y.size and y.max() >= z.shape[1]:
            raise ValueError(f"class index {y.max()} out of range for {z.shape[1]} logits")
        return z, y

    def uncertainty_columns(self, pu, prefix: str, class_names) -> dict[str, np.ndarray]:
        top = np.nan_to_num(pu.mean, nan=-1.0).argmax(axis=1)
        return {
            f"{prefix}std": np.take_along_axis(pu.std, top[:, None], axis=1)[:, 0],
            f"{prefix}entropy": pu.predictive_entropy,
            f"{prefix}mutual_information": pu.mutual_information,
        }

    def calibrated_columns(self, ctx, pt: np.ndarray) -> None:
        from ..uncertainty.calibration import as_class_probs

        p2 = as_class_probs(pt)
        names = ctx.names(p2.shape[1])
        ctx.cols.update({f"calibrated_prob_{c}": p2[:, k] for k, c in enumerate(names)})
        ctx.cols["confidence"] = p2.max(axis=1)
        ctx.cols["entropy"] = categorical_entropy(p2)

    def conformal(self, ctx, pv: np.ndarray, pt: np.ndarray) -> None:
        """LAC/APS prediction sets (:func:`~bioperceiver.uncertainty.calibrate_conformal`) and their coverage."""
        from ..uncertainty.calibration import as_class_probs
        from ..uncertainty.conformal import calibrate_conformal, coverage_summary

        if not len(ctx.conf_idx):
            return
        p2 = as_class_probs(pt)
        names = ctx.names(p2.shape[1])
        ok_t, yt = ctx.ok_t, ctx.yt
        conformal = calibrate_conformal(
            pv[ctx.conf_idx], ctx.yv[ctx.conf_idx], ctx.alpha, score=ctx.score, seed=ctx.seed
        )
        ctx.conformal = conformal
        sets = conformal.predict_sets(p2)
        ctx.cols["conformal_set"] = np.array(
            ["|".join(c for c, s in zip(names, row) if s) if ok else None for row, ok in zip(sets, ok_t)],
            dtype=object,
        )
        ctx.cols["set_size"] = np.where(ok_t, sets.sum(axis=1), np.nan)
        ctx.metrics.update(
            {"conformal_alpha": ctx.alpha, "conformal_score": ctx.score, "conformal_qhat": conformal.qhat}
        )
        if yt is not None:
            y1 = yt.reshape(-1)
            has = ok_t & np.isfinite(y1) & (y1 >= 0)
            inside = np.full(len(ok_t), np.nan)
            inside[has] = sets[np.flatnonzero(has), y1[has].astype(np.int64)]
            ctx.cols["label_in_set"] = inside
            summary = coverage_summary(sets[has], y1[has])
            ctx.metrics.update(
                {k: summary[k] for k in ("coverage", "mean_set_size", "singleton_rate", "empty_set_rate")}
            )


@register_task
class BinaryClassificationTask(ClassificationTask):
    """Binary classification with one logit (sigmoid): the output kind of a single-logit classifier. Finetuning
    trains binary tasks as :class:`ClassificationTask` with two classes (``positive_label`` or two label values)."""

    name = "binary"
    kind = "binary"
    aliases = ()

    def for_outputs(self, outputs: np.ndarray | None) -> Task:
        return self

    def config_settings(self, train_records: Sequence[dict] = (), **model_settings: Any) -> dict[str, Any]:
        raise ValueError(
            "a one-logit binary head is not trained by run_finetune; use task 'classification' with two classes "
            "(positive_label, or a two-valued label column)"
        )

    def probabilities(self, outputs: np.ndarray, temperature=None) -> np.ndarray:
        z = np.asarray(outputs, dtype=np.float64)
        if temperature is not None:
            z = z / np.asarray(temperature, dtype=np.float64)
        return expit(z)

    def entropy(self, p: np.ndarray) -> np.ndarray:
        return bernoulli_entropy(p)

    def select_outputs(self, x: np.ndarray) -> np.ndarray:
        return x[:, :, :1]

    def squeeze_probabilities(self, p: np.ndarray) -> np.ndarray:
        return p[:, :, 0]

    def nll(self, z: np.ndarray, y: np.ndarray, beta=1.0) -> float:
        return ProbabilisticTask.nll(self, z, y, beta)

    def prepare_calibration(self, logits, labels):
        z, y = logits[:, 0], labels.reshape(-1)
        ok = np.isfinite(z) & np.isfinite(y) & (y >= 0)
        return z[ok], y[ok]

    def uncertainty_columns(self, pu, prefix: str, class_names) -> dict[str, np.ndarray]:
        return {
            f"{prefix}std": pu.std,
            f"{prefix}entropy": pu.predictive_entropy,
            f"{prefix}mutual_information": pu.mutual_information,
        }
