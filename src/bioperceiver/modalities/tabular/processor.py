"""Tabular/EHR processor: feature vocabulary, robust numeric standardisation, categorical codes."""

from __future__ import annotations

import logging
import math
import struct
from collections import Counter
from dataclasses import dataclass

import numpy as np

from ..processor import ModalityProcessor

logger = logging.getLogger(__name__)


@dataclass
class TabularSettings:
    """Settings of the tabular processor.

    Args:
        scaling: ``"robust"`` (median and IQR/1.349 of the training split) or ``"standard"`` (mean/std).
        clip: standardised numeric values are clipped to ``[-clip, clip]`` (outliers; ``None`` disables).
        max_categories: most frequent categories kept per categorical feature; the rest share its unknown bucket.
        min_category_count: a category seen fewer times in training goes to the unknown bucket.
        min_feature_count: a feature enters the vocabulary when present in at least this many training samples.
        categorical: feature names forced to be categorical even when their values look numeric (e.g. codes).
        unknown_feature: ``"count"`` (a feature not in the vocabulary produces no token and is counted) or
            ``"error"``.
    """

    scaling: str = "robust"
    clip: float | None = 10.0
    max_categories: int = 64
    min_category_count: int = 1
    min_feature_count: int = 1
    categorical: list[str] | None = None
    unknown_feature: str = "count"

    def __post_init__(self):
        if self.scaling not in ("robust", "standard"):
            raise ValueError(f"scaling must be 'robust' or 'standard', got {self.scaling!r}")
        if self.unknown_feature not in ("count", "error"):
            raise ValueError(f"unknown_feature must be 'count' or 'error', got {self.unknown_feature!r}")


def _is_missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _as_number(v):
    if isinstance(v, bool | np.bool_):
        return float(v)
    if isinstance(v, int | float | np.integer | np.floating):
        return float(v)
    return None


class TabularProcessor(ModalityProcessor):
    """``{feature: value}`` -> ``feature_ids``, ``values`` (standardised numbers, 0 for categories) and
    ``category_ids`` (0 = numeric). A missing value (null/NaN) is no token."""

    kind = "tabular"
    vocabulary_ids = ("num_features", "feature_embeddings")  # what extend() counts as overlap
    Settings = TabularSettings

    def __init__(self, name=None, **settings):
        super().__init__(name, **settings)
        self._features: dict[str, tuple[int, dict]] = {}

    def _mapping(self, value) -> dict:
        from ...data.manifest import as_mapping

        mapping = as_mapping(value)
        if mapping is None:
            raise self.error(
                "bad_type",
                f"expected a {{feature: value}} mapping (or its JSON string), got {type(value).__name__}",
                "store tabular cells as dicts or JSON objects",
            )
        return mapping

    def _observations(self, values, sample_ids):
        """Every present (feature, raw value, number or ``None`` for a categorical value) of ``values``; a
        non-finite number is an error naming the sample."""
        forced = set(self.settings.categorical or [])
        for v, sid in zip(values, sample_ids):
            try:
                mapping = self._mapping(v)
            except Exception as err:
                raise err.located(sample_id=sid) from None
            for k, x in mapping.items():
                if _is_missing(x):
                    continue
                num = _as_number(x) if k not in forced else None
                if num is not None and not math.isfinite(num):
                    raise self.error("non_finite", f"feature {k!r} is {num}", "use null for missing").located(
                        sample_id=sid
                    )
                yield k, x, num

    def _count(self, values, sample_ids) -> tuple[Counter, dict[str, list[float]], dict[str, Counter]]:
        """Per feature: samples present, numeric values, categorical value counts."""
        present: Counter = Counter()
        numbers: dict[str, list[float]] = {}
        cats: dict[str, Counter] = {}
        for k, x, num in self._observations(values, sample_ids):
            present[k] += 1
            if num is not None:
                numbers.setdefault(k, []).append(num)
            else:
                cats.setdefault(k, Counter())[str(x)] += 1
        return present, numbers, cats

    def _feature_entries(self, names, numbers, cats, next_cat: int) -> tuple[list[dict], int]:
        """The vocabulary entries of ``names`` (categorical codes from ``next_cat`` on) and the next free code."""
        features = []
        for name in names:
            if name in cats:  # any non-numeric value makes the feature categorical
                counter = cats[name]
                for x in numbers.get(name, []):
                    counter[_fmt(x)] += 1
                kept = [
                    c
                    for c, n in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
                    if n >= self.settings.min_category_count
                ][: self.settings.max_categories]
                features.append(
                    {"name": name, "type": "categorical", "unknown_id": next_cat, "categories": sorted(kept)}
                )
                next_cat += 1 + len(kept)
            else:
                x = np.asarray(numbers[name])
                if self.settings.scaling == "robust":
                    center = float(np.median(x))
                    q1, q3 = np.percentile(x, [25, 75])
                    scale = float((q3 - q1) / 1.349)
                    if scale <= 0:
                        scale = float(x.std())
                else:
                    center, scale = float(x.mean()), float(x.std())
                features.append(
                    {"name": name, "type": "numeric", "center": center, "scale": scale if scale > 0 else 1.0}
                )
        return features, next_cat

    def _fit(self, values, sample_ids, base_dir):
        present, numbers, cats = self._count(values, sample_ids)
        names = sorted(k for k, c in present.items() if c >= self.settings.min_feature_count)
        features, next_cat = self._feature_entries(names, numbers, cats, 1)
        self.state = {"features": features, "num_categories": next_cat, "fitted_on": len(values)}
        self._on_load()

    def extend(self, values, sample_ids=None, base_dir=None, trained=None) -> dict:
        """Add the features (e.g. lab tests) a new cohort brings to a fitted processor, as tokenizers add tokens:
        features present in at least ``min_feature_count`` of ``values`` and missing from the vocabulary are
        appended (existing feature ids, scalings and category codes unchanged; new categorical codes start at the
        old ``num_categories``), their scaling and categories fitted on ``values`` (the new cohort's training rows).

        Returns ``{"added": features appended, "overlap": present features already in the vocabulary, "measured":
        distinct present features, "vocabulary_before": n, "vocabulary_after": n}``, and with ``trained`` (per
        existing feature id, whether pretraining trained its embedding) ``"overlap_trained"``."""
        if not self.is_fitted:
            raise RuntimeError(f"tabular processor {self.name!r} is not fitted: fit it before extending it")
        vals, ids = self._present(values, sample_ids)
        if not vals:
            raise self.error("no_training_values", "no non-missing value to extend the vocabulary with", "")
        present, numbers, cats = self._count(vals, ids)
        before = len(self.state["features"])
        names = sorted(
            k for k, c in present.items() if k not in self._features and c >= self.settings.min_feature_count
        )
        features, next_cat = self._feature_entries(names, numbers, cats, self.state["num_categories"])
        overlapping = [self._features[k][0] for k in present if k in self._features]
        overlap = len(overlapping)
        self.state = {
            **self.state,
            "features": [*self.state["features"], *features],
            "num_categories": next_cat,
            "extended_on": int(self.state.get("extended_on", 0)) + len(vals),
        }
        self._on_load()
        report = {
            "added": len(features),
            "overlap": overlap,
            "measured": len(present),
            "vocabulary_before": before,
            "vocabulary_after": len(self.state["features"]),
            **self._overlap_trained(overlapping, trained),
        }
        logger.info(
            "tabular processor %r extended on %d values: %d features added, %d overlapping (vocabulary %d -> %d)",
            self.name,
            len(vals),
            report["added"],
            overlap,
            before,
            report["vocabulary_after"],
        )
        return report

    # ---- federated fit: counts and sums per site; quantiles by counting (bisection), never raw values ----------
    def _site_statistics(self, values, sample_ids, base_dir):
        present: Counter = Counter()
        numeric: dict[str, list[float]] = {}
        cats: dict[str, Counter] = {}
        for k, x, num in self._observations(values, sample_ids):
            present[k] += 1
            if num is not None:
                s = numeric.setdefault(k, [0.0, 0.0, 0.0])
                s[0], s[1], s[2] = s[0] + 1, s[1] + num, s[2] + num * num
            else:
                cats.setdefault(k, Counter())[str(x)] += 1
        return {
            "fitted_on": len(values),
            "present": dict(present),
            "numeric": numeric,  # [n, sum, sum of squares]
            "categories": {k: dict(c) for k, c in cats.items()},
        }

    def _site_numbers(self, values) -> dict[str, np.ndarray]:
        forced = set(self.settings.categorical or [])
        out: dict[str, list[float]] = {}
        for v in values:
            for k, x in self._mapping(v).items():
                num = None if _is_missing(x) or k in forced else _as_number(x)
                if num is not None:
                    out.setdefault(k, []).append(num)
        return {k: np.sort(np.asarray(x, dtype=np.float64)) for k, x in out.items()}

    def _answer_query(self, values, sample_ids, base_dir, request):
        numbers = self._site_numbers(values)
        if request["op"] == "count_le":  # how many values of a feature are <= a threshold
            return {
                key: int(np.searchsorted(numbers.get(f, np.empty(0)), t, side="right"))
                for key, (f, t) in request["thresholds"].items()
            }
        if request["op"] == "numeric_categories":  # numeric values of a mixed feature, counted as categories
            out: dict[str, dict[str, int]] = {}
            for f in request["features"]:
                for x in numbers.get(f, []):
                    out.setdefault(f, {})
                    out[f][_fmt(x)] = out[f].get(_fmt(x), 0) + 1
            return out
        raise ValueError(f"unknown tabular query {request['op']!r}")

    def _fit_from_statistics(self, merged, query):
        present, numeric, cats = merged.get("present", {}), merged.get("numeric", {}), merged.get("categories", {})
        names = sorted(k for k, c in present.items() if c >= self.settings.min_feature_count)
        mixed = [n for n in names if n in cats and n in numeric]
        extra = query({"op": "numeric_categories", "features": mixed}) if mixed else {}
        robust = [n for n in names if n not in cats] if self.settings.scaling == "robust" else []
        quantiles = _federated_quartiles(query, {n: int(numeric[n][0]) for n in robust})
        features, next_cat = [], 1
        for name in names:
            if name in cats:
                counter = Counter(cats[name])
                counter.update(extra.get(name, {}))
                kept = [
                    c
                    for c, n in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
                    if n >= self.settings.min_category_count
                ][: self.settings.max_categories]
                features.append(
                    {"name": name, "type": "categorical", "unknown_id": next_cat, "categories": sorted(kept)}
                )
                next_cat += 1 + len(kept)
                continue
            n, s1, s2 = numeric[name]
            mean = s1 / n
            std = math.sqrt(max(s2 / n - mean * mean, 0.0))
            if self.settings.scaling == "robust":
                center, q1, q3 = quantiles[name]
                scale = float((q3 - q1) / 1.349)
                if scale <= 0:
                    scale = std
            else:
                center, scale = mean, std
            features.append({"name": name, "type": "numeric", "center": center, "scale": scale if scale > 0 else 1.0})
        self.state = {"features": features, "num_categories": next_cat, "fitted_on": int(merged["fitted_on"])}
        self._on_load()

    def _on_load(self):
        self._features = {}
        for i, f in enumerate(self.state.get("features", [])):
            info = dict(f)
            if f["type"] == "categorical":
                info["codes"] = {c: f["unknown_id"] + 1 + j for j, c in enumerate(f["categories"])}
            self._features[f["name"]] = (i, info)

    def _process(self, value, *, sample_id, base_dir, train, rng):
        mapping = self._mapping(value)
        fids, vals, cids = [], [], []
        clip = self.settings.clip
        for k, x in mapping.items():
            if _is_missing(x):
                continue
            if k not in self._features:
                if self.settings.unknown_feature == "error":
                    raise self.error("unknown_feature", f"feature {k!r} is not in the vocabulary", "refit or drop it")
                self.counters["unknown_features"] += 1
                continue
            i, info = self._features[k]
            if info["type"] == "numeric":
                num = _as_number(x)
                if num is None:
                    try:
                        num = float(x)
                    except (TypeError, ValueError):
                        raise self.error(
                            "bad_value", f"numeric feature {k!r} has value {x!r}", "use a number or null"
                        ) from None
                if not math.isfinite(num):
                    raise self.error("non_finite", f"feature {k!r} is {num}", "use null for a missing value")
                z = (num - info["center"]) / info["scale"]
                if clip is not None:
                    z = min(max(z, -clip), clip)
                fids.append(i)
                vals.append(z)
                cids.append(0)
            else:
                key = _fmt(x) if _as_number(x) is not None else str(x)
                code = info["codes"].get(key)
                if code is None:
                    code = info["unknown_id"]
                    self.counters["unknown_categories"] += 1
                fids.append(i)
                vals.append(0.0)
                cids.append(code)
        return {
            "feature_ids": np.asarray(fids, dtype=np.int64),
            "values": np.asarray(vals, dtype=np.float32),
            "category_ids": np.asarray(cids, dtype=np.int64),
        }

    def model_settings(self):
        return {
            "kind": "tabular",
            "num_features": max(1, len(self.state["features"])),
            "num_categories": max(2, self.state["num_categories"]),
        }

    @property
    def feature_names(self) -> list[str]:
        return [f["name"] for f in self.state.get("features", [])]


def _ordered(x: float) -> int:
    """float64 -> int with the same order (-0.0 and 0.0 both 0): bisection over every float between two values."""
    i = struct.unpack("<q", struct.pack("<d", x))[0]
    return i if i >= 0 else -(i & 0x7FFFFFFFFFFFFFFF)


def _unordered(i: int) -> float:
    bits = i if i >= 0 else (-i) | -0x8000000000000000
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def _order_statistics(query, targets: dict[str, tuple[str, int]]) -> dict[str, float]:
    """Exact ``k``-th smallest value (0-based) of each ``(feature, k)`` over all sites, by bisection over the
    floats with count queries (``count_le``): every site answers how many of its values are <= a threshold. At
    most 64 query rounds, all targets at once."""
    lo = {key: _ordered(-math.inf) for key in targets}
    hi = {key: _ordered(math.inf) for key in targets}
    while any(lo[k] < hi[k] for k in targets):
        open_ = [k for k in targets if lo[k] < hi[k]]
        mid = {k: (lo[k] + hi[k]) // 2 for k in open_}
        counts = query({"op": "count_le", "thresholds": {k: [targets[k][0], _unordered(mid[k])] for k in open_}})
        for k in open_:
            if counts.get(k, 0) >= targets[k][1] + 1:
                hi[k] = mid[k]
            else:
                lo[k] = mid[k] + 1
    return {k: _unordered(lo[k]) for k in targets}


def _lerp(a: float, b: float, t: float) -> float:  # numpy's linear interpolation, for identical quantiles
    d = b - a
    return b - d * (1 - t) if t >= 0.5 else a + d * t


def _federated_quartiles(query, sizes: dict[str, int]) -> dict[str, tuple[float, float, float]]:
    """``(median, 25th, 75th percentile)`` per feature as ``np.median`` / ``np.percentile`` give on the pooled
    values, from count queries only."""
    targets: dict[str, tuple[str, int]] = {}
    plan: dict[str, list[tuple[int, int, float]]] = {}
    for f, n in sizes.items():
        rows = []
        for q in (0.5, 0.25, 0.75):
            h = (n - 1) * q
            k = math.floor(h)
            rows.append((k, min(k + 1, n - 1), h - k))
            targets[f"{f}\x00{k}"] = (f, k)
            targets[f"{f}\x00{min(k + 1, n - 1)}"] = (f, min(k + 1, n - 1))
        plan[f] = rows
    values = _order_statistics(query, targets) if targets else {}
    out = {}
    for f, rows in plan.items():
        (k0, k1, _), *quarts = rows
        a, b = values[f"{f}\x00{k0}"], values[f"{f}\x00{k1}"]
        median = (a + b) / 2 if sizes[f] % 2 == 0 else a
        q1, q3 = (_lerp(values[f"{f}\x00{k}"], values[f"{f}\x00{j}"], t) for k, j, t in quarts)
        out[f] = (float(median), float(q1), float(q3))
    return out


def _fmt(x) -> str:
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)
