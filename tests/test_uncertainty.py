"""Uncertainty: split-conformal coverage at the nominal level on a synthetic task with a known posterior (and with
over-confident probabilities), temperature scaling recovers a known over-confidence and never worsens ECE, ECE
equals a brute-force loop (and scikit-learn's calibration curve), MC-dropout switches only dropout on, is seeded
and restores the model, ensembles of identical models do not disagree, and the report one finetuning run writes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import random_batch, tiny_config
from scipy.special import softmax
from torch import nn

from bioperceiver import BioPerceiverForSequenceClassification, BioPerceiverForSurvival
from bioperceiver.uncertainty import (
    calibrate_conformal,
    calibrate_conformal_regression,
    conformal_quantile,
    dropout_modules,
    ensemble_predict,
    expected_calibration_error,
    fit_temperature,
    mc_dropout_predict,
    negative_log_likelihood,
    plot_reliability_diagram,
    reliability_bins,
    summarize_samples,
    to_probabilities,
    uncertainty_report,
)

ALPHA = 0.1


# ---- a synthetic task with a known posterior ------------------------------------------------------------------
def gaussian_mixture(n: int, rng: np.random.Generator, radius: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """3 equiprobable classes, unit-covariance Gaussians at the vertices of a triangle: returns the true posterior
    logits ``(n, 3)`` (softmax = P(y | x) exactly) and labels drawn from the mixture."""
    mus = radius * np.array([[np.cos(a), np.sin(a)] for a in 2 * np.pi * np.arange(3) / 3])
    y = rng.integers(0, 3, n)
    x = mus[y] + rng.standard_normal((n, 2))
    return x @ mus.T - 0.5 * (mus**2).sum(axis=1), y


def splits(seed: int, n_cal: int = 2000, n_test: int = 5000):
    rng = np.random.default_rng(seed)
    return gaussian_mixture(n_cal, rng), gaussian_mixture(n_test, rng)


# ---- conformal ------------------------------------------------------------------------------------------------
def test_conformal_quantile_is_the_finite_sample_rank():
    scores = np.random.default_rng(0).permutation(np.arange(1, 101)) / 100.0  # 0.01 .. 1.00
    # ceil(101 * 0.9) = 91 -> the 91st smallest; ceil(101 * 0.95) = 96
    assert conformal_quantile(scores, 0.1) == 0.91
    assert conformal_quantile(scores, 0.05) == 0.96
    assert conformal_quantile(np.arange(1, 10) / 10, 0.1) == 0.9  # n=9: ceil(10*0.9) = 9 = n
    assert conformal_quantile(np.arange(1, 9) / 10, 0.1) == np.inf  # n=8: rank 9 > n -> every class
    with pytest.raises(ValueError):
        conformal_quantile(scores, 1.0)


@pytest.mark.parametrize("score, randomized", [("lac", True), ("aps", True), ("aps", False)])
def test_conformal_coverage_is_nominal_on_held_out_data(score, randomized):
    coverages, sizes = [], []
    for seed in range(10):
        (zc, yc), (zt, yt) = splits(seed)
        cp = calibrate_conformal(softmax(zc, axis=1), yc, ALPHA, score=score, randomized=randomized, seed=seed)
        res = cp.evaluate(softmax(zt, axis=1), yt)
        assert res["n"] == 5000
        coverages.append(res["coverage"])
        sizes.append(res["mean_set_size"])
        # validity, every seed (~3 sd; non-randomised APS scores pile up near 1, its coverage varies more)
        assert res["coverage"] >= 1 - ALPHA - (0.025 if randomized else 0.03), (seed, res)
        if seed == 0:
            assert abs(res["coverage"] - (1 - ALPHA)) < 0.02, res
    mean = float(np.mean(coverages))
    if randomized:  # exact: E[coverage] in [1 - alpha, 1 - alpha + 1/(n+1)]
        assert abs(mean - (1 - ALPHA)) < 0.01, coverages
    else:  # non-randomised APS is conservative, not below the level
        assert mean >= 1 - ALPHA - 0.005, coverages
    assert 1.0 < np.mean(sizes) < 3.0  # informative sets: neither singletons always nor all classes


def test_conformal_sets_are_valid_even_for_overconfident_probabilities_and_lac_is_smallest():
    (zc, yc), (zt, yt) = splits(0)
    pc, pt = softmax(3 * zc, axis=1), softmax(3 * zt, axis=1)
    lac = calibrate_conformal(pc, yc, ALPHA, score="lac")
    res = lac.evaluate(pt, yt)
    assert abs(res["coverage"] - (1 - ALPHA)) < 0.02
    aps = calibrate_conformal(pc, yc, ALPHA, score="aps", randomized=False).evaluate(pt, yt)
    assert res["mean_set_size"] <= aps["mean_set_size"]
    # sets by definition: LAC keeps class y iff 1 - p_y <= qhat
    sets = lac.predict_sets(pt)
    np.testing.assert_array_equal(sets, 1 - pt <= lac.qhat)
    # binary (N,) probabilities are read as two classes
    p1 = softmax(zc[:, :2], axis=1)[:, 1]
    y1 = (yc == 1).astype(int)
    cb = calibrate_conformal(p1, y1, ALPHA)
    assert cb.predict_sets(p1).shape == (len(p1), 2)
    # too few calibration rows: every set is all classes
    tiny = calibrate_conformal(pc[:5], yc[:5], ALPHA)
    assert tiny.qhat == np.inf and tiny.predict_sets(pt).all()


def test_regression_conformal_intervals_cover_and_match_the_known_noise():
    rng = np.random.default_rng(1)
    sigma, half_width = 0.5, 0.5 * 1.6448536  # the true 90% interval of N(0, sigma^2) noise
    covs = []
    for _ in range(5):
        x_c, x_t = rng.uniform(-2, 2, 2000), rng.uniform(-2, 2, 5000)
        f = np.sin
        y_c, y_t = f(x_c) + sigma * rng.standard_normal(2000), f(x_t) + sigma * rng.standard_normal(5000)
        reg = calibrate_conformal_regression(f(x_c), y_c, ALPHA)
        assert abs(reg.qhat - half_width) < 0.06
        res = reg.evaluate(f(x_t), y_t)
        covs.append(res["coverage"])
        assert abs(res["coverage"] - (1 - ALPHA)) < 0.025
        np.testing.assert_allclose(res["mean_interval_width"], 2 * reg.qhat)
    assert abs(np.mean(covs) - (1 - ALPHA)) < 0.01
    # heteroscedastic noise with a known scale: normalised scores keep coverage, widths follow the scale
    s_c, s_t = rng.uniform(0.1, 1.0, 2000), rng.uniform(0.1, 1.0, 5000)
    y_c, y_t = s_c * rng.standard_normal(2000), s_t * rng.standard_normal(5000)
    reg = calibrate_conformal_regression(np.zeros(2000), y_c, ALPHA, scale=s_c)
    assert abs(reg.qhat - 1.6448536) < 0.1
    assert abs(reg.evaluate(np.zeros(5000), y_t, scale=s_t)["coverage"] - (1 - ALPHA)) < 0.02


# ---- ECE -------------------------------------------------------------------------------------------------------
def _ece_loop(conf, hit, n_bins):
    """Brute force: bins (i/M, (i+1)/M], the first also holding 0."""
    edges = np.linspace(0, 1, n_bins + 1)
    total, n = 0.0, len(conf)
    for i in range(n_bins):
        members = [j for j in range(n) if (edges[i] < conf[j] <= edges[i + 1]) or (i == 0 and conf[j] == 0)]
        if members:
            acc = sum(hit[j] for j in members) / len(members)
            c = sum(conf[j] for j in members) / len(members)
            total += len(members) / n * abs(acc - c)
    return total


def test_ece_matches_a_brute_force_loop():
    rng = np.random.default_rng(0)
    n, c = 600, 4
    p = rng.dirichlet(np.full(c, 0.7), size=n)
    p[:5] = [[0.4, 0.2, 0.2, 0.2], [1.0, 0, 0, 0], [0, 0.6, 0.4, 0], [0.2, 0.8, 0, 0], [0.25, 0.25, 0.25, 0.25]]
    y = rng.integers(0, c, n)
    for n_bins in (5, 10, 15):
        top = expected_calibration_error(p, y, n_bins)
        assert top == pytest.approx(_ece_loop(p.max(1), p.argmax(1) == y, n_bins), abs=1e-12)
        cw = expected_calibration_error(p, y, n_bins, mode="classwise")
        ref = np.mean([_ece_loop(p[:, k], y == k, n_bins) for k in range(c)])
        assert cw == pytest.approx(ref, abs=1e-12)
        q, yb = p[:, 0], (y == 0).astype(int)  # binary: edges (0.2, 1.0, 0.0) included above
        assert expected_calibration_error(q, yb, n_bins, mode="binary") == pytest.approx(
            _ece_loop(q, yb == 1, n_bins), abs=1e-12
        )
    # multilabel class-wise ECE leaves unknown (-1) labels out
    ym = (rng.uniform(size=(n, c)) < p).astype(float)
    ym[rng.uniform(size=(n, c)) < 0.1] = -1
    ref = np.mean([_ece_loop(p[ym[:, k] >= 0, k], ym[ym[:, k] >= 0, k] == 1, 10) for k in range(c)])
    assert expected_calibration_error(p, ym, 10, mode="classwise") == pytest.approx(ref, abs=1e-12)
    with pytest.raises(ValueError, match="classwise"):
        expected_calibration_error(p, ym, 10)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error(np.log(p + 1e-3), y)
    # bins add up to the rows; a perfectly calibrated deterministic case has zero ECE
    bins = reliability_bins(p, y, 15)
    assert bins["count"].sum() == n
    assert expected_calibration_error(np.eye(3)[[0, 1, 2, 1]], np.array([0, 1, 2, 1])) == 0.0


def test_binary_ece_agrees_with_sklearn_calibration_curve():
    from sklearn.calibration import calibration_curve

    rng = np.random.default_rng(3)
    p = rng.beta(2, 3, 4000)
    y = (rng.uniform(size=4000) < p**1.5).astype(int)
    frac, mean = calibration_curve(y, p, n_bins=10, strategy="uniform")
    counts, _ = np.histogram(p, bins=np.linspace(0, 1, 11))  # no probability sits on an edge here
    ref = np.sum(counts[counts > 0] / len(p) * np.abs(frac - mean))
    assert expected_calibration_error(p, y, 10, mode="binary") == pytest.approx(ref, abs=1e-12)


# ---- temperature scaling ---------------------------------------------------------------------------------------
def test_temperature_scaling_recovers_the_overconfidence_and_lowers_ece():
    (zv, yv), (zt, yt) = splits(0, n_cal=8000, n_test=5000)
    ts = fit_temperature(3 * zv, yv)
    assert abs(ts.temperature - 3.0) < 0.2, ts
    assert ts.nll_after < ts.nll_before and not ts.at_bound
    # the fit is the NLL minimum (no better temperature on a fine grid)
    grid = np.linspace(2.0, 4.0, 201)
    assert ts.nll_after <= min(negative_log_likelihood(3 * zv, yv, temperature=t) for t in grid) + 1e-12
    for z, y in ((3 * zv, yv), (3 * zt, yt)):  # the validation split and held-out data
        before = expected_calibration_error(softmax(z, axis=1), y)
        after = expected_calibration_error(ts.predict_proba(z), y)
        assert after <= before
        assert before > 0.08 and after < 0.03
    # already-calibrated logits keep T close to 1
    assert abs(fit_temperature(zv, yv).temperature - 1.0) < 0.1


def test_temperature_scaling_binary_and_per_label_multilabel():
    rng = np.random.default_rng(2)
    z = rng.normal(0, 2, (6000, 2))
    y = (rng.uniform(size=z.shape) < 1 / (1 + np.exp(-z))).astype(float)
    binary = fit_temperature(2 * z[:, 0], y[:, 0], "binary")
    assert abs(binary.temperature - 2.0) < 0.2
    scaled = z * np.array([0.5, 3.0])
    y[:50, 0] = -1  # unknown labels are left out
    per = fit_temperature(scaled, y, "multilabel", per_label=True)
    np.testing.assert_allclose(per.temperature, [0.5, 3.0], rtol=0.1)
    shared = fit_temperature(scaled, y, "multilabel")
    assert np.ndim(shared.temperature) == 0 and per.nll_after <= shared.nll_after + 1e-12
    np.testing.assert_allclose(per.predict_proba(scaled), 1 / (1 + np.exp(-scaled / per.temperature)))


# ---- MC-dropout on a tiny BioPerceiver ---------------------------------------------------------------------------
def _clf(**overrides):
    torch.manual_seed(0)
    cfg = dict(num_labels=3, problem_type="single_label_classification", head_hidden_size=16)
    cfg.update(overrides)
    return BioPerceiverForSequenceClassification(tiny_config(**cfg))


def _batches():
    cfg = tiny_config()
    return [{"inputs": random_batch(cfg, batch_size=3, seed=s)} for s in range(2)]


def _flags(model):
    return [m.training for m in model.modules()]


def test_mc_dropout_without_dropout_is_the_deterministic_prediction():
    model = _clf(head_dropout=0.0, hidden_dropout=0.0, attention_dropout=0.0).eval()
    batches = _batches()
    with torch.no_grad():
        logits = torch.cat([model(**b).logits for b in batches]).double().numpy()
    res = mc_dropout_predict(model, batches, n_samples=5, seed=0)
    assert res.task == "multiclass" and res.samples.shape == (5, 6, 3) and res.mean.shape == (6, 3)
    assert np.all(res.std == 0) and np.all(res.mutual_information == 0)
    np.testing.assert_allclose(res.mean, softmax(logits, axis=1), rtol=1e-12, atol=0)
    np.testing.assert_allclose(res.predictive_entropy, -(res.mean * np.log(res.mean)).sum(1), rtol=1e-12)


@pytest.mark.parametrize("start", ["train", "mixed"])
def test_mc_dropout_samples_are_seeded_and_the_model_is_restored(start):
    model = _clf(head_dropout=0.3, hidden_dropout=0.1, attention_dropout=0.1)
    {"train": model.train, "mixed": lambda: model.eval().head.train()}[start]()
    before, rng_before = _flags(model), torch.get_rng_state()
    batches = _batches()
    seen = []

    def record(module, args, out):  # flags during the forward pass
        drop = {id(m) for m in dropout_modules(model)}
        seen.append(all(m.training == (id(m) in drop) for m in model.modules()))

    handle = model.head.register_forward_hook(record)
    a = mc_dropout_predict(model, batches, n_samples=4, seed=7)
    handle.remove()
    assert seen and all(seen)  # only the dropout (and attention-dropout) modules were in train mode
    assert _flags(model) == before
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG stream is untouched
    b = mc_dropout_predict(model, batches, n_samples=4, seed=7)
    np.testing.assert_array_equal(a.samples, b.samples)
    np.testing.assert_array_equal(a.mean, b.mean)
    assert np.all(a.std.max(axis=1) > 0) and np.all(a.mutual_information > 0)
    assert not np.array_equal(mc_dropout_predict(model, batches, n_samples=4, seed=8).samples, a.samples)
    # the first passes do not depend on how many are drawn
    np.testing.assert_array_equal(mc_dropout_predict(model, batches, n_samples=3, seed=7).samples, a.samples[:3])
    np.testing.assert_allclose(a.mean.sum(axis=1), 1.0)
    np.testing.assert_allclose(a.mutual_information, a.predictive_entropy - a.expected_entropy, atol=1e-12)


def test_mc_dropout_overrides_eval_inside_a_predict_callable_and_covers_attention_dropout():
    batch = random_batch(tiny_config(), batch_size=4, seed=3)

    def predict_like(m):  # like training.tasks.predict: switches to eval first
        m.eval()
        with torch.no_grad():
            return m(inputs=batch).logits

    model = _clf(head_dropout=0.0, hidden_dropout=0.0, attention_dropout=0.5).eval()
    res = mc_dropout_predict(model, predict_like, n_samples=4, seed=0)
    assert res.std.max() > 0
    off = mc_dropout_predict(model, predict_like, n_samples=4, seed=0, attention_dropout=False)
    assert np.all(off.std == 0)
    assert not model.training and not any(m.training for m in model.modules())
    # plain modality dicts work as batches too
    plain = mc_dropout_predict(model, [batch], n_samples=4, seed=0)
    np.testing.assert_array_equal(plain.samples, res.samples)


def test_mc_dropout_survival_gives_mean_and_std_of_the_risk():
    torch.manual_seed(0)
    model = BioPerceiverForSurvival(tiny_config(head_dropout=0.3)).eval()
    res = mc_dropout_predict(model, _batches(), n_samples=5, seed=0)
    assert res.task == "survival" and res.mean.shape == (6,) and res.std.shape == (6,)
    assert np.all(res.std > 0) and res.predictive_entropy is None
    np.testing.assert_allclose(res.mean, res.samples[:, :, 0].mean(axis=0), rtol=1e-12)
    assert set(res.columns()) == {"mc_mean", "mc_std"}


# ---- ensembles ---------------------------------------------------------------------------------------------------
def test_ensemble_of_identical_models_does_not_disagree():
    model = _clf().eval()
    batches = _batches()
    same = ensemble_predict([model, copy.deepcopy(model), copy.deepcopy(model)], batches)
    assert np.all(same.std == 0) and np.all(same.mutual_information == 0)
    with torch.no_grad():
        logits = torch.cat([model(**b).logits for b in batches]).double().numpy()
    np.testing.assert_allclose(same.mean, softmax(logits, axis=1), rtol=1e-12)
    torch.manual_seed(1)
    other = BioPerceiverForSequenceClassification(model.config).train()
    mixed = ensemble_predict([model, other], batches)
    assert np.all(mixed.mutual_information > 0) and other.training  # flags restored
    # prediction arrays give the same summary as the models
    arrays = [mixed.samples[0], mixed.samples[1]]
    np.testing.assert_array_equal(ensemble_predict(arrays, task="classification").mean, mixed.mean)
    probs = ensemble_predict([softmax(a, axis=1) for a in arrays], task="classification", from_logits=False)
    np.testing.assert_allclose(probs.mean, mixed.mean, rtol=1e-12)
    # Cox risks are identified up to a constant: centred members that differ by an offset agree
    risk = np.random.default_rng(0).normal(size=20)
    cox = ensemble_predict([risk, risk + 3.0], task="survival", center_risk=True)
    assert np.max(np.abs(cox.std)) < 1e-12
    assert np.allclose(ensemble_predict([risk, risk + 3.0], task="survival").std, 1.5)


def test_summaries_for_binary_and_multilabel_samples():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(7, 10, 3))
    ml = summarize_samples(z, "multilabel")
    p = 1 / (1 + np.exp(-z))
    np.testing.assert_allclose(ml.mean, p.mean(0), rtol=1e-12)
    np.testing.assert_allclose(ml.std, p.std(0), rtol=1e-10)
    h = lambda q: -(q * np.log(q) + (1 - q) * np.log(1 - q))  # noqa: E731
    np.testing.assert_allclose(ml.mutual_information, h(p.mean(0)) - h(p).mean(0), atol=1e-12)
    assert len(ml.columns(class_names=["a", "b", "c"])) == 9
    binary = summarize_samples(z[:, :, :1], "classification")
    assert binary.task == "binary" and binary.mean.shape == (10,)
    np.testing.assert_allclose(binary.mean, p[:, :, 0].mean(0), rtol=1e-12)


# ---- the report a finetuning run writes ------------------------------------------------------------------------
def test_classification_report_table_metrics_and_diagram(tmp_path):
    (zv, yv), (zt, yt) = splits(4, n_cal=1500, n_test=800)
    zv, zt = 3 * zv, 3 * zt
    zt[5] = np.nan  # a test row without a prediction
    mc = summarize_samples(zt[None] + np.random.default_rng(0).normal(0, 0.3, (8, *zt.shape)), "classification")
    rep = uncertainty_report(
        "classification", zv, yv, zt, yt, mc=mc, class_names=["a", "b", "c"], plot_path=tmp_path / "reliability.png"
    )
    t, m = rep.table, rep.metrics
    assert len(t) == 800 and t.iloc[5].drop("conformal_set").isna().all() and t["conformal_set"][5] is None
    expected = {
        "calibrated_prob_a",
        "calibrated_prob_b",
        "calibrated_prob_c",
        "confidence",
        "entropy",
        "conformal_set",
        "set_size",
        "label_in_set",
        "mc_std",
        "mc_entropy",
        "mc_mutual_information",
    }
    assert expected == set(t.columns)
    assert abs(m["temperature"] - 3.0) < 0.35 and m["ece_after"] <= m["ece_before"]
    assert m["val_ece_after"] <= m["val_ece_before"] and m["n_test"] == 799 and m["n_calibration"] == 1500
    assert m["coverage"] == pytest.approx(t["label_in_set"].mean())
    assert m["mean_set_size"] == pytest.approx(t["set_size"].mean())
    assert abs(m["coverage"] - (1 - ALPHA)) < 0.04
    sizes = t["conformal_set"].dropna().map(lambda s: len(s.split("|")) if s else 0)
    np.testing.assert_array_equal(sizes.to_numpy(), t["set_size"].dropna().to_numpy())
    probs = to_probabilities(zt, "classification", rep.temperature.temperature)
    np.testing.assert_allclose(t["confidence"].dropna(), np.delete(probs.max(1), 5))
    assert m["mc_samples"] == 8 and m["mean_mutual_information"] > 0
    assert rep.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = rep.card_rows()
    assert {r["quantity"] for r in rows} >= {"temperature", "ece_before", "ece_after", "coverage", "mean_set_size"}
    # a disjoint conformal share of the validation rows
    split = uncertainty_report("classification", zv, yv, zt, yt, conformal_fraction=0.5)
    assert split.metrics["n_calibration"] == 750 and split.temperature.n == 750


def test_regression_multilabel_and_survival_reports():
    rng = np.random.default_rng(5)
    pv, pt = rng.normal(size=(3000, 1)), rng.normal(size=(2000, 1))
    yv, yt = pv[:, 0] + 0.3 * rng.normal(size=3000), pt[:, 0] + 0.3 * rng.normal(size=2000)
    rep = uncertainty_report("regression", pv, yv, pt, yt, decode=lambda a: 10 * a + 50)
    lo, hi = rep.table["interval_lower"], rep.table["interval_upper"]
    np.testing.assert_allclose(hi - lo, 2 * rep.metrics["conformal_qhat"])
    assert abs(rep.metrics["conformal_qhat"] - 10 * 0.3 * 1.6448536) < 0.3  # in original units
    assert abs(rep.metrics["coverage"] - (1 - ALPHA)) < 0.025
    np.testing.assert_allclose((lo + hi) / 2, 10 * pt[:, 0] + 50)

    z = rng.normal(0, 2, (4000, 2))
    y = (rng.uniform(size=z.shape) < 1 / (1 + np.exp(-z))).astype(float)
    ml = uncertainty_report("multilabel", 2 * z[:2000], y[:2000], 2 * z[2000:], y[2000:], class_names=["x", "y"])
    assert {
        "calibrated_prob_x",
        "calibrated_prob_y",
        "entropy",
        "conformal_set_x",
        "conformal_set_y",
        "set_size",
    } == set(ml.table.columns)
    assert ml.metrics["ece_mode"] == "classwise" and ml.metrics["ece_after"] < ml.metrics["ece_before"]
    # per-label conformal sets: each label covered at >= 1 - alpha on exchangeable test rows
    assert abs(ml.metrics["coverage"] - (1 - ALPHA)) < 0.025
    covered = [
        [str(int(v)) in str(s).split("|") for s, v in zip(ml.table[f"conformal_set_{c}"], y[2000:, k])]
        for k, c in enumerate(["x", "y"])
    ]
    np.testing.assert_allclose(np.mean(covered, axis=1), [ml.metrics["coverage_x"], ml.metrics["coverage_y"]])

    risk = rng.normal(size=(50, 1))
    mc = summarize_samples(risk[None] + rng.normal(0, 0.1, (4, 50, 1)), "survival")
    sv = uncertainty_report("survival", risk, np.zeros((50, 2)), risk, None, mc=mc)
    assert {"mc_mean", "mc_std"} <= set(sv.table.columns) and sv.metrics["mean_mc_std"] > 0
    assert "conformal_skipped" in sv.metrics  # no event among the calibration rows: reported, not fatal

    # survival with a known model: exponential times with rate exp(risk), independent exponential censoring
    r = rng.normal(size=(4000, 1))
    t_true = rng.exponential(1 / np.exp(r[:, 0]))
    c = rng.exponential(2.0, size=4000)
    y = np.stack([np.minimum(t_true, c), (t_true <= c).astype(float)], 1)
    sv = uncertainty_report("survival", r[:2000], y[:2000], r[2000:], y[2000:])
    assert {"risk_group", "survival_lower_bound"} <= set(sv.table.columns)
    assert set(sv.table["risk_group"]) == {"low", "medium", "high"}
    assert sv.metrics["risk_groups_logrank_p"] < 1e-6 and sv.metrics["risk_groups_mean_calibration_error"] < 0.05
    true_coverage = float((t_true[2000:] >= sv.table["survival_lower_bound"]).mean())
    assert sv.metrics["conformal_coverage_lower"] <= true_coverage <= sv.metrics["conformal_coverage_upper"]
    assert true_coverage >= 1 - ALPHA - 0.03


def test_reliability_diagram_classwise(tmp_path):
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(3), 300)
    y = rng.integers(0, 3, 300)
    path = plot_reliability_diagram(
        y, p, tmp_path / "d" / "r.png", p**2 / (p**2).sum(1, keepdims=True), mode="classwise"
    )
    assert path.exists() and path.stat().st_size > 1000


def test_dropout_modules_cover_every_configured_dropout():
    model = _clf(head_dropout=0.2, hidden_dropout=0.1, attention_dropout=0.1)
    mods = dropout_modules(model)
    assert any(isinstance(m, nn.Dropout) for m in mods)
    assert any(type(m).__name__ in ("CrossAttention", "SelfAttention") for m in mods)
    assert not any(isinstance(m, nn.LayerNorm) for m in mods)
