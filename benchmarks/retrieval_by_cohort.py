"""Held-out cross-modal retrieval of a pretraining run, per cohort, with the chance levels that matter for a
multi-cohort manifest: 1/N over all candidates, and the *cohort-matching* level (a model that only recognises the
cohort of a query and ranks at random within it: mean over queries of 1 / candidates of the query's cohort).

    python benchmarks/retrieval_by_cohort.py --run /work/evidence/survset/pretrain --group_column meta_source

Reads the run's resolved config (``final/run_config.yaml``), its processors and its last checkpoint (backbone and
projection head), embeds the ``eval.split`` patients as the run's held-out evaluation does, and writes
``<run>/retrieval_by_cohort.json`` (and prints it)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from bioperceiver.data import BioPerceiverCollator, BioPerceiverProcessor, ManifestDataset, assign_splits, read_manifest
from bioperceiver.factory import create_model
from bioperceiver.training import ContrastivePretrainer, load_run_config
from bioperceiver.training.pretraining import retrieval_metrics

logger = logging.getLogger("retrieval_by_cohort")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="output_dir of a pretraining run")
    parser.add_argument("--group_column", default="meta_source", help="manifest column naming the cohort")
    parser.add_argument("--n_bootstrap", type=int, default=1000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run = Path(args.run)
    cfg = load_run_config(run / "final" / "run_config.yaml")
    processor = BioPerceiverProcessor.from_pretrained(run / "final")
    manifest = assign_splits(read_manifest(cfg.data.manifest))
    held_out = manifest.split(cfg.eval.split)
    ckpt = sorted((run / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    model = create_model(cfg.model.preset, modalities=processor.model_modalities(), **cfg.model.overrides)
    trainer = ContrastivePretrainer(
        model, loss=cfg.loss.name, fused_view=cfg.loss.fused_view, **cfg.loss.subset_kwargs(), **cfg.loss.loss_kwargs()
    )
    trainer.load_state_dict(load_file(ckpt / "model.safetensors"))
    ds = ManifestDataset.from_manifest(held_out, processor, train=False, seed=cfg.seed, on_error="skip")
    collator = BioPerceiverCollator(processor.modalities, on_error="skip")
    trainer.eval()
    views_l, masks_l, sample_ids = [], [], []
    with torch.no_grad():
        for start in range(0, len(ds), cfg.train.batch_size):
            batch = collator([ds[i] for i in range(start, min(start + cfg.train.batch_size, len(ds)))], train=False)
            if batch is None:
                continue
            v, m = trainer.views(batch["inputs"])
            views_l.append(v.float())
            masks_l.append(m)
            sample_ids += [str(s) for s in batch["sample_id"]]
    views, masks = torch.cat(views_l), torch.cat(masks_l)
    group_of = dict(zip(held_out.table["sample_id"].astype(str), held_out.table[args.group_column].astype(str)))
    groups = [group_of[s] for s in sample_ids]
    names = trainer.view_names
    out: dict = {"checkpoint": str(ckpt), "split": cfg.eval.split, "pooled": {}, "by_cohort": {}}
    pooled = retrieval_metrics(views, masks, names, n_bootstrap=args.n_bootstrap, groups=None, seed=cfg.seed)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            key = f"{names[a]}-{names[b]}"
            if f"R@1/{key}" not in pooled:
                continue
            both = (masks[:, a] & masks[:, b]).tolist()
            cand = masks[:, b].tolist()
            per_query = [
                1.0 / sum(1 for j, g in enumerate(groups) if cand[j] and g == groups[i])
                for i in range(len(groups))
                if both[i]
            ]
            out["pooled"][key] = {
                "R@1": pooled[f"R@1/{key}"],
                "R@1_ci": [pooled[f"R@1_ci_low/{key}"], pooled[f"R@1_ci_high/{key}"]],
                "R@10": pooled[f"R@10/{key}"],
                "queries": pooled[f"queries/{key}"],
                "chance_R@1": pooled[f"chance_R@1/{key}"],
                "cohort_matching_R@1": sum(per_query) / len(per_query),
            }
    for cohort in sorted(set(groups)):
        rows = torch.tensor([g == cohort for g in groups])
        res = retrieval_metrics(views[rows], masks[rows], names, n_bootstrap=0)
        out["by_cohort"][cohort] = {
            k.split("/", 1)[1]: {"R@1": res[k], "queries": res[f"queries/{k.split('/', 1)[1]}"]}
            | {"chance_R@1": res[f"chance_R@1/{k.split('/', 1)[1]}"]}
            for k in res
            if k.startswith("R@1/")
        }
    (run / "retrieval_by_cohort.json").write_text(json.dumps(out, indent=1) + "\n")
    logger.info("wrote %s", run / "retrieval_by_cohort.json")
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
