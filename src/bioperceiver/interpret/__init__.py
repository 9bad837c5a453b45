"""Why a BioPerceiver model predicts what it does, for one patient at a time.

* Token relevance: :func:`attention_attribution` (cross-attention, uniform or rolled out through the latent
  self-attention) and :func:`integrated_gradients` (captum, on each modality's embedder tokens). Both return an
  :class:`Attribution`: ``scores[modality] (B, N_m)`` (exactly 0 on dropped tokens), ``to_frame()`` (``sample,
  modality, token_index, token_label, score``) and ``modality_frame()`` (per-modality totals).
* Mapping to what a person recognises: :func:`text_words`, :func:`image_heatmap`, :func:`gene_ranking`,
  :func:`signal_matrix`, :func:`tabular_features` (names from the fitted processors).
* Modality contributions: :func:`modality_shapley` (exact Shapley values over modality subsets) and
  :func:`modality_metric_drop` (task metric with each modality removed).
* Faithfulness: :func:`deletion_test` (top-k vs. random token deletion).
* Figures: :func:`explain_sample` and the ``plot_*`` functions write PNGs.

Call these on a model in any mode; dropout is switched off while explaining and the mode restored afterwards.
"""

from ._core import Target
from .attention import attention_attribution, attention_rollout, token_relevance
from .faithfulness import deletion_test
from .figures import (
    explain_sample,
    plot_image,
    plot_modality_shapley,
    plot_signal,
    plot_tabular,
    plot_text,
    plot_top_genes,
)
from .gradients import integrated_gradients
from .mapping import (
    Attribution,
    gene_ranking,
    image_heatmap,
    signal_matrix,
    tabular_features,
    text_words,
    token_labels,
)
from .shapley import ModalityShapley, modality_metric_drop, modality_shapley, shapley_from_coalitions

__all__ = [
    "Attribution",
    "ModalityShapley",
    "Target",
    "attention_attribution",
    "attention_rollout",
    "deletion_test",
    "explain_sample",
    "gene_ranking",
    "image_heatmap",
    "integrated_gradients",
    "modality_metric_drop",
    "modality_shapley",
    "plot_image",
    "plot_modality_shapley",
    "plot_signal",
    "plot_tabular",
    "plot_text",
    "plot_top_genes",
    "shapley_from_coalitions",
    "signal_matrix",
    "tabular_features",
    "text_words",
    "token_labels",
    "token_relevance",
]
