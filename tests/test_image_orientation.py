"""Image axis order and channels: every reader gives rows-first ``(H, W[, D])`` arrays (PNG/JPEG/BMP/TIFF as PIL's
``np.asarray``, DICOM as pydicom's ``pixel_array``, ``.npy`` as saved), processors saved before that fix keep their
old (transposed) loading with a warning, and extra frames of a volume are an error, not averaged to grey."""

from __future__ import annotations

import logging
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from bioperceiver.data import DataError, ImageProcessor, ModalityProcessor
from bioperceiver.modalities import get_modality

H, W = 40, 100  # non-square, so a transposition changes the shape


def stripes() -> np.ndarray:
    """(H, W) uint8: a gradient along the width plus bright rows, so any transposition or flip shows."""
    img = np.tile(np.linspace(0, 200, W, dtype=np.uint8), (H, 1))
    img[5:9] = 255
    return img


def old_saved_dict(name: str, **settings) -> dict:
    """A processor_config.json as the code before the axis-order fix wrote it (format 1, no ``axis_order``)."""
    defaults = {
        "augment": {},
        "in_channels": 1,
        "intensity": "percentile",
        "max_fit_samples": 256,
        "orientation": "RAS",
        "percentiles": [0.5, 99.5],
        "pixdim": None,
        "resize": "resize",
        "spatial_dims": 2,
        "spatial_size": [224, 224],
        "window": None,
    }
    return {"format_version": 1, "kind": "image", "name": name, "settings": {**defaults, **settings}, "state": {}}


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tif"])
def test_pil_formats_load_rows_first_like_pil_and_npy(tmp_path, suffix):
    path = tmp_path / f"stripe{suffix}"
    Image.fromarray(stripes()).save(path)
    np.save(tmp_path / "stripe.npy", stripes())
    proc = ImageProcessor("img", spatial_size=[H, W], intensity="none")
    arr, _ = proc.load(str(path))
    assert arr.shape == (1, H, W)
    np.testing.assert_array_equal(arr[0], np.asarray(Image.open(path), dtype=np.float32))
    if suffix != ".jpg":  # lossless formats: the same pixels as the .npy, after processing too
        npy, _ = proc.load(str(tmp_path / "stripe.npy"))
        np.testing.assert_array_equal(arr, npy)
        same = proc(str(tmp_path / "stripe.npy"))["pixel_values"]
        np.testing.assert_array_equal(proc(str(path))["pixel_values"], same)


def test_non_square_spatial_size_is_height_then_width(tmp_path):
    Image.fromarray(stripes()).save(tmp_path / "s.png")
    out = ImageProcessor("img", spatial_size=[20, 50], intensity="none")(str(tmp_path / "s.png"))["pixel_values"]
    assert out.shape == (1, 20, 50)
    assert (out[0, 3] == 255).all() and out[0, 15, 0] < out[0, 15, -1]  # bright rows at the top, gradient along W


@pytest.mark.parametrize("name", ["OBXXXX1A.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm", "CT_small.dcm"])
def test_dicom_loads_as_pydicom_pixel_array_and_like_its_npy(tmp_path, name):
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} not available offline")
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.astype(np.float32)
    pixels = pixels * float(getattr(ds, "RescaleSlope", 1)) + float(getattr(ds, "RescaleIntercept", 0))
    proc = ImageProcessor("img", spatial_size=list(pixels.shape), intensity="none")
    arr, _ = proc.load(path)
    np.testing.assert_array_equal(arr[0], pixels)
    shutil.copy(path, tmp_path / "IM0001")  # a DICOM file without a suffix, as scanners export them
    np.testing.assert_array_equal(proc.load(str(tmp_path / "IM0001"))[0], arr)
    np.save(tmp_path / "same.npy", pixels)
    np.testing.assert_array_equal(proc(path)["pixel_values"], proc(str(tmp_path / "same.npy"))["pixel_values"])


def test_colour_dicom_and_png_keep_rows_first_with_channels_first(tmp_path):
    path = get_testdata_file("US1_UNCR.dcm")  # (480, 640, 3) RGB
    rgb = pydicom.dcmread(path).pixel_array
    proc = ImageProcessor("img", spatial_size=[48, 64], in_channels=3, intensity="none")
    arr, _ = proc.load(path)
    np.testing.assert_array_equal(arr, np.moveaxis(rgb, -1, 0).astype(np.float32))
    Image.fromarray(rgb).save(tmp_path / "us.png")
    np.testing.assert_array_equal(proc.load(str(tmp_path / "us.png"))[0], arr)


def test_multiframe_dicom_volume_has_frames_last_like_a_series(tmp_path):
    path = get_testdata_file("rtdose.dcm")  # pixel_array (frames 15, rows 10, columns 10)
    frames = pydicom.dcmread(path).pixel_array.astype(np.float32)
    proc = ImageProcessor("dose", spatial_dims=3, spatial_size=[10, 10, 15], intensity="none", orientation=None)
    arr, _ = proc.load(path)
    np.testing.assert_array_equal(arr[0], np.moveaxis(frames, 0, -1))


def test_nifti_keeps_nibabel_voxel_order(tmp_path):
    vol = np.random.default_rng(0).random((6, 9, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii.gz")
    proc = ImageProcessor("v", spatial_dims=3, spatial_size=[6, 9, 4], intensity="none", orientation=None)
    np.testing.assert_array_equal(proc.load(str(tmp_path / "v.nii.gz"))[0][0], vol)


def test_new_processor_saves_its_axis_order_and_loads_it_back_without_warning(tmp_path, caplog):
    proc = ImageProcessor("img", spatial_size=[H, W]).fit(["a.png"])
    assert proc.to_dict()["settings"]["axis_order"] == "rows_first"
    proc.save_pretrained(tmp_path / "p")
    with caplog.at_level(logging.WARNING):
        again = ModalityProcessor.from_pretrained(tmp_path / "p")
    assert again.settings.axis_order == "rows_first" and not caplog.records


def test_processor_saved_before_the_fix_keeps_its_transposed_output_and_warns_once(tmp_path, caplog):
    Image.fromarray(stripes()).save(tmp_path / "s.png")
    Image.fromarray(np.ascontiguousarray(stripes().T)).save(tmp_path / "t.png")  # what the old loader saw
    dcm = get_testdata_file("OBXXXX1A.dcm")
    with caplog.at_level(logging.WARNING, logger="bioperceiver"):
        old = ModalityProcessor.from_dict(old_saved_dict("xray", spatial_size=[16, 32]))
        first = old(str(tmp_path / "s.png"))["pixel_values"]
        old(dcm)
    warned = [r for r in caplog.records if "xray" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    assert "axis_order" in warned[0].getMessage() and "refit" in warned[0].getMessage()
    assert old.settings.axis_order == "legacy"
    # the old loader's output: the image transposed before resizing, exactly
    new = ImageProcessor("xray", spatial_size=[16, 32])
    np.testing.assert_array_equal(first, new(str(tmp_path / "t.png"))["pixel_values"])
    assert not np.array_equal(first, new(str(tmp_path / "s.png"))["pixel_values"])
    np.testing.assert_array_equal(old.load(dcm)[0][0], pydicom.dcmread(dcm).pixel_array.T.astype(np.float32))
    # saved again, it stays legacy (and says so)
    old.save_pretrained(tmp_path / "resaved")
    again = ModalityProcessor.from_pretrained(tmp_path / "resaved")
    assert again.settings.axis_order == "legacy"
    np.testing.assert_array_equal(again(str(tmp_path / "s.png"))["pixel_values"], first)


def test_axis_order_setting_is_checked():
    with pytest.raises(ValueError, match="axis_order"):
        ImageProcessor("img", axis_order="columns_first")


# ---- channels -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frames", [3, 4])
def test_volume_frames_are_an_error_not_averaged_to_grey(tmp_path, frames):
    vol = np.random.default_rng(0).random((24, 24, 12, frames)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v4d.nii.gz")
    proc = ImageProcessor("ct", spatial_dims=3, spatial_size=[8, 16, 16], in_channels=1)
    with pytest.raises(DataError, match=r"sample 's1'.*modality 'ct'.*" + str(frames)) as err:
        proc("v4d.nii.gz", base_dir=tmp_path, sample_id="s1")
    assert err.value.reason == "wrong_channels"
    assert "in_channels" in err.value.fix and "frame" in err.value.fix
    problems = get_modality("image").deep_check(proc, "v4d.nii.gz", sample_id="s1", base_dir=tmp_path)
    assert [p.reason for p in problems] == ["wrong_channels"]  # bioperceiver-validate --deep reports it
    matching = ImageProcessor("ct", spatial_dims=3, spatial_size=[8, 16, 16], in_channels=frames)
    assert matching("v4d.nii.gz", base_dir=tmp_path)["pixel_values"].shape == (frames, 8, 16, 16)


def test_legacy_processor_still_averages_volume_frames_with_a_warning(tmp_path, caplog):
    vol = np.random.default_rng(0).random((24, 24, 12, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v4d.nii.gz")
    old = ModalityProcessor.from_dict(old_saved_dict("ct", spatial_dims=3, spatial_size=[8, 16, 16]))
    with caplog.at_level(logging.WARNING, logger="bioperceiver"):
        out = old("v4d.nii.gz", base_dir=tmp_path)["pixel_values"]
        old("v4d.nii.gz", base_dir=tmp_path)
    assert out.shape == (1, 8, 16, 16)
    assert len([r for r in caplog.records if "frames" in r.getMessage()]) == 1


def test_rgb_to_grey_of_2d_images_is_logged_once(tmp_path, caplog):
    rgb = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    proc = ImageProcessor("photo", spatial_size=[20, 30], intensity="none")
    with caplog.at_level(logging.INFO, logger="bioperceiver"):
        arr, _ = proc.load(str(tmp_path / "rgb.png"))
        proc.load(str(tmp_path / "rgb.png"))
    np.testing.assert_allclose(arr[0], rgb.astype(np.float32).mean(axis=-1), rtol=1e-6)
    logged = [r for r in caplog.records if "grey" in r.getMessage()]
    assert len(logged) == 1 and logged[0].levelno == logging.INFO and "photo" in logged[0].getMessage()
