#!/usr/bin/env python
"""Throughput and peak memory of the PTB-XL recipe on a generated PTB-XL 1.0.3-layout folder.

    python benchmarks/recipe_ptbxl.py --records 2000 --sampling_rate 100 --output benchmarks/results/recipe_ptbxl.json

Writes ``--records`` synthetic 10 s, 12-lead WFDB records (tests/recipe_fixtures.py, ``wfdb.wrsamp``) plus the two
tables into a temporary folder, then runs ``python -m bioperceiver.data.recipes.ptbxl`` on it in a child process and
reports its wall time, ECGs/s (conversion + validation of the written manifest included; ``build`` excludes the
interpreter start and imports) and the peak RSS of the recipe's main process (workers not included).
The real PTB-XL has 21,799 ECGs: multiply the time accordingly (the recipe is linear in records).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fixtures():
    spec = importlib.util.spec_from_file_location("recipe_fixtures", ROOT / "tests" / "recipe_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["recipe_fixtures"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--sampling_rate", type=int, choices=(100, 500), default=100)
    parser.add_argument("--num_workers", type=int, nargs="+", default=[1], help="one recipe run per value")
    parser.add_argument("--output", default=None, help="JSON file for the figures")
    args = parser.parse_args()
    fx = _fixtures()
    codes = [{"NORM": 100.0, "SR": 0.0}, {"IMI": 50.0, "NDT": 100.0}, {"LVH": 100.0}, {"LAFB": 100.0}]
    records = [
        fx.PtbxlRecord(i + 1, 10000.0 + i // 2, 1 + (i // 2) % 10, codes[i % 4], fx.REPORTS[i % 5], age=30 + i % 60)
        for i in range(args.records)
    ]
    original = fx.ecg_signal
    fx.ecg_signal = lambda ecg_id, rate: original(ecg_id, rate, seconds=10.0)  # the real records are 10 s
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        fx.write_ptbxl(Path(tmp) / "in", records, rates=(args.sampling_rate,))
        write_s = time.perf_counter() - t0
        runs = []
        for workers in args.num_workers:
            out = f"{tmp}/out{workers}"
            cmd = [sys.executable, "-m", "bioperceiver.data.recipes.ptbxl", "--ptbxl_dir", f"{tmp}/in", "--output_dir",
                   out, "--sampling_rate", str(args.sampling_rate), "--log_level", "WARNING",
                   "--num_workers", str(workers)]  # fmt: skip
            t0 = time.perf_counter()
            child = subprocess.Popen(cmd, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
            _, status, usage = os.wait4(child.pid, 0)
            wall = time.perf_counter() - t0
            if status != 0:
                raise SystemExit(f"the recipe failed (status {status}): {' '.join(cmd)}")
            meta = json.loads((Path(out) / "manifest.parquet.meta.json").read_text())
            runs.append(
                {
                    "num_workers": workers,
                    "kept": meta["rows"],
                    "recipe_wall_s": round(wall, 2),
                    "recipe_build_s": meta["build_seconds"],
                    "ecgs_per_s_wall": round(args.records / wall, 1),
                    "ecgs_per_s_build": round(args.records / meta["build_seconds"], 1),
                    "peak_rss_mib_main_process": round(usage.ru_maxrss / 1024, 1),
                }
            )
    result = {
        "records": args.records,
        "sampling_rate": args.sampling_rate,
        "fixture_write_s": round(write_s, 2),
        "runs": runs,
    }
    print(json.dumps(result, indent=1))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
