"""Pre-tokenised shards: a manifest processed once into Parquet files, streamed back by :class:`ShardedDataset`.

    python -m bioperceiver.data.shards write --manifest M --processors DIR --output OUT [--rows_per_shard N]

**Why Parquet** (and not MosaicML MDS or WebDataset tar): pyarrow is already a dependency (manifests are Parquet),
so shards add no package (``mosaicml-streaming`` pins ``transformers<5``, see ENVIRONMENT.md); a Parquet file is
columnar with row groups and a footer index, so a reader fetches only the row groups of the rows it needs (random
access, which a tar stream does not give: WebDataset reads every member in order); and pyarrow reads it through any
fsspec file system (local folders, ``file://``, ``memory://``, ``s3://``/``gs://`` with their fsspec packages).

**Layout of ``OUT``.** ``shard-00000.parquet`` ... and ``index.json`` (written last): the number of rows of every
shard, its SHA-256, a content hash over all shards (what a checkpoint records), the settings the shards were written
with, the modalities whose frozen-encoder outputs were cached (below) and the counts of left-out samples. Every
processed array is three columns: ``<modality>/<key>`` (the raw bytes), ``.../shape`` and ``.../dtype``, so arrays of
any rank and dtype come back bit-exact. A shard is written to a temporary name and renamed when complete; a re-run
with the same settings skips the shards that exist (a killed writer continues where it stopped), and a re-run with
other settings is refused.

Samples are processed with ``train=False`` (one deterministic view per sample: per-epoch augmentations of the
processors, such as image flips or random signal windows, are not applied to shards); modality dropout still varies
per epoch (the collator's ``__view_seed__``, derived here from ``(seed, epoch, row)``). A sample the processors cannot
read at all is left out (counted in the index), one unreadable modality of it is left out under
``on_error="skip_modality"`` (the default; the error travels with the row, so the collator counts it).

**Cached frozen features.** With ``--cache_features`` (a processor/embedder settings file), every modality whose
embedder has a frozen encoder with fixed weights (``ModalityEmbedder.frozen_features``, e.g. an image embedder
with a frozen timm backbone) stores the encoder's outputs instead of its
raw input (pixels), and the training step reads the features (``data.cached_features: true``). The index records a
hash of each encoder's weights, checked against the model at the start of the run.

**Streaming, resumable, any number of ranks.** :class:`ShardedDataset` defines, for every ``(seed, epoch)``, one
global order of all rows: the shards in a shuffled order, then a bounded shuffle buffer over that stream (computed on
row numbers from the index alone, no I/O). Training consumes this order as a prefix: global step ``t`` takes the
``world_size`` consecutive blocks of ``batch_size`` rows starting at ``position + t * batch_size * world_size``, block
``r`` going to rank ``r`` and, inside a rank, successive blocks to successive DataLoader workers (the DataLoader
visits workers round-robin). Its state is therefore one number, the **global sample position** of the epoch (plus
the epoch), which means the same thing whatever the number of ranks or workers: a run resumed on another number of
ranks continues with exactly the rows not yet seen. A rank reads only the row groups holding its rows; the bounded
buffer keeps those in a window of about ``shuffle_buffer`` rows of the stream, so at any time every rank reads the
same one or two shards (I/O locality, also for an object store), each decoding only its own rows.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import os
import sys
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from .errors import DEFAULT_ON_ERROR, DataError, SkipReport, check_on_error
from .manifest import Manifest

logger = logging.getLogger(__name__)

INDEX = "index.json"
FORMAT_VERSION = 1
SHARD_NAME = "shard-{:05d}.parquet"
SKIPPED_COLUMN = "__skipped__"
ROW_COLUMN = "__row__"

__all__ = ["INDEX", "ShardedDataset", "read_index", "write_shards"]


# ---- file systems -----------------------------------------------------------------------------------------------
def _fs(url: str | os.PathLike):
    """``(fsspec file system, path inside it)`` of a local folder or an fsspec URL."""
    import fsspec

    return fsspec.core.url_to_fs(str(url))


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def read_index(url: str | os.PathLike) -> dict[str, Any]:
    """The ``index.json`` of a shard folder (local or fsspec URL); a clear error when the shards are incomplete."""
    fs, root = _fs(url)
    path = _join(root, INDEX)
    if not fs.exists(path):
        raise FileNotFoundError(
            f"{url} holds no {INDEX}: not a shard folder, or its writer has not finished. Run "
            f"`python -m bioperceiver.data.shards write --output {url} ...` (a re-run continues where it stopped)"
        )
    with fs.open(path, "r") as f:
        index = json.load(f)
    if index.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{url}: shard format version {index.get('format_version')}, this reader reads {FORMAT_VERSION}"
        )
    return index


# ---- encoding of one sample -------------------------------------------------------------------------------------
def _encode(sample: Mapping[str, Any], names: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"sample_id": str(sample.get("sample_id")), "patient_id": str(sample.get("patient_id"))}
    for name in names:
        arrays = sample.get(name)
        for key, value in (arrays or {}).items():
            arr = np.asarray(value)  # tobytes() is C order; ascontiguousarray would make 0-d arrays 1-d
            row[f"{name}/{key}"] = arr.tobytes()
            row[f"{name}/{key}/shape"] = list(arr.shape)
            row[f"{name}/{key}/dtype"] = arr.dtype.str
    skipped = sample.get(SKIPPED_COLUMN) or []
    row[SKIPPED_COLUMN] = json.dumps([_error_dict(e) for e in skipped]) if skipped else None
    return row


def _error_dict(err: DataError) -> dict[str, Any]:
    return {
        "reason": err.reason,
        "message": err.message,
        "sample_id": err.sample_id,
        "modality": err.modality,
        "fix": err.fix,
    }


def _decode(record: Mapping[str, Any], arrays_of: Mapping[str, list[str]]) -> dict[str, Any]:
    sample: dict[str, Any] = {"sample_id": record["sample_id"], "patient_id": record["patient_id"]}
    for name, keys in arrays_of.items():
        out = {}
        for key in keys:
            raw = record.get(f"{name}/{key}")
            if raw is None:
                continue
            shape = tuple(record[f"{name}/{key}/shape"])
            out[key] = np.frombuffer(raw, dtype=np.dtype(record[f"{name}/{key}/dtype"])).reshape(shape).copy()
        sample[name] = out or None
    if record.get(SKIPPED_COLUMN):
        sample[SKIPPED_COLUMN] = [DataError(**e) for e in json.loads(record[SKIPPED_COLUMN])]
    return sample


# ---- writing ----------------------------------------------------------------------------------------------------
def write_shards(
    manifest: Manifest,
    processor,
    output: str | os.PathLike,
    *,
    split: str | None = "train",
    rows_per_shard: int = 1024,
    row_group_size: int = 64,
    seed: int = 0,
    on_error: str = DEFAULT_ON_ERROR,
    feature_encoders: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Process the rows of ``manifest`` (its ``split``, or all rows when ``None``) with the fitted ``processor`` and
    write them as Parquet shards of ``rows_per_shard`` manifest rows into ``output`` (folder or fsspec URL).

    Args:
        feature_encoders: ``{modality: encoder}`` whose outputs are stored instead of the modality's arrays; an
            encoder is a callable ``arrays -> arrays`` with a ``fingerprint`` attribute (the hash of its weights),
            e.g. from :func:`frozen_feature_encoders`.

    Returns:
        The index (also written to ``output/index.json``, last).
    """
    from tqdm.auto import tqdm

    on_error = check_on_error(on_error)
    if rows_per_shard < 1 or row_group_size < 1:
        raise ValueError(f"rows_per_shard and row_group_size must be >= 1, got {rows_per_shard}, {row_group_size}")
    if split is not None and "split" not in manifest.table:
        from .splits import assign_splits

        manifest = assign_splits(manifest)
    records = manifest.split(split).records() if split is not None else manifest.records()
    encoders = dict(feature_encoders or {})
    unknown = sorted(set(encoders) - set(processor.processors))
    if unknown:
        raise ValueError(
            f"feature encoders for {unknown}, which the processors do not have ({list(processor.processors)})"
        )
    names = list(processor.processors)
    from .._version import __version__

    h = hashlib.sha256(json.dumps(records, sort_keys=True, default=str).encode())
    h.update(
        json.dumps({n: p.to_dict() for n, p in processor.processors.items()}, sort_keys=True, default=str).encode()
    )
    plan = {
        "records_hash": h.hexdigest(),
        "split": split,
        "rows_per_shard": rows_per_shard,
        "row_group_size": row_group_size,
        "seed": seed,
        "on_error": on_error,
        "cached_features": {n: e.fingerprint for n, e in sorted(encoders.items())},
        "processors_fingerprint": processor.fingerprint(),  # what a run reading the shards must be using
        "bioperceiver_version": __version__,
    }
    fs, root = _fs(output)
    fs.makedirs(root, exist_ok=True)
    plan_path = _join(root, "plan.json")
    if fs.exists(plan_path):
        with fs.open(plan_path, "r") as f:
            old = json.load(f)
        # a key an older version did not write is not a change
        changed = sorted(k for k in plan if k in old and old[k] != plan[k] and k != "bioperceiver_version")
        if changed:
            raise ValueError(
                f"{output} holds shards written with other settings ({', '.join(changed)} differ); write into an "
                "empty folder, or delete that one first"
            )
    else:
        with fs.open(plan_path, "w") as f:
            json.dump(plan, f, indent=1)
    num_shards = max(1, math.ceil(len(records) / rows_per_shard))
    shards, report = [], SkipReport()
    for k in tqdm(range(num_shards), desc="writing shards", disable=num_shards < 2):
        name = SHARD_NAME.format(k)
        path = _join(root, name)
        if fs.exists(path):
            logger.info("%s exists (finished earlier): skipped", name)
            with fs.open(path, "rb") as f:
                data = f.read()
            meta = _parquet_meta(data)
        else:
            lo, hi = k * rows_per_shard, min(len(records), (k + 1) * rows_per_shard)
            rows = []
            for i in range(lo, hi):
                rng = np.random.default_rng([seed, i])
                try:
                    sample = processor(records[i], base_dir=manifest.base_dir, train=False, rng=rng, on_error=on_error)
                except DataError as err:
                    if on_error == "raise":
                        raise
                    report.add(err)
                    logger.warning("left out of the shards: %s", err)
                    continue
                for err in sample.get(SKIPPED_COLUMN, ()):
                    report.add(err, scope="modality")
                for mod, enc in encoders.items():
                    if sample.get(mod) is not None:
                        sample[mod] = enc(sample[mod])
                row = _encode(sample, names)
                row[ROW_COLUMN] = i
                rows.append(row)
            data = _parquet_bytes(rows, row_group_size)
            meta = _parquet_meta(data)
            tmp = _join(root, f".tmp-{name}")
            with fs.open(tmp, "wb") as f:
                f.write(data)
            fs.mv(tmp, path)  # a local rename: atomic; a finished shard is never half-written
        manifest_rows = min(len(records), (k + 1) * rows_per_shard) - k * rows_per_shard
        shards.append(
            {
                "file": name,
                "rows": meta["rows"],
                "manifest_rows": manifest_rows,
                "sha256": hashlib.sha256(data).hexdigest(),
                "arrays": meta["arrays"],
            }
        )
    arrays: dict[str, set[str]] = {}
    for s in shards:
        for name, keys in s.pop("arrays").items():
            arrays.setdefault(name, set()).update(keys)
    index = {
        "format_version": FORMAT_VERSION,
        "num_rows": sum(s["rows"] for s in shards),
        "content_hash": hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest(),
        "shards": shards,
        "modalities": dict(processor.modalities),
        "arrays": {n: sorted(arrays.get(n, ())) for n in names},
        "left_out_samples": sum(s["manifest_rows"] - s["rows"] for s in shards),
        "left_out_this_write": report.as_dict(),  # reasons, for the shards written by this call
        **plan,
    }
    tmp = _join(root, f".tmp-{INDEX}")
    with fs.open(tmp, "w") as f:
        json.dump(index, f, indent=1)
    fs.mv(tmp, _join(root, INDEX))
    logger.info(
        "%d rows in %d shards written to %s (content hash %s)",
        index["num_rows"],
        len(shards),
        output,
        index["content_hash"][:12],
    )
    return index


def _parquet_bytes(rows: list[dict[str, Any]], row_group_size: int) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, list] = {}
    keys = ["sample_id", "patient_id", ROW_COLUMN, SKIPPED_COLUMN]
    keys += sorted({k for r in rows for k in r} - set(keys))
    for key in keys:
        columns[key] = [r.get(key) for r in rows]
    types = {"sample_id": pa.string(), "patient_id": pa.string(), ROW_COLUMN: pa.int64(), SKIPPED_COLUMN: pa.string()}
    for key in keys[4:]:
        types[key] = (
            pa.list_(pa.int64()) if key.endswith("/shape") else pa.string() if key.endswith("/dtype") else pa.binary()
        )
    table = pa.table({k: pa.array(columns[k], type=types[k]) for k in keys})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    return buf.getvalue()


def _parquet_meta(data: bytes) -> dict[str, Any]:
    import pyarrow.parquet as pq

    f = pq.ParquetFile(io.BytesIO(data))
    arrays: dict[str, list[str]] = {}
    for col in f.schema_arrow.names:
        if "/" in col and not col.endswith(("/shape", "/dtype")):
            name, key = col.split("/", 1)
            arrays.setdefault(name, []).append(key)
    return {"rows": f.metadata.num_rows, "arrays": arrays}


# ---- frozen encoders --------------------------------------------------------------------------------------------
class _FrozenEncoder:
    """One embedder's frozen-encoder outputs for one sample (numpy in, numpy out), with the hash of its weights."""

    def __init__(self, embedder):
        self.embedder = embedder.eval()
        self.fingerprint = embedder.frozen_fingerprint()

    @torch.no_grad()
    def __call__(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.embedder.frozen_features(arrays)


def frozen_feature_encoders(model) -> dict[str, _FrozenEncoder]:
    """``{modality: encoder}`` for every embedder of ``model`` whose encoder is frozen with fixed weights (its
    :meth:`frozen_fingerprint` is not ``None``)."""
    out = {}
    for name, emb in model.embedders.items():
        if emb.frozen_fingerprint() is not None:
            out[name] = _FrozenEncoder(emb)
    return out


def check_cached_features(index: Mapping[str, Any], model, cached_features: bool) -> None:
    """The model's frozen encoders are those whose outputs the shards hold (same weights), and the run asked for
    cached features exactly when the shards hold some."""
    cached = index.get("cached_features") or {}
    if cached and not cached_features:
        raise ValueError(
            f"the shards hold cached encoder outputs of {sorted(cached)} instead of their inputs: set "
            "data.cached_features=true (or write shards without --cache_features)"
        )
    if cached_features and not cached:
        raise ValueError(
            "data.cached_features=true, but the shards hold no cached features: write them with --cache_features"
        )
    for name, fingerprint in cached.items():
        emb = model.embedders[name] if name in model.embedders else None  # noqa: SIM401 (a ModuleDict)
        mine = None if emb is None else emb.frozen_fingerprint()
        if mine != fingerprint:
            raise ValueError(
                f"modality {name!r}: the shards hold features of a frozen encoder with weights {fingerprint[:12]}, "
                f"this model's is {mine and mine[:12]}; rewrite the shards with this model's embedder settings"
            )


# ---- reading ----------------------------------------------------------------------------------------------------
def epoch_order(row_counts: list[int], seed: int, epoch: int, shuffle: bool, shuffle_buffer: int) -> np.ndarray:
    """The global order of an epoch as global row numbers (rows numbered shard after shard in index order): shards
    in an order drawn from ``(seed, epoch)``, then a bounded shuffle buffer of ``shuffle_buffer`` rows over that
    stream (each output row drawn uniformly from the buffer, refilled from the stream). Row numbers only: no I/O."""
    starts = np.concatenate([[0], np.cumsum(row_counts)]).astype(np.int64)
    if not shuffle:
        return np.arange(starts[-1], dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(row_counts))
    stream = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in perm]) if len(perm) else np.zeros(0, np.int64)
    if shuffle_buffer <= 1:
        return stream.astype(np.int64)
    out = np.empty_like(stream)
    buf = list(stream[:shuffle_buffer])
    draws = rng.random(len(stream))
    j = 0
    for nxt in stream[shuffle_buffer:]:
        k = int(draws[j] * len(buf))
        out[j] = buf[k]
        buf[k] = nxt
        j += 1
    tail = np.asarray(buf, dtype=np.int64)
    out[j:] = tail[rng.permutation(len(tail))]
    return out.astype(np.int64)


class ShardedDataset(torch.utils.data.IterableDataset):
    """Streams the samples of a shard folder (local or fsspec URL) for one rank, in the global order of
    :func:`epoch_order`, as ``batch_size`` blocks (see the module docstring); resumable from a global position.

    Args:
        url: the shard folder.
        batch_size: samples per rank per step (the DataLoader's ``batch_size``).
        rank, world_size: this process and the number of processes.
        seed: seed of the order and of each sample's ``__view_seed__`` (modality dropout).
        shuffle: draw a shard order and use the shuffle buffer (``False``: index order).
        shuffle_buffer: rows in the shuffle buffer.
        drop_last: leave out the last global step when it cannot give every rank a full batch (keeps ranks in step).
        cache_row_groups: decoded Parquet row groups kept in memory per worker (least recently used dropped).

    ``state_dict()`` is ``{"epoch", "position", "content_hash"}``; the training loop calls :meth:`advance` with
    the number of samples consumed by all ranks after each global step (the DataLoader prefetches, so the dataset
    cannot count them itself), and :meth:`load_state_dict` on resume.
    """

    def __init__(
        self,
        url: str | os.PathLike,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1024,
        drop_last: bool = True,
        cache_row_groups: int = 128,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.url = str(url)
        self.index = read_index(url)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.drop_last, self.cache_row_groups = drop_last, cache_row_groups
        self.row_counts = [s["rows"] for s in self.index["shards"]]
        self.starts = np.concatenate([[0], np.cumsum(self.row_counts)]).astype(np.int64)
        self.epoch, self.position = 0, 0

    @property
    def num_rows(self) -> int:
        return int(self.starts[-1])

    # ---- state ----------------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` at its beginning (position 0) unless it is the epoch the state already points into."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def advance(self, num_samples: int) -> None:
        """``num_samples`` more samples of the global order were consumed (by all ranks together)."""
        self.position += int(num_samples)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "content_hash": self.index["content_hash"]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("content_hash") not in (None, self.index["content_hash"]):
            raise ValueError(
                f"the saved data position is for shards with content hash {str(state['content_hash'])[:12]}, "
                f"{self.url} has {self.index['content_hash'][:12]}: resume with the shards the run started with"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def steps_left(self) -> int:
        """Global steps left in this epoch from the current position."""
        left = max(0, self.num_rows - self.position)
        per_step = self.batch_size * self.world_size
        return left // per_step if self.drop_last else -(-left // per_step)

    # ---- iteration ------------------------------------------------------------------------------------------
    def local_positions(self, worker: int = 0, num_workers: int = 1) -> Iterator[int]:
        """Global positions (in the epoch order) this rank's ``worker`` yields, from the current position on.

        The start is fixed when iteration begins: the training loop calls :meth:`advance` while it iterates (with
        ``num_workers=0`` on this very object), which must not move the blocks still to come."""
        b, w, start = self.batch_size, self.world_size, self.position
        end = start + self.steps_left() * b * w if self.drop_last else self.num_rows
        j = worker  # local block number: rank r's j-th block is the global block j * world_size + r
        while True:
            lo = start + (j * w + self.rank) * b
            if lo >= end:
                return
            yield from range(lo, min(lo + b, end))
            j += num_workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        order = epoch_order(self.row_counts, self.seed, self.epoch, self.shuffle, self.shuffle_buffer)
        cache: OrderedDict[int, Any] = OrderedDict()
        for p in self.local_positions(worker, num_workers):
            row = int(order[p])
            yield self._sample(row, cache)

    def _sample(self, row: int, cache: OrderedDict) -> dict[str, Any]:
        shard = int(np.searchsorted(self.starts, row, side="right") - 1)
        local = row - int(self.starts[shard])
        group_rows = self.index["row_group_size"]
        key = (shard, local // group_rows)
        if key not in cache:
            cache[key] = self._read_group(shard, local // group_rows)
            while len(cache) > max(1, self.cache_row_groups):
                cache.popitem(last=False)
        else:
            cache.move_to_end(key)
        records = cache[key]
        sample = _decode(records[local % group_rows], self.index["arrays"])
        rng = np.random.default_rng([self.seed, self.epoch, row])
        sample["__view_seed__"] = int(rng.integers(2**62))  # modality dropout of this sample, this epoch
        return sample

    def _read_group(self, shard: int, group: int) -> list[dict[str, Any]]:
        import pyarrow.parquet as pq

        fs, root = _fs(self.url)
        with fs.open(_join(root, self.index["shards"][shard]["file"]), "rb") as f:
            return pq.ParquetFile(f).read_row_group(group).to_pylist()


def batch_to_device(batch: Any, device) -> Any:
    """Every tensor of a (nested) batch on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: batch_to_device(v, device) for k, v in batch.items()}
    return batch


# ---- command line -----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bioperceiver.data.shards", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="process a manifest once into Parquet shards")
    w.add_argument("--manifest", required=True, help="the manifest (Parquet/CSV/JSONL)")
    w.add_argument("--processors", required=True, help="fitted processors (BioPerceiverProcessor.from_pretrained)")
    w.add_argument("--output", required=True, help="shard folder or fsspec URL")
    w.add_argument("--rows_per_shard", type=int, default=1024)
    w.add_argument("--row_group_size", type=int, default=64)
    w.add_argument("--split", default="train", help="manifest split to write ('all': every row)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--on_error", default=DEFAULT_ON_ERROR)
    w.add_argument(
        "--cache_features",
        metavar="SETTINGS",
        help="processor/embedder settings YAML of the run: frozen encoders among its embedders store their outputs",
    )
    w.add_argument("--preset", default="bioperceiver_debug", help="model preset (with --cache_features)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .manifest import read_manifest
    from .processing import BioPerceiverProcessor, load_processor_settings

    manifest = read_manifest(args.manifest)
    processor = BioPerceiverProcessor.from_pretrained(args.processors)
    encoders = None
    if args.cache_features:
        from ..factory import create_model

        _, embedders = load_processor_settings(args.cache_features)
        model = create_model(args.preset, modalities=processor.model_modalities(embedders))
        encoders = frozen_feature_encoders(model)
        if not encoders:
            raise SystemExit(
                f"--cache_features {args.cache_features}: no embedder has a frozen encoder with fixed weights"
            )
    index = write_shards(
        manifest,
        processor,
        args.output,
        split=None if args.split == "all" else args.split,
        rows_per_shard=args.rows_per_shard,
        row_group_size=args.row_group_size,
        seed=args.seed,
        on_error=args.on_error,
        feature_encoders=encoders,
    )
    sys.stdout.write(f"{index['num_rows']} rows in {len(index['shards'])} shards: {args.output}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
