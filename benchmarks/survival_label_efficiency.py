#!/usr/bin/env python
"""SurvSet label efficiency: ``benchmarks/survival_cv.py`` runs that differ only in ``--train_fraction``, side by side.

Pretraining on unlabelled profiles should matter most when labels are few. Give this script several
``survival_cv.py`` output folders -- the same cohorts, ``--folds``, ``--seed`` and ``--val_fraction`` (so the same
folds, the same validation and test patients and the same bootstrap draws), each fitted on another share of every
fold's training patients (``--train_fraction``; the shares are nested) -- and it reports, per training fraction:

* the test C-index of every model averaged over the development cohorts (each cohort weighted equally), and the
  mean number of training patients (and events) per fold;
* every pooled paired difference ``survival_cv.py`` computed (e.g. ``bp_pretrained - bp_random``,
  ``bp_pretrained - best baseline``) with its 95% patient-bootstrap interval and how many cohorts are above 0.

Outputs (``--output_dir``): ``label_efficiency.json``, ``label_efficiency.md`` and ``label_efficiency.png`` (mean
test C-index per model against the training fraction; the pooled differences with their intervals).

    python benchmarks/survival_label_efficiency.py --runs outputs/cv_tf0.25 outputs/cv_tf0.5 outputs/cv_tf1 \\
        --output_dir outputs/survival_label_efficiency
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import numpy as np

logger = logging.getLogger("survival_label_efficiency")
SHARED = ("folds", "seed", "val_fraction", "init_seed")  # what the runs must share to be compared
BASELINES = ("cox_clinical", "cox_clinical_pcs", "rsf")


def load(folder: str | Path) -> dict:
    path = Path(folder) / "survival_cv.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run benchmarks/survival_cv.py --output_dir {folder} first")
    res = json.loads(path.read_text())
    res.setdefault("train_fraction", 1.0)  # runs made before --train_fraction existed used every training patient
    return res


def check_comparable(runs: list[dict], folders: list[str]) -> None:
    for key in SHARED:
        values = {json.dumps(r.get(key)) for r in runs}
        if len(values) > 1:
            raise ValueError(f"the runs differ in {key} ({sorted(values)}): {folders}; rerun them with one value")
    cohorts = [sorted(r["cohorts"]) for r in runs]
    if any(c != cohorts[0] for c in cohorts):
        raise ValueError(f"the runs have different cohorts: {dict(zip(folders, cohorts))}")
    fractions = [r["train_fraction"] for r in runs]
    if len(set(fractions)) != len(fractions):
        raise ValueError(f"two runs have the same --train_fraction ({fractions}): give one run per fraction")


def summarise(runs: list[dict], folders: list[str], role: str = "development") -> dict:
    """Per run (sorted by fraction): the cohort-averaged test C-index per model, the training patients and events
    per fold, and the pooled differences of ``role``."""
    check_comparable(runs, folders)
    out = []
    for res, folder in sorted(zip(runs, folders), key=lambda p: p[0]["train_fraction"]):
        cohorts = {c: r for c, r in res["cohorts"].items() if r["role"] == role}
        models: dict[str, list[float]] = {}
        for r in cohorts.values():
            for m, s in r["models"].items():
                if "test" in s:
                    models.setdefault(m, []).append(s["test"]["mean"])
        train = [np.mean([f["n"]["train"] for f in r["folds"]]) for r in cohorts.values()]  # per cohort
        events = [np.mean([f["events"]["train"] for f in r["folds"]]) for r in cohorts.values()]
        out.append(
            {
                "run": str(folder),
                "train_fraction": res["train_fraction"],
                "n_cohorts": len(cohorts),
                "train_patients_per_fold": {"median": float(np.median(train)), "min": min(train), "max": max(train)},
                "train_events_per_fold": {"median": float(np.median(events)), "min": min(events), "max": max(events)},
                "test_c_index": {
                    m: {"mean": float(np.mean(v)), "n_cohorts": len(v)} for m, v in models.items() if len(v)
                },
                "pooled": res.get("pooled", {}).get(role, {}),
            }
        )
    return {"role": role, "runs": out, **{k: runs[0].get(k) for k in SHARED}}


def report(summary: dict) -> str:
    runs = summary["runs"]
    models = [m for m in (*BASELINES, "bp_random", "bp_pretrained") if any(m in r["test_c_index"] for r in runs)]
    models += sorted({m for r in runs for m in r["test_c_index"]} - set(models))
    lines = [
        f"Test C-index averaged over the {summary['role']} cohorts a model ran on (each cohort's mean over folds; the "
        "clinical Cox model only where a cohort has clinical covariates), by share of each fold's training patients:",
        "",
        "| training fraction | training patients per fold, median over cohorts (range) | training events | "
        + " | ".join(
            f"{m} ({max(r['test_c_index'].get(m, {}).get('n_cohorts', 0) for r in runs)} cohorts)" for m in models
        )
        + " |",
        "|---|---|---|" + "---|" * len(models),
    ]
    for r in runs:
        cells = [f"{r['test_c_index'][m]['mean']:.3f}" if m in r["test_c_index"] else "–" for m in models]
        n, e = r["train_patients_per_fold"], r["train_events_per_fold"]
        lines.append(
            f"| {r['train_fraction']:g} | {n['median']:.0f} ({n['min']:.0f}–{n['max']:.0f}) | {e['median']:.0f} "
            f"({e['min']:.0f}–{e['max']:.0f}) | " + " | ".join(cells) + " |"
        )
    names = sorted({n for r in runs for n in r["pooled"]})
    lines += ["", "| difference | " + " | ".join(f"fraction {r['train_fraction']:g}" for r in runs) + " |"]
    lines.append("|---|" + "---|" * len(runs))
    for n in names:
        cells = []
        for r in runs:
            d = r["pooled"].get(n)
            cells.append(
                f"{d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}], {d['above_zero']}/"
                f"{len(d['cohorts'])} above 0"
                if d
                else "–"
            )
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = summary["runs"]
    x = [r["train_fraction"] for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in sorted({m for r in runs for m in r["test_c_index"]}):
        ys = [r["test_c_index"].get(m, {}).get("mean", np.nan) for r in runs]
        n = max(r["test_c_index"].get(m, {}).get("n_cohorts", 0) for r in runs)
        left.plot(x, ys, marker="o", label=f"{m} ({n} cohorts)", linestyle="--" if m in BASELINES else "-")
    left.set_xscale("log")
    left.minorticks_off()
    left.set_xticks(x, [f"{f:g}" for f in x])
    left.set_xlabel("share of each fold's training patients")
    left.set_ylabel(f"test C-index, mean over {summary['role']} cohorts")
    left.legend(fontsize=8)
    names = sorted({n for r in runs for n in r["pooled"]})
    for i, n in enumerate(names):
        pts = [(f, r["pooled"][n]) for f, r in zip(x, runs) if n in r["pooled"]]
        xs = np.array([f for f, _ in pts]) * (1 + 0.04 * (i - (len(names) - 1) / 2))  # side by side
        ys = np.array([d["difference"] for _, d in pts])
        err = np.array([[y - d["ci95"][0], d["ci95"][1] - y] for y, (_, d) in zip(ys, pts)]).T
        right.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=n)
    right.axhline(0, color="grey", lw=0.8)
    right.set_xscale("log")
    right.minorticks_off()
    right.set_xticks(x, [f"{f:g}" for f in x])
    right.set_xlabel("share of each fold's training patients")
    right.set_ylabel("pooled C-index difference (95% bootstrap CI)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="survival_cv.py output folders, one per fraction")
    p.add_argument("--role", default="development", choices=["development", "external"])
    p.add_argument("--output_dir", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    runs = [load(f) for f in args.runs]
    summary = summarise(runs, args.runs, args.role)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".label_efficiency.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / "label_efficiency.json")
    text = report(summary)
    (out / "label_efficiency.md").write_text(text)
    plot(summary, out / "label_efficiency.png")
    logger.info("%s\nwritten to %s", text, out)
    return summary


if __name__ == "__main__":
    main()
