#!/usr/bin/env python
"""How many directions do pretrained backbones use? Held-out spectra of the latent embeddings, side by side.

For each pretraining run folder of each group (``--group NAME RUN...``, e.g. the same folds pretrained with and
without ``loss.decorrelation``): its ``final/`` backbone is loaded with ``bioperceiver.inference``, the held-out split
of its own manifest (the run config's ``data.manifest`` and ``eval.split``, split as the run split it; no labels) is
embedded with ``embed`` (``--space latent``, what downstream models get), and for every view (each modality alone and
the fused view):

- the effective rank (Roy & Vetterli: ``exp`` of the entropy of the normalised singular values) of the centred
  embeddings, and of the standardised ones (each dimension scaled to unit variance: what a user's PCA or ridge model
  after standardisation sees);
- the mean squared off-diagonal correlation of the dimensions (what ``loss.decorrelation`` penalises in batches);
- the run's own recorded held-out ``R@1`` of every pair of views (``eval_results.json``) and its chance level.

Groups are compared run by run in the order given (paired: the same fold, the same held-out patients), every group
against the first. Outputs (``--output_dir``): ``embedding_spectrum.json`` and ``embedding_spectrum.md``.

    python benchmarks/embedding_spectrum.py --group plain runs/plain/fold{0,1,2,3,4} \\
        --group decorrelation runs/decor/fold{0,1,2,3,4} --output_dir outputs/embedding_spectrum
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger("embedding_spectrum")


@functools.cache
def _sibling(name: str):
    """``benchmarks/<name>.py`` as a module: ``pretraining_diagnostics`` (its ``effective_rank`` is the one reported
    there) and ``retrieval_space`` (its held-out embedding of a run is the one compared there)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def effective_rank(x: np.ndarray) -> float:
    """Roy & Vetterli's effective rank of the centred rows of ``x`` (N, D) (``pretraining_diagnostics``'): ``exp``
    of the entropy of its normalised singular values; k for k equal non-zero singular values, 1 for rank one."""
    return _sibling("pretraining_diagnostics").effective_rank(x)


def spectrum_stats(x: np.ndarray) -> dict:
    """Effective rank of the centred and of the standardised rows, and the mean squared off-diagonal correlation of
    the dimensions (constant dimensions left out of the last two)."""
    x = np.asarray(x, dtype=np.float64)
    sd = x.std(0)
    live = sd > 1e-12
    z = (x[:, live] - x[:, live].mean(0)) / sd[live]
    d = int(live.sum())
    corr = np.corrcoef(z, rowvar=False) if d > 1 else np.ones((1, 1))
    off = corr[~np.eye(d, dtype=bool)] if d > 1 else np.zeros(0)
    return {
        "rows": len(x),
        "dim": int(x.shape[1]),
        "constant_dims": int((~live).sum()),
        "effective_rank": effective_rank(x),
        "effective_rank_standardised": effective_rank(z),
        "mean_sq_offdiag_corr": float(np.mean(off**2)) if off.size else 0.0,
    }


def measure(run: Path, work: Path, batch_size: int | None) -> dict:
    from bioperceiver.inference.embedding import embedding_column
    from bioperceiver.inference.loading import load_model_folder

    loaded = load_model_folder(run / "final", device="cpu")
    out = work / f"{run.parent.name}_{run.name}"
    frame, _, names, cfg = _sibling("retrieval_space").held_out_embeddings(loaded, run, out, "latent", batch_size)
    views = {}
    for name in names:
        cells = [c for c in frame[embedding_column(name)] if c is not None]
        if len(cells) >= 3:
            views[name] = spectrum_stats(np.stack([np.asarray(c, dtype=np.float64) for c in cells]))
    recorded = json.loads((run / "eval_results.json").read_text())
    retrieval = {
        k.split("/", 1)[1]: {"R@1": v, "chance_R@1": recorded.get(f"chance_R@1/{k.split('/', 1)[1]}")}
        for k, v in recorded.items()
        if k.startswith("R@1/")
    }
    return {
        "run": str(run),
        "decorrelation": cfg.loss.decorrelation,
        "eval_loss": recorded.get("eval_loss"),
        "views": views,
        "retrieval": retrieval,
    }


def paired(values: dict[str, list[float]], first: str) -> dict:
    """Every group's mean, and its mean run-by-run difference from ``first`` with the number of runs above it."""
    out = {}
    for g, v in values.items():
        row = {"mean": float(np.mean(v))}
        if g != first:
            diff = np.asarray(v) - np.asarray(values[first])
            row.update({"difference": float(diff.mean()), "above": int((diff > 0).sum()), "runs": len(diff)})
        out[g] = row
    return out


def summarise(groups: dict[str, list[dict]]) -> dict:
    first = next(iter(groups))
    n = {len(rs) for rs in groups.values()}
    if len(n) != 1:
        raise SystemExit(f"every --group needs the same number of runs (paired by position), got {sorted(n)}")
    metrics: dict[str, dict[str, list[float]]] = {}
    for g, runs in groups.items():
        for r in runs:
            for view, st in r["views"].items():
                for key in ("effective_rank", "effective_rank_standardised", "mean_sq_offdiag_corr"):
                    metrics.setdefault(f"{key}/{view}", {}).setdefault(g, []).append(st[key])
            for pair, rec in r["retrieval"].items():
                metrics.setdefault(f"R@1/{pair}", {}).setdefault(g, []).append(rec["R@1"])
            if r["eval_loss"] is not None:
                metrics.setdefault("eval_loss", {}).setdefault(g, []).append(r["eval_loss"])
    return {m: paired(v, first) for m, v in metrics.items() if len(v) == len(groups)}


def markdown(summary: dict, groups: dict[str, list[dict]]) -> str:
    names = list(groups)
    first = names[0]
    head = "| metric | " + " | ".join(names) + " | " + " | ".join(f"{g} - {first} (runs above)" for g in names[1:])
    lines = [head + " |", "|---" * (1 + 2 * len(names) - 1) + "|"]
    for metric, row in summary.items():
        means = " | ".join(f"{row[g]['mean']:.3f}" for g in names)
        diffs = " | ".join(f"{row[g]['difference']:+.3f} ({row[g]['above']} of {row[g]['runs']})" for g in names[1:])
        lines.append(f"| {metric} | {means} | {diffs} |")
    dims = {st["dim"] for rs in groups.values() for r in rs for st in r["views"].values()}
    lines.append("")
    lines.append(
        f"Latent width {sorted(dims)}; held-out split of each run's own manifest; R@1 and eval_loss as the runs "
        "recorded them (after the projection head); runs paired by position."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--group",
        nargs="+",
        action="append",
        required=True,
        metavar=("NAME", "RUN"),
        help="a group name and its pretraining run folders (each with final/ and eval_results.json); repeat",
    )
    p.add_argument("--output_dir", required=True)
    p.add_argument("--batch_size", type=int, default=None, help="embedding batch (default: the run's batch size)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    groups_spec = {}
    for g in args.group:
        if len(g) < 2:
            raise SystemExit(f"--group {g[0]}: give the group's run folders after its name")
        if g[0] in groups_spec:
            raise SystemExit(f"--group {g[0]} given twice")
        groups_spec[g[0]] = [Path(r) for r in g[1:]]
    t0 = time.perf_counter()
    groups: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for g, runs in groups_spec.items():
            groups[g] = []
            for run in runs:
                logger.info("%s: %s", g, run)
                groups[g].append(measure(run, Path(tmp) / g, args.batch_size))
    summary = summarise(groups)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"groups": groups, "summary": summary, "seconds": time.perf_counter() - t0}
    (out / "embedding_spectrum.json").write_text(json.dumps(result, indent=1))
    md = markdown(summary, groups)
    (out / "embedding_spectrum.md").write_text(md)
    print(md)
    logger.info("wrote %s (%.1f s)", out, result["seconds"])


if __name__ == "__main__":
    main()
