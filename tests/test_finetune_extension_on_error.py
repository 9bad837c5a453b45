"""Finetuning a pretrained model extends its processors' vocabularies on the training rows: an unreadable value
there follows --on_error as it does when processors are fitted (left out, counted, logged; raised with
``raise``). It was a DataError traceback from the extension under the default skip_modality."""

from __future__ import annotations

import logging

import pandas as pd
import pytest
from test_vocabulary_extension import _cohort_manifest, _finetune, _genes, pretrained  # noqa: F401  (a fixture)

from bioperceiver.data import BioPerceiverProcessor, read_manifest, write_manifest
from bioperceiver.data.errors import DataError


def _with_unreadable_training_value(tmp_path) -> tuple:
    path = _cohort_manifest(tmp_path, "new", _genes(4, 12), 3.0, 1)
    manifest = read_manifest(path)
    table = manifest.table.copy()
    row = table.index[table["split"] == "train"][3]
    table.loc[row, "omics_expression"] = "new.parquet#row=no_such_sample"  # a row the matrix lacks
    write_manifest(table, path, manifest.metadata)
    return path, table.loc[row, "sample_id"]


def test_the_vocabulary_extension_leaves_an_unreadable_training_value_out(tmp_path, pretrained, caplog):  # noqa: F811
    manifest, bad = _with_unreadable_training_value(tmp_path)
    proc = BioPerceiverProcessor.from_pretrained(pretrained)
    with caplog.at_level(logging.WARNING):
        report = proc.extend(read_manifest(manifest), modalities=["omics_expression"], on_error="skip_modality")
    assert report["omics_expression"]["added"] == 4  # G8..G11, from the readable rows
    assert proc.fit_report.modality_counts and proc.fit_report.modality_total == 1
    assert f"left out of the vocabulary extension: sample '{bad}', modality 'omics_expression'" in caplog.text
    fresh = BioPerceiverProcessor.from_pretrained(pretrained)
    with pytest.raises(DataError, match=rf"sample '{bad}'"):
        fresh.extend(read_manifest(manifest), modalities=["omics_expression"], on_error="raise")
    assert len(fresh.processors["omics_expression"].state["genes"]) == 8  # a failed extension changed nothing


def test_finetuning_a_pretrained_model_follows_on_error_in_the_extension(tmp_path, pretrained, caplog):  # noqa: F811
    manifest, bad = _with_unreadable_training_value(tmp_path)
    with caplog.at_level(logging.INFO):
        results = _finetune(manifest, pretrained, tmp_path / "ft")  # the default --on_error skip_modality
    assert results["vocabulary_extension"]["omics_expression"]["added"] == 4
    assert "vocabulary extension: skipped 0 sample(s); dropped 1 modality value(s)" in caplog.text
    train = results["dropped_modality_values"]["train"]["omics_expression"]
    assert train["dropped"] == 1 and train["examples"] == [bad]  # the same value, dropped in training too
    assert pd.notna(results["test"]["auroc"])
