"""Cross-validated survival benchmark per SurvSet cohort: BioPerceiver (random init, pretrained) vs classical models.

For each cohort of ``--cohorts`` (built with :mod:`bioperceiver.data.recipes.survset`, one manifest for all):

* **folds** -- patient-level ``--folds``-fold CV stratified by event (:func:`make_folds`); inside the training
  folds a stratified ``--val_fraction`` of patients is the *validation* part. Every model is fitted on *train*,
  chooses its settings on *validation* only and is scored once on the held-out fold (*test*). With
  ``--selection inner_cv`` the models without neural training instead choose by ``--inner_folds`` patient-level
  folds of *train* + *validation* (Cox: the cross-validated partial likelihood of Verweij & van Houwelingen, as
  ``cv.glmnet``; the forest: the C-index of its pooled out-of-fold risks) and are refitted on both; with a few
  labelled patients a validation part of ~6 is a noisy judge (``benchmarks/RESULTS.md``, protocol K).
* **models**
  - ``cox_clinical``: ``lifelines.CoxPHFitter`` on the clinical covariates (train-median imputation, one-hot,
    standardisation; ridge penalty chosen on validation). Cohorts without clinical covariates have none.
  - ``cox_clinical_pcs``: the same on clinical covariates + principal components of expression (gene
    standardisation, top-variance genes, PCA and component scaling fitted on the training rows only; number of
    components in ``{0, 2, 5, 10, 20}`` and penalty chosen on validation). Both Cox models reuse
    ``benchmarks/finetune_tasks.py``'s ``SurvivalFeatures`` / ``cox_select``.
  - ``rsf``: scikit-survival ``RandomSurvivalForest`` (200 trees) on the same clinical + PC features (number of
    components and ``min_samples_leaf`` chosen on validation).
  - ``bp_random``: BioPerceiver from random initialisation (``--random_preset``), full finetuning with a Cox head
    through ``finetune/run_finetune.py``'s ``main`` (``benchmarks/finetune_tasks.py``'s ``BPRunner``), the best
    epoch chosen on validation C-index.
  - ``bp_pretrained``: the same from ``--pretrained_dir`` (only when given). With ``--bp_lrs`` both full-finetuning
    arms are finetuned at every listed rate and, per fold, the run with the best *validation* C-index is kept (the
    rate kept per fold is reported; each rate's run is cached on its own).
  - ``bp_random_probe`` / ``bp_pretrained_probe``: the same backbones frozen (``--finetuning_mode linear_probe``,
    cached embeddings) with a linear Cox head, at ``benchmarks/finetune_tasks.py``'s
    ``BP_CONFIGS["pretrained_linear_probe"]`` learning rate and epochs (``--probe_lr``, ``--probe_epochs``), the best
    epoch chosen on validation C-index.
  - ``bp_random_selected`` / ``bp_pretrained_selected`` (derived, nothing trained): per fold, whichever of the full
    and the probe arm of that init has the higher *validation* C-index (ties: full); the pick per fold is recorded.
  - ``cox_clinical_emb_pretrained`` (no neural training): the ``cox_clinical_pcs`` recipe with the principal
    components of the frozen pretrained backbone's embedding of the *expression view alone* (its
    ``modality_pooler_output`` for ``omics_expression``, so the clinical covariates are not counted twice) in place
    of the expression PCs: embedding standardisation, PCA and component scaling fitted on the training rows only,
    number of components in ``{0, 2, 5, 10, 20}`` (capped by the width) and penalty chosen on validation
    (``cox_select``). Cohorts the backbone's processors do not know (the external ones) are embedded per fold after
    extending the processors' vocabulary and per-source statistics on that fold's training rows, as finetuning does
    (added genes get seeded random embeddings).
  - ``cox_clinical_emb_random``: the same on a seeded random init of the same architecture and processors (the
    control; ``benchmarks/pretraining_diagnostics.py``'s ``load_models`` / ``embed``).
  - ``cox_clinical_pcs_emb_pretrained``: clinical covariates + as many expression PCs as ``cox_clinical_pcs`` chose
    in that fold + embedding PCs chosen on validation; 0 embedding PCs reproduces ``cox_clinical_pcs``, so it
    asks whether the embedding adds to the classical expression PCs.
  - ``cox_clinical_emb_selected`` (only with ``--emb_candidates LABEL=DIR ...``, e.g. one recipe pretrained for
    several step counts): per fold, the candidate backbone whose ``cox_clinical_emb_pretrained`` record scores
    highest on validation (by inner CV with ``--selection inner_cv``; ties: the first candidate given) and that
    record as it stands; the candidates' records are read back from other runs of those backbones
    (``--reuse_cache``) or fitted, and the candidate kept per fold is recorded. A rule that reads no test label,
    unlike comparing the backbones' test C-indices.
  ``--bp_arms`` chooses the BioPerceiver arms (default: all; the pretrained ones and the three ``*_emb_*`` arms
  only with ``--pretrained_dir``). The ``*_emb_*`` arms are BioPerceiver-derived, never candidates for the best
  baseline.
* **report** per cohort: test C-index mean ± SD over folds; paired patient-bootstrap differences (``bp_pretrained``
  - ``bp_random``, ``bp_pretrained`` - best baseline, ``bp_random`` - best baseline, the same for the probe and
  selected arms, ``bp_pretrained_probe`` - ``bp_pretrained``, ``cox_clinical_emb_pretrained`` - best baseline, -
  ``cox_clinical_emb_random`` and - ``cox_clinical_pcs``, ``cox_clinical_pcs_emb_pretrained`` - ``cox_clinical_pcs``,
  ``cox_clinical_emb_selected`` - best baseline, - ``cox_clinical_emb_random`` and - ``cox_clinical_emb_pretrained``;
  a fixed comparison that names the cohort's best baseline is keyed ``"... (fixed)"``) with 95% CIs: in each of
  ``--n_bootstrap`` resamples every fold's test patients are redrawn with replacement (the same draw for both
  models), the fold's C-index difference is computed, and the differences are averaged over folds. The *best
  baseline* is the classical model with the highest mean *validation* C-index (never chosen on test).

External cohorts (gse3143, DBCD, DLBCL, chop, AML_Bull, vdv) are accepted for evaluation only: every setting is
fixed or chosen on the cohort's own validation part, and nothing here pretrains on them.

Outputs (``--output_dir``, default ``outputs/survival_cv``): ``survival_cv.json``, ``survival_cv.png``,
``survival_cv.md`` (the tables), ``survival_cv_replicates.npz`` (the paired differences' bootstrap replicates, which
``benchmarks/seed_spread.py`` combines over runs that differ only in ``--init_seed`` or the pretraining seed), and
``cache/<cohort>/fold<k>/<model>.json`` -- each finished (cohort, fold, model) result with its test risks; a rerun
with the same settings skips it (resumable); ``cache/<cohort>/embedding_<init>.npz`` (+ ``.json``: settings and
the vocabulary extension per fold) the expression-view embeddings of the ``*_emb_*`` arms. ``runs/`` holds the
BioPerceiver run folders (reports, no weights).

    python benchmarks/survival_cv.py --cohorts gse1992 gse4335 --folds 5
    python benchmarks/survival_cv.py --cohorts nki70 --folds 5 --pretrained_dir /work/evidence/survset/pretrain/final
    python benchmarks/survival_cv.py --cohorts Bergamaschi --quick      # smoke: 2 folds, 2 epochs, fewer settings
    # label efficiency: every model on a quarter of each fold's training patients, backbones without the fold's test
    python benchmarks/survival_cv.py --folds 5 --train_fraction 0.25 --bp_arms bp_random bp_pretrained \
        --pretrained_dir /work/evidence/survset/pretrain_cvfolds/fold{fold}/final --bp_lrs 3e-4 1e-3 3e-3
        # add --subsample_validation to select on a quarter of each validation part too (the labels a user has)
    python benchmarks/survival_cv.py --cohorts nki70 --bp_arms bp_random bp_random_probe   # some BP arms only
    python benchmarks/survival_cv.py --cohorts nki70 --init_seed 1 --output_dir outputs/survival_cv_init1  # same
        # folds and bootstrap draws, another seed for every neural init (random-init control, finetuning, new genes)
    python benchmarks/survival_cv.py --cohorts nki70 --bp_arms bp_random bp_pretrained --bp_lrs 3e-4 1e-3 3e-3 \
        --pretrained_dir DIR --reuse_cache outputs/survival_cv --output_dir outputs/survival_cv_lrgrid
        # learning rate chosen on validation; results an earlier run cached (its 3e-4 runs, the baselines) are copied
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import math
import os
import platform
import re
import shutil
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
MODALITIES = ["omics_expression", "tabular_clinical"]
BASELINES = ("cox_clinical", "cox_clinical_pcs", "rsf")
PCS_GRID = (0, 2, 5, 10, 20)
PEN_GRID = (0.01, 0.1, 1.0, 10.0)
RSF_GRID = {"n_pcs": (5, 20), "min_samples_leaf": (5, 15)}
# trained BioPerceiver arms: initialisation and finetuning mode
BP_ARMS = {
    "bp_random": {"pretrained": False, "mode": "full"},
    "bp_pretrained": {"pretrained": True, "mode": "full"},
    "bp_random_probe": {"pretrained": False, "mode": "linear_probe"},
    "bp_pretrained_probe": {"pretrained": True, "mode": "linear_probe"},
}
# derived arms (nothing trained): per fold the (full, probe) arm with the higher validation C-index
SELECTED_ARMS = {
    "bp_random_selected": ("bp_random", "bp_random_probe"),
    "bp_pretrained_selected": ("bp_pretrained", "bp_pretrained_probe"),
}
# classical-on-embedding arms (no neural training): ridge Cox on clinical covariates + principal components of the
# frozen backbone's embedding of the expression view alone; "expr_pcs": also the expression PCs cox_clinical_pcs chose
EMB_ARMS = {
    "cox_clinical_emb_pretrained": {"init": "pretrained", "expr_pcs": False},
    "cox_clinical_emb_random": {"init": "random_init", "expr_pcs": False},
    "cox_clinical_pcs_emb_pretrained": {"init": "pretrained", "expr_pcs": True},
}
EMB_MODALITY = "omics_expression"
# the embedding arm with the backbone chosen per fold among --emb_candidates (e.g. one pretraining recipe at several
# step counts): each candidate's cox_clinical_emb_pretrained record as it stands (its own grid chosen on validation or
# by inner CV), the candidate with the highest such score kept (ties: the first candidate given); nothing else fitted
CANDIDATE_ARM = "cox_clinical_emb_selected"
ALL_BP_ARMS = (*BP_ARMS, *SELECTED_ARMS, *EMB_ARMS, CANDIDATE_ARM)
# every model chosen by cox_select over a (components, penalty) grid: --baseline_ties reaches these
COX_MODELS = ("cox_clinical", "cox_clinical_pcs", *EMB_ARMS)
# paired differences reported (when both arms ran); None = the best baseline chosen on validation
DIFF_PAIRS = (
    ("bp_pretrained", "bp_random"),
    ("bp_pretrained", None),
    ("bp_random", None),
    ("bp_pretrained_probe", "bp_random_probe"),
    ("bp_pretrained_probe", None),
    ("bp_pretrained_probe", "bp_pretrained"),
    ("bp_pretrained_selected", "bp_random_selected"),
    ("bp_pretrained_selected", None),
    ("cox_clinical_emb_pretrained", None),
    ("cox_clinical_emb_pretrained", "cox_clinical_emb_random"),
    ("cox_clinical_pcs_emb_pretrained", "cox_clinical_pcs"),
    # the pretrained embedding instead of the expression PCs in the same Cox recipe, whichever baseline validation
    # chose (the best-baseline comparison moves with that per-cohort choice, which is noisy on small validation parts)
    ("cox_clinical_emb_pretrained", "cox_clinical_pcs"),
    (CANDIDATE_ARM, None),
    (CANDIDATE_ARM, "cox_clinical_emb_random"),
    (CANDIDATE_ARM, "cox_clinical_emb_pretrained"),  # the choice against --pretrained_dir's backbone alone
)
logger = logging.getLogger("survival_cv")


def _load_finetune_tasks():
    """``benchmarks/finetune_tasks.py`` as a module (its helpers are reused, not copied)."""
    spec = importlib.util.spec_from_file_location("finetune_tasks", ROOT / "benchmarks" / "finetune_tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ft = _load_finetune_tasks()


def _load_diagnostics():
    """``benchmarks/pretraining_diagnostics.py`` as a module (its backbone loading and embedding are reused)."""
    spec = importlib.util.spec_from_file_location(
        "pretraining_diagnostics", ROOT / "benchmarks" / "pretraining_diagnostics.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------------
# folds
# ---------------------------------------------------------------------------------------------------------------
def cohort_rows(table: pd.DataFrame, cohort: str) -> pd.DataFrame:
    """The labelled rows of one cohort of a survset-recipe manifest, indexed by sample id (a copy)."""
    from bioperceiver.data.recipes.survset import COHORTS

    source = "sksurv_GSE7390" if COHORTS[cohort].source == "sksurv" else f"survset_{cohort}"
    rows = table[(table["meta_source"] == source) & table["label_survival_time"].notna()].copy()
    rows.index = rows["sample_id"].astype(str).to_numpy()
    return rows


def make_folds(
    patients: pd.Series, events: pd.Series, n_folds: int, seed: int, val_fraction: float = 0.2
) -> list[dict[str, np.ndarray]]:
    """Patient-level folds stratified by event: ``[{"train", "validation", "test"}: row labels]`` per fold.

    ``patients`` and ``events`` are indexed by row; a patient's rows always fall in one part (a patient counts as an
    event when any of its rows has one). The test parts partition the patients; validation is a stratified
    ``val_fraction`` of each fold's training patients.
    """
    from sklearn.model_selection import train_test_split

    per, pat = ft.patient_events(patients, events)
    if pat.sum() < n_folds or (len(pat) - pat.sum()) < n_folds:
        raise ValueError(f"{n_folds} folds need at least {n_folds} patients with and without an event each")
    out = []
    for k, (trval, test) in enumerate(ft.patient_splits(pat, n_folds, seed)):
        tr, va = train_test_split(trval, test_size=val_fraction, stratify=pat.loc[trval], random_state=seed + k)
        parts = {"train": set(tr), "validation": set(va), "test": set(test)}
        out.append({name: per.index[per["patient"].isin(p)].to_numpy() for name, p in parts.items()})
    return out


def subsample_train(
    folds: list[dict[str, np.ndarray]],
    patients: pd.Series,
    events: pd.Series,
    fraction: float,
    seed: int,
    *,
    validation: bool = False,
    times: pd.Series | None = None,
) -> list[dict[str, np.ndarray]]:
    """Each fold with only a ``fraction`` of its *training* patients (``--train_fraction``, a label-efficiency
    curve): per event class ``max(2, ceil(fraction * n))`` patients, drawn by one permutation per (seed, fold) so a
    smaller fraction's patients are a subset of a larger one's; all of a patient's rows together; test untouched (so
    every fraction is scored on the same patients). ``validation=True`` (``--subsample_validation``) draws the
    validation part the same way from its own stream (a user with a share of the labels selects on a share too);
    otherwise it is untouched. ``fraction`` 1 returns ``folds`` itself.

    A subsampled validation part must still rank something: with ``times`` given, a part without an admissible
    pair (every event at or after every other time) is an error naming the fold."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--train_fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return folds
    per = pd.DataFrame({"patient": patients.astype(str), "event": events.astype(int)})
    out = []
    for k, part in enumerate(folds):
        new = dict(part)
        for name, stream in (("train", [seed, k, 7919]), ("validation", [seed, k, 7919, 1])):
            if name == "validation" and not validation:
                continue
            rows = per.loc[part[name]]
            pat = rows.groupby("patient", sort=True)["event"].max()
            rng = np.random.default_rng(stream)  # its own stream per part: the folds' draws are unchanged
            keep: list[str] = []
            for ev in (0, 1):
                ids = pat.index[pat == ev].to_numpy()
                ids = ids[rng.permutation(len(ids))]
                keep.extend(ids[: min(len(ids), max(2, math.ceil(fraction * len(ids))))])
            new[name] = rows.index[rows["patient"].isin(keep)].to_numpy()
        if validation and times is not None:

            def pairs(ids) -> int:
                return ranked_pairs(times.loc[ids], events.loc[ids])

            va = new["validation"]
            if pairs(va) == 0:
                kept = per.loc[va].groupby("patient")["event"].max()
                full = "" if pairs(part["validation"]) else " (the full validation part has none either)"
                raise ValueError(
                    f"fold {k}: the {fraction:g} validation share ({len(kept)} patients, {int(kept.sum())} with an "
                    f"event) has no admissible pair, so no C-index to select on{full}; use a larger --train_fraction "
                    "or drop --subsample_validation"
                )
        out.append(new)
    return out


def non_test_rows(rows: pd.DataFrame, test) -> list:
    """Every row of the cohort outside the fold's test part -- training and validation patients, labelled or left
    unlabelled by ``--train_fraction`` -- in row order: what ``--pca_rows non_test`` fits the PCAs on (no labels
    are read), the rows a fold-wise backbone was pretrained on."""
    held = set(map(str, test))
    return [i for i in rows.index if str(i) not in held]


def ranked_pairs(time, event) -> int:
    """How many pairs Harrell's C-index ranks among these samples (its admissible pairs; 0: no C-index)."""
    from bioperceiver.evaluation.metrics import concordance_counts

    time = np.asarray(time, float)
    return int(concordance_counts(time, np.zeros(len(time)), np.asarray(event, int))[2][0])


def data_settings(args) -> dict:
    """Cache-key entries of the data each model sees: empty at full data without a gene map, so earlier caches stay
    valid. A ``--gene_map`` enters as its sha256 (it changes the tokens of the cohorts it maps)."""
    mapped = {"gene_map_sha256": sha} if (sha := getattr(args, "gene_map_sha256", None)) else {}
    fraction = getattr(args, "train_fraction", 1.0)
    if fraction == 1:
        return mapped
    sub = {"subsample_validation": True} if subsample_validation(args) else {}
    return {"train_fraction": fraction, **sub, **mapped}


def inner_cv_folds(args) -> int:
    """Inner folds of ``--selection inner_cv`` (0: the recorded rule, settings chosen on the validation part)."""
    return int(getattr(args, "inner_folds", 5)) if getattr(args, "selection", "validation") == "inner_cv" else 0


def inner_seed(args, k: int) -> int:
    """The inner folds' seed in outer fold ``k``: every arm of a fold is cross-validated on the same split."""
    return int(args.seed) * 1000 + k


def subsample_validation(args) -> bool:
    """Whether the validation parts shrink with the training parts (``--subsample_validation``; a no-op at 1)."""
    return bool(getattr(args, "subsample_validation", False)) and getattr(args, "train_fraction", 1.0) < 1


# ---------------------------------------------------------------------------------------------------------------
# baselines
# ---------------------------------------------------------------------------------------------------------------
def has_clinical(rows: pd.DataFrame) -> bool:
    return "tabular_clinical" in rows and rows["tabular_clinical"].notna().any()


def fit_cox(
    feats,
    rows,
    tr,
    va,
    te,
    *,
    with_pcs: bool,
    clinical: bool | None = None,
    ties: str = "first",
    inner_folds: int = 0,
    seed: int = 0,
) -> dict:
    """Ridge Cox (lifelines) on clinical covariates, optionally + expression PCs; settings chosen on validation.

    ``feats``: :class:`SurvivalFeatures`-like (``pca.n_components_``, ``transform(ids, n_pcs, clinical)``);
    ``clinical`` (default: the cohort has clinical covariates) is passed to ``transform`` as whether to include the
    fixed block (see :class:`EmbeddingFeatures`); ``ties``: how grid points tied on the validation C-index are
    broken (``cox_select``: first in grid order, or the highest validation partial log-likelihood). With
    ``inner_folds`` (``--selection inner_cv``) the settings are chosen by that many inner folds of ``tr`` + ``va``
    and the model is refitted on both (``cox_select_cv``; ``ties`` is not used)."""
    clinical = has_clinical(rows) if clinical is None else clinical
    if not with_pcs and not clinical:
        return {"skipped": "no clinical covariates in this cohort"}
    pcs = tuple(p for p in PCS_GRID if p <= feats.pca.n_components_ and (clinical or p))  # small panels: fewer PCs
    grid = {"pcs_grid": pcs if with_pcs else (0,), "pen_grid": PEN_GRID, "clinical": clinical}
    if inner_folds:
        res = ft.cox_select_cv(feats, rows, [*tr, *va], list(te), **grid, n_folds=inner_folds, seed=seed)
    else:
        res = ft.cox_select(feats, rows, list(tr), list(va), list(te), **grid, ties=ties)
    rec = {
        "validation": res["best"]["validation"],
        "test": res["best"]["test"],
        "selected": {k: res["best"][k] for k in ("n_pcs", "penalizer", "n_features")},
        "tied": res["best"]["tied"],  # grid points tied on the best validation score
        "risk_test": np.asarray(res["risk_test"], float).tolist(),
    }
    if inner_folds:
        rec.update(validation_cvpl=res["best"]["validation_cvpl"], inner_folds=res["inner_folds"])
    return rec


def fit_rsf(
    feats, rows, tr, va, te, *, seed: int, n_estimators: int = 200, inner_folds: int = 0, inner_seed: int = 0
) -> dict:
    """scikit-survival random survival forest on clinical + expression PCs; settings chosen on validation, or with
    ``inner_folds`` by the C-index of pooled out-of-fold risks over that many inner folds of ``tr`` + ``va`` (split
    with ``inner_seed``: the Cox models' split of the same fold), then refitted on both (``--selection inner_cv``);
    ``seed``: the forests' own randomness."""
    from sksurv.ensemble import RandomSurvivalForest
    from sksurv.util import Surv

    from bioperceiver.evaluation import concordance_index
    from bioperceiver.training.tasks import tied as same_metric

    t = rows["label_survival_time"].astype(float)
    e = rows["label_survival_event"].astype(int)
    clinical = has_clinical(rows)

    def forest(idx, n_pcs: int, leaf: int):
        y = Surv.from_arrays(event=e.loc[idx].astype(bool).to_numpy(), time=t.loc[idx].to_numpy())
        model = RandomSurvivalForest(
            n_estimators=n_estimators, min_samples_leaf=leaf, max_features="sqrt", n_jobs=1, random_state=seed
        )
        return model.fit(feats.transform(list(idx), n_pcs, clinical).to_numpy(), y)

    def predict(model, idx, n_pcs: int) -> np.ndarray:
        return model.predict(feats.transform(list(idx), n_pcs, clinical).to_numpy())

    pool = [*tr, *va] if inner_folds else list(tr)
    held = ft.inner_folds(rows, pool, inner_folds, inner_seed) if inner_folds else None
    # per inner fold: the pool rows the forest is fitted on, and the held-out ones
    splits = [([r for r, keep in zip(pool, ~np.isin(pool, out)) if keep], out) for out in held or ()]
    best, scores = None, []
    for n_pcs in sorted({min(p, feats.pca.n_components_) for p in RSF_GRID["n_pcs"]}):
        for leaf in RSF_GRID["min_samples_leaf"]:
            if held is None:
                model = forest(tr, n_pcs, leaf)
                val = concordance_index(t.loc[va], predict(model, va, n_pcs), e.loc[va])
            else:  # pooled out-of-fold risks
                oof = pd.Series(0.0, index=pool)
                for fit_rows, out in splits:
                    oof.loc[out] = predict(forest(fit_rows, n_pcs, leaf), out, n_pcs)
                val = concordance_index(t.loc[pool], oof.to_numpy(), e.loc[pool])
            scores.append(val)
            if best is None or val > best["validation"]:  # ties: the first in grid order
                best = {
                    "validation": val,
                    "selected": {"n_pcs": n_pcs, "min_samples_leaf": leaf, "n_estimators": n_estimators},
                    "model": model if held is None else None,
                }
    model = best.pop("model") or forest(pool, best["selected"]["n_pcs"], best["selected"]["min_samples_leaf"])
    rt = predict(model, te, best["selected"]["n_pcs"])
    best.update(test=concordance_index(t.loc[te], rt, e.loc[te]), risk_test=np.asarray(rt, float).tolist())
    best["tied"] = sum(same_metric(v, best["validation"]) for v in scores)  # grid points tied at the best
    if held is not None:
        best["inner_folds"] = len(held)
    return best


class EmbeddingFeatures:
    """Features for a ridge Cox on a frozen embedding, with :class:`SurvivalFeatures`' interface.

    ``transform(ids, n_pcs, clinical)``: with ``clinical`` the fixed classical block -- ``base``'s clinical
    covariates (when ``base_clinical``) and its first ``expr_pcs`` expression PCs (``base`` must be fitted) -- then
    the top ``n_pcs`` principal components of ``emb`` (rows: sample ids). :meth:`fit` standardises the embedding's
    dimensions, fits the PCA and scales the components on the training rows only; ``pca.n_components_`` caps the
    grid (``min(width, training rows - 1)``); with ``pca_idx`` those steps use those rows instead (no labels)."""

    def __init__(self, base, emb: pd.DataFrame, *, expr_pcs: int = 0, base_clinical: bool = True):
        self.base, self.emb = base, emb
        self.expr_pcs, self.base_clinical = int(expr_pcs), bool(base_clinical)

    def fit(self, train_idx, pca_idx=None):
        from sklearn.decomposition import PCA

        x = self.emb.loc[list(train_idx if pca_idx is None else pca_idx)].to_numpy(float)
        if not np.isfinite(x).all():
            raise ValueError("the embedding has missing rows among the training rows")
        self.mu, sd = x.mean(0), x.std(0)
        self.sd = np.where(sd > 1e-12, sd, 1.0)
        z = (x - self.mu) / self.sd
        self.pca = PCA(n_components=min(x.shape[1], len(x) - 1), random_state=0).fit(z)
        pcs = self.pca.transform(z)
        self.pc_mu, self.pc_sd = pcs.mean(0), pcs.std(0) + 1e-12
        return self

    def transform(self, idx, n_pcs: int, clinical: bool = True) -> pd.DataFrame:
        idx = list(idx)
        parts = []
        if clinical and (self.base_clinical or self.expr_pcs):
            parts.append(self.base.transform(idx, self.expr_pcs, self.base_clinical))
        if n_pcs:
            z = (self.emb.loc[idx].to_numpy(float) - self.mu) / self.sd
            pcs = (self.pca.transform(z)[:, :n_pcs] - self.pc_mu[:n_pcs]) / self.pc_sd[:n_pcs]
            parts.append(pd.DataFrame(pcs, index=idx, columns=[f"emb{i}" for i in range(n_pcs)]))
        return pd.concat(parts, axis=1)


def fit_cox_emb(
    feats,
    emb: pd.DataFrame,
    rows,
    tr,
    va,
    te,
    *,
    expr_pcs: int = 0,
    ties: str = "first",
    pca_idx=None,
    inner_folds: int = 0,
    seed: int = 0,
) -> dict:
    """Ridge Cox on clinical covariates (+ ``expr_pcs`` expression PCs) + the embedding's top PCs; the number of
    embedding PCs (``PCS_GRID``, capped) and the penalty chosen on validation (``cox_select``, validation ties
    broken by ``ties`` as for the Cox baselines). ``feats``: the fold's fitted :class:`SurvivalFeatures`. With
    ``expr_pcs`` the grid's 0 embedding PCs is ``cox_clinical_pcs`` at that fold's choice, so the embedding is only
    taken when validation prefers it. ``pca_idx``: the rows the embedding's standardisation and PCA are fitted on
    (default ``tr``, or ``tr`` + ``va`` with ``inner_folds``; see ``--pca_rows``). ``inner_folds``: settings chosen
    by inner cross-validation on ``tr`` + ``va`` (:func:`fit_cox`)."""
    clinical = has_clinical(rows)
    fit_rows = [*tr, *va] if inner_folds else list(tr)
    efeats = EmbeddingFeatures(feats, emb, expr_pcs=expr_pcs, base_clinical=clinical).fit(fit_rows, pca_idx)
    rec = fit_cox(
        efeats,
        rows,
        tr,
        va,
        te,
        with_pcs=True,
        clinical=clinical or expr_pcs > 0,
        ties=ties,
        inner_folds=inner_folds,
        seed=seed,
    )
    rec["selected"] = {"expr_pcs": int(expr_pcs), **rec["selected"]}
    return rec


def embedding_models(pretrained_dir: str, seed: int) -> dict:
    """``{"pretrained": LoadedModel, "random_init": the same architecture and processors, seeded random init}``
    (``benchmarks/pretraining_diagnostics.py``'s ``load_models``)."""
    pre, rand = _load_diagnostics().load_models(pretrained_dir, seed)
    return {"pretrained": pre, "random_init": rand}


def fold_wise(args) -> bool:
    """``--pretrained_dir`` names one backbone per CV fold (``{fold}`` in the path, e.g. each pretrained on a
    :func:`write_fold_manifests` manifest without that fold's test patients)."""
    return bool(args.pretrained_dir) and "{fold}" in args.pretrained_dir


def fold_backbones(args) -> list[str]:
    """The backbone folder of each fold: ``--pretrained_dir`` itself, or it with ``{fold}`` filled in."""
    return [args.pretrained_dir.replace("{fold}", str(k)) for k in range(args.folds)]


class PerFoldRunner:
    """The pretrained arms' runner with ``--pretrained_dir .../fold{fold}/...``: fold ``k`` finetunes backbone ``k``
    (pretrained without that fold's test patients); :func:`run_bp` asks it for the fold's runner."""

    def __init__(self, runners: list):
        self.runners = list(runners)

    def for_fold(self, k: int):
        return self.runners[k]


def write_fold_manifests(args, cv_manifest, pretrain_manifest: str | Path) -> list[Path]:
    """One pretraining manifest per CV fold, beside ``pretrain_manifest`` (``<stem>_cvfold<k>.parquet``, same
    folder, so its relative file references still resolve): the same rows with a ``split`` column in which
    every patient of that fold's *test* part (of each ``--cohorts`` cohort, :func:`make_folds` with this run's
    ``--folds``, ``--seed``, ``--val_fraction``) is ``test`` and never trained on; the other patients keep the
    hashed validation split pretraining would assign (:func:`bioperceiver.data.assign_splits`) and train otherwise.
    Pretraining one backbone per manifest and passing ``--pretrained_dir .../fold{fold}/final`` removes the
    transductive advantage (the test patients' unlabelled profiles seen in pretraining)."""
    from bioperceiver.data import read_manifest, write_manifest
    from bioperceiver.data.recipes.survset import COHORTS
    from bioperceiver.data.splits import split_of

    src = read_manifest(pretrain_manifest)
    table = src.table
    ids = set(table["sample_id"].astype(str))
    test_sets: list[set[str]] = [set() for _ in range(args.folds)]
    for cohort in args.cohorts:
        spec = COHORTS[cohort]
        rows = cohort_rows(cv_manifest.table, cohort)
        folds = make_folds(rows["patient_id"], rows["label_survival_event"], args.folds, args.seed, args.val_fraction)
        for k, part in enumerate(folds):
            test = set(map(str, part["test"]))
            missing = test - ids
            if missing and spec.role == "development":
                raise ValueError(
                    f"{len(missing)} test rows of {cohort} fold {k} are not in {pretrain_manifest} (e.g. "
                    f"{sorted(missing)[:3]}): build both manifests with the same survset recipe"
                )
            test_sets[k] |= test & ids
    hashed = ["validation" if split_of(str(p)) == "validation" else "train" for p in table["patient_id"]]
    meta = {**src.metadata, "cv_fold_of": str(pretrain_manifest)}
    out = []
    src_path = Path(pretrain_manifest)
    for k, test in enumerate(test_sets):
        fold_table = table.copy()
        is_test = fold_table["sample_id"].astype(str).isin(test).to_numpy()
        fold_table["split"] = np.where(is_test, "test", hashed)
        path = src_path.with_name(f"{src_path.stem}_cvfold{k}{src_path.suffix}")
        write_manifest(fold_table, path, {**meta, "cv_fold": k, "held_out_test_rows": int(is_test.sum())})
        ft.log(f"fold {k}: {path} ({int(is_test.sum())} test rows held out of pretraining, {len(fold_table)} rows)")
        out.append(path)
    return out


def embed_view(loaded, rows: pd.DataFrame, base_dir, train_ids, seed: int) -> tuple[np.ndarray, dict]:
    """The frozen backbone's pooled embedding of the expression view alone (``modality_pooler_output``) of every row
    of ``rows``, in row order, and the vocabulary extension it needed.

    The backbone's processors are extended on the ``train_ids`` rows only (as ``run_finetune`` extends them on the
    training split): genes and per-source z-score statistics a cohort brings that pretraining did not see (the
    external cohorts); added gene embeddings are initialised from ``seed``. Nothing is extended for a cohort the
    processors know."""
    import copy

    import torch

    from bioperceiver.inference.loading import LoadedModel

    proc = copy.deepcopy(loaded.processor)
    ext = proc.processors[EMB_MODALITY].extend(
        rows.loc[list(train_ids), EMB_MODALITY].tolist(), sample_ids=list(train_ids), base_dir=base_dir
    )
    ext = {"added": int(ext["added"]), "overlap": int(ext["overlap"]), "new_sources": list(ext["new_sources"])}
    model = loaded.model
    if ext["added"]:
        model = copy.deepcopy(model)
        torch.manual_seed(seed)
        model.resize_modality_vocabularies(proc.model_modalities())
        model.eval()
    lm = LoadedModel(model, proc, loaded.modalities, None, loaded.folder, dict(loaded.info))
    records = [
        {"sample_id": str(i), "patient_id": str(r["patient_id"]), EMB_MODALITY: r[EMB_MODALITY]}
        for i, r in rows.iterrows()
    ]
    emb = _load_diagnostics().embed(lm, records, base_dir)
    pos = {str(s): j for j, s in enumerate(emb["ids"])}
    missing = [i for i in rows.index if str(i) not in pos]
    if missing:
        raise RuntimeError(f"{len(missing)} rows were not embedded, e.g. {missing[:3]}")
    x = emb[EMB_MODALITY][[pos[str(i)] for i in rows.index]]
    if np.isnan(x).any():
        raise RuntimeError("some rows have no expression embedding")
    return x.astype(np.float32), ext


def cohort_embeddings(
    args,
    manifest,
    rows,
    folds,
    cohort: str,
    out: Path,
    init: str,
    models: list,
    pretrained_dir: str | None = None,
    tag: str = "",
) -> list:
    """Per fold, the ``init`` backbone's expression-view embedding of the cohort's rows (a DataFrame indexed by
    sample id), cached in ``cache/<cohort>/embedding_<init><tag>.npz``. ``models``: per fold ``{init: LoadedModel}``
    (the same dict for every fold, or each fold's own backbone with ``--pretrained_dir`` holding ``{fold}``);
    ``pretrained_dir``: the backbones' folder pattern when they are not ``--pretrained_dir``'s (an
    ``--emb_candidates`` candidate, ``tag`` naming its file). A cohort the processors know is embedded once per
    backbone (the same rows for every fold that shares it); one that needs the vocabulary extended is embedded per
    fold, extended on that fold's training rows only."""
    settings = {
        "cohort": cohort,
        "init": init,
        "modality": EMB_MODALITY,
        "pretrained_dir": str(Path(pretrained_dir or args.pretrained_dir).resolve()),
        "seed": args.seed,
        "folds": args.folds,
        "val_fraction": args.val_fraction,
        # the embeddings depend on the training rows only (vocabulary extension), not on a shrunk validation part
        **{k: v for k, v in data_settings(args).items() if k != "subsample_validation"},
        "rows": hashlib.sha1("\n".join(map(str, rows.index)).encode()).hexdigest()[:12],
        **init_settings(args),
    }
    path = out / "cache" / cohort / f"embedding_{init}{tag}.npz"
    key = _key(settings)
    # this run's cache, then --reuse_cache's (the same key: the same backbones, rows and folds), copied here; a
    # candidate's embedding may be another run's --pretrained_dir embedding (the name without the tag)
    names = dict.fromkeys((path.name, f"embedding_{init}.npz"))
    elsewhere = [Path(d) / "cache" / cohort / n for d in getattr(args, "reuse_cache", ()) for n in names]
    for found in (path, *elsewhere):
        if not found.is_file():
            continue
        with np.load(found, allow_pickle=False) as z:
            if str(z["key"]) != key:
                continue
            ids = [str(i) for i in z["ids"]]
            arrays = {f"fold{k}": z[f"fold{k}"] for k in range(len(folds))}
        if found != path:
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(found, path)
            if found.with_suffix(".json").is_file():
                shutil.copyfile(found.with_suffix(".json"), path.with_suffix(".json"))
        ft.log(f"{cohort}: {init} expression embeddings read back from {found}")
        return [pd.DataFrame(arrays[f"fold{k}"], index=ids) for k in range(len(folds))]
    t0 = time.perf_counter()
    arrays, shared, extensions = {}, None, []
    for k, part in enumerate(folds):
        if shared is not None and models[k] is models[0]:
            arrays[f"fold{k}"] = shared
            extensions.append(extensions[-1])
            continue
        x, ext = embed_view(models[k][init], rows, manifest.base_dir, part["train"], args.init_seed)
        arrays[f"fold{k}"] = x
        extensions.append(ext)
        if not ext["added"] and not ext["new_sources"]:
            shared = x  # nothing fitted on this fold's rows: the same embedding serves every fold of this backbone
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, key=np.array(key), ids=np.array([str(i) for i in rows.index]), **arrays)
    os.replace(tmp, path)
    (path.with_suffix(".json")).write_text(
        json.dumps({"key": key, "settings": settings, "extension_per_fold": extensions, "shape": x.shape}, indent=1)
    )
    ft.log(
        f"{cohort}: {init} expression embeddings {x.shape} computed in {time.perf_counter() - t0:.1f} s "
        + (
            "(per fold: one backbone per fold)"
            if fold_wise(args)
            else "(once: processors know the cohort)"
            if shared is not None
            else "(per fold: vocabulary extended)"
        )
    )
    return [pd.DataFrame(arrays[f"fold{k}"], index=[str(i) for i in rows.index]) for k in range(len(folds))]


def emb_candidates(args) -> dict[str, str]:
    """``--emb_candidates LABEL=DIR ...`` as ``{label: resolved folder pattern}``, in the order given."""
    out = {}
    for item in getattr(args, "emb_candidates", None) or ():
        label, sep, folder = item.partition("=")
        if sep and label and not re.fullmatch(r"[A-Za-z0-9._-]+", label):
            raise SystemExit(f"--emb_candidates {item!r}: a label is letters, digits, '.', '_' or '-' (a file name)")
        if not sep or not label or not folder:
            raise SystemExit(
                f"--emb_candidates {item!r}: expected LABEL=DIR (e.g. 800=/runs/steps800/fold{{fold}}/final)"
            )
        if label in out:
            raise SystemExit(f"--emb_candidates: the label {label!r} is given twice")
        out[label] = str(Path(folder).resolve())
    return out


def select_candidate(records: dict[str, dict]) -> dict:
    """``CANDIDATE_ARM``'s record of one fold from its candidates' ``cox_clinical_emb_pretrained`` records
    (``{label: record}`` in the order given): the one with the highest ``validation`` (the inner-CV pooled
    out-of-fold C-index under ``--selection inner_cv``; the candidate's own choice of embedding PCs and penalty
    stands), ties (equal to the metric's tolerance) to the first; a NaN score never wins. Only validation scores
    are read to choose."""
    from bioperceiver.training.tasks import tied as same_metric

    def score(label: str) -> float:
        value = float(records[label]["validation"])
        return value if math.isfinite(value) else -math.inf

    best = None
    for label, rec in records.items():
        if "validation" not in rec:
            raise ValueError(f"candidate {label!r} has no validation score: {rec.get('skipped', rec)}")
        if best is None or (score(label) > score(best) and not same_metric(score(label), score(best))):
            best = label
    kept = records[best]
    out = {k: v for k, v in kept.items() if k not in ("selected", "wall_s", "key", "settings")}
    out["selected"] = {"backbone": best, **kept.get("selected", {})}
    out["candidates_validation"] = {label: rec["validation"] for label, rec in records.items()}
    return out


# ---------------------------------------------------------------------------------------------------------------
# paired bootstrap over folds
# ---------------------------------------------------------------------------------------------------------------
def bootstrap_c_index(fold_data: list[dict], n_boot: int, seed: int) -> np.ndarray:
    """C-index per resample and model, averaged over folds: ``(n_boot, n_models)``.

    ``fold_data``: per fold ``{"time", "event", "patients", "risks": (n_models, n)}``; every resample redraws each
    fold's test patients with replacement, the same draw for every model (paired)."""
    from bioperceiver.evaluation.bootstrap import Resampler
    from bioperceiver.evaluation.metrics import concordance_counts

    per_fold = []
    for k, f in enumerate(fold_data):
        w = next(Resampler(len(f["time"]), n_boot, seed=seed + k, groups=f["patients"]).weights(chunk=n_boot))
        cols = []
        for risk in f["risks"]:
            conc, tied, pairs = concordance_counts(
                np.asarray(f["time"], float), np.asarray(risk, float), np.asarray(f["event"], bool), w
            )
            with np.errstate(invalid="ignore", divide="ignore"):
                cols.append((conc + 0.5 * tied) / pairs)
        per_fold.append(np.stack(cols, axis=1))
    return np.nanmean(np.stack(per_fold), axis=0)


def paired_difference(fold_data: list[dict], n_boot: int, seed: int) -> dict:
    """Mean over folds of C-index(model 0) - C-index(model 1) on the same test patients, with a 95% percentile CI
    from the paired patient bootstrap."""
    from bioperceiver.evaluation import concordance_index

    point = np.mean(
        [
            concordance_index(f["time"], r[0], f["event"]) - concordance_index(f["time"], r[1], f["event"])
            for f in fold_data
            for r in [f["risks"]]
        ]
    )
    boot = bootstrap_c_index(fold_data, n_boot, seed)
    replicates = boot[:, 0] - boot[:, 1]
    d = replicates[~np.isnan(replicates)]
    return {
        "difference": float(point),
        "ci95": [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))],
        "p_boot_le_0": float(np.mean(d <= 0)),
        "n_bootstrap": len(d),
        "_replicates": replicates,  # for pooled_differences; not written to the JSON
    }


def pooled_differences(cohorts: dict, role: str = "development") -> dict:
    """Each paired difference averaged over the ``role`` cohorts that have it, every cohort weighted equally (a
    cohort's C-index is computed within the cohort: no pairs across cohorts or time units), with a 95% percentile
    interval from the per-cohort bootstrap replicates averaged replicate by replicate (cohorts are resampled
    independently). Differences against the best baseline are pooled by role (``"- best baseline"``) whichever
    classical model each cohort's validation chose. ``above_zero``: cohorts whose mean difference is > 0."""
    groups: dict[str, list[tuple[str, dict]]] = {}
    for name, r in cohorts.items():
        if r["role"] != role:
            continue
        for d in r["paired_differences"].values():
            groups.setdefault(" - ".join(d["pair"]), []).append((name, d))
    out = {}
    for key, items in groups.items():
        reps = np.stack([d["_replicates"] for _, d in items])  # (cohorts, n_boot)
        ok = ~np.isnan(reps).any(axis=0)
        pooled = reps[:, ok].mean(axis=0)
        out[key] = {
            "difference": float(np.mean([d["difference"] for _, d in items])),
            "ci95": [float(np.percentile(pooled, 2.5)), float(np.percentile(pooled, 97.5))],
            "cohorts": [c for c, _ in items],
            "above_zero": sum(d["difference"] > 0 for _, d in items),
            "n_bootstrap": int(ok.sum()),
        }
    return out


def write_replicates(res: dict, path: Path) -> Path:
    """Every paired difference's bootstrap replicates (``names``: ``"<cohort>\t<difference>"``, ``replicates``:
    ``(n, n_bootstrap)``; NaN where a resample had no comparable pair), for ``benchmarks/seed_spread.py``: runs with
    the same ``--seed`` and folds redraw the same test patients in replicate ``b``, so replicates pair across runs."""
    names, reps = [], []
    for cohort, r in res["cohorts"].items():
        for key, d in r["paired_differences"].items():
            names.append(f"{cohort}\t{key}")
            reps.append(np.asarray(d["_replicates"], float))
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, names=np.array(names, dtype=str), replicates=np.stack(reps) if reps else np.zeros((0, 0)))
    os.replace(tmp, path)
    return path


def _without_replicates(res: dict) -> dict:
    """``res`` with the bootstrap replicates left out (the JSON keeps the intervals, not the draws)."""
    out = {**res, "cohorts": {}}
    for name, r in res["cohorts"].items():
        diffs = {k: {a: b for a, b in d.items() if a != "_replicates"} for k, d in r["paired_differences"].items()}
        out["cohorts"][name] = {**r, "paired_differences": diffs}
    return out


# ---------------------------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------------------------
def _key(settings: dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cached(path: Path, settings: dict) -> dict | None:
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return rec if rec.get("key") == _key(settings) else None


def find_cached(own: Path, settings: dict, elsewhere=()) -> dict | None:
    """``settings``' result at ``own``, else at the first of ``elsewhere`` that holds it (same cache key), copied to
    ``own`` so the folder stays self-contained."""
    rec = cached(own, settings)
    if rec is None:
        rec = next((r for q in elsewhere if (r := cached(Path(q), settings)) is not None), None)
        if rec is not None:
            rec = store(own, settings, rec)
    return rec


def store(path: Path, settings: dict, rec: dict) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {**rec, "key": _key(settings), "settings": settings}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(rec, default=ft._json_default))
    os.replace(tmp, path)
    return rec


# ---------------------------------------------------------------------------------------------------------------
# one cohort
# ---------------------------------------------------------------------------------------------------------------
def bp_config(args, model: str, modalities=tuple(MODALITIES)) -> dict:
    """The finetuning setting of a trained BioPerceiver arm (part of its cache key: unchanged for the full arms).
    ``--bp_modality_dropout`` enters only where it can act: full finetuning of a cohort with more than one modality
    (the collator never hides a sample's last modality, so a one-modality run is the same run without it).
    ``--bp_head_linear`` (a linear term on those modalities beside the head) enters only where the arm sees one of
    them."""
    arm = BP_ARMS[model]
    if arm["mode"] == "full":
        lr, epochs = args.bp_lr, args.bp_epochs
    else:
        lr, epochs = args.probe_lr, args.probe_epochs
    cfg = {"pretrained": arm["pretrained"], "mode": arm["mode"], "lr": lr, "epochs": 2 if args.quick else epochs}
    if arm["mode"] == "full" and getattr(args, "bp_modality_dropout", 0.0) > 0 and len(modalities) > 1:
        cfg["modality_dropout"] = args.bp_modality_dropout
    if linear := [m for m in getattr(args, "bp_head_linear", None) or () if m in modalities]:
        cfg["head_linear"] = linear
        if len(linear) > 1 and getattr(args, "bp_head_linear_per_modality", False):
            cfg["head_linear_per_modality"] = True
    if arm["mode"] == "full" and getattr(args, "bp_keep_last", False):
        cfg["keep_last"] = True
    elif arm["mode"] == "full" and getattr(args, "bp_best_model_ties", "first") != "first":
        cfg["best_model_ties"] = args.bp_best_model_ties
    if not arm["pretrained"] and getattr(args, "random_processor_settings", None):  # the pretrained arm: its own
        cfg["processor_settings"] = str(Path(args.random_processor_settings).resolve())
    return cfg


def bp_lrs(args, model: str) -> list[float]:
    """The learning rates a trained BioPerceiver arm is finetuned at: ``--bp_lrs`` for the full-finetuning arms
    (the run with the best validation C-index is kept), otherwise the arm's single rate."""
    if BP_ARMS[model]["mode"] == "full" and getattr(args, "bp_lrs", None):
        return list(args.bp_lrs)
    return [bp_config(args, model)["lr"]]


def lr_grid_record(
    settings: dict, lrs: list[float], cache_dir: Path, fit, origin: list | None = None, reuse=()
) -> dict:
    """One (fold, arm) finetuned at every rate of ``lrs``; the run with the highest *validation* C-index is kept
    (ties and NaN: the earlier rate in ``lrs``), test never looked at. Each rate's run is cached on its own,
    ``<model>_lr<lr>.json`` with the cache key a single-rate run at that rate has, so a result cached by an
    earlier single-rate run (``<model>.json``, same key; also in the ``reuse`` cache folders, the same relative
    path) is read back (and copied to its own name) instead of refitted. ``fit(lr)`` trains one
    run and returns its record. The returned record carries ``lr`` (the rate kept) and every rate's validation
    C-index under ``selected``."""
    model = settings["model"]
    tried = []
    for lr in lrs:
        s = {**settings, "lr": lr}
        own = cache_dir / f"{model}_lr{lr:g}.json"
        rel = Path(*cache_dir.parts[-2:])  # <cohort>/fold<k>
        # every rate's run under its own name (benchmarks/seed_spread.py reads them)
        names = (own.name, f"{model}.json")
        rec = find_cached(own, s, [d / n for d in (cache_dir, *(Path(r) / rel for r in reuse)) for n in names])
        if origin is not None:
            origin.append(("cached" if rec is not None else "ran", f"f{settings['fold']}:{model}@{lr:g}"))
        if rec is None:
            t0 = time.perf_counter()
            rec = fit(lr)
            rec["wall_s"] = round(time.perf_counter() - t0, 1)
            rec = store(own, s, rec)
        tried.append((lr, rec))
    if skipped := [r for _, r in tried if "test" not in r]:
        return {"skipped": skipped[0].get("skipped", "a learning rate's run did not finish")}

    def score(i: int) -> tuple[float, int]:
        v = float(tried[i][1]["validation"])
        return (v if np.isfinite(v) else -np.inf, -i)

    lr, best = tried[max(range(len(tried)), key=score)]
    out = {
        "validation": best["validation"],
        "test": best["test"],
        "risk_test": best["risk_test"],
        "epochs": best.get("epochs"),
        "lr": lr,
        "selected": {"lr": lr, "validation": {f"{c:g}": r["validation"] for c, r in tried}},
        "wall_s": float(sum(r.get("wall_s", 0) for _, r in tried)),
    }
    if "term_alone_test" in best:  # the kept run's pre-fitted linear term alone (reported only)
        out["term_alone_test"] = best["term_alone_test"]
    if "best_checkpoint" in best:  # the kept run's kept epoch; records cached before it was kept: the run's rule
        out["best_checkpoint"] = {"ties": settings.get("best_model_ties", "first"), **best["best_checkpoint"]}
    return out


def select_by_validation(full: list[dict], probe: list[dict], names: tuple[str, str]) -> list[dict]:
    """Per fold, the record (full or probe) with the higher *validation* C-index (ties: full); test is never looked
    at. Each returned record carries ``picked`` (the arm's name) and both validation C-indices."""
    out = []
    for rf, rp in zip(full, probe, strict=True):
        if "test" not in rf or "test" not in rp:
            out.append({"skipped": "a constituent arm did not run"})
            continue
        pick, rec = (names[1], rp) if rp["validation"] > rf["validation"] else (names[0], rf)
        out.append(
            {
                "validation": rec["validation"],
                "test": rec["test"],
                "risk_test": rec["risk_test"],
                "picked": pick,
                "selected": {"picked": pick, "validation": {names[0]: rf["validation"], names[1]: rp["validation"]}},
                "wall_s": 0.0,
            }
        )
    return out


def fold_record(rows: pd.DataFrame, part: dict[str, np.ndarray], k: int) -> dict:
    """What a fold's report records about its parts: rows, events and patients per part, the pairs its validation
    C-index ranks (every selection is made on them; few pairs mean many ties) and the test rows' ids."""
    va = part["validation"]
    return {
        "fold": k,
        "n": {s: len(part[s]) for s in part},
        "events": {s: int(rows.loc[part[s], "label_survival_event"].sum()) for s in part},
        "patients": {s: int(rows.loc[part[s], "patient_id"].nunique()) for s in part},
        "validation_pairs": ranked_pairs(rows.loc[va, "label_survival_time"], rows.loc[va, "label_survival_event"]),
        "test_ids": list(part["test"]),
    }


def run_cohort(args, manifest, cohort: str, runners: dict, out: Path) -> dict:
    from bioperceiver.data.recipes.survset import COHORTS

    spec = COHORTS[cohort]
    rows = cohort_rows(manifest.table, cohort)
    folds = make_folds(rows["patient_id"], rows["label_survival_event"], args.folds, args.seed, args.val_fraction)
    folds = subsample_train(
        folds,
        rows["patient_id"],
        rows["label_survival_event"],
        args.train_fraction,
        args.seed,
        validation=subsample_validation(args),
        times=rows["label_survival_time"].astype(float),
    )
    n_run = 2 if args.quick else len(folds)
    feats = ft.SurvivalFeatures(manifest.base_dir, rows, n_genes=args.n_genes)
    emb_arms = [a for a in (*EMB_ARMS, CANDIDATE_ARM) if a in getattr(args, "bp_arms", ())]
    models = [*BASELINES, *runners, *emb_arms]
    settings_of: dict[str, dict] = {}  # the fold's settings per model (a candidate's: cox_clinical_emb_pretrained's)
    candidates = emb_candidates(args) if CANDIDATE_ARM in emb_arms else {}  # parsed once, not per fold
    embeddings: dict[str, list] = {}  # init -> per-fold embedding, computed or read back on first use
    cox_ties = getattr(args, "baseline_ties", "first")  # how the Cox models break validation ties
    pca_rows = getattr(args, "pca_rows", "train")  # the rows the PCAs (no labels) are fitted on
    n_inner = inner_cv_folds(args)  # 0: settings chosen on the validation part
    results: dict[str, list[dict]] = {m: [] for m in models}
    fold_meta = []
    origin: dict[str, list[str]] = {"cached": [], "ran": []}  # (fold, model) read back from cache vs fitted now
    bar = tqdm(total=n_run * len(models), desc=cohort, leave=False)
    for k, part in enumerate(folds[:n_run]):
        tr, va, te = part["train"], part["validation"], part["test"]
        fold_meta.append(fold_record(rows, part, k))
        pca_idx = non_test_rows(rows, te) if pca_rows == "non_test" else None
        fitted = False
        for model in models:
            if model == CANDIDATE_ARM:
                recs = {}
                fold = SimpleNamespace(
                    k=k, pca_idx=pca_idx, fitted=fitted, settings=settings_of, results=results, embeddings=embeddings
                )
                for label, folder in candidates.items():
                    where, recs[label] = candidate_record(
                        args, manifest, rows, folds, cohort, out, feats, fold, label, folder, cox_ties
                    )
                    fitted = fold.fitted
                    if where:  # not the candidate that is --pretrained_dir: its record is counted as its arm's
                        origin[where].append(f"f{k}:{CANDIDATE_ARM}[{label}]")
                results[model].append(select_candidate(recs))
                bar.update(1)
                continue
            settings = {
                "cohort": cohort,
                "fold": k,
                "folds": args.folds,
                "seed": args.seed,
                "val_fraction": args.val_fraction,
                "model": model,
                "n_genes": args.n_genes,
                "quick": args.quick,
                **data_settings(args),
            }
            if model.startswith("bp_"):
                settings.update(
                    bp_config(args, model, bp_modalities(args, rows)), preset=args.random_preset, **init_settings(args)
                )
                if args.bp_modalities:  # only when restricted: the cache keys of earlier runs stay valid
                    settings["modalities"] = list(args.bp_modalities)
                if BP_ARMS[model]["pretrained"]:
                    settings["pretrained_dir"] = str(Path(args.pretrained_dir).resolve())
            elif model == "rsf":
                settings["grid"] = RSF_GRID
            elif model in EMB_ARMS:
                arm = EMB_ARMS[model]
                pcs_rec = results["cox_clinical_pcs"][k]
                expr_pcs = int(pcs_rec["selected"]["n_pcs"]) if arm["expr_pcs"] and "selected" in pcs_rec else 0
                settings.update(
                    grid={"n_pcs": PCS_GRID, "penalizer": PEN_GRID},
                    init=arm["init"],
                    embedding=EMB_MODALITY,
                    expr_pcs=expr_pcs,
                    pretrained_dir=str(Path(args.pretrained_dir).resolve()),
                    **init_settings(args),
                )
            else:
                settings["grid"] = {"n_pcs": PCS_GRID, "penalizer": PEN_GRID}
            if model in COX_MODELS and cox_ties != "first":
                settings["ties"] = cox_ties  # only then: the cache keys of earlier runs stay valid
            if model not in ("cox_clinical", *BP_ARMS) and pca_rows != "train":
                settings["pca_rows"] = pca_rows  # likewise; cox_clinical and the trained arms fit no PCA
            if n_inner and model not in BP_ARMS:
                settings["selection"] = {"inner_cv": n_inner}  # likewise; the trained arms keep the validation part
            bp_inner = bp_inner_cv_folds(args, model)
            if bp_inner:  # --bp_selection inner_cv: its own cache key (the rates are part of it)
                settings["selection"] = {"inner_cv": bp_inner, "lrs": bp_lrs(args, model)}
            settings_of[model] = settings
            path = out / "cache" / cohort / f"fold{k}" / f"{model}.json"
            if bp_inner:
                path = path.with_name(f"{model}_innercv.json")
                rel = path.relative_to(out / "cache")
                rec = find_cached(path, settings, [Path(d) / "cache" / rel for d in args.reuse_cache])
                origin["cached" if rec is not None else "ran"].append(f"f{k}:{model}")
                if rec is None:
                    t0 = time.perf_counter()
                    rec = bp_inner_cv(args, manifest, rows, part, runners[model], cohort, k, model, bp_inner)
                    rec["wall_s"] = round(time.perf_counter() - t0, 1)
                    rec = store(path, settings, rec)
            elif model in BP_ARMS and len(lrs := bp_lrs(args, model)) > 1:
                grid_origin: list[tuple[str, str]] = []
                rec = lr_grid_record(
                    settings,
                    lrs,
                    path.parent,
                    lambda lr, model=model, part=part, k=k: run_bp(
                        args, manifest, rows, part, runners[model], cohort, k, model, lr=lr
                    ),
                    grid_origin,
                    [Path(d) / "cache" for d in args.reuse_cache],
                )
                for where, what in grid_origin:
                    origin[where].append(what)
            else:
                rel = path.relative_to(out / "cache")
                rec = find_cached(path, settings, [Path(d) / "cache" / rel for d in args.reuse_cache])
                origin["cached" if rec is not None else "ran"].append(f"f{k}:{model}")
            if rec is None:
                t0 = time.perf_counter()
                if model.startswith("bp_"):
                    rec = run_bp(args, manifest, rows, part, runners[model], cohort, k, model)
                else:
                    if not fitted:
                        feats.fit([*tr, *va] if n_inner else list(tr), pca_idx)  # the rows it is fitted on
                        fitted = True
                    if model in EMB_ARMS:
                        init = EMB_ARMS[model]["init"]
                        if init not in embeddings:
                            embeddings[init] = cohort_embeddings(
                                args, manifest, rows, folds, cohort, out, init, args.embedding_models
                            )
                        emb = embeddings[init][k]
                        rec = fit_cox_emb(
                            feats,
                            emb,
                            rows,
                            tr,
                            va,
                            te,
                            expr_pcs=settings["expr_pcs"],
                            ties=cox_ties,
                            pca_idx=pca_idx,
                            inner_folds=n_inner,
                            seed=inner_seed(args, k),
                        )
                    elif model == "rsf":
                        rec = fit_rsf(
                            feats, rows, tr, va, te, seed=args.seed, inner_folds=n_inner, inner_seed=inner_seed(args, k)
                        )
                    else:
                        rec = fit_cox(
                            feats,
                            rows,
                            tr,
                            va,
                            te,
                            with_pcs=model == "cox_clinical_pcs",
                            ties=cox_ties,
                            inner_folds=n_inner,
                            seed=inner_seed(args, k),
                        )
                rec["wall_s"] = round(time.perf_counter() - t0, 1)
                rec = store(path, settings, rec)
            results[model].append(rec)
            bar.update(1)
            if "test" in rec:
                bar.set_postfix_str(f"fold {k} {model} {rec['test']:.3f}")
    bar.close()
    ft.log(
        f"{cohort}: {len(origin['cached'])} (fold, model) results read back from cache, {len(origin['ran'])} fitted now"
        + (f" ({', '.join(origin['ran'])})" if origin["ran"] else "")
    )
    for name, (full, probe) in SELECTED_ARMS.items():
        if name in getattr(args, "bp_arms", ()) and full in results and probe in results:
            results[name] = select_by_validation(results[full], results[probe], (full, probe))
    summary = summarise(args, cohort, spec.role, rows, fold_meta, results)
    summary["from_cache"] = origin
    return summary


def candidate_record(
    args, manifest, rows, folds, cohort: str, out: Path, feats, fold, label: str, folder: str, cox_ties: str
) -> tuple[str, dict]:
    """One ``--emb_candidates`` candidate's ``cox_clinical_emb_pretrained`` record for fold ``fold.k`` (this run's
    own when the candidate is ``--pretrained_dir``; else read back under the same settings with the candidate's
    folder, from this run's cache or ``--reuse_cache``'s -- another run's ``cox_clinical_emb_pretrained`` of that
    backbone -- or fitted here): ``("cached" or "ran" or "" for --pretrained_dir's own, record)``. ``fold``: the
    fold's state in ``run_cohort`` (``k``, ``pca_idx``, ``settings`` and ``results`` per model, ``embeddings``, and
    ``fitted``: whether ``feats`` is fitted on the fold, set here when this fits it)."""
    k, n_inner = fold.k, inner_cv_folds(args)
    base = fold.settings["cox_clinical_emb_pretrained"]
    if folder == base["pretrained_dir"]:
        return "", fold.results["cox_clinical_emb_pretrained"][k]
    settings = {**base, "pretrained_dir": folder}
    tr, va, te = (folds[k][s] for s in ("train", "validation", "test"))
    path = out / "cache" / cohort / f"fold{k}" / f"cox_clinical_emb_pretrained@{label}.json"
    names = dict.fromkeys((path.name, "cox_clinical_emb_pretrained.json"))
    rec = find_cached(
        path, settings, [Path(d) / "cache" / cohort / f"fold{k}" / n for d in args.reuse_cache for n in names]
    )
    if rec is not None:
        return "cached", rec
    t0 = time.perf_counter()
    if not fold.fitted:
        feats.fit([*tr, *va] if n_inner else list(tr), fold.pca_idx)
        fold.fitted = True
    if ("pretrained", label) not in fold.embeddings:
        models = args.candidate_models.setdefault(label, [])
        if not models:
            loaded = {
                f: embedding_models(f, args.init_seed)
                for f in sorted({folder.replace("{fold}", str(j)) for j in range(args.folds)})
            }
            models += [loaded[folder.replace("{fold}", str(j))] for j in range(args.folds)]
        fold.embeddings["pretrained", label] = cohort_embeddings(
            args, manifest, rows, folds, cohort, out, "pretrained", models, pretrained_dir=folder, tag=f"@{label}"
        )
    rec = fit_cox_emb(
        feats,
        fold.embeddings["pretrained", label][k],
        rows,
        tr,
        va,
        te,
        expr_pcs=settings["expr_pcs"],
        ties=cox_ties,
        pca_idx=fold.pca_idx,
        inner_folds=n_inner,
        seed=inner_seed(args, k),
    )
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    return "ran", store(path, settings, rec)


def bp_modalities(args, rows: pd.DataFrame) -> list[str]:
    """The modalities the trained BioPerceiver arms see in a cohort: expression, and the clinical covariates where
    the cohort has them; ``--bp_modalities`` keeps only those listed (an ablation)."""
    present = [m for m in MODALITIES if m != "tabular_clinical" or has_clinical(rows)]
    return [m for m in present if not args.bp_modalities or m in args.bp_modalities]


def bp_inner_cv_folds(args, model: str) -> int:
    """Inner folds of ``--bp_selection inner_cv`` for a full-finetuning trained arm (0: the validation part)."""
    if getattr(args, "bp_selection", "validation") != "inner_cv" or model not in BP_ARMS:
        return 0
    return int(args.inner_folds) if BP_ARMS[model]["mode"] == "full" else 0


def inner_cv_curve(histories: list[list[dict]], events: list[int]) -> np.ndarray:
    """The held-out Cox loss per epoch over the inner folds: each fold's ``eval_loss`` (the mean negative log
    partial likelihood per event of its held-out patients) weighted by the fold's events, i.e. their partial
    likelihoods summed over folds and divided by all the events. Folds without an event have no partial likelihood
    and carry no weight. ``histories``: each inner run's ``log_history``."""
    per_fold = [[h["eval_loss"] for h in hist if "eval_loss" in h] for hist in histories]
    n = min(len(c) for c in per_fold)
    curves, weights = np.array([c[:n] for c in per_fold], float), np.asarray(events, float)
    usable = (weights > 0)[:, None] & np.isfinite(curves)
    total = np.where(usable, curves * weights[:, None], 0.0).sum(0)
    return total / np.where(usable, weights[:, None], 0.0).sum(0)


def bp_inner_cv(args, manifest, rows, part, runner, cohort: str, k: int, model: str, n_folds: int) -> dict:
    """``--bp_selection inner_cv``: fold ``k``'s learning rate and epoch count chosen by ``n_folds`` inner folds of
    every labelled patient (training + validation; :func:`finetune_tasks.inner_folds`, the Cox models' split of the
    same fold), then one run refitted on all of them and scored once on test.

    Each rate of ``--bp_lrs`` trains on every inner fold's rest for the arm's epochs, evaluated on the held-out
    inner fold every epoch, keeping its last epoch (no checkpoint selection); the (rate, epoch) whose held-out Cox loss
    over the inner folds (:func:`inner_cv_curve`) is lowest wins (ties: the earlier epoch, then the earlier rate), as
    ``xgb.cv`` chooses a number of rounds. The refit trains that many epochs (its cosine schedule spans them) on
    training + validation without evaluation. The inner runs' test predictions are never read. The record's
    ``validation`` is the chosen setting's mean inner C-index (reported, never used)."""
    pool = np.concatenate([np.asarray(part["train"]), np.asarray(part["validation"])])
    held = ft.inner_folds(rows, pool, n_folds, inner_seed(args, k))
    events = [int(rows.loc[h, "label_survival_event"].astype(int).sum()) for h in held]
    curves, c_index = {}, {}
    for lr in bp_lrs(args, model):
        histories = []
        for j, h in enumerate(held):
            inner = {"train": np.setdiff1d(pool, h), "validation": np.asarray(h), "test": np.asarray(part["test"])}
            r = run_bp(
                args,
                manifest,
                rows,
                inner,
                runner,
                cohort,
                k,
                model,
                lr=lr,
                suffix=f"_inner{j}of{len(held)}",
                cfg_update={"keep_last": True},
                more=("--save_strategy", "no"),
            )
            histories.append(json.loads((Path(r["run_dir"]) / "trainer_state.json").read_text())["log_history"])
        curves[lr] = inner_cv_curve(histories, events)
        c_index[lr] = np.nanmean(
            [[h["eval_c_index"] for h in hist if "eval_c_index" in h][: len(curves[lr])] for hist in histories], 0
        )
    order = [(lr, e) for lr in curves for e in range(len(curves[lr]))]  # ties: the earlier epoch, the earlier rate
    finite = [(lr, e) for lr, e in order if np.isfinite(curves[lr][e])]
    if not finite:
        return {"skipped": f"{cohort} fold {k}: no inner fold had an event to score"}
    lr, e = min(finite, key=lambda le: (curves[le[0]][le[1]], le[1], list(curves).index(le[0])))
    refit = run_bp(
        args,
        manifest,
        rows,
        {"train": pool, "validation": np.array([], dtype=pool.dtype), "test": np.asarray(part["test"])},
        runner,
        cohort,
        k,
        model,
        lr=lr,
        suffix="_refit",
        cfg_update={"keep_last": True, "epochs": e + 1},
        more=("--eval_strategy", "no", "--save_strategy", "no"),
    )
    return {
        "validation": float(c_index[lr][e]),
        "test": refit["test"],
        "risk_test": refit["risk_test"],
        "epochs": e + 1,
        "lr": lr,
        "selected": {"lr": lr, "epochs": e + 1, "inner_folds": len(held), "inner_events": events},
        "inner_cv_loss": {f"{lr:g}": [round(float(x), 6) for x in c] for lr, c in curves.items()},
    }


def run_bp(
    args,
    manifest,
    rows,
    part,
    runner,
    cohort: str,
    k: int,
    model: str,
    lr: float | None = None,
    *,
    suffix: str = "",
    cfg_update: dict | None = None,
    more: tuple[str, ...] = (),
) -> dict:
    """One finetuning run of a trained BioPerceiver arm on fold ``k``; ``lr`` overrides the arm's rate (a
    ``--bp_lrs`` grid point, whose run folder is tagged with it). ``suffix`` tags the run folder further,
    ``cfg_update`` changes the finetuning setting and ``more`` adds run_finetune arguments (the inner-CV runs of
    :func:`bp_inner_cv`). The record carries ``run_dir``, the run's output folder."""
    modalities = bp_modalities(args, rows)
    if not modalities:
        return {"skipped": f"{cohort} has none of --bp_modalities {args.bp_modalities}"}
    used = rows.index.isin(np.concatenate([np.asarray(part[s]) for s in ("train", "validation", "test")]))
    rows = rows[used]  # rows --train_fraction leaves out are not in the manifest (they would count as training)
    split = pd.Series("train", index=rows.index)
    split.loc[part["validation"]] = "validation"
    split.loc[part["test"]] = "test"
    cols = [*MODALITIES, "label_survival_time", "label_survival_event"]
    path = manifest.base_dir / f"cv_{cohort}_fold{k}.parquet"
    ft.write_split_manifest(manifest, rows, split, cols, path)
    extra = [] if BP_ARMS[model]["pretrained"] else ["--preset", args.random_preset]
    cfg = {**bp_config(args, model, modalities), **(cfg_update or {})}
    if "head_linear" in cfg:
        extra += ["--head_linear_modalities", *cfg["head_linear"]]
    if cfg.get("head_linear_per_modality"):
        extra += ["--head_linear_l2_per_modality", "true"]
    if "processor_settings" in cfg:
        extra += ["--processor_settings", cfg["processor_settings"]]
    tag = f"{cohort}_f{k}_{model}" + (f"_lr{lr:g}" if lr is not None else "")
    tag += f"_mdrop{cfg['modality_dropout']:g}" if "modality_dropout" in cfg else ""
    if "head_linear" in cfg:  # the clinical-only term keeps its first runs' folder names
        tag += "_wide" if cfg["head_linear"] == ["tabular_clinical"] else "_wide_" + "_".join(cfg["head_linear"])
        tag += "_pm" if cfg.get("head_linear_per_modality") else ""
    tag += f"_{Path(cfg['processor_settings']).stem}" if "processor_settings" in cfg else ""
    tag += "_last" if cfg.get("keep_last") else ""
    tag += f"_ties{cfg['best_model_ties']}" if "best_model_ties" in cfg else ""
    tag += "".join(f"_{m}" for m in args.bp_modalities or ())
    tag += f"_tf{args.train_fraction:g}" if data_settings(args) else ""
    tag += "_val" if subsample_validation(args) else ""
    if isinstance(runner, PerFoldRunner):
        runner = runner.for_fold(k)
    tag += (f"_init{args.init_seed}" if init_settings(args) else "") + suffix
    r = runner.run(
        tag,
        path,
        ["--task", "survival"],
        cfg if lr is None else {**cfg, "lr": lr},
        seed=args.init_seed,
        modalities=modalities,
        extra=[*extra, *more],
    )
    pred = r["pred"].set_index("sample_id")
    risk = pred.loc[[str(i) for i in part["test"]], "risk"].to_numpy(float)
    out = {"validation": r["validation"], "test": r["test"], "risk_test": risk.tolist(), "epochs": r["epochs"]}
    if getattr(runner, "args", None) is not None and hasattr(runner.args, "work_dir"):
        out["run_dir"] = str(Path(runner.args.work_dir) / "runs" / tag)
    if kept := r.get("best_checkpoint"):  # the epoch --load_best_model_at_end kept, its ties and the tie rule
        out["best_checkpoint"] = {k: kept[k] for k in ("epoch", "evaluations", "tied_evaluations")}
        out["best_checkpoint"]["ties"] = kept.get("ties", "first")  # records before --best_model_ties: transformers'
    if (alone := (r.get("linear_term") or {}).get("term_alone", {}).get("test")) is not None:
        out["term_alone_test"] = alone  # the pre-fitted linear term alone: reported, never selected on
    return out


def summarise(args, cohort: str, role: str, rows, fold_meta: list[dict], results: dict) -> dict:
    t, e = rows["label_survival_time"].astype(float), rows["label_survival_event"].astype(int)
    models = {}
    for m, recs in results.items():
        if any("test" not in r for r in recs):
            models[m] = {"skipped": recs[0].get("skipped", "not run")}
            continue
        test = np.array([r["test"] for r in recs], float)
        val = np.array([r["validation"] for r in recs], float)
        models[m] = {
            "test": ft._ms(test),
            "validation": ft._ms(val),
            "selected": [r.get("selected") for r in recs],
            "wall_s": float(sum(r.get("wall_s", 0) for r in recs)),
        }
        if m in SELECTED_ARMS:
            models[m]["picked"] = [r["picked"] for r in recs]
        if m == CANDIDATE_ARM:  # per fold, every candidate's validation score: how close the choice was
            models[m]["candidates_validation"] = [r["candidates_validation"] for r in recs]
        if all("lr" in r for r in recs):  # a --bp_lrs grid: the rate kept per fold
            models[m]["lr"] = [r["lr"] for r in recs]
        if any("best_checkpoint" in r for r in recs):  # per fold, the epoch the selected run kept (None: no record)
            models[m]["best_checkpoint"] = [r.get("best_checkpoint") for r in recs]
        if all("tied" in r for r in recs):  # a baseline's grid points tied on the best validation C-index, per fold
            models[m]["tied"] = [r["tied"] for r in recs]
        if all("term_alone_test" in r for r in recs):  # wide & deep: its linear term alone, before finetuning
            models[m]["term_alone_test"] = ft._ms(np.array([r["term_alone_test"] for r in recs], float))
    base = [m for m in BASELINES if "test" in models[m]]
    best = max(base, key=lambda m: models[m]["validation"]["mean"])

    def fold_data(a: str, b: str) -> list[dict]:
        out = []
        for f, ra, rb in zip(fold_meta, results[a], results[b]):
            ids = f["test_ids"]
            out.append(
                {
                    "time": t.loc[ids].to_numpy(),
                    "event": e.loc[ids].to_numpy(),
                    "patients": rows.loc[ids, "patient_id"].to_numpy(),
                    "risks": np.array([ra["risk_test"], rb["risk_test"]]),
                }
            )
        return out

    diffs = {}
    pairs = DIFF_PAIRS
    if getattr(args, "bp_modalities", None) == ["tabular_clinical"]:  # the ablation's own reference: Cox on them
        pairs += (("bp_pretrained", "cox_clinical"), ("bp_random", "cox_clinical"))
    # a fixed comparison that names the cohort's best baseline gets its own key (both are pooled apart, by "pair")
    best_keys = {f"{a} - {best}" for a, b in pairs if b is None}
    for a, b in pairs:
        other = best if b is None else b
        if "test" in models.get(a, {}) and "test" in models.get(other, {}):
            d = paired_difference(fold_data(a, other), args.n_bootstrap, args.seed)
            key = f"{a} - {other}" + (" (fixed)" if b is not None and f"{a} - {b}" in best_keys else "")
            diffs[key] = {**d, "pair": [a, "best baseline" if b is None else b]}
    return {
        "cohort": cohort,
        "role": role,
        "n_patients": len(rows),
        "n_events": int(e.sum()),
        "has_clinical": has_clinical(rows),
        "folds": fold_meta,
        "models": models,
        "best_baseline_by_validation": best,
        "paired_differences": diffs,
    }


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------
def report_lines(res: dict) -> list[str]:
    """Markdown tables: test C-index mean ± SD per cohort and model, then the paired differences with 95% CIs, then
    which arm each selected arm picked per fold."""
    models = present_models(res)
    lines = []
    if res.get("train_fraction", 1.0) != 1.0:
        lines += [
            f"Every model fitted on {res['train_fraction']:g} of each fold's training patients (`--train_fraction`; "
            + (
                "validation parts drawn with the same share (`--subsample_validation`), test parts unchanged"
                if res.get("subsample_validation")
                else "validation and test parts unchanged"
            )
            + "); patients (events) below count the whole cohort.",
            "",
        ]
    if res.get("pca_rows", "train") != "train":
        lines += [
            "Label-free steps (expression standardisation, gene selection and PCA; the embedding's PCA) fitted on "
            "every patient of the cohort but the fold's test ones, labelled or not (`--pca_rows non_test`).",
            "",
        ]
    bp_inner = res.get("bp_selection", {}).get("inner_folds")
    if res.get("selection", {}).get("rule") == "inner_cv":
        lines += [
            f"Models without neural training chose their settings by {res['selection']['inner_folds']}-fold inner "
            "cross-validation on every labelled patient of the fold (training + validation parts; the cross-validated "
            "partial likelihood for Cox, the pooled out-of-fold C-index for the forest) and were refitted on all of "
            "them (`--selection inner_cv`); their *validation* below is the pooled out-of-fold C-index."
            + (" The trained networks chose on the validation part." if not bp_inner else ""),
            "",
        ]
    if bp_inner:
        lines += [
            f"The full-finetuning networks chose their learning rate and epoch count by {bp_inner}-fold inner "
            "cross-validation on every labelled patient of the fold (the lowest held-out Cox loss over the inner "
            "folds, every epoch of every rate) and were refitted on all of them for that many epochs without "
            "validation (`--bp_selection inner_cv`); their *validation* below is the chosen setting's mean inner "
            "C-index.",
            "",
        ]
    lines += [
        "| cohort | patients (events) | " + " | ".join(models) + " | best baseline (validation) |",
        "|---|---|" + "---|" * (len(models) + 1),
    ]
    for c, r in res["cohorts"].items():
        cells = []
        for m in models:
            s = r["models"].get(m, {})
            cells.append(f"{s['test']['mean']:.3f} ± {s['test']['sd']:.3f}" if "test" in s else "–")
        lines.append(
            f"| {c}{' (ext)' if r['role'] == 'external' else ''} | {r['n_patients']} ({r['n_events']}) | "
            + " | ".join(cells)
            + f" | {r['best_baseline_by_validation']} |"
        )
    lines += ["", "| cohort | difference | mean over folds | 95% CI (paired patient bootstrap) |", "|---|---|---|---|"]
    for c, r in res["cohorts"].items():
        for name, d in r["paired_differences"].items():
            lines.append(f"| {c} | {name} | {d['difference']:+.3f} | [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] |")
    pooled = {role: p for role, p in res.get("pooled", {}).items() if p}
    if pooled:
        lines += [
            "",
            "| cohorts pooled (equal weight) | difference | mean over cohorts | 95% CI | cohorts > 0 |",
            "|---|---|---|---|---|",
        ]
        for role, table in pooled.items():
            for name, d in table.items():
                lines.append(
                    f"| {role} ({len(d['cohorts'])}) | {name} | {d['difference']:+.3f} | "
                    f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] | {d['above_zero']} of {len(d['cohorts'])} |"
                )

    def fold_picks(arms: list[str], what: str, cell) -> None:
        """One row per cohort: what each arm chose per fold (``cell(model summary) -> str``; "–" when absent)."""
        if not arms:
            return
        lines.extend(
            ["", "| cohort | " + " | ".join(f"{m}: {what}" for m in arms) + " |", "|---|" + "---|" * len(arms)]
        )
        for c, r in res["cohorts"].items():
            lines.append(f"| {c} | " + " | ".join(cell(r["models"].get(m, {})) or "–" for m in arms) + " |")

    alone = [m for m in models if any("term_alone_test" in r["models"].get(m, {}) for r in res["cohorts"].values())]
    if alone:  # how much of a wide & deep arm is its linear term (fitted before finetuning; selects nothing)
        lines += [
            "",
            "| cohort | " + " | ".join(f"{m}: linear term alone / finetuned, test C-index" for m in alone) + " |",
            "|---|" + "---|" * len(alone),
        ]
        for c, r in res["cohorts"].items():
            cells = []
            for m in alone:
                s = r["models"].get(m, {})
                cells.append(
                    f"{s['term_alone_test']['mean']:.3f} / {s['test']['mean']:.3f}" if "term_alone_test" in s else "–"
                )
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    fold_picks(
        [m for m in SELECTED_ARMS if m in models],
        "pick per fold (by validation C-index)",
        lambda s: ", ".join("probe" if p.endswith("_probe") else "full" for p in s.get("picked") or ()),
    )
    fold_picks(
        [m for m in models if any("lr" in r["models"].get(m, {}) for r in res["cohorts"].values())],
        "learning rate per fold (by inner CV, with epochs)"
        if bp_inner
        else "learning rate per fold (by validation C-index)",
        lambda s: ", ".join(
            f"{x:g}" + (f" × {e['epochs']}" if bp_inner and isinstance(e, dict) and "epochs" in e else "")
            for x, e in zip(s.get("lr", ()), s.get("selected") or [None] * len(s.get("lr", ())))
        ),
    )
    if CANDIDATE_ARM in models:  # which candidate each fold kept, and how often each was kept
        fold_picks(
            [CANDIDATE_ARM],
            "backbone per fold (by validation)",
            lambda s: ", ".join(str(e.get("backbone")) for e in s.get("selected") or ()),
        )
        kept = Counter(
            e.get("backbone")
            for r in res["cohorts"].values()
            for e in r["models"].get(CANDIDATE_ARM, {}).get("selected") or ()
        )
        order = [*res.get("emb_candidates", {}), *(c for c in kept if c not in res.get("emb_candidates", {}))]
        lines += ["", f"{CANDIDATE_ARM}: kept " + ", ".join(f"{c} in {kept[c]}" for c in order) + " (cohort folds)"]
    fold_picks(
        [m for m in EMB_ARMS if m in models],
        "embedding PCs per fold (by validation)",
        lambda s: ", ".join(
            f"{e['n_pcs']}" + (f" (+{e['expr_pcs']} expr.)" if e.get("expr_pcs") else "")
            for e in s.get("selected") or ()
        ),
    )
    return lines


def present_models(res: dict) -> list[str]:
    """The models any cohort ran, in report order (baselines, then the BioPerceiver arms)."""
    present = {m for r in res["cohorts"].values() for m, s in r["models"].items() if "test" in s}
    return [m for m in (*BASELINES, *ALL_BP_ARMS) if m in present]


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = present_models(res)
    cohorts = list(res["cohorts"])
    fig, ax = plt.subplots(figsize=(min(22.0, max(7.0, (0.6 + 0.1 * len(models)) * len(cohorts) + 2)), 5.0))
    width = 0.8 / len(models)
    colors = [plt.get_cmap("tab20")(j) if len(models) > 10 else f"C{j}" for j in range(len(models))]  # C10 = C0
    for j, m in enumerate(models):
        for i, c in enumerate(cohorts):
            s = res["cohorts"][c]["models"].get(m, {})
            if "test" not in s:
                continue
            x = i + (j - (len(models) - 1) / 2) * width
            ax.bar(x, s["test"]["mean"], width, yerr=s["test"]["sd"], color=colors[j], label=m if i == 0 else None)
            ax.scatter([x] * len(s["test"]["per_fold"]), s["test"]["per_fold"], s=6, color="k", zorder=3)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(cohorts)), [f"{c}\n({res['cohorts'][c]['role'][:3]})" for c in cohorts])
    ax.set_ylabel(f"test C-index (mean ± SD over {res['folds']} folds; dots: folds)")
    ax.set_ylim(0.3, 1.0)
    ax.legend(fontsize=7, ncol=min(len(models), 5))
    ax.set_title("Survival CV per cohort (chance 0.5)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    from bioperceiver.data.recipes.survset import COHORTS, DEVELOPMENT_COHORTS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cohorts", nargs="+", default=list(DEVELOPMENT_COHORTS), choices=sorted(COHORTS))
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--val_fraction", type=float, default=0.2)
    p.add_argument(
        "--train_fraction",
        type=float,
        default=1.0,
        help="label efficiency: every model is fitted on this share of each fold's training patients (stratified by "
        "event, at least 2 per class, nested across fractions); test parts unchanged, validation parts too unless "
        "--subsample_validation",
    )
    p.add_argument(
        "--subsample_validation",
        action="store_true",
        help="with --train_fraction < 1, draw each fold's validation part with the same share (and rule) as its "
        "training part: a user with a share of the labels also selects on a share of them; test unchanged",
    )
    p.add_argument(
        "--pretrained_dir",
        default=None,
        help="pretrained BioPerceiver (adds the pretrained arms); with {fold} in it, one backbone per fold (each "
        "fold's pretrained arms finetune, or embed with, that fold's backbone)",
    )
    p.add_argument(
        "--emb_candidates",
        nargs="+",
        default=None,
        metavar="LABEL=DIR",
        help=f"backbones (each like --pretrained_dir, {{fold}} allowed) among which the {CANDIDATE_ARM} arm chooses "
        "per fold: the one whose cox_clinical_emb_pretrained scores highest on validation (by inner CV with "
        "--selection inner_cv), ties to the first given; records of the same settings are read back from "
        "--reuse_cache (another run of that backbone), else fitted",
    )
    p.add_argument(
        "--write_fold_manifests",
        default=None,
        metavar="PRETRAIN_MANIFEST",
        help="write one copy of this pretraining manifest per fold with that fold's test patients as split 'test' "
        "(never pretrained on), then exit; pretrain one backbone on each and pass --pretrained_dir "
        "DIR/fold{fold}/final",
    )
    p.add_argument("--no_bioperceiver", action="store_true", help="baselines only")
    p.add_argument("--random_preset", default="bioperceiver_debug", help="architecture of the random-init arm")
    p.add_argument(
        "--random_processor_settings",
        default=None,
        metavar="YAML",
        help="processor settings the random-init arms fit on each fold's training rows (default: the finetuning "
        "benchmark's, tokenizers/demo_processors.yaml); the pretrained arms use the backbone's own processors",
    )
    p.add_argument("--bp_epochs", type=int, default=10)
    p.add_argument("--bp_lr", type=float, default=3e-4, help="learning rate of the full-finetuning arms")
    p.add_argument(
        "--bp_lrs",
        type=float,
        nargs="+",
        default=None,
        metavar="LR",
        help="finetune the full-finetuning arms at each of these rates and keep, per (fold, arm), the run with the "
        "best validation C-index (replaces --bp_lr; a run cached at one of these rates is read back)",
    )
    probe = ft.BP_CONFIGS["pretrained_linear_probe"]
    p.add_argument("--probe_lr", type=float, default=probe["lr"], help="learning rate of the *_probe arms")
    p.add_argument("--probe_epochs", type=int, default=probe["epochs"], help="epochs of the *_probe arms")
    p.add_argument(
        "--bp_arms",
        nargs="+",
        default=None,
        choices=ALL_BP_ARMS,
        help="BioPerceiver arms (default: all; the pretrained ones only with --pretrained_dir); a *_selected arm "
        "adds its full and probe arms",
    )
    p.add_argument(
        "--bp_modality_dropout",
        type=float,
        default=0.0,
        metavar="P",
        help="full-finetuning arms: hide each present modality of a training sample with probability P (never its "
        "last one; run_finetune --modality_dropout), so the model cannot lean on one modality alone",
    )
    p.add_argument(
        "--bp_head_linear",
        nargs="*",
        default=None,
        choices=MODALITIES,
        metavar="MODALITY",
        help="trained arms: these modalities (default, no value: tabular_clinical) also reach the risk through a "
        "linear term beside the head (wide & deep, run_finetune --head_linear_modalities; fitted on the training "
        "rows with its ridge penalty chosen on validation before finetuning); only where a cohort has them",
    )
    p.add_argument(
        "--bp_keep_last",
        action="store_true",
        help="full-finetuning arms keep the last epoch's model instead of the epoch with the best validation C-index "
        "(no checkpoint selection; the learning rate is still chosen on validation): with few validation patients "
        "the C-index ties across epochs and the earliest tied checkpoint is kept",
    )
    p.add_argument(
        "--bp_best_model_ties",
        choices=("first", "last", "loss"),
        default="first",
        help="full-finetuning arms: which of the epochs tied on the best validation C-index is kept "
        "(run_finetune --best_model_ties): first (transformers' rule), last, or loss (the lowest validation Cox "
        "loss among them); ignored with --bp_keep_last",
    )
    p.add_argument(
        "--baseline_ties",
        choices=("first", "loss"),
        default="first",
        help="the Cox models (the two Cox baselines and the cox_*_emb_* arms): which of the grid points tied on the "
        "best validation C-index is kept: the first in grid order (fewest components, weakest penalty) or loss (the "
        "highest validation partial log-likelihood, the counterpart of --bp_best_model_ties loss); the random "
        "survival forest keeps the first",
    )
    p.add_argument(
        "--selection",
        choices=("validation", "inner_cv"),
        default="validation",
        help="how the models without neural training (the Cox baselines, the forest, the cox_*_emb_* arms) choose "
        "their settings: on the fold's validation part, fitted on its training part (the recorded rule), or inner_cv: "
        "by --inner_folds patient-level folds of training + validation (the cross-validated partial likelihood for "
        "Cox, the pooled out-of-fold C-index for the forest), then refitted on both; the recorded validation is then "
        "the pooled out-of-fold C-index. The trained bp_* arms keep the validation part",
    )
    p.add_argument("--inner_folds", type=int, default=5, help="inner folds of --selection inner_cv")
    p.add_argument(
        "--bp_selection",
        choices=("validation", "inner_cv"),
        default="validation",
        help="how the full-finetuning bp_* arms choose their learning rate (--bp_lrs) and epoch: on the fold's "
        "validation part, trained on its training part (the recorded rule), or inner_cv: by --inner_folds patient-"
        "level folds of training + validation (the same folds as the Cox models' with --selection inner_cv), each "
        "rate's runs evaluated every epoch; the (rate, epoch) with the lowest held-out Cox loss over the inner "
        "folds (their partial likelihoods summed, weighted by events) is refitted on training + validation for that "
        "many epochs, without any validation, and scored once on test",
    )
    p.add_argument(
        "--pca_rows",
        choices=("train", "non_test"),
        default="train",
        help="the rows the label-free steps of the classical and embedding models are fitted on (expression "
        "standardisation, top-variance genes, expression PCA; the embedding's standardisation and PCA): the "
        "labelled training rows, or non_test: every patient of the cohort but the fold's test ones, labelled or "
        "not (the unlabelled profiles a fold-wise backbone is pretrained on). The Cox and forest fits and every "
        "selection use labelled training / validation rows either way",
    )
    p.add_argument(
        "--bp_head_linear_per_modality",
        action="store_true",
        help="a --bp_head_linear term on several modalities gets one ridge penalty per modality, every combination "
        "tried on validation (run_finetune --head_linear_l2_per_modality); a cohort with one of them is unchanged",
    )
    p.add_argument(
        "--bp_modalities",
        nargs="+",
        default=None,
        choices=MODALITIES,
        help="ablation: the trained BioPerceiver arms see only these modalities (default: expression, and the "
        "clinical covariates where a cohort has them); a cohort with none of them skips those arms",
    )
    p.add_argument(
        "--reuse_cache",
        nargs="+",
        default=[],
        metavar="RUN_DIR",
        help="earlier survival_cv.py output folders: a (fold, model) result cached there with the same settings is "
        "copied into this run's cache instead of refitted (embeddings are not shared)",
    )
    p.add_argument("--n_genes", type=int, default=1000, help="top-variance genes before PCA")
    p.add_argument("--n_bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="folds, the bootstrap and the baselines' randomness")
    p.add_argument(
        "--init_seed",
        type=int,
        default=None,
        help="seed of the BioPerceiver arms' random initialisation and finetuning and of added gene embeddings "
        "(default: --seed); vary it, with --seed fixed, to repeat the neural arms on the same folds",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 2 folds, 2 epochs")
    p.add_argument("--data_dir", default=None, help="cohort manifest folder (default OUTPUT_DIR/cohort)")
    p.add_argument(
        "--gene_map",
        default=None,
        help="accession -> symbol TSV given to the SurvSet recipe (tokenizers/gene_maps/survset_genbank_to_symbol.tsv:"
        " vdv's GenBank accessions become symbols shared with the development cohorts); use its own --data_dir",
    )
    p.add_argument("--output_dir", default=str(ROOT / "outputs" / "survival_cv"))
    args = p.parse_args(argv)
    if args.init_seed is None:
        args.init_seed = args.seed
    if args.bp_head_linear == []:  # the flag alone: the clinical covariates
        args.bp_head_linear = ["tabular_clinical"]
    if args.inner_folds < 2:
        p.error(f"--inner_folds must be at least 2, got {args.inner_folds}")
    return args


def init_settings(args) -> dict:
    """The cache-key entry of ``--init_seed``: empty when it is ``--seed`` (the default, so results cached before
    the option existed stay valid)."""
    return {} if args.init_seed == args.seed else {"init_seed": args.init_seed}


def resolve_bp_arms(args) -> list[str]:
    """The BioPerceiver arms to run, in report order: ``--bp_arms`` (default all; pretrained ones only with
    ``--pretrained_dir``) plus the full and probe arms any selected arm needs."""
    if args.no_bioperceiver:
        return []

    def needs_pretrained(a: str) -> bool:  # the embedding arms' random control reuses the pretrained processors
        return "pretrained" in a or a in EMB_ARMS or a == CANDIDATE_ARM

    candidates = getattr(args, "emb_candidates", None)
    if candidates and not args.pretrained_dir:
        raise SystemExit(
            "--emb_candidates needs --pretrained_dir: the backbone the candidates are compared with, whose processors "
            "the random-embedding control uses (usually one of the candidates)"
        )
    default = (
        a
        for a in ALL_BP_ARMS
        if (args.pretrained_dir or not needs_pretrained(a)) and (a != CANDIDATE_ARM or candidates)
    )
    wanted = set(args.bp_arms or default)
    for sel, parts in SELECTED_ARMS.items():
        if sel in wanted:
            wanted.update(parts)
    if CANDIDATE_ARM in wanted:  # the candidates' records are that arm's, one per backbone
        if not candidates:
            raise SystemExit(f"--bp_arms {CANDIDATE_ARM} needs --emb_candidates LABEL=DIR ...")
        wanted.add("cox_clinical_emb_pretrained")
    elif candidates:
        raise SystemExit(f"--emb_candidates is read by the {CANDIDATE_ARM} arm only: add it to --bp_arms")
    if not args.pretrained_dir and any(needs_pretrained(a) for a in wanted):
        raise SystemExit(f"--bp_arms {sorted(a for a in wanted if needs_pretrained(a))} need --pretrained_dir")
    return [a for a in ALL_BP_ARMS if a in wanted]


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(ROOT)
    t0 = time.perf_counter()
    from bioperceiver.data import read_manifest
    from bioperceiver.data.recipes.survset import build_survset_cohort
    from bioperceiver.modalities.omics.gene_map import read_gene_map

    gene_map = read_gene_map(args.gene_map) if args.gene_map else None
    args.gene_map_sha256 = gene_map.sha256 if gene_map is not None else None
    data_dir = Path(args.data_dir) if args.data_dir else out / "cohort"
    cohorts = sorted(set(args.cohorts), key=args.cohorts.index)
    manifest = read_manifest(build_survset_cohort(data_dir, cohorts, gene_map=gene_map))
    if args.write_fold_manifests:
        paths = write_fold_manifests(args, manifest, args.write_fold_manifests)
        print("\n".join(map(str, paths)))
        return {"fold_manifests": [str(q) for q in paths]}
    args.bp_arms = resolve_bp_arms(args)
    runners = {}
    if args.bp_arms:
        args.work_dir = str(out)  # BPRunner writes run folders under work_dir/runs
        args.reuse_runs = None
        random_runner = ft.BPRunner(args, Path("none"))
        if args.pretrained_dir:
            for folder in sorted(set(fold_backbones(args))):
                if not (Path(folder) / "config.json").is_file():
                    raise SystemExit(f"--pretrained_dir {folder} holds no config.json (pretrain it first)")
            if fold_wise(args):  # each fold's arms finetune that fold's backbone
                pretrained_runner = PerFoldRunner([ft.BPRunner(args, Path(f)) for f in fold_backbones(args)])
            else:
                pretrained_runner = ft.BPRunner(args, Path(args.pretrained_dir))
        for arm in (a for a in BP_ARMS if a in args.bp_arms):
            runners[arm] = pretrained_runner if BP_ARMS[arm]["pretrained"] else random_runner
        args.candidate_models = {}  # --emb_candidates' backbones, loaded when a record must be fitted
        if any(a in EMB_ARMS for a in args.bp_arms):
            loaded = {folder: embedding_models(folder, args.init_seed) for folder in sorted(set(fold_backbones(args)))}
            args.embedding_models = [loaded[folder] for folder in fold_backbones(args)]  # per fold
    res = {
        "benchmark": "survival_cv",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "folds": args.folds,
        "seed": args.seed,
        "init_seed": args.init_seed,
        "val_fraction": args.val_fraction,
        "train_fraction": args.train_fraction,
        "subsample_validation": subsample_validation(args),
        "n_bootstrap": args.n_bootstrap,
        "bp": {
            "epochs": 2 if args.quick else args.bp_epochs,
            "lr": args.bp_lr,
            "lrs": args.bp_lrs,
            "probe_epochs": 2 if args.quick else args.probe_epochs,
            "probe_lr": args.probe_lr,
            "arms": list(args.bp_arms),
            "modalities": args.bp_modalities,
            "modality_dropout": args.bp_modality_dropout,
            "head_linear": args.bp_head_linear,
            "head_linear_per_modality": args.bp_head_linear_per_modality,
            "keep_last": args.bp_keep_last,
            "best_model_ties": "last epoch kept" if args.bp_keep_last else args.bp_best_model_ties,
            "random_preset": args.random_preset,
            "random_processor_settings": args.random_processor_settings,
            "pretrained_dir": args.pretrained_dir,
        },
        "grids": {"cox": {"n_pcs": PCS_GRID, "penalizer": PEN_GRID}, "rsf": RSF_GRID},
        "baseline_ties": {"cox": args.baseline_ties, "rsf": "first"},
        "pca_rows": args.pca_rows,
        "selection": {"rule": args.selection, **({"inner_folds": args.inner_folds} if inner_cv_folds(args) else {})},
        "bp_selection": {
            "rule": args.bp_selection,
            **({"inner_folds": args.inner_folds} if args.bp_selection == "inner_cv" else {}),
        },
        "embedding_arms": {a: {**EMB_ARMS[a], "modality": EMB_MODALITY} for a in EMB_ARMS if a in args.bp_arms},
        "emb_candidates": emb_candidates(args),
        "manifest": str(manifest.path) if hasattr(manifest, "path") else str(data_dir),
        "cohorts": {},
    }
    for cohort in tqdm(args.cohorts, desc="cohorts"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res["cohorts"][cohort] = run_cohort(args, manifest, cohort, runners, out)
    import sklearn
    import torch

    res["environment"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sklearn": sklearn.__version__,
        "threads": torch.get_num_threads(),
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),  # AVX2 and AVX-512 runs differ in the last bits
    }
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    res["pooled"] = {role: pooled_differences(res["cohorts"], role) for role in ("development", "external")}
    write_replicates(res, out / "survival_cv_replicates.npz")
    res = _without_replicates(res)
    (out / "survival_cv.json").write_text(json.dumps(res, indent=1, default=ft._json_default))
    plot(res, out / "survival_cv.png")
    (out / "survival_cv.md").write_text("\n".join(report_lines(res)) + "\n")
    print("\n".join(report_lines(res)), flush=True)
    return res


if __name__ == "__main__":
    main()
