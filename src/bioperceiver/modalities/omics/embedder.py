"""``omics``: (gene id, value) pairs, any number of measured genes per sample."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...layers import ScalarEncoder
from ..embedder import ModalityEmbedder, require_positive


@dataclass
class OmicsConfig:
    """Settings of an ``omics`` modality.

    Args:
        num_genes: size of the gene vocabulary fitted by the omics processor (ids in ``[0, num_genes)``).
        num_value_bands: learned frequencies of the expression-value encoder.
    """

    num_genes: int = 20000
    num_value_bands: int = 16

    def __post_init__(self) -> None:
        require_positive(num_genes=self.num_genes, num_value_bands=self.num_value_bands)


class OmicsEmbedder(ModalityEmbedder):
    """Inputs: ``gene_ids`` (B, G) int, ``values`` (B, G) float (normalised), optional ``mask`` (B, G).

    Token = gene-id embedding + value encoding. An unmeasured gene is simply not a token (mask False);
    values are never zero-filled into the model.
    """

    kind = "omics"
    config_class = OmicsConfig
    input_keys = ("gene_ids", "values")
    optional_input_keys = ("mask",)
    vocabulary_embeddings = {"num_genes": "gene_embeddings"}  # noqa: RUF012 (class-level constant)

    def __init__(self, name: str, config: OmicsConfig, d_input: int) -> None:
        super().__init__(name, config, d_input)
        self.gene_embeddings = nn.Embedding(config.num_genes, d_input)
        self.value_encoder = ScalarEncoder(d_out=d_input, num_bands=config.num_value_bands)

    def matmul_flops(self, inputs):
        fc1, fc2 = self.value_encoder.fc1, self.value_encoder.fc2  # its input depends on learned frequencies
        ids = inputs["gene_ids"]
        return float(ids.numel() * 2 * (fc1.in_features * fc1.out_features + fc2.in_features * fc2.out_features)), 0.0

    def embed(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, values = inputs["gene_ids"], inputs["values"]
        if ids.dim() != 2 or ids.shape != values.shape:
            raise ValueError(
                f"modality {self.name!r}: gene_ids {tuple(ids.shape)} and values "
                f"{tuple(values.shape)} must both be (B, G)"
            )
        keep = self._mask(inputs, "mask", ids.shape)
        ids = ids.masked_fill(~keep, 0)
        values = torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device))
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.config.num_genes):
            raise ValueError(
                f"modality {self.name!r}: gene ids must lie in [0, {self.config.num_genes}), found "
                f"[{int(ids.min())}, {int(ids.max())}]; refit the gene vocabulary or raise num_genes"
            )
        dtype = self.gene_embeddings.weight.dtype
        tokens = self.gene_embeddings(ids) + self.value_encoder(values.to(dtype))  # (B, G, D_in)
        return tokens, keep
