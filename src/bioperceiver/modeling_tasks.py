"""Task models: a BioPerceiver backbone with a lightweight head.

* :class:`BioPerceiverForSequenceClassification`: binary, multiclass, multilabel classification and regression,
  chosen by ``config.problem_type`` / ``config.num_labels`` exactly as in ``transformers``' sequence classifiers.
* :class:`BioPerceiverForSurvival`: a Cox proportional-hazards risk score (negative partial log-likelihood, Efron
  or Breslow ties), or a discrete-time (logistic) hazard head over ``config.survival_time_bins``.

Heads (``config.head_type``): ``"pooled"`` (LayerNorm + optional MLP + linear on the mean of the latents) or
``"query"`` (a Perceiver IO decoder: a learned query cross-attends to the latents, then a linear layer). Both
compute the loss when ``labels`` are given and return ``ModelOutput``s. ``latents=`` skips the backbone (cached
embeddings of a frozen backbone: linear probing without re-running the encoder every epoch).

Wide & deep (``config.head_linear_modalities``): a :class:`LinearTerm` on tabular or omics values is added to the
head's output, so covariates with a strong linear effect reach the prediction directly (with ``latents=``, pass
those modalities' inputs too).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import ModelOutput
from transformers.models.auto.auto_factory import _BaseAutoModelClass, _LazyAutoMapping

from .configuration_bioperceiver import BioPerceiverConfig
from .layers.attention import CrossAttentionBlock
from .losses.survival import cox_ph_loss, discrete_time_nll, discretize, survival_from_hazard_logits
from .modalities import get_modality
from .modeling_bioperceiver import BioPerceiverModel, BioPerceiverPreTrainedModel

HEAD_TYPES = ("pooled", "query")
SURVIVAL_LOSSES = ("cox", "discrete")


def _infer_problem_type(num_labels: int, labels: torch.Tensor) -> str:
    """transformers' rule: one label is regression, integer class indices single-label, else multi-label."""
    if num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int, torch.int16, torch.uint8) and labels.dim() == 1:
        return "single_label_classification"
    return "multi_label_classification"


def _regression_loss(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """MSE over the observed (finite) targets."""
    target = labels.float().view(logits.shape)
    observed = torch.isfinite(target)
    if not observed.any():
        return 0.0 * logits.sum()
    return F.mse_loss(logits[observed], target[observed])


def _single_label_loss(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Cross-entropy over class indices (-100 = unknown, left out)."""
    if labels.dim() != 1:
        raise ValueError(f"single-label classification needs class indices (B,), got {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < -100 or labels.max() >= num_labels):
        raise ValueError(f"class index out of range [0, {num_labels}): {labels.tolist()}")
    return F.cross_entropy(logits, labels.long(), ignore_index=-100)


def _multi_label_loss(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """BCE with logits over the known labels (-1 / -100 mark an unknown label: left out of the loss)."""
    target = labels.float().view(logits.shape)
    observed = target >= 0
    if not observed.any():
        return 0.0 * logits.sum()
    return F.binary_cross_entropy_with_logits(logits[observed], target[observed])


# transformers' problem types and their losses: the sequence classifier looks its loss up here
PROBLEM_TYPE_LOSSES = {
    "regression": _regression_loss,
    "single_label_classification": _single_label_loss,
    "multi_label_classification": _multi_label_loss,
}


@dataclass
class BioPerceiverClassifierOutput(ModelOutput):
    """``logits (B, num_labels)`` (regression: predictions), ``loss`` when labels were given, the fused
    ``pooler_output (B, D)``, ``modality_mask (B, K)`` and the latents when ``output_hidden_states``."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    modality_mask: torch.BoolTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class BioPerceiverSurvivalOutput(ModelOutput):
    """``risk (B,)``: higher = earlier event (Cox: the log hazard ratio; discrete: minus the expected number of
    bins survived). ``logits``: ``(B, 1)`` Cox risk or ``(B, T)`` discrete hazard logits; ``survival (B, T)``
    :math:`S(t_j)` at the end of every time bin (discrete head only)."""

    loss: torch.FloatTensor | None = None
    risk: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    survival: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    modality_mask: torch.BoolTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None


class PooledHead(nn.Module):
    """Mean of the latents -> LayerNorm -> [Linear -> GELU -> Dropout] -> Dropout -> Linear."""

    def __init__(self, config: BioPerceiverConfig, out_features: int):
        super().__init__()
        d, hidden = config.d_latents, config.head_hidden_size
        layers: list[nn.Module] = [nn.LayerNorm(d, eps=config.layer_norm_eps)]
        if hidden:
            layers += [nn.Linear(d, hidden), nn.GELU(), nn.Dropout(config.head_dropout)]
            d = hidden
        layers += [nn.Dropout(config.head_dropout), nn.Linear(d, out_features)]
        self.net = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.net(latents.mean(dim=1))


class QueryHead(nn.Module):
    """Perceiver IO decoder: one learned output query cross-attends to the latents, then a linear layer."""

    def __init__(self, config: BioPerceiverConfig, out_features: int):
        super().__init__()
        d = config.d_latents
        self.query = nn.Parameter(torch.zeros(1, 1, d))  # initialised by _BioPerceiverWithHead._init_weights
        self.decoder = CrossAttentionBlock(
            d_latents=d,
            d_input=d,
            num_heads=config.num_cross_attention_heads,
            widening_factor=config.cross_attention_widening_factor,
            dropout=config.head_dropout,
            attention_dropout=config.attention_dropout,
            eps=config.layer_norm_eps,
        )
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.out = nn.Sequential(nn.Dropout(config.head_dropout), nn.Linear(d, out_features))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        b, m, _ = latents.shape
        keep = torch.ones(b, m, dtype=torch.bool, device=latents.device)
        query, _ = self.decoder(self.query.expand(b, -1, -1), latents, keep)
        return self.out(self.norm(query[:, 0]))


class CoefficientTables(nn.ParameterDict):
    """One coefficient table per modality (rows: feature ids or category codes; columns: outputs). Its own class
    so that ``_init_weights`` can zero it: transformers initialises a missing parameter through the module that
    holds it directly, which is this dict, not :class:`LinearTerm`."""


class LinearTerm(nn.Module):
    """The wide part of a wide & deep head (Cheng et al. 2016): a linear model on ``config.head_linear_modalities``
    added to the head's output. Per modality one coefficient vector per id (a tabular feature, a gene: the kind's
    :class:`~bioperceiver.modalities.LinearInputs`), applied to its standardised value, and one per category code
    where the kind has categorical tokens; a token the mask hides (a missing value, an absent modality) adds
    nothing, which after the processors' standardisation is the training mean. Starts at zero (the plain head);
    :func:`bioperceiver.training.fit_linear_term` fits it on the training rows before finetuning. It reads the
    modalities' inputs, not the latents."""

    def __init__(self, config: BioPerceiverConfig, out_features: int):
        super().__init__()
        self.names = list(config.head_linear_modalities or [])
        self.reads = {name: get_modality(config.modalities[name]["kind"]).linear_inputs for name in self.names}
        self.out_features = out_features
        self.numeric = CoefficientTables()
        self.categorical = CoefficientTables()
        for name in self.names:  # zeros here; _BioPerceiverWithHead._init_weights zeroes them on every load path
            m, reads = config.modalities[name], self.reads[name]
            self.numeric[name] = nn.Parameter(torch.zeros(int(m[reads.size_key]), out_features))
            if reads.category_key:
                self.categorical[name] = nn.Parameter(torch.zeros(int(m[reads.category_size_key]), out_features))

    def forward(self, modality_inputs: dict[str, Any], batch_size: int, reference: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(batch_size, self.out_features, dtype=reference.dtype, device=reference.device)
        zero = torch.zeros((), dtype=out.dtype, device=out.device)
        for name in self.names:
            arrays = modality_inputs.get(name)
            if arrays is None:  # the modality is absent from the whole batch
                continue
            reads = self.reads[name]
            ids, values = arrays[reads.id_key], arrays["values"]
            keep = arrays.get("mask")
            keep = torch.ones_like(ids, dtype=torch.bool) if keep is None else keep.bool()
            cats = arrays.get(reads.category_key) if reads.category_key else None
            cats = torch.zeros_like(ids) if cats is None else cats.masked_fill(~keep, 0)
            ids = ids.masked_fill(~keep, 0)
            numeric = (cats == 0) & keep
            values = torch.where(numeric, values.to(out.dtype), zero)  # a hidden value may be NaN
            term = (self.numeric[name][ids] * values[..., None]).sum(dim=1)  # (B, K)
            if name in self.categorical:
                categorical = ((cats != 0) & keep).to(out.dtype)[..., None]
                term = term + (self.categorical[name][cats] * categorical).sum(dim=1)
            out = out + term
        return out

    def resize(self, grown: dict[str, dict[str, tuple[int, int]]]) -> None:
        """Grow the coefficient tables with the modalities' vocabularies (new rows zero: no effect until trained)."""
        for name, sizes in grown.items():
            if name not in self.reads:
                continue
            reads = self.reads[name]
            for key, table in ((reads.size_key, self.numeric), (reads.category_size_key, self.categorical)):
                if name in table and key in sizes:
                    old = table[name]
                    new = torch.zeros(sizes[key][1], old.shape[1], dtype=old.dtype, device=old.device)
                    new[: old.shape[0]] = old.detach()
                    table[name] = nn.Parameter(new, requires_grad=old.requires_grad)


def build_head(config: BioPerceiverConfig, out_features: int) -> nn.Module:
    if config.head_type == "pooled":
        return PooledHead(config, out_features)
    if config.head_type == "query":
        return QueryHead(config, out_features)
    raise ValueError(f"head_type={config.head_type!r}; choose one of {HEAD_TYPES}")


class _BioPerceiverWithHead(BioPerceiverPreTrainedModel):
    """Backbone + head; ``from_pretrained`` on a pretrained backbone folder loads the backbone and initialises the
    head (reported by transformers as newly initialised weights)."""

    # Losses are means over the batch; ``Trainer`` must not pass ``num_items_in_batch`` (it would reach the
    # embedders as a modality) nor skip its own gradient-accumulation scaling.
    accepts_loss_kwargs = False

    def _init_weights(self, module: nn.Module) -> None:
        """The backbone's initialisation plus the query head's learned query (truncated normal, 2 std): every load
        path initialises parameters missing from a checkpoint through here only (transformers 5 creates them on the
        meta device), so a parameter not handled here would keep uninitialised memory."""
        super()._init_weights(module)
        if isinstance(module, QueryHead):
            std = self.config.initializer_range
            init.trunc_normal_(module.query, std=std, a=-2 * std, b=2 * std)
        elif isinstance(module, CoefficientTables):
            for table in module.values():
                init.zeros_(table)

    def _build_linear_term(self, out_features: int) -> None:
        """``self.linear_term`` when the config asks for one (``head_linear_modalities``), else ``None``."""
        names = self.config.head_linear_modalities
        self.linear_term = LinearTerm(self.config, out_features) if names else None

    def _head_output(self, latent_states: torch.Tensor, inputs, modality_inputs: dict[str, Any]) -> torch.Tensor:
        out = self.head(latent_states)
        if self.linear_term is not None:
            merged = {**(inputs or {}), **modality_inputs}
            if not merged:
                raise ValueError(
                    "this model's head has a linear term on "
                    f"{self.linear_term.names}: pass their modality inputs with the precomputed `latents` (or "
                    f"`{self.linear_term.names[0]}=None` where a batch lacks them)"
                )
            out = out + self.linear_term(merged, out.shape[0], out)
        return out

    def resize_modality_vocabularies(self, modalities: dict[str, dict[str, Any]]) -> dict[str, dict[str, tuple]]:
        grown = super().resize_modality_vocabularies(modalities)
        if getattr(self, "linear_term", None) is not None:
            self.linear_term.resize(grown)
        return grown

    def _backbone(
        self,
        inputs: dict[str, Any] | None,
        latents: torch.Tensor | None,
        output_attentions: bool | None,
        output_hidden_states: bool | None,
        modality_inputs: dict[str, Any],
    ):
        if latents is not None:
            term = getattr(self, "linear_term", None)
            extra = sorted((set(inputs or {}) | set(modality_inputs)) - set(term.names if term is not None else ()))
            if extra:  # only a linear term's own modalities may come with precomputed latents
                raise ValueError(f"pass either modality inputs {extra} or precomputed `latents`, not both")
            if latents.dim() != 3 or latents.shape[-1] != self.config.d_latents:
                raise ValueError(
                    f"latents must be the backbone's last_hidden_state (B, num_latents, {self.config.d_latents}), "
                    f"got {tuple(latents.shape)}"
                )
            return latents, None
        out = self.bioperceiver(
            inputs=inputs,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **modality_inputs,
        )
        return out.last_hidden_state, out

    @staticmethod
    def _extras(out) -> dict[str, Any]:
        if out is None:
            return {}
        return {
            "pooler_output": out.pooler_output,
            "modality_mask": out.modality_mask,
            "hidden_states": out.hidden_states,
            "attentions": out.attentions,
            "cross_attentions": out.cross_attentions,
        }


class BioPerceiverForSequenceClassification(_BioPerceiverWithHead):
    """Classification or regression from any subset of modalities.

    ``config.problem_type``: ``"regression"`` (MSE; ``num_labels`` targets), ``"single_label_classification"``
    (cross-entropy; binary is ``num_labels=2``), ``"multi_label_classification"`` (BCE with logits). When unset it
    is inferred from the first labels as in transformers: ``num_labels == 1`` -> regression, integer labels ->
    single-label, float labels -> multilabel.
    """

    def __init__(self, config: BioPerceiverConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bioperceiver = BioPerceiverModel(config)
        self.head = build_head(config, config.num_labels)
        self._build_linear_term(config.num_labels)
        self.post_init()

    def forward(
        self,
        inputs: dict[str, Any] | None = None,
        labels: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **modality_inputs: Any,
    ) -> BioPerceiverClassifierOutput | tuple:
        latent_states, out = self._backbone(inputs, latents, output_attentions, output_hidden_states, modality_inputs)
        logits = self._head_output(latent_states, inputs, modality_inputs)
        loss = None
        if labels is not None:
            loss = self._loss(logits, labels)
        result = BioPerceiverClassifierOutput(loss=loss, logits=logits, **self._extras(out))
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return result if return_dict else result.to_tuple()

    @property
    def output_task(self) -> str:
        """The task these outputs solve, as a ``bioperceiver.tasks`` name (a transformers ``problem_type``; unset
        it follows transformers: one label is regression, several single-label classification)."""
        return self.config.problem_type or ("regression" if self.num_labels == 1 else "single_label_classification")

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.to(logits.device)
        if self.config.problem_type is None:
            self.config.problem_type = _infer_problem_type(self.num_labels, labels)
        loss = PROBLEM_TYPE_LOSSES.get(self.config.problem_type)
        if loss is None:
            raise ValueError(
                f"problem_type={self.config.problem_type!r} is not supported; "
                f"choose one of {sorted(PROBLEM_TYPE_LOSSES)}"
            )
        return loss(logits, labels, self.num_labels)


class BioPerceiverForSurvival(_BioPerceiverWithHead):
    """Time-to-event from any subset of modalities.

    ``labels (B, 2)``: ``[:, 0]`` the follow-up time, ``[:, 1]`` the event indicator (1 = event, 0 = censored).
    ``config.survival_loss="cox"`` (default): one output, the log hazard ratio, trained with the negative Cox
    partial log-likelihood over the batch (``config.survival_ties``: ``"efron"`` or ``"breslow"``; the risk set is
    the batch, so use batches with several events). ``"discrete"``: ``len(config.survival_time_bins) + 1`` hazard
    logits for the intervals ``(-inf, b_0], (b_0, b_1], ..., (b_last, inf)`` trained with the logistic-hazard
    likelihood.
    """

    def __init__(self, config: BioPerceiverConfig):
        super().__init__(config)
        if config.survival_loss not in SURVIVAL_LOSSES:
            raise ValueError(f"survival_loss={config.survival_loss!r}; choose one of {SURVIVAL_LOSSES}")
        if config.survival_loss == "discrete" and not config.survival_time_bins:
            raise ValueError(
                "survival_loss='discrete' needs config.survival_time_bins (cut points, e.g. quantiles of the "
                "training event times: bioperceiver.losses.make_time_bins)"
            )
        self.bioperceiver = BioPerceiverModel(config)
        out = 1 if config.survival_loss == "cox" else len(config.survival_time_bins) + 1
        self.head = build_head(config, out)
        self._build_linear_term(out)
        if config.survival_time_bins:
            self.register_buffer(
                "time_bins", torch.tensor(config.survival_time_bins, dtype=torch.float32), persistent=False
            )
        self.post_init()

    output_task = "survival"  # the bioperceiver.tasks name of these outputs

    def forward(
        self,
        inputs: dict[str, Any] | None = None,
        labels: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **modality_inputs: Any,
    ) -> BioPerceiverSurvivalOutput | tuple:
        latent_states, out = self._backbone(inputs, latents, output_attentions, output_hidden_states, modality_inputs)
        logits = self._head_output(latent_states, inputs, modality_inputs)
        survival = None
        if self.config.survival_loss == "cox":
            risk = logits[:, 0]
        else:
            survival = survival_from_hazard_logits(logits.float())
            risk = -survival.sum(dim=1)  # minus the expected number of intervals survived
        loss = None if labels is None else self._loss(logits, labels)
        result = BioPerceiverSurvivalOutput(loss=loss, risk=risk, logits=logits, survival=survival, **self._extras(out))
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return result if return_dict else result.to_tuple()

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The survival loss of head outputs ``logits`` against ``labels (B, 2)`` [time, event]."""
        if labels.dim() != 2 or labels.shape[1] != 2:
            raise ValueError(f"survival labels must be (B, 2) [time, event], got {tuple(labels.shape)}")
        labels = labels.to(logits.device)
        time, event = labels[:, 0].float(), labels[:, 1].float()
        if self.config.survival_loss == "cox":
            return cox_ph_loss(logits[:, 0].float(), time, event, ties=self.config.survival_ties)
        return discrete_time_nll(logits.float(), discretize(time, self.time_bins.to(time.device)), event)


class AutoModelForSurvival(_BaseAutoModelClass):
    """Auto class for survival models (transformers has none): ``AutoModelForSurvival.from_pretrained(path)``."""

    _model_mapping = _LazyAutoMapping(OrderedDict(), OrderedDict())


__all__ = [
    "PROBLEM_TYPE_LOSSES",
    "AutoModelForSurvival",
    "BioPerceiverClassifierOutput",
    "BioPerceiverForSequenceClassification",
    "BioPerceiverForSurvival",
    "BioPerceiverSurvivalOutput",
    "LinearTerm",
    "PooledHead",
    "QueryHead",
    "build_head",
]
