#!/usr/bin/env python
"""Train a WordPiece or byte-level BPE tokenizer on the notes of a manifest or on a text corpus.

    python tokenizers/train_text_tokenizer.py --manifest outputs/demo/cohort/manifest.parquet --column text_report \
        --vocab_size 8000 --output_dir outputs/tokenizers/padchest_wordpiece
    python tokenizers/train_text_tokenizer.py --corpus notes1.txt notes2.txt --model bpe --output_dir tok/

Writes ``tokenizer.json`` and a text processor (``processor_config.json``) to ``--output_dir``; point a text
modality's processor settings at it with ``{"tokenizer_file": ".../tokenizer.json"}``. Training uses only the
``--split`` rows (default ``train``; splits come from the salted patient hash when the manifest has none), so no
validation/test note shapes the vocabulary. Prints the vocabulary size, tokens per note, the share of [UNK] tokens
and of truncated notes on the held-out rows.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from bioperceiver.data import assign_splits, read_manifest
from bioperceiver.modalities.text import TextProcessor

logger = logging.getLogger("train_text_tokenizer")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="manifest (Parquet/CSV/JSONL) whose notes to train on")
    src.add_argument("--corpus", nargs="+", help="plain-text files, one note per line")
    p.add_argument("--column", help="text column of the manifest (default: the only text column)")
    p.add_argument("--split", default="train", help="manifest split to train on ('all' for every row)")
    p.add_argument("--model", choices=["wordpiece", "bpe"], default="wordpiece")
    p.add_argument("--vocab_size", type=int, default=8000)
    p.add_argument("--min_frequency", type=int, default=2)
    p.add_argument("--no_lowercase", action="store_true", help="keep case (and accents)")
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--truncation", choices=["right", "left"], default="right")
    p.add_argument("--output_dir", required=True)
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    held_out: list[str] = []
    if args.manifest:
        manifest = read_manifest(args.manifest)
        texts = [c for c, k in manifest.modalities.items() if k == TextProcessor.kind]
        column = args.column or (texts[0] if len(texts) == 1 else None)
        if column not in texts:
            raise SystemExit(f"--column must name one of the manifest's text columns {texts}")
        if args.split != "all":
            manifest = assign_splits(manifest)
            held_out = manifest.table.loc[manifest.table["split"] != args.split, column].dropna().tolist()
            manifest = manifest.split(args.split)
        notes = manifest.table[column].dropna().tolist()
    else:
        notes = [line.strip() for f in args.corpus for line in Path(f).read_text().splitlines() if line.strip()]
    proc = TextProcessor(
        column if args.manifest else "text",
        model=args.model,
        vocab_size=args.vocab_size,
        lowercase=not args.no_lowercase,
        min_frequency=args.min_frequency,
        max_length=args.max_length,
        truncation=args.truncation,
    ).fit(notes)
    out = Path(args.output_dir)
    proc.save_pretrained(out)
    unk = proc.tokenizer.token_to_id("[UNK]")
    stats = {"notes_trained_on": len(notes), "vocab_size": proc.state["vocab_size"], "model": args.model}
    for name, sample in (("train", notes), ("held_out", held_out)):
        if not sample:
            continue
        ids = [proc(t)["input_ids"] for t in sample if isinstance(t, str) and t.strip()]
        lengths = np.array([len(i) for i in ids])
        stats[name] = {
            "notes": len(ids),
            "tokens_per_note_mean": float(lengths.mean()),
            "tokens_per_note_p95": float(np.percentile(lengths, 95)),
            "unk_fraction": float(np.mean(np.concatenate(ids) == unk)),
            "truncated_fraction": float(np.mean(lengths >= args.max_length)),
        }
    (out / "tokenizer_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(json.dumps(stats, indent=1))
    print(f"tokenizer saved to {out / 'tokenizer.json'}")
    return out


if __name__ == "__main__":
    main()
