"""The MIMIC-IV recipe on tiny fixture folders in the datasets' real layouts (see tests/mimic_fixture.py)."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mimic_fixture import write_labevents, write_mimic_fixture

from bioperceiver.data.manifest import metadata_path, read_manifest
from bioperceiver.data.recipes import mimic
from bioperceiver.data.recipes.common import RecipeInputError, RecipeSchemaError, RecipeSplitError
from bioperceiver.data.validate import validate_manifest

TEXT_COLUMNS = ("text_radiology", "text_discharge", "text_ecg_report")


def run(fx, out: Path, *extra: str) -> pd.DataFrame:
    argv = ["--mimic_dir", str(fx.mimic_dir), "--note_dir", str(fx.note_dir), "--cxr_dir", str(fx.cxr_dir)]
    argv += ["--ecg_dir", str(fx.ecg_dir), "--output_dir", str(out), *extra]
    args = mimic.build_parser().parse_args(argv)
    args.block_size = 1 << 16
    path = mimic.build_mimic_manifest(args)
    return pd.read_parquet(path).set_index("sample_id")


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return write_mimic_fixture(tmp_path_factory.mktemp("mimic"), gz=True)


@pytest.fixture(scope="module")
def cxr(fx, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "cxr"
    return run(fx, out), out


def test_cxr_anchor_rows_labels_splits_and_validation(cxr):
    df, out = cxr
    assert list(df.index) == ["cxr:50000001", "cxr:50000002", "cxr:50000003"]
    # one image per study: the PA view wins over the lateral, in the real files/p{xx}/p{subject}/s{study} layout
    assert df.loc["cxr:50000001", "image_cxr"].endswith("files/p10/p10000032/s50000001/d1-pa.jpg")
    # the official split per subject, `validate` renamed
    assert df["split"].to_dict() == {"cxr:50000001": "train", "cxr:50000002": "validation", "cxr:50000003": "test"}
    assert list(df.loc["cxr:50000001", "label_chexpert"]) == ["Pleural Effusion"]
    assert list(df.loc["cxr:50000001", "meta_chexpert_uncertain"]) == ["Edema"]
    assert sorted(df.loc["cxr:50000001", "label_icd"]) == ["ICD9:5723", "ICD9:78959"]
    assert df.loc["cxr:50000003", "label_icd"] is None  # no admission around that study
    patient = json.loads(df.loc["cxr:50000001", "tabular_patient"])
    assert patient == {"gender": "F", "age": 52.0, "admission_type": "URGENT"}
    modality_columns = {
        c for c in df.columns if not c.startswith(("label_", "meta_")) and c not in ("patient_id", "split")
    }
    assert modality_columns == set(mimic.MODALITY_COLUMNS)  # every modality present in this fixture
    report = validate_manifest(read_manifest(out / "manifest.parquet"))
    assert report.ok, report.summary()
    meta = json.loads(metadata_path(out / "manifest.parquet").read_text())
    assert meta["versions"]["mimic_iv"] == "3.1"  # read from the PhysioNet path .../mimiciv/3.1
    assert meta["modalities"] == {} or set(meta["modalities"]) <= set(df.columns)
    assert meta["counts"]["read"]["labevents.csv.gz"] == 7
    assert meta["counts"]["read"]["diagnoses_icd.csv.gz"] == 4  # every row read, not only the kept ones
    assert meta["labels"] == {"label_icd": "multilabel", "label_chexpert": "multilabel"}


def test_labs_window_and_known_by_the_anchor(cxr):
    df, _ = cxr
    labs = json.loads(df.loc["cxr:50000001", "tabular_labs"])
    # 08:00 creatinine (latest in the 24 h window; the 06:00 one is older, the 12:00 one after the study);
    # the 09:00 urea nitrogen was taken before the study but resulted at 11:00, after it: left out;
    # the potassium of 2 days before is outside the window
    assert labs == {"Creatinine (Blood) [50912]": 1.1}
    assert json.loads(df.loc["cxr:50000002", "tabular_labs"]) == {"INR(PT) (Blood) [51237]": 1.3}
    assert df.loc["cxr:50000003", "tabular_labs"] is None


def test_no_note_written_after_the_anchor_appears(cxr, fx):
    df, _ = cxr
    texts = " ".join(str(v) for c in TEXT_COLUMNS for v in df[c].dropna())
    assert fx.facts["future_note"] not in texts  # the discharge note of the anchor admission, written at discharge
    assert fx.facts["later_report"] not in texts  # a later radiology report of the same subject
    # what is there: the study's own report (matched by time) and the discharge note of the earlier admission
    assert fx.facts["study_report"] in df.loc["cxr:50000001", "text_radiology"]
    assert df.loc["cxr:50000001", "meta_discharge_note_id"] == "10000032-DS-1"


def test_ecg_aligned_before_the_anchor_and_converted(cxr, fx):
    df, out = cxr
    import wfdb

    # the ECG 3 h before the study, not the one the day after; none within 24 h for the second subject
    assert df.loc["cxr:50000001", "meta_ecg_study_id"] == 40000001
    assert pd.isna(df.loc["cxr:50000002", "signal_ecg"])
    with np.load(out / df.loc["cxr:50000001", "signal_ecg"]) as z:
        rec = wfdb.rdrecord(str(fx.ecg_dir / df.loc["cxr:50000001", "meta_ecg_path"]))
        np.testing.assert_allclose(z["values"], rec.p_signal.T.astype(np.float32))
        assert list(z["channels"]) == rec.sig_name and float(z["sampling_rate"]) == 500.0
    assert df.loc["cxr:50000001", "text_ecg_report"] == "Sinus rhythm; Normal ECG"
    assert json.loads(df.loc["cxr:50000001", "tabular_ecg"])["qrs_axis"] == 45.0


def test_allow_after_anchor_takes_the_admission_discharge_note(fx, tmp_path):
    df = run(fx, tmp_path / "o", "--allow_after_anchor", "--ecg_signals", "none")
    assert fx.facts["future_note"] in df.loc["cxr:50000001", "text_discharge"]
    labs = json.loads(df.loc["cxr:50000001", "tabular_labs"])
    assert labs == {"Creatinine (Blood) [50912]": 1.1, "Urea Nitrogen (Blood) [51006]": 23.0}
    assert "signal_ecg" not in df  # --ecg_signals none: the record path only
    assert df.loc["cxr:50000001", "meta_ecg_path"].endswith("s40000001/40000001")


def test_ecg_and_admission_anchors_uncompressed(tmp_path):
    fx = write_mimic_fixture(tmp_path / "plain", gz=False)
    df = run(fx, tmp_path / "ecg", "--anchor", "ecg")
    assert sorted(df.index) == ["ecg:40000001", "ecg:40000002", "ecg:40000003"]
    assert df["signal_ecg"].notna().all()
    # the day-after ECG sees the study report (known 05-07 13:00) but not the later report or the future note
    assert fx.facts["study_report"] in df.loc["ecg:40000002", "text_radiology"]
    texts = " ".join(str(v) for c in TEXT_COLUMNS for v in df[c].dropna())
    assert fx.facts["later_report"] not in texts and fx.facts["future_note"] not in texts
    assert set(df["split"]) <= {"train", "validation", "test"}
    adm = run(fx, tmp_path / "adm", "--anchor", "admission")
    assert sorted(adm.index) == ["adm:22595853", "adm:22841357", "adm:27897940"]
    assert adm.loc["adm:22595853", "meta_discharge_note_id"] == "10000032-DS-1"  # the January one, not its own
    assert pd.isna(adm.loc["adm:22841357", "text_discharge"])
    assert sorted(adm.loc["adm:22841357", "label_icd"]) == ["ICD10:E119"]
    assert adm.groupby("patient_id")["split"].nunique().max() == 1


def test_missing_file_names_it_and_where_it_comes_from(fx, tmp_path):
    bad = tmp_path / "mimiciv" / "3.1"
    shutil.copytree(fx.mimic_dir, bad)
    (bad / "hosp" / "d_labitems.csv.gz").unlink()
    with pytest.raises(RecipeInputError, match=r"d_labitems\.csv.*physionet\.org/content/mimiciv"):
        run(fx.__class__(fx.root, bad, fx.note_dir, fx.cxr_dir, fx.ecg_dir), tmp_path / "o")
    argv = ["--mimic_dir", str(bad), "--cxr_dir", str(fx.cxr_dir), "--output_dir", str(tmp_path / "o2")]
    assert mimic.main(argv) == 1  # the CLI: one clear line, exit status 1
    assert not (tmp_path / "o2").exists()  # a failed start leaves nothing behind


def test_renamed_column_names_file_column_and_version(fx, tmp_path):
    bad = tmp_path / "mimiciv" / "2.2"
    shutil.copytree(fx.mimic_dir, bad)
    lab = bad / "hosp" / "labevents.csv.gz"
    with gzip.open(lab, "rt") as f:
        text = f.read()
    with gzip.open(lab, "wt") as f:
        f.write(text.replace(",valuenum,", ",value_num,", 1))
    with pytest.raises(RecipeSchemaError, match=r"labevents\.csv\.gz.*'valuenum'.*value_num.*MIMIC-IV 2\.2"):
        run(fx.__class__(fx.root, bad, fx.note_dir, fx.cxr_dir, fx.ecg_dir), tmp_path / "o")


def test_old_layouts_are_refused(tmp_path):
    old = tmp_path / "mimiciv" / "1.0"
    (old / "core").mkdir(parents=True)
    (old / "hosp").mkdir()
    with pytest.raises(RecipeSchemaError, match=r"core/.*1\.x"):
        mimic.detect_version(old, "auto")
    hosp = tmp_path / "m3" / "hosp"
    hosp.mkdir(parents=True)
    (hosp / "patients.csv").write_text("ROW_ID,SUBJECT_ID,GENDER\n1,2,F\n")
    with pytest.raises(RecipeSchemaError, match="MIMIC-III"):
        mimic.check_table(hosp / "patients.csv", mimic.TABLES["patients"], "3.1")


@pytest.mark.parametrize("policy", ["raise", "skip_modality", "skip_sample"])
def test_corrupt_ecg_record(policy, tmp_path):
    fx = write_mimic_fixture(tmp_path / "c", gz=True, corrupt_ecg=True)
    if policy == "raise":
        with pytest.raises(ValueError, match=r"cxr:50000001.*signal_ecg.*40000001"):
            run(fx, tmp_path / "o", "--on_error", policy)
        return
    df = run(fx, tmp_path / "o", "--on_error", policy)
    meta = json.loads(metadata_path(tmp_path / "o" / "manifest.parquet").read_text())
    assert "unreadable_ecg" in json.dumps(meta["counts"]["skipped"])
    if policy == "skip_modality":
        assert "cxr:50000001" in df.index and "signal_ecg" not in df  # the only ECG was the corrupt one
    else:
        assert "cxr:50000001" not in df.index and len(df) == 2


def test_patient_in_two_official_splits(fx, tmp_path):
    bad = tmp_path / "cxr"
    shutil.copytree(fx.cxr_dir, bad)
    split = bad / "mimic-cxr-2.0.0-split.csv.gz"
    with gzip.open(split, "rt") as f:
        text = f.read()
    with gzip.open(split, "wt") as f:
        f.write(text.replace("d1-lat,50000001,10000032,train", "d1-lat,50000001,10000032,test"))
    with pytest.raises(RecipeSplitError, match="10000032"):
        run(fx.__class__(fx.root, fx.mimic_dir, fx.note_dir, bad, fx.ecg_dir), tmp_path / "o")


@pytest.mark.parametrize("max_join_rows", [2_000_000, 300])
def test_streamed_labs_equal_a_whole_pandas_read(tmp_path, max_join_rows):
    """The bounded-memory path (many small blocks, joins sliced or not) gives exactly what a whole-file pandas
    read + merge gives."""
    path = write_labevents(tmp_path / "labevents.csv", 20_000, 40, chunk=7_000)
    rng = np.random.default_rng(1)
    anchors = pd.DataFrame(
        {
            "anchor_idx": np.arange(60),
            "subject_id": 10_000_000 + rng.integers(0, 50, 60),  # some subjects have no lab at all
            "anchor_time": pd.Timestamp("2180-01-01") + pd.to_timedelta(rng.integers(0, 700 * 24, 60), unit="h"),
        }
    )
    spec = mimic.TABLES["labevents"]
    pick = mimic.pick_labs(pd.Timedelta(hours=72), allow_after=False)
    report = mimic.RecipeReport("t")
    got = mimic.stream_aligned(
        path, spec, list(spec.columns), anchors, pick=pick, keys=("anchor_idx", "itemid"), rank="rank",
        block_size=1 << 16, report=report, desc="t", max_join_rows=max_join_rows,
    )  # fmt: skip
    assert report.read["labevents.csv"] == 20_000
    full = pd.read_csv(path, parse_dates=["charttime", "storetime"])
    ref = pick(full.merge(anchors, on="subject_id"))
    ref = ref.sort_values(["anchor_idx", "itemid", "rank"]).drop_duplicates(["anchor_idx", "itemid"], keep="last")
    cols = ["anchor_idx", "itemid", "charttime", "valuenum"]
    a = got[cols].sort_values(cols[:2]).reset_index(drop=True)
    b = ref[cols].sort_values(cols[:2]).reset_index(drop=True)
    assert len(a) > 50
    pd.testing.assert_frame_equal(a, b, check_dtype=False)


def test_missing_cxr_image_is_named_or_counted(fx, tmp_path):
    bad = tmp_path / "cxr"
    shutil.copytree(fx.cxr_dir, bad)
    (bad / "files" / "p10" / "p10000764" / "s50000002" / "d2-ap.jpg").unlink()
    moved = fx.__class__(fx.root, fx.mimic_dir, fx.note_dir, bad, fx.ecg_dir)
    with pytest.raises(ValueError, match=r"cxr:50000002.*image_cxr.*d2-ap\.jpg"):
        run(moved, tmp_path / "o", "--ecg_signals", "none")
    df = run(moved, tmp_path / "o", "--ecg_signals", "none", "--on_error", "skip_modality")
    assert pd.isna(df.loc["cxr:50000002", "image_cxr"]) and df.loc["cxr:50000002", "text_radiology"]
    meta = json.loads(metadata_path(tmp_path / "o" / "manifest.parquet").read_text())
    assert "missing_image" in json.dumps(meta["counts"]["skipped"])
