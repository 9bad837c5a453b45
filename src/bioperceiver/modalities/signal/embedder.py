"""``signal``: multichannel time series (ECG, EDA, respiration, wearables) -> per-channel patch tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...layers import FourierFeatures
from ..embedder import ModalityEmbedder, require_positive


@dataclass
class SignalConfig:
    """Settings of a ``signal`` modality.

    Args:
        patch_size: samples per patch; each channel is cut into patches of this many samples (the last one
            zero-padded), one token per (channel, patch).
        num_channels: size of the channel-name vocabulary fitted by the signal processor (ids in
            ``[0, num_channels)``), e.g. ECG leads I..V6, EDA, RESP.
        sampling_rate: default sampling rate in Hz when a batch gives neither ``timestamps`` nor
            ``sampling_rate``; ``None`` makes one of them required.
        num_time_bands: Fourier frequency bands of the continuous-time position encoding.
        min_period: shortest period (seconds) resolved by the time encoding.
        max_period: longest period (seconds) resolved by the time encoding.
    """

    patch_size: int = 64
    num_channels: int = 64
    sampling_rate: float | None = None
    num_time_bands: int = 16
    min_period: float = 0.05
    max_period: float = 3600.0

    def __post_init__(self) -> None:
        require_positive(
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            num_time_bands=self.num_time_bands,
            min_period=self.min_period,
            max_period=self.max_period,
        )
        if self.sampling_rate is not None:
            require_positive(sampling_rate=self.sampling_rate)
        if self.min_period > self.max_period:
            raise ValueError(f"min_period={self.min_period} must not exceed max_period={self.max_period}")


class SignalEmbedder(ModalityEmbedder):
    """Inputs: ``values`` (B, C, T) float; ``channel_ids`` (B, C) int. Optional: ``channel_mask`` (B, C),
    ``time_mask`` (B, T) (valid samples; variable lengths), ``timestamps`` (B, T) seconds (irregular
    sampling), ``sampling_rate`` (B,) Hz (regular sampling).

    Token (c, p) = Linear(samples of channel c in patch p) + channel embedding + Fourier(time of the patch centre
    in seconds). The patch time is the mean time stamp of its valid samples, so irregular sampling is kept.
    """

    kind = "signal"
    config_class = SignalConfig
    input_keys = ("values", "channel_ids")
    optional_input_keys = ("channel_mask", "time_mask", "timestamps", "sampling_rate")

    def __init__(self, name: str, config: SignalConfig, d_input: int) -> None:
        super().__init__(name, config, d_input)
        self.patch_proj = nn.Linear(config.patch_size, d_input)
        self.channel_embeddings = nn.Embedding(config.num_channels, d_input)
        self.time_encoding = FourierFeatures(
            num_dims=1,
            num_bands=config.num_time_bands,
            min_freq=1.0 / config.max_period,
            max_freq=1.0 / config.min_period,
            d_out=d_input,
        )

    def _timestamps(self, inputs: dict[str, torch.Tensor], b: int, t: int, device, dtype) -> torch.Tensor:
        if inputs.get("timestamps") is not None:
            ts = inputs["timestamps"]
            if ts.shape != (b, t):
                raise ValueError(f"modality {self.name!r}: timestamps must be (B, T)=({b}, {t}), got {tuple(ts.shape)}")
            return ts.to(dtype)
        rate = inputs.get("sampling_rate")
        if rate is None:
            if self.config.sampling_rate is None:
                raise ValueError(
                    f"modality {self.name!r}: give timestamps (B, T) or sampling_rate (B,) in the batch, "
                    "or set sampling_rate in the modality config"
                )
            rate = torch.full((b,), self.config.sampling_rate, device=device, dtype=dtype)
        rate = rate.to(device=device, dtype=dtype).reshape(-1)
        if rate.shape[0] != b:
            raise ValueError(
                f"modality {self.name!r}: sampling_rate must have one value per sample ({b}), got {rate.shape[0]}"
            )
        return torch.arange(t, device=device, dtype=dtype)[None, :] / rate[:, None]  # (B, T) seconds

    def matmul_flops(self, inputs):
        b, c, t = inputs["values"].shape
        p = self.config.patch_size
        n = -(-t // p)
        flops = float(b * c * n * 2 * p * self.d_input + b * n * 2 * self.time_encoding.proj.in_features * self.d_input)
        return flops, flops

    def embed(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        values, channel_ids = inputs["values"], inputs["channel_ids"]
        if values.dim() != 3 or channel_ids.shape != values.shape[:2]:
            raise ValueError(
                f"modality {self.name!r}: values must be (B, C, T) and channel_ids (B, C), got "
                f"{tuple(values.shape)} and {tuple(channel_ids.shape)}"
            )
        b, c, t = values.shape
        p = self.config.patch_size
        dtype = self.patch_proj.weight.dtype
        channel_keep = self._mask(inputs, "channel_mask", channel_ids.shape)  # (B, C)
        time_keep = self._mask(inputs, "time_mask", torch.Size([b, t]))  # (B, T)
        ids = channel_ids.masked_fill(~channel_keep, 0)
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.config.num_channels):
            raise ValueError(
                f"modality {self.name!r}: channel ids must lie in [0, {self.config.num_channels}), "
                f"found [{int(ids.min())}, {int(ids.max())}]; refit the channel vocabulary"
            )
        ts = self._timestamps(inputs, b, t, values.device, torch.float32)  # seconds stay fp32 even in bf16 models
        valid = channel_keep[:, :, None] & time_keep[:, None, :]  # (B, C, T)
        values = torch.where(valid, values.to(dtype), 0.0)
        ts = torch.where(time_keep, ts, 0.0)  # (B, T) fp32
        pad = (-t) % p
        n = (t + pad) // p
        patches = F.pad(values, (0, pad)).view(b, c, n, p)  # (B, C, n, P)
        time_valid = F.pad(time_keep, (0, pad)).view(b, n, p)  # (B, n, P)
        counts = time_valid.sum(-1)  # (B, n)
        patch_time = F.pad(ts, (0, pad)).view(b, n, p).sum(-1) / counts.clamp_min(1)  # (B, n) seconds
        tokens = (
            self.patch_proj(patches)  # (B, C, n, D_in)
            + self.channel_embeddings(ids)[:, :, None, :]
            + self.time_encoding(patch_time[..., None])[:, None, :, :]
        )
        keep = channel_keep[:, :, None] & (counts > 0)[:, None, :]  # (B, C, n)
        return tokens.reshape(b, c * n, -1), keep.reshape(b, c * n)
