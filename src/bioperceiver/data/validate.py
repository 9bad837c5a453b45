"""Manifest validation: every problem at once, each naming its row, sample, column and fix.

Usage::

    python -m bioperceiver.data.validate MANIFEST [--modality col=kind ...] [--deep PROCESSOR_DIR] [--json OUT]
    bioperceiver-validate MANIFEST ...

The default (cheap) mode reads no pixel or sample data: it checks ids, splits, labels and every cell's type, and
decodes file headers through each modality's spec: ``.npy`` headers (shape, a zero-length axis such as a
``(3, 0)`` signal, a numeric dtype, and a file as long as its header says: truncated or corrupt files are named,
with the advice to re-export them), PNG/JPEG/TIFF/DICOM/NIfTI image headers, signal ``.npz``/``.csv``/``.edf``
headers, and the value types of omics and tabular mappings (e.g. ``{"TP53": "high"}``). ``--deep`` also runs
every cell through fitted processors; fit them first (``tokenizers/fit_processors.py``): fitting leaves unreadable
training values out and counts them, so the bad rows are then reported here rather than crashing the fit.

Exit status 0 when the manifest is clean, 1 when it has problems, 2 when it cannot be read at all.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from ..modalities.registry import get_modality
from .errors import Problem, check_on_error
from .manifest import (
    FLAT_COLUMNS_FIX,
    ID_COLUMNS,
    LABEL_PREFIX,
    SPLIT_COLUMN,
    SPLITS,
    Manifest,
    is_missing,
    resolve_modalities,
)

logger = logging.getLogger(__name__)


# Problems of the table itself rather than of one sample's content: no ``on_error`` setting skips them.
MANIFEST_LEVEL_REASONS = frozenset({"empty_id", "duplicate_id", "bad_split", "patient_in_several_splits"})


class ManifestError(ValueError):
    """The manifest cannot be used as it is; ``report`` holds every problem (row, sample, column, fix)."""

    def __init__(self, message: str, report: ValidationReport):
        super().__init__(message)
        self.report = report


@dataclass
class ValidationReport:
    num_rows: int
    modalities: dict[str, str]
    problems: list[Problem] = field(default_factory=list)
    modality_counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.problems:
            out[p.reason] = out.get(p.reason, 0) + 1
        return out

    def summary(self, max_lines: int = 50) -> str:
        head = (
            f"{self.num_rows} rows; modalities {self.modalities}; present per modality {self.modality_counts}; "
            f"{len(self.problems)} problem(s)"
        )
        if self.ok:
            return head + " - manifest OK"
        lines = [head, "by reason: " + ", ".join(f"{k}={v}" for k, v in sorted(self.counts().items()))]
        lines += [str(p) for p in self.problems[:max_lines]]
        if len(self.problems) > max_lines:
            lines.append(f"... and {len(self.problems) - max_lines} more (use --json for all)")
        return "\n".join(lines)

    def blocking(self, on_error: str) -> list[Problem]:
        """Problems that must stop a run before any work: manifest-level ones (table-level problems, empty or
        duplicate ids, bad split names, patients in several splits) always; every problem when ``on_error`` is
        ``"raise"``. Per-sample content problems are otherwise left to ``on_error`` (skipped and counted)."""
        if check_on_error(on_error) == "raise":
            return list(self.problems)
        return [p for p in self.problems if p.row is None or p.reason in MANIFEST_LEVEL_REASONS]

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_rows": self.num_rows,
            "modalities": self.modalities,
            "modality_counts": self.modality_counts,
            "ok": self.ok,
            "counts": self.counts(),
            "problems": [asdict(p) for p in self.problems],
        }


def _bad_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(float(v))


def validate_manifest(
    manifest: str | os.PathLike | pd.DataFrame | Manifest,
    *,
    modalities: dict[str, str] | None = None,
    base_dir: str | os.PathLike | None = None,
    processor=None,
    check_files: bool = True,
) -> ValidationReport:
    """Check a manifest and report every problem at once (never raises on bad content).

    Checks: required id columns, empty/duplicate ids, unknown columns, rows with no modality, invalid split names
    and patients in several splits, NaN/inf labels, and every modality cell through its kind's
    ``ModalitySpec.check_cell``: empty notes, non-mapping, NaN/inf- or non-number-holding mappings, missing,
    unreadable or empty paths, ``#`` options, and a header decode of image/signal files (no pixel or sample data
    is read). With ``processor`` (a fitted :class:`~bioperceiver.data.BioPerceiverProcessor`) every cell is also
    run through its processor (``ModalitySpec.deep_check``), which catches corrupt data, unknown genes and the
    like.
    """
    problems: list[Problem] = []
    if isinstance(manifest, Manifest):
        table, mods, base = manifest.table, dict(manifest.modalities), manifest.base_dir
    else:
        if isinstance(manifest, pd.DataFrame):
            from .manifest import pack_wide_columns

            table, meta, base = pack_wide_columns(manifest), {}, Path(base_dir) if base_dir else Path.cwd()
        else:
            path = Path(manifest)
            from .manifest import _read_table, metadata_path

            table = _read_table(path)
            mp = metadata_path(path)
            meta = json.loads(mp.read_text()) if mp.exists() else {}
            base = Path(base_dir) if base_dir else path.resolve().parent
        mods, unknown = resolve_modalities(table.columns, {**meta.get("modalities", {}), **(modalities or {})})
        for col in unknown:
            problems.append(
                Problem(
                    "unknown_column",
                    f"{col!r} is not a modality, label or meta column",
                    "rename it '<kind>_<name>', 'label_<name>' or 'meta_<name>', or pass --modality col=kind; for "
                    + FLAT_COLUMNS_FIX,
                    column=col,
                )
            )
    n = len(table)
    for col in ID_COLUMNS:
        if col not in table:
            problems.append(Problem("missing_column", f"no {col!r} column", f"add a {col} column", column=col))
    if not mods:
        problems.append(Problem("no_modality_column", "no modality column", "add e.g. 'text' or 'image_cxr'"))
    ids = table["sample_id"] if "sample_id" in table else pd.Series([None] * n)
    sid = [None if is_missing(v) else str(v) for v in ids]
    if "sample_id" in table:
        seen: dict[str, int] = {}
        for i, s in enumerate(sid):
            if s is None or not s.strip():
                problems.append(Problem("empty_id", "sample_id is empty", "give every row a unique sample_id", i))
            elif s in seen:
                problems.append(
                    Problem("duplicate_id", f"duplicate of row {seen[s]}", "make sample_id unique", i, s, "sample_id")
                )
            else:
                seen[s] = i
    if "patient_id" in table:
        for i, p in enumerate(table["patient_id"]):
            if is_missing(p) or not str(p).strip():
                problems.append(
                    Problem("empty_id", "patient_id is empty", "fill patient_id (splits are per patient)", i, sid[i])
                )
    counts = dict.fromkeys(mods, 0)
    any_present = [False] * n
    for col, kind in mods.items():
        for i, v in enumerate(table[col]):
            if is_missing(v):
                continue
            any_present[i] = True
            counts[col] += 1
            problems.extend(_check_cell(col, kind, v, i, sid[i], base, check_files))
    for i, has in enumerate(any_present):
        if not has and mods:
            problems.append(
                Problem("no_modality", "the sample has no modality", "drop the row or fill a modality", i, sid[i])
            )
    if SPLIT_COLUMN in table:
        for i, s in enumerate(table[SPLIT_COLUMN]):
            if not is_missing(s) and s not in SPLITS:
                problems.append(Problem("bad_split", f"split {s!r}", f"use one of {SPLITS}", i, sid[i], SPLIT_COLUMN))
        if "patient_id" in table:
            from .splits import patients_in_several_splits

            for pid, splits in patients_in_several_splits(table).items():
                problems.append(
                    Problem(
                        "patient_in_several_splits",
                        f"patient {pid!r} is in splits {splits}",
                        "split by patient: bioperceiver.data.assign_splits(manifest, overwrite=True)",
                        column=SPLIT_COLUMN,
                    )
                )
    for col in (c for c in table.columns if c.startswith(LABEL_PREFIX)):
        for i, v in enumerate(table[col]):
            if _bad_number(v) and not is_missing(v):
                problems.append(Problem("non_finite_label", f"label is {v}", "use null for unknown", i, sid[i], col))
    if processor is not None:  # cells the cheap checks flagged are not reported a second time by their processor
        flagged = {(p.row, p.column) for p in problems if p.row is not None}
        problems.extend(_deep_check(table, mods, base, processor, sid, flagged))
    return ValidationReport(n, mods, problems, counts)


def check_manifest_before_work(
    manifest: str | os.PathLike | pd.DataFrame | Manifest,
    *,
    on_error: str,
    check_files: bool = True,
    what: str = "this run",
    max_lines: int = 50,
) -> ValidationReport:
    """Cheap validation (headers decoded, no processor) of a manifest before a script does any work.

    Raises :class:`ManifestError` listing every blocking problem (:meth:`ValidationReport.blocking`); the other
    problems are logged with their counts and left to ``on_error``. Returns the report."""
    report = validate_manifest(manifest, check_files=check_files)
    blocking = report.blocking(on_error)
    if blocking:
        shown = ValidationReport(report.num_rows, report.modalities, blocking, report.modality_counts)
        raise ManifestError(
            f"the manifest cannot be used for {what} (on_error={on_error!r}); fix these first, or check it with "
            f"`bioperceiver-validate MANIFEST`:\n{shown.summary(max_lines)}",
            report,
        )
    if report.problems:
        logger.warning(
            "manifest: %d per-sample problem(s) left to on_error=%r: %s",
            len(report.problems),
            on_error,
            report.counts(),
        )
    return report


def _check_cell(col, kind, v, i, sid, base, check_files) -> list[Problem]:
    try:
        spec = get_modality(kind)
    except ValueError as err:
        return [Problem("unknown_kind", str(err), "register the kind or fix the --modality mapping", i, sid, col)]
    found = spec.check_cell(v, base_dir=base, check_files=check_files)
    return [replace(p, row=i, sample_id=sid, column=col) for p in found]


def _deep_check(table, mods, base, processor, sid, flagged=frozenset()) -> list[Problem]:
    out = []
    for col in mods:
        proc = processor.processors.get(col)
        if proc is None:
            out.append(Problem("no_processor", "no fitted processor for this column", "refit processors", column=col))
            continue
        spec = get_modality(proc.kind)
        for i, v in enumerate(table[col]):
            if is_missing(v) or (i, col) in flagged:
                continue
            found = spec.deep_check(proc, v, sample_id=sid[i], base_dir=base)
            out.extend(replace(p, row=i, sample_id=sid[i], column=col) for p in found)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bioperceiver-validate",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.strip().split("\n\n")[3:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("manifest", help="Parquet, CSV or JSONL manifest")
    parser.add_argument("--modality", action="append", default=[], metavar="COLUMN=KIND", help="column kind")
    parser.add_argument(
        "--deep",
        metavar="PROCESSOR_DIR",
        help="also run every cell through the fitted processors saved there (catches what headers cannot: "
        "unknown genes, undecodable pixels, sidecar errors)",
    )
    parser.add_argument(
        "--no-files", action="store_true", help="do not open referenced files (no existence or header checks)"
    )
    parser.add_argument("--json", metavar="OUT", help="write the full report as JSON")
    parser.add_argument("--max-lines", type=int, default=50)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    mods = {}
    for item in args.modality:
        col, _, kind = item.partition("=")
        if not kind:
            parser.error(f"--modality expects COLUMN=KIND, got {item!r}")
        mods[col] = kind
    processor = None
    if args.deep:
        from .processing import BioPerceiverProcessor

        processor = BioPerceiverProcessor.from_pretrained(args.deep)
    try:
        report = validate_manifest(args.manifest, modalities=mods, processor=processor, check_files=not args.no_files)
    except (OSError, ValueError) as err:
        print(f"cannot read {args.manifest}: {err}", file=sys.stderr)
        return 2
    print(report.summary(args.max_lines))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=1, default=str) + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
