"""PNG figures of one sample's explanation (every function returns the saved path).

Figures are drawn on ``matplotlib.figure.Figure`` objects (Agg canvas), never through ``pyplot``: no global
backend switch, no open-figure registry, safe in scripts and worker processes.

Signed scores (integrated gradients) use a diverging colour map centred at 0 (red = raises the explained score,
blue = lowers it); non-negative scores (attention) a sequential one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure

from .mapping import (
    Attribution,
    gene_ranking,
    image_heatmap,
    signal_matrix,
    tabular_features,
    text_words,
)
from .shapley import ModalityShapley

PathLike = str | os.PathLike


def _colouring(values: np.ndarray) -> tuple[str, Normalize]:
    values = np.asarray(values, dtype=float)
    top = float(np.abs(values).max()) if values.size else 0.0
    top = top if top > 0 else 1.0
    if values.size and values.min() < 0:
        return "RdBu_r", TwoSlopeNorm(vcenter=0.0, vmin=-top, vmax=top)
    return "Reds", Normalize(vmin=0.0, vmax=top)


def _save(fig, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _title(attr: Attribution, sample: int, what: str) -> str:
    return f"{what} — sample {attr.sample_name(sample)} ({attr.method.replace('_', ' ')})"


def plot_text(
    attr: Attribution,
    sample: int,
    path: PathLike,
    modality: str | None = None,
    max_words: int = 300,
    line_chars: int = 90,
) -> Path:
    """The note with every word's background coloured by its (summed word-piece) relevance."""
    words = text_words(attr, sample, modality).head(max_words)
    cmap_name, norm = _colouring(words["score"].to_numpy())
    cmap = colormaps[cmap_name]
    lines, line, width = [], [], 0
    for word, s in zip(words["word"], words["score"]):
        if line and width + len(word) + 1 > line_chars:
            lines.append(line)
            line, width = [], 0
        line.append((word, s, width))
        width += len(word) + 1
    if line:
        lines.append(line)
    fig = Figure(figsize=(0.105 * line_chars + 1.5, 0.32 * max(len(lines), 1) + 1.0))
    ax = fig.add_axes([0.02, 0.02, 0.86, 0.86])
    ax.set_xlim(0, line_chars)
    ax.set_ylim(len(lines) + 0.5, 0.5)
    ax.axis("off")
    for row, items in enumerate(lines, start=1):
        for word, s, x in items:
            ax.text(
                x,
                row,
                word,
                family="monospace",
                fontsize=9,
                va="center",
                ha="left",
                bbox={"facecolor": cmap(norm(s)), "edgecolor": "none", "pad": 1.5},
            )
    mod = attr.modality_of_kind("text", modality)
    ax.set_title(_title(attr, sample, f"{mod}: word relevance"), fontsize=10, loc="left")
    cax = fig.add_axes([0.9, 0.1, 0.015, 0.7])
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax)
    return _save(fig, path)


def _image_plane(pixels: np.ndarray) -> np.ndarray:
    """(C, ...) -> displayable plane(s): grey for 1 channel, RGB for 3, the channel mean otherwise; scaled to 0..1."""
    img = pixels.transpose(*range(1, pixels.ndim), 0) if pixels.shape[0] == 3 else pixels.mean(axis=0)
    lo, hi = np.percentile(img, [1, 99]) if img.size else (0.0, 1.0)
    return np.clip((img - lo) / (hi - lo if hi > lo else 1.0), 0, 1)


def plot_image(
    attr: Attribution,
    sample: int,
    path: PathLike,
    modality: str | None = None,
    slices: int = 6,
    alpha: float = 0.45,
) -> Path:
    """The image with the patch-relevance heatmap overlaid; a volume shows ``slices`` evenly spaced axial slices."""
    mod = attr.modality_of_kind("image", modality)
    heat = image_heatmap(attr, sample, mod)
    pixels = attr.inputs[mod]["pixel_values"][sample].float().numpy()
    cmap, norm = _colouring(heat)
    if heat.ndim == 2:
        planes, labels = [(pixels, heat)], [""]
    else:
        depth = heat.shape[0]
        idx = np.unique(np.linspace(0, depth - 1, min(slices, depth)).round().astype(int))
        planes = [(pixels[:, z], heat[z]) for z in idx]
        labels = [f"slice {z}" for z in idx]
    fig = Figure(figsize=(3.2 * len(planes) + 0.8, 3.4))
    axes = fig.subplots(1, len(planes), squeeze=False)
    for ax, (px, h), label in zip(axes[0], planes, labels):
        ax.imshow(_image_plane(px), cmap="gray")
        im = ax.imshow(h, cmap=cmap, norm=norm, alpha=alpha)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(_title(attr, sample, f"{mod}: patch relevance"), fontsize=10)
    return _save(fig, path)


def _bars(labels: list[str], values: np.ndarray, title: str, xlabel: str, path: PathLike) -> Path:
    values = np.asarray(values, dtype=float)
    fig = Figure(figsize=(6.5, 0.28 * max(len(labels), 1) + 1.2))
    ax = fig.subplots()
    colours = np.where(values >= 0, "#c0392b", "#2e86c1")
    y = np.arange(len(labels))
    ax.barh(y, values, color=colours)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.6)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10, loc="left")
    return _save(fig, path)


def plot_top_genes(attr: Attribution, sample: int, path: PathLike, modality: str | None = None, top: int = 20) -> Path:
    """Bar chart of the ``top`` genes by absolute relevance (gene name and model input value)."""
    genes = gene_ranking(attr, sample, modality, top=top)
    labels = [f"{g} ({v:+.2f})" for g, v in zip(genes["gene"], genes["value"])]
    mod = attr.modality_of_kind("omics", modality)
    return _bars(labels, genes["score"].to_numpy(), _title(attr, sample, f"{mod}: top genes"), "relevance", path)


def plot_tabular(attr: Attribution, sample: int, path: PathLike, modality: str | None = None, top: int = 20) -> Path:
    """Bar chart of the ``top`` tabular fields by absolute relevance, labelled ``name = value``."""
    feats = tabular_features(attr, sample, modality).head(top)
    labels = [f"{f} = {v}" for f, v in zip(feats["feature"], feats["value"])]
    mod = attr.modality_of_kind("tabular", modality)
    return _bars(labels, feats["score"].to_numpy(), _title(attr, sample, f"{mod}: fields"), "relevance", path)


def plot_signal(attr: Attribution, sample: int, path: PathLike, modality: str | None = None) -> Path:
    """Saliency strip: channels x time patches as a heatmap, each channel's trace drawn over its row."""
    mod = attr.modality_of_kind("signal", modality)
    matrix, names, starts = signal_matrix(attr, sample, mod)
    values = attr.inputs[mod]["values"][sample].float().numpy()  # (C, T)
    c, t = values.shape
    p = matrix.shape[1]
    if starts is not None and p > 1:
        step = float(starts[1] - starts[0])
        extent_t = (float(starts[0]), float(starts[-1]) + step)
        times = np.linspace(extent_t[0], extent_t[0] + step * t / attr.modality_configs[mod]["patch_size"], t)
        xlabel = "time (s)"
    else:
        extent_t, times, xlabel = (0.0, float(p)), np.arange(t) / attr.modality_configs[mod]["patch_size"], "patch"
    cmap, norm = _colouring(matrix)
    fig = Figure(figsize=(9, 0.55 * c + 1.3))
    ax = fig.subplots()
    im = ax.imshow(matrix, aspect="auto", cmap=cmap, norm=norm, extent=(*extent_t, c - 0.5, -0.5))
    for ch in range(c):
        trace = values[ch]
        span = np.ptp(trace) or 1.0
        ax.plot(times, ch - 0.4 * (trace - trace.mean()) / span * 2, color="black", lw=0.5)
    ax.set_yticks(range(c), names, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(_title(attr, sample, f"{mod}: channel x time relevance"), fontsize=10, loc="left")
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _save(fig, path)


def plot_modality_shapley(shapley: ModalityShapley, path: PathLike, sample: int | None = None) -> Path:
    """Bars of the modalities' Shapley values for one sample (``sample`` = batch index), or their mean over the
    samples that have each modality (``sample=None``)."""
    if sample is None:
        summary = shapley.summary().dropna(subset=["mean_shapley"])
        labels = [f"{m} (n={n})" for m, n in zip(summary["modality"], summary["n_samples"])]
        values = summary["mean_shapley"].to_numpy()
        title = "modality contribution (mean Shapley value)"
    else:
        keep = shapley.present[sample].numpy()
        labels = [n for n, k in zip(shapley.names, keep) if k]
        values = shapley.values[sample].numpy()[keep]
        name = shapley.sample_ids[sample] if shapley.sample_ids is not None else sample
        title = (
            f"modality contribution — sample {name}: f(all)={float(shapley.full[sample]):.3g}, "
            f"f(none)={float(shapley.empty[sample]):.3g}"
        )
    return _bars(labels, values, title, "Shapley value", path)


_PLOTTERS = {
    "text": plot_text,
    "image": plot_image,
    "omics": plot_top_genes,
    "signal": plot_signal,
    "tabular": plot_tabular,
}


def explain_sample(
    attr: Attribution,
    sample: int,
    out_dir: PathLike,
    shapley: ModalityShapley | None = None,
    prefix: str | None = None,
) -> dict[str, Path]:
    """Every figure of one sample: one per modality it has (text, image, omics, signal, tabular) and the modality
    Shapley bars when ``shapley`` is given.

    Returns:
        ``{modality or "shapley": saved path}``; files are ``<out_dir>/<prefix>_<modality>.png`` with ``prefix``
        defaulting to ``sample<index>`` (the batch index: file names never carry a sample id; non-alphanumerics
        replaced by ``_``).
    """
    out_dir = Path(out_dir)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(prefix if prefix is not None else f"sample{sample}"))
    written: dict[str, Path] = {}
    for mod in attr.modalities:
        if not bool(attr.keep[mod][sample].any()):
            continue
        plot = _PLOTTERS.get(attr.kind(mod))
        if plot is not None:
            written[mod] = plot(attr, sample, out_dir / f"{stem}_{mod}.png", modality=mod)
        else:  # a plug-in kind draws its own figures (ModalitySpec.explanation_figures)
            from ..modalities import get_modality

            written.update(
                get_modality(attr.kind(mod)).explanation_figures(attr, sample, out_dir / f"{stem}_{mod}.png", mod)
            )
    if shapley is not None:
        written["shapley"] = plot_modality_shapley(shapley, out_dir / f"{stem}_shapley.png", sample=sample)
    return written
