"""Finetuning benchmarks on the demo cohort's real data: BioPerceiver (``finetune/run_finetune.py``) against
classical baselines on the same patients, splits and folds (issue #5, "Benchmarks on real data").

Sub-benchmarks (``--only``; all run in one go by default, results side by side in one JSON and one PNG):

* ``survival`` -- SurvSet breast-cancer cohorts GSE1992 + GSE4335 (239 patients, ``omics_expression`` +
  ``tabular_clinical``). Patient-level 5-fold CV stratified by cohort x event. In every fold the four training
  folds are split again (stratified, 80/20) into *train* and *validation*; every model is fitted on train,
  chooses its settings on validation and is scored once on the held-out fold (test). BioPerceiver: a small grid
  of finetuning settings (pretrained linear probe, pretrained full finetuning, random-init full finetuning, and
  for survival only pretrained full finetuning with ``--modality_dropout 0.3`` at lr 3e-4 / 15 epochs and at lr
  1e-4 / 30 epochs), each run through ``run_finetune.main`` with a manifest whose ``split`` column is the
  fold's; the setting with the best validation C-index is the fold's BioPerceiver result. Baseline: ridge-penalised Cox
  (``lifelines.CoxPHFitter``) on clinical covariates (+ cohort indicator) and principal components of the
  expression matrix (genes shared by both platforms, standardised per cohort, top-variance genes, PCA; every
  step fitted on the fold's training rows only); penalizer and number of components chosen on validation.
* ``findings`` -- PadChest findings (top-6 labels, multilabel) from ``text_report`` + ``tabular_study``, the
  library's patient-level hash split (the split pretraining used: test patients were never seen in
  pretraining). BioPerceiver (same three settings, chosen on validation macro-AUROC) vs. TF-IDF (word 1-2-grams)
  + one-hot/scaled study fields + one-vs-rest logistic regression (C chosen on validation). Test macro-AUROC
  with 95% patient-bootstrap CIs (``bioperceiver.evaluation.metrics_with_ci``) and a paired bootstrap of the
  difference (same resampled patients for both models).
* ``label_efficiency`` -- the findings task with 1%, 10%, 100% of the training patients (``--label_fraction``,
  patients drawn by ``bioperceiver.training.finetune_loop.subsample_patients`` with the run's seed), pretrained vs.
  random-init backbone (both full finetuning with the same settings), several seeds; TF-IDF + LR on the same patients as
  a reference. Small fractions get more epochs so that every run takes at least ``--min_steps`` optimiser steps.
* ``fusion`` -- on the survival folds: early fusion (Cox on concatenated clinical + expression features, i.e.
  the Cox baseline), late fusion (mean of the log-hazards of unimodal models: Cox per modality; BioPerceiver
  trained with ``--modalities`` of one modality, with the setting the fold selected), and BioPerceiver's
  intermediate fusion (both modalities' tokens through the shared latents: the survival benchmark's model).

Run (the numbers in benchmarks/RESULTS.md)::

    .venv/bin/python benchmarks/finetune_tasks.py                 # everything, ~30 min on a 2-core CPU
    .venv/bin/python benchmarks/finetune_tasks.py --quick         # smoke run (1 fold, 2 epochs, 1 seed)
    .venv/bin/python benchmarks/finetune_tasks.py --only findings label_efficiency
    # rerun survival + fusion only: reuse runs whose argv is unchanged, keep the other parts of the JSON
    .venv/bin/python benchmarks/finetune_tasks.py --only survival fusion --reuse_runs OLD.json --merge

The pretrained backbone is ``--pretrained_dir`` (default ``outputs/bench_finetune/pretrain/final``); when it is
missing it is made first with ``pretrain/run_pretrain.py --config pretrain/configs/demo.yaml`` (150 steps,
~5-10 min on this CPU), on the demo cohort built under ``--work_dir``. Pretraining is self-supervised on the
cohort's *train* split of the hash split: for the survival CV that means most test-fold patients' (unlabelled)
expression and clinical values were seen in pretraining (counted per fold in the JSON); labels never were.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]

SURV_MODALITIES = ["omics_expression", "tabular_clinical"]
FIND_MODALITIES = ["text_report", "tabular_study"]
SETTINGS = "tokenizers/demo_processors.yaml"

# BioPerceiver finetuning settings tried (selected on validation, never on test). lr / epochs follow the shipped
# argument files: linear probe as demo_findings.yaml, full finetuning as demo_survival.yaml.
BP_CONFIGS = {
    "pretrained_linear_probe": {"pretrained": True, "mode": "linear_probe", "lr": 3e-3, "epochs": 30},
    "pretrained_full": {"pretrained": True, "mode": "full", "lr": 3e-4, "epochs": 15},
    "random_full": {"pretrained": False, "mode": "full", "lr": 3e-4, "epochs": 15},
    # modality dropout during finetuning (``--modality_dropout``: each present modality of a training sample is
    # hidden with probability p, never all of them), against the intermediate-fusion model ignoring the clinical
    # covariates; the second also with a smaller learning rate and more epochs
    "pretrained_full_mdrop": {"pretrained": True, "mode": "full", "lr": 3e-4, "epochs": 15, "modality_dropout": 0.3},
    "pretrained_full_mdrop_slow": {
        "pretrained": True,
        "mode": "full",
        "lr": 1e-4,
        "epochs": 30,
        "modality_dropout": 0.3,
    },
}
# candidate settings per sub-benchmark (the modality-dropout variants were added for survival only; findings keeps
# the three settings its published numbers were chosen among)
SURV_BP_CONFIGS = list(BP_CONFIGS)
FIND_BP_CONFIGS = ["pretrained_linear_probe", "pretrained_full", "random_full"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# data and backbone
# ---------------------------------------------------------------------------------------------------------------
def ensure_cohort(work: Path) -> Path:
    manifest = work / "cohort" / "manifest.parquet"
    if not manifest.exists():
        from bioperceiver.data.recipes.demo import build_demo_cohort

        build_demo_cohort(manifest.parent, seed=0)
    return manifest


def ensure_backbone(args, manifest: Path) -> tuple[Path, list[str]]:
    final = Path(args.pretrained_dir)
    cmd = [
        sys.executable,
        "pretrain/run_pretrain.py",
        "--config",
        "pretrain/configs/demo.yaml",
        f"output_dir={final.parent}",
        f"data.manifest={manifest}",
        f"data.processor_dir={final.parent / 'processors'}",
        "logging.report_to=none",
    ]
    if not (final / "config.json").exists():
        log(f"pretrained backbone missing: {' '.join(cmd)}")
        subprocess.run(cmd, cwd=ROOT, check=True)
    return final, cmd


def write_split_manifest(manifest, rows: pd.DataFrame, split: pd.Series, columns: list[str], path: Path) -> Path:
    """A copy of ``rows`` (ids, the used modality and label columns) with ``split`` set; in the cohort folder so
    relative references (omics matrices) resolve; sidecar metadata copied."""
    from bioperceiver.data.manifest import write_manifest

    # every modality column stays (empty where unused): run_finetune fits random-init processors from a settings
    # file that names all of the demo cohort's modalities and rejects a manifest without those columns
    keep = [
        "sample_id",
        "patient_id",
        *manifest.modalities,
        *[c for c in columns if c not in manifest.modalities],
        "meta_source",
    ]
    table = rows[keep].copy()
    table["split"] = split.to_numpy()
    meta = {k: v for k, v in manifest.metadata.items() if k in ("modalities", "labels", "label_notes")}
    return write_manifest(table.reset_index(drop=True), path, metadata=meta)


# ---------------------------------------------------------------------------------------------------------------
# BioPerceiver through run_finetune.main
# ---------------------------------------------------------------------------------------------------------------
class _NoCard:
    def save(self, path) -> None:
        pass


class BPRunner:
    def __init__(self, args, backbone: Path):
        import importlib.util

        from bioperceiver.training import finetune_loop

        # the script as a module, loaded from its file (not put on sys.path): its parse_args/main are the user's path
        spec = importlib.util.spec_from_file_location("run_finetune_script", ROOT / "finetune" / "run_finetune.py")
        run_finetune = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(run_finetune)

        self.rf = run_finetune
        card = finetune_loop.finetuning_card

        def tolerant_card(*a, **kw):
            # the model card is not measured here; its template is read from disk at every run, so a template edited
            # while this process runs can disagree with the card code it imported: skip the card then, keep the run
            try:
                return card(*a, **kw)
            except Exception as exc:
                log(f"  (model card not written: {exc})")
                return _NoCard()

        finetune_loop.finetuning_card = tolerant_card
        self.args = args
        self.backbone = backbone
        self.runs: list[dict] = []
        self.reuse: dict[str, dict] = {}
        if getattr(args, "reuse_runs", None):
            prev = json.loads(Path(args.reuse_runs).read_text()).get("bioperceiver_runs", [])
            self.reuse = {r["tag"]: r for r in prev}

    def _reusable(self, tag: str, argv: list[str], out: Path, primary: str) -> dict | None:
        """A run recorded in ``--reuse_runs`` with the identical argument list whose run folder still holds its
        predictions and results, with the recorded validation and test metrics. A rerun with the same code gives the
        same numbers (in a fresh process or after other work; tested); a code change that only reorders float sums
        can move a fold's result after 15 epochs at lr 3e-3 (RESULTS.md, "One penalty per modality": 0.575 -> 0.754
        on one fold), so reading a recorded run back keeps a table made across commits reproducible."""
        old = self.reuse.get(tag)
        if old is None:
            return None
        if old.get("argv") != argv:
            before, now = old.get("argv") or [], argv
            changed = [f"{a!r} -> {b!r}" for a, b in zip(before, now) if a != b][:3]
            if len(before) != len(now):
                changed.append(f"{len(before)} -> {len(now)} arguments")
            log(f"  {tag}: recorded run not reused, its arguments differ ({'; '.join(changed)})")
            return None
        if "--modality_dropout" in argv and not old.get("eval_without_modality_dropout"):
            # recorded before run_finetune evaluated without modality dropout (commit b04023b): its per-epoch
            # validation, which chose the best checkpoint, had modalities randomly hidden; the argv is the same
            return None
        from bioperceiver.evaluation.report import predictions_path

        try:
            res = json.loads((out / "all_results.json").read_text())
            pred = pd.read_csv(predictions_path(out), dtype={"sample_id": str, "patient_id": str})
        except (OSError, ValueError) as exc:
            log(f"  {tag}: recorded run not reused, its run folder {out} lacks results or predictions ({exc})")
            return None
        got = (res.get("validation", {}).get(primary), res.get("test", {}).get(primary))
        if got != (old["validation"], old["test"]):
            log(f"  {tag}: recorded run not reused, {out} holds other results than recorded ({got})")
            return None
        return {**old, "reused": True, "pred": pred}

    def run(
        self,
        tag: str,
        manifest: Path,
        task_args: list[str],
        cfg: dict,
        *,
        seed: int = 0,
        label_fraction: float = 1.0,
        epochs: int | None = None,
        modalities=None,
        extra=(),
    ) -> dict:
        out = Path(self.args.work_dir) / "runs" / tag
        survival = "survival" in task_args
        primary = "c_index" if survival else "auroc"
        epochs = epochs or (2 if self.args.quick else cfg["epochs"])
        argv = [
            "--manifest",
            str(manifest),
            *task_args,
            "--model_name_or_path",
            str(self.backbone) if cfg["pretrained"] else "none",
            "--finetuning_mode",
            cfg["mode"],
            "--processor_settings",
            SETTINGS,
            "--output_dir",
            str(out),
            "--do_train",
            "true",
            "--num_train_epochs",
            str(epochs),
            "--learning_rate",
            str(cfg["lr"]),
            "--weight_decay",
            "0.01",
            "--per_device_train_batch_size",
            "32",
            "--per_device_eval_batch_size",
            "64",
            "--eval_strategy",
            "epoch",
            "--save_strategy",
            "epoch",
            "--save_total_limit",
            "1",
            "--load_best_model_at_end",
            "false" if cfg.get("keep_last") else "true",  # keep_last: the last epoch, no checkpoint selection
            "--metric_for_best_model",
            primary,
            "--greater_is_better",
            "true",
            "--logging_steps",
            "50",
            "--seed",
            str(seed),
            "--label_fraction",
            str(label_fraction),
            "--n_bootstrap",
            "100",
            "--ablations",
            "false",
            "--use_cpu",
            "true",
            "--report_to",
            "none",
            "--disable_tqdm",
            "true",
        ]
        if survival:
            argv += ["--warmup_steps", "0.1", "--lr_scheduler_type", "cosine"]
        if cfg.get("modality_dropout"):
            argv += ["--modality_dropout", str(cfg["modality_dropout"])]
        if cfg.get("best_model_ties", "first") != "first":  # which of tied best epochs is kept (default: the first)
            argv += ["--best_model_ties", cfg["best_model_ties"]]
        argv += list(extra)  # later flags win
        if modalities:
            argv += ["--modalities", *modalities]
        fields = getattr(self.rf.DataArguments, "__dataclass_fields__", {})
        for name in ("uncertainty", "interpret"):  # optional reports (calibration, MC-dropout, explanations): costly
            if name in fields:
                argv += [f"--{name}", "false"]
        old = self._reusable(tag, argv, out, primary)
        if old is not None:
            self.runs.append({k: v for k, v in old.items() if k != "pred"})
            log(f"  {tag}: reused (same argv): validation {primary} {old['validation']:.4f}, test {old['test']:.4f}")
            return old
        shutil.rmtree(out, ignore_errors=True)  # a leftover checkpoint would be resumed
        t0 = time.perf_counter()
        res = self.rf.main(argv)
        wall = time.perf_counter() - t0
        from bioperceiver.evaluation.report import predictions_path

        pred = pd.read_csv(predictions_path(out), dtype={"sample_id": str, "patient_id": str})
        rec = {
            "tag": tag,
            "config": cfg,
            "seed": seed,
            "label_fraction": label_fraction,
            "epochs": epochs,
            "modalities": modalities,
            "validation": res.get("validation", {}).get(primary, float("nan")),
            "test": res.get("test", {}).get(primary, float("nan")),
            "split_sizes": res.get("split_sizes"),
            "linear_term": res.get("linear_term"),  # a wide & deep run's pre-fit (penalty, the term alone's scores)
            "train_runtime_s": res.get("train", {}).get("train_runtime"),
            "best_checkpoint": res.get("train", {}).get("best_checkpoint"),  # which epoch was kept, and its ties
            "wall_s": round(wall, 1),
            "argv": argv,
            # run_finetune evaluates (checkpoint choice, validation, test) without modality dropout since b04023b
            "eval_without_modality_dropout": True,
        }
        self.runs.append(rec)
        log(f"  {tag}: validation {primary} {rec['validation']:.4f}, test {rec['test']:.4f} ({wall:.0f} s)")
        for p in list(out.iterdir()):  # keep the reports, drop weights and checkpoints
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.suffix in (".safetensors", ".bin"):
                p.unlink()
        return {**rec, "pred": pred}


# ---------------------------------------------------------------------------------------------------------------
# classical features
# ---------------------------------------------------------------------------------------------------------------
def parse_json_col(values) -> pd.DataFrame:
    return pd.DataFrame([json.loads(v) if isinstance(v, str) else (v or {}) for v in values])


class TabularEncoder:
    """Numeric columns (anything that parses as a number): train-median imputation + missing indicator +
    standardisation; other columns: one-hot (train categories). Fitted on training rows only."""

    def fit(self, df: pd.DataFrame):
        self.num, self.cat = {}, {}
        for c in df.columns:
            num = pd.to_numeric(df[c].map(lambda v: np.nan if v is None else v), errors="coerce")
            present = df[c].notna() & (df[c].astype(str) != "")
            if present.any() and num[present].notna().all():
                med = float(num.median()) if num.notna().any() else 0.0
                filled = num.fillna(med)
                self.num[c] = (med, float(filled.mean()), float(filled.std() or 1.0), bool(num.isna().any()))
            else:
                self.cat[c] = sorted({str(v) for v in df[c].dropna()})
        return self

    def transform(self, df: pd.DataFrame) -> pd.DataFrame:
        out = {}
        for c, (med, mu, sd, ind) in self.num.items():
            col = df[c] if c in df else pd.Series([np.nan] * len(df), index=df.index)
            num = pd.to_numeric(col.map(lambda v: np.nan if v is None else v), errors="coerce")
            out[c] = ((num.fillna(med) - mu) / sd).to_numpy()
            if ind:
                out[f"{c}__missing"] = num.isna().astype(float).to_numpy()
        for c, cats in self.cat.items():
            col = df[c].astype(str) if c in df else pd.Series([""] * len(df), index=df.index)
            for v in cats:
                out[f"{c}={v}"] = (col == v).astype(float).to_numpy()
        return pd.DataFrame(out, index=df.index)


class SurvivalFeatures:
    """Clinical covariates + cohort indicator, and PCA of expression. Fitted on the training rows only: per-cohort
    gene standardisation, top-variance genes, PCA, scaling of the components -- or, for the expression steps (which
    use no labels), on ``pca_idx`` when given (e.g. every patient but the test ones, labelled or not, as a backbone
    pretrained on the unlabelled profiles sees them); the clinical encoder always on the training rows."""

    def __init__(self, cohort_dir: Path, rows: pd.DataFrame, n_genes: int = 1000):
        self.rows = rows
        self.n_genes = n_genes
        from bioperceiver.data.manifest import parse_reference

        mats = {}
        for src, sub in rows.groupby("meta_source"):
            refs = [parse_reference(v, cohort_dir) for v in sub["omics_expression"]]
            mat = pd.read_parquet(refs[0].path)
            mat.index = mat.index.astype(str)
            mats[src] = mat.loc[[r.options["row"] for r in refs]]
            mats[src].index = sub.index
        genes = sorted(set.intersection(*(set(m.columns) for m in mats.values())))
        self.expr = pd.concat([m[genes] for m in mats.values()]).loc[rows.index].astype(float)
        self.clin = parse_json_col(rows["tabular_clinical"].tolist()).set_index(rows.index)
        self.clin["cohort_gse4335"] = (rows["meta_source"] == "survset_gse4335").astype(float)
        self.n_shared_genes = len(genes)

    def fit(self, train_idx, pca_idx=None):
        from sklearn.decomposition import PCA

        self.tab = TabularEncoder().fit(self.clin.loc[train_idx])
        train_idx = list(train_idx if pca_idx is None else pca_idx)  # the rows of the expression steps
        tr = self.expr.loc[train_idx]
        src = self.rows.loc[train_idx, "meta_source"]
        self.gene_stats = {}
        var = []
        for s in src.unique():
            x = tr[(src == s).to_numpy()]
            self.gene_stats[s] = (x.mean(), x.std().replace(0, 1.0).fillna(1.0))
            var.append(x.var())
        top = pd.concat(var, axis=1).mean(axis=1).sort_values(ascending=False).index[: self.n_genes]
        self.genes = list(top)
        z = self._z(train_idx)
        self.pca = PCA(n_components=min(30, len(train_idx) - 1, z.shape[1]), random_state=0).fit(z)  # small panels
        pcs = self.pca.transform(z)
        self.pc_mu, self.pc_sd = pcs.mean(0), pcs.std(0) + 1e-12
        return self

    def _z(self, idx) -> np.ndarray:
        x = self.expr.loc[idx].copy()
        src = self.rows.loc[idx, "meta_source"]
        for s, (mu, sd) in self.gene_stats.items():
            m = (src == s).to_numpy()
            x.loc[m] = (x.loc[m] - mu) / sd
        return x[self.genes].to_numpy()

    def transform(self, idx, n_pcs: int, clinical: bool = True) -> pd.DataFrame:
        parts = []
        if clinical:
            parts.append(self.tab.transform(self.clin.loc[idx]))
        if n_pcs:
            pcs = (self.pca.transform(self._z(idx))[:, :n_pcs] - self.pc_mu[:n_pcs]) / self.pc_sd[:n_pcs]
            parts.append(pd.DataFrame(pcs, index=idx, columns=[f"pc{i}" for i in range(n_pcs)]))
        return pd.concat(parts, axis=1)


def cox_select(feats: SurvivalFeatures, rows, tr, va, te, *, pcs_grid, pen_grid, clinical=True, ties="first") -> dict:
    """Fit a ridge Cox model on ``tr`` for each (components, penalizer), choose by validation C-index, score test.

    Grid points tied on the best validation C-index (common on a handful of validation patients) are broken by
    ``ties``: ``"first"`` keeps the first in grid order (fewest components, weakest penalty), ``"loss"`` the one
    with the highest validation partial log-likelihood (lifelines' ``score``; the counterpart of ``run_finetune
    --best_model_ties loss``). ``best["tied"]`` counts the grid points tied at the best C-index."""
    if ties not in ("first", "loss"):
        raise ValueError(f"ties must be 'first' or 'loss', got {ties!r}")
    from lifelines import CoxPHFitter

    from bioperceiver.evaluation import concordance_index
    from bioperceiver.training.tasks import tied as same_metric

    t, e = rows["label_survival_time"].astype(float), rows["label_survival_event"].astype(int)
    grid = []
    for n_pcs in pcs_grid:
        if not clinical and not n_pcs:
            continue
        xtr, xva, xte = (feats.transform(i, n_pcs, clinical) for i in (tr, va, te))
        keep = xtr.columns[xtr.std() > 0]
        xtr, xva, xte = xtr[keep], xva[keep], xte[keep]
        for pen in pen_grid:
            df = xtr.assign(T=t.loc[tr].to_numpy(), E=e.loc[tr].to_numpy())
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    cph = CoxPHFitter(penalizer=pen, l1_ratio=0.0).fit(df, "T", "E")
            except Exception as exc:  # lifelines ConvergenceError on a grid point: record and skip
                grid.append({"n_pcs": n_pcs, "penalizer": pen, "error": type(exc).__name__})
                continue
            rv, rt = (cph.predict_log_partial_hazard(x).to_numpy() for x in (xva, xte))
            dva = xva.assign(T=t.loc[va].to_numpy(), E=e.loc[va].to_numpy())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loglik = float(cph.score(dva, scoring_method="log_likelihood"))
            grid.append(
                {
                    "n_pcs": n_pcs,
                    "penalizer": pen,
                    "n_features": xtr.shape[1],
                    "validation": concordance_index(t.loc[va], rv, e.loc[va]),
                    "validation_loglik": loglik if np.isfinite(loglik) else None,  # JSON-safe; never chosen
                    "test": concordance_index(t.loc[te], rt, e.loc[te]),
                    "risk_test": rt,
                }
            )
    ok = [g for g in grid if "validation" in g]
    score = [g["validation"] if np.isfinite(g["validation"]) else -np.inf for g in ok]  # NaN never wins
    tied = [g for g, v in zip(ok, score, strict=True) if same_metric(v, max(score))]  # the Trainer's tie test
    best = tied[0]
    if ties == "loss":  # max keeps the first of equal likelihoods; an undefined one never wins
        best = max(tied, key=lambda g: -np.inf if g["validation_loglik"] is None else g["validation_loglik"])
    best = {**best, "tied": len(tied)}
    return {
        "best": {k: v for k, v in best.items() if k != "risk_test"},
        "risk_test": best["risk_test"],
        "grid": [{k: v for k, v in g.items() if k != "risk_test"} for g in grid],
    }


def breslow_log_likelihood(eta, time, event) -> float:
    """Cox log partial likelihood of linear predictors ``eta`` (Breslow's handling of tied times): the sum over
    events ``i`` of ``eta_i - log sum_{j: t_j >= t_i} exp(eta_j)``. Invariant to a constant shift of ``eta``. The
    library's survival loss (:func:`bioperceiver.losses.survival.cox_ph_loss`, ``reduction="sum"``) in float64."""
    import torch

    from bioperceiver.losses.survival import cox_ph_loss

    as64 = (torch.as_tensor(np.asarray(a, float), dtype=torch.float64) for a in (eta, time, event))
    return -float(cox_ph_loss(*as64, ties="breslow", reduction="sum"))


def _efron_terms(x: np.ndarray, time: np.ndarray, event: np.ndarray, beta: np.ndarray):
    """Efron log partial likelihood of ``x @ beta``, its gradient and Hessian (lifelines' ``CoxPHFitter`` model)."""
    order = np.argsort(-time, kind="stable")
    x, t, e = x[order], time[order], event[order].astype(bool)
    eta = x @ beta
    w = np.exp(eta - eta.max())  # a constant factor cancels in every ratio below; the log term adds it back
    wx = w[:, None] * x
    s0, s1 = np.cumsum(w), np.cumsum(wx, axis=0)
    s2 = np.cumsum(wx[:, :, None] * x[:, None, :], axis=0)
    last = np.searchsorted(-t, -t, side="right") - 1  # each row's risk set: every row up to its last tie
    ev = np.flatnonzero(e)
    if not len(ev):
        return 0.0, np.zeros(x.shape[1]), np.zeros((x.shape[1], x.shape[1]))
    # tied events share a time: per event its group's sums over the tied events and its rank l among them
    group = last[ev]
    starts = np.r_[0, np.flatnonzero(np.diff(group)) + 1]
    d = np.diff(np.r_[starts, len(ev)])
    gid = np.repeat(np.arange(len(starts)), d)
    frac = (np.arange(len(ev)) - starts[gid]) / d[gid]
    t0, t1 = np.add.reduceat(w[ev], starts), np.add.reduceat(wx[ev], starts, axis=0)
    t2 = np.add.reduceat(wx[ev][:, :, None] * x[ev][:, None, :], starts, axis=0)
    a0 = s0[group] - frac * t0[gid]
    a1 = s1[group] - frac[:, None] * t1[gid]
    a2 = s2[group] - frac[:, None, None] * t2[gid]
    ll = float(eta[ev].sum() - np.sum(np.log(a0) + eta.max()))
    grad = x[ev].sum(0) - (a1 / a0[:, None]).sum(0)
    m = a1 / a0[:, None]
    hess = -((a2 / a0[:, None, None]).sum(0) - m.T @ m)
    return ll, grad, hess


def ridge_cox_coefficients(x, time, event, penalizer: float, *, tol: float = 1e-10, max_steps: int = 100) -> np.ndarray:
    """The coefficients ``lifelines.CoxPHFitter(penalizer=p, l1_ratio=0).fit`` finds, by the same model without its
    per-fit overhead (~50 ms there, ~1 ms here; the inner cross-validation fits thousands): the Efron log partial
    likelihood of the standardised columns (``std`` with ``ddof=1``) minus ``n * p / 2`` times the squared norm of
    their coefficients, maximised by Newton steps halved until the objective rises; returned on the original
    columns' scale. ``x`` must have no constant column (lifelines would divide by 0 too)."""
    x = np.asarray(x, float)
    time, event = np.asarray(time, float), np.asarray(event, int)
    n, p = x.shape
    if not (np.ptp(x, axis=0) > 0).all():  # exactly equal values (a float std may come out ~1e-17 for them)
        raise ValueError("a constant column has no coefficient: drop it first")
    mu, sd = x.mean(0), x.std(0, ddof=1)
    z = (x - mu) / sd
    lam = n * penalizer

    def objective(beta):
        ll, g, h = _efron_terms(z, time, event, beta)
        return ll - 0.5 * lam * beta @ beta, g - lam * beta, h - lam * np.eye(p)

    beta = np.zeros(p)
    obj, g, h = objective(beta)
    for _ in range(max_steps):
        step = np.linalg.solve(-h, g)
        scale = 1.0
        while True:
            new = beta + scale * step
            new_obj, new_g, new_h = objective(new)
            if new_obj >= obj - 1e-12:
                break
            if scale < 1e-8:  # no step improves the objective: at the optimum to numerical precision
                return beta / sd
            scale /= 2
        if not np.isfinite(new_obj):
            raise FloatingPointError("the ridge Cox fit diverged")
        done = np.max(np.abs(new - beta)) < tol or abs(new_obj - obj) <= tol * max(1.0, abs(obj))
        beta, obj, g, h = new, new_obj, new_g, new_h
        if done:
            return beta / sd
    raise FloatingPointError(f"the ridge Cox fit did not converge in {max_steps} Newton steps")


def patient_events(patients: pd.Series, events: pd.Series) -> tuple[pd.DataFrame, pd.Series]:
    """Each row's patient and event (indexed by row), and each patient's event: 1 when any of its rows has one
    (indexed by patient id, sorted)."""
    per = pd.DataFrame({"patient": patients.astype(str), "event": events.astype(int)})
    return per, per.groupby("patient", sort=True)["event"].max()


def patient_splits(pat: pd.Series, n_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_folds`` folds of ``pat``'s patients (:func:`patient_events`) stratified by event: per fold the ids of the
    other patients and of the held-out ones."""
    from sklearn.model_selection import StratifiedKFold

    ids = pat.index.to_numpy()
    skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return [(ids[rest], ids[held]) for rest, held in skf.split(ids, pat.to_numpy())]


def inner_folds(rows, pool, n_folds: int, seed: int) -> list[np.ndarray]:
    """``pool``'s rows split into patient-level folds stratified by event (a patient counts as an event when any
    of its rows has one): the held-out rows of each inner fold. Fewer folds than ``n_folds`` when the pool has fewer
    patients with (or without) an event, never fewer than 2."""
    pool = list(pool)
    per, pat = patient_events(rows.loc[pool, "patient_id"], rows.loc[pool, "label_survival_event"])
    k = min(n_folds, int(pat.sum()), int((1 - pat).sum()))
    if k < 2:
        raise ValueError(
            f"inner cross-validation needs at least 2 patients with and 2 without an event among the {len(pat)} "
            f"labelled patients ({int(pat.sum())} with an event); label more patients or select on a validation part"
        )
    return [per.index[per["patient"].isin(held)].to_numpy() for _, held in patient_splits(pat, k, seed)]


def cox_select_cv(
    feats: SurvivalFeatures, rows, pool, te, *, pcs_grid, pen_grid, clinical=True, n_folds: int = 5, seed: int = 0
) -> dict:
    """Ridge Cox settings chosen by inner cross-validation on every labelled patient (``pool``), then refitted on
    all of them and scored once on ``te``.

    For each (components, penalizer) the score is the cross-validated partial log-likelihood of Verweij & van
    Houwelingen (1993), what ``glmnet``'s ``cv.glmnet(family="cox")`` uses: summed over inner folds, the pool's log
    partial likelihood (Breslow, :func:`breslow_log_likelihood`) at the coefficients fitted without the fold minus
    the fitted part's own. It stays defined on
    folds of a few patients, where a per-fold C-index does not. The highest wins (ties: first in grid order);
    ``best["validation"]`` is the C-index of the chosen setting's pooled out-of-fold risks (comparable across model
    classes: what picks a cohort's best baseline), ``best["validation_cvpl"]`` its score. ``feats`` must be fitted
    without test rows (its steps read no labels). The fits are lifelines' ridge Cox model
    (:func:`ridge_cox_coefficients`, equal to ``CoxPHFitter`` within its convergence tolerance)."""
    from bioperceiver.evaluation import concordance_index

    pool, te = list(pool), list(te)
    t, e = rows["label_survival_time"].astype(float), rows["label_survival_event"].astype(int)
    held = inner_folds(rows, pool, n_folds, seed)
    masks = [~np.isin(pool, out) for out in held]  # per inner fold, the pool rows it is fitted on

    def fit(x: pd.DataFrame, idx, pen):  # lifelines' model (ridge_cox_coefficients), without its overhead
        # a column constant on these rows carries no coefficient; equal values, not a std of 0 (floats can give
        # ~1e-17 there, and the fit would then put an arbitrary coefficient on it)
        keep = x.columns[x.nunique() > 1]
        coef = ridge_cox_coefficients(x[keep].to_numpy(), t.loc[idx].to_numpy(), e.loc[idx].to_numpy(), pen)
        return pd.Series(coef, index=keep), x[keep].mean()

    def risk(fitted, x: pd.DataFrame) -> np.ndarray:
        # centred on the fitted rows' mean, as lifelines' predict_log_partial_hazard: pooled out-of-fold risks
        # then compare each patient with the rows their model was fitted on
        coef, mean = fitted
        return (x[coef.index] - mean).to_numpy() @ coef.to_numpy()

    tp, ep = t.loc[pool].to_numpy(), e.loc[pool].to_numpy()
    grid = []
    for n_pcs in pcs_grid:
        if not clinical and not n_pcs:
            continue
        xp = feats.transform(pool, n_pcs, clinical)  # no test row is read until the pick is made
        for pen in pen_grid:
            cvpl, oof = 0.0, np.zeros(len(pool))
            try:
                for inside in masks:
                    fit_idx = xp.index[inside]
                    eta = risk(fit(xp.loc[fit_idx], fit_idx, pen), xp)
                    cvpl += breslow_log_likelihood(eta, tp, ep) - breslow_log_likelihood(
                        eta[inside], tp[inside], ep[inside]
                    )
                    oof[~inside] = eta[~inside]
            except (FloatingPointError, np.linalg.LinAlgError) as exc:  # a grid point that cannot be fitted
                grid.append({"n_pcs": n_pcs, "penalizer": pen, "error": type(exc).__name__})
                continue
            grid.append(
                {
                    "n_pcs": n_pcs,
                    "penalizer": pen,
                    "n_features": int((xp.nunique() > 1).sum()),  # as cox_select counts them: varying columns
                    "validation_cvpl": cvpl if np.isfinite(cvpl) else None,
                    "validation": concordance_index(tp, oof, ep),
                }
            )
    ok = [g for g in grid if g.get("validation_cvpl") is not None]
    if not ok:
        raise ValueError(f"no grid point could be fitted in every inner fold: {grid}")
    best = max(ok, key=lambda g: g["validation_cvpl"])  # max keeps the first of equal scores
    xp, xte = feats.transform(pool, best["n_pcs"], clinical), feats.transform(te, best["n_pcs"], clinical)
    rt = risk(fit(xp, pool, best["penalizer"]), xte)
    best = {
        **best,
        "test": concordance_index(t.loc[te], rt, e.loc[te]),
        "tied": sum(g["validation_cvpl"] == best["validation_cvpl"] for g in ok),
    }
    return {"best": best, "risk_test": rt, "grid": grid, "inner_folds": len(held)}


# ---------------------------------------------------------------------------------------------------------------
# 1 + 4: survival CV and fusion
# ---------------------------------------------------------------------------------------------------------------
def survival_benchmark(args, manifest, runner: BPRunner | None, pretrain_patients: set, do_fusion: bool) -> dict:
    from scipy.stats import spearmanr
    from sklearn.model_selection import StratifiedKFold, train_test_split

    from bioperceiver.evaluation import concordance_index

    table = manifest.table
    rows = table[table["label_survival_time"].notna()].copy().reset_index(drop=True)
    rows.index = rows["sample_id"].astype(str).to_numpy()
    strata = rows["meta_source"] + ":" + rows["label_survival_event"].astype(int).astype(str)
    feats = SurvivalFeatures(manifest.base_dir, rows, n_genes=args.n_genes)
    skf = StratifiedKFold(n_splits=args.folds, shuffle=True, random_state=args.seed)
    pcs_grid, pen_grid = [0, 5, 10, 20], [0.01, 0.1, 1.0, 10.0]
    folds = []
    n_run = 1 if args.quick else min(args.folds, args.max_folds or args.folds)
    t_e = (rows["label_survival_time"].astype(float), rows["label_survival_event"].astype(int))
    for k, (trval_i, te_i) in enumerate(skf.split(rows, strata)):
        if k >= n_run:
            break
        trval = rows.index[trval_i]
        tr, va = train_test_split(trval, test_size=0.2, stratify=strata.loc[trval], random_state=args.seed + k)
        te = rows.index[te_i]
        split = pd.Series("train", index=rows.index)
        split.loc[va], split.loc[te] = "validation", "test"
        fold = {
            "fold": k,
            "n": {"train": len(tr), "validation": len(va), "test": len(te)},
            "events": {s: int(t_e[1].loc[i].sum()) for s, i in (("train", tr), ("validation", va), ("test", te))},
            "test_patients_seen_unlabelled_in_pretraining": int(
                sum(str(rows.loc[i, "patient_id"]) in pretrain_patients for i in te)
            ),
        }
        log(f"survival fold {k}: {fold['n']} events {fold['events']}")
        feats.fit(tr)
        fold["cox"] = cox_select(feats, rows, tr, va, te, pcs_grid=pcs_grid, pen_grid=pen_grid)
        log(f"  cox (clinical + expression PCs) {fold['cox']['best']}")
        if do_fusion:
            fold["cox_clinical"] = cox_select(feats, rows, tr, va, te, pcs_grid=[0], pen_grid=pen_grid)
            fold["cox_omics"] = cox_select(
                feats, rows, tr, va, te, pcs_grid=pcs_grid[1:], pen_grid=pen_grid, clinical=False
            )
            late = (fold["cox_clinical"]["risk_test"] + fold["cox_omics"]["risk_test"]) / 2
            fold["cox_late"] = {"best": {"test": concordance_index(t_e[0].loc[te], late, t_e[1].loc[te])}}
        if runner is not None:
            cols = [*SURV_MODALITIES, "label_survival_time", "label_survival_event"]
            path = write_split_manifest(manifest, rows, split, cols, manifest.base_dir / f"bench_surv_fold{k}.parquet")
            task = ["--task", "survival"]
            bp = {}
            names = [n for n in SURV_BP_CONFIGS if not (args.quick and n == "pretrained_linear_probe")]
            for name, cfg in ((n, BP_CONFIGS[n]) for n in names):
                r = runner.run(f"surv_f{k}_{name}", path, task, cfg, seed=args.seed, modalities=SURV_MODALITIES)
                bp[name] = r
            best = max(bp, key=lambda n: bp[n]["validation"])
            fold["bp"] = {
                n: {
                    "validation": r["validation"],
                    "test": r["test"],
                    "wall_s": r["wall_s"],
                    "reused": bool(r.get("reused")),
                }
                for n, r in bp.items()
            }
            if do_fusion:
                # does a setting use the clinical covariates? rank correlation of its test risks with the fold's
                # (validation-chosen) clinical-only and expression-only Cox models' log-hazards
                for n, r in bp.items():
                    risk = r["pred"].set_index("sample_id").loc[list(te), "risk"].to_numpy()
                    fold["bp"][n]["spearman_with_cox_unimodal"] = {
                        m: float(spearmanr(risk, fold[c]["risk_test"]).statistic)
                        for m, c in (("tabular_clinical", "cox_clinical"), ("omics_expression", "cox_omics"))
                    }
            fold["bp_selected"] = {"config": best, "validation": bp[best]["validation"], "test": bp[best]["test"]}
            log(f"  BioPerceiver selected on validation: {best} test C-index {bp[best]['test']:.4f}")
            if do_fusion:
                risks = {}
                for m in SURV_MODALITIES:
                    r = runner.run(
                        f"surv_f{k}_{best}_{m}", path, task, BP_CONFIGS[best], seed=args.seed, modalities=[m]
                    )
                    fold[f"bp_{m}"] = {"validation": r["validation"], "test": r["test"], "wall_s": r["wall_s"]}
                    risks[m] = r["pred"].set_index("sample_id").loc[list(te), "risk"].to_numpy()
                late = np.mean([risks[m] for m in SURV_MODALITIES], axis=0)
                fold["bp_late"] = {"test": concordance_index(t_e[0].loc[te], late, t_e[1].loc[te])}
                # how much each modality drives the intermediate-fusion model: rank correlation of its test risks
                # with each unimodal model's
                both = bp[best]["pred"].set_index("sample_id").loc[list(te), "risk"].to_numpy()
                fold["bp_intermediate_spearman_with_unimodal"] = {
                    m: float(spearmanr(both, risks[m]).statistic) for m in SURV_MODALITIES
                }
        folds.append(fold)
    out = {
        "n_patients": len(rows),
        "n_events": int(t_e[1].sum()),
        "n_shared_genes": feats.n_shared_genes,
        "n_top_variance_genes": args.n_genes,
        "cox_grid": {"n_pcs": pcs_grid, "penalizer": pen_grid},
        "bp_configs": {n: BP_CONFIGS[n] for n in SURV_BP_CONFIGS},
        "folds": folds,
    }
    out["summary"] = survival_summary(folds)
    return out


def _ms(x) -> dict:
    x = np.asarray(x, dtype=float)
    return {"per_fold": x.tolist(), "mean": float(np.mean(x)), "sd": float(np.std(x, ddof=1)) if len(x) > 1 else 0.0}


def survival_summary(folds: list[dict]) -> dict:
    s = {"cox": _ms([f["cox"]["best"]["test"] for f in folds])}
    if all("bp_selected" in f for f in folds):
        s["bp_selected"] = _ms([f["bp_selected"]["test"] for f in folds])
        d = np.array(s["bp_selected"]["per_fold"]) - np.array(s["cox"]["per_fold"])
        s["difference_bp_minus_cox"] = _ms(d)
        s["folds_bp_ge_cox"] = int((d >= 0).sum())
        for name in folds[0]["bp"]:
            s[f"bp_{name}"] = _ms([f["bp"][name]["test"] for f in folds])
            s[f"bp_{name}_validation"] = _ms([f["bp"][name]["validation"] for f in folds])
        s["selected_configs"] = [f["bp_selected"]["config"] for f in folds]
    for key in ("cox_clinical", "cox_omics", "cox_late"):
        if all(key in f for f in folds):
            s[key] = _ms([f[key]["best"]["test"] for f in folds])
    for key in ("bp_omics_expression", "bp_tabular_clinical", "bp_late"):
        if all(key in f for f in folds):
            s[key] = _ms([f[key]["test"] for f in folds])
    if all("bp" in f and all("spearman_with_cox_unimodal" in v for v in f["bp"].values()) for f in folds):
        s["bp_spearman_with_cox_unimodal"] = {
            n: {m: _ms([f["bp"][n]["spearman_with_cox_unimodal"][m] for f in folds]) for m in SURV_MODALITIES}
            for n in folds[0]["bp"]
        }
    if all("bp_intermediate_spearman_with_unimodal" in f for f in folds):
        s["bp_intermediate_spearman_with_unimodal"] = {
            m: _ms([f["bp_intermediate_spearman_with_unimodal"][m] for f in folds]) for m in SURV_MODALITIES
        }
    return s


# ---------------------------------------------------------------------------------------------------------------
# 2 + 3: findings and label efficiency
# ---------------------------------------------------------------------------------------------------------------
class FindingsData:
    def __init__(self, manifest):
        from bioperceiver.data import assign_splits
        from bioperceiver.tasks import get_task
        from bioperceiver.training.tasks import labelled_records

        self.manifest = manifest
        rows = manifest.table[manifest.table["text_report"].notna()].copy().reset_index(drop=True)
        m = assign_splits(manifest.subset(manifest.table["text_report"].notna().to_numpy()))
        self.rows = m.table
        self.spec = get_task("multilabel", label_column="label_findings", top_k=6)
        recs = {s: m.split(s).records() for s in ("train", "validation", "test")}
        self.spec.fit([r for r in recs["train"] if r.get("label_findings") is not None])
        self.data = {}
        for s, rr in recs.items():
            kept, targets = labelled_records(rr, self.spec, s)
            self.data[s] = (kept, np.stack([t.numpy() for t in targets]).astype(int))
        self.path = write_split_manifest(
            manifest,
            rows,
            self.rows["split"],
            [*FIND_MODALITIES, "label_findings"],
            manifest.base_dir / "bench_findings.parquet",
        )

    def sizes(self) -> dict:
        return {
            s: {
                "rows": len(r),
                "patients": len({x["patient_id"] for x in r}),
                "positives": dict(zip(self.spec.classes, y.sum(0).tolist())),
            }
            for s, (r, y) in self.data.items()
        }


def tfidf_lr(data: FindingsData, train_recs, y_train, *, text_only=False, c_grid=(0.1, 1.0, 10.0, 100.0)) -> dict:
    from scipy import sparse
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    from bioperceiver.evaluation import compute_task_metrics

    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=1 if len(train_recs) < 50 else 2, sublinear_tf=True)
    vec.fit([r["text_report"] for r in train_recs])
    tab = TabularEncoder().fit(parse_json_col([r["tabular_study"] for r in train_recs]))

    def X(recs):
        xt = vec.transform([r["text_report"] for r in recs])
        if text_only:
            return xt
        return sparse.hstack(
            [xt, sparse.csr_matrix(tab.transform(parse_json_col([r["tabular_study"] for r in recs])).to_numpy())]
        ).tocsr()

    xtr, (vr, yv), (ter, _) = X(train_recs), data.data["validation"], data.data["test"]
    xva, xte = X(vr), X(ter)
    grid = []
    for c in c_grid:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clf = OneVsRestClassifier(LogisticRegression(C=c, max_iter=5000)).fit(xtr, y_train)
            pv, pt = clf.predict_proba(xva), clf.predict_proba(xte)
        auc = compute_task_metrics("multilabel", pv, yv, from_logits=False)["auroc"]
        grid.append({"C": c, "validation": auc, "probs_test": pt})
    best = max(grid, key=lambda g: g["validation"])
    return {
        "C": best["C"],
        "validation": best["validation"],
        "probs_test": best["probs_test"],
        "grid": [{"C": g["C"], "validation": g["validation"]} for g in grid],
    }


def bp_probs(data: FindingsData, pred: pd.DataFrame) -> np.ndarray:
    recs = data.data["test"][0]
    p = pred.set_index("sample_id").loc[[r["sample_id"] for r in recs]]
    return p[[f"prob_{c}" for c in data.spec.classes]].to_numpy()


def score_with_ci(data: FindingsData, probs: np.ndarray, n_boot: int, seed: int) -> dict:
    from bioperceiver.evaluation import metrics_with_ci

    recs, y = data.data["test"]
    groups = np.array([r["patient_id"] for r in recs])
    m = metrics_with_ci("multilabel", probs, y, from_logits=False, groups=groups, n_resamples=n_boot, seed=seed)
    return {k: m[k] for k in ("auroc", "auroc_ci_low", "auroc_ci_high", "n", "n_groups")}


def paired_diff(data: FindingsData, pa: np.ndarray, pb: np.ndarray, n_boot: int, seed: int) -> dict:
    """Macro-AUROC(a) - macro-AUROC(b) on the same patient-bootstrap resamples."""
    from bioperceiver.evaluation import Resampler, compute_task_metrics, quiet_metric_warnings

    recs, y = data.data["test"]
    groups = np.array([r["patient_id"] for r in recs])

    def auc(p, idx):
        return compute_task_metrics("multilabel", p[idx], y[idx], from_logits=False)["auroc"]

    full = np.arange(len(y))
    point = auc(pa, full) - auc(pb, full)
    diffs = []
    with quiet_metric_warnings():
        for idx in Resampler(len(y), n_boot, seed, groups).indices():
            d = auc(pa, idx) - auc(pb, idx)
            if np.isfinite(d):
                diffs.append(d)
    diffs = np.asarray(diffs)
    return {
        "difference": float(point),
        "ci_low": float(np.quantile(diffs, 0.025)),
        "ci_high": float(np.quantile(diffs, 0.975)),
        "p_a_better": float((diffs > 0).mean()),
        "n_used": len(diffs),
    }


def findings_benchmark(args, data: FindingsData, runner: BPRunner | None) -> dict:
    out = {"classes": data.spec.classes, "sizes": data.sizes(), "models": {}}
    nb = 200 if args.quick else args.n_bootstrap
    train_recs, y_train = data.data["train"]
    for variant, text_only in (("tfidf_lr_text_study", False), ("tfidf_lr_text_only", True)):
        r = tfidf_lr(data, train_recs, y_train, text_only=text_only)
        out["models"][variant] = {
            "C": r["C"],
            "validation": r["validation"],
            "grid": r["grid"],
            **score_with_ci(data, r["probs_test"], nb, args.seed),
        }
        out.setdefault("_probs", {})[variant] = r["probs_test"]
        test_auc = out["models"][variant]["auroc"]
        log(f"findings {variant}: C={r['C']} validation {r['validation']:.4f} test {test_auc:.4f}")
    if runner is not None:
        task = ["--task", "multilabel", "--label_column", "label_findings", "--top_k_labels", "6"]
        names = ["pretrained_linear_probe"] if args.quick else FIND_BP_CONFIGS
        for name, cfg in ((n, BP_CONFIGS[n]) for n in names):
            r = runner.run(f"findings_{name}", data.path, task, cfg, seed=args.seed, modalities=FIND_MODALITIES)
            probs = bp_probs(data, r["pred"])
            out["models"][f"bp_{name}"] = {
                "validation": r["validation"],
                "wall_s": r["wall_s"],
                **score_with_ci(data, probs, nb, args.seed),
            }
            out["_probs"][f"bp_{name}"] = probs
        bp_names = [n for n in out["models"] if n.startswith("bp_")]
        best = max(bp_names, key=lambda n: out["models"][n]["validation"])
        out["bp_selected"] = best
        out["paired_difference_bp_selected_minus_tfidf"] = paired_diff(
            data, out["_probs"][best], out["_probs"]["tfidf_lr_text_study"], nb, args.seed
        )
    out.pop("_probs", None)
    return out


def label_efficiency(args, data: FindingsData, runner: BPRunner | None) -> dict:
    from bioperceiver.training.finetune_loop import subsample_patients

    train_recs, y_train = data.data["train"]
    fractions = [0.1, 1.0] if args.quick else args.fractions
    seeds = args.seeds[:1] if args.quick else args.seeds
    task = ["--task", "multilabel", "--label_column", "label_findings", "--top_k_labels", "6"]
    cfgs = {"pretrained": BP_CONFIGS["pretrained_full"], "random": BP_CONFIGS["random_full"]}
    points = []
    for frac in fractions:
        for seed in seeds:
            recs = subsample_patients(train_recs, frac, seed)  # the run's own draw
            kept = {id(r) for r in recs}
            ys = np.stack([y for r, y in zip(train_recs, y_train) if id(r) in kept])
            spe = math.ceil(len(recs) / 32)
            base = 2 if args.quick else cfgs["pretrained"]["epochs"]
            steps = base * spe if args.quick else max(base * spe, args.min_steps)
            every = max(1, steps // (2 if args.quick else 15))  # ~15 validations / checkpoints per run
            sched = [
                "--max_steps",
                str(steps),
                "--eval_strategy",
                "steps",
                "--eval_steps",
                str(every),
                "--save_strategy",
                "steps",
                "--save_steps",
                str(every),
            ]
            pt = {
                "fraction": frac,
                "seed": seed,
                "patients": len({r["patient_id"] for r in recs}),
                "rows": len(recs),
                "labels_with_a_positive": int((ys.sum(0) > 0).sum()),
                "positives": dict(zip(data.spec.classes, ys.sum(0).tolist())),
                "steps": steps,
                "epochs": round(steps / spe, 1),
                "eval_every_steps": every,
            }
            r = tfidf_lr(data, recs, ys)
            from bioperceiver.evaluation import compute_task_metrics

            pt["tfidf_lr"] = compute_task_metrics(
                "multilabel", r["probs_test"], data.data["test"][1], from_logits=False
            )["auroc"]
            if runner is not None:
                for name, cfg in cfgs.items():
                    rr = runner.run(
                        f"le_{frac}_{seed}_{name}",
                        data.path,
                        task,
                        cfg,
                        seed=seed,
                        label_fraction=frac,
                        modalities=FIND_MODALITIES,
                        extra=sched,
                    )
                    pt[name] = rr["test"]
                    pt[f"{name}_validation"] = rr["validation"]
                    pt[f"{name}_split_sizes"] = rr["split_sizes"]
            log(
                f"label efficiency {frac} seed {seed}: {pt['patients']} patients / {pt['rows']} rows, "
                f"{pt['labels_with_a_positive']}/6 labels with a positive; "
                + ", ".join(f"{k} {pt[k]:.4f}" for k in ("tfidf_lr", "pretrained", "random") if k in pt)
            )
            points.append(pt)
    summary = {}
    for frac in fractions:
        sel = [p for p in points if p["fraction"] == frac]
        summary[str(frac)] = {"patients": [p["patients"] for p in sel], "rows": [p["rows"] for p in sel]}
        for k in ("tfidf_lr", "pretrained", "random"):
            if k in sel[0]:
                summary[str(frac)][k] = _ms([p[k] for p in sel])
    return {
        "fractions": fractions,
        "seeds": seeds,
        "min_steps": args.min_steps,
        "settings": cfgs,
        "points": points,
        "summary": summary,
    }


# ---------------------------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------------------------
def table(headers: list[str], rows: list[list]) -> str:
    def f(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(f(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def ms(d: dict) -> str:
    return f"{d['mean']:.3f} ± {d['sd']:.3f}"


def print_report(res: dict) -> None:
    if "survival" in res:
        s = res["survival"]
        folds, summ = s["folds"], s["summary"]
        rows = []
        for f in folds:
            r = [
                f["fold"],
                f"{f['n']['test']} ({f['events']['test']} ev)",
                f["cox"]["best"]["test"],
                f"{f['cox']['best']['n_pcs']} PCs, pen {f['cox']['best']['penalizer']}",
            ]
            if "bp_selected" in f:
                r += [
                    *(f["bp"][n]["test"] for n in f["bp"]),
                    f["bp_selected"]["config"],
                    f["bp_selected"]["test"],
                    f["bp_selected"]["test"] - f["cox"]["best"]["test"],
                ]
            rows.append(r)
        heads = ["fold", "test n", "Cox C-index", "Cox chosen"]
        if "bp_selected" in summ:
            names = list(folds[0]["bp"])
            heads += [f"BP {n}" for n in names] + ["BP chosen on val", "BP selected", "BP − Cox"]
            rows.append(
                [
                    "mean ± sd",
                    "",
                    ms(summ["cox"]),
                    "",
                    *(ms(summ[f"bp_{n}"]) for n in names),
                    "",
                    ms(summ["bp_selected"]),
                    ms(summ["difference_bp_minus_cox"]),
                ]
            )
        else:
            rows.append(["mean ± sd", "", ms(summ["cox"]), ""])
        print("\n## Survival, 5-fold CV (test C-index)\n" + table(heads, rows))
        fus = [
            (k, summ[k])
            for k in (
                "cox",
                "cox_clinical",
                "cox_omics",
                "cox_late",
                "bp_tabular_clinical",
                "bp_omics_expression",
                "bp_late",
                "bp_selected",
            )
            if k in summ
        ]
        if len(fus) > 2:
            print(
                "\n## Fusion (survival folds, test C-index)\n"
                + table(
                    ["model", *(f"fold {f['fold']}" for f in folds), "mean ± sd"],
                    [[k, *v["per_fold"], ms(v)] for k, v in fus],
                )
            )
        for n, v in summ.get("bp_spearman_with_cox_unimodal", {}).items():
            print(f"Spearman of BP {n} test risks with Cox " + ", ".join(f"{m} alone {ms(x)}" for m, x in v.items()))
        for m, v in summ.get("bp_intermediate_spearman_with_unimodal", {}).items():
            print(f"Spearman of BP intermediate-fusion test risks with BP {m} alone: {ms(v)}")
    if "findings" in res:
        f = res["findings"]
        rows = [
            [n, m.get("validation", float("nan")), m["auroc"], f"[{m['auroc_ci_low']:.3f}, {m['auroc_ci_high']:.3f}]"]
            for n, m in f["models"].items()
        ]
        print("\n## PadChest findings (macro-AUROC)\n" + table(["model", "validation", "test", "95% CI"], rows))
        if "paired_difference_bp_selected_minus_tfidf" in f:
            d = f["paired_difference_bp_selected_minus_tfidf"]
            print(f"{f['bp_selected']} − TF-IDF: {d['difference']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]")
    if "label_efficiency" in res:
        le = res["label_efficiency"]["summary"]
        keys = [k for k in ("tfidf_lr", "pretrained", "random") if k in next(iter(le.values()))]
        rows = [[fr, "/".join(map(str, v["patients"])), *(ms(v[k]) for k in keys)] for fr, v in le.items()]
        print("\n## Label efficiency (findings, test macro-AUROC)\n" + table(["fraction", "patients", *keys], rows))


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    if "survival" in res:
        ax, s = axes[0], res["survival"]["summary"]
        keys = ["cox", "bp_selected", *(f"bp_{n}" for n in SURV_BP_CONFIGS)]
        keys = [k for k in keys if k in s]
        for i, k in enumerate(keys):
            ax.bar(i, s[k]["mean"], yerr=s[k]["sd"], color="C0" if k == "cox" else "C1", alpha=0.6, capsize=4)
            ax.scatter([i] * len(s[k]["per_fold"]), s[k]["per_fold"], color="k", s=10, zorder=3)
        ax.set_xticks(
            range(len(keys)),
            [k.replace("bp_", "BP ").replace("_", " ") for k in keys],
            rotation=30,
            ha="right",
            fontsize=8,
        )
        ax.set_ylim(0.4, 0.9)
        ax.axhline(0.5, color="grey", lw=0.5)
        ax.set_title("Survival: test C-index per fold (mean ± sd)")
    if "findings" in res:
        ax, m = axes[1], res["findings"]["models"]
        for i, (k, v) in enumerate(m.items()):
            ax.bar(
                i,
                v["auroc"],
                yerr=[[v["auroc"] - v["auroc_ci_low"]], [v["auroc_ci_high"] - v["auroc"]]],
                color="C0" if k.startswith("tfidf") else "C1",
                alpha=0.6,
                capsize=4,
            )
        ax.set_xticks(range(len(m)), [k.replace("_", " ") for k in m], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0.4, 1.0)
        ax.set_title("PadChest findings: test macro-AUROC (95% CI)")
    if "label_efficiency" in res:
        ax, le = axes[2], res["label_efficiency"]["summary"]
        fr = [float(f) for f in le]
        for k, c in (("tfidf_lr", "C0"), ("pretrained", "C1"), ("random", "C2")):
            if k in next(iter(le.values())):
                mu = [le[f][k]["mean"] for f in le]
                sd = [le[f][k]["sd"] for f in le]
                ax.errorbar(fr, mu, yerr=sd, marker="o", capsize=3, color=c, label=k)
        ax.set_xscale("log")
        ax.set_xlabel("fraction of training patients")
        ax.legend(fontsize=8)
        ax.set_title("Label efficiency (findings, macro-AUROC)")
    if "survival" in res:
        ax, s = axes[3], res["survival"]["summary"]
        keys = [
            k
            for k in (
                "cox_clinical",
                "cox_omics",
                "cox_late",
                "cox",
                "bp_tabular_clinical",
                "bp_omics_expression",
                "bp_late",
                "bp_selected",
            )
            if k in s
        ]
        for i, k in enumerate(keys):
            ax.bar(i, s[k]["mean"], yerr=s[k]["sd"], color="C0" if k.startswith("cox") else "C1", alpha=0.6, capsize=4)
        names = {
            "cox": "Cox early (concat)",
            "cox_late": "Cox late (mean)",
            "bp_late": "BP late (mean)",
            "bp_selected": "BP intermediate",
        }
        ax.set_xticks(
            range(len(keys)), [names.get(k, k.replace("_", " ")) for k in keys], rotation=30, ha="right", fontsize=8
        )
        ax.set_ylim(0.4, 0.9)
        ax.axhline(0.5, color="grey", lw=0.5)
        ax.set_title("Fusion (survival, test C-index mean ± sd)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    return o.item() if hasattr(o, "item") else str(o)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--only",
        nargs="*",
        default=["survival", "findings", "label_efficiency", "fusion"],
        choices=["survival", "findings", "label_efficiency", "fusion"],
    )
    p.add_argument("--work_dir", default=str(ROOT / "outputs" / "bench_finetune"))
    p.add_argument("--pretrained_dir", default=str(ROOT / "outputs" / "bench_finetune" / "pretrain" / "final"))
    p.add_argument("--no_bioperceiver", action="store_true", help="baselines only")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--max_folds", type=int, default=None, help="run only the first N folds (timing, debugging)")
    p.add_argument("--n_genes", type=int, default=1000, help="top-variance genes before PCA (Cox baseline)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--min_steps", type=int, default=60, help="label efficiency: least optimiser steps per run")
    p.add_argument("--n_bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 fold, 2 epochs, 1 seed, fewer settings")
    p.add_argument("--output", default=None)
    p.add_argument(
        "--reuse_runs",
        default=None,
        metavar="JSON",
        help="reuse the BioPerceiver runs recorded in this results JSON whose argument list is identical "
        "and whose run folder under --work_dir still holds its results (no retraining); runs with "
        "--modality_dropout recorded before evaluation dropped it are never reused",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the sub-benchmarks not run now (and their BioPerceiver runs) from the existing output JSON",
    )
    args = p.parse_args()
    name = "finetune_tasks_quick" if args.quick else "finetune_tasks"
    out_json = Path(args.output) if args.output else ROOT / "benchmarks" / "results" / f"{name}.json"
    logging.basicConfig(level=logging.WARNING)  # run_finetune's own basicConfig becomes a no-op: quiet runs
    os.chdir(ROOT)
    t0 = time.perf_counter()

    import torch
    import transformers

    from bioperceiver.data import assign_splits, read_manifest

    work = Path(args.work_dir)
    manifest_path = ensure_cohort(work)
    manifest = read_manifest(manifest_path)
    runner, pretrain_cmd = None, None
    if not args.no_bioperceiver:
        backbone, pretrain_cmd = ensure_backbone(args, manifest_path)
        runner = BPRunner(args, backbone)
    pre_split = assign_splits(manifest).table
    pretrain_patients = set(pre_split.loc[pre_split["split"] == "train", "patient_id"].astype(str))

    res: dict = {
        "command": " ".join([".venv/bin/python", "benchmarks/finetune_tasks.py", *sys.argv[1:]]),
        "pretrain_command": " ".join(pretrain_cmd[1:]) if pretrain_cmd else None,
        "pretrained_dir": args.pretrained_dir if runner else None,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d"),
    }
    if "survival" in args.only or "fusion" in args.only:
        res["survival"] = survival_benchmark(args, manifest, runner, pretrain_patients, "fusion" in args.only)
    if "findings" in args.only or "label_efficiency" in args.only:
        data = FindingsData(manifest)
        if "findings" in args.only:
            res["findings"] = findings_benchmark(args, data, runner)
        if "label_efficiency" in args.only:
            res["label_efficiency"] = label_efficiency(args, data, runner)
    if runner is not None:
        res["bioperceiver_runs"] = runner.runs
    res["wall_clock_s"] = round(time.perf_counter() - t0, 1)
    if args.merge and out_json.exists():
        prev = json.loads(out_json.read_text())
        kept = [k for k in ("survival", "findings", "label_efficiency") if k in prev and k not in res]
        prefixes = {"survival": "surv_", "findings": "findings_", "label_efficiency": "le_"}
        old_runs = [
            r for r in prev.get("bioperceiver_runs", []) if r["tag"].startswith(tuple(prefixes[k] for k in kept))
        ]
        history = prev.pop("merged_from", [])
        history.append({k: prev.get(k) for k in ("command", "date", "wall_clock_s", "machine")} | {"kept": kept})
        res = {**{k: prev[k] for k in kept}, **res, "merged_from": history}
        res["bioperceiver_runs"] = old_runs + res.get("bioperceiver_runs", [])
        log(f"merged: kept {kept} from {out_json} ({prev.get('command')})")
    print_report(res)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(res, indent=1, default=_json_default) + "\n")
    plot(res, out_json.with_suffix(".png"))
    log(f"wrote {out_json} and {out_json.with_suffix('.png')} in {res['wall_clock_s']:.0f} s")


if __name__ == "__main__":
    main()
