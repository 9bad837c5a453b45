"""Token attributions and their mapping back to what a person recognises.

An :class:`Attribution` holds one relevance score per input token of every modality (``(B, N_m)``, exactly zero
where the keep-mask drops the token). The functions here turn one sample's scores into

* text: words (word pieces merged, scores summed) — :func:`text_words`;
* images: a heatmap on the pixel grid (2D ``(H, W)``; 3D ``(D, H, W)``, one slice per depth) — :func:`image_heatmap`;
* omics: genes ranked by relevance, with names — :func:`gene_ranking`;
* signals: a channel x time-patch matrix — :func:`signal_matrix`;
* tabular: feature names with their values — :func:`tabular_features`.

Names come from the fitted processors (text tokenizer, gene vocabulary, channel names, tabular features) when they
are given; otherwise tokens are named by their ids/indices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..modalities.registry import get_modality

FRAME_COLUMNS = ["sample", "modality", "token_index", "token_label", "score"]


@dataclass
class Attribution:
    """Per-token relevance of one batch.

    Args:
        method: ``"attention"`` (uniform latent weights), ``"rollout"`` or ``"integrated_gradients"``.
        scores: ``{modality: (B, N_m) float}``; exactly 0 where ``keep`` is False.
        keep: ``{modality: (B, N_m) bool}`` keep-masks (False = padding / absent modality).
        inputs: ``{modality: {key: tensor}}`` the arrays the tokens came from (CPU), used to name tokens.
        modality_configs: ``{modality: embedder settings}`` (``kind``, ``patch_size``, ...) from the model config.
        target: the explained output, resolved per sample (``(B,)`` column index, or a callable).
        sample_ids: optional sample identifiers (the collator's ``sample_id``); else batch indices.
        processors: ``{modality: fitted processor}`` used for names (may be empty).
        delta: integrated gradients only: captum's convergence delta ``(B,)`` =
            ``sum(attributions) - (f(x) - f(baseline))``.
    """

    method: str
    scores: dict[str, torch.Tensor]
    keep: dict[str, torch.Tensor]
    inputs: dict[str, dict]
    modality_configs: dict[str, dict]
    target: Any = None
    sample_ids: list | None = None
    processors: dict[str, Any] = field(default_factory=dict)
    delta: torch.Tensor | None = None

    @property
    def modalities(self) -> list[str]:
        return list(self.scores)

    @property
    def batch_size(self) -> int:
        return next(iter(self.scores.values())).shape[0]

    def sample_name(self, sample: int) -> Any:
        return self.sample_ids[sample] if self.sample_ids is not None else sample

    def kind(self, modality: str) -> str:
        return self.modality_configs[modality]["kind"]

    def modality_of_kind(self, kind: str, modality: str | None = None) -> str:
        """``modality`` if given (checked), else the only modality of ``kind`` in this attribution."""
        if modality is not None:
            if modality not in self.scores:
                raise ValueError(f"modality {modality!r} is not in this attribution ({self.modalities})")
            if self.kind(modality) != kind:
                raise ValueError(f"modality {modality!r} is of kind {self.kind(modality)!r}, not {kind!r}")
            return modality
        found = [m for m in self.scores if self.kind(m) == kind]
        if len(found) != 1:
            raise ValueError(f"{len(found)} modalities of kind {kind!r} ({found}); name one with modality=")
        return found[0]

    def modality_totals(self) -> torch.Tensor:
        """``(B, K)`` summed score per modality (order of :attr:`modalities`); 0 for an absent modality."""
        return torch.stack([self.scores[m].sum(dim=1) for m in self.modalities], dim=1)

    def modality_frame(self) -> pd.DataFrame:
        """One row per (sample, present modality): ``sample, modality, score`` (sum over its tokens),
        ``abs_score`` (sum of absolute scores) and ``share`` (its fraction of the sample's total absolute score)."""
        rows = []
        for b in range(self.batch_size):
            total = sum(float(self.scores[m][b].abs().sum()) for m in self.modalities)
            for m in self.modalities:
                if not bool(self.keep[m][b].any()):
                    continue
                s = self.scores[m][b]
                a = float(s.abs().sum())
                rows.append(
                    {
                        "sample": self.sample_name(b),
                        "modality": m,
                        "score": float(s.sum()),
                        "abs_score": a,
                        "share": a / total if total > 0 else 0.0,
                    }
                )
        return pd.DataFrame(rows, columns=["sample", "modality", "score", "abs_score", "share"])

    def to_frame(self) -> pd.DataFrame:
        """Long table of kept tokens: ``sample, modality, token_index, token_label, score`` (padding and absent
        modalities are left out; their score is exactly zero in :attr:`scores`)."""
        rows = []
        for m in self.modalities:
            labels = token_labels(self, m)
            for b in range(self.batch_size):
                idx = self.keep[m][b].nonzero().flatten().tolist()
                vals = self.scores[m][b].tolist()
                rows.extend((self.sample_name(b), m, i, labels[b][i], vals[i]) for i in idx)
        return pd.DataFrame(rows, columns=FRAME_COLUMNS)


# ---- token names ---------------------------------------------------------------------------------------------------
def _tokenizer(attr: Attribution, modality: str):
    proc = attr.processors.get(modality)
    return getattr(proc, "tokenizer", None)


def _vocab(attr: Attribution, modality: str, key: str) -> list[str] | None:
    proc = attr.processors.get(modality)
    state = getattr(proc, "state", None) or {}
    return state.get(key)


def image_grid(attr: Attribution, modality: str) -> tuple[int, ...]:
    """Patch grid ``(h, w)`` / ``(d, h, w)`` of an image modality (patch mode: ``ceil(size / patch_size)``; a timm
    backbone: the factorisation of the token count closest to the image's aspect ratio)."""
    from ..modalities.image import image_grid as grid_of

    return grid_of(attr, modality)


def token_labels(attr: Attribution, modality: str) -> list[list[str]]:
    """Human-readable name of every token, ``[sample][token]`` (padding tokens included, named as well): what the
    modality's kind says a token is (``ModalitySpec.token_labels``: word piece, patch, gene, channel @ time,
    feature = value)."""
    return get_modality(attr.kind(modality)).token_labels(attr, modality)


# ---- per-kind views of one sample ----------------------------------------------------------------------------------
def text_words(attr: Attribution, sample: int, modality: str | None = None) -> pd.DataFrame:
    """Words of one sample's note with summed word-piece scores, in reading order.

    Word pieces are merged WordPiece-style (``##`` continues a word) or byte-level-BPE-style (``Ġ`` starts one);
    special tokens (``[CLS]``, ``[SEP]``) stay words of their own. Without a tokenizer every id is one "word".

    Returns:
        DataFrame ``word, score, token_indices`` (kept tokens only).
    """
    m = attr.modality_of_kind("text", modality)
    keep = attr.keep[m][sample]
    ids = attr.inputs[m]["input_ids"][sample].tolist()
    scores = attr.scores[m][sample].tolist()
    tok = _tokenizer(attr, m)
    words: list[list[int]] = []
    for i in keep.nonzero().flatten().tolist():
        piece = tok.id_to_token(ids[i]) if tok is not None else None
        special = piece is not None and piece.startswith("[") and piece.endswith("]")
        cont = piece is not None and not special and piece.startswith("##")
        bpe_cont = piece is not None and not special and not piece.startswith("Ġ") and _is_bpe(tok)
        prev_special = bool(words) and _is_special(tok, ids[words[-1][-1]])
        if words and (cont or bpe_cont) and not prev_special:
            words[-1].append(i)
        else:
            words.append([i])
    rows = []
    for group in words:
        if tok is None:
            word = f"id {ids[group[0]]}"
        elif _is_special(tok, ids[group[0]]):
            word = tok.id_to_token(ids[group[0]])
        else:
            word = tok.decode([ids[i] for i in group], skip_special_tokens=False).strip()
        rows.append({"word": word, "score": float(sum(scores[i] for i in group)), "token_indices": group})
    return pd.DataFrame(rows, columns=["word", "score", "token_indices"])


def _is_bpe(tok) -> bool:
    return tok is not None and type(tok.model).__name__ == "BPE"


def _is_special(tok, token_id: int) -> bool:
    if tok is None:
        return False
    piece = tok.id_to_token(token_id) or ""
    return piece.startswith("[") and piece.endswith("]")


def image_heatmap(attr: Attribution, sample: int, modality: str | None = None, kind: str = "image") -> np.ndarray:
    """Patch scores upsampled (nearest, one constant block per patch) to the pixel grid of the input image.

    Returns:
        ``(H, W)`` for a 2D image, ``(D, H, W)`` for a volume (index the first axis for per-slice heatmaps);
        the same spatial size as ``pixel_values``.
    """
    m = attr.modality_of_kind(kind, modality)
    size = tuple(attr.inputs[m]["pixel_values"].shape[2:])
    grid = image_grid(attr, m)
    patch = attr.scores[m][sample].double().numpy().reshape(grid)
    for axis, (g, s) in enumerate(zip(grid, size)):
        reps = -(-s // g)
        patch = np.repeat(patch, reps, axis=axis)
    return patch[tuple(slice(0, s) for s in size)]


def gene_ranking(attr: Attribution, sample: int, modality: str | None = None, top: int | None = None) -> pd.DataFrame:
    """Measured genes of one sample ranked by absolute relevance.

    Returns:
        DataFrame ``gene, gene_id, value, score`` (``value``: the model input, i.e. the processor's normalised
        expression), highest ``|score|`` first; ``top`` keeps the first rows.
    """
    m = attr.modality_of_kind("omics", modality)
    keep = attr.keep[m][sample]
    names = token_labels(attr, m)[sample]
    ids = attr.inputs[m]["gene_ids"][sample].tolist()
    values = attr.inputs[m]["values"][sample].tolist()
    scores = attr.scores[m][sample].tolist()
    rows = [
        {"gene": names[i], "gene_id": ids[i], "value": values[i], "score": scores[i]}
        for i in keep.nonzero().flatten().tolist()
    ]
    frame = pd.DataFrame(rows, columns=["gene", "gene_id", "value", "score"])
    frame = frame.reindex(frame["score"].abs().sort_values(ascending=False, kind="stable").index)
    frame = frame.reset_index(drop=True)
    return frame.head(top) if top is not None else frame


def signal_matrix(
    attr: Attribution, sample: int, modality: str | None = None
) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    """Channel x time-patch relevance of one sample's recording.

    Returns:
        ``(matrix (C, P), channel names (C,), patch start times in seconds (P,) or None)``; dropped channels and
        padded time patches are 0.
    """
    from ..modalities.signal import signal_layout

    m = attr.modality_of_kind("signal", modality)
    c, p, starts = signal_layout(attr.inputs[m], attr.modality_configs[m], sample)
    matrix = attr.scores[m][sample].double().numpy().reshape(c, p)
    channels = _vocab(attr, m, "channels")
    cids = attr.inputs[m]["channel_ids"][sample].tolist()
    names = [channels[i] if channels is not None and i < len(channels) else f"channel {i}" for i in cids]
    return matrix, names, starts


def tabular_features(attr: Attribution, sample: int, modality: str | None = None) -> pd.DataFrame:
    """Tabular fields of one sample with their values (original units when the processor is given).

    Returns:
        DataFrame ``feature, value, score``, highest ``|score|`` first.
    """
    from ..modalities.tabular import feature_name, feature_value

    m = attr.modality_of_kind("tabular", modality)
    proc = attr.processors.get(m)
    fids = attr.inputs[m]["feature_ids"][sample].tolist()
    scores = attr.scores[m][sample].tolist()
    rows = [
        {
            "feature": feature_name(proc, fids[j]),
            "value": feature_value(proc, attr.inputs[m], sample, j),
            "score": scores[j],
        }
        for j in attr.keep[m][sample].nonzero().flatten().tolist()
    ]
    frame = pd.DataFrame(rows, columns=["feature", "value", "score"])
    frame = frame.reindex(frame["score"].abs().sort_values(ascending=False, kind="stable").index)
    return frame.reset_index(drop=True)


def build_attribution(
    model: Any,
    method: str,
    scores: dict[str, torch.Tensor],
    emb: Any,
    target: Any,
    sample_ids: list | None,
    processors: dict[str, Any],
    delta: torch.Tensor | None = None,
) -> Attribution:
    """Assemble an :class:`Attribution` on the CPU, zeroing every dropped token's score exactly."""
    from ._core import backbone_of

    config = backbone_of(model).config
    keep = {m: emb.keep[m].detach().cpu() for m in scores}
    clean = {
        m: torch.where(keep[m], scores[m].detach().float().cpu(), torch.zeros((), dtype=torch.float32)) for m in scores
    }
    inputs = {m: {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in emb.inputs[m].items()} for m in scores}
    if torch.is_tensor(target):
        target = target.detach().cpu()
    return Attribution(
        method=method,
        scores=clean,
        keep=keep,
        inputs=inputs,
        modality_configs={m: dict(config.modalities[m]) for m in scores},
        target=target,
        sample_ids=sample_ids,
        processors=processors,
        delta=None if delta is None else delta.detach().cpu(),
    )
