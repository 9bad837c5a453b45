"""``image``: 2D images ``(B, C, H, W)`` and 3D volumes ``(B, C, D, H, W)`` -> patch tokens.

Two modes:

* ``mode="patch"``: a linear patch embedding (timm ``PatchEmbed`` for 2D, a strided ``Conv3d`` for 3D);
* ``mode="timm"``: any timm backbone's final feature map is the patch grid (``timm.create_model(name,
  pretrained=False)``; weights come from a local file via ``backbone_weights``), so a pretrained tile or
  X-ray encoder can be plugged in.

Either way every token gets Fourier features of its patch centre in normalised ``[-1, 1]`` coordinates, so the
input resolution may differ between pretraining and finetuning (the grid is denser, the range is the same).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...layers import FourierFeatures, grid_coordinates
from ..embedder import ModalityEmbedder, require_positive

logger = logging.getLogger(__name__)


@dataclass
class ImageConfig:
    """Settings of an ``image`` modality.

    Args:
        spatial_dims: 2 for images ``(B, C, H, W)``, 3 for volumes ``(B, C, D, H, W)``.
        in_channels: number of image channels (1 for CT/MR/X-ray, 3 for RGB histology).
        patch_size: patch edge length in pixels/voxels (``mode="patch"``); inputs whose size is not a multiple
            are zero-padded at the far edge.
        mode: ``"patch"`` (linear patch embedding) or ``"timm"`` (a timm backbone's feature map).
        backbone: timm model name for ``mode="timm"`` (2D only), e.g. ``"resnet18"``.
        backbone_weights: optional local path (``.safetensors``/``.pth``) of the backbone's weights, loaded when
            the model is first built. Saved BioPerceiver checkpoints carry these weights themselves.
        backbone_kwargs: extra keyword arguments for ``timm.create_model``.
        freeze_backbone: keep the timm backbone's weights fixed during training.
        num_fourier_bands: Fourier frequency bands per spatial axis.
        max_fourier_freq: highest Fourier frequency in cycles per unit of normalised coordinates. A grid of
            ``n`` patches along ``[-1, 1]`` resolves up to ``n / 4``: the default 8 suits grids of up to 32 patches
            per axis; higher bands would alias differently at each resolution.
    """

    spatial_dims: int = 2
    in_channels: int = 1
    patch_size: int = 16
    mode: str = "patch"
    backbone: str | None = None
    backbone_weights: str | None = None
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    freeze_backbone: bool = False
    num_fourier_bands: int = 16
    max_fourier_freq: float = 8.0

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        require_positive(
            in_channels=self.in_channels,
            patch_size=self.patch_size,
            num_fourier_bands=self.num_fourier_bands,
            max_fourier_freq=self.max_fourier_freq,
        )
        if self.mode not in ("patch", "timm"):
            raise ValueError(f"mode must be 'patch' or 'timm', got {self.mode!r}")
        if self.mode == "timm":
            if not self.backbone:
                raise ValueError("mode='timm' needs backbone=<timm model name>, e.g. 'resnet18'")
            if self.spatial_dims != 2:
                raise ValueError("mode='timm' supports spatial_dims=2 only; use mode='patch' for volumes")
        if self.max_fourier_freq < 0.25:
            raise ValueError(f"max_fourier_freq must be >= 0.25, got {self.max_fourier_freq}")


class ImageEmbedder(ModalityEmbedder):
    """Inputs: ``pixel_values`` (B, C, H, W) or (B, C, D, H, W); optional ``present`` (B,) bool marking the
    samples that have this image (absent samples' pixels are ignored). With a frozen timm backbone whose outputs
    were cached (:meth:`frozen_features`), ``backbone_features`` (B, h*w, C') and ``feature_grid`` (B, 2) instead of
    ``pixel_values``."""

    kind = "image"
    config_class = ImageConfig
    input_keys = ("pixel_values",)
    optional_input_keys = ("present",)
    feature_keys = ("backbone_features", "feature_grid")

    def __init__(self, name: str, config: ImageConfig, d_input: int) -> None:
        super().__init__(name, config, d_input)
        self.backbone: nn.Module | None = None
        if config.mode == "timm":
            self.backbone = self._create_backbone(config)
            self.proj = nn.Linear(self.backbone.num_features, d_input)
        elif config.spatial_dims == 2:
            from timm.layers import PatchEmbed  # here: importing timm costs ~1 s (torchvision, torch._dynamo)

            self.patch_embed = PatchEmbed(
                img_size=None,
                patch_size=config.patch_size,
                in_chans=config.in_channels,
                embed_dim=d_input,
                output_fmt="NHWC",
                strict_img_size=False,
                dynamic_img_pad=True,
            )
        else:
            self.patch_embed = nn.Conv3d(config.in_channels, d_input, config.patch_size, stride=config.patch_size)
        self.position = FourierFeatures(
            num_dims=config.spatial_dims,
            num_bands=config.num_fourier_bands,
            min_freq=0.25,
            max_freq=config.max_fourier_freq,
            d_out=d_input,
        )

    def _create_backbone(self, config: ImageConfig) -> nn.Module:
        import timm

        overlay = None
        if config.backbone_weights:
            path = Path(config.backbone_weights).expanduser()
            if not path.is_file():
                raise ValueError(
                    f"modality {self.name!r}: backbone_weights file {str(path)!r} does not exist; give a local "
                    ".safetensors/.pth file of the timm model or set backbone_weights=None"
                )
            # timm's own pretrained loader reads the local file, drops the classifier and adapts the stem to
            # in_channels (e.g. an RGB checkpoint for grey-scale X-rays).
            overlay = {"file": str(path)}
        backbone = timm.create_model(
            config.backbone,
            pretrained=overlay is not None,
            pretrained_cfg_overlay=overlay,
            num_classes=0,
            global_pool="",
            in_chans=config.in_channels,
            **config.backbone_kwargs,
        )
        if overlay is not None:
            logger.info("%s: loaded %s weights from %s", self.name, config.backbone, overlay["file"])
        non_persistent = [
            f"{mod_name}.{buf}" for mod_name, mod in backbone.named_modules() for buf in mod._non_persistent_buffers_set
        ]
        if non_persistent:
            # from_pretrained refills non-persistent buffers with uninitialised memory; such a backbone would
            # silently compute garbage after reloading, so it is refused until that is supported.
            raise ValueError(
                f"modality {self.name!r}: timm backbone {config.backbone!r} has non-persistent buffers "
                f"{non_persistent[:3]}, which a saved BioPerceiver cannot restore; pick a backbone without them "
                "(e.g. a ResNet/ConvNeXt/EfficientNet/ViT)"
            )
        if config.freeze_backbone:
            backbone.requires_grad_(False)
            backbone.eval()
        # The backbone keeps timm's own initialisation (or the loaded weights): mark it so that the
        # transformers weight initialisation of the surrounding model leaves it alone.
        for module in backbone.modules():
            module._is_hf_initialized = True
        return backbone

    def apply_trainability(self) -> None:
        if self.backbone is not None and self.config.freeze_backbone:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> ImageEmbedder:
        super().train(mode)
        if self.backbone is not None and self.config.freeze_backbone:
            self.backbone.eval()  # a frozen backbone keeps its normalisation statistics fixed
        return self

    def frozen_fingerprint(self) -> str | None:
        """SHA-256 of a frozen timm backbone's weights (``None`` for patch mode or a trained backbone)."""
        if self.backbone is None or not self.config.freeze_backbone:
            return None
        import hashlib

        h = hashlib.sha256(self.config.backbone.encode())
        for key, value in sorted(self.backbone.state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    @torch.no_grad()
    def frozen_features(self, arrays):
        """``{"pixel_values": (C, H, W)}`` -> ``{"backbone_features": (h*w, C') float32, "feature_grid": (2,)}``:
        the frozen backbone's feature map of one image, what :meth:`embed` reads instead of the pixels."""
        if self.frozen_fingerprint() is None:
            raise ValueError(f"modality {self.name!r}: only a frozen timm backbone's outputs can be cached")
        dtype = self.position.proj.weight.dtype
        pixels = torch.as_tensor(np.asarray(arrays["pixel_values"]), dtype=dtype)[None]  # (1, C, H, W)
        feats, grid = self._backbone_features(pixels)  # (1, h*w, C')
        return {
            "backbone_features": feats[0].float().numpy(),
            "feature_grid": np.asarray(grid, dtype=np.int64),
        }

    def check_inputs(self, inputs):
        if isinstance(inputs, dict) and "backbone_features" in inputs:
            unknown = sorted(set(inputs) - {*self.feature_keys, "present"})
            if unknown or "feature_grid" not in inputs or self.frozen_fingerprint() is None:
                raise ValueError(
                    f"modality {self.name!r}: cached backbone features need a frozen timm backbone and the keys "
                    f"{list(self.feature_keys)} (+ 'present'), got {sorted(inputs)}"
                )
            return
        super().check_inputs(inputs)

    def _backbone_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        feats, grid = self._backbone_features(pixels)
        return self.proj(feats), grid

    def _backbone_features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The backbone's output tokens (B, h*w, C') and their grid ``(h, w)``."""
        feats = self.backbone.forward_features(pixels)
        if feats.dim() == 4:  # a feature map, (B, C', h, w) or (B, h, w, C') by the model's output format
            if str(getattr(self.backbone, "output_fmt", "NCHW")).upper() == "NHWC":
                feats = feats.permute(0, 3, 1, 2)
            grid = tuple(feats.shape[-2:])
            feats = feats.flatten(2).transpose(1, 2)  # (B, h*w, C')
        else:  # ViT-like token sequence (B, prefix + h*w, C')
            feats = feats[:, getattr(self.backbone, "num_prefix_tokens", 0) :]
            patch_embed = getattr(self.backbone, "patch_embed", None)
            if patch_embed is not None and hasattr(patch_embed, "dynamic_feat_size"):
                grid = tuple(int(g) for g in patch_embed.dynamic_feat_size(tuple(pixels.shape[-2:])))
            else:
                side = math.isqrt(feats.shape[1])
                grid = (side, side)
            if grid[0] * grid[1] != feats.shape[1]:
                raise ValueError(
                    f"modality {self.name!r}: cannot map {feats.shape[1]} backbone tokens onto a patch grid "
                    f"{grid}; use a CNN backbone or a ViT with a patch_embed"
                )
        return feats, grid

    def matmul_flops(self, inputs):
        if self.backbone is not None:
            raise NotImplementedError("FLOPs of a timm image backbone are not counted here")
        px = inputs["pixel_values"]  # every row, also the zeroed images of samples without one
        b, c, spatial = px.shape[0], px.shape[1], px.shape[2:]
        p = self.config.patch_size
        grid = math.prod(-(-s // p) for s in spatial)
        d = self.d_input
        flops = float(b * grid * 2 * c * p ** len(spatial) * d + grid * 2 * self.position.proj.in_features * d)
        return flops, flops

    def embed(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if "backbone_features" in inputs:
            return self._embed_cached(inputs)
        pixels = inputs["pixel_values"]
        cfg = self.config
        if pixels.dim() != cfg.spatial_dims + 2 or pixels.shape[1] != cfg.in_channels:
            layout = "(B, C, H, W)" if cfg.spatial_dims == 2 else "(B, C, D, H, W)"
            raise ValueError(
                f"modality {self.name!r}: pixel_values must be {layout} with C={cfg.in_channels}, got "
                f"{tuple(pixels.shape)}; check the image processor's spatial_dims/channels"
            )
        b = pixels.shape[0]
        present = self._mask(inputs, "present", torch.Size([b]))
        dtype = self.position.proj.weight.dtype
        # Absent samples' pixels are zeroed so that whatever fills them never reaches the model.
        pixels = torch.where(present.view(b, *[1] * (pixels.dim() - 1)), pixels.to(dtype), 0.0)
        if self.backbone is not None:
            # Only the samples that have the image go through the backbone (its normalisation layers must not
            # see the zero images of absent samples, nor couple samples of one batch more than needed).
            rows = present.nonzero().flatten()
            if rows.numel() == 0:
                rows = torch.zeros(1, dtype=torch.long, device=pixels.device)  # all absent: any row, all masked
            sub_tokens, grid = self._backbone_tokens(pixels[rows])
            tokens = sub_tokens.new_zeros(b, *sub_tokens.shape[1:]).index_copy(0, rows, sub_tokens)
        elif cfg.spatial_dims == 2:
            tokens = self.patch_embed(pixels)  # (B, h, w, D_in)
            grid = tuple(tokens.shape[1:3])
            tokens = tokens.flatten(1, 2)
        else:
            pad = [p for s in reversed(pixels.shape[2:]) for p in (0, (-s) % cfg.patch_size)]
            tokens = self.patch_embed(F.pad(pixels, pad))  # (B, D_in, d, h, w)
            grid = tuple(tokens.shape[2:])
            tokens = tokens.flatten(2).transpose(1, 2)  # (B, d*h*w, D_in)
        coords = grid_coordinates(grid, tokens.device, torch.float32)  # (N, spatial_dims), fp32 on purpose
        tokens = tokens + self.position(coords)
        keep = present[:, None].expand(b, tokens.shape[1])  # (B, N)
        return tokens, keep

    def _embed_cached(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`embed` from the frozen backbone's cached outputs: the same tokens as from the pixels."""
        feats = inputs["backbone_features"]  # (B, h*w, C')
        b = feats.shape[0]
        present = inputs.get("present")
        present = torch.ones(b, dtype=torch.bool, device=feats.device) if present is None else present.bool()
        rows = present.nonzero().flatten()
        if rows.numel() == 0:
            rows = torch.zeros(1, dtype=torch.long, device=feats.device)
        grid = tuple(int(g) for g in inputs["feature_grid"][rows[0]].tolist())
        sub = self.proj(feats[rows].to(self.proj.weight.dtype))
        tokens = sub.new_zeros(b, *sub.shape[1:]).index_copy(0, rows, sub)
        coords = grid_coordinates(grid, tokens.device, torch.float32)  # (N, 2)
        tokens = tokens + self.position(coords)
        keep = present[:, None].expand(b, tokens.shape[1])  # (B, N)
        return tokens, keep
