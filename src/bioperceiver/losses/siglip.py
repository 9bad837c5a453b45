"""SigLIP: pairwise sigmoid loss over every pair of modality views, with learnable temperature and bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .clip import LearnableTemperature, _views
from .distributed import global_count


class SigLipLoss(nn.Module):
    """For a pair of views ``(a, b)``: every local sample with ``a`` against every global sample with ``b``, label
    +1 for the same sample and -1 otherwise (other samples of the same patient are left out), loss
    ``-log sigmoid(label * (scale * cos + bias))`` summed over columns and averaged over rows that have a positive
    (SigLIP's normalisation); both directions, averaged over pairs. No global softmax, so large global batches are
    cheap.
    """

    def __init__(
        self,
        init_temperature: float = 0.1,
        init_bias: float = -10.0,
        max_scale: float = 100.0,
        view_names: list[str] | None = None,
    ):
        super().__init__()
        self.temperature = LearnableTemperature(init_temperature, max_scale)
        self.bias = nn.Parameter(torch.tensor(float(init_bias)))
        self.view_names = view_names

    def forward(
        self, embeddings: torch.Tensor, mask: torch.Tensor, patient_ids: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        z, m, pid, z_all, m_all, pid_all, offset = _views(embeddings, mask, patient_ids)
        scale = self.temperature()
        b, k = m.shape
        rows = torch.arange(b, device=z.device) + offset
        positive = torch.zeros((b, z_all.shape[0]), dtype=torch.bool, device=z.device)
        positive[torch.arange(b), rows] = True
        other_same_patient = (pid[:, None] == pid_all[None, :]) & ~positive
        out: dict[str, torch.Tensor] = {}
        total, n_pairs = z.new_zeros(()), 0
        for a in range(k):
            for c in range(a + 1, k):
                both_local = m[:, a] & m[:, c]
                count, world = global_count(both_local.sum().float())
                if count == 0:
                    continue
                pair = z.new_zeros(())
                for x, y in ((a, c), (c, a)):
                    logits = scale * z[:, x] @ z_all[:, y].T + self.bias
                    labels = positive.float() * 2 - 1
                    valid = m[:, x][:, None] & m_all[:, y][None, :] & ~other_same_patient
                    valid &= both_local[:, None]  # rows with a positive (SigLIP's per-row normalisation)
                    terms = -F.logsigmoid(labels * logits)
                    pair = pair + 0.5 * terms[valid].sum() * world / count
                out[f"loss_{self._name(a)}-{self._name(c)}"] = pair.detach()
                total, n_pairs = total + pair, n_pairs + 1
        if n_pairs == 0:
            total = 0.0 * (embeddings.sum() + self.temperature.logit_scale + self.bias)
        else:
            total = total / n_pairs
        out.update(
            loss=total, temperature=(1.0 / scale).detach(), bias=self.bias.detach(), num_pairs=torch.tensor(n_pairs)
        )
        return out

    def _name(self, i: int) -> str:
        return self.view_names[i] if self.view_names else f"view{i}"


__all__ = ["SigLipLoss"]
