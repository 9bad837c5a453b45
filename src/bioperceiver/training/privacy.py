"""Differentially private finetuning (DP-SGD) with Opacus: Poisson sampling, per-sample clipping, Gaussian noise and
an RDP or PRV accountant, inside the Hugging Face ``Trainer`` that ``run_finetune.py`` already uses.

What each piece is:

* **Poisson sampling**: every training row joins a step's batch independently with probability
  ``q = per_device_train_batch_size / n_train`` (Opacus' ``UniformWithReplacementSampler``); a batch may be empty.
* **Per-sample gradients**: computed one sample at a time (a forward and backward of each row of the batch alone).
  This is exact for any model, task and finetuning mode, fused attention included. Opacus' hook-based grad sampler
  does not see every trainable parameter of this model: the cross-attention's LayerNorm + key/value projections run
  in one fused autograd function (``layers.attention._NormKV``) that calls no module, and the latent array, the
  modality-type embeddings and a query head's query are parameters used outside any module's ``forward``. The cost
  is one forward/backward per row instead of per batch: cheap for the practical settings (linear probe on cached
  latents: only the head runs; LoRA), slower for full finetuning of large models.
* **Clipping, noise, accounting**: Opacus' ``DPOptimizer`` clips each per-sample gradient to ``max_grad_norm``,
  sums, adds ``N(0, (noise_multiplier * max_grad_norm)^2)`` noise and divides by the expected batch size; the
  accountant (``rdp`` or ``prv``) is stepped by the optimizer itself. With ``target_epsilon`` the noise multiplier
  is calibrated with Opacus' ``get_noise_multiplier`` for the run's exact number of steps, so the spent epsilon at
  the end never exceeds the target.

Only the training rows are protected. Validation (evaluation, checkpoint choice, calibration) and test rows are
used as usual, and the run's hyper-parameters are public. Losses must be sums of per-sample terms: the Cox partial
likelihood is not (each row's term depends on its risk set), so survival needs ``--survival_loss discrete``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .tasks import TaskTrainer

logger = logging.getLogger(__name__)

ACCOUNTANTS = ("rdp", "prv")


@dataclass
class DPSettings:
    """DP-SGD settings of a finetuning run.

    Args:
        target_epsilon: privacy budget epsilon reached at the end of training (the noise multiplier is calibrated
            for it); ``None`` when ``noise_multiplier`` is given instead.
        delta: the delta of the (epsilon, delta) guarantee; well below 1 / number of training rows.
        max_grad_norm: per-sample gradient clipping norm C.
        noise_multiplier: the Gaussian noise's standard deviation in units of C; ``None`` = calibrated.
        accountant: ``"rdp"`` (Renyi DP) or ``"prv"`` (privacy random variables; tighter).
    """

    target_epsilon: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError(
                "differential privacy: give exactly one of --dp_target_epsilon (the noise is calibrated for it) or "
                "--dp_noise_multiplier (epsilon is then computed)"
            )
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ValueError(f"--dp_target_epsilon must be > 0, got {self.target_epsilon}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ValueError(f"--dp_noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ValueError(f"--dp_delta must be in (0, 1), got {self.delta}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"--dp_max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"--dp_accountant {self.accountant!r}: choose one of {ACCOUNTANTS}")

    @classmethod
    def from_arguments(cls, model_args) -> DPSettings | None:
        """The settings of ``ModelArguments``' ``dp_*`` fields; ``None`` when DP is off (neither
        ``dp_target_epsilon`` nor ``dp_noise_multiplier`` given)."""
        if model_args.dp_target_epsilon is None and model_args.dp_noise_multiplier is None:
            return None
        return cls(
            target_epsilon=model_args.dp_target_epsilon,
            delta=model_args.dp_delta,
            max_grad_norm=model_args.dp_max_grad_norm,
            noise_multiplier=model_args.dp_noise_multiplier,
            accountant=model_args.dp_accountant,
        )


def check_dp_run(training_args, task, resume) -> None:
    """What DP-SGD here cannot do, refused before any work with what to pass instead."""
    task.check_differential_privacy()
    if training_args.world_size > 1:
        raise ValueError(
            "differential privacy is implemented for one process (Poisson sampling and the noise are per process); "
            "run without a distributed launcher"
        )
    if training_args.gradient_accumulation_steps != 1:
        raise ValueError(
            "differential privacy: --gradient_accumulation_steps must be 1 (the Poisson batch is the logical "
            "batch); raise --per_device_train_batch_size instead"
        )
    if resume:
        raise ValueError(
            "differential privacy: resuming is not supported (the accountant's history and the sampler's state are "
            "not checkpointed); start the run again with --overwrite_output_dir true"
        )
    if training_args.fp16 or training_args.bf16:
        raise ValueError("differential privacy runs in fp32 here; drop --fp16/--bf16")


def calibrated_noise_multiplier(settings: DPSettings, sample_rate: float, steps: int) -> float:
    """The noise multiplier that spends at most ``settings.target_epsilon`` in ``steps`` Poisson-sampled steps
    (Opacus' ``get_noise_multiplier``), or the one given."""
    if settings.noise_multiplier is not None:
        return float(settings.noise_multiplier)
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=settings.target_epsilon,
            target_delta=settings.delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=settings.accountant,
        )
    )


def spent_epsilon(accountant, delta: float) -> float:
    """The accountant's epsilon at ``delta`` so far (0 before any step)."""
    if not accountant.history:
        return 0.0
    return float(accountant.get_epsilon(delta=delta))


def slice_batch(batch: Any, i: int) -> Any:
    """Row ``i`` of a (nested) batch, keeping the batch dimension: ``(B, ...) -> (1, ...)``."""
    if isinstance(batch, torch.Tensor):
        return batch[i : i + 1]
    if isinstance(batch, Mapping):
        return {k: slice_batch(v, i) for k, v in batch.items()}
    return batch


def batch_size_of(batch: Mapping[str, Any]) -> int:
    return int(batch["labels"].shape[0])


def per_sample_gradients(
    model: nn.Module, batch: Mapping[str, Any], params: list[nn.Parameter]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-sample gradients of each row's own loss, one row at a time: ``([(B, *p.shape) per param], losses (B,))``.

    Exact for any model (no grad-sampler hooks): row ``i``'s loss is the model's loss on row ``i`` alone. A
    parameter a row does not reach (a modality it lacks) gets a zero gradient for that row.
    """
    n = batch_size_of(batch)
    grads = [torch.zeros((n, *p.shape), dtype=p.dtype, device=p.device) for p in params]
    losses = torch.zeros(n)
    for i in range(n):
        loss = model(**slice_batch(batch, i)).loss
        row = torch.autograd.grad(loss, params, allow_unused=True)
        for buf, g in zip(grads, row):
            if g is not None:
                buf[i] = g
        losses[i] = loss.detach().float().cpu()
    return grads, losses


class EmptyAwareCollator:
    """The task collator, plus the empty batch Poisson sampling can draw (``{"labels": (0,)}``)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        if not features:
            return {"labels": torch.zeros(0)}
        return self.collator(features)


class DPTaskTrainer(TaskTrainer):
    """:class:`TaskTrainer` with DP-SGD: Poisson-sampled training batches, per-sample gradients, Opacus'
    ``DPOptimizer`` (clipping + noise) and accountant. The spent epsilon (and delta) is added to every log line,
    evaluations included, and logged; :meth:`privacy_report` is what ``all_results.json`` and the card show."""

    def __init__(self, *args, dp: DPSettings, **kwargs):
        super().__init__(*args, **kwargs)
        from opacus.accountants import create_accountant

        if self.args.max_grad_norm:  # the Trainer's batch-level clipping has no meaning under DP-SGD
            self.args.max_grad_norm = 0.0
        self.dp = dp
        self.accountant = create_accountant(mechanism=dp.accountant)
        n = len(self.train_dataset)
        if n == 0:
            raise ValueError("differential privacy: the training split is empty")
        self.sample_rate = min(1.0, self.args.per_device_train_batch_size / n)
        self.steps_per_epoch = max(1, int(1 / self.sample_rate))
        if self.args.max_steps and self.args.max_steps > 0:
            self.total_steps = int(self.args.max_steps)
        else:
            self.total_steps = math.ceil(self.args.num_train_epochs * self.steps_per_epoch)
        self.noise_multiplier = calibrated_noise_multiplier(dp, self.sample_rate, self.total_steps)
        self.sampler_generator = torch.Generator().manual_seed(int(self.args.seed))
        self.noise_generator = torch.Generator().manual_seed(int(self.args.seed) + 1)
        self._empty_batches = 0
        logger.info(
            "DP-SGD: %d training rows, Poisson sample rate %.4f, %d steps, noise multiplier %.4f, clipping norm %g, "
            "%s accountant, delta %g%s",
            n,
            self.sample_rate,
            self.total_steps,
            self.noise_multiplier,
            dp.max_grad_norm,
            dp.accountant,
            dp.delta,
            f", target epsilon {dp.target_epsilon}" if dp.target_epsilon is not None else "",
        )

    def get_train_dataloader(self):
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        sampler = UniformWithReplacementSampler(
            num_samples=len(self.train_dataset),
            sample_rate=self.sample_rate,
            generator=self.sampler_generator,
            steps=self.steps_per_epoch,
        )
        return torch.utils.data.DataLoader(
            self.train_dataset,
            batch_sampler=sampler,
            collate_fn=EmptyAwareCollator(self.data_collator),
            num_workers=self.args.dataloader_num_workers,
        )

    def create_optimizer(self, model=None):
        from opacus.optimizers import DPOptimizer

        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        if not isinstance(optimizer, DPOptimizer):
            self.optimizer = DPOptimizer(
                optimizer,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.dp.max_grad_norm,
                expected_batch_size=self.args.per_device_train_batch_size,
                loss_reduction="mean",
                generator=self.noise_generator,
            )
            self.optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        return self.optimizer

    def dp_optimizer(self):
        """The ``DPOptimizer`` (under accelerate's optimizer wrapper once training started)."""
        from opacus.optimizers import DPOptimizer

        opt = self.optimizer
        while not isinstance(opt, DPOptimizer):
            opt = opt.optimizer
        return opt

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        optimizer = self.dp_optimizer()
        optimizer.zero_grad(set_to_none=True)  # also clears grad_sample and summed_grad
        params = list(optimizer.params)
        inputs = self._prepare_inputs(inputs)
        n = batch_size_of(inputs)
        if n == 0:  # an empty Poisson batch: the step still adds noise (the sample rate is what is accounted)
            self._empty_batches += 1
            for p in params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            return torch.tensor(0.0, device=self.args.device)
        grads, losses = per_sample_gradients(model, inputs, params)
        for p, g in zip(params, grads):
            p.grad_sample = g  # p.grad stays unset: DPOptimizer writes the clipped, noised mean there
        return losses.mean().to(self.args.device)

    def _get_grad_norm(self, model, grad_norm=None):
        # the norm of the un-noised batch gradient would leak what DP-SGD hides: not logged under DP
        return None

    def epsilon(self) -> float:
        return spent_epsilon(self.accountant, self.dp.delta)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        eps = self.epsilon()
        logs = {**logs, "dp_epsilon": round(eps, 4), "dp_delta": self.dp.delta}
        if any(k.startswith("eval_") for k in logs):
            logger.info(
                "DP at evaluation (step %d): epsilon %.4f spent (delta %g)", self.state.global_step, eps, self.dp.delta
            )
        super().log(logs, *args, **kwargs)

    def privacy_report(self) -> dict[str, Any]:
        """What ``all_results.json`` and the model card say about the guarantee."""
        import opacus

        steps = sum(s for _, _, s in self.accountant.history)
        return {
            "mechanism": "DP-SGD (Opacus DPOptimizer): Poisson sampling, per-sample clipping, Gaussian noise",
            "opacus": opacus.__version__,
            "epsilon": self.epsilon(),
            "delta": self.dp.delta,
            "target_epsilon": self.dp.target_epsilon,
            "accountant": self.dp.accountant,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.dp.max_grad_norm,
            "sample_rate": self.sample_rate,
            "expected_batch_size": self.args.per_device_train_batch_size,
            "steps": int(steps),
            "empty_batches": self._empty_batches,
            "per_sample_gradients": "exact, one sample at a time",
            "protected": "training rows (sample-level: one row added or removed)",
        }


def clear_grad_samples(model: nn.Module) -> None:
    """Drop the per-sample gradient buffers DP training left on the parameters."""
    for p in model.parameters():
        for attr in ("grad_sample", "summed_grad"):
            if hasattr(p, attr):
                delattr(p, attr)
