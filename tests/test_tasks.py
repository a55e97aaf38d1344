"""Task types: losses and metrics against independent references, label maps, thresholds, standardisation,
and token classification's sub-token alignment, truncation and character-offset decoding."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mtlm.config import TaskConfig
from mtlm.tasks import TASK_TYPES, build_task, default_metric
from mtlm.tasks.token_classification import IGNORE, first_subtokens


def make_task(kind: str, name: str = "t", **cfg):
    return build_task(name, TaskConfig(type=kind, data={"train": "unused.csv"}, **cfg))


@pytest.fixture(scope="module")
def word_tokenizer(tiny_backbone, tmp_path_factory):
    """The tiny WordPiece vocabulary, loaded from its vocab.txt (so words split into sub-tokens)."""
    from transformers import BertTokenizerFast

    d = tmp_path_factory.mktemp("wordpiece")
    shutil.copy(Path(tiny_backbone) / "vocab.txt", d / "vocab.txt")
    tok = BertTokenizerFast.from_pretrained(d)
    assert tok.tokenize("Johnny paris") == ["john", "##n", "##y", "paris"]
    return tok


def test_tiny_backbone_tokenizer_knows_its_words(tiny_backbone):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_backbone)
    assert tok.tokenize("the movie paris") == ["the", "movie", "paris"]


# ---------------------------------------------------------------- losses against hand-written references

def log_softmax_by_hand(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    m = x.max(-1, keepdim=True).values
    return x - m - (x - m).exp().sum(-1, keepdim=True).log()


def test_classification_loss_is_cross_entropy():
    task = make_task("classification")
    task.fit([{"text": "x", "label": lab} for lab in "abc"])
    torch.manual_seed(0)
    logits = torch.randn(5, 3) * 3
    labels = torch.tensor([0, 2, 1, 1, 0])
    expected = -log_softmax_by_hand(logits)[torch.arange(5), labels].mean()
    got = task.loss(logits, {"labels": labels})
    assert got.shape == () and float(got) == pytest.approx(float(expected), rel=1e-5)
    # a confident correct prediction costs ~0, a confident wrong one ~ its margin
    sure = torch.tensor([[20.0, 0.0, 0.0]])
    assert float(task.loss(sure, {"labels": torch.tensor([0])})) < 1e-6
    assert float(task.loss(sure, {"labels": torch.tensor([1])})) == pytest.approx(20.0, rel=1e-4)


def test_multilabel_loss_is_mean_bce():
    task = make_task("multilabel")
    task.fit([{"text": "x", "labels": ["a", "b", "c", "d"]}])
    torch.manual_seed(1)
    logits = torch.randn(3, 4) * 2
    target = torch.tensor([[1.0, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]])
    p = 1 / (1 + (-logits.double()).exp())
    expected = -(target * p.log() + (1 - target) * (1 - p).log()).mean()
    assert float(task.loss(logits, {"labels": target})) == pytest.approx(float(expected), rel=1e-5)


def test_regression_loss_is_mse():
    task = make_task("regression")
    logits = torch.tensor([[0.5], [-1.0], [2.0], [0.0]])
    target = torch.tensor([1.0, -1.0, 0.0, 0.25])
    expected = ((0.5 - 1.0) ** 2 + 0.0 + 2.0 ** 2 + 0.25 ** 2) / 4
    assert float(task.loss(logits, {"labels": target})) == pytest.approx(expected, rel=1e-6)


def test_token_loss_is_masked_cross_entropy():
    task = make_task("token_classification")
    task.fit([{"tokens": ["a"], "tags": ["B-X"]}])      # labels O, B-X
    torch.manual_seed(2)
    logits = torch.randn(2, 5, 2) * 2
    labels = torch.tensor([[IGNORE, 1, 0, IGNORE, IGNORE], [IGNORE, 0, IGNORE, 1, 1]])
    logp = log_softmax_by_hand(logits)
    picked = [logp[b, t, labels[b, t]] for b in range(2) for t in range(5) if labels[b, t] != IGNORE]
    expected = -sum(picked) / len(picked)
    got = task.loss(logits, {"labels": labels})
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    # changing a logit at an ignored position leaves the loss unchanged
    logits2 = logits.clone()
    logits2[0, 0] += 100
    logits2[1, 2] -= 100
    assert float(task.loss(logits2, {"labels": labels})) == pytest.approx(float(got), rel=1e-6)


# ---------------------------------------------------------------- metrics on known inputs

def test_classification_metrics_by_hand():
    task = make_task("classification")
    refs = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 2, 0]
    m = task.metrics(preds, refs)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # per class F1 = 2TP / (2TP + FP + FN): class 0: 2/4, class 1: 4/5, class 2: 2/3
    assert m["macro_f1"] == pytest.approx((2 / 4 + 4 / 5 + 2 / 3) / 3)
    # multi-class MCC (Gorodkin): (c*s - sum p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2))
    c, s, p, t = 4, 6, [2, 3, 1], [2, 2, 2]
    mcc = (c * s - sum(a * b for a, b in zip(p, t))) / math.sqrt((s * s - sum(a * a for a in p)) *
                                                                 (s * s - sum(b * b for b in t)))
    assert m["mcc"] == pytest.approx(mcc)
    assert set(m) == set(task.metric_names)


def test_binary_mcc_by_hand_and_perfect_scores():
    task = make_task("classification")
    refs = [1, 1, 1, 0, 0, 0, 0, 1]
    preds = [1, 1, 0, 0, 0, 1, 0, 1]
    tp, tn, fp, fn = 3, 3, 1, 1
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert task.metrics(preds, refs)["mcc"] == pytest.approx(mcc)
    assert task.metrics(refs, refs) == {"accuracy": 1.0, "macro_f1": 1.0, "mcc": 1.0}


def test_multilabel_metrics_with_per_label_thresholds():
    task = make_task("multilabel")
    task.fit([{"text": "x", "labels": ["a", "b"]}])
    gold = [[1, 0], [1, 1], [0, 1], [0, 0]]
    probs = [[0.9, 0.2], [0.6, 0.4], [0.3, 0.7], [0.55, 0.1]]
    assert task.thresholds == [0.5, 0.5]
    m = task.metrics(probs, gold)
    # predictions [[1,0],[1,0],[0,1],[1,0]]: label a TP2 FP1 FN0, label b TP1 FP0 FN1
    assert m["micro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert m["macro_f1"] == pytest.approx((4 / 5 + 2 / 3) / 2)
    assert m["subset_accuracy"] == pytest.approx(2 / 4)
    task.thresholds = [0.7, 0.35]
    m = task.metrics(probs, gold)
    # predictions [[1,0],[0,1],[0,1],[0,0]]: label a TP1 FN1, label b TP2
    assert m["micro_f1"] == pytest.approx(6 / 7)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert m["subset_accuracy"] == pytest.approx(3 / 4)
    # decode applies the same per-label thresholds
    logits = torch.logit(torch.tensor(probs))
    decoded = task.decode(logits, [{}] * 4)
    assert [d["labels"] for d in decoded] == [["a"], ["b"], ["b"], []]
    assert decoded[0]["scores"]["a"] == pytest.approx(0.9, abs=1e-6)


def test_tune_thresholds():
    task = make_task("multilabel", threshold=0.4)
    task.fit([{"text": "x", "labels": ["a", "b", "c"]}])
    assert task.thresholds == [0.4, 0.4, 0.4]
    probs = [[0.30, 0.90, 0.1], [0.35, 0.95, 0.3], [0.10, 0.80, 0.2], [0.12, 0.82, 0.35]]
    gold = [[1, 1, 0], [1, 1, 0], [0, 0, 0], [0, 0, 0]]
    task.tune_thresholds(probs, gold)
    a, b, c = task.thresholds
    assert a == pytest.approx(0.15)      # the first grid point that separates 0.12 from 0.30
    assert b == pytest.approx(0.85)      # the first grid point that separates 0.82 from 0.90
    assert c == 0.4                      # no positives: F1 is 0 everywhere, threshold kept
    assert task.metrics(probs, gold)["micro_f1"] == 1.0
    assert task.state() == {"labels": ["a", "b", "c"], "thresholds": task.thresholds}


def test_regression_metrics_by_hand():
    task = make_task("regression")
    p = [1.0, 2.0, 3.0, 4.0, 5.0]
    r = [2.0, 1.0, 4.0, 3.0, 6.0]
    m = task.metrics(p, r)
    pa, ra = np.array(p) - 3, np.array(r) - 3.2
    assert m["pearson"] == pytest.approx(float((pa * ra).sum() / math.sqrt((pa ** 2).sum() * (ra ** 2).sum())))
    # Spearman without ties: 1 - 6 sum d^2 / (n (n^2 - 1)); ranks of r are 2,1,4,3,5
    d = np.array([1, 2, 3, 4, 5]) - np.array([2, 1, 4, 3, 5])
    assert m["spearman"] == pytest.approx(1 - 6 * (d ** 2).sum() / (5 * 24))
    assert m["mse"] == pytest.approx(1.0)
    # correlation is undefined for a constant prediction: 0, not NaN
    m = task.metrics([2.0] * 5, r)
    assert m["pearson"] == 0.0 and m["spearman"] == 0.0 and m["mse"] == pytest.approx(np.mean((np.array(r) - 2) ** 2))


def test_token_metrics_entity_level_by_hand():
    task = make_task("token_classification")
    task.fit([{"tokens": list("abc"), "tags": ["B-PER", "I-PER", "B-LOC"]}])
    idx = {t: i for i, t in enumerate(task.labels)}
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-LOC", "O"], ["B-PER", "I-PER"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["O", "O", "B-PER"], ["B-PER", "O"]]
    # gold entities: PER(s0), LOC(s0), LOC(s1), PER(s2) = 4; predicted: PER(s0), PER(s1), PER(s2, cut short) = 3
    # correct: only PER(s0) (a partial span does not count)
    m = task.metrics([[idx[t] for t in s] for s in pred], [[idx[t] for t in s] for s in gold])
    assert m["precision"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(1 / 4)
    assert m["f1"] == pytest.approx(2 * (1 / 3) * (1 / 4) / (1 / 3 + 1 / 4))


def test_default_metrics_are_the_first_listed():
    assert default_metric(make_task("classification")) == "accuracy"
    assert default_metric(make_task("multilabel")) == "micro_f1"
    assert default_metric(make_task("regression")) == "pearson"
    assert default_metric(make_task("token_classification")) == "f1"
    assert default_metric(make_task("regression", metric="mse")) == "mse"
    assert default_metric(make_task("extractive_qa")) == "f1"
    assert default_metric(make_task("multiple_choice")) == "accuracy"
    assert default_metric(make_task("generation")) == "rouge_l"
    assert set(TASK_TYPES) == {"classification", "multilabel", "regression", "token_classification",
                               "extractive_qa", "multiple_choice", "generation"}


# ---------------------------------------------------------------- label maps, state, heads

def test_classification_label_map_numeric_sorts_numerically():
    task = make_task("classification")
    task.fit([{"text": "x", "label": v} for v in (10, 2, "1", 2.0, "10")])
    assert task.labels == ["1", "2", "10"]
    assert task.label_fields({"text": "x", "label": 10}) == {"label": 2}
    assert task.label_fields({"text": "x", "label": "2"}) == {"label": 1}
    assert task.check_eval_rows([{"label": 3}, {"label": "1"}, {"label": 30}]) == ["label(s) not seen in train: '3', '30'"]
    task.fit([{"text": "x", "label": v} for v in ("pos", "neg", "neutral", "pos")])
    assert task.labels == ["neg", "neutral", "pos"]
    task.fit([{"text": "x", "label": v} for v in ("b", 3, "a", 20)])
    assert task.labels == ["3", "20", "a", "b"]        # numbers first, numerically; then text


def test_classification_state_round_trip():
    task = make_task("classification")
    task.fit([{"text": "x", "label": v} for v in "cab"])
    other = make_task("classification")
    other.load_state(task.state())
    assert other.labels == ["a", "b", "c"]
    assert other.label_fields({"text": "x", "label": "c"}) == {"label": 2}


def test_multilabel_label_map_from_lists_and_separated_strings():
    task = make_task("multilabel", label_separator="|")
    rows = [{"text": "x", "labels": ["joy", "anger"]}, {"text": "y", "labels": "surprise| joy"},
            {"text": "z", "labels": [10, 2]}, {"text": "w", "labels": []}]
    assert all(task.check_row(r) == [] for r in rows)
    task.fit(rows)
    assert task.labels == ["2", "10", "anger", "joy", "surprise"]
    assert task.label_fields(rows[1]) == {"label": [0.0, 0.0, 0.0, 1.0, 1.0]}
    assert task.label_fields(rows[3]) == {"label": [0.0] * 5}
    assert task.check_eval_rows([{"labels": ["fear", "joy"]}]) == ["label(s) not seen in train: 'fear'"]


def test_token_label_map():
    task = make_task("token_classification")
    task.fit([{"tokens": ["a", "b", "c"], "tags": ["I-PER", "B-PER", "B-LOC"]},
              {"tokens": ["a"], "tags": ["B-MISC"]}])
    assert task.labels == ["O", "B-LOC", "B-MISC", "B-PER", "I-PER"]     # O first, always present
    assert task.check_eval_rows([{"tokens": ["a"], "tags": ["I-LOC"]}]) == ["tag(s) not seen in train: 'I-LOC'"]


def test_heads_output_shapes():
    x_pooled, x_tokens = torch.randn(4, 16), torch.randn(4, 7, 16)
    cls = make_task("classification"); cls.fit([{"text": "x", "label": v} for v in "abc"])
    ml = make_task("multilabel"); ml.fit([{"text": "x", "labels": ["a", "b"]}])
    reg = make_task("regression"); reg.fit([{"text": "x", "score": 1.0}])
    tok = make_task("token_classification"); tok.fit([{"tokens": ["a"], "tags": ["B-X"]}])
    assert cls.make_head(16, 0.1)(x_pooled).shape == (4, 3)
    assert ml.make_head(16, 0.1)(x_pooled).shape == (4, 2)
    assert reg.make_head(16, 0.1)(x_pooled).shape == (4, 1)
    assert tok.make_head(16, 0.1)(x_tokens).shape == (4, 7, 2)
    assert [t.head_input for t in (cls, ml, reg, tok)] == ["pooled", "pooled", "pooled", "tokens"]


# ---------------------------------------------------------------- regression standardisation

def test_regression_standardisation_round_trip(word_tokenizer):
    task = make_task("regression", columns={"score": "y"})
    rows = [{"text": "good movie", "y": v} for v in (1.0, 2, "3", 4.0, 10.0)]
    assert all(task.check_row(r) == [] for r in rows)
    task.fit(rows)
    assert task.mean == pytest.approx(4.0) and task.std == pytest.approx(math.sqrt(10.0))
    feats = task.encode(rows, word_tokenizer, 16)
    z = np.array([f["label"] for f in feats])
    assert z.mean() == pytest.approx(0.0, abs=1e-9) and z.std() == pytest.approx(1.0)
    assert task.references(feats) == pytest.approx([1.0, 2.0, 3.0, 4.0, 10.0])
    logits = torch.tensor(z, dtype=torch.float).unsqueeze(-1)            # a perfect standardised prediction
    assert task.predictions(logits, feats) == pytest.approx([1.0, 2.0, 3.0, 4.0, 10.0], rel=1e-5)
    assert [d["value"] for d in task.decode(logits, [{}] * 5)] == pytest.approx([1, 2, 3, 4, 10], rel=1e-5)
    other = make_task("regression", columns={"score": "y"})
    other.load_state(task.state())
    assert (other.mean, other.std) == (task.mean, task.std)
    # a constant target keeps std 1 (no division by zero)
    task.fit([{"text": "x", "y": 3.0}] * 4)
    assert (task.mean, task.std) == (3.0, 1.0)


# ---------------------------------------------------------------- token classification: alignment, truncation, decode

def test_first_subtokens():
    assert first_subtokens([None, 0, 0, 0, 1, 2, 2, None]) == {0: 1, 1: 4, 2: 5}
    assert first_subtokens([None, 0, 2, None]) == {0: 1, 2: 2}       # word 1 produced no token
    assert first_subtokens([None, None]) == {}


def test_first_subtoken_label_alignment(word_tokenizer):
    task = make_task("token_classification")
    rows = [{"tokens": ["Johnny", "smithy", "went", "to", "paris"], "tags": ["B-PER", "I-PER", "O", "O", "B-LOC"]}]
    task.fit(rows)
    lab = {t: i for i, t in enumerate(task.labels)}
    (f,) = task.encode(rows, word_tokenizer, 32)
    tokens = word_tokenizer.convert_ids_to_tokens(f["input_ids"])
    assert tokens == ["[CLS]", "john", "##n", "##y", "smith", "##y", "went", "to", "paris", "[SEP]"]
    assert f["token_labels"].tolist() == [IGNORE, lab["B-PER"], IGNORE, IGNORE, lab["I-PER"], IGNORE, lab["O"], lab["O"],
                                 lab["B-LOC"], IGNORE]
    assert f["positions"] == [1, 4, 6, 7, 8]
    assert f["label"] == [lab[t] for t in rows[0]["tags"]]
    assert f["length"] == len(f["input_ids"]) == len(f["token_type_ids"])
    padded = task.collate_labels([f, {**f, "token_labels": f["token_labels"][:4]}], 12)["labels"]
    assert padded.shape == (2, 12) and padded[0, 10:].tolist() == [IGNORE, IGNORE]
    assert padded[1, 4:].tolist() == [IGNORE] * 8


def test_truncated_words_count_as_O(word_tokenizer):
    task = make_task("token_classification")
    rows = [{"tokens": ["john", "smith", "went", "to", "paris", "london"],
             "tags": ["B-PER", "I-PER", "O", "O", "B-LOC", "B-LOC"]}]
    task.fit(rows)
    (f,) = task.encode(rows, word_tokenizer, 6)         # [CLS] + 4 words + [SEP]: paris, london cut
    assert len(f["input_ids"]) == 6 and f["positions"] == [1, 2, 3, 4, -1, -1]
    assert len(f["label"]) == 6                          # the references keep every word
    # logits that predict the gold tag of every visible token, and B-LOC everywhere else
    logits = torch.zeros(1, 6, len(task.labels))
    logits[..., task.labels.index("B-LOC")] = 1.0
    for w, pos in enumerate(f["positions"][:4]):
        logits[0, pos, f["label"][w]] = 5.0
    (pred,) = task.predictions(logits, [f])
    assert pred == f["label"][:4] + [0, 0] and task.labels[0] == "O"
    m = task.metrics([pred], task.references([f]))
    assert m["precision"] == 1.0 and m["recall"] == pytest.approx(1 / 3)     # both LOC entities lost


def test_word_without_tokens_keeps_later_labels_aligned(word_tokenizer):
    task = make_task("token_classification")
    rows = [{"tokens": ["john", "\u00ad", "paris"], "tags": ["B-PER", "O", "B-LOC"]}]
    assert task.check_row(rows[0]) == []
    task.fit(rows)
    (f,) = task.encode(rows, word_tokenizer, 32)
    assert word_tokenizer.convert_ids_to_tokens(f["input_ids"]) == ["[CLS]", "john", "paris", "[SEP]"]
    assert f["token_labels"][2] == task.labels.index("B-LOC")


def test_decode_entity_spans_slice_the_text(word_tokenizer):
    from mtlm.predict import Predictor

    task = make_task("token_classification")
    task.fit([{"tokens": ["a", "b", "c"], "tags": ["B-PER", "I-PER", "B-LOC"]}])
    text = "Johnny  Smith went to Zürich, London."
    predictor = Predictor(None, word_tokenizer, {"ner": task}, {"max_length": 64}, torch.device("cpu"))
    (encoded,) = predictor.encode([{"text": text}], ("text",))
    words = ["johnny", "smith", "went", "to", "zurich", ",", "london", "."]
    tags = ["B-PER", "I-PER", "O", "O", "B-LOC", "O", "B-LOC", "O"]
    word_ids = encoded.meta["word_ids"]
    assert max(w for w in word_ids if w is not None) == len(words) - 1
    logits = torch.zeros(1, len(word_ids), len(task.labels))
    first = set(first_subtokens(word_ids).values())
    for pos, w in enumerate(word_ids):
        if w is None:
            continue
        # the first sub-token carries the tag; later sub-tokens say something else (they must be ignored)
        tag = tags[w] if pos in first else "B-PER"
        logits[0, pos, task.labels.index(tag)] = 8.0
    (out,) = task.decode(logits, [encoded])
    ents = out["entities"]
    assert [(e["entity"], e["text"], e["start"], e["end"]) for e in ents] == [
        ("PER", "Johnny  Smith", 0, 13), ("LOC", "Zürich", 22, 28), ("LOC", "London", 30, 36)]
    for e in ents:
        assert text[e["start"]:e["end"]] == e["text"]
        assert 0.99 < e["score"] <= 1.0


# ---------------------------------------------------------------- untyped BIO tags (B, I, O)

def test_untyped_bio_tags_check_fit_score_and_decode(word_tokenizer):
    """Tags without an entity type (chunking; single-type NER) are accepted; seqeval scores them (hand-
    computed below) and decoded entities carry "entity": None."""
    from mtlm.predict import Predictor

    task = make_task("token_classification")
    rows = [{"tokens": ["john", "smith", "went", "to", "paris"], "tags": ["B", "I", "O", "O", "B"]}]
    assert task.check_row(rows[0]) == []
    assert task.check_row({"tokens": ["a"], "tags": ["X"]})[0][1].startswith("not a BIO tag: 'X'")
    task.fit(rows)
    assert task.labels == ["O", "B", "I"]
    (f,) = task.encode(rows, word_tokenizer, 32)
    gold = task.references([f])
    # predicted chunks: [john smith] right, [went] wrong, [paris] missed -> precision 1/2, recall 1/2
    pred = [[task.labels.index(t) for t in ["B", "I", "B", "O", "O"]]]
    m = task.metrics(pred, gold)
    assert m == {"f1": 0.5, "precision": 0.5, "recall": 0.5}

    text = "John Smith went to Paris"
    predictor = Predictor(None, word_tokenizer, {"chunks": task}, {"max_length": 32}, torch.device("cpu"))
    (encoded,) = predictor.encode([{"text": text}], ("text",))
    word_ids = encoded.meta["word_ids"]
    logits = torch.zeros(1, len(word_ids), len(task.labels))
    for word, pos in first_subtokens(word_ids).items():
        logits[0, pos, task.labels.index(["B", "I", "O", "O", "B"][word])] = 10.0
    (res,) = task.decode(logits, [encoded])
    assert [(e["entity"], e["text"]) for e in res["entities"]] == [(None, "John Smith"), (None, "Paris")]


def test_untyped_bio_tags_train_and_predict_end_to_end(tiny_backbone, toy_data, tmp_path):
    """A recipe whose tags are untyped trains (seqeval f1 in the metrics), saves, loads and predicts."""
    import json

    import mtlm
    from conftest import write_recipe
    lines = (toy_data / "ner.jsonl").read_text().splitlines()
    with open(tmp_path / "chunks.jsonl", "w") as f:
        for line in lines:
            row = json.loads(line)
            f.write(json.dumps({"tokens": row["tokens"], "tags": [t.split("-")[0] for t in row["tags"]]}) + "\n")
    recipe = {"name": "chunks", "backbone": tiny_backbone, "max_length": 32, "output_dir": str(tmp_path / "run"),
              "tasks": {"chunks": {"type": "token_classification", "data": {"train": str(tmp_path / "chunks.jsonl")}}},
              "train": {"batch_size": 8, "max_steps": 4, "eval_every": 4, "lr": 1e-3, "warmup_ratio": 0.0}}
    run = mtlm.fit(mtlm.load_recipe(write_recipe(tmp_path / "recipe.yaml", recipe)), progress=False)
    history = json.loads((run / "metrics.json").read_text())["eval"]
    assert {"chunks/f1", "chunks/precision", "chunks/recall"} <= set(history[-1])
    predictor = mtlm.load(run, device="cpu")
    assert set(predictor.tasks["chunks"].labels) == {"O", "B", "I"}
    head = predictor.model.heads["chunks"].out
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([10.0 if t == "B" else 0.0 for t in predictor.tasks["chunks"].labels]))
    (res,) = predictor.predict(["john went to paris"], tasks=["chunks"])
    assert [(e["entity"], e["text"]) for e in res["chunks"]["entities"]] == \
        [(None, "john"), (None, "went"), (None, "to"), (None, "paris")]


def test_classification_macro_f1_counts_every_known_label():
    """Three known labels, the split holds two, both predicted right: macro-F1 is 2/3 (the third label's F1 is
    0), not 1.0 over only the labels present."""
    from mtlm.config import DataConfig, TaskConfig
    from mtlm.tasks import build_task
    task = build_task("t", TaskConfig(type="classification", data=DataConfig(train="x.csv")))
    task.fit([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": "c", "label": "z"}])
    m = task.metrics([0, 1, 0, 1], [0, 1, 0, 1])
    assert m["accuracy"] == 1.0 and m["macro_f1"] == pytest.approx(2 / 3)
