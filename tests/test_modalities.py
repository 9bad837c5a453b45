"""Per-kind embedder behaviour: token layout, masks, bad input, timm backbones, time encodings."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from transformers import AutoModel

import bioperceiver as bp
from bioperceiver.modalities import get_embedder_class


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
