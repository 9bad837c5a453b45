"""Reusable building blocks of the BioPerceiver backbone and the modality embedders."""

from .attention import CrossAttention, CrossAttentionBlock, Mlp, SelfAttention, SelfAttentionBlock
from .fourier import FourierFeatures, grid_coordinates
from .value_encoder import ScalarEncoder

__all__ = [
    "CrossAttention",
    "CrossAttentionBlock",
    "FourierFeatures",
    "Mlp",
    "ScalarEncoder",
    "SelfAttention",
    "SelfAttentionBlock",
    "grid_coordinates",
]
