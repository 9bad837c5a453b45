"""The ``bioperceiver`` command: one subcommand per way in, each calling the library.

    bioperceiver validate cohort/manifest.parquet
    bioperceiver fit-processors --manifest cohort/manifest.parquet --output_dir my_model/
    bioperceiver embed --model runs/pretrain/final --manifest cohort.parquet --output_dir emb/
    bioperceiver predict --model runs/finetune_dx --manifest new_patients.parquet --output_dir preds/
    bioperceiver search --index emb/ --query queries.parquet --modality text_report --target image_cxr -k 10

Subcommands are rows of :data:`COMMANDS`: a name, the ``module:function`` that takes ``argv`` (imported only when
the subcommand runs, so ``bioperceiver --help`` stays fast and optional parts may be missing), a one-line help, an
example shown under ``--help``, and what to say when the module is not installed. Adding one is one entry.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from .data.errors import DEFAULT_ON_ERROR, ON_ERROR_CHOICES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Command:
    """One subcommand: ``target`` is ``"module:function"`` taking ``argv``; ``missing`` is the message when that
    module (or a package it needs) is not installed, ``{name}`` being the missing module."""

    target: str
    help: str
    example: str
    missing: str = "{name} is not installed"


# ---- the subcommands implemented here: parse, call the library, report --------------------------------------------
def _parser(name: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=f"bioperceiver {name}", description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def _common(p: argparse.ArgumentParser, batch_size: int) -> None:
    p.add_argument("--batch_size", type=int, default=batch_size)
    p.add_argument("--on_error", default=DEFAULT_ON_ERROR, choices=ON_ERROR_CHOICES, help="unreadable rows/modalities")
    p.add_argument("--device", default=None, help="default: this process's accelerator (GPU) or the CPU")


def embed_main(argv: Sequence[str] | None = None) -> int:
    from .inference.embedding import SPACES, embed
    from .inference.embedding import __doc__ as doc

    p = _parser("embed", doc.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a pretraining run's final/ folder or a finetuned folder")
    p.add_argument("--manifest", required=True, help="Parquet/CSV/JSONL manifest")
    p.add_argument("--output_dir", required=True, help="shards are written (and resumed) here")
    p.add_argument("--shard_size", type=int, default=1024, help="manifest rows per Parquet shard")
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument(
        "--space",
        choices=SPACES,
        default="latent",
        help="latent: the backbone's pooled latents (features for downstream models); projected: after the "
        "contrastive projection head saved with a pretraining run's final/ (where the loss aligned the modalities "
        "and the card measured retrieval; compare both for cross-modal search: benchmarks/retrieval_space.py)",
    )
    p.add_argument("--no_progress", action="store_true")
    _common(p, 32)
    args = p.parse_args(argv)
    result = embed(
        args.model,
        args.manifest,
        args.output_dir,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        on_error=args.on_error,
        num_workers=args.num_workers,
        device=args.device,
        progress=not args.no_progress,
        space=args.space,
    )
    print(result.summary())
    return 0


def predict_main(argv: Sequence[str] | None = None) -> int:
    from .inference.prediction import __doc__ as doc
    from .inference.prediction import predict

    p = _parser("predict", doc.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a finetune/run_finetune.py output folder")
    p.add_argument("--manifest", required=True, help="rows to predict (labels optional)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--mc_dropout", type=int, default=0, help="MC-dropout passes for the spread (0 = off)")
    p.add_argument(
        "--explain",
        action="store_true",
        help="modality Shapley values and, for the first --explain_samples rows, per-modality attribution figures",
    )
    p.add_argument("--explain_samples", type=int, default=3)
    p.add_argument("--no_uncertainty", action="store_true", help="skip calibration and conformal sets")
    p.add_argument("--seed", type=int, default=0)
    _common(p, 64)
    args = p.parse_args(argv)
    result = predict(
        args.model,
        args.manifest,
        args.output_dir,
        batch_size=args.batch_size,
        on_error=args.on_error,
        mc_dropout=args.mc_dropout,
        explain=args.explain,
        explain_samples=args.explain_samples,
        uncertainty=not args.no_uncertainty,
        device=args.device,
        seed=args.seed,
    )
    r = result.results
    print(f"{r['predicted']} of {r['rows']} rows predicted ({r['labelled']} labelled) -> {args.output_dir}")
    if r.get("metrics"):
        print({k: round(v, 4) for k, v in r["metrics"].items() if isinstance(v, float)})
    return 0


def search_main(argv: Sequence[str] | None = None) -> int:
    from .inference.retrieval import __doc__ as doc
    from .inference.retrieval import search

    p = _parser("search", doc.split("\n\n")[0])
    p.add_argument("--index", required=True, help="an `embed` output folder (the searched cohort)")
    p.add_argument(
        "--query", required=True, help="a manifest (embedded with the index's model, in its space) or an embed folder"
    )
    p.add_argument("--modality", required=True, help="the queries' modality (a manifest column, or 'fused')")
    p.add_argument("--target", required=True, help="the index modality searched (a column, or 'fused')")
    p.add_argument("-k", type=int, default=10, help="neighbours per query")
    p.add_argument("--model", default=None, help="model for a manifest query (default: the index's)")
    p.add_argument("--evaluate", action="store_true", help="R@1/5/10 with chance level on --label_column")
    p.add_argument("--label_column", default=None, help="label_* column: relevant = same label")
    p.add_argument("--backend", default="auto", choices=("auto", "faiss", "exact"))
    p.add_argument("--faiss_index", default="Flat", help="FAISS index_factory string (Flat = exact)")
    p.add_argument("--output_dir", default=None, help="write search_results.csv (+ search_metrics.json)")
    _common(p, 32)
    args = p.parse_args(argv)
    result = search(
        args.index,
        args.query,
        modality=args.modality,
        target=args.target,
        k=args.k,
        model=args.model,
        evaluate=args.evaluate,
        label_column=args.label_column,
        backend=args.backend,
        faiss_index=args.faiss_index,
        batch_size=args.batch_size,
        on_error=args.on_error,
        output=args.output_dir,
    )
    if result.metrics:
        ks = [k for k in (1, 5, 10) if f"recall@{k}" in result.metrics]
        print(
            f"{result.metrics['n_queries']} queries: "
            + ", ".join(
                f"R@{k} {result.metrics[f'recall@{k}']:.3f} (chance {result.metrics[f'chance_recall@{k}']:.3f})"
                for k in ks
            )
        )
    if args.output_dir is None:
        print(result.table.to_string(index=False, max_rows=50))
    return 0


COMMANDS: dict[str, Command] = {
    "validate": Command(
        "bioperceiver.data.validate:main",
        "check a manifest: ids, splits, labels, every cell and file header (exit 1 on problems)",
        "bioperceiver validate cohort/manifest.parquet --json report.json",
    ),
    "fit-processors": Command(
        "bioperceiver.data.fitting:main",
        "fit every modality's processor on the train split and save them beside a model",
        "bioperceiver fit-processors --manifest cohort/manifest.parquet --settings tokenizers/demo_processors.yaml "
        "--output_dir my_model/",
    ),
    "embed": Command(
        "bioperceiver.cli:embed_main",
        "fused + per-modality embeddings of a cohort as sharded Parquet (resumable, multi-process)",
        "bioperceiver embed --model outputs/demo/pretrain/final --manifest cohort/manifest.parquet --output_dir emb/\n"
        "  accelerate launch --num_processes 2 -m bioperceiver.cli embed --model M --manifest C --output_dir emb/",
    ),
    "predict": Command(
        "bioperceiver.cli:predict_main",
        "a finetuned model on new rows: predictions, calibrated probabilities, conformal sets, MC-dropout",
        "bioperceiver predict --model outputs/demo/finetune_findings --manifest new.parquet --output_dir preds/ "
        "--mc_dropout 20",
    ),
    "search": Command(
        "bioperceiver.cli:search_main",
        "nearest samples across modalities over `embed` output (FAISS or exact), own patient excluded",
        "bioperceiver search --index emb/ --query queries.parquet --modality text_report --target image_cxr -k 10\n"
        "  bioperceiver search --index emb/ --query emb_test/ --modality text_report --target image_cxr "
        "--evaluate --label_column label_finding",
    ),
    "extract-wsi": Command(
        "bioperceiver.modalities.wsi.extract:main",
        "whole-slide images -> tissue tiles -> frozen patch-encoder features (<slide>.h5)",
        "bioperceiver extract-wsi --help",
        missing="whole-slide image support is not installed ({name} is missing): install the WSI extra "
        "(pip install 'bioperceiver[wsi]')",
    ),
}


def _overview() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: bioperceiver <command> [--help] [arguments]", "", "commands:"]
    lines += [f"  {name:<{width}}  {c.help}" for name, c in COMMANDS.items()]
    lines += ["", "`bioperceiver <command> --help` shows a command's arguments and an example."]
    return "\n".join(lines)


def _resolve(name: str, command: Command):
    module_name, _, function = command.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = err.name or module_name
        # the module itself (or its package) is absent, or a package it needs is: the command is not installed
        if module_name == missing or module_name.startswith(missing + ".") or not missing.startswith("bioperceiver"):
            raise SystemExit(f"bioperceiver {name}: " + command.missing.format(name=missing)) from err
        raise
    return getattr(module, function)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_overview())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"bioperceiver: unknown command {name!r}{hint}\n\n{_overview()}", file=sys.stderr)
        return 2
    command = COMMANDS[name]
    function = _resolve(name, command)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    wants_help = any(a in ("-h", "--help") for a in rest)
    try:
        code = function(rest)
    except SystemExit as stop:
        if wants_help and stop.code in (0, None):
            print(f"\nexample:\n  {command.example}")
        raise
    except (ValueError, FileNotFoundError) as err:  # bad input: the message names the row/column/folder and fix
        print(f"bioperceiver {name}: error: {err}", file=sys.stderr)
        return 2
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
