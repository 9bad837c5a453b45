"""Issue 13, finetuning on a user's own cohort: every bad input is named before any work (model and processor
folders, the output folder, the manifest), runs never mix (refused, resumed with the same arguments, or cleared),
and the README's finetuning example runs with both head types from a pretrained backbone (synthetic cohort, CPU)."""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import free_port
from finetune_refusals import refused
from script_loader import load_script

import bioperceiver as bp
from bioperceiver.data import (
    BioPerceiverProcessor,
    DataError,
    ManifestError,
    assign_splits,
    read_manifest,
    write_manifest,
)
from bioperceiver.data.processing import load_processor_settings
from bioperceiver.data.recipes.synthetic import make_synthetic_cohort
from bioperceiver.evaluation.report import predictions_path
from bioperceiver.losses.distributed import world as distributed_world
from bioperceiver.training import finetune_loop
from bioperceiver.training.arguments import DataArguments
from bioperceiver.training.finetuning import (
    RUN_RECORD,
    check_output_dir,
    resolve_resume_checkpoint,
)

USED = ["text_note", "tabular_ehr"]


run_finetune = load_script("finetune/run_finetune.py")


class WorkStarted(Exception):
    """Raised by the patched first step of real work (reading the manifest, fitting processors)."""


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict[str, Path]:
    """A synthetic cohort with patient-level splits, processor settings, and a "pretrained" backbone folder as
    run_pretrain.py writes it (backbone + processors of ``USED``), plus processors fitted for one more modality."""
    root = tmp_path_factory.mktemp("cohort")
    manifest = assign_splits(
        read_manifest(make_synthetic_cohort(root / "raw", num_patients=40, missing_rate=0.0, seed=5))
    )
    write_manifest(manifest.table, root / "raw" / "split.parquet", manifest.metadata)
    settings = {"processors": {"text_note": {"vocab_size": 200, "min_frequency": 1, "max_length": 48}}}
    (root / "settings.yaml").write_text(yaml.safe_dump(settings))
    manifest = read_manifest(root / "raw" / "split.parquet")
    procs, embedders = load_processor_settings(root / "settings.yaml")
    fitted = BioPerceiverProcessor.from_manifest(manifest, procs)
    three = BioPerceiverProcessor({m: fitted.processors[m] for m in [*USED, "omics_expression"]}).fit(manifest)
    three.save_pretrained(root / "three_processors")
    two = BioPerceiverProcessor({m: three.processors[m] for m in USED})
    torch.manual_seed(0)
    backbone = bp.create_model("bioperceiver_debug", modalities=two.model_modalities(embedders))
    backbone.save_pretrained(root / "backbone")
    two.save_pretrained(root / "backbone")
    return {
        "manifest": root / "raw" / "split.parquet",
        "settings": root / "settings.yaml",
        "backbone": root / "backbone",
        "three": root / "three_processors",
    }


def _argv(cohort, out: Path, *args: str, modalities: tuple[str, ...] = tuple(USED)) -> list[str]:
    return [
        "--manifest",
        str(cohort["manifest"]),
        "--processor_settings",
        str(cohort["settings"]),
        "--output_dir",
        str(out),
        "--task",
        "classification",
        "--label_column",
        "label_binary",
        *(["--modalities", *modalities] if modalities else []),
        "--do_train",
        "true",
        "--per_device_train_batch_size",
        "8",
        "--per_device_eval_batch_size",
        "16",
        "--max_steps",
        "2",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--n_bootstrap",
        "10",
        "--min_pattern_samples",
        "5",
        "--ablations",
        "false",
        "--uncertainty",
        "false",
        "--interpret",
        "false",
        "--use_cpu",
        "true",
        "--report_to",
        "none",
        "--seed",
        "0",
        *args,
    ]


@pytest.fixture
def no_work(monkeypatch):
    """Reading the manifest or fitting processors counts as work: the checks must fail before either."""

    def refuse(*_args, **_kwargs):
        raise WorkStarted

    monkeypatch.setattr(finetune_loop, "read_manifest", refuse)
    monkeypatch.setattr(BioPerceiverProcessor, "fit", refuse)


def test_model_and_processor_paths_are_named_before_any_work(cohort, tmp_path, no_work, capsys):
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    (empty / "final").mkdir()
    shutil.copy(cohort["backbone"] / "config.json", empty / "final" / "config.json")
    with refused(capsys, r"is a folder but holds no config.json: pass the `final/` folder") as err:
        run_finetune.main(_argv(cohort, tmp_path / "a", "--model_name_or_path", str(empty)))
    assert str(empty / "final") in str(err.value)  # the folder below that would do
    missing = tmp_path / "runs" / "pretrain" / "final"
    with refused(capsys, "does not exist locally") as err:
        run_finetune.main(_argv(cohort, tmp_path / "b", "--model_name_or_path", str(missing)))
    assert "network access" in str(err.value) and "repo id" not in str(err.value)
    with refused(capsys, r"does not exist locally.*network access"):  # hub-id shaped, offline
        run_finetune.main(_argv(cohort, tmp_path / "c", "--model_name_or_path", "someone/backbone"))
    # processors for a modality the model has no embedder for: both sets named, and what to pass instead
    with refused(capsys, r"omics_expression") as err:
        argv = ["--model_name_or_path", str(cohort["backbone"]), "--processor_dir", str(cohort["three"])]
        run_finetune.main(_argv(cohort, tmp_path / "d", *argv, modalities=()))
    message = str(err.value)
    assert str(sorted([*USED, "omics_expression"])) in message and str(sorted(USED)) in message
    assert "--processor_dir" in message and "--modalities" in message
    with refused(capsys, r"holds no bioperceiver_processor\.json"):
        run_finetune.main(_argv(cohort, tmp_path / "e", "--processor_dir", str(empty)))


def test_an_output_dir_holding_a_run_is_refused_before_any_work(cohort, tmp_path, no_work, capsys):
    for marker in ("all_results.json", "model.safetensors", "checkpoint-3"):
        out = tmp_path / marker.split(".")[0]
        out.mkdir()
        (out / marker).mkdir() if marker.startswith("checkpoint") else (out / marker).write_text("{}")
        with refused(capsys, r"already holds a finetuning run.*--resume_from_checkpoint.*--overwrite"):
            run_finetune.main(_argv(cohort, out))
    # never clear a folder this run reads from
    with refused(capsys, "would delete"):
        argv = _argv(cohort, cohort["backbone"], "--model_name_or_path", str(cohort["backbone"]))
        run_finetune.main([*argv, "--overwrite_output_dir", "true"])
    with refused(capsys, "holds no complete checkpoint"):
        run_finetune.main(_argv(cohort, tmp_path / "fresh", "--resume_from_checkpoint", "latest"))


def test_overwrite_clears_and_resume_checks_the_run_record(cohort, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / "all_results.json").write_text('{"from": "another run", "plots": ["odd_plot.png"]}')
    for written_by_a_run in ("checkpoint-9/trainer_state.json", "roc_pr.png", "odd_plot.png", "local_only/x.csv"):
        (out / written_by_a_run).parent.mkdir(exist_ok=True)
        (out / written_by_a_run).write_text("from the other run")
    (out / "notes.txt").write_text("the user's")  # not a run's: --overwrite_output_dir deleted them, now kept
    (out / "my_other_data").mkdir()
    (out / "my_other_data" / "table.csv").write_text("a,b\n")
    save = ("--save_strategy", "steps", "--save_steps", "2", "--lr_scheduler_type", "constant")
    with caplog.at_level(logging.WARNING, logger="bioperceiver.training.finetuning"):
        first = run_finetune.main(_argv(cohort, out, *save, "--overwrite_output_dir", "true"))
    assert np.isfinite(first["test"]["auroc"]) and "from" not in json.loads((out / "all_results.json").read_text())
    assert not (out / "checkpoint-9").exists() and not (out / "odd_plot.png").exists()
    assert not (out / "local_only" / "x.csv").exists()
    assert (out / "roc_pr.png").read_bytes() != b"from the other run"  # removed, then written by this run
    assert (out / "notes.txt").read_text() == "the user's" and (out / "my_other_data" / "table.csv").exists()
    assert "kept 2 entries of" in caplog.text and "my_other_data/, notes.txt" in caplog.text
    record = json.loads((out / RUN_RECORD).read_text())
    assert len(record["run_id"]) == 12 and len(record["arguments_hash"]) == 64
    assert json.loads((out / "checkpoint-2" / RUN_RECORD).read_text()) == record  # checkpoints carry it too
    # a changed argument that defines the run is named; resuming with the same ones continues the same run
    with refused(capsys, r"learning_rate: 5e-05 -> 0\.5") as err:
        run_finetune.main(_argv(cohort, out, *save, "--resume_from_checkpoint", "latest", "--learning_rate", "0.5"))
    assert record["run_id"] in str(err.value)
    (out / "checkpoint-4").mkdir()  # a crash while writing checkpoint-4: resuming continues from checkpoint-2
    (out / "checkpoint-4" / "config.json").write_text("{}")
    second = run_finetune.main(_argv(cohort, out, *save, "--resume_from_checkpoint", "latest", "--max_steps", "4"))
    assert second["train"]["epoch"] > first["train"]["epoch"]
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    resumed = json.loads((out / RUN_RECORD).read_text())
    assert resumed["run_id"] == record["run_id"] and resumed["arguments_hash"] == record["arguments_hash"]
    assert resumed["arguments"]["max_steps"] == 4
    # and without either flag the folder is refused
    with refused(capsys, "already holds a finetuning run"):
        run_finetune.main(_argv(cohort, out, *save))


def test_resume_record_check_is_exact_and_names_every_changed_key(tmp_path):
    args = {"learning_rate": 1e-3, "seed": 0, "num_train_epochs": 1, "head_type": "pooled"}
    record, clear = check_output_dir(tmp_path, args, resume=None, overwrite=False)
    assert not clear
    (tmp_path / RUN_RECORD).write_text(json.dumps(record))
    (tmp_path / "checkpoint-1").mkdir()
    (tmp_path / "checkpoint-1" / "trainer_state.json").write_text("{}")
    last = resolve_resume_checkpoint("latest", tmp_path)
    assert last == str(tmp_path / "checkpoint-1")
    again, _ = check_output_dir(tmp_path, {**args, "num_train_epochs": 5}, resume=last, overwrite=False)
    assert again["run_id"] == record["run_id"]
    with pytest.raises(ValueError, match=r"head_type: 'pooled' -> 'query', seed: 0 -> 1\."):
        check_output_dir(tmp_path, {**args, "seed": 1, "head_type": "query"}, resume=last, overwrite=False)
    with pytest.raises(ValueError, match="not a complete checkpoint folder"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-9"), tmp_path)


def test_resume_latest_passes_over_a_checkpoint_whose_writing_was_interrupted(tmp_path, caplog):
    """A run killed while the Trainer wrote checkpoint-12 leaves a folder holding only config.json (the Trainer
    writes trainer_state.json last): ``latest`` is the last complete checkpoint, never the partial one, and the
    partial one is named. transformers' own get_last_checkpoint returned checkpoint-12, which the Trainer then
    refused ("Can't find a valid checkpoint")."""
    for step in (6, 12):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "config.json").write_text("{}")
    (tmp_path / "checkpoint-6" / "trainer_state.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="bioperceiver.training.finetuning"):
        assert resolve_resume_checkpoint("latest", tmp_path) == str(tmp_path / "checkpoint-6")
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "checkpoint-12 incomplete (no trainer_state.json" in warning and "resuming from checkpoint-6" in warning
    assert (tmp_path / "checkpoint-12").is_dir()  # nothing is deleted: training writes it again
    with pytest.raises(ValueError, match="not a complete checkpoint folder"):  # passed explicitly: refused
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-12"), tmp_path)
    only_partial = tmp_path / "only_partial"
    (only_partial / "checkpoint-3").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"holds no complete checkpoint-\* folder to resume \(checkpoint-3 incomplete"):
        resolve_resume_checkpoint("latest", only_partial)


def _bad_manifest(cohort, tmp_path: Path, *, duplicate: bool) -> Path:
    manifest = read_manifest(cohort["manifest"])
    table = manifest.table.copy()
    notes = table.index[table["text_note"].notna()]
    table.loc[notes[0], "text_note"] = "   "  # an empty note: per-sample content
    if duplicate:
        table.loc[notes[2], "sample_id"] = table.loc[notes[1], "sample_id"]  # manifest-level
    # beside the cohort's manifest: relative file paths resolve against the manifest's folder
    path = cohort["manifest"].parent / f"{tmp_path.name}_{'dup' if duplicate else 'note'}.parquet"
    write_manifest(table, path, manifest.metadata)
    return path


def test_the_manifest_is_validated_before_any_work(cohort, tmp_path, monkeypatch, capsys):
    def refuse(*_args, **_kwargs):
        raise WorkStarted

    monkeypatch.setattr(BioPerceiverProcessor, "fit", refuse)
    dup = {**cohort, "manifest": _bad_manifest(cohort, tmp_path, duplicate=True)}
    with refused(capsys, "", ManifestError) as err:  # on_error=raise: every problem is blocking, all listed at once
        run_finetune.main(_argv(dup, tmp_path / "a", "--on_error", "raise"))
    assert set(err.value.report.counts()) == {"duplicate_id", "empty_text"}
    assert "duplicate_id=1" in str(err.value) and "empty_text=1" in str(err.value)
    for on_error in ("skip", "skip_sample", "skip_modality"):  # manifest-level problems stop every mode
        with refused(capsys, "duplicate_id=1", ManifestError) as err:
            run_finetune.main(_argv(dup, tmp_path / on_error, "--on_error", on_error))
        assert "empty_text" not in str(err.value)
    # per-sample content follows --on_error: the run goes on to fit processors
    note = {**cohort, "manifest": _bad_manifest(cohort, tmp_path, duplicate=False)}
    with refused(capsys, "empty_text=1", ManifestError):
        run_finetune.main(_argv(note, tmp_path / "b", "--on_error", "raise"))
    for i, on_error in enumerate((None, "skip_sample")):  # None: the default, skip_modality
        with pytest.raises(WorkStarted):
            run_finetune.main(_argv(note, tmp_path / f"c{i}", *(("--on_error", on_error) if on_error else ())))
    with pytest.raises(ValueError, match=r"--on_error 'ignore': choose one of .*skip_modality"):
        DataArguments(manifest="m", task="classification", on_error="ignore")
    with refused(capsys, r"--on_error 'ignore': choose one of", ValueError):  # on the command line: one line
        run_finetune.main(_argv(cohort, tmp_path / "d", "--on_error", "ignore"))


@pytest.mark.parametrize("head_type", ["pooled", "query"])
def test_readme_example_runs_with_both_head_types_from_a_pretrained_backbone(cohort, tmp_path, head_type):
    """The README's flags (LoRA, per-epoch evaluation and saving, best model at the end) on a saved backbone: the
    query head's learned query is initialised on this path too, so predictions and metrics are finite."""
    out = tmp_path / head_type
    argv = _argv(cohort, out, "--model_name_or_path", str(cohort["backbone"]), "--finetuning_mode", "lora")
    argv += ["--head_type", head_type, "--eval_strategy", "epoch", "--save_strategy", "epoch"]
    argv += ["--load_best_model_at_end", "true", "--metric_for_best_model", "auroc", "--num_train_epochs", "2"]
    argv += ["--max_steps", "-1", "--learning_rate", "1e-3"]
    results = run_finetune.main(argv)
    assert sorted(results["modalities"]) == sorted(USED)
    for section in ("validation", "test"):
        assert np.isfinite(results[section]["auroc"]) and 0 <= results[section]["auroc"] <= 1, section
    preds = pd.read_csv(predictions_path(out))
    probs = preds.filter(like="prob_").to_numpy()
    assert len(preds) == results["test"]["n"] and np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    kept = results["train"]["best_checkpoint"]  # which evaluation --load_best_model_at_end kept, recorded
    assert kept["metric"] == "eval_auroc" and kept["evaluations"] == 2 and kept["epoch"] in (1.0, 2.0)
    assert kept["value"] == pytest.approx(results["validation"]["auroc"], abs=1e-4) and kept["tied_evaluations"] >= 1
    assert "| checkpoint kept | epoch " in (out / "README.md").read_text()
    model = bp.BioPerceiverForSequenceClassification.from_pretrained(out)
    assert model.config.head_type == head_type
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_best_checkpoint_names_the_kept_evaluation_and_its_ties(caplog):
    """The Trainer keeps the first of tied bests: the record says which epoch that was and how many tied."""
    from types import SimpleNamespace

    from bioperceiver.cards import _kept_text
    from bioperceiver.training.finetune_loop import best_checkpoint

    history = [
        {"loss": 1.0, "step": 2, "epoch": 1.0},
        {"eval_c_index": 1.0, "step": 2, "epoch": 1.0},
        {"eval_c_index": 0.5, "step": 4, "epoch": 2.0},
        {"eval_c_index": 1.0, "step": 6, "epoch": 3.0},
    ]
    state = SimpleNamespace(
        best_model_checkpoint="out/checkpoint-2", best_global_step=2, best_metric=1.0, log_history=history
    )
    args = SimpleNamespace(load_best_model_at_end=True, metric_for_best_model="c_index")
    kept = best_checkpoint(state, args)
    assert kept == {
        "metric": "eval_c_index",
        "value": 1.0,
        "step": 2,
        "epoch": 1.0,
        "evaluations": 3,
        "tied_evaluations": 2,
        "ties": "first",
    }
    assert _kept_text(kept) == (
        "epoch 1, best validation c_index 1.0000 of 3 evaluations (1 other evaluation(s) tied; the earliest was kept, "
        "--best_model_ties first)"
    )
    assert "the latest was kept, --best_model_ties last" in _kept_text(best_checkpoint(state, args, "last"))
    assert "--best_model_ties" not in _kept_text({**kept, "tied_evaluations": 1})
    legacy = {k: v for k, v in kept.items() if k != "ties"}  # a record written before the rule was recorded
    assert _kept_text(legacy) == _kept_text(kept)
    assert best_checkpoint(state, SimpleNamespace(load_best_model_at_end=False, metric_for_best_model="x")) is None
    from bioperceiver.training.finetune_loop import log_kept_checkpoint

    with caplog.at_level(logging.INFO, logger="run_finetune"):
        log_kept_checkpoint(kept)
        log_kept_checkpoint({**kept, "tied_evaluations": 1})
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "1 other evaluations tied with it and the earliest was kept" in warned[0].getMessage()
    assert "--best_model_ties first|last|loss" in warned[0].getMessage()
    assert "--load_best_model_at_end false" in warned[0].getMessage()
    assert best_checkpoint(SimpleNamespace(best_model_checkpoint=None), args) is None
    older = SimpleNamespace(best_model_checkpoint="out/checkpoint-2", best_metric=1.0, log_history=history)
    assert best_checkpoint(older, args) == kept  # a state without best_global_step: read from the folder name


@pytest.mark.parametrize("ties", ["first", "last", "loss"])
def test_best_model_ties_choose_among_tied_evaluations_through_the_trainer(tmp_path, ties):
    """Every evaluation ties on the metric (a constant): transformers keeps the first; ``last`` keeps the final
    epoch; ``loss`` the epoch with the lowest logged validation loss (the earliest of equal ones). Through
    ``Trainer.train`` with ``load_best_model_at_end``, so a renamed transformers hook would fail here; the loaded
    weights are those of the chosen checkpoint."""
    from transformers import TrainingArguments

    from bioperceiver.training.finetune_loop import best_checkpoint
    from bioperceiver.training.tasks import TaskTrainer

    class Regressor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 1)

        def forward(self, x, labels=None):
            out = self.linear(x).squeeze(-1)
            return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}

    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(32, generator=g)
    rows = [{"x": x[i], "labels": y[i]} for i in range(32)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model="const",
        num_train_epochs=4,
        per_device_train_batch_size=8,
        learning_rate=0.3,
        use_cpu=True,
        report_to=[],
        seed=0,
    )
    torch.manual_seed(0)
    trainer = TaskTrainer(
        model=Regressor(),
        args=args,
        train_dataset=rows[:24],
        eval_dataset=rows[24:],
        compute_metrics=lambda pred: {"const": 1.0},
        best_model_ties=ties,
    )
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_const" in h]
    assert len(evals) == 4
    losses = [h["eval_loss"] for h in evals]
    want = {"first": 0, "last": 3, "loss": losses.index(min(losses))}[ties]
    kept = best_checkpoint(trainer.state, args, ties)
    assert kept["step"] == evals[want]["step"] and kept["tied_evaluations"] == 4 and kept["ties"] == ties
    if ties == "loss":
        assert len(set(losses)) > 1  # the losses really differ, so the choice was made on them
    # the model at the end is the kept checkpoint's: its validation loss is the kept evaluation's
    assert trainer.evaluate()["eval_loss"] == pytest.approx(evals[want]["eval_loss"], rel=1e-6)


def test_best_model_ties_is_checked():
    with pytest.raises(ValueError, match=r"--best_model_ties 'middle': choose one of \('first', 'last', 'loss'\)"):
        DataArguments(manifest="m", task="survival", best_model_ties="middle")


def test_predict_ensemble_names_bad_model_dirs(cohort, tmp_path):
    ensemble = load_script("finetune/predict_ensemble.py")
    out = str(tmp_path / "ens")
    with pytest.raises(ValueError, match="does not exist locally"):
        ensemble.main(["--model_dirs", str(tmp_path / "runs" / "s0"), "--output_dir", out])
    with pytest.raises(ValueError, match=r"is a folder but holds no config\.json"):
        ensemble.main(["--model_dirs", str(tmp_path), "--output_dir", out])
    with pytest.raises(ValueError, match=r"not a run_finetune.py output folder \(no finetuning_task.json\)"):
        ensemble.main(["--model_dirs", str(cohort["backbone"]), "--output_dir", out])


def _relabelled(cohort, tmp_path: Path, name: str, column: str, values: dict[int, object], text: bool = False) -> dict:
    """The cohort with ``column`` changed in the rows ``{position among the split's rows: value}`` of the training
    split (``text``: the column written as text, as a CSV export with a word in it reads)."""
    manifest = read_manifest(cohort["manifest"])
    table = manifest.table.copy()
    train = table.index[table["split"] == "train"]
    if text:
        table[column] = table[column].map(lambda v: None if pd.isna(v) else str(v))
    for position, value in values.items():
        table.loc[train[position], column] = value
    path = cohort["manifest"].parent / f"{tmp_path.name}_{name}.parquet"
    write_manifest(table, path, manifest.metadata)
    return {**cohort, "manifest": path, "bad_ids": [table.loc[train[p], "sample_id"] for p in values]}


def _task_argv(cohort, out: Path, task: str, *args: str) -> list[str]:
    argv = _argv(cohort, out, *args)
    at = argv.index("--task")
    columns = {
        "regression": ["--label_column", "label_regression"],
        "survival": ["--time_column", "label_survival_time", "--event_column", "label_survival_event"],
    }[task]
    return [*argv[:at], "--task", task, *columns, *argv[at + 4 :]]


@pytest.mark.parametrize(
    ("task", "column", "value", "reason"),
    [
        ("regression", "label_regression", float("inf"), "non_finite_label"),
        ("regression", "label_regression", "poorly differentiated", "bad_label"),
        ("survival", "label_survival_time", "abc", "bad_label"),
    ],
)
def test_an_unusable_training_label_is_named_or_skipped_when_asked(
    cohort, tmp_path, caplog, capsys, task, column, value, reason
):
    """An inf or a word in a numeric label column: by default an error naming the sample, the column and the fix
    before training (it trained on the inf and died at evaluation with "predictions contains NaN", or gave a bare
    "could not convert string to float"); with --on_error skip_sample a counted, logged skip, and the run trains on
    the other rows only."""
    data = _relabelled(cohort, tmp_path, reason, column, {0: value}, text=isinstance(value, str))
    bad = data["bad_ids"][0]
    with refused(capsys, rf"sample '{bad}', modality '{column}'.*--on_error skip_sample", DataError) as err:
        run_finetune.main(_task_argv(data, tmp_path / "default", task))
    assert err.value.reason == reason
    with caplog.at_level(logging.INFO, logger="run_finetune"):
        results = run_finetune.main(_task_argv(data, tmp_path / "skip", task, "--on_error", "skip_sample"))
    assert results["label_rows_left_out"]["train"]["bad_label"] == {reason: {"rows": 1, "examples": [bad]}}
    train_rows = int(results["split_sizes"]["train"].split()[0])
    assert train_rows == (read_manifest(data["manifest"]).table["split"] == "train").sum() - 1
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"train: 1 of {train_rows + 1} rows with an unusable ['{column}'" in logged and bad in logged
    metric = "rmse" if task == "regression" else "c_index"
    assert np.isfinite(results["test"][metric])
    saved = json.loads((tmp_path / "skip" / "all_results.json").read_text())
    assert saved["label_rows_left_out"]["train"]["bad_label"][reason]["rows"] == 1


def test_rows_without_a_label_are_counted_in_every_split(cohort, tmp_path, caplog, monkeypatch):
    """A NaN label in the training split was dropped silently (only the validation/test splits said so)."""
    data = _relabelled(cohort, tmp_path, "nan", "label_regression", {0: None, 3: None})
    monkeypatch.setattr(finetune_loop, "build_datasets", _stop)  # the count is known before any data processing
    with caplog.at_level(logging.INFO, logger="run_finetune"), pytest.raises(WorkStarted):
        run_finetune.main(_task_argv(data, tmp_path / "out", "regression"))
    n_train = (read_manifest(data["manifest"]).table["split"] == "train").sum()
    assert f"train: 2 of {n_train} rows have no ['label_regression'] label and are left out" in caplog.text


def _stop(*_args, **_kwargs):
    raise WorkStarted


def _without_do_train(argv: list[str]) -> list[str]:
    at = argv.index("--do_train")
    return argv[:at] + argv[at + 2 :]


def test_without_do_train_a_backbone_or_random_model_is_refused_before_any_work(cohort, tmp_path, no_work, capsys):
    """transformers' --do_train defaults to false: the run evaluated and saved a random head on the backbone as a
    finished finetune ("Finetuning (classification) finished: test auroc 0.4853"), which `bioperceiver predict`
    then accepted."""
    backbone = ("--model_name_or_path", str(cohort["backbone"]))
    for i, extra in enumerate((backbone, ("--model_name_or_path", "none"), ())):
        with refused(capsys, r"--do_train is not set.*Pass --do_train true to finetune") as err:
            run_finetune.main(_without_do_train(_argv(cohort, tmp_path / f"o{i}", *extra)))
        assert "give a finetuned folder" in str(err.value)
        assert not (tmp_path / f"o{i}").exists()  # nothing written
    with refused(capsys, "--resume_from_checkpoint latest without --do_train"):
        run_finetune.main(_without_do_train(_argv(cohort, tmp_path / "r", "--resume_from_checkpoint", "latest")))


def test_without_do_train_a_finetuned_folder_is_evaluated_as_it_is(cohort, tmp_path):
    """Evaluation only (no --do_train) of a run_finetune.py output folder: its trained head is used, so the test
    metrics are the finetuned run's own, and the saved weights are unchanged."""
    from safetensors.torch import load_file

    backbone = ("--model_name_or_path", str(cohort["backbone"]), "--learning_rate", "1e-2")
    first = run_finetune.main(_argv(cohort, tmp_path / "ft", *backbone))
    again = run_finetune.main(
        _without_do_train(_argv(cohort, tmp_path / "eval", "--model_name_or_path", str(tmp_path / "ft")))
    )
    assert "train" not in again
    assert again["test"]["auroc"] == pytest.approx(first["test"]["auroc"], abs=1e-6)
    trained, evaluated = (
        load_file(tmp_path / "ft" / "model.safetensors"),
        load_file(tmp_path / "eval" / "model.safetensors"),
    )
    assert trained.keys() == evaluated.keys()
    assert all(torch.equal(trained[k], evaluated[k]) for k in trained)


def test_evaluating_a_finetuned_folder_uses_its_own_label_encoding_and_refuses_another_head(cohort, tmp_path, capsys):
    """Evaluation only, on a manifest whose training labels differ (every one shifted by 100): the predictions are
    decoded with the scaling the model was trained with (it was refitted on this manifest's training rows, which
    moved every prediction by about 100), and head arguments that do not match the folder's head are refused (its
    trained head would have been replaced by a random one)."""
    backbone = ("--model_name_or_path", str(cohort["backbone"]), "--learning_rate", "1e-2")

    def regression(argv):
        argv[argv.index("--task") + 1] = "regression"
        argv[argv.index("--label_column") + 1] = "label_regression"
        return argv

    first = run_finetune.main(regression(_argv(cohort, tmp_path / "ft", *backbone)))
    m = read_manifest(cohort["manifest"])
    table = m.table.copy()
    train = table["split"] == "train"
    table.loc[train, "label_regression"] = table.loc[train, "label_regression"] + 100.0
    write_manifest(table, tmp_path / "shifted.parquet", m.metadata)
    argv = regression(_argv(cohort, tmp_path / "eval", "--model_name_or_path", str(tmp_path / "ft")))
    argv[argv.index("--manifest") + 1] = str(tmp_path / "shifted.parquet")
    again = run_finetune.main(_without_do_train(argv))
    assert again["test"]["rmse"] == pytest.approx(first["test"]["rmse"], rel=1e-5)
    with refused(capsys, r"head.*finetuned with|--head_type"):
        run_finetune.main([*_without_do_train(argv[:]), "--head_type", "query", "--output_dir", str(tmp_path / "q")])


def test_refusals_are_one_error_line_with_exit_status_2(cohort, tmp_path, capsys, monkeypatch):
    """Every refusal printed a Python traceback; now one ``run_finetune.py: error:`` line (the message names what to
    pass instead) and exit status 2, as run_pretrain.py and argparse do. A bug (any other exception) keeps its
    traceback."""
    monkeypatch.setattr(BioPerceiverProcessor, "fit", _stop)  # every refusal comes before the processors are fitted
    with refused(capsys, r"--manifest .*nope\.parquet does not exist") as err:
        run_finetune.main([*_argv(cohort, tmp_path / "a"), "--manifest", str(tmp_path / "nope.parquet")])
    assert err.stderr.count("\n") == 1 and "Traceback" not in err.stderr
    argv = _argv(cohort, tmp_path / "b")
    argv[argv.index("--label_column") + 1] = "label_nope"
    with refused(capsys, r"label column 'label_nope' is not in the manifest; label columns: \[.*'label_binary'"):
        run_finetune.main(argv)
    monkeypatch.setattr(finetune_loop, "read_manifest", _stop)  # a mistyped task: before the manifest is read
    argv = _argv(cohort, tmp_path / "c")
    argv[argv.index("--task") + 1] = "clasification"
    with refused(capsys, r"task 'clasification'; choose one of \[.*'classification'"):
        run_finetune.main(argv)
    assert not any((tmp_path / d).exists() for d in "abc")  # nothing written


def test_a_bug_keeps_its_traceback(cohort, tmp_path, monkeypatch):
    def broken(*_args, **_kwargs):
        raise ValueError("a bug, not the user's input")

    monkeypatch.setattr(finetune_loop, "build_datasets", broken)
    with pytest.raises(ValueError, match="a bug, not the user's input"):
        run_finetune.main(_argv(cohort, tmp_path / "out"))


@pytest.mark.parametrize("flag", [(), ("--overwrite_output_dir", "true"), ("--resume_from_checkpoint", "latest")])
def test_a_pretraining_run_folder_is_never_a_finetuning_output_dir(cohort, tmp_path, capsys, no_work, flag):
    """A pretrain/run_pretrain.py output folder (checkpoints/, final/, history.json) was accepted as --output_dir and
    written beside, even with --overwrite_output_dir while its final/ was the model being finetuned."""
    pre = tmp_path / "pretrain"
    shutil.copytree(cohort["backbone"], pre / "final")
    (pre / "checkpoints" / "checkpoint-10").mkdir(parents=True)
    (pre / "history.json").write_text("[]")
    before = sorted(str(p.relative_to(pre)) for p in pre.rglob("*"))
    argv = _argv(cohort, pre, "--model_name_or_path", str(pre / "final"), *flag)
    with refused(
        capsys, r"holds a pretraining run of pretrain/run_pretrain.py \(checkpoints/, final/, history.json\)"
    ) as err:
        run_finetune.main(argv)
    assert f"Pass a new --output_dir (e.g. {tmp_path / 'pretrain_finetuned'})" in err.stderr
    assert sorted(str(p.relative_to(pre)) for p in pre.rglob("*")) == before  # nothing written or removed


def _notes_emptied(cohort, tmp_path: Path, name: str, rows: dict[str, list[int] | str]) -> dict:
    """The cohort with ``text_note`` blanked (an ``empty_text`` error, dropped under skip_modality) in the given rows
    of each split (positions among its rows, or ``"all"``)."""
    manifest = read_manifest(cohort["manifest"])
    table = manifest.table.copy()
    blanked = {}
    for split, positions in rows.items():
        index = table.index[(table["split"] == split) & table["text_note"].notna()]
        index = index if positions == "all" else index[positions]
        table.loc[index, "text_note"] = "   "
        blanked[split] = list(table.loc[index, "sample_id"])
    path = cohort["manifest"].parent / f"{tmp_path.name}_{name}.parquet"
    write_manifest(table, path, manifest.metadata)
    return {**cohort, "manifest": path, "blanked": blanked}


def test_dropped_modality_values_are_summarised_per_split(cohort, tmp_path, caplog):
    """Values dropped under the default --on_error skip_modality were never summarised: now counted per split and
    modality with the first sample ids, logged and in all_results.json."""
    data = _notes_emptied(cohort, tmp_path, "some", {"train": [0, 2], "test": [1]})
    with caplog.at_level(logging.WARNING, logger="run_finetune"):
        results = run_finetune.main(_argv(data, tmp_path / "out"))
    table = read_manifest(data["manifest"]).table
    notes = {s: int(((table["split"] == s) & table["text_note"].notna()).sum()) for s in ("train", "test")}
    dropped = results["dropped_modality_values"]
    assert dropped["train"] == {
        "text_note": {
            "values": notes["train"],
            "dropped": 2,
            "reasons": {"empty_text": 2},
            "examples": data["blanked"]["train"],
        }
    }
    assert (
        dropped["test"]["text_note"]["dropped"] == 1
        and dropped["test"]["text_note"]["examples"] == data["blanked"]["test"]
    )
    assert "validation" not in dropped and "tabular_ehr" not in dropped["train"]
    assert json.loads((tmp_path / "out" / "all_results.json").read_text())["dropped_modality_values"] == dropped
    assert f"train: dropped 2 of {notes['train']} 'text_note' value(s) (empty_text 2; e.g. samples " in caplog.text
    card = (tmp_path / "out" / "README.md").read_text()  # beside its presence tables, which count manifest cells
    assert f"train: 2 of {notes['train']} text_note (empty_text 2)" in card
    # checked in 2 dataloader workers (--dataloader_num_workers): the same summary
    workers = run_finetune.main([*_argv(data, tmp_path / "workers"), "--dataloader_num_workers", "2"])
    assert workers["dropped_modality_values"] == dropped
    clean = run_finetune.main(_argv(cohort, tmp_path / "clean"))
    assert clean["dropped_modality_values"] == {}
    assert "modality values dropped" not in (tmp_path / "clean" / "README.md").read_text()


def test_dropped_values_are_checked_once_across_processes(cohort, tmp_path, monkeypatch):
    """In a multi-process run each process checks every world-th row and the findings are gathered (before, every
    process processed every row again: a full decoding pass per process on an image cohort). Threads stand in for
    the processes and a barrier for ``all_gather_object``: with 2 and 3 of them each gets the one-process summary,
    examples in the same order, and every row is processed once in all."""
    data = _notes_emptied(cohort, tmp_path, "shared", {"train": [0, 1, 3, 4], "test": [1]})
    captured = {}
    real = finetune_loop.dropped_modality_values

    def spy(*args, **kwargs):
        captured.update(args=args, kwargs=kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(finetune_loop, "dropped_modality_values", spy)
    whole = run_finetune.main(_argv(data, tmp_path / "out"))["dropped_modality_values"]
    assert whole["train"]["text_note"]["dropped"] == 4 and whole["test"]["text_note"]["dropped"] == 1
    assert whole["train"]["text_note"]["examples"] == data["blanked"]["train"][:3]

    calls, lock = Counter(), threading.Lock()
    checked = finetune_loop._DroppedValues.__getitem__

    def counted(self, i):
        with lock:
            calls[threading.current_thread().name] += 1
        return checked(self, i)

    monkeypatch.setattr(finetune_loop._DroppedValues, "__getitem__", counted)
    args, kwargs = captured["args"], {**captured["kwargs"], "num_workers": 0, "progress": False}
    alone = real(*args, **kwargs)
    assert alone == whole
    one = calls.pop("MainThread")
    assert one == len(cohort_rows(data, "train"))  # the validation and test rows were processed already
    for world in (2, 3):
        results = _as_processes(
            world, lambda rank, gather, w=world: real(*args, **kwargs, share=(rank, w), gather=gather)
        )
        assert results == [whole] * world
        assert sum(calls.values()) == one and max(calls.values()) <= -(-one // world)
        calls.clear()


def _as_processes(world: int, fn) -> list:
    """``fn(rank, gather)`` in ``world`` threads named ``rank<r>``, standing in for processes; ``gather(obj)``: every
    thread's obj in rank order (a barrier, like ``all_gather_object``). The results in rank order."""
    barrier, slots, results = threading.Barrier(world, timeout=60), [None] * world, [None] * world

    def gather(obj, rank):
        slots[rank] = obj
        barrier.wait()
        out = list(slots)
        barrier.wait()  # nobody writes the next gather's slot before every thread has read this one
        return out

    def run(rank):
        results[rank] = fn(rank, lambda obj: gather(obj, rank))

    threads = [threading.Thread(target=run, args=(r,), name=f"rank{r}") for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _gather_worker(rank, world, port, queue):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        share = distributed_world()
        queue.put((rank, share, finetune_loop._all_gather_objects([(rank, f"found by {rank}")])))
        dist.barrier()
    except Exception as e:  # reported at once instead of waiting on the queue
        queue.put((rank, repr(e), None))
        raise
    finally:
        dist.destroy_process_group()


def test_the_default_share_and_gather_are_the_process_groups():
    """What ``dropped_modality_values`` uses when a launcher started the processes (2 gloo processes): each its
    ``(rank, world)`` and every process's findings in rank order; ``(0, 1)`` without a process group."""
    import torch.multiprocessing as mp

    assert distributed_world() == (0, 1)
    port = free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gather_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = {rank: (share, gathered) for rank, share, gathered in (queue.get(timeout=180) for _ in procs)}
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    expected = [[(0, "found by 0")], [(1, "found by 1")]]
    assert got == {0: ((0, 2), expected), 1: ((1, 2), expected)}
    assert all(p.exitcode == 0 for p in procs)


def cohort_rows(data, split: str) -> list[str]:
    table = read_manifest(data["manifest"]).table
    return list(table.loc[table["split"] == split, "sample_id"])


def test_a_modality_that_loses_every_training_value_is_refused(cohort, tmp_path, capsys):
    """With a pretrained model's processors nothing is fitted, so only this check sees that the training rows hold no
    usable note (processors fitted here refuse it themselves: no value to fit on)."""
    data = _notes_emptied(cohort, tmp_path, "all", {"train": "all"})
    argv = _argv(data, tmp_path / "out", "--model_name_or_path", str(cohort["backbone"]))
    with refused(capsys, r"every training value of 'text_note' was dropped.*--modalities tabular_ehr") as err:
        run_finetune.main(argv)
    assert "empty_text" in str(err.value) and not (tmp_path / "out" / "model.safetensors").exists()
    with refused(capsys, r"modality 'text_note': no readable value to fit on", DataError):
        run_finetune.main(_argv(data, tmp_path / "fitted"))
