"""Federated pretraining and finetuning runs from manifests: what ``pretrain/run_federated.py`` and
``finetune/run_federated.py`` call.

Both: sites from ``--site_column`` of one manifest or from ``--site_manifests`` (one per site), patient-level
splits, processors fitted from the sites' statistics (:mod:`.processors`), one :class:`SiteClient` per site with
data, the same model builder and the objective, then :func:`run_federated`. The output folder holds the model
(``save_pretrained``), its processors, ``federated_history.json``, ``federated_metrics.png``, the round checkpoints,
``all_results.json`` and a model card stating what each site contributed. Nothing written contains a sample or
patient id.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.collator import BioPerceiverCollator
from ..data.dataset import ManifestDataset
from ..data.errors import check_on_error
from ..data.manifest import Manifest, is_missing, read_manifest
from ..data.processing import BioPerceiverProcessor, load_processor_settings
from ..data.splits import assign_splits
from ..factory import create_model
from ..modalities.registry import get_modality
from .card import federated_card
from .client import LocalTrainingConfig, SiteClient
from .processors import fit_processors_federated
from .simulation import ROUNDS_DIR, FederatedConfig, run_federated
from .sites import read_site_manifests, site_contributions, split_sites, union_modalities

logger = logging.getLogger(__name__)


@dataclass
class FederatedArguments:
    """Sites, rounds and local training of a federated run (``--help`` lists them)."""

    output_dir: str = field(metadata={"help": "where the model, processors, metrics and round checkpoints go"})
    site_column: str = field(
        default="meta_site", metadata={"help": "manifest column naming each row's site (e.g. meta_source)"}
    )
    site_manifests: list[str] | None = field(
        default=None, metadata={"help": "one manifest per site instead of a site column: name=path or path"}
    )
    strategy: str = field(default="fedavg", metadata={"help": "fedavg | fedprox"})
    proximal_mu: float = field(default=0.0, metadata={"help": "FedProx proximal weight mu"})
    rounds: int = field(default=5, metadata={"help": "federated rounds"})
    local_epochs: int = field(default=1, metadata={"help": "local passes over a site's data per round"})
    local_steps: int | None = field(default=None, metadata={"help": "local steps per round (overrides epochs)"})
    fraction_fit: float = field(default=1.0, metadata={"help": "fraction of sites training each round"})
    fraction_evaluate: float = field(default=1.0, metadata={"help": "fraction of sites evaluating each round"})
    batch_size: int = field(default=16, metadata={"help": "local batch size"})
    learning_rate: float = field(default=1e-3, metadata={"help": "local learning rate"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw | sgd (state reset every round)"})
    weight_decay: float = 0.0
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "local gradient clipping (None: off)"})
    clip_update_norm: float | None = field(
        default=None, metadata={"help": "clip each site's model update to this L2 norm before it leaves the site"}
    )
    noise_multiplier: float = field(
        default=0.0, metadata={"help": "Gaussian noise std on the clipped update, in units of clip_update_norm"}
    )
    seed: int = 0
    resume: bool = field(default=False, metadata={"help": "continue from the latest round checkpoint"})

    def federated_config(self) -> FederatedConfig:
        return FederatedConfig(
            strategy=self.strategy,
            proximal_mu=self.proximal_mu,
            rounds=self.rounds,
            fraction_fit=self.fraction_fit,
            fraction_evaluate=self.fraction_evaluate,
            seed=self.seed,
        )

    def local_config(self) -> LocalTrainingConfig:
        return LocalTrainingConfig(
            local_epochs=self.local_epochs,
            local_steps=self.local_steps,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            optimizer=self.optimizer,
            weight_decay=self.weight_decay,
            clip_update_norm=self.clip_update_norm,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            seed=self.seed,
        )


@dataclass
class FederatedPretrainArguments:
    """Data and model of federated contrastive pretraining."""

    manifest: str | None = field(default=None, metadata={"help": "one manifest with a site column"})
    build_demo_cohort: bool = field(default=False, metadata={"help": "build the demo cohort at --manifest if missing"})
    processor_settings: str | None = field(default=None, metadata={"help": "YAML of processor/embedder settings"})
    modalities: list[str] | None = field(default=None, metadata={"help": "restrict to these modality columns"})
    preset: str = field(default="bioperceiver_debug", metadata={"help": "model preset"})
    loss: str = field(default="clip", metadata={"help": "clip | siglip | multiview"})
    fused_view: bool = True
    modality_dropout: float = 0.0
    on_error: str = field(default="skip", metadata={"help": "raise | skip_modality | skip_sample (= skip)"})
    eval_split: str = "validation"
    overwrite_output_dir: bool = False


# ---- sites and processors -----------------------------------------------------------------------------------------
def load_sites(
    manifest: str | None, site_column: str, site_manifests: list[str] | None, build_demo_cohort: bool = False
) -> dict[str, Manifest]:
    """Sites with patient-level splits, from one manifest's site column or one manifest per site."""
    if site_manifests:
        return read_site_manifests(site_manifests)
    if not manifest:
        raise ValueError("give --manifest (with --site_column) or --site_manifests")
    path = Path(manifest)
    if not path.exists() and build_demo_cohort:
        from ..data.recipes.demo import build_demo_cohort as build

        path = build(path.parent, seed=0)
    return split_sites(assign_splits(read_manifest(path)), site_column)


def federated_processor(
    sites: dict[str, Manifest], settings_path: str | None, modalities: list[str] | None
) -> tuple[BioPerceiverProcessor, dict]:
    """Processors for every modality of any site (or ``modalities``), fitted from the sites' statistics."""
    settings, embedders = load_processor_settings(Path(settings_path) if settings_path else None)
    settings = settings.processors if hasattr(settings, "processors") else settings
    kinds = union_modalities(sites)
    if modalities:
        unknown = sorted(set(modalities) - set(kinds))
        if unknown:
            raise ValueError(f"--modalities {unknown} are not modality columns of any site ({list(kinds)})")
        kinds = {k: v for k, v in kinds.items() if k in modalities}
    procs = {}
    for name, kind in kinds.items():
        s = dict(settings.get(name, {}))
        s.pop("kind", None)
        procs[name] = get_modality(kind).processor(name, **s)
    processor = BioPerceiverProcessor(procs)
    return fit_processors_federated(processor, sites, split="train"), embedders


def prepare_output_dir(output_dir: str | os.PathLike, resume: bool, overwrite: bool) -> Path:
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()) and not resume:
        if not overwrite:
            raise ValueError(
                f"output_dir {out} is not empty: pass --resume true to continue its rounds, "
                "--overwrite_output_dir true to start over, or another --output_dir"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _json(obj) -> Any:
    if isinstance(obj, (np.generic,)):
        return obj.item()
    raise TypeError(type(obj).__name__)


# ---- pretraining --------------------------------------------------------------------------------------------------
def pretraining_objective(model, batch) -> torch.Tensor:
    return model(inputs=batch["inputs"], patient_id=batch["patient_id"])["loss"]


def run_federated_pretraining(fed: FederatedArguments, args: FederatedPretrainArguments) -> dict[str, Any]:
    """Federated contrastive pretraining of a backbone over the sites; returns ``all_results``."""
    from ..training.pretraining import ContrastivePretrainer

    on_error = check_on_error(args.on_error)
    out = prepare_output_dir(fed.output_dir, fed.resume, args.overwrite_output_dir)
    sites = load_sites(args.manifest, fed.site_column, fed.site_manifests, args.build_demo_cohort)
    processor, embedders = federated_processor(sites, args.processor_settings, args.modalities)
    modalities = processor.model_modalities(embedders)

    def model_fn():
        torch.manual_seed(fed.seed)  # every site builds the same initial model
        backbone = create_model(args.preset, modalities=modalities)
        return ContrastivePretrainer(backbone, loss=args.loss, fused_view=args.fused_view)

    local = fed.local_config()
    clients = []
    for name, m in sites.items():
        train, held = m.split("train"), m.split(args.eval_split)
        if len(train) == 0:
            logger.warning("site %s has no training rows: it takes no part", name)
            continue
        collate = BioPerceiverCollator(
            processor.modalities, modality_dropout=args.modality_dropout, on_error=on_error, seed=fed.seed
        )
        clients.append(
            SiteClient(
                name,
                ManifestDataset.from_manifest(train, processor, train=True, seed=fed.seed, on_error=on_error),
                model_fn,
                pretraining_objective,
                collate_fn=collate,
                eval_dataset=ManifestDataset.from_manifest(held, processor, on_error=on_error) if len(held) else None,
                config=local,
            )
        )
    initial = model_fn()
    result = run_federated(clients, initial.state_dict(), fed.federated_config(), output_dir=out, resume=fed.resume)
    initial.load_state_dict(result.state)
    contributions = site_contributions(sites)
    initial.model.save_pretrained(out)
    processor.save_pretrained(out)
    results = {
        "mode": "pretraining",
        "rounds": len(result.history),
        "final_train_loss": result.history[-1]["train"].get("train_loss") if result.history else None,
        "final_eval_loss": result.history[-1].get("eval", {}).get("eval_loss") if result.history else None,
        "sites": contributions,
        "federated": fed.federated_config().to_dict(),
        "local": local.to_dict(),
    }
    (out / "all_results.json").write_text(json.dumps(results, indent=1, default=_json) + "\n")
    federated_card(
        "pretraining", contributions, fed.federated_config(), local, results, model_config=initial.model.config
    ).save(out / "README.md")
    logger.info("federated pretraining done: %s", out)
    return results


# ---- finetuning ---------------------------------------------------------------------------------------------------
def finetuning_objective(model, batch) -> torch.Tensor:
    return model(**batch).loss


def run_federated_finetuning(fed: FederatedArguments, model_args, data_args) -> dict[str, Any]:
    """Federated finetuning of a task head (and backbone, per ``--finetuning_mode``) over the sites that hold the
    task's labels; test metrics with patient-bootstrap CIs on every site's test split (each computed where the
    data is; in simulation also pooled over the sites' test patients)."""
    from ..tasks import Task
    from ..training.arguments import task_settings
    from ..training.finetune_loop import build_model, rows_with_labels
    from ..training.finetuning import configure_finetuning, merge_lora, processor_folder
    from ..training.tasks import ProcessedDataset, TaskCollator, labelled_records, predict

    on_error = check_on_error(data_args.on_error)
    out = prepare_output_dir(fed.output_dir, fed.resume, data_args.overwrite_output_dir)
    sites = load_sites(data_args.manifest, fed.site_column, fed.site_manifests, data_args.build_demo_cohort)
    task = Task.from_dict(task_settings(model_args, data_args))
    labelled_sites = {}
    for name, m in sites.items():
        if all(c in m.table for c in task.columns) and (~m.table[task.columns[0]].map(is_missing)).any():
            labelled_sites[name] = m
        else:
            logger.info("site %s holds no %s label: it takes no part in finetuning", name, task.columns)
    if not labelled_sites:
        raise ValueError(f"no site holds the task's label columns {task.columns}")
    sites = labelled_sites
    # the task's label definition (class set, time range) from the sites' training label columns; in a
    # deployment these few values come from the sites' label summaries, never from their records
    # every site's labels checked first, as run_finetune does: rows without a label counted and logged, an unusable
    # label (inf, text in a numeric column) an error naming the sample or, with --on_error skip_sample, a counted skip
    split_names = (data_args.train_split, data_args.eval_split, data_args.test_split)
    checked = {
        name: {s: rows_with_labels(m.split(s).records(), task, f"site {name}, {s}", on_error)[0] for s in split_names}
        for name, m in sites.items()
    }
    train_raw = [r for name in sites for r in checked[name][data_args.train_split]]
    task.fit(train_raw)
    folder = processor_folder(data_args.processor_dir, model_args.model_name_or_path)
    if folder is not None:
        processor, embedders = BioPerceiverProcessor.from_pretrained(folder), {}
    else:
        processor, embedders = federated_processor(sites, data_args.processor_settings, data_args.modalities)
    used = [m for m in processor.modalities if not data_args.modalities or m in data_args.modalities]
    modalities = {m: processor.modalities[m] for m in used}

    def model_fn():
        torch.manual_seed(fed.seed)
        model = build_model(model_args, task, processor, embedders, train_raw, used)
        return configure_finetuning(
            model,
            mode=model_args.finetuning_mode,
            unfreeze_last_n_layers=model_args.unfreeze_last_n_layers,
            lora_r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
        )

    local = fed.local_config()
    clients, datasets = [], {}
    for name, m in sites.items():
        splits = {s: labelled_records(checked[name][s], task, s, on_error=data_args.on_error) for s in split_names}
        ds = {
            s: ProcessedDataset(*splits[s], processor, base_dir=m.base_dir, modalities=used, on_error=on_error)
            for s in splits
        }
        datasets[name] = ds
        if len(ds[data_args.train_split]) == 0:
            logger.warning("site %s has no labelled training rows: it takes no part", name)
            continue
        clients.append(
            SiteClient(
                name,
                ds[data_args.train_split],
                model_fn,
                finetuning_objective,
                collate_fn=TaskCollator(modalities, modality_dropout=data_args.modality_dropout, on_error=on_error),
                eval_dataset=ds[data_args.eval_split] if len(ds[data_args.eval_split]) else None,
                config=local,
            )
        )
    model = model_fn()
    val = [ds[data_args.eval_split] for ds in datasets.values() if len(ds[data_args.eval_split])]

    def global_validation(server_round: int, state: dict[str, torch.Tensor]) -> dict[str, float] | None:
        """Simulation only: the task's primary metric over every site's validation patients, per round (a real
        deployment gets the per-site evaluation losses, computed where the data is)."""
        if not val:
            return None
        model.load_state_dict(state)
        model.eval()
        preds, ys = [], []
        for d in val:
            pred, keep = predict(model, d, modalities)
            preds.append(pred[keep])
            ys.append(d.targets()[keep])
        metrics = task.evaluate(np.concatenate(preds), np.concatenate(ys), ci=False)
        key = task.primary_metric
        return {f"validation_{key}": float(metrics[key])} if key in metrics else None

    result = run_federated(
        clients,
        model.state_dict(),
        fed.federated_config(),
        output_dir=out,
        resume=fed.resume,
        evaluate_fn=global_validation,
    )
    model.load_state_dict(result.state)
    model.eval()

    def evaluate(ds) -> dict[str, Any] | None:
        if len(ds) == 0:
            return None
        pred, keep = predict(model, ds, modalities)
        y = ds.targets()
        groups = np.array([str(s.get("patient_id")) for s in ds.samples])
        return task.evaluate(
            pred[keep], y[keep], groups=groups[keep], ci=True, n_resamples=data_args.n_bootstrap, seed=fed.seed
        ) | {"n": int(keep.sum())}

    test = data_args.test_split
    per_site = {name: evaluate(ds[test]) for name, ds in datasets.items()}
    pooled_test = torch.utils.data.ConcatDataset([ds[test] for ds in datasets.values()])
    pooled = _evaluate_concat(model, task, pooled_test, modalities, data_args.n_bootstrap, fed.seed, predict)
    contributions = site_contributions(sites)
    merge_lora(model).save_pretrained(out)  # LoRA adapters merged: a plain task model
    processor.save_pretrained(out)
    task.save(out)
    results = {
        "mode": "finetuning",
        "task": task.name,
        "rounds": len(result.history),
        f"{test}_per_site": per_site,
        f"{test}_pooled": pooled,
        "sites": contributions,
        "federated": fed.federated_config().to_dict(),
        "local": local.to_dict(),
    }
    (out / "all_results.json").write_text(json.dumps(results, indent=1, default=_json) + "\n")
    federated_card("finetuning", contributions, fed.federated_config(), local, results, model_config=model.config).save(
        out / "README.md"
    )
    return results


def _evaluate_concat(model, task, concat, modalities, n_bootstrap, seed, predict) -> dict[str, Any] | None:
    """Test metrics over the sites' test sets together (simulation only: the pooled view a benchmark compares)."""
    parts = [d for d in concat.datasets if len(d)]
    if not parts:
        return None
    preds, ys, groups = [], [], []
    for d in parts:
        pred, keep = predict(model, d, modalities)
        preds.append(pred[keep])
        ys.append(d.targets()[keep])
        groups.append(np.array([str(s.get("patient_id")) for s in d.samples])[keep])
    return task.evaluate(
        np.concatenate(preds),
        np.concatenate(ys),
        groups=np.concatenate(groups),
        ci=True,
        n_resamples=n_bootstrap,
        seed=seed,
    ) | {"n": int(sum(len(g) for g in groups))}


def rounds_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / ROUNDS_DIR


def parse_arguments(types: tuple[type, ...], argv: list[str]) -> tuple:
    """``HfArgumentParser`` over ``types``; a first ``.yaml``/``.json`` argument is an argument file and later
    ``--key value`` flags override it."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(types)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        import yaml

        values = yaml.safe_load(Path(argv[0]).read_text()) or {}
        flags = []
        for k, v in values.items():
            if v is None:
                continue
            flags += [f"--{k}", *map(str, v)] if isinstance(v, list) else [f"--{k}", str(v)]
        argv = [*flags, *argv[1:]]
    return tuple(parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False))


__all__ = [
    "FederatedArguments",
    "FederatedPretrainArguments",
    "federated_processor",
    "load_sites",
    "parse_arguments",
    "run_federated_finetuning",
    "run_federated_pretraining",
]
