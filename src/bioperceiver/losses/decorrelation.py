"""Redundancy reduction for contrastive pretraining: a penalty on correlated embedding dimensions.

Contrastive encoders tend to spend their width on a few directions (dimensional collapse, Jing et al. 2022,
"Understanding Dimensional Collapse in Contrastive Self-supervised Learning"): the held-out embeddings of the SurvSet
backbones have an effective rank of 6-10 of 32 (``benchmarks/RESULTS.md``, "Why pretraining does not pay here").
Downstream users standardise the dimensions and take principal components (a Cox or linear probe), i.e. they see
the **correlation** matrix. This term is the mean squared off-diagonal entry of that matrix over a batch: Barlow
Twins' redundancy-reduction term (Zbontar et al. 2021) and VICReg's covariance term (Bardes et al. 2022), taken on
correlations so that it is scale-free (0: uncorrelated dimensions, 1: all dimensions perfectly (anti-)correlated).
"""

from __future__ import annotations

import torch


def decorrelation_loss(z: torch.Tensor, mask: torch.Tensor, min_rows: int = 3, eps: float = 1e-4) -> torch.Tensor:
    """Mean squared off-diagonal correlation of each view's embedding dimensions over the batch.

    ``z (B, V, D)``: per-view embeddings; ``mask (B, V)``: which rows are present (absent and padding rows are left
    out). Each view column with at least ``min_rows`` present rows contributes ``sum_{i != j} corr_ij^2 / (D (D-1))``
    of its rows' correlation matrix (``eps`` added to every variance, so a constant dimension does not divide by
    zero); the result is the mean over those columns, and an exact 0 that still touches ``z``'s graph when none has.
    With fewer rows than dimensions the correlations cannot all vanish (a floor that grows as rows shrink), so use
    it with batches larger than ``D``. Computed over the rows given (one process's batch under DDP)."""
    if z.dim() != 3 or mask.shape != z.shape[:2]:
        raise ValueError(f"decorrelation_loss: z (B, V, D) and mask (B, V), got {tuple(z.shape)}, {tuple(mask.shape)}")
    _, v, d = z.shape
    if d < 2:
        raise ValueError(f"decorrelation_loss needs embeddings of at least 2 dimensions, got {d}")
    terms = []
    for k in range(v):
        x = z[:, k][mask[:, k].bool()].float()
        n = x.shape[0]
        if n < min_rows:
            continue
        x = x - x.mean(0, keepdim=True)
        cov = x.T @ x / (n - 1)
        inv_std = (cov.diagonal() + eps).rsqrt()
        corr = cov * inv_std[:, None] * inv_std[None, :]
        off = corr - torch.diag_embed(corr.diagonal())
        terms.append(off.pow(2).sum() / (d * (d - 1)))
    if not terms:
        return 0.0 * z.sum()
    return torch.stack(terms).mean()
