"""MIMIC-IV (+ MIMIC-IV-Note, MIMIC-CXR-JPG, MIMIC-IV-ECG) -> a manifest of anchor events with time-aligned modalities.

Command line::

    python -m bioperceiver.data.recipes.mimic --mimic_dir MIMIC_IV --output_dir OUT \\
        [--note_dir NOTE] [--cxr_dir CXR_JPG] [--ecg_dir ECG] [--anchor cxr|ecg|admission] \\
        [--lab_window_hours 24] [--ecg_window_hours 24] [--radiology_window_hours 24] \\
        [--discharge_window_days 365] [--allow_after_anchor] [--mimic_version auto|2.2|3.0|3.1]

Inputs, in the layouts PhysioNet distributes (every CSV may be gzipped or not):

================  ==================================================================================================
folder            files read (columns read)
================  ==================================================================================================
``--mimic_dir``   ``hosp/patients`` (subject_id, gender, anchor_age, anchor_year), ``hosp/admissions`` (subject_id,
                  hadm_id, admittime, dischtime, admission_type), ``hosp/labevents`` (subject_id, itemid, charttime,
                  storetime, value, valuenum), ``hosp/d_labitems`` (itemid, label, fluid), ``hosp/diagnoses_icd``
                  (hadm_id, icd_code, icd_version)
``--note_dir``    MIMIC-IV-Note ``discharge`` and ``radiology`` (note_id, subject_id, hadm_id, charttime, storetime,
                  text); default ``<mimic_dir>/note``; optional (no text columns without it)
``--cxr_dir``     MIMIC-CXR-JPG ``mimic-cxr-2.0.0-metadata`` (dicom_id, subject_id, study_id, ViewPosition, StudyDate,
                  StudyTime), ``-split`` (dicom_id, subject_id, split), ``-chexpert`` (subject_id, study_id, the 14
                  findings) and the images ``files/p{xx}/p{subject}/s{study}/{dicom_id}.jpg``; MIMIC-CXR's own report
                  ``files/p{xx}/p{subject}/s{study}.txt`` is used when present; required for ``--anchor cxr``
``--ecg_dir``     MIMIC-IV-ECG ``record_list`` (subject_id, study_id, ecg_time, path) + WFDB records under ``files/``,
                  optional ``machine_measurements`` (report_0..report_17, intervals and axes)
================  ==================================================================================================

One row per **anchor event** (``--anchor``): a CXR study (``sample_id = cxr:<study_id>``, the anchor time is the
study's ``StudyDate`` + ``StudyTime``, one image per study, the first view in ``--cxr_views``), an ECG
(``ecg:<study_id>``, ``ecg_time``) or an admission (``adm:<hadm_id>``, ``admittime``). The other modalities are
aligned to the anchor time ``t``; **nothing available after ``t`` enters a row** unless ``--allow_after_anchor``:

* ``tabular_labs``: the last result per lab item with ``t - lab_window < charttime <= t`` and known by ``t``
  (``storetime``, else ``charttime``, ``<= t``); ``{"<label> (<fluid>) [<itemid>]": valuenum, or the text value}``.
* ``text_radiology``: for a CXR anchor the report *of that study* (MIMIC-CXR's ``s<study>.txt`` when present, else
  the MIMIC-IV-Note radiology note of the subject whose ``charttime`` is closest to ``t`` within
  ``--cxr_report_tolerance_hours``: MIMIC-IV-Note carries no CXR ``study_id``, so this match is by time). The report
  describes the anchor image and is written after it: ``label_chexpert`` is extracted from it, so leave
  ``text_radiology`` out when finetuning on ``label_chexpert`` (``--cxr_report exclude`` leaves it out of the
  manifest). For other anchors: the latest radiology note known by ``t`` within ``--radiology_window_hours``.
* ``text_discharge``: the latest discharge note known by ``t`` (``storetime``, else ``charttime``) within
  ``--discharge_window_days`` -- i.e. from an earlier admission. The discharge note of the anchor's own admission is
  written at discharge, after ``t``: it enters only with ``--allow_after_anchor`` (then it is preferred).
* ``signal_ecg`` (+ ``text_ecg_report``, ``tabular_ecg`` from ``machine_measurements``): the anchor ECG, or for
  other anchors the closest ECG with ``t - ecg_window <= ecg_time <= t``. WFDB records are converted to
  ``OUT/signals/ecg/<study_id>.npz`` (``values`` mV float32 (leads, samples), ``channels``, ``sampling_rate``) with
  ``wfdb`` (``pip install 'bioperceiver[recipes]'``); ``--ecg_signals none`` keeps only the path in ``meta_ecg_path``.
* ``tabular_patient``: gender, age at the anchor (``anchor_age + year(t) - anchor_year``), the admission type.
* labels: ``label_icd`` (``ICD<version>:<code>`` of the anchor's admission, coded at discharge: a target, never an
  input) and, for CXR anchors, ``label_chexpert`` (findings labelled 1.0; ``meta_chexpert_uncertain`` lists -1.0).

Splits are by ``subject_id``: with ``--anchor cxr`` MIMIC-CXR's official split (``validate`` -> ``validation``)
for the subject, a salted hash of the subject for subjects the split file does not list; otherwise the hash. A
subject in two official splits is an error naming it.

Scale: ``labevents`` (over 100M rows) and the note tables are never loaded whole. Every table is streamed with
``pyarrow.csv.open_csv`` in blocks (``--block_size_mb``) reading only the needed columns; each block is filtered to
the anchors' subjects (``pyarrow.compute.is_in``), joined to their anchors, filtered to the time windows and reduced
to the one kept value per (anchor, item) before the next block is read. Memory is the blocks pyarrow's reader
holds in flight (its readahead: measured ~200 MB above the imports with 4 MB blocks, ~700 MB with 16 MB blocks)
plus the output; it does not grow with the file (``benchmarks/recipes.py``).

Version drift: the recipe reads only columns present in both MIMIC-IV 2.2 and 3.x. A download in the MIMIC-IV 1.x
layout (``core/patients`` instead of ``hosp/patients``) or with MIMIC-III upper-case headers is refused with a
message naming the file; a missing column is an error naming the file, the column, the closest column present and
the version expected. ``--mimic_version auto`` reads the version from the PhysioNet download path
(``.../mimiciv/3.1/``) when there is one and records it in the sidecar.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import itertools
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from tqdm.auto import tqdm

from ..errors import DataError
from ..splits import split_of
from .common import (
    RecipeInputError,
    RecipeReport,
    RecipeSchemaError,
    check_patient_safe,
    prepare_output_dir,
    recipe_parser,
    require_columns,
    require_file,
    run_recipe,
    tabular_cell,
    write_recipe_output,
)

logger = logging.getLogger(__name__)

NAME = "mimic"
RECIPE_VERSION = 1
ANCHORS = ("cxr", "ecg", "admission")
SUPPORTED_VERSIONS = ("2.2", "3.0", "3.1")
CXR_PREFIX = "mimic-cxr-2.0.0"
CHEXPERT_FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)
ECG_MEASUREMENTS = ("rr_interval", "p_onset", "p_end", "qrs_onset", "qrs_end", "t_end", "p_axis", "qrs_axis", "t_axis")
LICENCE_NOTE = (
    "MIMIC-IV, MIMIC-IV-Note, MIMIC-CXR-JPG and MIMIC-IV-ECG are credentialed-access PhysioNet datasets under the "
    "PhysioNet Credentialed Health Data License 1.5.0: each user of this manifest needs their own credentialed "
    "access and signed data use agreement, must not share the data (this manifest and the files it points to "
    "included), and must not send it to third-party services that would retain it."
)
URLS = {
    "mimic": "https://physionet.org/content/mimiciv/",
    "note": "https://physionet.org/content/mimic-iv-note/",
    "cxr": "https://physionet.org/content/mimic-cxr-jpg/",
    "ecg": "https://physionet.org/content/mimic-iv-ecg/",
}
_TS = pa.timestamp("s")
# the modality columns a row may have; their kinds follow the manifest naming rule (``<kind>_<suffix>``)
MODALITY_COLUMNS = (
    "image_cxr",
    "text_radiology",
    "text_discharge",
    "text_ecg_report",
    "signal_ecg",
    "tabular_ecg",
    "tabular_labs",
    "tabular_patient",
)


@dataclass(frozen=True)
class TableSpec:
    """One input file: where it lies in its dataset, the columns read (with their Arrow types) and where it comes
    from."""

    relpath: str
    columns: dict[str, pa.DataType]
    dataset: str
    optional_columns: tuple[str, ...] = ()


TABLES = {
    "patients": TableSpec(
        "hosp/patients.csv",
        {"subject_id": pa.int64(), "gender": pa.string(), "anchor_age": pa.float64(), "anchor_year": pa.float64()},
        "mimic",
    ),
    "admissions": TableSpec(
        "hosp/admissions.csv",
        {
            "subject_id": pa.int64(),
            "hadm_id": pa.int64(),
            "admittime": _TS,
            "dischtime": _TS,
            "admission_type": pa.string(),
        },
        "mimic",
    ),
    "labevents": TableSpec(
        "hosp/labevents.csv",
        {
            "subject_id": pa.int64(),
            "itemid": pa.int64(),
            "charttime": _TS,
            "storetime": _TS,
            "value": pa.string(),
            "valuenum": pa.float64(),
        },
        "mimic",
    ),
    "d_labitems": TableSpec(
        "hosp/d_labitems.csv", {"itemid": pa.int64(), "label": pa.string(), "fluid": pa.string()}, "mimic"
    ),
    "diagnoses_icd": TableSpec(
        "hosp/diagnoses_icd.csv",
        {"hadm_id": pa.int64(), "icd_code": pa.string(), "icd_version": pa.int64()},
        "mimic",
    ),
    "discharge": TableSpec(
        "discharge.csv",
        {
            "note_id": pa.string(),
            "subject_id": pa.int64(),
            "hadm_id": pa.float64(),
            "charttime": _TS,
            "storetime": _TS,
            "text": pa.string(),
        },
        "note",
    ),
    "radiology": TableSpec(
        "radiology.csv",
        {
            "note_id": pa.string(),
            "subject_id": pa.int64(),
            "hadm_id": pa.float64(),
            "charttime": _TS,
            "storetime": _TS,
            "text": pa.string(),
        },
        "note",
    ),
    "cxr_metadata": TableSpec(
        f"{CXR_PREFIX}-metadata.csv",
        {
            "dicom_id": pa.string(),
            "subject_id": pa.int64(),
            "study_id": pa.int64(),
            "ViewPosition": pa.string(),
            "StudyDate": pa.int64(),
            "StudyTime": pa.float64(),
        },
        "cxr",
    ),
    "cxr_split": TableSpec(
        f"{CXR_PREFIX}-split.csv", {"dicom_id": pa.string(), "subject_id": pa.int64(), "split": pa.string()}, "cxr"
    ),
    "cxr_chexpert": TableSpec(
        f"{CXR_PREFIX}-chexpert.csv",
        {"subject_id": pa.int64(), "study_id": pa.int64(), **{f: pa.float64() for f in CHEXPERT_FINDINGS}},
        "cxr",
    ),
    "ecg_records": TableSpec(
        "record_list.csv",
        {"subject_id": pa.int64(), "study_id": pa.int64(), "ecg_time": _TS, "path": pa.string()},
        "ecg",
    ),
    "ecg_measurements": TableSpec(
        "machine_measurements.csv",
        {
            "study_id": pa.int64(),
            **{f"report_{i}": pa.string() for i in range(18)},
            **{m: pa.float64() for m in ECG_MEASUREMENTS},
        },
        "ecg",
        optional_columns=(*(f"report_{i}" for i in range(1, 18)), *ECG_MEASUREMENTS),
    ),
}
_DATASET_NAMES = {
    "mimic": "MIMIC-IV",
    "note": "MIMIC-IV-Note",
    "cxr": "MIMIC-CXR-JPG 2.0.0/2.1.0",
    "ecg": "MIMIC-IV-ECG 1.0",
}


# ------------------------------------------------------------------------------------------------------------------
# reading


def _where_from(dataset: str) -> str:
    return f"download {_DATASET_NAMES[dataset]} from PhysioNet ({URLS[dataset]})"


def csv_header(path: Path) -> list[str]:
    """The column names of a CSV (gzipped or not), from its first line only."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", newline="", encoding="utf-8") as f:
        return next(csv.reader(f), [])


def check_table(path: Path, spec: TableSpec, version: str) -> list[str]:
    """Check the header of ``path`` against ``spec``; returns the columns to read. Raises
    :class:`RecipeSchemaError` for an upper-case (MIMIC-III) header or a missing column."""
    header = csv_header(path)
    if header and all(h == h.upper() for h in header) and "SUBJECT_ID" in header:
        raise RecipeSchemaError(
            f"{path.name}: upper-case columns {header[:5]}... are MIMIC-III's layout; this recipe reads "
            f"{_DATASET_NAMES[spec.dataset]} (MIMIC-IV {version}). Fix: pass the MIMIC-IV download; file: {path}"
        )
    required = [c for c in spec.columns if c not in spec.optional_columns]
    expect = f"{_DATASET_NAMES[spec.dataset]}" + (f" (MIMIC-IV {version})" if spec.dataset == "mimic" else "")
    require_columns(pd.DataFrame(columns=header), required, path, expect)
    return [c for c in spec.columns if c in header]


def iter_batches(path: Path, spec: TableSpec, columns: Sequence[str], block_size: int) -> Iterator[pa.RecordBatch]:
    """Stream ``path`` in record batches of about ``block_size`` bytes of CSV, only ``columns``, typed."""
    reader = pacsv.open_csv(
        str(path),
        read_options=pacsv.ReadOptions(block_size=block_size),
        convert_options=pacsv.ConvertOptions(
            include_columns=list(columns),
            column_types={c: spec.columns[c] for c in columns},
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
        ),
    )
    yield from reader


def read_table(
    path: Path,
    spec: TableSpec,
    columns: Sequence[str],
    *,
    block_size: int,
    keep: tuple[str, pa.Array] | None = None,
    report: RecipeReport | None = None,
) -> pd.DataFrame:
    """A (small or filtered) table as pandas: streamed, only ``columns``, rows whose ``keep[0]`` is in ``keep[1]``;
    every row read (kept or not) is counted in ``report.read``."""
    parts = []
    for batch in iter_batches(path, spec, columns, block_size):
        if report is not None:
            report.read[path.name] += batch.num_rows
        if keep is not None:
            batch = batch.filter(pc.is_in(batch.column(keep[0]), value_set=keep[1]))
        if batch.num_rows:
            parts.append(batch)
    if not parts:
        return pa.Table.from_batches([], schema=pa.schema([(c, spec.columns[c]) for c in columns])).to_pandas()
    return pa.Table.from_batches(parts).to_pandas()


def stream_aligned(
    path: Path,
    spec: TableSpec,
    columns: Sequence[str],
    anchors: pd.DataFrame,
    *,
    pick: Callable[[pd.DataFrame], pd.DataFrame],
    keys: Sequence[str],
    rank: str,
    block_size: int,
    report: RecipeReport,
    desc: str,
    max_join_rows: int = 2_000_000,
) -> pd.DataFrame:
    """Rows of a large table aligned to anchors, in bounded memory.

    Each block is filtered to the anchors' subjects, joined to their anchors (``anchor_idx``, ``subject_id``,
    ``anchor_time`` ...), passed through ``pick`` (the time-window filter; it may add the ``rank`` column) and
    reduced to the best row (highest ``rank``) per ``keys`` before the next block; the partial results are merged
    the same way. A block whose join would exceed ``max_join_rows`` rows (subjects with many anchors, e.g. hundreds
    of CXR studies) is joined in slices. Returns one row per ``keys``."""
    subjects = pa.array(anchors["subject_id"].unique(), type=pa.int64())
    per_subject = anchors["subject_id"].value_counts()
    best: list[pd.DataFrame] = []
    size = path.stat().st_size
    reduce_ = lambda df: df.sort_values([*keys, rank], kind="stable").drop_duplicates(list(keys), keep="last")  # noqa: E731
    with tqdm(total=size, unit="B", unit_scale=True, desc=desc, disable=None) as bar:
        for batch in iter_batches(path, spec, columns, block_size):
            report.read[path.name] += batch.num_rows
            bar.update(min(block_size, max(size - bar.n, 0)))
            batch = batch.filter(pc.is_in(batch.column("subject_id"), value_set=subjects))
            if not batch.num_rows:
                continue
            rows = batch.to_pandas()
            weight = np.cumsum(rows["subject_id"].map(per_subject).to_numpy())  # join rows up to each row
            cuts = np.searchsorted(weight, np.arange(max_join_rows, weight[-1], max_join_rows), side="right")
            for lo, hi in zip([0, *cuts], [*cuts, len(rows)]):
                if hi <= lo:
                    continue
                picked = pick(rows.iloc[lo:hi].merge(anchors, on="subject_id", how="inner"))
                if len(picked):
                    best.append(reduce_(picked))
            if len(best) > 16:
                best = [reduce_(pd.concat(best, ignore_index=True))]
    if not best:
        return pd.DataFrame(columns=list(dict.fromkeys([*columns, *anchors.columns, *keys, rank])))
    return reduce_(pd.concat(best, ignore_index=True)).reset_index(drop=True)


# ------------------------------------------------------------------------------------------------------------------
# time alignment rules (pure functions on joined frames: the unit tests call them directly)


def known_at(frame: pd.DataFrame) -> pd.Series:
    """When a row's information became available: ``storetime``, else ``charttime``."""
    return frame["storetime"].fillna(frame["charttime"])


def pick_labs(window: pd.Timedelta, allow_after: bool) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def pick(m: pd.DataFrame) -> pd.DataFrame:
        t = m["anchor_time"]
        ok = (m["charttime"] > t - window) & (m["charttime"] <= t)
        if not allow_after:
            ok &= known_at(m) <= t
        m = m[ok].copy()
        m["rank"] = m["charttime"].astype("int64")
        return m

    return pick


def pick_prior_note(window: pd.Timedelta, allow_after: bool, prefer_same_admission: bool):
    """The latest note known by the anchor time within ``window``; with ``allow_after`` (and
    ``prefer_same_admission``) the note of the anchor's own admission wins even when written later."""

    def pick(m: pd.DataFrame) -> pd.DataFrame:
        t = m["anchor_time"]
        avail = known_at(m)
        ok = (avail <= t) & (avail > t - window)
        same = pd.Series(False, index=m.index)
        if allow_after and prefer_same_admission:
            same = m["hadm_id"].notna() & (m["hadm_id"] == m["anchor_hadm_id"])
            ok |= same
        m = m[ok].copy()
        m["rank"] = avail[ok].astype("int64") + same[ok].astype("int64") * (1 << 62)
        return m

    return pick


def pick_study_report(tolerance: pd.Timedelta):
    """The radiology note closest in ``charttime`` to a CXR study's time (within ``tolerance``): its own report."""

    def pick(m: pd.DataFrame) -> pd.DataFrame:
        gap = (m["charttime"] - m["anchor_time"]).abs()
        m = m[gap <= tolerance].copy()
        m["rank"] = -gap[gap <= tolerance].dt.total_seconds()
        return m

    return pick


def closest_before(
    anchors: pd.DataFrame, events: pd.DataFrame, time_col: str, window: pd.Timedelta, allow_after: bool
) -> pd.DataFrame:
    """Per anchor, the event of the same subject closest to the anchor time with ``t - window <= time <= t``
    (``|time - t| <= window`` with ``allow_after``); columns ``anchor_idx`` + the event's."""
    m = anchors[["anchor_idx", "subject_id", "anchor_time"]].merge(events, on="subject_id")
    gap = m["anchor_time"] - m[time_col]
    ok = gap.abs() <= window if allow_after else (gap >= pd.Timedelta(0)) & (gap <= window)
    m = m[ok].assign(_gap=gap[ok].abs())
    m = m.sort_values(["anchor_idx", "_gap"], kind="stable").drop_duplicates("anchor_idx")
    return m.drop(columns=["_gap", "subject_id", "anchor_time"])


# ------------------------------------------------------------------------------------------------------------------
# the recipe


def detect_version(mimic_dir: Path, requested: str) -> str:
    """The MIMIC-IV version: ``requested`` unless ``auto``; then the version in a PhysioNet download path
    (``physionet.org/files/mimiciv/3.1``), else ``"unknown"``. A MIMIC-IV 1.x layout is refused."""
    hosp_patients = [mimic_dir / "hosp" / n for n in ("patients.csv", "patients.csv.gz")]
    if (mimic_dir / "core").is_dir() and not any(p.exists() for p in hosp_patients):
        raise RecipeSchemaError(
            f"{mimic_dir}: patients/admissions lie in core/ - the MIMIC-IV 1.x layout (core module). This recipe "
            f"reads MIMIC-IV {' / '.join(SUPPORTED_VERSIONS)} (hosp/patients.csv[.gz], hosp/admissions.csv[.gz]). "
            f"Fix: download a current MIMIC-IV from {URLS['mimic']}"
        )
    if requested != "auto":
        return requested
    parts = mimic_dir.resolve().parts
    for prev, part in itertools.pairwise(parts):
        if prev.lower() in ("mimiciv", "mimic-iv") and re.fullmatch(r"\d+\.\d+", part):
            if part not in SUPPORTED_VERSIONS:
                logger.warning("MIMIC-IV version %s from the path is not one of %s", part, SUPPORTED_VERSIONS)
            return part
    return "unknown"


def _cxr_time(date: pd.Series, tm: pd.Series) -> pd.Series:
    """``StudyDate`` (YYYYMMDD) + ``StudyTime`` (HHMMSS.fff) -> timestamps."""
    d = date.astype("Int64").astype(str).str.zfill(8)
    t = tm.fillna(0).astype(float).astype(int).astype(str).str.zfill(6)
    return pd.to_datetime(d + t, format="%Y%m%d%H%M%S", errors="coerce")


def _cxr_image(cxr_dir: Path, subject: int, study: int, dicom: str) -> Path:
    s = str(subject)
    return cxr_dir / "files" / f"p{s[:2]}" / f"p{s}" / f"s{study}" / f"{dicom}.jpg"


def _cxr_report_file(cxr_dir: Path, subject: int, study: int) -> Path:
    s = str(subject)
    return cxr_dir / "files" / f"p{s[:2]}" / f"p{s}" / f"s{study}.txt"


class _Inputs:
    """Finds and checks the input files (compressed or not) once."""

    def __init__(self, args: argparse.Namespace, version: str):
        self.args, self.version = args, version
        self.roots = {"mimic": Path(args.mimic_dir), "note": args.note_dir, "cxr": args.cxr_dir, "ecg": args.ecg_dir}

    def has(self, dataset: str) -> bool:
        return self.roots[dataset] is not None and Path(self.roots[dataset]).is_dir()

    def table(self, name: str, required: bool = True) -> tuple[Path, list[str]] | None:
        spec = TABLES[name]
        root = self.roots[spec.dataset]
        if root is None:
            if required:
                raise RecipeInputError(
                    f"{spec.relpath} is needed ({name}) but no folder of {_DATASET_NAMES[spec.dataset]} was given. "
                    f"Fix: pass --{spec.dataset}_dir ({_where_from(spec.dataset)})"
                )
            return None
        try:
            path = require_file(Path(root) / spec.relpath, f"{name} ({spec.relpath})", _where_from(spec.dataset))
        except RecipeInputError:
            if required:
                raise
            return None
        return path, check_table(path, spec, self.version)


def _anchors_cxr(inp: _Inputs, report: RecipeReport, args) -> pd.DataFrame:
    bs = args.block_size
    path, cols = inp.table("cxr_metadata")
    meta = read_table(path, TABLES["cxr_metadata"], cols, block_size=bs, report=report)
    views = [v.strip().upper() for v in args.cxr_views.split(",") if v.strip()]
    meta["_view_rank"] = meta["ViewPosition"].str.upper().map({v: i for i, v in enumerate(views)})
    studies = meta["study_id"].nunique()
    meta = meta.dropna(subset=["_view_rank"]).sort_values(["study_id", "_view_rank", "dicom_id"], kind="stable")
    meta = meta.drop_duplicates("study_id")
    report.exclude("cxr_study_without_selected_view", studies - len(meta), f"views kept: {views}")
    meta["anchor_time"] = _cxr_time(meta["StudyDate"], meta["StudyTime"])
    bad = meta["anchor_time"].isna()
    report.exclude("cxr_study_without_date", int(bad.sum()))
    meta = meta[~bad]
    return pd.DataFrame(
        {
            "sample_id": "cxr:" + meta["study_id"].astype(str),
            "subject_id": meta["subject_id"].astype("int64"),
            "anchor_time": meta["anchor_time"],
            "meta_study_id": meta["study_id"].astype("int64"),
            "meta_dicom_id": meta["dicom_id"],
            "meta_view": meta["ViewPosition"],
        }
    )


def _anchors_ecg(inp: _Inputs, report: RecipeReport, args) -> pd.DataFrame:
    path, cols = inp.table("ecg_records")
    rec = read_table(path, TABLES["ecg_records"], cols, block_size=args.block_size, report=report)
    bad = rec["ecg_time"].isna()
    report.exclude("ecg_without_time", int(bad.sum()))
    rec = rec[~bad]
    return pd.DataFrame(
        {
            "sample_id": "ecg:" + rec["study_id"].astype(str),
            "subject_id": rec["subject_id"].astype("int64"),
            "anchor_time": rec["ecg_time"],
            "meta_ecg_study_id": rec["study_id"].astype("int64"),
            "meta_ecg_path": rec["path"],
            "meta_ecg_time": rec["ecg_time"],
        }
    )


def _anchors_admission(adm: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "sample_id": "adm:" + adm["hadm_id"].astype(str),
            "subject_id": adm["subject_id"].astype("int64"),
            "anchor_time": adm["admittime"],
            "anchor_hadm_id": adm["hadm_id"].astype("float64"),
        }
    )


def _ecg_npz(record: Path, out: Path, sample_id: str) -> Path:
    """Convert one WFDB record to the ``.npz`` the signal kind reads; :class:`DataError` when it cannot be read."""
    try:
        import wfdb
    except ImportError as exc:  # pragma: no cover - wfdb is in the recipes extra
        raise RecipeInputError(
            "converting MIMIC-IV-ECG records needs wfdb: pip install 'bioperceiver[recipes]' (or --ecg_signals none)"
        ) from exc
    try:
        rec = wfdb.rdrecord(str(record))
        values = np.asarray(rec.p_signal, dtype=np.float32).T  # (leads, samples), mV
    except Exception as exc:
        raise DataError(
            "unreadable_ecg",
            f"WFDB record {record} cannot be read ({type(exc).__name__}: {exc})",
            sample_id=sample_id,
            modality="signal_ecg",
            fix="re-download the record's .hea/.dat from MIMIC-IV-ECG, or pass --on_error skip_modality",
        ) from None
    if values.size == 0 or not np.isfinite(values).any():
        raise DataError(
            "empty_ecg",
            f"WFDB record {record} holds no finite sample",
            sample_id=sample_id,
            modality="signal_ecg",
            fix="re-download the record, or pass --on_error skip_modality",
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, values=values, channels=np.asarray(rec.sig_name), sampling_rate=np.float64(rec.fs))
    return out


def build_mimic_manifest(args: argparse.Namespace) -> Path:
    """Build ``OUT/manifest.parquet`` from the parsed command line (see the module docstring)."""
    started = time.perf_counter()
    mimic_dir = Path(args.mimic_dir)
    if not mimic_dir.is_dir():
        raise RecipeInputError(f"--mimic_dir {mimic_dir} is not a folder. Fix: {_where_from('mimic')}")
    args.note_dir = args.note_dir or (str(mimic_dir / "note") if (mimic_dir / "note").is_dir() else None)
    version = detect_version(mimic_dir, args.mimic_version)
    inp = _Inputs(args, version)
    report = RecipeReport(NAME)
    bs = args.block_size
    allow_after = args.allow_after_anchor

    # -- small tables, checked before any large read
    p_path, p_cols = inp.table("patients")
    a_path, a_cols = inp.table("admissions")
    lab = inp.table("labevents")
    d_path, d_cols = inp.table("d_labitems")
    dx_path, dx_cols = inp.table("diagnoses_icd")
    discharge = inp.table("discharge", required=False) if inp.has("note") else None
    radiology = inp.table("radiology", required=False) if inp.has("note") else None
    if inp.has("note") and (discharge is None or radiology is None):
        missing = [n for n, t in (("discharge", discharge), ("radiology", radiology)) if t is None]
        report.note(f"note_tables_missing:{','.join(missing)}")
        logger.warning("MIMIC-IV-Note %s not found in %s: no text from them", missing, args.note_dir)
    ecg = inp.table("ecg_records", required=args.anchor == "ecg") if inp.has("ecg") or args.anchor == "ecg" else None
    if args.anchor == "cxr":
        inp.table("cxr_split")
        inp.table("cxr_chexpert")

    out = prepare_output_dir(args.output_dir, args.overwrite_output_dir)  # after the inputs are found
    adm = read_table(a_path, TABLES["admissions"], a_cols, block_size=bs, report=report)

    # -- anchors
    if args.anchor == "cxr":
        anchors = _anchors_cxr(inp, report, args)
    elif args.anchor == "ecg":
        anchors = _anchors_ecg(inp, report, args)
    else:
        anchors = _anchors_admission(adm)
    anchors = anchors.sort_values(["subject_id", "anchor_time", "sample_id"], kind="stable").reset_index(drop=True)
    anchors["anchor_idx"] = np.arange(len(anchors))
    if not len(anchors):
        raise RecipeInputError(f"no {args.anchor} anchor found in the inputs; nothing to build")
    subjects = pa.array(anchors["subject_id"].unique(), type=pa.int64())

    # the anchor's admission (admittime <= t <= dischtime), for CXR / ECG anchors
    if "anchor_hadm_id" not in anchors:
        m = anchors[["anchor_idx", "subject_id", "anchor_time"]].merge(adm, on="subject_id")
        m = m[(m["admittime"] <= m["anchor_time"]) & (m["anchor_time"] <= m["dischtime"].fillna(m["anchor_time"]))]
        m = m.sort_values(["anchor_idx", "admittime"], kind="stable").drop_duplicates("anchor_idx", keep="last")
        anchors = anchors.merge(
            m[["anchor_idx", "hadm_id"]].rename(columns={"hadm_id": "anchor_hadm_id"}), on="anchor_idx", how="left"
        )
        anchors["anchor_hadm_id"] = anchors["anchor_hadm_id"].astype("float64")
        report.note("anchors_outside_an_admission", int(anchors["anchor_hadm_id"].isna().sum()))
    base = anchors[["anchor_idx", "subject_id", "anchor_time", "anchor_hadm_id"]]

    # -- patient fields
    pats = read_table(p_path, TABLES["patients"], p_cols, block_size=bs, keep=("subject_id", subjects), report=report)
    fields = base.merge(pats, on="subject_id", how="left").merge(
        adm[["hadm_id", "admission_type"]].astype({"hadm_id": "float64"}),
        left_on="anchor_hadm_id",
        right_on="hadm_id",
        how="left",
    )
    age = fields["anchor_age"] + fields["anchor_time"].dt.year - fields["anchor_year"]
    patient_cells = {
        int(i): tabular_cell({"gender": g, "age": a, "admission_type": t})
        for i, g, a, t in zip(fields["anchor_idx"], fields["gender"], age, fields["admission_type"])
    }
    report.note("subjects_not_in_patients", int(anchors["subject_id"].nunique() - pats["subject_id"].nunique()))

    # -- labs: streamed, bounded memory
    lab_path, lab_cols = lab
    items = read_table(d_path, TABLES["d_labitems"], d_cols, block_size=bs, report=report)
    names = {
        int(i): f"{label} ({fluid}) [{int(i)}]"
        for i, label, fluid in zip(items["itemid"], items["label"], items["fluid"])
    }
    labs = stream_aligned(
        lab_path,
        TABLES["labevents"],
        lab_cols,
        base[["anchor_idx", "subject_id", "anchor_time"]],
        pick=pick_labs(pd.Timedelta(hours=args.lab_window_hours), allow_after),
        keys=("anchor_idx", "itemid"),
        rank="rank",
        block_size=bs,
        report=report,
        desc="labevents",
    )
    lab_cells = labs_to_cells(labs, names, report)

    # -- notes
    discharge_cells: dict[int, tuple[str, str]] = {}
    radiology_cells: dict[int, tuple[str, str]] = {}
    if discharge is not None:
        got = stream_aligned(
            discharge[0],
            TABLES["discharge"],
            discharge[1],
            base,
            pick=pick_prior_note(pd.Timedelta(days=args.discharge_window_days), allow_after, True),
            keys=("anchor_idx",),
            rank="rank",
            block_size=bs,
            report=report,
            desc="discharge notes",
        )
        discharge_cells = {int(i): (n, t) for i, n, t in zip(got["anchor_idx"], got["note_id"], got["text"])}
    report_source: dict[int, str] = {}
    if args.anchor == "cxr" and args.cxr_report == "include":
        cxr_dir = Path(args.cxr_dir)
        for idx, sid, study in zip(anchors["anchor_idx"], anchors["subject_id"], anchors["meta_study_id"]):
            f = _cxr_report_file(cxr_dir, sid, study)
            if f.is_file():
                text = f.read_text(encoding="utf-8", errors="replace").strip()
                if text:
                    radiology_cells[int(idx)] = (f"mimic-cxr:s{study}", text)
                    report_source[int(idx)] = "mimic-cxr"
    if radiology is not None and not (args.anchor == "cxr" and args.cxr_report == "exclude"):
        if args.anchor == "cxr":
            need = base[~base["anchor_idx"].isin(list(radiology_cells))]
            pick = pick_study_report(pd.Timedelta(hours=args.cxr_report_tolerance_hours))
        else:
            need = base
            pick = pick_prior_note(pd.Timedelta(hours=args.radiology_window_hours), allow_after, False)
        if len(need):
            got = stream_aligned(
                radiology[0],
                TABLES["radiology"],
                radiology[1],
                need,
                pick=pick,
                keys=("anchor_idx",),
                rank="rank",
                block_size=bs,
                report=report,
                desc="radiology notes",
            )
            for i, n, t in zip(got["anchor_idx"], got["note_id"], got["text"]):
                radiology_cells[int(i)] = (n, t)
                report_source[int(i)] = "mimic-iv-note"

    # -- ECG
    ecg_rows: dict[int, dict[str, Any]] = {}
    if ecg is not None:
        if args.anchor == "ecg":
            for i, s, p, t in zip(
                anchors["anchor_idx"], anchors["meta_ecg_study_id"], anchors["meta_ecg_path"], anchors["anchor_time"]
            ):
                ecg_rows[int(i)] = {"study_id": int(s), "path": p, "ecg_time": t}
        else:
            rec = read_table(
                ecg[0], TABLES["ecg_records"], ecg[1], block_size=bs, keep=("subject_id", subjects), report=report
            )
            near = closest_before(anchors, rec, "ecg_time", pd.Timedelta(hours=args.ecg_window_hours), allow_after)
            for i, s, p, t in zip(near["anchor_idx"], near["study_id"], near["path"], near["ecg_time"]):
                ecg_rows[int(i)] = {"study_id": int(s), "path": p, "ecg_time": t}
        meas = inp.table("ecg_measurements", required=False)
        if meas is not None and ecg_rows:
            wanted = pa.array(sorted({r["study_id"] for r in ecg_rows.values()}), type=pa.int64())
            mm = read_table(
                meas[0], TABLES["ecg_measurements"], meas[1], block_size=bs, keep=("study_id", wanted), report=report
            )
            mm = mm.drop_duplicates("study_id").set_index("study_id")
            rep_cols = [c for c in mm.columns if c.startswith("report_")]
            num_cols = [c for c in ECG_MEASUREMENTS if c in mm.columns]
            for r in ecg_rows.values():
                if r["study_id"] in mm.index:
                    row = mm.loc[r["study_id"]]
                    lines = [str(row[c]).strip() for c in rep_cols if isinstance(row[c], str) and row[c].strip()]
                    r["report"] = "; ".join(lines) or None
                    r["measurements"] = tabular_cell({c: row[c] for c in num_cols}) if num_cols else None

    # -- labels
    hadms = pa.array(anchors["anchor_hadm_id"].dropna().astype("int64").unique(), type=pa.int64())
    dx = read_table(dx_path, TABLES["diagnoses_icd"], dx_cols, block_size=bs, keep=("hadm_id", hadms), report=report)
    dx["code"] = "ICD" + dx["icd_version"].astype(str) + ":" + dx["icd_code"].astype(str).str.strip()
    icd = dx.groupby("hadm_id")["code"].agg(lambda s: sorted(set(s))).to_dict()
    chexpert: dict[int, tuple[list[str], list[str]]] = {}
    split_by_subject: dict[int, str] = {}
    if args.anchor == "cxr":
        c_path, c_cols = inp.table("cxr_chexpert")
        studies = pa.array(anchors["meta_study_id"].unique(), type=pa.int64())
        chx = read_table(
            c_path, TABLES["cxr_chexpert"], c_cols, block_size=bs, keep=("study_id", studies), report=report
        )
        found = [f for f in CHEXPERT_FINDINGS if f in chx.columns]
        for row in chx.itertuples(index=False, name=None):
            vals = dict(zip(chx.columns, row))
            chexpert[int(vals["study_id"])] = (
                [f for f in found if vals[f] == 1.0],
                [f for f in found if vals[f] == -1.0],
            )
        s_path, s_cols = inp.table("cxr_split")
        spl = read_table(
            s_path, TABLES["cxr_split"], s_cols, block_size=bs, keep=("subject_id", subjects), report=report
        )
        spl["split"] = spl["split"].replace({"validate": "validation"})
        spl = spl.drop_duplicates(["subject_id", "split"]).rename(columns={"subject_id": "patient_id"})
        check_patient_safe(spl, "split", what=f"official MIMIC-CXR splits ({s_path.name})")
        split_by_subject = {int(s): str(v) for s, v in zip(spl["patient_id"], spl["split"])}

    # -- rows
    rows = []
    signals_written = []
    modality_columns = set(MODALITY_COLUMNS)
    cxr_dir = Path(args.cxr_dir) if args.cxr_dir else None
    ecg_dir = Path(args.ecg_dir) if args.ecg_dir else None
    for a in tqdm(anchors.itertuples(index=False), total=len(anchors), desc="rows", disable=None):
        i = int(a.anchor_idx)
        sid = str(a.sample_id)
        row: dict[str, Any] = {"sample_id": sid, "patient_id": str(a.subject_id)}
        drop = False
        if args.anchor == "cxr":
            img = _cxr_image(cxr_dir, a.subject_id, a.meta_study_id, a.meta_dicom_id)
            if img.is_file():
                row["image_cxr"] = str(img.resolve())
            else:
                err = DataError(
                    "missing_image",
                    f"image {img} of study {a.meta_study_id} is not in --cxr_dir",
                    sample_id=sid,
                    modality="image_cxr",
                    fix="download that file of MIMIC-CXR-JPG (files/p../p<subject>/s<study>/<dicom_id>.jpg), or pass "
                    "--on_error skip_sample / skip_modality",
                )
                drop = report.handle(err, args.on_error) == "sample"
                row["image_cxr"] = None
        if args.anchor == "cxr":
            row["split"] = split_by_subject.get(int(a.subject_id))
            if row["split"] is None:
                row["split"] = split_of(str(a.subject_id))
                report.note("cxr_subject_not_in_official_split_hashed")
        else:
            row["split"] = split_of(str(a.subject_id))
        row["tabular_patient"] = patient_cells.get(i)
        row["tabular_labs"] = lab_cells.get(i)
        note = radiology_cells.get(i)
        row["text_radiology"] = note[1] if note else None
        row["meta_radiology_note_id"] = note[0] if note else None
        row["meta_radiology_source"] = report_source.get(i)
        note = discharge_cells.get(i)
        row["text_discharge"] = note[1] if note else None
        row["meta_discharge_note_id"] = note[0] if note else None
        e = ecg_rows.get(i)
        row["signal_ecg"] = None
        if e is not None:
            row["meta_ecg_study_id"] = e["study_id"]
            row["meta_ecg_path"] = e["path"]
            row["meta_ecg_time"] = str(e["ecg_time"])
            row["text_ecg_report"] = e.get("report")
            row["tabular_ecg"] = e.get("measurements")
            if args.ecg_signals == "npz" and not drop:
                rel = Path("signals") / "ecg" / f"{e['study_id']}.npz"
                try:
                    _ecg_npz(ecg_dir / e["path"], out / rel, sid)
                    row["signal_ecg"] = str(rel)
                    signals_written.append(str(rel))
                except DataError as err:
                    drop = report.handle(err, args.on_error) == "sample"
        hadm = a.anchor_hadm_id
        row["label_icd"] = icd.get(int(hadm)) if pd.notna(hadm) else None
        row["meta_hadm_id"] = int(hadm) if pd.notna(hadm) else None
        if args.anchor == "cxr":
            pos, unc = chexpert.get(int(a.meta_study_id), (None, None))
            row["label_chexpert"] = pos
            row["meta_chexpert_uncertain"] = unc
            row["meta_study_id"] = int(a.meta_study_id)
            row["meta_dicom_id"] = a.meta_dicom_id
            row["meta_view"] = a.meta_view
        row["meta_anchor"] = args.anchor
        row["meta_anchor_time"] = a.anchor_time.isoformat()
        if drop:
            continue
        if not any(v is not None for k, v in row.items() if k in modality_columns):
            report.exclude("anchor_without_any_modality", 1, sid)
            continue
        rows.append(row)
    df = pd.DataFrame(rows)
    df = df.dropna(axis=1, how="all").reset_index(drop=True)
    for col in ("meta_hadm_id", "meta_ecg_study_id", "meta_study_id"):
        if col in df:
            df[col] = df[col].astype("Int64")
    for col in ("text_radiology", "text_discharge", "text_ecg_report", "signal_ecg", "image_cxr"):
        if col in df:
            report.note(f"present:{col}", int(df[col].notna().sum()))
    datasets = {"mimic": version}
    for d in ("note", "cxr", "ecg"):
        if inp.has(d):
            datasets[d] = _DATASET_NAMES[d]
    labels = {"label_icd": "multilabel"}
    notes = {"label_icd": "ICD codes of the anchor's admission (coded at discharge): a target, never an input"}
    if "label_chexpert" in df:
        labels["label_chexpert"] = "multilabel"
        notes["label_chexpert"] = (
            "CheXpert findings labelled 1.0 for the study (extracted from its report: do not feed text_radiology "
            "when finetuning on it); -1.0 (uncertain) ones are in meta_chexpert_uncertain, blanks are not mentioned"
        )
    return write_recipe_output(
        df,
        out,
        name=NAME,
        provenance={
            "datasets": {d: {"name": _DATASET_NAMES[d], "url": URLS[d], "folder": str(inp.roots[d])} for d in datasets},
            "anchor": args.anchor,
            "leakage_rule": "no value known after the anchor time enters a row"
            + (" (relaxed: --allow_after_anchor)" if allow_after else ""),
        },
        licence_note=LICENCE_NOTE,
        versions={"mimic_iv": version, **_wfdb_version(args)},
        report=report,
        labels={k: v for k, v in labels.items() if k in df},
        label_notes={k: v for k, v in notes.items() if k in df},
        params={k: v for k, v in vars(args).items()},
        outputs=signals_written,
        recipe_version=RECIPE_VERSION,
        started=started,
    )


def labs_to_cells(labs: pd.DataFrame, names: dict[int, str], report: RecipeReport) -> dict[int, str]:
    """One ``tabular_labs`` JSON cell per anchor: the kept result per item (``valuenum``, else the text value)."""
    if not len(labs):
        return {}
    unknown = ~labs["itemid"].isin(list(names))
    report.note("lab_items_not_in_d_labitems", int(labs.loc[unknown, "itemid"].nunique()))
    value = labs["valuenum"].astype(object).where(labs["valuenum"].notna(), labs["value"])
    keep = value.notna()
    report.note("lab_results_without_value", int((~keep).sum()))
    labs = labs.assign(_v=value)[keep]
    feature = labs["itemid"].map(lambda i: names.get(int(i), f"itemid {int(i)}"))
    cells: dict[int, str] = {}
    for idx, group in labs.assign(_f=feature).groupby("anchor_idx", sort=False):
        cells[int(idx)] = tabular_cell(dict(zip(group["_f"], group["_v"])))
    return cells


def _wfdb_version(args) -> dict[str, str]:
    if getattr(args, "ecg_signals", "none") != "npz":
        return {}
    import importlib.metadata

    try:
        return {"wfdb": importlib.metadata.version("wfdb")}
    except importlib.metadata.PackageNotFoundError:
        return {}


def build_parser() -> argparse.ArgumentParser:
    p = recipe_parser(NAME, "MIMIC-IV (+ Note, CXR-JPG, ECG) -> a manifest of anchor events with aligned modalities")
    p.add_argument("--note_dir", default=None, help="MIMIC-IV-Note folder (discharge, radiology); default MIMIC/note")
    p.add_argument("--cxr_dir", default=None, help="MIMIC-CXR-JPG folder (metadata/split/chexpert CSVs + files/)")
    p.add_argument("--ecg_dir", default=None, help="MIMIC-IV-ECG folder (record_list.csv + files/)")
    p.add_argument("--anchor", choices=ANCHORS, default="cxr", help="the event one row stands for")
    p.add_argument("--mimic_version", choices=("auto", *SUPPORTED_VERSIONS), default="auto")
    p.add_argument("--lab_window_hours", type=float, default=24.0, help="labs in (t - window, t]")
    p.add_argument("--ecg_window_hours", type=float, default=24.0, help="closest ECG in [t - window, t]")
    p.add_argument("--radiology_window_hours", type=float, default=24.0, help="radiology note known in (t - w, t]")
    p.add_argument("--discharge_window_days", type=float, default=365.0, help="discharge note known in (t - w, t]")
    p.add_argument("--cxr_report_tolerance_hours", type=float, default=2.0, help="MIMIC-IV-Note report <-> study")
    p.add_argument("--cxr_report", choices=("include", "exclude"), default="include")
    p.add_argument("--cxr_views", default="PA,AP", help="views kept, in order of preference (one image per study)")
    p.add_argument("--ecg_signals", choices=("npz", "none"), default="npz", help="convert WFDB records to .npz")
    p.add_argument(
        "--allow_after_anchor",
        action="store_true",
        help="also take values known after the anchor time: the anchor admission's discharge note, labs taken "
        "before the anchor whose result came after it, the closest ECG on either side",
    )
    p.add_argument("--block_size_mb", type=float, default=4.0, help="CSV block size; memory ~ (readahead + 1) x block")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()

    def _run(args: argparse.Namespace) -> Path:
        args.block_size = max(int(args.block_size_mb * 2**20), 1 << 16)
        return build_mimic_manifest(args)

    return run_recipe(_run, parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
