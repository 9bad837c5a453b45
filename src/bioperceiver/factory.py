"""Named architecture presets stored as JSON data, and ``create_model``/``list_models`` (timm-style)."""

from __future__ import annotations

import copy
import fnmatch
import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from .configuration_bioperceiver import BioPerceiverConfig
from .modeling_bioperceiver import BioPerceiverModel, BioPerceiverPreTrainedModel


@cache
def _presets() -> dict[str, dict[str, Any]]:
    folder = resources.files("bioperceiver") / "presets"
    return {
        entry.name.removesuffix(".json"): json.loads(entry.read_text())
        for entry in folder.iterdir()
        if entry.name.endswith(".json")
    }


def list_models(pattern: str = "*") -> list[str]:
    """Names of the shipped presets matching a shell-style ``pattern``, sorted."""
    return sorted(name for name in _presets() if fnmatch.fnmatch(name, pattern))


def preset_config(name: str) -> dict[str, Any]:
    """A copy of a preset's config dict: a shipped preset name, or a path to a JSON file of the same shape."""
    if name in _presets():
        return copy.deepcopy(_presets()[name])
    path = Path(name)
    if path.suffix == ".json" and path.is_file():
        return json.loads(path.read_text())
    raise ValueError(f"unknown preset {name!r}; available: {list_models()} (or give a path to a .json config)")


def create_config(name: str, **overrides: Any) -> BioPerceiverConfig:
    """Build a :class:`BioPerceiverConfig` from a preset, with keyword overrides.

    ``modalities=`` replaces the preset's modality set as a whole; ``modality_overrides={"text": {...}}`` updates
    settings of individual modalities (a modality not in the preset is added).
    """
    cfg = preset_config(name)
    patch = overrides.pop("modality_overrides", None) or {}
    cfg.update(overrides)
    modalities = copy.deepcopy(cfg.get("modalities") or {})
    for modality, settings in patch.items():
        modalities.setdefault(modality, {}).update(settings)
    cfg["modalities"] = modalities
    return BioPerceiverConfig(**cfg)


def create_model(
    name: str, model_class: type[BioPerceiverPreTrainedModel] = BioPerceiverModel, **overrides: Any
) -> BioPerceiverPreTrainedModel:
    """Create a randomly initialised model from a preset name (see :func:`list_models`) with overrides.

    Example::

        model = create_model("bioperceiver_small", num_latents=64,
                             modalities={"image_cxr": {"kind": "image"}, "text": {"kind": "text"}})
    """
    return model_class(create_config(name, **overrides))


__all__ = ["create_config", "create_model", "list_models", "preset_config"]
