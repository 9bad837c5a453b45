"""Loading a saved model folder for inference: a pretraining run's ``final/`` (backbone + processors) or a folder
written by ``finetune/run_finetune.py`` (task model + processors + ``finetuning_task.json`` + ``all_results.json``,
and since issue 19 ``calibration_set.npz``). Shared by ``bioperceiver embed/predict/search`` and
``finetune/predict_ensemble.py``."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.processing import BioPerceiverProcessor
from ..tasks import Task
from ..training.finetuning import check_model_path

logger = logging.getLogger(__name__)

TASK_FILE = "finetuning_task.json"
RESULTS_FILE = "all_results.json"
# config entries that say where or with what a model was saved, not what it computes
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "architectures", "torch_dtype", "dtype")


@dataclass
class LoadedModel:
    """A model folder, loaded: ``model`` (eval mode, on ``device``), its fitted ``processor``, the ``modalities``
    it runs on (``{name: kind}``: for a finetuned model the ones it was finetuned with), the ``task`` of a
    finetuned folder (``None`` for a backbone), the ``folder``, and the contrastive ``projection`` head a pretraining
    run saved beside its backbone (``None`` for a finetuned model or a backbone saved without one)."""

    model: Any
    processor: BioPerceiverProcessor
    modalities: dict[str, str]
    task: Task | None
    folder: Path
    info: dict[str, Any]
    projection: Any = None

    @property
    def backbone(self):
        """The :class:`~bioperceiver.BioPerceiverModel` (a task model's ``bioperceiver`` attribute)."""
        return getattr(self.model, self.model.base_model_prefix, self.model)

    @property
    def model_id(self) -> str:
        return str(self.folder.resolve())

    @property
    def config_hash(self) -> str:
        return config_hash(self.backbone.config)


def model_fingerprint(loaded: LoadedModel) -> str:
    """A short SHA-256 of everything an embedding or prediction depends on: every weight of the model (and of the
    projection head) and the fitted processors (their settings, state and files, e.g. a tokenizer's vocabulary).
    Two folders of one architecture with other weights or other processors differ, where :func:`config_hash`
    does not."""
    digest = hashlib.sha256()
    for module in (loaded.model, loaded.projection):
        for name, tensor in sorted((module.state_dict() if module is not None else {}).items()):
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(loaded.processor.fingerprint().encode())
    return digest.hexdigest()[:16]


def config_hash(config) -> str:
    """A short SHA-256 of what a model config computes (its JSON without the save path/library version)."""
    data = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def default_device() -> torch.device:
    """This process's device: ``cuda:<local rank>`` under ``accelerate launch``/``torchrun`` with GPUs, else CPU."""
    from accelerate import PartialState

    return PartialState().device


def is_finetuned_folder(folder: str | os.PathLike) -> bool:
    return (Path(folder) / TASK_FILE).exists()


def load_model_folder(
    folder: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    argument: str = "--model",
    require_task: bool = False,
) -> LoadedModel:
    """Load the model, processors and (finetuned folders) the task saved in ``folder``. Raises ``ValueError``
    naming the folder and the fix when it is not a BioPerceiver model folder, lacks processors, or (with
    ``require_task``) is not a finetuning output."""
    check_model_path(str(folder), argument=argument)
    folder = Path(folder)
    if not (folder / "bioperceiver_processor.json").exists():
        raise ValueError(
            f"{argument} {folder} holds no bioperceiver_processor.json: pass a folder saved with its processors (a "
            "pretraining run's `final/` or a run_finetune.py output folder)"
        )
    if require_task and not is_finetuned_folder(folder):
        raise ValueError(
            f"{argument} {folder} is not a run_finetune.py output folder (no {TASK_FILE}): pass the --output_dir "
            "folder of a finetuning run"
        )
    device = torch.device(device) if device is not None else default_device()
    processor = BioPerceiverProcessor.from_pretrained(folder)
    info = json.loads((folder / RESULTS_FILE).read_text()) if (folder / RESULTS_FILE).exists() else {}
    task, projection = None, None
    if is_finetuned_folder(folder):
        task = Task.load(folder)
        model = task.auto_model_class().from_pretrained(folder)
    else:
        from ..layers.projection import load_projection_head
        from ..modeling_bioperceiver import BioPerceiverModel

        model = BioPerceiverModel.from_pretrained(folder)
        projection = load_projection_head(folder, model.config, device)
    model = model.to(device).eval()
    backbone = getattr(model, model.base_model_prefix, model)
    used = info.get("modalities") or [m for m in processor.modalities if m in backbone.modality_names]
    modalities = {m: processor.modalities[m] for m in used}
    return LoadedModel(model, processor, modalities, task, folder, info, projection)
