"""Label efficiency on PadChest findings with a backbone pretrained on all of PadChest (issue #18).

The findings task (the 6 most frequent PadChest findings of the labelled pool's training patients, multilabel,
from ``text_report`` + ``tabular_study``) with 1%, 10% and 100% of the labelled pool's training patients, 3 seeds
each, five models on exactly the same patients:

* ``pretrained`` -- full finetuning of the backbone ``pretrain/configs/padchest.yaml`` pretrained (report <-> study
  fields, CLIP) on the *train* split of the full-PadChest manifest;
* ``random`` -- the same architecture, randomly initialised, same processors (the WordPiece vocabulary fitted on the
  pretraining reports) and the same finetuning settings: the difference is the pretrained weights only;
* ``pretrained_probe`` -- the pretrained backbone frozen, a linear head trained on its cached embeddings
  (``finetune_tasks.BP_CONFIGS["pretrained_linear_probe"]``: lr 3e-3);
* ``random_probe`` -- its control: the *randomly initialised* backbone frozen, the same linear head and settings
  (what the probe gets from the architecture and processors alone; the gap to ``pretrained_probe`` is what the
  pretrained features carry);
* ``tfidf_lr`` -- TF-IDF word 1-2-grams + study fields + one-vs-rest logistic regression, the vectoriser and C fitted
  / chosen on the run's labelled patients and the validation patients (``benchmarks/finetune_tasks.py``'s
  ``tfidf_lr``).

What "100%" means: a *fixed labelled pool* of ``--pool_patients`` training patients (seeded sample of the
manifest's train split; all their studies), so that one run of this script fits the CPU budget; 1% / 10% are
patients drawn from that pool by ``subsample_patients`` with the run's seed (the draw ``run_finetune
--label_fraction`` makes). Validation: ``--val_patients`` of the validation split (checkpoint choice and TF-IDF's C:
selection on validation only). Test: ``--test_patients`` of the test split -- the test split of the same patient
hash the pretraining used, so no test patient (labelled or not) was seen in pretraining (checked and recorded).

Scores: test macro AUROC with a 95% patient-bootstrap interval per run; per fraction the mean over seeds with the
bootstrap interval of that mean (the same resampled patients for every seed and model) and the paired bootstrap of
``pretrained - random`` and ``pretrained - tfidf_lr``. Every finished run is kept in ``--work_dir/points/`` (its
test probabilities included) and skipped when the script is run again (resume). Writes a JSON, a PNG and the
tables as markdown (``label_efficiency.md``).

    python benchmarks/label_efficiency.py --manifest outputs/padchest/cohort/manifest.parquet \
        --pretrained_dir outputs/padchest/pretrain/final --work_dir outputs/padchest/label_efficiency
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = "tokenizers/padchest_processors.yaml"
ARMS = ("pretrained", "random", "tfidf_lr", "pretrained_probe", "random_probe")
# finetune_tasks.BP_CONFIGS setting of each BioPerceiver arm (the learning rate of the full arms is --lr, or the
# best on validation of --lrs)
BP_ARMS = {
    "pretrained": "pretrained_full",
    "random": "random_full",
    "pretrained_probe": "pretrained_linear_probe",
    "random_probe": "random_linear_probe",  # the control of the probe: what a frozen *random* backbone gives
}
PROBE_CONTROL = {"random_linear_probe": {"pretrained": False, "mode": "linear_probe", "lr": 3e-3, "epochs": 30}}
TASK = ["--task", "multilabel", "--label_column", "label_findings", "--top_k_labels", "6"]
MODALITIES = ["text_report", "tabular_study"]


def _finetune_tasks():
    """``benchmarks/finetune_tasks.py`` as a module (its FindingsData, BPRunner, tfidf_lr, scoring functions)."""
    spec = importlib.util.spec_from_file_location("finetune_tasks", ROOT / "benchmarks" / "finetune_tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sample_patients(table: pd.DataFrame, split: str, n: int, seed: int) -> list[str]:
    patients = np.array(sorted(table.loc[table["split"] == split, "patient_id"].astype(str).unique()))
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(patients, size=min(n, len(patients)), replace=False).tolist())


def labelled_manifest(args) -> tuple[Path, dict]:
    """The labelled pool, validation and test patients as one manifest with their ``split``, in ``--work_dir``."""
    from bioperceiver.data import read_manifest
    from bioperceiver.data.manifest import write_manifest

    path = Path(args.work_dir) / "labelled.parquet"
    m = read_manifest(args.manifest)
    table = m.table
    if "split" not in table:
        raise SystemExit(f"{args.manifest} has no split column: build it with bioperceiver.data.recipes.padchest")
    table = table[table["text_report"].notna() & table["label_findings"].notna()]
    chosen = {
        "train": sample_patients(table, "train", args.pool_patients, args.seed),
        "validation": sample_patients(table, "validation", args.val_patients, args.seed),
        "test": sample_patients(table, "test", args.test_patients, args.seed),
    }
    keep = set().union(*chosen.values())
    sub = table[table["patient_id"].astype(str).isin(keep)].reset_index(drop=True)
    # the pretraining saw the manifest's train split only: no test or validation patient may be in it
    pretrain_patients = set(m.table.loc[m.table["split"] == "train", "patient_id"].astype(str))
    info = {
        "patients": {k: len(v) for k, v in chosen.items()},
        "studies": {k: int(v) for k, v in sub["split"].value_counts().items()},
        "test_patients_in_pretraining": len(set(chosen["test"]) & pretrain_patients),
        "validation_patients_in_pretraining": len(set(chosen["validation"]) & pretrain_patients),
    }
    if info["test_patients_in_pretraining"]:
        raise SystemExit(f"{info['test_patients_in_pretraining']} test patients are in the pretraining split")
    if not path.exists():
        meta = {k: v for k, v in m.metadata.items() if k in ("modalities", "labels", "label_notes")}
        write_manifest(
            sub[["sample_id", "patient_id", "split", *MODALITIES, "label_findings", "meta_source"]], path, metadata=meta
        )
    return path, info


def bootstrap_means(data, probs: dict[str, list[np.ndarray]], n_boot: int, seed: int) -> dict:
    """Per model, the mean over seeds of the test macro AUROC with its patient-bootstrap 95% interval, and the
    paired intervals of ``pretrained - random`` and ``pretrained - tfidf_lr`` (same resamples throughout)."""
    from bioperceiver.evaluation import Resampler, compute_task_metrics, quiet_metric_warnings

    recs, y = data.data["test"]
    groups = np.array([r["patient_id"] for r in recs])

    from sklearn.metrics import roc_auc_score

    def macro_auc(p, yy):
        if (yy.min(0) != yy.max(0)).all():  # every label has both classes: sklearn's macro AUROC, the same number
            return roc_auc_score(yy, p, average="macro")
        return compute_task_metrics("multilabel", p, yy, from_logits=False)["auroc"]  # the labels where defined

    def mean_auc(name, idx):
        return float(np.mean([macro_auc(p[idx], y[idx]) for p in probs[name]]))

    names = [n for n in ARMS if probs.get(n)]
    point = {n: mean_auc(n, np.arange(len(y))) for n in names}
    draws = {n: [] for n in names}
    with quiet_metric_warnings():
        for idx in Resampler(len(y), n_boot, seed, groups).indices():
            for n in names:
                draws[n].append(mean_auc(n, idx))
    out = {}
    for n in names:
        d = np.asarray(draws[n])
        out[n] = {
            "auroc": point[n],
            "ci_low": float(np.nanquantile(d, 0.025)),
            "ci_high": float(np.nanquantile(d, 0.975)),
        }
    pairs = (("pretrained", "random"), ("pretrained", "tfidf_lr"), ("pretrained_probe", "random"))
    for a, b in (*pairs, ("pretrained_probe", "random_probe")):
        if a in names and b in names:
            d = np.asarray(draws[a]) - np.asarray(draws[b])
            out[f"{a}_minus_{b}"] = {
                "difference": point[a] - point[b],
                "ci_low": float(np.nanquantile(d, 0.025)),
                "ci_high": float(np.nanquantile(d, 0.975)),
                "p_a_better": float(np.mean(d > 0)),
            }
    return out


def schedule(n_rows: int, args) -> tuple[int, list[str]]:
    """Optimiser steps (``--epochs`` passes, at least ``--min_steps``, at most ``--max_steps``) and the flags."""
    spe = math.ceil(n_rows / args.batch_size)
    steps = int(min(max(args.epochs * spe, args.min_steps), args.max_steps))
    every = max(1, steps // args.evals_per_run)
    flags = ["--max_steps", str(steps), "--eval_strategy", "steps", "--eval_steps", str(every)]
    flags += ["--save_strategy", "steps", "--save_steps", str(every)]
    flags += ["--per_device_train_batch_size", str(args.batch_size)]
    return steps, flags


def learning_rates(args) -> list[float]:
    """The full-finetuning arms' learning rates: ``--lrs`` (each run, the one with the best validation score
    kept) or the single ``--lr``."""
    return list(args.lrs) if args.lrs else [args.lr]


def choose_on_validation(tried: list[tuple[float, dict]]) -> tuple[float, dict]:
    """The (learning rate, run) with the highest *validation* score (the first on ties: the grid's order);
    test scores play no part."""
    return max(tried, key=lambda t: (t[1]["validation"], -tried.index(t)))


def run_point(ft, args, data, runner, frac: float, seed: int, points_dir: Path) -> dict:
    """One (fraction, seed): the models of ``--arms`` on the same patients. Each finished arm is saved
    (``points/<fraction>_<seed>_<arm>.json`` + ``.npy`` test probabilities) and read back on a rerun."""
    from bioperceiver.training.finetune_loop import subsample_patients

    tag = f"{frac:g}_{seed}"
    train_recs, y_train = data.data["train"]
    label_of = {r["sample_id"]: y for r, y in zip(train_recs, y_train)}
    recs = subsample_patients(train_recs, frac, seed)  # the draw run_finetune --label_fraction makes
    ys = np.stack([label_of[r["sample_id"]] for r in recs])
    steps, sched = schedule(len(recs), args)
    pt = {
        "fraction": frac,
        "seed": seed,
        "patients": len({r["patient_id"] for r in recs}),
        "rows": len(recs),
        "positives": dict(zip(data.spec.classes, ys.sum(0).tolist())),
        "steps": steps,
        "arms": [],
        "scores": {},
        "runs": {},
    }
    probs = {}
    for arm in args.arms:
        done = points_dir / f"{tag}_{arm}.json"
        if done.exists():
            rec = json.loads(done.read_text())
            probs[arm] = np.load(points_dir / f"{tag}_{arm}.npy")
            log(f"{tag} {arm}: finished earlier, read back (test {rec['score']['auroc']:.4f})")
        elif arm == "tfidf_lr":
            t0 = time.perf_counter()
            r = ft.tfidf_lr(data, recs, ys)
            probs[arm] = r["probs_test"]
            rec = {"validation": r["validation"], "C": r["C"], "wall_s": round(time.perf_counter() - t0, 1)}
        elif runner is None:
            continue
        else:
            cfg = dict({**ft.BP_CONFIGS, **PROBE_CONTROL}[BP_ARMS[arm]])
            lrs = learning_rates(args) if cfg["mode"] == "full" else [cfg["lr"]]
            extra = [*sched, "--processor_settings", SETTINGS, "--processor_dir", str(args.processor_dir)]
            tried = []
            for lr in lrs:
                name = f"le_{tag}_{arm}" if len(lrs) == 1 else f"le_{tag}_{arm}_lr{lr:g}"
                rr = runner.run(
                    name,
                    data.path,
                    TASK,
                    {**cfg, "lr": lr},
                    seed=seed,
                    label_fraction=frac,
                    modalities=MODALITIES,
                    extra=extra,
                )
                tried.append((lr, rr))
            lr, rr = choose_on_validation(tried)
            probs[arm] = ft.bp_probs(data, rr["pred"])
            rec = {"validation": rr["validation"], "wall_s": sum(r["wall_s"] for _, r in tried)}
            rec.update(split_sizes=rr["split_sizes"], argv=rr["argv"], lr=lr)
            if len(tried) > 1:  # every candidate's validation score: the choice is auditable
                rec["lr_grid"] = {f"{c:g}": r["validation"] for c, r in tried}
        if not done.exists():
            rec["score"] = ft.score_with_ci(data, probs[arm], args.n_bootstrap, args.seed)
            np.save(points_dir / f"{tag}_{arm}.npy", probs[arm])
            done.write_text(json.dumps(rec, indent=1, default=ft._json_default) + "\n")
            log(f"{tag} {arm}: {pt['patients']} patients / {pt['rows']} studies, test {rec['score']['auroc']:.4f}")
        pt["runs"][arm] = rec
        pt["scores"][arm] = rec["score"]
    pt["arms"] = list(probs)
    return {**pt, "probs": probs}


def report_markdown(res: dict) -> str:
    """The summary as markdown (``label_efficiency.md`` beside the JSON; ``benchmarks/evidence.py`` puts it in
    ``EVIDENCE.md``): per fraction, each arm's seed-mean test AUROC with its 95% interval and seed SD, then the
    paired differences."""
    arms = [a for a in ARMS if any(a in s for s in res["summary"].values())]
    lines = [
        f"Test macro AUROC, mean of seeds {res['seeds']} [95% patient-bootstrap CI of the mean] and the SD over seeds; "
        f"`{res['command']}`",
        "",
        "| labelled | " + " | ".join(arms) + " |",
        "|---|" + "---|" * len(arms),
    ]
    for frac in res["fractions"]:
        s = res["summary"][str(frac)]
        cells = [
            f"{s[a]['auroc']:.3f} [{s[a]['ci_low']:.3f}, {s[a]['ci_high']:.3f}] SD {s[a]['sd_over_seeds']:.3f}"
            if a in s
            else "–"
            for a in arms
        ]
        lines.append(f"| {frac:.0%} ({s['patients_mean']:.0f} pts) | " + " | ".join(cells) + " |")
    lines += ["", "| labelled | difference (paired) | mean | 95% CI |", "|---|---|---|---|"]
    for frac in res["fractions"]:
        for key, d in res["summary"][str(frac)].items():
            if "_minus_" in key:
                a, b = key.split("_minus_")
                lines.append(
                    f"| {frac:.0%} | {a} − {b} | {d['difference']:+.3f} | [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] |"
                )
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    fr = res["fractions"]
    arms = (("tfidf_lr", "C0"), ("pretrained", "C1"), ("random", "C2"), ("pretrained_probe", "C3"))
    for arm, color in (*arms, ("random_probe", "C4")):
        s = [res["summary"][str(f)].get(arm) for f in fr]
        if not all(s):
            continue
        mid = np.array([x["auroc"] for x in s])
        lo, hi = mid - np.array([x["ci_low"] for x in s]), np.array([x["ci_high"] for x in s]) - mid
        ax.errorbar(fr, mid, yerr=[lo, hi], marker="o", capsize=3, color=color, label=arm)
        for p in res["points"]:
            if arm in p["scores"]:
                ax.scatter(p["fraction"], p["scores"][arm]["auroc"], color=color, s=8, alpha=0.4)
    ax.set_xscale("log")
    ax.set_xticks(fr)
    ax.set_xticklabels([f"{f:.0%}\n({res['summary'][str(f)]['patients_mean']:.0f} pts)" for f in fr])
    ax.set_xlabel("share of the labelled pool's training patients")
    ax.set_ylabel("test macro AUROC (6 findings)")
    ax.set_title("PadChest findings: mean of 3 seeds, 95% patient-bootstrap CI", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", default=str(ROOT / "outputs" / "padchest" / "cohort" / "manifest.parquet"))
    p.add_argument("--pretrained_dir", default=str(ROOT / "outputs" / "padchest" / "pretrain" / "final"))
    p.add_argument("--work_dir", default=str(ROOT / "outputs" / "padchest" / "label_efficiency"))
    p.add_argument("--output", default=None, help="results JSON (default: --work_dir/label_efficiency.json)")
    p.add_argument("--pool_patients", type=int, default=2000, help="the labelled pool ('100%%') of train patients")
    p.add_argument("--val_patients", type=int, default=500)
    p.add_argument("--test_patients", type=int, default=1500)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=float, default=15, help="finetuning passes over the run's labelled studies")
    p.add_argument("--min_steps", type=int, default=60)
    p.add_argument("--max_steps", type=int, default=300)
    p.add_argument("--evals_per_run", type=int, default=6, help="validations (checkpoint choice) per run")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4, help="full-finetuning learning rate (without --lrs)")
    p.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=None,
        help="full-finetuning learning rates to try per run; the one with the best validation AUROC is kept",
    )
    p.add_argument("--n_bootstrap", type=int, default=500)
    p.add_argument("--seed", type=int, default=0, help="patient samples and bootstrap")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="models to run now")
    p.add_argument(
        "--processor_dir",
        default=None,
        help="processors of both BioPerceiver arms (default: --pretrained_dir's, i.e. the pretraining's)",
    )
    p.add_argument("--no_summary", action="store_true", help="run the arms only (another run writes the summary)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.chdir(ROOT)
    t0 = time.perf_counter()
    work = Path(args.work_dir)
    points_dir = work / "points"
    points_dir.mkdir(parents=True, exist_ok=True)
    out_json = Path(args.output) if args.output else work / "label_efficiency.json"

    ft = _finetune_tasks()
    from bioperceiver.data import read_manifest

    path, pool = labelled_manifest(args)
    log(f"labelled manifest {path}: {pool}")
    data = ft.FindingsData(read_manifest(path))
    ft_args = argparse.Namespace(work_dir=str(work), quick=False, reuse_runs=None)
    args.processor_dir = args.processor_dir or args.pretrained_dir
    bp = set(BP_ARMS) & set(args.arms)
    runner = ft.BPRunner(ft_args, Path(args.pretrained_dir)) if bp else None
    points = [
        run_point(ft, args, data, runner, frac, seed, points_dir) for frac in args.fractions for seed in args.seeds
    ]
    if args.no_summary:
        return {"points": points}
    summary = {}
    for frac in args.fractions:
        sel = [q for q in points if q["fraction"] == frac]
        probs = {a: [q["probs"][a] for q in sel if a in q["probs"]] for a in ARMS}
        probs = {a: v for a, v in probs.items() if len(v) == len(sel)}  # an arm with every seed done
        s = bootstrap_means(data, probs, args.n_bootstrap, args.seed)
        s["patients_mean"] = float(np.mean([q["patients"] for q in sel]))
        s["rows"] = [q["rows"] for q in sel]
        for a in ARMS:
            if a in probs:
                s[a]["per_seed"] = [q["scores"][a]["auroc"] for q in sel]
                s[a]["sd_over_seeds"] = float(np.std(s[a]["per_seed"], ddof=1)) if len(sel) > 1 else 0.0
        summary[str(frac)] = s
        log(
            f"fraction {frac:g}: "
            + ", ".join(
                f"{a} {s[a]['auroc']:.4f} [{s[a]['ci_low']:.4f}, {s[a]['ci_high']:.4f}]" for a in ARMS if a in s
            )
        )
    import torch

    res = {
        "command": " ".join([sys.executable.split("/")[-1], "benchmarks/label_efficiency.py", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d"),
        "manifest": str(args.manifest),
        "pretrained_dir": str(args.pretrained_dir),
        "pool": pool,
        "classes": data.spec.classes,
        "sizes": data.sizes(),
        "fractions": args.fractions,
        "seeds": args.seeds,
        "settings": {
            k: v for k, v in vars(args).items() if k not in ("manifest", "pretrained_dir", "work_dir", "output")
        },
        "points": [{k: v for k, v in q.items() if k != "probs"} for q in points],
        "summary": summary,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "wall_clock_s": round(time.perf_counter() - t0, 1),
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(res, indent=1, default=ft._json_default) + "\n")
    plot(res, out_json.with_suffix(".png"))
    out_json.with_suffix(".md").write_text(report_markdown(res))
    log(f"wrote {out_json} and {out_json.with_suffix('.png')} in {res['wall_clock_s']:.0f} s")
    return res


if __name__ == "__main__":
    main()
