"""Reusable building blocks of the BioPerceiver backbone and the modality embedders."""

from .attention import (
    CrossAttention,
    CrossAttentionBlock,
    Mlp,
    PackedTokens,
    SelfAttention,
    SelfAttentionBlock,
    packed_attend,
)
from .decoder import TokenValueDecoder
from .fourier import FourierFeatures, grid_coordinates
from .value_encoder import ScalarEncoder

__all__ = [
    "CrossAttention",
    "CrossAttentionBlock",
    "FourierFeatures",
    "Mlp",
    "PackedTokens",
    "ScalarEncoder",
    "SelfAttention",
    "SelfAttentionBlock",
    "TokenValueDecoder",
    "grid_coordinates",
    "packed_attend",
]
