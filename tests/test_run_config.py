"""The typed pretraining run config: unknown keys and wrong types fail before any work, naming the key, its section
and the closest valid key; overrides are parsed as YAML; ``--print_config`` prints the resolved config."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from script_loader import load_script

from bioperceiver.training.config import PretrainConfig, RunConfigError, load_run_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "pretrain" / "configs" / "demo.yaml"


@pytest.fixture
def run_pretrain():
    """The script as a module (loaded from its file, not through ``sys.path``), to call ``main(argv)`` in-process."""
    return load_script("pretrain/run_pretrain.py", "run_pretrain_script")


def test_typo_on_the_command_line_exits_before_any_work_naming_the_key_and_the_fix(run_pretrain, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the run must not start")

    monkeypatch.setattr(run_pretrain, "run_pretraining", no_work)
    with pytest.raises(SystemExit) as exit_info:
        run_pretrain.main(["--config", str(DEMO), "optim.max_step=3"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "'max_step'" in err and "'optim'" in err and "did you mean 'max_steps'" in err.lower()


def test_unknown_key_in_the_file_and_unknown_section(tmp_path):
    raw = yaml.safe_load(DEMO.read_text())
    raw["train"]["batch_sise"] = 8
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(RunConfigError, match=r"'batch_sise'.*section 'train'.*bad\.yaml.*Did you mean 'batch_size'"):
        load_run_config(tmp_path / "bad.yaml")
    with pytest.raises(RunConfigError, match=r"'optimizer'.*top level.*Did you mean 'optim'"):
        load_run_config(DEMO, ["optimizer.lr=1"])
    with pytest.raises(RunConfigError, match=r"key\.sub=value"):
        load_run_config(DEMO, ["optim.max_steps"])


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("optim.lr=abc", r"optim\.lr: expected float, got 'abc'"),
        ("optim.max_steps=1.5", r"optim\.max_steps: expected int"),
        ("train.mixed_precision=fp8", r"train\.mixed_precision: expected one of no\|bf16\|fp16"),
        ("loss.fused_view=maybe", r"loss\.fused_view: expected bool"),
        ("optim.betas=[0.9]", r"optim\.betas: expected two numbers"),
        ("loss.name=siglp", r"unknown loss 'siglp'; did you mean 'siglip'"),
        ("optim=3", r"optim in .* must be a mapping"),
    ],
)
def test_wrong_types_fail_with_the_key(override, pattern):
    with pytest.raises(RunConfigError, match=pattern):
        load_run_config(DEMO, [override])


def test_overrides_are_yaml_and_convert_only_losslessly():
    cfg = load_run_config(
        DEMO,
        [
            "optim.lr=1e-4",  # YAML 1.1 reads this as a string: a float field takes it
            "optim.weight_decay=0",  # int -> float
            "optim.betas=[0.8, 0.9]",
            "train.mixed_precision=no",  # YAML reads `no` as False: the choice "no" is meant
            "logging.report_to=[tensorboard, wandb]",
            "model.overrides.d_latents=64",  # free-form section: any key
            "eval.steps=0",
        ],
    )
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.weight_decay, float) and cfg.optim.weight_decay == 0.0
    assert cfg.optim.betas == [0.8, 0.9] and cfg.train.mixed_precision == "no"
    assert cfg.logging.report_to == ["tensorboard", "wandb"]
    assert cfg.model.overrides == {"d_latents": 64} and cfg.eval.steps == 0
    assert cfg.optim.max_steps == 150  # untouched keys keep the file's values
    # the resolved config round-trips through its YAML
    assert PretrainConfig.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_defaults_are_the_loops_and_sections_may_be_left_out(tmp_path):
    (tmp_path / "small.yaml").write_text("seed: 3\noptim: {max_steps: 7}\n")
    cfg = load_run_config(tmp_path / "small.yaml")
    assert cfg.seed == 3 and cfg.optim.max_steps == 7 and cfg.optim.warmup_steps == 10
    assert cfg.eval.steps == 0 and cfg.eval.n_bootstrap == 1000 and cfg.loss.leave_one_out == 0.0
    assert cfg.loss.loss_kwargs() == {}  # each loss keeps its own temperature default
    assert load_run_config(DEMO).loss.loss_kwargs() == {"init_temperature": 0.07}


def test_print_config_prints_the_resolved_config_and_exits_without_training(run_pretrain, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("--print_config must not train")

    monkeypatch.setattr(run_pretrain, "run_pretraining", no_work)
    run_pretrain.main(["--config", str(DEMO), "--print_config", "optim.max_steps=3", "loss.name=siglip"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == load_run_config(DEMO, ["optim.max_steps=3", "loss.name=siglip"]).to_dict()
    assert printed["optim"]["max_steps"] == 3 and printed["eval"]["n_bootstrap"] == 1000  # defaults shown too


def test_print_config_exits_zero_as_a_command():
    import subprocess

    res = subprocess.run(
        [sys.executable, str(ROOT / "pretrain" / "run_pretrain.py"), "--config", str(DEMO), "--print_config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert yaml.safe_load(res.stdout)["optim"]["max_steps"] == 150


def test_relative_paths_resolve_against_the_config_files_folder_and_overrides_against_the_cwd(tmp_path, monkeypatch):
    """Before, every relative path resolved against the working directory (and processor_settings against the
    repository root), so a copied config read and wrote different places depending on where it was run from."""
    folder = tmp_path / "project" / "configs"
    folder.mkdir(parents=True)
    (folder / "run.yaml").write_text(
        "output_dir: ../runs/a\n"
        "data: {manifest: ../data/m.parquet, processor_dir: procs, processor_settings: settings.yaml}\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_run_config(folder / "run.yaml")
    assert cfg.output_dir == str(tmp_path / "project" / "runs" / "a")
    assert cfg.data.manifest == str(tmp_path / "project" / "data" / "m.parquet")
    assert cfg.data.processor_dir == str(folder / "procs")
    assert cfg.data.processor_settings == str(folder / "settings.yaml")
    # the same keys typed on the command line resolve against the working directory; absolute paths stay
    cfg = load_run_config(folder / "run.yaml", ["output_dir=out/b", "data.manifest=/abs/m.csv"])
    assert cfg.output_dir == str(elsewhere / "out" / "b") and cfg.data.manifest == "/abs/m.csv"
    assert load_run_config(None).output_dir == str(elsewhere / "outputs" / "demo" / "pretrain")  # a default: cwd
    # the resolved config reloads to itself (what checkpoints keep and --config takes again)
    (tmp_path / "saved.yaml").write_text(cfg.to_yaml())
    assert load_run_config(tmp_path / "saved.yaml") == cfg


def test_demo_config_reads_and_writes_the_same_places_from_any_working_directory(tmp_path, monkeypatch):
    """`make demo` runs from the repository root: outputs/demo/... and tokenizers/demo_processors.yaml as before."""
    monkeypatch.chdir(tmp_path)
    cfg = load_run_config(DEMO)
    assert cfg.output_dir == str(ROOT / "outputs" / "demo" / "pretrain")
    assert cfg.data.manifest == str(ROOT / "outputs" / "demo" / "cohort" / "manifest.parquet")
    assert cfg.data.processor_dir == str(ROOT / "outputs" / "demo" / "model")
    assert cfg.data.processor_settings == str(ROOT / "tokenizers" / "demo_processors.yaml")
    assert Path(cfg.data.processor_settings).is_file()


@pytest.mark.parametrize("value", ["skip_modality", "skip_sample", "skip", "raise"])
def test_on_error_takes_the_per_sample_policies(value):
    assert load_run_config(DEMO, [f"data.on_error={value}"]).data.on_error == value


def test_on_error_rejects_an_unknown_policy():
    with pytest.raises(
        RunConfigError, match=r"data\.on_error: expected one of skip_modality\|skip_sample\|skip\|raise"
    ):
        load_run_config(DEMO, ["data.on_error=drop"])


def test_resume_conflicts_name_changed_keys_outside_the_allow_list():
    from bioperceiver.training.config import RESUME_MUTABLE_KEYS, changed_keys, config_hash, resume_conflicts

    saved = load_run_config(DEMO)
    allowed = load_run_config(
        DEMO,
        [
            "optim.max_steps=300",
            "checkpoint.save_steps=7",
            "checkpoint.keep_last=5",
            "eval.steps=3",
            "eval.n_bootstrap=0",
            "eval.training_patients=true",  # an extra evaluation: training is unchanged (test_reconstruction.py)
            "logging.report_to=none",
            "logging.log_steps=1",
            "output_dir=/elsewhere",
        ],
    )
    assert len(changed_keys(saved, allowed)) == 9 and resume_conflicts(saved, allowed) == []
    assert config_hash(saved) != config_hash(allowed) and config_hash(saved) == config_hash(load_run_config(DEMO))
    changed = load_run_config(
        DEMO, ["optim.lr=0.1", "model.overrides.d_latents=64", "train.batch_size=4", "seed=1", "data.on_error=raise"]
    )
    assert resume_conflicts(saved, changed) == [
        "data.on_error",
        "model.overrides",
        "optim.lr",
        "seed",
        "train.batch_size",
    ]
    assert "optim.lr" not in RESUME_MUTABLE_KEYS and "logging.*" in RESUME_MUTABLE_KEYS
