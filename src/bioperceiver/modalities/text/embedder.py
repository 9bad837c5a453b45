"""``text``: token ids from a Hugging Face tokenizer -> word embeddings + learned positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..embedder import ModalityEmbedder, require_positive


@dataclass
class TextConfig:
    """Settings of a ``text`` modality.

    Args:
        vocab_size: size of the tokenizer's vocabulary (ids must lie in ``[0, vocab_size)``).
        max_position_embeddings: longest token sequence the position table covers; longer inputs raise.
        pad_token_id: id of the padding token (its embedding row is kept at zero).
    """

    vocab_size: int = 30522
    max_position_embeddings: int = 512
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        require_positive(vocab_size=self.vocab_size, max_position_embeddings=self.max_position_embeddings)
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id={self.pad_token_id} must lie in [0, vocab_size={self.vocab_size})")


class TextEmbedder(ModalityEmbedder):
    """Inputs: ``input_ids`` (B, T) int; optional ``attention_mask`` (B, T), 1 = real token.

    An absent note is a row whose attention mask is all zero.
    """

    kind = "text"
    config_class = TextConfig
    input_keys = ("input_ids",)
    optional_input_keys = ("attention_mask",)

    def __init__(self, name: str, config: TextConfig, d_input: int) -> None:
        super().__init__(name, config, d_input)
        self.word_embeddings = nn.Embedding(config.vocab_size, d_input, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, d_input)

    def matmul_flops(self, inputs):
        return 0.0, 0.0  # embedding lookups only

    def embed(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = inputs["input_ids"]
        if ids.dim() != 2 or ids.is_floating_point():
            raise ValueError(
                f"modality {self.name!r}: input_ids must be an integer tensor (B, T), got {ids.dtype} "
                f"{tuple(ids.shape)}"
            )
        _b, t = ids.shape
        if t > self.config.max_position_embeddings:
            raise ValueError(
                f"modality {self.name!r}: {t} tokens exceed max_position_embeddings="
                f"{self.config.max_position_embeddings}; truncate in the processor or raise the setting"
            )
        keep = self._mask(inputs, "attention_mask", ids.shape)  # (B, T)
        ids = ids.masked_fill(~keep, self.config.pad_token_id)
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(
                f"modality {self.name!r}: token ids must lie in [0, {self.config.vocab_size}), found "
                f"[{int(ids.min())}, {int(ids.max())}]; the tokenizer and the model's vocab_size disagree"
            )
        positions = torch.arange(t, device=ids.device)
        tokens = self.word_embeddings(ids) + self.position_embeddings(positions)  # (B, T, D_in)
        return tokens, keep
