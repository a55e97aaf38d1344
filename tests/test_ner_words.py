"""Word tagging encodes training rows and prediction texts through one path: a raw text is split into words
the way CoNLL-style data is tokenized (`split_words`), so "Anglo-Dutch" is one word at serve time as it was
in training, and an entity maps back to whole-word character spans."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA
from mtlm.config import TaskConfig
from mtlm.model import build_model, load_backbone
from mtlm.predict import Predictor
from mtlm.tasks import build_task
from mtlm.tasks.token_classification import split_words

ROW = {"tokens": ["The", "Anglo-Dutch", "group", "'s", "U.S.", "sales", "did", "not", "rise", "."],
       "tags": ["O", "B-MISC", "O", "O", "B-LOC", "O", "O", "O", "O", "O"]}


@pytest.fixture(scope="module")
def tokenizer(tiny_backbone, tmp_path_factory):
    """The tiny WordPiece vocabulary (words split into several sub-tokens, "-" and "." their own)."""
    from transformers import BertTokenizerFast

    d = tmp_path_factory.mktemp("wordpiece-ner")
    shutil.copy(Path(tiny_backbone) / "vocab.txt", d / "vocab.txt")
    return BertTokenizerFast.from_pretrained(d)


def ner_task():
    task = build_task("ner", TaskConfig(type="token_classification", data={"train": "unused.jsonl"}))
    task.fit([ROW])
    return task


def test_split_words_follows_conll_tokenization():
    text = "John  Smith's Anglo-Dutch firm (U.S.) don't sell 1,000 shares on 1996-08-22... in Zürich."
    words = split_words(text)
    assert [w for w, _, _ in words] == ["John", "Smith", "'s", "Anglo-Dutch", "firm", "(", "U.S.", ")", "don't",
                                        "sell", "1,000", "shares", "on", "1996-08-22", "...", "in", "Zürich", "."]
    assert all(text[s:e] == w for w, s, e in words)


def test_a_training_row_encodes_identically_at_train_and_predict_time(tokenizer):
    """The gold tokens, joined by spaces and sent as raw text, come back as the same words and the same
    input ids and word ids as the training encoding."""
    task = ner_task()
    (trained,) = task.encode([ROW], tokenizer, 64)
    (served,) = task.encode_inputs([{"text": " ".join(ROW["tokens"])}], tokenizer, 64)
    assert [w for w, _, _ in split_words(" ".join(ROW["tokens"]))] == ROW["tokens"]
    assert served.sequences[0]["input_ids"].tolist() == trained["input_ids"].tolist()
    assert served.meta["word_ids"] == tokenizer([ROW["tokens"]], is_split_into_words=True).word_ids(0)
    # the training labels sit on the first sub-token of each served word
    first = {w: p for p, w in reversed(list(enumerate(served.meta["word_ids"]))) if w is not None}
    assert [int(trained["token_labels"][first[w]]) for w in range(len(ROW["tokens"]))] == trained["label"]


def test_anglo_dutch_is_one_word_and_one_whole_word_entity(tiny_backbone, tokenizer):
    """Before: the server tagged the tokenizer's pre-tokenized words ("Anglo", "-", "Dutch"): three entities
    where training saw one word."""
    task = ner_task()
    backbone, _ = load_backbone(tiny_backbone)
    model = build_model(backbone, {"ner": task}, "mean", 0.0).eval()
    with torch.no_grad():                       # force every word's first sub-token to B-MISC
        model.heads["ner"].out.weight.zero_()
        model.heads["ner"].out.bias.copy_(torch.tensor([10.0 if t == "B-MISC" else 0.0 for t in task.labels]))
    predictor = Predictor(model, tokenizer, {"ner": task}, {"max_length": 64}, torch.device("cpu"))
    text = "The Anglo-Dutch group, in Zürich."
    (res,) = predictor.predict([text])
    assert [(e["entity"], e["text"], e["start"], e["end"]) for e in res["ner"]["entities"]] == [
        ("MISC", "The", 0, 3), ("MISC", "Anglo-Dutch", 4, 15), ("MISC", "group", 16, 21), ("MISC", ",", 21, 22),
        ("MISC", "in", 23, 25), ("MISC", "Zürich", 26, 32), ("MISC", ".", 32, 33)]


@pytest.mark.skipif(not (SHARED_DATA / "conll2003" / "dev.jsonl").is_file(), reason="CoNLL-2003 not in shared data")
def test_conll_sentences_come_back_as_their_gold_tokens():
    """On real CoNLL-2003 dev, most space-joined sentences split back into exactly their gold tokens (the
    misses: list numbers "1." and abbreviations "Inc." whose period is split off)."""
    rows = [json.loads(line) for line in (SHARED_DATA / "conll2003" / "dev.jsonl").open()]
    same = sum([w for w, _, _ in split_words(" ".join(r["tokens"]))] == r["tokens"] for r in rows)
    tokens = [t for r in rows for t in r["tokens"]]
    whole = sum([w for w, _, _ in split_words(t)] == [t] for t in tokens)
    assert same / len(rows) > 0.88 and whole / len(tokens) > 0.99


def test_word_encoding_equals_the_text_encoding_for_wordpiece(tokenizer):
    """A text group holding a tagger is encoded by words (`Predictor.encoder`); with a WordPiece tokenizer
    (BERT, MiniLM) that gives the same input ids as the plain text encoding the pooled text tasks were
    trained on, so they share the backbone pass without seeing a different input."""
    from mtlm.tasks.base import tokenize_texts
    from mtlm.tasks.token_classification import encode_words

    texts = ["John  Smith's Anglo-Dutch firm (U.S.) don't sell 1,000 shares... in Zürich.", "a", "x--y ,z"]
    by_words = encode_words(tokenizer, [[w for w, _, _ in split_words(t)] for t in texts], 64)["input_ids"]
    assert by_words == tokenize_texts(tokenizer, texts, None, 64)["input_ids"]
