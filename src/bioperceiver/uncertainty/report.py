"""One call for a finetuning run: calibration, conformal prediction and MC columns per test sample, and the
numbers for the model card.

Note on reusing one split: :func:`uncertainty_report` fits the temperature and calibrates the conformal threshold
on the same validation rows. A one-parameter fit barely perturbs exchangeability, but the guarantee is exact only
with ``conformal_fraction`` (a disjoint share of the validation rows kept for conformal calibration).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..tasks import Task, resolve_task
from .calibration import TemperatureScaler
from .sampling import PredictiveUncertainty, _valid_rows


@dataclass
class UncertaintyReport:
    """``table``: one row per test sample (same order as the predictions; NaN where a row had no prediction);
    ``metrics``: flat numbers for the model card (see :func:`uncertainty_report`); the fitted
    ``temperature`` / ``conformal`` objects; ``plot``: the reliability diagram path when drawn."""

    table: Any
    metrics: dict[str, Any]
    temperature: TemperatureScaler | None = None
    conformal: Any = None
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
    "joint_coverage": "multilabel: share of test rows whose every label lies in its conformal set",
    "both_values_rate": "multilabel: share of test labels whose set is {0, 1} (the model is unsure)",
    "conformal_skipped": "why no conformal sets / bounds were fitted (too few validation rows for alpha)",
    "risk_groups": "survival: number of risk groups (validation risk quantiles) with their validation KM curves",
    "risk_groups_mean_calibration_error": "survival: mean |validation-KM prediction - test KM| over groups, horizons",
    "risk_groups_max_calibration_error": "survival: largest |validation-KM prediction - test KM|",
    "risk_groups_logrank_p": "survival: log-rank p-value across the test risk groups",
    "risk_groups_skipped": "why no survival risk groups were fitted",
    "conformal_c0": "survival: time horizon c0 the conformal lower bounds are truncated at",
    "conformal_coverage_lower": "survival: test coverage P(T >= bound), lower end (censored rows counted as missed)",
    "conformal_coverage_upper": "survival: test coverage P(T >= bound), upper end (censored rows counted as covered)",
    "conformal_mean_lower_bound": "survival: mean conformal lower bound on the survival time over test rows",
    "mc_samples": "stochastic passes / ensemble members behind the MC columns",
    "mean_mc_std": "mean over test rows of the MC std (predicted-class probability or risk/value)",
    "mean_mutual_information": "mean epistemic uncertainty (mutual information, nats) over test rows",
}


def _class_names(class_names, c: int) -> list[str]:
    return [str(x) for x in class_names] if class_names is not None else [str(k) for k in range(c)]


@dataclass
class CalibrationContext:
    """What a task's :meth:`~bioperceiver.tasks.Task.calibrate` reads (validation/test outputs and labels, valid
    rows, the rows for temperature and conformal calibration, the settings) and fills (``metrics``, ``cols``,
    ``scaler``, ``conformal``, ``plot``, and ``mc`` re-summarised or decoded)."""

    zv: np.ndarray
    yv: np.ndarray
    zt: np.ndarray
    yt: np.ndarray | None
    ok_v: np.ndarray
    ok_t: np.ndarray
    conf_idx: np.ndarray
    temp_idx: np.ndarray
    alpha: float
    n_bins: int
    score: str
    temperature_scaling: bool
    per_label_temperature: bool
    mc: PredictiveUncertainty | None
    class_names: Sequence[Any] | None
    decode: Callable[[np.ndarray], np.ndarray] | None
    plot_path: str | Path | None
    seed: int
    metrics: dict[str, Any] = field(default_factory=dict)
    cols: dict[str, np.ndarray] = field(default_factory=dict)
    scaler: TemperatureScaler | None = None
    conformal: Any = None
    plot: Path | None = None

    def names(self, c: int) -> list[str]:
        return _class_names(self.class_names, c)


def uncertainty_report(
    task: str | Task,
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
    """Uncertainty outputs of one finetuning run; ``task`` (a :class:`~bioperceiver.tasks.Task` or its name)
    chooses the calibration and conformal method (:meth:`~bioperceiver.tasks.Task.calibrate`).

    ``val_outputs``/``test_outputs``: raw predictions as :func:`~bioperceiver.training.tasks.predict` returns them
    (``(N, C)`` logits; ``(N, 1)`` standardised values for regression; ``(N, 1)`` risks for survival);
    ``val_labels``/``test_labels``: the targets (class indices ``(N,)``, multi-hot ``(N, C)``, values ``(N,)`` or
    ``(N, 1)``; survival labels are not used). ``mc``: a :class:`PredictiveUncertainty` of the *test* rows
    (MC-dropout or ensemble); logit samples are re-summarised with the fitted temperature. ``decode``
    (regression): the affine, increasing map back to the original units (``RegressionTask.decode``),
    applied to predictions, targets, intervals and MC values (a std as ``decode(std) - decode(0)``).
    ``conformal_fraction``: keep this share of the validation rows (seeded) for conformal calibration only and fit
    the temperature on the rest (exact exchangeability); default: both on all validation rows.

    ``table`` columns — classification: ``calibrated_prob_<class>`` (after temperature scaling), ``confidence``
    (top calibrated probability), ``entropy`` (of the calibrated probabilities, nats), ``conformal_set`` (class
    names joined by ``|``), ``set_size``, ``label_in_set`` (with test labels); multilabel:
    ``calibrated_prob_<label>``, ``entropy`` (mean Bernoulli entropy over labels), ``conformal_set_<label>`` and
    ``set_size``; survival: ``risk_group``, ``group_survival_<t>`` and ``survival_lower_bound``;
    regression: ``interval_lower``, ``interval_upper``; plus the MC columns of
    :meth:`PredictiveUncertainty.columns` (``mc_std``, ``mc_entropy``, ``mc_mutual_information``; survival and
    regression ``mc_mean``, ``mc_std``). ``metrics``: see :data:`METRIC_DESCRIPTIONS` (computed on rows with a
    prediction and a label)."""
    import pandas as pd

    zv = np.asarray(val_outputs, dtype=np.float64)
    zt = np.asarray(test_outputs, dtype=np.float64)
    zv = zv[:, None] if zv.ndim == 1 else zv
    zt = zt[:, None] if zt.ndim == 1 else zt
    kind = resolve_task(task, zt)
    yv = np.asarray(val_labels, dtype=np.float64)
    yt = None if test_labels is None else np.asarray(test_labels, dtype=np.float64)
    n_test = len(zt)
    ok_t = _valid_rows(zt)

    # rows of the validation split for temperature / conformal
    ok_v = _valid_rows(zv, kind.calibration_targets(yv))
    idx = np.flatnonzero(ok_v)
    conf_idx = temp_idx = idx
    if conformal_fraction:
        perm = np.random.default_rng(seed).permutation(idx)
        n_conf = round(conformal_fraction * len(perm))
        conf_idx, temp_idx = np.sort(perm[:n_conf]), np.sort(perm[n_conf:])
    ctx = CalibrationContext(
        zv,
        yv,
        zt,
        yt,
        ok_v,
        ok_t,
        conf_idx,
        temp_idx,
        alpha,
        n_bins,
        score,
        temperature_scaling,
        per_label_temperature,
        mc,
        class_names,
        decode,
        plot_path,
        seed,
    )
    ctx.metrics.update({"n_test": int(ok_t.sum()), "n_calibration": len(conf_idx)})
    kind.calibrate(ctx)  # temperature, ECE, conformal sets/intervals: the task's choice
    metrics, cols, mc = ctx.metrics, ctx.cols, ctx.mc
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
    return UncertaintyReport(table, metrics, ctx.scaler, ctx.conformal, ctx.plot)
