"""benchmarks/kept_checkpoints.py: the selected learning rate's run is found per cohort, fold and arm; ties, kept
epochs and changes against another folder are counted from the runs' own records."""

from __future__ import annotations

import json

import pytest
from script_loader import load_script


def _run_dir(root, name, kept_by_tag: dict, lrs: dict, suffix: str):
    """A survival_cv.py output folder: selected lrs per arm (one cohort) and every grid run's best_checkpoint."""
    d = root / name
    models = {arm: {"lr": lr} for arm, lr in lrs.items()}
    d.mkdir()
    (d / "survival_cv.json").write_text(json.dumps({"cohorts": {"coh": {"models": models}}}))
    for tag, kept in kept_by_tag.items():
        (d / "runs" / (tag + suffix)).mkdir(parents=True)
        (d / "runs" / (tag + suffix) / "all_results.json").write_text(json.dumps({"train": {"best_checkpoint": kept}}))
    return d


def _kept(epoch, tied, ties=None):
    rec = {"metric": "eval_c_index", "value": 1.0, "step": epoch, "epoch": epoch, "evaluations": 15}
    return {**rec, "tied_evaluations": tied, **({"ties": ties} if ties else {})}


def test_kept_checkpoints_counts_ties_and_changed_epochs(tmp_path):
    kc = load_script("benchmarks/kept_checkpoints.py")
    lrs = {"bp_pretrained": [0.001, 0.0003], "bp_random": [0.003, 0.003]}
    first = {
        "coh_f0_bp_pretrained_lr0.001": _kept(2, 5),
        "coh_f0_bp_pretrained_lr0.0003": _kept(9, 1),  # not selected in fold 0
        "coh_f1_bp_pretrained_lr0.0003": _kept(1, 1),
        "coh_f0_bp_random_lr0.003": _kept(3, 2),
        "coh_f1_bp_random_lr0.003": _kept(4, 1),
        "coh_f0_bp_random_probe_lr0.003": _kept(7, 1),  # another arm sharing the prefix's start
    }
    base = _run_dir(tmp_path, "first", first, lrs, "_tf0.25_val")
    loss = {
        **first,
        "coh_f0_bp_pretrained_lr0.001": _kept(11, 5, "loss"),
        "coh_f0_bp_random_lr0.003": _kept(3, 2, "loss"),
    }
    rule = _run_dir(tmp_path, "loss", loss, {**lrs, "bp_random": [0.003, 0.001]}, "_tiesloss_tf0.25_val")
    (rule / "runs" / "coh_f1_bp_random_lr0.001_tiesloss_tf0.25_val").mkdir()
    (rule / "runs" / "coh_f1_bp_random_lr0.001_tiesloss_tf0.25_val" / "all_results.json").write_text(
        json.dumps({"train": {"best_checkpoint": _kept(6, 1, "loss")}})
    )
    res = kc.main(["--runs", str(base), str(rule), "--against", str(base), "--output_dir", str(tmp_path / "out")])
    assert res["first/bp_pretrained"]["runs"] == 2 and res["first/bp_pretrained"]["tied_share"] == 0.5
    assert res["first/bp_pretrained"]["median_kept_epoch"] == 1.5 and res["first/bp_pretrained"]["rule"] == ["first"]
    assert res["first/bp_random"]["against"] == {"paired_runs": 2, "kept_another_epoch": 0, "median_shift": 0.0}
    assert res["loss/bp_pretrained"]["against"] == {"paired_runs": 2, "kept_another_epoch": 1, "median_shift": 9}
    # fold 1 of bp_random selected another learning rate under the rule: not a pair
    assert res["loss/bp_random"]["against"]["paired_runs"] == 1
    assert res["loss/bp_random"]["rule"] == ["loss"]
    assert (
        "| loss | bp_pretrained | 2 | 50% | 6 | first, loss | 1 of 2 (median shift +9 epochs) |"
        in (tmp_path / "out" / "kept_checkpoints.md").read_text()
    )
    with pytest.raises(ValueError, match=r"0 run folders for coh_f0_bp_pretrained_lr0\.001"):
        kc.kept_epochs(_run_dir(tmp_path, "empty", {}, lrs, ""))


def test_kept_checkpoints_reads_the_epochs_survival_cv_recorded(tmp_path):
    """survival_cv.json records each fold's kept epoch: no run folder is needed (they may have been pruned); a fold
    whose selected run kept no record (keep-last) is left out; an older output without the record is still read from
    its run folders (the test above)."""
    kc = load_script("benchmarks/kept_checkpoints.py")
    d = tmp_path / "recorded"
    d.mkdir()
    kept = [_kept(4, 3, "loss"), None]
    models = {"bp_pretrained": {"lr": [0.001, 0.003], "best_checkpoint": kept}, "bp_random": {"lr": [0.003, 0.003]}}
    (d / "survival_cv.json").write_text(json.dumps({"cohorts": {"coh": {"models": models}}}))
    with pytest.raises(ValueError, match=r"0 run folders for coh_f0_bp_random_lr0\.003"):
        kc.kept_epochs(d)  # bp_random has no record: looked up in run folders, and there are none
    out = kc.kept_epochs(d, arms=("bp_pretrained",))
    assert list(out) == [("bp_pretrained", "coh", 0)]
    assert out["bp_pretrained", "coh", 0] == {"lr": 0.001, "tag": None, **kept[0]}
    assert kc.summary(out, "bp_pretrained") == {"runs": 1, "tied_share": 1.0, "median_kept_epoch": 4, "rule": ["loss"]}
