"""``omics``: gene expression -> one token per measured gene (gene embedding + value encoding)."""

from ..registry import register_modality
from .embedder import OmicsConfig, OmicsEmbedder
from .processor import OmicsProcessor, OmicsSettings
from .spec import OmicsSpec

SPEC = register_modality(OmicsSpec())

__all__ = ["SPEC", "OmicsConfig", "OmicsEmbedder", "OmicsProcessor", "OmicsSettings", "OmicsSpec"]
