"""benchmarks/corpus_subsets.py: nested, stratified, patient-level subsets of a pretraining manifest."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from script_loader import load_script

cs = load_script("benchmarks/corpus_subsets.py")


def _manifest(tmp_path, n_a=40, n_b=9):
    """Two cohorts; cohort a has two rows for some patients; a validation and a test part."""
    from bioperceiver.data import write_manifest

    rows = []
    for cohort, n in (("a", n_a), ("b", n_b)):
        for i in range(n):
            split = "test" if i % 5 == 0 else "validation" if i % 7 == 1 else "train"
            for visit in range(2 if (cohort == "a" and i % 3 == 0) else 1):
                pid = f"{cohort}{i}"
                rows.append(
                    {
                        "sample_id": f"{pid}_{visit}",
                        "patient_id": pid,
                        "tabular_clinical": json.dumps({"age": 50 + i}),
                        "meta_source": cohort,
                        "split": split,
                    }
                )
    path = tmp_path / "cohort" / "manifest.parquet"
    write_manifest(pd.DataFrame(rows), path, {"modalities": {}, "recipe": "toy"})
    return path


def test_subsets_are_nested_stratified_by_patient_and_keep_other_splits(tmp_path):
    from bioperceiver.data import read_manifest

    path = _manifest(tmp_path)
    full = read_manifest(path).table
    paths = cs.main(["--manifest", str(path), "--fractions", "0.25", "0.5", "--seed", "3"])
    assert paths == [cs.subset_path(path, 0.25, 3), cs.subset_path(path, 0.5, 3)]
    assert paths[0].name == "manifest_corpus0.25_seed3.parquet" and paths[0].parent == path.parent
    subs = [read_manifest(p) for p in paths]
    train = full[full["split"] == "train"]
    kept = []
    for f, sub in zip((0.25, 0.5), subs):
        t = sub.table
        # every validation / test row unchanged, in order
        pd.testing.assert_frame_equal(
            t[t["split"] != "train"].reset_index(drop=True), full[full["split"] != "train"].reset_index(drop=True)
        )
        ids = set(t.loc[t["split"] == "train", "patient_id"])
        for cohort, rows in train.groupby("meta_source"):
            n = rows["patient_id"].nunique()
            mine = ids & set(rows["patient_id"])
            assert len(mine) == max(1, round(f * n)), (f, cohort)
        # whole patients: a kept patient keeps all its rows
        counts = t["patient_id"].value_counts()
        assert counts.equals(full["patient_id"].value_counts()[counts.index])
        assert sub.metadata["corpus_fraction"] == f and sub.metadata["corpus_seed"] == 3
        assert sub.metadata["train_patients_kept"] == len(ids) and sub.metadata["recipe"] == "toy"
        assert sub.metadata["rows"] == len(t)
        assert sub.metadata["rows_per_split"] == t["split"].value_counts().to_dict()
        kept.append(ids)
    assert kept[0] < kept[1]  # nested
    # the draw is seeded: the same seed gives the same subset, another seed another
    again = cs.kept_patients(full, [0.25], 3, "meta_source")[0.25]
    other = cs.kept_patients(full, [0.25], 4, "meta_source")[0.25]
    assert again == kept[0] and other != kept[0]
    # a fraction of 1 keeps every train patient
    assert cs.kept_patients(full, [1.0], 3, "meta_source")[1.0] == set(train["patient_id"])


def test_refuses_what_it_cannot_subsample(tmp_path):
    path = _manifest(tmp_path)
    table = pd.read_parquet(path)
    with pytest.raises(ValueError, match="no 'split' column"):
        cs.kept_patients(table.drop(columns="split"), [0.5], 0, "meta_source")
    with pytest.raises(ValueError, match="must lie in"):
        cs.kept_patients(table, [0.0, 0.5], 0, "meta_source")
    with pytest.raises(ValueError, match="no 'meta_site' column"):
        cs.kept_patients(table, [0.5], 0, "meta_site")
    mixed = table.copy()
    mixed.loc[mixed["sample_id"] == "a3_1", "meta_source"] = "b"
    with pytest.raises(ValueError, match="several meta_source strata"):
        cs.kept_patients(mixed, [0.5], 0, "meta_source")
