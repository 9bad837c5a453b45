"""The demo-cohort recipe builds a real, self-consistent manifest from data that pip packages ship."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("SurvSet")
pytest.importorskip("data_store")
pydicom = pytest.importorskip("pydicom")
for _module in ("torchxrayvision", "systole"):  # located, not imported (torchxrayvision imports torch/torchvision)
    if importlib.util.find_spec(_module) is None:
        pytest.skip(f"{_module} is not installed", allow_module_level=True)

from bioperceiver.data.manifest import metadata_path, parse_reference, read_manifest  # noqa: E402
from bioperceiver.data.recipes import demo  # noqa: E402

SMALL = dict(
    padchest_studies=40,
    survset_datasets=("gse4335",),
    signal_window_s=10.0,
    signal_stride_s=120.0,
    include_dicom=True,
    seed=3,
)
# a build with almost nothing in it, for the rebuild / CLI checks
MINIMAL = dict(
    padchest_studies=0, survset_datasets=(), signal_window_s=30.0, signal_stride_s=300.0, include_dicom=False
)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    path = demo.build_demo_cohort(out, **SMALL)
    return path, pd.read_parquet(path), json.loads(metadata_path(path).read_text())


def _by_source(table, source):
    return table[table["meta_source"] == source]


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and value is not pd.NA


def test_rows_ids_and_sources(cohort):
    path, table, _ = cohort
    assert path.name == "manifest.parquet"
    assert table["sample_id"].is_unique
    assert table["patient_id"].notna().all()
    assert "split" not in table.columns
    counts = table["meta_source"].value_counts().to_dict()
    duration = 1536.57  # systole Task1: 1,536,570 samples at 1000 Hz
    assert counts["padchest"] == 40
    assert counts["survset_gse4335"] == 115
    assert counts["systole_task1"] == math.floor((duration - 10.0) / 120.0) + 1
    assert counts.get("pydicom-data", 0) + counts.get("pydicom-testdata", 0) == 10
    assert table["meta_source"].notna().all()
    for col in table.columns:  # no column is entirely empty
        assert table[col].map(_present).any(), col


def test_every_row_has_a_modality(cohort):
    _, table, meta = cohort
    modality_cols = list(meta["modalities"])
    has_any = table[modality_cols].apply(lambda row: any(_present(v) for v in row), axis=1)
    assert has_any.all()


def test_padchest_subset_is_grouped_by_patient(cohort):
    _, table, _ = cohort
    pc = _by_source(table, "padchest")
    assert pc["sample_id"].str.startswith("padchest:").all()
    csv = demo._package_file("torchxrayvision", "torchxrayvision", demo.PADCHEST_FILE)
    src = pd.read_csv(csv, usecols=["StudyID", "PatientID"], dtype=str)
    patients = {p.removeprefix("padchest:") for p in pc["patient_id"]}
    expected = set(src.loc[src["PatientID"].isin(patients), "StudyID"])
    assert {s.removeprefix("padchest:") for s in pc["sample_id"]} == expected
    # every study maps back to its patient
    study_patient = src.drop_duplicates("StudyID").set_index("StudyID")["PatientID"]
    for sid, pid in zip(pc["sample_id"], pc["patient_id"]):
        assert study_patient[sid.removeprefix("padchest:")] == pid.removeprefix("padchest:")
    assert pc["text_report"].notna().mean() > 0.9


def test_path_cells_exist_and_signal_windows_fit(cohort):
    path, table, _ = cohort
    base = path.parent
    images = table[["image_2d", "image_3d"]].stack().dropna()
    assert len(images) == 10
    for col in ("image_2d", "image_3d"):
        for cell in table[col].dropna():
            file = base / cell
            assert file.is_file() and file.parent == base / "images"
            ds = pydicom.dcmread(file)
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            assert ds.pixel_array.ndim == (2 if col == "image_2d" else 3)
            assert (frames == 1) == (col == "image_2d")
            assert not ds.file_meta.TransferSyntaxUID.is_compressed
    recordings = {}
    for col, channel in (("signal_ecg", "ECG"), ("signal_eda", "EDA"), ("signal_resp", "RESP")):
        for cell in table[col].dropna():
            ref = parse_reference(cell, base)
            if ref.path not in recordings:
                with np.load(ref.path) as npz:
                    recordings[ref.path] = (npz["values"].shape, npz["values"].dtype, list(npz["channels"]))
                    recordings[ref.path] += (float(npz["sampling_rate"]),)
            shape, dtype, channels, rate = recordings[ref.path]
            assert shape[0] == 1 and dtype == np.float32 and channels == [channel] and rate == 1000.0
            start, duration = float(ref.options["start"]), float(ref.options["duration"])
            assert start >= 0 and duration == 10.0
            assert (start + duration) * rate <= shape[1]


def test_omics_references_resolve(cohort):
    path, table, _ = cohort
    cells = _by_source(table, "survset_gse4335")["omics_expression"]
    assert cells.notna().all()
    matrices = {}
    for cell in cells:
        ref = parse_reference(cell, path.parent)
        if ref.path not in matrices:
            matrices[ref.path] = pd.read_parquet(ref.path)
        matrix = matrices[ref.path]
        values = matrix.loc[ref.options["row"]].to_numpy()
        assert values.size > 10_000 and np.isfinite(values).all()
    (matrix,) = matrices.values()
    assert matrix.index.is_unique and matrix.shape == (115, 12793)
    assert "ESR1" in matrix.columns and not any(c.startswith(("num_", "HS_")) for c in matrix.columns)


def _reject_constant(name):
    raise AssertionError(f"non-finite JSON constant {name}")


def test_tabular_cells_are_clean_json(cohort):
    _, table, _ = cohort
    for col in ("tabular_study", "tabular_clinical"):
        cells = table[col].dropna()
        assert len(cells)
        for cell in cells:
            parsed = json.loads(cell, parse_constant=_reject_constant)
            assert isinstance(parsed, dict) and parsed
            for key, value in parsed.items():
                assert not key.startswith(("fac_", "num_"))
                assert value is None or isinstance(value, (str, int, float, bool))
    study = [json.loads(c) for c in _by_source(table, "padchest")["tabular_study"]]
    assert {"sex", "age_years", "projections", "pediatric"} <= set(study[0])
    assert all(s["age_years"] is None or 0 <= s["age_years"] <= 120 for s in study)
    clinical = [json.loads(c) for c in _by_source(table, "survset_gse4335")["tabular_clinical"]]
    assert {"age", "er_status", "grade"} <= set(clinical[0])
    assert not any(v in ("na", "missing") for c in clinical for v in c.values())


def test_label_types(cohort):
    _, table, meta = cohort
    assert meta["labels"] == {
        "label_findings": "multilabel",
        "label_survival_time": "survival",
        "label_survival_event": "survival",
        "label_stimulus": "multiclass",
    }
    pc = _by_source(table, "padchest")
    findings = [f for f in pc["label_findings"] if f is not None]
    assert len(findings) >= 0.9 * len(pc)
    for f in findings:
        assert len(f) and all(isinstance(x, str) and x == x.strip() and x for x in f)
    assert table.loc[table["meta_source"] != "padchest", "label_findings"].isna().all()
    sv = _by_source(table, "survset_gse4335")
    assert sv["label_survival_time"].dtype == np.float64 and (sv["label_survival_time"] > 0).all()
    assert set(sv["label_survival_event"].astype(int)) == {0, 1}
    sy = _by_source(table, "systole_task1")
    assert set(sy["label_stimulus"].astype(int)) <= {0, 1, 2}
    assert table.loc[table["meta_source"] != "systole_task1", "label_stimulus"].isna().all()


def test_metadata_provenance(cohort):
    _, table, meta = cohort
    assert meta["recipe"] == "bioperceiver.data.recipes.demo" and meta["synthetic"] is False
    assert meta["params"]["padchest_studies"] == 40 and meta["params"]["survset_datasets"] == ["gse4335"]
    by_name = {s["name"]: s for s in meta["sources"]}
    assert set(by_name) == set(table["meta_source"])
    for name, source in by_name.items():
        assert source["version"], name
        assert source["licence"] and source["citation"] and source["url"] and source["files"], name
        assert source["rows"] == int((table["meta_source"] == name).sum())
    assert "bimcv" in by_name["padchest"]["licence"].lower()
    assert by_name["systole_task1"]["package_licence"] == "GPL-3.0"
    assert meta["created_with"]["pandas"] == pd.__version__
    assert meta["processor_settings"]["omics_expression"]["normalization"] == "none"
    assert meta["processor_settings"]["image_3d"]["spatial_dims"] == 3


def test_read_manifest_kinds(cohort):
    path, table, _ = cohort
    manifest = read_manifest(path)
    assert len(manifest) == len(table)
    assert manifest.modalities == {
        "text_report": "text",
        "tabular_study": "tabular",
        "tabular_clinical": "tabular",
        "omics_expression": "omics",
        "signal_ecg": "signal",
        "signal_eda": "signal",
        "signal_resp": "signal",
        "image_2d": "image",
        "image_3d": "image",
    }
    assert set(manifest.label_columns) == {
        "label_findings",
        "label_survival_time",
        "label_survival_event",
        "label_stimulus",
    }


def test_same_parameters_reuse_the_manifest(cohort):
    path, _, _ = cohort
    before = (path.stat().st_mtime_ns, metadata_path(path).stat().st_mtime_ns)
    assert demo.build_demo_cohort(path.parent, **SMALL) == path
    assert (path.stat().st_mtime_ns, metadata_path(path).stat().st_mtime_ns) == before


def test_parameter_change_rebuilds_and_cli(tmp_path):
    first = demo.build_demo_cohort(tmp_path, **MINIMAL)
    table = pd.read_parquet(first)
    assert set(table["meta_source"]) == {"systole_task1"} and len(table) == 6
    assert "text_report" not in table.columns and "image_2d" not in table.columns
    mtime = first.stat().st_mtime_ns
    code = demo.main(
        [
            "--output_dir",
            str(tmp_path),
            "--padchest_studies",
            "0",
            "--survset_datasets",
            "--signal_window_s",
            "30",
            "--signal_stride_s",
            "600",
            "--no_dicom",
            "--log_level",
            "WARNING",
        ]
    )
    assert code == 0
    assert first.stat().st_mtime_ns != mtime
    assert len(pd.read_parquet(first)) == 3
    assert json.loads(metadata_path(first).read_text())["params"]["signal_stride_s"] == 600.0


def test_refuses_foreign_manifest(tmp_path):
    pd.DataFrame({"sample_id": ["a"], "patient_id": ["p"]}).to_parquet(tmp_path / "manifest.parquet")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        demo.build_demo_cohort(tmp_path, **MINIMAL)


def test_missing_package_names_the_pip_command(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "systole" else real_find_spec(name, *a)
    )
    with pytest.raises(demo.DemoDataMissingError, match=r"pip install --no-deps .*systole==0\.3\.1"):
        demo.build_demo_cohort(tmp_path, **MINIMAL)
    assert not os.path.exists(tmp_path / "manifest.parquet")
