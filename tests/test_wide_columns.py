"""A user's own flat CSV: one column per clinical feature or gene (``tabular_<group>.<feature>``,
``omics_<group>.<gene>``) is packed into one tabular / omics modality per group when the manifest is read, with
missing cells left out of the packed value and a row with none of them missing the modality; the packed manifest
validates, fits and processes like one written with ``{feature: value}`` cells."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from bioperceiver.data import BioPerceiverProcessor, read_manifest, validate_manifest
from bioperceiver.data.manifest import pack_wide_columns


def _flat(path):
    table = pd.DataFrame(
        {
            "sample_id": [f"s{i}" for i in range(6)],
            "patient_id": [f"p{i}" for i in range(6)],
            "tabular_clinical.age": [61, 54, np.nan, 70, 48, np.nan],
            "tabular_clinical.er": ["positive", "negative", None, "positive", "negative", None],
            "omics_expression.TP53": [1.5, np.nan, 0.2, 3.1, 0.7, 1.1],
            "omics_expression.AC012345.1": [0.1, 0.4, np.nan, 0.3, 0.2, 0.9],  # a dotted gene id keeps its dots
            "text_note": ["stable", "mild effusion", "no change", None, "clear", "stable"],
            "label_event": [1, 0, 0, 1, 0, 1],
        }
    )
    table.to_csv(path, index=False)
    return table


def test_flat_feature_columns_pack_into_one_modality_per_group(tmp_path):
    _flat(tmp_path / "cohort.csv")
    m = read_manifest(tmp_path / "cohort.csv")
    assert m.modalities == {"tabular_clinical": "tabular", "omics_expression": "omics", "text_note": "text"}
    assert m.label_columns == ["label_event"]
    cells = [None if c is None else json.loads(c) for c in m.table["tabular_clinical"]]
    assert cells[0] == {"age": 61, "er": "positive"} and cells[2] is None  # a row without any: modality absent
    assert cells[5] is None
    genes = json.loads(m.table["omics_expression"][2])
    assert genes == {"TP53": 0.2}  # the missing gene is left out, not zero
    assert set(json.loads(m.table["omics_expression"][0])) == {"TP53", "AC012345.1"}
    assert validate_manifest(tmp_path / "cohort.csv").ok
    proc = BioPerceiverProcessor.from_manifest(m, {"text_note": {"vocab_size": 50, "min_frequency": 1}}).fit(m)
    sample = proc(m.records()[0])
    assert sample["tabular_clinical"] is not None and sample["omics_expression"] is not None
    assert proc(m.records()[2])["tabular_clinical"] is None


def test_a_group_given_both_ways_or_an_unknown_flat_column_is_refused_with_the_fix(tmp_path):
    table = _flat(tmp_path / "cohort.csv")
    table["tabular_clinical"] = None
    with pytest.raises(ValueError, match=r"tabular_clinical.*both.*tabular_clinical\.age"):
        pack_wide_columns(table)
    flat = pd.DataFrame({"sample_id": ["a"], "patient_id": ["p"], "age": [60]})
    flat.to_csv(tmp_path / "flat.csv", index=False)
    with pytest.raises(ValueError, match=r"tabular_<group>\.<feature>"):
        read_manifest(tmp_path / "flat.csv")
    problems = validate_manifest(tmp_path / "flat.csv").problems
    assert any("tabular_<group>.<feature>" in p.fix for p in problems)
