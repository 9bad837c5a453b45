"""Calibration: temperature scaling, expected calibration error and reliability diagrams.

* **Temperature scaling** (:func:`fit_temperature`): one temperature (or one per label for multilabel) minimising
  the validation negative log-likelihood. The NLL is convex in the inverse temperature, so a bounded Brent search
  (``scipy.optimize.minimize_scalar``) finds the global optimum. The task supplies the likelihood
  (:meth:`bioperceiver.tasks.ProbabilisticTask.nll`).
* **Calibration error** (:func:`expected_calibration_error`): equal-width bins ``(lo, hi]`` (a probability of
  exactly 0 falls into the first bin); ``"top_label"`` ECE (Guo et al., 2017: confidence = max probability,
  accuracy of the argmax), ``"binary"`` (probability of the positive class against the 0/1 label) and
  ``"classwise"`` (Kull et al., 2019: the mean over classes of the one-vs-rest binary ECE; multilabel: over
  labels, unknown ``-1`` entries left out). :func:`plot_reliability_diagram` draws before/after in one PNG.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

from ..tasks import Task, resolve_task
from .sampling import _valid_rows

logger = logging.getLogger(__name__)

ECE_MODES = ("top_label", "binary", "classwise")


def to_probabilities(
    outputs: np.ndarray, task: str | Task, temperature: float | np.ndarray | None = None
) -> np.ndarray:
    """Logits -> probabilities: softmax over the last axis (multiclass) or a sigmoid per entry (binary with one
    logit, multilabel), after dividing by ``temperature`` (scalar, or ``(C,)`` per label)."""
    z = np.asarray(outputs, dtype=np.float64)
    return resolve_task(task, z).probabilities(z, temperature)


def as_class_probs(probs: np.ndarray) -> np.ndarray:
    """``(N,)`` or ``(N, 1)`` positive-class probabilities -> ``(N, 2)``; ``(N, C)`` unchanged."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1 or p.shape[1] == 1:
        p = p.reshape(-1)
        return np.stack([1.0 - p, p], axis=1)
    return p


def _prepare_classification(logits, labels, task) -> tuple[Task, np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if z.ndim == 1:
        z = z[:, None]
    kind = resolve_task(task, z)
    if not kind.has_probabilities:
        raise ValueError(f"temperature scaling needs a classification task, got {task!r}")
    z, y = kind.prepare_calibration(z, y)
    return kind, z, y


def _nll(kind: Task, z: np.ndarray, y: np.ndarray, beta: float | np.ndarray = 1.0) -> float:
    """Mean negative log-likelihood of ``beta * logits`` (``beta`` = 1 / temperature)."""
    return kind.nll(z, y, beta)


def negative_log_likelihood(
    logits, labels, task: str | Task = "classification", temperature: float | np.ndarray = 1.0
) -> float:
    """Mean NLL of ``logits / temperature`` (multilabel: over the observed entries, ``-1`` = unknown)."""
    kind, z, y = _prepare_classification(logits, labels, task)
    return _nll(kind, z, y, 1.0 / np.asarray(temperature, dtype=np.float64))


@dataclass
class TemperatureScaler:
    """A fitted temperature: ``temperature`` (float, or ``(C,)`` per label), the validation NLL before (T = 1)
    and after, the number of rows fitted on and whether the optimum hit the search bounds."""

    task: str
    temperature: float | np.ndarray
    nll_before: float
    nll_after: float
    n: int
    at_bound: bool = False

    def transform(self, logits: np.ndarray) -> np.ndarray:
        """Scaled logits ``logits / T``."""
        return np.asarray(logits, dtype=np.float64) / np.asarray(self.temperature, dtype=np.float64)

    def predict_proba(self, logits: np.ndarray) -> np.ndarray:
        return to_probabilities(logits, self.task, self.temperature)

    def to_dict(self) -> dict[str, Any]:
        t = self.temperature
        return {
            "temperature": t.tolist() if isinstance(t, np.ndarray) else float(t),
            "nll_before": self.nll_before,
            "nll_after": self.nll_after,
            "n": self.n,
            "at_bound": self.at_bound,
        }


def _fit_beta(kind: Task, z: np.ndarray, y: np.ndarray, bounds: tuple[float, float]) -> tuple[float, bool]:
    lo, hi = 1.0 / bounds[1], 1.0 / bounds[0]
    res = minimize_scalar(
        lambda b: _nll(kind, z, y, b), bounds=(lo, hi), method="bounded", options={"xatol": 1e-10, "maxiter": 500}
    )
    beta = float(res.x)
    at_bound = min(beta - lo, hi - beta) < 1e-6 * hi
    return beta, at_bound


def fit_temperature(
    logits: np.ndarray,
    labels: np.ndarray,
    task: str | Task = "classification",
    *,
    per_label: bool = False,
    bounds: tuple[float, float] = (0.05, 20.0),
) -> TemperatureScaler:
    """Temperature scaling (Guo et al., 2017): the ``T`` in ``bounds`` minimising the mean validation NLL of
    ``logits / T``. The NLL is convex in ``1 / T``; a bounded Brent search over ``1 / T`` finds the optimum.

    ``logits``: ``(N, C)`` multiclass (``labels`` ``(N,)`` class indices; binary as two logits), ``(N,)``/``(N, 1)``
    binary (``labels`` 0/1), ``(N, C)`` multilabel (``labels`` ``(N, C)`` 0/1, ``-1`` unknown); NaN rows are
    skipped. ``per_label`` (multilabel): one temperature per label, ``temperature`` then ``(C,)``."""
    kind, z, y = _prepare_classification(logits, labels, task)
    if len(z) == 0:
        raise ValueError("no labelled rows with predictions to fit a temperature on")
    before = _nll(kind, z, y, 1.0)
    if per_label and hasattr(kind, "per_label_tasks"):  # multilabel: one binary temperature per label
        temps, hits = [], []
        for k in range(z.shape[1]):
            obs = np.isfinite(y[:, k]) & (y[:, k] >= 0)
            if not obs.any():
                temps.append(1.0)
                continue
            beta, hit = _fit_beta(kind.per_label_tasks(), z[obs, k], y[obs, k], bounds)
            temps.append(1.0 / beta)
            hits.append(hit)
        temperature: float | np.ndarray = np.asarray(temps)
        at_bound = any(hits)
    else:
        beta, at_bound = _fit_beta(kind, z, y, bounds)
        temperature = 1.0 / beta
    after = _nll(kind, z, y, 1.0 / np.asarray(temperature))
    if at_bound:
        logger.warning("temperature scaling: the optimum reached the bounds %s (T = %s)", bounds, temperature)
    return TemperatureScaler(kind.kind, temperature, before, after, len(z), at_bound)


# ---------------------------------------------------------------------------------------------------------------
# Calibration error and reliability diagrams
# ---------------------------------------------------------------------------------------------------------------


def _bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bins ``(lo, hi]`` over ``[0, 1]`` (0 goes into the first bin)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.searchsorted(edges[1:-1], p, side="left")


def _binary_bins(p: np.ndarray, hit: np.ndarray, n_bins: int) -> dict[str, np.ndarray]:
    idx = _bin_index(p, n_bins)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(idx, weights=p, minlength=n_bins) / count
        acc = np.bincount(idx, weights=hit.astype(np.float64), minlength=n_bins) / count
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return {"lower": edges[:-1], "upper": edges[1:], "confidence": conf, "accuracy": acc, "count": count}


def _ece_from_bins(b: dict[str, np.ndarray]) -> float:
    n = b["count"].sum()
    if n == 0:
        return float("nan")
    nz = b["count"] > 0
    return float(np.sum(b["count"][nz] / n * np.abs(b["accuracy"][nz] - b["confidence"][nz])))


def _check_probs(p: np.ndarray) -> None:
    if p.size and (np.nanmin(p) < 0 or np.nanmax(p) > 1):
        raise ValueError("probabilities must lie in [0, 1] (pass probabilities, not logits)")


def reliability_bins(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = 15, mode: str = "top_label"
) -> dict[str, np.ndarray] | list[dict[str, np.ndarray]]:
    """Per-bin ``lower``, ``upper``, mean ``confidence``, ``accuracy`` (observed frequency) and ``count``
    (``(n_bins,)`` each; NaN for empty bins). ``mode``: ``"top_label"`` (``probs`` ``(N, C)`` or ``(N,)``
    positive-class probabilities; ``labels`` class indices), ``"binary"`` (positive-class probabilities — column
    1 of a two-column ``probs`` — against 0/1 labels) or ``"classwise"`` (a list: one binary binning per class;
    multilabel ``labels`` ``(N, C)`` with ``-1`` unknown). Rows with a NaN probability or a negative/NaN label are
    left out."""
    if mode not in ECE_MODES:
        raise ValueError(f"mode {mode!r}; choose one of {ECE_MODES}")
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    _check_probs(p)
    if mode == "classwise":
        if y.ndim == 2:  # multilabel
            p = p.reshape(y.shape)
            out = []
            for k in range(p.shape[1]):
                ok = np.isfinite(p[:, k]) & np.isfinite(y[:, k]) & (y[:, k] >= 0)
                out.append(_binary_bins(p[ok, k], y[ok, k] == 1, n_bins))
            return out
        p = as_class_probs(p)
        ok = _valid_rows(p) & np.isfinite(y) & (y >= 0)
        p, y = p[ok], y[ok]
        return [_binary_bins(p[:, k], y == k, n_bins) for k in range(p.shape[1])]
    if y.ndim == 2 and y.shape[1] > 1:
        raise ValueError(f"mode {mode!r} needs one label per row; use mode='classwise' for multilabel")
    y = y.reshape(-1)
    if mode == "binary":
        q = p if p.ndim == 1 else (p[:, 0] if p.shape[1] == 1 else p[:, 1] if p.shape[1] == 2 else None)
        if q is None:
            raise ValueError("mode 'binary' needs (N,) or two-column probabilities")
        ok = np.isfinite(q) & np.isfinite(y) & (y >= 0)
        return _binary_bins(q[ok], y[ok] == 1, n_bins)
    p = as_class_probs(p)
    ok = _valid_rows(p) & np.isfinite(y) & (y >= 0)
    p, y = p[ok], y[ok]
    return _binary_bins(p.max(axis=1), p.argmax(axis=1) == y, n_bins)


def expected_calibration_error(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = 15, mode: str = "top_label"
) -> float:
    """ECE :math:`= \\sum_b \\frac{|B_b|}{n} |\\mathrm{acc}(B_b) - \\mathrm{conf}(B_b)|` over ``n_bins``
    equal-width bins ``(lo, hi]``; modes as in :func:`reliability_bins` (``"classwise"``: the mean of the
    per-class binary ECEs over classes with at least one row)."""
    bins = reliability_bins(probs, labels, n_bins, mode)
    if isinstance(bins, list):
        values = [_ece_from_bins(b) for b in bins]
        values = [v for v in values if np.isfinite(v)]
        return float(np.mean(values)) if values else float("nan")
    return _ece_from_bins(bins)


def plot_reliability_diagram(
    labels: np.ndarray,
    probs_before: np.ndarray,
    path: str | Path,
    probs_after: np.ndarray | None = None,
    *,
    n_bins: int = 15,
    mode: str = "top_label",
    title: str | None = None,
    names: tuple[str, str] = ("before", "after temperature scaling"),
) -> Path:
    """Reliability diagram PNG: observed accuracy against mean confidence per equal-width bin, before (and after)
    calibration, with the ECE in the legend and the bin counts below. ``mode="classwise"`` pools the per-class
    one-vs-rest bins (counts add up; accuracy/confidence are count-weighted)."""
    from ..evaluation.plots import _plt

    path = Path(path)
    plt = _plt()
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.5, 6.5), height_ratios=[3, 1], sharex=True)
    width = 1.0 / n_bins
    series = [(names[0], probs_before, "tab:red")]
    if probs_after is not None:
        series.append((names[1], probs_after, "tab:blue"))
    for i, (name, probs, color) in enumerate(series):
        bins = reliability_bins(probs, labels, n_bins, mode)
        if isinstance(bins, list):
            count = np.sum([b["count"] for b in bins], axis=0)
            with np.errstate(invalid="ignore", divide="ignore"):
                conf = np.nansum([b["confidence"] * b["count"] for b in bins], axis=0) / count
                acc = np.nansum([b["accuracy"] * b["count"] for b in bins], axis=0) / count
            bins = {"lower": bins[0]["lower"], "count": count, "confidence": conf, "accuracy": acc}
        ece = expected_calibration_error(probs, labels, n_bins, mode)
        nz = bins["count"] > 0
        ax.plot(bins["confidence"][nz], bins["accuracy"][nz], "o-", ms=4, color=color, label=f"{name} (ECE {ece:.3f})")
        offset = (i - (len(series) - 1) / 2) * width / len(series)
        hist.bar(bins["lower"] + width / 2 + offset, bins["count"], width=width / len(series), color=color, alpha=0.7)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    xlabel = "confidence (top-label probability)" if mode == "top_label" else "predicted probability"
    ax.set(
        ylabel="observed accuracy" if mode == "top_label" else "observed frequency",
        xlim=(0, 1),
        ylim=(0, 1),
        title=title or f"reliability diagram ({n_bins} equal-width bins)",
    )
    ax.legend(fontsize=8, loc="upper left")
    hist.set(xlabel=xlabel, ylabel="samples")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
