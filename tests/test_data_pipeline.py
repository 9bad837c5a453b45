"""Manifest -> validation -> splits -> processors -> datasets -> collator -> model, on the synthetic cohort
(all five kinds, known ground truth) and on hand-made bad manifests."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import bioperceiver as bp
from bioperceiver.data import (
    BioPerceiverCollator,
    BioPerceiverProcessor,
    DataError,
    assign_splits,
    build_dataset,
    build_iterable_dataset,
    read_manifest,
    split_of,
    to_sample,
    validate_manifest,
    write_manifest,
)
from bioperceiver.data.recipes.synthetic import make_synthetic_cohort
from bioperceiver.data.validate import main as validate_main

SETTINGS = {
    "text_note": {"vocab_size": 200, "min_frequency": 1, "max_length": 48},
    "image_2d": {"spatial_size": [16, 16]},
    "image_3d": {"spatial_dims": 3, "spatial_size": [8, 8, 8], "pixdim": None},
    "omics_expression": {"normalization": "cpm_log1p", "zscore": True},
    "signal_ecg": {"window_s": 2.0, "target_rate": 50.0},
}
EMBED = {"image_2d": {"patch_size": 8}, "image_3d": {"patch_size": 4}, "signal_ecg": {"patch_size": 10}}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    path = make_synthetic_cohort(root, num_patients=24, samples_per_patient=2, missing_rate=0.4, seed=3)
    manifest = assign_splits(read_manifest(path), fractions=(0.6, 0.2, 0.2))
    processor = BioPerceiverProcessor.from_manifest(manifest, SETTINGS).fit(manifest, split="train")
    return manifest, processor


def tiny_model(processor, **kw):
    torch.manual_seed(0)
    return bp.create_model(
        "bioperceiver_debug", modalities=processor.model_modalities(EMBED), hidden_dropout=0.0, **kw
    ).eval()


# ---- manifest + validation ----------------------------------------------------------------------------------------
def test_manifest_formats_round_trip_and_naming_rule(tmp_path):
    table = pd.DataFrame(
        {
            "sample_id": ["a", "b"],
            "patient_id": ["p", "q"],
            "text": ["x y", None],
            "tabular_labs": [json.dumps({"k": 1.0}), json.dumps({"k": 2.0})],
            "label_y": [0, 1],
            "meta_site": ["A", "B"],
        }
    )
    for suffix in (".parquet", ".csv", ".jsonl"):
        path = write_manifest(table, tmp_path / f"m{suffix}", {"recipe": "t"})
        m = read_manifest(path)
        assert m.modalities == {"text": "text", "tabular_labs": "tabular"}
        assert m.label_columns == ["label_y"] and m.metadata == {"recipe": "t"}
        assert m.records()[1]["text"] is None
    with pytest.raises(ValueError, match=r"'notes'.*not a known modality.*Fix"):
        read_manifest(table.rename(columns={"text": "notes"}))
    assert read_manifest(table.rename(columns={"text": "notes"}), modalities={"notes": "text"}).modalities["notes"]


def test_validate_reports_every_problem_with_row_column_and_fix(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    table = pd.DataFrame(
        {
            "sample_id": ["a", "a", "c", "d", "e", None],
            "patient_id": ["p1", "p2", "p1", "p3", "p4", "p5"],
            "split": ["train", "train", "test", "train", "holdout", "train"],
            "text": ["ok", "   ", None, None, None, "fine"],
            "image_cxr": [None, "missing.png", "empty.png", None, None, None],
            "omics": [None, None, None, json.dumps({"TP53": float("nan")}), None, None],
            "tabular": [None, None, None, None, json.dumps({"age": float("inf")}), None],
            "label_y": [0.0, 1.0, float("inf"), 0.0, 1.0, 0.0],
            "extra": [1, 2, 3, 4, 5, 6],
        }
    )
    table.loc[3, "omics"] = None  # row d then has no modality at all
    table.loc[2, "omics"] = json.dumps({"TP53": float("nan")})
    path = write_manifest(table, tmp_path / "bad.csv")
    report = validate_manifest(path)
    got = {(p.reason, p.row, p.column) for p in report.problems}
    expected = {
        ("unknown_column", None, "extra"),
        ("duplicate_id", 1, "sample_id"),
        ("empty_id", 5, None),
        ("empty_text", 1, "text"),
        ("missing_file", 1, "image_cxr"),
        ("empty_file", 2, "image_cxr"),
        ("non_finite", 2, "omics"),
        ("non_finite", 4, "tabular"),
        ("no_modality", 3, None),
        ("bad_split", 4, "split"),
        ("patient_in_several_splits", None, "split"),
        ("non_finite_label", 2, "label_y"),
    }
    assert expected <= got, expected - got
    assert not report.ok and all(p.fix for p in report.problems)
    assert validate_main([str(path), "--json", str(tmp_path / "r.json")]) == 1
    assert json.loads((tmp_path / "r.json").read_text())["counts"]["duplicate_id"] == 1
    good = write_manifest(table.iloc[[0]].drop(columns=["extra"]).assign(split="train"), tmp_path / "good.parquet")
    assert validate_main([str(good)]) == 0
    assert validate_main([str(tmp_path / "nope.csv")]) == 2


def test_deep_validation_runs_the_processors(cohort, tmp_path):
    manifest, processor = cohort
    table = manifest.table.copy()
    row = table.index[table["image_2d"].notna()][0]
    good = manifest.base_dir / "synthetic" / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)).save(good)
    bad = manifest.base_dir / "synthetic" / "truncated.png"
    bad.write_bytes(good.read_bytes()[:120])  # the header decodes; the pixels do not
    table.loc[row, "image_2d"] = str(bad)
    assert validate_manifest(table, base_dir=manifest.base_dir).ok  # the cheap check reads headers only
    report = validate_manifest(table, base_dir=manifest.base_dir, processor=processor)
    assert [(p.reason, p.row, p.column) for p in report.problems] == [("unreadable_image", row, "image_2d")]


def test_cheap_validation_decodes_image_and_signal_headers(cohort, tmp_path):
    manifest, _processor = cohort
    table = manifest.table.copy()
    rows = table.index[table["image_2d"].notna() & table["signal_ecg"].notna()][:3]
    d = manifest.base_dir / "synthetic"
    (d / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # PNG signature, no valid IHDR
    (d / "garbage.nii.gz").write_bytes(b"\x1f\x8b not a gzip stream")
    (d / "garbage.npz").write_bytes(b"PK not a zip archive")
    np.save(d / "empty.npy", np.zeros((3, 0), dtype=np.float32))
    table.loc[rows[0], "image_2d"] = str(d / "garbage.png")
    table.loc[rows[1], "image_2d"] = str(d / "garbage.nii.gz")
    table.loc[rows[0], "signal_ecg"] = str(d / "garbage.npz")
    table.loc[rows[2], "signal_ecg"] = str(d / "empty.npy")
    table.loc[rows[2], "omics_expression"] = json.dumps({"GENE0001": "high", "GENE0002": 1.5})
    report = validate_manifest(table, base_dir=manifest.base_dir)
    assert sorted((p.reason, p.row, p.column) for p in report.problems) == sorted(
        [
            ("unreadable_image", rows[0], "image_2d"),
            ("unreadable_image", rows[1], "image_2d"),
            ("unreadable_signal", rows[0], "signal_ecg"),
            ("empty_signal", rows[2], "signal_ecg"),
            ("non_numeric", rows[2], "omics_expression"),
        ]
    )
    assert all(p.fix and p.message for p in report.problems)


# ---- splits -------------------------------------------------------------------------------------------------------
def test_patient_splits_are_deterministic_disjoint_and_stable():
    patients = [f"p{i}" for i in range(3000)]
    splits = [split_of(p) for p in patients]
    assert splits == [split_of(p) for p in patients]
    frac = {s: splits.count(s) / len(splits) for s in ("train", "validation", "test")}
    assert abs(frac["train"] - 0.8) < 0.03 and abs(frac["test"] - 0.1) < 0.02
    assert [split_of(p, salt="other") for p in patients] != splits  # the salt matters
    table = pd.DataFrame({"sample_id": [f"s{i}" for i in range(6)], "patient_id": ["a", "a", "b", "b", "c", "c"]})
    table["text"] = "x"
    m = assign_splits(read_manifest(table))
    assert m.table.groupby("patient_id")["split"].nunique().max() == 1


# ---- processors -> collator -> model -------------------------------------------------------------------------------
def test_batch_of_any_modality_subsets_runs_and_padding_is_invisible(cohort):
    manifest, processor = cohort
    records = manifest.records()[:10]
    samples = [processor(r, base_dir=manifest.base_dir) for r in records]
    patterns = {tuple(s[m] is not None for m in processor.processors) for s in samples}
    assert len(patterns) > 3  # genuinely different modality subsets in one batch
    collator = BioPerceiverCollator(processor.modalities, label_columns=["label_binary", "label_regression"])
    batch = collator(samples, train=False)
    model = tiny_model(processor)
    with torch.no_grad():
        together = model(inputs=batch["inputs"]).pooler_output
        for i, s in enumerate(samples):  # each sample alone (no padding) gives the same embedding
            alone = model(inputs=collator([s], train=False)["inputs"]).pooler_output
            torch.testing.assert_close(alone[0], together[i], rtol=1e-4, atol=1e-5)
    assert batch["labels"]["label_binary"].dtype == torch.long
    assert batch["labels"]["label_regression"].dtype == torch.float32
    assert batch["sample_id"] == [r["sample_id"] for r in records]


def test_modality_dropout_never_drops_the_last_modality_and_hits_its_rate(cohort):
    manifest, processor = cohort
    samples = [processor(r, base_dir=manifest.base_dir) for r in manifest.records()]
    collator = BioPerceiverCollator(processor.modalities, modality_dropout=0.5, seed=1)
    kept = dropped = 0
    for _ in range(20):
        batch = collator(samples, train=True)
        for i, s in enumerate(samples):
            before = [m for m in processor.processors if s[m] is not None]
            after = [m for m in before if _present(batch["inputs"], m, i)]
            assert after and set(after) <= set(before)
            if len(before) > 1:
                kept += len(after)
                dropped += len(before) - len(after)
    assert 0.35 < dropped / (kept + dropped) < 0.55
    again = BioPerceiverCollator(processor.modalities, modality_dropout=0.5, seed=1)
    a, b = collator.__class__(processor.modalities, modality_dropout=0.5, seed=1)(samples), again(samples)
    for m in a["inputs"]:
        for k in a["inputs"][m]:
            torch.testing.assert_close(a["inputs"][m][k], b["inputs"][m][k])  # same seed, same views
    no_drop = collator(samples, train=False)
    assert all(_present(no_drop["inputs"], m, i) for i, s in enumerate(samples) for m in processor.processors if s[m])


def _present(inputs, name, i) -> bool:
    if name not in inputs:
        return False
    x = inputs[name]
    if "present" in x:
        return bool(x["present"][i])
    mask = x.get("mask", x.get("attention_mask", x.get("channel_mask")))
    return bool(mask[i].any())


def test_collator_skip_counts_and_raise_names_the_sample(cohort):
    manifest, processor = cohort
    good = [processor(r, base_dir=manifest.base_dir) for r in manifest.records()[:3]]
    bad_nan = dict(good[0], sample_id="nan-sample")
    name = (
        next(m for m in ("omics_expression", "tabular_ehr") if good[0][m] is not None)
        if any(good[0][m] is not None for m in ("omics_expression", "tabular_ehr"))
        else None
    )
    bad_empty = {"sample_id": "empty-sample", **dict.fromkeys(processor.processors)}
    strict = BioPerceiverCollator(processor.modalities, on_error="raise")
    with pytest.raises(DataError, match=r"empty-sample.*no modality"):
        strict([*good, bad_empty])
    features = [*good, bad_empty]
    if name is not None:
        arrays = {k: np.array(v, dtype=np.float32) if k == "values" else v for k, v in good[0][name].items()}
        arrays["values"][0] = np.inf
        bad_nan[name] = arrays
        features.append(bad_nan)
    lenient = BioPerceiverCollator(processor.modalities, on_error="skip")
    batch = lenient(features)
    assert batch["sample_id"] == [s["sample_id"] for s in good]
    assert lenient.report.total == len(features) - len(good)
    assert ("-", "no_modality") in lenient.report.counts
    assert lenient([bad_empty]) is None


# ---- datasets -----------------------------------------------------------------------------------------------------
def test_dataset_map_matches_direct_processing_and_caches(cohort, tmp_path):
    manifest, processor = cohort
    ds, report = build_dataset(manifest, processor, split="train", cache_dir=tmp_path / "cache")
    assert report.total == 0 and len(ds) == int((manifest.table["split"] == "train").sum())
    collator = BioPerceiverCollator(processor.modalities)
    direct = [processor(r, base_dir=manifest.base_dir) for r in manifest.split("train").records()]
    a = collator([to_sample(r, processor) for r in ds], train=False)
    b = collator(direct, train=False)
    assert a["sample_id"] == b["sample_id"]
    for m in b["inputs"]:
        for k in b["inputs"][m]:
            torch.testing.assert_close(a["inputs"][m][k], b["inputs"][m][k])
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    ds2, _ = build_dataset(manifest, processor, split="train", cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == files  # a cache hit writes nothing new
    assert ds2[0]["sample_id"] == ds[0]["sample_id"]


def test_dataset_skip_reports_bad_rows_and_raise_names_them(cohort):
    manifest, processor = cohort
    table = manifest.table.copy()
    rows = table.index[table["text_note"].notna()][:2]
    table.loc[rows, "text_note"] = "   "
    broken = read_manifest(table, base_dir=manifest.base_dir)
    with pytest.raises(DataError, match="empty"):
        build_dataset(broken, processor, on_error="raise")
    ds, report = build_dataset(broken, processor, on_error="skip", num_proc=2)
    assert len(ds) == len(table) - 2 and report.counts[("text_note", "empty_text")] == 2
    assert set(table.loc[rows, "sample_id"]).isdisjoint(ds["sample_id"])


def test_streaming_shards_cover_the_split_once_across_ranks(cohort):
    manifest, processor = cohort
    seen = []
    for rank in range(2):
        ds, _ = build_iterable_dataset(manifest, processor, rank=rank, world_size=2, num_shards=4)
        seen.append([row["sample_id"] for row in ds])
    assert seen[0] and seen[1] and set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(manifest.table["sample_id"])
    row = next(iter(build_iterable_dataset(manifest, processor, world_size=1)[0]))
    batch = BioPerceiverCollator(processor.modalities)([to_sample(row, processor)], train=False)
    with torch.no_grad():
        assert torch.isfinite(tiny_model(processor)(inputs=batch["inputs"]).pooler_output).all()


def test_out_of_vocabulary_counts_survive_map_workers(cohort):
    manifest, processor = cohort
    table = manifest.table.copy()
    rows = table.index[table["omics_expression"].notna()][:3]
    for r in rows:
        genes = json.loads(table.loc[r, "omics_expression"])
        genes["NOT_A_GENE"] = 5.0
        table.loc[r, "omics_expression"] = json.dumps(genes)
    fresh = BioPerceiverProcessor.from_pretrained(_saved(processor, manifest))
    build_dataset(read_manifest(table, base_dir=manifest.base_dir), fresh, num_proc=2)
    assert fresh.report()["omics_expression"]["oov_genes"] == 3


def _saved(processor, manifest):
    path = manifest.base_dir / "saved_processor"
    processor.save_pretrained(path)
    return path


def test_dataset_cache_is_keyed_by_rows_not_by_file_name(cohort, tmp_path):
    manifest, processor = cohort
    big, _ = build_dataset(manifest.subset(slice(0, 30)), processor, cache_dir=tmp_path / "c")
    small, _ = build_dataset(manifest.subset(slice(0, 9)), processor, cache_dir=tmp_path / "c")
    assert len(big) == 31 and len(small) == 10  # .loc slices are inclusive
    assert small["sample_id"] == manifest.table["sample_id"][:10].tolist()


def test_omics_matrix_fast_path_equals_the_mapping_path(cohort, tmp_path):
    from bioperceiver.data import OmicsProcessor

    rng = np.random.default_rng(0)
    genes = [f"g{i}" for i in range(50)]
    values = rng.gamma(2.0, size=(4, 50))
    values[1, :5] = np.nan  # unmeasured
    pd.DataFrame(values, columns=genes, index=[f"s{i}" for i in range(4)]).to_parquet(tmp_path / "m.parquet")
    mappings = [{g: v for g, v in zip(genes, row) if not np.isnan(v)} for row in values]
    refs = [f"m.parquet#row=s{i}" for i in range(4)]
    for kw in ({}, {"top_k": 7, "zscore": True}):
        a = OmicsProcessor("o", **kw).fit(mappings[:3])
        b = OmicsProcessor("o", **kw).fit(refs[:3], base_dir=tmp_path)
        assert a.state == b.state
        for mapping, ref in zip(mappings, refs):
            x, y = a(mapping), b(ref, base_dir=tmp_path)
            np.testing.assert_array_equal(x["gene_ids"], y["gene_ids"])
            np.testing.assert_allclose(x["values"], y["values"], rtol=1e-6)
