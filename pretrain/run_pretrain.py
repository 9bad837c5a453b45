#!/usr/bin/env python
"""Contrastive pretraining of BioPerceiver with Accelerate: one CPU, one GPU, a node or many nodes, no code change.

    python pretrain/run_pretrain.py --config pretrain/configs/demo.yaml [key.sub=value ...] [--resume latest|PATH]
    accelerate launch --config_file pretrain/configs/accelerate/ddp.yaml pretrain/run_pretrain.py --config ...

Launch files for one CPU, one GPU, DDP, FSDP2, DeepSpeed ZeRO-2/3 and SLURM are in ``pretrain/configs/`` (see the
main README). Evaluation runs its forwards on every rank and the final backbone is gathered with
``accelerator.get_state_dict``, so ZeRO-3 and FSDP (sharded parameters) work like DDP.

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
import contextlib
import importlib.util
import json
import logging
import math
import os
import platform
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs, InitProcessGroupKwargs
from accelerate.utils import DistributedType, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

import bioperceiver as bp
from bioperceiver.cards import pretraining_card
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


def save_checkpoint(accelerator, ckpt_dir: Path, step: int, batches_seen: int, keep_last: int, **extra) -> None:
    """``save_state`` into a temporary folder, then an atomic rename: a crash never leaves a half checkpoint.
    ``extra`` (run totals such as samples seen) goes into ``trainer_state.json`` beside the step and data position."""
    final = ckpt_dir / f"checkpoint-{step}"
    tmp = ckpt_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # collective: every rank writes its RNG state (and its shards with DeepSpeed/FSDP)
    accelerator.wait_for_everyone()  # ... so the folder is renamed only once all of them are written
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(
            json.dumps({"step": step, "batches_seen": batches_seen, **extra}) + "\n"
        )
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


def training_data(cfg: dict, manifest, processor) -> tuple[ManifestTorchDataset, BioPerceiverCollator]:
    """The training split as an augmenting dataset, and its collator (modality dropout, skip policy)."""
    train_ds = ManifestTorchDataset(
        manifest.split("train"), processor, train=True, seed=cfg["seed"], on_error=cfg["data"]["on_error"]
    )
    collator = BioPerceiverCollator(
        processor.modalities,
        modality_dropout=cfg["data"]["modality_dropout"],
        on_error=cfg["data"]["on_error"],
        seed=cfg["seed"],
    )
    return train_ds, collator


@contextlib.contextmanager
def forward_as(module: torch.nn.Module, fn):
    """Temporarily make ``fn`` the module's ``forward``, so that calling ``module(...)`` runs it *through the hooks
    of the module* (FSDP2's root unshards its parameters in its forward hooks, ZeRO-3 gathers in every module's).
    An instance-level ``forward`` already there (accelerate's autocast wrapper) is put back afterwards."""
    previous = module.__dict__.get("forward")
    module.forward = fn
    try:
        yield module
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


@torch.no_grad()
def evaluate(
    trainer: ContrastivePretrainer, dataset, collator, batch_size: int, n_bootstrap: int = 0, seed: int = 0
) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Held-out patients: mean contrastive loss and cross-modal retrieval R@1/5/10 for every pair of views, with
    ``n_bootstrap`` percentile-bootstrap 95% intervals (queries resampled by patient).

    Every rank calls this with the same data (ZeRO-3/FSDP gather parameter shards inside each forward, a collective
    all ranks must join); the loss is computed per process (``local_only``): no cross-rank gather of views."""

    def eval_forward(inputs):
        v, m = trainer.views(inputs)
        with local_only():
            return v, m, trainer.loss_fn(v, m)["loss"]

    was_training = trainer.training
    trainer.eval()
    views, masks, losses, patients = [], [], [], []
    with forward_as(trainer, eval_forward):
        for start in range(0, len(dataset), batch_size):
            batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))], train=False)
            if batch is None:
                continue
            v, m, loss = trainer(batch["inputs"])
            losses.append(float(loss))
            views.append(v.float().cpu())
            masks.append(m.cpu())
            patients += [str(p) for p in batch["patient_id"]]
    trainer.train(was_training)
    if not views:
        return {}, torch.empty(0), torch.empty(0)
    views_t, masks_t = torch.cat(views), torch.cat(masks)
    retrieval = retrieval_metrics(
        views_t, masks_t, trainer.view_names, n_bootstrap=n_bootstrap, groups=patients, seed=seed
    )
    metrics = {"eval_loss": float(sum(losses) / len(losses)), **retrieval}
    return metrics, views_t, masks_t


def trackers_from_config(lg: dict) -> list[str]:
    """``logging.report_to`` (a name, a list, or none) -> tracker names; fails early when a tracker's package is
    missing (accelerate would only warn and train without it)."""
    report_to = lg.get("report_to")
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    names = [n for n in names if n not in (None, "none")]
    if "wandb" in names and importlib.util.find_spec("wandb") is None:
        raise SystemExit(
            "logging.report_to: wandb needs the wandb package: pip install 'bioperceiver[wandb]' "
            "(then `wandb login`, or WANDB_MODE=offline)"
        )
    if "tensorboard" in names and not (
        importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")
    ):
        raise SystemExit("logging.report_to: tensorboard needs the tensorboard package: pip install tensorboard")
    return names


def flat_config(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """Nested run config -> ``{"a.b": scalar}`` (what TensorBoard's hparams accept; W&B takes it too)."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


class TokenCounter:
    """Counts the tokens each modality's embedder hands to the encoder (its keep-mask: padding, absent samples and
    dropped modalities excluded) during training forwards. Counts stay on the device until :meth:`take`."""

    def __init__(self, model: torch.nn.Module):
        self.names = list(model.modality_names)
        self.skip_last = 0  # trailing padding rows (RankPadder) not counted
        self.counts: dict[str, torch.Tensor] = {}
        for name in self.names:
            model.embedders[name].register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def hook(module, args, output):
            if module.training:
                keep = output[1].detach()
                keep = (keep[: len(keep) - self.skip_last] if self.skip_last else keep).sum()
                self.counts[name] = keep if name not in self.counts else self.counts[name] + keep

        return hook

    def take(self, device) -> torch.Tensor:
        """Counts since the last call, one per modality (``self.names`` order), as an int64 tensor on ``device``."""
        out = torch.stack([self.counts.get(n, torch.zeros((), dtype=torch.long)).to(device) for n in self.names])
        self.counts = {}
        return out.long()


class RankPadder:
    """Appends one padding sample holding *every* modality to each training batch, so that every rank makes the
    same module calls at every step whatever modalities its batch holds. :class:`PaddedPretrainer` masks the row
    out of the loss (all its views absent), so the loss and every gradient are exactly those of the real batch.

    Why: the backbone runs every present modality's embedder and one encoder pass per modality present in the
    local batch (its per-modality view), so ranks with different modalities make different calls. DDP copes
    (``find_unused_parameters``); DeepSpeed ZeRO does not: ZeRO-2/3 reduce gradients in buckets filled by
    per-parameter hooks (a parameter with a gradient on one rank and none on another mismatches the collectives:
    gloo "Received data size doesn't match expected size", NCCL a hang) and ZeRO-3 gathers a module's parameter
    shards in its forward hooks, once per call (a different number of encoder calls per rank hangs). FSDP gathers
    per wrapped block and call in the same way.

    The padding row takes each modality's arrays from the first training sample that has it (the same on every
    rank), cut or zero-padded to the batch's padded length so the real rows are left untouched."""

    PAD_ID = "__rank_padding__"

    def __init__(self, dataset, collator, names: list[str]):
        self.row: dict[str, dict[str, torch.Tensor]] = {}
        for i in range(len(dataset)):
            batch = collator([dataset[i]], train=False)
            for name, arrays in (batch or {}).get("inputs", {}).items():
                self.row.setdefault(name, arrays)
            if len(self.row) == len(names):
                break
        missing = sorted(set(names) - set(self.row))
        if missing:  # no training sample has them: no rank ever runs these embedders, which is consistent
            logger.warning("no training sample has %s: these embedders are never trained", missing)

    @staticmethod
    def _fit(t: torch.Tensor, shape: torch.Size, key: str, name: str) -> torch.Tensor:
        """``t`` (one row) cut or zero-padded to ``shape`` beyond the batch dimension (zeros = absent tokens)."""
        if t.dim() != len(shape):
            raise ValueError(f"{name}.{key}: padding row has {t.dim()} dims, the batch {len(shape)}")
        if key == "pixel_values" and t.shape[1:] != shape[1:]:
            raise ValueError(f"{name}: images of shape {tuple(t.shape[1:])} and {tuple(shape[1:])} in one run")
        t = t[(slice(None), *(slice(0, n) for n in shape[1:]))]
        pad = [x for n, m in zip(reversed(shape[1:]), reversed(t.shape[1:]), strict=True) for x in (0, n - m)]
        return torch.nn.functional.pad(t, pad) if any(pad) else t

    def __call__(self, batch: dict) -> dict:
        n = len(batch["sample_id"])
        inputs = {}
        for name, pad in self.row.items():
            real = batch["inputs"].get(name)
            if real is None:  # nobody in the batch has it: n all-absent rows (values copied, masks False)
                real = {
                    k: torch.zeros_like(t[:1].expand(n, *t.shape[1:]))
                    if t.dtype == torch.bool or k == "attention_mask"
                    else t[:1].expand(n, *t.shape[1:]).clone()
                    for k, t in pad.items()
                }
            if set(real) != set(pad):
                raise ValueError(f"{name}: batch arrays {sorted(real)} but padding row {sorted(pad)}")
            inputs[name] = {k: torch.cat([real[k], self._fit(pad[k], real[k].shape, k, name)]) for k in real}
        return {**batch, "inputs": inputs, "patient_id": [*batch["patient_id"], self.PAD_ID]}


class PaddedPretrainer(ContrastivePretrainer):
    """:class:`ContrastivePretrainer` whose last ``num_pad`` batch rows (:class:`RankPadder`) run through the model
    but have no view in the loss: their modality (and leave-one-out) masks are cleared before the loss sees them.
    The backbone processes samples independently, so the real rows' views are unchanged."""

    _num_pad = 0

    def forward(self, inputs, patient_id=None, num_pad: int = 0, **kwargs):
        self._num_pad = num_pad
        try:
            return super().forward(inputs, patient_id, **kwargs)
        finally:
            self._num_pad = 0

    def _encode(self, inputs):
        out = super()._encode(inputs)
        if self._num_pad:
            for key in ("modality_mask", "leave_one_out_mask"):
                if out.get(key) is not None:
                    m = out[key].clone()
                    m[-self._num_pad :] = False
                    out[key] = m
        return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--resume", help="'latest' or a checkpoint folder")
    p.add_argument("--crash_after_step", type=int, help=argparse.SUPPRESS)  # tests: SIGKILL after this checkpoint
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    cfg = load_config(args.config, args.overrides)
    out = Path(cfg["output_dir"])
    tr, opt, ck, lg = cfg["train"], cfg["optim"], cfg["checkpoint"], cfg["logging"]
    trackers = trackers_from_config(lg)
    project = lg.get("project") or "bioperceiver-pretrain"
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # gloo on CPU-only distributed runs (DeepSpeed's CPU accelerator needs it explicitly, see ../shared ENVIRONMENT)
    handlers = [InitProcessGroupKwargs(backend="gloo")] if distributed and not torch.cuda.is_available() else []
    # a batch rarely holds every modality: the embedders of absent ones get no gradient that step
    handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    accelerator = Accelerator(
        gradient_accumulation_steps=tr["gradient_accumulation_steps"],
        mixed_precision=tr["mixed_precision"],
        log_with=trackers or None,
        project_dir=str(out),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=handlers,
        # optim.warmup_steps/max_steps count optimizer steps: the loop steps the scheduler once per optimizer step
        # (accelerate's default would step it num_processes times per step, for schedules written per sample)
        step_scheduler_with_optimizer=False,
    )
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    logging.basicConfig(
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logger.info(
        "%s, %d process(es), device %s, mixed precision %s",
        accelerator.distributed_type.value,
        accelerator.num_processes,
        accelerator.device,
        accelerator.mixed_precision,
    )
    set_seed(cfg["seed"])
    manifest, processor, embedders = prepare_data(cfg, accelerator, out)
    model = bp.create_model(
        cfg["model"]["preset"], modalities=processor.model_modalities(embedders), **cfg["model"].get("overrides", {})
    )
    num_parameters = sum(p.numel() for p in model.parameters())  # before ZeRO-3/FSDP shard them
    if tr.get("gradient_checkpointing"):
        model.activation_checkpointing_enable()
    tokens = TokenCounter(model)
    loss_cfg = dict(cfg["loss"])
    name, fused_view = loss_cfg.pop("name"), loss_cfg.pop("fused_view", True)
    leave_one_out = float(loss_cfg.pop("leave_one_out", 0.0) or 0.0)
    if leave_one_out:  # only passed when used (older ContrastivePretrainer versions lack the keyword)
        loss_cfg["leave_one_out"] = leave_one_out
    # ZeRO and FSDP need every rank to make the same module calls: see RankPadder
    sharded = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    pad_ranks = sharded and accelerator.num_processes > 1
    trainer = (PaddedPretrainer if pad_ranks else ContrastivePretrainer)(
        model, loss=name, fused_view=fused_view, **loss_cfg
    )
    if deepspeed:
        _deepspeed_setup(accelerator, trainer, opt)
    train_ds, collator = training_data(cfg, manifest, processor)
    padder = (
        RankPadder(train_ds, BioPerceiverCollator(processor.modalities), model.modality_names) if pad_ranks else None
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
    samples_before, seconds_before, samples_local = 0, 0.0, 0  # run totals over resumes (model card)
    if args.resume:
        path = latest_checkpoint(ckpt_dir) if args.resume == "latest" else Path(args.resume)
        if path is None:
            raise SystemExit(f"--resume latest: no checkpoint in {ckpt_dir}")
        accelerator.load_state(str(path))
        state = json.loads((path / "trainer_state.json").read_text())
        step, batches_seen = state["step"], state["batches_seen"]
        samples_before, seconds_before = state.get("samples_seen", 0), state.get("train_seconds", 0.0)
        logger.info("resumed from %s at step %d", path, step)
    if trackers:
        init_kwargs = {"wandb": {"name": lg["run_name"]}} if lg.get("run_name") and "wandb" in trackers else {}
        accelerator.init_trackers(project, config=flat_config(cfg), init_kwargs=init_kwargs)

    eval_cfg = cfg.get("eval", {})
    eval_ds = ManifestTorchDataset(
        manifest.split(eval_cfg.get("split", "validation")), processor, train=False, seed=cfg["seed"], on_error="skip"
    )
    eval_collator = BioPerceiverCollator(processor.modalities, on_error="skip")

    def run_totals() -> dict[str, float]:
        """Samples seen (all processes, all run segments) and training seconds so far: one all-reduce."""
        seen = accelerator.reduce(torch.tensor([samples_local], device=accelerator.device), reduction="sum")
        return {
            "samples_seen": samples_before + int(seen.item()),
            "train_seconds": seconds_before + time.perf_counter() - t_start,
        }

    def run_eval(step: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """Every rank runs the same forwards (sharded parameters are gathered collectively); the main one logs."""
        metrics, v, m = ({}, None, None)
        if len(eval_ds):
            with accelerator.autocast():
                metrics, v, m = evaluate(
                    accelerator.unwrap_model(trainer),
                    eval_ds,
                    eval_collator,
                    tr["batch_size"],
                    n_bootstrap=int(eval_cfg.get("n_bootstrap", 1000) or 0),
                    seed=cfg["seed"],
                )
        if accelerator.is_main_process and metrics:
            r1 = {k: round(x, 3) for k, x in metrics.items() if k.startswith("R@1/")}
            logger.info("step %d held-out loss %.4f, R@1 %s", step, metrics.get("eval_loss", float("nan")), r1)
            if trackers:
                accelerator.log({k: x for k, x in metrics.items() if not k.startswith("queries")}, step=step)
        accelerator.wait_for_everyone()
        return metrics, v, m

    n_batches = len(loader)
    accum = tr["gradient_accumulation_steps"]
    history: list[dict] = []
    bar = tqdm(total=opt["max_steps"], initial=step, disable=not accelerator.is_local_main_process, desc="pretrain")
    t_last, samples_since, grad_norm = time.perf_counter(), 0, None
    while step < opt["max_steps"]:
        epoch, skip = divmod(batches_seen, n_batches)
        train_ds.set_epoch(epoch)
        loader.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        trainer.train()
        for batch in epoch_loader:
            batches_seen += 1
            # every sample of the batch was skipped (counted by the collator): all processes skip it together, else
            # from here on their gradient all-reduces would pair different batches and their step counts drift
            n_empty = int(batch is None)
            if accelerator.num_processes > 1:
                flag = torch.tensor([float(n_empty)], device=accelerator.device)
                n_empty = int(accelerator.reduce(flag, reduction="sum").item())
            if n_empty:
                if accelerator.is_main_process:
                    logger.warning(
                        "batch %d: every sample skipped on %d process(es); all skip it", batches_seen, n_empty
                    )
                continue
            extra = {}
            if padder is not None:
                batch, extra = padder(batch), {"num_pad": 1}
            tokens.skip_last = extra.get("num_pad", 0)
            with accelerator.accumulate(trainer):
                outputs = trainer(inputs=batch["inputs"], patient_id=batch["patient_id"], **extra)
                accelerator.backward(outputs["loss"])  # DeepSpeed: also steps (clipping from its JSON) here
                if accelerator.sync_gradients and opt.get("grad_clip"):
                    # clips (DeepSpeed: returns the norm it clipped with); the pre-clip norm is logged
                    grad_norm = accelerator.clip_grad_norm_(trainer.parameters(), opt["grad_clip"])
                optimizer.step()
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                optimizer.zero_grad()
            samples_since += len(batch["sample_id"])
            samples_local += len(batch["sample_id"])
            if batches_seen % accum:
                continue
            step += 1
            bar.update(1)
            if step % lg["log_steps"] == 0 or step == opt["max_steps"]:
                loss = accelerator.reduce(outputs["loss"].detach(), reduction="mean").item()
                # samples and per-modality tokens summed over processes (one all-reduce)
                counts = torch.cat(
                    [tokens.take(accelerator.device), torch.tensor([samples_since], device=accelerator.device)]
                )
                counts = accelerator.reduce(counts, reduction="sum").tolist()
                now = time.perf_counter()
                dt = now - t_last
                rec = {
                    "step": step,
                    "loss": loss,
                    "lr": scheduler.get_last_lr()[0],
                    "temperature": float(outputs["temperature"]),
                    "samples_per_s": counts[-1] / dt,
                    "tokens_per_s": sum(counts[:-1]) / dt,
                    **{f"tokens_per_s/{n}": c / dt for n, c in zip(tokens.names, counts[:-1], strict=True)},
                    **{k: float(v) for k, v in outputs.items() if k.startswith("loss_")},
                }
                if grad_norm is not None:
                    rec["grad_norm"] = float(grad_norm)
                if accelerator.device.type == "cuda":
                    peak = torch.tensor([torch.cuda.max_memory_allocated(accelerator.device) / 2**30])
                    rec["gpu_mem_gib"] = accelerator.gather(peak.to(accelerator.device)).max().item()
                t_last, samples_since = now, 0
                history.append(rec)
                bar.set_postfix(loss=f"{loss:.3f}")
                if trackers:
                    accelerator.log(rec, step=step)
            t_pause = time.perf_counter()  # evaluation and checkpoints do not count against the throughput
            if eval_cfg.get("steps") and step % eval_cfg["steps"] == 0 and step < opt["max_steps"]:
                metrics, _, _ = run_eval(step)
                if metrics:
                    history.append({"step": step, **metrics})
            if step % ck["save_steps"] == 0 or step == opt["max_steps"]:
                save_checkpoint(accelerator, ckpt_dir, step, batches_seen, ck["keep_last"], **run_totals())
                if args.crash_after_step == step:
                    os.kill(os.getpid(), signal.SIGKILL)
            t_last += time.perf_counter() - t_pause
            if step >= opt["max_steps"]:
                break
    bar.close()
    if collator.report.total:
        collator.report.log("pretraining batches")
    final = out / "final"
    metrics, views, masks = run_eval(step)
    if metrics:
        history.append({"step": step, **metrics})
    # The full state dict, gathered from the shards under ZeRO-3/FSDP: a collective, every rank calls it.
    state_dict = accelerator.get_state_dict(trainer)
    totals = run_totals()
    plots: list[Path] = []
    if accelerator.is_main_process:
        (out / "eval_results.json").write_text(json.dumps(metrics, indent=1) + "\n")
        plot_history(history, out / "loss_curves.png")
        plots.append(out / "loss_curves.png")
        unwrapped = accelerator.unwrap_model(trainer)
        names = unwrapped.view_names
        pairs = sorted(
            (k.split("/", 1)[1] for k in metrics if k.startswith("queries/") and not k.endswith("-fused")),
            key=lambda key: -metrics[f"queries/{key}"],
        )
        for key in pairs[:3]:
            a, b = _split_pair(key, names)
            if plot_similarity(views, masks, names, a, b, out / f"similarity_{a}__{b}.png"):
                plots.append(out / f"similarity_{a}__{b}.png")
        backbone = {k[len("model.") :]: v for k, v in state_dict.items() if k.startswith("model.")}
        unwrapped.model.save_pretrained(final, state_dict=backbone)
        processor.save_pretrained(final)
        compute = compute_facts(accelerator, step, totals, cfg)
        try:
            card = pretraining_card(
                config=unwrapped.model.config,
                manifest=manifest,
                run_config=cfg,
                metrics=metrics,
                compute=compute,
                num_parameters=num_parameters,
                eval_split=eval_cfg.get("split", "validation"),
            )
            card.save(final / "README.md")
        except Exception:  # the trained model is saved; a card problem must not lose the run
            logger.exception("could not write the model card %s", final / "README.md")
        (out / "history.json").write_text(json.dumps(history, indent=1) + "\n")
        logger.info("saved the pretrained backbone and processors to %s", final)
    accelerator.wait_for_everyone()
    if trackers:
        accelerator.end_training()
    summary = _summary(out, final, ckpt_dir, plots, trackers, project, lg, accelerator)
    if accelerator.is_main_process:
        print("\n".join(summary), flush=True)
    return {
        "final": str(final),
        "history": history,
        "steps": step,
        "summary": summary,
        "losses_finite": all(math.isfinite(h["loss"]) for h in history if "loss" in h),
    }


def compute_facts(accelerator, steps: int, totals: dict, cfg: dict) -> dict[str, Any]:
    """The model card's "compute used": hardware, processes, precision, wall-clock, steps, samples."""
    device = accelerator.device
    if device.type == "cuda":
        hardware = f"{accelerator.num_processes} x {torch.cuda.get_device_name(device)}"
    else:
        hardware = f"{device.type}: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    tr = cfg["train"]
    seconds = totals["train_seconds"]
    return {
        "hardware": hardware,
        "processes": accelerator.num_processes,
        "machines": int(os.environ.get("WORLD_SIZE", 1)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
        "distributed type": accelerator.distributed_type.value,
        "mixed precision": accelerator.mixed_precision,
        "wall-clock": f"{seconds / 3600:.2f} h ({seconds:.0f} s, whole run incl. evaluation and resumes)",
        "optimizer steps": steps,
        "global batch": tr["batch_size"] * tr["gradient_accumulation_steps"] * accelerator.num_processes,
        "samples seen": totals["samples_seen"],
        "software": f"torch {torch.__version__}, bioperceiver {getattr(bp, '__version__', '?')}",
    }


def _deepspeed_setup(accelerator, trainer: torch.nn.Module, opt: dict) -> None:
    """What the DeepSpeed JSON leaves to this script, before ``prepare``.

    * ``"gradient_clipping": "auto"`` becomes ``optim.grad_clip`` (accelerate would fill in 1.0 whatever the run
      config says); DeepSpeed then clips inside its step and ``clip_grad_norm_`` only reports the norm.
    * DeepSpeed 0.19 broadcasts every parameter from rank 0 as ``p.data.view(torch.uint8)``, which fails on 0-dim
      tensors ("self.dim() cannot be 0 to view Float as Byte"): the losses' learnable temperature and bias are
      scalars, so they get shape ``(1,)`` here (same values and maths; only DeepSpeed checkpoints see the shape).
    * Every rank must make the same module calls (ZeRO's gradient buckets and ZeRO-3's parameter gathers): the
      training batches are padded by :class:`RankPadder` (see ``main``).
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin.is_auto("gradient_clipping"):
        plugin.deepspeed_config["gradient_clipping"] = float(opt.get("grad_clip") or 0.0)
    for name, param in trainer.named_parameters():
        if param.dim() == 0:
            param.data = param.data.reshape(1)
            logger.debug("DeepSpeed: %s reshaped to (1,)", name)


def _summary(out: Path, final: Path, ckpt_dir: Path, plots, trackers, project, lg, accelerator) -> list[str]:
    """Where everything is, printed at the end of the run."""
    ckpts = sorted(ckpt_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    lines = [
        "",
        "=" * 100,
        f"Pretraining finished. Run directory: {out.resolve()}",
        f"  backbone (AutoModel)   {final.resolve()}  (config.json + model.safetensors)",
        f"  processors             {final.resolve()}  (BioPerceiverProcessor.from_pretrained)",
        f"  held-out evaluation    {(out / 'eval_results.json').resolve()}",
        f"  step history           {(out / 'history.json').resolve()}",
    ]
    lines += [f"  plot                   {p.resolve()}" for p in plots]
    lines.append(
        f"  checkpoints            {ckpt_dir.resolve()}  ({', '.join(c.name for c in ckpts) or 'none'}; "
        "continue with --resume latest)"
    )
    if "tensorboard" in trackers:
        logdir = Path(accelerator.logging_dir or out) / project
        lines.append(f"  TensorBoard logs       {logdir.resolve()}")
        lines.append(f"                         tensorboard --logdir {logdir.resolve()}")
    if "wandb" in trackers:
        lines.append(f"  Weights & Biases       project {project!r}, run {lg.get('run_name') or '(auto-named)'}")
    lines += [
        "  load it:  import bioperceiver; from transformers import AutoModel; "
        f"AutoModel.from_pretrained({str(final)!r})",
        "=" * 100,
    ]
    return lines


def _split_pair(key: str, names: list[str]) -> tuple[str, str]:
    for a in names:
        if key.startswith(a + "-") and key[len(a) + 1 :] in names:
            return a, key[len(a) + 1 :]
    raise ValueError(key)


if __name__ == "__main__":
    main()
