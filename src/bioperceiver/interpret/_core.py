"""Shared machinery: run a task model from per-modality tokens and keep-masks, pick the explained target.

Every explanation in this package works on the modality embedders' outputs: ``model.embed(inputs)`` gives
``{name: (tokens (B, N_m, D_in), keep (B, N_m))}`` and :func:`forward_tokens` runs the Perceiver encoder and the
task head on (possibly edited) tokens and keep-masks. Setting a keep-mask entry to ``False`` removes that token
from the cross-attention exactly as padding does (its attention weight is exactly zero), so "deleting a token" and
"dropping a modality from ``inputs``" give the same prediction as the model's own forward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..modeling_bioperceiver import BioPerceiverModel
from ..modeling_tasks import BioPerceiverForSurvival

Target = int | str | torch.Tensor | Callable[[Any], torch.Tensor] | None
"""What is explained: ``None`` (classification: the predicted class of every sample; survival: the risk),
an ``int`` class/output column, a ``(B,)`` tensor of per-sample columns, ``"risk"`` (survival), or a callable
``f(head output) -> (B,)`` (for a bare :class:`BioPerceiverModel`: ``f(latents (B, M, D)) -> (B,)``)."""


def backbone_of(model: nn.Module) -> BioPerceiverModel:
    """The :class:`BioPerceiverModel` inside a task model (or the model itself)."""
    if isinstance(model, BioPerceiverModel):
        return model
    inner = getattr(model, "bioperceiver", None)
    if not isinstance(inner, BioPerceiverModel):
        raise ValueError(
            f"{type(model).__name__} has no BioPerceiver backbone (.bioperceiver); pass a BioPerceiverModel or a "
            "BioPerceiverFor* task model"
        )
    return inner


def split_batch(batch: Mapping[str, Any]) -> tuple[dict[str, dict], list | None]:
    """Accept a collator batch ``{"inputs": {...}, "sample_id": [...], ...}`` or a plain ``{modality: arrays}``."""
    if "inputs" in batch and isinstance(batch["inputs"], Mapping):
        ids = batch.get("sample_id")
        return dict(batch["inputs"]), (list(ids) if ids is not None else None)
    return dict(batch), None


def to_device(inputs: Mapping[str, Any], device: torch.device) -> dict[str, dict]:
    return {
        name: None if arrays is None else {k: v.to(device) if torch.is_tensor(v) else v for k, v in arrays.items()}
        for name, arrays in inputs.items()
    }


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off while explaining; the model's previous mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass
class Embedded:
    """Per-modality embedder outputs of one batch, in ``config.modality_names`` order.

    Args:
        tokens: ``{name: (B, N_m, D_in)}`` (zero where the keep-mask is False).
        keep: ``{name: (B, N_m)}`` bool keep-masks.
        inputs: the modality arrays they came from (on the model's device).
    """

    tokens: dict[str, torch.Tensor]
    keep: dict[str, torch.Tensor]
    inputs: dict[str, dict]

    @property
    def names(self) -> list[str]:
        return list(self.tokens)

    @property
    def batch_size(self) -> int:
        return next(iter(self.tokens.values())).shape[0]

    def present(self) -> torch.Tensor:
        """``(B, K)`` bool: which of ``names`` each sample has."""
        return torch.stack([self.keep[n].any(dim=1) for n in self.names], dim=1)


@torch.no_grad()
def embed(model: nn.Module, inputs: Mapping[str, Any]) -> Embedded:
    """Run the embedders once (no gradient) on ``inputs`` (a collator batch or ``{modality: arrays}``)."""
    backbone = backbone_of(model)
    mod_inputs, _ = split_batch(inputs)
    device = next(backbone.parameters()).device
    mod_inputs = {k: v for k, v in to_device(mod_inputs, device).items() if v is not None}
    out = backbone.embed(mod_inputs)
    order = [n for n in backbone.modality_names if n in out]
    return Embedded(
        tokens={n: out[n][0] for n in order},
        keep={n: out[n][1] for n in order},
        inputs={n: mod_inputs[n] for n in order},
    )


def encode(
    model: nn.Module,
    tokens: Mapping[str, torch.Tensor],
    keep: Mapping[str, torch.Tensor],
    output_attentions: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Encoder on concatenated tokens: latents ``(B, M, D)``, cross-attentions ``(B, H, M, N)`` per call,
    latent self-attentions ``(B, H, M, M)`` per layer. Every sample needs at least one kept token."""
    backbone = backbone_of(model)
    names = list(tokens)
    x = torch.cat([tokens[n] for n in names], dim=1)  # (B, N, D_in)
    k = torch.cat([keep[n] for n in names], dim=1)  # (B, N)
    if not k.any(dim=1).all():
        raise ValueError("a sample has no kept token left; keep at least one token per sample")
    latents, _, cross, selfs = backbone.encoder(x, k, output_attentions, False)
    return latents, cross, selfs


def linear_inputs(
    model: nn.Module, emb: Embedded, keep: Mapping[str, torch.Tensor], rows: torch.Tensor | None = None, reps: int = 1
) -> dict[str, dict | None]:
    """What a wide & deep model's linear term (``config.head_linear_modalities``) reads, for :func:`head_output`:
    its modalities' arrays from ``emb`` (restricted to ``rows``, repeated ``reps`` times, as the caller did to the
    tokens) with ``keep`` as their mask, so that a token or modality an explanation removes leaves the linear term
    too; ``None`` for a modality the batch lacks. ``{}`` for a model without a linear term."""
    term = getattr(model, "linear_term", None)
    if term is None:
        return {}
    out: dict[str, dict | None] = {}
    for name in term.names:
        if name not in emb.inputs or name not in keep:
            out[name] = None
            continue
        arrays = {k: v for k, v in emb.inputs[name].items() if k in term.reads[name].keys}
        if rows is not None:
            arrays = {k: v[rows] for k, v in arrays.items()}
        if reps > 1:
            arrays = {k: v.repeat(reps, 1) for k, v in arrays.items()}
        out[name] = {**arrays, "mask": keep[name]}
    return out


def head_output(model: nn.Module, latents: torch.Tensor, linear: Mapping[str, Any] | None = None) -> Any:
    """The task model's output on precomputed latents (``model(latents=...)``); the latents for a bare backbone.
    ``linear``: :func:`linear_inputs` for a model whose head has a linear term."""
    if isinstance(model, BioPerceiverModel):
        return latents
    return model(latents=latents, return_dict=True, **dict(linear or {}))


def output_matrix(model: nn.Module, output: Any) -> torch.Tensor:
    """``(B, C)`` matrix whose columns the integer targets index: classification logits; ``(B, 1)`` survival risk."""
    if isinstance(model, BioPerceiverModel):
        raise ValueError("a bare BioPerceiverModel has no prediction; pass a callable target f(latents) -> (B,)")
    risk = getattr(output, "risk", None)
    if risk is not None:
        return risk[:, None]
    return output.logits


def resolve_target(model: nn.Module, emb: Embedded, target: Target) -> Target:
    """Fix the explained output once from the full input: ``None`` -> per-sample predicted class (argmax of the
    logits; column 0 for a single output) or the survival risk column; ints/tensors -> ``(B,)`` long tensor."""
    if callable(target) and not torch.is_tensor(target):
        return target
    b = emb.batch_size
    device = next(iter(emb.tokens.values())).device
    if isinstance(model, BioPerceiverModel):
        raise ValueError("a bare BioPerceiverModel has no prediction; pass a callable target f(latents) -> (B,)")
    is_survival = isinstance(model, BioPerceiverForSurvival)
    if (isinstance(target, str) and target == "risk") or (target is None and is_survival):
        if not is_survival:
            raise ValueError("target='risk' needs a survival model; give a class index for a classifier")
        return torch.zeros(b, dtype=torch.long, device=device)
    if is_survival:
        raise ValueError("a survival model explains its risk: pass target=None, 'risk' or a callable f(output) -> (B,)")
    if isinstance(target, str):
        raise ValueError(f"target={target!r}: use None, an int, a (B,) tensor, 'risk' or a callable")
    if target is None:
        with torch.no_grad():
            latents, _, _ = encode(model, emb.tokens, emb.keep)
            logits = output_matrix(model, head_output(model, latents, linear_inputs(model, emb, emb.keep)))
        return logits.argmax(dim=1) if logits.shape[1] > 1 else torch.zeros(b, dtype=torch.long, device=device)
    target = torch.as_tensor(target, device=device).long()
    if target.dim() == 0:
        target = target.expand(b).clone()
    if target.shape != (b,):
        raise ValueError(f"target must be an int or a ({b},) tensor, got shape {tuple(target.shape)}")
    return target


def score(model: nn.Module, latents: torch.Tensor, target: Target, linear: Mapping[str, Any] | None = None):
    """The explained scalar per sample ``(B,)`` from latents ``(B, M, D)`` and a resolved target (``linear``: see
    :func:`head_output`)."""
    output = head_output(model, latents, linear)
    if callable(target) and not torch.is_tensor(target):
        return target(output)
    return output_matrix(model, output).gather(1, target[:, None]).squeeze(1)


def forward_score(
    model: nn.Module,
    tokens: Mapping[str, torch.Tensor],
    keep: Mapping[str, torch.Tensor],
    target: Target,
    linear: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """``(B,)`` explained score of the model run on ``tokens``/``keep`` (every sample needs a kept token);
    ``linear``: :func:`linear_inputs` for a model whose head has a linear term."""
    latents, _, _ = encode(model, tokens, keep)
    return score(model, latents, target, linear)


def processor_map(processors: Any) -> dict[str, Any]:
    """``{modality: processor}`` from a :class:`~bioperceiver.data.BioPerceiverProcessor`, a dict, or ``None``."""
    if processors is None:
        return {}
    if hasattr(processors, "processors"):
        return dict(processors.processors)
    return dict(processors)
