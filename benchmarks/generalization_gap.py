#!/usr/bin/env python
"""Does the pretraining objective generalise? Pretraining's own evaluation on held-out and on training patients.

A run's held-out numbers (``eval_results.json``: contrastive loss, reconstruction error, R@1) say how the objective
does on patients pretraining never saw. Its logged training loss cannot be set beside them: it is measured on
training batches with the subset views and the added terms, so its level (and its uniform-guess level) differ. This
script rebuilds each run's pretrainer (backbone, projection head, loss, decoder) from the checkpoint of its last
evaluation and runs pretraining's evaluation (:func:`bioperceiver.training.pretraining.evaluate`) twice, with the
run's batch size, seed and processing: on its evaluation split, which must reproduce the recorded numbers (checked
and reported), and on as many of its training samples, drawn by patient with the run's own seed (as
``eval.training_patients`` draws them; ``--seed`` overrides). Held-out − training is the
objective's generalisation gap: it grows as a model fits its own training patients better than it generalises.

Inputs: ``--backbones LABEL GLOB`` (repeatable), the pretraining output folders of one family (e.g. one width, every
seed and fold). Outputs (``--output_dir``): ``generalization_gap.{json,md,png}``: one row per run, and per family the
mean ± SD of each number on both sets and of the gap. Nothing is fitted or chosen here.

    python benchmarks/generalization_gap.py --backbones "32 wide" 'runs/k_seed*/fold*' \\
        --backbones "64 wide" 'runs/v_seed*/fold*' --output_dir outputs/generalization_gap
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger("generalization_gap")
NUMBERS = {  # key in pretraining's metrics (R@1: of the run's retrieval pair) -> what it is
    "eval_loss": "contrastive loss",
    "eval_loss_reconstruction": "reconstruction error",
    "R@1": "R@1 (the pair with the most queries)",
}
REPRODUCED = 1e-4  # the held-out numbers re-evaluated here against the recorded ones


def evaluated_step(run: Path) -> int:
    """The step whose weights ``eval_results.json``'s numbers are of: its ``step`` (the best evaluation's under
    ``eval.load_best_model_at_end``), or, for a run written before it was recorded, the last held-out evaluation."""
    recorded = json.loads((run / "eval_results.json").read_text())
    if "step" in recorded:
        return int(recorded["step"])
    history = json.loads((run / "history.json").read_text())
    steps = [h["step"] for h in history if "eval_loss" in h]
    if not steps:
        raise ValueError(f"{run}/history.json has no held-out evaluation: was the run's eval split empty?")
    return int(steps[-1])


def retrieval_pair(recorded: dict) -> str:
    """The pair of views whose R@1 is reported: of the recorded pairs (not the fused view), the one with the most
    held-out queries (the loop plots the same ones first)."""
    pairs = [k.split("/", 1)[1] for k in recorded if k.startswith("queries/") and not k.endswith("-fused")]
    if not pairs:
        raise ValueError("the run recorded no retrieval pair")
    return max(pairs, key=lambda p: recorded[f"queries/{p}"])


def _numbers(metrics: dict, pair: str) -> dict[str, float]:
    keys = {"eval_loss": "eval_loss", "eval_loss_reconstruction": "eval_loss_reconstruction", "R@1": f"R@1/{pair}"}
    return {name: float(metrics.get(key, np.nan)) for name, key in keys.items()}


def run_row(run: Path, seed: int | None = None) -> dict:
    """One run: pretraining's evaluation of the checkpoint its ``final/`` holds (the last, or the best with
    ``eval.load_best_model_at_end``) on its held-out split and on training patients, drawn with ``seed`` (``None``:
    the run's own seed, which ``eval.training_patients`` draws with, so the numbers equal the ones the run logged)."""
    import torch
    import transformers
    from safetensors.torch import load_file

    import bioperceiver  # noqa: F401 (registers the Auto classes)
    from bioperceiver.data import BioPerceiverProcessor, assign_splits, read_manifest
    from bioperceiver.training import load_run_config
    from bioperceiver.training.loop import build_pretrainer, evaluation_data, training_sample
    from bioperceiver.training.pretraining import evaluate

    cfg = load_run_config(run / "final" / "run_config.yaml")
    recorded = json.loads((run / "eval_results.json").read_text())
    step = evaluated_step(run)
    ckpt = run / "checkpoints" / f"checkpoint-{step}" / "model.safetensors"
    if not ckpt.is_file():
        raise FileNotFoundError(
            f"{ckpt} not found: the held-out numbers were measured at step {step} and that checkpoint holds the "
            "projection head, loss and decoder they need (keep it: checkpointing.keep_last, save_steps)"
        )
    processor = BioPerceiverProcessor.from_pretrained(run / "final")
    trainer = build_pretrainer(cfg, transformers.AutoModel.from_pretrained(run / "final"))
    trainer.load_state_dict(load_file(str(ckpt)), strict=True)
    manifest = assign_splits(read_manifest(cfg.data.manifest))
    held = manifest.split(cfg.eval.split)
    seed = cfg.seed if seed is None else seed
    sets = {"held_out": held, "training": training_sample(manifest.split("train"), len(held), seed)}
    batch = int(recorded.get("eval_loss_batch_size", cfg.train.batch_size))
    pair = retrieval_pair(recorded)
    row: dict = {"run": str(run), "step": step, "samples": len(held), "pair": pair, "seed": seed}
    row["training_samples"] = len(sets["training"])  # fewer than the held-out split when training has fewer
    for name, part in sets.items():
        ds, collator = evaluation_data(cfg, part, processor)
        metrics, _, _ = evaluate(trainer, ds, collator, batch, n_bootstrap=0, seed=cfg.seed, device=torch.device("cpu"))
        row[name] = {**_numbers(metrics, pair), "eval_loss_uniform": float(metrics.get("eval_loss_uniform", np.nan))}
    row["recorded"] = _numbers(recorded, pair)
    checked = [key for key in NUMBERS if not np.isnan(row["recorded"][key])]
    off = {key: (row["held_out"][key], row["recorded"][key]) for key in checked}
    off = {key: v for key, v in off.items() if abs(v[0] - v[1]) > REPRODUCED}
    row["reproduced"] = not off
    if off:
        logger.warning("%s: re-evaluated held-out (here, recorded) %s: not the same model or data", run, off)
    row["gap"] = {key: row["held_out"][key] - row["training"][key] for key in NUMBERS}
    return row


def family_summary(rows: list[dict]) -> dict:
    """Mean and SD over one family's runs of each number on both sets and of the gap."""
    out: dict = {"runs": len(rows), "reproduced": sum(r["reproduced"] for r in rows)}
    for part in ("held_out", "training", "gap"):
        for key in NUMBERS:
            values = np.array([r[part][key] for r in rows], float)
            values = values[~np.isnan(values)]  # a pair with no query in one set (a missing modality)
            out[f"{part}/{key}"] = float(values.mean()) if len(values) else float("nan")
            out[f"{part}/{key}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return out


def report_lines(families: dict[str, dict], seed: int | None) -> list[str]:
    drawn = "each run's own seed" if seed is None else f"seed {seed}"
    lines = [
        "Pretraining's own evaluation of each run's kept checkpoint on its held-out split and on as many training "
        f"samples (whole patients, drawn with {drawn}); gap = held-out − training. Mean ± SD over runs.",
        "",
        "| family | runs (held-out reproduced) | number | training patients | held-out | gap |",
        "|---|---|---|---|---|---|",
    ]
    for label, s in families.items():
        for key, what in NUMBERS.items():
            cells = [f"{s[f'{p}/{key}']:.3f} ± {s[f'{p}/{key}_sd']:.3f}" for p in ("training", "held_out", "gap")]
            lines.append(f"| {label} | {s['runs']} ({s['reproduced']}) | {what} | " + " | ".join(cells) + " |")
    return lines


def plot(families: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(NUMBERS)[:2]
    fig, axes = plt.subplots(1, len(keys), figsize=(max(5, 0.9 * len(families) + 2) * len(keys), 4.2))
    x = np.arange(len(families))
    for ax, key in zip(axes, keys):  # families are categories: markers, no line between them
        for part, marker, shift in (("training", "s", -0.08), ("held_out", "o", 0.08)):
            mean = [s[f"{part}/{key}"] for s in families.values()]
            sd = [s[f"{part}/{key}_sd"] for s in families.values()]
            ax.errorbar(x + shift, mean, yerr=sd, fmt=marker, capsize=3, label=part.replace("_", "-") + " patients")
        ax.set_xticks(x, list(families), rotation=30, ha="right")
        ax.set_ylabel(NUMBERS[key] + " (lower is better)")
        ax.legend()
    fig.suptitle("The same evaluation on training and held-out patients (mean ± SD over runs)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbones", nargs=2, action="append", metavar=("LABEL", "GLOB"), required=True)
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="draws the training patients (default: each run's own seed, as eval.training_patients draws them)",
    )
    p.add_argument("--output_dir", type=Path, required=True)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from tqdm.auto import tqdm

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    runs = {label: sorted(Path(p) for p in glob.glob(pattern)) for label, pattern in args.backbones}
    for label, found in runs.items():
        if not found:
            raise FileNotFoundError(f"--backbones {label!r}: no run folder matches")
    rows: dict[str, list[dict]] = {label: [] for label in runs}
    with tqdm(total=sum(map(len, runs.values())), desc="runs") as bar:
        for label, found in runs.items():
            for run in found:
                rows[label].append(run_row(run, args.seed))
                bar.update()
    families = {label: family_summary(r) for label, r in rows.items()}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    out = {"seed": args.seed, "families": families, "runs": rows}
    (args.output_dir / "generalization_gap.json").write_text(json.dumps(out, indent=1) + "\n")
    (args.output_dir / "generalization_gap.md").write_text("\n".join(report_lines(families, args.seed)) + "\n")
    plot(families, args.output_dir / "generalization_gap.png")
    logger.info("wrote %s", args.output_dir / "generalization_gap.md")
    return out


if __name__ == "__main__":
    main()
