"""Manifests: one row per sample, one column per modality.

A manifest is a Parquet, CSV or JSONL table with

* ``sample_id`` (unique) and ``patient_id`` (splits and contrastive positives are per patient);
* optional ``split`` (``train`` / ``validation`` / ``test``); when absent,
  :func:`bioperceiver.data.splits.assign_splits` derives one from a salted hash of ``patient_id``;
* one column per modality, named after its kind, alone or with a suffix: ``text``, ``text_note``, ``image_cxr``,
  ``image_ct``, ``omics``, ``signal_ecg``, ``tabular_labs`` ... A null cell means the sample lacks that modality.
  An explicit ``modalities={column: kind}`` mapping (argument or manifest metadata) overrides the naming rule;
* label columns ``label_<name>`` and free metadata columns ``meta_<name>`` (never fed to the model).

Cell values per built-in kind (relative paths are resolved against the manifest's folder; each kind's
``ModalitySpec.cell_forms`` says which forms it takes and ``ModalitySpec.check_cell`` checks them):

=========  =====================================================================================================
kind       cell
=========  =====================================================================================================
text       the note itself (a string)
image      path to a file (``.dcm``, ``.nii``/``.nii.gz``, ``.png``/``.jpg``/``.tif``, ``.npy``) or a folder holding one
           DICOM series
omics      a ``{gene: value}`` mapping (or its JSON string), or a path to an expression file: ``gene,value`` rows
           (``.csv``/``.tsv``/``.json``/``.parquet``) or a samples x genes matrix with ``#row=<id>`` selecting a row
signal     path to ``.npy`` (channels x time, with a ``<file>.json`` sidecar ``{"channels": [...],
           "sampling_rate": Hz}``),
           ``.npz`` (``values``, ``channels``, ``sampling_rate`` or ``timestamps``), ``.csv`` (optional ``time`` column
           in seconds, one column per channel) or ``.edf``; ``#start=S&duration=S`` selects a window in seconds
tabular    a ``{feature: value}`` mapping (or its JSON string); numbers are numeric features, strings categorical,
           null/NaN means "not measured" and produces no token
=========  =====================================================================================================

Metadata (recipe, provenance, licences, pinned package versions, synthetic flag, label tasks) lives in a sidecar
``<manifest>.meta.json`` written by :func:`write_manifest`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pandas as pd

logger = logging.getLogger(__name__)

ID_COLUMNS = ("sample_id", "patient_id")
SPLIT_COLUMN = "split"
SPLITS = ("train", "validation", "test")
LABEL_PREFIX = "label_"
META_PREFIX = "meta_"
MANIFEST_SUFFIXES = (".parquet", ".csv", ".jsonl", ".json")


def _known_kinds() -> list[str]:
    from ..modalities import available_modalities

    return available_modalities()


def kind_of_column(column: str, kinds: Iterable[str] | None = None) -> str | None:
    """The modality kind a column name denotes by the naming rule (``image_ct`` -> ``image``), else ``None``."""
    kinds = list(kinds) if kinds is not None else _known_kinds()
    for kind in sorted(kinds, key=len, reverse=True):
        if column == kind or column.startswith(kind + "_"):
            return kind
    return None


def is_missing(value: Any) -> bool:
    """True for a cell that means "modality absent": None, NaN, pandas NA."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    try:
        return (
            bool(pd.isna(value))
            if not isinstance(value, (list, dict, tuple)) and pd.api.types.is_scalar(value)
            else False
        )
    except (TypeError, ValueError):
        return False


@dataclass
class Reference:
    """A path cell split into the file and its ``#key=value&...`` fragment options."""

    path: Path
    options: dict[str, str] = field(default_factory=dict)


def parse_reference(cell: str, base_dir: str | os.PathLike | None = None) -> Reference:
    """``"signals/rec.npz#start=10&duration=30"`` -> the path (resolved against ``base_dir``) and its options."""
    text = str(cell)
    path_part, _, fragment = text.partition("#")
    path = Path(path_part).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return Reference(path, dict(parse_qsl(fragment, keep_blank_values=True)) if fragment else {})


def as_mapping(value: Any) -> dict | None:
    """An inline mapping cell as a dict: dicts pass through (Parquet structs/maps included), JSON strings are
    parsed, lists of ``(key, value)`` pairs (Arrow maps) are converted; anything else returns ``None``."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, list) and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in value):
        return {k: v for k, v in value}
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return None
        return parsed if isinstance(parsed, dict) else None
    return None


@dataclass
class Manifest:
    """A loaded manifest: the table, the modality columns with their kinds, label columns and metadata."""

    table: pd.DataFrame
    modalities: dict[str, str]
    label_columns: list[str]
    metadata: dict[str, Any]
    base_dir: Path
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.table)

    def subset(self, rows) -> Manifest:
        return Manifest(
            self.table.loc[rows].reset_index(drop=True),
            dict(self.modalities),
            list(self.label_columns),
            dict(self.metadata),
            self.base_dir,
            self.path,
        )

    def split(self, name: str) -> Manifest:
        if SPLIT_COLUMN not in self.table:
            raise ValueError(
                f"manifest has no {SPLIT_COLUMN!r} column; call bioperceiver.data.assign_splits(manifest) first"
            )
        return self.subset(self.table[SPLIT_COLUMN] == name)

    def fingerprint(self) -> str:
        """A SHA-256 of the rows (every cell, in order) and of the folder relative file paths resolve against: two
        manifests with one different cell, row or base folder differ (the files the rows point to are not read)."""
        import hashlib

        digest = hashlib.sha256(self.table.to_json(orient="split", default_handler=str).encode())
        digest.update(str(Path(self.base_dir).resolve()).encode())
        return digest.hexdigest()

    def records(self) -> list[dict[str, Any]]:
        """Rows as dicts with missing cells normalised to ``None``."""
        cols = list(self.table.columns)
        out = []
        for row in self.table.itertuples(index=False, name=None):
            out.append({c: (None if is_missing(v) else v) for c, v in zip(cols, row)})
        return out


def metadata_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".meta.json")


def _read_table(path: Path) -> pd.DataFrame:
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".gz") else path.suffix
    if path.suffix == ".parquet":
        table = pd.read_parquet(path)
    elif path.suffix in (".jsonl", ".json") or suffix in (".jsonl.gz",):
        table = pd.read_json(path, lines=True, dtype=False)
    elif path.suffix in (".csv", ".tsv") or suffix in (".csv.gz", ".tsv.gz"):
        sep = "\t" if ".tsv" in path.name else ","
        table = pd.read_csv(path, sep=sep, dtype={"sample_id": str, "patient_id": str}, keep_default_na=True)
    else:
        raise ValueError(f"manifest {path}: unsupported format {path.suffix!r}; use one of {MANIFEST_SUFFIXES}")
    return pack_wide_columns(table)


WIDE_KINDS = ("tabular", "omics")
"""Kinds whose cell is a ``{feature: value}`` mapping, which a flat table may give one column per feature."""

FLAT_COLUMNS_FIX = (
    "one feature per column: name the columns '<kind>_<group>.<feature>' (tabular_<group>.<feature>, e.g. "
    "tabular_clinical.age, or omics_<group>.<gene>): they are packed into one modality per group"
)


def pack_wide_columns(table: pd.DataFrame) -> pd.DataFrame:
    """A flat table's feature columns ``<kind>_<group>.<feature>`` (kind ``tabular`` or ``omics``: e.g.
    ``tabular_clinical.age``, ``tabular_clinical.er``, ``omics_expression.TP53``) packed into one modality column
    per group (``tabular_clinical``) whose cells are ``{feature: value}`` (JSON), in the order of the columns.
    A missing cell is left out of its row's mapping (an absent feature, never a zero); a row missing all of a
    group's features has no value for the modality. The feature name is what follows the first dot (gene ids may
    hold dots). Other columns are returned unchanged."""
    groups: dict[str, list[str]] = {}
    for col in table.columns:
        head, dot, _ = str(col).partition(".")
        if dot and kind_of_column(head, WIDE_KINDS) is not None:
            groups.setdefault(head, []).append(col)
    if not groups:
        return table
    both = sorted(g for g in groups if g in table.columns)
    if both:
        raise ValueError(
            f"manifest column(s) {both} are given both as one column and as per-feature columns "
            f"({', '.join(groups[both[0]][:3])}...): keep one form"
        )

    def plain(v: Any) -> Any:
        return v.item() if hasattr(v, "item") else v

    packed = {}
    for group, cols in groups.items():
        names = [str(c).partition(".")[2] for c in cols]
        cells = []
        for row in table[cols].itertuples(index=False, name=None):
            values = {n: plain(v) for n, v in zip(names, row, strict=True) if not is_missing(v) and v != ""}
            cells.append(json.dumps(values) if values else None)
        packed[group] = cells
    flat = [c for cols in groups.values() for c in cols]
    logger.info("packed per-feature columns into %s", ", ".join(f"{g} ({len(c)} features)" for g, c in groups.items()))
    return pd.concat([table.drop(columns=flat), pd.DataFrame(packed, index=table.index)], axis=1)


def resolve_modalities(
    columns: Iterable[str], modalities: Mapping[str, str] | None = None, kinds: Iterable[str] | None = None
) -> tuple[dict[str, str], list[str]]:
    """Modality columns (explicit mapping first, then the naming rule) and the columns no rule explains."""
    kinds = list(kinds) if kinds is not None else _known_kinds()
    explicit = dict(modalities or {})
    out, unknown = {}, []
    for col in columns:
        if col in ID_COLUMNS or col == SPLIT_COLUMN or col.startswith((LABEL_PREFIX, META_PREFIX)):
            continue
        kind = explicit.get(col) or kind_of_column(col, kinds)
        if kind is None:
            unknown.append(col)
        else:
            out[col] = kind
    return out, unknown


def read_manifest(
    path: str | os.PathLike | pd.DataFrame,
    *,
    modalities: Mapping[str, str] | None = None,
    base_dir: str | os.PathLike | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Manifest:
    """Load a manifest (Parquet/CSV/JSONL path or a DataFrame) without validating cells.

    ``modalities`` maps column -> kind for columns whose names do not follow the naming rule (it is merged with
    the sidecar metadata's ``modalities``). Columns that are neither ids, split, labels, meta nor modalities are
    an error (run :func:`validate_manifest` to see every problem at once).
    """
    if isinstance(path, pd.DataFrame):
        table, src = pack_wide_columns(path.copy()), None
        base = Path(base_dir) if base_dir is not None else Path.cwd()
        meta = dict(metadata or {})
    else:
        src = Path(path)
        if not src.exists():
            raise FileNotFoundError(f"manifest {src} does not exist")
        table = _read_table(src)
        base = Path(base_dir) if base_dir is not None else src.resolve().parent
        meta = {}
        mpath = metadata_path(src)
        if mpath.exists():
            meta = json.loads(mpath.read_text())
        meta.update(metadata or {})
    for col in ID_COLUMNS:
        if col in table:
            table[col] = table[col].map(lambda v: None if is_missing(v) else str(v))
    explicit = {**meta.get("modalities", {}), **dict(modalities or {})}
    mods, unknown = resolve_modalities(table.columns, explicit)
    if unknown:
        raise ValueError(
            f"manifest {src or '<DataFrame>'}: column(s) {unknown} are not a known modality, label or meta column. "
            f"Fix: rename them to '<kind>_<name>' (kinds: {_known_kinds()}), 'label_<name>' or 'meta_<name>', "
            f"or pass modalities={{column: kind}}; for {FLAT_COLUMNS_FIX}."
        )
    labels = [c for c in table.columns if c.startswith(LABEL_PREFIX)]
    return Manifest(table, mods, labels, meta, base, src)


def write_manifest(table: pd.DataFrame, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``table`` (Parquet/CSV/JSONL by suffix) and its ``.meta.json`` sidecar; returns the manifest path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".parquet":
        table.to_parquet(tmp, index=False)
    elif path.suffix == ".csv":
        table.to_csv(tmp, index=False)
    elif path.suffix in (".jsonl", ".json"):
        table.to_json(tmp, orient="records", lines=True, force_ascii=False)
    else:
        raise ValueError(f"unsupported manifest format {path.suffix!r}; use one of {MANIFEST_SUFFIXES}")
    os.replace(tmp, path)
    if metadata is not None:
        metadata_path(path).write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str) + "\n")
    return path
