"""Proof that a modality is a plug-in: a new kind, ``spectrum`` (intensities at wavenumbers, e.g. Raman), is
defined in this file alone (spec + processor + embedder + config), registered, and run next to a built-in kind
(``tabular``) through validation, fitting, ``datasets.map``, collation, the backbone, a contrastive loss, a
finetuning head, attribution token labels and ``save_pretrained``/``from_pretrained`` -- without any library file
knowing about it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from transformers import AutoModel, AutoModelForSequenceClassification

import bioperceiver as bp
from bioperceiver.data import (
    BioPerceiverCollator,
    BioPerceiverProcessor,
    Problem,
    build_dataset,
    read_manifest,
    to_sample,
    validate_manifest,
)
from bioperceiver.interpret import attention_attribution
from bioperceiver.layers import FourierFeatures
from bioperceiver.modalities import (
    ArraySpec,
    ModalityEmbedder,
    ModalityProcessor,
    ModalitySpec,
    available_modalities,
    get_modality,
    register_modality,
    unregister_modality,
)
from bioperceiver.training import ContrastivePretrainer


# ---- the new kind, defined here only -------------------------------------------------------------------------------
@dataclass
class SpectrumSettings:
    """Processor settings: keep wavenumbers in ``[min_wavenumber, max_wavenumber]`` (cm^-1)."""

    min_wavenumber: float = 0.0
    max_wavenumber: float = 4000.0


class SpectrumProcessor(ModalityProcessor):
    """A spectrum cell (``{wavenumber: intensity}`` or a ``.npy`` of shape ``(2, N)``) -> ``wavenumbers (N,)``
    (sorted, in range) and ``intensities (N,)`` standardised with the training mean/std."""

    Settings = SpectrumSettings

    def _read(self, value, base_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
        from bioperceiver.data.manifest import as_mapping, parse_reference

        mapping = as_mapping(value)
        if mapping is not None:
            wn = np.array([float(k) for k in mapping], dtype=np.float64)
            it = np.array([float(v) for v in mapping.values()], dtype=np.float64)
        else:
            arr = np.load(parse_reference(value, base_dir).path, allow_pickle=False)
            wn, it = arr[0].astype(np.float64), arr[1].astype(np.float64)
        keep = (wn >= self.settings.min_wavenumber) & (wn <= self.settings.max_wavenumber)
        order = np.argsort(wn[keep], kind="stable")
        return wn[keep][order], it[keep][order]

    def _fit(self, values, sample_ids, base_dir):
        its = np.concatenate([self._read(v, base_dir)[1] for v in values])
        self.state = {"mean": float(its.mean()), "std": float(its.std() or 1.0)}

    def _process(self, value, *, sample_id, base_dir, train, rng):
        wn, it = self._read(value, base_dir)
        if not len(wn):
            raise self.error("empty_spectrum", "no wavenumber in range", "widen min/max_wavenumber or drop the cell")
        it = (it - self.state["mean"]) / self.state["std"]
        return {"intensities": it.astype(np.float32), "wavenumbers": wn.astype(np.float32)}

    def model_settings(self):
        return {"kind": self.kind, "max_wavenumber": self.settings.max_wavenumber}


@dataclass
class SpectrumConfig:
    """Embedder settings: Fourier bands of the (scaled) wavenumber and the scale."""

    num_bands: int = 4
    max_wavenumber: float = 4000.0

    def __post_init__(self):
        if self.num_bands <= 0 or self.max_wavenumber <= 0:
            raise ValueError("num_bands and max_wavenumber must be > 0")


class SpectrumEmbedder(ModalityEmbedder):
    """Token = linear(intensity) + Fourier features of wavenumber / max_wavenumber."""

    config_class = SpectrumConfig
    input_keys = ("intensities", "wavenumbers")
    optional_input_keys = ("mask",)

    def __init__(self, name, config, d_input):
        super().__init__(name, config, d_input)
        self.value = nn.Linear(1, d_input)
        self.position = FourierFeatures(
            num_dims=1, num_bands=config.num_bands, min_freq=0.5, max_freq=8.0, d_out=d_input
        )

    def embed(self, inputs):
        it, wn = inputs["intensities"], inputs["wavenumbers"]  # (B, N), (B, N)
        keep = self._mask(inputs, "mask", it.shape)
        tokens = self.value(it[..., None]) + self.position(wn[..., None] / self.config.max_wavenumber)  # (B, N, D)
        return tokens, keep


class SpectrumSpec(ModalitySpec):
    kind = "spectrum"
    processor_class = SpectrumProcessor
    embedder_class = SpectrumEmbedder
    arrays = MappingProxyType(
        {"intensities": ArraySpec(torch.float32, doc="standardised (N,)"), "wavenumbers": ArraySpec(torch.float32)}
    )
    cell_forms = ("mapping", "path")
    token_unit = "wavenumber"

    def check_mapping(self, mapping):
        bad = [k for k in mapping if not _is_float(k)]
        if bad:
            return [Problem("bad_wavenumber", f"keys {bad[:3]} are not wavenumbers", "use numbers in cm^-1 as keys")]
        return []

    def check_file(self, path):
        from bioperceiver.modalities.spec import npy_shape

        shape = npy_shape(path)
        if len(shape) != 2 or shape[0] != 2:
            return [
                Problem("bad_shape", f"{path.name} has shape {shape}", "save a (2, N) array: wavenumbers, intensities")
            ]
        return []

    def token_labels(self, attribution, modality):
        return [[f"{w:.0f} cm^-1" for w in row] for row in attribution.inputs[modality]["wavenumbers"].tolist()]


def _is_float(text) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ---- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spectrum_kind():
    spec = register_modality(SpectrumSpec())
    yield spec
    unregister_modality("spectrum")


@pytest.fixture(scope="module")
def cohort(spectrum_kind, tmp_path_factory):
    root = tmp_path_factory.mktemp("spectra")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        n = 5 + i % 3
        wn = np.sort(rng.choice(np.arange(400, 3200, 100), n, replace=False)).astype(np.float64)
        it = rng.normal(size=n) + (i % 2)
        if i == 0:
            spectrum = json.dumps({f"{w:.0f}": float(v) for w, v in zip(wn, it)})  # inline
        elif i == 3:
            spectrum = None  # absent for this sample
        else:
            np.save(root / f"s{i}.npy", np.stack([wn, it]))
            spectrum = f"s{i}.npy"
        tab = None if i == 5 else json.dumps({"age": 40 + 3 * i, "sex": "F" if i % 2 else "M"})
        rows.append(
            {"sample_id": f"s{i}", "patient_id": f"p{i}", "spectrum_raman": spectrum, "tabular": tab, "label_y": i % 2}
        )
    table = pd.DataFrame(rows)
    table.to_csv(root / "manifest.csv", index=False)
    return root, read_manifest(root / "manifest.csv")


@pytest.fixture(scope="module")
def fitted(cohort):
    _root, manifest = cohort
    processor = BioPerceiverProcessor.from_manifest(manifest).fit(manifest, split=None)
    config = bp.BioPerceiverConfig(
        num_latents=4,
        d_latents=16,
        d_input=12,
        num_cross_attention_heads=2,
        num_self_attention_heads=2,
        num_self_attention_layers=1,
        projection_dim=8,
        num_labels=2,
        modalities=processor.model_modalities({"spectrum_raman": {"num_bands": 3}}),
    )
    return processor, config


def _batch(manifest, processor):
    processed = [processor(r, base_dir=manifest.base_dir) for r in manifest.records()]
    return BioPerceiverCollator(processor.modalities, label_columns=["label_y"])(processed, train=False)


# ---- the proof -----------------------------------------------------------------------------------------------------
def test_registry_lists_the_new_kind_and_names_it_in_errors(spectrum_kind):
    assert "spectrum" in available_modalities() and get_modality("spectrum") is spectrum_kind
    assert SpectrumProcessor.kind == SpectrumEmbedder.kind == "spectrum"
    with pytest.raises(ValueError, match="already registered"):
        register_modality(type("OtherSpectrum", (SpectrumSpec,), {})())
    with pytest.raises(ValueError, match=r"registered kinds: .*spectrum"):
        get_modality("spectra")


def test_validate_cheap_and_deep(cohort, fitted):
    root, manifest = cohort
    processor, _ = fitted
    assert manifest.modalities == {"spectrum_raman": "spectrum", "tabular": "tabular"}  # naming rule knows the kind
    assert validate_manifest(root / "manifest.csv").ok
    assert validate_manifest(manifest, processor=processor).ok
    bad = manifest.table.copy()
    np.save(root / "wrong.npy", np.zeros((3, 4)))
    bad.loc[1, "spectrum_raman"] = "wrong.npy"
    bad.loc[2, "spectrum_raman"] = json.dumps({"peak": 1.0})
    bad.loc[4, "spectrum_raman"] = "nope.npy"
    bad.loc[6, "spectrum_raman"] = json.dumps({"9000": 1.0})  # out of range: only the processor sees it
    cheap = validate_manifest(bad, base_dir=root)
    assert sorted((p.reason, p.row) for p in cheap.problems) == [
        ("bad_shape", 1),
        ("bad_wavenumber", 2),
        ("missing_file", 4),
    ]
    deep = validate_manifest(bad.drop(index=[1, 2, 4]).reset_index(drop=True), base_dir=root, processor=processor)
    assert [(p.reason, p.sample_id, p.column) for p in deep.problems] == [("empty_spectrum", "s6", "spectrum_raman")]


def test_datasets_map_and_collator_match_direct_processing(cohort, fitted):
    _root, manifest = cohort
    processor, _ = fitted
    ds, report = build_dataset(manifest, processor)
    assert report.total == 0 and len(ds) == 8
    assert ds[3]["spectrum_raman"] is None and ds[0]["spectrum_raman"]["wavenumbers"] == sorted(
        ds[0]["spectrum_raman"]["wavenumbers"]
    )
    collate = BioPerceiverCollator(processor.modalities, label_columns=["label_y"])
    from_ds = collate([to_sample(r, processor) for r in ds], train=False)
    direct = _batch(manifest, processor)
    for name in ("spectrum_raman", "tabular"):
        assert from_ds["inputs"][name].keys() == direct["inputs"][name].keys()
        for key, value in direct["inputs"][name].items():
            torch.testing.assert_close(from_ds["inputs"][name][key], value, rtol=0, atol=0)
    spec = direct["inputs"]["spectrum_raman"]
    lengths = [5 + i % 3 for i in range(8)]
    assert spec["mask"].sum(1).tolist() == [0 if i == 3 else n for i, n in enumerate(lengths)]
    assert spec["intensities"].shape == (8, 7) and spec["intensities"][3].abs().sum() == 0


def test_model_contrastive_finetuning_attribution_and_reload(cohort, fitted, tmp_path):
    _root, manifest = cohort
    processor, config = fitted
    batch = _batch(manifest, processor)
    torch.manual_seed(0)
    model = bp.BioPerceiverModel(config).eval()
    with torch.no_grad():
        out = model(inputs=batch["inputs"], return_modality_embeddings=True)
    k = config.modality_names.index("spectrum_raman")
    assert out.modality_mask[:, k].tolist() == [i != 3 for i in range(8)]  # the absent spectrum is masked
    assert out.modality_pooler_output[3, k].abs().sum() == 0
    with torch.no_grad():  # sample 3 without its (absent) spectrum at all: the same embedding
        alone = model(inputs={"tabular": {key: v[3:4] for key, v in batch["inputs"]["tabular"].items()}})
    torch.testing.assert_close(out.pooler_output[3:4], alone.pooler_output, rtol=1e-5, atol=1e-6)

    # contrastive pretraining: the spectrum embedder learns from the clip loss
    pretrainer = ContrastivePretrainer(model.train(), loss="clip")
    result = pretrainer(batch["inputs"], patient_id=batch["patient_id"])
    assert torch.isfinite(result["loss"]) and result["loss"] > 0
    result["loss"].backward()
    assert model.embedders["spectrum_raman"].value.weight.grad.abs().sum() > 0

    # finetuning head with labels
    torch.manual_seed(1)
    clf = bp.BioPerceiverForSequenceClassification(config)
    clf.bioperceiver.load_state_dict(model.state_dict())  # finetune the pretrained backbone
    labels = batch["labels"]["label_y"]
    out = clf(inputs=batch["inputs"], labels=labels)
    assert out.logits.shape == (8, 2) and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for n, p in clf.named_parameters() if "spectrum_raman" in n]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    clf.eval()

    # attribution: spectrum tokens are named by their wavenumbers
    attr = attention_attribution(clf, batch, processors=processor)
    frame = attr.to_frame()
    spec_rows = frame[frame["modality"] == "spectrum_raman"]
    assert "s3" not in set(spec_rows["sample"])  # the absent spectrum has no token
    wn = batch["inputs"]["spectrum_raman"]["wavenumbers"]
    for sample, group in spec_rows.groupby("sample"):
        i = int(str(sample)[1:])
        assert list(group["token_label"]) == [f"{w:.0f} cm^-1" for w in wn[i, : len(group)].tolist()]
    assert set(frame["modality"]) == {"spectrum_raman", "tabular"}

    # save / from_pretrained: model and processors, same outputs
    clf.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    proc2 = BioPerceiverProcessor.from_pretrained(tmp_path)
    assert isinstance(proc2.processors["spectrum_raman"], SpectrumProcessor)
    assert proc2.processors["spectrum_raman"].state == processor.processors["spectrum_raman"].state
    batch2 = _batch(manifest, proc2)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(inputs=batch2["inputs"]).logits, clf(inputs=batch["inputs"]).logits)
    backbone = AutoModel.from_pretrained(tmp_path)
    assert isinstance(backbone.embedders["spectrum_raman"], SpectrumEmbedder)
