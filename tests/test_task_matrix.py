"""The behaviour matrix: every task type through the same checks, the way PEFT tests every method.

For each type (classification, pair classification, multilabel, regression, token classification,
extractive QA, multiple choice): fit its state on rows, encode, collate, a finite loss that decreases after a
few optimizer steps on a tiny random backbone, postprocess (one prediction per example), decode through the
Predictor, save/load of a bundle (same outputs after reload), and predict from the loaded bundle."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

import mtlm
from conftest import WORDS
from mtlm.checkpoint import save_bundle
from mtlm.config import Recipe, TaskConfig
from mtlm.data import collate
from mtlm.encoded import Encoded
from mtlm.model import build_model, load_backbone
from mtlm.predict import Predictor, normalize_input
from mtlm.tasks import TASK_TYPES, build_task

MAX_LENGTH = 32


@dataclass
class Case:
    type: str
    config: dict                      # TaskConfig fields beyond type and data
    rows: Callable[[random.Random], list[dict]]
    inputs: list[Any]                 # prediction inputs
    check: Callable[[dict, Any], None]   # (one result, its input) -> asserts the result's shape and values


def _text(rng, n=6):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def class_rows(rng):
    return [{"text": _text(rng) + (" great" if i % 2 else " bad"), "label": "pos" if i % 2 else "neg"}
            for i in range(16)]


def pair_rows(rng):
    out = []
    for i in range(16):
        a = _text(rng, 4)
        out.append({"a": a, "b": a if i % 2 else _text(rng, 4), "label": "same" if i % 2 else "different"})
    return out


def multilabel_rows(rng):
    out = []
    for i in range(16):
        labels = [lab for lab, bit in (("joy", i & 1), ("anger", i & 2)) if bit]
        out.append({"text": _text(rng, 3) + (" fun" if i & 1 else "") + (" hated" if i & 2 else ""),
                    "labels": labels})
    return out


def regression_rows(rng):
    return [{"text": " ".join(["good"] * (i % 5) + ["the"] * 3), "score": float(i % 5)} for i in range(16)]


def tagging_rows(rng):
    out = []
    for _ in range(16):
        tokens, tags = [], []
        for _ in range(rng.randint(2, 6)):
            if rng.random() < 0.3:
                tokens += ["john", "smith"]
                tags += ["B-PER", "I-PER"]
            else:
                tokens.append(rng.choice(["the", "went", "to", "paris"]))
                tags.append("B-LOC" if tokens[-1] == "paris" else "O")
        out.append({"tokens": tokens, "tags": tags})
    return out


def qa_rows(rng):
    out = []
    for _ in range(12):
        before, after = _text(rng, rng.randint(0, 20)), _text(rng, rng.randint(5, 30))
        context = f"{before} john smith {after}".strip()
        start = context.index("john smith")
        out.append({"question": "who went to paris", "context": context,
                    "answers": {"text": ["john smith"], "answer_start": [start]}})
    return out


def mc_rows(rng):
    out = []
    for i in range(12):
        choices = [_text(rng, 2) for _ in range(2 + i % 3)]
        out.append({"context": _text(rng, 5), "choices": choices, "label": i % len(choices)})
    return out


def _check_class(res, item):
    assert res["label"] in res["scores"] and res["score"] == max(res["scores"].values())
    assert sum(res["scores"].values()) == pytest.approx(1.0, abs=1e-5)


def _check_multilabel(res, item):
    assert set(res["scores"]) == {"anger", "joy"} and set(res["labels"]) <= {"anger", "joy"}


def _check_regression(res, item):
    assert isinstance(res["value"], float)


def _check_tagging(res, item):
    assert res["entities"], "every input names john smith, which the steps above taught as PER"
    for e in res["entities"]:
        assert item[e["start"]:e["end"]] == e["text"] and e["entity"] in ("PER", "LOC")


def _check_qa(res, item):
    assert res["no_answer"] is False and 0 < res["score"] <= 1     # v1.1 (no allow_no_answer): a span always
    assert item["context"][res["start"]:res["end"]] == res["answer"] != ""


def _check_mc(res, item):
    assert res["label"] == item["choices"][res["index"]] and len(res["scores"]) == len(item["choices"])


CASES = {
    "classification": Case("classification", {}, class_rows, ["the movie was great", "bad plot"], _check_class),
    "pair_classification": Case("classification", {"columns": {"text": "a", "text_pair": "b"}}, pair_rows,
                                [{"text": "john went", "text_pair": "john went"},
                                 {"text": "a b", "text_pair": "stock market"}], _check_class),
    "multilabel": Case("multilabel", {}, multilabel_rows, ["fun and hated", "the plot"], _check_multilabel),
    "regression": Case("regression", {}, regression_rows, ["good good the", "the the"], _check_regression),
    "token_classification": Case("token_classification", {}, tagging_rows,
                                 ["john smith went to paris .", "john smith , the Anglo-Dutch group"], _check_tagging),
    "extractive_qa": Case("extractive_qa", {"doc_stride": 8}, qa_rows,
                          [{"question": "who went to paris", "context": "the film was fun and john smith went to "
                                                                        "paris on the plot of a story " * 3},
                           {"question": "who", "context": "john smith"}], _check_qa),
    "multiple_choice": Case("multiple_choice", {}, mc_rows,
                            [{"text": "stock market", "choices": ["shares", "goal", "match"]},
                             {"text": "the team", "choices": ["won", "fell"]}], _check_mc),
}


# Types that need a decoder backbone (the matrix runs a tiny encoder): tests/test_generation.py runs them through
# the same checks on a tiny random Llama (loss, fit, evaluate, bundle round trip, predict).
DECODER_TYPES = {"generation"}


def test_every_task_type_has_a_case():
    assert {c.type for c in CASES.values()} | DECODER_TYPES == set(TASK_TYPES)
    assert not DECODER_TYPES & {c.type for c in CASES.values()}


def fitted_task(name: str, case: Case):
    """The case's task (named `name`), fitted on its rows (which must all be well formed)."""
    rows = case.rows(random.Random(0))
    task = build_task(name, TaskConfig(type=case.type, data={"train": "unused.jsonl"}, **case.config))
    assert [task.check_row(r) for r in rows] == [[]] * len(rows)
    task.fit(rows)
    return task, rows


@pytest.fixture(scope="module")
def backbone(tiny_backbone):
    return load_backbone(tiny_backbone)


@pytest.mark.parametrize("key", list(CASES))
def test_task_type_behaviour(key, backbone, tiny_backbone, tmp_path):
    case = CASES[key]
    name = key.replace("_", "-")
    _, tokenizer = backbone
    backbone_model, _ = load_backbone(tiny_backbone)          # a fresh copy: this test trains it
    torch.manual_seed(0)
    task, rows = fitted_task(name, case)

    # encode + collate: one padded micro-batch with labels; the rows of multi-row examples line up
    feats = task.encode(rows, tokenizer, MAX_LENGTH)
    assert len(feats) >= len(rows) and all(f["length"] <= MAX_LENGTH * max(1, len(f.get("sequences", [0])))
                                           for f in feats)
    batch = collate(task, feats, tokenizer.pad_token_id)
    n_rows = sum(len(f.get("sequences", (f,))) for f in feats)
    assert batch["input_ids"].shape[0] == batch["attention_mask"].shape[0] == n_rows
    assert batch["input_ids"].shape[1] <= MAX_LENGTH and "labels" in batch

    # loss: finite, and lower after a few optimizer steps on this batch
    model = build_model(backbone_model, {name: task}, "mean", 0.0)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = task.loss(model(task=name, **inputs), batch)
        assert loss.ndim == 0 and torch.isfinite(loss)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0], losses

    # predictions -> postprocess: one per example, lined up with the references
    model.eval()
    with torch.no_grad():
        logits = model(task=name, **inputs)
    preds = task.postprocess(task.predictions(logits, feats), feats)
    assert len(preds) == len(task.references(feats)) == len(rows)
    assert set(task.metrics(preds, task.references(feats))) == set(task.metric_names) - (
        {"has_ans_f1", "has_ans_exact_match", "no_ans_exact_match"} if key == "extractive_qa" else set())

    # encode_inputs -> Encoded; decode through the Predictor (the engine), checked per type
    encoded = task.encode_inputs([normalize_input(x, i) for i, x in enumerate(case.inputs)],
                                 tokenizer, MAX_LENGTH)
    assert all(isinstance(e, Encoded) and e.rows >= 1 and set(e.sequences[0]) <= {"input_ids", "token_type_ids"}
               for e in encoded)
    predictor = Predictor(model, tokenizer, {name: task}, {"max_length": MAX_LENGTH}, torch.device("cpu"))
    results = predictor.predict(case.inputs)
    assert [list(r) for r in results] == [[name]] * len(case.inputs)
    for item, res in zip(case.inputs, results):
        case.check(res[name], item)

    # save/load: the reloaded bundle predicts the same
    recipe = Recipe.model_validate({"name": f"matrix-{key}".replace("_", "-"), "backbone": tiny_backbone,
                                    "max_length": MAX_LENGTH, "tasks": {name: task.cfg.model_dump()}})
    save_bundle(model, tokenizer, {name: task}, recipe, tmp_path / "model")
    again = mtlm.load(tmp_path, device="cpu")
    assert again.tasks[name].state() == task.state()
    for a, b in zip(results, again.predict(case.inputs)):
        assert_same(a[name], b[name])


def assert_same(a, b, where="result"):
    """Equal structures, floats within 1e-5 (the same weights; summation order may differ)."""
    if isinstance(a, float):
        assert b == pytest.approx(a, abs=1e-5), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where
