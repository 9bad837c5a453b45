"""``wsi`` spec: a feature file / slide path (or a list: a patient's slides) -> one token per tissue tile; tokens
map back to level-0 tile coordinates, and explanations draw a heatmap over the slide and a montage of top tiles."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch

from ...data.errors import DataError, Problem
from ..spec import ArraySpec, ModalitySpec, describe_failure
from .embedder import WsiEmbedder
from .processor import FEATURE_SUFFIXES, WsiProcessor, cell_paths


class WsiSpec(ModalitySpec):
    """A processed sample is ``features`` (N, F), ``coords`` (N, 2), ``positions`` (N, 2) and ``slide_index`` (N,);
    a batch pads the tile axis and adds ``mask`` (B, N)."""

    kind = "wsi"
    processor_class = WsiProcessor
    embedder_class = WsiEmbedder
    arrays = MappingProxyType(
        {
            "features": ArraySpec(torch.float32, rank=2, doc="tile features (N, F) of the frozen patch encoder"),
            "coords": ArraySpec(torch.long, rank=2, doc="level-0 x, y of each tile's top-left (N, 2)"),
            "positions": ArraySpec(torch.float32, rank=2, doc="tile centres in µm (N, 2)"),
            "slide_index": ArraySpec(torch.long, doc="which slide of the cell a tile is from (N,)"),
        }
    )
    cell_forms = ("path",)
    token_unit = "tile"

    def collate(self, name, column, sample_ids, pad_len):
        b = len(column)
        present = [a for a in column if a is not None]
        n = pad_len(max(len(a["features"]) for a in present))
        f = present[0]["features"].shape[1]
        out = {
            "features": torch.zeros((b, n, f), dtype=torch.float32),
            "coords": torch.zeros((b, n, 2), dtype=torch.long),
            "positions": torch.zeros((b, n, 2), dtype=torch.float32),
            "slide_index": torch.zeros((b, n), dtype=torch.long),
            "mask": torch.zeros((b, n), dtype=torch.bool),
        }
        for i, a in enumerate(column):
            if a is None:
                continue
            k = len(a["features"])
            if a["features"].shape[1] != f or any(len(a[key]) != k for key in ("coords", "positions", "slide_index")):
                raise DataError(
                    "wrong_shape",
                    f"tile arrays disagree: features {a['features'].shape}, coords {np.shape(a['coords'])}, "
                    f"other samples have {f}-d features",
                    sample_id=sample_ids[i],
                    modality=name,
                    fix="extract every slide with the same encoder and re-run the wsi processor",
                )
            for key in ("features", "coords", "positions", "slide_index"):
                out[key][i, :k] = torch.as_tensor(np.asarray(a[key]), dtype=self.arrays[key].dtype)
            out["mask"][i, :k] = True
        return out

    def check_cell(self, value, *, base_dir, check_files=True):
        if isinstance(value, (list, tuple, np.ndarray)) or (isinstance(value, str) and value.lstrip().startswith("[")):
            paths = cell_paths(value)
            if not paths:
                return [Problem("empty_list", "the list of slides is empty", "set the cell to null")]
            return [p for path in paths for p in self._check_path(path, base_dir, check_files)]
        return super().check_cell(value, base_dir=base_dir, check_files=check_files)

    def check_file(self, path: Path) -> list[Problem]:
        """Feature files: the datasets' shapes (no data read). Slides: the header opens with OpenSlide/tiffslide
        and the µm/px is known."""
        if path.name.lower().endswith(FEATURE_SUFFIXES):
            try:
                import h5py

                with h5py.File(path, "r") as f:
                    shapes = {k: f[k].shape for k in ("features", "coords") if k in f}
            except Exception as err:
                return [Problem("unreadable_feature_file", f"{path.name}: {describe_failure(err)}", "re-extract it")]
            if len(shapes) < 2:
                return [Problem("bad_feature_file", f"{path.name} lacks features/coords", "re-extract it")]
            return []
        from .reader import open_slide

        try:
            open_slide(path).close()
        except DataError as err:
            return [Problem(err.reason, err.message, err.fix)]
        return []

    def token_labels(self, attribution, modality):
        arrays = attribution.inputs[modality]
        coords = arrays["coords"].tolist()
        slides = arrays.get("slide_index")
        slides = slides.tolist() if slides is not None else [[0] * len(c) for c in coords]
        return [
            [f"tile (x={x}, y={y})" + (f" slide {s}" if max(srow) > 0 else "") for (x, y), s in zip(crow, srow)]
            for crow, srow in zip(coords, slides)
        ]

    def explanation_figures(self, attribution, sample, path, modality):
        from .figures import plot_wsi

        return plot_wsi(attribution, sample, path, modality)

    def describe(self, arrays):
        return "tiles", len(arrays["features"])
