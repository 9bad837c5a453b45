#!/usr/bin/env python
"""The whole evidence table of issue 18 in one resumable command (``make evidence``): does pretraining pay off?

    python benchmarks/evidence.py                          # every part, in order; finished parts are skipped
    python benchmarks/evidence.py --with_optional          # also the optional parts (~3.5 h more)
    python benchmarks/evidence.py --list                   # the parts, their commands and whether each is done
    python benchmarks/evidence.py --only survival_cv       # one part (its prerequisites must be done)
    python benchmarks/evidence.py --redo label_efficiency  # run a finished part again

Each part is one command (a script of this folder or of ``pretrain/``) that writes its results under
``--work_dir`` (default ``outputs/evidence``). A part is *done* when the file it names as its result exists; the
scripts write results atomically and skip their own finished sub-runs, and an interrupted pretraining resumes from
its last checkpoint (``--resume latest``), so re-running the same command continues where it stopped (a finished
pretraining part that ``--redo`` names trains again from scratch).
``evidence_log.json`` records each part's command, wall time, exit status and environment (the hash of the lock
file ``constraints.txt`` that ``make setup`` installs from, every locked package installed at another version, and
the host: CPU model, CPU kernels, thread count, GPUs);
at the end ``EVIDENCE.md`` lists every part with its command, wall time and environment, followed by the tables the
parts write (``<result>.md``).

External validation cohorts (SurvSet gse3143, DBCD, DLBCL, chop, AML_Bull, vdv) appear only in evaluation parts,
with settings fixed beforehand or chosen on validation folds of the development cohorts.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from tqdm.auto import tqdm

logger = logging.getLogger("evidence")
ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"  # the versions `make setup` installs (`make lock` writes it)


def read_lock(path: Path | None = None) -> dict[str, str]:
    """``constraints.txt`` (or ``path``) as ``{canonical name: version}`` (``name==version`` lines; comments
    ignored)."""
    path = path or LOCK
    pins = {}
    for line in path.read_text().splitlines():
        if line := line.split("#", 1)[0].strip():
            name, sep, version = line.partition("==")
            if not sep:
                raise ValueError(f"{path}: {line!r} is not a 'name==version' pin")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (``/proc/cpuinfo``), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def host() -> dict:
    """The machine behind a part's numbers, beside the packages: the CPU model, the CPUs this process may use, the
    CPU kernels torch dispatches to (``ATEN_CPU_CAPABILITY``, inherited by the parts) and its default thread count,
    and the GPUs. The same code, data and seeds end at different weights on AVX2 and AVX-512 kernels or on another
    thread count (benchmarks/RESULTS.md, "The recorded fold-wise backbones are not reproduced bit for bit"), so a
    re-run that disagrees with a recorded number is first compared on these."""
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    return {
        "cpu": cpu_model(),
        "cpus": cpus,
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "gpus": gpus,
    }


def host_text(facts: dict | None) -> str:
    if not facts:
        return "host not recorded"
    gpus = f", {len(facts['gpus'])}× {facts['gpus'][0]}" if facts.get("gpus") else ""
    return (
        f"{facts['cpu']}, {facts['cpus']} CPUs, {facts['cpu_kernels']} kernels, {facts['torch_threads']} threads{gpus}"
    )


def environment(lock: Path | None = None) -> dict:
    """The installed packages against the lock file: its hash (first 12 hex digits of sha256; None without one) and
    each locked package installed at another version or not at all (``{name: {"locked", "installed"}}``), so that a
    recorded number can be traced to the versions that produced it, and the machine (``host``: :func:`host`). A
    local build tag (``+cu130``) is not a difference."""
    lock = lock or LOCK
    if not lock.is_file():
        return {"lock": None, "off_lock": {}, "host": host()}
    off = {}
    for name, locked in read_lock(lock).items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have is None or not SpecifierSet(f"=={locked}").contains(have, prereleases=True):
            off[name] = {"locked": locked, "installed": have}
    return {"lock": hashlib.sha256(lock.read_bytes()).hexdigest()[:12], "off_lock": off, "host": host()}


def environment_text(env: dict | None) -> str:
    if not env:
        return "not recorded"
    off = env["off_lock"]
    packages = (
        "no lock file"
        if env["lock"] is None
        else f"lock {env['lock']}" + (f", {len(off)} package(s) off it" if off else "")
    )
    return f"{packages}; {host_text(env.get('host'))}"


@dataclass
class Part:
    """One step of the evidence table: ``argv`` (``{work}``, ``{python}`` and ``{root}`` are filled in), the result
    file that marks it done (relative to the work dir), the parts it needs and a time estimate on a 2-core CPU."""

    name: str
    what: str
    argv: list[str]
    result: str
    needs: list[str] = field(default_factory=list)
    minutes: float = 5.0
    optional: bool = False  # run only with --with_optional or when named in --only (beyond the two-hour table)


PY, W = "{python}", "{work}"


SURVSET_RECIPE = "pretrain/configs/survset_omics.yaml"
BEFORE_RECON = "loss.reconstruction=0"
"""The SurvSet recipe as every part recorded before protocol J (nineteenth session) ran it: the recipe has since
adopted ``loss.reconstruction: 1``; these parts pin it off so that they reproduce their recorded numbers."""


def _pretrain(config: str, out: str, *overrides: str) -> list[str]:
    if config == SURVSET_RECIPE and not any(o.startswith("loss.reconstruction=") for o in overrides):
        overrides = (BEFORE_RECON, *overrides)
    return [
        PY,
        "pretrain/run_pretrain.py",
        "--config",
        config,
        f"output_dir={out}",
        *overrides,
        "--overwrite_output_dir",
    ]


def _survival(
    out: str,
    data: str,
    *cohorts: str,
    pretrained: str = f"{W}/survset/pretrain/final",
    arms: tuple[str, ...] = (),
    extra: tuple[str, ...] = (),
    epochs: int = 15,
) -> list[str]:
    chosen = ["--cohorts", *cohorts] if cohorts else []
    return [
        PY,
        "benchmarks/survival_cv.py",
        *chosen,
        "--folds",
        "5",
        "--bp_epochs",
        str(epochs),
        *(["--bp_arms", *arms] if arms else []),
        "--pretrained_dir",
        pretrained,
        "--output_dir",
        out,
        "--data_dir",
        data,
        *extra,
    ]


def _seed_spread(out: str, runs: dict[str, str], *extra: str) -> list[str]:
    """``seed_spread.py`` over ``runs`` (label -> survset run folder), written to ``survset/<out>``."""
    return [
        PY,
        "benchmarks/seed_spread.py",
        "--runs",
        *(f"{W}/survset/{r}" for r in runs.values()),
        "--labels",
        *runs,
        "--output_dir",
        f"{W}/survset/{out}",
        *extra,
    ]


EMB_ARMS = ("cox_clinical_emb_pretrained", "cox_clinical_emb_random", "cox_clinical_pcs_emb_pretrained")
# seed_spread.py: the pretrained embedding-Cox arm averaged over runs, against the random-init embedding alike
EMB_ENSEMBLE = ("--ensemble", "cox_clinical_emb_pretrained", "cox_clinical_emb_random")
EXTERNAL_COHORTS = ("gse3143", "DBCD", "DLBCL", "chop", "AML_Bull", "vdv")  # evaluation only
FINETUNED_ARMS = ("bp_random", "bp_pretrained", "bp_random_probe", "bp_pretrained_probe")
LR_GRID = ("3e-4", "1e-3", "3e-3")  # the optional learning-rate-grid parts (the PadChest label-efficiency grid)
LABEL_FRACTIONS = ("0.25", "0.5", "1")  # the optional SurvSet label-efficiency parts (--train_fraction)
EXTRA_SEEDS = (1, 2, 3, 4)  # the optional seed-spread parts: pretraining seed s with --init_seed s


SEED_PAIRS = ((0, 0), (0, 1), (1, 1), (2, 2))  # (pretraining seed, finetuning seed) of the label-efficiency runs
WIDE_PM = ("--bp_head_linear", "omics_expression", "tabular_clinical", "--bp_head_linear_per_modality")
WIDE_TEXT = "with the expression + clinical linear term, one ridge penalty per modality"
LAST_TEXT = "keeping the last epoch instead of the best validation checkpoint"
TIES_TEXT = {"loss": "lowest-validation-loss one", "last": "latest"}  # --bp_best_model_ties


def _pair_suffix(pre: int, init: int) -> str:
    """A label-efficiency run's folder suffix for its (pretraining seed, finetuning seed)."""
    return "" if (pre, init) == (0, 0) else "_init1" if pre == 0 else f"_pre{pre}"


def _seed_text(what: str, pre: int, init: int) -> str:
    return f"{what}, fold-wise backbones of pretraining seed {pre}, finetuning seed {init}, lr grid"


def _fold_backbone(
    name: str, what: str, folder: str, k: int, *overrides: str, minutes: float = 3, optional=True, needs=()
):
    """The part that pretrains the SurvSet recipe without CV fold ``k``'s test patients (its fold manifest) into
    ``survset/<folder>/fold<k>``, with run-config ``overrides``; ``needs``: parts it needs besides the fold manifests
    (e.g. the backbone whose processors ``data.processor_dir`` reads)."""
    return Part(
        name,
        what,
        _pretrain(
            SURVSET_RECIPE,
            f"{W}/survset/{folder}/fold{k}",
            f"data.manifest={W}/survset/dev_cohort/manifest_cvfold{k}.parquet",
            *overrides,
        ),
        f"survset/{folder}/fold{k}/final/config.json",
        needs=["survset_fold_manifests", *needs],
        minutes=minutes,
        optional=optional,
    )


def _backbones(pre: int) -> str:
    """The ``survset/`` folder of the plain recipe's fold-wise backbones of pretraining seed ``pre``."""
    return "pretrain_cvfolds" if pre == 0 else f"pretrain_cvfolds_seed{pre}"


def _backbone_parts(pre: int) -> list[str]:
    """The parts that pretrain the five fold-wise backbones of pretraining seed ``pre``."""
    return [f"survset_pretrain_fold{k}" if pre == 0 else f"survset_pretrain_seed{pre}_fold{k}" for k in range(5)]


def _finetuned(
    run: str,
    what: str,
    *extra: str,
    pre: int = 0,
    needs=(),
    minutes: float = 8,
    arms=FINETUNED_ARMS[:2],
    backbones: str | None = None,
) -> Part:
    """Optional: ``survival_cv.py`` with the two finetuned arms (or ``arms``) on the fold-wise backbones of
    pretraining seed ``pre`` (or the ``survset/<backbones>`` folders), the learning-rate grid, then ``extra``, into
    ``survset/<run>``."""
    backbones = backbones or _backbones(pre)
    argv = _survival(
        f"{W}/survset/{run}",
        f"{W}/survset/cv_cohort",
        pretrained=f"{W}/survset/{backbones}/fold{{fold}}/final",
        arms=tuple(arms),
        extra=("--bp_lrs", *LR_GRID, *extra),
    )
    return Part(run, what, argv, f"survset/{run}/survival_cv.json", needs=list(needs), minutes=minutes, optional=True)


def _seeded(
    run: str,
    what: str,
    extra: tuple[str, ...],
    pre: int,
    init: int,
    reuse: str,
    minutes: float,
    arms=FINETUNED_ARMS[:2],
) -> Part:
    """:func:`_finetuned` for seed pair (``pre``, ``init``): ``extra``, ``--init_seed init``, and the ``reuse`` run's
    cache read back (the part needs it and seed ``pre``'s backbones)."""
    back = ("--init_seed", str(init), "--reuse_cache", f"{W}/survset/{reuse}")
    needs = [reuse, *_backbone_parts(pre)]
    return _finetuned(run, what, *extra, *back, pre=pre, needs=needs, minutes=minutes, arms=arms)


def _spread(
    out: str, runs: dict[str, str], what: str, *extra: str, name: str | None = None, against: tuple[dict, str] = ()
) -> Part:
    """Optional: ``seed_spread.py`` over ``runs`` (label -> survset run folder) into ``survset/<out>``; ``against``:
    ``(partner runs in the same order, their setting's name)`` for ``--against``."""
    partners, label = against or ({}, "")
    if partners:
        extra = (*extra, "--against", *(f"{W}/survset/{r}" for r in partners.values()), "--against_label", label)
    return Part(
        name or f"survset_{out}",
        what,
        _seed_spread(out, runs, *extra),
        f"survset/{out}/seed_spread.json",
        needs=[*runs.values(), *partners.values()],
        minutes=0.5,
        optional=True,
    )


def _curve_part(out: str, what: str, argv: list[str], needs, name: str | None = None) -> Part:
    """Optional: ``benchmarks/corpus_curve.py`` (``argv``, all but its output folder) into ``survset/<out>``."""
    return Part(
        name or f"survset_{out}",
        what,
        [*argv, "--output_dir", f"{W}/survset/{out}"],
        f"survset/{out}/corpus_curve.json",
        needs=list(needs),
        minutes=0.5,
        optional=True,
    )


def _versus(out: str, a: str, b: str, what: str, labels=("last", "best"), name: str | None = None) -> Part:
    """Optional: run ``a``'s finetuned arms against run ``b``'s, paired on the same test patients."""
    return _spread(out, dict(zip(labels, (a, b))), what, "--versus", "bp_pretrained", "bp_random", name=name)


def _curve(name: str, out: str, runs: list[str], what: str) -> Part:
    """Optional: ``survival_label_efficiency.py`` over ``runs`` into ``survset/<out>``."""
    argv = [PY, "benchmarks/survival_label_efficiency.py", "--runs", *(f"{W}/survset/{r}" for r in runs)]
    argv += ["--output_dir", f"{W}/survset/{out}"]
    return Part(name, what, argv, f"survset/{out}/label_efficiency.json", needs=list(runs), minutes=0.5, optional=True)


def _seed_parts() -> list[Part]:
    """Optional: the fold-wise SurvSet backbones and embedding CV again with pretraining seeds 1-4 (``--init_seed``
    the same, so the random-init control is reseeded too), a second finetuning seed (``--init_seed 1``) for the
    finetuned arms, and ``seed_spread.py`` over them (~80 min on 2 idle cores); the finetuned arms with the
    learning rate chosen on validation (``--bp_lrs``), finetuning seeds 0 and 1, ``seed_spread.py`` over those, and
    the clinical-only, modality-dropout, wide & deep (2 finetuning seeds, a second backbone) and external runs (~3 h
    more)."""
    parts = []
    for s in EXTRA_SEEDS:
        parts += [
            _fold_backbone(
                f"survset_pretrain_seed{s}_fold{k}",
                f"survset_pretrain_fold{k} with seed={s}",
                _backbones(s),
                k,
                f"seed={s}",
                minutes=5,
            )
            for k in range(5)
        ]
        parts.append(
            Part(
                f"survival_cv_foldwise_seed{s}",
                f"survival_cv_foldwise on the seed-{s} backbones, --init_seed {s}",
                _survival(
                    f"{W}/survset/survival_cv_foldwise_seed{s}",
                    f"{W}/survset/cv_cohort",
                    pretrained=f"{W}/survset/pretrain_cvfolds_seed{s}/fold{{fold}}/final",
                    arms=EMB_ARMS,
                    extra=("--init_seed", str(s)),
                ),
                f"survset/survival_cv_foldwise_seed{s}/survival_cv.json",
                needs=[f"survset_pretrain_seed{s}_fold{k}" for k in range(5)],
                minutes=8,
                optional=True,
            )
        )
    parts += [
        Part(
            "survset_seed_spread_foldwise",
            "the fold-wise embedding arms over pretraining seeds 0-4: mean, SD, two-level bootstrap CI; seed ensemble",
            _seed_spread(
                "seed_spread_foldwise",
                {
                    "seed0": "survival_cv_foldwise",
                    **{f"seed{s}": f"survival_cv_foldwise_seed{s}" for s in EXTRA_SEEDS},
                },
                "--ensemble",
                "cox_clinical_emb_pretrained",
                "cox_clinical_emb_random",
            ),
            "survset/seed_spread_foldwise/seed_spread.json",
            needs=["survival_cv_foldwise", *(f"survival_cv_foldwise_seed{s}" for s in EXTRA_SEEDS)],
            minutes=0.5,
            optional=True,
        ),
    ]
    # the fold-wise embedding arms on backbones pretrained with the per-gene value embedding
    # (tokenizers/survset_processors_pergene.yaml), pretraining seeds 0 and 1, each paired with the same seed's
    # shared-encoding run above
    pergene = "tokenizers/survset_processors_pergene.yaml"
    for s in (0, 1):
        shared = "survival_cv_foldwise" if s == 0 else f"survival_cv_foldwise_seed{s}"
        run = f"survival_cv_foldwise_pergene_seed{s}"
        parts += [
            _fold_backbone(
                f"survset_pretrain_pergene_seed{s}_fold{k}",
                f"survset_pretrain_fold{k} with seed={s} and {pergene}",
                f"pretrain_cvfolds_pergene_seed{s}",
                k,
                f"data.processor_settings={{root}}/{pergene}",
                f"seed={s}",
            )
            for k in range(5)
        ]
        parts += [
            Part(
                run,
                f"survival_cv_foldwise on the per-gene seed-{s} backbones, --init_seed {s}",
                _survival(
                    f"{W}/survset/{run}",
                    f"{W}/survset/cv_cohort",
                    pretrained=f"{W}/survset/pretrain_cvfolds_pergene_seed{s}/fold{{fold}}/final",
                    arms=EMB_ARMS,
                    extra=("--init_seed", str(s)),
                ),
                f"survset/{run}/survival_cv.json",
                needs=[f"survset_pretrain_pergene_seed{s}_fold{k}" for k in range(5)],
                minutes=6,
                optional=True,
            ),
            Part(
                f"survset_versus_foldwise_pergene_seed{s}",
                f"{run} - {shared} (the shared value encoding), paired on the same test patients",
                _seed_spread(
                    f"versus_foldwise_pergene_seed{s}",
                    {"pergene": run, "shared": shared},
                    "--versus",
                    "cox_clinical_emb_pretrained",
                    "cox_clinical_emb_random",
                ),
                f"survset/versus_foldwise_pergene_seed{s}/seed_spread.json",
                needs=[run, shared],
                minutes=0.5,
                optional=True,
            ),
        ]
    parts += [
        Part(
            "survival_cv_init1",
            "survival_cv's finetuned arms again with --init_seed 1 (same folds, same pretrained backbone)",
            _survival(
                f"{W}/survset/survival_cv_init1",
                f"{W}/survset/cv_cohort",
                arms=FINETUNED_ARMS,
                extra=("--init_seed", "1"),
            ),
            "survset/survival_cv_init1/survival_cv.json",
            needs=["survival_cv"],
            minutes=40,
            optional=True,
        ),
        Part(
            "survset_seed_spread_finetuned",
            "the finetuned arms over finetuning seeds 0-1",
            _seed_spread(
                "seed_spread_finetuned",
                {"init0": "survival_cv", "init1": "survival_cv_init1"},
                "--ensemble",
                "bp_pretrained",
                "bp_random",
            ),
            "survset/seed_spread_finetuned/seed_spread.json",
            needs=["survival_cv", "survival_cv_init1"],
            minutes=0.5,
            optional=True,
        ),
    ]
    for init, run, needs in (
        (0, "survival_cv_lrgrid", "survival_cv"),
        (1, "survival_cv_lrgrid_init1", "survival_cv_init1"),
    ):
        parts.append(
            Part(
                run,
                f"the finetuned arms, learning rate chosen on validation from {{{', '.join(LR_GRID)}}}, "
                f"--init_seed {init} (the {LR_GRID[0]} runs read back from {needs})",
                _survival(
                    f"{W}/survset/{run}",
                    f"{W}/survset/cv_cohort",
                    arms=FINETUNED_ARMS,
                    extra=(
                        "--bp_lrs",
                        *LR_GRID,
                        "--init_seed",
                        str(init),
                        "--reuse_cache",
                        *dict.fromkeys((f"{W}/survset/{needs}", f"{W}/survset/survival_cv")),
                    ),
                ),
                f"survset/{run}/survival_cv.json",
                needs=[needs],
                minutes=35,
                optional=True,
            )
        )
    parts.append(
        Part(
            "survset_seed_spread_lrgrid",
            "the learning-rate-grid finetuned arms over finetuning seeds 0-1",
            _seed_spread(
                "seed_spread_lrgrid",
                {"init0": "survival_cv_lrgrid", "init1": "survival_cv_lrgrid_init1"},
                "--ensemble",
                "bp_pretrained",
                "bp_random",
            ),
            "survset/seed_spread_lrgrid/seed_spread.json",
            needs=["survival_cv_lrgrid", "survival_cv_lrgrid_init1"],
            minutes=0.5,
            optional=True,
        )
    )
    # why the finetuned arms lose: the clinical covariates alone (15 and 60 epochs), and modality dropout
    grid = ("--bp_lrs", *LR_GRID, "--reuse_cache", f"{W}/survset/survival_cv_lrgrid")
    clinical = ("--bp_modalities", "tabular_clinical")
    for run, what, cohorts, extra, epochs, minutes in (
        ("survival_cv_clinical_only", "on the clinical covariates alone", (), clinical, 15, 12),
        (
            "survival_cv_clinical_only_e60",
            "on the clinical covariates alone, 60 epochs, the 4 small clinical cohorts",
            ("gse1992", "gse4335", "nki70", "GSE7390"),
            clinical,
            60,
            18,
        ),
        ("survival_cv_mdrop", "with modality dropout 0.3", (), ("--bp_modality_dropout", "0.3"), 15, 25),
        (
            "survival_cv_wide",
            "with the clinical covariates' linear term beside the head (wide & deep; expression-only cohorts read "
            "back)",
            (),
            ("--bp_head_linear",),
            15,
            25,
        ),
    ):
        data = f"{W}/survset/{run}/cohort" if cohorts else f"{W}/survset/cv_cohort"  # a cohort subset: own manifest
        parts.append(
            Part(
                run,
                f"the full-finetuning arms {what}; learning rate chosen on validation, --init_seed 0",
                _survival(
                    f"{W}/survset/{run}", data, *cohorts, arms=FINETUNED_ARMS[:2], extra=(*grid, *extra), epochs=epochs
                ),
                f"survset/{run}/survival_cv.json",
                needs=["survival_cv_lrgrid"],
                minutes=minutes,
                optional=True,
            )
        )
    # the wide & deep model again with finetuning seed 1 (its plain twin: survival_cv_lrgrid_init1); wide - plain
    # paired on the same test patients at each seed; the wide runs over both seeds
    parts.append(
        Part(
            "survival_cv_wide_init1",
            "survival_cv_wide with --init_seed 1 (expression-only cohorts read back from survival_cv_lrgrid_init1)",
            _survival(
                f"{W}/survset/survival_cv_wide_init1",
                f"{W}/survset/cv_cohort",
                arms=FINETUNED_ARMS[:2],
                extra=(
                    "--bp_lrs",
                    *LR_GRID,
                    "--init_seed",
                    "1",
                    "--reuse_cache",
                    f"{W}/survset/survival_cv_lrgrid_init1",
                    "--bp_head_linear",
                ),
            ),
            "survset/survival_cv_wide_init1/survival_cv.json",
            needs=["survival_cv_lrgrid_init1"],
            minutes=15,
            optional=True,
        )
    )
    for init, wide, plain in (
        (0, "survival_cv_wide", "survival_cv_lrgrid"),
        (1, "survival_cv_wide_init1", "survival_cv_lrgrid_init1"),
    ):
        parts.append(
            Part(
                f"survset_versus_wide_init{init}",
                f"wide & deep - plain full finetuning, finetuning seed {init}, paired on the same test patients",
                _seed_spread(
                    f"versus_wide_init{init}", {"wide": wide, "plain": plain}, "--versus", "bp_pretrained", "bp_random"
                ),
                f"survset/versus_wide_init{init}/seed_spread.json",
                needs=[wide, plain],
                minutes=0.5,
                optional=True,
            )
        )
    # the linear term on the expression values too: one shared penalty, then one penalty per modality (the
    # expression-only cohorts, one modality in the term, read back); each paired with the clinical-only term
    both = ("--bp_head_linear", "omics_expression", "tabular_clinical")
    for run, what, extra, needs, minutes in (
        ("survival_cv_wide_all", "one shared ridge penalty", both, ["survival_cv_wide"], 21),
        (
            "survival_cv_wide_pm",
            "one ridge penalty per modality (expression-only cohorts read back from survival_cv_wide_all)",
            (*both, "--bp_head_linear_per_modality", "--reuse_cache", f"{W}/survset/survival_cv_wide_all"),
            ["survival_cv_wide_all"],
            20,
        ),
    ):
        parts += [
            Part(
                run,
                f"wide & deep with a linear term on expression and clinical covariates, {what}; learning rate "
                "chosen on validation, --init_seed 0",
                _survival(
                    f"{W}/survset/{run}",
                    f"{W}/survset/cv_cohort",
                    arms=FINETUNED_ARMS[:2],
                    extra=("--bp_lrs", *LR_GRID, *extra),
                ),
                f"survset/{run}/survival_cv.json",
                needs=needs,
                minutes=minutes,
                optional=True,
            ),
            Part(
                f"survset_versus_{run.removeprefix('survival_cv_')}_init0",
                f"{run} - survival_cv_wide (the clinical-only term), paired on the same test patients",
                _seed_spread(
                    f"versus_{run.removeprefix('survival_cv_')}_init0",
                    {run.removeprefix("survival_cv_"): run, "wide": "survival_cv_wide"},
                    "--versus",
                    "bp_pretrained",
                    "bp_random",
                ),
                f"survset/versus_{run.removeprefix('survival_cv_')}_init0/seed_spread.json",
                needs=[run, "survival_cv_wide"],
                minutes=0.5,
                optional=True,
            ),
        ]
    # other expression tokens for both arms, each with a backbone pretrained on them and the random-init arm fitting
    # them per fold, each model paired with the same model on the default per-profile tokens:
    # - "panel": a fixed panel of each cohort's most variable genes (omics top_k_by: variance); plain, clinical term,
    #   expression + clinical term (per-modality penalties);
    # - "pcs": each cohort's first 20 principal components as the only expression tokens (omics pcs, top_k 0), what
    #   the cox_clinical_pcs baseline reads; plain, expression + clinical term (per-modality penalties)
    # - "pergene": the default tokens, each also carrying value x a learned vector of its gene (the embedder's
    #   value_embedding: per_gene); plain, expression + clinical term (per-modality penalties)
    runs = {
        "plain": ("no linear term", (), "survival_cv_lrgrid"),
        "wide": ("the clinical term", ("--bp_head_linear",), "survival_cv_wide"),
        "wide_pm": (
            "the expression + clinical term, one penalty per modality",
            (*both, "--bp_head_linear_per_modality"),
            "survival_cv_wide_pm",
        ),
    }
    # - "pcs_pergene": the "pcs" tokens with the per-gene value embedding; plain, paired with "pcs" plain (does the
    #   per-component vector let the network read a linear model of the components?)
    for tag, tokens, models, twin_tag in (
        ("panel", "the fixed expression panel", ("plain", "wide", "wide_pm"), None),
        ("pcs", "expression as 20 principal components per cohort", ("plain", "wide_pm"), None),
        ("pergene", "a per-gene value embedding (omics value_embedding: per_gene)", ("plain", "wide_pm"), None),
        ("pcs_pergene", "20 principal components per cohort with a per-component value embedding", ("plain",), "pcs"),
    ):
        settings = f"tokenizers/survset_processors_{tag}.yaml"
        parts.append(
            Part(
                f"survset_pretrain_{tag}",
                f"survset_pretrain with {tokens} ({settings})",
                _pretrain(
                    SURVSET_RECIPE,
                    f"{W}/survset/pretrain_{tag}",
                    f"data.manifest={W}/survset/dev_cohort/manifest.parquet",
                    f"data.processor_settings={{root}}/{settings}",
                ),
                f"survset/pretrain_{tag}/final/config.json",
                needs=["survset_cohort"],
                minutes=3,
                optional=True,
            )
        )
        for model in models:
            what, extra, twin = runs[model]
            twin = f"survival_cv_{twin_tag}_{model}" if twin_tag else twin
            twin_label = twin_tag or "top_values"
            run = f"survival_cv_{tag}_{model}"
            parts += [
                Part(
                    run,
                    f"{tokens}, {what}; learning rate chosen on validation, --init_seed 0",
                    _survival(
                        f"{W}/survset/{run}",
                        f"{W}/survset/cv_cohort",
                        pretrained=f"{W}/survset/pretrain_{tag}/final",
                        arms=FINETUNED_ARMS[:2],
                        extra=(
                            "--bp_lrs",
                            *LR_GRID,
                            "--random_processor_settings",
                            settings,
                            *extra,
                            "--reuse_cache",
                            f"{W}/survset/survival_cv_lrgrid",  # the baselines
                        ),
                    ),
                    f"survset/{run}/survival_cv.json",
                    needs=[f"survset_pretrain_{tag}", "survival_cv_lrgrid"],
                    minutes=20,
                    optional=True,
                ),
                Part(
                    f"survset_versus_{tag}_{model}_init0",
                    f"{run} - {twin}, paired on the same test patients",
                    _seed_spread(
                        f"versus_{tag}_{model}_init0",
                        {tag: run, twin_label: twin},
                        "--versus",
                        "bp_pretrained",
                        "bp_random",
                    ),
                    f"survset/versus_{tag}_{model}_init0/seed_spread.json",
                    needs=[run, twin],
                    minutes=0.5,
                    optional=True,
                ),
            ]
    # the per-gene value embedding without a term again, finetuning seed 1 (twin: survival_cv_lrgrid_init1)
    settings = "tokenizers/survset_processors_pergene.yaml"
    parts += [
        Part(
            "survival_cv_pergene_plain_init1",
            "a per-gene value embedding, no linear term; learning rate chosen on validation, --init_seed 1",
            _survival(
                f"{W}/survset/survival_cv_pergene_plain_init1",
                f"{W}/survset/cv_cohort",
                pretrained=f"{W}/survset/pretrain_pergene/final",
                arms=FINETUNED_ARMS[:2],
                extra=(
                    "--bp_lrs",
                    *LR_GRID,
                    "--random_processor_settings",
                    settings,
                    "--init_seed",
                    "1",
                    "--reuse_cache",
                    f"{W}/survset/survival_cv_lrgrid_init1",  # the baselines
                ),
            ),
            "survset/survival_cv_pergene_plain_init1/survival_cv.json",
            needs=["survset_pretrain_pergene", "survival_cv_lrgrid_init1"],
            minutes=20,
            optional=True,
        ),
        Part(
            "survset_versus_pergene_plain_init1",
            "survival_cv_pergene_plain_init1 - survival_cv_lrgrid_init1 (the shared value encoding), paired",
            _seed_spread(
                "versus_pergene_plain_init1",
                {"pergene": "survival_cv_pergene_plain_init1", "top_values": "survival_cv_lrgrid_init1"},
                "--versus",
                "bp_pretrained",
                "bp_random",
            ),
            "survset/versus_pergene_plain_init1/seed_spread.json",
            needs=["survival_cv_pergene_plain_init1", "survival_cv_lrgrid_init1"],
            minutes=0.5,
            optional=True,
        ),
    ]
    # a second whole-union pretraining seed under the wide & deep model (the random-init arm read back)
    parts += [
        Part(
            "survset_pretrain_seed1",
            "survset_pretrain with seed=1",
            _pretrain(
                SURVSET_RECIPE,
                f"{W}/survset/pretrain_seed1",
                f"data.manifest={W}/survset/dev_cohort/manifest.parquet",
                "seed=1",
            ),
            "survset/pretrain_seed1/final/config.json",
            needs=["survset_cohort"],
            minutes=3,
            optional=True,
        ),
        Part(
            "survival_cv_wide_pretrain_seed1",
            "survival_cv_wide's pretrained arm on the seed-1 backbone",
            _survival(
                f"{W}/survset/survival_cv_wide_pre1",
                f"{W}/survset/cv_cohort",
                pretrained=f"{W}/survset/pretrain_seed1/final",
                arms=FINETUNED_ARMS[:2],
                extra=("--bp_lrs", *LR_GRID, "--bp_head_linear", "--reuse_cache", f"{W}/survset/survival_cv_wide"),
            ),
            "survset/survival_cv_wide_pre1/survival_cv.json",
            needs=["survset_pretrain_seed1", "survival_cv_wide"],
            minutes=9,
            optional=True,
        ),
    ]
    # the external cohorts (evaluation only, nothing selected on them): wide & deep and plain, the lr grid, seed 0
    external = EXTERNAL_COHORTS
    for run, extra in (
        ("survival_external_wide", ("--bp_head_linear",)),
        ("survival_external_plain", ("--reuse_cache", f"{W}/survset/survival_external_wide")),
    ):
        parts.append(
            Part(
                run,
                f"the external cohorts' full-finetuning arms, learning rate chosen on validation, {run.split('_')[-1]}",
                _survival(
                    f"{W}/survset/{run}",
                    f"{W}/survset/external_cohort",
                    *external,
                    arms=FINETUNED_ARMS[:2],
                    extra=("--bp_lrs", *LR_GRID, *extra),
                ),
                f"survset/{run}/survival_cv.json",
                needs=["survset_pretrain"] if run.endswith("wide") else ["survival_external_wide"],
                minutes=12 if run.endswith("wide") else 4,
                optional=True,
            )
        )
    parts.append(
        Part(
            "survset_versus_external_wide",
            "wide & deep - plain on the external cohorts, paired (only gse3143 has clinical covariates)",
            _seed_spread(
                "versus_external_wide_init0",
                {"wide": "survival_external_wide", "plain": "survival_external_plain"},
                "--roles",
                "external",
                "--versus",
                "bp_pretrained",
                "bp_random",
            ),
            "survset/versus_external_wide_init0/seed_spread.json",
            needs=["survival_external_wide", "survival_external_plain"],
            minutes=0.5,
            optional=True,
        )
    )
    parts.append(
        Part(
            "survset_seed_spread_wide",
            "the wide & deep arms over finetuning seeds 0-1",
            _seed_spread(
                "seed_spread_wide",
                {"init0": "survival_cv_wide", "init1": "survival_cv_wide_init1"},
                "--ensemble",
                "bp_pretrained",
                "bp_random",
            ),
            "survset/seed_spread_wide/seed_spread.json",
            needs=["survival_cv_wide", "survival_cv_wide_init1"],
            minutes=0.5,
            optional=True,
        )
    )
    # label efficiency: every model on 25% / 50% / all of each fold's training patients (validation and test
    # unchanged), the pretrained arm finetuning the fold-wise backbones (no test patient in pretraining), lr grid;
    # four runs per fraction: (pretraining seed, finetuning seed) = SEED_PAIRS
    runs = []
    for f in LABEL_FRACTIONS:
        for pre, init in SEED_PAIRS:
            run = f"survival_cv_labeff_tf{f}{_pair_suffix(pre, init)}"
            # the baselines (and, for (1, 1), the random-init arm) are read back from the run before
            reuse = {
                (0, 0): "survival_cv_lrgrid",
                (0, 1): f"survival_cv_labeff_tf{f}",
                (1, 1): f"survival_cv_labeff_tf{f}_init1",
                (2, 2): f"survival_cv_labeff_tf{f}",
            }[(pre, init)]
            extra = ["--train_fraction", f, "--reuse_cache", f"{W}/survset/{reuse}"]
            needs = [*_backbone_parts(pre), reuse]
            if (pre, init) == (0, 1):  # the full-data random-init arm at finetuning seed 1
                extra.append(f"{W}/survset/survival_cv_lrgrid_init1")
                needs.append("survival_cv_lrgrid_init1")
            if init:
                extra += ["--init_seed", str(init)]
            what = f"plain full finetuning on a {f} share of each fold's training patients"
            parts.append(_finetuned(run, _seed_text(what, pre, init), *extra, pre=pre, needs=needs, minutes=10))
            runs.append(run)
    # wide & deep (expression + clinical term, one penalty per modality) at 25%, seed pairs (0, 0) and (0, 1)
    for init in (0, 1):
        plain = "survival_cv_labeff_tf0.25" + ("_init1" if init else "")
        run = f"{plain.replace('_init1', '')}_wide_pm" + ("_init1" if init else "")
        extra = ("--train_fraction", "0.25", *WIDE_PM, *(("--init_seed", "1") if init else ()))
        parts.append(
            _finetuned(run, f"{plain} {WIDE_TEXT}", *extra, "--reuse_cache", f"{W}/survset/{plain}", needs=[plain])
        )
    parts.append(
        _versus(
            "versus_labeff_tf0.25_wide_pm_init0",
            "survival_cv_labeff_tf0.25_wide_pm",
            "survival_cv_labeff_tf0.25",
            "wide & deep - plain at 25% of the training patients, seed pair (0, 0), paired on the same test patients",
            labels=("wide_pm", "plain"),
            name="survset_versus_labeff_tf0.25_wide_pm",
        )
    )
    parts.append(
        _curve(
            "survset_label_efficiency",
            "label_efficiency",
            runs,
            "the label-efficiency runs side by side: mean C-index, pooled differences and their trend per fraction",
        )
    )
    # the same at 25% and 50% with the validation part drawn at the training share too (--subsample_validation: a
    # user with a share of the labels selects on a share of them); the full-data runs above pair with them
    val_runs = []
    for f in LABEL_FRACTIONS[:-1]:
        first = f"survival_cv_labeff_tf{f}_val"
        for pre, init in SEED_PAIRS:
            run = first + _pair_suffix(pre, init)
            extra = ["--train_fraction", f, "--subsample_validation"]
            needs = _backbone_parts(pre)
            if run != first:  # the baselines are fitted once per fraction and read back
                extra += ["--reuse_cache", f"{W}/survset/{first}"]
                needs.append(first)
            if (pre, init) == (1, 1):  # and the random-init arm at finetuning seed 1 from the (0, 1) run
                extra.append(f"{W}/survset/{first}_init1")
                needs.append(f"{first}_init1")
            if init:
                extra += ["--init_seed", str(init)]
            what = f"plain full finetuning on a {f} share of each fold's training and validation patients"
            parts.append(_finetuned(run, _seed_text(what, pre, init), *extra, pre=pre, needs=needs))
            val_runs.append(run)
    # wide & deep at 25% with the validation part shrunk too, seed pairs (0, 0) and (0, 1), and its pairing with
    # the plain run: does the one arm that passed the baseline at 25% still pass when it selects on 25%?
    plain = "survival_cv_labeff_tf0.25_val"
    for init in (0, 1):
        run = f"{plain}_wide_pm" + ("_init1" if init else "")
        extra = (
            "--train_fraction",
            "0.25",
            "--subsample_validation",
            *WIDE_PM,
            *(("--init_seed", "1") if init else ()),
        )
        parts.append(
            _finetuned(
                run, f"{plain} {WIDE_TEXT}", *extra, "--reuse_cache", f"{W}/survset/{plain}", needs=[plain], minutes=15
            )
        )
    parts.append(
        _spread(
            "seed_spread_labeff_tf0.25_val_wide_pm",
            {"init0": f"{plain}_wide_pm", "init1": f"{plain}_wide_pm_init1"},
            "the two wide & deep 25% shrunk-validation runs combined (runs and patients)",
        )
    )
    parts.append(
        _versus(
            "versus_labeff_tf0.25_val_wide_pm_init0",
            f"{plain}_wide_pm",
            plain,
            "wide & deep - plain at 25% of the training and validation patients, seed pair (0, 0)",
            labels=("wide_pm", "plain"),
            name="survset_versus_labeff_tf0.25_val_wide_pm",
        )
    )
    # the 25% shrunk-validation runs again keeping each run's last epoch (--bp_keep_last): on 5-8 validation patients
    # the C-index ties across epochs and the earliest tied checkpoint is kept; same seeds, baselines read back
    last_runs, versus = {}, {}
    for pre, init in SEED_PAIRS:
        run = f"{plain}_last{_pair_suffix(pre, init)}"
        extra = ("--train_fraction", "0.25", "--subsample_validation", "--bp_keep_last", "--init_seed", str(init))
        what = f"{plain}{_pair_suffix(pre, init)} {LAST_TEXT}"
        parts.append(
            _finetuned(
                run,
                what,
                *extra,
                "--reuse_cache",
                f"{W}/survset/{plain}",
                pre=pre,
                needs=[plain, *_backbone_parts(pre)],
            )
        )
        last_runs[f"pre{pre}_init{init}"] = run
        versus[plain + _pair_suffix(pre, init)] = run
    parts.append(
        _spread(
            "seed_spread_labeff_tf0.25_val_last",
            last_runs,
            "the four last-epoch runs combined (pretrained - random init, - best baseline; runs and patients)",
        )
    )
    # the last epoch at 100% for seed pair (0, 0), and every last-epoch run against its kept-checkpoint run
    parts.append(
        _finetuned(
            "survival_cv_labeff_tf1_last",
            f"survival_cv_labeff_tf1 {LAST_TEXT}",
            "--bp_keep_last",
            "--reuse_cache",
            f"{W}/survset/survival_cv_labeff_tf1",
            needs=["survival_cv_labeff_tf1", *_backbone_parts(0)],
            minutes=12,
        )
    )
    versus["survival_cv_labeff_tf1"] = "survival_cv_labeff_tf1_last"
    for best, last in versus.items():
        out = last.replace("survival_cv_", "versus_")
        parts.append(_versus(out, last, best, f"{last} - {best}, each arm paired on the same test patients"))
    # the same 25% shrunk-validation runs choosing among tied best epochs otherwise (--bp_best_model_ties): the
    # latest of them, or the one with the lowest validation Cox loss; seed pairs (0, 0), (0, 1) and (1, 1), each
    # against the first-of-ties run (transformers' rule) on the same test patients
    ties_runs = {}  # tie-rule run -> its first-of-ties run
    counts = {2: "two", 3: "three", 4: "four"}
    for rule, n_pairs in (("loss", 4), ("last", 3)):  # the loss rule also for seed pair (2, 2)
        for pre, init in SEED_PAIRS[:n_pairs]:
            run = f"{plain}_ties{rule}{_pair_suffix(pre, init)}"
            base = plain + _pair_suffix(pre, init)
            extra = ("--train_fraction", "0.25", "--subsample_validation", "--bp_best_model_ties", rule)
            parts.append(
                _finetuned(
                    run,
                    f"{base} keeping the {TIES_TEXT[rule]} of the epochs tied on the best validation C-index",
                    *extra,
                    "--init_seed",
                    str(init),
                    "--reuse_cache",
                    f"{W}/survset/{plain}",
                    pre=pre,
                    needs=[plain, *_backbone_parts(pre)],
                )
            )
            out = run.replace("survival_cv_", "versus_")
            what = f"{run} - {base}, each arm paired on the same test patients"
            parts.append(_versus(out, run, base, what, labels=(f"ties{rule}", "first")))
            if (pre, init) in SEED_PAIRS[:2]:
                ties_runs[run] = base
        for n in range(2, n_pairs + 1):
            pairs = {f"pre{p}_init{i}": f"{plain}_ties{rule}{_pair_suffix(p, i)}" for p, i in SEED_PAIRS[:n]}
            out = f"seed_spread_labeff_tf0.25_val_ties{rule}" + ("" if n == 2 else str(n))
            parts.append(_spread(out, pairs, f"the {counts[n]} ties-{rule} runs combined"))
    for n in (2, 3, 4):
        first = {f"pre{pre}_init{init}": plain + _pair_suffix(pre, init) for pre, init in SEED_PAIRS[:n]}
        out = f"seed_spread_labeff_tf0.25_val_first{n}"
        parts.append(_spread(out, first, f"their {counts[n]} first-of-ties runs combined"))
    # wide & deep (expression + clinical term, one penalty per modality) with the loss tie rule, the four seed
    # pairs (spreads over the first three, as recorded first, and all four); against the plain loss-rule runs and
    # the wide & deep first-of-ties run on the same test patients
    wide_loss = {}
    for pre, init in SEED_PAIRS:
        run = f"{plain}_wide_pm_tiesloss{_pair_suffix(pre, init)}"
        reuse = [f"{W}/survset/{plain}"] + ([f"{W}/survset/{plain}_wide_pm_tiesloss_init1"] if pre else [])
        parts.append(
            _finetuned(
                run,
                f"{plain}_tiesloss{_pair_suffix(pre, init)} {WIDE_TEXT}",
                "--train_fraction",
                "0.25",
                "--subsample_validation",
                *WIDE_PM,
                "--bp_best_model_ties",
                "loss",
                "--init_seed",
                str(init),
                "--reuse_cache",
                *reuse,
                pre=pre,
                needs=[plain, *_backbone_parts(pre), *([f"{plain}_wide_pm_tiesloss_init1"] if pre else [])],
                minutes=20,
            )
        )
        wide_loss[f"pre{pre}_init{init}"] = run
    three = dict(list(wide_loss.items())[:3])
    parts.append(_spread("seed_spread_labeff_tf0.25_val_wide_pm_tiesloss", three, "the first three runs combined"))
    parts.append(_spread("seed_spread_labeff_tf0.25_val_wide_pm_tiesloss4", wide_loss, "the four runs combined"))
    for b, label in ((f"{plain}_tiesloss", "plain"), (f"{plain}_wide_pm", "first")):
        what = f"{plain}_wide_pm_tiesloss - {b}, each arm paired on the same test patients, seed pair (0, 0)"
        out = f"versus_labeff_tf0.25_val_wide_pm_tiesloss_{label}"
        parts.append(_versus(out, f"{plain}_wide_pm_tiesloss", b, what, labels=("wide_pm_tiesloss", label)))
    # the Cox baselines with the same tie rule (--baseline_ties loss: among grid points tied on the validation
    # C-index, the highest validation partial log-likelihood), beside the loss-rule runs of the three seed pairs
    # (their finetuned arms read back: the baselines are the only fits), then the wide & deep loss-rule runs beside
    # the same baselines (nothing refitted: both read back)
    for tag, extra, n_pairs in (("", (), 4), ("_wide_pm", WIDE_PM, 4)):
        fair = {}
        for n, (pre, init) in enumerate(SEED_PAIRS[:n_pairs]):
            run, twin = (f"{plain}{tag}_tiesloss{kind}{_pair_suffix(pre, init)}" for kind in ("_bl", ""))
            reuse = [twin, f"{plain}_tiesloss_bl" if n or tag else plain]
            parts.append(
                _finetuned(
                    run,
                    f"{twin} beside the Cox baselines breaking validation ties by partial log-likelihood",
                    "--train_fraction",
                    "0.25",
                    "--subsample_validation",
                    *extra,
                    "--bp_best_model_ties",
                    "loss",
                    "--baseline_ties",
                    "loss",
                    "--init_seed",
                    str(init),
                    "--reuse_cache",
                    *(f"{W}/survset/{r}" for r in reuse),
                    pre=pre,
                    needs=[*reuse, *_backbone_parts(pre)],
                    minutes=1 if tag else 3,
                )
            )
            fair[f"pre{pre}_init{init}"] = run
        for n in range(3, n_pairs + 1):
            pairs = dict(list(fair.items())[:n])
            what = f"the {counts[n]} runs combined"
            parts.append(_spread(f"seed_spread_labeff_tf0.25_val{tag}_tiesloss_bl{n}", pairs, what))
    parts.append(
        _spread(
            "versus_labeff_tf0.25_val_tiesloss_bl",
            {"baselines_tiesloss": f"{plain}_tiesloss_bl", "baselines_first": f"{plain}_tiesloss"},
            "the Cox baselines breaking ties by validation likelihood - first of ties, same test patients",
            "--versus",
            "cox_clinical_pcs",
            "cox_clinical",
        )
    )
    # the frozen backbones' expression embeddings as Cox features (cox_*_emb_* arms, tie-aware like the baselines)
    # beside the tie-aware runs of the four seed pairs (finetuned arms and baselines read back), then the same with
    # every label-free step (expression and embedding PCA) fitted on all non-test patients (--pca_rows non_test:
    # the unlabelled profiles the fold-wise backbones were pretrained on, given to the baselines too)
    quarter_val = ("--train_fraction", "0.25", "--subsample_validation")
    emb_extra = (*quarter_val, "--bp_best_model_ties", "loss", "--baseline_ties", "loss")
    for tag, extra, source, text in (
        ("_emb", (), "_bl", "with the frozen expression embeddings as Cox features"),
        ("_emb_nt", ("--pca_rows", "non_test"), "_emb", "with every PCA fitted on all non-test patients"),
    ):
        family = {}
        for n, (pre, init) in enumerate(SEED_PAIRS):
            run, twin = (f"{plain}_tiesloss{kind}{_pair_suffix(pre, init)}" for kind in (tag, source))
            reuse = [twin, *([f"{plain}_tiesloss{tag}"] if n else [])]
            parts.append(
                _finetuned(
                    run,
                    f"{twin} {text}",
                    *emb_extra,
                    *extra,
                    "--init_seed",
                    str(init),
                    "--reuse_cache",
                    *(f"{W}/survset/{r}" for r in reuse),
                    pre=pre,
                    needs=[*reuse, *_backbone_parts(pre)],
                    minutes=3,
                    arms=(*FINETUNED_ARMS[:2], *EMB_ARMS),
                )
            )
            family[f"pre{pre}_init{init}"] = run
        ensemble = EMB_ENSEMBLE
        parts.append(_spread(f"seed_spread_labeff_tf0.25_val_tiesloss{tag}4", family, "the 4 runs combined", *ensemble))
    # the same embedding arms (and the baselines) on the external cohorts, evaluation only, seed pair (0, 0): the
    # fold-wise backbones never saw these cohorts (their genes are added to the vocabulary per fold, on its training
    # rows, with random embeddings)
    run = "survival_cv_ext_labeff_tf0.25_val_tiesloss_emb"
    argv = _emb_cox(run, "pretrain_cvfolds", "0.25", 0, cohorts=EXTERNAL_COHORTS, data="external_cohort")
    what = "the embedding-Cox arms and the tie-aware baselines on the external cohorts at 25%, evaluation only"
    parts.append(
        Part(run, what, argv, f"survset/{run}/survival_cv.json", needs=_backbone_parts(0), minutes=3, optional=True)
    )
    # and the finetuned arms there (loss tie rule, the lr grid), the baselines read back from the run above
    bp_run = "survival_cv_ext_labeff_tf0.25_val_tiesloss"
    argv = _ext_finetuned_quarter(bp_run, "external_cohort", run)
    what = "the finetuned arms on the external cohorts at 25%, loss tie rule, evaluation only"
    out = f"survset/{bp_run}/survival_cv.json"
    parts.append(Part(bp_run, what, argv, out, needs=[run, *_backbone_parts(0)], minutes=20, optional=True))
    # held-out cross-modal retrieval of the 15 fold-wise backbones (pretraining seeds 0-2) in the latent space
    # `embed` wrote by default and in the projected space the loss aligned (their heads from the last checkpoints)
    folders = [f"{W}/survset/{_backbones(p)}/fold{k}" for p in range(3) for k in range(5)]
    argv = [PY, "benchmarks/retrieval_space.py", "--runs", *folders, "--head_from_checkpoint"]
    argv += ["--output_dir", f"{W}/survset/retrieval_space"]
    what = "held-out retrieval of the fold-wise backbones: latent vs projected space"
    needs = [part for p in range(3) for part in _backbone_parts(p)]
    parts.append(
        Part(
            "survset_retrieval_space",
            what,
            argv,
            "survset/retrieval_space/retrieval_space.json",
            needs=needs,
            minutes=8,
            optional=True,
        )
    )
    parts.append(
        _spread(
            "versus_labeff_tf0.25_val_tiesloss_emb_nt",
            {"pca_non_test": f"{plain}_tiesloss_emb_nt", "pca_train": f"{plain}_tiesloss_emb"},
            "every PCA on all non-test patients - on the labelled training patients, same test patients",
            "--versus",
            "cox_clinical_pcs",
            "rsf",
            "cox_clinical_emb_pretrained",
            "cox_clinical_emb_random",
            "cox_clinical_pcs_emb_pretrained",
        )
    )
    # the loss rule at 50% of the training and validation patients, seed pair (0, 0): against first of ties, and
    # beside the tie-aware Cox baselines
    half = "survival_cv_labeff_tf0.5_val"
    half_extra = ("--train_fraction", "0.5", "--subsample_validation", "--bp_best_model_ties", "loss")
    for run, extra, reuse in (
        (f"{half}_tiesloss", half_extra, [half]),
        (f"{half}_tiesloss_bl", (*half_extra, "--baseline_ties", "loss"), [f"{half}_tiesloss", half]),
    ):
        parts.append(
            _finetuned(
                run,
                f"{half} keeping the lowest-validation-loss one of the epochs tied on the best validation C-index"
                + (", the Cox baselines breaking their ties the same way" if run.endswith("_bl") else ""),
                *extra,
                "--reuse_cache",
                *(f"{W}/survset/{r}" for r in reuse),
                needs=[*reuse, *_backbone_parts(0)],
                minutes=12 if run.endswith("tiesloss") else 2,
            )
        )
    what = f"{half}_tiesloss - {half}, each arm paired on the same test patients"
    parts.append(
        _versus("versus_labeff_tf0.5_val_tiesloss", f"{half}_tiesloss", half, what, labels=("tiesloss", "first"))
    )
    # the loss rule at 50% for the other three seed pairs (seventeenth session), the baselines read back from the
    # plain 50% run, and the four runs' spread as at 25%
    loss_half = {"pre0_init0": f"{half}_tiesloss"}
    for pre, init in SEED_PAIRS[1:]:
        run = f"{half}_tiesloss{_pair_suffix(pre, init)}"
        loss_half[f"pre{pre}_init{init}"] = run
        parts.append(_seeded(run, f"{half}_tiesloss for seed pair ({pre}, {init})", half_extra, pre, init, half, 12))
    parts.append(_spread("seed_spread_labeff_tf0.5_val_tiesloss4", loss_half, "the four ties-loss runs combined"))
    # the embedding-Cox arms beside the tie-aware 50% run, seed pair (0, 0) (everything else read back), then alone
    # for the other three seed pairs (their finetuned arms are the runs above, recorded later), and their spread
    first = f"{half}_tiesloss_emb"
    family = {}
    for pre, init in SEED_PAIRS:
        run = first + _pair_suffix(pre, init)
        reuse = f"{half}_tiesloss_bl" if run == first else first
        arms = (*FINETUNED_ARMS[:2], *EMB_ARMS) if run == first else EMB_ARMS
        extra = half_extra if run == first else half_extra[:3]  # the tie rule only where networks are finetuned
        what = f"{half}_tiesloss_bl with the frozen expression embeddings as Cox features, seed pair ({pre}, {init})"
        extra = (*extra, "--baseline_ties", "loss")
        parts.append(_seeded(run, what, extra, pre, init, reuse, 4, arms))
        family[f"pre{pre}_init{init}"] = run
    ensemble = EMB_ENSEMBLE
    parts.append(_spread("seed_spread_labeff_tf0.5_val_tiesloss_emb4", family, "the 4 runs combined", *ensemble))
    # each pretraining seed once ((0, 1) shares (0, 0)'s backbones): the ensembles over 3 distinct seeds, 50% and 25%
    quarter = {f"pre{p}_init{i}": f"{plain}_tiesloss_emb{_pair_suffix(p, i)}" for p, i in SEED_PAIRS}
    for frac, pairs_runs in (("0.5", family), ("0.25", quarter)):
        distinct = {label: run for label, run in pairs_runs.items() if label != "pre0_init1"}
        out = f"seed_spread_labeff_tf{frac}_val_tiesloss_emb3"
        parts.append(_spread(out, distinct, "the 3 distinct pretraining seeds combined", *ensemble))
    # which epoch every selected run kept under each rule (seed pairs (0, 0) and (0, 1)), and how often a rule kept
    # another epoch than the first-of-ties run
    argv = [PY, "benchmarks/kept_checkpoints.py", "--runs", *(f"{W}/survset/{r}" for r in ties_runs)]
    argv += ["--against", *(f"{W}/survset/{b}" for b in ties_runs.values())]
    argv += ["--output_dir", f"{W}/survset/kept_labeff_tf0.25_val_ties"]
    parts.append(
        Part(
            "survset_kept_labeff_tf0.25_val_ties",
            "the epoch each selected run kept under the tie rules, against the first-of-ties runs",
            argv,
            "survset/kept_labeff_tf0.25_val_ties/kept_checkpoints.json",
            needs=sorted({*ties_runs, *ties_runs.values()}),
            minutes=0.5,
            optional=True,
        )
    )
    full = [r for r in runs if r.startswith(f"survival_cv_labeff_tf{LABEL_FRACTIONS[-1]}")]
    parts.append(
        _curve(
            "survset_label_efficiency_val",
            "label_efficiency_val",
            val_runs + full,
            "the label-efficiency curve with validation shrunk with training (full-data runs as above)",
        )
    )
    return parts


def _ext_finetuned_quarter(run: str, data: str, reuse: str, extra=()) -> list[str]:
    """``survival_cv.py`` argv: the finetuned arms on the external cohorts (the ``survset/{data}`` folder) at 25% of
    the labels with validation shrunk alike, the learning-rate grid, the loss tie rule for networks and baselines,
    ``--init_seed 0``, ``extra`` options (``--gene_map``), the baselines read back from ``reuse``."""
    ties = ("--bp_best_model_ties", "loss", "--baseline_ties", "loss")
    opts = ("--bp_lrs", *LR_GRID, "--train_fraction", "0.25", "--subsample_validation", *ties, "--init_seed", "0")
    return _survival(
        f"{W}/survset/{run}",
        f"{W}/survset/{data}",
        *EXTERNAL_COHORTS,
        pretrained=f"{W}/survset/pretrain_cvfolds/fold{{fold}}/final",
        arms=FINETUNED_ARMS[:2],
        extra=(*opts, *extra, "--reuse_cache", f"{W}/survset/{reuse}"),
    )


def _emb_cox(
    run: str,
    backbones: str,
    frac: str,
    init: int,
    reuse=(),
    cohorts=(),
    data: str = "cv_cohort",
    extra=(),
    arms: tuple[str, ...] = EMB_ARMS,
):
    """``survival_cv.py`` argv: the three embedding-Cox arms only (or ``arms``), on the fold-wise ``backbones`` (a
    ``survset/`` folder), at ``frac`` of the labels with validation shrunk alike, tie-aware baselines,
    ``--init_seed init``, reading back the ``reuse`` runs; ``cohorts``: only those (the external ones, in ``data``);
    ``extra``: more options (``--pca_rows non_test``)."""
    opts = ("--train_fraction", frac, "--subsample_validation", "--baseline_ties", "loss", "--init_seed", str(init))
    opts = (*opts, *extra)
    back = ("--reuse_cache", *(f"{W}/survset/{r}" for r in reuse)) if reuse else ()
    return _survival(
        f"{W}/survset/{run}",
        f"{W}/survset/{data}",
        *cohorts,
        pretrained=f"{W}/survset/{backbones}/fold{{fold}}/final",
        arms=arms,
        extra=(*opts, *back),
    )


FIVE_SEEDS = ((0, 0), (1, 1), (2, 2), (3, 3), (4, 4))  # each pretraining seed once, its own finetuning seed


def _five_seed_parts() -> list[Part]:
    """Optional: the embedding-Cox arms at 25% and 50% for pretraining seeds 3 and 4 (their fold-wise backbones:
    ``survset_pretrain_seed{3,4}_fold*``), the baselines read back from the same fraction's (0, 0) run, and the
    5-seed ensembles with each pretraining seed once (fifteenth session; ~40 min with the backbones)."""
    parts = []
    ensemble = EMB_ENSEMBLE
    for frac in ("0.25", "0.5"):
        first = f"survival_cv_labeff_tf{frac}_val_tiesloss_emb"
        for pre, init in FIVE_SEEDS[3:]:
            run = first + _pair_suffix(pre, init)
            argv = _emb_cox(run, _backbones(pre), frac, init, reuse=(first,))
            what = f"{first} for seed pair ({pre}, {init}): the embedding-Cox arms"
            needs = [first, *_backbone_parts(pre)]
            parts.append(
                Part(run, what, argv, f"survset/{run}/survival_cv.json", needs=needs, minutes=3, optional=True)
            )
        family = {f"pre{p}_init{i}": first + _pair_suffix(p, i) for p, i in FIVE_SEEDS}
        out = f"seed_spread_labeff_tf{frac}_val_tiesloss_emb5"
        parts.append(_spread(out, family, "the 5 distinct pretraining seeds combined", *ensemble))
    return parts


def _non_test_half_parts() -> list[Part]:
    """Optional: the 5-seed embedding-Cox ensemble at 50% with every label-free step fitted on all non-test patients
    (``--pca_rows non_test``), so the baselines' PCA sees the unlabelled profiles the fold-wise backbones were
    pretrained on (sixteenth session). The (0, 0) run refits the PCA baselines and reads the rest back from the plain
    50% run; the other seeds read the baselines back from it. Then the 5-seed ensemble, and (0, 0)'s every-PCA
    settings against the plain run's, on the same test patients (~11 min). The same 5 runs on the external cohorts,
    evaluation only (their (0, 0) run reads back from the plain external 50% run; ~15 min)."""
    parts = []
    ensemble = EMB_ENSEMBLE
    for ext in ("", "_ext"):
        plain = f"survival_cv{ext}_labeff_tf0.5_val_tiesloss_emb"
        first = f"{plain}_nt"
        cohorts, data = (EXTERNAL_COHORTS, "external_cohort") if ext else ((), "cv_cohort")
        family = {}
        for pre, init in FIVE_SEEDS:
            run = first + _pair_suffix(pre, init)
            family[f"pre{pre}_init{init}"] = run
            reuse = (plain,) if run == first else (first,)
            argv = _emb_cox(run, _backbones(pre), "0.5", init, reuse, cohorts, data, ("--pca_rows", "non_test"))
            what = f"{plain + _pair_suffix(pre, init)} with every PCA fitted on all non-test patients"
            if ext:
                what += ", evaluation only"
            needs = [*reuse, *_backbone_parts(pre)]
            out = f"survset/{run}/survival_cv.json"
            parts.append(Part(run, what, argv, out, needs=needs, minutes=3, optional=True))
        if ext:
            continue  # the external family is combined by its fusion part
        out = "seed_spread_labeff_tf0.5_val_tiesloss_emb_nt5"
        what = "the 5 distinct pretraining seeds combined, every PCA on non-test patients"
        parts.append(_spread(out, family, what, *ensemble))
        parts.append(
            _spread(
                "versus_labeff_tf0.5_val_tiesloss_emb_nt",
                {"pca_non_test": first, "pca_train": plain},
                "every PCA on all non-test patients - on the labelled training patients, 50%, same test patients",
                "--versus",
                "cox_clinical_pcs",
                "rsf",
                "cox_clinical_emb_pretrained",
                "cox_clinical_emb_random",
            )
        )
    return parts


def _fusion_parts() -> list[Part]:
    """Optional: late fusion of the embedding-Cox seed ensembles with each cohort's best baseline (``seed_spread.py
    --fuse_with best_baseline``: ranks within each test fold averaged, no weight chosen), for the pretrained and the
    random embeddings alike -- does the pretrained embedding add to the classical model, and more than a random one?
    On the 5-seed development families at 25% and 50% (and 50% with every PCA on non-test patients), the 3-seed
    external families at 25% and 50% and the 5-seed external one at 50% with every PCA on non-test patients
    (evaluation only), fixed before they were run (sixteenth session). Each reads the families' caches only (~10 s
    each)."""
    fuse = (*EMB_ENSEMBLE, "--fuse_with", "best_baseline")
    families = {}
    for frac in ("0.25", "0.5"):
        first = f"survival_cv_labeff_tf{frac}_val_tiesloss_emb"
        families[f"seed_spread_labeff_tf{frac}_val_tiesloss_emb5_fused"] = (first, FIVE_SEEDS, "5 seeds")
    for ext, what in (("", "5 seeds, every PCA non-test"), ("_ext", "external, 5 seeds, every PCA non-test")):
        first = f"survival_cv{ext}_labeff_tf0.5_val_tiesloss_emb_nt"
        families[f"seed_spread{ext}_labeff_tf0.5_val_tiesloss_emb_nt5_fused"] = (first, FIVE_SEEDS, what)
    for frac in ("0.25", "0.5"):
        first = f"survival_cv_ext_labeff_tf{frac}_val_tiesloss_emb"
        families[f"seed_spread_ext_labeff_tf{frac}_val_tiesloss_emb3_fused"] = (first, FIVE_SEEDS[:3], "external")
        families[f"seed_spread_ext_labeff_tf{frac}_val_tiesloss_emb5_fused"] = (first, FIVE_SEEDS, "external, 5 seeds")
    parts = []
    for out, (first, pairs, what) in families.items():
        runs = {f"pre{p}_init{i}": first + _pair_suffix(p, i) for p, i in pairs}
        parts.append(_spread(out, runs, f"the embedding ensembles fused with the best baseline ({what})", *fuse))
    return parts


def _external_ensemble_parts() -> list[Part]:
    """Optional: the configuration nearest both SurvSet targets on the development cohorts -- the frozen embedding
    in a Cox model, each pretraining seed once ((0, 0), (1, 1), (2, 2)), the runs' risks averaged -- on the external
    cohorts at 25% and 50%, evaluation only (fixed before these runs; nothing is chosen on them). The (0, 0) run at
    25% is ``survival_cv_ext_labeff_tf0.25_val_tiesloss_emb``; later runs read the baselines back from the same
    fraction's (0, 0) run. Seeds 3 and 4 too (sixteenth session, evaluation only), so the external ensembles have
    the development cohorts' 5 seeds."""
    parts = []
    ensemble = EMB_ENSEMBLE
    for frac in ("0.25", "0.5"):
        first = f"survival_cv_ext_labeff_tf{frac}_val_tiesloss_emb"
        family = {}
        for pre, init in FIVE_SEEDS:
            run = first + _pair_suffix(pre, init)
            family[f"pre{pre}_init{init}"] = run
            if (frac, pre) == ("0.25", 0):
                continue  # an earlier part
            reuse = () if run == first else (first,)
            argv = _emb_cox(run, _backbones(pre), frac, init, reuse, EXTERNAL_COHORTS, "external_cohort")
            what = (
                f"the embedding-Cox arms on the external cohorts at {frac}, seed pair ({pre}, {init}), evaluation only"
            )
            needs = [*([first] if reuse else []), *_backbone_parts(pre)]
            parts.append(
                Part(run, what, argv, f"survset/{run}/survival_cv.json", needs=needs, minutes=3, optional=True)
            )
        three = dict(list(family.items())[:3])
        out = f"seed_spread_ext_labeff_tf{frac}_val_tiesloss_emb3"
        parts.append(_spread(out, three, "the 3 pretraining seeds combined, external cohorts", *ensemble))
        out = f"seed_spread_ext_labeff_tf{frac}_val_tiesloss_emb5"
        parts.append(_spread(out, family, "the 5 pretraining seeds combined, external cohorts", *ensemble))
    return parts


GENE_MAP = "tokenizers/gene_maps/survset_genbank_to_symbol.tsv"  # vdv's GenBank accessions -> symbols (org.Hs.eg.db)


def _gene_map_parts() -> list[Part]:
    """Optional: the external check again with vdv's GenBank accessions mapped to gene symbols (``--gene_map``, a
    data-preparation step fixed before these runs; seventeenth session): the 6 external cohorts rebuilt with the map
    (only vdv's tokens change: 2,565 of its symbols are in the development vocabulary, 7 tokens before), the
    embedding-Cox arms for the 5 seed pairs at 50% with every PCA on non-test patients (the setting of the external
    check) and at 25%, their ensembles fused with the best baseline, and each fraction's (0, 0) run against the same
    run without the map, on the same test patients (evaluation only; ~25 min)."""
    parts = []
    fuse = (*EMB_ENSEMBLE, "--fuse_with", "best_baseline")
    mapped_opts = ("--gene_map", GENE_MAP)
    for frac, nt, old in (
        ("0.5", "_nt", "survival_cv_ext_labeff_tf0.5_val_tiesloss_emb_nt"),
        ("0.25", "", "survival_cv_ext_labeff_tf0.25_val_tiesloss_emb"),
    ):
        first = f"survival_cv_ext_genemap_labeff_tf{frac}_val_tiesloss_emb{nt}"
        extra = (*mapped_opts, *(("--pca_rows", "non_test") if nt else ()))
        family = {}
        for pre, init in FIVE_SEEDS:
            run = first + _pair_suffix(pre, init)
            family[f"pre{pre}_init{init}"] = run
            reuse = () if run == first else (first,)
            argv = _emb_cox(run, _backbones(pre), frac, init, reuse, EXTERNAL_COHORTS, "external_cohort_genemap", extra)
            what = f"{old + _pair_suffix(pre, init)} with vdv's accessions mapped to symbols, evaluation only"
            needs = [*reuse, *_backbone_parts(pre)]
            parts.append(
                Part(run, what, argv, f"survset/{run}/survival_cv.json", needs=needs, minutes=3, optional=True)
            )
        out = f"seed_spread_ext_genemap_labeff_tf{frac}_val_tiesloss_emb{nt}5_fused"
        what = f"the 5-seed external ensembles at {frac} with vdv mapped, fused with the best baseline"
        parts.append(_spread(out, family, what, *fuse))
        parts.append(
            _spread(
                f"versus_ext_genemap_labeff_tf{frac}_val_tiesloss_emb{nt}",
                {"gene_map": first, "no_map": old},
                f"vdv's accessions mapped to symbols - as distributed, {frac}, seed pair (0, 0), same test patients",
                "--versus",
                "cox_clinical_pcs",
                "rsf",
                "cox_clinical_emb_pretrained",
                "cox_clinical_emb_random",
            )
        )
    # why sharing identifiers moves little: which gene embeddings pretraining trained (the 5 seed-0 fold backbones),
    # and the share of each cohort's tokens that use them, vdv with and without the map
    argv = [
        PY,
        "benchmarks/gene_embedding_coverage.py",
        "--runs",
        *(f"{W}/survset/pretrain_cvfolds/fold{k}" for k in range(5)),
    ]
    argv += [
        "--manifest",
        *(f"{W}/survset/{d}/manifest.parquet" for d in ("dev_cohort", "external_cohort", "external_cohort_genemap")),
    ]
    argv += ["--output_dir", f"{W}/survset/gene_embedding_coverage"]
    needs = [
        "survset_cohort",
        "survival_cv_ext_labeff_tf0.25_val_tiesloss_emb",
        "survival_cv_ext_genemap_labeff_tf0.5_val_tiesloss_emb_nt",
        *_backbone_parts(0),
    ]
    what = "the gene embeddings pretraining trained, and each cohort's share of tokens that use them (label-free)"
    parts.append(
        Part(
            "survset_gene_embedding_coverage",
            what,
            argv,
            "survset/gene_embedding_coverage/coverage.json",
            needs=needs,
            minutes=2,
            optional=True,
        )
    )
    # the finetuned arms at 25% with the map (protocol part E), the baselines read back from the 25% run above
    old = "survival_cv_ext_labeff_tf0.25_val_tiesloss"
    run, emb = (
        "survival_cv_ext_genemap_labeff_tf0.25_val_tiesloss",
        "survival_cv_ext_genemap_labeff_tf0.25_val_tiesloss_emb",
    )
    argv = _ext_finetuned_quarter(run, "external_cohort_genemap", emb, mapped_opts)
    what = f"{old} with vdv's accessions mapped to symbols, evaluation only"
    needs = [emb, *_backbone_parts(0)]
    parts.append(Part(run, what, argv, f"survset/{run}/survival_cv.json", needs=needs, minutes=7, optional=True))
    what = "the finetuned arms with vdv mapped - without, 25%, seed pair (0, 0), same test patients"
    parts.append(_versus("versus_ext_genemap_labeff_tf0.25_val_tiesloss", run, old, what, ("gene_map", "no_map")))
    return parts


DECOR_PROBE = ("1", "10")  # loss.decorrelation weights tried on fold 0 (seed 0), chosen on its pretraining split
DECOR = "1"  # the weight chosen there (held-out contrastive loss and R@1; no survival label seen)


def _variant_backbone_parts(label: str, s: int) -> list[str]:
    """The parts that pretrain pretraining variant ``label``'s five fold-wise backbones of seed ``s``."""
    return [f"survset_pretrain_{label}_seed{s}_fold{k}" for k in range(5)]


def _variant_backbones(label: str, folder, what: str, *overrides: str, seeds=range(3)) -> list[Part]:
    """Optional: pretraining variant ``label``'s fold-wise backbones for pretraining ``seeds`` (into
    ``survset/<folder(s)>``): the recipe with ``seed=s`` and run-config ``overrides``."""
    return [
        _fold_backbone(
            f"survset_pretrain_{label}_seed{s}_fold{k}",
            f"survset_pretrain_fold{k} with seed={s} and {what}",
            folder(s),
            k,
            f"seed={s}",
            *overrides,
            minutes=2.5,
        )
        for s in seeds
        for k in range(5)
    ]


def _variant_spectrum(label: str, folder, what: str) -> Part:
    """Optional: the held-out spectra of variant ``label``'s 15 fold-wise backbones against the plain ones."""
    spectrum = [PY, "benchmarks/embedding_spectrum.py"]
    for group, f in (("plain", _backbones), (label, folder)):
        spectrum += ["--group", group, *(f"{W}/survset/{f(s)}/fold{k}" for s in range(3) for k in range(5))]
    return Part(
        f"survset_{label}_spectrum",
        what,
        [*spectrum, "--output_dir", f"{W}/survset/{label}_spectrum"],
        f"survset/{label}_spectrum/embedding_spectrum.json",
        needs=[p for s in range(3) for p in _variant_backbone_parts(label, s)]
        + [p for s in range(3) for p in _backbone_parts(s)],
        minutes=1,
        optional=True,
    )


def _variant_emb_cox(label: str, tag: str, folder, adjective: str, versus_what: str, versus_arms, sep: str):
    """Optional: the embedding-Cox arms at 25% and 50% on variant ``label``'s backbones for seed pairs (0, 0),
    (1, 1), (2, 2) (runs ``..._emb_<tag>``; the baselines read back from the plain run of the pair), each paired
    with that plain run (``--versus versus_arms``), and the 3 runs combined (``..._emb_<tag><sep>3``)."""
    parts = []
    for frac in ("0.25", "0.5"):
        plain = f"survival_cv_labeff_tf{frac}_val_tiesloss_emb"
        family = {}
        for pre, init in FIVE_SEEDS[:3]:
            base = plain + _pair_suffix(pre, init)
            run = f"{plain}_{tag}" + _pair_suffix(pre, init)
            argv = _emb_cox(run, folder(pre), frac, init, reuse=(base,))
            what = f"{base} on the {adjective} backbones of seed {pre}: the embedding-Cox arms"
            needs = [base, *_variant_backbone_parts(label, pre)]
            parts.append(
                Part(run, what, argv, f"survset/{run}/survival_cv.json", needs=needs, minutes=3, optional=True)
            )
            out = f"versus_labeff_tf{frac}_{tag}{_pair_suffix(pre, init)}"
            parts.append(_spread(out, {label: run, "plain": base}, versus_what, "--versus", *versus_arms))
            family[f"pre{pre}_init{init}"] = run
        out = f"seed_spread_labeff_tf{frac}_val_tiesloss_emb_{tag}{sep}3"
        parts.append(_spread(out, family, f"the 3 {adjective} pretraining seeds combined", *EMB_ENSEMBLE))
    return parts


def _loss_variant(label: str, tag: str, folder, override: str, adjective: str, spectrum_what: str) -> list[Part]:
    """Optional: a pretraining-objective variant of the recipe (run-config ``override``, same tokens): its fold-wise
    backbones for seeds 0-2, their held-out spectra against the plain ones, and the embedding-Cox arms at 25% and
    50% paired with the plain runs (:func:`_variant_emb_cox`; the random embedding is the plain run's)."""
    parts = _variant_backbones(label, folder, override, override)
    parts.append(_variant_spectrum(label, folder, spectrum_what))
    what = f"{adjective} - plain backbones, the same seeds, paired on the same test patients"
    pretrained = ("cox_clinical_emb_pretrained", "cox_clinical_pcs_emb_pretrained")
    return parts + _variant_emb_cox(label, tag, folder, adjective, what, pretrained, "_")


def _decor_backbones(s: int) -> str:
    return f"pretrain_cvfolds_decor{DECOR}_seed{s}"


def _decorrelation_parts() -> list[Part]:
    """Optional: ``loss.decorrelation`` on SurvSet (``benchmarks/RESULTS.md``, fifteenth session). The weight is
    chosen among ``DECOR_PROBE`` on fold 0's pretraining validation split (``embedding_spectrum.py``: no survival
    label); then the fold-wise backbones of pretraining seeds 0-2 with it, their held-out spectra against the plain
    backbones, the embedding-Cox arms at 25% and 50% for seed pairs (0, 0), (1, 1), (2, 2) (the plain runs' caches
    give the baselines and the random embeddings), each paired with the plain backbone's run, and the 3 seeds
    combined (~45 min on 2 cores)."""
    fold0 = [f"data.manifest={W}/survset/dev_cohort/manifest_cvfold0.parquet", "seed=0"]
    parts = [
        Part(
            f"survset_decor_probe_w{w}",
            f"survset_pretrain_fold0 with loss.decorrelation={w}",
            _pretrain(
                SURVSET_RECIPE,
                f"{W}/survset/decor_probe/w{w}_fold0",
                *fold0,
                f"loss.decorrelation={w}",
            ),
            f"survset/decor_probe/w{w}_fold0/final/config.json",
            needs=["survset_fold_manifests"],
            minutes=3,
            optional=True,
        )
        for w in DECOR_PROBE
    ]
    probe = [PY, "benchmarks/embedding_spectrum.py", "--group", "plain", f"{W}/survset/pretrain_cvfolds/fold0"]
    for w in DECOR_PROBE:
        probe += ["--group", f"w{w}", f"{W}/survset/decor_probe/w{w}_fold0"]
    parts.append(
        Part(
            "survset_decor_probe_spectrum",
            "the probe weights' held-out spectra, contrastive loss and R@1 on fold 0's pretraining split (the choice)",
            [*probe, "--output_dir", f"{W}/survset/decor_probe/spectrum"],
            "survset/decor_probe/spectrum/embedding_spectrum.json",
            needs=[*(f"survset_decor_probe_w{w}" for w in DECOR_PROBE), *_backbone_parts(0)],
            minutes=0.5,
            optional=True,
        )
    )
    what = "held-out spectra and R@1 of the 15 decorrelated fold-wise backbones against the plain ones"
    parts += _loss_variant(
        "decor", f"decor{DECOR}", _decor_backbones, f"loss.decorrelation={DECOR}", "decorrelated", what
    )
    # secondary: the finetuned network at 25% on the decorrelated backbones (random init and baselines read back)
    parts += _variant_finetuned("decor", f"decor{DECOR}", _decor_backbones, "decorrelated", "_")
    return parts


def _variant_finetuned(label: str, tag: str, folder, adjective: str, sep: str) -> list[Part]:
    """Optional: the finetuned network at 25% (validation shrunk alike, the loss tie rule for networks and baselines)
    on variant ``label``'s backbones for seed pairs (0, 0), (1, 1), (2, 2): runs ``..._tiesloss_<tag>``, random init
    and the tie-aware baselines read back from the pair's plain and ``_emb_<tag>`` embedding-Cox runs (a variant of
    pretraining only: the tokens are the recipe's), each paired with the plain run of the pair, and the 3 combined."""
    plain = "survival_cv_labeff_tf0.25_val_tiesloss_emb"
    parts, family = [], {}
    for pre, init in FIVE_SEEDS[:3]:
        suffix = _pair_suffix(pre, init)
        run = f"survival_cv_labeff_tf0.25_val_tiesloss_{tag}{suffix}"
        reuse = (plain + suffix, f"{plain}_{tag}{suffix}")
        parts.append(
            _finetuned(
                run,
                f"{plain + suffix}'s finetuned arms on the {adjective} backbones of seed {pre}",
                *("--train_fraction", "0.25", "--subsample_validation", "--bp_best_model_ties", "loss"),
                *("--baseline_ties", "loss", "--init_seed", str(init), "--reuse_cache"),
                *(f"{W}/survset/{r}" for r in reuse),
                backbones=folder(pre),
                needs=reuse,
                minutes=12,
            )
        )
        what = f"the finetuned network on {adjective} - plain backbones, the same seeds, the same test patients"
        parts.append(_versus(f"versus_labeff_tf0.25_bp_{tag}{suffix}", run, plain + suffix, what, (label, "plain")))
        family[f"pre{pre}_init{init}"] = run
    parts.append(
        _spread(f"seed_spread_labeff_tf0.25_val_tiesloss_{tag}{sep}3", family, f"the 3 {adjective} finetuned runs")
    )
    return parts


DEVIATION = "tokenizers/survset_processors_deviation.yaml"  # each profile's 256 largest |z| as its gene tokens


def _deviation_backbones(s: int) -> str:
    return f"pretrain_cvfolds_deviation_seed{s}"


EXT_SPREAD = "seed_spread_ext_genemap_labeff_tf0.5_val_tiesloss_emb_nt"  # + <tag>3_fused: a variant's external check
EXT_FUSE = (*EMB_ENSEMBLE, "--fuse_with", "best_baseline")


def _variant_external(label: str, tag: str, folder, sep: str = "") -> list[Part]:
    """Optional, evaluation only: the external check's setting (the 6 external cohorts, vdv mapped, 50%, every PCA on
    non-test patients) on variant ``label``'s backbones for seed pairs (0, 0), (1, 1), (2, 2), baselines read back
    from the plain (0, 0) run, and the 3 runs' ensemble fused with the best baseline (``..._nt_<tag><sep>3_fused``)."""
    plain = "survival_cv_ext_genemap_labeff_tf0.5_val_tiesloss_emb_nt"
    extra = ("--gene_map", GENE_MAP, "--pca_rows", "non_test")
    parts, family = [], {}
    for pre, init in FIVE_SEEDS[:3]:
        run = f"{plain}_{tag}" + _pair_suffix(pre, init)
        argv = _emb_cox(run, folder(pre), "0.5", init, (plain,), EXTERNAL_COHORTS, "external_cohort_genemap", extra)
        what = f"{plain + _pair_suffix(pre, init)} on the {label} backbones of seed {pre}, evaluation only"
        needs = [plain, *_variant_backbone_parts(label, pre)]
        parts.append(Part(run, what, argv, f"survset/{run}/survival_cv.json", needs=needs, minutes=3, optional=True))
        family[f"pre{pre}_init{init}"] = run
    what = f"the 3 {label} seeds' external ensembles (vdv mapped) fused with the best baseline"
    parts.append(_spread(f"{EXT_SPREAD}_{tag}{sep}3_fused", family, what, *EXT_FUSE))
    return parts


def _deviation_parts() -> list[Part]:
    """Optional: each profile's most deviant genes as its tokens (omics ``top_k_by: deviation``,
    ``tokenizers/survset_processors_deviation.yaml``; protocol G, eighteenth session). The fold-wise backbones of
    pretraining seeds 0-2 with it; label-free first: which gene embeddings they trained and each cohort's share of
    tokens using them (seed 0), and their held-out spectra against the plain backbones; then the embedding-Cox arms at
    25% and 50% for seed pairs (0, 0), (1, 1), (2, 2) (baselines read back from the plain run of the pair, the random
    embedding recomputed on the deviation processors), each paired with the plain run, and the 3 runs combined; the
    external check's setting (vdv mapped, 50%, every PCA on non-test patients) for the same pairs, evaluation only,
    fused with the best baseline beside the plain backbones' same 3 pairs; protocol H: the finetuned network at 25%
    for the same pairs, random init reading the same tokens (~60 min on 2 idle cores)."""
    parts = _variant_backbones(
        "deviation", _deviation_backbones, DEVIATION, f"data.processor_settings={{root}}/{DEVIATION}"
    )
    argv = [PY, "benchmarks/gene_embedding_coverage.py", "--runs"]
    argv += [f"{W}/survset/{_deviation_backbones(0)}/fold{k}" for k in range(5)]
    argv += ["--manifest"]
    argv += [f"{W}/survset/{d}/manifest.parquet" for d in ("dev_cohort", "external_cohort", "external_cohort_genemap")]
    argv += ["--output_dir", f"{W}/survset/gene_embedding_coverage_deviation"]
    parts.append(
        Part(
            "survset_gene_embedding_coverage_deviation",
            "survset_gene_embedding_coverage on the seed-0 deviation backbones (label-free)",
            argv,
            "survset/gene_embedding_coverage_deviation/coverage.json",
            needs=["survset_gene_embedding_coverage", *_variant_backbone_parts("deviation", 0)],
            minutes=2,
            optional=True,
        )
    )
    what = "held-out spectra and R@1 of the 15 deviation fold-wise backbones against the plain ones (label-free)"
    parts.append(_variant_spectrum("deviation", _deviation_backbones, what))
    parts += _variant_emb_cox(
        "deviation",
        "deviation",
        _deviation_backbones,
        "deviation",
        "deviation - highest-value tokens, the same seeds, paired on the same test patients",
        # protocol I: the random arm too, the tokens' own effect without pretraining
        ("cox_clinical_emb_pretrained", "cox_clinical_pcs_emb_pretrained", "cox_clinical_emb_random"),
        "",
    )
    pairs = FIVE_SEEDS[:3]
    # secondary, evaluation only: the external check's setting with vdv mapped, fused with the best baseline
    parts += _variant_external("deviation", "deviation", _deviation_backbones)
    plain = "survival_cv_ext_genemap_labeff_tf0.5_val_tiesloss_emb_nt"
    plain_family = {f"pre{pre}_init{init}": plain + _pair_suffix(pre, init) for pre, init in pairs}
    what = "the same 3 seeds of the plain backbones' external ensembles (vdv mapped) fused with the best baseline"
    parts.append(_spread(f"{EXT_SPREAD}3_fused", plain_family, what, *EXT_FUSE))
    # protocol H: the finetuned network at 25% on the deviation backbones, random init with the same tokens; the
    # tie-aware baselines read back from the pair's embedding-Cox run (as the decorrelation runs above)
    plain = "survival_cv_labeff_tf0.25_val_tiesloss"
    opts = ("--train_fraction", "0.25", "--subsample_validation", "--bp_best_model_ties", "loss")
    opts += ("--baseline_ties", "loss", "--random_processor_settings", f"{{root}}/{DEVIATION}")
    family = {}
    for pre, init in pairs:
        suffix = _pair_suffix(pre, init)
        run = f"{plain}_deviation{suffix}"
        parts.append(
            _finetuned(
                run,
                f"{plain + suffix}'s finetuned arms on the deviation backbones of seed {pre}, random init alike",
                *opts,
                *("--init_seed", str(init), "--reuse_cache", f"{W}/survset/{plain}_emb{suffix}"),
                backbones=_deviation_backbones(pre),
                needs=[plain + suffix, f"{plain}_emb{suffix}", *_variant_backbone_parts("deviation", pre)],
                minutes=10,
            )
        )
        what = "the finetuned network on deviation - highest-value tokens, the same seeds, the same test patients"
        parts.append(
            _versus(f"versus_labeff_tf0.25_bp_deviation{suffix}", run, plain + suffix, what, ("deviation", "plain"))
        )
        family[f"pre{pre}_init{init}"] = run
    parts.append(_spread("seed_spread_labeff_tf0.25_val_tiesloss_deviation3", family, "the 3 deviation finetuned runs"))
    return parts


RECON = "1"  # loss.reconstruction weight, fixed before any run (protocol J, nineteenth session; nothing tuned)


def _recon_backbones(s: int) -> str:
    return f"pretrain_cvfolds_recon{RECON}_seed{s}"


def _reconstruction_parts() -> list[Part]:
    """Optional: the masked-value reconstruction term beside the contrastive loss (``loss.reconstruction``, weight
    ``RECON`` fixed in advance; protocol J, nineteenth session). The fold-wise backbones of pretraining seeds 0-2 with
    it; label-free first: their held-out spectra against the plain backbones; then the embedding-Cox arms at 25% and
    50% for seed pairs (0, 0), (1, 1), (2, 2) (baselines and random embeddings read back from the plain run of the
    pair: the tokens are the recipe's), each paired with the plain run, and the 3 runs combined; the external check's
    setting, evaluation only; the finetuned network at 25% for the same pairs (~70 min on 2 idle cores)."""
    what = "held-out spectra and R@1 of the 15 reconstruction fold-wise backbones against the plain ones (label-free)"
    parts = _loss_variant(
        "recon", f"recon{RECON}", _recon_backbones, f"loss.reconstruction={RECON}", "reconstruction", what
    )
    # label-free: the decoder's held-out error against predicting 0 and each gene's training mean (its identity alone)
    runs = [f"{W}/survset/{_recon_backbones(s)}/fold{k}" for s in range(3) for k in range(5)]
    argv = [PY, "benchmarks/reconstruction_reference.py", "--runs", *runs]
    parts.append(
        Part(
            "survset_recon_reference",
            "held-out reconstruction error of the 15 backbones against predicting 0 and each gene's training mean",
            [*argv, "--output_dir", f"{W}/survset/recon_reference"],
            "survset/recon_reference/reconstruction_reference.json",
            needs=[p for s in range(3) for p in _variant_backbone_parts("recon", s)],
            minutes=0.5,
            optional=True,
        )
    )
    parts += _variant_external("recon", f"recon{RECON}", _recon_backbones, "_")
    parts += _variant_finetuned("recon", f"recon{RECON}", _recon_backbones, "reconstruction", "_")
    return parts


def _rule_pair(va: str, cvr: str, argv, needs: list[str], back: dict, seeds: str, versus_out: str, versus_what: str):
    """Protocols K and L: the run choosing on the validation part (``va``), the same run choosing by inner CV
    (``cvr``, reading ``va``'s embeddings and ``back``'s classical models back), and every model of one against the
    other on the same test patients. ``argv(run, reuse, *extra)``: the run's ``survival_cv.py`` argv."""
    arms = (*("cox_clinical", "cox_clinical_pcs", "rsf"), *EMB_ARMS)
    return [
        Part(
            va,
            f"baselines and embedding-Cox arms, settings chosen on the validation part; {seeds}",
            argv(va, back["selval"]),
            f"survset/{va}/survival_cv.json",
            needs=[*needs, *back["selval"]],
            minutes=4,
            optional=True,
        ),
        Part(
            cvr,
            f"the same, settings chosen by 5-fold inner CV on training + validation; {seeds}",
            argv(cvr, (va, *back["selcv"]), "--selection", "inner_cv"),
            f"survset/{cvr}/survival_cv.json",
            needs=[va, *back["selcv"]],
            minutes=4,
            optional=True,
        ),
        _spread(versus_out, {"inner_cv": cvr, "validation": va}, versus_what, "--versus", *arms),
    ]


def _inner_cv_parts() -> list[Part]:
    """Optional: protocol K (twenty-first session): the classical and embedding-Cox models choosing their settings
    by inner cross-validation on every labelled patient (``survival_cv.py --selection inner_cv``) against the
    validation-part rule, on the recipe's reconstruction backbones (seeds 0-2), at 25% and 50% of the labels (and
    all of them for the first seed pair, secondary): per seed pair one run of each rule (the inner-CV run reads the
    embeddings back from the validation run), each arm under inner CV against itself under the validation rule on
    the same test patients, and each rule's 3 runs combined (~40 min on 2 cores after the backbones)."""
    parts = []
    for frac in ("0.25", "0.5", "1"):  # all the labels: the first seed pair only (secondary)
        family: dict[str, dict[str, str]] = {"selval": {}, "selcv": {}}
        for pre, init in FIVE_SEEDS[: 1 if frac == "1" else 3]:
            sfx = _pair_suffix(pre, init)
            va, cvr = (f"survival_cv_labeff_tf{frac}_recon{RECON}_{rule}{sfx}" for rule in ("selval", "selcv"))
            seeds = f"reconstruction backbones of seed {pre}, init seed {init}, {frac} of the labels"
            # the classical models do not depend on the backbone or the init seed: the first pair's are read back
            first = {r: f"survival_cv_labeff_tf{frac}_recon{RECON}_{r}" for r in ("selval", "selcv")}
            back = {r: () if (pre, init) == FIVE_SEEDS[0] else (first[r],) for r in first}
            parts += _rule_pair(
                va,
                cvr,
                lambda run, reuse, *extra, pre=pre, init=init, frac=frac: _emb_cox(
                    run, _recon_backbones(pre), frac, init, reuse=reuse, extra=extra
                ),
                _variant_backbone_parts("recon", pre),
                back,
                seeds,
                f"versus_selection_tf{frac}_recon{RECON}{sfx}",
                "each model under inner CV - under the validation rule, the same test patients",
            )
            family["selval"][f"pre{pre}_init{init}"] = va
            family["selcv"][f"pre{pre}_init{init}"] = cvr
        for rule, runs in family.items() if frac != "1" else ():
            what = f"the 3 seed pairs combined ({'inner CV' if rule == 'selcv' else 'validation part'})"
            parts.append(_spread(f"seed_spread_labeff_tf{frac}_recon{RECON}_{rule}3", runs, what, *EMB_ENSEMBLE))
    return parts


def _inner_cv_external_parts() -> list[Part]:
    """Optional, evaluation only: protocol L (twenty-first session): protocol K's two selection rules in the external
    check's setting (the 6 external cohorts, vdv mapped, 50%, every PCA on non-test patients) on the reconstruction
    backbones, seed pairs (0, 0), (1, 1), (2, 2): per pair one run of each rule and each model under inner CV against
    itself under the validation rule; per rule the 3 runs' ensemble fused with the best baseline (~25 min)."""
    parts = []
    extra = ("--gene_map", GENE_MAP, "--pca_rows", "non_test")
    family: dict[str, dict[str, str]] = {"selval": {}, "selcv": {}}
    first = {r: f"survival_cv_ext_genemap_labeff_tf0.5_nt_recon{RECON}_{r}" for r in family}
    for pre, init in FIVE_SEEDS[:3]:
        sfx = _pair_suffix(pre, init)
        va, cvr = (first[r] + sfx for r in ("selval", "selcv"))
        back = {r: () if (pre, init) == FIVE_SEEDS[0] else (first[r],) for r in first}
        seeds = (
            f"the external check's setting, reconstruction backbones of seed {pre}, init seed {init}, evaluation only"
        )

        def external(run: str, reuse: tuple, *more: str, pre=pre, init=init) -> list[str]:
            opts = (*extra, *more)
            return _emb_cox(
                run, _recon_backbones(pre), "0.5", init, reuse, EXTERNAL_COHORTS, "external_cohort_genemap", opts
            )

        parts += _rule_pair(
            va,
            cvr,
            external,
            _variant_backbone_parts("recon", pre),
            back,
            seeds,
            f"versus_selection_ext_tf0.5_recon{RECON}{sfx}",
            "each model under inner CV - under the validation rule, external cohorts, the same test patients",
        )
        family["selval"][f"pre{pre}_init{init}"] = va
        family["selcv"][f"pre{pre}_init{init}"] = cvr
    for rule, runs in family.items():
        what = (
            f"the 3 external ensembles fused with the best baseline ({'inner CV' if rule == 'selcv' else 'validation'})"
        )
        parts.append(_spread(f"seed_spread_ext_genemap_tf0.5_nt_recon{RECON}_{rule}3_fused", runs, what, *EXT_FUSE))
    return parts


SELECT_CV = ("--selection", "inner_cv")
CORPUS = ("0.25", "0.5")  # shares of each fold manifest's train patients per cohort, nested (protocol M)
STEPS_N = "100"  # protocol N: the 25% corpus at the full corpus's ~40 passes (the recipe's 400 steps / 4)
# every subset backbone family: (folder tag, corpus share, run-config overrides)
CORPUS_VARIANTS = (*((c, c, ()) for c in CORPUS), (f"0.25_steps{STEPS_N}", "0.25", (f"optim.max_steps={STEPS_N}",)))


def _corpus_backbones(frac: str, s: int) -> str:
    return f"pretrain_cvfolds_recon{RECON}_corpus{frac}_seed{s}"


def _corpus_parts() -> list[Part]:
    """Optional: protocol M (twenty-second session): does the frozen embedding improve with the size of the
    unlabelled corpus? Nested 25% / 50% subsets of each fold manifest's train patients per cohort (drawn with the
    pretraining seed), the recipe pretrained on each with the processors of the same fold's full-corpus backbone (so
    the tokens, and the random-embedding control, are the same at every size); the full corpus is protocol K's
    backbones (57 min for the 30 backbones on 2 cores)."""
    manifests = [f"{W}/survset/dev_cohort/manifest_cvfold{k}.parquet" for k in range(5)]
    subsets = [PY, "benchmarks/corpus_subsets.py", "--manifest", *manifests, "--fractions", *CORPUS]
    parts = []
    for s in range(3):
        parts.append(
            Part(
                f"survset_corpus_subsets_seed{s}",
                f"nested {' / '.join(CORPUS)} subsets of each fold manifest's train patients per cohort, seed {s}",
                [*subsets, "--seed", str(s)],
                f"survset/dev_cohort/manifest_cvfold4_corpus{CORPUS[-1]}_seed{s}.parquet",
                needs=["survset_fold_manifests"],
                minutes=0.2,
                optional=True,
            )
        )
    for tag, frac, overrides in CORPUS_VARIANTS:
        for s in range(3):
            for k in range(5):
                folder = _corpus_backbones(tag, s)
                parts.append(
                    Part(
                        f"survset_pretrain_recon_corpus{tag}_seed{s}_fold{k}",
                        f"survset_pretrain_recon_seed{s}_fold{k} on {frac} of its train patients, its processors"
                        + (f", {' '.join(overrides)}" if overrides else ""),
                        _pretrain(
                            SURVSET_RECIPE,
                            f"{W}/survset/{folder}/fold{k}",
                            f"data.manifest={W}/survset/dev_cohort/manifest_cvfold{k}_corpus{frac}_seed{s}.parquet",
                            f"data.processor_dir={W}/survset/{_recon_backbones(s)}/fold{k}/processor",
                            f"seed={s}",
                            f"loss.reconstruction={RECON}",
                            *overrides,
                        ),
                        f"survset/{folder}/fold{k}/final/config.json",
                        needs=[f"survset_corpus_subsets_seed{s}", f"survset_pretrain_recon_seed{s}_fold{k}"],
                        minutes=0.7 if overrides else 2.2,
                        optional=True,
                    )
                )
    for frac in ("0.5", "0.25"):  # of the labels; 0.5 first: the primary
        full = {}  # protocol K's inner-CV runs on the full corpus, per seed pair
        smaller: dict[str, dict[str, str]] = {tag: {} for tag, _, _ in CORPUS_VARIANTS}
        for pre, init in FIVE_SEEDS[:3]:
            sfx = _pair_suffix(pre, init)
            full[f"pre{pre}_init{init}"] = k_run = f"survival_cv_labeff_tf{frac}_recon{RECON}_selcv{sfx}"
            for corpus in smaller:
                run = f"survival_cv_labeff_tf{frac}_recon{RECON}_corpus{corpus}_selcv{sfx}"
                smaller[corpus][f"pre{pre}_init{init}"] = run
                parts.append(
                    Part(
                        run,
                        f"embedding-Cox arms by inner CV on the {corpus}-corpus backbones of seed {pre}, init seed "
                        f"{init}, {frac} of the labels (baselines read back from protocol K's run)",
                        _emb_cox(run, _corpus_backbones(corpus, pre), frac, init, (k_run,), extra=SELECT_CV),
                        f"survset/{run}/survival_cv.json",
                        needs=[k_run, *(f"survset_pretrain_recon_corpus{corpus}_seed{pre}_fold{k}" for k in range(5))],
                        minutes=4,
                        optional=True,
                    )
                )
        for corpus, runs in smaller.items():
            what = f"the 3 seed pairs on the {corpus}-corpus backbones combined (inner CV), {frac} of the labels"
            parts.append(_spread(f"seed_spread_labeff_tf{frac}_recon{RECON}_corpus{corpus}_selcv3", runs, what))
        # each setting against another on the same seed pairs: the full corpus minus each smaller one, 50% - 25%;
        # protocol N: the full corpus minus the 25% corpus at equal passes, and that one minus the 400-step one
        n_tag = CORPUS_VARIANTS[-1][0]
        for (a, runs_a), (b, runs_b) in (
            (("1", full), (CORPUS[0], smaller[CORPUS[0]])),
            (("1", full), (CORPUS[1], smaller[CORPUS[1]])),
            ((CORPUS[1], smaller[CORPUS[1]]), (CORPUS[0], smaller[CORPUS[0]])),
            (("1", full), (n_tag, smaller[n_tag])),
            ((n_tag, smaller[n_tag]), (CORPUS[0], smaller[CORPUS[0]])),
        ):
            what = f"corpus {a} - corpus {b}, paired per seed pair, {frac} of the labels"
            parts.append(
                _spread(f"corpus_tf{frac}_recon{RECON}_{a}_minus_{b}", runs_a, what, against=(runs_b, f"corpus {b}"))
            )
    # the curve: the backbones' held-out numbers and the embedding's differences against the corpus size; protocol
    # N's: the 25% corpus at both step counts beside the full corpus
    for name, out, tags in (
        ("survset_corpus_curve", "corpus_curve", CORPUS),
        (f"survset_corpus_curve_steps{STEPS_N}", f"corpus_curve_steps{STEPS_N}", (CORPUS[0], n_tag)),
    ):
        argv = [PY, "benchmarks/corpus_curve.py", "--backbones", "1", f"{W}/survset/{_recon_backbones('[012]')}/fold*"]
        spreads = []
        for tag in tags:
            argv += ["--backbones", tag, f"{W}/survset/{_corpus_backbones(tag, '[012]')}/fold*"]
        for frac in ("0.5", "0.25"):
            for corpus, tag in (("1", ""), *((c, f"_corpus{c}") for c in tags)):
                spreads.append(f"seed_spread_labeff_tf{frac}_recon{RECON}{tag}_selcv3")
                argv += ["--spread", frac, corpus, f"{W}/survset/{spreads[-1]}"]
        parts.append(
            _curve_part(
                out,
                f"the corpus-size curve ({', '.join(('1', *tags))}): held-out pretraining numbers and the embedding's "
                "differences",
                argv,
                [f"survset_{s}" for s in spreads],
                name=name,
            )
        )
    return parts


STEPS_P = "800"  # protocol P (twenty-third session): the recipe's 400 steps doubled, 3 seed pairs
STEPS_Q = "1600"  # protocol Q: a one-seed pilot at 4x, run only if time allowed


def _steps_backbones(steps: str, s: int) -> str:
    return f"pretrain_cvfolds_recon{RECON}_steps{steps}_seed{s}"


def _steps_parts() -> list[Part]:
    """Optional: protocols P and Q (twenty-third session) and R (twenty-fourth): the recipe on the full fold manifests
    with more pretraining steps (P: 800, seeds 0-2; Q: 1,600, seed 0, a pilot run only after P; R: Q completed with
    seeds 1 and 2), each with the processors of protocol K's 400-step backbone of the same fold and seed (the same
    tokens, the same random-embedding control); the embedding-Cox arms by inner CV with K's baselines read back, each
    run paired with K's run of the same seed pair (``--against``; Q's and R's also with P's), and the label-free
    numbers and pooled differences against the step count (measured on 2 idle cores: P 63 min, 53 of them for the
    backbones; Q 37 min; R 75 min, 69 of them for its 10 backbones). R reuses Q's seed-0 parts and writes its
    comparisons and curve under names of its own (``_3pairs``), so Q's recorded outputs stay as they are."""
    parts = []
    k_runs = {  # protocol K's inner-CV runs (400 steps), per label fraction and seed pair
        frac: {
            f"pre{pre}_init{init}": f"survival_cv_labeff_tf{frac}_recon{RECON}_selcv{_pair_suffix(pre, init)}"
            for pre, init in FIVE_SEEDS[:3]
        }
        for frac in ("0.5", "0.25")
    }
    spreads = {(frac, "400"): f"seed_spread_labeff_tf{frac}_recon{RECON}_selcv3" for frac in k_runs}
    runs_of: dict[tuple[str, str], dict[str, str]] = {}  # (steps, label fraction) -> {seed pair: run}
    defined: set[str] = set()  # R's seed-0 backbones and runs are Q's parts: defined once
    # P first, then Q (its backbones must not hold up P's comparisons), then R; each block: backbones, runs,
    # comparisons. The suffix names R's comparisons and curve apart from Q's one-pair ones.
    blocks = ((STEPS_P, 3, ("400",), ""), (STEPS_Q, 1, ("400", STEPS_P), ""), (STEPS_Q, 3, ("400", STEPS_P), "_3pairs"))
    for steps, n_seeds, partners, suffix in blocks:
        folder = {s: _steps_backbones(steps, s) for s in range(n_seeds)}
        for s in range(n_seeds):
            if f"survset_pretrain_recon_steps{steps}_seed{s}_fold0" in defined:
                continue
            defined.add(f"survset_pretrain_recon_steps{steps}_seed{s}_fold0")
            parts += [
                _fold_backbone(
                    f"survset_pretrain_recon_steps{steps}_seed{s}_fold{k}",
                    f"survset_pretrain_recon_seed{s}_fold{k} with optim.max_steps={steps}, its processors",
                    folder[s],
                    k,
                    f"data.processor_dir={W}/survset/{_recon_backbones(s)}/fold{k}/processor",
                    f"seed={s}",
                    f"loss.reconstruction={RECON}",
                    f"optim.max_steps={steps}",
                    minutes=1.8 * int(steps) / 400,  # measured: 3.5 min at 800 steps, 7 at 1,600
                    needs=[f"survset_pretrain_recon_seed{s}_fold{k}"],
                )
                for k in range(5)
            ]
        for frac in ("0.5", "0.25"):  # of the labels; 0.5 first: the primary
            runs = runs_of[steps, frac] = {}
            for pre, init in FIVE_SEEDS[:n_seeds]:
                key = f"pre{pre}_init{init}"
                reuse = k_runs[frac][key]
                runs[key] = run = (
                    f"survival_cv_labeff_tf{frac}_recon{RECON}_steps{steps}_selcv{_pair_suffix(pre, init)}"
                )
                if run in defined:
                    continue
                defined.add(run)
                parts.append(
                    Part(
                        run,
                        f"embedding-Cox arms by inner CV on the {steps}-step backbones of seed {pre}, init seed "
                        f"{init}, {frac} of the labels (baselines read back from protocol K's run)",
                        _emb_cox(run, folder[pre], frac, init, (reuse,), extra=SELECT_CV),
                        f"survset/{run}/survival_cv.json",
                        needs=[reuse, *(f"survset_pretrain_recon_steps{steps}_seed{pre}_fold{k}" for k in range(5))],
                        minutes=2,
                        optional=True,
                    )
                )
            if n_seeds > 1:  # one run's own differences are in its survival_cv.json
                what = (
                    f"the {n_seeds} seed pairs on the {steps}-step backbones combined (inner CV), {frac} of the labels"
                )
                spreads[frac, steps] = f"seed_spread_labeff_tf{frac}_recon{RECON}_steps{steps}_selcv{n_seeds}"
                parts.append(_spread(spreads[frac, steps], runs, what))
            for other in partners:
                theirs = k_runs[frac] if other == "400" else runs_of[other, frac]
                what = f"{steps} - {other} pretraining steps, paired per seed pair ({n_seeds}), {frac} of the labels"
                out = f"steps_tf{frac}_recon{RECON}_{steps}_minus_{other}{suffix}"
                pair = ({key: theirs[key] for key in runs}, f"{other} steps")
                parts.append(_spread(out, runs, what, against=pair))
            if suffix and partners[0] == "400":  # R: the pairs Q's pilot had not shown, alone (the protocol's check)
                new = {key: run for key, run in runs.items() if key != "pre0_init0"}
                what = f"{steps} - 400 pretraining steps, seed pairs 1 and 2 only (not seen by Q), {frac} of the labels"
                out = f"steps_tf{frac}_recon{RECON}_{steps}_minus_400_pairs12"
                parts.append(_spread(out, new, what, against=({key: k_runs[frac][key] for key in new}, "400 steps")))
        # the curve: label-free numbers per step count (P: 3 seeds, with the pooled differences; Q: seed 0 only)
        step_list = ("400", *partners[1:], steps)
        seeds = "[012]" if n_seeds == 3 else "0"
        argv = [PY, "benchmarks/corpus_curve.py", "--x", "steps"]
        for st in step_list:
            argv += [
                "--backbones",
                st,
                f"{W}/survset/{_recon_backbones(seeds) if st == '400' else _steps_backbones(st, seeds)}/fold*",
            ]
        needs = [
            f"survset_pretrain_recon_steps{st}_seed{s}_fold{k}"
            for st in step_list[1:]
            for s in range(n_seeds)
            for k in range(5)
        ]
        if n_seeds > 1:  # a one-pair pilot's differences are not alike the 3 pairs' means beside it: not plotted
            for frac in ("0.5", "0.25"):
                for st in step_list:
                    argv += ["--spread", frac, st, f"{W}/survset/{spreads[frac, st]}"]
                    needs.append(f"survset_{spreads[frac, st]}")
        out = ("steps_curve" if n_seeds > 1 else "steps_curve_pilot") + (f"_{steps}{suffix}" if suffix else "")
        parts.append(
            _curve_part(
                out,
                f"the step-count curve ({', '.join(step_list)} steps, seeds {seeds}): the backbones' held-out numbers"
                + (" and the embedding's pooled differences" if n_seeds > 1 else ""),
                argv,
                needs,
            )
        )
    return parts


def _step_choice_parts() -> list[Part]:
    """Optional: protocol S (twenty-fourth session): the step count chosen per fold by inner CV among the 400-,
    800- and 1,600-step backbones of the same seed (K's, P's and Q/R's), ``survival_cv.py``'s
    ``cox_clinical_emb_selected`` arm with every candidate's records read back from those runs (nothing fitted but
    the choice); 3 seed pairs at 50% and 25% of the labels, each family combined by ``seed_spread.py``."""
    parts = []
    steps = ("400", STEPS_P, STEPS_Q)
    for frac in ("0.5", "0.25"):
        runs = {}
        for pre, init in FIVE_SEEDS[:3]:
            suffix = _pair_suffix(pre, init)
            of = {
                st: f"survival_cv_labeff_tf{frac}_recon{RECON}" + ("" if st == "400" else f"_steps{st}") for st in steps
            }
            reuse = tuple(f"{run}_selcv{suffix}" for run in of.values())
            folders = {st: _recon_backbones(pre) if st == "400" else _steps_backbones(st, pre) for st in steps}
            candidates = (
                "--emb_candidates",
                *(f"{st}={W}/survset/{f}/fold{{fold}}/final" for st, f in folders.items()),
            )
            runs[f"pre{pre}_init{init}"] = run = f"survival_cv_labeff_tf{frac}_recon{RECON}_stepchoice_selcv{suffix}"
            argv = _emb_cox(
                run,
                folders["400"],
                frac,
                init,
                reuse,
                extra=(*SELECT_CV, *candidates),
                arms=(*EMB_ARMS, "cox_clinical_emb_selected"),
            )
            what = (
                f"the step count (400, 800 or 1,600) chosen per fold by inner CV, seed pair ({pre}, {init}), {frac} of "
                "the labels (every candidate read back from its run)"
            )
            parts.append(
                Part(run, what, argv, f"survset/{run}/survival_cv.json", needs=list(reuse), minutes=2, optional=True)
            )
        what = f"the 3 seed pairs with the step count chosen by inner CV combined, {frac} of the labels"
        parts.append(_spread(f"seed_spread_labeff_tf{frac}_recon{RECON}_stepchoice_selcv3", runs, what))
    return parts


GENE_FEATURES = "tokenizers/gene_features/org_hs_go_kegg_svd64.safetensors"  # GO + KEGG, org.Hs.eg.db 3.16.0


GENE_FEATURE_VARIANTS = {  # protocol -> (name in parts and folders, processor settings, what)
    "T": ("genefeat", "tokenizers/survset_processors_genefeat.yaml", "with gene features"),
    "U": (
        "genefeat_replace",
        "tokenizers/survset_processors_genefeat_replace.yaml",
        "with gene identities from features alone",
    ),
}


def _paired_run_names(frac: str, pre: int, init: int, tag: str) -> tuple[str, str]:
    """``(K's run, the variant ``tag``'s run)`` of seed pair ``(pre, init)`` at ``frac`` of the labels."""
    sfx = _pair_suffix(pre, init)
    return (
        f"survival_cv_labeff_tf{frac}_recon{RECON}_selcv{sfx}",
        f"survival_cv_labeff_tf{frac}_recon{RECON}_{tag}_selcv{sfx}",
    )


def _paired_emb_cox(
    frac: str, pre: int, init: int, tag: str, folder: str, what: str, minutes: float
) -> tuple[str, str, Part]:
    """``(K's run, this run, its part)``: the embedding-Cox arms by inner CV on the fold-wise backbones ``folder``
    (``what`` they are; parts ``survset_pretrain_recon_<tag>_seed<pre>_fold*``) at ``frac`` of the labels, seed pair
    ``(pre, init)``, with protocol K's baselines read back from K's run of the same pair and fraction."""
    reuse, run = _paired_run_names(frac, pre, init, tag)
    part = Part(
        run,
        f"embedding-Cox arms by inner CV on {what}, seed {pre}, init seed {init}, "
        f"{frac} of the labels (baselines read back from protocol K's run)",
        _emb_cox(run, folder, frac, init, (reuse,), extra=SELECT_CV),
        f"survset/{run}/survival_cv.json",
        needs=[reuse, *(f"survset_pretrain_recon_{tag}_seed{pre}_fold{k}" for k in range(5))],
        minutes=minutes,
        optional=True,
    )
    return reuse, run, part


def _gene_feature_parts(protocol: str = "T") -> list[Part]:
    """Optional: protocols T and U (twenty-fifth session): gene identities from GO / KEGG annotation
    (``gene_features_file``, the committed ``GENE_FEATURES`` table). T: ``row + W @ features``; U: ``W @ features``
    alone for annotated genes (``gene_feature_mode: replace``). Protocol K's processors of each fold and seed with the
    table attached (the same tokens; U reuses T's), K's recipe on them (15 backbones), the embedding-Cox arms by inner
    CV at 50% and 25% of the labels for seed pairs (0, 0), (1, 1), (2, 2) with K's baselines read back, each run paired
    with K's run of the same seed pair (``--against``; U's also with T's), and the label-free numbers beside K's."""
    parts = []
    tag, settings, label = GENE_FEATURE_VARIANTS[protocol]
    folder = {s: f"pretrain_cvfolds_recon{RECON}_{tag}_seed{s}" for s in range(3)}
    for s in range(3):
        for k in range(5):
            procs = f"genefeat_processors/seed{s}_fold{k}"
            if protocol != "T":  # T's parts attach the table
                parts.append(
                    _fold_backbone(
                        f"survset_pretrain_recon_{tag}_seed{s}_fold{k}",
                        f"survset_pretrain_recon_seed{s}_fold{k}, {label} (its processors, the table attached)",
                        folder[s],
                        k,
                        f"data.processor_dir={W}/survset/{procs}",
                        f"data.processor_settings={settings}",
                        f"seed={s}",
                        f"loss.reconstruction={RECON}",
                        minutes=2,
                        needs=[f"survset_genefeat_processors_seed{s}_fold{k}"],
                    )
                )
                continue
            parts.append(
                Part(
                    f"survset_genefeat_processors_seed{s}_fold{k}",
                    f"survset_pretrain_recon_seed{s}_fold{k}'s processors with the gene feature table attached",
                    [
                        PY,
                        "tokenizers/build_gene_features.py",
                        "--features",
                        GENE_FEATURES,
                        "--attach_to",
                        f"{W}/survset/{_recon_backbones(s)}/fold{k}/processor",
                        "--output_dir",
                        f"{W}/survset/{procs}",
                    ],
                    f"survset/{procs}/gene_features_attached.json",
                    needs=[f"survset_pretrain_recon_seed{s}_fold{k}"],
                    minutes=0.2,
                    optional=True,
                )
            )
            parts.append(
                _fold_backbone(
                    f"survset_pretrain_recon_genefeat_seed{s}_fold{k}",
                    f"survset_pretrain_recon_seed{s}_fold{k} with gene features (its processors, the table attached)",
                    folder[s],
                    k,
                    f"data.processor_dir={W}/survset/{procs}",
                    "data.processor_settings=tokenizers/survset_processors_genefeat.yaml",
                    f"seed={s}",
                    f"loss.reconstruction={RECON}",
                    minutes=2,
                    needs=[f"survset_genefeat_processors_seed{s}_fold{k}"],
                )
            )
    for frac in ("0.5", "0.25"):  # of the labels; 0.5 first: the primary
        runs, k_runs, t_runs = {}, {}, {}
        for pre, init in FIVE_SEEDS[:3]:
            key, sfx = f"pre{pre}_init{init}", _pair_suffix(pre, init)
            t_runs[key] = f"survival_cv_labeff_tf{frac}_recon{RECON}_genefeat_selcv{sfx}"
            k_runs[key], runs[key], part = _paired_emb_cox(
                frac, pre, init, tag, folder[pre], f"the backbones {label}", 2
            )
            parts.append(part)
        what = f"the 3 seed pairs on the backbones {label} combined (inner CV), {frac} of the labels"
        parts.append(_spread(f"seed_spread_labeff_tf{frac}_recon{RECON}_{tag}_selcv3", runs, what))
        what = f"{label} - without gene features, paired per seed pair (3), {frac} of the labels"
        out = f"{tag}_tf{frac}_recon{RECON}_minus_plain"
        parts.append(_spread(out, runs, what, against=(k_runs, "without gene features")))
        if protocol != "T":
            what = f"{label} - protocol T's row + W @ features, paired per seed pair (3), {frac} of the labels"
            out = f"{tag}_tf{frac}_recon{RECON}_minus_genefeat"
            parts.append(_spread(out, runs, what, against=(t_runs, "row + W @ features")))
    argv = [PY, "benchmarks/corpus_curve.py", "--x", "steps"]  # all 400 steps: the families in the order given
    argv += ["--backbones", "plain", f"{W}/survset/{_recon_backbones('[012]')}/fold*"]
    names = ["genefeat"] if protocol == "T" else ["genefeat", tag]
    for name in names:
        pattern = f"{W}/survset/pretrain_cvfolds_recon{RECON}_{name}_seed[012]/fold*"
        argv += ["--backbones", GENE_FEATURE_VARIANTS["T" if name == "genefeat" else protocol][2], pattern]
    coverage = f"{tag}_identity_lengths"  # the parts of a gene's identity after pretraining (T: also K's rows)
    folders = [folder[s] for s in range(3)] + ([_recon_backbones(s) for s in range(3)] if protocol == "T" else [])
    argv_cov = [PY, "benchmarks/gene_embedding_coverage.py", "--runs"]
    argv_cov += [f"{W}/survset/{f}/fold{k}" for f in folders for k in range(5)]
    argv_cov += ["--manifest", f"{W}/survset/dev_cohort/manifest.parquet", "--output_dir", f"{W}/survset/{coverage}"]
    parts.append(
        Part(
            f"survset_{coverage}",
            f"the backbones {label}: the length of each part of a gene identity after pretraining, the trained rows",
            argv_cov,
            f"survset/{coverage}/coverage.json",
            needs=[
                f"survset_pretrain_recon_{name}seed{s}_fold{k}"
                for name in ([f"{tag}_", ""] if protocol == "T" else [f"{tag}_"])
                for s in range(3)
                for k in range(5)
            ],
            minutes=3,
            optional=True,
        )
    )
    out = "genefeat_label_free" if protocol == "T" else f"{tag}_label_free"
    parts.append(
        _curve_part(
            out,
            f"the backbones {label}: their held-out numbers beside K's (the same folds and seeds)",
            argv,
            [f"survset_pretrain_recon_{n}_seed{s}_fold{k}" for n in names for s in range(3) for k in range(5)],
        )
    )
    return parts


WIDTHS = {  # protocol -> (width, latents, pretraining seeds); the projection is half the width (the preset's ratio)
    "V": (64, 16, (0, 1, 2)),
    "W": (128, 32, (0,)),  # a one-seed pilot (exploratory)
}


def _wider_overrides(width: int, latents: int) -> tuple[str, ...]:
    return tuple(
        f"model.overrides.{k}={v}"
        for k, v in (("d_latents", width), ("d_input", width), ("num_latents", latents), ("projection_dim", width // 2))
    )


def _wider_folder(width: int, s: int | str) -> str:
    """The ``survset/`` folder of the fold-wise backbones ``width`` wide (``WIDTHS``) of pretraining seed ``s``."""
    return f"pretrain_cvfolds_recon{RECON}_wide{width}_seed{s}"


def _k_proc_folder(tag: str, s: int) -> str:
    """The ``survset/`` folder of K's recipe with the overrides ``tag`` on K's processors, pretraining seed ``s``."""
    return f"pretrain_cvfolds_recon{RECON}_{tag}_seed{s}"


def _on_k_processors(tag: str, what: str, overrides, seeds, minutes: float) -> tuple[dict[int, str], list[Part]]:
    """``({seed: folder}, parts)``: K's recipe with run-config ``overrides`` (``what`` they are) pretrained fold-wise
    for ``seeds`` on protocol K's processors of the same fold and seed (the same tokens), into
    ``pretrain_cvfolds_recon<RECON>_<tag>_seed<s>`` (parts ``survset_pretrain_recon_<tag>_seed<s>_fold<k>``)."""
    folder = {s: _k_proc_folder(tag, s) for s in seeds}
    parts = [
        _fold_backbone(
            f"survset_pretrain_recon_{tag}_seed{s}_fold{k}",
            f"survset_pretrain_recon_seed{s}_fold{k} {what} (its processors)",
            folder[s],
            k,
            f"data.processor_dir={W}/survset/{_recon_backbones(s)}/fold{k}/processor",
            f"seed={s}",
            f"loss.reconstruction={RECON}",
            *overrides,
            minutes=minutes,
            needs=[f"survset_pretrain_recon_seed{s}_fold{k}"],
        )
        for s in seeds
        for k in range(5)
    ]
    return folder, parts


def _wider_backbones(protocol: str, seeds) -> tuple[dict[int, str], list[Part]]:
    """``({seed: folder}, parts)``: protocol ``protocol``'s width (``WIDTHS``) on K's processors
    (:func:`_on_k_processors`)."""
    width, latents, _ = WIDTHS[protocol]
    what = f"{width} wide with {latents} latents"
    return _on_k_processors(f"wide{width}", what, _wider_overrides(width, latents), seeds, 3.5 if width == 64 else 10)


def _wider_parts(protocol: str = "V") -> list[Part]:
    """Optional: protocols V and W (twenty-sixth session): a wider backbone than the recipe's ``bioperceiver_debug``
    (32 wide, 8 latents, a 16-d projection): ``WIDTHS[protocol]``. Protocol K's processors of each fold and seed (the
    same tokens), K's recipe otherwise, the embedding-Cox arms by inner CV at 50% and 25% of the labels for the seed
    pairs (s, s) with K's baselines read back, each run paired with K's run of the same seed pair (``--against``; W's
    also with V's), and the label-free numbers beside K's."""
    width, _, seeds = WIDTHS[protocol]
    tag = f"wide{width}"
    folder, parts = _wider_backbones(protocol, seeds)
    for frac in ("0.5", "0.25"):  # of the labels; 0.5 first: the primary
        runs, k_runs, v_runs = {}, {}, {}
        for s in seeds:
            key, sfx = f"pre{s}_init{s}", _pair_suffix(s, s)
            v_runs[key] = f"survival_cv_labeff_tf{frac}_recon{RECON}_wide64_selcv{sfx}"
            k_runs[key], runs[key], part = _paired_emb_cox(
                frac, s, s, tag, folder[s], f"the {width}-wide backbones", 3.5
            )
            parts.append(part)
        n = len(seeds)
        if n > 1:  # one run's own differences are in its survival_cv.md
            what = f"the {n} seed pairs on the {width}-wide backbones combined (inner CV), {frac} of the labels"
            parts.append(_spread(f"seed_spread_labeff_tf{frac}_recon{RECON}_{tag}_selcv{n}", runs, what))
        what = f"{width} wide - 32 wide (protocol K), paired per seed pair ({n}), {frac} of the labels"
        parts.append(_spread(f"{tag}_tf{frac}_recon{RECON}_minus_plain", runs, what, against=(k_runs, "32 wide")))
        if protocol != "V":
            what = f"{width} wide - 64 wide (protocol V), paired per seed pair ({n}), {frac} of the labels"
            parts.append(_spread(f"{tag}_tf{frac}_recon{RECON}_minus_wide64", runs, what, against=(v_runs, "64 wide")))
    argv = [PY, "benchmarks/corpus_curve.py", "--x", "family"]  # all 400 steps: the families in the order given
    pick = f"[{''.join(map(str, seeds))}]"  # every family on this protocol's seeds: the same folds and seeds
    argv += ["--backbones", "32 wide", f"{W}/survset/{_recon_backbones(pick)}/fold*"]
    spreads = []  # the downstream panel: each family's 3 seed pairs (V only; W's one pair is not alike)
    for p in ("V", "W")[: ("V", "W").index(protocol) + 1]:
        w = WIDTHS[p][0]
        argv += ["--backbones", f"{w} wide", f"{W}/survset/{_wider_folder(w, pick)}/fold*"]
    if protocol == "V":
        for frac in ("0.5", "0.25"):
            for family, run in (("32 wide", ""), ("64 wide", "_wide64")):
                spreads.append(f"seed_spread_labeff_tf{frac}_recon{RECON}{run}_selcv3")
                argv += ["--spread", f"{float(frac):.0%}", family, f"{W}/survset/{spreads[-1]}"]
    parts.append(
        _curve_part(
            f"{tag}_label_free",
            f"the {width}-wide backbones: their held-out numbers beside K's (the same folds and seeds)"
            + (", and the embedding's downstream differences" if spreads else ""),
            argv,
            [f"survset_pretrain_recon_{tag}_seed{s}_fold{k}" for s in seeds for k in range(5)]
            + [f"survset_{sp}" for sp in spreads],
        )
    )
    return parts


FRESH_SEEDS = (3, 4)  # protocol X: pretraining seeds no K or V backbone had before the twenty-seventh session


def _fresh_seed_parts() -> list[Part]:
    """Optional: protocol X (twenty-seventh session): two fresh seed pairs, (3, 3) and (4, 4), for protocol V (64
    wide) and for protocol K beside it. K's reconstruction recipe and V's on its processors at pretraining seeds 3
    and 4 (20 backbones), the embedding-Cox arms by inner CV at 50% and 25% of the labels (K's with the classical
    baselines read back from K's (0, 0) run, V's from K's run of the same pair), V - K and V alone on the fresh pairs
    and on all 5 pairs, K's 5 pairs combined, and the label-free numbers of the fresh backbones and of all 25."""
    width = WIDTHS["V"][0]
    tag = f"wide{width}"
    override = f"loss.reconstruction={RECON}"
    parts = _variant_backbones("recon", _recon_backbones, override, override, seeds=FRESH_SEEDS)
    folder, wider = _wider_backbones("V", FRESH_SEEDS)
    parts += wider
    spreads: dict[str, dict[str, str]] = {}  # label-free plots' downstream panels: family -> fraction -> spread
    for frac in ("0.5", "0.25"):  # of the labels; 0.5 first: the primary
        first = f"survival_cv_labeff_tf{frac}_recon{RECON}_selcv"  # K's (0, 0) run: the classical baselines
        k_runs, v_runs = {}, {}
        for s in (*range(3), *FRESH_SEEDS):
            key, sfx = f"pre{s}_init{s}", _pair_suffix(s, s)
            k_runs[key], v_runs[key] = first + sfx, f"survival_cv_labeff_tf{frac}_recon{RECON}_{tag}_selcv{sfx}"
            if s in FRESH_SEEDS:
                parts.append(
                    Part(
                        k_runs[key],
                        f"embedding-Cox arms by inner CV on the reconstruction backbones of seed {s}, init seed {s}, "
                        f"{frac} of the labels (baselines read back from the (0, 0) run)",
                        _emb_cox(k_runs[key], _recon_backbones(s), frac, s, (first,), extra=SELECT_CV),
                        f"survset/{k_runs[key]}/survival_cv.json",
                        needs=[first, *_variant_backbone_parts("recon", s)],
                        minutes=2,
                        optional=True,
                    )
                )
                parts.append(_paired_emb_cox(frac, s, s, tag, folder[s], f"the {width}-wide backbones", 3.5)[2])
        fresh = [f"pre{s}_init{s}" for s in FRESH_SEEDS]
        pick = {"fresh": fresh, "5": list(k_runs)}
        for group, keys in pick.items():
            k_sub, v_sub = ({key: runs[key] for key in keys} for runs in (k_runs, v_runs))
            pairs = f"the {len(keys)} {'fresh ' if group == 'fresh' else ''}seed pairs"
            what = f"{width} wide - 32 wide (protocol K), paired per seed pair: {pairs}, {frac} of the labels"
            parts.append(
                _spread(f"{tag}_tf{frac}_recon{RECON}_minus_plain_{group}", v_sub, what, against=(k_sub, "32 wide"))
            )
            for family, runs, extra in (("64 wide", v_sub, ()), ("32 wide", k_sub, EMB_ENSEMBLE)):
                if group == "fresh" and family == "32 wide":
                    continue  # K's fresh pairs alone are read through V - K only
                out = (
                    f"seed_spread_labeff_tf{frac}_recon{RECON}{'_' + tag if family == '64 wide' else ''}_selcv_{group}"
                )
                parts.append(
                    _spread(
                        out,
                        runs,
                        f"{pairs} on the {family} backbones combined (inner CV), {frac} of the labels",
                        *extra,
                    )
                )
                if group == "5":
                    spreads.setdefault(family, {})[frac] = out
    for group, seeds in (("fresh", FRESH_SEEDS), ("5", (*range(3), *FRESH_SEEDS))):
        pick = f"[{''.join(map(str, seeds))}]"
        argv = [PY, "benchmarks/corpus_curve.py", "--x", "family"]
        argv += ["--backbones", "32 wide", f"{W}/survset/{_recon_backbones(pick)}/fold*"]
        argv += ["--backbones", f"{width} wide", f"{W}/survset/{_wider_folder(width, pick)}/fold*"]
        needs = [
            f"survset_pretrain_recon{'_' + tag if w else ''}_seed{s}_fold{k}"
            for w in (0, 1)
            for s in seeds
            for k in range(5)
        ]
        if group == "5":
            for family in ("32 wide", "64 wide"):
                for frac, out in spreads[family].items():
                    argv += ["--spread", f"{float(frac):.0%}", family, f"{W}/survset/{out}"]
                    needs.append(f"survset_{out}")
        parts.append(
            _curve_part(
                f"{tag}_label_free_{group}",
                f"the {width}-wide backbones of seeds {', '.join(map(str, seeds))}: their held-out numbers beside K's"
                + (", and the embedding's downstream differences over the 5 seed pairs" if group == "5" else ""),
                argv,
                needs,
            )
        )
    return parts


def _generalization_gap_part() -> Part:
    """Optional: protocol Y (twenty-seventh session, exploratory, label-free): pretraining's own evaluation on held-out
    and on as many training patients, from the last checkpoint of the recipe's backbones at 32 / 64 / 128 wide, at
    800 and 1,600 steps, and on the 25% and 50% corpora (seeds 0-2; 128 wide: seed 0)."""
    families = {  # label -> (backbone folder of a seed, seeds, the parts that pretrain them)
        "32 wide": (_recon_backbones, range(3), "survset_pretrain_recon_seed{s}_fold{k}"),
        "64 wide": (lambda s: _wider_folder(64, s), range(3), "survset_pretrain_recon_wide64_seed{s}_fold{k}"),
        "128 wide": (lambda s: _wider_folder(128, s), range(1), "survset_pretrain_recon_wide128_seed{s}_fold{k}"),
        **{
            f"{n} steps": (
                lambda s, n=n: _steps_backbones(n, s),
                range(3),
                f"survset_pretrain_recon_steps{n}" + "_seed{s}_fold{k}",
            )
            for n in ("800", "1600")
        },
        **{
            f"{float(c):.0%} corpus": (
                lambda s, c=c: _corpus_backbones(c, s),
                range(3),
                f"survset_pretrain_recon_corpus{c}" + "_seed{s}_fold{k}",
            )
            for c in CORPUS
        },
    }
    globs, needs = {}, []
    for label, (folder, seeds, part) in families.items():
        pick = f"[{''.join(map(str, seeds))}]"  # every seed's folder: a glob
        globs[label] = f"{folder(pick)}/fold*"
        needs += [part.format(s=s, k=k) for s in seeds for k in range(5)]
    what = "the objective on training and held-out patients: width, steps and corpus size (label-free)"
    return _gap_part("generalization_gap", what, globs, needs, minutes=15)


def _gap_part(out: str, what: str, families: dict[str, str], needs, minutes: float = 0.5) -> Part:
    """Optional: ``benchmarks/generalization_gap.py`` over ``families`` (label -> a glob of run folders under
    ``survset/``) into ``survset/<out>``."""
    # seed 0 for every run, as recorded (the script's default became each run's own seed in the thirtieth session)
    argv = [PY, "benchmarks/generalization_gap.py", "--seed", "0"]
    for label, pattern in families.items():
        argv += ["--backbones", label, f"{W}/survset/{pattern}"]
    return Part(
        f"survset_{out}",
        what,
        [*argv, "--output_dir", f"{W}/survset/{out}"],
        f"survset/{out}/generalization_gap.json",
        needs=list(needs),
        minutes=minutes,
        optional=True,
    )


DROPOUT = "0.1"  # protocol Z: model.overrides.hidden_dropout, one value fixed in advance

# Protocol AA (twenty-eighth session): one-seed pilots of regularisers for the contrastive part, each one setting of
# K's recipe at one value fixed in advance: tag -> (its name, run-config overrides, minutes per backbone).
REGULARISERS: dict[str, tuple[str, tuple[str, ...], float]] = {
    "subset0.25": ("views keeping 0.25 of the genes", ("loss.subset_fraction=0.25",), 2),
    "wd0.5": ("weight decay 0.5", ("optim.weight_decay=0.5",), 2),
    "fixedtemp": ("a fixed temperature 0.1", ("loss.learnable_temperature=false",), 2),
    "steps200": ("200 steps", ("optim.max_steps=200",), 1),
}


def _pilot_parts(
    tag: str, name: str, overrides: tuple[str, ...], minutes: float, k_label: str, versus: str, backbone_what: str
) -> list[Part]:
    """A one-seed pilot of K's recipe with run-config ``overrides`` (the setting ``name``, e.g. "weight decay 0.5";
    ``backbone_what`` describes the backbones) on K's processors of seed 0 (:func:`_on_k_processors`): the
    embedding-Cox runs of pair (0, 0) at 50% and 25% of the labels paired with K's (labelled ``k_label``; ``versus``
    names K's setting in the descriptions), and the objective's gap beside K's seed-0 backbones."""
    folders, parts = _on_k_processors(tag, backbone_what, overrides, (0,), minutes)
    folder = folders[0]
    for frac in ("0.5", "0.25"):
        k_run, run, part = _paired_emb_cox(frac, 0, 0, tag, folder, f"the backbones with {name}", 2)
        parts.append(part)
        what = f"{name} - {versus} (protocol K), pair (0, 0), {frac} of the labels"
        spread = _spread(
            f"{tag}_tf{frac}_recon{RECON}_minus_plain",
            {"pre0_init0": run},
            what,
            against=({"pre0_init0": k_run}, k_label),
        )
        parts.append(spread)
    families = {k_label: f"{_recon_backbones(0)}/fold*", name: f"{folder}/fold*"}
    needs = [f"survset_pretrain_recon{t}_seed0_fold{k}" for t in ("", f"_{tag}") for k in range(5)]
    what = f"the objective on training and held-out patients, {name} beside {versus} (seed 0, label-free)"
    parts.append(_gap_part(f"{tag}_generalization_gap", what, families, needs))
    return parts


def _dropout_pilot_parts() -> list[Part]:
    """Optional: protocol Z (twenty-seventh session, a one-seed pilot, :func:`_pilot_parts`): K's recipe with dropout
    on the backbone's residual branches (``model.overrides.hidden_dropout``)."""
    overrides = (f"model.overrides.hidden_dropout={DROPOUT}",)
    name, what = f"dropout {DROPOUT}", f"with hidden_dropout {DROPOUT}"
    return _pilot_parts(f"dropout{DROPOUT}", name, overrides, 2, "no dropout", "none", what)


def _regulariser_pilot_parts() -> list[Part]:
    """Optional: protocol AA (twenty-eighth session): a one-seed pilot (:func:`_pilot_parts`) of each of
    ``REGULARISERS``, then the objective's gap of all four beside K's seed-0 backbones in one table."""
    parts, families, needs = [], {"K": f"{_recon_backbones(0)}/fold*"}, []
    for tag, (name, overrides, minutes) in REGULARISERS.items():
        parts += _pilot_parts(tag, name, overrides, minutes, "K", "K's recipe", f"with {name}")
        families[name] = f"{_k_proc_folder(tag, 0)}/fold*"
        needs += [f"survset_pretrain_recon_{tag}_seed0_fold{k}" for k in range(5)]
    needs += [f"survset_pretrain_recon_seed0_fold{k}" for k in range(5)]
    what = "the objective on training and held-out patients, the four regularisers of protocol AA beside K (seed 0)"
    parts.append(_gap_part("regularisers_generalization_gap", what, families, needs, minutes=2))
    return parts


CONFIRMED = "wd0.5"  # protocol AC: AB's rule chose none of AA's pilots; AC tests the one that led on fresh pairs
CONFIRM_SEEDS = (1, 2, 3, 4)  # the fresh pretraining seeds (pair (0, 0) chose the setting, so it is not fresh)


def _confirmation_parts(tag: str = CONFIRMED, seeds=CONFIRM_SEEDS) -> list[Part]:
    """Optional: protocol AC (twenty-eighth session): the regulariser ``tag`` of ``REGULARISERS`` on K's processors
    of the fresh ``seeds`` (:func:`_on_k_processors`), the embedding-Cox runs of pairs (s, s) at 50% and 25% of the
    labels paired with K's, and the differences from K and on their own over the fresh pairs and over all of them
    with the pilot's pair (0, 0)."""
    name, overrides, minutes = REGULARISERS[tag]
    folder, parts = _on_k_processors(tag, f"with {name}", overrides, seeds, minutes)
    for frac in ("0.5", "0.25"):  # of the labels; 0.5 first: the primary
        k_runs, runs = {}, {}
        key0 = "pre0_init0"  # the pilot's pair (AA)
        k_runs[key0], runs[key0] = _paired_run_names(frac, 0, 0, tag)
        for s in seeds:
            key = f"pre{s}_init{s}"
            k_runs[key], runs[key], part = _paired_emb_cox(frac, s, s, tag, folder[s], f"the backbones with {name}", 2)
            parts.append(part)
        for group, keys in (("fresh", [f"pre{s}_init{s}" for s in seeds]), ("all", list(runs))):
            sub, k_sub = ({key: r[key] for key in keys} for r in (runs, k_runs))
            pairs = f"the {len(keys)} {'fresh ' if group == 'fresh' else ''}seed pairs, {frac} of the labels"
            what = f"{name} - K's recipe (protocol K), paired per seed pair: {pairs}"
            parts.append(_spread(f"{tag}_tf{frac}_recon{RECON}_minus_plain_{group}", sub, what, against=(k_sub, "K")))
            what = f"{pairs} on the backbones with {name} combined (inner CV)"
            parts.append(_spread(f"seed_spread_labeff_tf{frac}_recon{RECON}_{tag}_selcv_{group}", sub, what))
    return parts


# In run order. Minutes as measured on the shared 2-core VM on 2026-12-03 with other jobs running (load 4-8): about
# 2.5 h in all there; on idle cores the parts ran about twice as fast.
PARTS: list[Part] = [
    Part(
        "survset_cohort",
        "SurvSet development cohorts + GSE7390 -> one manifest (shared gene vocabulary)",
        [PY, "-m", "bioperceiver.data.recipes.survset", "--output_dir", f"{W}/survset/dev_cohort"],
        "survset/dev_cohort/manifest.parquet",
        minutes=1.5,
    ),
    Part(
        "survset_pretrain",
        "omics <-> clinical + masked-gene-subset views, 400 steps of 128 (development cohorts only)",
        _pretrain(
            SURVSET_RECIPE,
            f"{W}/survset/pretrain",
            f"data.manifest={W}/survset/dev_cohort/manifest.parquet",
        ),
        "survset/pretrain/final/config.json",
        needs=["survset_cohort"],
        minutes=5,
    ),
    Part(
        "survival_cv",
        "each development cohort, 5 folds: Cox (clinical), Cox (clinical + PCs), RSF, BioPerceiver random/pretrained",
        _survival(f"{W}/survset/survival_cv", f"{W}/survset/cv_cohort"),
        "survset/survival_cv/survival_cv.json",
        needs=["survset_pretrain"],
        minutes=22,
    ),
    Part(
        "survival_external",
        "the external SurvSet cohorts, evaluation only (the development cohorts' fixed settings)",
        _survival(
            f"{W}/survset/survival_external",
            f"{W}/survset/external_cohort",
            *EXTERNAL_COHORTS,
        ),
        "survset/survival_external/survival_cv.json",
        needs=["survset_pretrain"],
        minutes=15,
    ),
    Part(
        "survset_fold_manifests",
        "one pretraining manifest per CV fold, that fold's test patients held out of pretraining",
        [
            PY,
            "benchmarks/survival_cv.py",
            "--folds",
            "5",
            "--data_dir",
            f"{W}/survset/cv_cohort",
            "--output_dir",
            f"{W}/survset/survival_cv_foldwise",
            "--write_fold_manifests",
            f"{W}/survset/dev_cohort/manifest.parquet",
        ],
        "survset/dev_cohort/manifest_cvfold4.parquet",
        # the pretraining manifest; survival_cv.py builds (or reuses) the CV cohort in --data_dir itself, so the
        # whole-cohort survival_cv part is not needed first
        needs=["survset_cohort"],
        minutes=0.5,
    ),
    *(
        _fold_backbone(
            f"survset_pretrain_fold{k}",
            f"the survset_pretrain recipe without CV fold {k}'s test patients",
            "pretrain_cvfolds",
            k,
            optional=False,
        )
        for k in range(5)
    ),
    Part(
        "survival_cv_foldwise",
        "the embedding-as-Cox-features arms with each fold's own backbone (no test patient seen in pretraining)",
        _survival(
            f"{W}/survset/survival_cv_foldwise",
            f"{W}/survset/cv_cohort",
            pretrained=f"{W}/survset/pretrain_cvfolds/fold{{fold}}/final",  # {fold}: survival_cv fills it per fold
            arms=EMB_ARMS,
        ),
        "survset/survival_cv_foldwise/survival_cv.json",
        needs=[f"survset_pretrain_fold{k}" for k in range(5)],
        minutes=6,
    ),
    Part(
        "padchest_cohort",
        "all PadChest studies -> one manifest with the demo's patient hash split",
        [PY, "-m", "bioperceiver.data.recipes.padchest", "--output_dir", f"{W}/padchest/cohort"],
        "padchest/cohort/manifest.parquet",
        minutes=7,
    ),
    Part(
        "padchest_pretrain",
        "report <-> study fields + report <-> report halves (multiview) on the train split, 3,000 steps of 128",
        _pretrain(
            "pretrain/configs/padchest.yaml",
            f"{W}/padchest/pretrain",
            f"data.manifest={W}/padchest/cohort/manifest.parquet",
            f"data.processor_dir={W}/padchest/model",
        ),
        "padchest/pretrain/final/config.json",
        needs=["padchest_cohort"],
        minutes=16,
    ),
    Part(
        "label_efficiency",
        "findings at 1/10/100% of a 2,000-patient pool, 3 seeds: pretrained vs random init (lr chosen on validation) "
        "vs TF-IDF + LR",
        [
            PY,
            "benchmarks/label_efficiency.py",
            "--manifest",
            f"{W}/padchest/cohort/manifest.parquet",
            "--pretrained_dir",
            f"{W}/padchest/pretrain/final",
            "--processor_dir",
            f"{W}/padchest/model",
            "--work_dir",
            f"{W}/padchest/label_efficiency",
            "--lrs",  # the full arms' learning rate chosen on validation, as TF-IDF's C is
            *("3e-4", "1e-3", "3e-3"),
        ],
        "padchest/label_efficiency/label_efficiency.json",
        needs=["padchest_pretrain"],
        minutes=30,
    ),
    Part(
        "text_encoders",
        "demo findings: from-scratch text vs MiniLM frozen / top-2 layers (seeds 0-2 / 0-1) vs TF-IDF; zero-shot check",
        [
            PY,
            "benchmarks/text_encoders.py",
            "--work_dir",
            f"{W}/text_encoders",
            "--pretrained_dir",  # the zero-shot check's demo backbone: pretrained into the evidence folder too
            f"{W}/text_encoders/pretrain/final",
            "--seeds",
            "0",
            "1",
            "2",
            "--encoder_seeds",
            "0",
            "1",
            "--output",
            f"{W}/text_encoders/text_encoders.json",
        ],
        "text_encoders/text_encoders.json",
        minutes=45,
    ),
    *_seed_parts(),
    *_decorrelation_parts(),
    *_external_ensemble_parts(),
    *_five_seed_parts(),
    *_non_test_half_parts(),
    *_fusion_parts(),
    *_gene_map_parts(),
    *_deviation_parts(),
    *_reconstruction_parts(),
    *_inner_cv_parts(),
    *_inner_cv_external_parts(),
    *_corpus_parts(),
    *_steps_parts(),
    *_step_choice_parts(),
    *_gene_feature_parts("T"),
    *_gene_feature_parts("U"),
    *_wider_parts("V"),
    *_wider_parts("W"),
    *_fresh_seed_parts(),
    _generalization_gap_part(),
    *_dropout_pilot_parts(),
    *_regulariser_pilot_parts(),
    *_confirmation_parts(),
]


def _fill(value: str, work: Path) -> str:
    for key, filled in (("{work}", str(work)), ("{python}", sys.executable), ("{root}", str(ROOT))):
        value = value.replace(key, filled)  # not str.format: an argument may hold other braces
    return value


def is_done(part: Part, work: Path) -> bool:
    return (work / part.result).exists()


def record_part(log_path: Path, name: str, entry: dict) -> dict:
    """Write part ``name``'s ``entry`` into ``log_path`` and return the whole log as it now stands on disk. The file
    is re-read under an exclusive lock (``<log>.lock``) and replaced atomically, so evidence processes running side by
    side keep each other's entries (each used to write back the log it read at its start, dropping the parts another
    process finished meanwhile)."""
    import fcntl

    with open(log_path.with_name(log_path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        log = json.loads(log_path.read_text()) if log_path.exists() else {}
        log[name] = entry
        tmp = log_path.with_name(f"{log_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(log, indent=1) + "\n")
        os.replace(tmp, log_path)
    return log


def run_part(part: Part, work: Path, log: dict, installed: dict | None = None) -> bool:
    """Runs one part; its log entry records the command, wall time, exit status and ``installed``
    (``environment()``)."""
    argv = [_fill(a, work) for a in part.argv]
    # a pretraining run: resume an interrupted one from its last checkpoint; a finished one that --redo names is
    # trained again from scratch (resuming it would only re-evaluate its last checkpoint)
    if "--overwrite_output_dir" in argv and not is_done(part, work):
        out = Path(next(a.split("=", 1)[1] for a in argv if a.startswith("output_dir=")))
        if any((out / "checkpoints").glob("checkpoint-*")):
            argv[argv.index("--overwrite_output_dir") : argv.index("--overwrite_output_dir") + 1] = [
                "--resume",
                "latest",
            ]
    logger.info("%s: %s", part.name, " ".join(argv))
    start = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    rc = subprocess.call(argv, cwd=ROOT, env=env)
    seconds = time.perf_counter() - start
    log[part.name] = {"argv": argv, "seconds": round(seconds, 1), "returncode": rc, "finished": time.time()}
    if installed is not None:
        log[part.name]["environment"] = installed
    if rc == 0 and not is_done(part, work):
        logger.error("%s exited 0 but did not write %s", part.name, part.result)
        return False
    return rc == 0


def summary(work: Path, log: dict) -> str:
    """``EVIDENCE.md``: every part, whether it is done, the command that made it and its wall time, followed by the
    markdown tables the parts write beside their results (``<result>.md``: survival_cv's per-cohort table)."""
    lines = [
        "# Evidence table (benchmarks/evidence.py)",
        "",
        "| part | what | result | command | wall time | environment |",
        "|---|---|---|---|---|---|",
    ]
    tables = []
    for part in PARTS:
        entry = log.get(part.name, {})
        done = is_done(part, work)
        cmd = " ".join("python" if a == sys.executable else a for a in entry.get("argv", []))
        wall = f"{entry['seconds'] / 60:.1f} min" if "seconds" in entry else ""
        state = part.result if done else "optional, not run" if part.optional else "not run"
        env = environment_text(entry.get("environment")) if entry else ""
        lines.append(f"| {part.name} | {part.what} | {state} | `{cmd}` | {wall} | {env} |")
        table = (work / part.result).with_suffix(".md")
        if done and table.exists():
            tables += ["", f"## {part.name}", "", table.read_text().strip()]
    hosts = distinct_hosts(log)
    if len(hosts) > 1:
        lines[1:1] = [
            "",
            f"**These parts ran on {len(hosts)} hosts** ({'; '.join(hosts)}). Runs agree bit for bit only on the "
            "same CPU kernels and thread count: compare a part with a re-run of it on the same host.",
        ]
    return "\n".join(lines + tables) + "\n"


def distinct_hosts(log: dict) -> list[str]:
    """The hosts the log's parts ran on (:func:`host_text`), in first-seen order; parts logged before hosts were
    recorded are left out."""
    seen = []
    for entry in log.values():
        facts = (entry.get("environment") or {}).get("host")
        if facts and host_text(facts) not in seen:
            seen.append(host_text(facts))
    return seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", type=Path, default=ROOT / "outputs" / "evidence")
    parser.add_argument("--only", nargs="+", default=None, help="run only these parts")
    parser.add_argument("--redo", nargs="+", default=[], help="run these parts even when they are done")
    parser.add_argument("--list", action="store_true", help="list the parts and exit")
    parser.add_argument(
        "--with_optional",
        action="store_true",
        help="also run the optional parts (more SurvSet seeds ~80 min, the SurvSet lr grid, ablations, wide & "
        "deep and external runs ~3 h); --only runs any part it names",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    names = [p.name for p in PARTS]
    for name in [*(args.only or []), *args.redo]:
        if name not in names:
            parser.error(f"unknown part {name!r}; the parts are {names}")
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "evidence_log.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    if args.list:
        for p in PARTS:
            done = "done" if is_done(p, work) else f"~{p.minutes:g} min" + (" opt" if p.optional else "")
            print(f"{p.name:22s} {done:10s} {p.what}\n{'':33s}{' '.join(_fill(a, work) for a in p.argv)}")
        return 0
    todo = [
        p
        for p in PARTS
        if (p.name in args.only if args.only else args.with_optional or not p.optional or p.name in args.redo)
    ]
    todo = [p for p in todo if p.name in args.redo or not is_done(p, work)]
    logger.info("parts to run: %s (~%g min)", [p.name for p in todo], sum(p.minutes for p in todo))
    left = [p for p in PARTS if p.optional and p not in todo and not is_done(p, work)]
    if left and not args.only:
        logger.info(
            "%d optional parts not run (~%g min; --with_optional runs them)", len(left), sum(p.minutes for p in left)
        )
    env = environment()
    if env["lock"] is None:
        logger.warning("no lock file (%s): the packages behind these numbers are not recorded against one", LOCK)
    elif env["off_lock"]:
        logger.warning(
            "%d installed package(s) differ from %s (make setup installs it): %s",
            len(env["off_lock"]),
            LOCK.name,
            ", ".join(f"{n} {v['installed']} (lock {v['locked']})" for n, v in sorted(env["off_lock"].items())[:10]),
        )
    other = [h for h in distinct_hosts(log) if h != host_text(env["host"])]
    if other and todo:
        logger.warning(
            "finished parts in %s ran on another host (%s; this one: %s): their numbers may differ from a re-run "
            "here in the last digits (CPU kernels and thread counts sum in different orders)",
            work,
            "; ".join(other),
            host_text(env["host"]),
        )
    failed = []
    for part in tqdm(todo, desc="evidence", unit="part"):
        missing = [n for n in part.needs if not is_done(next(p for p in PARTS if p.name == n), work)]
        if missing:
            logger.error("%s needs %s first; skipped", part.name, missing)
            failed.append(part.name)
            continue
        ok = run_part(part, work, log, env)
        log = record_part(log_path, part.name, log[part.name])
        if not ok:
            failed.append(part.name)
    (work / "EVIDENCE.md").write_text(summary(work, log))
    logger.info("summary: %s", work / "EVIDENCE.md")
    if failed:
        logger.error("parts that did not finish: %s (re-run the same command to resume them)", failed)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
