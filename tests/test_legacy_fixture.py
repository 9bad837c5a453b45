"""Models and processors saved before modalities became plug-in folders (issue 12) still load and give the same
numbers: ``tests/fixtures/legacy_v0_1`` was written by ``tests/fixtures/make_legacy_fixture.py`` with the old code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel

import bioperceiver as bp
from bioperceiver.data import BioPerceiverCollator, BioPerceiverProcessor, read_manifest

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "legacy_v0_1"


@pytest.fixture(scope="module")
def legacy():
    expected = json.loads((FIXTURE / "expected.json").read_text())
    processor = BioPerceiverProcessor.from_pretrained(FIXTURE / "model")
    model = AutoModel.from_pretrained(FIXTURE / "model").eval()
    manifest = read_manifest(FIXTURE / "cohort" / "manifest.jsonl")
    processed = [processor(r, base_dir=manifest.base_dir) for r in manifest.records()]
    return expected, processor, model, manifest, processed


def test_legacy_processors_load_and_process_to_the_saved_arrays(legacy):
    expected, processor, _model, manifest, processed = legacy
    assert processor.modalities == expected["modalities"]
    assert [r["sample_id"] for r in manifest.records()] == expected["sample_ids"]
    arrays = np.load(FIXTURE / "expected_arrays.npz")
    seen = set()
    for i, sample in enumerate(processed):
        for name in sorted(processor.modalities):
            assert (sample[name] is not None) == expected["present"][name][i], (i, name)
            for key, value in (sample[name] or {}).items():
                ref = arrays[f"{i}/{name}/{key}"]
                np.testing.assert_array_equal(np.asarray(value), ref, err_msg=f"{i}/{name}/{key}")
                seen.add(f"{i}/{name}/{key}")
    assert seen == set(arrays.files)  # no array disappeared or appeared
    assert set(expected["modalities"].values()) == {"text", "image", "omics", "signal", "tabular"}


def test_legacy_model_loads_with_auto_model_and_gives_the_saved_outputs(legacy):
    _expected, processor, model, _manifest, processed = legacy
    assert isinstance(model, bp.BioPerceiverModel)
    batch = BioPerceiverCollator(processor.modalities)(processed, train=False)
    with torch.no_grad():
        out = model(inputs=batch["inputs"], return_modality_embeddings=True)
    ref = np.load(FIXTURE / "expected_outputs.npz")
    for key in ("last_hidden_state", "pooler_output", "modality_pooler_output"):
        np.testing.assert_allclose(getattr(out, key).numpy(), ref[key], rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_array_equal(out.modality_mask.numpy(), ref["modality_mask"])
    assert not ref["modality_mask"].all()  # the fixture has absent modalities, and they stay absent


def test_legacy_image_processors_keep_the_transposed_axis_order(legacy):
    # saved before ``axis_order`` existed: they read PNG/DICOM transposed, as their model was trained (the arrays
    # above check it: the fixture's 2D images differ from the rows-first ones)
    _expected, processor, *_ = legacy
    assert {n: p.settings.axis_order for n, p in processor.processors.items() if p.kind == "image"} == {
        "image_2d": "legacy",
        "image_3d": "legacy",
    }
