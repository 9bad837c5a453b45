"""MIMIC-IV recipe on a generated ``labevents`` of N rows: rows/s and peak RSS against a whole-file pandas baseline.

What is measured, each in its own fresh subprocess (peak RSS = that process's ``ru_maxrss``, so the numbers do not
see each other's memory):

* ``recipe``: the whole recipe, ``python -m bioperceiver.data.recipes.mimic --anchor admission`` on a MIMIC-IV folder
  whose ``hosp/labevents.csv`` has ``--rows`` rows (the real 16-column header; ``tests/mimic_fixture.write_labevents``)
  and one admission per subject: tables streamed with ``pyarrow.csv.open_csv`` in ``--block_size_mb`` blocks,
  filtered, windowed and reduced block by block, then the manifest written and validated.
* ``recipe_labs``: the labs step of the recipe alone (``stream_aligned`` with the recipe's lab rule), the same
  anchors.
* ``pandas``: the plain way: ``pandas.read_csv(labevents)`` of the whole file (default parsing, then the two time
  columns converted), ``merge`` with the anchors on ``subject_id``, the same window rule and the same last-value
  reduction.

Peak RSS includes the imports every child pays alike (``bioperceiver`` imports torch); the RSS right after the
imports is recorded too, and ``peak_rss_above_imports_mb`` is what the data path itself added.

Rows/s = labevents rows / wall seconds of the step. The labs of ``recipe_labs`` and ``pandas`` are compared
(same (anchor, item) pairs and values), so the faster or smaller path is not a different computation.

Run (the numbers in benchmarks/RESULTS.md)::

    .venv/bin/python benchmarks/recipes.py                      # 10M rows, ~1.3 GB CSV under --work_dir
    .venv/bin/python benchmarks/recipes.py --rows 200000       # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the fixture writers live beside the tests

from mimic_fixture import LAB_ITEMS, write_csv, write_labevents  # noqa: E402

LAB_WINDOW_HOURS = 24.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def make_data(work: Path, rows: int, subjects: int, seed: int) -> Path:
    """A MIMIC-IV folder (``mimiciv/3.1/hosp``) with the generated labevents and one admission per subject."""
    hosp = work / "mimiciv" / "3.1" / "hosp"
    lab = hosp / "labevents.csv"
    stamp = work / f"done-{rows}-{subjects}-{seed}"
    if stamp.exists() and lab.exists():
        return hosp.parent
    if work.exists():
        shutil.rmtree(work)
    rng = np.random.default_rng(seed + 1)
    ids = 10_000_000 + np.arange(subjects)
    admit = pd.Timestamp("2180-01-02") + pd.to_timedelta(rng.integers(0, 720 * 24, subjects), unit="h")
    fmt = "%Y-%m-%d %H:%M:%S"
    write_csv(
        hosp / "patients.csv",
        ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"],
        [[s, "F" if s % 2 else "M", 60, 2180, "2014 - 2016", None] for s in ids],
        gz=False,
    )
    write_csv(
        hosp / "admissions.csv",
        ["subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type"],
        [
            [s, 20_000_000 + k, a.strftime(fmt), (a + pd.Timedelta(days=3)).strftime(fmt), None, "URGENT"]
            for k, (s, a) in enumerate(zip(ids, admit))
        ],
        gz=False,
    )
    write_csv(hosp / "d_labitems.csv", ["itemid", "label", "fluid", "category"], [list(x) for x in LAB_ITEMS], False)
    write_csv(
        hosp / "diagnoses_icd.csv",
        ["subject_id", "hadm_id", "seq_num", "icd_code", "icd_version"],
        [[s, 20_000_000 + k, 1, "I5023", 10] for k, s in enumerate(ids)],
        gz=False,
    )
    t0 = time.perf_counter()
    write_labevents(lab, rows, subjects, seed=seed)
    print(f"generated {rows:,} labevents rows ({lab.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s")
    stamp.touch()
    return hosp.parent


def anchors_of(mimic_dir: Path) -> pd.DataFrame:
    adm = pd.read_csv(mimic_dir / "hosp" / "admissions.csv", parse_dates=["admittime"])
    return pd.DataFrame(
        {"anchor_idx": np.arange(len(adm)), "subject_id": adm["subject_id"], "anchor_time": adm["admittime"]}
    )


def run_recipe(mimic_dir: Path, out: Path, block_mb: float) -> dict:
    from bioperceiver.data.recipes import mimic

    t0 = time.perf_counter()
    argv = ["--mimic_dir", str(mimic_dir), "--output_dir", str(out), "--anchor", "admission", "--overwrite_output_dir"]
    rc = mimic.main([*argv, "--block_size_mb", str(block_mb), "--log_level", "WARNING"])
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"recipe failed with exit status {rc}")
    df = pd.read_parquet(out / "manifest.parquet")
    n_labs = int(df["tabular_labs"].dropna().map(lambda s: len(json.loads(s))).sum()) if "tabular_labs" in df else 0
    return {"wall_s": wall, "manifest_rows": len(df), "lab_values": n_labs}


def run_recipe_labs(mimic_dir: Path, block_mb: float) -> tuple[dict, pd.DataFrame]:
    from bioperceiver.data.recipes import mimic

    anchors = anchors_of(mimic_dir)
    t0 = time.perf_counter()
    spec = mimic.TABLES["labevents"]
    report = mimic.RecipeReport("bench")
    labs = mimic.stream_aligned(
        mimic_dir / "hosp" / "labevents.csv",
        spec,
        list(spec.columns),
        anchors,
        pick=mimic.pick_labs(pd.Timedelta(hours=LAB_WINDOW_HOURS), allow_after=False),
        keys=("anchor_idx", "itemid"),
        rank="rank",
        block_size=int(block_mb * 2**20),
        report=report,
        desc="labevents",
    )
    return {"wall_s": time.perf_counter() - t0, "lab_values": len(labs)}, labs


def run_pandas(mimic_dir: Path) -> tuple[dict, pd.DataFrame]:
    from bioperceiver.data.recipes import mimic

    anchors = anchors_of(mimic_dir)
    t0 = time.perf_counter()
    lab = pd.read_csv(mimic_dir / "hosp" / "labevents.csv")
    for c in ("charttime", "storetime"):
        lab[c] = pd.to_datetime(lab[c])
    joined = lab.merge(anchors, on="subject_id")
    picked = mimic.pick_labs(pd.Timedelta(hours=LAB_WINDOW_HOURS), allow_after=False)(joined)
    keys = ["anchor_idx", "itemid"]
    labs = picked.sort_values([*keys, "rank"], kind="stable").drop_duplicates(keys, keep="last")
    return {"wall_s": time.perf_counter() - t0, "lab_values": len(labs)}, labs


def child(args) -> None:
    from bioperceiver.data.recipes import mimic  # noqa: F401 - every child pays the same imports (torch included)

    mimic_dir = Path(args.mimic_dir)
    after_imports = current_rss_mb()
    if args.child == "recipe":
        res = run_recipe(mimic_dir, Path(args.work_dir) / "out", args.block_size_mb)
    else:
        res, labs = (
            run_recipe_labs(mimic_dir, args.block_size_mb) if args.child == "recipe_labs" else run_pandas(mimic_dir)
        )
        cols = ["anchor_idx", "itemid", "valuenum"]
        labs[cols].sort_values(cols[:2]).to_parquet(Path(args.work_dir) / f"labs_{args.child}.parquet", index=False)
    res["peak_rss_mb"] = peak_rss_mb()
    res["rss_after_imports_mb"] = after_imports
    res["peak_rss_above_imports_mb"] = res["peak_rss_mb"] - after_imports
    print("RESULT " + json.dumps(res))


def measure(kind: str, args, mimic_dir: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--mimic_dir", str(mimic_dir), "--work_dir", str(args.work_dir)]
    cmd += ["--block_size_mb", str(args.block_size_mb)]
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        raise SystemExit(f"{kind} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    res = json.loads(line[-1][len("RESULT ") :])
    res["rows_per_s"] = args.rows / res["wall_s"]
    print(
        f"{kind:12s} {res['wall_s']:8.1f} s  {res['rows_per_s'] / 1e6:6.2f} M rows/s  peak RSS "
        f"{res['peak_rss_mb']:7.0f} MB ({res['peak_rss_above_imports_mb']:7.0f} MB above the imports)"
    )
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--subjects", type=int, default=20_000)
    p.add_argument("--block_size_mb", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work_dir", default="/tmp/bioperceiver_bench_recipes")
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "recipes.json"))
    p.add_argument("--keep_data", action="store_true", help="keep the generated folder (reused by the next run)")
    p.add_argument("--child", choices=("recipe", "recipe_labs", "pandas"), help=argparse.SUPPRESS)
    p.add_argument("--mimic_dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    work = Path(args.work_dir)
    mimic_dir = make_data(work, args.rows, args.subjects, args.seed)
    size_gb = (mimic_dir / "hosp" / "labevents.csv").stat().st_size / 1e9
    results = {k: measure(k, args, mimic_dir) for k in ("recipe", "recipe_labs", "pandas")}
    a = pd.read_parquet(work / "labs_recipe_labs.parquet")
    b = pd.read_parquet(work / "labs_pandas.parquet")
    same = len(a) == len(b) and bool(np.allclose(a.to_numpy(float), b.to_numpy(float), equal_nan=True))
    if not same:
        raise SystemExit(f"the streamed labs differ from the pandas labs ({len(a)} vs {len(b)} rows)")
    ratio = results["pandas"]["peak_rss_mb"] / results["recipe"]["peak_rss_mb"]
    ratio_labs = results["pandas"]["peak_rss_mb"] / results["recipe_labs"]["peak_rss_mb"]
    above = "peak_rss_above_imports_mb"
    ratio_above = results["pandas"][above] / max(results["recipe"][above], 1.0)
    print(
        f"labs identical: {same}; peak RSS pandas / recipe = {ratio:.1f}x (labs step alone: {ratio_labs:.1f}x; "
        f"above the imports: {ratio_above:.1f}x)"
    )
    summary = {
        "rows": args.rows,
        "subjects_and_anchors": args.subjects,
        "labevents_csv_gb": round(size_gb, 3),
        "block_size_mb": args.block_size_mb,
        "results": results,
        "labs_identical": same,
        "peak_rss_ratio_pandas_over_recipe": ratio,
        "peak_rss_ratio_pandas_over_recipe_labs": ratio_labs,
        "peak_rss_above_imports_ratio_pandas_over_recipe": ratio_above,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.output}")
    if not args.keep_data:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
