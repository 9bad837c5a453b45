"""The Flower apps for a real deployment: each site runs the ``ClientApp`` next to its data, a coordinator runs the
``ServerApp``; nothing but processor statistics, model weights and counts crosses the network.

Site (one per hospital)::

    flower-supernode --superlink coordinator:9092 \\
        --node-config "manifest='/data/site_a/manifest.parquet' site='site_a'"

Coordinator: ``flower-superlink``, then ``flwr run . <federation>`` from a Flower app project whose
``pyproject.toml`` names ``bioperceiver.federated.app:server_app`` and ``bioperceiver.federated.app:client_app``
(see README, "Federated training"). Run config keys (``--run-config``): ``rounds``, ``strategy``,
``proximal-mu``, ``fraction-fit``, ``local-epochs``, ``local-steps``, ``batch-size``, ``learning-rate``,
``optimizer``, ``clip-update-norm``, ``noise-multiplier``, ``preset``, ``loss``, ``processor-settings`` (a YAML
path on the coordinator), ``output-dir`` (on the coordinator), ``seed``.

Federated contrastive pretraining is what these apps run. Phase 1 (``query`` messages): the sites send their
processors' statistics (and answer count queries), the coordinator fits the processors; phase 2: FedAvg/FedProx
rounds (``train``/``evaluate`` messages) with the fitted processors shipped in the round config. The client side
is :class:`~bioperceiver.federated.client.SiteClient`, the one the simulation (``pretrain/run_federated.py``) uses.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from ..data.collator import BioPerceiverCollator
from ..data.dataset import ManifestDataset
from ..data.manifest import read_manifest
from ..data.processing import BioPerceiverProcessor, load_processor_settings
from ..data.splits import assign_splits
from ..factory import create_model
from ..modalities.processor import sum_statistics
from ..modalities.registry import get_modality
from .card import federated_card
from .client import LocalTrainingConfig, SiteClient, state_to_numpy
from .processors import answer_processor_query, site_processor_statistics
from .simulation import FederatedConfig, build_strategy, make_client_app, to_array_record
from .sites import site_contributions

logger = logging.getLogger(__name__)

MODALITIES = "query.modalities"
STATISTICS = "query.processor_statistics"
FOLLOW_UP = "query.processor_query"


# ---- shared helpers ------------------------------------------------------------------------------------------------
def processor_to_json(processor: BioPerceiverProcessor) -> str:
    """The fitted processors as one JSON string (every file ``save_pretrained`` writes; all are text)."""
    with tempfile.TemporaryDirectory() as tmp:
        processor.save_pretrained(tmp)
        files = {str(p.relative_to(tmp)): p.read_text() for p in sorted(Path(tmp).rglob("*")) if p.is_file()}
    return json.dumps(files)


def processor_from_json(text: str) -> BioPerceiverProcessor:
    files = json.loads(text)
    with tempfile.TemporaryDirectory() as tmp:
        for rel, content in files.items():
            path = Path(tmp) / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
        return BioPerceiverProcessor.from_pretrained(tmp)


def _unfitted(spec: dict[str, dict[str, Any]]) -> BioPerceiverProcessor:
    """Unfitted processors from ``{modality: {"kind": ..., **settings}}``."""
    procs = {}
    for name, s in spec.items():
        s = dict(s)
        procs[name] = get_modality(s.pop("kind")).processor(name, **s)
    return BioPerceiverProcessor(procs)


def local_config(run: dict[str, Any]) -> LocalTrainingConfig:
    steps = run.get("local-steps")
    clip = run.get("clip-update-norm")
    return LocalTrainingConfig(
        local_epochs=int(run.get("local-epochs", 1)),
        local_steps=int(steps) if steps else None,
        batch_size=int(run.get("batch-size", 16)),
        learning_rate=float(run.get("learning-rate", 1e-3)),
        optimizer=str(run.get("optimizer", "adamw")),
        clip_update_norm=float(clip) if clip else None,
        noise_multiplier=float(run.get("noise-multiplier", 0.0)),
        seed=int(run.get("seed", 0)),
    )


def pretraining_model(processor: BioPerceiverProcessor, embedders: dict, run: dict[str, Any]):
    from ..training.pretraining import ContrastivePretrainer

    torch.manual_seed(int(run.get("seed", 0)))
    backbone = create_model(
        str(run.get("preset", "bioperceiver_debug")), modalities=processor.model_modalities(embedders)
    )
    return ContrastivePretrainer(backbone, loss=str(run.get("loss", "clip")))


# ---- site side -----------------------------------------------------------------------------------------------------
_CLIENTS: dict[str, SiteClient] = {}  # per site process: one client per (manifest, processors, run settings)


def _site(context: Context):
    path = str(context.node_config["manifest"])
    name = str(context.node_config.get("site", Path(path).stem))
    return name, _read_site_manifest(path, Path(path).stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_site_manifest(path: str, mtime_ns: int):
    # read once per site process (phase 1 asks up to ~64 count queries); a changed file is read again
    return assign_splits(read_manifest(path))


def _client_for(context: Context, config: ConfigRecord) -> SiteClient:
    from .runs import pretraining_objective

    key = hashlib.sha256(
        (
            str(context.node_config)
            + str(config["processors"])
            + json.dumps(dict(context.run_config), sort_keys=True)
            + str(config.get("embedders", "{}"))
        ).encode()
    ).hexdigest()
    if key not in _CLIENTS:
        name, manifest = _site(context)
        processor = processor_from_json(str(config["processors"]))
        embedders = json.loads(str(config.get("embedders", "{}")))
        run = dict(context.run_config)
        train, held = manifest.split("train"), manifest.split("validation")
        _CLIENTS[key] = SiteClient(
            name,
            ManifestDataset.from_manifest(train, processor, train=True, seed=int(run.get("seed", 0)), on_error="skip"),
            lambda: pretraining_model(processor, embedders, run),
            pretraining_objective,
            collate_fn=BioPerceiverCollator(processor.modalities, on_error="skip", seed=int(run.get("seed", 0))),
            eval_dataset=ManifestDataset.from_manifest(held, processor, on_error="skip") if len(held) else None,
            config=local_config(run),
        )
    return _CLIENTS[key]


client_app = make_client_app(_client_for)


@client_app.query("modalities")
def modalities(msg: Message, context: Context) -> Message:
    """Phase 0: this site's modality columns and their kinds (no data)."""
    _, manifest = _site(context)
    return Message(RecordDict({"config": ConfigRecord({"modalities": json.dumps(manifest.modalities)})}), reply_to=msg)


@client_app.query("processor_statistics")
def processor_statistics(msg: Message, context: Context) -> Message:
    """Phase 1: this site's processor statistics (counts and sums), its counts and its modality columns."""
    name, manifest = _site(context)
    processor = _unfitted(json.loads(str(msg.content["config"]["spec"])))
    known = {k: v for k, v in processor.processors.items() if k in manifest.modalities}
    stats = site_processor_statistics(BioPerceiverProcessor(known), manifest)
    reply = ConfigRecord(
        {
            "site": name,
            "statistics": json.dumps(stats),
            "contribution": json.dumps(site_contributions({name: manifest})[0]),
        }
    )
    return Message(RecordDict({"config": reply}), reply_to=msg)


@client_app.query("processor_query")
def processor_query(msg: Message, context: Context) -> Message:
    """Phase 1: this site's answer to a follow-up count query of one processor."""
    _, manifest = _site(context)
    cfg = msg.content["config"]
    spec = json.loads(str(cfg["spec"]))
    name = str(cfg["modality"])
    if name not in manifest.modalities:
        answer = {}
    else:
        answer = answer_processor_query(_unfitted({name: spec[name]}), manifest, name, json.loads(str(cfg["request"])))
    return Message(RecordDict({"config": ConfigRecord({"answer": json.dumps(answer)})}), reply_to=msg)


# ---- coordinator side ----------------------------------------------------------------------------------------------
def _ask(grid: Grid, message_type: str, config: dict[str, Any]) -> list[Message]:
    nodes = list(grid.get_node_ids())
    messages = [Message(RecordDict({"config": ConfigRecord(config)}), node, message_type) for node in nodes]
    replies = list(grid.send_and_receive(messages))
    failed = [r for r in replies if r.has_error()]
    if failed:
        raise RuntimeError(f"{len(failed)} site(s) failed {message_type}: {failed[0].error.reason}")
    return replies


def fit_processors_remotely(grid: Grid, spec: dict[str, dict[str, Any]]) -> tuple[BioPerceiverProcessor, list[dict]]:
    """Phase 1 on the coordinator: processors fitted from the sites' statistics; the sites' contributions."""
    replies = _ask(grid, STATISTICS, {"spec": json.dumps(spec)})
    contents = [r.content["config"] for r in replies]
    stats = [json.loads(str(c["statistics"])) for c in contents]
    contributions = sorted((json.loads(str(c["contribution"])) for c in contents), key=lambda c: c["site"])
    present = {m for s in stats for m in s}
    processor = _unfitted({k: v for k, v in spec.items() if k in present})
    for name, proc in processor.processors.items():
        merged = sum_statistics(s.get(name, {}) for s in stats)

        def query(request, name=name):
            answers = _ask(
                grid, FOLLOW_UP, {"spec": json.dumps(spec), "modality": name, "request": json.dumps(request)}
            )
            return sum_statistics(json.loads(str(a.content["config"]["answer"])) for a in answers)

        proc.fit_from_statistics(merged, query)
    return processor, contributions


def server_main(grid: Grid, context: Context) -> dict[str, Any]:
    """The coordinator's whole run: fit processors from site statistics, then the federated rounds; writes the
    backbone, processors, history and card to ``output-dir``."""
    run = dict(context.run_config)
    settings, embedders = load_processor_settings(run.get("processor-settings") or None)
    settings = settings.processors if hasattr(settings, "processors") else settings
    kinds: dict[str, str] = {}
    for reply in _ask(grid, MODALITIES, {}):
        for name, kind in json.loads(str(reply.content["config"]["modalities"])).items():
            if kinds.setdefault(name, kind) != kind:
                raise ValueError(f"column {name!r} is {kinds[name]!r} at one site and {kind!r} at another: rename it")
    spec = {name: {**dict(settings.get(name, {})), "kind": kind} for name, kind in sorted(kinds.items())}
    processor, contributions = fit_processors_remotely(grid, spec)
    model = pretraining_model(processor, embedders, run)
    config = FederatedConfig(
        strategy=str(run.get("strategy", "fedavg")),
        proximal_mu=float(run.get("proximal-mu", 0.0)),
        rounds=int(run.get("rounds", 3)),
        fraction_fit=float(run.get("fraction-fit", 1.0)),
        fraction_evaluate=float(run.get("fraction-evaluate", 1.0)),
        seed=int(run.get("seed", 0)),
    )
    strategy = build_strategy(config, len(list(grid.get_node_ids())))
    shipped = ConfigRecord({"processors": processor_to_json(processor), "embedders": json.dumps(embedders)})
    result = strategy.start(
        grid=grid,
        initial_arrays=to_array_record(state_to_numpy(model.state_dict())),
        num_rounds=config.rounds,
        train_config=shipped,
        evaluate_config=ConfigRecord(dict(shipped)),
    )
    state = {k: torch.as_tensor(v.numpy()) for k, v in result.arrays.items()}
    model.load_state_dict(state)
    out = Path(str(run.get("output-dir", "federated_output")))
    out.mkdir(parents=True, exist_ok=True)
    model.model.save_pretrained(out)
    processor.save_pretrained(out)
    history = {
        "train": {r: dict(m) for r, m in result.train_metrics_clientapp.items()},
        "evaluate": {r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()},
    }
    results = {"mode": "pretraining", "rounds": config.rounds, "history": history, "sites": contributions}
    (out / "all_results.json").write_text(json.dumps(results, indent=1) + "\n")
    federated_card("pretraining", contributions, config, local_config(run), {"rounds": config.rounds}).save(
        out / "README.md"
    )
    return results


server_app = ServerApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    server_main(grid, context)
