"""Metric functions of benchmarks/pretraining_diagnostics.py on embeddings whose answers are known."""

import math
from pathlib import Path

import numpy as np
import pytest
from script_loader import load_script

diag = load_script("benchmarks/pretraining_diagnostics.py")


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


def test_script_end_to_end_on_a_tiny_model(tmp_path):
    """A tiny text + tabular backbone saved as a pretraining ``final/`` folder, a manifest with findings and
    survival labels: the script writes every section, the random init differs from the pretrained weights, and
    the single-keyword probe finds the word that decides a finding."""
    import json as _json

    import pandas as pd

    from bioperceiver.data import BioPerceiverProcessor, read_manifest, write_manifest
    from bioperceiver.factory import create_model

    rng = np.random.default_rng(0)
    rows = []
    for i in range(120):
        effusion, cardio = bool(rng.random() < 0.4), bool(rng.random() < 0.5)
        words = ["derrame" if effusion else "normal", "cardiomegalia" if cardio else "silueta", "sin", "cambios"]
        rows.append(
            {
                "sample_id": f"s{i}",
                "patient_id": f"p{i // 2}",
                "split": ["train", "train", "test"][(i // 2) % 3],
                "text_report": " ".join(rng.permutation(words)),
                "tabular_clinical": _json.dumps(
                    {"age": float(rng.integers(20, 90)), "sex": str(rng.choice(["F", "M"]))}
                ),
                "label_findings": [f for f, on in (("effusion", effusion), ("cardiomegaly", cardio)) if on],
                "label_survival_time": float(rng.exponential(10.0)),
                "label_survival_event": int(rng.random() < 0.7),
                "meta_source": "cohort_a",
            }
        )
    path = tmp_path / "manifest.parquet"
    write_manifest(pd.DataFrame(rows), path)
    m = read_manifest(path)
    proc = BioPerceiverProcessor.from_manifest(
        m, {"text_report": {"vocab_size": 60, "min_frequency": 1, "max_length": 8}}
    )
    proc.fit(m)
    import torch

    # the script's random init is drawn after torch.manual_seed(0) (--seed): seed this stand-in "pretrained" model
    # otherwise, or whatever ran before in this process may leave the global stream exactly there (then the two
    # models are the same weights, as happened when another test file joined this one's pytest-xdist worker)
    torch.manual_seed(1)
    model = create_model("bioperceiver_debug", modalities=proc.model_modalities())
    final = tmp_path / "run" / "final"
    model.save_pretrained(final)
    proc.save_pretrained(final)
    (tmp_path / "run" / "history.json").write_text(
        _json.dumps([{"step": 1, "loss": 4.0}, {"step": 2, "eval_loss": 3.0}])
    )

    argv = ["--pretrained_dir", str(final), "--manifest", str(path), "--split", "test", "--top_k", "2"]
    res = diag.main([*argv, "--n_boot", "20", "--output_dir", str(tmp_path / "out")])
    assert (tmp_path / "out" / "diagnostics.json").exists() and all(Path(p).exists() for p in res["plots"])
    rep = res["representation"]
    assert rep["pretrained"]["fused"]["rows"] == 40
    assert rep["pretrained"]["fused"]["effective_rank"] != pytest.approx(rep["random_init"]["fused"]["effective_rank"])
    probe = res["findings_probe"]
    assert set(probe["classes"]) == {"effusion", "cardiomegaly"}
    assert probe["single_feature"]["effusion"]["feature"] in {"derrame", "normal"}
    assert probe["models"]["best_single_tfidf_feature"]["per_finding"]["effusion"] == pytest.approx(1.0)
    assert "pretrained/fused - random_init/fused" in probe["paired"]
    assert "clinical_cox" in res["survival_probe"]["cohort_a"]
    stats = res["text_statistics"]["text_report"]
    assert stats["rows"] == 40 and stats["unk_rate"] == 0.0 and stats["truncation_rate"] == 0.0
    assert [list(p) for p in res["pretraining_signal"]["eval_loss"]] == [[2, 3.0]]
