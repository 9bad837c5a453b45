"""bioperceiver.interpret: attribution, rollout, integrated gradients, modality Shapley values, deletion check,
mapping to words/genes/features/pixels and PNG figures, on tiny CPU models.

Whatever can be computed through another path is: attention scores against the model's own ``cross_attentions``,
Shapley values against a brute-force permutation average over models run on dropped-modality ``inputs``, metric
drops and deletions against the model called on edited masks.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import random_batch, tiny_config
from PIL import Image

import bioperceiver as bp
from bioperceiver.data import OmicsProcessor, TabularProcessor, TextProcessor
from bioperceiver.interpret import (
    attention_attribution,
    attention_rollout,
    deletion_test,
    explain_sample,
    gene_ranking,
    image_heatmap,
    integrated_gradients,
    modality_metric_drop,
    modality_shapley,
    plot_modality_shapley,
    shapley_from_coalitions,
    signal_matrix,
    tabular_features,
    text_words,
)
from bioperceiver.interpret._core import embed, forward_score

NUM_LABELS = 3


def classifier(config) -> bp.BioPerceiverForSequenceClassification:
    torch.manual_seed(0)
    return bp.BioPerceiverForSequenceClassification(config).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU they lose a lot; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def config():
    return tiny_config(num_labels=NUM_LABELS)


@pytest.fixture(scope="module")
def model(config):
    return classifier(config)


@pytest.fixture
def batch(config):
    """All six modality kinds, ragged, with extra dropped tokens and absent modalities:
    sample 0: text token 2 masked, signal's last time patch empty, no omics;
    sample 1: no 2D image, tabular field 1 masked; sample 2: omics tokens 7.. masked."""
    b = random_batch(config)
    b["text"]["attention_mask"][0, 2] = 0
    b["image_cxr"]["present"] = torch.tensor([True, False, True])
    b["omics"]["mask"][0] = False
    b["tabular"]["mask"] = torch.ones(3, 5, dtype=torch.bool)
    b["tabular"]["mask"][1, 1] = False
    return b


def dropped(model, batch) -> dict[str, torch.Tensor]:
    emb = embed(model, batch)
    return {n: ~k for n, k in emb.keep.items()}


def logit(model, inputs, target: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs=inputs).logits.gather(1, target[:, None]).squeeze(1).double()


# ---- attention and rollout ------------------------------------------------------------------------------------------
def test_rollout_is_the_product_of_residual_attention_and_row_stochastic():
    g = torch.Generator().manual_seed(1)
    layers = [torch.rand(2, 3, 5, 5, generator=g).softmax(dim=-1) for _ in range(3)]
    rollout = attention_rollout(layers)
    expected = torch.eye(5).expand(2, 5, 5)
    for a in layers:
        expected = (0.5 * a.mean(1) + 0.5 * torch.eye(5)) @ expected
    torch.testing.assert_close(rollout, expected)
    for r in (rollout, attention_rollout(layers, residual=False)):
        torch.testing.assert_close(r.sum(-1), torch.ones(2, 5))
        assert (r >= 0).all()


def test_rollout_rows_sum_to_one_on_the_model(model, batch):
    out = model.bioperceiver(inputs=batch, output_attentions=True)
    rollout = attention_rollout(out.attentions)
    assert rollout.shape == (3, model.config.num_latents, model.config.num_latents)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(3, model.config.num_latents))


def test_uniform_attention_matches_the_models_cross_attention(model, batch):
    attr = attention_attribution(model, batch, latent_weighting="uniform")
    out = model.bioperceiver(inputs=batch, output_attentions=True)
    expected = out.cross_attentions[0].mean(dim=(1, 2))  # (B, N): heads and latents averaged
    names = model.config.modality_names
    for k, name in enumerate(names):
        torch.testing.assert_close(attr.scores[name], expected[:, out.token_modality == k])
    assert attr.method == "attention"


@pytest.mark.parametrize("weighting", ["uniform", "rollout"])
def test_attention_scores_are_a_distribution_and_exactly_zero_on_dropped_tokens(model, batch, weighting):
    attr = attention_attribution(model, batch, latent_weighting=weighting)
    total = attr.modality_totals().sum(dim=1)
    torch.testing.assert_close(total, torch.ones(3))
    for name, drop in dropped(model, batch).items():
        assert (attr.scores[name][drop] == 0).all(), name
        assert (attr.scores[name][~drop] > 0).all(), name
    assert attr.scores["text"][0, 2] == 0 and attr.scores["tabular"][1, 1] == 0
    assert (attr.scores["image_cxr"][1] == 0).all() and (attr.scores["omics"][0] == 0).all()
    frame = attr.to_frame()
    assert list(frame.columns) == ["sample", "modality", "token_index", "token_label", "score"]
    assert len(frame) == sum(int(k.sum()) for k in attr.keep.values())  # kept tokens only
    assert not ((frame["modality"] == "omics") & (frame["sample"] == 0)).any()
    np.testing.assert_allclose(frame.groupby("sample")["score"].sum().to_numpy(), 1.0, rtol=1e-5)
    shares = attr.modality_frame().groupby("sample")["share"].sum().to_numpy()
    np.testing.assert_allclose(shares, 1.0, rtol=1e-6)


def test_rollout_attribution_is_the_rolled_out_latent_weights_times_cross_attention(batch):
    config = tiny_config(num_labels=NUM_LABELS, initializer_range=0.5)  # sharp, non-uniform attention
    model = classifier(config)
    rollout = attention_attribution(model, batch, latent_weighting="rollout")
    out = model.bioperceiver(inputs=batch, output_attentions=True)
    m = config.num_latents
    weights = torch.full((3, 1, m), 1.0 / m) @ attention_rollout(out.attentions)  # (B, 1, M)
    expected = (weights @ out.cross_attentions[0].mean(1)).squeeze(1)  # (B, N)
    for k, name in enumerate(config.modality_names):
        torch.testing.assert_close(rollout.scores[name], expected[:, out.token_modality == k])
    uniform = attention_attribution(model, batch, latent_weighting="uniform")
    assert not torch.allclose(uniform.scores["text"], rollout.scores["text"], rtol=1e-3, atol=1e-4)


# ---- integrated gradients -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("baseline", ["zero", "type"])
def test_integrated_gradients_completeness_and_zero_on_dropped_tokens(model, batch, baseline):
    attr = integrated_gradients(model, batch, target=1, n_steps=24, baseline=baseline)
    emb = embed(model, batch)
    target = torch.full((3,), 1)
    f_x = logit(model, batch, target)  # the model's own forward pass
    base = {n: emb.tokens[n].clone() for n in emb.names}
    for n in emb.names:
        if baseline == "zero":
            base[n].zero_()
        else:
            base[n] = torch.where(emb.keep[n][..., None], model.bioperceiver.embedders[n].type_embedding, 0.0)
    with torch.no_grad():
        f_base = forward_score(model, base, emb.keep, target).double()
    total = attr.modality_totals().double().sum(dim=1)
    torch.testing.assert_close(total, f_x - f_base, atol=2e-4, rtol=1e-2)
    assert attr.delta.abs().max() < 2e-4 + 1e-2 * (f_x - f_base).abs().max()
    for name, drop in dropped(model, batch).items():
        assert (attr.scores[name][drop] == 0).all(), name
    assert (attr.scores["text"][~dropped(model, batch)["text"]] != 0).any()


def test_integrated_gradients_default_target_is_the_predicted_class_and_survival_risk(config, batch):
    model = classifier(config)
    attr = integrated_gradients(model, batch, n_steps=8)
    with torch.no_grad():
        torch.testing.assert_close(attr.target, model(inputs=batch).logits.argmax(1))
    torch.manual_seed(0)
    surv = bp.BioPerceiverForSurvival(tiny_config()).eval()
    attr = integrated_gradients(surv, batch, n_steps=24)
    with torch.no_grad():
        risk = surv(inputs=batch).risk.double()
        emb = embed(surv, batch)
        zero = {n: torch.zeros_like(t) for n, t in emb.tokens.items()}
        f_base = forward_score(surv, zero, emb.keep, torch.zeros(3, dtype=torch.long)).double()
    torch.testing.assert_close(attr.modality_totals().double().sum(1), risk - f_base, atol=2e-4, rtol=1e-2)


# ---- Shapley values --------------------------------------------------------------------------------------------------
def brute_force_shapley(model, inputs, names, target, empty) -> torch.Tensor:
    """Average marginal contribution over all orderings, the model called on ``inputs`` restricted to a subset."""

    def value(subset) -> torch.Tensor:
        if not subset:
            return torch.full((3,), float(empty), dtype=torch.float64)
        return logit(model, {n: inputs[n] for n in subset}, target)

    phi = torch.zeros(3, len(names), dtype=torch.float64)
    orders = list(itertools.permutations(names))
    for order in orders:
        for i, name in enumerate(order):
            phi[:, names.index(name)] += value(order[: i + 1]) - value(order[:i])
    return phi / len(orders)


def test_exact_shapley_equals_brute_force_permutations_on_three_modalities():
    modalities = {k: v for k, v in tiny_config().modalities.items() if k in ("image_cxr", "omics", "text")}
    config = tiny_config(num_labels=NUM_LABELS, modalities=modalities)
    model = classifier(config)
    inputs = random_batch(config, seed=3)
    target = torch.tensor([0, 2, 1])
    result = modality_shapley(model, inputs, target=target, empty_value=-0.25)
    expected = brute_force_shapley(model, inputs, result.names, target, -0.25)
    torch.testing.assert_close(result.values, expected, atol=1e-5, rtol=1e-4)
    assert result.names == ["image_cxr", "omics", "text"]


def test_shapley_efficiency_and_null_player_for_missing_modalities(model, batch):
    empty = torch.tensor([0.1, -0.2, 0.3])
    result = modality_shapley(model, batch, empty_value=empty)
    with torch.no_grad():
        full = logit(model, batch, model(inputs=batch).logits.argmax(1))
    torch.testing.assert_close(result.full, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.empty, empty.double())
    torch.testing.assert_close(result.values.sum(1), result.full - result.empty, atol=1e-10, rtol=1e-10)
    k_omics, k_cxr = result.names.index("omics"), result.names.index("image_cxr")
    assert result.values[0, k_omics] == 0 and result.values[1, k_cxr] == 0  # samples without them
    assert not result.present[0, k_omics] and not result.present[1, k_cxr]
    assert (result.values[result.present] != 0).all()
    summary = result.summary().set_index("modality")
    assert summary.loc["omics", "n_samples"] == 2
    assert summary.loc["omics", "mean_shapley"] == pytest.approx(float(result.values[1:, k_omics].mean()))
    frame = result.to_frame()
    assert len(frame) == 3 * len(result.names) and set(frame.columns) >= {"sample", "modality", "shapley"}


def test_shapley_symmetry_for_two_identical_modalities():
    omics = tiny_config().modalities["omics"]
    config = tiny_config(
        num_labels=2, modalities={"omics_a": omics, "omics_b": omics, "text": {**tiny_config().modalities["text"]}}
    )
    model = classifier(config)
    model.bioperceiver.embedders["omics_b"].load_state_dict(model.bioperceiver.embedders["omics_a"].state_dict())
    inputs = random_batch(config, seed=5)
    inputs["omics_b"] = {k: v.clone() for k, v in inputs["omics_a"].items()}
    result = modality_shapley(model, inputs, target=1)
    a, b, t = (result.names.index(n) for n in ("omics_a", "omics_b", "text"))
    torch.testing.assert_close(result.values[:, a], result.values[:, b], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(result.values[:, a], result.values[:, t])


def test_shapley_from_coalitions_on_a_known_game():
    # v(S) = sum of weights + a pairwise bonus shared equally: phi = weight + bonus / 2 for the pair
    w = torch.tensor([1.0, 2.0, 4.0])
    coalitions = torch.tensor(
        [[float(sum(w[k] for k in range(3) if s >> k & 1) + (3.0 if s & 3 == 3 else 0.0)) for s in range(8)]]
    )
    torch.testing.assert_close(
        shapley_from_coalitions(coalitions), torch.tensor([[2.5, 3.5, 4.0]], dtype=torch.float64)
    )


def test_modality_metric_drop_matches_the_model_without_each_modality(model, config):
    batches = [random_batch(config, seed=s) for s in (0, 1)]
    labels = [torch.tensor([0, 1, 2]), torch.tensor([2, 2, 0])]

    def nll(logits, y):  # higher is better
        logp = torch.log_softmax(torch.as_tensor(logits), dim=1)
        return float(logp[torch.arange(len(y)), torch.as_tensor(y)].mean())

    frame = modality_metric_drop(model, [{"inputs": b, "labels": y} for b, y in zip(batches, labels)], nll)
    y = torch.cat(labels)
    with torch.no_grad():
        full = torch.cat([model(inputs=b).logits for b in batches])
        assert frame["metric_full"].iloc[0] == pytest.approx(nll(full, y), abs=1e-6)
        for _, row in frame.iterrows():
            without = torch.cat(
                [model(inputs={n: a for n, a in b.items() if n != row["modality"]}).logits for b in batches]
            )
            assert row["metric_without"] == pytest.approx(nll(without, y), abs=1e-5)
            assert row["drop"] == pytest.approx(row["metric_full"] - row["metric_without"])
    assert (frame["n_with"] == 6).all() and (frame["n_only"] == 0).all()


# ---- faithfulness ----------------------------------------------------------------------------------------------------
def test_deletion_test_reports_top_and_random_drops(model, batch):
    attr = integrated_gradients(model, batch, target=0, n_steps=8)
    frame = deletion_test(model, batch, attr, k=(1, 3), n_random=4, seed=7)
    assert list(frame["k"]) == [1, 3] and (frame["n_random"] == 4).all()
    assert np.isfinite(frame[["drop_top", "drop_random", "drop_random_std"]].to_numpy()).all()
    again = deletion_test(model, batch, attr, k=(1, 3), n_random=4, seed=7)
    np.testing.assert_array_equal(frame.to_numpy(), again.to_numpy())  # seeded random draws

    # k=1 on text alone, recomputed by masking the top text token in the inputs and calling the model
    text_only = deletion_test(model, batch, attr, k=1, n_random=2, modalities=["text"])
    edited = {n: dict(a) for n, a in batch.items()}
    mask = batch["text"]["attention_mask"].clone()
    top = attr.scores["text"].masked_fill(~attr.keep["text"], float("-inf")).argmax(1)
    mask[torch.arange(3), top] = 0
    edited["text"]["attention_mask"] = mask
    target = torch.zeros(3, dtype=torch.long)
    expected = float((logit(model, batch, target) - logit(model, edited, target)).mean())
    assert text_only["drop_top"].iloc[0] == pytest.approx(expected, abs=1e-6)


def test_deletion_keeps_one_token_per_sample():
    modalities = {"text": tiny_config().modalities["text"]}
    config = tiny_config(num_labels=2, modalities=modalities)
    model = classifier(config)
    inputs = random_batch(config)
    attr = attention_attribution(model, inputs)
    frame = deletion_test(model, inputs, attr, k=100, n_random=2)
    kept = inputs["text"]["attention_mask"].sum(1).double()
    assert frame["mean_k"].iloc[0] == pytest.approx(float((kept - 1).mean()))


# ---- mapping to words, genes, features, pixels -----------------------------------------------------------------------
NOTES = [
    "Bilateral infiltrates with small effusion.",
    "No acute cardiopulmonary abnormality.",
    "Cardiomegaly and bilateral effusions.",
]


@pytest.mark.parametrize("tokenizer_model", ["wordpiece", "bpe"])
def test_text_ids_map_back_to_words(tokenizer_model):
    vocab = 90 if tokenizer_model == "wordpiece" else 300  # byte-level BPE starts from 256 bytes + specials
    proc = TextProcessor("note", model=tokenizer_model, vocab_size=vocab, min_frequency=1, max_length=32).fit(NOTES)
    encoded = [proc(n)["input_ids"] for n in NOTES]
    length = max(len(e) for e in encoded)
    ids = torch.zeros(3, length, dtype=torch.long)
    mask = torch.zeros(3, length, dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = torch.as_tensor(e)
        mask[i, : len(e)] = 1
    config = tiny_config(num_labels=2, modalities={"note": proc.model_settings()})
    model = classifier(config)
    attr = attention_attribution(model, {"note": {"input_ids": ids, "attention_mask": mask}}, processors={"note": proc})
    words = text_words(attr, 0)
    # WordPiece splits punctuation into its own word; byte-level BPE words start at a space ("Ġ")
    tail = ["effusion", "."] if tokenizer_model == "wordpiece" else ["effusion."]
    assert words["word"].tolist() == ["[CLS]", "bilateral", "infiltrates", "with", "small", *tail, "[SEP]"]
    assert any(len(t) > 1 for t in words["token_indices"])  # word pieces were merged
    scores = attr.scores["note"][0]
    for _, row in words.iterrows():
        assert row["score"] == pytest.approx(float(scores[row["token_indices"]].sum()))
    assert words["score"].sum() == pytest.approx(float(scores.sum()))
    labels = attr.to_frame().query("sample == 1")["token_label"].tolist()
    assert labels[0] == "[CLS]" and labels[-1] == "[SEP]"


def test_genes_features_pixels_and_signal_are_named_and_shaped(model, batch):
    genes = OmicsProcessor("omics", normalization="none").fit([{f"G{i:02d}": 1.0 for i in range(64)}])
    rows = [{"age": 50.0 + i, "sex": "F" if i % 2 else "M"} for i in range(16)]
    rows += [{f"lab{i}": float(i)} for i in range(14)]
    tab = TabularProcessor("tabular").fit(rows)
    batch["tabular"]["feature_ids"][2, 0] = 0  # "age", numeric
    batch["tabular"]["category_ids"][2, 0] = 0
    attr = integrated_gradients(model, batch, n_steps=8, processors={"omics": genes, "tabular": tab})

    ranked = gene_ranking(attr, 1)
    ids = batch["omics"]["gene_ids"][1].tolist()
    assert set(ranked["gene"]) == {f"G{i:02d}" for i in ids}
    assert ranked["score"].abs().is_monotonic_decreasing
    assert gene_ranking(attr, 0).empty  # sample 0 has no omics

    feats = tabular_features(attr, 2)
    fid = batch["tabular"]["feature_ids"][2]
    assert len(feats) == 5 and set(feats["feature"]) == {tab.feature_names[i] for i in fid.tolist()}
    age = tab.state["features"][0]
    assert age["name"] == "age"
    value = float(batch["tabular"]["values"][2, 0]) * age["scale"] + age["center"]
    assert f"{value:.4g}" in feats.loc[feats["feature"] == "age", "value"].tolist()
    assert len(tabular_features(attr, 1)) == 4  # field 1 masked

    heat = image_heatmap(attr, 0, "image_cxr")
    assert heat.shape == (16, 24)
    np.testing.assert_allclose(heat[::8, ::8], attr.scores["image_cxr"][0].double().view(2, 3).numpy())
    assert (image_heatmap(attr, 1, "image_cxr") == 0).all()
    vol = image_heatmap(attr, 2, "image_ct")
    assert vol.shape == (8, 8, 12)
    np.testing.assert_allclose(vol[::4, ::4, ::4].ravel(), attr.scores["image_ct"][2].double().numpy())

    matrix, channels, starts = signal_matrix(attr, 0)
    assert matrix.shape == (3, math.ceil(21 / 8)) and len(channels) == 3
    assert (matrix[:, 2] == 0).all()  # sample 0's last patch has no valid samples
    np.testing.assert_allclose(starts, [0.0, 8 / 50, 16 / 50])


# ---- figures ---------------------------------------------------------------------------------------------------------
def _is_png(path) -> bool:
    with open(path, "rb") as fh:
        if fh.read(8) != b"\x89PNG\r\n\x1a\n":
            return False
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        return img.size[0] > 50 and img.size[1] > 50


def test_figures_are_written_as_pngs(model, batch, tmp_path):
    proc = TextProcessor("text", vocab_size=100, min_frequency=1).fit(NOTES)
    attr = integrated_gradients(model, batch, n_steps=8, processors={"text": proc})
    shapley = modality_shapley(model, batch)
    written = explain_sample(attr, 2, tmp_path, shapley=shapley, prefix="patient/2")
    assert set(written) == {*model.config.modality_names, "shapley"}
    for path in written.values():
        assert path.parent == tmp_path and path.name.startswith("patient_2_") and _is_png(path)
    partial = explain_sample(attention_attribution(model, batch), 1, tmp_path / "s1")
    assert "image_cxr" not in partial and "omics" in partial  # sample 1 has no 2D image
    assert _is_png(plot_modality_shapley(shapley, tmp_path / "mean.png"))
