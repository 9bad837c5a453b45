"""Conformal prediction and calibration for multilabel and survival tasks (numpy/scipy only).

Everything works on numpy arrays of model outputs for held-out rows, the same way the classification and regression
conformal methods of :mod:`bioperceiver.uncertainty` do; each fitted object has ``to_dict()`` / ``from_dict()``
(plain JSON types) so it can be saved in a finetuned model's folder and reloaded to predict for new patients.

* **Multilabel** (:class:`ConformalMultilabel`): per label ``j`` a split-conformal threshold ``qhat_j`` on the LAC
  score :math:`1 - p_{\\text{true}}` (with :math:`p_1 = p`, :math:`p_0 = 1 - p` and ``p`` the sigmoid probability
  of the label), giving a set :math:`\\subseteq \\{0, 1\\}` per label and patient.

  - ``joint=False``: marginal per-label coverage :math:`P(Y_j \\in C_j(X)) \\ge 1 - \\alpha` for every label.
  - ``joint="bonferroni"``: the same at :math:`\\alpha / L`, so by the union bound
    :math:`P(Y_j \\in C_j(X)\\ \\forall j) \\ge 1 - \\alpha`.
  - ``joint="max"`` (or ``True``): one threshold on the row's largest label score (calibrated on the rows with
    every label known): :math:`P(Y_j \\in C_j(X)\\ \\forall j) \\ge 1 - \\alpha`, usually tighter than Bonferroni.

* **Survival, calibrated risk groups** (:class:`RiskGroups`): cut points at the ``1/k, ..., (k-1)/k`` quantiles of
  the validation risk scores, a Kaplan-Meier curve per group on validation that serves as the group's predicted
  survival ``S_g(t)``; on test: the group of every patient, ``S_g(t)`` at horizons, the observed test KM per group,
  the calibration error ``|S_g(t) - KM_test,g(t)|`` per group and horizon and the log-rank test across test groups.
  :func:`plot_risk_groups` draws validation-predicted against test-observed curves.

* **Survival, conformalised lower prediction bounds** (:class:`ConformalSurvival`, Candès, Lei & Ren 2023,
  "Conformalized survival analysis", JRSS-B 85(1)): a lower bound ``L(x)`` on the survival time ``T`` from a
  predicted survival time ``m(x)`` (e.g. the predicted median) or a risk score ``r(x)`` (``m = exp(-r)``), with
  :math:`P(T \\ge L(X)) \\ge 1 - \\alpha` over calibration and test data. See the class docstring for what exactly is
  guaranteed and under which censoring assumption.

Missing values: NaN predictions are left out of calibration and get an empty set (multilabel), group ``-1``
(risk groups) or a NaN bound (survival); multilabel labels that are NaN (or negative, the ``-1`` "unknown" code) are
ignored for that label.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import chi2

logger = logging.getLogger(__name__)

JOINT_METHODS = ("bonferroni", "max")
SURVIVAL_SCORES = ("log", "difference")
_EPS = 1e-9  # slack of the ceil in the conformal rank, as bioperceiver.uncertainty.conformal_quantile


# ---------------------------------------------------------------------------------------------------------------
# Small shared pieces
# ---------------------------------------------------------------------------------------------------------------


def _check_alpha(alpha: float) -> float:
    if not isinstance(alpha, (int, float, np.floating)) or not 0 < alpha < 1:
        raise ValueError(f"alpha must be a number in (0, 1) (e.g. 0.1 for 90% coverage), got {alpha!r}")
    return float(alpha)


def conformal_rank(n: int, alpha: float) -> int:
    """The rank :math:`k = \\lceil (n + 1)(1 - \\alpha) \\rceil` of the split-conformal threshold among ``n`` sorted
    calibration scores; ``k > n`` means too few calibration rows for ``alpha``."""
    return math.ceil((n + 1) * (1 - alpha) - _EPS)


def min_calibration_size(alpha: float) -> int:
    """Smallest ``n`` with :func:`conformal_rank` ``<= n``, i.e. a finite threshold: ``ceil((1 - alpha) / alpha)``."""
    alpha = _check_alpha(alpha)
    n = max(math.ceil((1 - alpha) / alpha - _EPS), 1)
    while conformal_rank(n, alpha) > n:  # guards the float edge cases of the closed form
        n += 1
    return n


def _as_1d(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise ValueError(f"{name} must be one value per patient, shape (N,) or (N, 1); got shape {a.shape}")
    return a


def _same_length(**arrays: np.ndarray) -> None:
    lengths = {k: len(v) for k, v in arrays.items() if v is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"arrays must have one row per patient, got lengths {lengths}; pass rows in the same order")


def _survival_arrays(time: Any, event: Any) -> tuple[np.ndarray, np.ndarray]:
    """``time`` ``(N,)`` float, ``event`` ``(N,)`` float in {0, 1} (NaN kept; filtered by the caller)."""
    t = _as_1d(time, "time")
    e = _as_1d(event, "event")
    _same_length(time=t, event=e)
    ok = np.isfinite(t) & np.isfinite(e)
    if np.any(t[ok] < 0):
        raise ValueError("survival times must be >= 0; check the time column (negative follow-up?)")
    if not np.isin(e[ok], (0.0, 1.0)).all():
        raise ValueError("event must be 0 (censored) or 1 (event observed); check the event column")
    return t, e


# ---------------------------------------------------------------------------------------------------------------
# Multilabel: per-label split-conformal sets
# ---------------------------------------------------------------------------------------------------------------


def _multilabel_arrays(probs: Any, labels: Any | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """``probs`` ``(N, L)`` in [0, 1] (NaN = no prediction); ``labels`` ``(N, L)`` as float with NaN where unknown
    (NaN or negative in the input), otherwise exactly 0 or 1."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be (N, L) sigmoid probabilities, one column per label; got shape {p.shape}")
    fin = np.isfinite(p)
    if np.any((p[fin] < 0) | (p[fin] > 1)):
        raise ValueError("probs must be probabilities in [0, 1]; apply a sigmoid to the logits first")
    if labels is None:
        return p, None
    y = np.array(labels, dtype=np.float64)  # copy: unknowns are rewritten below
    if y.shape != p.shape:
        raise ValueError(f"labels shape {y.shape} != probs shape {p.shape}; pass one 0/1 column per label")
    y[~np.isfinite(y) | (y < 0)] = np.nan
    known = np.isfinite(y)
    if not np.isin(y[known], (0.0, 1.0)).all():
        raise ValueError("multilabel labels must be 0 or 1 (NaN or -1 for unknown)")
    return p, y


def _label_scores(p: np.ndarray) -> np.ndarray:
    """LAC score of both candidate values ``(N, L, 2)``: ``[..., 0] = p`` (:math:`1 - p_0`), ``[..., 1] = 1 - p``.
    Calibration and prediction both go through here, so a calibration score and a test score compare bit for bit."""
    return np.stack([p, 1.0 - p], axis=-1)


def _true_scores(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Score of the true value ``(N, L)``; NaN where the label or the prediction is missing."""
    s = _label_scores(p)
    idx = np.where(np.isfinite(y), y, 0).astype(np.int64)
    out = np.take_along_axis(s, idx[..., None], axis=-1)[..., 0]
    return np.where(np.isfinite(y) & np.isfinite(p), out, np.nan)


def _columnwise_quantile(scores: np.ndarray, alphas: np.ndarray, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per column of ``scores`` ``(N, L)`` (NaN = not calibrated), the :func:`conformal_rank`-th smallest finite
    score at that column's ``alphas`` ``(L,)`` -> thresholds ``(L,)`` and calibration counts ``(L,)``."""
    known = np.isfinite(scores)
    n = known.sum(axis=0)  # (L,)
    k = np.array([conformal_rank(int(nj), float(a)) for nj, a in zip(n, alphas, strict=True)], dtype=np.int64)
    short = np.flatnonzero(k > n)
    if short.size:
        detail = ", ".join(
            f"{names[j]!r}: {n[j]} rows, needs {min_calibration_size(float(alphas[j]))}" for j in short[:5]
        )
        raise ValueError(
            f"too few labelled calibration rows for alpha={alphas[short[0]]:.4g} ({detail}); use more calibration "
            "rows, a larger alpha or drop the rare labels (with joint='bonferroni' alpha is divided by the labels)"
        )
    ranked = np.sort(np.where(known, scores, np.inf), axis=0)  # (N, L), unknowns last
    return ranked[k - 1, np.arange(scores.shape[1])], n


def multilabel_coverage_summary(sets: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Coverage of per-label sets ``sets`` ``(N, L, 2)`` (``[..., c]``: value ``c`` in the set) against 0/1
    ``labels`` ``(N, L)`` (NaN or negative = unknown, left out).

    Returns ``per_label_coverage`` ``[L]`` (share of labelled entries whose value is in its set), ``coverage`` (their
    mean over labels), ``joint_coverage`` (share of rows with at least one known label whose known labels are all
    covered), ``mean_set_size`` (mean over labelled entries, 0..2), ``both_rate`` (share of labelled entries with the
    set {0, 1}: "don't know"), ``singleton_rate``, ``empty_rate``, ``n_per_label`` ``[L]`` and ``n_rows``.
    """
    sets = np.asarray(sets, dtype=bool)
    y = np.array(labels, dtype=np.float64)
    if sets.ndim != 3 or sets.shape[-1] != 2 or sets.shape[:2] != y.shape:
        raise ValueError(f"sets must be (N, L, 2) and labels (N, L); got {sets.shape} and {y.shape}")
    y[~np.isfinite(y) | (y < 0)] = np.nan
    known = np.isfinite(y)  # (N, L)
    idx = np.where(known, y, 0).astype(np.int64)
    hit = np.take_along_axis(sets, idx[..., None], axis=-1)[..., 0] & known  # (N, L)
    size = sets.sum(axis=-1)  # (N, L)
    n_label = known.sum(axis=0)  # (L,)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_label = hit.sum(axis=0) / n_label
    rows = known.any(axis=1)
    n_entries = int(known.sum())

    def share(mask: np.ndarray) -> float:
        return float((mask & known).sum() / n_entries) if n_entries else float("nan")

    return {
        "per_label_coverage": [float(c) for c in per_label],
        "coverage": float(np.nanmean(per_label)) if (n_label > 0).any() else float("nan"),
        "joint_coverage": float((hit | ~known)[rows].all(axis=1).mean()) if rows.any() else float("nan"),
        "mean_set_size": float(size[known].mean()) if n_entries else float("nan"),
        "both_rate": share(size == 2),
        "singleton_rate": share(size == 1),
        "empty_rate": share(size == 0),
        "n_per_label": [int(n) for n in n_label],
        "n_rows": int(rows.sum()),
    }


@dataclass
class ConformalMultilabel:
    """Split-conformal sets per label for a multilabel model (LAC score :math:`1 - p_{\\text{true}}`).

    Build with :meth:`fit` on held-out (validation) rows. ``qhat`` ``(L,)``: the threshold of every label (one value
    repeated for ``joint="max"``); value ``c`` of label ``j`` is in the set when its score ``<= qhat_j``, i.e.
    ``1 in C_j`` iff ``p_j >= 1 - qhat_j`` and ``0 in C_j`` iff ``p_j <= qhat_j``. ``alpha_per_label``: the level
    each threshold was calibrated at (``alpha``, or ``alpha / L`` for Bonferroni). ``n_calibration`` ``(L,)``:
    labelled rows per label used.

    Guarantee (exchangeable calibration and test rows, any model): ``joint=None`` ->
    :math:`P(Y_j \\in C_j(X)) \\ge 1 - \\alpha` for each label ``j`` separately (over the rows where label ``j`` is
    known; if whether a label is missing depends on the patient, the guarantee is for patients like those with it
    known); ``"bonferroni"``/``"max"`` -> all labels covered at once with probability ``>= 1 - alpha``.
    """

    alpha: float
    qhat: np.ndarray
    n_calibration: np.ndarray
    joint: str | None = None
    label_names: tuple[str, ...] | None = None

    @property
    def num_labels(self) -> int:
        return len(self.qhat)

    @property
    def alpha_per_label(self) -> float:
        return self.alpha / self.num_labels if self.joint == "bonferroni" else self.alpha

    @classmethod
    def fit(
        cls,
        probs: np.ndarray,
        labels: np.ndarray,
        alpha: float = 0.1,
        *,
        joint: bool | str | None = None,
        label_names: Sequence[str] | None = None,
    ) -> ConformalMultilabel:
        """Calibrate on validation sigmoid probabilities ``probs`` ``(N, L)`` and 0/1 ``labels`` ``(N, L)`` (NaN or
        -1 = unknown: that entry is ignored). ``joint``: ``None``/``False`` per-label coverage, ``"bonferroni"`` or
        ``"max"`` (``True``) all-labels coverage. Raises ``ValueError`` when a label has fewer labelled rows than
        :func:`min_calibration_size` needs for its level (every set would be {0, 1})."""
        alpha = _check_alpha(alpha)
        joint = _joint_method(joint)
        p, y = _multilabel_arrays(probs, labels)
        n_labels = p.shape[1]
        names = _label_names(label_names, n_labels)
        s = _true_scores(p, y)  # (N, L)
        if joint == "max":
            complete = np.isfinite(s).all(axis=1)  # rows with every label (and prediction) known
            row_max = np.where(complete, np.max(np.where(complete[:, None], s, 0.0), axis=1), np.nan)  # (N,)
            q, n = _columnwise_quantile(row_max[:, None], np.array([alpha]), ["all labels (complete rows)"])
            qhat, n_cal = np.repeat(q, n_labels), np.repeat(n, n_labels)
        else:
            level = alpha / n_labels if joint == "bonferroni" else alpha
            qhat, n_cal = _columnwise_quantile(s, np.full(n_labels, level), names)
        return cls(alpha, qhat, n_cal.astype(np.int64), joint, tuple(label_names) if label_names else None)

    def predict(self, probs: np.ndarray) -> np.ndarray:
        """Sets ``(N, L, 2)`` bool for probabilities ``(N, L)``: ``[i, j, c]`` is True when value ``c`` (0 or 1) of
        label ``j`` is in patient ``i``'s set. A NaN probability gives an empty set."""
        p, _ = _multilabel_arrays(probs)
        if p.shape[1] != self.num_labels:
            raise ValueError(f"probs has {p.shape[1]} labels, this calibrator was fitted on {self.num_labels}")
        with np.errstate(invalid="ignore"):
            return (_label_scores(p) <= self.qhat[None, :, None]) & np.isfinite(p)[..., None]

    def evaluate(self, probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
        """:func:`multilabel_coverage_summary` of the sets on labelled test rows (entries without a prediction are
        left out)."""
        p, y = _multilabel_arrays(probs, labels)
        y = np.where(np.isfinite(p), y, np.nan)
        return multilabel_coverage_summary(self.predict(p), y)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "conformal_multilabel_lac",
            "alpha": self.alpha,
            "joint": self.joint,
            "qhat": [float(q) for q in self.qhat],
            "n_calibration": [int(n) for n in self.n_calibration],
            "label_names": list(self.label_names) if self.label_names else None,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ConformalMultilabel:
        names = d.get("label_names")
        return cls(
            alpha=float(d["alpha"]),
            qhat=np.asarray(d["qhat"], dtype=np.float64),
            n_calibration=np.asarray(d["n_calibration"], dtype=np.int64),
            joint=d.get("joint"),
            label_names=tuple(names) if names else None,
        )


def _joint_method(joint: bool | str | None) -> str | None:
    if joint is None or joint is False:
        return None
    if joint is True:
        return "max"
    if joint not in JOINT_METHODS:
        raise ValueError(f"joint={joint!r}; use None/False (per label), True/'max' or 'bonferroni'")
    return joint


def _label_names(names: Sequence[str] | None, n: int) -> list[str]:
    if names is None:
        return [f"label {j}" for j in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} label_names for {n} label columns; pass one name per column")
    return [str(x) for x in names]


# ---------------------------------------------------------------------------------------------------------------
# Kaplan-Meier and the log-rank test (vectorised numpy)
# ---------------------------------------------------------------------------------------------------------------


def kaplan_meier(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Kaplan-Meier survival ``S(t) = prod_{u <= t} (1 - d_u / Y_u)`` at the distinct event times.

    ``time`` ``(N,)``, ``event`` ``(N,)`` 0/1 -> ``times`` ``(K,)`` increasing event times and ``survival`` ``(K,)``
    just after each (right-continuous); ``S = 1`` before the first. Evaluate with :func:`step_at`."""
    t, e = _survival_arrays(time, event)
    ok = np.isfinite(t) & np.isfinite(e)
    t, e = t[ok], e[ok]
    uniq, inv = np.unique(t, return_inverse=True)  # (U,)
    d = np.bincount(inv, weights=e, minlength=len(uniq))  # events per distinct time
    c = np.bincount(inv, minlength=len(uniq))  # rows per distinct time
    at_risk = len(t) - np.cumsum(c) + c  # (U,) rows with time >= u
    keep = d > 0
    return uniq[keep], np.cumprod(1.0 - d[keep] / at_risk[keep])


def censoring_kaplan_meier(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Kaplan-Meier estimate of the censoring survival ``G(t) = P(C > t)`` from ``(time, 1 - event)``, events at a
    tied time taken to precede the censorings there (the convention ``T <= C`` -> event observed):
    ``G(u) = prod_{s <= u} (1 - c_s / (Y_s - d_s))``. Returns ``times`` ``(K,)`` (censoring times) and ``G``
    ``(K,)`` just after each."""
    t, e = _survival_arrays(time, event)
    ok = np.isfinite(t) & np.isfinite(e)
    t, e = t[ok], e[ok]
    uniq, inv = np.unique(t, return_inverse=True)
    d = np.bincount(inv, weights=e, minlength=len(uniq))
    c = np.bincount(inv, weights=1.0 - e, minlength=len(uniq))
    at_risk = len(t) - np.cumsum(d + c) + d + c
    keep = c > 0
    return uniq[keep], np.cumprod(1.0 - c[keep] / (at_risk[keep] - d[keep]))


def step_at(times: np.ndarray, values: np.ndarray, t: np.ndarray, *, left: bool = False) -> np.ndarray:
    """Evaluate a right-continuous step function that is 1 before ``times[0]`` and ``values[k]`` on
    ``[times[k], times[k + 1])`` at ``t`` (any shape); ``left=True`` gives the left limit ``f(t-)``."""
    t = np.asarray(t, dtype=np.float64)
    idx = np.searchsorted(np.asarray(times), t, side="left" if left else "right") - 1
    out = np.where(idx >= 0, np.asarray(values, dtype=np.float64)[np.maximum(idx, 0)] if len(times) else 1.0, 1.0)
    return np.where(np.isfinite(t), out, np.nan)


def logrank_test(time: np.ndarray, event: np.ndarray, group: np.ndarray) -> dict[str, float]:
    """Multi-group log-rank test (Mantel-Haenszel, hypergeometric variance) of equal survival across ``group``
    ``(N,)`` labels; returns ``chi2``, ``df`` (non-empty groups - 1) and ``p_value`` (NaN with fewer than two
    non-empty groups or no events)."""
    t, e = _survival_arrays(time, event)
    g = np.asarray(group).reshape(-1)
    _same_length(time=t, group=g)
    ok = np.isfinite(t) & np.isfinite(e)
    t, e, g = t[ok], e[ok], g[ok]
    labels, gi = np.unique(g, return_inverse=True)  # (G,)
    ev_times = np.unique(t[e > 0])  # (J,)
    if len(labels) < 2 or len(ev_times) == 0:
        return {"chi2": float("nan"), "df": max(len(labels) - 1, 0), "p_value": float("nan")}
    n_groups = len(labels)
    # at risk per group and event time: rows of the group with time >= t_j
    at_risk = np.stack(
        [len(tt) - np.searchsorted(np.sort(tt), ev_times, side="left") for tt in (t[gi == k] for k in range(n_groups))]
    ).astype(np.float64)  # (G, J)
    j = np.searchsorted(ev_times, t[e > 0])
    deaths = np.zeros((n_groups, len(ev_times)))
    np.add.at(deaths, (gi[e > 0], j), 1.0)  # (G, J)
    n = at_risk.sum(axis=0)  # (J,)
    d = deaths.sum(axis=0)  # (J,)
    frac = at_risk / n  # (G, J)
    observed_minus_expected = (deaths - d * frac).sum(axis=1)  # (G,)
    scale = np.divide(d * (n - d), n - 1, out=np.zeros_like(n), where=n > 1)  # (J,)
    cov = np.einsum("j,gj,hj->gh", scale, frac, -frac) + np.diag((scale * frac).sum(axis=1))  # (G, G)
    z = observed_minus_expected[:-1]
    stat = float(z @ np.linalg.pinv(cov[:-1, :-1]) @ z)
    df = n_groups - 1
    return {"chi2": stat, "df": df, "p_value": float(chi2.sf(stat, df))}


# ---------------------------------------------------------------------------------------------------------------
# Survival: calibrated risk groups
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RiskGroups:
    """Risk groups from validation risk scores, each with its validation Kaplan-Meier curve as the predicted survival.

    ``cuts`` ``(k - 1,)``: increasing cut points (the ``1/k, ..., (k-1)/k`` quantiles of the validation risks); a
    patient with risk ``r`` is in group ``#{cuts <= r}`` (0 = lowest risk; ``np.digitize``, as the KM plot of a
    finetuning run). ``km_times[g]``/``km_survival[g]``: the validation KM of group ``g`` (:func:`kaplan_meier`),
    i.e. its predicted survival ``S_g(t)``; ``n``/``events`` per group on validation; ``horizons``: default times to
    report at (quartiles of the validation event times).

    The predicted ``S_g(t)`` is calibrated on validation by construction (it is that group's KM); on new exchangeable
    patients it is a consistent estimate of the group's survival, not a finite-sample guarantee. :meth:`evaluate`
    measures how far test patients' KM is from it.
    """

    cuts: np.ndarray
    km_times: list[np.ndarray]
    km_survival: list[np.ndarray]
    n: np.ndarray
    events: np.ndarray
    horizons: np.ndarray

    @property
    def n_groups(self) -> int:
        return len(self.cuts) + 1

    @property
    def names(self) -> list[str]:
        if self.n_groups == 3:
            return ["low", "medium", "high"]
        return [f"risk group {g + 1}" for g in range(self.n_groups)]

    @classmethod
    def fit(
        cls,
        risk: np.ndarray,
        time: np.ndarray,
        event: np.ndarray,
        n_groups: int = 3,
        *,
        horizons: Sequence[float] | None = None,
    ) -> RiskGroups:
        """Fit on validation ``risk`` ``(N,)`` (higher = shorter survival), ``time`` ``(N,)``, ``event`` ``(N,)``.
        Rows with a NaN anywhere are left out. Raises ``ValueError`` for fewer than 2 groups, tied cut points
        (too many equal risks for ``n_groups``), or a group without an event."""
        if not isinstance(n_groups, (int, np.integer)) or n_groups < 2:
            raise ValueError(f"n_groups must be an integer >= 2, got {n_groups!r}")
        r = _as_1d(risk, "risk")
        t, e = _survival_arrays(time, event)
        _same_length(risk=r, time=t, event=e)
        ok = np.isfinite(r) & np.isfinite(t) & np.isfinite(e)
        r, t, e = r[ok], t[ok], e[ok]
        if len(r) < 2 * n_groups:
            raise ValueError(f"{len(r)} validation patients are too few for {n_groups} risk groups; use fewer groups")
        cuts = np.quantile(r, np.arange(1, n_groups) / n_groups)  # (k-1,)
        if np.any(np.diff(cuts) <= 0) or cuts[0] <= r.min():
            raise ValueError(
                f"the validation risks have too many ties for {n_groups} quantile groups (cuts {cuts}); "
                "use fewer groups"
            )
        g = np.digitize(r, cuts)
        km_t, km_s, n, ev = [], [], [], []
        for k in range(n_groups):
            sel = g == k
            if not sel.any():
                raise ValueError(f"risk group {k} is empty (tied risk scores at the cut points); use fewer groups")
            if e[sel].sum() == 0:
                raise ValueError(f"risk group {k} has no event on validation; use fewer groups or more patients")
            kt, ks = kaplan_meier(t[sel], e[sel])
            km_t.append(kt)
            km_s.append(ks)
            n.append(int(sel.sum()))
            ev.append(int(e[sel].sum()))
        if horizons is None:
            horizons = np.quantile(t[e > 0], [0.25, 0.5, 0.75])
        h = np.asarray(horizons, dtype=np.float64).reshape(-1)
        if not len(h) or not np.isfinite(h).all() or np.any(h < 0):
            raise ValueError(f"horizons must be finite times >= 0, got {horizons!r}")
        return cls(cuts, km_t, km_s, np.array(n), np.array(ev), h)

    def assign(self, risk: np.ndarray) -> np.ndarray:
        """Group index ``(N,)`` int of every patient (0 = lowest risk), ``-1`` for a NaN risk."""
        r = _as_1d(risk, "risk")
        return np.where(np.isfinite(r), np.digitize(r, self.cuts), -1)

    def group_survival(self, horizons: Sequence[float] | None = None) -> np.ndarray:
        """Predicted survival ``S_g(t)`` ``(k, H)`` of every group at ``horizons`` (default: ``self.horizons``)."""
        h = self._horizons(horizons)
        return np.stack([step_at(kt, ks, h) for kt, ks in zip(self.km_times, self.km_survival, strict=True)])

    def predict_survival(self, risk: np.ndarray, horizons: Sequence[float] | None = None) -> np.ndarray:
        """Predicted survival ``(N, H)`` of every patient at ``horizons``: its group's validation KM (NaN rows for a
        NaN risk)."""
        g = self.assign(risk)
        s = self.group_survival(horizons)[np.maximum(g, 0)]
        return np.where((g >= 0)[:, None], s, np.nan)

    def evaluate(
        self, risk: np.ndarray, time: np.ndarray, event: np.ndarray, horizons: Sequence[float] | None = None
    ) -> dict[str, Any]:
        """Compare on test patients: ``group`` ``(N,)``, per group ``n``/``events``, ``predicted`` ``(k, H)``
        (validation KM), ``observed`` ``(k, H)`` (test KM; NaN for a group without test patients or after its last
        test follow-up time),
        ``calibration_error`` ``(k, H)`` ``|predicted - observed|``, ``mean_calibration_error`` (over finite
        entries), ``max_calibration_error`` and the log-rank ``logrank_chi2``/``logrank_df``/``logrank_p`` across
        the test groups."""
        h = self._horizons(horizons)
        t, e = _survival_arrays(time, event)
        g = self.assign(risk)
        _same_length(risk=g, time=t, event=e)
        ok = (g >= 0) & np.isfinite(t) & np.isfinite(e)
        observed = np.full((self.n_groups, len(h)), np.nan)
        n, ev = np.zeros(self.n_groups, dtype=np.int64), np.zeros(self.n_groups, dtype=np.int64)
        for k in range(self.n_groups):
            sel = ok & (g == k)
            n[k], ev[k] = sel.sum(), e[sel].sum()
            if n[k]:  # the KM is undefined after the group's last follow-up time
                observed[k] = np.where(h <= t[sel].max(), step_at(*kaplan_meier(t[sel], e[sel]), h), np.nan)
        predicted = self.group_survival(h)
        err = np.abs(predicted - observed)
        lr = logrank_test(t[ok], e[ok], g[ok])
        finite = np.isfinite(err)
        return {
            "horizons": h.tolist(),
            "groups": self.names,
            "group": g,
            "n": n.tolist(),
            "events": ev.tolist(),
            "predicted": predicted,
            "observed": observed,
            "calibration_error": err,
            "mean_calibration_error": float(err[finite].mean()) if finite.any() else float("nan"),
            "max_calibration_error": float(err[finite].max()) if finite.any() else float("nan"),
            "logrank_chi2": lr["chi2"],
            "logrank_df": lr["df"],
            "logrank_p": lr["p_value"],
        }

    def _horizons(self, horizons: Sequence[float] | None) -> np.ndarray:
        h = self.horizons if horizons is None else np.asarray(horizons, dtype=np.float64).reshape(-1)
        if not np.isfinite(h).all() or np.any(h < 0):
            raise ValueError(f"horizons must be finite times >= 0, got {horizons!r}")
        return h

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "risk_groups_km",
            "cuts": self.cuts.tolist(),
            "km_times": [kt.tolist() for kt in self.km_times],
            "km_survival": [ks.tolist() for ks in self.km_survival],
            "n": self.n.tolist(),
            "events": self.events.tolist(),
            "horizons": self.horizons.tolist(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RiskGroups:
        return cls(
            cuts=np.asarray(d["cuts"], dtype=np.float64),
            km_times=[np.asarray(x, dtype=np.float64) for x in d["km_times"]],
            km_survival=[np.asarray(x, dtype=np.float64) for x in d["km_survival"]],
            n=np.asarray(d["n"], dtype=np.int64),
            events=np.asarray(d["events"], dtype=np.int64),
            horizons=np.asarray(d["horizons"], dtype=np.float64),
        )


def plot_risk_groups(
    groups: RiskGroups,
    risk: np.ndarray,
    time: np.ndarray,
    event: np.ndarray,
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """PNG of each risk group's validation-predicted survival (dashed) against its observed test Kaplan-Meier curve
    (solid), same colour per group, with the log-rank p-value and mean calibration error in the title. Uses the
    matplotlib Agg canvas directly (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    res = groups.evaluate(risk, time, event)
    t, e = _survival_arrays(time, event)
    g = res["group"]
    fig = Figure(figsize=(6.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = [f"C{k % 10}" for k in range(groups.n_groups)]
    t_max = float(np.nanmax(t)) if np.isfinite(t).any() else 1.0
    for k, name in enumerate(groups.names):
        kt, ks = groups.km_times[k], groups.km_survival[k]
        ax.step(np.r_[0.0, kt], np.r_[1.0, ks], where="post", ls="--", color=colors[k], label=f"{name}: validation")
        sel = (g == k) & np.isfinite(t) & np.isfinite(e)
        if sel.any():
            tt, ts = kaplan_meier(t[sel], e[sel])
            last = ts[-1] if len(ts) else 1.0
            label = f"{name}: test (n={int(sel.sum())})"
            ax.step(np.r_[0.0, tt, t_max], np.r_[1.0, ts, last], where="post", color=colors[k], label=label)
    for h in groups.horizons:
        ax.axvline(h, color="0.8", lw=0.6, zorder=0)
    default_title = (
        f"risk groups: log-rank p={res['logrank_p']:.3g}, mean |S_val - KM_test|={res['mean_calibration_error']:.3f}"
    )
    ax.set(xlabel="time", ylabel="survival probability", ylim=(0, 1.02), title=title or default_title)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Survival: conformalised lower prediction bounds (Candès, Lei & Ren 2023)
# ---------------------------------------------------------------------------------------------------------------


def _predicted_time(risk: Any | None, predicted_time: Any | None) -> np.ndarray:
    """``m(x)`` ``(N,)`` > 0: ``predicted_time`` as given, or ``exp(-risk)`` (a monotone map; only the ordering and
    scale of the bounds depend on it, not their validity)."""
    if (risk is None) == (predicted_time is None):
        raise ValueError("pass exactly one of risk= (higher = shorter survival) or predicted_time= (e.g. the median)")
    if predicted_time is not None:
        m = _as_1d(predicted_time, "predicted_time")
        if np.any(m[np.isfinite(m)] <= 0):
            raise ValueError("predicted_time must be > 0 (a predicted survival time such as the median)")
        return m
    return np.exp(-_as_1d(risk, "risk"))


def _survival_scores(m: np.ndarray, y: np.ndarray, score: str) -> np.ndarray:
    """Non-conformity of outcome ``y`` given prediction ``m``: large when ``y`` is small. ``"log"``:
    ``log m - log y`` (``inf`` for ``y = 0``); ``"difference"``: ``m - y``."""
    if score == "log":
        with np.errstate(divide="ignore"):
            return np.log(m) - np.log(y)
    return m - y


@dataclass
class ConformalSurvival:
    """Conformalised lower prediction bound on the survival time (Candès, Lei & Ren 2023).

    For a fixed threshold ``c0`` the target is :math:`T \\wedge c_0`, which is known for every calibration patient
    with :math:`C \\ge T \\wedge c_0`: an observed event, or follow-up reaching ``c0``. The score is
    ``log m(x) - log(T ∧ c0)`` (``score="log"``; ``"difference"``: ``m(x) - T ∧ c0``), ``qhat`` its (weighted)
    split-conformal ``1 - alpha`` quantile, and the bound ``L(x) = min(m(x) exp(-qhat), c0)`` (``"difference"``:
    ``min(max(m(x) - qhat, 0), c0)``).

    What is guaranteed, for calibration patients and a new patient drawn i.i.d. (exchangeably) from one population,
    any model ``m`` fitted on other data, and ``c0`` fixed before seeing the calibration outcomes:

    * **Type-I censoring with the censoring time known for everyone** (``censor_time`` passed to :meth:`fit`, e.g.
      the administrative end of follow-up) and censoring independent of ``(X, T)``: the patients with
      ``C >= c0`` are a random subsample of the population whose ``T ∧ c0`` is observed, so the plain split-conformal
      quantile over them gives, in finite samples, :math:`P(T \\ge L(X)) \\ge P(T \\wedge c_0 \\ge L(X)) \\ge 1 -
      \\alpha` (Candès et al., Type-I setting with ``P(C >= c0 | X)`` constant; the weights are then equal).
    * **Only ``(time, event)`` observed** (the default) and censoring independent of ``(X, T)``
      (covariate-independent censoring, :math:`C \\perp (X, T)`): a patient's ``T ∧ c0`` is observed with
      probability ``G((T ∧ c0)-) = P(C >= T ∧ c0)``, which depends on ``T`` only, so each such calibration patient
      gets the inverse-probability weight ``1 / G((T ∧ c0)-)`` (weighted conformal prediction, Tibshirani et al.
      2019, with a likelihood ratio in ``(x, t)``); the unknown test patient's weight is bounded by its maximum
      ``1 / G(c0-)``, which can only raise ``qhat``. With the true ``G`` this gives the same finite-sample
      guarantee; here ``G`` is the Kaplan-Meier estimate of the censoring survival on the calibration data
      (:func:`censoring_kaplan_meier`), so the guarantee holds up to its estimation error (Candès et al.'s doubly
      robust result: coverage ``>= 1 - alpha - O(error of G)``). This is the inverse-probability-of-censoring
      extension of their Type-I procedure to data where the censoring time of patients with an event is unknown
      (the same idea as Davidov et al., ICLR 2025, with ``P(C >= t | X)`` not depending on ``X``).

    Not guaranteed: coverage conditional on ``x`` (the bound is marginal), or anything if censoring depends on the
    covariates (then ``P(C >= c | X)`` must be modelled per patient, which this class does not do). Larger ``c0``
    allows larger bounds but leaves fewer patients with a known ``T ∧ c0``.
    """

    alpha: float
    c0: float
    qhat: float
    score: str = "log"
    n_calibration: int = 0
    weighted: bool = True

    @classmethod
    def fit(
        cls,
        time: np.ndarray,
        event: np.ndarray,
        *,
        risk: np.ndarray | None = None,
        predicted_time: np.ndarray | None = None,
        alpha: float = 0.1,
        c0: float | None = None,
        censor_time: np.ndarray | None = None,
        score: str = "log",
    ) -> ConformalSurvival:
        """Calibrate on held-out patients: observed ``time`` ``(N,)`` (``min(T, C)``), ``event`` ``(N,)`` (1 = event
        observed), and exactly one of ``risk`` ``(N,)`` (higher = shorter survival; ``m = exp(-risk)``) or
        ``predicted_time`` ``(N,)`` > 0 (e.g. the predicted median). ``c0``: the truncation time (default: the
        median observed time of the calibration patients — data-dependent through the times only; fix it in
        advance for the exact guarantee). ``censor_time`` ``(N,)``: the censoring time of every patient (Type-I
        setting, unweighted and exact). Rows with a NaN anywhere are left out."""
        alpha = _check_alpha(alpha)
        if score not in SURVIVAL_SCORES:
            raise ValueError(f"score {score!r}; choose one of {SURVIVAL_SCORES}")
        t, e = _survival_arrays(time, event)
        m = _predicted_time(risk, predicted_time)
        c = None if censor_time is None else _as_1d(censor_time, "censor_time")
        _same_length(time=t, event=e, prediction=m, censor_time=c)
        ok = np.isfinite(t) & np.isfinite(e) & np.isfinite(m) & (np.isfinite(c) if c is not None else True)
        t, e, m = t[ok], e[ok], m[ok]
        if len(t) == 0:
            raise ValueError("no calibration patients with a time, an event flag and a prediction")
        if c0 is None:
            c0 = float(np.median(t))
        if not np.isfinite(c0) or c0 <= 0:
            raise ValueError(f"c0 must be a finite time > 0, got {c0!r}")
        c0 = float(c0)
        if c is not None:
            c = c[ok]
            if np.any(c < t - 1e-9 * np.maximum(1.0, np.abs(t))):
                raise ValueError("censor_time must be >= the observed time of every patient (time = min(T, C))")
            if np.any((e == 0) & ~np.isclose(c, t)):
                raise ValueError("a censored patient's censor_time must equal its observed time")
            use = c >= c0  # C >= c0: T ∧ c0 = time ∧ c0 observed, a random subsample under C ⊥ (X, T)
            s = _survival_scores(m[use], np.minimum(t[use], c0), score)
            k = conformal_rank(int(use.sum()), alpha)
            if k > use.sum():
                raise ValueError(
                    f"{int(use.sum())} calibration patients have censor_time >= c0={c0:.4g}; alpha={alpha} needs "
                    f"{min_calibration_size(alpha)}: lower c0 or raise alpha"
                )
            return cls(alpha, c0, float(np.sort(s)[k - 1]), score, int(use.sum()), weighted=False)

        known = (e > 0) | (t >= c0)  # T ∧ c0 observed
        y = np.minimum(t[known], c0)
        g_times, g = censoring_kaplan_meier(t, e)
        g_known = step_at(g_times, g, y, left=True)  # P(C >= T ∧ c0) per used patient
        g_c0 = float(step_at(g_times, g, np.array([c0]), left=True)[0])
        if g_c0 <= 0 or not np.any(t >= c0):
            raise ValueError(f"no calibration patient is followed up to c0={c0:.4g} (censoring KM is 0); lower c0")
        w = 1.0 / g_known  # (n_known,)
        s = _survival_scores(m[known], y, score)
        qhat = weighted_conformal_quantile(s, w, 1.0 / g_c0, alpha)
        if not np.isfinite(qhat):
            raise ValueError(
                f"too few calibration patients with a known T ∧ c0 ({int(known.sum())}) for alpha={alpha} at "
                f"c0={c0:.4g}: the test patient's weight alone exceeds alpha; lower c0, raise alpha or add patients"
            )
        return cls(alpha, c0, qhat, score, int(known.sum()), weighted=True)

    def lower_bound(self, *, risk: np.ndarray | None = None, predicted_time: np.ndarray | None = None) -> np.ndarray:
        """Lower prediction bound ``L(x)`` ``(N,)`` on each patient's survival time, ``0 <= L <= c0`` (NaN for a
        NaN prediction); pass the same kind of prediction as at :meth:`fit`."""
        m = _predicted_time(risk, predicted_time)
        if self.score == "log":
            lb = m * np.exp(-self.qhat)
        else:
            lb = np.maximum(m - self.qhat, 0.0)
        return np.minimum(lb, self.c0)

    def evaluate(
        self,
        time: np.ndarray,
        event: np.ndarray,
        *,
        risk: np.ndarray | None = None,
        predicted_time: np.ndarray | None = None,
    ) -> dict[str, float]:
        """Bounds on the test coverage ``P(T >= L(X))`` from censored data: ``coverage_lower`` (share with observed
        ``time >= L``: surely covered), ``coverage_upper`` (1 - share with an event before ``L``: surely missed);
        censored patients with ``time < L`` are undecided. Also ``mean_lower_bound``, ``median_lower_bound``,
        ``share_at_c0`` (bounds truncated at ``c0``) and ``n``."""
        t, e = _survival_arrays(time, event)
        lb = self.lower_bound(risk=risk, predicted_time=predicted_time)
        _same_length(time=t, event=e, prediction=lb)
        ok = np.isfinite(t) & np.isfinite(e) & np.isfinite(lb)
        t, e, lb = t[ok], e[ok], lb[ok]
        if not ok.any():
            keys = ("coverage_lower", "coverage_upper", "mean_lower_bound", "median_lower_bound", "share_at_c0")
            return {k: float("nan") for k in keys} | {"n": 0}
        return {
            "coverage_lower": float((t >= lb).mean()),
            "coverage_upper": float(1.0 - ((e > 0) & (t < lb)).mean()),
            "mean_lower_bound": float(lb.mean()),
            "median_lower_bound": float(np.median(lb)),
            "share_at_c0": float((lb >= self.c0).mean()),
            "n": int(ok.sum()),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "conformal_survival_lpb",
            "alpha": self.alpha,
            "c0": self.c0,
            "qhat": self.qhat,
            "score": self.score,
            "n_calibration": self.n_calibration,
            "weighted": self.weighted,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ConformalSurvival:
        return cls(
            alpha=float(d["alpha"]),
            c0=float(d["c0"]),
            qhat=float(d["qhat"]),
            score=str(d["score"]),
            n_calibration=int(d["n_calibration"]),
            weighted=bool(d["weighted"]),
        )


def weighted_conformal_quantile(scores: np.ndarray, weights: np.ndarray, test_weight: float, alpha: float) -> float:
    """Weighted split-conformal threshold (Tibshirani et al. 2019): the smallest calibration score ``s_(k)`` with
    ``sum_{i: s_i <= s_(k)} w_i / (sum_i w_i + test_weight) >= 1 - alpha``; ``inf`` when the calibration weights
    alone never reach ``1 - alpha`` (the test point's mass sits at ``+inf``). ``scores``/``weights`` ``(n,)``,
    weights ``> 0``. Equal weights and ``test_weight = 1`` give the unweighted :func:`conformal_rank` threshold."""
    alpha = _check_alpha(alpha)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if s.shape != w.shape:
        raise ValueError(f"scores {s.shape} and weights {w.shape} must have the same length")
    if np.any(~np.isfinite(w) | (w <= 0)) or not test_weight > 0:
        raise ValueError("conformal weights must be finite and > 0")
    if len(s) == 0:
        return float("inf")
    order = np.argsort(s, kind="stable")
    s, w = s[order], w[order]
    cum = np.cumsum(w) / (w.sum() + test_weight)  # (n,)
    # the distribution's CDF jumps only at distinct scores: take the cumulative mass through the last tie
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    reach = np.flatnonzero(last_of_tie & (cum >= 1 - alpha - _EPS))
    return float(s[reach[0]]) if reach.size else float("inf")
