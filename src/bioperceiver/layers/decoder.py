"""Perceiver IO query decoding of one scalar per query token (masked-value reconstruction in pretraining)."""

from __future__ import annotations

import torch
from torch import nn

from .attention import CrossAttentionBlock


class TokenValueDecoder(nn.Module):
    """Reads one value per query from the latent array, Perceiver IO style (Jaegle et al. 2021, output queries).

    Each query is an input token's *identity* embedding (e.g. a gene's embedding without its expression value),
    projected to the latent width; it cross-attends to the latents ``(B, M, D)`` in one pre-norm block (attention +
    MLP, residual), and a linear layer on its normalised output gives the value. Queries attend to the latents only,
    never to each other, so a token's prediction does not depend on which other tokens are asked about.
    """

    def __init__(
        self, *, d_query: int, d_latents: int, num_heads: int, widening_factor: int = 1, eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.query_proj = nn.Linear(d_query, d_latents)
        self.block = CrossAttentionBlock(
            d_latents=d_latents,
            d_input=d_latents,
            num_heads=num_heads,
            widening_factor=widening_factor,
            dropout=0.0,
            attention_dropout=0.0,
            eps=eps,
        )
        self.norm = nn.LayerNorm(d_latents, eps=eps)
        self.head = nn.Linear(d_latents, 1)

    def forward(self, queries: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """queries ``(B, N, d_query)``, latents ``(B, M, D)`` -> predicted values ``(B, N)``."""
        if queries.dim() != 3 or latents.dim() != 3 or queries.shape[0] != latents.shape[0]:
            raise ValueError(
                f"queries {tuple(queries.shape)} and latents {tuple(latents.shape)} must be (B, N, d) and (B, M, D)"
            )
        q = self.query_proj(queries.to(self.query_proj.weight.dtype))
        out, _ = self.block(q, latents.to(q.dtype), None)
        return self.head(self.norm(out)).squeeze(-1)
