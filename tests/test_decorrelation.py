"""``loss.decorrelation``: the redundancy-reduction term against a NumPy reference, its invariances (absent rows,
scale), its bounds, and the pretrainer adding it on the latent views (before the head, subset views included) with
the step unchanged when off."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_batch, tiny_config
from test_subset_views import _trainer  # a multiview pretrainer on a copy of the model, seeded head

import bioperceiver as bp
from bioperceiver.losses import decorrelation_loss
from bioperceiver.training.config import PretrainConfig, RunConfigError


def reference(z: np.ndarray, mask: np.ndarray, min_rows: int = 3, eps: float = 1e-4) -> float:
    """Mean over view columns with >= min_rows rows of the mean squared off-diagonal correlation (eps on variances)."""
    terms = []
    for v in range(z.shape[1]):
        x = z[mask[:, v], v].astype(np.float64)
        if len(x) < min_rows:
            continue
        cov = np.cov(x, rowvar=False)
        sd = np.sqrt(np.diag(cov) + eps)
        corr = cov / np.outer(sd, sd)
        d = corr.shape[0]
        terms.append(float(((corr - np.diag(np.diag(corr))) ** 2).sum() / (d * (d - 1))))
    return float(np.mean(terms)) if terms else 0.0


def test_equals_the_numpy_reference_and_ignores_absent_rows():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20, 3, 5, generator=g) @ torch.randn(5, 5, generator=g)  # correlated dimensions
    mask = torch.rand(20, 3, generator=g) > 0.3
    mask[:, 2] = False
    mask[:2, 2] = True  # a column with 2 rows: left out
    got = decorrelation_loss(z, mask)
    assert float(got) == pytest.approx(reference(z.numpy(), mask.numpy()), rel=1e-5)
    assert float(got) > 0.05
    # absent rows can hold anything (padding, zeros): the value does not move
    noisy = z.clone()
    noisy[~mask] = 1e3 * torch.randn(int((~mask).sum()), 5, generator=g)
    assert float(decorrelation_loss(noisy, mask)) == pytest.approx(float(got), rel=1e-6)
    # scale- and shift-free per dimension (correlations), up to the variance floor eps
    scaled = z * torch.tensor([1.0, 10.0, 0.5, 3.0, 7.0]) + 4.0
    assert float(decorrelation_loss(scaled, mask)) == pytest.approx(float(got), rel=1e-3)


def test_bounds_uncorrelated_zero_identical_one():
    h = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    hadamard = torch.kron(torch.kron(h, h), h)  # 8 x 8, orthogonal columns with zero mean except the first
    z = hadamard[:, 1:][:, None, :]  # 8 rows, 1 view, 7 uncorrelated zero-mean dimensions
    mask = torch.ones(8, 1, dtype=torch.bool)
    assert float(decorrelation_loss(z, mask)) == pytest.approx(0.0, abs=1e-10)
    same = torch.randn(10, 1, 1).expand(10, 1, 4) * torch.tensor([1.0, -2.0, 3.0, 0.5])  # one direction
    assert float(decorrelation_loss(same, torch.ones(10, 1, dtype=torch.bool))) == pytest.approx(1.0, rel=1e-3)


def test_no_column_with_enough_rows_is_a_zero_that_keeps_the_graph():
    z = torch.randn(4, 2, 3, requires_grad=True)
    mask = torch.zeros(4, 2, dtype=torch.bool)
    mask[0, 0] = mask[1, 1] = True
    out = decorrelation_loss(z, mask)
    assert float(out.detach()) == 0.0 and out.requires_grad
    out.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))
    with pytest.raises(ValueError, match="z \\(B, V, D\\)"):
        decorrelation_loss(torch.randn(4, 3), mask)


def test_gradient_descent_decorrelates():
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(64, 1, 6, generator=g) @ torch.randn(6, 6, generator=g)).requires_grad_(True)
    mask = torch.ones(64, 1, dtype=torch.bool)
    opt = torch.optim.SGD([z], lr=100.0)  # the loss is a mean of squared correlations: small gradients
    start = float(decorrelation_loss(z, mask).detach())
    for _ in range(50):
        opt.zero_grad()
        decorrelation_loss(z, mask).backward()
        opt.step()
    assert float(decorrelation_loss(z, mask).detach()) < 0.1 * start


@pytest.fixture
def setup():
    torch.manual_seed(0)
    config = tiny_config()
    model = bp.BioPerceiverModel(config)
    batch = random_batch(config, batch_size=6)
    batch["omics"]["mask"][2] = False  # sample 2 has no expression profile
    return model, batch


def test_pretrainer_adds_the_term_on_the_latent_views_subset_views_included(setup):
    model, batch = setup
    pid = [f"p{i}" for i in range(6)]
    sub = {"subset_views": 2, "subset_modality": "omics"}
    plain, decor = _trainer(model, **sub), _trainer(model, decorrelation=0.7, **sub)
    torch.manual_seed(5)
    a = plain(batch, patient_id=pid)
    torch.manual_seed(5)
    b = decor(batch, patient_id=pid)
    # the latents by hand: each modality's pooled output, the fused one, then the subset views' pooled outputs
    out = decor.model(inputs=batch, return_modality_embeddings=True)
    latents = torch.cat([out.modality_pooler_output, out.pooler_output[:, None]], dim=1)
    mask = torch.cat([out.modality_mask.bool(), out.modality_mask.bool().any(1, keepdim=True)], dim=1)
    torch.manual_seed(5)
    sub = decor._subset_views(batch)
    sub_mask, sub_latents = sub["mask"], sub["latents"]
    # the projected subset views are the head of those latents (where present)
    torch.manual_seed(5)
    sub_views, _ = decor.subset_views_of(batch)
    torch.testing.assert_close(sub_views[sub_mask], decor.projection(sub_latents[sub_mask]))
    expected = decorrelation_loss(torch.cat([latents, sub_latents], 1), torch.cat([mask, sub_mask], 1))
    assert float(expected.detach()) > 0
    torch.testing.assert_close(b["loss_decorrelation"], expected.detach())
    torch.testing.assert_close(b["loss"], a["loss"] + 0.7 * expected, rtol=1e-6, atol=1e-6)
    assert "loss_decorrelation" not in a
    # the term alone trains the backbone and never the head (it is taken before the head)
    expected.backward()
    assert all(p.grad is None for p in decor.projection.parameters())
    gene = decor.model.embedders["omics"].gene_embeddings.weight.grad
    assert gene is not None and gene.abs().sum() > 0


def test_off_is_the_step_as_before_and_settings_are_checked(setup):
    model, batch = setup
    pid = [f"p{i}" for i in range(6)]
    plain, off = _trainer(model), _trainer(model, decorrelation=0.0)
    torch.manual_seed(5)
    a = plain(batch, patient_id=pid)
    torch.manual_seed(5)
    b = off(batch, patient_id=pid)
    assert torch.equal(a["loss"], b["loss"]) and b.keys() == a.keys()
    assert "latents" not in off.embed_views(batch)
    with pytest.raises(ValueError, match="decorrelation"):
        _trainer(model, decorrelation=-1.0)
    with pytest.raises(RunConfigError, match=r"loss\.decorrelation"):
        PretrainConfig.from_dict({"loss": {"decorrelation": -0.5}})
    assert PretrainConfig.from_dict({"loss": {"decorrelation": 1}}).loss.decorrelation == 1
