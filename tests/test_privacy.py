"""Differentially private finetuning (issue 17): per-sample gradients and clipping against one-sample-at-a-time
references, Opacus' own grad sampler and accountant, every task under DP (Cox refused), LoRA, and a DP run on the
synthetic cohort whose shared outputs hold no sample or patient id."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import random_batch, tiny_config
from script_loader import load_script

import bioperceiver as bp
from bioperceiver.data import assign_splits, read_manifest, write_manifest
from bioperceiver.data.recipes.synthetic import make_synthetic_cohort
from bioperceiver.evaluation.report import LOCAL_ONLY_DIR, predictions_path
from bioperceiver.tasks import Task
from bioperceiver.training import configure_finetuning
from bioperceiver.training.privacy import DPSettings, DPTaskTrainer, per_sample_gradients, slice_batch
from bioperceiver.training.tasks import LatentDataset, TaskCollator

opacus = pytest.importorskip("opacus", reason="DP finetuning needs the privacy extra (opacus)")
from opacus import GradSampleModule, PrivacyEngine  # noqa: E402
from opacus.accountants import create_accountant  # noqa: E402
from opacus.optimizers import DPOptimizer  # noqa: E402

TEXT_TABULAR = {k: v for k, v in tiny_config().modalities.items() if v["kind"] in ("text", "tabular", "omics")}


def _classifier(num_labels=3, **overrides):
    torch.manual_seed(0)
    overrides = {"hidden_dropout": 0.0, **overrides}
    config = tiny_config(modalities=TEXT_TABULAR, num_labels=num_labels, **overrides)
    return bp.BioPerceiverForSequenceClassification(config).eval()


def _batch(model, n=4, labels=None):
    inputs = random_batch(model.config, batch_size=n, seed=1)
    if labels is None:
        labels = torch.arange(n) % model.config.num_labels
    return {"inputs": inputs, "labels": labels}


def _alone(batch, i):
    """Row ``i`` collated on its own: sliced, then the padding it does not use trimmed (the reference)."""
    one = slice_batch(batch, i)
    for arrays in one["inputs"].values():
        mask = arrays.get("attention_mask", arrays.get("mask"))
        if mask is None:
            continue
        n = int(mask[0].bool().sum())
        for k, v in arrays.items():
            if v.dim() >= 2 and v.shape[1] == mask.shape[1]:
                arrays[k] = v[:, :n]
    return one


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _reference_grads(model, batch, params):
    """One sample at a time, each collated alone: ``[(B, *p.shape)]``."""
    rows = []
    for i in range(batch["labels"].shape[0]):
        loss = model(**_alone(batch, i)).loss
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])
    return [torch.stack(gs) for gs in zip(*rows)]


def test_dp_path_forward_and_per_sample_gradients_equal_the_normal_path():
    """The DP path runs each row alone through the unchanged model: its logits equal the batched forward's, its
    per-sample gradients equal those of each row collated alone (padding trimmed), and their mean is the batch
    gradient of the normal (mean) loss."""
    model = _classifier()
    batch = _batch(model)
    params = _trainable(model)
    grads, losses = per_sample_gradients(model, batch, params)
    with torch.no_grad():
        batched = model(**batch)
        alone = torch.cat([model(**_alone(batch, i)).logits for i in range(4)])
        sliced = torch.cat([model(**slice_batch(batch, i)).logits for i in range(4)])
    torch.testing.assert_close(sliced, batched.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone, batched.logits, rtol=1e-5, atol=1e-6)
    reference = _reference_grads(model, batch, params)
    for g, r in zip(grads, reference):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    full = torch.autograd.grad(model(**batch).loss, params, allow_unused=True)
    for g, f in zip(grads, full):
        torch.testing.assert_close(g.mean(0), torch.zeros_like(g[0]) if f is None else f, rtol=1e-4, atol=1e-6)
    ce = torch.nn.functional.cross_entropy(batched.logits, batch["labels"], reduction="none")
    torch.testing.assert_close(losses, ce, rtol=1e-5, atol=1e-6)


def test_per_sample_gradients_are_clipped_against_a_one_sample_at_a_time_reference():
    """Opacus' DPOptimizer on our per-sample gradients, without noise: every row's gradient is scaled to at most
    C, and the update direction is the sum of the reference's clipped rows over the expected batch size."""
    model = _classifier()
    batch = _batch(model, n=5)
    params = _trainable(model)
    grads, _ = per_sample_gradients(model, batch, params)
    reference = _reference_grads(model, batch, params)
    norms = torch.stack([r.flatten(1).norm(dim=1) for r in reference]).norm(dim=0)  # (B,) over all parameters
    c = float(norms.median())  # some rows clipped, some not
    assert (norms > c).any() and (norms < c).any()
    opt = DPOptimizer(torch.optim.SGD(params, lr=0.1), noise_multiplier=0.0, max_grad_norm=c, expected_batch_size=4)
    for p, g in zip(params, grads):
        p.grad_sample = g
    assert opt.pre_step()
    factor = torch.clamp(c / (norms + 1e-6), max=1.0)
    clipped_norms = norms * factor
    assert (clipped_norms <= c * (1 + 1e-5)).all()
    for p, r in zip(params, reference):
        expected = torch.einsum("b,b...->...", factor, r) / 4
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-7)


def test_linear_probe_per_sample_gradients_equal_opacus_grad_sampler():
    """On cached latents (linear probe: only the head trains) Opacus' own hook-based grad sampler applies; ours
    agrees with it."""
    model = _classifier(head_hidden_size=8, head_dropout=0.0).train()  # Opacus records activations in training
    configure_finetuning(model, "linear_probe")
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(6, model.config.num_latents, model.config.d_latents, generator=g)
    batch = {"latents": latents, "labels": torch.tensor([0, 1, 2, 0, 1, 2])}
    params = _trainable(model)
    ours, _ = per_sample_gradients(model, batch, params)
    gsm = GradSampleModule(model, loss_reduction="mean")
    gsm(**batch).loss.backward()
    for p, g in zip(params, ours):
        torch.testing.assert_close(p.grad_sample, g, rtol=1e-4, atol=1e-6)
    gsm._close()


def test_lora_and_discrete_survival_decompose_per_sample_and_cox_is_refused():
    """LoRA (adapters + head train) and the discrete-time survival head: the mean of the per-sample gradients is
    the batch gradient. The Cox partial likelihood is not a sum of per-sample terms: refused with the fix."""
    lora = configure_finetuning(_classifier(), "lora", lora_r=2)
    lora.eval()
    batch = _batch(lora.base_model.model)
    params = _trainable(lora)
    assert any("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)
    grads, _ = per_sample_gradients(lora, batch, params)
    full = torch.autograd.grad(lora(**batch).loss, params, allow_unused=True)
    for g, f in zip(grads, full):
        torch.testing.assert_close(g.mean(0), torch.zeros_like(g[0]) if f is None else f, rtol=1e-4, atol=1e-6)

    torch.manual_seed(0)
    config = tiny_config(
        modalities=TEXT_TABULAR, survival_loss="discrete", survival_time_bins=[1.0, 2.0, 4.0], hidden_dropout=0.0
    )
    labels = torch.tensor([[0.5, 1.0], [1.5, 0.0], [3.0, 1.0], [5.0, 0.0]])
    batch = {"inputs": random_batch(config, batch_size=4, seed=2), "labels": labels}
    # also with a wide & deep head: its linear term (coefficient tables indexed by feature id) decomposes too
    for linear in (None, ["tabular"]):
        torch.manual_seed(0)
        surv = bp.BioPerceiverForSurvival(tiny_config(**{**config.to_dict(), "head_linear_modalities": linear}))
        surv.eval()
        params = _trainable(surv)
        grads, _ = per_sample_gradients(surv, batch, params)
        full = torch.autograd.grad(surv(**batch).loss, params, allow_unused=True)
        for g, f in zip(grads, full):
            torch.testing.assert_close(g.mean(0), torch.zeros_like(g[0]) if f is None else f, rtol=1e-4, atol=1e-6)
        if linear:
            names = [n for n, p in surv.named_parameters() if p.requires_grad]
            table = grads[names.index("linear_term.numeric.tabular")]
            assert float(table.abs().sum()) > 0  # every row has its own gradient on the features it has

    spec = {"task": "survival", "time_column": "t", "event_column": "e"}
    Task.from_dict({**spec, "loss": "discrete"}).check_differential_privacy()
    with pytest.raises(ValueError, match=r"Cox partial likelihood.*--survival_loss discrete"):
        Task.from_dict({**spec, "loss": "cox"}).check_differential_privacy()


def test_dp_settings_name_the_fix():
    with pytest.raises(ValueError, match="exactly one of --dp_target_epsilon"):
        DPSettings(target_epsilon=3.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="rdp"):
        DPSettings(target_epsilon=3.0, accountant="gdpx")


def test_accountant_and_noise_equal_opacus_privacy_engine_for_the_same_schedule(tmp_path):
    """A linear-probe DP run (32 rows, batch 8, 2 epochs: Poisson rate 1/4, 8 steps) calibrates the same noise as
    Opacus' ``PrivacyEngine.make_private_with_epsilon`` and spends the same epsilon, at most the target (RDP; the PRV
    accountant goes through the same Opacus calls and is slow to calibrate, so it is not run here)."""
    accountant = "rdp"
    from transformers import TrainingArguments

    model = _classifier(num_labels=2)
    configure_finetuning(model, "linear_probe")
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(32, model.config.num_latents, model.config.d_latents, generator=g)
    train = LatentDataset(latents, list(torch.arange(32) % 2))
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=2, use_cpu=True, report_to=[],
        save_strategy="no", eval_strategy="no", learning_rate=0.1, remove_unused_columns=False,
        label_names=["labels"], disable_tqdm=True,
    )  # fmt: skip
    dp = DPSettings(target_epsilon=2.0, delta=1e-5, max_grad_norm=1.0, accountant=accountant)
    trainer = DPTaskTrainer(model=model, args=args, train_dataset=train, data_collator=TaskCollator({}), dp=dp)
    before = [p.detach().clone() for p in _trainable(model)]
    trainer.train()
    assert any(not torch.equal(b, p) for b, p in zip(before, _trainable(model)))
    report = trainer.privacy_report()
    assert report["steps"] == 8 and report["sample_rate"] == 0.25

    # Opacus' own path for the same schedule: 32 rows, batch 8 -> sample rate 1/4, 2 epochs
    module = torch.nn.Linear(3, 2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 3)), batch_size=8)
    engine = PrivacyEngine(accountant=accountant)
    _, optimizer, loader = engine.make_private_with_epsilon(
        module=module,
        optimizer=torch.optim.SGD(module.parameters(), lr=0.1),
        data_loader=loader,
        target_epsilon=2.0,
        target_delta=1e-5,
        epochs=2,
        max_grad_norm=1.0,
    )
    assert math.isclose(report["noise_multiplier"], optimizer.noise_multiplier, rel_tol=1e-9)
    reference = create_accountant(accountant)
    reference.history = [(optimizer.noise_multiplier, 1 / len(loader), 8)]
    assert math.isclose(report["epsilon"], reference.get_epsilon(delta=1e-5), rel_tol=1e-6)
    assert report["epsilon"] <= 2.0


def _load_script():
    return load_script("finetune/run_finetune.py")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dp_cohort")
    manifest = assign_splits(
        read_manifest(make_synthetic_cohort(root / "raw", num_patients=40, missing_rate=0.0, seed=5))
    )
    write_manifest(manifest.table, root / "split.parquet", manifest.metadata)
    settings = {"processors": {"text_note": {"vocab_size": 200, "min_frequency": 1, "max_length": 48}}}
    (root / "settings.yaml").write_text(yaml.safe_dump(settings))
    return {"manifest": root / "split.parquet", "settings": root / "settings.yaml"}


def _argv(cohort, out: Path, *args: str) -> list[str]:
    return [
        "--manifest", str(cohort["manifest"]), "--processor_settings", str(cohort["settings"]),
        "--output_dir", str(out), "--task", "classification", "--label_column", "label_binary",
        "--modalities", "text_note", "tabular_ehr", "--do_train", "true", "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "16", "--n_bootstrap", "10", "--min_pattern_samples", "5",
        "--mc_dropout_samples", "2", "--explain_samples", "1", "--use_cpu", "true", "--report_to", "none",
        "--seed", "0", "--disable_tqdm", "true", *args,
    ]  # fmt: skip


def _identifiers(manifest: Path) -> set[str]:
    table = read_manifest(manifest).table
    ids = set(table["sample_id"].astype(str)) | set(table["patient_id"].astype(str))
    # and the forms a file name would give them
    return ids | {re.sub(r"[^A-Za-z0-9._-]+", "_", i) for i in ids}


def test_dp_lora_run_reports_epsilon_and_shares_no_identifier(cohort, tmp_path):
    """``run_finetune.py --dp_target_epsilon 3`` with LoRA on the synthetic cohort: epsilon (at most the target)
    and delta in all_results.json, at every evaluation of the log history and in the card; then every file of the
    output folder (names too, checkpoints included, text and binary) is scanned for every sample and patient id of
    the manifest: only ``local_only/`` may hold them, and it does (the predictions)."""
    run_finetune = _load_script()
    out = tmp_path / "dp"
    argv = _argv(cohort, out, "--finetuning_mode", "lora", "--num_train_epochs", "2", "--learning_rate", "1e-2")
    argv += ["--ablations", "false", "--uncertainty", "false"]
    argv += ["--eval_strategy", "epoch", "--save_strategy", "epoch", "--dp_target_epsilon", "3", "--dp_delta", "1e-4"]
    results = run_finetune.main(argv)
    saved = json.loads((out / "all_results.json").read_text())
    privacy = saved["privacy"]
    assert 0 < privacy["epsilon"] <= 3.0 and privacy["delta"] == 1e-4 and privacy["steps"] > 0
    assert results["privacy"]["epsilon"] == privacy["epsilon"]
    state = json.loads(max(out.glob("checkpoint-*/trainer_state.json"), key=lambda p: p.stat().st_mtime).read_text())
    evals = [h for h in state["log_history"] if "eval_loss" in h]
    assert len(evals) == 2 and all(0 < h["dp_epsilon"] <= 3.0 and h["dp_delta"] == 1e-4 for h in evals)
    assert evals[0]["dp_epsilon"] < evals[1]["dp_epsilon"]
    card = (out / "README.md").read_text()
    assert "## Privacy" in card and f"epsilon = {privacy['epsilon']:.3g}" in card and "local_only/" in card
    assert list((out / "explanations").glob("test-*.png"))

    ids = _identifiers(cohort["manifest"])
    leaks = []
    for f in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = f.relative_to(out)
        if rel.parts[0] == LOCAL_ONLY_DIR:
            continue
        data = f.read_bytes()
        leaks += [(str(rel), i) for i in ids if i in str(rel) or i.encode() in data]
    assert not leaks, leaks[:5]
    local = predictions_path(out)
    assert local.parent.name == LOCAL_ONLY_DIR
    assert any(i.encode() in local.read_bytes() for i in ids)  # the scan would see them: the check is not vacuous
    assert (out / LOCAL_ONLY_DIR / "README.txt").exists()
    assert np.isfinite(saved["test"]["auroc"])


def test_cox_under_dp_is_refused_before_training(cohort, tmp_path, monkeypatch):
    from bioperceiver.training import finetune_loop

    def no_training(*_args, **_kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(finetune_loop, "build_datasets", no_training)
    run_finetune = _load_script()
    argv = _argv(cohort, tmp_path / "cox", "--max_steps", "1", "--dp_target_epsilon", "3")
    argv[argv.index("classification")] = "survival"
    with pytest.raises(SystemExit) as err:  # run_finetune.py: error: ... (exit status 2), caused by the refusal
        run_finetune.main(argv)
    assert err.value.code == 2 and "--survival_loss discrete" in str(err.value.__cause__)
