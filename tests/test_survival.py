"""Survival losses against textbook loop references and lifelines: Cox partial likelihood with Efron/Breslow ties
(value, gradient, fitted coefficients), and the discrete-time logistic-hazard likelihood and its binning."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from bioperceiver.losses import (
    CoxPHLoss,
    DiscreteTimeNLLLoss,
    cox_ph_loss,
    discrete_time_nll,
    discretize,
    make_time_bins,
    risk_from_hazard_logits,
    survival_from_hazard_logits,
)


def tied_data(seed=0, n=40, n_times=8, p_event=0.6):
    """Integer times (many ties, including tied events and events tied with censorings) and random risks."""
    rng = np.random.default_rng(seed)
    time = rng.integers(0, n_times, n).astype(np.float64)
    event = (rng.random(n) < p_event).astype(np.int64)
    event[:2] = 1
    time[:2] = time[2]  # at least one tie involving events
    risk = rng.normal(size=n) * 1.5
    return risk, time, event


def ref_cox_nll(risk, time, event, ties):
    """Negative Cox partial log-likelihood over the number of events, the textbook way: a loop over distinct event
    times; Breslow divides every tied event by the full risk set, Efron removes l/d of the tied events' hazard for
    the l-th of the d tied events."""
    ll = 0.0
    for t in np.unique(time[event == 1]):
        tied = (time == t) & (event == 1)
        at_risk = time >= t
        d = tied.sum()
        s_risk = np.exp(risk[at_risk]).sum()
        s_tied = np.exp(risk[tied]).sum()
        ll += risk[tied].sum()
        if ties == "breslow":
            ll -= d * math.log(s_risk)
        else:
            for l in range(d):  # noqa: E741
                ll -= math.log(s_risk - l / d * s_tied)
    return -ll / event.sum()


def t64(x):
    return torch.as_tensor(x, dtype=torch.float64)


@pytest.mark.parametrize("ties", ["efron", "breslow"])
@pytest.mark.parametrize("seed", range(6))
def test_cox_matches_textbook_reference_with_ties(ties, seed):
    risk, time, event = tied_data(seed)
    loss = cox_ph_loss(t64(risk), t64(time), torch.as_tensor(event), ties=ties)
    assert loss.item() == pytest.approx(ref_cox_nll(risk, time, event, ties), rel=1e-12)


def test_efron_equals_breslow_without_ties_and_differs_with_ties():
    rng = np.random.default_rng(1)
    risk, time, event = rng.normal(size=30), rng.permutation(30).astype(float), rng.integers(0, 2, 30)
    args = (t64(risk), t64(time), torch.as_tensor(event))
    assert cox_ph_loss(*args, ties="efron").item() == pytest.approx(cox_ph_loss(*args, ties="breslow").item(), 1e-14)
    risk, time, event = tied_data(2)
    args = (t64(risk), t64(time), torch.as_tensor(event))
    assert cox_ph_loss(*args, ties="efron").item() != pytest.approx(cox_ph_loss(*args, ties="breslow").item(), 1e-6)


def test_reductions_invariances_and_input_forms():
    risk, time, event = tied_data(3)
    r, t, e = t64(risk), t64(time), torch.as_tensor(event)
    for ties in ("efron", "breslow"):
        mean = cox_ph_loss(r, t, e, ties=ties)
        total = cox_ph_loss(r, t, e, ties=ties, reduction="sum")
        per_sample = cox_ph_loss(r, t, e, ties=ties, reduction="none")
        assert total.item() == pytest.approx(mean.item() * event.sum(), rel=1e-12)
        assert per_sample.shape == (len(risk),) and per_sample.sum().item() == pytest.approx(total.item(), rel=1e-12)
        assert (per_sample[e == 0] == 0).all()
        # shift invariance (the partial likelihood only sees risk differences) and permutation invariance
        assert cox_ph_loss(r + 123.0, t, e, ties=ties).item() == pytest.approx(mean.item(), rel=1e-10)
        perm = torch.randperm(len(risk), generator=torch.Generator().manual_seed(0))
        assert cox_ph_loss(r[perm], t[perm], e[perm], ties=ties).item() == pytest.approx(mean.item(), rel=1e-12)
        # (N, 1) risks, bool events, integer times, the module
        assert cox_ph_loss(r[:, None], t.long(), e.bool(), ties=ties).item() == pytest.approx(mean.item(), rel=1e-12)
        assert CoxPHLoss(ties=ties)(r, t, e).item() == mean.item()


def test_cox_is_stable_for_large_risks_and_in_float32():
    risk, time, event = tied_data(4)
    big = t64(risk * 30 + 5000)  # exp(5000) overflows float64 without logsumexp
    for ties in ("efron", "breslow"):
        loss = cox_ph_loss(big, t64(time), torch.as_tensor(event), ties=ties)
        assert torch.isfinite(loss)
        assert loss.item() == pytest.approx(ref_cox_nll(risk * 30, time, event, ties), rel=1e-9)
        loss32 = cox_ph_loss(torch.tensor(risk, dtype=torch.float32), torch.tensor(time), torch.tensor(event), ties)
        assert loss32.dtype == torch.float32
        assert loss32.item() == pytest.approx(ref_cox_nll(risk, time, event, ties), rel=1e-5)


def test_last_time_group_all_events_efron():
    # the last risk set holds only tied events: Efron's S_R - l/d S_D reduces to (1 - l/d) S_D
    risk = np.array([0.3, -0.2, 1.0, 0.7, -1.1])
    time = np.array([1.0, 2.0, 3.0, 3.0, 3.0])
    event = np.array([1, 0, 1, 1, 1])
    loss = cox_ph_loss(t64(risk).requires_grad_(), t64(time), torch.as_tensor(event))
    assert loss.item() == pytest.approx(ref_cox_nll(risk, time, event, "efron"), rel=1e-12)
    loss.backward()


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_cox_gradcheck(ties):
    risk, time, event = tied_data(5, n=25, n_times=5)
    r = t64(risk).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: cox_ph_loss(x, t64(time), torch.as_tensor(event), ties=ties), (r,))
    assert torch.autograd.gradgradcheck(lambda x: cox_ph_loss(x, t64(time), torch.as_tensor(event), ties=ties), (r,))


def test_zero_events_gives_a_differentiable_zero():
    risk = torch.randn(6, dtype=torch.float64, requires_grad=True)
    time = torch.arange(6.0)
    event = torch.zeros(6)
    for reduction in ("mean", "sum"):
        loss = cox_ph_loss(risk, time, event, reduction=reduction)
        assert loss.item() == 0 and loss.requires_grad
        (grad,) = torch.autograd.grad(loss, risk)
        assert (grad == 0).all()
    assert cox_ph_loss(risk, time, event, reduction="none").shape == (6,)


def test_cox_input_validation():
    r, t, e = torch.randn(4), torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1, 0, 1, 1])
    with pytest.raises(ValueError, match="NaN"):
        cox_ph_loss(torch.tensor([0.0, float("nan"), 1.0, 2.0]), t, e)
    with pytest.raises(ValueError, match="NaN"):
        cox_ph_loss(r, torch.tensor([1.0, float("nan"), 3.0, 4.0]), e)
    with pytest.raises(ValueError, match="non-negative"):
        cox_ph_loss(r, torch.tensor([1.0, -2.0, 3.0, 4.0]), e)
    with pytest.raises(ValueError, match="shape"):
        cox_ph_loss(r, t[:3], e)
    with pytest.raises(ValueError, match="shape"):
        cox_ph_loss(torch.randn(4, 2), t, e)
    with pytest.raises(ValueError, match="0/1"):
        cox_ph_loss(r, t, torch.tensor([1, 2, 0, 1]))
    with pytest.raises(ValueError, match="ties"):
        cox_ph_loss(r, t, e, ties="exact")
    with pytest.raises(ValueError, match="reduction"):
        cox_ph_loss(r, t, e, reduction="max")
    with pytest.raises(ValueError, match="floating"):
        cox_ph_loss(torch.tensor([1, 2, 3, 4]), t, e)


@pytest.fixture(scope="module")
def lifelines_fit():
    lifelines = pytest.importorskip("lifelines")
    rng = np.random.default_rng(7)
    n = 120
    x = rng.normal(size=(n, 3))
    beta = np.array([0.8, -0.5, 0.3])
    event_time = np.ceil(rng.exponential(np.exp(-x @ beta)) * 5)  # coarse grid: many tied event times
    censor_time = np.ceil(rng.exponential(1.5, n) * 5)
    time = np.minimum(event_time, censor_time)
    event = (event_time <= censor_time).astype(np.int64)
    df = pd.DataFrame(x, columns=["x0", "x1", "x2"]).assign(T=time, E=event)
    cph = lifelines.CoxPHFitter(penalizer=0.0).fit(df, "T", "E")
    assert len(np.unique(time[event == 1])) < event.sum()  # ties among events
    return x, time, event, cph


def test_cox_equals_lifelines_log_likelihood(lifelines_fit):
    x, time, event, cph = lifelines_fit
    risk = x @ cph.params_.to_numpy()
    loss = cox_ph_loss(t64(risk), t64(time), torch.as_tensor(event), ties="efron")
    assert loss.item() == pytest.approx(-cph.log_likelihood_ / event.sum(), rel=1e-9)


def test_lbfgs_on_cox_loss_recovers_lifelines_coefficients(lifelines_fit):
    x, time, event, cph = lifelines_fit
    xt, tt, et = t64(x), t64(time), torch.as_tensor(event)
    beta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [beta], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = cox_ph_loss(xt @ beta, tt, et, ties="efron")
        loss.backward()
        return loss

    opt.step(closure)
    np.testing.assert_allclose(beta.detach().numpy(), cph.params_.to_numpy(), atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# Discrete time
# ---------------------------------------------------------------------------------------------------------------------


def ref_discrete_nll(logits, time_bin, event):
    """Loop reference: event in bin j -> -[sum_{k<j} log(1-h_k) + log h_j]; censored in j -> -sum_{k<=j} log(1-h_k)."""
    out = []
    for phi, j, e in zip(logits, time_bin, event, strict=True):
        h = 1 / (1 + np.exp(-phi))
        nll = -sum(math.log(1 - h[k]) for k in range(j))
        nll -= math.log(h[j]) if e else math.log(1 - h[j])
        out.append(nll)
    return np.array(out)


def test_discrete_time_nll_matches_loop_reference():
    rng = np.random.default_rng(0)
    n, k = 50, 7
    logits = rng.normal(size=(n, k)) * 2
    time_bin = rng.integers(0, k, n)
    event = rng.integers(0, 2, n)
    time_bin[:2], event[:2] = [0, k - 1], [0, 1]  # censored in the first bin, event in the last
    expected = ref_discrete_nll(logits, time_bin, event)
    args = (t64(logits), torch.as_tensor(time_bin), torch.as_tensor(event))
    np.testing.assert_allclose(discrete_time_nll(*args, reduction="none").numpy(), expected, rtol=1e-12)
    assert discrete_time_nll(*args).item() == pytest.approx(expected.mean(), rel=1e-12)
    assert discrete_time_nll(*args, reduction="sum").item() == pytest.approx(expected.sum(), rel=1e-12)
    assert DiscreteTimeNLLLoss()(*args).item() == pytest.approx(expected.mean(), rel=1e-12)
    x = t64(logits[:12]).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: discrete_time_nll(z, args[1][:12], args[2][:12]), (x,))


def test_discrete_time_nll_is_stable_and_validates():
    logits = torch.tensor([[50.0, -50.0, 30.0], [-80.0, -80.0, 80.0]])
    loss = discrete_time_nll(logits, torch.tensor([0, 2]), torch.tensor([1, 1]))
    assert torch.isfinite(loss) and loss.item() < 1e-10
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        discrete_time_nll(logits, torch.tensor([0, 3]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="integer"):
        discrete_time_nll(logits, torch.tensor([0.0, 1.0]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="shape"):
        discrete_time_nll(logits[0], torch.tensor([0]), torch.tensor([1]))


def test_survival_and_risk_from_hazard_logits():
    logits = torch.randn(5, 6, dtype=torch.float64)
    expected = torch.cumprod(1 - torch.sigmoid(logits), dim=1)
    surv = survival_from_hazard_logits(logits)
    torch.testing.assert_close(surv, expected, rtol=1e-12, atol=1e-15)
    assert (surv[:, 1:] <= surv[:, :-1]).all()
    torch.testing.assert_close(risk_from_hazard_logits(logits), -expected.sum(1))
    # higher hazards everywhere -> higher risk
    assert (risk_from_hazard_logits(logits + 1) > risk_from_hazard_logits(logits)).all()


def test_make_time_bins_and_discretize():
    rng = np.random.default_rng(0)
    times = rng.exponential(10, 1000)
    events = rng.random(1000) < 0.7
    edges = make_time_bins(times, events, 5)
    assert len(edges) == 6 and edges[0] == 0 and edges[-1] == times.max() and (np.diff(edges) > 0).all()
    np.testing.assert_allclose(edges[1:-1], np.quantile(times[events], [0.2, 0.4, 0.6, 0.8]))
    bins = discretize(times, edges)
    assert bins.dtype == np.int64 and bins.min() == 0 and bins.max() == 4
    per_bin = np.bincount(bins[events], minlength=5)
    assert per_bin.min() >= events.sum() // 5 - 2  # quantile bins hold about equal numbers of events
    # bin j is [e_j, e_{j+1}); beyond the last edge -> last bin; tensors give the same bins
    assert discretize(np.array([edges[1], np.nextafter(edges[1], 0), edges[-1] + 5]), edges).tolist() == [1, 0, 4]
    assert discretize(torch.tensor(times), edges).tolist() == bins.tolist()
    # heavily tied event times: duplicate quantiles merge into fewer bins
    tied = make_time_bins(np.array([1.0] * 50 + [2.0] * 50 + [3.0]), np.ones(101, bool), 8)
    assert (np.diff(tied) > 0).all() and len(tied) - 1 < 8
    with pytest.raises(ValueError, match="event"):
        make_time_bins(times, np.zeros(1000, bool), 4)


def test_discrete_head_trains_on_binned_times():
    """A tiny end-to-end check: a linear logistic-hazard model fitted with the NLL separates high from low risk."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 1, generator=g)
    times = torch.distributions.Exponential(torch.exp(x[:, 0])).sample()
    events = torch.rand(400, generator=g) < 0.8
    edges = make_time_bins(times, events, 6)
    bins = discretize(times, edges)
    head = torch.nn.Linear(1, len(edges) - 1)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        discrete_time_nll(head(x), bins, events).backward()
        opt.step()
    risk = risk_from_hazard_logits(head(x)).detach()
    assert F.cosine_similarity(risk - risk.mean(), x[:, 0] - x[:, 0].mean(), dim=0) > 0.9
