"""``text``: token ids from a Hugging Face tokenizer -> word embeddings + learned positions, or the hidden states of
a pretrained Hugging Face encoder (BERT family) projected to ``d_input``."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..embedder import ModalityEmbedder, require_positive

logger = logging.getLogger(__name__)

ENCODER_TRAINABLE = ("frozen", "partial", "full")
# Where BERT-family models keep their stack of transformer layers (BERT/RoBERTa/ELECTRA, DistilBERT).
_LAYER_PATHS = ("encoder.layer", "transformer.layer", "layers")


@dataclass
class TextConfig:
    """Settings of a ``text`` modality.

    Args:
        vocab_size: size of the tokenizer's vocabulary (ids must lie in ``[0, vocab_size)``).
        max_position_embeddings: longest token sequence the position table covers; longer inputs raise.
        pad_token_id: id of the padding token (its embedding row is kept at zero).
        pretrained_encoder: local folder of a pretrained Hugging Face encoder (BERT family: ``config.json`` +
            ``model.safetensors``, read with ``transformers.AutoModel.from_pretrained(local_files_only=True)``)
            whose last hidden states, projected to ``d_input``, become the tokens. Use its tokenizer too (the text
            processor's ``tokenizer_dir``). The weights are copied into the BioPerceiver model, so a saved model
            never needs this folder (``save_pretrained`` writes ``None`` here and keeps ``encoder_config``).
        encoder_config: the encoder's architecture (its ``config.json``); filled from ``pretrained_encoder``.
        encoder_trainable: ``"frozen"`` (no encoder weight trains; dropout off), ``"partial"`` (only the top
            ``encoder_trainable_layers`` transformer layers train) or ``"full"``.
        encoder_trainable_layers: transformer layers trained with ``encoder_trainable="partial"``.
    """

    vocab_size: int = 30522
    max_position_embeddings: int = 512
    pad_token_id: int = 0
    pretrained_encoder: str | None = None
    encoder_config: dict[str, Any] | None = None
    encoder_trainable: str = "frozen"
    encoder_trainable_layers: int = 2

    def __post_init__(self) -> None:
        require_positive(vocab_size=self.vocab_size, max_position_embeddings=self.max_position_embeddings)
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id={self.pad_token_id} must lie in [0, vocab_size={self.vocab_size})")
        if self.encoder_trainable not in ENCODER_TRAINABLE:
            raise ValueError(f"encoder_trainable must be one of {ENCODER_TRAINABLE}, got {self.encoder_trainable!r}")
        require_positive(encoder_trainable_layers=self.encoder_trainable_layers)
        if self.pretrained_encoder and self.encoder_config is None:
            path = Path(self.pretrained_encoder).expanduser() / "config.json"
            if not path.is_file():
                raise ValueError(
                    f"pretrained_encoder {self.pretrained_encoder!r} has no config.json; give the local folder of a "
                    "Hugging Face encoder (config.json + model.safetensors) or set pretrained_encoder=None"
                )
            self.encoder_config = json.loads(path.read_text())
        if self.encoder_config is not None:
            enc = self.encoder_config
            if enc.get("vocab_size") != self.vocab_size:
                raise ValueError(
                    f"the pretrained encoder's vocab_size={enc.get('vocab_size')} differs from the tokenizer's "
                    f"vocab_size={self.vocab_size}; use the encoder's own tokenizer (text processor setting "
                    "tokenizer_dir=<the encoder folder>)"
                )
            if self.max_position_embeddings > enc.get("max_position_embeddings", self.max_position_embeddings):
                raise ValueError(
                    f"max_position_embeddings={self.max_position_embeddings} (the processor's max_length) exceeds "
                    f"the pretrained encoder's {enc['max_position_embeddings']}; lower the text max_length"
                )


class TextEmbedder(ModalityEmbedder):
    """Inputs: ``input_ids`` (B, T) int; optional ``attention_mask`` (B, T), 1 = real token.

    An absent note is a row whose attention mask is all zero. With ``pretrained_encoder``/``encoder_config`` the
    tokens are the encoder's last hidden states (B, T, H) through a linear projection to ``d_input``; the
    attention mask is the encoder's attention mask and the keep-mask of the tokens.
    """

    kind = "text"
    config_class = TextConfig
    input_keys = ("input_ids",)
    optional_input_keys = ("attention_mask",)

    def __init__(self, name: str, config: TextConfig, d_input: int) -> None:
        super().__init__(name, config, d_input)
        if config.encoder_config is not None:
            self.encoder = self._create_encoder(config)
            self.proj = nn.Linear(self.encoder.config.hidden_size, d_input)
            self.apply_trainability()
        else:
            self.word_embeddings = nn.Embedding(config.vocab_size, d_input, padding_idx=config.pad_token_id)
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, d_input)

    def _create_encoder(self, config: TextConfig) -> nn.Module:
        from transformers import AutoConfig, AutoModel

        settings = {k: v for k, v in config.encoder_config.items() if not k.startswith("_")}
        if config.pretrained_encoder:
            folder = Path(config.pretrained_encoder).expanduser()
            if not folder.is_dir():
                raise ValueError(
                    f"modality {self.name!r}: pretrained_encoder folder {str(folder)!r} does not exist; give a "
                    "local Hugging Face encoder folder or set pretrained_encoder=None"
                )
            encoder = AutoModel.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
            logger.info("%s: loaded the %s encoder from %s", self.name, settings.get("model_type"), folder)
            # The loaded weights must survive the weight initialisation of the surrounding model.
            for module in encoder.modules():
                module._is_hf_initialized = True
        else:
            # A saved BioPerceiver: the architecture from the config, the weights from the model's state dict.
            # Left unmarked, so that ``from_pretrained`` of the surrounding model runs the encoder's own
            # ``_init_weights`` on what the state dict does not hold (non-persistent buffers such as BERT's
            # ``position_ids``).
            encoder = AutoModel.from_config(AutoConfig.for_model(**settings))
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # the tokens are the hidden states; an unused pooler would get no gradient
        return encoder

    def _encoder_layers(self) -> nn.ModuleList:
        for path in _LAYER_PATHS:
            module: Any = self.encoder
            for part in path.split("."):
                module = getattr(module, part, None)
            if isinstance(module, nn.ModuleList):
                return module
        raise ValueError(
            f"modality {self.name!r}: cannot find the transformer layers of the {type(self.encoder).__name__} "
            f"encoder (looked for {list(_LAYER_PATHS)}); use encoder_trainable='frozen' or 'full'"
        )

    def apply_trainability(self) -> None:
        """Set ``requires_grad`` of the pretrained encoder from ``encoder_trainable`` (the projection always
        trains); finetuning modes that unfreeze the whole model call this again afterwards."""
        if self.config.encoder_config is None:
            return
        mode = self.config.encoder_trainable
        self.encoder.requires_grad_(mode == "full")
        if mode == "partial":
            layers = self._encoder_layers()
            n = self.config.encoder_trainable_layers
            if n > len(layers):
                raise ValueError(
                    f"modality {self.name!r}: encoder_trainable_layers={n} but the encoder has {len(layers)} layers"
                )
            for layer in layers[-n:]:
                layer.requires_grad_(True)
        if mode == "frozen":
            self.encoder.eval()

    def train(self, mode: bool = True) -> TextEmbedder:
        super().train(mode)
        if self.config.encoder_config is not None and self.config.encoder_trainable == "frozen":
            self.encoder.eval()  # a frozen encoder computes fixed features (no dropout)
        return self

    def matmul_flops(self, inputs):
        if self.config.encoder_config is not None:
            raise NotImplementedError("FLOPs of a pretrained text encoder are not counted here")
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
        if self.config.encoder_config is not None:
            # Only samples with a note run the encoder (an all-masked row would attend to nothing).
            rows = keep.any(dim=1)  # (B,)
            hidden = self.encoder(input_ids=ids[rows], attention_mask=keep[rows].long()).last_hidden_state
            tokens = self.proj(hidden)  # (B_present, T, D_in)
            if bool(rows.all()):
                return tokens, keep
            full = tokens.new_zeros(ids.shape[0], t, tokens.shape[-1])  # (B, T, D_in)
            full[rows] = tokens
            return full, keep
        positions = torch.arange(t, device=ids.device)
        tokens = self.word_embeddings(ids) + self.position_embeddings(positions)  # (B, T, D_in)
        return tokens, keep
