"""Bad files in a user's own cohort: the cheap validator catches them (row, sample, column, fix), processor fitting
and deep validation survive them, and ``on_error`` decides what is dropped: one modality (the default), the whole
sample, or nothing (raise). No message ever suggests unpickling a file."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pandas as pd
import pytest

from bioperceiver.data import (
    BioPerceiverCollator,
    BioPerceiverProcessor,
    DataError,
    Manifest,
    build_dataset,
    build_iterable_dataset,
    to_sample,
    validate_manifest,
)
from bioperceiver.data.dataset import ManifestDataset
from bioperceiver.data.errors import ON_ERROR_CHOICES, check_on_error
from bioperceiver.data.manifest import resolve_modalities

SETTINGS = {
    "text_note": {"vocab_size": 120, "min_frequency": 1, "max_length": 32},
    "image_xray": {"spatial_size": [16, 16]},
    "signal_ecg": {"window_s": None},
}
WORDS = ["patient", "stable", "mild", "effusion", "no", "fracture", "heart", "normal", "size", "lungs", "clear"]


def _npy_with_sidecar(path, array, rate=100.0):
    np.save(path, array)
    (path.parent / (path.name + ".json")).write_text(json.dumps({"sampling_rate": rate}))


def _cohort(root, bad: dict[str, dict[str, str]] | None = None) -> Manifest:
    """12 samples with a note, an image (.npy), an ECG (.npy + sidecar) and omics; ``bad`` replaces cells:
    ``{sample_id: {column: value}}``."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        sid = f"s{i}"
        np.save(root / f"img{i}.npy", rng.random((24, 24)).astype(np.float32))
        _npy_with_sidecar(root / f"ecg{i}.npy", rng.standard_normal((2, 300)).astype(np.float32))
        rows.append(
            {
                "sample_id": sid,
                "patient_id": f"p{i}",
                "split": "train" if i < 8 else "validation",
                "text_note": " ".join(rng.choice(WORDS, size=6)),
                "image_xray": f"img{i}.npy",
                "signal_ecg": f"ecg{i}.npy",
                "omics": {"TP53": float(i), "EGFR": float(2 * i + 1), "KRAS": 0.5},
            }
        )
    for row in rows:
        row.update((bad or {}).get(row["sample_id"], {}))
    table = pd.DataFrame(rows)
    mods, _ = resolve_modalities(table.columns, {})
    return Manifest(table, mods, [], {}, root)


def _write_bad_files(root) -> dict[str, str]:
    good = np.random.default_rng(1).standard_normal((2, 300)).astype(np.float32)
    _npy_with_sidecar(root / "whole.npy", good)
    data = (root / "whole.npy").read_bytes()
    (root / "truncated.npy").write_bytes(data[: len(data) // 2])  # header intact, half the samples
    (root / "truncated.npy.json").write_text(json.dumps({"sampling_rate": 100.0}))
    (root / "garbage.npy").write_bytes(b"this is not an array at all" * 8)
    (root / "garbage.npy.json").write_text(json.dumps({"sampling_rate": 100.0}))
    np.save(root / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    (root / "objects.npy.json").write_text(json.dumps({"sampling_rate": 100.0}))
    _npy_with_sidecar(root / "no_samples.npy", np.zeros((3, 0), np.float32))
    (root / "omics_text.json").write_text(json.dumps({"TP53": "low", "EGFR": 2.0}))
    image = (root / "img0.npy").read_bytes()
    (root / "img_truncated.npy").write_bytes(image[: len(image) - 100])
    return {"truncated": "truncated.npy", "garbage": "garbage.npy", "objects": "objects.npy"}


BAD = {
    "s1": {"signal_ecg": "truncated.npy"},
    "s2": {"signal_ecg": "garbage.npy"},
    "s3": {"signal_ecg": "no_samples.npy"},
    "s4": {"omics": {"TP53": "high", "EGFR": 1.0}},
    "s5": {"image_xray": "img_truncated.npy"},
    "s9": {"signal_ecg": "objects.npy"},
    "s10": {"omics": "omics_text.json"},
}


@pytest.fixture
def bad_cohort(tmp_path):
    _cohort(tmp_path)  # writes the good files
    _write_bad_files(tmp_path)
    return _cohort(tmp_path, BAD)


def _no_pickle_advice(text: str) -> None:
    assert "allow_pickle" not in text and "pickle.load" not in text, text


# ---- 1. the cheap validator ---------------------------------------------------------------------------------------
def test_cheap_validation_catches_corrupt_npy_empty_signal_and_text_omics(bad_cohort):
    report = validate_manifest(bad_cohort)
    found = {(p.sample_id, p.column): p for p in report.problems}
    expected = {
        ("s1", "signal_ecg"): ("corrupt_file", "truncated"),
        ("s2", "signal_ecg"): ("corrupt_file", "not a valid .npy"),
        ("s3", "signal_ecg"): ("empty_signal", "(3, 0)"),
        ("s4", "omics"): ("non_numeric", "'high'"),
        ("s5", "image_xray"): ("corrupt_file", "truncated"),
        ("s9", "signal_ecg"): ("corrupt_file", "objects"),
        ("s10", "omics"): ("non_numeric", "'low'"),
    }
    assert set(found) == set(expected), report.summary()
    for key, (reason, words) in expected.items():
        p = found[key]
        assert p.reason == reason and words in p.message, str(p)
        assert p.row == int(key[0][1:]) and p.fix and p.fix != "-"
        assert f"row {p.row}" in str(p) and repr(key[0]) in str(p) and repr(key[1]) in str(p)
        _no_pickle_advice(str(p))


# ---- 2. processors: fitting, deep validation, no unpickling advice ------------------------------------------------
def test_processors_name_corrupt_npy_files_without_pickle_advice(bad_cohort):
    good = _cohort(bad_cohort.base_dir)
    processor = BioPerceiverProcessor.from_manifest(good, SETTINGS).fit(good)
    for name, value, reason in [
        ("signal_ecg", "garbage.npy", "corrupt_file"),
        ("signal_ecg", "truncated.npy", "corrupt_file"),
        ("signal_ecg", "objects.npy", "corrupt_file"),
        ("signal_ecg", "no_samples.npy", "empty_signal"),
        ("image_xray", "img_truncated.npy", "corrupt_file"),
    ]:
        with pytest.raises(DataError) as info:
            processor.processors[name](value, sample_id="x", base_dir=bad_cohort.base_dir)
        err = info.value
        assert (err.reason, err.sample_id, err.modality) == (reason, "x", name) and err.fix, str(err)
        _no_pickle_advice(str(err))


def test_fitting_skips_bad_training_values_counts_them_and_equals_a_fit_without_them(bad_cohort):
    processor = BioPerceiverProcessor.from_manifest(bad_cohort, SETTINGS).fit(bad_cohort, on_error="skip_modality")
    counts = processor.fit_report.modality_counts
    # training rows only (s0..s7); s9's file is in validation, and images are not read to fit a processor with
    # per-image intensity scaling (the default)
    assert counts == {
        ("signal_ecg", "corrupt_file"): 2,
        ("signal_ecg", "empty_signal"): 1,
        ("omics", "bad_value"): 1,
    }, processor.fit_report.summary()
    assert processor.fit_report.total == 0  # no sample is dropped by fitting
    nulled = {sid: dict.fromkeys(cells) for sid, cells in BAD.items() if int(sid[1:]) < 8}
    clean = _cohort(bad_cohort.base_dir, nulled)
    reference = BioPerceiverProcessor.from_manifest(clean, SETTINGS).fit(clean, on_error="raise")
    for name, proc in processor.processors.items():
        assert proc.state == reference.processors[name].state, name
    # "skip" (the old name) and "skip_sample" fit the same way
    same = BioPerceiverProcessor.from_manifest(bad_cohort, SETTINGS).fit(bad_cohort, on_error="skip")
    assert same.fit_report.modality_counts == counts


def test_fitting_with_raise_names_sample_modality_and_fix(bad_cohort):
    with pytest.raises(DataError) as info:
        BioPerceiverProcessor.from_manifest(bad_cohort, SETTINGS).fit(bad_cohort, on_error="raise")
    err = info.value
    assert err.sample_id in {"s1", "s2", "s3", "s4", "s5"} and err.modality in {"signal_ecg", "omics", "image_xray"}
    assert err.fix and f"sample {err.sample_id!r}" in str(err) and f"modality {err.modality!r}" in str(err)
    _no_pickle_advice(str(err))


def test_deep_validation_reports_the_bad_rows_instead_of_crashing(bad_cohort):
    processor = BioPerceiverProcessor.from_manifest(bad_cohort, SETTINGS).fit(bad_cohort)
    report = validate_manifest(bad_cohort, processor=processor)
    rows = [(p.sample_id, p.column) for p in report.problems]
    assert set(rows) >= set((sid, col) for sid, cells in BAD.items() for col in cells), report.summary()
    # a cell the cheap checks already flagged is not run through its processor to be reported a second time
    assert len(rows) == len(set(rows)), report.summary()
    for p in report.problems:
        assert p.row is not None and p.sample_id and p.column and p.fix
        _no_pickle_advice(str(p))


# ---- 3. on_error: skip_modality | skip_sample | raise -------------------------------------------------------------
def test_on_error_choices_aliases_and_defaults():
    assert set(ON_ERROR_CHOICES) == {"raise", "skip", "skip_sample", "skip_modality"}
    assert check_on_error("skip") == "skip_sample" and check_on_error("skip_modality") == "skip_modality"
    with pytest.raises(ValueError, match="skip_modality"):
        check_on_error("ignore")
    for fn in (
        ManifestDataset.__init__,
        build_dataset,
        build_iterable_dataset,
        BioPerceiverCollator.__init__,
        BioPerceiverProcessor.fit,
        BioPerceiverProcessor.process_many,
    ):
        assert inspect.signature(fn).parameters["on_error"].default == "skip_modality", fn.__qualname__


@pytest.fixture
def image_cohort(tmp_path):
    """s1: an unreadable image and a good note; s2: only an unreadable image; others good."""
    good = _cohort(tmp_path)
    processor = BioPerceiverProcessor.from_manifest(good, SETTINGS).fit(good)
    (tmp_path / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    bad = {"s1": {"image_xray": "broken.npy"}, "s2": {"image_xray": "broken.npy"}}
    for col in ("text_note", "signal_ecg", "omics"):
        bad["s2"][col] = None
    return _cohort(tmp_path, bad), processor


def _collate_all(manifest, processor, on_error):
    ds = ManifestDataset.from_manifest(manifest, processor, on_error=on_error)
    collator = BioPerceiverCollator(processor.modalities, on_error=on_error)
    return collator([ds[i] for i in range(len(ds))], train=False), collator.report


def test_skip_modality_keeps_the_note_of_a_sample_with_an_unreadable_image(image_cohort):
    manifest, processor = image_cohort
    batch, report = _collate_all(manifest, processor, "skip_modality")
    ids = batch["sample_id"]
    assert "s1" in ids and "s2" not in ids and len(ids) == 11
    i = ids.index("s1")
    assert not bool(batch["inputs"]["image_xray"]["present"][i])
    expected = processor.processors["text_note"](manifest.table["text_note"][1])["input_ids"]
    mask = batch["inputs"]["text_note"]["attention_mask"][i].bool()
    assert batch["inputs"]["text_note"]["input_ids"][i][mask].tolist() == expected.tolist()
    assert report.modality_counts == {("image_xray", "corrupt_file"): 2}
    assert report.counts == {("-", "no_readable_modality"): 1} and report.total == 1
    # the same through the Arrow path and the streaming path
    ds, arrow_report = build_dataset(manifest, processor, on_error="skip_modality")
    assert arrow_report.modality_counts == report.modality_counts and arrow_report.counts == report.counts
    assert sorted(ds["sample_id"]) == sorted(ids)
    row = to_sample(ds[[*ds["sample_id"]].index("s1")], processor)
    assert row["image_xray"] is None and row["text_note"]["input_ids"].tolist() == expected.tolist()
    stream, stream_report = build_iterable_dataset(manifest, processor, on_error="skip_modality")
    assert sorted(r["sample_id"] for r in stream) == sorted(ids)
    assert stream_report.modality_counts == report.modality_counts


def test_skip_sample_drops_the_whole_sample(image_cohort):
    manifest, processor = image_cohort
    for policy in ("skip_sample", "skip"):
        batch, report = _collate_all(manifest, processor, policy)
        assert "s1" not in batch["sample_id"] and "s2" not in batch["sample_id"] and len(batch["sample_id"]) == 10
        assert report.counts == {("image_xray", "corrupt_file"): 2} and report.modality_total == 0
        ds, arrow_report = build_dataset(manifest, processor, on_error=policy)
        assert len(ds) == 10 and arrow_report.counts == report.counts
        samples, many_report = processor.process_many(manifest.records(), base_dir=manifest.base_dir, on_error=policy)
        assert len(samples) == 10 and many_report.counts == report.counts
    samples, many_report = processor.process_many(manifest.records(), base_dir=manifest.base_dir)
    assert len(samples) == 11 and many_report.modality_counts == {("image_xray", "corrupt_file"): 2}
    with pytest.raises(DataError, match=r"'s1'.*'image_xray'"):
        _collate_all(manifest, processor, "raise")


def test_collator_skip_modality_drops_only_the_bad_arrays():
    collator = BioPerceiverCollator({"omics": "omics", "tabular_labs": "tabular"})
    good = {"gene_ids": np.array([1, 2]), "values": np.array([0.5, 1.5], np.float32)}
    labs = {"feature_ids": np.array([0]), "values": np.array([0.1], np.float32)}
    nan = {"gene_ids": np.array([1]), "values": np.array([np.nan], np.float32)}
    batch = collator([{"sample_id": "a", "omics": nan, "tabular_labs": labs}, {"sample_id": "b", "omics": good}])
    assert batch["sample_id"] == ["a", "b"]
    assert batch["inputs"]["omics"]["mask"].tolist() == [[False, False], [True, True]]
    assert collator.report.modality_counts == {("omics", "non_finite"): 1} and collator.report.total == 0


def test_deep_validation_reports_an_unexpected_processor_failure_as_a_problem(bad_cohort, monkeypatch):
    processor = BioPerceiverProcessor.from_manifest(bad_cohort, SETTINGS).fit(bad_cohort)
    omics = processor.processors["omics"]

    def broken(value, **kwargs):
        raise KeyError("a bug, or a reader failing in a way no one foresaw")

    monkeypatch.setattr(omics, "_process", broken)
    report = validate_manifest(bad_cohort, processor=processor)
    failed = [p for p in report.problems if p.reason == "processor_failed"]
    flagged = {sid for sid, cells in BAD.items() if "omics" in cells}  # the cheap checks' already: not run again
    assert {p.sample_id for p in failed} == {f"s{i}" for i in range(12)} - flagged
    assert all(p.column == "omics" and "KeyError" in p.message and p.fix for p in failed)


def test_skip_report_counts_each_sample_once_over_epochs_and_merged_reports():
    """A training loop meets a bad sample once per epoch: it is one skipped sample, not one per epoch, and two
    reports that saw it (two epochs' collators, two loaders) merge into one count; errors without a sample id
    (fitting) still count every time."""
    from bioperceiver.data.errors import SkipReport

    def bad(sid, modality="omics", reason="non_finite"):
        return DataError(reason, "a NaN", sample_id=sid, modality=modality)

    first, second = SkipReport(), SkipReport()
    for _ in range(3):  # three epochs
        assert first.add(bad("s1"), scope="modality") in (True, False)
        first.add(bad("s2", "image_xray", "corrupt_file"))
    assert first.modality_counts == {("omics", "non_finite"): 1} and first.counts == {("image_xray", "corrupt_file"): 1}
    assert first.add(bad("s1"), scope="modality") is False and first.add(bad("s3"), scope="modality") is True
    second.add(bad("s1"), scope="modality")
    second.add(bad("s4"), scope="modality")
    first.update(second)
    assert first.modality_counts == {("omics", "non_finite"): 3}  # s1, s3, s4
    assert len(first.modality_examples[("omics", "non_finite")]) == 3
    anonymous = SkipReport()
    for _ in range(2):
        anonymous.add(bad(None), scope="modality")
    assert anonymous.modality_total == 2
