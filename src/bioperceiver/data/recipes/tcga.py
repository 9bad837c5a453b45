"""TCGA from GDC downloads (STAR-Counts expression + clinical + diagnostic slides + report text) into a manifest.

Command line::

    python -m bioperceiver.data.recipes.tcga --tcga_dir GDC --output_dir OUT [--sample_types 01 11]
        [--expression_value tpm_unstranded] [--gene_key gene_name|gene_id] [--slide_column wsi_diagnostic|none]
        [--split_by patient|tissue_source_site] [--on_error raise|skip_sample|skip_modality] [--overwrite_output_dir]

``GDC`` is what the GDC Data Portal and ``gdc-client`` give (https://portal.gdc.cancer.gov; open-access files; the
TCGA data-use terms apply, controlled-access files need dbGaP authorisation):

* the cart's **sample sheet** ``gdc_sample_sheet*.tsv`` (``File ID``, ``File Name``, ``Data Type``, ``Project ID``,
  ``Case ID``, ``Sample ID`` ...; or ``--sample_sheet``);
* the **clinical** table ``clinical.tsv`` of the clinical cart (``'--`` means missing; several rows per case, one
  per treatment/diagnosis; both the classic column names, ``case_submitter_id``, ``vital_status`` ..., and the
  GDC 2.0 dotted ones, ``cases.submitter_id``, ``demographic.vital_status`` ..., are read; or ``--clinical``);
* the **files**, as ``gdc-client`` lays them out (``<File ID>/<File Name>``) or flat (``<File Name>``):
  STAR-Counts ``*.rna_seq.augmented_star_gene_counts.tsv`` (a ``# gene-model: ...`` comment line, the header
  ``gene_id gene_name gene_type unstranded stranded_first stranded_second tpm_unstranded fpkm_unstranded
  fpkm_uq_unstranded``, four ``N_*`` summary rows, which are dropped), slides ``*.svs`` (diagnostic ``-DX<n>``
  slides vs frozen tissue ``-TS``/``-BS``/``-MS`` slides, told apart by the slide barcode in the file name) and
  pathology report PDFs;
* optionally the **report text** ``TCGA_Reports.csv`` (``patient_filename``, ``text``: the OCR-cleaned TCGA
  pathology reports of Kefeli et al. 2024, one per patient; or ``--reports_csv``). The PDFs are not parsed.

One row per selected **sample** (the 15-character barcode ``TCGA-XX-XXXX-NN``: patient + sample type; a DX slide's
``-01Z`` vial maps to sample ``-01``):

======================  ==========================================================================================
column                  value
======================  ==========================================================================================
sample_id, patient_id   ``TCGA-A1-A0SB-01``, ``TCGA-A1-A0SB``
split                   a salted hash of the patient (or, ``--split_by tissue_source_site``, of the tissue source
                        site, so whole sites are held out); fractions ``--split_fractions``; salt from ``--seed``
omics_expression        ``omics/<project>.parquet#row=<sample_id>``: one samples x genes float32 matrix per project
                        of ``--expression_value`` (duplicated gene names summed with ``--gene_key gene_name``)
wsi_diagnostic          absolute path of the sample's first diagnostic (DX) slide in the download (the slides are
                        not copied); the column name is ``--slide_column`` (``none`` leaves slides out). When no
                        modality kind of that name is registered the paths go to ``meta_<column>`` instead (warned,
                        and noted in the sidecar)
text_report             the patient's pathology report text (``--reports_csv``), when present
tabular_clinical        age at index, gender, race, ethnicity, AJCC pathologic stage, primary diagnosis, tissue or
                        organ of origin (those the clinical table has; ``'--``/"not reported" -> null)
label_project           the project (``TCGA-BRCA``): the cancer type
label_sample_type       ``Primary Solid Tumor``, ``Solid Tissue Normal`` ... (from the barcode's sample-type code)
label_survival_time/    overall survival in days: ``days_to_death`` when ``vital_status`` is ``Dead`` (event 1),
label_survival_event    else ``days_to_last_follow_up`` (event 0); null when the needed field is missing
meta_site               the project again, as the site column for site-aware evaluation
meta_*                  ``tissue_source_site`` (the barcode's 2-character TSS code), ``case_uuid``,
                        ``tissue_slides`` (JSON list of the frozen-section slide paths), ``extra_dx_slides``,
                        ``pathology_report_pdf``, ``expression_file``
======================  ==========================================================================================

Every file or row left out is counted in the sidecar (``counts``): sample types not selected, data types not used,
files listed but not downloaded (``missing_file``) or unreadable (``bad_expression_file``, handled by
``--on_error``), cases without a selected sample.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..errors import DataError, check_on_error
from ..manifest import kind_of_column
from ..splits import split_of
from .common import (
    RecipeInputError,
    RecipeReport,
    prepare_output_dir,
    recipe_parser,
    require_columns,
    require_file,
    run_recipe,
    tabular_cell,
    write_recipe_output,
)

logger = logging.getLogger(__name__)

NAME = "tcga"
RECIPE_VERSION = 1
VERSION_HINT = "a GDC Data Portal download (data release 32 or later: STAR-Counts, GENCODE v36)"
WHERE_FROM = (
    "download it from the GDC Data Portal (https://portal.gdc.cancer.gov): add the files to the cart, then "
    "'Sample Sheet' and 'Clinical: TSV' on the cart page, and the files with gdc-client"
)
LICENCE_NOTE = (
    "TCGA data from the NCI Genomic Data Commons. Open-access files are released under the NIH / GDC data-use terms "
    "(https://gdc.cancer.gov/access-data/data-access-processes-and-tools); controlled-access files require dbGaP "
    "authorisation and must not be shared. Cite The Cancer Genome Atlas program and the GDC (Grossman et al., NEJM "
    "375:1109, 2016). TCGA-Reports text: Kefeli et al., Scientific Data 11 (2024), CC BY 4.0. Keep the manifest "
    "and the expression matrices outside the repository."
)
SAMPLE_SHEET_GLOB = "gdc_sample_sheet*.tsv*"
CLINICAL_FILE = "clinical.tsv"
REPORTS_FILE = "TCGA_Reports.csv"
SHEET_COLUMNS = ("File ID", "File Name", "Data Type", "Project ID", "Case ID", "Sample ID")
CLINICAL_COLUMNS = ("case_submitter_id", "project_id", "vital_status", "days_to_death", "days_to_last_follow_up")
CLINICAL_OPTIONAL = (
    "case_id",
    "age_at_index",
    "gender",
    "race",
    "ethnicity",
    "ajcc_pathologic_stage",
    "primary_diagnosis",
    "tissue_or_organ_of_origin",
)
TABULAR_FIELDS = CLINICAL_OPTIONAL[1:]
# GDC 2.0 clinical.tsv (dotted) names -> the classic names
CLINICAL_ALIASES = {
    "cases.case_id": "case_id",
    "cases.submitter_id": "case_submitter_id",
    "project.project_id": "project_id",
    "demographic.vital_status": "vital_status",
    "demographic.days_to_death": "days_to_death",
    "diagnoses.days_to_last_follow_up": "days_to_last_follow_up",
    "demographic.age_at_index": "age_at_index",
    "demographic.gender": "gender",
    "demographic.race": "race",
    "demographic.ethnicity": "ethnicity",
    "diagnoses.ajcc_pathologic_stage": "ajcc_pathologic_stage",
    "diagnoses.primary_diagnosis": "primary_diagnosis",
    "diagnoses.tissue_or_organ_of_origin": "tissue_or_organ_of_origin",
}
MISSING_VALUES = ["'--", "--", "not reported", "Not Reported", "unknown", "Unknown", "not allowed to collect"]
STAR_SUFFIX = ".rna_seq.augmented_star_gene_counts.tsv"
STAR_ID_COLUMNS = ("gene_id", "gene_name", "gene_type")
EXPRESSION_VALUES = ("unstranded", "stranded_first", "stranded_second", "tpm_unstranded", "fpkm_unstranded",
                     "fpkm_uq_unstranded")  # fmt: skip
GENE_KEYS = ("gene_name", "gene_id")
EXPRESSION_TYPE, SLIDE_TYPE, REPORT_TYPE = "Gene Expression Quantification", "Slide Image", "Pathology Report"
BARCODE = re.compile(r"^(TCGA-([A-Z0-9]{2})-[A-Z0-9]{4})-(\d{2})([A-Z])?")
SLIDE_BARCODE = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}-\d{2}[A-Z]?)-\w{2}-(DX|TS|BS|MS)(\d*)$", re.IGNORECASE)
SAMPLE_TYPES = {
    "01": "Primary Solid Tumor",
    "02": "Recurrent Solid Tumor",
    "03": "Primary Blood Derived Cancer - Peripheral Blood",
    "05": "Additional - New Primary",
    "06": "Metastatic",
    "07": "Additional Metastatic",
    "10": "Blood Derived Normal",
    "11": "Solid Tissue Normal",
}
SPLIT_KEYS = ("patient", "tissue_source_site")
LABELS = {
    "label_project": "classification",
    "label_sample_type": "classification",
    "label_survival_time": "survival",
    "label_survival_event": "survival",
}


# ------------------------------------------------------------------------------------------------------------------
# inputs


def find_sample_sheet(tcga_dir: Path) -> Path:
    """The one ``gdc_sample_sheet*.tsv`` (gz or not) in ``tcga_dir``."""
    found = sorted(p for p in tcga_dir.glob(SAMPLE_SHEET_GLOB) if p.is_file())
    if not found:
        hint = "" if tcga_dir.is_dir() else f" (the folder {tcga_dir} does not exist)"
        raise RecipeInputError(
            f"the GDC sample sheet (gdc_sample_sheet*.tsv) not found in {tcga_dir}{hint}. Fix: {WHERE_FROM}; or pass "
            "--sample_sheet"
        )
    if len(found) > 1:
        raise RecipeInputError(
            f"several GDC sample sheets in {tcga_dir}: {[p.name for p in found]}. Fix: pass the one to use with "
            "--sample_sheet"
        )
    return found[0]


def read_sample_sheet(path: Path) -> pd.DataFrame:
    sheet = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, encoding="utf-8")
    sheet.columns = [c.strip() for c in sheet.columns]
    require_columns(sheet, SHEET_COLUMNS, path, VERSION_HINT)
    return sheet


def read_clinical(path: Path) -> pd.DataFrame:
    """The clinical table, one row per case (``case_submitter_id``): GDC repeats a case per treatment and
    diagnosis; the first non-missing value of each field is kept, ``vital_status`` is ``Dead`` when any row says
    so and the day counts are the largest given."""
    table = pd.read_csv(
        path, sep="\t", dtype=str, na_values=MISSING_VALUES, keep_default_na=True, encoding="utf-8", low_memory=False
    )
    table = table.rename(columns={k: v for k, v in CLINICAL_ALIASES.items() if k in table.columns})
    table = table.loc[:, ~table.columns.duplicated()]
    require_columns(table, CLINICAL_COLUMNS, path, VERSION_HINT + " clinical.tsv")
    keep = [c for c in (*CLINICAL_COLUMNS, *CLINICAL_OPTIONAL) if c in table.columns]
    table = table[keep].copy()
    for col in ("days_to_death", "days_to_last_follow_up", "age_at_index"):
        if col in table:
            table[col] = pd.to_numeric(table[col], errors="coerce")
    table["dead"] = table["vital_status"].str.strip().str.lower().eq("dead")
    agg: dict[str, Any] = {c: "first" for c in keep if c != "case_submitter_id"}
    agg.update({"days_to_death": "max", "days_to_last_follow_up": "max", "dead": "any"})
    return table.groupby("case_submitter_id", sort=True).agg(agg)


def read_reports(path: Path) -> dict[str, str]:
    """``TCGA_Reports.csv`` (``patient_filename`` = ``TCGA-XX-XXXX.<uuid>``, ``text``) as patient -> text."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    require_columns(table, ("patient_filename", "text"), path, "TCGA-Reports (Kefeli et al. 2024)")
    out = {}
    for name, text in zip(table["patient_filename"], table["text"]):
        m = re.match(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})", str(name).strip().upper())
        if m and text.strip():
            out.setdefault(m.group(1), text.strip())
    return out


def parse_barcode(barcode: str) -> tuple[str, str, str]:
    """``TCGA-A1-A0SB-01A-11R-A144-07`` -> patient ``TCGA-A1-A0SB``, sample ``TCGA-A1-A0SB-01``, type ``01``."""
    m = BARCODE.match(str(barcode).strip().upper())
    if not m:
        raise ValueError(f"{barcode!r} is not a TCGA sample barcode (TCGA-XX-XXXX-NN...)")
    patient, _tss, code, _vial = m.groups()
    return patient, f"{patient}-{code}", code


def locate(files_dir: Path, file_id: str, file_name: str) -> Path | None:
    """A downloaded file, as ``gdc-client`` lays it out (``<id>/<name>``) or flat (``<name>``)."""
    for p in (files_dir / file_id / file_name, files_dir / file_name):
        if p.is_file():
            return p
    return None


def read_star_counts(path: Path, value: str, gene_key: str, sample_id: str) -> tuple[pd.Series, str | None]:
    """One STAR-Counts file as a gene -> value series (``N_*`` rows dropped, duplicate keys summed) and the
    ``# gene-model`` comment. Raises :class:`DataError` naming the sample and the file."""

    def bad(message: str) -> DataError:
        return DataError(
            "bad_expression_file",
            f"{path.name}: {message}",
            sample_id=sample_id,
            modality="omics_expression",
            fix=f"download the file again; the recipe expects {VERSION_HINT}",
        )

    model = None
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
        if first.startswith("#"):
            model = first.lstrip("#").strip()
        table = pd.read_csv(path, sep="\t", comment="#", dtype={c: str for c in STAR_ID_COLUMNS}, encoding="utf-8")
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise bad(f"cannot read it ({type(err).__name__}: {err})") from None
    missing = [c for c in (*STAR_ID_COLUMNS, value) if c not in table.columns]
    if missing:
        raise bad(f"missing column(s) {missing}; it has {list(table.columns)}")
    table = table[~table["gene_id"].astype(str).str.startswith("N_")]
    values = pd.to_numeric(table[value], errors="coerce")
    if values.isna().any():
        raise bad(
            f"{int(values.isna().sum())} non-numeric {value} value(s), "
            f"e.g. gene {table['gene_id'][values.isna()].iloc[0]}"
        )
    if len(values) == 0:
        raise bad("no gene rows")
    return values.groupby(table[gene_key].astype(str).to_numpy(), sort=False).sum(), model


# ------------------------------------------------------------------------------------------------------------------
# the recipe


def _slide_storage(column: str | None, report: RecipeReport) -> str | None:
    """The column slide paths go to: ``column`` when a registered kind covers it, else ``meta_<column>``."""
    if column is None:
        return None
    if column.startswith("meta_"):
        return column
    if kind_of_column(column) is None:
        logger.warning(
            "no registered modality kind covers the slide column %r: slide paths go to %r instead (a metadata column "
            "the model does not read). Register the wsi kind, or pass --slide_column none to leave slides out",
            column,
            f"meta_{column}",
        )
        report.note("slide_column_stored_as_meta")
        return f"meta_{column}"
    return column


def build_tcga(
    tcga_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    sample_sheet: str | os.PathLike | None = None,
    clinical: str | os.PathLike | None = None,
    reports_csv: str | os.PathLike | None = None,
    sample_types: Sequence[str] = ("01",),
    expression_value: str = "tpm_unstranded",
    gene_key: str = "gene_name",
    slide_column: str | None = "wsi_diagnostic",
    split_by: str = "patient",
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    on_error: str = "raise",
    overwrite: bool = False,
) -> Path:
    """Convert a GDC download into ``output_dir/manifest.parquet`` (+ sidecar, + ``omics/``); returns its path.

    Args:
        tcga_dir: the download folder (sample sheet, ``clinical.tsv`` and the files, ``<File ID>/<File Name>``).
        output_dir: where to write (outside the repository).
        sample_sheet / clinical / reports_csv: other locations of those files (default: in ``tcga_dir``; the
            reports are optional).
        sample_types: barcode sample-type codes to keep (``01`` primary tumour, ``11`` solid tissue normal ...).
        expression_value: the STAR-Counts column used as the value.
        gene_key: ``gene_name`` (symbols; duplicates summed) or ``gene_id`` (versioned Ensembl ids).
        slide_column: the manifest column of the DX slide paths, or ``None`` to leave slides out.
        split_by: ``patient`` or ``tissue_source_site`` (whole sites held out).
        split_fractions: train / validation / test fractions of the hashed key.
        seed: changes the split salt (0 keeps the project's default salt).
        on_error: what an unreadable or missing file does (:data:`~bioperceiver.data.errors.ON_ERROR_CHOICES`).
        overwrite: replace a manifest already in ``output_dir``.
    """
    t0 = time.perf_counter()
    check_on_error(on_error)
    if expression_value not in EXPRESSION_VALUES:
        raise ValueError(f"expression_value must be one of {EXPRESSION_VALUES}, got {expression_value!r}")
    if gene_key not in GENE_KEYS:
        raise ValueError(f"gene_key must be one of {GENE_KEYS}, got {gene_key!r}")
    if split_by not in SPLIT_KEYS:
        raise ValueError(f"split_by must be one of {SPLIT_KEYS}, got {split_by!r}")
    bad_types = [t for t in sample_types if t not in SAMPLE_TYPES]
    if bad_types or not sample_types:
        raise ValueError(f"sample_types must be codes among {sorted(SAMPLE_TYPES)}, got {list(sample_types)}")
    src = Path(tcga_dir).expanduser().resolve()
    report = RecipeReport(NAME)
    slide_target = _slide_storage(slide_column, report)

    sheet_path = Path(sample_sheet) if sample_sheet else find_sample_sheet(src)
    sheet_path = require_file(sheet_path, "the GDC sample sheet", WHERE_FROM)
    clinical_path = require_file(
        Path(clinical) if clinical else src / CLINICAL_FILE, "the GDC clinical table (clinical.tsv)", WHERE_FROM
    )
    sheet = read_sample_sheet(sheet_path)
    cases = read_clinical(clinical_path)
    out = prepare_output_dir(output_dir, overwrite)  # after the inputs are found: a failed start leaves no folder
    report.read[sheet_path.name] = len(sheet)
    report.read[clinical_path.name + " (cases)"] = len(cases)
    reports: dict[str, str] = {}
    reports_path = Path(reports_csv) if reports_csv else src / REPORTS_FILE
    if reports_csv or reports_path.is_file() or Path(str(reports_path) + ".gz").is_file():
        reports_path = require_file(reports_path, "the TCGA-Reports text table", "download TCGA_Reports.csv "
                                    "(Kefeli et al. 2024, Mendeley Data) or leave --reports_csv out")  # fmt: skip
        reports = read_reports(reports_path)
        report.read[reports_path.name] = len(reports)

    samples: dict[str, dict[str, Any]] = {}
    dropped: set[str] = set()
    expression: dict[str, dict[str, tuple[pd.Series, str]]] = defaultdict(dict)  # project -> sample -> (values, file)
    models: set[str] = set()
    pdfs: dict[str, str] = {}

    def sample_row(sample_id: str, patient: str, code: str, project: str) -> dict[str, Any]:
        return samples.setdefault(
            sample_id,
            {"patient": patient, "code": code, "project": project, "dx": [], "tissue": [], "expression": None},
        )

    def handle(err: DataError, sample_id: str) -> bool:
        """Apply on_error; True when the caller goes on with the sample (without the bad file)."""
        if report.handle(err, on_error) == "sample":
            dropped.add(sample_id)
            return False
        return True

    rows = sheet.to_dict("records")
    for rec in tqdm(rows, desc="GDC files", unit="file", mininterval=2.0):
        data_type = rec["Data Type"].strip()
        file_name, file_id, project = rec["File Name"].strip(), rec["File ID"].strip(), rec["Project ID"].strip()
        if data_type == REPORT_TYPE:
            path = locate(src, file_id, file_name)
            patient = rec["Case ID"].split(",")[0].strip()
            if path is None:
                report.exclude("pathology_report_pdf_not_downloaded", example=file_name)
            else:
                pdfs.setdefault(patient, str(path))
            continue
        if data_type not in (EXPRESSION_TYPE, SLIDE_TYPE):
            report.exclude(f"data_type_not_used:{data_type}", example=file_name)
            continue
        if data_type == EXPRESSION_TYPE and not file_name.endswith(STAR_SUFFIX):
            report.exclude("expression_not_star_counts", example=file_name)
            continue
        if data_type == SLIDE_TYPE and slide_target is None:
            report.exclude("slides_not_requested", example=file_name)
            continue
        barcodes = [b.strip() for b in rec["Sample ID"].split(",") if b.strip()]
        if len(barcodes) != 1:
            report.exclude("file_of_several_samples", example=f"{file_name}: {barcodes}")
            continue
        try:
            patient, sample_id, code = parse_barcode(barcodes[0])
        except ValueError as err:
            report.exclude("not_a_tcga_barcode", example=f"{file_name}: {err}")
            continue
        if code not in sample_types:
            report.exclude(f"sample_type_not_selected:{code}", example=barcodes[0])
            continue
        if sample_id in dropped:
            continue
        entry = sample_row(sample_id, patient, code, project)
        path = locate(src, file_id, file_name)
        if data_type == SLIDE_TYPE:
            m = SLIDE_BARCODE.match(file_name.split(".")[0])
            if m is None:
                report.exclude("slide_name_without_slide_barcode", example=file_name)
                continue
            if path is None:
                what = f"slide {file_name} (File ID {file_id})"
                handle(_missing(what, src, sample_id, slide_target), sample_id)
                continue
            (entry["dx"] if m.group(2).upper() == "DX" else entry["tissue"]).append(str(path))
            continue
        if path is None:
            what = f"expression file {file_name} (File ID {file_id})"
            handle(_missing(what, src, sample_id, "omics_expression"), sample_id)
            continue
        if entry["expression"] is not None:
            report.exclude("second_expression_file_of_sample", example=f"{sample_id}: {file_name}")
            continue
        try:
            values, model = read_star_counts(path, expression_value, gene_key, sample_id)
        except DataError as err:
            handle(err, sample_id)
            continue
        if model:
            models.add(model)
        entry["expression"] = str(path)
        expression[project][sample_id] = (values, str(path))

    for sample_id in dropped:
        samples.pop(sample_id, None)
        for per_project in expression.values():
            per_project.pop(sample_id, None)

    cells = _write_expression(expression, out)
    table_rows = []
    salt = "bioperceiver" if seed == 0 else f"bioperceiver:{seed}"
    for sample_id in sorted(samples):
        entry = samples[sample_id]
        patient = entry["patient"]
        case = cases.loc[patient] if patient in cases.index else None
        if case is None:
            report.note("sample_without_clinical_row")
        time_days, event = _survival(case, report)
        dx = sorted(entry["dx"])
        tss = patient.split("-")[1]
        row = {
            "sample_id": sample_id,
            "patient_id": patient,
            "split": split_of(patient if split_by == "patient" else tss, split_fractions, salt),
            "omics_expression": cells.get(sample_id),
            "text_report": reports.get(patient),
            "tabular_clinical": tabular_cell(_clinical_fields(case)) if case is not None else None,
            "label_project": entry["project"],
            "label_sample_type": SAMPLE_TYPES[entry["code"]],
            "label_survival_time": time_days,
            "label_survival_event": event,
            "meta_site": entry["project"],
            "meta_tissue_source_site": tss,
            "meta_case_uuid": _text(case.get("case_id")) if case is not None else None,
            "meta_tissue_slides": json.dumps(sorted(entry["tissue"])) if entry["tissue"] else None,
            "meta_extra_dx_slides": json.dumps(dx[1:]) if len(dx) > 1 else None,
            "meta_pathology_report_pdf": pdfs.get(patient),
            "meta_expression_file": entry["expression"],
        }
        if slide_target is not None:
            row[slide_target] = dx[0] if dx else None
        if row["omics_expression"] is None and row["text_report"] is None and not dx:
            report.exclude("sample_without_expression_slide_or_report", example=sample_id)
            continue
        table_rows.append(row)
    kept_patients = {r["patient_id"] for r in table_rows}
    report.exclude("case_without_selected_sample", len(set(cases.index) - kept_patients))

    table = pd.DataFrame(table_rows)
    if len(table):
        table["label_survival_time"] = table["label_survival_time"].astype("float64")
        table["label_survival_event"] = table["label_survival_event"].astype("Int64")
        table = table.dropna(axis=1, how="all")  # columns no row fills (e.g. no reports) are left out
    modalities = {c: k for c, k in (("omics_expression", "omics"), ("text_report", "text"),
                                    ("tabular_clinical", "tabular")) if c in table}  # fmt: skip
    if slide_target is not None and not slide_target.startswith("meta_") and slide_target in table:
        modalities[slide_target] = kind_of_column(slide_target)
    return write_recipe_output(
        table,
        out,
        name=NAME,
        provenance={
            "dataset": "TCGA (NCI Genomic Data Commons)",
            "url": "https://portal.gdc.cancer.gov",
            "input_dir": str(src),
            "files": [sheet_path.name, clinical_path.name, *([reports_path.name] if reports else [])],
            "projects": sorted({s["project"] for s in samples.values()}),
            "gene_models": sorted(models),
        },
        licence_note=LICENCE_NOTE,
        versions={"gdc_expression_gene_model": sorted(models)},
        report=report,
        modalities=modalities,
        labels={k: v for k, v in LABELS.items() if k in table},
        label_notes={
            "label_survival_time": "overall survival in days (days_to_death if Dead, else days_to_last_follow_up)",
            "label_survival_event": "1 = dead (vital_status), 0 = alive at last follow-up",
            "label_project": "TCGA project = cancer type; also in meta_site",
        },
        params={
            "sample_types": list(sample_types),
            "expression_value": expression_value,
            "gene_key": gene_key,
            "slide_column": slide_column,
            "slide_paths_in": slide_target,
            "split_by": split_by,
            "split_fractions": list(split_fractions),
            "seed": seed,
            "on_error": on_error,
        },
        outputs=sorted({c.split("#")[0] for c in cells.values()}),
        recipe_version=RECIPE_VERSION,
        extra={"processor_settings": {"omics_expression": {"normalization": "log1p", "top_k": 2048}}},
        started=t0,
    )


def _write_expression(expression: Mapping[str, Mapping[str, tuple[pd.Series, str]]], out: Path) -> dict[str, str]:
    """One samples x genes float32 Parquet matrix per project under ``out/omics/``; returns sample -> cell."""
    cells: dict[str, str] = {}
    for project, per_sample in sorted(expression.items()):
        if not per_sample:
            continue
        ids = sorted(per_sample)
        matrix = pd.DataFrame({s: per_sample[s][0] for s in ids}).T.astype(np.float32)  # (samples, genes)
        matrix.index.name = "sample_id"
        rel = f"omics/{_safe(project)}.parquet"
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        matrix.to_parquet(tmp)
        os.replace(tmp, target)
        cells.update({s: f"{rel}#row={s}" for s in ids})
        logger.info("%s: %d samples x %d genes -> %s", project, *matrix.shape, target)
    return cells


def _missing(what: str, src: Path, sample_id: str, column: str) -> DataError:
    return DataError(
        "missing_file",
        f"{what} is listed in the sample sheet but not in {src} (nor in {src}/<File ID>/)",
        sample_id=sample_id,
        modality=column,
        fix="download it with gdc-client (gdc-client download -m <manifest>), or pass --on_error skip_sample",
    )


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _clinical_fields(case: pd.Series) -> dict[str, Any]:
    out = {}
    for col in TABULAR_FIELDS:
        if col in case.index:
            v = case[col]
            out[col] = (float(v) if pd.notna(v) else None) if col == "age_at_index" else _text(v)
    return out


def _survival(case: pd.Series | None, report: RecipeReport) -> tuple[float | None, int | None]:
    if case is None:
        return None, None
    dead = bool(case["dead"])
    days = case["days_to_death"] if dead else case["days_to_last_follow_up"]
    if pd.isna(days):
        report.note("survival_time_missing")
        return None, None
    if days < 0:
        report.note("survival_time_negative")
        return None, None
    return float(days), int(dead)


def main(argv: list[str] | None = None) -> int:
    parser = recipe_parser(
        NAME, "Convert a GDC TCGA download (STAR-Counts, clinical, slides, reports) into a manifest."
    )
    parser.add_argument("--sample_sheet", default=None, help="the GDC sample sheet (default: gdc_sample_sheet*.tsv)")
    parser.add_argument("--clinical", default=None, help="clinical.tsv (default: in --tcga_dir)")
    parser.add_argument("--reports_csv", default=None, help="TCGA_Reports.csv (default: in --tcga_dir when present)")
    parser.add_argument("--sample_types", nargs="+", default=["01"], choices=sorted(SAMPLE_TYPES))
    parser.add_argument("--expression_value", default="tpm_unstranded", choices=EXPRESSION_VALUES)
    parser.add_argument("--gene_key", default="gene_name", choices=GENE_KEYS)
    parser.add_argument("--slide_column", default="wsi_diagnostic", help="column of the DX slide paths, or 'none'")
    parser.add_argument("--split_by", default="patient", choices=SPLIT_KEYS)
    parser.add_argument("--split_fractions", nargs=3, type=float, default=[0.8, 0.1, 0.1])

    def run(args):
        return build_tcga(
            args.tcga_dir,
            args.output_dir,
            sample_sheet=args.sample_sheet,
            clinical=args.clinical,
            reports_csv=args.reports_csv,
            sample_types=args.sample_types,
            expression_value=args.expression_value,
            gene_key=args.gene_key,
            slide_column=None if args.slide_column.lower() == "none" else args.slide_column,
            split_by=args.split_by,
            split_fractions=args.split_fractions,
            seed=args.seed,
            on_error=args.on_error,
            overwrite=args.overwrite_output_dir,
        )

    return run_recipe(run, parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
