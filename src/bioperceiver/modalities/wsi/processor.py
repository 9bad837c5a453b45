"""``wsi`` processor: a feature file (``.h5``), a slide (features extracted on demand) or a list of them (a
patient's slides, pooled) -> tile ``features`` (N, F), ``coords`` (N, 2) level-0 px, ``positions`` (N, 2) µm of the
tile centres and ``slide_index`` (N,). Training subsamples tiles to a token budget; evaluation keeps them all."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...data.errors import DataError
from ..processor import ModalityProcessor
from .features import read_features

logger = logging.getLogger(__name__)

FEATURE_SUFFIXES = (".h5", ".hdf5")


@dataclass
class WsiSettings:
    """Settings of the wsi processor.

    Args:
        max_tiles_train: token budget per cell during training: a random subset of this many tiles (new each
            epoch, from the sample's ``rng``); ``None`` keeps all tiles.
        max_tiles_eval: budget at evaluation and inference (``None``, the default: every tile).
        mpp: level-0 µm/px for feature files or slides that lack it (``None``: from the file; missing -> error).
        target_mpp: on-demand extraction of slide cells: tile scale in µm/px.
        tile_size: on-demand extraction: tile size in pixels.
        min_tissue: on-demand extraction: tissue fraction of a kept tile.
        encoder: on-demand extraction: timm model name (``None``: slide cells are an error; extract first).
        encoder_weights: on-demand extraction: local weights file or ``"none"``.
        cache_dir: on-demand extraction: where the feature files go (default ``<slide folder>/wsi_features``).
    """

    max_tiles_train: int | None = 4096
    max_tiles_eval: int | None = None
    mpp: float | None = None
    target_mpp: float = 0.5
    tile_size: int = 224
    min_tissue: float = 0.5
    encoder: str | None = None
    encoder_weights: str | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        for key in ("max_tiles_train", "max_tiles_eval"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key} must be >= 1 or None, got {value}")
        if self.mpp is not None and not self.mpp > 0:
            raise ValueError(f"mpp must be > 0, got {self.mpp}")


def cell_paths(value) -> list[str]:
    """A cell as a list of paths: one path, a list/tuple/array of paths, or a JSON list string."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return [value]
    if isinstance(value, (list, tuple, np.ndarray)):
        return [str(v) for v in value]
    return [str(value)]


class WsiProcessor(ModalityProcessor):
    """Tile features of the slide(s) of one cell; see the module docstring."""

    kind = "wsi"
    Settings = WsiSettings

    def __init__(self, name=None, **settings):
        super().__init__(name, **settings)
        self._encoder = None
        self._sources: OrderedDict[str, list[Path]] = OrderedDict()  # sample id -> files, for figures (this process)

    # ---- reading ------------------------------------------------------------------------------------------------
    def _resolve(self, path: str, base_dir: Path | None) -> Path:
        from ...data.manifest import parse_reference

        return parse_reference(path, base_dir).path

    def _feature_file(self, path: Path) -> Path:
        """``path`` if it is a feature file, else the slide's features (extracted once, then cached)."""
        if path.name.lower().endswith(FEATURE_SUFFIXES):
            if not path.exists():
                raise self.error("missing_file", f"feature file {path} does not exist", "fix the path")
            return path
        from .extract import ExtractSettings, extract_slide, slide_id_of
        from .features import load_encoder

        s = self.settings
        cache = Path(s.cache_dir) if s.cache_dir else path.parent / "wsi_features"
        out = cache / f"{slide_id_of(path)}.h5"
        if out.exists():
            return out
        if s.encoder is None:
            raise self.error(
                "not_extracted",
                f"{path.name} is a slide and no feature file exists for it in {cache}",
                "run python -m bioperceiver.modalities.wsi.extract first, or set the processor's encoder and "
                "encoder_weights to extract on demand",
            )
        if self._encoder is None:
            self._encoder = load_encoder(s.encoder, s.encoder_weights)
        settings = ExtractSettings(target_mpp=s.target_mpp, tile_size=s.tile_size, min_tissue=s.min_tissue, mpp=s.mpp)
        extract_slide(path, cache, self._encoder, settings, progress=False)
        return out

    def _read(self, value, base_dir: Path | None):
        files, slides = [], []
        for raw in cell_paths(value):
            path = self._feature_file(self._resolve(raw, base_dir))
            try:
                slide = read_features(path, mpp=self.settings.mpp)
            except DataError as err:
                raise err.located(modality=self.name) from None
            if slide.level0_mpp is None:
                raise self.error(
                    "no_mpp",
                    f"{path.name} has no 'level0_mpp' attribute: tile positions cannot be put in µm",
                    "set the wsi processor's mpp setting (or add the attribute to the file)",
                )
            files.append(path)
            slides.append(slide)
        return files, slides

    # ---- fit / process ------------------------------------------------------------------------------------------
    def _fit(self, values, sample_ids, base_dir):
        dims: dict[int, str] = {}
        encoders = set()
        tiles = []
        for value, sid in zip(values, sample_ids):
            try:
                _files, slides = self._read(value, base_dir)
            except DataError as err:
                raise err.located(sample_id=sid) from None
            for slide in slides:
                dims.setdefault(slide.features.shape[1], sid)
                encoders.add(str(slide.attrs.get("encoder", "unknown")))
                tiles.append(len(slide.features))
        if len(dims) > 1:
            raise DataError(
                "feature_dim_mismatch",
                f"tile features of different widths {sorted(dims)} (e.g. samples {list(dims.values())[:2]})",
                modality=self.name,
                fix="extract every slide with the same encoder",
            )
        self.state = {
            "feature_dim": int(next(iter(dims))),
            "encoders": sorted(encoders),
            "median_tiles": float(np.median(tiles)),
            "fitted_on": len(values),
        }
        logger.info(
            "wsi processor %r: %d-d features, median %d tiles", self.name, dims and next(iter(dims)), np.median(tiles)
        )

    def _process(self, value, *, sample_id, base_dir, train, rng):
        files, slides = self._read(value, base_dir)
        feats, coords, positions, index = [], [], [], []
        for k, slide in enumerate(slides):
            if slide.features.shape[1] != self.state["feature_dim"]:
                raise self.error(
                    "feature_dim_mismatch",
                    f"{files[k].name} has {slide.features.shape[1]}-d features, the processor was fitted on "
                    f"{self.state['feature_dim']}-d",
                    "extract with the encoder used for the training slides",
                )
            feats.append(slide.features)
            coords.append(slide.coords)
            centre = slide.coords.astype(np.float64) + slide.patch_size_level0 / 2.0
            positions.append((centre * slide.level0_mpp).astype(np.float32))  # µm
            index.append(np.full(len(slide.features), k, np.int64))
        features = np.concatenate(feats)
        if not len(features):
            raise self.error("no_tiles", f"{[f.name for f in files]} hold no tile", "re-extract with tissue")
        out = {
            "features": features,
            "coords": np.concatenate(coords),
            "positions": np.concatenate(positions),
            "slide_index": np.concatenate(index),
        }
        budget = self.settings.max_tiles_train if train else self.settings.max_tiles_eval
        if budget is not None and len(features) > budget:
            pick = np.sort(rng.choice(len(features), budget, replace=False))
            out = {k: v[pick] for k, v in out.items()}
        if sample_id is not None:
            self._sources[str(sample_id)] = files
            while len(self._sources) > 4096:
                self._sources.popitem(last=False)
        return out

    def sources(self, sample_id) -> list[Path] | None:
        """The feature files of a sample processed in this process (for figures), or ``None``."""
        return self._sources.get(str(sample_id))

    def model_settings(self):
        return {"kind": "wsi", "feature_dim": int(self.state["feature_dim"])}
