"""``text`` spec: a note -> token ids; tokens map back to word pieces."""

from __future__ import annotations

from types import MappingProxyType

import torch

from ..spec import ArraySpec, ModalitySpec
from .embedder import TextEmbedder
from .processor import TextProcessor


class TextSpec(ModalitySpec):
    """A manifest cell holds the note itself; a processed note is ``input_ids`` and ``attention_mask`` (T,)."""

    kind = "text"
    processor_class = TextProcessor
    embedder_class = TextEmbedder
    arrays = MappingProxyType(
        {
            "input_ids": ArraySpec(torch.long, doc="token ids of the fitted tokenizer (T,)"),
            "attention_mask": ArraySpec(torch.long, required=False, doc="1 = real token (T,)"),
        }
    )
    mask_key = "attention_mask"
    cell_forms = ("text",)
    token_unit = "word piece"

    def token_labels(self, attribution, modality):
        proc = attribution.processors.get(modality)
        tok = getattr(proc, "tokenizer", None)
        ids = attribution.inputs[modality]["input_ids"].tolist()
        if tok is not None:
            return [[tok.id_to_token(i) or f"id {i}" for i in row] for row in ids]
        return [[f"id {i}" for i in row] for row in ids]

    def describe(self, arrays):
        return "input_ids", len(arrays["input_ids"])
