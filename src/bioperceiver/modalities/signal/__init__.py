"""``signal``: ECG / EEG / wearable / ICU recordings -> (channel, time patch) tokens with Fourier time features."""

from ..registry import register_modality
from .embedder import SignalConfig, SignalEmbedder
from .processor import SignalProcessor, SignalSettings, read_recording, window_references
from .spec import SignalSpec, signal_layout

SPEC = register_modality(SignalSpec())

__all__ = [
    "SPEC",
    "SignalConfig",
    "SignalEmbedder",
    "SignalProcessor",
    "SignalSettings",
    "SignalSpec",
    "read_recording",
    "signal_layout",
    "window_references",
]
