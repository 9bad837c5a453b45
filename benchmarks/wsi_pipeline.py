"""Whole-slide pipeline throughput and the backbone at slide-sized token counts.

Part 1, on a real-format fixture slide (a JPEG-tiled pyramidal TIFF written with tifffile: 12288 x 8192 px at
0.25 µm/px, levels 1/4/16, tissue = scikit-image's stained section tiled over a known box, glass elsewhere), at
``--target_mpp 0.5 --tile_size 224`` (448 level-0 px per tile, read at level 0 and resized):

* ``prepare``: open + thumbnail + tissue mask + tile grid (tiles/s = kept tiles / seconds);
* ``read_loader``: every tile through ``TileDataset`` + a ``DataLoader`` with 0, 1, 2 worker processes;
* ``read_loop``: the plain loop peers write: ``openslide.OpenSlide.read_region`` per tile, RGBA -> RGB, resize;
* ``encode``: read + frozen ``timm`` encoder (``--encoder``, random weights) on the first ``--encode_tiles`` tiles,
  with 0, 1, 2 workers.

Part 2: forward time and peak memory of the Perceiver encoder (``--preset``) on ``(1, N, d_input)`` tokens at
``--tokens`` (default 10k/50k/100k slide tokens), against ``transformers.PerceiverModel`` at the same dims
(``benchmarks/backbone.py``'s builders), inference (``torch.no_grad``), fp32.

Every point runs in a fresh subprocess; peak memory is the rise of that process's resident set (VmHWM reset first),
so for ``read_loader``/``encode`` with workers it is the main process only. Run::

    .venv/bin/python benchmarks/wsi_pipeline.py                       # -> benchmarks/results/wsi_pipeline.json
    .venv/bin/python benchmarks/wsi_pipeline.py --part backbone --tokens 10000 50000
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger("benchmarks.wsi_pipeline")
HERE = Path(__file__).resolve().parent
SIZE = (12288, 8192)
BOX = (512, 512, 11776, 7680)


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def make_fixture(path: Path) -> Path:
    """The benchmark slide (see the module docstring); written once, reused."""
    if path.exists():
        return path
    from PIL import Image

    fixtures = _load("wsi_fixtures", HERE.parent / "tests" / "wsi_fixtures.py")
    section = np.asarray(Image.fromarray(fixtures.tissue_pixels()).resize((1024, 1024), Image.Resampling.BICUBIC))
    w, h = SIZE
    image = np.full((h, w, 3), fixtures.GLASS, np.uint8)
    x0, y0, x1, y1 = BOX
    reps = (-(-(y1 - y0) // 1024), -(-(x1 - x0) // 1024), 1)
    image[y0:y1, x0:x1] = np.tile(section, reps)[: y1 - y0, : x1 - x0]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.tif")
    fixtures.write_pyramid(tmp, image, compression="jpeg")
    tmp.rename(path)
    return path


# ---- measurements (each in its own process) ------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak() -> int:
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def _peak(base: int) -> int:
    return _status_kib("VmHWM") * 1024 - base


def _grid(slide: Path, target_mpp: float, tile_size: int):
    from bioperceiver.modalities.wsi.reader import open_slide
    from bioperceiver.modalities.wsi.tiling import patch_size_level0, tile_grid
    from bioperceiver.modalities.wsi.tissue import detect_tissue

    with open_slide(slide) as reader:
        thumb, down = reader.thumbnail(8.0 / reader.mpp)
        mask = detect_tissue(thumb)
        patch = patch_size_level0(tile_size, target_mpp, reader.mpp)
        coords, _ = tile_grid(reader.dimensions, patch, mask, down)
    return coords, patch


def run_point(point: dict) -> dict:
    import torch

    torch.set_num_threads(point.get("threads", torch.get_num_threads()))
    what = point["what"]
    if what == "backbone":
        return _backbone_point(point)
    slide = Path(point["slide"])
    import bioperceiver.modalities.wsi.extract  # noqa: F401 - imports are not part of any measurement

    _grid(slide, point["target_mpp"], point["tile_size"])  # warm-up: file cache, lazy imports
    base = _reset_peak()
    start = time.perf_counter()
    coords, patch = _grid(slide, point["target_mpp"], point["tile_size"])
    prepare_s = time.perf_counter() - start
    if what == "prepare":
        return {
            **point,
            "tiles": len(coords),
            "seconds": prepare_s,
            "tiles_per_s": len(coords) / prepare_s,
            "peak_bytes": _peak(base),
        }
    from bioperceiver.modalities.wsi.features import TileDataset, encode_tiles, load_encoder

    if what == "read_loop":
        import openslide
        from PIL import Image

        base = _reset_peak()
        start = time.perf_counter()
        s = openslide.OpenSlide(str(slide))
        for x, y in coords:
            tile = s.read_region((int(x), int(y)), 0, (patch, patch)).convert("RGB")
            np.asarray(tile.resize((point["tile_size"],) * 2, Image.Resampling.BILINEAR))
        seconds = time.perf_counter() - start
        return {
            **point,
            "tiles": len(coords),
            "seconds": seconds,
            "tiles_per_s": len(coords) / seconds,
            "peak_bytes": _peak(base),
        }
    from torch.utils.data import DataLoader

    if what == "read_loader":
        ds = TileDataset(slide, coords, patch, point["tile_size"], mpp=None)
        base = _reset_peak()
        start = time.perf_counter()
        n = sum(len(b) for b in DataLoader(ds, batch_size=64, num_workers=point["workers"]))
        seconds = time.perf_counter() - start
        return {**point, "tiles": n, "seconds": seconds, "tiles_per_s": n / seconds, "peak_bytes": _peak(base)}
    if what == "encode":
        coords = coords[: point["encode_tiles"]]
        encoder = load_encoder(point["encoder"], "none")
        ds = TileDataset(slide, coords, patch, point["tile_size"], mpp=None)
        encode_tiles(
            TileDataset(slide, coords[:8], patch, point["tile_size"], mpp=None), encoder, batch_size=8, progress=False
        )  # warm-up
        base = _reset_peak()
        start = time.perf_counter()
        feats = encode_tiles(ds, encoder, batch_size=32, num_workers=point["workers"], progress=False)
        seconds = time.perf_counter() - start
        return {
            **point,
            "tiles": len(feats),
            "dim": int(feats.shape[1]),
            "seconds": seconds,
            "tiles_per_s": len(feats) / seconds,
            "peak_bytes": _peak(base),
        }
    raise ValueError(what)


def _backbone_point(point: dict) -> dict:
    import torch

    backbone = _load("benchmarks_backbone", HERE / "backbone.py")
    backbone.set_arch(point["preset"])
    torch.manual_seed(0)
    model = backbone.build(point["impl"]).eval()
    tokens, keep = backbone.inputs(point["tokens"], 1, "cpu")
    keep[:] = True
    base = _reset_peak()
    times = []
    with torch.no_grad():
        for _ in range(point["iters"]):
            start = time.perf_counter()
            backbone.forward(point["impl"], model, tokens, keep)
            times.append(time.perf_counter() - start)
    return {
        **point,
        **{k: backbone.ARCH[k] for k in ("num_latents", "d_latents", "d_input")},
        "forward_s": statistics.median(times[1:] if len(times) > 1 else times),
        "peak_bytes": _peak(base),
    }


def measure(point: dict, results: dict | None = None, output: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(point)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        logger.warning("point %s failed: %s", point, out.stderr[-800:])
        return {**point, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    logger.info("%s", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items() if k != "slide"})
    if results is not None and output is not None:  # written after every point: a killed run keeps what it measured
        results["backbone" if point["what"] == "backbone" else "pipeline"].append(result)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=1) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["all", "pipeline", "backbone"], default="all")
    parser.add_argument("--slide", type=Path, default=Path("/tmp/bioperceiver_bench/wsi_fixture_12288x8192.tif"))
    parser.add_argument("--target_mpp", type=float, default=0.5)
    parser.add_argument("--tile_size", type=int, default=224)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--encode_tiles", type=int, default=128)
    parser.add_argument("--preset", default="bioperceiver_base")
    parser.add_argument("--tokens", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "wsi_pipeline.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_point(json.loads(args.worker))))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results = {"pipeline": [], "backbone": []}
    if args.part in ("all", "pipeline"):
        slide = str(make_fixture(args.slide))
        common = {"slide": slide, "target_mpp": args.target_mpp, "tile_size": args.tile_size}
        measure({**common, "what": "prepare"}, results, args.output)
        measure({**common, "what": "read_loop"}, results, args.output)
        for w in args.workers:
            measure({**common, "what": "read_loader", "workers": w}, results, args.output)
        for w in args.workers:
            point = {**common, "what": "encode", "workers": w, "encoder": args.encoder}
            measure({**point, "encode_tiles": args.encode_tiles}, results, args.output)
    if args.part in ("all", "backbone"):
        for n in args.tokens:
            for impl in ("bioperceiver", "hf_perceiver"):
                point = {"what": "backbone", "impl": impl, "tokens": n, "preset": args.preset, "iters": args.iters}
                measure(point, results, args.output)
    import platform

    import torch

    results["machine"] = {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    logger.info("wrote %s", args.output)


if __name__ == "__main__":
    main()
