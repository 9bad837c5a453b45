"""Property-based tests: whatever users feed the processors and the collator, they either return well-formed
arrays or raise a DataError naming the sample and modality - never another exception, never a silent drop."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bioperceiver.data import (
    BioPerceiverCollator,
    DataError,
    ImageProcessor,
    OmicsProcessor,
    SignalProcessor,
    TabularProcessor,
    TextProcessor,
)
from bioperceiver.data.manifest import as_mapping

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
floats = st.floats(allow_nan=True, allow_infinity=True, width=64)
junk = st.one_of(st.none(), st.integers(), floats, st.binary(max_size=20), st.lists(st.integers(), max_size=3))


def expect_clean(call, sample_id="s1", modality=None):
    """Run ``call``; a DataError must name the sample (and the modality when given)."""
    try:
        return call()
    except DataError as err:
        assert f"sample {sample_id!r}" in str(err)
        if modality:
            assert f"modality {modality!r}" in str(err)
        assert err.reason
        return None


@pytest.fixture(scope="module")
def text_proc():
    return TextProcessor("note", vocab_size=80, min_frequency=1, max_length=16).fit(["fever and cough", "no findings"])


@SETTINGS
@given(value=st.one_of(st.text(max_size=200), junk))
def test_text_any_input(text_proc, value):
    out = expect_clean(lambda: text_proc(value, sample_id="s1"), modality="note")
    if out is not None:
        assert isinstance(value, str) and value.strip()
        ids = out["input_ids"]
        assert ids.dtype == np.int64 and 3 <= len(ids) <= 16 and ids.min() >= 0
        assert ids.max() < text_proc.model_settings()["vocab_size"]


genes = st.sampled_from(["TP53", "tp53", "EGFR", "MYC", "KRAS", "UNKNOWN1", "ENSG00000141510", ""])


@pytest.fixture(scope="module")
def omics_proc():
    return OmicsProcessor("rna", zscore=True).fit([{"TP53": 3.0, "EGFR": 1.0}, {"MYC": 2.0, "TP53": 0.5}])


@SETTINGS
@given(value=st.one_of(st.dictionaries(genes, st.one_of(floats, st.text(max_size=3), st.none()), max_size=6), junk))
def test_omics_any_input(omics_proc, value):
    before = omics_proc.report().get("oov_genes", 0)
    out = expect_clean(lambda: omics_proc(value, sample_id="s1"), modality="rna")
    if out is not None:
        assert out["gene_ids"].shape == out["values"].shape
        assert np.isfinite(out["values"]).all() and out["values"].dtype == np.float32
        assert np.all(np.diff(out["gene_ids"]) > 0)  # sorted, no duplicates
        mapping = as_mapping(value)  # dicts, JSON text and Arrow map rows (lists of pairs) are all mappings
        measured = {OmicsProcessor("x")._norm_name(g) for g, v in mapping.items() if v is not None and not _nan(v)}
        unknown = {g for g in measured if g not in omics_proc.state["genes"]}
        assert omics_proc.report().get("oov_genes", 0) - before == len(unknown)  # unknown genes are counted


def _nan(v):
    return isinstance(v, float) and math.isnan(v)


@pytest.fixture(scope="module")
def tab_proc():
    return TabularProcessor("ehr").fit([{"age": 40, "sex": "F"}, {"age": 70, "sex": "M", "bp": 120.0}])


@SETTINGS
@given(
    value=st.one_of(
        st.dictionaries(
            st.sampled_from(["age", "sex", "bp", "new"]), st.one_of(floats, st.text(max_size=4), st.none())
        ),
        junk,
    )
)
def test_tabular_any_input(tab_proc, value):
    cell = json.dumps(value) if isinstance(value, dict) and not any(_nan(v) for v in value.values()) else value
    out = expect_clean(lambda: tab_proc(cell, sample_id="s1"), modality="ehr")
    if out is not None:
        n = len(out["feature_ids"])
        assert out["values"].shape == out["category_ids"].shape == (n,)
        assert np.isfinite(out["values"]).all() and np.abs(out["values"]).max(initial=0) <= 10
        assert out["category_ids"].max(initial=0) < tab_proc.model_settings()["num_categories"]
        mapping = as_mapping(value)
        present = [k for k, v in mapping.items() if k in ("age", "sex", "bp") and v is not None and not _nan(v)]
        assert n == len(present)  # a missing value is no token, every present known feature is one


@SETTINGS
@given(
    values=arrays(
        dtype=np.float64,
        shape=st.tuples(st.integers(1, 3), st.integers(0, 40)),
        elements=st.one_of(st.floats(-1e3, 1e3, width=32), st.just(float("nan"))),
    ),
    rate=st.sampled_from([1.0, 50.0, 250.0]),
    dtype=st.sampled_from([np.float32, np.float64, np.int16]),
)
def test_signal_any_recording(tmp_path_factory, values, rate, dtype):
    d = tmp_path_factory.mktemp("sig")
    if dtype is np.int16:
        values = np.nan_to_num(values).astype(np.int16)
    values = values.astype(dtype)
    channels = np.array([f"C{i}" for i in range(values.shape[0])])
    np.savez(d / "r.npz", values=values, channels=channels, sampling_rate=rate)
    proc = SignalProcessor("sig", target_rate=100.0)
    proc.state, proc._index = {"channels": ["C0", "C1", "C2"]}, {"C0": 0, "C1": 1, "C2": 2}
    out = expect_clean(lambda: proc("r.npz", sample_id="s1", base_dir=d), modality="sig")
    if out is not None:
        assert out["values"].ndim == 2 and out["values"].shape[0] == values.shape[0] and out["values"].shape[1] > 0
        assert np.isfinite(out["values"]).all() and float(out["sampling_rate"]) == 100.0
    else:
        assert values.shape[1] == 0 or not np.isfinite(values.astype(np.float64)).all()


@SETTINGS
@given(payload=st.binary(max_size=300), suffix=st.sampled_from([".dcm", ".png", ".nii.gz", ".npy", ".jpg"]))
def test_image_corrupt_bytes(tmp_path_factory, payload, suffix):
    d = tmp_path_factory.mktemp("img")
    (d / f"x{suffix}").write_bytes(payload)
    out = expect_clean(lambda: ImageProcessor("img", spatial_size=[8, 8])(f"x{suffix}", sample_id="s1", base_dir=d))
    if out is not None:
        assert out["pixel_values"].shape == (1, 8, 8) and np.isfinite(out["pixel_values"]).all()


@SETTINGS
@given(
    lengths=st.lists(st.one_of(st.none(), st.integers(0, 6)), min_size=1, max_size=6),
    bad=st.sampled_from(["nan", "shape", "dtype", "none"]),
)
def test_collator_any_batch(lengths, bad):
    collator = BioPerceiverCollator({"omics": "omics"}, on_error="skip")
    features = []
    for i, n in enumerate(lengths):
        arrays = None if n is None else {"gene_ids": np.arange(n), "values": np.ones(n, np.float32)}
        features.append({"sample_id": f"s{i}", "omics": arrays})
    if bad != "none" and features[0]["omics"] is not None and lengths[0]:
        a = features[0]["omics"]
        if bad == "nan":
            a["values"][0] = np.nan
        elif bad == "shape":
            a["values"] = a["values"].reshape(1, -1)
        else:
            a["values"] = np.array(["x"] * lengths[0], dtype=object)
    batch = collator(features, train=False)
    kept = [] if batch is None else batch["sample_id"]
    assert len(kept) + collator.report.total == len(features)  # every sample is either batched or counted
    if batch is not None:
        mask = batch["inputs"]["omics"]["mask"]
        for j, sid in enumerate(kept):
            assert int(mask[j].sum()) == lengths[int(sid[1:])]
