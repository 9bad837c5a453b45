"""Which epoch each finetuning run of ``survival_cv.py`` kept, and how often its validation C-index tied.

For every ``--runs`` folder (a ``survival_cv.py --output_dir``) and each finetuned arm, the run the learning-rate
grid selected in each cohort and fold: the epoch ``--load_best_model_at_end`` kept, how many of the evaluations tied
with it and the tie rule (``--best_model_ties``). ``survival_cv.json`` records them per fold (``best_checkpoint``);
outputs written before it did are read from the selected run's ``runs/<tag>/all_results.json``
(``train.best_checkpoint``, written by ``run_finetune``). Printed and written as Markdown and JSON:
per folder and arm, the runs, the share with tied evaluations and the median kept epoch; with ``--against`` (one
folder for all, or one per ``--runs`` folder), per arm, how many selected runs kept another epoch than the same
cohort, fold and learning rate there.

    python benchmarks/kept_checkpoints.py --runs outputs/evidence/survset/survival_cv_labeff_tf0.25_val_tiesloss \
        --against outputs/evidence/survset/survival_cv_labeff_tf0.25_val --output_dir outputs/kept_tiesloss
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ARMS = ("bp_pretrained", "bp_random")


def kept_epochs(run_dir: Path, arms=ARMS) -> dict[tuple[str, str, int], dict]:
    """``(arm, cohort, fold) -> {"lr", "tag", "epoch", "evaluations", "tied_evaluations", "ties"}`` for the run the
    learning-rate grid selected (``tag``: its run folder, None where ``survival_cv.json`` recorded the epoch); runs
    without a kept-checkpoint record (``--bp_keep_last``) are left out."""
    res = json.loads((run_dir / "survival_cv.json").read_text())
    runs = run_dir / "runs"
    folders = {p.name: p for p in runs.iterdir()} if runs.is_dir() else {}
    out = {}
    for cohort, rec in res["cohorts"].items():
        for arm in arms:
            model = rec["models"].get(arm) or {}
            lrs = model.get("lr") or []
            if (recorded := model.get("best_checkpoint")) is not None:
                for k, (lr, kept) in enumerate(zip(lrs, recorded, strict=True)):
                    if kept:
                        out[arm, cohort, k] = {"lr": lr, "tag": None, **kept, "ties": kept.get("ties", "first")}
                continue
            for k, lr in enumerate(lrs):
                prefix = f"{cohort}_f{k}_{arm}_lr{lr:g}"
                # the tag continues with the run's settings (_ties..., _tf..., _val, _init...): one folder matches
                found = [n for n in folders if n == prefix or n.startswith(prefix + "_")]
                if len(found) != 1:
                    raise ValueError(f"{run_dir}: {len(found)} run folders for {prefix}: {found[:3]}")
                kept = json.loads((folders[found[0]] / "all_results.json").read_text())["train"].get("best_checkpoint")
                if kept:
                    out[arm, cohort, k] = {"lr": lr, "tag": found[0], **kept, "ties": kept.get("ties", "first")}
    return out


def summary(kept: dict, arm: str) -> dict:
    rows = [v for (a, _, _), v in kept.items() if a == arm]
    if not rows:
        return {"runs": 0}
    return {
        "runs": len(rows),
        "tied_share": sum(r["tied_evaluations"] > 1 for r in rows) / len(rows),
        "median_kept_epoch": statistics.median(r["epoch"] for r in rows),
        "rule": sorted({r["ties"] for r in rows}),
    }


def changed(kept: dict, ref: dict, arm: str) -> dict:
    """Selected runs of ``kept`` whose twin in ``ref`` (same cohort, fold and learning rate) kept another epoch."""
    pairs = [(v, ref[key]) for key, v in kept.items() if key[0] == arm and key in ref and ref[key]["lr"] == v["lr"]]
    moved = [(a["epoch"], b["epoch"]) for a, b in pairs if a["epoch"] != b["epoch"]]
    return {
        "paired_runs": len(pairs),
        "kept_another_epoch": len(moved),
        "median_shift": statistics.median(a - b for a, b in moved) if moved else 0.0,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="survival_cv.py output folders")
    parser.add_argument(
        "--against",
        nargs="+",
        type=Path,
        default=None,
        help="folders run with another tie rule: one for every --runs folder (in order), or one for all",
    )
    parser.add_argument("--output_dir", type=Path, required=True)
    args = parser.parse_args(argv)
    against = args.against or []
    if len(against) not in (0, 1, len(args.runs)):
        parser.error(f"--against takes 1 folder or one per --runs folder ({len(args.runs)}), got {len(against)}")
    refs = [kept_epochs(a) for a in against]
    refs = refs * len(args.runs) if len(refs) == 1 else refs or [None] * len(args.runs)
    result, lines = (
        {},
        [
            "| runs | arm | selected runs | with tied evaluations | median kept epoch | rule "
            "| kept another epoch than --against |",
            "|---|---|---:|---:|---:|---|---|",
        ],
    )
    for run_dir, ref in zip(args.runs, refs, strict=True):
        kept = kept_epochs(run_dir)
        for arm in ARMS:
            s = summary(kept, arm)
            if ref is not None:
                s["against"] = changed(kept, ref, arm)
            result[f"{run_dir.name}/{arm}"] = s
            if not s["runs"]:
                continue
            vs = s.get("against")
            moved = (
                f"{vs['kept_another_epoch']} of {vs['paired_runs']} (median shift {vs['median_shift']:+g} epochs)"
                if vs
                else "–"
            )
            lines.append(
                f"| {run_dir.name} | {arm} | {s['runs']} | {s['tied_share']:.0%} | {s['median_kept_epoch']:g} | "
                f"{', '.join(s['rule'])} | {moved} |"
            )
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "kept_checkpoints.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.output_dir / "kept_checkpoints.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
