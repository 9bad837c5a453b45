"""The multi-cohort SurvSet recipe on the real packaged data (small cohorts only: nki70, Bergamaschi, vdv, GSE7390)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("SurvSet")
pytest.importorskip("sksurv")

from bioperceiver.data.manifest import metadata_path, parse_reference, read_manifest
from bioperceiver.data.recipes import survset
from bioperceiver.data.recipes.common import RecipeError

SMALL = ("nki70", "Bergamaschi", "GSE7390", "vdv")


def _survset_frame(name: str) -> pd.DataFrame:
    from SurvSet.data import SurvLoader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return SurvLoader().load_dataset(name)["df"].reset_index(drop=True)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("survset")
    path = survset.build_survset_cohort(out, SMALL)
    return path, pd.read_parquet(path), json.loads(metadata_path(path).read_text())


def test_symbol_normalisation():
    assert survset.normalise_symbol("num_HS_HLA_A") == "HLA-A"
    assert survset.normalise_symbol(" hla-a ") == "HLA-A"
    assert survset.normalise_symbol("num_HS_C10orf10") == "C10ORF10"
    assert survset.normalise_symbol("num_NM_004702") == "NM_004702"  # accession: '_' is part of the name
    assert survset.normalise_symbol("Contig63649_RC") == "CONTIG63649_RC"


def test_feature_tokens_by_scope():
    spec = survset.COHORTS
    mapping, merged = survset.feature_tokens(
        ["num_DIAPH3", "num_DIAPH3_1", "num_KRTAP5_8", "num_TSPYL5"], spec["nki70"]
    )
    assert mapping == {
        "num_DIAPH3": "DIAPH3",
        "num_DIAPH3_1": "DIAPH3",
        "num_KRTAP5_8": "KRTAP5-8",
        "num_TSPYL5": "TSPYL5",
    }
    assert merged == {"DIAPH3": ["num_DIAPH3", "num_DIAPH3_1"]}
    mapping, merged = survset.feature_tokens(["num_gene_1", "num_gene_2"], spec["NSBCD"])
    assert mapping == {"num_gene_1": "NSBCD:gene_1", "num_gene_2": "NSBCD:gene_2"} and not merged
    mapping, _ = survset.feature_tokens(["num_X200726_at"], spec["GSE7390"])
    assert mapping == {"num_X200726_at": "affy:200726_at"}


def test_rows_ids_roles_and_labels(cohort):
    path, table, meta = cohort
    assert table["sample_id"].is_unique and (table["sample_id"] == table["patient_id"]).all()
    counts = table["meta_source"].value_counts().to_dict()
    assert counts == {"sksurv_GSE7390": 198, "survset_nki70": 144, "survset_Bergamaschi": 82, "survset_vdv": 78}
    assert table["patient_id"].str.split(":").str[0].eq(table["meta_source"]).all()  # namespaced by cohort
    roles = table.groupby("meta_source")["meta_cohort_role"].unique().map(list).to_dict()
    assert roles["survset_vdv"] == ["external"] and roles["survset_nki70"] == ["development"]
    assert len(survset.development_rows(table)) == len(table) - 78
    nki = _survset_frame("nki70")
    rows = table[table["meta_source"] == "survset_nki70"]
    assert (
        np.allclose(rows["label_survival_time"], nki["time"]) and (rows["label_survival_event"] == nki["event"]).all()
    )
    assert meta["external_cohorts"] == ["vdv"] and "Bergamaschi" in meta["development_cohorts"]
    read_manifest(path)  # the loader accepts it (the recipe validated it too)


def test_expression_matrix_values_and_absent_genes(cohort):
    path, table, meta = cohort
    nki = _survset_frame("nki70")
    nki.index = nki["pid"].astype(str)
    cell = table.loc[table["meta_source"] == "survset_nki70", "omics_expression"].iloc[5]
    ref = parse_reference(cell, path.parent)
    matrix = pd.read_parquet(ref.path)
    pid = ref.options["row"]
    row = matrix.loc[pid]
    assert row["TSPYL5"] == pytest.approx(nki.loc[pid, "num_TSPYL5"], rel=1e-6)
    diaph3 = nki.loc[pid, ["num_DIAPH3", "num_DIAPH3_1", "num_DIAPH3_2"]].mean()
    assert row["DIAPH3"] == pytest.approx(diaph3, rel=1e-5)  # replicate probes averaged into one token
    assert "AGE" not in matrix.columns and "age" not in matrix.columns  # clinical, not expression
    assert matrix.shape[1] == 66 == meta["cohorts"]["nki70"]["tokens"]
    # a gene nki70 does not measure is absent from its matrix (no zero column), and shared tokens match vdv
    vdv = pd.read_parquet(path.parent / "omics" / "vdv.parquet")
    assert "AB002301" in vdv.columns and "AB002301" not in matrix.columns
    assert {"AA555029_RC", "CONTIG63649_RC"} <= set(vdv.columns) & set(matrix.columns)
    berg = pd.read_parquet(path.parent / "omics" / "Bergamaschi.parquet")
    assert list(berg.columns[:1]) == ["Bergamaschi:IMAGE:753234"] and berg.shape == (82, 10)
    assert meta["cohorts"]["Bergamaschi"]["token_scope"] == "cohort" and meta["cohorts"]["Bergamaschi"]["token_reason"]
    gse = pd.read_parquet(path.parent / "omics" / "GSE7390.parquet")
    assert gse.shape == (198, 76) and all(c.startswith("affy:") for c in gse.columns)


def test_clinical_columns(cohort):
    _, table, _ = cohort
    nki = [json.loads(c) for c in table.loc[table["meta_source"] == "survset_nki70", "tabular_clinical"]]
    assert set(nki[0]) == {"age", "er", "grade", "diameter", "nodes"}
    assert {c["grade"] for c in nki} == {"1", "2", "3"} and {c["er"] for c in nki} == {"positive", "negative"}
    gse = [json.loads(c) for c in table.loc[table["meta_source"] == "sksurv_GSE7390", "tabular_clinical"]]
    assert set(gse[0]) == {"age", "size", "grade", "er"} and {c["grade"] for c in gse} <= {"1", "2", "3", None}
    assert table.loc[table["meta_source"] == "survset_Bergamaschi", "tabular_clinical"].isna().all()


def test_reuse_rebuild_and_errors(cohort, tmp_path):
    path, _, _ = cohort
    stamp = path.stat().st_mtime_ns
    assert survset.build_survset_cohort(path.parent, SMALL) == path and path.stat().st_mtime_ns == stamp
    with pytest.raises(RecipeError, match="unknown cohort"):
        survset.build_survset_cohort(tmp_path / "x", ["gse9999"])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.parquet").write_bytes(b"")
    with pytest.raises(FileExistsError):
        survset.build_survset_cohort(foreign, ["Bergamaschi"])
    out = tmp_path / "cli"
    assert survset.main(["--output_dir", str(out), "--cohorts", "Bergamaschi", "--log_level", "WARNING"]) == 0
    assert len(pd.read_parquet(out / "manifest.parquet")) == 82
    assert survset.main(["--output_dir", str(out), "--cohorts", "nope", "--log_level", "WARNING"]) == 1


def test_sidecar_processor_settings_fit_per_cohort_statistics(cohort):
    """The sidecar's suggested omics settings are valid processor settings, and z-score every cohort on its own."""
    from bioperceiver.modalities.omics.processor import OmicsProcessor

    path, table, meta = cohort
    proc = OmicsProcessor("omics_expression", **meta["processor_settings"]["omics_expression"])
    dev = table[table["meta_cohort_role"] == "development"]
    proc.fit(dev["omics_expression"].tolist(), sample_ids=dev["sample_id"].tolist(), base_dir=path.parent)
    assert sorted(proc.state["sources"]) == sorted(
        {parse_reference(v, path.parent).path.name for v in dev["omics_expression"]}
    )
    values = proc(dev["omics_expression"].iloc[0], sample_id=dev["sample_id"].iloc[0], base_dir=path.parent)["values"]
    assert np.isfinite(values).all() and len(values) > 0
