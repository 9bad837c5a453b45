"""Pre-norm attention blocks of the Perceiver encoder.

Every attention call goes through ``torch.nn.functional.scaled_dot_product_attention`` so that fused
kernels (flash / memory-efficient on GPU, the flash kernel on CPU) are used and the ``(B, H, M, N)``
attention matrix is never materialised. ``need_weights=True`` switches to an explicit softmax path that
also returns the attention probabilities (for interpretability); it is slower and uses O(M * N) memory.

Mask convention used everywhere in BioPerceiver: a boolean **keep-mask**, ``True`` = a real token that
may be attended to, ``False`` = padding or an absent modality.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Mlp(nn.Module):
    """Two-layer GELU MLP: ``dim -> dim * widening_factor -> dim``."""

    def __init__(self, *, dim: int, widening_factor: int, dropout: float) -> None:
        super().__init__()
        hidden = dim * widening_factor
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep_mask: torch.Tensor | None,
    dropout_p: float,
    need_weights: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q (B, H, M, dh), k/v (B, H, N, dh), keep_mask (B, N) bool -> out (B, H, M, dh), weights."""
    attn_mask = None if keep_mask is None else keep_mask[:, None, None, :]  # (B, 1, 1, N)
    if not need_weights:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p), None
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, M, N)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    out = F.dropout(weights, p=dropout_p) @ v
    return out, weights


class CrossAttention(nn.Module):
    """Multi-head attention from latent queries ``(B, M, d_q)`` to input tokens ``(B, N, d_kv)``."""

    def __init__(
        self,
        *,
        d_q: int,
        d_kv: int,
        num_heads: int,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        qk_channels = qk_channels or d_q
        v_channels = v_channels or qk_channels
        if qk_channels % num_heads or v_channels % num_heads:
            raise ValueError(
                f"attention channels ({qk_channels}, {v_channels}) must be divisible by num_heads={num_heads}; "
                "change the head count or the width"
            )
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_q, qk_channels)
        self.k_proj = nn.Linear(d_kv, qk_channels)
        self.v_proj = nn.Linear(d_kv, v_channels)
        self.out_proj = nn.Linear(v_channels, d_q)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # (B, H, N, dh)

    def forward(
        self,
        queries: torch.Tensor,
        keys_values: torch.Tensor,
        keep_mask: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, m, _ = queries.shape
        q = self._heads(self.q_proj(queries))  # (B, H, M, dh)
        k = self._heads(self.k_proj(keys_values))  # (B, H, N, dh)
        v = self._heads(self.v_proj(keys_values))  # (B, H, N, dv)
        p = self.dropout if self.training else 0.0
        out, weights = _attend(q, k, v, keep_mask, p, need_weights)
        out = out.transpose(1, 2).reshape(b, m, -1)  # (B, M, v_channels)
        return self.out_proj(out), weights


class SelfAttention(CrossAttention):
    """Multi-head self-attention over the latent array ``(B, M, D)`` (no mask: latents are never padding)."""

    def __init__(self, *, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__(d_q=dim, d_kv=dim, num_heads=num_heads, dropout=dropout)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return super().forward(x, x, None, need_weights)


class CrossAttentionBlock(nn.Module):
    """latents <- latents + CrossAttn(LN(latents), LN(tokens)); latents <- latents + MLP(LN(latents))."""

    def __init__(
        self,
        *,
        d_latents: int,
        d_input: int,
        num_heads: int,
        widening_factor: int,
        dropout: float,
        attention_dropout: float,
        eps: float,
    ) -> None:
        super().__init__()
        self.norm_latents = nn.LayerNorm(d_latents, eps=eps)
        self.norm_inputs = nn.LayerNorm(d_input, eps=eps)
        self.attn = CrossAttention(d_q=d_latents, d_kv=d_input, num_heads=num_heads, dropout=attention_dropout)
        self.drop = nn.Dropout(dropout)
        self.norm_mlp = nn.LayerNorm(d_latents, eps=eps)
        self.mlp = Mlp(dim=d_latents, widening_factor=widening_factor, dropout=dropout)

    def forward(
        self,
        latents: torch.Tensor,
        tokens: torch.Tensor,
        keep_mask: torch.Tensor,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, weights = self.attn(self.norm_latents(latents), self.norm_inputs(tokens), keep_mask, need_weights)
        latents = latents + self.drop(out)  # (B, M, D)
        latents = latents + self.mlp(self.norm_mlp(latents))
        return latents, weights


class SelfAttentionBlock(nn.Module):
    """Pre-norm transformer block on the latent array."""

    def __init__(
        self, *, dim: int, num_heads: int, widening_factor: int, dropout: float, attention_dropout: float, eps: float
    ) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim=dim, num_heads=num_heads, dropout=attention_dropout)
        self.drop = nn.Dropout(dropout)
        self.norm_mlp = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim=dim, widening_factor=widening_factor, dropout=dropout)

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, weights = self.attn(self.norm_attn(x), need_weights)
        x = x + self.drop(out)  # (B, M, D)
        x = x + self.mlp(self.norm_mlp(x))
        return x, weights
