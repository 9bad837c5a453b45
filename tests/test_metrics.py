"""Evaluation metrics against scikit-learn, scipy, lifelines and brute-force references; bootstrap intervals
(weighted kernels == the metric on resampled rows, determinism, patient-level resampling)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lifelines.utils import concordance_index as lifelines_cindex
from scipy.special import expit, softmax
from scipy.stats import pearsonr
from sklearn import metrics as skm

from bioperceiver.evaluation import (
    Resampler,
    bootstrap_metrics,
    censoring_survival,
    compute_task_metrics,
    concordance_index,
    metrics_with_ci,
    survival_metrics,
    time_dependent_auc,
)
from bioperceiver.evaluation.bootstrap import _w_binary, _w_multiclass, _w_multilabel, _w_regression, _w_survival
from bioperceiver.evaluation.metrics import auc_time_points, prepare_classification

SEEDS = range(6)


def close(a, b, tol=1e-10):
    """Equal within ``tol`` or both NaN."""
    return (np.isnan(a) and np.isnan(b)) or abs(a - b) <= tol


def assert_dicts_close(got: dict, want: dict, tol=1e-10):
    assert set(got) == set(want)
    bad = {k: (got[k], want[k]) for k in want if not close(got[k], want[k], tol)}
    assert not bad, bad


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def binary_data(seed, n=120):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    logits = np.round(rng.normal(size=n) + y, 1)  # rounding makes score ties
    return logits, y


def multiclass_data(seed, n=150, k=4, drop_class=None):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    if drop_class is not None:
        y[y == drop_class] = (drop_class + 1) % k
    logits = np.round(rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y], 1)
    return logits, y


def multilabel_data(seed, n=100, k=5):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < 0.35).astype(np.int64)
    y[:, 1] = 0  # a label with a single class present
    y[:, 2] = 1  # and one with only positives
    logits = np.round(rng.normal(size=(n, k)) + y, 1)
    return logits, y


def survival_data(seed, n=80, n_times=15, p_event=0.6):
    """Integer times (ties among events and between events and censorings) and risks rounded to create ties."""
    rng = np.random.default_rng(seed)
    time = rng.integers(1, n_times, n).astype(np.float64)
    event = (rng.random(n) < p_event).astype(np.int64)
    risk = np.round(rng.normal(size=n) - 0.1 * time, 1)
    return risk, time, event


# ---------------------------------------------------------------------------------------------------------------------
# Classification vs. scikit-learn
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_binary_matches_sklearn(seed):
    logits, y = binary_data(seed)
    p = expit(logits)
    got = compute_task_metrics("classification", logits, y)
    pred = (p > 0.5).astype(int)
    want = {
        "auroc": skm.roc_auc_score(y, p),
        "auprc": skm.average_precision_score(y, p),
        "accuracy": skm.accuracy_score(y, pred),
        "f1": skm.f1_score(y, pred),
        "brier": skm.brier_score_loss(y, p),
        "log_loss": skm.log_loss(y, p),
    }
    assert_dicts_close(got, want)
    # AUROC is a ranking metric: the logits give the same value as the probabilities
    assert close(got["auroc"], skm.roc_auc_score(y, logits))


@pytest.mark.parametrize("seed", SEEDS)
def test_multiclass_matches_sklearn(seed):
    logits, y = multiclass_data(seed)
    probs = softmax(logits, axis=1)
    got = compute_task_metrics("classification", logits, y, num_labels=4)
    pred = probs.argmax(1)
    onehot = np.eye(4)[y]
    want = {
        "auroc": skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"),
        "auprc": skm.average_precision_score(onehot, probs, average="macro"),
        "accuracy": skm.accuracy_score(y, pred),
        "f1_macro": skm.f1_score(y, pred, average="macro"),
        "f1_micro": skm.f1_score(y, pred, average="micro"),
    }
    assert_dicts_close(got, want)


def test_multiclass_with_absent_class_averages_over_present_classes():
    logits, y = multiclass_data(0, drop_class=2)
    assert 2 not in y
    probs = softmax(logits, axis=1)
    got = compute_task_metrics("classification", logits, y)
    present = [c for c in range(4) if c != 2]
    assert close(got["auroc"], np.mean([skm.roc_auc_score(y == c, probs[:, c]) for c in present]))
    assert close(got["auprc"], np.mean([skm.average_precision_score(y == c, probs[:, c]) for c in present]))
    pred = probs.argmax(1)
    assert close(got["f1_macro"], skm.f1_score(y, pred, average="macro", zero_division=np.nan))


@pytest.mark.parametrize("seed", SEEDS)
def test_multilabel_matches_sklearn_with_single_class_labels(seed, caplog):
    logits, y = multilabel_data(seed)
    probs = expit(logits)
    got = compute_task_metrics("multilabel", logits, y)
    defined = [c for c in range(y.shape[1]) if 0 < y[:, c].sum() < len(y)]
    with_pos = [c for c in range(y.shape[1]) if y[:, c].any()]
    assert 1 not in defined and 2 not in defined and 1 not in with_pos
    pred = (probs > 0.5).astype(int)
    want = {
        "auroc": np.mean([skm.roc_auc_score(y[:, c], probs[:, c]) for c in defined]),
        "auroc_micro": skm.roc_auc_score(y.ravel(), probs.ravel()),
        "auprc": np.mean([skm.average_precision_score(y[:, c], probs[:, c]) for c in with_pos]),
        "auprc_micro": skm.average_precision_score(y.ravel(), probs.ravel()),
        "accuracy": skm.accuracy_score(y, pred),
        "f1_macro": skm.f1_score(y, pred, average="macro", zero_division=np.nan),
        "f1_micro": skm.f1_score(y, pred, average="micro", zero_division=np.nan),
    }
    assert_dicts_close(got, want)
    assert "macro-averaged over the 3 of 5 labels" in caplog.text


def test_single_class_is_nan_not_an_error(caplog):
    logits = np.array([0.3, -1.0, 2.0, 0.1])
    got = compute_task_metrics("classification", logits, np.zeros(4, int))
    assert np.isnan(got["auroc"]) and np.isnan(got["auprc"])
    assert close(got["brier"], skm.brier_score_loss(np.zeros(4), expit(logits), pos_label=1))
    assert "AUROC undefined" in caplog.text


def test_from_logits_and_output_layouts():
    logits, y = binary_data(1)
    from_logits = compute_task_metrics("classification", logits, y)
    # probabilities with from_logits=False, a (N, 1) column, two softmax logits [0, z] and torch tensors agree
    assert_dicts_close(compute_task_metrics("classification", expit(logits), y, from_logits=False), from_logits)
    assert_dicts_close(compute_task_metrics("classification", logits[:, None], y), from_logits)
    two = np.stack([np.zeros_like(logits), logits], 1)
    assert_dicts_close(compute_task_metrics("classification", two, y), from_logits, tol=1e-9)
    assert_dicts_close(compute_task_metrics("classification", torch.tensor(logits), torch.tensor(y)), from_logits)

    mc_logits, mc_y = multiclass_data(1)
    assert_dicts_close(
        compute_task_metrics("classification", softmax(mc_logits, axis=1), mc_y, from_logits=False),
        compute_task_metrics("classification", mc_logits, mc_y),
    )
    ml_logits, ml_y = multilabel_data(1)
    assert_dicts_close(
        compute_task_metrics("multilabel", expit(ml_logits), ml_y, from_logits=False),
        compute_task_metrics("multilabel", ml_logits, ml_y),
    )
    # probabilities are not passed through a sigmoid again; logits given as probabilities are an error
    p = expit(logits)
    raw = compute_task_metrics("classification", p, y, from_logits=False, threshold=0.3)
    assert close(raw["accuracy"], skm.accuracy_score(y, p > 0.3))
    assert not close(raw["brier"], compute_task_metrics("classification", p, y)["brier"])
    with pytest.raises(ValueError, match="from_logits"):
        compute_task_metrics("classification", logits, y, from_logits=False)


def test_threshold_and_logit_zero_is_negative():
    y = np.array([0, 1, 1, 0])
    logits = np.array([0.0, 0.0, 1.0, -1.0])
    assert compute_task_metrics("classification", logits, y)["accuracy"] == 0.75
    assert compute_task_metrics("classification", logits, y, threshold=0.2)["accuracy"] == 0.5


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="0/1"):
        compute_task_metrics("classification", np.zeros(3), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="NaN"):
        compute_task_metrics("classification", np.array([0.0, np.nan]), np.array([0, 1]))
    with pytest.raises(ValueError, match="num_labels"):
        compute_task_metrics("classification", np.zeros((3, 3)), np.zeros(3), num_labels=2)
    with pytest.raises(ValueError, match="task"):
        compute_task_metrics("segmentation", np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="event"):
        compute_task_metrics("survival", np.zeros(3), np.ones(3), event=np.array([0, 2, 1]))


# ---------------------------------------------------------------------------------------------------------------------
# Regression vs. scikit-learn / scipy
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
def test_regression_matches_sklearn_and_scipy(k):
    rng = np.random.default_rng(k)
    target = rng.normal(size=(60, k))
    pred = target + rng.normal(scale=0.7, size=(60, k))
    got = compute_task_metrics("regression", pred.squeeze(), target.squeeze())
    want = {
        "mse": skm.mean_squared_error(target, pred),
        "rmse": skm.root_mean_squared_error(target, pred),
        "mae": skm.mean_absolute_error(target, pred),
        "r2": skm.r2_score(target, pred),
        "pearson": np.mean([pearsonr(pred[:, j], target[:, j])[0] for j in range(k)]),
    }
    assert_dicts_close(got, want)


def test_pearson_nan_for_constant_predictions():
    got = compute_task_metrics("regression", np.ones(5), np.arange(5.0))
    assert np.isnan(got["pearson"])
    assert close(got["r2"], skm.r2_score(np.arange(5.0), np.ones(5)))


# ---------------------------------------------------------------------------------------------------------------------
# Survival: Harrell's C vs. lifelines, td-AUC vs. a brute-force reference
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_cindex_matches_lifelines_with_ties_and_censoring(seed):
    risk, time, event = survival_data(seed, n=30 + 7 * seed)
    assert len(np.unique(time)) < len(time) and len(np.unique(risk)) < len(risk)
    assert close(concordance_index(time, risk, event), lifelines_cindex(time, -risk, event))


def test_cindex_without_events_argument_and_label_layout():
    risk, time, event = survival_data(3)
    assert close(concordance_index(time, risk), lifelines_cindex(time, -risk))
    labels = np.stack([time, event], 1)
    assert close(compute_task_metrics("survival", risk, labels)["c_index"], lifelines_cindex(time, -risk, event))
    assert close(concordance_index(time, risk, event), 1 - concordance_index(time, -risk, event))


def test_cindex_tie_rules_by_hand():
    # (event at 1, risk 2) vs. (censored at 1, risk 1): admissible, concordant
    # (event at 1) vs. (event at 1): tied event times, not admissible
    # (event at 1, risk 2) vs. (event at 3, risk 2): admissible, risk tie = 1/2
    time = np.array([1.0, 1.0, 1.0, 3.0])
    event = np.array([1, 0, 1, 1])
    risk = np.array([2.0, 1.0, 5.0, 2.0])
    # pairs: (0,1) conc; (2,1) conc; (0,3) tie; (2,3) conc -> (3 + 0.5) / 4
    assert concordance_index(time, risk, event) == 3.5 / 4
    assert close(concordance_index(time, risk, event), lifelines_cindex(time, -risk, event))


def test_cindex_nan_without_admissible_pairs(caplog):
    assert np.isnan(concordance_index(np.array([1.0, 2.0, 3.0]), np.array([0.1, 0.2, 0.3]), np.zeros(3)))
    assert "no admissible pair" in caplog.text


def reference_censoring_km(time, event):
    """Reverse Kaplan-Meier, loop form: at each distinct time, events leave the risk set before censorings."""
    g, out = 1.0, {}
    for u in np.unique(time):
        at_risk = (time >= u).sum() - ((time == u) & event).sum()
        censored = ((time == u) & ~event).sum()
        g *= 1.0 - censored / at_risk if at_risk > 0 else 1.0
        out[u] = g
    return out


def reference_td_auc(time, risk, event, t, cens_time=None, cens_event=None):
    """Cumulative/dynamic AUC by a double loop over (case, control) pairs with weights 1 / G(T_case)."""
    event = event.astype(bool)
    km = reference_censoring_km(time, event) if cens_time is None else reference_censoring_km(cens_time, cens_event)
    knots = np.array(sorted(km))

    def g_at(s):
        before = knots[knots <= s]
        return km[before[-1]] if len(before) else 1.0

    if not (time > t).any():
        return np.nan
    num = den = 0.0
    for i in range(len(time)):
        if not (event[i] and time[i] <= t):
            continue
        w = 1.0 / g_at(time[i])
        for j in range(len(time)):
            if time[j] > t:
                den += w
                num += w * (1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0)
    return num / den if den else np.nan


@pytest.mark.parametrize("seed", range(6))
def test_time_dependent_auc_matches_brute_force(seed):
    risk, time, event = survival_data(seed, n=60)
    times = np.quantile(time[event == 1], [0.1, 0.25, 0.5, 0.75, 0.9])
    got = time_dependent_auc(time, risk, event, times)
    want = [reference_td_auc(time, risk, event, t) for t in times]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    # with the censoring distribution fitted on another ("training") split
    _, train_time, train_event = survival_data(seed + 100, n=90)
    got = time_dependent_auc(time, risk, event, times, censoring_time=train_time, censoring_event=train_event)
    want = [reference_td_auc(time, risk, event, t, train_time, train_event.astype(bool)) for t in times]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_censoring_km_matches_loop():
    _, time, event = survival_data(4, n=50)
    unique, g = censoring_survival(time, event.astype(bool))
    ref = reference_censoring_km(time, event.astype(bool))
    np.testing.assert_allclose(g[0], [ref[u] for u in unique], rtol=0, atol=1e-12)


def test_time_dependent_auc_without_censoring_is_case_control_auroc():
    rng = np.random.default_rng(5)
    time = rng.integers(1, 20, 70).astype(float)
    risk = np.round(rng.normal(size=70) - 0.1 * time, 1)
    for t in (5.0, 10.0, 14.0):
        keep = (time <= t) | (time > t)
        case = time <= t
        assert close(time_dependent_auc(time, risk, np.ones(70), [t])[0], skm.roc_auc_score(case[keep], risk[keep]))


def test_time_dependent_auc_nan_without_controls(caplog):
    risk, time, event = survival_data(0)
    assert np.isnan(time_dependent_auc(time, risk, event, [time.max() + 1])[0])
    assert "undefined" in caplog.text


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("sksurv") is None, reason="scikit-survival not installed (optional)"
)
def test_time_dependent_auc_matches_sksurv():
    from sksurv.metrics import cumulative_dynamic_auc
    from sksurv.util import Surv

    risk, time, event = survival_data(2, n=80)
    # scikit-survival refuses data whose censoring survival G reaches 0 at any observed time (here: events tied with
    # censorings at the last follow-up time), even at evaluation times before it; ours is NaN only where a case has
    # G = 0. Compare on data both define: everything at the last follow-up time censored.
    event = np.where(time == time.max(), 0, event)
    times = np.quantile(time[event == 1], [0.25, 0.5, 0.75])
    y = Surv.from_arrays(event.astype(bool), time)
    want, _ = cumulative_dynamic_auc(y, y, risk, times)
    np.testing.assert_allclose(time_dependent_auc(time, risk, event, times), want, atol=1e-10)


def test_survival_metrics_names_and_time_points():
    risk, time, event = survival_data(1, n=80)
    got = survival_metrics(risk, time, event)
    assert set(got) == {"c_index", "td_auc_q25", "td_auc_q50", "td_auc_q75"}
    q = np.quantile(time[event == 1], [0.25, 0.5, 0.75])
    for name, t in zip(["td_auc_q25", "td_auc_q50", "td_auc_q75"], q):
        assert close(got[name], reference_td_auc(time, risk, event, t))
    explicit = survival_metrics(risk, time, event, times=[4, 8.5])
    assert set(explicit) == {"c_index", "td_auc_t4", "td_auc_t8.5"}
    # fewer than min_events events: the names stay, the values are NaN
    few = np.zeros_like(event)
    few[:3] = 1
    assert all(np.isnan(v) for v in auc_time_points(time, few).values())
    assert np.isnan(survival_metrics(risk, time, few)["td_auc_q50"])


# ---------------------------------------------------------------------------------------------------------------------
# Weighted kernels == the metric on the resampled rows
# ---------------------------------------------------------------------------------------------------------------------


def repeat_weights(n, seed, b=8):
    """Random integer row counts (zeros included), as a bootstrap draws them, plus a row of ones."""
    rng = np.random.default_rng(seed)
    w = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(b - 1)])
    return np.vstack([np.ones(n), w]).astype(np.float64)


def check_kernel(kernel, w, metric_on_rows):
    values = kernel(w)
    for b, row in enumerate(w):
        idx = np.repeat(np.arange(len(row)), row.astype(int))
        want = metric_on_rows(idx)
        got = {k: float(v[b]) for k, v in values.items()}
        assert_dicts_close(got, want, tol=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_classification_kernels_equal_metrics_on_resampled_rows(seed):
    logits, y = binary_data(seed, n=40)
    _, p, yy = prepare_classification(logits, y)
    check_kernel(
        lambda w: _w_binary(yy, p, w, 0.5),
        repeat_weights(40, seed),
        lambda i: compute_task_metrics("classification", logits[i], y[i]),
    )
    logits, y = multiclass_data(seed, n=40)
    _, p, yy = prepare_classification(logits, y)
    check_kernel(
        lambda w: _w_multiclass(yy, p, w),
        repeat_weights(40, seed),
        lambda i: compute_task_metrics("classification", logits[i], y[i]),
    )
    logits, y = multilabel_data(seed, n=40)
    _, p, yy = prepare_classification(logits, y, "multi_label_classification")
    check_kernel(
        lambda w: _w_multilabel(yy, p, w, 0.5),
        repeat_weights(40, seed),
        lambda i: compute_task_metrics("multilabel", logits[i], y[i]),
    )


def test_regression_and_survival_kernels_equal_metrics_on_resampled_rows():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(40, 2))
    pred = target + rng.normal(size=(40, 2))
    check_kernel(
        lambda w: _w_regression(pred, target, w),
        repeat_weights(40, 1),
        lambda i: compute_task_metrics("regression", pred[i], target[i]),
    )
    risk, time, event = survival_data(2, n=50)
    times = [4.0, 7.0, 10.0]
    named = auc_time_points(time, event, times)
    check_kernel(
        lambda w: _w_survival(risk, time, event.astype(bool), named, w),
        repeat_weights(50, 2),
        lambda i: compute_task_metrics("survival", risk[i], time[i], event=event[i], times=times),
    )


def test_unit_weights_equal_plain_metrics():
    for task, (pred, labels), kernel in [
        ("classification", binary_data(7), lambda y, p, w: _w_binary(y, p, w, 0.5)),
        ("classification", multiclass_data(7), _w_multiclass),
        ("multilabel", multilabel_data(7), lambda y, p, w: _w_multilabel(y, p, w, 0.5)),
    ]:
        problem = "multi_label_classification" if task == "multilabel" else "single_label_classification"
        _, p, y = prepare_classification(pred, labels, problem)
        got = {k: float(v[0]) for k, v in kernel(y, p, np.ones((1, len(y)))).items()}
        assert_dicts_close(got, compute_task_metrics(task, pred, labels))
    # probabilities of exactly 0 and 1 (log-loss clipped as scikit-learn clips it)
    p, y = np.array([0.0, 1.0, 1.0, 0.3, 0.0]), np.array([1, 0, 1, 0, 0])
    got = {k: float(v[0]) for k, v in _w_binary(y, p, np.ones((1, 5)), 0.5).items()}
    assert_dicts_close(got, compute_task_metrics("classification", p, y, from_logits=False))
    assert close(got["log_loss"], skm.log_loss(y, p))


# ---------------------------------------------------------------------------------------------------------------------
# Bootstrap intervals
# ---------------------------------------------------------------------------------------------------------------------


TASK_DATA = {
    "classification": lambda: (*binary_data(3, n=80), {}),
    "multiclass": lambda: (*multiclass_data(3, n=80), {}),
    "multilabel": lambda: (*multilabel_data(3, n=80), {}),
    "regression": lambda: (np.random.default_rng(3).normal(size=80), np.random.default_rng(4).normal(size=80), {}),
    "survival": lambda: (lambda r, t, e: (r, t, {"event": e}))(*survival_data(3, n=80)),
}


def task_of(name):
    return "classification" if name == "multiclass" else name


@pytest.mark.parametrize("name", list(TASK_DATA))
def test_bootstrap_point_equals_metrics_and_matches_generic_bootstrap(name):
    pred, labels, kw = TASK_DATA[name]()
    task = task_of(name)
    out = metrics_with_ci(task, pred, labels, n_resamples=60, seed=11, **kw)
    point = compute_task_metrics(task, pred, labels, **kw)
    for k, v in point.items():
        assert close(out[k], v)
        if not np.isnan(v):
            assert out[f"{k}_ci_low"] <= v <= out[f"{k}_ci_high"], k
            assert out[f"{k}_ci_low"] < out[f"{k}_ci_high"], k
    assert out["n"] == len(pred) and out["n_resamples"] == 60 and close(out["ci_level"], 0.95)

    # the weighted kernels reproduce scikit-learn / lifelines-equivalent metrics on the resampled rows
    if "event" in kw:
        # td-AUC times are fixed from the full data so that every resample estimates the same AUC(t)
        times = [out[f"td_auc_q{q}_time"] for q in (25, 50, 75)]
        arrays = (pred, labels, kw["event"])
        fn = lambda r, t, e: compute_task_metrics(task, r, t, event=e, times=times)  # noqa: E731
        generic = bootstrap_metrics(fn, *arrays, n_resamples=60, seed=11)
        generic = {f"td_auc_q{q}": generic[f"td_auc_t{t:g}"] for q, t in zip((25, 50, 75), times)} | {
            "c_index": generic["c_index"]
        }
    else:
        arrays, fn = (pred, labels), lambda p, y: compute_task_metrics(task, p, y)
        generic = bootstrap_metrics(fn, *arrays, n_resamples=60, seed=11)
    assert set(generic) == set(point)
    for k, ci in generic.items():
        assert close(out[f"{k}_ci_low"], ci.low, 1e-9) and close(out[f"{k}_ci_high"], ci.high, 1e-9), k
        assert out[f"{k}_ci_n_used"] == ci.n_used, k


def test_bootstrap_survival_extra_keys():
    risk, time, event = survival_data(5, n=80)
    out = metrics_with_ci("survival", risk, time, event=event, n_resamples=20)
    assert out["n_events"] == event.sum()
    np.testing.assert_allclose(
        [out["td_auc_q25_time"], out["td_auc_q50_time"], out["td_auc_q75_time"]],
        np.quantile(time[event == 1], [0.25, 0.5, 0.75]),
    )
    same = metrics_with_ci("survival", risk, np.stack([time, event], 1), n_resamples=20)
    assert_dicts_close(same, out)


def test_bootstrap_seed_determinism():
    logits, y = binary_data(2, n=60)
    a = metrics_with_ci("classification", logits, y, n_resamples=50, seed=1)
    b = metrics_with_ci("classification", logits, y, n_resamples=50, seed=1)
    c = metrics_with_ci("classification", logits, y, n_resamples=50, seed=2)
    assert a == b
    assert any(a[k] != c[k] for k in a if k.endswith(("_ci_low", "_ci_high")))


def test_single_class_resamples_are_skipped_and_counted():
    # one positive among 30: about a third of the resamples miss it, AUROC is undefined there
    y = np.zeros(30, int)
    y[0] = 1
    logits = np.random.default_rng(0).normal(size=30)
    out = metrics_with_ci("classification", logits, y, n_resamples=200, seed=0)
    assert 0 < out["auroc_ci_n_used"] < 200
    assert out["accuracy_ci_n_used"] == 200
    drawn = [int(y[idx].any()) for idx in Resampler(30, 200, seed=0).indices()]
    assert out["auroc_ci_n_used"] == sum(drawn)
    # undefined in every resample: NaN interval, no exception
    none = metrics_with_ci("classification", logits, np.zeros(30, int), n_resamples=20)
    assert np.isnan(none["auroc"]) and np.isnan(none["auroc_ci_low"]) and none["auroc_ci_n_used"] == 0


def test_resampler_weights_and_indices_agree():
    groups = np.repeat(np.arange(10), np.arange(1, 11))  # 55 rows, group sizes 1..10
    rs = Resampler(len(groups), n_resamples=25, seed=3, groups=groups)
    w = np.vstack(list(rs.weights(chunk=7)))
    idx = list(rs.indices())
    assert w.shape == (25, 55) and len(idx) == 25
    for row, ix in zip(w, idx):
        np.testing.assert_array_equal(row, np.bincount(ix, minlength=55))
        for g in range(10):  # a group is drawn whole: equal weight on all of its rows
            assert len(np.unique(row[groups == g])) == 1
    assert rs.n_units == 10


def test_group_bootstrap_unchanged_by_duplicating_patient_rows():
    risk, time, event = survival_data(6, n=60)
    patients = np.arange(60)
    base = metrics_with_ci("survival", risk, time, event=event, groups=patients, n_resamples=80, seed=4)
    dup = metrics_with_ci(
        "survival",
        np.repeat(risk, 2),
        np.repeat(time, 2),
        event=np.repeat(event, 2),
        groups=np.repeat(patients, 2),
        n_resamples=80,
        seed=4,
    )
    assert base["n_groups"] == dup["n_groups"] == 60
    assert dup["n"] == 120 and dup["n_events"] == 2 * base["n_events"]
    counts = ("n", "n_events")
    # same patients drawn, every weight doubled: every metric and interval is unchanged
    assert_dicts_close(
        {k: v for k, v in dup.items() if k not in counts}, {k: v for k, v in base.items() if k not in counts}, 1e-9
    )
    # resampling rows instead of patients treats the copies as independent: narrower intervals
    rows = metrics_with_ci(
        "survival", np.repeat(risk, 2), np.repeat(time, 2), event=np.repeat(event, 2), n_resamples=80, seed=4
    )
    assert "n_groups" not in rows
    assert rows["c_index_ci_high"] - rows["c_index_ci_low"] < base["c_index_ci_high"] - base["c_index_ci_low"]


def test_group_bootstrap_classification_with_string_ids():
    logits, y = binary_data(8, n=60)
    ids = np.array([f"patient-{i // 3}" for i in range(60)])
    out = metrics_with_ci("classification", logits, y, groups=ids, n_resamples=40, seed=0)
    generic = bootstrap_metrics(
        lambda p, t: compute_task_metrics("classification", p, t), logits, y, n_resamples=40, seed=0, groups=ids
    )
    assert out["n_groups"] == 20
    for k, ci in generic.items():
        assert close(out[f"{k}_ci_low"], ci.low, 1e-9) and close(out[f"{k}_ci_high"], ci.high, 1e-9), k


def test_bootstrap_alpha_and_validation():
    logits, y = binary_data(9, n=60)
    wide = metrics_with_ci("classification", logits, y, n_resamples=100, alpha=0.05)
    narrow = metrics_with_ci("classification", logits, y, n_resamples=100, alpha=0.5)
    assert close(narrow["ci_level"], 0.5)
    assert wide["auroc_ci_low"] <= narrow["auroc_ci_low"] <= narrow["auroc_ci_high"] <= wide["auroc_ci_high"]
    with pytest.raises(ValueError, match="alpha"):
        metrics_with_ci("classification", logits, y, alpha=1.5)
    with pytest.raises(ValueError, match="group"):
        metrics_with_ci("classification", logits, y, groups=np.arange(3))
    with pytest.raises(ValueError, match="task"):
        metrics_with_ci("ranking", logits, y)
