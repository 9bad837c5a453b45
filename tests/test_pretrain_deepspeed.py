"""DeepSpeed ZeRO-2/ZeRO-3 through ``accelerate launch`` on CPU (2 processes, gloo), and the batch padding that makes
every rank call the same modules (without it ZeRO mismatches its collectives as soon as two ranks' batches hold
different modalities: gloo aborts under ZeRO-2, ZeRO-3 hangs).

DeepSpeed selects its CPU accelerator here; the first distributed run JIT-compiles ``deepspeed_shm_comm_op``
(~45 s, cached in ``TORCH_EXTENSIONS_DIR``). The runs use a torch AdamW (a DeepSpeed-JSON optimizer would compile CPU
Adam for ~1.5 min)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import synthetic_run_config
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "pretrain" / "run_pretrain.py"
ACCEL = ROOT / "pretrain" / "configs" / "accelerate"
HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
STEPS = 3


def _tiny_config(root: Path) -> Path:
    """The synthetic cohort with every modality kind, missing modalities and a tiny preset; 3 steps, no evaluation
    until the end."""
    return synthetic_run_config(
        root,
        max_steps=STEPS,
        warmup_steps=1,
        batch_size=4,
        save_steps=STEPS,
        keep_last=1,
        eval={"steps": 0, "n_bootstrap": 100},
    )


@pytest.fixture(scope="module")
def run_config(tmp_path_factory) -> Path:
    return _tiny_config(tmp_path_factory.mktemp("pretrain_ds"))


def _launch(run_yaml: Path, out: Path, accelerate_config: str, env_extra: dict | None = None):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "DS_ACCELERATOR": "cpu",  # no CUDA here: DeepSpeed's CPU accelerator (gloo)
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions")
        ),
        **(env_extra or {}),
    }
    cmd = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--config_file",
        str(ACCEL / accelerate_config),
        "--num_processes",
        "2",
        "--main_process_port",
        "0",  # a free port: tests may run side by side
        str(SCRIPT),
        "--config",
        str(run_yaml),
        f"output_dir={out}",
    ]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def _history(out: Path) -> list[dict]:
    return [h for h in json.loads((out / "history.json").read_text()) if "loss" in h]


@pytest.fixture(scope="module")
def ddp_run(run_config):
    """The same run under plain DDP (2 CPU processes): the reference ZeRO must reproduce."""
    out = run_config.parent / "ddp"
    res = _launch(run_config, out, "cpu_ddp.yaml", {"ACCELERATE_USE_CPU": "1"})
    assert res.returncode == 0, res.stderr[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_DEEPSPEED, reason="deepspeed is not installed (pip install 'bioperceiver[deepspeed]')")
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_zero_on_cpu_trains_saves_a_loadable_model_and_matches_ddp(run_config, ddp_run, stage):
    out = run_config.parent / stage
    res = _launch(run_config, out, f"deepspeed_{stage}.yaml")
    assert res.returncode == 0, res.stderr[-4000:]
    assert "DEEPSPEED, 2 process(es)" in res.stderr
    hist = _history(out)
    assert [h["step"] for h in hist] == list(range(1, STEPS + 1))
    assert all(math.isfinite(h["loss"]) for h in hist)

    from transformers import AutoModel

    import bioperceiver  # noqa: F401  (registers the Auto classes)

    model = AutoModel.from_pretrained(out / "final")
    assert sum(p.numel() for p in model.parameters()) > 0
    # Ranks held different modalities at some step (the synthetic cohort has 30% missing modalities and batches of
    # 4), so this also checks the padding row: ZeRO ends exactly where DDP does, up to float summation order.
    ours, ref = load_file(out / "final" / "model.safetensors"), load_file(ddp_run / "final" / "model.safetensors")
    assert ours.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)
    ddp_losses = [h["loss"] for h in _history(ddp_run)]
    assert [h["loss"] for h in hist] == pytest.approx(ddp_losses, rel=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_DEEPSPEED, reason="deepspeed is not installed (pip install 'bioperceiver[deepspeed]')")
def test_zero3_with_subset_views_and_reconstruction_matches_ddp(tmp_path):
    """The omics recipe's loss (multiview, two masked-gene-subset views, the reconstruction term) under ZeRO-3 on 2
    processes: the padding row runs the subset views' backbone call and the decoder on every rank but adds nothing
    to the loss, so the run ends where the unpadded DDP run does."""
    subset = {"name": "multiview", "subset_views": 2, "subset_modality": "omics_expression", "reconstruction": 1.0}
    run_yaml = synthetic_run_config(
        tmp_path, max_steps=STEPS, warmup_steps=1, batch_size=4, save_steps=STEPS, keep_last=1,
        eval={"steps": 0, "n_bootstrap": 0}, loss=subset,
    )  # fmt: skip
    ddp = _launch(run_yaml, tmp_path / "ddp", "cpu_ddp.yaml", {"ACCELERATE_USE_CPU": "1"})
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    res = _launch(run_yaml, tmp_path / "zero3", "deepspeed_zero3.yaml")
    assert res.returncode == 0, res.stderr[-4000:]
    hist, ref = _history(tmp_path / "zero3"), _history(tmp_path / "ddp")
    assert [h["step"] for h in hist] == list(range(1, STEPS + 1))
    assert all(h["loss_reconstruction"] > 0 for h in hist)
    for key in ("loss", "loss_reconstruction"):
        assert [h[key] for h in hist] == pytest.approx([h[key] for h in ref], rel=1e-4), key
    ours = load_file(tmp_path / "zero3" / "final" / "model.safetensors")
    theirs = load_file(tmp_path / "ddp" / "final" / "model.safetensors")
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_DEEPSPEED, reason="deepspeed is not installed (pip install 'bioperceiver[deepspeed]')")
def test_zero3_keeps_the_best_evaluation_as_ddp_does(tmp_path):
    """``eval.load_best_model_at_end`` under ZeRO-3: the kept checkpoint is loaded back into the sharded engine
    (``load_state``) and gathered into ``final/``. The same run under DDP keeps the same step, and the two final
    models are equal up to float summation order."""
    best = {"steps": 1, "n_bootstrap": 0, "load_best_model_at_end": True, "early_stopping_patience": 1}
    run_yaml = synthetic_run_config(
        tmp_path, max_steps=6, warmup_steps=1, batch_size=4, save_steps=100, keep_last=1, eval=best
    )
    ddp = _launch(run_yaml, tmp_path / "ddp", "cpu_ddp.yaml", {"ACCELERATE_USE_CPU": "1"})
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    res = _launch(run_yaml, tmp_path / "zero3", "deepspeed_zero3.yaml")
    assert res.returncode == 0, res.stderr[-4000:]
    kept = {run: json.loads((tmp_path / run / "eval_results.json").read_text()) for run in ("ddp", "zero3")}
    assert kept["zero3"]["step"] == kept["ddp"]["step"] < kept["zero3"]["best_model"]["last_step"], kept
    assert kept["zero3"]["eval_loss"] == pytest.approx(kept["ddp"]["eval_loss"], rel=1e-4)
    ours = load_file(tmp_path / "zero3" / "final" / "model.safetensors")
    theirs = load_file(tmp_path / "ddp" / "final" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-5, msg=k)


def test_padding_row_leaves_loss_and_gradients_unchanged(run_config):
    """The row RankPadder appends runs through every embedder and encoder pass but has no view in the loss: loss and
    every parameter gradient equal those of the real batch (clip with leave-one-out, and multiview)."""
    import bioperceiver as bp
    from bioperceiver.data import (
        BioPerceiverCollator,
        BioPerceiverProcessor,
        ManifestDataset,
        assign_splits,
        read_manifest,
    )
    from bioperceiver.data.processing import load_processor_settings
    from bioperceiver.training import ContrastivePretrainer, PaddedPretrainer, RankPadder

    cfg = yaml.safe_load(run_config.read_text())
    manifest = assign_splits(read_manifest(cfg["data"]["manifest"]))
    procs, embedders = load_processor_settings(cfg["data"]["processor_settings"])
    processor = BioPerceiverProcessor.from_manifest(manifest, procs).fit(manifest, split="train")
    ds = ManifestDataset.from_manifest(manifest.split("train"), processor, train=True, seed=0)
    collator = BioPerceiverCollator(processor.modalities, modality_dropout=0.3, seed=0)
    names = sorted(processor.modalities)
    padder = RankPadder(ds, BioPerceiverCollator(processor.modalities), names)
    assert sorted(padder.row) == names
    # a batch lacking some modalities entirely (the padding row then brings every one)
    batch = next(
        b
        for i in range(0, len(ds) - 3, 3)
        if len((b := collator([ds[j] for j in range(i, i + 3)]))["inputs"]) < len(names)
    )
    padded = padder(batch)
    assert sorted(padded["inputs"]) == names and len(padded["patient_id"]) == len(batch["patient_id"]) + 1
    # the row is put on the batch's device once and reused at every later step, with the same result
    cpu = torch.device("cpu")
    assert padder.row_on(cpu) is padder.row_on(cpu) and list(padder._on_device) == [cpu]
    again = padder(batch)["inputs"]
    assert all(torch.equal(t, again[n][k]) for n, a in padded["inputs"].items() for k, t in a.items())

    omics = next(n for n in names if processor.modalities[n] == "omics")
    subset = {"subset_views": 2, "subset_modality": omics}
    for loss, kw in (
        ("clip", {"leave_one_out": 0.5}),
        ("multiview", {}),
        # the padding row holds the subset modality too: its subset views, their decorrelation and their
        # reconstruction error stay out of the loss like its other views, and it draws its subsets after the real
        # rows, which get the unpadded batch's draws
        ("multiview", {**subset, "decorrelation": 0.5, "reconstruction": 1.0}),
    ):
        torch.manual_seed(0)
        model = bp.create_model("bioperceiver_debug", modalities=processor.model_modalities(embedders))
        ref = ContrastivePretrainer(model, loss=loss, **kw)
        pad = PaddedPretrainer(model, loss=loss, **kw)
        pad.load_state_dict(ref.state_dict())
        torch.manual_seed(1)  # the same token-subset draws for both
        out_ref = ref(batch["inputs"], batch["patient_id"])
        rng_ref = torch.get_rng_state()
        out_ref["loss"].backward()
        g_ref = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
        ref.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        out_pad = pad(padded["inputs"], padded["patient_id"], num_pad=1)
        assert torch.equal(torch.get_rng_state(), rng_ref)  # the next step draws as the unpadded run does
        out_pad["loss"].backward()
        g_pad = {n: p.grad for n, p in pad.named_parameters() if p.grad is not None}
        torch.testing.assert_close(out_pad["loss"], out_ref["loss"], rtol=1e-5, atol=1e-6)
        assert set(g_pad) == {n for n, p in pad.named_parameters() if p.requires_grad}  # every parameter: a gradient
        assert set(g_ref) < set(g_pad)  # ... where the real batch alone leaves some embedders without one
        for n, g in g_pad.items():  # equal up to float summation order (batches of 3 and 4 rows)
            r = g_ref.get(n, torch.zeros_like(g))
            assert (g - r).abs().max() <= 1e-4 * r.abs().max() + 1e-7, (loss, n)
