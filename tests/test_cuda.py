"""CUDA-only checks, skipped without a GPU (CI has none; ``benchmarks/gpu_suite.sh`` runs them on a GPU machine).

They cover what the CPU suite cannot reach: the flash ``varlen_attn`` kernel the packed encoder calls on CUDA in
half precision (against float64 references, forward and backward), the packed model and the contrastive pretrainer
under bf16 autocast against the float32 padded model on the same GPU, the per-segment fallback in float32 on CUDA,
and a short ``run_pretraining`` run in bf16 mixed precision with packing and a token budget through accelerate."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import synthetic_run_config, tiny_config
from test_packing import grads, mixed_batch

import bioperceiver as bp
from bioperceiver.data.shards import batch_to_device
from bioperceiver.layers import PackedTokens, packed_attend
from bioperceiver.training.pretraining import ContrastivePretrainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)"),
]
CUDA = torch.device("cuda")
# relative error ||x - ref|| / ||ref|| allowed for bf16 arithmetic against a float32/float64 reference
BF16_TOL = 2e-2


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(x).all(), "non-finite values"
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def flat(g: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g[k].detach().double().cpu().flatten() for k in sorted(g)])


@pytest.fixture
def varlen_calls(monkeypatch):
    """Counts the calls of ``torch.nn.attention.varlen.varlen_attn`` (``packed_attend`` imports it per call)."""
    varlen = pytest.importorskip("torch.nn.attention.varlen", reason="torch < 2.10 has no varlen_attn")
    real, calls = varlen.varlen_attn, []

    def counting(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(varlen, "varlen_attn", counting)
    return calls


def segment_reference(q, k, v, lengths):
    """Dense softmax attention of each segment's queries over its own keys, in float64."""
    outs, start = [], 0
    for i, n in enumerate(lengths):
        scores = torch.einsum("hmd,nhd->hmn", q[i], k[start : start + n]) * q.shape[-1] ** -0.5
        outs.append(torch.einsum("hmn,nhd->hmd", scores.softmax(-1), v[start : start + n]))
        start += n
    return torch.stack(outs)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 1e-2), (torch.float16, 2e-3), (torch.float32, 1e-5)])
def test_packed_attention_on_cuda_matches_a_float64_reference(dtype, tol, varlen_calls):
    """Half precision takes the flash varlen kernel (one call), float32 the per-segment loop; both agree with float64
    on the same (rounded) inputs, forward and the gradients of q, k and v. Segments of 1 to 300 keys, head dim 64."""
    g = torch.Generator().manual_seed(0)
    lengths = [37, 1, 300, 64, 5, 129]
    s, h, m, dh, t = len(lengths), 4, 16, 64, sum(lengths)
    q, k, v = (
        torch.randn(shape, generator=g).to(CUDA, dtype).requires_grad_()
        for shape in ((s, h, m, dh), (t, h, dh), (t, h, dh))
    )
    grad_out = torch.randn(s, h, m, dh, generator=g).to(dtype)
    out = packed_attend(q, k, v, PackedTokens.from_segments(k.detach().flatten(1), None, lengths), 0.0)
    assert out.shape == (s, h, m, dh) and out.dtype == dtype
    assert len(varlen_calls) == (0 if dtype == torch.float32 else 1)
    out.backward(grad_out.to(CUDA))
    ref_in = [x.detach().double().cpu().requires_grad_() for x in (q, k, v)]
    ref = segment_reference(*ref_in, lengths)
    ref.backward(grad_out.double())
    assert rel_err(out, ref) < tol
    for name, x, r in zip("qkv", (q, k, v), ref_in, strict=True):
        assert rel_err(x.grad, r.grad) < tol, name


def test_varlen_attention_falls_back_with_dropout_on_cuda(varlen_calls):
    """Attention dropout is not in the varlen kernel: the per-segment loop runs instead (and still drops)."""
    torch.manual_seed(0)
    lengths = [5, 9]
    q = torch.randn(2, 2, 4, 16, device=CUDA, dtype=torch.bfloat16)
    k = v = torch.randn(14, 2, 16, device=CUDA, dtype=torch.bfloat16)
    packed = PackedTokens.from_segments(k.flatten(1), None, lengths)
    a, b = packed_attend(q, k, v, packed, 0.5), packed_attend(q, k, v, packed, 0.5)
    assert not varlen_calls and not torch.equal(a, b)


def model_loss(out) -> torch.Tensor:
    return (
        out.last_hidden_state.float().square().mean()
        + out.modality_pooler_output.float().sin().sum()
        + out.leave_one_out_pooler_output.float().cos().sum()
        + sum(h.float().mean() for h in out.hidden_states)
    )


@pytest.mark.parametrize(
    ("b", "seed", "drop_whole"), [(5, 0, ()), (6, 3, ("text", "omics", "tabular")), (1, 2, ("image_ct",))]
)
def test_packed_model_under_bf16_autocast_matches_the_float32_padded_model(b, seed, drop_whole, varlen_calls):
    """The packed encoder under bf16 autocast (flash varlen) and the padded one under bf16 autocast are both within
    bf16 error of the float32 padded model on the same GPU, outputs and the whole gradient; the packed one is not
    less accurate than the padded one. In float32 on CUDA, packed equals padded to float tolerance."""
    config = tiny_config(
        d_latents=64, d_input=32, num_cross_attention_layers=2, repeat_cross_attention=True, num_blocks=2
    )
    torch.manual_seed(seed)
    model = bp.BioPerceiverModel(config).to(CUDA).train()  # dropout 0 in the tiny config
    batch = batch_to_device(mixed_batch(config, b, seed, drop_whole=drop_whole), CUDA)
    kw = dict(return_modality_embeddings=True, return_leave_one_out=True, output_hidden_states=True)

    def run(packed: bool, bf16: bool):
        model.zero_grad()
        model.set_packed(packed)
        before = len(varlen_calls)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            out = model(inputs=batch, **kw)
            loss = model_loss(out)
        loss.backward()
        return out, grads(model), len(varlen_calls) - before

    ref, g_ref, _ = run(packed=False, bf16=False)
    pad, g_pad, calls_pad = run(packed=False, bf16=True)
    pack, g_pack, calls_pack = run(packed=True, bf16=True)
    pack32, g_pack32, calls_pack32 = run(packed=True, bf16=False)
    assert calls_pad == 0 and calls_pack32 == 0 and calls_pack > 0  # only bf16 + packed takes the flash kernel
    assert g_ref and g_ref.keys() == g_pad.keys() == g_pack.keys() == g_pack32.keys()
    for key in ("last_hidden_state", "pooler_output", "modality_pooler_output", "leave_one_out_pooler_output"):
        want = getattr(ref, key)
        err_pad, err_pack = rel_err(getattr(pad, key), want), rel_err(getattr(pack, key), want)
        assert err_pack < BF16_TOL and err_pad < BF16_TOL, (key, err_pack, err_pad)
        assert err_pack <= 2 * err_pad + 1e-3, (key, err_pack, err_pad)
        assert rel_err(getattr(pack32, key), getattr(ref, key)) < 1e-4, key
    err_pad, err_pack = rel_err(flat(g_pad), flat(g_ref)), rel_err(flat(g_pack), flat(g_ref))
    assert err_pack < 2 * BF16_TOL and err_pad < 2 * BF16_TOL, (err_pack, err_pad)
    assert err_pack <= 2 * err_pad + 1e-3, (err_pack, err_pad)
    assert rel_err(flat(g_pack32), flat(g_ref)) < 1e-4
    assert torch.equal(pack.modality_mask.cpu(), ref.modality_mask.cpu())


def test_packed_pretrainer_step_under_bf16_autocast_matches_float32():
    """The contrastive loss (CLIP over fused, per-modality and leave-one-out views) and its gradient, packed under
    bf16 autocast vs the float32 padded step on the same GPU."""
    config = tiny_config(d_latents=64, d_input=32)
    torch.manual_seed(0)
    trainer = ContrastivePretrainer(bp.BioPerceiverModel(config), loss="clip", leave_one_out=0.5).to(CUDA)
    batch = batch_to_device(mixed_batch(config, 12, seed=4), CUDA)
    pid = [f"p{i % 9}" for i in range(12)]
    results = {}
    for packed, bf16 in ((False, False), (True, True), (False, True)):
        trainer.zero_grad()
        trainer.model.set_packed(packed)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            out = trainer(batch, pid)
        out["loss"].backward()
        results[packed, bf16] = out["loss"].detach(), flat(grads(trainer))
    loss_ref, g_ref = results[False, False]
    for key in ((True, True), (False, True)):
        loss, g = results[key]
        assert abs(loss.item() - loss_ref.item()) <= BF16_TOL * abs(loss_ref.item()), (key, loss, loss_ref)
        assert rel_err(g, g_ref) < 2 * BF16_TOL, key


def test_run_pretraining_on_cuda_in_bf16_with_packing(tmp_path):
    """The user's path on a GPU: ``run_pretraining`` with ``train.mixed_precision=bf16``, packing and a token budget
    (several micro-batches per step) runs on the GPU, keeps finite losses, writes its checkpoints and final backbone
    (the card names the GPU), and its first loss matches the float32 padded run's on the same GPU."""
    import logging

    from bioperceiver.training import load_run_config, run_pretraining

    logging.getLogger("bioperceiver").setLevel(logging.WARNING)
    path = synthetic_run_config(
        tmp_path, max_steps=4, warmup_steps=1, batch_size=8, save_steps=2, keep_last=2, eval={"n_bootstrap": 0}
    )
    runs = {}
    for name, extra in (
        ("bf16_packed", ["train.mixed_precision=bf16", "train.packed=true", "train.max_tokens_per_batch=120"]),
        ("fp32_padded", []),
    ):
        cfg = load_run_config(path, [f"output_dir={tmp_path / name}", *extra])
        runs[name] = result = run_pretraining(cfg)
        assert result["steps"] == 4 and result["losses_finite"], name
        assert (tmp_path / name / "checkpoints" / "checkpoint-4").is_dir()
        card = (tmp_path / name / "final" / "README.md").read_text()
        assert torch.cuda.get_device_name() in card, "the card's compute section should name the GPU"
        model = bp.BioPerceiverModel.from_pretrained(result["final"])
        assert all(torch.isfinite(p).all() for p in model.parameters())
    first = {name: next(h["loss"] for h in r["history"] if "loss" in h) for name, r in runs.items()}
    assert math.isclose(first["bf16_packed"], first["fp32_padded"], rel_tol=BF16_TOL), first


def test_rank_padder_and_padded_pretrainer_on_a_batch_already_on_the_gpu(tmp_path):
    """Sharded DeepSpeed/FSDP runs pad each local batch with a row collated on CPU while accelerate's loader has
    already put the batch on the GPU: the padded batch is wholly on the GPU and its loss equals the real batch's."""
    import yaml

    from bioperceiver.data import (
        BioPerceiverCollator,
        BioPerceiverProcessor,
        ManifestDataset,
        assign_splits,
        read_manifest,
    )
    from bioperceiver.data.processing import load_processor_settings
    from bioperceiver.training import PaddedPretrainer, RankPadder

    path = synthetic_run_config(tmp_path, max_steps=1, warmup_steps=0, batch_size=4, save_steps=1, keep_last=1)
    cfg = yaml.safe_load(path.read_text())
    manifest = assign_splits(read_manifest(cfg["data"]["manifest"]))
    procs, embedders = load_processor_settings(cfg["data"]["processor_settings"])
    processor = BioPerceiverProcessor.from_manifest(manifest, procs).fit(manifest, split="train")
    ds = ManifestDataset.from_manifest(manifest.split("train"), processor, train=False, seed=0)
    collator = BioPerceiverCollator(processor.modalities)
    names = sorted(processor.modalities)
    padder = RankPadder(ds, collator, names)
    batch = next(  # a batch lacking some modality (the padding row then brings it)
        b for i in range(0, len(ds) - 2, 2) if len((b := collator([ds[i], ds[i + 1]]))["inputs"]) < len(names)
    )
    padded = padder({**batch, "inputs": batch_to_device(batch["inputs"], CUDA)})
    assert sorted(padded["inputs"]) == names
    assert all(t.is_cuda for arrays in padded["inputs"].values() for t in arrays.values())
    gpu = next(iter(padded["inputs"][names[0]].values())).device  # the row is moved there once, then reused
    assert padder.row_on(gpu) is padder.row_on(gpu) and list(padder._on_device) == [gpu]
    torch.manual_seed(0)
    model = bp.create_model("bioperceiver_debug", modalities=processor.model_modalities(embedders))
    trainer = PaddedPretrainer(model, loss="clip").to(CUDA)
    real = trainer(batch_to_device(batch["inputs"], CUDA), batch["patient_id"])["loss"]
    pad = trainer(padded["inputs"], padded["patient_id"], num_pad=1)["loss"]
    torch.testing.assert_close(pad, real, rtol=1e-4, atol=1e-5)


def test_latent_cache_follows_a_model_on_the_gpu():
    """The linear probe's latent cache (``compute_latents``) takes CPU-collated batches to the model's device and
    returns CPU latents equal to the backbone's own output."""
    from conftest import random_batch

    from bioperceiver.training.finetuning import compute_latents

    config = tiny_config(num_labels=3)
    torch.manual_seed(0)
    model = bp.BioPerceiverForSequenceClassification(config).to(CUDA).eval()
    batches = [{"inputs": random_batch(config, batch_size=b, seed=b)} for b in (3, 2)]
    latents = compute_latents(model, batches)
    assert latents.device.type == "cpu" and latents.shape[0] == 5
    with torch.no_grad():
        want = torch.cat(
            [model.bioperceiver(inputs=batch_to_device(b["inputs"], CUDA)).last_hidden_state.cpu() for b in batches]
        )
    torch.testing.assert_close(latents, want)
