"""Deletion check of an attribution: removing the top-k attributed tokens vs. k random tokens.

A faithful attribution names the tokens the prediction rests on, so dropping them (keep-mask set to False, exactly
as padding) should lower the explained score more than dropping the same number of random tokens. Both drops are
reported, so the random baseline is always next to the number it qualifies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn

from ._core import Target, embed, eval_mode, forward_score, linear_inputs, resolve_target
from .mapping import Attribution

DELETION_COLUMNS = ["k", "mean_k", "drop_top", "drop_random", "drop_random_std", "n_random", "n_samples"]


def _delete(flat_keep: torch.Tensor, order: torch.Tensor, k_eff: torch.Tensor) -> torch.Tensor:
    """keep ``(B, N)`` with the first ``k_eff[b]`` tokens of ``order[b]`` set to False."""
    rank = torch.arange(order.shape[1], device=order.device)[None, :].expand_as(order)
    drop = torch.zeros_like(flat_keep).scatter(1, order, rank < k_eff[:, None])
    return flat_keep & ~drop


@torch.no_grad()
def deletion_test(
    model: nn.Module,
    inputs: Mapping[str, Any],
    attribution: Attribution,
    k: int | Sequence[int] = (1, 5, 10),
    n_random: int = 10,
    seed: int = 0,
    modalities: Sequence[str] | None = None,
    target: Target = None,
) -> pd.DataFrame:
    """Mean drop of the explained score after deleting the top-``k`` tokens vs. ``k`` random tokens.

    Args:
        model: the model the attribution explains.
        inputs: the same batch the attribution was computed on.
        attribution: per-token scores; tokens are ranked by signed score, highest first (for integrated
            gradients: the tokens that push the score up the most).
        k: number(s) of tokens to delete per sample; per sample at most the candidate tokens it has, and always
            one kept token is left so the model can still run (``mean_k`` reports the average used).
        n_random: random draws per sample (seeded by ``seed``, reproducible).
        modalities: restrict the candidate tokens to these modalities (default: all in the attribution).
        target: explained output; default the attribution's own (resolved) target.

    Returns:
        DataFrame, one row per ``k``: ``k, mean_k, drop_top, drop_random, drop_random_std, n_random, n_samples``
        where ``drop = f(x) - f(x without the tokens)`` averaged over samples (``drop_random`` also over draws;
        ``drop_random_std``: the standard deviation over draws of the per-draw sample mean).
    """
    ks = [k] if isinstance(k, int) else list(k)
    if any(x < 1 for x in ks) or n_random < 1:
        raise ValueError(f"k must be >= 1 and n_random >= 1, got k={ks}, n_random={n_random}")
    emb = embed(model, inputs)
    names = emb.names
    if names != attribution.modalities:
        raise ValueError(
            f"the attribution covers {attribution.modalities}, the inputs give {names}; use the same batch"
        )
    chosen = list(modalities) if modalities is not None else names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        raise ValueError(f"modalities {unknown} are not in the inputs ({names})")
    device = emb.keep[names[0]].device
    sizes = [emb.tokens[n].shape[1] for n in names]
    flat_keep = torch.cat([emb.keep[n] for n in names], dim=1)  # (B, N)
    candidate = torch.cat([emb.keep[n] & (n in chosen) for n in names], dim=1)  # (B, N)
    scores = torch.cat([attribution.scores[n].to(device).double() for n in names], dim=1)
    b, n_tok = flat_keep.shape
    top_order = scores.masked_fill(~candidate, float("-inf")).argsort(dim=1, descending=True, stable=True)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rand_orders = [
        torch.rand(b, n_tok, generator=gen).to(device).masked_fill(~candidate, -1.0).argsort(dim=1, descending=True)
        for _ in range(n_random)
    ]

    def run(keep_flat: torch.Tensor, tgt: Target) -> torch.Tensor:
        reps = keep_flat.shape[0] // b
        keeps = dict(zip(names, keep_flat.split(sizes, dim=1)))
        tokens = {n: emb.tokens[n].repeat(reps, 1, 1) for n in names}
        return forward_score(model, tokens, keeps, tgt, linear_inputs(model, emb, keeps, reps=reps)).double()

    rows = []
    with eval_mode(model):
        resolved = resolve_target(model, emb, target if target is not None else attribution.target)
        base = run(flat_keep, resolved)  # (B,)
        for kk in ks:
            limit = torch.minimum(candidate.sum(dim=1), flat_keep.sum(dim=1) - 1)
            k_eff = limit.clamp(min=0, max=kk)  # (B,)
            top = base - run(_delete(flat_keep, top_order, k_eff), resolved)
            stacked = torch.cat([_delete(flat_keep, o, k_eff) for o in rand_orders], dim=0)  # (R*B, N)
            rep_target = resolved.repeat(n_random) if torch.is_tensor(resolved) else resolved
            rand = (base.repeat(n_random) - run(stacked, rep_target)).view(n_random, b)  # (R, B)
            per_draw = rand.mean(dim=1)
            rows.append(
                {
                    "k": kk,
                    "mean_k": float(k_eff.double().mean()),
                    "drop_top": float(top.mean()),
                    "drop_random": float(per_draw.mean()),
                    "drop_random_std": float(per_draw.std()) if n_random > 1 else 0.0,
                    "n_random": n_random,
                    "n_samples": b,
                }
            )
    return pd.DataFrame(rows, columns=DELETION_COLUMNS)
