#!/usr/bin/env python
"""Contrastive pretraining of BioPerceiver with Accelerate: one CPU, one GPU, a node or many nodes, no code change.

    python pretrain/run_pretrain.py --config pretrain/configs/demo.yaml [key.sub=value ...] [--resume latest|PATH]
    python pretrain/run_pretrain.py --config my_run.yaml --overwrite_output_dir        # delete the old run first
    python pretrain/run_pretrain.py --config pretrain/configs/demo.yaml --print_config   # the resolved config
    accelerate launch --config_file pretrain/configs/accelerate/ddp.yaml pretrain/run_pretrain.py --config ...

The run YAML is a typed config (``bioperceiver.training.config.PretrainConfig``: model preset + overrides, data,
loss, optimiser, schedule, batch sizes, precision, checkpointing, evaluation, logging); ``key.sub=value`` arguments
override it (values parsed as YAML). An unknown key or a wrong type stops the run before any work, naming the
closest valid key. The loop is ``bioperceiver.training.run_pretraining``: atomic checkpoints with the resolved
config every ``checkpoint.save_steps`` steps, exact resume with ``--resume latest``, and ``output_dir/final`` with
the backbone (``AutoModel.from_pretrained``), its processors, ``run_config.yaml`` and a model card. Launch files for
one CPU, one GPU, DDP, FSDP2, DeepSpeed ZeRO-2/3 and SLURM are in ``pretrain/configs/``.

Relative paths in the run YAML resolve against the YAML's folder; on the command line, against the working directory.
Before any work: an ``output_dir`` holding a run is refused unless ``--resume`` or ``--overwrite_output_dir``;
``--resume`` refuses a changed config (naming the keys) or a different number of processes; the manifest is
validated (manifest-level problems stop the run with the full list, exit status 2).
"""

from __future__ import annotations

import argparse
import logging
import os

from bioperceiver.data.validate import ManifestError
from bioperceiver.training import RunConfigError, load_run_config, run_pretraining
from bioperceiver.training.checkpointing import CheckpointWriteError
from bioperceiver.training.loop import RunStopped


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="run YAML (pretrain/configs/demo.yaml)")
    p.add_argument("--resume", help="'latest' or a checkpoint folder (its config and process count are checked)")
    p.add_argument(
        "--overwrite_output_dir", action="store_true", help="delete a run already in output_dir and start afresh"
    )
    p.add_argument("--print_config", action="store_true", help="print the resolved config (YAML) and exit")
    p.add_argument("--crash_after_step", type=int, help=argparse.SUPPRESS)  # tests: SIGKILL after this checkpoint
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    args = p.parse_intermixed_args(argv)  # overrides may follow --resume latest
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
        result = run_pretraining(
            config,
            resume=args.resume,
            overwrite_output_dir=args.overwrite_output_dir,
            crash_after_step=args.crash_after_step,
        )
    except (RunConfigError, ManifestError, FileNotFoundError) as err:
        p.error(str(err))  # exit status 2, before any work (a missing input, or --resume latest with no checkpoint)
    except RunStopped as err:  # SIGTERM / Ctrl-C: a checkpoint of the last step is saved
        p.exit(128 + err.signum, f"{p.prog}: {err}\n")
    except CheckpointWriteError as err:  # a full disk: the message names the folder and what was kept
        p.exit(1, f"{p.prog}: error: {err}\n")
    if result["is_main_process"]:
        print("\n".join(result["summary"]), flush=True)
    return result


if __name__ == "__main__":
    main()
