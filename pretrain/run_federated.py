#!/usr/bin/env python
"""Federated contrastive pretraining across sites (Flower FedAvg/FedProx), no raw data pooled.

    python pretrain/run_federated.py --manifest outputs/demo/cohort/manifest.parquet --site_column meta_source \\
        --processor_settings tokenizers/demo_processors.yaml --rounds 5 --local_epochs 1 --output_dir outputs/fed
    python pretrain/run_federated.py --site_manifests north=a.parquet south=b.parquet --strategy fedprox \\
        --proximal_mu 0.01 --output_dir outputs/fed
    python pretrain/run_federated.py args.yaml [--key value ...]       # an argument file, flags override it

Arguments: ``bioperceiver.federated.runs.FederatedArguments`` (sites, rounds, local training, client-side
clipping/noise, resume) and ``FederatedPretrainArguments`` (data, processors, preset, loss). Sites are simulated in
this process one after the other; the same client code runs at real sites as a Flower ``ClientApp`` (see README,
"Federated training"). Outputs in ``--output_dir``: the backbone (``AutoModel.from_pretrained``) and processors,
``federated_history.json`` and ``federated_metrics.png`` (per-site and mean losses per round), ``rounds/round-NNNN``
checkpoints (``--resume true`` continues from the latest, identically), ``all_results.json`` and a model card.
"""

from __future__ import annotations

import json
import logging
import sys

from bioperceiver.federated.runs import (
    FederatedArguments,
    FederatedPretrainArguments,
    parse_arguments,
    run_federated_pretraining,
)


def main(argv: list[str] | None = None) -> dict:
    fed, args = parse_arguments(
        (FederatedArguments, FederatedPretrainArguments), list(sys.argv[1:] if argv is None else argv)
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results = run_federated_pretraining(fed, args)
    logging.getLogger("run_federated").info(
        "results: %s", json.dumps({k: results[k] for k in ("rounds", "final_train_loss", "final_eval_loss")})
    )
    return results


if __name__ == "__main__":
    main()
