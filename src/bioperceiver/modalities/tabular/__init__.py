"""``tabular``: EHR fields -> one token per measured feature (feature embedding + value or category)."""

from ..registry import register_modality
from .embedder import TabularConfig, TabularEmbedder
from .processor import TabularProcessor, TabularSettings
from .spec import TabularSpec, feature_name, feature_value

SPEC = register_modality(TabularSpec())

__all__ = [
    "SPEC",
    "TabularConfig",
    "TabularEmbedder",
    "TabularProcessor",
    "TabularSettings",
    "TabularSpec",
    "feature_name",
    "feature_value",
]
