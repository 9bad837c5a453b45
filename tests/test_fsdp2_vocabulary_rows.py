"""The "vocabulary rows trained" masks under FSDP2 (``fully_shard`` on 2 gloo processes, CPU): every process gets the
same full masks as one unsharded process trained on both processes' batches. Read locally, the row-sharded AdamW
state counted only the rows of the process's own shard (the card's figure was wrong, and the saved file was a shard)."""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp
from conftest import TINY_MODALITIES, free_port, random_batch, tiny_config

import bioperceiver as bp
from bioperceiver.training.pretraining import save_trained_rows, trained_vocabulary_masks, trained_vocabulary_rows

MODALITIES = {k: TINY_MODALITIES[k] for k in ("omics", "tabular")}


def _model() -> bp.BioPerceiverModel:
    torch.manual_seed(0)
    return bp.BioPerceiverModel(tiny_config(modalities=MODALITIES))


def _batch(rank: int) -> dict:
    """Each process's batch: its own genes and features (few of them, so most rows get no gradient)."""
    batch = random_batch(tiny_config(modalities=MODALITIES), batch_size=2, seed=rank)
    batch["omics"]["gene_ids"] = batch["omics"]["gene_ids"] % 8 + 8 * rank  # rank 0: genes 0-7, rank 1: 8-15
    return batch


def _loss(model, batch) -> torch.Tensor:
    return model(**batch).pooler_output.square().mean()


def _worker(rank, world, port, queue, fail_rank=None):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        if rank == fail_rank:  # this process alone fails while reducing its rows, before any gather
            import bioperceiver.training.pretraining as pretraining

            def boom(_):
                raise MemoryError(f"rank {rank}: out of memory (a stand-in)")

            pretraining.rows_with_gradient = boom
        model = _model()
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        _loss(model, _batch(rank)).backward()
        optimizer.step()
        masks = trained_vocabulary_masks(model, optimizer)  # every process calls it: a collective
        local = {k: v.to_local() if hasattr(v, "to_local") else v for k, v in masks.items()}  # a shard: its rows
        queue.put((rank, {k: (type(v).__name__, local[k].numpy().copy()) for k, v in masks.items()}))
        # both ranks tear down together: a rank that destroys its gloo group while its peer is still in the last
        # collective can die in teardown ("terminate called without an active exception"; seen once under load)
        dist.barrier()
    except Exception as e:  # the test reports it at once instead of waiting on the queue
        queue.put((rank, repr(e)))
        raise
    finally:
        dist.destroy_process_group()


def _run_workers(fail_rank=None) -> tuple[dict, list]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, queue, fail_rank)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict(queue.get(timeout=180) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    return got, procs


def test_fsdp2_masks_are_the_full_masks_of_one_unsharded_process(tmp_path):
    torch.set_num_threads(1)
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # one process, both batches: FSDP2 averages the gradients, so the rows with a gradient are the union
    (_loss(model, _batch(0)) + _loss(model, _batch(1))).backward()
    optimizer.step()
    reference = trained_vocabulary_masks(model, optimizer)
    genes = reference["omics.gene_embeddings"]
    assert genes[:16].any() and not genes[16:].any(), "genes 16+ are in no batch: untrained"
    assert genes[:8].any() and genes[8:16].any(), "each process's batch trains rows of its own"

    got, procs = _run_workers()
    assert set(got) == {0, 1}
    for rank, masks in got.items():
        assert isinstance(masks, dict), f"rank {rank}: {masks}"
        assert set(masks) == set(reference), rank
        for table, (kind, mask) in masks.items():
            assert kind == "Tensor", f"rank {rank} {table}: a {kind}, not the gathered rows"
            assert mask.tolist() == reference[table].tolist(), f"rank {rank} {table}"
    assert all(p.exitcode == 0 for p in procs)
    # what the card and final/trained_vocabulary_rows.safetensors get from rank 0's masks
    masks0 = {k: torch.from_numpy(v) for k, (_, v) in got[0].items()}
    assert trained_vocabulary_rows(masks0) == trained_vocabulary_rows(reference)
    save_trained_rows(masks0, tmp_path)
    assert (tmp_path / "trained_vocabulary_rows.safetensors").is_file()


def test_masks_of_local_tensors_are_unchanged():
    """Without FSDP2 the state is a local tensor: nothing is gathered (no process group is needed)."""
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _loss(model, _batch(0)).backward()
    optimizer.step()
    masks = trained_vocabulary_masks(model, optimizer)
    genes = masks["omics.gene_embeddings"]
    assert genes[:8].any() and not genes[8:].any()
    assert all(type(v) is torch.Tensor for v in masks.values())


def test_one_process_failing_before_the_gather_stops_every_process_instead_of_a_hang():
    """Rank 1 alone fails while reducing its rows: both processes raise the same error (rank 1's is its cause) and
    exit. Before, rank 0 went into the gather alone: here it waited until rank 1's exit closed the gloo connection;
    in the pretraining loop, which catches the error and goes on, rank 1 would reach the next collective (the run
    totals' all-reduce) while rank 0 still waited in the gather: mismatched collectives (under NCCL, a hang until
    the timeout). Now every process catches it alike and saves the model without the card's figure."""
    got, procs = _run_workers(fail_rank=1)
    assert set(got) == {0, 1}
    for rank in (0, 1):
        assert isinstance(got[rank], str) and got[rank].startswith("RuntimeError('a process could not reduce"), got
    assert all(p.exitcode not in (0, None) for p in procs)  # both ended, with the error
