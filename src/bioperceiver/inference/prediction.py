"""``bioperceiver predict``: a finetuned model on new patients, with uncertainty, from the finetuned folder alone.

Everything comes from the folder ``finetune/run_finetune.py`` wrote: the model, its processors, the task (label
encoding, decoding, prediction columns), the modalities it was finetuned with (``all_results.json``) and the
calibration set (``calibration_set.npz``: the validation outputs the temperature and the conformal threshold were
fitted on, refitted identically here). Rows without labels are fine; when rows have labels the task's metrics are
reported too.

Writes ``predictions.csv`` into ``output_dir`` — one row per kept sample: ids, the modalities present, the label
cells (empty when unlabelled), the task's prediction columns (probabilities / values / risks), the calibrated
probabilities, conformal sets or intervals and, with ``mc_dropout``, the MC-dropout spread; with ``explain``,
modality Shapley columns, ``modality_shapley.csv`` and explanation figures — and ``predict_results.json``
(counts, skips, uncertainty settings, metrics when labelled).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.errors import DEFAULT_ON_ERROR, DataError, check_on_error
from ..data.manifest import Manifest, read_manifest
from ..jsonio import dumps
from ..training.tasks import ProcessedDataset, write_predictions
from ..training.tasks import predict as predict_outputs
from ..uncertainty.saved import load_calibration_set
from .loading import LoadedModel, load_model_folder

logger = logging.getLogger(__name__)


@dataclass
class PredictResult:
    """The predictions table (``pandas.DataFrame``), the raw outputs ``(N, K)``, and the summary written to
    ``predict_results.json``."""

    table: Any
    outputs: np.ndarray
    results: dict[str, Any] = field(default_factory=dict)


def check_manifest_modalities(manifest: Manifest, modalities: dict[str, str], folder: Path) -> list[str]:
    """The model's modalities the manifest has; refuses (``ValueError``) a manifest with none of them."""
    have = [m for m in modalities if m in manifest.modalities]
    if not have:
        raise ValueError(
            f"the manifest {manifest.path or ''} has none of the modalities the model in {folder} was finetuned with "
            f"{list(modalities)} (its modality columns: {sorted(manifest.modalities)}): name the columns as in "
            "training, or use a model finetuned on these modalities"
        )
    lacking = [m for m in modalities if m not in have]
    if lacking:
        logger.warning("the manifest lacks %s: those modalities are absent for every sample", lacking)
    return have


def _targets(records, task, on_error: str) -> tuple[list, Counter]:
    """Per row: the encoded label or ``None`` (unlabelled); a bad label raises, or under a skipping ``on_error``
    is counted and treated as unlabelled."""
    out, bad = [], Counter()
    for r in records:
        try:
            out.append(task.encode(r))
        except DataError as err:
            if on_error == "raise":
                raise
            bad[err.reason] += 1
            logger.warning("label ignored: %s", err)
            out.append(None)
    return out, bad


def predict(
    model: str | os.PathLike | LoadedModel,
    manifest: str | os.PathLike | Manifest,
    output_dir: str | os.PathLike,
    *,
    batch_size: int = 64,
    on_error: str = DEFAULT_ON_ERROR,
    mc_dropout: int = 0,
    explain: bool = False,
    explain_samples: int = 3,
    uncertainty: bool = True,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> PredictResult:
    """Predictions of the finetuned model in ``model`` (a ``run_finetune.py`` output folder) for every row of
    ``manifest``, written to ``output_dir`` (see the module docstring). ``mc_dropout``: MC-dropout passes (0 =
    off); ``explain``: modality Shapley values and integrated-gradients figures; ``uncertainty``: calibrated
    probabilities and conformal sets/intervals from the folder's calibration set."""
    import pandas as pd

    on_error = check_on_error(on_error)
    loaded = (
        model
        if isinstance(model, LoadedModel)
        else load_model_folder(model, device=device, require_task=True, argument="--model")
    )
    if loaded.task is None:
        raise ValueError(f"--model {loaded.folder} is a backbone without a task: pass a finetuned folder")
    task, net, folder = loaded.task, loaded.model, loaded.folder
    device = next(net.parameters()).device
    m = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
    check_manifest_modalities(m, loaded.modalities, folder)
    records = m.records()
    targets, bad_labels = _targets(records, task, on_error)
    ds = ProcessedDataset(
        records,
        targets,
        loaded.processor,
        base_dir=m.base_dir,
        modalities=list(loaded.modalities),
        on_error=on_error,
    )
    modalities = loaded.modalities
    if not len(ds):
        reasons = ", ".join(f"{n} x {mod or 'sample'}: {reason}" for (mod, reason), n in ds.report.items())
        raise ValueError(
            f"none of the {len(records)} rows of {m.path or 'the manifest'} could be predicted "
            f"({reasons or 'no row'}); `bioperceiver validate` names each row's problem and its fix"
        )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred, keep = predict_outputs(net, ds, modalities, batch_size=batch_size, device=device)
    results: dict[str, Any] = {
        "model": str(folder),
        "task": task.name,
        "manifest": str(m.path) if m.path is not None else None,
        "rows": len(records),
        "predicted": int(keep.sum()),
        "skipped": {f"{mod}:{reason}": n for (mod, reason), n in ds.report.items()},
        "bad_labels": dict(bad_labels),
    }
    unknown = loaded.processor.report()  # e.g. genes, lab features or categories the processors were not fitted on
    if unknown:
        results["not_tokenised"] = unknown
        logger.warning("values the model's processors do not know were left out (counted): %s", unknown)
    extra: dict[str, np.ndarray] = {}
    class_names = task.class_names() if hasattr(task, "class_names") else None
    mc = None
    if mc_dropout > 0 and len(ds):
        from ..uncertainty import mc_dropout_predict

        mc = mc_dropout_predict(
            net,
            lambda model_: predict_outputs(model_, ds, modalities, batch_size=batch_size, device=device)[0],
            n_samples=mc_dropout,
            seed=seed,
            task=task,
        )
    calibration = load_calibration_set(folder) if uncertainty else None
    if uncertainty and calibration is None:
        logger.warning(
            "%s holds no calibration_set.npz (finetuned without --uncertainty, without labelled validation rows, or "
            "before it was saved): raw probabilities only, no conformal sets; re-run finetuning to get them",
            folder,
        )
    if calibration is not None and len(ds):
        from ..uncertainty import uncertainty_report

        rep = uncertainty_report(
            task,
            calibration.outputs,
            calibration.targets,
            pred,
            None,
            alpha=calibration.alpha,
            mc=mc,
            class_names=class_names,
            decode=task.decoder(),
            seed=calibration.seed,
        )
        extra.update({c: rep.table[c].to_numpy() for c in rep.table.columns})
        settings = {k: rep.metrics[k] for k in ("temperature", "conformal_alpha", "conformal_qhat") if k in rep.metrics}
        results["uncertainty"] = settings
    elif mc is not None:
        extra.update(mc.columns("mc_", class_names))
    if explain and len(ds):
        from ..evaluation.report import ReportSettings, interpretation_section

        settings = ReportSettings(  # figures named by the row's index among the predicted rows: row-0002_...
            test_split="row", batch_size=batch_size, device=device, seed=seed, explain_samples=explain_samples
        )
        val_pred = calibration.outputs if calibration is not None else None
        res: dict[str, Any] = {}
        extra.update(interpretation_section(net, task, ds, modalities, loaded.processor, settings, val_pred, res, out))
        results["interpretation"] = res.get("interpretation")
        results["plots"] = res.get("plots", [])
    records_by_id = {r["sample_id"]: r for r in records}
    write_predictions(out / "predictions.csv", ds, records_by_id, task, pred, list(modalities), extra=extra or None)
    labelled = np.array([s.get("__target__") is not None for s in ds.samples], dtype=bool)
    results["labelled"] = int(labelled.sum())
    if labelled.any():
        y = torch.stack([s["__target__"] for s, ok in zip(ds.samples, labelled) if ok]).numpy()
        groups = np.array([str(s.get("patient_id")) for s, ok in zip(ds.samples, labelled) if ok])
        try:
            results["metrics"] = task.evaluate(pred[labelled], y, groups=groups, ci=False)
        except ValueError as err:  # e.g. one class only among the labelled rows
            logger.warning("no metrics on the labelled rows: %s", err)
    (out / "predict_results.json").write_text(dumps(results) + "\n")  # strict JSON: NaN / inf as null
    logger.info("%d of %d rows predicted -> %s", results["predicted"], len(records), out / "predictions.csv")
    return PredictResult(pd.read_csv(out / "predictions.csv"), pred, results)
