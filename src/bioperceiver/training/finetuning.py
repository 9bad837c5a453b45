"""Finetuning modes for the task models: linear probe, partial unfreezing, full finetuning and LoRA (``peft``)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

FINETUNING_MODES = ("linear_probe", "partial", "full", "lora")
# LoRA goes on the latent path (queries, fused QKV, outputs, MLPs). The cross-attention's k_proj/v_proj are applied
# inside a fused LayerNorm+projection kernel that reads their weights directly (layers.attention._NormKV), so an
# adapter on them would be silently bypassed: they are never targeted.
DEFAULT_LORA_TARGETS = r".*encoder\..*\.(q_proj|qkv_proj|out_proj|fc1|fc2)"
_BYPASSED = ("k_proj", "v_proj")


def count_parameters(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total}


def configure_finetuning(
    model: nn.Module,
    mode: str = "full",
    *,
    unfreeze_last_n_layers: int = 1,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    lora_target_modules: str | list[str] | None = None,
) -> nn.Module:
    """Set what trains; returns the model to train (a ``peft.PeftModel`` for ``mode="lora"``).

    * ``linear_probe``: only the head (the backbone is frozen and kept in eval mode by the caller, so its
      embeddings can be computed once and cached).
    * ``partial``: the head, the last ``unfreeze_last_n_layers`` latent self-attention layers and the final norm.
    * ``full``: everything.
    * ``lora``: low-rank adapters on the encoder's latent-path linear layers (``peft``) and a fully trained head;
      merge them after training with ``merge_and_unload()`` to get a plain model again.
    """
    if mode not in FINETUNING_MODES:
        raise ValueError(f"finetuning mode {mode!r}; choose one of {FINETUNING_MODES}")
    backbone = model.bioperceiver
    if mode == "full":
        model.requires_grad_(True)
    elif mode in ("linear_probe", "partial"):
        backbone.requires_grad_(False)
        model.head.requires_grad_(True)
        if mode == "partial":
            layers = list(backbone.encoder.self_layers)
            if not 0 < unfreeze_last_n_layers <= len(layers):
                raise ValueError(
                    f"unfreeze_last_n_layers={unfreeze_last_n_layers}: the encoder has {len(layers)} latent "
                    "self-attention layers"
                )
            for layer in layers[-unfreeze_last_n_layers:]:
                layer.requires_grad_(True)
            backbone.encoder.norm.requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model

        targets = lora_target_modules or DEFAULT_LORA_TARGETS
        names = [targets] if isinstance(targets, str) else list(targets)
        if any(n.split(".")[-1] in _BYPASSED for n in names):
            raise ValueError(
                "LoRA on the cross-attention's k_proj/v_proj would be bypassed by the fused LayerNorm+KV kernel; "
                f"target other layers (default {DEFAULT_LORA_TARGETS!r})"
            )
        config = LoraConfig(
            r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=targets,
            modules_to_save=["head"],
        )
        model = get_peft_model(model, config)
        wrapped = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and n.split(".")[-1] in _BYPASSED]
        if wrapped:  # a regex matched them anyway
            raise ValueError(f"LoRA target pattern also matched fused projections {wrapped[:3]}; narrow it")
    counts = count_parameters(model)
    logger.info(
        "finetuning mode %s: %d of %d parameters trainable (%.2f%%)",
        mode,
        counts["trainable"],
        counts["total"],
        100 * counts["trainable"] / max(counts["total"], 1),
    )
    return model


def merge_lora(model: Any) -> nn.Module:
    """A plain task model from a ``PeftModel`` (adapters merged into the weights); other models pass through."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


@torch.no_grad()
def compute_latents(model: nn.Module, batches, device: torch.device | str = "cpu") -> torch.Tensor:
    """The frozen backbone's ``last_hidden_state`` for every batch (``{"inputs": ...}``), concatenated on CPU:
    the cache a linear probe trains on instead of re-running the encoder every epoch."""
    backbone = model.bioperceiver
    was_training = backbone.training
    backbone.eval()
    out = []
    for batch in batches:
        inputs = {n: {k: v.to(device) for k, v in a.items()} for n, a in batch["inputs"].items()}
        out.append(backbone(inputs=inputs).last_hidden_state.cpu())
    backbone.train(was_training)
    return torch.cat(out)
