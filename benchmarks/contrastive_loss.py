"""Contrastive-loss memory and time at large global batches: the local-loss formulation vs. a naive full gather.

One rank of a data-parallel job is simulated in one process: it holds ``--local_batch`` samples with two views
(``D = --dim``) that require gradients, and the other ``world - 1`` ranks' embeddings arrive as constants (what
``all_gather`` hands over). For each global batch ``G = local x world``:

* **local loss** (``bioperceiver.losses.ClipLoss``): this rank's rows against all ``G`` gathered columns, so the
  logits are ``local x G`` per direction — memory ``O(local x G)``;
* **naive**: every rank computes the full ``G x G`` logits of the global batch (the textbook all-gather CLIP).

Each configuration runs in a fresh subprocess; reported: forward + backward wall time (median of ``--repeats``)
and peak resident memory above the process's baseline (``ru_maxrss``). That the local loss gives exactly the
single-process loss and gradients once all ranks' terms are combined is tested with two real processes in
``tests/test_losses.py``; this benchmark measures one rank's cost only.

    .venv/bin/python benchmarks/contrastive_loss.py            # -> benchmarks/results/contrastive_loss.json
    .venv/bin/python benchmarks/contrastive_loss.py --quick
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"


def naive_clip(z_all: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Full-batch symmetric InfoNCE over G x G logits (every view present)."""
    za, zb = F.normalize(z_all[:, 0], dim=-1), F.normalize(z_all[:, 1], dim=-1)
    logits = scale * za @ zb.T
    target = torch.arange(z_all.shape[0])
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def run_one(mode: str, local: int, world: int, dim: int, repeats: int) -> dict:
    from bioperceiver.losses import ClipLoss
    from bioperceiver.losses import clip as clip_module

    torch.manual_seed(0)
    torch.set_num_threads(1)
    others = torch.randn((world - 1) * local, 2, dim)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss_fn = ClipLoss(init_temperature=0.07)
    times, value, grad = [], None, None
    for _ in range(repeats + 1):
        x = torch.randn(local, 2, dim, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        t0 = time.perf_counter()
        if mode == "local":
            gathered = lambda z, sizes=None: (torch.cat([z, F.normalize(others, dim=-1)]), 0)  # noqa: E731  (rank 0)
            ones = torch.ones(x.shape[0], 2, dtype=torch.bool)
            with (
                mock.patch.object(clip_module, "gather_with_grad", gathered),
                mock.patch.object(
                    clip_module, "gather_no_grad", lambda m, sizes=None, n=local * world: m.new_ones(n, 2)
                ),
                mock.patch.object(clip_module, "global_count", lambda c: (c * world, world)),
            ):
                loss = loss_fn(x, ones)["loss"]
        else:
            loss = naive_clip(torch.cat([x, others]), loss_fn.temperature()) * world  # same DDP scaling
        loss.backward()
        times.append(time.perf_counter() - t0)
        value, grad = float(loss) / world, x.grad.clone()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    return {
        "mode": mode,
        "local": local,
        "world": world,
        "global": local * world,
        "time_s": statistics.median(times[1:]),
        "peak_mib": peak / 1024,
        "loss": value,
        "grad_norm": float(grad.norm()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--local_batch", type=int, default=256)
    p.add_argument("--globals", type=int, nargs="+", default=[256, 1024, 2048, 4096, 8192])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--_one", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._one:
        mode, local, world, dim = args._one
        print(json.dumps(run_one(mode, int(local), int(world), int(dim), args.repeats)))
        return
    if args.quick:
        args.globals, args.repeats = [256, 1024], 1
    rows = []
    for g in args.globals:
        world = g // args.local_batch
        for mode in ("local", "naive"):
            cmd = [sys.executable, __file__, "--_one", mode, str(args.local_batch), str(world), str(args.dim)]
            out = subprocess.run([*cmd, "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"global {g:5d} {mode:5s} {rows[-1]['time_s'] * 1e3:8.1f} ms  {rows[-1]['peak_mib']:8.1f} MiB")
    print(
        f"\n| global batch | world (local {args.local_batch}) | local-loss ms | naive ms | time ratio | "
        "local-loss MiB | naive MiB | memory ratio |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    table = []
    for g in args.globals:
        loc = next(r for r in rows if r["global"] == g and r["mode"] == "local")
        nai = next(r for r in rows if r["global"] == g and r["mode"] == "naive")
        table.append({"global": g, "local": loc, "naive": nai})
        print(
            f"| {g:,} | {loc['world']} | {loc['time_s'] * 1e3:.1f} | {nai['time_s'] * 1e3:.1f} | "
            f"{loc['time_s'] / nai['time_s']:.2f}x | {loc['peak_mib']:.1f} | {nai['peak_mib']:.1f} | "
            f"{loc['peak_mib'] / max(nai['peak_mib'], 1e-9):.2f}x |"
        )
    RESULTS.mkdir(exist_ok=True)
    name = "contrastive_loss_quick.json" if args.quick else "contrastive_loss.json"
    meta = {"local_batch": args.local_batch, "dim": args.dim, "repeats": args.repeats, "torch": torch.__version__}
    (RESULTS / name).write_text(json.dumps({"config": meta, "rows": table}, indent=1) + "\n")
    print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
