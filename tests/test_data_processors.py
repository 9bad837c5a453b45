"""Per-kind processors on real files (pydicom's DICOMs, PNG/NIfTI written here) and exact expectations."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from bioperceiver.data import (
    BioPerceiverProcessor,
    DataError,
    ImageProcessor,
    ModalityProcessor,
    OmicsProcessor,
    SignalProcessor,
    TabularProcessor,
    TextProcessor,
    read_manifest,
    window_references,
)
from tokenizers import Tokenizer

NOTES = [
    "Chest radiograph shows bilateral infiltrates and a small effusion.",
    "No acute cardiopulmonary abnormality. Heart size normal.",
    "Bilateral effusions, larger on the left. Cardiomegaly.",
] * 5


def roundtrip(proc: ModalityProcessor, tmp_path) -> ModalityProcessor:
    proc.save_pretrained(tmp_path / proc.name)
    return ModalityProcessor.from_pretrained(tmp_path / proc.name)


# ---- text ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["wordpiece", "bpe"])
def test_text_trains_tokenizer_and_round_trips(tmp_path, model):
    proc = TextProcessor("note", model=model, vocab_size=120, min_frequency=1, max_length=64).fit(NOTES)
    out = proc(NOTES[0], sample_id="s0")
    ids = out["input_ids"]
    assert ids.dtype == np.int64 and ids[0] == proc.tokenizer.token_to_id("[CLS]")
    assert ids[-1] == proc.tokenizer.token_to_id("[SEP]")
    assert proc.model_settings()["pad_token_id"] == 0  # [PAD] is id 0, as the text embedder expects
    assert "infiltrates" in proc.decode(ids).replace(" ##", "").replace(" ", "") or "infiltr" in proc.decode(ids)
    again = roundtrip(proc, tmp_path)
    np.testing.assert_array_equal(again(NOTES[0])["input_ids"], ids)
    assert again.model_settings() == proc.model_settings()


def test_text_truncation_keeps_the_configured_end():
    long = " ".join(f"word{i % 7}" for i in range(200))
    right = TextProcessor("n", vocab_size=60, min_frequency=1, max_length=10, truncation="right").fit([long])
    left = TextProcessor("n", vocab_size=60, min_frequency=1, max_length=10, truncation="left").fit([long])
    untruncated = Tokenizer.from_str(right.tokenizer.to_str())
    untruncated.no_truncation()
    full = untruncated.encode(long, add_special_tokens=False).ids
    assert len(full) > 10
    r, lft = right(long)["input_ids"], left(long)["input_ids"]
    assert len(r) == len(lft) == 10
    assert list(r[1:-1]) == full[:8] and list(lft[1:-1]) == full[-8:]
    assert right.report() == {"truncated_notes": 1}


def test_text_loads_an_existing_tokenizer_json(tmp_path):
    trained = TextProcessor("n", vocab_size=80, min_frequency=1).fit(NOTES)
    trained.tokenizer.save(str(tmp_path / "tok.json"))
    proc = TextProcessor("n", tokenizer_file=str(tmp_path / "tok.json"))
    assert proc.is_fitted
    np.testing.assert_array_equal(proc(NOTES[1])["input_ids"], trained(NOTES[1])["input_ids"])


def test_text_empty_note_names_sample_and_fix():
    proc = TextProcessor("note", vocab_size=60, min_frequency=1).fit(NOTES)
    with pytest.raises(DataError, match=r"sample 'p7'.*modality 'note'.*empty.*Fix") as err:
        proc("   ", sample_id="p7")
    assert err.value.reason == "empty_text"


# ---- image --------------------------------------------------------------------------------------------------------
def test_image_reads_real_dicom_png_and_npy_consistently(tmp_path):
    ct = get_testdata_file("CT_small.dcm")
    proc = ImageProcessor("img", spatial_size=[32, 32], intensity="percentile")
    x = proc(ct)["pixel_values"]
    assert x.shape == (1, 32, 32) and x.dtype == np.float32
    assert x.min() >= 0 and x.max() <= 1 and x.std() > 0.05
    # The same pixels via PNG (8-bit) and .npy land in the same orientation: high correlation.
    raw, _ = proc.load(ct)
    png = tmp_path / "ct.png"
    arr8 = np.clip((raw[0] - raw.min()) / (raw.max() - raw.min()) * 255, 0, 255).astype(np.uint8)
    # DICOM and PNG are both read rows-first (pydicom's pixel_array, PIL's array): the array is saved as it is.
    Image.fromarray(arr8).save(png)
    y = proc(str(png))["pixel_values"]
    assert np.corrcoef(x.ravel(), y.ravel())[0, 1] > 0.98
    np.save(tmp_path / "ct.npy", raw[0])
    z = proc(str(tmp_path / "ct.npy"))["pixel_values"]
    np.testing.assert_allclose(z, x, atol=1e-5)


def test_image_3d_nifti_is_resampled_to_spacing_and_size(tmp_path):
    vol = np.zeros((20, 10, 10), dtype=np.float32)
    vol[5:15, 3:7, 3:7] = 100.0
    nib.save(nib.Nifti1Image(vol, np.diag([1.0, 2.0, 2.0, 1.0])), tmp_path / "v.nii.gz")
    proc = ImageProcessor(
        "ct", spatial_dims=3, spatial_size=[16, 16, 16], pixdim=[2.0, 2.0, 2.0], intensity="window", window=[0, 100]
    )
    arr, _ = proc.load(str(tmp_path / "v.nii.gz"))
    assert arr.shape == (1, 20, 10, 10)
    out = proc(str(tmp_path / "v.nii.gz"))["pixel_values"]
    assert out.shape == (1, 16, 16, 16) and out.min() >= 0 and out.max() <= 1
    # Real DICOM multi-frame dose grid through the same 3D path.
    dose = proc(get_testdata_file("rtdose.dcm"))["pixel_values"]
    assert dose.shape == (1, 16, 16, 16) and np.isfinite(dose).all()


def test_image_channels_errors_and_augmentation(tmp_path):
    rgb = tmp_path / "rgb.png"
    Image.fromarray((np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)).save(rgb)
    grey = ImageProcessor("h", spatial_size=[16, 16])(str(rgb))["pixel_values"]
    assert grey.shape == (1, 16, 16)
    assert ImageProcessor("h", spatial_size=[16, 16], in_channels=3)(str(rgb))["pixel_values"].shape == (3, 16, 16)
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"DICM" + bytes(range(256)) * 3)
    with pytest.raises(DataError, match=r"sample .x1.*modality .h.") as err:
        ImageProcessor("h", spatial_size=[16, 16])(str(bad), sample_id="x1")
    assert err.value.reason == "unreadable_image"
    with pytest.raises(DataError) as err:
        ImageProcessor("h", spatial_size=[16, 16])(str(tmp_path / "nope.png"))
    assert err.value.reason == "missing_file"
    with pytest.raises(DataError) as err:  # a volume into a 2D modality
        ImageProcessor("h", spatial_size=[16, 16])(get_testdata_file("rtdose.dcm"))
    assert err.value.reason == "wrong_shape"
    aug = ImageProcessor("h", spatial_size=[16, 16], augment={"flip": 0.5, "rotate_deg": 15, "noise_std": 0.05})
    ct = get_testdata_file("CT_small.dcm")
    a = aug(ct, train=True, rng=np.random.default_rng(1))["pixel_values"]
    b = aug(ct, train=True, rng=np.random.default_rng(1))["pixel_values"]
    c = aug(ct, train=True, rng=np.random.default_rng(2))["pixel_values"]
    plain = aug(ct, train=False)["pixel_values"]
    np.testing.assert_array_equal(a, b)  # deterministic given the RNG
    assert not np.allclose(a, c) and not np.allclose(a, plain)


def test_image_dataset_intensity_statistics_fit_and_round_trip(tmp_path):
    ct, mr = get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")
    proc = ImageProcessor("i", spatial_size=[16, 16], intensity="dataset").fit([ct, mr])
    both = np.concatenate([proc(ct)["pixel_values"].ravel(), proc(mr)["pixel_values"].ravel()])
    assert abs(both.mean()) < 1e-4 and abs(both.std() - 1) < 1e-3
    np.testing.assert_array_equal(roundtrip(proc, tmp_path)(ct)["pixel_values"], proc(ct)["pixel_values"])


# ---- omics --------------------------------------------------------------------------------------------------------
def test_omics_vocabulary_normalisation_oov_and_topk(tmp_path):
    train = [{"tp53": 10.0, "BRCA1": 0.0, "EGFR": 3.0}, {"TP53": 1.0, "EGFR": 7.0, "MYC": 2.0}]
    proc = OmicsProcessor("rna", normalization="log1p", zscore=True).fit(train)
    assert proc.state["genes"] == ["BRCA1", "EGFR", "MYC", "TP53"]  # case-normalised, sorted
    out = proc({"TP53": 10.0, "EGFR": 3.0, "KRAS": 5.0, "BRCA1": 0.0})
    np.testing.assert_array_equal(out["gene_ids"], [1, 3])  # BRCA1 is zero (dropped), KRAS unknown
    mean_tp53 = np.mean(np.log1p([10.0, 1.0]))
    std_tp53 = np.std(np.log1p([10.0, 1.0]))
    assert out["values"][1] == pytest.approx((np.log1p(10.0) - mean_tp53) / std_tp53, rel=1e-5)
    assert proc.report() == {"oov_genes": 1}
    top = OmicsProcessor("rna", top_k=2).fit(train)({"TP53": 10.0, "EGFR": 3.0, "MYC": 5.0})
    np.testing.assert_array_equal(top["gene_ids"], [2, 3])  # MYC and TP53, sorted by id
    with pytest.raises(DataError) as err:
        proc({"ENSG0001": 1.0}, sample_id="s9")
    assert err.value.reason == "no_known_genes" and "symbols vs Ensembl" in str(err.value)
    with pytest.raises(DataError, match="negative"):
        proc({"TP53": -1.0})
    again = roundtrip(proc, tmp_path)
    np.testing.assert_array_equal(again({"TP53": 4.0})["values"], proc({"TP53": 4.0})["values"])


def test_omics_reads_matrix_rows_and_gene_value_files(tmp_path):
    import pandas as pd

    pd.DataFrame({"GENE_A": [1.0, 2.0], "GENE_B": [3.0, np.nan]}, index=["s1", "s2"]).to_parquet(tmp_path / "m.parquet")
    pd.DataFrame({"gene": ["GENE_A", "GENE_B"], "value": [5.0, 6.0]}).to_csv(tmp_path / "one.csv", index=False)
    proc = OmicsProcessor("rna", normalization="none").fit(["m.parquet#row=s1", "one.csv"], base_dir=tmp_path)
    s2 = proc("m.parquet#row=s2", base_dir=tmp_path)
    np.testing.assert_array_equal(s2["gene_ids"], [0])  # GENE_B unmeasured (NaN) -> no token
    assert s2["values"][0] == 2.0
    with pytest.raises(DataError) as err:
        proc("m.parquet#row=s3", base_dir=tmp_path)
    assert err.value.reason == "missing_row"


# ---- signal -------------------------------------------------------------------------------------------------------
def _sine_npz(path, rate=200.0, seconds=4.0, freq=5.0, channels=("ECG", "RESP")):
    t = np.arange(int(rate * seconds)) / rate
    values = np.stack([np.sin(2 * np.pi * freq * t) * (i + 1) + i for i in range(len(channels))]).astype(np.float32)
    np.savez(path, values=values, channels=np.array(channels), sampling_rate=rate)
    return values


def test_signal_resamples_windows_and_normalises(tmp_path):
    _sine_npz(tmp_path / "s.npz")
    proc = SignalProcessor("ecg", target_rate=50.0).fit(["s.npz"], base_dir=tmp_path)
    out = proc("s.npz#start=1&duration=2", base_dir=tmp_path)
    assert out["values"].shape == (2, 100) and float(out["sampling_rate"]) == 50.0
    np.testing.assert_allclose(out["values"].mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(out["values"].std(axis=1), 1, atol=1e-4)
    spectrum = np.abs(np.fft.rfft(out["values"][0]))
    assert np.fft.rfftfreq(100, 1 / 50)[spectrum.argmax()] == pytest.approx(5.0)  # resampling kept the 5 Hz tone
    assert proc.state["channels"] == ["ECG", "RESP"]
    np.testing.assert_array_equal(out["channel_ids"], [0, 1])
    win = SignalProcessor("ecg", window_s=1.0).fit(["s.npz"], base_dir=tmp_path)
    a = win("s.npz", base_dir=tmp_path, train=True, rng=np.random.default_rng(0))["values"]
    b = win("s.npz", base_dir=tmp_path, train=False)["values"]
    assert a.shape == b.shape == (2, 200) and not np.allclose(a, b)
    assert window_references("s.npz", 4.0, 1.5, 1.0) == [
        "s.npz#start=0&duration=1.5",
        "s.npz#start=1&duration=1.5",
        "s.npz#start=2&duration=1.5",
    ]
    with pytest.raises(DataError) as err:
        proc("s.npz#start=3&duration=5", base_dir=tmp_path, sample_id="w")
    assert err.value.reason == "bad_window"


def test_signal_irregular_csv_npy_sidecar_nan_and_unknown_channels(tmp_path):
    import pandas as pd

    ts = np.sort(np.random.default_rng(0).uniform(0, 10, 50))
    pd.DataFrame({"time": ts, "HR": np.linspace(60, 80, 50), "SPO2": 97.0}).to_csv(tmp_path / "v.csv", index=False)
    np.save(tmp_path / "e.npy", np.ones((1, 30)))
    (tmp_path / "e.npy.json").write_text(json.dumps({"channels": ["HR"], "sampling_rate": 10}))
    proc = SignalProcessor("vitals", normalization="none").fit(["v.csv", "e.npy"], base_dir=tmp_path)
    out = proc("v.csv#start=2&duration=5", base_dir=tmp_path)
    assert "timestamps" in out and "sampling_rate" not in out
    assert out["timestamps"][0] == 0 and np.all(np.diff(out["timestamps"]) >= 0)
    assert out["timestamps"][-1] < 5 and out["values"].shape == (2, len(out["timestamps"]))
    assert float(proc("e.npy", base_dir=tmp_path)["sampling_rate"]) == 10.0
    nan = np.ones((1, 10))
    nan[0, 4] = np.nan
    np.savez(tmp_path / "n.npz", values=nan, channels=np.array(["HR"]), sampling_rate=1.0)
    with pytest.raises(DataError) as err:
        proc("n.npz", base_dir=tmp_path)
    assert err.value.reason == "non_finite"
    fixed = SignalProcessor("vitals", normalization="none", nan_policy="interpolate")
    fixed.state, fixed._index = dict(proc.state), dict(proc._index)
    assert np.isfinite(fixed("n.npz", base_dir=tmp_path)["values"]).all()
    np.savez(tmp_path / "u.npz", values=np.ones((2, 5)), channels=np.array(["HR", "TEMP"]), sampling_rate=1.0)
    assert proc("u.npz", base_dir=tmp_path)["channel_ids"].tolist() == [0]
    assert proc.report() == {"unknown_channels": 1}
    np.savez(tmp_path / "z.npz", values=np.ones((1, 0)), channels=np.array(["HR"]), sampling_rate=1.0)
    with pytest.raises(DataError) as err:
        proc("z.npz", base_dir=tmp_path)
    assert err.value.reason == "empty_signal"


# ---- tabular ------------------------------------------------------------------------------------------------------
def test_tabular_robust_scaling_categories_and_missing(tmp_path):
    train = [{"age": a, "sex": s, "lactate": la} for a, s, la in [(30, "F", 1.0), (50, "M", 2.0), (70, "F", None)]]
    train.append({"age": 1000, "sex": "M", "lactate": 1.5})  # an outlier barely moves the robust statistics
    proc = TabularProcessor("ehr").fit([json.dumps(r) for r in train])
    names = proc.feature_names
    assert names == ["age", "lactate", "sex"]
    age = proc.state["features"][0]
    assert age["center"] == 60.0
    out = proc({"age": 60, "sex": "X", "lactate": float("nan"), "bmi": 22})
    np.testing.assert_array_equal(out["feature_ids"], [0, 2])  # lactate NaN = missing, bmi unknown
    assert out["values"][0] == 0.0
    sex = proc.state["features"][2]
    assert out["category_ids"][1] == sex["unknown_id"] and out["category_ids"][0] == 0
    f_code = proc({"sex": "F"})["category_ids"][0]
    assert f_code not in (0, sex["unknown_id"]) and f_code < proc.model_settings()["num_categories"]
    assert proc.report() == {"unknown_features": 1, "unknown_categories": 1}
    assert proc({"age": 1e9})["values"][0] == 10.0  # clipped
    with pytest.raises(DataError) as err:
        proc({"age": float("inf")}, sample_id="s")
    assert err.value.reason == "non_finite"
    with pytest.raises(DataError) as err:
        proc({"age": "old"})
    assert err.value.reason == "bad_value"
    empty = proc({"age": None})
    assert len(empty["feature_ids"]) == 0  # all missing -> no token (the modality counts as absent)
    np.testing.assert_array_equal(roundtrip(proc, tmp_path)({"sex": "F"})["category_ids"], [f_code])


def test_composite_processor_saves_beside_model_and_configures_it(tmp_path):
    import pandas as pd
    import torch
    from transformers import AutoModel

    import bioperceiver as bp

    table = pd.DataFrame(
        {
            "sample_id": ["a", "b", "c"],
            "patient_id": ["p1", "p2", "p3"],
            "text": NOTES[:3],
            "image_ct": [get_testdata_file("CT_small.dcm"), None, get_testdata_file("MR_small.dcm")],
            "tabular": [json.dumps({"age": 40, "sex": "F"}), json.dumps({"age": 60}), None],
        }
    )
    manifest = read_manifest(table)
    proc = BioPerceiverProcessor.from_manifest(
        manifest,
        {"text": {"vocab_size": 100, "min_frequency": 1, "max_length": 32}, "image_ct": {"spatial_size": [16, 16]}},
    ).fit(manifest, split=None)
    mods = proc.model_modalities({"image_ct": {"patch_size": 8}})
    assert mods["text"]["max_position_embeddings"] == 32 and mods["tabular"]["num_features"] == 2
    model = bp.create_model("bioperceiver_debug", modalities=mods)
    model.save_pretrained(tmp_path / "ckpt")
    proc.save_pretrained(tmp_path / "ckpt")
    loaded = BioPerceiverProcessor.from_pretrained(tmp_path / "ckpt")
    assert loaded.modalities == proc.modalities
    assert isinstance(AutoModel.from_pretrained(tmp_path / "ckpt"), bp.BioPerceiverModel)
    for rec in manifest.records():
        a, b = proc(rec), loaded(rec)
        for name in proc.processors:
            if a[name] is None:
                assert b[name] is None
                continue
            for key in a[name]:
                np.testing.assert_array_equal(a[name][key], b[name][key])
    with pytest.raises(DataError, match=r"sample .z.*no modality"):
        proc({"sample_id": "z", "patient_id": "p", "text": None})
    assert torch.is_tensor(model.latents) if hasattr(model, "latents") else True


def test_image_dicom_series_folder_is_stacked_in_slice_order(tmp_path):
    import pydicom
    from pydicom.uid import generate_uid

    series = tmp_path / "series"
    series.mkdir()
    for k in range(5):  # slices shifted 2 mm apart, brightness rising with position; file names in reverse order
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 2.0 * k]
        ds.PixelData = (ds.pixel_array + 100 * k).astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(series / f"slice{4 - k}.dcm")
    proc = ImageProcessor("ct", spatial_dims=3, spatial_size=[8, 32, 32], intensity="none", pixdim=None)
    arr, _ = proc.load(str(series))
    assert arr.shape == (1, 128, 128, 5)
    means = [float(arr[0, ..., i].mean()) for i in range(5)]
    np.testing.assert_allclose(np.diff(means), 100.0, atol=1e-3)  # sorted by position, not by file name
    assert proc(str(series))["pixel_values"].shape == (1, 8, 32, 32)
