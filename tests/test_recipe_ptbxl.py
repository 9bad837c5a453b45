"""The PTB-XL recipe and the shared recipe base, on PTB-XL 1.0.3-layout fixture folders (tests/recipe_fixtures.py)."""

from __future__ import annotations

import gzip
import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest
from recipe_fixtures import PtbxlRecord, default_ptbxl_records, ecg_signal, write_ptbxl

from bioperceiver.data import SignalProcessor, TabularProcessor, read_manifest
from bioperceiver.data.errors import DataError
from bioperceiver.data.recipes import ptbxl
from bioperceiver.data.recipes.common import (
    RecipeInputError,
    RecipeOutputError,
    RecipeReport,
    RecipeSchemaError,
    RecipeSplitError,
    prepare_output_dir,
    recipe_parser,
    require_columns,
    require_file,
    write_recipe_output,
)
from bioperceiver.data.validate import main as validate_main


@pytest.fixture(scope="module")
def ptbxl_dir(tmp_path_factory):
    return write_ptbxl(tmp_path_factory.mktemp("ptbxl"))


@pytest.fixture(scope="module")
def built(ptbxl_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ptbxl_out")
    assert ptbxl.main(["--ptbxl_dir", str(ptbxl_dir.root), "--output_dir", str(out)]) == 0
    return out


def _meta(out):
    return json.loads((out / "manifest.parquet.meta.json").read_text())


def test_one_row_per_ecg_with_folds_labels_and_patient_fields(built):
    table = pd.read_parquet(built / "manifest.parquet").set_index("sample_id")
    assert list(table.index) == [str(i) for i in range(1, 8)]  # sample_id keeps the ecg_id
    assert table.loc["2", "patient_id"] == "13243"  # float ids in the CSV -> plain strings
    # strat_fold 1-8 train, 9 validation, 10 test
    assert table["split"].to_dict() == {
        "1": "train", "2": "train", "3": "train", "4": "validation", "5": "test", "6": "test", "7": "train"
    }  # fmt: skip
    assert list(table.loc["2", "label_superclass"]) == ["MI", "STTC"]
    assert list(table.loc["2", "label_subclass"]) == ["IMI", "STTC"]
    assert list(table.loc["3", "label_subclass"]) == ["IRBBB", "LAFB/LPFB"]
    assert list(table.loc["5", "label_superclass"]) == ["STTC"]  # PVC is a form/rhythm statement, not diagnostic
    assert table.loc["6", "label_superclass"] is None  # only SR: no diagnostic statement -> unknown, not "normal"
    assert table.loc["6", "text_report"] is None and table.loc["6", "signal_ecg"] is not None
    assert "inferiorer infarkt möglich" in table.loc["2", "text_report"]  # UTF-8 umlauts survive
    fields = json.loads(table.loc["2", "tabular_patient"])
    assert fields == {"age": 90.0, "sex": "male", "height": None, "weight": 63.0}  # 300 = anonymised > 89
    assert json.loads(table.loc["5", "tabular_patient"])["weight"] is None
    meta = _meta(built)
    assert meta["modalities"] == {"signal_ecg": "signal", "text_report": "text", "tabular_patient": "tabular"}
    assert meta["labels"] == {"label_superclass": "multilabel", "label_subclass": "multilabel"}
    assert meta["provenance"]["version"] == "1.0.3" and "CC BY 4.0" in meta["licence_note"]
    assert meta["versions"]["wfdb"] and meta["versions"]["ptbxl"] == "1.0.3"
    assert meta["counts"]["kept"] == 7 and meta["counts"]["read"]["ptbxl_database.csv"] == 7
    assert meta["counts"]["notes"] == {"age_over_89_set_to_90": 2, "empty_report": 1, "no_diagnostic_superclass": 1}
    assert meta["rows_per_split"] == {"train": 4, "validation": 1, "test": 2}


def test_signals_round_trip_in_millivolts_and_the_signal_kind_reads_them(built, ptbxl_dir):
    with np.load(built / "signals/records100/00000/00003_lr.npz") as z:
        values, channels, rate = z["values"], list(z["channels"]), float(z["sampling_rate"])
    assert values.shape == (12, 200) and values.dtype == np.float32 and rate == 100.0
    assert channels[:3] == ["I", "II", "III"] and channels[-1] == "V6"
    np.testing.assert_allclose(values, ecg_signal(3, 100).T, atol=5.1e-4)  # 16-bit, gain 1000/mV quantisation
    manifest = read_manifest(built / "manifest.parquet")
    cells = manifest.table["signal_ecg"].tolist()
    proc = SignalProcessor("signal_ecg", normalization="none").fit(cells, base_dir=manifest.base_dir)
    out = proc(cells[2], base_dir=manifest.base_dir, sample_id="3")
    np.testing.assert_allclose(out["values"], ecg_signal(3, 100).T, atol=5.1e-4)
    tab = TabularProcessor("tabular_patient").fit(manifest.table["tabular_patient"].tolist())
    assert len(tab(manifest.table["tabular_patient"][0])["feature_ids"]) == 3  # height null -> no token
    assert validate_main([str(built / "manifest.parquet")]) == 0


def test_500_hz_gzipped_tables_and_likelihood_threshold(tmp_path):
    src = write_ptbxl(tmp_path / "in", gz=True, rates=(500,))
    assert (src.root / "ptbxl_database.csv.gz").is_file() and not (src.root / "ptbxl_database.csv").exists()
    path = ptbxl.build_ptbxl(src.root, tmp_path / "out", sampling_rate=500, min_likelihood=20)
    table = pd.read_parquet(path).set_index("sample_id")
    assert table.loc["1", "signal_ecg"] == "signals/records500/00000/00001_hr.npz"
    with np.load(tmp_path / "out" / table.loc["1", "signal_ecg"]) as z:
        assert z["values"].shape == (12, 1000) and float(z["sampling_rate"]) == 500.0
    assert list(table.loc["4", "label_superclass"]) == ["HYP"]  # ASMI at 15 % is below 20
    assert list(table.loc["2", "label_superclass"]) == ["MI", "STTC"]  # IMI at 50 % stays
    assert _meta(tmp_path / "out")["counts"]["notes"]["scp_code_below_min_likelihood"] == 1


def test_missing_file_names_it_and_where_it_comes_from(tmp_path, caplog):
    src = write_ptbxl(tmp_path / "in", rates=(100,))
    (src.root / "scp_statements.csv").unlink()
    with pytest.raises(RecipeInputError, match=r"scp_statements\.csv and scp_statements\.csv\.gz .*PhysioNet"):
        ptbxl.build_ptbxl(src.root, tmp_path / "out")
    with caplog.at_level(logging.ERROR):
        assert ptbxl.main(["--ptbxl_dir", str(src.root), "--output_dir", str(tmp_path / "o2")]) == 1
    assert "download PTB-XL 1.0.3 from PhysioNet" in caplog.text
    assert not (tmp_path / "out").exists()  # nothing created before the inputs are found


def test_renamed_column_names_it_and_the_expected_version(tmp_path):
    src = write_ptbxl(tmp_path / "in", rates=(100,))
    db = src.root / "ptbxl_database.csv"
    db.write_text(db.read_text(encoding="utf-8").replace("strat_fold", "stratified_fold", 1), encoding="utf-8")
    with pytest.raises(RecipeSchemaError, match=r"'strat_fold' \(renamed to 'stratified_fold'\?\).*PTB-XL 1\.0\.3"):
        ptbxl.build_ptbxl(src.root, tmp_path / "out")


def test_corrupt_record_raises_or_is_a_named_counted_skip(tmp_path):
    src = write_ptbxl(tmp_path / "in", rates=(100,))
    dat = src.record_path(4).with_suffix(".dat")
    dat.write_bytes(dat.read_bytes()[:100])  # truncated
    src.record_path(7).with_suffix(".hea").unlink()
    with pytest.raises(DataError, match=r"sample '4', modality 'signal_ecg': record .*00004_lr: wfdb cannot read"):
        ptbxl.build_ptbxl(src.root, tmp_path / "raise")
    path = ptbxl.build_ptbxl(src.root, tmp_path / "skip", on_error="skip")
    assert sorted(pd.read_parquet(path)["sample_id"]) == ["1", "2", "3", "5", "6"]
    skipped = _meta(tmp_path / "skip")["counts"]["skipped"]
    assert {(r["reason"], r["count"]) for r in skipped["by_reason"]} == {("corrupt_record", 1), ("missing_record", 1)}
    assert any("00004_lr" in e for r in skipped["by_reason"] for e in r["examples"])
    assert _meta(tmp_path / "skip")["counts"]["dropped"] == 2
    parallel = ptbxl.build_ptbxl(src.root, tmp_path / "parallel", on_error="skip", num_workers=2)
    pd.testing.assert_frame_equal(pd.read_parquet(parallel), pd.read_parquet(path))
    assert _meta(tmp_path / "parallel")["counts"] == _meta(tmp_path / "skip")["counts"]
    with pytest.raises(DataError, match="00004_lr"):  # in record order, whatever the number of workers
        ptbxl.build_ptbxl(src.root, tmp_path / "raise2", num_workers=2)
    path = ptbxl.build_ptbxl(src.root, tmp_path / "keep", on_error="skip_modality")
    table = pd.read_parquet(path).set_index("sample_id")
    assert len(table) == 7 and table.loc["4", "signal_ecg"] is None and table.loc["4", "text_report"]
    assert _meta(tmp_path / "keep")["counts"]["skipped"]["modality_total"] == 2


def test_patient_in_two_folds_is_an_error(tmp_path):
    records = default_ptbxl_records()
    records[2] = PtbxlRecord(3, 13243.0, 10, {"NORM": 100.0})  # patient 13243 also has ECG 2 in fold 2
    src = write_ptbxl(tmp_path / "in", records, rates=(100,))
    with pytest.raises(RecipeSplitError, match=r"patient.*'13243': \['10', '2'\]"):
        ptbxl.build_ptbxl(src.root, tmp_path / "out")


def test_malformed_scp_codes_is_a_named_data_error(tmp_path):
    src = write_ptbxl(tmp_path / "in", rates=(100,))
    db = src.root / "ptbxl_database.csv"
    db.write_text(db.read_text(encoding="utf-8").replace("{'LVH': 100.0, 'ASMI': 15.0}", "LVH=100"), "utf-8")
    with pytest.raises(DataError, match=r"sample '4'.*scp_codes 'LVH=100'"):
        ptbxl.build_ptbxl(src.root, tmp_path / "out")
    path = ptbxl.build_ptbxl(src.root, tmp_path / "out2", on_error="skip_modality")
    table = pd.read_parquet(path).set_index("sample_id")
    assert table.loc["4", "label_superclass"] is None and table.loc["4", "signal_ecg"] is not None


def test_output_dir_rules(built, ptbxl_dir, tmp_path):
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        ptbxl.build_ptbxl(ptbxl_dir.root, built)
    repo_root = __import__("pathlib").Path(__file__).resolve().parents[1]
    with pytest.raises(ValueError, match="data never enters the repository"):
        prepare_output_dir(repo_root / "src" / "cohort", overwrite=True)
    out = shutil.copytree(built, tmp_path / "again")
    assert ptbxl.main(["--ptbxl_dir", str(ptbxl_dir.root), "--output_dir", str(out), "--overwrite_output_dir"]) == 0


# ---- the shared base -----------------------------------------------------------------------------------------------
def test_require_file_accepts_either_spelling(tmp_path):
    with gzip.open(tmp_path / "x.csv.gz", "wt") as f:
        f.write("a\n1\n")
    assert require_file(tmp_path / "x.csv", "x", "get it") == tmp_path / "x.csv.gz"
    (tmp_path / "y.csv").write_text("a\n")
    assert require_file(tmp_path / "y.csv.gz", "y", "get it") == tmp_path / "y.csv"
    with pytest.raises(RecipeInputError, match=r"the z table not found: .*z\.csv and z\.csv\.gz.*Fix: download Z"):
        require_file(tmp_path / "z.csv", "the z table", "download Z")
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "z.csv").write_text("a\n")  # a file that moved between dataset versions
    assert require_file(tmp_path / "v2" / "z.csv", "z", "get it", alternatives=[tmp_path / "v1" / "z.csv"]) == (
        tmp_path / "v1" / "z.csv"
    )
    with pytest.raises(RecipeInputError, match=r"z\.csv, z\.csv\.gz, .*core/z\.csv and .*core/z\.csv\.gz"):
        require_file(tmp_path / "z.csv", "z", "get it", alternatives=[tmp_path / "core" / "z.csv"])
    require_columns(pd.DataFrame(columns=["a", "b"]), ["a"], "f.csv", "v1")
    with pytest.raises(RecipeSchemaError, match=r"f\.csv: missing column\(s\) 'c'; .*expects v1"):
        require_columns(pd.DataFrame(columns=["a", "b"]), ["a", "c"], "f.csv", "v1")


def test_parser_and_report_never_drop_silently(tmp_path):
    args = recipe_parser("demo_x", "d").parse_args(["--demo_x_dir", "a", "--output_dir", "b", "--on_error", "skip"])
    assert (args.demo_x_dir, args.on_error, args.seed, args.overwrite_output_dir) == ("a", "skip", 0, False)
    with pytest.raises(SystemExit):
        recipe_parser("demo_x", "d").parse_args(["--demo_x_dir", "a", "--output_dir", "b", "--on_error", "ignore"])
    report = RecipeReport("x")
    err = DataError("corrupt", "bad bytes", sample_id="s1", modality="signal_ecg")
    with pytest.raises(DataError):
        report.handle(err, "raise")
    assert report.handle(err, "skip_sample") == "sample" and report.handle(err, "skip_modality") == "modality"
    report.exclude("filtered", 2, "row 9")
    report.finish(5)
    d = report.as_dict()
    assert d["dropped"] == 3 and d["kept"] == 5 and d["excluded"]["filtered"]["examples"] == ["row 9"]
    assert d["skipped"]["total"] == 1 and d["skipped"]["modality_total"] == 1


def test_write_recipe_output_validates_before_putting_the_manifest_in_place(tmp_path):
    table = pd.DataFrame(
        {"sample_id": ["a", "b"], "patient_id": ["p", "q"], "split": ["train", "test"], "text_note": ["x", "y"]}
    )
    kwargs = dict(name="x", provenance={}, licence_note="n", versions={}, report=RecipeReport("x"))
    path = write_recipe_output(table, tmp_path, **kwargs)
    assert path.is_file() and json.loads((tmp_path / "manifest.parquet.meta.json").read_text())["rows"] == 2
    bad = table.assign(signal_ecg=["missing.npz", None])
    with pytest.raises(RecipeOutputError, match=r"(?s)does not pass bioperceiver.data.validate.*missing\.npz"):
        write_recipe_output(bad, tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad" / "manifest.parquet").exists()
    assert (tmp_path / "bad" / "validation_report.json").is_file()
    assert sorted(p.name for p in (tmp_path / "bad").iterdir()) == ["validation_report.json"]
    with pytest.raises(RecipeSplitError, match="'p'"):
        write_recipe_output(table.assign(patient_id=["p", "p"]), tmp_path / "leak", **kwargs)


def test_nothing_kept_is_a_clear_error_with_the_counts(tmp_path):
    src = write_ptbxl(tmp_path / "in", default_ptbxl_records()[:2], rates=(100,))
    for ecg_id in (1, 2):
        src.record_path(ecg_id).with_suffix(".dat").unlink()
    with pytest.raises(RecipeOutputError, match=r"(?s)no row kept.*missing_record"):
        ptbxl.build_ptbxl(src.root, tmp_path / "out", on_error="skip_sample")
    assert not (tmp_path / "out" / "manifest.parquet").exists()
