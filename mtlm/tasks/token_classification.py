"""Token tagging with BIO tags (e.g. NER): per-token dropout -> linear, read on the first sub-token of
each word; masked cross-entropy (other sub-tokens and special tokens get label -100).

Tag schemes: IOB2 / BIO (`O`, `B-TYPE`, `I-TYPE`), IOBES (also `E-TYPE`, `S-TYPE`), and untyped tags
(`B`, `I`, `O`, `E`, `S`: chunking, or NER with a single entity type). seqeval reads all of them
(chakki-works/seqeval#46: an untyped chunk gets the type "_"); `decode` reports an untyped entity's
"entity" as None.

Metrics: entity-level precision / recall / F1 (seqeval, CoNLL evaluation). Words cut off by truncation
count as predicted "O", so truncation is never hidden from the score.

Training rows are already split into words (the dataset's tokens, CoNLL-2003 style); a raw prediction text
is split into words by `split_words` the way such datasets are tokenized (Penn Treebank conventions:
punctuation apart, "Anglo-Dutch" and "U.S." whole), and both are encoded by `encode_words`. So a word is
read and tagged as in training, and an entity is a run of whole words mapped back to character spans."""

from __future__ import annotations

import re
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlm.encoded import Encoded
from mtlm.tasks.base import ENCODE_CHUNK, LinearHead, compact_inputs, model_inputs

IGNORE = -100
_TAG = re.compile(r"^(O|[BIES](-.+)?)$")     # O, B-TYPE, ..., or an untyped B / I / E / S
_UNTYPED = "_"                                # seqeval's type for an untyped chunk
_WORD = re.compile(r"""
    (?:[^\W\d_]\.)+(?!\w)                                   # initials, dotted abbreviations: M. U.S. a.m.
  | (?i:n't|'(?:s|re|ve|ll|m|d))(?!\w)                       # clitics: John | 's (a lone n't too)
  | \w+(?:(?:[-.,/:&+]|'(?!(?i:s|re|ve|ll|m|d)(?!\w)))\w+)*  # words with inner punctuation: Anglo-Dutch
  | ([^\w\s])\1*                                              # one punctuation character, or a run: . -- ...
""", re.VERBOSE)


def split_words(text: str) -> list[tuple[str, int, int]]:
    """A raw text -> its words as (word, start, end), character offsets [start, end) into `text`.

    Follows the tokenization of CoNLL-2003 and other Penn-Treebank-style tagging data: whitespace and
    punctuation separate words ("Zürich." -> "Zürich", "."), but punctuation inside a word does not
    ("Anglo-Dutch", "1996-08-22", "1,000"); dotted abbreviations and initials keep their periods ("U.S.",
    "M."); a clitic after an apostrophe is a word of its own ("John", "'s"), a run of one punctuation
    character is one word ("...", "--"). "don't" stays whole (the Treebank's "do", "n't" would cut inside
    a WordPiece word and change the input ids the text tasks read). On CoNLL-2003 train, 89% of sentences
    (over 99% of tokens) come back as their gold tokens from the space-joined text; the rest are mostly
    list numbers and abbreviations ("1.", "Inc.") whose period is split off.

    Word boundaries never fall inside a run that a BERT pre-tokenizer keeps whole, except a symbol glued to
    a word ("5€"), so with WordPiece the words encode to the same input ids as the plain text."""
    return [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]


def encode_words(tokenizer, words: list[list[str]], max_length: int):
    """The one encoding of word sequences, for training rows and prediction inputs alike: each word
    tokenized into sub-tokens (`is_split_into_words`), truncated to max_length tokens. Returns the
    tokenizer's BatchEncoding (`word_ids(i)` maps tokens back to words)."""
    return tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)


def first_subtokens(word_ids: list[int | None]) -> dict[int, int]:
    """word index -> token position of its first sub-token. Words cut by truncation, or that the tokenizer
    dropped entirely (e.g. a lone zero-width character), are absent."""
    first: dict[int, int] = {}
    for pos, w in enumerate(word_ids):
        if w is not None and w not in first:
            first[w] = pos
    return first


class TokenClassification:
    roles: ClassVar[dict[str, bool]] = {"tokens": True, "tags": True}
    default_columns: ClassVar[dict[str, str]] = {"tokens": "tokens", "tags": "tags"}
    metric_names: ClassVar[tuple[str, ...]] = ("f1", "precision", "recall")
    lower_is_better: ClassVar[frozenset[str]] = frozenset()
    outputs: ClassVar[str] = "categorical"
    head_input: ClassVar[str] = "tokens"
    class_role: ClassVar[str | None] = None     # a tag per word: splits are not stratified
    joinable: ClassVar[bool] = True

    labels: list[str]

    def __init__(self, name: str, cfg):
        self.name, self.cfg = name, cfg

    def columns(self) -> dict[str, str]:
        return {**self.default_columns, **self.cfg.columns}

    def input_fields(self) -> tuple[str, ...]:
        return ("text",)

    def _words(self, row: dict) -> list[str] | None:
        value = row.get(self.columns()["tokens"])
        if isinstance(value, str):
            value = value.split()
        return value if isinstance(value, list) and all(isinstance(w, str) and w for w in value) else None

    def _tags(self, row: dict) -> list[str] | None:
        value = row.get(self.columns()["tags"])
        if isinstance(value, str):
            value = value.split()
        return value if isinstance(value, list) and all(isinstance(t, str) for t in value) else None

    def check_row(self, row: dict) -> list[tuple[str, str]]:
        cols, problems = self.columns(), []
        words, tags = self._words(row), self._tags(row)
        if row.get(cols["tokens"]) is None:
            problems.append((cols["tokens"], "missing"))
        elif not words:
            problems.append((cols["tokens"], "expected a non-empty list of non-empty strings"))
        if row.get(cols["tags"]) is None:
            problems.append((cols["tags"], "missing"))
        elif tags is None:
            problems.append((cols["tags"], "expected a list of tag strings"))
        elif (bad := [t for t in tags if not _TAG.match(t)]):
            problems.append((cols["tags"], f"not a BIO tag: {bad[0]!r} (expected O, B-TYPE or I-TYPE)"))
        elif words and len(words) != len(tags):
            problems.append((cols["tags"], f"{len(tags)} tags for {len(words)} tokens"))
        return problems

    def fit(self, rows: list[dict]) -> None:
        tags = {t for r in rows for t in self._tags(r)} | {"O"}
        self.labels = ["O"] + sorted(tags - {"O"}, key=lambda t: (t[2:], t[:1]))
        self._index = {t: i for i, t in enumerate(self.labels)}

    def check_eval_rows(self, rows: list[dict]) -> list[str]:
        unseen = sorted({t for r in rows for t in self._tags(r)} - set(self.labels))
        return [f"tag(s) not seen in train: {', '.join(map(repr, unseen[:10]))}"] if unseen else []

    def state(self) -> dict:
        return {"labels": self.labels}

    def load_state(self, state: dict) -> None:
        self.labels = list(state["labels"])
        self._index = {t: i for i, t in enumerate(self.labels)}

    def make_head(self, hidden_size: int, dropout: float) -> nn.Module:
        return LinearHead(hidden_size, len(self.labels), dropout)

    def encode(self, rows: list[dict], tokenizer, max_length: int) -> list[dict]:
        """Rows -> features, ENCODE_CHUNK rows per tokenizer call (resident memory: see ENCODE_CHUNK)."""
        return [f for start in range(0, len(rows), ENCODE_CHUNK)
                for f in self._encode_chunk(rows[start:start + ENCODE_CHUNK], tokenizer, max_length)]

    def _encode_chunk(self, rows: list[dict], tokenizer, max_length: int) -> list[dict]:
        words = [self._words(r) for r in rows]
        enc = encode_words(tokenizer, words, max_length)
        features = []
        for i, row in enumerate(rows):
            first = first_subtokens(enc.word_ids(i))
            gold = [self._index[t] for t in self._tags(row)]
            token_labels = [IGNORE] * len(enc["input_ids"][i])
            for w, pos in first.items():
                token_labels[pos] = gold[w]
            positions = [first.get(w, -1) for w in range(len(gold))]   # -1: word not in the encoding
            features.append({**compact_inputs(enc, i), "token_labels": np.asarray(token_labels, dtype=np.int16),
                             "positions": positions, "label": gold})
        return features

    def collate_labels(self, features: list[dict], seq_len: int) -> dict[str, Tensor]:
        labels = np.full((len(features), seq_len), IGNORE, dtype=np.int64)
        for row, f in enumerate(features):
            labels[row, :len(f["token_labels"])] = f["token_labels"]
        return {"labels": torch.from_numpy(labels)}

    def loss(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Cross-entropy over labelled tokens only. logits (batch, seq_len, num_tags), labels (batch, seq_len)."""
        return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)

    def predictions(self, logits: Tensor, features: list[dict]) -> list[Any]:
        best = logits.argmax(-1).tolist()
        return [[best[i][p] if p >= 0 else 0 for p in f["positions"]] for i, f in enumerate(features)]

    def references(self, features: list[dict]) -> list[Any]:
        return [f["label"] for f in features]

    def metrics(self, predictions: list[Any], references: list[Any]) -> dict[str, float]:
        from seqeval.metrics import f1_score, precision_score, recall_score   # lazy: it loads sklearn (~100 MB)
        pred = [[self.labels[i] for i in p] for p in predictions]
        gold = [[self.labels[i] for i in g] for g in references]
        return {"f1": float(f1_score(gold, pred, zero_division=0)),
                "precision": float(precision_score(gold, pred, zero_division=0)),
                "recall": float(recall_score(gold, pred, zero_division=0))}

    def postprocess(self, predictions: list[Any], features: list[dict]) -> list[Any]:
        """One feature per sentence: the predictions as they are."""
        return predictions

    def encode_inputs(self, items: list[dict], tokenizer, max_length: int) -> list[Encoded]:
        """Prediction inputs {"text"} -> one single-row Encoded each: the text split by `split_words` and
        encoded by `encode_words` (as training rows are). meta: "text", "word_ids" (per token, None for
        special tokens) and "spans" (per word, its characters [start, end) in the text)."""
        split = [split_words(it["text"]) for it in items]
        enc = encode_words(tokenizer, [[w for w, _, _ in words] for words in split], max_length)
        return [Encoded([model_inputs(enc, i)],
                        {"text": it["text"], "word_ids": enc.word_ids(i), "spans": [(s, e) for _, s, e in split[i]]},
                        bool(enc.encodings[i].overflowing))
                for i, it in enumerate(items)]

    def decode(self, logits: Tensor, inputs: list[Encoded]) -> list[dict]:
        """logits (batch, seq_len, num_tags) -> [{"entities": [{"entity", "text", "start", "end", "score"}]}].
        "entity" is the chunk's type (None for untyped tags such as a bare "B").

        Each word is tagged by its first sub-token; an entity covers whole words, from the first character
        of its first word to the last of its last (start, end: character offsets into the text, end
        exclusive; text: that slice). score: the mean tag probability of its words."""
        probs = logits.float().softmax(-1)
        out = []
        from seqeval.metrics.sequence_labeling import get_entities
        for i, encoded in enumerate(inputs):
            meta = encoded.meta
            first = first_subtokens(meta["word_ids"])
            word_order = sorted(first)
            p = probs[i, [first[w] for w in word_order]]   # (num_words, num_tags)
            score, tag_ids = p.max(-1)
            tags = [self.labels[t] for t in tag_ids.tolist()]
            entities = []
            for etype, a, b in get_entities(tags):
                start, end = meta["spans"][word_order[a]][0], meta["spans"][word_order[b]][1]
                untyped = etype == _UNTYPED and tags[a] in "BIES"
                entities.append({"entity": None if untyped else etype, "text": meta["text"][start:end],
                                 "start": start, "end": end,
                                 "score": float(score[a:b + 1].mean())})
            out.append({"entities": entities})
        return out
