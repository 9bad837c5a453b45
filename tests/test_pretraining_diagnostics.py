"""Metric functions of benchmarks/pretraining_diagnostics.py on embeddings whose answers are known."""

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "pretraining_diagnostics", ROOT / "benchmarks" / "pretraining_diagnostics.py"
)
diag = importlib.util.module_from_spec(_spec)
sys.modules["diagnostics"] = diag
_spec.loader.exec_module(diag)


def test_effective_rank_of_known_spectra():
    assert diag.effective_rank(spectrum=np.ones(7)) == pytest.approx(7.0)
    assert diag.effective_rank(spectrum=np.array([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    # p = (0.5, 0.25, 0.25): exp(H) = exp(1.5 ln 2) = 2 ** 1.5
    assert diag.effective_rank(spectrum=np.array([2.0, 1.0, 1.0])) == pytest.approx(2**1.5)
    assert diag.effective_rank(spectrum=np.zeros(4)) == 0.0


def test_effective_rank_of_embeddings_with_a_known_spectrum():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 16))
    q, _ = np.linalg.qr(a - a.mean(0))  # orthonormal, zero-mean columns: x below is already centred
    basis, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    s = np.array([4.0, 2.0, 1.0, 1.0] + [0.0] * 12)
    x = q @ np.diag(s) @ basis.T  # (50, 16) with singular values s
    assert diag.singular_values(x) == pytest.approx(s, abs=1e-9)
    p = s[:4] / s[:4].sum()
    expected = math.exp(-(p * np.log(p)).sum())
    assert diag.effective_rank(x) == pytest.approx(expected)
    # a constant embedding (collapse) has no spread: rank 0 after centring
    assert diag.effective_rank(np.ones((10, 8))) == 0.0


def test_alignment_of_known_pairs():
    x = np.eye(4)
    assert diag.alignment(x, x) == pytest.approx(0.0)
    assert diag.alignment(x, -x) == pytest.approx(4.0)  # opposite unit vectors: distance 2, squared 4
    assert diag.alignment(x, np.roll(x, 1, axis=0)) == pytest.approx(2.0)  # orthogonal: distance sqrt 2
    assert diag.alignment(3 * x, x) == pytest.approx(0.0)  # scale-free: embeddings are L2-normalised


def test_uniformity_and_random_cosine_of_known_embeddings():
    same = np.tile([[1.0, 0.0, 0.0]], (20, 1))
    assert diag.uniformity(same) == pytest.approx(0.0)  # collapse
    assert diag.mean_random_cosine(same) == pytest.approx(1.0)
    # +-e1: pairs at distance 0 or 2; 2 rows -> one pair at distance 2: log exp(-2 * 4) = -8
    assert diag.uniformity(np.array([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-8.0)
    # the 2k signed basis vectors: of the pairs, 1/(2k-1) are opposite (|d|^2 4), the rest orthogonal (2)
    k = 4
    pts = np.concatenate([np.eye(k), -np.eye(k)])
    n = 2 * k
    expected = math.log(((n - 2) * math.exp(-4.0) + 1 * math.exp(-8.0)) / (n - 1))
    assert diag.uniformity(pts) == pytest.approx(expected)
    assert diag.mean_random_cosine(pts, n_pairs=50000) == pytest.approx(-1 / (n - 1), abs=0.01)
    spread = np.random.default_rng(0).normal(size=(500, 32))
    assert diag.uniformity(spread) < diag.uniformity(spread + 5.0) < 0.0
