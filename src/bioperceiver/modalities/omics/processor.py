"""Omics processor: a gene vocabulary fitted from data, expression normalisation, top-k selection, and principal
components of the profile as extra tokens."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..processor import ModalityProcessor
from .gene_features import GeneFeatures

logger = logging.getLogger(__name__)

NORMALIZATIONS = ("log1p", "cpm_log1p", "none")
ZSCORES = (False, True, "per_source")
TOP_K_BY = ("value", "variance", "deviation")


@dataclass
class OmicsSettings:
    """Settings of the omics processor.

    Args:
        normalization: ``"log1p"`` (counts), ``"cpm_log1p"`` (scale each sample to 1e6 then log1p; TPM-like) or
            ``"none"`` (values already normalised, e.g. log2 microarray intensities).
        zscore: standardise each gene with mean/std fitted on the training split (after ``normalization``):
            ``True`` pools all training samples; ``"per_source"`` fits them per source matrix file (the cohort: a
            ``matrix.parquet#row=<id>`` cell's source is the file name, ``matrix.parquet``), on that source's training
            rows only, to remove batch effects between cohorts and platforms. A gene a source does not measure keeps
            the pooled statistics, and so do cells without a source (inline mappings, one-sample files). A source not
            seen in fitting is an error naming it at call time: fit it with :meth:`OmicsProcessor.extend` on that
            cohort's training rows (``run_finetune`` does this), or use ``zscore: true``.
        top_k: keep only ``top_k`` genes per sample (``None``: all), chosen by ``top_k_by``; ``0``: no gene token
            at all, only the ``pcs`` tokens (needs ``pcs``).
        top_k_by: ``"value"`` (default): each sample's ``top_k`` highest normalised values, its most expressed
            genes (single-cell practice, e.g. Geneformer's rank-value tokens; for bulk microarrays mostly the same
            abundant genes in every profile, and under-expression never becomes a token). ``"variance"``: a fixed
            panel, the ``top_k`` genes with the largest training-set standard deviation among those the sample
            measures (its source's statistics with ``zscore: per_source``, so each cohort keeps its own most
            variable genes), as bulk expression models select genes before PCA or Cox; needs ``zscore``.
            ``"deviation"``: each sample's ``top_k`` genes with the largest absolute z-score (its source's
            statistics with ``zscore: per_source``), where this profile departs most from its cohort, over- or
            under-expressed. Unlike ``value``, which gives mostly the same abundant genes in every profile, any
            measured gene can become a token, so pretraining reaches (and trains) far more of the vocabulary;
            needs ``zscore``. Ties by gene id.
        pcs: also emit the profile's first ``pcs`` principal components as tokens ``<PC1>`` ... ``<PCk>`` (vocabulary
            entries after the genes, values = component scores scaled to unit SD on the training rows), the dense
            summary of all genes bulk-expression Cox models read (a linear term, ``head_linear_modalities``, then
            has one coefficient per component). The PCA is fitted on the training rows' z-scored values of the
            ``pcs_genes`` genes with the largest training SD, per source with ``zscore: per_source`` (a component is
            a cohort's own axis; a cell without a source, and a source without a fit, use the pooled fit); a gene
            the profile does not measure counts as the training mean. Computed from every measured gene before
            ``top_k``; needs ``zscore``. A source added by :meth:`OmicsProcessor.extend` gets its PCA from the
            rows it is extended on. Not available with federated fitting (it needs the training profiles).
        pcs_genes: how many of the most variable genes the PCA reads.
        drop_zeros: a zero value produces no token (sparse counts); ``False`` keeps zeros as tokens.
        case: gene names are normalised to ``"upper"`` or ``"lower"`` case (``None``: unchanged).
        min_samples: a gene enters the vocabulary when measured in at least this many training samples.
        max_genes: cap on the vocabulary (most frequently measured genes first; ties by name).
        oov: ``"count"`` (unknown genes produce no token and are counted in ``report()``) or ``"error"``.
        gene_features_file: a gene feature file (:class:`~.gene_features.GeneFeatures`, built by
            ``tokenizers/build_gene_features.py`` from GO / KEGG annotation): every token then also carries its
            gene's fixed feature vector (``gene_features``, zeros for a gene the file does not know), which the
            embedder maps into the token with one learned matrix (``OmicsConfig.gene_feature_dim``), so genes that
            pretraining never made tokens, or that a new cohort adds, share what similar genes learned. The table is
            copied into the saved processor (``gene_features.safetensors``): a saved model does not need the file.
            A relative path in a settings YAML resolves against the YAML's folder.
    """

    normalization: str = "log1p"
    zscore: bool | str = False
    top_k: int | None = None
    top_k_by: str = "value"
    pcs: int | None = None
    pcs_genes: int = 1000
    drop_zeros: bool = True
    case: str | None = "upper"
    min_samples: int = 1
    max_genes: int | None = None
    oov: str = "count"
    gene_features_file: str | None = None

    def __post_init__(self):
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.oov not in ("count", "error"):
            raise ValueError(f"oov must be 'count' or 'error', got {self.oov!r}")
        if self.case not in (None, "upper", "lower"):
            raise ValueError(f"case must be 'upper', 'lower' or None, got {self.case!r}")
        if self.zscore not in ZSCORES:
            raise ValueError(f"zscore must be one of {ZSCORES}, got {self.zscore!r}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 or None, got {self.top_k}")
        if self.top_k == 0 and not self.pcs:
            raise ValueError("top_k: 0 keeps no gene token; it needs pcs (the principal-component tokens) to emit any")
        if self.pcs is not None and self.pcs < 1:
            raise ValueError(f"pcs must be >= 1 or None, got {self.pcs}")
        if self.pcs_genes < 1:
            raise ValueError(f"pcs_genes must be >= 1, got {self.pcs_genes}")
        if self.pcs and self.pcs > self.pcs_genes:
            raise ValueError(
                f"pcs ({self.pcs}) cannot exceed pcs_genes ({self.pcs_genes}): a PCA of {self.pcs_genes} genes has at "
                f"most {self.pcs_genes} components"
            )
        if self.pcs and not self.zscore:
            raise ValueError(
                "pcs are fitted on z-scored profiles (each gene standardised on the training rows): set zscore: true "
                "(or per_source)"
            )
        if self.top_k_by not in TOP_K_BY:
            raise ValueError(f"top_k_by must be one of {TOP_K_BY}, got {self.top_k_by!r}")
        if self.top_k_by in ("variance", "deviation") and not self.zscore:
            ranks = "their training standard deviation" if self.top_k_by == "variance" else "each sample's z-scores"
            raise ValueError(
                f"top_k_by: {self.top_k_by} ranks genes by {ranks}, which needs the z-score's training statistics: "
                "set zscore: true (or per_source)"
            )


@functools.lru_cache(maxsize=8)
def _read_expression_table(path: str, mtime: float) -> pd.DataFrame:
    p = Path(path)
    if p.suffix == ".parquet":
        return pd.read_parquet(p)
    if p.suffix == ".json":
        return pd.DataFrame([json.loads(p.read_text())])
    sep = "\t" if p.suffix in (".tsv", ".txt") else ","
    return pd.read_csv(p, sep=sep)


@dataclass
class _Matrix:
    """A numeric samples x genes table held as one float array (rows looked up by id)."""

    key: str
    genes: list[str]
    values: np.ndarray
    rows: dict[str, int]


@functools.lru_cache(maxsize=8)
def _read_matrix(path: str, mtime: float) -> _Matrix | None:
    table = _read_expression_table.__wrapped__(path, mtime)  # uncached: the matrix is the one copy kept
    if not all(pd.api.types.is_numeric_dtype(t) for t in table.dtypes):
        first = table.columns[0]
        rest = table.drop(columns=[first])
        if not all(pd.api.types.is_numeric_dtype(t) for t in rest.dtypes):
            return None  # not a numeric matrix: the generic (mapping) path reports what is wrong
        table = rest.set_axis(table[first].astype(str), axis=0)
    rows = {str(k): i for i, k in enumerate(table.index)}
    return _Matrix(f"{path}:{mtime}", [str(c) for c in table.columns], table.to_numpy(np.float64), rows)


def read_matrix_row(value, base_dir: Path | None, proc: ModalityProcessor) -> tuple[_Matrix, int] | None:
    """Fast path for ``matrix.parquet#row=<id>`` cells: the cached matrix and the row number (``None`` when the
    cell is not such a reference or the file is not a numeric matrix)."""
    from ...data.manifest import parse_reference

    if not isinstance(value, (str, Path)) or "#" not in str(value):
        return None
    ref = parse_reference(str(value), base_dir)
    if "row" not in ref.options or not ref.path.exists():
        return None
    try:
        matrix = _read_matrix(str(ref.path), ref.path.stat().st_mtime)
    except Exception:
        return None
    if matrix is None:
        return None
    if ref.options["row"] not in matrix.rows:
        raise proc.error("missing_row", f"row {ref.options['row']!r} not found in {ref.path.name}", "fix #row=")
    return matrix, matrix.rows[ref.options["row"]]


def read_expression(value, base_dir: Path | None, proc: ModalityProcessor) -> dict[str, float]:
    """An omics cell (mapping, JSON string, or file reference) as ``{gene: value}``."""
    from ...data.manifest import as_mapping, parse_reference

    mapping = as_mapping(value)
    if mapping is not None:
        return mapping
    if not isinstance(value, (str, Path)):
        raise proc.error("bad_type", f"expected a gene->value mapping or a file path, got {type(value).__name__}", "")
    ref = parse_reference(str(value), base_dir)
    if not ref.path.exists():
        raise proc.error("missing_file", f"expression file {ref.path} does not exist", "fix the path")
    try:
        table = _read_expression_table(str(ref.path), ref.path.stat().st_mtime)
    except Exception as err:
        raise proc.error("unreadable_file", f"cannot read {ref.path}: {err}", "check the file format") from None
    if "row" in ref.options:
        key = ref.options["row"]
        index = table.index.astype(str)
        if key not in set(index):
            first = table.columns[0]
            if table[first].astype(str).eq(key).any():
                table = table.set_index(first)
                index = table.index.astype(str)
            else:
                raise proc.error("missing_row", f"row {key!r} not found in {ref.path.name}", "fix the #row= reference")
        row = table[index == key].iloc[0]
        return {str(k): v for k, v in row.items()}
    if table.shape[1] == 2 and len(table) >= 1:  # gene,value rows
        return dict(zip(table.iloc[:, 0].astype(str), table.iloc[:, 1]))
    if len(table) == 1:
        return {str(k): v for k, v in table.iloc[0].items()}
    raise proc.error(
        "ambiguous_file",
        f"{ref.path.name} has {len(table)} rows and {table.shape[1]} columns",
        "use 'gene,value' rows, a single-row file, or select a row of a matrix with '#row=<sample>'",
    )


def cell_source(value, base_dir: Path | None) -> str | None:
    """The source (cohort) of an omics cell: the file name of a ``matrix.parquet#row=<id>`` reference; ``None``
    for an inline mapping or a one-sample file."""
    from ...data.manifest import parse_reference

    if not isinstance(value, (str, Path)) or "#" not in str(value):
        return None
    ref = parse_reference(str(value), base_dir)
    return ref.path.name if "row" in ref.options else None


def trained_token_share(gene_ids, trained: np.ndarray) -> float | None:
    """The share of one profile's gene tokens whose embedding row ``trained`` (a boolean mask over vocabulary ids)
    marks as trained in pretraining; ids beyond the mask (genes added after pretraining) count as untrained;
    ``None`` for a profile without tokens."""
    gid = np.asarray(gene_ids)
    if not len(gid):
        return None
    known = gid < len(trained)
    return float(trained[gid[known]].sum()) / len(gid)


def pc_names(k: int) -> list[str]:
    """The vocabulary entries of the principal-component tokens (``OmicsSettings.pcs``): ``<PC1>`` ... ``<PCk>``."""
    return [f"<PC{j + 1}>" for j in range(k)]


POOLED_PCS = "*"  # the key of the PCA fitted on all training rows (cells without a source, sources without a fit)


@dataclass
class _PCAFit:
    """One fitted PCA of z-scored profiles: ``pos[vocabulary id]`` = column (-1: not read), the column centres, the
    components (k x columns, zero rows past the data's rank) and the score scales (1 where a component is empty)."""

    pos: np.ndarray
    center: np.ndarray
    components: np.ndarray
    scale: np.ndarray

    @classmethod
    def from_state(cls, fit: dict, vocabulary_size: int) -> _PCAFit:
        genes = np.asarray(fit["genes"], dtype=np.int64)
        pos = np.full(vocabulary_size, -1, dtype=np.int64)
        pos[genes] = np.arange(len(genes))
        scale = np.asarray(fit["scale"], dtype=np.float64)
        comp = np.asarray(fit["components"], dtype=np.float64).reshape(len(scale), len(genes))  # 0 genes: k x 0
        return cls(pos, np.asarray(fit["center"], dtype=np.float64), comp, scale)


def _moments(s1: np.ndarray, s2: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-gene mean, SD and whether the gene has spread, from sums. ``s2/n - mean**2`` cancels: a gene constant at
    ``v`` shows a spurious SD of about ``sqrt(eps) * |v|`` (1e-4 at 1e4), so spread is relative to the mean too."""
    mean = s1 / np.maximum(n, 1)
    std = np.sqrt(np.maximum(s2 / np.maximum(n, 1) - mean**2, 0))
    return mean, std, std >= np.maximum(1e-6, 1e-6 * np.abs(mean))


def _mean_std(s1: np.ndarray, s2: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and SD (1 for a gene without spread: its z-score is then its deviation from the mean, about 0)."""
    mean, std, spread = _moments(s1, s2, n)
    return mean, np.where(spread, std, 1.0)


class OmicsProcessor(ModalityProcessor):
    """Expression -> ``gene_ids`` (int64) and ``values`` (float32), one token per measured in-vocabulary gene (or
    per selected gene, ``top_k``), plus one per principal component with ``pcs``."""

    kind = "omics"
    vocabulary_ids = ("num_genes", "gene_embeddings")  # what extend() counts as overlap
    Settings = OmicsSettings

    def __init__(self, name=None, **settings):
        super().__init__(name, **settings)
        self._index: dict[str, int] = {}
        self._mean = self._std = None
        self._sources: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._matrix_cache: dict[str, tuple] = {}
        self._pcs: dict[str, _PCAFit] = {}
        self._pc_ids = np.zeros(0, dtype=np.int64)
        self._gene_table: GeneFeatures | None = None  # the whole feature file (saved with the processor)
        self._gene_features: np.ndarray | None = None  # (vocabulary, dim): the rows of the vocabulary's genes

    @property
    def per_source(self) -> bool:
        return self.settings.zscore == "per_source"

    def _norm_name(self, gene) -> str:
        g = str(gene).strip()
        return g.upper() if self.settings.case == "upper" else g.lower() if self.settings.case == "lower" else g

    def _parse(self, value, base_dir) -> tuple[list[str], np.ndarray, np.ndarray | None]:
        """``(normalised gene names, normalised values, vocabulary ids or None)`` of the measured genes."""
        fast = read_matrix_row(value, base_dir, self)
        if fast is not None:
            return self._parse_matrix_row(*fast)
        mapping = read_expression(value, base_dir, self)
        genes, vals = [], []
        for g, v in mapping.items():
            if v is None or v is pd.NA:
                continue  # not measured
            try:
                fv = float(v)
            except (TypeError, ValueError):
                raise self.error(
                    "bad_value", f"gene {g!r} has non-numeric value {v!r}", "expression values must be numbers"
                ) from None
            if math.isnan(fv):
                continue  # not measured (float or numpy NaN)
            if math.isinf(fv):
                raise self.error("non_finite", f"gene {g!r} has value {fv}", "replace inf by a finite value or null")
            genes.append(self._norm_name(g))
            vals.append(fv)
        vals = np.asarray(vals, dtype=np.float64)
        if len(set(genes)) != len(genes):
            raise self.error(
                "duplicate_gene", "some genes appear twice after case normalisation", "aggregate duplicates first"
            )
        return genes, self._normalise(vals), None

    def _parse_matrix_row(self, matrix: _Matrix, row: int):
        """Vectorised: gene names are normalised and looked up once per matrix file (cached), not per sample."""
        cached = self._matrix_cache.get(matrix.key)
        if cached is None or cached[2] != len(self._index):
            names = [self._norm_name(g) for g in matrix.genes]
            if len(set(names)) != len(names):
                raise self.error(
                    "duplicate_gene", "some genes appear twice after case normalisation", "aggregate duplicates first"
                )
            ids = np.array([self._index.get(g, -1) for g in names], dtype=np.int64)
            cached = self._matrix_cache[matrix.key] = (np.array(names, dtype=object), ids, len(self._index))
        names, ids, _ = cached
        vals = matrix.values[row]
        measured = ~np.isnan(vals)
        if np.isinf(vals).any():
            bad = names[np.isinf(vals)][:3].tolist()
            raise self.error("non_finite", f"gene(s) {bad} have infinite values", "replace inf by a finite value")
        return names[measured].tolist(), self._normalise(vals[measured]), ids[measured]

    def _normalise(self, vals: np.ndarray) -> np.ndarray:
        n = self.settings.normalization
        if n != "none" and vals.size and vals.min() < 0:
            raise self.error(
                "negative_expression",
                f"negative expression value {vals.min():.3g} with normalization={n!r}",
                "use normalization='none' for values already on a log scale",
            )
        if n == "log1p":
            return np.log1p(vals)
        if n == "cpm_log1p":
            total = vals.sum()
            return np.log1p(vals / total * 1e6) if total > 0 else vals
        return vals

    def _parse_all(self, values, sample_ids, base_dir) -> list[tuple[list[str], np.ndarray, str | None]]:
        """``(genes, normalised values, source)`` of every value; a bad value raises naming its sample."""
        parsed = []
        for v, sid in zip(values, sample_ids):
            try:
                genes, vals, _ = self._parse(v, base_dir)
            except Exception as err:
                raise (err.located(sample_id=sid) if hasattr(err, "located") else err) from None
            parsed.append((genes, vals, cell_source(v, base_dir) if self.per_source else None))
        return parsed

    def _sums(self, parsed, size: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-gene sum, sum of squares and count of the vocabulary ids ``[offset, offset + size)`` over ``parsed``."""
        s1, s2, n = np.zeros(size), np.zeros(size), np.zeros(size)
        for genes, vals, _ in parsed:
            idx = self._lookup(genes) - offset
            keep = (idx >= 0) & (idx < size)
            np.add.at(s1, idx[keep], vals[keep])
            np.add.at(s2, idx[keep], vals[keep] ** 2)
            np.add.at(n, idx[keep], 1)
        return s1, s2, n

    def _source_statistics(self, parsed) -> dict[str, dict[str, list[float]]]:
        """Per source seen in ``parsed``: mean/std of every vocabulary gene, the pooled ones where the source does
        not measure the gene."""
        out = {}
        for source in sorted({s for _, _, s in parsed if s is not None}):
            s1, s2, n = self._sums([p for p in parsed if p[2] == source], len(self._index))
            mean, std = _mean_std(s1, s2, n)
            measured = n > 0
            out[source] = {
                "mean": np.where(measured, mean, self._mean).tolist(),
                "std": np.where(measured, std, self._std).tolist(),
            }
        return out

    def _fit(self, values, sample_ids, base_dir):
        from collections import Counter

        if self.settings.gene_features_file:  # a bad file fails now, not after every training profile is parsed
            self._feature_table()
        parsed = self._parse_all(values, sample_ids, base_dir)
        counts: Counter = Counter()
        for genes, _, _ in parsed:
            counts.update(genes)
        vocab = sorted((g for g, c in counts.items() if c >= self.settings.min_samples), key=lambda g: (-counts[g], g))
        if self.settings.max_genes:
            vocab = vocab[: self.settings.max_genes]
        vocab = sorted(vocab)
        if self.settings.pcs:
            clash = sorted(set(vocab) & set(pc_names(self.settings.pcs)))
            if clash:
                raise self.error(
                    "reserved_gene_name",
                    f"gene(s) {clash} use the names of the principal-component tokens",
                    "rename them",
                )
            vocab += pc_names(self.settings.pcs)  # no sample measures them: z-score statistics 0 / 1
        self.state = {"genes": vocab, "fitted_on": len(values)}
        self._on_load()
        self._check_feature_coverage()
        if self.settings.zscore:
            mean, std = _mean_std(*self._sums(parsed, len(vocab)))
            self.state["mean"] = mean.tolist()
            self.state["std"] = std.tolist()
            self._on_load()
            if self.per_source:
                self.state["sources"] = self._source_statistics(parsed)
                self._on_load()
        if self.settings.pcs:
            groups = {POOLED_PCS: parsed}
            if self.per_source:
                groups.update({s: [p for p in parsed if p[2] == s] for s in self._sources})
            self.state["pcs"] = {
                key: self._fit_pca(rows, None if key == POOLED_PCS else key) for key, rows in groups.items()
            }
            self._on_load()
        logger.info(
            "omics processor %r: vocabulary of %d genes%s%s",
            self.name,
            len(vocab) - (self.settings.pcs or 0),
            f", z-scored per source ({len(self._sources)} sources)" if self.per_source else "",
            f", {self.settings.pcs} principal-component tokens ({len(self._pcs)} fits)" if self.settings.pcs else "",
        )
        if cov := self.gene_feature_coverage():
            logger.info(
                "omics processor %r: gene features (%d dims) for %d of %d vocabulary genes; the others' are zero",
                self.name,
                cov["dim"],
                cov["with_features"],
                cov["genes"],
            )

    def _fit_pca(self, rows, source: str | None) -> dict:
        """A PCA of ``rows`` (parsed training profiles of one source, or all of them for ``source=None``), z-scored
        with that source's statistics (pooled for ``None``), on the ``pcs_genes`` genes with the largest SD among
        those measured at least twice; unmeasured values count as the mean (z = 0). Deterministic: components are
        signed so that their largest loading is positive (as scikit-learn's ``svd_flip``)."""
        k, size = int(self.settings.pcs), len(self.state["genes"])
        s1, s2, n = self._sums(rows, size)
        spread = _moments(s1, s2, n)[2] & (n >= 2)
        var = np.where(spread, s2 / np.maximum(n, 1) - (s1 / np.maximum(n, 1)) ** 2, -1.0)
        var[self._pc_ids] = -1.0
        order = np.lexsort((np.arange(size), -var))
        genes = np.sort(order[: int(min(self.settings.pcs_genes, (var > 0).sum()))])
        mean, std = self._pooled_or_source(source)
        pos = np.full(size, -1, dtype=np.int64)
        pos[genes] = np.arange(len(genes))
        x = np.zeros((len(rows), len(genes)))
        for r, (names, vals, _) in enumerate(rows):
            idx = self._lookup(names)
            m = idx >= 0
            idx, vals = idx[m], vals[m]
            col = pos[idx]
            sel = col >= 0
            x[r, col[sel]] = (vals[sel] - mean[idx[sel]]) / std[idx[sel]]
        center = x.mean(axis=0) if len(rows) else np.zeros(len(genes))
        comp = np.zeros((k, len(genes)))
        scale = np.ones(k)
        r = 0
        if len(genes) and len(rows) > 1:
            _, sing, vt = np.linalg.svd(x - center, full_matrices=False)
            r = int(min(k, (sing > 1e-8 * max(sing.max(), 1e-300)).sum()))
            vt = vt[:r]
            vt *= np.where(vt[np.arange(r), np.abs(vt).argmax(axis=1)] < 0, -1.0, 1.0)[:, None]
            comp[:r] = vt
            scale[:r] = ((x - center) @ vt.T).std(axis=0)
        if r < k:
            logger.warning(
                "omics processor %r: the PCA of %s has %s (%d training rows, %d genes measured at least twice with "
                "spread); %s score 0 for its profiles",
                self.name,
                f"source {source!r}" if source is not None else "all training rows",
                f"no component of the {k} asked" if r == 0 else f"only {r} of the {k} components",
                len(rows),
                len(genes),
                "all components" if r == 0 else f"<PC{r + 1}> onwards",
            )
        return {
            "genes": genes.tolist(),
            "center": center.tolist(),
            "components": comp.tolist(),
            "scale": scale.tolist(),
            "rows": len(rows),
        }

    def _pooled_or_source(self, source: str | None) -> tuple[np.ndarray, np.ndarray]:
        return self._sources[source] if source is not None else (self._mean, self._std)

    def _pc_scores(self, value, base_dir, idx: np.ndarray, vals: np.ndarray) -> np.ndarray:
        """The ``pcs`` component scores of one parsed profile (``idx``: vocabulary ids, -1 unknown; ``vals``:
        normalised values), with the z-score statistics and PCA of its source."""
        mean, std = self._statistics_for(value, base_dir)
        source = cell_source(value, base_dir) if self.per_source else None
        fit = self._pcs.get(source) if source is not None else None
        fit = fit if fit is not None else self._pcs[POOLED_PCS]
        m = idx >= 0
        idx, vals = idx[m], vals[m]
        col = fit.pos[idx]
        sel = col >= 0
        x = -fit.center.copy()
        x[col[sel]] += (vals[sel] - mean[idx[sel]]) / std[idx[sel]]
        return fit.components @ x / fit.scale

    def extend(self, values, sample_ids=None, base_dir=None, trained=None) -> dict:
        """Add what a new cohort brings to a fitted processor, as tokenizers add tokens: genes measured in at least
        ``min_samples`` of ``values`` and missing from the vocabulary are appended (existing gene ids unchanged,
        ``max_genes`` not applied), their z-score statistics fitted on ``values``; with ``zscore: per_source`` every
        source not fitted yet gets its statistics from its rows in ``values`` (sources already fitted keep theirs,
        extended to the added genes). Pass the new cohort's *training* rows.

        With ``pcs`` the report also has ``"pca_genes_measured"``: the mean share, over the rows, of the genes their
        PCA reads (their source's, else the pooled one) that they measure. A new cohort read through a development
        PCA whose genes it lacks gets component scores near the training mean: below half a warning says so; none
        with ``top_k: 0`` (the components are the only tokens, so every profile would be the same) is an error.
        A failed extension leaves the processor as it was."""
        if not self.is_fitted:
            raise RuntimeError(f"omics processor {self.name!r} is not fitted: fit it before extending it")
        old = self.state
        try:
            return self._extend(values, sample_ids, base_dir, trained)
        except BaseException:
            self.state = old  # _extend builds new containers: the old state is untouched
            self._on_load()
            raise

    def _extend(self, values, sample_ids, base_dir, trained=None) -> dict:
        from collections import Counter

        vals, ids = self._present(values, sample_ids)
        if not vals:
            raise self.error("no_training_values", "no non-missing value to extend the vocabulary with", "")
        base = Path(base_dir) if base_dir is not None else None
        parsed = self._parse_all(vals, ids, base)
        counts: Counter = Counter()
        for genes, _, _ in parsed:
            counts.update(genes)
        if clash := sorted(set(counts) & set(pc_names(int(self.settings.pcs or 0)))):
            raise self.error(
                "reserved_gene_name", f"gene(s) {clash} use the names of the principal-component tokens", "rename them"
            )
        before = len(self.state["genes"])
        overlapping = [self._index[g] for g in counts if g in self._index]
        overlap = len(overlapping)
        added = sorted(g for g, c in counts.items() if g not in self._index and c >= self.settings.min_samples)
        known_sources = set(self._sources)
        self.state = {**self.state, "genes": [*self.state["genes"], *added]}
        self.state["extended_on"] = int(self.state.get("extended_on", 0)) + len(vals)
        self._on_load()
        if self.settings.zscore:
            mean, std = _mean_std(*self._sums(parsed, len(added), offset=before))
            self.state["mean"] = [*self.state["mean"], *mean.tolist()]
            self.state["std"] = [*self.state["std"], *std.tolist()]
            self._on_load()
        new_sources = []
        if self.per_source:
            fitted = self._source_statistics(parsed)
            sources = dict(self.state.get("sources", {}))
            for source, stats in fitted.items():
                if source in known_sources:  # keep its statistics; the added genes take this cohort's
                    old = sources[source]
                    sources[source] = {k: [*old[k], *stats[k][before:]] for k in ("mean", "std")}
                else:
                    sources[source] = stats
                    new_sources.append(source)
            for source in known_sources - set(fitted):  # not in this cohort: the added genes take pooled values
                old = sources[source]
                sources[source] = {k: [*old[k], *self.state[k][before:]] for k in ("mean", "std")}
            self.state["sources"] = sources
            self._on_load()
        if self.settings.pcs and new_sources:
            self.state["pcs"] = {
                **self.state["pcs"],
                **{s: self._fit_pca([p for p in parsed if p[2] == s], s) for s in new_sources},
            }
            self._on_load()
        report = {
            "added": len(added),
            "overlap": overlap,
            "measured": len(counts),
            "vocabulary_before": before,
            "vocabulary_after": len(self.state["genes"]),
            "new_sources": new_sources,
            **self._overlap_trained(overlapping, trained),
        }
        if self._gene_features is not None:  # of the added genes, how many the feature file knows
            report["added_with_features"] = int(self._feature_table().rows(added)[1].sum())
        if self.settings.pcs:
            report["pca_genes_measured"] = self._pca_share(parsed)
        if trained is not None:
            report["token_share_trained"] = self._token_share_trained(vals, ids, base, trained)
        logger.info(
            "omics processor %r extended on %d values: %d genes added, %d overlapping (vocabulary %d -> %d)%s",
            self.name,
            len(vals),
            report["added"],
            overlap,
            before,
            report["vocabulary_after"],
            f", new sources {new_sources}" if new_sources else "",
        )
        if self.settings.pcs:
            self._check_pca_share(report["pca_genes_measured"], len(vals))
        return report

    def _token_share_trained(self, vals, ids, base, trained) -> float | None:
        """The mean, over the extension rows, of :func:`trained_token_share` of each profile's tokens as the
        extended processor emits them: what overlapping gene counts do not say, since ``top_k`` picks each
        profile's own genes; ``None`` when no row has a gene token."""
        mask = np.asarray(trained, dtype=bool)
        shares = [
            trained_token_share(self(v, sample_id=sid, base_dir=base)["gene_ids"], mask)
            for v, sid in zip(vals, ids, strict=True)
        ]
        shares = [x for x in shares if x is not None]
        return float(np.mean(shares)) if shares else None

    def _pca_share(self, parsed) -> float | None:
        """Mean over ``parsed`` rows of the share of their PCA's genes (their source's, else pooled) they measure;
        rows whose PCA reads no gene (already warned about when it was fitted) are left out (``None``: all are)."""
        shares = []
        for genes, _, source in parsed:
            fit = self._pcs.get(source) if source is not None else None
            fit = fit if fit is not None else self._pcs[POOLED_PCS]
            read = int((fit.pos >= 0).sum())
            if read:
                idx = self._lookup(genes)
                shares.append(float((fit.pos[idx[idx >= 0]] >= 0).sum()) / read)
        return float(np.mean(shares)) if shares else None

    def _check_pca_share(self, share: float | None, rows: int):
        if share is None:
            return
        if share == 0.0 and self.settings.top_k == 0:
            raise self.error(
                "pca_not_measured",
                f"the {rows} extension rows measure none of the genes their principal components read: with top_k: 0 "
                "the component tokens are this modality's only tokens, so every profile would get the same ones",
                "use zscore: per_source (a new cohort then gets its own PCA), set top_k so its genes become tokens, or "
                "check its gene identifiers (symbols vs Ensembl IDs, case) match the development cohorts",
            )
        if share < 0.5:
            logger.warning(
                "omics processor %r: the extension rows measure on average %.0f%% of the genes their principal "
                "components read; their component tokens stay near the training mean (zscore: per_source gives a new "
                "cohort its own PCA)",
                self.name,
                100 * share,
            )

    # ---- federated fit: per-gene sample counts (vocabulary union) and per-gene sums (z-score statistics) ---------
    def _site_statistics(self, values, sample_ids, base_dir):
        if self.settings.pcs:
            raise NotImplementedError(
                f"omics processor {self.name!r}: pcs (principal-component tokens) are fitted on the training "
                "profiles themselves, which a federated fit never shares; leave pcs unset for federated fitting"
            )
        counts: dict[str, int] = {}
        sums: dict[str, list[float]] = {}
        by_source: dict[str, dict[str, list[float]]] = {}
        for genes, vals, source in self._parse_all(values, sample_ids, base_dir):
            for g, x in zip(genes, vals.tolist()):
                counts[g] = counts.get(g, 0) + 1
                if self.settings.zscore:
                    s = sums.setdefault(g, [0.0, 0.0, 0.0])
                    s[0], s[1], s[2] = s[0] + x, s[1] + x * x, s[2] + 1
                    if source is not None:
                        t = by_source.setdefault(source, {}).setdefault(g, [0.0, 0.0, 0.0])
                        t[0], t[1], t[2] = t[0] + x, t[1] + x * x, t[2] + 1
        out = {"fitted_on": len(values), "genes": counts}
        if self.settings.zscore:
            out["sums"] = sums
        if self.per_source:
            out["source_sums"] = by_source
        return out

    def _fit_from_statistics(self, merged, query):
        counts = merged["genes"]
        vocab = sorted((g for g, c in counts.items() if c >= self.settings.min_samples), key=lambda g: (-counts[g], g))
        if self.settings.max_genes:
            vocab = vocab[: self.settings.max_genes]
        vocab = sorted(vocab)
        self.state = {"genes": vocab, "fitted_on": int(merged["fitted_on"])}
        if self.settings.zscore:
            s1, s2, n = np.array([merged["sums"][g] for g in vocab], dtype=np.float64).reshape(-1, 3).T
            mean, std = _mean_std(s1, s2, n)
            self.state["mean"] = mean.tolist()
            self.state["std"] = std.tolist()
        if self.per_source:
            self.state["sources"] = {}
            for source, sums in sorted(merged.get("source_sums", {}).items()):
                s1, s2, n = np.array([sums.get(g, [0.0, 0.0, 0.0]) for g in vocab], dtype=np.float64).reshape(-1, 3).T
                m, s = _mean_std(s1, s2, n)
                self.state["sources"][source] = {
                    "mean": np.where(n > 0, m, mean).tolist(),
                    "std": np.where(n > 0, s, std).tolist(),
                }
        self._on_load()

    def _lookup(self, genes: list[str]) -> np.ndarray:
        return np.fromiter((self._index.get(g, -1) for g in genes), dtype=np.int64, count=len(genes))

    def _on_load(self):
        self._matrix_cache = {}
        self._index = {g: i for i, g in enumerate(self.state.get("genes", []))}
        if "mean" in self.state:
            self._mean = np.asarray(self.state["mean"])
            self._std = np.asarray(self.state["std"])
        self._sources = {
            k: (np.asarray(v["mean"]), np.asarray(v["std"])) for k, v in self.state.get("sources", {}).items()
        }
        size = len(self._index)
        self._pcs = {k: _PCAFit.from_state(v, size) for k, v in self.state.get("pcs", {}).items()}
        names = pc_names(int(self.settings.pcs or 0))
        self._pc_ids = np.array([self._index[n] for n in names if n in self._index], dtype=np.int64)
        self._gene_features = None
        if self.settings.gene_features_file and self._index:
            feats, found = self._feature_table().rows(self.state["genes"])
            feats[self._pc_ids] = 0.0  # <PCj> tokens are not genes (an alias could share the name)
            found[self._pc_ids] = False
            self._gene_features = feats
            self._features_found = int(found.sum())

    GENE_FEATURES_NAME = "gene_features.safetensors"

    def _feature_table(self) -> GeneFeatures:
        if self._gene_table is None:
            self._gene_table = GeneFeatures.load(self.settings.gene_features_file)
        return self._gene_table

    def attach_gene_features(self, path: str | os.PathLike) -> dict[str, int]:
        """Give an already fitted processor gene features (``gene_features_file``) without refitting it: the same
        vocabulary, statistics and tokens, plus each token's feature vector. Returns how many vocabulary genes the
        file knows. A model built from the processor then has ``gene_feature_dim`` set (a new model: the pretrained
        weights of one built without features do not fit it)."""
        if not self.is_fitted:
            raise RuntimeError(f"omics processor {self.name!r} is not fitted: fit it before attaching gene features")
        table = GeneFeatures.load(path)
        self.settings = dataclasses.replace(self.settings, gene_features_file=str(path))
        self._gene_table = table
        self._on_load()
        self._check_feature_coverage()
        return self.gene_feature_coverage()

    def _check_feature_coverage(self) -> None:
        """A feature table that knows none of the vocabulary's genes would build a model with an all-zero input
        (and make ``gene_feature_mode: replace`` a plain run): refused, naming the file and the vocabulary's
        first genes; under 10% known is logged as a warning."""
        cov = self.gene_feature_coverage()
        if not cov or not cov["genes"]:
            return
        if cov["with_features"] == 0:
            genes = [g for g in self.state["genes"] if g not in set(pc_names(int(self.settings.pcs or 0)))][:5]
            raise self.error(
                "gene_features_match_nothing",
                f"the gene feature file {self.settings.gene_features_file} knows none of the {cov['genes']} "
                f"vocabulary genes (e.g. {genes}); it is keyed by gene symbols",
                "map the identifiers to gene symbols first (tokenizers/build_gene_map.py, --gene_map) or leave "
                "gene_features_file unset",
            )
        if cov["with_features"] < 0.1 * cov["genes"]:
            logger.warning(
                "omics processor %r: the gene feature file %s knows only %d of %d vocabulary genes",
                self.name,
                self.settings.gene_features_file,
                cov["with_features"],
                cov["genes"],
            )

    def gene_feature_coverage(self) -> dict[str, int]:
        """``{"genes": vocabulary genes, "with_features": those the feature file knows, "dim": ...}`` (empty without
        ``gene_features_file``)."""
        if self._gene_features is None:
            return {}
        genes = len(self.state["genes"]) - len(self._pc_ids)
        return {"genes": genes, "with_features": self._features_found, "dim": int(self._gene_features.shape[1])}

    def card_notes(self) -> dict[str, str]:
        """With ``gene_features_file``: the table's dimension, source, licence and how many genes it covers."""
        cov = self.gene_feature_coverage()
        if not cov:
            return {}
        src = self._feature_table().source
        return {
            "gene features": f"{cov['dim']}-d for {cov['with_features']} of {cov['genes']} genes (the others: zeros); "
            f"{src.get('method', '?')}; {src.get('tables', '?')} annotation from {src.get('database', '?')}; "
            f"licence: {src.get('licence', 'not recorded')}"
        }

    def _save_files(self, directory: Path) -> None:
        if self._gene_features is not None:
            self._feature_table().save(directory / self.GENE_FEATURES_NAME)

    def _load_files(self, directory: Path) -> None:
        path = directory / self.GENE_FEATURES_NAME
        if self.settings.gene_features_file and path.exists():
            self._gene_table = GeneFeatures.load(path)

    def _statistics_for(self, value, base_dir) -> tuple[np.ndarray, np.ndarray]:
        """The z-score mean/std that apply to a cell: its source's with ``zscore: per_source`` (pooled for a cell
        without a source), else pooled."""
        source = cell_source(value, base_dir) if self.per_source else None
        if source is None:
            return self._mean, self._std
        if source not in self._sources:
            raise self.error(
                "unknown_source",
                f"source {source!r} was not seen when the per-source z-score statistics were fitted (fitted sources: "
                f"{sorted(self._sources)[:10]})",
                "extend the processor on that cohort's training rows (OmicsProcessor.extend; run_finetune does it "
                "with --extend_vocabulary true), or use zscore: true (pooled statistics)",
            )
        return self._sources[source]

    def _process(self, value, *, sample_id, base_dir, train, rng):
        genes, vals, idx = self._parse(value, base_dir)
        if idx is None:
            idx = self._lookup(genes)
        oov = int((idx < 0).sum())
        if oov:
            if self.settings.oov == "error":
                unknown = [g for g, i in zip(genes, idx) if i < 0][:5]
                raise self.error(
                    "unknown_gene", f"{oov} gene(s) not in the vocabulary, e.g. {unknown}", "refit the processor"
                )
            self.counters["oov_genes"] += oov
        if len(genes) and oov == len(genes):
            raise self.error(
                "no_known_genes",
                f"none of the {len(genes)} measured genes is in the fitted vocabulary ({len(self._index)} genes)",
                "check the gene identifiers (symbols vs Ensembl IDs, case) match the training data, or extend the "
                "vocabulary on the new cohort's training rows (run_finetune --extend_vocabulary true)",
            )
        scores = None
        if self.settings.pcs:
            if np.isin(idx, self._pc_ids).any():
                raise self.error(
                    "reserved_gene_name",
                    f"gene(s) {[g for g, i in zip(genes, idx) if i in set(self._pc_ids.tolist())]} use the names of "
                    "the principal-component tokens",
                    "rename them",
                )
            scores = self._pc_scores(value, base_dir, idx, vals)
        keep = idx >= 0
        if self.settings.drop_zeros:
            keep &= vals != 0
        idx, vals = idx[keep], vals[keep]
        if self.settings.top_k == 0:
            idx, vals = idx[:0], vals[:0]
        elif self.settings.top_k is not None and len(idx) > self.settings.top_k:
            if self.settings.top_k_by == "variance":
                _, std = self._statistics_for(value, base_dir)
                spread = np.where(std[idx] == 1.0, 0.0, std[idx])  # _mean_std stores 1.0 for a gene without spread
                order = np.lexsort((idx, -spread))[: self.settings.top_k]  # largest spread first, ties by gene id
            elif self.settings.top_k_by == "deviation":
                mean, std = self._statistics_for(value, base_dir)
                deviation = np.abs(vals - mean[idx]) / std[idx]
                order = np.lexsort((idx, -deviation))[: self.settings.top_k]  # largest |z| first, ties by gene id
            else:
                order = np.argsort(-vals, kind="stable")[: self.settings.top_k]
            order.sort()
            idx, vals = idx[order], vals[order]
        if self.settings.zscore:
            mean, std = self._statistics_for(value, base_dir)
            vals = (vals - mean[idx]) / std[idx]
        if scores is not None:  # already on unit scale: the <PCj> entries' statistics are 0 / 1
            idx, vals = np.concatenate([idx, self._pc_ids]), np.concatenate([vals, scores])
        order = np.argsort(idx, kind="stable")
        out = {"gene_ids": idx[order], "values": vals[order].astype(np.float32)}
        if self._gene_features is not None:
            out["gene_features"] = self._gene_features[out["gene_ids"]]
        return out

    def model_settings(self):
        out = {"kind": "omics", "num_genes": max(1, len(self.state["genes"]))}
        if self._gene_features is not None:
            out["gene_feature_dim"] = int(self._gene_features.shape[1])
        return out
