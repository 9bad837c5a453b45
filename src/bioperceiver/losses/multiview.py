"""Multi-view supervised-contrastive loss: every view in the global batch, positives = views of the same patient."""

from __future__ import annotations

import torch
from torch import nn

from .clip import LearnableTemperature, _views
from .distributed import global_count


class MultiViewLoss(nn.Module):
    """All present views of all samples in the global batch (each modality alone, the fused view, augmented
    views...) are embedded; for an anchor view, every other view of the **same patient** is a positive and all
    other views are negatives (SupCon: ``-mean over positives of log softmax``). Any number of modalities works,
    and an unpaired single-modality sample is handled by giving it two augmented views (two columns of the input).
    Anchors without a positive in the global batch do not contribute. ``uniform_loss`` is what a model scoring every
    candidate alike would get on the same batch (``ln`` of each anchor's number of candidates, averaged over anchors):
    about ``ln(B x views - 1)``, not ``ln B``.
    """

    def __init__(self, init_temperature: float = 0.1, max_scale: float = 100.0, learnable_temperature: bool = True):
        super().__init__()
        self.temperature = LearnableTemperature(init_temperature, max_scale, learnable_temperature)

    def forward(
        self, views: torch.Tensor, mask: torch.Tensor, patient_ids: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``views (B, V, D)``, ``mask (B, V)``, ``patient_ids (B,)`` (default: every sample its own patient)."""
        z, m, pid, z_all, m_all, pid_all, offset = _views(views, mask, patient_ids)
        scale = self.temperature()
        b, v, d = z.shape
        anchors = z.reshape(b * v, d)
        cands = z_all.reshape(-1, d)
        a_pid = pid[:, None].expand(b, v).reshape(-1)
        c_pid = pid_all[:, None].expand(-1, v).reshape(-1)
        a_ok, c_ok = m.reshape(-1), m_all.reshape(-1)
        a_index = (torch.arange(b, device=z.device)[:, None] + offset) * v + torch.arange(v, device=z.device)
        a_index = a_index.reshape(-1)
        logits = scale * anchors @ cands.T
        not_self = torch.ones_like(logits, dtype=torch.bool)
        not_self[torch.arange(b * v), a_index] = False
        valid = c_ok[None, :] & not_self
        pos = valid & (a_pid[:, None] == c_pid[None, :])
        log_prob = logits.masked_fill(~valid, float("-inf")).log_softmax(dim=-1)
        n_pos = pos.sum(-1)
        use = a_ok & (n_pos > 0)
        per_anchor = -(log_prob.masked_fill(~pos, 0.0).sum(-1) / n_pos.clamp(min=1))
        count, world = global_count(use.sum().float())
        # a model scoring every candidate alike: each positive has log-probability -ln(valid candidates)
        uniform = valid.sum(-1).clamp(min=1).float().log()
        if count == 0:
            loss = 0.0 * (views.sum() + self.temperature.logit_scale)
            uniform_loss = uniform.new_zeros(())
        else:
            loss = per_anchor[use].sum() * world / count
            uniform_loss = uniform[use].sum() * world / count
        return {
            "loss": loss,
            "temperature": (1.0 / scale).detach(),
            "num_anchors": count.detach().long(),
            "uniform_loss": uniform_loss.detach(),
        }
