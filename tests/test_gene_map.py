"""Accession -> symbol maps: reading an org.eg.db-shaped SQLite file, the TSV round trip, the shipped SurvSet map,
and the SurvSet recipe with a map (vdv's GenBank accessions become symbols shared with gse1992)."""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bioperceiver.modalities.omics.gene_map import (
    accession_key,
    build_accession_map,
    map_digest,
    orgdb_metadata,
    read_gene_map,
    write_gene_map,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "tokenizers" / "gene_maps" / "survset_genbank_to_symbol.tsv"


@pytest.fixture
def orgdb(tmp_path) -> Path:
    """A tiny SQLite file with org.Hs.eg.db's schema for the tables the map reads, rows as in the real 3.16.0
    database: AB002301 -> MAST4 (375449); AF091433, NM_004702.4 and NM_057749 -> CCNE2 (9134); AJ275978 is both
    CTAG1A's (246100) and CTAG1B's (1485)."""
    root = tmp_path / "org.Hs.eg.db"
    (root / "extdata").mkdir(parents=True)
    (root / "DESCRIPTION").write_text("Package: org.Hs.eg.db\nVersion: 3.16.0\n")
    db = root / "extdata" / "org.Hs.eg.sqlite"
    con = sqlite3.connect(db)
    con.executescript(
        """
        CREATE TABLE metadata (name VARCHAR(80) PRIMARY KEY, value VARCHAR(255));
        CREATE TABLE genes (_id INTEGER PRIMARY KEY, gene_id VARCHAR(10) NOT NULL UNIQUE);
        CREATE TABLE gene_info (_id INTEGER NOT NULL UNIQUE, gene_name VARCHAR(255) NOT NULL,
                                symbol VARCHAR(80) NOT NULL);
        CREATE TABLE accessions (_id INTEGER NOT NULL, accession VARCHAR(20) NOT NULL);
        CREATE TABLE refseq (_id INTEGER NOT NULL, accession VARCHAR(20) NOT NULL);
        INSERT INTO metadata VALUES ('EGSOURCEDATE', '2022-Sep12'), ('ORGANISM', 'Homo sapiens');
        INSERT INTO genes VALUES (1, '375449'), (2, '9134'), (3, '246100'), (4, '1485');
        INSERT INTO gene_info VALUES (1, 'microtubule associated serine/threonine kinase family member 4', 'MAST4'),
            (2, 'cyclin E2', 'CCNE2'), (3, 'cancer/testis antigen 1A', 'CTAG1A'),
            (4, 'cancer/testis antigen 1B', 'CTAG1B');
        INSERT INTO accessions VALUES (1, 'AB002301'), (2, 'AF091433'), (3, 'AJ275978'),
            (4, 'AJ275978');
        INSERT INTO refseq VALUES (2, 'NM_004702.4'), (2, 'NM_057749');
        """
    )
    con.commit()
    con.close()
    return db


def test_accession_key_shapes():
    assert accession_key("AB002301") == "AB002301"
    assert accession_key("aa555029_rc") == "AA555029"  # Rosetta's reverse-complement reporter of the same EST
    assert accession_key("NM_004702.4") == "NM_004702"
    assert accession_key(" U12345 ") == "U12345"
    for name in ("Contig63649_RC", "TP53", "HLA-A", "C16orf61", "KIAA0101", "gene_12", "affy:200726_at", "1552325_at"):
        assert accession_key(name) is None, name


def test_build_from_orgdb_unique_ambiguous_and_missing(orgdb):
    ids = ["AB002301", "AF091433_RC", "NM_004702", "AJ275978", "AB999999", "TP53", "AB002301"]
    mapping, counts = build_accession_map(orgdb, ids)
    assert mapping == {"AB002301": ("MAST4", "375449"), "AF091433": ("CCNE2", "9134"), "NM_004702": ("CCNE2", "9134")}
    assert (counts.asked, counts.not_accessions, counts.mapped, counts.ambiguous, counts.not_found) == (6, 1, 3, 1, 1)
    assert counts.ambiguous_examples == ["AJ275978 -> CTAG1A, CTAG1B"]  # never resolved by guessing
    meta = orgdb_metadata(orgdb)
    assert meta["EGSOURCEDATE"] == "2022-Sep12" and meta["package_version"] == "3.16.0"
    with pytest.raises(FileNotFoundError, match=r"r-bioc-org\.hs\.eg\.db"):
        build_accession_map(orgdb.parent / "missing.sqlite", ids)


def test_tsv_round_trip_and_content_digest(orgdb, tmp_path):
    mapping, _ = build_accession_map(orgdb, ["AB002301", "NM_004702"])
    a = write_gene_map(tmp_path / "a.tsv", mapping, {"source": "test", "note": "one"})
    b = write_gene_map(tmp_path / "b.tsv", mapping, {"source": "test", "note": "another comment"})
    ga, gb = read_gene_map(a), read_gene_map(b)
    assert ga.symbols == {"AB002301": "MAST4", "NM_004702": "CCNE2"} and ga.source["note"] == "one"
    assert ga.sha256 == gb.sha256 == map_digest(ga.symbols)  # comments do not change the map's identity
    assert ga.symbol("ab002301_RC") == "MAST4" and ga.symbol("NM_004702.2") == "CCNE2" and ga.symbol("TP53") is None
    bad = tmp_path / "bad.tsv"
    bad.write_text("accession\tsymbol\nAB002301\tMAST4\nAB002301\tOTHER\n")
    with pytest.raises(ValueError, match="mapped twice"):
        read_gene_map(bad)
    bad.write_text("probe\tgene\nAB002301\tMAST4\n")
    with pytest.raises(ValueError, match="'accession' and 'symbol'"):
        read_gene_map(bad)
    with pytest.raises(FileNotFoundError, match=r"build_gene_map\.py"):
        read_gene_map(tmp_path / "none.tsv")


def test_build_gene_map_script(orgdb, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("AB002301\nAF091433_RC\nAJ275978\nTP53\n")
    out = tmp_path / "map.tsv"
    cmd = [sys.executable, str(ROOT / "tokenizers" / "build_gene_map.py"), "--orgdb", str(orgdb), "--ids", str(ids)]
    subprocess.run([*cmd, "--output", str(out)], check=True, capture_output=True, text=True)
    gm = read_gene_map(out)
    assert gm.symbols == {"AB002301": "MAST4", "AF091433": "CCNE2"}
    counts = json.loads(gm.source["counts"])
    assert counts == {"asked": 4, "not_accessions": 1, "mapped": 2, "ambiguous": 1, "not_found": 0}
    assert "3.16.0" in gm.source["source"] and gm.source["ambiguous_left_out"] == "AJ275978 -> CTAG1A, CTAG1B"


def test_shipped_survset_map_matches_its_header():
    gm = read_gene_map(SHIPPED)
    counts = json.loads(gm.source["counts"])
    assert len(gm) == counts["mapped"] == 3136 and counts["ambiguous"] == 2
    assert len(set(gm.symbols.values())) == 3000
    assert "org.Hs.eg.db 3.16.0" in gm.source["source"] and "2022-Sep12" in gm.source["source"]
    assert gm.symbols["AB002301"] == "MAST4" and gm.symbols["NM_004702"] == "CCNE2"


@pytest.mark.skipif(
    importlib.util.find_spec("SurvSet") is None or importlib.util.find_spec("sksurv") is None,
    reason="needs the evidence extra (survset, scikit-survival)",
)
def test_survset_recipe_with_the_map(tmp_path):
    from bioperceiver.data.manifest import metadata_path
    from bioperceiver.data.recipes import survset

    spec = survset.COHORTS
    gm = read_gene_map(SHIPPED)
    cols = ["num_AB002301", "num_AA555029_RC", "num_Contig63649_RC", "num_NM_004702", "num_AF058988"]
    mapping, merged = survset.feature_tokens(cols, spec["vdv"], gm)
    assert mapping == {
        "num_AB002301": "MAST4",
        "num_AA555029_RC": "AA555029_RC",  # an EST org.Hs.eg.db does not list: kept
        "num_Contig63649_RC": "CONTIG63649_RC",  # a Rosetta contig: no accession, kept
        "num_NM_004702": "CCNE2",
        "num_AF058988": "AF058988",  # ambiguous (GAGE12F/G/I, GAGE7): left out of the map, kept
    }
    assert not merged
    assert survset.feature_tokens(["num_gene_1"], spec["DBCD"], gm)[0] == {"num_gene_1": "DBCD:gene_1"}
    assert survset.feature_tokens(["num_X200726_at"], spec["GSE7390"], gm)[0] == {"num_X200726_at": "affy:200726_at"}

    plain = survset.build_survset_cohort(tmp_path / "plain", ["vdv"])
    mapped = survset.build_survset_cohort(tmp_path / "mapped", ["vdv", "gse1992"], gene_map=SHIPPED)
    side_plain = json.loads(metadata_path(plain).read_text())
    side = json.loads(metadata_path(mapped).read_text())
    assert side_plain["params"] == {"recipe_version": survset.RECIPE_VERSION, "cohorts": ["vdv"]}  # unchanged
    assert side["params"]["gene_map_sha256"] == gm.sha256
    info = side["cohorts"]["vdv"]
    assert info["gene_map"]["accessions_mapped"] == 3136 and info["gene_map"]["symbols"] == 3000
    assert side["cohorts"]["gse1992"]["gene_map"]["accessions_mapped"] == 0  # symbols already
    x_plain = pd.read_parquet(plain.parent / "omics" / "vdv.parquet")
    x_mapped = pd.read_parquet(mapped.parent / "omics" / "vdv.parquet")
    gse = set(pd.read_parquet(mapped.parent / "omics" / "gse1992.parquet").columns)
    assert x_plain.shape == (78, 4705) and x_mapped.shape == (78, 4569)
    assert len(set(x_plain.columns) & gse) < 10 and len(set(x_mapped.columns) & gse) == 2525
    # accessions of one gene are averaged into its symbol, as replicate probes are (NaN = not measured is skipped)
    raw = _vdv_frame()
    sizes = {}
    for symbol in ("MAST4", "CCNE2", "CD44"):
        group = [c for c in raw.columns if c.startswith("num_") and gm.symbol(c[4:]) == symbol]
        sizes[symbol] = len(group)
        want = raw[group].astype("float64").mean(axis=1).astype("float32").to_numpy()
        assert x_mapped[symbol].to_numpy() == pytest.approx(want, abs=1e-6, nan_ok=True), symbol
    assert sizes == {"MAST4": 1, "CCNE2": 1, "CD44": 3}
    # the plain build did not move, and asking again with the map reuses the mapped build
    assert survset.build_survset_cohort(tmp_path / "mapped", ["vdv", "gse1992"], gene_map=gm) == mapped


def _vdv_frame() -> pd.DataFrame:
    import warnings

    from SurvSet.data import SurvLoader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return SurvLoader().load_dataset("vdv")["df"].reset_index(drop=True)


def test_apply_to_your_own_matrix():
    """A user's accession-named matrix: mapped columns renamed, columns of one gene averaged (NaN skipped), the
    rest kept; counts say what happened."""
    gm = read_gene_map(SHIPPED)
    frame = pd.DataFrame(
        {
            "AB002301": [1.0, 2.0, 3.0],  # MAST4
            "NM_004702": [0.0, float("nan"), 4.0],  # CCNE2
            "CCNE2": [2.0, 6.0, float("nan")],  # the same gene, named by symbol
            "Contig63649_RC": [5.0, 5.0, 5.0],  # no accession: kept
            "AF058988": [7.0, 8.0, 9.0],  # ambiguous, not in the map: kept
        },
        index=["p1", "p2", "p3"],
    )
    out, counts = gm.apply(frame)
    assert list(out.columns) == ["MAST4", "CCNE2", "Contig63649_RC", "AF058988"]
    assert out["CCNE2"].tolist() == [1.0, 6.0, 4.0] and out["MAST4"].tolist() == [1.0, 2.0, 3.0]
    assert list(out.index) == ["p1", "p2", "p3"] and out["AF058988"].tolist() == [7.0, 8.0, 9.0]
    assert counts == {"mapped": 2, "accessions_kept": 1, "averaged_into_one": 1}
