"""Fourier position features for continuous coordinates (pixels, voxels, time)."""

from __future__ import annotations

import math

import torch
from torch import nn


def grid_coordinates(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Centres of a regular grid in normalised coordinates ``[-1, 1]``: returns ``(prod(shape), len(shape))``.

    Because the coordinates are normalised by the grid extent, a model pretrained at one resolution sees the
    same range of positions at another resolution (only the sampling density changes).
    """
    axes = [(torch.arange(n, device=device, dtype=dtype) + 0.5) / n * 2.0 - 1.0 for n in shape]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(mesh, dim=-1).reshape(-1, len(shape))


class FourierFeatures(nn.Module):
    """``x (..., num_dims) -> Linear([x, sin(2 pi f x), cos(2 pi f x)]) (..., d_out)``.

    Frequencies are fixed and geometrically spaced between ``min_freq`` and ``max_freq`` (cycles per unit of
    ``x``), as in the Perceiver's position encoding; a learned linear map brings them to the token width.

    Args:
        num_dims: number of coordinate axes (2 for images, 3 for volumes, 1 for time).
        num_bands: frequency bands per axis.
        min_freq: lowest frequency in cycles per unit of ``x``.
        max_freq: highest frequency in cycles per unit of ``x``.
        d_out: width of the returned features.
    """

    def __init__(self, *, num_dims: int, num_bands: int, min_freq: float, max_freq: float, d_out: int) -> None:
        super().__init__()
        if not 0 < min_freq <= max_freq:
            raise ValueError(f"need 0 < min_freq <= max_freq, got min_freq={min_freq}, max_freq={max_freq}")
        # Frequencies are recomputed in forward (cheap) instead of kept as a buffer, so that a model built on the
        # meta device by ``from_pretrained`` never holds uninitialised frequency values.
        self.log_min, self.log_max, self.num_bands = math.log10(min_freq), math.log10(max_freq), num_bands
        self.num_dims = num_dims
        self.proj = nn.Linear(num_dims * (2 * num_bands + 1), d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Positions and angles in fp32 whatever the model dtype: bf16 cannot hold angles of ~100 rad (or time
        # stamps of an hour) precisely, and the position information would be lost in mixed precision.
        x = x.float()
        freqs = torch.logspace(self.log_min, self.log_max, self.num_bands, device=x.device, dtype=torch.float32)
        angles = 2 * math.pi * x[..., None] * freqs  # (..., num_dims, num_bands)
        feats = torch.cat([x[..., None], angles.sin(), angles.cos()], dim=-1)  # (..., num_dims, 2 nb + 1)
        return self.proj(feats.flatten(-2).to(self.proj.weight.dtype))
