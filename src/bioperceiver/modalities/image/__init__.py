"""``image``: 2D/3D medical images (DICOM, NIfTI, PNG, NumPy) -> patch tokens with Fourier positions."""

from ..registry import register_modality
from .embedder import ImageConfig, ImageEmbedder
from .processor import ImageProcessor, ImageSettings
from .spec import ImageSpec, image_grid, patch_grid

SPEC = register_modality(ImageSpec())

__all__ = [
    "SPEC",
    "ImageConfig",
    "ImageEmbedder",
    "ImageProcessor",
    "ImageSettings",
    "ImageSpec",
    "image_grid",
    "patch_grid",
]
