"""Using a trained model: :func:`embed` (sharded Parquet embeddings of a cohort), :func:`predict` (a finetuned
model on new patients, with uncertainty) and :func:`search` (cross-modal nearest samples over ``embed`` output),
behind ``bioperceiver embed|predict|search`` (:mod:`bioperceiver.cli`) with the same arguments."""

from importlib import import_module

_EXPORTS = {
    "embed": ".embedding",
    "read_embeddings": ".embedding",
    "EmbedResult": ".embedding",
    "predict": ".prediction",
    "PredictResult": ".prediction",
    "search": ".retrieval",
    "EmbeddingIndex": ".retrieval",
    "EmbeddingSet": ".retrieval",
    "SearchResult": ".retrieval",
    "load_model_folder": ".loading",
    "LoadedModel": ".loading",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
