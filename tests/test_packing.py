"""Padding-free (packed) encoder passes equal the padded ones: forward and every gradient, on random mixed batches
(any subset of modalities per sample, modalities absent from the whole batch, one sample), for the model alone and
for the contrastive pretrainer with per-modality and leave-one-out views; the segment attention equals a dense
masked reference; the token-budget chunker; ``torch.compile`` of the backbone equals eager."""

from __future__ import annotations

import pytest
import torch
from conftest import random_batch, tiny_config

import bioperceiver as bp
from bioperceiver.data.sampler import token_budget_chunks
from bioperceiver.layers import PackedTokens, packed_attend
from bioperceiver.training.pretraining import ContrastivePretrainer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes: one thread avoids OpenMP spin-waits on a shared machine (several-fold faster here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# the keep-mask key of each built-in kind and its shape in a batch (test data only)
ABSENCE = {
    "text": ("attention_mask", lambda a: a["input_ids"].shape),
    "image": ("present", lambda a: a["pixel_values"].shape[:1]),
    "omics": ("mask", lambda a: a["gene_ids"].shape),
    "signal": ("channel_mask", lambda a: a["channel_ids"].shape),
    "tabular": ("mask", lambda a: a["feature_ids"].shape),
}


def mixed_batch(config, b: int, seed: int, p_absent: float = 0.5, drop_whole: tuple[str, ...] = ()) -> dict:
    """``random_batch`` with each modality absent from each sample with probability ``p_absent`` (every sample keeps
    at least one) and the modalities of ``drop_whole`` left out of the batch."""
    batch = random_batch(config, batch_size=b, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    names = [n for n in sorted(batch) if n not in drop_whole]
    absent = torch.rand(b, len(names), generator=g) < p_absent
    absent[torch.arange(b), torch.randint(0, len(names), (b,), generator=g)] = False  # one modality stays
    out = {}
    for j, name in enumerate(names):
        arrays = dict(batch[name])
        key, shape = ABSENCE[config.modalities[name]["kind"]]
        mask = arrays.get(key, torch.ones(shape(arrays), dtype=torch.bool)).bool().clone()
        mask[absent[:, j]] = False
        arrays[key] = mask
        out[name] = arrays
    return out


def grads(module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}


def assert_same(a: dict, b: dict, what: str, rtol=1e-4, atol=1e-5):
    assert a.keys() == b.keys(), f"{what}: {sorted(set(a) ^ set(b))}"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=f"{what}: {k}")


def test_packed_attention_equals_dense_masked_reference():
    g = torch.Generator().manual_seed(0)
    lengths = [3, 1, 7, 4]
    h, m, dh = 2, 5, 4
    t = sum(lengths)
    q = torch.randn(len(lengths), h, m, dh, generator=g)
    k, v = torch.randn(t, h, dh, generator=g), torch.randn(t, h, dh, generator=g)
    out = packed_attend(q, k, v, PackedTokens.from_segments(k.flatten(1), None, lengths), 0.0)
    start = 0
    for i, n in enumerate(lengths):
        scores = torch.einsum("hmd,nhd->hmn", q[i], k[start : start + n]) * dh**-0.5
        ref = torch.einsum("hmn,nhd->hmd", scores.softmax(-1), v[start : start + n])
        torch.testing.assert_close(out[i], ref, rtol=1e-5, atol=1e-6)
        start += n
    with pytest.raises(ValueError, match="at least one token"):
        PackedTokens.from_segments(k.flatten(1), None, [t, 0])


@pytest.mark.parametrize(
    ("b", "seed", "drop_whole"),
    [(5, 0, ()), (4, 1, ("image_ct", "signal")), (1, 2, ()), (6, 3, ("text", "omics", "tabular"))],
)
def test_packed_model_equals_padded_forward_and_backward(b, seed, drop_whole):
    config = tiny_config(num_cross_attention_layers=2, repeat_cross_attention=True, num_blocks=2)
    torch.manual_seed(seed)
    model = bp.BioPerceiverModel(config).train()  # dropout 0 in the tiny config: train mode is deterministic
    batch = mixed_batch(config, b, seed, drop_whole=drop_whole)
    kw = dict(return_modality_embeddings=True, return_leave_one_out=True, output_hidden_states=True)
    results = {}
    for packed in (False, True):
        model.zero_grad()
        out = model.set_packed(packed)(inputs=batch, **kw)
        loss = (
            out.last_hidden_state.square().mean()
            + out.modality_pooler_output.sin().sum()
            + out.leave_one_out_pooler_output.cos().sum()
            + sum(h.mean() for h in out.hidden_states)
        )
        loss.backward()
        results[packed] = (out, grads(model))
    (pad, g_pad), (pack, g_pack) = results[False], results[True]
    assert torch.equal(pad.modality_mask, pack.modality_mask)
    assert torch.equal(pad.leave_one_out_mask, pack.leave_one_out_mask)
    for key in ("last_hidden_state", "pooler_output", "modality_pooler_output", "leave_one_out_pooler_output"):
        torch.testing.assert_close(getattr(pack, key), getattr(pad, key), rtol=1e-4, atol=1e-5, msg=key)
    for h_pack, h_pad in zip(pack.hidden_states, pad.hidden_states, strict=True):
        torch.testing.assert_close(h_pack, h_pad, rtol=1e-4, atol=1e-5)
    assert_same(g_pad, g_pack, "gradient")
    assert g_pack, "no gradient reached the parameters"


def test_packed_pretrainer_step_equals_padded_and_default_is_padded():
    config = tiny_config()
    torch.manual_seed(0)
    trainer = ContrastivePretrainer(bp.BioPerceiverModel(config), loss="clip", leave_one_out=0.5)
    assert trainer.model.packed is False  # default: the padded path, unchanged
    batch = mixed_batch(config, 7, seed=4)
    pid = [f"p{i % 5}" for i in range(7)]
    losses, gs = {}, {}
    for packed in (False, True):
        trainer.zero_grad()
        trainer.model.set_packed(packed)
        out = trainer(batch, pid)
        out["loss"].backward()
        losses[packed], gs[packed] = out["loss"].detach(), grads(trainer)
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-6)
    assert_same(gs[False], gs[True], "pretrainer gradient")


def test_attention_probabilities_fall_back_to_the_padded_path():
    config = tiny_config()
    torch.manual_seed(0)
    model = bp.BioPerceiverModel(config).eval()
    batch = mixed_batch(config, 3, seed=5)
    ref = model.set_packed(False)(inputs=batch, output_attentions=True)
    out = model.set_packed(True)(inputs=batch, output_attentions=True)
    assert out.cross_attentions and torch.equal(out.cross_attentions[0], ref.cross_attentions[0])


def test_token_budget_chunks_fill_the_budget_and_cover_every_sample_once():
    counts = [50, 7, 300, 120, 1, 60, 60, 90]
    chunks = token_budget_chunks(counts, max_tokens=200)
    assert sorted(i for c in chunks for i in c) == list(range(len(counts)))  # every row exactly once
    for c in chunks:
        assert sum(counts[i] for i in c) <= 200 or len(c) == 1  # an oversized sample alone
    assert [2] in chunks  # the 300-token row alone
    assert len(chunks) == 3  # first-fit decreasing: {300} alone, {120, 60, 7, 1}, {90, 60, 50}
    assert chunks == token_budget_chunks(counts, max_tokens=200)  # deterministic
    assert token_budget_chunks(counts, max_tokens=10_000) == [list(range(len(counts)))]
    with pytest.raises(ValueError, match="max_tokens"):
        token_budget_chunks(counts, max_tokens=0)


@pytest.mark.slow
def test_packed_token_budget_run_resumes_bit_identically_and_trains_like_the_padded_run(tmp_path, monkeypatch):
    """Through ``run_pretraining``: a run with ``train.packed`` and a token budget (several micro-batches per step)
    killed right after a checkpoint and resumed ends with exactly the parameters of the uninterrupted run, and
    those parameters equal the default (padded, one forward) run's to float tolerance."""
    from conftest import synthetic_run_config
    from safetensors.torch import load_file

    from bioperceiver.training import load_run_config, loop

    path = synthetic_run_config(
        tmp_path, max_steps=4, warmup_steps=1, batch_size=8, save_steps=2, keep_last=2, eval={"n_bootstrap": 0}
    )
    budget = ["train.packed=true", "train.max_tokens_per_batch=120"]
    chunk_counts = []
    real_chunks = loop.token_budget_chunks
    monkeypatch.setattr(
        loop, "token_budget_chunks", lambda n, m: chunk_counts.append(len(real_chunks(n, m))) or real_chunks(n, m)
    )

    def run(name, *extra, **kwargs):
        cfg = load_run_config(path, [f"output_dir={tmp_path / name}", *extra])
        return run_pretraining_quietly(loop, cfg, **kwargs)

    run("full", *budget)
    assert chunk_counts and min(chunk_counts) > 1  # the budget really split the batches

    class Killed(Exception):
        pass

    def kill(pid, sig):
        raise Killed

    monkeypatch.setattr(loop.os, "kill", kill)
    with pytest.raises(Killed):
        run("crash", *budget, crash_after_step=2)
    monkeypatch.undo()
    run("crash", *budget, resume="latest")
    run("padded")
    ckpt = "checkpoints/checkpoint-4/model.safetensors"
    a, b, pad = (load_file(tmp_path / n / ckpt) for n in ("full", "crash", "padded"))
    assert a.keys() == b.keys() == pad.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # exact resume
        torch.testing.assert_close(a[k], pad[k], rtol=1e-3, atol=1e-4, msg=k)  # same training as the default


def run_pretraining_quietly(loop, cfg, **kwargs):
    import logging

    logging.getLogger("bioperceiver").setLevel(logging.WARNING)
    return loop.run_pretraining(cfg, **kwargs)


@pytest.mark.slow
def test_compiled_backbone_equals_eager():
    """``train.compile`` (:func:`compile_backbone`) gives the eager outputs and gradients. Traced with the
    ``aot_eager`` backend (dynamo graph capture + AOTAutograd, where compiled and eager can disagree: graph breaks, the
    custom autograd function of the key/value projection, dynamic shapes); the flag's default ``inductor`` backend adds
    C++ code generation, measured at ~7 minutes for this tiny encoder on the shared 2-core CPU, too slow for a test.
    The padded path (the whole encoder compiled); the packed path compiles the same self-attention layers only, and
    a second batch shape doubles the tracing time (both were checked once, see benchmarks/RESULTS.md)."""
    pytest.importorskip("torch._dynamo")
    from bioperceiver.training.loop import compile_backbone

    config = tiny_config(num_self_attention_layers=1)
    torch.manual_seed(0)
    model = bp.BioPerceiverModel(config).train()
    results = []
    for step in range(2):
        if step:
            compile_backbone(model, backend="aot_eager")
        per_batch = []
        for b, seed in ((3, 0),):
            model.zero_grad()
            out = model(inputs=mixed_batch(config, b, seed), return_modality_embeddings=True)
            (out.last_hidden_state.square().mean() + out.modality_pooler_output.sum()).backward()
            per_batch.append((out.last_hidden_state.detach(), grads(model)))
        results.append(per_batch)
    for (h_eager, g_eager), (h_comp, g_comp) in zip(*results, strict=True):
        torch.testing.assert_close(h_comp, h_eager, rtol=1e-5, atol=1e-6)
        assert_same(g_eager, g_comp, "compiled gradient")
