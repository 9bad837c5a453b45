"""Batch collation: pad each modality to the longest in the batch, keep-masks, presence, modality dropout."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .errors import DataError, SkipReport, check_on_error

logger = logging.getLogger(__name__)

# Per kind: the array keys a processor emits, their dtype and rank (without batch), the keys padded along.
_SPECS: dict[str, dict[str, tuple[torch.dtype, int]]] = {
    "text": {"input_ids": (torch.long, 1), "attention_mask": (torch.long, 1)},
    "image": {"pixel_values": (torch.float32, -1)},
    "omics": {"gene_ids": (torch.long, 1), "values": (torch.float32, 1)},
    "signal": {"values": (torch.float32, 2), "channel_ids": (torch.long, 1), "timestamps": (torch.float32, 1)},
    "tabular": {"feature_ids": (torch.long, 1), "values": (torch.float32, 1), "category_ids": (torch.long, 1)},
}


class BioPerceiverCollator:
    """Collate processed samples (the output of :class:`BioPerceiverProcessor`) into a model batch.

    Returns ``{"inputs": {modality: {key: tensor}}, "sample_id": [...], "patient_id": [...], "labels": {...}}``
    (``labels`` only when ``label_columns`` is given). Absent modalities: all-false keep-masks (``present=False``
    for images); a modality absent from every sample of the batch is left out of ``inputs``. A modality with zero
    tokens (e.g. every lab missing) counts as absent.

    Args:
        modalities: ``{name: kind}`` (e.g. ``processor.modalities``).
        modality_dropout: probability of hiding a present modality from a sample during training, one float for
            all or ``{name: p}``; the last present modality of a sample is never dropped.
        label_columns: label keys to collate into tensors (numbers; lists of strings stay lists).
        on_error: ``"raise"`` or ``"skip"`` (bad samples are left out and counted in ``report``).
        seed: seed of the dropout RNG (mixed with the DataLoader worker id).
        pad_to_multiple_of: round padded lengths up (helps kernels and compilation).
    """

    def __init__(
        self,
        modalities: Mapping[str, str],
        *,
        modality_dropout: float | Mapping[str, float] = 0.0,
        label_columns: Sequence[str] | None = None,
        on_error: str = "raise",
        seed: int = 0,
        pad_to_multiple_of: int | None = None,
    ):
        self.modalities = dict(modalities)
        unknown = {k for k in self.modalities.values() if k not in _SPECS}
        if unknown:
            raise ValueError(f"no collation rule for modality kind(s) {sorted(unknown)}")
        if isinstance(modality_dropout, Mapping):
            bad = set(modality_dropout) - set(self.modalities)
            if bad:
                raise ValueError(f"modality_dropout names unknown modalities {sorted(bad)}")
            self.dropout = {m: float(modality_dropout.get(m, 0.0)) for m in self.modalities}
        else:
            self.dropout = dict.fromkeys(self.modalities, float(modality_dropout))
        if any(not 0.0 <= p < 1.0 for p in self.dropout.values()):
            raise ValueError(f"modality_dropout probabilities must lie in [0, 1): {self.dropout}")
        self.label_columns = list(label_columns or [])
        self.on_error = check_on_error(on_error)
        self.seed = seed
        self.pad_to_multiple_of = pad_to_multiple_of
        self.report = SkipReport()
        self._calls = 0
        self._rng: np.random.Generator | None = None

    # ---- per-sample checks --------------------------------------------------------------------------------------
    def _check(self, sample: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray] | None]:
        sid = sample.get("sample_id")
        out = {}
        for name, kind in self.modalities.items():
            arrays = sample.get(name)
            if arrays is None:
                out[name] = None
                continue
            if not isinstance(arrays, Mapping):
                raise DataError(
                    "bad_type", f"expected a dict of arrays, got {type(arrays).__name__}", sample_id=sid, modality=name
                )
            conv = {}
            for key, value in arrays.items():
                if value is None:  # e.g. no time stamps for a fixed-rate recording (Arrow rows)
                    continue
                if key == "sampling_rate":
                    conv[key] = np.asarray(value, dtype=np.float64).reshape(())
                    continue
                if key not in _SPECS[kind]:
                    raise DataError(
                        "unknown_key",
                        f"unexpected array {key!r} for a {kind} modality",
                        sample_id=sid,
                        modality=name,
                        fix=f"processors of kind {kind} emit {sorted(_SPECS[kind])}",
                    )
                arr = np.asarray(value)
                if arr.dtype == object or arr.dtype.kind not in "biuf":
                    raise DataError(
                        "bad_dtype",
                        f"{key} has dtype {arr.dtype} (ragged or non-numeric)",
                        sample_id=sid,
                        modality=name,
                        fix="pass numeric arrays of the documented shape",
                    )
                _, rank = _SPECS[kind][key]
                if rank > 0 and arr.ndim != rank:
                    raise DataError(
                        "wrong_shape",
                        f"{key} has shape {arr.shape}, expected {rank} dimension(s)",
                        sample_id=sid,
                        modality=name,
                        fix="re-run the processor for this modality",
                    )
                if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                    raise DataError(
                        "non_finite", f"{key} contains NaN/inf", sample_id=sid, modality=name, fix="clean the input"
                    )
                conv[key] = arr
            first = next(iter(_SPECS[kind]))
            if first not in conv and not (kind == "signal" and "values" in conv):
                raise DataError("missing_key", f"missing {first!r}", sample_id=sid, modality=name)
            out[name] = None if num_tokens(kind, conv) == 0 else conv
        if all(v is None for v in out.values()):
            raise DataError(
                "no_modality", "the sample has no modality with any token", sample_id=sid, fix="drop the sample"
            )
        return out

    def _generator(self, features=None) -> np.random.Generator:
        seeds = [f.get("__view_seed__") for f in features or []]
        if seeds and all(s is not None for s in seeds):  # reproducible per batch content (exact resume)
            return np.random.default_rng([self.seed, *map(int, seeds)])
        if self._rng is None:
            info = torch.utils.data.get_worker_info()
            worker = info.id if info is not None else 0
            self._rng = np.random.default_rng([self.seed, worker])
        return self._rng

    def _drop(self, present: list[str], rng: np.random.Generator) -> set[str]:
        if len(present) < 2 or not any(self.dropout[m] > 0 for m in present):
            return set()
        dropped = {m for m in present if rng.random() < self.dropout[m]}
        if len(dropped) == len(present):  # keep one, chosen uniformly among the dropped
            dropped.discard(present[int(rng.integers(len(present)))])
        return dropped

    # ---- collation ----------------------------------------------------------------------------------------------
    def __call__(self, features: Sequence[Mapping[str, Any]], *, train: bool = True) -> dict[str, Any] | None:
        self._calls += 1
        kept, checked = [], []
        for sample in features:
            try:
                if sample.get("__error__") is not None:  # a dataset that skipped this row hands its error on
                    raise sample["__error__"]
                checked.append(self._check(sample))
                kept.append(sample)
            except DataError as err:
                if self.on_error == "raise":
                    raise
                self.report.add(err)
                logger.warning("skipped: %s", err)
        if not kept:
            return None
        if train:
            rng = self._generator(kept)
            for arrays in checked:
                for m in self._drop([m for m, a in arrays.items() if a is not None], rng):
                    arrays[m] = None
        inputs = {}
        for name, kind in self.modalities.items():
            column = [a[name] for a in checked]
            if all(a is None for a in column):
                continue
            inputs[name] = self._collate(name, kind, column, [s.get("sample_id") for s in kept])
        batch: dict[str, Any] = {
            "inputs": inputs,
            "sample_id": [s.get("sample_id") for s in kept],
            "patient_id": [s.get("patient_id") for s in kept],
        }
        if self.label_columns:
            batch["labels"] = {c: _collate_label(c, [s.get(c) for s in kept]) for c in self.label_columns}
        return batch

    def _pad_len(self, n: int) -> int:
        m = self.pad_to_multiple_of
        n = max(n, 1)
        return n if not m else -(-n // m) * m

    def _collate(self, name, kind, column, ids) -> dict[str, torch.Tensor]:
        b = len(column)
        if kind == "image":
            shapes = {a["pixel_values"].shape for a in column if a is not None}
            if len(shapes) > 1:
                raise DataError(
                    "shape_mismatch",
                    f"images of different shapes in one batch: {sorted(shapes)} (samples {ids})",
                    modality=name,
                    fix="give the image processor a fixed spatial_size",
                )
            shape = shapes.pop()
            px = torch.zeros((b, *shape), dtype=torch.float32)
            present = torch.zeros(b, dtype=torch.bool)
            for i, a in enumerate(column):
                if a is not None:
                    px[i] = torch.from_numpy(np.asarray(a["pixel_values"], dtype=np.float32))
                    present[i] = True
            return {"pixel_values": px, "present": present}
        if kind == "signal":
            return self._collate_signal(name, column, ids)
        keys = list(_SPECS[kind])
        length = self._pad_len(max(len(a[keys[0]]) for a in column if a is not None))
        out = {k: torch.zeros((b, length), dtype=_SPECS[kind][k][0]) for k in keys}
        mask = torch.zeros((b, length), dtype=torch.bool)
        for i, a in enumerate(column):
            if a is None:
                continue
            n = len(a[keys[0]])
            for k in keys:
                if k in a:
                    if len(a[k]) != n:
                        raise DataError(
                            "wrong_shape",
                            f"{k} has {len(a[k])} entries, {keys[0]} {n}",
                            sample_id=ids[i],
                            modality=name,
                        )
                    out[k][i, :n] = torch.as_tensor(a[k], dtype=_SPECS[kind][k][0])
            mask[i, :n] = True
        if kind == "text":
            given = out["attention_mask"].bool() if _has(column, "attention_mask") else mask
            out["attention_mask"] = (mask & given).long()
        else:
            out["mask"] = mask
        if kind == "tabular" and not _has(column, "category_ids"):
            del out["category_ids"]
        return out

    def _collate_signal(self, name, column, ids) -> dict[str, torch.Tensor]:
        b = len(column)
        present = [a for a in column if a is not None]
        c_max = self._pad_len(max(a["values"].shape[0] for a in present))
        t_max = self._pad_len(max(a["values"].shape[1] for a in present))
        irregular = ["timestamps" in a for a in present]
        if any(irregular) and not all(irregular):
            raise DataError(
                "mixed_sampling",
                f"one batch mixes time-stamped and fixed-rate recordings (samples {ids})",
                modality=name,
                fix="give every recording of this modality time stamps, or resample all to a fixed rate",
            )
        values = torch.zeros((b, c_max, t_max), dtype=torch.float32)
        channel_ids = torch.zeros((b, c_max), dtype=torch.long)
        channel_mask = torch.zeros((b, c_max), dtype=torch.bool)
        time_mask = torch.zeros((b, t_max), dtype=torch.bool)
        out = {"values": values, "channel_ids": channel_ids, "channel_mask": channel_mask, "time_mask": time_mask}
        if all(irregular):
            ts = torch.zeros((b, t_max), dtype=torch.float32)
            out["timestamps"] = ts
        else:
            rate = torch.ones(b, dtype=torch.float32)
            out["sampling_rate"] = rate
        for i, a in enumerate(column):
            if a is None:
                continue
            c, t = a["values"].shape
            if len(a["channel_ids"]) != c:
                raise DataError(
                    "wrong_shape",
                    f"{c} channels but {len(a['channel_ids'])} channel ids",
                    sample_id=ids[i],
                    modality=name,
                )
            values[i, :c, :t] = torch.from_numpy(np.asarray(a["values"], dtype=np.float32))
            channel_ids[i, :c] = torch.as_tensor(a["channel_ids"], dtype=torch.long)
            channel_mask[i, :c] = True
            time_mask[i, :t] = True
            if all(irregular):
                if len(a["timestamps"]) != t:
                    raise DataError("wrong_shape", "timestamps length != samples", sample_id=ids[i], modality=name)
                ts[i, :t] = torch.as_tensor(a["timestamps"], dtype=torch.float32)
            else:
                if "sampling_rate" not in a:
                    raise DataError(
                        "no_sampling_rate", "neither sampling_rate nor timestamps", sample_id=ids[i], modality=name
                    )
                rate[i] = float(a["sampling_rate"])
        return out


def num_tokens(kind: str, arrays: Mapping[str, np.ndarray]) -> int:
    """Tokens a processed modality gives the model (0 = the collator treats the modality as absent)."""
    if kind == "image":
        return int(arrays["pixel_values"].size)
    if kind == "signal":
        v = arrays["values"]
        return int(v.shape[0] * v.shape[1]) if v.ndim == 2 else 0
    return len(arrays[next(iter(_SPECS[kind]))])


def _has(column, key) -> bool:
    return any(a is not None and key in a for a in column)


def _collate_label(name: str, values: list[Any]):
    if any(v is None for v in values):
        return values  # missing labels stay a list; the task decides
    if all(isinstance(v, (bool, int, np.integer)) for v in values):
        return torch.tensor([int(v) for v in values], dtype=torch.long)
    if all(isinstance(v, (int, float, np.integer, np.floating)) for v in values):
        return torch.tensor([float(v) for v in values], dtype=torch.float32)
    return list(values)
