"""Base class of every modality embedder (model-side tokenizer)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn


def require_positive(**values: float) -> None:
    for key, value in values.items():
        if value is None or value <= 0:
            raise ValueError(f"{key} must be > 0, got {value}")


class ModalityEmbedder(nn.Module):
    """Turns one modality's batch arrays into tokens ``(B, N, d_input)`` and a keep-mask ``(B, N)``.

    Subclasses set ``config_class`` (a dataclass of the kind's settings, validated in ``__post_init__``),
    implement :meth:`embed` and declare the input keys they read in ``input_keys`` (required) and
    ``optional_input_keys``. The base class adds the learned modality-type embedding to every token and
    zeroes the tokens that the keep-mask drops, so the values found in padding never matter.
    """

    kind: ClassVar[str]
    config_class: ClassVar[type]
    input_keys: ClassVar[tuple[str, ...]] = ()
    optional_input_keys: ClassVar[tuple[str, ...]] = ()
    vocabulary_embeddings: ClassVar[dict[str, str | tuple[str, ...]]] = {}
    """Config size field -> the ``nn.Embedding`` attribute(s) it sizes (e.g. ``{"num_genes": "gene_embeddings"}``;
    a tuple where several tables are indexed by the same ids, an attribute that is ``None`` or absent in this
    configuration being skipped): the vocabularies :meth:`resize_vocabulary` can grow when the processor's
    vocabulary is extended."""

    def __init__(self, name: str, config: Any, d_input: int) -> None:
        super().__init__()
        self.name = name
        self.config = config
        self.d_input = d_input
        self.type_embedding = nn.Parameter(torch.zeros(d_input))

    @torch.no_grad()
    def resize_vocabulary(self, sizes: dict[str, int], std: float) -> dict[str, tuple[int, int]]:
        """Grow vocabulary embeddings to ``sizes`` (config field -> new size), like transformers'
        ``resize_token_embeddings``: existing rows are kept bit-identical, new rows drawn from ``N(0, std)`` (the
        embedding initialisation of ``_init_weights``), and the config field updated. Returns ``{field: (old,
        new)}`` of the grown ones; shrinking is refused."""
        grown = {}
        for key, new in sizes.items():
            if key not in self.vocabulary_embeddings:
                raise ValueError(
                    f"modality {self.name!r} (kind {self.kind!r}) has no resizable vocabulary {key!r}; it has "
                    f"{sorted(self.vocabulary_embeddings)}"
                )
            attrs = self.vocabulary_embeddings[key]
            attrs = (attrs,) if isinstance(attrs, str) else tuple(attrs)
            tables = {a: t for a in attrs if (t := getattr(self, a, None)) is not None}
            old = getattr(self.config, key)
            if new < old:
                raise ValueError(f"modality {self.name!r}: cannot shrink {key} from {old} to {new}")
            if new == old:
                continue
            for attr, old_emb in tables.items():
                emb = nn.Embedding(new, old_emb.embedding_dim, device=old_emb.weight.device, dtype=old_emb.weight.dtype)
                emb.weight[:old] = old_emb.weight
                nn.init.normal_(emb.weight[old:], std=std)
                emb.weight.requires_grad_(old_emb.weight.requires_grad)
                setattr(self, attr, emb)
            setattr(self.config, key, new)
            grown[key] = (old, new)
        return grown

    def embed(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def value_queries(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For masked-value reconstruction in pretraining (``loss.reconstruction``): each token's *identity*
        embedding without its value ``(B, N, d_input)`` (all a decoder may know of a hidden token), its value as the
        target ``(B, N)``, and which tokens have a value to reconstruct ``(B, N)`` bool (real tokens with a numeric
        value). Kinds whose tokens are (id, value) pairs implement it; the others cannot be reconstructed."""
        raise NotImplementedError(
            f"modality {self.name!r} (kind {self.kind!r}) has no (id, value) tokens to reconstruct; "
            "loss.reconstruction needs a subset modality of a kind that has them (omics, tabular)"
        )

    @classmethod
    def reconstructs_values(cls) -> bool:
        """Whether the kind implements :meth:`value_queries`."""
        return cls.value_queries is not ModalityEmbedder.value_queries

    def apply_trainability(self) -> None:
        """Re-apply the embedder's own ``requires_grad`` settings (e.g. a frozen pretrained encoder) after a caller
        unfroze the whole model; nothing by default."""

    def matmul_flops(self, inputs: dict[str, torch.Tensor]) -> tuple[float, float]:
        """Forward matmul FLOPs of this embedder's linear/conv layers on a batch (lookups and additions are not
        counted), and the part of them done by layers fed with constants (raw pixels / signal samples, Fourier
        features of positions): their backward has no input gradient, so it costs 1x their forward, not 2x."""
        raise NotImplementedError(f"no FLOP formula for modality kind {self.kind!r}")

    def frozen_fingerprint(self) -> str | None:
        """SHA-256 of the weights of this embedder's frozen encoder, when it has one whose outputs may be computed
        once and stored (:mod:`bioperceiver.data.shards`, ``--cache_features``); ``None`` (the default) otherwise."""
        return None

    def frozen_features(self, arrays: dict[str, Any]) -> dict[str, Any]:
        """One processed sample's arrays (numpy, no batch axis) -> the arrays that replace them when the frozen
        encoder's outputs are cached; :meth:`embed` must accept a batch of them and give the same tokens."""
        raise NotImplementedError(f"modality kind {self.kind!r} has no frozen encoder whose outputs can be cached")

    def check_inputs(self, inputs: dict[str, torch.Tensor]) -> None:
        if not isinstance(inputs, dict):
            raise ValueError(
                f"modality {self.name!r}: expected a dict of tensors with keys {list(self.input_keys)}, "
                f"got {type(inputs).__name__}"
            )
        missing = [k for k in self.input_keys if k not in inputs]
        unknown = sorted(set(inputs) - set(self.input_keys) - set(self.optional_input_keys))
        if missing or unknown:
            raise ValueError(
                f"modality {self.name!r} (kind {self.kind!r}): missing keys {missing}, unknown keys {unknown}; "
                f"required {list(self.input_keys)}, optional {list(self.optional_input_keys)}"
            )

    def forward(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_inputs(inputs)
        tokens, keep = self.embed(inputs)  # (B, N, D_in), (B, N)
        tokens = tokens + self.type_embedding
        tokens = torch.where(keep[..., None], tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device))
        return tokens, keep

    def _mask(self, inputs: dict[str, torch.Tensor], key: str, shape: torch.Size) -> torch.Tensor:
        """Boolean keep-mask from ``inputs[key]`` (any dtype, nonzero = keep), or all-True when absent."""
        mask = inputs.get(key)
        if mask is None:
            return torch.ones(shape, dtype=torch.bool, device=inputs[self.input_keys[0]].device)
        if mask.shape != shape:
            raise ValueError(f"modality {self.name!r}: {key} has shape {tuple(mask.shape)}, expected {tuple(shape)}")
        return mask.bool()
