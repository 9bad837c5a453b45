"""benchmarks/finetune_tasks.py's BPRunner reuses a recorded run only when it is the same run, and says why not."""

from __future__ import annotations

import json
from types import SimpleNamespace

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
