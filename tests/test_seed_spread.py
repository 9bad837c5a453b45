"""benchmarks/seed_spread.py: survival_cv.py runs that differ only in their seeds, combined."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from script_loader import load_script

pytest.importorskip("lifelines")


cv = load_script("benchmarks/survival_cv.py")
ss = load_script("benchmarks/seed_spread.py")
FOLDS = [{"test_ids": ["s1", "s2"]}, {"test_ids": ["s3", "s4"]}]


def _fold_data(rng, shift: float):
    """Three folds where model 0's risk is a noisy copy of -time and model 1's pure noise; ``shift`` mixes the
    signal in (so runs differ)."""
    out = []
    for _ in range(3):
        t = rng.exponential(size=60)
        e = (rng.random(60) < 0.7).astype(int)
        noise = rng.normal(size=60)
        out.append(
            {
                "time": t,
                "event": e,
                "patients": np.arange(60),
                "risks": np.array([shift * -t + noise, rng.normal(size=60)]),
            }
        )
    return out


def _write_run(folder: Path, cohorts: dict, *, seed=0, folds=FOLDS) -> Path:
    """A survival_cv.py output folder as its main() writes it: JSON without replicates, replicates beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    res = {"folds": 5, "seed": seed, "val_fraction": 0.2, "argv": ["--x"], "cohorts": {}}
    for name, (role, diffs) in cohorts.items():
        res["cohorts"][name] = {"role": role, "folds": folds, "paired_differences": diffs}
    res["pooled"] = {role: cv.pooled_differences(res["cohorts"], role) for role in ("development", "external")}
    cv.write_replicates(res, folder / "survival_cv_replicates.npz")
    (folder / "survival_cv.json").write_text(json.dumps(cv._without_replicates(res), default=float))
    return folder


def _cached_run(folder: Path, manifest, folds, init_seed: int, models: dict, cached: dict, **cohort_extra) -> dict:
    """A survival_cv.py run as seed_spread.py reads it, on one cohort (nki70): ``cache/nki70/fold<k>/<model>.json``
    for each ``(model, k) -> (test risks, cache settings)`` of ``cached``, and the run's JSON with ``models``."""
    for (m, k), (risk, settings) in cached.items():
        path = folder / "cache" / "nki70" / f"fold{k}" / f"{m}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"risk_test": list(map(float, risk)), "settings": settings}))
    cohort = {"role": "development", "folds": folds, "models": models, **cohort_extra}
    res = {"seed": 0, "init_seed": init_seed, "folds": 2, "manifest": str(manifest), "bp": {"pretrained_dir": None}}
    return {"folder": str(folder), "res": {**res, "cohorts": {"nki70": cohort}}, "replicates": {}}


def _runs(tmp_path, shifts, seed=0):
    """One run per shift; cohorts a, b (development) and x (external), each with 'bp - best baseline'."""
    folders = []
    for i, shift in enumerate(shifts):
        rng = np.random.default_rng(100 + i)
        cohorts = {}
        for name, role, base in (("a", "development", "rsf"), ("b", "development", "cox"), ("x", "external", "rsf")):
            d = cv.paired_difference(_fold_data(rng, shift), n_boot=300, seed=seed)
            cohorts[name] = (role, {f"bp - {base}": {**d, "pair": ["bp", "best baseline"]}})
        folders.append(_write_run(tmp_path / f"run{i}", cohorts, seed=seed))
    return folders


def test_each_run_matches_survival_cv_and_the_mean_pools_runs(tmp_path):
    folders = _runs(tmp_path, [0.2, 0.5, 1.0])
    out = ss.main(["--runs", *map(str, folders), "--labels", "s0", "s1", "s2", "--output_dir", str(tmp_path / "o")])
    dev = out["roles"]["development"]["bp - best baseline"]
    recorded = [json.loads((f / "survival_cv.json").read_text())["pooled"]["development"] for f in folders]
    for lab, rec in zip(("s0", "s1", "s2"), recorded):  # each run: survival_cv.py's own pooled number and interval
        assert dev["runs"][lab]["difference"] == pytest.approx(rec["bp - best baseline"]["difference"])
        assert dev["runs"][lab]["ci95"] == pytest.approx(rec["bp - best baseline"]["ci95"])
    per_run = [r["bp - best baseline"]["difference"] for r in recorded]
    assert dev["mean"] == pytest.approx(np.mean(per_run))
    assert dev["sd_between_runs"] == pytest.approx(np.std(per_run, ddof=1))
    assert dev["runs_above_zero"] == sum(d > 0 for d in per_run)
    assert dev["cohorts"] == ["a", "b"]
    lo, hi = dev["ci95_runs_and_patients"]
    plo, phi = dev["ci95_patients_only"]
    assert lo <= dev["mean"] <= hi and lo <= plo and phi <= hi  # the seed spread widens the interval
    ext = out["roles"]["external"]["bp - best baseline"]
    assert ext["cohorts"] == ["x"]
    for name in ("seed_spread.json", "seed_spread.md", "seed_spread.png"):
        assert (tmp_path / "o" / name).stat().st_size > 0
    md = (tmp_path / "o" / "seed_spread.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| bp - best baseline |"))
    assert f"**{dev['mean']:+.3f}**" in row and row.endswith(f"| {dev['runs_above_zero']} of 3 |")


def test_identical_runs_add_no_spread_and_noise_free_runs_only_spread(tmp_path):
    same = _runs(tmp_path / "same", [0.5])[0]
    twice = ss.combine([ss.load_run(same), ss.load_run(same)], ["a", "b"], "development", n_boot=4000)
    d = twice["bp - best baseline"]
    assert d["sd_between_runs"] == 0.0
    assert d["ci95_runs_and_patients"] == pytest.approx(d["runs"]["a"]["ci95"], abs=0.01)

    def flat(folder, value):  # replicates all equal to the point: no patient sampling noise
        reps = np.full(200, value)
        diffs = {"bp - rsf": {"difference": value, "_replicates": reps, "pair": ["bp", "best baseline"]}}
        return ss.load_run(_write_run(folder, {"a": ("development", diffs)}))

    runs = [flat(tmp_path / f"f{i}", v) for i, v in enumerate([0.01, 0.02, 0.03, 0.04])]
    d = ss.combine(runs, list("abcd"), "development", n_boot=4000)["bp - best baseline"]
    assert d["ci95_patients_only"] == pytest.approx([0.025, 0.025])
    lo, hi = d["ci95_runs_and_patients"]
    assert 0.01 <= lo < 0.025 < hi <= 0.04  # only the spread between runs is left


def test_runs_that_do_not_pair_are_refused(tmp_path):
    a, b = _runs(tmp_path, [0.5, 0.5])
    other_seed = _runs(tmp_path / "s1", [0.5], seed=1)[0]
    with pytest.raises(ValueError, match=r"run r1 .* seed=1.*vary --init_seed"):
        ss.check_compatible([ss.load_run(a), ss.load_run(other_seed)], ["r0", "r1"])
    fraction = json.loads((b / "survival_cv.json").read_text())
    (b / "survival_cv.json").write_text(json.dumps({**fraction, "train_fraction": 0.5}))
    with pytest.raises(ValueError, match=r"run r1 .* train_fraction=0\.5, the first run 1\.0"):
        ss.check_compatible([ss.load_run(a), ss.load_run(b)], ["r0", "r1"])  # a: written before the setting existed
    (b / "survival_cv.json").write_text(json.dumps({**fraction, "train_fraction": 1.0}))
    ss.check_compatible([ss.load_run(a), ss.load_run(b)], ["r0", "r1"])
    (b / "survival_cv.json").write_text(json.dumps({**fraction, "subsample_validation": True}))
    with pytest.raises(ValueError, match=r"run r1 .* subsample_validation=True, the first run False"):
        ss.check_compatible([ss.load_run(a), ss.load_run(b)], ["r0", "r1"])  # other validation patients
    (b / "survival_cv.json").write_text(json.dumps({**fraction, "subsample_validation": False}))
    ss.check_compatible([ss.load_run(a), ss.load_run(b)], ["r0", "r1"])
    moved = tmp_path / "moved"
    rng = np.random.default_rng(0)
    d = cv.paired_difference(_fold_data(rng, 0.5), n_boot=300, seed=0)
    folds = [{"test_ids": ["s9"]}, {"test_ids": ["s3"]}]
    _write_run(moved, {"a": ("development", {"bp - rsf": {**d, "pair": ["bp", "best baseline"]}})}, folds=folds)
    with pytest.raises(ValueError, match="cohort a's test folds differ"):
        ss.check_compatible([ss.load_run(a), ss.load_run(moved)], ["r0", "r1"])
    fewer = tmp_path / "fewer"
    d = cv.paired_difference(_fold_data(rng, 0.5), n_boot=50, seed=0)
    _write_run(fewer, {"a": ("development", {"bp - rsf": {**d, "pair": ["bp", "best baseline"]}})})
    with pytest.raises(ValueError, match=r"run r1 .* \[50\] bootstrap replicates .* --n_bootstrap"):
        ss.check_compatible([ss.load_run(a), ss.load_run(fewer)], ["r0", "r1"])
    (b / "survival_cv_replicates.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"survival_cv_replicates\.npz is missing"):
        ss.load_run(b)
    with pytest.raises(SystemExit):
        ss.parse_args(["--runs", str(a), "--output_dir", str(tmp_path)])  # one run: nothing to combine


def _ensemble_runs(tmp_path):
    """Two runs of one 2-fold nki70 cohort with cached test risks for an arm ``emb``, a control ``rnd`` and the
    best baseline ``cox_clinical_pcs``: (runs, risks by (run, model, fold), time, event, n per fold)."""
    import pandas as pd

    from bioperceiver.data import write_manifest

    rng = np.random.default_rng(3)
    n = 40
    time = rng.exponential(size=2 * n)
    event = (rng.random(2 * n) < 0.7).astype(int)
    ids = [f"s{i}" for i in range(2 * n)]
    table = pd.DataFrame(
        {
            "sample_id": ids,
            "patient_id": [f"p{i}" for i in range(2 * n)],
            "meta_source": "survset_nki70",
            "label_survival_time": time,
            "label_survival_event": event,
        }
    )
    manifest = write_manifest(table, tmp_path / "cohort" / "manifest.parquet")
    folds = [{"test_ids": ids[:n]}, {"test_ids": ids[n:]}]
    models = ("emb", "rnd", "cox_clinical_pcs")
    risks = {}  # (run, model, fold) -> risks
    runs = []
    for r in range(2):
        cached = {}
        for k in range(2):
            sl = slice(k * n, (k + 1) * n)
            for m in models:
                signal = {"emb": 1.0, "rnd": 0.2, "cox_clinical_pcs": 0.5}[m]
                risk = -signal * time[sl] + rng.normal(size=n)
                risks[r, m, k] = risk
                init_seed = r if r and m != "cox_clinical_pcs" else None  # a baseline's key never has it
                settings = {"cohort": "nki70", "fold": k, "model": m, "seed": 0, "folds": 2, "init_seed": init_seed}
                cached[m, k] = (risk, {a: b for a, b in settings.items() if b is not None})
        models_res = {m: {"test": {"mean": 0.6}} for m in models}
        extra = {"best_baseline_by_validation": "cox_clinical_pcs"}
        runs.append(_cached_run(tmp_path / f"run{r}", manifest, folds, r, models_res, cached, **extra))
    return runs, risks, time, event, n


def test_ensemble_averages_the_runs_cached_risks(tmp_path):
    """--ensemble: each patient's test risk averaged over the runs (read from their caches, checked to be theirs),
    scored against the best baseline and the averaged control with survival_cv's paired bootstrap; a cache another
    run wrote over is refused."""
    from bioperceiver.evaluation import concordance_index

    runs, risks, time, event, n = _ensemble_runs(tmp_path)
    models = ("emb", "rnd", "cox_clinical_pcs")
    ens = ss.ensemble(runs, "emb", "rnd", n_boot=200)
    mean = {m: [(risks[0, m, k] + risks[1, m, k]) / 2 for k in range(2)] for m in models}
    fold_t = [time[:n], time[n:]]
    fold_e = [event[:n], event[n:]]
    expect = np.mean([concordance_index(fold_t[k], mean["emb"][k], fold_e[k]) for k in range(2)])
    assert ens["test_c_index"]["nki70"]["emb (ensemble)"] == pytest.approx(expect)
    ref = cv.paired_difference(
        [
            {
                "time": fold_t[k],
                "event": fold_e[k],
                "patients": np.array([f"p{i}" for i in range(k * n, (k + 1) * n)]),
                "risks": np.array([mean["emb"][k], mean["rnd"][k]]),
            }
            for k in range(2)
        ],
        200,
        0,
    )
    got = ens["pooled"]["development"]["emb (ensemble) - rnd (ensemble)"]
    assert got["difference"] == pytest.approx(ref["difference"])
    assert got["ci95"] == pytest.approx(
        [np.percentile(ref["_replicates"], 2.5), np.percentile(ref["_replicates"], 97.5)]
    )
    assert "emb (ensemble) - best baseline" in ens["pooled"]["development"]
    lines = ss.ensemble_lines(ens, 2)
    assert any(line.startswith("| nki70 |") for line in lines)
    only_first = [runs[0], {**runs[1], "res": {**runs[1]["res"], "cohorts": {}}}]
    none = ss.ensemble(only_first, "emb", "rnd", n_boot=50)
    assert none["test_c_index"] == {} and "No cohort has emb" in ss.ensemble_lines(none, 2)[2]  # a cohort one run lacks
    runs[1]["res"]["init_seed"] = 5  # the cache says init_seed 1: another run's result
    with pytest.raises(ValueError, match="holds another run's result \\(init_seed"):
        ss.ensemble(runs, "emb", "rnd", n_boot=50)


def test_ensemble_reads_the_rate_a_learning_rate_grid_kept(tmp_path):
    """An arm run with survival_cv.py --bp_lrs: its risks come from the run at the rate validation kept in each fold
    (recorded in survival_cv.json), not from another rate's cache file; a cache at another rate is refused."""
    folder = tmp_path / "run"
    for k, (lr, other) in enumerate(((1e-3, 3e-3), (3e-3, 1e-3))):
        for rate, risk in ((lr, [1.0, 2.0]), (other, [9.0, 9.0])):
            settings = {"cohort": "c", "fold": k, "model": "bp", "seed": 0, "folds": 2, "lr": rate}
            cv.store(folder / "cache" / "c" / f"fold{k}" / f"bp_lr{rate:g}.json", settings, {"risk_test": risk})
    res = {"seed": 0, "init_seed": 0, "folds": 2, "bp": {}, "cohorts": {"c": {"models": {"bp": {"lr": [1e-3, 3e-3]}}}}}
    run = {"folder": str(folder), "res": res}
    for k in range(2):
        np.testing.assert_array_equal(ss.cached_risks(run, "c", "bp", k), [1.0, 2.0])
    path = folder / "cache" / "c" / "fold1" / "bp_lr0.003.json"
    rec = json.loads(path.read_text())
    rec["settings"]["lr"] = 1e-3
    path.write_text(json.dumps(rec))
    with pytest.raises(ValueError, match="another run's result \\(lr"):
        ss.cached_risks(run, "c", "bp", 1)


def test_versus_pairs_one_arm_across_two_runs_on_the_same_patients(tmp_path):
    """--versus ARM: the first run's ARM minus the second's on the same test patients (survival_cv's paired
    bootstrap, per cohort and pooled); a cohort whose risks are identical in both runs (a setting that does not
    apply there) is listed apart and left out of the pooled row."""
    import pandas as pd

    from bioperceiver.data import write_manifest

    rng = np.random.default_rng(5)
    n = 30
    cohorts = {"nki70": "survset_nki70", "NSBCD": "survset_NSBCD"}
    frames, folds = [], {}
    for c, source in cohorts.items():
        ids = [f"{c}{i}" for i in range(2 * n)]
        frames.append(
            pd.DataFrame(
                {
                    "sample_id": ids,
                    "patient_id": [f"p{x}" for x in ids],
                    "meta_source": source,
                    "label_survival_time": rng.exponential(size=2 * n),
                    "label_survival_event": (rng.random(2 * n) < 0.7).astype(int),
                }
            )
        )
        folds[c] = [{"test_ids": ids[:n]}, {"test_ids": ids[n:]}]
    table = pd.concat(frames, ignore_index=True)
    manifest = write_manifest(table, tmp_path / "cohort" / "manifest.parquet")
    risks = {}
    runs = []
    for r in range(2):
        folder = tmp_path / f"run{r}"
        for c in cohorts:
            for k in range(2):
                ids = folds[c][k]["test_ids"]
                t = table.set_index("sample_id").loc[ids, "label_survival_time"].to_numpy()
                risk = -(1.0 if r == 0 else 0.3) * t + rng.normal(size=n) if c == "nki70" else -t
                risks[r, c, k] = risk
                settings = {"cohort": c, "fold": k, "model": "bp", "seed": 0, "folds": 2}
                path = folder / "cache" / c / f"fold{k}" / "bp.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"risk_test": list(map(float, risk)), "settings": settings}))
        validation = {"nki70": [[1.0, 0.7], [1.0, 0.5]], "NSBCD": [[0.6, 0.6], [0.6, 0.6]]}  # per run, per fold
        res = {
            "seed": 0,
            "folds": 2,
            "manifest": str(manifest),
            "bp": {"pretrained_dir": None},
            "cohorts": {
                c: {
                    "role": "development",
                    "folds": folds[c],
                    "models": {"bp": {"test": {"mean": 0.6}, "validation": {"per_fold": validation[c][r]}}},
                }
                for c in cohorts
            },
        }
        runs.append({"folder": str(folder), "res": res, "replicates": {}})
    vs = ss.versus(runs, ["wide", "plain"], "bp", n_boot=200)
    v = vs["bp (wide) - bp (plain)"]
    sub = table.set_index("sample_id")
    ref = cv.paired_difference(
        [
            {
                "time": sub.loc[folds["nki70"][k]["test_ids"], "label_survival_time"].to_numpy(),
                "event": sub.loc[folds["nki70"][k]["test_ids"], "label_survival_event"].to_numpy(),
                "patients": sub.loc[folds["nki70"][k]["test_ids"], "patient_id"].to_numpy(),
                "risks": np.array([risks[0, "nki70", k], risks[1, "nki70", k]]),
            }
            for k in range(2)
        ],
        200,
        0,
    )
    assert v["per_cohort"]["nki70"]["difference"] == pytest.approx(ref["difference"]) and ref["difference"] > 0
    assert v["same"] == ["NSBCD"] and v["pooled"]["development"]["cohorts"] == ["nki70"]
    assert v["pooled"]["development"]["difference"] == pytest.approx(ref["difference"])
    # the validation parts: (1.0 - 1.0 + 0.7 - 0.5) / 2 on nki70, one fold where both are 1.0; NSBCD left out
    assert v["validation"]["per_cohort"] == {
        "nki70": {"difference": pytest.approx(0.1), "folds": 2, "both_saturated": 1}
    }
    assert v["validation"]["pooled"]["development"]["difference"] == pytest.approx(0.1)
    lines = ss.versus_lines(vs)
    assert any(line.startswith("| pooled, development (1) |") for line in lines) and "NSBCD" in lines[-2]
    assert any("Validation parts, pooled development (1 cohorts" in line and "+0.100" in line for line in lines)
    assert any("both at 1.0 in 1 of 2 folds" in line for line in lines)


def test_fusion_averages_fold_ranks_of_the_ensemble_and_the_best_baseline(tmp_path):
    """--fuse_with: in each test fold the ensemble's risks and the best baseline's become ranks in (0, 1] and are
    averaged (a C-index is unchanged by ranking, ties included); the fused arm is scored against the best baseline
    and the fused control with survival_cv's paired bootstrap; naming the best baseline's model gives the same."""
    from scipy.stats import rankdata

    from bioperceiver.evaluation import concordance_index

    runs, risks, time, event, n = _ensemble_runs(tmp_path)
    tied = np.array([0.3, 0.3, 1.0, -2.0, 0.3])
    assert ss.fold_ranks(tied).tolist() == [0.6, 0.6, 1.0, 0.2, 0.6]
    t, e = np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.array([1, 1, 0, 1, 1])
    assert concordance_index(t, ss.fold_ranks(tied), e) == pytest.approx(concordance_index(t, tied, e))
    ens = ss.ensemble(runs, "emb", "rnd", n_boot=200, fuse=ss.BEST)
    fused, fused_rnd = (
        "emb (ensemble) + best baseline, ranks averaged",
        "rnd (ensemble) + best baseline, ranks averaged",
    )
    fold_data = []
    for k in range(2):
        sl = slice(k * n, (k + 1) * n)
        mean = {m: (risks[0, m, k] + risks[1, m, k]) / 2 for m in ("emb", "rnd", "cox_clinical_pcs")}
        base = rankdata(mean["cox_clinical_pcs"]) / n
        fold_data.append(
            {
                "time": time[sl],
                "event": event[sl],
                "patients": np.array([f"p{i}" for i in range(k * n, (k + 1) * n)]),
                "risks": np.array([(rankdata(mean["emb"]) / n + base) / 2, mean["cox_clinical_pcs"]]),
                "control": (rankdata(mean["rnd"]) / n + base) / 2,
            }
        )
    expect = np.mean([concordance_index(f["time"], f["risks"][0], f["event"]) for f in fold_data])
    assert ens["test_c_index"]["nki70"][fused] == pytest.approx(expect)
    assert fused_rnd in ens["test_c_index"]["nki70"]
    ref = cv.paired_difference(fold_data, 200, 0)
    got = ens["pooled"]["development"][f"{fused} - best baseline"]
    assert got["difference"] == pytest.approx(ref["difference"])
    assert got["ci95"] == pytest.approx(
        [np.percentile(ref["_replicates"], 2.5), np.percentile(ref["_replicates"], 97.5)]
    )
    ref = cv.paired_difference([{**f, "risks": np.array([f["risks"][0], f["control"]])} for f in fold_data], 200, 0)
    assert ens["pooled"]["development"][f"{fused} - {fused_rnd}"]["difference"] == pytest.approx(ref["difference"])
    assert "emb (ensemble) - best baseline" in ens["pooled"]["development"]  # the unfused comparisons stay
    assert any(fused in line for line in ss.ensemble_lines(ens, 2))
    named = ss.ensemble(runs, "emb", "rnd", n_boot=200, fuse="cox_clinical_pcs")  # the cohort's pick, by name
    assert named["test_c_index"]["nki70"]["emb (ensemble) + cox_clinical_pcs, ranks averaged"] == pytest.approx(expect)
    absent = ss.ensemble(runs, "emb", "rnd", n_boot=50, fuse="cox_clinical")  # a baseline the cohort lacks
    assert absent["test_c_index"] == {}
    with pytest.raises(ValueError, match="--fuse_with emb: give best_baseline or a classical baseline"):
        ss.ensemble(runs, "emb", "rnd", n_boot=50, fuse="emb")
    with pytest.raises(SystemExit):
        ss.parse_args(["--runs", "a", "b", "--output_dir", str(tmp_path), "--fuse_with", ss.BEST])  # no --ensemble


@pytest.mark.parametrize("arm", ["rsf", "bp"])
def test_versus_reads_a_baseline_another_init_seed_s_run_cached_but_never_a_neural_arm(tmp_path, arm):
    """Runs that differ in --init_seed read the classical baselines back from each other (they do not depend on
    it), so --versus on a baseline accepts a cached result without the run's init seed; a BioPerceiver arm's
    cached result from another init seed is refused, naming it."""
    import pandas as pd

    from bioperceiver.data import write_manifest

    rng = np.random.default_rng(2)
    ids = [f"s{i}" for i in range(40)]
    table = pd.DataFrame(
        {
            "sample_id": ids,
            "patient_id": ids,
            "meta_source": "survset_nki70",
            "label_survival_time": rng.exponential(size=40),
            "label_survival_event": (rng.random(40) < 0.7).astype(int),
        }
    )
    manifest = write_manifest(table, tmp_path / "cohort" / "manifest.parquet")
    folds = [{"test_ids": ids[:20]}, {"test_ids": ids[20:]}]
    runs = []
    for r, init_seed in enumerate((0, 1)):
        cached = {  # written by init seed 0
            (arm, k): (rng.normal(size=20), {"cohort": "nki70", "fold": k, "model": arm, "seed": 0, "folds": 2})
            for k in range(2)
        }
        models_res = {arm: {"test": {"mean": 0.6}, "validation": {"per_fold": [0.6, 0.6]}}}
        runs.append(_cached_run(tmp_path / f"run{r}", manifest, folds, init_seed, models_res, cached))
    if arm == "bp":
        with pytest.raises(ValueError, match="init_seed differ"):
            ss.versus(runs, ["a", "b"], arm, n_boot=50)
        return
    vs = ss.versus(runs, ["a", "b"], arm, n_boot=50)
    v = vs[f"{arm} (a) - {arm} (b)"]
    assert v["pooled"]["development"]["cohorts"] == ["nki70"]
    # each run's own cached risks were read: the difference is the paired bootstrap's on them
    risks = [
        [
            json.loads((Path(r["folder"]) / "cache" / "nki70" / f"fold{k}" / f"{arm}.json").read_text())["risk_test"]
            for k in range(2)
        ]
        for r in runs
    ]
    sub = table.set_index("sample_id")
    ref = cv.paired_difference(
        [
            {
                "time": sub.loc[f["test_ids"], "label_survival_time"].to_numpy(),
                "event": sub.loc[f["test_ids"], "label_survival_event"].to_numpy(),
                "patients": sub.loc[f["test_ids"], "patient_id"].to_numpy(),
                "risks": np.array([risks[0][k], risks[1][k]]),
            }
            for k, f in enumerate(folds)
        ],
        50,
        0,
    )
    assert v["per_cohort"]["nki70"]["difference"] == pytest.approx(ref["difference"])
    # a result cached under the other selection rule is never read as this run's
    runs[1]["res"]["selection"] = {"rule": "inner_cv", "inner_folds": 5}
    with pytest.raises(ValueError, match="selection differ"):
        ss.versus(runs, ["a", "b"], arm, n_boot=50)


def test_against_pairs_each_run_with_its_partner_and_equals_the_direct_difference(tmp_path):
    """A run (arm with setting A against a control) minus its partner (arm with setting B against the same control,
    the same patients and draws) is the arm with A minus the arm with B: per run, per cohort and pooled."""
    n_boot, pairs = 300, []
    direct = []
    for i in range(3):
        rng = np.random.default_rng(7 + i)
        dirs = {}
        for name, role in (("a", "development"), ("b", "development"), ("x", "external")):
            folds = _fold_data(rng, 0.3 + 0.2 * i)
            extra = rng.normal(size=(len(folds), 60))
            arm_a = [f["risks"][0] for f in folds]
            arm_b = [f["risks"][0] * 0.5 + e for f, e in zip(folds, extra)]
            control = [f["risks"][1] for f in folds]

            def with_risks(r0, r1, folds=folds):
                return [{**f, "risks": np.array([x, y])} for f, x, y in zip(folds, r0, r1)]

            dirs[name] = (
                role,
                cv.paired_difference(with_risks(arm_a, control), n_boot, 0),
                cv.paired_difference(with_risks(arm_b, control), n_boot, 0),
                cv.paired_difference(with_risks(arm_a, arm_b), n_boot, 0),
            )
        runs = []
        for j, tag in ((1, "A"), (2, "B")):
            cohorts = {c: (v[0], {"arm - ctrl": {**v[j], "pair": ["arm", "ctrl"]}}) for c, v in dirs.items()}
            runs.append(_write_run(tmp_path / f"{tag}{i}", cohorts))
            res = json.loads((runs[-1] / "survival_cv.json").read_text())
            for c in res["cohorts"]:  # the control's test C-indices: one model, so the same in run and partner
                res["cohorts"][c]["models"] = {"ctrl": {"test": {"per_fold": [0.6 + 0.01 * i, 0.7]}}}
            (runs[-1] / "survival_cv.json").write_text(json.dumps(res))
        pairs.append(runs)
        direct.append({c: v[3] for c, v in dirs.items()})
    argv = ["--runs", *(str(p[0]) for p in pairs), "--against", *(str(p[1]) for p in pairs), "--against_label", "B"]
    out = ss.main([*argv, "--labels", "s0", "s1", "s2", "--output_dir", str(tmp_path / "o"), "--n_bootstrap", "2000"])
    dev = out["roles"]["development"]["arm - ctrl"]
    per_run = []
    for i, lab in enumerate(("s0", "s1", "s2")):
        want = np.mean([direct[i][c]["difference"] for c in ("a", "b")])
        reps = np.stack([direct[i][c]["_replicates"] for c in ("a", "b")])
        pooled = reps[:, ~np.isnan(reps).any(axis=0)].mean(axis=0)
        assert dev["runs"][lab]["difference"] == pytest.approx(want)
        assert dev["runs"][lab]["ci95"] == pytest.approx(np.percentile(pooled, [2.5, 97.5]))
        per_run.append(want)
    assert dev["mean"] == pytest.approx(np.mean(per_run))
    assert dev["sd_between_runs"] == pytest.approx(np.std(per_run, ddof=1))
    assert dev["per_cohort_mean"]["a"] == pytest.approx(np.mean([d["a"]["difference"] for d in direct]))
    assert out["roles"]["external"]["arm - ctrl"]["cohorts"] == ["x"]
    assert out["against"]["label"] == "B" and out["against"]["runs"]["s1"] == str(pairs[1][1])
    md = (tmp_path / "o" / "seed_spread.md").read_text()
    assert "each run's minus its partner's (B" in md
    assert dev["control_differs"] == [] and "control differs" not in md
    assert dev["control_unchecked"] == [] and "control unchecked" not in md
    # one run against its partner is one paired difference (no spread between pairs)
    one = ss.main(["--runs", str(pairs[0][0]), "--against", str(pairs[0][1]), "--output_dir", str(tmp_path / "o1")])
    d1 = one["roles"]["development"]["arm - ctrl"]
    assert d1["mean"] == pytest.approx(per_run[0]) and d1["sd_between_runs"] == 0.0
    # a partner whose control is another model (here: other test C-indices) is flagged, not silently subtracted
    res = json.loads((pairs[2][1] / "survival_cv.json").read_text())
    res["cohorts"]["b"]["models"] = {"ctrl": {"test": {"per_fold": [0.5, 0.6, 0.7]}}}
    # ... and one that recorded no scores for the control (a name that is not one of its models) cannot be checked
    res["cohorts"]["a"]["models"] = {}
    (pairs[2][1] / "survival_cv.json").write_text(json.dumps(res))
    out = ss.main([*argv, "--labels", "s0", "s1", "s2", "--output_dir", str(tmp_path / "o3")])
    assert out["roles"]["development"]["arm - ctrl"]["control_differs"] == ["s2: b"]
    assert out["roles"]["development"]["arm - ctrl"]["control_unchecked"] == ["s2: a"]
    md3 = (tmp_path / "o3" / "seed_spread.md").read_text()
    assert "arm - ctrl (control differs in 1 run-cohorts) (control unchecked in 1 run-cohorts)" in md3
    # the run's side counts as well, and scores that are all null (NaN) are no record either
    for c, models in (("a", {"ctrl": {"test": {"per_fold": [None, None]}}}), ("b", {})):
        res0 = json.loads((pairs[0][0] / "survival_cv.json").read_text())
        res0["cohorts"][c]["models"] = models
        (pairs[0][0] / "survival_cv.json").write_text(json.dumps(res0))
    out = ss.main([*argv, "--labels", "s0", "s1", "s2", "--output_dir", str(tmp_path / "o3b")])
    assert out["roles"]["development"]["arm - ctrl"]["control_unchecked"] == ["s0: a", "s0: b", "s2: a"]
    # the best baseline is identified by the model validation chose; a run that did not record it is unchecked
    run = {"res": {"cohorts": {"a": {"models": {"cox": {"test": {"per_fold": [0.6]}}}}}}}
    assert not ss._recorded(ss.control_scores(run, "a", "best baseline"))
    run["res"]["cohorts"]["a"]["best_baseline_by_validation"] = "cox"
    assert ss.control_scores(run, "a", "best baseline") == ("cox", (0.6,))
    assert ss._recorded(ss.control_scores(run, "a", "best baseline"))
    # a partner with another init seed (or selection rule) is not the same seeds: refused
    res["init_seed"] = 1
    (pairs[2][1] / "survival_cv.json").write_text(json.dumps(res))
    with pytest.raises(ValueError, match=r"init_seed=None, its --against partner .* 1"):
        ss.main([*argv, "--output_dir", str(tmp_path / "o4")])
    # a partner that does not pair (another bootstrap seed: other draws) is refused; so is a missing partner
    odd = _runs(tmp_path / "odd", [0.5], seed=1)[0]
    with pytest.raises(ValueError, match="seed"):
        argv = ["--runs", str(pairs[0][0]), str(pairs[1][0]), "--against", str(odd), str(pairs[1][1])]
        ss.main([*argv, "--output_dir", str(tmp_path / "o2")])
    with pytest.raises(SystemExit):
        ss.parse_args(["--runs", "r0", "r1", "--against", "p0", "--output_dir", "o"])


def test_a_network_chosen_by_inner_cv_is_read_from_its_refit_record(tmp_path):
    """survival_cv.py --bp_selection inner_cv: one record per fold (the refit, its rate chosen inside it) under
    ``<arm>_innercv.json``, read instead of the per-rate files a --bp_lrs grid writes; a baseline is read as before."""
    folder = tmp_path / "run"
    for k in range(2):
        base = {"cohort": "c", "fold": k, "seed": 0, "folds": 2}
        cv.store(
            folder / "cache" / "c" / f"fold{k}" / "bp_pretrained_innercv.json",
            {**base, "model": "bp_pretrained"},
            {"risk_test": [k, 1.0]},
        )
        cv.store(folder / "cache" / "c" / f"fold{k}" / "rsf.json", {**base, "model": "rsf"}, {"risk_test": [5.0, k]})
    models = {"bp_pretrained": {"lr": [3e-3, 1e-3]}, "rsf": {}}
    res = {"seed": 0, "init_seed": 0, "folds": 2, "cohorts": {"c": {"models": models}}}
    run = {"folder": str(folder), "res": {**res, "bp_selection": {"rule": "inner_cv", "inner_folds": 3}}}
    for k in range(2):
        np.testing.assert_array_equal(ss.cached_risks(run, "c", "bp_pretrained", k), [k, 1.0])
        np.testing.assert_array_equal(ss.cached_risks(run, "c", "rsf", k, neural=False), [5.0, k])
    with pytest.raises(FileNotFoundError, match=r"bp_pretrained_lr0\.003\.json is missing"):  # validation rule
        ss.cached_risks({"folder": str(folder), "res": res}, "c", "bp_pretrained", 0)
