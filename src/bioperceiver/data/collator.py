"""Batch collation: pad each modality to the longest in the batch, keep-masks, presence, modality dropout."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..modalities.registry import get_modality
from .errors import DEFAULT_ON_ERROR, DataError, SkipReport, check_on_error

logger = logging.getLogger(__name__)


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
        on_error: ``"skip_modality"`` (default): a modality whose arrays are bad is left out of its sample (and a
            sample left with none is dropped), ``"skip_sample"``: a bad sample is left out, ``"raise"``. What is
            left out is counted in ``report``, including the modalities a dataset dropped (``"__skipped__"``).
        seed: seed of the dropout RNG (mixed with the DataLoader worker id).
        pad_to_multiple_of: round padded lengths up (helps kernels and compilation).
        count_tokens: also return ``num_tokens``, the real tokens of every sample after modality dropout (what the
            token-budget grouping of :func:`~bioperceiver.data.sampler.token_budget_chunks` reads).
    """

    def __init__(
        self,
        modalities: Mapping[str, str],
        *,
        modality_dropout: float | Mapping[str, float] = 0.0,
        label_columns: Sequence[str] | None = None,
        on_error: str = DEFAULT_ON_ERROR,
        seed: int = 0,
        pad_to_multiple_of: int | None = None,
        count_tokens: bool = False,
    ):
        self.modalities = dict(modalities)
        self.specs = {name: get_modality(kind) for name, kind in self.modalities.items()}  # ValueError if unknown
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
        self.count_tokens = count_tokens
        self.report = SkipReport()
        self._calls = 0
        self._rng: np.random.Generator | None = None

    # ---- per-sample checks --------------------------------------------------------------------------------------
    def _check(self, sample: Mapping[str, Any], dropped: list[DataError]) -> dict[str, dict[str, np.ndarray] | None]:
        """Checked arrays per modality (``None`` = absent); under ``skip_modality`` bad modalities are appended to
        ``dropped`` and absent."""
        sid = sample.get("sample_id")
        out = {}
        for name in self.modalities:
            arrays = sample.get(name)
            if arrays is None:
                out[name] = None
                continue
            if not isinstance(arrays, Mapping):
                raise DataError(
                    "bad_type", f"expected a dict of arrays, got {type(arrays).__name__}", sample_id=sid, modality=name
                )
            spec = self.specs[name]
            try:
                conv = spec.check_arrays(arrays, sample_id=sid, modality=name)
            except DataError as err:
                if self.on_error != "skip_modality":
                    raise
                dropped.append(err)
                out[name] = None
                continue
            out[name] = None if spec.num_tokens(conv) == 0 else conv
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
            dropped = list(sample.get("__skipped__") or ())  # modalities a dataset already left out
            try:
                if sample.get("__error__") is not None:  # a dataset that skipped this row hands its error on
                    raise sample["__error__"]
                checked.append(self._check(sample, dropped))
                kept.append(sample)
            except DataError as err:
                if self.on_error == "raise":
                    raise
                # the first time only (a bad sample comes back every epoch); a dataset's skip it already logged
                if self.report.add(err) and sample.get("__error__") is None:
                    logger.warning("skipped: %s", err)
            for err in dropped:
                self.report.add(err, scope="modality")
        if not kept:
            return None
        if train:
            rng = self._generator(kept)
            for arrays in checked:
                for m in self._drop([m for m, a in arrays.items() if a is not None], rng):
                    arrays[m] = None
        inputs = {}
        ids = [s.get("sample_id") for s in kept]
        for name, spec in self.specs.items():
            column = [a[name] for a in checked]
            if all(a is None for a in column):
                continue
            inputs[name] = spec.collate(name, column, ids, self._pad_len)
        batch: dict[str, Any] = {
            "inputs": inputs,
            "sample_id": [s.get("sample_id") for s in kept],
            "patient_id": [s.get("patient_id") for s in kept],
        }
        if self.count_tokens:
            batch["num_tokens"] = [
                sum(self.specs[m].num_tokens(a) for m, a in arrays.items() if a is not None) for arrays in checked
            ]
        if self.label_columns:
            batch["labels"] = {c: _collate_label(c, [s.get(c) for s in kept]) for c in self.label_columns}
        return batch

    def _pad_len(self, n: int) -> int:
        m = self.pad_to_multiple_of
        n = max(n, 1)
        return n if not m else -(-n // m) * m


def select_rows(
    inputs: Mapping[str, Mapping[str, torch.Tensor]], rows, kinds: Mapping[str, str] | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """The model inputs of a batch restricted to ``rows`` (batch indices, in that order), every array along its
    first (batch) axis. A modality none of the rows has stays, with all-false keep-masks (the model skips it).

    With ``kinds`` (``{modality: kind}``), a modality none of the rows has is left out (an image tensor holds every
    row, present or not), and each modality's arrays are cut to the longest of the selected rows
    (:meth:`~bioperceiver.modalities.spec.ModalitySpec.trim_padding`): a micro-batch of short notes is not padded
    to the longest note of the whole batch (gradient caching embeds such micro-batches one at a time)."""
    index = torch.as_tensor(list(rows), dtype=torch.long)
    out = {}
    for name, arrays in inputs.items():
        if kinds is not None:
            keep = arrays.get(get_modality(kinds[name]).mask_key)
            if keep is not None and not keep.index_select(0, index.to(keep.device)).bool().any():
                continue  # none of the rows has it: left out, as the collator leaves out a modality no sample has
        length = None if kinds is None else get_modality(kinds[name]).rows_length(arrays, index)
        mask = arrays.get(get_modality(kinds[name]).mask_key) if length is not None else None
        out[name] = {
            # cut first, then gather: the copy has the micro-batch's own width
            key: (t.narrow(1, 0, length) if mask is not None and t.dim() >= 2 and t.shape[1] == mask.shape[1] else t)
            .index_select(0, index.to(t.device))
            .contiguous()
            for key, t in arrays.items()
        }
    return out


def num_tokens(kind: str, arrays: Mapping[str, np.ndarray]) -> int:
    """Tokens a processed modality gives the model (0 = the collator treats the modality as absent)."""
    return get_modality(kind).num_tokens(arrays)


def _collate_label(name: str, values: list[Any]):
    if any(v is None for v in values):
        return values  # missing labels stay a list; the task decides
    if all(isinstance(v, (bool, int, np.integer)) for v in values):
        return torch.tensor([int(v) for v in values], dtype=torch.long)
    if all(isinstance(v, (int, float, np.integer, np.floating)) for v in values):
        return torch.tensor([float(v) for v in values], dtype=torch.float32)
    return list(values)
