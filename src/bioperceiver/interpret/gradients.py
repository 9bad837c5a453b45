"""Integrated gradients (captum) on the modality embedders' output tokens.

The explained function is ``f(tokens) = target score of the task head`` with the keep-masks held fixed; the input
is every modality's token array ``(B, N_m, D_in)`` as produced by its embedder (type embedding included). A token's
attribution is the sum over its ``D_in`` channels of ``(x - x') * mean gradient along the path``; completeness
gives ``sum of all token attributions = f(x) - f(x')`` up to the integration error (captum's convergence delta).

Baselines ``x'`` (only kept tokens differ from ``x``; a dropped token is zero in both, so its attribution is
exactly 0):

* ``"zero"``: every kept token is the zero vector (present, but carrying no content, position or type);
* ``"type"``: every kept token is its modality's learned type embedding alone ("a token of this modality").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from captum.attr import IntegratedGradients
from torch import nn

from ._core import (
    Target,
    backbone_of,
    embed,
    eval_mode,
    forward_score,
    linear_inputs,
    processor_map,
    resolve_target,
    split_batch,
)
from .mapping import Attribution, build_attribution

BASELINES = ("zero", "type")


def token_baseline(
    model: nn.Module, tokens: torch.Tensor, keep: torch.Tensor, name: str, baseline: str
) -> torch.Tensor:
    """Baseline tokens ``(B, N_m, D_in)`` of modality ``name`` (zero on dropped tokens)."""
    if baseline == "zero":
        return torch.zeros_like(tokens)
    if baseline == "type":
        type_emb = backbone_of(model).embedders[name].type_embedding.detach().to(tokens.dtype)
        return torch.where(keep[..., None], type_emb.expand_as(tokens), torch.zeros((), dtype=tokens.dtype))
    raise ValueError(f"baseline={baseline!r}; choose one of {BASELINES}")


def integrated_gradients(
    model: nn.Module,
    inputs: Mapping[str, Any],
    target: Target = None,
    n_steps: int = 32,
    baseline: str = "zero",
    method: str = "gausslegendre",
    internal_batch_size: int | None = None,
    processors: Any = None,
) -> Attribution:
    """Integrated gradients of the explained score with respect to every modality's tokens.

    Args:
        model: a task model (``BioPerceiverForSequenceClassification`` / ``BioPerceiverForSurvival``).
        inputs: a collator batch or ``{modality: arrays}``.
        target: see :data:`bioperceiver.interpret.Target` (default: predicted class / survival risk).
        n_steps: integration steps (captum); more steps shrink the convergence delta.
        baseline: ``"zero"`` or ``"type"`` (see the module docstring).
        method: captum's integration rule (``"gausslegendre"``, ``"riemann_trapezoid"``, ...).
        internal_batch_size: captum's chunking of the ``B * n_steps`` path points (memory).
        processors: fitted processors, for token names.

    Returns:
        :class:`Attribution` (``method="integrated_gradients"``): signed ``scores[m] (B, N_m)``, exactly 0 on
        dropped tokens, and ``delta (B,)`` = ``sum(scores) - (f(x) - f(x'))``.
    """
    emb = embed(model, inputs)
    _, sample_ids = split_batch(inputs)
    names = emb.names
    keep = tuple(emb.keep[n] for n in names)
    with eval_mode(model):
        resolved = resolve_target(model, emb, target)
        fixed_target = callable(resolved) and not torch.is_tensor(resolved)

        def forward(*tokens: torch.Tensor) -> torch.Tensor:
            reps = tokens[0].shape[0] // keep[0].shape[0]  # captum stacks n_steps copies of the batch
            keeps = {n: k.repeat(reps, 1) for n, k in zip(names, keep)}
            tgt = resolved if fixed_target else resolved.repeat(reps)
            # a linear term's share (head_linear_modalities) reads values, not tokens: no gradient attributes it
            return forward_score(
                model, dict(zip(names, tokens)), keeps, tgt, linear_inputs(model, emb, keeps, reps=reps)
            )

        xs = tuple(emb.tokens[n].detach() for n in names)
        bases = tuple(token_baseline(model, emb.tokens[n], emb.keep[n], n, baseline) for n in names)
        ig = IntegratedGradients(forward)
        attrs, delta = ig.attribute(
            xs,
            baselines=bases,
            n_steps=n_steps,
            method=method,
            internal_batch_size=internal_batch_size,
            return_convergence_delta=True,
        )
    scores = {n: a.sum(dim=-1) for n, a in zip(names, attrs)}  # (B, N_m)
    return build_attribution(
        model, "integrated_gradients", scores, emb, resolved, sample_ids, processor_map(processors), delta
    )
