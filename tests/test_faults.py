"""Fault injection for pretraining (``pretrain/run_pretrain.py`` in-process on a tiny synthetic cohort, CPU): runs
never mix in one output_dir, resume checks the config and the number of processes, a crash or a full disk while
writing a checkpoint or the final model leaves the previous one loadable, a NaN loss stops the run naming the step,
the samples and the view, a manifest-level problem stops the run before any work."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from conftest import synthetic_run_config
from safetensors.torch import load_file
from script_loader import load_script

from bioperceiver.data import BioPerceiverProcessor
from bioperceiver.training import loop
from bioperceiver.training.checkpointing import (
    latest_checkpoint,
    read_trainer_state,
    resolve_resume,
    save_checkpoint,
)

STEPS = 4  # checkpoints at 2 and 4


@pytest.fixture(scope="module")
def script():
    return load_script("pretrain/run_pretrain.py", "run_pretrain_faults")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    run = synthetic_run_config(
        root, max_steps=STEPS, warmup_steps=1, batch_size=8, save_steps=2, keep_last=2, eval={"n_bootstrap": 0}
    )
    return run


@pytest.fixture(scope="module")
def base_run(cohort, script):
    """One uninterrupted run (fits the shared processors): the reference the faulty runs are compared with."""
    out = cohort.parent / "base"
    script.main(["--config", str(cohort), f"output_dir={out}"])
    return out


def run_args(cohort: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(cohort), f"output_dir={out}", *extra]


def params(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- runs never mix -----------------------------------------------------------------------------------------------
def test_existing_run_is_refused_unless_resume_or_overwrite(cohort, base_run, script, capsys, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    before = params(out / "final")
    with pytest.raises(SystemExit) as info:
        script.main(run_args(cohort, out))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume latest" in err and "--overwrite_output_dir" in err
    assert "checkpoint-4" in err and "final/" in err
    assert_same(params(out / "final"), before)  # nothing touched
    old_id = read_trainer_state(out / "checkpoints" / "checkpoint-4")["run_id"]

    (out / "notes.txt").write_text("the user's own notes")  # not the run's: kept by an overwrite
    (out / "my_data").mkdir()
    (out / "my_data" / "cohort.csv").write_text("sample_id\n")
    (out / "checkpoints" / "checkpoint-99").mkdir()  # another run's stray checkpoint: the run's folder, cleared
    script.main(run_args(cohort, out, "--overwrite_output_dir"))
    assert (out / "notes.txt").read_text() == "the user's own notes" and (out / "my_data" / "cohort.csv").exists()
    assert not (out / "checkpoints" / "checkpoint-99").exists()
    states = [read_trainer_state(p) for p in sorted((out / "checkpoints").iterdir())]
    assert len(states) == 2 and {s["run_id"] for s in states} != {old_id} and len({s["run_id"] for s in states}) == 1
    assert_same(params(out / "final"), before)  # the same seed retrains the same model, from scratch


def test_a_finetuning_folder_is_never_a_pretraining_output_dir(cohort, script, capsys, tmp_path):
    out = tmp_path / "finetuned"
    out.mkdir()
    (out / "finetuning_task.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"weights")
    for extra in ([], ["--overwrite_output_dir"]):
        with pytest.raises(SystemExit) as info:
            script.main(run_args(cohort, out, *extra))
        assert info.value.code == 2
        assert "holds a finetuning run or a saved model" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["finetuning_task.json", "model.safetensors"]


def test_resume_from_another_folder_into_an_output_dir_holding_a_run_is_refused(
    cohort, base_run, script, capsys, tmp_path
):
    other = tmp_path / "other"
    shutil.copytree(base_run, other)
    with pytest.raises(SystemExit) as info:
        script.main(run_args(cohort, other, "--resume", str(base_run / "checkpoints" / "checkpoint-2")))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "holds another run" in err and "Resume into an empty output_dir" in err


def test_rotation_deletes_only_this_runs_checkpoints_oldest_step_first(tmp_path):
    """The issue's case: a newer run's checkpoint-2 beside an older run's checkpoint-6. Before, rotation sorted every
    checkpoint by step and deleted the new run's one, so --resume latest continued the other run."""

    class Saver:  # the part of Accelerator that save_checkpoint uses, one process
        is_main_process = True

        def wait_for_everyone(self):
            pass

        def save_state(self, path):
            Path(path).mkdir(parents=True)
            (Path(path) / "model.safetensors").write_text("weights")

    ckpts = tmp_path / "checkpoints"
    for step, run_id in ((6, "old"), (2, "new"), (10, "new")):
        save_checkpoint(Saver(), ckpts, step, step, keep_last=5, run_id=run_id)
    save_checkpoint(Saver(), ckpts, 12, 12, keep_last=2, run_id="new")
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-10", "checkpoint-12", "checkpoint-6"]
    assert latest_checkpoint(ckpts, run_id="new").name == "checkpoint-12"
    assert latest_checkpoint(ckpts, run_id="old").name == "checkpoint-6"
    with pytest.raises(FileNotFoundError, match="2 different runs"):
        resolve_resume("latest", ckpts)  # a mixed folder is never resumed by guess


def test_resume_refuses_a_changed_config_naming_the_keys_and_accepts_allowed_changes(
    cohort, base_run, script, capsys, tmp_path
):
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    with pytest.raises(SystemExit) as info:
        script.main(run_args(cohort, out, "--resume", "latest", "optim.lr=0.5", "loss.fused_view=false"))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "config changed" in err and "loss.fused_view, optim.lr" in err
    assert "max_steps" not in err.split("config changed")[1].split(";")[0]
    # run length, logging, checkpoint and evaluation cadence may change: resumed at step 4 of 4, final/ rewritten
    result = script.main(
        run_args(cohort, out, "--resume", "latest", "logging.log_steps=3", "checkpoint.keep_last=3", "eval.steps=2")
    )
    assert result["steps"] == STEPS
    assert_same(params(out / "final"), params(base_run / "final"))


def test_resume_with_another_number_of_processes_is_refused(cohort, base_run, script, capsys, tmp_path):
    """Documented choice: exact resume needs the same process count (data position and RNG streams are per
    process), so a checkpoint written by 2 processes is refused by a 1-process launch, before any work."""
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    state_file = out / "checkpoints" / "checkpoint-4" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["num_processes"] == 1
    state_file.write_text(json.dumps({**state, "num_processes": 2}))
    with pytest.raises(SystemExit):
        script.main(run_args(cohort, out, "--resume", "latest"))
    err = capsys.readouterr().err
    assert "written by 2 process(es), this launch has 1" in err and "--num_processes 2" in err


# ---- crashes while writing ----------------------------------------------------------------------------------------
def crash_in_save_state(monkeypatch, step: int, error: BaseException) -> None:
    """``Accelerator.save_state`` writes the checkpoint of ``step`` (into its temporary folder), then raises."""
    original = Accelerator.save_state

    def save_state(self, output_dir=None, **kwargs):
        written = original(self, output_dir, **kwargs)
        if Path(output_dir).name.endswith(f"checkpoint-{step}"):
            raise error
        return written

    monkeypatch.setattr(Accelerator, "save_state", save_state)


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one_and_resume_picks_it(
    cohort, base_run, script, monkeypatch, tmp_path
):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        crash_in_save_state(m, 4, KeyboardInterrupt())  # like a kill: nothing cleans up after it
        with pytest.raises(KeyboardInterrupt):
            script.main(run_args(cohort, out))
    ckpts = out / "checkpoints"
    assert (ckpts / ".tmp-checkpoint-4").is_dir()  # the half-written one is there ...
    assert resolve_resume("latest", ckpts).name == "checkpoint-2"  # ... and never considered
    assert not (out / "final").exists()
    script.main(run_args(cohort, out, "--resume", "latest"))
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert_same(params(ckpts / "checkpoint-4"), params(base_run / "checkpoints" / "checkpoint-4"))


def test_full_disk_while_saving_is_reported_with_the_path_and_keeps_the_last_good_checkpoint(
    cohort, base_run, script, monkeypatch, capsys, tmp_path
):
    out = tmp_path / "run"
    crash_in_save_state(monkeypatch, 4, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(SystemExit) as info:
        script.main(run_args(cohort, out))
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert f"could not write {out / 'checkpoints' / 'checkpoint-4'}: No space left on device" in err
    assert "previous ones are kept (checkpoint-2)" in err and "--resume latest" in err
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-2"]  # temporary folder removed, last good kept
    assert_same(params(ckpts / "checkpoint-2"), params(base_run / "checkpoints" / "checkpoint-2"))


def test_crash_while_writing_final_processors_keeps_the_previous_final_loadable(
    cohort, base_run, script, monkeypatch, tmp_path
):
    """A resumed run rewrites final/; a crash in the middle of writing its processors (one file half-written) must
    leave the previous final/ (model and processors) as it was."""
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    original = BioPerceiverProcessor.save_pretrained

    def half_save(self, directory):
        written = original(self, directory)
        victim = max((p for p in Path(directory).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
        raise KeyboardInterrupt  # killed while writing
        return written

    monkeypatch.setattr(BioPerceiverProcessor, "save_pretrained", half_save)
    with pytest.raises(KeyboardInterrupt):
        script.main(run_args(cohort, out, "--resume", "latest"))
    monkeypatch.undo()
    reference = BioPerceiverProcessor.from_pretrained(base_run / "final")
    loaded = BioPerceiverProcessor.from_pretrained(out / "final")
    assert loaded.modalities == reference.modalities
    for a, b in zip(sorted((out / "final").rglob("*")), sorted((base_run / "final").rglob("*")), strict=True):
        assert a.relative_to(out) == b.relative_to(base_run)
        if a.is_file():
            assert a.read_bytes() == b.read_bytes(), a
    assert_same(params(out / "final"), params(base_run / "final"))


def test_crash_while_fitting_processors_leaves_no_half_processor_dir(cohort, script, monkeypatch, tmp_path):
    original = BioPerceiverProcessor.save_pretrained

    def half_save(self, directory):
        original(self, directory)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(BioPerceiverProcessor, "save_pretrained", half_save)
    proc_dir = tmp_path / "procs"
    with pytest.raises(OSError, match="No space left"):
        script.main(run_args(cohort, tmp_path / "run", f"data.processor_dir={proc_dir}"))
    assert not proc_dir.exists() and not list(tmp_path.glob(".tmp-*"))  # nothing half-written is left to load


# ---- NaN loss -----------------------------------------------------------------------------------------------------
def test_nan_loss_stops_naming_step_samples_and_modality_and_saves_nothing_corrupt(
    cohort, base_run, script, monkeypatch, tmp_path
):
    poisoned = "signal_ecg"
    seen: dict[str, list] = {}
    original = loop.training_data

    def poisoned_training_data(config, manifest, processor):
        train_ds, collator = original(config, manifest, processor)
        calls = {"n": 0}

        def collate(samples, *args, **kwargs):
            batch = collator(samples, *args, **kwargs)
            calls["n"] += 1
            if calls["n"] == 3 and batch is not None:  # the third training batch: step 3
                for value in batch["inputs"][poisoned].values():
                    if value.is_floating_point():
                        value.fill_(float("nan"))
                seen["ids"] = list(batch["sample_id"])
            return batch

        collate.report = collator.report  # what the loop reads after training
        return train_ds, collate

    monkeypatch.setattr(loop, "training_data", poisoned_training_data)
    out = tmp_path / "run"
    with pytest.raises(loop.NonFiniteLossError) as info:
        script.main(run_args(cohort, out))
    msg = str(info.value)
    assert "at step 3" in msg and f"view {poisoned!r} non-finite" in msg
    assert all(sid in msg for sid in seen["ids"])
    # nothing of step 3 was applied or saved: checkpoint-2 only, equal to the clean run's, and no final/
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-2"]
    assert not (out / "final").exists()
    assert_same(params(ckpts / "checkpoint-2"), params(base_run / "checkpoints" / "checkpoint-2"))


# ---- validation before work ---------------------------------------------------------------------------------------
def test_duplicate_sample_id_stops_before_fitting_processors_with_the_full_list(cohort, script, capsys, tmp_path):
    import pandas as pd

    raw = yaml.safe_load(cohort.read_text())
    table = pd.read_parquet(raw["data"]["manifest"])
    table.loc[3, "sample_id"] = table.loc[2, "sample_id"]
    table.loc[7, "sample_id"] = table.loc[6, "sample_id"]
    manifest = Path(raw["data"]["manifest"]).with_name("duplicates.parquet")
    table.to_parquet(manifest)
    proc_dir = tmp_path / "procs"

    def no_fit(*args, **kwargs):
        raise AssertionError("processors must not be fitted")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(BioPerceiverProcessor, "fit", no_fit)
        with pytest.raises(SystemExit) as info:
            script.main(
                run_args(cohort, tmp_path / "run", f"data.manifest={manifest}", f"data.processor_dir={proc_dir}")
            )
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "duplicate_id=2" in err
    assert str(table.loc[2, "sample_id"]) in err and str(table.loc[6, "sample_id"]) in err
    assert not proc_dir.exists() and not (tmp_path / "run" / "checkpoints").exists()


class ReachedFitting(Exception):
    pass


@pytest.mark.parametrize("on_error", ["raise", "skip", "skip_sample", "skip_modality"])
def test_per_sample_problems_follow_on_error_before_any_work(cohort, script, capsys, tmp_path, on_error):
    """An empty note and a NaN omics value are per-sample problems: with ``raise`` the run stops before fitting
    processors, listing both; with a skip policy validation lets the run go on (the data layer skips them)."""
    import pandas as pd

    raw = yaml.safe_load(cohort.read_text())
    table = pd.read_parquet(raw["data"]["manifest"])
    notes = table.index[table["text_note"].notna()]
    omics = table.index[table["omics_expression"].notna()]
    table.loc[notes[0], "text_note"] = "   "
    table.loc[omics[1], "omics_expression"] = '{"GENE0002": NaN, "GENE0003": 1.0}'
    manifest = Path(raw["data"]["manifest"]).with_name(f"bad_cells_{on_error}.parquet")
    table.to_parquet(manifest)

    def fit(*args, **kwargs):
        raise ReachedFitting

    args = run_args(
        cohort,
        tmp_path / "run",
        f"data.manifest={manifest}",
        f"data.processor_dir={tmp_path / 'procs'}",
        f"data.on_error={on_error}",
    )
    with pytest.MonkeyPatch.context() as m:
        m.setattr(BioPerceiverProcessor, "fit", fit)
        if on_error == "raise":
            with pytest.raises(SystemExit) as info:
                script.main(args)
            assert info.value.code == 2
            err = capsys.readouterr().err
            assert "2 problem(s)" in err and "text_note" in err and "omics_expression" in err
            assert str(table.loc[notes[0], "sample_id"]) in err and str(table.loc[omics[1], "sample_id"]) in err
        else:
            with pytest.raises(ReachedFitting):
                script.main(args)


def test_sigterm_saves_a_checkpoint_of_the_step_and_resume_is_exact(
    cohort, base_run, script, capsys, monkeypatch, tmp_path
):
    """A scheduler's SIGTERM (SLURM preemption) arrives while checkpoint-2 is written: the run finishes step 3,
    saves checkpoint-3 (not a regular save step), exits with 128 + 15 naming it, and --resume latest ends exactly
    where the uninterrupted run does. The handlers are put back afterwards."""
    import os
    import signal

    save = loop.save_checkpoint

    def save_then_signal(accelerator, ckpt_dir, step, *args, **kwargs):
        result = save(accelerator, ckpt_dir, step, *args, **kwargs)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(loop, "save_checkpoint", save_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "preempted"
    with pytest.raises(SystemExit) as info:
        script.main(run_args(cohort, out))
    assert info.value.code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM after step 3" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert not (out / "final").exists() and signal.getsignal(signal.SIGTERM) is before
    monkeypatch.setattr(loop, "save_checkpoint", save)
    script.main(run_args(cohort, out, "--resume", "latest"))
    assert_same(params(out / "final"), params(base_run / "final"))
