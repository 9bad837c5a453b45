"""Survival: follow-up time and event columns -> ``(time, event)`` targets; a Cox risk head (partial likelihood)
or a discrete-time logistic-hazard head over quantile time bins."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.manifest import is_missing
from .base import Task, label_error, label_number, register_task

SURVIVAL_LOSSES = ("cox", "discrete")


def event_indicator(value: Any, record: dict, column: str) -> float:
    """1.0 (event) or 0.0 (censored) from 1/0, True/False, 1.0/0.0 or their text forms."""
    text = str(value).strip().lower()
    if text in ("1", "1.0", "true", "yes"):
        return 1.0
    if text in ("0", "0.0", "false", "no"):
        return 0.0
    fix = "use 1 (event) / 0 (censored), or leave the cell empty to drop the row from this task"
    raise label_error("bad_label", f"{column}={value!r} is not an event indicator", record, column, fix)


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

    def check_differential_privacy(self) -> None:
        if self.loss == "cox":
            raise ValueError(
                "differential privacy needs a loss that is a sum of per-sample terms; the Cox partial likelihood is "
                "not (each row's term depends on its whole risk set, so per-sample gradients and their clipping do "
                "not bound one patient's influence). Use --survival_loss discrete (discrete-time hazard head)"
            )

    def check_columns(self, available, label_columns=()) -> None:
        if not (self.time_column and self.event_column):
            raise ValueError("task 'survival' needs time_column and event_column (e.g. label_survival_time)")
        super().check_columns(available, label_columns)

    def label(self, record: dict) -> tuple[float, float] | None:
        """``(time, event)`` of the row, ``None`` when a cell is empty; ``DataError`` naming the sample and the column
        for a time that is text, infinite or negative, or an event that is not an indicator."""
        t, e = record.get(self.time_column), record.get(self.event_column)
        if is_missing(t) or is_missing(e):
            return None
        fix = "fix the follow-up time or leave the cell empty to drop the row from this task"
        time = label_number(t, record, self.time_column, fix)
        if time < 0:
            message = f"{self.time_column}={t!r} is not a non-negative number"
            raise label_error("bad_label", message, record, self.time_column, fix)
        return time, event_indicator(e, record, self.event_column)

    def check_label(self, record: dict) -> bool:
        return self.label(record) is not None

    def encode(self, record: dict) -> torch.Tensor | None:
        label = self.label(record)
        return None if label is None else torch.tensor(label, dtype=torch.float32)

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
            labels = [label for label in map(self.label, train_records) if label is not None]
            times = [t for t, _ in labels]
            events = [int(e) for _, e in labels]
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
        """Calibrated risk groups and conformal lower bounds on survival time, both fitted on the validation rows
        ``ctx.conf_idx`` (targets ``(time, event)``):

        - :class:`~bioperceiver.uncertainty.RiskGroups`: tertiles of the validation risk, each group's validation
          Kaplan-Meier curve as its predicted survival; per test patient ``risk_group`` and ``group_survival_<t>``
          at the validation quartile times; on test the KM per group, the calibration error and the log-rank test.
        - :class:`~bioperceiver.uncertainty.ConformalSurvival` (Candès, Lei & Ren 2023, censoring weights from a
          Kaplan-Meier fit, i.e. censoring independent of the covariates): ``survival_lower_bound`` with
          ``P(T >= L) >= 1 - alpha``; on test the coverage range censoring allows.

        Either is skipped, with the reason in the metrics, when the validation rows cannot support it (too few
        patients or events for ``alpha``)."""
        from ..uncertainty.conformal_tasks import ConformalSurvival, RiskGroups

        idx = ctx.conf_idx
        if not len(idx) or ctx.yv.ndim != 2 or ctx.yv.shape[1] < 2:
            return
        risk_v, time_v, event_v = ctx.zv[idx, 0], ctx.yv[idx, 0], ctx.yv[idx, 1]
        risk_t = ctx.zt[:, 0]
        yt = ctx.yt if ctx.yt is not None and ctx.yt.ndim == 2 and ctx.yt.shape[1] >= 2 else None
        try:
            groups = RiskGroups.fit(risk_v, time_v, event_v)
        except ValueError as err:
            ctx.metrics["risk_groups_skipped"] = str(err)
        else:
            ctx.cols["risk_group"] = np.array(
                [groups.names[g] if g >= 0 else None for g in groups.assign(risk_t)], dtype=object
            )
            surv = groups.predict_survival(risk_t)  # (N, H)
            ctx.cols.update({f"group_survival_{h:g}": surv[:, k] for k, h in enumerate(groups.horizons)})
            ctx.metrics["risk_groups"] = groups.n_groups
            if yt is not None:
                ev = groups.evaluate(risk_t[ctx.ok_t], yt[ctx.ok_t, 0], yt[ctx.ok_t, 1])
                ctx.metrics.update(
                    {
                        "risk_groups_mean_calibration_error": ev["mean_calibration_error"],
                        "risk_groups_max_calibration_error": ev["max_calibration_error"],
                        "risk_groups_logrank_p": ev["logrank_p"],
                    }
                )
        try:
            bound = ConformalSurvival.fit(time_v, event_v, risk=risk_v, alpha=ctx.alpha)
        except ValueError as err:
            ctx.metrics["conformal_skipped"] = str(err)
            return
        ctx.conformal = bound
        ctx.cols["survival_lower_bound"] = bound.lower_bound(risk=risk_t)
        ctx.metrics.update({"conformal_alpha": ctx.alpha, "conformal_c0": bound.c0, "conformal_qhat": bound.qhat})
        if yt is not None:
            ev = bound.evaluate(yt[ctx.ok_t, 0], yt[ctx.ok_t, 1], risk=risk_t[ctx.ok_t])
            ctx.metrics.update({f"conformal_{k}": v for k, v in ev.items()})
