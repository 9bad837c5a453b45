"""The site side of federated training: local training of the global model on one site's data.

A :class:`SiteClient` holds one site's training (and optional evaluation) dataset, a function that builds the
model and an ``objective`` (model, batch) -> scalar loss. Each round it loads the global weights, trains for
``local_epochs`` (or ``local_steps``) with a fresh optimizer, optionally adds the FedProx proximal term
``mu/2 * ||w - w_global||^2``, optionally clips its update ``w - w_global`` to an L2 norm and adds Gaussian noise to
it (client-side DP-FedAvg style: only the noisy, clipped update leaves the site), and returns the new weights
with the number of training samples (the aggregation weight). Raw records never leave the object.

The batch order of a round depends only on ``(seed, round, site)``, so a run resumed from a round checkpoint
repeats the rounds an uninterrupted run would have done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

Objective = Callable[[nn.Module, Any], torch.Tensor]
OPTIMIZERS = ("sgd", "adamw")


@dataclass
class LocalTrainingConfig:
    """How a site trains in each round.

    Args:
        local_epochs: passes over the site's training data per round (ignored when ``local_steps`` is set).
        local_steps: optimizer steps per round (``None``: ``local_epochs`` full passes).
        batch_size: local batch size.
        learning_rate: local learning rate.
        optimizer: ``"sgd"`` (plain SGD, no momentum) or ``"adamw"``; its state is reset every round.
        weight_decay: AdamW/SGD weight decay.
        shuffle: shuffle the local data (seeded by ``seed``, the round and the site).
        clip_update_norm: clip the site's model update (``w_local - w_global``, trainable parameters) to this L2
            norm before sending it (``None``: no clipping).
        noise_multiplier: with ``clip_update_norm``, add Gaussian noise of std ``noise_multiplier *
            clip_update_norm`` to each coordinate of the clipped update (0: none).
        max_grad_norm: clip local gradients to this norm at every step (``None``: no clipping).
        seed: base seed of data order, dropout and noise.
    """

    local_epochs: int = 1
    local_steps: int | None = None
    batch_size: int = 8
    learning_rate: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    shuffle: bool = True
    clip_update_norm: float | None = None
    noise_multiplier: float = 0.0
    max_grad_norm: float | None = None
    seed: int = 0

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.local_epochs < 1:
            raise ValueError(f"local_epochs must be >= 1, got {self.local_epochs}")
        if self.local_steps is not None and self.local_steps < 1:
            raise ValueError(f"local_steps must be >= 1 or None, got {self.local_steps}")
        if self.noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.noise_multiplier > 0 and self.clip_update_norm is None:
            raise ValueError("noise_multiplier needs clip_update_norm (the noise is scaled by the clipping norm)")
        if self.clip_update_norm is not None and self.clip_update_norm <= 0:
            raise ValueError(f"clip_update_norm must be > 0, got {self.clip_update_norm}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def round_seed(seed: int, server_round: int, site: str) -> int:
    """A 63-bit seed from (seed, round, site name): stable across processes and Python versions."""
    digest = hashlib.sha256(f"{seed}:{server_round}:{site}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def state_to_numpy(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """A state dict as contiguous CPU numpy arrays (what a Flower ``ArrayRecord`` carries)."""
    return {k: v.detach().cpu().contiguous().numpy() for k, v in state.items()}


def load_arrays(module: nn.Module, arrays: Mapping[str, Any]) -> None:
    """Load numpy arrays or tensors into ``module`` (cast to each entry's dtype); every key must match."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(arrays)), sorted(set(arrays) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"global weights do not match the site's model: missing {missing[:5]}, unexpected {unexpected[:5]}; "
            "every site must build the same model (same preset, processors and task)"
        )
    new = {k: torch.as_tensor(arrays[k]).to(dtype=own[k].dtype) for k in own}
    module.load_state_dict(new)


class SiteClient:
    """One site: its data, model builder and objective. Raw records stay here; weights and counts leave.

    Args:
        name: the site's name (shown in metrics and cards).
        train_dataset: the site's training samples (a map-style dataset).
        model_fn: builds the (untrained) model; called once, the global weights are loaded into it every round.
        objective: ``(model, batch) -> loss`` (a scalar tensor).
        collate_fn: the DataLoader collate function.
        eval_dataset: the site's held-out samples for per-site evaluation (``None``: none).
        config: :class:`LocalTrainingConfig`.
    """

    def __init__(
        self,
        name: str,
        train_dataset,
        model_fn: Callable[[], nn.Module],
        objective: Objective,
        *,
        collate_fn: Callable | None = None,
        eval_dataset=None,
        config: LocalTrainingConfig | None = None,
    ):
        if len(train_dataset) == 0:
            raise ValueError(f"site {name!r} has no training samples: drop the site or give it data")
        self.name = name
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.model_fn = model_fn
        self.objective = objective
        self.collate_fn = collate_fn
        self.config = config or LocalTrainingConfig()
        self._model: nn.Module | None = None

    @property
    def num_train(self) -> int:
        return len(self.train_dataset)

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            self._model = self.model_fn()
        return self._model

    def _loader(self, dataset, generator: torch.Generator | None, shuffle: bool):
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=self.config.batch_size,
            shuffle=shuffle,
            generator=generator,
            collate_fn=self.collate_fn,
        )

    def _optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        c = self.config
        if c.optimizer == "sgd":
            return torch.optim.SGD(params, lr=c.learning_rate, weight_decay=c.weight_decay)
        return torch.optim.AdamW(params, lr=c.learning_rate, weight_decay=c.weight_decay)

    def fit(
        self, arrays: Mapping[str, Any], server_round: int, proximal_mu: float | None = None
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """Local training from the global ``arrays``: ``(new arrays, metrics)``; metrics hold ``num-examples``
        (the aggregation weight), ``train_loss`` (mean over the local steps) and ``steps``."""
        c = self.config
        model = self.model
        load_arrays(model, arrays)
        model.train()
        seed = round_seed(c.seed, server_round, self.name)
        torch.manual_seed(seed)  # dropout, modality dropout drawn through torch
        generator = torch.Generator().manual_seed(seed)
        params = [p for p in model.parameters() if p.requires_grad]
        global_params = [p.detach().clone() for p in params]
        optimizer = self._optimizer(params)
        losses: list[float] = []
        skipped = 0
        steps_left = c.local_steps
        epochs = c.local_epochs if c.local_steps is None else math.inf
        epoch = 0
        while epoch < epochs and (steps_left is None or steps_left > 0):
            for batch in self._loader(self.train_dataset, generator, c.shuffle):
                if batch is None:  # every sample of the batch was skipped (counted and logged by the collator)
                    continue
                loss = self.objective(model, batch)
                if not loss.requires_grad:  # nothing to learn from this batch (e.g. no pair of views)
                    skipped += 1
                    continue
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"site {self.name!r}, round {server_round}: non-finite local loss {loss.item()}; lower the "
                        "learning rate or check the site's data"
                    )
                if proximal_mu is not None:  # FedProx: mu/2 ||w - w_global||^2 (mu = 0 adds exact zeros)
                    prox = sum(((p - g) ** 2).sum() for p, g in zip(params, global_params))
                    loss = loss + 0.5 * proximal_mu * prox
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if c.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
                optimizer.step()
                losses.append(float(loss.detach()))
                if steps_left is not None:
                    steps_left -= 1
                    if steps_left == 0:
                        break
            epoch += 1
        metrics = {
            "num-examples": float(self.num_train),
            "train_loss": sum(losses) / max(len(losses), 1),
            "steps": float(len(losses)),
            "skipped_batches": float(skipped),
        }
        if c.clip_update_norm is not None:
            metrics.update(self._privatise(params, global_params, generator))
        state = state_to_numpy(model.state_dict())
        logger.debug(
            "site %s round %d: %d steps, loss %.4f", self.name, server_round, len(losses), metrics["train_loss"]
        )
        return state, metrics

    @torch.no_grad()
    def _privatise(self, params, global_params, generator: torch.Generator) -> dict[str, float]:
        """Clip the update ``w - w_global`` of the trainable parameters to ``clip_update_norm`` and add Gaussian
        noise of std ``noise_multiplier * clip_update_norm`` (in place)."""
        c = self.config
        deltas = [p - g for p, g in zip(params, global_params)]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in deltas])).item()
        scale = min(1.0, c.clip_update_norm / (norm + 1e-12))
        for p, g, d in zip(params, global_params, deltas):
            noisy = d * scale
            if c.noise_multiplier > 0:
                noise = torch.randn(d.shape, generator=generator, dtype=d.dtype)
                noisy = noisy + noise * (c.noise_multiplier * c.clip_update_norm)
            p.copy_(g + noisy)
        return {"update_norm": norm, "update_clipped": float(scale < 1.0)}

    @torch.no_grad()
    def evaluate(self, arrays: Mapping[str, Any]) -> dict[str, float] | None:
        """Mean objective of the global ``arrays`` on the site's evaluation data (``None`` without any)."""
        if self.eval_dataset is None or len(self.eval_dataset) == 0:
            return None
        model = self.model
        load_arrays(model, arrays)
        model.eval()
        total, count = 0.0, 0
        for batch in self._loader(self.eval_dataset, None, False):
            if batch is None:
                continue
            loss = self.objective(model, batch)
            n = _batch_size(batch)
            total += float(loss) * n
            count += n
        return {"num-examples": float(count), "eval_loss": total / max(count, 1)}


def _batch_size(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        for v in batch.values():
            n = _batch_size(v)
            if n:
                return n
        return 0
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_size(batch[0])
    return 0
