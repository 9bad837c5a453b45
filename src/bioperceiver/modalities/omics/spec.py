"""``omics`` spec: ``{gene: value}`` -> one token per measured gene; tokens map back to gene names."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from types import MappingProxyType

import torch

from ...data.errors import Problem
from ..spec import ArraySpec, LinearInputs, ModalitySpec
from .embedder import OmicsEmbedder
from .processor import OmicsProcessor


class OmicsSpec(ModalitySpec):
    """A cell is a ``{gene: value}`` mapping (or its JSON) or a path to an expression file; a processed sample is
    ``gene_ids`` and normalised ``values`` (G,) of the measured genes in the fitted vocabulary."""

    kind = "omics"
    processor_class = OmicsProcessor
    embedder_class = OmicsEmbedder
    arrays = MappingProxyType(
        {
            "gene_ids": ArraySpec(torch.long, doc="index into the fitted gene vocabulary (G,)"),
            "values": ArraySpec(torch.float32, doc="normalised expression (G,)"),
            "gene_features": ArraySpec(
                torch.float32,
                rank=2,
                required=False,
                doc="each token's fixed gene feature vector (G, F), with the processor's gene_features_file",
            ),
        }
    )
    cell_forms = ("mapping", "path")
    token_unit = "gene"
    linear_inputs = LinearInputs("gene_ids", "num_genes")

    def check_mapping(self, mapping):
        out = []
        bad = [k for k, x in mapping.items() if isinstance(x, float) and not math.isfinite(x)]
        if bad:
            out.append(
                Problem(
                    "non_finite",
                    f"{len(bad)} value(s) NaN/inf, e.g. {bad[:3]}",
                    "leave the gene out for an unmeasured value",
                )
            )
        text = [k for k, x in mapping.items() if x is not None and not _numeric(x)]
        if text:
            out.append(
                Problem(
                    "non_numeric",
                    f"{len(text)} value(s) are not numbers, e.g. {[(k, mapping[k]) for k in text[:3]]}",
                    "store expression values as numbers (leave unmeasured genes out)",
                )
            )
        return out

    def check_file(self, path):
        """A ``.json`` expression file is read (small: one sample) and its values checked like a mapping cell;
        tables (CSV/TSV/Parquet) are left to the deep check."""
        if path.suffix.lower() != ".json":
            return []
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            return [Problem("unreadable_omics", f"{path.name} is not valid JSON ({err})", "re-export the file")]
        if not isinstance(data, dict):
            return [Problem("bad_type", f"{path.name} holds a {type(data).__name__}", "store {gene: value}")]
        return [replace(p, message=f"{path.name}: {p.message}") for p in self.check_mapping(data)]

    def token_labels(self, attribution, modality):
        genes = (getattr(attribution.processors.get(modality), "state", None) or {}).get("genes")
        return [
            [genes[i] if genes is not None and i < len(genes) else f"gene {i}" for i in row]
            for row in attribution.inputs[modality]["gene_ids"].tolist()
        ]

    def describe(self, arrays):
        return "genes", len(arrays["gene_ids"])


def _numeric(x) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, (int, float)):
        return True
    if isinstance(x, str):
        try:
            float(x)
        except ValueError:
            return False
        return True
    return False
