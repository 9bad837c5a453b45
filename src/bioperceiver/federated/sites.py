"""Sites of a federated run: from a manifest's site column or one manifest per site, and what each contributed.

A site's :class:`~bioperceiver.data.Manifest` never leaves it in a real deployment; in simulation the sites are
subsets of one table (``--site_column``) or separate files (``--site_manifests``). :func:`site_contributions` is
what a site reports to the coordinator and what the model card states: counts of rows and patients, and rows
per modality. No sample or patient id is part of it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..data.manifest import Manifest, is_missing, read_manifest
from ..data.splits import assign_splits

logger = logging.getLogger(__name__)

SITE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def split_sites(manifest: Manifest, site_column: str = "meta_site") -> dict[str, Manifest]:
    """``{site: its rows}`` from the manifest's ``site_column`` (sorted by site name; ``site`` also finds
    ``meta_site``, the manifest's name for it). A row without a site is an error naming it: every record must
    belong to exactly one site."""
    if site_column not in manifest.table.columns and f"meta_{site_column}" in manifest.table.columns:
        site_column = f"meta_{site_column}"
    if site_column not in manifest.table.columns:
        cols = [c for c in manifest.table.columns if "site" in c or "source" in c]
        raise ValueError(
            f"the manifest has no {site_column!r} column to define the sites; pass --site_column with one of "
            f"{cols or list(manifest.table.columns)} or one manifest per site (--site_manifests)"
        )
    column = manifest.table[site_column]
    missing = column.map(is_missing)
    if missing.any():
        first = manifest.table.loc[missing, "sample_id"].iloc[0]
        raise ValueError(
            f"{int(missing.sum())} row(s) have no {site_column!r} (first: sample {first!r}); give every row its site"
        )
    sites = {}
    for name in sorted(column.astype(str).unique()):
        rows = manifest.table.index[column.astype(str) == name]
        sites[_check_name(name)] = manifest.subset(rows)
    if len(sites) < 1:
        raise ValueError("the manifest has no rows")
    logger.info("sites from column %r: %s", site_column, {k: len(v) for k, v in sites.items()})
    return sites


def read_site_manifests(paths: Sequence[str | os.PathLike]) -> dict[str, Manifest]:
    """One manifest per site: ``name=path`` or a path (the site is named by the file's stem). Splits are assigned
    per patient as for one manifest."""
    sites = {}
    for item in paths:
        text = str(item)
        name, _, path = text.partition("=") if "=" in text else (Path(text).stem, "", text)
        name = _check_name(name)
        if name in sites:
            raise ValueError(f"two site manifests are named {name!r}; name them with name=path")
        sites[name] = assign_splits(read_manifest(path))
    kinds = {name: m.modalities for name, m in sites.items()}
    for name, mods in kinds.items():
        for col, kind in mods.items():
            other = {n: k[col] for n, k in kinds.items() if col in k and k[col] != kind}
            if other:
                raise ValueError(f"column {col!r} is {kind!r} at site {name!r} but {other} elsewhere: rename it")
    return sites


def _check_name(name: str) -> str:
    if not SITE_NAME.match(name):
        raise ValueError(f"site name {name!r} may hold letters, digits, '_', '-' and '.' only")
    return name


def union_modalities(sites: Mapping[str, Manifest]) -> dict[str, str]:
    """Every modality column of any site with its kind (sorted by name)."""
    out: dict[str, str] = {}
    for m in sites.values():
        out.update(m.modalities)
    return dict(sorted(out.items()))


def site_contributions(sites: Mapping[str, Manifest], split: str | None = "train") -> list[dict[str, Any]]:
    """Per site: ``rows``, ``patients`` and ``modalities`` (rows with each modality) of ``split`` — counts only."""
    out = []
    for name, m in sites.items():
        table = m.table
        if split is not None and "split" in table:
            table = table[table["split"] == split]
        present = {c: int((~table[c].map(is_missing)).sum()) for c in m.modalities if c in table}
        out.append(
            {
                "site": name,
                "rows": len(table),
                "patients": int(table["patient_id"].nunique()) if "patient_id" in table else len(table),
                "modalities": {c: n for c, n in sorted(present.items()) if n},
            }
        )
    return out
