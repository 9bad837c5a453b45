"""``wsi``: whole-slide pathology. Slides -> tissue mask -> tiles at a physical scale -> frozen patch-encoder
features (``<slide>.h5``, :mod:`.extract`) -> one token per tile (10k-100k per slide) for the Perceiver."""

from ..registry import register_modality
from .embedder import WsiConfig, WsiEmbedder
from .processor import WsiProcessor, WsiSettings
from .spec import WsiSpec

SPEC = register_modality(WsiSpec())

__all__ = ["SPEC", "WsiConfig", "WsiEmbedder", "WsiProcessor", "WsiSettings", "WsiSpec"]
