#!/usr/bin/env python
"""Held-out cross-modal retrieval of pretrained backbones in the two spaces ``bioperceiver embed`` offers: the
backbone's pooled latents (``--space latent``, the default, what ``search`` used before the projection head was saved)
and after the contrastive projection head (``--space projected``, where the pretraining loss aligned the modalities).

For each pretraining run folder (``--runs``): its ``final/`` backbone is loaded with ``bioperceiver.inference``, the
held-out split of its own manifest (the run config's ``data.manifest`` and ``eval.split``, split as the run split it)
is embedded in both spaces with ``embed``, and R@1/5/10 for every pair of views (each modality alone and the fused
view) is computed by ``bioperceiver.training.pretraining.retrieval_metrics`` with a patient-level 95% bootstrap
interval -- the function and data the run's own held-out evaluation used, so the projected numbers must equal the
run's ``eval_results.json`` (checked, and reported). A ``final/`` saved before pretraining saved its head gets it from
the run's last checkpoint (``--head_from_checkpoint``; ``projection_state_from_checkpoint``), written into a copy of
the folder, never into the run.

Outputs (``--output_dir``): ``retrieval_space.json`` and ``retrieval_space.md`` (per run and pair: R@1 latent,
projected, the paired difference over the same queries with a bootstrap interval, chance) and the mean over runs.

    python benchmarks/retrieval_space.py --runs /work/evidence/survset/pretrain_cvfolds/fold{0,1,2,3,4} \\
        --head_from_checkpoint --output_dir outputs/retrieval_space
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger("retrieval_space")
SPACES = ("latent", "projected")


def with_head(run: Path, work: Path, from_checkpoint: bool) -> Path:
    """``run/final`` when it holds its projection head; else (``from_checkpoint``) a copy of it under ``work`` with
    the head of the run's last checkpoint added."""
    from bioperceiver.configuration_bioperceiver import BioPerceiverConfig
    from bioperceiver.layers.projection import (
        PROJECTION_HEAD_FILE,
        projection_state_from_checkpoint,
        save_projection_head,
    )

    final = run / "final"
    if (final / PROJECTION_HEAD_FILE).is_file():
        return final
    if not from_checkpoint:
        raise SystemExit(f"{final} has no {PROJECTION_HEAD_FILE}: pass --head_from_checkpoint (older runs)")
    ckpts = sorted((run / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if not ckpts:
        raise SystemExit(f"{run} has no checkpoints/checkpoint-* to take the projection head from")
    trainer_state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
    history = json.loads((run / "history.json").read_text())
    last = max(h.get("step", 0) for h in history)
    if trainer_state.get("step") != last:
        raise SystemExit(f"{ckpts[-1]} is not the run's last step ({last}): its head would not match final/")
    copy = work / run.name / "final"
    shutil.copytree(final, copy)
    save_projection_head(projection_state_from_checkpoint(ckpts[-1]), copy, BioPerceiverConfig.from_pretrained(final))
    return copy


def views_of(frame, names: list[str], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, V, width)`` views and ``(N, V)`` mask from an ``embed`` frame (absent cells masked)."""
    from bioperceiver.inference.embedding import embedding_column

    cells = [[frame[embedding_column(n)].iloc[i] for n in names] for i in range(len(frame))]
    mask = torch.tensor([[c is not None for c in row] for row in cells])
    zero = torch.zeros(width)
    views = torch.stack([torch.stack([zero if c is None else torch.as_tensor(c) for c in row]) for row in cells])
    return views, mask


def paired_r1(views: dict[str, torch.Tensor], mask, a: int, b: int, patients, n_boot: int, seed: int) -> dict:
    """Projected minus latent R@1 for the pair of views ``(a, b)`` over the same queries (both directions averaged
    per query), with a patient-level percentile bootstrap 95% interval."""
    from bioperceiver.evaluation.bootstrap import Resampler
    from bioperceiver.training.pretraining import retrieval_hits

    hits = {}
    for space, v in views.items():  # the same queries in both spaces (the same mask)
        queries, h = retrieval_hits(torch.nn.functional.normalize(v.float(), dim=-1), mask, a, b, ks=(1,))
        hits[space] = h[1].double().numpy()
    diff = hits["projected"] - hits["latent"]
    groups = np.asarray(patients, dtype=object).astype(str)[queries.numpy()]
    weights = np.concatenate(list(Resampler(len(queries), n_boot, seed, groups).weights()))
    reps = weights @ diff / weights.sum(1)
    return {"difference": float(diff.mean()), "ci95": [float(x) for x in np.quantile(reps, [0.025, 0.975])]}


@functools.lru_cache(maxsize=4)
def _held_out_split(run: Path):
    """The pretraining ``run``'s config and its held-out rows, read once per run (each space embeds the same rows)."""
    from bioperceiver.data import assign_splits, read_manifest
    from bioperceiver.training import load_run_config

    cfg = load_run_config(run / "final" / "run_config.yaml")
    return cfg, assign_splits(read_manifest(cfg.data.manifest)).split(cfg.eval.split)


def held_out_embeddings(loaded, run: Path, out: Path, space: str = "latent", batch_size: int | None = None):
    """``embed`` (in ``space``) the held-out split of the pretraining ``run``'s own manifest (its run config's
    ``data.manifest`` and ``eval.split``, split as the run split it) into ``out`` with ``loaded`` (the run's
    ``final/`` backbone), in the run's batch size unless ``batch_size`` is given (one process, as its evaluation).
    Returns ``(frame, metadata, view names, run config)``: the view names are the modalities, then ``fused`` when the
    run scored it."""
    from bioperceiver.inference.embedding import FUSED, embed, read_embeddings

    cfg, held_out = _held_out_split(Path(run))
    names = [*loaded.backbone.modality_names, *([FUSED] if cfg.loss.fused_view else [])]
    batch = batch_size or cfg.train.batch_size
    embed(loaded, held_out, out, batch_size=batch, process_index=0, num_processes=1, progress=False, space=space)
    frame, meta = read_embeddings(out)
    return frame, meta, names, cfg


def measure(run: Path, work: Path, args) -> dict:
    from bioperceiver.inference.loading import load_model_folder
    from bioperceiver.training.pretraining import retrieval_metrics

    folder = with_head(run, work, args.head_from_checkpoint)
    loaded = load_model_folder(folder, device="cpu")
    views, metrics, mask, patients = {}, {}, None, None
    for space in SPACES:
        out = work / run.name / f"emb_{space}"
        frame, meta, names, _ = held_out_embeddings(loaded, run, out, space, args.batch_size)
        views[space], mask = views_of(frame, names, meta["embedding_dim"])
        patients = list(frame["patient_id"])
        metrics[space] = retrieval_metrics(
            views[space], mask, names, n_bootstrap=args.n_bootstrap, groups=patients, seed=args.seed
        )
    recorded = json.loads((run / "eval_results.json").read_text())
    pairs = [k.split("/", 1)[1] for k in metrics["projected"] if k.startswith("queries/")]
    rows = {}
    for pair in pairs:
        a, b = (names.index(n) for n in _split(pair, names))
        rows[pair] = {
            "queries": metrics["projected"][f"queries/{pair}"],
            "chance_R@1": metrics["projected"][f"chance_R@1/{pair}"],
            **{f"{space}_R@{k}": metrics[space][f"R@{k}/{pair}"] for space in SPACES for k in (1, 5, 10)},
            **{
                f"{space}_R@1_ci95": [metrics[space][f"R@1_ci_low/{pair}"], metrics[space][f"R@1_ci_high/{pair}"]]
                for space in SPACES
            },
            "projected - latent R@1": paired_r1(views, mask, a, b, patients, args.n_bootstrap, args.seed),
            "recorded_R@1": recorded.get(f"R@1/{pair}"),
        }
    same = all(r["recorded_R@1"] is None or abs(r["projected_R@1"] - r["recorded_R@1"]) < 1e-9 for r in rows.values())
    return {
        "run": str(run),
        "head": "final/" if folder == run / "final" else "last checkpoint",
        "pairs": rows,
        "projected_equals_recorded": same,
    }


def _split(pair: str, names: list[str]) -> tuple[str, str]:
    """``"a-b"`` back into the two view names (names may contain ``-``)."""
    for n in names:
        if pair.startswith(n + "-") and pair[len(n) + 1 :] in names:
            return n, pair[len(n) + 1 :]
    raise ValueError(f"cannot split {pair!r} into two of {names}")


def _label(run: str) -> str:
    """A run's last two path parts (``pretrain_cvfolds_seed1/fold0``): fold folders of several seeds share names."""
    return "/".join(Path(run).parts[-2:])


def report(results: list[dict]) -> list[str]:
    lines = [
        "| run | pair | queries | R@1 latent [95% CI] | R@1 projected [95% CI] | projected − latent [95% CI] "
        "| chance R@1 | projected = run's own eval |",
        "|---|---|---|---|---|---|---|---|",
    ]
    pairs = sorted({p for r in results for p in r["pairs"]})
    for r in results:
        for pair, x in r["pairs"].items():
            d = x["projected - latent R@1"]
            lines.append(
                f"| {_label(r['run'])} | {pair} | {x['queries']} | {x['latent_R@1']:.3f} "
                f"[{x['latent_R@1_ci95'][0]:.3f}, {x['latent_R@1_ci95'][1]:.3f}] | {x['projected_R@1']:.3f} "
                f"[{x['projected_R@1_ci95'][0]:.3f}, {x['projected_R@1_ci95'][1]:.3f}] | {d['difference']:+.3f} "
                f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] | {x['chance_R@1']:.4f} "
                f"| {r['projected_equals_recorded']} |"
            )
    lines += [
        "",
        "| pair | runs | mean R@1 latent | mean R@1 projected | mean projected − latent | runs projected > latent |",
        "|---|---|---|---|---|---|",
    ]
    for pair in pairs:
        xs = [r["pairs"][pair] for r in results if pair in r["pairs"]]
        d = [x["projected - latent R@1"]["difference"] for x in xs]
        lines.append(
            f"| {pair} | {len(xs)} | {np.mean([x['latent_R@1'] for x in xs]):.3f} | "
            f"{np.mean([x['projected_R@1'] for x in xs]):.3f} | {np.mean(d):+.3f} "
            f"| {sum(v > 0 for v in d)} of {len(d)} |"
        )
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="pretraining output folders (final/, eval_results.json)")
    p.add_argument("--head_from_checkpoint", action="store_true", help="older runs: the head of the last checkpoint")
    p.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help="embedding batch (default: the run's train.batch_size, the batches its held-out evaluation used; other "
        "batches pad differently, which can flip near-tied ranks)",
    )
    p.add_argument("--n_bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, run in enumerate(map(Path, args.runs)):
            results.append(measure(run, Path(tmp) / str(i), args))  # runs of several seeds share folder names
            logger.info(
                "%s: %s",
                run,
                {k: round(v["projected - latent R@1"]["difference"], 3) for k, v in results[-1]["pairs"].items()},
            )
    res = {
        "benchmark": "retrieval_space",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "n_bootstrap": args.n_bootstrap,
        "seed": args.seed,
        "wall_s": round(time.perf_counter() - t0, 1),
        "runs": results,
    }
    (out / "retrieval_space.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "retrieval_space.md").write_text("\n".join(report(results)) + "\n")
    print("\n".join(report(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
