"""What a pretraining run measures besides its loss: tokens per modality per second (:class:`TokenCounter`) and the
model card's "compute used" (:func:`compute_facts`)."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from .._version import __version__


class TokenCounter:
    """Counts the tokens each modality's embedder hands to the encoder (its keep-mask: padding, absent samples and
    dropped modalities excluded) during training forwards with a graph (gradient caching's first, graph-free pass is
    not counted twice). Counts stay on the device until :meth:`take`."""

    def __init__(self, model: torch.nn.Module):
        self.names = list(model.modality_names)
        self.skip_last = 0  # trailing padding rows (RankPadder) not counted
        self.counts: dict[str, torch.Tensor] = {}
        for name in self.names:
            model.embedders[name].register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def hook(module, args, output):
            if module.training and torch.is_grad_enabled():  # not the graph-free pass of gradient caching
                keep = output[1].detach()
                keep = (keep[: len(keep) - self.skip_last] if self.skip_last else keep).sum()
                self.counts[name] = keep if name not in self.counts else self.counts[name] + keep

        return hook

    def take(self, device) -> torch.Tensor:
        """Counts since the last call, one per modality (``self.names`` order), as an int64 tensor on ``device``."""
        out = torch.stack([self.counts.get(n, torch.zeros((), dtype=torch.long)).to(device) for n in self.names])
        self.counts = {}
        return out.long()


def cpu_load_warning(device_type: str, load: float | None = None, cores: int | None = None) -> str | None:
    """A warning when a CPU run starts on cores other processes already keep busy, else ``None``.

    ``load``: the 1-minute load average (default :func:`os.getloadavg`), ``cores``: :func:`os.cpu_count`. Several
    torch jobs on the same cores each start one thread per core, and together they run many times slower than one
    after the other (measured on a 2-core machine: pretraining ~80x slower beside other torch jobs), which makes
    timings and throughputs meaningless. Warns above ``cores + 0.5`` (this process's own start-up counts about 1)."""
    if device_type != "cpu":
        return None
    try:
        load = os.getloadavg()[0] if load is None else load
    except (AttributeError, OSError):  # no load average on this platform
        return None
    cores = cores or os.cpu_count() or 1
    if load <= cores + 0.5:
        return None
    return (
        f"CPU load average {load:.1f} on {cores} cores before this run: other processes are using the cores, and "
        f"torch starts {torch.get_num_threads()} threads here, so this run (and its timings) will be much slower. "
        "Run one job at a time, or give each job its share (OMP_NUM_THREADS=1 or torch.set_num_threads)."
    )


def numerics_facts() -> dict[str, Any]:
    """What decides a run's float results besides its code, data and seeds: the library versions, torch's intra-op
    thread count and the CPU kernels torch dispatches to (``ATEN_CPU_CAPABILITY``; AVX2 and AVX-512 kernels sum in
    different orders). Runs agree bit for bit only where these agree: the same SurvSet pretraining on 1 vs 2 threads,
    or on AVX2 vs AVX-512 kernels, ends at different weights (benchmarks/RESULTS.md)."""
    import accelerate
    import transformers

    return {
        "software": f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"accelerate {accelerate.__version__}, bioperceiver {__version__}",
        "torch threads per process": torch.get_num_threads(),
        "CPU kernels": torch.backends.cpu.get_cpu_capability(),
    }


def compute_facts(
    accelerator,
    steps: int,
    totals: dict,
    config,
    *,
    local_batch: int | None = None,
    world_changes: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The model card's "compute used": hardware, processes, precision, wall-clock, steps, samples.

    ``config``: the :class:`~bioperceiver.training.config.PretrainConfig` of the run; ``local_batch``: samples per
    process and forward (default ``train.batch_size``; other after a resume on another number of processes);
    ``world_changes``: the resumes on another number of processes (``world_size_changes`` of the checkpoint)."""
    device = accelerator.device
    if device.type == "cuda":
        hardware = f"{accelerator.num_processes} x {torch.cuda.get_device_name(device)}"
    else:
        hardware = f"{device.type}: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    tr = config.train
    seconds = totals["train_seconds"]
    facts = {
        "hardware": hardware,
        "processes": accelerator.num_processes,
        "machines": int(os.environ.get("WORLD_SIZE", 1)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
        "distributed type": accelerator.distributed_type.value,
        "mixed precision": accelerator.mixed_precision,
        "wall-clock": f"{seconds / 3600:.2f} h ({seconds:.0f} s, whole run incl. evaluation and resumes)",
        "optimizer steps": steps,
        "global batch": (local_batch or tr.batch_size) * tr.gradient_accumulation_steps * accelerator.num_processes,
        "samples seen": totals["samples_seen"],
        **numerics_facts(),
    }
    if world_changes:
        facts["process count changes"] = "; ".join(
            f"{c['from_processes']} -> {c['to_processes']} processes at step {c['step']} "
            f"({c['per_process_batch']} samples per process, contrastive batch {c['global_batch']} kept)"
            for c in world_changes
        )
    return facts
