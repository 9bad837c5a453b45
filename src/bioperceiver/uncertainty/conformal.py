"""Split-conformal prediction: classification sets (LAC, APS) and regression intervals.

:func:`calibrate_conformal`: LAC (score :math:`1 - p_y`) or APS (the probability mass of the classes ranked at least
as high as :math:`y`, randomised by default), threshold the :math:`\\lceil (n+1)(1-\\alpha) \\rceil`-th smallest
calibration score (``inf``, i.e. every class, when that exceeds ``n``); marginal coverage :math:`\\ge 1-\\alpha` on
exchangeable test data, whatever the model. :func:`calibrate_conformal_regression`: intervals ``prediction ± q`` from
absolute residuals (optionally normalised by a per-sample scale such as the MC-dropout std). Which method a task uses
is the task's choice (:meth:`bioperceiver.tasks.Task.calibrate`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .calibration import as_class_probs
from .sampling import _valid_rows

logger = logging.getLogger(__name__)

CONFORMAL_SCORES = ("lac", "aps")


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """The :math:`\\lceil (n+1)(1-\\alpha) \\rceil`-th smallest of ``n`` calibration scores (the finite-sample
    split-conformal threshold); ``inf`` when that rank exceeds ``n`` (too few calibration rows for ``alpha``)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    s = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))
    n = len(s)
    k = math.ceil((n + 1) * (1 - alpha) - 1e-9)
    if k > n:
        return float("inf")
    return float(s[max(k, 1) - 1])


def _aps_cumulative(p: np.ndarray, u: np.ndarray | None) -> np.ndarray:
    """``(N, C)`` APS score of every class: the probability mass of the classes ranked above it (descending
    probability, stable order) plus its own probability (times ``u`` ``(N,)`` when randomised)."""
    order = np.argsort(-p, axis=1, kind="stable")
    ps = np.take_along_axis(p, order, axis=1)
    before = np.cumsum(ps, axis=1) - ps
    own = ps if u is None else ps * u[:, None]
    ranked = before + own
    if u is None:
        # the last-ranked class holds the whole mass: exactly 1, not 1 +- rounding, which would break the ties
        # (every row's last class scores 1) arbitrarily and with them the coverage guarantee
        ranked[:, -1] = 1.0
    scores = np.empty_like(p)
    np.put_along_axis(scores, order, ranked, axis=1)
    return scores


def conformal_scores(probs: np.ndarray, score: str = "lac", u: np.ndarray | None = None) -> np.ndarray:
    """Non-conformity score ``(N, C)`` of every candidate class: LAC ``1 - p_y``; APS see
    :func:`_aps_cumulative`."""
    p = as_class_probs(probs)
    if score == "lac":
        return 1.0 - p
    if score == "aps":
        return _aps_cumulative(p, u)
    raise ValueError(f"score {score!r}; choose one of {CONFORMAL_SCORES}")


def coverage_summary(sets: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Empirical ``coverage`` (fraction of rows whose label is in its set), ``mean_set_size``,
    ``singleton_rate``, ``empty_set_rate`` and ``n`` of boolean sets ``(N, C)`` against class indices ``(N,)``."""
    sets = np.asarray(sets, dtype=bool)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    size = sets.sum(axis=1)
    return {
        "coverage": float(sets[np.arange(len(y)), y].mean()) if len(y) else float("nan"),
        "mean_set_size": float(size.mean()) if len(y) else float("nan"),
        "singleton_rate": float((size == 1).mean()) if len(y) else float("nan"),
        "empty_set_rate": float((size == 0).mean()) if len(y) else float("nan"),
        "n": len(y),
    }


@dataclass
class ConformalClassifier:
    """Split-conformal prediction sets at level ``alpha`` from a calibrated threshold ``qhat``.

    ``predict_sets(probs)`` -> boolean ``(N, C)`` (``(N,)`` binary probabilities are read as two classes):
    LAC: ``{y : 1 - p_y <= qhat}``; APS: ``{y : score_y <= qhat}`` with the randomisation ``U ~ U(0, 1)`` drawn
    per test row from ``seed`` (reproducible). Rows with NaN probabilities get an empty set."""

    alpha: float
    score: str
    qhat: float
    n_calibration: int
    randomized: bool = False
    seed: int = 0
    calibration_scores: np.ndarray = field(default=None, repr=False)

    def predict_sets(self, probs: np.ndarray, seed: int | None = None) -> np.ndarray:
        p = as_class_probs(probs)
        u = None
        if self.score == "aps" and self.randomized:
            u = np.random.default_rng([self.seed if seed is None else seed, 1]).uniform(size=len(p))
        scores = conformal_scores(p, self.score, u)
        with np.errstate(invalid="ignore"):
            return np.where(np.isfinite(scores), scores <= self.qhat, False)

    def evaluate(self, probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """:func:`coverage_summary` of the sets on labelled rows (rows without a label or prediction skipped)."""
        p = as_class_probs(probs)
        y = np.asarray(labels, dtype=np.float64).reshape(-1)
        sets = self.predict_sets(p)
        ok = _valid_rows(p) & np.isfinite(y) & (y >= 0)
        return coverage_summary(sets[ok], y[ok])

    def to_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "score": self.score,
            "qhat": self.qhat,
            "n_calibration": self.n_calibration,
            "randomized": self.randomized,
        }


def calibrate_conformal(
    probs: np.ndarray,
    labels: np.ndarray,
    alpha: float = 0.1,
    *,
    score: str = "lac",
    randomized: bool = True,
    seed: int = 0,
) -> ConformalClassifier:
    """Split-conformal calibration on held-out rows: ``probs`` ``(N, C)`` (or ``(N,)`` binary) probabilities and
    class indices ``labels`` ``(N,)``; ``score`` ``"lac"`` (least ambiguous sets, smallest on average) or
    ``"aps"`` (adaptive sets; ``randomized`` gives exact rather than conservative coverage). Rows with NaN
    predictions or labels are skipped."""
    if score not in CONFORMAL_SCORES:
        raise ValueError(f"score {score!r}; choose one of {CONFORMAL_SCORES}")
    p = as_class_probs(probs)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    ok = _valid_rows(p) & np.isfinite(y) & (y >= 0)
    p, y = p[ok], y[ok].astype(np.int64)
    if len(y) == 0:
        raise ValueError("no labelled calibration rows")
    u = np.random.default_rng([seed, 0]).uniform(size=len(p)) if score == "aps" and randomized else None
    s = conformal_scores(p, score, u)[np.arange(len(y)), y]
    qhat = conformal_quantile(s, alpha)
    if not np.isfinite(qhat):
        logger.warning(
            "conformal: %d calibration rows are too few for alpha=%s; every set is all classes", len(y), alpha
        )
    return ConformalClassifier(alpha, score, qhat, len(y), bool(randomized and score == "aps"), seed, s)


@dataclass
class ConformalRegressor:
    """Split-conformal intervals ``prediction ± qhat`` (``normalized``: ``± qhat * scale``)."""

    alpha: float
    qhat: float
    n_calibration: int
    normalized: bool = False

    def predict_intervals(self, pred: np.ndarray, scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        pred = np.asarray(pred, dtype=np.float64).reshape(-1)
        half = self.qhat * (np.asarray(scale, dtype=np.float64).reshape(-1) if self.normalized else 1.0)
        if self.normalized and scale is None:
            raise ValueError("this regressor was calibrated with a scale; pass scale=")
        return pred - half, pred + half

    def evaluate(self, pred: np.ndarray, y: np.ndarray, scale: np.ndarray | None = None) -> dict[str, float]:
        """Empirical ``coverage`` and ``mean_interval_width`` on rows with a prediction and a target."""
        lo, hi = self.predict_intervals(pred, scale)
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        ok = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(y)
        if self.qhat == float("inf"):
            ok = np.isfinite(np.asarray(pred, dtype=np.float64).reshape(-1)) & np.isfinite(y)
        return {
            "coverage": float(((lo[ok] <= y[ok]) & (y[ok] <= hi[ok])).mean()) if ok.any() else float("nan"),
            "mean_interval_width": float((hi[ok] - lo[ok]).mean()) if ok.any() else float("nan"),
            "n": int(ok.sum()),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "qhat": self.qhat,
            "n_calibration": self.n_calibration,
            "normalized": self.normalized,
        }


def calibrate_conformal_regression(
    pred: np.ndarray, y: np.ndarray, alpha: float = 0.1, *, scale: np.ndarray | None = None
) -> ConformalRegressor:
    """Split-conformal regression: scores :math:`|y - \\hat y|` (divided by ``scale`` ``(N,)`` > 0, e.g. the
    MC-dropout std, for adaptive widths) on held-out rows; intervals reach marginal coverage ``>= 1 - alpha``."""
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    s = np.abs(y - pred)
    if scale is not None:
        scale = np.asarray(scale, dtype=np.float64).reshape(-1)
        if np.any(scale[np.isfinite(scale)] <= 0):
            raise ValueError("scale must be > 0")
        s = s / scale
    s = s[np.isfinite(s)]
    if len(s) == 0:
        raise ValueError("no calibration rows with a prediction and a target")
    return ConformalRegressor(alpha, conformal_quantile(s, alpha), len(s), scale is not None)
