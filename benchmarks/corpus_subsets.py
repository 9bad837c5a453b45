#!/usr/bin/env python
"""Smaller pretraining corpora from one manifest: does the pretrained model get better with more unlabelled data?

A corpus-size curve pretrains the same recipe on nested fractions of the same training patients and compares the
backbones downstream. This script writes those manifests. For each ``--fractions`` value ``f`` it keeps, within each
stratum (``--stratify``, by default ``meta_source``: one cohort or platform), the first ``round(f * n)`` (at least 1)
of the stratum's ``n`` *train* patients in one seeded order. The same order serves every fraction, so a smaller
subset always lies inside a larger one, and every stratum keeps its share of the corpus. Rows of the other splits
(``validation``: pretraining's held-out evaluation; ``test``: patients held out of pretraining) are kept unchanged,
so every subset is evaluated on the same patients. The train rows left out are removed, not relabelled.

The manifest must carry a ``split`` column (for example a fold manifest of ``survival_cv.py
--write_fold_manifests``): without one, pretraining assigns hashed splits itself, and the subset would not know
which rows are train. Each subset is written beside its source (``<stem>_corpus<f>_seed<s>.parquet`` with a
``.meta.json`` sidecar recording the fraction, seed and counts), so the manifest's relative file references still
resolve.

To hold the tokens fixed across sizes, pretrain each subset with ``data.processor_dir`` pointing at the processors
fitted on the full corpus (``<full run>/processor``); otherwise each run fits its own on its subset.

    python benchmarks/corpus_subsets.py --manifest runs/cohort/manifest_cvfold0.parquet --fractions 0.25 0.5 --seed 0
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger("corpus_subsets")


def subset_path(manifest: str | Path, fraction: float, seed: int) -> Path:
    """Where :func:`write_subsets` writes the ``fraction`` subset of ``manifest`` drawn with ``seed``."""
    src = Path(manifest)
    return src.with_name(f"{src.stem}_corpus{fraction:g}_seed{seed}{src.suffix}")


def kept_patients(table: pd.DataFrame, fractions: list[float], seed: int, stratify: str) -> dict[float, set[str]]:
    """``{fraction: train patient ids kept}``: per stratum one seeded order of its train patients, the first
    ``round(fraction * n)`` (Python's rounding, halves to even; at least 1) of them, so the subsets are nested. The
    order of the ``k``-th stratum (strata sorted by name) is seeded by ``(seed, k)``."""
    if "split" not in table:
        raise ValueError(
            "the manifest has no 'split' column, so its train patients are not known (pretraining would assign "
            "hashed splits itself): write the splits first, e.g. survival_cv.py --write_fold_manifests"
        )
    if stratify not in table:
        raise ValueError(f"the manifest has no {stratify!r} column to stratify by: pass --stratify <column>")
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise ValueError(f"--fractions must lie in (0, 1]; got {bad}")
    train = table[table["split"] == "train"]
    if train.empty:
        raise ValueError("the manifest has no train rows to subsample")
    strata = train.groupby(train[stratify].astype(str), sort=True)["patient_id"]
    missing = train["patient_id"].isna()
    if missing.any():
        raise ValueError(f"{int(missing.sum())} train rows have no patient_id: subsets are drawn per patient")
    # a patient in two strata would be drawn (or dropped) twice: refuse it rather than split one patient
    per_patient = train.groupby("patient_id")[stratify].nunique()
    if (per_patient > 1).any():
        raise ValueError(
            f"patient {per_patient[per_patient > 1].index[0]!r} has rows in several {stratify} strata: stratify by a "
            "column that is constant per patient"
        )
    kept: dict[float, set[str]] = {f: set() for f in fractions}
    for k, (_, ids) in enumerate(strata):
        patients = np.array(sorted(set(ids.astype(str))))
        order = np.random.default_rng([seed, k]).permutation(len(patients))
        for f in fractions:
            n = max(1, round(f * len(patients)))
            kept[f] |= set(patients[order[:n]])
    return kept


def write_subsets(manifest: str | Path, fractions: list[float], seed: int, stratify: str = "meta_source") -> list[Path]:
    """Write one subset manifest per fraction beside ``manifest`` and return their paths."""
    from bioperceiver.data import read_manifest, write_manifest

    src = read_manifest(manifest)
    table = src.table
    kept = kept_patients(table, fractions, seed, stratify)
    is_train = (table["split"] == "train").to_numpy()
    n_train = int(table.loc[is_train, "patient_id"].nunique())
    out = []
    for f in fractions:
        keep = ~is_train | table["patient_id"].astype(str).isin(kept[f]).to_numpy()
        sub = table[keep].reset_index(drop=True)
        path = subset_path(manifest, f, seed)
        meta = {
            **src.metadata,
            # the source's row counts no longer describe the subset ("counts" stays: the recipe's build record)
            "rows": len(sub),
            "rows_per_split": {str(k): int(v) for k, v in sub["split"].value_counts().sort_index().items()},
            "corpus_of": str(manifest),
            "corpus_fraction": f,
            "corpus_seed": seed,
            "corpus_stratify": stratify,
            "train_patients_kept": len(kept[f]),
            "train_patients_of": n_train,
        }
        write_manifest(sub, path, meta)
        logger.info("%s: %d of %d train patients (%d rows in all)", path, len(kept[f]), n_train, len(sub))
        out.append(path)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", nargs="+", required=True, help="pretraining manifest(s) with a split column")
    p.add_argument("--fractions", nargs="+", type=float, required=True, help="shares of each stratum's train patients")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-stratum order")
    p.add_argument("--stratify", default="meta_source", help="column whose strata each keep their share")
    return p.parse_args(argv)


def main(argv=None) -> list[Path]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return [p for m in args.manifest for p in write_subsets(m, args.fractions, args.seed, args.stratify)]


if __name__ == "__main__":
    main()
