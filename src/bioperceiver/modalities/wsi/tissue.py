"""Tissue detection on a low-resolution image of the slide: saturation + Otsu, then morphology (closing, small
specks and holes removed). Pen-mark filtering: strongly blue/green/black pixels are not tissue (optional)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class TissueSettings:
    """Settings of :func:`detect_tissue`.

    Args:
        min_saturation: floor on the Otsu threshold of HSV saturation (0-1): glass stays glass on an empty slide.
        max_saturation: cap on that threshold: on a slide that is mostly strongly stained tissue Otsu would split
            the stain intensities and drop pale tissue.
        closing_radius: radius (thumbnail pixels) of the morphological closing that joins nearby tissue.
        min_object_area: connected tissue pieces smaller than this (thumbnail pixels) are removed (specks, dust).
        max_hole_area: holes smaller than this (thumbnail pixels) inside tissue are filled.
        remove_pen: leave out pen marks (blue/green hue, or very dark pixels).
    """

    min_saturation: float = 0.05
    max_saturation: float = 0.15
    closing_radius: int = 2
    min_object_area: int = 64
    max_hole_area: int = 256
    remove_pen: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.min_saturation < 1:
            raise ValueError(f"min_saturation must lie in [0, 1), got {self.min_saturation}")
        for key in ("closing_radius", "min_object_area", "max_hole_area"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")


def detect_tissue(rgb: np.ndarray, settings: TissueSettings | None = None) -> np.ndarray:
    """Boolean tissue mask ``(h, w)`` of an RGB uint8 image ``(h, w, 3)``."""
    from skimage import color, filters, morphology

    settings = settings or TissueSettings()
    hsv = color.rgb2hsv(rgb[..., :3])
    sat = hsv[..., 1]
    threshold = settings.min_saturation
    if np.ptp(sat) > 0:
        threshold = min(max(threshold, float(filters.threshold_otsu(sat))), max(settings.max_saturation, threshold))
    mask = sat > threshold
    if settings.remove_pen:
        hue, val = hsv[..., 0], hsv[..., 2]
        pen = ((hue > 0.25) & (hue < 0.72) & (sat > 0.3)) | (val < 0.15)  # green/blue ink, black ink
        mask &= ~pen
    if settings.closing_radius:
        mask = morphology.closing(mask, morphology.disk(settings.closing_radius))
    if settings.min_object_area:
        mask = morphology.remove_small_objects(mask, max_size=settings.min_object_area)
    if settings.max_hole_area:
        mask = morphology.remove_small_holes(mask, max_size=settings.max_hole_area)
    return mask


def mask_to_geojson(mask: np.ndarray, downsample: float) -> dict:
    """Tissue contours as a GeoJSON ``FeatureCollection`` of polygons in level-0 pixel coordinates."""
    from skimage import measure

    padded = np.pad(mask.astype(np.uint8), 1)  # contours close at the image border
    features = []
    for contour in measure.find_contours(padded, 0.5):
        if len(contour) < 4:
            continue
        xy = (contour[:, ::-1] - 1) * downsample  # (row, col) -> (x, y), undo the padding, to level 0
        ring = [[round(float(x), 1), round(float(y), 1)] for x, y in xy]
        if ring[0] != ring[-1]:
            ring.append(ring[0])
        features.append(
            {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": {"tissue": True}}
        )
    return {"type": "FeatureCollection", "features": features}


def save_mask(mask: np.ndarray, png: str | Path, geojson: str | Path, downsample: float) -> None:
    """The mask as a PNG (white = tissue) and its contours as GeoJSON (level-0 pixels)."""
    from PIL import Image

    Image.fromarray(mask.astype(np.uint8) * 255).save(png)
    Path(geojson).write_text(json.dumps(mask_to_geojson(mask, downsample)))
