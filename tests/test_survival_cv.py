"""Pure parts of benchmarks/survival_cv.py: patient-level stratified folds, train-only fitting, paired bootstrap."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from script_loader import load_script

pytest.importorskip("lifelines")
pytest.importorskip("sksurv")

cv = load_script("benchmarks/survival_cv.py")


def _rows(n_patients=60, repeats=2, seed=0):
    rng = np.random.default_rng(seed)
    patients = np.repeat([f"p{i}" for i in range(n_patients)], repeats)
    events = np.repeat(rng.random(n_patients) < 0.3, repeats).astype(int)
    index = [f"s{i}" for i in range(len(patients))]
    return pd.Series(patients, index=index), pd.Series(events, index=index)


class StubRunner:
    """Stands in for ``finetune_tasks.BPRunner`` in ``run_bp``: records every call's tag, settings, extra argv and
    modalities, and returns a fixed finetuning result predicting for ``test_id`` (plus ``extra_record``)."""

    def __init__(self, test_id="c", epochs=3, **extra_record):
        self.test_id, self.epochs, self.extra_record = test_id, epochs, extra_record
        self.calls = []

    @property
    def tags(self):
        return [c["tag"] for c in self.calls]

    def run(self, tag, path, task_args, cfg, *, seed, modalities, extra):
        self.calls.append({"tag": tag, "cfg": cfg, "extra": list(extra), "modalities": modalities})
        pred = pd.DataFrame({"sample_id": [self.test_id], "risk": [0.5]})
        return {"pred": pred, "validation": 0.6, "test": 0.7, "epochs": self.epochs, **self.extra_record}


def test_folds_are_patient_level_stratified_and_partition():
    patients, events = _rows()
    folds = cv.make_folds(patients, events, n_folds=5, seed=0, val_fraction=0.2)
    assert len(folds) == 5
    tests = np.concatenate([f["test"] for f in folds])
    assert sorted(tests) == sorted(patients.index)  # test parts partition every row once
    rate = events.groupby(patients).max().mean()
    for f in folds:
        parts = {k: set(patients.loc[v]) for k, v in f.items()}
        assert not (parts["train"] & parts["validation"] or parts["train"] & parts["test"])
        assert not parts["validation"] & parts["test"]
        assert set().union(*parts.values()) == set(patients)  # every patient in exactly one part
        for v in f.values():  # all of a patient's rows go together
            assert set(patients.loc[v].value_counts()) == {2}
        test_rate = events.loc[f["test"]].groupby(patients.loc[f["test"]]).max().mean()
        assert abs(test_rate - rate) <= 1 / len(parts["test"]) + 1e-9  # stratified by event
        assert 0.15 < len(parts["validation"]) / (len(parts["train"]) + len(parts["validation"])) < 0.25
    again = cv.make_folds(patients, events, n_folds=5, seed=0)
    assert all((a["test"] == b["test"]).all() for a, b in zip(folds, again))
    with pytest.raises(ValueError, match="folds need"):
        cv.make_folds(patients, events * 0, n_folds=5, seed=0)


@pytest.fixture()
def cohort(tmp_path):
    rng = np.random.default_rng(1)
    n, g = 90, 40
    x = rng.normal(size=(n, g))
    risk = x[:, 0] + 0.5 * x[:, 1]
    time = rng.exponential(np.exp(-risk))
    event = (rng.random(n) < 0.7).astype(int)
    pids = [f"p{i}" for i in range(n)]
    (tmp_path / "omics").mkdir()
    pd.DataFrame(x, index=pd.Index(pids, name="pid"), columns=[f"G{j}" for j in range(g)]).astype("float32").to_parquet(
        tmp_path / "omics" / "c.parquet"
    )
    rows = pd.DataFrame(
        {
            "sample_id": pids,
            "patient_id": pids,
            "omics_expression": [f"omics/c.parquet#row={p}" for p in pids],
            "tabular_clinical": [
                json.dumps({"age": float(a), "er": e})
                for a, e in zip(rng.normal(60, 9, n), rng.choice(["pos", "neg"], n))
            ],
            "label_survival_time": time,
            "label_survival_event": event,
            "meta_source": "survset_c",
        },
        index=pids,
    )
    folds = cv.make_folds(rows["patient_id"], rows["label_survival_event"], n_folds=3, seed=0)
    return tmp_path, rows, folds[0]


def _fit(base, rows, part, model):
    feats = cv.ft.SurvivalFeatures(base, rows, n_genes=30)
    feats.fit(list(part["train"]))
    tr, va, te = part["train"], part["validation"], part["test"]
    if model == "rsf":
        return feats, cv.fit_rsf(feats, rows, tr, va, te, seed=0, n_estimators=20)
    return feats, cv.fit_cox(feats, rows, tr, va, te, with_pcs=model == "cox_clinical_pcs")


@pytest.mark.parametrize("model", ["cox_clinical", "cox_clinical_pcs", "rsf"])
def test_baselines_fit_on_training_rows_only(cohort, model):
    base, rows, part = cohort
    feats, ref = _fit(base, rows, part, model)
    assert 0.0 <= ref["test"] <= 1.0 and len(ref["risk_test"]) == len(part["test"])
    # test labels and other test rows' features never reach fitting or selection
    changed = rows.copy()
    te = list(part["test"])
    changed.loc[te, "label_survival_time"] = changed.loc[te, "label_survival_time"].to_numpy()[::-1]
    changed.loc[te, "label_survival_event"] = 1 - changed.loc[te, "label_survival_event"]
    feats2 = cv.ft.SurvivalFeatures(base, changed, n_genes=30)
    feats2.expr.loc[te[1:]] = feats2.expr.loc[te[1:]] * 3.0 + 1.0
    feats2.fit(list(part["train"]))
    np.testing.assert_allclose(feats2.pca.components_, feats.pca.components_)
    tr, va = part["train"], part["validation"]
    if model == "rsf":
        res = cv.fit_rsf(feats2, changed, tr, va, te, seed=0, n_estimators=20)
    else:
        res = cv.fit_cox(feats2, changed, tr, va, te, with_pcs=model == "cox_clinical_pcs")
    assert res["selected"] == ref["selected"] and res["validation"] == pytest.approx(ref["validation"])
    assert res["risk_test"][0] == pytest.approx(ref["risk_test"][0])  # the untouched test row scores the same
    # ... while changing training labels does change the fit
    moved = rows.copy()
    tr_ids = list(part["train"])
    shuffled = np.random.default_rng(5).permutation(moved.loc[tr_ids, "label_survival_time"].to_numpy())
    moved.loc[tr_ids, "label_survival_time"] = shuffled
    _, res3 = _fit(base, moved, part, model)
    assert not np.allclose(res3["risk_test"], ref["risk_test"])


def test_cox_grid_ties_on_a_tiny_validation_part_are_counted_and_broken_by_validation_likelihood(cohort):
    """Three validation patients rank at most three pairs, so grid points tie on the C-index: ``first`` keeps the
    first in grid order (the old rule, unchanged), ``loss`` the tied point with the highest validation partial
    log-likelihood, which is lifelines' own score of that fit; both are counted in ``tied``."""
    from lifelines import CoxPHFitter

    base, rows, part = cohort
    va = [i for i in part["validation"] if rows.loc[i, "label_survival_event"]][:2]
    va += [i for i in part["validation"] if not rows.loc[i, "label_survival_event"]][:1]
    tr, te = list(part["train"]), list(part["test"])
    feats = cv.ft.SurvivalFeatures(base, rows, n_genes=30)
    feats.fit(tr)
    grid = {"pcs_grid": (0, 2, 5), "pen_grid": (0.01, 0.1, 1.0, 10.0)}
    first = cv.ft.cox_select(feats, rows, tr, va, te, **grid)
    loss = cv.ft.cox_select(feats, rows, tr, va, te, **grid, ties="loss")
    assert first["grid"] == loss["grid"] and first["best"]["tied"] == loss["best"]["tied"] > 1
    top = max(g["validation"] for g in first["grid"])
    tied = [g for g in first["grid"] if g["validation"] == top]
    assert len(tied) == first["best"]["tied"] and first["best"] == {**tied[0], "tied": len(tied)}
    assert loss["best"]["validation"] == top
    assert loss["best"]["validation_loglik"] == max(g["validation_loglik"] for g in tied)
    xtr, xva = (feats.transform(ids, loss["best"]["n_pcs"], True) for ids in (tr, va))
    keep = xtr.columns[xtr.std() > 0]
    t, e = rows["label_survival_time"].astype(float), rows["label_survival_event"].astype(int)
    cph = CoxPHFitter(penalizer=loss["best"]["penalizer"]).fit(
        xtr[keep].assign(T=t.loc[tr].to_numpy(), E=e.loc[tr].to_numpy()), "T", "E"
    )
    ref = cph.score(xva[keep].assign(T=t.loc[va].to_numpy(), E=e.loc[va].to_numpy()), scoring_method="log_likelihood")
    assert loss["best"]["validation_loglik"] == pytest.approx(ref)
    # survival_cv: the rule reaches the Cox baselines and the tie count their records
    rec = cv.fit_cox(feats, rows, tr, va, te, with_pcs=True, ties="loss")
    assert rec["tied"] > 1 and set(rec["selected"]) == {"n_pcs", "penalizer", "n_features"}
    assert cv.parse_args([]).baseline_ties == "first" and cv.parse_args(["--baseline_ties", "loss"]).baseline_ties
    with pytest.raises(ValueError, match="ties must be 'first' or 'loss'"):
        cv.ft.cox_select(feats, rows, tr, va, te, **grid, ties="last")


def test_no_clinical_cohort_skips_clinical_cox(cohort):
    base, rows, part = cohort
    rows = rows.assign(tabular_clinical=None)
    feats, res = _fit(base, rows, part, "cox_clinical")
    assert "skipped" in res
    res = cv.fit_cox(feats, rows, part["train"], part["validation"], part["test"], with_pcs=True)
    assert res["selected"]["n_pcs"] > 0


def test_paired_bootstrap_difference():
    rng = np.random.default_rng(0)
    folds = []
    for _ in range(3):
        t = rng.exponential(size=80)
        e = (rng.random(80) < 0.8).astype(int)
        perfect, noise = -t, rng.normal(size=80)
        folds.append({"time": t, "event": e, "patients": np.arange(80), "risks": np.array([perfect, noise])})
    d = cv.paired_difference(folds, n_boot=300, seed=0)
    assert d["difference"] > 0.3 and d["ci95"][0] > 0.2 and d["ci95"][0] <= d["difference"] <= d["ci95"][1]
    same = [{**f, "risks": np.array([f["risks"][1], f["risks"][1]])} for f in folds]
    d0 = cv.paired_difference(same, n_boot=100, seed=0)
    assert d0["difference"] == 0.0 and d0["ci95"] == [0.0, 0.0]  # paired: identical models never differ
    boot = cv.bootstrap_c_index(folds, n_boot=400, seed=1)
    assert boot.shape == (400, 2) and abs(boot[:, 0].mean() - 1.0) < 1e-9  # a perfect ranking stays perfect


def _rec(val, test, risk):
    return {"validation": val, "test": test, "risk_test": list(map(float, risk))}


def test_selected_arm_picks_by_validation_never_test():
    full = [_rec(0.70, 0.50, [1, 2]), _rec(0.60, 0.90, [3, 4]), _rec(0.65, 0.55, [5, 6])]
    probe = [_rec(0.60, 0.95, [7, 8]), _rec(0.61, 0.40, [9, 10]), _rec(0.65, 0.99, [11, 12])]
    out = cv.select_by_validation(full, probe, ("bp_pretrained", "bp_pretrained_probe"))
    # fold 0: full wins on validation although probe wins on test; fold 1: the reverse; fold 2: a tie keeps full
    assert [r["picked"] for r in out] == ["bp_pretrained", "bp_pretrained_probe", "bp_pretrained"]
    assert [r["test"] for r in out] == [0.50, 0.40, 0.55]
    assert [r["risk_test"] for r in out] == [[1, 2], [9, 10], [5, 6]]
    assert out[1]["selected"]["validation"] == {"bp_pretrained": 0.60, "bp_pretrained_probe": 0.61}
    skipped = cv.select_by_validation([{"skipped": "x"}], [probe[0]], ("a", "b"))
    assert "test" not in skipped[0]


def _synthetic_folds(n: int, n_folds: int, seed: int):
    """A cohort of ``n`` random survival rows without clinical covariates, ``n_folds`` interleaved test folds and
    their fold metadata (what ``summarise`` reads), and the generator, to draw more from the same stream."""
    rng = np.random.default_rng(seed)
    ids = [f"s{i}" for i in range(n)]
    rows = pd.DataFrame(
        {
            "patient_id": ids,
            "label_survival_time": rng.exponential(size=n),
            "label_survival_event": (rng.random(n) < 0.6).astype(int),
            "tabular_clinical": None,
        },
        index=ids,
    )
    tests = [ids[i::n_folds] for i in range(n_folds)]
    return rows, tests, [{"fold": k, "test_ids": te} for k, te in enumerate(tests)], rng


def test_new_arms_summarised_and_reported():
    from types import SimpleNamespace

    n_folds = 3
    rows, tests, fold_meta, rng = _synthetic_folds(n=60, n_folds=n_folds, seed=3)
    t = rows["label_survival_time"]
    good = {k: -t.loc[te].to_numpy() for k, te in enumerate(tests)}  # a perfect ranking

    def arm(vals, tests_c, perfect):
        return [
            _rec(v, c, good[k] if perfect else rng.normal(size=len(tests[k])))
            for k, (v, c) in enumerate(zip(vals, tests_c))
        ]

    results = {
        "cox_clinical": [{"skipped": "no clinical covariates in this cohort"}] * n_folds,
        "cox_clinical_pcs": arm([0.7] * 3, [0.7] * 3, False),
        "rsf": arm([0.6] * 3, [0.6] * 3, False),
        "bp_random": arm([0.6, 0.6, 0.6], [0.5] * 3, False),
        "bp_pretrained": arm([0.8, 0.5, 0.8], [0.6] * 3, False),
        "bp_random_probe": arm([0.5] * 3, [0.5] * 3, False),
        "bp_pretrained_probe": arm([0.7, 0.7, 0.7], [1.0] * 3, True),
    }
    for name, (full, probe) in cv.SELECTED_ARMS.items():
        results[name] = cv.select_by_validation(results[full], results[probe], (full, probe))
    args = SimpleNamespace(n_bootstrap=50, seed=0)
    summary = cv.summarise(args, "c", "development", rows, fold_meta, results)
    m = summary["models"]
    assert m["bp_pretrained_selected"]["picked"] == ["bp_pretrained", "bp_pretrained_probe", "bp_pretrained"]
    assert m["bp_random_selected"]["picked"] == ["bp_random"] * 3
    assert summary["best_baseline_by_validation"] == "cox_clinical_pcs"  # by validation, cox_clinical skipped
    diffs = summary["paired_differences"]
    for name in (
        "bp_pretrained - bp_random",
        "bp_pretrained_probe - bp_random_probe",
        "bp_pretrained_probe - cox_clinical_pcs",
        "bp_pretrained_probe - bp_pretrained",
        "bp_pretrained_selected - bp_random_selected",
        "bp_pretrained_selected - cox_clinical_pcs",
    ):
        assert name in diffs, name
    assert diffs["bp_pretrained_probe - bp_random_probe"]["ci95"][0] > 0.2  # perfect ranking vs noise
    res = {"folds": n_folds, "cohorts": {"c": summary}}
    lines = cv.report_lines(res)
    header = lines[0]
    for name in (*cv.BP_ARMS, *cv.SELECTED_ARMS):
        assert f" {name} |" in header
    assert "| c | full, full, full | full, probe, full |" in lines  # random_selected, pretrained_selected


def test_bp_arms_default_and_selection():
    base = ["--cohorts", "nki70"]
    args = cv.parse_args(base)
    assert cv.resolve_bp_arms(args) == ["bp_random", "bp_random_probe", "bp_random_selected"]
    args = cv.parse_args([*base, "--pretrained_dir", "x"])
    assert cv.resolve_bp_arms(args) == [a for a in cv.ALL_BP_ARMS if a != cv.CANDIDATE_ARM]  # it needs candidates
    args = cv.parse_args([*base, "--pretrained_dir", "x", "--bp_arms", "bp_pretrained_selected"])
    assert cv.resolve_bp_arms(args) == ["bp_pretrained", "bp_pretrained_probe", "bp_pretrained_selected"]
    with pytest.raises(SystemExit):
        cv.resolve_bp_arms(cv.parse_args([*base, "--bp_arms", "bp_pretrained_probe"]))
    assert cv.resolve_bp_arms(cv.parse_args([*base, "--no_bioperceiver"])) == []
    # the full arms' settings (their cache key) are the ones earlier runs stored
    assert cv.bp_config(args, "bp_random") == {"pretrained": False, "mode": "full", "lr": 3e-4, "epochs": 10}
    probe = cv.ft.BP_CONFIGS["pretrained_linear_probe"]
    assert cv.bp_config(args, "bp_pretrained_probe") == {
        "pretrained": True,
        "mode": "linear_probe",
        "lr": probe["lr"],
        "epochs": probe["epochs"],
    }
    # --bp_modality_dropout: in the key (and the run) of full finetuning with two modalities only; a one-modality
    # cohort's run is the same run, so its cached results stay valid
    args = cv.parse_args([*base, "--bp_modality_dropout", "0.3"])
    both, expression = cv.MODALITIES, ["omics_expression"]
    assert cv.bp_config(args, "bp_random", both)["modality_dropout"] == 0.3
    assert cv.bp_config(args, "bp_random", expression) == {
        "pretrained": False,
        "mode": "full",
        "lr": 3e-4,
        "epochs": 10,
    }
    assert "modality_dropout" not in cv.bp_config(args, "bp_random_probe", both)
    # --bp_head_linear: in the key (and the run) only where the arm sees the clinical covariates
    args = cv.parse_args([*base, "--bp_head_linear"])
    assert cv.bp_config(args, "bp_random", both)["head_linear"] == ["tabular_clinical"]
    assert cv.bp_config(args, "bp_random_probe", both)["head_linear"] == ["tabular_clinical"]
    assert cv.bp_config(args, "bp_random", expression) == {
        "pretrained": False,
        "mode": "full",
        "lr": 3e-4,
        "epochs": 10,
    }
    args = cv.parse_args([*base, "--bp_head_linear", "omics_expression", "tabular_clinical"])
    assert cv.bp_config(args, "bp_random", both)["head_linear"] == ["omics_expression", "tabular_clinical"]
    assert cv.bp_config(args, "bp_random", expression)["head_linear"] == ["omics_expression"]
    # --bp_head_linear_per_modality: in the key only where the term has two modalities to penalise apart
    args = cv.parse_args(
        [*base, "--bp_head_linear", "omics_expression", "tabular_clinical", "--bp_head_linear_per_modality"]
    )
    assert cv.bp_config(args, "bp_random", both)["head_linear_per_modality"] is True
    assert "head_linear_per_modality" not in cv.bp_config(args, "bp_random", expression)
    # --random_processor_settings: in the random-init arms' key only (the pretrained arms use the backbone's)
    args = cv.parse_args([*base, "--random_processor_settings", "tokenizers/survset_processors_panel.yaml"])
    assert cv.bp_config(args, "bp_random", both)["processor_settings"].endswith("survset_processors_panel.yaml")
    assert "processor_settings" not in cv.bp_config(args, "bp_pretrained", both)


def _emb_fixture(cohort, width=12, seed=7):
    base, rows, part = cohort
    rng = np.random.default_rng(seed)
    emb = pd.DataFrame(rng.normal(size=(len(rows), width)), index=rows.index)
    emb[0] += rows["label_survival_time"].rank().to_numpy() / len(rows)  # some survival signal
    feats = cv.ft.SurvivalFeatures(base, rows, n_genes=30)
    feats.fit(list(part["train"]))
    return feats, emb


def test_embedding_features_fit_on_training_rows_only(cohort):
    _, rows, part = cohort
    feats, emb = _emb_fixture(cohort)
    tr, te = list(part["train"]), list(part["test"])
    ef = cv.EmbeddingFeatures(feats, emb, base_clinical=True).fit(tr)
    assert ef.pca.n_components_ == 12  # capped by the width
    x = ef.transform(tr, 5, clinical=True)
    assert list(x.columns[-5:]) == [f"emb{i}" for i in range(5)]
    np.testing.assert_allclose(x[[f"emb{i}" for i in range(5)]].mean(), 0, atol=1e-9)  # scaled on train rows
    np.testing.assert_allclose(x[[f"emb{i}" for i in range(5)]].std(ddof=0), 1, atol=1e-6)
    assert list(ef.transform(tr, 0, clinical=True).columns) == list(feats.transform(tr, 0, True).columns)
    # other rows' embeddings never reach the fit: changing test rows leaves the train transform unchanged
    changed = emb.copy()
    changed.loc[te] = changed.loc[te] * 5.0 + 3.0
    ef2 = cv.EmbeddingFeatures(feats, changed, base_clinical=True).fit(tr)
    pd.testing.assert_frame_equal(ef2.transform(tr, 10), ef.transform(tr, 10))
    np.testing.assert_allclose(ef2.pca.components_, ef.pca.components_)
    # the fixed block: expression PCs from the fitted SurvivalFeatures, before the embedding's components
    ef3 = cv.EmbeddingFeatures(feats, emb, expr_pcs=2, base_clinical=False).fit(tr)
    assert list(ef3.transform(te, 3).columns) == ["pc0", "pc1", "emb0", "emb1", "emb2"]
    assert list(ef3.transform(te, 3, clinical=False).columns) == ["emb0", "emb1", "emb2"]
    # the grid is capped by min(width, training rows - 1)
    small = cv.EmbeddingFeatures(feats, emb, base_clinical=True).fit(tr[:5])
    assert small.pca.n_components_ == 4
    res = cv.fit_cox(
        small, rows.loc[tr[:5] + list(part["validation"]) + te], tr[:5], part["validation"], te, with_pcs=True
    )
    assert res["selected"]["n_pcs"] in (0, 2)


def test_embedding_cox_selects_on_validation_and_nests_cox_clinical_pcs(cohort):
    _, rows, part = cohort
    feats, emb = _emb_fixture(cohort)
    tr, va, te = part["train"], part["validation"], part["test"]
    rec = cv.fit_cox_emb(feats, emb, rows, tr, va, te)
    assert rec["selected"]["expr_pcs"] == 0 and rec["selected"]["n_pcs"] in cv.PCS_GRID
    assert len(rec["risk_test"]) == len(te)
    # test labels never reach fitting or selection
    changed = rows.copy()
    changed.loc[list(te), "label_survival_event"] = 1 - changed.loc[list(te), "label_survival_event"]
    rec2 = cv.fit_cox_emb(feats, emb, changed, tr, va, te)
    assert rec2["selected"] == rec["selected"] and rec2["risk_test"] == pytest.approx(rec["risk_test"])
    # with the expression PCs cox_clinical_pcs chose, 0 embedding PCs is exactly that model (same validation)
    pcs = cv.fit_cox(feats, rows, tr, va, te, with_pcs=True)
    both = cv.fit_cox_emb(feats, emb, rows, tr, va, te, expr_pcs=pcs["selected"]["n_pcs"])
    assert both["validation"] >= pcs["validation"] - 1e-12
    if both["selected"]["n_pcs"] == 0:
        assert both["risk_test"] == pytest.approx(pcs["risk_test"])
    # a cohort without clinical covariates: embedding PCs only, or expression PCs with or without them
    bare = rows.assign(tabular_clinical=None)
    assert cv.fit_cox_emb(feats, emb, bare, tr, va, te)["selected"]["n_pcs"] > 0


def test_embedding_arms_summarised_and_resolved():
    from types import SimpleNamespace

    n_folds = 3
    rows, tests, fold_meta, rng = _synthetic_folds(n=45, n_folds=n_folds, seed=4)

    def arm(v, expr_pcs=0):
        sel = {"expr_pcs": expr_pcs, "n_pcs": 5, "penalizer": 1.0}
        return [{**_rec(v, v, rng.normal(size=len(te))), "selected": sel} for te in tests]

    results = {
        "cox_clinical": [{"skipped": "no clinical covariates in this cohort"}] * n_folds,
        "cox_clinical_pcs": arm(0.7),
        "rsf": arm(0.6),
        **{m: arm(0.65, 2 if cv.EMB_ARMS[m]["expr_pcs"] else 0) for m in cv.EMB_ARMS},
    }
    summary = cv.summarise(SimpleNamespace(n_bootstrap=30, seed=0), "c", "development", rows, fold_meta, results)
    assert summary["best_baseline_by_validation"] == "cox_clinical_pcs"  # the embedding arms are not baselines
    for name in (
        "cox_clinical_emb_pretrained - cox_clinical_pcs",
        "cox_clinical_emb_pretrained - cox_clinical_emb_random",
        "cox_clinical_pcs_emb_pretrained - cox_clinical_pcs",
    ):
        assert name in summary["paired_differences"], name
    lines = cv.report_lines({"folds": n_folds, "cohorts": {"c": summary}})
    for name in cv.EMB_ARMS:
        assert f" {name} |" in lines[0]
    assert "| c | 5, 5, 5 | 5, 5, 5 | 5 (+2 expr.), 5 (+2 expr.), 5 (+2 expr.) |" in lines
    base = ["--cohorts", "nki70"]
    assert not set(cv.EMB_ARMS) & set(cv.resolve_bp_arms(cv.parse_args(base)))  # need --pretrained_dir
    assert set(cv.EMB_ARMS) <= set(cv.resolve_bp_arms(cv.parse_args([*base, "--pretrained_dir", "x"])))
    with pytest.raises(SystemExit):
        cv.resolve_bp_arms(cv.parse_args([*base, "--bp_arms", "cox_clinical_emb_random"]))


def test_pooled_differences_average_cohorts_replicate_by_replicate():
    """Pooling over cohorts: the point is the mean of the cohorts' differences, the interval comes from the cohorts'
    bootstrap replicates averaged draw by draw; differences against each cohort's own best baseline pool together;
    external cohorts stay out of the development pool; the JSON keeps no replicates."""
    rng = np.random.default_rng(0)

    def folds(perfect: bool):
        out = []
        for _ in range(3):
            t = rng.exponential(size=50)
            e = (rng.random(50) < 0.7).astype(int)
            noise = rng.normal(size=50)
            out.append(
                {"time": t, "event": e, "patients": np.arange(50), "risks": np.array([-t if perfect else noise, noise])}
            )
        return out

    good = cv.paired_difference(folds(True), n_boot=200, seed=0)
    tie = cv.paired_difference(folds(False), n_boot=200, seed=0)  # the same risks twice: exactly 0
    ext = cv.paired_difference(folds(True), n_boot=200, seed=0)
    cohorts = {
        "a": {
            "role": "development",
            "paired_differences": {"bp - cox_clinical_pcs": {**good, "pair": ["bp", "best baseline"]}},
        },
        "b": {"role": "development", "paired_differences": {"bp - rsf": {**tie, "pair": ["bp", "best baseline"]}}},
        "x": {"role": "external", "paired_differences": {"bp - rsf": {**ext, "pair": ["bp", "best baseline"]}}},
    }
    pooled = cv.pooled_differences(cohorts)
    d = pooled["bp - best baseline"]
    assert d["cohorts"] == ["a", "b"] and d["above_zero"] == 1
    assert d["difference"] == pytest.approx(good["difference"] / 2)
    halves = good["_replicates"] / 2  # cohort b's replicates are all 0
    assert d["ci95"] == pytest.approx([np.percentile(halves, 2.5), np.percentile(halves, 97.5)])
    assert cv.pooled_differences(cohorts, "external")["bp - best baseline"]["cohorts"] == ["x"]
    stripped = cv._without_replicates({"cohorts": cohorts})
    json.dumps(stripped)  # serialisable: no arrays left
    assert "_replicates" in cohorts["a"]["paired_differences"]["bp - cox_clinical_pcs"]  # the input is untouched
    lines = cv.report_lines({"cohorts": {}, "pooled": {"development": pooled}})
    assert any(line.startswith("| development (2) | bp - best baseline |") and "1 of 2" in line for line in lines)


def test_fold_manifests_hold_out_each_fold_s_test_patients(tmp_path):
    """One pretraining manifest per CV fold: that fold's test patients are split 'test' (never pretrained on), every
    other patient trains or validates as the hashed split says, and the test parts of the folds partition the
    cohort. A development test row missing from the pretraining manifest is an error naming the cohort."""
    from types import SimpleNamespace

    from bioperceiver.data import read_manifest, write_manifest
    from bioperceiver.data.splits import split_of

    rng = np.random.default_rng(0)
    n = 60
    ids = [f"survset_gse1992:p{i}" for i in range(n)]
    table = pd.DataFrame(
        {
            "sample_id": ids,
            "patient_id": ids,
            "omics_expression": [f"omics/x.parquet#row=p{i}" for i in range(n)],
            "label_survival_time": rng.exponential(size=n),
            "label_survival_event": (rng.random(n) < 0.4).astype(int),
            "meta_source": "survset_gse1992",
        }
    )
    cv_path = write_manifest(table, tmp_path / "cv" / "manifest.parquet", {})
    pre_path = write_manifest(table.drop(columns=["label_survival_time"]), tmp_path / "pre" / "manifest.parquet", {})
    args = SimpleNamespace(cohorts=["gse1992"], folds=3, seed=0, val_fraction=0.2)
    paths = cv.write_fold_manifests(args, read_manifest(cv_path), pre_path)
    assert [p.name for p in paths] == [f"manifest_cvfold{k}.parquet" for k in range(3)]
    assert all(p.parent == pre_path.parent for p in paths)  # beside the source: relative references still resolve
    folds = cv.make_folds(
        table.set_index("sample_id")["patient_id"], table.set_index("sample_id")["label_survival_event"], 3, 0, 0.2
    )
    seen = []
    for k, path in enumerate(paths):
        m = read_manifest(path)
        split = m.table.set_index("sample_id")["split"]
        test = set(split.index[split == "test"])
        assert test == set(folds[k]["test"])
        seen += sorted(test)
        rest = split[split != "test"]
        expected = ["validation" if split_of(p) == "validation" else "train" for p in rest.index]
        assert rest.tolist() == expected
        assert m.metadata["cv_fold"] == k and m.metadata["held_out_test_rows"] == len(test)
    assert sorted(seen) == sorted(ids)  # every patient is held out of exactly one fold's pretraining
    short = write_manifest(table.iloc[5:], tmp_path / "short" / "manifest.parquet", {})
    with pytest.raises(ValueError, match="gse1992 fold"):
        cv.write_fold_manifests(args, read_manifest(cv_path), short)


def _fake_embed_view(monkeypatch, *, record: str, added: int) -> list:
    """Replace ``embed_view``: each call records its backbone (``record="model"``) or seed and embeds every row as
    that value, reporting ``added`` new genes; returns the list of recorded values."""
    calls = []

    def fake(model, rows, base_dir, train_ids, seed):
        value = model if record == "model" else seed
        calls.append(value)
        return np.full((len(rows), 2), float(value), dtype=np.float32), {
            "added": added,
            "overlap": 5,
            "new_sources": [],
        }

    monkeypatch.setattr(cv, "embed_view", fake)
    return calls


def test_fold_wise_backbones_embed_each_fold_with_its_own(tmp_path, monkeypatch):
    from types import SimpleNamespace

    rows = pd.DataFrame({"patient_id": ["a", "b", "c"]}, index=["a", "b", "c"])
    folds = [{"train": ["a"]}, {"train": ["b"]}, {"train": ["c"]}]
    calls = _fake_embed_view(monkeypatch, record="model", added=0)
    manifest = SimpleNamespace(base_dir=tmp_path)
    args = SimpleNamespace(
        pretrained_dir=str(tmp_path / "fold{fold}" / "final"), seed=0, init_seed=0, folds=3, val_fraction=0.2
    )
    assert cv.fold_wise(args) and cv.fold_backbones(args)[2] == str(tmp_path / "fold2" / "final")
    per_fold = [{"pretrained": 10 + k} for k in range(3)]
    out = cv.cohort_embeddings(args, manifest, rows, folds, "c", tmp_path / "o1", "pretrained", per_fold)
    assert calls == [10, 11, 12] and [float(e.iloc[0, 0]) for e in out] == [10.0, 11.0, 12.0]
    calls.clear()
    shared = {"pretrained": 7}
    args.pretrained_dir = str(tmp_path / "one" / "final")
    out = cv.cohort_embeddings(args, manifest, rows, folds, "c", tmp_path / "o2", "pretrained", [shared] * 3)
    assert calls == [7] and [float(e.iloc[0, 0]) for e in out] == [7.0] * 3  # one backbone: embedded once
    # --reuse_cache: another run's embeddings with the same key are read back and copied, nothing embedded again;
    # a different key (another backbone) is embedded anew
    calls.clear()
    args.reuse_cache = [str(tmp_path / "o2")]
    again = cv.cohort_embeddings(args, manifest, rows, folds, "c", tmp_path / "o3", "pretrained", [shared] * 3)
    assert calls == [] and [float(e.iloc[0, 0]) for e in again] == [7.0] * 3
    assert (tmp_path / "o3" / "cache" / "c" / "embedding_pretrained.npz").is_file()
    args.pretrained_dir = str(tmp_path / "other" / "final")
    cv.cohort_embeddings(args, manifest, rows, folds, "c", tmp_path / "o4", "pretrained", [shared] * 3)
    assert calls == [7]


def test_init_seed_reseeds_the_neural_arms_on_the_same_folds(tmp_path, monkeypatch):
    """--init_seed defaults to --seed and then leaves every cache key as before; another value reaches the embedding
    (added genes) and is part of its cache key, so a rerun into the same folder recomputes instead of reading the
    other seed's embedding back."""
    from types import SimpleNamespace

    args = cv.parse_args(["--seed", "2"])
    assert args.init_seed == 2 and cv.init_settings(args) == {}
    args = cv.parse_args(["--seed", "2", "--init_seed", "5"])
    assert args.init_seed == 5 and cv.init_settings(args) == {"init_seed": 5}

    rows = pd.DataFrame({"patient_id": ["a", "b"]}, index=["a", "b"])
    folds = [{"train": ["a"]}, {"train": ["b"]}]
    seeds = _fake_embed_view(monkeypatch, record="seed", added=1)  # added genes: embedded per fold, seeded
    manifest = SimpleNamespace(base_dir=tmp_path)
    ns = SimpleNamespace(pretrained_dir=str(tmp_path / "m"), seed=0, init_seed=0, folds=2, val_fraction=0.2)
    out = cv.cohort_embeddings(ns, manifest, rows, folds, "c", tmp_path, "pretrained", [{"pretrained": 1}] * 2)
    assert seeds == [0, 0] and float(out[1].iloc[0, 0]) == 0.0
    cv.cohort_embeddings(ns, manifest, rows, folds, "c", tmp_path, "pretrained", [{"pretrained": 1}] * 2)
    assert seeds == [0, 0]  # read back
    ns.init_seed = 3
    out = cv.cohort_embeddings(ns, manifest, rows, folds, "c", tmp_path, "pretrained", [{"pretrained": 1}] * 2)
    assert seeds == [0, 0, 3, 3] and float(out[0].iloc[0, 0]) == 3.0  # recomputed with the new seed


def test_replicates_written_for_every_difference(tmp_path):
    reps = np.array([0.1, np.nan, -0.2])
    res = {
        "cohorts": {
            "a": {"paired_differences": {"x - rsf": {"_replicates": reps}, "x - y": {"_replicates": reps * 2}}},
            "b": {"paired_differences": {"x - y": {"_replicates": reps * 3}}},
        }
    }
    path = cv.write_replicates(res, tmp_path / "r.npz")
    with np.load(path) as z:
        assert list(z["names"]) == ["a\tx - rsf", "a\tx - y", "b\tx - y"]
        np.testing.assert_array_equal(z["replicates"][2], reps * 3)


def test_lr_grid_keeps_the_best_validation_run_and_reuses_single_rate_caches(tmp_path):
    """--bp_lrs: every rate is fitted (or read back), the highest *validation* C-index wins whatever test says,
    ties go to the earlier rate, and a run cached by a single-rate run at one of the rates is not refitted."""
    from types import SimpleNamespace

    settings = {"cohort": "c", "fold": 0, "model": "bp_pretrained", "mode": "full", "lr": 3e-4, "epochs": 15}
    cache = tmp_path / "cache" / "c" / "fold0"
    cv.store(cache / "bp_pretrained.json", settings, {"validation": 0.6, "test": 0.9, "risk_test": [0.0]})
    scores = {1e-3: (0.7, 0.5), 3e-3: (0.7, 0.99)}  # lr -> (validation, test)
    fitted = []

    def fit(lr):
        fitted.append(lr)
        v, t = scores[lr]
        return {"validation": v, "test": t, "risk_test": [lr], "epochs": 3, "term_alone_test": t / 2}

    origin = []
    rec = cv.lr_grid_record(settings, [3e-4, 1e-3, 3e-3], cache, fit, origin)
    assert fitted == [1e-3, 3e-3]  # 3e-4 read back from the single-rate run's cache
    assert rec["lr"] == 1e-3 and rec["test"] == 0.5 and rec["risk_test"] == [1e-3]  # tie on validation: earlier rate
    assert rec["selected"]["validation"] == {"0.0003": 0.6, "0.001": 0.7, "0.003": 0.7}
    assert rec["term_alone_test"] == 0.25  # a wide & deep run's linear term alone: the kept run's
    assert [w for w, _ in origin] == ["cached", "ran", "ran"]
    assert cv.cached(cache / "bp_pretrained_lr0.0003.json", settings)["test"] == 0.9  # copied under its own name
    assert (cache / "bp_pretrained_lr0.001.json").is_file() and (cache / "bp_pretrained_lr0.003.json").is_file()
    again = cv.lr_grid_record(settings, [3e-4, 1e-3, 3e-3], cache, fit)
    assert fitted == [1e-3, 3e-3] and again["lr"] == rec["lr"] and again["test"] == rec["test"]  # all read back
    scores[1e-2] = (float("nan"), 0.99)
    assert cv.lr_grid_record(settings, [1e-2, 1e-3], cache, fit)["lr"] == 1e-3  # NaN validation never wins
    # the kept run's kept epoch; a record cached before the rule was kept in it gets the run's own rule
    kept = {"epoch": 9.0, "evaluations": 15, "tied_evaluations": 4}
    ties = {**settings, "best_model_ties": "loss", "fold": 1}
    rec = cv.lr_grid_record(ties, [1e-3], tmp_path / "ties", lambda lr: {**fit(lr), "best_checkpoint": kept})
    assert rec["best_checkpoint"] == {**kept, "ties": "loss"}
    rec = cv.lr_grid_record(settings, [1e-3], tmp_path / "first", lambda lr: {**fit(lr), "best_checkpoint": kept})
    assert rec["best_checkpoint"]["ties"] == "first"

    args = SimpleNamespace(bp_lrs=[1e-3, 3e-3], bp_lr=3e-4, bp_epochs=15, probe_lr=3e-3, probe_epochs=30, quick=False)
    assert cv.bp_lrs(args, "bp_random") == [1e-3, 3e-3] and cv.bp_lrs(args, "bp_random_probe") == [3e-3]
    args.bp_lrs = None
    assert cv.bp_lrs(args, "bp_pretrained") == [3e-4]
    assert cv.parse_args(["--bp_lrs", "3e-4", "1e-3"]).bp_lrs == [3e-4, 1e-3]


def test_lr_grid_choice_summarised_and_reported():
    from types import SimpleNamespace

    recs = [
        {
            "validation": 0.7,
            "test": 0.6,
            "risk_test": [0.1, 0.2],
            "lr": lr,
            "selected": {"lr": lr},
            "term_alone_test": x,
        }
        for lr, x in ((1e-3, 0.55), (3e-3, 0.65))
    ]
    kept = {"epoch": 7.0, "evaluations": 15, "tied_evaluations": 3, "ties": "loss"}
    recs[1]["best_checkpoint"] = kept
    rows = pd.DataFrame(
        {"patient_id": ["a", "b"], "label_survival_time": [1.0, 2.0], "label_survival_event": [1, 0]}, index=["a", "b"]
    )
    base = {"validation": 0.5, "test": 0.5, "risk_test": [0.2, 0.1]}
    results = {**{m: [base, base] for m in cv.BASELINES}, "bp_random": recs}
    meta = [{"test_ids": ["a", "b"]}] * 2
    args = SimpleNamespace(n_bootstrap=10, seed=0)
    s = cv.summarise(args, "c", "development", rows, meta, results)
    assert s["models"]["bp_random"]["lr"] == [1e-3, 3e-3] and "lr" not in s["models"]["cox_clinical_pcs"]
    # per fold, the epoch the selected run kept (fold 0's run left no record: keep-last or written before)
    assert s["models"]["bp_random"]["best_checkpoint"] == [None, kept]
    assert "best_checkpoint" not in s["models"]["cox_clinical_pcs"]
    lines = cv.report_lines({"cohorts": {"c": s}, "folds": 2})
    assert "| c | 0.001, 0.003 |" in lines
    # a wide & deep arm's linear term alone (before finetuning) beside the finetuned model, reported only
    assert s["models"]["bp_random"]["term_alone_test"]["mean"] == pytest.approx(0.6)
    assert "term_alone_test" not in s["models"]["cox_clinical"] and "| c | 0.600 / 0.600 |" in lines


def test_reuse_cache_reads_another_run_s_results_and_copies_them(tmp_path):
    """--reuse_cache: a result cached in an earlier run's folder under the same settings is copied into this run's
    cache, not refitted; other settings there are ignored; a --bp_lrs grid finds single-rate runs there too."""
    settings = {"cohort": "c", "fold": 1, "model": "bp_random", "mode": "full", "lr": 3e-4, "epochs": 15}
    old = tmp_path / "old" / "cache" / "c" / "fold1"
    cv.store(old / "bp_random.json", settings, {"validation": 0.8, "test": 0.7, "risk_test": [1.0]})
    own = tmp_path / "new" / "cache" / "c" / "fold1" / "bp_random.json"
    assert cv.find_cached(own, {**settings, "epochs": 10}, [old / "bp_random.json"]) is None  # other settings
    assert not own.exists()
    rec = cv.find_cached(own, settings, [tmp_path / "missing.json", old / "bp_random.json"])
    assert rec["test"] == 0.7 and cv.cached(own, settings)["test"] == 0.7  # copied: the new folder stands alone

    fitted = []

    def fit(lr):
        fitted.append(lr)
        return {"validation": 0.5, "test": 0.5, "risk_test": [lr]}

    grid_dir = tmp_path / "grid" / "cache" / "c" / "fold1"
    rec = cv.lr_grid_record(settings, [3e-4, 1e-3], grid_dir, fit, reuse=[tmp_path / "old" / "cache"])
    assert fitted == [1e-3] and rec["lr"] == 3e-4 and (grid_dir / "bp_random_lr0.0003.json").is_file()
    assert cv.parse_args([]).reuse_cache == []


def test_bp_modalities_ablation_restricts_the_trained_arms(tmp_path):
    """--bp_modalities: the trained arms see only the listed modalities; a cohort without any of them is skipped
    with a reason (not a crash); without it, clinical covariates are used wherever a cohort has them."""
    from types import SimpleNamespace

    clin = pd.DataFrame({"tabular_clinical": ['{"age": 50}', '{"age": 60}']})
    none = pd.DataFrame({"tabular_clinical": [None, None]})
    args = SimpleNamespace(bp_modalities=None)
    assert cv.bp_modalities(args, clin) == ["omics_expression", "tabular_clinical"]
    assert cv.bp_modalities(args, none) == ["omics_expression"]
    args.bp_modalities = ["tabular_clinical"]
    assert cv.bp_modalities(args, clin) == ["tabular_clinical"] and cv.bp_modalities(args, none) == []
    rec = cv.run_bp(args, None, none, {}, None, "NSBCD", 0, "bp_random")
    assert "NSBCD has none of --bp_modalities" in rec["skipped"]
    grid = cv.lr_grid_record({"model": "bp_random", "fold": 0}, [1e-3], tmp_path / "c" / "fold0", lambda lr: rec)
    assert grid == {"skipped": rec["skipped"]}
    assert cv.parse_args(["--bp_modalities", "tabular_clinical"]).bp_modalities == ["tabular_clinical"]

    rows = pd.DataFrame(
        {"patient_id": ["a", "b", "c"], "label_survival_time": [1.0, 2.0, 3.0], "label_survival_event": [1, 1, 0]},
        index=["a", "b", "c"],
    )
    rec = {"validation": 0.6, "test": 0.6, "risk_test": [3.0, 2.0, 1.0]}
    results = {m: [rec] for m in (*cv.BASELINES, "bp_random", "bp_pretrained")}
    results["cox_clinical"] = [{**rec, "validation": 0.5}]  # not the best baseline (named after it otherwise)
    meta = [{"test_ids": ["a", "b", "c"]}]
    ns = SimpleNamespace(n_bootstrap=5, seed=0, bp_modalities=["tabular_clinical"])
    diffs = cv.summarise(ns, "c", "development", rows, meta, results)["paired_differences"]
    assert "bp_random - cox_clinical" in diffs and "bp_pretrained - cox_clinical" in diffs  # its own reference
    ns.bp_modalities = None
    assert (
        "bp_random - cox_clinical"
        not in cv.summarise(ns, "c", "development", rows, meta, results)["paired_differences"]
    )
    # where Cox on the clinical covariates is the best baseline the two comparisons keep apart (one key each), and
    # each is pooled under its own name
    results["cox_clinical"] = [{**rec, "validation": 0.9, "risk_test": [1.0, 3.0, 2.0]}]
    ns.bp_modalities = ["tabular_clinical"]
    summary = cv.summarise(ns, "c", "development", rows, meta, results)
    diffs = summary["paired_differences"]
    assert summary["best_baseline_by_validation"] == "cox_clinical"
    assert diffs["bp_random - cox_clinical"]["pair"] == ["bp_random", "best baseline"]
    assert diffs["bp_random - cox_clinical (fixed)"]["pair"] == ["bp_random", "cox_clinical"]
    pooled = cv.pooled_differences({"c": summary})
    assert pooled["bp_random - best baseline"]["cohorts"] == pooled["bp_random - cox_clinical"]["cohorts"] == ["c"]


def test_bp_head_linear_reaches_the_finetuning_run_where_the_cohort_has_clinical_covariates(tmp_path, monkeypatch):
    """--bp_head_linear: run_finetune gets --head_linear_modalities tabular_clinical (and the run its own folder)
    in a cohort with clinical covariates; an expression-only cohort's run is unchanged (same argv, same tag)."""
    from types import SimpleNamespace

    monkeypatch.setattr(cv.ft, "write_split_manifest", lambda *a, **k: None)
    runner = StubRunner()
    calls = runner.calls

    def last():
        return calls[-1]["tag"], calls[-1]["extra"], calls[-1]["modalities"]

    args = cv.parse_args(["--bp_head_linear"])
    manifest = SimpleNamespace(base_dir=tmp_path)
    part = {"train": ["a"], "validation": ["b"], "test": ["c"]}
    for clinical in ('{"age": 50}', None):
        rows = pd.DataFrame({"patient_id": ["a", "b", "c"], "tabular_clinical": [clinical] * 3}, index=["a", "b", "c"])
        rec = cv.run_bp(args, manifest, rows, part, runner, "coh", 0, "bp_random", lr=1e-3)
        assert rec["test"] == 0.7 and rec["risk_test"] == [0.5]
    (wide_tag, wide_extra, wide_mods), (plain_tag, plain_extra, plain_mods) = (
        (c["tag"], c["extra"], c["modalities"]) for c in calls
    )
    assert wide_extra[-2:] == ["--head_linear_modalities", "tabular_clinical"] and wide_tag.endswith("_lr0.001_wide")
    args = cv.parse_args(["--bp_head_linear", "omics_expression", "tabular_clinical"])
    cv.run_bp(args, manifest, rows, part, runner, "coh", 0, "bp_random")
    tag, extra, _ = last()
    assert extra[-2:] == ["--head_linear_modalities", "omics_expression"] and tag.endswith("_wide_omics_expression")
    assert "--head_linear_modalities" not in plain_extra and plain_tag == "coh_f0_bp_random_lr0.001"
    assert wide_mods == cv.MODALITIES and plain_mods == ["omics_expression"]
    # per-modality penalties: passed on, and the run tagged, only where the term has both modalities
    args = cv.parse_args(["--bp_head_linear", "omics_expression", "tabular_clinical", "--bp_head_linear_per_modality"])
    cv.run_bp(args, manifest, rows, part, runner, "coh", 0, "bp_random")
    assert last()[:2] == (tag, extra)  # the expression-only cohort: the same run as without the flag
    rows["tabular_clinical"] = '{"age": 50}'

    runner.extra_record = {"linear_term": {"term_alone": {"validation": 0.61, "test": 0.66}}}
    rec = cv.run_bp(args, manifest, rows, part, runner, "coh", 0, "bp_random")
    tag, extra, _ = last()
    assert extra[-2:] == ["--head_linear_l2_per_modality", "true"] and tag.endswith(
        "_wide_omics_expression_tabular_clinical_pm"
    )
    assert rec["term_alone_test"] == 0.66
    args = cv.parse_args(["--random_processor_settings", "tokenizers/survset_processors_panel.yaml"])
    cv.run_bp(args, manifest, rows, part, runner, "coh", 0, "bp_random")
    tag, extra, _ = last()
    assert extra[-2] == "--processor_settings" and extra[-1].endswith("tokenizers/survset_processors_panel.yaml")
    assert tag.endswith("_survset_processors_panel")


def test_train_fraction_keeps_a_nested_stratified_share_of_each_fold_s_training_patients():
    """--train_fraction: each fold keeps a share of its *training* patients (per event class, at least 2, nested
    across fractions, all of a patient's rows together); validation and test are untouched; 1 is a no-op."""
    patients, events = _rows(n_patients=200)
    folds = cv.make_folds(patients, events, n_folds=5, seed=0)
    assert cv.subsample_train(folds, patients, events, 1.0, seed=0) is folds
    quarter = cv.subsample_train(folds, patients, events, 0.25, seed=0)
    half = cv.subsample_train(folds, patients, events, 0.5, seed=0)
    again = cv.subsample_train(folds, patients, events, 0.25, seed=0)
    for k, (full, q, h) in enumerate(zip(folds, quarter, half)):
        for part in ("validation", "test"):
            np.testing.assert_array_equal(q[part], full[part])
        kept, half_kept = set(q["train"]), set(h["train"])
        assert kept <= half_kept <= set(full["train"])  # nested
        assert set(patients.loc[q["train"]].value_counts()) == {2}  # a patient's rows together
        pat = events.loc[full["train"]].groupby(patients.loc[full["train"]]).max()
        kept_pat = events.loc[q["train"]].groupby(patients.loc[q["train"]]).max()
        for ev in (0, 1):
            assert (kept_pat == ev).sum() == max(2, int(np.ceil(0.25 * (pat == ev).sum())))
        np.testing.assert_array_equal(again[k]["train"], q["train"])  # deterministic
    other = cv.subsample_train(folds, patients, events, 0.25, seed=1)
    assert any(set(a["train"]) != set(b["train"]) for a, b in zip(quarter, other))
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="train_fraction"):
            cv.subsample_train(folds, patients, events, bad, seed=0)


def test_subsample_validation_draws_the_validation_part_with_the_same_share_and_keeps_the_training_draw():
    """--subsample_validation: each validation part keeps the same share per event class (at least 2, nested, a
    patient's rows together, its own stream so the training draw is the one without the flag); test untouched; a
    part with no admissible pair is an error naming the fold; fraction 1 is still a no-op."""
    patients, events = _rows(n_patients=300)
    times = pd.Series(np.arange(len(patients), dtype=float) % 37 + 1, index=patients.index)
    folds = cv.make_folds(patients, events, n_folds=5, seed=0)
    plain = cv.subsample_train(folds, patients, events, 0.25, seed=0)
    quarter = cv.subsample_train(folds, patients, events, 0.25, seed=0, validation=True, times=times)
    half = cv.subsample_train(folds, patients, events, 0.5, seed=0, validation=True, times=times)
    assert cv.subsample_train(folds, patients, events, 1.0, seed=0, validation=True, times=times) is folds
    for full, p, q, h in zip(folds, plain, quarter, half):
        np.testing.assert_array_equal(q["train"], p["train"])  # the training draw does not depend on the flag
        np.testing.assert_array_equal(q["test"], full["test"])
        assert set(q["validation"]) <= set(h["validation"]) < set(full["validation"])  # nested, smaller
        assert set(patients.loc[q["validation"]].value_counts()) == {2}
        pat = events.loc[full["validation"]].groupby(patients.loc[full["validation"]]).max()
        kept = events.loc[q["validation"]].groupby(patients.loc[q["validation"]]).max()
        for ev in (0, 1):
            assert (kept == ev).sum() == max(2, int(np.ceil(0.25 * (pat == ev).sum())))
        assert not set(q["validation"]) & set(q["train"])
    # every event after every censoring: no pair to rank on validation -> a clear error, not a NaN selection
    late = pd.Series(np.where(events.to_numpy() == 1, 1000.0, 1.0), index=patients.index)
    with pytest.raises(ValueError, match=r"fold 0: the 0\.25 validation share .* no admissible pair"):
        cv.subsample_train(folds, patients, events, 0.25, seed=0, validation=True, times=late)
    # settings: the flag reaches cache keys and run folders only where it changes anything
    args = cv.parse_args(["--train_fraction", "0.25", "--subsample_validation"])
    assert cv.data_settings(args) == {"train_fraction": 0.25, "subsample_validation": True}
    assert cv.data_settings(cv.parse_args(["--subsample_validation"])) == {}
    assert not cv.subsample_validation(cv.parse_args(["--subsample_validation"]))


def test_keep_last_reaches_the_full_arms_cache_keys_and_run_folders(tmp_path, monkeypatch):
    from types import SimpleNamespace

    args = cv.parse_args(["--bp_keep_last"])
    assert cv.bp_config(args, "bp_random")["keep_last"] is True
    assert "keep_last" not in cv.bp_config(args, "bp_pretrained_probe")  # a probe has no epochs to select among
    assert "keep_last" not in cv.bp_config(cv.parse_args([]), "bp_random")  # earlier cache keys stay valid
    monkeypatch.setattr(cv.ft, "write_split_manifest", lambda *a, **k: None)
    kept = {"epoch": 15.0, "evaluations": 15, "tied_evaluations": 1, "step": 30, "value": 0.7}
    runner = StubRunner(epochs=15, best_checkpoint=kept)
    rows = pd.DataFrame({"patient_id": list("abc"), "tabular_clinical": [None] * 3}, index=list("abc"))
    part = {"train": np.array(["a"]), "validation": np.array(["b"]), "test": np.array(["c"])}
    rec = cv.run_bp(args, SimpleNamespace(base_dir=tmp_path), rows, part, runner, "coh", 0, "bp_random", lr=1e-3)
    assert runner.tags[-1] == "coh_f0_bp_random_lr0.001_last" and runner.calls[-1]["cfg"]["keep_last"] is True
    # the run's record without a rule (written before --best_model_ties): transformers' rule
    assert rec["best_checkpoint"] == {"epoch": 15.0, "evaluations": 15, "tied_evaluations": 1, "ties": "first"}


def test_best_model_ties_reach_the_full_arms_and_the_finetuning_argv(tmp_path, monkeypatch):
    """--bp_best_model_ties: full arms only, in the cache key, the run folder and the run_finetune argv; the default
    (transformers' rule) leaves earlier keys and folders unchanged; --bp_keep_last wins (no selection at all)."""
    from types import SimpleNamespace

    args = cv.parse_args(["--bp_best_model_ties", "loss"])
    assert cv.bp_config(args, "bp_random")["best_model_ties"] == "loss"
    assert "best_model_ties" not in cv.bp_config(args, "bp_pretrained_probe")
    assert "best_model_ties" not in cv.bp_config(cv.parse_args([]), "bp_random")
    both = cv.bp_config(cv.parse_args(["--bp_best_model_ties", "last", "--bp_keep_last"]), "bp_random")
    assert both["keep_last"] is True and "best_model_ties" not in both
    monkeypatch.setattr(cv.ft, "write_split_manifest", lambda *a, **k: None)
    kept = {"epoch": 9.0, "evaluations": 15, "tied_evaluations": 3, "step": 18, "value": 0.7, "ties": "loss"}
    stub = StubRunner(epochs=15, best_checkpoint=kept)
    rows = pd.DataFrame({"patient_id": list("abc"), "tabular_clinical": [None] * 3}, index=list("abc"))
    part = {"train": np.array(["a"]), "validation": np.array(["b"]), "test": np.array(["c"])}
    rec = cv.run_bp(args, SimpleNamespace(base_dir=tmp_path), rows, part, stub, "coh", 0, "bp_random", lr=1e-3)
    assert stub.tags[-1] == "coh_f0_bp_random_lr0.001_tiesloss"
    assert rec["best_checkpoint"] == {"epoch": 9.0, "evaluations": 15, "tied_evaluations": 3, "ties": "loss"}
    # the finetuning command the runner builds carries the rule
    runner = cv.ft.BPRunner(SimpleNamespace(work_dir=str(tmp_path), quick=False), tmp_path)
    seen = {}

    def main(argv):
        seen["argv"] = argv
        raise RuntimeError("stop before finetuning")

    runner.rf = SimpleNamespace(DataArguments=runner.rf.DataArguments, main=main)
    with pytest.raises(RuntimeError, match="stop before finetuning"):
        runner.run("t", tmp_path / "m.parquet", ["--task", "survival"], stub.calls[-1]["cfg"])
    argv = seen["argv"]
    assert argv[argv.index("--best_model_ties") + 1] == "loss"


def test_fold_record_counts_patients_and_the_pairs_validation_ranks():
    """Two rows per patient: the record counts patients apart from rows, and the validation pairs are Harrell's
    admissible pairs (brute force: an event strictly before another time, or at it when the other is censored)."""
    patients, events = _rows(n_patients=30)
    rng = np.random.default_rng(1)
    times = pd.Series(np.repeat(rng.integers(1, 8, 30), 2).astype(float), index=patients.index)  # ties included
    rows = pd.DataFrame({"patient_id": patients, "label_survival_event": events, "label_survival_time": times})
    part = cv.make_folds(patients, events, n_folds=3, seed=0)[0]
    rec = cv.fold_record(rows, part, 0)
    for name in ("train", "validation", "test"):
        assert rec["n"][name] == len(part[name]) == 2 * rec["patients"][name]
    va = rows.loc[part["validation"]]
    t, e = va["label_survival_time"].to_numpy(), va["label_survival_event"].to_numpy()
    brute = sum(
        1
        for i in range(len(va))
        for j in range(len(va))
        if i != j and e[i] and (t[i] < t[j] or (t[i] == t[j] and not e[j]))
    )
    assert rec["validation_pairs"] == brute > 0 and rec["test_ids"] == list(part["test"])


def test_subsample_validation_reaches_run_folders_and_the_report(tmp_path, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(cv.ft, "write_split_manifest", lambda *a, **k: None)
    runner = StubRunner()
    rows = pd.DataFrame({"patient_id": list("abc"), "tabular_clinical": [None] * 3}, index=list("abc"))
    part = {"train": np.array(["a"]), "validation": np.array(["b"]), "test": np.array(["c"])}
    args = cv.parse_args(["--train_fraction", "0.25", "--subsample_validation"])
    cv.run_bp(args, SimpleNamespace(base_dir=tmp_path), rows, part, runner, "coh", 0, "bp_random", lr=1e-3)
    assert runner.tags[-1] == "coh_f0_bp_random_lr0.001_tf0.25_val"
    lines = cv.report_lines({"train_fraction": 0.25, "subsample_validation": True, "cohorts": {}, "pooled": {}})
    assert "validation parts drawn with the same share" in lines[0]


def test_train_fraction_reaches_cache_keys_run_folders_and_the_finetuning_manifest(tmp_path, monkeypatch):
    """A subsampled run never reads a full-data cache (its settings carry the fraction; at 1 they are as before),
    its finetuning runs get their own folders, and the rows a fold leaves out are not in the manifest it trains
    on (they would otherwise count as training rows)."""
    from types import SimpleNamespace

    assert cv.data_settings(cv.parse_args([])) == {}
    args = cv.parse_args(["--train_fraction", "0.5"])
    assert args.train_fraction == 0.5 and cv.data_settings(args) == {"train_fraction": 0.5}
    args.gene_map_sha256 = "abc"  # a --gene_map changes the tokens: its digest joins the key, at any fraction
    assert cv.data_settings(args) == {"train_fraction": 0.5, "gene_map_sha256": "abc"}
    full = cv.parse_args(["--gene_map", "map.tsv"])
    full.gene_map_sha256 = "abc"
    assert cv.data_settings(full) == {"gene_map_sha256": "abc"}
    args.gene_map_sha256 = None
    written = []
    monkeypatch.setattr(cv.ft, "write_split_manifest", lambda m, rows, split, cols, path: written.append(split))
    runner = StubRunner(test_id="d")
    rows = pd.DataFrame({"patient_id": list("abcde"), "tabular_clinical": [None] * 5}, index=list("abcde"))
    part = {"train": np.array(["a"]), "validation": np.array(["c"]), "test": np.array(["d"])}  # b, e: left out
    cv.run_bp(args, SimpleNamespace(base_dir=tmp_path), rows, part, runner, "coh", 0, "bp_random", lr=1e-3)
    assert written[-1].to_dict() == {"a": "train", "c": "validation", "d": "test"}
    assert runner.tags[-1] == "coh_f0_bp_random_lr0.001_tf0.5"
    full = {**part, "train": np.array(["e", "a", "b"])}
    cv.run_bp(cv.parse_args([]), SimpleNamespace(base_dir=tmp_path), rows, full, runner, "coh", 0, "bp_random")
    assert runner.tags[-1] == "coh_f0_bp_random" and list(written[-1].index) == list("abcde")  # full data: as before


def test_fold_wise_backbones_are_finetuned_fold_by_fold(tmp_path, monkeypatch):
    """--pretrained_dir with {fold} and a finetuned pretrained arm: fold k's run finetunes backbone k."""
    from types import SimpleNamespace

    monkeypatch.setattr(cv.ft, "write_split_manifest", lambda *a, **k: None)

    folds = [StubRunner() for _ in range(3)]
    runner = cv.PerFoldRunner(folds)
    args = cv.parse_args(["--pretrained_dir", str(tmp_path / "fold{fold}" / "final"), "--folds", "3"])
    assert cv.fold_wise(args) and cv.resolve_bp_arms(args)  # the finetuned arms are no longer refused
    rows = pd.DataFrame({"patient_id": list("abc"), "tabular_clinical": [None] * 3}, index=list("abc"))
    part = {"train": ["a"], "validation": ["b"], "test": ["c"]}
    rec = cv.run_bp(args, SimpleNamespace(base_dir=tmp_path), rows, part, runner, "coh", 2, "bp_pretrained")
    assert rec["test"] == 0.7 and [len(r.calls) for r in folds] == [0, 0, 1]


def _run_then_rerun(tmp_path, common: list[str], flags: list[str], names: tuple[str, str]) -> tuple[dict, dict]:
    """survival_cv.py with ``common`` into ``tmp_path/names[0]``, then with ``flags`` added into ``names[1]``,
    reading back from the first run what the flags leave unchanged."""
    first = cv.main([*common, "--output_dir", str(tmp_path / names[0])])
    out, reuse = str(tmp_path / names[1]), str(tmp_path / names[0])
    return first, cv.main([*common, *flags, "--output_dir", out, "--reuse_cache", reuse])


def test_baseline_ties_reach_only_the_cox_baselines_cache_keys_end_to_end(tmp_path):
    """survival_cv.py on a real SurvSet cohort, baselines only: --baseline_ties loss refits the two Cox baselines
    (their cache keys carry the rule; the default's keys are unchanged) and reads the forest back; the JSON names
    the rule and counts each baseline's tied grid points per fold."""
    pytest.importorskip("SurvSet")
    common = ["--cohorts", "nki70", "--folds", "3", "--no_bioperceiver", "--quick", "--data_dir", str(tmp_path / "c")]
    first, loss = _run_then_rerun(tmp_path, common, ["--baseline_ties", "loss"], ("first", "loss"))
    assert first["baseline_ties"] == {"cox": "first", "rsf": "first"} and loss["baseline_ties"]["cox"] == "loss"
    assert sorted(loss["cohorts"]["nki70"]["from_cache"]["cached"]) == ["f0:rsf", "f1:rsf"]
    for run, rule in ((tmp_path / "first", None), (tmp_path / "loss", "loss")):
        for model in ("cox_clinical", "cox_clinical_pcs", "rsf"):
            settings = json.loads((run / "cache" / "nki70" / "fold0" / f"{model}.json").read_text())["settings"]
            assert settings.get("ties") == (rule if model != "rsf" else None), (run.name, model)
    for res in (first, loss):
        models = res["cohorts"]["nki70"]["models"]
        assert all(len(models[m]["tied"]) == 2 and min(models[m]["tied"]) >= 1 for m in cv.BASELINES)


def test_baseline_ties_reach_the_embedding_cox_arms_end_to_end(tmp_path, monkeypatch):
    """The cox_*_emb_* arms are chosen by the same cox_select grid search as the Cox baselines, so --baseline_ties
    reaches them too: with loss their cache keys carry the rule and they are refitted (the forest is read back), and
    each pick is the one fit_cox_emb makes with that rule. The frozen backbone is replaced by a fixed embedding with
    some survival signal (what is tested is the selection, not the backbone)."""
    pytest.importorskip("SurvSet")
    backbone = tmp_path / "backbone"
    backbone.mkdir()
    (backbone / "config.json").write_text("{}")
    embeddings = {}

    def fake_embeddings(args, manifest, rows, folds, cohort, out, init, models):
        if init not in embeddings:
            rng = np.random.default_rng(1 if init == "pretrained" else 2)  # seed 1: fold 0 has tied grid points
            emb = pd.DataFrame(rng.normal(size=(len(rows), 8)), index=rows.index)
            emb[0] += 0.3 * rows["label_survival_time"].astype(float).rank().to_numpy() / len(rows)
            embeddings[init] = emb
        return [embeddings[init]] * len(folds)

    monkeypatch.setattr(cv, "embedding_models", lambda folder, seed: {"folder": folder})
    monkeypatch.setattr(cv, "cohort_embeddings", fake_embeddings)
    common = [
        *("--cohorts", "nki70", "--folds", "3", "--quick", "--data_dir", str(tmp_path / "c")),
        *("--pretrained_dir", str(backbone), "--bp_arms", *cv.EMB_ARMS),
    ]
    first, loss = _run_then_rerun(tmp_path, common, ["--baseline_ties", "loss"], ("first", "loss"))
    assert sorted(loss["cohorts"]["nki70"]["from_cache"]["cached"]) == ["f0:rsf", "f1:rsf"]
    for run, rule in ((tmp_path / "first", None), (tmp_path / "loss", "loss")):
        for model in cv.EMB_ARMS:
            settings = json.loads((run / "cache" / "nki70" / "fold0" / f"{model}.json").read_text())["settings"]
            assert settings.get("ties") == rule, (run.name, model)
    # the loss run's picks are fit_cox_emb's with the rule, on the same fold (refit here from the cohort's rows)
    from bioperceiver.data import read_manifest

    manifest = read_manifest(tmp_path / "c" / "manifest.parquet")
    rows = cv.cohort_rows(manifest.table, "nki70")
    part = cv.make_folds(rows["patient_id"], rows["label_survival_event"], 3, 0, 0.2)[0]
    tr, va, te = part["train"], part["validation"], part["test"]
    feats = cv.ft.SurvivalFeatures(manifest.base_dir, rows, n_genes=1000)
    feats.fit(list(tr))
    picks = {}
    for res, rule in ((first, "first"), (loss, "loss")):
        rec = cv.fit_cox_emb(feats, embeddings["pretrained"], rows, tr, va, te, ties=rule)
        assert res["cohorts"]["nki70"]["models"]["cox_clinical_emb_pretrained"]["tied"][0] == rec["tied"]
        path = tmp_path / rule / "cache" / "nki70" / "fold0" / "cox_clinical_emb_pretrained.json"
        cached = json.loads(path.read_text())
        assert cached["selected"] == rec["selected"] and cached["test"] == pytest.approx(rec["test"])
        picks[rule] = rec
    assert picks["loss"]["validation"] == pytest.approx(picks["first"]["validation"])  # a tie rule, same best
    assert picks["first"]["tied"] > 1 and picks["loss"]["selected"] != picks["first"]["selected"]  # and it bites


def test_pca_rows_fit_the_label_free_steps_on_the_given_rows_only(cohort):
    """SurvivalFeatures / EmbeddingFeatures.fit(train, pca_idx): the expression standardisation, gene choice and
    PCA (and the embedding's) see exactly the pca_idx rows; the clinical encoder the training rows; a row outside
    both never reaches the fit; pca_idx=None is the training-rows fit."""
    from sklearn.decomposition import PCA

    base, rows, part = cohort
    tr, te = list(part["train"]), list(part["test"])
    small = tr[:12]  # a label-efficiency fold: few labelled rows
    non_test = cv.non_test_rows(rows, te)
    assert set(non_test) == set(rows.index) - set(te) and non_test == [i for i in rows.index if i not in set(te)]
    default = cv.ft.SurvivalFeatures(base, rows, n_genes=30).fit(small)
    same = cv.ft.SurvivalFeatures(base, rows, n_genes=30).fit(small, None)
    np.testing.assert_array_equal(same.pca.components_, default.pca.components_)
    wide = cv.ft.SurvivalFeatures(base, rows, n_genes=30).fit(small, non_test)
    assert default.pca.n_components_ == 11 and wide.pca.n_components_ == 30  # capped by rows - 1, then by 30
    # the PCA is the one fitted on the pca rows' standardised expression (per-source gene statistics of those rows)
    x = wide.expr.loc[non_test]
    z = ((x - x.mean()) / x.std().replace(0, 1.0))[wide.genes].to_numpy()
    np.testing.assert_allclose(np.abs(wide.pca.components_), np.abs(PCA(n_components=30).fit(z).components_), atol=1e-6)
    # the clinical encoder stays on the labelled training rows
    assert wide.tab.num == default.tab.num
    # test rows never reach it: changing their expression leaves every fitted statistic unchanged
    changed = rows.copy()
    moved = cv.ft.SurvivalFeatures(base, changed, n_genes=30)
    moved.expr.loc[te] = moved.expr.loc[te] * 7.0 + 3.0
    moved.fit(small, non_test)
    np.testing.assert_allclose(moved.pca.components_, wide.pca.components_)
    pd.testing.assert_frame_equal(moved.transform(small, 5), wide.transform(small, 5))
    # the embedding's PCA likewise
    feats, emb = _emb_fixture(cohort)
    ef = cv.EmbeddingFeatures(feats, emb, base_clinical=True).fit(small, non_test)
    assert ef.pca.n_components_ == 12
    e = emb.loc[non_test].to_numpy(float)
    np.testing.assert_allclose(ef.mu, e.mean(0))
    assert cv.EmbeddingFeatures(feats, emb, base_clinical=True).fit(small).pca.n_components_ == 11


def test_pca_rows_non_test_refits_only_the_models_with_a_pca_end_to_end(tmp_path):
    """survival_cv.py --pca_rows non_test on a real SurvSet cohort at a quarter of the labels: Cox + PCs and the
    forest are refitted with the setting in their cache keys, Cox on clinical covariates alone is read back; the
    refitted Cox + PCs is cox_select on features whose PCA saw every non-test row; the JSON and the table say so."""
    pytest.importorskip("SurvSet")
    common = [
        *("--cohorts", "nki70", "--folds", "3", "--no_bioperceiver", "--quick", "--data_dir", str(tmp_path / "c")),
        *("--train_fraction", "0.25"),
    ]
    _, res = _run_then_rerun(tmp_path, common, ["--pca_rows", "non_test"], ("train", "nt"))
    assert res["pca_rows"] == "non_test"
    assert sorted(res["cohorts"]["nki70"]["from_cache"]["cached"]) == ["f0:cox_clinical", "f1:cox_clinical"]
    for model, rule in (("cox_clinical", None), ("cox_clinical_pcs", "non_test"), ("rsf", "non_test")):
        settings = json.loads((tmp_path / "nt" / "cache" / "nki70" / "fold0" / f"{model}.json").read_text())["settings"]
        assert settings.get("pca_rows") == rule, model
    assert "--pca_rows non_test" in (tmp_path / "nt" / "survival_cv.md").read_text()
    from bioperceiver.data import read_manifest

    manifest = read_manifest(tmp_path / "c" / "manifest.parquet")
    rows = cv.cohort_rows(manifest.table, "nki70")
    folds = cv.make_folds(rows["patient_id"], rows["label_survival_event"], 3, 0, 0.2)
    part = cv.subsample_train(folds, rows["patient_id"], rows["label_survival_event"], 0.25, 0)[0]
    tr, va, te = part["train"], part["validation"], part["test"]
    feats = cv.ft.SurvivalFeatures(manifest.base_dir, rows, n_genes=1000).fit(list(tr), cv.non_test_rows(rows, te))
    assert feats.pca.n_components_ == 30 > len(tr) - 1  # more components than the labelled rows allow
    rec = cv.fit_cox(feats, rows, tr, va, te, with_pcs=True)
    cached = json.loads((tmp_path / "nt" / "cache" / "nki70" / "fold0" / "cox_clinical_pcs.json").read_text())
    assert cached["selected"] == rec["selected"] and cached["test"] == pytest.approx(rec["test"])


# ---------------------------------------------------------------------------------------------------------------
# --selection inner_cv: settings chosen by inner cross-validation on every labelled patient
# ---------------------------------------------------------------------------------------------------------------
def _breslow_reference(eta, time, event) -> float:
    """The definition, term by term: each event's linear predictor minus the log of its risk set's sum."""
    return sum(
        eta[i] - np.log(sum(np.exp(eta[j]) for j in range(len(time)) if time[j] >= time[i]))
        for i in range(len(time))
        if event[i]
    )


def test_breslow_log_likelihood_matches_its_definition_and_lifelines():
    from lifelines import CoxPHFitter

    rng = np.random.default_rng(0)
    n = 40
    eta = rng.normal(size=n)
    time = rng.integers(1, 12, size=n).astype(float)  # many tied times
    event = (rng.random(n) < 0.6).astype(int)
    got = cv.ft.breslow_log_likelihood(eta, time, event)
    assert got == pytest.approx(_breslow_reference(eta, time, event), rel=1e-12)
    assert cv.ft.breslow_log_likelihood(eta + 3.7, time, event) == pytest.approx(got, rel=1e-12)  # shift-invariant
    perm = rng.permutation(n)
    assert cv.ft.breslow_log_likelihood(eta[perm], time[perm], event[perm]) == pytest.approx(got, rel=1e-12)
    # without ties it is lifelines' unpenalised log partial likelihood at lifelines' own fit
    x = rng.normal(size=(n, 3))
    df = pd.DataFrame(x, columns=list("abc")).assign(T=rng.exponential(size=n), E=event)
    cph = CoxPHFitter().fit(df, "T", "E")
    ours = cv.ft.breslow_log_likelihood(x @ cph.params_.to_numpy(), df["T"].to_numpy(), event)
    assert ours == pytest.approx(cph.log_likelihood_, rel=1e-8)


@pytest.mark.parametrize("ties", [False, True])
def test_ridge_cox_coefficients_are_lifelines_coxphfitter_s(ties):
    """The inner cross-validation's fitter is lifelines' ridge Cox model (Efron ties, penalty n * p / 2 on the
    standardised coefficients) without its overhead: the same coefficients within lifelines' own tolerance, on
    columns of very different scales, with tied times, at every penalty of the grid."""
    from lifelines import CoxPHFitter

    rng = np.random.default_rng(4)
    n, p = 50, 8
    x = rng.normal(size=(n, p)) * np.geomspace(0.01, 100, p) + 5.0
    risk = x[:, 0] / 0.01 * 0.5 - x[:, 3] * 0.02
    time = rng.exponential(np.exp(-risk))
    time = np.ceil(time * 4) if ties else time  # a handful of distinct times
    event = (rng.random(n) < 0.7).astype(int)
    if ties:
        assert len(np.unique(time[event == 1])) < event.sum() / 2
    df = pd.DataFrame(x, columns=[f"x{i}" for i in range(p)]).assign(T=time, E=event)
    for pen in cv.PEN_GRID:
        ref = CoxPHFitter(penalizer=pen).fit(df, "T", "E").params_.to_numpy()
        got = cv.ft.ridge_cox_coefficients(x, time, event, pen)
        np.testing.assert_allclose(got * x.std(0, ddof=1), ref * x.std(0, ddof=1), atol=2e-5)  # standardised
    with pytest.raises(ValueError, match="constant column"):
        cv.ft.ridge_cox_coefficients(np.c_[x, np.ones(n)], time, event, 0.1)


def test_ridge_cox_edge_cases_no_event_and_a_float_constant_column():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 3))
    time = rng.exponential(size=12)
    np.testing.assert_array_equal(cv.ft.ridge_cox_coefficients(x, time, np.zeros(12, int), 0.1), np.zeros(3))
    same = np.full(12, 0.1) * 3  # equal values whose float std is not exactly 0
    assert pd.Series(same).std() != 0
    with pytest.raises(ValueError, match="constant column"):
        cv.ft.ridge_cox_coefficients(np.c_[x, same], time, np.ones(12, int), 0.1)


def test_cox_select_cv_drops_a_column_constant_on_the_fitted_rows(cohort):
    """A standardised clinical column whose values are equal on the labelled rows (float std ~1e-17, not 0) gets
    no coefficient: the choice and the risks are those without it."""
    base, rows, part = cohort
    pool, te = [*part["train"], *part["validation"]], list(part["test"])
    feats = cv.ft.SurvivalFeatures(base, rows, n_genes=30).fit(pool)

    class WithConstant:
        pca = feats.pca

        def transform(self, idx, n_pcs, clinical=True):
            x = feats.transform(idx, n_pcs, clinical)
            return x.assign(flat=np.where(np.isin(idx, pool), 0.1 * 3, 1.7))  # constant on the pool only

    assert WithConstant().transform(pool, 0)["flat"].std() != 0
    grid = {"pcs_grid": (0, 2), "pen_grid": (0.01, 1.0)}
    got = cv.ft.cox_select_cv(WithConstant(), rows, pool, te, **grid, n_folds=3, seed=0)
    ref = cv.ft.cox_select_cv(feats, rows, pool, te, **grid, n_folds=3, seed=0)
    assert got["best"] == ref["best"]
    np.testing.assert_allclose(got["risk_test"], ref["risk_test"])


def test_inner_folds_partition_the_pool_by_patient_stratified_by_event():
    patients, events = _rows(n_patients=40, repeats=2, seed=3)
    rows = pd.DataFrame({"patient_id": patients, "label_survival_event": events})
    pool = list(rows.index[:60])  # 30 patients
    held = cv.ft.inner_folds(rows, pool, 5, seed=0)
    assert len(held) == 5 and sorted(np.concatenate(held)) == sorted(pool)
    owner = {}
    for k, out in enumerate(held):
        for p in rows.loc[out, "patient_id"]:
            assert owner.setdefault(p, k) == k  # a patient's rows stay in one fold
    per_fold = [rows.loc[out].groupby("patient_id")["label_survival_event"].max().sum() for out in held]
    assert max(per_fold) - min(per_fold) <= 1  # events spread evenly
    again = cv.ft.inner_folds(rows, pool, 5, seed=0)
    assert all((a == b).all() for a, b in zip(held, again))
    # few events: fewer folds, never fewer than 2; one event: an error that says what to do
    pat_events = rows.groupby("patient_id")["label_survival_event"].max()
    few = [p for p in pat_events.index if pat_events[p] == 0][:8] + [p for p in pat_events.index if pat_events[p]][:3]
    few_rows = list(rows.index[rows["patient_id"].isin(few)])
    assert len(cv.ft.inner_folds(rows, few_rows, 5, seed=0)) == 3
    one = list(rows.index[rows["patient_id"].isin(few[:9])])
    with pytest.raises(ValueError, match="at least 2 patients with and 2 without an event"):
        cv.ft.inner_folds(rows, one, 5, seed=0)


def test_cox_select_cv_picks_the_best_cross_validated_partial_likelihood_and_refits_on_the_pool(cohort):
    """Every grid point's score recomputed by hand (lifelines fitted without each inner fold, the pool's log partial
    likelihood minus the fitted part's); the pick is the best; the test risks are one lifelines fit on the whole
    pool at the pick; the recorded validation is the pooled out-of-fold C-index."""
    from lifelines import CoxPHFitter

    from bioperceiver.evaluation import concordance_index

    base, rows, part = cohort
    pool, te = [*part["train"], *part["validation"]], list(part["test"])
    feats = cv.ft.SurvivalFeatures(base, rows, n_genes=30).fit(pool)
    grid = {"pcs_grid": (0, 2, 5), "pen_grid": (0.1, 1.0)}
    res = cv.ft.cox_select_cv(feats, rows, pool, te, **grid, n_folds=4, seed=3)
    held = cv.ft.inner_folds(rows, pool, 4, seed=3)
    t, e = rows["label_survival_time"].astype(float), rows["label_survival_event"].astype(int)

    def lifelines_fit(idx, n_pcs, pen):
        x = feats.transform(idx, n_pcs)
        x = x.loc[:, x.std() > 0]  # the cohort indicator is constant here: no coefficient
        return CoxPHFitter(penalizer=pen).fit(x.assign(T=t.loc[idx].to_numpy(), E=e.loc[idx].to_numpy()), "T", "E")

    scores = {}
    for n_pcs in grid["pcs_grid"]:
        for pen in grid["pen_grid"]:
            cvpl, oof = 0.0, pd.Series(0.0, index=pool)
            for out in held:
                inside = [r for r in pool if r not in set(out)]
                cph = lifelines_fit(inside, n_pcs, pen)
                eta = cph.predict_log_partial_hazard(feats.transform(pool, n_pcs)[cph.params_.index]).to_numpy()
                full = _breslow_reference(eta, t.loc[pool].to_numpy(), e.loc[pool].to_numpy())
                mask = np.isin(pool, inside)
                part_ll = _breslow_reference(eta[mask], t.loc[inside].to_numpy(), e.loc[inside].to_numpy())
                cvpl += full - part_ll
                oof.loc[out] = eta[~mask]
            scores[(n_pcs, pen)] = (cvpl, concordance_index(t.loc[pool], oof.to_numpy(), e.loc[pool]))
    recorded = {(g["n_pcs"], g["penalizer"]): g for g in res["grid"]}
    for key, (cvpl, oof_c) in scores.items():
        assert recorded[key]["validation_cvpl"] == pytest.approx(cvpl, rel=1e-5)  # lifelines' tolerance
        assert recorded[key]["validation"] == pytest.approx(oof_c)
        assert "test" not in recorded[key]  # no grid point's test score is computed
    pick = max(scores, key=lambda k: scores[k][0])
    assert (res["best"]["n_pcs"], res["best"]["penalizer"]) == pick and res["inner_folds"] == 4
    assert res["best"]["validation"] == pytest.approx(scores[pick][1])
    cph = lifelines_fit(pool, *pick)
    final = cph.predict_log_partial_hazard(feats.transform(te, pick[0])[cph.params_.index]).to_numpy()
    np.testing.assert_allclose(res["risk_test"], final, atol=1e-4)
    assert res["best"]["test"] == pytest.approx(concordance_index(t.loc[te], final, e.loc[te]))


@pytest.mark.parametrize("model", ["cox_clinical", "cox_clinical_pcs", "rsf", "cox_clinical_emb_pretrained"])
def test_inner_cv_reads_every_labelled_patient_and_no_test_label(cohort, model):
    """--selection inner_cv: test labels never reach the choice or the fit; a validation label does (it is in the
    pool now), unlike the validation rule's fit."""
    base, rows, part = cohort
    tr, va, te = part["train"], part["validation"], list(part["test"])

    def fit(rows):
        feats = cv.ft.SurvivalFeatures(base, rows, n_genes=30).fit([*tr, *va])
        if model == "rsf":
            return cv.fit_rsf(feats, rows, tr, va, te, seed=0, n_estimators=20, inner_folds=3)
        if model in cv.EMB_ARMS:
            _, emb = _emb_fixture(cohort)
            return cv.fit_cox_emb(feats, emb, rows, tr, va, te, inner_folds=3, seed=1)
        return cv.fit_cox(feats, rows, tr, va, te, with_pcs=model == "cox_clinical_pcs", inner_folds=3, seed=1)

    ref = fit(rows)
    assert ref["inner_folds"] == 3 and 0 <= ref["test"] <= 1 and len(ref["risk_test"]) == len(te)
    changed = rows.copy()
    changed.loc[te, "label_survival_time"] = changed.loc[te, "label_survival_time"].to_numpy()[::-1]
    changed.loc[te, "label_survival_event"] = 1 - changed.loc[te, "label_survival_event"]
    res = fit(changed)
    assert res["selected"] == ref["selected"] and res["validation"] == pytest.approx(ref["validation"])
    np.testing.assert_allclose(res["risk_test"], ref["risk_test"])
    moved = rows.copy()
    va_ids = list(va)
    moved.loc[va_ids, "label_survival_time"] = np.random.default_rng(5).permutation(
        moved.loc[va_ids, "label_survival_time"].to_numpy()
    )
    assert not np.allclose(fit(moved)["risk_test"], ref["risk_test"])


def test_selection_inner_cv_end_to_end_refits_the_classical_models_with_their_own_cache_keys(tmp_path):
    """survival_cv.py --selection inner_cv on a real SurvSet cohort at a quarter of the labels: every classical
    model is refitted (its cache key carries the rule; the default's keys are unchanged) and equals fit_cox /
    fit_rsf with inner folds on features fitted on training + validation; the JSON and the table say so."""
    pytest.importorskip("SurvSet")
    common = [
        *("--cohorts", "nki70", "--folds", "3", "--no_bioperceiver", "--quick", "--data_dir", str(tmp_path / "c")),
        *("--train_fraction", "0.5", "--subsample_validation"),
    ]
    first, res = _run_then_rerun(tmp_path, common, ["--selection", "inner_cv", "--inner_folds", "3"], ("va", "cv"))
    assert first["selection"] == {"rule": "validation"}
    assert res["selection"] == {"rule": "inner_cv", "inner_folds": 3}
    assert res["cohorts"]["nki70"]["from_cache"]["cached"] == []
    for run, rule in ((tmp_path / "va", None), (tmp_path / "cv", {"inner_cv": 3})):
        for model in cv.BASELINES:
            settings = json.loads((run / "cache" / "nki70" / "fold0" / f"{model}.json").read_text())["settings"]
            assert settings.get("selection") == rule, (run.name, model)
    assert "`--selection inner_cv`" in (tmp_path / "cv" / "survival_cv.md").read_text()
    from bioperceiver.data import read_manifest

    manifest = read_manifest(tmp_path / "c" / "manifest.parquet")
    rows = cv.cohort_rows(manifest.table, "nki70")
    folds = cv.make_folds(rows["patient_id"], rows["label_survival_event"], 3, 0, 0.2)
    part = cv.subsample_train(folds, rows["patient_id"], rows["label_survival_event"], 0.5, 0, validation=True)[0]
    tr, va, te = part["train"], part["validation"], part["test"]
    feats = cv.ft.SurvivalFeatures(manifest.base_dir, rows, n_genes=1000).fit([*tr, *va])
    rec = cv.fit_cox(feats, rows, tr, va, te, with_pcs=True, inner_folds=3, seed=cv.inner_seed(cv.parse_args([]), 0))
    cached = json.loads((tmp_path / "cv" / "cache" / "nki70" / "fold0" / "cox_clinical_pcs.json").read_text())
    assert cached["selected"] == rec["selected"] and cached["test"] == pytest.approx(rec["test"])
    assert cached["inner_folds"] == 3 and cached["validation_cvpl"] == pytest.approx(rec["validation_cvpl"])
    with pytest.raises(SystemExit):
        cv.parse_args(["--inner_folds", "1"])


def test_select_candidate_keeps_the_best_validation_never_reads_test():
    recs = {
        "400": {"validation": 0.70, "test": 0.90, "risk_test": [1.0], "selected": {"n_pcs": 2}, "tied": 1},
        "800": {"validation": 0.72, "test": 0.50, "risk_test": [2.0], "selected": {"n_pcs": 5}, "tied": 3},
        "1600": {"validation": 0.72 + 1e-12, "test": 0.99, "risk_test": [3.0], "selected": {"n_pcs": 0}, "tied": 1},
    }
    rec = cv.select_candidate(recs)
    # 800 beats 400 on validation (whatever the test says); 1600 ties it within the metric's tolerance: the first stays
    assert rec["selected"] == {"backbone": "800", "n_pcs": 5}
    assert rec["test"] == 0.50 and rec["risk_test"] == [2.0] and rec["tied"] == 3
    assert rec["candidates_validation"] == {"400": 0.70, "800": 0.72, "1600": 0.72 + 1e-12}
    assert cv.select_candidate({"a": recs["400"]})["selected"]["backbone"] == "a"
    nan_first = {"x": {**recs["400"], "validation": float("nan")}, "y": recs["400"]}
    assert cv.select_candidate(nan_first)["selected"]["backbone"] == "y"  # a NaN score never wins
    with pytest.raises(ValueError, match="candidate 'b' has no validation score: no clinical"):
        cv.select_candidate({"a": recs["400"], "b": {"skipped": "no clinical"}})


def test_emb_candidates_parsed_and_the_arm_resolved(tmp_path):
    base = ["--cohorts", "nki70", "--pretrained_dir", str(tmp_path / "a")]
    args = cv.parse_args([*base, "--emb_candidates", f"400={tmp_path}/a/fold{{fold}}", f"800={tmp_path}/b"])
    assert cv.emb_candidates(args) == {"400": f"{tmp_path}/a/fold{{fold}}", "800": f"{tmp_path}/b"}
    arms = cv.resolve_bp_arms(args)  # by default with candidates, and the arm whose records it compares
    assert cv.CANDIDATE_ARM in arms and "cox_clinical_emb_pretrained" in arms
    assert cv.CANDIDATE_ARM not in cv.resolve_bp_arms(cv.parse_args(base))  # without candidates: not run
    only = cv.parse_args([*base, "--bp_arms", cv.CANDIDATE_ARM, "--emb_candidates", f"x={tmp_path}"])
    assert cv.resolve_bp_arms(only) == ["cox_clinical_emb_pretrained", cv.CANDIDATE_ARM]
    for bad, message in (
        (["--bp_arms", cv.CANDIDATE_ARM], "needs --emb_candidates"),
        (["--bp_arms", "cox_clinical_emb_pretrained", "--emb_candidates", "x=y"], "add it to --bp_arms"),
    ):
        with pytest.raises(SystemExit, match=message):
            cv.resolve_bp_arms(cv.parse_args([*base, *bad]))
    with pytest.raises(SystemExit, match="needs --pretrained_dir"):
        cv.resolve_bp_arms(cv.parse_args(["--cohorts", "nki70", "--emb_candidates", f"x={tmp_path}"]))
    for bad in (["noequals"], ["=dir"], ["x=a", "x=b"], ["a/b=dir"]):
        with pytest.raises(SystemExit, match="--emb_candidates"):
            cv.emb_candidates(cv.parse_args([*base, "--emb_candidates", *bad]))


def test_candidate_arm_end_to_end_reads_each_backbone_s_run_back_and_refits_the_same(tmp_path, monkeypatch):
    """Three runs of cox_clinical_emb_pretrained on three "backbones" (fixed embeddings: one with survival signal,
    two of noise), then the candidate arm over them: its per-fold records are those runs' records read back under
    the same settings (nothing fitted), each fold keeps the candidate with the best inner-CV score, and a run that
    finds nothing to read back fits the same records. The paired difference against --pretrained_dir's backbone
    alone is reported."""
    pytest.importorskip("SurvSet")
    dirs = {}
    for name in ("noise", "signal", "noise2"):
        dirs[name] = tmp_path / name
        dirs[name].mkdir()
        (dirs[name] / "config.json").write_text("{}")
    seeds = {"noise": 1, "signal": 2, "noise2": 3}
    calls = []

    def fake_embeddings(args, manifest, rows, folds, cohort, out, init, models, pretrained_dir=None, tag=""):
        folder = Path(pretrained_dir or args.pretrained_dir).name
        calls.append((folder, init, tag))
        rng = np.random.default_rng(seeds[folder] + (10 if init == "random_init" else 0))
        emb = pd.DataFrame(rng.normal(size=(len(rows), 6)), index=rows.index)
        if folder == "signal" and init == "pretrained":
            emb[0] += 6.0 * rows["label_survival_time"].astype(float).rank().to_numpy() / len(rows)
        return [emb] * len(folds)

    monkeypatch.setattr(cv, "embedding_models", lambda folder, seed: {"folder": folder})
    monkeypatch.setattr(cv, "cohort_embeddings", fake_embeddings)
    common = [
        *("--cohorts", "nki70", "--folds", "3", "--quick", "--data_dir", str(tmp_path / "c")),
        *("--selection", "inner_cv", "--inner_folds", "3"),
    ]
    for name in dirs:
        out = ["--output_dir", str(tmp_path / f"run_{name}")]
        cv.main([*common, "--pretrained_dir", str(dirs[name]), "--bp_arms", "cox_clinical_emb_pretrained", *out])
    candidates = ["--emb_candidates", *(f"{n}={d}" for n, d in dirs.items())]
    arms = ["--bp_arms", cv.CANDIDATE_ARM, "cox_clinical_emb_random"]
    reuse = ["--reuse_cache", *(str(tmp_path / f"run_{n}") for n in dirs)]
    calls.clear()
    sel = cv.main(
        [
            *common,
            "--pretrained_dir",
            str(dirs["noise"]),
            *arms,
            *candidates,
            *reuse,
            "--output_dir",
            str(tmp_path / "sel"),
        ]
    )
    r = sel["cohorts"]["nki70"]
    assert not [c for c in calls if c[1] == "pretrained" and c[2]], "a candidate was embedded: nothing read back"
    assert not [o for o in r["from_cache"]["ran"] if "[" in o]
    assert sorted(o for o in r["from_cache"]["cached"] if cv.CANDIDATE_ARM in o) == sorted(
        f"f{k}:{cv.CANDIDATE_ARM}[{n}]" for k in range(2) for n in dirs if n != "noise"
    )  # "noise" is --pretrained_dir: its record is this run's cox_clinical_emb_pretrained, counted once as that
    model = r["models"][cv.CANDIDATE_ARM]
    for k in range(2):
        recs = {
            n: json.loads(
                (
                    tmp_path / f"run_{n}" / "cache" / "nki70" / f"fold{k}" / "cox_clinical_emb_pretrained.json"
                ).read_text()
            )
            for n in dirs
        }
        best = max(dirs, key=lambda n: recs[n]["validation"])
        assert model["selected"][k]["backbone"] == best
        assert model["candidates_validation"][k] == {n: recs[n]["validation"] for n in dirs}
        assert model["selected"][k]["n_pcs"] == recs[best]["selected"]["n_pcs"]
    assert {s["backbone"] for s in model["selected"]} == {"signal"}  # the signal beats noise on inner CV here
    assert f"{cv.CANDIDATE_ARM} - cox_clinical_emb_pretrained" in r["paired_differences"]
    assert f"{cv.CANDIDATE_ARM} - cox_clinical_emb_random" in r["paired_differences"]
    assert sel["emb_candidates"] == {n: str(d) for n, d in dirs.items()}
    md = (tmp_path / "sel" / "survival_cv.md").read_text()
    assert "| nki70 | signal, signal |" in md and f"{cv.CANDIDATE_ARM}: kept noise in 0, signal in 2, noise2 in 0" in md
    # without runs to read back: the candidates are embedded (tagged files) and fitted, to the same records
    calls.clear()
    fresh = cv.main(
        [*common, "--pretrained_dir", str(dirs["noise"]), *arms, *candidates, "--output_dir", str(tmp_path / "fresh")]
    )
    assert sorted(c[0] for c in calls if c[2]) == ["noise2", "signal"] and {c[2] for c in calls if c[2]} == {
        "@signal",
        "@noise2",
    }
    f = fresh["cohorts"]["nki70"]["models"][cv.CANDIDATE_ARM]
    assert f["selected"] == model["selected"]
    assert f["test"]["per_fold"] == pytest.approx(model["test"]["per_fold"])


def test_inner_cv_curve_weights_each_inner_fold_by_its_events():
    hist = [
        [{"eval_loss": 2.0, "epoch": 1}, {"loss": 9.0}, {"eval_loss": 1.0, "epoch": 2}],
        [{"eval_loss": 4.0, "epoch": 1}, {"eval_loss": 3.0, "epoch": 2}],
        [{"eval_loss": float("nan"), "epoch": 1}, {"eval_loss": 50.0, "epoch": 2}],  # no event: no weight
    ]
    curve = cv.inner_cv_curve(hist, [1, 3, 0])
    np.testing.assert_allclose(curve, [(2.0 * 1 + 4.0 * 3) / 4, (1.0 * 1 + 3.0 * 3) / 4])


def test_bp_inner_cv_chooses_rate_and_epoch_on_inner_folds_and_refits_on_every_labelled_patient(tmp_path, monkeypatch):
    """--bp_selection inner_cv: each rate trains on every inner fold's rest of training + validation (the Cox
    models' inner split), evaluated each epoch on the held-out inner fold, keeping its last epoch; the (rate, epoch)
    with the lowest event-weighted held-out loss is refitted on all labelled patients for that many epochs, without
    validation; no test patient is ever trained or validated on, and the record's test is the refit's."""
    from types import SimpleNamespace

    n = 20
    ids = [f"p{i}" for i in range(n)]
    rows = pd.DataFrame(
        {"patient_id": ids, "tabular_clinical": [None] * n, "label_survival_event": [i % 2 for i in range(n)]},
        index=ids,
    )
    part = {"train": np.array(ids[:12]), "validation": np.array(ids[12:16]), "test": np.array(ids[16:])}
    splits = []
    monkeypatch.setattr(cv.ft, "write_split_manifest", lambda m, r, split, cols, path: splits.append(split.copy()))
    # the scripted held-out loss per (rate, epoch): rate 1e-3 reaches the lowest at epoch 2 (ties with 3e-3's epoch 2,
    # which comes later in the grid), 3e-4 never gets there
    loss = {3e-4: [3.0, 2.9, 2.8], 1e-3: [2.5, 2.0, 2.2], 3e-3: [2.4, 2.0, 2.6]}

    class Runner:
        args = SimpleNamespace(work_dir=str(tmp_path))

        def __init__(self):
            self.calls = []

        def run(self, tag, path, task_args, cfg, *, seed, modalities, extra):
            self.calls.append({"tag": tag, "cfg": cfg, "extra": list(extra)})
            out = tmp_path / "runs" / tag
            out.mkdir(parents=True, exist_ok=True)
            if "_inner" in tag:
                hist = [{"epoch": e + 1, "eval_loss": x, "eval_c_index": 0.6} for e, x in enumerate(loss[cfg["lr"]])]
                (out / "trainer_state.json").write_text(json.dumps({"log_history": hist}))
            pred = pd.DataFrame({"sample_id": ids[16:], "risk": np.linspace(0, 1, 4)})
            return {"pred": pred, "validation": float("nan"), "test": 0.71, "epochs": cfg["epochs"]}

    runner = Runner()
    args = cv.parse_args(["--bp_selection", "inner_cv", "--bp_lrs", "3e-4", "1e-3", "3e-3", "--inner_folds", "4"])
    assert cv.bp_inner_cv_folds(args, "bp_pretrained") == 4 and cv.bp_inner_cv_folds(args, "bp_pretrained_probe") == 0
    assert cv.bp_inner_cv_folds(cv.parse_args([]), "bp_pretrained") == 0
    rec = cv.bp_inner_cv(args, SimpleNamespace(base_dir=tmp_path), rows, part, runner, "coh", 0, "bp_pretrained", 4)
    pool = set(ids[:16])
    held = cv.ft.inner_folds(rows, np.array(ids[:16]), 4, cv.inner_seed(args, 0))
    assert len(runner.calls) == 3 * 4 + 1
    for i, split in enumerate(splits[:-1]):  # the inner runs: rate-major, then inner fold
        fold = set(held[i % 4])
        assert set(split[split == "validation"].index) == fold
        assert set(split[split == "train"].index) == pool - fold
        assert set(split[split == "test"].index) == set(ids[16:])  # predicted, never read
        assert runner.calls[i]["cfg"]["keep_last"] is True and "--save_strategy" in runner.calls[i]["extra"]
    refit = splits[-1]
    assert set(refit[refit == "train"].index) == pool and not (refit == "validation").any()
    last = runner.calls[-1]
    assert last["cfg"]["lr"] == 1e-3 and last["cfg"]["epochs"] == 2 and last["tag"].endswith("_refit")
    assert last["extra"][last["extra"].index("--eval_strategy") + 1] == "no"
    assert rec["lr"] == 1e-3 and rec["epochs"] == 2 and rec["test"] == 0.71 and rec["validation"] == 0.6
    assert rec["selected"]["inner_folds"] == 4 and sum(rec["selected"]["inner_events"]) == 8
    assert rec["inner_cv_loss"]["0.001"] == [2.5, 2.0, 2.2]


def test_bp_selection_inner_cv_end_to_end_with_the_real_finetuning_script(tmp_path):
    """--bp_selection inner_cv through run_finetune on a real SurvSet cohort: each inner run evaluates every epoch
    on its held-out inner fold and saves its log history; the refit trains on training + validation (no validation
    rows) for the chosen number of epochs; the record keeps its own cache file beside the validation rule's."""
    pytest.importorskip("SurvSet")
    args = [
        "--cohorts",
        "nki70",
        "--folds",
        "3",
        "--quick",
        "--bp_arms",
        "bp_random",
        "--data_dir",
        str(tmp_path / "c"),
    ]
    args += ["--output_dir", str(tmp_path / "cv"), "--bp_selection", "inner_cv", "--inner_folds", "2"]
    res = cv.main([*args, "--bp_lrs", "1e-3", "3e-3"])
    model = res["cohorts"]["nki70"]["models"]["bp_random"]
    assert res["bp_selection"] == {"rule": "inner_cv", "inner_folds": 2}
    runs = tmp_path / "cv" / "runs"
    for k, (lr, picked) in enumerate(zip(model["lr"], model["selected"])):
        assert picked["inner_folds"] == 2 and picked["lr"] == lr and 1 <= picked["epochs"] <= 2  # --quick: 2 epochs
        inner = sorted(runs.glob(f"nki70_f{k}_bp_random_lr*_inner*of2"))
        assert len(inner) == 4  # 2 rates x 2 inner folds
        for run in inner:
            history = json.loads((run / "trainer_state.json").read_text())["log_history"]
            assert [h["epoch"] for h in history if "eval_loss" in h] == [1.0, 2.0]
        (refit,) = runs.glob(f"nki70_f{k}_bp_random_lr{lr:g}_*refit")
        sizes = json.loads((refit / "all_results.json").read_text())["split_sizes"]
        assert sizes["validation"].startswith("0 rows") and not sizes["train"].startswith("0 rows")
        cached = tmp_path / "cv" / "cache" / "nki70" / f"fold{k}" / "bp_random_innercv.json"
        assert json.loads(cached.read_text())["settings"]["selection"] == {"inner_cv": 2, "lrs": [1e-3, 3e-3]}
