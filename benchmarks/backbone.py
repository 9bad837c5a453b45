"""BioPerceiver encoder vs. ``transformers.PerceiverModel``: throughput and peak memory, side by side.

Both encoders get the same latent count, width, heads, layers and MLP widening, and the same random input tokens
``(B, N, d_input)`` with a keep-mask whose last 5% are padding. Each (model, N) point is measured in a fresh
subprocess: forward + backward of ``last_hidden_state.sum()``, median step time after warm-up (at least
``--iters`` steps and at least ~3 s of steps). The two peers are measured alternately ``--repeats`` times and
the best median of each is kept, so a slow spell of the machine does not land on one peer only. On CPU, peak
memory is the rise of the resident set size during the steps above its level before them (the kernel's
high-water mark is reset first via ``/proc/self/clear_refs``); on CUDA it is ``torch.cuda.max_memory_allocated``
above the memory held before the steps.

Run (CPU, fp32, the numbers in benchmarks/RESULTS.md)::

    .venv/bin/python benchmarks/backbone.py
    .venv/bin/python benchmarks/backbone.py --device cuda --dtype bf16      # on a GPU machine

Targets (issue #2): >= 1.5x HF tokens/s and <= 0.5x HF peak memory at 16k and 64k tokens, never slower at 1k
and 4k; our time per input token grows by <= 1.3x from 4k to 64k; parameters and FLOPs agree within 10%.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

logger = logging.getLogger("benchmarks.backbone")

PEERS = ("bioperceiver", "hf_perceiver")
ARCH: dict[str, int] = {}  # the encoder settings both peers share, resolved by BioPerceiverConfig (defaults included)
ENCODER_FIELDS = (
    "num_latents",
    "d_latents",
    "d_input",
    "num_cross_attention_heads",
    "num_self_attention_heads",
    "num_self_attention_layers",
    "self_attention_widening_factor",
    "cross_attention_widening_factor",
)


def set_arch(preset: str) -> None:
    """The encoder settings of a shipped preset (the embedders are not part of this benchmark)."""
    import bioperceiver as bp

    config = bp.create_config(preset)
    if config.num_cross_attention_layers != 1 or config.num_blocks != 1:
        raise ValueError("transformers.PerceiverModel has one cross-attention and one block; pick such a preset")
    ARCH.clear()
    ARCH.update({key: getattr(config, key) for key in ENCODER_FIELDS})


def build(impl: str) -> torch.nn.Module:
    if impl in ("bioperceiver", "bioperceiver_packed"):
        import bioperceiver as bp
        from bioperceiver.modeling_bioperceiver import BioPerceiverEncoder

        return BioPerceiverEncoder(bp.BioPerceiverConfig(**ARCH, modalities={}))
    from transformers import PerceiverConfig, PerceiverModel

    return PerceiverModel(
        PerceiverConfig(
            num_latents=ARCH["num_latents"],
            d_latents=ARCH["d_latents"],
            d_model=ARCH["d_input"],
            num_blocks=1,
            num_self_attends_per_block=ARCH["num_self_attention_layers"],
            num_self_attention_heads=ARCH["num_self_attention_heads"],
            num_cross_attention_heads=ARCH["num_cross_attention_heads"],
            self_attention_widening_factor=ARCH["self_attention_widening_factor"],
            cross_attention_widening_factor=ARCH["cross_attention_widening_factor"],
            attention_probs_dropout_prob=0.0,
        )
    )


def forward(impl: str, model: torch.nn.Module, tokens: torch.Tensor, keep: torch.Tensor, weights: bool = False):
    if impl == "bioperceiver":
        return model(tokens, keep, output_attentions=weights)[0]
    if impl == "bioperceiver_packed":  # the real tokens only (packing counted in the step), one segment per row
        from bioperceiver.layers import PackedTokens

        packed = PackedTokens.from_segments(tokens[keep], None, keep.sum(1).tolist())
        return model(packed, None)[0]
    return model(inputs=tokens, attention_mask=keep.long()).last_hidden_state


def inputs(n_tokens: int, batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n_tokens)
    tokens = torch.randn(batch, n_tokens, ARCH["d_input"], generator=g).to(device)
    keep = torch.ones(batch, n_tokens, dtype=torch.bool, device=device)
    keep[:, int(0.95 * n_tokens) :] = False
    return tokens, keep


def count_flops(impl: str, n_tokens: int) -> int:
    """Forward FLOPs for one sample. Ours is counted on its explicit-softmax path (``output_attentions``): the
    same matmuls as the fused SDPA kernel, which torch's FlopCounterMode cannot see on CPU."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build(impl)
    tokens, keep = inputs(n_tokens, 1, "cpu")
    with FlopCounterMode(display=False) as counter:
        forward(impl, model, tokens, keep, weights=True)
    return counter.get_total_flops()


def worker(impl: str, n_tokens: int, batch: int, iters: int, device: str, dtype: str) -> dict:
    torch.manual_seed(0)
    model = build(impl).to(device).train()
    tokens, keep = inputs(n_tokens, batch, device)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with autocast:
            out = forward(impl, model, tokens, keep)
        out.float().sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_peak_rss()
    step()  # warm-up (also the memory peak: every step allocates the same)
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else _peak_rss() - base
    times = []
    deadline = time.perf_counter() + 3.0
    while len(times) < iters or time.perf_counter() < deadline:
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    t = statistics.median(times)
    return {
        "impl": impl,
        "tokens": n_tokens,
        "batch": batch,
        "step_s": t,
        "tokens_per_s": batch * n_tokens / t,
        "peak_bytes": peak,
    }


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> int:
    """Current RSS in bytes, after resetting the kernel's peak-RSS mark (VmHWM) to it."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed setup memory back so it is not counted as headroom
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def _peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


def measured_peak_flops(device: str, dtype: str) -> float:
    """Dense matmul throughput of this device (the denominator of model FLOPs utilisation)."""
    n = 8192 if device == "cuda" else 2048
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=torch_dtype)
    b = torch.randn(n, n, device=device, dtype=torch_dtype)
    for _ in range(2):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    reps = 10 if device == "cuda" else 3
    best = float("inf")
    for _ in range(5):  # best of 5: a slow spell of a shared machine must not deflate the peak
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * reps / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bioperceiver_base", help="preset whose encoder is benchmarked")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3, help="minimum timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="alternating measurements of each peer")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--output", type=Path, default=None, help="JSON results (default benchmarks/results/)")
    parser.add_argument(
        "--impls", nargs="+", default=list(PEERS), choices=[*PEERS, "bioperceiver_packed"], help="what to measure"
    )
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_arch(args.preset)
    if args.worker:
        impl, n = args.worker[0], int(args.worker[1])
        print(json.dumps(worker(impl, n, args.batch, args.iters, args.device, args.dtype)))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    params = {impl: sum(p.numel() for p in build(impl).parameters()) for impl in PEERS}
    flops = {impl: count_flops(impl, 4096) for impl in PEERS}
    results: dict[int, dict[str, dict]] = {}
    for n in args.tokens:
        results[n] = {}
        for _, impl in sorted((r, impl) for r in range(args.repeats) for impl in args.impls):
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                impl,
                str(n),
                "--preset",
                args.preset,
                "--batch",
                str(args.batch),
                "--iters",
                str(args.iters),
                "--device",
                args.device,
                "--dtype",
                args.dtype,
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            if out.returncode != 0:
                results[n][impl] = {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
                logger.info("%s @ %d tokens failed: %s", impl, n, results[n][impl]["error"])
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            best = results[n].get(impl)
            if best is not None and "step_s" in best:  # fastest step time, but the largest memory peak seen
                r["peak_bytes"] = max(r["peak_bytes"], best["peak_bytes"])
                r["step_s"] = min(r["step_s"], best["step_s"])
                r["tokens_per_s"] = max(r["tokens_per_s"], best["tokens_per_s"])
            results[n][impl] = r
            logger.info(
                "%-13s %6d tokens  %8.3f s/step  %10.0f tokens/s  peak %7.1f MiB",
                impl,
                n,
                r["step_s"],
                r["tokens_per_s"],
                r["peak_bytes"] / 2**20,
            )

    peak = measured_peak_flops(args.device, args.dtype)
    lines = [
        f"preset={args.preset} encoder={ARCH}",
        f"device={args.device} dtype={args.dtype} batch={args.batch} iters={args.iters} repeats={args.repeats} "
        f"torch={torch.__version__} threads={torch.get_num_threads()} "
        f"malloc={ {k: v for k, v in os.environ.items() if k.startswith('MALLOC_')} or 'glibc defaults' }",
        f"parameters: bioperceiver {params['bioperceiver']:,} | hf_perceiver {params['hf_perceiver']:,} "
        f"(ratio {params['bioperceiver'] / params['hf_perceiver']:.4f})",
        f"forward FLOPs/sample @4096 tokens: bioperceiver {flops['bioperceiver'] / 1e9:.3f} G | hf_perceiver "
        f"{flops['hf_perceiver'] / 1e9:.3f} G (ratio {flops['bioperceiver'] / flops['hf_perceiver']:.4f})",
        "",
        "| tokens | ours tokens/s | HF tokens/s | throughput ratio | ours peak MiB | HF peak MiB | memory ratio "
        "| ours MFU |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    checks = []
    for n, row in results.items():
        if "step_s" in row.get("bioperceiver_packed", {}) and "step_s" in row.get("bioperceiver", {}):
            packed_speed = row["bioperceiver_packed"]["tokens_per_s"] / row["bioperceiver"]["tokens_per_s"]
            lines.append(
                f"| {n} packed | {row['bioperceiver_packed']['tokens_per_s']:,.0f} (padded x{packed_speed:.2f}) | | | "
                f"{row['bioperceiver_packed']['peak_bytes'] / 2**20:,.1f} | | | "
                f"{3 * count_flops('bioperceiver', n) * args.batch / row['bioperceiver_packed']['step_s'] / peak:.1%} |"
            )
        ours, hf = row.get("bioperceiver", {}), row.get("hf_perceiver", {})
        if "step_s" not in ours or "step_s" not in hf:
            lines.append(f"| {n} | {ours.get('error', '')} | {hf.get('error', '')} | | | | | |")
            continue
        speed = ours["tokens_per_s"] / hf["tokens_per_s"]
        mem = ours["peak_bytes"] / max(hf["peak_bytes"], 1)
        mfu = 3 * count_flops("bioperceiver", n) * args.batch / ours["step_s"] / peak
        lines.append(
            f"| {n} | {ours['tokens_per_s']:,.0f} | {hf['tokens_per_s']:,.0f} | {speed:.2f}x | "
            f"{ours['peak_bytes'] / 2**20:,.1f} | {hf['peak_bytes'] / 2**20:,.1f} | {mem:.3f}x | {mfu:.1%} |"
        )
        if n >= 16384:
            checks += [(f"throughput >= 1.5x HF at {n}", speed >= 1.5), (f"memory <= 0.5x HF at {n}", mem <= 0.5)]
        else:
            checks.append((f"not slower than HF at {n}", speed >= 1.0))
    per_token = {
        n: r["bioperceiver"]["step_s"] / n for n, r in results.items() if "step_s" in r.get("bioperceiver", {})
    }
    if 4096 in per_token and 65536 in per_token:
        growth = per_token[65536] / per_token[4096]
        lines.append(f"\nour time per input token, 64k vs 4k: {growth:.2f}x")
        checks.append(("time per token grows <= 1.3x from 4k to 64k", growth <= 1.3))
    checks.append(("parameters within 10%", abs(params["bioperceiver"] / params["hf_perceiver"] - 1) <= 0.1))
    checks.append(("FLOPs within 10%", abs(flops["bioperceiver"] / flops["hf_perceiver"] - 1) <= 0.1))
    lines.append(
        f"device matmul peak ({args.dtype}): {peak / 1e9:,.1f} GFLOP/s (MFU = 3 x forward FLOPs / step time / peak)"
    )
    lines.append("")
    lines += [f"- [{'x' if ok else ' '}] {name}" for name, ok in checks]
    report = "\n".join(lines)
    print(report)
    output = (
        args.output or Path(__file__).parent / "results" / f"backbone_{args.preset}_{args.device}_{args.dtype}.json"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps(
            {
                "preset": args.preset,
                "arch": ARCH,
                "params": params,
                "flops_4096": flops,
                "results": results,
                "peak_flops": peak,
                "checks": dict(checks),
                "report": report,
            },
            indent=2,
        )
    )
    logger.info("wrote %s", output)


def attention_paths(threads: int = 1, repeats: int = 5) -> dict[str, float]:
    """Packed cross-attention on CPU, forward + backward of one layer's attention, 16 segments (64 latents each,
    4-16k keys of 2-4k real tokens each): per-segment SDPA (what the packed path uses), FlexAttention with a document
    block mask (eager, as the library would call it), nested-tensor (jagged) SDPA, and the padded masked SDPA."""
    import torch.nn.functional as F

    from bioperceiver.layers import PackedTokens, packed_attend

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    h, m, dh, s = 4, 64, 32, 16
    lengths = torch.randint(2000, 4001, (s,), generator=g).tolist()
    t = sum(lengths)
    q = torch.randn(s, h, m, dh, generator=g, requires_grad=True)
    k = torch.randn(t, h, dh, generator=g, requires_grad=True)
    v = torch.randn(t, h, dh, generator=g, requires_grad=True)
    packed = PackedTokens.from_segments(k.detach().flatten(1), None, lengths)
    n_max = max(lengths)

    def segments():
        return packed_attend(q, k, v, packed, 0.0)

    def padded():
        keep = torch.arange(n_max)[None] < torch.tensor(lengths)[:, None]  # (S, N)
        kk = k.new_zeros(s, n_max, h, dh).masked_scatter(keep[..., None, None], k)
        vv = v.new_zeros(s, n_max, h, dh).masked_scatter(keep[..., None, None], v)
        return F.scaled_dot_product_attention(
            q, kk.transpose(1, 2), vv.transpose(1, 2), attn_mask=keep[:, None, None, :]
        )

    def nested():
        kn = torch.nested.nested_tensor_from_jagged(k, offsets=packed.cu_seqlens).transpose(1, 2)  # (S, H, j, dh)
        vn = torch.nested.nested_tensor_from_jagged(v, offsets=packed.cu_seqlens).transpose(1, 2)
        qn = torch.nested.nested_tensor_from_jagged(
            q.transpose(1, 2).reshape(s * m, h, dh), offsets=torch.arange(0, (s + 1) * m, m)
        ).transpose(1, 2)
        return F.scaled_dot_product_attention(qn, kn, vn)

    def flex():
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        doc = torch.repeat_interleave(torch.arange(s), torch.tensor(lengths))
        qdoc = torch.arange(s).repeat_interleave(m)
        mask = create_block_mask(lambda b, hh, qi, ki: qdoc[qi] == doc[ki], None, None, s * m, t, device="cpu")
        qq = q.transpose(0, 1).reshape(1, h, s * m, dh)
        return flex_attention(qq, k.permute(1, 0, 2)[None], v.permute(1, 0, 2)[None], block_mask=mask)

    out: dict[str, float] = {}
    for name, fn in (
        ("segment_sdpa", segments),
        ("padded_sdpa", padded),
        ("nested_jagged_sdpa", nested),
        ("flex_eager", flex),
    ):
        times = []
        try:
            for _ in range(repeats):
                start = time.perf_counter()
                res = fn()
                (res.values() if res.is_nested else res).float().sum().backward()
                times.append(time.perf_counter() - start)
                q.grad = k.grad = v.grad = None
            out[name] = min(times)
        except Exception as err:  # a path this torch build cannot run on CPU is reported, not fatal
            out[name] = float("nan")
            logger.info("%s: %s", name, str(err).splitlines()[0][:160])
        logger.info("%-20s %.4f s (forward + backward, best of %d)", name, out[name], repeats)
    return out


if __name__ == "__main__":
    if "--attention_paths" in sys.argv[1:]:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        attention_paths()
    else:
        main()
