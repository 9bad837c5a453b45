"""The calibration set a finetuned folder carries, so that new predictions get the same calibration and conformal
sets as the finetuning report: the validation outputs and targets the temperature and the conformal threshold were
fitted on, with the miscoverage ``alpha`` and the seed. :func:`~.report.uncertainty_report` re-fits both from them
(a one-parameter temperature fit and a quantile: deterministic, milliseconds) for whichever task the folder
holds, so nothing task-specific is stored here."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CALIBRATION_FILE = "calibration_set.npz"


@dataclass
class CalibrationSet:
    """Validation ``outputs`` (raw, as ``predict`` returns them), their ``targets``, ``alpha`` and ``seed``."""

    outputs: np.ndarray
    targets: np.ndarray
    alpha: float
    seed: int = 0


def save_calibration_set(folder: str | os.PathLike, calibration: CalibrationSet) -> Path:
    """Write ``calibration_set.npz`` into ``folder`` (a finetuning output folder)."""
    path = Path(folder) / CALIBRATION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = json.dumps({"alpha": float(calibration.alpha), "seed": int(calibration.seed)})
    with open(path, "wb") as f:  # np.savez would append .npz to a name without it; a file object keeps ours
        np.savez(f, outputs=np.asarray(calibration.outputs), targets=np.asarray(calibration.targets), settings=settings)
    return path


def load_calibration_set(folder: str | os.PathLike) -> CalibrationSet | None:
    """The calibration set saved in ``folder``, or ``None`` when the folder has none (finetuned before it was
    saved, or without labelled validation rows)."""
    path = Path(folder) / CALIBRATION_FILE
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as data:
        settings = json.loads(str(data["settings"]))
        return CalibrationSet(data["outputs"], data["targets"], settings["alpha"], settings.get("seed", 0))
