"""benchmarks/gene_embedding_coverage.py: which gene embeddings a pretraining run trained, read from its optimizer
state, against an independent reference (the same run with learning rate 0 keeps every row at its initialisation:
a row is trained exactly when the real run moved it)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import synthetic_run_config
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pretrain(root: Path, lr: float) -> Path:
    path = synthetic_run_config(
        root, max_steps=4, warmup_steps=0, batch_size=8, save_steps=4, keep_last=1, eval={"steps": 0}
    )
    settings = yaml.safe_load((root / "settings.yaml").read_text())
    settings["processors"]["omics_expression"] = {"top_k": 2}  # 2 tokens per profile: some genes never trained
    (root / "settings.yaml").write_text(yaml.safe_dump(settings))
    cfg = yaml.safe_load(path.read_text())
    cfg["optim"]["lr"] = lr
    cfg["output_dir"] = str(root / "run")
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, str(ROOT / "pretrain" / "run_pretrain.py"), "--config", str(path)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return root / "run"


def _gene_rows(run: Path) -> np.ndarray:
    weights = load_file(str(run / "final" / "model.safetensors"))
    return next(v for k, v in weights.items() if k.endswith("omics_expression.gene_embeddings.weight"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return _pretrain(tmp_path_factory.mktemp("cov"), 1e-2), _pretrain(tmp_path_factory.mktemp("cov0"), 0.0)


def test_trained_rows_are_exactly_the_rows_pretraining_moved(runs):
    cov = _load("gene_embedding_coverage")
    run, frozen = runs
    trained, info = cov.trained_rows(run, "omics_expression", prefer_saved=False)  # from the checkpoint
    init, final = _gene_rows(frozen), _gene_rows(run)  # lr 0: the frozen twin still holds the initialisation
    moved = np.any(init != final, axis=1)
    assert trained.shape == moved.shape and (trained == moved).all()
    assert 0 < trained.sum() < len(trained), "top_k 2 should leave some genes untrained and train others"
    assert info["vocabulary"] == len(trained) and info["trained"] == int(trained.sum())
    assert info["checkpoint"].endswith("checkpoint-4")
    # the run's own record in final/ gives the same rows
    saved, info_saved = cov.trained_rows(run, "omics_expression")
    np.testing.assert_array_equal(saved, moved)
    assert info_saved["checkpoint"].endswith("final/trained_vocabulary_rows.safetensors")
    # the pretraining card says the same, from the optimizer in memory at the end of the run
    card = (run / "final" / "README.md").read_text()
    row = f"| vocabulary rows trained (omics_expression.gene_embeddings) | {info['trained']} of {info['vocabulary']} ("
    assert row in card and "the others keep their random initialisation" in card


def test_report_counts_are_consistent(runs, tmp_path):
    cov = _load("gene_embedding_coverage")
    run, _ = runs
    manifest = yaml.safe_load((run / "final" / "run_config.yaml").read_text())["data"]["manifest"]
    result = cov.main(["--runs", str(run), "--manifest", manifest, "--output_dir", str(tmp_path)])
    r = result["runs"]["run"]
    assert r["vocabulary_share_trained"] == pytest.approx(r["trained"] / r["vocabulary"])
    for name, c in r["cohorts"].items():
        assert c["genes_trained"] <= c["genes_in_vocabulary"] <= c["genes_measured"], name
        assert 0 <= c["token_share_trained"] <= c["token_share_in_vocabulary"] <= 1, name
        assert c["tokens_per_profile"] <= 2  # top_k
        assert c["genes_used_as_tokens"] <= c["genes_measured"] and 0 <= c["token_overlap_between_profiles"] <= 1
        # min_samples 1: the extension adds exactly the measured genes the vocabulary lacks
        assert c["extension"]["added"] == c["genes_measured"] - c["genes_in_vocabulary"], name
    assert json.loads((tmp_path / "coverage.json").read_text())["runs"]["run"]["trained"] == r["trained"]
    assert (tmp_path / "coverage.png").stat().st_size > 0 and "gene embeddings trained" in (
        tmp_path / "coverage.md"
    ).read_text()
    with pytest.raises(ValueError, match="not an omics modality"):
        cov.main(["--runs", str(run), "--manifest", manifest, "--output_dir", str(tmp_path), "--modality", "text_note"])


def test_final_records_the_trained_rows_finetuning_reads(runs):
    """``final/trained_vocabulary_rows.safetensors`` holds the same mask (the rows the run moved), and finetuning's
    vocabulary extension counts the overlap with it: extended on the pretraining rows themselves, every gene of the
    vocabulary overlaps, and exactly the trained ones count as trained."""
    from bioperceiver.data import BioPerceiverProcessor, read_manifest
    from bioperceiver.training.finetune_loop import trained_id_rows
    from bioperceiver.training.pretraining import load_trained_rows

    run, frozen = runs
    moved = np.any(_gene_rows(frozen) != _gene_rows(run), axis=1)
    masks = load_trained_rows(run / "final")
    np.testing.assert_array_equal(masks["omics_expression.gene_embeddings"], moved)
    proc = BioPerceiverProcessor.from_pretrained(run / "final")
    trained = trained_id_rows(run / "final", proc)
    np.testing.assert_array_equal(trained["omics_expression"], moved)
    cfg = yaml.safe_load((run / "final" / "run_config.yaml").read_text())
    manifest = read_manifest(cfg["data"]["manifest"])
    report = proc.extend(manifest, split="train", modalities=["omics_expression"], trained=trained)["omics_expression"]
    assert report["added"] == 0 and report["overlap"] == len(moved)
    assert report["overlap_trained"] == int(moved.sum()) < len(moved)
    # the token share against the rows the run moved, profile by profile (top_k 2: up to 2 tokens each)
    omics = proc.processors["omics_expression"]
    table = manifest.table  # no split column: extend(split="train") reads every row, as here
    assert "split" not in table
    train = table[table["omics_expression"].notna()]
    shares = [
        moved[omics(v, sample_id=sid, base_dir=manifest.base_dir)["gene_ids"]].mean()
        for v, sid in zip(train["omics_expression"], train["sample_id"], strict=True)
    ]
    assert report["token_share_trained"] == pytest.approx(np.mean(shares))
    assert load_trained_rows(run) is None  # a folder without the file


def test_token_overlap_is_the_mean_pairwise_jaccard():
    """The cohort's token-set overlap against a brute-force reference; 1 for a fixed panel, 0 for disjoint sets."""
    import itertools

    cov = _load("gene_embedding_coverage")
    rng = np.random.default_rng(0)
    sets = [rng.choice(40, size=rng.integers(1, 12), replace=False) for _ in range(9)]
    ref = np.mean(
        [len(set(a) & set(b)) / len(set(a) | set(b)) for a, b in itertools.permutations(sets, 2)]  # ordered pairs
    )
    assert cov.token_overlap(sets) == pytest.approx(ref)
    assert cov.token_overlap(sets, block=2) == pytest.approx(ref)  # blocks of rows give the same mean
    assert cov.token_overlap([np.arange(5)] * 4) == pytest.approx(1.0)
    assert cov.token_overlap([np.arange(3), np.arange(3, 6)]) == 0.0
    assert np.isnan(cov.token_overlap([np.arange(3)]))
