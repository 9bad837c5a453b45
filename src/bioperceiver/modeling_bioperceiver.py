"""BioPerceiver: a Perceiver encoder shared by any subset of modalities.

Data flow (shapes per batch of B samples)::

    per-modality arrays --embedder--> tokens (B, N_m, D_in) + keep-mask (B, N_m)     for each present modality
    concat over modalities          -> tokens (B, N, D_in)   + keep-mask (B, N)
    latents (M, D) --cross-attend to tokens--> (B, M, D) --L self-attention blocks--> latents (B, M, D)
    mean over latents               -> pooled embedding (B, D)

The same encoder also produces one embedding per **view**: each present modality alone, next to the fused view
of all present modalities (used by contrastive pretraining). Single-device code only: DDP/FSDP/DeepSpeed,
compilation and mixed precision are applied from the training scripts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_bioperceiver import BioPerceiverConfig
from .layers import CrossAttentionBlock, PackedTokens, ScalarEncoder, SelfAttentionBlock
from .modalities import ModalityEmbedder, get_embedder_class

ModalityInputs = dict[str, dict[str, torch.Tensor] | None]


@dataclass
class BioPerceiverModelOutput(ModelOutput):
    """Output of :class:`BioPerceiverModel`.

    Args:
        last_hidden_state: fused latents ``(B, M, D)`` after the final LayerNorm.
        pooler_output: fused-view embedding ``(B, D)`` (mean over latents).
        modality_pooler_output: ``(B, K, D)`` one embedding per configured modality (``config.modality_names``
            order) computed from that modality alone; zeros where the sample lacks the modality. Only with
            ``return_modality_embeddings=True``.
        modality_mask: ``(B, K)`` bool, which modalities each sample has (always returned).
        leave_one_out_pooler_output: ``(B, K, D)``: for modality ``k``, the fused embedding of every *other*
            modality the sample has (``k``'s tokens masked out of cross-attention); zeros where the sample lacks
            ``k`` or has nothing else (see ``leave_one_out_mask``). Only with ``return_leave_one_out=True``.
        leave_one_out_mask: ``(B, K)`` bool, samples having modality ``k`` and at least one other.
        hidden_states: latents after every block, when ``output_hidden_states=True``.
        cross_attentions: cross-attention probabilities ``(B, H, M, N)`` per cross-attention call over the
            concatenated tokens (order of ``token_modality``), when ``output_attentions=True``.
        attentions: latent self-attention probabilities ``(B, H, M, M)`` per layer, when ``output_attentions=True``.
        token_modality: ``(N,)`` index into ``config.modality_names`` of every concatenated token, when
            ``output_attentions=True``.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    modality_pooler_output: torch.FloatTensor | None = None
    modality_mask: torch.BoolTensor | None = None
    leave_one_out_pooler_output: torch.FloatTensor | None = None
    leave_one_out_mask: torch.BoolTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    token_modality: torch.LongTensor | None = None


class BioPerceiverCrossAttentionLayer(GradientCheckpointingLayer, CrossAttentionBlock):
    """Cross-attention block that ``gradient_checkpointing_enable()`` can checkpoint."""


class BioPerceiverSelfAttentionLayer(GradientCheckpointingLayer, SelfAttentionBlock):
    """Latent self-attention block that ``gradient_checkpointing_enable()`` can checkpoint."""


class BioPerceiverEncoder(nn.Module):
    """Learned latents -> cross-attention to the input tokens -> latent self-attention stack."""

    def __init__(self, config: BioPerceiverConfig) -> None:
        super().__init__()
        self.config = config
        d, eps = config.d_latents, config.layer_norm_eps
        self.latents = nn.Parameter(torch.empty(config.num_latents, d))
        std = config.initializer_range
        nn.init.trunc_normal_(self.latents, std=std, a=-2 * std, b=2 * std)  # also when used without a PreTrainedModel
        self.cross_layers = nn.ModuleList(
            BioPerceiverCrossAttentionLayer(
                d_latents=d,
                d_input=config.d_input,
                num_heads=config.num_cross_attention_heads,
                widening_factor=config.cross_attention_widening_factor,
                dropout=config.hidden_dropout,
                attention_dropout=config.attention_dropout,
                eps=eps,
            )
            for _ in range(config.num_cross_attention_layers)
        )
        self.self_layers = nn.ModuleList(
            BioPerceiverSelfAttentionLayer(
                dim=d,
                num_heads=config.num_self_attention_heads,
                widening_factor=config.self_attention_widening_factor,
                dropout=config.hidden_dropout,
                attention_dropout=config.attention_dropout,
                eps=eps,
            )
            for _ in range(config.num_self_attention_layers)
        )
        self.norm = nn.LayerNorm(d, eps=eps)

    def forward(
        self,
        tokens: torch.Tensor | PackedTokens,
        keep_mask: torch.Tensor | None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple, tuple, tuple]:
        """tokens (B, N, D_in), keep_mask (B, N) bool -> latents (B, M, D), hidden states, attentions.

        Packed: ``tokens`` a :class:`~bioperceiver.layers.PackedTokens` of S segments, ``keep_mask`` None ->
        latents (S, M, D); every segment's latents attend to its own tokens only (no padding)."""
        if isinstance(tokens, PackedTokens):
            rows, dtype = tokens.num_segments, tokens.tokens.dtype
        else:
            rows, dtype = tokens.shape[0], tokens.dtype
        x = self.latents.to(dtype).expand(rows, -1, -1)  # (B, M, D)
        hidden, cross, selfs = [], [], []
        for block in range(self.config.num_blocks):
            if block == 0 or self.config.repeat_cross_attention:
                for layer in self.cross_layers:
                    x, weights = layer(x, tokens, keep_mask, output_attentions)
                    cross.append(weights)
            for layer in self.self_layers:
                x, weights = layer(x, output_attentions)
                selfs.append(weights)
            if output_hidden_states:
                hidden.append(x)
        return self.norm(x), tuple(hidden), tuple(cross), tuple(selfs)


class BioPerceiverPreTrainedModel(PreTrainedModel):
    config_class = BioPerceiverConfig
    base_model_prefix = "bioperceiver"
    main_input_name = "inputs"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["BioPerceiverCrossAttentionLayer", "BioPerceiverSelfAttentionLayer"]  # noqa: RUF012 (HF API)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, BioPerceiverEncoder):
            init.trunc_normal_(module.latents, std=std, a=-2 * std, b=2 * std)
        elif isinstance(module, ScalarEncoder):
            n = module.freqs.numel()
            init.copy_(module.freqs, torch.logspace(-1.2041, 0.6021, n, dtype=module.freqs.dtype))  # 1/16 .. 4
        if isinstance(module, ModalityEmbedder):
            init.normal_(module.type_embedding, std=std)

    def resize_modality_vocabularies(self, modalities: dict[str, dict[str, Any]]) -> dict[str, dict[str, tuple]]:
        """Grow the vocabulary embeddings of the modalities (gene ids, tabular features...) to the sizes in
        ``modalities`` (``BioPerceiverConfig.modalities``-style entries, e.g. ``processor.model_modalities()`` after
        :meth:`~bioperceiver.data.BioPerceiverProcessor.extend`), as ``resize_token_embeddings`` does: existing rows
        unchanged, new rows initialised as ``_init_weights`` initialises embeddings, ``config.modalities`` updated so
        that ``save_pretrained``/``from_pretrained`` round-trip. Sizes not larger than the model's are left as they
        are. Call it before the optimizer is built. Returns ``{modality: {field: (old, new)}}`` of the grown ones."""
        backbone = self if isinstance(self, BioPerceiverModel) else getattr(self, self.base_model_prefix)
        grown_all = {}
        for name, settings in modalities.items():
            if name not in backbone.embedders:
                continue
            emb = backbone.embedders[name]
            sizes = {
                k: int(settings[k])
                for k in emb.vocabulary_embeddings
                if k in settings and int(settings[k]) > getattr(emb.config, k)
            }
            if not sizes:
                continue
            grown = emb.resize_vocabulary(sizes, std=self.config.initializer_range)
            for config in {id(self.config): self.config, id(backbone.config): backbone.config}.values():
                entry = dict(config.modalities[name])
                entry.update({k: new for k, (_, new) in grown.items()})
                config.modalities = {**config.modalities, name: entry}
            grown_all[name] = grown
        return grown_all

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        """Load as usual, then re-apply the embedders' own ``requires_grad`` settings (a frozen pretrained text
        encoder or timm backbone), which loading the weights resets."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading_info) on request
        for module in model.modules():
            if isinstance(module, ModalityEmbedder):
                module.apply_trainability()
        return loaded

    def save_pretrained(self, save_directory, *args: Any, **kwargs: Any):
        """Save as usual; a timm backbone's local ``backbone_weights`` path and a text encoder's local
        ``pretrained_encoder`` folder are not written into the saved config because the checkpoint now carries
        those weights (the directory stays loadable on any machine)."""
        original = copy.deepcopy(self.config.modalities)
        for cfg in self.config.modalities.values():
            for key in ("backbone_weights", "pretrained_encoder"):
                if cfg.get(key):
                    cfg[key] = None
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.config.modalities = original


class BioPerceiverModel(BioPerceiverPreTrainedModel):
    """The BioPerceiver backbone: modality embedders + Perceiver encoder.

    Call it with one dict of arrays per present modality, either as ``model(inputs={"text": {...}, ...})`` or
    as keyword arguments ``model(text={...}, image_cxr={...})`` (so ``model(**batch)`` works). A modality may be
    left out, be ``None``, or be present for only some samples (its keep-mask all False for the others).
    Every sample must have at least one modality.
    """

    def __init__(self, config: BioPerceiverConfig) -> None:
        super().__init__(config)
        if not config.modalities:
            raise ValueError("BioPerceiverConfig.modalities is empty; configure at least one modality")
        self.embedders = nn.ModuleDict(
            {
                name: get_embedder_class(cfg["kind"])(
                    name,
                    get_embedder_class(cfg["kind"]).config_class(**{k: v for k, v in cfg.items() if k != "kind"}),
                    config.d_input,
                )
                for name, cfg in sorted(config.modalities.items())
            }
        )
        self.encoder = BioPerceiverEncoder(config)
        self.packed = False
        self.post_init()

    def set_packed(self, enabled: bool = True) -> BioPerceiverModel:
        """Padding-free encoder passes (``True``) or the padded ``(B, N)`` batch with a keep-mask (``False``, the
        default). Packed: the real tokens of every sample are gathered into one ragged stream, and the fused view,
        the per-modality views and the leave-one-out views of all samples run as segments of **one** encoder pass
        (keys/values projected once per token); results equal the padded path to float tolerance. Attention
        probabilities (``output_attentions``) always use the padded path."""
        self.packed = bool(enabled)
        return self

    @property
    def modality_names(self) -> list[str]:
        return self.config.modality_names

    def _collect_inputs(self, inputs: ModalityInputs | None, kwargs: dict[str, Any]) -> dict[str, dict]:
        merged = dict(inputs or {})
        merged.update(kwargs)
        unknown = sorted(set(merged) - set(self.embedders))
        if unknown:
            raise ValueError(
                f"unknown modality or argument {unknown}; this model's modalities are {self.modality_names}"
            )
        present = {name: merged[name] for name in self.modality_names if merged.get(name) is not None}
        if not present:
            raise ValueError(f"no modality given; pass at least one of {self.modality_names}")
        return present

    def embed(
        self, inputs: ModalityInputs | None = None, **kwargs: Any
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Run the embedders: ``{name: (tokens (B, N_m, D_in), keep-mask (B, N_m))}`` for the given modalities."""
        collected = self._collect_inputs(inputs, kwargs)
        embedded = {name: self.embedders[name](arrays) for name, arrays in collected.items()}
        sizes = {name: tokens.shape[0] for name, (tokens, _) in embedded.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"modalities disagree on the batch size: {sizes}")
        return embedded

    def forward(
        self,
        inputs: ModalityInputs | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_modality_embeddings: bool = False,
        return_leave_one_out: bool = False,
        return_dict: bool | None = None,
        **modality_inputs: dict[str, torch.Tensor] | None,
    ) -> BioPerceiverModelOutput | tuple:
        output_attentions = bool(output_attentions)
        output_hidden_states = bool(output_hidden_states)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        embedded = self.embed(inputs, **modality_inputs)
        names = list(embedded)
        tokens = torch.cat([embedded[n][0] for n in names], dim=1)  # (B, N, D_in)
        keep = torch.cat([embedded[n][1] for n in names], dim=1)  # (B, N)
        b = tokens.shape[0]

        modality_mask = torch.zeros(b, len(self.modality_names), dtype=torch.bool, device=tokens.device)
        for name in names:
            modality_mask[:, self.modality_names.index(name)] = embedded[name][1].any(dim=1)
        empty = (~modality_mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"sample(s) at batch index {empty} have no modality present (every keep-mask is False for "
                f"{names}); drop these samples or give each at least one modality"
            )

        if self.packed and not output_attentions:
            latents, hidden, modality_pooled, loo_pooled, loo_mask = self._encode_packed(
                embedded,
                tokens,
                keep,
                modality_mask,
                return_modality_embeddings,
                return_leave_one_out,
                output_hidden_states,
            )
            out = BioPerceiverModelOutput(
                last_hidden_state=latents,
                pooler_output=latents.mean(dim=1),
                modality_pooler_output=modality_pooled,
                modality_mask=modality_mask,
                leave_one_out_pooler_output=loo_pooled,
                leave_one_out_mask=loo_mask,
                hidden_states=hidden if output_hidden_states else None,
            )
            return out if return_dict else out.to_tuple()

        latents, hidden, cross, selfs = self.encoder(tokens, keep, output_attentions, output_hidden_states)
        pooled = latents.mean(dim=1)  # (B, D)

        modality_pooled = None
        if return_modality_embeddings:
            modality_pooled = latents.new_zeros(b, len(self.modality_names), latents.shape[-1])  # (B, K, D)
            for name in names:
                k = self.modality_names.index(name)
                rows = modality_mask[:, k].nonzero().flatten()  # samples that have this modality
                if rows.numel() == 0:
                    continue
                view_tokens, view_keep = embedded[name]
                view_latents = self.encoder(view_tokens[rows], view_keep[rows])[0]  # (b_k, M, D)
                modality_pooled = modality_pooled.index_put((rows, torch.full_like(rows, k)), view_latents.mean(dim=1))

        loo_pooled = loo_mask = None
        if return_leave_one_out:
            # fused view of all *other* modalities: the held-out modality's tokens leave the cross-attention
            loo_pooled = latents.new_zeros(b, len(self.modality_names), latents.shape[-1])
            loo_mask = torch.zeros_like(modality_mask)
            start = 0
            for name in names:
                k = self.modality_names.index(name)
                n_tok = embedded[name][0].shape[1]
                others = keep.clone()
                others[:, start : start + n_tok] = False
                start += n_tok
                loo_mask[:, k] = modality_mask[:, k] & others.any(dim=1)
                rows = loo_mask[:, k].nonzero().flatten()
                if rows.numel() == 0:
                    continue
                rest_latents = self.encoder(tokens[rows], others[rows])[0]
                loo_pooled = loo_pooled.index_put((rows, torch.full_like(rows, k)), rest_latents.mean(dim=1))

        token_modality = None
        if output_attentions:
            token_modality = torch.cat(
                [
                    torch.full((embedded[n][0].shape[1],), self.modality_names.index(n), device=tokens.device)
                    for n in names
                ]
            )
        out = BioPerceiverModelOutput(
            last_hidden_state=latents,
            pooler_output=pooled,
            modality_pooler_output=modality_pooled,
            modality_mask=modality_mask,
            leave_one_out_pooler_output=loo_pooled,
            leave_one_out_mask=loo_mask,
            hidden_states=hidden if output_hidden_states else None,
            cross_attentions=cross if output_attentions else None,
            attentions=selfs if output_attentions else None,
            token_modality=token_modality,
        )
        return out if return_dict else out.to_tuple()

    def _encode_packed(
        self,
        embedded: dict[str, tuple[torch.Tensor, torch.Tensor]],
        tokens: torch.Tensor,
        keep: torch.Tensor,
        modality_mask: torch.Tensor,
        return_modality_embeddings: bool,
        return_leave_one_out: bool,
        output_hidden_states: bool,
    ):
        """Every requested view of every sample as one segment of a single padding-free encoder pass.

        Segments, in order: the fused view of each sample (all its real tokens), then for each present modality the
        samples having it (that modality's tokens), then for each modality the samples having it and something else
        (their other tokens). The key stream is the sample-major list of real tokens; views index into it."""
        names = list(embedded)
        b, n, _ = tokens.shape
        dev = tokens.device
        k_all = len(self.modality_names)
        pos_modality = torch.cat(
            [torch.full((embedded[nm][0].shape[1],), self.modality_names.index(nm), device=dev) for nm in names]
        )  # (N,)
        flat = tokens[keep]  # (T, D_in): sample b's tokens contiguous, modalities in `names` order
        tok_modality = pos_modality.expand(b, n)[keep]  # (T,)
        counts = keep.sum(dim=1)  # (B,)
        mod_counts = {nm: embedded[nm][1].sum(dim=1) for nm in names}  # (B,) each
        parts, lengths, slots = [], counts.tolist(), []  # slots: (kind, k, rows)
        if return_modality_embeddings:
            for nm in names:
                k = self.modality_names.index(nm)
                rows = modality_mask[:, k].nonzero().flatten()
                if rows.numel():
                    parts.append((tok_modality == k).nonzero().flatten())
                    lengths += mod_counts[nm][rows].tolist()
                    slots.append(("modality", k, rows))
        loo_mask = None
        if return_leave_one_out:
            loo_mask = torch.zeros_like(modality_mask)
            sample_of = torch.repeat_interleave(torch.arange(b, device=dev), counts)  # (T,)
            for nm in names:
                k = self.modality_names.index(nm)
                others = counts - mod_counts[nm]
                loo_mask[:, k] = modality_mask[:, k] & (others > 0)
                rows = loo_mask[:, k].nonzero().flatten()
                if rows.numel():
                    parts.append((loo_mask[:, k][sample_of] & (tok_modality != k)).nonzero().flatten())
                    lengths += others[rows].tolist()
                    slots.append(("leave_one_out", k, rows))
        index = torch.cat([torch.arange(flat.shape[0], device=dev), *parts]) if parts else None
        packed = PackedTokens.from_segments(flat, index, lengths)
        latents_all, hidden, _, _ = self.encoder(packed, None, False, output_hidden_states)  # (S, M, D)
        latents = latents_all[:b]
        hidden = tuple(h[:b] for h in hidden)
        pooled = {
            kind: latents.new_zeros(b, k_all, latents.shape[-1])  # (B, K, D)
            for kind, want in (("modality", return_modality_embeddings), ("leave_one_out", return_leave_one_out))
            if want
        }
        start = b
        for kind, k, rows in slots:
            view = latents_all[start : start + rows.numel()].mean(dim=1)  # (b_k, D)
            pooled[kind] = pooled[kind].index_put((rows, torch.full_like(rows, k)), view)
            start += rows.numel()
        return latents, hidden, pooled.get("modality"), pooled.get("leave_one_out"), loo_mask


__all__ = ["BioPerceiverModel", "BioPerceiverModelOutput", "BioPerceiverPreTrainedModel"]
