"""CLIP-style InfoNCE over every pair of modalities two samples share, with absent modalities masked out."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import gather_no_grad, gather_with_grad, global_count, local_sizes


class LearnableTemperature(nn.Module):
    """``exp(logit_scale)`` multiplies cosine similarities (inverse temperature); clamped so the scale never exceeds
    ``max_scale`` (CLIP: 100)."""

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0, learnable: bool = True):
        super().__init__()
        value = torch.tensor(math.log(1.0 / init_temperature))
        self.logit_scale = nn.Parameter(value) if learnable else nn.Buffer(value)
        self.max_log = math.log(max_scale)

    def forward(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=self.max_log).exp()


def _views(embeddings: torch.Tensor, mask: torch.Tensor, patient_ids: torch.Tensor | None):
    """Normalised local views, their global (gathered, with gradient) counterparts, masks and patient ids."""
    if embeddings.dim() != 3 or mask.shape != embeddings.shape[:2]:
        raise ValueError(
            f"expected embeddings (B, K, D) and mask (B, K), got {tuple(embeddings.shape)} and {tuple(mask.shape)}"
        )
    b = embeddings.shape[0]
    z = F.normalize(embeddings.float(), dim=-1)
    sizes = local_sizes(z)  # exchanged once for the three gathers below
    z_all, offset = gather_with_grad(z, sizes)
    mask_all = gather_no_grad(mask.bool(), sizes)
    if patient_ids is None:  # every sample its own patient
        pid = torch.arange(b, device=z.device) + offset
        pid_all = torch.arange(z_all.shape[0], device=z.device)
    else:
        if patient_ids.shape != (b,):
            raise ValueError(f"patient_ids must have shape ({b},), got {tuple(patient_ids.shape)}")
        pid = patient_ids.long()
        pid_all = gather_no_grad(pid, sizes)
    return z, mask.bool(), pid, z_all, mask_all, pid_all, offset


class PairwiseContrastiveLoss(nn.Module):
    """Shared machinery of the pair losses: one term per pair of views ``(a, b)`` that at least one sample of the
    global batch has both of, both directions, averaged over pairs. Subclasses define :meth:`direction`, the sum
    over local rows that have both views of one direction's loss. The global number of such rows per pair is
    all-reduced once per step for all pairs."""

    view_names: list[str] | None = None
    softmax_over_columns: bool = False
    """True when a direction is a softmax over its valid columns (InfoNCE): then ``uniform_loss`` (what a model
    scoring every candidate alike would get on this batch, ``ln`` of the number of candidates, averaged the way the
    loss is) is reported beside the loss. A sigmoid loss has no such level."""
    checkpoint_min_logits: int = 2**20
    """Directions whose ``(b, B)`` logits have at least this many entries are recomputed in the backward
    (``torch.utils.checkpoint``) instead of keeping their ``(b, B)`` tensors: every pair and direction of a step
    would otherwise hold its own until the backward (at B = 4,096: 30 directions x 64 MiB for 6 views). Same values
    and gradients; the price is one more logits + softmax per direction."""

    def direction(self, ctx: dict, x: int, y: int, rows_with_both: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _direction(self, ctx: dict, x: int, y: int, rows_with_both: torch.Tensor) -> torch.Tensor:
        if ctx["z"].shape[0] * ctx["z_all"].shape[0] >= self.checkpoint_min_logits and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self.direction, ctx, x, y, rows_with_both, use_reentrant=False)
        return self.direction(ctx, x, y, rows_with_both)

    def extra_parameters(self) -> torch.Tensor:  # touched by the zero loss so DDP sees every gradient
        return self.temperature.logit_scale

    def forward(
        self, embeddings: torch.Tensor, mask: torch.Tensor, patient_ids: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``embeddings (B, K, D)`` one view per modality (e.g. ``modality_pooler_output``, optionally with the fused
        view appended), ``mask (B, K)`` which views exist, ``patient_ids (B,)``."""
        z, m, pid, z_all, m_all, pid_all, offset = _views(embeddings, mask, patient_ids)
        b, k = m.shape
        rows = torch.arange(b, device=z.device) + offset
        own = torch.zeros((b, z_all.shape[0]), dtype=torch.bool, device=z.device)
        own[torch.arange(b), rows] = True
        ctx = {
            "z": z,
            "z_all": z_all,
            "m": m,
            "m_all": m_all,
            "rows": rows,
            "own": own,
            "other_same_patient": (pid[:, None] == pid_all[None, :]) & ~own,
            "scale": self.temperature(),
        }
        both = m[:, :, None] & m[:, None, :]  # (b, K, K): sample has views a and b
        counts, world = global_count(both.sum(0).float())
        out: dict[str, torch.Tensor] = {}
        total, n_pairs = z.new_zeros(()), 0
        uniform = z.new_zeros(())
        if self.softmax_over_columns:
            log_cols = self._log_valid_columns(ctx)
        for a in range(k):
            for c in range(a + 1, k):
                if counts[a, c] == 0:
                    continue
                pair = sum(0.5 * self._direction(ctx, x, y, both[:, a, c]) for x, y in ((a, c), (c, a)))
                pair = pair * world / counts[a, c]
                out[f"loss_{self._name(a)}-{self._name(c)}"] = pair.detach()
                total, n_pairs = total + pair, n_pairs + 1
                if self.softmax_over_columns:  # ln(valid columns) of each row, averaged like the loss terms
                    rows_ac = both[:, a, c]
                    level = log_cols[rows_ac, c].sum() + log_cols[rows_ac, a].sum()  # the two directions' columns
                    uniform = uniform + 0.5 * level * world / counts[a, c]
        if n_pairs == 0:
            # no sample has two views anywhere: a zero loss that still touches the graph (DDP needs every grad)
            total = 0.0 * (embeddings.sum() + self.extra_parameters())
        else:
            total = total / n_pairs
        out.update(loss=total, temperature=(1.0 / ctx["scale"]).detach(), num_pairs=torch.tensor(n_pairs))
        if self.softmax_over_columns:
            out["uniform_loss"] = uniform / max(n_pairs, 1)
        return out

    @staticmethod
    @torch.no_grad()
    def _log_valid_columns(ctx: dict) -> torch.Tensor:
        """``(b, K)``: ln of the columns row ``i`` is scored against when the column view is ``y`` (every sample of
        the global batch with view ``y``, less the row's other samples of the same patient). Once per step, from the
        few same-patient pairs, instead of a ``(b, B)`` mask per pair and direction."""
        m_all = ctx["m_all"]
        r, j = ctx["other_same_patient"].nonzero(as_tuple=True)
        same = torch.zeros(ctx["m"].shape, device=m_all.device).index_add_(0, r, m_all[j].float())
        return (m_all.sum(0)[None, :] - same).clamp(min=1).log()

    def _name(self, i: int) -> str:
        return self.view_names[i] if self.view_names else f"view{i}"


class ClipLoss(PairwiseContrastiveLoss):
    """Symmetric InfoNCE for every pair of modality views ``(a, b)``, averaged over pairs.

    For a pair, row ``i`` (local sample with ``a``) is scored against every global sample ``j`` that has ``b``;
    the positive is ``j = i``. Samples lacking ``a`` give no row, samples lacking ``b`` give no column (masked, never
    zero-filled); other samples of the same patient are removed from the negatives (``patient_ids``). A pair
    contributes when at least one sample in the global batch has both. Distributed: local rows x gathered columns.

    Args:
        init_temperature: initial softmax temperature (learnable unless ``learnable_temperature=False``).
        max_scale: largest inverse temperature (the clamp).
        view_names: names for the per-pair terms in the output dict (default ``view0``, ``view1``...).
    """

    softmax_over_columns = True

    def __init__(
        self,
        init_temperature: float = 0.07,
        max_scale: float = 100.0,
        learnable_temperature: bool = True,
        view_names: list[str] | None = None,
    ):
        super().__init__()
        self.temperature = LearnableTemperature(init_temperature, max_scale, learnable_temperature)
        self.view_names = view_names

    def direction(self, ctx, x, y, rows_with_both):
        # Memory: every pair's tensors live until the backward, so each (b, B) copy counts (x 2 directions x pairs;
        # at B = 4,096 one is 64 MiB). The scale multiplies the (b, P) rows, not the (b, B) logits (whose product
        # the backward would keep for the scale's gradient); masked columns are filled in place with the dtype's
        # lowest value (exp() of it is exactly 0 next to any real logit, as -inf, and a row with no valid column
        # stays finite); rows without both views are ignored by the target instead of gathered into a copy. What
        # the backward keeps: the log-softmax output and the mask.
        logits = (ctx["scale"] * ctx["z"][:, x]) @ ctx["z_all"][:, y].T  # (b, B)
        valid_col = ctx["m_all"][:, y][None, :] & ~ctx["other_same_patient"]
        logits = logits.masked_fill_(~valid_col, torch.finfo(logits.dtype).min)
        target = ctx["rows"].masked_fill(~rows_with_both, -100)
        return F.cross_entropy(logits, target, reduction="sum", ignore_index=-100)
