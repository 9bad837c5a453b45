"""Results files as strict JSON: what every JSON reader parses (``jq``, ``JSON.parse``, dashboards), not Python's
``NaN``/``Infinity`` extensions."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


def finite_or_none(obj: Any) -> Any:
    """``obj`` with numpy scalars and arrays made plain and every non-finite float (NaN, +-inf) replaced by ``None``
    (JSON ``null``: a metric that is not defined, e.g. a C-index without a comparable pair, or a conformal threshold
    that is infinite because the calibration set is too small for the level), recursively through mappings and
    sequences."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return finite_or_none(obj.tolist())
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps(obj: Any, *, indent: int | None = 1, default=str) -> str:
    """``json.dumps`` of :func:`finite_or_none` (``obj``), strict (``allow_nan=False``); ``default`` turns other
    objects (paths, dates) into text."""
    return json.dumps(finite_or_none(obj), indent=indent, default=default, allow_nan=False)
