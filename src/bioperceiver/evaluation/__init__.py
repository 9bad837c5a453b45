"""Evaluation: task metrics on numpy arrays (for a ``Trainer``'s ``compute_metrics``) and bootstrap confidence
intervals over samples or patients (for test-set reports and model cards). Which metrics a task gets is the task
object's choice (:mod:`bioperceiver.tasks`); :mod:`.report` is the one evaluation/report path of finetuned models
(imported on its own: it needs the training stack)."""

from .bootstrap import BootstrapCI, Resampler, bootstrap_ci, bootstrap_metrics, metrics_with_ci
from .metrics import (
    TASKS,
    auc_time_points,
    censoring_survival,
    classification_metrics,
    compute_task_metrics,
    concordance_index,
    prepare_classification,
    quiet_metric_warnings,
    regression_metrics,
    survival_metrics,
    time_dependent_auc,
)

__all__ = [
    "TASKS",
    "BootstrapCI",
    "Resampler",
    "auc_time_points",
    "bootstrap_ci",
    "bootstrap_metrics",
    "censoring_survival",
    "classification_metrics",
    "compute_task_metrics",
    "concordance_index",
    "metrics_with_ci",
    "prepare_classification",
    "quiet_metric_warnings",
    "regression_metrics",
    "survival_metrics",
    "time_dependent_auc",
]
