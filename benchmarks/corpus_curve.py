#!/usr/bin/env python
"""A corpus-size (or step-count) curve: the pretrained backbones' own held-out numbers and their downstream
differences, against the number of unlabelled patients they were pretrained on (``--x steps``: against their
pretraining steps, ``optim.max_steps``).

Inputs are what a corpus-size experiment already wrote (``benchmarks/corpus_subsets.py`` for the subsets, pretraining
runs on each, ``benchmarks/survival_cv.py`` runs combined over seeds by ``benchmarks/seed_spread.py``):

* ``--backbones CORPUS GLOB`` (repeatable): the pretraining output folders of one corpus size (e.g. every seed and
  fold). Read from each: ``eval_results.json`` (held-out contrastive loss and its uniform level, reconstruction error,
  expression <-> clinical R@1 beside its chance level), the number of train patients in the run's manifest and the
  run's ``optim.max_steps``.
* ``--spread LABELS CORPUS DIR`` (repeatable): a ``seed_spread.py`` output folder for one label fraction and corpus
  size. Read from it: the development cohorts' pooled differences of ``--arm`` against the best baseline and against
  ``--control``, the mean over runs with its two-level interval.

Outputs (``--output_dir``): ``corpus_curve.{json,md,png}``, with each family's runs also paired with the family before
it by seed and fold (in how many pairs each held-out number is lower). Nothing is fitted or chosen here.

    python benchmarks/corpus_curve.py --backbones 0.25 'runs/corpus0.25_seed*/fold*' \\
        --backbones 1 'runs/full_seed*/fold*' --spread 0.5 0.25 outputs/spread_corpus0.25 \\
        --spread 0.5 1 outputs/spread_full --output_dir outputs/corpus_curve
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import logging
import os
import re
from pathlib import Path

import numpy as np

logger = logging.getLogger("corpus_curve")
PAIR = "omics_expression-tabular_clinical"
X_LABELS = {
    "train_patients": "unlabelled train patients in the pretraining corpus",
    "steps": "pretraining steps",
    "family": "backbones",  # the families side by side in the order given (e.g. widths at one step count)
}


def backbone_numbers(folder: Path) -> dict:
    """One pretraining run's held-out numbers, the number of train patients and of steps it was pretrained on."""
    from bioperceiver.data import assign_splits, read_manifest
    from bioperceiver.training import load_run_config

    res = json.loads((folder / "eval_results.json").read_text())
    cfg = load_run_config(folder / "final" / "run_config.yaml")
    table = assign_splits(read_manifest(cfg.data.manifest)).table
    return {
        "run": str(folder),
        "train_patients": int(table.loc[table["split"] == "train", "patient_id"].nunique()),
        "steps": int(cfg.optim.max_steps),
        "eval_loss": float(res["eval_loss"]),
        "eval_loss_uniform": float(res.get("eval_loss_uniform", np.nan)),
        "eval_loss_reconstruction": float(res.get("eval_loss_reconstruction", np.nan)),
        "eval_loss_reconstruction_mean": float(res.get("eval_loss_reconstruction_mean", np.nan)),
        "r1": float(res.get(f"R@1/{PAIR}", np.nan)),
        "r1_chance": float(res.get(f"chance_R@1/{PAIR}", np.nan)),
    }


def label_free(numbers: dict[str, list[dict]]) -> dict[str, dict]:
    """Per family (corpus size, step count): the mean (and SD over runs) of every number :func:`backbone_numbers`
    read from its runs."""
    out = {}
    for corpus, rows in numbers.items():
        keys = [k for k in rows[0] if k != "run"]
        out[corpus] = {
            "runs": len(rows),
            **{k: float(np.mean([r[k] for r in rows])) for k in keys},
            **{f"{k}_sd": float(np.std([r[k] for r in rows], ddof=1)) if len(rows) > 1 else 0.0 for k in keys},
        }
    return out


PAIRED = {"eval_loss": "contrastive loss", "eval_loss_reconstruction": "reconstruction error", "r1": "R@1"}


def pair_key(run: str) -> tuple[str, str]:
    """What pairs a run with its counterpart in another family: the pretraining seed in its parent folder's name
    (``..._seed2/fold3``) and its own folder name (the fold)."""
    path = Path(run)
    seed = re.search(r"seed(\d+)", path.parent.name)
    return (seed.group(1) if seed else "", path.name)


def paired(numbers: dict[str, list[dict]], order: list[str]) -> dict[str, dict]:
    """Each family against the one before it in ``order``, run by run (the same seed and fold): the number of pairs
    and in how many each of :data:`PAIRED` is lower in the later family."""
    out = {}
    for prev, cur in itertools.pairwise(order):
        a = {pair_key(r["run"]): r for r in numbers[prev]}
        b = {pair_key(r["run"]): r for r in numbers[cur]}
        common = sorted(set(a) & set(b))
        out[f"{cur} vs {prev}"] = {
            "pairs": len(common),
            "lower": {m: int(sum(b[k][m] < a[k][m] for k in common)) for m in PAIRED},
        }
    return out


def downstream(spreads: list[tuple[str, str, str]], arm: str, control: str) -> dict[str, dict[str, dict]]:
    """``{label fraction: {corpus: {"best baseline" | control: {mean, ci95, runs_above_zero, runs}}}}``."""
    out: dict[str, dict[str, dict]] = {}
    for labels, corpus, folder in spreads:
        res = json.loads((Path(folder) / "seed_spread.json").read_text())
        dev = res["roles"].get("development", {})
        row = {}
        for other in ("best baseline", control):
            key = f"{arm} - {other}"
            if key not in dev:
                raise KeyError(f"{folder}: no development difference {key!r} (has {sorted(dev)})")
            d = dev[key]
            row[other] = {
                "mean": d["mean"],
                "ci95": d["ci95_runs_and_patients"],
                "runs_above_zero": d["runs_above_zero"],
                "runs": len(d["runs"]),
            }
        out.setdefault(labels, {})[corpus] = row
    return out


def _cell(d: dict) -> str:
    lo, hi = d["ci95"]
    return f"{d['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}] ({d['runs_above_zero']} of {d['runs']} > 0)"


def _order(result: dict) -> list[str]:
    """The backbone families by the curve's x-axis (``train_patients`` or ``steps``; ``family``: as given)."""
    lf, x = result["label_free"], result["x"]
    return list(lf) if x == "family" else sorted(lf, key=lambda c: lf[c][x])


def report(result: dict) -> list[str]:
    lf, ds = result["label_free"], result["downstream"]
    x = result["x"]
    order = _order(result)
    lines = [
        "### The backbones' own held-out numbers (the same validation patients for every family)",
        "",
        "| backbones | runs | train patients | steps | held-out contrastive loss (uniform) | reconstruction error "
        "(predict 0) | R@1 expression <-> clinical (chance) |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in order:
        r = lf[c]
        lines.append(
            f"| {c} | {r['runs']} | {r['train_patients']:.0f} | {r['steps']:.0f} | {r['eval_loss']:.3f} ± "
            f"{r['eval_loss_sd']:.3f} "
            f"({r['eval_loss_uniform']:.2f}) | {r['eval_loss_reconstruction']:.3f} ± "
            f"{r['eval_loss_reconstruction_sd']:.3f} ({r['eval_loss_reconstruction_mean']:.2f}) | "
            f"{r['r1']:.3f} ({r['r1_chance']:.3f}) |"
        )
    if result.get("paired"):
        lines += [
            "",
            "Run by run (the same seed and fold), each family against the one before it: pairs in which the later "
            "family's number is lower",
            "",
            "| backbones | pairs | " + " | ".join(f"{v} lower" for v in PAIRED.values()) + " |",
            "|---|---|" + "---|" * len(PAIRED),
        ]
        for name, d in result["paired"].items():
            lines.append(f"| {name} | {d['pairs']} | " + " | ".join(str(d["lower"][m]) for m in PAIRED) + " |")
    arm, control = result["arm"], result["control"]
    for labels, per in ds.items():
        lines += [
            "",
            f"### {arm}, {labels} of the labels: pooled development differences, mean over runs [two-level 95% CI]",
            "",
            f"| backbones |{'' if x == 'family' else ' ' + x.replace('_', ' ') + ' |'} - best baseline | - {control} |",
            "|---|---|---|" + ("" if x == "family" else "---|"),
        ]
        for c in [c for c in order if c in per]:  # main() checks every spread's family has backbones
            b, r = per[c]["best baseline"], per[c][control]
            n = "" if x == "family" else f" {lf[c][x]:.0f} |"
            lines.append(f"| {c} |{n} {_cell(b)} | {_cell(r)} |")
    return lines


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lf, ds = result["label_free"], result["downstream"]
    xkey = result["x"]
    order = _order(result)
    x = list(range(len(order))) if xkey == "family" else [lf[c][xkey] for c in order]
    at = dict(zip(order, x, strict=True))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.errorbar(x, [lf[c]["eval_loss"] for c in order], yerr=[lf[c]["eval_loss_sd"] for c in order], fmt="o-")
    ax.axhline(lf[order[0]]["eval_loss_uniform"], color="grey", ls="--", lw=0.8, label="uniform guess")
    ax.set_ylabel("held-out contrastive loss (validation patients)")
    ax.set_title("pretraining objective, held out")
    ax.legend(fontsize=8)
    ax2 = axes[1]
    ax2.errorbar(
        x,
        [lf[c]["eval_loss_reconstruction"] for c in order],
        yerr=[lf[c]["eval_loss_reconstruction_sd"] for c in order],
        fmt="o-",
        color="C1",
    )
    ax2.axhline(lf[order[0]]["eval_loss_reconstruction_mean"], color="grey", ls="--", lw=0.8, label="predict 0")
    ax2.set_ylabel("held-out reconstruction error (MSE, z-scores)")
    ax2.set_title("masked-value reconstruction, held out")
    ax2.legend(fontsize=8)
    ax3 = axes[2]
    for i, (labels, per) in enumerate(ds.items()):
        for j, (other, style) in enumerate((("best baseline", "o-"), (result["control"], "s--"))):
            cs = [c for c in order if c in per]
            shift = 2 * i + j - 1.5  # the series side by side at each x
            xs = np.array([at[c] + 0.06 * shift if xkey == "family" else at[c] * (1 + 0.02 * shift) for c in cs])
            m = np.array([per[c][other]["mean"] for c in cs])
            lo = m - np.array([per[c][other]["ci95"][0] for c in cs])
            hi = np.array([per[c][other]["ci95"][1] for c in cs]) - m
            ax3.errorbar(
                xs,
                m,
                yerr=[lo, hi],
                fmt=style,
                color=f"C{2 * i + j}",
                capsize=3,
                label=f"{labels} of the labels: - {other}",
            )
    ax3.axhline(0, color="grey", lw=0.8)
    if not ds:
        ax3.text(0.5, 0.5, "no --spread given", ha="center", va="center", transform=ax3.transAxes)
    ax3.set_ylabel(f"{result['arm']}\npooled C-index difference, 95% CI")
    ax3.set_title("downstream, development cohorts")
    if ds:
        ax3.legend(fontsize=7)
    for a in axes:
        if xkey == "family":
            a.set_xticks(x, order)
            a.set_xlim(-0.5, len(order) - 0.5)
        else:
            a.set_xscale("log", base=2)
            a.set_xticks(x, [f"{v:,.0f}" for v in x])  # the families' own values, not powers of 2
            a.minorticks_off()
        a.set_xlabel(X_LABELS[xkey])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs=2, action="append", required=True, metavar=("CORPUS", "GLOB"))
    p.add_argument("--spread", nargs=3, action="append", default=[], metavar=("LABELS", "CORPUS", "DIR"))
    p.add_argument("--arm", default="cox_clinical_emb_pretrained")
    p.add_argument("--control", default="cox_clinical_emb_random")
    p.add_argument("--x", choices=sorted(X_LABELS), default="train_patients", help="the curve's x-axis")
    p.add_argument("--output_dir", required=True)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from bioperceiver.jsonio import dumps

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    backbones = {}
    for corpus, pattern in args.backbones:
        matched = sorted(Path(p) for p in glob.glob(pattern))
        folders = [f for f in matched if (f / "eval_results.json").is_file()]
        for f in sorted(set(matched) - set(folders)):
            logger.warning("--backbones %s: %s has no eval_results.json (unfinished?); left out", corpus, f)
        if not folders:
            raise FileNotFoundError(f"--backbones {corpus} {pattern!r}: no pretraining run (eval_results.json) matches")
        backbones[corpus] = folders
    numbers = {c: [backbone_numbers(f) for f in fs] for c, fs in backbones.items()}
    mixed = {c: sorted({r["steps"] for r in rows}) for c, rows in numbers.items()}
    for c, steps in mixed.items():
        if len(steps) > 1:
            logger.warning("--backbones %s mixes runs of %s steps: its means are not one step count's", c, steps)
    counts = {c: len(fs) for c, fs in backbones.items()}
    if len(set(counts.values())) > 1:
        logger.warning("the corpus sizes have different numbers of runs %s: their means are not alike", counts)
    unknown = sorted({c for _, c, _ in args.spread} - set(backbones))
    if unknown:
        raise ValueError(f"--spread names corpus sizes {unknown} that no --backbones gives")
    result = {
        "benchmark": "corpus_curve",
        "arm": args.arm,
        "control": args.control,
        "x": args.x,
        "backbones": {c: [str(f) for f in fs] for c, fs in backbones.items()},
        "spreads": [list(s) for s in args.spread],
        "label_free": label_free(numbers),
        "downstream": downstream(args.spread, args.arm, args.control),
    }
    result["paired"] = paired(numbers, _order(result))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = report(result)
    (out / "corpus_curve.md").write_text("\n".join(lines) + "\n")
    plot(result, out / "corpus_curve.png")
    # the JSON last: it marks the output complete (benchmarks/evidence.py reads it as the part's result)
    tmp = out / ".corpus_curve.json.tmp"
    tmp.write_text(dumps(result))  # strict JSON: a number a run did not record (NaN) is written as null
    os.replace(tmp, out / "corpus_curve.json")
    print("\n".join(lines), flush=True)
    return result


if __name__ == "__main__":
    main()
