#!/usr/bin/env python
"""Finetune a (pretrained or randomly initialised) BioPerceiver with a lightweight head on a labelled manifest.

    python finetune/run_finetune.py finetune/configs/demo_survival.yaml [--key value overrides]
    python finetune/run_finetune.py --model_name_or_path outputs/demo/pretrain/final --manifest cohort.parquet \
        --task classification --label_column label_diagnosis --output_dir runs/dx --do_train --do_eval --do_predict
    accelerate launch --num_processes 4 finetune/run_finetune.py args.yaml      # multi-GPU, Trainer handles DDP

Arguments are ``ModelArguments``, ``DataArguments`` and transformers' ``TrainingArguments`` (parsed with
``HfArgumentParser``; a single ``.yaml``/``.json`` argument is an argument file, and further ``--key value``
arguments override it). Tasks: ``classification`` (binary/multiclass), ``multilabel``, ``regression``,
``survival`` (Cox or discrete-time). Finetuning modes: ``linear_probe`` (frozen backbone, cached embeddings),
``partial``, ``full``, ``lora``. Without ``--model_name_or_path`` the backbone is randomly initialised from
``--preset`` (the no-pretraining baseline).

``--do_train true`` trains (transformers' default is false). Without it the run only evaluates, which needs a model
with a trained head: a finetuned folder (an earlier run's ``output_dir``) as ``--model_name_or_path``; a backbone (a
pretraining ``final/``) or no model is refused, as is ``--resume_from_checkpoint`` without ``--do_train``.

Before any work: the model/processor folders, the output folder and the manifest (cheap validation) are checked.
An ``output_dir`` that holds a run is refused unless ``--resume_from_checkpoint latest|CHECKPOINT`` (arguments must
match the run's ``finetuning_run.json`` up to the resumable ones) or ``--overwrite_output_dir true`` (removes what a
finetuning run writes there; other files are kept and named).

Outputs in ``output_dir``: the model (``save_pretrained``, LoRA merged) + processors + ``finetuning_task.json`` +
``README.md`` (model card); ``all_results.json`` (train/validation/test metrics, test with bootstrap 95% CIs);
``trainer_state.json`` (the Trainer's log history: training loss and every evaluation) and ``learning_curves.png``
(training loss, validation loss and metric per epoch, the kept epoch marked);
``local_only/predictions_test.csv`` (per sample, with ids: keep it at the site); ``results_by_pattern.csv``
(metrics per missing-modality pattern); ``ablation.csv`` (each modality removed / alone); PNGs (ROC/PR,
calibration, Kaplan–Meier, ablation). With ``--dp_target_epsilon`` the run trains with DP-SGD (Opacus) and reports
the spent epsilon in ``all_results.json`` and the card.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import transformers
from transformers import HfArgumentParser, TrainingArguments

from bioperceiver.data.errors import DataError
from bioperceiver.data.validate import ManifestError
from bioperceiver.training.arguments import DataArguments, ModelArguments
from bioperceiver.training.finetune_loop import finetuning_summary, run_finetuning
from bioperceiver.training.finetuning import FinetuneInputError

PROG = "run_finetune.py"
# what a user can fix (the message says how): one `error:` line and exit status 2, as argparse and run_pretrain.py
# print them; anything else is a bug and keeps its traceback
USER_ERRORS = (FinetuneInputError, DataError, ManifestError)


def refuse(err: Exception) -> SystemExit:
    """Print ``run_finetune.py: error: <message>`` on stderr; the ``SystemExit(2)`` to raise (from ``err``)."""
    print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
    return SystemExit(2)


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        import yaml

        values = yaml.safe_load(Path(argv[0]).read_text())  # YAML is a superset of JSON
        extra = parser.parse_args_into_dataclasses(
            args=[*_to_cli(values), *argv[1:]], look_for_args_file=False
        )  # later flags win
        return tuple(extra)  # type: ignore[return-value]
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)  # type: ignore[return-value]


def _to_cli(values: dict[str, Any]) -> list[str]:
    out = []
    for k, v in values.items():
        if v is None:  # `key: null` in an argument file = not given (the field's default), never the text "None"
            continue
        if isinstance(v, list):
            out += [f"--{k}", *map(str, v)]
        elif isinstance(v, dict):
            out += [f"--{k}", json.dumps(v)]
        else:
            out += [f"--{k}", str(v)]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the arguments and run; a refusal (a bad argument, path, output folder or manifest, an unusable label)
    prints one ``run_finetune.py: error: ...`` line and raises ``SystemExit(2)`` whose ``__cause__`` is the error."""
    try:
        model_args, data_args, training_args = parse_args(argv)
    except (ValueError, FileNotFoundError) as err:  # the argument dataclasses' checks; an argument file not there
        raise refuse(err) from err
    logging.basicConfig(
        level=logging.INFO if training_args.should_log else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    transformers.utils.logging.set_verbosity_warning()
    try:
        results = run_finetuning(model_args, data_args, training_args)
    except USER_ERRORS as err:
        raise refuse(err) from err
    if training_args.process_index == 0:  # the process that wrote the report
        print("\n".join(finetuning_summary(training_args.output_dir, results, data_args.test_split)), flush=True)
    return results


if __name__ == "__main__":
    main()
