"""Gradient caching gives the gradients of the un-chunked contrastive step: the pretrainer on one process (clip with
leave-one-out, siglip, multiview; padded and packed encoder passes; any chunking), dropout replayed chunk by chunk,
and two gloo processes with the all-gather local loss equal to one process over the global batch."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port, tiny_config
from test_packing import mixed_batch

import bioperceiver as bp
from bioperceiver.data.sampler import token_budget_chunks
from bioperceiver.losses import ClipLoss, MultiViewLoss, SigLipLoss, grad_cache_step
from bioperceiver.training.pretraining import ContrastivePretrainer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes: one thread avoids OpenMP spin-waits on a shared machine (several-fold faster here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def grads(module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    ("loss", "packed", "chunks", "extra"),
    [
        ("clip", False, [[0, 3], [1, 2, 6], [4, 5]], {"leave_one_out": 0.5}),
        ("siglip", True, [[6], [0, 1, 2, 3, 4, 5]], {}),
        ("multiview", True, [[5, 1], [0], [6, 2, 4, 3]], {}),
        # the decorrelation term is a batch statistic of the latents: it must see the whole batch, not each chunk
        ("multiview", False, [[2, 6], [0, 1, 3], [5, 4]], {"decorrelation": 2.0}),
    ],
)
def test_grad_cached_pretrainer_step_equals_the_unchunked_step(loss, packed, chunks, extra):
    config = tiny_config()
    torch.manual_seed(0)
    trainer = ContrastivePretrainer(bp.BioPerceiverModel(config).set_packed(packed), loss=loss, **extra)
    batch = mixed_batch(config, 7, seed=6)
    pid = [f"p{i % 5}" for i in range(7)]  # samples 0/5 and 1/6: one patient each
    ref = trainer(batch, pid)
    ref["loss"].backward()
    ref_grads = grads(trainer)
    trainer.zero_grad()
    seen = []
    out = trainer.grad_cached_step(batch, pid, chunks, before_backward=lambda o: seen.append(float(o["loss"].detach())))
    assert seen == [pytest.approx(float(ref["loss"]), rel=1e-6)]  # checked before any backward
    torch.testing.assert_close(out["loss"], ref["loss"].detach(), rtol=1e-6, atol=1e-7)
    assert not out["loss"].requires_grad
    got = grads(trainer)
    assert got.keys() == ref_grads.keys() and any("loss_fn" in k for k in got)  # the temperature too
    for k in ref_grads:
        torch.testing.assert_close(got[k], ref_grads[k], rtol=1e-4, atol=1e-5, msg=k)


def test_dropout_is_replayed_chunk_by_chunk():
    """With dropout the graph pass must see the masks of the graph-free pass: the cached gradients then equal
    those of embedding the same chunks with a graph straight away (same seed)."""
    config = tiny_config(hidden_dropout=0.3, attention_dropout=0.2)
    torch.manual_seed(0)
    trainer = ContrastivePretrainer(bp.BioPerceiverModel(config), loss="clip").train()
    batch = mixed_batch(config, 6, seed=7)
    chunks = [[0, 1, 2], [3, 4, 5]]
    from bioperceiver.data.collator import select_rows

    torch.manual_seed(123)
    kinds = {name: c["kind"] for name, c in config.modalities.items()}  # chunks cut to their own longest row
    parts = [trainer.embed_views(select_rows(batch, rows, kinds)) for rows in chunks]
    emb = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    trainer.loss_from(emb, None)["loss"].backward()
    ref = grads(trainer)
    trainer.zero_grad()
    torch.manual_seed(123)
    trainer.grad_cached_step(batch, None, chunks)
    got = grads(trainer)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)
    with pytest.raises(ValueError, match="exactly once"):
        trainer.grad_cached_step(batch, None, [[0, 1], [1, 2, 3, 4, 5]])


def test_token_budget_chunks_drive_the_cached_step():
    counts = [40, 5, 33, 12, 70]
    chunks = token_budget_chunks(counts, max_tokens=75)
    assert len(chunks) == 3 and all(sum(counts[i] for i in c) <= 75 for c in chunks)


# ---- two processes ------------------------------------------------------------------------------------------------
LOSSES = {"clip": ClipLoss, "siglip": SigLipLoss, "multiview": MultiViewLoss}


class Net(torch.nn.Module):
    def __init__(self, loss_fn):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3 * 8))
        self.loss_fn = loss_fn

    def embed(self, part):
        x, mask = part
        return {"views": self.net(x).view(x.shape[0], 3, 8), "mask": mask}


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 6, generator=g)
    mask = torch.rand(10, 3, generator=g) > 0.35
    mask[:, 0] |= ~mask.any(1)
    pid = torch.tensor([0, 1, 1, 2, 3, 4, 5, 5, 6, 7])  # a patient spanning both ranks' shards (rows 1, 2)
    return x, mask, pid


def _cached(model, x, mask, pid, chunks):
    parts = [(x[c], mask[c]) for c in chunks]
    return grad_cache_step(model.embed, parts, chunks, lambda e: model.loss_fn(e["views"], e["mask"], pid))


def _worker(rank, world, port, name, shards, queue):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, mask, pid = _data()
        lo, hi = shards[rank]
        model = Net(LOSSES[name]())
        n = hi - lo
        chunks = [list(range(0, n, 2)), list(range(1, n, 2))]  # interleaved rows: order is restored for the loss
        out = _cached(model, x[lo:hi], mask[lo:hi], pid[lo:hi], chunks)
        for p in model.parameters():  # what the training loop does after its no_sync backwards: average once
            dist.all_reduce(p.grad)
            p.grad /= world
        total = out["loss"].clone()
        dist.all_reduce(total)
        if rank == 0:
            queue.put((float(total) / world, {k: p.grad.numpy().copy() for k, p in model.named_parameters()}))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["clip"])
def test_two_processes_with_grad_cache_equal_one_unchunked_process(name):
    x, mask, pid = _data()
    single = Net(LOSSES[name]())
    emb = single.embed((x, mask))
    loss = single.loss_fn(emb["views"], emb["mask"], pid)["loss"]
    loss.backward()
    one_proc = Net(LOSSES[name]())  # one process, chunked: the same gradients
    _cached(one_proc, x, mask, pid, [[9, 0, 4], [1, 2, 3], [5, 6, 7, 8]])
    for (k, p), q in zip(single.named_parameters(), one_proc.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=f"1 process: {k}")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    shards = [(0, 4), (4, 10)]  # unequal local batches
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, name, shards, queue)) for r in range(2)]
    for p in procs:
        p.start()
    dist_loss, got = queue.get(timeout=180)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert math.isclose(dist_loss, loss.item(), rel_tol=1e-5, abs_tol=1e-6)
    for k, p in single.named_parameters():
        torch.testing.assert_close(torch.from_numpy(got[k]), p.grad, rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")


def test_micro_batches_are_cut_to_their_own_longest_row():
    """``select_rows`` with kinds: a micro-batch's padded arrays have the width of its own longest row (the
    real tokens unchanged), so gradient caching does not carry the whole batch's padding into every chunk."""
    from bioperceiver.data.collator import select_rows

    config = tiny_config()
    batch = mixed_batch(config, 6, seed=3)
    text = next(n for n, c in config.modalities.items() if c["kind"] == "text")
    mask = batch[text]["attention_mask"].bool()
    mask[:3, 2:] = False  # rows 0-2: at most 2 tokens
    batch[text]["attention_mask"] = mask
    kinds = {name: c["kind"] for name, c in config.modalities.items()}
    cut = select_rows(batch, [0, 1, 2], kinds)
    full = select_rows(batch, [0, 1, 2])
    assert cut[text]["input_ids"].shape[1] <= 2 < full[text]["input_ids"].shape[1]
    assert torch.equal(cut[text]["input_ids"][cut[text]["attention_mask"].bool()],
                       full[text]["input_ids"][full[text]["attention_mask"].bool()])  # fmt: skip
    for name in kinds:
        if kinds[name] in ("image", "signal") and name in cut:  # kinds with their own collate are not cut
            assert all(torch.equal(cut[name][k], full[name][k]) for k in full[name])
