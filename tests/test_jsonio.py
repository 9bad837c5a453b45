"""Results files are strict JSON: NaN and infinities (an undefined metric, an infinite conformal threshold) are
written as null, numpy scalars and arrays as plain numbers, so any JSON reader parses them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bioperceiver.jsonio import dumps, finite_or_none


def _strict(text: str):
    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_values_become_null_and_numpy_becomes_plain():
    data = {
        "conformal_qhat": math.inf,
        "td_auc": float("nan"),
        "auroc": np.float32(0.75),
        "n": np.int64(3),
        "per_fold": np.array([0.5, np.nan, -np.inf]),
        "nested": [{"ci": (np.float64(0.1), math.nan)}],
        "ok": True,
    }
    back = _strict(dumps(data))
    assert back == {
        "conformal_qhat": None,
        "td_auc": None,
        "auroc": 0.75,
        "n": 3,
        "per_fold": [0.5, None, None],
        "nested": [{"ci": [0.1, None]}],
        "ok": True,
    }
    assert finite_or_none(2.5) == 2.5 and finite_or_none("text") == "text"
    with pytest.raises(AssertionError, match="NaN"):
        _strict(json.dumps({"x": math.nan}))  # what json.dumps writes by default
