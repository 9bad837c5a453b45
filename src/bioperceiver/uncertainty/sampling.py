"""MC-dropout and deep ensembles: :class:`PredictiveUncertainty` summaries of stochastic predictions.

Everything works on numpy arrays of raw model outputs as :func:`bioperceiver.training.tasks.predict` returns them;
what a summary holds (probabilities and entropies, or mean/std of a risk or value) is the task's choice
(:meth:`bioperceiver.tasks.Task.summarize`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..tasks import Task, get_task, resolve_task

logger = logging.getLogger(__name__)


def task_kind(task: str | Task, outputs: np.ndarray | None = None) -> str:
    """``"multiclass" | "binary" | "multilabel" | "regression" | "survival"`` for a task (name or object); a
    classification task with a single output column (one logit) is ``"binary"``."""
    return resolve_task(task, outputs).kind


def _declared_task(model: nn.Module) -> str:
    """The task a BioPerceiver task model declares (``model.output_task``)."""
    task = getattr(model, "output_task", None)
    if task is None:
        raise ValueError(f"{type(model).__name__} declares no output_task; pass task= (a Task or its name)")
    return task


def _mean_std(x: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std (``ddof=0``) along ``axis``, shifted by the first slice so that identical samples
    give exactly that value and exactly zero std (no rounding from summing and dividing)."""
    x0 = np.take(x, [0], axis=axis)
    d = x - x0
    mean_d = d.mean(axis=axis, keepdims=True)
    std = np.sqrt(((d - mean_d) ** 2).mean(axis=axis))
    return np.squeeze(x0 + mean_d, axis=axis), std


def _valid_rows(outputs: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    out = np.asarray(outputs, dtype=np.float64)
    ok = np.isfinite(out.reshape(len(out), -1)).all(axis=1)
    if labels is not None:
        y = np.asarray(labels, dtype=np.float64)
        y = y.reshape(len(y), -1)
        ok &= np.isfinite(y).any(axis=1) if y.shape[1] > 1 else np.isfinite(y[:, 0])
    return ok


# ---------------------------------------------------------------------------------------------------------------
# MC-dropout and deep ensembles
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PredictiveUncertainty:
    """Summary of ``S`` stochastic predictions (MC-dropout passes or ensemble members) of ``N`` samples.

    * classification (``task`` ``"multiclass"``): ``mean`` ``(N, C)`` mean probabilities, ``std`` ``(N, C)``
      their std over the ``S`` samples (``ddof=0``), ``predictive_entropy`` ``(N,)`` :math:`H[\\bar p]`,
      ``expected_entropy`` ``(N,)`` :math:`\\frac1S\\sum_s H[p_s]` (aleatoric), ``mutual_information`` ``(N,)``
      their difference (epistemic, ``>= 0``).
    * ``"binary"`` (one logit): the same with ``(N,)`` positive-class probabilities and Bernoulli entropies.
    * ``"multilabel"``: per label, everything ``(N, C)`` (Bernoulli entropies).
    * ``"survival"``: ``mean``/``std`` ``(N,)`` of the risk; ``"regression"``: ``(N,)`` (one target) or
      ``(N, K)`` of the prediction. Entropies are ``None``.

    ``samples`` ``(S, N, K)``: the raw outputs (logits, risk or values; probabilities when built with
    ``from_logits=False``) for re-summarising, e.g. after temperature scaling (:meth:`with_temperature`).
    """

    task: str
    mean: np.ndarray
    std: np.ndarray
    samples: np.ndarray
    from_logits: bool = True
    predictive_entropy: np.ndarray | None = None
    expected_entropy: np.ndarray | None = None
    mutual_information: np.ndarray | None = None
    temperature: float | np.ndarray | None = None

    @property
    def n_samples(self) -> int:
        return int(self.samples.shape[0])

    def with_temperature(self, temperature: float | np.ndarray) -> PredictiveUncertainty:
        """Re-summarise logit samples with every pass divided by ``temperature``."""
        if not self.from_logits or not get_task(self.task).has_probabilities:
            raise ValueError("temperature applies to classification logit samples only")
        return summarize_samples(self.samples, self.task, temperature=temperature)

    def columns(self, prefix: str = "mc_", class_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """One-dimensional per-sample columns: multiclass/binary ``{prefix}std`` (std of the probability of the
        predicted class), ``{prefix}entropy``, ``{prefix}mutual_information``; multilabel the same per label
        (``{prefix}std_<label>`` ...); survival/regression ``{prefix}mean`` and ``{prefix}std``."""
        return get_task(self.task).uncertainty_columns(self, prefix, class_names)


def summarize_samples(
    samples: np.ndarray | Sequence[np.ndarray],
    task: str | Task,
    *,
    from_logits: bool = True,
    temperature: float | np.ndarray | None = None,
) -> PredictiveUncertainty:
    """Summarise ``samples`` ``(S, N, K)`` (or ``(S, N)``) of raw outputs into a :class:`PredictiveUncertainty`.
    ``from_logits=False``: classification samples are already probabilities. The task (an object, or a name such
    as ``"classification"``, ``"binary"``, ``"survival"``) decides the summary
    (:meth:`~bioperceiver.tasks.Task.summarize`)."""
    x = np.asarray(np.stack([np.asarray(s, dtype=np.float64) for s in samples]), dtype=np.float64)
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3:
        raise ValueError(f"samples must be (S, N, K) or (S, N), got {x.shape}")
    return resolve_task(task, x[0]).summarize(x, from_logits=from_logits, temperature=temperature)


def _attention_dropout_types() -> tuple[type, ...]:
    from ..layers.attention import CrossAttention, SelfAttention

    return (CrossAttention, SelfAttention)


def dropout_modules(model: nn.Module, attention: bool = True) -> list[nn.Module]:
    """The modules whose train flag switches dropout: every ``nn.Dropout*`` and (``attention=True``) the
    BioPerceiver attention layers, which apply dropout to the attention probabilities only in training mode
    (their other behaviour, projections and LayerNorm, does not depend on the flag)."""
    kinds: tuple[type, ...] = (nn.modules.dropout._DropoutNd,)
    if attention:
        kinds += _attention_dropout_types()
    return [m for m in model.modules() if isinstance(m, kinds)]


def _dropout_rate(m: nn.Module) -> float:
    p = getattr(m, "p", None)
    if p is None:
        p = getattr(m, "dropout", 0.0)
    return float(p or 0.0)


@contextlib.contextmanager
def mc_dropout_mode(model: nn.Module, attention: bool = True):
    """Inside the block, the model is in eval mode except its dropout (see :func:`dropout_modules`), also when
    the code inside calls ``model.eval()`` (as :func:`~bioperceiver.training.tasks.predict` does): a forward
    pre-hook re-enables dropout before every forward. Every module's train flag is restored on exit."""
    flags = {m: m.training for m in model.modules()}
    targets = dropout_modules(model, attention)

    def enable(*_):
        for m in targets:
            m.training = True

    model.eval()
    enable()
    handle = model.register_forward_pre_hook(enable)
    try:
        yield targets
    finally:
        handle.remove()
        for m, flag in flags.items():
            m.training = flag


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def _to_device(x: Any, device: torch.device | None) -> Any:
    if device is None:
        return x
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device) for v in x)
    return x


def _model_device(model: nn.Module) -> torch.device | None:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return None


def _raw_output(out: Any) -> torch.Tensor:
    """``(B, K)``: the survival risk as one column, else the logits."""
    risk = getattr(out, "risk", None)
    if risk is not None:
        return risk.reshape(-1, 1)
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    if logits is None:
        raise ValueError(f"cannot find risk or logits in the model output {type(out).__name__}")
    return logits


DataSource = Callable[[nn.Module], Any] | Iterable[Mapping[str, Any]]


def _materialize(data: DataSource) -> DataSource:
    if callable(data) or isinstance(data, (list, tuple)):
        return data
    if iter(data) is data:  # a one-shot iterator/generator: keep its batches for the repeated passes
        return list(data)
    return data


def _forward_all(model: nn.Module, data: DataSource, device: torch.device | None) -> np.ndarray:
    """``(N, K)`` float64 raw outputs of one pass over ``data``.

    ``data``: a callable ``f(model) -> (N, K)`` array/tensor (e.g.
    ``lambda m: predict(m, dataset, modalities, device=device)[0]``), or an iterable of batches, each either the
    collator's dict (its ``"inputs"`` — or ``"latents"`` — are passed to the model; labels are ignored) or a dict
    of modality inputs."""
    if callable(data):
        out = data(model)
        if isinstance(out, tuple):
            out = out[0]
        if isinstance(out, torch.Tensor):
            out = out.detach().float().cpu().numpy()
        out = np.asarray(out, dtype=np.float64)
        return out[:, None] if out.ndim == 1 else out
    chunks = []
    with torch.no_grad():
        for batch in data:
            if "inputs" in batch or "latents" in batch:
                kwargs = {k: batch[k] for k in ("inputs", "latents") if k in batch}
            else:
                kwargs = {"inputs": batch}
            out = model(**_to_device(kwargs, device), return_dict=True)
            chunks.append(_raw_output(out).detach().float().cpu().numpy().astype(np.float64))
    if not chunks:
        raise ValueError("no batches in data")
    return np.concatenate(chunks)


def _pass_seed(seed: int, s: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(s)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def mc_dropout_predict(
    model: nn.Module,
    data: DataSource,
    n_samples: int = 20,
    seed: int = 0,
    *,
    task: str | Task | None = None,
    attention_dropout: bool = True,
    temperature: float | np.ndarray | None = None,
    device: torch.device | str | None = None,
) -> PredictiveUncertainty:
    """MC-dropout: ``n_samples`` forward passes over ``data`` with only dropout active (see
    :func:`mc_dropout_mode`), summarised by :func:`summarize_samples`.

    ``data``: a callable ``f(model) -> (N, K)`` (e.g. ``lambda m: predict(m, ds, modalities, device=d)[0]``;
    its ``model.eval()`` is overridden) or an iterable of batches (collator dicts with ``"inputs"``, or dicts of
    modality inputs), moved to ``device`` (default: the model's). Pass ``s`` is seeded from ``(seed, s)``, so the
    result is deterministic (on CPU; on GPU up to non-deterministic kernels) and its first ``k`` passes do not
    depend on ``n_samples``; the global torch RNG state is restored afterwards. ``task`` (a
    :class:`~bioperceiver.tasks.Task` or name) defaults to the one the model declares (``model.output_task``);
    ``temperature`` divides each pass's logits. The model's train/eval flags are restored."""
    if n_samples < 1:
        raise ValueError("n_samples must be >= 1")
    kind = get_task(task if task is not None else _declared_task(model))
    device = torch.device(device) if device is not None else _model_device(model)
    data = _materialize(data)
    if not any(_dropout_rate(m) > 0 for m in dropout_modules(model, attention_dropout)):
        logger.warning("MC-dropout: the model has no dropout with p > 0; every pass is identical (std = 0)")
    cuda = [device.index or 0] if device is not None and device.type == "cuda" else []
    passes = []
    with torch.random.fork_rng(devices=cuda), mc_dropout_mode(model, attention_dropout):
        for s in range(n_samples):
            torch.manual_seed(_pass_seed(seed, s))
            passes.append(_forward_all(model, data, device))
    return summarize_samples(np.stack(passes), kind, temperature=temperature)


def ensemble_predict(
    members: Sequence[nn.Module] | Sequence[np.ndarray],
    data: DataSource | None = None,
    *,
    task: str | Task | None = None,
    from_logits: bool = True,
    temperature: float | np.ndarray | None = None,
    center_risk: bool | None = None,
    device: torch.device | str | None = None,
) -> PredictiveUncertainty:
    """Deep ensemble: the predictions of several finetuned models (each in eval mode over ``data``, as in
    :func:`mc_dropout_predict`; train flags restored) or of prediction arrays ``(N, K)`` (``from_logits=False``:
    probabilities), summarised by :func:`summarize_samples` (mean probabilities, their std across members,
    mutual information = member disagreement).

    ``center_risk`` (survival): subtract each member's mean risk over the samples before combining. A Cox
    partial likelihood does not identify an additive constant (the head bias gets no gradient), so the risks of
    independently trained Cox models differ by arbitrary offsets; default: the task's choice
    (:meth:`~bioperceiver.tasks.Task.centre_ensemble`: on when any member is a Cox model)."""
    if not len(members):
        raise ValueError("an ensemble needs at least one member")
    is_model = isinstance(members[0], nn.Module)
    if is_model:
        if data is None:
            raise ValueError("pass data (a callable or batches) to run model members")
        kinds = {_declared_task(m) for m in members}
        if task is None:
            if len(kinds) > 1:
                raise ValueError(f"ensemble members solve different tasks: {sorted(kinds)}")
            task = kinds.pop()
        data = _materialize(data)
        outs = []
        for m in members:
            dev = torch.device(device) if device is not None else _model_device(m)
            with _eval_mode(m):
                outs.append(_forward_all(m, data, dev))
        if center_risk is None:
            center_risk = get_task(task).centre_ensemble([m.config for m in members])
    else:
        if task is None:
            raise ValueError("pass task= with prediction arrays")
        outs = [np.asarray(a, dtype=np.float64) for a in members]
        shapes = {a.shape for a in outs}
        if len(shapes) > 1:
            raise ValueError(f"ensemble members' predictions differ in shape: {sorted(shapes)}")
    kind = resolve_task(task, outs[0] if outs[0].ndim > 1 else outs[0][:, None])
    x = np.stack([a[:, None] if a.ndim == 1 else a for a in outs])
    if center_risk:
        x = kind.center(x)  # survival: each member's mean risk removed; other tasks: unchanged
    return summarize_samples(x, kind, from_logits=from_logits, temperature=temperature)
