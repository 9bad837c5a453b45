"""Registry of modality kinds: ``kind name -> embedder class`` (the model-side tokenizer).

A modality kind is one module in this package that defines a :class:`ModalityEmbedder` subclass decorated
with :func:`register_modality`. The backbone, losses and scripts only ever go through this registry.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import ModalityEmbedder

_REGISTRY: dict[str, type[ModalityEmbedder]] = {}


def register_modality(kind: str):
    """Class decorator registering an embedder class under ``kind``."""

    def wrap(cls: type[ModalityEmbedder]) -> type[ModalityEmbedder]:
        if kind in _REGISTRY and _REGISTRY[kind] is not cls:
            raise ValueError(f"modality kind {kind!r} is already registered by {_REGISTRY[kind].__name__}")
        cls.kind = kind
        _REGISTRY[kind] = cls
        return cls

    return wrap


def list_modality_kinds() -> list[str]:
    """Names of every registered modality kind, sorted."""
    return sorted(_REGISTRY)


def get_embedder_class(kind: str) -> type[ModalityEmbedder]:
    if kind not in _REGISTRY:
        raise ValueError(f"unknown modality kind {kind!r}; registered kinds: {list_modality_kinds()}")
    return _REGISTRY[kind]


def normalize_modality_config(name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Validate one modality's sub-config and fill in defaults; returns a plain JSON-serialisable dict.

    Raises ``ValueError`` naming the modality and the offending field.
    """
    if not isinstance(cfg, dict) or "kind" not in cfg:
        raise ValueError(
            f"modality {name!r}: config must be a dict with a 'kind' key (one of {list_modality_kinds()}), got {cfg!r}"
        )
    settings = {k: v for k, v in cfg.items() if k != "kind"}
    try:
        cls = get_embedder_class(cfg["kind"])
    except ValueError as err:
        raise ValueError(f"modality {name!r}: {err}") from None
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise ValueError(
            f"modality {name!r} (kind {cfg['kind']!r}): unknown setting(s) {unknown}; valid settings: {sorted(fields)}"
        )
    try:
        parsed = cls.config_class(**settings)
    except ValueError as err:
        raise ValueError(f"modality {name!r} (kind {cfg['kind']!r}): {err}") from None
    return {"kind": cfg["kind"], **dataclasses.asdict(parsed)}
