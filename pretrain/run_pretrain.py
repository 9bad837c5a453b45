#!/usr/bin/env python
"""Contrastive pretraining of BioPerceiver with Accelerate: one CPU, one GPU, a node or many nodes, no code change.

    python pretrain/run_pretrain.py --config pretrain/configs/demo.yaml [key.sub=value ...] [--resume latest|PATH]
    accelerate launch --config_file pretrain/configs/accelerate/ddp.yaml pretrain/run_pretrain.py --config ...

The run YAML holds the model preset + overrides, data (manifest, processors), loss, optimiser, schedule, batch
sizes, precision, checkpointing and logging; ``key.sub=value`` arguments override it (values parsed as YAML).
Checkpoints (``save_state``: model, optimiser, scheduler, RNG, plus the data position) are written atomically to
``output_dir/checkpoints/checkpoint-<step>`` every ``checkpoint.save_steps`` steps; ``--resume latest`` continues
mid-epoch with ``skip_first_batches`` and ends with exactly the parameters of an uninterrupted run. At the end
the backbone is saved with ``save_pretrained`` (safetensors) together with its processors in
``output_dir/final`` (loadable by ``AutoModel.from_pretrained``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs, InitProcessGroupKwargs
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

import bioperceiver as bp
from bioperceiver.data import (
    BioPerceiverCollator,
    BioPerceiverProcessor,
    assign_splits,
    load_processor_settings,
    read_manifest,
)
from bioperceiver.losses import local_only
from bioperceiver.training import (
    ContrastivePretrainer,
    ManifestTorchDataset,
    parameter_groups,
    plot_history,
    plot_similarity,
    retrieval_metrics,
)

logger = logging.getLogger("run_pretrain")
ROOT = Path(__file__).resolve().parents[1]


def load_config(path: str, overrides: list[str]) -> dict[str, Any]:
    cfg = yaml.safe_load(Path(path).read_text())
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"override {item!r} must look like key.sub=value")
        node = cfg
        *parents, leaf = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = yaml.safe_load(value)
    return cfg


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = sorted(ckpt_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


def save_checkpoint(accelerator, ckpt_dir: Path, step: int, batches_seen: int, keep_last: int) -> None:
    """``save_state`` into a temporary folder, then an atomic rename: a crash never leaves a half checkpoint."""
    final = ckpt_dir / f"checkpoint-{step}"
    tmp = ckpt_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "batches_seen": batches_seen}) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(ckpt_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep_last]:
            shutil.rmtree(old)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()


def prepare_data(cfg: dict, accelerator, out: Path):
    data = cfg["data"]
    manifest_path = Path(data["manifest"])
    if not manifest_path.exists() and data.get("build_demo_cohort"):
        if accelerator.is_main_process:
            from bioperceiver.data.recipes.demo import build_demo_cohort

            manifest_path = build_demo_cohort(manifest_path.parent, seed=cfg["seed"])
        accelerator.wait_for_everyone()
    manifest = assign_splits(read_manifest(manifest_path))
    settings_path = data.get("processor_settings")
    processors, embedders = load_processor_settings(ROOT / settings_path if settings_path else None)
    # Fitted processors are read from processor_dir; when it holds none yet, the main process fits them on the
    # train split and saves them there (make demo reuses the ones demo_pipeline.py fitted).
    proc_dir = Path(data["processor_dir"]) if data.get("processor_dir") else out / "processor"
    if accelerator.is_main_process and not (proc_dir / "bioperceiver_processor.json").exists():
        BioPerceiverProcessor.from_manifest(manifest, processors).fit(manifest, split="train").save_pretrained(proc_dir)
    accelerator.wait_for_everyone()
    processor = BioPerceiverProcessor.from_pretrained(proc_dir)
    return manifest, processor, embedders


@torch.no_grad()
def evaluate(
    trainer: ContrastivePretrainer, dataset, collator, batch_size: int
) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Held-out patients: mean contrastive loss and cross-modal retrieval R@1/5/10 for every pair of views."""
    was_training = trainer.training
    trainer.eval()
    views, masks, losses = [], [], []
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))], train=False)
        if batch is None:
            continue
        v, m = trainer.views(batch["inputs"])
        with local_only():  # only the main process evaluates: no collectives
            losses.append(float(trainer.loss_fn(v, m)["loss"]))
        views.append(v.cpu())
        masks.append(m.cpu())
    trainer.train(was_training)
    if not views:
        return {}, torch.empty(0), torch.empty(0)
    views_t, masks_t = torch.cat(views), torch.cat(masks)
    metrics = {"eval_loss": float(sum(losses) / len(losses)), **retrieval_metrics(views_t, masks_t, trainer.view_names)}
    return metrics, views_t, masks_t


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--resume", help="'latest' or a checkpoint folder")
    p.add_argument("--crash_after_step", type=int, help=argparse.SUPPRESS)  # tests: SIGKILL after this checkpoint
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    out = Path(cfg["output_dir"])
    tr, opt, ck, lg = cfg["train"], cfg["optim"], cfg["checkpoint"], cfg["logging"]
    report_to = None if lg.get("report_to") in (None, "none") else lg["report_to"]
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # gloo on CPU-only distributed runs (DeepSpeed's CPU accelerator needs it explicitly, see ../shared ENVIRONMENT)
    handlers = [InitProcessGroupKwargs(backend="gloo")] if distributed and not torch.cuda.is_available() else []
    # a batch rarely holds every modality: the embedders of absent ones get no gradient that step
    handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    accelerator = Accelerator(
        gradient_accumulation_steps=tr["gradient_accumulation_steps"],
        mixed_precision=tr["mixed_precision"],
        log_with=report_to,
        project_dir=str(out),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=handlers,
    )
    logging.basicConfig(
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    set_seed(cfg["seed"])
    manifest, processor, embedders = prepare_data(cfg, accelerator, out)
    model = bp.create_model(
        cfg["model"]["preset"], modalities=processor.model_modalities(embedders), **cfg["model"].get("overrides", {})
    )
    if tr.get("gradient_checkpointing"):
        model.activation_checkpointing_enable()
    loss_cfg = dict(cfg["loss"])
    trainer = ContrastivePretrainer(
        model, loss=loss_cfg.pop("name"), fused_view=loss_cfg.pop("fused_view", True), **loss_cfg
    )
    train_ds = ManifestTorchDataset(
        manifest.split("train"), processor, train=True, seed=cfg["seed"], on_error=cfg["data"]["on_error"]
    )
    collator = BioPerceiverCollator(
        processor.modalities,
        modality_dropout=cfg["data"]["modality_dropout"],
        on_error=cfg["data"]["on_error"],
        seed=cfg["seed"],
    )
    loader = DataLoader(
        train_ds,
        batch_size=tr["batch_size"],
        shuffle=True,
        drop_last=True,
        collate_fn=collator,
        num_workers=cfg["data"].get("num_workers", 0),
    )
    optimizer = torch.optim.AdamW(
        parameter_groups(trainer, opt["weight_decay"]), lr=opt["lr"], betas=tuple(opt["betas"])
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, opt["warmup_steps"], opt["max_steps"])
    trainer, optimizer, loader, scheduler = accelerator.prepare(trainer, optimizer, loader, scheduler)

    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    step, batches_seen = 0, 0
    if args.resume:
        path = latest_checkpoint(ckpt_dir) if args.resume == "latest" else Path(args.resume)
        if path is None:
            raise SystemExit(f"--resume latest: no checkpoint in {ckpt_dir}")
        accelerator.load_state(str(path))
        state = json.loads((path / "trainer_state.json").read_text())
        step, batches_seen = state["step"], state["batches_seen"]
        logger.info("resumed from %s at step %d", path, step)
    if report_to:
        accelerator.init_trackers("pretrain", config={"loss": cfg["loss"]["name"], "preset": cfg["model"]["preset"]})

    eval_cfg = cfg.get("eval", {})
    eval_ds = ManifestTorchDataset(
        manifest.split(eval_cfg.get("split", "validation")), processor, train=False, seed=cfg["seed"], on_error="skip"
    )
    eval_collator = BioPerceiverCollator(processor.modalities, on_error="skip")

    def run_eval(step: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
        metrics, v, m = ({}, None, None)
        if accelerator.is_main_process and len(eval_ds):
            metrics, v, m = evaluate(accelerator.unwrap_model(trainer), eval_ds, eval_collator, tr["batch_size"])
            r1 = {k: round(x, 3) for k, x in metrics.items() if k.startswith("R@1/")}
            logger.info("step %d held-out loss %.4f, R@1 %s", step, metrics.get("eval_loss", float("nan")), r1)
            if report_to:
                accelerator.log({k: x for k, x in metrics.items() if not k.startswith("queries")}, step=step)
        accelerator.wait_for_everyone()
        return metrics, v, m

    n_batches = len(loader)
    accum = tr["gradient_accumulation_steps"]
    history: list[dict] = []
    bar = tqdm(total=opt["max_steps"], initial=step, disable=not accelerator.is_local_main_process, desc="pretrain")
    t_last, samples_since = time.perf_counter(), 0
    while step < opt["max_steps"]:
        epoch, skip = divmod(batches_seen, n_batches)
        train_ds.set_epoch(epoch)
        loader.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        trainer.train()
        for batch in epoch_loader:
            batches_seen += 1
            if batch is None:  # every sample of the batch was skipped (counted by the collator)
                continue
            with accelerator.accumulate(trainer):
                outputs = trainer(inputs=batch["inputs"], patient_id=batch["patient_id"])
                accelerator.backward(outputs["loss"])
                if accelerator.sync_gradients and opt.get("grad_clip"):
                    accelerator.clip_grad_norm_(trainer.parameters(), opt["grad_clip"])
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            samples_since += len(batch["sample_id"])
            if batches_seen % accum:
                continue
            step += 1
            bar.update(1)
            if step % lg["log_steps"] == 0 or step == opt["max_steps"]:
                loss = accelerator.reduce(outputs["loss"].detach(), reduction="mean").item()
                now = time.perf_counter()
                rec = {
                    "step": step,
                    "loss": loss,
                    "lr": scheduler.get_last_lr()[0],
                    "temperature": float(outputs["temperature"]),
                    "samples_per_s": samples_since * accelerator.num_processes / (now - t_last),
                    **{k: float(v) for k, v in outputs.items() if k.startswith("loss_")},
                }
                t_last, samples_since = now, 0
                history.append(rec)
                bar.set_postfix(loss=f"{loss:.3f}")
                if report_to:
                    accelerator.log(rec, step=step)
            if eval_cfg.get("steps") and step % eval_cfg["steps"] == 0 and step < opt["max_steps"]:
                metrics, _, _ = run_eval(step)
                if metrics:
                    history.append({"step": step, **metrics})
            if step % ck["save_steps"] == 0 or step == opt["max_steps"]:
                save_checkpoint(accelerator, ckpt_dir, step, batches_seen, ck["keep_last"])
                if args.crash_after_step == step:
                    os.kill(os.getpid(), signal.SIGKILL)
            if step >= opt["max_steps"]:
                break
    bar.close()
    if collator.report.total:
        collator.report.log("pretraining batches")
    final = out / "final"
    metrics, views, masks = run_eval(step)
    if metrics:
        history.append({"step": step, **metrics})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (out / "eval_results.json").write_text(json.dumps(metrics, indent=1) + "\n")
        plot_history(history, out / "loss_curves.png")
        names = accelerator.unwrap_model(trainer).view_names
        pairs = sorted(
            (k.split("/", 1)[1] for k in metrics if k.startswith("queries/") and not k.endswith("-fused")),
            key=lambda key: -metrics[f"queries/{key}"],
        )
        for key in pairs[:3]:
            a, b = _split_pair(key, names)
            plot_similarity(views, masks, names, a, b, out / f"similarity_{a}__{b}.png")
        unwrapped = accelerator.unwrap_model(trainer)
        unwrapped.model.save_pretrained(final)
        processor.save_pretrained(final)
        (out / "history.json").write_text(json.dumps(history, indent=1) + "\n")
        logger.info("saved the pretrained backbone and processors to %s", final)
    if report_to:
        accelerator.end_training()
    return {"final": str(final), "history": history, "steps": step, "losses_finite": all(
        math.isfinite(h["loss"]) for h in history if "loss" in h
    )}  # fmt: skip


def _split_pair(key: str, names: list[str]) -> tuple[str, str]:
    for a in names:
        if key.startswith(a + "-") and key[len(a) + 1 :] in names:
            return a, key[len(a) + 1 :]
    raise ValueError(key)


if __name__ == "__main__":
    main()
