"""Modality plug-ins. Importing this package registers the built-in kinds.

Each kind is one folder, ``modalities/<kind>/``::

    <kind>/
      __init__.py   register_modality(<Kind>Spec())
      spec.py       <Kind>Spec(ModalitySpec): arrays and collation, manifest cell checks, token labels
      processor.py  <Kind>Processor(ModalityProcessor): raw manifest cell -> arrays (CPU, datasets.map workers)
      embedder.py   <Kind>Config + <Kind>Embedder(ModalityEmbedder): arrays -> tokens (B, N, D_in) + keep-mask

To add a kind, write such a folder (or the three classes anywhere) and call :func:`register_modality` once;
nothing else changes (``tests/test_modality_plugin.py`` does it from a test file alone).
"""

from . import image, omics, signal, tabular, text, wsi  # registers the built-in kinds
from .embedder import ModalityEmbedder
from .processor import ModalityProcessor
from .registry import (
    available_modalities,
    get_embedder_class,
    get_modality,
    list_modality_kinds,
    normalize_modality_config,
    register_modality,
    unregister_modality,
)
from .spec import ArraySpec, LinearInputs, ModalitySpec

__all__ = [
    "ArraySpec",
    "LinearInputs",
    "ModalityEmbedder",
    "ModalityProcessor",
    "ModalitySpec",
    "available_modalities",
    "get_embedder_class",
    "get_modality",
    "image",
    "list_modality_kinds",
    "normalize_modality_config",
    "omics",
    "register_modality",
    "signal",
    "tabular",
    "text",
    "unregister_modality",
    "wsi",
]
