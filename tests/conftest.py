"""Shared fixtures: tiny configs and random batches for every modality kind (CPU, deterministic)."""

from __future__ import annotations

import os
import socket

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


def synthetic_run_config(
    root, *, max_steps: int, warmup_steps: int, batch_size: int, save_steps: int, keep_last: int, **sections
):
    """A pretraining run YAML (``root/run.yaml``) on the synthetic cohort (every modality kind, 30% missing, a tiny
    preset) for script-level tests; ``sections`` update further config sections, e.g. ``eval={"steps": 0}``."""
    from pathlib import Path

    import yaml

    from bioperceiver.data.recipes.synthetic import make_synthetic_cohort

    root = Path(root)
    manifest = make_synthetic_cohort(root / "cohort", num_patients=40, missing_rate=0.3, seed=5)
    settings = {
        "processors": {
            "text_note": {"vocab_size": 200, "min_frequency": 1, "max_length": 48},
            "image_2d": {"spatial_size": [16, 16], "augment": {"flip": 0.5, "noise_std": 0.05}},
            "image_3d": {"spatial_dims": 3, "spatial_size": [8, 8, 8]},
            "signal_ecg": {"target_rate": 50.0, "window_s": 2.0},
        },
        "embedders": {"image_2d": {"patch_size": 8}, "image_3d": {"patch_size": 4}, "signal_ecg": {"patch_size": 10}},
    }
    (root / "settings.yaml").write_text(yaml.safe_dump(settings))
    repo = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((repo / "pretrain" / "configs" / "demo.yaml").read_text())
    cfg["data"].update(
        manifest=str(manifest),
        build_demo_cohort=False,
        processor_settings=str(root / "settings.yaml"),
        processor_dir=str(root / "processors"),
    )
    cfg["optim"].update(max_steps=max_steps, warmup_steps=warmup_steps)
    cfg["train"]["batch_size"] = batch_size
    cfg["checkpoint"].update(save_steps=save_steps, keep_last=keep_last)
    cfg["logging"].update(log_steps=1, report_to="none")
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    return root / "run.yaml"


def free_port() -> int:
    """A free local TCP port for a test's process group (``MASTER_PORT``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
