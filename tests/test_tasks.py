"""Task models: losses equal the reference formulas per problem type, a pretrained backbone loads under the head,
Auto classes round-trip, cached latents equal the full forward, and any modality subset works."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import random_batch, tiny_config
from transformers import AutoModel, AutoModelForSequenceClassification

import bioperceiver as bp
from bioperceiver import AutoModelForSurvival, BioPerceiverForSequenceClassification, BioPerceiverForSurvival
from bioperceiver.losses.survival import cox_ph_loss, discrete_time_nll, discretize


def _model(cls, **overrides):
    torch.manual_seed(0)
    return cls(tiny_config(**overrides)).eval()


@pytest.mark.parametrize("head_type", ["pooled", "query"])
def test_classification_losses_match_reference(head_type):
    batch = random_batch(tiny_config(), batch_size=4)
    cases = [
        ("single_label_classification", 2, torch.tensor([0, 1, 1, 0])),
        ("single_label_classification", 3, torch.tensor([2, 0, 1, 2])),
        ("multi_label_classification", 3, torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]]).float()),
        ("regression", 1, torch.tensor([0.5, -1.0, 2.0, 0.0])),
    ]
    for problem_type, n, labels in cases:
        model = _model(
            BioPerceiverForSequenceClassification,
            num_labels=n,
            problem_type=problem_type,
            head_type=head_type,
            head_hidden_size=16,
        )
        out = model(inputs=batch, labels=labels)
        assert out.logits.shape == (4, n)
        if problem_type == "single_label_classification":
            ref = F.cross_entropy(out.logits, labels)
        elif problem_type == "multi_label_classification":
            ref = F.binary_cross_entropy_with_logits(out.logits, labels)
        else:
            ref = F.mse_loss(out.logits[:, 0], labels)
        torch.testing.assert_close(out.loss, ref)
        out.loss.backward()
        assert all(p.grad is not None for p in model.head.parameters())


def test_problem_type_is_inferred_like_transformers():
    batch = random_batch(tiny_config(), batch_size=2)
    assert _model(BioPerceiverForSequenceClassification, num_labels=1)(inputs=batch, labels=torch.tensor([0.3, 1.0]))
    m = _model(BioPerceiverForSequenceClassification, num_labels=3)
    m(inputs=batch, labels=torch.tensor([0, 2]))
    assert m.config.problem_type == "single_label_classification"
    m = _model(BioPerceiverForSequenceClassification, num_labels=3)
    m(inputs=batch, labels=torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]))
    assert m.config.problem_type == "multi_label_classification"
    with pytest.raises(ValueError, match="out of range"):
        _model(BioPerceiverForSequenceClassification, num_labels=2)(inputs=batch, labels=torch.tensor([0, 5]))


def test_unknown_labels_are_left_out_of_the_loss():
    batch = random_batch(tiny_config(), batch_size=3)
    m = _model(BioPerceiverForSequenceClassification, num_labels=2, problem_type="multi_label_classification")
    labels = torch.tensor([[1.0, -1.0], [0.0, 1.0], [-1.0, -1.0]])
    out = m(inputs=batch, labels=labels)
    keep = labels >= 0
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits[keep], labels[keep]))
    m = _model(BioPerceiverForSequenceClassification, num_labels=1, problem_type="regression")
    out = m(inputs=batch, labels=torch.tensor([1.0, float("nan"), 2.0]))
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits[[0, 2], 0], torch.tensor([1.0, 2.0])))


def test_survival_heads_use_the_survival_losses():
    batch = random_batch(tiny_config(), batch_size=5)
    labels = torch.tensor([[5.0, 1], [3.0, 0], [3.0, 1], [8.0, 1], [1.0, 0]])
    for ties in ("efron", "breslow"):
        m = _model(BioPerceiverForSurvival, survival_ties=ties)
        out = m(inputs=batch, labels=labels)
        assert out.risk.shape == (5,) and out.survival is None
        torch.testing.assert_close(out.loss, cox_ph_loss(out.risk, labels[:, 0], labels[:, 1], ties=ties))
    bins = [2.0, 4.0, 6.0]
    m = _model(BioPerceiverForSurvival, survival_loss="discrete", survival_time_bins=bins, head_type="query")
    out = m(inputs=batch, labels=labels)
    assert out.logits.shape == (5, 4) and out.survival.shape == (5, 4)
    assert (out.survival[:, 1:] <= out.survival[:, :-1] + 1e-7).all()  # S(t) never increases
    ref = discrete_time_nll(out.logits, discretize(labels[:, 0], torch.tensor(bins)), labels[:, 1])
    torch.testing.assert_close(out.loss, ref)
    with pytest.raises(ValueError, match="survival_time_bins"):
        BioPerceiverForSurvival(tiny_config(survival_loss="discrete"))
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        _model(BioPerceiverForSurvival)(inputs=batch, labels=labels[:, 0])


def test_pretrained_backbone_loads_under_a_head_and_auto_classes_round_trip(tmp_path):
    torch.manual_seed(0)
    backbone = bp.BioPerceiverModel(tiny_config())
    backbone.save_pretrained(tmp_path / "backbone")
    clf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "backbone", num_labels=3)
    assert isinstance(clf, BioPerceiverForSequenceClassification)
    for name, p in backbone.state_dict().items():
        torch.testing.assert_close(clf.bioperceiver.state_dict()[name], p, msg=name)
    surv = AutoModelForSurvival.from_pretrained(tmp_path / "backbone")
    assert isinstance(surv, BioPerceiverForSurvival)
    torch.testing.assert_close(surv.bioperceiver.encoder.latents, backbone.encoder.latents)

    batch = random_batch(tiny_config(), batch_size=2)
    for model, auto in ((clf, AutoModelForSequenceClassification), (surv, AutoModelForSurvival)):
        model.eval()
        model.save_pretrained(tmp_path / type(model).__name__)
        again = auto.from_pretrained(tmp_path / type(model).__name__).eval()
        with torch.no_grad():
            torch.testing.assert_close(again(inputs=batch).logits, model(inputs=batch).logits)
        # the finetuned folder still loads as a plain backbone (AutoModel)
        base = AutoModel.from_pretrained(tmp_path / type(model).__name__)
        torch.testing.assert_close(base.encoder.latents, model.bioperceiver.encoder.latents)


def test_cached_latents_equal_the_full_forward_and_any_subset_works():
    m = _model(BioPerceiverForSequenceClassification, num_labels=2)
    batch = random_batch(tiny_config(), batch_size=3)
    with torch.no_grad():
        full = m(inputs=batch)
        latents = m.bioperceiver(inputs=batch).last_hidden_state
        cached = m(latents=latents)
        torch.testing.assert_close(cached.logits, full.logits)
        for name in batch:
            sub = {k: v for k, v in batch.items() if k != name}
            assert torch.isfinite(m(inputs=sub).logits).all()
        one = {name: copy.deepcopy(batch[name]) for name in list(batch)[:1]}
        assert m(inputs=one).modality_mask.sum(1).tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="either"):
        m(inputs=batch, latents=latents)


def test_head_config_is_validated():
    for bad in (
        {"head_type": "mlp"},
        {"head_hidden_size": -1},
        {"survival_ties": "exact"},
        {"survival_time_bins": [3.0, 1.0]},
        {"head_dropout": 1.5},
    ):
        with pytest.raises(ValueError):
            tiny_config(**bad)


def test_finetuning_modes_train_what_they_say():
    from bioperceiver.training import configure_finetuning

    m = configure_finetuning(_model(BioPerceiverForSequenceClassification, num_labels=2), "linear_probe")
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {
        n for n, _ in m.named_parameters() if n.startswith("head.")
    }
    m = configure_finetuning(_model(BioPerceiverForSequenceClassification, num_labels=2), "partial")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    last = len(m.bioperceiver.encoder.self_layers) - 1
    assert any(n.startswith(f"bioperceiver.encoder.self_layers.{last}.") for n in trainable)
    assert not any(n.startswith("bioperceiver.embedders.") or ".cross_layers." in n for n in trainable)
    with pytest.raises(ValueError, match="self-attention layers"):
        configure_finetuning(
            _model(BioPerceiverForSequenceClassification, num_labels=2), "partial", unfreeze_last_n_layers=99
        )


def test_lora_adapters_change_the_output_and_merge_exactly():
    from bioperceiver.training import configure_finetuning, merge_lora

    batch = random_batch(tiny_config(), batch_size=3)
    base = _model(BioPerceiverForSequenceClassification, num_labels=2)
    with torch.no_grad():
        before = base(inputs=batch).logits
    peft_model = configure_finetuning(copy.deepcopy(base), "lora", lora_r=4)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any("head" in n for n in trainable)
    assert not any("lora" in n and (".k_proj." in n or ".v_proj." in n) for n in trainable)
    assert not any("embedders" in n for n in trainable)
    peft_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(inputs=batch).logits, before)  # B = 0 at init: no change
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        adapted = peft_model(inputs=batch).logits
    assert not torch.allclose(adapted, before, atol=1e-4)  # the adapters are on the forward path
    merged = merge_lora(peft_model)
    assert isinstance(merged, BioPerceiverForSequenceClassification)
    with torch.no_grad():
        torch.testing.assert_close(merged(inputs=batch).logits, adapted, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="bypassed"):
        configure_finetuning(copy.deepcopy(base), "lora", lora_target_modules=["k_proj", "q_proj"])
