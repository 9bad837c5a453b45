"""Text processor: a Hugging Face ``tokenizers`` tokenizer (trained on the notes, or loaded from tokenizer.json or a
pretrained model's folder)."""

from __future__ import annotations

import heapq
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from ...data.errors import DataError
from ..processor import ModalityProcessor

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TOKENIZER_FILE = "tokenizer.json"


def _learn_merges(
    word_counts: dict[str, int], symbols_of, merge, vocab_size: int, base: list[str], min_frequency: int
) -> list[tuple[str, str]]:
    """Byte-pair merges over ``word_counts``: the most frequent adjacent pair first, ties broken by the pair's
    text, so the result depends only on the corpus (``tokenizers``' trainers break ties in hash-map order, which
    gives a different vocabulary from run to run). Pair counts are updated incrementally; a lazy max-heap keeps
    the cost near O(merges x affected words)."""
    words = [symbols_of(w) for w in word_counts]
    counts = list(word_counts.values())
    pair_counts: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, w in enumerate(words):
        for pair in pairwise(w):
            pair_counts[pair] += counts[i]
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)
    vocab = set(base)
    merges: list[tuple[str, str]] = []
    while heap and len(vocab) < vocab_size:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg:
            continue  # stale entry
        if -neg < min_frequency:
            break
        new = merge(*pair)
        merges.append(pair)
        vocab.add(new)
        changed: set[tuple[str, str]] = set()
        for i in list(where.pop(pair, ())):
            w, c = words[i], counts[i]
            for p in pairwise(w):
                pair_counts[p] -= c
                changed.add(p)
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == pair:
                    out.append(new)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
            for p in pairwise(out):
                pair_counts[p] += c
                where[p].add(i)
                changed.add(p)
        pair_counts.pop(pair, None)
        for p in changed:
            if p != pair and pair_counts.get(p, 0) > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
    return merges


def count_words(texts: Iterable[str], *, model: str = "wordpiece", lowercase: bool = True, strip_accents: bool = True):
    """Pre-tokenised word counts of ``texts`` (what :func:`tokenizer_from_counts` learns from; additive over sites)."""
    if model not in ("wordpiece", "bpe"):
        raise ValueError(f"tokenizer model must be 'wordpiece' or 'bpe', got {model!r}")
    normalizer, pre = _normalizer(lowercase, strip_accents), _pre_tokenizer(model)
    word_counts: Counter = Counter()
    for t in texts:
        if isinstance(t, str) and t.strip():
            word_counts.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(t)))
    return dict(word_counts)


def _normalizer(lowercase: bool, strip_accents: bool):
    norm = [normalizers.NFD()]
    if lowercase:
        norm.append(normalizers.Lowercase())
    if strip_accents:
        norm.append(normalizers.StripAccents())
    return normalizers.Sequence(norm)


def _pre_tokenizer(model: str):
    return (
        pre_tokenizers.BertPreTokenizer() if model == "wordpiece" else pre_tokenizers.ByteLevel(add_prefix_space=True)
    )


def train_tokenizer(
    texts: Iterable[str],
    *,
    model: str = "wordpiece",
    vocab_size: int = 8000,
    lowercase: bool = True,
    strip_accents: bool = True,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a WordPiece (BERT-style) or byte-level BPE tokenizer on ``texts``, deterministically.

    Special tokens ``[PAD]`` (id 0), ``[UNK]``, ``[CLS]``, ``[SEP]``, ``[MASK]``; every encoding is wrapped as
    ``[CLS] ... [SEP]``. The vocabulary is learnt by byte-pair merges with ties broken by text (see
    :func:`_learn_merges`) and loaded into a Hugging Face ``tokenizers`` model for fast encoding.
    """
    counts = count_words(texts, model=model, lowercase=lowercase, strip_accents=strip_accents)
    return tokenizer_from_counts(
        counts,
        model=model,
        vocab_size=vocab_size,
        lowercase=lowercase,
        strip_accents=strip_accents,
        min_frequency=min_frequency,
    )


def tokenizer_from_counts(
    word_counts: dict[str, int],
    *,
    model: str = "wordpiece",
    vocab_size: int = 8000,
    lowercase: bool = True,
    strip_accents: bool = True,
    min_frequency: int = 2,
) -> Tokenizer:
    """The tokenizer :func:`train_tokenizer` learns, from word counts (e.g. summed over sites)."""
    if model not in ("wordpiece", "bpe"):
        raise ValueError(f"tokenizer model must be 'wordpiece' or 'bpe', got {model!r}")
    normalizer, pre = _normalizer(lowercase, strip_accents), _pre_tokenizer(model)
    word_counts = dict(sorted(word_counts.items()))
    specials = list(SPECIAL_TOKENS)
    if model == "wordpiece":
        chars = sorted({c for w in word_counts for c in w[:1]} | {"##" + c for w in word_counts for c in w[1:]})
        merges = _learn_merges(
            word_counts,
            lambda w: [w[0]] + ["##" + c for c in w[1:]],
            lambda a, b: a + b.removeprefix("##"),
            vocab_size,
            specials + chars,
            min_frequency,
        )
        tokens = specials + chars + [a + b.removeprefix("##") for a, b in merges]
        vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
        tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
        tok.decoder = decoders.WordPiece()
    else:
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        merges = _learn_merges(word_counts, list, lambda a, b: a + b, vocab_size, specials + alphabet, min_frequency)
        tokens = specials + alphabet + [a + b for a, b in merges]
        vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="[UNK]"))
        tok.decoder = decoders.ByteLevel()
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.add_special_tokens(specials)  # never split, skipped by decode
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return tok


@dataclass
class TextSettings:
    """Settings of the text processor.

    Args:
        tokenizer_file: an existing ``tokenizer.json`` to use instead of training one (``fit`` then only checks
            it); e.g. a BERT vocabulary.
        tokenizer_dir: a local folder of a pretrained Hugging Face model whose tokenizer to use instead of training
            one: its ``tokenizer.json``, or else its ``vocab.txt`` (a BERT WordPiece vocabulary, lower-cased
            unless the folder's ``tokenizer_config.json`` says ``do_lower_case: false``). Pair it with the text
            embedder's ``pretrained_encoder`` set to the same folder. The tokenizer is saved with the processors,
            so a saved folder never needs this path again.
        model: ``"wordpiece"`` or ``"bpe"`` when training.
        vocab_size: target vocabulary size when training.
        lowercase: lowercase (and strip accents) before tokenising when training.
        min_frequency: minimum count of a merge/word piece when training.
        max_length: longest token sequence kept (special tokens included); the model's position table must
            cover it.
        truncation: ``"right"`` keeps the beginning of long notes, ``"left"`` keeps the end.
    """

    tokenizer_file: str | None = None
    tokenizer_dir: str | None = None
    model: str = "wordpiece"
    vocab_size: int = 8000
    lowercase: bool = True
    min_frequency: int = 2
    max_length: int = 512
    truncation: str = "right"

    def __post_init__(self):
        if self.truncation not in ("right", "left"):
            raise ValueError(f"truncation must be 'right' or 'left', got {self.truncation!r}")
        if self.max_length < 3:
            raise ValueError(f"max_length must be >= 3 (room for [CLS] and [SEP]), got {self.max_length}")
        if self.tokenizer_file and self.tokenizer_dir:
            raise ValueError("give tokenizer_file or tokenizer_dir, not both")


def load_pretrained_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer of a pretrained Hugging Face model folder: ``tokenizer.json``, else a BERT WordPiece tokenizer
    built from ``vocab.txt`` (``[CLS] ... [SEP]`` added to every encoding)."""
    import json

    folder = Path(folder).expanduser()
    if (folder / TOKENIZER_FILE).is_file():
        return Tokenizer.from_file(str(folder / TOKENIZER_FILE))
    if (folder / "vocab.txt").is_file():
        from tokenizers.implementations import BertWordPieceTokenizer

        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        lower = bool(config.get("do_lower_case", True))
        return BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=lower)._tokenizer
    raise ValueError(
        f"tokenizer_dir {str(folder)!r} holds neither {TOKENIZER_FILE} nor vocab.txt; give the local folder of a "
        "pretrained Hugging Face model (e.g. the one the text embedder's pretrained_encoder names)"
    )


class TextProcessor(ModalityProcessor):
    """Note text -> ``input_ids`` and ``attention_mask`` (int64), truncated to ``max_length``."""

    kind = "text"
    Settings = TextSettings

    def __init__(self, name=None, **settings):
        super().__init__(name, **settings)
        self.tokenizer: Tokenizer | None = None
        if self._given_tokenizer():
            self.tokenizer = self._load_given_tokenizer()
            self.state = self._describe()
        self._configure()

    def _given_tokenizer(self) -> bool:
        return bool(self.settings.tokenizer_file or self.settings.tokenizer_dir)

    def _load_given_tokenizer(self) -> Tokenizer:
        if self.settings.tokenizer_file:
            return Tokenizer.from_file(str(self.settings.tokenizer_file))
        return load_pretrained_tokenizer(self.settings.tokenizer_dir)

    def _configure(self) -> None:
        if self.tokenizer is None:
            return
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=self.settings.max_length, direction=self.settings.truncation)

    def _describe(self) -> dict:
        return {"vocab_size": self.tokenizer.get_vocab_size(), "pad_token_id": self._pad_id()}

    def _pad_id(self) -> int:
        for tok in ("[PAD]", "<pad>", "<PAD>"):
            tid = self.tokenizer.token_to_id(tok)
            if tid is not None:
                return tid
        return 0

    def _fit(self, values, sample_ids, base_dir):
        for v, sid in zip(values, sample_ids):
            if not isinstance(v, str) or not v.strip():  # the same checks as a call, before any training
                try:
                    self._check_note(v)
                except DataError as err:
                    raise err.located(sample_id=sid) from None
        if self._given_tokenizer():
            self.tokenizer = self._load_given_tokenizer()
        else:
            self.tokenizer = train_tokenizer(
                values,
                model=self.settings.model,
                vocab_size=self.settings.vocab_size,
                lowercase=self.settings.lowercase,
                min_frequency=self.settings.min_frequency,
            )
        self._configure()
        self.state = self._describe()

    # ---- federated fit: word counts per site (summed), the tokenizer learnt from the sum -----------------------
    def _site_statistics(self, values, sample_ids, base_dir):
        for v, sid in zip(values, sample_ids):
            if not isinstance(v, str) or not v.strip():
                try:
                    self._check_note(v)
                except DataError as err:
                    raise err.located(sample_id=sid) from None
        if self._given_tokenizer():
            return {"fitted_on": len(values)}
        counts = count_words(values, model=self.settings.model, lowercase=self.settings.lowercase)
        return {"fitted_on": len(values), "words": counts}

    def _fit_from_statistics(self, merged, query):
        if self._given_tokenizer():
            self.tokenizer = self._load_given_tokenizer()
        else:
            self.tokenizer = tokenizer_from_counts(
                merged.get("words", {}),
                model=self.settings.model,
                vocab_size=self.settings.vocab_size,
                lowercase=self.settings.lowercase,
                min_frequency=self.settings.min_frequency,
            )
        self._configure()
        self.state = self._describe()

    def _process(self, value, *, sample_id, base_dir, train, rng):
        self._check_note(value)
        enc = self.tokenizer.encode(value)
        ids = np.asarray(enc.ids, dtype=np.int64)
        if enc.overflowing:
            self.counters["truncated_notes"] += 1
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    def _check_note(self, value) -> None:
        if not isinstance(value, str):
            raise self.error("bad_type", f"expected the note as a string, got {type(value).__name__}", "")
        if not value.strip():
            raise self.error(
                "empty_text", "the note is empty", "set the cell to null when a sample has no note, or fill it"
            )

    def model_settings(self):
        return {
            "kind": "text",
            "vocab_size": self.state["vocab_size"],
            "max_position_embeddings": self.settings.max_length,
            "pad_token_id": self.state["pad_token_id"],
        }

    def _save_files(self, directory: Path) -> None:
        if self.tokenizer is not None:
            tmp = directory / (TOKENIZER_FILE + ".tmp")
            self.tokenizer.save(str(tmp))
            shutil.move(tmp, directory / TOKENIZER_FILE)

    def _load_files(self, directory: Path) -> None:
        path = directory / TOKENIZER_FILE
        if path.exists():
            self.tokenizer = Tokenizer.from_file(str(path))
        elif self.state:
            raise FileNotFoundError(f"{path} missing: the saved text processor {self.name!r} is incomplete")
        self._configure()

    def to_dict(self):
        data = super().to_dict()
        # the saved directory carries tokenizer.json itself
        data["settings"]["tokenizer_file"] = data["settings"]["tokenizer_dir"] = None
        return data

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(map(int, ids)))
