#!/usr/bin/env python
"""Combine ``benchmarks/survival_cv.py`` runs that differ only in their seeds: is a difference larger than the
spread between seeds?

One pretraining seed can make pretraining look useful or useless on its own (SurvSet, ``benchmarks/RESULTS.md``).
Give this script several ``survival_cv.py`` output folders -- the same cohorts, ``--folds``, ``--seed`` and
``--val_fraction`` (so the same folds and bootstrap draws), each with another pretraining seed behind
``--pretrained_dir`` and/or another ``--init_seed`` -- and it reports, for every pooled paired difference
(``survival_cv.py``'s equal-weight average over a role's cohorts):

* each run's pooled difference and its 95% patient-bootstrap interval (as ``survival_cv.py`` reports it);
* the mean over runs, the SD between runs, and how many runs are above 0;
* a 95% interval for the mean over runs from a two-level bootstrap: each replicate redraws the runs with replacement
  and, within them, the test patients (replicate ``b`` of every run is the same patient draw, so the draws pair
  across runs); it covers both the spread between seeds and the sampling of patients;
* per cohort, the mean difference over runs;
* with ``--ensemble ARM [CONTROL]``: the runs' test risks of ``ARM`` averaged per patient (the Cox linear predictors
  of the runs' fitted models, nothing refitted or chosen again; read from each run's ``cache/``), scored like a
  single arm: per cohort against the best baseline (chosen on validation, as in the runs) and against ``CONTROL``
  averaged the same way, then pooled over the cohorts (``survival_cv.py``'s paired patient bootstrap, the same
  draws). An ensemble of pretraining seeds is the usual answer to seed-to-seed spread; this asks whether it pays.
* with ``--fuse_with MODEL`` (and ``--ensemble``): late fusion of each ensemble with a baseline (``best_baseline``:
  each cohort's validation pick), their ranks within each test fold averaged with equal weights, against the best
  baseline and fused control against fused arm: does the arm add anything to the classical model?
* with ``--versus ARM...``: runs that differ in one setting (e.g. ``survival_cv.py --bp_head_linear`` against the
  same run without it): the first run's ARM minus each other run's, paired on the same test patients, per cohort
  and pooled over the cohorts where the setting changed anything.
* with ``--against RUN...``: one partner per run, in the same order, with the same seeds and another setting (e.g.
  the same seed pairs on backbones pretrained on less data). Every pooled difference becomes the run's minus its
  partner's on the same test patients and bootstrap draws, and the mean over the pairs gets the two-level interval:
  a setting's effect with the seed-to-seed spread in its interval, which ``--versus`` (one pair) cannot give.

Outputs (``--output_dir``): ``seed_spread.json``, ``seed_spread.md`` and ``seed_spread.png`` (each run's interval
and the mean over runs, per difference).

    python benchmarks/seed_spread.py --runs outputs/cv_seed0 outputs/cv_seed1 outputs/cv_seed2 \\
        --labels seed0 seed1 seed2 --output_dir outputs/seed_spread \\
        --ensemble cox_clinical_emb_pretrained cox_clinical_emb_random
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
from pathlib import Path

import numpy as np

logger = logging.getLogger("seed_spread")
ROOT = Path(__file__).resolve().parents[1]
# what every combined run must share (the folds and the bootstrap draws depend on them)
SHARED = ("folds", "seed", "val_fraction", "train_fraction", "subsample_validation")
# runs made before survival_cv.py --train_fraction / --subsample_validation used every training / validation patient
DEFAULTS = {"train_fraction": 1.0, "subsample_validation": False}


def load_run(folder: str | Path) -> dict:
    """A ``survival_cv.py`` output folder: its JSON and, per ``(cohort, difference)``, the bootstrap replicates."""
    folder = Path(folder)
    res_path, rep_path = folder / "survival_cv.json", folder / "survival_cv_replicates.npz"
    for p in (res_path, rep_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"{p} is missing: run benchmarks/survival_cv.py with --output_dir {folder} (a finished run rerun with "
                "the same arguments reads every result back from its cache and writes the replicates)"
            )
    res = json.loads(res_path.read_text())
    with np.load(rep_path, allow_pickle=False) as z:
        reps = dict(zip((str(n) for n in z["names"]), z["replicates"]))
    return {"folder": str(folder), "res": res, "replicates": reps}


def check_compatible(runs: list[dict], labels: list[str], shared: tuple[str, ...] = SHARED) -> None:
    """Every run has the same folds and bootstrap draws as the first, or a ValueError naming the run and the fix;
    ``shared``: the settings that must agree (``benchmarks/survival_label_efficiency.py`` lets ``train_fraction``
    differ: the test patients, hence the draws, are the same at every fraction; it checks
    ``subsample_validation`` itself)."""
    ref = runs[0]["res"]
    n_ref = {len(v) for v in runs[0]["replicates"].values()}
    for run, label in zip(runs[1:], labels[1:]):
        res = run["res"]
        n_rep = {len(v) for v in run["replicates"].values()}
        if n_rep and n_ref and n_rep != n_ref:
            raise ValueError(
                f"run {label} ({run['folder']}) has {sorted(n_rep)} bootstrap replicates per difference, the first run "
                f"{sorted(n_ref)}: rerun survival_cv.py with the first run's --n_bootstrap"
            )
        for key in shared:
            mine, first = res.get(key, DEFAULTS.get(key)), ref.get(key, DEFAULTS.get(key))
            if mine != first:
                raise ValueError(
                    f"run {label} ({run['folder']}) has {key}={mine!r}, the first run {first!r}: "
                    f"combine runs that share {', '.join(shared)} (vary --init_seed or the pretraining seed instead)"
                )
        for cohort, r in res["cohorts"].items():
            if cohort not in ref["cohorts"]:
                continue
            ids = [f["test_ids"] for f in r["folds"]]
            if ids != [f["test_ids"] for f in ref["cohorts"][cohort]["folds"]]:
                raise ValueError(
                    f"run {label} ({run['folder']}): cohort {cohort}'s test folds differ from the first run's (another "
                    "manifest or cohort rows?); the bootstrap draws would not pair"
                )


def cohort_differences(run: dict, role: str) -> dict[str, dict[str, tuple[float, np.ndarray]]]:
    """``{pooled key ("a - b" or "a - best baseline"): {cohort: (difference, replicates)}}`` for ``role``."""
    out: dict[str, dict] = {}
    for cohort, r in run["res"]["cohorts"].items():
        if r["role"] != role:
            continue
        for key, d in r["paired_differences"].items():
            name = f"{cohort}\t{key}"
            if name not in run["replicates"]:
                raise ValueError(f"{run['folder']}: no replicates for {cohort} {key}; rerun survival_cv.py there")
            out.setdefault(" - ".join(d["pair"]), {})[cohort] = (float(d["difference"]), run["replicates"][name])
    return out


def two_level_replicates(per_run: np.ndarray, rng: np.random.Generator, n_boot: int) -> np.ndarray:
    """The mean over runs resampled at two levels from ``per_run`` ``(runs, patient draws)``: redraw the runs with
    replacement, then one patient draw (draw ``b`` is the same patients in every run, so it is taken for all)."""
    n_runs, n_rep = per_run.shape
    cols = rng.integers(n_rep, size=n_boot)
    picks = rng.integers(n_runs, size=(n_boot, n_runs))
    return per_run[picks, cols[:, None]].mean(axis=1)


# what a run and its --against partner must share besides SHARED: the same seeds and the same model-selection rules,
# so that the only difference between them is the setting being compared
PARTNER_SHARED = ("init_seed", "selection", "baseline_ties", "pca_rows")


def check_partners(runs: list[dict], against: list[dict], labels: list[str]) -> None:
    """Each run and its partner share :data:`PARTNER_SHARED` and cover the same cohorts, or a ValueError naming
    the pair and the setting."""
    for run, partner, label in zip(runs, against, labels):
        for key in PARTNER_SHARED:
            mine, theirs = run["res"].get(key), partner["res"].get(key)
            if mine != theirs:
                raise ValueError(
                    f"run {label} ({run['folder']}) has {key}={mine!r}, its --against partner ({partner['folder']}) "
                    f"{theirs!r}: pair runs that differ only in the setting compared"
                )
        if set(run["res"]["cohorts"]) != set(partner["res"]["cohorts"]):
            raise ValueError(
                f"run {label} ({run['folder']}) and its --against partner ({partner['folder']}) cover different "
                f"cohorts: {sorted(set(run['res']['cohorts']) ^ set(partner['res']['cohorts']))}"
            )


def control_scores(run: dict, cohort: str, control: str) -> tuple:
    """What identifies ``control`` in one cohort of a run: its per-fold test C-indices (and, for the best baseline,
    which model validation chose). Two runs with equal tuples scored the same control model."""
    c = run["res"]["cohorts"][cohort]
    name = c.get("best_baseline_by_validation") if control in (BEST, "best baseline") else control
    return name, tuple(c.get("models", {}).get(name, {}).get("test", {}).get("per_fold", ()))


def _recorded(scores: tuple) -> bool:
    """Whether :func:`control_scores` found the control: a model name and at least one finite per-fold C-index."""
    name, per_fold = scores
    return name is not None and any(v is not None and np.isfinite(v) for v in per_fold)


def subtract(a: dict, b: dict) -> dict:
    """:func:`cohort_differences` of one run minus its partner's: every difference both report, per cohort both
    cover, point and replicates alike (the replicates are the same patient draws in both runs, so they pair)."""
    return {
        key: {c: (a[key][c][0] - b[key][c][0], a[key][c][1] - b[key][c][1]) for c in a[key] if c in b[key]}
        for key in a
        if key in b
    }


def combine(
    runs: list[dict],
    labels: list[str],
    role: str,
    n_boot: int = 10000,
    seed: int = 0,
    against: list[dict] | None = None,
) -> dict:
    """Every pooled difference that all ``runs`` report over the same cohorts of ``role``: per run, mean over runs,
    SD, runs above 0, the two-level bootstrap interval of the mean, and the per-cohort means.

    ``against``: one partner run per run (the same seeds, another setting). Each run's differences are then its own
    minus its partner's, on the same test patients and bootstrap draws: for ``"arm - control"`` that is the arm with
    the run's setting minus the arm with the partner's, wherever the control is the same model in both (read back
    from one cache). Each run's interval is then its pooled replicates' (no run recorded one)."""
    per_run = [cohort_differences(r, role) for r in runs]
    if against is not None:
        per_run = [subtract(a, cohort_differences(b, role)) for a, b in zip(per_run, against)]
    keys = [k for k in per_run[0] if all(k in p for p in per_run)]
    differs: dict[str, list[str]] = {}  # against: where the control was not the same model in run and partner
    unchecked: dict[str, list[str]] = {}  # against: where run or partner recorded no test scores for the control
    for key in keys if against is not None else ():
        control = key.split(" - ", 1)[1]
        differs[key], unchecked[key] = [], []
        for run, partner, label, p in zip(runs, against, labels, per_run):
            for c in p[key]:
                ours, theirs = control_scores(run, c, control), control_scores(partner, c, control)
                if not _recorded(ours) or not _recorded(theirs):
                    unchecked[key].append(f"{label}: {c}")
                elif ours != theirs:
                    differs[key].append(f"{label}: {c}")
        if differs[key]:
            logger.warning(
                "%s (%s): the control differs between run and partner in %s, so that row is not the arm's change alone",
                key,
                role,
                ", ".join(differs[key]),
            )
        if unchecked[key]:
            logger.warning(
                "%s (%s): run or partner recorded no test C-indices for the control in %s, so whether it is the same "
                "model could not be checked",
                key,
                role,
                ", ".join(unchecked[key]),
            )
    rng = np.random.default_rng(seed)
    out = {}
    for key in keys:
        cohorts = list(per_run[0][key])
        if any(list(p[key]) != cohorts for p in per_run):
            logger.warning("%s: the runs cover different %s cohorts; left out", key, role)
            continue
        point = np.array([[p[key][c][0] for c in cohorts] for p in per_run])  # (runs, cohorts)
        reps = np.stack([np.stack([p[key][c][1] for c in cohorts]) for p in per_run])  # (runs, cohorts, boot)
        ok = ~np.isnan(reps).any(axis=(0, 1))
        pooled_reps = reps[:, :, ok].mean(axis=1)  # (runs, boot): each run's pooled replicate
        pooled = point.mean(axis=1)
        if against is None:
            recorded = [r["res"]["pooled"][role][key] for r in runs]  # each run's own pooled number and interval
        else:
            recorded = [
                {"difference": float(d), "ci95": [float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))]}
                for d, r in zip(pooled, pooled_reps)
            ]
        n_runs = pooled_reps.shape[0]
        two_level = two_level_replicates(pooled_reps, rng, n_boot)
        patients_only = pooled_reps.mean(axis=0)
        out[key] = {
            "cohorts": cohorts,
            "runs": {
                label: {"difference": rec["difference"], "ci95": rec["ci95"]} for label, rec in zip(labels, recorded)
            },
            "mean": float(pooled.mean()),
            "sd_between_runs": float(pooled.std(ddof=1)) if n_runs > 1 else 0.0,
            "runs_above_zero": int((pooled > 0).sum()),
            "ci95_runs_and_patients": [float(np.percentile(two_level, 2.5)), float(np.percentile(two_level, 97.5))],
            "ci95_patients_only": [float(np.percentile(patients_only, 2.5)), float(np.percentile(patients_only, 97.5))],
            "per_cohort_mean": {c: float(point[:, j].mean()) for j, c in enumerate(cohorts)},
            "n_bootstrap": int(n_boot),
        }
        if against is not None:
            out[key]["control_differs"] = differs[key]
            out[key]["control_unchecked"] = unchecked[key]
    return out


def _survival_cv():
    spec = importlib.util.spec_from_file_location("survival_cv", ROOT / "benchmarks" / "survival_cv.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cached_risks(run: dict, cohort: str, model: str, fold: int, *, neural: bool = True) -> np.ndarray:
    """``model``'s test risks in ``fold`` of ``cohort`` from the run's ``cache/``, after checking that the cached
    result is this run's (same cohort, fold, seeds and backbone), not one a later run wrote over it. ``neural``:
    a BioPerceiver arm, whose result depends on ``--init_seed`` (a classical baseline's does not). For an arm run
    with a ``--bp_lrs`` grid it reads the run at the rate validation kept in that fold (recorded in the run's JSON)."""
    res = run["res"]
    lrs = res["cohorts"].get(cohort, {}).get("models", {}).get(model, {}).get("lr")  # a --bp_lrs grid's pick
    name = f"{model}_lr{lrs[fold]:g}.json" if lrs else f"{model}.json"
    inner = Path(run["folder"]) / "cache" / cohort / f"fold{fold}" / f"{model}_innercv.json"
    if neural and res.get("bp_selection", {}).get("rule") == "inner_cv" and inner.is_file():
        name, lrs = inner.name, None  # --bp_selection inner_cv: one record per fold (the refit), its rate chosen inside
    path = Path(run["folder"]) / "cache" / cohort / f"fold{fold}" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: rerun survival_cv.py into {run['folder']} with its arguments")
    rec = json.loads(path.read_text())
    got = rec.get("settings", {})
    want = {"cohort": cohort, "fold": fold, "model": model, "seed": res["seed"], "folds": res["folds"]}
    if lrs:
        want["lr"] = lrs[fold]
    stale = [k for k, v in want.items() if got.get(k) != v]
    if neural and got.get("init_seed", res["seed"]) != res.get("init_seed", res["seed"]):
        stale.append("init_seed")
    rule = res.get("selection", {})  # --selection inner_cv reaches every model but the trained bp_* arms
    want_rule = {"inner_cv": rule["inner_folds"]} if rule.get("rule") == "inner_cv" else None
    if not model.startswith("bp_") and got.get("selection") != want_rule:
        stale.append("selection")
    backbone = (res.get("bp") or {}).get("pretrained_dir")
    if "pretrained_dir" in got and backbone and got["pretrained_dir"] != str((ROOT / backbone).resolve()):
        stale.append("pretrained_dir")
    if stale:
        raise ValueError(
            f"{path} holds another run's result ({', '.join(stale)} differ from {run['folder']}/survival_cv.json): "
            "rerun survival_cv.py into that folder with the arguments of its survival_cv.json"
        )
    return np.asarray(rec["risk_test"], float)


BEST = "best_baseline"  # --fuse_with's name for each cohort's best baseline (validation's pick)


def fold_ranks(risk: np.ndarray) -> np.ndarray:
    """Risks as ranks within one test fold, scaled to (0, 1] (ties share their average rank): a monotone map, so a
    model's C-index is unchanged, and two models' ranks can be averaged whatever the scale of their risks."""
    from scipy.stats import rankdata

    return rankdata(risk) / len(risk)


def ensemble(runs: list[dict], arm: str, control: str | None, n_boot: int, fuse: str | None = None) -> dict:
    """``arm`` (and ``control``) with each patient's test risk averaged over ``runs``: per cohort the test C-index
    and the paired differences against the best baseline and the averaged ``control``; pooled per role.

    ``fuse``: a baseline model, or ``BEST`` for each cohort's best baseline. Late fusion with it, a fixed rule
    with no weight chosen: in each test fold the ensemble's risks and ``fuse``'s are turned into ranks
    (``fold_ranks``) and averaged with equal weights, for ``arm`` and for ``control`` alike. This asks whether the
    arm adds to the classical model (fused − best baseline) and whether it adds more than ``control`` does (fused
    arm − fused control). The ranks use the fold's test patients as the reference set (their covariates, no label)."""
    from bioperceiver.data import read_manifest
    from bioperceiver.evaluation import concordance_index

    cv = _survival_cv()
    if fuse not in (None, BEST, *cv.BASELINES):
        raise ValueError(f"--fuse_with {fuse}: give {BEST} or a classical baseline ({', '.join(cv.BASELINES)})")
    res0 = runs[0]["res"]
    table = read_manifest(res0["manifest"]).table
    cohorts, scores = {}, {}
    for cohort, c0 in res0["cohorts"].items():
        if arm not in c0["models"] or "test" not in c0["models"][arm]:
            continue
        if any(cohort not in r["res"]["cohorts"] for r in runs[1:]):
            logger.info("%s: not in every run; left out of the ensemble", cohort)
            continue
        best = c0["best_baseline_by_validation"]
        rows = cv.cohort_rows(table, cohort)
        models = {f"{arm} (ensemble)": arm, "best baseline": best}
        if control:
            models[f"{control} (ensemble)"] = control
        partner = best if fuse == BEST else fuse
        if partner and "test" not in c0["models"].get(partner, {}):
            logger.info(
                "%s: no %s to fuse with (the cohort has no such baseline); left out of the ensemble", cohort, fuse
            )
            continue
        if partner and partner not in models.values():
            models[partner] = partner
        partner_key = next((n for n, m in models.items() if m == partner and n != f"{arm} (ensemble)"), None)
        label = "best baseline" if fuse == BEST else fuse
        fused = {f"{n} + {label}, ranks averaged": n for n in models if n.endswith("(ensemble)")} if fuse else {}
        folds = []
        for k, f in enumerate(c0["folds"]):
            ids = f["test_ids"]
            risks = {
                name: np.mean([cached_risks(r, cohort, m, k, neural=m not in cv.BASELINES) for r in runs], axis=0)
                for name, m in models.items()
            }
            for name, member in fused.items():
                risks[name] = (fold_ranks(risks[member]) + fold_ranks(risks[partner_key])) / 2
            folds.append(
                {
                    "time": rows.loc[ids, "label_survival_time"].to_numpy(float),
                    "event": rows.loc[ids, "label_survival_event"].to_numpy(int),
                    "patients": rows.loc[ids, "patient_id"].to_numpy(),
                    "risks": risks,
                }
            )
        scores[cohort] = {
            name: float(np.mean([concordance_index(f["time"], f["risks"][name], f["event"]) for f in folds]))
            for name in [*models, *fused]
        }
        scores[cohort]["best baseline is"] = best
        pairs = [(f"{arm} (ensemble)", o) for o in models if o not in (f"{arm} (ensemble)", fuse)]
        if fuse:
            first, *rest = fused
            pairs += [(first, "best baseline"), *((first, o) for o in rest)]
            if partner_key != "best baseline":
                pairs.append((first, partner_key))
        diffs = {}
        for a, b in pairs:
            data = [{**f, "risks": np.array([f["risks"][a], f["risks"][b]])} for f in folds]
            d = cv.paired_difference(data, n_boot, res0["seed"])
            diffs[f"{a} - {b}"] = {**d, "pair": [a, b]}
        cohorts[cohort] = {"role": c0["role"], "paired_differences": diffs}
    pooled = {role: cv.pooled_differences(cohorts, role) for role in ("development", "external")}
    per_cohort = {
        c: {k: {a: b for a, b in d.items() if a != "_replicates"} for k, d in r["paired_differences"].items()}
        for c, r in cohorts.items()
    }
    return {
        "arm": arm,
        "control": control,
        "fuse_with": fuse,
        "test_c_index": scores,
        "paired_differences": per_cohort,
        "pooled": pooled,
    }


def versus(runs: list[dict], labels: list[str], arm: str, n_boot: int, roles=("development", "external")) -> dict:
    """``arm`` of the first run minus ``arm`` of each other run on the same test patients: per cohort the mean over
    folds with a 95% paired patient-bootstrap interval (the runs' own draws), pooled per role over the cohorts where
    the two runs' risks differ. Cohorts where they are identical in every fold (a setting that does not apply
    there, so the result was read back from the other run's cache) are listed under ``same`` and left out of the
    pooled difference, which would otherwise be diluted by exact zeros.

    ``validation``: the same difference on the runs' *validation* parts (each fold's validation C-index as
    ``survival_cv.py`` recorded it, at the setting validation chose), mean over folds per cohort and over cohorts per
    role, with the folds where both runs score 1.0 counted (tiny validation parts saturate). A decision between two
    settings reads this, not the test folds."""
    from bioperceiver.data import read_manifest

    cv = _survival_cv()
    res0 = runs[0]["res"]
    table = read_manifest(res0["manifest"]).table
    out = {}
    for run, lab in zip(runs[1:], labels[1:]):
        a, b = f"{arm} ({labels[0]})", f"{arm} ({lab})"
        cohorts, same, val = {}, [], {}
        for cohort, c0 in res0["cohorts"].items():
            c1 = run["res"]["cohorts"].get(cohort, {})
            if "test" not in c0["models"].get(arm, {}) or "test" not in c1.get("models", {}).get(arm, {}):
                continue
            rows = cv.cohort_rows(table, cohort)
            folds = []
            for k, f in enumerate(c0["folds"]):
                ids = f["test_ids"]
                risks = np.array(
                    [cached_risks(r, cohort, arm, k, neural=arm not in cv.BASELINES) for r in (runs[0], run)]
                )
                folds.append(
                    {
                        "time": rows.loc[ids, "label_survival_time"].to_numpy(float),
                        "event": rows.loc[ids, "label_survival_event"].to_numpy(int),
                        "patients": rows.loc[ids, "patient_id"].to_numpy(),
                        "risks": risks,
                    }
                )
            if all(np.array_equal(f["risks"][0], f["risks"][1]) for f in folds):
                same.append(cohort)
                continue
            d = cv.paired_difference(folds, n_boot, res0["seed"])
            cohorts[cohort] = {"role": c0["role"], "paired_differences": {f"{a} - {b}": {**d, "pair": [a, b]}}}
            vals = [c["models"][arm].get("validation", {}).get("per_fold") for c in (c0, c1)]
            if all(v is not None for v in vals):
                v0, v1 = np.asarray(vals[0], float), np.asarray(vals[1], float)
                both = int(np.sum((v0 == 1.0) & (v1 == 1.0)))
                val[cohort] = {"difference": float(np.mean(v0 - v1)), "folds": len(v0), "both_saturated": both}
        validation = {}
        for role in roles:
            rows = [v for c, v in val.items() if cohorts[c]["role"] == role]
            if rows:
                validation[role] = {
                    "difference": float(np.mean([v["difference"] for v in rows])),
                    "cohorts": len(rows),
                    "folds": sum(v["folds"] for v in rows),
                    "both_saturated": sum(v["both_saturated"] for v in rows),
                }
        out[f"{a} - {b}"] = {
            "per_cohort": {
                c: {k: v for k, v in r["paired_differences"][f"{a} - {b}"].items() if k != "_replicates"}
                for c, r in cohorts.items()
            },
            "pooled": {role: cv.pooled_differences(cohorts, role).get(f"{a} - {b}") for role in roles},
            "same": same,
            "validation": {"per_cohort": val, "pooled": validation},
        }
    return out


def versus_lines(vs: dict) -> list[str]:
    lines = []
    for key, v in vs.items():
        lines += [f"### {key}: the same test patients, paired", "", "| cohort | difference | 95% CI |", "|---|---|---|"]
        for c, d in v["per_cohort"].items():
            lines.append(f"| {c} | {d['difference']:+.3f} | {_ci(d['ci95'])} |")
        for role, d in v["pooled"].items():
            if d:
                n = len(d["cohorts"])
                lines.append(
                    f"| pooled, {role} ({n}) | **{d['difference']:+.3f}** | {_ci(d['ci95'])} ({d['above_zero']} of "
                    f"{n} above 0) |"
                )
        for role, d in v.get("validation", {}).get("pooled", {}).items():
            lines.append(
                f"\nValidation parts, pooled {role} ({d['cohorts']} cohorts; each fold's recorded validation C-index, "
                f"what a choice between the two may read): {d['difference']:+.3f}; both at 1.0 in "
                f"{d['both_saturated']} of {d['folds']} folds."
            )
        if v["same"]:
            lines.append(f"\nIdentical risks in both runs (left out of the pooled row): {', '.join(v['same'])}.")
        lines.append("")
    return lines


def ensemble_lines(ens: dict, n_runs: int) -> list[str]:
    lines = [f"### {ens['arm']}: test risks averaged over the {n_runs} runs (ensemble)", ""]
    if not ens["test_c_index"]:
        return [*lines, f"No cohort has {ens['arm']} in every run.", ""]
    names = [n for n in next(iter(ens["test_c_index"].values())) if n != "best baseline is"]
    lines += ["| cohort | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for c, sc in ens["test_c_index"].items():
        lines.append(f"| {c} | " + " | ".join(f"{sc[n]:.3f}" for n in names) + " |")
    lines += ["", "| pooled | difference | 95% CI | cohorts > 0 |", "|---|---|---|---|"]
    for role, diffs in ens["pooled"].items():
        for key, d in diffs.items():
            n = len(d["cohorts"])
            lines.append(
                f"| {role} ({n}) | {key} | {d['difference']:+.3f} {_ci(d['ci95'])} | {d['above_zero']} of {n} |"
            )
    return [*lines, ""]


def _ci(ci) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def report_lines(result: dict) -> list[str]:
    labels = result["labels"]
    lines = []
    for role, diffs in result["roles"].items():
        if not diffs:
            continue
        paired = result.get("against")
        minus = (
            f", each run's minus its partner's ({paired['label']}; same seeds, same test patients)" if paired else ""
        )
        lines += [
            f"### {role} cohorts: pooled differences over {len(labels)} runs{minus}",
            "",
            "| difference | " + " | ".join(labels) + " | mean over runs [95% CI, runs and patients] | SD between runs "
            "| runs > 0 |",
            "|---|" + "---|" * len(labels) + "---|---|---|",
        ]
        for key, d in diffs.items():
            per = " | ".join(f"{d['runs'][lab]['difference']:+.3f} {_ci(d['runs'][lab]['ci95'])}" for lab in labels)
            if d.get("control_differs"):
                key = f"{key} (control differs in {len(d['control_differs'])} run-cohorts)"
            if d.get("control_unchecked"):
                key = f"{key} (control unchecked in {len(d['control_unchecked'])} run-cohorts)"
            lines.append(
                f"| {key} | {per} | **{d['mean']:+.3f}** {_ci(d['ci95_runs_and_patients'])} | "
                f"{d['sd_between_runs']:.3f} | {d['runs_above_zero']} of {len(labels)} |"
            )
        cohorts = list(next(iter(diffs.values()))["cohorts"])
        lines += ["", "Mean over runs per cohort:", "", "| difference | " + " | ".join(cohorts) + " |"]
        lines.append("|---|" + "---|" * len(cohorts))
        for key, d in diffs.items():
            vals = " | ".join(f"{d['per_cohort_mean'].get(c, float('nan')):+.3f}" for c in cohorts)
            lines.append(f"| {key} | {vals} |")
        lines.append("")
    return lines


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = [r for r, d in result["roles"].items() if d]
    if not roles:
        return
    labels = result["labels"]
    fig, axes = plt.subplots(
        1,
        len(roles),
        figsize=(9.5 * len(roles), 0.9 + 0.6 * max(len(result["roles"][r]) for r in roles)),
        squeeze=False,
    )
    for ax, role in zip(axes[0], roles):
        diffs = result["roles"][role]
        for y, d in enumerate(diffs.values()):
            for i, lab in enumerate(labels):
                r = d["runs"][lab]
                yy = y + 0.25 * (i + 1) / (len(labels) + 1) - 0.125
                ax.errorbar(
                    r["difference"],
                    yy,
                    xerr=[[r["difference"] - r["ci95"][0]], [r["ci95"][1] - r["difference"]]],
                    fmt="o",
                    ms=3,
                    color=f"C{i % 10}",
                    alpha=0.6,
                    label=lab if y == 0 else None,
                )
            lo, hi = d["ci95_runs_and_patients"]
            ax.errorbar(
                d["mean"],
                y + 0.3,
                xerr=[[d["mean"] - lo], [hi - d["mean"]]],
                fmt="D",
                color="k",
                capsize=3,
                label="mean over runs (runs and patients resampled)" if y == 0 else None,
            )
        ax.axvline(0, color="grey", lw=0.8, ls="--")
        ax.set_yticks(range(len(diffs)), [k.replace(" - ", "\n- ") for k in diffs], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("pooled C-index difference, 95% CI")
        paired = result.get("against")
        ax.set_title(
            f"{role} cohorts, {len(labels)} runs" + (f", each minus its {paired['label']} partner" if paired else "")
        )
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="survival_cv.py output folders")
    p.add_argument("--labels", nargs="+", default=None, help="one per run (default: the folder names)")
    p.add_argument("--roles", nargs="+", default=["development", "external"], choices=["development", "external"])
    p.add_argument("--n_bootstrap", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0, help="seed of the two-level bootstrap")
    p.add_argument(
        "--ensemble",
        nargs="+",
        metavar="ARM",
        default=None,
        help="ARM [CONTROL]: also score ARM's test risks averaged over the runs, against the best baseline and "
        "CONTROL averaged the same way",
    )
    p.add_argument(
        "--fuse_with",
        default=None,
        metavar="MODEL",
        help=f"with --ensemble: also average, per test fold, the ranks of each ensemble's risks with MODEL's (a "
        f"baseline, or {BEST} for each cohort's validation pick): does the arm add to the classical model?",
    )
    p.add_argument(
        "--versus",
        nargs="+",
        metavar="ARM",
        default=None,
        help="runs that differ in a setting rather than a seed: each ARM of the first run minus the same ARM of each "
        "other run, paired on the same test patients, per cohort and pooled",
    )
    p.add_argument(
        "--against",
        nargs="+",
        default=None,
        metavar="RUN",
        help="one partner run per --runs run, in the same order: the same seeds with another setting. Every pooled "
        "difference becomes the run's minus its partner's (paired on the same test patients), combined over the "
        "pairs with the two-level bootstrap",
    )
    p.add_argument("--against_label", default="against", help="a name for the partner runs' setting, for the report")
    p.add_argument("--output_dir", required=True)
    args = p.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.runs):
        p.error(f"--labels has {len(args.labels)} names for {len(args.runs)} --runs")
    if len(args.runs) < 2 and args.against is None:  # one run against its partner is one paired difference
        p.error("give at least two --runs")
    if args.ensemble is not None and len(args.ensemble) > 2:
        p.error("--ensemble takes an arm and at most one control arm")
    if args.fuse_with and not args.ensemble:
        p.error("--fuse_with fuses the --ensemble arms with a baseline: give --ensemble ARM [CONTROL] too")
    if args.versus and args.ensemble:
        p.error("--versus compares runs that differ in a setting; --ensemble averages seeds of one setting: pick one")
    if args.against is not None:
        if len(args.against) != len(args.runs):
            p.error(f"--against has {len(args.against)} runs for {len(args.runs)} --runs: give one partner per run")
        if args.versus or args.ensemble:
            p.error("--against pairs every run with a partner; combine it with neither --versus nor --ensemble")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    labels = args.labels or [Path(r).name for r in args.runs]
    runs = [load_run(r) for r in args.runs]
    against = [load_run(r) for r in args.against] if args.against else None
    partner_labels = [f"{lab} ({args.against_label})" for lab in labels]
    check_compatible(runs + (against or []), labels + (partner_labels if against else []))
    if against:
        check_partners(runs, against, labels)
    result = {
        "benchmark": "seed_spread",
        "runs": dict(zip(labels, args.runs)),
        "labels": labels,
        "argv": {lab: r["res"].get("argv") for lab, r in zip(labels, runs)},
        # runs that differ in a setting (--versus) are not seeds of one estimate: no mean or spread over them
        "roles": {}
        if args.versus
        else {role: combine(runs, labels, role, args.n_bootstrap, args.seed, against) for role in args.roles},
    }
    if against:
        result["against"] = {"label": args.against_label, "runs": dict(zip(labels, args.against))}
    lines = report_lines(result)
    if args.ensemble:
        n_boot = len(next(iter(runs[0]["replicates"].values()), np.zeros(1000)))  # the runs' own draws
        arm, control = args.ensemble[0], (args.ensemble[1:] or [None])[0]
        result["ensemble"] = ensemble(runs, arm, control, n_boot, args.fuse_with)
        lines += ensemble_lines(result["ensemble"], len(runs))
    if args.versus:
        n_boot = len(next(iter(runs[0]["replicates"].values()), np.zeros(1000)))
        result["versus"] = {}
        for arm in args.versus:
            result["versus"].update(versus(runs, labels, arm, n_boot, args.roles))
        lines += versus_lines(result["versus"])
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".seed_spread.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out / "seed_spread.json")
    (out / "seed_spread.md").write_text("\n".join(lines) + "\n")
    plot(result, out / "seed_spread.png")
    print("\n".join(lines), flush=True)
    logger.info("wrote %s", out / "seed_spread.json")
    return result


if __name__ == "__main__":
    main()
