"""Processor settings files: entries name columns, are never applied to other columns, unused ones are reported,
relative paths resolve against the file's folder."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest
import yaml

from bioperceiver.data import BioPerceiverProcessor, load_processor_settings
from bioperceiver.data.manifest import Manifest, resolve_modalities
from bioperceiver.data.processing import ProcessorSettings
from bioperceiver.modalities.text.processor import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
NOTES = ["mild effusion on the left", "no fracture seen", "heart size normal", "lungs clear", "stable after surgery"]


def _manifest(root) -> Manifest:
    table = pd.DataFrame(
        {
            "sample_id": [f"s{i}" for i in range(5)],
            "patient_id": [f"p{i}" for i in range(5)],
            "text_note": NOTES,
            "tabular_labs": [{"hb": 10.0 + i, "sex": "F" if i % 2 else "M"} for i in range(5)],
        }
    )
    mods, _ = resolve_modalities(table.columns, {})
    return Manifest(table, mods, [], {}, Path(root))


def test_settings_for_absent_columns_are_reported_and_never_applied(tmp_path, caplog):
    path = tmp_path / "settings.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "processors": {
                    "text_note": {"vocab_size": 60, "min_frequency": 1},
                    "signal_ecg": {"window_s": 10.0},  # the demo's column: this manifest has no ECG
                },
                "embedders": {"signal_ecg": {"patch_size": 50}, "text_note": {"num_layers": 1}},
                "defaults": {"signal": {"patch_size": 50}},  # per-kind defaults are not a thing: reported
            }
        )
    )
    settings = load_processor_settings(path)
    processors, _embedders = settings  # still unpacks as before
    assert isinstance(settings, ProcessorSettings) and settings.source == path
    manifest = _manifest(tmp_path)
    expected = [
        "defaults (unknown section; expected processors or embedders)",
        "processors.signal_ecg (no such modality column)",
        "embedders.signal_ecg (no such modality column)",
    ]
    assert settings.unused(manifest.modalities) == expected
    with caplog.at_level(logging.WARNING, logger="bioperceiver.data.processing"):
        proc = BioPerceiverProcessor.from_manifest(manifest, settings)
    assert proc.unused_settings == expected
    assert any(all(e in r.getMessage() for e in expected) for r in caplog.records), caplog.text
    assert proc.processors["text_note"].settings.vocab_size == 60
    default = BioPerceiverProcessor.from_manifest(manifest).processors["tabular_labs"].settings
    assert proc.processors["tabular_labs"].settings == default  # nothing leaked onto the other column
    # a plain dict of settings (code, not a file) is reported the same way instead of failing the run
    plain = BioPerceiverProcessor.from_manifest(manifest, processors)
    assert plain.unused_settings == ["processors.signal_ecg (no such modality column)"]
    assert settings.for_columns(manifest.modalities).embedders == {"text_note": {"num_layers": 1}}


def test_relative_paths_in_a_settings_file_resolve_against_its_folder(tmp_path, monkeypatch):
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    tok = train_tokenizer(NOTES * 3, model="wordpiece", vocab_size=60, lowercase=True, min_frequency=1)
    tok.save(str(config_dir / "notes_tokenizer.json"))
    (config_dir / "settings.yaml").write_text("text_note: {tokenizer_file: notes_tokenizer.json, max_length: 16}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings, _ = load_processor_settings(Path("..") / "configs" / "settings.yaml")
    assert Path(settings["text_note"]["tokenizer_file"]).resolve() == (config_dir / "notes_tokenizer.json").resolve()
    manifest = _manifest(tmp_path)
    proc = BioPerceiverProcessor.from_manifest(manifest, settings).fit(manifest)
    ids = proc.processors["text_note"]("lungs clear")["input_ids"]
    assert ids.tolist() == tok.encode("lungs clear").ids[: len(ids)]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_processor_settings(config_dir / "nope.yaml")


def test_demo_settings_name_only_demo_columns_and_load_unchanged():
    path = ROOT / "tokenizers" / "demo_processors.yaml"
    raw = yaml.safe_load(path.read_text())
    settings = load_processor_settings(path)
    assert settings.processors == raw["processors"] and settings.embedders == raw["embedders"]
    assert settings.unknown_keys == [] and settings.unused(raw["processors"]) == []
    assert set(settings.embedders) <= set(settings.processors)
