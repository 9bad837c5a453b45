"""Slides -> tissue -> tiles -> frozen-encoder features, one ``<slide>.h5`` per slide.

``python -m bioperceiver.modalities.wsi.extract --slides DIR|MANIFEST --output_dir OUT --target_mpp 0.5
--tile_size 224 --encoder NAME --encoder_weights PATH|none`` writes per slide ``<id>.h5`` (features, coords and
attributes), ``<id>.thumb.png``, ``<id>.mask.png`` and ``<id>.tissue.geojson``; per shard a summary table
``summary_shard<I>of<C>.csv`` (slide, status, tiles, tissue area, seconds, error); and with ``--merge`` (after all
shards) ``summary.csv`` and the manifest fragment ``manifest_wsi.csv`` (``slide_id``, ``wsi``). A finished slide
(its ``.h5`` exists) is skipped, so a killed run resumes where it stopped. ``--shard INDEX/COUNT`` defaults from
``SLURM_ARRAY_TASK_ID``/``SLURM_ARRAY_TASK_COUNT`` or the launcher's ``RANK``/``WORLD_SIZE``: slide ``k`` (in sorted
order) belongs to shard ``k % COUNT``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ...data.errors import DataError
from .features import PatchEncoder, TileDataset, encode_tiles, load_encoder, write_features
from .reader import SLIDE_SUFFIXES, open_slide
from .tiling import patch_size_level0, tile_grid
from .tissue import TissueSettings, detect_tissue, save_mask

logger = logging.getLogger(__name__)

SUMMARY_COLUMNS = ("slide_id", "slide", "status", "tiles", "tissue_area_mm2", "seconds", "reason", "error", "h5")


@dataclass
class ExtractSettings:
    """How a slide becomes features.

    Args:
        target_mpp: µm per pixel of the tiles (0.5 ≈ 20x).
        tile_size: tile width = height in pixels at ``target_mpp``.
        min_tissue: fraction of a tile that must be tissue for it to be kept.
        thumbnail_mpp: µm per pixel of the thumbnail the tissue is detected on.
        batch_size: tiles per encoder batch.
        num_workers: DataLoader worker processes reading regions.
        mpp: level-0 µm/px overriding the slide's metadata (``None``: from the file; missing -> error).
    """

    target_mpp: float = 0.5
    tile_size: int = 224
    min_tissue: float = 0.5
    thumbnail_mpp: float = 8.0
    batch_size: int = 64
    num_workers: int = 0
    mpp: float | None = None

    def __post_init__(self) -> None:
        for key in ("target_mpp", "tile_size", "thumbnail_mpp", "batch_size"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")


def slide_id_of(path: str | os.PathLike) -> str:
    """File name without its slide suffix, made safe for file names."""
    name = Path(path).name
    for suffix in sorted((*SLIDE_SUFFIXES, ".ome.tif", ".ome.tiff"), key=len, reverse=True):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def extract_slide(
    slide: str | os.PathLike,
    output_dir: str | os.PathLike,
    encoder: PatchEncoder,
    settings: ExtractSettings | None = None,
    *,
    slide_id: str | None = None,
    tissue: TissueSettings | None = None,
    mpp: float | None = None,
    progress: bool = True,
) -> dict:
    """One slide -> ``<output_dir>/<slide_id>.h5`` (+ thumbnail, mask PNG, GeoJSON). Returns its summary row.

    Raises :class:`DataError` (``unreadable_slide``, ``no_mpp``, ``no_tissue``, ...) naming the slide."""
    settings = settings or ExtractSettings()
    start = time.perf_counter()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    slide_id = slide_id or slide_id_of(slide)
    mpp = mpp if mpp is not None else settings.mpp
    with open_slide(slide, mpp=mpp) as reader:
        thumb, thumb_down = reader.thumbnail(settings.thumbnail_mpp / reader.mpp)
        mask = detect_tissue(thumb, tissue)
        patch = patch_size_level0(settings.tile_size, settings.target_mpp, reader.mpp)
        coords, _fraction = tile_grid(reader.dimensions, patch, mask, thumb_down, min_tissue=settings.min_tissue)
        level0_mpp, dims = reader.mpp, reader.dimensions
    from PIL import Image

    Image.fromarray(thumb).save(output_dir / f"{slide_id}.thumb.png")
    save_mask(mask, output_dir / f"{slide_id}.mask.png", output_dir / f"{slide_id}.tissue.geojson", thumb_down)
    if not len(coords):
        raise DataError(
            "no_tissue",
            f"slide {Path(slide).name}: no tile of {settings.tile_size} px at {settings.target_mpp} µm/px holds "
            f">= {settings.min_tissue:.0%} tissue (all glass, or tissue detection failed; see {slide_id}.mask.png)",
            fix="check the slide; lower --min_tissue or TissueSettings.min_saturation for faint stains",
        )
    dataset = TileDataset(slide, coords, patch, settings.tile_size, mpp=mpp)
    features = encode_tiles(
        dataset, encoder, batch_size=settings.batch_size, num_workers=settings.num_workers, progress=progress
    )
    h5 = write_features(
        output_dir / f"{slide_id}.h5",
        features,
        coords,
        patch_size_level0=patch,
        target_mpp=settings.target_mpp,
        tile_size=settings.tile_size,
        level0_mpp=level0_mpp,
        level0_dimensions=np.asarray(dims, np.int64),
        thumbnail_downsample=thumb_down,
        encoder=encoder.name,
        encoder_weights_sha256=encoder.weights_hash,
        slide=str(Path(slide).resolve()),
    )
    tissue_mm2 = float(mask.sum()) * (thumb_down * level0_mpp / 1000.0) ** 2
    return {
        "slide_id": slide_id,
        "slide": str(slide),
        "status": "ok",
        "tiles": len(coords),
        "tissue_area_mm2": round(tissue_mm2, 4),
        "seconds": round(time.perf_counter() - start, 3),
        "reason": "",
        "error": "",
        "h5": h5.name,
    }


# ---- the slide list and sharding -----------------------------------------------------------------------------------
def list_slides(source: str | os.PathLike) -> pd.DataFrame:
    """A folder (every slide file in it, sorted) or a manifest (CSV/Parquet with a ``slide`` column, optional
    ``slide_id`` and ``mpp``) -> a table ``slide_id, slide, mpp`` sorted by ``slide_id``."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and p.name.lower().endswith(SLIDE_SUFFIXES))
        table = pd.DataFrame({"slide": [str(p) for p in files]})
    elif source.is_file():
        table = pd.read_parquet(source) if source.suffix == ".parquet" else pd.read_csv(source)
        if "slide" not in table.columns:
            raise ValueError(f"{source} has no 'slide' column (columns: {list(table.columns)}); name the slide paths")
        table = table.copy()
        table["slide"] = [str(p if Path(p).is_absolute() else source.parent / p) for p in table["slide"]]
    else:
        raise ValueError(f"--slides {source} is neither a folder of slides nor a manifest file")
    if "slide_id" not in table.columns:
        table["slide_id"] = [slide_id_of(p) for p in table["slide"]]
    table["slide_id"] = table["slide_id"].astype(str)
    dup = table["slide_id"][table["slide_id"].duplicated()].tolist()
    if dup:
        raise ValueError(f"duplicate slide ids {dup[:5]}: give a unique 'slide_id' column in a manifest")
    if "mpp" not in table.columns:
        table["mpp"] = np.nan
    return table.sort_values("slide_id", kind="stable").reset_index(drop=True)[["slide_id", "slide", "mpp"]]


def default_shard(env: dict | None = None) -> tuple[int, int]:
    """``(index, count)`` from a SLURM array, else a launcher's ``RANK``/``WORLD_SIZE`` (torchrun, accelerate),
    else ``(0, 1)``."""
    env = os.environ if env is None else env
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
    if "WORLD_SIZE" in env:
        return int(env.get("RANK", 0)), int(env["WORLD_SIZE"])
    return 0, 1


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return default_shard()
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not int(match[1]) < int(match[2]):
        raise ValueError(f"--shard must be INDEX/COUNT with 0 <= INDEX < COUNT (e.g. 0/4), got {text!r}")
    return int(match[1]), int(match[2])


def run_extraction(
    slides: pd.DataFrame,
    output_dir: str | os.PathLike,
    encoder: PatchEncoder,
    settings: ExtractSettings,
    *,
    shard: tuple[int, int] = (0, 1),
    on_error: str = "raise",
    tissue: TissueSettings | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Extract this shard's slides; finished slides are skipped (``status`` ``done``), bad ones raise
    (``on_error="raise"``) or are logged, counted and listed with ``status`` ``skipped`` and the reason."""
    from tqdm.auto import tqdm

    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    index, count = shard
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    mine = slides.iloc[index::count]
    rows = []
    for row in tqdm(mine.itertuples(index=False), total=len(mine), desc="slides", disable=not progress):
        h5 = output_dir / f"{row.slide_id}.h5"
        if h5.exists():
            rows.append({"slide_id": row.slide_id, "slide": row.slide, "status": "done", "h5": h5.name})
            continue
        mpp = None if pd.isna(row.mpp) else float(row.mpp)
        try:
            rows.append(
                extract_slide(
                    row.slide,
                    output_dir,
                    encoder,
                    settings,
                    slide_id=row.slide_id,
                    tissue=tissue,
                    mpp=mpp,
                    progress=progress,
                )
            )
        except DataError as err:
            err = err.located(sample_id=row.slide_id, modality="wsi")
            if on_error == "raise":
                raise err from None
            logger.warning("skipped slide %s: %s", row.slide_id, err)
            rows.append(
                {
                    "slide_id": row.slide_id,
                    "slide": row.slide,
                    "status": "skipped",
                    "reason": err.reason,
                    "error": str(err),
                }
            )
    summary = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    summary.to_csv(output_dir / f"summary_shard{index}of{count}.csv", index=False)
    skipped = int((summary["status"] == "skipped").sum())
    logger.info(
        "shard %d/%d: %d slides extracted, %d already done, %d skipped%s",
        index,
        count,
        int((summary["status"] == "ok").sum()),
        int((summary["status"] == "done").sum()),
        skipped,
        f" ({summary.loc[summary['status'] == 'skipped', 'reason'].value_counts().to_dict()})" if skipped else "",
    )
    return summary


def merge_shards(output_dir: str | os.PathLike) -> pd.DataFrame:
    """Join every shard's summary into ``summary.csv`` and write the manifest fragment ``manifest_wsi.csv``
    (``slide_id``, ``wsi`` = the feature file, relative to ``output_dir``) of the slides that have features."""
    output_dir = Path(output_dir)
    parts = sorted(output_dir.glob("summary_shard*of*.csv"))
    if not parts:
        raise ValueError(f"no summary_shard*.csv in {output_dir}: run the extraction shards first")
    counts = {int(re.search(r"of(\d+)", p.name)[1]) for p in parts}
    if len(counts) > 1:
        raise ValueError(f"{output_dir} holds summaries of different shard counts {sorted(counts)}; remove stale ones")
    summary = pd.concat([pd.read_csv(p, dtype={"slide_id": str}) for p in parts], ignore_index=True)
    summary = summary.sort_values("slide_id", kind="stable").drop_duplicates("slide_id", keep="last")
    summary.to_csv(output_dir / "summary.csv", index=False)
    have = summary[summary["h5"].notna() & summary["h5"].map(lambda n: (output_dir / str(n)).exists())]
    fragment = pd.DataFrame({"slide_id": have["slide_id"], "wsi": have["h5"]})
    fragment.to_csv(output_dir / "manifest_wsi.csv", index=False)
    logger.info("merged %d shard(s): %d slides with features -> %s", len(parts), len(fragment), "manifest_wsi.csv")
    return fragment


# ---- CLI -----------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bioperceiver.modalities.wsi.extract",
        description="Whole slides -> tissue -> tiles at a physical scale -> frozen-encoder features (<slide>.h5).",
    )
    p.add_argument("--slides", help="folder of slides, or a CSV/Parquet manifest with a 'slide' column")
    p.add_argument("--output_dir", required=True, help="where the .h5 files, thumbnails, masks and tables go")
    p.add_argument("--target_mpp", type=float, default=0.5, help="µm per pixel of the tiles (0.5 ≈ 20x)")
    p.add_argument("--tile_size", type=int, default=224, help="tile size in pixels at --target_mpp")
    p.add_argument("--min_tissue", type=float, default=0.5, help="tissue fraction a kept tile needs")
    p.add_argument("--mpp", type=float, default=None, help="level-0 µm/px for slides without it in their metadata")
    p.add_argument("--encoder", default="resnet50", help="timm model name of the patch encoder")
    p.add_argument(
        "--encoder_weights", default=None, help="local weights file (.safetensors / torch state dict), or 'none'"
    )
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_workers", type=int, default=2, help="DataLoader workers reading regions")
    p.add_argument("--device", default=None, help="cpu / cuda / cuda:1 (default: cuda when available)")
    p.add_argument("--shard", default=None, help="INDEX/COUNT (default: SLURM array or RANK/WORLD_SIZE, else 0/1)")
    p.add_argument("--merge", action="store_true", help="after extracting, merge all shard summaries (or only merge)")
    p.add_argument("--on_error", choices=("raise", "skip"), default="raise", help="a bad slide stops or is skipped")
    p.add_argument("--no_progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.slides is None and not args.merge:
        build_parser().error("give --slides (and/or --merge)")
    if args.slides is not None:
        if args.encoder_weights is None:
            build_parser().error("give --encoder_weights PATH (a local file) or --encoder_weights none (random)")
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        settings = ExtractSettings(
            target_mpp=args.target_mpp,
            tile_size=args.tile_size,
            min_tissue=args.min_tissue,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            mpp=args.mpp,
        )
        encoder = load_encoder(args.encoder, args.encoder_weights, device=device)
        summary = run_extraction(
            list_slides(args.slides),
            args.output_dir,
            encoder,
            settings,
            shard=parse_shard(args.shard),
            on_error=args.on_error,
            progress=not args.no_progress,
        )
        logger.info("slides by status: %s", json.dumps(summary["status"].value_counts().to_dict()))
    if args.merge:
        fragment = merge_shards(args.output_dir)
        logger.info("manifest fragment: %s (%d slides)", Path(args.output_dir) / "manifest_wsi.csv", len(fragment))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
