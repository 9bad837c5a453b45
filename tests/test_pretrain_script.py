"""pretrain/run_pretrain.py end to end on CPU: a run killed with SIGKILL right after a checkpoint and resumed with
--resume latest ends with exactly the parameters of an uninterrupted run, and writes a model card with bootstrap
intervals; shipped run YAMLs, accelerate YAMLs, DeepSpeed JSONs and the SLURM script are valid."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from conftest import synthetic_run_config
from safetensors.torch import load_file

from bioperceiver.cards import shareable_run_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "pretrain" / "run_pretrain.py"


def launch(config: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--config", str(config), *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )


@pytest.fixture(scope="module")
def run_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    synthetic_run_config(root, max_steps=6, warmup_steps=2, batch_size=8, save_steps=3, keep_last=2)
    return root


def test_killed_and_resumed_run_equals_uninterrupted_run(run_config):
    full = launch(run_config / "run.yaml", f"output_dir={run_config / 'full'}")
    assert full.returncode == 0, full.stderr[-3000:]
    crashed = launch(run_config / "run.yaml", f"output_dir={run_config / 'crash'}", "--crash_after_step", "3")
    assert crashed.returncode == -9  # SIGKILL right after checkpoint-3 was written
    assert (run_config / "crash" / "checkpoints" / "checkpoint-3").is_dir()
    assert not (run_config / "crash" / "final").exists()
    resumed = launch(run_config / "run.yaml", f"output_dir={run_config / 'crash'}", "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(run_config / "full" / "checkpoints" / "checkpoint-6" / "model.safetensors")
    b = load_file(run_config / "crash" / "checkpoints" / "checkpoint-6" / "model.safetensors")
    assert a.keys() == b.keys() and any("projection" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # backbone, projection head and temperature, bit for bit
    fa = load_file(run_config / "full" / "final" / "model.safetensors")
    start = load_file(run_config / "full" / "checkpoints" / "checkpoint-6" / "model.safetensors")
    for k in fa:  # the saved backbone is the trained one
        assert torch.equal(fa[k], start["model." + k]), k
    from transformers import AutoModel

    import bioperceiver  # noqa: F401  (registers the Auto classes)
    from bioperceiver.data import BioPerceiverProcessor

    AutoModel.from_pretrained(run_config / "full" / "final")
    BioPerceiverProcessor.from_pretrained(run_config / "full" / "final")
    kept = sorted(p.name for p in (run_config / "full" / "checkpoints").iterdir())
    assert kept == ["checkpoint-3", "checkpoint-6"]
    # the resolved run config travels with every checkpoint and with the final model, and reloads to the same config
    from bioperceiver.training import load_run_config

    resolved = load_run_config(run_config / "run.yaml", [f"output_dir={run_config / 'full'}"])
    for folder in ("checkpoints/checkpoint-3", "checkpoints/checkpoint-6", "final"):
        saved = run_config / "full" / folder / "run_config.yaml"
        assert saved.read_text() == resolved.to_yaml(), folder
        assert load_run_config(saved) == resolved, folder

    # the model card: loadable by huggingface_hub, retrieval R@k with 95% bootstrap intervals, compute used
    from huggingface_hub import ModelCard

    card = ModelCard.load(run_config / "full" / "final" / "README.md")
    assert card.data.library_name == "transformers" and "bioperceiver" in card.data.tags
    metrics = json.loads((run_config / "full" / "eval_results.json").read_text())
    pairs = [k.split("/", 1)[1] for k in metrics if k.startswith("queries/")]
    assert pairs
    for pair in pairs:
        lo, point, hi = (metrics[f"R@1{s}/{pair}"] for s in ("_ci_low", "", "_ci_high"))
        assert 0.0 <= lo <= point <= hi <= 1.0
        row = next(line for line in card.text.splitlines() if line.startswith(f"| {pair.replace('-', ' ↔ ', 1)} |"))
        assert f"{point:.3f} [{lo:.3f}, {hi:.3f}]" in row  # the table shows the run's own numbers
    assert re.search(r"\| optimizer steps \| 6 \|", card.text)
    card_yaml = card.text.split("## Training configuration", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    # the card shows the whole resolved config, local paths cut to their last component (shared, not the machine's)
    assert yaml.safe_load(card_yaml) == shareable_run_config(resolved.to_dict())
    assert yaml.safe_load((run_config / "full" / "final" / "run_config.yaml").read_text()) == resolved.to_dict()
    assert re.search(r"\| processes \| 1 \|", card.text)
    # what decides the float results besides code, data and seed: versions, threads, CPU kernels
    assert re.search(rf"\| torch threads per process \| {torch.get_num_threads()} \|", card.text)
    assert re.search(rf"\| CPU kernels \| {torch.backends.cpu.get_cpu_capability()} \|", card.text)
    assert f"transformers {transformers.__version__}" in card.text
    samples = int(re.search(r"\| samples seen \| (\d+) \|", card.text).group(1))
    assert samples == 6 * 8  # 6 steps of 8 samples (no sample of the synthetic cohort is skipped)
    # the resumed run counts samples across both segments
    resumed_card = (run_config / "crash" / "final" / "README.md").read_text()
    assert re.search(r"\| samples seen \| 48 \|", resumed_card)

    # ... and its history (history.json, the loss curves) holds both segments: the records of steps 1-3 come back
    # from checkpoint-3, the same as the uninterrupted run's (timings aside)
    def logged(run):
        history = json.loads((run_config / run / "history.json").read_text())
        return [(h["step"], h.get("loss"), h.get("eval_loss"), h.get("lr")) for h in history]

    assert logged("crash") == logged("full") and [s for s, loss, _, _ in logged("full") if loss] == [1, 2, 3, 4, 5, 6]


def test_two_runs_in_one_process_may_use_different_precisions(tmp_path):
    """A notebook or sweep calling ``run_pretraining`` twice: the second run gets its own mixed precision (accelerate
    keeps one AcceleratorState per process and refused the change before), and each card records its own."""
    import logging

    from bioperceiver.training import load_run_config
    from bioperceiver.training.loop import run_pretraining

    logging.getLogger("bioperceiver").setLevel(logging.WARNING)
    path = synthetic_run_config(tmp_path, max_steps=2, warmup_steps=1, batch_size=8, save_steps=2, keep_last=1)
    for precision in ("no", "bf16", "no"):
        out = tmp_path / f"run_{precision}_{len(list(tmp_path.glob('run_*')))}"
        cfg = load_run_config(path, [f"output_dir={out}", f"train.mixed_precision={precision}"])
        result = run_pretraining(cfg)
        assert result["steps"] == 2 and result["losses_finite"], precision
        assert re.search(rf"mixed precision\W+{precision}\b", (out / "final" / "README.md").read_text()), precision


def test_shipped_run_configs_parse():
    """Every shipped run YAML parses against the typed config, with overrides applied on top."""
    from bioperceiver.training import PretrainConfig, load_run_config

    configs = sorted((ROOT / "pretrain" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        cfg = load_run_config(path, ["optim.lr=0.5", "loss.name=siglip"])
        assert isinstance(cfg, PretrainConfig)
        assert cfg.optim.lr == 0.5 and cfg.loss.name == "siglip"
        raw = yaml.safe_load(path.read_text())  # every key the file sets is read as written
        for section, values in raw.items():
            if not isinstance(values, dict):
                assert getattr(cfg, section) == _as_resolved(section, values, path), section
                continue
            for key, value in values.items():
                if f"{section}.{key}" not in ("optim.lr", "loss.name"):
                    got = getattr(getattr(cfg, section), key)
                    assert got == _as_resolved(f"{section}.{key}", value, path), f"{section}.{key}"


def _as_resolved(key: str, value, config_file: Path):
    """A path key's value as the config resolves it: relative to the config file's folder."""
    from bioperceiver.training.config import PATH_KEYS

    if key in PATH_KEYS and isinstance(value, str):
        return os.path.normpath(config_file.parent / value)
    return value


ACCEL = ROOT / "pretrain" / "configs" / "accelerate"
EXPECTED_TYPES = {
    "cpu": "NO",
    "single_gpu": "NO",
    "cpu_ddp": "MULTI_GPU",
    "ddp": "MULTI_GPU",
    "fsdp": "FSDP",
    "deepspeed_zero2": "DEEPSPEED",
    "deepspeed_zero3": "DEEPSPEED",
}


def test_shipped_accelerate_configs_load_with_accelerate():
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    files = sorted(ACCEL.glob("*.yaml"))
    assert {p.stem for p in files} == set(EXPECTED_TYPES)
    for path in files:
        cfg = load_config_from_file(str(path))
        assert isinstance(cfg, ClusterConfig), path
        assert cfg.distributed_type.value == EXPECTED_TYPES[path.stem], path
        assert cfg.num_machines == 1 and cfg.machine_rank == 0 and cfg.num_processes >= 1, path
        assert cfg.use_cpu == path.stem.startswith("cpu"), path
        if cfg.distributed_type.value == "DEEPSPEED":
            ds = cfg.deepspeed_config
            assert (ROOT / ds["deepspeed_config_file"]).is_file(), path  # relative to the repository root
            # accelerate refuses these next to a deepspeed_config_file: they belong to the JSON ("auto")
            forbidden = {"gradient_accumulation_steps", "gradient_clipping", "zero_stage", "offload_optimizer_device"}
            assert not forbidden & set(ds), path
            assert path.stem.endswith(ds["deepspeed_config_file"].split("/")[-1].removesuffix(".json")), path
        if cfg.distributed_type.value == "FSDP":
            from bioperceiver import BioPerceiverPreTrainedModel

            wrapped = cfg.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",")
            assert set(wrapped) == set(BioPerceiverPreTrainedModel._no_split_modules), path


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_jsons_leave_batch_precision_and_clipping_to_the_run_yaml(stage):
    cfg = json.loads((ROOT / "pretrain" / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
    auto = ["train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"]
    assert all(cfg[k] == "auto" for k in auto)
    assert cfg["fp16"]["enabled"] == "auto" and cfg["bf16"]["enabled"] == "auto"
    assert cfg["zero_optimization"]["stage"] == stage
    # run_pretrain.py passes its own torch AdamW + cosine schedule (weight-decay groups, warm-up): none here
    assert "optimizer" not in cfg and "scheduler" not in cfg
    if stage == 3:  # final/ needs the full weights gathered at save time
        assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


SBATCH = ROOT / "pretrain" / "configs" / "slurm" / "pretrain_multinode.sbatch"


def test_slurm_script_parses_and_launches_one_accelerate_per_node(tmp_path):
    """``bash -n``, then a dry run with stub ``scontrol``/``srun``/``accelerate`` on PATH: srun runs the per-node
    command as node 1 of 2, the stub accelerate records its arguments."""
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    stubs = tmp_path / "bin"
    stubs.mkdir()
    scripts = {
        "scontrol": 'printf "gpu-node-a\\ngpu-node-b\\n"',
        # the last srun arguments are: bash -c CMD bash ARGS... ; run them as the task of node 1
        "srun": 'while [[ "$1" == --* ]]; do shift; done; SLURM_NODEID=1 exec "$@"',
        "accelerate": f'printf "%s\\n" "$@" > {tmp_path}/accelerate_args',
    }
    for name, body in scripts.items():
        (stubs / name).write_text(f"#!/bin/bash\n{body}\n")
        (stubs / name).chmod(stat.S_IRWXU)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
        "PATH": f"{stubs}:{os.environ['PATH']}",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu-node-[a-b]",
        "SLURM_JOB_ID": "4242",
        "SLURM_GPUS_ON_NODE": "4",
    }
    res = subprocess.run(
        ["bash", str(SBATCH), "--config", "my run.yaml", "optim.max_steps=10"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    args = (tmp_path / "accelerate_args").read_text().splitlines()
    opts = dict(zip(args[1::2], args[2::2], strict=False)) if args[0] == "launch" else {}
    assert args[0] == "launch"
    assert opts["--num_machines"] == "2" and opts["--num_processes"] == "8"  # 2 nodes x 4 GPUs
    assert opts["--machine_rank"] == "1" and opts["--main_process_ip"] == "gpu-node-a"
    assert opts["--main_process_port"] == str(29500 + 4242 % 1000)
    assert opts["--config_file"] == "pretrain/configs/accelerate/ddp.yaml"
    assert args[-4:] == ["pretrain/run_pretrain.py", "--config", "my run.yaml", "optim.max_steps=10"]


def test_retrieval_bootstrap_intervals_resample_queries_by_patient():
    """R@k intervals: point estimates as without the bootstrap; each resample is R@k over the drawn patients' queries
    (recomputed here by brute force); deterministic for a seed."""
    import numpy as np

    from bioperceiver.training import retrieval_metrics

    g = torch.Generator().manual_seed(0)
    views = torch.randn(60, 3, 8, generator=g)
    views[:, 1] = views[:, 0] + 0.7 * torch.randn(60, 8, generator=g)  # a and b aligned, noisily
    mask = torch.rand(60, 3, generator=g) > 0.2
    patients = [f"p{i // 3}" for i in range(60)]  # 3 samples per patient
    plain = retrieval_metrics(views, mask, ["a", "b", "fused"])
    boot = retrieval_metrics(views, mask, ["a", "b", "fused"], n_bootstrap=50, groups=patients, seed=3)
    assert boot == retrieval_metrics(views, mask, ["a", "b", "fused"], n_bootstrap=50, groups=patients, seed=3)
    assert {k: boot[k] for k in plain} == plain
    assert boot["R@1_ci_low/a-b"] < boot["R@1/a-b"] < boot["R@1_ci_high/a-b"]

    # brute force: the same draws of patients (numpy default_rng(seed), as many as there are patients)
    z = torch.nn.functional.normalize(views, dim=-1)
    both = (mask[:, 0] & mask[:, 1]).nonzero().flatten().tolist()
    q_patients = sorted({patients[i] for i in both})
    draws = np.random.default_rng(3).integers(0, len(q_patients), size=(50, len(q_patients)))

    def hit(q, x, y):
        cand = mask[:, y].nonzero().flatten()
        sims = z[cand, y] @ z[q, x]
        return float((sims > sims[(cand == q).nonzero().item()]).sum() < 1)

    per_query = {q: (hit(q, 0, 1) + hit(q, 1, 0)) / 2 for q in both}
    resampled = []
    for drawn in draws:
        rows = [q for d in drawn for q in both if patients[q] == q_patients[d]]
        resampled.append(np.mean([per_query[q] for q in rows]))
    low, high = np.quantile(resampled, [0.025, 0.975])
    assert boot["R@1_ci_low/a-b"] == pytest.approx(low) and boot["R@1_ci_high/a-b"] == pytest.approx(high)


def test_ddp_processes_skip_together_when_one_gets_an_empty_batch(tmp_path):
    """Batch size 1 per process and broken image paths: a batch that is empty on one process only (its sample
    skipped) is skipped by both. Before, only that process skipped it, so from then on the processes' gradient
    all-reduces paired different batches (and their step counters drifted apart) without any message."""
    import pandas as pd

    run = synthetic_run_config(
        tmp_path, max_steps=16, warmup_steps=1, batch_size=1, save_steps=100, keep_last=1, eval={"steps": 0}
    )
    manifest = Path(yaml.safe_load(run.read_text())["data"]["manifest"])
    table = pd.read_parquet(manifest)
    broken = table.index[table["image_2d"].notna()][::3]
    table.loc[broken, "image_2d"] = "synthetic/images/does-not-exist.png"
    table.to_parquet(manifest)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--config_file",
        str(ROOT / "pretrain" / "configs" / "accelerate" / "cpu_ddp.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        "0",
        str(ROOT / "pretrain" / "run_pretrain.py"),
        "--config",
        str(run),
        f"output_dir={tmp_path / 'out'}",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert re.search(r"every sample skipped on 1 process\(es\); all skip it", res.stderr)
    assert (tmp_path / "out" / "final" / "model.safetensors").exists()


def test_the_saved_projection_head_reproduces_the_runs_held_out_retrieval(run_config, tmp_path):
    """The contrastive projection head travels with the final backbone (``projection_head.safetensors``, the
    trained weights), and ``bioperceiver embed --space projected`` on the held-out split gives back the run's own
    held-out retrieval R@k (eval_results.json, the model card's table) -- the space ``search`` should compare
    modalities in; ``--space latent`` is the backbone's (another space: other numbers)."""
    out = run_config / "full"
    if not (out / "final").is_dir():  # this module's first test made it; alone, run it here
        assert launch(run_config / "run.yaml", f"output_dir={out}").returncode == 0
    from bioperceiver.data import assign_splits, read_manifest
    from bioperceiver.inference.embedding import FUSED, embed, embedding_column, read_embeddings
    from bioperceiver.inference.loading import load_model_folder
    from bioperceiver.layers.projection import PROJECTION_HEAD_FILE, projection_state_from_checkpoint
    from bioperceiver.training import load_run_config
    from bioperceiver.training.pretraining import retrieval_metrics

    head = load_file(out / "final" / PROJECTION_HEAD_FILE)
    trained = projection_state_from_checkpoint(out / "checkpoints" / "checkpoint-6")  # the last step's
    assert head.keys() == trained.keys() and len(head) == 4
    for k in head:
        assert torch.equal(head[k], trained[k]), k
    loaded = load_model_folder(out / "final", device="cpu")
    assert loaded.projection is not None
    cfg = load_run_config(out / "final" / "run_config.yaml")
    held_out = assign_splits(read_manifest(cfg.data.manifest)).split(cfg.eval.split)  # as the run split it
    metrics = json.loads((out / "eval_results.json").read_text())
    names = [*loaded.backbone.modality_names, FUSED]
    recomputed = {}
    for space in ("projected", "latent"):
        embed(loaded, held_out, tmp_path / space, process_index=0, num_processes=1, progress=False, space=space)
        frame, meta = read_embeddings(tmp_path / space)
        width = loaded.backbone.config.projection_dim if space == "projected" else loaded.backbone.config.d_latents
        assert meta["space"] == space and meta["embedding_dim"] == width
        cells = [[frame[embedding_column(n)].iloc[i] for n in names] for i in range(len(frame))]
        mask = torch.tensor([[c is not None for c in row] for row in cells])
        views = torch.stack(
            [torch.stack([torch.as_tensor(c) if c is not None else torch.zeros(width) for c in row]) for row in cells]
        )
        recomputed[space] = retrieval_metrics(views, mask, names)
    pairs = [k.split("/", 1)[1] for k in metrics if k.startswith("queries/")]
    assert pairs
    for pair in pairs:
        assert recomputed["projected"][f"queries/{pair}"] == metrics[f"queries/{pair}"], pair
        for k in (1, 5, 10):
            assert recomputed["projected"][f"R@{k}/{pair}"] == pytest.approx(metrics[f"R@{k}/{pair}"], abs=1e-9), (
                pair,
                k,
            )
    assert any(recomputed["latent"][f"R@1/{p}"] != metrics[f"R@1/{p}"] for p in pairs)


def test_retrieval_space_benchmark_reproduces_the_run_and_restores_an_older_runs_head(run_config, tmp_path):
    """benchmarks/retrieval_space.py on a finished run: its projected R@1 equals the run's own evaluation; a run
    saved before heads were saved (no projection_head.safetensors in final/) needs --head_from_checkpoint, which
    takes the last checkpoint's head into a copy (the run folder is left as it was) and gives the same numbers."""
    import shutil

    from script_loader import load_script

    out = run_config / "full"
    if not (out / "final").is_dir():
        assert launch(run_config / "run.yaml", f"output_dir={out}").returncode == 0
    bench = load_script("benchmarks/retrieval_space.py", "retrieval_space_for_tests")
    bench.main(["--runs", str(out), "--n_bootstrap", "20", "--output_dir", str(tmp_path / "new")])
    new = json.loads((tmp_path / "new" / "retrieval_space.json").read_text())["runs"][0]
    assert new["head"] == "final/" and new["projected_equals_recorded"] and new["pairs"]
    old = tmp_path / "old_run"
    shutil.copytree(out, old, ignore=shutil.ignore_patterns("projection_head.safetensors"))
    with pytest.raises(SystemExit, match="--head_from_checkpoint"):
        bench.main(["--runs", str(old), "--output_dir", str(tmp_path / "x")])
    bench.main(
        ["--runs", str(old), "--head_from_checkpoint", "--n_bootstrap", "20", "--output_dir", str(tmp_path / "o")]
    )
    restored = json.loads((tmp_path / "o" / "retrieval_space.json").read_text())["runs"][0]
    assert restored["head"] == "last checkpoint" and not (old / "final" / "projection_head.safetensors").exists()
    assert restored["pairs"] == {**new["pairs"]}  # the same head, the same numbers


def test_decorrelation_run_logs_its_term_and_the_spectrum_benchmark_pairs_it_with_the_plain_run(run_config, tmp_path):
    """``loss.decorrelation`` end to end (a launch with the override), then benchmarks/embedding_spectrum.py on the
    plain and the decorrelated run: its numbers are the held-out latents' spectra (recomputed here from ``embed``) and
    the runs' own recorded R@1, and each difference is decorrelated minus plain."""
    import numpy as np
    from script_loader import load_script

    from bioperceiver.data import assign_splits, read_manifest
    from bioperceiver.inference.embedding import embed, embedding_column, read_embeddings
    from bioperceiver.inference.loading import load_model_folder
    from bioperceiver.training import load_run_config

    plain, decor = run_config / "full", run_config / "decor"
    if not (plain / "final").is_dir():
        assert launch(run_config / "run.yaml", f"output_dir={plain}").returncode == 0
    res = launch(run_config / "run.yaml", f"output_dir={decor}", "loss.decorrelation=2.0")
    assert res.returncode == 0, res.stderr[-3000:]
    logged = [h["loss_decorrelation"] for h in json.loads((decor / "history.json").read_text()) if "loss" in h]
    assert logged and all(0 < v < 1 for v in logged)
    assert not any("loss_decorrelation" in h for h in json.loads((plain / "history.json").read_text()))
    assert load_run_config(decor / "final" / "run_config.yaml").loss.decorrelation == 2.0

    bench = load_script("benchmarks/embedding_spectrum.py", "embedding_spectrum_for_tests")
    out = tmp_path / "spectrum"
    bench.main(["--group", "plain", str(plain), "--group", "decor", str(decor), "--output_dir", str(out)])
    result = json.loads((out / "embedding_spectrum.json").read_text())
    assert (out / "embedding_spectrum.md").read_text().startswith("| metric | plain | decor |")
    runs = {g: rs[0] for g, rs in result["groups"].items()}
    assert runs["decor"]["decorrelation"] == 2.0 and runs["plain"]["decorrelation"] == 0.0
    cfg = load_run_config(decor / "final" / "run_config.yaml")
    held_out = assign_splits(read_manifest(cfg.data.manifest)).split(cfg.eval.split)
    embed(load_model_folder(decor / "final"), held_out, tmp_path / "emb", batch_size=4, progress=False)
    frame, _ = read_embeddings(tmp_path / "emb")
    for view, stats in runs["decor"]["views"].items():
        x = np.stack([np.asarray(c) for c in frame[embedding_column(view)] if c is not None])
        s = np.linalg.svd(x - x.mean(0), compute_uv=False)
        p = s / s.sum()
        assert stats["effective_rank"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-4)
        corr = np.corrcoef(x, rowvar=False)
        off = corr[~np.eye(len(corr), dtype=bool)]
        assert stats["mean_sq_offdiag_corr"] == pytest.approx(float(np.mean(off**2)), rel=1e-4)
    recorded = json.loads((decor / "eval_results.json").read_text())
    for pair, rec in runs["decor"]["retrieval"].items():
        assert rec["R@1"] == recorded[f"R@1/{pair}"]
    for row in result["summary"].values():
        assert row["decor"]["difference"] == pytest.approx(row["decor"]["mean"] - row["plain"]["mean"], abs=1e-12)
    with pytest.raises(SystemExit, match="same number of runs"):
        bench.main(["--group", "a", str(plain), str(decor), "--group", "b", str(decor), "--output_dir", str(out)])


def test_effective_rank_counts_equal_directions():
    import numpy as np
    from script_loader import load_script

    bench = load_script("benchmarks/embedding_spectrum.py", "embedding_spectrum_for_tests")
    rng = np.random.default_rng(0)
    g = rng.normal(size=(50, 20))
    q, _ = np.linalg.qr(g - g.mean(0))  # orthonormal columns with zero mean
    v, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    for k in (1, 3, 8):
        x = q[:, :k] @ np.diag(np.full(k, 5.0)) @ v[:k] + 2.0  # k equal singular values, shifted
        assert bench.effective_rank(x) == pytest.approx(k, rel=1e-6)
    # standardising undoes unequal scales of uncorrelated dimensions; the correlations stay 0
    x = q[:, :4] * np.array([100.0, 1.0, 0.01, 3.0]) * np.sqrt(50)
    stats = bench.spectrum_stats(x)
    assert stats["effective_rank"] < 2.0
    assert stats["effective_rank_standardised"] == pytest.approx(4.0, rel=1e-3)
    assert stats["mean_sq_offdiag_corr"] == pytest.approx(0.0, abs=1e-6)
    constant = np.column_stack([x, np.ones(50)])
    assert bench.spectrum_stats(constant)["constant_dims"] == 1


def test_modality_values_dropped_in_training_are_summarised_once_and_named_in_the_card(tmp_path, caplog):
    """A bad omics value among good rows under the default ``on_error: skip_modality``: the run trains, logs one
    summary of what it dropped (each sample once, however many epochs met it, one warning per sample) and the card
    says so beside its presence tables, which count manifest cells."""
    import logging

    from bioperceiver.data import assign_splits, read_manifest, write_manifest
    from bioperceiver.training import load_run_config
    from bioperceiver.training.loop import run_pretraining

    path = synthetic_run_config(tmp_path, max_steps=12, warmup_steps=1, batch_size=8, save_steps=12, keep_last=1)
    cfg = yaml.safe_load(path.read_text())
    manifest = read_manifest(cfg["data"]["manifest"])
    table = manifest.table
    split = assign_splits(manifest).table["split"]  # the run's split (the salted patient hash)
    others = table[[m for m in manifest.modalities if m != "omics_expression"]].notna().any(axis=1)
    train = table.index[(split == "train") & table["omics_expression"].notna() & others]  # kept without omics
    bad = [str(table.loc[i, "sample_id"]) for i in train[:2]]
    for i in train[:2]:
        table.at[i, "omics_expression"] = json.dumps({"TP53": "high"})
    write_manifest(table, cfg["data"]["manifest"], manifest.metadata)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="bioperceiver"):
        result = run_pretraining(load_run_config(path, [f"output_dir={out}", "data.on_error=skip_modality"]))
    assert result["steps"] == 12 and result["losses_finite"]
    epochs = 12 * 8 // int((split == "train").sum())
    assert epochs >= 2  # every bad sample was met more than once
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pretraining batches")]
    assert len(summary) == 1 and "dropped 2 modality value(s)" in summary[0], summary
    for sid in bad:
        warnings = [r for r in caplog.records if "modality dropped" in r.getMessage() and repr(sid) in r.getMessage()]
        assert len(warnings) == 1, (sid, [r.getMessage() for r in warnings])
    card = (out / "final" / "README.md").read_text()
    assert re.search(r"skipped in training.*2 omics_expression value\(s\)", card)


def test_processors_fitted_with_other_settings_are_refused_not_silently_reused(tmp_path):
    """``data.processor_dir`` already holds processors (an earlier run, even a failed one): reused when they were
    fitted with the run's settings, refused, naming the modality and the setting, when the settings changed (they
    were reused silently and the card showed the new settings file)."""
    from bioperceiver.data import BioPerceiverProcessor
    from bioperceiver.training import RunConfigError, load_run_config
    from bioperceiver.training.loop import prepare_data

    class OneProcess:
        is_main_process, num_processes = True, 1

        def wait_for_everyone(self):
            pass

    path = synthetic_run_config(tmp_path, max_steps=1, warmup_steps=1, batch_size=8, save_steps=1, keep_last=1)
    cfg = load_run_config(path, [f"output_dir={tmp_path / 'run'}"])
    _, fitted, _ = prepare_data(cfg, OneProcess(), tmp_path / "run")
    index = tmp_path / "processors" / "bioperceiver_processor.json"
    stamp = index.stat().st_mtime_ns
    _, again, _ = prepare_data(cfg, OneProcess(), tmp_path / "run")  # same settings: reused, not refitted
    assert index.stat().st_mtime_ns == stamp
    assert again.fingerprint() == fitted.fingerprint()
    settings = yaml.safe_load((tmp_path / "settings.yaml").read_text())
    settings["processors"]["image_2d"]["spatial_size"] = [8, 8]
    (tmp_path / "settings.yaml").write_text(yaml.safe_dump(settings))
    with pytest.raises(RunConfigError, match=r"image_2d.*spatial_size.*\[16, 16\].*\[8, 8\]"):
        prepare_data(load_run_config(path, [f"output_dir={tmp_path / 'run'}"]), OneProcess(), tmp_path / "run")
    assert BioPerceiverProcessor.from_pretrained(tmp_path / "processors").fingerprint() == fitted.fingerprint()
    # processors saved before the image axis order was a setting load as "legacy": reused (they warn), not refused
    from bioperceiver.training.loop import check_reused_processors

    old = BioPerceiverProcessor.from_pretrained(tmp_path / "processors")
    old.processors["image_2d"].settings.axis_order = "legacy"
    check_reused_processors(old, BioPerceiverProcessor.from_pretrained(tmp_path / "processors"), tmp_path)
