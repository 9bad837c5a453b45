"""The task contract and its registry.

A :class:`Task` is everything the library needs to know about one kind of supervised target: how manifest columns
become targets (fitted on the training split), which model class and head settings it trains, how raw model outputs
become metrics (with patient-bootstrap intervals), the predictions table, calibration and conformal prediction,
plots and the model card's results section. Code outside ``bioperceiver/tasks/`` asks the task object; it never
compares a task's name.

    task = get_task("classification", label_column="label_diagnosis").fit(train_records)
    target = task.encode(record)                       # a tensor, or None when the label is missing
    task.save(folder); Task.load(folder)               # finetuning_task.json, read back through get_task

A new task is one subclass with ``name`` (and optionally ``aliases``) and one :func:`register_task` call.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..data.errors import DataError
from ..data.manifest import is_missing

logger = logging.getLogger(__name__)

SPEC_NAME = "finetuning_task.json"
_REGISTRY: dict[str, type[Task]] = {}
_ALIASES: dict[str, str] = {}


class Task:
    """Base class of the supervised tasks. Subclasses set ``name``, ``kind`` (the output kind the uncertainty code
    reports: ``multiclass``, ``binary``, ``multilabel``, ``regression``, ``survival``) and override the methods
    below. Settings are keyword arguments of ``__init__``; :meth:`to_dict` / :meth:`from_dict` round-trip them."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    primary_metric: ClassVar[str] = ""
    card_metrics: ClassVar[tuple[str, ...]] = ()
    lower_is_better: ClassVar[tuple[str, ...]] = ("loss", "mse", "rmse", "mae", "brier", "log_loss")
    has_probabilities: ClassVar[bool] = False

    # ---- settings ---------------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The constructor arguments that define this task (saved in ``finetuning_task.json``)."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {n: _plain(getattr(self, n)) for n in names}

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.name, **self.settings()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Task:
        """A task from :meth:`to_dict` output, or from a ``finetuning_task.json`` written before tasks were objects
        (it held every task's fields; those this task does not take are dropped)."""
        data = dict(data)
        name = data.pop("task", None) or cls.name
        if not name:
            raise ValueError(f"no 'task' key in {sorted(data)}; give the task name (one of {available_tasks()})")
        task_cls = _resolve(name)
        accepted = set(inspect.signature(task_cls.__init__).parameters) - {"self"}
        dropped = {k: v for k, v in data.items() if k not in accepted}
        if dropped:
            logger.debug("task %s: ignoring saved fields of other tasks %s", name, sorted(dropped))
        return task_cls(**{k: v for k, v in data.items() if k in accepted})

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / SPEC_NAME
        path.write_text(json.dumps(self.to_dict(), indent=1, default=str) + "\n")
        return path

    @staticmethod
    def load(directory: str | Path) -> Task:
        path = Path(directory) / SPEC_NAME
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: {directory} is not a finetune/run_finetune.py output folder")
        return Task.from_dict(json.loads(path.read_text()))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items() if v not in (None, [], {}))
        return f"{type(self).__name__}({args})"

    def target_signature(self) -> tuple:
        """What must agree for two models to predict the same target: task, label columns, class names."""
        return (self.name, list(self.columns), [str(c) for c in getattr(self, "classes", [])])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Task) and self.to_dict() == other.to_dict()

    __hash__ = None  # mutable (fit)

    # ---- labels -----------------------------------------------------------------------------------------------
    @property
    def columns(self) -> list[str]:
        """The manifest columns holding this task's label (default: the one ``label_column``)."""
        return [getattr(self, "label_column", None)]

    def check_columns(self, available: Sequence[str], label_columns: Sequence[str] = ()) -> None:
        """Raise ``ValueError`` for a label column that is not set or that the manifest lacks."""
        if not all(self.columns):
            raise ValueError(f"task {self.name!r} needs label_column (a label_* column of the manifest)")
        for c in self.columns:
            if c not in available:
                raise ValueError(f"label column {c!r} is not in the manifest; label columns: {list(label_columns)}")

    def check_differential_privacy(self) -> None:
        """Raise ``ValueError`` when this task's loss cannot be trained with DP-SGD (it must be a sum of
        per-sample terms, each depending on its own row only)."""

    def check_label(self, record: dict) -> bool:
        """Whether ``record`` has this task's label: ``False`` when a label cell is empty (the row is left out of
        the task); raises :class:`~bioperceiver.data.DataError` naming the sample, the column and the fix for a label
        nothing could be trained on (base: an infinite number; a numeric task also text). Needs no fitting: run it
        on every split before :meth:`fit`, which may assume the rows passed it."""
        values = [record.get(c) for c in self.columns]
        if any(is_missing(v) for v in values):
            return False
        for column, value in zip(self.columns, values):
            if isinstance(value, (float, np.floating)) and not math.isfinite(value):
                fix = "fix the value, or leave the cell empty to leave the row out of this task"
                raise label_error("non_finite_label", f"{column}={value!r} is not a finite value", record, column, fix)
        return True

    def fit(self, records: Sequence[dict]) -> Task:
        """Fit the label encoding on the training rows (classes, scaling); returns ``self``."""
        return self

    def refit_on_subset(self, records: Sequence[dict]) -> Task:
        """Refit what depends on the rows actually trained on (regression scaling) after a label-fraction subset;
        the label set itself stays the one fitted on the whole training split."""
        return self

    def encode(self, record: dict) -> torch.Tensor | None:
        """The target of one row, or ``None`` when its label is missing."""
        raise NotImplementedError

    def label_cells(self, record: dict) -> dict[str, Any]:
        """The label columns of one row as written to the predictions table (lists as JSON text)."""
        out = {}
        for c in self.columns:
            v = record.get(c)
            out[c] = json.dumps(list(map(str, v))) if isinstance(v, (list, tuple, np.ndarray)) else v
        return out

    # ---- model ------------------------------------------------------------------------------------------------
    @property
    def num_labels(self) -> int:
        return 1

    def model_class(self) -> type:
        """The ``BioPerceiverFor*`` class this task trains."""
        from ..modeling_tasks import BioPerceiverForSequenceClassification

        return BioPerceiverForSequenceClassification

    def auto_model_class(self) -> type:
        """The ``Auto*`` class that loads a finetuned folder of this task."""
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def config_settings(self, train_records: Sequence[dict] = (), **model_settings: Any) -> dict[str, Any]:
        """Config overrides for the head and loss (``num_labels``/``problem_type``, survival settings)."""
        raise NotImplementedError

    def output_width(self, config) -> int:
        """Columns of :meth:`raw_output` for a model of this task."""
        return config.num_labels

    # ---- outputs and metrics ----------------------------------------------------------------------------------
    def metric_inputs(self, outputs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw model outputs ``(N, K)`` and encoded targets -> what the metrics take (in the label's units)."""
        return outputs, targets

    def compute_metrics(self, predictions, labels, **options: Any) -> dict[str, float]:
        """Point metrics on metric inputs (see :mod:`bioperceiver.evaluation.metrics`)."""
        raise NotImplementedError

    def bootstrap_kernel(self, predictions, labels, **options: Any):
        """``(n, point metrics, kernel(weights (B, N)) -> {metric: (B,)}, extra)`` for
        :func:`bioperceiver.evaluation.metrics_with_ci`."""
        raise NotImplementedError

    def evaluate(
        self,
        outputs: np.ndarray,
        targets: np.ndarray,
        *,
        groups=None,
        ci: bool = True,
        n_resamples: int = 1000,
        seed: int = 0,
    ) -> dict[str, float]:
        """Metrics of raw outputs against encoded targets; with ``ci`` patient-bootstrap intervals (``groups``)."""
        from ..evaluation.bootstrap import metrics_with_ci

        pred, labels = self.metric_inputs(np.asarray(outputs), np.asarray(targets))
        if not ci:
            return self.compute_metrics(pred, labels, num_labels=self.num_labels)
        return metrics_with_ci(
            self, pred, labels, num_labels=self.num_labels, n_resamples=n_resamples, groups=groups, seed=seed
        )

    def prediction_columns(self, outputs: np.ndarray) -> dict[str, np.ndarray]:
        """Per-sample prediction columns of the predictions table from raw outputs ``(N, K)``."""
        raise NotImplementedError

    def ensemble_outputs(self, outputs: np.ndarray) -> np.ndarray:
        """A member's raw outputs in the units an ensemble averages (regression: the label's units)."""
        return outputs

    def ensemble_column(self) -> str:
        """Name of a member's column in the ensemble table."""
        return "logits"

    def member_metric_inputs(self, outputs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`metric_inputs` of outputs already in ensemble units (:meth:`ensemble_outputs`)."""
        return self.metric_inputs(outputs, targets)

    def member_metrics(self, outputs: np.ndarray, targets: np.ndarray, **bootstrap: Any) -> dict[str, float]:
        """Metrics with CIs of one ensemble member's outputs (in ensemble units)."""
        from ..evaluation.bootstrap import metrics_with_ci

        pred, labels = self.member_metric_inputs(outputs, targets)
        return metrics_with_ci(self, pred, labels, num_labels=self.num_labels, **bootstrap)

    def ensemble_metrics(self, unc, targets: np.ndarray, **bootstrap: Any) -> dict[str, float]:
        """Metrics of an ensemble's :class:`~bioperceiver.uncertainty.PredictiveUncertainty` mean."""
        from ..evaluation.bootstrap import metrics_with_ci

        pred = np.asarray(unc.mean).reshape(len(targets), -1)
        pred, labels = self.member_metric_inputs(pred, targets)
        return metrics_with_ci(self, pred, labels, num_labels=self.num_labels, **bootstrap)

    def ensemble_table_columns(self, unc) -> dict[str, np.ndarray]:
        return {}

    def centre_ensemble(self, configs: Sequence[Any]) -> bool:
        """Whether member outputs are centred before averaging (a Cox model's risks have an arbitrary offset)."""
        return False

    def center(self, samples: np.ndarray) -> np.ndarray:
        """``samples (S, N, K)`` with each member's additive constant removed (when :meth:`centre_ensemble`)."""
        return samples

    # ---- interpretation, plots, card --------------------------------------------------------------------------
    def explained_score(self):
        """``(target, score_fn, meaning)``: what explanations explain, as the ``target`` of the interpret functions,
        a function of the raw outputs ``(N, K) -> (N,)`` (``None`` when it is per class) and its description."""
        return None, None, "logit of the predicted class"

    def plots(self, outputs: np.ndarray, targets: np.ndarray, out: Path) -> list[str]:
        return []

    def card_labels(self) -> str:
        """The label line of the model card."""
        raise NotImplementedError

    def card_settings(self, config) -> dict[str, Any]:
        """Task-specific rows of the card's training-configuration table."""
        return {}

    def card_title(self) -> str:
        return f"BioPerceiver {self.name} ({', '.join(self.columns)})"

    # ---- uncertainty (see bioperceiver.uncertainty) -----------------------------------------------------------
    def for_outputs(self, outputs: np.ndarray | None) -> Task:
        """The task as its outputs show it (a classifier with one logit is binary)."""
        return self

    def probabilities(self, outputs: np.ndarray, temperature=None) -> np.ndarray:
        raise ValueError(f"no probabilities for a {self.kind} task")

    def summarize(self, x: np.ndarray, *, from_logits: bool = True, temperature=None):
        """Summarise ``(S, N, K)`` samples of raw outputs: mean and std of the value (risk, prediction)."""
        from ..uncertainty.sampling import PredictiveUncertainty, _mean_std

        values = x[:, :, 0] if x.shape[2] == 1 else x
        mean, std = _mean_std(values)
        return PredictiveUncertainty(self.kind, mean, std, x, from_logits=from_logits)

    def uncertainty_columns(self, pu, prefix: str, class_names) -> dict[str, np.ndarray]:
        """Per-sample MC/ensemble columns: ``{prefix}mean`` and ``{prefix}std`` (per output when several)."""
        mean, std = pu.mean, pu.std
        if mean.ndim == 2:
            names = list(class_names) if class_names is not None else [str(k) for k in range(mean.shape[1])]
            return {
                **{f"{prefix}mean_{c}": mean[:, k] for k, c in enumerate(names)},
                **{f"{prefix}std_{c}": std[:, k] for k, c in enumerate(names)},
            }
        return {f"{prefix}mean": mean, f"{prefix}std": std}

    def calibration_targets(self, labels: np.ndarray) -> np.ndarray | None:
        """Labels that decide whether a validation row can calibrate (``None``: any row with an output)."""
        return labels

    def prepare_calibration(self, logits, labels):
        raise ValueError(f"temperature scaling needs a classification task, got {self.name!r}")

    def calibrate(self, ctx) -> None:
        """Fill ``ctx`` (an :class:`~bioperceiver.uncertainty.calibration.CalibrationContext`) with calibration
        and conformal results; the default (survival) has none beyond the MC columns."""

    def conformal(self, ctx) -> None:
        """Conformal prediction on ``ctx``; see :meth:`calibrate`."""

    def uncertainty_plot_name(self) -> str | None:
        return None

    def decoder(self):
        """The map from raw outputs to the label's units, for the uncertainty report (``None``: identity)."""
        return None


def _plain(v: Any) -> Any:
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    if isinstance(v, tuple):
        return list(v)
    return v


def label_error(reason: str, message: str, record: dict, column: str, fix: str) -> DataError:
    """A :class:`~bioperceiver.data.DataError` about the label cell ``column`` of ``record`` (its sample named)."""
    return DataError(reason, message, sample_id=record.get("sample_id"), modality=column, fix=fix)


def label_number(value: Any, record: dict, column: str, fix: str) -> float:
    """A numeric label cell as a finite float; :class:`~bioperceiver.data.DataError` naming the sample and the column
    for text (``bad_label``) or an infinite/NaN number (``non_finite_label``)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise label_error("bad_label", f"{column}={value!r} is not a number", record, column, fix) from None
    if not math.isfinite(number):
        raise label_error("non_finite_label", f"{column}={value!r} is not a finite number", record, column, fix)
    return number


def register_task(cls: type[Task]) -> type[Task]:
    """Register a :class:`Task` subclass under ``cls.name`` and ``cls.aliases`` (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Task)) or not cls.name:
        raise ValueError(f"register_task takes a Task subclass with a name, got {cls!r}")
    for key in (cls.name, *cls.aliases):
        owner = _REGISTRY.get(key) or _REGISTRY.get(_ALIASES.get(key, ""))
        if owner is not None and owner is not cls and owner.__qualname__ != cls.__qualname__:
            raise ValueError(f"task name {key!r} is taken by {owner.__name__}; choose another name")
    _REGISTRY[cls.name] = cls
    for alias in cls.aliases:
        _ALIASES[alias] = cls.name
    return cls


def available_tasks() -> list[str]:
    """Registered task names (aliases not included)."""
    return sorted(_REGISTRY)


def _resolve(name: str) -> type[Task]:
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        names = sorted([*_REGISTRY, *_ALIASES])
        raise ValueError(f"task {name!r}; choose one of {names}")
    return _REGISTRY[key]


def get_task(name: str | Task, **settings: Any) -> Task:
    """A task object by name (or alias, e.g. a transformers ``problem_type``), with its settings. A :class:`Task`
    passes through (``settings`` then must be empty)."""
    if isinstance(name, Task):
        if settings:
            raise ValueError("settings apply to a task name, not to a Task object")
        return name
    if not isinstance(name, str):
        raise ValueError(f"task must be a name or a Task, got {type(name).__name__}")
    return _resolve(name)(**settings)


def resolve_task(task: str | Task, outputs: np.ndarray | None = None) -> Task:
    """The task object for a name or object, as its ``outputs`` show it (:meth:`Task.for_outputs`)."""
    return get_task(task).for_outputs(None if outputs is None else np.asarray(outputs))
