"""``signal`` spec: a multi-channel recording -> ``values (C, T)`` + channel ids + time; tokens are
(channel, time patch) pairs."""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch

from ...data.errors import DataError, Problem
from ..spec import NPY_FIX, ArraySpec, ModalitySpec, NpyFileError, describe_failure, npy_shape
from .embedder import SignalEmbedder
from .processor import SignalProcessor


class SignalSpec(ModalitySpec):
    """A cell is a path (``.npy`` + ``.json`` sidecar, ``.npz``, ``.csv``, ``.edf``) with optional
    ``#start=S&duration=S``; a processed sample is ``values (C, T)``, ``channel_ids (C,)`` and either a
    ``sampling_rate`` or ``timestamps (T,)``. A batch pads channels and time and holds ``channel_mask (B, C)`` and
    ``time_mask (B, T)``."""

    kind = "signal"
    processor_class = SignalProcessor
    embedder_class = SignalEmbedder
    arrays = MappingProxyType(
        {
            "values": ArraySpec(torch.float32, rank=2, pad_axes=(0, 1), doc="samples (C, T)"),
            "channel_ids": ArraySpec(torch.long, doc="index into the fitted channel vocabulary (C,)"),
            "timestamps": ArraySpec(torch.float32, required=False, doc="seconds, irregular sampling (T,)"),
            "sampling_rate": ArraySpec(torch.float32, rank=0, pad_axes=(), required=False, doc="Hz, fixed rate"),
        }
    )
    mask_key = "time_mask"
    cell_forms = ("path",)
    token_unit = "channel patch"

    def num_tokens(self, arrays):
        v = arrays["values"]
        return int(v.shape[0] * v.shape[1]) if v.ndim == 2 else 0

    def collate(self, name, column, sample_ids, pad_len):
        b = len(column)
        present = [a for a in column if a is not None]
        c_max = pad_len(max(a["values"].shape[0] for a in present))
        t_max = pad_len(max(a["values"].shape[1] for a in present))
        irregular = ["timestamps" in a for a in present]
        if any(irregular) and not all(irregular):
            raise DataError(
                "mixed_sampling",
                f"one batch mixes time-stamped and fixed-rate recordings (samples {list(sample_ids)})",
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
                    sample_id=sample_ids[i],
                    modality=name,
                )
            values[i, :c, :t] = torch.from_numpy(np.asarray(a["values"], dtype=np.float32))
            channel_ids[i, :c] = torch.as_tensor(a["channel_ids"], dtype=torch.long)
            channel_mask[i, :c] = True
            time_mask[i, :t] = True
            if all(irregular):
                if len(a["timestamps"]) != t:
                    raise DataError(
                        "wrong_shape", "timestamps length != samples", sample_id=sample_ids[i], modality=name
                    )
                ts[i, :t] = torch.as_tensor(a["timestamps"], dtype=torch.float32)
            else:
                if "sampling_rate" not in a:
                    raise DataError(
                        "no_sampling_rate",
                        "neither sampling_rate nor timestamps",
                        sample_id=sample_ids[i],
                        modality=name,
                    )
                rate[i] = float(a["sampling_rate"])
        return out

    def check_file(self, path: Path) -> list[Problem]:
        """Decode the header only: the ``.npy`` header (or the ``values`` member's header in a ``.npz``), a
        ``.csv``'s first line, an ``.edf``'s fixed header."""
        name = path.name.lower()
        try:
            if name.endswith(".npy"):
                shape = npy_shape(path)
            elif name.endswith(".npz"):
                shape = _npz_values_shape(path)
                if shape is None:
                    return [Problem("missing_values", f"{path.name} has no 'values' array", "save values=(C, T)")]
            elif name.endswith(".csv"):
                with open(path, encoding="utf-8") as f:
                    header = f.readline().strip()
                columns = [c for c in header.split(",") if c.strip() and c.strip().lower() != "time"]
                if not columns:
                    return [Problem("no_channels", f"{path.name} has no channel column", "one column per channel")]
                return []
            elif name.endswith(".edf"):
                with open(path, "rb") as f:
                    head = f.read(256)
                if len(head) < 256 or head[:8] != b"0       ":
                    return [Problem("unreadable_signal", f"{path.name} has no EDF header", "re-export the recording")]
                return []
            else:
                return []
        except NpyFileError as err:
            return [Problem("corrupt_file", str(err), NPY_FIX)]
        except Exception as err:  # any decoder failure is the finding
            return [
                Problem(
                    "unreadable_signal",
                    f"cannot decode the header of {path.name} ({describe_failure(err)})",
                    "re-export the recording",
                )
            ]
        if len(shape) not in (1, 2) or 0 in shape:
            return [
                Problem(
                    "empty_signal",
                    f"{path.name} holds values of shape {shape} (no samples or no channels)",
                    "store values as (channels, time) with at least one sample, or set the cell to null",
                )
            ]
        return []

    def check_options(self, options):
        out = []
        for key in ("start", "duration"):
            if key in options:
                try:
                    float(options[key])
                except ValueError:
                    out.append(Problem("bad_reference", f"#{key}={options[key]!r}", "use seconds"))
        return out

    def token_labels(self, attribution, modality):
        channels = (getattr(attribution.processors.get(modality), "state", None) or {}).get("channels")
        arrays = attribution.inputs[modality]
        out = []
        for s in range(attribution.scores[modality].shape[0]):
            c, p, starts = signal_layout(arrays, attribution.modality_configs[modality], s)
            cids = arrays["channel_ids"][s].tolist()
            names = [channels[i] if channels is not None and i < len(channels) else f"channel {i}" for i in cids]
            when = [f"{starts[j]:.2f} s" if starts is not None else f"patch {j}" for j in range(p)]
            out.append([f"{names[k // p]} @ {when[k % p]}" for k in range(c * p)])
        return out

    def describe(self, arrays):
        c, t = arrays["values"].shape
        return f"{c} ch x T", t


def _npz_values_shape(path: Path) -> tuple[int, ...] | None:
    from numpy.lib import format as npy_format

    with zipfile.ZipFile(path) as z:
        if "values.npy" not in z.namelist():
            return None
        with z.open("values.npy") as f:
            major, _minor = npy_format.read_magic(f)
            read = npy_format.read_array_header_1_0 if major == 1 else npy_format.read_array_header_2_0
            return tuple(read(f)[0])


def signal_layout(arrays: Mapping, config: Mapping, sample: int) -> tuple[int, int, np.ndarray | None]:
    """(channels C, time patches P, patch start times in seconds (P,) or None) of one sample of a signal batch."""
    c, t = arrays["values"].shape[1:]
    p = config["patch_size"]
    n = -(-t // p)
    starts = None
    if arrays.get("timestamps") is not None:
        ts = arrays["timestamps"][sample].double().numpy()
        starts = ts[np.arange(n) * p]
    else:
        rate = arrays.get("sampling_rate")
        rate = float(rate[sample]) if rate is not None else config.get("sampling_rate")
        if rate:
            starts = np.arange(n) * p / rate
    return c, n, starts
