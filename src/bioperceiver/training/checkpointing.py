"""Training checkpoints: written atomically (``save_state`` into a temporary folder, then a rename), rotated, found
again for ``--resume latest``. Each checkpoint carries the data position, the run id, the hash of the resolved
config and the number of processes (``trainer_state.json``) and the resolved run config (``run_config.yaml``).

Only complete checkpoints count: a folder is one when it is named ``checkpoint-<step>`` and holds
``trainer_state.json`` (written into the temporary folder before the rename), so a crash while saving leaves at most a
``.tmp-checkpoint-<step>`` folder that nothing considers and the next save of that step clears. Rotation deletes only
checkpoints of the current run id, oldest step first."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
HISTORY = "history.json"  # in a checkpoint: the records logged up to it
RUN_CONFIG = "run_config.yaml"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


class CheckpointWriteError(OSError):
    """Writing a checkpoint (or the final model) failed, e.g. a full disk; the previous checkpoints are untouched."""


def new_run_id() -> str:
    """A fresh run id (made once at the start of a fresh run, kept across its resumes)."""
    return uuid.uuid4().hex


def read_history(path: str | os.PathLike) -> list[dict] | None:
    """The records a checkpoint's run had logged up to it (``history.json``), or ``None`` for a checkpoint written
    before they were saved with it."""
    f = Path(path) / HISTORY
    return json.loads(f.read_text()) if f.is_file() else None


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint folder."""
    return json.loads((Path(path) / TRAINER_STATE).read_text())


def checkpoints(ckpt_dir: str | os.PathLike, run_id: str | None = None) -> list[Path]:
    """The complete ``checkpoint-<step>`` folders in ``ckpt_dir`` (those holding ``trainer_state.json``), oldest
    (lowest step) first; with ``run_id``, only those of that run."""
    found = []
    for p in Path(ckpt_dir).glob("checkpoint-*"):
        m = _CHECKPOINT.fullmatch(p.name)
        if not (m and p.is_dir() and (p / TRAINER_STATE).is_file()):
            continue
        if run_id is not None and read_trainer_state(p).get("run_id") != run_id:
            continue
        found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_dir: str | os.PathLike, run_id: str | None = None) -> Path | None:
    """The complete checkpoint with the highest step (of ``run_id`` when given), or ``None`` when there is none."""
    found = checkpoints(ckpt_dir, run_id)
    return found[-1] if found else None


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder ``tmp`` to ``final``; an existing ``final`` is moved aside first and removed only
    once the new one is in place, so at every moment one complete version exists."""
    old = final.with_name(f".old-{final.name}")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike):
    """Write a folder all at once: yields a temporary sibling ``.tmp-<name>``; on success it replaces ``final``
    (:func:`replace_dir`), on an error it is removed and ``final`` (if any) is left as it was. An ``OSError`` is
    re-raised as :class:`CheckpointWriteError` naming the folder."""
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and not isinstance(err, CheckpointWriteError):
            raise _write_error(final, err) from err
        raise


def _write_error(path: Path, err: OSError) -> CheckpointWriteError:
    previous = [p.name for p in checkpoints(path.parent)] if path.parent.is_dir() else []
    kept = f"; the previous ones are kept ({', '.join(previous)})" if previous else ""
    return CheckpointWriteError(
        err.errno,
        f"could not write {path}: {err.strerror or err}{kept}. Free space (or fix permissions) on "
        f"{path.parent} and continue with --resume latest, or set another output_dir",
    )


def save_checkpoint(
    accelerator,
    ckpt_dir: Path,
    step: int,
    batches_seen: int,
    keep_last: int,
    run_config: str | None = None,
    history: list[dict] | None = None,
    protect: str | None = None,
    **extra: Any,
) -> Path:
    """``save_state`` into a temporary folder, then an atomic rename: a crash never leaves a half checkpoint.

    A collective: every rank calls it. ``extra`` (the run id, config hash, number of processes, run totals such as
    samples seen) goes into ``trainer_state.json`` beside the step and data position; ``run_config`` (the resolved
    run YAML) into ``run_config.yaml``; ``history`` (the records logged so far) into ``history.json``, so a resumed
    run's history and loss curves start from the beginning (:func:`read_history`). Only the ``keep_last`` newest
    checkpoints of the same ``run_id`` are kept (by step), and the one named ``protect`` (the best evaluation's
    checkpoint, ``eval.load_best_model_at_end``) besides; another run's checkpoints are never deleted. An
    ``OSError`` while writing (a full disk) raises :class:`CheckpointWriteError` naming the folder; the temporary
    folder is removed and earlier checkpoints stay.
    """
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"checkpoint-{step}"
    tmp = ckpt_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        # collective: every rank writes its RNG state (and its shards with DeepSpeed/FSDP)
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # ... so the folder is renamed only once all of them are written
        if accelerator.is_main_process:
            (tmp / TRAINER_STATE).write_text(json.dumps({"step": step, "batches_seen": batches_seen, **extra}) + "\n")
            if run_config is not None:
                (tmp / RUN_CONFIG).write_text(run_config)
            if history is not None:
                (tmp / HISTORY).write_text(json.dumps(history) + "\n")
            replace_dir(tmp, final)
    except OSError as err:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(final, err) from err
    if accelerator.is_main_process:
        run_id = extra.get("run_id")
        for old in checkpoints(ckpt_dir, run_id)[:-keep_last] if keep_last > 0 else []:
            if old.name != protect:
                shutil.rmtree(old)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(resume: str | os.PathLike, ckpt_dir: Path) -> Path:
    """``"latest"`` -> the newest checkpoint in ``ckpt_dir``; anything else is a checkpoint folder."""
    if str(resume) == "latest":
        found = checkpoints(ckpt_dir)
        if not found:
            raise FileNotFoundError(f"--resume latest: no complete checkpoint in {ckpt_dir}; start without --resume")
        runs = {read_trainer_state(p).get("run_id") for p in found}
        if len(runs) > 1:
            raise FileNotFoundError(
                f"--resume latest: {ckpt_dir} holds checkpoints of {len(runs)} different runs "
                f"({', '.join(p.name for p in found)}); pass --resume PATH with the one to continue"
            )
        return found[-1]
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
