"""Real-format whole-slide fixtures for the ``wsi`` tests: pyramidal tiled TIFFs written with ``tifffile`` (levels
as successive pages, µm/px in the resolution tags, deflate or JPEG tiles), whose tissue is real stained-section
pixels (scikit-image's ``ihc.png``, an immunohistochemistry section with a haematoxylin counterstain) placed in a
known rectangle on white glass."""

from __future__ import annotations

from pathlib import Path

import numpy as np

GLASS = 242  # brightness of empty glass
LEVEL0_MPP = 0.25  # µm/px of level 0 (a 40x scan)
SIZE = (2048, 1536)  # level-0 (width, height)
TISSUE_BOX = (512, 256, 1536, 1280)  # level-0 x0, y0, x1, y1 of the tissue
DOWNSAMPLES = (1, 4, 16)


def tissue_pixels() -> np.ndarray:
    """The 512x512 RGB stained section shipped with scikit-image."""
    from skimage import data

    return np.asarray(data.immunohistochemistry())[..., :3]


def slide_level0(size=SIZE, box=TISSUE_BOX) -> np.ndarray:
    """Level-0 RGB (H, W, 3): glass with the section, scaled to fill ``box``, inside it."""
    from PIL import Image

    w, h = size
    image = np.full((h, w, 3), GLASS, np.uint8)
    x0, y0, x1, y1 = box
    section = Image.fromarray(tissue_pixels()).resize((x1 - x0, y1 - y0), Image.Resampling.BICUBIC)
    image[y0:y1, x0:x1] = np.asarray(section)
    return image


def write_pyramid(
    path: str | Path,
    level0: np.ndarray,
    *,
    mpp: float | None = LEVEL0_MPP,
    downsamples=DOWNSAMPLES,
    compression: str = "zlib",
    tile: int = 256,
) -> Path:
    """A tiled pyramidal TIFF of ``level0`` (levels as successive pages); ``mpp=None`` writes no resolution tags."""
    import tifffile
    from PIL import Image

    path = Path(path)
    h, w = level0.shape[:2]
    with tifffile.TiffWriter(path) as tif:
        for i, d in enumerate(downsamples):
            image = (
                level0 if d == 1 else np.asarray(Image.fromarray(level0).resize((w // d, h // d), Image.Resampling.BOX))
            )
            kwargs = {}
            if mpp is not None:
                kwargs = {"resolution": (1e4 / (mpp * d), 1e4 / (mpp * d)), "resolutionunit": "CENTIMETER"}
            tif.write(
                image,
                tile=(tile, tile),
                photometric="rgb",
                compression=compression,
                subfiletype=0 if i == 0 else 1,
                metadata=None,
                **kwargs,
            )
    return path


def make_slide(path, **kwargs) -> Path:
    """The standard fixture slide: 2048x1536 at 0.25 µm/px, tissue in :data:`TISSUE_BOX`."""
    return write_pyramid(path, slide_level0(), **kwargs)


def make_glass_slide(path) -> Path:
    """A slide with no tissue at all."""
    return write_pyramid(path, np.full((SIZE[1], SIZE[0], 3), GLASS, np.uint8))


def make_truncated_slide(path, source) -> Path:
    """The first third of a valid slide file (a copy interrupted mid-way)."""
    data = Path(source).read_bytes()
    Path(path).write_bytes(data[: len(data) // 3])
    return Path(path)
