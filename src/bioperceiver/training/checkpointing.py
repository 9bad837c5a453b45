"""Training checkpoints: written atomically (``save_state`` into a temporary folder, then a rename), rotated, found
again for ``--resume latest``. Each checkpoint carries the data position (``trainer_state.json``) and the resolved
run config (``run_config.yaml``)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
RUN_CONFIG = "run_config.yaml"


def checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-<step>`` folders in ``ckpt_dir``, oldest (lowest step) first."""
    return sorted(Path(ckpt_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest step, or ``None`` when there is none."""
    found = checkpoints(ckpt_dir)
    return found[-1] if found else None


def save_checkpoint(
    accelerator,
    ckpt_dir: Path,
    step: int,
    batches_seen: int,
    keep_last: int,
    run_config: str | None = None,
    **extra: Any,
) -> Path:
    """``save_state`` into a temporary folder, then an atomic rename: a crash never leaves a half checkpoint.

    A collective: every rank calls it. ``extra`` (run totals such as samples seen) goes into ``trainer_state.json``
    beside the step and data position; ``run_config`` (the resolved run YAML) into ``run_config.yaml``. Only the
    ``keep_last`` newest checkpoints are kept."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"checkpoint-{step}"
    tmp = ckpt_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # collective: every rank writes its RNG state (and its shards with DeepSpeed/FSDP)
    accelerator.wait_for_everyone()  # ... so the folder is renamed only once all of them are written
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE).write_text(json.dumps({"step": step, "batches_seen": batches_seen, **extra}) + "\n")
        if run_config is not None:
            (tmp / RUN_CONFIG).write_text(run_config)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(resume: str | os.PathLike, ckpt_dir: Path) -> Path:
    """``"latest"`` -> the newest checkpoint in ``ckpt_dir``; anything else is a checkpoint folder."""
    if str(resume) == "latest":
        path = latest_checkpoint(ckpt_dir)
        if path is None:
            raise FileNotFoundError(f"--resume latest: no checkpoint in {ckpt_dir}; start without --resume")
        return path
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"--resume {path}: not a checkpoint folder (no {TRAINER_STATE})")
    return path


def load_checkpoint(accelerator, path: Path) -> dict[str, Any]:
    """``load_state`` (model, optimiser, scheduler, RNG) and the trainer state: ``step``, ``batches_seen`` and the
    run totals saved with it."""
    accelerator.load_state(str(path))
    state = json.loads((Path(path) / TRAINER_STATE).read_text())
    logger.info("resumed from %s at step %d", path, state["step"])
    return state
