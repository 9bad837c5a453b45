"""``wsi``: tile features of one or several whole slides -> one token per tile."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...layers import FourierFeatures
from ..embedder import ModalityEmbedder, require_positive


@dataclass
class WsiConfig:
    """Settings of a ``wsi`` modality.

    Args:
        feature_dim: width of the patch encoder's tile features (set by the fitted wsi processor).
        num_position_bands: Fourier bands per axis of the tile position in µm.
        min_period_um: shortest period (µm) the position encoding resolves (about one tile at 20x is 112 µm).
        max_period_um: longest period (µm); a tissue section spans up to a few cm.
        max_slides: slides of one patient that a cell may pool (a learned embedding per slide slot).
    """

    feature_dim: int = 1024
    num_position_bands: int = 16
    min_period_um: float = 50.0
    max_period_um: float = 100000.0
    max_slides: int = 16

    def __post_init__(self) -> None:
        require_positive(
            feature_dim=self.feature_dim,
            num_position_bands=self.num_position_bands,
            min_period_um=self.min_period_um,
            max_period_um=self.max_period_um,
            max_slides=self.max_slides,
        )
        if self.min_period_um > self.max_period_um:
            raise ValueError(f"min_period_um={self.min_period_um} must not exceed max_period_um={self.max_period_um}")


class WsiEmbedder(ModalityEmbedder):
    """Inputs: ``features`` (B, N, F) tile features, ``positions`` (B, N, 2) tile centres in µm; optional ``mask``
    (B, N), ``slide_index`` (B, N) (which of a patient's slides a tile is from), ``coords`` (B, N, 2) (level-0
    pixels, only read by attributions).

    Token = LayerNorm+Linear(feature) + Fourier(µm position) + slide-slot embedding. Positions are physical, so
    slides scanned at different magnifications share one scale.
    """

    kind = "wsi"
    config_class = WsiConfig
    input_keys = ("features", "positions")
    optional_input_keys = ("mask", "slide_index", "coords")

    def __init__(self, name: str, config: WsiConfig, d_input: int) -> None:
        super().__init__(name, config, d_input)
        self.feature_norm = nn.LayerNorm(config.feature_dim)
        self.feature_proj = nn.Linear(config.feature_dim, d_input)
        self.position_encoding = FourierFeatures(
            num_dims=2,
            num_bands=config.num_position_bands,
            min_freq=1.0 / config.max_period_um,
            max_freq=1.0 / config.min_period_um,
            d_out=d_input,
        )
        self.slide_embeddings = nn.Embedding(config.max_slides, d_input)

    def matmul_flops(self, inputs):
        b, n, f = inputs["features"].shape
        pos = float(b * n * 2 * self.position_encoding.proj.in_features * self.d_input)
        return float(b * n * 2 * f * self.d_input) + pos, pos

    def embed(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        feats, pos = inputs["features"], inputs["positions"]
        if feats.dim() != 3 or pos.shape != (*feats.shape[:2], 2):
            raise ValueError(
                f"modality {self.name!r}: features must be (B, N, F) and positions (B, N, 2), got "
                f"{tuple(feats.shape)} and {tuple(pos.shape)}"
            )
        if feats.shape[-1] != self.config.feature_dim:
            raise ValueError(
                f"modality {self.name!r}: tile features have width {feats.shape[-1]}, the model expects "
                f"{self.config.feature_dim}; extract with the encoder the model was trained with"
            )
        keep = self._mask(inputs, "mask", feats.shape[:2])  # (B, N)
        slide = inputs.get("slide_index")
        slide = torch.zeros(feats.shape[:2], dtype=torch.long, device=feats.device) if slide is None else slide.long()
        slide = slide.masked_fill(~keep, 0)
        if slide.numel() and int(slide.max()) >= self.config.max_slides:
            raise ValueError(
                f"modality {self.name!r}: a cell pools {int(slide.max()) + 1} slides, more than max_slides="
                f"{self.config.max_slides}; raise max_slides in the modality config"
            )
        dtype = self.feature_proj.weight.dtype
        tokens = (
            self.feature_proj(self.feature_norm(feats.to(dtype)))  # (B, N, D_in)
            + self.position_encoding(pos)  # fp32 angles inside, (B, N, D_in)
            + self.slide_embeddings(slide)
        )
        return tokens, keep
