"""The TCGA recipe on GDC-layout fixture folders (tests/recipe_fixtures.py): sample sheet, clinical.tsv with '--,
STAR-Counts files with the gene-model comment and N_* rows, DX and tissue slides, report text."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from recipe_fixtures import GENES, TcgaCase, write_tcga

from bioperceiver.data import OmicsProcessor, read_manifest
from bioperceiver.data.errors import DataError, Problem
from bioperceiver.data.recipes import tcga
from bioperceiver.data.recipes.common import RecipeInputError, RecipeSchemaError
from bioperceiver.data.validate import main as validate_main
from bioperceiver.modalities import available_modalities, register_modality, unregister_modality
from bioperceiver.modalities.signal.embedder import SignalEmbedder
from bioperceiver.modalities.signal.processor import SignalProcessor
from bioperceiver.modalities.signal.spec import SignalSpec


@pytest.fixture(scope="module")
def gdc(tmp_path_factory):
    return write_tcga(tmp_path_factory.mktemp("gdc"))


@pytest.fixture(scope="module")
def built(gdc, tmp_path_factory):
    out = tmp_path_factory.mktemp("tcga_out")
    argv = ["--tcga_dir", str(gdc.root), "--output_dir", str(out), "--sample_types", "01", "11"]
    assert tcga.main(argv) == 0
    return out


def _meta(out: Path) -> dict:
    return json.loads((out / "manifest.parquet.meta.json").read_text())


def _expected_by_name(values: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for gene_id, name, _ in GENES:
        out[name] = out.get(name, 0.0) + values[gene_id]
    return out


def test_one_row_per_sample_with_expression_clinical_survival_and_labels(built, gdc):
    table = pd.read_parquet(built / "manifest.parquet").set_index("sample_id")
    assert sorted(table.index) == [
        "TCGA-05-4244-01", "TCGA-05-4249-01", "TCGA-06-0125-01", "TCGA-06-0130-01", "TCGA-A1-A0SB-01",
        "TCGA-A1-A0SB-11", "TCGA-A2-A04P-01",
    ]  # fmt: skip
    row = table.loc["TCGA-A1-A0SB-11"]
    assert row["patient_id"] == "TCGA-A1-A0SB" and row["label_sample_type"] == "Solid Tissue Normal"
    assert row["label_project"] == row["meta_site"] == "TCGA-BRCA" and row["meta_tissue_source_site"] == "A1"
    # survival: Dead -> days_to_death, event 1; Alive -> days_to_last_follow_up, event 0; '-- -> unknown
    assert (row["label_survival_time"], row["label_survival_event"]) == (259.0, 0)
    dead = table.loc["TCGA-A2-A04P-01"]
    assert (dead["label_survival_time"], dead["label_survival_event"]) == (548.0, 1)
    unknown = table.loc["TCGA-06-0130-01"]
    assert np.isnan(unknown["label_survival_time"]) and pd.isna(unknown["label_survival_event"])
    fields = json.loads(unknown["tabular_clinical"])
    assert fields["age_at_index"] is None and fields["gender"] == "female"  # '-- -> null, not the string
    assert fields["ajcc_pathologic_stage"] is None
    assert table.loc["TCGA-A2-A04P-01", "text_report"] == gdc.reports["TCGA-A2-A04P"]
    assert "négatives" in table.loc["TCGA-A2-A04P-01", "text_report"]
    assert table.loc["TCGA-05-4244-01", "text_report"] is None  # no report for that case
    assert table.loc["TCGA-06-0125-01", "omics_expression"] is None  # slide only
    # expression: the project's matrix, N_* rows dropped, CD99 (two gene ids) summed
    cell = table.loc["TCGA-A1-A0SB-01", "omics_expression"]
    assert cell == "omics/TCGA-BRCA.parquet#row=TCGA-A1-A0SB-01"
    matrix = pd.read_parquet(built / "omics" / "TCGA-BRCA.parquet")
    assert not any(c.startswith("N_") for c in matrix.columns) and matrix.dtypes.eq(np.float32).all()
    expected = _expected_by_name(gdc.expression["TCGA-A1-A0SB-01A"])
    assert matrix.loc["TCGA-A1-A0SB-01"].to_dict() == pytest.approx(expected)
    manifest = read_manifest(built / "manifest.parquet")
    proc = OmicsProcessor("omics_expression", normalization="none").fit(
        manifest.table["omics_expression"].dropna().tolist(), base_dir=manifest.base_dir
    )
    out = proc(cell, base_dir=manifest.base_dir)
    assert len(out["gene_ids"]) == len(expected)  # the omics kind reads the #row= cells
    meta = _meta(built)
    assert meta["labels"]["label_survival_time"] == "survival" and meta["provenance"]["gene_models"] == [
        "gene-model: GENCODE v36"
    ]
    assert meta["counts"]["read"]["clinical.tsv (cases)"] == 6  # two rows per case in the file, one per case kept
    assert validate_main([str(built / "manifest.parquet")]) == 0


def test_slides_dx_vs_tissue_and_the_slide_column_without_a_wsi_kind(built, gdc):
    if "wsi" in available_modalities():
        pytest.skip("a wsi kind is registered: test_slide_column_with_a_wsi_kind covers the modality column")
    table = pd.read_parquet(built / "manifest.parquet").set_index("sample_id")
    assert "wsi_diagnostic" not in table  # no kind covers it yet: kept as metadata, never silently
    dx = table.loc["TCGA-A2-A04P-01", "meta_wsi_diagnostic"]
    assert Path(dx).name.startswith("TCGA-A2-A04P-01Z-00-DX1.") and Path(dx).is_file()
    tissue = json.loads(table.loc["TCGA-A2-A04P-01", "meta_tissue_slides"])
    assert [Path(p).name.split(".")[0] for p in tissue] == ["TCGA-A2-A04P-01A-01-TS1"]
    assert table.loc["TCGA-06-0130-01", "meta_wsi_diagnostic"] is None  # a BS (frozen) slide only
    assert _meta(built)["counts"]["notes"]["slide_column_stored_as_meta"] == 1


@pytest.fixture
def wsi_kind():
    """The ``wsi`` kind when it is registered; else a stand-in that checks a cell is an existing TIFF file."""
    if "wsi" in available_modalities():
        yield None
        return

    class StandInWsiSpec(SignalSpec):
        kind = "wsi"
        processor_class = type("StandInWsiProcessor", (SignalProcessor,), {})
        embedder_class = type("StandInWsiEmbedder", (SignalEmbedder,), {})

        def check_file(self, path):
            if path.read_bytes()[:4] not in (b"II*\x00", b"MM\x00*"):
                return [Problem("not_a_slide", f"{path.name} is not a TIFF", "")]
            return []

    register_modality(StandInWsiSpec())
    yield "stand-in"
    unregister_modality("wsi")


def test_slide_column_with_a_wsi_kind_and_none(gdc, tmp_path, wsi_kind):
    path = tcga.build_tcga(gdc.root, tmp_path / "wsi")
    manifest = read_manifest(path)
    assert manifest.modalities["wsi_diagnostic"] == "wsi"
    assert _meta(tmp_path / "wsi")["modalities"]["wsi_diagnostic"] == "wsi"
    slides = manifest.table.set_index("sample_id")["wsi_diagnostic"]
    assert Path(slides["TCGA-A1-A0SB-01"]).name.startswith("TCGA-A1-A0SB-01Z-00-DX1.")
    assert slides.notna().sum() == 4 and slides.isna()["TCGA-06-0130-01"]  # the four cases with a DX slide
    path = tcga.build_tcga(gdc.root, tmp_path / "none", slide_column=None)
    table = pd.read_parquet(path)
    assert not [c for c in table if "wsi" in c]
    assert _meta(tmp_path / "none")["counts"]["excluded"]["slides_not_requested"]["count"] == 6
    # TCGA-06-0125 had a DX slide and no expression: with slides left out it has no sample row, and is counted
    assert "TCGA-06-0125-01" not in set(table["sample_id"])
    assert _meta(tmp_path / "none")["counts"]["excluded"]["case_without_selected_sample"]["count"] == 1


def test_default_tumour_only_gdc2_dotted_clinical_gz_and_site_splits(tmp_path):
    src = write_tcga(tmp_path / "in", gz_clinical=True)
    clinical = src.root / "clinical.tsv.gz"
    with gzip.open(clinical, "rt", encoding="utf-8") as f:
        text = f.read()
    header, rest = text.split("\n", 1)
    dotted = {v: k for k, v in tcga.CLINICAL_ALIASES.items()}
    header = "\t".join(dotted.get(c, c) for c in header.split("\t"))
    with gzip.open(clinical, "wt", encoding="utf-8") as f:
        f.write(header + "\n" + rest)
    assert "demographic.vital_status" in header
    path = tcga.build_tcga(src.root, tmp_path / "out", split_by="tissue_source_site", slide_column=None)
    table = pd.read_parquet(path).set_index("sample_id")
    assert "TCGA-A1-A0SB-11" not in table.index and (table["label_sample_type"] == "Primary Solid Tumor").all()
    assert _meta(tmp_path / "out")["counts"]["excluded"]["sample_type_not_selected:11"]["count"] == 1
    assert table.loc["TCGA-A2-A04P-01", "label_survival_event"] == 1  # read through the dotted names
    assert table.groupby("meta_tissue_source_site")["split"].nunique().max() == 1  # whole sites per split


def test_missing_inputs_name_the_file_and_the_gdc_portal(gdc, tmp_path, caplog):
    src = write_tcga(tmp_path / "in", reports_csv=False)
    (src.root / "clinical.tsv").unlink()
    with pytest.raises(RecipeInputError, match=r"clinical\.tsv and clinical\.tsv\.gz in .*GDC Data Portal"):
        tcga.build_tcga(src.root, tmp_path / "out")
    with caplog.at_level(logging.ERROR):
        assert tcga.main(["--tcga_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "o")]) == 1
    assert "gdc_sample_sheet" in caplog.text and "does not exist" in caplog.text


def test_expression_file_listed_but_not_downloaded(tmp_path):
    src = write_tcga(tmp_path / "in")
    src.files["TCGA-05-4249-01A"].unlink()
    with pytest.raises(DataError, match=r"sample 'TCGA-05-4249-01'.*not in .*gdc-client"):
        tcga.build_tcga(src.root, tmp_path / "raise")
    path = tcga.build_tcga(src.root, tmp_path / "skip", on_error="skip_sample")
    assert "TCGA-05-4249-01" not in set(pd.read_parquet(path)["sample_id"])
    skipped = _meta(tmp_path / "skip")["counts"]["skipped"]["by_reason"]
    assert [(r["modality"], r["reason"], r["count"]) for r in skipped] == [("omics_expression", "missing_file", 1)]


def test_renamed_clinical_column_names_it_and_the_version(tmp_path):
    src = write_tcga(tmp_path / "in")
    clinical = src.root / "clinical.tsv"
    clinical.write_text(clinical.read_text().replace("vital_status", "vitalstatus", 1))
    with pytest.raises(RecipeSchemaError, match=r"'vital_status' \(renamed to 'vitalstatus'\?\).*GDC"):
        tcga.build_tcga(src.root, tmp_path / "out")


def test_corrupt_star_counts_file_is_a_named_skip(tmp_path):
    cases = [
        TcgaCase("TCGA-A1-A0SB", "TCGA-BRCA", "Alive", days_to_last_follow_up="259", slides=()),
        TcgaCase("TCGA-A2-A04P", "TCGA-BRCA", "Dead", days_to_death="548", slides=()),
    ]
    src = write_tcga(tmp_path / "in", cases)
    bad = src.files["TCGA-A2-A04P-01A"]
    bad.write_text(bad.read_text().replace("tpm_unstranded", "tpm"))  # a different file format
    with pytest.raises(DataError, match=r"sample 'TCGA-A2-A04P-01'.*missing column\(s\) \['tpm_unstranded'\]"):
        tcga.build_tcga(src.root, tmp_path / "raise")
    path = tcga.build_tcga(src.root, tmp_path / "keep", on_error="skip_modality")
    table = pd.read_parquet(path).set_index("sample_id")
    assert table.loc["TCGA-A2-A04P-01", "omics_expression"] is None and table.loc["TCGA-A2-A04P-01", "text_report"]
    assert _meta(tmp_path / "keep")["counts"]["skipped"]["modalities_by_reason"][0]["reason"] == "bad_expression_file"
    path = tcga.build_tcga(src.root, tmp_path / "ids", gene_key="gene_id", on_error="skip_sample")
    matrix = pd.read_parquet(tmp_path / "ids" / "omics" / "TCGA-BRCA.parquet")
    assert list(matrix.columns) == [g[0] for g in GENES] and len(matrix) == 1  # bad sample dropped (skip_sample)


def test_barcodes():
    assert tcga.parse_barcode("TCGA-A1-A0SB-01A-11R-A144-07") == ("TCGA-A1-A0SB", "TCGA-A1-A0SB-01", "01")
    assert tcga.parse_barcode("TCGA-A1-A0SB-11") == ("TCGA-A1-A0SB", "TCGA-A1-A0SB-11", "11")
    with pytest.raises(ValueError, match="not a TCGA sample barcode"):
        tcga.parse_barcode("TARGET-20-PABHET-03A")
