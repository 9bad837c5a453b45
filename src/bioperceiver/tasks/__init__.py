"""Supervised tasks as objects: ``get_task(name, **settings)`` -> a :class:`Task` that owns label encoding, the
model class and head/loss settings, metrics with bootstrap CIs, the predictions table, calibration and conformal
prediction, plots and the model card's results section. See ``CONTRIBUTING.md`` ("Adding a task")."""

from .base import SPEC_NAME, Task, available_tasks, get_task, register_task, resolve_task
from .classification import BinaryClassificationTask, ClassificationTask, ProbabilisticTask
from .multilabel import MultilabelTask
from .regression import RegressionTask
from .survival import SURVIVAL_LOSSES, SurvivalTask

__all__ = [
    "SPEC_NAME",
    "SURVIVAL_LOSSES",
    "BinaryClassificationTask",
    "ClassificationTask",
    "MultilabelTask",
    "ProbabilisticTask",
    "RegressionTask",
    "SurvivalTask",
    "Task",
    "available_tasks",
    "get_task",
    "register_task",
    "resolve_task",
]
