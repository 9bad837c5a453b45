"""Pre-norm attention blocks of the Perceiver encoder.

Every attention call goes through ``torch.nn.functional.scaled_dot_product_attention`` so that fused
kernels (flash / memory-efficient on GPU, the flash kernel on CPU) are used and the ``(B, H, M, N)``
attention matrix is never materialised. ``need_weights=True`` switches to an explicit softmax path that
also returns the attention probabilities (for interpretability); it is slower and uses O(M * N) memory.

Mask convention used everywhere in BioPerceiver: a boolean **keep-mask**, ``True`` = a real token that
may be attended to, ``False`` = padding or an absent modality.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class PackedTokens:
    """Padding-free layout of the input tokens of ``S`` attention segments (one segment = one sample's view).

    ``tokens`` holds every real token once; segment ``s`` attends to ``tokens[index[cu_seqlens[s]:cu_seqlens[s+1]]]``
    (``index=None``: the stream is already in segment order). Several views of one sample (fused, one modality,
    leave-one-out) are segments that share tokens: their keys and values are projected once and gathered.

    Args:
        tokens: ``(T, D_in)`` the real tokens, no padding.
        cu_seqlens: ``(S + 1,)`` int64 offsets of the segments in the (gathered) key stream, ``cu_seqlens[0] = 0``.
        lengths: the ``S`` segment lengths as Python ints (the CPU path loops over them without a device sync).
        index: ``(sum(lengths),)`` int64 positions in ``tokens`` of every segment's keys, or ``None``.
    """

    tokens: torch.Tensor
    cu_seqlens: torch.Tensor
    lengths: tuple[int, ...]
    index: torch.Tensor | None = None

    @property
    def num_segments(self) -> int:
        return len(self.lengths)

    @property
    def max_len(self) -> int:
        return max(self.lengths, default=0)

    @classmethod
    def from_segments(cls, tokens: torch.Tensor, index: torch.Tensor | None, lengths: list[int]) -> PackedTokens:
        if any(n <= 0 for n in lengths):
            raise ValueError(f"every packed segment needs at least one token, got lengths {lengths}")
        total = sum(lengths)
        if (index.numel() if index is not None else tokens.shape[0]) != total:
            raise ValueError(
                f"segment lengths sum to {total} but the key stream has "
                f"{index.numel() if index is not None else tokens.shape[0]} tokens"
            )
        cu = torch.zeros(len(lengths) + 1, dtype=torch.long)
        cu[1:] = torch.tensor(lengths, dtype=torch.long).cumsum(0)
        return cls(tokens=tokens, cu_seqlens=cu.to(tokens.device), lengths=tuple(int(n) for n in lengths), index=index)


def _varlen_available(q: torch.Tensor, dropout_p: float) -> bool:
    """Flash varlen (``torch.nn.attention.varlen``) runs on CUDA in fp16/bf16, without attention dropout."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16) or dropout_p > 0 or q.shape[-1] > 256:
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401  (torch >= 2.10)
    except ImportError:
        return False
    return True


def packed_attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedTokens, dropout_p: float
) -> torch.Tensor:
    """Every segment's ``M`` queries against that segment's keys only; no padded key is ever scored.

    q ``(S, H, M, dh)``, k/v ``(T_kv, H, dh)`` in segment order (already gathered) -> out ``(S, H, M, dv)``.
    On CUDA in half precision: one ``varlen_attn`` call (flash attention with separate query/key offsets).
    Elsewhere: one ``scaled_dot_product_attention`` per segment on slices of the key stream (its fused CPU kernel;
    the loop costs ~10 us a segment, measured faster on CPU than FlexAttention or nested tensors, see
    ``benchmarks/RESULTS.md``).
    """
    s, h, m, dh = q.shape
    if _varlen_available(q, dropout_p):
        from torch.nn.attention.varlen import varlen_attn

        cu_k = packed.cu_seqlens.to(device=q.device, dtype=torch.int32)
        cu_q = torch.arange(0, (s + 1) * m, m, device=q.device, dtype=torch.int32)
        out = varlen_attn(
            q.transpose(1, 2).reshape(s * m, h, dh), k, v, cu_q, cu_k, m, packed.max_len
        )  # (S * M, H, dv)
        return out.view(s, m, h, -1).transpose(1, 2)
    # split/unbind, not slicing: their backward concatenates the per-segment gradients once, where the backward of
    # each slice would materialise a zero-filled gradient of the whole key stream (O(S x T) time and memory)
    ks = k.transpose(0, 1).split(list(packed.lengths), dim=1)  # S x (H, n_s, dh)
    vs = v.transpose(0, 1).split(list(packed.lengths), dim=1)
    outs = [
        F.scaled_dot_product_attention(qi, ki, vi, dropout_p=dropout_p)  # (H, M, dv)
        for qi, ki, vi in zip(q.unbind(0), ks, vs, strict=True)
    ]
    return torch.stack(outs)


class _NormKV(torch.autograd.Function):
    """``LayerNorm(x) -> (x_n W_k^T + b_k, x_n W_v^T + b_v)`` recomputing ``x_n`` in backward.

    Over the N input tokens this is the dominant activation memory of the encoder. Storing nothing but the
    per-token mean and inverse std (the input ``x`` is kept alive by the graph anyway) saves one ``(N, d_kv)``
    activation per cross-attention, and taking ``grad_k``/``grad_v`` separately avoids concatenating them. The
    recomputation is one LayerNorm, negligible next to the projections. Mixed precision: the LayerNorm runs in
    fp32 and the projections in the autocast dtype, as autocast itself would do.
    """

    @staticmethod
    def forward(ctx, x, norm_w, norm_b, w_k, b_k, w_v, b_v, eps: float):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        acc = torch.promote_types(x.dtype, torch.float32)  # LayerNorm precision: at least fp32
        with torch.autocast(device, enabled=False):
            y, mean, rstd = torch.native_layer_norm(x.to(acc), (x.shape[-1],), norm_w.to(acc), norm_b.to(acc), eps)
            y = y.to(dtype)
            k = F.linear(y, w_k.to(dtype), b_k.to(dtype))  # (B, N, C_k)
            v = F.linear(y, w_v.to(dtype), b_v.to(dtype))  # (B, N, C_v)
        ctx.save_for_backward(x, norm_w, norm_b, w_k, w_v, mean, rstd)
        ctx.compute_dtype = dtype
        return k, v

    @staticmethod
    def backward(ctx, grad_k, grad_v):
        x, norm_w, norm_b, w_k, w_v, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        dtype, d = ctx.compute_dtype, x.shape[-1]
        acc = mean.dtype
        with torch.autocast(x.device.type, enabled=False):
            xf = x.to(acc)
            y = ((xf - mean) * rstd * norm_w.to(acc) + norm_b.to(acc)).to(dtype).reshape(-1, d)  # recomputed
            gk = grad_k.to(dtype).reshape(-1, grad_k.shape[-1])
            gv = grad_v.to(dtype).reshape(-1, grad_v.shape[-1])
            grad_wk = (gk.T @ y).to(w_k.dtype) if need[3] else None
            grad_wv = (gv.T @ y).to(w_v.dtype) if need[5] else None
            grad_bk = gk.sum(0).to(w_k.dtype) if need[4] else None
            grad_bv = gv.sum(0).to(w_v.dtype) if need[6] else None
            del y
            grad_x = grad_nw = grad_nb = None
            if need[0] or need[1] or need[2]:
                grad_y = gk @ w_k.to(dtype)
                grad_y.addmm_(gv, w_v.to(dtype))  # (B*N, d), accumulated in place
                grad_x, grad_nw, grad_nb = torch.ops.aten.native_layer_norm_backward(
                    grad_y.to(acc).view_as(xf),
                    xf,
                    (d,),
                    mean,
                    rstd,
                    norm_w.to(acc),
                    norm_b.to(acc),
                    [need[0], need[1], need[2]],
                )
                grad_x = grad_x.to(x.dtype) if grad_x is not None else None
                grad_nw = grad_nw.to(norm_w.dtype) if grad_nw is not None else None
                grad_nb = grad_nb.to(norm_b.dtype) if grad_nb is not None else None
        return grad_x, grad_nw, grad_nb, grad_wk, grad_bk, grad_wv, grad_bv, None


class CrossAttention(nn.Module):
    """Multi-head attention from latent queries ``(B, M, d_q)`` to input tokens ``(B, N, d_kv)``.

    The input tokens are layer-normalised here (``norm_kv``) together with the key/value projections, in one
    memory-saving step (see :class:`_NormKV`); the queries arrive already normalised.
    """

    def __init__(
        self,
        *,
        d_q: int,
        d_kv: int,
        num_heads: int,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        dropout: float = 0.0,
        eps: float = 1e-5,
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
        self.norm_kv = nn.LayerNorm(d_kv, eps=eps)
        self.q_proj = nn.Linear(d_q, qk_channels)
        self.k_proj = nn.Linear(d_kv, qk_channels)
        self.v_proj = nn.Linear(d_kv, v_channels)
        self.out_proj = nn.Linear(v_channels, d_q)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # (B, H, N, dh)

    def project_kv(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, N, d_kv) -> keys (B, N, C_k), values (B, N, C_v) of the normalised tokens."""
        norm = self.norm_kv
        return _NormKV.apply(
            tokens,
            norm.weight,
            norm.bias,
            self.k_proj.weight,
            self.k_proj.bias,
            self.v_proj.weight,
            self.v_proj.bias,
            norm.eps,
        )

    def forward(
        self,
        queries: torch.Tensor,
        tokens: torch.Tensor | PackedTokens,
        keep_mask: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(tokens, PackedTokens):
            return self.forward_packed(queries, tokens, need_weights), None
        b, m, _ = queries.shape
        q = self._heads(self.q_proj(queries))  # (B, H, M, dh)
        k, v = self.project_kv(tokens)
        k, v = self._heads(k), self._heads(v)  # (B, H, N, dh), (B, H, N, dv)
        p = self.dropout if self.training else 0.0
        out, weights = _attend(q, k, v, keep_mask, p, need_weights)
        out = out.transpose(1, 2).reshape(b, m, -1)  # (B, M, v_channels)
        return self.out_proj(out), weights

    def forward_packed(self, queries: torch.Tensor, packed: PackedTokens, need_weights: bool = False) -> torch.Tensor:
        """queries ``(S, M, d_q)``, one row per segment of ``packed`` -> ``(S, M, d_q)``. Keys and values are
        projected once over the unique tokens ``(T, d_kv)`` and gathered per segment."""
        if need_weights:
            raise ValueError("attention weights are not available on the packed path; call the model unpacked")
        s, m, _ = queries.shape
        if s != packed.num_segments:
            raise ValueError(f"{s} query rows for {packed.num_segments} packed segments")
        q = self._heads(self.q_proj(queries))  # (S, H, M, dh)
        k, v = self.project_kv(packed.tokens)  # (T, C_k), (T, C_v)
        if packed.index is not None:
            k, v = k.index_select(0, packed.index), v.index_select(0, packed.index)  # (T_kv, C)
        h = self.num_heads
        k, v = k.view(k.shape[0], h, -1), v.view(v.shape[0], h, -1)  # (T_kv, H, dh)
        p = self.dropout if self.training else 0.0
        out = packed_attend(q, k, v, packed, p)  # (S, H, M, dv)
        return self.out_proj(out.transpose(1, 2).reshape(s, m, -1))


class SelfAttention(nn.Module):
    """Multi-head self-attention over the latent array ``(B, M, D)`` with a fused QKV projection (no mask:
    latents are never padding)."""

    def __init__(self, *, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, m, d = x.shape
        qkv = self.qkv_proj(x).view(b, m, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, M, dh)
        p = self.dropout if self.training else 0.0
        out, weights = _attend(q, k, v, None, p, need_weights)
        return self.out_proj(out.transpose(1, 2).reshape(b, m, d)), weights


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
        self.attn = CrossAttention(
            d_q=d_latents, d_kv=d_input, num_heads=num_heads, dropout=attention_dropout, eps=eps
        )  # normalises the input tokens itself
        self.drop = nn.Dropout(dropout)
        self.norm_mlp = nn.LayerNorm(d_latents, eps=eps)
        self.mlp = Mlp(dim=d_latents, widening_factor=widening_factor, dropout=dropout)

    def forward(
        self,
        latents: torch.Tensor,
        tokens: torch.Tensor | PackedTokens,
        keep_mask: torch.Tensor | None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """latents (B, M, D) against tokens (B, N, D_in) + keep_mask, or (S, M, D) against S packed segments."""
        out, weights = self.attn(self.norm_latents(latents), tokens, keep_mask, need_weights)
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
