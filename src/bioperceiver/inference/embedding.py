"""``bioperceiver embed``: the fused embedding and one embedding per present modality for every manifest row,
written as sharded Parquet.

Layout of ``output_dir``: ``embeddings-00000-of-00012.parquet`` ... one file per shard of ``shard_size`` manifest
rows (shard ``k`` holds rows ``[k * shard_size, (k + 1) * shard_size)``). Columns: ``sample_id``, ``patient_id``,
``embedding`` (the fused view: the mean of the latents over every present modality, ``list<float32>``),
``embedding_<modality>`` (that modality alone through the same backbone; **null** when the sample lacks it, never
zeros) and the manifest's ``label_*`` columns (as text, for ``search --evaluate``). The Parquet schema metadata key
``bioperceiver`` holds the model id (its folder), the config hash, the space, the modalities, the embedding width,
the shard's rows and its skip counts.

* **Space** (``space``): ``latent`` (default) is the backbone's pooled latents (``d_latents`` wide), the usual
  features for a downstream model; ``projected`` passes them through the contrastive projection head the
  pretraining run saved beside the backbone (``projection_head.safetensors``, ``projection_dim`` wide): the space
  in which the loss aligned a patient's modalities (and the run's card measured retrieval).

* **Processes**: shard ``k`` belongs to process ``k % num_processes`` (``accelerate launch`` / ``torchrun`` set
  them; each process writes only its own shards, so no collective is needed and any process count resumes any
  run).
* **Resume**: a finished shard is skipped (its metadata must name the same config hash and shard count); a shard is
  written to a hidden temporary file and renamed into place, so a shard file is never half-written.
* **Skips**: rows or modalities that cannot be read are skipped under ``on_error`` (``skip_modality`` by default),
  counted per ``(modality, reason)``, logged and stored in the shard metadata; ``raise`` stops on the first.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from ..data.collator import BioPerceiverCollator
from ..data.dataset import ManifestDataset
from ..data.errors import DEFAULT_ON_ERROR, SkipReport
from ..data.manifest import LABEL_PREFIX, Manifest, read_manifest
from .loading import LoadedModel, load_model_folder, model_fingerprint

logger = logging.getLogger(__name__)

SPACES = ("latent", "projected")
"""Where ``embed`` takes its vectors: the backbone's latents, or after the contrastive projection head."""
FUSED = "fused"
"""The name ``search`` uses for the fused embedding (column ``embedding``)."""
EMBEDDING_COLUMN = "embedding"
METADATA_KEY = b"bioperceiver"
SHARD_GLOB = "embeddings-*-of-*.parquet"


def embedding_column(modality: str) -> str:
    """The column of ``modality``'s embedding; :data:`FUSED` is the fused embedding's."""
    return EMBEDDING_COLUMN if modality == FUSED else f"{EMBEDDING_COLUMN}_{modality}"


def shard_name(index: int, count: int) -> str:
    return f"embeddings-{index:05d}-of-{count:05d}.parquet"


def shard_ranges(num_rows: int, shard_size: int) -> list[tuple[int, int]]:
    """``[(start, stop)]`` of every shard: consecutive blocks of ``shard_size`` rows (the last may be shorter)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [(s, min(s + shard_size, num_rows)) for s in range(0, num_rows, shard_size)]


def shards_of_process(num_shards: int, process_index: int, num_processes: int) -> list[int]:
    """The shards process ``process_index`` of ``num_processes`` writes: ``k % num_processes == process_index``
    (every shard belongs to exactly one process)."""
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} is not in [0, {num_processes})")
    return list(range(process_index, num_shards, num_processes))


def process_layout() -> tuple[int, int]:
    """``(process index, process count)`` of this launch: ``RANK``/``WORLD_SIZE`` as ``torchrun`` and ``accelerate
    launch`` set them (no process group is needed: processes never communicate), else accelerate's state."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    from accelerate import PartialState

    state = PartialState()
    return state.process_index, state.num_processes


@dataclass
class EmbedResult:
    """One process's work: shards written and skipped because already finished (resume), rows embedded, what was
    skipped (``SkipReport``), the output folder."""

    output_dir: Path
    written: list[int] = field(default_factory=list)
    resumed: list[int] = field(default_factory=list)
    rows: int = 0
    skipped: SkipReport = field(default_factory=SkipReport)

    def summary(self) -> str:
        text = (
            f"{self.rows} samples embedded into {len(self.written)} shard(s) in {self.output_dir}"
            f" ({len(self.resumed)} finished shard(s) skipped)"
        )
        if self.skipped.total or self.skipped.modality_total:
            text += f"; skipped: {self.skipped.summary()}"
        return text


def _label_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple, np.ndarray)):
        return json.dumps([v.item() if hasattr(v, "item") else v for v in value])
    return str(value)


def embedding_rows(
    loaded: LoadedModel,
    records: Sequence[dict[str, Any]],
    *,
    base_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    on_error: str = DEFAULT_ON_ERROR,
    num_workers: int = 0,
    report: SkipReport | None = None,
    progress: tqdm | None = None,
    space: str = "latent",
) -> Iterator[dict[str, Any]]:
    """Embed ``records`` (manifest rows) with ``loaded``'s backbone: one dict per kept row with ``sample_id``,
    ``patient_id``, ``embedding`` (fused, ``float32`` array), ``embedding_<modality>`` (array or ``None`` when
    absent) and the ``label_*`` cells as text, in ``space`` (:data:`SPACES`). Skipped rows/modalities are counted
    into ``report``."""
    head = projection_of(loaded, space)
    backbone = loaded.backbone
    device = next(backbone.parameters()).device
    names = list(backbone.modality_names)
    used = list(loaded.modalities)
    by_id = {r.get("sample_id"): r for r in records}
    dataset = ManifestDataset(
        list(records), loaded.processor, base_dir=base_dir, train=False, on_error=on_error, modalities=used
    )
    collator = BioPerceiverCollator(loaded.modalities, on_error=on_error)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=lambda f: f
    )  # collated here, so the collator's skip report lives in this process
    for features in loader:
        batch = collator(features, train=False)
        if progress is not None:
            progress.update(len(features))
        if batch is None:
            continue
        inputs = {n: {k: v.to(device) for k, v in arrays.items()} for n, arrays in batch["inputs"].items()}
        with torch.inference_mode():
            out = backbone(inputs=inputs, return_modality_embeddings=True)
            fused, per = out.pooler_output, out.modality_pooler_output  # (B, D), (B, K, D)
            if head is not None:
                fused, per = head(fused), head(per)
        fused, per = fused.float().cpu().numpy(), per.float().cpu().numpy()
        present = out.modality_mask.cpu().numpy()  # (B, K)
        for i, sid in enumerate(batch["sample_id"]):
            record = by_id.get(sid, {})
            row = {"sample_id": sid, "patient_id": batch["patient_id"][i], EMBEDDING_COLUMN: fused[i]}
            for m in used:
                k = names.index(m)
                row[embedding_column(m)] = per[i, k] if present[i, k] else None
            row.update({c: _label_text(v) for c, v in record.items() if c.startswith(LABEL_PREFIX)})
            yield row
    if report is not None:
        report.update(collator.report)


def projection_of(loaded: LoadedModel, space: str):
    """The head ``space`` needs: ``None`` for ``latent``, the saved projection head for ``projected`` (a
    ``ValueError`` naming the folder and the fix when it has none)."""
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    if space == "latent":
        return None
    if loaded.projection is None:
        kind = "a finetuned model" if loaded.task is not None else "a backbone saved without its projection head"
        raise ValueError(
            f"--space projected needs the contrastive projection head, and {loaded.folder} is {kind} (no "
            "projection_head.safetensors): pass a pretraining run's final/ folder saved with it (pretraining saves "
            "it since 2026-12-04), or use --space latent"
        )
    return loaded.projection


def rows_to_table(rows: list[dict[str, Any]], modalities: Sequence[str], label_columns: Sequence[str]) -> pa.Table:
    """The Arrow table of :func:`embedding_rows` output, with a fixed schema (every modality column, null when
    absent) so that every shard of a run has the same columns."""
    vec = pa.list_(pa.float32())
    fields = [pa.field("sample_id", pa.string()), pa.field("patient_id", pa.string()), pa.field(EMBEDDING_COLUMN, vec)]
    fields += [pa.field(embedding_column(m), vec) for m in modalities]
    fields += [pa.field(c, pa.string()) for c in label_columns]
    schema = pa.schema(fields)
    columns = {}
    for f in fields:
        values = [r.get(f.name) for r in rows]
        if f.type == vec:
            values = [None if v is None else np.asarray(v, dtype=np.float32) for v in values]
        columns[f.name] = pa.array(values, type=f.type)
    return pa.table(columns, schema=schema)


def _shard_metadata(path: Path) -> dict[str, Any]:
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(METADATA_KEY, b"{}"))


def _check_resumable(out: Path, common: dict[str, Any], space: str) -> None:
    """Every shard already in ``out`` (any process's) must be this run's: the same model (config, weights and
    processors), shard layout, space and manifest rows. Raises ``ValueError`` naming the first that is not, so that
    a finished shard of another run is never resumed as this one's, nor left beside it to be read with it."""
    for path in sorted(out.glob(SHARD_GLOB)):
        meta = _shard_metadata(path)
        was = (meta.get("config_hash"), meta.get("num_shards"), meta.get("space", "latent"))
        if was != (common["config_hash"], common["num_shards"], space):
            raise ValueError(
                f"{path} was written by another model, shard layout or space (config hash {was[0]}, {was[1]} "
                f"shards, {was[2]}; now {common['config_hash']}, {common['num_shards']}, {space}): pass a new "
                "--output_dir, or the same model, manifest, --shard_size and --space to resume"
            )
        for key, what in (("model_fingerprint", "another model"), ("manifest_fingerprint", "another manifest")):
            if meta.get(key) != common[key]:  # same architecture, other weights/processors; other rows
                raise ValueError(
                    f"{path} was written by {what} ({key} {meta.get(key)}, now {common[key]}: the weights and "
                    "processors, or the manifest's rows, differ from the run that wrote it): pass a new "
                    "--output_dir, or resume with the same --model and --manifest"
                )


def embed(
    model: str | os.PathLike | LoadedModel,
    manifest: str | os.PathLike | Manifest,
    output_dir: str | os.PathLike,
    *,
    batch_size: int = 32,
    shard_size: int = 1024,
    on_error: str = DEFAULT_ON_ERROR,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    process_index: int | None = None,
    num_processes: int | None = None,
    progress: bool = True,
    space: str = "latent",
) -> EmbedResult:
    """Embed every row of ``manifest`` with the model saved in ``model`` (a pretraining ``final/`` folder or a
    finetuned folder: its backbone) into sharded Parquet in ``output_dir`` (see the module docstring).

    ``process_index``/``num_processes`` default to accelerate's (``accelerate launch``, ``torchrun``); each
    process writes only its shards. Finished shards are skipped (resume). Returns this process's
    :class:`EmbedResult`."""
    if process_index is None or num_processes is None:
        index, count = process_layout()
        process_index = index if process_index is None else process_index
        num_processes = count if num_processes is None else num_processes
    loaded = model if isinstance(model, LoadedModel) else load_model_folder(model, device=device)
    head = projection_of(loaded, space)  # before any work: a missing head is an error, not a late surprise
    m = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
    used = list(loaded.modalities)
    if not set(used) & set(m.modalities):
        raise ValueError(
            f"the manifest {m.path or ''} has none of the model's modalities {used} (its modality columns: "
            f"{sorted(m.modalities)}); rename its columns to the model's or embed with a model trained on them"
        )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ranges = shard_ranges(len(m), shard_size)
    mine = shards_of_process(len(ranges), process_index, num_processes)
    result = EmbedResult(out)
    common = {
        "model_id": loaded.model_id,
        "config_hash": loaded.config_hash,
        "model_fingerprint": model_fingerprint(loaded),
        "manifest_fingerprint": m.fingerprint()[:16],
        "space": space,
        "modalities": used,
        "embedding_dim": int(
            loaded.backbone.config.d_latents if head is None else loaded.backbone.config.projection_dim
        ),
        "num_shards": len(ranges),
        "shard_size": shard_size,
        "manifest": str(m.path) if m.path is not None else None,
    }
    _check_resumable(out, common, space)
    todo = []
    for k in mine:
        path = out / shard_name(k, len(ranges))
        for stale in out.glob(f".{path.name}.tmp*"):  # left by a process that stopped while writing
            stale.unlink()
        if path.exists():
            result.resumed.append(k)
            continue
        todo.append(k)
    if result.resumed:
        logger.info("resuming: %d finished shard(s) skipped", len(result.resumed))
    records = m.records()
    labels = list(m.label_columns)
    bar = tqdm(
        total=sum(ranges[k][1] - ranges[k][0] for k in todo),
        desc="embed",
        unit="sample",
        disable=not progress or process_index != 0,
    )
    for k in todo:
        start, stop = ranges[k]
        report = SkipReport()
        rows = list(
            embedding_rows(
                loaded,
                records[start:stop],
                base_dir=m.base_dir,
                batch_size=batch_size,
                on_error=on_error,
                num_workers=num_workers,
                report=report,
                progress=bar,
                space=space,
            )
        )
        table = rows_to_table(rows, used, labels)
        meta = {**common, "shard": k, "rows": [start, stop], "samples": len(rows), "skipped": report.as_dict()}
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})
        path = out / shard_name(k, len(ranges))
        tmp = out / f".{path.name}.tmp{os.getpid()}"
        pq.write_table(table, tmp)
        os.replace(tmp, path)  # atomic: a shard file is complete or absent
        result.written.append(k)
        result.rows += len(rows)
        result.skipped.update(report)
        bar.set_postfix(skipped=result.skipped.total, modalities_skipped=result.skipped.modality_total)
    bar.close()
    logger.info("process %d/%d: %s", process_index, num_processes, result.summary())
    return result


def read_embeddings(output_dir: str | os.PathLike, *, require_complete: bool = True):
    """All shards of an ``embed`` output folder as one :class:`pandas.DataFrame` (vector cells as ``float32``
    arrays, ``None`` when absent) and the run's metadata. Raises ``ValueError`` naming the missing shards when the
    run is unfinished (``require_complete``)."""
    import pandas as pd

    folder = Path(output_dir)
    files = sorted(folder.glob(SHARD_GLOB))
    if not files:
        raise ValueError(f"{folder} holds no embedding shards ({SHARD_GLOB}): run `bioperceiver embed` into it first")
    meta = _shard_metadata(files[0])
    hashes = {_shard_metadata(f).get("config_hash") for f in files}
    if len(hashes) > 1:
        raise ValueError(f"{folder} mixes embeddings of several models (config hashes {sorted(hashes)})")
    expected = {shard_name(k, meta["num_shards"]) for k in range(meta["num_shards"])}
    missing = sorted(expected - {f.name for f in files})
    if missing and require_complete:
        raise ValueError(
            f"{folder}: the embedding run is unfinished, {len(missing)} shard(s) missing (e.g. {missing[:3]}); "
            "re-run the same `bioperceiver embed` command to finish it"
        )
    frame = pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)
    return frame, meta


def stacked(cells) -> np.ndarray:
    """``(N, D)`` float32 from a column of vector cells (none of them ``None``)."""
    return np.stack([np.asarray(c, dtype=np.float32) for c in cells]) if len(cells) else np.empty((0, 0), np.float32)


def total_skipped(output_dir: str | os.PathLike) -> dict[str, int]:
    """Samples and modality values skipped over all shards of an ``embed`` output (from the shard metadata)."""
    out = {"samples": 0, "modalities": 0}
    for f in sorted(Path(output_dir).glob(SHARD_GLOB)):
        skipped = _shard_metadata(f).get("skipped", {})
        out["samples"] += int(skipped.get("total", 0) or 0)
        out["modalities"] += int(skipped.get("modality_total", 0) or 0)
    return out


__all__ = [
    "EMBEDDING_COLUMN",
    "FUSED",
    "EmbedResult",
    "embed",
    "embedding_column",
    "embedding_rows",
    "read_embeddings",
    "shard_ranges",
    "shards_of_process",
]
