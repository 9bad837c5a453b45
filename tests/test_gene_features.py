"""Gene features from GO / KEGG annotation (protocol T): building them from an org.eg.db-shaped SQLite file, the file
round trip, the omics processor's ``gene_features_file`` (tokens carry their gene's features; saved with the
processor; attached to a fitted one; extension), the embedder's ``gene_feature_dim`` term, the collate of per-token
vectors, and the paths a user takes with them (a saved model loading, finetuning with new genes, the CLI)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omics_fixtures import cohort_manifest, expression_matrix, pretrained_backbone
from scipy import sparse
from script_loader import load_script
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfTransformer

import bioperceiver as bp
from bioperceiver.data import BioPerceiverProcessor, read_manifest
from bioperceiver.data.errors import DataError
from bioperceiver.modalities.omics.embedder import OmicsConfig, OmicsEmbedder
from bioperceiver.modalities.omics.gene_features import FILE_FORMAT, GeneFeatures, build_gene_features
from bioperceiver.modalities.omics.processor import OmicsProcessor
from bioperceiver.modalities.registry import get_modality
from bioperceiver.modalities.tabular.processor import TabularProcessor

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "tokenizers" / "gene_features" / "org_hs_go_kegg_svd64.safetensors"

# gene _id -> (symbol, terms); ESR1/PGR/GATA3 share hormone terms, ALB/APOA1 plasma terms, TP53/MDM2 p53 terms;
# LONE's only term is its own (dropped: held by one gene), so LONE gets no row
GENES = {
    1: ("ESR1", ["go_bp:GO:1", "go_bp:GO:2", "go_mf:GO:10", "kegg:04915"]),
    2: ("PGR", ["go_bp:GO:1", "go_bp:GO:2", "go_mf:GO:10"]),
    3: ("GATA3", ["go_bp:GO:1", "go_mf:GO:10", "go_cc:GO:20"]),
    4: ("ALB", ["go_bp:GO:3", "go_cc:GO:21", "go_mf:GO:11"]),
    5: ("APOA1", ["go_bp:GO:3", "go_cc:GO:21", "go_mf:GO:11", "kegg:04979"]),
    6: ("TP53", ["go_bp:GO:4", "go_bp:GO:5", "kegg:04115", "go_cc:GO:20"]),
    7: ("MDM2", ["go_bp:GO:4", "go_bp:GO:5", "kegg:04115"]),
    8: ("CDKN1A", ["go_bp:GO:4", "kegg:04115", "go_cc:GO:20"]),
    9: ("LONE", ["go_bp:GO:99"]),
    10: ("KRT5", ["go_cc:GO:22", "go_bp:GO:6"]),
    11: ("KRT14", ["go_cc:GO:22", "go_bp:GO:6"]),
    12: ("KRT17", ["go_cc:GO:22", "go_bp:GO:6", "go_mf:GO:12"]),
}
ALIASES = [("ER", 1), ("NR3A1", 1), ("PR", 2), ("P53", 6), ("SHARED", 4), ("SHARED", 5), ("MDM2", 8)]


@pytest.fixture
def orgdb(tmp_path) -> Path:
    """A small SQLite file with org.Hs.eg.db's schema for the tables the features read."""
    root = tmp_path / "org.Hs.eg.db"
    (root / "extdata").mkdir(parents=True)
    (root / "DESCRIPTION").write_text("Package: org.Hs.eg.db\nVersion: 3.16.0\n")
    db = root / "extdata" / "org.Hs.eg.sqlite"
    con = sqlite3.connect(db)
    con.executescript(
        """
        CREATE TABLE metadata (name VARCHAR(80) PRIMARY KEY, value VARCHAR(255));
        CREATE TABLE gene_info (_id INTEGER NOT NULL UNIQUE, gene_name VARCHAR(255) NOT NULL,
                                symbol VARCHAR(80) NOT NULL);
        CREATE TABLE alias (_id INTEGER NOT NULL, alias_symbol VARCHAR(80) NOT NULL);
        CREATE TABLE go_bp (_id INTEGER NOT NULL, go_id CHAR(10) NOT NULL, evidence CHAR(3) NOT NULL);
        CREATE TABLE go_mf (_id INTEGER NOT NULL, go_id CHAR(10) NOT NULL, evidence CHAR(3) NOT NULL);
        CREATE TABLE go_cc (_id INTEGER NOT NULL, go_id CHAR(10) NOT NULL, evidence CHAR(3) NOT NULL);
        CREATE TABLE kegg (_id INTEGER NOT NULL, path_id CHAR(5) NOT NULL);
        INSERT INTO metadata VALUES ('EGSOURCEDATE', '2022-Sep12'), ('GOSOURCEDATE', '2022-07-01'),
            ('KEGGSOURCEDATE', '2011-Mar15');
        """
    )
    for gid, (symbol, terms) in GENES.items():
        con.execute("INSERT INTO gene_info VALUES (?, ?, ?)", (gid, symbol.lower(), symbol))
        for term in terms:
            table, _, value = term.partition(":")
            evidence = () if table == "kegg" else ("IDA",)
            con.execute(f"INSERT INTO {table} VALUES (?, ?{', ?' * len(evidence)})", (gid, value, *evidence))
    con.executemany("INSERT INTO alias VALUES (?, ?)", [(gid, a) for a, gid in ALIASES])
    con.commit()
    con.close()
    return db


def _cos(table: GeneFeatures, a: str, b: str) -> float:
    rows, _ = table.rows([a, b])
    return float(rows[0] @ rows[1] / np.linalg.norm(rows[0]) / np.linalg.norm(rows[1]))


def test_build_is_tfidf_svd_of_the_gene_term_table(orgdb):
    table = build_gene_features(orgdb, dim=3, seed=0)
    assert "LONE" not in table.symbols and len(table) == len(GENES) - 1  # its only term is held by one gene
    # the reference: the same incidence built by hand, scikit-learn's TF-IDF and SVD, rows unit length
    genes = sorted(g for g, (s, _) in GENES.items() if s != "LONE")
    held = pd.Series([t for g in genes for t in GENES[g][1]]).value_counts()
    terms = sorted(held[held >= 2].index)
    rows, cols = zip(*[(i, terms.index(t)) for i, g in enumerate(genes) for t in GENES[g][1] if t in terms])
    incidence = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(genes), len(terms)))
    z = TruncatedSVD(3, algorithm="randomized", n_iter=10, random_state=0).fit_transform(
        TfidfTransformer().fit_transform(incidence)
    )
    np.testing.assert_allclose(table.matrix, z, atol=1e-6)
    assert table.symbols == [GENES[g][0] for g in genes]
    assert np.linalg.norm(table.matrix, axis=1).max() <= 1 + 1e-6  # projections of unit-length TF-IDF rows
    # genes that share terms lie nearer than genes that do not
    assert _cos(table, "ESR1", "PGR") > 0.9 > _cos(table, "ESR1", "KRT5")
    assert _cos(table, "KRT5", "KRT14") > 0.9 > _cos(table, "KRT5", "TP53")
    # deterministic for the same file and settings
    assert build_gene_features(orgdb, dim=3, seed=0).sha256 == table.sha256
    assert table.source["database"].startswith("org.Hs.eg.db 3.16.0") and table.source["go"] == "2022-07-01"
    assert table.source["genes"] == "11"


def test_aliases_only_where_they_name_one_gene(orgdb):
    table = build_gene_features(orgdb, dim=3)
    assert table.aliases == {"ER": "ESR1", "NR3A1": "ESR1", "PR": "PGR", "P53": "TP53"}
    # SHARED names two genes: never resolved by guessing; MDM2 is another gene's official symbol: the official wins
    rows, found = table.rows(["er", " Pr ", "SHARED", "mdm2", "nothing"])
    assert found.tolist() == [True, True, False, True, False]
    np.testing.assert_array_equal(rows[0], table.rows(["ESR1"])[0][0])
    np.testing.assert_array_equal(rows[3], table.rows(["MDM2"])[0][0])
    assert not rows[2].any() and not rows[4].any()


def test_file_round_trip_and_errors(orgdb, tmp_path):
    table = build_gene_features(orgdb, dim=3)
    path = table.save(tmp_path / "f" / "features.safetensors")
    assert oct(path.stat().st_mode & 0o044) == oct(0o044)  # readable by others like any output (umask 022)
    again = GeneFeatures.load(path)
    assert again.symbols == table.symbols and again.aliases == table.aliases and again.source == table.source
    np.testing.assert_allclose(again.matrix, table.matrix, atol=1e-3)  # float16 on disk
    assert again.sha256 == table.sha256
    # the same bytes from another process (another hash seed): a saved processor's fingerprint must not change
    code = (
        "import sys; from bioperceiver.modalities.omics.gene_features import GeneFeatures; "
        "GeneFeatures.load(sys.argv[1]).save(sys.argv[2])"
    )
    for seed in ("1", "2"):
        other = tmp_path / f"again{seed}.safetensors"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", code, str(path), str(other)], check=True, env=env)
        assert other.read_bytes() == path.read_bytes()
    # a file of the first layout (one metadata entry per field) still loads
    from safetensors.torch import save_file as save_torch

    legacy = {k: json.dumps(getattr(table, k)) for k in ("symbols", "aliases", "source")}
    old = tmp_path / "first_layout.safetensors"
    save_torch(
        {"features": torch.from_numpy(table.matrix.astype(np.float16))},
        str(old),
        metadata={"format": FILE_FORMAT, **legacy},
    )
    assert GeneFeatures.load(old).sha256 == table.sha256
    with pytest.raises(FileNotFoundError, match=r"build_gene_features\.py"):
        GeneFeatures.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"features": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"), metadata={"format": "x"})
    with pytest.raises(ValueError, match="not a gene feature file"):
        GeneFeatures.load(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="too few"):
        build_gene_features(orgdb, dim=20)


def test_shipped_table_is_the_documented_build():
    table = GeneFeatures.load(SHIPPED)
    assert table.dim == 64 and len(table) > 20000
    assert table.source["database"].startswith("org.Hs.eg.db 3.16.0") and table.source["tables"] == (
        "go_bp,go_mf,go_cc,kegg"
    )
    assert _cos(table, "ESR1", "PGR") > _cos(table, "ESR1", "APOA1")


# ---- the processor --------------------------------------------------------------------------------------------


@pytest.fixture
def features(tmp_path) -> Path:
    """A feature table for the genes G0..G9 (G7..G9 unknown to it), named so that G2 also answers to GX2."""
    rng = np.random.default_rng(0)
    names = [f"G{i}" for i in range(7)] + ["G20", "G21"]
    matrix = rng.normal(size=(len(names), 4))
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    return GeneFeatures(names, matrix, {"GX2": "G2"}, {"database": "test"}).save(tmp_path / "features.safetensors")


def _cohort(tmp_path: Path, name: str, genes: list[str], n: int, seed: int) -> list[str]:
    return expression_matrix(tmp_path / f"{name}.parquet", genes, n, 0.0, seed, name)


def _expected(proc: OmicsProcessor, table: GeneFeatures, ids) -> np.ndarray:
    names = [proc.state["genes"][i] for i in ids]
    return table.rows(names)[0] * np.array([not n.startswith("<PC") for n in names])[:, None]


def test_tokens_carry_their_gene_s_features_and_the_processor_saves_the_table(tmp_path, features):
    cells = _cohort(tmp_path, "a", [f"G{i}" for i in range(10)], 20, 0)
    proc = OmicsProcessor(
        "omics", normalization="none", zscore="per_source", top_k=6, pcs=2, gene_features_file=str(features)
    ).fit(cells[:15], base_dir=tmp_path)
    plain = OmicsProcessor("omics", normalization="none", zscore="per_source", top_k=6, pcs=2).fit(
        cells[:15], base_dir=tmp_path
    )
    table = GeneFeatures.load(features)
    assert proc.gene_feature_coverage() == {"genes": 10, "with_features": 7, "dim": 4}
    assert proc.model_settings() == {"kind": "omics", "num_genes": 12, "gene_feature_dim": 4}
    assert proc.card_notes()["gene features"].startswith("4-d for 7 of 10 genes") and plain.card_notes() == {}
    for cell in cells[15:]:
        out, ref = proc(cell, base_dir=tmp_path), plain(cell, base_dir=tmp_path)
        # the same tokens as without features; each token's features are its gene's (zeros: unknown genes, <PCj>)
        np.testing.assert_array_equal(out["gene_ids"], ref["gene_ids"])
        np.testing.assert_array_equal(out["values"], ref["values"])
        assert out["gene_features"].shape == (len(out["gene_ids"]), 4) and out["gene_features"].dtype == np.float32
        np.testing.assert_array_equal(out["gene_features"], _expected(proc, table, out["gene_ids"]))
    # saved with the processor: the original file is not needed to load it
    proc.save_pretrained(tmp_path / "saved")
    os.remove(features)
    again = OmicsProcessor.from_pretrained(tmp_path / "saved")
    for cell in cells[15:]:
        np.testing.assert_array_equal(
            again(cell, base_dir=tmp_path)["gene_features"], proc(cell, base_dir=tmp_path)["gene_features"]
        )


def test_attach_to_a_fitted_processor_keeps_its_tokens(tmp_path, features):
    cells = _cohort(tmp_path, "a", [f"G{i}" for i in range(10)], 12, 0)
    proc = OmicsProcessor("omics", normalization="none", zscore=True).fit(cells, base_dir=tmp_path)
    before = proc(cells[0], base_dir=tmp_path)
    assert "gene_features" not in before and "gene_feature_dim" not in proc.model_settings()
    assert proc.attach_gene_features(features) == {"genes": 10, "with_features": 7, "dim": 4}
    after = proc(cells[0], base_dir=tmp_path)
    np.testing.assert_array_equal(after["gene_ids"], before["gene_ids"])
    np.testing.assert_array_equal(after["values"], before["values"])
    np.testing.assert_array_equal(
        after["gene_features"], _expected(proc, GeneFeatures.load(features), after["gene_ids"])
    )
    with pytest.raises(RuntimeError, match="not fitted"):
        OmicsProcessor("omics").attach_gene_features(features)


def test_extension_gives_added_genes_their_features(tmp_path, features):
    dev = _cohort(tmp_path, "a", [f"G{i}" for i in range(5)], 12, 0)
    new = _cohort(tmp_path, "b", ["G3", "G4", "GX2", "G20", "G30"], 12, 1)  # GX2: G2's alias, a new token name
    proc = OmicsProcessor("omics", normalization="none", zscore="per_source", gene_features_file=str(features))
    proc.fit(dev, base_dir=tmp_path)
    old = proc(dev[0], base_dir=tmp_path)["gene_features"]
    report = proc.extend(new, base_dir=tmp_path)
    assert report["added"] == 3 and report["overlap"] == 2 and report["added_with_features"] == 2  # G20, GX2
    np.testing.assert_array_equal(proc(dev[0], base_dir=tmp_path)["gene_features"], old)
    out = proc(new[0], base_dir=tmp_path)
    table = GeneFeatures.load(features)
    np.testing.assert_array_equal(out["gene_features"], _expected(proc, table, out["gene_ids"]))
    gx2 = proc.state["genes"].index("GX2")
    np.testing.assert_array_equal(out["gene_features"][list(out["gene_ids"]).index(gx2)], table.rows(["G2"])[0][0])


# ---- collate and embedder ---------------------------------------------------------------------------------------


def test_collate_pads_per_token_vectors_and_names_a_sample_that_disagrees():
    spec = get_modality("omics")
    a = {"gene_ids": np.array([1, 2]), "values": np.ones(2, np.float32), "gene_features": np.ones((2, 3), np.float32)}
    b = {"gene_ids": np.array([3]), "values": np.ones(1, np.float32), "gene_features": np.full((1, 3), 2.0, np.float32)}
    batch = spec.collate("omics", [a, None, b], ["s0", "s1", "s2"], lambda n: n + 1)
    assert batch["gene_features"].shape == (3, 3, 3) and batch["mask"].shape == (3, 3)
    assert torch.equal(batch["gene_features"][0, :2], torch.ones(2, 3))
    assert torch.equal(batch["gene_features"][2, 0], torch.full((3,), 2.0))
    assert not batch["gene_features"][1].any() and not batch["gene_features"][0, 2].any()
    # without features in any sample the key is left out, as before
    plain = spec.collate("omics", [{k: v for k, v in a.items() if k != "gene_features"}], ["s0"], lambda n: n)
    assert set(plain) == {"gene_ids", "values", "mask"}
    bad = {**b, "gene_features": np.ones((1, 5), np.float32)}
    with pytest.raises(DataError, match="per-token shape") as err:
        spec.collate("omics", [a, bad], ["s0", "s1"], lambda n: n)
    assert err.value.sample_id == "s1" and err.value.modality == "omics"


def test_embedder_adds_the_shared_map_of_each_token_s_features():
    torch.manual_seed(0)
    emb = OmicsEmbedder("omics", OmicsConfig(num_genes=6, gene_feature_dim=4), 8)
    ids = torch.tensor([[1, 4, 0], [2, 0, 0]])
    values = torch.tensor([[0.5, -1.0, 0.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    feats = torch.randn(2, 3, 4)
    tokens, keep = emb.embed({"gene_ids": ids, "values": values, "mask": mask, "gene_features": feats})
    ref = emb.gene_embeddings(ids) + feats @ emb.gene_feature_proj.weight.T + emb.value_encoder(values)
    torch.testing.assert_close(tokens[mask], ref[mask])
    assert torch.equal(keep, mask)
    # padding: whatever a padded position holds does not reach a real token
    feats2 = feats.clone()
    feats2[~mask] = 1e3
    again, _ = emb.embed({"gene_ids": ids, "values": values, "mask": mask, "gene_features": feats2})
    torch.testing.assert_close(again[mask], tokens[mask])
    # the reconstruction queries see the same gene identity
    queries, _, _ = emb.value_queries({"gene_ids": ids, "values": values, "mask": mask, "gene_features": feats})
    torch.testing.assert_close(queries[mask], (ref - emb.value_encoder(values))[mask])
    with pytest.raises(ValueError, match="4-d gene features per token"):
        emb.embed({"gene_ids": ids, "values": values})
    plain = OmicsEmbedder("omics", OmicsConfig(num_genes=6), 8)
    with pytest.raises(ValueError, match="built without them"):
        plain.embed({"gene_ids": ids, "values": values, "gene_features": feats})
    with pytest.raises(ValueError, match="gene_feature_dim"):
        OmicsConfig(gene_feature_dim=-1)


# ---- the paths a user takes -------------------------------------------------------------------------------------


def _manifest(tmp_path: Path, name: str, genes: list[str], n: int, seed: int) -> Path:
    return cohort_manifest(tmp_path, name, genes, 0.0, seed, n)


@pytest.fixture
def pretrained(tmp_path, features) -> Path:
    return pretrained_backbone(tmp_path, gene_features_file=str(features))


def test_a_saved_model_with_gene_features_loads_and_embeds_alike(tmp_path, pretrained):
    from transformers import AutoModel

    from bioperceiver.data import BioPerceiverCollator

    proc = BioPerceiverProcessor.from_pretrained(pretrained)
    manifest = read_manifest(tmp_path / "dev_manifest.parquet")
    samples = [proc(r, base_dir=manifest.base_dir) for r in manifest.records()[:6]]
    samples[1]["omics_expression"] = None  # a missing modality
    collator = BioPerceiverCollator(proc.modalities)
    batch = collator(samples, train=False)
    assert batch["inputs"]["omics_expression"]["gene_features"].shape[-1] == 4
    model = AutoModel.from_pretrained(pretrained).eval()
    assert model.config.modalities["omics_expression"]["gene_feature_dim"] == 4
    with torch.no_grad():
        together = model(inputs=batch["inputs"]).pooler_output
        again = bp.BioPerceiverModel.from_pretrained(pretrained).eval()(inputs=batch["inputs"]).pooler_output
        torch.testing.assert_close(again, together)
        for i, s in enumerate(samples):  # each sample alone (no padding) gives the same embedding
            alone = model(inputs=collator([s], train=False)["inputs"]).pooler_output
            torch.testing.assert_close(alone[0], together[i], rtol=1e-4, atol=1e-5)
    assert torch.isfinite(together).all()


def test_finetune_with_new_genes_gives_them_features(tmp_path, pretrained):
    manifest = _manifest(tmp_path, "new", ["G4", "G5", "G6", "G7", "G20", "G30"], 48, 1)
    argv = [
        *("--manifest", str(manifest), "--output_dir", str(tmp_path / "ft"), "--model_name_or_path", str(pretrained)),
        *("--task", "classification", "--label_column", "label_y", "--do_train", "true"),
        *("--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--eval_strategy", "no"),
        *("--save_strategy", "no", "--n_bootstrap", "10", "--ablations", "false", "--uncertainty", "false"),
        *("--interpret", "false", "--use_cpu", "true", "--report_to", "none", "--seed", "0"),
    ]
    results = load_script("finetune/run_finetune.py").main(argv)
    ext = results["vocabulary_extension"]["omics_expression"]
    assert ext["added"] == 2 and ext["overlap"] == 4 and ext["added_with_features"] == 1  # G20 known, G30 not
    proc = BioPerceiverProcessor.from_pretrained(tmp_path / "ft").processors["omics_expression"]
    assert proc.gene_feature_coverage() == {"genes": 10, "with_features": 8, "dim": 4}
    card = (tmp_path / "ft" / "README.md").read_text()
    assert "1 of the added genes have gene features" in card
    # the finetuned folder redistributes the feature table: its card names the table's source and licence too
    assert "gene features (omics_expression)" in card and "licence:" in card
    model = bp.AutoModelForSequenceClassification.from_pretrained(tmp_path / "ft")
    assert model.bioperceiver.embedders["omics_expression"].gene_feature_proj.weight.shape == (32, 4)


def test_cli_attaches_features_to_a_fitted_folder_without_touching_it(tmp_path, features):
    manifest = read_manifest(_manifest(tmp_path, "dev", [f"G{i}" for i in range(8)], 24, 0))
    proc = BioPerceiverProcessor(
        {"omics_expression": OmicsProcessor(normalization="none", zscore=True), "tabular_clinical": TabularProcessor()}
    ).fit(manifest)
    proc.save_pretrained(tmp_path / "fitted")
    before = sorted(p.name for p in (tmp_path / "fitted").rglob("*"))
    script = load_script("tokenizers/build_gene_features.py")
    out = tmp_path / "with_features"
    argv = ["--features", str(features), "--attach_to", str(tmp_path / "fitted"), "--output_dir", str(out)]
    assert script.main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "fitted").rglob("*")) == before
    again = BioPerceiverProcessor.from_pretrained(out)
    assert again.processors["omics_expression"].gene_feature_coverage()["with_features"] == 7
    assert json.loads((out / "gene_features_attached.json").read_text())["coverage"]["omics_expression"]["dim"] == 4
    with pytest.raises(ValueError, match="fitted folder itself"):
        script.attach(features, out, out, None)
    with pytest.raises(ValueError, match="no omics modality"):
        script.attach(features, tmp_path / "fitted", tmp_path / "x", ["tabular_clinical"])
    # re-running into the copy it wrote replaces it; a folder it did not write, or one holding the fitted folder,
    # is refused and left as it was (it used to be deleted: a run folder with its model, for one)
    assert script.main(argv) == 0
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "model.safetensors").write_bytes(b"weights")
    (run / "results.json").write_text("{}")
    for output in (run, run / "final"):
        with pytest.raises(ValueError, match="is not a copy this command wrote"):
            script.attach(features, tmp_path / "fitted", output, None)
    with pytest.raises(ValueError, match="holds --attach_to"):
        script.attach(features, tmp_path / "fitted", tmp_path, None)
    assert (run / "final" / "model.safetensors").read_bytes() == b"weights" and (run / "results.json").exists()


def test_a_table_built_elsewhere_is_matched_case_blind_and_checked(tmp_path):
    """Names and aliases match in any case; a duplicate gene, NaN, inf or a value float16 cannot hold is refused
    when the table is made (not per sample at batching); a truncated or foreign file names itself and the fix."""
    table = GeneFeatures(["Actb", "C1orf43", "TP53"], np.eye(3), {"p53alias": "tp53"})
    assert [table.row_of(n) for n in ("ACTB", "actb", "c1orf43", "P53ALIAS", "tp53")] == [0, 0, 1, 2, 2]
    with pytest.raises(ValueError, match="more than once"):
        GeneFeatures(["ACTB", "actb"], np.eye(2))
    for bad in (np.nan, np.inf, 1e5):
        with pytest.raises(ValueError, match="NaN, inf or values beyond float16"):
            GeneFeatures(["A", "B"], np.array([[bad, 0.0], [0.0, 1.0]]))
    path = table.save(tmp_path / "t.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:40])
    (tmp_path / "csv.safetensors").write_text("gene,f1\nACTB,0.1\n")
    for name in ("cut.safetensors", "csv.safetensors"):
        with pytest.raises(ValueError, match=rf"{name}.*build_gene_features\.py"):
            GeneFeatures.load(tmp_path / name)


def test_features_that_know_no_vocabulary_gene_are_refused_and_replace_needs_features(tmp_path, features):
    cells = _cohort(tmp_path, "ens", [f"ENSG{i:011d}" for i in range(10)], 12, 0)
    with pytest.raises(DataError, match="knows none of the 10 vocabulary genes"):
        OmicsProcessor("omics", normalization="none", zscore=True, gene_features_file=str(features)).fit(
            cells, base_dir=tmp_path
        )
    proc = OmicsProcessor("omics", normalization="none", zscore=True).fit(cells, base_dir=tmp_path)
    with pytest.raises(DataError, match="gene_features_file unset"):
        proc.attach_gene_features(features)
    with pytest.raises(ValueError, match="needs gene features"):
        OmicsConfig(gene_feature_mode="replace")


def test_settings_checks_accept_the_same_feature_file_named_differently(tmp_path, features):
    from bioperceiver.data.processing import same_setting

    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(features.read_bytes())
    relative = os.path.relpath(features)
    assert same_setting("gene_features_file", str(features), relative)
    assert same_setting("gene_features_file", str(features), str(copy))  # the same bytes
    other = GeneFeatures(["A", "B"], np.eye(2), {}, {}).save(tmp_path / "other.safetensors")
    assert not same_setting("gene_features_file", str(features), str(other))
    assert same_setting("top_k", 1, 1) and not same_setting("top_k", "a", "./a")  # paths only for file settings
    assert not same_setting("gene_features_file", str(features), str(tmp_path / "missing"))


def test_replace_mode_reads_features_alone_where_a_gene_has_them():
    """``gene_feature_mode: replace``: an annotated gene's identity is ``W @ features`` only (its row gets no
    gradient); a gene without features (all zeros) keeps its row."""
    torch.manual_seed(0)
    emb = OmicsEmbedder("omics", OmicsConfig(num_genes=6, gene_feature_dim=4, gene_feature_mode="replace"), 8)
    ids = torch.tensor([[1, 4, 5]])
    values = torch.tensor([[0.5, -1.0, 0.3]])
    feats = torch.randn(1, 3, 4)
    feats[0, 2] = 0.0  # gene 5: no annotation
    tokens, _ = emb.embed({"gene_ids": ids, "values": values, "gene_features": feats})
    identity = feats @ emb.gene_feature_proj.weight.T
    identity[0, 2] = emb.gene_embeddings.weight[5]
    torch.testing.assert_close(tokens, identity + emb.value_encoder(values))
    (tokens**2).sum().backward()
    grad = emb.gene_embeddings.weight.grad
    assert not grad[[1, 4]].any() and grad[5].abs().sum() > 0
    assert emb.gene_feature_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="gene_feature_mode"):
        OmicsConfig(gene_feature_dim=4, gene_feature_mode="concat")


def test_coverage_reports_the_length_of_each_part_of_a_gene_s_identity(tmp_path, pretrained):
    """``benchmarks/gene_embedding_coverage.py``'s identity lengths: the rows' (trained and untrained apart) and the
    shared map's ``W @ features`` over the genes with features, against a computation by hand."""
    import shutil

    from safetensors.numpy import load_file

    cov = load_script("benchmarks/gene_embedding_coverage.py")
    run = tmp_path / "run"
    shutil.copytree(pretrained, run / "final")
    proc = BioPerceiverProcessor.from_pretrained(run / "final")
    weights = load_file(str(run / "final" / "model.safetensors"))
    rows = weights["embedders.omics_expression.gene_embeddings.weight"]
    proj = weights["embedders.omics_expression.gene_feature_proj.weight"]
    trained = np.array([True, False] * 4)
    got = cov.identity_lengths(run, "omics_expression", proc, trained)
    norms = np.linalg.norm(rows, axis=1)
    feats = proc.processors["omics_expression"]._gene_features
    has = np.abs(feats).sum(1) > 0
    assert got["row_trained"] == pytest.approx(norms[trained].mean())
    assert got["row_untrained"] == pytest.approx(norms[~trained].mean())
    assert got["features_map"] == pytest.approx(np.linalg.norm(feats[has] @ proj.T, axis=1).mean(), rel=1e-5)
    assert got["genes_with_features"] == 7 and got["mode"] == "add"
    assert cov.run_names(["a/seed1/fold0", "a/seed2/fold0"]) == {
        "seed1/fold0": "a/seed1/fold0",
        "seed2/fold0": "a/seed2/fold0",
    }
    assert cov.run_names(["a/fold0", "a/fold1"]) == {"fold0": "a/fold0", "fold1": "a/fold1"}
