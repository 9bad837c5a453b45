"""Utility vs. privacy budget for DP finetuning on the demo cohort (issue 17, "Utility vs epsilon").

For epsilon in {1, 3, 8, inf} (inf = the same run without DP) and a few seeds, runs ``finetune/run_finetune.py`` on

* ``findings``: PadChest findings (top-6, multilabel) from ``text_report`` + ``tabular_study``
  (``finetune/configs/demo_findings.yaml``: linear probe), test macro-AUROC;
* ``survival``: SurvSet survival from ``omics_expression`` + ``tabular_clinical``
  (``finetune/configs/demo_survival.yaml`` with ``--survival_loss discrete``: Cox is not per-sample decomposable,
  so every budget, inf included, uses the discrete-time head), test C-index;

each with its 95% patient-bootstrap CI (from ``all_results.json``) and the epsilon actually spent, and writes
``benchmarks/results/dp_utility.json`` plus a markdown table on stdout (paste into ``benchmarks/RESULTS.md``).

    .venv/bin/python benchmarks/dp_utility.py                          # both tasks, seeds 0 1 2
    .venv/bin/python benchmarks/dp_utility.py --tasks findings --seeds 0 --epochs 5   # a short run

The backbone is ``--model_name_or_path`` (default ``outputs/demo/pretrain/final``, made by ``make demo``); ``none``
finetunes a randomly initialised ``bioperceiver_debug`` instead (processors fitted on the training split, which
the DP guarantee does not cover: see ``all_results.json["privacy"]["not covered"]``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = {
    "findings": {"config": "finetune/configs/demo_findings.yaml", "metric": "auroc", "extra": []},
    "survival": {
        "config": "finetune/configs/demo_survival.yaml",
        "metric": "c_index",
        "extra": ["--survival_loss", "discrete"],
    },
}


def _load_script():
    spec = importlib.util.spec_from_file_location("run_finetune_dp_bench", ROOT / "finetune" / "run_finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _argv(task: str, eps: float, seed: int, args, out: Path) -> list[str]:
    spec = TASKS[task]
    argv = [str(ROOT / spec["config"]), *spec["extra"], "--output_dir", str(out), "--overwrite_output_dir", "true"]
    argv += ["--model_name_or_path", args.model_name_or_path, "--seed", str(seed), "--manifest", args.manifest]
    argv += ["--interpret", "false", "--uncertainty", "false", "--ablations", "false", "--save_strategy", "no"]
    argv += ["--load_best_model_at_end", "false", "--n_bootstrap", str(args.n_bootstrap)]
    if args.epochs:
        argv += ["--num_train_epochs", str(args.epochs)]
    if args.mode:
        argv += ["--finetuning_mode", args.mode]
    if math.isfinite(eps):
        argv += ["--dp_target_epsilon", str(eps), "--dp_delta", str(args.delta), "--dp_max_grad_norm", "1.0"]
    return argv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 3.0, 8.0, math.inf])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=float, default=None, help="override the argument files' epochs")
    parser.add_argument("--mode", default=None, help="override the finetuning mode (linear_probe, lora, full)")
    parser.add_argument("--n_bootstrap", type=int, default=1000)
    parser.add_argument("--model_name_or_path", default="outputs/demo/pretrain/final")
    parser.add_argument("--manifest", default="outputs/demo/cohort/manifest.parquet")
    parser.add_argument("--work_dir", default="outputs/bench_dp")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "dp_utility.json"))
    args = parser.parse_args()
    run_finetune = _load_script()
    rows = []
    for task in args.tasks:
        metric = TASKS[task]["metric"]
        for eps in args.epsilons:
            for seed in args.seeds:
                out = Path(args.work_dir) / f"{task}_eps{eps:g}_s{seed}"
                argv = _argv(task, eps, seed, args, out)
                t0 = time.perf_counter()
                res = run_finetune.main(argv)
                test = res.get("test", {})
                privacy = res.get("privacy") or {}
                rows.append(
                    {
                        "task": task,
                        "target_epsilon": eps,
                        "seed": seed,
                        "metric": metric,
                        "test": test.get(metric),
                        "ci_low": test.get(f"{metric}_ci_low"),
                        "ci_high": test.get(f"{metric}_ci_high"),
                        "n_test": test.get("n"),
                        "epsilon_spent": privacy.get("epsilon", math.inf),
                        "noise_multiplier": privacy.get("noise_multiplier"),
                        "steps": privacy.get("steps"),
                        "wall_s": round(time.perf_counter() - t0, 1),
                        "argv": argv,
                    }
                )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(rows, indent=1, default=str) + "\n")
    print("| task | target ε | seed | test metric (95% CI) | ε spent | noise σ | steps |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ci = f"{r['test']:.3f} ({r['ci_low']:.3f}–{r['ci_high']:.3f})" if r["test"] is not None else "n/a"
        print(
            f"| {r['task']} | {r['target_epsilon']:g} | {r['seed']} | {r['metric']} {ci} | {r['epsilon_spent']:.3g} "
            f"| {r['noise_multiplier'] if r['noise_multiplier'] is not None else '-'} | {r['steps'] or '-'} |"
        )


if __name__ == "__main__":
    main()
