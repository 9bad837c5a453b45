"""benchmarks/label_efficiency.py: the labelled pool never takes test patients from pretraining, the schedule
bounds, and the seed-mean bootstrap's fast macro AUROC equals the library's."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from script_loader import load_script

from bioperceiver.data.manifest import write_manifest
from bioperceiver.data.splits import split_of
from bioperceiver.evaluation import compute_task_metrics

le = load_script("benchmarks/label_efficiency.py")


def _manifest(tmp_path: Path, n_patients: int = 120) -> Path:
    rows = []
    for i in range(n_patients):
        pid = f"padchest:p{i}"
        for j in range(1 + i % 2):
            rows.append(
                {
                    "sample_id": f"padchest:s{i}_{j}",
                    "patient_id": pid,
                    "split": split_of(pid),
                    "text_report": f"informe {i % 7}",
                    "tabular_study": json.dumps({"age_years": 40 + i % 30}),
                    "label_findings": ["normal"] if i % 3 else ["cardiomegaly"],
                    "meta_source": "padchest",
                }
            )
    meta = {
        "modalities": {"text_report": "text", "tabular_study": "tabular"},
        "labels": {"label_findings": "multilabel"},
    }
    return write_manifest(pd.DataFrame(rows), tmp_path / "cohort" / "manifest.parquet", metadata=meta)


def test_labelled_pool_keeps_splits_and_sizes(tmp_path):
    path = _manifest(tmp_path)
    args = argparse.Namespace(
        manifest=str(path), work_dir=str(tmp_path / "work"), pool_patients=30, val_patients=5, test_patients=8, seed=0
    )
    out, info = le.labelled_manifest(args)
    table = pd.read_parquet(out)
    assert info["test_patients_in_pretraining"] == 0 and info["validation_patients_in_pretraining"] == 0
    assert info["patients"] == {"train": 30, "validation": 5, "test": 8}
    assert (table["split"] == table["patient_id"].map(split_of)).all()  # the pretraining's split, unchanged
    assert table.groupby("patient_id")["split"].nunique().max() == 1
    again, _ = le.labelled_manifest(args)  # same seed: the same patients
    assert pd.read_parquet(again)["sample_id"].tolist() == table["sample_id"].tolist()


def test_schedule_bounds():
    args = argparse.Namespace(batch_size=32, epochs=15, min_steps=60, max_steps=300, evals_per_run=6)
    assert le.schedule(28, args)[0] == 60  # 15 passes of 1 step -> at least 60
    assert le.schedule(320, args)[0] == 150
    steps, flags = le.schedule(3248, args)
    assert steps == 300 and flags[flags.index("--eval_steps") + 1] == "50"


@pytest.mark.parametrize("drop_label", [False, True])
def test_seed_mean_bootstrap_matches_library_auroc(drop_label):
    rng = np.random.default_rng(0)
    n = 200
    y = (rng.random((n, 3)) < 0.3).astype(int)
    if drop_label:
        y[:, 2] = 0  # a label with no positive: the library's macro over defined labels
    recs = [{"patient_id": f"p{i // 2}"} for i in range(n)]
    data = SimpleNamespace(data={"test": (recs, y)})
    probs = {
        "pretrained": [np.clip(y + rng.normal(0, s, y.shape), 0, 1) for s in (0.5, 0.7)],
        "random": [rng.random(y.shape), rng.random(y.shape)],
    }
    out = le.bootstrap_means(data, probs, n_boot=20, seed=0)
    for name, ps in probs.items():
        lib = np.mean([compute_task_metrics("multilabel", p, y, from_logits=False)["auroc"] for p in ps])
        assert out[name]["auroc"] == pytest.approx(lib, abs=1e-12)
        assert out[name]["ci_low"] <= out[name]["ci_high"]
    diff = out["pretrained_minus_random"]
    assert diff["difference"] == pytest.approx(out["pretrained"]["auroc"] - out["random"]["auroc"])
    assert "pretrained_minus_tfidf_lr" not in out


def test_learning_rate_is_chosen_on_validation_never_on_test():
    """--lrs: every candidate runs; the kept run is the best on validation, whatever its test score."""
    tried = [
        (3e-4, {"validation": 0.70, "test": 0.90}),
        (1e-3, {"validation": 0.80, "test": 0.60}),
        (3e-3, {"validation": 0.80, "test": 0.99}),  # a tie on validation: the grid's first wins
    ]
    lr, run = le.choose_on_validation(tried)
    assert lr == 1e-3 and run["test"] == 0.60
    assert le.learning_rates(SimpleNamespace(lrs=None, lr=3e-4)) == [3e-4]
    assert le.learning_rates(SimpleNamespace(lrs=[1e-4, 1e-3], lr=3e-4)) == [1e-4, 1e-3]


def test_markdown_report_has_every_arm_fraction_and_difference():
    arm = {"auroc": 0.7, "ci_low": 0.6, "ci_high": 0.8, "sd_over_seeds": 0.05}
    summary = {
        str(f): {
            "pretrained": arm,
            "random": {**arm, "auroc": 0.65},
            "patients_mean": 20 * f * 100,
            "pretrained_minus_random": {"difference": 0.05, "ci_low": 0.01, "ci_high": 0.09},
        }
        for f in (0.01, 1.0)
    }
    res = {"seeds": [0, 1], "command": "python benchmarks/label_efficiency.py", "fractions": [0.01, 1.0]}
    text = le.report_markdown({**res, "summary": summary})
    assert "| labelled | pretrained | random |" in text
    assert "| 1% (20 pts) | 0.700 [0.600, 0.800] SD 0.050 | 0.650 [0.600, 0.800] SD 0.050 |" in text
    assert "| 100% | pretrained − random | +0.050 | [+0.010, +0.090] |" in text
