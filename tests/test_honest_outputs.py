"""Pretraining outputs compare like with like: the held-out loss uses training-sized contrastive batches, retrieval
is always shown beside its chance level, and loss_curves.png keeps the two losses on separate panels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from bioperceiver.cards import retrieval_rows
from bioperceiver.losses import ClipLoss
from bioperceiver.training.pretraining import chance_recall, evaluate, plot_history, retrieval_metrics


class _FixedViews(nn.Module):
    """A stand-in pretrainer: each sample's two views are fixed random vectors (text, image)."""

    def __init__(self, n: int, dim: int = 8):
        super().__init__()
        self.view_names = ["text", "image"]
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(n, 2, dim, generator=g)
        self.loss_fn = ClipLoss(view_names=self.view_names)

    def views(self, inputs):
        return self.table[inputs["rows"]], torch.ones(len(inputs["rows"]), 2, dtype=torch.bool)


def _collate(items, train=False):
    return {"inputs": {"rows": torch.tensor(items)}, "patient_id": [f"p{i}" for i in items]}


def test_held_out_loss_is_the_mean_over_training_sized_batches_only():
    trainer = _FixedViews(10)
    metrics, views, _ = evaluate(trainer, list(range(10)), _collate, batch_size=4)
    mask = torch.ones(4, 2, dtype=torch.bool)
    with torch.no_grad():
        expected = np.mean([float(trainer.loss_fn(trainer.table[s : s + 4], mask)["loss"]) for s in (0, 4)])
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-6)  # the 2-sample tail is not in the mean
    assert metrics["eval_loss_batch_size"] == 4 and metrics["eval_loss_batches"] == 2
    assert len(views) == 10  # ... but all 10 samples are in the retrieval metrics
    assert metrics["queries/text-image"] == 10


def test_held_out_loss_treats_a_patient_s_other_rows_as_the_training_loss_does():
    """Rows of one patient in a held-out batch are not each other's negatives, as in the training loss (which passes
    the batch's patient index): the held-out loss is the training loss's quantity, whatever the row order, and a
    sample of training patients drawn whole is scored like the held-out split."""
    from bioperceiver.losses import patient_index

    trainer = _FixedViews(8)
    pids = ["a", "a", "b", "c", "c", "c", "d", "e"]

    def collate(items, train=False):
        return {"inputs": {"rows": torch.tensor(items)}, "patient_id": [pids[i] for i in items]}

    metrics, _, _ = evaluate(trainer, list(range(8)), collate, batch_size=8)
    mask = torch.ones(8, 2, dtype=torch.bool)
    with torch.no_grad():
        with_ids = float(trainer.loss_fn(trainer.table, mask, patient_index(pids))["loss"])
        without = float(trainer.loss_fn(trainer.table, mask)["loss"])
    assert metrics["eval_loss"] == pytest.approx(with_ids, rel=1e-6) and with_ids != pytest.approx(without, rel=1e-3)
    one_each, _, _ = evaluate(trainer, list(range(8)), _collate, batch_size=8)  # one row per patient: as before
    assert one_each["eval_loss"] == pytest.approx(without, rel=1e-6)


def test_held_out_set_smaller_than_a_batch_reports_its_own_size():
    metrics, _, _ = evaluate(_FixedViews(3), [0, 1, 2], _collate, batch_size=8)
    assert metrics["eval_loss_batch_size"] == 3 and metrics["eval_loss_batches"] == 1


def test_chance_recall_matches_random_rankings():
    n, ks = 20, (1, 5, 10)
    hits = {k: [] for k in ks}
    for seed in range(300):
        g = torch.Generator().manual_seed(seed)
        out = retrieval_metrics(torch.randn(n, 2, 32, generator=g), torch.ones(n, 2, dtype=torch.bool), ["a", "b"])
        for k in ks:
            hits[k].append(out[f"R@{k}/a-b"])
    for k in ks:
        assert out[f"chance_R@{k}/a-b"] == pytest.approx(k / n)
        assert np.mean(hits[k]) == pytest.approx(k / n, abs=0.02)
    assert chance_recall(10, 4, 40) == pytest.approx((1.0 + 0.25) / 2)  # k above the candidates: every query hits


def test_retrieval_table_puts_chance_beside_every_recall():
    mask = torch.ones(6, 3, dtype=torch.bool)
    mask[0, 1] = False  # the image view is missing for one sample: 5 candidates for it, 6 for text
    out = retrieval_metrics(torch.randn(6, 3, 4), mask, ["text", "image", "fused"])
    rows = {r["views"]: r for r in retrieval_rows(out)}
    row = rows["text ↔ image"]
    assert row["chance R@1"] == f"{(1 / 5 + 1 / 6) / 2:.3f}"
    assert row["chance R@5"] == f"{(1 + 5 / 6) / 2:.3f}"
    assert all(f"chance R@{k}" in r for r in rows.values() for k in (1, 5, 10))


def test_loss_curves_draw_training_and_held_out_losses_on_separate_panels(tmp_path, monkeypatch):
    import matplotlib.figure

    saved = {}
    real_savefig = matplotlib.figure.Figure.savefig

    def keep(fig, path, **kw):
        saved["axes"] = [
            (ax.get_title(), ax.get_ylabel(), [line.get_label() for line in ax.get_lines()]) for ax in fig.axes
        ]
        return real_savefig(fig, path, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    history = [{"step": s, "loss": 3.0 - 0.1 * s} for s in range(1, 11)] + [
        {"step": 10, "eval_loss": 3.2, "eval_loss_batch_size": 32}
    ]
    plot_history(history, tmp_path / "loss_curves.png", batch_size=32, loss_name="clip", dropout=0.2)
    assert (tmp_path / "loss_curves.png").stat().st_size > 0
    (train_title, train_y, train_lines), (eval_title, eval_y, eval_lines) = saved["axes"]
    assert "training" in train_title and "32 samples" in train_title and "dropout 0.2" in train_title
    assert "held-out" in eval_title and "32 samples" in eval_title
    assert "training batch" in train_y and "held-out" in eval_y
    assert "uniform guess, ln 32" in train_lines and "uniform guess, ln 32" in eval_lines
    assert math.isclose(math.log(32), 3.4657, abs_tol=1e-4)


def test_card_says_what_the_held_out_loss_is_averaged_over():
    from bioperceiver.cards import _eval_loss_scale

    assert _eval_loss_scale(None) == ""
    assert "batches of 32 held-out samples" in _eval_loss_scale(32) and "ln 32 = 3.466" in _eval_loss_scale(32)


def test_uniform_loss_is_what_a_model_scoring_every_candidate_alike_gets():
    """The reference: identical embeddings make every logit equal, so the loss itself is the uniform-guess level.
    With missing views and a shared patient (fewer candidates for some rows) it is not ln B, and the loss reports
    the exact level on any embeddings."""
    from bioperceiver.losses import MultiViewLoss

    b, v, d = 8, 3, 4
    mask = torch.ones(b, v, dtype=torch.bool)
    mask[0, 1] = mask[3, 2] = mask[5, 0] = False
    pid = torch.tensor([0, 1, 2, 3, 4, 5, 6, 6])  # two samples of one patient
    same = torch.ones(b, v, d)
    for loss_fn in (ClipLoss(), MultiViewLoss()):
        flat = loss_fn(same, mask, pid)
        assert float(flat["uniform_loss"]) == pytest.approx(float(flat["loss"].detach()), rel=1e-5)
        other = loss_fn(torch.randn(b, v, d, generator=torch.Generator().manual_seed(1)), mask, pid)
        assert float(other["uniform_loss"]) == pytest.approx(float(flat["loss"].detach()), rel=1e-5)  # independent of z
    full = MultiViewLoss()(same, torch.ones(b, v, dtype=torch.bool))
    assert float(full["uniform_loss"]) == pytest.approx(math.log(b * v - 1))  # every other view is a candidate
    assert float(ClipLoss()(same, torch.ones(b, v, dtype=torch.bool))["uniform_loss"]) == pytest.approx(math.log(b))


def test_held_out_metrics_carry_the_uniform_level_of_the_same_batches():
    trainer = _FixedViews(10)
    metrics, _, _ = evaluate(trainer, list(range(10)), _collate, batch_size=4)
    assert metrics["eval_loss_uniform"] == pytest.approx(math.log(4))  # clip, every view present: ln B


def test_loss_curves_draw_the_measured_uniform_level_not_ln_b_for_multiview(tmp_path, monkeypatch):
    import matplotlib.figure

    from bioperceiver.cards import _eval_loss_scale
    from bioperceiver.training.pretraining import uniform_guess_level

    lines = {}
    real_savefig = matplotlib.figure.Figure.savefig

    def keep(fig, path, **kw):
        lines["labels"] = [[line.get_label() for line in ax.get_lines()] for ax in fig.axes]
        lines["levels"] = [[line.get_ydata()[0] for line in ax.get_lines()[1:]] for ax in fig.axes]
        return real_savefig(fig, path, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    history = [{"step": s, "loss": 6.0 - 0.1 * s, "uniform_loss": 6.3 + 0.02 * (s % 2)} for s in range(1, 11)] + [
        {"step": 10, "eval_loss": 5.5, "eval_loss_batch_size": 128, "eval_loss_uniform": 6.25}
    ]
    plot_history(history, tmp_path / "loss_curves.png", batch_size=128, loss_name="multiview")
    train_labels, eval_labels = lines["labels"]
    assert "uniform guess, 6.31 (measured on these batches)" in train_labels
    assert "uniform guess, 6.25 (measured on these batches)" in eval_labels
    assert lines["levels"][0][0] == pytest.approx(6.31) and lines["levels"][1][0] == pytest.approx(6.25)
    # no measured level: ln B only for clip, nothing for losses without a uniform level (siglip)
    old = [{"step": 1, "loss": 4.0}]
    assert uniform_guess_level(old, held_out=False, batch_size=32, loss_name="clip") == (math.log(32), "ln 32")
    assert uniform_guess_level(old, held_out=False, batch_size=32, loss_name="siglip") is None
    assert uniform_guess_level(old, held_out=False, batch_size=32, loss_name="multiview") is None
    assert "scores 6.250 on the same batches" in _eval_loss_scale(128, 6.25)


def test_loss_curves_say_when_the_objective_has_added_terms_and_plot_the_reconstruction(tmp_path, monkeypatch):
    """With ``loss.reconstruction`` the training curve is contrastive + weighted term: its axis says so, the uniform
    level is labelled as the contrastive part's, and a third panel shows the reconstruction error, training and
    held-out, beside the held-out error of predicting the mean."""
    import matplotlib.figure

    saved = {}
    real_savefig = matplotlib.figure.Figure.savefig

    def keep(fig, path, **kw):
        saved["axes"] = [
            (ax.get_title(), ax.get_ylabel(), [(line.get_label(), list(line.get_ydata())) for line in ax.get_lines()])
            for ax in fig.axes
        ]
        return real_savefig(fig, path, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    history = [
        {"step": s, "loss": 7.0 - 0.1 * s, "uniform_loss": 6.3, "loss_reconstruction": 1.2 - 0.05 * s}
        for s in range(1, 11)
    ]
    history.append(
        {
            "step": 10,
            "eval_loss": 5.5,
            "eval_loss_batch_size": 128,
            "eval_loss_uniform": 6.25,
            "eval_loss_reconstruction": 1.05,
            "eval_loss_reconstruction_mean": 2.3,
        }
    )
    plot_history(history, tmp_path / "loss_curves.png", batch_size=128, loss_name="multiview")
    (_, train_y, train_lines), (_, eval_y, _), (rec_title, rec_y, rec_lines) = saved["axes"]
    assert train_y == "multiview loss + weighted reconstruction"
    assert eval_y == "multiview loss, held-out patients"
    assert any(label.startswith("uniform guess (contrastive part), 6.30") for label, _ in train_lines)
    assert "reconstruction" in rec_title and "mean squared error" in rec_y
    lines = dict(rec_lines)
    assert lines["training batch"] == pytest.approx([1.2 - 0.05 * s for s in range(1, 11)])
    assert lines["held-out"] == [1.05] and lines["predicting the mean, held-out (2.30)"][0] == 2.3


def test_card_and_legend_say_when_the_training_split_has_fewer_samples_than_held_out():
    from bioperceiver.cards import _generalization_line
    from bioperceiver.training.pretraining import _training_label

    fewer = {"train_patients/eval_loss": 1.0, "eval_gap": 0.2, "train_patients/samples": 12}
    fewer["train_patients/held_out_samples"] = 28
    assert "12 training samples (all the training split has; 28 held out" in _generalization_line(fewer)
    assert _training_label(fewer).startswith("12 training samples (all there are; 28 held out)")
    alike = {**fewer, "train_patients/samples": 28}
    assert "as many training samples" in _generalization_line(alike)
    assert _training_label(alike) == "as many training patients, the same evaluation"
