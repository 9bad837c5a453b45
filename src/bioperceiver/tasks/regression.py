"""Regression: a number, standardised with the training mean/std for the loss (predictions are mapped back)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.manifest import is_missing
from .base import Task, label_number, register_task

FIX = (
    "write a number, or leave the cell empty to leave the row out of this task (a column of categories: "
    "--task classification)"
)


@register_task
class RegressionTask(Task):
    """``label_column`` holds a number; targets are ``(y - target_mean) / target_std`` with the training split's
    mean and std (MSE on that scale); predictions, metrics, intervals and plots are in the label's own units."""

    name = "regression"
    kind = "regression"
    primary_metric = "rmse"
    card_metrics = ("rmse", "mae", "r2")

    def __init__(self, label_column: str | None = None, target_mean: float = 0.0, target_std: float = 1.0):
        self.label_column = label_column
        self.target_mean, self.target_std = float(target_mean), float(target_std)

    def value(self, record: dict) -> float | None:
        """The row's label as a finite number, ``None`` when the cell is empty; ``DataError`` (naming the sample and
        the column) for text or an infinite number, which would otherwise train on inf or fail without a name."""
        v = record.get(self.label_column)
        return None if is_missing(v) else label_number(v, record, self.label_column, FIX)

    def check_label(self, record: dict) -> bool:
        return self.value(record) is not None

    def fit(self, records: Sequence[dict]) -> RegressionTask:
        values = [v for v in map(self.value, records) if v is not None]
        y = np.asarray(values, dtype=np.float64)
        if len(y) < 2:
            raise ValueError(f"{self.label_column}: fewer than two training targets")
        self.target_mean, self.target_std = float(y.mean()), float(y.std() or 1.0)
        return self

    def refit_on_subset(self, records: Sequence[dict]) -> RegressionTask:
        return self.fit(records)

    def encode(self, record: dict) -> torch.Tensor | None:
        v = self.value(record)
        if v is None:
            return None
        return torch.tensor((v - self.target_mean) / self.target_std, dtype=torch.float32)

    def decode(self, pred: np.ndarray) -> np.ndarray:
        """Standardised values -> the label's units."""
        return pred * self.target_std + self.target_mean

    def decoder(self):
        return self.decode

    def config_settings(self, train_records: Sequence[dict] = (), **model_settings: Any) -> dict[str, Any]:
        return {"num_labels": 1, "problem_type": "regression"}

    def metric_inputs(self, outputs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.decode(outputs[:, 0]), self.decode(targets)

    def compute_metrics(self, predictions, labels, **_: Any) -> dict[str, float]:
        from ..evaluation.metrics import regression_metrics

        return regression_metrics(predictions, labels)

    def bootstrap_kernel(self, predictions, labels, **_: Any):
        from ..evaluation.bootstrap import regression_kernel

        return regression_kernel(self, predictions, labels)

    def prediction_columns(self, outputs: np.ndarray) -> dict[str, np.ndarray]:
        return {"prediction": self.decode(outputs[:, 0]).astype(float)}

    # ensembles average in the label's units
    def ensemble_outputs(self, outputs: np.ndarray) -> np.ndarray:
        return self.decode(outputs)

    def ensemble_column(self) -> str:
        return "prediction"

    def member_metric_inputs(self, outputs: np.ndarray, targets: np.ndarray):
        return outputs[:, 0], self.decode(targets)

    def ensemble_metrics(self, unc, targets: np.ndarray, **bootstrap: Any) -> dict[str, float]:
        from ..evaluation.bootstrap import metrics_with_ci

        pred = np.asarray(unc.mean).reshape(len(targets), -1)
        return metrics_with_ci(self, *self.member_metric_inputs(pred, targets), **bootstrap)

    def explained_score(self):
        return 0, lambda pred: pred[:, 0], f"predicted {self.label_column} (standardised)"

    def plots(self, outputs: np.ndarray, targets: np.ndarray, out: Path) -> list[str]:
        from ..evaluation.plots import plot_regression

        path = plot_regression(
            self.decode(targets), self.decode(outputs[:, 0]), out / "predicted_vs_true.png", self.label_column
        )
        return [path.name]

    def card_labels(self) -> str:
        return f"`{self.label_column}`"

    def calibrate(self, ctx) -> None:
        """Split-conformal intervals in the label's units; MC values decoded too (a std as ``decode(std) -
        decode(0)``)."""
        from ..uncertainty.conformal import calibrate_conformal_regression
        from ..uncertainty.sampling import PredictiveUncertainty

        dec = ctx.decode or (lambda a: a)
        zv, zt, yv, yt = ctx.zv, ctx.zt, ctx.yv, ctx.yt
        pv_, pt_ = dec(zv[:, 0]), dec(zt[:, 0])
        yv_ = dec(yv.reshape(len(yv), -1)[:, 0])
        if len(ctx.conf_idx):
            conformal = calibrate_conformal_regression(pv_[ctx.conf_idx], yv_[ctx.conf_idx], ctx.alpha)
            ctx.conformal = conformal
            lo, hi = conformal.predict_intervals(pt_)
            ctx.cols["interval_lower"], ctx.cols["interval_upper"] = lo, hi
            ctx.metrics.update(
                {"conformal_alpha": ctx.alpha, "conformal_score": "absolute residual", "conformal_qhat": conformal.qhat}
            )
            if yt is not None:
                ev = conformal.evaluate(pt_, dec(yt.reshape(len(yt), -1)[:, 0]))
                ctx.metrics.update({"coverage": ev["coverage"], "mean_interval_width": ev["mean_interval_width"]})
        mc = ctx.mc
        if mc is not None and ctx.decode is not None:
            zero = ctx.decode(np.zeros(1))[0]
            ctx.mc = PredictiveUncertainty(
                mc.task, ctx.decode(mc.mean), ctx.decode(mc.std) - zero, mc.samples, mc.from_logits
            )

    def for_outputs(self, outputs: np.ndarray | None) -> Task:
        return self
