"""The federated model card: what each site contributed (counts and modalities), that no raw data was pooled, and
the mechanism (aggregation, local training, client-side clipping and noise). Rendered from
``model_cards/federated.md`` with :func:`bioperceiver.cards.render_card`; :func:`federated_section` is the same
text as a Markdown section for other cards."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from ..cards import markdown_table, render_card
from .client import LocalTrainingConfig
from .simulation import FederatedConfig


def sites_table(contributions: Sequence[Mapping[str, Any]]) -> str:
    rows = [
        {
            "site": c["site"],
            "rows": c["rows"],
            "patients": c["patients"],
            "modalities (rows)": ", ".join(f"{m} ({n})" for m, n in c["modalities"].items()) or "none",
        }
        for c in contributions
    ]
    return markdown_table(rows, ["site", "rows", "patients", "modalities (rows)"])


def mechanism_text(config: FederatedConfig, local: LocalTrainingConfig) -> str:
    """The privacy mechanism in words."""
    agg = (
        f"FedProx (μ = {config.proximal_mu}: each site adds μ/2·‖w − w_global‖² to its local loss)"
        if config.strategy == "fedprox"
        else "FedAvg"
    )
    lines = [
        f"- Aggregation: {agg}, the new global weights being the mean of the sites' weights weighted by their "
        f"number of training samples; {config.rounds} round(s), a fraction {config.fraction_fit} of the sites "
        "sampled per round.",
        "- What left a site each round: its model weights after local training, its number of training samples "
        "and its mean local loss; for the processors (vocabularies, normalisation statistics): per-site counts and "
        "sums (word counts of text columns, category counts; robust tabular quantiles: counts of values below "
        "server-chosen thresholds).",
    ]
    if local.clip_update_norm is not None:
        noise = (
            f"plus Gaussian noise of standard deviation {local.noise_multiplier} × {local.clip_update_norm} per "
            "coordinate"
            if local.noise_multiplier > 0
            else "without added noise (clipping alone gives no formal differential-privacy guarantee)"
        )
        lines.append(
            f"- Client-side clipping: each site's update (w_local − w_global) was clipped to L2 norm "
            f"{local.clip_update_norm} before leaving the site, {noise}. No privacy accountant is run here: the "
            "spent ε is not reported."
        )
    else:
        lines.append(
            "- No client-side clipping or noise: the weights a site sends are not differentially private (model "
            "updates can leak information about training records to whoever aggregates them)."
        )
    return "\n".join(lines)


def federated_section(
    contributions: Sequence[Mapping[str, Any]], config: FederatedConfig, local: LocalTrainingConfig
) -> str:
    """A ``## Federated training`` Markdown section (for other cards)."""
    return (
        "## Federated training\n\nNo raw data was pooled: each site trained locally and sent weights and counts "
        f"only.\n\n{sites_table(contributions)}\n\n{mechanism_text(config, local)}\n"
    )


def federated_card(
    mode: str,
    contributions: Sequence[Mapping[str, Any]],
    config: FederatedConfig,
    local: LocalTrainingConfig,
    results: Mapping[str, Any],
    *,
    model_config=None,
    model_name: str | None = None,
) -> ModelCard:
    """The model card of a federated run (``mode``: ``"pretraining"`` or ``"finetuning"``)."""
    training = [{"setting": k, "value": v} for k, v in {**config.to_dict(), **local.to_dict()}.items()]
    shown = {k: v for k, v in results.items() if k not in ("sites", "federated", "local")}
    result_rows = [{"result": k, "value": _short(v)} for k, v in _flat(shown).items()]
    card_data = ModelCardData(library_name="transformers", tags=["bioperceiver", "federated-learning", "flower"])
    return render_card(
        "federated",
        card_data,
        model_name=model_name or f"BioPerceiver (federated {mode})",
        mode=mode,
        num_sites=len(contributions),
        sites_table=sites_table(contributions),
        mechanism=mechanism_text(config, local),
        training_table=markdown_table(training, ["setting", "value"]),
        results=markdown_table(result_rows, ["result", "value"]) if result_rows else "none recorded",
    )


def _flat(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k} / "))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
