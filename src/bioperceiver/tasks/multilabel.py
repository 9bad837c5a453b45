"""Multilabel classification: a list-valued column -> multi-hot targets over ``classes`` (one sigmoid per label)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.special import expit

from ..data.manifest import is_missing
from .base import Task, register_task
from .classification import ProbabilisticTask, as_list, bernoulli_entropy


@register_task
class MultilabelTask(ProbabilisticTask):
    """A list-valued ``label_column`` -> multi-hot over ``classes`` (given, or the ``top_k`` most frequent labels
    of the training split); BCE with logits, one sigmoid per label."""

    name = "multilabel"
    kind = "multilabel"
    aliases = ("multi_label_classification",)
    card_metrics = ("auroc", "auprc", "f1_macro", "f1_micro")
    ece_mode = "classwise"

    def __init__(self, label_column: str | None = None, classes: Sequence[Any] | None = None, top_k: int | None = None):
        super().__init__(label_column, classes)
        self.top_k = top_k

    def fit(self, records: Sequence[dict]) -> MultilabelTask:
        if not self.classes:
            values = [v for v in (r.get(self.label_column) for r in records) if not is_missing(v)]
            counts = Counter(str(x) for v in values for x in as_list(v))
            if not counts:
                raise ValueError(f"{self.label_column}: no labels in the training split")
            self.classes = [c for c, _ in counts.most_common(self.top_k)]
        return self

    def encode(self, record: dict) -> torch.Tensor | None:
        v = record.get(self.label_column)
        if is_missing(v):
            return None
        have = {str(x) for x in as_list(v)}
        return torch.tensor([float(c in have) for c in self.classes], dtype=torch.float32)

    def decode(self, multi_hot) -> list[str]:
        """The labels of a multi-hot vector."""
        return [c for c, x in zip(self.classes, np.asarray(multi_hot)) if x > 0.5]

    def config_settings(self, train_records: Sequence[dict] = (), **model_settings: Any) -> dict[str, Any]:
        return {
            "num_labels": self.num_labels,
            "problem_type": "multi_label_classification",
            "id2label": dict(enumerate(map(str, self.classes))),
        }

    def compute_metrics(self, predictions, labels, *, num_labels=None, from_logits=True, threshold=0.5, **_):
        from ..evaluation.metrics import classification_metrics

        return classification_metrics(
            predictions, labels, "multi_label_classification", num_labels, from_logits=from_logits, threshold=threshold
        )

    def bootstrap_kernel(self, predictions, labels, *, num_labels=None, from_logits=True, threshold=0.5, **_):
        from ..evaluation.bootstrap import classification_kernel

        return classification_kernel(
            self, "multi_label_classification", predictions, labels, num_labels, from_logits, threshold
        )

    def probabilities(self, outputs: np.ndarray, temperature=None) -> np.ndarray:
        z = np.asarray(outputs, dtype=np.float64)
        if temperature is not None:
            z = z / np.asarray(temperature, dtype=np.float64)
        return expit(z)

    def prediction_columns(self, outputs: np.ndarray) -> dict[str, np.ndarray]:
        prob = expit(outputs)
        return {f"prob_{c}": prob[:, k].astype(float) for k, c in enumerate(self.classes)}

    def ensemble_metrics(self, unc, targets: np.ndarray, **bootstrap: Any) -> dict[str, float]:
        from ..evaluation.bootstrap import metrics_with_ci

        return metrics_with_ci(self, unc.mean, targets, num_labels=self.num_labels, from_logits=False, **bootstrap)

    def ensemble_table_columns(self, unc) -> dict[str, np.ndarray]:
        return {f"ensemble_prob_{c}": unc.mean[:, k] for k, c in enumerate(self.classes)}

    # ---- uncertainty ------------------------------------------------------------------------------------------
    def for_outputs(self, outputs: np.ndarray | None) -> Task:
        return self

    def prepare_calibration(self, logits, labels):
        from ..uncertainty.sampling import _valid_rows

        y = labels.reshape(logits.shape)
        ok = _valid_rows(logits)
        return logits[ok], y[ok]

    def per_label_tasks(self):
        """One binary task per label: per-label temperatures are fitted with these."""
        from .classification import BinaryClassificationTask

        return BinaryClassificationTask()

    def uncertainty_columns(self, pu, prefix: str, class_names) -> dict[str, np.ndarray]:
        names = list(class_names) if class_names is not None else [str(k) for k in range(pu.mean.shape[1])]
        cols: dict[str, np.ndarray] = {}
        for what, arr in (
            ("std", pu.std),
            ("entropy", pu.predictive_entropy),
            ("mutual_information", pu.mutual_information),
        ):
            cols.update({f"{prefix}{what}_{c}": arr[:, k] for k, c in enumerate(names)})
        return cols

    def calibrated_columns(self, ctx, pt: np.ndarray) -> None:
        names = ctx.names(pt.shape[1])
        ctx.cols.update({f"calibrated_prob_{c}": pt[:, k] for k, c in enumerate(names)})
        ctx.cols["entropy"] = bernoulli_entropy(pt).mean(axis=1)

    def conformal(self, ctx, pv: np.ndarray, pt: np.ndarray) -> None:
        """Per-label split-conformal sets ⊆ {0, 1} (:class:`~bioperceiver.uncertainty.ConformalMultilabel`, marginal
        per-label coverage ``>= 1 - alpha``) calibrated on ``ctx.conf_idx`` of the validation rows; unknown
        (``-1``) labels are left out per label. Columns ``conformal_set_<label>`` (``"0"``, ``"1"``, ``"0|1"`` or
        empty) and ``set_size`` (labels whose set is not a single value); per-label coverage on test."""
        from ..uncertainty.conformal_tasks import ConformalMultilabel

        if not len(ctx.conf_idx):
            return
        names = ctx.names(pt.shape[1])
        yv = np.where(ctx.yv[ctx.conf_idx] < 0, np.nan, ctx.yv[ctx.conf_idx])
        try:
            conformal = ConformalMultilabel.fit(pv[ctx.conf_idx], yv, ctx.alpha, label_names=names)
        except ValueError as err:  # e.g. fewer calibration rows than alpha needs: reported, not fatal
            ctx.metrics["conformal_skipped"] = str(err)
            return
        ctx.conformal = conformal
        sets = conformal.predict(pt)  # (N, L, 2): [i, j, c] = value c of label j is in the set
        text = np.array(["", "1", "0", "0|1"], dtype=object)[sets[..., 0] * 2 + sets[..., 1]]
        ctx.cols.update({f"conformal_set_{c}": text[:, k] for k, c in enumerate(names)})
        ctx.cols["set_size"] = np.where(ctx.ok_t, (sets.sum(axis=2) != 1).sum(axis=1), np.nan)
        ctx.metrics.update({"conformal_alpha": ctx.alpha, "conformal_score": "lac (per label)"})
        if ctx.yt is not None:
            yt = np.where(ctx.yt < 0, np.nan, ctx.yt)
            ev = conformal.evaluate(pt[ctx.ok_t], yt[ctx.ok_t])
            ctx.metrics.update(
                {
                    "coverage": ev["coverage"],  # mean over labels of the per-label coverage
                    "joint_coverage": ev["joint_coverage"],
                    "mean_set_size": ev["mean_set_size"],
                    "both_values_rate": ev["both_rate"],
                    **{f"coverage_{c}": v for c, v in zip(names, ev["per_label_coverage"])},
                }
            )
