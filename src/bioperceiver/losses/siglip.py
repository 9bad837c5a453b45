"""SigLIP: pairwise sigmoid loss over every pair of modality views, with learnable temperature and bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .clip import LearnableTemperature, PairwiseContrastiveLoss


class SigLipLoss(PairwiseContrastiveLoss):
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

    def extra_parameters(self) -> torch.Tensor:
        return self.temperature.logit_scale + self.bias

    def direction(self, ctx, x, y, rows_with_both):
        logits = ctx["scale"] * ctx["z"][:, x] @ ctx["z_all"][:, y].T + self.bias
        labels = ctx["own"].float() * 2 - 1
        valid = rows_with_both[:, None] & ctx["m_all"][:, y][None, :] & ~ctx["other_same_patient"]
        return -F.logsigmoid(labels * logits)[valid].sum()

    def forward(self, embeddings, mask, patient_ids=None):
        out = super().forward(embeddings, mask, patient_ids)
        out["bias"] = self.bias.detach()
        return out
