"""PTB-XL (12-lead ECG + report text + patient fields) from its PhysioNet download into a manifest.

Command line::

    python -m bioperceiver.data.recipes.ptbxl --ptbxl_dir PTBXL --output_dir OUT [--sampling_rate 100|500]
        [--min_likelihood 0] [--on_error raise|skip_sample|skip_modality] [--overwrite_output_dir]

``PTBXL`` is the unpacked PTB-XL 1.0.3 folder (https://physionet.org/content/ptb-xl/1.0.3/, CC BY 4.0, no
credentialing): ``ptbxl_database.csv``, ``scp_statements.csv`` (either may be gzipped) and the WFDB records
``records100/<bucket>/<ecg_id>_lr.{hea,dat}`` (100 Hz) and ``records500/<bucket>/<ecg_id>_hr.{hea,dat}`` (500 Hz),
named by the database's ``filename_lr`` / ``filename_hr`` columns.

One row per ECG:

=================  ==============================================================================================
column             value
=================  ==============================================================================================
sample_id          the ``ecg_id`` (``"1"`` ... ``"21837"``)
patient_id         PTB-XL's ``patient_id`` (``"15709"``; the CSV stores it as a float)
split              from ``strat_fold``: 1-8 ``train``, 9 ``validation``, 10 ``test`` (the benchmark convention of
                   Strodthoff et al. 2021; the folds are patient-disjoint, which the recipe checks)
signal_ecg         ``signals/records{100,500}/<bucket>/<record>.npz``: ``values`` float32 (12, T) in mV, ``channels``
                   (``I II III AVR AVL AVF V1 ... V6``), ``sampling_rate``; read with ``wfdb.rdsamp``
text_report        the ``report`` text (mostly German, some English/Swedish; null when empty)
tabular_patient    ``{"age", "sex", "height", "weight"}`` (sex ``0 -> "male"``, ``1 -> "female"``; PTB-XL stores
                   ages above 89 as 300, which becomes 90; missing height/weight stay null = not measured)
label_superclass   list of diagnostic superclasses (``NORM MI STTC CD HYP``) of the record's SCP codes with
                   ``diagnostic == 1`` in ``scp_statements.csv`` and likelihood >= ``--min_likelihood``; null
                   when none (the benchmark leaves such records out of the superclass task)
label_subclass     the same for ``diagnostic_subclass`` (23 subclasses)
meta_*             ``strat_fold``, ``site``, ``device``, ``recording_date``, ``validated_by_human`` (when present)
=================  ==============================================================================================

``--min_likelihood`` (0-100) keeps only SCP statements at least that likely; the default 0 keeps all of them, as the
benchmark does (likelihood 0 marks statements given without one). Codes absent from ``scp_statements.csv`` are
counted (``notes.scp_code_not_in_statements``): they point at mismatched file versions.

Bad records (a missing ``.dat``, an unreadable header, a wrong lead count or rate, non-finite samples, a malformed
``scp_codes`` literal) are :class:`~bioperceiver.data.errors.DataError`\\ s naming the ``ecg_id`` and record, handled
by ``--on_error``: ``raise`` stops, ``skip_sample`` drops the row, ``skip_modality`` keeps the row without the
ECG (report and patient fields remain) or without labels; every drop is counted in the sidecar's ``counts``.
"""

from __future__ import annotations

import ast
import logging
import math
import os
import time
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..errors import DataError, check_on_error
from .common import (
    RecipeError,
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

NAME = "ptbxl"
RECIPE_VERSION = 1
DATASET_VERSION = "1.0.3"
VERSION_HINT = f"PTB-XL {DATASET_VERSION}"
WHERE_FROM = (
    f"download PTB-XL {DATASET_VERSION} from PhysioNet (https://physionet.org/content/ptb-xl/{DATASET_VERSION}/, "
    "open access) and unpack it"
)
LICENCE_NOTE = (
    "PTB-XL 1.0.3 is distributed by PhysioNet under the Creative Commons Attribution 4.0 International licence "
    "(CC BY 4.0); no credentialing is required. Cite Wagner et al., 'PTB-XL, a large publicly available "
    "electrocardiography dataset', Scientific Data 7, 154 (2020) and Goldberger et al., PhysioNet, Circulation "
    "101(23) (2000). Keep the manifest and the converted signals outside the repository."
)
DATABASE_FILE = "ptbxl_database.csv"
STATEMENTS_FILE = "scp_statements.csv"
DATABASE_COLUMNS = (
    "ecg_id",
    "patient_id",
    "age",
    "sex",
    "height",
    "weight",
    "report",
    "scp_codes",
    "strat_fold",
    "filename_lr",
    "filename_hr",
)
STATEMENT_COLUMNS = ("diagnostic", "diagnostic_class", "diagnostic_subclass")
META_COLUMNS = ("strat_fold", "site", "device", "recording_date", "validated_by_human")
SAMPLING_RATES = {100: "filename_lr", 500: "filename_hr"}
SUPERCLASSES = ("NORM", "MI", "STTC", "CD", "HYP")
LEADS = ("I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6")
FOLD_SPLITS = {**dict.fromkeys(range(1, 9), "train"), 9: "validation", 10: "test"}
AGE_ANONYMISED, AGE_CAPPED = 300, 90
SEX = {0: "male", 1: "female"}
SIGNAL_COLUMN = "signal_ecg"
MODALITIES = {SIGNAL_COLUMN: "signal", "text_report": "text", "tabular_patient": "tabular"}
LABELS = {"label_superclass": "multilabel", "label_subclass": "multilabel"}
_UNITS_TO_MV = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "v": 1e3}


def read_statements(path: Path) -> pd.DataFrame:
    """``scp_statements.csv`` indexed by SCP code, with the columns the labels need checked."""
    table = pd.read_csv(path, index_col=0, encoding="utf-8")
    require_columns(table, STATEMENT_COLUMNS, path, VERSION_HINT)
    table.index = table.index.astype(str).str.strip()
    return table


def parse_scp_codes(cell: Any, ecg_id: str) -> dict[str, float]:
    """The ``scp_codes`` cell (a Python dict literal ``{'NORM': 100.0, 'SR': 0.0}``) as ``{code: likelihood}``."""
    try:
        value = ast.literal_eval(str(cell))
        if not isinstance(value, dict):
            raise ValueError(f"a {type(value).__name__}, not a dict")
        return {str(k).strip(): float(v) for k, v in value.items()}
    except (ValueError, SyntaxError, TypeError) as err:
        raise DataError(
            "bad_scp_codes",
            f"scp_codes {str(cell)[:80]!r} is not a dict literal of code -> likelihood ({err})",
            sample_id=ecg_id,
            modality="label_superclass",
            fix=f"restore {DATABASE_FILE} from the {VERSION_HINT} download",
        ) from None


def diagnostic_labels(
    codes: Mapping[str, float], statements: pd.DataFrame, min_likelihood: float, report: RecipeReport
) -> tuple[list[str] | None, list[str] | None]:
    """Superclasses and subclasses (sorted, unique; ``None`` when empty) of the diagnostic codes at least
    ``min_likelihood`` likely; codes unknown to ``statements`` or below the threshold are counted in ``report``."""
    supers, subs = set(), set()
    for code, likelihood in codes.items():
        if code not in statements.index:
            report.note("scp_code_not_in_statements")
            continue
        row = statements.loc[code]
        if not _is_one(row["diagnostic"]):
            continue
        if likelihood < min_likelihood:
            report.note("scp_code_below_min_likelihood")
            continue
        if isinstance(row["diagnostic_class"], str) and row["diagnostic_class"].strip():
            supers.add(row["diagnostic_class"].strip())
        if isinstance(row["diagnostic_subclass"], str) and row["diagnostic_subclass"].strip():
            subs.add(row["diagnostic_subclass"].strip())
    return (sorted(supers) or None), (sorted(subs) or None)


def _is_one(value: Any) -> bool:
    try:
        return float(value) == 1.0
    except (TypeError, ValueError):
        return False


def _number(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def patient_fields(row: Mapping[str, Any], report: RecipeReport) -> str | None:
    age = _number(row.get("age"))
    if age is not None and age >= AGE_ANONYMISED:
        age = float(AGE_CAPPED)
        report.note("age_over_89_set_to_90")
    sex = _number(row.get("sex"))
    return tabular_cell(
        {
            "age": age,
            "sex": SEX.get(int(sex)) if sex is not None else None,
            "height": _number(row.get("height")),
            "weight": _number(row.get("weight")),
        }
    )


def convert_record(record: Path, target: Path, ecg_id: str, sampling_rate: int) -> None:
    """Read one WFDB record (``record`` without extension) and write it as an ``.npz`` signal cell (12, T) in mV.

    Raises:
        DataError: the record is missing, unreadable, or not a 12-lead recording at ``sampling_rate`` with finite
            samples (the message names the ``ecg_id`` and the record).
    """
    import wfdb

    def bad(reason: str, message: str, fix: str) -> DataError:
        return DataError(reason, f"record {record}: {message}", sample_id=ecg_id, modality=SIGNAL_COLUMN, fix=fix)

    restore = f"restore the record from the {VERSION_HINT} download (or pass --on_error skip_sample)"
    missing = [p.name for p in (record.with_suffix(".hea"), record.with_suffix(".dat")) if not p.is_file()]
    if missing:
        raise bad("missing_record", f"{' and '.join(missing)} not found", restore)
    try:
        values, fields = wfdb.rdsamp(str(record))
    except Exception as err:  # wfdb raises many types (ValueError, IndexError, struct errors ...) on corrupt files
        raise bad("corrupt_record", f"wfdb cannot read it ({type(err).__name__}: {err})", restore) from None
    names = [str(n).upper() for n in fields.get("sig_name") or []]
    if fields.get("fs") is None or not math.isclose(float(fields["fs"]), sampling_rate):
        raise bad("wrong_sampling_rate", f"sampled at {fields.get('fs')} Hz, not {sampling_rate} Hz", restore)
    if values.ndim != 2 or values.shape[1] != len(LEADS) or values.shape[0] == 0:
        raise bad("wrong_shape", f"samples of shape {values.shape}, expected (T, {len(LEADS)})", restore)
    if fields.get("sig_len") is not None and values.shape[0] != int(fields["sig_len"]):
        raise bad("truncated_record", f"{values.shape[0]} samples read, the header says {fields['sig_len']}", restore)
    if not np.isfinite(values).all():
        raise bad("non_finite_samples", f"{int((~np.isfinite(values)).sum())} NaN/inf samples", restore)
    scale = np.ones(len(LEADS))
    for i, unit in enumerate(fields.get("units") or ["mV"] * len(LEADS)):
        factor = _UNITS_TO_MV.get(str(unit).strip().lower())
        if factor is None:
            raise bad("unknown_units", f"lead {names[i] if i < len(names) else i} in {unit!r}", restore)
        scale[i] = factor
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}.npz")
    np.savez(
        tmp,
        values=(values * scale).T.astype(np.float32),  # (12, T)
        channels=np.asarray(names or LEADS, dtype=str),
        sampling_rate=np.float32(sampling_rate),
    )
    os.replace(tmp, target)


def _convert_job(job: tuple[str, str, str, int]) -> tuple[str, DataError | None]:
    record, target, ecg_id, rate = job
    try:
        convert_record(Path(record), Path(target), ecg_id, rate)
    except DataError as err:
        return ecg_id, err
    return ecg_id, None


def _convert_all(
    jobs: list[tuple[str, str, str, int]], num_workers: int, desc: str, stop_at_first_error: bool
) -> dict[str, DataError]:
    """Convert every record (in ``num_workers`` processes when > 1); returns the errors by ``ecg_id``. Results come
    back in record order; with ``stop_at_first_error`` the work stops at the first bad record."""
    errors: dict[str, DataError] = {}
    progress = tqdm(total=len(jobs), desc=desc, unit="ecg", mininterval=2.0)
    pool = ProcessPoolExecutor(max_workers=num_workers) if num_workers > 1 and len(jobs) > 1 else None
    try:
        if pool is None:
            results = map(_convert_job, jobs)
        else:
            results = pool.map(_convert_job, jobs, chunksize=max(1, min(64, len(jobs) // (4 * num_workers))))
        for ecg_id, err in results:
            progress.update()
            if err is not None:
                errors[ecg_id] = err
                if stop_at_first_error:
                    break
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        progress.close()
    return errors


def build_ptbxl(
    ptbxl_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    sampling_rate: int = 100,
    min_likelihood: float = 0.0,
    on_error: str = "raise",
    overwrite: bool = False,
    limit: int | None = None,
    num_workers: int = 1,
) -> Path:
    """Convert a PTB-XL download into ``output_dir/manifest.parquet`` (+ sidecar, + ``signals/``); returns its path.

    Args:
        ptbxl_dir: the unpacked PTB-XL folder (``ptbxl_database.csv``, ``scp_statements.csv``, ``records100/``...).
        output_dir: where to write (outside the repository).
        sampling_rate: 100 (``records100``, ``filename_lr``) or 500 (``records500``, ``filename_hr``).
        min_likelihood: keep SCP statements at least this likely (0-100) for the labels.
        on_error: what a bad record does (:data:`bioperceiver.data.errors.ON_ERROR_CHOICES`).
        overwrite: replace a manifest already in ``output_dir``.
        limit: convert only the first ``limit`` ECGs (a quick look; the splits stay the dataset's folds).
        num_workers: processes converting the WFDB records (1: in this process). Errors are handled in record
            order whatever the number, so ``on_error="raise"`` names the first bad record.

    Raises:
        RecipeInputError / RecipeSchemaError: a file or column of the download is missing.
        RecipeSplitError: a patient is in two ``strat_fold`` folds.
        DataError: a bad record with ``on_error="raise"``.
    """
    t0 = time.perf_counter()
    if sampling_rate not in SAMPLING_RATES:
        raise ValueError(f"sampling_rate must be one of {sorted(SAMPLING_RATES)} Hz, got {sampling_rate}")
    if not 0 <= min_likelihood <= 100:
        raise ValueError(f"min_likelihood is a percentage (0-100), got {min_likelihood}")
    check_on_error(on_error)
    try:
        import wfdb  # noqa: F401  (read in convert_record; fail here, before any work)
    except ImportError as err:
        raise RecipeError(
            f"the PTB-XL recipe reads WFDB records with the wfdb package, which cannot be imported ({err}). Fix: "
            'pip install -e ".[recipes]" (wfdb==4.3.0)'
        ) from None
    src = Path(ptbxl_dir).expanduser().resolve()
    db_path = require_file(src / DATABASE_FILE, f"the PTB-XL database table ({DATABASE_FILE})", WHERE_FROM)
    st_path = require_file(src / STATEMENTS_FILE, f"the SCP statement table ({STATEMENTS_FILE})", WHERE_FROM)
    db = pd.read_csv(db_path, encoding="utf-8")
    require_columns(db, DATABASE_COLUMNS, db_path, VERSION_HINT)
    statements = read_statements(st_path)
    out = prepare_output_dir(output_dir, overwrite)  # after the inputs are found: a failed start leaves no folder
    report = RecipeReport(NAME)
    report.read[db_path.name] = len(db)
    report.read[st_path.name] = len(statements)

    folds = pd.to_numeric(db["strat_fold"], errors="coerce")
    bad_folds = db.loc[~folds.isin(list(FOLD_SPLITS)), "ecg_id"]
    if len(bad_folds):
        raise RecipeSchemaError(
            f"{db_path.name}: strat_fold must be 1-10; {len(bad_folds)} row(s) are not, e.g. ecg_id "
            f"{bad_folds.head(3).tolist()}. The recipe expects {VERSION_HINT}. Fix: use the original {DATABASE_FILE}"
        )
    db["strat_fold"] = folds.astype(int)
    db["patient_id"] = [_id(v) for v in db["patient_id"]]
    db["ecg_id"] = [_id(v) for v in db["ecg_id"]]
    check_patient_safe(db, "strat_fold", what="strat_fold folds")
    if limit is not None:
        report.exclude("beyond_limit", max(len(db) - int(limit), 0))
        db = db.head(int(limit))

    rate_dir = f"records{sampling_rate}"
    file_column = SAMPLING_RATES[sampling_rate]
    pending: list[dict[str, Any]] = []
    jobs: list[tuple[str, str, str, int]] = []
    for row in db.to_dict("records"):
        ecg_id = row["ecg_id"]
        out_row: dict[str, Any] = {
            "sample_id": ecg_id,
            "patient_id": row["patient_id"],
            "split": FOLD_SPLITS[row["strat_fold"]],
        }
        try:
            codes = parse_scp_codes(row["scp_codes"], ecg_id)
        except DataError as err:
            if report.handle(err, on_error) == "sample":
                continue
            codes = {}
        out_row["label_superclass"], out_row["label_subclass"] = diagnostic_labels(
            codes, statements, min_likelihood, report
        )
        if out_row["label_superclass"] is None:
            report.note("no_diagnostic_superclass")
        relative = str(row[file_column]).strip()
        out_row[SIGNAL_COLUMN] = f"signals/{relative}.npz"
        jobs.append((str(src / relative), str(out / out_row[SIGNAL_COLUMN]), ecg_id, sampling_rate))
        text = row.get("report")
        out_row["text_report"] = text.strip() if isinstance(text, str) and text.strip() else None
        if out_row["text_report"] is None:
            report.note("empty_report")
        out_row["tabular_patient"] = patient_fields(row, report)
        for col in META_COLUMNS:
            if col in row:
                out_row[f"meta_{col}"] = _meta(row[col])
        pending.append(out_row)

    errors = _convert_all(jobs, num_workers, f"PTB-XL {rate_dir}", check_on_error(on_error) == "raise")
    rows: list[dict[str, Any]] = []
    for out_row in pending:
        err = errors.get(out_row["sample_id"])
        if err is not None:
            if report.handle(err, on_error) == "sample":
                continue
            out_row[SIGNAL_COLUMN] = None
        if all(out_row[c] is None for c in MODALITIES):
            report.exclude("no_modality_left", example=f"ecg_id {out_row['sample_id']}")
            continue
        rows.append(out_row)

    table = pd.DataFrame(rows, columns=_columns(rows))
    return write_recipe_output(
        table,
        out,
        name=NAME,
        provenance={
            "dataset": "PTB-XL",
            "version": DATASET_VERSION,
            "url": f"https://physionet.org/content/ptb-xl/{DATASET_VERSION}/",
            "input_dir": str(src),
            "files": [db_path.name, st_path.name, f"{rate_dir}/ (WFDB records)"],
            "citation": "Wagner et al., Scientific Data 7, 154 (2020)",
        },
        licence_note=LICENCE_NOTE,
        versions={"ptbxl": DATASET_VERSION, **_wfdb_version()},
        report=report,
        modalities=MODALITIES,
        labels=LABELS,
        label_notes={
            "label_superclass": f"diagnostic superclasses {list(SUPERCLASSES)} of SCP codes with likelihood >= "
            f"{min_likelihood} (scp_statements.csv diagnostic_class); null = no diagnostic statement",
            "label_subclass": "diagnostic subclasses (scp_statements.csv diagnostic_subclass); null = none",
        },
        params={
            "sampling_rate": sampling_rate,
            "min_likelihood": min_likelihood,
            "on_error": on_error,
            "limit": limit,
            "num_workers": num_workers,
            "split_rule": "strat_fold 1-8 train, 9 validation, 10 test",
        },
        outputs=[f"signals/{rate_dir}/"],
        recipe_version=RECIPE_VERSION,
        extra={
            "signal_files": int(table[SIGNAL_COLUMN].notna().sum()) if len(table) else 0,
            "processor_settings": {SIGNAL_COLUMN: {"target_rate": float(sampling_rate), "window_s": 10.0}},
        },
        started=t0,
    )


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    base = ["sample_id", "patient_id", "split", *MODALITIES, *LABELS]
    meta = [f"meta_{c}" for c in META_COLUMNS if any(f"meta_{c}" in r for r in rows)]
    return base + meta


def _id(value: Any) -> str:
    """``15709.0`` / ``"15709"`` -> ``"15709"`` (the CSV stores ids as floats)."""
    x = _number(value)
    if x is not None and x.is_integer():
        return str(int(x))
    return str(value).strip()


def _meta(value: Any) -> Any:
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return None if value is None else str(value).strip() if isinstance(value, str) else value


def _wfdb_version() -> dict[str, str | None]:
    from .common import package_versions

    return {"wfdb": package_versions(["wfdb"])["wfdb"]}


def main(argv: list[str] | None = None) -> int:
    parser = recipe_parser(NAME, "Convert a PTB-XL 1.0.3 download (ECG + report + patient fields) into a manifest.")
    parser.add_argument("--sampling_rate", type=int, choices=sorted(SAMPLING_RATES), default=100)
    parser.add_argument(
        "--min_likelihood", type=float, default=0.0, help="keep SCP statements at least this likely (0-100)"
    )
    parser.add_argument("--limit", type=int, default=None, help="convert only the first N ECGs")
    parser.add_argument("--num_workers", type=int, default=1, help="processes converting the WFDB records")

    def run(args):
        return build_ptbxl(
            args.ptbxl_dir,
            args.output_dir,
            sampling_rate=args.sampling_rate,
            min_likelihood=args.min_likelihood,
            on_error=args.on_error,
            overwrite=args.overwrite_output_dir,
            limit=args.limit,
            num_workers=args.num_workers,
        )

    return run_recipe(run, parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
