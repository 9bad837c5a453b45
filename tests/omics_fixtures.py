"""Small synthetic expression cohorts for the omics tests (vocabulary extension, gene features): samples x genes
matrices with a cohort-wide shift (a batch effect) and unmeasured values, and manifests around them. Nothing here is
real patient data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from bioperceiver.data import write_manifest


def expression_matrix(path: Path, genes: list[str], n: int, shift: float, seed: int, prefix: str) -> list[str]:
    """A samples x genes expression matrix (log scale, a cohort-wide ``shift``: a batch effect); its cells."""
    rng = np.random.default_rng(seed)
    values = rng.normal(5 + shift, 1 + 0.2 * np.arange(len(genes)), size=(n, len(genes)))
    values[rng.random(values.shape) < 0.1] = np.nan  # unmeasured
    ids = [f"{prefix}{i}" for i in range(n)]
    pd.DataFrame(values, index=pd.Index(ids, name="sample"), columns=genes).to_parquet(path)
    return [f"{path.name}#row={i}" for i in ids]


def cohort_manifest(base: Path, name: str, genes: list[str], shift: float, seed: int, n: int = 48) -> Path:
    cells = expression_matrix(base / f"{name}.parquet", genes, n, shift, seed, name)
    rng = np.random.default_rng(seed)
    split = ["train"] * (n // 2) + ["validation"] * (n // 4) + ["test"] * (n - n // 2 - n // 4)
    table = pd.DataFrame(
        {
            "sample_id": [c.split("=")[1] for c in cells],
            "patient_id": [c.split("=")[1] for c in cells],
            "split": split,
            "omics_expression": cells,
            "tabular_clinical": [json.dumps({"age": float(rng.normal(60, 10))}) for _ in cells],
            "label_y": ["yes" if i % 2 else "no" for i in range(n)],
        }
    )
    return write_manifest(table, base / f"{name}_manifest.parquet")


def pretrained_backbone(base: Path, **omics_settings) -> Path:
    """A backbone as a user downloads one: random-init ``bioperceiver_debug`` weights saved with processors fitted on
    a development cohort (genes G0..G7, per-source z-scores, ``omics_settings`` added), in ``base/pretrained``."""
    import torch

    import bioperceiver as bp
    from bioperceiver.data import BioPerceiverProcessor, read_manifest
    from bioperceiver.modalities.omics.processor import OmicsProcessor
    from bioperceiver.modalities.tabular.processor import TabularProcessor

    manifest = read_manifest(cohort_manifest(base, "dev", [f"G{i}" for i in range(8)], 0.0, 0))
    proc = BioPerceiverProcessor(
        {
            "omics_expression": OmicsProcessor(normalization="none", zscore="per_source", **omics_settings),
            "tabular_clinical": TabularProcessor(),
        }
    ).fit(manifest)
    torch.manual_seed(0)
    backbone = bp.create_model("bioperceiver_debug", modalities=proc.model_modalities())
    pre = base / "pretrained"
    backbone.save_pretrained(pre)
    proc.save_pretrained(pre)
    return pre
