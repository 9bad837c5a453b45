"""Data-side processors (tokenizers), one per modality kind, and the composite :class:`BioPerceiverProcessor`."""

from .base import ModalityProcessor, get_processor_class, list_processor_kinds, register_processor
from .image import ImageProcessor
from .omics import OmicsProcessor
from .signal import SignalProcessor, window_references
from .tabular import TabularProcessor
from .text import TextProcessor, train_tokenizer

__all__ = [
    "ImageProcessor",
    "ModalityProcessor",
    "OmicsProcessor",
    "SignalProcessor",
    "TabularProcessor",
    "TextProcessor",
    "get_processor_class",
    "list_processor_kinds",
    "register_processor",
    "train_tokenizer",
    "window_references",
]
