"""Per-cohort (per-source) z-scores, vocabulary extension of omics/tabular processors and of the model's embeddings,
and finetuning a pretrained model on a cohort whose genes the pretrained vocabulary lacks (issue 18)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_config
from omics_fixtures import cohort_manifest as _cohort_manifest
from omics_fixtures import expression_matrix as _matrix
from omics_fixtures import pretrained_backbone
from script_loader import load_script

import bioperceiver as bp
from bioperceiver.data import BioPerceiverProcessor
from bioperceiver.data.errors import DataError
from bioperceiver.modalities.omics.processor import OmicsProcessor
from bioperceiver.modalities.processor import sum_statistics
from bioperceiver.modalities.tabular.processor import TabularProcessor


def _genes(a: int, b: int) -> list[str]:
    return [f"G{i}" for i in range(a, b)]


@pytest.fixture
def cohorts(tmp_path):
    a = _matrix(tmp_path / "a.parquet", _genes(0, 8), 30, 0.0, 0, "a")
    b = _matrix(tmp_path / "b.parquet", _genes(4, 12), 30, 3.0, 1, "b")
    return tmp_path, a, b


def _manual(cells, base, source_rows, genes):
    """Per-gene mean/std of the rows ``source_rows`` of a matrix (the reference computation)."""
    table = pd.read_parquet(base / cells[0].split("#")[0]).loc[source_rows, genes]
    std = table.std(ddof=0).to_numpy()
    return table.mean().to_numpy(), np.where(std < 1e-6, 1.0, std)


def test_per_source_zscore_uses_each_cohorts_training_statistics(cohorts):
    base, a, b = cohorts
    train = a[:20] + b[:20]
    proc = OmicsProcessor("omics_x", normalization="none", zscore="per_source").fit(train, base_dir=base)
    assert sorted(proc.state["sources"]) == ["a.parquet", "b.parquet"]
    # a held-out row of cohort b is standardised with b's training-row statistics, not the pooled ones
    out = proc(b[25], base_dir=base)
    genes = [proc.state["genes"][i] for i in out["gene_ids"]]
    mean, std = _manual(b, base, [f"b{i}" for i in range(20)], genes)
    raw = pd.read_parquet(base / "b.parquet").loc["b25", genes].to_numpy()
    np.testing.assert_allclose(out["values"], (raw - mean) / std, rtol=1e-5, atol=1e-5)
    # the batch effect is gone: each cohort's training rows are centred per gene
    for cells in (a[:20], b[:20]):
        rows = [proc(c, base_dir=base) for c in cells]
        ids = np.concatenate([r["gene_ids"] for r in rows])
        vals = np.concatenate([r["values"] for r in rows])
        for g in np.unique(ids):
            assert abs(vals[ids == g].mean()) < 1e-5
    # a mapping cell has no source: pooled statistics
    mapping = {"G0": 5.0, "G5": 6.0}
    pooled = OmicsProcessor("omics_x", normalization="none", zscore=True).fit(train, base_dir=base)
    np.testing.assert_array_equal(proc(mapping)["values"], pooled(mapping)["values"])
    np.testing.assert_array_equal(proc.state["mean"], pooled.state["mean"])
    # round trip
    again = OmicsProcessor.from_dict(json.loads(json.dumps(proc.to_dict())))
    np.testing.assert_array_equal(again(b[25], base_dir=base)["values"], out["values"])


def test_unseen_source_is_an_error_naming_it_and_the_fix(cohorts):
    base, a, b = cohorts
    proc = OmicsProcessor("omics_x", normalization="none", zscore="per_source").fit(a[:20], base_dir=base)
    with pytest.raises(DataError, match=r"b\.parquet.*extend") as info:
        proc(b[0], base_dir=base, sample_id="b0")
    assert info.value.reason == "unknown_source"
    assert info.value.sample_id == "b0"


def test_per_source_federated_fit_equals_pooled_fit(cohorts):
    base, a, b = cohorts

    def make():
        return OmicsProcessor("omics_x", normalization="none", zscore="per_source")

    sites = [a[:10] + b[:5], a[10:20] + b[5:20]]
    proc = make()
    merged = sum_statistics(proc.site_statistics(v, base_dir=base) for v in sites)
    proc.fit_from_statistics(merged)
    pooled = make().fit(a[:20] + b[:20], base_dir=base)
    assert proc.state["genes"] == pooled.state["genes"]
    for key in ("mean", "std"):
        np.testing.assert_allclose(proc.state[key], pooled.state[key], rtol=1e-9)
        for source in ("a.parquet", "b.parquet"):
            np.testing.assert_allclose(proc.state["sources"][source][key], pooled.state["sources"][source][key])


def test_zscore_setting_is_checked():
    with pytest.raises(ValueError, match="zscore must be one of"):
        OmicsProcessor("omics_x", zscore="per_cohort")


def test_omics_extension_keeps_existing_ids_and_statistics(cohorts):
    base, a, b = cohorts
    proc = OmicsProcessor("omics_x", normalization="none", zscore="per_source").fit(a[:20], base_dir=base)
    before = json.loads(json.dumps(proc.state))
    out_a = proc(a[25], base_dir=base)
    report = proc.extend(b[:20], base_dir=base)
    assert report == {
        "added": 4,  # G8..G11
        "overlap": 4,  # G4..G7
        "measured": 8,
        "vocabulary_before": 8,
        "vocabulary_after": 12,
        "new_sources": ["b.parquet"],
    }
    assert proc.state["genes"][:8] == before["genes"] and proc.state["genes"][8:] == sorted(_genes(8, 12))
    assert proc.state["mean"][:8] == before["mean"] and proc.state["std"][:8] == before["std"]
    assert proc.state["sources"]["a.parquet"]["mean"][:8] == before["sources"]["a.parquet"]["mean"]
    # the old cohort's tokens are unchanged; the new cohort is tokenised with its own statistics
    np.testing.assert_array_equal(proc(a[25], base_dir=base)["values"], out_a["values"])
    np.testing.assert_array_equal(proc(a[25], base_dir=base)["gene_ids"], out_a["gene_ids"])
    out_b = proc(b[25], base_dir=base)
    assert out_b["gene_ids"].max() == 11
    genes = [proc.state["genes"][i] for i in out_b["gene_ids"]]
    mean, std = _manual(b, base, [f"b{i}" for i in range(20)], genes)
    raw = pd.read_parquet(base / "b.parquet").loc["b25", genes].to_numpy()
    np.testing.assert_allclose(out_b["values"], (raw - mean) / std, rtol=1e-5, atol=1e-5)
    assert proc.model_settings()["num_genes"] == 12


def test_tabular_extension_appends_features_and_category_codes():
    rows = [{"age": 50.0 + i, "sex": "F" if i % 2 else "M"} for i in range(10)]
    proc = TabularProcessor("tabular_x").fit(rows)
    before = json.loads(json.dumps(proc.state))
    old = proc(rows[3])
    new_rows = [{"age": 60.0 + i, "crp": float(i), "smoker": "yes" if i % 3 else "no"} for i in range(10)]
    report = proc.extend(new_rows)
    assert report == {"added": 2, "overlap": 1, "measured": 3, "vocabulary_before": 2, "vocabulary_after": 4}
    assert proc.state["features"][:2] == before["features"]
    assert proc.feature_names[2:] == ["crp", "smoker"]
    assert proc.state["num_categories"] == before["num_categories"] + 3  # unknown bucket + "no" + "yes"
    for key in old:
        np.testing.assert_array_equal(proc(rows[3])[key], old[key])
    out = proc(new_rows[4])
    assert sorted(out["feature_ids"].tolist()) == [0, 2, 3]
    assert out["category_ids"].max() < proc.model_settings()["num_categories"]


def test_model_vocabulary_resize_keeps_rows_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = bp.BioPerceiverModel(tiny_config())
    old_genes = model.embedders["omics"].gene_embeddings.weight.detach().clone()
    old_feats = model.embedders["tabular"].feature_embeddings.weight.detach().clone()
    n_genes = model.config.modalities["omics"]["num_genes"]
    grown = model.resize_modality_vocabularies(
        {"omics": {"kind": "omics", "num_genes": n_genes + 5}, "tabular": {"kind": "tabular", "num_features": 10}}
    )
    assert grown == {"omics": {"num_genes": (n_genes, n_genes + 5)}}  # 10 < 16 features: left as it is
    weight = model.embedders["omics"].gene_embeddings.weight
    assert torch.equal(weight[:n_genes], old_genes)
    assert torch.equal(model.embedders["tabular"].feature_embeddings.weight, old_feats)
    std = model.config.initializer_range
    assert weight[n_genes:].abs().max() < 6 * std and weight[n_genes:].std() > 0
    assert model.config.modalities["omics"]["num_genes"] == n_genes + 5
    # a new gene id runs forward and receives a gradient
    ids = torch.tensor([[n_genes + 4, 1]])
    out = model(omics={"gene_ids": ids, "values": torch.ones(1, 2)})
    # not .sum(): the latents leave a final LayerNorm, whose outputs sum to a constant (the gradient is 0 up to
    # rounding, which a test must not rely on)
    (out.pooler_output**2).sum().backward()
    assert weight.grad[n_genes + 4].abs().sum() > 1e-3
    model.save_pretrained(tmp_path / "m")
    again = bp.BioPerceiverModel.from_pretrained(tmp_path / "m")
    assert again.config.modalities["omics"]["num_genes"] == n_genes + 5
    assert torch.equal(again.embedders["omics"].gene_embeddings.weight, weight.detach())
    with pytest.raises(ValueError, match="cannot shrink"):
        model.embedders["omics"].resize_vocabulary({"num_genes": 2}, std=0.02)


def test_resize_grows_every_table_a_vocabulary_indexes_and_round_trips(tmp_path):
    """With ``value_embedding: per_gene`` the gene ids index two tables; growing the vocabulary grows both (rows
    kept), and a saved model loads with them."""
    omics = {"kind": "omics", "num_genes": 10, "value_embedding": "per_gene"}
    torch.manual_seed(0)
    model = bp.BioPerceiverModel(tiny_config(modalities={"omics": omics}))
    emb = model.embedders["omics"]
    old = {a: getattr(emb, a).weight.detach().clone() for a in ("gene_embeddings", "gene_value_embeddings")}
    assert model.resize_modality_vocabularies({"omics": {**omics, "num_genes": 13}}) == {
        "omics": {"num_genes": (10, 13)}
    }
    for attr, weight in old.items():
        grown = getattr(model.embedders["omics"], attr).weight
        assert grown.shape[0] == 13 and torch.equal(grown[:10], weight) and grown[10:].std() > 0
    model.save_pretrained(tmp_path / "m")
    again = bp.BioPerceiverModel.from_pretrained(tmp_path / "m")
    assert again.config.modalities["omics"]["value_embedding"] == "per_gene"
    batch = {"omics": {"gene_ids": torch.tensor([[12, 1]]), "values": torch.tensor([[0.5, -1.0]])}}
    model.eval(), again.eval()
    torch.testing.assert_close(again(**batch).pooler_output, model(**batch).pooler_output)


# ---- finetuning a pretrained model on a cohort with new genes ----------------------------------------------------


def _load_script():
    return load_script("finetune/run_finetune.py")


@pytest.fixture
def pretrained(tmp_path) -> Path:
    return pretrained_backbone(tmp_path)


def _finetune(manifest: Path, pre: Path, out: Path, *args: str) -> dict:
    argv = [
        *("--manifest", str(manifest), "--output_dir", str(out), "--model_name_or_path", str(pre)),
        *("--task", "classification", "--label_column", "label_y", "--do_train", "true"),
        *("--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--eval_strategy", "no"),
        *("--save_strategy", "no", "--n_bootstrap", "10", "--ablations", "false", "--uncertainty", "false"),
        *("--interpret", "false", "--use_cpu", "true", "--report_to", "none", "--seed", "0"),
        *args,
    ]
    return _load_script().main(argv)


def test_finetune_extends_the_pretrained_vocabulary(tmp_path, pretrained):
    manifest = _cohort_manifest(tmp_path, "new", _genes(4, 14), 2.0, 1)
    out = tmp_path / "ft"
    results = _finetune(manifest, pretrained, out)
    ext = results["vocabulary_extension"]
    assert ext["omics_expression"]["added"] == 6 and ext["omics_expression"]["overlap"] == 4
    assert ext["omics_expression"]["new_sources"] == ["new.parquet"]
    assert ext["tabular_clinical"]["added"] == 0 and ext["tabular_clinical"]["overlap"] == 1
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["vocabulary_extension"] == ext
    card = (out / "README.md").read_text()
    assert "vocabulary extension (omics_expression)" in card and "6 added, 4 overlapping" in card
    # the saved model and processors round-trip with the extended vocabulary
    config = json.loads((out / "config.json").read_text())
    assert config["modalities"]["omics_expression"]["num_genes"] == 14
    proc = BioPerceiverProcessor.from_pretrained(out)
    assert len(proc.processors["omics_expression"].state["genes"]) == 14
    model = bp.AutoModelForSequenceClassification.from_pretrained(out)
    assert model.bioperceiver.embedders["omics_expression"].gene_embeddings.num_embeddings == 14
    # the pretrained gene embeddings stay where they were only if training did not move them: compare the shape
    # of the pretrained rows instead (the pretrained folder itself is untouched)
    before = bp.BioPerceiverModel.from_pretrained(pretrained)
    assert before.embedders["omics_expression"].gene_embeddings.num_embeddings == 8


def test_finetune_counts_the_overlap_with_trained_rows(tmp_path, pretrained):
    """A backbone's ``trained_vocabulary_rows.safetensors`` (written by pretraining) makes the extension report how
    many overlapping genes / features have trained embeddings, in the results, the log line and the card; a mask of
    another vocabulary's length is left out with a warning, never applied."""
    from bioperceiver.training.pretraining import load_trained_rows, save_trained_rows

    genes = BioPerceiverProcessor.from_pretrained(pretrained).processors["omics_expression"].state["genes"]
    gene_mask = torch.tensor([g in ("G4", "G5", "G0") for g in genes])  # G0 is trained but not measured by "new"
    save_trained_rows(
        {
            "omics_expression.gene_embeddings": gene_mask,
            "omics_expression.gene_value_embeddings": torch.ones(len(genes), dtype=torch.bool),  # not the id table
            "tabular_clinical.feature_embeddings": torch.zeros(1, dtype=torch.bool),
        },
        pretrained,
    )
    manifest = _cohort_manifest(tmp_path, "new", _genes(4, 14), 2.0, 1)
    results = _finetune(manifest, pretrained, tmp_path / "ft")
    ext = results["vocabulary_extension"]
    assert ext["omics_expression"]["overlap"] == 4 and ext["omics_expression"]["overlap_trained"] == 2
    assert ext["tabular_clinical"]["overlap"] == 1 and ext["tabular_clinical"]["overlap_trained"] == 0
    card = (tmp_path / "ft" / "README.md").read_text()
    assert "6 added, 4 overlapping with the pretrained vocabulary, 2 of them trained in pretraining (8 -> 14)" in card
    share = ext["omics_expression"]["token_share_trained"]
    assert 0 < share < 1 and f"{share:.0%} of the training profiles' tokens use trained embeddings" in card
    # the finetuned folder carries the record, grown with untrained rows for the 6 added genes, so finetuning it on
    # another cohort still knows which rows pretraining trained (the per-gene value table the tiny model lacks is
    # not carried)
    carried = load_trained_rows(tmp_path / "ft")
    assert sorted(carried) == ["omics_expression.gene_embeddings", "tabular_clinical.feature_embeddings"]
    assert carried["omics_expression.gene_embeddings"].tolist() == gene_mask.tolist() + [False] * 6
    assert carried["tabular_clinical.feature_embeddings"].tolist() == [False]
    again = _finetune(manifest, tmp_path / "ft", tmp_path / "ft_again")["vocabulary_extension"]["omics_expression"]
    assert again["added"] == 0 and again["overlap"] == 10 and again["overlap_trained"] == 2
    # a mask that does not fit the processors' vocabulary is not used
    save_trained_rows({"omics_expression.gene_embeddings": torch.ones(3, dtype=torch.bool)}, pretrained)
    results = _finetune(manifest, pretrained, tmp_path / "ft2")
    assert "overlap_trained" not in results["vocabulary_extension"]["omics_expression"]


def test_extend_counts_overlapping_ids_with_trained_rows(cohorts):
    """``extend(..., trained=mask)``: the overlapping entries whose id is trained in ``mask`` (ids beyond it count
    as untrained); without a mask the report is as before."""
    base, a, b = cohorts
    proc = OmicsProcessor("omics_x", normalization="none", zscore="per_source").fit(a[:20], base_dir=base)
    genes = proc.state["genes"]  # G0..G7; b measures G4..G11
    mask = [g in ("G1", "G5", "G6") for g in genes][:-1]  # one id short: the last gene counts as untrained
    report = proc.extend(b[:20], base_dir=base, trained=mask)
    expected = sum(1 for i, g in enumerate(genes[:-1]) if mask[i] and g in _genes(4, 12))
    assert report["overlap"] == 4 and report["overlap_trained"] == expected == 2
    # the share of each profile's tokens (every measured gene here: no top_k) with a trained row, averaged
    trained_genes = {g for i, g in enumerate(genes[:-1]) if mask[i]}
    table = pd.read_parquet(base / "b.parquet").loc[[f"b{i}" for i in range(20)]]
    per_row = [row.dropna().index.isin(list(trained_genes)).mean() for _, row in table.iterrows()]
    assert report["token_share_trained"] == pytest.approx(np.mean(per_row))
    assert 0 < report["token_share_trained"] < 1
    again = OmicsProcessor("omics_x", normalization="none", zscore="per_source").fit(a[:20], base_dir=base)
    assert "overlap_trained" not in again.extend(b[:20], base_dir=base)
    tab = TabularProcessor("tabular_x").fit([{"age": 50.0, "grade": "2"}, {"age": 60.0, "grade": "3"}])
    ids = {f["name"]: i for i, f in enumerate(tab.state["features"])}
    trained = [False] * len(ids)
    trained[ids["grade"]] = True
    report = tab.extend([{"age": 55.0, "grade": "1", "ki67": 0.2}], trained=trained)
    assert report["overlap"] == 2 and report["overlap_trained"] == 1 and report["added"] == 1


def test_finetune_without_extension_keeps_the_old_error(tmp_path, pretrained):
    manifest = _cohort_manifest(tmp_path, "disjoint", _genes(20, 26), 2.0, 2)
    with pytest.raises(SystemExit) as err:  # run_finetune.py: error: ... (exit status 2), caused by the DataError
        _finetune(manifest, pretrained, tmp_path / "ft", "--extend_vocabulary", "false", "--on_error", "raise")
    assert err.value.code == 2 and isinstance(err.value.__cause__, DataError)
    assert re.search(r"none of the .* measured genes is in the fitted vocabulary", str(err.value.__cause__))


def test_top_k_by_variance_keeps_each_cohort_s_most_variable_measured_genes(cohorts):
    """``top_k_by: variance``: a fixed panel per source (the genes with the largest training SD among those the
    sample measures), not each profile's highest values; ``value`` (the default) is unchanged."""
    base, a, b = cohorts
    train = a[:20] + b[:20]
    k = 3
    proc = OmicsProcessor("omics_x", normalization="none", zscore="per_source", top_k=k, top_k_by="variance")
    proc.fit(train, base_dir=base)
    genes = proc.state["genes"]
    for cells, source, rows in ((a, "a.parquet", "a"), (b, "b.parquet", "b")):
        table = pd.read_parquet(base / source)
        std = table.loc[[f"{rows}{i}" for i in range(20)]].std(ddof=0)
        for cell in cells[20:]:
            out = proc(cell, base_dir=base)
            measured = table.loc[cell.split("=")[1]].dropna().index
            expected = sorted(std[measured].sort_values(ascending=False).index[:k])
            assert [genes[i] for i in out["gene_ids"]] == expected and len(out["values"]) == k
    # the default ranks each profile by its own values: the same row gives other genes
    by_value = OmicsProcessor("omics_x", normalization="none", zscore="per_source", top_k=k).fit(train, base_dir=base)
    raw = pd.read_parquet(base / "b.parquet").loc["b25"].dropna()
    assert [genes[i] for i in by_value(b[25], base_dir=base)["gene_ids"]] == sorted(raw.nlargest(k).index)
    # a gene without spread in training (standardised with SD 1) never outranks one that varies
    const = base / "c.parquet"
    values = np.random.default_rng(2).normal(0.0, 0.1, size=(10, 3))
    values[:, 1] = 4.0
    pd.DataFrame(values, index=[f"c{i}" for i in range(10)], columns=["G0", "G1", "G2"]).to_parquet(const)
    cells = [f"c.parquet#row=c{i}" for i in range(10)]
    flat = OmicsProcessor("omics_x", normalization="none", zscore=True, top_k=2, top_k_by="variance").fit(
        cells, base_dir=base
    )
    assert [flat.state["genes"][i] for i in flat(cells[0], base_dir=base)["gene_ids"]] == ["G0", "G2"]
    # round trip, and the setting needs the z-score statistics
    again = OmicsProcessor.from_dict(json.loads(json.dumps(proc.to_dict())))
    np.testing.assert_array_equal(again(b[25], base_dir=base)["gene_ids"], proc(b[25], base_dir=base)["gene_ids"])
    with pytest.raises(ValueError, match="zscore"):
        OmicsProcessor("omics_x", top_k=3, top_k_by="variance")
    with pytest.raises(ValueError, match="top_k_by"):
        OmicsProcessor("omics_x", top_k=3, top_k_by="abs")


def test_top_k_by_deviation_keeps_each_profile_s_largest_absolute_z_scores(tmp_path):
    """``top_k_by: deviation``: each profile's ``top_k`` genes with the largest |z| under its source's training
    statistics (over- and under-expression alike), so tokens spread over the vocabulary where ``value`` keeps the
    same abundant genes in every profile; ties by gene id; needs the z-score."""
    rng = np.random.default_rng(3)
    genes = _genes(0, 12)
    values = rng.normal(3.0 * np.arange(12)[::-1], 1.0, size=(40, 12))  # G0 the most abundant gene, G11 the least
    values[rng.random(values.shape) < 0.1] = np.nan
    ids = [f"d{i}" for i in range(40)]
    table = pd.DataFrame(values, index=pd.Index(ids, name="sample"), columns=genes)
    table.to_parquet(tmp_path / "d.parquet")
    cells = [f"d.parquet#row={i}" for i in ids]
    k = 3
    proc = OmicsProcessor("omics_x", normalization="none", zscore="per_source", top_k=k, top_k_by="deviation")
    proc.fit(cells[:30], base_dir=tmp_path)
    vocab = proc.state["genes"]
    mean, std = _manual(cells, tmp_path, ids[:30], genes)
    z = (table - mean) / std
    negative = 0
    for i, cell in enumerate(cells[30:], start=30):
        row = z.iloc[i].dropna()
        expected = row.abs().sort_values(ascending=False).index[:k]
        out = proc(cell, base_dir=tmp_path)
        got = [vocab[g] for g in out["gene_ids"]]
        assert sorted(got) == sorted(expected)
        np.testing.assert_allclose(out["values"], row[got].to_numpy(), rtol=1e-5, atol=1e-5)
        negative += int((out["values"] < 0).sum())
    assert negative > 0  # under-expression becomes a token, which top_k_by: value never gives
    # over all 40 profiles: deviation reaches every gene, the highest values only the 3 abundant ones (and the next
    # where one of them is unmeasured)
    by_value = OmicsProcessor("omics_x", normalization="none", zscore="per_source", top_k=k)
    by_value.fit(cells[:30], base_dir=tmp_path)

    def reached(p):
        return {p.state["genes"][g] for c in cells for g in p(c, base_dir=tmp_path)["gene_ids"]}

    assert reached(proc) == set(genes)
    assert {"G0", "G1", "G2"} <= reached(by_value) <= {"G0", "G1", "G2", "G3", "G4"}
    # ties in |z| go to the lower gene id: G0 and G2 are +1 SD, G1 -1 SD (training rows 1 and 3 per gene)
    tie = pd.DataFrame(
        [[1.0, 1.0, 1.0], [3.0, 3.0, 3.0], [3.0, 1.0, 3.0]], index=pd.Index(["t0", "t1", "q"], name="sample")
    )
    tie.columns = ["G0", "G1", "G2"]
    tie.to_parquet(tmp_path / "t.parquet")
    tied = OmicsProcessor("omics_x", normalization="none", zscore=True, top_k=2, top_k_by="deviation")
    tied.fit(["t.parquet#row=t0", "t.parquet#row=t1"], base_dir=tmp_path)
    out = tied("t.parquet#row=q", base_dir=tmp_path)
    assert [tied.state["genes"][g] for g in out["gene_ids"]] == ["G0", "G1"]
    np.testing.assert_allclose(out["values"], [1.0, -1.0])
    # round trip, and the setting needs the z-score statistics
    again = OmicsProcessor.from_dict(json.loads(json.dumps(proc.to_dict())))
    np.testing.assert_array_equal(
        again(cells[33], base_dir=tmp_path)["gene_ids"], proc(cells[33], base_dir=tmp_path)["gene_ids"]
    )
    with pytest.raises(ValueError, match="zscore"):
        OmicsProcessor("omics_x", top_k=3, top_k_by="deviation")


def _reference_pcs(base, cells, train_rows, k, n_genes):
    """The reference computation of ``pcs``: one source's training rows z-scored with their own statistics (ddof 0),
    the ``n_genes`` genes with the largest training SD, unmeasured = 0, scikit-learn's PCA, scores scaled to unit SD
    on the training rows and signed so that each component's largest loading is positive."""
    from sklearn.decomposition import PCA

    table = pd.read_parquet(base / cells[0].split("#")[0])
    train = table.loc[train_rows]
    mean, std = train.mean(), train.std(ddof=0)
    genes = std.sort_values(ascending=False, kind="stable").index[:n_genes]
    z = ((table[genes] - mean[genes]) / std[genes]).fillna(0.0)
    pca = PCA(n_components=k, svd_solver="full").fit(z.loc[train_rows])
    sign = np.sign(pca.components_[np.arange(k), np.abs(pca.components_).argmax(axis=1)])
    scores = (pca.transform(z) - pca.transform(z.loc[train_rows]).mean(0)) * sign
    return pd.DataFrame(scores / (pca.transform(z.loc[train_rows]) * sign).std(0), index=table.index)


def test_pcs_are_each_cohort_s_principal_components_as_tokens(cohorts):
    """``pcs``: the first k principal components of a profile become tokens <PC1>..<PCk>, fitted per source on its
    training rows (scikit-learn reference), after the gene tokens' top_k; top_k 0 keeps them alone."""
    base, a, b = cohorts
    train = a[:20] + b[:20]
    k, n_genes = 3, 6
    proc = OmicsProcessor("omics_x", normalization="none", zscore="per_source", top_k=2, pcs=k, pcs_genes=n_genes)
    proc.fit(train, base_dir=base)
    genes = proc.state["genes"]
    assert genes[-k:] == ["<PC1>", "<PC2>", "<PC3>"] and proc.model_settings()["num_genes"] == 12 + k
    for cells, prefix in ((a, "a"), (b, "b")):
        ref = _reference_pcs(base, cells, [f"{prefix}{i}" for i in range(20)], k, n_genes)
        for cell in cells[18:]:  # two training rows and the held-out ones
            out = proc(cell, base_dir=base)
            names = [genes[i] for i in out["gene_ids"]]
            assert len(names) == 2 + k and names[2:] == ["<PC1>", "<PC2>", "<PC3>"]  # 2 gene tokens, then the PCs
            np.testing.assert_allclose(out["values"][2:], ref.loc[cell.split("=")[1]].to_numpy(), atol=1e-4)
    # scores have mean 0 / SD 1 on the training rows of each source
    scores = np.stack([proc(c, base_dir=base)["values"][-k:] for c in a[:20]])
    np.testing.assert_allclose(scores.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(scores.std(0), 1, atol=1e-5)
    # top_k 0: only the component tokens; the same scores
    only = OmicsProcessor("omics_x", normalization="none", zscore="per_source", top_k=0, pcs=k, pcs_genes=n_genes)
    only.fit(train, base_dir=base)
    out = only(b[25], base_dir=base)
    assert [genes[i] for i in out["gene_ids"]] == ["<PC1>", "<PC2>", "<PC3>"]
    np.testing.assert_allclose(out["values"], proc(b[25], base_dir=base)["values"][-k:], atol=1e-6)
    # round trip
    again = OmicsProcessor.from_dict(json.loads(json.dumps(proc.to_dict())))
    np.testing.assert_allclose(again(b[25], base_dir=base)["values"], proc(b[25], base_dir=base)["values"])


def test_pcs_of_a_source_added_by_extension_and_the_settings_checks(cohorts):
    base, a, b = cohorts
    k = 2
    settings = dict(normalization="none", zscore="per_source", top_k=0, pcs=k, pcs_genes=5)
    proc = OmicsProcessor("omics_x", **settings).fit(a[:20], base_dir=base)
    report = proc.extend(b[:20], base_dir=base)  # cohort b: new genes G8..G11 appended after the <PC> entries
    assert report["new_sources"] == ["b.parquet"] and report["added"] == 4
    fresh = OmicsProcessor("omics_x", **settings).fit(b[:20], base_dir=base)
    for cell in b[20:]:  # b's components are fitted on its own rows, as a processor fitted on b alone would have
        np.testing.assert_allclose(proc(cell, base_dir=base)["values"], fresh(cell, base_dir=base)["values"], atol=1e-6)
    np.testing.assert_allclose(  # cohort a keeps its fit
        proc(a[25], base_dir=base)["values"],
        OmicsProcessor("omics_x", **settings).fit(a[:20], base_dir=base)(a[25], base_dir=base)["values"],
    )
    with pytest.raises(ValueError, match="zscore"):
        OmicsProcessor("omics_x", pcs=3)
    with pytest.raises(ValueError, match="needs pcs"):
        OmicsProcessor("omics_x", zscore=True, top_k=0)
    with pytest.raises(NotImplementedError, match="federated"):
        OmicsProcessor("omics_x", **settings).site_statistics(a[:20], base_dir=base)


def test_linear_term_on_pc_tokens_is_cox_on_the_principal_components(cohorts):
    """With ``top_k: 0`` and ``pcs``, the wide & deep term on the expression modality is a Cox model on the
    profile's principal components, as the classical expression baseline (lifelines reference)."""
    from lifelines import CoxPHFitter

    from bioperceiver.modeling_tasks import BioPerceiverForSurvival
    from bioperceiver.training import fit_linear_term

    base, a, _ = cohorts
    k = 2
    proc = OmicsProcessor("omics_x", normalization="none", zscore=True, top_k=0, pcs=k, pcs_genes=6)
    proc.fit(a, base_dir=base)
    out = [proc(c, base_dir=base) for c in a]
    ids = torch.as_tensor(np.stack([o["gene_ids"] for o in out]))
    x = np.stack([o["values"] for o in out]).astype(np.float64)
    rng = np.random.default_rng(0)
    t = rng.exponential(1.0 / np.exp(x @ np.array([0.9, -0.6])))
    e = (rng.uniform(size=len(t)) < 0.8).astype(float)
    cfg = tiny_config(
        modalities={"omics_x": {"kind": "omics", **proc.model_settings()}}, head_linear_modalities=["omics_x"]
    )
    model = BioPerceiverForSurvival(cfg)
    batch = {"inputs": {"omics_x": {"gene_ids": ids, "values": torch.as_tensor(x, dtype=torch.float32)}}}
    fit_linear_term(model, [{**batch, "labels": torch.tensor(np.stack([t, e], 1), dtype=torch.float32)}], l2=[0.0])
    ref = CoxPHFitter().fit(pd.DataFrame(x, columns=["pc1", "pc2"]).assign(t=t, e=e), "t", "e").params_.to_numpy()
    ours = model.linear_term.numeric["omics_x"][ids[0], 0].detach().numpy()
    np.testing.assert_allclose(ours, ref, atol=2e-3)


def _constant_matrix(path: Path, n: int, prefix: str, values: dict[str, float]) -> list[str]:
    ids = [f"{prefix}{i}" for i in range(n)]
    pd.DataFrame({g: np.full(n, v) for g, v in values.items()}, index=pd.Index(ids, name="sample")).to_parquet(path)
    return [f"{path.name}#row={i}" for i in ids]


def test_pcs_of_a_cohort_without_spread_are_zero_not_a_crash(cohorts, caplog):
    """A PCA with no gene to read (a one-row cohort, genes without training spread) gives all-zero components and
    scores 0 for that cohort, says so in the log, and round-trips; fitting and extending both."""
    base, a, _ = cohorts
    one = _matrix(base / "c.parquet", _genes(0, 8), 1, 0.0, 2, "c")
    settings = dict(normalization="none", zscore="per_source", top_k=0, pcs=3, pcs_genes=6)
    with caplog.at_level("WARNING", logger="bioperceiver"):
        proc = OmicsProcessor("omics_x", **settings).fit(a[:20] + one, base_dir=base)
    assert "c.parquet" in caplog.text and "no component" in caplog.text
    np.testing.assert_array_equal(proc(one[0], base_dir=base)["values"], np.zeros(3, dtype=np.float32))
    again = OmicsProcessor.from_dict(json.loads(json.dumps(proc.to_dict())))
    np.testing.assert_array_equal(again(one[0], base_dir=base)["values"], proc(one[0], base_dir=base)["values"])
    np.testing.assert_allclose(  # cohort a's components are those of a processor fitted on a alone
        proc(a[25], base_dir=base)["values"],
        OmicsProcessor("omics_x", **settings).fit(a[:20], base_dir=base)(a[25], base_dir=base)["values"],
        atol=1e-6,
    )
    extended = OmicsProcessor("omics_x", **settings).fit(a[:20], base_dir=base)
    assert extended.extend(one, base_dir=base)["new_sources"] == ["c.parquet"]
    np.testing.assert_array_equal(extended(one[0], base_dir=base)["values"], np.zeros(3, dtype=np.float32))
    OmicsProcessor.from_dict(json.loads(json.dumps(extended.to_dict())))
    # genes constant over the training rows carry no spread, however large their value (no cancellation noise)
    flat = _constant_matrix(base / "k.parquet", 7, "k", {"A": 12345.678, "B": 0.1 + 0.2, "C": 987.6543})
    proc = OmicsProcessor("omics_x", normalization="none", zscore=True, top_k=None, pcs=2, pcs_genes=3)
    proc.fit(flat, base_dir=base)
    assert proc.state["std"][:3] == [1.0, 1.0, 1.0] and proc.state["pcs"]["*"]["genes"] == []
    np.testing.assert_allclose(proc(flat[0], base_dir=base)["values"], np.zeros(5), atol=1e-12)


def test_a_failed_extension_leaves_the_processor_as_it_was(cohorts, monkeypatch):
    base, a, b = cohorts
    proc = OmicsProcessor("omics_x", normalization="none", zscore="per_source", top_k=0, pcs=2, pcs_genes=5)
    proc.fit(a[:20], base_dir=base)
    before = json.dumps(proc.to_dict())
    expected = proc(a[25], base_dir=base)["values"]

    def boom(*args, **kwargs):
        raise RuntimeError("PCA failed")

    monkeypatch.setattr(proc, "_fit_pca", boom)
    with pytest.raises(RuntimeError, match="PCA failed"):
        proc.extend(b[:20], base_dir=base)
    assert json.dumps(proc.to_dict()) == before
    np.testing.assert_array_equal(proc(a[25], base_dir=base)["values"], expected)
    with pytest.raises(DataError, match="was not seen"):
        proc(b[25], base_dir=base)


def test_extension_read_through_a_pca_it_does_not_measure_is_reported(cohorts, caplog):
    """With pooled statistics a new cohort's profiles go through the development PCA: the share of that PCA's genes
    the new rows measure is reported; none with only the component tokens (top_k 0) would make every profile the
    same tokens, which is an error naming the fix."""
    base, a, b = cohorts
    other = _matrix(base / "e.parquet", [f"ENSG{i}" for i in range(8)], 30, 0.0, 3, "e")
    settings = dict(normalization="none", zscore=True, pcs=3, pcs_genes=5)
    proc = OmicsProcessor("omics_x", top_k=0, **settings).fit(a[:20], base_dir=base)
    before = json.dumps(proc.to_dict())
    with pytest.raises(DataError, match="principal components") as err:
        proc.extend(other[:20], base_dir=base)
    assert "per_source" in str(err.value) and json.dumps(proc.to_dict()) == before
    # with gene tokens the cohort still carries information: a warning, and the share in the report
    proc = OmicsProcessor("omics_x", top_k=2, **settings).fit(a[:20], base_dir=base)
    with caplog.at_level("WARNING", logger="bioperceiver"):
        report = proc.extend(other[:20], base_dir=base)
    assert report["pca_genes_measured"] == 0.0 and "0% of the genes" in caplog.text
    # partial overlap: b measures G4..G7 of a's genes, 10% of cells unmeasured
    proc = OmicsProcessor("omics_x", top_k=0, **settings).fit(a[:20], base_dir=base)
    read = [proc.state["genes"][i] for i in proc.state["pcs"]["*"]["genes"]]
    report = proc.extend(b[:20], base_dir=base)
    table = pd.read_parquet(base / "b.parquet").iloc[:20]
    expected = table[[g for g in read if g in table.columns]].notna().sum(axis=1).mean() / len(read)
    assert len(read) == 5 and 0 < expected < 1
    assert report["pca_genes_measured"] == pytest.approx(expected)
    # per source: a new source gets its own PCA, which reads only its genes
    proc = OmicsProcessor("omics_x", normalization="none", zscore="per_source", top_k=0, pcs=3, pcs_genes=5)
    proc.fit(a[:20], base_dir=base)
    assert proc.extend(other[:20], base_dir=base)["pca_genes_measured"] == pytest.approx(0.9, abs=0.1)


def test_pcs_settings_names_and_missing_values():
    with pytest.raises(ValueError, match="pcs_genes"):
        OmicsProcessor("omics_x", zscore=True, pcs=8, pcs_genes=5)
    settings = dict(normalization="none", zscore=True, top_k=None, pcs=2, pcs_genes=3)
    proc = OmicsProcessor("omics_x", **settings).fit([{"A": 1.0, "B": 2.0, "C": 0.5}, {"A": 2.0, "B": 1.0, "C": 1.5}])
    with pytest.raises(DataError, match="principal-component tokens"):
        proc({"A": 1.0, "<pc1>": 3.0})
    with pytest.raises(DataError, match="principal-component tokens"):
        proc.extend([{"A": 1.0, "<PC2>": 3.0}, {"A": 2.0, "<PC2>": 1.0}])
    # a missing value is unmeasured whatever its type: float, numpy float32 NaN, pandas NA
    expected = proc({"A": 1.0})
    for missing in (float("nan"), np.float32("nan"), pd.NA, None):
        out = proc({"A": 1.0, "B": missing})
        np.testing.assert_array_equal(out["gene_ids"], expected["gene_ids"])
        np.testing.assert_array_equal(out["values"], expected["values"])


def test_finetune_says_which_settings_a_pretrained_folder_overrides(tmp_path, pretrained, caplog):
    """Processor and embedder settings given with a pretrained model are not applied (its fitted processors and
    embedders are): each differing entry is named in a warning, matching ones are not."""
    manifest = _cohort_manifest(tmp_path, "dev2", _genes(0, 8), 0.0, 0)
    settings = tmp_path / "settings.yaml"
    settings.write_text(
        "processors:\n  omics_expression: {normalization: none, zscore: per_source, top_k: 3}\n"
        "embedders:\n  omics_expression: {value_embedding: per_gene}\n  image_2d: {patch_size: 16}\n"
    )
    with caplog.at_level("WARNING", logger="bioperceiver"):
        _finetune(manifest, pretrained, tmp_path / "ft", "--processor_settings", str(settings))
    ignored = [r.getMessage() for r in caplog.records if "--processor_settings entries ignored" in r.getMessage()]
    assert len(ignored) == 2
    assert "processors.omics_expression.top_k: 3 given, None used" in ignored[0]
    assert "normalization" not in ignored[0] and "zscore" not in ignored[0]  # same as the fitted ones
    assert "embedders.omics_expression.value_embedding: 'per_gene' given, 'shared' used" in ignored[1]
    assert "image_2d" not in ignored[1]  # not a modality of this run: not an override
