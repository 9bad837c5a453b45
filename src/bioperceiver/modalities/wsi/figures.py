"""Explanation figures of a ``wsi`` modality: per-tile scores as a heatmap over the slide thumbnail, and a montage
of the top-scoring tiles read back from the slide. Drawn on ``matplotlib.figure.Figure`` (no pyplot)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def _norm(values: np.ndarray):
    from matplotlib.colors import Normalize, TwoSlopeNorm

    top = float(np.abs(values).max()) if values.size else 0.0
    top = top if top > 0 else 1.0
    if values.size and values.min() < 0:
        return "RdBu_r", TwoSlopeNorm(vcenter=0.0, vmin=-top, vmax=top)
    return "Reds", Normalize(vmin=0.0, vmax=top)


def score_grid(coords: np.ndarray, scores: np.ndarray, patch: float, shape: tuple[int, int], downsample: float):
    """Per-pixel scores ``(h, w)`` (NaN off-tissue) of tiles at level-0 ``coords`` with side ``patch``, drawn at
    ``downsample`` level-0 px per pixel."""
    heat = np.full(shape, np.nan, np.float32)
    for (x, y), s in zip(coords, scores):
        x0, y0 = int(x // downsample), int(y // downsample)
        x1 = max(x0 + 1, int(np.ceil((x + patch) / downsample)))
        y1 = max(y0 + 1, int(np.ceil((y + patch) / downsample)))
        heat[y0:y1, x0:x1] = s
    return heat


def slide_heatmap(
    coords: np.ndarray,
    scores: np.ndarray,
    patch: float,
    path: str | Path,
    *,
    thumbnail: np.ndarray | None = None,
    thumbnail_downsample: float | None = None,
    title: str = "",
) -> Path:
    """Tile scores over the thumbnail (or, without one, on the tile grid: one pixel per tile) as a PNG."""
    from matplotlib.figure import Figure

    coords = np.asarray(coords, np.float64)
    scores = np.asarray(scores, np.float64)
    if thumbnail is not None and thumbnail_downsample:
        down, shape = float(thumbnail_downsample), thumbnail.shape[:2]
    else:
        down = float(patch)
        shape = (int((coords[:, 1].max() + patch) // down) + 1, int((coords[:, 0].max() + patch) // down) + 1)
    heat = score_grid(coords, scores, patch, shape, down)
    cmap, norm = _norm(scores)
    fig = Figure(figsize=(7, 7 * shape[0] / max(shape[1], 1) + 0.6))
    ax = fig.add_subplot()
    if thumbnail is not None and thumbnail_downsample:
        ax.imshow(thumbnail)
    im = ax.imshow(np.ma.masked_invalid(heat), cmap=cmap, norm=norm, alpha=0.55 if thumbnail is not None else 1.0)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.7, label="tile score")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def top_tile_montage(
    slide: str | Path,
    coords: np.ndarray,
    scores: np.ndarray,
    patch: float,
    path: str | Path,
    *,
    k: int = 16,
    tile_size: int = 128,
    mpp: float | None = None,
    title: str = "",
) -> Path:
    """The ``k`` highest-scoring tiles read from ``slide`` (best level, resized to ``tile_size``) in a grid PNG."""
    from matplotlib.figure import Figure
    from PIL import Image

    from .reader import open_slide

    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")[:k]
    cols = int(np.ceil(np.sqrt(len(order))))
    rows = int(np.ceil(len(order) / cols))
    fig = Figure(figsize=(1.8 * cols, 1.9 * rows + 0.4))
    with open_slide(slide, mpp=mpp) as reader:
        level = reader.best_level(patch / tile_size)
        size = max(1, round(patch / reader.level_downsamples[level]))
        for j, t in enumerate(order):
            tile = reader.read_region(tuple(int(v) for v in coords[t]), level, (size, size))
            tile = np.asarray(Image.fromarray(tile).resize((tile_size, tile_size), Image.Resampling.BILINEAR))
            ax = fig.add_subplot(rows, cols, j + 1)
            ax.imshow(tile)
            ax.set_title(f"#{j + 1} ({int(coords[t][0])}, {int(coords[t][1])})\n{float(scores[t]):.3g}", fontsize=7)
            ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _grid_step(coords: np.ndarray) -> float:
    steps = [np.diff(np.unique(coords[:, a])) for a in (0, 1)]
    steps = np.concatenate([s[s > 0] for s in steps])
    return float(steps.min()) if steps.size else 1.0


def plot_wsi(attr, sample: int, path: str | Path, modality: str) -> dict[str, Path]:
    """The ``wsi`` explanation of batch index ``sample``: ``{modality: heatmap PNG, modality + "_montage": top
    tiles}`` for the first slide of the cell. Thumbnail and tiles come from the feature file's extraction outputs
    when the processor saw this sample in this process (``WsiProcessor.sources``) and the slide is still there;
    otherwise the heatmap is drawn on the tile grid alone and there is no montage."""
    from PIL import Image

    from .features import read_features

    path = Path(path)
    keep = attr.keep[modality][sample].numpy()
    scores = attr.scores[modality][sample].detach().float().numpy()[keep]
    coords = attr.inputs[modality]["coords"][sample].numpy()[keep]
    slides = attr.inputs[modality].get("slide_index")
    first = (slides[sample].numpy()[keep] == 0) if slides is not None else np.ones(len(coords), bool)
    coords, scores = coords[first], scores[first]
    title = f"{modality} tile scores ({attr.method.replace('_', ' ')})"
    proc = attr.processors.get(modality)
    files = proc.sources(attr.sample_name(sample)) if hasattr(proc, "sources") else None
    meta, thumb, down = None, None, None
    if files:
        try:
            meta = read_features(files[0], mpp=getattr(getattr(proc, "settings", None), "mpp", None))
            thumb_png = Path(files[0]).with_suffix(".thumb.png")
            if thumb_png.exists() and meta.attrs.get("thumbnail_downsample"):
                thumb = np.asarray(Image.open(thumb_png).convert("RGB"))
                down = float(meta.attrs["thumbnail_downsample"])
        except Exception as err:  # a figure never stops an evaluation
            logger.warning("wsi figure: cannot read %s (%s); drawing the tile grid only", files[0], err)
    patch = meta.patch_size_level0 if meta is not None else _grid_step(coords)
    out = {
        modality: slide_heatmap(coords, scores, patch, path, thumbnail=thumb, thumbnail_downsample=down, title=title)
    }
    slide = meta.attrs.get("slide") if meta is not None else None
    if slide and Path(slide).exists():
        try:
            out[f"{modality}_montage"] = top_tile_montage(
                slide,
                coords,
                scores,
                patch,
                path.with_name(path.stem + "_montage.png"),
                mpp=meta.level0_mpp,
                title=f"{modality}: top tiles",
            )
        except Exception as err:
            logger.warning("wsi figure: no montage from %s (%s)", slide, err)
    return out
