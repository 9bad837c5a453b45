"""Processors fitted across sites without pooling raw values.

Each site computes its processors' :meth:`~bioperceiver.modalities.processor.ModalityProcessor.site_statistics`
(vocabulary counts, sums and sums of squares), the coordinator adds them up
(:func:`~bioperceiver.modalities.processor.sum_statistics`) and fits every processor from the sum; a kind that
needs more than sums (exact quantiles for robust tabular scaling) asks the sites follow-up count queries. The
result equals a fit on the pooled training split (tests/test_federated_processors.py), except where a kind
subsamples for speed (``max_fit_samples`` of image/signal ``dataset`` statistics, counted per site).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ..data.manifest import Manifest
from ..data.processing import BioPerceiverProcessor
from ..modalities.processor import ModalityProcessor, sum_statistics

logger = logging.getLogger(__name__)


def _train_table(manifest: Manifest, split: str | None):
    table = manifest.table
    if split is not None and "split" in table:
        table = table[table["split"] == split]
    return table


def site_processor_statistics(
    processor: BioPerceiverProcessor, manifest: Manifest, split: str | None = "train"
) -> dict[str, dict[str, Any]]:
    """What one site sends: ``{modality: site statistics}`` of its ``split`` rows (counts and sums only)."""
    table = _train_table(manifest, split)
    out = {}
    for name, proc in processor.processors.items():
        if name in table and not (proc.is_fitted and not proc.needs_fit):
            out[name] = proc.site_statistics(
                table[name].tolist(), sample_ids=table["sample_id"].tolist(), base_dir=manifest.base_dir
            )
    return out


def answer_processor_query(
    processor: BioPerceiverProcessor,
    manifest: Manifest,
    name: str,
    request: dict[str, Any],
    split: str | None = "train",
) -> dict[str, Any]:
    """One site's answer to a follow-up query of modality ``name``'s processor."""
    table = _train_table(manifest, split)
    if name not in table:
        return {}
    proc: ModalityProcessor = processor.processors[name]
    return proc.answer_query(
        table[name].tolist(), request, sample_ids=table["sample_id"].tolist(), base_dir=manifest.base_dir
    )


def fit_processors_federated(
    processor: BioPerceiverProcessor, sites: Mapping[str, Manifest], split: str | None = "train"
) -> BioPerceiverProcessor:
    """Fit ``processor`` (unfitted, one entry per modality column of any site) from the sites' statistics, as
    :meth:`BioPerceiverProcessor.fit` would on the pooled ``split`` rows. In simulation the sites are called in
    process; at real sites the same two functions run inside the ``ClientApp`` (:mod:`.app`)."""
    stats = {name: site_processor_statistics(processor, m, split) for name, m in sites.items()}
    for name, proc in processor.processors.items():
        if proc.is_fitted and not proc.needs_fit:
            continue
        merged = sum_statistics(s.get(name, {}) for s in stats.values())

        def query(request, name=name):
            return sum_statistics(answer_processor_query(processor, m, name, request, split) for m in sites.values())

        proc.fit_from_statistics(merged, query)
        logger.info("federated fit of %r from %d site(s)", name, sum(1 for s in stats.values() if s.get(name)))
    return processor
