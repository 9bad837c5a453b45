"""Keep the best held-out evaluation of a pretraining run, and stop when it no longer improves.

What ``TrainingArguments(load_best_model_at_end=True, metric_for_best_model=..., greater_is_better=...)`` and
``EarlyStoppingCallback(early_stopping_patience=...)`` do for a transformers ``Trainer``, for the pretraining loop
(``eval.load_best_model_at_end``, ``eval.metric_for_best_model``, ``eval.greater_is_better``,
``eval.early_stopping_patience`` of the run config):

- every held-out evaluation (``eval.steps`` and the last step) is compared with the best so far; a strictly better one
  (ties keep the earlier, as transformers does) becomes the best and its checkpoint is written at that step;
- checkpoint rotation (``checkpoint.keep_last``) never deletes the best checkpoint;
- with a patience, the run stops after that many evaluations in a row without improvement;
- at the end ``final/`` holds the best checkpoint's weights and the held-out numbers of those weights;
- the state travels in every checkpoint's ``trainer_state.json``, so a resumed run chooses as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

from .config import RunConfigError
from .pretraining import RETRIEVAL_KS

logger = logging.getLogger(__name__)

__all__ = ["BestModel", "best_metric_choices"]


def best_metric_choices(view_names: list[str], reconstruction: bool) -> list[str]:
    """The held-out numbers a run can select on: the contrastive loss, the reconstruction error (with the term) and
    each pair's ``R@k``. Numbers on training patients and the gap are not held out, so they are not choices."""
    pairs = [f"{a}-{b}" for i, a in enumerate(view_names) for b in view_names[i + 1 :]]
    return [
        "eval_loss",
        *(["eval_loss_reconstruction"] if reconstruction else []),
        *(f"R@{k}/{pair}" for pair in pairs for k in RETRIEVAL_KS),
    ]


@dataclass
class BestModel:
    """The best evaluation so far of one run (and the early-stopping count)."""

    metric: str
    greater_is_better: bool
    patience: int = 0
    step: int | None = None
    value: float | None = None
    evaluations: int = 0
    since_best: int = 0
    stopped_early: bool = False

    @classmethod
    def from_config(cls, eval_cfg, view_names: list[str], reconstruction: bool) -> BestModel | None:
        """``None`` unless ``eval.load_best_model_at_end``; a metric the run cannot report raises
        :class:`RunConfigError` before any training, naming the ones it can."""
        if not eval_cfg.load_best_model_at_end:
            return None
        choices = best_metric_choices(view_names, reconstruction)
        if eval_cfg.metric_for_best_model not in choices:
            raise RunConfigError(
                f"eval.metric_for_best_model: this run reports no held-out {eval_cfg.metric_for_best_model!r}; "
                f"choose one of {choices}"
            )
        greater = eval_cfg.greater_is_better
        if greater is None:  # transformers' rule: a loss (or error) is lower-is-better, anything else higher
            greater = not eval_cfg.metric_for_best_model.startswith("eval_loss")
        return cls(eval_cfg.metric_for_best_model, bool(greater), eval_cfg.early_stopping_patience)

    @property
    def checkpoint(self) -> str | None:
        """The folder name of the best checkpoint (under ``output_dir/checkpoints``)."""
        return None if self.step is None else f"checkpoint-{self.step}"

    def update(self, step: int, metrics: dict[str, Any], final: bool = False) -> bool:
        """Count the evaluation of ``step``; ``True`` when it is the new best.

        - An evaluation without the metric (a retrieval pair with fewer than 2 held-out queries) is logged and is not
          counted at all: it neither improves nor counts toward the patience, so a metric the held-out split never
          reports cannot stop a run (the card then says that no evaluation reported it).
        - A non-finite value (a diverged loss) is never the best, and counts toward the patience.
        - ``final``: the run's last evaluation; it can be the best, and it does not stop the run early (the run ends
          there anyway)."""
        value = metrics.get(self.metric)
        if value is None:
            logger.warning("step %d: the held-out evaluation has no %s; it cannot be the best", step, self.metric)
            return False
        self.evaluations += 1
        value = float(value)
        if not math.isfinite(value):
            logger.warning("step %d: the held-out %s is %s; it cannot be the best", step, self.metric, value)
            improved = False
        else:
            better = self.value is None or (value > self.value if self.greater_is_better else value < self.value)
            improved = better
        if improved:
            self.step, self.value, self.since_best = step, value, 0
        else:
            self.since_best += 1
            if self.patience and self.since_best >= self.patience and not final:
                self.stopped_early = True
        return improved

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """The state a checkpoint saved (``None``: a checkpoint written without the setting; nothing is known)."""
        if not state:
            return
        if state["metric"] != self.metric or state["greater_is_better"] != self.greater_is_better:
            raise RunConfigError(
                f"the checkpoint selected on {state['metric']} (greater is better: {state['greater_is_better']}), "
                f"this run on {self.metric} ({self.greater_is_better})"
            )
        for key, value in state.items():
            setattr(self, key, value)

    def summary(self) -> dict[str, Any]:
        """What the card, ``eval_results.json`` and the run's summary say about the kept weights."""
        return {
            "metric": self.metric,
            "greater_is_better": self.greater_is_better,
            "value": self.value,
            "step": self.step,
            "evaluations": self.evaluations,
            "stopped_early": self.stopped_early,
            **({"patience": self.patience} if self.patience else {}),
        }
