"""Tile features: a frozen ``timm`` patch encoder with local weights, tiles read by DataLoader workers, and the
per-slide feature file (``features`` (N, D), ``coords`` (N, 2) level-0 x, y; attributes ``patch_size_level0``,
``target_mpp``, ``level0_mpp``, ``encoder``, ``encoder_weights_sha256``: the CLAM/TRIDENT layout)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ...data.errors import DataError
from ...hashing import file_sha256
from .reader import open_slide

logger = logging.getLogger(__name__)

H5_FIX = "re-run bioperceiver.modalities.wsi.extract for this slide (or point the cell to the slide itself)"


# ---- the encoder ---------------------------------------------------------------------------------------------------
@dataclass
class PatchEncoder:
    """A frozen timm model in eval mode, its input normalisation and where its weights came from."""

    model: torch.nn.Module
    name: str
    weights_hash: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: torch.device

    @property
    def dim(self) -> int:
        return int(self.model.num_features)

    @torch.inference_mode()
    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        """``tiles`` (B, H, W, 3) uint8 -> features (B, D) float32. Channels-last, bf16 autocast on CUDA only."""
        x = tiles.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W)
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.model(x)
        return out.float().cpu()


def load_encoder(
    name: str, weights: str | os.PathLike | None, *, device: str | torch.device = "cpu", seed: int = 0
) -> PatchEncoder:
    """``timm.create_model(name, pretrained=False, num_classes=0)`` with local ``weights`` (a ``.safetensors`` or
    ``torch.save`` state dict; ``None``/``"none"``: random weights from ``seed``, for tests). Never reaches a hub.

    Raises ``ValueError`` naming the model or the weights file and what to pass."""
    import timm
    from timm.data import resolve_data_config

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        raise ValueError(f"--encoder {name!r} is not a timm model name; similar: {close}")
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=0)
    if weights is None or str(weights).lower() == "none":
        weights_hash = f"random-seed{seed}"
    else:
        path = Path(weights)
        if not path.is_file():
            raise ValueError(f"--encoder_weights {path} does not exist; give a local weights file or 'none'")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(("head", "fc."))]
        if missing:
            raise ValueError(
                f"--encoder_weights {path.name} does not fit timm model {name!r}: {len(missing)} missing keys, "
                f"e.g. {missing[:3]}; check the model name matches the weights"
            )
        if unexpected:
            logger.info("encoder weights: %d unused keys (e.g. %s)", len(unexpected), unexpected[:3])
        weights_hash = file_sha256(path)
    cfg = resolve_data_config({}, model=model)
    device = torch.device(device)
    model = model.eval().requires_grad_(False).to(device, memory_format=torch.channels_last)
    return PatchEncoder(model, name, weights_hash, tuple(cfg["mean"]), tuple(cfg["std"]), device)


# ---- tiles read by workers -----------------------------------------------------------------------------------------
class TileDataset(Dataset):
    """Tiles of one slide: item ``i`` is the ``tile_size`` RGB uint8 tile whose level-0 top-left is ``coords[i]``,
    read at the best pyramid level and resized. The slide is opened lazily in each worker process."""

    def __init__(self, slide: str | os.PathLike, coords: np.ndarray, patch_level0: int, tile_size: int, *, mpp):
        self.slide, self.coords, self.patch_level0, self.tile_size, self.mpp = (
            slide,
            coords,
            patch_level0,
            tile_size,
            mpp,
        )
        self._reader = None

    def __len__(self) -> int:
        return len(self.coords)

    def __getstate__(self) -> dict:  # worker processes open their own handle (slide handles do not pickle)
        return {**self.__dict__, "_reader": None}

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        if self._reader is None:
            self._reader = open_slide(self.slide, mpp=self.mpp)
        reader = self._reader
        level = reader.best_level(self.patch_level0 / self.tile_size)
        size = max(1, round(self.patch_level0 / reader.level_downsamples[level]))
        region = reader.read_region(tuple(self.coords[i]), level, (size, size))
        if size != self.tile_size:
            region = np.asarray(Image.fromarray(region).resize((self.tile_size,) * 2, Image.Resampling.BILINEAR))
        return torch.from_numpy(np.ascontiguousarray(region))  # (tile, tile, 3)


def encode_tiles(
    dataset: TileDataset, encoder: PatchEncoder, *, batch_size: int = 64, num_workers: int = 0, progress: bool = True
) -> np.ndarray:
    """Features (N, D) float32 of every tile of ``dataset``, in its order."""
    from tqdm.auto import tqdm

    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=encoder.device.type == "cuda",
        persistent_workers=False,
    )
    out = np.zeros((len(dataset), encoder.dim), np.float32)
    i = 0
    for tiles in tqdm(loader, desc=f"encode {Path(dataset.slide).name}", disable=not progress, leave=False):
        feats = encoder(tiles).numpy()
        out[i : i + len(feats)] = feats
        i += len(feats)
    return out


# ---- the feature file ----------------------------------------------------------------------------------------------
REQUIRED_ATTRS = ("patch_size_level0",)


def write_features(path: str | os.PathLike, features: np.ndarray, coords: np.ndarray, **attrs) -> Path:
    """Write ``<slide>.h5`` atomically (a temporary file renamed when complete: never a half-written output)."""
    import h5py

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=np.asarray(features, np.float32))
        f.create_dataset("coords", data=np.asarray(coords, np.int64))
        for key, value in attrs.items():
            if value is not None:
                f.attrs[key] = value
    os.replace(tmp, path)
    return path


@dataclass
class SlideFeatures:
    """The content of a feature file: ``features`` (N, D) float32, ``coords`` (N, 2) level-0 px and attributes."""

    features: np.ndarray
    coords: np.ndarray
    patch_size_level0: float
    level0_mpp: float | None
    attrs: dict


def read_features(path: str | os.PathLike, *, mpp: float | None = None) -> SlideFeatures:
    """Read a feature file in the CLAM/TRIDENT layout (``features``, ``coords``; CLAM's ``coords`` attributes
    ``patch_size``/``patch_level`` are understood too). Raises :class:`DataError` naming the file."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f or "coords" not in f:
                raise DataError(
                    "bad_feature_file", f"{path.name} lacks the 'features' and/or 'coords' datasets", fix=H5_FIX
                )
            features = np.asarray(f["features"][()], np.float32)
            coords = np.asarray(f["coords"][()])
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
            attrs.update({f"coords.{k}": _plain(v) for k, v in f["coords"].attrs.items()})
    except DataError:
        raise
    except Exception as err:
        raise DataError(
            "unreadable_feature_file", f"{path.name} is not a readable HDF5 file ({type(err).__name__})", fix=H5_FIX
        ) from None
    if features.ndim == 3 and features.shape[0] == 1:  # CLAM writes (1, N, D) in some versions
        features = features[0]
    if coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    if features.ndim != 2 or coords.shape != (len(features), 2):
        raise DataError(
            "bad_feature_file",
            f"{path.name}: features {features.shape} and coords {coords.shape} must be (N, D) and (N, 2)",
            fix=H5_FIX,
        )
    if not np.isfinite(features).all():
        raise DataError("non_finite", f"{path.name}: features contain NaN/inf", fix=H5_FIX)
    patch = attrs.get("patch_size_level0")
    if patch is None and "coords.patch_size" in attrs:  # CLAM: patch_size at patch_level, level-0 = x downsample
        patch = float(attrs["coords.patch_size"]) * float(attrs.get("coords.downsample", [1.0])[0] or 1.0)
    if patch is None:
        raise DataError(
            "bad_feature_file",
            f"{path.name} has no 'patch_size_level0' attribute (the tile size in level-0 pixels)",
            fix="add it: h5py.File(path, 'a').attrs['patch_size_level0'] = SIZE, or " + H5_FIX,
        )
    level0_mpp = mpp if mpp is not None else attrs.get("level0_mpp")
    return SlideFeatures(features, coords.astype(np.int64), float(patch), _float(level0_mpp), attrs)


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _float(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) and out > 0 else None
