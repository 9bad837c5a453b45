#!/usr/bin/env python
"""Contrastive pretraining of BioPerceiver with Accelerate: one CPU, one GPU, a node or many nodes, no code change.

    python pretrain/run_pretrain.py --config pretrain/configs/demo.yaml [key.sub=value ...] [--resume latest|PATH]
    python pretrain/run_pretrain.py --config pretrain/configs/demo.yaml --print_config   # the resolved config
    accelerate launch --config_file pretrain/configs/accelerate/ddp.yaml pretrain/run_pretrain.py --config ...

The run YAML is a typed config (``bioperceiver.training.config.PretrainConfig``: model preset + overrides, data,
loss, optimiser, schedule, batch sizes, precision, checkpointing, evaluation, logging); ``key.sub=value`` arguments
override it (values parsed as YAML). An unknown key or a wrong type stops the run before any work, naming the
closest valid key. The loop is ``bioperceiver.training.run_pretraining``: atomic checkpoints with the resolved
config every ``checkpoint.save_steps`` steps, exact resume with ``--resume latest``, and ``output_dir/final`` with
the backbone (``AutoModel.from_pretrained``), its processors, ``run_config.yaml`` and a model card. Launch files for
one CPU, one GPU, DDP, FSDP2, DeepSpeed ZeRO-2/3 and SLURM are in ``pretrain/configs/``.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from bioperceiver.training import RunConfigError, load_run_config, run_pretraining

ROOT = Path(__file__).resolve().parents[1]  # a relative data.processor_settings resolves against the repository


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="run YAML (pretrain/configs/demo.yaml)")
    p.add_argument("--resume", help="'latest' or a checkpoint folder")
    p.add_argument("--print_config", action="store_true", help="print the resolved config (YAML) and exit")
    p.add_argument("--crash_after_step", type=int, help=argparse.SUPPRESS)  # tests: SIGKILL after this checkpoint
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    args = p.parse_args(argv)
    try:
        config = load_run_config(args.config, args.overrides)
    except RunConfigError as err:
        p.error(str(err))  # exit status 2, before any work
    if args.print_config:
        print(config.to_yaml(), end="")
        return {"config": config}
    main_process = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(
        level=logging.INFO if main_process else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        result = run_pretraining(config, resume=args.resume, settings_root=ROOT, crash_after_step=args.crash_after_step)
    except RunConfigError as err:
        p.error(str(err))
    if result["is_main_process"]:
        print("\n".join(result["summary"]), flush=True)
    return result


if __name__ == "__main__":
    main()
