"""Task metrics on numpy arrays, for a Hugging Face ``Trainer``'s ``compute_metrics`` and for test-set reports.

Classification and regression metrics are scikit-learn's; survival metrics (Harrell's C-index, cumulative/dynamic
AUC with IPCW) are implemented here, vectorised, because scikit-learn has none and lifelines/scikit-survival are not
runtime dependencies. Every survival kernel also takes a batch of per-row weights ``(B, N)`` so that
:mod:`.bootstrap` can evaluate all bootstrap resamples at once (integer weights = how often a row was drawn, which is
exactly the metric on the resampled rows).

Undefined metrics (AUROC with one class present, a C-index without comparable pairs) are NaN with a logged warning,
never an exception, so one degenerate evaluation batch does not kill a training run.

Conventions:

- ``risk``: higher = earlier event (a Cox log hazard ratio). lifelines' ``concordance_index`` takes scores where
  higher = longer survival, so ``concordance_index(t, risk, e) == lifelines.utils.concordance_index(t, -risk, e)``.
- ``event``: 1/True = event observed, 0/False = censored.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator, Sequence

import numpy as np
from scipy.special import expit, softmax
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    f1_score,
    log_loss,
    mean_absolute_error,
    mean_squared_error,
    r2_score,
    roc_auc_score,
    root_mean_squared_error,
)

logger = logging.getLogger(__name__)

TASKS = ("classification", "multilabel", "regression", "survival")
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification")
DEFAULT_AUC_QUANTILES = (0.25, 0.5, 0.75)

_QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("bioperceiver_quiet_metrics", default=False)


@contextlib.contextmanager
def quiet_metric_warnings() -> Iterator[None]:
    """Silence this module's "metric undefined" warnings inside the block (the bootstrap uses it: NaN resamples are
    counted and reported once instead of logged a thousand times)."""
    token = _QUIET.set(True)
    try:
        yield
    finally:
        _QUIET.reset(token)


def _warn(msg: str, *args) -> None:
    if not _QUIET.get():
        logger.warning(msg, *args)


# ---------------------------------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------------------------------


def _as_numpy(x, name: str, dtype=np.float64) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=dtype)
    if dtype is np.float64 and np.isnan(x).any():
        raise ValueError(f"{name} contains NaN; drop those samples or fix the model outputs before computing metrics")
    return x


def _binary_labels(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{name} must be 0/1, got values {np.unique(labels)[:10]}")
    return labels.astype(np.int64)


def prepare_classification(
    predictions,
    labels,
    problem_type: str = "single_label_classification",
    num_labels: int | None = None,
    from_logits: bool = True,
) -> tuple[str, np.ndarray, np.ndarray]:
    """Turn model outputs and labels into ``(kind, probabilities, labels)``.

    ``kind`` is ``"binary"`` (probabilities and labels ``(N,)``; from one logit per sample through a sigmoid, or two
    through a softmax, keeping class 1), ``"multiclass"`` (``(N, K)`` softmax probabilities, ``(N,)`` labels in
    ``[0, K)``) or ``"multilabel"`` (``(N, K)`` sigmoid probabilities, ``(N, K)`` 0/1 labels). With
    ``from_logits=False`` the predictions are taken as probabilities already.
    """
    if problem_type not in PROBLEM_TYPES:
        raise ValueError(f"problem_type must be one of {PROBLEM_TYPES}, got {problem_type!r}")
    scores = _as_numpy(predictions, "predictions")
    labels = _as_numpy(labels, "labels")
    if scores.ndim == 2 and scores.shape[1] == 1 and problem_type == "single_label_classification":
        scores = scores[:, 0]
    if scores.ndim not in (1, 2) or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"predictions {scores.shape} and labels {labels.shape} must have the same number of rows")
    width = 1 if scores.ndim == 1 else scores.shape[1]
    if not from_logits and ((scores < 0).any() or (scores > 1).any()):
        raise ValueError(
            f"from_logits=False but predictions range over [{scores.min():g}, {scores.max():g}], outside [0, 1]; "
            "pass logits with from_logits=True"
        )
    if num_labels is not None and num_labels != width:
        raise ValueError(f"num_labels={num_labels} but predictions have {width} column(s)")

    if problem_type == "multi_label_classification":
        if scores.ndim != 2 or labels.shape != scores.shape:
            raise ValueError(
                f"multilabel predictions and labels must both be (N, K), got {scores.shape}, {labels.shape}"
            )
        probs = expit(scores) if from_logits else scores
        return "multilabel", probs, _binary_labels(labels)

    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or (labels != np.round(labels)).any() or (labels < 0).any():
        raise ValueError(f"single-label classification needs integer class labels of shape (N,), got {labels.shape}")
    labels = labels.astype(np.int64)
    if width == 1:
        return "binary", expit(scores) if from_logits else scores, _binary_labels(labels)
    if labels.max(initial=0) >= width:
        raise ValueError(f"labels go up to {labels.max()} but predictions have only {width} classes")
    probs = softmax(scores, axis=1) if from_logits else scores
    if width == 2:
        return "binary", probs[:, 1], labels
    return "multiclass", probs, labels


def _binary_auroc(y: np.ndarray, p: np.ndarray) -> float:
    """AUROC, or NaN when ``y`` has a single class."""
    if y.min(initial=1) == y.max(initial=0):
        return float("nan")
    return float(roc_auc_score(y, p))


def _binary_auprc(y: np.ndarray, p: np.ndarray) -> float:
    """Average precision, or NaN when ``y`` has no positive."""
    if not y.any():
        return float("nan")
    return float(average_precision_score(y, p))


def _macro(values: list[float], metric: str, what: str) -> float:
    """Mean over the columns where a binary metric is defined (warns when some are not)."""
    values = np.asarray(values, dtype=np.float64)
    defined = ~np.isnan(values)
    if not defined.any():
        _warn("%s undefined for every %s (each has a single class); returning NaN", metric, what)
        return float("nan")
    if not defined.all():
        plural = what + ("es" if what.endswith("s") else "s")  # classes, labels
        _warn("%s macro-averaged over the %d of %d %s where it is defined", metric, defined.sum(), len(values), plural)
    return float(values[defined].mean())


def classification_metrics(
    logits_or_probs,
    labels,
    problem_type: str = "single_label_classification",
    num_labels: int | None = None,
    *,
    from_logits: bool = True,
    threshold: float = 0.5,
) -> dict[str, float]:
    """Classification metrics (scikit-learn) from logits (or probabilities with ``from_logits=False``).

    ========== ================================ ================================== ====================================
    kind       ranking                          label                              probabilistic
    ========== ================================ ================================== ====================================
    binary     ``auroc``, ``auprc``             ``accuracy``, ``f1``               ``brier``, ``log_loss``
    multiclass ``auroc``, ``auprc`` (macro      ``accuracy``, ``f1_macro``,
               one-vs-rest)                     ``f1_micro``
    multilabel ``auroc``, ``auprc`` (macro),    ``accuracy`` (exact match),
               ``auroc_micro``, ``auprc_micro`` ``f1_macro``, ``f1_micro``
    ========== ================================ ================================== ====================================

    Binary vs. multiclass follows the prediction width for ``single_label_classification``: one logit (sigmoid) or
    two (softmax, class 1 positive) is binary, more is multiclass. Predicted labels: ``p > threshold`` (binary and
    multilabel; a logit of exactly 0 is negative, like an argmax tie) and the argmax (multiclass). AUPRC is
    average precision (scikit-learn's step-wise area, no interpolation).

    Undefined cases are NaN with a logged warning: AUROC with one class present, AUPRC without a positive, F1 with
    no positive among labels and predictions (scikit-learn ``zero_division=nan``). Macro averages run over the
    classes/labels where the metric is defined (equal to scikit-learn's macro average when all are); a class
    missing from a small evaluation set is therefore skipped, not scored 0.
    """
    kind, probs, y = prepare_classification(logits_or_probs, labels, problem_type, num_labels, from_logits)
    return CLASSIFICATION_METRICS[kind](y, probs, threshold)


def _binary_metrics(y: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    auroc = _binary_auroc(y, probs)
    if np.isnan(auroc):
        _warn("AUROC undefined: only class %d present among %d labels; returning NaN", y[0], len(y))
    auprc = _binary_auprc(y, probs)
    if np.isnan(auprc):
        _warn("AUPRC undefined: no positive label among %d; returning NaN", len(y))
    pred = (probs > threshold).astype(np.int64)
    return {
        "auroc": auroc,
        "auprc": auprc,
        "accuracy": float(accuracy_score(y, pred)),
        "f1": float(f1_score(y, pred, zero_division=np.nan)),
        "brier": float(brier_score_loss(y, probs, pos_label=1)),
        "log_loss": float(log_loss(y, probs, labels=[0, 1])),
    }


def _multiclass_metrics(y: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    onehot = y[:, None] == np.arange(probs.shape[1])[None, :]  # (N, K)
    pred = probs.argmax(1)
    return {
        "auroc": _macro([_binary_auroc(c, p) for c, p in zip(onehot.T, probs.T, strict=True)], "AUROC", "class"),
        "auprc": _macro([_binary_auprc(c, p) for c, p in zip(onehot.T, probs.T, strict=True)], "AUPRC", "class"),
        "accuracy": float(accuracy_score(y, pred)),
        "f1_macro": float(f1_score(y, pred, average="macro", zero_division=np.nan)),
        "f1_micro": float(f1_score(y, pred, average="micro", zero_division=np.nan)),
    }


def _multilabel_metrics(y: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    pred = (probs > threshold).astype(np.int64)
    auroc_micro = _binary_auroc(y.ravel(), probs.ravel())
    auprc_micro = _binary_auprc(y.ravel(), probs.ravel())
    if np.isnan(auroc_micro) or np.isnan(auprc_micro):
        _warn("micro AUROC/AUPRC undefined: the %d labels hold a single class; returning NaN", y.size)
    return {
        "auroc": _macro([_binary_auroc(c, p) for c, p in zip(y.T, probs.T, strict=True)], "AUROC", "label"),
        "auroc_micro": auroc_micro,
        "auprc": _macro([_binary_auprc(c, p) for c, p in zip(y.T, probs.T, strict=True)], "AUPRC", "label"),
        "auprc_micro": auprc_micro,
        "accuracy": float(accuracy_score(y, pred)),
        "f1_macro": float(f1_score(y, pred, average="macro", zero_division=np.nan)),
        "f1_micro": float(f1_score(y, pred, average="micro", zero_division=np.nan)),
    }


# the metrics of each classification kind that prepare_classification returns
CLASSIFICATION_METRICS = {
    "binary": _binary_metrics,
    "multiclass": _multiclass_metrics,
    "multilabel": _multilabel_metrics,
}


# ---------------------------------------------------------------------------------------------------------------------
# Regression
# ---------------------------------------------------------------------------------------------------------------------


def prepare_regression(pred, target) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and targets as ``(N, K)`` float arrays (``(N,)`` becomes ``(N, 1)``)."""
    pred, target = _as_numpy(pred, "predictions"), _as_numpy(target, "labels")
    pred = pred.reshape(len(pred), -1) if pred.ndim else pred.reshape(1, 1)
    target = target.reshape(len(target), -1) if target.ndim else target.reshape(1, 1)
    if pred.shape != target.shape:
        raise ValueError(f"regression predictions {pred.shape} and targets {target.shape} must match")
    return pred, target


def _pearson(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean over outputs of Pearson's r between ``(N, K)`` predictions and targets; NaN if an output is constant."""
    dp, dt = pred - pred.mean(0), target - target.mean(0)
    denom = np.sqrt((dp**2).sum(0) * (dt**2).sum(0))
    if (denom == 0).any():
        _warn("Pearson r undefined: constant predictions or targets; returning NaN")
        return float("nan")
    return float(np.mean((dp * dt).sum(0) / denom))


def regression_metrics(pred, target) -> dict[str, float]:
    """``mse``, ``rmse``, ``mae``, ``r2`` (scikit-learn; multi-output targets are averaged uniformly over outputs,
    so ``rmse`` is the mean of per-output RMSEs as in ``root_mean_squared_error``) and ``pearson`` (Pearson's r,
    mean over outputs, NaN for a constant column)."""
    pred, target = prepare_regression(pred, target)
    if len(target) < 2:
        _warn("regression metrics on %d sample(s): r2 and pearson are undefined", len(target))
    return {
        "mse": float(mean_squared_error(target, pred)),
        "rmse": float(root_mean_squared_error(target, pred)),
        "mae": float(mean_absolute_error(target, pred)),
        "r2": float(r2_score(target, pred)) if len(target) >= 2 else float("nan"),
        "pearson": _pearson(pred, target) if len(target) >= 2 else float("nan"),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Survival
# ---------------------------------------------------------------------------------------------------------------------


def _prepare_time_event(time, event) -> tuple[np.ndarray, np.ndarray]:
    time = _as_numpy(time, "time")
    if event is None and time.ndim == 2 and time.shape[1] == 2:
        time, event = time[:, 0], time[:, 1]
    time = time.reshape(-1)
    event = np.ones_like(time) if event is None else _as_numpy(event, "event").reshape(-1)
    if len(time) != len(event):
        raise ValueError(f"time ({len(time)}) and event ({len(event)}) must have equal length")
    if not np.isin(event, (0, 1)).all():
        raise ValueError("event must be boolean or 0/1 (1 = event observed, 0 = censored)")
    if not np.isfinite(time).all():
        raise ValueError("time must be finite")
    return time, event.astype(bool)


def prepare_survival(risk, time, event=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``risk``, ``time`` as float ``(N,)`` and ``event`` as bool ``(N,)`` (all events when ``None``).

    ``time`` may also be ``(N, 2)`` holding ``(time, event)`` columns with ``event=None`` (the layout a ``Trainer``
    passes as ``label_ids`` for a survival head).
    """
    risk = _as_numpy(risk, "risk").reshape(-1)
    time, event = _prepare_time_event(time, event)
    if len(risk) != len(time):
        raise ValueError(f"risk ({len(risk)}) and time ({len(time)}) must have equal length")
    if not np.isfinite(risk).all():
        raise ValueError("risk must be finite")
    return risk, time, event


def _ones(n: int) -> np.ndarray:
    return np.ones((1, n), dtype=np.float64)


def concordance_counts(
    time: np.ndarray, risk: np.ndarray, event: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted concordant, risk-tied and admissible pair counts, each ``(B,)`` for ``weights`` ``(B, N)``.

    A pair ``(i, j)`` is admissible when ``i`` has an event and ``T_i < T_j``, or ``T_i == T_j`` and ``j`` is
    censored (lifelines' and Harrell's rule: tied event times are not comparable, an event before a censoring at the
    same time is). It is concordant when ``risk_i > risk_j`` and tied when ``risk_i == risk_j``; it counts
    ``w_i * w_j``.

    Offline dominance counting, ``O(N log^2 N)`` per weight row: every event is a point at time key ``4 t_i``, every
    sample a query at ``4 t_j - 1`` (event) or ``4 t_j + 1`` (censored), so "points before a query in key order" are
    exactly its admissible partners; a bottom-up merge over that order (block sizes 1, 2, 4, ...) counts, for each
    query in a right block, the weight of the points in the left sibling block with larger / equal risk via
    ``searchsorted`` on ``(block, risk rank)`` keys and prefix sums of the weights.
    """
    n = len(time)
    weights = _ones(n) if weights is None else weights
    _, t_rank = np.unique(time, return_inverse=True)
    _, r_rank = np.unique(risk, return_inverse=True)
    n_risk = int(r_rank.max(initial=0)) + 1
    points = np.flatnonzero(event)
    keys = np.concatenate([4 * t_rank[points], 4 * t_rank + np.where(event, -1, 1)])
    rows = np.concatenate([points, np.arange(n)])
    is_point = np.concatenate([np.ones(len(points), bool), np.zeros(n, bool)])
    order = np.argsort(keys, kind="stable")  # points and queries never share a key
    rows, is_point = rows[order], is_point[order]
    value = r_rank[rows]  # (M,) risk rank of each item in key order
    w_item = weights[:, rows]  # (B, M)
    w_point = np.where(is_point, w_item, 0.0)  # (B, M)
    w_query = np.where(is_point, 0.0, w_item)  # (B, M)

    pairs = (w_query * (np.cumsum(w_point, axis=1) - w_point)).sum(1)  # (B,) points strictly before each query
    concordant = np.zeros(len(weights))
    tied = np.zeros(len(weights))
    m = len(rows)
    pos = np.arange(m)
    size = 1
    while size < m:
        block, left = pos // (2 * size), (pos // size) % 2 == 0
        lp = np.flatnonzero(is_point & left)  # points of left blocks
        rq = np.flatnonzero(~is_point & ~left)  # queries of right blocks
        if len(lp) and len(rq):
            lkeys = block[lp] * n_risk + value[lp]
            o = np.argsort(lkeys, kind="stable")
            lkeys, lp = lkeys[o], lp[o]
            cum = np.concatenate([np.zeros((len(weights), 1)), np.cumsum(w_point[:, lp], axis=1)], axis=1)
            base = block[rq] * n_risk
            eq_lo = np.searchsorted(lkeys, base + value[rq], side="left")
            eq_hi = np.searchsorted(lkeys, base + value[rq], side="right")
            end = np.searchsorted(lkeys, base + n_risk, side="left")
            wq = w_query[:, rq]  # (B, Q)
            concordant += ((cum[:, end] - cum[:, eq_hi]) * wq).sum(1)
            tied += ((cum[:, eq_hi] - cum[:, eq_lo]) * wq).sum(1)
        size *= 2
    return concordant, tied, pairs


def concordance_index(time, risk, event=None) -> float:
    """Harrell's C-index of risk scores: the fraction of admissible pairs ordered correctly, risk ties counting 1/2.

    Admissible pairs: ``i`` had an event and left the study before ``j`` (``T_i < T_j``, or ``T_i == T_j`` with ``j``
    censored); correct: ``risk_i > risk_j``. Identical to ``lifelines.utils.concordance_index(time, -risk, event)``
    (lifelines scores are survival-like, higher = longer). NaN with a warning when no pair is admissible (lifelines
    raises). ``O(N log^2 N)``; ``event=None`` means every sample had an event.
    """
    risk, time, event = prepare_survival(risk, time, event)
    concordant, tied, pairs = concordance_counts(time, risk, event)
    if pairs[0] == 0:
        _warn("C-index undefined: no admissible pair among %d samples (%d events)", len(time), event.sum())
        return float("nan")
    return float((concordant[0] + 0.5 * tied[0]) / pairs[0])


def _grouped_sums(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Column sums of ``(B, N)`` ``values`` over consecutive groups starting at ``starts`` -> ``(B, G)``."""
    return np.add.reduceat(values, starts, axis=1) if values.shape[1] else np.zeros((len(values), 0))


def censoring_survival(
    time: np.ndarray, event: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Kaplan-Meier estimate of the censoring survival ``G(t) = P(C > t)`` ("reverse" KM, censorings as events).

    At each distinct time ``u`` with (weighted) ``Y`` at risk, ``d`` events and ``c`` censorings,
    ``G(u) = prod_{s <= u} (1 - c_s / (Y_s - d_s))``: events at ``u`` are taken to precede censorings at ``u``
    (scikit-survival's ``CensoringDistributionEstimator``). Returns the distinct times ``(U,)`` and ``G`` at them
    ``(B, U)``, right-continuous.
    """
    weights = _ones(len(time)) if weights is None else weights
    unique, starts = np.unique(np.sort(time), return_index=True)
    order = np.argsort(time, kind="stable")
    w = weights[:, order]
    ev = event[order]
    d = _grouped_sums(w * ev, starts)  # (B, U)
    c = _grouped_sums(w * ~ev, starts)  # (B, U)
    at_risk = np.cumsum((d + c)[:, ::-1], axis=1)[:, ::-1]  # (B, U) weight with T >= u
    denom = at_risk - d
    ratio = np.divide(c, denom, out=np.zeros_like(c), where=denom > 0)
    return unique, np.cumprod(1.0 - ratio, axis=1)


def td_auc_counts(
    time: np.ndarray,
    risk: np.ndarray,
    event: np.ndarray,
    times: np.ndarray,
    weights: np.ndarray | None = None,
    censoring: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Weighted cumulative/dynamic AUC at each of ``times``: ``(B, len(times))`` (see :func:`time_dependent_auc`).

    ``censoring``: ``(time, event)`` of the data to estimate ``G`` on (unweighted); default: the evaluated data
    with the same weights.
    """
    weights = _ones(len(time)) if weights is None else weights
    if censoring is None:
        unique, g = censoring_survival(time, event, weights)
    else:
        unique, g = censoring_survival(*censoring)
    # G at each sample's own time, right-continuous, G = 1 before the first censoring-data time
    idx = np.searchsorted(unique, time, side="right") - 1  # (N,)
    g_own = np.where(idx[None, :] >= 0, g[:, np.maximum(idx, 0)], 1.0)  # (B or 1, N)
    ipcw = 1.0 / np.where(g_own > 0, g_own, 1.0)
    ro = np.argsort(risk, kind="stable")
    _, risk_starts = np.unique(risk[ro], return_index=True)
    out = np.full((len(weights), len(times)), np.nan)
    for k, t in enumerate(np.asarray(times, dtype=np.float64)):
        case = (time <= t) & event  # (N,)
        control = time > t  # (N,)
        bad = ((g_own <= 0) & case & (weights > 0)).any(1)  # (B,) a case with G = 0: weight undefined
        a = _grouped_sums((weights * ipcw * case)[:, ro], risk_starts)  # (B, R) weighted cases per risk value
        c = _grouped_sums((weights * control)[:, ro], risk_starts)  # (B, R) weighted controls per risk value
        below = np.cumsum(c, axis=1) - c  # controls with strictly lower risk
        num = (a * (below + 0.5 * c)).sum(1)
        den = a.sum(1) * c.sum(1)
        out[:, k] = np.where((den > 0) & ~bad, num / np.where(den > 0, den, 1.0), np.nan)
    return out


def time_dependent_auc(time, risk, event, times, *, censoring_time=None, censoring_event=None) -> np.ndarray:
    """Cumulative/dynamic time-dependent AUC with inverse-probability-of-censoring weights (Uno et al. 2007;
    Hung & Chiang 2010; scikit-survival's ``cumulative_dynamic_auc``).

    At time ``t``, cases are samples with an event at ``T_i <= t``, controls those still event-free ``T_j > t``;

    ``AUC(t) = sum_{i case} sum_{j control} w_i [1(r_i > r_j) + 1/2 1(r_i == r_j)] / (sum_{i case} w_i * #controls)``

    with ``w_i = 1 / G(T_i)`` and ``G`` the Kaplan-Meier estimate of the censoring survival (:func:`censoring_survival`,
    evaluated right-continuously at ``T_i``), fitted on ``(censoring_time, censoring_event)`` when given (e.g. the
    training split, as scikit-survival's ``survival_train``) and on the evaluated data otherwise. Risk ties count
    1/2 when exactly equal (scikit-survival uses a tolerance of machine epsilon).

    Returns ``(len(times),)``; NaN (with a warning) at times with no case or no control, or with a case where
    ``G(T_i) = 0`` (scikit-survival raises in both cases). Unlike scikit-survival, evaluated times beyond the last
    time of the censoring data are not refused: ``G`` is carried forward from its last value. In
    :func:`.bootstrap.metrics_with_ci` ``G`` is refitted on every resample (the weighted estimate equals the fit on the
    resampled rows) and the evaluation times stay those of the full data.
    """
    risk, time, event = prepare_survival(risk, time, event)
    times = np.atleast_1d(np.asarray(times, dtype=np.float64))
    censoring = None
    if censoring_time is not None:
        censoring = _prepare_time_event(censoring_time, censoring_event)
    auc = td_auc_counts(time, risk, event, times, censoring=censoring)[0]
    if np.isnan(auc).any():
        _warn("time-dependent AUC undefined at t=%s (no case or no control there)", times[np.isnan(auc)].tolist())
    return auc


def auc_time_points(
    time,
    event=None,
    times: Sequence[float] | None = None,
    *,
    quantiles: Sequence[float] = DEFAULT_AUC_QUANTILES,
    min_events: int = 10,
) -> dict[str, float]:
    """Named evaluation times of the time-dependent AUC, ``{metric name: t}``.

    Explicit ``times`` are named ``td_auc_t{t:g}``. Otherwise the ``quantiles`` of the *event* times, named
    ``td_auc_q25`` etc., with NaN times when there are fewer than ``min_events`` events (the names stay, so logged
    metrics keep one layout).
    """
    if times is not None:
        return {f"td_auc_t{float(t):g}": float(t) for t in np.atleast_1d(np.asarray(times, dtype=np.float64))}
    time, event = _prepare_time_event(time, event)
    names = [f"td_auc_q{round(100 * q):d}" for q in quantiles]
    if event.sum() < min_events:
        logger.debug("auc_time_points: %d events < min_events=%d; td-AUC reported as NaN", event.sum(), min_events)
        return dict.fromkeys(names, float("nan"))
    return dict(zip(names, np.quantile(time[event], quantiles).tolist(), strict=True))


def survival_metrics(
    risk, time, event=None, times: Sequence[float] | None = None, *, min_events: int = 10
) -> dict[str, float]:
    """``c_index`` (:func:`concordance_index`) and time-dependent AUCs (:func:`time_dependent_auc`) at the times of
    :func:`auc_time_points`: ``td_auc_q25``, ``td_auc_q50``, ``td_auc_q75`` at the quartiles of the event times
    (NaN with fewer than ``min_events`` events), or ``td_auc_t{t:g}`` at explicit ``times``. ``time`` may be
    ``(N, 2)`` ``(time, event)`` labels with ``event=None``.
    """
    risk, time, event = prepare_survival(risk, time, event)
    named = auc_time_points(time, event, times, min_events=min_events)
    out = {"c_index": concordance_index(time, risk, event)}
    valid = {k: t for k, t in named.items() if not np.isnan(t)}
    auc = dict(zip(valid, time_dependent_auc(time, risk, event, list(valid.values())), strict=True)) if valid else {}
    out.update({k: float(auc.get(k, np.nan)) for k in named})
    return out


# ---------------------------------------------------------------------------------------------------------------------
# One entry point per task
# ---------------------------------------------------------------------------------------------------------------------


def compute_task_metrics(
    task,
    predictions,
    labels,
    *,
    event=None,
    num_labels: int | None = None,
    from_logits: bool = True,
    threshold: float = 0.5,
    times: Sequence[float] | None = None,
) -> dict[str, float]:
    """Point metrics of one task (a :class:`~bioperceiver.tasks.Task` or its name: ``classification``,
    ``multilabel``, ``regression``, ``survival``), e.g. inside a
    ``Trainer``'s ``compute_metrics(eval_pred)``. For ``survival``, ``predictions`` are risks and ``labels`` times
    with ``event`` given, or ``(N, 2)`` ``(time, event)`` labels."""
    from ..tasks import get_task

    return get_task(task).compute_metrics(
        predictions,
        labels,
        event=event,
        num_labels=num_labels,
        from_logits=from_logits,
        threshold=threshold,
        times=times,
    )
