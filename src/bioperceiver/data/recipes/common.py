"""The shared base of every public-cohort recipe (PTB-XL, TCGA, MIMIC-IV ...): CLI, input checks, counts, output.

A public-cohort recipe is a module ``bioperceiver.data.recipes.<name>`` with a CLI::

    python -m bioperceiver.data.recipes.<name> --<name>_dir IN --output_dir OUT [--overwrite_output_dir]
        [--on_error raise|skip_sample|skip_modality] [--seed N] [recipe options]

that reads a credentialed download *in its own layout* and writes ``OUT/manifest.parquet`` plus its sidecar
``OUT/manifest.parquet.meta.json`` (the sidecar name :func:`bioperceiver.data.manifest.metadata_path` defines, which
:func:`~bioperceiver.data.manifest.read_manifest` and ``python -m bioperceiver.data.validate`` read back for the
``modalities`` mapping). Data never enters the repository: :func:`prepare_output_dir` refuses a folder inside the
source checkout
(its git-ignored ``outputs/`` folder excepted).

What this module gives a recipe
-------------------------------
* :func:`recipe_parser` — the argparse parser with the common options; :func:`run_recipe` runs a ``main`` with
  logging set up and turns the recipe errors below into one clear line and exit status 1.
* :func:`require_file` — finds ``x.csv`` or ``x.csv.gz`` (either spelling may be asked for) or raises
  :class:`RecipeInputError` naming the file, the folder searched and where the file comes from
  (``"download PTB-XL 1.0.3 from PhysioNet: https://..."``).
* :func:`require_columns` — raises :class:`RecipeSchemaError` naming each missing column, the closest column that
  *is* there (a likely rename), the file and the dataset version the recipe expects.
* :class:`RecipeReport` — counts of rows read, kept and dropped, per ``(column, reason)`` with example messages
  (a :class:`bioperceiver.data.errors.SkipReport` inside). :meth:`RecipeReport.handle` applies ``--on_error`` to
  one bad record: ``raise`` re-raises the :class:`~bioperceiver.data.errors.DataError`, ``skip_sample`` (``skip``)
  counts the row as dropped, ``skip_modality`` counts the cell as dropped and the row goes on without it. Rows a
  recipe leaves out on purpose (filters, not errors) are counted with :meth:`RecipeReport.exclude`. Nothing is
  dropped silently: every count lands in the sidecar under ``"counts"`` and in the log.
* :func:`check_patient_safe` — a patient in two folds / splits is a :class:`RecipeSplitError` naming the patients.
* :func:`tabular_cell` — a ``{feature: value}`` mapping as the JSON string the ``tabular`` kind takes (NaN and
  ``None`` become ``null``: "not measured").
* :func:`write_recipe_output` — checks patient-safe splits, writes the manifest and sidecar under temporary names,
  runs :func:`bioperceiver.data.validate.validate_manifest` on the written file (file headers decoded), and only
  when it passes renames both into place (sidecar last, so a present sidecar marks a complete build). A failing
  manifest raises :class:`RecipeOutputError` with the validator's summary and leaves
  ``OUT/validation_report.json``; no ``manifest.parquet`` is left behind.

The sidecar holds ``recipe``, ``name``, ``recipe_version``, ``synthetic: false``, ``params`` (the parsed CLI),
``provenance`` (dataset, version, url, input folder), ``licence_note`` (the credentialing / data-use terms),
``versions`` (dataset version + Python and package versions), ``modalities`` (column -> kind), ``labels``
(column -> task), ``label_notes``, ``counts`` (:meth:`RecipeReport.as_dict`), ``rows``, ``rows_per_split``,
``outputs`` (files written, relative to OUT) and ``build_seconds``.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib.metadata
import json
import logging
import math
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import MODALITY, ON_ERROR_CHOICES, SAMPLE, DataError, SkipReport, check_on_error
from ..manifest import SPLIT_COLUMN, SPLITS, metadata_path, write_manifest

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.parquet"
VALIDATION_REPORT_NAME = "validation_report.json"
IGNORED_OUTPUT_FOLDER = "outputs"  # the checkout's git-ignored folder for built cohorts and runs (.gitignore)
DEFAULT_RECIPE_ON_ERROR = "raise"
BASE_DISTRIBUTIONS = ("bioperceiver", "numpy", "pandas", "pyarrow")


class RecipeError(ValueError):
    """Base class of the errors a recipe reports to its user as one clear line (see :func:`run_recipe`)."""


class RecipeInputError(RecipeError, FileNotFoundError):
    """An input file of the download is missing (the message names it and where it comes from)."""


class RecipeSchemaError(RecipeError):
    """An input file lacks an expected column (renamed between dataset versions, or a different file)."""


class RecipeSplitError(RecipeError):
    """A patient falls in two folds or splits: the splits would leak across train and test."""


class RecipeOutputError(RecipeError):
    """The manifest the recipe built does not pass ``bioperceiver.data.validate``."""


# ------------------------------------------------------------------------------------------------------------------
# command line


def recipe_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The parser every recipe starts from: ``--<name>_dir`` (required), ``--output_dir`` (required),
    ``--overwrite_output_dir``, ``--on_error`` (the project's choices, default ``raise``), ``--seed`` and
    ``--log_level``. Add recipe options to the returned parser."""
    parser = argparse.ArgumentParser(
        prog=f"python -m bioperceiver.data.recipes.{name}",
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        f"--{name}_dir", required=True, help=f"folder of the {name} download, in the layout it is distributed in"
    )
    parser.add_argument(
        "--output_dir", required=True, help="folder to write manifest.parquet (+ sidecar) into; outside the repository"
    )
    parser.add_argument(
        "--overwrite_output_dir", action="store_true", help="replace a manifest already in --output_dir"
    )
    parser.add_argument(
        "--on_error",
        choices=ON_ERROR_CHOICES,
        default=DEFAULT_RECIPE_ON_ERROR,
        help="a corrupt or unreadable record: raise (stop, naming it), skip_sample (= skip: drop the row, counted) "
        "or skip_modality (keep the row without that cell, counted)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of any sampling the recipe does")
    parser.add_argument("--log_level", default="INFO")
    return parser


def run_recipe(main: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser, argv=None) -> int:
    """Parse ``argv``, set up logging, call ``main(args)``; a :class:`RecipeError`, a
    :class:`~bioperceiver.data.errors.DataError` or a ``FileExistsError`` is logged as one line and gives exit
    status 1. Prints the manifest path ``main`` returns."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        out = main(args)
    except (RecipeError, DataError, FileExistsError) as exc:
        logger.error("%s", exc)
        return 1
    if out is not None:
        print(out)
    return 0


# ------------------------------------------------------------------------------------------------------------------
# inputs


def require_file(
    path: str | os.PathLike, what: str, where_from: str, *, alternatives: Sequence[str | os.PathLike] = ()
) -> Path:
    """The existing file for ``path``, accepting it compressed or not: asking for ``x.csv`` finds ``x.csv`` or
    ``x.csv.gz``, asking for ``x.csv.gz`` finds either too.

    Args:
        path: the file as the dataset documents it (``<dir>/ptbxl_database.csv``).
        what: what the file is, for a person (``"the PTB-XL database table"``).
        where_from: how to get it (``"download PTB-XL 1.0.3 from PhysioNet: https://physionet.org/..."``).
        alternatives: other places the file has had (another dataset version's folder or name), tried in order
            after ``path``, each compressed or not.

    Raises:
        RecipeInputError: no spelling exists; the message names every one tried, the folder and ``where_from``.
    """
    candidates: list[Path] = []
    for option in (path, *alternatives):
        option = Path(option)
        plain = option.with_name(option.name[: -len(".gz")]) if option.name.endswith(".gz") else option
        candidates += [plain, plain.with_name(plain.name + ".gz")]
    for c in candidates:
        if c.is_file():
            return c
    folder = candidates[0].parent
    hint = "" if folder.is_dir() else f" (the folder {folder} does not exist)"
    names = [c.name if c.parent == folder else str(c) for c in candidates]
    raise RecipeInputError(
        f"{what} not found: looked for {', '.join(names[:-1])} and {names[-1]} in {folder}{hint}. "
        f"Fix: {where_from}, and pass the folder that holds it."
    )


def require_columns(df: pd.DataFrame, columns: Iterable[str], file: str | os.PathLike, version_hint: str) -> None:
    """Raise :class:`RecipeSchemaError` when ``df`` (read from ``file``) lacks any of ``columns``.

    The message names every missing column with the closest column present (a likely rename between dataset
    versions), the file, and ``version_hint`` (the version the recipe expects, e.g. ``"PTB-XL 1.0.3"``)."""
    present = [str(c) for c in df.columns]
    missing = [c for c in columns if c not in df.columns]
    if not missing:
        return
    parts = []
    for c in missing:
        close = difflib.get_close_matches(c, present, n=1, cutoff=0.6)
        parts.append(f"{c!r}" + (f" (renamed to {close[0]!r}?)" if close else ""))
    shown = present if len(present) <= 30 else [*present[:30], f"... {len(present) - 30} more"]
    raise RecipeSchemaError(
        f"{Path(file).name}: missing column(s) {', '.join(parts)}; the file has {shown}. The recipe expects "
        f"{version_hint}. Fix: use that version's file (or rename the column back); file: {file}"
    )


# ------------------------------------------------------------------------------------------------------------------
# counts


@dataclass
class RecipeReport:
    """What a recipe read, kept and dropped, and why.

    ``read`` counts input rows per source (``report.read["ptbxl_database.csv"] += n``), ``skips`` holds every bad
    record handled by ``on_error`` (per ``(column, reason)``, with examples), ``excluded`` counts rows left out on
    purpose by a filter (``(reason) -> n``, e.g. ``"sample_type_not_selected"``), ``notes`` free counts worth
    reporting (``"scp_code_below_likelihood"``). :meth:`finish` records the rows kept."""

    name: str
    read: Counter = field(default_factory=Counter)
    skips: SkipReport = field(default_factory=SkipReport)
    excluded: Counter = field(default_factory=Counter)
    excluded_examples: dict[str, list[str]] = field(default_factory=dict)
    notes: Counter = field(default_factory=Counter)
    kept: int | None = None

    def handle(self, error: DataError, on_error: str) -> str:
        """Apply ``on_error`` to one bad record: ``raise`` raises ``error``; ``skip_sample`` / ``skip`` counts
        the row as dropped and returns ``"sample"``; ``skip_modality`` counts the cell as dropped and returns
        ``"modality"`` (the caller keeps the row without that cell)."""
        policy = check_on_error(on_error)
        if policy == "raise":
            raise error
        scope = SAMPLE if policy == "skip_sample" else MODALITY
        self.skips.add(error, scope)
        logger.debug("%s: %s dropped: %s", self.name, scope, error)
        return scope

    def exclude(self, reason: str, n: int = 1, example: str | None = None) -> None:
        """Count ``n`` rows left out on purpose (a filter, not an error)."""
        if n <= 0:
            return
        self.excluded[reason] += n
        if example is not None:
            ex = self.excluded_examples.setdefault(reason, [])
            if len(ex) < 3:
                ex.append(example)

    def note(self, key: str, n: int = 1) -> None:
        self.notes[key] += n

    def finish(self, kept: int) -> None:
        self.kept = int(kept)

    @property
    def dropped(self) -> int:
        return self.skips.total + sum(self.excluded.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "read": dict(sorted(self.read.items())),
            "kept": self.kept,
            "dropped": self.dropped,
            "excluded": {
                r: {"count": c, "examples": self.excluded_examples.get(r, [])} for r, c in sorted(self.excluded.items())
            },
            "skipped": self.skips.as_dict(),
            "notes": dict(sorted(self.notes.items())),
        }

    def summary(self) -> str:
        lines = [f"{self.name}: read {dict(self.read)}; kept {self.kept} row(s); dropped {self.dropped}"]
        for r, c in sorted(self.excluded.items()):
            ex = self.excluded_examples.get(r)
            lines.append(f"  {c:6d}  excluded  reason={r}" + (f"  e.g. {ex[0]}" if ex else ""))
        if self.skips.total or self.skips.modality_total:
            lines.append(self.skips.summary())
        for k, c in sorted(self.notes.items()):
            lines.append(f"  {c:6d}  note      {k}")
        return "\n".join(lines)

    def log(self) -> None:
        level = logging.WARNING if self.skips.total or self.skips.modality_total else logging.INFO
        logger.log(level, "%s", self.summary())


# ------------------------------------------------------------------------------------------------------------------
# cells and splits


def _plain(value: Any) -> Any:
    """A JSON-safe scalar: numpy scalars unwrapped, NaN / NA / inf -> None."""
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return value


def tabular_cell(fields: Mapping[str, Any]) -> str | None:
    """``fields`` as the JSON string a ``tabular`` cell holds (missing values -> ``null``); ``None`` when every
    value is missing (the sample then lacks that modality)."""
    clean = {str(k): _plain(v) for k, v in fields.items()}
    if all(v is None for v in clean.values()):
        return None
    return json.dumps(clean, allow_nan=False, ensure_ascii=False)


def check_patient_safe(
    table: pd.DataFrame, column: str = SPLIT_COLUMN, *, patient_column: str = "patient_id", what: str = "splits"
) -> None:
    """Raise :class:`RecipeSplitError` when a patient has rows in more than one value of ``column`` (a fold or a
    split), naming up to five patients with their values."""
    if column not in table or patient_column not in table:
        return
    per = table.dropna(subset=[column]).groupby(patient_column)[column].unique()
    bad = {str(p): sorted(map(str, v)) for p, v in per.items() if len(v) > 1}
    if bad:
        shown = dict(list(bad.items())[:5])
        raise RecipeSplitError(
            f"{len(bad)} patient(s) fall in several {what} ({column!r}), e.g. {shown}: train and test would share "
            f"a patient. Fix: assign {what} per patient (check that the input file is the original, unmodified one)"
        )


# ------------------------------------------------------------------------------------------------------------------
# output


def _source_checkout_root() -> Path | None:
    here = Path(__file__).resolve()
    src = here.parents[3]  # .../src/bioperceiver/data/recipes/common.py -> .../src
    if src.name == "src" and (src.parent / "pyproject.toml").is_file():
        return src.parent
    return None


def prepare_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Resolve and create ``output_dir``; call it before any work. Refuses a folder inside the bioperceiver
    package or source checkout (data never enters the repository) and, without ``overwrite``, one that already
    holds a manifest."""
    out = Path(output_dir).expanduser().resolve()
    package_root = Path(__file__).resolve().parents[2]
    checkout = _source_checkout_root()
    inside = [r for r in (package_root, checkout) if r is not None and (out == r or r in out.parents)]
    ignored = checkout is not None and (checkout / IGNORED_OUTPUT_FOLDER) in (out, *out.parents)
    if inside and not ignored:
        raise RecipeError(
            f"refusing to write recipe output inside {inside[0]} ({out}): data never enters the repository. Fix: "
            f"write outside it, or under its git-ignored {IGNORED_OUTPUT_FOLDER}/ folder"
        )
    manifest = out / MANIFEST_NAME
    if manifest.exists() and not overwrite:
        raise FileExistsError(f"{manifest} exists; pass --overwrite_output_dir to replace it")
    out.mkdir(parents=True, exist_ok=True)
    return out


@contextlib.contextmanager
def atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success it replaces ``path``, on failure it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def reusable_output(manifest: Path, recipe: str, params: Mapping[str, Any]) -> bool:
    """``True`` when ``manifest`` and its sidecar were written by ``recipe`` with the same ``params`` and every output
    file the sidecar lists is still there (a recipe then returns the manifest instead of rebuilding it)."""
    meta_file = metadata_path(manifest)
    if not (manifest.is_file() and meta_file.is_file()):
        return False
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if meta.get("recipe") != recipe or meta.get("params") != dict(params):
        return False
    missing = [f for f in meta.get("outputs", []) if not (manifest.parent / f).is_file()]
    if missing:
        logger.info(
            "%s in %s lacks %d file(s) (e.g. %s); rebuilding", recipe, manifest.parent, len(missing), missing[0]
        )
        return False
    return True


def previous_outputs(manifest: Path, recipe: str, overwrite: bool) -> list[str]:
    """The output files an earlier build of ``recipe`` listed in its sidecar (to remove the ones a rebuild no longer
    writes, :func:`remove_stale_outputs`). A manifest written by something else is refused unless ``overwrite``."""
    meta_file = metadata_path(manifest)
    if meta_file.is_file():
        try:
            previous = json.loads(meta_file.read_text())
        except (OSError, json.JSONDecodeError):
            previous = {}
        if previous.get("recipe") == recipe:
            return list(previous.get("outputs", []))
        if not overwrite:
            raise FileExistsError(f"{manifest} was not written by {recipe}; pass overwrite=True to replace it")
    elif manifest.exists() and not overwrite:
        raise FileExistsError(f"{manifest} exists without a {recipe} sidecar; pass overwrite=True to replace it")
    return []


def remove_stale_outputs(out_dir: Path, previous: Iterable[str], current: Iterable[str]) -> None:
    """Delete the files of an earlier build that this build did not write again."""
    for rel in sorted(set(previous) - set(current)):
        stale = out_dir / rel
        if stale.is_file():
            stale.unlink()
            logger.info("removed stale file %s", stale)


def package_versions(distributions: Iterable[str] = ()) -> dict[str, str | None]:
    """Python and installed package versions (``None`` when not installed) for the sidecar."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for d in (*BASE_DISTRIBUTIONS, *distributions):
        try:
            out[d] = importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            out[d] = None
    return out


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_recipe_output(
    df: pd.DataFrame,
    output_dir: str | os.PathLike,
    *,
    name: str,
    provenance: Mapping[str, Any],
    licence_note: str,
    versions: Mapping[str, Any],
    report: RecipeReport,
    modalities: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    label_notes: Mapping[str, str] | None = None,
    params: Mapping[str, Any] | None = None,
    outputs: Sequence[str] = (),
    recipe_version: int = 1,
    extra: Mapping[str, Any] | None = None,
    check_files: bool = True,
    started: float | None = None,
) -> Path:
    """Write ``df`` as ``output_dir/manifest.parquet`` with its sidecar, validated; returns the manifest path.

    Args:
        df: one row per sample: ``sample_id``, ``patient_id``, optional ``split``, modality columns
            (``<kind>_<suffix>``), ``label_*`` and ``meta_*`` columns.
        output_dir: the folder (from :func:`prepare_output_dir`); files the cells point to are already there.
        name: the recipe's name (``"ptbxl"``); the sidecar's ``recipe`` is ``bioperceiver.data.recipes.<name>``.
        provenance: where the data came from (dataset, version, url, input folder, files read).
        licence_note: the data-use / credentialing terms a user of the manifest must know.
        versions: dataset version(s) and recipe-specific package versions; Python, bioperceiver, numpy, pandas
            and pyarrow versions are added.
        report: the counts (:meth:`RecipeReport.finish` is called with ``len(df)``).
        modalities: column -> kind for columns the naming rule does not cover, or to pin kinds; stored in the
            sidecar, where the loader and validator read it.
        labels: label column -> task name (``"multilabel"``, ``"survival"`` ...).
        label_notes: label column -> what it means.
        params: the parsed options (stored as given).
        outputs: files written beside the manifest, relative to ``output_dir``.
        recipe_version: bump when the same inputs and params give a different manifest.
        extra: more sidecar keys.
        check_files: let the validator open referenced files (header decode); keep on.
        started: ``time.perf_counter()`` at the start of the build, for ``build_seconds``.

    Raises:
        RecipeSplitError: a patient is in several splits.
        RecipeOutputError: the written manifest does not pass the validator (its summary is in the message and
            ``validation_report.json`` is written); no manifest is left in place.
    """
    from ..validate import validate_manifest

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if len(df) == 0:
        report.finish(0)
        raise RecipeOutputError(
            f"{name}: no row kept, nothing written. What was read and dropped:\n{report.summary()}\nFix: check the "
            "input folder and the recipe options (and --on_error)"
        )
    if SPLIT_COLUMN in df:
        bad = sorted({str(s) for s in df[SPLIT_COLUMN].dropna()} - set(SPLITS))
        if bad:
            raise RecipeOutputError(f"{name}: split values {bad} are not among {SPLITS}")
        check_patient_safe(df, SPLIT_COLUMN, what="splits")
    report.finish(len(df))
    split_counts = (
        {str(k): int(v) for k, v in df[SPLIT_COLUMN].value_counts(sort=False).items()} if SPLIT_COLUMN in df else {}
    )
    metadata = {
        "recipe": f"bioperceiver.data.recipes.{name}",
        "name": name,
        "recipe_version": int(recipe_version),
        "synthetic": False,
        "params": {k: _plain(v) if not isinstance(v, (list, tuple, dict)) else v for k, v in (params or {}).items()},
        "provenance": dict(provenance),
        "licence_note": licence_note,
        "versions": {**package_versions(), **dict(versions)},
        "modalities": dict(modalities or {}),
        "labels": dict(labels or {}),
        "label_notes": dict(label_notes or {}),
        "counts": report.as_dict(),
        "rows": len(df),
        "rows_per_split": split_counts,
        "outputs": sorted(outputs),
        **dict(extra or {}),
    }
    final = out / MANIFEST_NAME
    staged = out / f".incomplete-{os.getpid()}-{MANIFEST_NAME}"
    staged_meta = metadata_path(staged)
    try:
        write_manifest(df, staged, None)
        _write_json_atomic(staged_meta, metadata)
        result = validate_manifest(staged, check_files=check_files)
        if not result.ok:
            _write_json_atomic(out / VALIDATION_REPORT_NAME, result.to_dict())
            raise RecipeOutputError(
                f"{name}: the manifest built in {out} does not pass bioperceiver.data.validate (not written as "
                f"{MANIFEST_NAME}; a previous one, if any, is left as it was; full report in "
                f"{out / VALIDATION_REPORT_NAME}):\n{result.summary(20)}"
            )
        if metadata_path(final).exists():
            metadata_path(final).unlink()  # the sidecar marks a complete build: it goes in last
        os.replace(staged, final)
        if started is not None:
            metadata["build_seconds"] = round(time.perf_counter() - started, 2)
        _write_json_atomic(metadata_path(final), metadata)
    finally:
        for p in (staged, staged_meta):
            if p.exists():
                p.unlink()
    stale = out / VALIDATION_REPORT_NAME
    if stale.exists():
        stale.unlink()
    report.log()
    logger.info("%s: %d rows %s -> %s", name, len(df), split_counts, final)
    return final


__all__ = [
    "MANIFEST_NAME",
    "RecipeError",
    "RecipeInputError",
    "RecipeOutputError",
    "RecipeReport",
    "RecipeSchemaError",
    "RecipeSplitError",
    "check_patient_safe",
    "package_versions",
    "prepare_output_dir",
    "recipe_parser",
    "require_columns",
    "require_file",
    "run_recipe",
    "tabular_cell",
    "write_recipe_output",
]

if __name__ == "__main__":  # pragma: no cover - a library module, not a recipe
    sys.exit("bioperceiver.data.recipes.common is the shared base of the recipes; run a recipe module instead")
