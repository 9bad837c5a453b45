"""Offline identifier -> gene-symbol maps, so that platforms named by accessions share tokens with platforms named by
symbols.

Expression platforms name their features differently: RNA-seq and most curated tables use HGNC symbols, Rosetta /
Agilent arrays GenBank or RefSeq accessions of the sequence a reporter was designed on (``AB002301``,
``NM_004702``, ``AA555029_RC``). Two cohorts only share pretrained gene embeddings if their features become the same
token, so an accession-named cohort needs a map to symbols. Bioconductor's ``org.Hs.eg.db`` holds one (NCBI Entrez
Gene's GenBank and RefSeq accessions per gene) as an SQLite file, which Debian ships without R::

    apt-get download r-bioc-org.hs.eg.db && dpkg -x r-bioc-org.hs.eg.db_*.deb /tmp/orgdb
    # -> /tmp/orgdb/usr/lib/R/site-library/org.Hs.eg.db/extdata/org.Hs.eg.sqlite

:func:`build_accession_map` reads it with :mod:`sqlite3` and keeps the accessions asked for;
``tokenizers/build_gene_map.py`` writes the result as a small TSV (:func:`write_gene_map`) with its provenance in
``#`` lines, and :func:`read_gene_map` loads it; :meth:`GeneMap.apply` renames a samples x features matrix's
accession columns (your own CSV) to symbols. An accession that maps to more than one gene is left out (counted),
never resolved by guessing. The map is a data-preparation asset: it is decided without any outcome, like a
vocabulary.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sqlite3
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

logger = logging.getLogger(__name__)

# GenBank nucleotide (1 letter + 5 digits, 2 letters + 6 or 8 digits), RefSeq (NM_/NR_/XM_/XR_... + digits), with an
# optional version and the Rosetta reverse-complement suffix ``_RC``
_ACCESSION = re.compile(r"(?P<acc>[A-Z]{1,2}\d{5,8}|[A-Z]{2}_\d{6,9})(?:\.\d+)?(?:_RC)?", re.IGNORECASE)
DEBIAN_ORGDB = "/usr/lib/R/site-library/org.Hs.eg.db/extdata/org.Hs.eg.sqlite"
COLUMNS = ("accession", "symbol", "entrez_id")


def accession_key(name: str) -> str | None:
    """The map key of a feature name if it is shaped like a GenBank / RefSeq accession (upper case, without version
    or ``_RC``), else ``None``: ``"AA555029_RC"`` -> ``"AA555029"``, ``"nm_004702.2"`` -> ``"NM_004702"``,
    ``"Contig63649_RC"`` and ``"TP53"`` -> ``None``."""
    m = _ACCESSION.fullmatch(str(name).strip())
    return m.group("acc").upper() if m else None


def average_same_named_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """One column per name, in first-seen order: columns sharing a name (replicate probes, reporters of one gene)
    averaged per row, a missing value skipped (a row missing in all of them stays NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN groups: NaN, not a warning per row
        return frame.T.groupby(level=0, sort=False).mean().T


@dataclass
class GeneMap:
    """``accession -> symbol`` with where it came from (``source``: the file's ``#`` header lines as
    ``key: value``) and the sha256 of its sorted ``accession<TAB>symbol`` pairs (:func:`map_digest`; part of a
    manifest's parameters, so a changed map rebuilds it, while a changed comment line does not)."""

    symbols: dict[str, str]
    source: dict[str, str] = field(default_factory=dict)
    sha256: str = ""
    path: str = ""

    def __len__(self) -> int:
        return len(self.symbols)

    def symbol(self, name: str) -> str | None:
        """The symbol of an accession-shaped ``name`` (see :func:`accession_key`), or ``None``."""
        key = accession_key(name)
        return None if key is None else self.symbols.get(key)

    def apply(self, frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
        """A samples x features matrix (your own expression CSV read with pandas) with its accession-named columns
        renamed to their genes' symbols; columns that become one symbol (several reporters of one gene, or a
        reporter of a gene the matrix also names by symbol) are averaged, a missing value (NaN: not measured)
        skipped. Other columns are kept as they are. Returns the matrix and counts (``mapped``, ``accessions_kept``:
        accession-shaped but not in the map, ``averaged_into_one``: columns merged into fewer)."""
        names = [str(c) for c in frame.columns]
        renamed = [self.symbol(c) or c for c in names]
        shaped = sum(accession_key(c) is not None for c in names)
        mapped = sum(r != c for r, c in zip(renamed, names, strict=True))
        out = frame.copy()
        out.columns = renamed
        merged = len(renamed) - len(set(renamed))
        if merged:
            out = average_same_named_columns(out)
        counts = {"mapped": mapped, "accessions_kept": shaped - mapped, "averaged_into_one": merged}
        logger.info("gene map %s: %s", Path(self.path).name or "(in memory)", counts)
        return out, counts


@dataclass
class MapCounts:
    """What :func:`build_accession_map` did with the identifiers asked for."""

    asked: int = 0
    not_accessions: int = 0
    mapped: int = 0
    ambiguous: int = 0
    not_found: int = 0
    ambiguous_examples: list[str] = field(default_factory=list)


def map_digest(symbols: Mapping[str, str]) -> str:
    """sha256 of the sorted ``accession<TAB>symbol`` lines: the identity of a map's content."""
    text = "".join(f"{k}\t{v}\n" for k, v in sorted(symbols.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def orgdb_metadata(db: str | os.PathLike) -> dict[str, str]:
    """The ``metadata`` table of an ``org.*.eg.db`` SQLite file (source dates, organism), plus the package version
    from the ``DESCRIPTION`` file beside ``extdata/`` when present."""
    con = sqlite3.connect(f"file:{Path(db).resolve()}?mode=ro", uri=True)
    try:
        meta = {str(k): str(v) for k, v in con.execute("SELECT name, value FROM metadata")}
    finally:
        con.close()
    desc = Path(db).resolve().parent.parent / "DESCRIPTION"
    if desc.is_file():
        for line in desc.read_text(errors="replace").splitlines():
            if line.startswith(("Package:", "Version:")):
                key, _, value = line.partition(":")
                meta[f"package_{key.lower()}"] = value.strip()
    return meta


def build_accession_map(
    db: str | os.PathLike, identifiers: Iterable[str], *, examples: int = 10
) -> tuple[dict[str, tuple[str, str]], MapCounts]:
    """``accession -> (symbol, entrez_id)`` for the accession-shaped ``identifiers``, read from an ``org.*.eg.db``
    SQLite file (its ``accessions`` = GenBank and ``refseq`` tables joined to ``gene_info``); versions and ``_RC``
    are dropped before matching. Accessions of more than one gene are left out and counted."""
    if not Path(db).is_file():
        raise FileNotFoundError(
            f"no org.eg.db SQLite file at {db}. Fix: apt-get download r-bioc-org.hs.eg.db && dpkg -x "
            f"r-bioc-org.hs.eg.db_*.deb DIR, then pass DIR{DEBIAN_ORGDB}"
        )
    counts = MapCounts()
    wanted: set[str] = set()
    for name in dict.fromkeys(str(i) for i in identifiers):
        counts.asked += 1
        key = accession_key(name)
        if key is None:
            counts.not_accessions += 1
        else:
            wanted.add(key)
    genes: dict[str, set[tuple[str, str]]] = {k: set() for k in wanted}
    con = sqlite3.connect(f"file:{Path(db).resolve()}?mode=ro", uri=True)
    try:
        for table in ("accessions", "refseq"):
            query = (
                f"SELECT a.accession, i.symbol, g.gene_id FROM {table} a "
                "JOIN gene_info i ON a._id = i._id JOIN genes g ON a._id = g._id"
            )
            for acc, symbol, gene_id in con.execute(query):
                key = accession_key(acc)
                if key in genes:
                    genes[key].add((str(symbol), str(gene_id)))
    finally:
        con.close()
    out: dict[str, tuple[str, str]] = {}
    for key in sorted(genes):
        hits = genes[key]
        if len(hits) == 1:
            out[key] = next(iter(hits))
        elif hits:
            counts.ambiguous += 1
            if len(counts.ambiguous_examples) < examples:
                counts.ambiguous_examples.append(f"{key} -> {', '.join(sorted(s for s, _ in hits))}")
        else:
            counts.not_found += 1
    counts.mapped = len(out)
    return out, counts


def write_gene_map(
    path: str | os.PathLike, mapping: Mapping[str, tuple[str, str]], header: Mapping[str, object]
) -> Path:
    """Write ``accession<TAB>symbol<TAB>entrez_id`` rows (sorted) under ``# key: value`` provenance lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {k}: {str(v).replace(chr(10), ' ')}" for k, v in header.items()]
    lines.append("\t".join(COLUMNS))
    lines += [f"{acc}\t{sym}\t{gid}" for acc, (sym, gid) in sorted(mapping.items())]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def read_gene_map(path: str | os.PathLike) -> GeneMap:
    """Load a map :func:`write_gene_map` wrote (or any TSV with ``accession`` and ``symbol`` columns)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"gene map {path} not found. Fix: build it with tokenizers/build_gene_map.py")
    source: dict[str, str] = {}
    symbols: dict[str, str] = {}
    columns: list[str] | None = None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if line.startswith("#"):
            key, _, value = line[1:].partition(":")
            source[key.strip()] = value.strip()
            continue
        cells = line.split("\t")
        if columns is None:
            columns = [c.strip().lower() for c in cells]
            if "accession" not in columns or "symbol" not in columns:
                raise ValueError(f"{path}: the header line must name 'accession' and 'symbol' columns, got {cells}")
            continue
        row = dict(zip(columns, cells, strict=False))
        key = accession_key(row.get("accession", ""))
        symbol = row.get("symbol", "").strip()
        if key is None or not symbol:
            raise ValueError(f"{path}:{n}: not an accession and a symbol: {line!r}")
        if symbols.get(key, symbol) != symbol:
            raise ValueError(f"{path}:{n}: {key} is mapped twice ({symbols[key]}, {symbol}); a map must be a function")
        symbols[key] = symbol
    if columns is None:
        raise ValueError(f"{path}: empty gene map")
    return GeneMap(symbols, source, map_digest(symbols), str(path))
