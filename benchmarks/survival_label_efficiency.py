#!/usr/bin/env python
"""SurvSet label efficiency: ``benchmarks/survival_cv.py`` runs that differ in ``--train_fraction``, side by side.

Pretraining on unlabelled profiles should matter most when labels are few. Give this script ``survival_cv.py``
output folders -- the same cohorts, ``--folds``, ``--seed``, ``--val_fraction`` and ``--n_bootstrap`` (so the same
folds, the same test patients and the same bootstrap draws), each fitted on a share of every fold's training
patients (``--train_fraction``; the shares are nested; with ``--subsample_validation`` the validation part shrinks
with it, and every run below fraction 1 must be made the same way), optionally several runs per fraction
(finetuning or pretraining seeds) -- and it reports, per training fraction:

* the test C-index of every model averaged over the development cohorts it ran on (each cohort weighted equally)
  and over the fraction's runs, and the training patients and events per fold (median and range over cohorts);
* every pooled paired difference ``survival_cv.py`` computed (e.g. ``bp_pretrained - bp_random``,
  ``bp_pretrained - best baseline``): each run's value, the mean over the fraction's runs and a 95% interval from
  the patient bootstrap of the run-averaged replicates (the spread between seeds is not in it:
  ``benchmarks/seed_spread.py`` adds it);
* the trend: each fraction's run-averaged difference minus the largest fraction's, paired replicate by replicate
  (the same test patients at every fraction), so "pretraining helps more with fewer labels" is itself a difference
  with an interval; when every fraction has the same runs (backbone and ``--init_seed``), also each run's own
  trend and a two-level interval that redraws the runs, then the patients (as ``seed_spread.py``).

Outputs (``--output_dir``): ``label_efficiency.json``, ``label_efficiency.md`` and ``label_efficiency.png`` (mean
test C-index per model against the training fraction; the pooled differences with their intervals).

    python benchmarks/survival_label_efficiency.py --runs outputs/cv_tf0.25 outputs/cv_tf0.5 outputs/cv_tf1 \\
        outputs/cv_tf0.25_init1 outputs/cv_tf0.5_init1 outputs/cv_tf1_init1 --output_dir outputs/label_efficiency
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
from pathlib import Path

import numpy as np

logger = logging.getLogger("survival_label_efficiency")
ROOT = Path(__file__).resolve().parents[1]
SHARED = ("folds", "seed", "val_fraction")  # what every run must share (train_fraction and init_seed may differ)
BASELINES = ("cox_clinical", "cox_clinical_pcs", "rsf")


def _seed_spread():
    spec = importlib.util.spec_from_file_location("seed_spread", ROOT / "benchmarks" / "seed_spread.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fraction_of(run: dict) -> float:
    return float(run["res"].get("train_fraction", 1.0))  # runs made before --train_fraction used every patient


def _interval(x: np.ndarray) -> list[float]:
    x = x[~np.isnan(x)]
    return [float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5))] if len(x) else [float("nan")] * 2


def _patients(fold: dict, part: str) -> int:
    """Patients in a fold's part (rows, for results recorded before ``survival_cv.py`` counted patients)."""
    return (fold.get("patients") or fold["n"])[part]


def lr_ties(runs: list[dict], role: str) -> dict[str, dict]:
    """Per BioPerceiver arm with a learning-rate grid: over the runs' folds of ``role`` cohorts, how many picks were
    ties (another rate had the same best validation C-index; the tie goes to the first rate of the grid). Few
    validation patients mean few ranked pairs, and a "choice" that is often the grid's order."""
    out: dict[str, dict] = {}
    for run in runs:
        for r in run["res"]["cohorts"].values():
            if r["role"] != role:
                continue
            for m, s in r["models"].items():
                for sel in s.get("selected") or []:
                    vals = [v for v in ((sel or {}).get("validation") or {}).values() if v is not None]
                    if "lr" not in (sel or {}) or len(vals) < 2:
                        continue
                    vals = np.array(vals, float)
                    best = np.nanmax(vals) if np.isfinite(vals).any() else np.nan
                    rec = out.setdefault(m, {"tied": 0, "folds": 0})
                    rec["folds"] += 1
                    rec["tied"] += int(np.isnan(best) or np.sum(np.isclose(vals, best)) > 1)
    return out


def pooled(ss, runs: list[dict], role: str) -> dict[str, dict]:
    """Per pooled difference that every run reports over the same cohorts: the run-averaged point (cohorts
    weighted equally) and the run-averaged pooled replicates (NaN where a draw had no comparable pair)."""
    per_run = [ss.cohort_differences(r, role) for r in runs]
    out = {}
    for key in per_run[0]:
        if not all(key in p and list(p[key]) == list(per_run[0][key]) for p in per_run):
            logger.warning("%s: the runs of one fraction cover different cohorts; left out", key)
            continue
        cohorts = list(per_run[0][key])
        point = np.array([[p[key][c][0] for c in cohorts] for p in per_run])  # (runs, cohorts)
        reps = np.stack([np.stack([p[key][c][1] for c in cohorts]) for p in per_run])  # (runs, cohorts, boot)
        out[key] = {
            "cohorts": cohorts,
            "per_run": point.mean(axis=1).tolist(),
            "above_zero": [int((row > 0).sum()) for row in point],
            "mean": float(point.mean()),
            "_replicates": reps.mean(axis=(0, 1)),
            "_run_replicates": reps.mean(axis=1),  # (runs, boot)
        }
    return out


def run_key(run: dict) -> tuple:
    """What makes a run a seed: its backbone (``--pretrained_dir``) and ``--init_seed``."""
    res = run["res"]
    return ((res.get("bp") or {}).get("pretrained_dir"), res.get("init_seed", res.get("seed")))


def two_level(ss, per_run: np.ndarray, n_boot: int = 10000, seed: int = 0) -> list[float]:
    """95% interval of the mean over runs from ``per_run`` (runs, patient draws), ``seed_spread.py``'s two-level
    bootstrap (runs, then patients)."""
    return _interval(ss.two_level_replicates(per_run, np.random.default_rng(seed), n_boot))


def summarise(runs: list[dict], role: str = "development", ss=None) -> dict:
    """Per fraction (ascending): the run-averaged cohort-mean test C-index per model, the training patients and
    events per fold, each pooled difference with its interval, and the trend against the largest fraction.
    ``ss``: the loaded ``seed_spread`` module (loaded here when not given)."""
    ss = ss or _seed_spread()
    ss.check_compatible(runs, [r["folder"] for r in runs], shared=SHARED)
    shrunk = {bool(r["res"].get("subsample_validation")) for r in runs if fraction_of(r) < 1}
    if len(shrunk) > 1:  # at fraction 1 the flag is a no-op, so a full run pairs with either
        raise ValueError(
            "some runs drew their validation parts with the training share (--subsample_validation) and some did "
            "not: combine runs made the same way (the full-data runs pair with either)"
        )
    groups: dict[float, list[dict]] = {}
    for r in runs:
        groups.setdefault(fraction_of(r), []).append(r)
    fractions = sorted(groups)
    for f in fractions:  # one order of runs (seeds) in every fraction, so run i pairs across fractions
        groups[f].sort(key=lambda r: json.dumps(run_key(r), default=str))
    paired_runs = len({tuple(json.dumps(run_key(r), default=str) for r in groups[f]) for f in fractions}) == 1
    rows, diffs = [], {}
    for f in fractions:
        group = groups[f]
        models: dict[str, list[float]] = {}
        for run in group:
            for r in run["res"]["cohorts"].values():
                if r["role"] != role:
                    continue
                for m, s in r["models"].items():
                    if "test" in s:
                        models.setdefault(m, []).append(s["test"]["mean"])
        cohorts = [r for r in group[0]["res"]["cohorts"].values() if r["role"] == role]
        train = [np.mean([_patients(fo, "train") for fo in r["folds"]]) for r in cohorts]  # per cohort
        events = [np.mean([fo["events"]["train"] for fo in r["folds"]]) for r in cohorts]
        val = [np.mean([_patients(fo, "validation") for fo in r["folds"]]) for r in cohorts]
        pairs = [fo["validation_pairs"] for r in cohorts for fo in r["folds"] if "validation_pairs" in fo]
        n_cohorts = {m: len(v) // len(group) for m, v in models.items()}
        diffs[f] = pooled(ss, group, role)
        rows.append(
            {
                "train_fraction": f,
                "runs": [r["folder"] for r in group],
                "n_cohorts": len(cohorts),
                "train_patients_per_fold": {"median": float(np.median(train)), "min": min(train), "max": max(train)},
                "validation_patients_per_fold": {"median": float(np.median(val)), "min": min(val), "max": max(val)},
                "train_events_per_fold": {"median": float(np.median(events)), "min": min(events), "max": max(events)},
                **({"validation_pairs_per_fold": {"median": float(np.median(pairs))}} if pairs else {}),
                "lr_ties": lr_ties(group, role),
                "test_c_index": {
                    m: {"mean": float(np.mean(v)), "n_cohorts": n_cohorts[m]} for m, v in models.items() if v
                },
                "pooled": {
                    k: {
                        **{a: b for a, b in d.items() if not a.startswith("_")},
                        "ci95": _interval(d["_replicates"]),
                        **({"ci95_runs_and_patients": two_level(ss, d["_run_replicates"])} if len(group) > 1 else {}),
                    }
                    for k, d in diffs[f].items()
                },
            }
        )
    top = fractions[-1]
    for row, f in zip(rows, fractions):
        row["minus_largest_fraction"] = {}
        if f == top:
            continue
        for k, d in diffs[f].items():
            ref = diffs[top].get(k)
            if ref is None or ref["cohorts"] != d["cohorts"]:
                continue
            delta = d["_replicates"] - ref["_replicates"]
            ok = delta[~np.isnan(delta)]
            row["minus_largest_fraction"][k] = {
                "difference": d["mean"] - ref["mean"],
                "ci95": _interval(delta),
                "p_boot_le_0": float(np.mean(ok <= 0)) if len(ok) else float("nan"),
            }
            if paired_runs and len(groups[f]) > 1:  # run i here and run i at the largest fraction: the same seeds
                per_run = d["_run_replicates"] - ref["_run_replicates"]
                row["minus_largest_fraction"][k].update(
                    per_run=(np.array(d["per_run"]) - np.array(ref["per_run"])).tolist(),
                    ci95_runs_and_patients=two_level(ss, per_run),
                )
    return {
        "role": role,
        "largest_fraction": top,
        "fractions": rows,
        "subsample_validation": bool(shrunk and shrunk.pop()),
        **{k: runs[0]["res"].get(k) for k in SHARED},
    }


def _cell(point: str, d: dict, per_run_key: str | None = None, p: bool = False) -> str:
    """``point [patient CI](, p ...)( / [runs and patients CI])(; runs a, b, ...)``."""
    text = f"{point} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
    text += f", p {d['p_boot_le_0']:.3f}" if p else ""
    if two := d.get("ci95_runs_and_patients"):
        text += f" / [{two[0]:+.3f}, {two[1]:+.3f}]"
    if per_run_key and per_run_key in d:
        text += "; runs " + ", ".join(f"{v:+.3f}" for v in d[per_run_key])
    return text


def report(summary: dict) -> str:
    rows = summary["fractions"]
    models = [m for m in (*BASELINES, "bp_random", "bp_pretrained") if any(m in r["test_c_index"] for r in rows)]
    models += sorted({m for r in rows for m in r["test_c_index"]} - set(models))
    n = {m: max(r["test_c_index"].get(m, {}).get("n_cohorts", 0) for r in rows) for m in models}
    lines = [
        f"Test C-index averaged over the {summary['role']} cohorts a model ran on (each cohort's mean over folds; the "
        "clinical Cox model only where a cohort has clinical covariates) and over the runs of each fraction:",
        "",
        "| training fraction | runs | training patients per fold, median over cohorts (range) | training events | "
        + " | ".join(f"{m} ({n[m]} cohorts)" for m in models)
        + " |",
        "|---|---|---|---|" + "---|" * len(models),
    ]
    for r in rows:
        cells = [f"{r['test_c_index'][m]['mean']:.3f}" if m in r["test_c_index"] else "–" for m in models]
        p, e = r["train_patients_per_fold"], r["train_events_per_fold"]
        lines.append(
            f"| {r['train_fraction']:g} | {len(r['runs'])} | {p['median']:.0f} ({p['min']:.0f}–{p['max']:.0f}) | "
            f"{e['median']:.0f} ({e['min']:.0f}–{e['max']:.0f}) | " + " | ".join(cells) + " |"
        )
    v = {r["train_fraction"]: r["validation_patients_per_fold"]["median"] for r in rows}
    lines += [
        "",
        (
            "Below fraction 1 the validation parts were drawn with the same share as the training parts "
            "(`--subsample_validation`)"
            if summary.get("subsample_validation")
            else "The validation parts are the same at every fraction"
        )
        + ": median validation patients per fold "
        + ", ".join(f"{v[f]:.0f} at {f:g}" for f in sorted(v))
        + ".",
    ]
    ties = [(r["train_fraction"], m, t) for r in rows for m, t in sorted(r.get("lr_ties", {}).items())]
    if ties:
        pairs = {
            r["train_fraction"]: r["validation_pairs_per_fold"]["median"]
            for r in rows
            if "validation_pairs_per_fold" in r
        }
        lines.append(
            "Learning-rate picks that were validation ties (resolved to the grid's first rate): "
            + "; ".join(f"{m} {t['tied']} of {t['folds']} folds at {f:g}" for f, m, t in ties)
            + (
                " (median ranked validation pairs per fold: "
                + ", ".join(f"{pairs[f]:.0f} at {f:g}" for f in sorted(pairs))
                + ")"
                if pairs
                else ""
            )
            + "."
        )
    names = sorted({k for r in rows for k in r["pooled"]})
    lines += [
        "",
        "Pooled paired differences (cohorts weighted equally): mean over the fraction's runs [95% patient-bootstrap "
        "CI of the run-averaged replicates] / [95% CI redrawing runs, then patients]; each run's value after it.",
        "",
        "| difference | " + " | ".join(f"fraction {r['train_fraction']:g}" for r in rows) + " |",
        "|---|" + "---|" * len(rows),
    ]
    for k in names:
        cells = []
        for r in rows:
            d = r["pooled"].get(k)
            cells.append(_cell(f"**{d['mean']:+.3f}**", d, "per_run") if d else "–")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    trend = [r for r in rows if r["minus_largest_fraction"]]
    if trend:
        lines += [
            "",
            f"Trend: each fraction's difference minus the same difference at fraction {summary['largest_fraction']:g}, "
            "paired on the same test patients and bootstrap draws (p: share of draws ≤ 0); with the same runs (seeds) "
            "at every fraction, also [95% CI redrawing runs, then patients] and each run's own trend.",
            "",
            "| difference | "
            + " | ".join(f"{r['train_fraction']:g} − {summary['largest_fraction']:g}" for r in trend)
            + " |",
            "|---|" + "---|" * len(trend),
        ]
        for k in names:
            cells = []
            for r in trend:
                d = r["minus_largest_fraction"].get(k)
                cells.append(_cell(f"{d['difference']:+.3f}", d, "per_run", p=True) if d else "–")
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["fractions"]
    x = [r["train_fraction"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in sorted({m for r in rows for m in r["test_c_index"]}):
        ys = [r["test_c_index"].get(m, {}).get("mean", np.nan) for r in rows]
        n = max(r["test_c_index"].get(m, {}).get("n_cohorts", 0) for r in rows)
        left.plot(x, ys, marker="o", label=f"{m} ({n} cohorts)", linestyle="--" if m in BASELINES else "-")
    names = sorted({k for r in rows for k in r["pooled"]})
    for i, k in enumerate(names):
        pts = [(f, r["pooled"][k]) for f, r in zip(x, rows) if k in r["pooled"]]
        xs = np.array([f for f, _ in pts]) * (1 + 0.04 * (i - (len(names) - 1) / 2))  # side by side
        ys = np.array([d["mean"] for _, d in pts])
        err = np.array([[y - d["ci95"][0], d["ci95"][1] - y] for y, (_, d) in zip(ys, pts)]).T
        right.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=k)
    right.axhline(0, color="grey", lw=0.8)
    for ax in (left, right):
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(x, [f"{f:g}" for f in x])
        ax.set_xlabel(
            "share of each fold's training "
            + ("and validation patients" if summary.get("subsample_validation") else "patients")
        )
        ax.legend(fontsize=8)
    left.set_ylabel("test C-index, mean over cohorts and runs")
    right.set_ylabel("pooled C-index difference (95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="survival_cv.py output folders (any number per fraction)")
    p.add_argument("--role", default="development", choices=["development", "external"])
    p.add_argument("--output_dir", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ss = _seed_spread()
    runs = [ss.load_run(f) for f in args.runs]
    summary = summarise(runs, args.role, ss)
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
