"""Encoding of scalar measurements (expression values, lab values) as token features."""

from __future__ import annotations

import math

import torch
from torch import nn


class ScalarEncoder(nn.Module):
    """Periodic-linear encoding of a scalar: ``v -> MLP([v, sin(2 pi f v), cos(2 pi f v)])``.

    The frequencies ``f`` are learned (initialised log-spaced over ``[1/16, 4]`` cycles per unit), which lets
    the model resolve both coarse and fine differences of standardised values (Gorishniy et al., 2022).

    Args:
        d_out: width of the returned features.
        num_bands: number of learned frequencies.
    """

    def __init__(self, *, d_out: int, num_bands: int = 16) -> None:
        super().__init__()
        self.freqs = nn.Parameter(torch.logspace(math.log10(1 / 16), math.log10(4.0), num_bands))
        self.fc1 = nn.Linear(2 * num_bands + 1, d_out)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_out, d_out)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        angles = 2 * math.pi * values[..., None] * self.freqs  # (..., num_bands)
        feats = torch.cat([values[..., None], angles.sin(), angles.cos()], dim=-1)  # (..., 2 nb + 1)
        return self.fc2(self.act(self.fc1(feats)))
