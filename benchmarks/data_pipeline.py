"""Data pipeline throughput on the real demo cohort, and how many CPU workers keep a model fed.

What is measured (all on the demo cohort's real cells, ``bioperceiver.data.recipes.demo``, processed with the
settings of ``tokenizers/demo_processors.yaml``, processors fitted on the train split as ``make demo`` does):

1. **Per processor** (each modality column): samples/s of ``processor(cell, train=...)`` over that column's
   non-null cells, with ``train=False`` and ``train=True`` (augmentations / random windows).
2. **Per source** (``meta_source``): samples/s of a whole manifest row through ``BioPerceiverProcessor``; the demo
   mix is the row-weighted harmonic mean of the sources (the time per sample of a random row).
3. **Collator**: samples/s of ``BioPerceiverCollator`` on batches of processed samples drawn at random from the
   whole cohort, without and with modality dropout.
4. **Model**: forward + backward (``pooler_output.pow(2).mean()``, no optimiser step) of a freshly initialised
   ``--preset`` whose modalities come from ``processor.model_modalities(embedders)``, on the same collated demo
   batches, on this CPU with ``--model_threads`` threads. It is the model throughput the workers-needed ratio is
   computed against; ``--model_samples_per_s`` adds other throughputs (e.g. one measured on a GPU).
5. **datasets.map** (``build_dataset``, cached): samples/s of the first build with ``num_proc`` 1 and 2, the time
   of the cache hit, and samples/s of reading the cached rows back (``to_sample``, the path ``make demo`` uses).

Pipeline measurements (1-3) run in one process pinned to one CPU core with ``torch.set_num_threads(1)``: the
numbers are **per DataLoader worker**. Each measurement: warm-up on a spread of the cells, then ``--repeats``
timed runs (``time.perf_counter``) of at least ``--min_samples`` samples and ``--min_seconds`` seconds; the
median is reported. Seeds are fixed. Workers needed = model samples/s x (seconds per sample of one worker:
row processing + collation), for the demo mix, for the worst source, and for the cached path.

Run (the numbers in benchmarks/RESULTS.md; about 3-4 minutes on the 2-core VM)::

    .venv/bin/python benchmarks/data_pipeline.py
    .venv/bin/python benchmarks/data_pipeline.py --quick                        # smoke run, ~20 s
    .venv/bin/python benchmarks/data_pipeline.py --model_samples_per_s 900     # plug in a measured GPU throughput
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

logger = logging.getLogger("benchmarks.data_pipeline")
ROOT = Path(__file__).resolve().parents[1]
VERSIONS = (
    "torch",
    "numpy",
    "pandas",
    "pyarrow",
    "scipy",
    "datasets",
    "monai",
    "pydicom",
    "tokenizers",
    "bioperceiver",
)


# ---- timing -------------------------------------------------------------------------------------------------------
def measure(
    fn: Callable[[Any, np.random.Generator], Any],
    items: Sequence[Any],
    *,
    repeats: int,
    min_samples: int,
    min_seconds: float,
    seed: int,
    warmup: Sequence[Any] = (),
    weight: Callable[[Any], int] = lambda _: 1,
) -> dict[str, Any]:
    """Median samples/s of ``fn(item, rng)`` cycling over ``items`` (a fixed shuffled order), after calling it on
    ``warmup``. Each repeat runs until it has done ``min_samples`` samples and ``min_seconds`` seconds; ``weight``
    says how many samples one item is (a batch)."""
    rng = np.random.default_rng([seed, 1_000_000])
    for item in warmup:
        fn(item, rng)
    rates = []
    for r in range(repeats):
        rng = np.random.default_rng([seed, r])
        n = done = 0
        start = time.perf_counter()
        while done < min_samples or time.perf_counter() - start < min_seconds:
            item = items[n % len(items)]
            fn(item, rng)
            done += weight(item)
            n += 1
        rates.append(done / (time.perf_counter() - start))
    return {"samples_per_s": statistics.median(rates), "runs": rates}


def spread(items: Sequence[Any], k: int) -> list[Any]:
    """``k`` items evenly spread over ``items`` (warm-up touches every file/source of a column)."""
    if len(items) <= k:
        return list(items)
    return [items[int(i * len(items) / k)] for i in range(k)]


def shuffled(items: Sequence[Any], seed: int) -> list[Any]:
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order]


@contextlib.contextmanager
def one_core(pin: bool = True):
    """Pin the process to one CPU core and torch to one thread: what one DataLoader worker gets (``pin=False``:
    one torch thread only, e.g. for a parent whose forked workers must be free to use every core)."""
    threads = torch.get_num_threads()
    affinity = os.sched_getaffinity(0) if pin and hasattr(os, "sched_getaffinity") else None
    torch.set_num_threads(1)
    if affinity:
        os.sched_setaffinity(0, {min(affinity)})
    try:
        yield
    finally:
        if affinity:
            os.sched_setaffinity(0, affinity)
        torch.set_num_threads(threads)


# ---- setup --------------------------------------------------------------------------------------------------------
def setup(args) -> tuple[Any, Any, dict, dict]:
    """Build (or reuse) the demo cohort, assign splits, fit the processors; returns manifest, processor, model
    modalities and the fit time per processor."""
    from bioperceiver.data import BioPerceiverProcessor, assign_splits, read_manifest
    from bioperceiver.data.recipes.demo import build_demo_cohort

    path = build_demo_cohort(args.cohort_dir, padchest_studies=args.padchest_studies, seed=args.seed)
    manifest = assign_splits(read_manifest(path))
    if args.max_rows_per_source:
        table = manifest.table
        rows = table.groupby("meta_source", sort=False).head(args.max_rows_per_source).index
        manifest = manifest.subset(rows)
    data = yaml.safe_load(Path(args.settings).read_text())
    settings, embedders = dict(data.get("processors", {})), dict(data.get("embedders", {}))
    processor = BioPerceiverProcessor.from_manifest(manifest, settings)
    fit_s = {}
    for name, proc in tqdm(processor.processors.items(), desc="fitting processors", leave=False, disable=None):
        start = time.perf_counter()
        BioPerceiverProcessor({name: proc}).fit(manifest)  # the train split, as BioPerceiverProcessor.fit does
        fit_s[name] = time.perf_counter() - start
    processor = BioPerceiverProcessor(processor.processors)
    return manifest, processor, processor.model_modalities(embedders), fit_s


def describe(kind: str, arrays: dict) -> tuple[str, int]:
    """A short description of one processed value and its length in the model's input units."""
    from bioperceiver.modalities import get_modality

    return get_modality(kind).describe(arrays)


# ---- benchmarks ---------------------------------------------------------------------------------------------------
def bench_processors(manifest, processor, args) -> dict[str, dict]:
    out = {}
    tasks = [(n, t) for n in processor.processors for t in (False, True)]
    for name, train in tqdm(tasks, desc="per processor", leave=False, disable=None):
        proc = processor.processors[name]
        cells = manifest.table[name].dropna().tolist()
        base = manifest.base_dir

        def fn(cell, rng, proc=proc, train=train, base=base):
            return proc(cell, base_dir=base, train=train, rng=rng)

        r = measure(fn, shuffled(cells, args.seed), warmup=spread(cells, args.warmup), **_opts(args))
        entry = out.setdefault(name, {"kind": proc.kind, "cells": len(cells)})
        entry["train" if train else "eval"] = r
        if not train:
            shape, lengths = None, []
            for cell in spread(cells, 32):
                shape, length = describe(proc.kind, fn(cell, np.random.default_rng(args.seed)))
                lengths.append(length)
            entry["output"] = shape
            entry["median_length"] = float(statistics.median(lengths))
        logger.info(
            "%-18s train=%-5s %9.1f samples/s (%.3f ms)", name, train, r["samples_per_s"], 1e3 / r["samples_per_s"]
        )
    return out


def bench_sources(manifest, processor, args) -> dict[str, dict]:
    records = manifest.records()
    sources: dict[str, list[dict]] = {}
    for rec in records:
        sources.setdefault(rec["meta_source"], []).append(rec)
    out = {}
    tasks = [(s, t) for s in sources for t in (False, True)]
    for source, train in tqdm(tasks, desc="per source", leave=False, disable=None):
        recs = sources[source]

        def fn(rec, rng, train=train):
            return processor(rec, base_dir=manifest.base_dir, train=train, rng=rng)

        r = measure(fn, shuffled(recs, args.seed), warmup=spread(recs, args.warmup), **_opts(args))
        entry = out.setdefault(
            source,
            {
                "rows": len(recs),
                "share": len(recs) / len(records),
                "modalities": [m for m in processor.processors if any(rec.get(m) is not None for rec in recs)],
            },
        )
        entry["train" if train else "eval"] = r
        logger.info(
            "%-18s train=%-5s %9.1f samples/s (%.3f ms)", source, train, r["samples_per_s"], 1e3 / r["samples_per_s"]
        )
    mix = {  # a random row of the cohort: the row-weighted mean time per sample
        mode: {"samples_per_s": 1 / sum(e["share"] / e[mode]["samples_per_s"] for e in out.values())}
        for mode in ("eval", "train")
    }
    out["_mix"] = mix
    return out


def collate_batches(manifest, processor, args) -> list[list[dict]]:
    """Processed samples (train=True) of rows drawn at random from the whole cohort, cut into batches."""
    records = shuffled(manifest.records(), args.seed)
    need = min(len(records), args.batches * args.batch_size)
    rng = np.random.default_rng(args.seed)
    samples = [processor(r, base_dir=manifest.base_dir, train=True, rng=rng) for r in records[:need]]
    return [samples[i : i + args.batch_size] for i in range(0, need, args.batch_size)]


def bench_collator(processor, batches, args) -> dict[str, dict]:
    from bioperceiver.data import BioPerceiverCollator

    out = {}
    for dropout in (0.0, args.modality_dropout):
        collator = BioPerceiverCollator(processor.modalities, modality_dropout=dropout, seed=args.seed)

        def fn(batch, rng, collator=collator):
            return collator(batch, train=True)

        r = measure(fn, batches, warmup=batches, weight=len, **_opts(args))
        out[f"dropout={dropout:g}"] = r
        logger.info("collator dropout=%-4g %9.1f samples/s", dropout, r["samples_per_s"])
    return out


def bench_model(processor, modalities, batches, args) -> dict[str, Any]:
    import bioperceiver as bp
    from bioperceiver.data import BioPerceiverCollator

    collator = BioPerceiverCollator(processor.modalities, modality_dropout=args.modality_dropout, seed=args.seed)
    inputs = [collator(b, train=True)["inputs"] for b in batches[: args.model_batches]]
    threads = torch.get_num_threads()
    torch.set_num_threads(args.model_threads)
    try:
        torch.manual_seed(args.seed)
        model = bp.create_model(args.preset, modalities=modalities).train()
        with torch.no_grad():
            kept, padded = [], []
            for x in inputs:
                emb = model.embed(x)
                kept.append(sum(int(k.sum()) for _, k in emb.values()) / next(iter(emb.values()))[1].shape[0])
                padded.append(sum(k.shape[1] for _, k in emb.values()))

        def step(x, rng):
            model.zero_grad(set_to_none=True)
            model(inputs=x).pooler_output.float().pow(2).mean().backward()

        sizes = {id(x): len(b) for x, b in zip(inputs, batches)}
        r = measure(
            step,
            inputs,
            warmup=inputs[:1],
            weight=lambda x: sizes[id(x)],
            repeats=args.repeats,
            min_samples=len(batches[0]) * len(inputs),
            min_seconds=args.min_seconds,
            seed=args.seed,
        )
    finally:
        torch.set_num_threads(threads)
    r.update(
        preset=args.preset,
        threads=args.model_threads,
        batch_size=args.batch_size,
        batches=len(inputs),
        parameters=sum(p.numel() for p in model.parameters()),
        tokens_per_sample_kept=statistics.mean(kept),
        tokens_per_batch_padded=statistics.mean(padded),
    )
    logger.info("model %s fwd+bwd %9.1f samples/s (%d threads)", args.preset, r["samples_per_s"], args.model_threads)
    return r


def bench_map(manifest, processor, args) -> dict[str, dict]:
    """``build_dataset`` in the manifest's row order (the demo cohort is sorted by source) and, for ``num_proc``
    > 1, with the rows shuffled first: ``datasets.map`` gives each worker a contiguous shard."""
    import datasets

    from bioperceiver.data import build_dataset, to_sample

    datasets.disable_progress_bars()
    shuffled_manifest = manifest.subset(np.random.default_rng(args.seed).permutation(len(manifest)))
    variants = [(p, False) for p in args.num_proc] + [(p, True) for p in args.num_proc if p > 1]
    out = {}
    n = len(manifest)
    for num_proc, shuffle in variants:
        source = shuffled_manifest if shuffle else manifest
        key = f"num_proc={num_proc}" + (", rows shuffled" if shuffle else "")
        builds, hits, reads = [], [], []
        for _ in tqdm(range(args.repeats), desc=f"datasets.map {key}", leave=False, disable=None):
            # a fresh cache folder per run (Manifest.subset keeps the file's path, which the cache key is made of)
            with tempfile.TemporaryDirectory(dir=args.cohort_dir) as cache, one_core(pin=num_proc == 1):
                start = time.perf_counter()
                ds, _ = build_dataset(source, processor, num_proc=num_proc, cache_dir=cache, train=True)
                builds.append(n / (time.perf_counter() - start))
                start = time.perf_counter()
                ds, _ = build_dataset(source, processor, num_proc=num_proc, cache_dir=cache, train=True)
                hits.append(time.perf_counter() - start)
                with one_core():
                    start = time.perf_counter()
                    for row in ds:
                        to_sample(row, processor)
                    reads.append(len(ds) / (time.perf_counter() - start))
                del ds
        e = out[key] = {
            "num_proc": num_proc,
            "rows_shuffled": shuffle,
            "rows": n,
            "build_samples_per_s": statistics.median(builds),
            "cache_hit_s": statistics.median(hits),
            "cached_read_samples_per_s": statistics.median(reads),
            "runs": {"build": builds, "cache_hit_s": hits, "read": reads},
        }
        logger.info(
            "datasets.map %s: build %.1f samples/s, cache hit %.2f s, cached read %.1f samples/s",
            key,
            e["build_samples_per_s"],
            e["cache_hit_s"],
            e["cached_read_samples_per_s"],
        )
    return out


def _opts(args) -> dict[str, Any]:
    return {key: getattr(args, key) for key in ("repeats", "min_samples", "min_seconds", "seed")}


def recorded_backbone() -> dict[str, Any] | None:
    """The smallest-token CPU point of the backbone benchmark recorded in benchmarks/RESULTS.md."""
    path = Path(__file__).parent / "results" / "backbone_base_cpu_fp32_default_malloc.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    n = min(data["results"], key=int)
    r = data["results"][n]["bioperceiver"]
    return {
        "source": str(path.relative_to(ROOT)),
        "preset": data["preset"],
        "tokens_per_sample": int(n),
        "batch": r["batch"],
        "samples_per_s": r["batch"] / r["step_s"],
    }


# ---- report -------------------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    model = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln),
        platform.processor(),
    )
    versions = {}
    for dist in VERSIONS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "date": time.strftime("%Y-%m-%d"),
    }


def workers_table(results: dict, args) -> tuple[list[str], list[dict]]:
    srcs = {k: v for k, v in results["sources"].items() if not k.startswith("_")}
    worst = min(srcs, key=lambda s: srcs[s]["train"]["samples_per_s"])
    collate_s = 1 / results["collator"][f"dropout={args.modality_dropout:g}"]["samples_per_s"]
    per_sample = {
        "demo mix, on the fly": 1 / results["sources"]["_mix"]["train"]["samples_per_s"] + collate_s,
        f"worst source ({worst}), on the fly": 1 / srcs[worst]["train"]["samples_per_s"] + collate_s,
    }
    if results.get("map"):
        best = max(results["map"].values(), key=lambda m: m["cached_read_samples_per_s"])
        per_sample["demo mix, cached datasets.map rows"] = 1 / best["cached_read_samples_per_s"] + collate_s
    models = [
        (
            f"{args.preset} fwd+bwd, this CPU, {args.model_threads} threads (same run)",
            results["model"]["samples_per_s"],
        )
    ]
    bb = results.get("backbone_recorded")
    if bb:
        models.append(
            (
                f"backbone benchmark ({bb['preset']} encoder, CPU fp32, {bb['tokens_per_sample']:,} tokens/sample, "
                "RESULTS.md)",
                bb["samples_per_s"],
            )
        )
    models += [(f"--model_samples_per_s {v:g}", v) for v in args.model_samples_per_s]
    models.append(("per 1,000 model samples/s (scale to a GPU's throughput; no GPU measured)", 1000.0))
    rows = []
    header = ["| model throughput | model samples/s | " + " | ".join(f"workers: {k}" for k in per_sample) + " |"]
    header.append("|---|---:|" + "---:|" * len(per_sample))
    for label, rate in models:
        need = {k: rate * s for k, s in per_sample.items()}
        rows.append({"model": label, "model_samples_per_s": rate, "workers_needed": need})
        header.append(
            f"| {label} | {rate:,.1f} | " + " | ".join(f"{v:,.2f} ({math.ceil(v)})" for v in need.values()) + " |"
        )
    results["worker_seconds_per_sample"] = per_sample
    return header, rows


def report(results: dict, args) -> str:
    m = results["machine"]
    lines = [
        f"cohort: {results['rows']} rows from {results['cohort']} | settings {args.settings} | seed {args.seed}",
        f"machine: {m['cpu']}, {m['cpu_count']} CPUs | python {m['python']} | "
        + " ".join(f"{k}={v}" for k, v in m["versions"].items() if v),
        f"pipeline: one process pinned to one core, torch.set_num_threads(1); repeats={args.repeats} (median), "
        f">= {args.min_samples} samples and >= {args.min_seconds:g} s per run, warm-up on {args.warmup} cells",
        "",
        "Per processor (one cell of the column -> arrays), samples/s per worker",
        "",
        "| modality | kind | cells | output (median length) | eval samples/s | train samples/s | train ms/sample "
        "| fit s |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for name, e in results["processors"].items():
        ev, tr = e["eval"]["samples_per_s"], e["train"]["samples_per_s"]
        lines.append(
            f"| {name} | {e['kind']} | {e['cells']} | {e['output']} ({e['median_length']:g}) | {ev:,.1f} | "
            f"{tr:,.1f} | {1e3 / tr:.3f} | {results['fit_s'][name]:.2f} |"
        )
    lines += [
        "",
        "Per source (a whole manifest row through BioPerceiverProcessor), samples/s per worker",
        "",
        "| source | rows | share | modalities | eval samples/s | train samples/s | train ms/sample |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for name, e in results["sources"].items():
        tr = e["train"]["samples_per_s"]
        if name == "_mix":
            lines.append(
                f"| **demo mix** (row-weighted) | {results['rows']} | 100% | | {e['eval']['samples_per_s']:,.1f} | "
                f"{tr:,.1f} | {1e3 / tr:.3f} |"
            )
            continue
        lines.append(
            f"| {name} | {e['rows']} | {e['share']:.1%} | {', '.join(e['modalities'])} | "
            f"{e['eval']['samples_per_s']:,.1f} | {tr:,.1f} | {1e3 / tr:.3f} |"
        )
    lines += [
        "",
        f"Collator (batches of {args.batch_size} processed samples drawn from the whole cohort, train=True), "
        "samples/s per worker",
        "",
        "| modality dropout | samples/s | ms per batch |",
        "|---|---:|---:|",
    ]
    for name, e in results["collator"].items():
        lines.append(
            f"| {name.split('=')[1]} | {e['samples_per_s']:,.0f} | {1e3 * args.batch_size / e['samples_per_s']:.2f} |"
        )
    mo = results["model"]
    lines += [
        "",
        f"Model: {mo['preset']} ({mo['parameters']:,} parameters), forward + backward on {mo['batches']} demo "
        f"batch(es) of {mo['batch_size']} (modality dropout {args.modality_dropout:g}), {mo['threads']} threads: "
        f"**{mo['samples_per_s']:,.1f} samples/s**; tokens per sample {mo['tokens_per_sample_kept']:,.0f} kept, "
        f"{mo['tokens_per_batch_padded']:,.0f} per padded batch row",
    ]
    if results.get("map"):
        lines += [
            "",
            "datasets.map (build_dataset, all rows, train=True, fresh cache dir per run)",
            "",
            "| num_proc | row order | build samples/s | cache hit s | cached read + to_sample samples/s (1 core) |",
            "|---:|---|---:|---:|---:|",
        ]
        for e in results["map"].values():
            order = "shuffled" if e["rows_shuffled"] else "manifest (sorted by source)"
            lines.append(
                f"| {e['num_proc']} | {order} | {e['build_samples_per_s']:,.1f} | {e['cache_hit_s']:.2f} | "
                f"{e['cached_read_samples_per_s']:,.1f} |"
            )
    table, rows = workers_table(results, args)
    results["workers_needed"] = rows
    lines += [
        "",
        "CPU workers needed to keep the model fed = model samples/s x worker seconds per sample (processing + "
        f"collation with dropout {args.modality_dropout:g}); rounded up in brackets",
        "",
        *table,
        "",
        "GPU: not measured (no GPU lent to this run); the backbone benchmark recorded no GPU numbers either.",
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort_dir", type=Path, default=ROOT / "outputs" / "bench_data_pipeline" / "cohort")
    parser.add_argument("--settings", default=str(ROOT / "tokenizers" / "demo_processors.yaml"))
    parser.add_argument("--padchest_studies", type=int, default=600)
    parser.add_argument("--max_rows_per_source", type=int, default=None, help="subsample the cohort (smoke runs)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min_samples", type=int, default=16, help="minimum samples per timed run")
    parser.add_argument("--min_seconds", type=float, default=0.5, help="minimum seconds per timed run")
    parser.add_argument("--warmup", type=int, default=8, help="cells processed before timing")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8, help="collated batches (random rows of the cohort)")
    parser.add_argument("--modality_dropout", type=float, default=0.2)
    parser.add_argument("--preset", default="bioperceiver_small")
    parser.add_argument("--model_batches", type=int, default=4)
    parser.add_argument("--model_threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--model_samples_per_s", type=float, nargs="*", default=[], help="e.g. a GPU's measured")
    parser.add_argument("--num_proc", type=int, nargs="*", default=[1, 2], help="datasets.map workers (none: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run (< 1 minute): few rows, one repeat")
    parser.add_argument("--output", type=Path, default=None, help="JSON results (default benchmarks/results/)")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_rows_per_source = args.max_rows_per_source or 8
        args.repeats, args.min_samples, args.min_seconds, args.warmup = 1, 2, 0.05, 2
        args.batch_size, args.batches, args.model_batches, args.num_proc = 8, 2, 1, args.num_proc[:1]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("bioperceiver").setLevel(logging.ERROR)  # per-run "not tokenised" counts
    warnings.filterwarnings("ignore")
    with logging_redirect_tqdm():
        results = run(args)
    print(results["report"])
    print(f"\nwall time {results['wall_s']:.0f} s")
    name = "data_pipeline_quick.json" if args.quick else "data_pipeline.json"
    output = args.output or Path(__file__).parent / "results" / name
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1, default=str) + "\n")
    logger.info("wrote %s", output)
    return results


def run(args) -> dict[str, Any]:
    start = time.perf_counter()
    manifest, processor, modalities, fit_s = setup(args)
    results: dict[str, Any] = {
        "cohort": str(manifest.path),
        "rows": len(manifest),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine(),
        "fit_s": fit_s,
        "model_modalities": modalities,
    }
    logger.info("cohort %s: %d rows; processors fitted in %.1f s", manifest.path, len(manifest), sum(fit_s.values()))
    with one_core():
        results["pipeline_torch_threads"] = torch.get_num_threads()
        results["processors"] = bench_processors(manifest, processor, args)
        results["sources"] = bench_sources(manifest, processor, args)
        batches = collate_batches(manifest, processor, args)
        results["collator"] = bench_collator(processor, batches, args)
    results["model"] = bench_model(processor, modalities, batches, args)
    results["backbone_recorded"] = recorded_backbone()
    results["map"] = bench_map(manifest, processor, args) if args.num_proc else {}
    results["wall_s"] = time.perf_counter() - start
    results["report"] = report(results, args)
    return results


if __name__ == "__main__":
    main()
