"""Masked-gene-subset views for pretraining (``loss.subset_views``): shapes and masks, a finite loss whose gradient
reaches the subsampled modality's embedder, determinism, and the default (off) step unchanged."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import random_batch, tiny_config

import bioperceiver as bp
from bioperceiver.training import ContrastivePretrainer
from bioperceiver.training.config import PretrainConfig, RunConfigError


@pytest.fixture
def setup():
    torch.manual_seed(0)
    config = tiny_config()
    model = bp.BioPerceiverModel(config)
    batch = random_batch(config, batch_size=4)
    batch["omics"]["mask"][2] = False  # sample 2 has no expression profile
    return model, batch


def _trainer(model, **kwargs):
    torch.manual_seed(1)  # the projection head
    return ContrastivePretrainer(copy.deepcopy(model), loss="multiview", **kwargs)


def test_subset_masks_keep_a_fraction_of_the_real_tokens(setup):
    model, _ = setup
    trainer = _trainer(model, subset_views=3, subset_modality="omics", subset_fraction=0.3)
    keep = torch.ones(4, 10, dtype=torch.bool)
    keep[1, 4:] = False  # 4 real tokens
    keep[3, 1:] = False  # 1 real token
    masks = trainer.subset_masks(keep)
    assert masks.shape == (3, 4, 10)
    assert not (masks & ~keep).any()  # only real tokens are kept
    assert masks.sum(-1).tolist() == [[3, 2, 3, 1]] * 3  # ceil(0.3 x n), at least one
    assert not torch.equal(masks[0], masks[1])  # independent draws


def test_subset_views_shape_mask_loss_and_gradients(setup):
    model, batch = setup
    trainer = _trainer(model, subset_views=2, subset_modality="omics", subset_fraction=0.5)
    torch.manual_seed(3)
    emb = trainer.embed_views(batch)
    v = len(trainer.view_names)
    assert emb["views"].shape == (4, v + 2, model.config.projection_dim)
    assert emb["mask"][:, v:].tolist() == [[True, True], [True, True], [False, False], [True, True]]
    assert torch.equal(emb["views"][2, v:], torch.zeros(2, model.config.projection_dim))
    # a subset view differs from the full-profile omics view
    k = model.config.modality_names.index("omics")
    assert not torch.allclose(emb["views"][0, v], emb["views"][0, k])
    out = trainer.loss_from(emb, None)
    assert math.isfinite(float(out["loss"].detach()))
    assert int(out["num_views"]) == int(emb["mask"].sum())
    out["loss"].backward()
    gene = trainer.model.embedders["omics"].gene_embeddings.weight.grad
    assert gene is not None and gene.abs().sum() > 0
    assert all(p.grad is not None for p in trainer.projection.parameters())
    # deterministic given the seed
    again = _trainer(model, subset_views=2, subset_modality="omics", subset_fraction=0.5)
    torch.manual_seed(3)
    torch.testing.assert_close(again.embed_views(batch)["views"], emb["views"], rtol=0, atol=0)


def test_text_subset_views_keep_a_share_of_each_report_s_words(setup):
    """Report <-> report views (``subset_modality`` a text column): the text kind's keep-mask is ``attention_mask``;
    each view keeps ceil(fraction x real tokens) of a report, only real ones, and the gradient reaches the text
    embedder through the subset views alone."""
    model, batch = setup
    text = next(n for n, m in model.config.modalities.items() if m["kind"] == "text")
    batch[text]["attention_mask"][1] = 0  # sample 1 has no report
    batch[text]["attention_mask"][3, 3:] = 0  # a 3-token report
    trainer = _trainer(model, subset_views=2, subset_modality=text, subset_fraction=0.5)
    seen = []
    hook = trainer.model.embedders[text].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[0] if args else kwargs["inputs"])["attention_mask"].clone()),
        with_kwargs=True,
    )
    torch.manual_seed(3)
    views, mask = trainer.subset_views_of(batch)
    hook.remove()
    sub = seen[-1].bool()  # (K x rows having a report, T): the subset views' call
    real = batch[text]["attention_mask"].bool()
    rows = [0, 2, 3]
    assert sub.shape == (2 * len(rows), real.shape[1])
    for j, r in enumerate(rows * 2):
        assert not (sub[j] & ~real[r]).any()
        assert int(sub[j].sum()) == math.ceil(0.5 * int(real[r].sum()))
    assert mask.tolist() == [[True, True], [False, False], [True, True], [True, True]]
    assert torch.equal(views[1], torch.zeros_like(views[1]))
    views.sum().backward()
    grads = [p.grad for p in trainer.model.embedders[text].parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


def test_subset_views_off_is_the_step_as_before(setup):
    model, batch = setup
    plain, off = _trainer(model), _trainer(model, subset_views=0, subset_modality="omics")
    torch.manual_seed(5)
    a = plain(batch, patient_id=["p0", "p1", "p2", "p3"])
    torch.manual_seed(5)
    b = off(batch, patient_id=["p0", "p1", "p2", "p3"])
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["num_views"], b["num_views"])


def test_subset_views_settings_are_checked(setup):
    model, _ = setup
    with pytest.raises(ValueError, match="multiview"):
        ContrastivePretrainer(model, loss="clip", subset_views=1, subset_modality="omics")
    with pytest.raises(ValueError, match="subset_modality"):
        _trainer(model, subset_views=1, subset_modality="rna")
    image = next(n for n, m in model.config.modalities.items() if m["kind"] == "image")
    with pytest.raises(ValueError, match="per-token keep-mask 'present'"):
        _trainer(model, subset_views=1, subset_modality=image).subset_views_of(random_batch(model.config))
    with pytest.raises(RunConfigError, match="multiview"):
        PretrainConfig.from_dict(
            {"loss": {"name": "clip", "subset_views": 2, "subset_modality": "omics"}}
        ).loss.check_run()
    with pytest.raises(RunConfigError, match="subset_fraction"):
        PretrainConfig.from_dict(
            {"loss": {"name": "multiview", "subset_views": 2, "subset_modality": "x", "subset_fraction": 1.5}}
        )
    cfg = PretrainConfig.from_dict({"loss": {"name": "multiview", "subset_views": 2, "subset_modality": "omics"}})
    assert cfg.loss.subset_kwargs() == {"subset_views": 2, "subset_modality": "omics", "subset_fraction": 0.5}
    assert PretrainConfig.from_dict({}).loss.subset_kwargs() == {}
