"""Cross-attention attribution, optionally weighted by attention rollout through the latent self-attention.

The latents read the input only through cross-attention: row ``i`` of a cross-attention map ``C (M, N)`` (heads
averaged) says how latent ``i`` splits its attention over the ``N`` input tokens; masked tokens get exactly 0.
A token's relevance is ``w @ C`` where ``w (M,)`` weighs the latents by how much they reach the output:

* ``"uniform"``: ``w = 1/M`` (the pooled output is the mean of the latents);
* ``"rollout"`` (Abnar & Zuidema, 2020): the latents are mixed by the self-attention layers that follow the
  cross-attention; with the residual connection each layer is ``0.5 * A + 0.5 * I`` (heads averaged, rows
  renormalised), their product ``R = A_L ... A_1`` is the rollout, and ``w = (1/M) 1^T R``.

With several cross-attention calls (``num_cross_attention_layers > 1`` or ``repeat_cross_attention``) each call
gets the rollout of the self-attention layers after it, and the calls are averaged. Scores are non-negative and
sum to 1 over a sample's kept tokens.

For a ``head_type="query"`` task head the output query attends to the latents with its own weights, which are not
exposed by the model; the pooled mean (``1/M``) is used for both heads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ._core import backbone_of, embed, encode, eval_mode, processor_map, resolve_target, split_batch
from .mapping import Attribution, build_attribution

LATENT_WEIGHTINGS = ("uniform", "rollout")


def attention_rollout(attentions: Sequence[torch.Tensor], residual: bool = True) -> torch.Tensor:
    """Attention rollout over a stack of latent self-attention layers.

    Args:
        attentions: per layer ``(B, H, M, M)`` attention probabilities, first layer first.
        residual: add the identity for the residual connection (``0.5 * A + 0.5 * I``) before renormalising.

    Returns:
        ``(B, M, M)`` row-stochastic matrix ``A_L ... A_1`` (row = output latent, column = latent before the
        first layer); the identity when ``attentions`` is empty.
    """
    if not attentions:
        raise ValueError("attention_rollout needs at least one (B, H, M, M) attention map")
    b, _, m, _ = attentions[0].shape
    eye = torch.eye(m, dtype=torch.float64, device=attentions[0].device)
    rollout = eye.expand(b, m, m)
    for attn in attentions:
        a = attn.double().mean(dim=1)  # (B, M, M), heads averaged
        if residual:
            a = 0.5 * a + 0.5 * eye
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a @ rollout
    return rollout.to(attentions[0].dtype)


def _schedule(config) -> list[str]:
    """Order of attention calls in the encoder: ``"cross"``/``"self"`` (mirrors BioPerceiverEncoder.forward)."""
    calls: list[str] = []
    for block in range(config.num_blocks):
        if block == 0 or config.repeat_cross_attention:
            calls += ["cross"] * config.num_cross_attention_layers
        calls += ["self"] * config.num_self_attention_layers
    return calls


def token_relevance(
    cross_attentions: Sequence[torch.Tensor],
    self_attentions: Sequence[torch.Tensor],
    schedule: Sequence[str],
    latent_weighting: str = "rollout",
    residual: bool = True,
) -> torch.Tensor:
    """Relevance of every input token from the encoder's attention maps.

    Args:
        cross_attentions: per cross-attention call ``(B, H, M, N)``.
        self_attentions: per latent self-attention layer ``(B, H, M, M)``.
        schedule: ``"cross"``/``"self"`` per call in execution order (``len`` = number of maps).
        latent_weighting: ``"uniform"`` or ``"rollout"``.

    Returns:
        ``(B, N)`` scores, non-negative, summing to 1 per sample over the tokens that can be attended to.
    """
    if latent_weighting not in LATENT_WEIGHTINGS:
        raise ValueError(f"latent_weighting={latent_weighting!r}; choose one of {LATENT_WEIGHTINGS}")
    if schedule.count("cross") != len(cross_attentions) or schedule.count("self") != len(self_attentions):
        raise ValueError("schedule does not match the numbers of cross- and self-attention maps")
    b, _, m, n = cross_attentions[0].shape
    relevance = torch.zeros(b, n, dtype=torch.float64, device=cross_attentions[0].device)
    ci = si = 0
    for call in schedule:
        if call == "self":
            si += 1
            continue
        later = self_attentions[si:]  # the self-attention layers that mix this call's latents before the output
        w = torch.full((b, 1, m), 1.0 / m, dtype=torch.float64, device=relevance.device)  # (B, 1, M)
        if latent_weighting == "rollout" and later:
            w = w @ attention_rollout(later, residual).double()
        relevance += (w @ cross_attentions[ci].double().mean(dim=1)).squeeze(1)  # (B, N)
        ci += 1
    return relevance / len(cross_attentions)


@torch.no_grad()
def attention_attribution(
    model: nn.Module,
    inputs: Mapping[str, Any],
    latent_weighting: str = "rollout",
    processors: Any = None,
    residual: bool = True,
) -> Attribution:
    """Per-token relevance from the latents' cross-attention.

    Args:
        model: a task model (``BioPerceiverFor*``) or a :class:`~bioperceiver.BioPerceiverModel`.
        inputs: a collator batch (``{"inputs": ..., "sample_id": ...}``) or ``{modality: arrays}``.
        latent_weighting: ``"rollout"`` (default) or ``"uniform"`` (see the module docstring).
        processors: fitted processors (``BioPerceiverProcessor`` or ``{modality: processor}``) used for names.
        residual: rollout with the residual identity (Abnar & Zuidema).

    Returns:
        :class:`Attribution` with ``method`` ``"rollout"`` or ``"attention"``; ``scores[m]`` is ``(B, N_m)``,
        non-negative, exactly 0 on dropped tokens, and sums to 1 over all modalities of a sample. The task
        target is irrelevant to attention maps; ``target`` holds the predicted class for reference when the model
        has a classification head.
    """
    emb = embed(model, inputs)
    _, sample_ids = split_batch(inputs)
    backbone = backbone_of(model)
    with eval_mode(model):
        _, cross, selfs = encode(model, emb.tokens, emb.keep, output_attentions=True)
        target = None if model is backbone else resolve_target(model, emb, None)
    relevance = token_relevance(cross, selfs, _schedule(backbone.config), latent_weighting, residual)
    scores, start = {}, 0
    for name in emb.names:
        n = emb.tokens[name].shape[1]
        scores[name] = relevance[:, start : start + n]
        start += n
    method = "rollout" if latent_weighting == "rollout" else "attention"
    return build_attribution(model, method, scores, emb, target, sample_ids, processor_map(processors))
