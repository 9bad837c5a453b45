#!/usr/bin/env python
"""The current main job (`make demo`): the real demo cohort end to end through the data layer and the model.

1. Build the bundled demo cohort from real data shipped in pinned packages (PadChest reports + study fields,
   SurvSet expression + clinical + survival, systole ECG/EDA/respiration windows, pydicom-data images) —
   ``bioperceiver.data.recipes.demo``; the data is written under ``--output_dir``, never into the repository.
2. Validate the manifest, assign patient-level splits and fit every processor on the train split
   (``tokenizers/fit_processors.py`` with ``tokenizers/demo_processors.yaml``).
3. Process every split with ``datasets.map`` (cached), collate batches with modality dropout, and
   embed them with a freshly initialised model whose modality settings come from the fitted processors.
4. Save model + processors into one directory, reload both (``AutoModel.from_pretrained``,
   ``BioPerceiverProcessor.from_pretrained``) and check the reloaded pair reproduces the embeddings exactly.
5. Write ``summary.json``, ``modality_coverage.png`` (which modalities each source brings) and
   ``similarity.png``.

``make demo`` then pretrains with ``pretrain/run_pretrain.py --config pretrain/configs/demo.yaml``, which reuses
the processors fitted here (``outputs/demo/model``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModel

import bioperceiver as bp
from bioperceiver.data import BioPerceiverCollator, BioPerceiverProcessor, build_dataset, read_manifest, to_sample
from bioperceiver.data.recipes.demo import build_demo_cohort

logger = logging.getLogger("demo_pipeline")
HERE = Path(__file__).resolve().parent


def embed(model, loader) -> tuple[torch.Tensor, list[str]]:
    outs, ids = [], []
    with torch.no_grad():
        for batch in loader:
            outs.append(model(inputs=batch["inputs"]).pooler_output)
            ids += batch["sample_id"]
    return torch.cat(outs), ids


def coverage_png(table, modalities, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = sorted(table["meta_source"].unique())
    frac = np.array([[table.loc[table["meta_source"] == s, m].notna().mean() for m in modalities] for s in sources])
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(modalities), 1.2 + 0.5 * len(sources)))
    im = ax.imshow(frac, vmin=0, vmax=1, cmap="Greens")
    ax.set_xticks(range(len(modalities)), modalities, rotation=40, ha="right")
    ax.set_yticks(range(len(sources)), [f"{s} (n={int((table['meta_source'] == s).sum())})" for s in sources])
    for i in range(len(sources)):
        for j in range(len(modalities)):
            ax.text(j, i, f"{frac[i, j]:.0%}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="share of samples with the modality")
    ax.set_title("Demo cohort: modalities per source (missing is the norm)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def similarity_png(emb: torch.Tensor, labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(labels, kind="stable")
    z = torch.nn.functional.normalize(emb[order], dim=-1)
    sim = (z @ z.T).numpy()
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(sim, vmin=-1, vmax=1, cmap="coolwarm")
    ax.set_title("Cosine similarity of validation embeddings\n(random init; rows grouped by source)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="outputs/demo")
    p.add_argument("--preset", default="bioperceiver_debug")
    p.add_argument("--padchest_studies", type=int, default=600)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--num_proc", type=int, default=1, help="datasets.map workers (see benchmarks/RESULTS.md)")
    p.add_argument("--modality_dropout", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    t0 = time.perf_counter()
    timings = {}

    manifest_path = build_demo_cohort(out / "cohort", padchest_studies=args.padchest_studies, seed=args.seed)
    timings["build_cohort_s"] = time.perf_counter() - t0
    model_dir = out / "model"
    if model_dir.exists():  # a previous demo's model and processors: this run fits and saves them anew
        logging.getLogger(__name__).info("replacing the previous demo model in %s", model_dir)
        shutil.rmtree(model_dir)
    t = time.perf_counter()
    # a step of its own (tokenizers/fit_processors.py), run as the command a user would run: scripts import no script
    subprocess.run(
        [
            sys.executable,
            str(HERE.parent / "tokenizers" / "fit_processors.py"),
            "--manifest",
            str(manifest_path),
            "--settings",
            str(HERE.parent / "tokenizers" / "demo_processors.yaml"),
            "--output_dir",
            str(model_dir),
        ],
        check=True,
    )
    timings["fit_processors_s"] = time.perf_counter() - t
    manifest = read_manifest(model_dir / "split_manifest.parquet", base_dir=manifest_path.parent)
    processor = BioPerceiverProcessor.from_pretrained(model_dir)
    modalities = json.loads((model_dir / "model_modalities.json").read_text())

    t = time.perf_counter()
    datasets, reports = {}, {}
    for split in ("train", "validation", "test"):
        datasets[split], rep = build_dataset(
            manifest, processor, split=split, num_proc=args.num_proc, cache_dir=out / "cache", on_error="skip"
        )
        reports[split] = rep.as_dict()
    timings["process_s"] = time.perf_counter() - t

    model = bp.create_model(args.preset, modalities=modalities).eval()
    collator = BioPerceiverCollator(processor.modalities, modality_dropout=args.modality_dropout, seed=args.seed)

    def loader(split, train):
        ds = datasets[split]
        return DataLoader(
            [to_sample(r, processor) for r in tqdm(ds, desc=f"reading {split}", leave=False)],
            batch_size=args.batch_size,
            collate_fn=lambda f: collator(f, train=train),
        )

    t = time.perf_counter()
    n_train_batches = 0
    for batch in loader("train", train=True):  # what a pretraining step sees: dropout-augmented modality subsets
        with torch.no_grad():
            model(inputs=batch["inputs"])
        n_train_batches += 1
    val_emb, val_ids = embed(model, loader("validation", train=False))
    timings["embed_s"] = time.perf_counter() - t

    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    reloaded = AutoModel.from_pretrained(model_dir).eval()
    reproc = BioPerceiverProcessor.from_pretrained(model_dir)
    ds_val = datasets["validation"]
    batch = collator([to_sample(r, reproc) for r in ds_val.select(range(min(16, len(ds_val))))], train=False)
    with torch.no_grad():
        exact = torch.equal(reloaded(inputs=batch["inputs"]).pooler_output, model(inputs=batch["inputs"]).pooler_output)
    if not exact:
        raise SystemExit("reloaded model + processors do not reproduce the embeddings")

    table = manifest.table
    coverage_png(table, list(processor.modalities), out / "modality_coverage.png")
    source = dict(zip(table["sample_id"], table["meta_source"]))
    similarity_png(val_emb, [source[i] for i in val_ids], out / "similarity.png")
    summary = {
        "manifest": str(manifest_path),
        "model_dir": str(model_dir),
        "rows": len(table),
        "samples_per_split": {k: len(v) for k, v in datasets.items()},
        "patients_per_split": table.groupby("split")["patient_id"].nunique().to_dict(),
        "modality_counts": {m: int(table[m].notna().sum()) for m in processor.modalities},
        "skipped": reports,
        "not_tokenised": processor.report(),
        "model": {"preset": args.preset, "parameters": sum(p.numel() for p in model.parameters())},
        "train_batches_seen": n_train_batches,
        "validation_embeddings": list(val_emb.shape),
        "reload_exact": exact,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "total_s": round(time.perf_counter() - t0, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(json.dumps(summary, indent=1, default=str))
    print(f"\nmodel + processors: {model_dir}\nplots: {out / 'modality_coverage.png'}, {out / 'similarity.png'}")
    return summary


if __name__ == "__main__":
    main()
