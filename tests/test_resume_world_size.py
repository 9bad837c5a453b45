"""Resuming a sharded pretraining run on another number of processes (issue 16): a 2-process gloo run killed right
after a checkpoint and resumed on 1 process consumes exactly the samples of the epoch the checkpoint had not seen,
in the global order, with the run's global contrastive batch; the step count, the checkpoint and the model card
record the change. Without ``data.shards`` the different process count is still refused, naming ``data.shards``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from bioperceiver.data import BioPerceiverCollator
from bioperceiver.data.shards import ShardedDataset, write_shards
from bioperceiver.training import loop
from bioperceiver.training.config import PretrainConfig, RunConfigError

PER_PROCESS, CRASH_AT = 3, 2  # 2 processes x 3 = a contrastive batch of 6; killed after checkpoint-2


def _record_ids(folder: Path, rank: int) -> None:
    """Make the training collator append the sample ids of every streamed batch to ``folder/ids-<rank>.jsonl``
    (one line per batch, flushed at once so a SIGKILL loses nothing); evaluation calls it with ``train=False``."""
    original = BioPerceiverCollator.__call__

    def call(self, samples, *args, **kwargs):
        if kwargs.get("train", True) and samples and "__view_seed__" in samples[0]:
            with open(folder / f"ids-{rank}.jsonl", "a") as f:
                f.write(json.dumps([s["sample_id"] for s in samples]) + "\n")
        return original(self, samples, *args, **kwargs)

    BioPerceiverCollator.__call__ = call


def _batches(folder: Path, rank: int) -> list[list[str]]:
    return [json.loads(line) for line in (folder / f"ids-{rank}.jsonl").read_text().splitlines()]


def _worker(rank: int, world: int, port: int, run_yaml: str, overrides: list[str], ids: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        ACCELERATE_USE_CPU="1",
    )
    torch.set_num_threads(1)
    from bioperceiver.training import load_run_config
    from bioperceiver.training import loop as worker_loop

    _record_ids(Path(ids), rank)
    worker_loop.run_pretraining(load_run_config(run_yaml, overrides), crash_after_step=CRASH_AT)


class _OneProcess:
    is_main_process = True

    def wait_for_everyone(self):
        pass


@pytest.mark.slow
def test_two_process_sharded_run_resumed_on_one_process_sees_exactly_the_rest_of_the_epoch(tmp_path, monkeypatch):
    from conftest import free_port, synthetic_run_config

    from bioperceiver.training import load_run_config

    run = synthetic_run_config(
        tmp_path, max_steps=100, warmup_steps=1, batch_size=PER_PROCESS, save_steps=CRASH_AT, keep_last=3,
        eval={"steps": 0, "n_bootstrap": 0},
    )  # fmt: skip
    manifest, processor, _ = loop.prepare_data(load_run_config(run), _OneProcess(), tmp_path / "prep")
    shards = tmp_path / "shards"
    num_rows = write_shards(manifest, processor, shards, rows_per_shard=7)["num_rows"]
    global_batch = 2 * PER_PROCESS
    epoch_steps = num_rows // global_batch  # the run ends with the first epoch (drop_last: whole global batches)
    assert epoch_steps > CRASH_AT + 1
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        f"data.shards={shards}",
        "data.shard_shuffle_buffer=5",
        f"optim.max_steps={epoch_steps}",
    ]
    ids = tmp_path / "ids"
    ids.mkdir()
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(run), overrides, str(ids))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode == -9, p.exitcode  # SIGKILLed right after checkpoint-2 was written
    ckpt = tmp_path / "run" / "checkpoints" / f"checkpoint-{CRASH_AT}"
    saved = json.loads((ckpt / "trainer_state.json").read_text())
    assert saved["num_processes"] == 2 and saved["global_batch_size"] == global_batch
    assert saved["data_state"]["position"] == CRASH_AT * global_batch

    monkeypatch.setattr(BioPerceiverCollator, "__call__", BioPerceiverCollator.__call__)  # undone after the test
    _record_ids(ids, 99)
    result = loop.run_pretraining(load_run_config(run, overrides), resume="latest")

    # the epoch in its global order (one rank, one sample per block): what an uninterrupted run consumes
    reference = ShardedDataset(shards, batch_size=1, seed=load_run_config(run).seed, shuffle_buffer=5, drop_last=False)
    order = [s["sample_id"] for s in reference]
    two = [a + b for a, b in zip(_batches(ids, 0), _batches(ids, 1), strict=True)]  # step t: rank 0's, then rank 1's
    one = _batches(ids, 99)
    assert len(two) == CRASH_AT and len(one) == epoch_steps - CRASH_AT
    assert all(len(b) == global_batch for b in two + one)  # the contrastive batch is kept: 6 per step on 1 process
    assert [s for b in two for s in b] == order[: CRASH_AT * global_batch]
    assert [s for b in one for s in b] == order[CRASH_AT * global_batch : epoch_steps * global_batch]  # the rest

    assert result["steps"] == epoch_steps and result["losses_finite"]
    final = tmp_path / "run" / "checkpoints" / f"checkpoint-{epoch_steps}"
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["step"] == epoch_steps and state["num_processes"] == 1
    assert state["global_batch_size"] == global_batch and state["data_state"]["position"] == num_rows - (
        num_rows % global_batch
    )
    assert state["world_size_changes"] == [
        {"step": CRASH_AT, "from_processes": 2, "to_processes": 1, "per_process_batch": 6, "global_batch": 6}
    ]
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "2 -> 1 processes at step 2" in card


def _checkpoint(folder: Path, **state) -> Path:
    folder.mkdir()
    (folder / "trainer_state.json").write_text(json.dumps({"step": 4, "batches_seen": 4, **state}))
    return folder


def test_another_process_count_is_refused_without_shards_and_allowed_with_them(tmp_path):
    path = _checkpoint(tmp_path / "checkpoint-4", num_processes=2)
    cfg = PretrainConfig()
    with pytest.raises(RunConfigError, match=r"written by 2 process\(es\), this launch has 1.*data\.shards"):
        loop.check_resume(cfg, path, 1)
    assert loop.check_resume(cfg, path, 2)["step"] == 4
    cfg.data.shards = str(tmp_path / "shards")
    assert loop.check_resume(cfg, path, 1)["num_processes"] == 2


def test_the_global_batch_is_kept_and_must_divide_among_the_processes(tmp_path):
    cfg = PretrainConfig()
    cfg.train.batch_size = 8
    path = tmp_path / "checkpoint-4"
    assert loop.resumed_batch({"num_processes": 2}, cfg, 1, path) == 16  # 2 x 8 on one process
    assert loop.resumed_batch({"num_processes": 2}, cfg, 4, path) == 4
    assert loop.resumed_batch({"num_processes": 1, "global_batch_size": 16}, cfg, 2, path) == 8  # 2 -> 1 -> 2
    assert loop.resumed_batch({"num_processes": 2, "global_batch_size": 16}, cfg, 2, path) == 8
    with pytest.raises(RunConfigError, match=r"16 samples.*3 processes.*\[1, 2, 4, 8, 16\]"):
        loop.resumed_batch({"num_processes": 2}, cfg, 3, path)


def test_derived_seeds_are_deterministic_and_distinct_per_rank_and_step():
    seeds = {loop.derived_seed(0, step, rank) for step in (3, 4) for rank in range(4)}
    assert len(seeds) == 8 and loop.derived_seed(0, 3, 1) == loop.derived_seed(0, 3, 1)
    assert loop.derived_seed(0, 3, 1) != loop.derived_seed(1, 3, 1)
