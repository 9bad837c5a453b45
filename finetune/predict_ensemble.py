#!/usr/bin/env python
"""Deep-ensemble predictions from several finetuned BioPerceiver models (e.g. the same run with different seeds).

    python finetune/predict_ensemble.py --model_dirs runs/surv_s0 runs/surv_s1 runs/surv_s2 --output_dir runs/ens

Every member is a folder written by ``finetune/run_finetune.py`` (model + processors + ``finetuning_task.json`` +
``all_results.json``); they must solve the same task. Each member processes the rows with its own processors and
modalities. Writes ``ensemble_predictions.csv`` (per sample: each member's prediction, the ensemble mean, the
members' spread and — classification — the predictive entropy and mutual information, i.e. member disagreement)
and ``ensemble_results.json`` (the ensemble's metrics with patient-bootstrap CIs next to each member's).
Cox members' risks are centred before averaging: a partial likelihood does not fix their additive constant.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import AutoModelForSequenceClassification

import bioperceiver as bp
from bioperceiver.data import BioPerceiverProcessor, assign_splits, read_manifest
from bioperceiver.evaluation import metrics_with_ci
from bioperceiver.training.tasks import LabelSpec, ProcessedDataset, labelled_records, predict
from bioperceiver.uncertainty import ensemble_predict

logger = logging.getLogger("predict_ensemble")


def member_predictions(folder: Path, manifest, split: str, device: str, batch_size: int):
    """``(spec, sample ids, patient ids, targets, predictions (N, K))`` of one finetuned folder on ``split``."""
    spec = LabelSpec.load(folder)
    cls = bp.AutoModelForSurvival if spec.task == "survival" else AutoModelForSequenceClassification
    model = cls.from_pretrained(folder).to(device).eval()
    processor = BioPerceiverProcessor.from_pretrained(folder)
    info = json.loads((folder / "all_results.json").read_text()) if (folder / "all_results.json").exists() else {}
    used = info.get("modalities") or [m for m in processor.modalities if m in model.config.modality_names]
    records, targets = labelled_records(manifest.split(split).records(), spec, split)
    ds = ProcessedDataset(records, targets, processor, base_dir=manifest.base_dir, modalities=used)
    pred, _ = predict(model, ds, {m: processor.modalities[m] for m in used}, batch_size=batch_size, device=device)
    ids = [s["sample_id"] for s in ds.samples]
    patients = [str(s.get("patient_id")) for s in ds.samples]
    y = torch.stack([s["__target__"] for s in ds.samples]).numpy() if len(ds) else np.empty(0)
    return spec, ids, patients, y, pred


def _member_keys(folders: list[Path]) -> list[str]:
    """Short unique names: the folder names, or paths relative to the members' common parent when names repeat."""
    names = [f.name for f in folders]
    if len(set(names)) == len(names):
        return names
    resolved = [f.resolve() for f in folders]
    common = Path(os.path.commonpath(resolved))
    return [str(r.relative_to(common)) for r in resolved]


def _score(spec: LabelSpec, pred: np.ndarray, y: np.ndarray, groups, n_bootstrap: int, seed: int, from_logits: bool):
    if spec.task == "survival":
        return metrics_with_ci("survival", pred[:, 0], y, groups=groups, n_resamples=n_bootstrap, seed=seed)
    if spec.task == "regression":
        # predictions are already in the label's units; targets are stored standardised
        return metrics_with_ci(
            "regression", pred[:, 0], spec.decode_regression(y), groups=groups, n_resamples=n_bootstrap, seed=seed
        )
    return metrics_with_ci(
        spec.task,
        pred,
        y,
        num_labels=spec.num_labels,
        from_logits=from_logits,
        groups=groups,
        n_resamples=n_bootstrap,
        seed=seed,
    )


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dirs", nargs="+", required=True, help="finetuned folders (ensemble members)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--manifest", default=None, help="default: the manifest the first member was trained on")
    p.add_argument("--split", default="test")
    p.add_argument("--n_bootstrap", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    folders = [Path(d) for d in args.model_dirs]
    for f in folders:
        if not (f / "finetuning_task.json").exists():
            raise SystemExit(f"{f} is not a run_finetune.py output folder (no finetuning_task.json)")
    manifest_path = args.manifest or json.loads((folders[0] / "all_results.json").read_text())["manifest"]
    manifest = read_manifest(manifest_path)
    manifest = assign_splits(manifest)  # adds patient-level splits, or checks the manifest's own

    members = [member_predictions(f, manifest, args.split, args.device, args.batch_size) for f in folders]
    spec, ids, patients, y, _ = members[0]
    for f, (s, i, *_rest) in zip(folders[1:], members[1:], strict=True):
        if (
            s.task != spec.task
            or s.columns != spec.columns
            or list(map(str, s.classes)) != list(map(str, spec.classes))
        ):
            raise SystemExit(
                f"{f} solves {s.task} {s.columns} {s.classes}, not {spec.task} {spec.columns} {spec.classes}"
            )
        if i != ids:
            raise SystemExit(f"{f} kept other {args.split} rows than {folders[0]} (different modalities or skips)")
    preds = [m[4] for m in members]
    if spec.task == "regression":  # every column and metric in the label's own units
        preds = [m[0].decode_regression(m[4]) for m in members]
    keys = _member_keys(folders)
    cox = spec.task == "survival" and all(
        json.loads((f / "config.json").read_text()).get("survival_loss", "cox") == "cox" for f in folders
    )
    unc = ensemble_predict(preds, task=spec.task, center_risk=cox)
    groups = np.array(patients)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    table = pd.DataFrame({"sample_id": ids, "patient_id": patients})
    for name, pr in zip(keys, preds, strict=True):
        key = "risk" if spec.task == "survival" else "prediction" if spec.task == "regression" else "logits"
        table[f"{name}:{key}"] = [json.dumps(np.round(r, 6).tolist()) if r.size > 1 else float(r[0]) for r in pr]
    for name, col in unc.columns(prefix="ensemble_", class_names=[str(c) for c in spec.classes] or None).items():
        table[name] = col
    if spec.task in ("classification", "multilabel"):
        mean = unc.mean if unc.mean.ndim == 2 else np.stack([1 - unc.mean, unc.mean], axis=1)
        for k, c in enumerate(spec.classes):
            table[f"ensemble_prob_{c}"] = mean[:, k] if spec.task == "classification" else unc.mean[:, k]
    table.to_csv(out / "ensemble_predictions.csv", index=False)

    results = {"task": spec.task, "split": args.split, "members": [str(f) for f in folders]}
    if spec.task in ("classification", "multilabel"):
        mean = unc.mean if spec.task == "multilabel" or unc.mean.ndim == 2 else np.stack([1 - unc.mean, unc.mean], 1)
        results["ensemble"] = _score(spec, mean, y, groups, args.n_bootstrap, args.seed, from_logits=False)
    else:
        results["ensemble"] = _score(
            spec, np.asarray(unc.mean).reshape(len(ids), -1), y, groups, args.n_bootstrap, args.seed, from_logits=True
        )
    results["members_metrics"] = {
        name: _score(spec, pr, y, groups, args.n_bootstrap, args.seed, from_logits=True)
        for name, pr in zip(keys, preds, strict=True)
    }
    (out / "ensemble_results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    logger.info("ensemble of %d members on %d %s rows -> %s", len(folders), len(ids), args.split, out)
    return results


if __name__ == "__main__":
    main()
