"""Predictive uncertainty, calibration and conformal prediction for finetuned BioPerceiver task models:
:mod:`.sampling` (MC-dropout, ensembles), :mod:`.calibration` (temperature scaling, ECE, reliability diagrams),
:mod:`.conformal` (LAC/APS sets, regression intervals), :mod:`.conformal_tasks` (per-label multilabel sets,
calibrated survival risk groups and conformal lower bounds on survival time) and :mod:`.report` (the whole
pipeline of one run). What differs between tasks (probabilities, entropies, which calibration and conformal
method) is the task object's (:mod:`bioperceiver.tasks`); every function takes a :class:`~bioperceiver.tasks.Task`
or a task name.

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
  ``local_only/predictions_test.csv``) plus a flat dict of numbers for the model card.

Note on reusing one split: :func:`uncertainty_report` fits the temperature and calibrates the conformal threshold
on the same validation rows. A one-parameter fit barely perturbs exchangeability, but the guarantee is exact only
with ``conformal_fraction`` (a disjoint share of the validation rows kept for conformal calibration).
"""

from .calibration import (
    ECE_MODES,
    TemperatureScaler,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    plot_reliability_diagram,
    reliability_bins,
    to_probabilities,
)
from .conformal import (
    CONFORMAL_SCORES,
    ConformalClassifier,
    ConformalRegressor,
    calibrate_conformal,
    calibrate_conformal_regression,
    conformal_quantile,
    conformal_scores,
    coverage_summary,
)
from .conformal_tasks import (
    ConformalMultilabel,
    ConformalSurvival,
    RiskGroups,
    kaplan_meier,
    logrank_test,
    multilabel_coverage_summary,
    plot_risk_groups,
)
from .report import METRIC_DESCRIPTIONS, CalibrationContext, UncertaintyReport, uncertainty_report
from .sampling import (
    PredictiveUncertainty,
    dropout_modules,
    ensemble_predict,
    mc_dropout_mode,
    mc_dropout_predict,
    summarize_samples,
    task_kind,
)

__all__ = [
    "CONFORMAL_SCORES",
    "ECE_MODES",
    "METRIC_DESCRIPTIONS",
    "CalibrationContext",
    "ConformalClassifier",
    "ConformalMultilabel",
    "ConformalRegressor",
    "ConformalSurvival",
    "PredictiveUncertainty",
    "RiskGroups",
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
    "kaplan_meier",
    "logrank_test",
    "mc_dropout_mode",
    "mc_dropout_predict",
    "multilabel_coverage_summary",
    "negative_log_likelihood",
    "plot_reliability_diagram",
    "plot_risk_groups",
    "reliability_bins",
    "summarize_samples",
    "task_kind",
    "to_probabilities",
    "uncertainty_report",
]
