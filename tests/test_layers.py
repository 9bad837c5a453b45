"""Building blocks against plain reference implementations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bioperceiver.layers import CrossAttention, FourierFeatures, SelfAttention, grid_coordinates
from bioperceiver.layers.attention import _NormKV


def _reference_cross_attention(attn: CrossAttention, q_in, tokens, keep):
    """LayerNorm -> separate projections -> explicit masked softmax attention."""
    h = attn.num_heads
    x = F.layer_norm(tokens, tokens.shape[-1:], attn.norm_kv.weight, attn.norm_kv.bias, attn.norm_kv.eps)
    q, k, v = attn.q_proj(q_in), attn.k_proj(x), attn.v_proj(x)
    b, m, c = q.shape
    n = k.shape[1]
    q = q.view(b, m, h, -1).transpose(1, 2)
    k = k.view(b, n, h, -1).transpose(1, 2)
    v = v.view(b, n, h, -1).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / (c // h) ** 0.5
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, m, -1)
    return attn.out_proj(out)


def test_norm_kv_gradcheck_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    params = [
        torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in [(6,), (6,), (4, 6), (4,), (3, 6), (3,)]
    ]
    assert torch.autograd.gradcheck(lambda *a: _NormKV.apply(*a, 1e-5), (x, *params))


def test_cross_attention_matches_reference_values_and_gradients():
    torch.manual_seed(0)
    attn = CrossAttention(d_q=16, d_kv=12, num_heads=4)
    with torch.no_grad():  # non-trivial norm parameters
        attn.norm_kv.weight.uniform_(0.5, 1.5)
        attn.norm_kv.bias.uniform_(-0.5, 0.5)
    q_in = torch.randn(3, 5, 16, requires_grad=True)
    tokens = torch.randn(3, 9, 12, requires_grad=True)
    keep = torch.rand(3, 9) > 0.3
    keep[:, 0] = True
    out, _ = attn(q_in, tokens, keep)
    ref = _reference_cross_attention(attn, q_in, tokens, keep)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), [q_in, tokens, *attn.parameters()])
    ref_grads = torch.autograd.grad(ref.square().sum(), [q_in, tokens, *attn.parameters()])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    # gradient of a masked-out token is exactly zero
    assert torch.equal(grads[1][~keep], torch.zeros_like(grads[1][~keep]))


def test_cross_attention_under_autocast_bf16():
    torch.manual_seed(0)
    attn = CrossAttention(d_q=16, d_kv=12, num_heads=2)
    q_in, tokens = torch.randn(2, 4, 16), torch.randn(2, 7, 12, requires_grad=True)
    keep = torch.ones(2, 7, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = attn(q_in, tokens, keep)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert tokens.grad.dtype == torch.float32 and attn.k_proj.weight.grad.dtype == torch.float32
    ref = _reference_cross_attention(attn, q_in, tokens, keep)
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)


def test_self_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    attn = SelfAttention(dim=16, num_heads=4)
    x = torch.randn(2, 6, 16)
    fast, _ = attn(x)
    slow, weights = attn(x, need_weights=True)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 6))


def test_fourier_features_and_grid():
    coords = grid_coordinates((2, 4), torch.device("cpu"), torch.float32)
    assert coords.shape == (8, 2)
    assert torch.allclose(coords[:, 0].unique(), torch.tensor([-0.5, 0.5]))
    assert torch.allclose(coords[:, 1].unique(), torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    ff = FourierFeatures(num_dims=2, num_bands=3, min_freq=0.25, max_freq=4.0, d_out=5)
    assert ff(coords).shape == (8, 5)
    assert ff.proj.in_features == 2 * (2 * 3 + 1)
