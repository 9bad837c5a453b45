"""Model cards: every section renders from a real run's inputs, numbers match the manifest, metadata round-trips
through huggingface_hub, and a template that needs something the caller did not give fails loudly."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import tiny_config
from huggingface_hub import ModelCard, ModelCardData

import bioperceiver as bp
from bioperceiver.cards import (
    NOT_RECORDED,
    modality_presence,
    presence_patterns,
    pretraining_card,
    provenance,
    render_card,
)
from bioperceiver.data import assign_splits, read_manifest, write_manifest
from bioperceiver.data.recipes.synthetic import make_synthetic_cohort
from bioperceiver.training import retrieval_metrics

SECTIONS = [
    "## Model and modalities",
    "## Data provenance and licence per modality",
    "## Training data: modality presence and missingness",
    "## Training configuration",
    "## Evaluation",
    "## Intended use",
    "## Out-of-scope use",
    "## Bias, risks and limitations",
    "## Compute used",
]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    path = make_synthetic_cohort(root / "cohort", num_patients=30, missing_rate=0.4, seed=3)
    m = read_manifest(path)
    table = m.table.copy()
    table["meta_source"] = ["site_a" if i % 3 else "site_b" for i in range(len(table))]
    meta = dict(m.metadata)
    meta["sources"] = [
        {"name": "site_a", "licence": "CC-BY-4.0", "citation": "A et al. (2024)"},
        {"name": "site_b", "licence": "research only", "url": "https://example.org/b"},
    ]
    return assign_splits(read_manifest(write_manifest(table, root / "with_sources.parquet", meta)))


def _card(manifest, **kw):
    config = tiny_config()
    g = torch.Generator().manual_seed(0)
    views = torch.randn(20, 3, 8, generator=g)
    mask = torch.rand(20, 3, generator=g) > 0.2
    metrics = {"eval_loss": 1.5, **retrieval_metrics(views, mask, ["text", "image_cxr", "fused"])}
    run_config = yaml.safe_load((bp.cards.TEMPLATE_DIR.parent / "pretrain" / "configs" / "demo.yaml").read_text())
    return pretraining_card(
        config=config,
        manifest=manifest,
        run_config=run_config,
        metrics=metrics,
        compute={"hardware": "2 CPU cores", "wall-clock": "12 s"},
        num_parameters=123456,
        **kw,
    ), metrics


def test_pretraining_card_renders_every_section_with_measured_numbers(manifest, tmp_path):
    card, metrics = _card(manifest)
    text = str(card)
    for heading in SECTIONS:
        assert heading in text, heading
    train = manifest.split("train")
    for row in modality_presence(train):
        assert f"| {row['modality']} | {row['kind']} | {row['samples']} |" in text
    top = presence_patterns(train)[0]
    assert f"| {top['modalities present']} | {top['samples']} |" in text
    assert "CC-BY-4.0" in text and "research only" in text and "A et al. (2024)" in text
    assert f"| text ↔ image_cxr | {metrics['queries/text-image_cxr']} | {metrics['R@1/text-image_cxr']:.3f}" in text
    assert "0.1235 M" in text or "0.12 M" in text
    # the metadata is valid Hub YAML and round-trips
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.library_name == "transformers"
    assert loaded.data.pipeline_tag == "feature-extraction"
    assert set(loaded.data.datasets) == {"site_a", "site_b"}
    assert "bioperceiver" in loaded.data.tags


def test_card_shows_bootstrap_intervals_when_the_metrics_have_them(manifest):
    card, metrics = _card(manifest)
    key = "text-image_cxr"
    metrics = {**metrics, f"R@1_ci_low/{key}": 0.05, f"R@1_ci_high/{key}": 0.4}
    card2, _ = _card(manifest)
    from bioperceiver.cards import retrieval_rows

    row = next(r for r in retrieval_rows(metrics) if r["views"] == "text ↔ image_cxr")
    assert row["R@1"].endswith("[0.050, 0.400]")
    assert str(card) == str(card2)  # deterministic


def test_provenance_says_when_sources_were_not_recorded(tmp_path):
    path = make_synthetic_cohort(tmp_path / "c", num_patients=6, seed=1)
    m = read_manifest(path)
    m.metadata.pop("sources", None)
    rows = provenance(m)
    assert rows and all(r["sources"] == NOT_RECORDED for r in rows)
    per_source = provenance(read_manifest(path))  # whatever the recipe recorded: never an empty cell
    assert all(r["sources"] for r in per_source)


def test_strict_rendering_refuses_missing_values(tmp_path):
    template = tmp_path / "t.md"
    template.write_text("---\n{{ card_data }}\n---\n# {{ model_name }}\n{{ not_given }}\n")
    with pytest.raises(ValueError, match="not_given"):
        render_card(template, ModelCardData(license="mit"), model_name="x")
    card = render_card(template, ModelCardData(license="mit"), model_name="x", not_given="given")
    assert card.data.license == "mit" and "given" in card.content
    with pytest.raises(FileNotFoundError, match="template"):
        render_card(tmp_path / "missing.md", ModelCardData())
    json.dumps(card.data.to_dict())


def test_pretraining_card_shows_local_paths_as_file_names_only(manifest):
    """A card is what gets shared (pushed to a hub): the run config in it names the manifest, processors and output
    folder by their last path component, never the machine's absolute paths (a user name, a hospital share); the
    full paths stay in run_config.yaml beside it."""
    run_config = yaml.safe_load((bp.cards.TEMPLATE_DIR.parent / "pretrain" / "configs" / "demo.yaml").read_text())
    run_config["output_dir"] = "/home/alice/runs/pt"
    run_config["data"].update(manifest="/mnt/hospital/cohort/manifest.parquet", processor_dir="/home/alice/runs/proc")
    run_config["data"]["shards"] = "s3://bucket/private/shards"
    card = pretraining_card(
        config=tiny_config(), manifest=manifest, run_config=run_config, metrics={"eval_loss": 1.0}, compute={}
    )
    text = str(card)
    for private in ("/home/alice", "/mnt/hospital", "s3://bucket/private"):
        assert private not in text, private
    shown = yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert shown["data"]["manifest"] == "<local>/manifest.parquet" and shown["output_dir"] == "<local>/pt"
    assert shown["data"]["shards"] == "<local>/shards"
    assert shown["optim"] == run_config["optim"]  # everything else as it was


def test_pretraining_card_shows_what_the_processors_note(manifest):
    """``ModalityProcessor.card_notes`` (e.g. an omics processor's gene features: source, licence, coverage) reach
    the card's training table."""
    note = "4-d for 7 of 10 genes (the others: zeros); licence: GO is CC BY 4.0"
    card, _ = _card(manifest, processor_notes={"gene features (omics_expression)": note})
    assert f"| gene features (omics_expression) | {note} |" in str(card)
