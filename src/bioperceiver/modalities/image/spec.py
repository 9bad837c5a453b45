"""``image`` spec: a 2D/3D image file -> ``pixel_values``; tokens are patches on the pixel grid."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch

from ...data.errors import DataError, Problem
from ..spec import NPY_FIX, ArraySpec, ModalitySpec, NpyFileError, describe_failure, npy_shape
from .embedder import ImageEmbedder
from .processor import PIL_SUFFIXES, ImageProcessor

NIFTI_SUFFIXES = (".nii", ".nii.gz", ".img", ".hdr")


class ImageSpec(ModalitySpec):
    """A cell is a path (``.dcm``, DICOM series folder, ``.nii``/``.nii.gz``, PNG/JPEG/TIFF, ``.npy``); a processed
    sample is ``pixel_values`` ``(C, H, W)`` or ``(C, D, H, W)`` of the processor's fixed ``spatial_size``. A batch
    holds every row (zeros for absent images) and a ``present`` flag ``(B,)``."""

    kind = "image"
    processor_class = ImageProcessor
    embedder_class = ImageEmbedder
    arrays = MappingProxyType(
        {"pixel_values": ArraySpec(torch.float32, rank=None, pad_axes=(), doc="(C, H, W) or (C, D, H, W)")}
    )
    mask_key = "present"
    cell_forms = ("path",)
    token_unit = "patch"

    def num_tokens(self, arrays):
        if "backbone_features" in arrays:  # cached outputs of a frozen backbone (bioperceiver.data.shards)
            return int(arrays["backbone_features"].shape[0])
        return int(arrays["pixel_values"].size)

    def check_arrays(self, arrays, *, sample_id=None, modality=None):
        if "backbone_features" not in arrays:
            return super().check_arrays(arrays, sample_id=sample_id, modality=modality)
        feats = np.asarray(arrays["backbone_features"])
        grid = np.asarray(arrays.get("feature_grid", ()))
        if (
            feats.ndim != 2
            or grid.shape != (2,)
            or int(np.prod(grid)) != feats.shape[0]
            or set(arrays)
            != {
                "backbone_features",
                "feature_grid",
            }
        ):
            raise DataError(
                "wrong_shape",
                f"cached backbone features {feats.shape} with grid {grid.tolist()} (keys {sorted(arrays)})",
                sample_id=sample_id,
                modality=modality,
                fix="rewrite the shards with --cache_features",
            )
        return {"backbone_features": feats, "feature_grid": grid}

    def collate(self, name, column, sample_ids, pad_len):
        b = len(column)
        if any(a is not None and "backbone_features" in a for a in column):
            return self._collate_features(name, column, sample_ids)
        shapes = {a["pixel_values"].shape for a in column if a is not None}
        if len(shapes) > 1:
            raise DataError(
                "shape_mismatch",
                f"images of different shapes in one batch: {sorted(shapes)} (samples {list(sample_ids)})",
                modality=name,
                fix="give the image processor a fixed spatial_size",
            )
        shape = shapes.pop()
        px = torch.zeros((b, *shape), dtype=torch.float32)
        present = torch.zeros(b, dtype=torch.bool)
        for i, a in enumerate(column):
            if a is not None:
                px[i] = torch.from_numpy(np.asarray(a["pixel_values"], dtype=np.float32))
                present[i] = True
        return {"pixel_values": px, "present": present}

    def _collate_features(self, name, column, sample_ids):
        """Cached frozen-backbone outputs: ``backbone_features`` (B, h*w, C'), ``feature_grid`` (B, 2), ``present``."""
        shapes = {(a["backbone_features"].shape, tuple(a["feature_grid"])) for a in column if a is not None}
        if len(shapes) > 1 or any(a is not None and "backbone_features" not in a for a in column):
            raise DataError(
                "shape_mismatch",
                f"cached backbone features of different shapes (or mixed with pixels) in one batch: {sorted(shapes)} "
                f"(samples {list(sample_ids)})",
                modality=name,
                fix="write every image of the shards with the same processor and --cache_features",
            )
        (shape, grid) = shapes.pop()
        b = len(column)
        feats = torch.zeros((b, *shape), dtype=torch.float32)
        present = torch.zeros(b, dtype=torch.bool)
        for i, a in enumerate(column):
            if a is not None:
                feats[i] = torch.from_numpy(np.asarray(a["backbone_features"], dtype=np.float32))
                present[i] = True
        grids = torch.tensor([list(grid)] * b, dtype=torch.long)
        return {"backbone_features": feats, "feature_grid": grids, "present": present}

    def features(self, processor):
        import datasets

        shape = (processor.settings.in_channels, *processor.settings.spatial_size)
        array_cls = {3: datasets.Array3D, 4: datasets.Array4D}[len(shape)]
        return {"pixel_values": array_cls(shape=shape, dtype="float32")}

    def check_file(self, path: Path) -> list[Problem]:
        """Decode the header only: ``.npy`` via ``numpy.lib.format``, PNG/JPEG/TIFF via PIL (no pixel decoding),
        DICOM via ``pydicom.dcmread(stop_before_pixels=True)``, NIfTI via the nibabel header."""
        name = path.name.lower()
        try:
            if path.is_dir():
                if not any(p.is_file() for p in path.iterdir()):
                    return [Problem("empty_folder", f"{path} holds no file", "point to a folder with a DICOM series")]
                return []
            if name.endswith(".npy"):
                shape = npy_shape(path)
            elif name.endswith(PIL_SUFFIXES):
                from PIL import Image

                with Image.open(path) as im:  # lazy: reads the header, not the pixels
                    shape = (im.size[1], im.size[0])
            elif name.endswith(NIFTI_SUFFIXES):
                import nibabel

                shape = tuple(nibabel.load(path).header.get_data_shape())
            elif name.endswith(".dcm") or not path.suffix:
                import pydicom

                ds = pydicom.dcmread(path, stop_before_pixels=True)
                if "Rows" not in ds or "Columns" not in ds:
                    return [Problem("not_an_image", f"{path.name} is a DICOM file without an image", "check the file")]
                shape = (int(ds.Rows), int(ds.Columns))
            else:
                return []  # another format MONAI may read: the deep check runs the processor
        except NpyFileError as err:
            return [Problem("corrupt_file", str(err), NPY_FIX)]
        except Exception as err:  # any decoder failure is the finding
            return [
                Problem(
                    "unreadable_image",
                    f"cannot decode the header of {path.name} ({describe_failure(err)})",
                    "re-export the file; check it opens with PIL / pydicom / nibabel / numpy",
                )
            ]
        if len(shape) < 2 or 0 in shape:
            return [Problem("empty_image", f"{path.name} has shape {shape}", "re-export the image")]
        return []

    def token_labels(self, attribution, modality):
        grid = image_grid(attribution, modality)
        b, n = attribution.scores[modality].shape
        axes = ("z", "y", "x")[-len(grid) :]
        names = [
            "patch (" + ", ".join(f"{a}{i}" for a, i in zip(axes, np.unravel_index(k, grid))) + ")" for k in range(n)
        ]
        return [names] * b

    def describe(self, arrays):
        return "x".join(map(str, arrays["pixel_values"].shape)), int(arrays["pixel_values"].size)


def patch_grid(config: Mapping, size: tuple[int, ...], n: int) -> tuple[int, ...]:
    """Patch grid ``(h, w)`` / ``(d, h, w)`` of ``n`` image tokens over spatial ``size`` (patch mode:
    ``ceil(size / patch_size)``; a timm backbone: the factorisation of ``n`` closest to the aspect ratio)."""
    if config.get("mode", "patch") == "patch":
        grid = tuple(-(-s // config["patch_size"]) for s in size)
        if math.prod(grid) == n:
            return grid
    if len(size) != 2:
        raise ValueError(f"cannot map {n} tokens onto a {len(size)}D patch grid")
    h_over_w = size[0] / size[1]
    pairs = [(h, n // h) for h in range(1, n + 1) if n % h == 0]
    return min(pairs, key=lambda hw: abs(math.log(hw[0] / hw[1]) - math.log(h_over_w)))


def image_grid(attribution, modality: str) -> tuple[int, ...]:
    """:func:`patch_grid` of an image modality of an attribution."""
    size = tuple(attribution.inputs[modality]["pixel_values"].shape[2:])
    n = attribution.scores[modality].shape[1]
    try:
        return patch_grid(attribution.modality_configs[modality], size, n)
    except ValueError as err:
        raise ValueError(f"modality {modality!r}: {err}") from None
