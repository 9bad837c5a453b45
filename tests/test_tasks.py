"""Task models: losses equal the reference formulas per problem type, a pretrained backbone loads under the head,
Auto classes round-trip, cached latents equal the full forward, and any modality subset works."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_batch, tiny_config
from transformers import AutoModel, AutoModelForSequenceClassification

import bioperceiver as bp
from bioperceiver import AutoModelForSurvival, BioPerceiverForSequenceClassification, BioPerceiverForSurvival
from bioperceiver.losses.survival import cox_ph_loss, discrete_time_nll, discretize
from bioperceiver.modeling_tasks import QueryHead


def _model(cls, **overrides):
    torch.manual_seed(0)
    return cls(tiny_config(**overrides)).eval()


@pytest.mark.parametrize("head_type", ["pooled", "query"])
def test_classification_losses_match_reference(head_type):
    batch = random_batch(tiny_config(), batch_size=4)
    cases = [
        ("single_label_classification", 2, torch.tensor([0, 1, 1, 0])),
        ("single_label_classification", 3, torch.tensor([2, 0, 1, 2])),
        ("multi_label_classification", 3, torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]]).float()),
        ("regression", 1, torch.tensor([0.5, -1.0, 2.0, 0.0])),
    ]
    for problem_type, n, labels in cases:
        model = _model(
            BioPerceiverForSequenceClassification,
            num_labels=n,
            problem_type=problem_type,
            head_type=head_type,
            head_hidden_size=16,
        )
        out = model(inputs=batch, labels=labels)
        assert out.logits.shape == (4, n)
        if problem_type == "single_label_classification":
            ref = F.cross_entropy(out.logits, labels)
        elif problem_type == "multi_label_classification":
            ref = F.binary_cross_entropy_with_logits(out.logits, labels)
        else:
            ref = F.mse_loss(out.logits[:, 0], labels)
        torch.testing.assert_close(out.loss, ref)
        out.loss.backward()
        assert all(p.grad is not None for p in model.head.parameters())


def test_problem_type_is_inferred_like_transformers():
    batch = random_batch(tiny_config(), batch_size=2)
    assert _model(BioPerceiverForSequenceClassification, num_labels=1)(inputs=batch, labels=torch.tensor([0.3, 1.0]))
    m = _model(BioPerceiverForSequenceClassification, num_labels=3)
    m(inputs=batch, labels=torch.tensor([0, 2]))
    assert m.config.problem_type == "single_label_classification"
    m = _model(BioPerceiverForSequenceClassification, num_labels=3)
    m(inputs=batch, labels=torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]))
    assert m.config.problem_type == "multi_label_classification"
    with pytest.raises(ValueError, match="out of range"):
        _model(BioPerceiverForSequenceClassification, num_labels=2)(inputs=batch, labels=torch.tensor([0, 5]))


def test_unknown_labels_are_left_out_of_the_loss():
    batch = random_batch(tiny_config(), batch_size=3)
    m = _model(BioPerceiverForSequenceClassification, num_labels=2, problem_type="multi_label_classification")
    labels = torch.tensor([[1.0, -1.0], [0.0, 1.0], [-1.0, -1.0]])
    out = m(inputs=batch, labels=labels)
    keep = labels >= 0
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits[keep], labels[keep]))
    m = _model(BioPerceiverForSequenceClassification, num_labels=1, problem_type="regression")
    out = m(inputs=batch, labels=torch.tensor([1.0, float("nan"), 2.0]))
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits[[0, 2], 0], torch.tensor([1.0, 2.0])))


def test_survival_heads_use_the_survival_losses():
    batch = random_batch(tiny_config(), batch_size=5)
    labels = torch.tensor([[5.0, 1], [3.0, 0], [3.0, 1], [8.0, 1], [1.0, 0]])
    for ties in ("efron", "breslow"):
        m = _model(BioPerceiverForSurvival, survival_ties=ties)
        out = m(inputs=batch, labels=labels)
        assert out.risk.shape == (5,) and out.survival is None
        torch.testing.assert_close(out.loss, cox_ph_loss(out.risk, labels[:, 0], labels[:, 1], ties=ties))
    bins = [2.0, 4.0, 6.0]
    m = _model(BioPerceiverForSurvival, survival_loss="discrete", survival_time_bins=bins, head_type="query")
    out = m(inputs=batch, labels=labels)
    assert out.logits.shape == (5, 4) and out.survival.shape == (5, 4)
    assert (out.survival[:, 1:] <= out.survival[:, :-1] + 1e-7).all()  # S(t) never increases
    ref = discrete_time_nll(out.logits, discretize(labels[:, 0], torch.tensor(bins)), labels[:, 1])
    torch.testing.assert_close(out.loss, ref)
    with pytest.raises(ValueError, match="survival_time_bins"):
        BioPerceiverForSurvival(tiny_config(survival_loss="discrete"))
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        _model(BioPerceiverForSurvival)(inputs=batch, labels=labels[:, 0])


def test_pretrained_backbone_loads_under_a_head_and_auto_classes_round_trip(tmp_path):
    torch.manual_seed(0)
    backbone = bp.BioPerceiverModel(tiny_config())
    backbone.save_pretrained(tmp_path / "backbone")
    clf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "backbone", num_labels=3)
    assert isinstance(clf, BioPerceiverForSequenceClassification)
    for name, p in backbone.state_dict().items():
        torch.testing.assert_close(clf.bioperceiver.state_dict()[name], p, msg=name)
    surv = AutoModelForSurvival.from_pretrained(tmp_path / "backbone")
    assert isinstance(surv, BioPerceiverForSurvival)
    torch.testing.assert_close(surv.bioperceiver.encoder.latents, backbone.encoder.latents)

    batch = random_batch(tiny_config(), batch_size=2)
    for model, auto in ((clf, AutoModelForSequenceClassification), (surv, AutoModelForSurvival)):
        model.eval()
        model.save_pretrained(tmp_path / type(model).__name__)
        again = auto.from_pretrained(tmp_path / type(model).__name__).eval()
        with torch.no_grad():
            torch.testing.assert_close(again(inputs=batch).logits, model(inputs=batch).logits)
        # the finetuned folder still loads as a plain backbone (AutoModel)
        base = AutoModel.from_pretrained(tmp_path / type(model).__name__)
        torch.testing.assert_close(base.encoder.latents, model.bioperceiver.encoder.latents)


def test_cached_latents_equal_the_full_forward_and_any_subset_works():
    m = _model(BioPerceiverForSequenceClassification, num_labels=2)
    batch = random_batch(tiny_config(), batch_size=3)
    with torch.no_grad():
        full = m(inputs=batch)
        latents = m.bioperceiver(inputs=batch).last_hidden_state
        cached = m(latents=latents)
        torch.testing.assert_close(cached.logits, full.logits)
        for name in batch:
            sub = {k: v for k, v in batch.items() if k != name}
            assert torch.isfinite(m(inputs=sub).logits).all()
        one = {name: copy.deepcopy(batch[name]) for name in list(batch)[:1]}
        assert m(inputs=one).modality_mask.sum(1).tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="either"):
        m(inputs=batch, latents=latents)


def test_head_config_is_validated():
    for bad in (
        {"head_type": "mlp"},
        {"head_hidden_size": -1},
        {"survival_ties": "exact"},
        {"survival_time_bins": [3.0, 1.0]},
        {"head_dropout": 1.5},
    ):
        with pytest.raises(ValueError):
            tiny_config(**bad)


def test_finetuning_modes_train_what_they_say():
    from bioperceiver.training import configure_finetuning

    m = configure_finetuning(_model(BioPerceiverForSequenceClassification, num_labels=2), "linear_probe")
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {
        n for n, _ in m.named_parameters() if n.startswith("head.")
    }
    m = configure_finetuning(_model(BioPerceiverForSequenceClassification, num_labels=2), "partial")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    last = len(m.bioperceiver.encoder.self_layers) - 1
    assert any(n.startswith(f"bioperceiver.encoder.self_layers.{last}.") for n in trainable)
    assert not any(n.startswith("bioperceiver.embedders.") or ".cross_layers." in n for n in trainable)
    with pytest.raises(ValueError, match="self-attention layers"):
        configure_finetuning(
            _model(BioPerceiverForSequenceClassification, num_labels=2), "partial", unfreeze_last_n_layers=99
        )


def test_lora_adapters_change_the_output_and_merge_exactly():
    from bioperceiver.training import configure_finetuning, merge_lora

    batch = random_batch(tiny_config(), batch_size=3)
    base = _model(BioPerceiverForSequenceClassification, num_labels=2)
    with torch.no_grad():
        before = base(inputs=batch).logits
    peft_model = configure_finetuning(copy.deepcopy(base), "lora", lora_r=4)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any("head" in n for n in trainable)
    assert not any("lora" in n and (".k_proj." in n or ".v_proj." in n) for n in trainable)
    assert not any("embedders" in n for n in trainable)
    peft_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(inputs=batch).logits, before)  # B = 0 at init: no change
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        adapted = peft_model(inputs=batch).logits
    assert not torch.allclose(adapted, before, atol=1e-4)  # the adapters are on the forward path
    merged = merge_lora(peft_model)
    assert isinstance(merged, BioPerceiverForSequenceClassification)
    with torch.no_grad():
        torch.testing.assert_close(merged(inputs=batch).logits, adapted, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="bypassed"):
        configure_finetuning(copy.deepcopy(base), "lora", lora_target_modules=["k_proj", "q_proj"])


# ---- task objects: registry, serialised form, label encoding ---------------------------------------------------------
TRAIN_ROWS = [
    {"sample_id": "a", "dx": "flu", "findings": ["cough", "fever"], "age": 30.0, "t": 5.0, "e": 1},
    {"sample_id": "b", "dx": "cold", "findings": ["cough"], "age": 50.0, "t": 2.5, "e": "0"},
    {"sample_id": "c", "dx": "flu", "findings": ["rash", "cough"], "age": 70.0, "t": 9.0, "e": True},
    {"sample_id": "d", "dx": None, "findings": None, "age": None, "t": None, "e": None},
]
TASK_SETTINGS = {
    "classification": {"label_column": "dx"},
    "multilabel": {"label_column": "findings", "top_k": 2},
    "regression": {"label_column": "age"},
    "survival": {"time_column": "t", "event_column": "e", "loss": "discrete", "num_time_bins": 4},
}


@pytest.mark.parametrize("name", sorted(TASK_SETTINGS))
def test_every_task_round_trips_through_its_saved_form(name, tmp_path):
    import json

    from bioperceiver.tasks import Task, get_task

    task = get_task(name, **TASK_SETTINGS[name]).fit(TRAIN_ROWS)
    again = Task.from_dict(json.loads(json.dumps(task.to_dict())))
    assert type(again) is type(task) and again == task and again.to_dict() == task.to_dict()
    task.save(tmp_path)
    loaded = Task.load(tmp_path)
    assert loaded == task
    for row in TRAIN_ROWS:
        a, b = task.encode(row), loaded.encode(row)
        assert (a is None and b is None) or torch.equal(a, b)
    assert task.encode(TRAIN_ROWS[3]) is None  # a missing label leaves the row out


def test_label_encoding_decodes_back_per_task():
    from bioperceiver.tasks import get_task

    clf = get_task("classification", label_column="dx").fit(TRAIN_ROWS)
    assert clf.classes == ["cold", "flu"] and clf.num_labels == 2
    assert [clf.decode(int(clf.encode(r))) for r in TRAIN_ROWS[:3]] == ["flu", "cold", "flu"]
    ml = get_task("multilabel", label_column="findings", top_k=2).fit(TRAIN_ROWS)
    assert ml.classes == ["cough", "fever"]  # the 2 most frequent labels of the training rows
    assert ml.decode(ml.encode(TRAIN_ROWS[0])) == ["cough", "fever"] and ml.decode(ml.encode(TRAIN_ROWS[2])) == [
        "cough"
    ]
    reg = get_task("regression", label_column="age").fit(TRAIN_ROWS)
    z = torch.stack([reg.encode(r) for r in TRAIN_ROWS[:3]]).numpy()
    assert abs(z.mean()) < 1e-6 and abs(z.std() - 1) < 1e-6  # standardised with the training mean/std
    np.testing.assert_allclose(reg.decode(z), [30.0, 50.0, 70.0], rtol=1e-6)
    surv = get_task("survival", time_column="t", event_column="e")
    assert [surv.encode(r).tolist() for r in TRAIN_ROWS[:3]] == [[5.0, 1.0], [2.5, 0.0], [9.0, 1.0]]
    binary = get_task("classification", label_column="findings", positive_label="rash").fit(TRAIN_ROWS)
    assert binary.classes == ["not rash", "rash"] and [int(binary.encode(r)) for r in TRAIN_ROWS[:3]] == [0, 0, 1]


def test_finetuning_task_json_written_before_task_objects_still_loads(tmp_path):
    """The LabelSpec layout held every task's fields; each task takes its own and ignores the rest."""
    import json

    from bioperceiver.tasks import ClassificationTask, RegressionTask, SurvivalTask, Task

    old = {
        "label_column": None,
        "time_column": None,
        "event_column": None,
        "classes": [],
        "positive_label": None,
        "top_k": None,
        "target_mean": 0.0,
        "target_std": 1.0,
    }
    cases = [
        (
            {
                "task": "classification",
                "label_column": "label_findings",
                "classes": ["not normal", "normal"],
                "positive_label": "normal",
            },
            ClassificationTask,
        ),
        ({"task": "regression", "label_column": "label_age", "target_mean": 60.5, "target_std": 12.0}, RegressionTask),
        (
            {"task": "survival", "time_column": "label_survival_time", "event_column": "label_survival_event"},
            SurvivalTask,
        ),
    ]
    for fields, cls in cases:
        (tmp_path / "finetuning_task.json").write_text(json.dumps({**old, **fields}, indent=1))
        task = Task.load(tmp_path)
        assert type(task) is cls
        for k, v in fields.items():
            if k != "task":
                assert getattr(task, k) == v, k
    assert task.loss == "cox"  # the default of folders saved before the loss was part of the task


def test_registry_takes_a_new_task_and_names_the_choices():
    from bioperceiver.tasks import RegressionTask, available_tasks, get_task, register_task
    from bioperceiver.tasks.base import _REGISTRY

    assert {"classification", "multilabel", "regression", "survival"} <= set(available_tasks())
    assert type(get_task("multi_label_classification")).__name__ == "MultilabelTask"  # transformers' problem type

    class LogRegressionTask(RegressionTask):  # a task defined only here: y -> log(y)
        name = "log_regression"

        def encode(self, record):
            v = record.get(self.label_column)
            return None if v is None else torch.tensor(float(np.log(v)))

    try:
        register_task(LogRegressionTask)
        task = get_task("log_regression", label_column="age")
        assert float(task.encode({"age": np.e})) == pytest.approx(1.0)
        assert type(task.from_dict(task.to_dict())) is LogRegressionTask
    finally:
        _REGISTRY.pop("log_regression", None)
    with pytest.raises(ValueError, match="choose one of"):
        get_task("classificaton")
    with pytest.raises(ValueError, match="label_column"):
        get_task("classification").check_columns(["label_x"])


def test_models_declare_their_task_and_the_metrics_follow_it():
    from bioperceiver.evaluation import metrics_with_ci, regression_metrics
    from bioperceiver.tasks import get_task

    assert _model(BioPerceiverForSurvival).output_task == "survival"
    for problem_type, num_labels, name in (
        (None, 1, "regression"),
        (None, 3, "classification"),
        ("multi_label_classification", 3, "multilabel"),
    ):
        model = _model(BioPerceiverForSequenceClassification, num_labels=num_labels, problem_type=problem_type)
        assert get_task(model.output_task).name == name
    # a regression task scores in the label's units: the same numbers as the plain metrics on decoded values
    reg = get_task("regression", label_column="y", target_mean=50.0, target_std=10.0)
    rng = np.random.default_rng(0)
    out, y = rng.normal(size=(40, 1)), rng.normal(size=40)
    assert reg.evaluate(out, y, ci=False) == regression_metrics(10 * out[:, 0] + 50, 10 * y + 50)
    with_ci = reg.evaluate(out, y, n_resamples=50, groups=np.arange(40) // 2)
    ref = metrics_with_ci("regression", 10 * out[:, 0] + 50, 10 * y + 50, n_resamples=50, groups=np.arange(40) // 2)
    assert with_ci == ref


@pytest.mark.parametrize("cls", [BioPerceiverForSequenceClassification, BioPerceiverForSurvival])
@pytest.mark.parametrize("head_type", ["pooled", "query"])
def test_every_head_parameter_is_initialised_on_every_load_path(cls, head_type, tmp_path):
    """Issue 13: transformers creates parameters missing from a checkpoint on the meta device and initialises only
    what ``_init_weights`` handles; the query head's ``query`` must be among them (it held 1e34-1e38 before). Paths:
    from a saved backbone (several times), fresh, from a finetuned folder, LoRA (configured, merged, saved, loaded),
    and the backbone class itself."""
    torch.manual_seed(0)
    backbone = bp.BioPerceiverModel(tiny_config())
    backbone.save_pretrained(tmp_path / "backbone")
    saved = backbone.state_dict()
    std = backbone.config.initializer_range
    head = {"head_type": head_type, "head_hidden_size": 8}

    def check(model, from_backbone: bool):
        for name, p in model.named_parameters():
            assert torch.isfinite(p).all(), name
            if from_backbone and name.startswith("bioperceiver."):
                torch.testing.assert_close(p, saved[name.removeprefix("bioperceiver.")], msg=name)
        checked = set()
        for module in model.head.modules():
            if isinstance(module, torch.nn.LayerNorm):
                assert (module.weight == 1).all() and (module.bias == 0).all()
                checked |= {id(module.weight), id(module.bias)}
            elif isinstance(module, torch.nn.Linear):  # truncated normal within 2 std, zero bias
                w = module.weight
                assert w.abs().max() <= 2 * std + 1e-7 and w.std() > 0.2 * std and (module.bias == 0).all()
                checked |= {id(w), id(module.bias)}
            elif isinstance(module, QueryHead):
                q = module.query
                assert q.abs().max() <= 2 * std + 1e-7 and q.std() > 0.2 * std, q
                checked.add(id(q))
        assert checked == {id(p) for p in model.head.parameters()}  # every head parameter was checked

    for _ in range(3):
        check(cls.from_pretrained(tmp_path / "backbone", **head), from_backbone=True)
    fresh = cls(tiny_config(**head))
    check(fresh, from_backbone=False)
    fresh.save_pretrained(tmp_path / "finetuned")
    again = cls.from_pretrained(tmp_path / "finetuned")
    for name, p in fresh.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], p, msg=name)
    # LoRA on a model loaded from the backbone: the head (trained in full, `modules_to_save`) is initialised, the
    # adapters start as A ~ kaiming-uniform, B = 0; merged and saved, the finetuned folder loads back exactly
    from bioperceiver.training import configure_finetuning, merge_lora

    loaded = cls.from_pretrained(tmp_path / "backbone", **head)
    check(loaded, from_backbone=True)
    peft_model = configure_finetuning(loaded, "lora", lora_r=4)
    lora = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert lora and all(torch.isfinite(p).all() for p in peft_model.parameters())
    for name, p in lora.items():
        if "lora_B" in name:
            assert (p == 0).all(), name
        else:  # kaiming-uniform(a=sqrt(5)) over fan_in: |A| <= 1 / sqrt(fan_in)
            assert 0 < p.abs().max() <= 1 / p.shape[1] ** 0.5 + 1e-7, name
    merged = merge_lora(peft_model)
    check(merged, from_backbone=True)  # B = 0: merging changes no backbone weight
    merged.save_pretrained(tmp_path / "lora_finetuned")
    reloaded = cls.from_pretrained(tmp_path / "lora_finetuned")
    for name, p in merged.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], p, rtol=0, atol=0, msg=name)
    # the backbone class itself on the same paths: every parameter finite, the saved ones exact
    for model in (bp.BioPerceiverModel.from_pretrained(tmp_path / "backbone"), bp.BioPerceiverModel(tiny_config())):
        assert all(torch.isfinite(p).all() for p in model.parameters())
    for name, p in bp.BioPerceiverModel.from_pretrained(tmp_path / "lora_finetuned").state_dict().items():
        torch.testing.assert_close(p, merged.state_dict()[f"bioperceiver.{name}"], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    ("name", "settings", "column", "value", "reason"),
    [
        ("regression", {"label_column": "y"}, "y", float("inf"), "non_finite_label"),
        ("regression", {"label_column": "y"}, "y", "poorly differentiated", "bad_label"),
        ("survival", {"time_column": "t", "event_column": "e"}, "t", "abc", "bad_label"),
        ("survival", {"time_column": "t", "event_column": "e"}, "t", float("-inf"), "non_finite_label"),
        ("survival", {"time_column": "t", "event_column": "e"}, "t", -1.0, "bad_label"),
        ("survival", {"time_column": "t", "event_column": "e"}, "e", "maybe", "bad_label"),
        ("classification", {"label_column": "y"}, "y", float("inf"), "non_finite_label"),
    ],
)
def test_an_unusable_label_is_a_data_error_naming_the_sample_and_the_column(name, settings, column, value, reason):
    """Text in a numeric label column and an infinite label are named before fitting (``check_label``), by ``fit``
    and by ``encode``: never a bare ``could not convert string to float`` and never an inf target."""
    from bioperceiver.data import DataError
    from bioperceiver.tasks import get_task

    good = [{"sample_id": f"s{i}", "y": float(i % 2), "t": 1.0 + i, "e": i % 2} for i in range(4)]
    bad = {**good[0], "sample_id": "bad1", column: value}
    task = get_task(name, **settings)
    assert all(task.check_label(r) for r in good)
    assert task.check_label({"sample_id": "m", "y": None, "t": None, "e": None}) is False  # empty: left out, no error
    with pytest.raises(DataError, match=rf"sample 'bad1', modality '{column}'.*Fix: ") as err:
        task.check_label(bad)
    assert err.value.reason == reason
    fitted = get_task(name, **settings).fit(good)
    with pytest.raises(DataError, match="sample 'bad1'"):
        fitted.encode(bad)
    if name == "regression":
        with pytest.raises(DataError, match=r"sample 'bad1'.*is not (a|a finite) number"):
            get_task(name, **settings).fit([*good, bad])
        assert float(fitted.encode({"y": "2.5"})) == pytest.approx((2.5 - 0.5) / 0.5)  # numbers as text still work


def test_classes_from_a_column_of_measurements_are_warned_about(caplog):
    """A float column with many distinct values as classification targets: each value becomes its own class of a
    few rows; the user is told to consider --task regression. Grades 1/2/3 (or 1.0/2.0/3.0) are not warned about."""
    import logging

    from bioperceiver.tasks import get_task

    rng = np.random.default_rng(0)
    rows = [{"y": float(round(v, 1))} for v in rng.normal(60, 10, 200)]
    with caplog.at_level(logging.WARNING, logger="bioperceiver.tasks.classification"):
        task = get_task("classification", label_column="y").fit(rows)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert f"y: {len(task.classes)} classes" in warning and "from 200 training rows" in warning
    assert "--task regression" in warning and "fractional" in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bioperceiver.tasks.classification"):
        get_task("classification", label_column="y").fit([{"y": float(g)} for g in (1, 2, 3) * 50])
        get_task("classification", label_column="y").fit([{"y": g} for g in ("a", "b", "c", "d") * 50])
        get_task("classification", label_column="y", classes=[0.5, 1.5, 2.5]).fit(rows)  # classes given: meant
    assert not caplog.records
