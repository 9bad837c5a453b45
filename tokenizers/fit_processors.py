#!/usr/bin/env python
"""Fit every modality's processor from a manifest and save them (the directory a model is saved into).

    python tokenizers/fit_processors.py --manifest outputs/demo/cohort/manifest.parquet \
        --settings tokenizers/demo_processors.json --output_dir outputs/demo/processors

Steps: validate the manifest (stop on problems unless ``--allow_invalid``), assign patient-level splits when it
has none (salted hash of ``patient_id``), fit each processor on the ``train`` rows, save them with
``BioPerceiverProcessor.save_pretrained``, and write ``model_modalities.json`` (the ``modalities`` argument of
``create_model``/``BioPerceiverConfig`` implied by the fitted vocabularies) and ``split_manifest.parquet`` (the
manifest with its ``split`` column). ``--settings`` is a JSON/YAML file ``{column: {setting: value}}`` (or
``{processors: ..., embedders: ...}``) keyed by manifest column; entries for columns this manifest lacks are listed
and not applied, and relative paths in it resolve against its own folder. Without it the manifest metadata's
``processor_settings`` are used. With ``--allow_invalid``, training values that cannot be read are left out of
fitting and counted (``--on_error raise`` stops on the first instead).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from bioperceiver.data import (
    ON_ERROR_CHOICES,
    BioPerceiverProcessor,
    assign_splits,
    load_processor_settings,
    read_manifest,
    validate_manifest,
    write_manifest,
)

logger = logging.getLogger("fit_processors")


def load_settings(path: str | None, manifest) -> tuple[dict, dict]:
    """``(processor settings, embedder overrides)`` from ``--settings``, or the manifest's metadata."""
    if path is None:
        return dict(manifest.metadata.get("processor_settings", {})), {}
    return load_processor_settings(path)


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--settings", help="JSON/YAML {column: settings} or {processors: ..., embedders: ...}")
    p.add_argument("--split", default="train", help="split to fit on")
    p.add_argument("--salt", default="bioperceiver", help="salt of the patient-level split hash")
    p.add_argument("--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--allow_invalid", action="store_true", help="fit even when validation finds problems")
    p.add_argument(
        "--on_error",
        default="skip_modality",
        choices=ON_ERROR_CHOICES,
        help="a training value that cannot be read: left out of fitting and counted (skip_*), or raise",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    manifest = read_manifest(args.manifest)
    report = validate_manifest(manifest)
    print(report.summary(20))
    if not report.ok and not args.allow_invalid:
        raise SystemExit("the manifest has problems (listed above); fix them or pass --allow_invalid")
    manifest = assign_splits(manifest, fractions=args.fractions, salt=args.salt)
    settings, embedders = load_settings(args.settings, manifest)
    processor = BioPerceiverProcessor.from_manifest(manifest, settings)
    if processor.unused_settings:
        print("settings not applied (no such column in this manifest): " + "; ".join(processor.unused_settings))
    processor.fit(manifest, split=args.split, on_error=args.on_error)
    if processor.fit_report.modality_total:
        print("left out of fitting: " + processor.fit_report.summary())
    out = Path(args.output_dir)
    processor.save_pretrained(out)
    modalities = processor.model_modalities(embedders)
    (out / "model_modalities.json").write_text(json.dumps(modalities, indent=1) + "\n")
    meta = dict(manifest.metadata, split={"salt": args.salt, "fractions": list(args.fractions)})
    write_manifest(manifest.table, out / "split_manifest.parquet", meta)
    counts = manifest.table.groupby("split")["patient_id"].agg(["count", "nunique"]).to_dict("index")
    print(f"splits (samples, patients): { {k: (v['count'], v['nunique']) for k, v in counts.items()} }")
    for name, cfg in modalities.items():
        print(f"  {name:20s} {cfg}")
    print(f"processors saved to {out}")
    return out


if __name__ == "__main__":
    main()
