"""Gradient caching for contrastive losses (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under
Memory Limited Setup"): a contrastive batch of any size in the activation memory of one chunk.

1. Embed the batch chunk by chunk **without** a graph (only the small embeddings are kept).
2. Compute the loss on the whole batch from those embeddings (leaves): the existing distributed losses gather the
   columns across ranks with gradients and score the local rows, so this is the all-gather local loss unchanged.
   Its backward gives the gradient of the loss with respect to every embedding (and the loss's own parameters,
   e.g. the temperature).
3. Re-embed every chunk **with** a graph, replaying the random state of step 1 (dropout draws the same masks), and
   back-propagate the cached embedding gradients through it: ``backward(chunk_embeddings, cached_grads)``.

The parameter gradients are exactly those of the un-chunked step (up to float summation order); the price is one
extra forward pass. Under DDP the caller turns off DDP's per-backward all-reduce (``no_sync``) and reduces once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

Embeddings = dict[str, torch.Tensor]


class RandomState:
    """The CPU and CUDA random states at one moment, to replay a forward with the same dropout masks."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = (
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        )

    @contextlib.contextmanager
    def replay(self):
        """Run the block from this state, then continue the streams from where they were before the block."""
        devices = list(range(len(self.cuda))) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


def grad_cache_step(
    embed: Callable[[Any], Embeddings],
    chunks: Sequence[Any],
    rows: Sequence[Sequence[int]],
    loss: Callable[[Embeddings], dict[str, torch.Tensor]],
    *,
    backward: Callable[[torch.Tensor], None] | None = None,
    before_backward: Callable[[dict[str, torch.Tensor]], None] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, torch.Tensor]:
    """One gradient-cached step: accumulate into ``.grad`` the gradients of ``loss(embed(whole batch))``.

    Args:
        embed: ``chunk -> {name: tensor (b_chunk, ...)}`` (float tensors receive gradients; others, e.g. masks,
            are concatenated and passed through).
        chunks: the chunks' inputs, in any order.
        rows: for every chunk, the batch rows it holds (together a permutation of ``range(B)``); the loss sees the
            embeddings in batch-row order, so row-aligned extras of the loss (patient ids) stay aligned.
        loss: ``{name: tensor (B, ...)} -> dict`` with a scalar ``loss`` (the un-chunked loss function).
        backward: how to back-propagate the loss (``accelerator.backward``, which scales fp16 losses; the cached
            gradients then carry the scale into the chunks' backward). Default ``Tensor.backward``.
        before_backward: called with the loss dict before any backward (e.g. stop on a non-finite loss).
        autocast: context manager factory around every chunk's forward (mixed precision).

    Returns:
        The loss dict, detached.
    """
    if len(chunks) != len(rows):
        raise ValueError(f"{len(chunks)} chunks but {len(rows)} row lists")
    order = torch.tensor([r for chunk_rows in rows for r in chunk_rows], dtype=torch.long)
    if not torch.equal(order.sort().values, torch.arange(len(order))):
        raise ValueError("the chunks' rows must cover every batch row exactly once")
    states, cached = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RandomState())
            with autocast():
                cached.append(embed(chunk))
    inverse = order.argsort()  # batch row -> position in the chunk concatenation
    leaves: Embeddings = {}
    for key in cached[0]:
        full = torch.cat([c[key] for c in cached])
        full = full[inverse.to(full.device)]
        leaves[key] = full.detach().requires_grad_(full.is_floating_point())
    result = loss(leaves)
    if before_backward is not None:
        before_backward(result)
    (backward or torch.Tensor.backward)(result["loss"])
    for chunk, state, chunk_rows in zip(chunks, states, rows, strict=True):
        with state.replay(), autocast():
            emb = embed(chunk)
        idx = torch.as_tensor(list(chunk_rows), dtype=torch.long)
        outs, grads = [], []
        for key, leaf in leaves.items():
            if leaf.grad is not None and emb[key].requires_grad:
                outs.append(emb[key])
                grads.append(leaf.grad[idx.to(leaf.grad.device)].to(emb[key].dtype))
        if outs:
            torch.autograd.backward(outs, grads)
    return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in result.items()}
