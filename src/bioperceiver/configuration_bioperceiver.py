"""BioPerceiver configuration."""

from __future__ import annotations

import itertools
from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError
from transformers import PreTrainedConfig

from .modalities import get_modality, normalize_modality_config


@strict
class BioPerceiverConfig(PreTrainedConfig):
    r"""Configuration of a :class:`BioPerceiverModel`: a Perceiver encoder shared by any set of modalities.

    The encoder keeps a learned latent array of ``num_latents x d_latents``. Every modality embedder turns its
    input into tokens of width ``d_input``; the latents cross-attend to the concatenated tokens of all present
    modalities (``num_cross_attention_layers`` blocks), then run ``num_self_attention_layers`` latent
    self-attention blocks. ``num_blocks > 1`` repeats the latent stack with shared weights, and with
    ``repeat_cross_attention=True`` the (shared-weight) cross-attention is repeated at the start of every block,
    as in the original Perceiver.

    Args:
        num_latents (`int`, defaults to 128): number of latent vectors ``M``; the cost of cross-attention is
            ``O(M x N)`` for ``N`` input tokens.
        d_latents (`int`, defaults to 256): width ``D`` of the latents.
        d_input (`int`, defaults to 256): width of every modality's tokens (key/value input of cross-attention).
        num_cross_attention_heads (`int`, defaults to 4): heads of each cross-attention; must divide ``d_latents``.
        num_self_attention_heads (`int`, defaults to 8): heads of each latent self-attention; must divide
            ``d_latents``.
        num_cross_attention_layers (`int`, defaults to 1): cross-attention blocks applied one after another.
        num_self_attention_layers (`int`, defaults to 4): latent self-attention blocks per block.
        num_blocks (`int`, defaults to 1): times the latent stack is applied (weights shared between repeats).
        repeat_cross_attention (`bool`, defaults to `False`): also re-apply the cross-attention (shared weights) at
            the start of every repeat; only meaningful with ``num_blocks > 1``.
        cross_attention_widening_factor (`int`, defaults to 1): MLP expansion after cross-attention.
        self_attention_widening_factor (`int`, defaults to 4): MLP expansion in the self-attention blocks.
        hidden_dropout (`float`, defaults to 0.0): dropout on residual branches, in ``[0, 1)``.
        attention_dropout (`float`, defaults to 0.0): dropout on attention probabilities, in ``[0, 1)``.
        layer_norm_eps (`float`, defaults to 1e-5): epsilon of every LayerNorm.
        initializer_range (`float`, defaults to 0.02): standard deviation of the truncated-normal initialisation.
        projection_dim (`int`, defaults to 128): width of the contrastive projection used by pretraining heads.
        modalities (`dict[str, dict]`): one sub-config per modality **name** (e.g. ``"image_cxr"``), each with a
            ``kind`` (a registered kind: ``text``, ``image``, ``omics``, ``signal``, ``tabular``) and that kind's
            settings (see ``bioperceiver.modalities.<kind>``). Several names may share one kind. Missing settings
            are filled with the kind's defaults, so the saved config is complete.
        head_type (`str`, defaults to ``"pooled"``): task head of the ``BioPerceiverFor...`` models: ``"pooled"``
            (mean of the latents -> [MLP] -> linear) or ``"query"`` (a learned query cross-attends to the latents,
            Perceiver IO style).
        head_hidden_size (`int`, defaults to 0): hidden width of the pooled head's MLP; 0 = a linear head.
        head_dropout (`float`, defaults to 0.1): dropout inside the task head.
        survival_loss (`str`, defaults to ``"cox"``): ``"cox"`` (partial likelihood) or ``"discrete"`` (logistic
            hazard over ``survival_time_bins``) for ``BioPerceiverForSurvival``.
        survival_ties (`str`, defaults to ``"efron"``): tie handling of the Cox loss, ``"efron"`` or ``"breslow"``.
        survival_time_bins (`list[float]`, optional): increasing cut points of the discrete-time head.
        head_linear_modalities (`list[str]`, optional): ``tabular`` or ``omics`` modalities whose values also
            reach the task output through a linear term beside the head (wide & deep: one coefficient per numeric
            feature or gene, on its standardised value, and one per category code; an absent value adds nothing,
            i.e. the training mean). The backbone then learns what their linear effect leaves unexplained.
    """

    # Outputs ``Trainer`` leaves out of gathered predictions (it keeps ``logits``/``risk``).
    keys_to_ignore_at_inference: ClassVar[list[str]] = [
        "pooler_output",
        "modality_mask",
        "hidden_states",
        "attentions",
        "cross_attentions",
    ]
    model_type = "bioperceiver"

    num_latents: int = 128
    d_latents: int = 256
    d_input: int = 256
    num_cross_attention_heads: int = 4
    num_self_attention_heads: int = 8
    num_cross_attention_layers: int = 1
    num_self_attention_layers: int = 4
    num_blocks: int = 1
    repeat_cross_attention: bool = False
    cross_attention_widening_factor: int = 1
    self_attention_widening_factor: int = 4
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    projection_dim: int = 128
    modalities: dict[str, Any] | None = None
    head_type: str = "pooled"
    head_hidden_size: int = 0
    head_dropout: float = 0.1
    survival_loss: str = "cox"
    survival_ties: str = "efron"
    survival_time_bins: list[float] | None = None
    head_linear_modalities: list[str] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        positive = (
            "num_latents",
            "d_latents",
            "d_input",
            "num_cross_attention_heads",
            "num_self_attention_heads",
            "num_cross_attention_layers",
            "num_blocks",
            "cross_attention_widening_factor",
            "self_attention_widening_factor",
            "projection_dim",
        )
        for key in (*positive, "num_self_attention_layers", "head_hidden_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{key} must be an integer, got {value!r} ({type(value).__name__})")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be a positive integer, got {getattr(self, key)}")
        if self.num_self_attention_layers < 0:
            raise ValueError(f"num_self_attention_layers must be >= 0, got {self.num_self_attention_layers}")
        for key in ("num_cross_attention_heads", "num_self_attention_heads"):
            if self.d_latents % getattr(self, key):
                raise ValueError(
                    f"d_latents={self.d_latents} must be divisible by {key}={getattr(self, key)}; "
                    "pick a head count that divides the latent width"
                )
        if self.head_type not in ("pooled", "query"):
            raise ValueError(f"head_type must be 'pooled' or 'query', got {self.head_type!r}")
        if self.head_hidden_size < 0:
            raise ValueError(f"head_hidden_size must be >= 0 (0 = linear head), got {self.head_hidden_size}")
        if self.survival_loss not in ("cox", "discrete"):
            raise ValueError(f"survival_loss must be 'cox' or 'discrete', got {self.survival_loss!r}")
        if self.survival_ties not in ("efron", "breslow"):
            raise ValueError(f"survival_ties must be 'efron' or 'breslow', got {self.survival_ties!r}")
        if self.survival_time_bins is not None:
            bins = [float(b) for b in self.survival_time_bins]
            if not bins or any(b >= c for b, c in itertools.pairwise(bins)):
                raise ValueError(f"survival_time_bins must be a non-empty increasing list, got {bins}")
            self.survival_time_bins = bins
        for key in ("hidden_dropout", "attention_dropout", "head_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"{key} must lie in [0, 1), got {getattr(self, key)}")
        if self.layer_norm_eps <= 0 or self.initializer_range <= 0:
            raise ValueError("layer_norm_eps and initializer_range must be > 0")
        modalities = self.modalities or {}
        if not isinstance(modalities, dict):
            raise ValueError(f"modalities must be a dict name -> sub-config, got {type(modalities).__name__}")
        for name in modalities:
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"modality name {name!r} must be a Python identifier such as 'image_cxr'")
        self.modalities = {name: normalize_modality_config(name, modalities[name]) for name in sorted(modalities)}
        if self.head_linear_modalities is not None:
            linear = [str(m) for m in self.head_linear_modalities]
            readable = [n for n, m in self.modalities.items() if get_modality(m["kind"]).linear_inputs is not None]
            for name in linear:
                if name not in readable:
                    kind = self.modalities.get(name, {}).get("kind")
                    raise ValueError(
                        f"head_linear_modalities: {name!r} is "
                        + (f"a {kind!r} modality" if kind else "not a modality of this model")
                        + "; the linear term takes modalities of (id, value) tokens (a kind whose spec sets "
                        f"linear_inputs: tabular, omics), here {readable}"
                    )
            self.head_linear_modalities = sorted(set(linear)) or None
        super().__post_init__(**kwargs)

    @property
    def modality_names(self) -> list[str]:
        """Configured modality names in the fixed (sorted) order used everywhere in the model."""
        return sorted(self.modalities)


_strict_init = BioPerceiverConfig.__init__


def _init_raising_value_error(self: BioPerceiverConfig, *args: Any, **kwargs: Any) -> None:
    # The strict dataclass reports wrong types with its own exception class; users get one contract instead:
    # every invalid argument raises ValueError naming the field.
    try:
        _strict_init(self, *args, **kwargs)
    except StrictDataclassError as err:
        raise ValueError(f"invalid BioPerceiverConfig argument: {err}") from err


BioPerceiverConfig.__init__ = _init_raising_value_error

__all__ = ["BioPerceiverConfig"]
