#!/usr/bin/env python
"""Which gene embeddings did pretraining train, and how many of each cohort's tokens use them?

A vocabulary row of a pretrained omics embedder only moves from its random initialisation if its gene was a token of
some training batch. With ``top_k`` tokens per profile (the highest values), a gene no training profile ranks that
high never gets a gradient. This reads it from the run's last checkpoint: AdamW's second-moment estimate of such a
row is still exactly 0 (the gene embeddings have no weight decay, so an untrained row is also bit-identical to its
initialisation). For each cohort of a manifest (``meta_source``, prefixed with the manifest's folder name when
several manifests are given; the processors extended on the cohort's rows where it brings genes or sources they do
not know, as finetuning does; label-free) it reports the share of the cohort's measured genes in the vocabulary and
trained, and per profile the share of the tokens the processor emits that are in the vocabulary and trained.

    python benchmarks/gene_embedding_coverage.py --runs $W/survset/pretrain_cvfolds/fold0 \\
        --manifest $W/survset/external_cohort_genemap/manifest.parquet $W/survset/dev_cohort/manifest.parquet \\
        --output_dir $W/survset/gene_embedding_coverage

Outputs (``--output_dir``): ``coverage.json``, ``coverage.md`` and ``coverage.png`` (per cohort, the share of each
profile's tokens with trained embeddings).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("gene_embedding_coverage")


def last_checkpoint(run: Path) -> Path:
    ckpts = sorted(
        (p for p in (run / "checkpoints").glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    if not ckpts:
        raise FileNotFoundError(
            f"{run}/checkpoints has no checkpoint-N folder: give a pretraining output_dir (its optimizer state says "
            "which embeddings were trained)"
        )
    return ckpts[-1]


def trained_rows(run: Path, modality: str, prefer_saved: bool = True) -> tuple[np.ndarray, dict]:
    """Per vocabulary row of ``modality``'s gene embeddings: did it ever get a gradient? Read from the run's own
    record (``final/trained_vocabulary_rows.safetensors``, written by pretraining since the eighteenth session) when
    it has one and ``prefer_saved``; otherwise from AdamW's ``exp_avg_sq`` of the row in the last checkpoint (not all
    0), the optimizer's parameter order rebuilt as the pretraining loop builds it (``parameter_groups`` over the
    pretrainer: the model's parameters, then the loss's) and checked against the group sizes the checkpoint
    records."""
    import torch
    import transformers
    from safetensors import safe_open

    import bioperceiver  # noqa: F401 (registers the Auto classes)
    from bioperceiver.training.pretraining import TRAINED_ROWS_FILE, is_decayed, load_trained_rows, rows_with_gradient

    saved_masks = load_trained_rows(run / "final") if prefer_saved else None
    if saved_masks and (mask := saved_masks.get(f"{modality}.gene_embeddings")) is not None:
        where = str(run / "final" / TRAINED_ROWS_FILE)
        return mask, {"checkpoint": where, "vocabulary": len(mask), "trained": int(mask.sum())}
    ckpt = last_checkpoint(run)
    target = f"model.embedders.{modality}.gene_embeddings.weight"
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        dims = {k: len(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open)
    keys = list(dims)
    if target not in keys:
        raise KeyError(f"{ckpt}/model.safetensors has no {target}: is {modality!r} an omics modality of this run?")
    config = transformers.AutoConfig.from_pretrained(run / "final")
    with torch.device("meta"):
        model = transformers.AutoModel.from_config(config)
    params = [(f"model.{n}", p.dim()) for n, p in model.named_parameters()]
    if {n for n, _ in params} != {k for k in keys if k.startswith("model.")}:
        raise ValueError(f"{ckpt}: the checkpoint's 'model.' parameters are not the final model's")
    # the pretrainer registers the model first: its parameters lead both groups; the projection head's and the
    # loss's follow
    others = [k for k in keys if not k.startswith("model.")]
    decay = [n for n, d in params if is_decayed(n, d)]
    no_decay = [n for n, d in params if not is_decayed(n, d)]
    others_decay = sum(is_decayed(k, dims[k]) for k in others)
    optim = ckpt / "optimizer.bin"
    if not optim.is_file():
        raise FileNotFoundError(f"{optim} not found (a DeepSpeed run keeps its optimizer state elsewhere)")
    saved = torch.load(optim, map_location="cpu", weights_only=True)
    sizes = [len(g["params"]) for g in saved["param_groups"]]
    if sizes != [len(decay) + others_decay, len(no_decay) + len(others) - others_decay]:
        raise ValueError(
            f"{ckpt}: optimizer groups of {sizes} parameters, the model gives {[len(decay), len(no_decay)]} plus "
            f"{len(others)} of the projection head and loss (frozen modules?): cannot tell which state is the gene "
            "embeddings'"
        )
    index = saved["param_groups"][1]["params"][no_decay.index(target)]
    shape = tuple(dict(model.named_parameters())[target.removeprefix("model.")].shape)
    state = saved["state"].get(index)
    if state is None:  # never a gradient at all
        return np.zeros(shape[0], dtype=bool), {"checkpoint": str(ckpt), "vocabulary": shape[0], "trained": 0}
    if tuple(state["exp_avg_sq"].shape) != shape:
        raise ValueError(f"{ckpt}: optimizer state {index} has shape {tuple(state['exp_avg_sq'].shape)}, not {shape}")
    trained = rows_with_gradient(state["exp_avg_sq"]).numpy()
    return trained, {"checkpoint": str(ckpt), "vocabulary": shape[0], "trained": int(trained.sum())}


def omics_modality(processor, name: str | None) -> str:
    kinds = {m: p.kind for m, p in processor.processors.items()}
    omics = [m for m, k in kinds.items() if k == "omics"]
    if name is not None:
        if kinds.get(name) != "omics":
            raise ValueError(f"--modality {name!r} is not an omics modality of this run ({kinds})")
        return name
    if len(omics) != 1:
        raise ValueError(f"the run has {len(omics)} omics modalities {omics}: name one with --modality")
    return omics[0]


def cohort_coverage(proc, modality: str, rows: pd.DataFrame, base_dir: Path, trained: np.ndarray) -> dict:
    """The coverage of one cohort's rows (those with a ``modality`` value) under a copy of ``proc``'s omics
    processor, extended on these rows if they bring genes or sources it does not know."""
    from bioperceiver.modalities.omics.processor import trained_token_share

    omics = copy.deepcopy(proc.processors[modality])
    rows = rows[rows[modality].notna()]
    values, ids = rows[modality].tolist(), rows["sample_id"].astype(str).tolist()
    ext = omics.extend(values, sample_ids=ids, base_dir=base_dir)
    size = len(trained)
    in_vocab, used_trained, tokens, measured, token_sets = [], [], [], set(), []
    for value, sid in zip(values, ids, strict=True):
        genes, _, _ = omics._parse(value, base_dir)
        measured.update(genes)
        gid = np.asarray(omics(value, sample_id=sid, base_dir=base_dir)["gene_ids"])
        token_sets.append(gid)
        known = gid < size
        tokens.append(len(gid))
        in_vocab.append(float(known.mean()) if len(gid) else np.nan)
        share = trained_token_share(gid, trained)
        used_trained.append(np.nan if share is None else share)
    index = {g: i for i, g in enumerate(proc.processors[modality].state["genes"])}
    genes_known = [index[g] for g in (omics._norm_name(g) for g in measured) if g in index]
    return {
        "profiles": len(values),
        "genes_measured": len(measured),
        "genes_in_vocabulary": len(genes_known),
        "genes_trained": int(trained[genes_known].sum()) if genes_known else 0,
        "tokens_per_profile": float(np.mean(tokens)),
        "genes_used_as_tokens": len(np.unique(np.concatenate(token_sets))) if token_sets else 0,
        "token_overlap_between_profiles": token_overlap(token_sets),
        "token_share_in_vocabulary": float(np.nanmean(in_vocab)),
        "token_share_trained": float(np.nanmean(used_trained)),
        "token_share_trained_per_profile": used_trained,
        "extension": {"added": int(ext["added"]), "overlap": int(ext["overlap"]), "new_sources": ext["new_sources"]},
    }


def token_overlap(token_sets: list[np.ndarray], block: int = 1024) -> float:
    """Mean Jaccard overlap of the gene-token sets of two different profiles of a cohort (1: every profile reads
    the same genes, as a fixed panel; near 0: each reads its own), over all pairs; ``block`` rows at a time, so a
    large cohort never holds the full pairwise matrix."""
    from scipy import sparse

    n = len(token_sets)
    if n < 2:
        return float("nan")
    cols = np.concatenate(token_sets)
    rows = np.repeat(np.arange(n), [len(t) for t in token_sets])
    a = sparse.csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(n, int(cols.max(initial=0)) + 1))
    sizes = np.asarray(a.sum(axis=1)).ravel()
    total = 0.0
    for start in range(0, n, block):
        inter = (a[start : start + block] @ a.T).toarray()
        union = sizes[start : start + block, None] + sizes[None, :] - inter
        jac = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        idx = np.arange(start, min(start + block, n))
        jac[idx - start, idx] = 0.0  # a profile with itself is not a pair
        total += jac.sum()
    return float(total / (n * (n - 1)))


def identity_lengths(run: Path, modality: str, proc, trained: np.ndarray) -> dict:
    """How long each part of a gene's identity is after pretraining (mean Euclidean length over genes): its embedding
    row, for trained and untrained rows apart, and with gene features (``gene_feature_dim``) the shared map's
    ``W @ features`` over the genes that have features, and how the parts combine (``gene_feature_mode``). A part
    that pretraining left near its initialisation stays at about the length it started with."""
    from safetensors import safe_open

    prefix = f"embedders.{modality}."
    with safe_open(str(run / "final" / "model.safetensors"), framework="numpy") as f:
        names = set(f.keys())  # safetensors' handle lists its tensors only through keys()
        rows = f.get_tensor(prefix + "gene_embeddings.weight")
        key = prefix + "gene_feature_proj.weight"
        proj = f.get_tensor(key) if key in names else None
    norms = np.linalg.norm(rows, axis=1)
    mask = np.zeros(len(rows), dtype=bool)
    mask[: len(trained)] = trained[: len(rows)]
    out = {
        "row_trained": float(norms[mask].mean()) if mask.any() else None,
        "row_untrained": float(norms[~mask].mean()) if (~mask).any() else None,
    }
    feats = getattr(proc.processors[modality], "_gene_features", None)
    if proj is not None and feats is not None:
        has = np.abs(feats).sum(axis=1) > 0
        mapped = np.linalg.norm(feats[has] @ proj.T, axis=1)
        config = json.loads((run / "final" / "config.json").read_text())["modalities"][modality]
        out |= {
            "features_map": float(mapped.mean()),
            "genes_with_features": int(has.sum()),
            "mode": config.get("gene_feature_mode", "add"),
            "map_entry_sd": float(proj.std()),
        }
    return out


def run_coverage(run: Path, manifests: list, modality: str | None) -> dict:
    """One run's coverage of the cohorts of ``manifests`` (loaded once for every run)."""
    from bioperceiver.data import BioPerceiverProcessor

    proc = BioPerceiverProcessor.from_pretrained(run / "final")
    modality = omics_modality(proc, modality)
    trained, info = trained_rows(run, modality)
    out = {**info, "modality": modality, "vocabulary_share_trained": float(trained.mean()), "cohorts": {}}
    out["identity_lengths"] = identity_lengths(run, modality, proc, trained)
    for manifest in manifests:
        label = Path(manifest.path).parent.name if len(manifests) > 1 else ""
        table = manifest.table
        if modality not in table:
            raise ValueError(f"{manifest.path} has no {modality!r} column")
        groups = table.groupby("meta_source", sort=False) if "meta_source" in table else [("all", table)]
        for name, rows in groups:
            rec = cohort_coverage(proc, modality, rows, manifest.base_dir, trained)
            if "meta_cohort_role" in rows:
                rec["role"] = str(rows["meta_cohort_role"].iloc[0])
            out["cohorts"][f"{label}:{name}" if label else str(name)] = rec
            logger.info(
                "%s | %s: %d profiles, %.0f tokens each, %.2f of them in the vocabulary, %.2f trained",
                run.name,
                name,
                rec["profiles"],
                rec["tokens_per_profile"],
                rec["token_share_in_vocabulary"],
                rec["token_share_trained"],
            )
    return out


def report(result: dict) -> str:
    from bioperceiver.cards import markdown_table

    lines = []
    for run, r in result["runs"].items():
        lines.append(
            f"### {run}: {r['trained']} of {r['vocabulary']} gene embeddings trained "
            f"({r['vocabulary_share_trained']:.3f}); `{r['checkpoint']}`\n"
        )
        if lengths := r.get("identity_lengths"):
            text = ", ".join(
                f"{what} {lengths[key]:.3f}"
                for key, what in (
                    ("row_trained", "trained rows"),
                    ("row_untrained", "untrained rows"),
                    ("features_map", "W @ features"),
                )
                if lengths.get(key) is not None
            )
            mode = f" (gene_feature_mode {lengths['mode']})" if "mode" in lengths else ""
            lines.append(f"Mean length of a gene's identity parts: {text}{mode}.\n")
        rows = [
            {
                "cohort": c,
                "role": v.get("role", ""),
                "profiles": v["profiles"],
                "genes measured": v["genes_measured"],
                "in vocabulary": v["genes_in_vocabulary"],
                "trained": v["genes_trained"],
                "tokens per profile": f"{v['tokens_per_profile']:.0f}",
                "genes used as tokens": v.get("genes_used_as_tokens", ""),
                "token overlap between profiles": f"{v['token_overlap_between_profiles']:.2f}"
                if "token_overlap_between_profiles" in v
                else "",
                "tokens in vocabulary": f"{v['token_share_in_vocabulary']:.2f}",
                "tokens trained": f"{v['token_share_trained']:.2f}",
                "added by the extension": v["extension"]["added"],
            }
            for c, v in r["cohorts"].items()
        ]
        lines += [markdown_table(rows), ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(result["runs"].items())
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 3.6 * len(runs)), squeeze=False)
    for ax, (run, r) in zip(axes[:, 0], runs, strict=True):
        names = list(r["cohorts"])
        data = [[x for x in r["cohorts"][c]["token_share_trained_per_profile"] if x == x] or [0.0] for c in names]
        ax.boxplot(data)
        short = [n.replace("survset_", "").replace("sksurv_", "") for n in names]
        ax.set_xticks(range(1, len(names) + 1), short, rotation=35, ha="right", fontsize=7)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("share of tokens\nwith trained embedding")
        ax.set_title(f"{run}: {r['vocabulary_share_trained']:.0%} of the vocabulary trained", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_names(runs: list[str]) -> dict[str, str]:
    """Each run folder's name in the outputs: its own (``fold0``), or with its parent's where two would share one
    (``..._seed1/fold0`` and ``..._seed2/fold0``)."""
    names = [Path(r).name for r in runs]
    clash = len(set(names)) < len(names)
    out = {f"{Path(r).parent.name}/{Path(r).name}" if clash else Path(r).name: r for r in runs}
    if len(out) < len(runs):
        raise ValueError(f"--runs names the same folder twice: {runs}")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="pretraining output_dir(s) (checkpoints/ and final/)")
    p.add_argument("--manifest", nargs="+", required=True, help="manifest(s) whose cohorts to measure")
    p.add_argument("--modality", default=None, help="the omics modality (default: the run's only one)")
    p.add_argument("--output_dir", required=True)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from bioperceiver.data import read_manifest

    manifests = [read_manifest(m) for m in args.manifest]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "gene_embedding_coverage",
        "argv": sys.argv[1:] if argv is None else list(argv),
        "runs": {name: run_coverage(Path(r), manifests, args.modality) for name, r in run_names(args.runs).items()},
    }
    (out / "coverage.json").write_text(json.dumps(result, indent=1))
    (out / "coverage.md").write_text(report(result))
    plot(result, out / "coverage.png")
    print(report(result))
    return result


if __name__ == "__main__":
    main()
