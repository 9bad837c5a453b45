"""finetune/run_finetune.py end to end through a patched argv on small real subsets of the demo cohort, one run per
task type (binary, multiclass, multilabel, regression, survival), plus argument files, resume and round trips."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from finetune_refusals import refused
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from script_loader import load_script
from transformers import AutoModelForSequenceClassification

import bioperceiver as bp
from bioperceiver.data import BioPerceiverProcessor, assign_splits, read_manifest, write_manifest
from bioperceiver.data.processing import load_processor_settings
from bioperceiver.evaluation.report import predictions_path
from bioperceiver.training import FINETUNING_MODES

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("SurvSet", reason="the demo cohort needs the demo-data packages (make setup)")
pytest.importorskip("data_store", reason="the demo cohort needs the demo-data packages (make setup)")


def _load_script():
    return load_script("finetune/run_finetune.py")


run_finetune = _load_script()

CARD_SECTIONS = [
    "## Model and modalities",
    "## Data provenance and licence per modality",
    "## Training data: modality presence and missingness",
    "## Training configuration",
    "## Evaluation",
    "### Results per missing-modality pattern",
    "### Modality ablation",
    "### Uncertainty and calibration",
    "## Intended use",
    "## Out-of-scope use",
    "## Bias, risks and limitations",
    "## Compute used",
]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """The demo cohort (real packaged data) with patient-level splits, plus derived SurvSet label columns (tumour
    grade as a multiclass target, age as a regression target) so every task type runs on real rows."""
    from bioperceiver.data.recipes.demo import build_demo_cohort

    out = tmp_path_factory.mktemp("cohort")
    build_demo_cohort(out, seed=0)
    manifest = assign_splits(read_manifest(out / "manifest.parquet"))
    table = manifest.table.copy()
    clinical = table["tabular_clinical"].map(lambda v: json.loads(v) if isinstance(v, str) else None)
    table["label_grade"] = clinical.map(
        lambda c: None if not c or c.get("grade") is None else str(int(float(c["grade"])))
    )
    table["label_age"] = clinical.map(lambda c: None if not c or c.get("age") is None else float(c["age"]))
    write_manifest(table, out / "labelled.parquet", manifest.metadata)
    return out / "labelled.parquet"


def _run(cohort: Path, out: Path, *args: str, monkeypatch=None) -> dict:
    argv = [
        "--manifest",
        str(cohort),
        "--output_dir",
        str(out),
        "--processor_settings",
        "tokenizers/demo_processors.yaml",
        "--do_train",
        "true",
        "--per_device_train_batch_size",
        "16",
        "--per_device_eval_batch_size",
        "32",
        "--eval_strategy",
        "epoch",
        "--save_strategy",
        "epoch",
        "--logging_steps",
        "5",
        "--n_bootstrap",
        "30",
        "--min_pattern_samples",
        "5",
        "--use_cpu",
        "true",
        "--report_to",
        "none",
        "--seed",
        "0",
        *args,
    ]
    if monkeypatch is not None:  # the script as a user runs it: `python finetune/run_finetune.py ...`
        monkeypatch.setattr(sys, "argv", ["run_finetune.py", *argv])
        return run_finetune.main()
    return run_finetune.main(argv)


def _check_outputs(out: Path, results: dict, metric: str) -> pd.DataFrame:
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["task"] == results["task"]
    test = saved["test"]
    assert np.isfinite(test[metric])
    assert test[f"{metric}_ci_low"] <= test[metric] <= test[f"{metric}_ci_high"]
    assert test["n_resamples"] == 30 and test["n_groups"] <= test["n"]
    preds = pd.read_csv(predictions_path(out))
    assert len(preds) == test["n"]
    assert preds["sample_id"].is_unique
    assert (out / "results_by_pattern.csv").exists()
    for name in ("config.json", "model.safetensors", "bioperceiver_processor.json", "finetuning_task.json"):
        assert (out / name).exists(), name
    card = ModelCard.load(out / "README.md")
    for section in CARD_SECTIONS:
        assert section in card.text, f"card lacks {section!r}"
    assert card.data.license == "other"
    assert "{{" not in card.text and "}}" not in card.text
    for plot in saved["test"].get("plots", []) + saved.get("plots", []):
        assert (out / plot).exists()
    return preds


REFERENCE = json.loads((ROOT / "tests" / "data" / "finetune_reference.json").read_text())


def _same_as_before(name: str, results: dict) -> None:
    """The run reproduces the validation/test metrics (with CIs) and uncertainty numbers recorded before tasks
    became objects (same seed, same data): the refactor changed no numerics."""
    for section, expected in REFERENCE[name].items():
        got = results[section]
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), f"{name} {section}.{key}"


def _reload_and_predict(out: Path, cls, modalities: list[str]) -> np.ndarray:
    """The saved folder alone (model + processors + task spec) reproduces the test predictions."""
    from bioperceiver.tasks import Task
    from bioperceiver.training.tasks import ProcessedDataset, labelled_records, predict

    model = cls.from_pretrained(out).eval()
    processor = BioPerceiverProcessor.from_pretrained(out)
    spec = Task.load(out)
    manifest = read_manifest(json.loads((out / "all_results.json").read_text())["manifest"])
    records, targets = labelled_records(manifest.split("test").records(), spec, "test")
    ds = ProcessedDataset(records, targets, processor, base_dir=manifest.base_dir, modalities=modalities)
    pred, _ = predict(model, ds, {m: processor.modalities[m] for m in modalities})
    return pred


def test_survival_cox_end_to_end_with_ablation_card_and_round_trip(cohort, tmp_path, monkeypatch):
    out = tmp_path / "surv"
    results = _run(
        cohort,
        out,
        "--task",
        "survival",
        "--modalities",
        "omics_expression",
        "tabular_clinical",
        "--num_train_epochs",
        "1",
        "--learning_rate",
        "1e-3",
        monkeypatch=monkeypatch,
    )
    preds = _check_outputs(out, results, "c_index")
    _same_as_before("surv", results)
    assert {"label_survival_time", "label_survival_event", "risk", "mc_mean", "mc_std"} <= set(preds.columns)
    assert (preds["mc_std"] > 0).all()  # dropout is active in the MC passes
    # modality Shapley values per test sample: they add up to the predicted risk minus the empty-set baseline
    empty = results["interpretation"]["empty_value"]
    shap = preds["shapley_omics_expression"] + preds["shapley_tabular_clinical"]
    np.testing.assert_allclose(shap + empty, preds["risk"], rtol=1e-4, atol=1e-4)
    assert len(list((out / "explanations").glob("*.png"))) == 9  # 3 patients x (2 modalities + Shapley bars)
    faith = pd.DataFrame(results["interpretation"]["deletion_test"])
    assert list(faith["k"]) == [1, 5, 10] and faith["drop_random"].notna().all()
    ablation = pd.read_csv(out / "ablation.csv")
    assert set(ablation["condition"]) == {
        "all modalities",
        "without omics_expression",
        "omics_expression alone",
        "without tabular_clinical",
        "tabular_clinical alone",
    }
    assert (out / "km_by_risk_group.png").exists() and (out / "ablation.png").exists()
    card = (out / "README.md").read_text()
    assert "c_index" in card and "survset_gse1992" in card and "padchest" not in card  # only what it was trained on
    reloaded = _reload_and_predict(out, bp.AutoModelForSurvival, ["omics_expression", "tabular_clinical"])
    np.testing.assert_allclose(reloaded[:, 0], preds["risk"].to_numpy(), rtol=1e-4, atol=1e-5)


def test_survival_wide_and_deep_on_a_pretrained_backbone_then_reloaded_for_a_linear_probe(cohort, tmp_path, capsys):
    """--head_linear_modalities: the clinical covariates' linear term is fitted (penalty on validation) before
    finetuning a pretrained backbone; the finetuned folder reloads with it, and finetuning that folder again in
    linear-probe mode keeps and trains it (latents are then not cached: the term reads the tabular inputs)."""
    manifest = read_manifest(cohort)
    settings, embedders = load_processor_settings(ROOT / "tokenizers" / "demo_processors.yaml")
    mods = ("omics_expression", "tabular_clinical")
    proc = BioPerceiverProcessor.from_manifest(manifest, settings)
    proc = BioPerceiverProcessor({m: proc.processors[m] for m in mods}).fit(manifest)
    torch.manual_seed(0)
    pre = tmp_path / "pretrained"
    bp.create_model("bioperceiver_debug", modalities=proc.model_modalities(embedders)).save_pretrained(pre)
    proc.save_pretrained(pre)
    quick = ("--max_steps", "3", "--eval_strategy", "no", "--save_strategy", "no", "--interpret", "false")
    out = tmp_path / "wide"
    results = _run(
        cohort,
        out,
        "--task",
        "survival",
        "--modalities",
        *mods,
        "--model_name_or_path",
        str(pre),
        "--head_linear_modalities",
        "tabular_clinical",
        "omics_expression",
        "--head_linear_l2",
        "0.1",
        "10",
        "--head_linear_l2_per_modality",
        "true",
        *quick[:-2],  # with explanations: they must see the linear term too
    )
    fit = results["linear_term"]
    assert fit["modalities"] == list(mods) and fit["per_modality"]
    assert set(fit["l2"]) == set(mods) and set(fit["l2"].values()) <= {0.1, 10.0}
    assert len(fit["validation"]) == 4 and all(np.isfinite(v) for v in fit["validation"].values())
    assert fit["selected_on"] == "validation c_index" and fit["nonzero_coefficient_rows"] > 0
    # the fitted term alone, scored on validation (its choice) and test (reported only)
    assert set(fit["term_alone"]) == {"validation", "test"} and fit["metric"] == "c_index"
    assert fit["term_alone"]["validation"] == pytest.approx(max(fit["validation"].values()))
    l2 = fit["l2"]
    assert (
        "a linear term on omics_expression, tabular_clinical (fitted before finetuning, ridge penalties "
        f"omics_expression {l2['omics_expression']:g}, tabular_clinical {l2['tabular_clinical']:g} chosen on "
        f"validation c_index; the fitted term alone, c_index: validation {fit['term_alone']['validation']:.3f}, "
        f"test {fit['term_alone']['test']:.3f})" in (out / "README.md").read_text()
    )
    # a local base is named by folder and weights hash in the published card, never by its path
    card = (out / "README.md").read_text()
    digest = hashlib.sha256((pre / "model.safetensors").read_bytes()).hexdigest()[:16]
    assert f"| base model | a local folder `pretrained` (model.safetensors sha256 {digest}…) |" in card
    assert str(tmp_path) not in card
    model = bp.AutoModelForSurvival.from_pretrained(out)
    assert model.config.head_linear_modalities == list(mods)
    assert float(model.linear_term.numeric["tabular_clinical"].detach().abs().sum()) > 0
    preds = pd.read_csv(predictions_path(out))
    reloaded = _reload_and_predict(out, bp.AutoModelForSurvival, list(mods))
    np.testing.assert_allclose(reloaded[:, 0], preds["risk"].to_numpy(), rtol=1e-4, atol=1e-5)
    # modality Shapley values add up to the risk: removing the clinical modality removes its linear term too
    shap = preds["shapley_omics_expression"] + preds["shapley_tabular_clinical"]
    empty = results["interpretation"]["empty_value"]
    np.testing.assert_allclose(shap + empty, preds["risk"], rtol=1e-4, atol=1e-4)
    # the finetuned folder again, as a linear probe: no flag needed, the term stays and is refitted then trained
    probe = _run(
        cohort,
        tmp_path / "probe",
        "--task",
        "survival",
        "--modalities",
        *mods,
        "--model_name_or_path",
        str(out),
        "--finetuning_mode",
        "linear_probe",
        "--learning_rate",
        "1e-2",
        *quick,
    )
    assert probe["linear_term"]["modalities"] == list(mods) and not probe["linear_term"]["per_modality"]
    before, after = load_file(out / "model.safetensors"), load_file(tmp_path / "probe" / "model.safetensors")
    assert not torch.equal(
        before["linear_term.numeric.tabular_clinical"], after["linear_term.numeric.tabular_clinical"]
    )
    assert torch.equal(
        before["bioperceiver.encoder.norm.weight"], after["bioperceiver.encoder.norm.weight"]
    )  # the backbone frozen
    # differential privacy: a linear term fitted outside DP-SGD is refused before any work
    with refused(capsys, "head_linear_fit false"):
        _run(
            cohort,
            tmp_path / "dp",
            "--task",
            "survival",
            "--survival_loss",
            "discrete",
            "--modalities",
            *mods,
            "--head_linear_modalities",
            "tabular_clinical",
            "--dp_noise_multiplier",
            "1.0",
            *quick,
        )
    assert not (tmp_path / "dp").exists()


def test_multilabel_linear_probe_on_a_pretrained_backbone_keeps_it_frozen(cohort, tmp_path):
    # a "pretrained" backbone folder as run_pretrain.py writes it: backbone + fitted processors
    manifest = read_manifest(cohort)
    settings, embedders = load_processor_settings(ROOT / "tokenizers" / "demo_processors.yaml")
    proc = BioPerceiverProcessor.from_manifest(manifest, settings)
    proc = BioPerceiverProcessor({m: proc.processors[m] for m in ("text_report", "tabular_study")}).fit(manifest)
    torch.manual_seed(0)  # the backbone's random init must not depend on which tests ran before this one
    backbone = bp.create_model("bioperceiver_debug", modalities=proc.model_modalities(embedders))
    pre = tmp_path / "pretrained"
    backbone.save_pretrained(pre)
    proc.save_pretrained(pre)

    out = tmp_path / "findings"
    results = _run(
        cohort,
        out,
        "--task",
        "multilabel",
        "--label_column",
        "label_findings",
        "--top_k_labels",
        "4",
        "--model_name_or_path",
        str(pre),
        "--finetuning_mode",
        "linear_probe",
        "--num_train_epochs",
        "2",
        "--learning_rate",
        "3e-3",
    )
    preds = _check_outputs(out, results, "auroc")
    _same_as_before("findings", results)
    assert results["parameters"]["trainable"] < results["parameters"]["total"] / 10
    spec = json.loads((out / "finetuning_task.json").read_text())
    assert len(spec["classes"]) == 4
    assert {f"prob_{c}" for c in spec["classes"]} <= set(preds.columns)
    assert (out / "roc_pr.png").exists() and (out / "calibration.png").exists()
    # linear probe: the saved backbone is bit-identical to the pretrained one, the head is new
    before, after = load_file(pre / "model.safetensors"), load_file(out / "model.safetensors")
    for key, value in before.items():
        torch.testing.assert_close(after[f"bioperceiver.{key}"], value, rtol=0, atol=0, msg=key)
    assert any(k.startswith("head.") for k in after)


def test_binary_classification_with_lora_and_query_head(cohort, tmp_path):
    out = tmp_path / "normal"
    results = _run(
        cohort,
        out,
        "--task",
        "classification",
        "--label_column",
        "label_findings",
        "--positive_label",
        "normal",
        "--modalities",
        "text_report",
        "tabular_study",
        "--finetuning_mode",
        "lora",
        "--head_type",
        "query",
        "--max_steps",
        "6",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
    )
    preds = _check_outputs(out, results, "auroc")
    _same_as_before("normal", results)
    assert {"auroc", "auprc", "accuracy", "f1", "brier"} <= set(results["test"])
    # calibrated probabilities and conformal sets per sample; calibration and coverage in the results and card
    assert {"calibrated_prob_normal", "conformal_set", "set_size", "label_in_set", "mc_std"} <= set(preds.columns)
    unc = results["uncertainty"]
    assert unc["coverage"] == pytest.approx(preds["label_in_set"].mean())
    assert unc["ece_after"] >= 0 and unc["temperature"] > 0
    assert (out / "reliability_diagram.png").exists()
    assert "coverage" in (out / "README.md").read_text()
    assert results["parameters"]["trainable"] < results["parameters"]["total"]
    # LoRA is merged into the saved weights: a plain (peft-free) model reproduces the predictions
    reloaded = _reload_and_predict(out, AutoModelForSequenceClassification, ["text_report", "tabular_study"])
    prob = torch.softmax(torch.from_numpy(reloaded), dim=1)[:, 1].numpy()
    np.testing.assert_allclose(prob, preds["prob_normal"].to_numpy(), rtol=1e-4, atol=1e-5)


def test_multiclass_grade_from_expression_with_partial_unfreezing(cohort, tmp_path):
    out = tmp_path / "grade"
    results = _run(
        cohort,
        out,
        "--task",
        "classification",
        "--label_column",
        "label_grade",
        "--modalities",
        "omics_expression",
        "--finetuning_mode",
        "partial",
        "--max_steps",
        "6",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
    )
    _check_outputs(out, results, "auroc")
    _same_as_before("grade", results)
    assert json.loads((out / "finetuning_task.json").read_text())["classes"] == ["1", "2", "3"]
    assert {"f1_macro", "f1_micro", "accuracy"} <= set(results["test"])
    assert not (out / "ablation.csv").exists()  # one modality: nothing to ablate


def test_regression_age_reports_metrics_in_original_units(cohort, tmp_path):
    out = tmp_path / "age"
    results = _run(
        cohort,
        out,
        "--task",
        "regression",
        "--label_column",
        "label_age",
        "--modalities",
        "omics_expression",
        "tabular_clinical",
        "--max_steps",
        "6",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--ablations",
        "false",
    )
    preds = _check_outputs(out, results, "rmse")
    _same_as_before("age", results)
    ages = preds["label_age"].to_numpy()
    assert 20 < ages.mean() < 100  # true labels are written in years, not standardised units
    baseline = float(np.sqrt(np.mean((ages - ages.mean()) ** 2)))
    assert results["test"]["rmse"] < 5 * baseline  # in years: same scale as the spread of the labels
    assert (out / "predicted_vs_true.png").exists()


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(cohort, tmp_path):
    """Run 1 epoch, then ask for 2 in the same folder with ``--resume_from_checkpoint latest``: the last checkpoint
    is found and training continues from it (optimizer, scheduler, RNG and data position restored), ending
    bit-identical to a straight 2-epoch run. (Issue 13: without the flag the folder is refused, never mixed.)"""
    common = (
        "--task",
        "survival",
        "--modalities",
        "tabular_clinical",
        "--ablations",
        "false",
        "--lr_scheduler_type",
        "constant",
        "--learning_rate",
        "1e-3",
        "--eval_strategy",
        "no",
    )
    straight = tmp_path / "straight"
    _run(cohort, straight, *common, "--num_train_epochs", "2")
    resumed = tmp_path / "resumed"
    _run(cohort, resumed, *common, "--num_train_epochs", "1")
    steps_per_epoch = json.loads((resumed / "all_results.json").read_text())["train"]
    assert sorted(p.name for p in resumed.glob("checkpoint-*")) == ["checkpoint-12"], steps_per_epoch
    second = _run(cohort, resumed, *common, "--num_train_epochs", "2", "--resume_from_checkpoint", "latest")
    assert second["train"]["epoch"] == 2.0
    state = json.loads((resumed / "checkpoint-24" / "trainer_state.json").read_text())
    assert state["global_step"] == 24
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)


def test_every_shipped_argument_file_parses():
    files = sorted((ROOT / "finetune" / "configs").glob("*.yaml")) + sorted(
        (ROOT / "finetune" / "configs").glob("*.json")
    )
    assert files
    for path in files:
        model_args, data_args, training_args = run_finetune.parse_args([str(path), "--output_dir", "/tmp/x"])
        assert data_args.task in ("classification", "multilabel", "regression", "survival"), path
        assert model_args.finetuning_mode in FINETUNING_MODES, path
        assert training_args.output_dir == "/tmp/x"  # command-line flags override the file


def test_bad_arguments_fail_with_a_clear_message(cohort, tmp_path, capsys):
    with refused(capsys, "label column 'label_nope'"):
        _run(cohort, tmp_path / "x", "--task", "classification", "--label_column", "label_nope")
    with refused(capsys, "--modalities"):
        _run(cohort, tmp_path / "y", "--task", "survival", "--modalities", "omics_nope")


@pytest.mark.parametrize("task", ["classification", "survival"])
def test_deep_ensemble_of_finetuned_seeds(cohort, tmp_path, task):
    ensemble = load_script("finetune/predict_ensemble.py")
    args = (
        (
            "--task",
            "classification",
            "--label_column",
            "label_findings",
            "--positive_label",
            "normal",
            "--modalities",
            "tabular_study",
        )
        if task == "classification"
        else ("--task", "survival", "--modalities", "tabular_clinical")
    )
    dirs = []
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        _run(
            cohort,
            out,
            *args,
            "--seed",
            str(seed),
            "--max_steps",
            "4",
            "--eval_strategy",
            "no",
            "--save_strategy",
            "no",
            "--interpret",
            "false",
            "--uncertainty",
            "false",
        )
        dirs.append(out)
    res = ensemble.main(["--model_dirs", *map(str, dirs), "--output_dir", str(tmp_path / "ens"), "--n_bootstrap", "20"])
    table = pd.read_csv(tmp_path / "ens" / "ensemble_predictions.csv")
    members = [pd.read_csv(predictions_path(d)) for d in dirs]
    assert list(table["sample_id"]) == list(members[0]["sample_id"])
    if task == "classification":
        # the ensemble probability is the mean of the members' probabilities; their spread is the disagreement
        mean = (members[0]["prob_normal"] + members[1]["prob_normal"]) / 2
        np.testing.assert_allclose(table["ensemble_prob_normal"], mean, rtol=1e-5, atol=1e-6)
        assert (table["ensemble_mutual_information"] >= -1e-12).all() and table["ensemble_std"].max() > 0
        assert np.isfinite(res["ensemble"]["auroc"])
    else:
        # Cox risks are centred per member before averaging (their additive constant is arbitrary)
        risks = [m["risk"] - m["risk"].mean() for m in members]
        np.testing.assert_allclose(table["ensemble_mean"], (risks[0] + risks[1]) / 2, rtol=1e-4, atol=1e-5)
        assert np.isfinite(res["ensemble"]["c_index"]) and set(res["members_metrics"]) == {"seed0", "seed1"}
    # model folders copied from another machine: the recorded manifest path is gone; the error says what to pass
    recorded = json.loads((dirs[0] / "all_results.json").read_text())
    (dirs[0] / "all_results.json").write_text(json.dumps({**recorded, "manifest": str(tmp_path / "gone.parquet")}))
    with pytest.raises(FileNotFoundError, match=r"gone.parquet, recorded in its all_results.json.*--manifest PATH"):
        ensemble.main(["--model_dirs", *map(str, dirs), "--output_dir", str(tmp_path / "ens2")])
    argv = ["--model_dirs", *map(str, dirs), "--output_dir", str(tmp_path / "ens3"), "--n_bootstrap", "20"]
    again = ensemble.main([*argv, "--manifest", str(cohort)])
    assert pd.read_csv(tmp_path / "ens3" / "ensemble_predictions.csv").equals(table)
    assert again["members_metrics"] == res["members_metrics"]


def test_processor_settings_for_modalities_the_manifest_lacks_are_ignored(cohort, tmp_path):
    """A settings file written for a bigger cohort (here: every demo modality) works on a manifest that has only
    some of those columns: processors are fitted for the used modalities only."""
    manifest = read_manifest(cohort)
    keep = ["sample_id", "patient_id", "split", "tabular_clinical", "label_survival_time", "label_survival_event"]
    small = manifest.table.loc[manifest.table["tabular_clinical"].notna(), keep]
    write_manifest(small, tmp_path / "survival_only.parquet", manifest.metadata)
    results = _run(
        tmp_path / "survival_only.parquet",
        tmp_path / "out",
        "--task",
        "survival",
        "--max_steps",
        "2",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--interpret",
        "false",
        "--uncertainty",
        "false",
    )
    assert results["modalities"] == ["tabular_clinical"]
    assert np.isfinite(results["test"]["c_index"])


def test_tasks_read_labels_the_way_users_write_them():
    from bioperceiver.data import DataError
    from bioperceiver.tasks import get_task
    from bioperceiver.training.tasks import labelled_records

    # --label_values arrive as text; an integer (or 2.0 float) column still matches them
    spec = get_task("classification", label_column="g", classes=["1", "2", "3"]).fit([{"g": 1}, {"g": 2}])
    assert int(spec.encode({"g": 2})) == 1 and int(spec.encode({"g": 3.0})) == 2
    # survival events as 1/0, booleans or their text forms
    surv = get_task("survival", time_column="t", event_column="e")
    for event, expected in ((True, 1.0), ("True", 1.0), ("1", 1.0), (0, 0.0), ("false", 0.0), (1.0, 1.0)):
        assert surv.encode({"t": 2.0, "e": event}).tolist() == [2.0, expected], event
    with pytest.raises(DataError, match="not an event indicator"):
        surv.encode({"t": 2.0, "e": "maybe"})
    # a class unseen in training: an error naming the sample, or a counted skip when asked
    rows = [{"sample_id": "a", "g": 1}, {"sample_id": "b", "g": 7}]
    with pytest.raises(DataError, match="sample 'b'"):
        labelled_records(rows, spec, "test")
    kept, targets = labelled_records(rows, spec, "test", on_error="skip")
    assert [r["sample_id"] for r in kept] == ["a"] and len(targets) == 1


def test_null_in_an_argument_file_means_not_given(tmp_path):
    args = tmp_path / "args.yaml"
    args.write_text(
        "manifest: m.parquet\ntask: classification\nlabel_column: label_x\npositive_label: null\n"
        "top_k_labels: null\noutput_dir: out\n"
    )
    _, data_args, _ = run_finetune.parse_args([str(args)])
    assert data_args.positive_label is None and data_args.top_k_labels is None


def test_a_modality_with_no_token_counts_as_absent_in_predictions_and_ablations(cohort):
    """A clinical cell whose fields are all null is processed into zero tokens: prediction and the "alone"
    ablation must treat the sample as lacking that modality instead of crashing the run."""
    from bioperceiver.tasks import get_task
    from bioperceiver.training.tasks import ProcessedDataset, labelled_records, predict, presence_pattern

    manifest = read_manifest(cohort)
    settings, embedders = load_processor_settings(ROOT / "tokenizers" / "demo_processors.yaml")
    used = ["omics_expression", "tabular_clinical"]
    proc = BioPerceiverProcessor.from_manifest(manifest, {k: v for k, v in settings.items() if k in used})
    proc = BioPerceiverProcessor({m: proc.processors[m] for m in used}).fit(manifest)
    spec = get_task("survival", time_column="label_survival_time", event_column="label_survival_event")
    records, targets = labelled_records(manifest.split("test").records()[:200], spec, "test")
    records = [dict(r) for r in records[:4]]
    fields = json.loads(records[0]["tabular_clinical"])
    records[0]["tabular_clinical"] = json.dumps(dict.fromkeys(fields))  # every field null
    ds = ProcessedDataset(records, targets[:4], proc, base_dir=manifest.base_dir, modalities=used)
    modalities = {m: proc.modalities[m] for m in used}
    assert presence_pattern(ds[0], modalities) == "omics_expression"
    model = bp.BioPerceiverForSurvival(
        bp.create_config("bioperceiver_debug", modalities=proc.model_modalities(embedders))
    )
    pred, keep = predict(model, ds, modalities, keep_only=["tabular_clinical"])
    assert keep.tolist() == [False, True, True, True] and np.isnan(pred[0]).all() and np.isfinite(pred[1:]).all()


def test_trainer_evaluates_without_modality_dropout(tmp_path):
    """Evaluation and prediction batches come from the evaluation collator (no modality dropout, no
    augmentation); training batches from the training one."""
    from transformers import TrainingArguments

    from bioperceiver.training.tasks import TaskCollator, TaskTrainer

    mods = {"tabular": "tabular"}
    train_col, eval_col = TaskCollator(mods, modality_dropout=0.5), TaskCollator(mods, train=False)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False)
    model = bp.BioPerceiverForSurvival(
        bp.create_config("bioperceiver_debug", modalities={"tabular": {"kind": "tabular", "num_features": 4}})
    )
    data = [{"latents": torch.zeros(1), "__target__": torch.zeros(2)}] * 2
    trainer = TaskTrainer(
        model=model,
        args=args,
        train_dataset=data,
        eval_dataset=data,
        data_collator=train_col,
        eval_data_collator=eval_col,
    )
    assert trainer.get_eval_dataloader().collate_fn is eval_col
    assert trainer.get_test_dataloader(data).collate_fn is eval_col
    assert trainer.get_train_dataloader().collate_fn is train_col
    assert trainer.data_collator is train_col  # restored


def test_the_log_history_and_learning_curves_show_every_evaluation_and_the_kept_epoch(cohort, tmp_path, monkeypatch):
    """``trainer_state.json`` (HF's ``save_state``) holds the training loss and every per-epoch evaluation, the
    epoch ``all_results.json`` says was kept is the best of them, and ``learning_curves.png`` draws the training
    loss, validation loss and metric on separate panels with the kept epoch marked. Run again into the same folder
    with ``--overwrite_output_dir`` and no evaluation, both files are the new run's."""
    import matplotlib.figure

    drawn = {}
    real_savefig = matplotlib.figure.Figure.savefig

    def keep(fig, path, **kw):
        drawn[Path(path).name] = [
            (ax.get_title(), [(line.get_label(), list(line.get_xdata())) for line in ax.get_lines()]) for ax in fig.axes
        ]
        return real_savefig(fig, path, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    out = tmp_path / "curves"
    common = ("--task", "survival", "--modalities", "tabular_clinical", "--ablations", "false")
    results = _run(
        cohort,
        out,
        *common,
        "--num_train_epochs",
        "4",
        "--learning_rate",
        "3e-3",
        "--load_best_model_at_end",
        "true",
        "--metric_for_best_model",
        "c_index",
        "--greater_is_better",
        "true",
    )
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evals = [h for h in history if "eval_c_index" in h]
    assert [h["epoch"] for h in evals] == [1.0, 2.0, 3.0, 4.0]
    assert any("loss" in h for h in history)  # the training loss, every --logging_steps 5
    kept = results["train"]["best_checkpoint"]
    best = max(h["eval_c_index"] for h in evals)
    assert kept["epoch"] == next(h["epoch"] for h in evals if h["eval_c_index"] == best)  # the first of tied bests
    assert kept["value"] == pytest.approx(best)
    assert results["plots"][0] == "learning_curves.png" and (out / "learning_curves.png").stat().st_size > 0
    assert "learning_curves.png" in json.loads((out / "all_results.json").read_text())["plots"]
    panels = drawn["learning_curves.png"]
    assert [title for title, _ in panels] == [
        "training loss (batches, as trained)",
        "validation loss (whole split)",
        "validation c_index",
    ]
    for title, lines in panels:
        marks = [x for label, x in lines if label.startswith("kept")]
        assert marks == [[kept["epoch"], kept["epoch"]]], title
    assert [x for label, x in panels[2][1] if not label.startswith("kept")] == [[1.0, 2.0, 3.0, 4.0]]

    drawn.clear()
    _run(cohort, out, *common, "--num_train_epochs", "1", "--eval_strategy", "no", "--overwrite_output_dir", "true")
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert not any("eval_loss" in h for h in history) and history[-1]["epoch"] == 1.0
    assert [title for title, _ in drawn["learning_curves.png"]] == ["training loss (batches, as trained)"]


def test_no_learning_curves_without_training_loss(tmp_path):
    from bioperceiver.evaluation.plots import plot_learning_curves

    assert plot_learning_curves([{"eval_loss": 1.0, "epoch": 1.0}], tmp_path / "c.png", "c_index") is None
    assert not (tmp_path / "c.png").exists()
