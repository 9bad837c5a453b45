"""Per-kind embedder behaviour (token layout, masks, bad input, timm backbones, time encodings) and the spec contract
of every built-in kind (folders, arrays, collation, Arrow rows, cheap cell checks, the registry)."""

from __future__ import annotations

from pathlib import Path

import nibabel
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from safetensors.torch import save_file
from transformers import AutoModel

import bioperceiver as bp
from bioperceiver.data import BioPerceiverCollator, BioPerceiverProcessor, read_manifest
from bioperceiver.modalities import available_modalities, get_embedder_class, get_modality, register_modality


def embedder(kind: str, d_input: int = 8, **settings):
    cls = get_embedder_class(kind)
    torch.manual_seed(0)
    return cls(f"my_{kind}", cls.config_class(**settings), d_input)


def test_text_tokens_and_mask():
    emb = embedder("text", vocab_size=50, max_position_embeddings=6)
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    tokens, keep = emb({"input_ids": ids, "attention_mask": (ids > 0).long()})
    assert tokens.shape == (2, 4, 8) and keep.tolist() == [[True] * 3 + [False], [True] * 2 + [False] * 2]
    assert torch.equal(tokens[~keep], torch.zeros(3, 8))
    with pytest.raises(ValueError, match=r"'my_text'.*lie in \[0, 50\).*vocab_size disagree"):
        emb({"input_ids": torch.tensor([[5, 99]])})
    with pytest.raises(ValueError, match="exceed max_position_embeddings=6"):
        emb({"input_ids": torch.ones(1, 7, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"missing keys \['input_ids'\]"):
        emb({"ids": ids})
    with pytest.raises(ValueError, match="integer tensor"):
        emb({"input_ids": ids.float()})


def test_omics_unmeasured_gene_is_no_token():
    emb = embedder("omics", num_genes=20)
    ids, values = torch.tensor([[1, 2, 3]]), torch.tensor([[0.5, float("nan"), 2.0]])
    mask = torch.tensor([[True, False, True]])
    tokens, keep = emb({"gene_ids": ids, "values": values, "mask": mask})
    assert keep.tolist() == mask.tolist() and torch.isfinite(tokens).all()
    dropped, _ = emb({"gene_ids": ids[:, [0, 2]], "values": values[:, [0, 2]]})
    torch.testing.assert_close(tokens[:, [0, 2]], dropped)
    with pytest.raises(ValueError, match="refit the gene vocabulary"):
        emb({"gene_ids": torch.tensor([[25]]), "values": torch.zeros(1, 1)})


def test_omics_per_gene_value_embedding_adds_value_times_a_vector_per_gene():
    """``value_embedding: per_gene``: token = the shared token + value x that gene's own vector (FT-Transformer's
    per-feature linear tokenizer); the default has no such table, and the setting is checked."""
    torch.manual_seed(0)
    shared = embedder("omics", num_genes=20)
    assert shared.gene_value_embeddings is None
    torch.manual_seed(0)
    per_gene = embedder("omics", num_genes=20, value_embedding="per_gene")
    per_gene.load_state_dict(shared.state_dict(), strict=False)  # the shared parts equal
    ids, values = torch.tensor([[1, 2, 3], [3, 4, 0]]), torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    a, keep = shared({"gene_ids": ids, "values": values, "mask": mask})
    b, _ = per_gene({"gene_ids": ids, "values": values, "mask": mask})
    w = per_gene.gene_value_embeddings.weight
    expected = a + values[..., None] * w[ids] * keep[..., None]
    torch.testing.assert_close(b[keep], expected[keep])
    torch.testing.assert_close(b[1, 1], a[1, 1])  # a value of 0 adds nothing
    with pytest.raises(ValueError, match="value_embedding"):
        embedder("omics", num_genes=20, value_embedding="binned")


def test_tabular_numeric_and_categorical_tokens():
    emb = embedder("tabular", num_features=4, num_categories=5)
    ids = torch.tensor([[0, 1, 2]])
    a, _ = emb(
        {"feature_ids": ids, "values": torch.tensor([[0.1, 7.0, 0.0]]), "category_ids": torch.tensor([[0, 3, 0]])}
    )
    b, _ = emb(
        {"feature_ids": ids, "values": torch.tensor([[0.1, -9.0, 0.0]]), "category_ids": torch.tensor([[0, 3, 0]])}
    )
    torch.testing.assert_close(a, b)  # the numeric value of a categorical token is ignored
    c, _ = emb(
        {"feature_ids": ids, "values": torch.tensor([[0.2, 7.0, 0.0]]), "category_ids": torch.tensor([[0, 3, 0]])}
    )
    assert not torch.allclose(a[0, 0], c[0, 0]) and torch.allclose(a[0, 1:], c[0, 1:])
    with pytest.raises(ValueError, match="category_ids must lie in"):
        emb({"feature_ids": ids, "values": torch.zeros(1, 3), "category_ids": torch.tensor([[0, 9, 0]])})


def test_signal_patches_channels_and_time():
    emb = embedder("signal", patch_size=4, num_channels=6)
    values = torch.randn(2, 3, 10)
    chans = torch.tensor([[0, 1, 2], [3, 4, 5]])
    rate = torch.tensor([100.0, 100.0])
    tokens, keep = emb({"values": values, "channel_ids": chans, "sampling_rate": rate})
    assert tokens.shape == (2, 3 * 3, 8) and keep.all()  # 10 samples -> 3 patches per channel
    # timestamps equal to index / rate give the same tokens as the sampling rate
    ts = torch.arange(10.0).expand(2, 10) / 100.0
    same, _ = emb({"values": values, "channel_ids": chans, "timestamps": ts})
    torch.testing.assert_close(same, tokens)
    # irregular sampling changes the time encoding
    irregular, _ = emb({"values": values, "channel_ids": chans, "timestamps": ts**1.5})
    assert not torch.allclose(irregular, tokens)
    # a short recording (variable length) drops its empty patches
    time_mask = torch.ones(2, 10, dtype=torch.bool)
    time_mask[1, 4:] = False
    _, keep = emb({"values": values, "channel_ids": chans, "sampling_rate": rate, "time_mask": time_mask})
    assert keep.view(2, 3, 3)[1].tolist() == [[True, False, False]] * 3
    with pytest.raises(ValueError, match="give timestamps"):
        emb({"values": values, "channel_ids": chans})
    default_rate = embedder("signal", patch_size=4, num_channels=6, sampling_rate=100.0)
    torch.testing.assert_close(default_rate({"values": values, "channel_ids": chans})[0], tokens)


def test_image_2d_and_3d_shapes_and_errors():
    emb2 = embedder("image", patch_size=4, in_channels=3)
    tokens, keep = emb2({"pixel_values": torch.randn(2, 3, 8, 12), "present": torch.tensor([True, False])})
    assert tokens.shape == (2, 6, 8) and keep[0].all() and not keep[1].any()
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) with C=3"):
        emb2({"pixel_values": torch.randn(2, 1, 8, 8)})
    emb3 = embedder("image", spatial_dims=3, patch_size=4)
    tokens, _ = emb3({"pixel_values": torch.randn(1, 1, 8, 8, 4)})
    assert tokens.shape == (1, 2 * 2 * 1, 8)


def test_timm_backbone_mode_loads_local_weights_and_round_trips(tmp_path):
    reference = timm.create_model("resnet10t", pretrained=False, num_classes=0, global_pool="", in_chans=1)
    weights = tmp_path / "resnet10t.safetensors"
    save_file(reference.state_dict(), str(weights))
    config = bp.BioPerceiverConfig(
        num_latents=4,
        d_latents=16,
        d_input=16,
        num_cross_attention_heads=2,
        num_self_attention_heads=2,
        num_self_attention_layers=1,
        modalities={
            "image_path": {
                "kind": "image",
                "mode": "timm",
                "backbone": "resnet10t",
                "backbone_weights": str(weights),
                "freeze_backbone": True,
            }
        },
    )
    model = bp.BioPerceiverModel(config).eval()
    backbone = model.embedders["image_path"].backbone
    for key, value in reference.state_dict().items():
        assert torch.equal(backbone.state_dict()[key], value), f"{key} not loaded from the local file"
    assert not any(p.requires_grad for p in backbone.parameters())
    pixels = {"pixel_values": torch.randn(2, 1, 64, 64)}
    out = model(image_path=pixels).pooler_output
    tokens, _ = model.embedders["image_path"](pixels)
    assert tokens.shape[1] == 2 * 2  # resnet stride 32 on 64 x 64
    model.save_pretrained(tmp_path / "ckpt")
    weights.unlink()  # the checkpoint carries the backbone: the local file is no longer needed
    loaded = AutoModel.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config.modalities["image_path"]["backbone_weights"] is None
    assert model.config.modalities["image_path"]["backbone_weights"] == str(weights)
    assert torch.equal(loaded(image_path=pixels).pooler_output, out)


def test_timm_backbone_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"backbone_weights file .* does not exist"):
        embedder("image", mode="timm", backbone="resnet10t", backbone_weights=str(tmp_path / "nope.pth"))


def test_vit_backbone_tokens_drop_prefix():
    emb = embedder(
        "image",
        mode="timm",
        backbone="vit_tiny_patch16_224",
        in_channels=1,
        backbone_kwargs={"img_size": 32, "depth": 1},
    )
    tokens, keep = emb({"pixel_values": torch.randn(1, 1, 32, 32)})
    assert tokens.shape == (1, 4, 8) and keep.all()


def test_nhwc_backbone_tokens_follow_the_feature_grid():
    emb = embedder("image", mode="timm", backbone="mambaout_femto", in_channels=1)
    pixels = torch.randn(2, 1, 64, 96)
    feats = emb.backbone.forward_features(pixels)  # (B, h, w, C): NHWC
    assert emb.backbone.output_fmt == "NHWC" and feats.shape[1:3] == (2, 3)
    tokens, grid = emb._backbone_tokens(pixels)
    assert grid == (2, 3)
    torch.testing.assert_close(tokens, emb.proj(feats.flatten(1, 2)))


def test_vit_backbone_non_square_grid():
    emb = embedder(
        "image", mode="timm", backbone="vit_tiny_patch16_224", backbone_kwargs={"img_size": (32, 48), "depth": 1}
    )
    tokens, grid = emb._backbone_tokens(torch.randn(1, 1, 32, 48))
    assert grid == (2, 3) and tokens.shape == (1, 6, 8)


def test_backbone_with_non_persistent_buffers_is_refused():
    with pytest.raises(ValueError, match="non-persistent buffers"):
        embedder(
            "image",
            mode="timm",
            backbone="swin_tiny_patch4_window7_224",
            backbone_kwargs={"depths": (1, 1, 1, 1), "embed_dim": 24, "num_heads": (1, 1, 1, 1)},
        )


def test_rgb_checkpoint_loads_into_greyscale_backbone(tmp_path):
    rgb = timm.create_model("resnet10t", pretrained=False, num_classes=0, global_pool="", in_chans=3)
    weights = tmp_path / "rgb.safetensors"
    save_file(rgb.state_dict(), str(weights))
    emb = embedder("image", mode="timm", backbone="resnet10t", in_channels=1, backbone_weights=str(weights))
    loaded = emb.backbone.state_dict()
    assert torch.equal(loaded["layer2.0.conv1.weight"], rgb.state_dict()["layer2.0.conv1.weight"])
    stem = rgb.state_dict()["conv1.0.weight"]
    torch.testing.assert_close(loaded["conv1.0.weight"], stem.sum(1, keepdim=True))  # timm's channel adaptation


def test_frozen_backbone_keeps_statistics_and_ignores_absent_samples():
    emb = embedder("image", mode="timm", backbone="resnet10t", freeze_backbone=True).train()
    assert not emb.backbone.training
    before = {k: v.clone() for k, v in emb.backbone.state_dict().items()}
    pixels = torch.randn(3, 1, 64, 64)
    tokens, keep = emb({"pixel_values": pixels, "present": torch.tensor([True, False, True])})
    assert all(torch.equal(v, emb.backbone.state_dict()[k]) for k, v in before.items())
    assert keep.tolist() == [[True] * 4, [False] * 4, [True] * 4]
    # a sample's tokens do not depend on its batch-mates, in training mode too
    alone, _ = emb({"pixel_values": pixels[:1]})
    torch.testing.assert_close(tokens[:1], alone)


def test_positions_keep_fp32_precision_in_a_bf16_model():
    fp32 = embedder("signal", patch_size=4, num_channels=4)
    bf16 = embedder("signal", patch_size=4, num_channels=4).to(torch.bfloat16)
    ts = 3000.0 + torch.arange(12.0)[None] * 0.5  # an hour into a recording, 2 Hz
    t32 = fp32.time_encoding(ts[..., None])
    t16 = bf16.time_encoding(ts[..., None]).float()
    # bf16 cannot even represent these time stamps apart (spacing 16 s at 3000 s); fp32 features can
    assert (t32[0, 1:] - t32[0, :-1]).abs().max() > 1e-3
    torch.testing.assert_close(t16, t32, atol=0.05, rtol=0.05)
    img32 = embedder("image", patch_size=4)
    img16 = embedder("image", patch_size=4)
    img16.load_state_dict(img32.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, _ = img16({"pixel_values": torch.zeros(1, 1, 64, 64)})
    b, _ = img32({"pixel_values": torch.zeros(1, 1, 64, 64)})
    torch.testing.assert_close(a.float(), b, atol=0.05, rtol=0.05)


# ---- the spec contract of every built-in kind ----------------------------------------------------------------------
LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy_v0_1"


def test_builtin_kinds_are_folders_whose_spec_matches_processor_and_embedder():
    processor = BioPerceiverProcessor.from_pretrained(LEGACY / "model")
    manifest = read_manifest(LEGACY / "cohort" / "manifest.jsonl")
    processed = [processor(r, base_dir=manifest.base_dir) for r in manifest.records()]
    ids = [p["sample_id"] for p in processed]
    assert available_modalities() == sorted(
        {"text", "image", "omics", "signal", "tabular"} | set(available_modalities())
    )
    for name, proc in processor.processors.items():
        spec = get_modality(proc.kind)
        assert type(proc) is spec.processor_class and spec.kind == proc.kind == spec.embedder_class.kind
        for part, cls in (("processor", spec.processor_class), ("embedder", spec.embedder_class), ("spec", type(spec))):
            assert cls.__module__ == f"bioperceiver.modalities.{spec.kind}.{part}"
        column = [None if p[name] is None else spec.check_arrays(p[name]) for p in processed]
        assert any(a is None for a in column) and any(a is not None for a in column)
        for arrays in filter(None, column):
            assert set(arrays) <= set(spec.arrays) and spec.num_tokens(arrays) > 0
            back = spec.from_row(spec.to_row(arrays))  # the Arrow row round trip of build_dataset
            assert set(back) == set(arrays)
            for key, value in arrays.items():
                np.testing.assert_array_equal(back[key], value)
        batch = spec.collate(name, column, ids, lambda n: n)
        emb = spec.embedder_class
        assert set(emb.input_keys) <= set(batch) <= set(emb.input_keys) | set(emb.optional_input_keys)
        assert spec.features(proc).keys() == spec.arrays.keys()


def test_cheap_cell_checks_decode_headers_only(tmp_path):
    image, signal = get_modality("image"), get_modality("signal")
    ok = get_testdata_file("CT_small.dcm")
    assert image.check_cell(ok, base_dir=None) == []
    assert [p.reason for p in image.check_cell(get_testdata_file("rtplan.dcm"), base_dir=None)] == ["not_an_image"]
    (tmp_path / "cut.dcm").write_bytes(b"not a DICOM file" * 16)
    assert [p.reason for p in image.check_cell("cut.dcm", base_dir=tmp_path)] == ["unreadable_image"]
    nibabel.save(nibabel.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    Image.fromarray(np.zeros((6, 7), np.uint8)).save(tmp_path / "x.jpg")
    np.save(tmp_path / "a.npy", np.zeros((6, 7), np.float32))
    for good in ("v.nii.gz", "x.jpg", "a.npy"):
        assert image.check_cell(good, base_dir=tmp_path) == [], good
    assert [p.reason for p in image.check_cell(7, base_dir=tmp_path)] == ["bad_type"]
    (tmp_path / "r.edf").write_bytes(b"not an edf header" * 20)
    (tmp_path / "t.csv").write_text("time\n0.0\n")
    (tmp_path / "s.csv").write_text("time,HR\n0.0,60\n")
    assert [p.reason for p in signal.check_cell("r.edf", base_dir=tmp_path)] == ["unreadable_signal"]
    assert [p.reason for p in signal.check_cell("t.csv#start=x", base_dir=tmp_path)] == ["no_channels", "bad_reference"]
    assert signal.check_cell("s.csv#start=1&duration=2", base_dir=tmp_path) == []
    tabular, omics, text = get_modality("tabular"), get_modality("omics"), get_modality("text")
    assert [p.reason for p in tabular.check_cell({"age": [1, 2], "sex": "F"}, base_dir=None)] == ["non_scalar"]
    assert tabular.check_cell('{"age": null, "sex": "F"}', base_dir=None) == []
    assert [p.reason for p in omics.check_cell({"TP53": "high", "EGFR": "1.5"}, base_dir=None)] == ["non_numeric"]
    assert [p.reason for p in text.check_cell("  ", base_dir=None)] == ["empty_text"]
    assert [p.reason for p in text.check_cell(3.0, base_dir=None)] == ["bad_type"]


def test_registry_rejects_classes_and_unknown_kinds():
    with pytest.raises(ValueError, match="ModalitySpec instance"):
        register_modality(type(get_modality("text")))
    with pytest.raises(ValueError, match=r"unknown modality kind 'spectrum'.*register_modality"):
        get_modality("spectrum")
    with pytest.raises(ValueError, match=r"modality 'x'.*unknown modality kind"):
        bp.BioPerceiverConfig(modalities={"x": {"kind": "spectrum"}})
    with pytest.raises(ValueError, match="unknown modality kind"):
        BioPerceiverCollator({"x": "spectrum"})
