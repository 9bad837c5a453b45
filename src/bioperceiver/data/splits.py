"""Deterministic patient-level splits: a salted hash of ``patient_id`` decides, so no patient is in two splits
and adding patients never moves existing ones."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import pandas as pd

from .manifest import SPLIT_COLUMN, SPLITS, Manifest

logger = logging.getLogger(__name__)


def patient_fraction(patient_id: str, salt: str = "bioperceiver") -> float:
    """A number in [0, 1) fixed by ``(salt, patient_id)`` (SHA-256), uniform over patients."""
    digest = hashlib.sha256(f"{salt}\x00{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(patient_id: str, fractions: Sequence[float] = (0.8, 0.1, 0.1), salt: str = "bioperceiver") -> str:
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(
            f"fractions must be 3 non-negative numbers summing to 1 (train, validation, test): {fractions}"
        )
    u = patient_fraction(patient_id, salt)
    edge = 0.0
    for name, frac in zip(SPLITS, fractions):
        edge += frac
        if u < edge:
            return name
    return SPLITS[-1]


def assign_splits(
    manifest: Manifest,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    salt: str = "bioperceiver",
    overwrite: bool = False,
) -> Manifest:
    """Add (or, with ``overwrite``, replace) the ``split`` column from the patients' hashes."""
    table = manifest.table.copy()
    if SPLIT_COLUMN in table and not overwrite:
        check_patient_splits(table)
        return manifest
    table[SPLIT_COLUMN] = [split_of(str(p), fractions, salt) for p in table["patient_id"]]
    counts = table.groupby(SPLIT_COLUMN)["patient_id"].nunique().to_dict()
    logger.info("patient-level splits (salt %r): %s patients", salt, counts)
    return Manifest(
        table, manifest.modalities, manifest.label_columns, manifest.metadata, manifest.base_dir, manifest.path
    )


def patients_in_several_splits(table: pd.DataFrame) -> dict[str, list[str]]:
    if SPLIT_COLUMN not in table:
        return {}
    per = table.groupby("patient_id")[SPLIT_COLUMN].unique()
    return {str(p): sorted(map(str, s)) for p, s in per.items() if len(s) > 1}


def check_patient_splits(table: pd.DataFrame) -> None:
    bad = patients_in_several_splits(table)
    if bad:
        example = dict(list(bad.items())[:3])
        raise ValueError(
            f"{len(bad)} patient(s) appear in several splits, e.g. {example}. Fix: split by patient "
            "(bioperceiver.data.assign_splits(manifest, overwrite=True))"
        )
