"""Model cards for pretrained and finetuned BioPerceiver models, rendered with ``huggingface_hub.ModelCard``.

The Jinja templates live in the repository's ``model_cards/`` folder (``pretrained.md``, ``finetuned.md``); pass
``template=`` to use your own. Everything that can be measured is filled from the run itself: the model and its
modalities, the data provenance and licence of every modality (from the manifest's ``.meta.json`` ``sources`` and
its ``meta_source`` column), modality presence and the most common missing-modality patterns, the training
configuration, evaluation with confidence intervals and the compute used. Prose that only a person can write
(intended use beyond the defaults, known biases of *your* cohort) has a clearly marked place in the template.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from huggingface_hub import ModelCard, ModelCardData

from .hashing import file_sha256

logger = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "model_cards"
NOT_RECORDED = "not recorded (add a `sources` list with `name`/`licence` to the manifest's .meta.json sidecar)"


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}g}"
    return "" if value is None else str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table (``|`` in cells escaped); empty string when there are no rows."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())

    def cell(v: Any) -> str:
        return _fmt(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _present(manifest) -> dict[str, list[bool]]:
    from .data.manifest import is_missing

    return {col: [not is_missing(v) for v in manifest.table[col]] for col in manifest.modalities}


def modality_presence(manifest) -> list[dict[str, Any]]:
    """Per modality column: kind, samples and patients that have it, share of samples."""
    n = len(manifest.table)
    present = _present(manifest)
    pids = manifest.table["patient_id"].astype(str).tolist() if "patient_id" in manifest.table else None
    rows = []
    for col, kind in manifest.modalities.items():
        have = present[col]
        row = {
            "modality": col,
            "kind": kind,
            "samples": sum(have),
            "present %": round(100.0 * sum(have) / max(n, 1), 1),
        }
        if pids is not None:
            row["patients"] = len({p for p, h in zip(pids, have) if h})
        rows.append(row)
    return rows


def presence_patterns(manifest, top: int = 10) -> list[dict[str, Any]]:
    """The most frequent sets of present modalities (missing-modality patterns) with their counts."""
    present = _present(manifest)
    cols = list(manifest.modalities)
    n = len(manifest.table)
    patterns = Counter(" + ".join(c for c in cols if present[c][i]) or "(none)" for i in range(n))
    rows = [
        {"modalities present": p, "samples": c, "share %": round(100.0 * c / max(n, 1), 1)}
        for p, c in patterns.most_common(top)
    ]
    if len(patterns) > top:
        rest = n - sum(r["samples"] for r in rows)
        rows.append(
            {
                "modalities present": f"({len(patterns) - top} other patterns)",
                "samples": rest,
                "share %": round(100.0 * rest / max(n, 1), 1),
            }
        )
    return rows


def provenance(manifest) -> list[dict[str, Any]]:
    """Per modality: the sources its values come from (``meta_source`` column) with their licences (sidecar)."""
    sources = {s.get("name"): s for s in manifest.metadata.get("sources", []) if isinstance(s, Mapping)}
    present = _present(manifest)
    by_row = manifest.table["meta_source"].astype(str).tolist() if "meta_source" in manifest.table else None
    rows = []
    for col, kind in manifest.modalities.items():
        if by_row is None:
            names = Counter(s for s in sources) if len(sources) == 1 else Counter()
        else:
            names = Counter(src for src, have in zip(by_row, present[col]) if have)
        if not names:
            rows.append({"modality": col, "kind": kind, "sources": NOT_RECORDED, "licence": ""})
            continue
        rows.append(
            {
                "modality": col,
                "kind": kind,
                "sources": ", ".join(f"{s} ({c})" for s, c in names.most_common()),
                "licence": "; ".join(
                    f"{s}: {sources[s].get('licence', 'not recorded')}" if s in sources else f"{s}: not recorded"
                    for s in names
                ),
            }
        )
    return rows


def source_citations(manifest) -> list[str]:
    return [
        f"**{s.get('name')}**: {s.get('citation', 'no citation recorded')}" + (f" <{s['url']}>" if s.get("url") else "")
        for s in manifest.metadata.get("sources", [])
        if isinstance(s, Mapping)
    ]


def model_summary(config, num_parameters: int | None = None) -> dict[str, Any]:
    """Architecture facts and one row per configured modality with its embedder settings."""
    modalities = []
    for name, cfg in config.modalities.items():
        settings = {k: v for k, v in cfg.items() if k != "kind" and v is not None and not isinstance(v, (dict, list))}
        modalities.append(
            {
                "modality": name,
                "kind": cfg["kind"],
                "embedder settings": ", ".join(f"{k}={v}" for k, v in settings.items()),
            }
        )
    arch = {
        "latents": f"{config.num_latents} x {config.d_latents}",
        "input token width": config.d_input,
        "blocks x self-attention layers": f"{config.num_blocks} x {config.num_self_attention_layers}",
        "cross-attention layers / heads": f"{config.num_cross_attention_layers} / {config.num_cross_attention_heads}",
        "self-attention heads": config.num_self_attention_heads,
        "parameters": f"{num_parameters / 1e6:.2f} M" if num_parameters else None,
    }
    return {"architecture": {k: v for k, v in arch.items() if v is not None}, "modalities": modalities}


def _leftover_placeholders(text: str) -> list[str]:
    return re.findall(r"\{\{[^}]*\}\}|\{%[^%]*%\}", text)


def resolve_template(template: str | Path) -> Path:
    path = Path(template)
    if not path.suffix:
        path = TEMPLATE_DIR / f"{template}.md"
    if not path.exists():
        raise FileNotFoundError(
            f"model card template {path} not found; pass template=<path to a .md Jinja template> (the shipped "
            f"ones are in the repository's model_cards/ folder)"
        )
    return path


def render_card(template: str | Path, card_data: ModelCardData, **context: Any) -> ModelCard:
    """Render a Jinja template into a ``huggingface_hub.ModelCard`` (as ``ModelCard.from_template`` does, with the
    card data's YAML as ``card_data``), but strictly: a variable the template uses and the caller did not provide
    raises instead of rendering as an empty string, and so does a placeholder left in the output."""
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    text = resolve_template(template).read_text(encoding="utf-8")
    values = {**card_data.to_dict(), **context}
    try:
        content = env.from_string(text).render(card_data=card_data.to_yaml(), **values)
    except jinja2.UndefinedError as err:
        raise ValueError(f"model card template {template}: {err}; pass it as a keyword to render_card") from err
    leftover = _leftover_placeholders(content)
    if leftover:
        raise ValueError(f"model card template left placeholders unrendered: {leftover[:5]}")
    return ModelCard(content)


def _eval_loss_scale(batch_size: int | None, uniform: float | None = None) -> str:
    """What the held-out loss is averaged over, and the uniform-guess level to read it against: the level the loss
    measured on the same batches (``eval_loss_uniform``) when given, else ``ln B`` as the clip loss's level."""
    if not batch_size:
        return ""
    if uniform is not None:
        return (
            f" (mean over batches of {batch_size} held-out samples; a uniform guess scores {uniform:.3f} on the same "
            "batches)"
        )
    return (
        f" (mean over batches of {batch_size} held-out samples; with the clip loss a uniform guess scores about "
        f"ln {batch_size} = {math.log(batch_size):.3f})"
    )


def _reconstruction_line(metrics: Mapping[str, Any]) -> str:
    """The held-out masked-value reconstruction error (``loss.reconstruction``) beside what predicting the training
    mean scores, or nothing without the term."""
    err, mean = metrics.get("eval_loss_reconstruction"), metrics.get("eval_loss_reconstruction_mean")
    if err is None or mean is None:
        return ""
    return (
        f". Held-out masked-value reconstruction error (mean squared, normalised values the subset views hid): "
        f"{err:.3f}; predicting every hidden value as its training mean scores {mean:.3f}"
    )


def _generalization_line(metrics: Mapping[str, Any]) -> str:
    """The same evaluation on as many training patients (``eval.training_patients``) and the gap, or nothing."""
    on_train, gap = metrics.get("train_patients/eval_loss"), metrics.get("eval_gap")
    if on_train is None or gap is None:
        return ""
    n, held = metrics.get("train_patients/samples"), metrics.get("train_patients/held_out_samples")
    if n is not None and held is not None and n < held:
        many = f"{int(n)} training samples (all the training split has; {int(held)} held out, so its batches differ)"
    else:
        many = "as many training samples (whole patients drawn from the training split, the last one cut to fit)"
    return (
        f". The same evaluation on {many}: {on_train:.3f}, so the held-out − training gap of the objective is "
        f"{gap:.3f} (the larger, the more pretraining fits its own patients rather than patients it has not seen)"
    )


def _kept_line(best_model: Mapping[str, Any] | None) -> str:
    """Which evaluation's weights the card's model holds (``eval.load_best_model_at_end``), or nothing."""
    if not best_model:
        return ""
    if best_model.get("step") is None:
        return (
            f". No held-out evaluation reported {best_model['metric']} (eval.metric_for_best_model), so these numbers "
            f"and weights are the last step's ({best_model['last_step']})"
        )
    if best_model.get("checkpoint_missing"):
        return (
            f". The best held-out {best_model['metric']} was step {best_model['step']}'s ({best_model['value']:.4f}), "
            f"but its checkpoint was deleted before the run ended, so these numbers and weights are the last step's "
            f"({best_model['last_step']})"
        )
    better = "highest" if best_model["greater_is_better"] else "lowest"
    line = (
        f". These held-out numbers, and the weights, are step {best_model['step']}'s: of {best_model['evaluations']} "
        f"held-out evaluations it had the {better} {best_model['metric']} ({best_model['value']:.4f}; "
        f"eval.load_best_model_at_end), while training ran to step {best_model['last_step']}"
    )
    if best_model.get("stopped_early"):
        n = best_model["patience"]
        line += f", where it stopped early after {n} evaluation{'s' if n != 1 else ''} in a row without a better one"
    return line


def retrieval_rows(metrics: Mapping[str, float], ks: Iterable[int] = (1, 5, 10)) -> list[dict[str, Any]]:
    """Rows of the retrieval table from :func:`~bioperceiver.training.retrieval_metrics` output (with CIs when
    the metrics carry ``..._ci_low``/``..._ci_high``)."""
    rows = []
    for key in sorted(k.split("/", 1)[1] for k in metrics if k.startswith("queries/")):
        row: dict[str, Any] = {"views": key.replace("-", " ↔ ", 1), "queries": metrics[f"queries/{key}"]}
        for k in ks:
            name = f"R@{k}/{key}"
            if name not in metrics:
                continue
            lo, hi = metrics.get(f"R@{k}_ci_low/{key}"), metrics.get(f"R@{k}_ci_high/{key}")
            row[f"R@{k}"] = f"{metrics[name]:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None else "")
            chance = metrics.get(f"chance_R@{k}/{key}")
            if chance is not None:  # beside every R@k: what a random ranking gets
                row[f"chance R@{k}"] = f"{chance:.3f}"
        rows.append(row)
    return rows


def shareable_run_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """``run_config`` with its path values (:data:`~bioperceiver.training.config.PATH_KEYS`) cut to their last
    component, ``<local>/manifest.parquet``: a card is shared, and a machine's absolute paths (user names, a
    hospital's shares, a bucket) are not the reader's to see. ``run_config.yaml`` beside the card keeps them."""
    import copy

    from .training.config import PATH_KEYS

    out = copy.deepcopy(dict(run_config))
    for key in PATH_KEYS:
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(leaf), str) and node[leaf]:
            node[leaf] = f"<local>/{node[leaf].rstrip('/').rsplit('/', 1)[-1]}"
    return out


def pretraining_card(
    *,
    config,
    manifest,
    run_config: Mapping[str, Any],
    metrics: Mapping[str, float],
    compute: Mapping[str, Any],
    num_parameters: int | None = None,
    model_name: str = "BioPerceiver (contrastively pretrained)",
    license: str = "other",
    template: str | Path = "pretrained",
    train_split: str = "train",
    eval_split: str = "validation",
    vocabulary_trained: Mapping[str, Mapping[str, int]] | None = None,
    processor_notes: Mapping[str, str] | None = None,
    best_model: Mapping[str, Any] | None = None,
) -> ModelCard:
    """The card of a pretraining run: ``manifest`` is the full manifest (train and held-out rows; with a
    ``split`` column), ``run_config`` the resolved run config as a dict (``PretrainConfig.to_dict()``; shown as a
    table of the main settings and in full as YAML), ``metrics`` the held-out retrieval metrics, ``compute``
    free-form facts (hardware, processes, wall-clock, samples seen...), ``vocabulary_trained`` how many rows of each
    vocabulary embedding table got a gradient (``trained_vocabulary_rows``: a row that never did is still random),
    ``processor_notes`` what the processors say about themselves (``ModalityProcessor.card_notes``: e.g. the source
    and licence of an omics processor's gene features), ``best_model`` which evaluation's weights the model holds
    (``eval.load_best_model_at_end``: ``BestModel.summary()`` with the run's ``last_step``)."""
    import yaml

    train = manifest.split(train_split) if "split" in manifest.table else manifest
    held_out = manifest.split(eval_split) if "split" in manifest.table else None
    summary = model_summary(config, num_parameters)
    prov = provenance(manifest)
    kinds = sorted({m["kind"] for m in summary["modalities"]})
    source_names = [s.get("name") for s in manifest.metadata.get("sources", []) if isinstance(s, Mapping)]
    card_data = ModelCardData(
        model_name=model_name,
        license=license,
        library_name="transformers",
        pipeline_tag="feature-extraction",
        tags=["bioperceiver", "perceiver", "multimodal", "medical", "contrastive-pretraining", *kinds],
        datasets=source_names or None,
    )
    presence = modality_presence(train)
    sparse = [r["modality"] for r in presence if r["present %"] < 5.0]
    loss = run_config.get("loss", {})
    train_cfg = {
        "loss": loss.get("name"),
        "fused view": loss.get("fused_view", True),
        "leave-one-out weight": loss.get("leave_one_out", 0.0),
        "optimizer steps": run_config.get("optim", {}).get("max_steps"),
        "batch size per process": run_config.get("train", {}).get("batch_size"),
        "gradient accumulation": run_config.get("train", {}).get("gradient_accumulation_steps"),
        "learning rate": run_config.get("optim", {}).get("lr"),
        "weight decay": run_config.get("optim", {}).get("weight_decay"),
        "warm-up steps": run_config.get("optim", {}).get("warmup_steps"),
        "mixed precision": run_config.get("train", {}).get("mixed_precision"),
        "modality dropout": run_config.get("data", {}).get("modality_dropout"),
        "training data": (
            f"pre-tokenised shards {shareable_run_config(run_config)['data']['shards']}"
            if run_config.get("data", {}).get("shards")
            else "manifest rows processed on the fly"
        ),
        "cached frozen-encoder features": bool(run_config.get("data", {}).get("cached_features", False)),
        "seed": run_config.get("seed"),
    }
    for table, n in (vocabulary_trained or {}).items():
        share = n["trained"] / n["rows"] if n["rows"] else 0.0
        train_cfg[f"vocabulary rows trained ({table})"] = (
            f"{n['trained']} of {n['rows']} ({share:.0%}); the others keep their random initialisation"
        )
    train_cfg.update(processor_notes or {})
    return render_card(
        template,
        card_data,
        model_name=model_name,
        architecture=markdown_table([{"": k, "value": v} for k, v in summary["architecture"].items()]),
        modalities_table=markdown_table(summary["modalities"]),
        provenance_table=markdown_table(prov),
        citations=source_citations(manifest),
        train_size=f"{len(train)} samples"
        + (f" from {train.table['patient_id'].nunique()} patients" if "patient_id" in train.table else ""),
        held_out_size=(
            f"{len(held_out)} samples from {held_out.table['patient_id'].nunique()} patients"
            if held_out is not None and "patient_id" in held_out.table
            else "none"
        ),
        presence_table=markdown_table(presence),
        patterns_table=markdown_table(presence_patterns(train)),
        sparse_modalities=sparse,
        training_table=markdown_table([{"setting": k, "value": v} for k, v in train_cfg.items() if v is not None]),
        run_config_yaml=yaml.safe_dump(shareable_run_config(run_config), sort_keys=False).rstrip("\n"),
        retrieval_table=markdown_table(retrieval_rows(metrics)),
        eval_loss=_fmt(metrics.get("eval_loss"))
        + _eval_loss_scale(metrics.get("eval_loss_batch_size"), metrics.get("eval_loss_uniform"))
        + _generalization_line(metrics)
        + _reconstruction_line(metrics)
        + _kept_line(best_model),
        compute_table=markdown_table([{"": k, "value": v} for k, v in compute.items()]),
    )


def metric_rows(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``{"auroc": x, "auroc_ci_low": ..., "auroc_ci_high": ...}`` -> table rows (metric, value, 95% CI)."""
    rows = []
    for key, value in metrics.items():
        skip = ("_ci_low", "_ci_high", "_ci_n_used", "_time")
        if key.endswith(skip) or not isinstance(value, (int, float)) or key in ("n", "n_resamples", "ci_level"):
            continue
        lo, hi = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
        ci = f"[{_fmt(float(lo))}, {_fmt(float(hi))}]" if lo is not None and hi is not None else ""
        rows.append({"metric": key, "value": _fmt(float(value)), "95% CI": ci})
    return rows


def _metric_table(rows: Sequence[Mapping[str, Any]], lead: str, metric_names: Sequence[str]) -> str:
    out = []
    for r in rows:
        row = {lead: r.get(lead), "n": r.get("n")}
        for m in metric_names:
            v = r.get(m)
            if v is None:
                row[m] = "too few samples"
                continue
            lo, hi = r.get(f"{m}_ci_low"), r.get(f"{m}_ci_high")
            row[m] = _fmt(float(v)) + (f" [{_fmt(float(lo))}, {_fmt(float(hi))}]" if lo is not None else "")
        out.append(row)
    return markdown_table(out)


def _interpretation_text(interp: Mapping[str, Any] | None) -> str:
    """Modality Shapley summary and the deletion test, as Markdown."""
    if not interp:
        return ""
    parts = [
        f"Exact Shapley values of the modalities for the {interp['explained']} (the empty set is worth "
        f"{_fmt(interp['empty_value'])}, {interp.get('empty_value_is', 'a baseline')}; per sample the values sum to "
        "the prediction minus that):",
        "",
        markdown_table(interp.get("shapley", [])),
    ]
    if interp.get("deletion_test"):
        parts += [
            "",
            "Faithfulness of integrated-gradients token attributions on the explained patients: mean drop of the "
            "explained score when the top-k attributed tokens are deleted vs. k random tokens:",
            "",
            markdown_table(interp["deletion_test"], ["k", "drop_top", "drop_random", "drop_random_std", "n_samples"]),
        ]
    parts += [
        "",
        "Per-patient figures (token attributions per modality, modality Shapley bars) are in `explanations/`.",
    ]
    return "\n".join(parts)


PRIVACY_ROWS = (
    ("epsilon", "epsilon spent"),
    ("delta", "delta"),
    ("target_epsilon", "target epsilon"),
    ("accountant", "accountant"),
    ("noise_multiplier", "noise multiplier"),
    ("max_grad_norm", "per-sample clipping norm"),
    ("sample_rate", "Poisson sample rate"),
    ("expected_batch_size", "expected batch size"),
    ("steps", "steps"),
    ("max_training_rows_per_patient", "most training rows of one patient (group size of the guarantee)"),
    ("per_sample_gradients", "per-sample gradients"),
    ("opacus", "opacus"),
)


def privacy_text(privacy: Mapping[str, Any] | None) -> str:
    """The card's privacy section: the DP-SGD guarantee (epsilon, delta, mechanism, what it covers), or that the
    model was trained without one; and where identifiers are (nowhere in the shared files)."""
    ids = (
        "Identifiers: this card, the plots, `all_results.json` and the aggregate CSVs hold counts only, no sample or "
        "patient id (explanation figures are named by their row index in the test split). Per-sample predictions "
        "and Shapley values are in `local_only/`, which stays at the site and is not part of the shared model."
    )
    if not privacy:
        return (
            "Trained without differential privacy: no formal privacy guarantee for the training rows "
            "(`--dp_target_epsilon` trains with DP-SGD).\n\n" + ids
        )
    rows = [{"": label, "value": privacy[key]} for key, label in PRIVACY_ROWS if privacy.get(key) is not None]
    return (
        f"Finetuned with differential privacy: {privacy.get('mechanism')}. The guarantee is "
        f"(epsilon = {_fmt(privacy.get('epsilon'), 3)}, delta = {privacy.get('delta')}) for "
        f"{privacy.get('protected', 'the training rows')}.\n\n"
        + markdown_table(rows)
        + f"\n\nNot covered by the guarantee: {privacy.get('not covered', 'see all_results.json')}.\n\n"
        + ids
    )


def _narrow(manifest, modalities: Sequence[str]):
    """A copy of ``manifest`` whose modality columns are ``modalities`` only; rows with none of them dropped."""
    from .data.manifest import Manifest, is_missing

    cols = [m for m in manifest.modalities if m in modalities]
    missing = [manifest.table[c].map(is_missing).to_numpy(dtype=bool) for c in cols]
    keep = ~np.logical_and.reduce(missing) if missing else np.zeros(len(manifest.table), dtype=bool)
    return Manifest(
        manifest.table.loc[keep].reset_index(drop=True),
        {m: manifest.modalities[m] for m in cols},
        list(manifest.label_columns),
        dict(manifest.metadata),
        manifest.base_dir,
    )


def _linear_term_text(config, fit: dict | None) -> str:
    """The card's note on a wide & deep head's linear term (``head_linear_modalities``) and how it was started."""
    names = getattr(config, "head_linear_modalities", None)
    if not names:
        return ""
    text = f" + a linear term on {', '.join(names)}"
    if fit:
        l2 = fit["l2"]
        penalty = (
            "ridge penalties " + ", ".join(f"{name} {x:g}" for name, x in l2.items())
            if isinstance(l2, dict)
            else f"ridge penalty {l2:g}"
        )
        text += f" (fitted before finetuning, {penalty} chosen on {fit.get('selected_on', 'validation')}"
        if alone := fit.get("term_alone"):
            text += f"; the fitted term alone, {fit.get('metric', 'primary metric')}: " + ", ".join(
                f"{split} {v:.3f}" for split, v in alone.items()
            )
        text += ")"
    return text


def describe_base_model(base) -> str | None:
    """How a finetuned model's card names its base: a hub id as given; a local folder by its name and the sha256
    of its weights, never its path (a card is published; a path names the machine, the user, often the site), so a
    reader can still check which weights were finetuned. ``None`` when there is no base (random initialisation)."""
    if not base:
        return None
    path = Path(str(base))
    if not path.exists():
        return str(base)
    weights = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None)
    if weights is None:
        return f"a local folder `{path.name}`"
    return f"a local folder `{path.name}` ({weights.name} sha256 {file_sha256(weights)[:16]}…)"


# which of tied best evaluations was kept, by ``--best_model_ties`` rule (the card and the finetuning log)
KEPT_AMONG_TIES = {
    "first": "the earliest was kept",
    "last": "the latest was kept",
    "loss": "the one with the lowest validation loss was kept",
}


def _kept_text(kept: dict | None) -> str | None:
    """The card's "checkpoint kept" row: which evaluation ``--load_best_model_at_end`` kept, and its ties."""
    if not kept:
        return None
    where = f"epoch {kept['epoch']:g}" if kept.get("epoch") is not None else f"step {kept['step']}"
    ties = kept["tied_evaluations"] - 1
    rule = kept.get("ties", "first")  # records written before --best_model_ties: transformers' rule
    return (
        f"{where}, best validation {kept['metric'].removeprefix('eval_')} {kept['value']:.4f} of "
        f"{kept['evaluations']} evaluations"
        + (f" ({ties} other evaluation(s) tied; {KEPT_AMONG_TIES[rule]}, --best_model_ties {rule})" if ties > 0 else "")
    )


def finetuning_card(
    *,
    config,
    manifest,
    task,
    results: Mapping[str, Any],
    model_args: Mapping[str, Any],
    data_args: Mapping[str, Any],
    training_args,
    compute: Mapping[str, Any],
    train_manifest=None,
    license: str = "other",
    template: str | Path = "finetuned",
    processor_notes: Mapping[str, str] | None = None,
) -> ModelCard:
    """The card of a finetuned model: task, labels, base model, finetuning configuration, the test metrics with
    bootstrap CIs, results per missing-modality pattern and per modality ablation. ``task``: the
    :class:`~bioperceiver.tasks.Task` (or its saved dict); the results section is the task's
    (:func:`bioperceiver.evaluation.report.card_results`). ``processor_notes``: what the saved processors say about
    themselves (``ModalityProcessor.card_notes``: the gene feature table's source and licence, which the folder
    redistributes), as in the pretraining card."""
    from .evaluation.report import card_results
    from .tasks import Task

    if not isinstance(task, Task):
        task = Task.from_dict(task)
    # the card describes the modalities the model was finetuned on and the rows it was trained on
    used = list(data_args.get("modalities") or [m for m in config.modality_names if m in manifest.modalities])
    manifest = _narrow(manifest, used)
    train = _narrow(train_manifest if train_manifest is not None else manifest, used)
    test_split = data_args.get("test_split", "test")
    test = results.get(test_split, {})
    section = card_results(task, results, data_args.get("eval_split"), test_split)
    main_metrics = section.pop("main_metrics")
    base = model_args.get("model_name_or_path")
    summary = model_summary(config)
    kinds = sorted({m["kind"] for m in summary["modalities"]})
    source_names = [s.get("name") for s in manifest.metadata.get("sources", []) if isinstance(s, Mapping)]
    if "meta_source" in train.table:
        seen = set(train.table["meta_source"].astype(str))
        source_names = [s for s in source_names if s in seen]
        manifest.metadata["sources"] = [
            s for s in manifest.metadata.get("sources", []) if isinstance(s, Mapping) and s.get("name") in seen
        ]
    eval_results = []
    from huggingface_hub import EvalResult

    for m in main_metrics:
        if isinstance(test.get(m), float) and math.isfinite(test[m]):
            eval_results.append(
                EvalResult(
                    task_type=task.name,
                    dataset_type="manifest",
                    dataset_name=str(Path(str(data_args.get("manifest"))).name),
                    dataset_split=test_split,
                    metric_type=m,
                    metric_value=float(test[m]),
                )
            )
    card_data = ModelCardData(
        model_name=task.card_title(),
        license=license,
        library_name="transformers",
        tags=["bioperceiver", "perceiver", "multimodal", "medical", task.name, *kinds],
        datasets=source_names or None,
        metrics=list(main_metrics) or None,
        base_model=base if base and not Path(str(base)).exists() else None,
        eval_results=eval_results or None,
    )
    labels = task.card_labels()
    finetune_cfg = {
        "base model": describe_base_model(base)
        or f"none: random initialisation from preset {model_args.get('preset')}",
        "finetuning mode": model_args.get("finetuning_mode"),
        "head": f"{config.head_type}"
        + (f", MLP {config.head_hidden_size}" if config.head_hidden_size else "")
        + _linear_term_text(config, results.get("linear_term")),
        "modalities used": ", ".join(data_args.get("modalities") or config.modality_names),
        "label fraction": data_args.get("label_fraction"),
        "epochs": training_args.num_train_epochs,
        "checkpoint kept": _kept_text(results.get("train", {}).get("best_checkpoint")),
        "batch size per device": training_args.per_device_train_batch_size,
        "learning rate": training_args.learning_rate,
        "weight decay": training_args.weight_decay,
        "modality dropout": data_args.get("modality_dropout"),
        "seed": training_args.seed,
        "bootstrap resamples (by patient)": data_args.get("n_bootstrap"),
    }
    if base and (Path(str(base)) / "README.md").exists():
        finetune_cfg["pretraining configuration"] = "in the base model's own card (README.md in its folder)"
    for name, counts in (results.get("vocabulary_extension") or {}).items():
        text = f"{counts['added']} added, {counts['overlap']} overlapping with the pretrained vocabulary"
        if "overlap_trained" in counts:
            text += f", {counts['overlap_trained']} of them trained in pretraining"
        text += f" ({counts['vocabulary_before']} -> {counts['vocabulary_after']})"
        if counts.get("new_sources"):
            text += f"; new sources {', '.join(counts['new_sources'])}"
        if "added_with_features" in counts:
            text += f"; {counts['added_with_features']} of the added genes have gene features"
        if (share := counts.get("token_share_trained")) is not None:
            text += f"; {share:.0%} of the training profiles' tokens use trained embeddings"
        finetune_cfg[f"vocabulary extension ({name})"] = text
    finetune_cfg.update(task.card_settings(config))
    finetune_cfg.update(processor_notes or {})
    splits = results.get("split_sizes") or {
        s: results.get(s, {}).get("n") for s in (data_args.get("train_split"), data_args.get("eval_split"), test_split)
    }
    return render_card(
        template,
        card_data,
        model_name=card_data.model_name,
        task=task.name,
        labels=labels,
        architecture=markdown_table([{"": k, "value": v} for k, v in summary["architecture"].items()]),
        modalities_table=markdown_table(summary["modalities"]),
        provenance_table=markdown_table(provenance(train)),
        citations=source_citations(manifest),
        train_size=f"{len(train)} samples"
        + (f" from {train.table['patient_id'].nunique()} patients" if "patient_id" in train.table else ""),
        split_sizes=", ".join(f"{k}: {v}" for k, v in splits.items() if v is not None) or "see all_results.json",
        presence_table=markdown_table(modality_presence(train)),
        patterns_table=markdown_table(presence_patterns(train)),
        training_table=markdown_table([{"setting": k, "value": v} for k, v in finetune_cfg.items() if v is not None]),
        privacy=privacy_text(results.get("privacy")),
        **section,
        compute_table=markdown_table([{"": k, "value": v} for k, v in compute.items()]),
    )
