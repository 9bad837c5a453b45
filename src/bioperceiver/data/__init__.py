"""The data layer: manifests, datasets, patient-level splits, validation and collation.

``raw files --recipe--> manifest --processors--> model inputs --collator--> batch`` (see the repo's DESIGN).
The per-kind processors live with their kind in ``bioperceiver.modalities.<kind>``; the names below
(``TextProcessor``, ``ModalityProcessor``, ...) are re-exported from there.
"""

from importlib import import_module

from .collator import BioPerceiverCollator
from .dataset import ManifestDataset, build_dataset, build_iterable_dataset, to_sample
from .errors import DEFAULT_ON_ERROR, ON_ERROR_CHOICES, DataError, Problem, SkipReport, check_on_error
from .manifest import Manifest, parse_reference, read_manifest, write_manifest
from .processing import BioPerceiverProcessor, ProcessorSettings, load_processor_settings
from .splits import assign_splits, check_patient_splits, split_of
from .validate import ManifestError, ValidationReport, check_manifest_before_work, validate_manifest

# Resolved on first use: the modality folders import this package's modules, so an eager import here would
# be circular when ``bioperceiver.modalities`` is imported first.
_FROM_MODALITIES = {
    "ModalityProcessor": "bioperceiver.modalities.processor",
    "TextProcessor": "bioperceiver.modalities.text",
    "train_tokenizer": "bioperceiver.modalities.text",
    "ImageProcessor": "bioperceiver.modalities.image",
    "OmicsProcessor": "bioperceiver.modalities.omics",
    "SignalProcessor": "bioperceiver.modalities.signal",
    "window_references": "bioperceiver.modalities.signal",
    "TabularProcessor": "bioperceiver.modalities.tabular",
}


def __getattr__(name: str):
    if name in _FROM_MODALITIES:
        return getattr(import_module(_FROM_MODALITIES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_ON_ERROR",
    "ON_ERROR_CHOICES",
    "BioPerceiverCollator",
    "BioPerceiverProcessor",
    "DataError",
    "ImageProcessor",
    "Manifest",
    "ManifestDataset",
    "ManifestError",
    "ModalityProcessor",
    "OmicsProcessor",
    "Problem",
    "ProcessorSettings",
    "SignalProcessor",
    "SkipReport",
    "TabularProcessor",
    "TextProcessor",
    "ValidationReport",
    "assign_splits",
    "build_dataset",
    "build_iterable_dataset",
    "check_manifest_before_work",
    "check_on_error",
    "check_patient_splits",
    "load_processor_settings",
    "parse_reference",
    "read_manifest",
    "split_of",
    "to_sample",
    "train_tokenizer",
    "validate_manifest",
    "window_references",
    "write_manifest",
]
