"""benchmarks/survival_label_efficiency.py: survival_cv runs at several --train_fraction values side by side."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from script_loader import load_script

cv = load_script("benchmarks/survival_cv.py")
le = load_script("benchmarks/survival_label_efficiency.py")


def _fold_data(rng, shift: float):
    """Two folds of 50 test patients: model 0's risk mixes in -time by ``shift``, model 1's is noise."""
    out = []
    for _ in range(2):
        t = rng.exponential(size=50)
        e = (rng.random(50) < 0.7).astype(int)
        risks = np.array([shift * -t + rng.normal(size=50), rng.normal(size=50)])
        out.append({"time": t, "event": e, "patients": np.arange(50), "risks": risks})
    return out


def _write_run(
    folder: Path,
    fraction: float | None,
    shift: float,
    c_index: float,
    *,
    seed: int = 0,
    rng_seed=0,
    shrunk_validation: bool | None = None,
):
    """A survival_cv.py output folder (JSON + replicates): development cohorts a, b and external x, each with
    'bp_pretrained - bp_random' and 'bp_pretrained - <best baseline>'."""
    rng = np.random.default_rng(rng_seed)
    n_val = 3 if shrunk_validation else 6
    folds = [
        {"n": {"train": n, "validation": n_val}, "events": {"train": n // 3}, "test_ids": [f"s{k}"]}
        for k, n in enumerate((20, 24))
    ]
    res = {"folds": 2, "seed": seed, "val_fraction": 0.2, "init_seed": 0, "cohorts": {}}
    if fraction is not None:
        res["train_fraction"] = fraction
    if shrunk_validation is not None:
        res["subsample_validation"] = shrunk_validation
    for name, role, base in (
        ("a", "development", "rsf"),
        ("b", "development", "cox_clinical"),
        ("x", "external", "rsf"),
    ):
        diffs = {}
        for key, pair in (("bp_pretrained - bp_random", None), (f"bp_pretrained - {base}", "best baseline")):
            d = cv.paired_difference(_fold_data(rng, shift), n_boot=200, seed=seed)
            diffs[key] = {**d, "pair": ["bp_pretrained", pair or "bp_random"]}
        models = {"bp_pretrained": {"test": {"mean": c_index}}, "bp_random": {"test": {"mean": 0.6}}}
        if name == "b":
            models["cox_clinical"] = {"test": {"mean": 0.7}}
        res["cohorts"][name] = {"role": role, "folds": folds, "models": models, "paired_differences": diffs}
    res["pooled"] = {role: cv.pooled_differences(res["cohorts"], role) for role in ("development", "external")}
    folder.mkdir(parents=True)
    cv.write_replicates(res, folder / "survival_cv_replicates.npz")
    (folder / "survival_cv.json").write_text(json.dumps(cv._without_replicates(res), default=float))
    return folder


def _pooled_replicates(folder: Path, key: str) -> np.ndarray:
    with np.load(folder / "survival_cv_replicates.npz") as z:
        reps = dict(zip(z["names"], z["replicates"]))
    best = {"a": "rsf", "b": "cox_clinical"}
    name = {c: key if key.endswith("bp_random") else f"bp_pretrained - {best[c]}" for c in "ab"}
    return np.mean([reps[f"{c}\t{name[c]}"] for c in "ab"], axis=0)


def test_runs_grouped_by_fraction_averaged_and_the_trend_paired(tmp_path):
    full = [
        _write_run(tmp_path / "f0", None, 0.2, 0.62, rng_seed=1),
        _write_run(tmp_path / "f1", 1.0, 0.3, 0.64, rng_seed=2),
    ]
    quarter = [
        _write_run(tmp_path / "q0", 0.25, 1.0, 0.66, rng_seed=3),
        _write_run(tmp_path / "q1", 0.25, 0.8, 0.68, rng_seed=4),
    ]
    out = tmp_path / "out"
    summary = le.main(["--runs", *map(str, full + quarter), "--output_dir", str(out)])
    q, f = summary["fractions"]
    assert (q["train_fraction"], f["train_fraction"]) == (0.25, 1.0) and summary["largest_fraction"] == 1.0
    assert len(q["runs"]) == 2 and len(f["runs"]) == 2  # a run without the key used every training patient
    assert q["test_c_index"]["bp_pretrained"] == {"mean": pytest.approx(0.67), "n_cohorts": 2}  # not external x
    assert q["test_c_index"]["cox_clinical"]["n_cohorts"] == 1
    assert q["train_patients_per_fold"] == {"median": 22.0, "min": 22.0, "max": 22.0}
    for key in ("bp_pretrained - bp_random", "bp_pretrained - best baseline"):
        recorded = [json.loads((d / "survival_cv.json").read_text())["pooled"]["development"][key] for d in quarter]
        d = q["pooled"][key]
        assert d["per_run"] == pytest.approx([r["difference"] for r in recorded])
        assert d["mean"] == pytest.approx(np.mean([r["difference"] for r in recorded]))
        reps_q = np.mean([_pooled_replicates(d_, key) for d_ in quarter], axis=0)
        reps_f = np.mean([_pooled_replicates(d_, key) for d_ in full], axis=0)
        assert d["ci95"] == pytest.approx(list(np.nanpercentile(reps_q, [2.5, 97.5])))
        trend = q["minus_largest_fraction"][key]
        assert trend["difference"] == pytest.approx(d["mean"] - f["pooled"][key]["mean"])
        delta = reps_q - reps_f
        assert trend["ci95"] == pytest.approx(list(np.nanpercentile(delta, [2.5, 97.5])))
        assert trend["difference"] > 0  # the quarter runs mix in more signal
        # the same seeds at both fractions: each run's own trend, and an interval that also redraws the runs
        assert trend["per_run"] == pytest.approx(np.subtract(d["per_run"], f["pooled"][key]["per_run"]).tolist())
        lo, hi = trend["ci95_runs_and_patients"]
        assert lo < trend["difference"] < hi and "ci95_runs_and_patients" in d
    assert f["minus_largest_fraction"] == {}
    md = (out / "label_efficiency.md").read_text()
    assert "| 0.25 | 2 | 22 (22–22) |" in md and "| bp_pretrained (2 cohorts) |" in md
    assert "0.25 − 1" in md and (out / "label_efficiency.png").stat().st_size > 0
    saved = json.loads((out / "label_efficiency.json").read_text())
    assert "_replicates" not in json.dumps(saved)


def test_runs_that_cannot_be_compared_are_refused(tmp_path):
    a = _write_run(tmp_path / "a", 0.5, 0.5, 0.6)
    b = _write_run(tmp_path / "b", 0.25, 0.5, 0.6, seed=1)
    with pytest.raises(ValueError, match="seed=1"):
        le.main(["--runs", str(a), str(b), "--output_dir", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="is missing"):
        le.main(["--runs", str(a), str(tmp_path / "missing"), "--output_dir", str(tmp_path / "o")])


def test_runs_with_shrunk_validation_pair_with_full_runs_but_not_with_unshrunk_ones(tmp_path):
    """--subsample_validation runs below 1 combine with full-data runs (where the flag is a no-op), the report says
    how large validation was; a mix of shrunk and unshrunk runs below 1 is refused."""
    full = _write_run(tmp_path / "f", 1.0, 0.3, 0.64, rng_seed=2, shrunk_validation=False)
    quarter = _write_run(tmp_path / "q", 0.25, 1.0, 0.66, rng_seed=3, shrunk_validation=True)
    summary = le.main(["--runs", str(full), str(quarter), "--output_dir", str(tmp_path / "o")])
    assert summary["subsample_validation"] is True
    q, f = summary["fractions"]
    assert q["validation_patients_per_fold"]["median"] == 3 and f["validation_patients_per_fold"]["median"] == 6
    md = (tmp_path / "o" / "label_efficiency.md").read_text()
    assert "median validation patients per fold 3 at 0.25, 6 at 1." in md
    half = _write_run(tmp_path / "h", 0.5, 1.0, 0.66, rng_seed=4)  # made before the flag: validation untouched
    with pytest.raises(ValueError, match="subsample_validation"):
        le.main(["--runs", str(full), str(quarter), str(half), "--output_dir", str(tmp_path / "o2")])
    plain = le.main(["--runs", str(full), str(half), "--output_dir", str(tmp_path / "o3")])
    assert plain["subsample_validation"] is False
    assert "subsample_validation" not in (tmp_path / "o3" / "label_efficiency.md").read_text()


def test_learning_rate_ties_and_patient_counts_are_reported(tmp_path):
    """The lr picks that were validation ties are counted per arm (NaN-only folds count as ties; folds without a grid
    are not counted), and patients are read from the fold record when it has them (rows otherwise)."""
    run = _write_run(tmp_path / "q", 0.25, 1.0, 0.66, rng_seed=3, shrunk_validation=True)
    res = json.loads((run / "survival_cv.json").read_text())
    for c in res["cohorts"].values():
        for fo in c["folds"]:
            fo["patients"] = {"train": fo["n"]["train"] // 2, "validation": 2}
            fo["validation_pairs"] = 5
        c["models"]["bp_pretrained"]["selected"] = [
            {"lr": 3e-4, "validation": {"0.0003": 1.0, "0.001": 1.0, "0.003": 0.5}},  # tie
            {"lr": 1e-3, "validation": {"0.0003": 0.5, "0.001": 0.75, "0.003": 0.5}},  # a real pick
        ]
        c["models"]["bp_random"]["selected"] = [
            {"lr": 3e-4, "validation": {"0.0003": float("nan"), "0.001": float("nan")}},  # nothing ranked: a tie
            {"lr": 3e-4, "validation": {"0.0003": 0.6}},  # one rate: no choice, not counted
        ]
    (run / "survival_cv.json").write_text(json.dumps(res))
    full = _write_run(tmp_path / "f", 1.0, 0.3, 0.64, rng_seed=2)
    summary = le.main(["--runs", str(run), str(full), "--output_dir", str(tmp_path / "o")])
    q = summary["fractions"][0]
    assert q["lr_ties"] == {"bp_pretrained": {"tied": 2, "folds": 4}, "bp_random": {"tied": 2, "folds": 2}}
    assert q["train_patients_per_fold"]["median"] == 11 and q["validation_patients_per_fold"]["median"] == 2
    assert q["validation_pairs_per_fold"] == {"median": 5.0}
    md = (tmp_path / "o" / "label_efficiency.md").read_text()
    assert "bp_pretrained 2 of 4 folds at 0.25" in md and "median ranked validation pairs per fold: 5 at 0.25" in md
