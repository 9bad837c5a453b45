"""Survival: follow-up time and event columns -> ``(time, event)`` targets; a Cox risk head (partial likelihood)
or a discrete-time logistic-hazard head over quantile time bins."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.errors import DataError
from ..data.manifest import is_missing
from .base import Task, register_task

SURVIVAL_LOSSES = ("cox", "discrete")


def event_indicator(value: Any, record: dict, column: str) -> float:
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


@register_task
class SurvivalTask(Task):
    """``time_column`` (follow-up time, >= 0) and ``event_column`` (1 = event, 0 = censored) -> ``(time, event)``.

    ``loss``: ``"cox"`` (one risk output, negative partial log-likelihood with ``ties`` ``"efron"``/``"breslow"``)
    or ``"discrete"`` (``num_time_bins`` bins at quantiles of the training event times, logistic hazard). Metrics:
    Harrell's C-index and time-dependent AUCs of the risk (higher = earlier event).
    """

    name = "survival"
    kind = "survival"
    primary_metric = "c_index"
    card_metrics = ("c_index", "td_auc_q50")

    def __init__(
        self,
        time_column: str | None = None,
        event_column: str | None = None,
        loss: str = "cox",
        ties: str = "efron",
        num_time_bins: int = 10,
    ):
        if loss not in SURVIVAL_LOSSES:
            raise ValueError(f"survival loss {loss!r}; choose one of {SURVIVAL_LOSSES}")
        self.time_column, self.event_column = time_column, event_column
        self.loss, self.ties, self.num_time_bins = loss, ties, int(num_time_bins)

    @property
    def columns(self) -> list[str]:
        return [self.time_column, self.event_column]

    def check_columns(self, available, label_columns=()) -> None:
        if not (self.time_column and self.event_column):
            raise ValueError("task 'survival' needs time_column and event_column (e.g. label_survival_time)")
        super().check_columns(available, label_columns)

    def encode(self, record: dict) -> torch.Tensor | None:
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
        return torch.tensor([float(t), event_indicator(e, record, self.event_column)], dtype=torch.float32)

    # ---- model ------------------------------------------------------------------------------------------------
    def model_class(self) -> type:
        from ..modeling_tasks import BioPerceiverForSurvival

        return BioPerceiverForSurvival

    def auto_model_class(self) -> type:
        from ..modeling_tasks import AutoModelForSurvival

        return AutoModelForSurvival

    def config_settings(self, train_records: Sequence[dict] = (), **model_settings: Any) -> dict[str, Any]:
        from ..losses.survival import make_time_bins

        out: dict[str, Any] = {"survival_loss": self.loss, "survival_ties": self.ties}
        if self.loss == "discrete":
            times = [float(r[self.time_column]) for r in train_records]
            events = [int(r[self.event_column]) for r in train_records]
            out["survival_time_bins"] = [float(b) for b in make_time_bins(times, events, self.num_time_bins)]
        return out

    def output_width(self, config) -> int:
        return 1  # the risk

    # ---- metrics ----------------------------------------------------------------------------------------------
    def metric_inputs(self, outputs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return outputs[:, 0], targets

    def compute_metrics(self, predictions, labels, *, event=None, times=None, **_: Any) -> dict[str, float]:
        from ..evaluation.metrics import survival_metrics

        return survival_metrics(predictions, labels, event, times=times)

    def bootstrap_kernel(self, predictions, labels, *, event=None, times=None, **_: Any):
        from ..evaluation.bootstrap import survival_kernel

        return survival_kernel(self, predictions, labels, event, times)

    def evaluate(self, outputs, targets, *, groups=None, ci=True, n_resamples=1000, seed=0) -> dict[str, float]:
        from ..evaluation.bootstrap import metrics_with_ci

        pred, labels = self.metric_inputs(np.asarray(outputs), np.asarray(targets))
        if not ci:
            return self.compute_metrics(pred, labels)
        return metrics_with_ci(self, pred, labels, n_resamples=n_resamples, groups=groups, seed=seed)

    def prediction_columns(self, outputs: np.ndarray) -> dict[str, np.ndarray]:
        return {"risk": outputs[:, 0]}

    def ensemble_column(self) -> str:
        return "risk"

    def ensemble_metrics(self, unc, targets: np.ndarray, **bootstrap: Any) -> dict[str, float]:
        from ..evaluation.bootstrap import metrics_with_ci

        pred = np.asarray(unc.mean).reshape(len(targets), -1)
        return metrics_with_ci(self, pred[:, 0], targets, **bootstrap)

    def member_metric_inputs(self, outputs: np.ndarray, targets: np.ndarray):
        return outputs[:, 0], targets

    def centre_ensemble(self, configs: Sequence[Any]) -> bool:
        return any(getattr(c, "survival_loss", "cox") == "cox" for c in configs)

    def center(self, samples: np.ndarray) -> np.ndarray:
        return samples - np.nanmean(samples, axis=1, keepdims=True)

    # ---- interpretation, plots, card --------------------------------------------------------------------------
    def explained_score(self):
        return "risk", lambda pred: pred[:, 0], "predicted risk (log hazard ratio)"

    def plots(self, outputs: np.ndarray, targets: np.ndarray, out: Path) -> list[str]:
        from ..evaluation.plots import plot_km_by_risk

        km = plot_km_by_risk(targets[:, 0], targets[:, 1], outputs[:, 0], out / "km_by_risk_group.png")
        return [km[0].name] if km else []

    def card_labels(self) -> str:
        return f"`{self.time_column}` (follow-up time) and `{self.event_column}` (1 = event)"

    def card_settings(self, config) -> dict[str, Any]:
        return {"survival loss": f"{config.survival_loss} ({config.survival_ties} ties)"}

    # ---- uncertainty ------------------------------------------------------------------------------------------
    def calibration_targets(self, labels: np.ndarray) -> np.ndarray | None:
        return None  # survival rows calibrate nothing here: any row with a risk counts

    def calibrate(self, ctx) -> None:
        self.conformal(ctx)

    def conformal(self, ctx) -> None:
        """Conformalised survival predictions / calibrated risk groups. TODO(issue 12): wired by the coordinator
        to ``bioperceiver.uncertainty_ext`` (written on another branch); until then survival runs report the
        MC-dropout spread of the risk only, as before."""
        return None
