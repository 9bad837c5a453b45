"""BioPerceiver: multimodal biomedical foundation models on a shared Perceiver backbone.

Importing this package registers ``BioPerceiverConfig``/``BioPerceiverModel`` with the transformers Auto
classes, so ``AutoModel.from_pretrained(directory)`` works without ``trust_remote_code``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from ._version import __version__
from .configuration_bioperceiver import BioPerceiverConfig
from .factory import create_config, create_model, list_models
from .modalities import (
    ModalitySpec,
    available_modalities,
    get_modality,
    list_modality_kinds,
    register_modality,
)
from .modeling_bioperceiver import BioPerceiverModel, BioPerceiverModelOutput, BioPerceiverPreTrainedModel
from .modeling_tasks import (
    AutoModelForSurvival,
    BioPerceiverClassifierOutput,
    BioPerceiverForSequenceClassification,
    BioPerceiverForSurvival,
    BioPerceiverSurvivalOutput,
)

AutoConfig.register(BioPerceiverConfig.model_type, BioPerceiverConfig, exist_ok=True)
AutoModel.register(BioPerceiverConfig, BioPerceiverModel, exist_ok=True)
AutoModelForSequenceClassification.register(BioPerceiverConfig, BioPerceiverForSequenceClassification, exist_ok=True)
AutoModelForSurvival.register(BioPerceiverConfig, BioPerceiverForSurvival, exist_ok=True)

# ``bioperceiver.embed/predict/search(...)``: the functions behind the ``bioperceiver`` command, imported on first use
_INFERENCE = ("embed", "predict", "search")


def __getattr__(name: str):
    if name in _INFERENCE:
        from importlib import import_module

        return getattr(import_module(".inference", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AutoModelForSurvival",
    "BioPerceiverClassifierOutput",
    "BioPerceiverConfig",
    "BioPerceiverForSequenceClassification",
    "BioPerceiverForSurvival",
    "BioPerceiverModel",
    "BioPerceiverModelOutput",
    "BioPerceiverPreTrainedModel",
    "BioPerceiverSurvivalOutput",
    "ModalitySpec",
    "__version__",
    "available_modalities",
    "create_config",
    "create_model",
    "embed",
    "get_modality",
    "list_modality_kinds",
    "list_models",
    "predict",
    "register_modality",
    "search",
]
