"""``omics``: (gene id, value) pairs, any number of measured genes per sample."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...layers import ScalarEncoder
from ..embedder import ModalityEmbedder, require_positive

VALUE_EMBEDDINGS = ("shared", "per_gene")
GENE_FEATURE_MODES = ("add", "replace")


@dataclass
class OmicsConfig:
    """Settings of an ``omics`` modality.

    Args:
        num_genes: size of the gene vocabulary fitted by the omics processor (ids in ``[0, num_genes)``).
        num_value_bands: learned frequencies of the expression-value encoder.
        value_embedding: how a gene's value enters its token. ``"shared"`` (default): gene embedding + one value
            encoding shared by all genes, so a gene-specific effect of its value must be learned as an interaction
            downstream. ``"per_gene"``: also ``value x`` a learned vector per gene, the per-feature linear tokenizer
            of FT-Transformer (Gorishniy et al. 2021), which gives each gene's value its own direction from the first
            layer on (one more ``num_genes x d`` table).
        gene_feature_dim: ``0`` (default): a gene's identity is its learned row. ``> 0``: the processor also gives
            each token its gene's fixed feature vector (``gene_features``, annotation-derived, from the processor's
            ``gene_features_file``; set from the processor), and the identity is ``row + W @ features`` with one
            learned ``d x gene_feature_dim`` matrix ``W`` shared by all genes, so what ``W`` learns reaches genes
            that were never tokens in pretraining and genes added later.
        gene_feature_mode: with ``gene_feature_dim``: ``"add"`` (default) ``row + W @ features``; ``"replace"``: a
            gene with features is ``W @ features`` alone (its row is never read, so it never trains), a gene without
            (all-zero features: no annotation, anonymous ids) keeps its row. The model cannot learn a free identity
            per annotated gene, only what its annotation implies.
    """

    num_genes: int = 20000
    num_value_bands: int = 16
    value_embedding: str = "shared"
    gene_feature_dim: int = 0
    gene_feature_mode: str = "add"

    def __post_init__(self) -> None:
        require_positive(num_genes=self.num_genes, num_value_bands=self.num_value_bands)
        if self.gene_feature_dim < 0:
            raise ValueError(f"gene_feature_dim must be >= 0, got {self.gene_feature_dim}")
        if self.gene_feature_mode not in GENE_FEATURE_MODES:
            raise ValueError(f"gene_feature_mode must be one of {GENE_FEATURE_MODES}, got {self.gene_feature_mode!r}")
        if self.gene_feature_mode != "add" and not self.gene_feature_dim:
            raise ValueError(
                f"gene_feature_mode={self.gene_feature_mode!r} needs gene features (gene_feature_dim > 0): give the "
                "omics processor a gene_features_file, or drop the mode"
            )
        if self.value_embedding not in VALUE_EMBEDDINGS:
            raise ValueError(f"value_embedding must be one of {VALUE_EMBEDDINGS}, got {self.value_embedding!r}")


class OmicsEmbedder(ModalityEmbedder):
    """Inputs: ``gene_ids`` (B, G) int, ``values`` (B, G) float (normalised), optional ``mask`` (B, G).

    Token = gene-id embedding (+ ``W @ gene_features`` with ``gene_feature_dim``) + value encoding (+ value x a
    per-gene vector with ``value_embedding: per_gene``).
    An unmeasured gene is simply not a token (mask False);
    values are never zero-filled into the model.
    """

    kind = "omics"
    config_class = OmicsConfig
    input_keys = ("gene_ids", "values")
    optional_input_keys = ("mask", "gene_features")
    vocabulary_embeddings = {"num_genes": ("gene_embeddings", "gene_value_embeddings")}  # noqa: RUF012 (constant)

    def __init__(self, name: str, config: OmicsConfig, d_input: int) -> None:
        super().__init__(name, config, d_input)
        self.gene_embeddings = nn.Embedding(config.num_genes, d_input)
        self.value_encoder = ScalarEncoder(d_out=d_input, num_bands=config.num_value_bands)
        per_gene = config.value_embedding == "per_gene"
        self.gene_value_embeddings = nn.Embedding(config.num_genes, d_input) if per_gene else None
        dim = config.gene_feature_dim
        self.gene_feature_proj = nn.Linear(dim, d_input, bias=False) if dim else None

    def _gene_vectors(self, inputs: dict[str, torch.Tensor], ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """A token's gene identity (B, G, D): its embedding row, plus ``W @ features`` with ``gene_feature_dim``
        (``gene_feature_mode: replace``: ``W @ features`` alone where the features are not all zero)."""
        out = self.gene_embeddings(ids)
        feats = inputs.get("gene_features")
        if self.gene_feature_proj is None:
            if feats is not None:
                raise ValueError(
                    f"modality {self.name!r}: the inputs hold gene_features but this model was built without them "
                    "(gene_feature_dim 0); process the data with the processor saved with the model"
                )
            return out
        dim = self.config.gene_feature_dim
        if feats is None or tuple(feats.shape) != (*ids.shape, dim):
            got = "none" if feats is None else tuple(feats.shape)
            raise ValueError(
                f"modality {self.name!r}: this model reads {dim}-d gene features per token (gene_features of shape "
                f"{(*ids.shape, dim)}), got {got}; process the data with the processor saved with the model (its "
                "gene_features_file)"
            )
        feats = torch.where(keep[..., None], feats.to(out.dtype), torch.zeros((), dtype=out.dtype, device=out.device))
        mapped = self.gene_feature_proj(feats)
        if self.config.gene_feature_mode == "replace":
            return torch.where((feats != 0).any(-1, keepdim=True), mapped, out)
        return out + mapped

    def matmul_flops(self, inputs):
        fc1, fc2 = self.value_encoder.fc1, self.value_encoder.fc2  # its input depends on learned frequencies
        ids = inputs["gene_ids"]
        return float(ids.numel() * 2 * (fc1.in_features * fc1.out_features + fc2.in_features * fc2.out_features)), 0.0

    def embed(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, values = inputs["gene_ids"], inputs["values"]
        if ids.dim() != 2 or ids.shape != values.shape:
            raise ValueError(
                f"modality {self.name!r}: gene_ids {tuple(ids.shape)} and values "
                f"{tuple(values.shape)} must both be (B, G)"
            )
        keep = self._mask(inputs, "mask", ids.shape)
        ids = ids.masked_fill(~keep, 0)
        values = torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device))
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.config.num_genes):
            raise ValueError(
                f"modality {self.name!r}: gene ids must lie in [0, {self.config.num_genes}), found "
                f"[{int(ids.min())}, {int(ids.max())}]; refit the gene vocabulary or raise num_genes"
            )
        dtype = self.gene_embeddings.weight.dtype
        tokens = self._gene_vectors(inputs, ids, keep) + self.value_encoder(values.to(dtype))  # (B, G, D_in)
        if self.gene_value_embeddings is not None:
            tokens = tokens + values.to(dtype)[..., None] * self.gene_value_embeddings(ids)
        return tokens, keep

    def value_queries(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gene embedding (no value) as the query, the normalised value as the target, for every measured gene."""
        ids = inputs["gene_ids"]
        keep = self._mask(inputs, "mask", ids.shape)
        return self._gene_vectors(inputs, ids.masked_fill(~keep, 0), keep), inputs["values"], keep
