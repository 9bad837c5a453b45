"""Image processor: loading (DICOM file or series folder, NIfTI, PNG/JPEG/BMP/TIFF, .npy), orientation and
spacing for volumes, intensity windowing/normalisation, resize or crop to a fixed size, optional augmentation.

Axis order (``axis_order="rows_first"``, the default): every format is read the way its own Python library reads it,
channel first, so images from different file types line up and ``spatial_size`` is ``[H, W]`` / ``[H, W, D]``:

* PNG/JPEG/BMP/TIFF: ``np.asarray(PIL.Image.open(p))``, ``(H, W[, C])`` -> ``(C, H, W)``;
* DICOM: pydicom's ``pixel_array`` (rescaled by RescaleSlope/Intercept), ``(rows, columns)``; a multi-frame file
  ``(frames, rows, columns)`` and a series folder become ``(rows, columns, frames/slices)``, with the affine to match;
* NIfTI: nibabel's voxel order ``(i, j, k)``, the order its affine describes (a volume has no rows and columns of
  its own; ``orientation``, ``"RAS"`` by default, reorients DICOM and NIfTI volumes alike from their affines);
* ``.npy``: the array as saved, ``(H, W)``, ``(C, H, W)``, ``(D1, D2, D3)`` or ``(C, D1, D2, D3)``.

``axis_order="legacy"`` is the loading of processors saved before ``axis_order`` existed, kept so that their models see
what they were trained on: MONAI's default readers, which transpose PNG/JPEG/DICOM to ``(W, H)``, and RGB->grey
averaging of 3- or 4-frame volumes. Processors loaded without the setting get it (and a warning).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...data.errors import DataError
from ..processor import ModalityProcessor, check_finite
from ..spec import NPY_FIX, NpyFileError, describe_failure, load_npy

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".dcm", ".dicom", ".nii", ".nii.gz", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".npy")
INTENSITY_MODES = ("percentile", "window", "zscore", "dataset", "none")
RESIZE_MODES = ("resize", "longest_pad", "crop_pad")
AXIS_ORDERS = ("rows_first", "legacy")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class ImageSettings:
    """Settings of the image processor.

    Args:
        spatial_dims: 2 (images) or 3 (volumes); must match the model's image modality.
        spatial_size: output size per spatial axis, e.g. ``[224, 224]`` or ``[64, 128, 128]``.
        in_channels: output channels; RGB -> grey (mean of RGB) when 1, grey -> repeated when 3.
        intensity: ``"percentile"`` (per image, ``percentiles`` -> [0, 1]), ``"window"`` (``window`` -> [0, 1],
            e.g. CT Hounsfield units ``[-1000, 1000]``), ``"zscore"`` (per image), ``"dataset"`` (mean/std
            fitted on the training split) or ``"none"``.
        percentiles: lower/upper percentile for ``"percentile"``.
        window: intensity range for ``"window"``.
        resize: ``"resize"`` (to ``spatial_size``, aspect not kept), ``"longest_pad"`` (keep aspect, pad) or
            ``"crop_pad"`` (centre crop/pad, no interpolation).
        orientation: axis codes volumes are reoriented to (``None`` keeps the file's); 3D only.
        pixdim: voxel spacing in mm volumes are resampled to before resizing (``None`` keeps it); 3D only.
        augment: random augmentations applied when called with ``train=True`` (views for contrastive
            pretraining): any of ``flip`` (probability), ``rotate_deg`` (max degrees, 2D), ``zoom`` (max relative
            zoom), ``noise_std`` (Gaussian noise after normalisation), ``gamma`` (max log-gamma contrast change).
        max_fit_samples: images read by ``fit`` for ``intensity="dataset"`` statistics.
        axis_order: ``"rows_first"`` (PNG/JPEG/DICOM as ``(H, W)``, like PIL, pydicom and ``.npy``; see the module
            docstring) or ``"legacy"`` (the transposed ``(W, H)`` loading of processors saved before this setting
            existed, which get it when loaded; fit new processors to use rows-first images).
    """

    spatial_dims: int = 2
    spatial_size: list[int] = field(default_factory=lambda: [224, 224])
    in_channels: int = 1
    intensity: str = "percentile"
    percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    window: list[float] | None = None
    resize: str = "resize"
    orientation: str | None = "RAS"
    pixdim: list[float] | None = None
    augment: dict[str, float] = field(default_factory=dict)
    max_fit_samples: int = 256
    axis_order: str = "rows_first"

    def __post_init__(self):
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        self.spatial_size = [int(s) for s in self.spatial_size]
        if len(self.spatial_size) != self.spatial_dims or min(self.spatial_size) < 1:
            raise ValueError(f"spatial_size {self.spatial_size} must have {self.spatial_dims} positive entries")
        if self.intensity not in INTENSITY_MODES:
            raise ValueError(f"intensity must be one of {INTENSITY_MODES}, got {self.intensity!r}")
        if self.intensity == "window" and (self.window is None or len(self.window) != 2):
            raise ValueError("intensity='window' needs window=[low, high]")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.axis_order not in AXIS_ORDERS:
            raise ValueError(f"axis_order must be one of {AXIS_ORDERS}, got {self.axis_order!r}")
        unknown = set(self.augment) - {"flip", "rotate_deg", "zoom", "noise_std", "gamma"}
        if unknown:
            raise ValueError(f"unknown augmentation(s) {sorted(unknown)}")


def _loader():
    """MONAI's default readers: NIfTI (and other formats neither PIL nor DICOM) in both axis orders, every format
    with ``axis_order="legacy"``."""
    from monai.transforms import LoadImage

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LoadImage(image_only=True, ensure_channel_first=False, simple_keys=True)


def _dicom_reader():
    """MONAI's pydicom reader without its i/j swap: ``pixel_array`` order, the affine computed for it."""
    from monai.data import PydicomReader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PydicomReader(swap_ij=False)


def _read_pil(path: Path) -> tuple[np.ndarray, int | None]:
    """``np.asarray(Image.open(path))``: ``(H, W)`` or ``(H, W, C)`` (channel axis -1)."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im, dtype=np.float32)
    return arr, (-1 if arr.ndim == 3 else None)


def _is_dicom(path: Path) -> bool:
    """A series folder, a ``.dcm``/``.dicom`` file, or a file with the DICOM preamble (any name)."""
    if path.is_dir() or path.name.lower().endswith(DICOM_SUFFIXES):
        return True
    from pydicom.misc import is_dicom

    try:
        return is_dicom(str(path))
    except OSError:
        return False


def _frames_and_samples(ds) -> tuple[int, int]:
    first = ds[0] if isinstance(ds, list) else ds
    return int(first.get("NumberOfFrames", 1) or 1), int(first.get("SamplesPerPixel", 1) or 1)


class ImageProcessor(ModalityProcessor):
    """Image path -> ``pixel_values`` float32 ``(C, *spatial_size)``."""

    kind = "image"
    Settings = ImageSettings

    def __init__(self, name=None, **settings):
        super().__init__(name, **settings)
        self._axis_order_given = "axis_order" in settings  # False: saved before the setting existed (see _on_load)
        self._load = None
        self._dicom = None
        self._augment = None
        self._logged: set[str] = set()

    def _on_load(self):
        if not self._axis_order_given:  # saved before the setting existed: keep the loading its model was trained with
            self.settings.axis_order = "legacy"
        if self.settings.axis_order == "legacy":
            self._warn_legacy()

    def _warn_legacy(self) -> None:
        self._log_once(
            "legacy",
            logging.WARNING,
            "image processor %r reads images as processors saved before bioperceiver read them rows-first "
            "(axis_order='legacy': PNG/JPEG/DICOM transposed to (width, height), 3/4-frame volumes averaged to grey), "
            "so that its model sees what it was trained on. To use the corrected (height, width) orientation, refit "
            "the processors (new ones default to axis_order='rows_first') and retrain or finetune the model on them",
            self.name,
        )

    def _log_once(self, key: str, level: int, message: str, *args) -> None:
        if key not in self._logged:
            self._logged.add(key)
            logger.log(level, message, *args)

    @property
    def needs_fit(self) -> bool:
        return self.settings.intensity == "dataset"

    # ---- loading ------------------------------------------------------------------------------------------------
    def load(self, value, base_dir: Path | None = None) -> tuple[np.ndarray, dict]:
        """Read the file into a channel-first float32 array with ``spatial_dims`` spatial axes (and its meta)."""
        from ...data.manifest import parse_reference

        if not isinstance(value, (str, Path)):
            raise self.error("bad_type", f"expected an image path, got {type(value).__name__}", "")
        ref = parse_reference(str(value), base_dir)
        path = ref.path
        if not path.exists():
            raise self.error("missing_file", f"image {path} does not exist", "fix the path or set the cell to null")
        if path.suffix == ".npy":
            try:
                arr = load_npy(path)
            except NpyFileError as err:
                raise self.error("corrupt_file", str(err), NPY_FIX) from None
            if arr.size == 0:
                raise self.error("empty_image", f"{path.name} has shape {arr.shape}", "re-export the image")
            return self._channel_first(np.asarray(arr, dtype=np.float32), path, has_channel=None), {}
        if self.settings.axis_order == "legacy":
            self._warn_legacy()  # once, also for a processor built with axis_order="legacy"
            return self._load_monai(path)
        name = path.name.lower()
        pil = name.endswith(PIL_SUFFIXES)
        # NIfTI and the like: voxel order as nibabel's, as before (by suffix first: no header read per load)
        if not pil and (name.endswith(NIFTI_SUFFIXES) or not _is_dicom(path)):
            return self._load_monai(path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if pil:
                    (arr, channel_axis), affine = _read_pil(path), None
                else:
                    arr, channel_axis, affine = self._read_dicom(path)
        except Exception as err:
            raise self._unreadable(path, err) from None
        if channel_axis is not None:
            arr = np.moveaxis(arr, channel_axis, 0)
        return self._channel_first(arr, path, channel_axis is not None), {"affine": affine, "meta": {}}

    def _read_dicom(self, path: Path) -> tuple[np.ndarray, int | None, torch.Tensor]:
        """A DICOM file or series folder as ``(rows, columns[, frames or slices][, samples])`` (channel axis or None)
        and its affine."""
        if self._dicom is None:
            self._dicom = _dicom_reader()
        ds = self._dicom.read(str(path))
        arr, meta = self._dicom.get_data(ds)
        arr = np.asarray(arr, dtype=np.float32)
        frames, samples = _frames_and_samples(ds)
        if frames > 1 and not isinstance(ds, list):  # (frames, rows, columns[, samples]): frames after the columns,
            arr = np.moveaxis(arr, 0, 2)  # as a series folder stacks its slices and the affine's third column says
        channel_axis = None
        if samples > 1:  # samples per pixel (RGB) last in a file, before the slice axis in a series
            channel_axis = -2 if isinstance(ds, list) else -1
        return arr, channel_axis, torch.as_tensor(np.asarray(meta["affine"], dtype=np.float64))

    def _unreadable(self, path: Path, err: Exception) -> DataError:
        return self.error(
            "unreadable_image",
            f"cannot read {path} ({describe_failure(err)})",
            "check that the file opens (pydicom.dcmread / nibabel.load / PIL.Image.open); compressed DICOM "
            "transfer syntaxes need the matching pylibjpeg/gdcm codec",
        )

    def _load_monai(self, path: Path) -> tuple[np.ndarray, dict]:
        if self._load is None:
            self._load = _loader()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = self._load(str(path))
        except Exception as err:
            raise self._unreadable(path, err) from None
        meta = dict(getattr(img, "meta", {}) or {})
        arr = np.asarray(img, dtype=np.float32)
        ocs = meta.get("original_channel_dim")
        if isinstance(ocs, (int, np.integer)) and not isinstance(ocs, bool):
            arr, has_channel = np.moveaxis(arr, int(ocs), 0), True
        elif arr.ndim == self.settings.spatial_dims + 1 and arr.shape[-1] in (3, 4) and self.settings.spatial_dims == 2:
            arr, has_channel = np.moveaxis(arr, -1, 0), True  # colour DICOM: samples per pixel last
        else:
            has_channel = False  # MONAI marks channel-less images with NaN/"no_channel"
        return self._channel_first(arr, path, has_channel), {"affine": getattr(img, "affine", None), "meta": meta}

    def _channel_first(self, arr: np.ndarray, path: Path, has_channel: bool | None) -> np.ndarray:
        sd = self.settings.spatial_dims
        if has_channel is None:  # .npy or unknown: (spatial...) or (C, spatial...)
            has_channel = arr.ndim == sd + 1
        if not has_channel:
            arr = arr[None]
        # 2D models accept a volume with a single slice; 3D models a single image only as an error.
        while arr.ndim > sd + 1 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim != sd + 1:
            raise self.error(
                "wrong_shape",
                f"{path.name} has shape {tuple(arr.shape[1:])} (channels {arr.shape[0]}) but this modality is {sd}D",
                "put volumes in a modality with spatial_dims=3 and 2D images in one with spatial_dims=2",
            )
        c, want = arr.shape[0], self.settings.in_channels
        legacy = self.settings.axis_order == "legacy"
        if c != want:
            if want == 1 and c in (3, 4) and sd == 2:  # a colour photograph: RGB(A) -> grey
                self._log_once(
                    "grey",
                    logging.INFO,
                    "image processor %r turns colour (RGB/RGBA) images into grey (the mean of R, G and B) because "
                    "in_channels=1; set in_channels=3 to keep the colour",
                    self.name,
                )
                arr = arr[:3].mean(axis=0, keepdims=True)
            elif want == 1 and c in (3, 4) and legacy:  # how volumes with 3/4 frames were read before: kept
                self._log_once(
                    "frames",
                    logging.WARNING,
                    "image processor %r (axis_order='legacy') averages the %d frames of %s (and of any other "
                    "3- or 4-frame volume) into one, as before; processors fitted anew refuse such volumes",
                    self.name,
                    c,
                    path.name,
                )
                arr = arr[:3].mean(axis=0, keepdims=True)
            elif want == 3 and c == 1:
                arr = np.repeat(arr, 3, axis=0)
            elif sd == 3:
                raise self.error(
                    "wrong_channels",
                    f"{path.name} is a volume with {c} frames/channels, expected {want}",
                    f"set in_channels={c} if the frames are channels of one volume (e.g. MR sequences), or save the "
                    "frame to use as its own 3D file (e.g. vol[..., k])",
                )
            else:
                raise self.error(
                    "wrong_channels", f"{path.name} has {c} channels, expected {want}", "set in_channels to match"
                )
        return np.ascontiguousarray(arr, dtype=np.float32)

    # ---- geometry and intensity ---------------------------------------------------------------------------------
    def _spatial(self, arr: np.ndarray, extra: dict) -> np.ndarray:
        from monai.data import MetaTensor
        from monai.transforms import Orientation, Resize, ResizeWithPadOrCrop, Spacing

        s = self.settings
        x = torch.from_numpy(arr)
        if s.spatial_dims == 3 and (s.orientation or s.pixdim) and extra.get("affine") is not None:
            x = MetaTensor(x, affine=extra["affine"])
            if s.orientation:
                x = Orientation(axcodes=s.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S")))(x)
            if s.pixdim:
                x = Spacing(pixdim=s.pixdim, mode="bilinear")(x)
            x = x.as_tensor()
        if s.resize == "resize":
            x = Resize(spatial_size=s.spatial_size, mode="area" if _shrinks(x, s) else "bilinear")(x)
        elif s.resize == "longest_pad":
            x = Resize(spatial_size=max(s.spatial_size), size_mode="longest", mode="area")(x)
            x = ResizeWithPadOrCrop(spatial_size=s.spatial_size)(x)
        else:
            x = ResizeWithPadOrCrop(spatial_size=s.spatial_size)(x)
        return np.asarray(x, dtype=np.float32)

    def _intensity(self, arr: np.ndarray) -> np.ndarray:
        s = self.settings
        if s.intensity == "percentile":
            lo, hi = np.percentile(arr, s.percentiles)
            return np.clip((arr - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(arr)
        if s.intensity == "window":
            lo, hi = s.window
            return np.clip((arr - lo) / (hi - lo), 0, 1)
        if s.intensity == "zscore":
            std = arr.std()
            return (arr - arr.mean()) / std if std > 0 else arr - arr.mean()
        if s.intensity == "dataset":
            return (arr - self.state["mean"]) / self.state["std"]
        return arr

    def _fit(self, values, sample_ids, base_dir):
        if self.settings.intensity != "dataset":
            self.state = {"fitted_on": len(values)}
            return
        total, total_sq, count = 0.0, 0.0, 0
        for v, sid in zip(values[: self.settings.max_fit_samples], sample_ids):
            try:
                arr, extra = self.load(v, base_dir)
            except DataError as err:
                raise err.located(sample_id=sid) from None
            arr = self._spatial(arr, extra).astype(np.float64)
            total, total_sq, count = total + arr.sum(), total_sq + (arr**2).sum(), count + arr.size
        mean = total / count
        std = max(float(np.sqrt(max(total_sq / count - mean**2, 0.0))), 1e-6)
        self.state = {"mean": float(mean), "std": std, "fitted_on": min(len(values), self.settings.max_fit_samples)}

    # ---- federated fit: intensity sums of the first max_fit_samples images of each site --------------------------
    def _site_statistics(self, values, sample_ids, base_dir):
        if self.settings.intensity != "dataset":
            return {"fitted_on": len(values)}
        total, total_sq, count = 0.0, 0.0, 0
        for v, sid in zip(values[: self.settings.max_fit_samples], sample_ids):
            try:
                arr, extra = self.load(v, base_dir)
            except DataError as err:
                raise err.located(sample_id=sid) from None
            arr = self._spatial(arr, extra).astype(np.float64)
            total, total_sq, count = total + float(arr.sum()), total_sq + float((arr**2).sum()), count + arr.size
        return {
            "fitted_on": min(len(values), self.settings.max_fit_samples),
            "sum": total,
            "sumsq": total_sq,
            "count": count,
        }

    def _fit_from_statistics(self, merged, query):
        if self.settings.intensity != "dataset":
            self.state = {"fitted_on": int(merged["fitted_on"])}
            return
        mean = merged["sum"] / merged["count"]
        std = max(float(np.sqrt(max(merged["sumsq"] / merged["count"] - mean**2, 0.0))), 1e-6)
        self.state = {"mean": float(mean), "std": std, "fitted_on": int(merged["fitted_on"])}

    def _augmentations(self):
        from monai.transforms import Compose, RandAdjustContrast, RandFlip, RandGaussianNoise, RandRotate, RandZoom

        a, ts = self.settings.augment, []
        if a.get("flip"):
            ts += [RandFlip(prob=a["flip"], spatial_axis=i) for i in range(self.settings.spatial_dims)]
        if a.get("rotate_deg") and self.settings.spatial_dims == 2:
            ts.append(RandRotate(range_x=np.deg2rad(a["rotate_deg"]), prob=1.0, padding_mode="zeros"))
        if a.get("zoom"):
            ts.append(RandZoom(prob=1.0, min_zoom=1 - a["zoom"], max_zoom=1 + a["zoom"], keep_size=True))
        if a.get("gamma"):
            g = float(np.exp(a["gamma"]))
            ts.append(RandAdjustContrast(prob=1.0, gamma=(1 / g, g)))
        if a.get("noise_std"):
            ts.append(RandGaussianNoise(prob=1.0, std=a["noise_std"]))
        return Compose(ts)

    def _process(self, value, *, sample_id, base_dir, train, rng):
        arr, extra = self.load(value, base_dir)
        check_finite(self, arr, "the image", "repair or exclude the file")
        if arr.size == 0 or min(arr.shape[1:]) < 1:
            raise self.error("empty_image", f"image has shape {arr.shape}", "exclude the file")
        arr = self._spatial(arr, extra)
        if train and self.settings.augment:
            if self._augment is None:
                self._augment = self._augmentations()
            if self.settings.intensity == "percentile" or self.settings.intensity == "window":
                arr = self._intensity(arr)  # gamma contrast expects [0, 1]
                arr = self._apply_aug(arr, rng)
            else:
                arr = self._intensity(self._apply_aug(arr, rng))
        else:
            arr = self._intensity(arr)
        return {"pixel_values": np.ascontiguousarray(arr, dtype=np.float32)}

    def _apply_aug(self, arr, rng):
        self._augment.set_random_state(seed=int(rng.integers(2**31 - 1)))
        return np.asarray(self._augment(torch.from_numpy(np.ascontiguousarray(arr))), dtype=np.float32)

    def model_settings(self):
        return {"kind": "image", "spatial_dims": self.settings.spatial_dims, "in_channels": self.settings.in_channels}


def _shrinks(x: torch.Tensor, s: ImageSettings) -> bool:
    return all(a >= b for a, b in zip(x.shape[1:], s.spatial_size))
