#!/usr/bin/env python
"""What does a pretrained decoder's held-out reconstruction error mean? The references it must beat.

A run pretrained with ``loss.reconstruction`` records ``eval_loss_reconstruction`` (the mean squared error of the
normalised values its subset views hid, held-out patients) beside ``eval_loss_reconstruction_mean`` (predicting every
hidden value as 0, its training mean). But a decoder can lower the error without reading the profile at all: with
``top_k`` tokens a gene enters a profile only when its value is high there, so each gene's tokens have their own
typical value, which the decoder can learn from the gene's identity alone. This script measures that reference on
the same tokens: each gene's mean token value over the run's *training* split (genes never seen there: 0), scored on
the held-out split's tokens. Subset views hide a uniformly random share of a profile's tokens, so the expected error
over hidden tokens equals the error over all tokens, which is what is computed here (no sampling).

For every run (``--runs``, pretraining output folders): the run's processors (``final/``) tokenise its own manifest
(the run config's ``data.manifest`` and splits: ``train`` and ``eval.split``), for the modality the run reconstructed
(``loss.subset_modality``). Outputs (``--output_dir``): ``reconstruction_reference.{json,md}``, one row per run: the
decoder's recorded error, predicting 0, and predicting each gene's training mean, and the share of the gap between
predicting 0 and the per-gene mean that the decoder closes beyond it.

    python benchmarks/reconstruction_reference.py --runs runs/recon/fold{0,1,2,3,4} --output_dir outputs/recon_ref
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger("reconstruction_reference")


def token_values(run: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(vocabulary ids, normalised values)`` of every token of the run's reconstructed modality, over the given
    split of its own manifest, as its saved processors emit them (held-out processing: no augmentation)."""
    from bioperceiver.data import BioPerceiverProcessor, assign_splits, read_manifest
    from bioperceiver.training import load_run_config

    cfg = load_run_config(run / "final" / "run_config.yaml")
    name = cfg.loss.subset_modality
    processor = BioPerceiverProcessor.from_pretrained(run / "final")
    manifest = assign_splits(read_manifest(cfg.data.manifest)).split(split)
    ids, values = [], []
    for record in manifest.records():
        if record.get(name) is None:
            continue
        out = processor(record, base_dir=manifest.base_dir, train=False, modalities=[name], on_error="skip_modality")
        arrays = out.get(name)
        if arrays is None:
            continue
        keep = np.asarray(arrays.get("mask", np.ones(len(arrays["values"]), bool)), bool)
        id_key = next(k for k in arrays if k.endswith("_ids"))
        ids.append(np.asarray(arrays[id_key])[keep])
        values.append(np.asarray(arrays["values"], float)[keep])
    return np.concatenate(ids), np.concatenate(values)


def references(train: tuple[np.ndarray, np.ndarray], held_out: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    """Held-out mean squared error of predicting 0 and of predicting each id's training mean value (0 for an id the
    training tokens never hold)."""
    (tr_ids, tr_values), (ho_ids, ho_values) = train, held_out
    size = int(max(tr_ids.max(initial=0), ho_ids.max(initial=0))) + 1
    sums = np.bincount(tr_ids, weights=tr_values, minlength=size)
    counts = np.bincount(tr_ids, minlength=size)
    means = np.divide(sums, counts, out=np.zeros(size), where=counts > 0)
    return {
        "predict_zero": float(np.mean(ho_values**2)),
        "predict_gene_mean": float(np.mean((ho_values - means[ho_ids]) ** 2)),
        "held_out_tokens": len(ho_values),
        "held_out_ids_unseen_in_training": int(np.sum(counts[ho_ids] == 0)),
    }


def run_row(run: Path) -> dict:
    from bioperceiver.training import load_run_config

    cfg = load_run_config(run / "final" / "run_config.yaml")
    recorded = json.loads((run / "eval_results.json").read_text())
    row = {"run": str(run), "modality": cfg.loss.subset_modality, "weight": cfg.loss.reconstruction}
    row.update(references(token_values(run, "train"), token_values(run, cfg.eval.split)))
    row["decoder"] = recorded.get("eval_loss_reconstruction")
    row["decoder_recorded_predict_zero"] = recorded.get("eval_loss_reconstruction_mean")
    if row["decoder"] is not None:
        gap = row["predict_zero"] - row["predict_gene_mean"]
        row["decoder_beyond_gene_mean"] = row["predict_gene_mean"] - row["decoder"]
        row["share_of_zero_error_left"] = {
            "decoder": row["decoder"] / row["predict_zero"],
            "gene_mean": row["predict_gene_mean"] / row["predict_zero"],
        }
        row["gap_zero_to_gene_mean"] = gap
    return row


def report_lines(rows: list[dict]) -> list[str]:
    lines = [
        "| run | held-out tokens | predict 0 | each gene's training mean | decoder (recorded) | decoder − gene mean |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        dec = "—" if r["decoder"] is None else f"{r['decoder']:.3f}"
        beyond = "—" if r["decoder"] is None else f"{-r['decoder_beyond_gene_mean']:+.3f}"
        name = "/".join(Path(r["run"]).parts[-2:])
        lines.append(
            f"| {name} | {r['held_out_tokens']} | {r['predict_zero']:.3f} | {r['predict_gene_mean']:.3f} | {dec} | "
            f"{beyond} |"
        )
    lines += [
        "",
        "Mean squared error of the normalised values over the held-out split's tokens (a subset view hides a uniformly "
        "random share of them, so this is the expected error over hidden tokens). Predict 0: each value's training "
        "mean under per-gene z-scores; each gene's training mean: the mean value of that gene's tokens in the run's "
        "training split (what a decoder can learn from the gene's identity alone); decoder: the run's recorded "
        "`eval_loss_reconstruction` (its own random subsets).",
    ]
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="pretraining output folders (with final/)")
    p.add_argument("--output_dir", required=True)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    rows = [run_row(Path(r)) for r in args.runs]
    result = {"benchmark": "reconstruction_reference", "runs": rows, "wall_s": round(time.perf_counter() - t0, 1)}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reconstruction_reference.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "reconstruction_reference.md").write_text("\n".join(report_lines(rows)) + "\n")
    logger.info("wrote %s (%.1f s)", out, result["wall_s"])
    return result


if __name__ == "__main__":
    main()
