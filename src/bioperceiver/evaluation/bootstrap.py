"""Percentile bootstrap confidence intervals for test-set metrics, over samples or over groups (patients).

Two ways in, drawing identical resamples for the same ``(n, n_resamples, seed, groups)``:

- :func:`bootstrap_ci` / :func:`bootstrap_metrics`: any metric function, evaluated on each resample's rows.
- :func:`metrics_with_ci`: the task metrics of :mod:`.metrics`, evaluated for all resamples at once by weighted
  kernels (a resample is a ``(N,)`` vector of how often each row was drawn; every metric here is a weighted sum or
  a weighted pair count, so the weighted value *is* the value on the resampled rows — the tests check them against
  scikit-learn/lifelines on resampled data). 1000 resamples of a few hundred samples take well under a second.

A resample where a metric is undefined (AUROC of a resample with one class, a C-index without admissible pairs) is
skipped for that metric; how many were used is returned and logged.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from .metrics import (
    _as_numpy,
    auc_time_points,
    concordance_counts,
    prepare_classification,
    prepare_regression,
    prepare_survival,
    quiet_metric_warnings,
    td_auc_counts,
)

logger = logging.getLogger(__name__)

_CHUNK_ELEMENTS = 1 << 21  # resamples x rows held at once by the weighted kernels (16 MiB per float64 array)


@dataclass(frozen=True)
class BootstrapCI:
    """A point estimate with its percentile bootstrap interval. Unpacks as ``point, low, high = ci``.

    Attributes:
        point: the metric on the full data.
        low: the ``alpha/2`` percentile of the resampled metric (NaN when no resample was usable).
        high: the ``1 - alpha/2`` percentile.
        n_used: resamples where the metric was defined (not NaN, no ``ValueError``).
        n_resamples: resamples drawn.
    """

    point: float
    low: float
    high: float
    n_used: int
    n_resamples: int

    def __iter__(self) -> Iterator[float]:
        yield from (self.point, self.low, self.high)


class Resampler:
    """Bootstrap draws with replacement, reproducible from ``seed``: ``n`` rows per resample, or, with ``groups``
    (one id per row, e.g. patient ids), as many groups as there are distinct ids, each bringing all of its rows.

    Resample ``b`` is the ``b``-th draw of ``numpy.random.default_rng(seed)``, so :meth:`indices` and
    :meth:`weights` describe the same resamples and do not depend on chunking.
    """

    def __init__(self, n: int, n_resamples: int = 1000, seed: int = 0, groups=None):
        if n < 1:
            raise ValueError("cannot bootstrap an empty set")
        if n_resamples < 1:
            raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
        self.n, self.n_resamples, self.seed = n, n_resamples, seed
        self.codes = None
        if groups is not None:
            groups = np.asarray(groups).reshape(-1)
            if len(groups) != n:
                raise ValueError(f"groups has {len(groups)} entries for {n} rows; give one group id per row")
            _, self.codes = np.unique(groups, return_inverse=True)  # (N,) group index of each row
            counts = np.bincount(self.codes)
            self.rows_by_group = np.argsort(self.codes, kind="stable")
            self.group_sizes = counts
            self.group_starts = np.cumsum(counts) - counts
        self.n_units = n if self.codes is None else len(self.group_sizes)

    def draws(self) -> Iterator[np.ndarray]:
        """The drawn units (rows or groups) of each resample, ``(n_units,)`` each."""
        rng = np.random.default_rng(self.seed)
        for _ in range(self.n_resamples):
            yield rng.integers(0, self.n_units, size=self.n_units)

    def indices(self) -> Iterator[np.ndarray]:
        """Row indices of each resample (with repeats; a drawn group contributes all of its rows)."""
        for drawn in self.draws():
            if self.codes is None:
                yield drawn
                continue
            sizes = self.group_sizes[drawn]
            offsets = np.repeat(self.group_starts[drawn] - (np.cumsum(sizes) - sizes), sizes)
            yield self.rows_by_group[offsets + np.arange(sizes.sum())]

    def weights(self, chunk: int | None = None) -> Iterator[np.ndarray]:
        """How often each row was drawn, ``(chunk, N)`` float64 blocks covering all resamples in order."""
        chunk = chunk or max(1, min(self.n_resamples, _CHUNK_ELEMENTS // self.n))
        block: list[np.ndarray] = []
        for drawn in self.draws():
            block.append(np.bincount(drawn, minlength=self.n_units))
            if len(block) == chunk:
                yield self._rows(np.stack(block))
                block = []
        if block:
            yield self._rows(np.stack(block))

    def _rows(self, unit_counts: np.ndarray) -> np.ndarray:
        counts = unit_counts if self.codes is None else unit_counts[:, self.codes]
        return counts.astype(np.float64)


def _summarise(name: str, point: float, values: np.ndarray, alpha: float) -> BootstrapCI:
    values = np.asarray(values, dtype=np.float64)
    ok = ~np.isnan(values)
    n_used, n_resamples = int(ok.sum()), len(values)
    if n_used == 0:
        logger.warning("bootstrap %s: undefined in all %d resamples; CI is NaN", name, n_resamples)
        low = high = float("nan")
    else:
        low, high = (float(v) for v in np.quantile(values[ok], [alpha / 2, 1 - alpha / 2]))
        if n_used < n_resamples:
            log = logger.warning if n_used < 0.9 * n_resamples else logger.info
            log("bootstrap %s: %d of %d resamples used (undefined in the rest)", name, n_used, n_resamples)
    return BootstrapCI(float(point), low, high, n_used, n_resamples)


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1) (0.05 for a 95% interval), got {alpha}")


def bootstrap_metrics(
    metric_fn: Callable[..., dict[str, float]],
    *arrays,
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    groups=None,
) -> dict[str, BootstrapCI]:
    """Percentile bootstrap of a function returning a dict of metrics: ``metric_fn(*arrays)`` on the full data
    and on each resample of the rows of ``arrays`` (all indexed along their first axis), one interval per key.

    A resample where the function returns NaN for a key, or raises ``ValueError``/``ZeroDivisionError`` (e.g.
    scikit-learn's AUROC with one class, lifelines without admissible pairs), is skipped for that key (all keys for
    an exception). The full-data call is not protected: an error there is a real error. Warnings raised inside
    resamples are silenced; skipped resamples are counted in ``n_used`` and logged once.
    """
    _check_alpha(alpha)
    if not arrays:
        raise ValueError("give at least one array to resample")
    arrays = tuple(_as_numpy(a, "array", dtype=None) for a in arrays)
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"arrays must share their first dimension, got {[len(a) for a in arrays]}")
    point = metric_fn(*arrays)
    values = {k: np.full(n_resamples, np.nan) for k in point}
    n_errors = 0
    with quiet_metric_warnings(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for b, idx in enumerate(Resampler(n, n_resamples, seed, groups).indices()):
            try:
                out = metric_fn(*(a[idx] for a in arrays))
            except (ValueError, ZeroDivisionError) as err:
                if n_errors == 0:
                    logger.debug("bootstrap: resample %d skipped: %s", b, err)
                n_errors += 1
                continue
            for k in values:
                values[k][b] = out[k]
    return {k: _summarise(k, point[k], values[k], alpha) for k in point}


def bootstrap_ci(
    metric_fn: Callable[..., float],
    *arrays,
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    groups=None,
) -> BootstrapCI:
    """Percentile bootstrap ``(1 - alpha)`` interval of ``metric_fn(*arrays) -> float``.

    Resamples rows with replacement, or whole groups with ``groups`` (one id per row, e.g. patient ids: draw as
    many patients as there are, with replacement, and take all rows of each). Deterministic for a given ``seed``.
    Resamples where the metric is NaN or raises ``ValueError``/``ZeroDivisionError`` are skipped and counted
    (``n_used``). Returns a :class:`BootstrapCI` (unpacks as ``point, low, high``).
    """
    name = getattr(metric_fn, "__name__", "metric")
    out = bootstrap_metrics(
        lambda *a: {name: metric_fn(*a)}, *arrays, n_resamples=n_resamples, alpha=alpha, seed=seed, groups=groups
    )
    return out[name]


# ---------------------------------------------------------------------------------------------------------------------
# Weighted kernels: every function takes row weights ``w`` (B, N) and returns {metric: (B,)}
# ---------------------------------------------------------------------------------------------------------------------


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den``, NaN where ``den == 0``."""
    return np.where(den != 0, num / np.where(den != 0, den, 1.0), np.nan)


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    """Mean over the last axis ignoring NaN; NaN where a row is all NaN (no warning)."""
    ok = ~np.isnan(x)
    return _ratio(np.where(ok, x, 0.0).sum(-1), ok.sum(-1).astype(np.float64))


def _w_ranking(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted AUROC (pairs, score ties 1/2) and average precision (scikit-learn's step-wise definition over
    distinct thresholds) of binary ``y`` (N,) and scores ``p`` (N,)."""
    order = np.argsort(p, kind="stable")
    ps = p[order]
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])  # distinct score groups, ascending
    ws = w[:, order]  # (B, N)
    ys = y[order].astype(bool)
    pos = np.add.reduceat(np.where(ys, ws, 0.0), starts, axis=1)  # (B, G)
    neg = np.add.reduceat(np.where(ys, 0.0, ws), starts, axis=1)  # (B, G)
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    below = np.cumsum(neg, axis=1) - neg  # negatives with a strictly lower score
    auroc = _ratio((pos * (below + 0.5 * neg)).sum(1), n_pos * n_neg)
    tp = np.cumsum(pos[:, ::-1], axis=1)  # thresholds from the highest score down
    fp = np.cumsum(neg[:, ::-1], axis=1)
    precision = np.where(tp + fp > 0, tp / np.where(tp + fp > 0, tp + fp, 1.0), 0.0)
    auprc = _ratio((pos[:, ::-1] * precision).sum(1), n_pos)
    return auroc, auprc


def _w_f1(y: np.ndarray, pred: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted ``2 TP`` and ``2 TP + FP + FN`` of boolean ``y``, ``pred`` (N,)."""
    tp = w @ (y & pred).astype(np.float64)
    wrong = w @ (y != pred).astype(np.float64)
    return 2 * tp, 2 * tp + wrong


def _w_binary(y: np.ndarray, p: np.ndarray, w: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    total = w.sum(1)
    auroc, auprc = _w_ranking(y, p, w)
    yb, pred = y.astype(bool), p > threshold
    f1_num, f1_den = _w_f1(yb, pred, w)
    eps = np.finfo(np.float64).eps  # scikit-learn's log_loss clipping
    nll = np.where(yb, -np.log(np.clip(p, eps, 1 - eps)), -np.log(np.clip(1 - p, eps, 1 - eps)))
    return {
        "auroc": auroc,
        "auprc": auprc,
        "accuracy": (w @ (pred == yb).astype(np.float64)) / total,
        "f1": _ratio(f1_num, f1_den),
        "brier": (w @ (p - y) ** 2) / total,
        "log_loss": (w @ nll) / total,
    }


def _w_multiclass(y: np.ndarray, probs: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    k = probs.shape[1]
    ranking = [_w_ranking((y == c).astype(np.int64), probs[:, c], w) for c in range(k)]
    pred = probs.argmax(1)
    f1 = [_w_f1(y == c, pred == c, w) for c in range(k)]
    accuracy = (w @ (pred == y).astype(np.float64)) / w.sum(1)
    return {
        "auroc": _nanmean_rows(np.stack([r[0] for r in ranking], -1)),
        "auprc": _nanmean_rows(np.stack([r[1] for r in ranking], -1)),
        "accuracy": accuracy,
        "f1_macro": _nanmean_rows(np.stack([_ratio(num, den) for num, den in f1], -1)),
        "f1_micro": accuracy,  # single-label: micro F1 == accuracy
    }


def _w_multilabel(y: np.ndarray, probs: np.ndarray, w: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    k = probs.shape[1]
    ranking = [_w_ranking(y[:, c], probs[:, c], w) for c in range(k)]
    auroc_micro, auprc_micro = _w_ranking(y.ravel(), probs.ravel(), np.repeat(w, k, axis=1))
    yb, pred = y.astype(bool), probs > threshold
    f1 = [_w_f1(yb[:, c], pred[:, c], w) for c in range(k)]
    return {
        "auroc": _nanmean_rows(np.stack([r[0] for r in ranking], -1)),
        "auroc_micro": auroc_micro,
        "auprc": _nanmean_rows(np.stack([r[1] for r in ranking], -1)),
        "auprc_micro": auprc_micro,
        "accuracy": (w @ (pred == yb).all(1).astype(np.float64)) / w.sum(1),
        "f1_macro": _nanmean_rows(np.stack([_ratio(num, den) for num, den in f1], -1)),
        "f1_micro": _ratio(sum(num for num, _ in f1), sum(den for _, den in f1)),
    }


def _w_regression(pred: np.ndarray, target: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    total = w.sum(1)[:, None]  # (B, 1)
    err = pred - target  # (N, K)
    mse = (w @ err**2) / total  # (B, K)
    mae = (w @ np.abs(err)) / total
    r2, pearson = [], []
    for k in range(target.shape[1]):
        dt = target[None, :, k] - ((w @ target[:, k]) / total[:, 0])[:, None]  # (B, N)
        dp = pred[None, :, k] - ((w @ pred[:, k]) / total[:, 0])[:, None]
        ss_tot = (w * dt**2).sum(1)
        ss_pp = (w * dp**2).sum(1)
        ss_res = w @ err[:, k] ** 2
        # scikit-learn's force_finite: a constant target scores 1 if predicted exactly, else 0
        r2.append(np.where(ss_tot > 0, 1 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0), (ss_res == 0).astype(float)))
        pearson.append(_ratio((w * dt * dp).sum(1), np.sqrt(ss_tot * ss_pp)))
    return {
        "mse": mse.mean(1),
        "rmse": np.sqrt(mse).mean(1),
        "mae": mae.mean(1),
        "r2": np.stack(r2, -1).mean(1),
        "pearson": np.stack(pearson, -1).mean(1),
    }


def _w_survival(
    risk: np.ndarray, time: np.ndarray, event: np.ndarray, named: dict[str, float], w: np.ndarray
) -> dict[str, np.ndarray]:
    concordant, tied, pairs = concordance_counts(time, risk, event, w)
    out = {"c_index": _ratio(concordant + 0.5 * tied, pairs)}
    valid = [k for k, t in named.items() if not np.isnan(t)]
    auc = td_auc_counts(time, risk, event, np.array([named[k] for k in valid]), w) if valid else None
    for k in named:
        out[k] = auc[:, valid.index(k)] if k in valid else np.full(len(w), np.nan)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Task metrics with intervals
# ---------------------------------------------------------------------------------------------------------------------


# the weighted kernel of each classification kind that prepare_classification returns
CLASSIFICATION_KERNELS = {
    "binary": lambda y, probs, threshold: partial(_w_binary, y, probs, threshold=threshold),
    "multiclass": lambda y, probs, threshold: partial(_w_multiclass, y, probs),
    "multilabel": lambda y, probs, threshold: partial(_w_multilabel, y, probs, threshold=threshold),
}


def classification_kernel(task, problem_type, predictions, labels, num_labels, from_logits, threshold):
    """``(n, point, kernel, extra)`` of a classification task (see :meth:`bioperceiver.tasks.Task.bootstrap_kernel`)."""
    kind, probs, y = prepare_classification(predictions, labels, problem_type, num_labels, from_logits)
    point = task.compute_metrics(
        predictions, labels, num_labels=num_labels, from_logits=from_logits, threshold=threshold
    )
    return len(y), point, CLASSIFICATION_KERNELS[kind](y, probs, threshold), {}


def regression_kernel(task, predictions, labels):
    pred, target = prepare_regression(predictions, labels)
    return len(target), task.compute_metrics(predictions, labels), partial(_w_regression, pred, target), {}


def survival_kernel(task, predictions, labels, event, times):
    risk, time, ev = prepare_survival(predictions, labels, event)
    named = auc_time_points(time, ev, times)
    point = task.compute_metrics(risk, time, event=ev, times=times)
    extra = {"n_events": int(ev.sum()), **{f"{k}_time": t for k, t in named.items()}}
    return len(time), point, partial(_w_survival, risk, time, ev, named), extra


def metrics_with_ci(
    task,
    predictions,
    labels,
    *,
    event=None,
    groups=None,
    num_labels: int | None = None,
    from_logits: bool = True,
    threshold: float = 0.5,
    times: Sequence[float] | None = None,
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, float]:
    """Every metric of ``task`` (see :func:`.metrics.compute_task_metrics`) with a percentile bootstrap interval,
    as one flat dict for ``all_results.json`` and model cards::

        {"auroc": 0.81, "auroc_ci_low": 0.74, "auroc_ci_high": 0.87, "auroc_ci_n_used": 1000, ...,
         "n": 200, "n_resamples": 1000, "ci_level": 0.95}

    plus ``n_groups`` with ``groups`` (resampled as whole groups, e.g. patients) and, for ``survival``,
    ``n_events`` and ``td_auc_*_time`` (the time each td-AUC is evaluated at: fixed from the full data, so every
    resample estimates the same quantity). Point estimates are the scikit-learn / :mod:`.metrics` values on all
    rows; resamples are evaluated by the weighted kernels above and reproduce :func:`bootstrap_ci` with the same
    ``seed`` and ``groups``. ``*_ci_n_used`` counts the resamples where a metric was defined.

    Args:
        task: a :class:`~bioperceiver.tasks.Task` or its name (``classification``, ``multilabel``,
            ``regression``, ``survival``); the task picks the metrics and their weighted kernels.
        predictions: logits (or probabilities with ``from_logits=False``), regression outputs, or risk scores.
        labels: class ids, ``(N, K)`` 0/1 labels, targets, or survival times (with ``event``; or ``(N, 2)``
            ``(time, event)`` labels).
        groups: optional ``(N,)`` group ids (patients) for a cluster bootstrap.
        times: survival only: explicit td-AUC times (default: quartiles of the event times).
    """
    from ..tasks import get_task

    _check_alpha(alpha)
    n, point, kernel, extra = get_task(task).bootstrap_kernel(
        predictions,
        labels,
        event=event,
        num_labels=num_labels,
        from_logits=from_logits,
        threshold=threshold,
        times=times,
    )
    resampler = Resampler(n, n_resamples, seed, groups)
    chunks = [kernel(w) for w in resampler.weights()]
    out: dict[str, float] = {}
    for name, value in point.items():
        ci = _summarise(name, value, np.concatenate([c[name] for c in chunks]), alpha)
        out.update(
            {name: ci.point, f"{name}_ci_low": ci.low, f"{name}_ci_high": ci.high, f"{name}_ci_n_used": ci.n_used}
        )
    out.update({"n": n, "n_resamples": n_resamples, "ci_level": 1 - alpha})
    if groups is not None:
        out["n_groups"] = resampler.n_units
    out.update(extra)
    return out
