"""``text``: clinical notes -> token ids (Hugging Face ``tokenizers``) -> word embeddings + learned positions."""

from ..registry import register_modality
from .embedder import TextConfig, TextEmbedder
from .processor import TextProcessor, TextSettings, train_tokenizer
from .spec import TextSpec

SPEC = register_modality(TextSpec())

__all__ = ["SPEC", "TextConfig", "TextEmbedder", "TextProcessor", "TextSettings", "TextSpec", "train_tokenizer"]
