"""Behaviour of the BioPerceiver backbone: invariances, missing modalities, gradients, round trips, presets."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
from conftest import random_batch, tiny_config
from transformers import AutoConfig, AutoModel

import bioperceiver as bp

ATOL = 1e-5


def _pad(batch: dict, extra: int = 5) -> dict:
    """Append ``extra`` masked-out positions filled with garbage (NaN and huge values) to every ragged input."""
    out = copy.deepcopy(batch)
    for arrays in out.values():
        if "input_ids" in arrays:
            b = arrays["input_ids"].shape[0]
            arrays["input_ids"] = torch.cat([arrays["input_ids"], torch.full((b, extra), 7)], 1)
            arrays["attention_mask"] = torch.cat([arrays["attention_mask"], torch.zeros(b, extra, dtype=torch.long)], 1)
        elif "gene_ids" in arrays or "feature_ids" in arrays:
            ids_key = "gene_ids" if "gene_ids" in arrays else "feature_ids"
            b = arrays[ids_key].shape[0]
            mask = arrays.get("mask", torch.ones_like(arrays[ids_key], dtype=torch.bool))
            arrays[ids_key] = torch.cat([arrays[ids_key], torch.ones(b, extra, dtype=torch.long)], 1)
            arrays["values"] = torch.cat([arrays["values"], torch.full((b, extra), float("nan"))], 1)
            arrays["mask"] = torch.cat([mask, torch.zeros(b, extra, dtype=torch.bool)], 1)
            if "category_ids" in arrays:
                arrays["category_ids"] = torch.cat([arrays["category_ids"], torch.ones(b, extra, dtype=torch.long)], 1)
        elif "channel_ids" in arrays:  # pad both time and channels
            b, c, t = arrays["values"].shape
            values = torch.cat([arrays["values"], torch.full((b, c, extra * 4), 1e6)], 2)
            values = torch.cat([values, torch.full((b, 2, t + extra * 4), float("nan"))], 1)
            arrays["values"] = values
            arrays["time_mask"] = torch.cat([arrays["time_mask"], torch.zeros(b, extra * 4, dtype=torch.bool)], 1)
            arrays["channel_ids"] = torch.cat([arrays["channel_ids"], torch.ones(b, 2, dtype=torch.long)], 1)
            arrays["channel_mask"] = torch.cat(
                [torch.ones(b, c, dtype=torch.bool), torch.zeros(b, 2, dtype=torch.bool)], 1
            )
    return out


def _outputs(model, batch):
    with torch.no_grad():
        out = model(**batch, return_modality_embeddings=True)
    return out.last_hidden_state, out.pooler_output, out.modality_pooler_output


def test_output_shapes_and_presence(model, config, batch):
    out = model(**batch, return_modality_embeddings=True)
    k = len(config.modality_names)
    assert out.last_hidden_state.shape == (3, config.num_latents, config.d_latents)
    assert out.pooler_output.shape == (3, config.d_latents)
    assert out.modality_pooler_output.shape == (3, k, config.d_latents)
    assert out.modality_mask.all()
    assert torch.isfinite(out.last_hidden_state).all()
    # the fused view differs from each single-modality view
    for i in range(k):
        assert not torch.allclose(out.modality_pooler_output[:, i], out.pooler_output, atol=1e-3)


def test_padding_tokens_leave_outputs_unchanged(model, batch):
    reference = _outputs(model, batch)
    padded = _outputs(model, _pad(batch))
    for ref, got in zip(reference, padded):
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_all_masked_absent_modality_leaves_outputs_unchanged(model, batch):
    without = {k: v for k, v in batch.items() if k not in ("image_ct", "text")}
    with_absent = dict(without)
    with_absent["image_ct"] = {
        "pixel_values": torch.full_like(batch["image_ct"]["pixel_values"], float("nan")),
        "present": torch.zeros(3, dtype=torch.bool),
    }
    with_absent["text"] = {
        "input_ids": batch["text"]["input_ids"],
        "attention_mask": torch.zeros_like(batch["text"]["attention_mask"]),
    }
    ref, got = _outputs(model, without), _outputs(model, with_absent)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, atol=ATOL, rtol=0)
    # an absent modality also yields no view and is marked absent
    out = model(**with_absent, return_modality_embeddings=True)
    k = model.modality_names.index("image_ct")
    assert not out.modality_mask[:, k].any()
    assert torch.equal(out.modality_pooler_output[:, k], torch.zeros_like(out.modality_pooler_output[:, k]))


def test_modality_absent_for_some_samples(model, batch):
    """A modality missing for one sample only: that sample equals its run without the modality."""
    partial = copy.deepcopy(batch)
    partial["text"]["attention_mask"][1] = 0
    partial["image_cxr"]["present"] = torch.tensor([True, False, True])
    out = model(**partial, return_modality_embeddings=True)
    sample = {k: {kk: vv[1:2] for kk, vv in v.items()} for k, v in batch.items() if k not in ("text", "image_cxr")}
    alone = model(**sample, return_modality_embeddings=True)
    torch.testing.assert_close(out.pooler_output[1:2], alone.pooler_output, atol=ATOL, rtol=0)
    assert out.modality_mask[1].tolist() == alone.modality_mask[0].tolist()


def test_batch_composition_invariance(model, batch):
    full = _outputs(model, batch)
    for i in range(3):
        single = {k: {kk: vv[i : i + 1] for kk, vv in v.items()} for k, v in batch.items()}
        alone = _outputs(model, single)
        for f, a in zip(full, alone):
            torch.testing.assert_close(f[i : i + 1], a, atol=ATOL, rtol=0)
    # and independent of which other samples share the batch
    other = random_batch(model.config, batch_size=3, seed=1)
    mixed = {k: {kk: torch.cat([batch[k][kk][:1], other[k][kk][1:]]) for kk in v} for k, v in batch.items()}
    torch.testing.assert_close(_outputs(model, mixed)[1][:1], full[1][:1], atol=ATOL, rtol=0)


def _subsets(names):
    for r in range(1, len(names) + 1):
        yield from itertools.combinations(names, r)


def test_every_modality_subset_trains_and_gets_gradients(config, batch):
    torch.manual_seed(0)
    model = bp.BioPerceiverModel(config).train()
    for subset in _subsets(config.modality_names):
        model.zero_grad(set_to_none=True)
        out = model(**{k: batch[k] for k in subset}, return_modality_embeddings=True)
        (out.pooler_output.square().mean() + out.modality_pooler_output.square().mean()).backward()
        for pname, param in model.named_parameters():
            used = not pname.startswith("embedders.") or pname.split(".")[1] in subset
            if used:
                assert param.grad is not None, f"{pname} got no gradient with modalities {subset}"
                assert torch.isfinite(param.grad).all(), pname
                assert param.grad.abs().sum() > 0, f"{pname} has an all-zero gradient with {subset}"
            else:
                assert param.grad is None, f"{pname} got a gradient though {subset} does not use it"


def test_sample_without_any_modality_raises_naming_it(model, batch):
    subset = {k: copy.deepcopy(batch[k]) for k in ("text", "omics")}
    subset["text"]["attention_mask"][1] = 0
    subset["omics"]["mask"][1] = False
    with pytest.raises(ValueError, match=r"batch index \[1\]"):
        model(**subset)
    with pytest.raises(ValueError, match="no modality given"):
        model()
    with pytest.raises(ValueError, match="unknown modality"):
        model(dermatology={"pixel_values": torch.zeros(1)})


def test_save_and_automodel_round_trip(tmp_path, model, batch):
    with torch.no_grad():  # move every parameter off its deterministic initial value (LayerNorm ones, zeros, ...)
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "bioperceiver"
    assert isinstance(AutoConfig.from_pretrained(tmp_path), bp.BioPerceiverConfig)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is bp.BioPerceiverModel
    reference_state = model.state_dict()
    assert loaded.state_dict().keys() == reference_state.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, reference_state[key]), key
    for ref, got in zip(_outputs(model, batch), _outputs(loaded, batch)):
        assert torch.equal(ref, got)


def test_attention_weights_path_matches_fused_kernel(model, batch):
    fast = model(**batch)
    slow = model(**batch, output_attentions=True, output_hidden_states=True)
    torch.testing.assert_close(slow.last_hidden_state, fast.last_hidden_state, atol=ATOL, rtol=0)
    (cross,) = slow.cross_attentions
    n_tokens = cross.shape[-1]
    assert slow.token_modality.shape == (n_tokens,)
    torch.testing.assert_close(cross.sum(-1), torch.ones_like(cross.sum(-1)))
    keep = torch.cat([model.embedders[n](batch[n])[1] for n in model.modality_names], 1)  # (B, N)
    assert torch.equal(
        cross.masked_select(~keep[:, None, None, :].expand_as(cross)),
        torch.zeros(int((~keep).sum()) * cross.shape[1] * cross.shape[2]),
    )
    assert len(slow.attentions) == model.config.num_self_attention_layers
    assert len(slow.hidden_states) == model.config.num_blocks


def test_gradient_checkpointing_gives_same_gradients(config, batch):
    torch.manual_seed(0)
    model = bp.BioPerceiverModel(config).train()
    # squared: the latents leave a LayerNorm whose outputs sum to a constant, so .sum() has ~0 gradients
    (model(**batch).pooler_output ** 2).sum().backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert sum(float(g.abs().sum()) for g in reference.values()) > 1.0
    model.zero_grad(set_to_none=True)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in model.encoder.self_layers)
    (model(**batch).pooler_output ** 2).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[n], atol=1e-6, rtol=1e-5)


def test_repeated_blocks_share_weights(batch):
    once = tiny_config(num_blocks=1)
    thrice = tiny_config(num_blocks=3, repeat_cross_attention=True)
    torch.manual_seed(0)
    m1 = bp.BioPerceiverModel(once).eval()
    torch.manual_seed(0)
    m3 = bp.BioPerceiverModel(thrice).eval()
    assert sum(p.numel() for p in m1.parameters()) == sum(p.numel() for p in m3.parameters())
    m3.load_state_dict(m1.state_dict())
    out = m3(**batch, output_attentions=True)
    assert len(out.cross_attentions) == 3 and len(out.attentions) == 3 * thrice.num_self_attention_layers
    assert not torch.allclose(out.pooler_output, m1(**batch).pooler_output)


def test_image_resolution_can_change(model, batch):
    """Fourier positions over normalised coordinates: the same model runs at another resolution."""
    for shape in [(3, 1, 32, 32), (3, 1, 40, 24)]:
        b = dict(batch, image_cxr={"pixel_values": torch.randn(shape)})
        assert torch.isfinite(model(**b).pooler_output).all()
    tokens, keep = model.embedders["image_cxr"]({"pixel_values": torch.randn(2, 1, 40, 24)})
    assert tokens.shape == (2, 5 * 3, model.config.d_input) and keep.all()
    tokens, _ = model.embedders["image_ct"]({"pixel_values": torch.randn(2, 1, 9, 8, 8)})  # 9 -> padded to 12
    assert tokens.shape[1] == 3 * 2 * 2


def test_weight_initialisation(config):
    torch.manual_seed(0)
    model = bp.BioPerceiverModel(tiny_config(d_latents=64, num_self_attention_heads=4))
    std = config.initializer_range
    fc = model.encoder.self_layers[0].mlp.fc1
    assert abs(fc.weight.std().item() - std) < 0.3 * std and fc.weight.abs().max() <= 2 * std + 1e-7
    assert torch.equal(fc.bias, torch.zeros_like(fc.bias))
    assert torch.equal(model.encoder.norm.weight, torch.ones_like(model.encoder.norm.weight))
    assert abs(model.encoder.latents.std().item() - std) < 0.3 * std
    text = model.embedders["text"].word_embeddings
    assert torch.equal(text.weight[text.padding_idx], torch.zeros_like(text.weight[0]))


@pytest.mark.parametrize("name", bp.list_models())
def test_every_preset_builds_and_runs(name):
    # the full preset is built on the meta device (no memory, no initialisation: bioperceiver_large has 356M
    # parameters and took a minute of the suite to initialise); it is trained below at two latent self-attention
    # layers, which keeps every width, head count, vocabulary and code path (the other layers are identical copies)
    with torch.device("meta"):
        full = bp.create_model(name)
    depth = full.config.num_self_attention_layers
    assert len(full.encoder.self_layers) == depth
    per_layer = sum(p.numel() for p in full.encoder.self_layers[0].parameters())
    torch.manual_seed(0)
    model = bp.create_model(name, num_self_attention_layers=min(depth, 2)).eval()
    n_full, n_small = (sum(p.numel() for p in m.parameters()) for m in (full, model))
    assert n_full - n_small == per_layer * (len(full.encoder.self_layers) - len(model.encoder.self_layers))
    config = model.config
    small = {
        "image": {"pixel_values": torch.randn(1, 1, 32, 32)},
        "omics": {"gene_ids": torch.randint(0, 100, (1, 7)), "values": torch.randn(1, 7)},
        "signal": {
            "values": torch.randn(1, 2, 70),
            "channel_ids": torch.tensor([[0, 1]]),
            "sampling_rate": torch.tensor([100.0]),
        },
        "tabular": {"feature_ids": torch.tensor([[0, 1, 2]]), "values": torch.randn(1, 3)},
        "text": {"input_ids": torch.randint(1, 100, (1, 12))},
    }
    assert set(small) == set(config.modality_names)
    model.train()
    out = model(**small, return_modality_embeddings=True)
    assert out.pooler_output.shape == (1, config.d_latents)
    assert out.modality_mask.all() and torch.isfinite(out.modality_pooler_output).all()
    (out.pooler_output.square().mean() + out.modality_pooler_output.square().mean()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad[:5]}"
