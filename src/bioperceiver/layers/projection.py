"""The contrastive projection head, and saving it beside a pretrained backbone.

Pretraining (:class:`~bioperceiver.training.pretraining.ContrastivePretrainer`) aligns the views of a patient after a
shared two-layer head (``d_latents -> d_latents -> projection_dim``). The backbone alone (``save_pretrained``) gives
the *latent* embeddings, the usual start for finetuning and features; cross-modal similarity was trained in the
*projected* space. The pretraining run saves the head as ``projection_head.safetensors`` in its ``final/`` folder so
that ``bioperceiver embed --space projected`` (and ``search`` on it) compares modalities where the loss did.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

PROJECTION_HEAD_FILE = "projection_head.safetensors"


def build_projection_head(d_latents: int, projection_dim: int) -> nn.Sequential:
    """``Linear(d, d) -> GELU -> Linear(d, projection_dim)`` (state-dict keys ``0.*`` and ``2.*``)."""
    return nn.Sequential(nn.Linear(d_latents, d_latents), nn.GELU(), nn.Linear(d_latents, projection_dim))


def save_projection_head(state: dict[str, torch.Tensor], folder: str | os.PathLike, config) -> Path:
    """Write the head's ``state`` (keys as :func:`build_projection_head`'s) to ``folder/projection_head.safetensors``
    with the shapes it needs in the file's metadata; checked against ``config`` (the backbone's)."""
    from safetensors.torch import save_file

    head = build_projection_head(config.d_latents, config.projection_dim)
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        raise ValueError(f"projection head state {got} does not match the backbone config's {expected}")
    path = Path(folder) / PROJECTION_HEAD_FILE
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    meta = {"d_latents": str(config.d_latents), "projection_dim": str(config.projection_dim)}
    save_file(tensors, str(path), metadata=meta)
    return path


def load_projection_head(
    folder: str | os.PathLike, config, device: torch.device | str | None = None
) -> nn.Sequential | None:
    """The head saved in ``folder`` (eval mode, on ``device``), or ``None`` when the folder has none (a backbone
    saved before heads were saved, or a finetuned model). Raises ``ValueError`` when its shapes do not fit
    ``config``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(folder) / PROJECTION_HEAD_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if (meta.get("d_latents"), meta.get("projection_dim")) != (str(config.d_latents), str(config.projection_dim)):
        raise ValueError(
            f"{path} is a head for d_latents={meta.get('d_latents')}, projection_dim={meta.get('projection_dim')}; "
            f"the backbone in {folder} has {config.d_latents}, {config.projection_dim}: it belongs to another model"
        )
    head = build_projection_head(config.d_latents, config.projection_dim)
    head.load_state_dict(load_file(str(path)))
    return head.to(device or "cpu").eval()


def projection_state_from_checkpoint(checkpoint: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The head's weights in a pretraining checkpoint folder (``checkpoints/checkpoint-N``: the trainer's
    ``model.safetensors`` holds ``projection.*`` beside the backbone): for a ``final/`` folder saved before the head
    was saved with it, ``save_projection_head(projection_state_from_checkpoint(ckpt), final, config)`` adds it
    (take the checkpoint of the run's last step, or the head will not match the backbone)."""
    from safetensors.torch import load_file

    path = Path(checkpoint) / "model.safetensors"
    if not path.is_file():
        raise ValueError(f"{checkpoint} holds no model.safetensors: pass a pretraining checkpoint folder")
    state = {k[len("projection.") :]: v for k, v in load_file(str(path)).items() if k.startswith("projection.")}
    if not state:
        raise ValueError(f"{path} has no projection.* weights: is it a pretraining checkpoint?")
    return state
