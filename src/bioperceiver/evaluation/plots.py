"""Figures a finetuning run writes (PNG): learning curves, ROC and precision-recall curves, calibration, Kaplan–Meier
curves by predicted risk group, predicted-vs-true scatter and the modality ablation bars."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)
MAX_CURVES = 8


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _one_vs_rest(y: np.ndarray, prob: np.ndarray, classes: Sequence) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, binary labels, scores)`` per class: binary -> the positive class only."""
    if prob.ndim == 1 or prob.shape[1] == 1:
        return [(str(classes[-1]) if classes else "positive", y.ravel(), prob.ravel())]
    if y.ndim == 1:  # class indices (multiclass)
        if prob.shape[1] == 2:
            return [(str(classes[1]), (y == 1).astype(int), prob[:, 1])]
        return [(str(c), (y == k).astype(int), prob[:, k]) for k, c in enumerate(classes)]
    return [(str(c), y[:, k], prob[:, k]) for k, c in enumerate(classes)]


def plot_roc_pr(y: np.ndarray, prob: np.ndarray, classes: Sequence, path: Path, title: str = "") -> Path | None:
    """ROC and precision-recall curves, one per class (one-vs-rest; at most the 8 most prevalent)."""
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    curves = [c for c in _one_vs_rest(y, prob, classes) if 0 < c[1].sum() < len(c[1])]
    if not curves:
        logger.warning("ROC/PR plot skipped: no class has both positives and negatives in this split")
        return None
    curves = sorted(curves, key=lambda c: -c[1].sum())[:MAX_CURVES]
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.5))
    for name, yy, pp in curves:
        fpr, tpr, _ = roc_curve(yy, pp)
        prec, rec, _ = precision_recall_curve(yy, pp)
        ax1.plot(fpr, tpr, label=f"{name} (AUC {auc(fpr, tpr):.2f}, n+={int(yy.sum())})")
        ax2.plot(rec, prec, label=f"{name} (prevalence {yy.mean():.2f})")
    ax1.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax1.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    ax2.set(xlabel="recall", ylabel="precision", title="precision-recall", ylim=(0, 1.02))
    for ax in (ax1, ax2):
        ax.legend(fontsize=7, loc="lower right" if ax is ax1 else "upper right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_calibration(y: np.ndarray, prob: np.ndarray, classes: Sequence, path: Path, n_bins: int = 10) -> Path | None:
    """Reliability diagram (quantile bins) per class plus the histogram of predicted probabilities."""
    from sklearn.calibration import calibration_curve

    curves = [c for c in _one_vs_rest(y, prob, classes) if 0 < c[1].sum() < len(c[1])]
    if not curves:
        return None
    curves = sorted(curves, key=lambda c: -c[1].sum())[:MAX_CURVES]
    plt = _plt()
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.5, 6.5), height_ratios=[3, 1], sharex=True)
    for name, yy, pp in curves:
        frac, mean = calibration_curve(yy, pp, n_bins=min(n_bins, max(2, len(yy) // 10)), strategy="quantile")
        ax.plot(mean, frac, "o-", ms=3, label=name)
        hist.hist(pp, bins=20, range=(0, 1), histtype="step")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(ylabel="observed frequency", title="calibration (quantile bins)")
    ax.legend(fontsize=7)
    hist.set(xlabel="predicted probability", ylabel="samples")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_km_by_risk(time, event, risk, path: Path, groups: int = 3) -> tuple[Path, float] | None:
    """Kaplan–Meier curves of the test patients split by predicted-risk quantile (lifelines), with the
    multivariate log-rank p-value between the groups."""
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import multivariate_logrank_test

    time, event, risk = (np.asarray(a, dtype=float) for a in (time, event, risk))
    if len(time) < 2 * groups or event.sum() == 0:
        logger.warning("Kaplan-Meier plot skipped: %d samples, %d events", len(time), int(event.sum()))
        return None
    edges = np.quantile(risk, np.linspace(0, 1, groups + 1)[1:-1])
    group = np.digitize(risk, edges)
    names = ["low", "medium", "high"] if groups == 3 else [f"risk group {g + 1}" for g in range(groups)]
    p = float(multivariate_logrank_test(time, group, event).p_value) if len(set(group)) > 1 else float("nan")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for g in range(groups):
        sel = group == g
        if sel.sum() == 0:
            continue
        KaplanMeierFitter().fit(
            time[sel], event[sel], label=f"{names[g]} predicted risk (n={int(sel.sum())})"
        ).plot_survival_function(ax=ax, ci_show=True)
    ax.set(xlabel="time", ylabel="survival probability", title=f"Kaplan–Meier by predicted risk, log-rank p={p:.3g}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path, p


def plot_regression(y: np.ndarray, pred: np.ndarray, path: Path, label: str = "target") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(y, pred, s=10, alpha=0.6)
    lo, hi = float(np.nanmin([y.min(), pred.min()])), float(np.nanmax([y.max(), pred.max()]))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set(xlabel=f"true {label}", ylabel=f"predicted {label}", title="test split")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_ablation(rows: Sequence[dict], metric: str, path: Path) -> Path | None:
    """Horizontal bars of the test metric for every modality-ablation condition, CIs as error bars."""
    rows = [r for r in rows if isinstance(r.get(metric), float) and np.isfinite(r[metric])]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(rows) + 1.2))
    y = np.arange(len(rows))
    vals = np.array([r[metric] for r in rows])
    lo = np.array([r.get(f"{metric}_ci_low", v) for r, v in zip(rows, vals)])
    hi = np.array([r.get(f"{metric}_ci_high", v) for r, v in zip(rows, vals)])
    ax.barh(y, vals, xerr=np.vstack([vals - lo, hi - vals]), color="tab:blue", alpha=0.7, capsize=3)
    ax.set_yticks(y, [r["condition"] for r in rows], fontsize=8)
    ax.axvline(vals[0], color="k", lw=0.8, ls="--")
    ax.set(xlabel=f"test {metric} (95% bootstrap CI)", title="modality ablation")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_learning_curves(
    history: Sequence[dict], path: Path, metric: str, kept: dict | None = None, split: str = "validation"
) -> Path | None:
    """``learning_curves.png`` of a finetuning run, from the Trainer's ``log_history``: the training loss (the mean
    over each logging window of training batches, with modality dropout and augmentation), the validation loss and
    the validation ``metric`` per evaluation, on separate panels (a batch's loss is not the loss over the validation
    split: the Cox partial likelihood, for one, depends on the risk set a batch holds). ``kept``
    (``all_results.json["train"]["best_checkpoint"]``) draws a dotted line at the epoch whose weights the run kept.
    ``None`` when the history holds no training loss (``--do_train false``)."""
    train = [h for h in history if "loss" in h and "epoch" in h]
    if not train:
        return None
    key = metric if metric.startswith("eval_") else f"eval_{metric}"
    evals = [h for h in history if "eval_loss" in h and "epoch" in h]
    scored = [h for h in evals if isinstance(h.get(key), (int, float)) and np.isfinite(h[key])]
    panels = [("training loss (batches, as trained)", train, "loss")]
    if evals:
        panels.append((f"{split} loss (whole split)", evals, "eval_loss"))
    if scored:
        panels.append((f"{split} {key.removeprefix('eval_')}", scored, key))
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (title, rows, k) in zip(axes[0], panels):
        ax.plot([h["epoch"] for h in rows], [h[k] for h in rows], marker="o" if k != "loss" else None, ms=3)
        ax.set(title=title, xlabel="epoch")
        ax.title.set_fontsize(10)
        if kept and kept.get("epoch") is not None:
            ax.axvline(kept["epoch"], color="k", ls=":", lw=1, label=f"kept: epoch {kept['epoch']:g}")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
