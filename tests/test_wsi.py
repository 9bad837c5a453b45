"""Whole-slide pathology (``wsi``): real-format pyramidal TIFF fixtures (tifffile, real stained-section pixels from
scikit-image) read by OpenSlide and tiffslide; tissue, tiles and coordinates; feature extraction (CLI, shards,
resume, bad slides); the feature-file contract; the processor, embedder and model end to end; 50k tiles on CPU."""

from __future__ import annotations

import json
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from wsi_fixtures import (
    DOWNSAMPLES,
    LEVEL0_MPP,
    TISSUE_BOX,
    make_glass_slide,
    make_slide,
    make_truncated_slide,
    slide_level0,
)

import bioperceiver as bp
from bioperceiver.data import DataError, read_manifest, validate_manifest
from bioperceiver.modalities import get_modality
from bioperceiver.modalities.wsi import WsiEmbedder, WsiProcessor
from bioperceiver.modalities.wsi.extract import (
    ExtractSettings,
    build_parser,
    default_shard,
    extract_slide,
    list_slides,
    main,
    parse_shard,
)
from bioperceiver.modalities.wsi.features import TileDataset, load_encoder, read_features
from bioperceiver.modalities.wsi.reader import open_slide
from bioperceiver.modalities.wsi.tiling import patch_size_level0, tile_grid
from bioperceiver.modalities.wsi.tissue import detect_tissue, mask_to_geojson

ENCODER = "test_resnet"  # a tiny timm model; random weights (no download)
TILE, TARGET_MPP = 32, 1.0  # 32 px at 1 µm/px = 128 level-0 px at 0.25 µm/px: an 8 x 8 grid on the tissue


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("slides")
    good = make_slide(root / "case_a.tif")
    make_slide(root / "case_b_nompp.tif", mpp=None)
    make_truncated_slide(root / "case_c_truncated.tif", good)
    make_glass_slide(root / "case_d_glass.tif")
    return root


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(ENCODER, "none")


def _settings(**kw):
    return ExtractSettings(target_mpp=TARGET_MPP, tile_size=TILE, batch_size=32, **kw)


# ---- reading ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_both_readers_open_the_pyramid_with_its_mpp_and_exact_pixels(slides, backend):
    level0 = slide_level0()
    with open_slide(slides / "case_a.tif", backend=backend) as r:
        assert r.backend == backend and r.mpp == pytest.approx(LEVEL0_MPP)
        assert r.level_downsamples == pytest.approx(list(DOWNSAMPLES))
        x, y = 700, 300  # level-0 coordinates, on tissue
        np.testing.assert_array_equal(r.read_region((x, y), 0, (40, 24)), level0[y : y + 24, x : x + 40])  # lossless
        # level 1 is a 4x box average: the same level-0 point reads the same place
        block = level0[y : y + 64, x : x + 64].reshape(16, 4, 16, 4, 3).mean((1, 3))
        assert np.abs(r.read_region((x, y), 1, (16, 16)).astype(float) - block).max() <= 1.0
        assert r.best_level(4.0) == 1 and r.best_level(3.9) == 0 and r.best_level(100) == 2


def test_auto_reader_falls_back_and_bad_slides_get_named_errors(slides):
    with pytest.raises(DataError, match=r"case_b_nompp.tif has no µm/px.*--mpp") as err:
        open_slide(slides / "case_b_nompp.tif")
    assert err.value.reason == "no_mpp"
    with open_slide(slides / "case_b_nompp.tif", mpp=0.25) as r:  # the override fixes it
        assert r.mpp == 0.25
    with pytest.raises(DataError, match=r"case_c_truncated.tif cannot be read.*openslide.*tiffslide.*truncated") as e:
        open_slide(slides / "case_c_truncated.tif")
    assert e.value.reason == "unreadable_slide"


# ---- tissue and tiles ------------------------------------------------------------------------------------------
def test_tiles_land_on_tissue_cover_it_and_read_the_right_pixels(slides):
    with open_slide(slides / "case_a.tif") as r:
        thumb, down = r.thumbnail(16.0)
        mask = detect_tissue(thumb)
        patch = patch_size_level0(TILE, TARGET_MPP, r.mpp)
        coords, fraction = tile_grid(r.dimensions, patch, mask, down, min_tissue=0.5)
    assert patch == 128 and down == 16.0
    x0, y0, x1, y1 = TISSUE_BOX
    inside = (coords[:, 0] >= x0) & (coords[:, 0] + patch <= x1) & (coords[:, 1] >= y0) & (coords[:, 1] + patch <= y1)
    assert inside.all(), coords[~inside]  # no tile on glass
    # the tissue is covered: every tile of the box that is mostly stained section (not the section's own white
    # lumina; saturation > 0.05 at level 0) is kept
    from skimage import color

    level0 = slide_level0()
    stained = color.rgb2hsv(level0[y0:y1, x0:x1])[..., 1] > 0.05
    kept = {tuple(c) for c in coords.tolist()}
    for ty in range(y0, y1, patch):
        for tx in range(x0, x1, patch):
            if stained[ty - y0 : ty - y0 + patch, tx - x0 : tx - x0 + patch].mean() >= 0.75:
                assert (tx, ty) in kept, (tx, ty)
    assert len(coords) >= 40
    assert (fraction >= 0.5).all() and (coords % patch == 0).all()
    order = np.lexsort((coords[:, 0], coords[:, 1]))
    np.testing.assert_array_equal(order, np.arange(len(coords)))  # row-major, deterministic
    geo = mask_to_geojson(mask, down)
    ring = np.asarray(geo["features"][0]["geometry"]["coordinates"][0])
    assert abs(ring[:, 0].min() - x0) <= 2 * down and abs(ring[:, 1].max() - y1) <= 2 * down  # level-0 contours

    # a tile read by the workers' dataset: level 1 (downsample 4 = 128 / 32) at the tile's level-0 corner
    ds = TileDataset(slides / "case_a.tif", coords, patch, TILE, mpp=None)
    for i in (0, len(coords) // 2, len(coords) - 1):
        x, y = coords[i]
        want = level0[y : y + patch, x : x + patch].reshape(TILE, 4, TILE, 4, 3).mean((1, 3))
        assert np.abs(ds[i].numpy().astype(float) - want).max() <= 1.0
    import pickle  # an opened dataset still goes to DataLoader workers (each opens its own slide handle)

    torch.testing.assert_close(pickle.loads(pickle.dumps(ds))[0], ds[0], rtol=0, atol=0)


def test_glass_has_no_tissue(slides):
    with open_slide(slides / "case_d_glass.tif") as r:
        thumb, _ = r.thumbnail(16.0)
    assert not detect_tissue(thumb).any()


# ---- extraction ----------------------------------------------------------------------------------------------------
def test_extract_cli_skips_bad_slides_resumes_and_is_deterministic(slides, tmp_path, caplog):
    out = tmp_path / "features"
    args = [
        "--slides",
        str(slides),
        "--output_dir",
        str(out),
        "--target_mpp",
        str(TARGET_MPP),
        "--tile_size",
        str(TILE),
        "--encoder",
        ENCODER,
        "--encoder_weights",
        "none",
        "--num_workers",
        "0",
        "--no_progress",
    ]
    with pytest.raises(DataError, match=r"sample 'case_b_nompp'.*no µm/px"):
        main([*args, "--on_error", "raise"])
    assert not list(out.glob("*.tmp"))  # never a half-written output
    assert main([*args, "--on_error", "skip", "--merge"]) == 0
    summary = pd.read_csv(out / "summary.csv").set_index("slide_id")
    status = summary["status"].to_dict()
    assert status == {
        "case_a": "done",
        "case_b_nompp": "skipped",
        "case_c_truncated": "skipped",
        "case_d_glass": "skipped",
    }  # case_a was finished by the first (raising) run: resumed
    assert summary["reason"].dropna().to_dict() == {
        "case_b_nompp": "no_mpp",
        "case_c_truncated": "unreadable_slide",
        "case_d_glass": "no_tissue",
    }
    assert "skipped slide case_d_glass" in caplog.text
    fragment = pd.read_csv(out / "manifest_wsi.csv")
    assert fragment.to_dict("list") == {"slide_id": ["case_a"], "wsi": ["case_a.h5"]}
    for suffix in (".thumb.png", ".mask.png", ".tissue.geojson"):
        assert (out / f"case_a{suffix}").exists()

    with h5py.File(out / "case_a.h5") as f:  # the CLAM/TRIDENT contract
        assert f["features"].shape == (len(f["coords"]), 96) and f["coords"].dtype == np.int64
        assert f.attrs["patch_size_level0"] == 128 and f.attrs["target_mpp"] == TARGET_MPP
        assert f.attrs["level0_mpp"] == pytest.approx(LEVEL0_MPP) and f.attrs["encoder"] == ENCODER
        assert f.attrs["encoder_weights_sha256"] == "random-seed0"
        first = f["features"][()]

    # the same slide through the library again, 2 DataLoader workers: identical features
    row = extract_slide(
        slides / "case_a.tif",
        tmp_path / "again",
        load_encoder(ENCODER, "none"),
        _settings(num_workers=2),
        progress=False,
    )
    assert row["tiles"] == len(first) and row["tissue_area_mm2"] > 0
    np.testing.assert_allclose(read_features(tmp_path / "again" / "case_a.h5").features, first, rtol=0, atol=1e-6)


def test_shards_split_without_overlap_and_merge(slides, tmp_path, monkeypatch):
    table = list_slides(slides)
    assert list(table["slide_id"]) == ["case_a", "case_b_nompp", "case_c_truncated", "case_d_glass"]
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    assert parse_shard(None) == (1, 2)
    assert default_shard({"RANK": "3", "WORLD_SIZE": "4"}) == (3, 4) and default_shard({}) == (0, 1)
    with pytest.raises(ValueError, match="INDEX/COUNT"):
        parse_shard("2/2")
    manifest = tmp_path / "slides.csv"
    paths = [str(slides / "case_a.tif"), str(slides / "case_b_nompp.tif")]
    pd.DataFrame({"slide": paths, "mpp": [np.nan, 0.25]}).to_csv(manifest, index=False)
    for shard in ("0/2", "1/2"):  # the per-slide mpp column rescues the slide without metadata
        main(
            [
                "--slides",
                str(manifest.parent / "slides.csv"),
                "--output_dir",
                str(tmp_path / "o"),
                "--shard",
                shard,
                "--target_mpp",
                str(TARGET_MPP),
                "--tile_size",
                str(TILE),
                "--encoder",
                ENCODER,
                "--encoder_weights",
                "none",
                "--num_workers",
                "0",
                "--no_progress",
            ]
        )
    summaries = [pd.read_csv(tmp_path / "o" / f"summary_shard{i}of2.csv") for i in (0, 1)]
    assert [list(s["slide_id"]) for s in summaries] == [["case_a"], ["case_b_nompp"]]
    main(["--output_dir", str(tmp_path / "o"), "--merge"])
    assert sorted(pd.read_csv(tmp_path / "o" / "manifest_wsi.csv")["wsi"]) == ["case_a.h5", "case_b_nompp.h5"]
    a = read_features(tmp_path / "o" / "case_a.h5")
    b = read_features(tmp_path / "o" / "case_b_nompp.h5")
    np.testing.assert_array_equal(a.coords, b.coords)  # same pixels, same mpp given by hand: same tiles


# ---- the feature file and the processor ----------------------------------------------------------------------------
def _write_third_party(path, n, d, seed, *, mpp=0.5, patch=512):
    """A feature file written by plain h5py the way CLAM/TRIDENT write theirs (no bioperceiver code)."""
    rng = np.random.default_rng(seed)
    coords = np.stack([np.arange(n) % 7, np.arange(n) // 7], axis=1) * patch
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=rng.normal(size=(n, d)).astype(np.float32))
        f.create_dataset("coords", data=coords.astype(np.int64))
        f.attrs["patch_size_level0"] = patch
        f.attrs["target_mpp"] = 0.5
        f.attrs["level0_mpp"] = mpp
        f.attrs["encoder"] = "uni_v1"
    return path


def test_processor_reads_third_party_files_pools_slides_and_subsamples(tmp_path):
    _write_third_party(tmp_path / "s1.h5", 30, 8, 0)
    _write_third_party(tmp_path / "s2.h5", 12, 8, 1, mpp=0.25, patch=1024)
    _write_third_party(tmp_path / "wide.h5", 5, 6, 2)
    with h5py.File(tmp_path / "s1.h5") as f:
        feats, coords = f["features"][()], f["coords"][()]
    proc = WsiProcessor("wsi", max_tiles_train=16).fit(["s1.h5", ["s1.h5", "s2.h5"]], base_dir=tmp_path)
    assert proc.model_settings() == {"kind": "wsi", "feature_dim": 8}
    one = proc("s1.h5", base_dir=tmp_path)  # evaluation: every tile, in file order
    np.testing.assert_array_equal(one["features"], feats)
    np.testing.assert_array_equal(one["coords"], coords)
    np.testing.assert_allclose(one["positions"], (coords + 256) * 0.5)  # tile centres in µm
    pooled = proc(json.dumps(["s1.h5", "s2.h5"]), base_dir=tmp_path)  # a patient's two slides
    assert len(pooled["features"]) == 42 and pooled["slide_index"].tolist() == [0] * 30 + [1] * 12
    np.testing.assert_allclose(pooled["positions"][30], (0 + 512) * 0.25)  # each slide its own µm scale
    train = [proc("s1.h5", base_dir=tmp_path, train=True, rng=np.random.default_rng(s)) for s in (0, 0, 1)]
    assert len(train[0]["features"]) == 16
    np.testing.assert_array_equal(train[0]["coords"], train[1]["coords"])  # the rng decides
    assert not np.array_equal(train[0]["coords"], train[2]["coords"])
    rows = {tuple(c): f for c, f in zip(coords.tolist(), feats)}
    for c, f in zip(train[2]["coords"].tolist(), train[2]["features"]):  # features travel with their tile
        np.testing.assert_array_equal(rows[tuple(c)], f)
    with pytest.raises(DataError, match=r"sample 'x'.*wide.h5 has 6-d features.*fitted on 8-d") as e:
        proc("wide.h5", base_dir=tmp_path, sample_id="x")
    assert e.value.reason == "feature_dim_mismatch"
    with h5py.File(tmp_path / "nompp.h5", "w") as f:
        f["features"], f["coords"] = feats, coords
        f.attrs["patch_size_level0"] = 512
    with pytest.raises(DataError, match=r"no 'level0_mpp'.*mpp setting"):
        proc("nompp.h5", base_dir=tmp_path)
    with pytest.raises(DataError, match=r"slide.svs is a slide and no feature file"):
        proc(str(tmp_path / "slide.svs"))


def test_slide_cells_extract_on_demand(slides, tmp_path):
    proc = WsiProcessor(
        "wsi", encoder=ENCODER, encoder_weights="none", target_mpp=TARGET_MPP, tile_size=TILE, cache_dir=str(tmp_path)
    ).fit([str(slides / "case_a.tif")])
    out = proc(str(slides / "case_a.tif"))
    assert (tmp_path / "case_a.h5").exists() and out["features"].shape[1] == 96
    x0, y0, x1, y1 = TISSUE_BOX
    assert ((out["coords"] >= [x0, y0]) & (out["coords"] + 128 <= [x1, y1])).all()


def test_validator_checks_wsi_cells(slides, tmp_path):
    _write_third_party(tmp_path / "ok.h5", 4, 8, 0)
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    table = pd.DataFrame(
        {
            "sample_id": ["a", "b", "c", "d", "e"],
            "patient_id": ["a", "b", "c", "d", "e"],
            "wsi": ["ok.h5", "bad.h5", str(slides / "case_b_nompp.tif"), json.dumps(["ok.h5", "gone.h5"]), "ok.h5"],
        }
    )
    report = validate_manifest(table, base_dir=tmp_path)
    assert sorted((p.row, p.reason) for p in report.problems) == [
        (1, "unreadable_feature_file"),
        (2, "no_mpp"),
        (3, "missing_file"),
    ]


# ---- the model -------------------------------------------------------------------------------------------------
def _config(modalities, **kw):
    return bp.BioPerceiverConfig(
        num_latents=8,
        d_latents=32,
        d_input=16,
        num_cross_attention_heads=2,
        num_self_attention_heads=2,
        num_self_attention_layers=1,
        projection_dim=8,
        modalities=modalities,
        **kw,
    )


def test_pretraining_on_synthetic_slide_and_omics_pairs_with_attribution_figures(tmp_path):
    from transformers import AutoModel

    from bioperceiver.data import BioPerceiverCollator, BioPerceiverProcessor, build_dataset, to_sample
    from bioperceiver.data.recipes.synthetic import make_synthetic_cohort
    from bioperceiver.interpret import explain_sample, integrated_gradients
    from bioperceiver.training import ContrastivePretrainer

    path = make_synthetic_cohort(
        tmp_path / "cohort",
        num_patients=8,
        missing_rate=0.2,
        wsi_slides=True,
        wsi_slides_per_sample=2,
        wsi_tiles=(10, 20),
    )
    manifest = read_manifest(path)
    assert manifest.modalities["wsi_slide"] == "wsi"
    keep = ["sample_id", "patient_id", "omics_expression", "wsi_slide", "label_binary"]
    manifest = read_manifest(
        manifest.table[keep].dropna(subset=["omics_expression", "wsi_slide"], how="all"), base_dir=manifest.base_dir
    )
    processor = BioPerceiverProcessor.from_manifest(manifest).fit(manifest, split=None)
    config = _config(processor.model_modalities(), num_labels=2)
    assert config.modalities["wsi_slide"]["feature_dim"] == 16
    ds, report = build_dataset(manifest, processor)
    assert report.total == 0
    collate = BioPerceiverCollator(processor.modalities, label_columns=["label_binary"])
    batch = collate([to_sample(r, processor) for r in ds], train=False)
    wsi = batch["inputs"]["wsi_slide"]
    assert wsi["features"].dim() == 3 and wsi["slide_index"].max() == 1  # two pooled slides per cell

    torch.manual_seed(0)
    model = bp.BioPerceiverModel(config)
    pretrainer = ContrastivePretrainer(model.train(), loss="clip")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        result = pretrainer(batch["inputs"], patient_id=batch["patient_id"])
        opt.zero_grad()
        result["loss"].backward()
        assert model.embedders["wsi_slide"].feature_proj.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(float(result["loss"].detach()))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]

    clf = bp.BioPerceiverForSequenceClassification(config).eval()
    attr = integrated_gradients(clf, batch, processors=processor, n_steps=4)
    frame = attr.to_frame()
    rows = frame[frame["modality"] == "wsi_slide"]
    assert rows["token_label"].str.match(r"tile \(x=\d+, y=\d+\)( slide 1)?").all()
    i = int(batch["inputs"]["wsi_slide"]["mask"].any(1).nonzero()[0])
    written = explain_sample(attr, i, tmp_path / "explanations", prefix="0")
    assert written["wsi_slide"].exists() and written["wsi_slide"].stat().st_size > 0

    model.save_pretrained(tmp_path / "model")
    reloaded = AutoModel.from_pretrained(tmp_path / "model").eval()
    assert isinstance(reloaded.embedders["wsi_slide"], WsiEmbedder)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(inputs=batch["inputs"]).pooler_output, model.eval()(inputs=batch["inputs"]).pooler_output
        )


def test_explanation_draws_heatmap_over_thumbnail_and_top_tile_montage(slides, tmp_path):
    from bioperceiver.interpret import attention_attribution, explain_sample

    extract_slide(slides / "case_a.tif", tmp_path, load_encoder(ENCODER, "none"), _settings(), progress=False)
    proc = WsiProcessor("wsi").fit(["case_a.h5"], base_dir=tmp_path)
    arrays = proc("case_a.h5", base_dir=tmp_path, sample_id="s0")
    spec = get_modality("wsi")
    batch = {"inputs": {"wsi": spec.collate("wsi", [arrays], ["s0"], lambda n: n)}, "sample_id": ["s0"]}
    torch.manual_seed(0)
    clf = bp.BioPerceiverForSequenceClassification(_config({"wsi": proc.model_settings()}, num_labels=2)).eval()
    attr = attention_attribution(clf, batch, processors={"wsi": proc})
    written = explain_sample(attr, 0, tmp_path / "fig", prefix="0")
    assert set(written) == {"wsi", "wsi_montage"}
    from PIL import Image

    for p in written.values():
        assert Image.open(p).size[0] > 100


def test_50k_tile_slide_in_one_cpu_forward_is_order_invariant():
    n, f = 50_000, 32
    torch.manual_seed(0)
    config = _config({"wsi": {"kind": "wsi", "feature_dim": f}})
    model = bp.BioPerceiverModel(config).eval()
    side = int(np.ceil(np.sqrt(n)))
    coords = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy"), -1).reshape(-1, 2)[:n]
    inputs = {
        "features": torch.randn(1, n, f),
        "positions": (coords * 112.0 + 56.0)[None].float(),
        "mask": torch.ones(1, n, dtype=torch.bool),
    }
    start = time.perf_counter()
    with torch.no_grad():
        out = model(inputs={"wsi": inputs}).pooler_output
    seconds = time.perf_counter() - start
    perm = torch.randperm(n)
    with torch.no_grad():
        shuffled = model(inputs={"wsi": {k: v[:, perm] for k, v in inputs.items()}}).pooler_output
    assert torch.isfinite(out).all() and seconds < 30
    torch.testing.assert_close(shuffled, out, rtol=1e-4, atol=1e-5)  # tiles are a set: their order does not matter


def test_slurm_array_example_parses_and_passes_its_settings(tmp_path):
    import os
    import subprocess

    script = Path(__file__).resolve().parents[1] / "pretrain" / "configs" / "slurm" / "extract_wsi.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    (stub / "srun").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{stub}:{os.environ['PATH']}",
        "ARGS_OUT": str(tmp_path / "args"),
        "SLURM_CPUS_PER_TASK": "8",
        "SLIDES": "/data/slides",
        "OUTPUT_DIR": "/data/features",
        "ENCODER": "vit_large_patch16_224",
        "ENCODER_WEIGHTS": "/models/uni.bin",
    }
    subprocess.run(["bash", str(script), "--min_tissue", "0.3"], check=True, env=env, cwd=tmp_path)
    args = (tmp_path / "args").read_text().split("\n")
    assert args[:3] == ["python", "-m", "bioperceiver.modalities.wsi.extract"]
    parsed = build_parser().parse_args(args[3:-1])  # every flag it passes is one the extractor knows
    assert (parsed.slides, parsed.encoder, parsed.num_workers, parsed.on_error, parsed.min_tissue) == (
        "/data/slides",
        "vit_large_patch16_224",
        7,
        "skip",
        0.3,
    )
    assert parsed.shard is None  # the array task id comes from SLURM_ARRAY_TASK_ID inside the extractor
    missing = {k: v for k, v in env.items() if k != "ENCODER_WEIGHTS"}
    result = subprocess.run(["bash", str(script)], env=missing, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0 and "ENCODER_WEIGHTS" in result.stderr
