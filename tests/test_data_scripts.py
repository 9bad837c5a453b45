"""The data scripts users run: tokenizers/train_text_tokenizer.py and tokenizers/fit_processors.py (with the
shipped demo settings), on the synthetic cohort and a small real demo cohort."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import bioperceiver as bp
from bioperceiver.data import BioPerceiverProcessor, TextProcessor, read_manifest
from bioperceiver.data.recipes.synthetic import make_synthetic_cohort

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_train_text_tokenizer_on_manifest_train_split(tmp_path):
    manifest = make_synthetic_cohort(tmp_path / "c", num_patients=40, missing_rate=0.0, seed=1)
    out = run(
        "tokenizers/train_text_tokenizer.py",
        *("--manifest", str(manifest), "--vocab_size", "300", "--min_frequency", "1", "--max_length", "32"),
        *("--output_dir", str(tmp_path / "tok")),
    )
    stats = json.loads((tmp_path / "tok" / "tokenizer_stats.json").read_text())
    assert stats["train"]["notes"] < 40 and stats["held_out"]["notes"] > 0  # trained on the train split only
    assert stats["held_out"]["unk_fraction"] < 0.05
    proc = TextProcessor.from_pretrained(tmp_path / "tok")
    assert proc.model_settings()["max_position_embeddings"] == 32
    assert "tokenizer.json" in out


def test_fit_processors_writes_processors_modalities_and_split_manifest(tmp_path):
    manifest = make_synthetic_cohort(tmp_path / "c", num_patients=30, missing_rate=0.3, seed=2)
    settings = {
        "processors": {
            "image_3d": {"spatial_dims": 3, "spatial_size": [8, 8, 8]},
            "image_2d": {"spatial_size": [16, 16]},
        },
        "embedders": {"image_3d": {"patch_size": 4}, "image_2d": {"patch_size": 8}, "signal_ecg": {"patch_size": 10}},
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(settings))
    out = run(
        "tokenizers/fit_processors.py",
        *("--manifest", str(manifest), "--settings", str(tmp_path / "s.yaml"), "--output_dir", str(tmp_path / "m")),
    )
    assert "manifest OK" in out
    processor = BioPerceiverProcessor.from_pretrained(tmp_path / "m")
    mods = json.loads((tmp_path / "m" / "model_modalities.json").read_text())
    assert mods["image_3d"]["patch_size"] == 4 and mods["image_3d"]["spatial_dims"] == 3
    bp.create_model("bioperceiver_debug", modalities=mods)  # the written modalities build a model
    split = read_manifest(tmp_path / "m" / "split_manifest.parquet", base_dir=manifest.parent)
    assert split.table.groupby("patient_id")["split"].nunique().max() == 1
    assert set(processor.modalities) == set(split.modalities)

    # a folder holding a saved model keeps the processors its model was trained with: refitting there is refused
    (tmp_path / "m" / "model.safetensors").write_bytes(b"weights")
    before = (tmp_path / "m" / "bioperceiver_processor.json").stat().st_mtime_ns
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tokenizers/fit_processors.py"),
            "--manifest",
            str(manifest),
            "--output_dir",
            str(tmp_path / "m"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode != 0 and "holds a saved model" in proc.stderr, proc.stderr[-2000:]
    assert (tmp_path / "m" / "bioperceiver_processor.json").stat().st_mtime_ns == before


def test_shipped_demo_settings_fit_the_real_demo_cohort(tmp_path):
    from bioperceiver.data.recipes.demo import build_demo_cohort

    pytest.importorskip("SurvSet")
    manifest = build_demo_cohort(
        tmp_path / "demo", padchest_studies=30, survset_datasets=("gse4335",), signal_stride_s=120.0
    )
    run(
        "tokenizers/fit_processors.py",
        *("--manifest", str(manifest), "--settings", str(ROOT / "tokenizers" / "demo_processors.yaml")),
        *("--output_dir", str(tmp_path / "m")),
    )
    processor = BioPerceiverProcessor.from_pretrained(tmp_path / "m")
    m = read_manifest(tmp_path / "m" / "split_manifest.parquet", base_dir=manifest.parent)
    samples, report = processor.process_many(m.records(), base_dir=m.base_dir, on_error="skip")
    assert report.total == 0 and len(samples) == len(m)
    assert all(s["omics_expression"]["gene_ids"].size <= 256 for s in samples if s["omics_expression"])
