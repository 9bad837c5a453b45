"""Fit every modality's processor from a manifest and save them (the directory a model is saved into).

    bioperceiver fit-processors --manifest outputs/demo/cohort/manifest.parquet \
        --settings tokenizers/demo_processors.yaml --output_dir outputs/demo/processors

Steps: validate the manifest (stop on problems unless ``--allow_invalid``), assign patient-level splits when it
has none (salted hash of ``patient_id``), fit each processor on the ``train`` rows, save them with
``BioPerceiverProcessor.save_pretrained``, and write ``model_modalities.json`` (the ``modalities`` argument of
``create_model``/``BioPerceiverConfig`` implied by the fitted vocabularies) and ``split_manifest.parquet`` (the
manifest with its ``split`` column). ``--settings`` is a JSON/YAML file ``{column: {setting: value}}`` (or
``{processors: ..., embedders: ...}``) keyed by manifest column; entries for columns this manifest lacks are listed
and not applied, and relative paths in it resolve against its own folder. Without it the manifest metadata's
``processor_settings`` are used. With ``--allow_invalid``, training values that cannot be read are left out of
fitting and counted (``--on_error raise`` stops on the first instead).

The same as ``python tokenizers/fit_processors.py`` (which calls :func:`main`); :func:`fit_processors` is the
library function.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ON_ERROR_CHOICES
from .manifest import read_manifest, write_manifest
from .processing import BioPerceiverProcessor, load_processor_settings
from .splits import assign_splits
from .validate import ValidationReport, validate_manifest

logger = logging.getLogger(__name__)


@dataclass
class FitResult:
    """What :func:`fit_processors` wrote and found: the output folder, the validation report, the fitted processor,
    the model modalities (``model_modalities.json``) and the split sizes ``{split: (samples, patients)}``."""

    output_dir: Path
    report: ValidationReport
    processor: BioPerceiverProcessor
    modalities: dict[str, dict]
    split_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)

    def summary_lines(self) -> list[str]:
        lines = []
        if self.processor.unused_settings:
            lines.append(
                "settings not applied (no such column in this manifest): " + "; ".join(self.processor.unused_settings)
            )
        if self.processor.fit_report.modality_total:
            lines.append("left out of fitting: " + self.processor.fit_report.summary())
        lines.append(f"splits (samples, patients): {self.split_sizes}")
        lines += [f"  {name:20s} {cfg}" for name, cfg in self.modalities.items()]
        lines.append(f"processors saved to {self.output_dir}")
        return lines


def load_settings(path: str | None, manifest) -> tuple[dict, dict]:
    """``(processor settings, embedder overrides)`` from ``--settings``, or the manifest's metadata."""
    if path is None:
        return dict(manifest.metadata.get("processor_settings", {})), {}
    return load_processor_settings(path)


def fit_processors(
    manifest: str | Path,
    output_dir: str | Path,
    *,
    settings: str | None = None,
    split: str = "train",
    salt: str = "bioperceiver",
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    allow_invalid: bool = False,
    on_error: str = "skip_modality",
    report_lines: int = 20,
) -> FitResult:
    """Validate ``manifest``, assign patient-level splits, fit the processors on ``split`` and save them, with
    ``model_modalities.json`` and ``split_manifest.parquet``, into ``output_dir``. Raises ``ValueError`` when the
    manifest has problems (the report's summary in the message) unless ``allow_invalid``."""
    out = Path(output_dir)
    saved = [n for n in ("model.safetensors", "pytorch_model.bin", "finetuning_task.json") if (out / n).exists()]
    if saved:  # its model was trained on the processors there: refitting them changes what it sees, silently
        raise ValueError(
            f"--output_dir {out} holds a saved model ({', '.join(saved)}) and the processors it was trained with; "
            "fitting other processors there would change what the model sees. Fit them into a new --output_dir"
        )
    m = read_manifest(manifest)
    report = validate_manifest(m)
    if not report.ok and not allow_invalid:
        raise ValueError(
            f"{report.summary(report_lines)}\nthe manifest has problems (listed above); fix them or pass "
            "--allow_invalid"
        )
    m = assign_splits(m, fractions=tuple(fractions), salt=salt)
    processor_settings, embedders = load_settings(settings, m)
    processor = BioPerceiverProcessor.from_manifest(m, processor_settings)
    processor.fit(m, split=split, on_error=on_error)
    processor.save_pretrained(out)
    modalities = processor.model_modalities(embedders)
    (out / "model_modalities.json").write_text(json.dumps(modalities, indent=1) + "\n")
    meta = dict(m.metadata, split={"salt": salt, "fractions": list(fractions)})
    write_manifest(m.table, out / "split_manifest.parquet", meta)
    counts = m.table.groupby("split")["patient_id"].agg(["count", "nunique"]).to_dict("index")
    sizes = {k: (int(v["count"]), int(v["nunique"])) for k, v in counts.items()}
    return FitResult(out, report, processor, modalities, sizes)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(
        prog="bioperceiver fit-processors",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    try:
        result = fit_processors(
            args.manifest,
            args.output_dir,
            settings=args.settings,
            split=args.split,
            salt=args.salt,
            fractions=args.fractions,
            allow_invalid=args.allow_invalid,
            on_error=args.on_error,
        )
    except ValueError as err:
        raise SystemExit(str(err)) from err
    print(result.report.summary(20))
    print("\n".join(result.summary_lines()))
    return result.output_dir


if __name__ == "__main__":
    main()
