"""Survival losses: the Cox partial likelihood (Efron or Breslow ties) and the discrete-time logistic hazard.

Conventions shared by every function here:

- ``time`` is the observed time (event or censoring), non-negative; ``event`` is 1/True for an observed event and
  0/False for right censoring.
- A **risk** score is a log hazard ratio: higher risk means an earlier event. ``evaluation.concordance_index``
  uses the same sign.
- Cox risk sets are those of the batch passed in: with minibatches the loss is the usual minibatch approximation of
  the full-cohort partial likelihood (larger batches approximate it better).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

_TIES = ("efron", "breslow")
_REDUCTIONS = ("mean", "sum", "none")


def _as_vector(x, n: int, device: torch.device, name: str) -> torch.Tensor:
    """``x`` as an ``(n,)`` tensor on ``device`` (``(n, 1)`` is squeezed)."""
    x = torch.as_tensor(x, device=device)
    if x.dim() == 2 and x.shape[1] == 1:
        x = x.squeeze(1)
    if x.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match the predictions, got {tuple(x.shape)}")
    return x


def _check_event(event, n: int, device: torch.device) -> torch.Tensor:
    """``event`` as an ``(n,)`` bool tensor (True = event observed)."""
    event = _as_vector(event, n, device, "event")
    if event.dtype != torch.bool:
        if not ((event == 0) | (event == 1)).all():
            raise ValueError("event must be boolean or 0/1 (1 = event observed, 0 = censored)")
        event = event != 0
    return event


def _check_time(time, n: int, like: torch.Tensor) -> torch.Tensor:
    """``time`` as an ``(n,)`` tensor of ``like``'s dtype and device, finite and non-negative."""
    time = _as_vector(time, n, like.device, "time").to(like.dtype)
    if not torch.isfinite(time).all():
        raise ValueError("time contains NaN or inf; drop or impute those samples before training")
    if (time < 0).any():
        raise ValueError("time must be non-negative (time from the index date to the event or censoring)")
    return time


def _check_scores(scores: torch.Tensor, name: str) -> None:
    if not torch.is_tensor(scores) or not scores.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {type(scores).__name__}")
    if not torch.isfinite(scores).all():
        raise ValueError(f"{name} contains NaN or inf; check the model outputs (learning rate, inputs)")


def cox_ph_loss(
    risk: torch.Tensor,
    time: torch.Tensor,
    event: torch.Tensor,
    ties: str = "efron",
    reduction: str = "mean",
) -> torch.Tensor:
    """Negative Cox partial log-likelihood of risk scores (log hazard ratios).

    With event times ``t`` (distinct times at which at least one event happens), tied events ``D_t`` (``d_t`` of
    them) and risk sets ``R_t = {j : T_j >= t}``, the partial log-likelihood is

    - Breslow: ``sum_t [ sum_{i in D_t} eta_i - d_t * log sum_{j in R_t} exp(eta_j) ]``
    - Efron: ``sum_t [ sum_{i in D_t} eta_i - sum_{l=0}^{d_t-1} log(S_R - l/d_t S_D) ]`` with
      ``S_R = sum_{j in R_t} exp(eta_j)`` and ``S_D = sum_{i in D_t} exp(eta_i)``

    (identical without ties; Efron is what lifelines, R ``survival::coxph`` and statsmodels default to). Computed in
    one pass over the samples sorted by time: a reverse cumulative ``logsumexp`` gives every risk set, the tied-event
    sums come from a per-group ``logsumexp`` and Efron's correction is ``log1p(-l/d * exp(B - A))`` on top of the
    risk-set log-sum ``A`` — no exponent overflows.

    Args:
        risk: ``(N,)`` or ``(N, 1)`` risk scores, higher = earlier event. Any floating dtype; use float64 for
            reference-grade numbers.
        time: ``(N,)`` observed times (event or censoring), non-negative.
        event: ``(N,)`` bool or 0/1, 1 = event observed.
        ties: ``"efron"`` (default) or ``"breslow"``.
        reduction: ``"mean"`` (divide by the number of events, the scale lifelines reports as
            ``-log_likelihood_ / n_events``), ``"sum"``, or ``"none"`` for ``(N,)`` per-sample terms (0 for censored
            samples; with Efron the correction of a tied group is spread over its events in input order, so only
            the group's sum is meaningful).

    Returns:
        A scalar (or ``(N,)`` for ``"none"``). A batch without any event has no partial likelihood: the loss is then
        ``0 * risk.sum()``, an exact zero that keeps the graph (backward gives zero gradients, DDP sees every
        parameter used).
    """
    if ties not in _TIES:
        raise ValueError(f"ties must be one of {_TIES}, got {ties!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    _check_scores(risk, "risk")
    if risk.dim() == 2 and risk.shape[1] == 1:
        risk = risk.squeeze(1)
    if risk.dim() != 1:
        raise ValueError(f"risk must have shape (N,) or (N, 1), got {tuple(risk.shape)}")
    time = _check_time(time, risk.shape[0], risk)
    event = _check_event(event, risk.shape[0], risk.device)

    num_events = int(event.sum())
    if num_events == 0:
        logger.debug("cox_ph_loss: batch of %d samples has no event; returning a zero loss", risk.shape[0])
        return risk * 0 if reduction == "none" else risk.sum() * 0

    time_sorted, order = torch.sort(time, stable=True)  # (N,) ascending
    eta = risk[order]  # (N,)
    ev = event[order]  # (N,)
    _, group, counts = torch.unique_consecutive(time_sorted, return_inverse=True, return_counts=True)  # (N,), (G,)
    starts = counts.cumsum(0) - counts  # (G,) first sorted row of each distinct time
    # log sum_{j: T_j >= t_g} exp(eta_j): suffix logsumexp, read at each time group's first row
    log_risk_set = torch.logcumsumexp(eta.flip(0), dim=0).flip(0)[starts]  # (G,)

    ev_idx = ev.nonzero().squeeze(1)  # (E,) sorted rows of the events, ascending
    g = group[ev_idx]  # (E,) time group of each event, non-decreasing
    eta_e = eta[ev_idx]  # (E,)
    log_denominator = log_risk_set[g]  # (E,) Breslow: every tied event sees the full risk set

    if ties == "efron":
        n_groups = counts.shape[0]
        d = torch.zeros(n_groups, dtype=eta.dtype, device=eta.device).index_add_(0, g, torch.ones_like(eta_e))  # (G,)
        rank = torch.arange(g.shape[0], device=g.device) - torch.searchsorted(g, g)  # (E,) l = 0..d-1 in a group
        # log sum_{i in D_t} exp(eta_i), shifted by the (detached) group max for stability
        shift = torch.full((n_groups,), -torch.inf, dtype=eta.dtype, device=eta.device)
        shift = shift.scatter_reduce(0, g, eta_e.detach(), reduce="amax")  # (G,)
        tied_sum = torch.zeros(n_groups, dtype=eta.dtype, device=eta.device).index_add(
            0, g, torch.exp(eta_e - shift[g])
        )  # (G,)
        log_tied = shift[g] + torch.log(tied_sum[g])  # (E,) gathered before the log: empty groups never enter
        # log(exp(A) - l/d exp(B)) = A + log1p(-l/d exp(B - A)); B <= A up to rounding
        frac = rank.to(eta.dtype) / d[g]
        log_denominator = log_denominator + torch.log1p(-frac * torch.exp((log_tied - log_denominator).clamp(max=0)))

    nll = log_denominator - eta_e  # (E,) per-event negative log partial likelihood
    if reduction == "mean":
        return nll.sum() / num_events
    if reduction == "sum":
        return nll.sum()
    return torch.zeros_like(risk).index_add(0, order[ev_idx], nll)  # (N,) back in input order


class CoxPHLoss(nn.Module):
    """:func:`cox_ph_loss` as a module (like ``nn.CrossEntropyLoss``, it returns the loss tensor, so a head can
    call ``loss_fct(risk, time, event)``)."""

    def __init__(self, ties: str = "efron", reduction: str = "mean"):
        super().__init__()
        if ties not in _TIES:
            raise ValueError(f"ties must be one of {_TIES}, got {ties!r}")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.ties = ties
        self.reduction = reduction

    def forward(self, risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
        return cox_ph_loss(risk, time, event, ties=self.ties, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"ties={self.ties!r}, reduction={self.reduction!r}"


# ---------------------------------------------------------------------------------------------------------------------
# Discrete-time (logistic hazard) survival
# ---------------------------------------------------------------------------------------------------------------------


def discrete_time_nll(
    logits: torch.Tensor, time_bin: torch.Tensor, event: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Negative log-likelihood of the discrete-time logistic hazard model (Gensheimer & Narasimhan 2019, pycox's
    ``nll_logistic_hazard``).

    ``logits[:, k]`` is the logit of the hazard ``h_k = P(T in bin k | T not in bins < k)``. For a sample whose time
    falls in bin ``j``:

    - event: ``-[ sum_{k<j} log(1 - h_k) + log h_j ]``
    - censored: ``-sum_{k<=j} log(1 - h_k)`` — a sample censored in bin ``j`` counts as having survived bin ``j``
      (pycox's convention).

    Equivalently a binary cross-entropy over bins ``0..j`` with target 1 only at ``j`` for events, computed from
    logits (stable).

    Args:
        logits: ``(N, K)`` hazard logits.
        time_bin: ``(N,)`` integer bin of each sample's time in ``[0, K)`` (see :func:`discretize`).
        event: ``(N,)`` bool or 0/1.
        reduction: ``"mean"`` over samples (pycox), ``"sum"`` or ``"none"`` (``(N,)``).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (N, K), got {tuple(logits.shape)}")
    _check_scores(logits, "logits")
    event = _check_event(event, logits.shape[0], logits.device)
    time_bin = _as_vector(time_bin, logits.shape[0], logits.device, "time_bin")
    if time_bin.is_floating_point() or time_bin.dtype == torch.bool:
        raise ValueError(f"time_bin must hold integer bin indices (see discretize), got dtype {time_bin.dtype}")
    num_bins = logits.shape[1]
    if ((time_bin < 0) | (time_bin >= num_bins)).any():
        raise ValueError(f"time_bin must lie in [0, {num_bins}); discretize times with the bins the head was built for")
    time_bin = time_bin.long()
    target = torch.zeros_like(logits).scatter(1, time_bin[:, None], event[:, None].to(logits.dtype))  # (N, K)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")  # (N, K)
    upto = torch.arange(num_bins, device=logits.device)[None, :] <= time_bin[:, None]  # (N, K) bins 0..j
    nll = (bce * upto).sum(1)  # (N,)
    if reduction == "mean":
        return nll.mean()
    if reduction == "sum":
        return nll.sum()
    return nll


class DiscreteTimeNLLLoss(nn.Module):
    """:func:`discrete_time_nll` as a module: ``loss_fct(logits, time_bin, event)``."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, time_bin: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
        return discrete_time_nll(logits, time_bin, event, reduction=self.reduction)


def survival_from_hazard_logits(logits: torch.Tensor) -> torch.Tensor:
    """Survival at the end of each bin, ``S_k = prod_{m<=k} (1 - h_m)``, from ``(..., K)`` hazard logits, computed
    as ``exp(cumsum(logsigmoid(-logits)))``. Returns ``(..., K)``."""
    return torch.exp(torch.cumsum(F.logsigmoid(-logits), dim=-1))


def risk_from_hazard_logits(logits: torch.Tensor) -> torch.Tensor:
    """A scalar risk per sample from ``(..., K)`` hazard logits for ranking metrics (C-index): minus the expected
    number of bins survived, ``-sum_k S_k`` (higher = earlier event). Returns ``(...)``."""
    return -survival_from_hazard_logits(logits).sum(-1)


def make_time_bins(times, events, num_bins: int) -> np.ndarray:
    """Bin edges for a discrete-time head: quantiles of the *event* times (so bins hold similar numbers of events).

    Returns float64 edges ``e_0 < e_1 < ... < e_K`` with ``e_0 = min(0, min time)``, interior edges the event-time
    quantiles at ``k / num_bins`` (``k = 1..num_bins-1``) and ``e_K = max time``; bin ``j`` is ``[e_j, e_{j+1})``.
    Duplicate quantiles (many tied event times) are merged, so ``K`` can be smaller than ``num_bins`` (logged);
    size the head with ``len(edges) - 1``. Fit the edges on the training split only.
    """
    times = np.asarray(times.cpu() if torch.is_tensor(times) else times, dtype=np.float64).reshape(-1)
    events = np.asarray(events.cpu() if torch.is_tensor(events) else events).reshape(-1).astype(bool)
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    if times.shape != events.shape or times.size == 0:
        raise ValueError(f"times and events must be non-empty and of equal length, got {times.shape}, {events.shape}")
    if not np.isfinite(times).all() or (times < 0).any():
        raise ValueError("times must be finite and non-negative")
    if not events.any():
        raise ValueError("make_time_bins needs at least one event time")
    interior = np.quantile(times[events], np.arange(1, num_bins) / num_bins)
    low, high = min(0.0, times.min()), times.max()
    interior = np.unique(interior[(interior > low) & (interior < high)])
    edges = np.concatenate([[low], interior, [high]])
    if high <= low:  # every time is 0: one bin
        edges = np.array([low, low + 1.0])
    if len(edges) - 1 < num_bins:
        logger.info(
            "make_time_bins: %d bins requested, %d distinct after merging tied quantiles", num_bins, len(edges) - 1
        )
    return edges


def discretize(times, bins):
    """Bin index of each time for edges from :func:`make_time_bins`: ``j`` such that ``bins[j] <= t < bins[j+1]``;
    times below the first edge go to bin 0 and times at or beyond the last edge to the last bin. Returns int64 of
    the same kind as ``times`` (a tensor for a tensor, a numpy array otherwise)."""
    if torch.is_tensor(times):
        inner = torch.as_tensor(np.asarray(bins, dtype=np.float64)[1:-1], device=times.device)
        return torch.bucketize(times.to(torch.float64), inner, right=True)
    inner = np.asarray(bins, dtype=np.float64)[1:-1]
    return np.searchsorted(inner, np.asarray(times, dtype=np.float64), side="right").astype(np.int64)
