"""Leave-one-out pretraining term: the model's "fused view of the other modalities" equals running the model
without the held-out modality, and the trainer's term equals a direct computation with the pair loss."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_batch, tiny_config

import bioperceiver as bp
from bioperceiver.losses import ClipLoss
from bioperceiver.training import ContrastivePretrainer

ATOL = 1e-5


@pytest.fixture
def setup():
    torch.manual_seed(0)
    config = tiny_config()
    model = bp.BioPerceiverModel(config).eval()
    batch = random_batch(config, batch_size=4)
    # sample 1 has the text note only (nothing to hold out against), sample 2 lacks the chest X-ray
    for name, arrays in batch.items():
        if name == "text":
            continue
        if "pixel_values" in arrays:
            arrays["present"] = torch.tensor([True, False, False, True])
        for key in ("attention_mask", "mask", "time_mask"):
            if key in arrays:
                arrays[key][1] = 0
        if "feature_ids" in arrays:
            arrays["mask"] = torch.ones_like(arrays["feature_ids"], dtype=torch.bool)
            arrays["mask"][1] = False
    return model, batch


def test_leave_one_out_view_equals_model_without_that_modality(setup):
    model, batch = setup
    with torch.no_grad():
        out = model(inputs=batch, return_leave_one_out=True)
    names = model.modality_names
    assert out.leave_one_out_pooler_output.shape == (4, len(names), model.config.d_latents)
    for k, name in enumerate(names):
        expected_rows = out.modality_mask[:, k] & (out.modality_mask.sum(1) > 1)
        assert out.leave_one_out_mask[:, k].tolist() == expected_rows.tolist()
        others = {n: v for n, v in batch.items() if n != name}
        rows = expected_rows.nonzero().flatten()
        if rows.numel() == 0:
            continue
        sub = {n: {key: val[rows] for key, val in arrays.items()} for n, arrays in others.items()}
        with torch.no_grad():
            ref = model(inputs=sub).pooler_output
        torch.testing.assert_close(out.leave_one_out_pooler_output[rows, k], ref, atol=ATOL, rtol=0)
        # samples that lack k or have nothing else: zeros, never a crash
        off = (~expected_rows).nonzero().flatten()
        assert torch.equal(
            out.leave_one_out_pooler_output[off, k], torch.zeros_like(out.leave_one_out_pooler_output[off, k])
        )
    # the text-only sample has no leave-one-out row at all
    assert not out.leave_one_out_mask[1].any()


def test_trainer_leave_one_out_term_matches_direct_computation(setup):
    model, batch = setup
    torch.manual_seed(1)
    trainer = ContrastivePretrainer(copy.deepcopy(model), loss="clip", leave_one_out=0.5)
    base = ContrastivePretrainer(copy.deepcopy(model), loss="clip")
    base.load_state_dict({k: v for k, v in trainer.state_dict().items() if not k.startswith("loo_loss_fn")})
    pid = ["p0", "p1", "p2", "p3"]
    got = trainer(inputs=batch, patient_id=pid)
    plain = base(inputs=batch, patient_id=pid)

    # direct: held-out view vs projected model(other modalities), ClipLoss per modality, mean over modalities
    ref_loss = ClipLoss()
    ref_loss.load_state_dict(trainer.loo_loss_fn.state_dict())
    views, mask = base.views(batch)
    terms = []
    for k, name in enumerate(model.modality_names):
        rows = (mask[:, k] & (mask[:, : len(model.modality_names)].sum(1) > 1)).nonzero().flatten()
        if rows.numel() == 0:
            continue
        sub = {n: {key: val[rows] for key, val in a.items()} for n, a in batch.items() if n != name}
        rest = base.projection(base.model(inputs=sub).pooler_output)
        pair = torch.stack([views[rows, k], rest], dim=1)
        terms.append(ref_loss(pair, torch.ones(len(rows), 2, dtype=torch.bool), torch.arange(len(rows)))["loss"])
    assert len(terms) >= 2, "the fixture must give several modalities with leave-one-out rows"
    ref = torch.stack(terms).mean()
    torch.testing.assert_close(got["loss_loo"], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["loss"], plain["loss"] + 0.5 * ref, atol=1e-5, rtol=1e-5)
    got["loss"].backward()
    assert trainer.loo_loss_fn.temperature.logit_scale.grad is not None
    assert all(torch.isfinite(p.grad).all() for p in trainer.parameters() if p.grad is not None)


@pytest.mark.parametrize("loss", ["siglip", "multiview"])
def test_leave_one_out_works_with_every_loss(setup, loss):
    model, batch = setup
    trainer = ContrastivePretrainer(model, loss=loss, leave_one_out=1.0)
    out = trainer(inputs=batch, patient_id=["a", "b", "c", "d"])
    assert torch.isfinite(out["loss"]) and float(out["loss_loo"].detach()) > 0
    out["loss"].backward()


def test_leave_one_out_on_batch_without_any_pair_is_a_zero_that_keeps_the_graph(setup):
    model, batch = setup
    trainer = ContrastivePretrainer(model, loss="clip", leave_one_out=1.0)
    text_only = {"text": {k: v[:2] for k, v in batch["text"].items()}}
    out = trainer(inputs=text_only)
    assert float(out["loss_loo"]) == 0.0
    out["loss"].backward()
    assert trainer.loo_loss_fn.temperature.logit_scale.grad is not None


def test_negative_weight_is_refused(setup):
    with pytest.raises(ValueError, match="leave_one_out"):
        ContrastivePretrainer(setup[0], leave_one_out=-1)
