"""Pretraining step throughput on real demo-cohort batches: BioPerceiver vs. ``transformers.PerceiverModel``.

What one **step** is (both peers, measured alternately in the same process):

* **ours**: ``ContrastivePretrainer`` (``bioperceiver.training``) around ``bioperceiver.create_model(preset,
  modalities=processor.model_modalities(embedders))``, exactly as ``pretrain/run_pretrain.py`` builds them:
  the modality embedders, the fused view (all present modalities) and one view per present modality (each a
  pass of the shared encoder over that modality's tokens, for the samples that have it), the projection head,
  the CLIP loss over every pair of views; then backward, gradient clipping (``optim.grad_clip``) and an AdamW step
  over ``parameter_groups`` (lr, betas, weight decay of the run config).
* **peer**: the same step with ``transformers.PerceiverModel`` as the encoder. A copy of our modality
  embedders (same initial weights) turns the same collated batch into tokens inside the step, then a
  ``PerceiverModel`` with our encoder's latent count, widths, heads, layers and MLP widening (built by
  ``benchmarks/backbone.py``) runs the same view structure as ours (one fused pass over every token with the same
  keep-mask, one pass per present modality over the rows that have it), mean-pools the latents, and applies a copy
  of the same projection head, the same CLIP loss, clipping and AdamW (same parameter groups). Embedders, views,
  shapes, masks, head, loss and optimiser are identical; the only difference is the encoder implementation, so
  the ratio is the end-to-end effect of our encoder on the real pretraining step.
* **ours, embedders only**: forward + backward of our embedders alone (a squared-mean of their tokens), timed
  in the same rotation, to show how much of either step is embedding work (identical in both), so that the
  encoder's share of the difference can be read off.

Inputs are real batches: the demo cohort (``bioperceiver.data.recipes.demo``) with processors fitted on the
train split, loaded by ``bioperceiver.training.prepare_data`` from the run config (``pretrain/configs/demo.yaml``:
``outputs/demo`` is reused when ``make demo`` has built it, otherwise everything is built under
``outputs/bench_pretrain_step``); ``--batches`` batches of ``train.batch_size`` are drawn by the same DataLoader
(shuffled train split, modality dropout of the config) and collated **before** timing, so data loading is not in
the step time (``benchmarks/data_pipeline.py`` measures it).

Timing: one warm-up round per variant, then ``--repeats`` rounds; a round is one step on each of the fixed
batches; the variants rotate order every round, so a slow spell of the shared machine does not fall on one peer
only. Reported: the best round's time per step (round time / batches; best of N alternating rounds, as in the
other benchmarks here, because noise on a shared machine only ever adds time) and the median round; samples/s and
real input tokens/s from the best round. Real tokens are the tokens the embedders keep (keep-mask True): text
tokens by attention mask, image patches of present images, omics genes kept, signal patches of present channels,
tabular features present; padding and absent modalities are not counted. On CUDA every step ends with
``torch.cuda.synchronize``.

FLOPs (analytic, matmuls only, on the executed padded shapes): per encoder pass of ``b`` rows and ``n`` tokens
with ``M`` latents of width ``D``, input width ``d``, ``L`` self-attention layers, MLP widening ``w_c``/``w_s``:
cross-attention ``b (4 M D^2 + 4 n d D + 4 M n D + 4 w_c M D^2)``, each self-attention layer
``b (8 M D^2 + 4 M^2 D + 4 w_s M D^2)``; plus the embedders' linear/conv layers, the projection head and the
loss's logits. A training step is counted as 3x the forward, less 1x for layers fed with constants (no input
gradient). The analytic forward is checked against
``torch.utils.flop_counter`` on the first batch (ours on its explicit-softmax attention path, which has the same
matmuls as the fused kernel the counter cannot see on CPU). Achieved FLOP/s = step FLOPs / step time; MFU =
achieved / the device's dense matmul rate measured in the same run (``backbone.measured_peak_flops``: fp32 on
CPU, bf16 on GPU).

Run (the numbers in benchmarks/RESULTS.md)::

    .venv/bin/python benchmarks/pretrain_step.py                                   # demo preset, CPU, ~1 min
    .venv/bin/python benchmarks/pretrain_step.py --quick                           # smoke run
    .venv/bin/python benchmarks/pretrain_step.py --device cuda --dtype bf16 --preset bioperceiver_base  # untested

The GPU path (``--device cuda --dtype bf16``: autocast bf16 for both peers, ``torch.cuda.synchronize`` around
every step, peak memory per variant, MFU against a measured 8192^3 bf16 matmul) has not been run: no GPU was lent
to the task that wrote this script.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import backbone  # noqa: E402  (benchmarks/backbone.py: the HF peer, the matmul peak)
import data_pipeline  # noqa: E402  (benchmarks/data_pipeline.py: machine description)

from bioperceiver.training import PretrainConfig, load_run_config, prepare_data, training_data  # noqa: E402

logger = logging.getLogger("benchmarks.pretrain_step")
VARIANTS = ("ours", "peer", "ours_embedders")
LABELS = {
    "ours": "BioPerceiver (ContrastivePretrainer)",
    "peer": "same step, HF PerceiverModel encoder",
    "ours_embedders": "ours, embedders only",
}


# ---- data ---------------------------------------------------------------------------------------------------------
def load_batches(cfg: PretrainConfig, n_batches: int) -> tuple[Any, dict, list[dict]]:
    """Processor, embedder settings and ``n_batches`` collated training batches, as run_pretrain.py makes them."""
    from torch.utils.data import DataLoader

    stub = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)  # one process, no Accelerator
    out = Path(cfg.output_dir)
    manifest, processor, embedders = prepare_data(cfg, stub, out, settings_root=ROOT)
    train_ds, collator = training_data(cfg, manifest, processor)
    torch.manual_seed(cfg.seed)
    loader = DataLoader(train_ds, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True, collate_fn=collator)
    batches = [b for b in itertools.islice(loader, n_batches) if b is not None]
    if not batches:
        raise SystemExit("no batch could be collated from the train split")
    return processor, embedders, batches


def to_device(x: Any, device: str) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def token_stats(model, batches: list[dict]) -> list[dict[str, Any]]:
    """Per batch and modality: real tokens (keep-mask True), samples that have it, padded slots per row; and the
    pairs of views (present modalities + the fused view) that at least one sample of the batch has both of."""
    out = []
    with torch.no_grad():
        for batch in batches:
            emb = model.embed(batch["inputs"])
            stats: dict[str, Any] = {
                name: {"real": int(keep.sum()), "samples": int(keep.any(1).sum()), "slots": int(keep.shape[1])}
                for name, (_, keep) in emb.items()
            }
            has = torch.stack([keep.any(1) for _, keep in emb.values()], dim=1)  # (B, modalities in the batch)
            has = torch.cat([has, has.any(1, keepdim=True)], dim=1)  # + the fused view
            both = (has[:, :, None] & has[:, None, :]).any(0)
            stats["_view_pairs"] = int(both.triu(diagonal=1).sum())
            out.append(stats)
    return out


# ---- the peer -----------------------------------------------------------------------------------------------------
class PerceiverPeer(nn.Module):
    """``transformers.PerceiverModel`` in our contrastive step: same views, head, loss (see the module docstring)."""

    def __init__(self, trainer, loss_kwargs: dict) -> None:
        from bioperceiver.training import build_loss

        super().__init__()
        cfg = trainer.model.config
        if cfg.num_cross_attention_layers != 1 or cfg.num_blocks != 1:
            raise ValueError("transformers.PerceiverModel has one cross-attention and one block; pick such a preset")
        backbone.ARCH.clear()
        backbone.ARCH.update({key: getattr(cfg, key) for key in backbone.ENCODER_FIELDS})
        self.encoder = backbone.build("hf_perceiver")
        self.embedders = copy.deepcopy(trainer.model.embedders)  # our embedders, same initial weights
        self.modality_names = list(cfg.modality_names)
        self.projection = copy.deepcopy(trainer.projection)
        self.loss_fn = build_loss("clip", trainer.view_names, **loss_kwargs)

    def pool(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return backbone.forward("hf_perceiver", self.encoder, tokens, keep).mean(dim=1)  # (b, D)

    def forward(self, inputs: dict[str, dict[str, torch.Tensor]], patient_id: list[str]) -> dict:
        # the same passes as BioPerceiverModel.forward(return_modality_embeddings=True) + ContrastivePretrainer
        from bioperceiver.losses import patient_index

        embedded = {n: self.embedders[n](inputs[n]) for n in self.modality_names if inputs.get(n) is not None}
        names = list(embedded)
        tokens = torch.cat([embedded[n][0] for n in names], dim=1)
        keep = torch.cat([embedded[n][1] for n in names], dim=1)
        b, k_all = tokens.shape[0], len(self.modality_names)
        mask = torch.zeros(b, k_all, dtype=torch.bool, device=tokens.device)
        for name in names:
            mask[:, self.modality_names.index(name)] = embedded[name][1].any(dim=1)
        pooled = self.pool(tokens, keep)
        views = pooled.new_zeros(b, k_all, pooled.shape[-1])
        for name in names:
            k = self.modality_names.index(name)
            rows = mask[:, k].nonzero().flatten()
            if rows.numel() == 0:
                continue
            view_tokens, view_keep = embedded[name]
            views = views.index_put((rows, torch.full_like(rows, k)), self.pool(view_tokens[rows], view_keep[rows]))
        views = torch.cat([views, pooled[:, None]], dim=1)
        mask = torch.cat([mask, mask.any(dim=1, keepdim=True)], dim=1)
        pid = patient_index(patient_id, device=views.device)
        return self.loss_fn(self.projection(views), mask, pid)


# ---- FLOPs --------------------------------------------------------------------------------------------------------
def encoder_flops(cfg, b: int, n: int) -> dict[str, float]:
    """Forward matmul FLOPs of one encoder pass over ``b`` rows of ``n`` (padded) tokens."""
    m, d, d_in = cfg.num_latents, cfg.d_latents, cfg.d_input
    wc, ws = cfg.cross_attention_widening_factor, cfg.self_attention_widening_factor
    calls = cfg.num_cross_attention_layers * (cfg.num_blocks if cfg.repeat_cross_attention else 1)
    cross = b * (4 * m * d * d + 4 * n * d_in * d + 4 * m * n * d + 4 * wc * m * d * d) * calls
    layer = b * (8 * m * d * d + 4 * m * m * d + 4 * ws * m * d * d)
    return {"cross_attention": cross, "self_attention": layer * cfg.num_self_attention_layers * cfg.num_blocks}


def embedder_flops(model, inputs: dict[str, dict[str, torch.Tensor]]) -> tuple[float, float]:
    """Forward matmul FLOPs of the embedders' linear / conv layers (lookups and additions are not counted), and the
    part of them done by layers fed with constants (raw pixels / signal samples, Fourier features of positions):
    their backward has no input gradient, so it costs 1x their forward instead of 2x. Each kind's embedder knows
    its formula (``ModalityEmbedder.matmul_flops``)."""
    total = constant_input = 0.0
    for name, arrays in inputs.items():
        flops, constant = model.embedders[name].matmul_flops(arrays)
        total, constant_input = total + flops, constant_input + constant
    return total, constant_input


def step_flops(trainer, batch: dict, stats: dict[str, dict[str, int]]) -> dict[str, float]:
    """Forward FLOPs of one contrastive step by component (the peer's are the same without ``embedders``)."""
    cfg = trainer.model.config
    b = len(batch["sample_id"])
    out = {"embedders": embedder_flops(trainer.model, batch["inputs"])[0]}
    modalities = [s for name, s in stats.items() if not name.startswith("_")]
    fused = encoder_flops(cfg, b, sum(s["slots"] for s in modalities))
    views = {"cross_attention": 0.0, "self_attention": 0.0}
    for s in modalities:
        if s["samples"]:
            for key, value in encoder_flops(cfg, s["samples"], s["slots"]).items():
                views[key] += value
    out.update({f"{k} (fused view)": v for k, v in fused.items()})
    out.update({f"{k} (modality views)": v for k, v in views.items()})
    n_views = len(trainer.view_names)
    p = cfg.projection_dim
    out["projection head"] = 2 * b * n_views * (cfg.d_latents**2 + cfg.d_latents * p)
    out["loss logits"] = stats["_view_pairs"] * 2 * 2 * b * b * p  # both directions of every pair with a sample
    return out


def counted_flops(trainer, peer, batch: dict, autocast) -> dict[str, dict[str, float]]:
    """``torch.utils.flop_counter`` forward and forward + backward FLOPs on one batch, for the analytic check."""
    from torch.utils.flop_counter import FlopCounterMode

    from bioperceiver.layers import attention

    original = attention._attend

    def explicit(q, k, v, keep_mask, dropout_p, need_weights):
        return original(q, k, v, keep_mask, dropout_p, True)

    def addmm_(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs):  # the counter skips in-place addmm_
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    inplace = {torch.ops.aten.addmm_: addmm_}  # used by our cross-attention's backward (grad_y += gv @ w_v)

    out = {}
    for name in ("ours", "peer"):
        counts = {}
        for phase in ("forward", "forward+backward"):
            with (
                mock.patch.object(attention, "_attend", explicit),
                FlopCounterMode(display=False, custom_mapping=inplace) as counter,
            ):
                with autocast():
                    module = trainer if name == "ours" else peer
                    loss = module(inputs=batch["inputs"], patient_id=batch["patient_id"])["loss"]
                if phase == "forward+backward":
                    loss.backward()
            counts[phase] = counter.get_total_flops()
            trainer.zero_grad(set_to_none=True)
            peer.zero_grad(set_to_none=True)
        out[name] = counts
    return out


# ---- timing -------------------------------------------------------------------------------------------------------
def make_steps(trainer, peer, batches, cfg, device: str, dtype: str) -> dict[str, Any]:
    from bioperceiver.training import parameter_groups

    opt_cfg = cfg.optim

    def adamw(module):
        return torch.optim.AdamW(
            parameter_groups(module, opt_cfg.weight_decay), lr=opt_cfg.lr, betas=tuple(opt_cfg.betas)
        )

    opt_ours, opt_peer = adamw(trainer), adamw(peer)
    clip = opt_cfg.grad_clip

    def autocast():
        return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def finish(module, optimizer, loss):
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
        optimizer.step()

    def ours(i: int) -> None:
        opt_ours.zero_grad(set_to_none=True)
        with autocast():
            out = trainer(inputs=batches[i]["inputs"], patient_id=batches[i]["patient_id"])
        finish(trainer, opt_ours, out["loss"])

    def peer_step(i: int) -> None:
        opt_peer.zero_grad(set_to_none=True)
        with autocast():
            out = peer(inputs=batches[i]["inputs"], patient_id=batches[i]["patient_id"])
        finish(peer, opt_peer, out["loss"])

    def embedders_only(i: int) -> None:
        trainer.zero_grad(set_to_none=True)
        with autocast():
            emb = trainer.model.embed(batches[i]["inputs"])
            loss = sum(t.float().pow(2).mean() for t, _ in emb.values())
        loss.backward()

    return {"ours": ours, "peer": peer_step, "ours_embedders": embedders_only, "autocast": autocast}


def run_round(step, n: int, device: str) -> list[float]:
    times = []
    for i in range(n):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(i)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


# ---- main ---------------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "pretrain" / "configs" / "demo.yaml"), help="run config")
    parser.add_argument("--preset", default=None, help="model preset (default: the run config's, the demo's debug)")
    parser.add_argument("--batches", type=int, default=16, help="fixed pre-collated batches (one round = one each)")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds per variant (rotating order)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 batches, 2 rounds")
    parser.add_argument("--output", type=Path, default=None, help="JSON results (default benchmarks/results/)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.repeats = 2, 2
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("bioperceiver").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    wall = time.perf_counter()
    load_start = os.getloadavg()  # the machine may be shared: the 1/5/15-min load averages go into the record

    import bioperceiver as bp
    from bioperceiver.training import ContrastivePretrainer

    # the demo run config; outputs/demo is reused when `make demo` built it, else a cache folder of our own
    demo = ROOT / "outputs" / "demo"
    base = demo if (demo / "cohort" / "manifest.parquet").exists() else ROOT / "outputs" / "bench_pretrain_step"
    overrides = [f"data.manifest={base / 'cohort' / 'manifest.parquet'}", "data.build_demo_cohort=true"]
    overrides.append(f"data.processor_dir={base / 'model'}")
    overrides.append(f"output_dir={ROOT / 'outputs' / 'bench_pretrain_step'}")
    cfg = load_run_config(args.config, overrides)
    preset = args.preset or cfg.model.preset
    start = time.perf_counter()
    processor, embedders, batches = load_batches(cfg, args.batches)
    setup_s = time.perf_counter() - start
    logger.info(
        "%d batches of %d collated in %.1f s (data: %s)", len(batches), len(batches[0]["sample_id"]), setup_s, base
    )

    torch.manual_seed(cfg.seed)
    model = bp.create_model(preset, modalities=processor.model_modalities(embedders), **cfg.model.overrides)
    loss_cfg = cfg.loss
    if loss_cfg.name != "clip" or not loss_cfg.fused_view or loss_cfg.leave_one_out:
        raise SystemExit("the peer reproduces the CLIP loss with a fused view and no leave-one-out term only")
    loss_kwargs = {"init_temperature": 0.07, **loss_cfg.loss_kwargs()}
    trainer = ContrastivePretrainer(model, loss="clip", fused_view=True, **loss_kwargs)
    peer = PerceiverPeer(trainer, loss_kwargs)
    trainer.to(args.device).train()
    peer.to(args.device).train()
    batches = [to_device(b, args.device) for b in batches]
    stats = token_stats(model, batches)
    steps = make_steps(trainer, peer, batches, cfg, args.device, args.dtype)
    n = len(batches)

    flops = [step_flops(trainer, b, s) for b, s in zip(batches, stats)]
    # forward FLOPs per batch; a step is 3x the forward, less 1x for layers fed with constants (no input gradient)
    fwd_ours = [sum(f.values()) for f in flops]
    const = [embedder_flops(model, x["inputs"])[1] for x in batches]
    fwd = {"ours": statistics.mean(fwd_ours), "peer": statistics.mean(fwd_ours)}  # same matmuls in both
    step = dict.fromkeys(fwd, statistics.mean(3 * f - c for f, c in zip(fwd_ours, const)))
    counted = counted_flops(trainer, peer, batches[0], steps["autocast"])
    analytic0 = {k: {"forward": fwd_ours[0], "forward+backward": 3 * fwd_ours[0] - const[0]} for k in fwd}
    for name in ("ours", "peer"):
        logger.info(
            "%s GFLOPs, batch 0: forward analytic %.4f / counted %.4f; forward+backward analytic %.4f / counted %.4f",
            name,
            analytic0[name]["forward"] / 1e9,
            counted[name]["forward"] / 1e9,
            analytic0[name]["forward+backward"] / 1e9,
            counted[name]["forward+backward"] / 1e9,
        )

    # warm-up round of every variant (allocations, AdamW state), then rotating timed rounds
    for name in VARIANTS:
        run_round(steps[name], n, args.device)
    rounds: dict[str, list[list[float]]] = {name: [] for name in VARIANTS}
    order_log = []
    peak_mem: dict[str, int] = {}
    for r in range(args.repeats):
        order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]
        for name in order:
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()  # both models, their AdamW states, the batches
            rounds[name].append(run_round(steps[name], n, args.device))
            if args.device == "cuda":
                peak_mem[name] = max(peak_mem.get(name, 0), torch.cuda.max_memory_allocated() - resident)
            order_log.append(name)
        logger.info(
            "round %d/%d: %s",
            r + 1,
            args.repeats,
            "  ".join(f"{k} {1e3 * sum(v[-1]) / n:.1f} ms/step" for k, v in rounds.items()),
        )

    peak = backbone.measured_peak_flops(args.device, args.dtype)
    b = statistics.mean(len(x["sample_id"]) for x in batches)
    names = list(processor.model_modalities(embedders))
    real = {m: statistics.mean(s.get(m, {}).get("real", 0) for s in stats) for m in names}
    present = {m: statistics.mean(s.get(m, {}).get("samples", 0) for s in stats) for m in names}
    slots = {m: statistics.mean(s.get(m, {}).get("slots", 0) for s in stats) for m in names}
    tokens_real = sum(real.values())
    results: dict[str, Any] = {}
    for name in VARIANTS:
        per_step = [sum(t) / n for t in rounds[name]]
        t = min(per_step)
        e = results[name] = {
            "step_s": t,
            "step_s_median": statistics.median(per_step),
            "step_s_rounds": per_step,
            "step_s_spread": [min(per_step), max(per_step)],
            "samples_per_s": b / t,
            "step_times_s": rounds[name],
        }
        if name in fwd:
            e.update(
                tokens_per_s=tokens_real / t,
                tokens_per_s_by_modality={m: real[m] / t for m in names},
                forward_flops=fwd[name],
                step_flops=step[name],
                step_flops_3x_forward=3 * fwd[name],
                achieved_flops_per_s=step[name] / t,
                mfu=step[name] / t / peak,
            )
        if name in peak_mem:
            e["peak_memory_bytes"] = peak_mem[name]
    params = {
        "ours": sum(p.numel() for p in trainer.parameters()),
        "ours_encoder": sum(p.numel() for p in model.encoder.parameters()),
        "ours_embedders": sum(p.numel() for p in model.embedders.parameters()),
        "peer": sum(p.numel() for p in peer.parameters()),
        "peer_encoder": sum(p.numel() for p in peer.encoder.parameters()),
    }
    breakdown = {k: statistics.mean(f[k] for f in flops) for k in flops[0]}
    machine = data_pipeline.machine()
    machine["versions"]["transformers"] = __import__("transformers").__version__  # the peer's version
    out = {
        "preset": preset,
        "config": args.config,
        "data": str(base),
        "device": args.device,
        "dtype": args.dtype,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "threads": torch.get_num_threads(),
        "batches": n,
        "batch_size": b,
        "repeats": args.repeats,
        "modality_dropout": cfg.data.modality_dropout,
        "optim": cfg.to_dict()["optim"],
        "arch": dict(backbone.ARCH),
        "params": params,
        "machine": machine,
        "peak_flops_per_s": peak,
        "tokens_per_sample": {
            "real": tokens_real / b,
            "padded_fused_row": sum(slots.values()),
            "encoder_token_slots_per_step": sum(slots.values()) * b + sum(slots[m] * present[m] for m in names),
        },
        "modalities": {
            m: {
                "kind": processor.modalities[m],
                "samples_per_batch": present[m],
                "real_tokens_per_batch": real[m],
                "real_tokens_per_present_sample": real[m] / present[m] if present[m] else 0.0,
                "padded_slots_per_row": slots[m],
            }
            for m in names
        },
        "forward_flops_breakdown": breakdown,
        "flops_check_batch0": {"analytic": analytic0, "counted": counted},
        "results": results,
        "order": order_log,
        "setup_s": setup_s,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
    }
    out["report"] = report(out)
    out["wall_s"] = time.perf_counter() - wall
    print(out["report"])
    print(f"\nwall time {out['wall_s']:.0f} s")
    is_demo = (args.device, args.dtype, preset) == ("cpu", "fp32", cfg.model.preset)
    default = "pretrain_step.json" if is_demo else f"pretrain_step_{preset}_{args.device}_{args.dtype}.json"
    if args.quick:
        default = default.replace(".json", "_quick.json")
    output = args.output or HERE / "results" / default
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(out, indent=1) + "\n")
    plot(out, output.with_suffix(".png"))
    logger.info("wrote %s and %s", output, output.with_suffix(".png"))
    return out


def report(r: dict) -> str:
    ours, peer, emb = (r["results"][k] for k in VARIANTS)
    m = r["machine"]
    dev = r["gpu"] or f"{m['cpu']}, {m['usable_cpus']} usable CPUs, {r['threads']} torch threads"
    lines = [
        f"preset {r['preset']} | {r['device']} {r['dtype']} | {dev} | torch {m['versions'].get('torch')}",
        f"{r['batches']} demo batches of {r['batch_size']:g} (modality dropout {r['modality_dropout']:g}), "
        f"{r['repeats']} rounds per variant (rotating order); time per step of the best round unless marked median",
        f"encoder: {r['arch']}",
        f"load average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in r['loadavg_start'])}, at end "
        f"{'/'.join(f'{x:.2f}' for x in r['loadavg_end'])} (on {m['usable_cpus']} usable CPUs)",
        "",
        f"| | {LABELS['ours']} | {LABELS['peer']} | ratio ours/peer |",
        "|---|---:|---:|---:|",
    ]

    def row(label, a, b, fmt, ratio=True):
        lines.append(
            f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {a / b:.2f}x |"
            if ratio
            else f"| {label} | {fmt.format(a)} | {fmt.format(b)} | |"
        )

    row("step time, ms (best round)", 1e3 * ours["step_s"], 1e3 * peer["step_s"], "{:,.1f}")
    row("step time, ms (median round)", 1e3 * ours["step_s_median"], 1e3 * peer["step_s_median"], "{:,.1f}")
    lines.append(
        f"| step time spread over rounds, ms | {1e3 * ours['step_s_spread'][0]:,.1f}-"
        f"{1e3 * ours['step_s_spread'][1]:,.1f} | {1e3 * peer['step_s_spread'][0]:,.1f}-"
        f"{1e3 * peer['step_s_spread'][1]:,.1f} | |"
    )
    row("samples/s", ours["samples_per_s"], peer["samples_per_s"], "{:,.1f}")
    row("real input tokens/s", ours["tokens_per_s"], peer["tokens_per_s"], "{:,.0f}")
    row("parameters (trained by AdamW)", r["params"]["ours"], r["params"]["peer"], "{:,}")
    row("model GFLOPs per step (analytic fwd + bwd)", ours["step_flops"] / 1e9, peer["step_flops"] / 1e9, "{:,.3f}")
    row("achieved GFLOP/s", ours["achieved_flops_per_s"] / 1e9, peer["achieved_flops_per_s"] / 1e9, "{:,.2f}")
    lines.append(f"| MFU (vs measured {r['dtype']} matmul peak) | {ours['mfu']:.2%} | {peer['mfu']:.2%} | |")
    if "peak_memory_bytes" in ours:
        row(
            "peak GPU memory of the step above resident state (models, AdamW, batches), MiB",
            ours["peak_memory_bytes"] / 2**20,
            peer["peak_memory_bytes"] / 2**20,
            "{:,.0f}",
        )
    lines += [
        "",
        f"embedders only (ours, fwd+bwd, no optimiser; the same work is in both steps): {1e3 * emb['step_s']:,.1f} "
        f"ms/step = {emb['step_s'] / ours['step_s']:.0%} of our step, {emb['step_s'] / peer['step_s']:.0%} of the "
        f"peer's; the rest (encoder passes, head, loss, optimiser): ours {1e3 * (ours['step_s'] - emb['step_s']):,.1f}"
        f" ms, peer {1e3 * (peer['step_s'] - emb['step_s']):,.1f} ms "
        f"({(ours['step_s'] - emb['step_s']) / (peer['step_s'] - emb['step_s']):.2f}x)",
        f"device matmul peak ({r['dtype']}, measured in this run): {r['peak_flops_per_s'] / 1e9:,.1f} GFLOP/s",
        "",
        "| modality | kind | samples with it per batch | real tokens per present sample | padded slots per row "
        "| ours real tokens/s | peer real tokens/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, e in r["modalities"].items():
        lines.append(
            f"| {name} | {e['kind']} | {e['samples_per_batch']:.1f} | {e['real_tokens_per_present_sample']:,.1f} | "
            f"{e['padded_slots_per_row']:,.1f} | {ours['tokens_per_s_by_modality'][name]:,.0f} | "
            f"{peer['tokens_per_s_by_modality'][name]:,.0f} |"
        )
    t = r["tokens_per_sample"]
    lines += [
        f"| **all** | | | {t['real']:,.1f} per sample | {t['padded_fused_row']:,.1f} | {ours['tokens_per_s']:,.0f} | "
        f"{peer['tokens_per_s']:,.0f} |",
        "",
        f"encoder token slots per step (fused view + modality views, padding included): "
        f"{t['encoder_token_slots_per_step']:,.0f} for {t['real'] * r['batch_size']:,.0f} real tokens",
        "",
        "| forward FLOPs per step (analytic, mean over batches) | GFLOPs | share |",
        "|---|---:|---:|",
    ]
    total = sum(r["forward_flops_breakdown"].values())
    for k, v in r["forward_flops_breakdown"].items():
        lines.append(f"| {k} | {v / 1e9:,.4f} | {v / total:.1%} |")
    c = r["flops_check_batch0"]
    a, n = c["analytic"], c["counted"]
    lines += [
        "",
        "Step FLOPs = 3 x forward, less 1 x the forward of layers fed with constants (raw pixels and signal samples, "
        "Fourier position features: no input gradient); the plain 3 x forward would be "
        f"{ours['step_flops_3x_forward'] / ours['step_flops']:.2f}x ours. Check on batch 0 against "
        "torch.utils.flop_counter (ours on the explicit-softmax attention path, in-place addmm_ counted), "
        "analytic / counted: forward ours "
        f"{a['ours']['forward'] / n['ours']['forward']:.3f}, peer {a['peer']['forward'] / n['peer']['forward']:.3f}; "
        f"forward + backward ours {a['ours']['forward+backward'] / n['ours']['forward+backward']:.3f}, peer "
        f"{a['peer']['forward+backward'] / n['peer']['forward+backward']:.3f}.",
    ]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name in VARIANTS:
        rounds = r["results"][name]["step_s_rounds"]
        a.plot(range(1, len(rounds) + 1), [1e3 * x for x in rounds], "o-", label=LABELS[name])
    a.set_xlabel("timed round (rotating order)")
    a.set_ylabel("ms per step (round mean)")
    a.set_ylim(bottom=0)
    a.set_title(f"{r['preset']}, {r['device']} {r['dtype']}: step time per round")
    a.legend(fontsize=8)
    parts = r["forward_flops_breakdown"]
    b.barh(list(parts), [v / 1e9 for v in parts.values()])
    b.invert_yaxis()
    b.set_xlabel("forward GFLOPs per step (analytic)")
    b.set_title("where our step's FLOPs go")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- padded vs packed (issue 16) ------------------------------------------------------------------------------------
# ``--layouts``: the same pretraining step (ContrastivePretrainer, CLIP + fused view, backward, AdamW) with the padded
# encoder passes (default) and the packed ones (``train.packed``), on the demo mix (real collated batches) and on a
# heavy synthetic mix (15k genes + 2k-token note + 12-lead ECG, 75% presence each). Every variant runs in a fresh
# process (spawn) so its peak resident memory (``ru_maxrss`` less the RSS just before the first step) is its own.
# ``--grad_cache``: one step on a large contrastive batch, whole vs token-budget micro-batches with gradient caching.


def heavy_modalities() -> dict[str, dict]:
    return {
        "omics": {"kind": "omics", "num_genes": 20000, "num_value_bands": 8},
        "text_note": {"kind": "text", "vocab_size": 8000, "max_position_embeddings": 2048},
        "signal_ecg": {"kind": "signal", "patch_size": 50, "num_channels": 12, "num_time_bands": 8},
    }


def heavy_batches(n_batches: int, b: int, seed: int = 0) -> list[dict]:
    """Synthetic heavy-mix batches: every modality present for ~75% of samples (each sample keeps one at least),
    ragged note lengths (200-2048 tokens) and gene counts (5k-15k kept)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        present = torch.rand(b, 3, generator=g) < 0.75
        present[torch.arange(b), torch.randint(0, 3, (b,), generator=g)] = True
        genes = torch.randint(5000, 15001, (b,), generator=g)
        gene_mask = (torch.arange(15000)[None] < genes[:, None]) & present[:, :1]
        words = torch.randint(200, 2049, (b,), generator=g)
        text_mask = (torch.arange(2048)[None] < words[:, None]) & present[:, 1:2]
        inputs = {
            "omics": {
                "gene_ids": torch.randint(0, 20000, (b, 15000), generator=g),
                "values": torch.randn(b, 15000, generator=g),
                "mask": gene_mask,
            },
            "text_note": {"input_ids": torch.randint(1, 8000, (b, 2048), generator=g), "attention_mask": text_mask},
            "signal_ecg": {
                "values": torch.randn(b, 12, 5000, generator=g),
                "channel_ids": torch.arange(12).expand(b, 12).clone(),
                "channel_mask": present[:, 2:3].expand(b, 12).clone(),
                "sampling_rate": torch.full((b,), 500.0),
            },
        }
        out.append({"inputs": inputs, "patient_id": [f"p{i}" for i in range(b)], "sample_id": list(range(b))})
    return out


def computed_tokens(model, batches: list[dict]) -> dict[str, float]:
    """Token slots the encoder's cross-attention processes per step, padded and packed, and the real ones: padded =
    fused pass ``B x N`` + each modality's pass ``b_m x N_m``; packed = real tokens of the same views."""
    padded = packed = 0
    with torch.no_grad():
        for batch in batches:
            emb = model.embed(batch["inputs"])
            keeps = [keep for _, keep in emb.values()]
            padded += sum(k.shape[1] for k in keeps) * keeps[0].shape[0]
            packed += sum(int(k.sum()) for k in keeps)  # fused view
            for keep in keeps:
                rows = keep.any(1)
                padded += int(rows.sum()) * keep.shape[1]
                packed += int(keep.sum())  # that modality's view
    return {"padded_slots": padded, "real_tokens": packed}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _layout_child(job: dict, queue) -> None:
    """One variant in a fresh process: build, warm up once, time ``repeats`` rounds over the batches."""
    import resource

    torch.set_num_threads(job["threads"])
    logging.getLogger("bioperceiver").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import bioperceiver as bp
    from bioperceiver.data.sampler import token_budget_chunks
    from bioperceiver.training import ContrastivePretrainer
    from bioperceiver.training.pretraining import parameter_groups

    if job["mix"] == "demo":
        cfg = load_run_config(job["config"], job["overrides"])
        processor, embedders, batches = load_batches(cfg, job["batches"])
        modalities = processor.model_modalities(embedders)
    else:
        modalities = heavy_modalities()
        batches = heavy_batches(job["batches"], job["batch_size"])
    torch.manual_seed(0)
    model = bp.create_model(job["preset"], modalities=modalities).set_packed(job["packed"])
    trainer = ContrastivePretrainer(model, loss="clip").train()
    opt = torch.optim.AdamW(parameter_groups(trainer, 0.05), lr=1e-4)
    budget = job.get("max_tokens")

    def chunks_of(batch):
        """Token-budget micro-batches from the collator's per-sample token counts (what the training loop uses).
        Computed before the measurement: an earlier version embedded the whole batch *with* a graph inside every
        step to count tokens, which put a whole-batch activation into the gradient-caching step's peak memory."""
        counts = batch.get("num_tokens")
        if counts is None:
            with torch.no_grad():
                counts = [int(c) for c in sum(keep.sum(1) for _, keep in model.embed(batch["inputs"]).values())]
        return token_budget_chunks(counts, budget)

    chunks = {id(b): chunks_of(b) for b in batches} if budget else {}

    def step(batch):
        if budget:
            trainer.grad_cached_step(batch["inputs"], batch["patient_id"], chunks[id(batch)])
        else:
            trainer(batch["inputs"], batch["patient_id"])["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    tokens = computed_tokens(model, batches)
    base = _rss_mib()
    step(batches[0])  # warm-up (AdamW state, allocator)
    times = []
    for _ in range(job["repeats"]):
        t = time.perf_counter()
        for batch in batches:
            step(batch)
        times.append((time.perf_counter() - t) / len(batches))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    n = len(batches[0]["patient_id"])
    queue.put(
        {
            "s_per_step_best": min(times),
            "s_per_step_median": statistics.median(times),
            "samples_per_s": n / min(times),
            "peak_rss_above_setup_mib": peak - base,
            "batch_size": n,
            **tokens,
        }
    )


def _spawn(job: dict) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_layout_child, args=(job, queue))
    proc.start()
    result = queue.get(timeout=3600)
    proc.join()
    return result


def layouts_main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="padded vs packed pretraining step; gradient-caching memory")
    parser.add_argument("--layouts", action="store_true")
    parser.add_argument("--config", default=str(ROOT / "pretrain" / "configs" / "demo.yaml"))
    parser.add_argument("--preset", default="bioperceiver_debug")
    parser.add_argument("--mixes", default="demo,heavy", help="comma list of demo, heavy")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--heavy_batch_size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grad_cache_batch", type=int, default=0, help="also: one step on this many demo samples")
    parser.add_argument("--max_tokens", type=int, default=4096, help="micro-batch token budget (gradient caching)")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "pretrain_step_layouts.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    demo = ROOT / "outputs" / "demo"
    base = demo if (demo / "cohort" / "manifest.parquet").exists() else ROOT / "outputs" / "bench_pretrain_step"
    overrides = [
        f"data.manifest={base / 'cohort' / 'manifest.parquet'}",
        "data.build_demo_cohort=true",
        f"data.processor_dir={base / 'model'}",
        f"output_dir={ROOT / 'outputs' / 'bench_pretrain_step'}",
    ]
    common = {"config": args.config, "overrides": overrides, "preset": args.preset, "threads": args.threads}
    record: dict[str, Any] = {"load_average_start": os.getloadavg(), "threads": args.threads, "results": {}}
    for mix in args.mixes.split(","):
        for packed in (False, True):
            job = {**common, "mix": mix, "packed": packed, "batches": args.batches, "repeats": args.repeats}
            job["batch_size"] = args.heavy_batch_size
            key = f"{mix}/{'packed' if packed else 'padded'}"
            record["results"][key] = r = _spawn(job)
            logger.info(
                "%-14s %.3f s/step, %.1f samples/s, real-token fraction %.3f, peak RSS +%.0f MiB",
                key,
                r["s_per_step_best"],
                r["samples_per_s"],
                r["real_tokens"] / (r["real_tokens"] if packed else r["padded_slots"]),
                r["peak_rss_above_setup_mib"],
            )
    if args.grad_cache_batch:
        for budget in (None, args.max_tokens):
            job = {**common, "mix": "demo", "packed": True, "batches": 1, "repeats": 1, "max_tokens": budget}
            job["overrides"] = [*overrides, f"train.batch_size={args.grad_cache_batch}"]
            job["overrides"].append(f"train.max_tokens_per_batch={args.max_tokens}")  # the collator counts tokens
            key = f"grad_cache/{args.grad_cache_batch}/{'budget_' + str(budget) if budget else 'whole'}"
            record["results"][key] = r = _spawn(job)
            logger.info(
                "%-28s %.2f s/step, peak RSS +%.0f MiB", key, r["s_per_step_best"], r["peak_rss_above_setup_mib"]
            )
    record["load_average_end"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=1) + "\n")
    logger.info("wrote %s", args.output)
    return record


if __name__ == "__main__":
    if "--layouts" in sys.argv[1:]:
        layouts_main()
    else:
        main()
