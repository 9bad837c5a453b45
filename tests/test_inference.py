"""``bioperceiver embed / predict / search`` (bioperceiver.inference) on a tiny model finetuned on the synthetic
cohort: predictions reproduce the finetuning run's (calibration and conformal sets from the folder alone), embeddings
match the model run directly and are null (never zeros) where a modality is absent, sharding over processes and
resume write every shard once, and FAISS and exact search agree with a brute-force reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from script_loader import load_script

import bioperceiver as bp
from bioperceiver.data import BioPerceiverCollator, assign_splits, read_manifest, write_manifest
from bioperceiver.evaluation.report import predictions_path
from bioperceiver.inference.embedding import (
    embed,
    embedding_column,
    read_embeddings,
    shard_name,
    shard_ranges,
    shards_of_process,
)
from bioperceiver.inference.loading import load_model_folder
from bioperceiver.inference.retrieval import EmbeddingIndex, EmbeddingSet, faiss_available, normalize, recall_at_k
from bioperceiver.uncertainty.saved import CALIBRATION_FILE, load_calibration_set

MODALITIES = ["text_note", "tabular_ehr", "image_2d"]


def _run_finetune(argv):
    return load_script("finetune/run_finetune.py", "run_finetune_for_inference").main(argv)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A tiny multiclass model finetuned (2 steps) on the synthetic cohort, with 3 samples per patient for some
    patients and 30% missing modalities; returns ``(folder, manifest path)``."""
    from bioperceiver.data.recipes.synthetic import make_synthetic_cohort

    root = tmp_path_factory.mktemp("inference")
    manifest = make_synthetic_cohort(root / "cohort", num_patients=24, missing_rate=0.3, seed=11)
    settings = {
        "processors": {
            "text_note": {"vocab_size": 150, "min_frequency": 1, "max_length": 32},
            "image_2d": {"spatial_size": [16, 16]},
            "image_3d": {"spatial_dims": 3, "spatial_size": [8, 8, 8]},
            "signal_ecg": {"target_rate": 50.0, "window_s": 2.0},
        },
        "embedders": {"image_2d": {"patch_size": 8}, "image_3d": {"patch_size": 4}, "signal_ecg": {"patch_size": 10}},
    }
    (root / "settings.yaml").write_text(yaml.safe_dump(settings))
    out = root / "model"
    _run_finetune(
        [
            *(
                "--manifest",
                str(manifest),
                "--output_dir",
                str(out),
                "--processor_settings",
                str(root / "settings.yaml"),
            ),
            *("--task", "classification", "--label_column", "label_multiclass", "--modalities", *MODALITIES),
            *("--do_train", "true", "--max_steps", "2", "--per_device_train_batch_size", "8", "--use_cpu", "true"),
            *("--n_bootstrap", "5", "--ablations", "false", "--interpret", "false", "--mc_dropout_samples", "0"),
            *("--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--conformal_alpha", "0.34"),
        ]
    )
    small = manifest.parent / "small.parquet"  # 8 rows for the slower embedding tests
    m = read_manifest(manifest)
    write_manifest(m.table.iloc[:8], small, m.metadata)
    return out, manifest, small


# ---- predict ----------------------------------------------------------------------------------------------------
def test_finetuning_saves_the_calibration_set(finetuned):
    folder, _, _ = finetuned
    cal = load_calibration_set(folder)
    assert (folder / CALIBRATION_FILE).exists() and cal is not None
    results = json.loads((folder / "all_results.json").read_text())
    assert cal.alpha == pytest.approx(0.34)
    assert len(cal.outputs) == len(cal.targets) == results["uncertainty"]["n_calibration"]


def _no_constant(constant):
    raise AssertionError(f"predict_results.json is not strict JSON: {constant}")


def test_predict_reproduces_the_finetuning_test_predictions_on_unlabelled_rows(finetuned, tmp_path):
    """From the folder alone, unlabelled rows of the test split get the same probabilities, calibrated
    probabilities and conformal sets as the finetuning report's predictions file."""
    folder, manifest_path, _ = finetuned
    m = assign_splits(read_manifest(json.loads((folder / "all_results.json").read_text())["manifest"]))
    test = m.table[m.table["split"] == "test"].drop(columns=["split"])
    test = test.assign(label_multiclass=None)  # no labels: predict must not need them
    new = Path(manifest_path).parent / "new_unlabelled.parquet"  # beside the cohort: relative file paths resolve
    write_manifest(test, new)
    res = bp.predict(folder, new, tmp_path / "out")
    ref = pd.read_csv(predictions_path(folder)).set_index("sample_id")
    got = res.table.set_index("sample_id").loc[ref.index]
    cols = [c for c in ref.columns if c.startswith(("prob_", "calibrated_prob_"))]
    assert len(cols) == 6
    np.testing.assert_allclose(got[cols].to_numpy(float), ref[cols].to_numpy(float), rtol=1e-5, atol=1e-6)
    assert list(got["conformal_set"]) == list(ref["conformal_set"])
    assert got["label_multiclass"].isna().all() and res.results["labelled"] == 0
    # the test row without any of the model's modalities is skipped and counted, as in finetuning
    assert res.results["predicted"] == len(ref) == len(test) - sum(res.results["skipped"].values())
    saved = json.loads((tmp_path / "out" / "predict_results.json").read_text(), parse_constant=_no_constant)
    report = json.loads((folder / "all_results.json").read_text())["uncertainty"]
    assert saved["uncertainty"]["temperature"] == pytest.approx(report["temperature"])


def test_predict_mc_dropout_spread_and_metrics_on_labelled_rows(finetuned, tmp_path):
    folder, manifest, _ = finetuned
    res = bp.predict(folder, manifest, tmp_path / "out", mc_dropout=3)
    assert {"mc_std", "mc_mutual_information", "conformal_set"} <= set(res.table.columns)
    assert (res.table["mc_std"] >= 0).all() and res.table["mc_std"].gt(0).any()
    assert res.results["labelled"] == res.results["predicted"] > 0
    assert 0.0 <= res.results["metrics"]["accuracy"] <= 1.0


def test_predict_explain_names_figures_by_row_index_never_by_sample_id(finetuned, tmp_path):
    """``--explain`` on new patients: modality Shapley values for every row and figures for a few, named by the row's
    index among the predicted rows (``row-0003_...``; they were named ``test-...`` though the rows are no test split),
    never by a sample or patient id."""
    folder, _, small = finetuned
    res = bp.predict(folder, small, tmp_path / "out", explain=True, explain_samples=2)
    rows = res.results["interpretation"]["explained_rows"]
    assert len(rows) == 2 and all(r.startswith("row-") for r in rows)
    figures = sorted(p.name for p in (tmp_path / "out" / "explanations").iterdir())
    assert figures and all(name.startswith(tuple(rows)) for name in figures)
    ids = set(read_manifest(small).table["sample_id"]) | set(read_manifest(small).table["patient_id"])
    assert not any(i in name for name in figures for i in ids)
    assert any(c.startswith("shapley_") for c in res.table.columns)


def test_predict_refuses_a_manifest_without_the_models_modalities(finetuned, tmp_path):
    folder, manifest, _ = finetuned
    m = read_manifest(manifest)
    only = m.table[["sample_id", "patient_id", "signal_ecg"]].dropna()
    write_manifest(only, tmp_path / "ecg.parquet")
    with pytest.raises(ValueError, match=r"none of the modalities .* finetuned with"):
        bp.predict(folder, tmp_path / "ecg.parquet", tmp_path / "out")


def test_predict_reports_values_the_processors_do_not_know_and_refuses_when_no_row_is_usable(finetuned, tmp_path):
    """New patients bring a lab the model never saw: it is left out, counted per modality in predict_results.json
    and logged (it was counted inside the processor only). A manifest none of whose rows can be predicted stops
    with the skip reasons, not with numpy's "need at least one array to concatenate"."""
    folder, manifest, _ = finetuned
    m = read_manifest(manifest)
    table = m.table.copy()
    row = table.index[table["tabular_ehr"].notna()][0]
    cell = table.at[row, "tabular_ehr"]
    values = json.loads(cell) if isinstance(cell, str) else dict(cell)
    table.at[row, "tabular_ehr"] = json.dumps({**values, "a_lab_never_seen": 1.0})
    write_manifest(table, Path(manifest).parent / "new_lab.parquet", m.metadata)
    res = bp.predict(folder, Path(manifest).parent / "new_lab.parquet", tmp_path / "out")
    assert res.results["not_tokenised"]["tabular_ehr"]["unknown_features"] == 1
    saved = json.loads((tmp_path / "out" / "predict_results.json").read_text())
    assert saved["not_tokenised"] == res.results["not_tokenised"]

    unusable = table.iloc[:2].assign(text_note=None, tabular_ehr=None, image_2d="no_such_image.npy")
    write_manifest(unusable, Path(manifest).parent / "unusable.parquet", m.metadata)
    with pytest.raises(ValueError, match=r"none of the 2 rows .* predicted \(2 x sample: no_readable_modality\)"):
        bp.predict(folder, Path(manifest).parent / "unusable.parquet", tmp_path / "out2")


# ---- embed ------------------------------------------------------------------------------------------------------
def test_embeddings_match_the_model_and_absent_modalities_are_null(finetuned, tmp_path):
    folder, manifest, _ = finetuned
    result = embed(folder, manifest, tmp_path / "emb", shard_size=16, process_index=0, num_processes=1, progress=False)
    frame, meta = read_embeddings(tmp_path / "emb")
    m = read_manifest(manifest)
    kept = m.table[MODALITIES].notna().any(axis=1)  # rows with none of the model's modalities: skipped, counted
    assert len(frame) == kept.sum() == result.rows and result.skipped.total == (~kept).sum() > 0
    assert meta["num_shards"] == len(shard_ranges(len(m), 16))
    assert meta["config_hash"] and meta["model_id"] == str(folder.resolve())
    cells = m.table.set_index("sample_id")
    for name in MODALITIES:  # null exactly where the manifest cell is missing (no zero vectors)
        absent = cells.loc[frame["sample_id"], name].isna().to_numpy()
        assert (frame[embedding_column(name)].isna().to_numpy() == absent).all(), name
        assert all(np.abs(v).sum() > 0 for v in frame[embedding_column(name)].dropna())
    assert "embedding_signal_ecg" not in frame  # not a modality the model was finetuned with
    # reference: the backbone run directly on one sample, fused and each modality alone
    loaded = load_model_folder(folder, device="cpu")
    row = frame.iloc[3]
    record = next(r for r in m.records() if r["sample_id"] == row["sample_id"])
    sample = loaded.processor(record, base_dir=m.base_dir, modalities=MODALITIES)
    batch = BioPerceiverCollator(loaded.modalities)([sample], train=False)["inputs"]
    with torch.no_grad():
        fused = loaded.backbone(inputs=batch).pooler_output[0].numpy()
        np.testing.assert_allclose(row["embedding"], fused, rtol=1e-4, atol=1e-5)
        for name, arrays in batch.items():
            alone = loaded.backbone(inputs={name: arrays}).pooler_output[0].numpy()
            np.testing.assert_allclose(row[embedding_column(name)], alone, rtol=1e-4, atol=1e-5)


def test_shards_of_processes_partition_the_shards():
    for n_shards in (1, 5, 8):
        for n_proc in (1, 2, 3):
            parts = [shards_of_process(n_shards, i, n_proc) for i in range(n_proc)]
            assert sorted(k for p in parts for k in p) == list(range(n_shards))
    assert shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    with pytest.raises(ValueError):
        shards_of_process(4, 2, 2)


def test_process_layout_follows_the_launcher(monkeypatch):
    from bioperceiver.inference.embedding import process_layout

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")  # what torchrun / accelerate launch set in each process
    assert process_layout() == (1, 3)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert process_layout() == (0, 1)


def test_two_processes_write_each_shard_once_and_resume_skips_finished_shards(finetuned, tmp_path):
    folder, _, manifest = finetuned
    loaded = load_model_folder(folder, device="cpu")
    kw = {"shard_size": 2, "progress": False}
    one = embed(loaded, manifest, tmp_path / "one", process_index=0, num_processes=1, **kw)
    two = [embed(loaded, manifest, tmp_path / "two", process_index=i, num_processes=2, **kw) for i in range(2)]
    assert sorted(two[0].written + two[1].written) == one.written and not set(two[0].written) & set(two[1].written)
    a, _ = read_embeddings(tmp_path / "one")
    b, _ = read_embeddings(tmp_path / "two")
    pd.testing.assert_frame_equal(a.drop(columns="embedding"), b.drop(columns="embedding"))
    np.testing.assert_allclose(np.stack(a["embedding"]), np.stack(b["embedding"]), rtol=1e-5, atol=1e-6)

    # a run stopped after two shards, with a half-written temporary file: resume writes only the rest
    n = len(one.written)
    done = tmp_path / "two" / shard_name(1, n)
    done.unlink()
    (tmp_path / "two" / f".{done.name}.tmp123").write_bytes(b"half a shard")
    with pytest.raises(ValueError, match="unfinished"):
        read_embeddings(tmp_path / "two")
    again = embed(loaded, manifest, tmp_path / "two", process_index=1, num_processes=2, **kw)
    assert again.written == [1] and sorted(again.resumed) == [k for k in range(3, n, 2)]
    assert not list((tmp_path / "two").glob(".*tmp*"))
    c, _ = read_embeddings(tmp_path / "two")
    pd.testing.assert_frame_equal(a.drop(columns="embedding"), c.drop(columns="embedding"))

    # the same folder resumed with other rows, other weights of the same architecture or other processors: refused,
    # never a finished shard of another run passed off as this one's
    full = read_manifest(finetuned[1])
    with pytest.raises(ValueError, match="shard layout"):  # more rows: other shard names, never written beside
        embed(loaded, full, tmp_path / "two", process_index=0, num_processes=1, **kw)
    with pytest.raises(ValueError, match="another manifest"):  # as many rows, other patients
        embed(loaded, full.subset(range(8, 16)), tmp_path / "two", process_index=0, num_processes=1, **kw)
    changed = read_manifest(manifest)
    changed.table.loc[0, "label_multiclass"] += 1  # one cell of a row differs
    with pytest.raises(ValueError, match="another manifest"):
        embed(loaded, changed, tmp_path / "two", process_index=0, num_processes=1, **kw)
    retrained = load_model_folder(folder, device="cpu")
    with torch.no_grad():
        next(retrained.backbone.parameters()).add_(0.01)
    with pytest.raises(ValueError, match="another model"):
        embed(retrained, manifest, tmp_path / "two", process_index=0, num_processes=1, **kw)
    refitted = load_model_folder(folder, device="cpu")
    text = refitted.processor.processors["text_note"]
    text.settings.max_length -= 1
    with pytest.raises(ValueError, match="another model"):
        embed(refitted, manifest, tmp_path / "two", process_index=0, num_processes=1, **kw)
    assert embed(loaded, manifest, tmp_path / "two", process_index=0, num_processes=1, **kw).written == []

    other = bp.create_model("bioperceiver_debug", modalities=loaded.backbone.config.modalities, d_latents=24)
    loaded.model = other  # another config: its hash differs, the finished shards are not silently mixed
    with pytest.raises(ValueError, match="another model, shard layout or space"):
        embed(loaded, manifest, tmp_path / "two", process_index=0, num_processes=1, **kw)


# ---- search -----------------------------------------------------------------------------------------------------
def _random_set(n, d, patients, seed, labels=3):
    rng = np.random.default_rng(seed)
    pids = [f"p{i % patients}" for i in range(n)]
    return EmbeddingSet(
        normalize(rng.normal(size=(n, d))),
        [f"s{i}" for i in range(n)],
        pids,
        {"label_y": [str(int(rng.integers(labels))) for _ in range(n)]},
    )


@pytest.mark.parametrize("backend", ["exact", "faiss"])
def test_search_matches_brute_force_and_excludes_the_query_patient(backend):
    if backend == "faiss" and not faiss_available():
        pytest.skip("faiss-cpu is not installed (the `search` extra)")
    data = _random_set(200, 16, patients=40, seed=0)
    queries = _random_set(30, 16, patients=40, seed=1)
    scores, idx = EmbeddingIndex(data, backend=backend).search(queries.vectors, 7, queries.patient_ids)
    sims = queries.vectors @ data.vectors.T
    for q in range(30):
        allowed = np.array([p != queries.patient_ids[q] for p in data.patient_ids])
        ref = np.flatnonzero(allowed)[np.argsort(-sims[q, allowed], kind="stable")[:7]]
        assert list(idx[q]) == list(ref)
        np.testing.assert_allclose(scores[q], sims[q, ref], rtol=1e-5, atol=1e-6)
        assert queries.patient_ids[q] not in {data.patient_ids[j] for j in idx[q]}


@pytest.mark.skipif(not faiss_available(), reason="faiss-cpu is not installed (the `search` extra)")
def test_faiss_and_exact_give_the_same_neighbours():
    data = _random_set(500, 32, patients=100, seed=2)
    queries = _random_set(50, 32, patients=100, seed=3)
    exact = EmbeddingIndex(data, backend="exact").search(queries.vectors, 10, queries.patient_ids)
    faiss = EmbeddingIndex(data, backend="faiss").search(queries.vectors, 10, queries.patient_ids)
    np.testing.assert_array_equal(exact[1], faiss[1])
    np.testing.assert_allclose(exact[0], faiss[0], rtol=1e-5, atol=1e-5)


def test_recall_and_its_chance_level():
    # 4 candidates outside the query's patient, one relevant: chance R@1 = 1/4, R@2 = 1/2
    data = EmbeddingSet(np.eye(5, dtype=np.float32), list("abcde"), ["q", "p1", "p2", "p3", "p4"], {})
    data.labels["label_y"] = ["x", "x", "y", "y", "y"]
    idx = np.array([[1, 2]])  # the relevant one ranked first
    out = recall_at_k(["x"], ["q"], data, "label_y", idx, ks=(1, 2))
    assert out["recall@1"] == 1.0 and out["chance_recall@1"] == pytest.approx(0.25)
    assert out["chance_recall@2"] == pytest.approx(0.5)
    # chance level against simulation: random rankings of a random set
    s = _random_set(60, 4, patients=20, seed=4)
    rng = np.random.default_rng(5)
    pat = np.asarray(s.patient_ids)

    def random_ranking():
        return np.stack([rng.permutation(np.flatnonzero(pat != pat[q]))[:5] for q in range(60)])

    chance = recall_at_k(s.labels["label_y"], s.patient_ids, s, "label_y", random_ranking(), ks=(5,))
    many = np.mean(
        [
            recall_at_k(s.labels["label_y"], s.patient_ids, s, "label_y", random_ranking(), ks=(5,))["recall@5"]
            for _ in range(100)
        ]
    )
    assert many == pytest.approx(chance["chance_recall@5"], abs=0.03)


def test_search_from_a_manifest_across_modalities_with_evaluation(finetuned, tmp_path):
    folder, _, manifest = finetuned
    embed(folder, manifest, tmp_path / "emb", process_index=0, num_processes=1, progress=False)
    res = bp.search(
        tmp_path / "emb",
        manifest,
        modality="text_note",
        target="tabular_ehr",
        k=3,
        evaluate=True,
        label_column="label_multiclass",
        output=tmp_path / "s",
    )
    table = res.table
    index_patients = EmbeddingSet.from_embeddings(tmp_path / "emb", "tabular_ehr").patient_ids
    expected = {  # k, or every index row outside the query's patient when there are fewer
        q: min(3, sum(p != patient for p in index_patients))
        for q, patient in zip(table["query_sample_id"], table["query_patient_id"])
    }
    assert table.groupby("query_sample_id")["rank"].max().to_dict() == expected
    assert (table["query_patient_id"] != table["patient_id"]).all()
    assert table.groupby("query_sample_id")["score"].apply(lambda s: s.is_monotonic_decreasing).all()
    assert 0 <= res.metrics["chance_recall@1"] <= res.metrics["chance_recall@5"] <= res.metrics["chance_recall@10"]
    assert json.loads((tmp_path / "s" / "search_metrics.json").read_text())["n_queries"] == res.metrics["n_queries"]
    # the queries from the embeddings folder give the same neighbours as from the manifest
    again = bp.search(tmp_path / "emb", tmp_path / "emb", modality="text_note", target="tabular_ehr", k=3)
    pd.testing.assert_series_equal(again.table["sample_id"], table["sample_id"])
    with pytest.raises(ValueError, match="no embeddings of modality 'image_ct'"):
        bp.search(tmp_path / "emb", manifest, modality="text_note", target="image_ct")
    # queries embedded by a model of the same architecture with other weights are refused, not compared
    retrained = load_model_folder(folder, device="cpu")
    with torch.no_grad():
        next(retrained.backbone.parameters()).add_(0.01)
    with pytest.raises(ValueError, match="other weights or processors"):
        bp.search(tmp_path / "emb", manifest, modality="text_note", target="tabular_ehr", model=retrained)


# ---- the projected space ----------------------------------------------------------------------------------------
@pytest.fixture()
def backbone_with_head(finetuned, tmp_path):
    """A pretraining-style ``final/`` folder: the finetuned model's backbone and processors, and a seeded
    projection head saved beside them (``projection_head.safetensors``)."""
    from bioperceiver.layers.projection import build_projection_head, save_projection_head

    folder, _, small = finetuned
    loaded = load_model_folder(folder, device="cpu")
    out = tmp_path / "final"
    loaded.backbone.save_pretrained(out)
    loaded.processor.save_pretrained(out)
    torch.manual_seed(0)
    cfg = loaded.backbone.config
    save_projection_head(build_projection_head(cfg.d_latents, cfg.projection_dim).state_dict(), out, cfg)
    return out, small


def test_embed_in_the_projected_space_is_the_head_applied_to_the_latents(backbone_with_head, finetuned, tmp_path):
    folder, small = backbone_with_head
    loaded = load_model_folder(folder, device="cpu")
    assert loaded.projection is not None and not loaded.projection.training
    for space in ("latent", "projected"):
        embed(loaded, small, tmp_path / space, process_index=0, num_processes=1, progress=False, space=space)
    latent, lmeta = read_embeddings(tmp_path / "latent")
    projected, pmeta = read_embeddings(tmp_path / "projected")
    cfg = loaded.backbone.config
    assert (lmeta["space"], lmeta["embedding_dim"]) == ("latent", cfg.d_latents)
    assert (pmeta["space"], pmeta["embedding_dim"]) == ("projected", cfg.projection_dim)
    columns = [c for c in latent if c.startswith("embedding")]
    assert len(columns) == 1 + len(MODALITIES)
    for c in columns:  # the same rows absent, the head applied to every present vector
        assert (latent[c].isna() == projected[c].isna()).all(), c
        for a, b in zip(latent[c].dropna(), projected[c].dropna()):
            with torch.no_grad():
                np.testing.assert_allclose(b, loaded.projection(torch.as_tensor(a)).numpy(), rtol=1e-4, atol=1e-5)
    # a folder written in one space is not resumed in the other
    with pytest.raises(ValueError, match="space"):
        embed(loaded, small, tmp_path / "latent", process_index=0, num_processes=1, progress=False, space="projected")
    # search: a manifest query is embedded in the index's space; an embed-folder query must be in it
    by_folder = bp.search(tmp_path / "projected", tmp_path / "projected", modality="text_note", target="tabular_ehr")
    by_manifest = bp.search(tmp_path / "projected", small, modality="text_note", target="tabular_ehr", model=loaded)
    pd.testing.assert_series_equal(by_manifest.table["sample_id"], by_folder.table["sample_id"])
    np.testing.assert_allclose(by_manifest.table["score"], by_folder.table["score"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="same --space"):
        bp.search(tmp_path / "projected", tmp_path / "latent", modality="text_note", target="tabular_ehr")
    # the finetuned folder has no head: a clear error before any work, naming the fix
    with pytest.raises(ValueError, match=r"no projection_head\.safetensors.*--space latent"):
        embed(
            finetuned[0], small, tmp_path / "none", process_index=0, num_processes=1, progress=False, space="projected"
        )
    assert not (tmp_path / "none").exists()


def test_a_projection_head_of_another_model_is_refused(backbone_with_head):
    from bioperceiver.layers.projection import build_projection_head, load_projection_head, save_projection_head

    folder, _ = backbone_with_head
    cfg = load_model_folder(folder, device="cpu").backbone.config
    wrong = build_projection_head(cfg.d_latents, cfg.projection_dim + 1).state_dict()
    with pytest.raises(ValueError, match="does not match"):
        save_projection_head(wrong, folder, cfg)
    other = type(cfg).from_dict({**cfg.to_dict(), "projection_dim": cfg.projection_dim + 1})
    with pytest.raises(ValueError, match="belongs to another model"):
        load_projection_head(folder, other)
    assert load_projection_head(folder.parent, cfg) is None  # no head saved there
