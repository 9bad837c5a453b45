"""The synthetic cohort recipe: determinism, missingness, loadable files, recoverable ground truth, manifests."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bioperceiver.data.manifest import is_missing, read_manifest
from bioperceiver.data.recipes import synthetic as syn

MODALITY_COLUMNS = list(syn.MODALITIES)
# small and fast: tiny images/volumes/signals, few genes
SMALL = dict(image_size=8, volume_size=4, num_genes=20, genes_per_sample=(5, 10), signal_seconds=0.5)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _r2_heldout(x: np.ndarray, y: np.ndarray, lam: float = 1e-3, n_train: int | None = None) -> float:
    """Ridge fit on the first rows, R^2 on the rest."""
    x = np.c_[x, np.ones(len(x))]
    n_train = n_train or (2 * len(x)) // 3
    xtr, ytr, xte, yte = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    w = np.linalg.solve(xtr.T @ xtr + lam * np.eye(x.shape[1]), xtr.T @ ytr)
    return 1.0 - float(((xte @ w - yte) ** 2).sum() / ((yte - yte.mean()) ** 2).sum())


def test_sample_latents_pure_and_prefix_stable():
    a = syn.sample_latents(10, 3, seed=5)
    assert a.shape == (10, 3) and a.dtype == np.float64
    np.testing.assert_array_equal(a, syn.sample_latents(10, 3, seed=5))
    np.testing.assert_array_equal(a[:4], syn.sample_latents(4, 3, seed=5))
    assert not np.allclose(a, syn.sample_latents(10, 3, seed=6))


def test_deterministic_byte_identical(tmp_path):
    kwargs = dict(num_patients=8, samples_per_patient=2, irregular_signal_fraction=0.5, **SMALL)
    p1 = syn.make_synthetic_cohort(tmp_path / "a", seed=3, **kwargs)
    p2 = syn.make_synthetic_cohort(tmp_path / "b", seed=3, **kwargs)
    pd.testing.assert_frame_equal(pd.read_parquet(p1), pd.read_parquet(p2))
    f1, f2 = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert f1.keys() == f2.keys() and any(k.endswith(".npz") for k in f1) and any(k.endswith(".nii.gz") for k in f1)
    assert [k for k in f1 if f1[k] != f2[k]] == []  # manifest, sidecar and every data file
    p3 = syn.make_synthetic_cohort(tmp_path / "c", seed=4, **kwargs)
    t1, t3 = pd.read_parquet(p1), pd.read_parquet(p3)
    assert not np.allclose(t1.label_regression, t3.label_regression)
    assert not t1.text_note.equals(t3.text_note)


def test_every_sample_has_a_modality_and_missing_rate_is_respected(tmp_path):
    rate = 0.5
    table = pd.read_parquet(syn.make_synthetic_cohort(tmp_path, num_patients=200, missing_rate=rate, **SMALL))
    present = table[MODALITY_COLUMNS].notna()
    assert present.any(axis=1).all()
    for col in MODALITY_COLUMNS:
        assert abs((1 - present[col].mean()) - rate) < 0.1, col
    full = pd.read_parquet(syn.make_synthetic_cohort(tmp_path / "none", num_patients=20, missing_rate=0.0, **SMALL))
    assert full[MODALITY_COLUMNS].notna().all().all()
    one = pd.read_parquet(syn.make_synthetic_cohort(tmp_path / "all", num_patients=30, missing_rate=1.0, **SMALL))
    assert (one[MODALITY_COLUMNS].notna().sum(axis=1) == 1).all()


def test_files_exist_and_load(tmp_path):
    path = syn.make_synthetic_cohort(tmp_path, num_patients=12, missing_rate=0.0, irregular_signal_fraction=0.5)
    table = pd.read_parquet(path)
    irregular = 0
    for row in table.itertuples():
        img = Image.open(tmp_path / row.image_2d)
        assert img.mode == "L" and img.size == (32, 32)
        assert row.image_2d.startswith("synthetic/images/") and row.image_2d.endswith(".png")

        vol = nib.load(tmp_path / row.image_3d)
        assert row.image_3d.startswith("synthetic/volumes/") and row.image_3d.endswith(".nii.gz")
        assert vol.shape == (16, 16, 16) and vol.get_data_dtype() == np.float32
        np.testing.assert_allclose(vol.header.get_zooms(), (1.5, 1.5, 1.5))
        np.testing.assert_allclose(np.abs(np.diag(vol.affine)[:3]), 1.5)

        assert row.signal_ecg.startswith("synthetic/signals/")
        with np.load(tmp_path / row.signal_ecg) as npz:
            values, channels = npz["values"], npz["channels"]
            assert values.dtype == np.float32 and values.shape[0] == 3 and np.isfinite(values).all()
            assert list(channels) == ["ECG_I", "ECG_II", "RESP"]
            if "timestamps" in npz.files:
                irregular += 1
                ts = npz["timestamps"]
                assert "sampling_rate" not in npz.files and ts.dtype == np.float64 and ts.shape == (values.shape[1],)
                assert (np.diff(ts) > 0).all() and ts[0] >= 0
            else:
                assert float(npz["sampling_rate"]) == 100.0 and values.shape[1] == 400

        assert 8 <= len(row.text_note.split()) <= 24
        expr = json.loads(row.omics_expression)
        assert 50 <= len(expr) <= 150 and all(g.startswith("GENE") and len(g) == 8 for g in expr)
        assert all(v >= 0 for v in expr.values())
        ehr = json.loads(row.tabular_ehr)
        assert {"age", "heart_rate", "creatinine", "smoker"} <= set(ehr)
        assert ehr["smoker"] in ("yes", "no", "former", None)
    assert 0 < irregular < len(table)


def test_labels_are_ground_truth_and_recoverable(tmp_path):
    path = syn.make_synthetic_cohort(
        tmp_path, num_patients=300, missing_rate=0.0, **{**SMALL, "num_genes": 100, "genes_per_sample": (40, 80)}
    )
    table = pd.read_parquet(path)
    meta = json.loads(Path(str(path) + ".meta.json").read_text())
    z = np.stack(table.meta_latent.to_numpy())
    np.testing.assert_array_equal(z, syn.sample_latents(300, 4, seed=0))
    gt = meta["ground_truth"]
    np.testing.assert_array_equal(table.label_binary, (z @ np.array(gt["w_binary"]) > 0).astype(int))
    np.testing.assert_array_equal(table.label_multiclass, np.argmax(z @ np.array(gt["p_multiclass"]).T, axis=1))
    names = meta["multilabel_classes"]
    assert [list(v) for v in table.label_multilabel] == [[names[k] for k in np.flatnonzero(r > 0.5)] for r in z]
    assert (table.label_survival_time > 0).all() and set(table.label_survival_event) <= {0, 1}
    assert 0.2 < table.label_survival_event.mean() < 0.95
    assert set(table.label_multiclass) == {0, 1, 2} and 0.2 < table.label_binary.mean() < 0.8
    y = table.label_regression.to_numpy()
    assert np.corrcoef(y, z @ np.array(gt["r_regression"]))[0, 1] > 0.95

    # tabular numeric features (missing -> column mean) predict the regression label and every latent dimension
    ehr = pd.DataFrame([json.loads(s) for s in table.tabular_ehr]).select_dtypes("number")
    x = ehr.fillna(ehr.mean()).to_numpy(float)
    assert _r2_heldout(x, y) > 0.5
    assert min(_r2_heldout(x, z[:, k]) for k in range(4)) > 0.5
    # omics: library-size-normalised log expression, unmeasured genes -> gene mean
    expr = np.log(pd.DataFrame([json.loads(s) for s in table.omics_expression]).to_numpy(float) + 1e-3)
    expr -= np.nanmean(expr, axis=1, keepdims=True)
    expr = np.where(np.isnan(expr), np.nanmean(expr, axis=0), expr)
    assert _r2_heldout(expr, y, lam=10.0) > 0.5
    # images: raw pixels
    pixels = np.stack([np.asarray(Image.open(tmp_path / f), dtype=float).ravel() / 255 for f in table.image_2d])
    assert _r2_heldout(pixels, y, lam=1.0) > 0.5
    # text: findings follow the sign of the strongest latent dimension
    agree = 0
    for note, row in zip(table.text_note, z):
        k = int(np.argmax(np.abs(row)))
        word = "elevated" if row[k] > 0 else "reduced"
        agree += f"{word} {names[k]} markers" in note
    assert agree / len(table) > 0.7


def test_samples_of_a_patient_share_latent_and_labels(tmp_path):
    path = syn.make_synthetic_cohort(tmp_path, num_patients=5, samples_per_patient=3, missing_rate=0.0, **SMALL)
    table = pd.read_parquet(path)
    assert len(table) == 15 and table.sample_id.is_unique and table.patient_id.nunique() == 5
    for _, group in table.groupby("patient_id"):
        assert len(group) == 3
        latents = np.stack(group.meta_latent.to_numpy())
        assert np.allclose(latents, latents[0])
        for col in ("label_binary", "label_multiclass", "label_regression", "label_survival_time"):
            assert group[col].nunique() == 1, col
        assert group.tabular_ehr.nunique() > 1 and group.omics_expression.nunique() == 3  # independent noise


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_manifest_formats_round_trip(tmp_path, fmt):
    path = syn.make_synthetic_cohort(tmp_path, num_patients=10, manifest_format=fmt, **SMALL)
    assert path == tmp_path / f"manifest.{fmt}"
    manifest = read_manifest(path)
    assert manifest.modalities == syn.MODALITIES
    assert manifest.label_columns == list(syn.LABELS)
    assert manifest.metadata["synthetic"] is True and manifest.metadata["recipe"] == syn.RECIPE
    assert len(manifest) == 10
    records = manifest.records()
    reference = pd.read_parquet(syn.make_synthetic_cohort(tmp_path / "ref", num_patients=10, **SMALL))
    for rec, ref in zip(records, reference.to_dict("records")):
        assert rec["sample_id"] == ref["sample_id"]
        for col in MODALITY_COLUMNS:
            assert is_missing(rec[col]) == is_missing(ref[col]), col
            if not is_missing(ref[col]):
                assert rec[col] == ref[col], col
        labels = rec["label_multilabel"]
        labels = json.loads(labels) if isinstance(labels, str) else list(labels)
        assert labels == list(ref["label_multilabel"])
        assert rec["label_regression"] == pytest.approx(ref["label_regression"])
        assert bool(rec["meta_synthetic"]) is True


def test_everything_marked_synthetic(tmp_path):
    path = syn.make_synthetic_cohort(tmp_path, num_patients=6, **SMALL)
    table = pd.read_parquet(path)
    assert table.sample_id.str.startswith("synthetic:").all() and table.patient_id.str.startswith("synthetic:").all()
    assert table.meta_synthetic.all()
    for col in ("image_2d", "image_3d", "signal_ecg"):
        assert table[col].dropna().str.startswith("synthetic/").all()
    assert all(
        p.relative_to(tmp_path).parts[0] == "synthetic"
        for p in tmp_path.rglob("*")
        if p.is_file() and not p.name.startswith("manifest")
    )
    meta = json.loads(Path(str(path) + ".meta.json").read_text())
    assert meta["synthetic"] is True and meta["recipe"] == "bioperceiver.data.recipes.synthetic"
    assert meta["params"]["num_patients"] == 6 and "generative_model" in meta
    assert meta["modalities"] == syn.MODALITIES and meta["labels"] == syn.LABELS


def test_cli(tmp_path, capsys):
    out = syn.main(
        [
            "--output_dir",
            str(tmp_path),
            "--num_patients",
            "3",
            "--image_size",
            "8",
            "--volume_size",
            "4",
            "--num_genes",
            "10",
            "--genes_per_sample",
            "2",
            "4",
            "--signal_channels",
            "A",
            "RESP",
            "--manifest_format",
            "jsonl",
            "--seed",
            "2",
        ]
    )
    assert out == tmp_path / "manifest.jsonl" and out.exists()
    assert str(out) in capsys.readouterr().out
    meta = read_manifest(out).metadata
    assert meta["params"]["signal_channels"] == ["A", "RESP"] and meta["params"]["genes_per_sample"] == [2, 4]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"missing_rate": 1.5},
        {"manifest_format": "xlsx"},
        {"text_length": (5, 2)},
        {"num_patients": 0},
        {"signal_channels": ()},
    ],
)
def test_invalid_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        syn.make_synthetic_cohort(tmp_path, **kwargs)
