"""Modality plug-ins. Importing this package registers the built-in kinds.

Each kind is one module: a settings dataclass and a :class:`ModalityEmbedder` registered by name. To add a
kind, write one module like :mod:`.omics` and import it here; nothing else changes.
"""

from . import image, omics, signal, tabular, text  # noqa: F401  (registration side effects)
from .base import ModalityEmbedder
from .registry import get_embedder_class, list_modality_kinds, normalize_modality_config, register_modality

__all__ = [
    "ModalityEmbedder",
    "get_embedder_class",
    "list_modality_kinds",
    "normalize_modality_config",
    "register_modality",
]
