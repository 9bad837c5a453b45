"""``tabular`` spec: ``{feature: value}`` -> one token per measured feature; tokens map back to
``name = value`` in the original units."""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any

import torch

from ...data.errors import Problem
from ..spec import ArraySpec, LinearInputs, ModalitySpec
from .embedder import TabularEmbedder
from .processor import TabularProcessor


class TabularSpec(ModalitySpec):
    """A cell is a ``{feature: value}`` mapping (or its JSON): numbers are numeric features, strings categorical,
    null means not measured. A processed sample is ``feature_ids``, ``values`` and ``category_ids`` (F,)."""

    kind = "tabular"
    processor_class = TabularProcessor
    embedder_class = TabularEmbedder
    arrays = MappingProxyType(
        {
            "feature_ids": ArraySpec(torch.long, doc="index into the fitted features (F,)"),
            "values": ArraySpec(torch.float32, doc="standardised numeric value, 0 for categorical (F,)"),
            "category_ids": ArraySpec(torch.long, required=False, doc="category code, 0 for numeric (F,)"),
        }
    )
    cell_forms = ("mapping",)
    token_unit = "feature"
    linear_inputs = LinearInputs("feature_ids", "num_features", "category_ids", "num_categories")

    def check_mapping(self, mapping):
        out = []
        bad = [k for k, x in mapping.items() if isinstance(x, float) and math.isinf(x)]
        if bad:
            out.append(
                Problem("non_finite", f"{len(bad)} value(s) inf, e.g. {bad[:3]}", "use null for unmeasured values")
            )
        nested = [k for k, x in mapping.items() if isinstance(x, (dict, list, tuple))]
        if nested:
            out.append(
                Problem(
                    "non_scalar",
                    f"{len(nested)} value(s) are lists or mappings, e.g. {nested[:3]}",
                    "store one number (numeric) or one string (categorical) per feature",
                )
            )
        return out

    def token_labels(self, attribution, modality):
        proc = attribution.processors.get(modality)
        arrays = attribution.inputs[modality]
        return [
            [f"{feature_name(proc, f)} = {feature_value(proc, arrays, s, j)}" for j, f in enumerate(row)]
            for s, row in enumerate(arrays["feature_ids"].tolist())
        ]

    def describe(self, arrays):
        return "features", len(arrays["feature_ids"])


def _features(proc) -> list[dict] | None:
    return (getattr(proc, "state", None) or {}).get("features")


def feature_name(proc: Any, fid: int) -> str:
    """Name of feature ``fid`` from the fitted processor (``"feature <fid>"`` without one)."""
    features = _features(proc)
    return features[fid]["name"] if features is not None and fid < len(features) else f"feature {fid}"


def feature_value(proc: Any, arrays: dict, sample: int, j: int) -> str:
    """Token ``j`` of ``sample``'s value as a person reads it: original units for numeric features (with the
    fitted processor), the category's name for categorical ones."""
    fid = int(arrays["feature_ids"][sample, j])
    cat = int(arrays["category_ids"][sample, j]) if arrays.get("category_ids") is not None else 0
    value = float(arrays["values"][sample, j])
    features = _features(proc)
    info = features[fid] if features is not None and fid < len(features) else None
    if cat == 0:
        if info is not None and info.get("type") == "numeric":
            return f"{value * info['scale'] + info['center']:.4g}"
        return f"{value:.3g} (standardised)"
    if info is not None and info.get("type") == "categorical":
        k = cat - info["unknown_id"] - 1
        return info["categories"][k] if 0 <= k < len(info["categories"]) else "unknown"
    return f"category {cat}"
