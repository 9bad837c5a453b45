"""Processors fitted from per-site statistics equal processors fitted on the pooled values."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom.data import get_testdata_file

from bioperceiver.data.manifest import Manifest
from bioperceiver.data.processing import BioPerceiverProcessor
from bioperceiver.federated.processors import fit_processors_federated
from bioperceiver.federated.sites import site_contributions, split_sites
from bioperceiver.modalities.image.processor import ImageProcessor
from bioperceiver.modalities.omics.processor import OmicsProcessor
from bioperceiver.modalities.processor import sum_statistics
from bioperceiver.modalities.signal.processor import SignalProcessor
from bioperceiver.modalities.tabular.processor import TabularProcessor
from bioperceiver.modalities.text.processor import TextProcessor


def _federated(make, site_values, base_dir=None):
    """Fit a fresh processor from the summed statistics of each site's values (sites answer queries too)."""
    proc = make()
    stats = [proc.site_statistics(v, base_dir=base_dir) for v in site_values]

    def query(request):
        return sum_statistics(proc.answer_query(v, request, base_dir=base_dir) for v in site_values)

    return proc.fit_from_statistics(sum_statistics(stats), query)


def _assert_same_state(a, b):
    """Equal vocabularies/structure; floats equal up to summation order."""
    if isinstance(a, dict):
        assert sorted(a) == sorted(b)
        for k in a:
            _assert_same_state(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_state(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12)
    else:
        assert a == b


def _tabular_rows(n, seed):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        row = {"age": float(rng.normal(60, 12)), "grade": int(rng.integers(1, 4)), "sex": str(rng.choice(["F", "M"]))}
        row["stage"] = "IV" if i % 7 == 0 else int(rng.integers(1, 4))  # mixed: numbers and a string
        if i % 3 == 0:
            row["psa"] = float(rng.lognormal(1.0, 1.0))  # present in some rows only
        if i % 5 == 0:
            row["age"] = None
        rows.append(row)
    return rows


@pytest.mark.parametrize("scaling", ["robust", "standard"])
def test_tabular_federated_fit_equals_pooled(scaling):
    sites = [_tabular_rows(31, 1), _tabular_rows(18, 2), [None, *_tabular_rows(6, 3)]]
    pooled = TabularProcessor("t", scaling=scaling, max_categories=3).fit([r for s in sites for r in s])
    fed = _federated(lambda: TabularProcessor("t", scaling=scaling, max_categories=3), sites)
    _assert_same_state(pooled.state, fed.state)
    row = _tabular_rows(3, 9)[1]
    for key in ("feature_ids", "values", "category_ids"):
        np.testing.assert_allclose(fed(row)[key], pooled(row)[key], rtol=1e-6)


def test_tabular_robust_quantiles_are_exact_with_ties_and_negative_values():
    sites = [[{"x": v} for v in (-3.5, 0.0, 0.0, 2.0)], [{"x": v} for v in (-0.0, 7.25, 2.0)], [{"x": 1e-300}]]
    pooled = TabularProcessor("t").fit([r for s in sites for r in s])
    fed = _federated(lambda: TabularProcessor("t"), sites)
    assert fed.state["features"][0]["center"] == pooled.state["features"][0]["center"]
    assert fed.state["features"][0]["scale"] == pooled.state["features"][0]["scale"]


def test_omics_federated_fit_equals_pooled():
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(12)]

    def site(n, present):
        return [{g: float(rng.gamma(2.0, 3.0)) for g in genes[present]} for _ in range(n)]

    sites = [site(5, slice(0, 8)), site(4, slice(4, 12)), site(3, slice(2, 6))]
    settings = {"zscore": True, "min_samples": 4, "max_genes": 9}
    pooled = OmicsProcessor("o", **settings).fit([r for s in sites for r in s])
    fed = _federated(lambda: OmicsProcessor("o", **settings), sites)
    _assert_same_state(pooled.state, fed.state)


def test_text_federated_fit_equals_pooled():
    sites = [
        ["Cardiomegalia leve. Sin derrame pleural.", "Derrame pleural izquierdo"],
        ["No hay neumotórax", "Cardiomegalia"],
        ["Atelectasia basal derecha y derrame"],
    ]
    settings = {"vocab_size": 120, "min_frequency": 1}
    pooled = TextProcessor("n", **settings).fit([t for s in sites for t in s])
    fed = _federated(lambda: TextProcessor("n", **settings), sites)
    assert fed.tokenizer.get_vocab() == pooled.tokenizer.get_vocab()
    np.testing.assert_array_equal(fed("derrame pleural leve")["input_ids"], pooled("derrame pleural leve")["input_ids"])


def test_signal_and_image_dataset_statistics_equal_pooled(tmp_path):
    for i, (rate, channels) in enumerate([(100.0, ("ECG", "RESP")), (50.0, ("ECG",)), (100.0, ("EDA", "ECG"))]):
        t = np.arange(int(rate * 2)) / rate
        values = np.stack([np.sin(2 * np.pi * (i + 2) * t) * (c + 1) + c for c in range(len(channels))])
        values = values.astype(np.float32)
        np.savez(tmp_path / f"s{i}.npz", values=values, channels=np.array(channels), sampling_rate=rate)
    sites = [["s0.npz", "s1.npz"], ["s2.npz"]]
    settings = {"normalization": "dataset", "target_rate": 50.0}
    pooled = SignalProcessor("g", **settings).fit([v for s in sites for v in s], base_dir=tmp_path)
    fed = _federated(lambda: SignalProcessor("g", **settings), sites, base_dir=tmp_path)
    _assert_same_state(pooled.state, fed.state)

    ct, mr = get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")
    image = {"spatial_size": [16, 16], "intensity": "dataset"}
    pooled = ImageProcessor("i", **image).fit([ct, mr])
    fed = _federated(lambda: ImageProcessor("i", **image), [[ct], [mr]])
    _assert_same_state(pooled.state, fed.state)


def test_federated_fit_of_a_manifest_by_site_column_equals_pooled_fit():
    rows = []
    notes = ["derrame pleural", "cardiomegalia leve", "sin hallazgos", "atelectasia basal", "neumotorax derecho"]
    for i, tab in enumerate(_tabular_rows(24, 4)):
        rows.append(
            {
                "sample_id": f"s{i}",
                "patient_id": f"p{i // 2}",
                "site": ["north", "south", "east"][i % 3],
                "split": "test" if i % 6 == 5 else "train",
                "tabular_x": tab,
                "text_note": notes[i % 5] if i % 4 else None,
            }
        )
    table = pd.DataFrame(rows)
    manifest = Manifest(table, {"tabular_x": "tabular", "text_note": "text"}, [], {}, Path("."))
    settings = {"text_note": {"vocab_size": 80, "min_frequency": 1}}
    pooled = BioPerceiverProcessor.from_manifest(manifest, settings).fit(manifest, split="train")
    sites = split_sites(manifest, "site")
    assert list(sites) == ["east", "north", "south"]
    fed = fit_processors_federated(BioPerceiverProcessor.from_manifest(manifest, settings), sites, split="train")
    _assert_same_state(pooled.processors["tabular_x"].state, fed.processors["tabular_x"].state)
    assert fed.processors["text_note"].tokenizer.get_vocab() == pooled.processors["text_note"].tokenizer.get_vocab()
    contrib = site_contributions(sites)
    assert sum(c["rows"] for c in contrib) == int((table["split"] == "train").sum())
    assert all("s1" not in str(c) and "p0" not in str(c) for c in contrib)  # counts only, no ids
    with pytest.raises(ValueError, match="no 'hospital' column"):
        split_sites(manifest, "hospital")
