#!/usr/bin/env python
"""Inference benchmark (issue 19): ``bioperceiver embed`` throughput and search latency/recall.

    python benchmarks/inference.py --output_dir outputs/bench_inference

1. **embed**: samples/s of :func:`bioperceiver.inference.embed` on the demo cohort (real packaged data, a small
   build) with a randomly initialised ``bioperceiver_debug`` backbone and processors fitted on the cohort, at 1
   process and at 2 processes (two OS processes, each its own shards, as under ``accelerate launch``), against the
   per-sample loop a user would write with ``AutoModel`` (process one row, collate it, run the fused view and each
   modality alone), in the same run.
2. **search**: latency per query and recall@10 against exact search of FAISS ``Flat`` (exhaustive), FAISS
   ``IVF`` (approximate, ``nprobe`` lists) and the numpy matmul (exact) on 10k / 100k / 1M random unit vectors.

Writes ``benchmarks/results/inference.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def prepare(out: Path, max_samples: int) -> tuple[Path, Path]:
    """``(model folder, manifest)``: the demo cohort (``max_samples`` rows drawn at random, seed 0), processors
    fitted on it and a random ``bioperceiver_debug`` backbone saved beside them."""
    import bioperceiver as bp
    from bioperceiver.data import read_manifest, write_manifest
    from bioperceiver.data.fitting import fit_processors
    from bioperceiver.data.recipes.demo import build_demo_cohort

    manifest = build_demo_cohort(out / "cohort", padchest_studies=60, survset_datasets=("gse4335",))
    m = read_manifest(manifest)
    small = manifest.parent / "bench.parquet"
    write_manifest(m.table.sample(n=min(max_samples, len(m)), random_state=0), small, m.metadata)
    model_dir = out / "model"
    if model_dir.exists():  # this benchmark's own model of an earlier run: fitted and saved anew
        shutil.rmtree(model_dir)
    fit = fit_processors(
        small, model_dir, settings=str(ROOT / "tokenizers" / "demo_processors.yaml"), allow_invalid=True
    )
    torch.manual_seed(0)
    bp.create_model("bioperceiver_debug", modalities=fit.modalities).save_pretrained(model_dir)
    return model_dir, small


def per_sample_loop(model_dir: Path, manifest: Path) -> float:
    """Samples/s of the loop a user would write with ``AutoModel``: one row at a time, fused + each modality."""
    from transformers import AutoModel

    from bioperceiver.data import BioPerceiverCollator, BioPerceiverProcessor, read_manifest

    model = AutoModel.from_pretrained(model_dir).eval()
    processor = BioPerceiverProcessor.from_pretrained(model_dir)
    collate = BioPerceiverCollator(processor.modalities)
    m = read_manifest(manifest)
    t = time.perf_counter()
    n = 0
    for record in m.records():
        try:
            sample = processor(record, base_dir=m.base_dir, on_error="skip_modality")
        except Exception:  # a row with nothing readable: a user's loop would skip it too
            continue
        batch = collate([sample], train=False)
        if batch is None:
            continue
        with torch.inference_mode():
            views = [model(inputs=batch["inputs"]).pooler_output]
            views += [model(inputs={name: arrays}).pooler_output for name, arrays in batch["inputs"].items()]
        n += 1
    return n / (time.perf_counter() - t)


def embed_rate(model_dir: Path, manifest: Path, out: Path, processes: int, batch_size: int) -> float:
    """Samples/s of ``processes`` OS processes embedding their own shards at once: rows over the span from the
    first process starting ``embed`` to the last finishing (after imports and model loading, like the loop)."""
    code = (
        "import sys, time, json; from bioperceiver.inference.embedding import embed; "
        "from bioperceiver.inference.loading import load_model_folder; "
        f"m = load_model_folder({str(model_dir)!r}, device='cpu'); t0 = time.time(); "
        f"r = embed(m, {str(manifest)!r}, {str(out)!r}, batch_size={batch_size}, shard_size=8, "
        f"process_index=int(sys.argv[1]), num_processes={processes}, progress=False); "
        "print('SPAN', json.dumps([t0, time.time(), r.rows]))"
    )
    threads = str(max(1, (os.cpu_count() or 1) // processes))  # no oversubscription: the cores are shared out
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(i)], env=env, stdout=subprocess.PIPE, text=True)
        for i in range(processes)
    ]
    spans = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"embed process failed ({p.returncode})")
        spans.append(json.loads(next(line for line in stdout.splitlines() if line.startswith("SPAN"))[5:]))
    rows = sum(s[2] for s in spans)
    return rows / (max(s[1] for s in spans) - min(s[0] for s in spans))


def bench_search(sizes, dim: int, n_queries: int, nprobes) -> list[dict]:
    import faiss

    from bioperceiver.inference.retrieval import EmbeddingIndex, EmbeddingSet, normalize

    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        data = normalize(rng.standard_normal((n, dim), dtype=np.float32))
        q = normalize(rng.standard_normal((n_queries, dim), dtype=np.float32))
        exact_index = EmbeddingIndex(EmbeddingSet(data, [""] * n, [""] * n), backend="exact")  # the exact backend
        t = time.perf_counter()
        _, exact = exact_index.search(q, 10)
        t_exact = (time.perf_counter() - t) / n_queries
        flat = faiss.IndexFlatIP(dim)
        flat.add(data)
        t = time.perf_counter()
        _, i_flat = flat.search(q, 10)
        t_flat = (time.perf_counter() - t) / n_queries
        nlist = int(np.sqrt(n))
        ivf = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        t = time.perf_counter()
        ivf.train(data[rng.choice(n, size=min(n, 30 * nlist), replace=False)])
        ivf.add(data)
        t_build = time.perf_counter() - t

        def recall(ids, exact=exact):
            return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)]))

        approx = {}
        for nprobe in nprobes:
            ivf.nprobe = nprobe
            t = time.perf_counter()
            _, i_ivf = ivf.search(q, 10)
            approx[f"faiss_ivf{nlist}_nprobe{nprobe}_ms_per_query"] = 1e3 * (time.perf_counter() - t) / n_queries
            approx[f"faiss_ivf{nlist}_nprobe{nprobe}_recall@10"] = recall(i_ivf)

        row = {
            "n": n,
            "dim": dim,
            "queries": n_queries,
            "exact_matmul_ms_per_query": 1e3 * t_exact,
            "faiss_flat_ms_per_query": 1e3 * t_flat,
            "faiss_flat_recall@10": recall(i_flat),
            **approx,
            "faiss_ivf_build_s": t_build,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        del data, flat, ivf
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="outputs/bench_inference")
    p.add_argument("--max_samples", type=int, default=48)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--search_sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 32])
    p.add_argument("--skip_embed", action="store_true")
    p.add_argument("--skip_search", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.output_dir)
    results: dict = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if not args.skip_embed:
        import shutil

        model_dir, manifest = prepare(out, args.max_samples)
        for name in ("emb1", "emb2"):
            shutil.rmtree(out / name, ignore_errors=True)
        results["embed"] = {
            "samples": args.max_samples,
            "per_sample_automodel_loop_samples_per_s": per_sample_loop(model_dir, manifest),
            "embed_1_process_samples_per_s": embed_rate(model_dir, manifest, out / "emb1", 1, args.batch_size),
            "embed_2_processes_samples_per_s": embed_rate(model_dir, manifest, out / "emb2", 2, args.batch_size),
        }
        print(json.dumps(results["embed"]), flush=True)
    if not args.skip_search:
        results["search"] = bench_search(args.search_sizes, args.dim, args.queries, args.nprobe)
    path = ROOT / "benchmarks" / "results" / "inference.json"
    if path.exists():  # a part run alone keeps the other part's recorded numbers
        results = {**json.loads(path.read_text()), **results}
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"written {path}")
    return results


if __name__ == "__main__":
    main()
