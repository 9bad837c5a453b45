"""Gene features from curated annotation: one fixed vector per gene, so that a gene token carries what is known about
the gene's function, not only a learned row of its own.

An omics token's identity is a learned embedding row per gene. Pretraining trains only the rows of genes that become
tokens (with ``top_k`` on 1,446 development profiles, about 39% of them), and a gene added for a new platform starts
from a random row. Gene features give every gene a second part of its identity through one shared map,
``gene_embeddings[id] + W @ features[id]`` (``OmicsConfig.gene_feature_dim``): ``W`` is trained by every gene token,
so a gene that was never a token, or that a new cohort brings, still lands near the genes of similar function.
This is the "prior knowledge gene embedding" of Gene2vec / GenePT-style models, built here from what can be reached
offline: Bioconductor's ``org.Hs.eg.db`` (Gene Ontology annotations and KEGG pathways per Entrez gene, an SQLite
file that Debian ships without R; see :mod:`.gene_map`).

:func:`build_gene_features` turns the gene x term incidence (GO biological process, molecular function, cellular
component, KEGG) into TF-IDF weights and their truncated SVD (latent semantic analysis): ``dim`` numbers per gene,
its TF-IDF row projected on the leading components (length at most 1: the share of its annotation those components
hold). Genes sharing terms get nearby vectors; a gene without any annotation has none and gets a zero vector (it keeps
only its learned row). :class:`GeneFeatures` holds the table with the official symbols and
their unambiguous aliases (older symbols that arrays of the 2000s use), and saves to one ``safetensors`` file, which
the omics processor copies into its own folder (``OmicsSettings.gene_features``), so a saved model needs nothing
else. Nothing here reads an outcome: the features are decided like a vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

# org.Hs.eg.db table -> its term column (each row: an Entrez gene's internal ``_id`` and one term)
ANNOTATION_TABLES = {"go_bp": "go_id", "go_mf": "go_id", "go_cc": "go_id", "kegg": "path_id"}
FILE_FORMAT = "bioperceiver-gene-features/1"
META_KEY = "bioperceiver_gene_features"
FLOAT16_MAX = 65504.0  # the file stores float16


@dataclass
class GeneFeatures:
    """A fixed feature vector per gene symbol.

    Args:
        symbols: official gene symbols, upper case, one per row of ``matrix``.
        matrix: ``(len(symbols), dim)`` float32, each row of length at most 1.
        aliases: other names (upper case) -> official symbol, only aliases that name one gene and are not another
            gene's official symbol.
        source: where the table came from (database, version, tables, settings), kept in the file and model cards.
    """

    symbols: list[str]
    matrix: np.ndarray
    aliases: dict[str, str] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.matrix = np.asarray(self.matrix, dtype=np.float32)
        if self.matrix.ndim != 2 or self.matrix.shape[0] != len(self.symbols):
            raise ValueError(f"matrix {self.matrix.shape} must be (len(symbols)={len(self.symbols)}, dim)")
        # names are matched upper case (row_of); a table built elsewhere may hold mixed case
        self.symbols = [str(s).strip().upper() for s in self.symbols]
        self.aliases = {str(a).strip().upper(): str(s).strip().upper() for a, s in self.aliases.items()}
        dupes = sorted(s for s, n in Counter(self.symbols).items() if n > 1)
        if dupes:
            raise ValueError(
                f"gene feature table: {len(dupes)} symbol(s) appear more than once (case ignored), e.g. {dupes[:5]}; "
                "keep one row per gene"
            )
        bad = ~np.isfinite(self.matrix).all(axis=1) | (np.abs(self.matrix) > FLOAT16_MAX).any(axis=1)
        if bad.any():
            rows = [self.symbols[i] for i in np.flatnonzero(bad)[:5]]
            raise ValueError(
                f"gene feature table: {int(bad.sum())} row(s) hold NaN, inf or values beyond float16's range "
                f"(|x| > {FLOAT16_MAX:g}, which the saved float16 file cannot hold), e.g. {rows}; the features are "
                "meant to be within [-1, 1] (build_gene_features.py's are)"
            )
        self._row = {s: i for i, s in enumerate(self.symbols)}

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def __len__(self) -> int:
        return len(self.symbols)

    def row_of(self, name: str) -> int | None:
        """The row of a gene name (official symbol or unambiguous alias, any case), else ``None``."""
        key = str(name).strip().upper()
        row = self._row.get(key)
        if row is None and key in self.aliases:
            row = self._row.get(self.aliases[key])
        return row

    def rows(self, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(len(names), dim)`` float32 features (zeros where a name has none) and the boolean ``found`` mask."""
        idx = np.array([-1 if (r := self.row_of(n)) is None else r for n in names], dtype=np.int64)
        found = idx >= 0
        out = np.zeros((len(names), self.dim), dtype=np.float32)
        out[found] = self.matrix[idx[found]]
        return out, found

    @property
    def sha256(self) -> str:
        """Digest of the symbols, aliases and the float16 table as saved (not of the ``source`` notes)."""
        h = hashlib.sha256()
        h.update(json.dumps([self.symbols, sorted(self.aliases.items())]).encode())
        h.update(np.ascontiguousarray(self.matrix.astype(np.float16)).tobytes())
        return h.hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """One ``safetensors`` file: the table as float16 (entries within [-1, 1]; float16 keeps 3 digits) and
        the names and provenance as metadata. Written to a temporary name first, then renamed."""
        import torch
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # one metadata entry: safetensors writes several in hash order, which would make the bytes (and so a saved
        # processor's fingerprint, which shards and caches check) differ from process to process
        meta = {
            META_KEY: json.dumps(
                {"format": FILE_FORMAT, "symbols": self.symbols, "aliases": self.aliases, "source": self.source},
                sort_keys=True,
            )
        }
        tmp = path.with_name(path.name + ".tmp")
        save_file({"features": torch.from_numpy(self.matrix.astype(np.float16))}, str(tmp), metadata=meta)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # safetensors creates the file private (0600): readable like any other output
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> GeneFeatures:
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"no gene feature file at {path}. Fix: build one with tokenizers/build_gene_features.py (from "
                "Bioconductor's org.Hs.eg.db), or use the one shipped in tokenizers/gene_features/"
            )
        fix = (
            "Fix: rebuild it with tokenizers/build_gene_features.py, or copy it again from where it was built (a "
            "saved processor folder holds its own copy)"
        )
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                if META_KEY in meta:
                    fields = json.loads(meta[META_KEY])
                else:  # one entry per field, each a JSON string: the first files' layout (before 2026-12-06 13:10)
                    fields = {k: v if k == "format" else json.loads(v) for k, v in meta.items()}
                if fields.get("format") != FILE_FORMAT:
                    fmt = fields.get("format")
                    raise ValueError(f"{path} is not a gene feature file (format {fmt!r}, not {FILE_FORMAT}). {fix}")
                matrix = f.get_tensor("features").astype(np.float32)
            return cls(fields["symbols"], matrix, fields.get("aliases", {}), fields.get("source", {}))
        except ValueError as exc:
            if str(path) in str(exc):
                raise
            raise ValueError(f"gene feature file {path}: {exc}. {fix}") from exc
        except Exception as exc:  # a truncated or foreign file: safetensors' own error does not name the path
            raise ValueError(f"gene feature file {path} cannot be read ({type(exc).__name__}: {exc}). {fix}") from exc


def _annotations(con: sqlite3.Connection, tables: Iterable[str]) -> dict[int, set[str]]:
    terms: dict[int, set[str]] = defaultdict(set)
    for table in tables:
        if table not in ANNOTATION_TABLES:
            raise ValueError(f"unknown annotation table {table!r}; choose from {sorted(ANNOTATION_TABLES)}")
        col = ANNOTATION_TABLES[table]
        for gid, term in con.execute(f"SELECT _id, {col} FROM {table}"):  # table and column from ANNOTATION_TABLES
            terms[gid].add(f"{table}:{term}")
    return terms


def _package_version(orgdb: Path) -> str:
    """``Version:`` of the R package's DESCRIPTION two folders above ``extdata/org.Hs.eg.sqlite`` (``?``: none)."""
    desc = orgdb.parent.parent / "DESCRIPTION"
    if desc.exists():
        for line in desc.read_text(errors="replace").splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    return "?"


def build_gene_features(
    orgdb: str | os.PathLike,
    dim: int = 64,
    tables: Sequence[str] = tuple(ANNOTATION_TABLES),
    min_genes_per_term: int = 2,
    seed: int = 0,
) -> GeneFeatures:
    """Gene features from an ``org.Hs.eg.db`` SQLite file: latent semantic analysis of the gene x term table.

    Terms are the GO / KEGG ids of ``tables`` (direct annotations, every evidence code); a term held by fewer than
    ``min_genes_per_term`` genes says nothing about similarity and is dropped. The binary gene x term matrix is
    TF-IDF weighted (scikit-learn's ``TfidfTransformer``: rare terms weigh more, each gene's row unit length), reduced
    to ``dim`` components by ``TruncatedSVD`` (randomised, ``seed``): a gene's features are its unit-length TF-IDF row
    projected on them, so their length (at most 1) says how much of its annotation the components hold. They are not
    scaled back to unit length: for a gene the components barely hold (about 1% of human genes hold less than 0.08 of
    their annotation in 64 components), that would blow a near-zero projection up into a confident direction.
    Genes without a kept term get no row. Deterministic for a given file and settings."""
    from scipy import sparse
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfTransformer

    orgdb = Path(orgdb)
    if not orgdb.exists():
        from .gene_map import DEBIAN_ORGDB

        raise FileNotFoundError(
            f"no org.eg.db SQLite file at {orgdb}. Fix: apt-get download r-bioc-org.hs.eg.db && dpkg -x "
            f"r-bioc-org.hs.eg.db_*.deb DIR, then pass DIR{DEBIAN_ORGDB}"
        )
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    con = sqlite3.connect(f"file:{orgdb}?mode=ro", uri=True)
    try:
        symbol_of = {gid: str(sym).upper() for gid, sym in con.execute("SELECT _id, symbol FROM gene_info")}
        terms = _annotations(con, tables)
        alias_rows = con.execute("SELECT alias_symbol, _id FROM alias").fetchall()
        meta = dict(con.execute("SELECT name, value FROM metadata").fetchall())
    finally:
        con.close()
    held: dict[str, int] = defaultdict(int)
    for ts in terms.values():
        for t in ts:
            held[t] += 1
    kept_terms = sorted(t for t, n in held.items() if n >= min_genes_per_term)
    col = {t: j for j, t in enumerate(kept_terms)}
    genes = sorted(gid for gid, ts in terms.items() if gid in symbol_of and any(t in col for t in ts))
    # one row per official symbol (two Entrez ids never share one in org.Hs.eg.db; if they did, the first is kept)
    seen: set[str] = set()
    genes = [g for g in genes if not (symbol_of[g] in seen or seen.add(symbol_of[g]))]
    if len(genes) <= dim or len(kept_terms) <= dim:
        raise ValueError(f"{len(genes)} annotated genes and {len(kept_terms)} terms: too few for {dim} components")
    rows, cols = [], []
    for i, g in enumerate(genes):
        js = sorted(col[t] for t in terms[g] if t in col)
        rows += [i] * len(js)
        cols += js
    incidence = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(genes), len(kept_terms)))
    weighted = TfidfTransformer().fit_transform(incidence)
    svd = TruncatedSVD(n_components=dim, algorithm="randomized", n_iter=10, random_state=seed)
    z = svd.fit_transform(weighted)
    symbols = [symbol_of[g] for g in genes]
    official = set(symbol_of.values())
    gene_of_alias: dict[str, set[str]] = defaultdict(set)
    for alias, gid in alias_rows:
        if gid in symbol_of:
            gene_of_alias[str(alias).upper()].add(symbol_of[gid])
    with_row = set(symbols)
    aliases = {
        a: next(iter(s))
        for a, s in gene_of_alias.items()
        if len(s) == 1 and a not in official and next(iter(s)) in with_row
    }
    source = {
        "database": f"org.Hs.eg.db {_package_version(orgdb)} (Bioconductor; Debian r-bioc-org.hs.eg.db)",
        "entrez_gene": str(meta.get("EGSOURCEDATE", "?")),
        "go": str(meta.get("GOSOURCEDATE", "?")),
        "kegg": str(meta.get("KEGGSOURCEDATE", "?")),
        "tables": ",".join(tables),
        "min_genes_per_term": str(min_genes_per_term),
        "method": "TF-IDF of the gene x term incidence (rows unit length), projected by "
        f"TruncatedSVD({dim}, seed {seed})",
        "explained_variance": f"{float(svd.explained_variance_ratio_.sum()):.3f}",
        "genes": str(len(symbols)),
        "terms": str(len(kept_terms)),
        "licence": "org.Hs.eg.db is Artistic-2.0; NCBI Entrez Gene data are public domain; GO is CC BY 4.0; "
        "KEGG data as distributed in org.Hs.eg.db (KEGG's own terms apply to redistribution)",
    }
    logger.info(
        "gene features: %d genes x %d dims from %d terms (%s), SVD explains %.1f%% of the TF-IDF variance; %d aliases",
        len(symbols),
        dim,
        len(kept_terms),
        ",".join(tables),
        100 * float(svd.explained_variance_ratio_.sum()),
        len(aliases),
    )
    return GeneFeatures(symbols, z.astype(np.float32), aliases, source)
