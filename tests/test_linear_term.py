"""The wide & deep head's linear term (``config.head_linear_modalities``): what it computes from tabular tokens
(masks, absent modalities, categories), its fit against lifelines' Cox model and scikit-learn's logistic
regression, save/load and vocabulary growth, and the finetuning script's use of it (pretrained backbone, linear
probe, reloading a finetuned folder)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config

from bioperceiver.modeling_tasks import (
    AutoModelForSurvival,
    BioPerceiverForSequenceClassification,
    BioPerceiverForSurvival,
)
from bioperceiver.training import configure_finetuning, fit_linear_term

TAB = {"kind": "tabular", "num_features": 5, "num_categories": 6, "num_value_bands": 4}
OMICS = {"kind": "omics", "num_genes": 20}


def _config(**overrides):
    overrides.setdefault("head_linear_modalities", ["tabular_clinical"])
    return tiny_config(modalities={"tabular_clinical": TAB, "omics_expression": OMICS}, **overrides)


def _tabular(x: np.ndarray, mask: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    n, f = x.shape
    out = {
        "feature_ids": torch.arange(f).expand(n, f).clone(),
        "values": torch.as_tensor(x, dtype=torch.float32),
    }
    if mask is not None:
        out["mask"] = torch.as_tensor(mask)
    return out


def test_config_takes_only_tabular_and_omics_modalities_of_the_model():
    assert _config().head_linear_modalities == ["tabular_clinical"]
    both = _config(head_linear_modalities=["tabular_clinical", "omics_expression"]).head_linear_modalities
    assert both == ["omics_expression", "tabular_clinical"]
    text = {"kind": "text", "vocab_size": 50, "max_position_embeddings": 16}
    with pytest.raises(ValueError, match="'text' modality"):
        tiny_config(modalities={"text_note": text, "tabular_clinical": TAB}, head_linear_modalities=["text_note"])
    with pytest.raises(ValueError, match="not a modality of this model"):
        _config(head_linear_modalities=["tabular_labs"])
    assert tiny_config(modalities={"tabular_clinical": TAB}, head_linear_modalities=[]).head_linear_modalities is None


def test_omics_linear_term_is_a_ridge_model_on_the_measured_genes():
    torch.manual_seed(0)
    model = BioPerceiverForSurvival(_config(head_linear_modalities=["omics_expression"])).eval()
    term = model.linear_term
    assert set(term.numeric) == {"omics_expression"} and not len(term.categorical)
    with torch.no_grad():
        term.numeric["omics_expression"].copy_(torch.randn(20, 1))
    w = term.numeric["omics_expression"][:, 0].detach()
    ids = torch.tensor([[3, 7, 11], [3, 7, 0]])
    values = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.25, float("nan")]])  # a padded slot may hold NaN
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    out = term({"omics_expression": {"gene_ids": ids, "values": values, "mask": mask}}, 2, torch.zeros(1))[:, 0]
    expected = torch.stack([0.5 * w[3] - w[7] + 2 * w[11], w[3] + 0.25 * w[7]])
    torch.testing.assert_close(out.detach(), expected)


def test_linear_term_is_a_linear_model_on_the_observed_tokens():
    torch.manual_seed(0)
    model = BioPerceiverForSurvival(_config()).eval()
    term = model.linear_term
    assert all(float(p.detach().abs().sum()) == 0 for p in term.parameters())  # starts as the plain head
    with torch.no_grad():
        term.numeric["tabular_clinical"].copy_(torch.randn(5, 1))
        term.categorical["tabular_clinical"].copy_(torch.randn(6, 1))
    w, c = term.numeric["tabular_clinical"][:, 0].detach(), term.categorical["tabular_clinical"][:, 0].detach()
    x = torch.randn(4, 3)
    arrays = {
        "feature_ids": torch.tensor([[0, 1, 2, 4]] * 4),
        "values": torch.cat([x, torch.zeros(4, 1)], dim=1),
        "category_ids": torch.tensor([[0, 0, 0, 3]] * 4),
        "mask": torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool),
    }
    out = term({"tabular_clinical": arrays}, 4, torch.zeros(1))[:, 0]
    keep = arrays["mask"].float()
    expected = (x * w[:3] * keep[:, :3]).sum(1) + c[3] * keep[:, 3]
    torch.testing.assert_close(out, expected)
    assert float(out[3].detach()) == 0.0  # every token masked: the sample's modality is absent, nothing is added
    # an absent modality adds nothing; padding tokens (masked) change nothing
    assert float(term({}, 4, torch.zeros(1)).detach().abs().sum()) == 0.0
    padded = {k: torch.cat([v, v[:, :1]], dim=1) for k, v in arrays.items()}
    padded["mask"][:, -1] = False
    torch.testing.assert_close(term({"tabular_clinical": padded}, 4, torch.zeros(1))[:, 0], out)
    # the model's risk is the head's output plus the term; the term does not need the other modality
    omics = {"gene_ids": torch.randint(0, 20, (4, 7)), "values": torch.randn(4, 7)}
    with torch.no_grad():
        full = model(tabular_clinical=arrays, omics_expression=omics).risk
        latents = model.bioperceiver(tabular_clinical=arrays, omics_expression=omics).last_hidden_state
        torch.testing.assert_close(full, model.head(latents)[:, 0] + out)


def _cox_data(n=120, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    beta = np.array([0.8, -0.5, 0.0])
    t = rng.exponential(1.0 / np.exp(x @ beta))
    e = (rng.uniform(size=n) < 0.75).astype(float)
    return x, t, e


def test_cox_fit_matches_lifelines():
    import pandas as pd
    from lifelines import CoxPHFitter

    x, t, e = _cox_data()
    torch.manual_seed(0)
    model = BioPerceiverForSurvival(_config())
    labels = torch.tensor(np.stack([t, e], 1), dtype=torch.float32)
    batches = [  # the fit uses every training row at once, whatever the batching
        {"inputs": {"tabular_clinical": _tabular(x[s : s + 50])}, "labels": labels[s : s + 50]} for s in (0, 50, 100)
    ]
    # unpenalised: the maximum partial likelihood (lifelines penalises its internally standardised coefficients)
    fit = fit_linear_term(model, batches, l2=[0.0])
    df = pd.DataFrame(x, columns=["a", "b", "c"]).assign(t=t, e=e)
    ref = CoxPHFitter().fit(df, "t", "e").params_.to_numpy()
    ours = model.linear_term.numeric["tabular_clinical"][:3, 0].detach().numpy()
    np.testing.assert_allclose(ours, ref, atol=2e-3)
    assert fit["nonzero_coefficient_rows"] == 3 and fit["validation"] == {f"{fit['l2']:g}": None}


def test_logistic_fit_matches_scikit_learn_and_puts_the_intercept_in_the_head_bias():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 3))
    y = (rng.uniform(size=200) < 1 / (1 + np.exp(-(0.5 + x @ [1.0, -1.0, 0.3])))).astype(int)
    torch.manual_seed(0)
    model = BioPerceiverForSequenceClassification(_config(num_labels=1, problem_type="multi_label_classification"))
    bias_before = model.head.net[-1].bias.detach().clone()
    l2 = 0.05
    batch = {"inputs": {"tabular_clinical": _tabular(x)}, "labels": torch.tensor(y[:, None], dtype=torch.float32)}
    fit_linear_term(model, [batch], l2=[l2])
    # scikit-learn: 1/2 ||w||^2 + C sum(loss), intercept unpenalised == mean loss + l2/2 ||w||^2 with C = 1/(l2 n)
    ref = LogisticRegression(C=1 / (l2 * len(y)), tol=1e-10, max_iter=1000).fit(x, y)
    ours = model.linear_term.numeric["tabular_clinical"][:3, 0].detach().numpy()
    np.testing.assert_allclose(ours, ref.coef_[0], atol=2e-3)
    bias = model.head.net[-1].bias.detach() - bias_before
    np.testing.assert_allclose(bias.numpy(), ref.intercept_, atol=2e-3)


def test_penalty_is_chosen_on_validation_and_never_on_test():
    x, t, e = _cox_data(n=160, seed=2)
    x = np.concatenate([x, np.random.default_rng(3).normal(size=(160, 2))], axis=1)  # 2 pure-noise features
    labels = torch.tensor(np.stack([t, e], 1), dtype=torch.float32)
    train = [{"inputs": {"tabular_clinical": _tabular(x[:100])}, "labels": labels[:100]}]
    val = [{"inputs": {"tabular_clinical": _tabular(x[100:])}, "labels": labels[100:]}]
    seen = []

    def score(outputs, y):
        seen.append(len(y))
        return -float(((outputs[:, 0] - outputs[:, 0].mean()) ** 2).mean())  # prefers the most shrunken fit

    model = BioPerceiverForSurvival(_config())
    fit = fit_linear_term(model, train, val, l2=[0.01, 1.0, 100.0], score=score)
    assert fit["l2"] == 100.0 and seen == [60, 60, 60] and set(fit["validation"]) == {"0.01", "1", "100"}
    # the kept coefficients are those of the chosen penalty (small), not the last or the first fit's
    assert float(model.linear_term.numeric["tabular_clinical"].detach().abs().max()) < 0.1


def _two_block_cox(n=150, seed=0):
    """3 clinical covariates with strong effects and 4 genes with weak ones, standardised (ddof 1, as lifelines
    standardises internally, so its penalised coefficients are on the same scale as ours)."""
    rng = np.random.default_rng(seed)
    xt, xo = rng.normal(size=(n, 3)), rng.normal(size=(n, 4))
    t = rng.exponential(1.0 / np.exp(xt @ [0.8, -0.5, 0.3] + 0.2 * xo[:, 0]))
    e = (rng.uniform(size=n) < 0.8).astype(float)
    xt, xo = ((x - x.mean(0)) / x.std(0, ddof=1) for x in (xt, xo))
    omics = {"gene_ids": torch.arange(4).expand(n, 4).clone(), "values": torch.tensor(xo, dtype=torch.float32)}
    labels = torch.tensor(np.stack([t, e], 1), dtype=torch.float32)
    batch = {"inputs": {"tabular_clinical": _tabular(xt), "omics_expression": omics}, "labels": labels}
    return batch, np.concatenate([xt, xo], 1), t, e


def test_per_modality_penalties_match_lifelines_and_try_every_combination():
    import pandas as pd
    from lifelines import CoxPHFitter

    batch, x, t, e = _two_block_cox()
    df = pd.DataFrame(x, columns=[f"x{i}" for i in range(7)]).assign(time=t, event=e)
    grid = [0.05, 0.5]
    combos = [(om, tab) for om in grid for tab in grid]  # modalities in config order: omics, then tabular
    for k, (om, tab) in enumerate(combos):
        calls = []

        def pick_kth(outputs, y, k=k, calls=calls):  # a validation score that prefers the k-th candidate only
            calls.append(len(y))
            return 1.0 if len(calls) == k + 1 else 0.0

        torch.manual_seed(0)
        model = BioPerceiverForSurvival(_config(head_linear_modalities=["tabular_clinical", "omics_expression"]))
        fit = fit_linear_term(model, [batch], [batch], l2=grid, per_modality=True, score=pick_kth)
        assert len(calls) == 4 and fit["per_modality"] and len(fit["validation"]) == 4
        assert fit["l2"] == {"omics_expression": om, "tabular_clinical": tab}
        term = model.linear_term.numeric
        ours = np.concatenate([term["tabular_clinical"][:3, 0].detach(), term["omics_expression"][:4, 0].detach()])
        # the Cox loss is the partial likelihood per event, lifelines' per sample: penalty l2 <-> l2 * events / n
        rate = e.sum() / len(e)
        ref = CoxPHFitter(penalizer=np.array([tab * rate] * 3 + [om * rate] * 4)).fit(df, "time", "event")
        np.testing.assert_allclose(ours, ref.params_.to_numpy(), atol=1e-3)  # float32 L-BFGS


def test_per_modality_choice_is_at_least_the_shared_one_and_the_term_alone_is_reported():
    from lifelines.utils import concordance_index

    batch, _, _, _ = _two_block_cox(n=90, seed=4)
    train = {"inputs": {m: {k: v[:60] for k, v in a.items()} for m, a in batch["inputs"].items()}}
    val = {"inputs": {m: {k: v[60:] for k, v in a.items()} for m, a in batch["inputs"].items()}}
    train["labels"], val["labels"] = batch["labels"][:60], batch["labels"][60:]

    def c_index(outputs, y):
        return concordance_index(y[:, 0].numpy(), -outputs[:, 0].numpy(), y[:, 1].numpy())

    grid = [0.01, 1.0, 100.0]
    fits = {}
    for per_modality in (False, True):
        model = BioPerceiverForSurvival(_config(head_linear_modalities=["tabular_clinical", "omics_expression"]))
        fits[per_modality] = fit_linear_term(
            model, [train], [val], l2=grid, per_modality=per_modality, score=c_index, also_score={"test": [val]}
        )
        fit = fits[per_modality]
        # the kept coefficients are the chosen candidate's: the term alone scores its validation value again
        assert fit["term_alone"]["test"] == pytest.approx(max(fit["validation"].values()), abs=1e-9)
    shared, per = fits[False], fits[True]
    assert len(shared["validation"]) == 3 and len(per["validation"]) == 9
    # the product grid holds the shared grid's diagonal, fitted to the same coefficients
    for x in grid:
        diagonal = per["validation"][f"omics_expression={x:g},tabular_clinical={x:g}"]
        assert diagonal == pytest.approx(shared["validation"][f"{x:g}"], abs=1e-6)
    assert max(per["validation"].values()) >= max(shared["validation"].values())
    # one modality: nothing to split, the shared grid
    model = BioPerceiverForSurvival(_config())
    single = fit_linear_term(model, [train], [val], l2=grid, per_modality=True, score=c_index)
    assert not single["per_modality"] and isinstance(single["l2"], float) and len(single["validation"]) == 3


def test_save_load_vocabulary_growth_and_trainability(tmp_path):
    torch.manual_seed(0)
    model = BioPerceiverForSurvival(_config())
    with torch.no_grad():
        model.linear_term.numeric["tabular_clinical"].copy_(torch.randn(5, 1))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSurvival.from_pretrained(tmp_path)
    assert loaded.config.head_linear_modalities == ["tabular_clinical"]
    torch.testing.assert_close(
        loaded.linear_term.numeric["tabular_clinical"], model.linear_term.numeric["tabular_clinical"]
    )
    # a pretrained backbone without the term: the term is new and starts at zero (not uninitialised memory)
    backbone_dir = tmp_path / "backbone"
    BioPerceiverForSurvival(
        tiny_config(modalities={"tabular_clinical": TAB, "omics_expression": OMICS})
    ).save_pretrained(backbone_dir)
    fresh = BioPerceiverForSurvival.from_pretrained(backbone_dir, head_linear_modalities=["tabular_clinical"])
    assert float(fresh.linear_term.numeric["tabular_clinical"].detach().abs().sum()) == 0.0
    # vocabulary growth keeps the fitted rows and adds zero rows
    old = loaded.linear_term.numeric["tabular_clinical"].detach().clone()
    loaded.resize_modality_vocabularies({"tabular_clinical": {**TAB, "num_features": 8}})
    grown = loaded.linear_term.numeric["tabular_clinical"]
    assert grown.shape == (8, 1) and float(grown[5:].detach().abs().sum()) == 0.0
    torch.testing.assert_close(grown[:5], old)
    # a linear probe trains the head and the term, not the backbone
    probe = configure_finetuning(loaded, "linear_probe")
    assert all(p.requires_grad for p in probe.linear_term.parameters())
    assert not any(p.requires_grad for p in probe.bioperceiver.parameters())


def test_precomputed_latents_take_only_the_linear_term_s_modalities():
    torch.manual_seed(0)
    model = BioPerceiverForSurvival(_config()).eval()
    tab = _tabular(np.ones((2, 3)))
    latents = torch.randn(2, model.config.num_latents, model.config.d_latents)
    with torch.no_grad():
        with_term = model(latents=latents, tabular_clinical=tab).risk
        absent = model(latents=latents, tabular_clinical=None).risk
    torch.testing.assert_close(with_term, absent)  # the term is still zero
    with pytest.raises(ValueError, match="omics_expression"):
        model(latents=latents, tabular_clinical=tab, omics_expression={"gene_ids": torch.zeros(2, 1).long()})
    with pytest.raises(ValueError, match="pass their modality inputs"):
        model(latents=latents)
    plain = BioPerceiverForSurvival(tiny_config(modalities={"tabular_clinical": TAB, "omics_expression": OMICS}))
    with pytest.raises(ValueError, match="not both"):
        plain(latents=latents, tabular_clinical=tab)
