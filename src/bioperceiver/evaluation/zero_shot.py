"""Zero-shot check of a text path: rank findings for each report by the cosine similarity between the report's
text-only embedding and the embedding of each finding's name (the name processed as if it were a report), and score
the ranking with per-finding AUROC against chance (0.5), with patient-bootstrap intervals.

No label is used to build the scores, so an AUROC above 0.5 means the text embedding already places a report near
the names of its findings; 0.5 is what an embedding that knows nothing about the findings gets.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .bootstrap import BootstrapCI, bootstrap_metrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ZeroShotResult:
    """Per-finding and macro AUROC of zero-shot similarity scores.

    Attributes:
        scores: ``(N, K)`` cosine similarity of report ``n`` and finding name ``k``.
        per_finding: ``{finding: BootstrapCI}`` AUROC of each finding (NaN when the finding has one class).
        macro: macro AUROC over the findings with both classes, with its bootstrap interval.
        chance: the AUROC of scores that carry no information (0.5).
    """

    scores: np.ndarray
    per_finding: dict[str, BootstrapCI]
    macro: BootstrapCI
    chance: float = 0.5

    def as_dict(self) -> dict:
        row = lambda ci: {"auroc": ci.point, "low": ci.low, "high": ci.high}  # noqa: E731
        return {
            "macro": row(self.macro),
            "chance": self.chance,
            "per_finding": {k: row(v) for k, v in self.per_finding.items()},
        }


def cosine_scores(reports: np.ndarray | torch.Tensor, findings: np.ndarray | torch.Tensor) -> np.ndarray:
    """``(N, K)`` cosine similarity between report embeddings ``(N, D)`` and finding-name embeddings ``(K, D)``."""
    r = torch.nn.functional.normalize(torch.as_tensor(np.asarray(reports), dtype=torch.float64), dim=-1)
    f = torch.nn.functional.normalize(torch.as_tensor(np.asarray(findings), dtype=torch.float64), dim=-1)
    if r.dim() != 2 or f.dim() != 2 or r.shape[1] != f.shape[1]:
        raise ValueError(f"expected (N, D) and (K, D) embeddings, got {tuple(r.shape)} and {tuple(f.shape)}")
    return (r @ f.T).numpy()


def _auroc_columns(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC of every column (Mann-Whitney U with mid-ranks for ties); NaN where a column has one class."""
    from scipy.stats import rankdata

    ranks = rankdata(scores, axis=0)  # (N, K)
    pos = labels.sum(axis=0).astype(np.float64)
    neg = len(labels) - pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * labels).sum(axis=0) - pos * (pos + 1) / 2) / (pos * neg)
    return np.where((pos > 0) & (neg > 0), auc, np.nan)


def _auroc_per_finding(names: Sequence[str]):
    def metric(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        auc = _auroc_columns(scores, labels)
        out = {name: float(a) for name, a in zip(names, auc)}
        out["macro"] = float(np.nanmean(auc)) if np.isfinite(auc).any() else float("nan")
        return out

    return metric


def zero_shot_auroc(
    scores: np.ndarray,
    labels: np.ndarray,
    finding_names: Sequence[str],
    *,
    groups: Sequence | None = None,
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> ZeroShotResult:
    """Per-finding and macro AUROC of ``scores`` ``(N, K)`` against binary ``labels`` ``(N, K)``, with percentile
    bootstrap intervals over ``groups`` (patient ids: all reports of a drawn patient come together) or rows."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    names = [str(n) for n in finding_names]
    if scores.shape != labels.shape or scores.ndim != 2 or scores.shape[1] != len(names):
        raise ValueError(
            f"scores {scores.shape}, labels {labels.shape} and {len(names)} finding names must agree as (N, K)"
        )
    if "macro" in names:
        raise ValueError("a finding may not be called 'macro' (the name of the macro average)")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0/1 (one column per finding)")
    cis = bootstrap_metrics(
        _auroc_per_finding(names),
        scores,
        labels.astype(np.int64),
        n_resamples=n_resamples,
        alpha=alpha,
        seed=seed,
        groups=groups,
    )
    macro = cis.pop("macro")
    return ZeroShotResult(scores=scores, per_finding=cis, macro=macro)


@torch.no_grad()
def embed_texts(
    model: torch.nn.Module, processor, modality: str, texts: Sequence[str], *, batch_size: int = 64
) -> torch.Tensor:
    """Text-only embeddings ``(N, D)`` (the backbone's ``pooler_output`` with only ``modality`` given).

    Args:
        model: a :class:`~bioperceiver.BioPerceiverModel` (or a task model holding one as ``bioperceiver``).
        processor: the model's :class:`~bioperceiver.data.BioPerceiverProcessor` (or the text processor itself).
        modality: the text modality's name, e.g. ``"text_report"``.
        texts: the notes to embed.
    """
    backbone = getattr(model, "bioperceiver", model)
    proc = processor.processors[modality] if hasattr(processor, "processors") else processor
    pad = int(proc.state.get("pad_token_id", 0))
    device = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    out = []
    try:
        for start in range(0, len(texts), batch_size):
            arrays = [proc(t) for t in texts[start : start + batch_size]]
            t_max = max(len(a["input_ids"]) for a in arrays)
            ids = torch.full((len(arrays), t_max), pad, dtype=torch.long)  # (B, T)
            mask = torch.zeros((len(arrays), t_max), dtype=torch.long)  # (B, T)
            for i, a in enumerate(arrays):
                ids[i, : len(a["input_ids"])] = torch.as_tensor(a["input_ids"])
                mask[i, : len(a["input_ids"])] = 1
            inputs = {modality: {"input_ids": ids.to(device), "attention_mask": mask.to(device)}}
            out.append(backbone(inputs=inputs).pooler_output.float().cpu())  # (B, D)
    finally:
        backbone.train(was_training)
    return torch.cat(out)


def zero_shot_findings(
    model: torch.nn.Module,
    processor,
    modality: str,
    reports: Sequence[str],
    labels: np.ndarray,
    finding_names: Sequence[str],
    *,
    finding_texts: Mapping[str, str] | None = None,
    groups: Sequence | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    batch_size: int = 64,
) -> ZeroShotResult:
    """The zero-shot check end to end: embed ``reports`` and the finding names (or ``finding_texts[name]``, e.g. a
    translation or the stemmed form used in the reports) with the text path only, rank by cosine similarity, and
    score each finding's ranking with AUROC vs chance (patient bootstrap with ``groups``)."""
    texts = [(finding_texts or {}).get(n, n) for n in finding_names]
    rep = embed_texts(model, processor, modality, list(reports), batch_size=batch_size)
    fnd = embed_texts(model, processor, modality, texts, batch_size=batch_size)
    result = zero_shot_auroc(
        cosine_scores(rep, fnd), labels, finding_names, groups=groups, n_resamples=n_resamples, seed=seed
    )
    logger.info(
        "zero-shot macro AUROC %.3f [%.3f, %.3f] vs chance 0.5 over %d findings",
        result.macro.point,
        result.macro.low,
        result.macro.high,
        len(finding_names),
    )
    return result


__all__ = ["ZeroShotResult", "cosine_scores", "embed_texts", "zero_shot_auroc", "zero_shot_findings"]
