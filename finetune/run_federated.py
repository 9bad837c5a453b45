#!/usr/bin/env python
"""Federated finetuning across sites (Flower FedAvg/FedProx): each site trains on its own labelled records.

    python finetune/run_federated.py --manifest outputs/demo/cohort/manifest.parquet --site_column meta_source \\
        --task survival --modalities omics_expression tabular_clinical \\
        --processor_settings tokenizers/demo_processors.yaml --rounds 10 --output_dir outputs/fed_survival
    python finetune/run_federated.py args.yaml [--key value ...]       # an argument file, flags override it

Arguments: ``ModelArguments`` and ``DataArguments`` of ``run_finetune.py`` (task, label columns, modalities,
``--model_name_or_path`` of a pretrained backbone or ``--preset``, ``--finetuning_mode``) and
``FederatedArguments`` (sites, rounds, local training, client-side clipping/noise, resume). Only sites that hold
the task's labels take part. Outputs in ``--output_dir``: the model and processors, ``finetuning_task.json``,
``all_results.json`` (test metrics with patient-bootstrap 95% CIs per site and over all sites' test patients),
``federated_history.json``, ``federated_metrics.png``, ``rounds/`` checkpoints and a model card.
"""

from __future__ import annotations

import json
import logging
import sys

from bioperceiver.federated.runs import FederatedArguments, parse_arguments, run_federated_finetuning
from bioperceiver.training.arguments import DataArguments, ModelArguments


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, fed = parse_arguments((ModelArguments, DataArguments, FederatedArguments), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results = run_federated_finetuning(fed, model_args, data_args)
    logging.getLogger("run_federated").info("test (all sites): %s", json.dumps(results.get("test_pooled"), default=str))
    return results


if __name__ == "__main__":
    main()
