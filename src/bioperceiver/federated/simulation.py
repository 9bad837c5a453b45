"""The server side: Flower strategies (FedAvg, FedProx) driven round by round over in-process sites.

:func:`run_federated` is a sequential simulation driver: every site is a Flower ``ClientApp`` (the same one a site
runs outside simulation, see :mod:`.app`), called in process through :class:`InProcessGrid`; node sampling,
aggregation (weighted by each site's number of training samples) and metric averaging are Flower's own
(``flwr.serverapp.strategy``). We do not use Flower's Ray simulation engine here: on a few CPU cores it adds
seconds of start-up and a process per site, and it does not give the bit-exact, resumable rounds that tests and
audits need. After each round the global weights and the metrics so far are written to
``output_dir/rounds/round-NNNN/``; ``resume=True`` continues from the latest complete round and gives the same
weights as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .client import SiteClient, round_seed, state_to_numpy

logger = logging.getLogger(__name__)

STRATEGIES = ("fedavg", "fedprox")
ROUNDS_DIR = "rounds"
ROUND_STATE = "round_state.json"
ROUND_WEIGHTS = "global.safetensors"


@dataclass
class FederatedConfig:
    """Server-side settings of a federated run.

    Args:
        strategy: ``"fedavg"`` or ``"fedprox"`` (FedAvg plus the clients' proximal term, weight ``proximal_mu``).
        proximal_mu: FedProx's μ (0 gives FedAvg's updates).
        rounds: number of federated rounds.
        fraction_fit: fraction of sites sampled for training each round (at least one).
        fraction_evaluate: fraction of sites sampled for evaluation each round (0: no per-site evaluation).
        seed: seed of site sampling (and, through :class:`LocalTrainingConfig`, of local data order).
    """

    strategy: str = "fedavg"
    proximal_mu: float = 0.0
    rounds: int = 3
    fraction_fit: float = 1.0
    fraction_evaluate: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.proximal_mu < 0:
            raise ValueError(f"proximal_mu must be >= 0, got {self.proximal_mu}")
        if self.strategy == "fedavg" and self.proximal_mu:
            raise ValueError("proximal_mu is FedProx's: pass strategy='fedprox' to use it")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if not 0 < self.fraction_fit <= 1:
            raise ValueError(f"fraction_fit must be in (0, 1], got {self.fraction_fit}")
        if not 0 <= self.fraction_evaluate <= 1:
            raise ValueError(f"fraction_evaluate must be in [0, 1], got {self.fraction_evaluate}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_strategy(config: FederatedConfig, num_sites: int) -> FedAvg:
    """Flower's FedAvg or FedProx, weighted by ``num-examples`` (each site's training samples)."""
    kwargs = dict(
        fraction_train=config.fraction_fit,
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1 if config.fraction_evaluate > 0 else 0,
        min_available_nodes=num_sites,
    )
    if config.strategy == "fedprox":
        return FedProx(proximal_mu=config.proximal_mu, **kwargs)
    return FedAvg(**kwargs)


# ---- the ClientApp a site runs ---------------------------------------------------------------------------------
def to_array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def make_client_app(client_for: Callable[[Context, ConfigRecord], SiteClient]) -> ClientApp:
    """A Flower ``ClientApp`` whose ``train``/``evaluate`` handlers run ``client_for(context, config)`` (a
    :class:`SiteClient`; ``config`` is the message's ``ConfigRecord``): the same code in simulation
    (:func:`run_federated`) and at a site (``flower-supernode``, :mod:`.app`)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = msg.content["config"]
        client = client_for(context, cfg)
        mu = cfg.get("proximal-mu")
        arrays, metrics = client.fit(
            from_array_record(msg.content["arrays"]),
            int(cfg["server-round"]),
            None if mu is None else float(mu),
        )
        return Message(RecordDict({"arrays": to_array_record(arrays), "metrics": MetricRecord(metrics)}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        client = client_for(context, msg.content["config"])
        metrics = client.evaluate(from_array_record(msg.content["arrays"]))
        if metrics is None:  # nothing held out at this site: weight 0 in the average
            metrics = {"num-examples": 0.0, "eval_loss": 0.0}
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


class InProcessGrid(Grid):
    """A Flower ``Grid`` whose nodes are ``ClientApp`` objects called in this process, one after the other (node
    ids 1..K in the order of ``sites``)."""

    def __init__(
        self,
        app: ClientApp,
        sites: Sequence[str],
        node_configs: Sequence[dict[str, Any]] | None = None,
        run_config: dict[str, Any] | None = None,
    ):
        self.app = app
        self.sites = list(sites)
        node_configs = node_configs or [{} for _ in self.sites]
        self.contexts = {
            i + 1: Context(
                run_id=1,
                node_id=i + 1,
                node_config={"site": s, **node_configs[i]},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for i, s in enumerate(self.sites)
        }
        self._run = None

    def site(self, node_id: int) -> str:
        return self.sites[node_id - 1]

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def get_nodes(self):
        raise NotImplementedError("InProcessGrid has node ids only")

    def push_messages(self, messages):
        raise NotImplementedError("InProcessGrid answers with send_and_receive")

    def pull_messages(self, message_ids):
        raise NotImplementedError("InProcessGrid answers with send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        # sorted by node: the aggregation order (a floating-point sum) does not depend on the sampling order
        for msg in sorted(messages, key=lambda m: m.metadata.dst_node_id):
            node = msg.metadata.dst_node_id
            reply = self.app(msg, self.contexts[node])
            if reply.has_error():
                raise RuntimeError(f"site {self.site(node)!r} failed: {reply.error.reason}")
            replies.append(reply)
        return replies


# ---- the driver --------------------------------------------------------------------------------------------------
@dataclass
class FederatedResult:
    """Final global weights and one history entry per round (per-site and aggregated metrics)."""

    state: dict[str, torch.Tensor]
    history: list[dict[str, Any]] = field(default_factory=list)


def _identity() -> None:
    # Flower stamps messages with the running task's identity; the simulation engine sets it the same way
    if TaskIdentity._run_id is None:
        TaskIdentity.run_id = 1
    if TaskIdentity._node_id is None:
        TaskIdentity.node_id = 0
    if TaskIdentity._task_id is None:
        TaskIdentity.task_id = 0


def _seeded(seed: int, fn: Callable[..., Iterable[Message]], *args: Any) -> list[Message]:
    """``fn(*args)`` with Python's ``random`` seeded (Flower samples nodes with it), restoring the global state."""
    saved = random.getstate()
    random.seed(seed)
    try:
        return list(fn(*args))
    finally:
        random.setstate(saved)


def latest_round(output_dir: str | os.PathLike) -> Path | None:
    """The latest complete round checkpoint under ``output_dir/rounds`` (its state file is written last)."""
    root = Path(output_dir) / ROUNDS_DIR
    done = sorted(p for p in root.glob("round-*") if (p / ROUND_STATE).exists()) if root.exists() else []
    return done[-1] if done else None


def _save_round(output_dir: Path, server_round: int, state: dict[str, torch.Tensor], record: dict) -> Path:
    folder = output_dir / ROUNDS_DIR / f"round-{server_round:04d}"
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / ROUND_WEIGHTS))
    (tmp / ROUND_STATE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def run_federated(
    clients: Sequence[SiteClient],
    initial_state: dict[str, torch.Tensor],
    config: FederatedConfig,
    *,
    output_dir: str | os.PathLike | None = None,
    resume: bool = False,
    evaluate_fn: Callable[[int, dict[str, torch.Tensor]], dict[str, float] | None] | None = None,
    stop_after: int | None = None,
) -> FederatedResult:
    """Federated training of ``initial_state`` over ``clients`` for ``config.rounds`` rounds.

    Args:
        clients: one :class:`SiteClient` per site (unique names).
        initial_state: the global model's initial state dict (tensors).
        config: :class:`FederatedConfig`.
        output_dir: where round checkpoints and ``federated_history.json`` go (``None``: nothing written).
        resume: continue from the latest complete round under ``output_dir`` (same sites and settings).
        evaluate_fn: server-side evaluation ``(round, state) -> metrics`` after every round (e.g. a test split the
            server holds in a benchmark).
        stop_after: stop after this round (simulates an interruption in tests).
    """
    names = [c.name for c in clients]
    if len(set(names)) != len(names):
        raise ValueError(f"site names must be unique, got {names}")
    _identity()
    by_site = {c.name: c for c in clients}
    grid = InProcessGrid(make_client_app(lambda ctx, cfg: by_site[ctx.node_config["site"]]), names)
    strategy = build_strategy(config, len(clients))
    dtypes = {k: v.dtype for k, v in initial_state.items()}
    out = Path(output_dir) if output_dir is not None else None
    run_record = {"config": config.to_dict(), "sites": names, "local": [c.config.to_dict() for c in clients]}

    state = {k: v.detach().clone() for k, v in initial_state.items()}
    history: list[dict[str, Any]] = []
    start = 1
    if resume:
        if out is None:
            raise ValueError("resume=True needs output_dir (where the round checkpoints are)")
        last = latest_round(out)
        if last is None:
            logger.info("no round checkpoint under %s: starting at round 1", out)
        else:
            saved = json.loads((last / ROUND_STATE).read_text())
            _check_resumable(saved["run"], run_record)
            state = load_file(str(last / ROUND_WEIGHTS))
            history = saved["history"]
            start = saved["round"] + 1
            logger.info("resuming after round %d from %s", saved["round"], last)

    arrays = to_array_record(state_to_numpy(state))
    end = config.rounds if stop_after is None else min(stop_after, config.rounds)
    for server_round in tqdm(range(start, end + 1), desc="federated rounds", initial=start - 1, total=config.rounds):
        sample_seed = round_seed(config.seed, server_round, "__server__")
        train_msgs = _seeded(sample_seed, strategy.configure_train, server_round, arrays, ConfigRecord(), grid)
        replies = grid.send_and_receive(train_msgs)
        new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        if new_arrays is None:
            raise RuntimeError(f"round {server_round}: no site returned weights")
        arrays = new_arrays
        entry: dict[str, Any] = {"round": server_round, "sites": {}}
        for reply in replies:
            site = grid.site(reply.metadata.src_node_id)
            entry["sites"][site] = dict(reply.content["metrics"])
        entry["train"] = dict(train_metrics or {})
        if config.fraction_evaluate > 0:
            eval_msgs = _seeded(
                sample_seed + 1, strategy.configure_evaluate, server_round, arrays, ConfigRecord(), grid
            )
            eval_replies = grid.send_and_receive(eval_msgs)
            for reply in eval_replies:
                metrics = dict(reply.content["metrics"])
                if metrics.get("num-examples", 0) > 0:
                    site = grid.site(reply.metadata.src_node_id)
                    per_site = entry["sites"].setdefault(site, {})
                    per_site.update({k: v for k, v in metrics.items() if k != "num-examples"})
                    per_site["num-eval-examples"] = metrics["num-examples"]
            held = [r for r in eval_replies if r.content["metrics"]["num-examples"] > 0]
            entry["eval"] = dict(strategy.aggregate_evaluate(server_round, held) or {}) if held else {}
        state = {k: torch.from_numpy(np.array(v.numpy())).to(dtypes[k]) for k, v in arrays.items()}
        arrays = to_array_record(state_to_numpy(state))  # what a resumed run starts from: same dtypes, same values
        if evaluate_fn is not None:
            entry["global"] = evaluate_fn(server_round, state) or {}
        history.append(entry)
        logger.info("round %d: %s", server_round, {k: entry.get(k) for k in ("train", "eval", "global")})
        if out is not None:
            _save_round(out, server_round, state, {"round": server_round, "history": history, "run": run_record})
    if out is not None:
        (out / "federated_history.json").write_text(json.dumps(history, indent=1) + "\n")
        plot_federated_history(history, out / "federated_metrics.png")
    return FederatedResult(state=state, history=history)


def _check_resumable(saved: dict, now: dict) -> None:
    a = {**saved, "config": {k: v for k, v in saved["config"].items() if k != "rounds"}}
    b = {**now, "config": {k: v for k, v in now["config"].items() if k != "rounds"}}
    if json.loads(json.dumps(a)) != json.loads(json.dumps(b)):
        changed = sorted(k for k in b if a.get(k) != b.get(k))
        raise ValueError(
            f"cannot resume: the run's sites or settings changed ({changed}); resume with the same settings "
            "(only the number of rounds may grow) or start a new output_dir"
        )


def plot_federated_history(history: list[dict[str, Any]], path: str | os.PathLike) -> Path | None:
    """PNG of the training loss (and evaluation loss, server metrics) per round: one line per site plus the
    weighted average over sites."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [("train_loss", "train", "local training loss")]
    if any("eval_loss" in h.get("eval", {}) for h in history):
        panels.append(("eval_loss", "eval", "held-out loss per site"))
    global_keys = sorted({k for h in history for k in h.get("global", {})})
    fig, axes = plt.subplots(1, len(panels) + bool(global_keys), figsize=(5 * (len(panels) + bool(global_keys)), 3.6))
    axes = np.atleast_1d(axes)
    sites = sorted({s for h in history for s in h["sites"]})
    rounds = [h["round"] for h in history]
    for ax, (key, agg, title) in zip(axes, panels):
        for s in sites:
            pts = [(h["round"], h["sites"][s][key]) for h in history if key in h["sites"].get(s, {})]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=s)
        ax.plot(rounds, [h.get(agg, {}).get(key, np.nan) for h in history], "k--", lw=2, label="weighted mean")
        ax.set(title=title, xlabel="round", ylabel=key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    if global_keys:
        ax = axes[-1]
        for k in global_keys:
            ax.plot(rounds, [h.get("global", {}).get(k, np.nan) for h in history], marker="o", ms=3, label=k)
        ax.set(title="global model (server evaluation)", xlabel="round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
