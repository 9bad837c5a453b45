"""Predictive uncertainty, calibration and conformal prediction for finetuned BioPerceiver task models.

Everything works on numpy arrays of raw model outputs as :func:`bioperceiver.training.tasks.predict` returns them
(logits ``(N, C)`` for classification, ``(N, C)`` label logits for multilabel, standardised values ``(N, 1)`` for
regression, risks ``(N, 1)`` for survival); rows that are all-NaN (no prediction) are left out of every fit and
get NaN in every per-sample column.

* **MC-dropout** (:func:`mc_dropout_predict`): ``n_samples`` stochastic forward passes with only the dropout
  (``nn.Dropout*`` and the attention-probability dropout of the Perceiver attention layers) switched on;
  LayerNorm and everything else stay as they were. Seeded per pass, the caller's RNG state is restored and so is
  every module's train/eval flag.
* **Deep ensembles** (:func:`ensemble_predict`): several finetuned models (or their prediction arrays).
* Both return a :class:`PredictiveUncertainty`: mean probabilities (or mean risk / value), their standard
  deviation over samples/members, the predictive entropy :math:`H[\\bar p]`, the expected entropy
  :math:`\\mathbb{E}_s H[p_s]` (aleatoric) and the mutual information :math:`H[\\bar p] - \\mathbb{E}_s H[p_s]`
  (epistemic, BALD), in nats.
* **Temperature scaling** (:func:`fit_temperature`): one temperature (or one per label for multilabel) minimising
  the validation negative log-likelihood. The NLL is convex in the inverse temperature, so a bounded Brent search
  (``scipy.optimize.minimize_scalar``) finds the global optimum.
* **Calibration error** (:func:`expected_calibration_error`): equal-width bins ``(lo, hi]`` (a probability of
  exactly 0 falls into the first bin); ``"top_label"`` ECE (Guo et al., 2017: confidence = max probability,
  accuracy of the argmax), ``"binary"`` (probability of the positive class against the 0/1 label) and
  ``"classwise"`` (Kull et al., 2019: the mean over classes of the one-vs-rest binary ECE; multilabel: over
  labels, unknown ``-1`` entries left out). :func:`plot_reliability_diagram` draws before/after in one PNG.
* **Split-conformal prediction** (:func:`calibrate_conformal`): LAC (score :math:`1 - p_y`) or APS (the
  probability mass of the classes ranked at least as high as :math:`y`, randomised by default), threshold the
  :math:`\\lceil (n+1)(1-\\alpha) \\rceil`-th smallest calibration score (``inf``, i.e. every class, when that
  exceeds ``n``); marginal coverage :math:`\\ge 1-\\alpha` on exchangeable test data, whatever the model.
  :func:`calibrate_conformal_regression`: intervals ``prediction ± q`` from absolute residuals (optionally
  normalised by a per-sample scale such as the MC-dropout std).
* :func:`uncertainty_report`: the whole pipeline for one finetuning run — temperature on the validation split,
  ECE before/after on validation and test, conformal calibration on the validation split and coverage on the
  test split, a reliability diagram, and a per-test-sample :class:`pandas.DataFrame` (to append to
  ``predictions_test.csv``) plus a flat dict of numbers for the model card.

Note on reusing one split: :func:`uncertainty_report` fits the temperature and calibrates the conformal threshold
on the same validation rows. A one-parameter fit barely perturbs exchangeability, but the guarantee is exact only
with ``conformal_fraction`` (a disjoint share of the validation rows kept for conformal calibration).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from scipy.special import entr, expit, log_expit, logsumexp, softmax
from torch import nn

logger = logging.getLogger(__name__)

# Task names accepted everywhere: the library's LabelSpec tasks, transformers problem types and explicit kinds.
_KINDS = {
    "classification": "multiclass",
    "multiclass": "multiclass",
    "single_label_classification": "multiclass",
    "binary": "binary",
    "multilabel": "multilabel",
    "multi_label_classification": "multilabel",
    "regression": "regression",
    "survival": "survival",
}
CLASSIFICATION_KINDS = ("multiclass", "binary", "multilabel")
ECE_MODES = ("top_label", "binary", "classwise")
CONFORMAL_SCORES = ("lac", "aps")


def task_kind(task: str, outputs: np.ndarray | None = None) -> str:
    """``"multiclass" | "binary" | "multilabel" | "regression" | "survival"`` for a task name; a
    ``"classification"`` task with a single output column (one logit) is ``"binary"``."""
    if task not in _KINDS:
        raise ValueError(f"task {task!r}; choose one of {sorted(_KINDS)}")
    kind = _KINDS[task]
    if kind == "multiclass" and outputs is not None and (outputs.ndim == 1 or outputs.shape[-1] == 1):
        kind = "binary"
    return kind


def model_task(model: nn.Module) -> str:
    """The task kind of a BioPerceiver task model (from its class and ``config.problem_type``)."""
    if type(model).__name__.endswith("Survival"):
        return "survival"
    config = model.config
    kind = config.problem_type
    if kind is None:
        kind = "regression" if config.num_labels == 1 else "single_label_classification"
    return task_kind(kind)


# ---------------------------------------------------------------------------------------------------------------
# Small numerics
# ---------------------------------------------------------------------------------------------------------------


def _mean_std(x: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std (``ddof=0``) along ``axis``, shifted by the first slice so that identical samples
    give exactly that value and exactly zero std (no rounding from summing and dividing)."""
    x0 = np.take(x, [0], axis=axis)
    d = x - x0
    mean_d = d.mean(axis=axis, keepdims=True)
    std = np.sqrt(((d - mean_d) ** 2).mean(axis=axis))
    return np.squeeze(x0 + mean_d, axis=axis), std


def _categorical_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy (nats) over the last axis, ``0 log 0 = 0``."""
    return entr(p).sum(axis=-1)


def _bernoulli_entropy(p: np.ndarray) -> np.ndarray:
    return entr(p) + entr(1.0 - p)


def to_probabilities(outputs: np.ndarray, task: str, temperature: float | np.ndarray | None = None) -> np.ndarray:
    """Logits -> probabilities: softmax over the last axis (multiclass) or a sigmoid per entry (binary with one
    logit, multilabel), after dividing by ``temperature`` (scalar, or ``(C,)`` per label)."""
    z = np.asarray(outputs, dtype=np.float64)
    kind = task_kind(task, z)
    if temperature is not None:
        z = z / np.asarray(temperature, dtype=np.float64)
    if kind == "multiclass":
        return softmax(z, axis=-1)
    if kind in ("binary", "multilabel"):
        return expit(z)
    raise ValueError(f"no probabilities for a {kind} task")


def _as_class_probs(probs: np.ndarray) -> np.ndarray:
    """``(N,)`` or ``(N, 1)`` positive-class probabilities -> ``(N, 2)``; ``(N, C)`` unchanged."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1 or p.shape[1] == 1:
        p = p.reshape(-1)
        return np.stack([1.0 - p, p], axis=1)
    return p


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
        if not self.from_logits or self.task not in CLASSIFICATION_KINDS:
            raise ValueError("temperature applies to classification logit samples only")
        return summarize_samples(self.samples, self.task, temperature=temperature)

    def columns(self, prefix: str = "mc_", class_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """One-dimensional per-sample columns: multiclass/binary ``{prefix}std`` (std of the probability of the
        predicted class), ``{prefix}entropy``, ``{prefix}mutual_information``; multilabel the same per label
        (``{prefix}std_<label>`` ...); survival/regression ``{prefix}mean`` and ``{prefix}std``."""
        if self.task == "multiclass":
            top = np.nan_to_num(self.mean, nan=-1.0).argmax(axis=1)
            return {
                f"{prefix}std": np.take_along_axis(self.std, top[:, None], axis=1)[:, 0],
                f"{prefix}entropy": self.predictive_entropy,
                f"{prefix}mutual_information": self.mutual_information,
            }
        if self.task == "binary":
            return {
                f"{prefix}std": self.std,
                f"{prefix}entropy": self.predictive_entropy,
                f"{prefix}mutual_information": self.mutual_information,
            }
        if self.task == "multilabel":
            names = list(class_names) if class_names is not None else [str(k) for k in range(self.mean.shape[1])]
            cols: dict[str, np.ndarray] = {}
            for what, arr in (
                ("std", self.std),
                ("entropy", self.predictive_entropy),
                ("mutual_information", self.mutual_information),
            ):
                cols.update({f"{prefix}{what}_{c}": arr[:, k] for k, c in enumerate(names)})
            return cols
        mean, std = self.mean, self.std
        if mean.ndim == 2:
            names = list(class_names) if class_names is not None else [str(k) for k in range(mean.shape[1])]
            return {
                **{f"{prefix}mean_{c}": mean[:, k] for k, c in enumerate(names)},
                **{f"{prefix}std_{c}": std[:, k] for k, c in enumerate(names)},
            }
        return {f"{prefix}mean": mean, f"{prefix}std": std}


def summarize_samples(
    samples: np.ndarray | Sequence[np.ndarray],
    task: str,
    *,
    from_logits: bool = True,
    temperature: float | np.ndarray | None = None,
) -> PredictiveUncertainty:
    """Summarise ``samples`` ``(S, N, K)`` (or ``(S, N)``) of raw outputs into a :class:`PredictiveUncertainty`.
    ``from_logits=False``: classification samples are already probabilities."""
    x = np.asarray(np.stack([np.asarray(s, dtype=np.float64) for s in samples]), dtype=np.float64)
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3:
        raise ValueError(f"samples must be (S, N, K) or (S, N), got {x.shape}")
    kind = task_kind(task, x[0])
    if kind in ("survival", "regression"):
        values = x[:, :, 0] if x.shape[2] == 1 else x
        mean, std = _mean_std(values)
        return PredictiveUncertainty(kind, mean, std, x, from_logits=from_logits)
    if kind == "binary":
        x = x[:, :, :1]
    if from_logits:
        p = to_probabilities(x, kind, temperature)
    else:
        if temperature is not None:
            raise ValueError("temperature needs logit samples (from_logits=True)")
        p = x
    if kind == "binary":
        p = p[:, :, 0]
    mean, std = _mean_std(p)
    if kind == "multiclass":
        h = _categorical_entropy(mean)
        eh, _ = _mean_std(_categorical_entropy(p))
    else:
        h = _bernoulli_entropy(mean)
        eh, _ = _mean_std(_bernoulli_entropy(p))
    mi = np.maximum(h - eh, 0.0)
    return PredictiveUncertainty(
        kind,
        mean,
        std,
        x,
        from_logits=from_logits,
        predictive_entropy=h,
        expected_entropy=eh,
        mutual_information=mi,
        temperature=temperature,
    )


def _attention_dropout_types() -> tuple[type, ...]:
    from .layers.attention import CrossAttention, SelfAttention

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
    task: str | None = None,
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
    depend on ``n_samples``; the global torch RNG state is restored afterwards. ``task`` defaults to the model's
    (:func:`model_task`); ``temperature`` divides each pass's logits. The model's train/eval flags are restored."""
    if n_samples < 1:
        raise ValueError("n_samples must be >= 1")
    kind = task_kind(task) if task is not None else model_task(model)
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
    task: str | None = None,
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
    independently trained Cox models differ by arbitrary offsets; default: on when any member is a Cox model."""
    if not len(members):
        raise ValueError("an ensemble needs at least one member")
    is_model = isinstance(members[0], nn.Module)
    if is_model:
        if data is None:
            raise ValueError("pass data (a callable or batches) to run model members")
        kinds = {model_task(m) for m in members}
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
            center_risk = any(
                getattr(m.config, "survival_loss", None) == "cox"
                for m in members
                if type(m).__name__.endswith("Survival")
            )
    else:
        if task is None:
            raise ValueError("pass task= with prediction arrays")
        outs = [np.asarray(a, dtype=np.float64) for a in members]
        shapes = {a.shape for a in outs}
        if len(shapes) > 1:
            raise ValueError(f"ensemble members' predictions differ in shape: {sorted(shapes)}")
    kind = task_kind(task, outs[0] if outs[0].ndim > 1 else outs[0][:, None])
    x = np.stack([a[:, None] if a.ndim == 1 else a for a in outs])
    if kind == "survival" and center_risk:
        x = x - np.nanmean(x, axis=1, keepdims=True)
    return summarize_samples(x, kind, from_logits=from_logits, temperature=temperature)


# ---------------------------------------------------------------------------------------------------------------
# Temperature scaling
# ---------------------------------------------------------------------------------------------------------------


def _prepare_classification(logits, labels, task) -> tuple[str, np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if z.ndim == 1:
        z = z[:, None]
    kind = task_kind(task, z)
    if kind not in CLASSIFICATION_KINDS:
        raise ValueError(f"temperature scaling needs a classification task, got {task!r}")
    if kind in ("multiclass",):
        y = y.reshape(-1)
        ok = _valid_rows(z) & np.isfinite(y) & (y >= 0)
        z, y = z[ok], y[ok].astype(np.int64)
        if y.size and y.max() >= z.shape[1]:
            raise ValueError(f"class index {y.max()} out of range for {z.shape[1]} logits")
    elif kind == "binary":
        z, y = z[:, 0], y.reshape(-1)
        ok = np.isfinite(z) & np.isfinite(y) & (y >= 0)
        z, y = z[ok], y[ok]
    else:
        y = y.reshape(z.shape)
        ok = _valid_rows(z)
        z, y = z[ok], y[ok]
    return kind, z, y


def _nll(kind: str, z: np.ndarray, y: np.ndarray, beta: float | np.ndarray = 1.0) -> float:
    """Mean negative log-likelihood of ``beta * logits`` (``beta`` = 1 / temperature)."""
    s = z * beta
    if kind == "multiclass":
        return float(np.mean(logsumexp(s, axis=1) - np.take_along_axis(s, y[:, None], axis=1)[:, 0]))
    observed = np.isfinite(y) & (y >= 0)
    if not observed.any():
        return float("nan")
    ll = np.where(observed, np.nan_to_num(y) * log_expit(s) + (1 - np.nan_to_num(y)) * log_expit(-s), 0.0)
    return float(-ll.sum() / observed.sum())


def negative_log_likelihood(
    logits, labels, task: str = "classification", temperature: float | np.ndarray = 1.0
) -> float:
    """Mean NLL of ``logits / temperature`` (multilabel: over the observed entries, ``-1`` = unknown)."""
    kind, z, y = _prepare_classification(logits, labels, task)
    return _nll(kind, z, y, 1.0 / np.asarray(temperature, dtype=np.float64))


@dataclass
class TemperatureScaler:
    """A fitted temperature: ``temperature`` (float, or ``(C,)`` per label), the validation NLL before (T = 1)
    and after, the number of rows fitted on and whether the optimum hit the search bounds."""

    task: str
    temperature: float | np.ndarray
    nll_before: float
    nll_after: float
    n: int
    at_bound: bool = False

    def transform(self, logits: np.ndarray) -> np.ndarray:
        """Scaled logits ``logits / T``."""
        return np.asarray(logits, dtype=np.float64) / np.asarray(self.temperature, dtype=np.float64)

    def predict_proba(self, logits: np.ndarray) -> np.ndarray:
        return to_probabilities(logits, self.task, self.temperature)

    def to_dict(self) -> dict[str, Any]:
        t = self.temperature
        return {
            "temperature": t.tolist() if isinstance(t, np.ndarray) else float(t),
            "nll_before": self.nll_before,
            "nll_after": self.nll_after,
            "n": self.n,
            "at_bound": self.at_bound,
        }


def _fit_beta(kind: str, z: np.ndarray, y: np.ndarray, bounds: tuple[float, float]) -> tuple[float, bool]:
    lo, hi = 1.0 / bounds[1], 1.0 / bounds[0]
    res = minimize_scalar(
        lambda b: _nll(kind, z, y, b), bounds=(lo, hi), method="bounded", options={"xatol": 1e-10, "maxiter": 500}
    )
    beta = float(res.x)
    at_bound = min(beta - lo, hi - beta) < 1e-6 * hi
    return beta, at_bound


def fit_temperature(
    logits: np.ndarray,
    labels: np.ndarray,
    task: str = "classification",
    *,
    per_label: bool = False,
    bounds: tuple[float, float] = (0.05, 20.0),
) -> TemperatureScaler:
    """Temperature scaling (Guo et al., 2017): the ``T`` in ``bounds`` minimising the mean validation NLL of
    ``logits / T``. The NLL is convex in ``1 / T``; a bounded Brent search over ``1 / T`` finds the optimum.

    ``logits``: ``(N, C)`` multiclass (``labels`` ``(N,)`` class indices; binary as two logits), ``(N,)``/``(N, 1)``
    binary (``labels`` 0/1), ``(N, C)`` multilabel (``labels`` ``(N, C)`` 0/1, ``-1`` unknown); NaN rows are
    skipped. ``per_label`` (multilabel): one temperature per label, ``temperature`` then ``(C,)``."""
    kind, z, y = _prepare_classification(logits, labels, task)
    if len(z) == 0:
        raise ValueError("no labelled rows with predictions to fit a temperature on")
    before = _nll(kind, z, y, 1.0)
    if kind == "multilabel" and per_label:
        temps, hits = [], []
        for k in range(z.shape[1]):
            obs = np.isfinite(y[:, k]) & (y[:, k] >= 0)
            if not obs.any():
                temps.append(1.0)
                continue
            beta, hit = _fit_beta("binary", z[obs, k], y[obs, k], bounds)
            temps.append(1.0 / beta)
            hits.append(hit)
        temperature: float | np.ndarray = np.asarray(temps)
        at_bound = any(hits)
    else:
        beta, at_bound = _fit_beta(kind, z, y, bounds)
        temperature = 1.0 / beta
    after = _nll(kind, z, y, 1.0 / np.asarray(temperature))
    if at_bound:
        logger.warning("temperature scaling: the optimum reached the bounds %s (T = %s)", bounds, temperature)
    return TemperatureScaler(kind, temperature, before, after, len(z), at_bound)


# ---------------------------------------------------------------------------------------------------------------
# Calibration error and reliability diagrams
# ---------------------------------------------------------------------------------------------------------------


def _bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bins ``(lo, hi]`` over ``[0, 1]`` (0 goes into the first bin)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.searchsorted(edges[1:-1], p, side="left")


def _binary_bins(p: np.ndarray, hit: np.ndarray, n_bins: int) -> dict[str, np.ndarray]:
    idx = _bin_index(p, n_bins)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(idx, weights=p, minlength=n_bins) / count
        acc = np.bincount(idx, weights=hit.astype(np.float64), minlength=n_bins) / count
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return {"lower": edges[:-1], "upper": edges[1:], "confidence": conf, "accuracy": acc, "count": count}


def _ece_from_bins(b: dict[str, np.ndarray]) -> float:
    n = b["count"].sum()
    if n == 0:
        return float("nan")
    nz = b["count"] > 0
    return float(np.sum(b["count"][nz] / n * np.abs(b["accuracy"][nz] - b["confidence"][nz])))


def _check_probs(p: np.ndarray) -> None:
    if p.size and (np.nanmin(p) < 0 or np.nanmax(p) > 1):
        raise ValueError("probabilities must lie in [0, 1] (pass probabilities, not logits)")


def reliability_bins(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = 15, mode: str = "top_label"
) -> dict[str, np.ndarray] | list[dict[str, np.ndarray]]:
    """Per-bin ``lower``, ``upper``, mean ``confidence``, ``accuracy`` (observed frequency) and ``count``
    (``(n_bins,)`` each; NaN for empty bins). ``mode``: ``"top_label"`` (``probs`` ``(N, C)`` or ``(N,)``
    positive-class probabilities; ``labels`` class indices), ``"binary"`` (positive-class probabilities — column
    1 of a two-column ``probs`` — against 0/1 labels) or ``"classwise"`` (a list: one binary binning per class;
    multilabel ``labels`` ``(N, C)`` with ``-1`` unknown). Rows with a NaN probability or a negative/NaN label are
    left out."""
    if mode not in ECE_MODES:
        raise ValueError(f"mode {mode!r}; choose one of {ECE_MODES}")
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    _check_probs(p)
    if mode == "classwise":
        if y.ndim == 2:  # multilabel
            p = p.reshape(y.shape)
            out = []
            for k in range(p.shape[1]):
                ok = np.isfinite(p[:, k]) & np.isfinite(y[:, k]) & (y[:, k] >= 0)
                out.append(_binary_bins(p[ok, k], y[ok, k] == 1, n_bins))
            return out
        p = _as_class_probs(p)
        ok = _valid_rows(p) & np.isfinite(y) & (y >= 0)
        p, y = p[ok], y[ok]
        return [_binary_bins(p[:, k], y == k, n_bins) for k in range(p.shape[1])]
    if y.ndim == 2 and y.shape[1] > 1:
        raise ValueError(f"mode {mode!r} needs one label per row; use mode='classwise' for multilabel")
    y = y.reshape(-1)
    if mode == "binary":
        q = p if p.ndim == 1 else (p[:, 0] if p.shape[1] == 1 else p[:, 1] if p.shape[1] == 2 else None)
        if q is None:
            raise ValueError("mode 'binary' needs (N,) or two-column probabilities")
        ok = np.isfinite(q) & np.isfinite(y) & (y >= 0)
        return _binary_bins(q[ok], y[ok] == 1, n_bins)
    p = _as_class_probs(p)
    ok = _valid_rows(p) & np.isfinite(y) & (y >= 0)
    p, y = p[ok], y[ok]
    return _binary_bins(p.max(axis=1), p.argmax(axis=1) == y, n_bins)


def expected_calibration_error(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = 15, mode: str = "top_label"
) -> float:
    """ECE :math:`= \\sum_b \\frac{|B_b|}{n} |\\mathrm{acc}(B_b) - \\mathrm{conf}(B_b)|` over ``n_bins``
    equal-width bins ``(lo, hi]``; modes as in :func:`reliability_bins` (``"classwise"``: the mean of the
    per-class binary ECEs over classes with at least one row)."""
    bins = reliability_bins(probs, labels, n_bins, mode)
    if isinstance(bins, list):
        values = [_ece_from_bins(b) for b in bins]
        values = [v for v in values if np.isfinite(v)]
        return float(np.mean(values)) if values else float("nan")
    return _ece_from_bins(bins)


def plot_reliability_diagram(
    labels: np.ndarray,
    probs_before: np.ndarray,
    path: str | Path,
    probs_after: np.ndarray | None = None,
    *,
    n_bins: int = 15,
    mode: str = "top_label",
    title: str | None = None,
    names: tuple[str, str] = ("before", "after temperature scaling"),
) -> Path:
    """Reliability diagram PNG: observed accuracy against mean confidence per equal-width bin, before (and after)
    calibration, with the ECE in the legend and the bin counts below. ``mode="classwise"`` pools the per-class
    one-vs-rest bins (counts add up; accuracy/confidence are count-weighted)."""
    from .evaluation.plots import _plt

    path = Path(path)
    plt = _plt()
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.5, 6.5), height_ratios=[3, 1], sharex=True)
    width = 1.0 / n_bins
    series = [(names[0], probs_before, "tab:red")]
    if probs_after is not None:
        series.append((names[1], probs_after, "tab:blue"))
    for i, (name, probs, color) in enumerate(series):
        bins = reliability_bins(probs, labels, n_bins, mode)
        if isinstance(bins, list):
            count = np.sum([b["count"] for b in bins], axis=0)
            with np.errstate(invalid="ignore", divide="ignore"):
                conf = np.nansum([b["confidence"] * b["count"] for b in bins], axis=0) / count
                acc = np.nansum([b["accuracy"] * b["count"] for b in bins], axis=0) / count
            bins = {"lower": bins[0]["lower"], "count": count, "confidence": conf, "accuracy": acc}
        ece = expected_calibration_error(probs, labels, n_bins, mode)
        nz = bins["count"] > 0
        ax.plot(bins["confidence"][nz], bins["accuracy"][nz], "o-", ms=4, color=color, label=f"{name} (ECE {ece:.3f})")
        offset = (i - (len(series) - 1) / 2) * width / len(series)
        hist.bar(bins["lower"] + width / 2 + offset, bins["count"], width=width / len(series), color=color, alpha=0.7)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    xlabel = "confidence (top-label probability)" if mode == "top_label" else "predicted probability"
    ax.set(
        ylabel="observed accuracy" if mode == "top_label" else "observed frequency",
        xlim=(0, 1),
        ylim=(0, 1),
        title=title or f"reliability diagram ({n_bins} equal-width bins)",
    )
    ax.legend(fontsize=8, loc="upper left")
    hist.set(xlabel=xlabel, ylabel="samples")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Split-conformal prediction
# ---------------------------------------------------------------------------------------------------------------


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """The :math:`\\lceil (n+1)(1-\\alpha) \\rceil`-th smallest of ``n`` calibration scores (the finite-sample
    split-conformal threshold); ``inf`` when that rank exceeds ``n`` (too few calibration rows for ``alpha``)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    s = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))
    n = len(s)
    k = math.ceil((n + 1) * (1 - alpha) - 1e-9)
    if k > n:
        return float("inf")
    return float(s[max(k, 1) - 1])


def _aps_cumulative(p: np.ndarray, u: np.ndarray | None) -> np.ndarray:
    """``(N, C)`` APS score of every class: the probability mass of the classes ranked above it (descending
    probability, stable order) plus its own probability (times ``u`` ``(N,)`` when randomised)."""
    order = np.argsort(-p, axis=1, kind="stable")
    ps = np.take_along_axis(p, order, axis=1)
    before = np.cumsum(ps, axis=1) - ps
    own = ps if u is None else ps * u[:, None]
    ranked = before + own
    if u is None:
        # the last-ranked class holds the whole mass: exactly 1, not 1 +- rounding, which would break the ties
        # (every row's last class scores 1) arbitrarily and with them the coverage guarantee
        ranked[:, -1] = 1.0
    scores = np.empty_like(p)
    np.put_along_axis(scores, order, ranked, axis=1)
    return scores


def conformal_scores(probs: np.ndarray, score: str = "lac", u: np.ndarray | None = None) -> np.ndarray:
    """Non-conformity score ``(N, C)`` of every candidate class: LAC ``1 - p_y``; APS see
    :func:`_aps_cumulative`."""
    p = _as_class_probs(probs)
    if score == "lac":
        return 1.0 - p
    if score == "aps":
        return _aps_cumulative(p, u)
    raise ValueError(f"score {score!r}; choose one of {CONFORMAL_SCORES}")


def coverage_summary(sets: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Empirical ``coverage`` (fraction of rows whose label is in its set), ``mean_set_size``,
    ``singleton_rate``, ``empty_set_rate`` and ``n`` of boolean sets ``(N, C)`` against class indices ``(N,)``."""
    sets = np.asarray(sets, dtype=bool)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    size = sets.sum(axis=1)
    return {
        "coverage": float(sets[np.arange(len(y)), y].mean()) if len(y) else float("nan"),
        "mean_set_size": float(size.mean()) if len(y) else float("nan"),
        "singleton_rate": float((size == 1).mean()) if len(y) else float("nan"),
        "empty_set_rate": float((size == 0).mean()) if len(y) else float("nan"),
        "n": len(y),
    }


@dataclass
class ConformalClassifier:
    """Split-conformal prediction sets at level ``alpha`` from a calibrated threshold ``qhat``.

    ``predict_sets(probs)`` -> boolean ``(N, C)`` (``(N,)`` binary probabilities are read as two classes):
    LAC: ``{y : 1 - p_y <= qhat}``; APS: ``{y : score_y <= qhat}`` with the randomisation ``U ~ U(0, 1)`` drawn
    per test row from ``seed`` (reproducible). Rows with NaN probabilities get an empty set."""

    alpha: float
    score: str
    qhat: float
    n_calibration: int
    randomized: bool = False
    seed: int = 0
    calibration_scores: np.ndarray = field(default=None, repr=False)

    def predict_sets(self, probs: np.ndarray, seed: int | None = None) -> np.ndarray:
        p = _as_class_probs(probs)
        u = None
        if self.score == "aps" and self.randomized:
            u = np.random.default_rng([self.seed if seed is None else seed, 1]).uniform(size=len(p))
        scores = conformal_scores(p, self.score, u)
        with np.errstate(invalid="ignore"):
            return np.where(np.isfinite(scores), scores <= self.qhat, False)

    def evaluate(self, probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """:func:`coverage_summary` of the sets on labelled rows (rows without a label or prediction skipped)."""
        p = _as_class_probs(probs)
        y = np.asarray(labels, dtype=np.float64).reshape(-1)
        sets = self.predict_sets(p)
        ok = _valid_rows(p) & np.isfinite(y) & (y >= 0)
        return coverage_summary(sets[ok], y[ok])

    def to_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "score": self.score,
            "qhat": self.qhat,
            "n_calibration": self.n_calibration,
            "randomized": self.randomized,
        }


def calibrate_conformal(
    probs: np.ndarray,
    labels: np.ndarray,
    alpha: float = 0.1,
    *,
    score: str = "lac",
    randomized: bool = True,
    seed: int = 0,
) -> ConformalClassifier:
    """Split-conformal calibration on held-out rows: ``probs`` ``(N, C)`` (or ``(N,)`` binary) probabilities and
    class indices ``labels`` ``(N,)``; ``score`` ``"lac"`` (least ambiguous sets, smallest on average) or
    ``"aps"`` (adaptive sets; ``randomized`` gives exact rather than conservative coverage). Rows with NaN
    predictions or labels are skipped."""
    if score not in CONFORMAL_SCORES:
        raise ValueError(f"score {score!r}; choose one of {CONFORMAL_SCORES}")
    p = _as_class_probs(probs)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    ok = _valid_rows(p) & np.isfinite(y) & (y >= 0)
    p, y = p[ok], y[ok].astype(np.int64)
    if len(y) == 0:
        raise ValueError("no labelled calibration rows")
    u = np.random.default_rng([seed, 0]).uniform(size=len(p)) if score == "aps" and randomized else None
    s = conformal_scores(p, score, u)[np.arange(len(y)), y]
    qhat = conformal_quantile(s, alpha)
    if not np.isfinite(qhat):
        logger.warning(
            "conformal: %d calibration rows are too few for alpha=%s; every set is all classes", len(y), alpha
        )
    return ConformalClassifier(alpha, score, qhat, len(y), bool(randomized and score == "aps"), seed, s)


@dataclass
class ConformalRegressor:
    """Split-conformal intervals ``prediction ± qhat`` (``normalized``: ``± qhat * scale``)."""

    alpha: float
    qhat: float
    n_calibration: int
    normalized: bool = False

    def predict_intervals(self, pred: np.ndarray, scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        pred = np.asarray(pred, dtype=np.float64).reshape(-1)
        half = self.qhat * (np.asarray(scale, dtype=np.float64).reshape(-1) if self.normalized else 1.0)
        if self.normalized and scale is None:
            raise ValueError("this regressor was calibrated with a scale; pass scale=")
        return pred - half, pred + half

    def evaluate(self, pred: np.ndarray, y: np.ndarray, scale: np.ndarray | None = None) -> dict[str, float]:
        """Empirical ``coverage`` and ``mean_interval_width`` on rows with a prediction and a target."""
        lo, hi = self.predict_intervals(pred, scale)
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        ok = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(y)
        if self.qhat == float("inf"):
            ok = np.isfinite(np.asarray(pred, dtype=np.float64).reshape(-1)) & np.isfinite(y)
        return {
            "coverage": float(((lo[ok] <= y[ok]) & (y[ok] <= hi[ok])).mean()) if ok.any() else float("nan"),
            "mean_interval_width": float((hi[ok] - lo[ok]).mean()) if ok.any() else float("nan"),
            "n": int(ok.sum()),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "qhat": self.qhat,
            "n_calibration": self.n_calibration,
            "normalized": self.normalized,
        }


def calibrate_conformal_regression(
    pred: np.ndarray, y: np.ndarray, alpha: float = 0.1, *, scale: np.ndarray | None = None
) -> ConformalRegressor:
    """Split-conformal regression: scores :math:`|y - \\hat y|` (divided by ``scale`` ``(N,)`` > 0, e.g. the
    MC-dropout std, for adaptive widths) on held-out rows; intervals reach marginal coverage ``>= 1 - alpha``."""
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    s = np.abs(y - pred)
    if scale is not None:
        scale = np.asarray(scale, dtype=np.float64).reshape(-1)
        if np.any(scale[np.isfinite(scale)] <= 0):
            raise ValueError("scale must be > 0")
        s = s / scale
    s = s[np.isfinite(s)]
    if len(s) == 0:
        raise ValueError("no calibration rows with a prediction and a target")
    return ConformalRegressor(alpha, conformal_quantile(s, alpha), len(s), scale is not None)


# ---------------------------------------------------------------------------------------------------------------
# One call for a finetuning run: per-sample columns and card numbers
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class UncertaintyReport:
    """``table``: one row per test sample (same order as the predictions; NaN where a row had no prediction);
    ``metrics``: flat numbers for the model card (see :func:`uncertainty_report`); the fitted
    ``temperature`` / ``conformal`` objects; ``plot``: the reliability diagram path when drawn."""

    table: Any
    metrics: dict[str, Any]
    temperature: TemperatureScaler | None = None
    conformal: ConformalClassifier | ConformalRegressor | None = None
    plot: Path | None = None

    def card_rows(self) -> list[dict[str, Any]]:
        """``[{"quantity", "value", "meaning"}]`` rows for a model-card table (known keys only)."""
        return [
            {"quantity": k, "value": self.metrics[k], "meaning": METRIC_DESCRIPTIONS[k]}
            for k in METRIC_DESCRIPTIONS
            if k in self.metrics
        ]


METRIC_DESCRIPTIONS = {
    "n_calibration": "validation rows used for temperature scaling and conformal calibration",
    "n_test": "test rows with a prediction",
    "temperature": "fitted temperature (logits are divided by it; > 1 means the model was over-confident)",
    "val_nll_before": "validation negative log-likelihood before temperature scaling",
    "val_nll_after": "validation negative log-likelihood after temperature scaling",
    "ece_before": "test expected calibration error before temperature scaling",
    "ece_after": "test expected calibration error after temperature scaling",
    "classwise_ece_before": "test class-wise ECE before temperature scaling",
    "classwise_ece_after": "test class-wise ECE after temperature scaling",
    "val_ece_before": "validation ECE before temperature scaling",
    "val_ece_after": "validation ECE after temperature scaling",
    "ece_mode": "ECE definition (top-label or class-wise, equal-width bins)",
    "ece_bins": "number of equal-width ECE bins",
    "conformal_alpha": "conformal miscoverage level alpha (nominal coverage 1 - alpha)",
    "conformal_score": "conformal score (LAC = 1 - p(true class); APS = adaptive sets)",
    "conformal_qhat": "conformal threshold on the score",
    "coverage": "empirical test coverage of the conformal sets / intervals",
    "mean_set_size": "mean number of classes in a test prediction set",
    "singleton_rate": "fraction of test sets with exactly one class",
    "empty_set_rate": "fraction of empty test sets",
    "mean_interval_width": "mean width of the conformal test intervals",
    "mc_samples": "stochastic passes / ensemble members behind the MC columns",
    "mean_mc_std": "mean over test rows of the MC std (predicted-class probability or risk/value)",
    "mean_mutual_information": "mean epistemic uncertainty (mutual information, nats) over test rows",
}


def _class_names(class_names, c: int) -> list[str]:
    return [str(x) for x in class_names] if class_names is not None else [str(k) for k in range(c)]


def uncertainty_report(
    task: str,
    val_outputs: np.ndarray,
    val_labels: np.ndarray,
    test_outputs: np.ndarray,
    test_labels: np.ndarray | None = None,
    *,
    alpha: float = 0.1,
    n_bins: int = 15,
    score: str = "lac",
    temperature_scaling: bool = True,
    per_label_temperature: bool = False,
    mc: PredictiveUncertainty | None = None,
    class_names: Sequence[Any] | None = None,
    decode: Callable[[np.ndarray], np.ndarray] | None = None,
    conformal_fraction: float | None = None,
    plot_path: str | Path | None = None,
    seed: int = 0,
) -> UncertaintyReport:
    """Uncertainty outputs of one finetuning run.

    ``val_outputs``/``test_outputs``: raw predictions as :func:`~bioperceiver.training.tasks.predict` returns them
    (``(N, C)`` logits; ``(N, 1)`` standardised values for regression; ``(N, 1)`` risks for survival);
    ``val_labels``/``test_labels``: the targets (class indices ``(N,)``, multi-hot ``(N, C)``, values ``(N,)`` or
    ``(N, 1)``; survival labels are not used). ``mc``: a :class:`PredictiveUncertainty` of the *test* rows
    (MC-dropout or ensemble); logit samples are re-summarised with the fitted temperature. ``decode``
    (regression): the affine, increasing map back to the original units (``LabelSpec.decode_regression``),
    applied to predictions, targets, intervals and MC values (a std as ``decode(std) - decode(0)``).
    ``conformal_fraction``: keep this share of the validation rows (seeded) for conformal calibration only and fit
    the temperature on the rest (exact exchangeability); default: both on all validation rows.

    ``table`` columns — classification: ``calibrated_prob_<class>`` (after temperature scaling), ``confidence``
    (top calibrated probability), ``entropy`` (of the calibrated probabilities, nats), ``conformal_set`` (class
    names joined by ``|``), ``set_size``, ``label_in_set`` (with test labels); multilabel:
    ``calibrated_prob_<label>`` and ``entropy`` (mean Bernoulli entropy over labels; no conformal sets);
    regression: ``interval_lower``, ``interval_upper``; plus the MC columns of
    :meth:`PredictiveUncertainty.columns` (``mc_std``, ``mc_entropy``, ``mc_mutual_information``; survival and
    regression ``mc_mean``, ``mc_std``). ``metrics``: see :data:`METRIC_DESCRIPTIONS` (computed on rows with a
    prediction and a label)."""
    import pandas as pd

    zv = np.asarray(val_outputs, dtype=np.float64)
    zt = np.asarray(test_outputs, dtype=np.float64)
    zv = zv[:, None] if zv.ndim == 1 else zv
    zt = zt[:, None] if zt.ndim == 1 else zt
    kind = task_kind(task, zt)
    yv = np.asarray(val_labels, dtype=np.float64)
    yt = None if test_labels is None else np.asarray(test_labels, dtype=np.float64)
    n_test = len(zt)
    ok_t = _valid_rows(zt)
    metrics: dict[str, Any] = {"n_test": int(ok_t.sum())}
    cols: dict[str, np.ndarray] = {}
    scaler = conformal = plot = None

    # rows of the validation split for temperature / conformal
    ok_v = _valid_rows(zv, None if kind == "survival" else yv)
    idx = np.flatnonzero(ok_v)
    conf_idx = temp_idx = idx
    if conformal_fraction:
        perm = np.random.default_rng(seed).permutation(idx)
        n_conf = round(conformal_fraction * len(perm))
        conf_idx, temp_idx = np.sort(perm[:n_conf]), np.sort(perm[n_conf:])
    metrics["n_calibration"] = len(conf_idx)

    if kind in CLASSIFICATION_KINDS:
        if temperature_scaling and len(temp_idx):
            scaler = fit_temperature(zv[temp_idx], yv[temp_idx], kind, per_label=per_label_temperature)
            t = scaler.temperature
            metrics.update(
                {
                    "temperature": t.tolist() if isinstance(t, np.ndarray) else float(t),
                    "val_nll_before": scaler.nll_before,
                    "val_nll_after": scaler.nll_after,
                }
            )
        temp = scaler.temperature if scaler is not None else None
        pv_raw, pt_raw = to_probabilities(zv, kind), to_probabilities(zt, kind)
        pv, pt = to_probabilities(zv, kind, temp), to_probabilities(zt, kind, temp)
        mode = "classwise" if kind == "multilabel" else "top_label"
        metrics.update({"ece_mode": mode, "ece_bins": n_bins})
        metrics["val_ece_before"] = expected_calibration_error(pv_raw[ok_v], yv[ok_v], n_bins, mode)
        metrics["val_ece_after"] = expected_calibration_error(pv[ok_v], yv[ok_v], n_bins, mode)
        if yt is not None:
            metrics["ece_before"] = expected_calibration_error(pt_raw[ok_t], yt[ok_t], n_bins, mode)
            metrics["ece_after"] = expected_calibration_error(pt[ok_t], yt[ok_t], n_bins, mode)
            if kind != "multilabel":
                metrics["classwise_ece_before"] = expected_calibration_error(
                    pt_raw[ok_t], yt[ok_t], n_bins, "classwise"
                )
                metrics["classwise_ece_after"] = expected_calibration_error(pt[ok_t], yt[ok_t], n_bins, "classwise")
            if plot_path is not None and ok_t.any():
                plot = plot_reliability_diagram(
                    yt[ok_t],
                    pt_raw[ok_t],
                    plot_path,
                    pt[ok_t] if scaler is not None else None,
                    n_bins=n_bins,
                    mode=mode,
                )
        if kind == "multilabel":
            names = _class_names(class_names, pt.shape[1])
            cols.update({f"calibrated_prob_{c}": pt[:, k] for k, c in enumerate(names)})
            cols["entropy"] = _bernoulli_entropy(pt).mean(axis=1)
        else:
            p2 = _as_class_probs(pt)
            names = _class_names(class_names, p2.shape[1])
            cols.update({f"calibrated_prob_{c}": p2[:, k] for k, c in enumerate(names)})
            cols["confidence"] = p2.max(axis=1)
            cols["entropy"] = _categorical_entropy(p2)
            if len(conf_idx):
                conformal = calibrate_conformal(pv[conf_idx], yv[conf_idx], alpha, score=score, seed=seed)
                sets = conformal.predict_sets(p2)
                cols["conformal_set"] = np.array(
                    ["|".join(c for c, s in zip(names, row) if s) if ok else None for row, ok in zip(sets, ok_t)],
                    dtype=object,
                )
                cols["set_size"] = np.where(ok_t, sets.sum(axis=1), np.nan)
                metrics.update({"conformal_alpha": alpha, "conformal_score": score, "conformal_qhat": conformal.qhat})
                if yt is not None:
                    y1 = yt.reshape(-1)
                    has = ok_t & np.isfinite(y1) & (y1 >= 0)
                    inside = np.full(n_test, np.nan)
                    inside[has] = sets[np.flatnonzero(has), y1[has].astype(np.int64)]
                    cols["label_in_set"] = inside
                    summary = coverage_summary(sets[has], y1[has])
                    metrics.update(
                        {k: summary[k] for k in ("coverage", "mean_set_size", "singleton_rate", "empty_set_rate")}
                    )
        if mc is not None and scaler is not None and mc.from_logits:
            mc = mc.with_temperature(scaler.temperature)
    elif kind == "regression":
        dec = decode or (lambda a: a)
        pv_, pt_ = dec(zv[:, 0]), dec(zt[:, 0])
        yv_ = dec(yv.reshape(len(yv), -1)[:, 0])
        if len(conf_idx):
            conformal = calibrate_conformal_regression(pv_[conf_idx], yv_[conf_idx], alpha)
            lo, hi = conformal.predict_intervals(pt_)
            cols["interval_lower"], cols["interval_upper"] = lo, hi
            metrics.update(
                {"conformal_alpha": alpha, "conformal_score": "absolute residual", "conformal_qhat": conformal.qhat}
            )
            if yt is not None:
                ev = conformal.evaluate(pt_, dec(yt.reshape(len(yt), -1)[:, 0]))
                metrics.update({"coverage": ev["coverage"], "mean_interval_width": ev["mean_interval_width"]})
        if mc is not None and decode is not None:
            zero = decode(np.zeros(1))[0]
            mc = PredictiveUncertainty(mc.task, decode(mc.mean), decode(mc.std) - zero, mc.samples, mc.from_logits)
    if mc is not None:
        if mc.mean.shape[0] != n_test:
            raise ValueError(f"mc has {mc.mean.shape[0]} rows, the test outputs {n_test}")
        mc_cols = mc.columns("mc_", class_names)
        cols.update(mc_cols)
        metrics["mc_samples"] = mc.n_samples
        if "mc_std" in mc_cols:
            metrics["mean_mc_std"] = float(np.nanmean(mc_cols["mc_std"][ok_t]))
        if "mc_mutual_information" in mc_cols:
            metrics["mean_mutual_information"] = float(np.nanmean(mc_cols["mc_mutual_information"][ok_t]))
    for k, v in list(cols.items()):
        if v.dtype != object:
            v = np.asarray(v, dtype=np.float64).copy()
            v[~ok_t] = np.nan
            cols[k] = v
    table = pd.DataFrame(cols, index=range(n_test))
    return UncertaintyReport(table, metrics, scaler, conformal, plot)


__all__ = [
    "CONFORMAL_SCORES",
    "ECE_MODES",
    "METRIC_DESCRIPTIONS",
    "ConformalClassifier",
    "ConformalRegressor",
    "PredictiveUncertainty",
    "TemperatureScaler",
    "UncertaintyReport",
    "calibrate_conformal",
    "calibrate_conformal_regression",
    "conformal_quantile",
    "conformal_scores",
    "coverage_summary",
    "dropout_modules",
    "ensemble_predict",
    "expected_calibration_error",
    "fit_temperature",
    "mc_dropout_mode",
    "mc_dropout_predict",
    "model_task",
    "negative_log_likelihood",
    "plot_reliability_diagram",
    "reliability_bins",
    "summarize_samples",
    "task_kind",
    "to_probabilities",
    "uncertainty_report",
]
