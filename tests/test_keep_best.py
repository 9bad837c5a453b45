"""Pretraining keeps its best held-out evaluation (``eval.load_best_model_at_end``) and stops when it no longer
improves (``eval.early_stopping_patience``), as transformers' ``load_best_model_at_end`` and ``EarlyStoppingCallback``
do for a ``Trainer``: final/ holds the chosen step's weights, rotation keeps its checkpoint, a killed and resumed run
chooses as an uninterrupted one, and a re-run of a stopped run trains nothing more."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import synthetic_run_config
from safetensors.torch import load_file
from test_pretrain_deepspeed import _launch as accelerate_launch  # 2 processes, a free port
from test_pretrain_script import launch

from bioperceiver.training import RunConfigError, load_run_config
from bioperceiver.training.keep_best import BestModel, best_metric_choices


def _eval_cfg(**kw):
    base = {"load_best_model_at_end": True, "metric_for_best_model": "eval_loss", "greater_is_better": None}
    return SimpleNamespace(**{**base, "early_stopping_patience": 0, **kw})


def test_the_best_is_strictly_better_ties_keep_the_earlier_and_patience_counts_evaluations():
    best = BestModel.from_config(_eval_cfg(early_stopping_patience=2), ["a", "b"], reconstruction=False)
    assert best.greater_is_better is False  # a loss: lower is better
    assert best.update(1, {"eval_loss": 3.0}) and best.step == 1
    assert not best.update(2, {"eval_loss": 3.0}) and best.step == 1  # a tie keeps the earlier, as transformers does
    assert best.since_best == 1 and not best.stopped_early
    assert best.update(3, {"eval_loss": 2.5}) and best.since_best == 0
    # an evaluation without the metric is not counted at all: it cannot be the best, nor use up the patience (a pair
    # the held-out split never reports would otherwise stop every run with no best at all)
    assert not best.update(4, {}) and best.since_best == 0 and best.evaluations == 3
    assert not best.update(5, {"eval_loss": float("nan")}) and best.since_best == 1  # diverged: counts, never best
    assert not best.update(6, {"eval_loss": 2.6}) and best.stopped_early and best.checkpoint == "checkpoint-3"
    assert best.summary() == {
        "metric": "eval_loss",
        "greater_is_better": False,
        "value": 2.5,
        "step": 3,
        "evaluations": 5,
        "stopped_early": True,
        "patience": 2,
    }
    first_nan = BestModel.from_config(_eval_cfg(early_stopping_patience=3), ["a"], reconstruction=False)
    assert not first_nan.update(1, {"eval_loss": float("nan")}) and first_nan.step is None  # not a best to beat
    assert first_nan.update(2, {"eval_loss": 9.0}) and first_nan.step == 2 and first_nan.value == 9.0
    never = BestModel.from_config(_eval_cfg(early_stopping_patience=1), ["a", "b"], reconstruction=False)
    assert not any(never.update(s, {}) for s in range(1, 5)) and not never.stopped_early and never.evaluations == 0
    # the last evaluation can be the best, and it does not stop the run early: the run ends there anyway
    last = BestModel.from_config(_eval_cfg(early_stopping_patience=1), ["a"], reconstruction=False)
    assert last.update(2, {"eval_loss": 1.0}) and not last.update(4, {"eval_loss": 1.5}, final=True)
    assert last.since_best == 1 and not last.stopped_early
    again = BestModel.from_config(_eval_cfg(early_stopping_patience=2), ["a", "b"], reconstruction=False)
    again.load_state_dict(best.state_dict())
    assert again == best
    recall = BestModel.from_config(_eval_cfg(metric_for_best_model="R@1/a-b"), ["a", "b"], reconstruction=False)
    assert recall.greater_is_better is True  # retrieval: higher is better
    assert recall.update(1, {"R@1/a-b": 0.2}) and not recall.update(2, {"R@1/a-b": 0.1}) and recall.value == 0.2
    with pytest.raises(RunConfigError, match="selected on eval_loss"):
        recall.load_state_dict(best.state_dict())  # a checkpoint chosen on another metric
    assert BestModel.from_config(_eval_cfg(load_best_model_at_end=False), ["a"], reconstruction=False) is None


def test_only_held_out_numbers_the_run_reports_can_choose():
    assert best_metric_choices(["x", "y", "z"], reconstruction=True)[:3] == [
        "eval_loss",
        "eval_loss_reconstruction",
        "R@1/x-y",
    ]
    assert "R@10/y-z" in best_metric_choices(["x", "y", "z"], reconstruction=False)
    for wrong in ("eval_loss_reconstruction", "eval_gap", "train_patients/eval_loss", "R@1/y-x", "eval_los"):
        with pytest.raises(RunConfigError, match="choose one of") as err:
            BestModel.from_config(_eval_cfg(metric_for_best_model=wrong), ["x", "y"], reconstruction=False)
        assert repr(wrong) in str(err.value) and "'R@1/x-y'" in str(err.value)


def test_the_run_config_refuses_settings_that_cannot_work(tmp_path):
    run = synthetic_run_config(tmp_path, max_steps=4, warmup_steps=1, batch_size=8, save_steps=2, keep_last=1)
    with pytest.raises(RunConfigError, match=r"set eval\.steps"):
        load_run_config(run, ["eval.steps=0", "eval.load_best_model_at_end=true"])
    with pytest.raises(RunConfigError, match=r"needs eval\.load_best_model_at_end=true"):
        load_run_config(run, ["eval.steps=2", "eval.early_stopping_patience=2"])
    with pytest.raises(RunConfigError, match="no held-out − training gap"):
        load_run_config(run, ["eval.split=train", "eval.training_patients=true"])
    with pytest.raises(RunConfigError, match="0 or more"):
        load_run_config(run, ["eval.steps=2", "eval.load_best_model_at_end=true", "eval.early_stopping_patience=-1"])
    wrong = launch(
        run,
        f"output_dir={tmp_path / 'wrong'}",
        "eval.steps=2",
        "eval.load_best_model_at_end=true",
        "eval.metric_for_best_model=R@1/text_note-nothing",
    )
    # refused before any training step (exit status 2), naming what the run can select on
    assert wrong.returncode == 2 and "choose one of" in wrong.stderr and "'eval_loss'" in wrong.stderr
    assert not (tmp_path / "wrong" / "checkpoints").exists()


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    """A run that keeps its lowest held-out loss (the default rule), evaluated at steps 2, 4 and 6, with checkpoints
    every 3 steps and only 1 kept by rotation. On this tiny cohort the held-out loss rises after step 2, so the kept
    step is not the last (asserted below)."""
    root = tmp_path_factory.mktemp("keep_best")
    best = {"steps": 2, "load_best_model_at_end": True}
    synthetic_run_config(root, max_steps=6, warmup_steps=1, batch_size=8, save_steps=3, keep_last=1, eval=best)
    full = launch(root / "run.yaml", f"output_dir={root / 'full'}")
    assert full.returncode == 0, full.stderr[-3000:]
    return root


def _evals(run: Path) -> list[dict]:
    return [h for h in json.loads((run / "history.json").read_text()) if "eval_loss" in h]


def _backbone(run: Path, checkpoint: str) -> dict[str, torch.Tensor]:
    saved = load_file(run / "checkpoints" / checkpoint / "model.safetensors")
    return {k[len("model.") :]: v for k, v in saved.items() if k.startswith("model.")}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_final_holds_the_best_evaluations_weights_and_says_so(kept):
    run = kept / "full"
    evals = _evals(run)
    assert [h["step"] for h in evals] == [2, 4, 6]  # each evaluation recorded once: the kept one is not repeated
    kept_eval = min(evals, key=lambda h: h["eval_loss"])  # min() keeps the first of ties, as the rule does
    assert kept_eval["step"] != 6, "the fixture must keep an earlier step than the last to test anything"
    results = json.loads((run / "eval_results.json").read_text())
    assert results["step"] == kept_eval["step"]
    assert results["best_model"] == {
        "metric": "eval_loss",
        "greater_is_better": False,
        "value": kept_eval["eval_loss"],
        "step": kept_eval["step"],
        "evaluations": 3,
        "stopped_early": False,
        "last_step": 6,
    }
    # final/ is the kept step's backbone, not the last step's, and its re-evaluated numbers are the kept step's
    final = load_file(run / "final" / "model.safetensors")
    assert _same(final, _backbone(run, f"checkpoint-{kept_eval['step']}"))
    assert not _same(final, _backbone(run, "checkpoint-6"))
    assert results["eval_loss"] == pytest.approx(kept_eval["eval_loss"], abs=1e-6)
    for key, value in kept_eval.items():
        if key.startswith("R@1/"):
            assert results[key] == pytest.approx(value, abs=1e-6), key
    # rotation (keep_last 1) kept the best checkpoint beside the newest; the kept step's trainer state names it
    kept_dirs = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept_dirs == sorted({f"checkpoint-{kept_eval['step']}", "checkpoint-6"})
    state = json.loads((run / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["best_model"]["step"] == kept_eval["step"]
    card = (run / "final" / "README.md").read_text()
    assert f"are step {kept_eval['step']}'s: of 3 held-out evaluations it had the lowest eval_loss" in card
    assert "training ran to step 6" in card and "stopped early" not in card
    assert (run / "loss_curves.png").stat().st_size > 0


def test_a_killed_and_resumed_run_keeps_the_same_step_and_weights(kept):
    crashed = launch(kept / "run.yaml", f"output_dir={kept / 'crash'}", "--crash_after_step", "3")
    assert crashed.returncode == -9
    resumed = launch(kept / "run.yaml", f"output_dir={kept / 'crash'}", "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (json.loads((kept / run / "eval_results.json").read_text()) for run in ("full", "crash"))
    assert a["best_model"] == b["best_model"] and a["step"] == b["step"]
    assert _same(
        load_file(kept / "full" / "final" / "model.safetensors"),
        load_file(kept / "crash" / "final" / "model.safetensors"),
    )
    assert [h["eval_loss"] for h in _evals(kept / "full")] == [h["eval_loss"] for h in _evals(kept / "crash")]


def test_early_stopping_stops_at_the_first_evaluation_past_patience_and_a_rerun_trains_no_more(kept):
    out = kept / "early"
    args = ("eval.steps=1", "eval.early_stopping_patience=1", "optim.max_steps=8", f"output_dir={out}")
    first = launch(kept / "run.yaml", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    evals = _evals(out)
    steps = [h["step"] for h in evals]
    best_step, best_value, stop = None, None, None
    for h in evals:  # the rule, recomputed from the recorded numbers: stop at the first evaluation not below the best
        if best_value is None or h["eval_loss"] < best_value:
            best_step, best_value = h["step"], h["eval_loss"]
        else:
            stop = h["step"]
            break
    assert stop is not None and stop < 8, "the fixture must stop early to test anything"
    assert steps[-1] == stop and max(h["step"] for h in json.loads((out / "history.json").read_text())) == stop
    results = json.loads((out / "eval_results.json").read_text())
    assert results["step"] == best_step and results["best_model"]["stopped_early"]
    assert results["best_model"]["last_step"] == stop and results["best_model"]["patience"] == 1
    assert _same(load_file(out / "final" / "model.safetensors"), _backbone(out, f"checkpoint-{best_step}"))
    assert (
        "where it stopped early after 1 evaluation in a row without a better one"
        in (out / "final" / "README.md").read_text()
    )
    # run again into the same folder: the stopped run is finished, nothing trains, the same weights are kept
    history = (out / "history.json").read_text()
    weights = load_file(out / "final" / "model.safetensors")
    again = launch(kept / "run.yaml", *args, "--resume", "latest")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "history.json").read_text() == history
    assert _same(load_file(out / "final" / "model.safetensors"), weights)
    assert json.loads((out / "eval_results.json").read_text())["best_model"] == results["best_model"]


def test_two_ddp_processes_stop_together_and_keep_the_same_step(tmp_path):
    """2 CPU processes (gloo): early stopping and the choice are decided once and taken by both, so both stop at the
    same step (a process that went on alone would hang in its next all-reduce until the timeout); the training-
    patient evaluation (``eval.training_patients``) runs beside the held-out one on both."""
    evals = {"steps": 1, "load_best_model_at_end": True, "early_stopping_patience": 1, "training_patients": True}
    run = synthetic_run_config(
        tmp_path, max_steps=8, warmup_steps=1, batch_size=4, save_steps=100, keep_last=1, eval=evals
    )
    res = accelerate_launch(run, tmp_path / "out", "cpu_ddp.yaml", {"ACCELERATE_USE_CPU": "1"})
    assert res.returncode == 0, res.stderr[-4000:]
    out = tmp_path / "out"
    results = json.loads((out / "eval_results.json").read_text())
    history = _evals(out)
    assert history[-1]["step"] == results["best_model"]["last_step"]
    assert results["best_model"]["stopped_early"], "the fixture must stop early to test anything"
    assert history[-1]["eval_loss"] >= results["best_model"]["value"] and history[-1]["step"] < 8
    assert results["best_model"]["value"] == min(h["eval_loss"] for h in history)
    assert _same(load_file(out / "final" / "model.safetensors"), _backbone(out, f"checkpoint-{results['step']}"))
    for h in history:
        assert h["eval_gap"] == pytest.approx(h["eval_loss"] - h["train_patients/eval_loss"])


def test_a_finished_run_extended_with_more_steps_remembers_its_last_evaluation(kept):
    """The last step is evaluated before its checkpoint is written, so a finished run resumed with a larger
    ``optim.max_steps`` (an allowed change) chooses among all its evaluations, the last one included; that last
    evaluation never stops a run early (it ends there anyway); and re-running the finished run trains and counts
    nothing more."""
    patient = kept / "patient"  # evaluations at 2, 4, 6; the best is step 2's, so 6 is the second without a better one
    res = launch(kept / "run.yaml", f"output_dir={patient}", "eval.early_stopping_patience=2")
    assert res.returncode == 0, res.stderr[-3000:]
    evals = _evals(patient)
    assert [h["step"] for h in evals] == [2, 4, 6] and min(evals, key=lambda h: h["eval_loss"])["step"] == 2, "fixture"
    best = json.loads((patient / "eval_results.json").read_text())["best_model"]
    assert best["stopped_early"] is False and best["evaluations"] == 3 and best["last_step"] == 6
    assert "stopped early" not in (patient / "final" / "README.md").read_text()

    out = kept / "extend"  # 4 steps (another schedule): the last evaluation is the best
    short = launch(kept / "run.yaml", f"output_dir={out}", "optim.max_steps=4")
    assert short.returncode == 0, short.stderr[-3000:]
    four = _evals(out)
    assert [h["step"] for h in four] == [2, 4] and four[1]["eval_loss"] < four[0]["eval_loss"], "fixture"
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["best_model"]["step"] == 4 and state["best_model"]["evaluations"] == 2  # saved with its checkpoint
    longer = launch(kept / "run.yaml", f"output_dir={out}", "optim.max_steps=6", "--resume", "latest")
    assert longer.returncode == 0, longer.stderr[-3000:]
    evals = _evals(out)
    assert [h["step"] for h in evals] == [2, 4, 6]  # each evaluation once, the step-4 one kept across the resume
    results = json.loads((out / "eval_results.json").read_text())
    chosen = min(evals, key=lambda h: h["eval_loss"])
    assert results["best_model"]["evaluations"] == 3 and results["step"] == chosen["step"]
    assert _same(load_file(out / "final" / "model.safetensors"), _backbone(out, f"checkpoint-{chosen['step']}"))
    history, weights = (out / "history.json").read_text(), load_file(out / "final" / "model.safetensors")
    again = launch(kept / "run.yaml", f"output_dir={out}", "optim.max_steps=6", "--resume", "latest")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "history.json").read_text() == history  # the re-run's repeated evaluation is not counted again
    assert json.loads((out / "eval_results.json").read_text())["best_model"] == results["best_model"]
    assert _same(load_file(out / "final" / "model.safetensors"), weights)


def test_resuming_elsewhere_brings_the_best_checkpoint_and_a_deleted_one_falls_back_to_the_last_weights(kept):
    """``--resume PATH`` into a new output_dir copies the best checkpoint from beside PATH, so final/ still gets its
    weights; a best checkpoint deleted by hand does not fail the run at its end (after all the training): final/
    holds the last weights, and the card, eval_results.json and the log say why."""
    import shutil

    source = kept / "full" / "checkpoints" / "checkpoint-6"
    kept_step = json.loads((kept / "full" / "eval_results.json").read_text())["step"]
    assert kept_step != 6, "fixture"
    moved = launch(kept / "run.yaml", f"output_dir={kept / 'moved'}", "optim.max_steps=7", "--resume", str(source))
    assert moved.returncode == 0, moved.stderr[-3000:]
    results = json.loads((kept / "moved" / "eval_results.json").read_text())
    if results["step"] == kept_step:  # no later evaluation (step 6's repeat, step 7) beat it: its weights are final/
        assert _same(
            load_file(kept / "moved" / "final" / "model.safetensors"),
            load_file(kept / "full" / "final" / "model.safetensors"),
        )
        assert (kept / "moved" / "checkpoints" / f"checkpoint-{kept_step}").is_dir()

    gone = kept / "gone"
    shutil.copytree(kept / "full", gone)
    shutil.rmtree(gone / "checkpoints" / f"checkpoint-{kept_step}")
    res = launch(kept / "run.yaml", f"output_dir={gone}", "optim.max_steps=7", "--resume", "latest")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"checkpoint-{kept_step} is gone" in res.stderr
    results = json.loads((gone / "eval_results.json").read_text())
    best = results["best_model"]
    if best["step"] == kept_step:  # still the best: its weights are gone, so final/ is the last step's
        assert results["step"] == 7 and best["checkpoint_missing"].endswith(f"checkpoint-{kept_step}")
        assert _same(load_file(gone / "final" / "model.safetensors"), _backbone(gone, "checkpoint-7"))
        card = (gone / "final" / "README.md").read_text()
        assert "its checkpoint was deleted before the run ended" in card and "the last step's (7)" in card
