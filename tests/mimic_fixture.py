"""Writers of tiny MIMIC-IV / -Note / CXR-JPG / -ECG folders in the datasets' real layouts (synthetic content).

File names, folder layout, headers (column order as distributed), time formats and gzip-or-not follow the PhysioNet
releases: ``hosp/*.csv.gz``, ``note/{discharge,radiology}.csv.gz``, ``mimic-cxr-2.0.0-{metadata,split,chexpert}.csv``
with ``files/p{xx}/p{subject}/s{study}/{dicom_id}.jpg``, ``record_list.csv`` + WFDB records under ``files/``.
Every value is made up; nothing here comes from the credentialed data.

:func:`write_mimic_fixture` returns a :class:`Fixture` with the folders and the facts tests check against (which
note was written after which anchor, which lab is in which window).
"""

from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bioperceiver.data.recipes.mimic import CHEXPERT_FINDINGS

LAB_HEADER = [
    "labevent_id",
    "subject_id",
    "hadm_id",
    "specimen_id",
    "itemid",
    "order_provider_id",
    "charttime",
    "storetime",
    "value",
    "valuenum",
    "valueuom",
    "ref_range_lower",
    "ref_range_upper",
    "flag",
    "priority",
    "comments",
]
NOTE_HEADER = ["note_id", "subject_id", "hadm_id", "note_type", "note_seq", "charttime", "storetime", "text"]
CXR_META_HEADER = [
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
]
CHEXPERT = list(CHEXPERT_FINDINGS)  # the 14 columns of mimic-cxr-2.0.0-chexpert.csv
LAB_ITEMS = [(50912, "Creatinine", "Blood", "Chemistry"), (50971, "Potassium", "Blood", "Chemistry"),
             (51006, "Urea Nitrogen", "Blood", "Chemistry"), (51237, "INR(PT)", "Blood", "Hematology")]  # fmt: skip


def write_csv(path: Path, header: list[str], rows: list[list], gz: bool) -> Path:
    """A CSV as PhysioNet ships it (``.csv.gz`` when ``gz``); ``None`` -> an empty field."""
    path = path.with_name(path.name + ".gz") if gz else path
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if gz else open
    with opener(path, "wt", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow(["" if v is None else v for v in r])
    return path


def lab_row(i: int, subject: int, hadm, itemid: int, charttime: str, storetime: str | None, valuenum) -> list:
    return [i, subject, hadm, 1000 + i, itemid, "P12345", charttime, storetime, valuenum, valuenum, "mg/dL",
            0.5, 1.2, None, "ROUTINE", None]  # fmt: skip


@dataclass
class Fixture:
    root: Path
    mimic_dir: Path
    note_dir: Path
    cxr_dir: Path
    ecg_dir: Path
    facts: dict = field(default_factory=dict)


def _jpeg(path: Path, seed: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(path, format="JPEG")


def _wfdb(record_dir: Path, name: str, seed: int) -> None:
    import wfdb

    record_dir.mkdir(parents=True, exist_ok=True)
    t = np.arange(500) / 500.0
    sig = np.stack([np.sin(2 * np.pi * (1 + k) * t) * 0.5 + 0.01 * seed for k in range(12)], axis=1)
    leads = ["I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6"]
    wfdb.wrsamp(name, fs=500, units=["mV"] * 12, sig_name=leads, p_signal=sig, fmt=["16"] * 12,
                write_dir=str(record_dir))  # fmt: skip


def write_mimic_fixture(root: Path, *, gz: bool = True, corrupt_ecg: bool = False) -> Fixture:
    """Three subjects, each with an admission, a CXR study inside it, labs before and after the study, notes written
    before and after it, and an ECG a few hours before it.

    * subject 10000032: admission 2180-05-06 19:00 -> 2180-05-10 12:00; CXR study 50000001 on 2180-05-07 10:00:00;
      labs at 05-07 08:00 (in the 24 h window), 05-05 06:00 (outside it), 05-07 09:00 with storetime 11:00 (taken
      before the study, known only after it) and 05-07 12:00 (after); an earlier discharge note (admission
      2180-01-01..01-03) and the discharge note of this admission (written 05-10, after the anchor); the study's own
      radiology report at 05-07 10:05 and a later radiology report on 05-09; an ECG at 05-07 07:00.
    * subject 10000764: admission 2132-10-14..10-19, CXR study 50000002 at 2132-10-15 14:30, view AP, one lab.
    * subject 10001217: no admission around its CXR study 50000003 (2157-11-18 05:00), no labs.
    """
    mimic = root / "mimiciv" / "3.1"
    note = root / "mimic-iv-note" / "2.2" / "note"
    cxr = root / "mimic-cxr-jpg" / "2.1.0"
    ecg = root / "mimic-iv-ecg" / "1.0"
    hosp = mimic / "hosp"
    write_csv(hosp / "patients.csv", ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"],
              [[10000032, "F", 52, 2180, "2014 - 2016", None], [10000764, "M", 86, 2132, "2014 - 2016", None],
               [10001217, "F", 55, 2157, "2011 - 2013", None]], gz)  # fmt: skip
    adm_header = ["subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type",
                  "admit_provider_id", "admission_location", "discharge_location", "insurance", "language",
                  "marital_status", "race", "edregtime", "edouttime", "hospital_expire_flag"]  # fmt: skip
    write_csv(hosp / "admissions.csv", adm_header, [
        [10000032, 22595853, "2180-05-06 19:00:00", "2180-05-10 12:00:00", None, "URGENT", "P874LG",
         "TRANSFER FROM HOSPITAL", "HOME", "Other", "ENGLISH", "WIDOWED", "WHITE", None, None, 0],
        [10000032, 22841357, "2180-01-01 10:00:00", "2180-01-03 12:00:00", None, "EW EMER.", "P09Q6Y",
         "EMERGENCY ROOM", "HOME", "Medicaid", "ENGLISH", "WIDOWED", "WHITE", None, None, 0],
        [10000764, 27897940, "2132-10-14 23:31:00", "2132-10-19 16:30:00", None, "OBSERVATION ADMIT", "P2358X",
         "EMERGENCY ROOM", "HOME", "Medicare", "ENGLISH", "MARRIED", "WHITE", None, None, 0],
    ], gz)  # fmt: skip
    write_csv(hosp / "d_labitems.csv", ["itemid", "label", "fluid", "category"], [list(x) for x in LAB_ITEMS], gz)
    labs = [
        lab_row(1, 10000032, 22595853, 50912, "2180-05-07 08:00:00", "2180-05-07 08:30:00", 1.1),  # in window
        lab_row(2, 10000032, None, 50971, "2180-05-05 06:00:00", "2180-05-05 07:00:00", 4.2),  # > 24 h before
        lab_row(3, 10000032, 22595853, 51006, "2180-05-07 09:00:00", "2180-05-07 11:00:00", 23.0),  # known after
        lab_row(4, 10000032, 22595853, 50912, "2180-05-07 12:00:00", "2180-05-07 12:30:00", 9.9),  # after
        lab_row(5, 10000032, 22595853, 50912, "2180-05-07 06:00:00", "2180-05-07 06:30:00", 0.8),  # older same item
        lab_row(6, 10000764, 27897940, 51237, "2132-10-15 07:00:00", None, 1.3),  # no storetime: charttime counts
        lab_row(7, 99999999, None, 51237, "2132-10-15 07:00:00", None, 1.0),  # a subject with no anchor
    ]
    write_csv(hosp / "labevents.csv", LAB_HEADER, labs, gz)
    write_csv(hosp / "diagnoses_icd.csv", ["subject_id", "hadm_id", "seq_num", "icd_code", "icd_version"], [
        [10000032, 22595853, 1, "5723", 9], [10000032, 22595853, 2, "78959", 9],
        [10000764, 27897940, 1, "I5023", 10], [10000032, 22841357, 1, "E119", 10],
    ], gz)  # fmt: skip
    write_csv(note / "discharge.csv", NOTE_HEADER, [
        ["10000032-DS-1", 10000032, 22841357, "DS", 1, "2180-01-03 00:00:00", "2180-01-03 15:00:00",
         "Discharge summary of the January admission: diabetes."],
        ["10000032-DS-2", 10000032, 22595853, "DS", 2, "2180-05-10 00:00:00", "2180-05-10 14:00:00",
         "FUTURE NOTE: discharge summary of the May admission, written after the X-ray."],
    ], gz)  # fmt: skip
    write_csv(note / "radiology.csv", NOTE_HEADER, [
        ["10000032-RR-1", 10000032, 22595853, "RR", 1, "2180-05-07 10:05:00", "2180-05-07 13:00:00",
         "CHEST PA: report of study 50000001, small effusion."],
        ["10000032-RR-2", 10000032, 22595853, "RR", 2, "2180-05-09 09:00:00", "2180-05-09 11:00:00",
         "LATER REPORT: written two days after the anchor study."],
        ["10000764-RR-1", 10000764, 27897940, "RR", 1, "2132-10-15 14:00:00", "2132-10-15 16:00:00",
         "CHEST AP: report of study 50000002, cardiomegaly."],
    ], gz)  # fmt: skip
    studies = [
        ("d1-pa", 10000032, 50000001, "PA", 21800507, 100000.0),
        ("d1-lat", 10000032, 50000001, "LATERAL", 21800507, 100100.0),
        ("d2-ap", 10000764, 50000002, "AP", 21321015, 143000.5),
        ("d3-pa", 10001217, 50000003, "PA", 21571118, 50000.0),
    ]
    meta_rows, split_rows = [], []
    for k, (dicom, subject, study, view, date, tm) in enumerate(studies):
        meta_rows.append([dicom, subject, study, "CHEST (PA AND LAT)", view, 32, 32, date, tm, "CHEST",
                          "postero-anterior", "Erect"])  # fmt: skip
        s = str(subject)
        _jpeg(cxr / "files" / f"p{s[:2]}" / f"p{s}" / f"s{study}" / f"{dicom}.jpg", k)
        split_rows.append([dicom, study, subject, {10000032: "train", 10000764: "validate", 10001217: "test"}[subject]])
    write_csv(cxr / "mimic-cxr-2.0.0-metadata.csv", CXR_META_HEADER, meta_rows, gz)
    write_csv(cxr / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"], split_rows, gz)
    chex = [[10000032, 50000001] + [None] * 14, [10000764, 50000002] + [None] * 14, [10001217, 50000003] + [None] * 14]
    chex[0][2 + CHEXPERT.index("Pleural Effusion")] = 1.0
    chex[0][2 + CHEXPERT.index("Edema")] = -1.0
    chex[1][2 + CHEXPERT.index("Cardiomegaly")] = 1.0
    chex[1][2 + CHEXPERT.index("Pneumonia")] = 0.0
    chex[2][2 + CHEXPERT.index("No Finding")] = 1.0
    write_csv(cxr / "mimic-cxr-2.0.0-chexpert.csv", ["subject_id", "study_id", *CHEXPERT], chex, gz)
    ecgs = [
        (10000032, 40000001, "2180-05-07 07:00:00"),  # 3 h before study 50000001
        (10000032, 40000002, "2180-05-08 07:00:00"),  # after it: never aligned to it
        (10000764, 40000003, "2132-10-10 07:00:00"),  # 5 days before study 50000002: outside 24 h
    ]
    rec_rows, mm_rows = [], []
    for k, (subject, study, t) in enumerate(ecgs):
        rel = f"files/p{str(subject)[:4]}/p{subject}/s{study}/{study}"
        _wfdb(ecg / Path(rel).parent, str(study), k)
        rec_rows.append([subject, study, f"{study}", t, rel])
        mm_rows.append([subject, study, 6848296, t, "Sinus rhythm", "Normal ECG", *[None] * 16, 8, 40, 820, 40, 130,
                        220, 310, 420, 60, 45, 50])  # fmt: skip
    if corrupt_ecg:
        (ecg / Path(rec_rows[0][4] + ".dat")).write_bytes(b"\x00")  # truncated signal file
    write_csv(ecg / "record_list.csv", ["subject_id", "study_id", "file_name", "ecg_time", "path"], rec_rows, False)
    mm_header = ["subject_id", "study_id", "cart_id", "ecg_time", *[f"report_{i}" for i in range(18)], "bandwidth",
                 "filtering", "rr_interval", "p_onset", "p_end", "qrs_onset", "qrs_end", "t_end", "p_axis",
                 "qrs_axis", "t_axis"]  # fmt: skip
    write_csv(ecg / "machine_measurements.csv", mm_header, mm_rows, False)
    return Fixture(
        root,
        mimic,
        note,
        cxr,
        ecg,
        {"future_note": "FUTURE NOTE", "later_report": "LATER REPORT", "study_report": "report of study 50000001"},
    )


def write_labevents(path: Path, n_rows: int, n_subjects: int, seed: int = 0, chunk: int = 1_000_000) -> Path:
    """A ``labevents.csv`` of ``n_rows`` rows in the real header (for the benchmark), written in chunks with
    pyarrow; subjects 10000000 + [0, n_subjects), times spread over 2180-2181."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = np.datetime64("2180-01-01T00:00:00")
    writer = None
    try:
        for lo in range(0, n_rows, chunk):
            n = min(chunk, n_rows - lo)
            ids = np.arange(lo, lo + n)
            subj = 10_000_000 + rng.integers(0, n_subjects, n)
            ct = start + rng.integers(0, 2 * 365 * 24 * 3600, n).astype("timedelta64[s]")
            st = ct + rng.integers(600, 6 * 3600, n).astype("timedelta64[s]")
            items = np.array([i[0] for i in LAB_ITEMS])[rng.integers(0, len(LAB_ITEMS), n)]
            val = np.round(rng.gamma(2.0, 2.0, n), 2)
            table = pa.table({
                "labevent_id": ids, "subject_id": subj, "hadm_id": pa.nulls(n, pa.int64()), "specimen_id": ids + 7,
                "itemid": items, "order_provider_id": pa.array(["P12345"] * n), "charttime": ct.astype(str),
                "storetime": st.astype(str), "value": val.astype(str), "valuenum": val,
                "valueuom": pa.array(["mg/dL"] * n), "ref_range_lower": np.full(n, 0.5),
                "ref_range_upper": np.full(n, 1.2), "flag": pa.nulls(n, pa.string()),
                "priority": pa.array(["ROUTINE"] * n), "comments": pa.nulls(n, pa.string()),
            })  # fmt: skip
            table = table.set_column(6, "charttime", pa.array(np.char.replace(ct.astype(str), "T", " ")))
            table = table.set_column(7, "storetime", pa.array(np.char.replace(st.astype(str), "T", " ")))
            if writer is None:
                writer = pacsv.CSVWriter(str(path), table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    return path
