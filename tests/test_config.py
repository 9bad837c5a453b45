"""BioPerceiverConfig: documentation, validation, serialisation; presets and the factory."""

from __future__ import annotations

import dataclasses
import re

import pytest
from conftest import TINY_MODALITIES, tiny_config

import bioperceiver as bp
from bioperceiver.modalities import get_embedder_class, list_modality_kinds


def test_every_config_argument_is_documented():
    own = [f.name for f in dataclasses.fields(bp.BioPerceiverConfig) if f.name in bp.BioPerceiverConfig.__annotations__]
    assert "num_latents" in own and "modalities" in own
    for name in own:
        assert re.search(rf"^\s+{name} \(`", bp.BioPerceiverConfig.__doc__, re.M), f"{name} undocumented"


@pytest.mark.parametrize("kind", list_modality_kinds())
def test_every_modality_setting_is_documented(kind):
    settings = get_embedder_class(kind).config_class
    for field in dataclasses.fields(settings):
        assert re.search(rf"^\s+{field.name}: ", settings.__doc__, re.M), f"{kind}.{field.name} undocumented"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_latents": 0}, "num_latents must be a positive integer"),
        ({"d_latents": 15}, "divisible by num_cross_attention_heads"),
        ({"num_self_attention_heads": 3}, "divisible by num_self_attention_heads"),
        ({"hidden_dropout": 1.0}, r"hidden_dropout must lie in \[0, 1\)"),
        ({"num_latents": "many"}, "num_latents"),
        ({"modalities": {"x": {"kind": "spectra"}}}, "modality 'x': unknown modality kind 'spectra'"),
        ({"modalities": {"x": {"vocab_size": 3}}}, "must be a dict with a 'kind' key"),
        ({"modalities": {"t": {"kind": "text", "vocab": 3}}}, r"unknown setting\(s\) \['vocab'\]"),
        ({"modalities": {"im": {"kind": "image", "spatial_dims": 4}}}, "spatial_dims must be 2 or 3"),
        ({"modalities": {"im": {"kind": "image", "mode": "timm"}}}, "needs backbone="),
        ({"modalities": {"s": {"kind": "signal", "min_period": 10, "max_period": 1}}}, "min_period"),
        ({"modalities": {"bad name": {"kind": "text"}}}, "Python identifier"),
    ],
)
def test_invalid_values_raise_value_error_saying_what_to_change(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_modality_defaults_are_filled_and_serialised(tmp_path):
    config = tiny_config(modalities={"image_cxr": {"kind": "image"}, "image_ct": {"kind": "image", "spatial_dims": 3}})
    assert config.modality_names == ["image_ct", "image_cxr"]
    assert config.modalities["image_cxr"]["patch_size"] == 16
    config.save_pretrained(tmp_path)
    loaded = bp.BioPerceiverConfig.from_pretrained(tmp_path)
    assert loaded.modalities == config.modalities
    assert loaded.to_dict() == config.to_dict()


def test_model_without_modalities_is_refused():
    with pytest.raises(ValueError, match="modalities is empty"):
        bp.BioPerceiverModel(bp.BioPerceiverConfig())


def test_presets_and_factory():
    assert bp.list_models() == ["bioperceiver_base", "bioperceiver_debug", "bioperceiver_large", "bioperceiver_small"]
    assert bp.list_models("*debug") == ["bioperceiver_debug"]
    model = bp.create_model("bioperceiver_debug", num_latents=4, modalities=TINY_MODALITIES)
    assert model.config.num_latents == 4 and model.modality_names == sorted(TINY_MODALITIES)
    config = bp.create_config(
        "bioperceiver_debug",
        modality_overrides={"text": {"vocab_size": 77}, "image_ct": {"kind": "image", "spatial_dims": 3}},
    )
    assert config.modalities["text"]["vocab_size"] == 77 and config.modalities["image_ct"]["spatial_dims"] == 3
    assert config.modalities["text"]["max_position_embeddings"] == 128  # rest of the preset kept
    with pytest.raises(ValueError, match="unknown preset"):
        bp.create_model("bioperceiver_huge")


def test_preset_json_file_path(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(
        '{"num_latents": 3, "d_latents": 8, "d_input": 8, "num_cross_attention_heads": 1, '
        '"num_self_attention_heads": 1, "modalities": {"text": {"kind": "text", "vocab_size": 10}}}'
    )
    model = bp.create_model(str(path))
    assert model.config.num_latents == 3
