"""The full-PadChest recipe on a slice of the real table: streamed study rows, the demo's patient hash split, the
demo's test patients kept out of the train split, the sidecar."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from bioperceiver.data import assign_splits, read_manifest
from bioperceiver.data.manifest import metadata_path
from bioperceiver.data.recipes import padchest
from bioperceiver.data.splits import split_of

SOURCE = padchest.package_csv()
if SOURCE is None:
    pytest.skip("torchxrayvision (the PadChest label table) is not installed", allow_module_level=True)

N_IMAGES = 1500  # the first image rows of the real table: ~1,000 studies; some studies lose images, still whole here


@pytest.fixture(scope="module")
def slice_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("padchest_in")
    pd.read_csv(SOURCE, nrows=N_IMAGES, dtype=str).to_csv(folder / padchest.PADCHEST_CSV, index=False)
    return folder


@pytest.fixture(scope="module")
def built(slice_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("padchest_out")
    path = padchest.build_padchest(out, padchest_dir=slice_dir, chunksize=97)  # many chunks: studies span them
    return path, pd.read_parquet(path), json.loads(metadata_path(path).read_text())


def test_one_row_per_study_with_the_slices_fields(slice_dir, built):
    _, table, meta = built
    images = pd.read_csv(slice_dir / padchest.PADCHEST_CSV, dtype=str)
    per_study = images.groupby("StudyID")["PatientID"].nunique()
    expected = set(per_study.index[per_study == 1])
    assert {s.removeprefix("padchest:") for s in table["sample_id"]} == expected
    assert table["sample_id"].is_unique and meta["rows"] == len(table)
    # every image of a study is in its row (the CSV is not ordered by study: streaming must gather them)
    n_images = images.groupby("StudyID").size()
    got = table.set_index("sample_id")["meta_image_ids"].map(len)
    assert all(got[f"padchest:{s}"] == n_images[s] for s in expected)
    fields = json.loads(table["tabular_study"].iloc[0])
    assert fields["n_images"] == got.iloc[0] and "projections" in fields and "age_years" in fields
    assert meta["modalities"] == {"text_report": "text", "tabular_study": "tabular"}
    assert meta["labels"] == {"label_findings": "multilabel"}
    # the suggested settings are the ones the shipped settings file fits (and what fit_processors uses without one)
    import yaml

    shipped = yaml.safe_load((Path(__file__).resolve().parents[1] / "tokenizers/padchest_processors.yaml").read_text())
    assert meta["processor_settings"] == shipped["processors"]


def test_streaming_does_not_change_the_rows(slice_dir, built, tmp_path):
    _, table, _ = built
    whole = pd.read_parquet(padchest.build_padchest(tmp_path, padchest_dir=slice_dir, chunksize=10**6))
    a = table.sort_values("sample_id").reset_index(drop=True)
    b = whole.sort_values("sample_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(a.astype(str), b.astype(str))


def test_split_is_the_demo_hash_split(built):
    path, table, meta = built
    assert (table["split"] == table["patient_id"].map(split_of)).all()
    # what assign_splits gives the demo manifest (no split column there) equals the stored column
    m = read_manifest(path)
    m.table.drop(columns="split", inplace=True)
    again = assign_splits(m).table
    assert (again["split"].to_numpy() == table["split"].to_numpy()).all()
    assert table.groupby("patient_id")["split"].nunique().max() == 1
    check = meta["demo_split_check"]
    assert check["demo_patients_present"] == check["demo_patients"] > 0
    assert check["split_disagreements"] == 0 and check["demo_test_patients_in_train"] == 0
    assert set(meta["rows_per_split"]) <= {"train", "validation", "test"}


def test_max_studies_keeps_whole_patients(slice_dir, built, tmp_path):
    _, full, _ = built
    part = pd.read_parquet(padchest.build_padchest(tmp_path, padchest_dir=slice_dir, max_studies=50, seed=1))
    assert len(part) == 50
    per_patient = full.groupby("patient_id").size()
    kept = part.groupby("patient_id").size()
    assert (kept.to_numpy() == per_patient.loc[kept.index].to_numpy()).all()


def test_cli_writes_the_manifest(slice_dir, tmp_path, capsys):
    rc = padchest.main(["--output_dir", str(tmp_path), "--padchest_dir", str(slice_dir), "--max_studies", "20"])
    assert rc == 0
    assert capsys.readouterr().out.strip().endswith("manifest.parquet")
    assert json.loads(metadata_path(tmp_path / "manifest.parquet").read_text())["params"]["max_studies"] == 20
    assert padchest.main(["--output_dir", str(tmp_path), "--padchest_dir", str(slice_dir)]) == 1  # exists
