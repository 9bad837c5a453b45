"""Modality contributions: exact Shapley values over modality subsets, and the task-metric drop per modality.

The model runs on any subset of modalities: a modality left out of ``inputs`` and a modality whose keep-mask is
all False give the same prediction (its tokens get exactly zero cross-attention weight), so the value of a
coalition ``S`` of modalities is the explained score with every other modality's tokens dropped.

**The empty coalition.** The model refuses a sample with no modality at all (there is nothing to attend to), so
``f(∅)`` is defined here as a baseline constant ``empty_value`` (default ``0.0``: a zero logit / zero log
hazard ratio, i.e. "no evidence"; pass the mean prediction over the training set to explain deviations from the
average patient). Efficiency then holds by construction: ``sum_k phi_k = f(all present) - empty_value``.

**Players.** Every modality given in ``inputs`` is a player, but a sample's game only depends on the modalities it
has: ``v(S) = v(S ∩ present)``, so a modality the sample lacks is a null player with ``phi = 0`` exactly and the
others get the Shapley values of the game over the sample's own modalities.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..modeling_tasks import BioPerceiverForSurvival
from ._core import (
    Target,
    embed,
    encode,
    eval_mode,
    forward_score,
    head_output,
    linear_inputs,
    output_matrix,
    resolve_target,
    score,
    split_batch,
)


@dataclass
class ModalityShapley:
    """Exact Shapley values of the modalities of one batch.

    Args:
        names: the players, ``K`` modality names (``config.modality_names`` order).
        values: ``(B, K)`` Shapley values; exactly 0 where the sample lacks the modality.
        present: ``(B, K)`` bool, which modalities each sample has.
        full: ``(B,)`` ``f(all present modalities)``.
        empty: ``(B,)`` ``f(∅)`` (the ``empty_value`` baseline).
        coalitions: ``(B, 2**K)`` value of every coalition, bit ``k`` of the column index = ``names[k]``.
        sample_ids: optional sample identifiers.
    """

    names: list[str]
    values: torch.Tensor
    present: torch.Tensor
    full: torch.Tensor
    empty: torch.Tensor
    coalitions: torch.Tensor
    sample_ids: list | None = None

    _ROWS = ("values", "present", "full", "empty", "coalitions")

    @classmethod
    def concat(cls, parts: Iterable[ModalityShapley]) -> ModalityShapley:
        """One object for the samples of several batches (same players), in order."""
        parts = list(parts)
        rows = {f: torch.cat([getattr(p, f) for p in parts]) for f in cls._ROWS}
        ids = [i for p in parts for i in (p.sample_ids or [])]
        return cls(names=list(parts[0].names), **rows, sample_ids=ids or None)

    def select(self, rows: list[int]) -> ModalityShapley:
        """The samples at batch indices ``rows``, in that order."""
        ids = [self.sample_ids[i] for i in rows] if self.sample_ids else None
        return type(self)(names=list(self.names), **{f: getattr(self, f)[rows] for f in self._ROWS}, sample_ids=ids)

    def to_frame(self) -> pd.DataFrame:
        """Per sample and modality: ``sample, modality, present, shapley, full, empty``."""
        rows = []
        for b in range(self.values.shape[0]):
            sample = self.sample_ids[b] if self.sample_ids is not None else b
            for k, name in enumerate(self.names):
                rows.append(
                    {
                        "sample": sample,
                        "modality": name,
                        "present": bool(self.present[b, k]),
                        "shapley": float(self.values[b, k]),
                        "full": float(self.full[b]),
                        "empty": float(self.empty[b]),
                    }
                )
        return pd.DataFrame(rows, columns=["sample", "modality", "present", "shapley", "full", "empty"])

    def summary(self) -> pd.DataFrame:
        """Averages per modality over the samples that have it: ``modality, n_samples, mean_shapley,
        mean_abs_shapley``."""
        rows = []
        for k, name in enumerate(self.names):
            rows_k = self.present[:, k]
            v = self.values[rows_k, k]
            n = int(rows_k.sum())
            rows.append(
                {
                    "modality": name,
                    "n_samples": n,
                    "mean_shapley": float(v.mean()) if n else float("nan"),
                    "mean_abs_shapley": float(v.abs().mean()) if n else float("nan"),
                }
            )
        return pd.DataFrame(rows, columns=["modality", "n_samples", "mean_shapley", "mean_abs_shapley"])


def shapley_from_coalitions(coalitions: torch.Tensor) -> torch.Tensor:
    """Exact Shapley values from every coalition's value.

    Args:
        coalitions: ``(B, 2**K)``, column ``S`` (a bit mask over the ``K`` players) holds ``v(S)``.

    Returns:
        ``(B, K)``: ``phi_k = sum_{S not containing k} |S|! (K - |S| - 1)! / K! * (v(S + k) - v(S))``.
    """
    b, n_sets = coalitions.shape
    k_players = n_sets.bit_length() - 1
    if 1 << k_players != n_sets:
        raise ValueError(f"coalitions must have 2**K columns, got {n_sets}")
    v = coalitions.double()
    phi = torch.zeros(b, k_players, dtype=torch.float64, device=coalitions.device)
    fact = math.factorial
    for k in range(k_players):
        bit = 1 << k
        for s in range(n_sets):
            if s & bit:
                continue
            size = s.bit_count()
            weight = fact(size) * fact(k_players - size - 1) / fact(k_players)
            phi[:, k] += weight * (v[:, s | bit] - v[:, s])
    return phi


def _empty_column(empty_value: float | torch.Tensor, b: int, device) -> torch.Tensor:
    empty = torch.as_tensor(empty_value, dtype=torch.float64, device=device)
    if empty.dim() == 0:
        return empty.expand(b).clone()
    if empty.shape != (b,):
        raise ValueError(f"empty_value must be a float or a ({b},) tensor, got shape {tuple(empty.shape)}")
    return empty


def _rows_target(target: Target, rows: torch.Tensor) -> Target:
    return target[rows] if torch.is_tensor(target) else target


@torch.no_grad()
def modality_shapley(
    model: nn.Module,
    inputs: Mapping[str, Any],
    target: Target = None,
    empty_value: float | torch.Tensor = 0.0,
) -> ModalityShapley:
    """Exact Shapley values of the modalities for the explained score of every sample.

    Runs the encoder once per non-empty coalition of the modalities given (``2**K - 1`` passes, each on the samples
    that have the whole coalition).

    Args:
        model: a task model.
        inputs: a collator batch or ``{modality: arrays}``.
        target: see :data:`bioperceiver.interpret.Target`; ``None`` is resolved once from the full input
            (predicted class / risk), so every coalition is scored on the same output.
        empty_value: ``f(∅)``: a float or a ``(B,)`` tensor (see the module docstring).

    Returns:
        :class:`ModalityShapley`; ``values.sum(1) == full - empty`` (efficiency).
    """
    emb = embed(model, inputs)
    _, sample_ids = split_batch(inputs)
    names, b = emb.names, emb.batch_size
    present = emb.present()  # (B, K)
    device = present.device
    bits = (present.long() * (1 << torch.arange(len(names), device=device))).sum(dim=1)  # (B,)
    n_sets = 1 << len(names)
    effective = torch.full((b, n_sets), float("nan"), dtype=torch.float64, device=device)
    effective[:, 0] = _empty_column(empty_value, b, device)
    with eval_mode(model):
        resolved = resolve_target(model, emb, target)
        for s in range(1, n_sets):
            rows = ((bits & s) == s).nonzero().flatten()  # samples having every modality of S
            if rows.numel() == 0:
                continue
            keep = {
                n: emb.keep[n][rows] if s >> k & 1 else torch.zeros_like(emb.keep[n][rows]) for k, n in enumerate(names)
            }
            tokens = {n: emb.tokens[n][rows] for n in names}
            linear = linear_inputs(model, emb, keep, rows)
            effective[rows, s] = forward_score(model, tokens, keep, _rows_target(resolved, rows), linear).double()
    sets = torch.arange(n_sets, device=device)
    coalitions = effective.gather(1, sets[None, :] & bits[:, None])  # v(S) = v(S ∩ present)
    values = shapley_from_coalitions(coalitions)
    values = torch.where(present, values, torch.zeros((), dtype=values.dtype, device=device))
    return ModalityShapley(
        names=names,
        values=values.cpu(),
        present=present.cpu(),
        full=coalitions[:, -1].cpu(),
        empty=coalitions[:, 0].cpu(),
        coalitions=coalitions.cpu(),
        sample_ids=sample_ids,
    )


def _labels_of(batch: Any) -> tuple[Mapping[str, Any], Any]:
    if isinstance(batch, tuple | list) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping) and "inputs" in batch:
        return batch, batch.get("labels")
    raise ValueError("each batch must be a collator dict with 'inputs' and 'labels', or an (inputs, labels) pair")


def _concat(parts: list[Any]) -> Any:
    if parts and isinstance(parts[0], Mapping):
        return {k: _concat([p[k] for p in parts]) for k in parts[0]}
    if parts and isinstance(parts[0], torch.Tensor | np.ndarray):
        return np.concatenate([p.detach().cpu().numpy() if torch.is_tensor(p) else p for p in parts])
    return [x for p in parts for x in p]


@torch.no_grad()
def modality_metric_drop(
    model: nn.Module,
    batches: Iterable[Any],
    metric: Callable[[np.ndarray, Any], float],
    target: Target = None,
    empty_value: float = 0.0,
) -> pd.DataFrame:
    """Task metric with all modalities vs. with each modality removed.

    Args:
        model: a task model.
        batches: collator batches (``{"inputs": ..., "labels": ...}``) or ``(inputs, labels)`` pairs.
        metric: ``metric(predictions, labels) -> float`` (higher = better); ``predictions`` are the logits
            ``(n, C)`` of a classifier / the risk ``(n,)`` of a survival model, or the ``(n,)`` target score when
            ``target`` is given; ``labels`` are the batches' labels concatenated (dicts concatenated per key).
        target: ``None`` (whole output) or an explained target (see :func:`modality_shapley`).
        empty_value: prediction for a sample whose only modality was removed (the ``f(∅)`` convention).

    Returns:
        DataFrame ``modality, metric_full, metric_without, drop, n_with, n_only`` (``drop = full - without``;
        ``n_with``: samples that had the modality; ``n_only``: those that had nothing else, predicted as
        ``empty_value``).
    """
    per_batch: list[dict[str | None, np.ndarray]] = []
    labels, n_with, n_only, order = [], {}, {}, []
    survival = isinstance(model, BioPerceiverForSurvival)
    with eval_mode(model):
        for batch in batches:
            batch_inputs, batch_labels = _labels_of(batch)
            emb = embed(model, batch_inputs)
            labels.append(batch_labels)
            explained = None if target is None else resolve_target(model, emb, target)

            def predict(keep: dict[str, torch.Tensor], rows: torch.Tensor, emb=emb, explained=explained):
                latents, _, _ = encode(model, {n: emb.tokens[n][rows] for n in emb.names}, keep)
                linear = linear_inputs(model, emb, keep, rows)
                if explained is None:
                    out = output_matrix(model, head_output(model, latents, linear))
                    return out[:, 0] if survival else out
                return score(model, latents, _rows_target(explained, rows), linear)

            present = emb.present()
            full = predict(emb.keep, torch.arange(emb.batch_size, device=present.device)).double()
            preds: dict[str | None, np.ndarray] = {None: full.cpu().numpy()}
            for k, name in enumerate(emb.names):
                if name not in order:
                    order.append(name)
                keep = {n: torch.zeros_like(v) if n == name else v for n, v in emb.keep.items()}
                others = torch.stack([keep[n].any(dim=1) for n in emb.names], dim=1).any(dim=1)
                rows = others.nonzero().flatten()
                out = torch.full_like(full, empty_value)
                if rows.numel():
                    out[rows] = predict({n: v[rows] for n, v in keep.items()}, rows).double()
                preds[name] = out.cpu().numpy()
                n_with[name] = n_with.get(name, 0) + int(present[:, k].sum())
                n_only[name] = n_only.get(name, 0) + int((present[:, k] & ~others).sum())
            per_batch.append(preds)
    if not per_batch:
        raise ValueError("modality_metric_drop got no batches")
    y = _concat(labels)
    full_metric = float(metric(np.concatenate([p[None] for p in per_batch]), y))
    rows_out = []
    for name in order:
        # a batch without this modality in its inputs predicts as with all its modalities
        without = float(metric(np.concatenate([p.get(name, p[None]) for p in per_batch]), y))
        rows_out.append(
            {
                "modality": name,
                "metric_full": full_metric,
                "metric_without": without,
                "drop": full_metric - without,
                "n_with": n_with[name],
                "n_only": n_only[name],
            }
        )
    return pd.DataFrame(rows_out, columns=["modality", "metric_full", "metric_without", "drop", "n_with", "n_only"])
