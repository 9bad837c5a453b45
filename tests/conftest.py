"""Shared fixtures: tiny configs and random batches for every modality kind (CPU, deterministic)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

import bioperceiver as bp

TINY_MODALITIES = {
    "image_cxr": {"kind": "image", "spatial_dims": 2, "in_channels": 1, "patch_size": 8, "num_fourier_bands": 4},
    "image_ct": {"kind": "image", "spatial_dims": 3, "in_channels": 1, "patch_size": 4, "num_fourier_bands": 4},
    "omics": {"kind": "omics", "num_genes": 64, "num_value_bands": 4},
    "signal": {"kind": "signal", "patch_size": 8, "num_channels": 8, "num_time_bands": 4},
    "tabular": {"kind": "tabular", "num_features": 16, "num_categories": 16, "num_value_bands": 4},
    "text": {"kind": "text", "vocab_size": 100, "max_position_embeddings": 32},
}


def tiny_config(**overrides) -> bp.BioPerceiverConfig:
    kwargs = dict(
        num_latents=6,
        d_latents=16,
        d_input=12,
        num_cross_attention_heads=2,
        num_self_attention_heads=2,
        num_cross_attention_layers=1,
        num_self_attention_layers=2,
        self_attention_widening_factor=2,
        projection_dim=8,
        modalities=TINY_MODALITIES,
    )
    kwargs.update(overrides)
    return bp.BioPerceiverConfig(**kwargs)


def random_batch(config: bp.BioPerceiverConfig, batch_size: int = 3, seed: int = 0) -> dict[str, dict]:
    """A batch with every configured modality present for every sample, with ragged lengths via masks."""
    g = torch.Generator().manual_seed(seed)
    b = batch_size
    batch = {}
    for name, cfg in config.modalities.items():
        kind = cfg["kind"]
        if kind == "text":
            t = 9
            ids = torch.randint(1, cfg["vocab_size"], (b, t), generator=g)
            mask = torch.ones(b, t, dtype=torch.long)
            mask[0, 6:] = 0  # ragged: sample 0 has 6 tokens
            batch[name] = {"input_ids": ids, "attention_mask": mask}
        elif kind == "image":
            shape = (b, cfg["in_channels"], 16, 24) if cfg["spatial_dims"] == 2 else (b, cfg["in_channels"], 8, 8, 12)
            batch[name] = {"pixel_values": torch.randn(*shape, generator=g)}
        elif kind == "omics":
            n = 11
            mask = torch.ones(b, n, dtype=torch.bool)
            mask[-1, 7:] = False
            batch[name] = {
                "gene_ids": torch.randint(0, cfg["num_genes"], (b, n), generator=g),
                "values": torch.randn(b, n, generator=g),
                "mask": mask,
            }
        elif kind == "signal":
            c, t = 3, 21
            time_mask = torch.ones(b, t, dtype=torch.bool)
            time_mask[0, 15:] = False
            batch[name] = {
                "values": torch.randn(b, c, t, generator=g),
                "channel_ids": torch.randint(0, cfg["num_channels"], (b, c), generator=g),
                "time_mask": time_mask,
                "sampling_rate": torch.full((b,), 50.0),
            }
        elif kind == "tabular":
            f = 5
            cats = torch.zeros(b, f, dtype=torch.long)
            cats[:, 3] = torch.randint(1, cfg["num_categories"], (b,), generator=g)
            batch[name] = {
                "feature_ids": torch.randint(0, cfg["num_features"], (b, f), generator=g),
                "values": torch.randn(b, f, generator=g),
                "category_ids": cats,
            }
        else:  # pragma: no cover - a new kind must add its batch here
            raise NotImplementedError(kind)
    return batch


@pytest.fixture
def config() -> bp.BioPerceiverConfig:
    return tiny_config()


@pytest.fixture
def model(config) -> bp.BioPerceiverModel:
    torch.manual_seed(0)
    return bp.BioPerceiverModel(config).eval()


@pytest.fixture
def batch(config) -> dict[str, dict]:
    return random_batch(config)
