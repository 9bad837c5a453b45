"""``bioperceiver search``: nearest samples across modalities over an index built from ``embed`` output.

The index holds one modality's embeddings (``target``, or ``fused``) of a cohort, L2-normalised, so scores are
cosine similarities. Queries are another modality's embeddings (``modality``) of new samples (a manifest, embedded
with the index's model in the index's space) or of an ``embed`` output folder (in the same space). A query never
retrieves samples of its own patient. Across modalities, ``embed --space projected`` gives the space the
pretraining loss aligned the modalities in (the one its card's retrieval numbers are in); whether it retrieves
better than the ``latent`` vectors depends on the backbone (15 SurvSet backbones: R@1 0.105 vs 0.073; the short
demo run: no better; RESULTS.md): ``benchmarks/retrieval_space.py`` compares both on a held-out split.

Backends: FAISS (``faiss-cpu``, the ``search`` extra) when installed, exact matmul in numpy otherwise
(``backend="exact"``). The default FAISS index is ``Flat`` (exhaustive inner product: the same neighbours as the
matmul); any FAISS ``index_factory`` string (e.g. ``HNSW32``, ``IVF1024,Flat``) trades recall for speed on large
sets. Own-patient exclusion asks the index for ``k +`` (the most target rows any one patient has) neighbours and
drops the query's patient, so exactly ``k`` remain whenever the index has that many other-patient rows.

``evaluate``: with a label column, a retrieved sample is relevant when it has the query's label; R@k is the share
of queries with at least one relevant sample in their top ``k``, and its chance level is the same quantity for a
uniformly random ranking of each query's candidates: ``1 - C(N - m, k) / C(N, k)`` (``N`` candidates outside the
query's patient, ``m`` of them relevant), averaged over queries.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..jsonio import dumps
from .embedding import EMBEDDING_COLUMN, FUSED, embedding_column, embedding_rows, read_embeddings, stacked

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "faiss", "exact")


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (``float32``); an all-zero row stays zero."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


@dataclass
class EmbeddingSet:
    """Vectors ``(N, D)`` (L2-normalised) of one modality with their ``sample_ids``, ``patient_ids`` and label
    columns (text, ``None`` when unlabelled)."""

    vectors: np.ndarray
    sample_ids: list[str]
    patient_ids: list[str]
    labels: dict[str, list[str | None]] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sample_ids)

    @classmethod
    def from_frame(cls, frame, modality: str, metadata: dict[str, Any] | None = None) -> EmbeddingSet:
        column = embedding_column(modality)
        if column not in frame:
            names = [FUSED] + [c[len(EMBEDDING_COLUMN) + 1 :] for c in frame if c.startswith(EMBEDDING_COLUMN + "_")]
            raise ValueError(f"no embeddings of modality {modality!r}; these embeddings have {names}")
        rows = frame[frame[column].notna()]
        labels = {c: list(rows[c]) for c in rows.columns if c.startswith("label_")}
        return cls(
            normalize(stacked(list(rows[column]))),
            [str(s) for s in rows["sample_id"]],
            [str(p) for p in rows["patient_id"]],
            labels,
            dict(metadata or {}),
        )

    @classmethod
    def from_embeddings(cls, folder: str | os.PathLike, modality: str) -> EmbeddingSet:
        """The ``modality`` embeddings (rows that have it) of an ``embed`` output folder."""
        frame, meta = read_embeddings(folder)
        return cls.from_frame(frame, modality, meta)


class EmbeddingIndex:
    """Nearest-neighbour index over an :class:`EmbeddingSet` (inner product of unit vectors = cosine).

    Args:
        data: the indexed (target) embeddings.
        backend: ``"faiss"``, ``"exact"`` (numpy matmul) or ``"auto"`` (FAISS when installed).
        faiss_index: a FAISS ``index_factory`` description; ``"Flat"`` is exhaustive (exact).
    """

    def __init__(self, data: EmbeddingSet, *, backend: str = "auto", faiss_index: str = "Flat"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "faiss" and not faiss_available():
            raise ValueError("backend='faiss' needs faiss-cpu: pip install 'bioperceiver[search]' (or backend='exact')")
        self.data = data
        self.backend = "faiss" if backend == "faiss" or (backend == "auto" and faiss_available()) else "exact"
        self.faiss_index = faiss_index
        _, counts = np.unique(np.asarray(data.patient_ids), return_counts=True)
        self.max_per_patient = int(counts.max()) if len(counts) else 0
        self._index = None
        if self.backend == "faiss" and len(data):
            import faiss

            index = faiss.index_factory(data.vectors.shape[1], faiss_index, faiss.METRIC_INNER_PRODUCT)
            if not index.is_trained:
                index.train(data.vectors)
            index.add(data.vectors)
            self._index = index

    def __len__(self) -> int:
        return len(self.data)

    def _raw(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, indices)`` ``(Q, k)`` best first, without exclusion (index -1: no neighbour)."""
        k = min(k, len(self))
        if self._index is not None:
            return self._index.search(queries, k)
        scores = queries @ self.data.vectors.T  # (Q, N)
        top = (
            np.argpartition(-scores, k - 1, axis=1)[:, :k]
            if k < scores.shape[1]
            else np.tile(np.arange(k), (len(scores), 1))
        )
        top_scores = np.take_along_axis(scores, top, axis=1)
        # best first; ties broken by the lower index, deterministically
        order = np.lexsort((top, -top_scores), axis=1)
        return np.take_along_axis(top_scores, order, axis=1), np.take_along_axis(top, order, axis=1)

    def search(
        self, queries: np.ndarray, k: int = 10, exclude_patients: Sequence[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, indices)`` ``(Q, k)`` of the ``k`` nearest indexed rows of each query (unit vectors), best
        first; with ``exclude_patients`` (one per query) rows of that patient are left out. Missing neighbours
        (fewer than ``k`` candidates) have index ``-1`` and score ``-inf``."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = normalize(queries)
        extra = self.max_per_patient if exclude_patients is not None else 0
        scores, idx = self._raw(queries, k + extra)
        out_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out_i = np.full((len(queries), k), -1, dtype=np.int64)
        patients = np.asarray(self.data.patient_ids)
        for q in range(len(queries)):
            keep = idx[q] >= 0
            if exclude_patients is not None:
                keep &= patients[np.clip(idx[q], 0, None)] != str(exclude_patients[q])
            s, i = scores[q][keep][:k], idx[q][keep][:k]
            out_s[q, : len(s)], out_i[q, : len(i)] = s, i
        return out_s, out_i


def recall_at_k(
    query_labels: Sequence[Any],
    query_patients: Sequence[str],
    data: EmbeddingSet,
    label_column: str,
    indices: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """R@k (a relevant = same-label sample among the top ``k``) and its chance level, for queries with a label;
    candidates are the index rows outside the query's patient."""
    labels = np.asarray(data.labels[label_column], dtype=object)
    patients = np.asarray(data.patient_ids)
    labelled = [q for q, lab in enumerate(query_labels) if lab is not None]
    out: dict[str, float] = {"n_queries": len(labelled), "n_index": len(data)}
    for k in ks:
        if k > indices.shape[1]:
            continue
        hits, chance = [], []
        for q in labelled:
            candidates = patients != str(query_patients[q])
            n = int(candidates.sum())
            m = int((candidates & (labels == query_labels[q])).sum())
            top = indices[q, :k]
            top = top[top >= 0]
            hits.append(bool(np.any(labels[top] == query_labels[q])))
            kk = min(k, n)
            # P(no relevant in kk draws without replacement) = prod_i (n - m - i) / (n - i)
            miss = np.prod([(n - m - i) / (n - i) for i in range(kk)]) if n - m >= kk else 0.0
            chance.append(1.0 - miss)
        out[f"recall@{k}"] = float(np.mean(hits)) if hits else float("nan")
        out[f"chance_recall@{k}"] = float(np.mean(chance)) if chance else float("nan")
    return out


@dataclass
class SearchResult:
    """``table``: one row per (query, rank): query ids, rank (1 = nearest), neighbour ids, score (cosine),
    labels of both; ``metrics``: :func:`recall_at_k` when evaluated."""

    table: Any
    metrics: dict[str, float] = field(default_factory=dict)


def _query_set(query, modality: str, model, index_meta: dict[str, Any], batch_size: int, on_error: str):
    """The query embeddings: an ``embed`` folder, an :class:`EmbeddingSet`, or a manifest embedded with ``model``
    (default: the model the index was built with)."""
    space = index_meta.get("space", "latent")  # embed outputs before --space existed are latent
    if isinstance(query, EmbeddingSet):
        return query
    path = Path(query)
    if path.is_dir():
        queries = EmbeddingSet.from_embeddings(path, modality)
        if queries.metadata.get("space", "latent") != space:
            raise ValueError(
                f"the query embeddings {path} are in the {queries.metadata.get('space', 'latent')} space, the index "
                f"in the {space} space: embed both with the same --space"
            )
        return queries
    import pandas as pd

    from ..data.manifest import read_manifest
    from .loading import LoadedModel, load_model_folder, model_fingerprint

    loaded = model if isinstance(model, LoadedModel) else None
    if loaded is None:
        folder = model or index_meta.get("model_id")
        if folder is None:
            raise ValueError("a manifest query needs --model (the index records no model)")
        loaded = load_model_folder(folder)
    if index_meta.get("config_hash") and loaded.config_hash != index_meta["config_hash"]:
        raise ValueError(
            f"the query model {loaded.folder} (config hash {loaded.config_hash}) is not the one the index was built "
            f"with ({index_meta.get('model_id')}, {index_meta['config_hash']}): embed the queries with that model"
        )
    fingerprint = model_fingerprint(loaded) if index_meta.get("model_fingerprint") else None
    if fingerprint is not None and fingerprint != index_meta["model_fingerprint"]:
        raise ValueError(
            f"the query model {loaded.folder} has the index's architecture but other weights or processors (model "
            f"fingerprint {fingerprint}, the index's {index_meta['model_fingerprint']} from "
            f"{index_meta.get('model_id')}): embed the queries with the model the index was built with"
        )
    manifest = read_manifest(path)
    rows = list(  # in the index's space
        embedding_rows(
            loaded,
            manifest.records(),
            base_dir=manifest.base_dir,
            batch_size=batch_size,
            on_error=on_error,
            space=space,
        )
    )
    frame = pd.DataFrame(rows)
    if frame.empty:
        raise ValueError(f"no query sample of {path} could be embedded")
    return EmbeddingSet.from_frame(frame, modality)


def search(
    index: str | os.PathLike | EmbeddingIndex,
    query: str | os.PathLike | EmbeddingSet,
    *,
    modality: str,
    target: str,
    k: int = 10,
    model: Any = None,
    evaluate: bool = False,
    label_column: str | None = None,
    backend: str = "auto",
    faiss_index: str = "Flat",
    batch_size: int = 32,
    on_error: str = "skip_modality",
    output: str | os.PathLike | None = None,
) -> SearchResult:
    """The ``k`` nearest ``target``-modality samples of the index for every query's ``modality`` embedding,
    excluding the query's own patient. ``index``: an ``embed`` output folder (the index is built over its
    ``target`` column) or an :class:`EmbeddingIndex`; ``query``: a manifest, an ``embed`` output folder or an
    :class:`EmbeddingSet`. ``evaluate``: R@1/5/10 with chance level on ``label_column``. ``output``: write
    ``search_results.csv`` (and ``search_metrics.json`` when evaluated) there."""

    import pandas as pd

    if not isinstance(index, EmbeddingIndex):
        index = EmbeddingIndex(EmbeddingSet.from_embeddings(index, target), backend=backend, faiss_index=faiss_index)
    queries = _query_set(query, modality, model, index.data.metadata, batch_size, on_error)
    logger.info(
        "%d %s queries against %d %s rows (%s backend)", len(queries), modality, len(index), target, index.backend
    )
    ks = (1, 5, 10)
    # evaluation scores R@1/5/10 whatever -k is; the table keeps the top k
    scores, idx = index.search(queries.vectors, max(k, *ks) if evaluate else k, exclude_patients=queries.patient_ids)
    rows = []
    data = index.data
    for q in range(len(queries)):
        for r in range(k):
            j = int(idx[q, r])
            if j < 0:
                break
            row = {
                "query_sample_id": queries.sample_ids[q],
                "query_patient_id": queries.patient_ids[q],
                "rank": r + 1,
                "sample_id": data.sample_ids[j],
                "patient_id": data.patient_ids[j],
                "score": float(scores[q, r]),
            }
            if label_column:
                row[f"query_{label_column}"] = queries.labels.get(label_column, [None] * len(queries))[q]
                row[label_column] = data.labels.get(label_column, [None] * len(data))[j]
            rows.append(row)
    result = SearchResult(pd.DataFrame(rows))
    if evaluate:
        if not label_column:
            raise ValueError("search --evaluate needs --label_column (a label_* column of the embeddings)")
        for name, s in (("index", data), ("query", queries)):
            if label_column not in s.labels:
                raise ValueError(f"the {name} embeddings have no {label_column!r} column; they have {sorted(s.labels)}")
        result.metrics = recall_at_k(queries.labels[label_column], queries.patient_ids, data, label_column, idx, ks=ks)
        result.metrics.update({"modality": modality, "target": target, "label_column": label_column})
        logger.info("retrieval: %s", result.metrics)
    if output is not None:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        result.table.to_csv(out / "search_results.csv", index=False)
        if result.metrics:
            (out / "search_metrics.json").write_text(dumps(result.metrics) + "\n")
    return result
