"""A synthetic multimodal cohort with known ground truth, for tests and demos. Nothing in it is real patient data.

:func:`make_synthetic_cohort` writes paired samples for all five modality kinds (text, image 2D and 3D, omics,
signal, tabular), generated from one shared latent patient state, plus labels computed from that state, and a
manifest (:mod:`bioperceiver.data.manifest`) describing them. Everything is marked synthetic: ids start with
``synthetic:``, a ``meta_synthetic`` column is ``True``, files live under ``<output_dir>/synthetic/`` and the
manifest's ``.meta.json`` sidecar says ``"synthetic": true`` together with the recipe, its parameters and the
generative model's ground-truth weights.

Generative model
----------------
Each patient ``i`` has a latent state ``z_i ~ N(0, I_d)`` (``d = latent_dim``; :func:`sample_latents`). Latent
dimension ``k`` has a name (``cardiac``, ``renal``, ``hepatic``, ``pulmonary``, ``metabolic``, ``inflammatory``,
``neurologic``, ``hematologic``, then ``factor8``, ``factor9`` ...). Every modality is a noisy function of ``z``
(``noise`` scales every noise term), so cross-modal retrieval is learnable and labels are recoverable:

* ``text_note`` (text): a short pseudo-clinical note. Each latent dimension is observed as ``z_k + noise * e`` and
  reported, strongest first, as ``"<markedly|moderately|mildly> <elevated|reduced> <name> markers."`` (or
  ``"<name> markers within normal limits."`` below 0.25), after a random opener and among random filler sentences
  and noise-word fragments. Whole sentences are kept, in that order, while they fit a word count drawn from
  ``text_length``; fillers and noise words pad the note to exactly that count.
* ``image_2d`` (image): a ``image_size`` x ``image_size`` uint8 grayscale PNG with one Gaussian blob per latent
  dimension at fixed anchors on a circle; blob ``k`` moves radially with ``tanh(z_k)``, its brightness is
  ``sigmoid(1.5 z_k)`` and its width follows ``z_{k+1}``; plus position jitter and pixel noise.
* ``image_3d`` (image): the same blob model in a ``volume_size``^3 float32 NIfTI volume (``.nii.gz``, 1.5 mm
  isotropic spacing, affine ``diag(1.5, 1.5, 1.5, 1)`` centred on the volume), anchors on a sphere.
* ``omics_expression`` (omics): ``{gene: value}`` for a random subset (size drawn from ``genes_per_sample``) of
  ``num_genes`` genes named ``GENE0001``...; ``value = softplus(W z + b + noise * e) * L`` with a per-sample
  library-size factor ``L = 10 * lognormal(0, 0.25)`` (non-negative, counts-like floats). Stored as a JSON string.
* ``signal_ecg`` (signal): an ``.npz`` with ``values`` (C, T) float32, ``channels`` and ``sampling_rate`` (or,
  for a fraction ``irregular_signal_fraction`` of samples, sorted irregular ``timestamps`` in seconds instead).
  Channels whose name contains ``RESP`` oscillate at the respiratory rate, the others at the heart rate, both the
  same linear functions of ``z`` as the tabular ``respiratory_rate``/``heart_rate``; amplitudes are
  ``exp(0.25 u_c . z)``; a second harmonic, a random phase, baseline wander and white noise are added.
* ``tabular_ehr`` (tabular): a JSON dict of numeric features (``age``, ``heart_rate``, ``respiratory_rate``,
  ``systolic_bp``, ``creatinine``, ``glucose``, ``hemoglobin``, ``wbc``, ``bmi``), each
  ``mean + scale * (a_f . z + noise * e)`` (rounded, clipped to a plausible range), and two categorical features
  (``smoker``: ``yes``/``no``/``former`` drawn from ``softmax(2 C z)``; ``sex``: ``F``/``M`` from
  ``sign(s . z + logistic noise)``). Each feature is independently ``null`` (not measured) with probability
  ``missing_rate / 3``.

Labels are patient-level and computed from ``z`` with fixed weights (recorded in the metadata under
``ground_truth``): ``label_binary = int(w . z > 0)``; ``label_multiclass = argmax(P z)`` (``P`` is 3 x d);
``label_regression = r . z + noise * e``; survival ``T ~ Exponential(rate = 0.1 exp(beta . z))`` censored by an
independent ``C ~ Exponential(rate = 0.05)``, giving ``label_survival_time = min(T, C)`` (> 0) and
``label_survival_event = int(T <= C)``; ``label_multilabel`` lists the names of the dimensions with ``z_k > 0.5``.
The true latent is stored in ``meta_latent``.

Whole slides (opt-in, ``wsi_slides=True``; off by default so existing cohorts are unchanged): a column
``wsi_slide`` (wsi) holds, per sample, the tile-feature file of one slide (or, with ``wsi_slides_per_sample``
above 1, a list of them: a patient's slides, pooled by the wsi processor), written in the CLAM/TRIDENT layout that
``python -m bioperceiver.modalities.wsi.extract`` writes (``features`` (N, F), ``coords`` (N, 2) level-0 px,
attributes ``patch_size_level0``, ``target_mpp``, ``level0_mpp``, ``encoder``). Tiles lie on a grid inside an
elliptic "tissue" region; each tile's feature is ``tanh(A z + B u + noise * e)`` where ``u`` is a per-tile
nuisance vector and ``A``, ``B`` fixed weights, so the slide-level signal is spread over the tiles. Its presence
(probability ``1 - missing_rate``) is drawn from its own stream: the other modalities are the same with or
without it. These are synthetic features, not pixels: no slide image is written.

With ``samples_per_patient > 1`` the samples of a patient share ``z`` and its labels, with independent noise.

Missingness: each of the six modality cells of a sample is independently absent (null) with probability
``missing_rate``; when that removes all six, one modality chosen uniformly at random is kept, so every sample has
at least one modality (the effective per-modality missing rate is ``missing_rate - missing_rate**6 / 6``).

Determinism: the generative model's weights depend only on the shapes (``latent_dim``, ``num_genes``, the
channel count), not on ``seed``, so cohorts drawn with different seeds share one model (one can be a training set
and another a held-out test set). ``seed`` drives the latents and every noise draw; each sample's noise comes from
its own stream keyed by ``(seed, patient, sample)``. Re-running with the same arguments writes byte-identical
files (PNG, gzip and zip headers carry no timestamps).

Command line::

    python -m bioperceiver.data.recipes.synthetic --output_dir /tmp/synth --num_patients 64
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..manifest import write_manifest

logger = logging.getLogger(__name__)

RECIPE = "bioperceiver.data.recipes.synthetic"
ID_PREFIX = "synthetic:"
SYNTHETIC_DIR = "synthetic"
MANIFEST_FORMATS = {"parquet": ".parquet", "csv": ".csv", "jsonl": ".jsonl"}

MODALITIES = {
    "text_note": "text",
    "image_2d": "image",
    "image_3d": "image",
    "omics_expression": "omics",
    "signal_ecg": "signal",
    "tabular_ehr": "tabular",
}
LABELS = {
    "label_binary": "binary",
    "label_multiclass": "multiclass",
    "label_regression": "regression",
    "label_survival_time": "survival_time",
    "label_survival_event": "survival_event",
    "label_multilabel": "multilabel",
}
NUM_CLASSES = 3
MULTILABEL_THRESHOLD = 0.5
VOXEL_SPACING_MM = 1.5
SURVIVAL_BASE_RATE = 0.1
CENSORING_RATE = 0.05

GENERATIVE_MODEL = (
    "z ~ N(0, I_latent_dim) per patient; every modality is a noisy function of z (blob images/volumes, "
    "latent-driven note wording, softplus(Wz+b) expression, heart/respiratory-rate sinusoids, linear EHR features); "
    "labels are fixed functions of z (see ground_truth); each modality missing with prob missing_rate, at least one "
    "kept per sample"
)

_LATENT_NAMES = (
    "cardiac",
    "renal",
    "hepatic",
    "pulmonary",
    "metabolic",
    "inflammatory",
    "neurologic",
    "hematologic",
)
# (name, mean, scale, decimals, lower, upper)
_TABULAR_NUMERIC = (
    ("age", 60.0, 12.0, 0, 18.0, 100.0),
    ("heart_rate", 75.0, 12.0, 0, 30.0, 200.0),
    ("respiratory_rate", 16.0, 3.0, 1, 4.0, 60.0),
    ("systolic_bp", 125.0, 15.0, 0, 60.0, 250.0),
    ("creatinine", 1.0, 0.25, 2, 0.1, 15.0),
    ("glucose", 100.0, 18.0, 0, 20.0, 600.0),
    ("hemoglobin", 13.5, 1.5, 1, 3.0, 25.0),
    ("wbc", 7.5, 2.0, 1, 0.5, 100.0),
    ("bmi", 27.0, 4.0, 1, 10.0, 80.0),
)
_SMOKER_CATEGORIES = ("no", "former", "yes")
_OPENERS = (
    "Follow-up visit.",
    "Routine clinic review.",
    "Patient seen today.",
    "Outpatient assessment.",
    "Annual check-up.",
)
_FILLERS = (
    "Vitals reviewed.",
    "No acute distress.",
    "Medications unchanged.",
    "Plan discussed with patient.",
    "History otherwise unremarkable.",
    "Will recheck at next visit.",
)
_NOISE_WORDS = ("noted", "again", "stable", "today", "overall", "reportedly", "also", "currently")

# independent random streams, keyed by a leading constant
_STREAM_LATENT = 0
_STREAM_LABELS = 1
_STREAM_SAMPLE = 2
_STREAM_WSI = 3
_MODEL_SEED = 20240917
_MODEL_STREAM_LABELS = 1
_MODEL_STREAM_GENES = 2
_MODEL_STREAM_CHANNELS = 3
_MODEL_STREAM_TABULAR = 4


def latent_names(latent_dim: int) -> list[str]:
    """Names of the latent dimensions (used in notes and as ``label_multilabel`` classes)."""
    return [_LATENT_NAMES[k] if k < len(_LATENT_NAMES) else f"factor{k}" for k in range(latent_dim)]


def gene_names(num_genes: int) -> list[str]:
    """``GENE0001``, ``GENE0002``, ..."""
    width = max(4, len(str(num_genes)))
    return [f"GENE{i + 1:0{width}d}" for i in range(num_genes)]


def sample_latents(num_patients: int, latent_dim: int, seed: int) -> np.ndarray:
    """The latent states ``z ~ N(0, I)``, shape ``(num_patients, latent_dim)``, float64.

    Pure and prefix-stable: row ``i`` depends only on ``(seed, latent_dim, i)``.
    """
    if num_patients < 0 or latent_dim < 1:
        raise ValueError(f"need num_patients >= 0 and latent_dim >= 1, got {num_patients}, {latent_dim}")
    rng = np.random.default_rng([_STREAM_LATENT, int(seed)])
    return rng.standard_normal((int(num_patients), int(latent_dim)))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def _unit_rows(m: np.ndarray) -> np.ndarray:
    return m / np.maximum(np.linalg.norm(m, axis=-1, keepdims=True), 1e-12)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


@dataclass
class GenerativeModel:
    """The fixed weights of the generative model (independent of the sampling seed)."""

    latent_dim: int
    w_binary: np.ndarray  # (d,)
    p_multiclass: np.ndarray  # (3, d)
    r_regression: np.ndarray  # (d,)
    beta_survival: np.ndarray  # (d,)
    gene_weights: np.ndarray  # (G, d)
    gene_bias: np.ndarray  # (G,)
    channel_amplitude: np.ndarray  # (C, d)
    tabular_loadings: np.ndarray  # (F, d)
    smoker_weights: np.ndarray  # (3, d)
    sex_weights: np.ndarray  # (d,)

    @classmethod
    def build(cls, latent_dim: int, num_genes: int, num_channels: int) -> GenerativeModel:
        d = latent_dim
        rng = np.random.default_rng([_MODEL_SEED, _MODEL_STREAM_LABELS, d])
        w_binary = _unit(rng.standard_normal(d))
        p_multiclass = rng.standard_normal((NUM_CLASSES, d))
        r_regression = _unit(rng.standard_normal(d))
        beta_survival = 0.7 * _unit(rng.standard_normal(d))
        grng = np.random.default_rng([_MODEL_SEED, _MODEL_STREAM_GENES, d])
        gene_weights = grng.standard_normal((num_genes, d)) / math.sqrt(d)
        gene_bias = np.random.default_rng([_MODEL_SEED, _MODEL_STREAM_GENES + 100, d]).normal(0.0, 0.5, num_genes)
        crng = np.random.default_rng([_MODEL_SEED, _MODEL_STREAM_CHANNELS, d])
        channel_amplitude = _unit_rows(crng.standard_normal((num_channels, d)))
        trng = np.random.default_rng([_MODEL_SEED, _MODEL_STREAM_TABULAR, d])
        tabular_loadings = _unit_rows(trng.standard_normal((len(_TABULAR_NUMERIC), d)))
        smoker_weights = _unit_rows(trng.standard_normal((len(_SMOKER_CATEGORIES), d)))
        sex_weights = _unit(trng.standard_normal(d))
        return cls(
            d,
            w_binary,
            p_multiclass,
            r_regression,
            beta_survival,
            gene_weights,
            gene_bias,
            channel_amplitude,
            tabular_loadings,
            smoker_weights,
            sex_weights,
        )

    def ground_truth(self) -> dict[str, Any]:
        """The label weights, as JSON-ready lists (written to the manifest metadata)."""
        return {
            "w_binary": self.w_binary.tolist(),
            "p_multiclass": self.p_multiclass.tolist(),
            "r_regression": self.r_regression.tolist(),
            "beta_survival": self.beta_survival.tolist(),
            "survival_base_rate": SURVIVAL_BASE_RATE,
            "censoring_rate": CENSORING_RATE,
            "multilabel_threshold": MULTILABEL_THRESHOLD,
            "tabular_loadings": {
                name: row.tolist() for (name, *_), row in zip(_TABULAR_NUMERIC, self.tabular_loadings)
            },
        }


def patient_labels(model: GenerativeModel, z: np.ndarray, rng: np.random.Generator, noise: float) -> dict[str, Any]:
    """The ground-truth labels of one patient with latent ``z``."""
    names = latent_names(model.latent_dim)
    t_event = rng.exponential(1.0 / (SURVIVAL_BASE_RATE * math.exp(float(model.beta_survival @ z))))
    t_censor = rng.exponential(1.0 / CENSORING_RATE)
    regression = float(model.r_regression @ z) + noise * float(rng.standard_normal())
    return {
        "label_binary": int(float(model.w_binary @ z) > 0),
        "label_multiclass": int(np.argmax(model.p_multiclass @ z)),
        "label_regression": regression,
        "label_survival_time": max(float(min(t_event, t_censor)), 1e-6),
        "label_survival_event": int(t_event <= t_censor),
        "label_multilabel": [names[k] for k in range(model.latent_dim) if z[k] > MULTILABEL_THRESHOLD],
    }


# --------------------------------------------------------------------------------------------- modality generators


def _noise_fragment(rng: np.random.Generator, n: int) -> str:
    words = [str(w) for w in rng.choice(_NOISE_WORDS, size=n)]
    return " ".join([words[0].capitalize(), *words[1:]]) + "."


def make_note(z: np.ndarray, rng: np.random.Generator, noise: float, text_length: tuple[int, int]) -> str:
    """A pseudo-clinical note whose findings follow ``z``; its word count is drawn from ``text_length``."""
    names = latent_names(len(z))
    observed = z + noise * rng.standard_normal(len(z))
    findings = []
    for k in np.argsort(-np.abs(observed), kind="stable"):
        v = float(observed[k])
        if abs(v) < 0.25:
            findings.append(f"{names[k].capitalize()} markers within normal limits.")
            continue
        adverb = "Markedly" if abs(v) > 1.5 else "Moderately" if abs(v) > 0.75 else "Mildly"
        findings.append(f"{adverb} {'elevated' if v > 0 else 'reduced'} {names[k]} markers.")
    sentences = [str(rng.choice(_OPENERS))]
    for finding in findings:
        sentences.append(finding)
        if rng.random() < 0.3:
            sentences.append(str(rng.choice(_FILLERS)))
        if rng.random() < noise:  # a fragment of noise words between sentences
            sentences.append(_noise_fragment(rng, int(rng.integers(1, 3))))
    n_words = int(rng.integers(text_length[0], text_length[1] + 1))
    words: list[str] = []
    for sentence in sentences:  # whole sentences, strongest findings first, while they fit
        if len(words) + len(sentence.split()) > n_words:
            break
        words.extend(sentence.split())
    while len(words) < n_words:  # pad with fillers, then noise words, to the exact word count
        filler = str(rng.choice(_FILLERS)).split()
        if len(words) + len(filler) <= n_words:
            words.extend(filler)
        else:
            words.extend(_noise_fragment(rng, n_words - len(words)).split())
    return " ".join(words)


def _anchors_2d(d: int) -> np.ndarray:
    angles = 2 * np.pi * np.arange(d) / d + np.pi / 4
    return np.stack([np.cos(angles), np.sin(angles)], axis=-1)  # unit directions (d, 2)


def _anchors_3d(d: int) -> np.ndarray:
    # Fibonacci sphere: well-spread unit directions
    i = np.arange(d) + 0.5
    polar = np.arccos(1 - 2 * i / d)
    azimuth = np.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], axis=-1)


def _blob_field(z: np.ndarray, rng: np.random.Generator, noise: float, size: int, directions: np.ndarray) -> np.ndarray:
    """Sum of one Gaussian blob per latent dimension on a ``size``^ndim grid, values roughly in [0, 1]."""
    d, ndim = directions.shape
    centre = (size - 1) / 2.0
    radius = 0.28 * size + 0.1 * size * np.tanh(z)  # (d,)
    centres = centre + directions * radius[:, None] + noise * 0.05 * size * rng.standard_normal((d, ndim))
    amplitude = 0.2 + 0.8 * _sigmoid(1.5 * z)
    sigma = size * (0.05 + 0.04 * _sigmoid(np.roll(z, -1)))
    axes = np.meshgrid(*([np.arange(size, dtype=np.float64)] * ndim), indexing="ij")
    grid = np.stack(axes, axis=-1)  # (size,)*ndim + (ndim,)
    field = np.zeros((size,) * ndim)
    for k in range(d):
        dist2 = ((grid - centres[k]) ** 2).sum(-1)
        field += amplitude[k] * np.exp(-dist2 / (2 * sigma[k] ** 2))
    return field + 0.05 + noise * 0.3 * rng.standard_normal(field.shape)


def make_image_2d(z: np.ndarray, rng: np.random.Generator, noise: float, size: int) -> np.ndarray:
    """A ``size`` x ``size`` uint8 image of latent-driven blobs."""
    field = _blob_field(z, rng, noise, size, _anchors_2d(len(z)))
    return np.clip(np.rint(field * 255.0), 0, 255).astype(np.uint8)


def make_volume(z: np.ndarray, rng: np.random.Generator, noise: float, size: int) -> np.ndarray:
    """A ``size``^3 float32 volume of latent-driven blobs."""
    return _blob_field(z, rng, noise, size, _anchors_3d(len(z))).astype(np.float32)


def volume_affine(size: int, spacing: float = VOXEL_SPACING_MM) -> np.ndarray:
    """``diag(spacing, spacing, spacing, 1)`` with the volume centred on the origin (RAS mm)."""
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -spacing * (size - 1) / 2.0
    return affine


def make_expression(
    model: GenerativeModel,
    z: np.ndarray,
    rng: np.random.Generator,
    noise: float,
    genes: Sequence[str],
    genes_per_sample: tuple[int, int],
) -> dict[str, float]:
    """``{gene: value}`` for a random subset of genes; ``softplus(W z + b + noise) * library size``."""
    num = int(rng.integers(genes_per_sample[0], genes_per_sample[1] + 1))
    idx = np.sort(rng.choice(len(genes), size=num, replace=False))
    library = 10.0 * rng.lognormal(0.0, 0.25)
    linear = model.gene_weights[idx] @ z + model.gene_bias[idx] + noise * rng.standard_normal(num)
    values = _softplus(linear) * library
    return {genes[i]: round(float(v), 3) for i, v in zip(idx, values)}


def _heart_rate_bpm(model: GenerativeModel, z: np.ndarray, eps: float) -> float:
    _, mean, scale, *_ = _TABULAR_NUMERIC[1]
    return mean + scale * (float(model.tabular_loadings[1] @ z) + eps)


def _resp_rate_bpm(model: GenerativeModel, z: np.ndarray, eps: float) -> float:
    _, mean, scale, *_ = _TABULAR_NUMERIC[2]
    return mean + scale * (float(model.tabular_loadings[2] @ z) + eps)


def make_signal(
    model: GenerativeModel,
    z: np.ndarray,
    rng: np.random.Generator,
    noise: float,
    channels: Sequence[str],
    seconds: float,
    sampling_rate: float,
    irregular: bool,
) -> dict[str, np.ndarray]:
    """The ``.npz`` arrays of one recording: ``values`` (C, T), ``channels`` and ``sampling_rate`` or ``timestamps``."""
    n = max(2, round(seconds * sampling_rate))
    if irregular:
        gaps = rng.exponential(1.0, n)
        t = np.cumsum(gaps)
        t = (t - t[0]) / (t[-1] - t[0]) * (n - 1) / sampling_rate  # strictly increasing, same span as regular
    else:
        t = np.arange(n) / sampling_rate
    hr = max(_heart_rate_bpm(model, z, noise * float(rng.standard_normal())), 20.0) / 60.0
    rr = max(_resp_rate_bpm(model, z, noise * float(rng.standard_normal())), 3.0) / 60.0
    values = np.empty((len(channels), n), dtype=np.float64)
    for c, name in enumerate(channels):
        freq = rr if "RESP" in name.upper() else hr
        amp = math.exp(0.25 * float(model.channel_amplitude[c] @ z))
        phase, phase2 = rng.uniform(0, 2 * np.pi, 2)
        wave = np.sin(2 * np.pi * freq * t + phase) + 0.4 * np.sin(4 * np.pi * freq * t + phase2)
        wander = 0.1 * np.sin(2 * np.pi * 0.05 * t + rng.uniform(0, 2 * np.pi))
        values[c] = amp * wave + wander + noise * rng.standard_normal(n)
    arrays = {"values": values.astype(np.float32), "channels": np.array([str(c) for c in channels])}
    if irregular:
        arrays["timestamps"] = t.astype(np.float64)
    else:
        arrays["sampling_rate"] = np.array(float(sampling_rate))
    return arrays


def make_tabular(
    model: GenerativeModel, z: np.ndarray, rng: np.random.Generator, noise: float, feature_missing_rate: float
) -> dict[str, Any]:
    """EHR-like features linear in ``z`` (numeric) or driven by it (categorical); some are ``None``."""
    out: dict[str, Any] = {}
    eps = noise * rng.standard_normal(len(_TABULAR_NUMERIC))
    for (name, mean, scale, decimals, lower, upper), loading, e in zip(_TABULAR_NUMERIC, model.tabular_loadings, eps):
        value = float(np.clip(mean + scale * (float(loading @ z) + e), lower, upper))
        out[name] = round(value) if decimals == 0 else round(value, decimals)
    logits = 2.0 * model.smoker_weights @ z
    probs = np.exp(logits - logits.max())
    out["smoker"] = _SMOKER_CATEGORIES[int(rng.choice(len(_SMOKER_CATEGORIES), p=probs / probs.sum()))]
    out["sex"] = "F" if float(model.sex_weights @ z) + noise * float(rng.logistic()) > 0 else "M"
    drop = rng.random(len(out)) < feature_missing_rate
    return {k: (None if d else v) for (k, v), d in zip(out.items(), drop)}


# --------------------------------------------------------------------------------------------------- file writing


@dataclass
class WsiFeatureModel:
    """Fixed weights of the synthetic tile features: ``feature = tanh(A z + B u + noise * e)``."""

    latent: np.ndarray  # (F, d)
    nuisance: np.ndarray  # (F, 4)

    @classmethod
    def build(cls, latent_dim: int, feature_dim: int) -> WsiFeatureModel:
        rng = np.random.default_rng([_MODEL_SEED, 5, latent_dim, feature_dim])
        return cls(
            rng.normal(size=(feature_dim, latent_dim)) / math.sqrt(latent_dim), rng.normal(size=(feature_dim, 4)) * 0.5
        )


def write_slide_features(
    path: Path, model: WsiFeatureModel, z: np.ndarray, rng: np.random.Generator, noise: float, tiles: tuple[int, int]
) -> None:
    """One synthetic slide's tile features in the CLAM/TRIDENT ``.h5`` layout (see the module docstring)."""
    import h5py

    n = int(rng.integers(tiles[0], tiles[1] + 1))
    side = math.ceil(math.sqrt(n / 0.7)) + 1
    gy, gx = np.mgrid[0:side, 0:side]
    inside = ((gx - side / 2 + 0.5) / (side / 2)) ** 2 + ((gy - side / 2 + 0.5) / (side / 2)) ** 2 <= 1.0
    grid = np.stack([gx[inside], gy[inside]], axis=1)[:n]
    patch = 448  # 224 px at 0.5 µm/px on a 0.25 µm/px scan
    coords = (grid * patch).astype(np.int64)
    u = rng.normal(size=(len(coords), model.nuisance.shape[1]))
    feats = np.tanh(
        z @ model.latent.T + u @ model.nuisance.T + noise * rng.normal(size=(len(coords), len(model.latent)))
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w", track_order=True) as f:
        f.create_dataset("features", data=feats.astype(np.float32), track_times=False)
        f.create_dataset("coords", data=coords, track_times=False)
        f.attrs["patch_size_level0"] = patch
        f.attrs["target_mpp"] = 0.5
        f.attrs["level0_mpp"] = 0.25
        f.attrs["encoder"] = "synthetic"


def save_npz_deterministic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but with fixed zip timestamps, so equal arrays give equal bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(arr), allow_pickle=False)
            zf.writestr(info, buf.getvalue())


def _save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(image).save(path, format="PNG")


def _save_nifti(path: Path, volume: np.ndarray) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(volume, volume_affine(volume.shape[0]))
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("bioperceiver", "numpy", "pandas", "pillow", "nibabel", "pyarrow"):
        with contextlib.suppress(importlib_metadata.PackageNotFoundError):
            out[pkg] = importlib_metadata.version(pkg)
    return out


def _check_range(name: str, value: Sequence[int], minimum: int) -> tuple[int, int]:
    lo, hi = (int(v) for v in value)
    if lo < minimum or hi < lo:
        raise ValueError(f"{name} must be (min, max) with {minimum} <= min <= max, got {tuple(value)}")
    return lo, hi


# ----------------------------------------------------------------------------------------------------- the recipe


def make_synthetic_cohort(
    output_dir: str | Path,
    *,
    num_patients: int = 64,
    samples_per_patient: int = 1,
    latent_dim: int = 4,
    missing_rate: float = 0.3,
    image_size: int = 32,
    volume_size: int = 16,
    text_length: tuple[int, int] = (8, 24),
    num_genes: int = 200,
    genes_per_sample: tuple[int, int] = (50, 150),
    signal_channels: Sequence[str] = ("ECG_I", "ECG_II", "RESP"),
    signal_seconds: float = 4.0,
    sampling_rate: float = 100.0,
    irregular_signal_fraction: float = 0.0,
    noise: float = 0.1,
    seed: int = 0,
    manifest_format: str = "parquet",
    wsi_slides: bool = False,
    wsi_tiles: tuple[int, int] = (24, 64),
    wsi_feature_dim: int = 16,
    wsi_slides_per_sample: int = 1,
) -> Path:
    """Write a synthetic cohort (files under ``output_dir/synthetic/``) and its manifest; return the manifest path.

    See the module docstring for the generative model. The manifest is ``output_dir/manifest.<ext>``
    (``manifest_format``: ``parquet``, ``csv`` or ``jsonl``) with a ``.meta.json`` sidecar. In CSV manifests the
    list-valued columns (``label_multilabel``, ``meta_latent``) are JSON strings; Parquet/JSONL keep them as lists.
    """
    if manifest_format not in MANIFEST_FORMATS:
        raise ValueError(f"manifest_format must be one of {sorted(MANIFEST_FORMATS)}, got {manifest_format!r}")
    if num_patients < 1 or samples_per_patient < 1 or latent_dim < 1:
        raise ValueError("num_patients, samples_per_patient and latent_dim must all be >= 1")
    if not 0.0 <= missing_rate <= 1.0 or not 0.0 <= irregular_signal_fraction <= 1.0:
        raise ValueError("missing_rate and irregular_signal_fraction must lie in [0, 1]")
    if image_size < 4 or volume_size < 4:
        raise ValueError("image_size and volume_size must be >= 4")
    if num_genes < 1 or noise < 0 or signal_seconds <= 0 or sampling_rate <= 0:
        raise ValueError("need num_genes >= 1, noise >= 0, signal_seconds > 0 and sampling_rate > 0")
    signal_channels = [str(c) for c in signal_channels]
    if not signal_channels:
        raise ValueError("signal_channels must name at least one channel")
    text_length = _check_range("text_length", text_length, 1)
    genes_per_sample = _check_range("genes_per_sample", genes_per_sample, 1)
    genes_per_sample = (min(genes_per_sample[0], num_genes), min(genes_per_sample[1], num_genes))

    params = {
        "num_patients": int(num_patients),
        "samples_per_patient": int(samples_per_patient),
        "latent_dim": int(latent_dim),
        "missing_rate": float(missing_rate),
        "image_size": int(image_size),
        "volume_size": int(volume_size),
        "text_length": list(text_length),
        "num_genes": int(num_genes),
        "genes_per_sample": list(genes_per_sample),
        "signal_channels": list(signal_channels),
        "signal_seconds": float(signal_seconds),
        "sampling_rate": float(sampling_rate),
        "irregular_signal_fraction": float(irregular_signal_fraction),
        "noise": float(noise),
        "seed": int(seed),
        "manifest_format": manifest_format,
    }
    if wsi_slides:
        wsi_tiles = _check_range("wsi_tiles", wsi_tiles, 1)
        if wsi_feature_dim < 1 or wsi_slides_per_sample < 1:
            raise ValueError("wsi_feature_dim and wsi_slides_per_sample must be >= 1")
        params.update(
            wsi_slides=True,
            wsi_tiles=list(wsi_tiles),
            wsi_feature_dim=int(wsi_feature_dim),
            wsi_slides_per_sample=int(wsi_slides_per_sample),
        )
    start = time.perf_counter()
    out = Path(output_dir)
    dirs = {
        "image_2d": Path(SYNTHETIC_DIR) / "images",
        "image_3d": Path(SYNTHETIC_DIR) / "volumes",
        "signal_ecg": Path(SYNTHETIC_DIR) / "signals",
    }
    if wsi_slides:
        dirs["wsi_slide"] = Path(SYNTHETIC_DIR) / "slides"
        wsi_model = WsiFeatureModel.build(latent_dim, wsi_feature_dim)
    for rel in dirs.values():
        (out / rel).mkdir(parents=True, exist_ok=True)

    model = GenerativeModel.build(latent_dim, num_genes, len(signal_channels))
    latents = sample_latents(num_patients, latent_dim, seed)
    genes = gene_names(num_genes)
    columns = list(MODALITIES)
    width = max(5, len(str(num_patients - 1)))
    rows = []
    written: set[Path] = set()
    for p in range(num_patients):
        z = latents[p]
        labels = patient_labels(model, z, np.random.default_rng([_STREAM_LABELS, int(seed), p]), noise)
        patient = f"patient-{p:0{width}d}"
        for s in range(samples_per_patient):
            rng = np.random.default_rng([_STREAM_SAMPLE, int(seed), p, s])
            stem = f"{patient}_sample-{s}"
            present = rng.random(len(columns)) >= missing_rate
            if not present.any():
                present[int(rng.integers(len(columns)))] = True
            row: dict[str, Any] = {"sample_id": f"{ID_PREFIX}{stem}", "patient_id": f"{ID_PREFIX}{patient}"}
            # Every generator draws from its own child stream, so toggling one modality leaves the others unchanged.
            streams = dict(zip(columns, rng.spawn(len(columns))))
            for col, keep in zip(columns, present):
                if not keep:
                    row[col] = None
                    continue
                r = streams[col]
                if col == "text_note":
                    row[col] = make_note(z, r, noise, text_length)
                elif col == "image_2d":
                    rel = dirs[col] / f"{stem}.png"
                    _save_png(out / rel, make_image_2d(z, r, noise, image_size))
                    row[col] = rel.as_posix()
                    written.add(out / rel)
                elif col == "image_3d":
                    rel = dirs[col] / f"{stem}.nii.gz"
                    _save_nifti(out / rel, make_volume(z, r, noise, volume_size))
                    row[col] = rel.as_posix()
                    written.add(out / rel)
                elif col == "omics_expression":
                    expr = make_expression(model, z, r, noise, genes, genes_per_sample)
                    row[col] = json.dumps(expr, separators=(",", ":"))
                elif col == "signal_ecg":
                    irregular = bool(r.random() < irregular_signal_fraction)
                    arrays = make_signal(model, z, r, noise, signal_channels, signal_seconds, sampling_rate, irregular)
                    rel = dirs[col] / f"{stem}.npz"
                    save_npz_deterministic(out / rel, arrays)
                    row[col] = rel.as_posix()
                    written.add(out / rel)
                elif col == "tabular_ehr":
                    row[col] = json.dumps(make_tabular(model, z, r, noise, missing_rate / 3.0), separators=(",", ":"))
            if wsi_slides:
                wrng = np.random.default_rng([_STREAM_WSI, int(seed), p, s])
                if wrng.random() >= missing_rate:
                    rels = []
                    for k in range(wsi_slides_per_sample):
                        rel = dirs["wsi_slide"] / f"{stem}_slide-{k}.h5"
                        write_slide_features(out / rel, wsi_model, z, wrng, noise, wsi_tiles)
                        rels.append(rel.as_posix())
                        written.add(out / rel)
                    row["wsi_slide"] = rels[0] if wsi_slides_per_sample == 1 else rels
                else:
                    row["wsi_slide"] = None
            row.update(labels)
            row["label_multilabel"] = list(labels["label_multilabel"])
            row["meta_synthetic"] = True
            row["meta_latent"] = [float(v) for v in z]
            row["meta_sample_index"] = s
            rows.append(row)

    table = pd.DataFrame(rows)
    if wsi_slides:
        columns = [*columns, "wsi_slide"]
        if manifest_format == "csv" and wsi_slides_per_sample > 1:
            table["wsi_slide"] = table["wsi_slide"].map(lambda v: json.dumps(v) if isinstance(v, list) else v)
    for col in columns:
        table[col] = table[col].astype(object)
    if manifest_format == "csv":
        for col in ("label_multilabel", "meta_latent"):
            table[col] = table[col].map(json.dumps)

    stale = [f for rel in dirs.values() for f in sorted((out / rel).iterdir()) if f not in written]
    if stale:
        logger.warning(
            "%d file(s) under %s are not part of this cohort (left from an earlier run?); the manifest ignores them",
            len(stale),
            out / SYNTHETIC_DIR,
        )

    present_counts = {col: int(table[col].notna().sum()) for col in columns}
    metadata = {
        "synthetic": True,
        "recipe": RECIPE,
        "description": "Synthetic multimodal cohort with known ground truth; not real patient data.",
        "params": params,
        "generative_model": GENERATIVE_MODEL,
        "modalities": {**MODALITIES, **({"wsi_slide": "wsi"} if wsi_slides else {})},
        "labels": dict(LABELS),
        "num_classes": {"label_multiclass": NUM_CLASSES},
        "multilabel_classes": latent_names(latent_dim),
        "survival": {"time": "label_survival_time", "event": "label_survival_event"},
        "latent_names": latent_names(latent_dim),
        "ground_truth": model.ground_truth(),
        "num_samples": len(table),
        "num_patients": int(num_patients),
        "modality_counts": present_counts,
        "files": {col: rel.as_posix() for col, rel in dirs.items()},
        "package_versions": _versions(),
        "licence": "CC0-1.0 (generated data)",
    }
    path = write_manifest(table, out / f"manifest{MANIFEST_FORMATS[manifest_format]}", metadata)
    logger.info(
        "wrote synthetic cohort: %d samples of %d patients to %s in %.2f s (present per modality: %s)",
        len(table),
        num_patients,
        path,
        time.perf_counter() - start,
        present_counts,
    )
    return path


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m bioperceiver.data.recipes.synthetic",
        description="Write a synthetic multimodal cohort with known ground-truth labels (for tests and demos).",
    )
    parser.add_argument("--output_dir", required=True, help="folder for manifest.<ext> and synthetic/ files")
    parser.add_argument("--num_patients", type=int, default=64)
    parser.add_argument("--samples_per_patient", type=int, default=1)
    parser.add_argument("--latent_dim", type=int, default=4)
    parser.add_argument("--missing_rate", type=float, default=0.3)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--volume_size", type=int, default=16)
    parser.add_argument("--text_length", type=int, nargs=2, default=(8, 24), metavar=("MIN", "MAX"))
    parser.add_argument("--num_genes", type=int, default=200)
    parser.add_argument("--genes_per_sample", type=int, nargs=2, default=(50, 150), metavar=("MIN", "MAX"))
    parser.add_argument("--signal_channels", nargs="+", default=["ECG_I", "ECG_II", "RESP"])
    parser.add_argument("--signal_seconds", type=float, default=4.0)
    parser.add_argument("--sampling_rate", type=float, default=100.0)
    parser.add_argument("--irregular_signal_fraction", type=float, default=0.0)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--manifest_format", choices=sorted(MANIFEST_FORMATS), default="parquet")
    parser.add_argument("--wsi_slides", action="store_true", help="add a wsi_slide column of tile-feature files")
    parser.add_argument("--wsi_tiles", type=int, nargs=2, default=(24, 64), metavar=("MIN", "MAX"))
    parser.add_argument("--wsi_feature_dim", type=int, default=16)
    parser.add_argument("--wsi_slides_per_sample", type=int, default=1)
    parser.add_argument("--log_level", default="INFO")
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=args.pop("log_level").upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    output_dir = args.pop("output_dir")
    args["text_length"] = tuple(args["text_length"])
    args["genes_per_sample"] = tuple(args["genes_per_sample"])
    args["wsi_tiles"] = tuple(args["wsi_tiles"])
    path = make_synthetic_cohort(output_dir, **args)
    print(path)
    return path


if __name__ == "__main__":
    main()
