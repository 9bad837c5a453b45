"""Conformal prediction for multilabel and survival tasks, on synthetic data from known generating models.

Multilabel: Bernoulli labels with known probabilities; per-label (and all-labels) coverage at the nominal level over
many seeded repetitions, thresholds equal to a brute-force rank computation. Survival: exponential times with a
rate depending on x and independent exponential (or observed Type-I) censoring; the conformal lower bound covers the
true time at the nominal level without being wildly conservative, Kaplan-Meier and log-rank agree with brute force
and lifelines, risk groups from a perfectly separating score are ordered with a tiny log-rank p-value. Every fitted
object survives a JSON round trip with identical predictions; bad inputs raise ValueError saying what to do."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bioperceiver.uncertainty.conformal_tasks import (
    ConformalMultilabel,
    ConformalSurvival,
    RiskGroups,
    censoring_kaplan_meier,
    conformal_rank,
    kaplan_meier,
    logrank_test,
    min_calibration_size,
    multilabel_coverage_summary,
    plot_risk_groups,
    step_at,
    weighted_conformal_quantile,
)

ALPHA = 0.1


# ---- generating models ------------------------------------------------------------------------------------------
def bernoulli_labels(n: int, n_labels: int, rng: np.random.Generator, missing: float = 0.0):
    """Known per-entry probabilities ``p`` ``(n, L)`` and labels ``y ~ Bernoulli(p)``; a share ``missing`` of the
    labels set to NaN completely at random."""
    p = rng.beta(0.7, 0.7, size=(n, n_labels))
    y = (rng.uniform(size=p.shape) < p).astype(np.float64)
    y[rng.uniform(size=p.shape) < missing] = np.nan
    return p, y


def exponential_survival(n: int, rng: np.random.Generator, censoring_rate: float = 0.3, type_one: bool = False):
    """``x ~ N(0, 1)``, ``T ~ Exp(rate = exp(x))`` (true median ``log 2 / exp(x)``), independent censoring
    ``C ~ Exp(censoring_rate)`` or, Type-I, ``C ~ U(0, 4)``; returns x, T, C, observed time, event."""
    x = rng.normal(size=n)
    t_true = rng.exponential(1.0 / np.exp(x))
    c = rng.uniform(0.0, 4.0, size=n) if type_one else rng.exponential(1.0 / censoring_rate, size=n)
    return x, t_true, c, np.minimum(t_true, c), (t_true <= c).astype(np.float64)


def brute_force_threshold(scores: np.ndarray, alpha: float) -> float:
    """Smallest candidate ``v`` with at least ``ceil((n + 1)(1 - alpha))`` calibration scores ``<= v``."""
    need = math.ceil((len(scores) + 1) * (1 - alpha) - 1e-9)
    for v in sorted(scores):
        if sum(s <= v for s in scores) >= need:
            return v
    return math.inf


# ---- multilabel ---------------------------------------------------------------------------------------------------
def test_multilabel_thresholds_and_sets_equal_brute_force():
    rng = np.random.default_rng(0)
    p, y = bernoulli_labels(60, 3, rng, missing=0.2)
    p[3, 1] = np.nan  # no prediction: ignored for calibration
    y[5, 0] = -1  # the "unknown" code
    cm = ConformalMultilabel.fit(p, y, ALPHA)
    for j in range(3):
        scores = [1.0 - p[i, j] if y[i, j] == 1 else p[i, j] for i in range(60) if y[i, j] in (0, 1) and p[i, j] >= 0]
        assert cm.n_calibration[j] == len(scores)
        assert cm.qhat[j] == brute_force_threshold(scores, ALPHA)
    test_p = rng.uniform(size=(40, 3))
    sets = cm.predict(test_p)
    for i in range(40):
        for j in range(3):
            assert sets[i, j, 1] == (1.0 - test_p[i, j] <= cm.qhat[j])
            assert sets[i, j, 0] == (test_p[i, j] <= cm.qhat[j])
    # Bonferroni: each label at alpha / L
    cb = ConformalMultilabel.fit(p, y, ALPHA, joint="bonferroni")
    for j in range(3):
        scores = [1.0 - p[i, j] if y[i, j] == 1 else p[i, j] for i in range(60) if y[i, j] in (0, 1) and p[i, j] >= 0]
        assert cb.qhat[j] == brute_force_threshold(scores, ALPHA / 3)
    # max score: one threshold over the rows with every label known
    cx = ConformalMultilabel.fit(p, y, ALPHA, joint=True)
    complete = [i for i in range(60) if all(y[i, j] in (0, 1) and p[i, j] >= 0 for j in range(3))]
    row_max = [max(1.0 - p[i, j] if y[i, j] == 1 else p[i, j] for j in range(3)) for i in complete]
    assert cx.joint == "max" and np.all(cx.qhat == brute_force_threshold(row_max, ALPHA))
    assert np.all(cx.n_calibration == len(complete))


def test_multilabel_marginal_coverage_at_nominal_level():
    """Labels drawn from the model's own probabilities, 20% missing at random: per-label coverage over 200 seeded
    repetitions is >= 1 - alpha (expected (ceil(0.9 * (n + 1))) / (n + 1) ~ 0.90-0.91) and not far above."""
    rng = np.random.default_rng(1)
    per_label, joint_cov, sizes = [], [], []
    for _ in range(200):
        p, y = bernoulli_labels(320, 4, rng, missing=0.2)
        cm = ConformalMultilabel.fit(p[:120], y[:120], ALPHA)
        res = cm.evaluate(p[120:], y[120:])
        per_label.append(res["per_label_coverage"])
        joint_cov.append(res["joint_coverage"])
        sizes.append(res["mean_set_size"])
    per_label = np.mean(per_label, axis=0)
    assert np.all(per_label >= 1 - ALPHA - 0.01), per_label
    assert np.all(per_label <= 1 - ALPHA + 0.03), per_label
    assert np.mean(joint_cov) < 1 - ALPHA - 0.1  # marginal sets do not cover all four labels at once
    assert 1.0 < np.mean(sizes) < 2.0


@pytest.mark.parametrize("joint", ["max", "bonferroni"])
def test_multilabel_joint_coverage(joint):
    rng = np.random.default_rng(2)
    joint_cov = []
    for _ in range(150):
        p, y = bernoulli_labels(400, 4, rng)
        cm = ConformalMultilabel.fit(p[:200], y[:200], ALPHA, joint=joint)
        joint_cov.append(cm.evaluate(p[200:], y[200:])["joint_coverage"])
    assert 1 - ALPHA - 0.01 <= np.mean(joint_cov) <= 1 - ALPHA + 0.04, np.mean(joint_cov)


def test_multilabel_summary_counts_and_missing_predictions():
    sets = np.array([[[False, True], [True, True]], [[False, False], [True, False]]])  # (2, 2, 2)
    labels = np.array([[1.0, 0.0], [0.0, np.nan]])
    res = multilabel_coverage_summary(sets, labels)
    assert res["per_label_coverage"] == [0.5, 1.0]
    assert res["joint_coverage"] == 0.5  # row 0 all covered, row 1 its known label missed
    assert res["mean_set_size"] == pytest.approx(1.0)  # sizes 1, 2, 0 over the three labelled entries
    assert (res["both_rate"], res["singleton_rate"], res["empty_rate"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert res["n_per_label"] == [2, 1] and res["n_rows"] == 2
    cm = ConformalMultilabel.fit(*bernoulli_labels(50, 2, np.random.default_rng(3)), ALPHA)
    assert not cm.predict(np.array([[np.nan, 0.5]]))[0, 0].any()  # no prediction -> empty set


def test_multilabel_round_trip_identical_predictions():
    rng = np.random.default_rng(4)
    p, y = bernoulli_labels(200, 5, rng, missing=0.1)
    test_p = rng.uniform(size=(500, 5))
    for joint in (None, "bonferroni", "max"):
        cm = ConformalMultilabel.fit(p, y, ALPHA, joint=joint, label_names=list("abcde"))
        back = ConformalMultilabel.from_dict(json.loads(json.dumps(cm.to_dict())))
        assert np.array_equal(back.predict(test_p), cm.predict(test_p))
        assert back.to_dict() == cm.to_dict() and back.label_names == tuple("abcde")


def test_multilabel_bad_inputs_say_what_to_do():
    rng = np.random.default_rng(5)
    p, y = bernoulli_labels(50, 3, rng)
    with pytest.raises(ValueError, match="labels shape"):
        ConformalMultilabel.fit(p, y[:, :2], ALPHA)
    with pytest.raises(ValueError, match=r"\(N, L\)"):
        ConformalMultilabel.fit(p[:, 0], y[:, 0], ALPHA)
    for alpha in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"alpha must be a number in \(0, 1\)"):
            ConformalMultilabel.fit(p, y, alpha)
    with pytest.raises(ValueError, match="must be 0 or 1"):
        ConformalMultilabel.fit(p, y * 2, ALPHA)
    with pytest.raises(ValueError, match="apply a sigmoid"):
        ConformalMultilabel.fit(p * 3 - 1, y, ALPHA)
    with pytest.raises(ValueError, match=r"too few labelled calibration rows.*needs 9"):
        ConformalMultilabel.fit(p[:8], y[:8], ALPHA)
    with pytest.raises(ValueError, match="too few"):  # Bonferroni at 0.1 / 3 needs 29 rows per label
        ConformalMultilabel.fit(p[:20], y[:20], ALPHA, joint="bonferroni")
    with pytest.raises(ValueError, match="joint="):
        ConformalMultilabel.fit(p, y, ALPHA, joint="union")
    with pytest.raises(ValueError, match="fitted on 3"):
        ConformalMultilabel.fit(p, y, ALPHA).predict(p[:, :2])
    assert min_calibration_size(0.1) == 9 and conformal_rank(9, 0.1) == 9 and conformal_rank(8, 0.1) == 9


# ---- Kaplan-Meier and log-rank --------------------------------------------------------------------------------------
def _tied_survival(rng: np.random.Generator, n: int = 80):
    time = rng.integers(1, 15, size=n).astype(np.float64)  # many ties
    event = (rng.uniform(size=n) < 0.6).astype(np.float64)
    return time, event


def test_kaplan_meier_and_censoring_km_equal_brute_force():
    rng = np.random.default_rng(6)
    time, event = _tied_survival(rng)
    times, surv = kaplan_meier(time, event)
    s, expected = 1.0, []
    for u in np.unique(time[event == 1]):
        s *= 1 - ((time == u) & (event == 1)).sum() / (time >= u).sum()
        expected.append(s)
    assert np.array_equal(times, np.unique(time[event == 1])) and np.allclose(surv, expected)
    ctimes, g = censoring_kaplan_meier(time, event)
    assert np.array_equal(ctimes, np.unique(time[event == 0]))
    s, expected = 1.0, []
    for u in np.unique(time[event == 0]):  # events at u precede censorings at u
        s *= 1 - ((time == u) & (event == 0)).sum() / ((time >= u).sum() - ((time == u) & (event == 1)).sum())
        expected.append(s)
    assert np.allclose(g, expected)
    grid = np.array([0.0, 1.0, 1.5, 7.0, 14.0, 30.0])
    right = [1.0 if u < times[0] else surv[np.flatnonzero(times <= u)[-1]] for u in grid]
    left = [1.0 if u <= times[0] else surv[np.flatnonzero(times < u)[-1]] for u in grid]
    assert np.allclose(step_at(times, surv, grid), right) and np.allclose(step_at(times, surv, grid, left=True), left)


def test_kaplan_meier_and_logrank_agree_with_lifelines():
    lifelines = pytest.importorskip("lifelines")
    from lifelines.statistics import multivariate_logrank_test

    rng = np.random.default_rng(7)
    time, event = _tied_survival(rng, 150)
    group = rng.integers(0, 3, size=150)
    time = time + group  # groups differ
    kmf = lifelines.KaplanMeierFitter().fit(time, event)
    times, surv = kaplan_meier(time, event)
    assert np.allclose(surv, kmf.survival_function_at_times(times).to_numpy())
    ours = logrank_test(time, event, group)
    ref = multivariate_logrank_test(time, group, event)
    assert ours["df"] == 2
    assert ours["chi2"] == pytest.approx(ref.test_statistic, rel=1e-9)
    assert ours["p_value"] == pytest.approx(ref.p_value, rel=1e-6)


# ---- risk groups ----------------------------------------------------------------------------------------------------
def test_risk_groups_perfect_score_ordered_curves_and_tiny_logrank_p(tmp_path):
    rng = np.random.default_rng(8)
    _, t_val, _, time_val, event_val = exponential_survival(300, rng)
    _, t_test, _, time_test, event_test = exponential_survival(300, rng)
    # a perfectly separating score: the true survival time itself, negated (higher risk = shorter survival)
    rg = RiskGroups.fit(-t_val, time_val, event_val, n_groups=3)
    assert np.allclose(rg.cuts, np.quantile(-t_val, [1 / 3, 2 / 3]))
    assert np.array_equal(rg.n, [100, 100, 100])
    grid = np.linspace(0.0, np.quantile(time_val, 0.95), 50)
    s = rg.group_survival(grid)  # (3, 50)
    assert np.all(np.diff(s, axis=0) <= 0)  # low >= medium >= high at every time
    assert np.all(np.diff(s, axis=1) <= 0)  # each curve non-increasing
    res = rg.evaluate(-t_test, time_test, event_test)
    step = np.diff(res["observed"], axis=0)
    assert np.all(step[np.isfinite(step)] <= 0)
    last_high = time_test[res["group"] == 2].max()  # the test KM is NaN after a group's last follow-up
    assert np.array_equal(np.isnan(res["observed"][2]), rg.horizons > last_high)
    assert res["logrank_p"] < 1e-20 and res["logrank_df"] == 2
    assert np.array_equal(res["group"], np.digitize(-t_test, rg.cuts)) and sum(res["n"]) == 300
    assert np.allclose(res["calibration_error"], np.abs(res["predicted"] - res["observed"]), equal_nan=True)
    png = plot_risk_groups(rg, -t_test, time_test, event_test, tmp_path / "km" / "risk_groups.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_risk_groups_calibrated_on_a_known_model():
    """Risk = x for T ~ Exp(exp(x)): each group's validation KM estimates its true survival
    E[exp(-exp(x) t) | x in group], and an independent test split reproduces it."""
    rng = np.random.default_rng(9)
    x_val, _, _, time_val, event_val = exponential_survival(3000, rng)
    x_test, _, _, time_test, event_test = exponential_survival(3000, rng)
    rg = RiskGroups.fit(x_val, time_val, event_val, n_groups=3, horizons=[0.25, 0.5, 1.0])
    x_ref = rng.normal(size=400_000)
    g_ref = rg.assign(x_ref)
    truth = np.array([[np.exp(-np.exp(x_ref[g_ref == k]) * h).mean() for h in rg.horizons] for k in range(3)])
    assert np.abs(rg.group_survival() - truth).max() < 0.04
    res = rg.evaluate(x_test, time_test, event_test)
    assert res["max_calibration_error"] < 0.06 and res["logrank_p"] < 1e-10
    pred = rg.predict_survival(np.r_[x_test[:5], np.nan])
    assert np.array_equal(pred[:5], rg.group_survival()[rg.assign(x_test[:5])]) and np.isnan(pred[5]).all()


def test_risk_groups_round_trip_and_bad_inputs():
    rng = np.random.default_rng(10)
    x, _, _, time, event = exponential_survival(200, rng)
    rg = RiskGroups.fit(x, time, event, n_groups=4)
    back = RiskGroups.from_dict(json.loads(json.dumps(rg.to_dict())))
    x_new = rng.normal(size=100)
    assert np.array_equal(back.assign(x_new), rg.assign(x_new))
    assert np.array_equal(back.predict_survival(x_new, [0.1, 0.3]), rg.predict_survival(x_new, [0.1, 0.3]))
    with pytest.raises(ValueError, match="one row per patient"):
        RiskGroups.fit(x, time[:-1], event)
    with pytest.raises(ValueError, match="n_groups must be an integer >= 2"):
        RiskGroups.fit(x, time, event, n_groups=1)
    with pytest.raises(ValueError, match="too few for 3 risk groups"):
        RiskGroups.fit(x[:5], time[:5], event[:5])
    with pytest.raises(ValueError, match="too many ties"):
        RiskGroups.fit(np.round(x > 1.0), time, event)
    with pytest.raises(ValueError, match="no event on validation"):
        RiskGroups.fit(x, time, np.where(x > np.quantile(x, 0.6), 0.0, event))
    with pytest.raises(ValueError, match="event must be 0"):
        RiskGroups.fit(x, time, event * 2)
    with pytest.raises(ValueError, match="times must be >= 0"):
        RiskGroups.fit(x, -time, event)


# ---- conformal lower prediction bounds ------------------------------------------------------------------------------
@pytest.mark.parametrize("type_one", [False, True])
def test_conformal_survival_covers_true_time(type_one):
    """True model (predicted median) and an uninformative score: P(T >= L(X)) >= 1 - alpha over 100 seeded
    calibration/test draws, and close to it (the log score with the true model is nearly exact)."""
    rng = np.random.default_rng(11 + type_one)
    cov, cov_noise, bounds = [], [], []
    for _ in range(100):
        x, _, c, time, event = exponential_survival(500, rng, type_one=type_one)
        x_test, t_test, *_ = exponential_survival(2000, rng, type_one=type_one)
        censor = c if type_one else None
        cs = ConformalSurvival.fit(
            time, event, predicted_time=np.log(2) / np.exp(x), alpha=ALPHA, c0=1.0, censor_time=censor
        )
        assert cs.weighted is not type_one
        lb = cs.lower_bound(predicted_time=np.log(2) / np.exp(x_test))
        assert np.all((lb >= 0) & (lb <= 1.0))
        cov.append((t_test >= lb).mean())
        bounds.append(lb.mean())
        noise = ConformalSurvival.fit(time, event, risk=rng.normal(size=500), alpha=ALPHA, c0=1.0, censor_time=censor)
        cov_noise.append((t_test >= noise.lower_bound(risk=rng.normal(size=2000))).mean())
    assert 1 - ALPHA - 0.01 <= np.mean(cov) <= 1 - ALPHA + 0.025, np.mean(cov)
    assert 1 - ALPHA - 0.01 <= np.mean(cov_noise) <= 1 - ALPHA + 0.04, np.mean(cov_noise)
    assert np.mean(bounds) > 0.1  # informative: the true 10% quantile log(1/0.9)/exp(x) averages ~0.17


def test_conformal_survival_thresholds_equal_brute_force():
    rng = np.random.default_rng(13)
    x, _, c, time, event = exponential_survival(120, rng)
    m = np.log(2) / np.exp(x)
    c0 = 0.8
    cs = ConformalSurvival.fit(time, event, predicted_time=m, alpha=ALPHA, c0=c0)

    # brute force: reverse KM P(C >= u) by a loop, IPC weights, the weighted quantile by scanning candidates
    def g_left(u):
        s = 1.0
        for v in np.unique(time[event == 0]):
            if v < u:
                s *= 1 - ((time == v) & (event == 0)).sum() / ((time >= v).sum() - ((time == v) & (event == 1)).sum())
        return s

    known = [i for i in range(120) if event[i] == 1 or time[i] >= c0]
    scores = [np.log(m[i]) - np.log(min(time[i], c0)) for i in known]
    weights = [1.0 / g_left(min(time[i], c0)) for i in known]
    total = sum(weights) + 1.0 / g_left(c0)
    expected = min(v for v in scores if sum(w for s, w in zip(scores, weights) if s <= v) / total >= 1 - ALPHA)
    assert cs.qhat == pytest.approx(expected, abs=1e-12) and cs.n_calibration == len(known)
    assert np.allclose(cs.lower_bound(predicted_time=m), np.minimum(m * np.exp(-expected), c0))
    # equal weights and test weight 1: the unweighted split-conformal rank
    s = rng.normal(size=57)
    assert weighted_conformal_quantile(s, np.ones(57), 1.0, ALPHA) == brute_force_threshold(list(s), ALPHA)
    assert weighted_conformal_quantile(s[:5], np.ones(5), 1.0, ALPHA) == math.inf
    # Type-I: plain split conformal over the patients followed to c0
    _, _, c, time, event = exponential_survival(120, rng, type_one=True)
    ct = ConformalSurvival.fit(time, event, predicted_time=m, alpha=ALPHA, c0=c0, censor_time=c, score="difference")
    use = c >= c0
    assert ct.qhat == brute_force_threshold(list(m[use] - np.minimum(time[use], c0)), ALPHA)


def test_conformal_survival_evaluate_brackets_true_coverage_and_round_trip():
    rng = np.random.default_rng(14)
    x, _, _, time, event = exponential_survival(800, rng)
    cs = ConformalSurvival.fit(time, event, risk=x, alpha=0.2)  # c0 = median observed time
    assert cs.c0 == pytest.approx(np.median(time))
    x_test, t_test, _, time_test, event_test = exponential_survival(3000, rng)
    res = cs.evaluate(time_test, event_test, risk=x_test)
    true_cov = (t_test >= cs.lower_bound(risk=x_test)).mean()
    assert res["coverage_lower"] <= true_cov <= res["coverage_upper"] and res["n"] == 3000
    assert true_cov >= 0.8 - 0.02
    back = ConformalSurvival.from_dict(json.loads(json.dumps(cs.to_dict())))
    assert np.array_equal(back.lower_bound(risk=x_test), cs.lower_bound(risk=x_test))
    assert np.isnan(cs.lower_bound(risk=np.array([np.nan, 0.0])))[0]


def test_conformal_survival_bad_inputs_say_what_to_do():
    rng = np.random.default_rng(15)
    x, _, c, time, event = exponential_survival(100, rng, type_one=True)
    with pytest.raises(ValueError, match="exactly one of risk="):
        ConformalSurvival.fit(time, event, alpha=ALPHA)
    with pytest.raises(ValueError, match="exactly one of risk="):
        ConformalSurvival.fit(time, event, risk=x, predicted_time=np.exp(-x))
    with pytest.raises(ValueError, match="one row per patient"):
        ConformalSurvival.fit(time, event[:-1], risk=x)
    with pytest.raises(ValueError, match=r"alpha must be a number in \(0, 1\)"):
        ConformalSurvival.fit(time, event, risk=x, alpha=1.0)
    with pytest.raises(ValueError, match="predicted_time must be > 0"):
        ConformalSurvival.fit(time, event, predicted_time=x)
    # 8 < 9 rows, and every weight <= 1/G(c0), the test patient's
    with pytest.raises(ValueError, match=r"too few calibration patients.*lower c0"):
        ConformalSurvival.fit(time[:8], event[:8], risk=x[:8])
    with pytest.raises(ValueError, match="no calibration patient is followed up to c0"):
        ConformalSurvival.fit(time, event, risk=x, c0=float(time.max()) + 1.0)
    with pytest.raises(ValueError, match="lower c0 or raise alpha"):
        ConformalSurvival.fit(time, event, risk=x, c0=3.9, censor_time=c, alpha=0.01)
    with pytest.raises(ValueError, match="censor_time must be >= the observed time"):
        ConformalSurvival.fit(time, event, risk=x, censor_time=time / 2)
    with pytest.raises(ValueError, match="c0 must be a finite time > 0"):
        ConformalSurvival.fit(time, event, risk=x, c0=0.0)
    with pytest.raises(ValueError, match="score"):
        ConformalSurvival.fit(time, event, risk=x, score="ratio")
