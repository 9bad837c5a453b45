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

import torch

from bioperceiver.data import assign_splits, read_manifest
from bioperceiver.evaluation.report import ensemble_report
from bioperceiver.inference.loading import load_model_folder
from bioperceiver.training.finetuning import check_model_path
from bioperceiver.training.tasks import ProcessedDataset, labelled_records, predict

logger = logging.getLogger("predict_ensemble")


def member_predictions(folder: Path, manifest, split: str, device: str, batch_size: int):
    """``(task, model config, sample ids, patient ids, targets, predictions (N, K))`` of one finetuned folder."""
    member = load_model_folder(folder, device=device, argument="--model_dirs", require_task=True)
    task = member.task
    records, targets = labelled_records(manifest.split(split).records(), task, split)
    ds = ProcessedDataset(
        records, targets, member.processor, base_dir=manifest.base_dir, modalities=list(member.modalities)
    )
    pred, _ = predict(member.model, ds, member.modalities, batch_size=batch_size, device=device)
    patients = [str(s.get("patient_id")) for s in ds.samples]
    return task, member.model.config, ds.sample_ids, patients, ds.targets(), pred


def _member_keys(folders: list[Path]) -> list[str]:
    """Short unique names: the folder names, or paths relative to the members' common parent when names repeat."""
    names = [f.name for f in folders]
    if len(set(names)) == len(names):
        return names
    resolved = [f.resolve() for f in folders]
    common = Path(os.path.commonpath(resolved))
    return [str(r.relative_to(common)) for r in resolved]


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
    for f in folders:  # before any work: each member is a finetuned model folder
        check_model_path(str(f), argument="--model_dirs")
        if not (f / "finetuning_task.json").exists():
            raise ValueError(
                f"--model_dirs {f} is not a run_finetune.py output folder (no finetuning_task.json): pass the "
                "--output_dir folders of finetuning runs"
            )
    manifest_path = args.manifest or json.loads((folders[0] / "all_results.json").read_text())["manifest"]
    if args.manifest is None and not Path(manifest_path).exists():
        raise FileNotFoundError(
            f"the manifest {folders[0]} was trained on ({manifest_path}, recorded in its all_results.json) is not "
            "there (moved, or the model folder came from another machine): pass --manifest PATH"
        )
    manifest = read_manifest(manifest_path)
    manifest = assign_splits(manifest)  # adds patient-level splits, or checks the manifest's own

    members = [member_predictions(f, manifest, args.split, args.device, args.batch_size) for f in folders]
    task, _, ids, patients, y, _ = members[0]
    for f, (other, _, other_ids, *_rest) in zip(folders[1:], members[1:], strict=True):
        if other != task and (other.name, other.columns, other.num_labels) != (
            task.name,
            task.columns,
            task.num_labels,
        ):
            raise SystemExit(f"{f} solves {other}, not {task}")
        if other_ids != ids:
            raise SystemExit(f"{f} kept other {args.split} rows than {folders[0]} (different modalities or skips)")
    out = Path(args.output_dir)
    results = ensemble_report(
        task,
        _member_keys(folders),
        [m[5] for m in members],
        y,
        ids,
        patients,
        out,
        configs=[m[1] for m in members],
        split=args.split,
        n_bootstrap=args.n_bootstrap,
        seed=args.seed,
    )
    results["members"] = [str(f) for f in folders]
    (out / "ensemble_results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    logger.info("ensemble of %d members on %d %s rows -> %s", len(folders), len(ids), args.split, out)
    return results


if __name__ == "__main__":
    main()
