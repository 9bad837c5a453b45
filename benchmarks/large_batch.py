"""Large contrastive batches on one CPU process (gradient caching vs one forward) and 2-process (gloo) scaling of
the pretraining step (issue 16).

``--memory``: one pretraining step (``ContrastivePretrainer``, CLIP + fused view, packed encoder, backward, AdamW;
``bioperceiver_debug`` preset) on a global batch of N demo-cohort samples, each (N, variant) in a fresh process so
its peak resident memory is its own: **whole** (the batch in one forward) and **grad cache** (token-budget
micro-batches of at most ``--max_tokens`` real tokens embedded one at a time, gradient caching, exactly the same
gradients). The demo cohort's train split has fewer than 4,096 samples: batches are drawn **with replacement**
(seeded), so a batch holds repeated samples (their patient ids mark them as positives of each other; memory and time
do not depend on that). The whole-batch variant runs for the sizes of ``--whole_sizes`` only while the previous
size's peak stayed under ``--max_rss_mib`` (the machine is shared); larger sizes are extrapolated from the measured
ones (linear in N: activation memory is proportional to the batch), labelled as such.

Peak memory = the child's peak RSS during the step (``VmHWM``, reset right before it through
``/proc/self/clear_refs``) less its RSS then (collated batch, model and optimiser already built): activations,
gradients, AdamW state, allocator slack. (``ru_maxrss`` would include the peak of building the batch, which for
small batches is higher than the step's.)

``--scaling``: weak scaling on 1 and 2 gloo processes, the same per-process batch (demo samples, with replacement,
different per rank): each process runs forward (the CLIP loss all-gathers the embeddings across processes with
gradients: local loss), backward, one all-reduce of the gradients, AdamW. Throughput = global samples per second of
the slowest rank; efficiency = throughput(2) / (2 x throughput(1)). One torch thread per process.

    nice -n 10 .venv/bin/python benchmarks/large_batch.py --memory --scaling
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

logger = logging.getLogger("benchmarks.large_batch")


def demo_overrides(max_tokens: int) -> tuple[str, list[str]]:
    demo = ROOT / "outputs" / "demo"
    base = demo if (demo / "cohort" / "manifest.parquet").exists() else ROOT / "outputs" / "bench_pretrain_step"
    config = str(ROOT / "pretrain" / "configs" / "demo.yaml")
    return config, [
        f"data.manifest={base / 'cohort' / 'manifest.parquet'}",
        "data.build_demo_cohort=true",
        f"data.processor_dir={base / 'model'}",
        f"output_dir={ROOT / 'outputs' / 'bench_pretrain_step'}",
        f"train.max_tokens_per_batch={max_tokens}",  # the collator counts every sample's real tokens
    ]


def demo_batches(batch_size: int, n_batches: int, max_tokens: int, seed: int = 0):
    """Processor, embedder settings and ``n_batches`` collated demo batches of ``batch_size`` samples drawn with
    replacement (seeded)."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader, RandomSampler

    from bioperceiver.training import load_run_config, prepare_data, training_data

    config, overrides = demo_overrides(max_tokens)
    cfg = load_run_config(config, overrides)
    stub = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    manifest, processor, embedders = prepare_data(cfg, stub, Path(cfg.output_dir), settings_root=ROOT)
    ds, collator = training_data(cfg, manifest, processor)
    g = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(ds, replacement=True, num_samples=batch_size * n_batches, generator=g)
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collator)
    return processor, embedders, [b for b in loader if b is not None]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak_rss() -> None:
    """Reset the process's peak RSS (``VmHWM``) to its current RSS (Linux ``clear_refs``), so that the peak read
    after the step is the step's, not one left by building the batch (data processing and collation peak higher
    than the step for small batches: ``ru_maxrss`` would report theirs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def _memory_child(job: dict, queue) -> None:
    import resource

    torch.set_num_threads(1)
    logging.getLogger("bioperceiver").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import bioperceiver as bp
    from bioperceiver.data.sampler import token_budget_chunks
    from bioperceiver.training import ContrastivePretrainer
    from bioperceiver.training.pretraining import parameter_groups

    processor, embedders, batches = demo_batches(job["batch_size"], 1, job["max_tokens"], seed=job["seed"])
    batch = batches[0]
    torch.manual_seed(0)
    model = bp.create_model("bioperceiver_debug", modalities=processor.model_modalities(embedders)).set_packed(True)
    trainer = ContrastivePretrainer(model, loss="clip").train()
    opt = torch.optim.AdamW(parameter_groups(trainer, 0.05), lr=1e-4)
    chunks = token_budget_chunks(batch["num_tokens"], job["max_tokens"]) if job["grad_cache"] else None
    import gc

    gc.collect()
    base = _rss_mib()
    _reset_peak_rss()
    times = []
    for _ in range(job["steps"]):
        t = time.perf_counter()
        if chunks:
            out = trainer.grad_cached_step(batch["inputs"], batch["patient_id"], chunks)
        else:
            out = trainer(batch["inputs"], batch["patient_id"])
            out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    peak = _peak_rss_mib()
    queue.put(
        {
            "lifetime_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # incl. setup
            "batch_size": len(batch["patient_id"]),
            "grad_cache": job["grad_cache"],
            "micro_batches": len(chunks) if chunks else 1,
            "real_tokens": int(sum(batch["num_tokens"])),
            "s_per_step": times,
            "loss": float(out["loss"]),
            "peak_rss_above_setup_mib": peak - base,
            "rss_before_step_mib": base,
        }
    )


def _spawn(target, job: dict) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(job, queue))
    proc.start()
    result = queue.get(timeout=3600)
    proc.join()
    return result


def memory(args) -> dict[str, Any]:
    results: dict[str, Any] = {}
    whole_ok = True
    for n in sorted(set(args.whole_sizes) | set(args.gc_sizes)):
        for grad_cache in (False, True):
            if n not in (args.gc_sizes if grad_cache else args.whole_sizes):
                continue
            if not grad_cache and not whole_ok:
                logger.info("whole batch of %d: skipped (previous size over %d MiB)", n, args.max_rss_mib)
                continue
            job = {"batch_size": n, "grad_cache": grad_cache, "max_tokens": args.max_tokens, "steps": args.steps}
            job["seed"] = args.seed
            r = _spawn(_memory_child, job)
            key = f"{n}/{'grad_cache' if grad_cache else 'whole'}"
            results[key] = r
            logger.info(
                "%-18s %6.1f s/step (%d micro-batches, %d real tokens), peak RSS +%.0f MiB, load %.1f",
                key,
                min(r["s_per_step"]),
                r["micro_batches"],
                r["real_tokens"],
                r["peak_rss_above_setup_mib"],
                os.getloadavg()[0],
            )
            if not grad_cache and r["peak_rss_above_setup_mib"] * 2 > args.max_rss_mib:
                whole_ok = False  # the next size (double) would pass the limit
    return results


def _scaling_worker(rank: int, world: int, port: int, job: dict, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    logging.getLogger("bioperceiver").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import bioperceiver as bp
    from bioperceiver.training import ContrastivePretrainer
    from bioperceiver.training.pretraining import parameter_groups

    processor, embedders, batches = demo_batches(job["batch_size"], job["steps"] + 1, 4096, seed=100 + rank)
    torch.manual_seed(0)
    model = bp.create_model("bioperceiver_debug", modalities=processor.model_modalities(embedders)).set_packed(True)
    trainer = ContrastivePretrainer(model, loss="clip").train()
    opt = torch.optim.AdamW(parameter_groups(trainer, 0.05), lr=1e-4)
    params = [p for p in trainer.parameters() if p.requires_grad]

    comm = [0.0]

    def step(batch):
        trainer(batch["inputs"], batch["patient_id"])["loss"].backward()
        t0 = time.perf_counter()
        if world > 1:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
            flat /= world
            start = 0
            for p in params:
                p.grad.copy_(flat[start : start + p.numel()].view_as(p))
                start += p.numel()
        comm[0] += time.perf_counter() - t0
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(batches[0])  # warm-up
    dist.barrier()
    comm[0] = 0.0
    t = time.perf_counter()
    for batch in batches[1:]:
        step(batch)
    dist.barrier()
    elapsed = time.perf_counter() - t
    if rank == 0:
        queue.put(
            {
                "world_size": world,
                "seconds": elapsed,
                "gradient_all_reduce_seconds": comm[0],  # rank 0, waiting for the other rank included
                "steps": job["steps"],
                "batch_per_process": job["batch_size"],
            }
        )
    dist.destroy_process_group()


def scaling(args) -> dict[str, Any]:
    import multiprocessing as mp
    import socket

    out = {}
    for world in (1, 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        job = {"batch_size": args.scaling_batch, "steps": args.scaling_steps}
        load_before = os.getloadavg()
        procs = [ctx.Process(target=_scaling_worker, args=(r, world, port, job, queue)) for r in range(world)]
        for p in procs:
            p.start()
        r = queue.get(timeout=3600)
        for p in procs:
            p.join()
        r["samples_per_s"] = world * r["batch_per_process"] * r["steps"] / r["seconds"]
        r["load_average_before"], r["load_average_after"] = load_before, os.getloadavg()
        out[f"{world}_process"] = r
        logger.info(
            "%d process(es): %.1f samples/s (load %.1f -> %.1f)",
            world,
            r["samples_per_s"],
            load_before[0],
            os.getloadavg()[0],
        )
    out["efficiency"] = out["2_process"]["samples_per_s"] / (2 * out["1_process"]["samples_per_s"])
    logger.info("2-process scaling efficiency %.2f", out["efficiency"])
    return out


def extrapolate(results: dict[str, Any], target: int) -> dict[str, Any] | None:
    """Least-squares line through the whole-batch peaks (MiB vs N), evaluated at ``target``."""
    pts = [(r["batch_size"], r["peak_rss_above_setup_mib"]) for k, r in results.items() if k.endswith("/whole")]
    if len(pts) < 2 or any(n == target for n, _ in pts):
        return None
    xs, ys = zip(*pts, strict=True)
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x in xs)
    return {"from_sizes": list(xs), "mib_per_sample": slope, "extrapolated_peak_mib": my + slope * (target - mx)}


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--whole_sizes", type=int, nargs="*", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--gc_sizes", type=int, nargs="*", default=[256, 4096])
    parser.add_argument("--max_tokens", type=int, default=4096)
    parser.add_argument("--max_rss_mib", type=float, default=6000.0, help="stop the whole-batch sizes above this")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scaling", action="store_true")
    parser.add_argument("--scaling_batch", type=int, default=64)
    parser.add_argument("--scaling_steps", type=int, default=4)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "large_batch.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    record: dict[str, Any] = {"load_average_start": os.getloadavg(), "args": vars(args) | {"output": str(args.output)}}
    if args.memory:
        record["memory"] = memory(args)
        record["whole_4096_extrapolated"] = extrapolate(record["memory"], 4096)
    if args.scaling:
        record["scaling"] = scaling(args)
    record["load_average_end"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=1) + "\n")
    logger.info("wrote %s", args.output)
    return record


if __name__ == "__main__":
    main()
