"""Federated vs centralised vs single-site survival finetuning on the demo cohort's SurvSet sources.

Sites are the demo cohort's two SurvSet sources (``meta_source``: ``survset_gse1992``, ``survset_gse4335``; two
breast-cancer microarray cohorts on different platforms: non-IID by construction), task = survival (Cox head) from
``omics_expression`` + ``tabular_clinical``, random initialisation (``bioperceiver_debug``). Every variant is tested
on the same patients: the library's patient-hash test split of both sources.

* ``federated``: FedAvg over the two sites, ``--rounds`` rounds of one local epoch each;
* ``fedprox``: the same with FedProx (mu = 0.01);
* ``centralised``: one site holding both sources' training rows, one round of ``--rounds`` local epochs (a
  single site's round is centralised training: tests/test_federated.py checks it exactly);
* ``single_<source>``: trained on one source only (the other source's training rows are set aside), same
  epochs as centralised.

Processors are fitted from the training sites' statistics in every variant (a single site's fit is its own).
Test C-index with 95% patient-bootstrap CIs over both sources' test patients, and per source.

    .venv/bin/python benchmarks/federated.py --output_dir outputs/bench_federated [--rounds 15] [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from bioperceiver.data.manifest import read_manifest, write_manifest
from bioperceiver.data.splits import assign_splits
from bioperceiver.federated.runs import FederatedArguments, run_federated_finetuning
from bioperceiver.training.arguments import DataArguments, ModelArguments

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["survset_gse1992", "survset_gse4335"]


def variant_manifests(cohort: Path) -> dict[str, Path]:
    """One manifest per variant (SurvSet rows only, hashed patient splits, a ``meta_site`` column), written beside
    the cohort's manifest (its expression files are referenced relative to it)."""
    m = assign_splits(read_manifest(cohort))
    table = m.table[m.table["meta_source"].isin(SOURCES)].reset_index(drop=True)
    keep = [c for c in table.columns if not c.startswith(("text_", "image_", "signal_", "tabular_study"))]
    table = table[keep]
    paths = {}

    def write(name, t):
        p = cohort.parent / f"bench_federated_{name}.parquet"
        write_manifest(t, p, {k: v for k, v in m.metadata.items() if k != "modalities"})
        paths[name] = p

    fed = table.copy()
    fed["meta_site"] = fed["meta_source"]
    write("federated", fed)
    pooled = table.copy()
    pooled["meta_site"] = "pooled"
    write("centralised", pooled)
    for src in SOURCES:
        single = pooled.copy()
        other = (single["meta_source"] != src) & (single["split"] != "test")
        single.loc[other, "split"] = "unused"  # not trained or validated on; its test patients stay
        write(f"single_{src}", single)
    return paths


def run_variant(name: str, manifest: Path, out: Path, args) -> dict:
    rounds, epochs = (args.rounds, 1) if name in ("federated", "fedprox") else (1, args.rounds)
    fed = FederatedArguments(
        output_dir=str(out / name),
        site_column="meta_site",
        strategy="fedprox" if name == "fedprox" else "fedavg",
        proximal_mu=0.01 if name == "fedprox" else 0.0,
        rounds=rounds,
        local_epochs=epochs,
        batch_size=32,
        learning_rate=3e-4,
        weight_decay=0.01,
        seed=args.seed,
    )
    model_args = ModelArguments(preset="bioperceiver_debug", finetuning_mode="full", survival_loss="cox")
    data_args = DataArguments(
        manifest=str(manifest),
        task="survival",
        modalities=["omics_expression", "tabular_clinical"],
        processor_settings=str(REPO / "tokenizers" / "demo_processors.yaml"),
        n_bootstrap=args.n_bootstrap,
        overwrite_output_dir=True,
    )
    t0 = time.perf_counter()
    res = run_federated_finetuning(fed, model_args, data_args)
    res["seconds"] = time.perf_counter() - t0
    return res


def _ci(r: dict | None, key: str = "c_index") -> str:
    if not r:
        return "n/a"
    return f"{r[key]:.3f} [{r[key + '_ci_low']:.3f}, {r[key + '_ci_high']:.3f}]"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cohort", default=str(REPO / "outputs" / "demo" / "cohort" / "manifest.parquet"))
    p.add_argument("--output_dir", default=str(REPO / "outputs" / "bench_federated"))
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--n_bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="*", default=None, help="subset of the variants")
    p.add_argument("--quick", action="store_true", help="2 rounds, 100 resamples (smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.n_bootstrap = 2, 100
    logging.basicConfig(level=logging.WARNING)
    cohort = Path(args.cohort)
    if not cohort.exists():
        from bioperceiver.data.recipes.demo import build_demo_cohort

        cohort = build_demo_cohort(cohort.parent, seed=0)
    out = Path(args.output_dir)
    paths = variant_manifests(cohort)
    order = ["federated", "fedprox", "centralised", *(f"single_{s}" for s in SOURCES)]
    results = {}
    for name in args.variants or order:
        manifest = paths["federated" if name == "fedprox" else name]
        results[name] = run_variant(name, manifest, out, args)
        r = results[name]
        print(
            f"{name:26s} test C-index (both sources) {_ci(r['test_pooled'])}  "
            f"per source: {', '.join(f'{k}: {_ci(v)}' for k, v in r['test_per_site'].items())}  "
            f"({r['seconds']:.0f} s)",
            flush=True,
        )
        summary = {
            name: {
                "test_c_index_all": r["test_pooled"],
                "test_per_site": r["test_per_site"],
                "sites": r["sites"],
                "seconds": r["seconds"],
            }
            for name, r in results.items()
        }
        # written after every variant: an interrupted run keeps what it measured
        text = json.dumps({"args": vars(args), "results": summary}, indent=1, default=str)
        (out / "federated_benchmark.json").write_text(text)
    return summary


if __name__ == "__main__":
    main()
