"""benchmarks/evidence.py runs its parts in order, skips finished ones, respects prerequisites and resumes
interrupted pretraining runs from their last checkpoint."""

from __future__ import annotations

import fnmatch
import json
import sys
from pathlib import Path

import pytest
import yaml
from script_loader import load_script

ROOT = Path(__file__).resolve().parents[1]
evidence = load_script("benchmarks/evidence.py")


# the label-efficiency runs' seed pairs as (folder suffix, fold-wise backbone folder, --init_seed), as evidence.py
# names them (evidence.SEED_PAIRS)
SEED_PAIR_RUNS = (
    ("", "pretrain_cvfolds", "0"),
    ("_init1", "pretrain_cvfolds", "1"),
    ("_pre1", "pretrain_cvfolds_seed1", "1"),
    ("_pre2", "pretrain_cvfolds_seed2", "2"),
)


def _writer(path: str, text: str = "{}") -> list[str]:
    return [
        "{python}",
        "-c",
        f"import pathlib; p = pathlib.Path(r'{path}'); p.parent.mkdir(parents=True, exist_ok=True); "
        f"p.write_text({text!r})",
    ]


def test_each_part_records_the_host_and_the_summary_says_when_parts_ran_on_different_hosts(
    tmp_path, monkeypatch, caplog
):
    """The CPU model, CPU kernels, thread count and GPUs are logged per part (AVX2 and AVX-512 kernels end the same
    SurvSet pretraining at different weights); EVIDENCE.md and the log warn when finished parts ran elsewhere."""
    import torch

    facts = evidence.host()
    assert facts["cpu_kernels"] == torch.backends.cpu.get_cpu_capability()
    assert facts["torch_threads"] == torch.get_num_threads() and facts["cpus"] >= 1
    assert facts["cpu"] and facts["cpu"] != "unknown"
    assert facts["gpus"] == ([] if not torch.cuda.is_available() else facts["gpus"])
    if Path("/proc/cpuinfo").exists():  # the model name line as the kernel writes it
        names = [
            ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln
        ]
        assert facts["cpu"] == names[0]

    monkeypatch.setattr(
        evidence, "PARTS", [evidence.Part(n, n, _writer(f"{{work}}/{n}.json"), f"{n}.json") for n in "ab"]
    )
    work = tmp_path / "w"
    assert evidence.main(["--work_dir", str(work), "--only", "a"]) == 0
    log = json.loads((work / "evidence_log.json").read_text())
    assert log["a"]["environment"]["host"] == facts
    assert "hosts" not in (work / "EVIDENCE.md").read_text()
    elsewhere = {**facts, "cpu": "Intel(R) Xeon(R) Platinum 8488C", "cpu_kernels": "AVX512"}
    log["a"]["environment"]["host"] = elsewhere  # as if part a had run on another machine
    (work / "evidence_log.json").write_text(json.dumps(log))
    with caplog.at_level("WARNING", logger="evidence"):
        assert evidence.main(["--work_dir", str(work), "--only", "b"]) == 0
    assert "ran on another host (Intel(R) Xeon(R) Platinum 8488C" in caplog.text
    text = (work / "EVIDENCE.md").read_text()
    assert f"These parts ran on 2 hosts** ({evidence.host_text(elsewhere)}; {evidence.host_text(facts)})" in text
    assert "AVX512 kernels" in evidence.host_text(elsewhere)
    assert evidence.host_text(None) == "host not recorded"
    assert evidence.host_text({**facts, "gpus": ["NVIDIA H100"] * 2}).endswith(", 2× NVIDIA H100")


def test_parts_run_in_order_skip_when_done_and_respect_prerequisites(tmp_path, monkeypatch):
    parts = [
        evidence.Part("a", "first", _writer("{work}/a/out.json"), "a/out.json"),
        evidence.Part("b", "needs a", _writer("{work}/b/out.json"), "b/out.json", needs=["a"]),
        evidence.Part("c", "fails", ["{python}", "-c", "raise SystemExit(3)"], "c/out.json"),
    ]
    monkeypatch.setattr(evidence, "PARTS", parts)
    work = tmp_path / "w"
    assert evidence.main(["--work_dir", str(work), "--only", "b"]) == 1  # a is not done: b is refused, not run
    assert not (work / "b" / "out.json").exists()
    assert evidence.main(["--work_dir", str(work)]) == 1  # a and b run, c fails and is reported
    log = json.loads((work / "evidence_log.json").read_text())
    assert log["a"]["returncode"] == 0 and log["c"]["returncode"] == 3
    (work / "a" / "out.json").write_text('{"kept": 1}')
    assert evidence.main(["--work_dir", str(work), "--only", "a", "b"]) == 0  # both done: nothing re-runs
    assert (work / "a" / "out.json").read_text() == '{"kept": 1}'
    assert evidence.main(["--work_dir", str(work), "--redo", "a", "--only", "a"]) == 0
    assert (work / "a" / "out.json").read_text() == "{}"
    summary = (work / "EVIDENCE.md").read_text()
    assert "| a | first | a/out.json | `python -c" in summary and "| c | fails | not run |" in summary


def test_evidence_processes_side_by_side_keep_each_others_log_entries(tmp_path, monkeypatch):
    """Two evidence processes may run at once (e.g. runs beside backbones). Each wrote back the log it read at its
    start, dropping the parts the other finished meanwhile (seen in the twenty-sixth session). Part ``a``'s command
    stands in for the other process: it records a part of its own while ``a`` runs."""
    log_path = tmp_path / "w" / "evidence_log.json"
    other = (
        f"import sys; sys.path.insert(0, r'{evidence.ROOT / 'benchmarks'}'); import pathlib, evidence; "
        f"evidence.record_part(pathlib.Path(r'{log_path}'), 'other', {{'returncode': 0}}); "
        f"out = pathlib.Path(r'{tmp_path / 'w' / 'a' / 'out.json'}'); out.parent.mkdir(); out.write_text('{{}}')"
    )
    monkeypatch.setattr(evidence, "PARTS", [evidence.Part("a", "first", ["{python}", "-c", other], "a/out.json")])
    work = tmp_path / "w"
    work.mkdir()
    log_path.write_text(json.dumps({"before": {"returncode": 0}}))
    assert evidence.main(["--work_dir", str(work)]) == 0
    log = json.loads(log_path.read_text())
    assert set(log) == {"before", "other", "a"} and log["a"]["returncode"] == 0
    assert not list(work.glob("*.tmp"))
    assert "| a | first | a/out.json |" in (work / "EVIDENCE.md").read_text()


def test_each_part_records_the_installed_packages_against_the_lock_file(tmp_path, monkeypatch):
    """The lock's hash and every locked package installed at another version or missing are logged per part and
    shown in EVIDENCE.md; a local build tag is not a difference; a part run before this was recorded says so."""
    import importlib.metadata

    lock = tmp_path / "constraints.txt"
    have = importlib.metadata.version("pytest")
    lock.write_text(f"# made by make lock\nPyTest=={have}\nnumpy==0.0.1\nnot_a_package_bp==1.0\n")
    env = evidence.environment(lock)
    assert len(env["lock"]) == 12 and env["lock"] == evidence.hashlib.sha256(lock.read_bytes()).hexdigest()[:12]
    assert env["off_lock"] == {
        "numpy": {"locked": "0.0.1", "installed": importlib.metadata.version("numpy")},
        "not-a-package-bp": {"locked": "1.0", "installed": None},
    }
    monkeypatch.setattr(evidence.importlib.metadata, "version", lambda name: "2.14.1+cu130")
    assert evidence.environment(lock.with_name("t.txt")) == {"lock": None, "off_lock": {}, "host": env["host"]}
    (tmp_path / "t.txt").write_text("torch==2.14.1\n")
    assert evidence.environment(tmp_path / "t.txt")["off_lock"] == {}  # the CUDA build of the locked version
    monkeypatch.undo()
    (tmp_path / "bad.txt").write_text("torch>=2\n")
    with pytest.raises(ValueError, match="not a 'name==version' pin"):
        evidence.read_lock(tmp_path / "bad.txt")

    monkeypatch.setattr(evidence, "LOCK", lock)
    monkeypatch.setattr(evidence, "PARTS", [evidence.Part("a", "first", _writer("{work}/a/out.json"), "a/out.json")])
    work = tmp_path / "w"
    (work).mkdir()
    (work / "evidence_log.json").write_text(json.dumps({"a": {"argv": ["x"], "seconds": 60.0, "returncode": 0}}))
    (work / "a").mkdir()
    (work / "a" / "out.json").write_text("{}")
    assert evidence.main(["--work_dir", str(work)]) == 0
    assert "| 1.0 min | not recorded |" in (work / "EVIDENCE.md").read_text()  # run before environments were kept
    assert evidence.main(["--work_dir", str(work), "--redo", "a"]) == 0
    assert json.loads((work / "evidence_log.json").read_text())["a"]["environment"] == env
    text = (work / "EVIDENCE.md").read_text()
    assert f"| lock {env['lock']}, 2 package(s) off it; {evidence.host_text(env['host'])} |" in text
    assert "ran on 2 hosts" not in text  # the part logged before hosts were recorded counts as no host
    # the repository's own lock file parses, and pins what make setup installs (tests/test_lock.py checks which)
    assert evidence.read_lock(ROOT / "constraints.txt")["torch"] == "2.14.1"


def test_an_interrupted_pretraining_part_resumes_and_a_redone_finished_one_trains_again(tmp_path, monkeypatch):
    out = tmp_path / "w" / "pre"
    (out / "checkpoints" / "checkpoint-50").mkdir(parents=True)
    seen = {}

    def fake_call(argv, cwd, env):
        seen["argv"] = argv
        return 1

    monkeypatch.setattr(evidence.subprocess, "call", fake_call)
    part = evidence.Part("p", "pretrain", evidence._pretrain("cfg.yaml", "{work}/pre"), "pre/final/config.json")
    assert not evidence.run_part(part, tmp_path / "w", {})
    assert seen["argv"][-2:] == ["--resume", "latest"] and "--overwrite_output_dir" not in seen["argv"]
    assert seen["argv"][0] == sys.executable and f"output_dir={out}" in seen["argv"]
    # a finished run that --redo names trains again: resuming its last checkpoint would train nothing
    (out / "final").mkdir()
    (out / "final" / "config.json").write_text("{}")
    assert not evidence.run_part(part, tmp_path / "w", {})
    assert seen["argv"][-1] == "--overwrite_output_dir" and "--resume" not in seen["argv"]


def test_optional_parts_run_only_when_asked(tmp_path, monkeypatch):
    parts = [
        evidence.Part("a", "always", _writer("{work}/a/out.json"), "a/out.json"),
        evidence.Part("o", "optional", _writer("{work}/o/out.json"), "o/out.json", needs=["a"], optional=True),
    ]
    monkeypatch.setattr(evidence, "PARTS", parts)
    work = tmp_path / "w"
    assert evidence.main(["--work_dir", str(work)]) == 0
    assert (work / "a" / "out.json").exists() and not (work / "o" / "out.json").exists()
    assert "| o | optional | optional, not run |" in (work / "EVIDENCE.md").read_text()
    assert evidence.main(["--work_dir", str(work), "--only", "o"]) == 0  # named: it runs
    (work / "o" / "out.json").unlink()
    assert evidence.main(["--work_dir", str(work), "--with_optional"]) == 0
    assert (work / "o" / "out.json").exists()


def test_the_recorded_parts_are_consistent():
    """Every prerequisite names an earlier part, names are unique, a default part needs default parts only, and
    the optional seed parts pair pretraining seed s with --init_seed s on the fold-wise backbones of seed s."""
    names = [p.name for p in evidence.PARTS]
    assert len(names) == len(set(names))
    for i, p in enumerate(evidence.PARTS):
        assert all(n in names[:i] for n in p.needs), p.name
        assert all(not q.optional for q in evidence.PARTS if q.name in p.needs) or p.optional  # default needs default
    seed3 = next(p for p in evidence.PARTS if p.name == "survival_cv_foldwise_seed3")
    assert seed3.argv[seed3.argv.index("--init_seed") + 1] == "3"
    assert any("pretrain_cvfolds_seed3/fold{fold}" in a for a in seed3.argv)
    for name, init, reused in (("survival_cv_lrgrid", "0", "survival_cv"), ("survival_cv_lrgrid_init1", "1", "init1")):
        grid = next(p for p in evidence.PARTS if p.name == name)
        argv = grid.argv
        assert argv[argv.index("--init_seed") + 1] == init and argv[argv.index("--bp_lrs") + 1] == "3e-4"
        assert argv[argv.index("--reuse_cache") + 1].endswith(reused)  # its 3e-4 runs: the same init seed's
        assert set(argv[argv.index("--bp_arms") + 1 :][:4]) == set(evidence.FINETUNED_ARMS)
    spread = next(p for p in evidence.PARTS if p.name == "survset_seed_spread_lrgrid")
    assert spread.needs == ["survival_cv_lrgrid", "survival_cv_lrgrid_init1"]
    e60 = next(p for p in evidence.PARTS if p.name == "survival_cv_clinical_only_e60").argv
    assert e60[e60.index("--bp_epochs") + 1] == "60" and e60.count("--bp_epochs") == 1
    assert e60[e60.index("--data_dir") + 1].endswith("survival_cv_clinical_only_e60/cohort")  # a subset: own manifest


def test_the_wide_and_deep_part_reuses_the_lr_grid_run():
    """survival_cv_wide: the full arms with --bp_head_linear on the lr grid, reading back the grid run's results
    (the expression-only cohorts' runs have the same cache key: the linear term applies only with clinical
    covariates)."""
    wide = next(p for p in evidence.PARTS if p.name == "survival_cv_wide")
    argv = wide.argv
    assert "--bp_head_linear" in argv and wide.optional and wide.needs == ["survival_cv_lrgrid"]
    assert argv[argv.index("--reuse_cache") + 1].endswith("survset/survival_cv_lrgrid")
    assert argv[argv.index("--bp_arms") + 1 : argv.index("--bp_arms") + 3] == list(evidence.FINETUNED_ARMS[:2])
    seed1 = next(p for p in evidence.PARTS if p.name == "survival_cv_wide_init1").argv
    assert seed1[seed1.index("--init_seed") + 1] == "1" and "--bp_head_linear" in seed1
    assert seed1[seed1.index("--reuse_cache") + 1].endswith("survival_cv_lrgrid_init1")  # the same seed's plain twin
    for init, plain in ((0, "survival_cv_lrgrid"), (1, "survival_cv_lrgrid_init1")):
        versus = next(p for p in evidence.PARTS if p.name == f"survset_versus_wide_init{init}")
        runs = versus.argv[versus.argv.index("--runs") + 1 : versus.argv.index("--labels")]
        assert runs[1].endswith(plain) and "--versus" in versus.argv


def test_the_expression_term_parts_pair_with_the_clinical_only_term():
    """survival_cv_wide_all / survival_cv_wide_pm: the linear term on expression and clinical covariates, one
    shared penalty and one per modality (which reads the expression-only cohorts back from the shared run, where the
    term has one modality and the runs are the same); each paired against survival_cv_wide."""
    parts = {p.name: p for p in evidence.PARTS}
    shared, per = parts["survival_cv_wide_all"].argv, parts["survival_cv_wide_pm"].argv
    for argv in (shared, per):
        i = argv.index("--bp_head_linear")
        assert argv[i + 1 : i + 3] == ["omics_expression", "tabular_clinical"]
    assert "--bp_head_linear_per_modality" not in shared and "--bp_head_linear_per_modality" in per
    assert per[per.index("--reuse_cache") + 1].endswith("survset/survival_cv_wide_all")
    assert parts["survival_cv_wide_pm"].needs == ["survival_cv_wide_all"]
    for run in ("wide_all", "wide_pm"):
        versus = parts[f"survset_versus_{run}_init0"]
        runs = versus.argv[versus.argv.index("--runs") + 1 : versus.argv.index("--labels")]
        assert runs[0].endswith(f"survival_cv_{run}") and runs[1].endswith("survival_cv_wide")
        assert versus.optional and set(versus.needs) == {f"survival_cv_{run}", "survival_cv_wide"}


@pytest.mark.parametrize(
    "tag,models,twin_tag",
    [
        ("panel", ("plain", "wide", "wide_pm"), None),
        ("pcs", ("plain", "wide_pm"), None),
        ("pergene", ("plain", "wide_pm"), None),
        ("pcs_pergene", ("plain",), "pcs"),
    ],
)
def test_the_token_parts_use_their_backbone_and_settings_and_pair_with_their_twins(tag, models, twin_tag):
    """The other-expression-token parts (a fixed panel; principal components; a per-gene value embedding; both of
    the last two): the backbone pretrained with tokenizers/survset_processors_<tag>.yaml, the random-init arm fitting
    the same settings, each run paired with the same model on the default tokens (or on ``twin_tag``'s)."""
    parts = {p.name: p for p in evidence.PARTS}
    pre = parts[f"survset_pretrain_{tag}"].argv
    settings = f"tokenizers/survset_processors_{tag}.yaml"
    assert any(a.startswith("data.processor_settings=") and a.endswith(settings) for a in pre)
    assert (ROOT / settings).is_file()
    twins = {"plain": "survival_cv_lrgrid", "wide": "survival_cv_wide", "wide_pm": "survival_cv_wide_pm"}
    if twin_tag:
        twins = {m: f"survival_cv_{twin_tag}_{m}" for m in models}
    built = {n.removeprefix(f"survival_cv_{tag}_") for n in parts if n.startswith(f"survival_cv_{tag}_")}
    assert built & set(twins) == set(models)
    for model in models:
        run = f"{tag}_{model}"
        argv = parts[f"survival_cv_{run}"].argv
        assert argv[argv.index("--pretrained_dir") + 1].endswith(f"survset/pretrain_{tag}/final")
        assert argv[argv.index("--random_processor_settings") + 1] == settings
        assert f"survset_pretrain_{tag}" in parts[f"survival_cv_{run}"].needs
        versus = parts[f"survset_versus_{run}_init0"].argv
        runs = versus[versus.index("--runs") + 1 : versus.index("--labels")]
        assert runs[0].endswith(f"survival_cv_{run}") and runs[1].endswith(twins[model])
        assert set(parts[f"survset_versus_{run}_init0"].needs) == {f"survival_cv_{run}", twins[model]}
    if "wide_pm" in models:
        assert "--bp_head_linear_per_modality" in parts[f"survival_cv_{tag}_wide_pm"].argv
    assert "--bp_head_linear" not in parts[f"survival_cv_{tag}_plain"].argv


def test_the_per_gene_seed_1_run_pairs_with_the_seed_1_plain_run():
    """The per-gene value embedding without a term at finetuning seed 1: its backbone and settings, --init_seed 1,
    the baselines read from the seed-1 plain run and paired with it."""
    parts = {p.name: p for p in evidence.PARTS}
    run = parts["survival_cv_pergene_plain_init1"]
    argv = run.argv
    assert argv[argv.index("--init_seed") + 1] == "1"
    assert argv[argv.index("--pretrained_dir") + 1].endswith("survset/pretrain_pergene/final")
    assert argv[argv.index("--random_processor_settings") + 1] == "tokenizers/survset_processors_pergene.yaml"
    assert argv[argv.index("--reuse_cache") + 1].endswith("survset/survival_cv_lrgrid_init1")
    assert "--bp_head_linear" not in argv
    assert run.optional and set(run.needs) == {"survset_pretrain_pergene", "survival_cv_lrgrid_init1"}
    versus = parts["survset_versus_pergene_plain_init1"].argv
    runs = versus[versus.index("--runs") + 1 : versus.index("--labels")]
    assert runs[0].endswith("survival_cv_pergene_plain_init1") and runs[1].endswith("survival_cv_lrgrid_init1")


@pytest.mark.parametrize("seed", [0, 1])
def test_the_per_gene_fold_wise_parts_pretrain_without_the_folds_test_patients_and_pair_with_the_shared_seed(seed):
    """The fold-wise embedding arms on per-gene backbones: each fold's backbone from that fold's manifest with the
    per-gene settings and the seed, the CV run reading them per fold with the same --init_seed, and the pairing with
    the shared-encoding run of the same seed."""
    parts = {p.name: p for p in evidence.PARTS}
    for k in range(5):
        pre = parts[f"survset_pretrain_pergene_seed{seed}_fold{k}"].argv
        assert f"data.manifest={evidence.W}/survset/dev_cohort/manifest_cvfold{k}.parquet" in pre
        assert any(a.endswith("tokenizers/survset_processors_pergene.yaml") for a in pre) and f"seed={seed}" in pre
    run = parts[f"survival_cv_foldwise_pergene_seed{seed}"]
    argv = run.argv
    assert argv[argv.index("--pretrained_dir") + 1].endswith(f"pretrain_cvfolds_pergene_seed{seed}/fold{{fold}}/final")
    assert argv[argv.index("--init_seed") + 1] == str(seed)
    assert set(evidence.EMB_ARMS) <= set(argv)
    shared = "survival_cv_foldwise" if seed == 0 else f"survival_cv_foldwise_seed{seed}"
    versus = parts[f"survset_versus_foldwise_pergene_seed{seed}"]
    runs = versus.argv[versus.argv.index("--runs") + 1 : versus.argv.index("--labels")]
    assert runs[0].endswith(f"survival_cv_foldwise_pergene_seed{seed}") and runs[1].endswith(f"survset/{shared}")
    assert set(versus.needs) == {run.name, shared}


def test_the_label_efficiency_parts_subsample_training_patients_on_the_fold_wise_backbones():
    """SurvSet label efficiency: per --train_fraction four runs, (pretraining seed, finetuning seed) = (0, 0),
    (0, 1), (1, 1), (2, 2), the pretrained arm on the fold-wise backbones of its seed (no fold's test patients in its
    pretraining), the lr grid, what does not change read back from the run before; the curve part combines all."""
    parts = {p.name: p for p in evidence.PARTS}
    runs = []
    for fraction in ("0.25", "0.5", "1"):
        for suffix, backbones, init, reused in (
            ("", "pretrain_cvfolds", None, "survival_cv_lrgrid"),
            ("_init1", "pretrain_cvfolds", "1", f"survival_cv_labeff_tf{fraction}"),
            ("_pre1", "pretrain_cvfolds_seed1", "1", f"survival_cv_labeff_tf{fraction}_init1"),
            ("_pre2", "pretrain_cvfolds_seed2", "2", f"survival_cv_labeff_tf{fraction}"),
        ):
            run = f"survival_cv_labeff_tf{fraction}{suffix}"
            runs.append(run)
            argv = parts[run].argv
            assert argv[argv.index("--train_fraction") + 1] == fraction
            assert argv[argv.index("--pretrained_dir") + 1].endswith(f"survset/{backbones}/fold{{fold}}/final")
            assert argv[argv.index("--bp_lrs") + 1 :][:3] == list(evidence.LR_GRID)
            assert argv[argv.index("--reuse_cache") + 1].endswith(f"survset/{reused}") and reused in parts[run].needs
            if init:
                assert argv[argv.index("--init_seed") + 1] == init
            else:
                assert "--init_seed" not in argv
            assert "--bp_head_linear" not in argv and parts[run].optional
            seed = "" if backbones == "pretrain_cvfolds" else f"seed{backbones[-1]}_"
            assert {f"survset_pretrain_{seed}fold{k}" for k in range(5)} <= set(parts[run].needs)
    curve = parts["survset_label_efficiency"]
    assert curve.needs == runs and curve.argv[1] == "benchmarks/survival_label_efficiency.py"
    assert [a.rsplit("/", 1)[-1] for a in curve.argv[curve.argv.index("--runs") + 1 :][: len(runs)]] == runs


def test_the_shrunk_validation_label_efficiency_parts_pair_with_the_full_data_runs():
    """--subsample_validation at 25% and 50%: the same four seed pairs and backbones, baselines fitted once per
    fraction and read back; the curve part adds the full-data runs (where the flag would be a no-op)."""
    parts = {p.name: p for p in evidence.PARTS}
    runs = []
    for fraction in ("0.25", "0.5"):
        first = f"survival_cv_labeff_tf{fraction}_val"
        for suffix, backbones, init in (
            ("", "pretrain_cvfolds", None),
            ("_init1", "pretrain_cvfolds", "1"),
            ("_pre1", "pretrain_cvfolds_seed1", "1"),
            ("_pre2", "pretrain_cvfolds_seed2", "2"),
        ):
            run = first + suffix
            runs.append(run)
            argv = parts[run].argv
            assert argv[argv.index("--train_fraction") + 1] == fraction and "--subsample_validation" in argv
            assert argv[argv.index("--pretrained_dir") + 1].endswith(f"survset/{backbones}/fold{{fold}}/final")
            assert ("--init_seed" in argv) == bool(init) and (not init or argv[argv.index("--init_seed") + 1] == init)
            if suffix:
                assert argv[argv.index("--reuse_cache") + 1].endswith(f"survset/{first}") and first in parts[run].needs
                if suffix == "_pre1":  # the random-init arm at finetuning seed 1 read back from the (0, 1) run
                    assert argv[argv.index("--reuse_cache") + 2].endswith(f"survset/{first}_init1")
                    assert f"{first}_init1" in parts[run].needs
            else:
                assert "--reuse_cache" not in argv  # nothing earlier was fitted on these validation patients
            assert parts[run].optional and "--bp_head_linear" not in argv
    curve = parts["survset_label_efficiency_val"]
    full = [f"survival_cv_labeff_tf1{s}" for s in ("", "_init1", "_pre1", "_pre2")]
    assert curve.needs == runs + full
    assert [a.rsplit("/", 1)[-1] for a in curve.argv[curve.argv.index("--runs") + 1 :][: len(runs) + 4]] == runs + full


def test_the_shrunk_validation_wide_and_deep_parts_read_the_baselines_back_from_the_plain_run():
    parts = {p.name: p for p in evidence.PARTS}
    plain = "survival_cv_labeff_tf0.25_val"
    for init in ("0", "1"):
        run = f"{plain}_wide_pm" + ("_init1" if init == "1" else "")
        argv = parts[run].argv
        assert argv[argv.index("--train_fraction") + 1] == "0.25" and "--subsample_validation" in argv
        assert "--bp_head_linear_per_modality" in argv and ("--init_seed" in argv) == (init == "1")
        assert argv[argv.index("--reuse_cache") + 1].endswith(f"survset/{plain}") and parts[run].needs == [plain]
    spread = parts["survset_seed_spread_labeff_tf0.25_val_wide_pm"]
    assert spread.needs == [f"{plain}_wide_pm", f"{plain}_wide_pm_init1"]
    versus = parts["survset_versus_labeff_tf0.25_val_wide_pm"]
    runs = versus.argv[versus.argv.index("--runs") + 1 : versus.argv.index("--labels")]
    assert runs[0].endswith(f"{plain}_wide_pm") and runs[1].endswith(plain)


def test_the_last_epoch_parts_repeat_the_shrunk_validation_runs_without_checkpoint_selection():
    parts = {p.name: p for p in evidence.PARTS}
    runs = []
    for suffix, backbones, init in SEED_PAIR_RUNS:
        run = f"survival_cv_labeff_tf0.25_val_last{suffix}"
        runs.append(run)
        argv = parts[run].argv
        assert "--bp_keep_last" in argv and "--subsample_validation" in argv
        assert argv[argv.index("--train_fraction") + 1] == "0.25" and argv[argv.index("--init_seed") + 1] == init
        assert argv[argv.index("--pretrained_dir") + 1].endswith(f"survset/{backbones}/fold{{fold}}/final")
        assert argv[argv.index("--reuse_cache") + 1].endswith("survset/survival_cv_labeff_tf0.25_val")
        assert "survival_cv_labeff_tf0.25_val" in parts[run].needs
    spread = parts["survset_seed_spread_labeff_tf0.25_val_last"]
    assert spread.needs == runs and spread.argv[1] == "benchmarks/seed_spread.py"
    full = parts["survival_cv_labeff_tf1_last"].argv
    assert "--bp_keep_last" in full and "--train_fraction" not in full and "--subsample_validation" not in full
    assert full[full.index("--reuse_cache") + 1].endswith("survset/survival_cv_labeff_tf1")
    for last, best in (
        *zip(runs, [r.replace("_last", "") for r in runs]),
        ("survival_cv_labeff_tf1_last", "survival_cv_labeff_tf1"),
    ):
        versus = parts["survset_" + last.replace("survival_cv_", "versus_")]
        listed = versus.argv[versus.argv.index("--runs") + 1 : versus.argv.index("--labels")]
        assert [a.rsplit("/", 1)[-1] for a in listed] == [last, best] and "--versus" in versus.argv


def test_the_wide_and_deep_label_efficiency_parts_add_the_term_to_the_25_percent_runs():
    parts = {p.name: p for p in evidence.PARTS}
    for init, plain in (("0", "survival_cv_labeff_tf0.25"), ("1", "survival_cv_labeff_tf0.25_init1")):
        run = "survival_cv_labeff_tf0.25_wide_pm" + ("_init1" if init == "1" else "")
        argv = parts[run].argv
        assert argv[argv.index("--train_fraction") + 1] == "0.25" and "--bp_head_linear_per_modality" in argv
        assert argv[argv.index("--bp_head_linear") + 1 :][:2] == ["omics_expression", "tabular_clinical"]
        assert argv[argv.index("--reuse_cache") + 1].endswith(f"survset/{plain}") and parts[run].needs == [plain]
        assert ("--init_seed" in argv) == (init == "1")
    versus = parts["survset_versus_labeff_tf0.25_wide_pm"].argv
    runs = versus[versus.index("--runs") + 1 : versus.index("--labels")]
    assert runs[0].endswith("survival_cv_labeff_tf0.25_wide_pm") and runs[1].endswith("survival_cv_labeff_tf0.25")


def _listed(part) -> list[str]:
    """The run folders a seed_spread.py / kept_checkpoints.py part reads, by name, in order."""
    argv = part.argv
    end = next(i for i in range(argv.index("--runs") + 1, len(argv)) if argv[i].startswith("--"))
    return [a.rsplit("/", 1)[-1] for a in argv[argv.index("--runs") + 1 : end]]


EMB_ENSEMBLE = ["cox_clinical_emb_pretrained", "cox_clinical_emb_random"]  # --ensemble of the embedding parts


def _ensembled(part) -> list[str]:
    """The arms a seed_spread.py part averages over runs (``--ensemble``, up to the next option)."""
    rest = part.argv[part.argv.index("--ensemble") + 1 :]
    return rest[: next((i for i, a in enumerate(rest) if a.startswith("--")), len(rest))]


def runs_loss_4(plain: str) -> list[str]:
    return [f"{plain}_tiesloss{s}" for s in ("", "_init1", "_pre1", "_pre2")]


def test_the_tie_rule_parts_cover_three_seed_pairs_and_the_wide_and_deep_loss_rule_runs():
    """Each tie rule: three seed pairs on their own backbones and finetuning seeds, each against its first-of-ties
    run; spreads over the first two pairs (the recorded tables) and over all three; the kept-epoch part over the
    first two. Wide & deep with the loss rule, four seed pairs: the term, the rule, the pair's backbones; the (1, 1)
    run reads the random-init arm back from (0, 1) (it does not depend on the pretraining seed); spreads over the
    first three (recorded first) and all four."""
    parts = {p.name: p for p in evidence.PARTS}
    plain = "survival_cv_labeff_tf0.25_val"
    pairs, pair4 = SEED_PAIR_RUNS[:3], SEED_PAIR_RUNS[3]  # the fourth: the loss rule only
    for rule in ("loss", "last"):
        runs = []
        for suffix, backbones, init in pairs + ((pair4,) if rule == "loss" else ()):
            run = f"{plain}_ties{rule}{suffix}"
            argv = parts[run].argv
            assert argv[argv.index("--bp_best_model_ties") + 1] == rule and "--subsample_validation" in argv
            assert argv[argv.index("--init_seed") + 1] == init and argv[argv.index("--train_fraction") + 1] == "0.25"
            assert argv[argv.index("--pretrained_dir") + 1].endswith(f"survset/{backbones}/fold{{fold}}/final")
            assert _listed(parts[f"survset_versus_labeff_tf0.25_val_ties{rule}{suffix}"]) == [run, plain + suffix]
            runs.append(run)
        assert _listed(parts[f"survset_seed_spread_labeff_tf0.25_val_ties{rule}"]) == runs[:2]
        assert _listed(parts[f"survset_seed_spread_labeff_tf0.25_val_ties{rule}3"]) == runs[:3]
        assert (f"survset_seed_spread_labeff_tf0.25_val_ties{rule}4" in parts) == (rule == "loss")
    assert _listed(parts["survset_seed_spread_labeff_tf0.25_val_tiesloss4"]) == runs_loss_4(plain)
    assert _listed(parts["survset_seed_spread_labeff_tf0.25_val_first3"]) == [plain + s for s, _, _ in pairs]
    assert _listed(parts["survset_seed_spread_labeff_tf0.25_val_first4"]) == [plain + s for s, _, _ in (*pairs, pair4)]
    kept = _listed(parts["survset_kept_labeff_tf0.25_val_ties"])
    assert kept == [f"{plain}_ties{r}{s}" for r in ("loss", "last") for s in ("", "_init1")]
    wide = []
    for suffix, backbones, init in (*pairs, pair4):
        run = f"{plain}_wide_pm_tiesloss{suffix}"
        argv = parts[run].argv
        assert argv[argv.index("--bp_head_linear") + 1 :][:2] == ["omics_expression", "tabular_clinical"]
        assert "--bp_head_linear_per_modality" in argv and argv[argv.index("--bp_best_model_ties") + 1] == "loss"
        assert argv[argv.index("--init_seed") + 1] == init
        assert argv[argv.index("--pretrained_dir") + 1].endswith(f"survset/{backbones}/fold{{fold}}/final")
        reuse = [a.rsplit("/", 1)[-1] for a in argv[argv.index("--reuse_cache") + 1 :]]
        assert reuse == [plain] + ([f"{plain}_wide_pm_tiesloss_init1"] if suffix.startswith("_pre") else [])
        assert set(reuse) <= set(parts[run].needs)
        wide.append(run)
    assert _listed(parts["survset_seed_spread_labeff_tf0.25_val_wide_pm_tiesloss"]) == wide[:3]
    assert _listed(parts["survset_seed_spread_labeff_tf0.25_val_wide_pm_tiesloss4"]) == wide
    assert _listed(parts["survset_versus_labeff_tf0.25_val_wide_pm_tiesloss_plain"]) == [wide[0], f"{plain}_tiesloss"]
    assert _listed(parts["survset_versus_labeff_tf0.25_val_wide_pm_tiesloss_first"]) == [wide[0], f"{plain}_wide_pm"]


def test_the_fair_baseline_tie_parts_refit_only_the_cox_baselines_beside_the_loss_rule_runs():
    """--baseline_ties loss beside each loss-rule run: the finetuned arms read back from that run (same settings),
    the baselines from the first such run after the first; the versus part pairs the Cox baselines across rules."""
    parts = {p.name: p for p in evidence.PARTS}
    plain = "survival_cv_labeff_tf0.25_val"
    runs = []
    for suffix, init in (("", "0"), ("_init1", "1"), ("_pre1", "1"), ("_pre2", "2")):
        run = f"{plain}_tiesloss_bl{suffix}"
        argv = parts[run].argv
        assert (
            argv[argv.index("--baseline_ties") + 1] == "loss" and argv[argv.index("--bp_best_model_ties") + 1] == "loss"
        )
        assert argv[argv.index("--init_seed") + 1] == init
        reuse = [a.rsplit("/", 1)[-1] for a in argv[argv.index("--reuse_cache") + 1 :]]
        assert reuse == [f"{plain}_tiesloss{suffix}", plain if not suffix else f"{plain}_tiesloss_bl"]
        assert set(reuse) <= set(parts[run].needs)
        runs.append(run)
    assert _listed(parts["survset_seed_spread_labeff_tf0.25_val_tiesloss_bl3"]) == runs[:3]
    assert _listed(parts["survset_seed_spread_labeff_tf0.25_val_tiesloss_bl4"]) == runs
    wide = []
    for suffix, init in (("", "0"), ("_init1", "1"), ("_pre1", "1"), ("_pre2", "2")):
        run = f"{plain}_wide_pm_tiesloss_bl{suffix}"
        argv = parts[run].argv
        assert argv[argv.index("--baseline_ties") + 1] == "loss" and "--bp_head_linear_per_modality" in argv
        assert argv[argv.index("--init_seed") + 1] == init
        reuse = [a.rsplit("/", 1)[-1] for a in argv[argv.index("--reuse_cache") + 1 :]]
        assert reuse == [f"{plain}_wide_pm_tiesloss{suffix}", f"{plain}_tiesloss_bl"] and set(reuse) <= set(
            parts[run].needs
        )
        wide.append(run)
    assert _listed(parts["survset_seed_spread_labeff_tf0.25_val_wide_pm_tiesloss_bl3"]) == wide[:3]
    assert _listed(parts["survset_seed_spread_labeff_tf0.25_val_wide_pm_tiesloss_bl4"]) == wide
    half = "survival_cv_labeff_tf0.5_val"
    for run, reuse in ((f"{half}_tiesloss", [half]), (f"{half}_tiesloss_bl", [f"{half}_tiesloss", half])):
        argv = parts[run].argv
        assert argv[argv.index("--train_fraction") + 1] == "0.5" and "--subsample_validation" in argv
        assert argv[argv.index("--bp_best_model_ties") + 1] == "loss" and "--init_seed" not in argv
        assert ("--baseline_ties" in argv) == run.endswith("_bl")
        assert [a.rsplit("/", 1)[-1] for a in argv[argv.index("--reuse_cache") + 1 :]] == reuse
    assert _listed(parts["survset_versus_labeff_tf0.5_val_tiesloss"]) == [f"{half}_tiesloss", half]
    # the embedding-Cox arms beside the tie-aware 50% run (0, 0), then alone for the other seed pairs, and a spread
    half_runs = []
    for suffix, backbones, init in SEED_PAIR_RUNS:
        run = f"{half}_tiesloss_emb{suffix}"
        emb = parts[run].argv
        finetuned = ["bp_random", "bp_pretrained"] if not suffix else []
        assert emb[emb.index("--bp_arms") + 1 :][: len(finetuned) + 3] == [*finetuned, *evidence.EMB_ARMS]
        assert emb[emb.index("--train_fraction") + 1] == "0.5" and emb[emb.index("--baseline_ties") + 1] == "loss"
        assert emb[emb.index("--init_seed") + 1] == init
        assert emb[emb.index("--pretrained_dir") + 1].endswith(f"survset/{backbones}/fold{{fold}}/final")
        reuse = emb[emb.index("--reuse_cache") + 1]
        assert reuse.endswith(f"{half}_tiesloss_bl" if not suffix else f"{half}_tiesloss_emb")
        half_runs.append(run)
    assert _listed(parts["survset_seed_spread_labeff_tf0.5_val_tiesloss_emb4"]) == half_runs
    quarter = [f"survival_cv_labeff_tf0.25_val_tiesloss_emb{s}" for s in ("", "_init1", "_pre1", "_pre2")]
    for frac, family in (("0.5", half_runs), ("0.25", quarter)):
        distinct = parts[f"survset_seed_spread_labeff_tf{frac}_val_tiesloss_emb3"]  # each pretraining seed once
        assert _listed(distinct) == [family[0], *family[2:]] and _ensembled(distinct) == EMB_ENSEMBLE
    versus = parts["survset_versus_labeff_tf0.25_val_tiesloss_bl"]
    assert _listed(versus) == [runs[0], f"{plain}_tiesloss"]
    assert versus.argv[versus.argv.index("--versus") + 1 :] == ["cox_clinical_pcs", "cox_clinical"]


def test_the_embedding_cox_parts_sit_beside_the_tie_aware_runs_and_fit_their_pcas_on_the_chosen_rows():
    """The cox_*_emb_* arms beside each tie-aware run (4 seed pairs; finetuned arms and baselines read back from
    it, each later pair also from the first), the same with --pca_rows non_test beside those (reading them back),
    a 4-pair spread with the embedding ensemble for each, and the non-test - train versus part over every model
    with a PCA."""
    parts = {p.name: p for p in evidence.PARTS}
    plain = "survival_cv_labeff_tf0.25_val"
    pairs = SEED_PAIR_RUNS
    assert [(evidence._pair_suffix(p, i), str(i)) for p, i in evidence.SEED_PAIRS] == [(s, i) for s, _, i in pairs]
    for tag, source, nt in (("_emb", "_bl", False), ("_emb_nt", "_emb", True)):
        runs = []
        for suffix, backbones, init in pairs:
            run = f"{plain}_tiesloss{tag}{suffix}"
            argv = parts[run].argv
            arms = argv[argv.index("--bp_arms") + 1 :][:5]
            assert arms == ["bp_random", "bp_pretrained", *evidence.EMB_ARMS]
            assert (
                argv[argv.index("--baseline_ties") + 1] == "loss"
                and argv[argv.index("--bp_best_model_ties") + 1] == "loss"
            )
            assert argv[argv.index("--train_fraction") + 1] == "0.25" and "--subsample_validation" in argv
            assert argv[argv.index("--init_seed") + 1] == init
            assert argv[argv.index("--pretrained_dir") + 1].endswith(f"survset/{backbones}/fold{{fold}}/final")
            assert (argv[argv.index("--pca_rows") + 1] == "non_test") if nt else "--pca_rows" not in argv
            reuse = [a.rsplit("/", 1)[-1] for a in argv[argv.index("--reuse_cache") + 1 :]]
            assert reuse == [f"{plain}_tiesloss{source}{suffix}", *([f"{plain}_tiesloss{tag}"] if suffix else [])]
            assert set(reuse) <= set(parts[run].needs)
            runs.append(run)
        spread = parts[f"survset_seed_spread_labeff_tf0.25_val_tiesloss{tag}4"]
        assert _listed(spread) == runs
        assert _ensembled(spread) == EMB_ENSEMBLE
    ext = parts["survival_cv_ext_labeff_tf0.25_val_tiesloss_emb"].argv  # evaluation only: no development cohort
    assert ext[ext.index("--cohorts") + 1 :][:7] == [*evidence.EXTERNAL_COHORTS, "--folds"]
    assert ext[ext.index("--bp_arms") + 1 :][:4] == [*evidence.EMB_ARMS, "--pretrained_dir"]
    assert ext[ext.index("--pretrained_dir") + 1].endswith("survset/pretrain_cvfolds/fold{fold}/final")
    assert ext[ext.index("--baseline_ties") + 1] == "loss" and "--subsample_validation" in ext
    bp = parts["survival_cv_ext_labeff_tf0.25_val_tiesloss"].argv  # the finetuned arms there, baselines read back
    assert bp[bp.index("--cohorts") + 1 :][:6] == list(evidence.EXTERNAL_COHORTS)
    assert bp[bp.index("--bp_arms") + 1 :][:3] == ["bp_random", "bp_pretrained", "--pretrained_dir"]
    assert bp[bp.index("--bp_best_model_ties") + 1] == "loss" and bp[bp.index("--baseline_ties") + 1] == "loss"
    assert bp[bp.index("--reuse_cache") + 1].endswith("survival_cv_ext_labeff_tf0.25_val_tiesloss_emb")
    from bioperceiver.data.recipes.survset import EXTERNAL_COHORTS

    assert evidence.EXTERNAL_COHORTS == EXTERNAL_COHORTS  # the recipe's evaluation-only cohorts, nothing else
    space = parts["survset_retrieval_space"]  # the 15 fold-wise backbones, heads from their last checkpoints
    runs = _listed(space)
    assert len(runs) == 15 and "--head_from_checkpoint" in space.argv
    assert [a.split("/")[-2] for a in space.argv[3:18]] == [
        f"pretrain_cvfolds{s}" for s in ("", "_seed1", "_seed2") for _ in range(5)
    ]
    versus = parts["survset_versus_labeff_tf0.25_val_tiesloss_emb_nt"]
    assert _listed(versus) == [f"{plain}_tiesloss_emb_nt", f"{plain}_tiesloss_emb"]
    assert versus.argv[versus.argv.index("--versus") + 1 :] == [
        "cox_clinical_pcs",
        "rsf",
        *evidence.EMB_ARMS[:2],
        evidence.EMB_ARMS[2],
    ]


def test_the_fold_manifests_need_only_the_pretraining_cohort():
    """survival_cv.py --write_fold_manifests builds (or reuses) the CV cohort itself: the 20-minute whole-cohort
    survival_cv part is not a prerequisite of the fold-wise backbones."""
    part = next(p for p in evidence.PARTS if p.name == "survset_fold_manifests")
    assert part.needs == ["survset_cohort"] and "--write_fold_manifests" in part.argv
    assert part.argv[part.argv.index("--data_dir") + 1].endswith("survset/cv_cohort")


PAIR_CV_ARMS = ("cox_clinical_emb_pretrained", "cox_clinical_pcs_emb_pretrained")


def _check_variant_emb_cox(parts: dict, tag: str, sep: str, versus_arms=PAIR_CV_ARMS) -> None:
    """A pretraining variant's embedding-Cox family (``evidence._variant_emb_cox``): at 25% and 50%, for seed pairs
    (0, 0), (1, 1), (2, 2), each run on the variant's own backbones of that seed and init seed, on the development
    cohorts, baselines and random embeddings read back from the plain run of the pair and paired with it on
    ``versus_arms``; the 3 runs combined."""
    for frac in ("0.25", "0.5"):
        plain = f"survival_cv_labeff_tf{frac}_val_tiesloss_emb"
        runs = []
        for s, suffix in enumerate(("", "_pre1", "_pre2")):
            run = f"{plain}_{tag}{suffix}"
            argv = parts[run].argv
            assert argv[argv.index("--bp_arms") + 1 :][:4] == [*evidence.EMB_ARMS, "--pretrained_dir"]
            assert argv[argv.index("--pretrained_dir") + 1].endswith(
                f"pretrain_cvfolds_{tag}_seed{s}/fold{{fold}}/final"
            )
            assert argv[argv.index("--train_fraction") + 1] == frac and "--subsample_validation" in argv
            assert argv[argv.index("--baseline_ties") + 1] == "loss" and argv[argv.index("--init_seed") + 1] == str(s)
            assert argv[argv.index("--reuse_cache") + 1].endswith(f"survset/{plain}{suffix}")
            assert "--cohorts" not in argv  # the development cohorts, never the external ones
            versus = parts[f"survset_versus_labeff_tf{frac}_{tag}{suffix}"]
            assert _listed(versus) == [run, plain + suffix]
            assert versus.argv[versus.argv.index("--versus") + 1 :] == list(versus_arms)
            runs.append(run)
        spread = parts[f"survset_seed_spread_labeff_tf{frac}_val_tiesloss_emb_{tag}{sep}3"]
        assert _listed(spread) == runs and _ensembled(spread) == EMB_ENSEMBLE


def test_the_decorrelation_parts_choose_the_weight_without_labels_and_pair_each_seed_with_its_plain_run():
    """loss.decorrelation: the probe weights pretrain fold 0 (seed 0) and are compared on its pretraining split
    only; the chosen weight's 15 fold-wise backbones (seeds 0-2, each fold's own manifest); their spectra against
    the plain ones, paired fold by fold; the embedding-Cox arms at 25% and 50% for seed pairs (0, 0), (1, 1), (2, 2),
    each reading the baselines and random embeddings back from the plain run of the same pair and compared with it;
    the 3 seeds combined."""
    parts = {p.name: p for p in evidence.PARTS}
    assert evidence.DECOR in evidence.DECOR_PROBE
    for w in evidence.DECOR_PROBE:
        argv = parts[f"survset_decor_probe_w{w}"].argv
        assert f"loss.decorrelation={w}" in argv and "seed=0" in argv
        assert any(a.endswith("manifest_cvfold0.parquet") for a in argv)
    probe = parts["survset_decor_probe_spectrum"].argv
    assert "survival_cv.py" not in " ".join(probe) and probe[1] == "benchmarks/embedding_spectrum.py"
    backbones = [(suffix, folder, init) for suffix, folder, init in SEED_PAIR_RUNS if suffix != "_init1"]
    for s, (_, _, init) in enumerate(backbones):
        assert str(s) == init
        for k in range(5):
            argv = parts[f"survset_pretrain_decor_seed{s}_fold{k}"].argv
            assert f"seed={s}" in argv and f"loss.decorrelation={evidence.DECOR}" in argv
            assert any(a.endswith(f"dev_cohort/manifest_cvfold{k}.parquet") for a in argv)  # never fold k's test
    spectrum = parts["survset_decor_spectrum"].argv
    groups = [i for i, a in enumerate(spectrum) if a == "--group"]
    plain_runs, decor_runs = (
        spectrum[groups[0] + 2 : groups[1]],
        spectrum[groups[1] + 2 : spectrum.index("--output_dir")],
    )
    assert [r.split("/")[-2:] for r in plain_runs] == [[b, f"fold{k}"] for _, b, _ in backbones for k in range(5)]
    assert [r.split("/")[-1] for r in decor_runs] == [r.split("/")[-1] for r in plain_runs]  # paired by fold
    assert all(f"pretrain_cvfolds_decor{evidence.DECOR}_seed" in r for r in decor_runs)
    _check_variant_emb_cox(parts, f"decor{evidence.DECOR}", "_")
    # the finetuned network at 25% (secondary): the decorrelated backbones, the plain run's settings, its random
    # init and baselines read back, each against the plain run of the same pair
    plain = "survival_cv_labeff_tf0.25_val_tiesloss_emb"
    runs = []
    for s, (suffix, _, init) in enumerate(backbones):
        run = f"survival_cv_labeff_tf0.25_val_tiesloss_decor{evidence.DECOR}{suffix}"
        argv = parts[run].argv
        assert argv[argv.index("--bp_arms") + 1 :][:3] == ["bp_random", "bp_pretrained", "--pretrained_dir"]
        assert argv[argv.index("--pretrained_dir") + 1].endswith(
            f"pretrain_cvfolds_decor{evidence.DECOR}_seed{s}/fold{{fold}}/final"
        )
        assert (
            argv[argv.index("--bp_best_model_ties") + 1] == "loss" and argv[argv.index("--baseline_ties") + 1] == "loss"
        )
        assert argv[argv.index("--train_fraction") + 1] == "0.25" and argv[argv.index("--init_seed") + 1] == init
        assert argv[argv.index("--bp_lrs") + 1 :][:3] == list(evidence.LR_GRID)
        reuse = [a.rsplit("/", 1)[-1] for a in argv[argv.index("--reuse_cache") + 1 :]]
        assert reuse == [plain + suffix, f"{plain}_decor{evidence.DECOR}{suffix}"] and parts[run].needs == reuse
        assert _listed(parts[f"survset_versus_labeff_tf0.25_bp_decor{evidence.DECOR}{suffix}"]) == [run, plain + suffix]
        runs.append(run)
    assert _listed(parts[f"survset_seed_spread_labeff_tf0.25_val_tiesloss_decor{evidence.DECOR}_3"]) == runs


def test_the_deviation_parts_pretrain_on_development_folds_and_evaluate_externally_only():
    """Protocol G/H: the 15 deviation backbones (the settings file, each fold's own development manifest, seeds
    0-2); coverage on the seed-0 ones; the embedding-Cox arms at 25% and 50% for (0, 0), (1, 1), (2, 2), each paired
    with the plain run of the pair on the pretrained, PCs + embedding and random arms; the external check's setting
    on the mapped external cohorts only, fused beside the plain backbones' same 3 seeds; the finetuned network at 25%
    with random init reading the same tokens."""
    parts = {p.name: p for p in evidence.PARTS}
    for s in range(3):
        for k in range(5):
            argv = parts[f"survset_pretrain_deviation_seed{s}_fold{k}"].argv
            assert f"seed={s}" in argv and f"data.processor_settings={{root}}/{evidence.DEVIATION}" in argv
            assert any(a.endswith(f"dev_cohort/manifest_cvfold{k}.parquet") for a in argv)
    settings = yaml.safe_load((ROOT / evidence.DEVIATION).read_text())["processors"]["omics_expression"]
    assert settings == {"normalization": "none", "zscore": "per_source", "top_k": 256, "top_k_by": "deviation"}
    cov = parts["survset_gene_embedding_coverage_deviation"].argv
    assert [a for a in cov if "pretrain_cvfolds" in a] == [
        f"{{work}}/survset/pretrain_cvfolds_deviation_seed0/fold{k}" for k in range(5)
    ]
    _check_variant_emb_cox(parts, "deviation", "", (*PAIR_CV_ARMS, "cox_clinical_emb_random"))
    plain = "survival_cv_ext_genemap_labeff_tf0.5_val_tiesloss_emb_nt"
    for suffix in ("", "_pre1", "_pre2"):
        argv = parts[f"{plain}_deviation{suffix}"].argv
        cohorts = argv[argv.index("--cohorts") + 1 : argv.index("--folds")]
        assert cohorts == list(evidence.EXTERNAL_COHORTS)  # evaluation only
        assert argv[argv.index("--data_dir") + 1].endswith("survset/external_cohort_genemap")
        assert (
            argv[argv.index("--gene_map") + 1] == evidence.GENE_MAP and argv[argv.index("--pca_rows") + 1] == "non_test"
        )
        assert argv[argv.index("--reuse_cache") + 1].endswith(f"survset/{plain}")
    fused = parts["survset_seed_spread_ext_genemap_labeff_tf0.5_val_tiesloss_emb_nt_deviation3_fused"]
    same_seeds = parts["survset_seed_spread_ext_genemap_labeff_tf0.5_val_tiesloss_emb_nt3_fused"]
    assert _listed(same_seeds) == [plain, f"{plain}_pre1", f"{plain}_pre2"]
    assert _listed(fused) == [f"{plain}_deviation{x}" for x in ("", "_pre1", "_pre2")]
    assert all(p.argv[p.argv.index("--fuse_with") + 1] == "best_baseline" for p in (fused, same_seeds))
    for s, suffix in enumerate(("", "_pre1", "_pre2")):
        argv = parts[f"survival_cv_labeff_tf0.25_val_tiesloss_deviation{suffix}"].argv
        assert argv[argv.index("--random_processor_settings") + 1] == f"{{root}}/{evidence.DEVIATION}"
        assert argv[argv.index("--reuse_cache") + 1].endswith(f"survival_cv_labeff_tf0.25_val_tiesloss_emb{suffix}")
        assert argv[argv.index("--pretrained_dir") + 1].endswith(
            f"pretrain_cvfolds_deviation_seed{s}/fold{{fold}}/final"
        )


def test_the_reconstruction_parts_change_only_the_objective_and_evaluate_externally_only():
    """Protocol J: the 15 backbones are the recipe with ``loss.reconstruction`` (each fold's own development manifest,
    seeds 0-2, the recipe's tokens); the embedding-Cox arms at 25% and 50% read the plain run of the pair back (same
    tokens, so the same random embedding and baselines) and are paired with it; the external check's setting on the
    mapped external cohorts only; the finetuned network at 25% with random init read back from the plain runs."""
    from bioperceiver.training import load_run_config

    parts = {p.name: p for p in evidence.PARTS}
    # the recipe adopted the term (protocol J's rule); every part recorded before pins it off to reproduce its numbers
    assert load_run_config(ROOT / evidence.SURVSET_RECIPE).loss.reconstruction == 1.0
    recipe = [p for p in evidence.PARTS if evidence.SURVSET_RECIPE in p.argv]
    assert len(recipe) > 60 and all(
        (evidence.BEFORE_RECON in p.argv) != p.name.startswith("survset_pretrain_recon_") for p in recipe
    )
    for s in range(3):
        for k in range(5):
            argv = parts[f"survset_pretrain_recon_seed{s}_fold{k}"].argv
            assert f"seed={s}" in argv and f"loss.reconstruction={evidence.RECON}" in argv
            assert not any(a.startswith("data.processor_settings") for a in argv)
            assert any(a.endswith(f"dev_cohort/manifest_cvfold{k}.parquet") for a in argv)
    tag = f"recon{evidence.RECON}"
    _check_variant_emb_cox(parts, tag, "_")
    plain = "survival_cv_ext_genemap_labeff_tf0.5_val_tiesloss_emb_nt"
    for suffix in ("", "_pre1", "_pre2"):
        argv = parts[f"{plain}_{tag}{suffix}"].argv
        assert argv[argv.index("--cohorts") + 1 : argv.index("--folds")] == list(evidence.EXTERNAL_COHORTS)
        assert argv[argv.index("--reuse_cache") + 1].endswith(f"survset/{plain}")
    ref = parts["survset_recon_reference"].argv
    assert [a for a in ref if "pretrain_cvfolds" in a] == [
        f"{{work}}/survset/pretrain_cvfolds_{tag}_seed{s}/fold{k}" for s in range(3) for k in range(5)
    ]
    fused = parts[f"survset_seed_spread_ext_genemap_labeff_tf0.5_val_tiesloss_emb_nt_{tag}_3_fused"]
    assert _listed(fused) == [f"{plain}_{tag}{x}" for x in ("", "_pre1", "_pre2")]
    for s, suffix in enumerate(("", "_pre1", "_pre2")):
        argv = parts[f"survival_cv_labeff_tf0.25_val_tiesloss_{tag}{suffix}"].argv
        assert "--random_processor_settings" not in argv
        reuse = argv[argv.index("--reuse_cache") + 1 :][:2]
        assert reuse[0].endswith(f"survival_cv_labeff_tf0.25_val_tiesloss_emb{suffix}")
        assert reuse[1].endswith(f"survival_cv_labeff_tf0.25_val_tiesloss_emb_{tag}{suffix}")
        assert argv[argv.index("--pretrained_dir") + 1].endswith(f"pretrain_cvfolds_{tag}_seed{s}/fold{{fold}}/final")


def test_the_external_ensemble_parts_only_evaluate_the_fixed_configuration():
    """The 3-seed embedding-Cox ensemble on the external cohorts at 25% and 50%: only the external cohorts, only the
    embedding arms (nothing finetuned or tuned there), each pair on its own backbones and init seed, the baselines
    read back from the same fraction's (0, 0) run (at 25% the earlier part), and the ensemble over the three; then
    seeds 3 and 4 the same way and the ensemble over all five."""
    parts = {p.name: p for p in evidence.PARTS}
    backbones = [(suffix, folder, init) for suffix, folder, init in SEED_PAIR_RUNS if suffix != "_init1"]
    for frac in ("0.25", "0.5"):
        first = f"survival_cv_ext_labeff_tf{frac}_val_tiesloss_emb"
        runs = []
        for suffix, folder, init in backbones:
            run = first + suffix
            argv = parts[run].argv
            assert argv[argv.index("--cohorts") + 1 :][:7] == [*evidence.EXTERNAL_COHORTS, "--folds"]
            assert argv[argv.index("--bp_arms") + 1 :][:4] == [*evidence.EMB_ARMS, "--pretrained_dir"]
            assert argv[argv.index("--pretrained_dir") + 1].endswith(f"survset/{folder}/fold{{fold}}/final")
            assert argv[argv.index("--train_fraction") + 1] == frac and argv[argv.index("--init_seed") + 1] == init
            assert argv[argv.index("--baseline_ties") + 1] == "loss" and "--subsample_validation" in argv
            if suffix:
                assert argv[argv.index("--reuse_cache") + 1].endswith(f"survset/{first}") and first in parts[run].needs
            runs.append(run)
        spread = parts[f"survset_seed_spread_ext_labeff_tf{frac}_val_tiesloss_emb3"]
        assert _listed(spread) == runs
        assert _ensembled(spread) == EMB_ENSEMBLE
        for s in (3, 4):  # seeds 3 and 4 as well (sixteenth session): their own backbones and init seeds
            argv = parts[f"{first}_pre{s}"].argv
            assert argv[argv.index("--cohorts") + 1 :][:7] == [*evidence.EXTERNAL_COHORTS, "--folds"]
            assert argv[argv.index("--pretrained_dir") + 1].endswith(
                f"survset/pretrain_cvfolds_seed{s}/fold{{fold}}/final"
            )
            assert argv[argv.index("--init_seed") + 1] == str(s) and argv[argv.index("--train_fraction") + 1] == frac
            assert argv[argv.index("--reuse_cache") + 1].endswith(f"survset/{first}")
        spread = parts[f"survset_seed_spread_ext_labeff_tf{frac}_val_tiesloss_emb5"]
        assert _listed(spread) == [*runs, f"{first}_pre3", f"{first}_pre4"]
        assert _ensembled(spread) == EMB_ENSEMBLE


def test_the_five_seed_parts_add_seeds_3_and_4_and_combine_each_seed_once():
    """Seeds 3 and 4: the embedding-Cox arms on their own fold-wise backbones and init seeds, baselines read back
    from the same fraction's (0, 0) run; the 5-seed spreads list each pretraining seed once, in order."""
    parts = {p.name: p for p in evidence.PARTS}
    assert [p for p, _ in evidence.FIVE_SEEDS] == [i for _, i in evidence.FIVE_SEEDS] == [0, 1, 2, 3, 4]
    for frac in ("0.25", "0.5"):
        first = f"survival_cv_labeff_tf{frac}_val_tiesloss_emb"
        for s in (3, 4):
            run = f"{first}_pre{s}"
            argv = parts[run].argv
            assert argv[argv.index("--pretrained_dir") + 1].endswith(
                f"survset/pretrain_cvfolds_seed{s}/fold{{fold}}/final"
            )
            assert argv[argv.index("--init_seed") + 1] == str(s) and argv[argv.index("--train_fraction") + 1] == frac
            assert argv[argv.index("--bp_arms") + 1 :][:4] == [*evidence.EMB_ARMS, "--pretrained_dir"]
            assert argv[argv.index("--reuse_cache") + 1].endswith(f"survset/{first}")
            assert set(parts[run].needs) == {first, *(f"survset_pretrain_seed{s}_fold{k}" for k in range(5))}
            pre = parts[f"survset_pretrain_seed{s}_fold0"].argv
            assert f"seed={s}" in pre and not any("decorrelation" in a for a in pre)
        spread = parts[f"survset_seed_spread_labeff_tf{frac}_val_tiesloss_emb5"]
        assert _listed(spread) == [first, *(f"{first}_pre{s}" for s in range(1, 5))]
        assert _ensembled(spread) == EMB_ENSEMBLE


def test_the_non_test_half_parts_give_the_baselines_the_unlabelled_profiles_for_all_five_seeds():
    """50%, every PCA on all non-test patients: each of the 5 seed pairs on its own backbones and init seed with
    ``--pca_rows non_test``; (0, 0) reads back from the plain 50% run (the baselines without PCA), the others from
    (0, 0)'s (the refitted baselines); the 5-seed ensemble and (0, 0) against the plain run. The same 5 runs on the
    external cohorts only, evaluation only."""
    parts = {p.name: p for p in evidence.PARTS}
    for ext in ("", "_ext"):
        plain = f"survival_cv{ext}_labeff_tf0.5_val_tiesloss_emb"
        first = f"{plain}_nt"
        runs = [first, *(f"{first}_pre{s}" for s in range(1, 5))]
        for s, run in enumerate(runs):
            argv = parts[run].argv
            folder = "pretrain_cvfolds" if s == 0 else f"pretrain_cvfolds_seed{s}"
            assert argv[argv.index("--pretrained_dir") + 1].endswith(f"survset/{folder}/fold{{fold}}/final")
            assert argv[argv.index("--pca_rows") + 1] == "non_test" and argv[argv.index("--init_seed") + 1] == str(s)
            assert argv[argv.index("--train_fraction") + 1] == "0.5" and "--subsample_validation" in argv
            assert argv[argv.index("--baseline_ties") + 1] == "loss"
            assert argv[argv.index("--bp_arms") + 1 :][:4] == [*evidence.EMB_ARMS, "--pretrained_dir"]
            reuse = plain if s == 0 else first
            assert argv[argv.index("--reuse_cache") + 1].endswith(f"survset/{reuse}") and reuse in parts[run].needs
            assert parts[run].optional
            data = argv[argv.index("--data_dir") + 1]
            if ext:
                assert data.endswith("survset/external_cohort")
                assert argv[argv.index("--cohorts") + 1 :][:7] == [*evidence.EXTERNAL_COHORTS, "--folds"]
            else:
                assert data.endswith("survset/cv_cohort") and "--cohorts" not in argv
    first = "survival_cv_labeff_tf0.5_val_tiesloss_emb_nt"
    spread = parts["survset_seed_spread_labeff_tf0.5_val_tiesloss_emb_nt5"]
    assert _listed(spread) == [first, *(f"{first}_pre{s}" for s in range(1, 5))]
    assert _ensembled(spread) == EMB_ENSEMBLE
    assert _listed(parts["survset_versus_labeff_tf0.5_val_tiesloss_emb_nt"]) == [first, first[: -len("_nt")]]


def test_the_fusion_parts_fuse_each_family_with_the_best_baseline():
    """Late fusion with each cohort's best baseline, for the pretrained and the random embeddings alike: the 5-seed
    development families at 25% and 50% (and 50% with every PCA non-test) and the 3-seed external families, each
    family's runs in seed order, nothing refitted (seed_spread.py reads their caches)."""
    parts = {p.name: p for p in evidence.PARTS}
    expect = {
        "labeff_tf0.25_val_tiesloss_emb5": ("survival_cv_labeff_tf0.25_val_tiesloss_emb", 5),
        "labeff_tf0.5_val_tiesloss_emb5": ("survival_cv_labeff_tf0.5_val_tiesloss_emb", 5),
        "labeff_tf0.5_val_tiesloss_emb_nt5": ("survival_cv_labeff_tf0.5_val_tiesloss_emb_nt", 5),
        "ext_labeff_tf0.5_val_tiesloss_emb_nt5": ("survival_cv_ext_labeff_tf0.5_val_tiesloss_emb_nt", 5),
        "ext_labeff_tf0.25_val_tiesloss_emb3": ("survival_cv_ext_labeff_tf0.25_val_tiesloss_emb", 3),
        "ext_labeff_tf0.5_val_tiesloss_emb3": ("survival_cv_ext_labeff_tf0.5_val_tiesloss_emb", 3),
        "ext_labeff_tf0.25_val_tiesloss_emb5": ("survival_cv_ext_labeff_tf0.25_val_tiesloss_emb", 5),
        "ext_labeff_tf0.5_val_tiesloss_emb5": ("survival_cv_ext_labeff_tf0.5_val_tiesloss_emb", 5),
    }
    for tag, (first, n) in expect.items():
        part = parts[f"survset_seed_spread_{tag}_fused"]
        assert _listed(part) == [first, *(f"{first}_pre{s}" for s in range(1, n))]
        assert _ensembled(part) == EMB_ENSEMBLE and part.optional
        assert part.argv[part.argv.index("--fuse_with") + 1] == "best_baseline"
        assert set(part.needs) <= {p.name for p in evidence.PARTS}


def test_the_gene_map_parts_rebuild_only_the_external_cohorts_with_the_map():
    """vdv's accessions mapped to symbols (seventeenth session): the external families of the external check (50%,
    every PCA non-test) and of 25% again, each of the 5 seed pairs on the external cohorts only, in their own data
    folder built with ``--gene_map`` (never the development cohorts' folder); their fused 5-seed ensembles; and each
    (0, 0) run against the same run without the map."""
    parts = {p.name: p for p in evidence.PARTS}
    assert (evidence.ROOT / evidence.GENE_MAP).is_file()
    for frac, nt in (("0.5", "_nt"), ("0.25", "")):
        first = f"survival_cv_ext_genemap_labeff_tf{frac}_val_tiesloss_emb{nt}"
        runs = [first, *(f"{first}_pre{s}" for s in range(1, 5))]
        for s, run in enumerate(runs):
            part = parts[run]
            argv = part.argv
            assert argv[argv.index("--gene_map") + 1] == evidence.GENE_MAP and part.optional
            assert argv[argv.index("--data_dir") + 1].endswith("survset/external_cohort_genemap")
            assert argv[argv.index("--cohorts") + 1 :][:7] == [*evidence.EXTERNAL_COHORTS, "--folds"]
            assert argv[argv.index("--train_fraction") + 1] == frac and argv[argv.index("--init_seed") + 1] == str(s)
            assert ("--pca_rows" in argv) == bool(nt)
            folder = "pretrain_cvfolds" if s == 0 else f"pretrain_cvfolds_seed{s}"
            assert argv[argv.index("--pretrained_dir") + 1].endswith(f"survset/{folder}/fold{{fold}}/final")
            if s == 0:
                assert "--reuse_cache" not in argv  # nothing cached without the map is read back
            else:
                assert argv[argv.index("--reuse_cache") + 1].endswith(f"survset/{first}") and first in part.needs
        fused = parts[f"survset_seed_spread_ext_genemap_labeff_tf{frac}_val_tiesloss_emb{nt}5_fused"]
        assert _listed(fused) == runs and _ensembled(fused) == EMB_ENSEMBLE
        assert fused.argv[fused.argv.index("--fuse_with") + 1] == "best_baseline"
        versus = parts[f"survset_versus_ext_genemap_labeff_tf{frac}_val_tiesloss_emb{nt}"]
        assert _listed(versus) == [first, first.replace("_ext_genemap_", "_ext_")]
        assert set(fused.needs) | set(versus.needs) <= set(parts)
    # protocol part E: the finetuned arms at 25% with the map, the baselines read back from the mapped 25% run
    run, old = "survival_cv_ext_genemap_labeff_tf0.25_val_tiesloss", "survival_cv_ext_labeff_tf0.25_val_tiesloss"
    new_argv, old_argv = parts[run].argv, parts[old].argv
    i, j = new_argv.index("--gene_map"), new_argv.index("--reuse_cache")
    assert new_argv[i + 1] == evidence.GENE_MAP
    assert new_argv[j + 1].endswith("survset/survival_cv_ext_genemap_labeff_tf0.25_val_tiesloss_emb")
    strip = [a for k, a in enumerate(new_argv) if k not in (i, i + 1, j + 1)]
    same = [a.replace("_ext_genemap_", "_ext_").replace("external_cohort_genemap", "external_cohort") for a in strip]
    assert same == [a for k, a in enumerate(old_argv) if k != old_argv.index("--reuse_cache") + 1]
    versus = parts["survset_versus_ext_genemap_labeff_tf0.25_val_tiesloss"]
    assert _listed(versus) == [run, old] and versus.argv[versus.argv.index("--versus") + 1 :] == [
        "bp_pretrained",
        "bp_random",
    ]


def test_the_gene_embedding_coverage_part_reads_the_seed_zero_fold_backbones_and_three_manifests():
    part = {p.name: p for p in evidence.PARTS}["survset_gene_embedding_coverage"]
    argv = part.argv
    runs = argv[argv.index("--runs") + 1 : argv.index("--manifest")]
    assert runs == [f"{evidence.W}/survset/pretrain_cvfolds/fold{k}" for k in range(5)]
    manifests = argv[argv.index("--manifest") + 1 : argv.index("--output_dir")]
    assert [m.split("/")[-2] for m in manifests] == ["dev_cohort", "external_cohort", "external_cohort_genemap"]
    assert set(evidence._backbone_parts(0)) <= set(part.needs) and part.optional
    assert set(part.needs) <= {p.name for p in evidence.PARTS}


def test_the_half_label_loss_rule_parts_cover_the_same_four_seed_pairs_as_at_a_quarter():
    parts = {p.name: p for p in evidence.PARTS}
    half = "survival_cv_labeff_tf0.5_val"
    runs = [f"{half}_tiesloss", *(f"{half}_tiesloss{evidence._pair_suffix(p, i)}" for p, i in evidence.SEED_PAIRS[1:])]
    for (pre, init), run in zip(evidence.SEED_PAIRS, runs, strict=True):
        argv = parts[run].argv
        assert argv[argv.index("--train_fraction") + 1] == "0.5" and "--subsample_validation" in argv
        assert argv[argv.index("--bp_best_model_ties") + 1] == "loss"
        assert argv[argv.index("--reuse_cache") + 1].endswith(f"survset/{half}")
        folder = "pretrain_cvfolds" if pre == 0 else f"pretrain_cvfolds_seed{pre}"
        assert argv[argv.index("--pretrained_dir") + 1].endswith(f"survset/{folder}/fold{{fold}}/final")
        if run != runs[0]:  # (0, 0) was recorded without the flag: its default is --seed, 0
            assert argv[argv.index("--init_seed") + 1] == str(init)
    spread = parts["survset_seed_spread_labeff_tf0.5_val_tiesloss4"]
    assert _listed(spread) == runs and set(spread.needs) == set(runs)


def test_the_width_parts_change_only_the_width_and_pair_with_the_recipes_runs():
    """Protocols V and W (twenty-sixth session): K's recipe and processors with a wider model, the embedding-Cox runs
    reading K's baselines back and paired with K's runs of the same seed pair (W's also with V's)."""
    parts = {p.name: p for p in evidence.PARTS}
    for protocol, (width, latents, seeds) in evidence.WIDTHS.items():
        tag = f"wide{width}"
        for s in seeds:
            for k in range(5):
                part = parts[f"survset_pretrain_recon_{tag}_seed{s}_fold{k}"]
                argv = part.argv
                overrides = {a.split("=")[0]: a.split("=")[1] for a in argv if a.startswith("model.overrides.")}
                assert overrides == {
                    "model.overrides.d_latents": str(width),
                    "model.overrides.d_input": str(width),
                    "model.overrides.num_latents": str(latents),
                    "model.overrides.projection_dim": str(width // 2),
                }
                assert (
                    f"data.processor_dir={evidence.W}/survset/pretrain_cvfolds_recon1_seed{s}/fold{k}/processor" in argv
                )
                assert f"seed={s}" in argv and "loss.reconstruction=1" in argv and part.optional
                assert f"data.manifest={evidence.W}/survset/dev_cohort/manifest_cvfold{k}.parquet" in argv
        for frac in ("0.5", "0.25"):
            runs = []
            for s in seeds:
                sfx = evidence._pair_suffix(s, s)
                run = f"survival_cv_labeff_tf{frac}_recon1_{tag}_selcv{sfx}"
                argv = parts[run].argv
                assert argv[argv.index("--reuse_cache") + 1].endswith(
                    f"survset/survival_cv_labeff_tf{frac}_recon1_selcv{sfx}"
                )
                assert argv[argv.index("--pretrained_dir") + 1].endswith(
                    f"survset/pretrain_cvfolds_recon1_{tag}_seed{s}/fold{{fold}}/final"
                )
                assert argv[argv.index("--selection") + 1] == "inner_cv" and argv[argv.index("--init_seed") + 1] == str(
                    s
                )
                runs.append(run)
            minus = parts[f"survset_{tag}_tf{frac}_recon1_minus_plain"].argv
            partners = minus[minus.index("--against") + 1 : minus.index("--against_label")]
            assert [p.split("/")[-1] for p in partners] == [r.replace(f"_{tag}_", "_") for r in runs]
            assert (f"survset_{tag}_tf{frac}_recon1_minus_wide64" in parts) == (protocol == "W")
        curve = parts[f"survset_{tag}_label_free"]
        assert set(curve.needs) <= set(parts) and curve.argv[curve.argv.index("--x") + 1] == "family"
    assert (
        evidence.WIDTHS["V"][2] == (0, 1, 2) and "survset_seed_spread_labeff_tf0.5_recon1_wide128_selcv1" not in parts
    )


def test_the_fresh_seed_parts_add_pairs_3_and_4_for_k_and_v_and_keep_the_fresh_pairs_apart():
    """Protocol X (twenty-seventh session): K's recipe at seeds 3 and 4 fits its own processors, V's reads them; K's
    fresh runs read only the classical baselines back from K's (0, 0) run; V - K is paired per seed pair on the 2
    fresh pairs alone and on all 5, in the same order on both sides."""
    parts = {p.name: p for p in evidence.PARTS}
    assert evidence.FRESH_SEEDS == (3, 4)
    for s in evidence.FRESH_SEEDS:
        for k in range(5):
            k_argv = parts[f"survset_pretrain_recon_seed{s}_fold{k}"].argv
            assert f"seed={s}" in k_argv and "loss.reconstruction=1" in k_argv
            assert not any(a.startswith(("data.processor_dir=", "model.overrides.")) for a in k_argv)
            v_argv = parts[f"survset_pretrain_recon_wide64_seed{s}_fold{k}"].argv
            assert (
                f"data.processor_dir={evidence.W}/survset/pretrain_cvfolds_recon1_seed{s}/fold{k}/processor" in v_argv
            )
            assert f"{evidence.W}/survset/pretrain_cvfolds_recon1_wide64_seed{s}/fold{k}" in " ".join(v_argv)
    for frac in ("0.5", "0.25"):
        for s in evidence.FRESH_SEEDS:
            argv = parts[f"survival_cv_labeff_tf{frac}_recon1_selcv_pre{s}"].argv
            assert argv[argv.index("--reuse_cache") + 1 :] == [
                f"{evidence.W}/survset/survival_cv_labeff_tf{frac}_recon1_selcv"
            ]  # only the (0, 0) run: its baselines; the embeddings' cache keys name other backbones and seeds
            assert argv[argv.index("--init_seed") + 1] == str(s) and argv[argv.index("--selection") + 1] == "inner_cv"
            assert argv[argv.index("--pretrained_dir") + 1].endswith(
                f"pretrain_cvfolds_recon1_seed{s}/fold{{fold}}/final"
            )
        for group, seeds in (("fresh", (3, 4)), ("5", (0, 1, 2, 3, 4))):
            argv = parts[f"survset_wide64_tf{frac}_recon1_minus_plain_{group}"].argv
            runs = argv[argv.index("--runs") + 1 : argv.index("--labels")]
            partners = argv[argv.index("--against") + 1 : argv.index("--against_label")]
            sfx = [evidence._pair_suffix(s, s) for s in seeds]
            assert [r.split("/")[-1] for r in runs] == [
                f"survival_cv_labeff_tf{frac}_recon1_wide64_selcv{x}" for x in sfx
            ]
            assert [r.split("/")[-1] for r in partners] == [f"survival_cv_labeff_tf{frac}_recon1_selcv{x}" for x in sfx]
    curve = parts["survset_wide64_label_free_5"]
    assert curve.argv.count("--spread") == 4 and set(curve.needs) <= set(parts)
    assert "pretrain_cvfolds_recon1_seed[01234]/fold*" in " ".join(curve.argv)


def test_the_generalization_gap_part_reads_every_family_s_backbones_and_needs_them():
    """Protocol Y: one generalization_gap.py run over the width, step and corpus families, each glob naming the
    folders its needed parts pretrain (seeds 0-2; 128 wide: seed 0)."""
    part = next(p for p in evidence.PARTS if p.name == "survset_generalization_gap")
    argv = part.argv
    families = {argv[i + 1]: argv[i + 2] for i, a in enumerate(argv) if a == "--backbones"}
    assert list(families) == ["32 wide", "64 wide", "128 wide", "800 steps", "1600 steps", "25% corpus", "50% corpus"]
    assert families["128 wide"].endswith("survset/pretrain_cvfolds_recon1_wide128_seed[0]/fold*")
    assert families["25% corpus"].endswith("survset/pretrain_cvfolds_recon1_corpus0.25_seed[012]/fold*")
    assert len(part.needs) == 6 * 15 + 5 and "survset_pretrain_recon_steps1600_seed2_fold4" in part.needs
    folders = {
        p.argv[p.argv.index("--config") + 2].split("output_dir=")[1] for p in evidence.PARTS if p.name in part.needs
    }
    for label, pattern in families.items():
        matched = [f for f in folders if fnmatch.fnmatch(f, pattern)]
        assert len(matched) == (5 if label == "128 wide" else 15), label


def test_the_dropout_pilot_changes_only_the_backbone_dropout_and_pairs_with_k_s_seed_0_runs():
    """Protocol Z: K's recipe and processors (seed 0) with hidden_dropout, its runs reading K's (0, 0) baselines back
    and paired with K's (0, 0) runs, and the gap beside K's seed-0 backbones."""
    parts = {p.name: p for p in evidence.PARTS}
    for k in range(5):
        argv = parts[f"survset_pretrain_recon_dropout{evidence.DROPOUT}_seed0_fold{k}"].argv
        assert [a for a in argv if a.startswith("model.overrides.")] == [
            f"model.overrides.hidden_dropout={evidence.DROPOUT}"
        ]
        assert f"data.processor_dir={evidence.W}/survset/pretrain_cvfolds_recon1_seed0/fold{k}/processor" in argv
    for frac in ("0.5", "0.25"):
        argv = parts[f"survival_cv_labeff_tf{frac}_recon1_dropout{evidence.DROPOUT}_selcv"].argv
        assert argv[argv.index("--reuse_cache") + 1].endswith(f"survset/survival_cv_labeff_tf{frac}_recon1_selcv")
        minus = parts[f"survset_dropout{evidence.DROPOUT}_tf{frac}_recon1_minus_plain"].argv
        assert minus[minus.index("--against") + 1].endswith(f"survset/survival_cv_labeff_tf{frac}_recon1_selcv")
    gap = parts[f"survset_dropout{evidence.DROPOUT}_generalization_gap"]
    assert len(gap.needs) == 10 and set(gap.needs) <= set(parts)


def test_each_regulariser_pilot_changes_one_setting_of_k_s_recipe_on_k_s_processors():
    """Protocol AA: each pilot's backbones are Z's (K's recipe on K's seed-0 processors) with its own override in place
    of the dropout, that override changes exactly the one setting of the recipe it names, the runs read K's (0, 0)
    baselines back and pair with K's runs, and the joint gap table reads K's and all four pilots' backbones."""
    from bioperceiver.training.config import changed_keys, load_run_config

    parts = {p.name: p for p in evidence.PARTS}
    recipe = Path(__file__).resolve().parents[1] / evidence.SURVSET_RECIPE
    base = load_run_config(recipe, ["loss.reconstruction=1"])
    dropout = f"model.overrides.hidden_dropout={evidence.DROPOUT}"
    assert set(evidence.REGULARISERS) == {"subset0.25", "wd0.5", "fixedtemp", "steps200"}
    for tag, (_, overrides, _) in evidence.REGULARISERS.items():
        (setting,) = overrides
        key = setting.split("=")[0]
        assert changed_keys(base, load_run_config(recipe, ["loss.reconstruction=1", setting])) == [key]
        for k in range(5):
            argv = parts[f"survset_pretrain_recon_{tag}_seed0_fold{k}"].argv
            z = parts[f"survset_pretrain_recon_dropout{evidence.DROPOUT}_seed0_fold{k}"].argv
            assert argv[z.index(dropout)] == setting
            expected = [a.replace(f"_dropout{evidence.DROPOUT}_", f"_{tag}_") for a in z]
            assert [a for a in argv if a != setting] == [a for a in expected if a != dropout]
        for frac in ("0.5", "0.25"):
            argv = parts[f"survival_cv_labeff_tf{frac}_recon1_{tag}_selcv"].argv
            assert argv[argv.index("--reuse_cache") + 1].endswith(f"survset/survival_cv_labeff_tf{frac}_recon1_selcv")
            minus = parts[f"survset_{tag}_tf{frac}_recon1_minus_plain"].argv
            assert minus[minus.index("--against") + 1].endswith(f"survset/survival_cv_labeff_tf{frac}_recon1_selcv")
    gap = parts["survset_regularisers_generalization_gap"]
    assert len(gap.needs) == 25 and set(gap.needs) <= set(parts)
    globs = [gap.argv[i + 2] for i, a in enumerate(gap.argv) if a == "--backbones"]
    folders = ["pretrain_cvfolds_recon1_seed0", *(f"pretrain_cvfolds_recon1_{t}_seed0" for t in evidence.REGULARISERS)]
    assert globs == [f"{evidence.W}/survset/{f}/fold*" for f in folders]


@pytest.mark.parametrize("tag", ["wd0.5", "steps200"])
def test_a_confirmed_regulariser_pairs_each_fresh_seed_with_k_s_run_of_that_pair(tag):
    """Protocol AC: the chosen pilot's setting on K's processors of seeds 1-4, each run paired with K's run of the same
    seed pair (its baselines read back from it); the fresh comparison leaves out the pilot's pair (0, 0), the all-pairs
    one adds it, and both list the partners in the same order as the runs."""
    parts = {p.name: p for p in evidence._confirmation_parts(tag)}
    every = {p.name for p in evidence.PARTS} | set(parts)
    _, (setting,), _ = evidence.REGULARISERS[tag]
    assert evidence.CONFIRMED in evidence.REGULARISERS
    for s in evidence.CONFIRM_SEEDS:
        for k in range(5):
            argv = parts[f"survset_pretrain_recon_{tag}_seed{s}_fold{k}"].argv
            assert setting in argv and f"seed={s}" in argv
            assert f"data.processor_dir={evidence.W}/survset/pretrain_cvfolds_recon1_seed{s}/fold{k}/processor" in argv
    for frac in ("0.5", "0.25"):
        for s in evidence.CONFIRM_SEEDS:
            run = parts[f"survival_cv_labeff_tf{frac}_recon1_{tag}_selcv_pre{s}"]
            assert run.argv[run.argv.index("--reuse_cache") + 1].endswith(f"tf{frac}_recon1_selcv_pre{s}")
            assert set(run.needs) <= every
        for group, seeds in (("fresh", evidence.CONFIRM_SEEDS), ("all", (0, *evidence.CONFIRM_SEEDS))):
            argv = parts[f"survset_{tag}_tf{frac}_recon1_minus_plain_{group}"].argv
            runs = argv[argv.index("--runs") + 1 : argv.index("--labels")]
            partners = argv[argv.index("--against") + 1 : argv.index("--against_label")]
            assert len(runs) == len(partners) == len(seeds)
            for s, run, partner in zip(seeds, runs, partners):
                sfx = f"_pre{s}" if s else ""
                assert run.endswith(f"tf{frac}_recon1_{tag}_selcv{sfx}") and partner.endswith(
                    f"tf{frac}_recon1_selcv{sfx}"
                )
            assert set(parts[f"survset_{tag}_tf{frac}_recon1_minus_plain_{group}"].needs) <= every
