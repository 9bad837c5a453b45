"""The data layer: manifests, per-modality processors, datasets, patient-level splits and collation.

``raw files --recipe--> manifest --processors--> model inputs --collator--> batch`` (see the repo's DESIGN).
"""

from .collator import BioPerceiverCollator
from .dataset import ManifestDataset, build_dataset, build_iterable_dataset, to_sample
from .errors import DataError, SkipReport
from .manifest import Manifest, parse_reference, read_manifest, write_manifest
from .processing import BioPerceiverProcessor, load_processor_settings
from .processors import (
    ImageProcessor,
    ModalityProcessor,
    OmicsProcessor,
    SignalProcessor,
    TabularProcessor,
    TextProcessor,
    get_processor_class,
    register_processor,
    train_tokenizer,
    window_references,
)
from .splits import assign_splits, check_patient_splits, split_of
from .validate import Problem, ValidationReport, validate_manifest

__all__ = [
    "BioPerceiverCollator",
    "BioPerceiverProcessor",
    "DataError",
    "ImageProcessor",
    "Manifest",
    "ManifestDataset",
    "ModalityProcessor",
    "OmicsProcessor",
    "Problem",
    "SignalProcessor",
    "SkipReport",
    "TabularProcessor",
    "TextProcessor",
    "ValidationReport",
    "assign_splits",
    "build_dataset",
    "build_iterable_dataset",
    "check_patient_splits",
    "get_processor_class",
    "load_processor_settings",
    "parse_reference",
    "read_manifest",
    "register_processor",
    "split_of",
    "to_sample",
    "train_tokenizer",
    "validate_manifest",
    "window_references",
    "write_manifest",
]
