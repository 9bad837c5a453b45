"""Hugging Face datasets from manifests: a cached, multiprocess ``map`` path and a streaming path sharded across
ranks with ``split_dataset_by_node``."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..modalities.registry import get_modality
from .errors import DEFAULT_ON_ERROR, DataError, SkipReport, check_on_error
from .manifest import Manifest, is_missing
from .processing import SKIPPED_KEY, BioPerceiverProcessor

if TYPE_CHECKING:  # imported where used: `datasets` costs ~1 s, and `import bioperceiver` should not pay it
    import datasets

logger = logging.getLogger(__name__)

ERROR_COLUMN = "__error__"
SKIPPED_COLUMN = "__skipped__"  # JSON list of the modality errors of a kept (or skipped) row: skip_modality
COUNTS_COLUMN = "__counts__"  # per-row processor counters (OOV genes...), summed in the parent process


def modality_features(processor: BioPerceiverProcessor) -> dict[str, Any]:
    """Explicit Arrow features of each processed modality (robust to absent values and ragged arrays)."""
    return {name: get_modality(proc.kind).features(proc) for name, proc in processor.processors.items()}


def _clean_table(manifest: Manifest, split: str | None):
    table = manifest.table
    if split is not None:
        if "split" not in table:
            raise ValueError("the manifest has no 'split' column: call bioperceiver.data.assign_splits first")
        table = table[table["split"] == split]
    table = table.reset_index(drop=True).copy()
    for col, kind in manifest.modalities.items():  # mappings as JSON text: Arrow structs would union all keys
        if "mapping" in get_modality(kind).cell_forms:
            table[col] = [
                None if is_missing(v) else v if isinstance(v, str) else json.dumps(_plain(v)) for v in table[col]
            ]
    for col in table.columns:  # Arrow needs one type per column
        if table[col].dtype == object and col.startswith("meta_"):
            table[col] = [
                None if is_missing(v) else v if isinstance(v, str) else json.dumps(_plain(v)) for v in table[col]
            ]
    return table


def _plain(v):
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def _to_row(processed: dict[str, Any], processor: BioPerceiverProcessor) -> dict[str, Any]:
    row = {}
    for name, proc in processor.processors.items():
        arrays = processed.get(name)
        row[name] = None if arrays is None else get_modality(proc.kind).to_row(arrays)
    return row


class _RowProcessor:
    """Picklable ``map`` function: one manifest row -> processed modalities (+ error column)."""

    def __init__(self, processor, base_dir, on_error, train, seed):
        self.processor, self.base_dir, self.on_error, self.train, self.seed = processor, base_dir, on_error, train, seed

    def __call__(self, row: dict[str, Any], idx: int) -> dict[str, Any]:
        before = {n: dict(p.counters) for n, p in self.processor.processors.items()}
        out = self._process(row, idx)
        diff = {}
        for n, p in self.processor.processors.items():
            d = {k: v - before[n].get(k, 0) for k, v in p.counters.items() if v != before[n].get(k, 0)}
            if d:
                diff[n] = d
        out[COUNTS_COLUMN] = json.dumps(diff) if diff else None
        return out

    def _process(self, row: dict[str, Any], idx: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, idx])
        try:
            processed = self.processor(row, base_dir=self.base_dir, train=self.train, rng=rng, on_error=self.on_error)
            skipped = processed.pop(SKIPPED_KEY, [])
            out = _to_row(processed, self.processor)
            out[ERROR_COLUMN] = None
        except DataError as err:
            if self.on_error == "raise":
                raise
            skipped = getattr(err, "skipped", [])
            out = dict.fromkeys(self.processor.processors)
            out[ERROR_COLUMN] = json.dumps(_error_dict(err))
        out[SKIPPED_COLUMN] = json.dumps([_error_dict(e) for e in skipped]) if skipped else None
        return out


def _error_dict(err: DataError) -> dict[str, Any]:
    return {
        "reason": err.reason,
        "modality": err.modality,
        "sample_id": err.sample_id,
        "message": err.message,
        "fix": err.fix,
    }


def _error_from(e: dict[str, Any]) -> DataError:
    return DataError(e["reason"], e["message"], sample_id=e["sample_id"], modality=e["modality"], fix=e["fix"])


def _count_row(report: SkipReport, error_text: str | None, skipped_text: str | None) -> None:
    for e in json.loads(skipped_text) if skipped_text else ():
        report.add(_error_from(e), scope="modality")
    if error_text is not None:
        report.add(_error_from(json.loads(error_text)))


def _fingerprint(table, manifest: Manifest, processor: BioPerceiverProcessor, split, train, seed, on_error) -> str:
    """Cache key of a processed split: ``table`` is the split's cleaned rows (already built by the caller)."""
    h = hashlib.sha256()
    # The rows themselves (not just the file's name and time): subsets of one manifest file must not share a key.
    h.update(table.to_json(orient="split", default_handler=str).encode())
    h.update(str(Path(manifest.base_dir).resolve()).encode())
    if manifest.path is not None:
        st = Path(manifest.path).stat()  # files referenced by the rows may change with the manifest
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(processor.fingerprint().encode())  # settings, state and files (a tokenizer's vocabulary)
    from .._version import __version__

    h.update(f"{split}:{train}:{seed}:{on_error}:{__version__}".encode())
    return h.hexdigest()[:32]


def _report_from(ds: datasets.Dataset) -> SkipReport:
    report = SkipReport()
    for error_text, skipped_text in zip(ds[ERROR_COLUMN], ds[SKIPPED_COLUMN], strict=True):
        _count_row(report, error_text, skipped_text)
    return report


def build_dataset(
    manifest: Manifest,
    processor: BioPerceiverProcessor,
    *,
    split: str | None = None,
    num_proc: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    on_error: str = DEFAULT_ON_ERROR,
    train: bool = False,
    seed: int = 0,
) -> tuple[datasets.Dataset, SkipReport]:
    """Process every row with ``datasets.map`` (``num_proc`` workers) into a ``datasets.Dataset`` in torch-friendly
    columns; results are cached in ``cache_dir`` keyed by the manifest file, the fitted processors and the
    arguments, so a second call is a cache hit. Returns the dataset and the :class:`SkipReport` (logged): under
    ``on_error="skip_modality"`` (default) an unreadable modality is absent from its row and counted, a row left
    with no modality is removed; under ``"skip_sample"`` a row with any unreadable modality is removed."""
    import datasets

    on_error = check_on_error(on_error)
    table = _clean_table(manifest, split)
    raw = datasets.Dataset.from_pandas(table, preserve_index=False)
    features = raw.features.copy()
    for name, feat in modality_features(processor).items():
        features[name] = feat
    features[ERROR_COLUMN] = datasets.Value("string")
    features[SKIPPED_COLUMN] = datasets.Value("string")
    features[COUNTS_COLUMN] = datasets.Value("string")
    kwargs: dict[str, Any] = {}
    if cache_dir is not None:
        fp = _fingerprint(table, manifest, processor, split, train, seed, on_error)
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        kwargs = {"cache_file_name": str(Path(cache_dir) / f"processed-{fp}.arrow"), "new_fingerprint": fp}
    ds = raw.map(
        _RowProcessor(processor, manifest.base_dir, on_error, train, seed),
        with_indices=True,
        features=features,
        num_proc=num_proc if num_proc and num_proc > 1 else None,
        desc=f"processing {split or 'all'} samples",
        load_from_cache_file=cache_dir is not None,
        **kwargs,
    )
    report = _report_from(ds)
    report.log(f"build_dataset({split or 'all'})")
    _merge_counts(processor, ds[COUNTS_COLUMN])
    if report.total:
        ds = ds.filter(lambda e: e is None, input_columns=[ERROR_COLUMN])
    return ds.remove_columns([ERROR_COLUMN, SKIPPED_COLUMN, COUNTS_COLUMN]), report


def _merge_counts(processor: BioPerceiverProcessor, column) -> None:
    """Add the workers' per-row counters (out-of-vocabulary genes, unknown channels...) to the parent's processors
    and log them: what was not tokenised is reported, never silently lost."""
    total: dict[str, dict[str, int]] = {}
    for text in column:
        if text:
            for name, d in json.loads(text).items():
                for k, v in d.items():
                    total.setdefault(name, {}).setdefault(k, 0)
                    total[name][k] += v
    for name, d in total.items():
        processor.processors[name].counters.update(d)
        logger.warning("modality %r: not tokenised (counted) %s", name, d)


def build_iterable_dataset(
    manifest: Manifest,
    processor: BioPerceiverProcessor,
    *,
    split: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    num_shards: int | None = None,
    shuffle_buffer: int | None = None,
    seed: int = 0,
    train: bool = False,
    on_error: str = DEFAULT_ON_ERROR,
) -> tuple[datasets.IterableDataset, SkipReport]:
    """Streaming path: rows are processed lazily as they are read, sharded across ranks with
    ``datasets.distributed.split_dataset_by_node``. ``num_shards`` defaults to a multiple of ``world_size`` so
    every rank reads whole shards. Skipped rows are logged when met and counted in the returned report (of this
    process)."""
    import datasets
    from datasets.distributed import split_dataset_by_node

    on_error = check_on_error(on_error)
    table = _clean_table(manifest, split)
    if num_shards is None:
        num_shards = world_size * max(1, min(8, len(table) // max(world_size, 1) // 64))
    ds = datasets.Dataset.from_pandas(table, preserve_index=False).to_iterable_dataset(num_shards=num_shards)
    if shuffle_buffer:
        ds = ds.shuffle(seed=seed, buffer_size=shuffle_buffer)
    if world_size > 1:
        ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    report = SkipReport()
    fn = _RowProcessor(processor, manifest.base_dir, on_error, train, seed)

    def process(row, idx):
        out = fn(row, idx + rank * 1_000_003)
        if out[ERROR_COLUMN] is not None or out[SKIPPED_COLUMN] is not None:
            _count_row(report, out[ERROR_COLUMN], out[SKIPPED_COLUMN])
            logger.warning("skipped: %s %s", out[ERROR_COLUMN] or "", out[SKIPPED_COLUMN] or "")
        return out

    ds = ds.map(process, with_indices=True)
    ds = ds.filter(lambda e: e is None, input_columns=[ERROR_COLUMN])
    ds = ds.remove_columns([ERROR_COLUMN, SKIPPED_COLUMN, COUNTS_COLUMN])
    return ds, report


def to_sample(row: dict[str, Any], processor: BioPerceiverProcessor) -> dict[str, Any]:
    """A dataset row (lists from Arrow) back to the processor's output form (arrays), for the collator."""
    out = dict(row)
    for name, proc in processor.processors.items():
        arrays = row.get(name)
        if arrays is None:
            continue
        out[name] = get_modality(proc.kind).from_row(arrays)
    return out


class ManifestDataset(torch.utils.data.Dataset):
    """Manifest rows processed on the fly: the one map-style dataset of pretraining and finetuning.

    Training views are fresh every epoch and reproducible: the RNG of row ``i`` is seeded by ``(seed, epoch, i)``,
    so a resumed run sees exactly the views (augmentations, signal windows, modality dropout through
    ``__view_seed__``) an uninterrupted one would.

    Args:
        records: manifest rows (``Manifest.records()``).
        processor: a fitted :class:`BioPerceiverProcessor`.
        base_dir: folder that relative paths in the rows resolve against (``Manifest.base_dir``).
        train: training-time processing (augmentations, random windows).
        seed: seed of the per-row RNG.
        on_error: ``"skip_modality"`` (default): an unreadable modality is absent from the sample and its error
            listed under ``"__skipped__"`` (the collator counts it); a sample with no readable modality left, and
            under ``"skip_sample"`` any bad sample, yields ``{"sample_id", "__error__", "__skipped__"}``, which the
            collator drops and counts. ``"raise"`` raises the :class:`DataError`.
        modalities: process only these modality names (the others are absent); ``None`` = all the processor has.
        targets: optional per-row targets, handed on as ``sample["__target__"]``.
    """

    def __init__(
        self,
        records: list[dict[str, Any]],
        processor: BioPerceiverProcessor,
        *,
        base_dir: str | os.PathLike | None = None,
        train: bool = False,
        seed: int = 0,
        on_error: str = DEFAULT_ON_ERROR,
        modalities: list[str] | None = None,
        targets: list[Any] | None = None,
    ):
        self.records = list(records)
        if targets is not None and len(targets) != len(self.records):
            raise ValueError(f"{len(targets)} targets for {len(self.records)} records")
        self.targets = None if targets is None else list(targets)
        self.processor, self.base_dir, self.train, self.seed = processor, base_dir, train, seed
        self.on_error, self.modalities, self.epoch = check_on_error(on_error), modalities, 0
        self._warned: set[tuple[int, str | None, str]] = set()  # (row, modality, reason) already logged

    @classmethod
    def from_manifest(cls, manifest: Manifest, processor: BioPerceiverProcessor, **kwargs: Any) -> ManifestDataset:
        return cls(manifest.records(), processor, base_dir=manifest.base_dir, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _first_time(self, i: int, err: DataError) -> bool:
        """Whether row ``i`` has not met this error (modality, reason) before in this process: a bad row comes back
        every epoch, its warning is logged once (the collator's report counts it once too)."""
        key = (i, err.modality, err.reason)
        if key in self._warned:
            return False
        self._warned.add(key)
        return True

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, self.epoch, i])
        kwargs = {} if self.modalities is None else {"modalities": self.modalities}
        try:
            out = self.processor(
                self.records[i], base_dir=self.base_dir, train=self.train, rng=rng, on_error=self.on_error, **kwargs
            )
        except DataError as err:
            if self.on_error == "raise":
                raise
            if self._first_time(i, err):
                logger.warning("skipped: %s", err)
            sid = self.records[i].get("sample_id")
            return {"sample_id": sid, ERROR_COLUMN: err, SKIPPED_KEY: list(getattr(err, "skipped", []))}
        for err in out.get(SKIPPED_KEY, ()):
            if self._first_time(i, err):
                logger.warning("modality dropped: %s", err)
        if self.targets is not None:
            out["__target__"] = self.targets[i]
        out["__view_seed__"] = int(rng.integers(2**62))  # modality dropout of this sample, this epoch
        return out
