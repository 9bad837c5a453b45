"""pretrain/run_pretrain.py end to end on CPU: a run killed with SIGKILL right after a checkpoint and resumed with
--resume latest ends with exactly the parameters of an uninterrupted run; shipped run YAMLs parse."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from bioperceiver.data.recipes.synthetic import make_synthetic_cohort

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "pretrain" / "run_pretrain.py"


def launch(config: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--config", str(config), *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )


@pytest.fixture(scope="module")
def run_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
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
    cfg = yaml.safe_load((ROOT / "pretrain" / "configs" / "demo.yaml").read_text())
    cfg["data"].update(
        manifest=str(manifest),
        build_demo_cohort=False,
        processor_settings=str(root / "settings.yaml"),
        processor_dir=str(root / "processors"),
    )
    cfg["optim"].update(max_steps=6, warmup_steps=2)
    cfg["train"]["batch_size"] = 8
    cfg["checkpoint"].update(save_steps=3, keep_last=2)
    cfg["logging"].update(log_steps=1, report_to="none")
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    return root


def test_killed_and_resumed_run_equals_uninterrupted_run(run_config):
    full = launch(run_config / "run.yaml", f"output_dir={run_config / 'full'}")
    assert full.returncode == 0, full.stderr[-3000:]
    crashed = launch(run_config / "run.yaml", f"output_dir={run_config / 'crash'}", "--crash_after_step", "3")
    assert crashed.returncode == -9  # SIGKILL right after checkpoint-3 was written
    assert (run_config / "crash" / "checkpoints" / "checkpoint-3").is_dir()
    assert not (run_config / "crash" / "final").exists()
    resumed = launch(run_config / "run.yaml", f"output_dir={run_config / 'crash'}", "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(run_config / "full" / "checkpoints" / "checkpoint-6" / "model.safetensors")
    b = load_file(run_config / "crash" / "checkpoints" / "checkpoint-6" / "model.safetensors")
    assert a.keys() == b.keys() and any("projection" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # backbone, projection head and temperature, bit for bit
    fa = load_file(run_config / "full" / "final" / "model.safetensors")
    start = load_file(run_config / "full" / "checkpoints" / "checkpoint-6" / "model.safetensors")
    for k in fa:  # the saved backbone is the trained one
        assert torch.equal(fa[k], start["model." + k]), k
    from transformers import AutoModel

    import bioperceiver  # noqa: F401  (registers the Auto classes)
    from bioperceiver.data import BioPerceiverProcessor

    AutoModel.from_pretrained(run_config / "full" / "final")
    BioPerceiverProcessor.from_pretrained(run_config / "full" / "final")
    kept = sorted(p.name for p in (run_config / "full" / "checkpoints").iterdir())
    assert kept == ["checkpoint-3", "checkpoint-6"]


def test_shipped_run_configs_parse():
    sys.path.insert(0, str(ROOT / "pretrain"))
    from run_pretrain import load_config

    configs = sorted((ROOT / "pretrain" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        cfg = load_config(str(path), ["optim.lr=0.5", "loss.name=siglip"])
        assert {"model", "data", "loss", "optim", "train", "checkpoint", "logging"} <= set(cfg)
        assert cfg["optim"]["lr"] == 0.5 and cfg["loss"]["name"] == "siglip"
