"""Whole-slide readers: OpenSlide first (SVS, NDPI, MRXS, generic/OME TIFF, DICOM-WSI), ``tiffslide`` as the
fallback, one small interface over both. Scale is physical: a slide without µm/px is an error, never a guess."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...data.errors import DataError

logger = logging.getLogger(__name__)

SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".tif", ".tiff", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm")
BACKENDS = ("auto", "openslide", "tiffslide")
MPP_FIX = "pass --mpp UM_PER_PX (or fill a per-slide 'mpp' manifest column) with the scanner's level-0 resolution"


@dataclass
class SlideReader:
    """One open slide.

    Args:
        path: the slide file.
        handle: the backend's slide object (``openslide.OpenSlide`` or ``tiffslide.TiffSlide``, same API).
        backend: ``"openslide"`` or ``"tiffslide"``.
        mpp: level-0 µm per pixel (from the file, or the override given to :func:`open_slide`).
    """

    path: Path
    handle: object
    backend: str
    mpp: float

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 ``(width, height)``."""
        return tuple(self.handle.dimensions)

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [tuple(d) for d in self.handle.level_dimensions]

    @property
    def level_downsamples(self) -> list[float]:
        return [float(d) for d in self.handle.level_downsamples]

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (read there, then resize down)."""
        best = 0
        for level, d in enumerate(self.level_downsamples):
            if d <= downsample * (1 + 1e-6):
                best = level if d >= self.level_downsamples[best] else best
        return best

    def read_region(self, xy: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB ``(h, w, 3)`` uint8 of ``size`` pixels of ``level`` whose top-left is level-0 ``xy``; transparent
        (outside the scanned area) pixels become white glass."""
        region = np.asarray(self.handle.read_region((int(xy[0]), int(xy[1])), int(level), tuple(map(int, size))))
        if region.shape[-1] == 4 and region[..., 3].min() == 255:  # opaque (the usual case): no blending
            region = region[..., :3]
        elif region.shape[-1] == 4:
            alpha = region[..., 3:4].astype(np.float32) / 255.0
            region = (region[..., :3] * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)
        return region

    def thumbnail(self, downsample: float) -> tuple[np.ndarray, float]:
        """RGB image of the whole slide at about ``downsample`` (read from the best level, resized), and the exact
        level-0 pixels per thumbnail pixel along x."""
        from PIL import Image

        level = self.best_level(downsample)
        w, h = self.level_dimensions[level]
        image = self.read_region((0, 0), level, (w, h))
        tw = max(1, round(self.dimensions[0] / downsample))
        th = max(1, round(self.dimensions[1] / downsample))
        if (tw, th) != (w, h):
            image = np.asarray(Image.fromarray(image).resize((tw, th), Image.Resampling.BILINEAR))
        return image, self.dimensions[0] / tw

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _mpp_from_properties(props, backend: str) -> float | None:
    keys = ("openslide.mpp-x", "openslide.mpp-y") if backend == "openslide" else ("tiffslide.mpp-x", "tiffslide.mpp-y")
    values = []
    for key in keys:
        try:
            value = float(props.get(key))
        except (TypeError, ValueError):
            continue
        if math.isfinite(value) and value > 0:
            values.append(value)
    return values[0] if values else None


def _check_tiff_complete(path: Path) -> None:
    """Raise ``OSError`` when a TIFF's tiles point past the end of the file (a truncated copy): tiffslide opens such
    a file and only fails, tile by tile, when the missing data is read."""
    import tifffile

    size = path.stat().st_size
    with tifffile.TiffFile(path) as tif:
        for page in tif.pages:
            offsets = np.asarray(page.dataoffsets, np.int64)
            counts = np.asarray(page.databytecounts, np.int64)
            if offsets.size and int((offsets + counts).max()) > size:
                raise OSError(
                    f"truncated: tile data ends at byte {int((offsets + counts).max())} of a {size}-byte file"
                )


def _open_backend(path: Path, backend: str):
    if backend == "openslide":
        import openslide

        return openslide.OpenSlide(str(path))
    import tiffslide

    if path.suffix.lower() in (".tif", ".tiff", ".svs", ".ndpi"):
        _check_tiff_complete(path)
    return tiffslide.TiffSlide(str(path))


def open_slide(path: str | os.PathLike, *, mpp: float | None = None, backend: str = "auto") -> SlideReader:
    """Open a slide with OpenSlide, falling back to ``tiffslide`` when OpenSlide cannot read it (``backend="auto"``).

    Args:
        path: the slide file.
        mpp: level-0 µm/px overriding the file's metadata (needed for files without it).
        backend: ``"auto"``, ``"openslide"`` or ``"tiffslide"``.

    Raises:
        DataError: ``missing_slide``, ``unreadable_slide`` (truncated, corrupt, not a slide: both readers failed,
            their messages included) or ``no_mpp`` (no resolution in the file and no ``mpp`` given).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    path = Path(path)
    if not path.is_file():
        raise DataError("missing_slide", f"slide {path} does not exist", fix="fix the path")
    order = ("openslide", "tiffslide") if backend == "auto" else (backend,)
    failures = []
    for name in order:
        try:
            handle = _open_backend(path, name)
            # Touch the data: a truncated pyramid often opens and fails on the first read.
            handle.read_region((0, 0), handle.level_count - 1, (1, 1))
        except Exception as err:  # every reader failure is the finding; try the next reader
            failures.append(f"{name}: {type(err).__name__}: {str(err)[:160]}")
            continue
        found = _mpp_from_properties(handle.properties, name)
        if mpp is None and found is None:
            handle.close()
            raise DataError(
                "no_mpp",
                f"slide {path.name} has no µm/px (mpp) in its metadata; the tile scale cannot be set without it",
                fix=MPP_FIX,
            )
        if mpp is not None and found is not None and not math.isclose(mpp, found, rel_tol=0.02):
            logger.warning("slide %s: --mpp %.4g overrides the file's %.4g µm/px", path.name, mpp, found)
        return SlideReader(path, handle, name, float(mpp if mpp is not None else found))
    raise DataError(
        "unreadable_slide",
        f"slide {path.name} cannot be read ({'; '.join(failures)})",
        fix="re-export or re-copy the slide (truncated or corrupt files fail here); check it opens in QuPath",
    )
