"""The one evaluation and report path of finetuned models: metrics with patient-bootstrap CIs, the predictions
table, results per missing-modality pattern, modality ablations, plots, uncertainty and interpretation — used by
``finetune/run_finetune.py`` (:func:`evaluate_and_report`), ``finetune/predict_ensemble.py``
(:func:`ensemble_report`) and the model card (:func:`card_results`). What differs between tasks is asked of the
task object (:mod:`bioperceiver.tasks`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..tasks import Task
from ..training.tasks import ProcessedDataset, TaskCollator, pattern_table, predict, presence_pattern, write_predictions

logger = logging.getLogger(__name__)

# Everything in a finetuning output folder may be shared (model, card, plots, all_results.json) except this
# subfolder: the per-sample tables, which carry sample and patient ids, stay at the site.
LOCAL_ONLY_DIR = "local_only"
PREDICTIONS_FILE = "predictions_test.csv"
LOCAL_ONLY_NOTE = """This folder holds per-sample results with sample and patient identifiers (predictions, per-sample
modality Shapley values). Keep it at the site: do not share or upload it with the model. Everything else in the
output folder (model, processors, model card, plots, all_results.json, aggregate CSVs) holds no identifier.
"""


def local_only_dir(out: str | Path) -> Path:
    """``out/local_only/`` (created, with a note saying what it holds and that it stays local)."""
    folder = Path(out) / LOCAL_ONLY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    note = folder / "README.txt"
    if not note.exists():
        note.write_text(LOCAL_ONLY_NOTE)
    return folder


def predictions_path(out: str | Path) -> Path:
    """The per-sample predictions file of a finetuning output folder: ``local_only/predictions_test.csv``, or
    ``predictions_test.csv`` at the top of folders written before identifiers were kept local."""
    new = Path(out) / LOCAL_ONLY_DIR / PREDICTIONS_FILE
    old = Path(out) / PREDICTIONS_FILE
    return old if old.exists() and not new.exists() else new


@dataclass
class ReportSettings:
    """What a finetuning run's evaluation does (``DataArguments`` / ``TrainingArguments`` values).

    Attributes:
        test_split: the split that gets CIs, the predictions file, patterns, ablations, uncertainty, explanations.
        n_bootstrap: bootstrap resamples (by patient) of the test CIs.
        seed: seed of the bootstrap, MC-dropout and the deletion test.
        batch_size: evaluation batch size.
        device: where the model runs.
        min_pattern_samples: smallest pattern / ablation group that gets metrics.
        ablations: test metric with each modality removed / alone.
        uncertainty: calibration, conformal prediction and MC-dropout on the test split.
        mc_dropout_samples: MC-dropout passes (0 = off).
        conformal_alpha: conformal miscoverage (sets/intervals cover ``1 - alpha``).
        interpret: modality Shapley values, integrated gradients and a deletion test.
        explain_samples: test patients with explanation figures.
    """

    test_split: str = "test"
    n_bootstrap: int = 1000
    seed: int = 0
    batch_size: int = 64
    device: Any = "cpu"
    min_pattern_samples: int = 10
    ablations: bool = True
    uncertainty: bool = True
    mc_dropout_samples: int = 20
    conformal_alpha: float = 0.1
    interpret: bool = True
    explain_samples: int = 3


def write_csv(path: Path, rows: list[dict]) -> None:
    import pandas as pd

    pd.DataFrame(rows).to_csv(path, index=False)


def evaluate_and_report(
    model,
    task: Task,
    modalities: Mapping[str, str],
    processor,
    evals: Mapping[str, ProcessedDataset],
    manifest,
    out: Path,
    settings: ReportSettings,
) -> dict[str, Any]:
    """Validation and test metrics (test with patient-bootstrap CIs), predictions file, per-pattern results,
    modality ablations, plots, uncertainty and interpretation. ``evals``: ``{split: dataset}``, validation first
    (it calibrates the uncertainty and sets the explanations' baseline)."""
    res: dict[str, Any] = {}
    records_by_id = {r["sample_id"]: r for r in manifest.records()}
    bs, device = settings.batch_size, settings.device
    names = list(modalities)

    def score(pred: np.ndarray, y: np.ndarray, groups=None, ci: bool = True) -> dict[str, float]:
        return task.evaluate(pred, y, groups=groups, ci=ci, n_resamples=settings.n_bootstrap, seed=settings.seed)

    val_pred = val_y = None
    for split, ds in evals.items():
        if not len(ds):
            logger.warning("the %s split has no labelled rows: no metrics", split)
            continue
        pred, _ = predict(model, ds, modalities, batch_size=bs, device=device)
        y = ds.targets()
        is_test = split == settings.test_split
        groups = np.array([str(s.get("patient_id")) for s in ds.samples])
        res[split] = score(pred, y, groups=groups, ci=is_test)
        logger.info("%s: %s", split, {k: round(v, 4) for k, v in res[split].items() if isinstance(v, float)})
        if not is_test:
            val_pred, val_y = pred, y
            continue
        extra = None
        if settings.uncertainty:
            rep = uncertainty_section(model, task, ds, modalities, settings, val_pred, val_y, pred, y, out)
            if rep is not None:
                res["uncertainty"] = rep.metrics
                res["uncertainty_card"] = rep.card_rows()
                extra = {c: rep.table[c].to_numpy() for c in rep.table.columns}
                if rep.plot:
                    res.setdefault("plots", []).append(Path(rep.plot).name)
        if settings.interpret:
            shap_cols = interpretation_section(model, task, ds, modalities, processor, settings, val_pred, res, out)
            extra = {**(extra or {}), **shap_cols}
        local = local_only_dir(out)  # per-sample rows carry ids: kept out of what is shared
        write_predictions(local / PREDICTIONS_FILE, ds, records_by_id, task, pred, modalities, extra=extra)
        patterns = [presence_pattern(s, modalities) for s in ds.samples]
        by_pattern = pattern_table(
            patterns, lambda idx, pred=pred, y=y: score(pred[idx], y[idx], ci=False), settings.min_pattern_samples
        )
        write_csv(out / "results_by_pattern.csv", by_pattern)
        res["by_pattern"] = by_pattern
        res["plots"] = res.get("plots", []) + task.plots(pred, y, out)
        if settings.ablations and len(names) > 1:
            rows = ablation_rows(model, task, ds, modalities, settings, pred, y, groups, score)
            write_csv(out / "ablation.csv", rows)
            res["ablation"] = rows
            from .plots import plot_ablation

            plot = plot_ablation(rows, task.primary_metric, out / "ablation.png")
            if plot:
                res["plots"].append(plot.name)
    return res


def ablation_rows(model, task, ds, modalities, settings, pred, y, groups, score) -> list[dict[str, Any]]:
    """The test metrics with all modalities, each modality removed and each alone (``n`` only when too few
    samples keep a modality)."""
    rows = [{"condition": "all modalities", **score(pred, y, groups=groups)}]
    for m in modalities:
        for label, kw in ((f"without {m}", {"drop": [m]}), (f"{m} alone", {"keep_only": [m]})):
            p2, keep = predict(model, ds, modalities, batch_size=settings.batch_size, device=settings.device, **kw)
            if keep.sum() < settings.min_pattern_samples:
                rows.append({"condition": label, "n": int(keep.sum())})
                continue
            rows.append({"condition": label, **score(p2[keep], y[keep], groups=groups[keep])})
    return rows


def uncertainty_section(model, task: Task, ds, modalities, settings: ReportSettings, val_pred, val_y, pred, y, out):
    """Calibration (temperature fitted on validation), conformal sets/intervals calibrated on validation, and
    MC-dropout spread on the test split — each as the task defines it. Validation also chose the checkpoint, so
    coverage is approximate."""
    from ..uncertainty import mc_dropout_predict, uncertainty_report
    from ..uncertainty.saved import CalibrationSet, save_calibration_set

    if val_pred is None:
        logger.warning("no labelled validation rows: no calibration or conformal sets (they are fitted there)")
        return None
    # saved beside the model: `bioperceiver predict` re-fits the same temperature and conformal threshold from it
    save_calibration_set(out, CalibrationSet(val_pred, val_y, settings.conformal_alpha, settings.seed))
    mc = None
    if settings.mc_dropout_samples > 0:
        bs, device = settings.batch_size, settings.device
        mc = mc_dropout_predict(
            model,
            lambda m: predict(m, ds, modalities, batch_size=bs, device=device),
            n_samples=settings.mc_dropout_samples,
            seed=settings.seed,
            task=task,
        )
    plot_name = task.uncertainty_plot_name()
    rep = uncertainty_report(
        task,
        val_pred,
        val_y,
        pred,
        y,
        alpha=settings.conformal_alpha,
        mc=mc,
        class_names=task.class_names() if hasattr(task, "class_names") else None,
        decode=task.decoder(),
        plot_path=out / plot_name if plot_name else None,
        seed=settings.seed,
    )
    logger.info("uncertainty: %s", {k: v for k, v in rep.metrics.items() if isinstance(v, float)})
    return rep


def interpretation_section(model, task: Task, ds, modalities, processor, settings, val_pred, res, out: Path) -> dict:
    """Exact modality Shapley values for every test sample (columns ``shapley_<modality>`` of the predictions
    file), integrated-gradients figures for a few patients and a top-k vs. random token deletion test."""
    import pandas as pd

    from ..interpret import ModalityShapley, deletion_test, explain_sample, integrated_gradients, modality_shapley
    from ..interpret.figures import plot_modality_shapley

    bs = settings.batch_size  # interpret moves the batches to the model's device
    collator = TaskCollator(modalities, train=False).collator
    target, score_fn, meaning = task.explained_score()
    # f(no modality): the mean explained score on validation (the "average patient"), 0 when it is per class
    empty = float(np.mean(score_fn(val_pred))) if score_fn is not None and val_pred is not None else 0.0
    frames, shapleys = [], []
    for start in range(0, len(ds), bs):
        batch = collator([ds[i] for i in range(start, min(start + bs, len(ds)))], train=False)
        sh = modality_shapley(model, batch, target=target, empty_value=empty)
        shapleys.append(sh)
        frames.append(sh.to_frame())
    sh = ModalityShapley.concat(shapleys)
    table = sh.summary()
    used = [n for n in sh.names if n in modalities]
    table = table[table["modality"].isin(used)].reset_index(drop=True)
    write_csv(local_only_dir(out) / "modality_shapley.csv", pd.concat(frames).to_dict("records"))  # per sample
    plots = [plot_modality_shapley(sh, out / "modality_shapley.png").name]
    baseline = "the mean over the validation split" if score_fn is not None and val_pred is not None else "a zero logit"
    res["interpretation"] = {
        "explained": meaning,
        "empty_value": empty,
        "empty_value_is": baseline,
        "shapley": table.to_dict("records"),
    }

    # a few patients: the highest, median and lowest explained score
    full = sh.full.numpy()
    order = np.argsort(-full)
    picks = list(dict.fromkeys([order[0], order[len(order) // 2], order[-1]]))[: settings.explain_samples]
    if picks:
        batch = collator([ds[int(i)] for i in picks], train=False)
        attr = integrated_gradients(model, batch, target=target, processors=processor)
        picked = sh.select([int(i) for i in picks])
        # figures are shared: named and titled by the row's index in the test split (``bioperceiver predict``: in
        # the predicted rows), never by its sample id
        labels = [f"{settings.test_split}-{int(i):04d}" for i in picks]
        attr.sample_ids, picked.sample_ids = labels, labels
        res["interpretation"]["explained_rows"] = labels
        for j in range(len(picks)):
            written = explain_sample(attr, j, out / "explanations", shapley=picked, prefix=labels[j])
            plots += [f"explanations/{p.name}" for p in written.values()]
        faith = deletion_test(model, batch, attr, k=(1, 5, 10), n_random=10, seed=settings.seed, target=target)
        res["interpretation"]["deletion_test"] = faith.to_dict("records")
        res["interpretation"]["ig_convergence_delta"] = float(np.abs(attr.delta.numpy()).max())
    res.setdefault("plots", []).extend(plots)
    values = sh.values.numpy()
    return {f"shapley_{n}": values[:, k] for k, n in enumerate(sh.names) if n in modalities}


def headline(task: Task, results: Mapping[str, Any], test_split: str) -> str:
    """``"c_index 0.7123 (95% CI 0.65-0.77, n=120)"``: the task's primary test metric."""
    test = results.get(test_split, {})
    metric = task.primary_metric
    if metric not in test:
        return "no labelled test rows"
    text = f"{metric} {test[metric]:.4f}"
    if f"{metric}_ci_low" in test:
        text += f" (95% CI {test[f'{metric}_ci_low']:.4f}-{test[f'{metric}_ci_high']:.4f}, n={test.get('n')})"
    return text


# ---- ensembles ------------------------------------------------------------------------------------------------------
def ensemble_report(
    task: Task,
    member_names: Sequence[str],
    member_outputs: Sequence[np.ndarray],
    targets: np.ndarray,
    sample_ids: Sequence[str],
    patient_ids: Sequence[str],
    out: Path,
    *,
    configs: Sequence[Any],
    split: str = "test",
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """A deep ensemble of finetuned members' raw outputs on the same rows: ``ensemble_predictions.csv`` (each
    member's prediction, the ensemble mean and spread, entropies / mutual information for classification) and the
    ensemble's and members' metrics with patient-bootstrap CIs. ``configs``: the members' model configs (a Cox
    model's risks are centred before averaging: the partial likelihood does not fix their additive constant)."""
    import pandas as pd

    from ..uncertainty import ensemble_predict

    preds = [task.ensemble_outputs(p) for p in member_outputs]  # regression: in the label's own units
    centre = all(task.centre_ensemble([c]) for c in configs)  # only when every member asks for it (all Cox)
    unc = ensemble_predict(preds, task=task, center_risk=centre)
    groups = np.array(patient_ids)
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame({"sample_id": list(sample_ids), "patient_id": list(patient_ids)})
    key = task.ensemble_column()
    for name, pr in zip(member_names, preds, strict=True):
        table[f"{name}:{key}"] = [json.dumps(np.round(r, 6).tolist()) if r.size > 1 else float(r[0]) for r in pr]
    class_names = task.class_names() if hasattr(task, "class_names") else None
    for name, col in unc.columns(prefix="ensemble_", class_names=class_names).items():
        table[name] = col
    for name, col in task.ensemble_table_columns(unc).items():
        table[name] = col
    table.to_csv(out / "ensemble_predictions.csv", index=False)
    bootstrap = {"groups": groups, "n_resamples": n_bootstrap, "seed": seed}
    return {
        "task": task.name,
        "split": split,
        "ensemble": task.ensemble_metrics(unc, targets, **bootstrap),
        "members_metrics": {
            name: task.member_metrics(pr, targets, **bootstrap) for name, pr in zip(member_names, preds, strict=True)
        },
    }


# ---- model card -----------------------------------------------------------------------------------------------------
def card_results(task: Task, results: Mapping[str, Any], eval_split: str | None, test_split: str) -> dict[str, Any]:
    """The model card's results fields: ``main_metrics`` (the task's card metrics present on test), the test and
    validation tables, results per missing-modality pattern, ablation, uncertainty and interpretation."""
    from ..cards import _interpretation_text, _metric_table, markdown_table, metric_rows

    test = results.get(test_split, {})
    main = [m for m in task.card_metrics if m in test]
    return {
        "main_metrics": main,
        "test_table": markdown_table(metric_rows(test)),
        "validation_table": markdown_table(metric_rows(results.get(eval_split, {}))),
        "pattern_results": _metric_table(results.get("by_pattern", []), "modalities present", main[:2]),
        "ablation_results": _metric_table(results.get("ablation", []), "condition", main[:1]),
        "uncertainty_table": markdown_table(results["uncertainty_card"]) if results.get("uncertainty_card") else "",
        "interpretation": _interpretation_text(results.get("interpretation")),
    }
