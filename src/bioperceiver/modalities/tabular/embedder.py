"""``tabular``: structured EHR fields as (feature id, numeric or categorical value) tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...layers import ScalarEncoder
from ..embedder import ModalityEmbedder, require_positive


@dataclass
class TabularConfig:
    """Settings of a ``tabular`` modality.

    Args:
        num_features: size of the feature vocabulary (ids in ``[0, num_features)``).
        num_categories: size of the categorical code vocabulary shared by all categorical features; code 0 is
            reserved to mean "this token is numeric", codes >= 1 are categories (the processor keeps an
            unknown bucket per feature).
        num_value_bands: learned frequencies of the numeric-value encoder.
    """

    num_features: int = 256
    num_categories: int = 1024
    num_value_bands: int = 16

    def __post_init__(self) -> None:
        require_positive(
            num_features=self.num_features, num_categories=self.num_categories, num_value_bands=self.num_value_bands
        )


class TabularEmbedder(ModalityEmbedder):
    """Inputs: ``feature_ids`` (B, F) int; ``values`` (B, F) float (standardised numeric value, ignored for
    categorical tokens); optional ``category_ids`` (B, F) int (0 = numeric); optional ``mask`` (B, F).

    A missing value is no token: leave it out or set its mask to False.
    """

    kind = "tabular"
    config_class = TabularConfig
    input_keys = ("feature_ids", "values")
    optional_input_keys = ("category_ids", "mask")
    vocabulary_embeddings = {"num_features": "feature_embeddings", "num_categories": "category_embeddings"}  # noqa: RUF012

    def __init__(self, name: str, config: TabularConfig, d_input: int) -> None:
        super().__init__(name, config, d_input)
        self.feature_embeddings = nn.Embedding(config.num_features, d_input)
        self.category_embeddings = nn.Embedding(config.num_categories, d_input)
        self.value_encoder = ScalarEncoder(d_out=d_input, num_bands=config.num_value_bands)

    def matmul_flops(self, inputs):
        fc1, fc2 = self.value_encoder.fc1, self.value_encoder.fc2  # its input depends on learned frequencies
        ids = inputs["feature_ids"]
        return float(ids.numel() * 2 * (fc1.in_features * fc1.out_features + fc2.in_features * fc2.out_features)), 0.0

    def embed(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, values = inputs["feature_ids"], inputs["values"]
        if ids.dim() != 2 or ids.shape != values.shape:
            raise ValueError(
                f"modality {self.name!r}: feature_ids {tuple(ids.shape)} and values "
                f"{tuple(values.shape)} must both be (B, F)"
            )
        keep = self._mask(inputs, "mask", ids.shape)
        cats = inputs.get("category_ids")
        cats = torch.zeros_like(ids) if cats is None else cats.masked_fill(~keep, 0)
        ids = ids.masked_fill(~keep, 0)
        is_numeric = (cats == 0) & keep
        values = torch.where(is_numeric, values, torch.zeros((), dtype=values.dtype, device=values.device))
        for key, t, n in (
            ("feature_ids", ids, self.config.num_features),
            ("category_ids", cats, self.config.num_categories),
        ):
            if t.numel() and (t.min() < 0 or t.max() >= n):
                raise ValueError(
                    f"modality {self.name!r}: {key} must lie in [0, {n}), found "
                    f"[{int(t.min())}, {int(t.max())}]; refit the tabular processor or raise the size"
                )
        dtype = self.feature_embeddings.weight.dtype
        value_tokens = torch.where(
            is_numeric[..., None], self.value_encoder(values.to(dtype)), self.category_embeddings(cats)
        )  # (B, F, D_in)
        return self.feature_embeddings(ids) + value_tokens, keep

    def value_queries(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Feature embedding (no value) as the query, the standardised value as the target, for numeric features
        (a categorical token's category is not reconstructed)."""
        ids = inputs["feature_ids"]
        keep = self._mask(inputs, "mask", ids.shape)
        cats = inputs.get("category_ids")
        numeric = keep if cats is None else keep & (cats == 0)
        return self.feature_embeddings(ids.masked_fill(~keep, 0)), inputs["values"], numeric
