"""The one registry of modality kinds: ``kind name -> ModalitySpec``.

A kind is registered once, by its folder's ``__init__.py`` (built-in kinds) or by user code (a plug-in)::

    register_modality(SpectrumSpec())

Everything else (collator, validator, datasets, processors, config, attribution mapping) asks
:func:`get_modality`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .embedder import ModalityEmbedder
    from .spec import ModalitySpec

_REGISTRY: dict[str, ModalitySpec] = {}


def register_modality(spec: ModalitySpec, *, replace: bool = False) -> ModalitySpec:
    """Register ``spec`` (an instance of a :class:`ModalitySpec` subclass) under ``spec.kind``; returns it.

    The spec's processor and embedder classes get ``kind`` set to the spec's kind. Registering a second spec of a
    kind raises ``ValueError`` unless ``replace=True`` (re-registering the same spec class is a no-op).
    """
    from .spec import ModalitySpec

    if isinstance(spec, type) or not isinstance(spec, ModalitySpec):
        raise ValueError(
            f"register_modality expects a ModalitySpec instance (e.g. register_modality(MySpec())), got {spec!r}"
        )
    spec.check_definition()
    old = _REGISTRY.get(spec.kind)
    if old is not None and type(old) is not type(spec) and not replace:
        raise ValueError(
            f"modality kind {spec.kind!r} is already registered by {type(old).__name__}; pick another kind name, "
            "or pass replace=True"
        )
    for cls in (spec.processor_class, spec.embedder_class):
        current = cls.__dict__.get("kind")
        if current not in (None, "", spec.kind):
            raise ValueError(f"{cls.__name__}.kind is {current!r}, but its spec registers kind {spec.kind!r}")
        cls.kind = spec.kind
    _REGISTRY[spec.kind] = spec
    return spec


def unregister_modality(kind: str) -> ModalitySpec:
    """Remove a registered kind (tests and plug-in reloads); returns its spec."""
    if kind not in _REGISTRY:
        raise ValueError(f"modality kind {kind!r} is not registered; registered kinds: {available_modalities()}")
    return _REGISTRY.pop(kind)


def available_modalities() -> list[str]:
    """Names of every registered modality kind, sorted."""
    return sorted(_REGISTRY)


def get_modality(kind: str) -> ModalitySpec:
    """The registered spec of ``kind``; ``ValueError`` naming the registered kinds otherwise."""
    spec = _REGISTRY.get(kind)
    if spec is None:
        raise ValueError(
            f"unknown modality kind {kind!r}; registered kinds: {available_modalities()}. Register a new kind with "
            "bioperceiver.modalities.register_modality(spec)"
        )
    return spec


# Older names, kept for code written before the spec registry.
list_modality_kinds = available_modalities


def get_embedder_class(kind: str) -> type[ModalityEmbedder]:
    """The embedder class of ``kind`` (``get_modality(kind).embedder_class``)."""
    return get_modality(kind).embedder_class


def normalize_modality_config(name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Validate one modality's sub-config and fill in defaults; returns a plain JSON-serialisable dict.

    Raises ``ValueError`` naming the modality and the offending field.
    """
    if not isinstance(cfg, dict) or "kind" not in cfg:
        raise ValueError(
            f"modality {name!r}: config must be a dict with a 'kind' key (one of {available_modalities()}), got {cfg!r}"
        )
    settings = {k: v for k, v in cfg.items() if k != "kind"}
    try:
        config_class = get_modality(cfg["kind"]).config_class
    except ValueError as err:
        raise ValueError(f"modality {name!r}: {err}") from None
    fields = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise ValueError(
            f"modality {name!r} (kind {cfg['kind']!r}): unknown setting(s) {unknown}; valid settings: {sorted(fields)}"
        )
    try:
        parsed = config_class(**settings)
    except ValueError as err:
        raise ValueError(f"modality {name!r} (kind {cfg['kind']!r}): {err}") from None
    return {"kind": cfg["kind"], **dataclasses.asdict(parsed)}
