"""Token-budget batching: the rows of a contrastive batch grouped into micro-batches of at most
``max_tokens`` real tokens (``train.max_tokens_per_batch``).

The contrastive batch stays defined in **samples** (``train.batch_size``: the loss sees all of them, every step the
same number of negatives); the token budget decides how the batch is *computed*: the rows are grouped by token count
into micro-batches whose real tokens fill the budget, each micro-batch is embedded on its own (a bounded activation
memory whatever the mix of 60-token notes and 15k-gene profiles), and gradient caching
(:mod:`bioperceiver.losses.grad_cache`) makes the step exactly the step over the whole batch. Grouping happens inside
a batch that the DataLoader's seeded sampler drew, so the data order, ``len(loader)`` and exact resume
(``skip_first_batches``) are those of a run without the budget, and the grouping is a pure function of the batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

logger = logging.getLogger(__name__)


def token_budget_chunks(num_tokens: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group row indices into micro-batches of at most ``max_tokens`` tokens (first-fit decreasing: rows by
    decreasing token count, each into the first micro-batch it fits in). A row over the budget alone is a
    micro-batch of its own (logged). Deterministic (ties keep row order); each micro-batch's rows in increasing order,
    micro-batches in order of their first row.

    Args:
        num_tokens: real tokens of every row (``batch["num_tokens"]`` of a collator with ``count_tokens=True``).
        max_tokens: the budget per micro-batch.
    """
    if max_tokens is None or max_tokens <= 0:
        raise ValueError(f"max_tokens must be a positive token count, got {max_tokens}")
    order = sorted(range(len(num_tokens)), key=lambda i: (-int(num_tokens[i]), i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = int(num_tokens[i])
        if n > max_tokens:
            logger.debug("row %d has %d tokens, over the budget of %d: a micro-batch of its own", i, n, max_tokens)
            bins.append([i])
            room.append(-1)  # closed
            continue
        for j, left in enumerate(room):
            if n <= left:
                bins[j].append(i)
                room[j] -= n
                break
        else:
            bins.append([i])
            room.append(max_tokens - n)
    chunks = [sorted(b) for b in bins]
    return sorted(chunks, key=lambda c: c[0])
