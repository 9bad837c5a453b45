"""A deterministic tile grid in level-0 pixels at a physical target scale, kept by tissue fraction."""

from __future__ import annotations

import numpy as np


def patch_size_level0(tile_size: int, target_mpp: float, level0_mpp: float) -> int:
    """Level-0 pixels covered by one ``tile_size`` tile at ``target_mpp`` µm/px."""
    return max(1, round(tile_size * target_mpp / level0_mpp))


def tile_grid(
    dimensions: tuple[int, int],
    patch_level0: int,
    mask: np.ndarray,
    mask_downsample: float,
    *,
    min_tissue: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-left level-0 ``(x, y)`` of every whole tile on a regular grid from ``(0, 0)`` with step
    ``patch_level0`` whose tissue fraction (from ``mask`` at ``mask_downsample`` level-0 px per mask px) is at
    least ``min_tissue``, in row-major order; and their tissue fractions.

    Returns:
        ``coords`` (N, 2) int64 and ``fraction`` (N,) float32.
    """
    if not 0 <= min_tissue <= 1:
        raise ValueError(f"min_tissue must lie in [0, 1], got {min_tissue}")
    width, height = dimensions
    nx, ny = width // patch_level0, height // patch_level0
    if nx == 0 or ny == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    # Integral image of the mask: the tissue fraction of any tile in O(1).
    integral = np.pad(mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    xs = np.arange(nx) * patch_level0
    ys = np.arange(ny) * patch_level0
    mh, mw = mask.shape

    def edges(starts: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
        lo = np.clip(np.floor(starts / mask_downsample).astype(np.int64), 0, limit)
        hi = np.clip(np.ceil((starts + patch_level0) / mask_downsample).astype(np.int64), 0, limit)
        return lo, np.maximum(hi, np.minimum(lo + 1, limit))

    x0, x1 = edges(xs, mw)
    y0, y1 = edges(ys, mh)
    area = (y1 - y0)[:, None] * (x1 - x0)[None, :]  # (ny, nx)
    tissue = (
        integral[y1][:, x1] - integral[y0][:, x1] - integral[y1][:, x0] + integral[y0][:, x0]
    )  # (ny, nx) tissue pixels
    fraction = np.where(area > 0, tissue / np.maximum(area, 1), 0.0)
    keep = fraction >= max(min_tissue, 1e-9)
    iy, ix = np.nonzero(keep)  # row-major: deterministic order
    coords = np.stack([xs[ix], ys[iy]], axis=1).astype(np.int64)
    return coords, fraction[iy, ix].astype(np.float32)
