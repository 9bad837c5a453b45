"""benchmarks/survival_label_efficiency.py: survival_cv runs at several --train_fraction values side by side."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "survival_label_efficiency", ROOT / "benchmarks" / "survival_label_efficiency.py"
)
le = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(le)


def _run(folder: Path, fraction: float | None, c_index: dict, *, seed: int = 0, pooled=None) -> Path:
    """A survival_cv.json with two development cohorts and one external one; ``c_index``: model -> (a, b)."""

    def cohort(role, i, n):
        return {
            "role": role,
            "models": {m: {"test": {"mean": v[i]}} for m, v in c_index.items()} | {"rsf": {"skipped": "x"}},
            "folds": [
                {"n": {"train": n}, "events": {"train": n // 4}},
                {"n": {"train": n + 2}, "events": {"train": 3}},
            ],
        }

    res = {
        "folds": 2,
        "seed": seed,
        "val_fraction": 0.2,
        "init_seed": 0,
        "cohorts": {
            "a": cohort("development", 0, 20),
            "b": cohort("development", 1, 40),
            "x": cohort("external", 0, 8),
        },
        "pooled": {"development": pooled or {}, "external": {}},
    }
    if fraction is not None:
        res["train_fraction"] = fraction
    folder.mkdir(parents=True)
    (folder / "survival_cv.json").write_text(json.dumps(res))
    return folder


def test_runs_are_ordered_by_fraction_averaged_over_cohorts_and_reported(tmp_path):
    diff = {
        "bp_pretrained - bp_random": {"difference": 0.02, "ci95": [-0.01, 0.05], "above_zero": 1, "cohorts": ["a", "b"]}
    }
    full = _run(tmp_path / "full", None, {"bp_random": (0.6, 0.7), "cox_clinical": (0.65, 0.75)}, pooled=diff)
    quarter = _run(tmp_path / "q", 0.25, {"bp_random": (0.5, 0.6), "bp_pretrained": (0.55, 0.6)})
    out = tmp_path / "out"
    summary = le.main(["--runs", str(full), str(quarter), "--output_dir", str(out)])
    assert [r["train_fraction"] for r in summary["runs"]] == [0.25, 1.0]  # a run without the key used every patient
    q, f = summary["runs"]
    assert q["test_c_index"]["bp_random"]["mean"] == pytest.approx(0.55)  # cohorts a and b, not the external x
    assert "rsf" not in q["test_c_index"] and q["n_cohorts"] == 2
    assert q["train_patients_per_fold"] == {"median": 31.0, "min": 21.0, "max": 41.0}  # per-cohort means 21, 41
    assert f["pooled"] == diff and q["pooled"] == {}
    md = (out / "label_efficiency.md").read_text()
    assert (
        "| 0.25 | 31 (21–41) |" in md
        and "| bp_random (2 cohorts) |" in md
        and "| bp_pretrained - bp_random | – | +0.020 [-0.010, +0.050], 1/2 above 0 |" in md
    )
    assert (out / "label_efficiency.png").stat().st_size > 0
    assert json.loads((out / "label_efficiency.json").read_text())["runs"][0]["train_fraction"] == 0.25


def test_runs_that_cannot_be_compared_are_refused(tmp_path):
    a = _run(tmp_path / "a", 0.5, {"bp_random": (0.6, 0.7)})
    b = _run(tmp_path / "b", 0.25, {"bp_random": (0.6, 0.7)}, seed=1)
    c = _run(tmp_path / "c", 0.5, {"bp_random": (0.6, 0.7)})
    with pytest.raises(ValueError, match="differ in seed"):
        le.main(["--runs", str(a), str(b), "--output_dir", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="same --train_fraction"):
        le.main(["--runs", str(a), str(c), "--output_dir", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match=r"run benchmarks/survival_cv\.py"):
        le.main(["--runs", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "o")])
