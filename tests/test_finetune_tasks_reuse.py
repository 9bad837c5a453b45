"""benchmarks/finetune_tasks.py's BPRunner reuses a recorded run only when it is the same run, and says why not."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from script_loader import load_script

ft = load_script("benchmarks/finetune_tasks.py")


def test_recorded_run_reused_only_when_identical(tmp_path, capsys):
    from bioperceiver.evaluation.report import predictions_path

    out = tmp_path / "run"
    argv = ["--manifest", "m.parquet", "--learning_rate", "0.001"]
    recorded = {"tag": "t", "argv": argv, "validation": 0.7, "test": 0.6}
    runner = SimpleNamespace(reuse={"t": recorded})
    assert ft.BPRunner._reusable(runner, "t", argv, out, "c_index") is None  # no run folder
    assert "lacks results or predictions" in capsys.readouterr().out
    out.mkdir()
    (out / "all_results.json").write_text(json.dumps({"validation": {"c_index": 0.7}, "test": {"c_index": 0.6}}))
    predictions_path(out).parent.mkdir(parents=True, exist_ok=True)
    predictions_path(out).write_text("sample_id,patient_id,risk\ns1,p1,0.5\n")
    got = ft.BPRunner._reusable(runner, "t", argv, out, "c_index")
    assert got["reused"] and list(got["pred"]["sample_id"]) == ["s1"]
    other = [*argv[:-1], "0.003"]
    assert ft.BPRunner._reusable(runner, "t", other, out, "c_index") is None
    assert "its arguments differ ('0.001' -> '0.003')" in capsys.readouterr().out
    (out / "all_results.json").write_text(json.dumps({"validation": {"c_index": 0.7}, "test": {"c_index": 0.5}}))
    assert ft.BPRunner._reusable(runner, "t", argv, out, "c_index") is None
    assert "holds other results than recorded" in capsys.readouterr().out
    assert ft.BPRunner._reusable(runner, "unknown", argv, out, "c_index") is None


def test_keep_last_turns_checkpoint_selection_off(tmp_path):
    """cfg keep_last (survival_cv --bp_keep_last): the run keeps its last epoch (--load_best_model_at_end false);
    otherwise the best validation checkpoint, as before."""
    from types import SimpleNamespace

    class Stop(Exception):
        pass

    seen = []

    def main(argv):
        seen.append(argv)
        raise Stop

    runner = object.__new__(ft.BPRunner)
    runner.args, runner.reuse, runner.runs = SimpleNamespace(work_dir=str(tmp_path), quick=False), {}, []
    runner.rf = SimpleNamespace(DataArguments=object, main=main)
    cfg = {"pretrained": False, "mode": "full", "lr": 1e-3, "epochs": 3}
    for keep_last, expected in ((False, "true"), (True, "false")):
        with pytest.raises(Stop):
            runner.run("t", tmp_path / "m.parquet", ["--task", "survival"], {**cfg, "keep_last": keep_last})
        argv = seen[-1]
        assert argv[argv.index("--load_best_model_at_end") + 1] == expected
