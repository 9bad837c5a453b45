"""Contrastive pretraining: views of each sample (each present modality alone + the fused view), a shared
projection head, and one of the losses in :mod:`bioperceiver.losses`; held-out evaluation by cross-modal retrieval
with patient-bootstrap intervals (:func:`evaluate`, :func:`retrieval_metrics`).

A new loss is one entry in :data:`LOSSES` (name -> ``nn.Module`` class taking ``(views (B, V, D), mask (B, V),
patient_ids (B,) | None)`` and returning a dict with ``loss`` and ``temperature``); the run config's ``loss.name``
is checked against it."""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.collator import select_rows
from ..data.shards import batch_to_device
from ..evaluation.bootstrap import Resampler
from ..layers import TokenValueDecoder
from ..layers.projection import build_projection_head
from ..losses import (
    ClipLoss,
    MultiViewLoss,
    SigLipLoss,
    decorrelation_loss,
    grad_cache_step,
    local_only,
    patient_index,
)
from ..modalities.registry import get_modality

logger = logging.getLogger(__name__)

LOSSES: dict[str, type[nn.Module]] = {"clip": ClipLoss, "siglip": SigLipLoss, "multiview": MultiViewLoss}
"""Contrastive losses by the name a run config's ``loss.name`` gives."""


def build_loss(name: str, view_names: list[str] | None = None, **kwargs) -> nn.Module:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    if name != "multiview" and view_names is not None:
        kwargs.setdefault("view_names", view_names)
    return LOSSES[name](**kwargs)


class ContrastivePretrainer(nn.Module):
    """Wraps a :class:`~bioperceiver.BioPerceiverModel` for contrastive pretraining.

    Views: one per configured modality (``modality_pooler_output``, absent ones masked) plus, with
    ``fused_view=True``, the fused embedding of every present modality. A shared two-layer projection head maps
    views to ``config.projection_dim`` before the loss. The backbone is saved with ``save_pretrained``, the head
    beside it (``projection_head.safetensors``, :mod:`bioperceiver.layers.projection`: ``embed --space projected``);
    the loss's temperature lives in the training state (checkpoints).

    Masked-subset views (``subset_views=K > 0``, ``multiview`` loss only): the training loss also sees, per sample
    having ``subset_modality``, ``K`` more views of that modality alone, each from a random subset of its tokens
    (``ceil(subset_fraction x tokens)``, at least one, drawn from the torch random stream: deterministic given the
    seed), run through the backbone alone. Every view of a patient is a positive under ``multiview``, so two subsets
    of one expression profile are positives, next to the modality <-> modality pairs. They are appended after the
    ``view_names`` views of :meth:`embed_views`; :meth:`views` (held-out evaluation) leaves them out. ``K = 0`` (the
    default) leaves the step exactly as without the option.

    ``decorrelation=w > 0`` adds ``w x`` :func:`~bioperceiver.losses.decorrelation_loss` of the **latent** views
    (before the projection head: what ``embed`` returns and downstream models use; the subset views too) to the
    training loss, logged as ``loss_decorrelation``: the dimensions of each view are pushed apart over the batch
    (against dimensional collapse). The held-out ``eval_loss`` stays the contrastive loss alone. ``0`` (the default)
    leaves the step exactly as without it.

    ``reconstruction=w > 0`` (needs ``subset_views``) adds ``w x`` a masked-value reconstruction term, logged as
    ``loss_reconstruction``: every subset view also predicts the values of the tokens it hid (the genes of a profile
    left out of that subset) from its latents, through a :class:`~bioperceiver.layers.TokenValueDecoder` whose
    queries are the hidden tokens' identity embeddings (the embedder's ``value_queries``: a gene's embedding, not its
    value); mean squared error over all hidden tokens of the batch (computed per process). A masked autoencoder's
    objective (He et al. 2022; the masked expression modelling of scGPT / Geneformer) beside the contrastive one:
    the latents must keep what predicts the rest of the profile, the variance a principal-component baseline
    captures, not only what tells one patient from another. The decoder is pretraining-only (kept in checkpoints,
    not in ``final/``). The held-out ``eval_loss`` stays the contrastive loss alone. ``0`` (the default) builds no
    decoder and leaves the step exactly as without it.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str = "clip",
        fused_view: bool = True,
        leave_one_out: float = 0.0,
        subset_views: int = 0,
        subset_modality: str | None = None,
        subset_fraction: float = 0.5,
        decorrelation: float = 0.0,
        reconstruction: float = 0.0,
        **loss_kwargs,
    ):
        super().__init__()
        self.model = model
        cfg = model.config
        self.fused_view = fused_view
        self.view_names = [*cfg.modality_names, *(["fused"] if fused_view else [])]
        self.projection = build_projection_head(cfg.d_latents, cfg.projection_dim)
        self.loss_name = loss
        self.loss_fn = build_loss(loss, self.view_names, **loss_kwargs)
        if leave_one_out < 0:
            raise ValueError(f"leave_one_out is a loss weight and must be >= 0, got {leave_one_out}")
        self.leave_one_out = float(leave_one_out)
        # own temperature (and bias for SigLIP): "one modality vs the rest" is a different matching problem
        self.loo_loss_fn = build_loss(loss, ["held_out", "rest"], **loss_kwargs) if leave_one_out else None
        self.subset_views = int(subset_views)
        self.subset_modality = subset_modality
        self.subset_fraction = float(subset_fraction)
        if not decorrelation >= 0:
            raise ValueError(f"decorrelation is a loss weight and must be >= 0, got {decorrelation}")
        self.decorrelation = float(decorrelation)
        if self.subset_views < 0:
            raise ValueError(f"subset_views is a number of extra views and must be >= 0, got {subset_views}")
        if self.subset_views:
            if loss != "multiview":
                raise ValueError(
                    f"subset_views needs the multiview loss (any number of views of a patient are positives); got "
                    f"loss {loss!r}: set loss.name=multiview or loss.subset_views=0"
                )
            if subset_modality not in cfg.modality_names:
                raise ValueError(
                    f"subset_views: subset_modality must be one of the model's modalities {cfg.modality_names}, got "
                    f"{subset_modality!r}"
                )
            if not 0 < self.subset_fraction < 1:
                raise ValueError(f"subset_fraction is the share of tokens kept, in (0, 1); got {subset_fraction}")
        if not reconstruction >= 0:
            raise ValueError(f"reconstruction is a loss weight and must be >= 0, got {reconstruction}")
        self.reconstruction = float(reconstruction)
        self.reconstruction_decoder = None
        if self.reconstruction:
            if not self.subset_views:
                raise ValueError(
                    "reconstruction predicts the tokens a subset view hides, so it needs subset_views > 0 (and the "
                    "multiview loss); set loss.subset_views or loss.reconstruction=0"
                )
            embedder = model.embedders[subset_modality]
            if not embedder.reconstructs_values():
                raise ValueError(
                    f"reconstruction: modality {subset_modality!r} (kind {embedder.kind!r}) has no (id, value) tokens "
                    "to reconstruct; choose an omics or tabular loss.subset_modality or set loss.reconstruction=0"
                )
            self.reconstruction_decoder = TokenValueDecoder(
                d_query=cfg.d_input,
                d_latents=cfg.d_latents,
                num_heads=cfg.num_cross_attention_heads,
                widening_factor=cfg.cross_attention_widening_factor,
                eps=cfg.layer_norm_eps,
            )

    def _encode(self, inputs: dict[str, Any]):
        return self.model(inputs=inputs, return_modality_embeddings=True, return_leave_one_out=bool(self.loo_loss_fn))

    def _latent_views(self, out) -> tuple[torch.Tensor, torch.Tensor]:
        views, mask = out.modality_pooler_output, out.modality_mask.bool()
        if self.fused_view:
            views = torch.cat([views, out.pooler_output[:, None]], dim=1)
            mask = torch.cat([mask, mask.any(dim=1, keepdim=True)], dim=1)
        return views, mask

    def _views_from(self, out) -> tuple[torch.Tensor, torch.Tensor]:
        views, mask = self._latent_views(out)
        return self.projection(views), mask

    def views(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected views ``(B, V, projection_dim)`` in ``view_names`` order and their mask ``(B, V)``."""
        return self._views_from(self.model(inputs=inputs, return_modality_embeddings=True))

    def forward(self, inputs: dict[str, Any], patient_id: list[str] | None = None, **_: Any) -> dict[str, torch.Tensor]:
        emb = self.embed_views(inputs)
        pid = patient_index(patient_id, device=emb["views"].device) if patient_id is not None else None
        return self.loss_from(emb, pid)

    def embed_views(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Everything the loss needs from a batch, row-aligned with it: projected ``views (B, V, P)`` and their
        ``mask (B, V)``; with leave-one-out also ``rest (B, K, P)`` (projected fused view of the other modalities)
        and ``rest_mask (B, K)``. Gradient caching embeds a batch in chunks through this."""
        out = self._encode(inputs)
        latents, mask = self._latent_views(out)
        views = self.projection(latents)
        emb = {}
        if self.subset_views:
            sub = self._subset_views(inputs, with_latents=bool(self.decorrelation))
            views, mask = torch.cat([views, sub["views"]], dim=1), torch.cat([mask, sub["mask"]], dim=1)
            if self.decorrelation:
                latents = torch.cat([latents, sub["latents"]], dim=1)
            if self.reconstruction:
                emb["reconstruction_sse"], emb["reconstruction_count"] = sub["sse"], sub["count"]
        emb.update(views=views, mask=mask)
        if self.decorrelation:
            emb["latents"] = latents  # (B, V, D), before the head: what the decorrelation term sees
        if self.loo_loss_fn is not None:
            emb["rest"] = self.projection(out.leave_one_out_pooler_output)  # (B, K, P)
            emb["rest_mask"] = out.leave_one_out_mask.bool()
        return emb

    def subset_masks(self, keep: torch.Tensor) -> torch.Tensor:
        """``subset_views`` random token subsets of every row of ``keep (b, N)`` (real tokens True): ``(K, b, N)``,
        each keeping ``ceil(subset_fraction x real tokens)`` (at least one) of the row's real tokens."""
        n_keep = torch.ceil(keep.sum(1) * self.subset_fraction).clamp(min=1)  # (b,)
        masks = []
        for _ in range(self.subset_views):
            score = torch.rand(keep.shape, device=keep.device).masked_fill(~keep, 2.0)  # padding ranks last
            rank = score.argsort(dim=1).argsort(dim=1)  # (b, N) rank of each token's draw in its row
            masks.append(keep & (rank < n_keep[:, None]))
        return torch.stack(masks)

    def subset_views_of(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected masked-subset views ``(B, K, P)`` of ``subset_modality`` and their mask ``(B, K)`` (samples
        having the modality): the ``K`` subsets of all those samples go through the backbone in one call."""
        sub = self._subset_views(inputs, with_latents=False)
        return sub["views"], sub["mask"]

    def _subset_views(self, inputs: dict[str, Any], with_latents: bool = True) -> dict[str, torch.Tensor]:
        """:meth:`subset_views_of`'s ``views`` and ``mask``; with ``with_latents`` also ``latents``, the same views
        before the head ``(B, K, D)`` (zeros where absent, as the projected ones); with ``reconstruction`` also, per
        batch row, ``sse`` ``(B,)`` (squared error of the predicted values of the tokens its subsets hid, summed over
        its ``K`` subsets), ``count`` ``(B,)`` (how many hidden tokens that sums over; float, no gradient) and
        in eval mode ``sse_mean`` (scalar, no gradient: the squared error of predicting every hidden value as 0, the
        training mean of a z-scored value, for held-out evaluation)."""
        name = self.subset_modality
        arrays = inputs.get(name)
        first = next(v for v in inputs.values() if v is not None)
        b = next(iter(first.values())).shape[0]
        device = next(self.projection.parameters()).device
        k = self.subset_views
        if arrays is None:
            return self._no_subset_views(b, device, with_latents)
        key = get_modality(self.model.config.modalities[name]["kind"]).mask_key
        if key not in arrays or arrays[key].dim() != 2:
            raise ValueError(
                f"subset_views: modality {name!r} has no per-token keep-mask {key!r} of shape (B, N) in its batch "
                f"arrays ({sorted(arrays)}); choose a tokenised modality (omics, tabular, text, signal) as "
                "loss.subset_modality"
            )
        keep = arrays[key].bool()  # (B, N)
        rows = keep.any(dim=1).nonzero().flatten()
        if rows.numel() == 0:
            return self._no_subset_views(b, device, with_latents)
        masks = self.subset_masks(keep[rows])  # (K, b_m, N)
        sub = {a: torch.cat([v[rows]] * k) for a, v in arrays.items() if a != key}
        sub[key] = masks.reshape(-1, keep.shape[1]).to(arrays[key].dtype)
        out = self.model(inputs={name: sub})
        pooled = out.pooler_output  # (K * b_m, D)
        proj = self.projection(pooled).reshape(k, rows.numel(), -1).transpose(0, 1)  # (b_m, K, P)
        mask = torch.zeros(b, k, dtype=torch.bool, device=keep.device)
        mask[rows] = True
        result = {"views": proj.new_zeros(b, k, proj.shape[-1]).index_put((rows,), proj), "mask": mask}
        if with_latents:
            pooled = pooled.reshape(k, rows.numel(), -1).transpose(0, 1)  # (b_m, K, D)
            result["latents"] = pooled.new_zeros(b, k, pooled.shape[-1]).index_put((rows,), pooled)
        if self.reconstruction:
            sub[key] = torch.cat([arrays[key][rows]] * k)  # every real token: the queries of the hidden ones
            queries, targets, has_value = self.model.embedders[name].value_queries(sub)
            hidden = has_value & ~masks.reshape(-1, keep.shape[1]).bool()  # (K * b_m, N)
            pred = self.reconstruction_decoder(queries, out.last_hidden_state)  # (K * b_m, N)
            err = (pred.float() - targets.float()).square().masked_fill(~hidden, 0.0)
            sse = err.sum(dim=1).reshape(k, -1).sum(dim=0)  # (b_m,) over the row's K subsets
            count = hidden.sum(dim=1).reshape(k, -1).sum(dim=0).float()
            result["sse"] = sse.new_zeros(b).index_put((rows,), sse)
            result["count"] = count.new_zeros(b).index_put((rows,), count)
            if not self.training:  # held-out evaluation's reference, not needed by a training step
                result["sse_mean"] = targets.float().square().masked_fill(~hidden, 0.0).sum().detach()
        return result

    def _no_subset_views(self, b: int, device: torch.device, with_latents: bool) -> dict[str, torch.Tensor]:
        """:meth:`_subset_views` of a batch in which no row has the subset modality: all masked, zero error (an
        exact zero that still touches the decoder, so DDP sees every parameter used)."""
        k, p, d = self.subset_views, self.model.config.projection_dim, self.model.config.d_latents
        result = {
            "views": torch.zeros(b, k, p, device=device),
            "mask": torch.zeros(b, k, dtype=torch.bool, device=device),
        }
        if with_latents:
            result["latents"] = torch.zeros(b, k, d, device=device)
        if self.reconstruction:
            touch = sum(q.sum() for q in self.reconstruction_decoder.parameters()) * 0.0
            result["sse"] = torch.zeros(b, device=device) + touch
            result["count"] = torch.zeros(b, device=device)
            if not self.training:
                result["sse_mean"] = torch.zeros((), device=device)
        return result

    def loss_from(self, emb: dict[str, torch.Tensor], pid: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The contrastive loss (plus the weighted leave-one-out, decorrelation and reconstruction terms) of
        :meth:`embed_views`' output."""
        views, mask = emb["views"], emb["mask"]
        result = self.loss_fn(views, mask, pid)
        result["num_views"] = mask.sum().detach()
        if self.loo_loss_fn is not None:
            loo = self.leave_one_out_loss(views, emb["rest"], emb["rest_mask"], pid)
            result.update(loo)
            result["loss"] = result["loss"] + self.leave_one_out * loo["loss_loo"]
        if self.decorrelation:
            decor = decorrelation_loss(emb["latents"], mask)
            result["loss_decorrelation"] = decor.detach()
            result["loss"] = result["loss"] + self.decorrelation * decor
        if self.reconstruction:
            rec = emb["reconstruction_sse"].sum() / emb["reconstruction_count"].sum().clamp(min=1.0)
            result["loss_reconstruction"] = rec.detach()
            result["loss"] = result["loss"] + self.reconstruction * rec
        return result

    def grad_cached_step(
        self,
        inputs: dict[str, Any],
        patient_id: list[str] | None,
        chunks: list[list[int]],
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """The training step of :meth:`forward` + backward over the whole batch, embedded ``chunks`` (lists of batch
        rows, e.g. :func:`~bioperceiver.data.sampler.token_budget_chunks`) one at a time with gradient caching
        (:func:`~bioperceiver.losses.grad_cache_step`; ``kwargs``: its ``backward``, ``before_backward``,
        ``autocast``). Accumulates the parameter gradients of the un-chunked step; returns the detached loss dict."""
        pid = None
        if patient_id is not None:
            pid = patient_index(patient_id, device=next(self.parameters()).device)
        kinds = {name: cfg["kind"] for name, cfg in self.model.config.modalities.items()}
        parts = _LazyRows(inputs, chunks, kinds)  # each cut to its own longest row, made when embedded
        return grad_cache_step(self.embed_views, parts, chunks, lambda emb: self.loss_from(emb, pid), **kwargs)

    def leave_one_out_loss(
        self, views: torch.Tensor, rest: torch.Tensor, rest_mask: torch.Tensor, pid: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """For every modality ``k``: its own view against the fused view of the sample's *other* modalities
        (``rest (B, K, P)``, ``rest_mask (B, K)``), with the same loss family (own temperature), averaged over
        modalities. Every rank runs the same sequence of loss calls (one per configured modality, rows of samples
        lacking ``k`` or anything else are masked), so the distributed gathers stay in step even when ranks hold
        different modalities."""
        terms: dict[str, torch.Tensor] = {}
        total, n = views.new_zeros(()), 0
        for k, name in enumerate(self.model.config.modality_names):
            pair = torch.stack([views[:, k], rest[:, k]], dim=1)
            pair_mask = torch.stack([rest_mask[:, k], rest_mask[:, k]], dim=1)
            res = self.loo_loss_fn(pair, pair_mask, pid)
            if int(res["num_pairs"] if "num_pairs" in res else res["num_anchors"]):
                terms[f"loss_loo_{name}"] = res["loss"].detach()
                total, n = total + res["loss"], n + 1
            else:
                total = total + res["loss"]  # an exact zero that still touches the graph (DDP)
        terms["loss_loo"] = total / max(n, 1)
        terms["loo_temperature"] = res["temperature"]
        return terms


class _LazyRows:
    """The inputs of each micro-batch (:func:`~bioperceiver.data.collator.select_rows`, cut to its own longest
    row), made when it is embedded and dropped after: one micro-batch's copy at a time, not a second copy of the
    whole batch (a batch's image tensor holds every row, present or not)."""

    def __init__(self, inputs, chunks, kinds):
        self.inputs, self.chunks, self.kinds = inputs, chunks, kinds

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int):
        return select_rows(self.inputs, self.chunks[i], self.kinds)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def is_decayed(name: str, dim: int) -> bool:
    """Whether :func:`parameter_groups` puts a parameter in the weight-decay group: not biases, norms, embeddings,
    latents or the loss's temperature/bias."""
    lowered = name.lower()
    return not (dim < 2 or "norm" in lowered or "embedding" in lowered or name.endswith("latents") or "loss_fn" in name)


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay for biases, norms, embeddings, latents and temperatures/biases of losses
    (:func:`is_decayed`); each group keeps ``module.named_parameters()`` order."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (decay if is_decayed(name, p.dim()) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def rows_with_gradient(exp_avg_sq: torch.Tensor) -> torch.Tensor:
    """Per row of an embedding table, from its AdamW second-moment estimate: did the row ever get a gradient? (The
    estimate of a row stays exactly 0 until it does.)"""
    return exp_avg_sq.abs().sum(dim=1) > 0


TRAINED_ROWS_FILE = "trained_vocabulary_rows.safetensors"  # in final/: which vocabulary rows pretraining trained


def _gathered(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole: a ``DTensor`` (FSDP2's sharded parameters and optimizer state) is gathered from every
    process (a collective); a local tensor is returned as it is. Read locally, a row-sharded state would count only
    this process's rows (FSDP2 on 2 processes: 3 of the 4 trained rows on rank 0)."""
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


def _is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed support: no DTensor can exist
        return False
    return isinstance(tensor, DTensor)


def _all_succeeded(ok: bool, device) -> bool:
    """Whether every process of the default group got ``ok`` (one all-reduce, a collective every process must join):
    a process that failed before a collective tells the others, who would otherwise wait in it for ever."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return ok
    flag = torch.tensor([0 if ok else 1], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return not bool(flag.item())


def trained_vocabulary_masks(model: nn.Module, optimizer) -> dict[str, torch.Tensor]:
    """Per vocabulary embedding table of ``model``'s embedders (gene, tabular feature and category embeddings), keyed
    ``"<modality>.<attribute>"``: a boolean mask of the rows that got a gradient during training (AdamW's
    second-moment estimate of the row is not 0). A row that never did still holds its random initialisation: with
    ``top_k`` omics tokens, a gene no training profile ranks that high. Tables the optimizer keeps no per-parameter
    state for (DeepSpeed, FSDP flat parameters) are left out. Under FSDP2 each process holds the state of a shard of
    the rows (a ``DTensor``): each reduces its rows to flags and the flags are gathered, a collective: every process
    must call this, as it calls ``accelerator.get_state_dict``, and every one gets the full masks. The processes first
    agree that each reduced its rows (an all-reduce): if one failed, every one raises instead of the others waiting in
    the gather."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    state = getattr(inner, "state", None)
    if state is None:
        return {}
    managed = {id(p) for g in getattr(inner, "param_groups", []) for p in g["params"]}
    tables = []  # (key, weight): decided by the model and optimizer alone, the same on every process
    for name, emb in getattr(model, "embedders", {}).items():
        for attrs in getattr(emb, "vocabulary_embeddings", {}).values():
            for attr in (attrs,) if isinstance(attrs, str) else attrs:
                weight = getattr(getattr(emb, attr, None), "weight", None)
                if weight is not None and id(weight) in managed:
                    tables.append((f"{name}.{attr}", weight))
    sharded = [weight for _, weight in tables if _is_dtensor(weight)]
    flags: dict[str, torch.Tensor] = {}
    error: Exception | None = None
    try:
        for key, weight in tables:
            second = state.get(weight, {}).get("exp_avg_sq")
            if second is None:  # in the optimizer, never a gradient
                flags[key] = torch.zeros(weight.shape[0], dtype=torch.uint8)
            elif tuple(second.shape) == tuple(weight.shape):  # a DTensor's shape is the whole table's
                flags[key] = rows_with_gradient(second).to(torch.uint8)  # this process's rows (a DTensor's own shard)
    except Exception as err:  # raised below, once the others know
        error = err
    if sharded and not _all_succeeded(error is None, sharded[0].device):
        message = "a process could not reduce its rows of the vocabulary tables; every process stops here"
        raise RuntimeError(message) from error
    if error is not None:
        raise error
    # only the per-row flags are gathered (as bytes); a local tensor is returned as it is
    return {key: _gathered(flag).cpu().bool() for key, flag in flags.items()}


def trained_vocabulary_rows(masks: dict[str, torch.Tensor]) -> dict[str, dict[str, int]]:
    """``{table: {"trained": rows with a gradient, "rows": rows}}`` of :func:`trained_vocabulary_masks`."""
    return {table: {"trained": int(mask.sum()), "rows": int(mask.numel())} for table, mask in masks.items()}


def save_trained_rows(masks: dict[str, torch.Tensor], folder) -> None:
    """Write :func:`trained_vocabulary_masks` beside a saved backbone (:data:`TRAINED_ROWS_FILE`, safetensors,
    one uint8 vector per table), so that finetuning can say how many of a new cohort's overlapping genes or
    features have trained embeddings."""
    from safetensors.torch import save_file

    save_file({k: v.to(torch.uint8).contiguous() for k, v in masks.items()}, str(Path(folder) / TRAINED_ROWS_FILE))


def load_trained_rows(folder) -> dict[str, np.ndarray] | None:
    """The masks :func:`save_trained_rows` wrote in ``folder`` (boolean arrays), or ``None`` when it has none (a
    backbone saved before they were recorded, or one not pretrained here)."""
    from safetensors.numpy import load_file

    path = Path(folder) / TRAINED_ROWS_FILE
    if not path.is_file():
        return None
    return {k: v.astype(bool) for k, v in load_file(str(path)).items()}


@contextlib.contextmanager
def forward_as(module: nn.Module, fn):
    """Temporarily make ``fn`` the module's ``forward``, so that calling ``module(...)`` runs it *through the hooks
    of the module* (FSDP2's root unshards its parameters in its forward hooks, ZeRO-3 gathers in every module's).
    An instance-level ``forward`` already there (accelerate's autocast wrapper) is put back afterwards."""
    previous = module.__dict__.get("forward")
    module.forward = fn
    try:
        yield module
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


@torch.no_grad()
def evaluate(
    trainer: ContrastivePretrainer,
    dataset,
    collator,
    batch_size: int,
    n_bootstrap: int = 0,
    seed: int = 0,
    device: torch.device | None = None,
) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Held-out patients: mean contrastive loss and cross-modal retrieval R@1/5/10 for every pair of views, with
    ``n_bootstrap`` percentile-bootstrap 95% intervals (queries resampled by patient).

    With ``trainer.reconstruction``, also ``eval_loss_reconstruction``: the mean squared error of the values the
    held-out profiles' subset views hide (subsets drawn from a stream seeded by ``seed`` and the batch, the same at
    every evaluation), beside ``eval_loss_reconstruction_mean``, what predicting every hidden value as 0 scores (the
    training mean of a z-scored value): below it, the decoder predicts held-out genes from the others.

    Returns ``(metrics, views (N, V, P), masks (N, V))``. Every rank calls this with the same data (ZeRO-3/FSDP
    gather parameter shards inside each forward, a collective all ranks must join); the loss is computed per
    process (``local_only``): no cross-rank gather of views."""
    reconstruction = []  # (sse, count, sse of predicting 0) per batch
    batch_pid: list[torch.Tensor | None] = [None]  # the batch's patient index: one patient's rows are not negatives

    def eval_forward(inputs):
        v, m = trainer.views(inputs)
        if getattr(trainer, "reconstruction", 0.0):  # a pretrainer with the term (stand-ins may lack the attribute)
            on_gpu = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=on_gpu):
                torch.manual_seed(seed + 7919 * len(reconstruction))
                sub = trainer._subset_views(inputs, with_latents=False)
            reconstruction.append((float(sub["sse"].sum()), float(sub["count"].sum()), float(sub["sse_mean"])))
        with local_only():  # like the training loss: a patient's other rows in the batch are not its negatives
            res = trainer.loss_fn(v, m, batch_pid[0])
            return v, m, res["loss"], res.get("uniform_loss")

    # collated on CPU, the batches go where the model computes: ``device`` (the loop passes the accelerator's, right
    # under parameter offloading too), else where its parameters are (a GPU under DDP, ZeRO-3 and FSDP2 alike)
    device = next(trainer.parameters()).device if device is None else device
    was_training = trainer.training
    trainer.eval()
    views, masks, losses, patients = [], [], [], []
    with forward_as(trainer, eval_forward):
        for start in range(0, len(dataset), batch_size):
            batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))], train=False)
            if batch is None:
                continue
            ids = batch.get("patient_id")
            batch_pid[0] = patient_index([str(p) for p in ids], device=device) if ids is not None else None
            v, m, loss, uniform = trainer(batch_to_device(batch["inputs"], device))
            losses.append((float(loss), len(v), None if uniform is None else float(uniform)))
            views.append(v.float().cpu())
            masks.append(m.cpu())
            patients += [str(p) for p in batch["patient_id"]]
    trainer.train(was_training)
    if not views:
        return {}, torch.empty(0), torch.empty(0)
    views_t, masks_t = torch.cat(views), torch.cat(masks)
    retrieval = retrieval_metrics(
        views_t, masks_t, trainer.view_names, n_bootstrap=n_bootstrap, groups=patients, seed=seed
    )
    # A contrastive loss grows with the number of candidates (about ln B for B samples): the mean is over the batches
    # of exactly ``batch_size`` samples (the training batch), a smaller last batch is left out of it (its samples
    # still count in the retrieval metrics) unless no full batch exists.
    full = [entry for entry in losses if entry[1] == batch_size]
    used = full or losses
    metrics = {
        "eval_loss": float(np.mean([loss for loss, _, _ in used])),
        "eval_loss_batch_size": batch_size if full else len(views_t),  # no full batch: the one smaller batch
        "eval_loss_batches": len(used),
        **retrieval,
    }
    if all(u is not None for _, _, u in used):  # what a uniform guess scores on the same batches (softmax losses)
        metrics["eval_loss_uniform"] = float(np.mean([u for _, _, u in used]))
    count = sum(c for _, c, _ in reconstruction)
    if count:
        metrics["eval_loss_reconstruction"] = sum(e for e, _, _ in reconstruction) / count
        metrics["eval_loss_reconstruction_mean"] = sum(z for _, _, z in reconstruction) / count
    return metrics, views_t, masks_t


RETRIEVAL_KS = (1, 5, 10)
"""The k of the held-out R@k every evaluation reports."""


@torch.no_grad()
def retrieval_metrics(
    views: torch.Tensor,
    mask: torch.Tensor,
    names: list[str],
    ks: tuple[int, ...] = RETRIEVAL_KS,
    min_pairs: int = 2,
    *,
    n_bootstrap: int = 0,
    groups=None,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, float]:
    """Cross-modal retrieval on held-out samples: for every pair of views ``(a, b)`` and each sample having both,
    rank all samples having ``b`` by cosine similarity to its ``a`` view; ``R@k`` = share of queries whose own ``b``
    view is in the top ``k`` (both directions averaged). Also reports the number of queries and chance ``R@1``.

    With ``n_bootstrap > 0``, adds a percentile bootstrap ``(1 - alpha)`` interval of each ``R@k`` as
    ``R@k_ci_low/<pair>`` and ``R@k_ci_high/<pair>``: the queries are resampled with replacement (whole groups of
    them with ``groups``, one id per row of ``views``, e.g. patient ids, so that samples of one patient are drawn
    together), the candidate set stays fixed. Deterministic for a given ``seed``."""
    if n_bootstrap and not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1) (0.05 for a 95% interval), got {alpha}")
    if groups is not None and len(groups) != len(views):
        raise ValueError(f"groups has {len(groups)} entries for {len(views)} samples; give one id per sample")
    z = torch.nn.functional.normalize(views.float(), dim=-1)
    out: dict[str, float] = {}
    k_views = len(names)
    for a in range(k_views):
        for b in range(a + 1, k_views):
            both = mask[:, a] & mask[:, b]
            if int(both.sum()) < min_pairs:
                continue
            queries, hits = retrieval_hits(z, mask, a, b, ks)
            key = f"{names[a]}-{names[b]}"
            for k in ks:
                out[f"R@{k}/{key}"] = float(hits[k].mean())
            if n_bootstrap:
                # patients as text (ids of mixed types compare as strings), the draws of evaluation.bootstrap
                q_groups = None if groups is None else np.asarray(groups, dtype=object).astype(str)[queries.numpy()]
                resampler = Resampler(len(queries), n_bootstrap, seed, q_groups)
                weights = np.concatenate(list(resampler.weights()))  # (R, Q) times each query was drawn
                for k in ks:
                    resampled = weights @ hits[k].double().numpy() / weights.sum(1)
                    low, high = np.quantile(resampled, [alpha / 2, 1 - alpha / 2])
                    out[f"R@{k}_ci_low/{key}"], out[f"R@{k}_ci_high/{key}"] = float(low), float(high)
            out[f"queries/{key}"] = int(both.sum())
            for k in ks:  # a random ranking puts the own view in the top k with probability k / candidates
                out[f"chance_R@{k}/{key}"] = chance_recall(k, int(mask[:, b].sum()), int(mask[:, a].sum()))
    return out


def retrieval_hits(
    z: torch.Tensor, mask: torch.Tensor, a: int, b: int, ks: tuple[int, ...] = RETRIEVAL_KS
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Per query of the views pair ``(a, b)`` (the samples having both): the hit rate at each ``k`` over the two
    directions (0, 0.5 or 1: its own other view in the top ``k`` of the candidates having that view, ranked by
    the dot product of the unit vectors ``z (N, V, D)``; a tie counts for the query). Returns ``(queries, {k:
    hits})``."""
    queries = torch.nonzero(mask[:, a] & mask[:, b]).squeeze(1)
    hits = {k: torch.zeros(len(queries)) for k in ks}
    for x, y in ((a, b), (b, a)):
        cand = torch.nonzero(mask[:, y]).squeeze(1)
        sim = z[queries, x] @ z[cand, y].T
        target = (cand[None, :] == queries[:, None]).float().argmax(1)
        rank = (sim > sim.gather(1, target[:, None])).sum(1)
        for k in ks:
            hits[k] += (rank < k).float() / 2
    return queries, hits


def chance_recall(k: int, candidates_b: int, candidates_a: int | None = None) -> float:
    """R@k of a random ranking: ``min(k, N) / N`` for ``N`` candidates, averaged over the two retrieval directions
    (``a -> b`` ranks the ``candidates_b`` samples having ``b``; ``b -> a`` the ``candidates_a`` having ``a``)."""
    sizes = [n for n in (candidates_b, candidates_a) if n is not None]
    return float(np.mean([min(k, n) / n if n else 0.0 for n in sizes]))


def plot_similarity(views: torch.Tensor, mask: torch.Tensor, names: list[str], a: str, b: str, path) -> bool:
    """PNG of the cosine similarity between the ``a`` and ``b`` views of held-out samples having both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ia, ib = names.index(a), names.index(b)
    both = mask[:, ia] & mask[:, ib]
    if int(both.sum()) < 2:
        return False
    z = torch.nn.functional.normalize(views[both].float(), dim=-1)
    sim = (z[:, ia] @ z[:, ib].T).numpy()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    im = ax.imshow(sim, vmin=-1, vmax=1, cmap="coolwarm")
    ax.set_xlabel(f"{b} view of sample j")
    ax.set_ylabel(f"{a} view of sample i")
    ax.set_title(f"held-out cosine similarity, {int(both.sum())} samples\n(diagonal = same sample)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _training_label(record: dict) -> str:
    """The legend of the training-patient curve: how many samples, said plainly when fewer than held out."""
    n, held = record.get(TRAIN_PATIENTS + "samples"), record.get(TRAIN_PATIENTS + "held_out_samples")
    if n is None or held is None or n >= held:
        return "as many training patients, the same evaluation"
    return f"{int(n)} training samples (all there are; {int(held)} held out), the same evaluation"


def plot_history(
    history: list[dict],
    path,
    *,
    batch_size: int | None = None,
    loss_name: str = "clip",
    dropout: float = 0.0,
    best_model: dict | None = None,
) -> None:
    """``loss_curves.png``: the training loss (one contrastive batch per logged step, with modality dropout and
    augmentation) and the held-out loss (mean over held-out batches of the same size, nothing dropped) on separate
    panels, because they are not the same quantity. The level of a uniform guess (every candidate equally similar)
    is drawn on each panel: the ``uniform_loss`` / ``eval_loss_uniform`` the loss measured on those batches (softmax
    losses: ``ln`` of the candidates per anchor, which for the multiview loss is about ``ln(B x views)``, not
    ``ln B``); for a history without them (older runs), ``ln B`` with ``batch_size`` and the ``clip`` loss. A sigmoid
    loss (``siglip``) has no such level and gets no line. When the training objective has terms beside the
    contrastive loss (``loss_loo``, ``loss_decorrelation``, ``loss_reconstruction``), the training panel says so (its
    curve is their weighted sum; the uniform level is the contrastive part's); with ``loss.reconstruction`` a third
    panel shows the reconstruction error, training and held-out, beside what predicting the mean scores held out.
    With ``eval.training_patients`` the same evaluation on as many training patients is drawn beside the held-out
    one (both panels): the objective's generalisation gap, like for like. With ``best_model``
    (``eval.load_best_model_at_end``: its ``step`` and ``metric``) a dotted line on every panel marks the step whose
    weights ``final/`` holds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [h for h in history if "eval_loss" in h]
    terms = [t for t in ADDED_TERMS if any(t in h for h in history)]
    recon = [h for h in history if "loss_reconstruction" in h or "eval_loss_reconstruction" in h]
    n = 1 + bool(evals) + bool(recon)
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n if n > 1 else 6, 4), squeeze=False)
    train_ax = axes[0, 0]
    steps = [h["step"] for h in history if "loss" in h]
    train_ax.plot(steps, [h["loss"] for h in history if "loss" in h], label="training batch")
    what = f"batches of {batch_size} samples" if batch_size else "one batch per step"
    train_ax.set_title(f"training loss ({what}" + (f", modality dropout {dropout:g})" if dropout else ")"), fontsize=10)
    if terms:  # the curve is the whole objective: say which weighted terms it adds (shown without "loss_")
        train_ax.set_ylabel(f"{loss_name} loss + weighted {', '.join(t.removeprefix('loss_') for t in terms)}")
    else:
        train_ax.set_ylabel(f"{loss_name} loss of one training batch")
    panels = [train_ax]
    if evals:
        eval_ax = axes[0, 1]
        eval_ax.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "o-", color="C1", label="held-out")
        on_train = [h for h in evals if TRAIN_PATIENTS_LOSS in h]  # eval.training_patients: the same evaluation
        if on_train:
            eval_ax.plot(
                [h["step"] for h in on_train],
                [h[TRAIN_PATIENTS_LOSS] for h in on_train],
                "s--",
                color="C2",
                label=_training_label(on_train[-1]),
            )
        size = evals[-1].get("eval_loss_batch_size", batch_size)
        eval_ax.set_title(f"held-out loss (mean over batches of {size} samples)", fontsize=10)
        eval_ax.set_ylabel(f"{loss_name} loss, held-out patients" + (" (and training ones)" if on_train else ""))
        panels.append(eval_ax)
    for ax in panels:
        level = uniform_guess_level(history, held_out=ax is not train_ax, batch_size=batch_size, loss_name=loss_name)
        if level is not None:
            part = " (contrastive part)" if terms and ax is train_ax else ""
            ax.axhline(level[0], ls="--", color="grey", lw=1, label=f"uniform guess{part}, {level[1]}")
    if recon:
        rec_ax = axes[0, n - 1]
        train = [h for h in recon if "loss_reconstruction" in h]
        rec_ax.plot([h["step"] for h in train], [h["loss_reconstruction"] for h in train], label="training batch")
        held = [h for h in recon if "eval_loss_reconstruction" in h]
        if held:
            rec_ax.plot(
                [h["step"] for h in held], [h["eval_loss_reconstruction"] for h in held], "o-", label="held-out"
            )
            key = TRAIN_PATIENTS + "eval_loss_reconstruction"
            if on_train := [h for h in held if key in h]:
                label = "training patients, the held-out evaluation"
                rec_ax.plot([h["step"] for h in on_train], [h[key] for h in on_train], "s--", label=label)
            mean = held[-1]["eval_loss_reconstruction_mean"]
            rec_ax.axhline(mean, ls="--", color="grey", lw=1, label=f"predicting the mean, held-out ({mean:.2f})")
        rec_ax.set_title("masked-value reconstruction (the genes subset views hid)", fontsize=10)
        rec_ax.set_ylabel("mean squared error, normalised values")
        panels.append(rec_ax)
    for ax in panels:
        if best_model and best_model.get("step") is not None:
            label = f"kept: step {best_model['step']} (best held-out {best_model['metric']})"
            ax.axvline(best_model["step"], ls=":", color="black", lw=1, label=label)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


TRAIN_PATIENTS = "train_patients/"
"""Prefix of the metrics ``eval.training_patients`` adds: the held-out evaluation's keys, on training patients."""
TRAIN_PATIENTS_LOSS = TRAIN_PATIENTS + "eval_loss"

ADDED_TERMS = ("loss_loo", "loss_decorrelation", "loss_reconstruction")
"""Logged terms a run may add to the contrastive loss (each weighted by its run-config setting)."""


def uniform_guess_level(
    history: list[dict], *, held_out: bool, batch_size: int | None = None, loss_name: str = "clip"
) -> tuple[float, str] | None:
    """``(level, label)`` of a uniform guess for the training (``held_out=False``) or held-out loss of ``history``:
    the mean of the recorded ``uniform_loss`` (``eval_loss_uniform``) when the loss measured it, else ``ln B`` for
    the ``clip`` loss with a known batch size (histories written before the level was recorded), else ``None``."""
    key = "eval_loss_uniform" if held_out else "uniform_loss"
    values = [h[key] for h in history if key in h]
    if values:
        return float(np.mean(values)), f"{float(np.mean(values)):.2f} (measured on these batches)"
    size = batch_size
    if held_out:
        evals = [h for h in history if "eval_loss" in h]
        size = evals[-1].get("eval_loss_batch_size", batch_size) if evals else batch_size
    if size and loss_name == "clip":
        return math.log(size), f"ln {size}"
    return None
