"""pretrain/run_federated.py and finetune/run_federated.py end to end on a tiny two-site synthetic cohort."""

import json
from pathlib import Path

import pytest
from script_loader import load_script

from bioperceiver.data.manifest import read_manifest, write_manifest
from bioperceiver.data.recipes.synthetic import make_synthetic_cohort

pytestmark = pytest.mark.slow  # end to end through the scripts: ~50 s on 2 busy cores


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("fed_scripts")
    path = make_synthetic_cohort(root / "cohort", num_patients=14, missing_rate=0.2, seed=2)
    m = read_manifest(path)
    keep = ["sample_id", "patient_id", "tabular_ehr", "text_note", *m.label_columns]
    table = m.table[keep].copy()
    table["meta_site"] = ["north" if i % 2 else "south" for i in range(len(table))]
    write_manifest(table, path)
    (root / "settings.yaml").write_text(
        json.dumps({"processors": {"text_note": {"vocab_size": 80, "min_frequency": 1}}})
    )
    return path, root / "settings.yaml", table


def _no_ids(folder: Path, table) -> None:
    ids = {str(v) for c in ("sample_id", "patient_id") for v in table[c]}
    for f in folder.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".md", ".yaml", ".txt", ".csv"):
            text = f.read_text(errors="ignore")
            leaked = [i for i in ids if f'"{i}"' in text or f" {i} " in text or f"|{i}|" in text]
            assert not leaked, (f, leaked[:3])


def test_federated_pretraining_script_runs_resumes_and_writes_no_ids(cohort, tmp_path):
    manifest, settings, table = cohort
    run = load_script("pretrain/run_federated.py", "run_federated_pretrain")
    out = tmp_path / "pre"
    base = [
        "--manifest",
        str(manifest),
        "--processor_settings",
        str(settings),
        "--local_steps",
        "1",
        "--batch_size",
        "4",
        "--output_dir",
        str(out),
        "--fraction_evaluate",
        "0",
    ]
    first = run.main([*base, "--rounds", "1"])
    assert first["rounds"] == 1 and [s["site"] for s in first["sites"]] == ["north", "south"]
    again = run.main([*base, "--rounds", "2", "--resume", "true"])
    assert again["rounds"] == 2
    history = json.loads((out / "federated_history.json").read_text())
    assert [h["round"] for h in history] == [1, 2]
    assert (out / "federated_metrics.png").exists() and (out / "rounds" / "round-0002").is_dir()
    card = (out / "README.md").read_text()
    assert "No raw data was pooled" in " ".join(card.replace("**", "").split()) and "north" in card
    _no_ids(out, table)
    with pytest.raises(ValueError, match="not empty"):
        run.main([*base, "--rounds", "1"])


def test_federated_finetuning_script_reports_test_metrics_per_site(cohort, tmp_path):
    manifest, settings, table = cohort
    run = load_script("finetune/run_federated.py", "run_federated_finetune")
    out = tmp_path / "ft"
    results = run.main(
        [
            "--manifest",
            str(manifest),
            "--processor_settings",
            str(settings),
            "--task",
            "classification",
            "--label_column",
            "label_binary",
            "--rounds",
            "1",
            "--local_steps",
            "2",
            "--batch_size",
            "4",
            "--n_bootstrap",
            "20",
            "--output_dir",
            str(out),
            "--strategy",
            "fedprox",
            "--proximal_mu",
            "0.1",
            "--clip_update_norm",
            "1.0",
            "--noise_multiplier",
            "0.1",
        ]
    )
    assert set(results["test_per_site"]) == {"north", "south"}
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["federated"]["strategy"] == "fedprox" and saved["local"]["clip_update_norm"] == 1.0
    assert "Client-side clipping" in (out / "README.md").read_text()
    _no_ids(out, table)


def test_federated_finetuning_checks_every_sites_labels_before_fitting_the_task(cohort, tmp_path):
    """A site's regression label that cannot be used (text in a numeric column) stops the run naming the sample and
    the column, as run_finetune does (it reached task.fit and failed with a bare float() error); with
    --on_error skip_sample the row is left out and the run goes on."""
    from bioperceiver.data import DataError, assign_splits

    manifest, settings, table = cohort
    bad = table.copy()
    bad["label_score"] = [float(i) for i in range(len(bad))]
    train = assign_splits(read_manifest(manifest)).table["split"] == "train"
    victim = bad.index[train.to_numpy()][0]
    bad["label_score"] = bad["label_score"].astype(object)
    bad.at[victim, "label_score"] = "high"
    path = tmp_path / "bad.csv"  # a CSV column mixes numbers and text
    write_manifest(bad, path, read_manifest(manifest).metadata)
    run = load_script("finetune/run_federated.py", "run_federated_finetune_labels")
    argv = [
        *("--manifest", str(path), "--processor_settings", str(settings), "--task", "regression"),
        *("--label_column", "label_score", "--rounds", "1", "--local_steps", "1", "--batch_size", "4"),
        *("--n_bootstrap", "5"),
    ]
    with pytest.raises(DataError, match=rf"'{bad.at[victim, 'sample_id']}'.*label_score='high' is not a number"):
        run.main([*argv, "--output_dir", str(tmp_path / "raise")])
    results = run.main([*argv, "--output_dir", str(tmp_path / "skip"), "--on_error", "skip_sample"])
    assert set(results["test_per_site"]) == {"north", "south"}
