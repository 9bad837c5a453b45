"""Gathering embeddings across ranks with gradients, for the local-loss formulation of contrastive losses.

Each rank scores its *local* rows against the *global* columns (memory ``O(local x global)``), and the gathered
columns keep their autograd graph: ``torch.distributed.nn.functional.all_gather`` sums the gradients of every
rank's loss back onto the rank that owns each embedding. With losses normalised by global counts and scaled by the
world size (see :func:`global_count`), DDP's gradient averaging then gives exactly the gradients of one process over
the whole global batch.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

_LOCAL_ONLY = False


@contextlib.contextmanager
def local_only():
    """Compute losses on this process's batch alone even inside a process group (e.g. evaluation on the main
    process while the other ranks wait: a collective there would deadlock)."""
    global _LOCAL_ONLY
    previous, _LOCAL_ONLY = _LOCAL_ONLY, True
    try:
        yield
    finally:
        _LOCAL_ONLY = previous


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without an initialised process group or inside :func:`local_only`."""
    if not _LOCAL_ONLY and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_sizes(x: torch.Tensor) -> list[int]:
    """First-dimension size of ``x`` on every rank (one small all-gather); ``[len(x)]`` when not distributed."""
    _, size = world()
    if size == 1:
        return [x.shape[0]]
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(sizes, n)
    return [int(s) for s in sizes]


def _pad_to(x: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([x, x.new_zeros((n - x.shape[0], *x.shape[1:]))]) if x.shape[0] < n else x


def gather_with_grad(x: torch.Tensor, sizes: list[int] | None = None) -> tuple[torch.Tensor, int]:
    """Concatenate ``x`` (first dimension = local batch, may differ between ranks) from every rank, keeping
    gradients; returns the global tensor and the offset of this rank's rows in it. Pass ``sizes``
    (:func:`local_sizes`) when several tensors of one batch are gathered, to exchange them once."""
    rank, size = world()
    if size == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    sizes = sizes or local_sizes(x)
    parts = all_gather(_pad_to(x, max(sizes)))
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]), sum(sizes[:rank])


def gather_no_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``x`` from every rank without gradients (masks, ids; any dtype; unequal first dimensions)."""
    _, size = world()
    if size == 1:
        return x
    sizes = sizes or local_sizes(x)
    padded = _pad_to(x, max(sizes)).contiguous()
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def patient_index(patient_ids: list[str], device=None) -> torch.Tensor:
    """Stable int64 ids for patient id strings (the same on every rank): SHA-1 of the id, 63 bits."""
    import hashlib

    return torch.tensor(
        [int.from_bytes(hashlib.sha1(str(p).encode()).digest()[:8], "big") >> 1 for p in patient_ids],
        dtype=torch.long,
        device=device,
    )


def global_count(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(sum of x over ranks, world size)``, no gradient: divide a local sum by the global count and multiply by
    the world size, and the DDP-averaged gradient equals the single-process gradient of the global mean."""
    _, size = world()
    if size == 1:
        return x.detach(), 1
    y = x.detach().clone()
    dist.all_reduce(y)
    return y, size
