"""Contrastive pretraining losses: standalone, distributed-aware modules returning dicts (``loss`` + terms).

Inputs are per-view embeddings ``(B, K, D)`` with a presence mask ``(B, K)`` — e.g. a model's
``modality_pooler_output``/``modality_mask``, optionally with the fused ``pooler_output`` appended as a view — and
optional integer patient ids (:func:`patient_index` maps id strings to ids that agree across ranks).
"""

from .clip import ClipLoss, LearnableTemperature
from .decorrelation import decorrelation_loss
from .distributed import gather_no_grad, gather_with_grad, local_only, patient_index, world
from .grad_cache import grad_cache_step
from .multiview import MultiViewLoss
from .siglip import SigLipLoss
from .survival import (
    CoxPHLoss,
    DiscreteTimeNLLLoss,
    cox_ph_loss,
    discrete_time_nll,
    discretize,
    make_time_bins,
    risk_from_hazard_logits,
    survival_from_hazard_logits,
)

__all__ = [
    "ClipLoss",
    "CoxPHLoss",
    "DiscreteTimeNLLLoss",
    "LearnableTemperature",
    "MultiViewLoss",
    "SigLipLoss",
    "cox_ph_loss",
    "decorrelation_loss",
    "discrete_time_nll",
    "discretize",
    "gather_no_grad",
    "gather_with_grad",
    "grad_cache_step",
    "local_only",
    "make_time_bins",
    "patient_index",
    "risk_from_hazard_logits",
    "survival_from_hazard_logits",
    "world",
]
