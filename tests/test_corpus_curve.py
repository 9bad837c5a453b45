"""benchmarks/corpus_curve.py: a corpus-size curve from pretraining runs and seed_spread.py outputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from script_loader import load_script

cc = load_script("benchmarks/corpus_curve.py")
ARM, CTRL = "cox_clinical_emb_pretrained", "cox_clinical_emb_random"


def _backbone(folder, manifest, loss, recon, steps=400):
    (folder / "final").mkdir(parents=True)
    (folder / "final" / "run_config.yaml").write_text(f"data:\n  manifest: {manifest}\noptim:\n  max_steps: {steps}\n")
    res = {
        "eval_loss": loss,
        "eval_loss_uniform": 5.9,
        "eval_loss_reconstruction": recon,
        "eval_loss_reconstruction_mean": 2.3,
        f"R@1/{cc.PAIR}": 0.1,
        f"chance_R@1/{cc.PAIR}": 0.01,
    }
    (folder / "eval_results.json").write_text(json.dumps(res))


def _manifest(path, n_train):
    from bioperceiver.data import write_manifest

    rows = [
        {"sample_id": f"s{i}", "patient_id": f"p{i // 2}", "tabular_clinical": "{}", "split": "train"}
        for i in range(2 * n_train)
    ] + [{"sample_id": "v", "patient_id": "v", "tabular_clinical": "{}", "split": "validation"}]
    return write_manifest(pd.DataFrame(rows), path, {})


def _spread(folder, best, ctrl):
    def diff(mean):
        return {
            "mean": mean,
            "ci95_runs_and_patients": [mean - 0.03, mean + 0.03],
            "runs_above_zero": int(mean > 0),
            "runs": {"a": {}, "b": {}, "c": {}},
        }

    dev = {f"{ARM} - best baseline": diff(best), f"{ARM} - {CTRL}": diff(ctrl), "other - x": diff(0.0)}
    folder.mkdir(parents=True)
    (folder / "seed_spread.json").write_text(json.dumps({"roles": {"development": dev}}))


def test_curve_reads_every_backbone_and_spread(tmp_path, caplog):
    small, full = _manifest(tmp_path / "m" / "small.parquet", 5), _manifest(tmp_path / "m" / "full.parquet", 20)
    for i, (loss, recon) in enumerate(((4.5, 1.3), (4.3, 1.2))):
        _backbone(tmp_path / "small" / f"fold{i}", small, loss, recon)
        _backbone(tmp_path / "full" / f"fold{i}", full, loss - 0.6, recon - 0.2)
    (tmp_path / "full" / "fold9").mkdir()  # an unfinished run: left out with a warning
    _spread(tmp_path / "s_small", -0.05, 0.01)
    _spread(tmp_path / "s_full", -0.02, 0.03)
    # a size's label is any name (here one with a step count in it), ordered by its train patients
    small, full = str(tmp_path / "small" / "fold*"), str(tmp_path / "full" / "fold*")
    argv = [
        "--backbones",
        "1",
        full,
        "--backbones",
        "0.25_steps100",
        small,
        "--spread",
        "0.5",
        "1",
        str(tmp_path / "s_full"),
    ]
    argv += ["--spread", "0.5", "0.25_steps100", str(tmp_path / "s_small")]
    out = cc.main([*argv, "--output_dir", str(tmp_path / "o")])
    assert "fold9 has no eval_results.json" in caplog.text
    lf = out["label_free"]
    assert lf["0.25_steps100"]["runs"] == 2 and lf["1"]["runs"] == 2
    assert lf["0.25_steps100"]["train_patients"] == 5 and lf["1"]["train_patients"] == 20
    assert lf["0.25_steps100"]["eval_loss"] == pytest.approx(4.4) and lf["1"]["eval_loss"] == pytest.approx(3.8)
    assert lf["0.25_steps100"]["eval_loss_sd"] == pytest.approx(np.std([4.5, 4.3], ddof=1))
    assert lf["1"]["eval_loss_reconstruction"] == pytest.approx(1.05)
    ds = out["downstream"]["0.5"]
    assert ds["0.25_steps100"]["best baseline"]["mean"] == -0.05 and ds["1"][CTRL]["ci95"] == [0.0, 0.06]
    md = (tmp_path / "o" / "corpus_curve.md").read_text()
    row = "| 0.25_steps100 | 5 | -0.050 [-0.080, -0.020] (0 of 3 > 0) | +0.010 [-0.020, +0.040] (1 of 3 > 0) |"
    assert row in md and md.index(row) < md.index("| 1 | 20 |")  # the smaller corpus first
    assert (tmp_path / "o" / "corpus_curve.png").stat().st_size > 0


def test_curve_against_the_step_count(tmp_path):
    """``--x steps``: the same corpus pretrained for more steps; families ordered and plotted by ``optim.max_steps``."""
    full = _manifest(tmp_path / "m" / "full.parquet", 20)
    for i in range(2):
        _backbone(tmp_path / "long" / f"fold{i}", full, 3.9, 1.0, steps=800)
        _backbone(tmp_path / "short" / f"fold{i}", full, 3.8, 1.1, steps=400)
    _spread(tmp_path / "s_long", -0.01, 0.04)
    _spread(tmp_path / "s_short", -0.02, 0.03)
    argv = ["--x", "steps", "--backbones", "800", str(tmp_path / "long" / "fold*")]
    argv += ["--backbones", "400", str(tmp_path / "short" / "fold*")]
    argv += ["--spread", "0.5", "800", str(tmp_path / "s_long"), "--spread", "0.5", "400", str(tmp_path / "s_short")]
    out = cc.main([*argv, "--output_dir", str(tmp_path / "o")])
    lf = out["label_free"]
    assert out["x"] == "steps" and lf["800"]["steps"] == 800 and lf["400"]["steps"] == 400
    assert lf["800"]["train_patients"] == lf["400"]["train_patients"] == 20
    md = (tmp_path / "o" / "corpus_curve.md").read_text()
    assert "| backbones | steps | - best baseline |" in md
    short = "| 400 | 400 | -0.020 [-0.050, +0.010] (0 of 3 > 0) |"
    assert short in md and md.index(short) < md.index("| 800 | 800 | -0.010")  # fewer steps first
    assert md.index("| 400 | 2 | 20 | 400 | 3.800") < md.index("| 800 | 2 | 20 | 800 | 3.900")
    assert json.loads((tmp_path / "o" / "corpus_curve.json").read_text())["x"] == "steps"
    # run by run: fold0 and fold1 of each family pair up; 800 steps has the higher loss in both, lower recon in both
    assert out["paired"] == {
        "800 vs 400": {"pairs": 2, "lower": {"eval_loss": 0, "eval_loss_reconstruction": 2, "r1": 0}}
    }
    assert "| 800 vs 400 | 2 | 0 | 2 | 0 |" in md


def test_families_side_by_side_keep_the_order_given(tmp_path):
    """``--x family``: backbone families at one step count and corpus (e.g. widths) in the order given, each paired
    with the one before it, the downstream table without an x column, and a categorical plot."""
    full = _manifest(tmp_path / "m" / "full.parquet", 20)
    for i in range(2):
        _backbone(tmp_path / "narrow" / f"fold{i}", full, 3.9, 1.1)
        _backbone(tmp_path / "wide" / f"fold{i}", full, 3.8, 1.0)
    _spread(tmp_path / "s_narrow", -0.02, 0.03)
    _spread(tmp_path / "s_wide", -0.01, 0.05)
    argv = ["--x", "family", "--backbones", "wide", str(tmp_path / "wide" / "fold*")]
    argv += ["--backbones", "narrow", str(tmp_path / "narrow" / "fold*")]
    argv += [
        "--spread",
        "50%",
        "narrow",
        str(tmp_path / "s_narrow"),
        "--spread",
        "50%",
        "wide",
        str(tmp_path / "s_wide"),
    ]
    out = cc.main([*argv, "--output_dir", str(tmp_path / "o")])
    assert list(out["label_free"]) == ["wide", "narrow"]  # as given, not sorted
    assert out["paired"] == {
        "narrow vs wide": {"pairs": 2, "lower": {"eval_loss": 0, "eval_loss_reconstruction": 0, "r1": 0}}
    }
    md = (tmp_path / "o" / "corpus_curve.md").read_text()
    assert "| backbones | - best baseline | - cox_clinical_emb_random |" in md
    assert md.index("| wide | -0.010 [") < md.index("| narrow | -0.020 [")
    assert (tmp_path / "o" / "corpus_curve.png").stat().st_size > 0


def test_curve_pairs_runs_by_seed_and_fold_and_warns_on_mixed_steps(tmp_path, caplog):
    full = _manifest(tmp_path / "full.parquet", 4)
    for seed, fold, loss in ((0, 0, 4.0), (1, 0, 4.0), (1, 1, 4.0)):
        _backbone(tmp_path / f"a_seed{seed}" / f"fold{fold}", full, loss, 1.0)
    for seed, fold, loss in ((0, 0, 3.0), (1, 0, 5.0), (2, 0, 1.0)):  # seed 2 has no partner; seed 1 fold 1 neither
        _backbone(tmp_path / f"b_seed{seed}" / f"fold{fold}", full, loss, 1.0, steps=800 if seed == 2 else 400)
    argv = [
        "--backbones",
        "a",
        str(tmp_path / "a_seed*" / "fold*"),
        "--backbones",
        "b",
        str(tmp_path / "b_seed*" / "*"),
    ]
    out = cc.main([*argv, "--output_dir", str(tmp_path / "o")])
    assert out["paired"]["b vs a"] == {"pairs": 2, "lower": {"eval_loss": 1, "eval_loss_reconstruction": 0, "r1": 0}}
    assert "--backbones b mixes runs of [400, 800] steps" in caplog.text


def test_curve_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(FileNotFoundError, match="no pretraining run"):
        cc.main(["--backbones", "1", str(tmp_path / "none*"), "--output_dir", str(tmp_path / "o")])
    full = _manifest(tmp_path / "full.parquet", 3)
    _backbone(tmp_path / "b" / "fold0", full, 4.0, 1.0)
    with pytest.raises(ValueError, match=r"corpus sizes \['0.5'\]"):
        cc.main(["--backbones", "1", str(tmp_path / "b" / "*"), "--spread", "0.5", "0.5", "x", "--output_dir", "o"])
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "seed_spread.json").write_text(json.dumps({"roles": {"development": {}}}))
    with pytest.raises(KeyError, match="best baseline"):
        argv = ["--backbones", "1", str(tmp_path / "b" / "*"), "--spread", "0.5", "1", str(tmp_path / "s")]
        cc.main([*argv, "--output_dir", str(tmp_path / "o")])
