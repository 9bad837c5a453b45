"""Signal processor: channel vocabulary, resampling (scipy), per-channel normalisation, windows, time stamps."""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from ...data.errors import DataError
from ..processor import ModalityProcessor, check_finite
from ..spec import NPY_FIX, NpyFileError, describe_failure, load_npy

logger = logging.getLogger(__name__)

NORMALIZATIONS = ("per_channel", "dataset", "none")


@dataclass
class SignalSettings:
    """Settings of the signal processor.

    Args:
        target_rate: resample regularly sampled recordings to this rate in Hz (``scipy.signal.resample_poly``);
            ``None`` keeps each file's rate. Irregularly sampled recordings (time stamps) are never resampled.
        window_s: length of the window returned per sample in seconds (``None``: the whole referenced segment).
            With ``train=True`` the window starts at a random offset inside the segment (a view), otherwise at
            its start.
        normalization: ``"per_channel"`` (z-score each channel of each window), ``"dataset"`` (per channel name,
            mean/std fitted on the training split) or ``"none"``.
        default_rate: sampling rate for ``.npy`` files without a sidecar and ``.csv`` files without a ``time`` column.
        max_channels: cap on the channel vocabulary (most frequent first).
        unknown_channel: ``"count"`` (a channel not in the vocabulary is left out and counted) or ``"error"``.
        nan_policy: ``"error"`` or ``"interpolate"`` (linear interpolation over NaN gaps per channel).
        max_fit_samples: recordings read by ``fit`` for ``normalization="dataset"`` statistics.
    """

    target_rate: float | None = None
    window_s: float | None = None
    normalization: str = "per_channel"
    default_rate: float | None = None
    max_channels: int | None = None
    unknown_channel: str = "count"
    nan_policy: str = "error"
    max_fit_samples: int = 256

    def __post_init__(self):
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.unknown_channel not in ("count", "error"):
            raise ValueError(f"unknown_channel must be 'count' or 'error', got {self.unknown_channel!r}")
        if self.nan_policy not in ("error", "interpolate"):
            raise ValueError(f"nan_policy must be 'error' or 'interpolate', got {self.nan_policy!r}")
        for k in ("target_rate", "window_s", "default_rate"):
            v = getattr(self, k)
            if v is not None and not v > 0:
                raise ValueError(f"{k} must be positive or None, got {v}")


@dataclass
class Recording:
    values: np.ndarray  # (C, T) float
    channels: list[str]
    sampling_rate: float | None = None
    timestamps: np.ndarray | None = None  # (T,) seconds, for irregular sampling

    @property
    def duration(self) -> float:
        if self.timestamps is not None:
            return float(self.timestamps[-1] - self.timestamps[0]) if len(self.timestamps) else 0.0
        return self.values.shape[1] / self.sampling_rate


def read_recording(path: Path, default_rate: float | None, proc: ModalityProcessor) -> Recording:
    """Read ``.npy`` (+ ``.json`` sidecar), ``.npz``, ``.csv`` or ``.edf`` into a :class:`Recording`.

    Recordings are cached per process (keyed by path and modification time; read-only arrays), because manifests
    usually reference many windows of one long recording: re-reading a 25-minute file for every 10-second window
    cost ~90% of the processing time."""
    stat = path.stat()
    return _read_recording_cached(str(path), stat.st_mtime_ns, stat.st_size, default_rate, proc)


@functools.lru_cache(maxsize=8)
def _read_recording_cached(path_str, mtime_ns, size, default_rate, proc) -> Recording:
    rec = _read_recording(Path(path_str), default_rate, proc)
    rec.values.flags.writeable = False
    if rec.timestamps is not None:
        rec.timestamps.flags.writeable = False
    return rec


def _read_recording(path: Path, default_rate: float | None, proc: ModalityProcessor) -> Recording:
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            values = load_npy(path)
            side = Path(str(path) + ".json")
            meta = json.loads(side.read_text()) if side.exists() else {}
            values = np.atleast_2d(values)
            channels = meta.get("channels") or [f"ch{i}" for i in range(values.shape[0])]
            rate = meta.get("sampling_rate", default_rate)
            ts = np.asarray(meta["timestamps"], dtype=np.float64) if "timestamps" in meta else None
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                values = np.atleast_2d(z["values"])
                channels = [str(c) for c in z["channels"]] if "channels" in z else None
                rate = float(z["sampling_rate"]) if "sampling_rate" in z else default_rate
                ts = np.asarray(z["timestamps"], dtype=np.float64) if "timestamps" in z else None
            channels = channels or [f"ch{i}" for i in range(values.shape[0])]
        elif suffix in (".csv", ".tsv"):
            import pandas as pd

            table = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
            ts = table.pop("time").to_numpy(np.float64) if "time" in table else None
            channels = [str(c) for c in table.columns]
            values = table.to_numpy(np.float64).T
            rate = None if ts is not None else default_rate
        elif suffix == ".edf":
            values, channels, rate = _read_edf(path, proc)
            ts = None
        else:
            raise proc.error(
                "unsupported_format", f"signal file {path.name} has an unsupported format", "use .npy/.npz/.csv/.edf"
            )
    except DataError:
        raise
    except NpyFileError as err:
        raise proc.error("corrupt_file", str(err), NPY_FIX) from None
    except Exception as err:
        raise proc.error(
            "unreadable_signal", f"cannot read {path} ({describe_failure(err)})", "re-export the recording"
        ) from None
    if values.dtype.kind not in "fiub":
        raise proc.error("bad_dtype", f"{path.name} holds {values.dtype} values", "store numbers")
    if values.size == 0:
        raise proc.error(
            "empty_signal",
            f"{path.name} holds values of shape {values.shape} (no samples or no channels)",
            "store values as (channels, time) with at least one sample, or set the cell to null",
        )
    values = values.astype(np.float64)
    if len(channels) != values.shape[0]:
        raise proc.error(
            "wrong_shape",
            f"{path.name}: {values.shape[0]} channels but {len(channels)} channel names",
            "store values as (channels, time) with one name per channel",
        )
    if ts is not None:
        if ts.shape != (values.shape[1],):
            raise proc.error("wrong_shape", f"{path.name}: {len(ts)} time stamps for {values.shape[1]} samples", "")
        if np.any(np.diff(ts) < 0) or not np.isfinite(ts).all():
            raise proc.error("bad_timestamps", f"{path.name}: time stamps not finite/increasing", "sort by time")
        return Recording(values, channels, None, ts)
    if rate is None:
        raise proc.error(
            "no_sampling_rate",
            f"{path.name} has no sampling rate",
            "add a sidecar <file>.json with sampling_rate, or set the processor's default_rate",
        )
    return Recording(values, channels, float(rate), None)


def _read_edf(path: Path, proc: ModalityProcessor):
    try:
        import pyedflib
    except ImportError:
        raise proc.error(
            "missing_dependency", f"reading {path.name} needs pyedflib", "pip install pyedflib, or convert to .npz"
        ) from None
    with pyedflib.EdfReader(str(path)) as f:
        rates = {f.getSampleFrequency(i) for i in range(f.signals_in_file)}
        if len(rates) != 1:
            raise proc.error(
                "mixed_rates", f"{path.name} mixes sampling rates {sorted(rates)}", "split channels by rate"
            )
        values = np.stack([f.readSignal(i) for i in range(f.signals_in_file)])
        return values, f.getSignalLabels(), float(rates.pop())


def window_references(path: str, duration_s: float, window_s: float, stride_s: float) -> list[str]:
    """Manifest cells ``path#start=..&duration=..`` cutting a recording of ``duration_s`` into windows."""
    if window_s <= 0 or stride_s <= 0:
        raise ValueError("window_s and stride_s must be positive")
    refs, start = [], 0.0
    while start + window_s <= duration_s + 1e-9:
        refs.append(f"{path}#start={start:g}&duration={window_s:g}")
        start += stride_s
    return refs


class SignalProcessor(ModalityProcessor):
    """Recording reference -> ``values (C, T)`` float32, ``channel_ids (C,)`` and ``sampling_rate`` (float) or
    ``timestamps (T,)`` (seconds from the window start)."""

    kind = "signal"
    Settings = SignalSettings

    def __init__(self, name=None, **settings):
        super().__init__(name, **settings)
        self._index: dict[str, int] = {}

    def load(self, value, base_dir: Path | None) -> Recording:
        from ...data.manifest import parse_reference

        if not isinstance(value, (str, Path)):
            raise self.error("bad_type", f"expected a signal file path, got {type(value).__name__}", "")
        ref = parse_reference(str(value), base_dir)
        if not ref.path.exists():
            raise self.error("missing_file", f"signal file {ref.path} does not exist", "fix the path")
        rec = read_recording(ref.path, self.settings.default_rate, self)
        try:
            start = float(ref.options.get("start", 0.0))
            dur = float(ref.options["duration"]) if "duration" in ref.options else None
        except ValueError:
            raise self.error(
                "bad_reference", f"bad window in {value!r}", "use #start=SECONDS&duration=SECONDS"
            ) from None
        if start or dur is not None:
            rec = self._slice(rec, start, dur, str(value))
        return rec

    def _slice(self, rec: Recording, start: float, dur: float | None, what: str) -> Recording:
        if start < 0 or (dur is not None and dur <= 0) or start > rec.duration + 1e-9:
            raise self.error(
                "bad_window",
                f"window start={start} duration={dur} outside the recording ({rec.duration:.3f} s) in {what}",
                "fix the #start/#duration reference",
            )
        if rec.timestamps is not None:
            t0 = rec.timestamps[0] + start
            keep = rec.timestamps >= t0
            if dur is not None:
                keep &= rec.timestamps < t0 + dur
            return Recording(rec.values[:, keep], rec.channels, None, rec.timestamps[keep])
        i0 = round(start * rec.sampling_rate)
        i1 = rec.values.shape[1] if dur is None else i0 + round(dur * rec.sampling_rate)
        if i1 > rec.values.shape[1] + 1:
            raise self.error(
                "bad_window", f"window ends after the recording ({rec.duration:.3f} s) in {what}", "fix the reference"
            )
        return Recording(rec.values[:, i0:i1], rec.channels, rec.sampling_rate, None)

    def _clean(self, rec: Recording) -> Recording:
        if rec.values.shape[1] == 0:
            raise self.error("empty_signal", "the recording (window) has no samples", "exclude it or fix the window")
        if not np.isfinite(rec.values).all():
            if self.settings.nan_policy == "error" or np.isinf(rec.values).any():
                check_finite(self, rec.values, "the signal", "clean the recording or set nan_policy='interpolate'")
            values = rec.values.copy()
            x = np.arange(values.shape[1])
            for c in range(values.shape[0]):
                bad = np.isnan(values[c])
                if bad.all():
                    raise self.error("non_finite", f"channel {rec.channels[c]!r} is all NaN", "drop the channel")
                values[c, bad] = np.interp(x[bad], x[~bad], values[c, ~bad])
            rec = Recording(values, rec.channels, rec.sampling_rate, rec.timestamps)
        if self.settings.target_rate and rec.timestamps is None and rec.sampling_rate != self.settings.target_rate:
            from scipy.signal import resample_poly

            frac = Fraction(self.settings.target_rate / rec.sampling_rate).limit_denominator(1000)
            values = resample_poly(rec.values, frac.numerator, frac.denominator, axis=1)
            rec = Recording(values, rec.channels, float(self.settings.target_rate), None)
        return rec

    def _fit(self, values, sample_ids, base_dir):
        from collections import Counter

        counts: Counter = Counter()
        sums: dict[str, list[float]] = {}
        for i, (v, sid) in enumerate(zip(values, sample_ids)):
            try:
                rec = self.load(v, base_dir)
                counts.update(rec.channels)
                if self.settings.normalization == "dataset" and i < self.settings.max_fit_samples:
                    rec = self._clean(rec)
                    for c, name in enumerate(rec.channels):
                        s = sums.setdefault(name, [0.0, 0.0, 0.0])
                        s[0] += rec.values[c].sum()
                        s[1] += (rec.values[c] ** 2).sum()
                        s[2] += rec.values.shape[1]
            except Exception as err:
                raise (err.located(sample_id=sid) if hasattr(err, "located") else err) from None
        names = sorted(counts, key=lambda c: (-counts[c], c))
        if self.settings.max_channels:
            names = names[: self.settings.max_channels]
        self.state = {"channels": sorted(names), "fitted_on": len(values)}
        if self.settings.normalization == "dataset":
            stats = {}
            for name, (s1, s2, n) in sums.items():
                mean = s1 / n
                stats[name] = [mean, max(math.sqrt(max(s2 / n - mean**2, 0.0)), 1e-8)]
            self.state["stats"] = stats
        self._on_load()

    # ---- federated fit: channel counts (union) and per-channel sums of the first max_fit_samples per site ------
    def _site_statistics(self, values, sample_ids, base_dir):
        counts: dict[str, int] = {}
        sums: dict[str, list[float]] = {}
        for i, (v, sid) in enumerate(zip(values, sample_ids)):
            try:
                rec = self.load(v, base_dir)
                for c in rec.channels:
                    counts[c] = counts.get(c, 0) + 1
                if self.settings.normalization == "dataset" and i < self.settings.max_fit_samples:
                    rec = self._clean(rec)
                    for c, name in enumerate(rec.channels):
                        s = sums.setdefault(name, [0.0, 0.0, 0.0])
                        s[0] += float(rec.values[c].sum())
                        s[1] += float((rec.values[c] ** 2).sum())
                        s[2] += rec.values.shape[1]
            except Exception as err:
                raise (err.located(sample_id=sid) if hasattr(err, "located") else err) from None
        return {"fitted_on": len(values), "channels": counts, "sums": sums}

    def _fit_from_statistics(self, merged, query):
        counts = merged["channels"]
        names = sorted(counts, key=lambda c: (-counts[c], c))
        if self.settings.max_channels:
            names = names[: self.settings.max_channels]
        self.state = {"channels": sorted(names), "fitted_on": int(merged["fitted_on"])}
        if self.settings.normalization == "dataset":
            stats = {}
            for name, (s1, s2, n) in merged.get("sums", {}).items():
                mean = s1 / n
                stats[name] = [mean, max(math.sqrt(max(s2 / n - mean**2, 0.0)), 1e-8)]
            self.state["stats"] = stats
        self._on_load()

    def _on_load(self):
        self._index = {c: i for i, c in enumerate(self.state.get("channels", []))}

    def _process(self, value, *, sample_id, base_dir, train, rng):
        rec = self._clean(self.load(value, base_dir))
        w = self.settings.window_s
        if w is not None and rec.duration > w:
            offset = float(rng.uniform(0, rec.duration - w)) if train else 0.0
            rec = self._slice(rec, offset, w, str(value))
            if rec.values.shape[1] == 0:
                raise self.error("empty_signal", "the window has no samples", "")
        ids = np.array([self._index.get(c, -1) for c in rec.channels], dtype=np.int64)
        if (ids < 0).any():
            unknown = [c for c, i in zip(rec.channels, ids) if i < 0]
            if self.settings.unknown_channel == "error" or (ids < 0).all():
                raise self.error(
                    "unknown_channel",
                    f"channel(s) {unknown} not in the fitted vocabulary {list(self._index)[:10]}",
                    "rename channels consistently or refit the processor",
                )
            self.counters["unknown_channels"] += len(unknown)
        values = rec.values[ids >= 0]
        channels = [c for c, i in zip(rec.channels, ids) if i >= 0]
        ids = ids[ids >= 0]
        if self.settings.normalization == "per_channel":
            mean = values.mean(axis=1, keepdims=True)
            std = values.std(axis=1, keepdims=True)
            values = (values - mean) / np.where(std > 1e-8, std, 1.0)
        elif self.settings.normalization == "dataset":
            stats = np.array([self.state["stats"].get(c, [0.0, 1.0]) for c in channels])
            values = (values - stats[:, :1]) / stats[:, 1:]
        out = {"values": values.astype(np.float32), "channel_ids": ids}
        if rec.timestamps is not None:
            out["timestamps"] = (rec.timestamps - rec.timestamps[0]).astype(np.float32)
        else:
            out["sampling_rate"] = np.float32(rec.sampling_rate)
        return out

    def model_settings(self):
        return {"kind": "signal", "num_channels": max(1, len(self.state["channels"]))}
