"""Contrastive losses against plain loop references (masked pairs, same-patient negatives, temperature
gradients), and two gloo processes reproducing the single-process loss and every gradient."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import free_port

from bioperceiver.losses import ClipLoss, MultiViewLoss, SigLipLoss, patient_index


def case(seed=0, b=7, k=3, d=5):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(b, k, d, generator=g)
    mask = torch.rand(b, k, generator=g) > 0.3
    mask[0] = torch.tensor([True, False, False][:k] + [False] * (k - 3))  # a sample with one view only
    mask[1, :2] = True
    pid = torch.tensor([0, 1, 1, 2, 3, 4, 5][:b])  # samples 1 and 2: the same patient
    return emb, mask, pid


def ref_clip(emb, mask, pid, scale):
    z = F.normalize(emb, dim=-1)
    b, k, _ = z.shape
    pairs = []
    for a in range(k):
        for c in range(a + 1, k):
            rows = [i for i in range(b) if mask[i, a] and mask[i, c]]
            if not rows:
                continue
            pair = 0.0
            for x, y in ((a, c), (c, a)):
                terms = []
                for i in rows:
                    cols = [j for j in range(b) if mask[j, y] and (j == i or pid[j] != pid[i])]
                    logits = torch.stack([scale * z[i, x] @ z[j, y] for j in cols])
                    terms.append(-torch.log_softmax(logits, 0)[cols.index(i)])
                pair = pair + 0.5 * torch.stack(terms).mean()
            pairs.append(pair)
    return torch.stack(pairs).mean()


def ref_siglip(emb, mask, pid, scale, bias):
    z = F.normalize(emb, dim=-1)
    b, k, _ = z.shape
    pairs = []
    for a in range(k):
        for c in range(a + 1, k):
            rows = [i for i in range(b) if mask[i, a] and mask[i, c]]
            if not rows:
                continue
            pair = 0.0
            for x, y in ((a, c), (c, a)):
                total = 0.0
                for i in rows:
                    for j in range(b):
                        if mask[j, y] and (j == i or pid[j] != pid[i]):
                            label = 1.0 if i == j else -1.0
                            total = total - F.logsigmoid(label * (scale * z[i, x] @ z[j, y] + bias))
                pair = pair + 0.5 * total / len(rows)
            pairs.append(pair)
    return torch.stack(pairs).mean()


def ref_multiview(emb, mask, pid, scale):
    z = F.normalize(emb, dim=-1)
    b, v, _ = z.shape
    views = [(i, s) for i in range(b) for s in range(v) if mask[i, s]]
    losses = []
    for i, s in views:
        others = [(j, t) for j, t in views if (j, t) != (i, s)]
        pos = [n for n, (j, _) in enumerate(others) if pid[j] == pid[i]]
        if not pos:
            continue
        logits = torch.stack([scale * z[i, s] @ z[j, t] for j, t in others])
        lp = torch.log_softmax(logits, 0)
        losses.append(-lp[pos].mean())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_losses_match_loop_references_and_temperature_gradients(seed):
    emb, mask, pid = case(seed)
    for loss_fn, ref in (
        (ClipLoss(init_temperature=0.2), lambda e, s, bias: ref_clip(e, mask, pid, s)),
        (SigLipLoss(init_temperature=0.3, init_bias=-2.0), lambda e, s, bias: ref_siglip(e, mask, pid, s, bias)),
        (MultiViewLoss(init_temperature=0.2), lambda e, s, bias: ref_multiview(e, mask, pid, s)),
    ):
        e1 = emb.clone().requires_grad_(True)
        out = loss_fn(e1, mask, pid)
        out["loss"].backward()
        e2 = emb.clone().requires_grad_(True)
        log_scale = loss_fn.temperature.logit_scale.detach().clone().requires_grad_(True)
        bias = getattr(loss_fn, "bias", torch.tensor(0.0)).detach().clone().requires_grad_(True)
        expected = ref(e2, log_scale.exp(), bias)
        expected.backward()
        torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(e1.grad, e2.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(loss_fn.temperature.logit_scale.grad, log_scale.grad, rtol=1e-4, atol=1e-6)
        if isinstance(loss_fn, SigLipLoss):
            torch.testing.assert_close(loss_fn.bias.grad, bias.grad, rtol=1e-4, atol=1e-6)
        assert e1.grad[~mask].abs().max() == 0  # absent views get no gradient: masked, not zero-filled


def test_absent_views_never_matter_and_temperature_is_clamped():
    emb, mask, pid = case(3)
    changed = emb.clone()
    changed[~mask] = 1e3 * torch.randn_like(changed[~mask])  # garbage where a view is absent
    for loss_fn in (ClipLoss(), SigLipLoss(), MultiViewLoss()):
        torch.testing.assert_close(loss_fn(emb, mask, pid)["loss"], loss_fn(changed, mask, pid)["loss"])
    clip = ClipLoss(max_scale=100.0)
    with torch.no_grad():
        clip.temperature.logit_scale.fill_(10.0)
    assert clip(emb, mask, pid)["temperature"] == pytest.approx(0.01)
    single = torch.zeros(4, 3, dtype=torch.bool)
    single[:, 0] = True  # nobody has two views: zero loss that still reaches the graph
    e = emb[:4].clone().requires_grad_(True)
    out = ClipLoss()(e, single)
    out["loss"].backward()
    assert out["loss"] == 0 and out["num_pairs"] == 0 and e.grad is not None


def test_multiview_handles_augmented_views_of_unpaired_samples():
    torch.manual_seed(0)
    base = torch.randn(5, 1, 8)
    views = torch.cat([base, base + 0.01 * torch.randn_like(base)], dim=1)  # two augmentations, one modality
    good = MultiViewLoss(init_temperature=0.1)(views, torch.ones(5, 2, dtype=torch.bool))["loss"]
    shuffled = torch.cat([base, base[torch.randperm(5)]], dim=1)
    bad = MultiViewLoss(init_temperature=0.1)(shuffled, torch.ones(5, 2, dtype=torch.bool))["loss"]
    assert good < bad


def test_patient_index_is_stable():
    a = patient_index(["p1", "p2", "p1"])
    assert a[0] == a[2] != a[1] and a.dtype == torch.long and (a >= 0).all()
    assert torch.equal(a, patient_index(["p1", "p2", "p1"]))


# ---- two processes ------------------------------------------------------------------------------------------------
def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3 * 8))


class Wrapped(torch.nn.Module):
    def __init__(self, loss_fn):
        super().__init__()
        self.net, self.loss_fn = _model(), loss_fn

    def forward(self, x, mask, pid):
        return self.loss_fn(self.net(x).view(x.shape[0], 3, 8), mask, pid)["loss"]


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 6, generator=g)
    mask = torch.rand(10, 3, generator=g) > 0.35
    mask[:, 0] |= ~mask.any(1)
    pid = torch.tensor([0, 1, 1, 2, 3, 4, 5, 5, 6, 7])  # a patient spanning both ranks' shards (rows 1, 2)
    return x, mask, pid


LOSSES = {"clip": ClipLoss, "siglip": SigLipLoss, "multiview": MultiViewLoss}


def _worker(rank, world, port, name, shards, queue):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, mask, pid = _data()
        lo, hi = shards[rank]
        model = DDP(Wrapped(LOSSES[name]()))
        loss = model(x[lo:hi], mask[lo:hi], pid[lo:hi])
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0:
            # numpy, not tensors: torch shares tensors through a file descriptor served by this process, which may
            # have exited by the time the parent unpickles them
            queue.put((float(total) / world, {k: p.grad.numpy().copy() for k, p in model.module.named_parameters()}))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["clip", "siglip", "multiview"])
def test_two_processes_equal_one_process_loss_and_gradients(name):
    x, mask, pid = _data()
    single = Wrapped(LOSSES[name]())
    loss = single(x, mask, pid)
    loss.backward()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    shards = [(0, 4), (4, 10)]  # unequal local batches
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, name, shards, queue)) for r in range(2)]
    for p in procs:
        p.start()
    dist_loss, grads = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert math.isclose(dist_loss, loss.item(), rel_tol=1e-5, abs_tol=1e-6)
    for k, p in single.named_parameters():
        torch.testing.assert_close(
            torch.from_numpy(grads[k]), p.grad, rtol=1e-4, atol=1e-6, msg=f"{name}: gradient of {k}"
        )


@pytest.mark.parametrize("cls", [ClipLoss, SigLipLoss])
def test_recomputed_directions_give_the_same_loss_and_gradients(cls):
    """``checkpoint_min_logits``: directions recomputed in the backward (what large batches use to keep one
    direction's ``(b, B)`` logits at a time) give the loss and gradients of the plain ones."""
    torch.manual_seed(0)
    emb = torch.randn(12, 3, 8)
    mask = torch.rand(12, 3) > 0.3
    mask[:, 0] = True
    pid = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9])
    out = {}
    for threshold in (2**40, 0):
        loss = cls()
        loss.checkpoint_min_logits = threshold
        e = emb.clone().requires_grad_(True)
        res = loss(e, mask, pid)
        res["loss"].backward()
        out[threshold] = (res["loss"].detach(), e.grad, [p.grad for p in loss.parameters()])
    (l1, g1, p1), (l2, g2, p2) = out.values()
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(g1, g2)
    for a, b in zip(p1, p2, strict=True):
        torch.testing.assert_close(a, b)
