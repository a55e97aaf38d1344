"""Multiple choice / response selection: variable choice counts in one batch, the grouped loss against a
per-example reference, labels by index or text, metrics, a multi-task run with save/load/predict, and the
chatterbot response-selection builtin."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import random

import pytest
import torch
import torch.nn.functional as F

import mtlm
from conftest import write_recipe
from mtlm.config import RecipeError, TaskConfig
from mtlm.recipe import load_recipe, parse_recipe
from mtlm.data import collate, prepare_rows
from mtlm.predict import InputError
from mtlm.tasks import build_task
from mtlm.tasks.multiple_choice import MISSING, RIGHT, WRONG

TOPICS = {"finance": "stock market shares bank profit", "sport": "team match goal player season",
          "film": "movie film plot acting story", "travel": "paris london went to"}


def mc_task(**cfg):
    return build_task("reply", TaskConfig(type="multiple_choice", data={"train": "unused.jsonl"}, **cfg))


def mc_row(rng: random.Random, n_choices: int) -> dict:
    """Context from one topic; the right choice from the same topic, the others from other topics."""
    topics = rng.sample(list(TOPICS), min(n_choices, len(TOPICS)))
    words = lambda t: " ".join(rng.sample(TOPICS[t].split(), 3))  # noqa: E731
    choices = [words(t) for t in topics] + [words(topics[-1]) + " it" for _ in range(n_choices - len(topics))]
    order = list(range(n_choices))
    rng.shuffle(order)
    choices, label = [choices[i] for i in order], order.index(0)
    return {"context": words(topics[0]) + " " + words(topics[0]), "choices": choices,
            "label": label if rng.random() < 0.5 else choices[label]}


@pytest.fixture(scope="module")
def tokenizer(tiny_backbone):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_backbone)


def test_two_and_five_choices_in_one_batch(tokenizer):
    task = mc_task()
    rows = [{"context": "the team won", "choices": ["a goal", "shares fell"], "label": 0},
            {"context": "stock market", "choices": ["goal", "paris", "bank profit", "film", "it"], "label": "bank profit"}]
    assert all(task.check_row(r) == [] for r in rows)
    feats = task.encode(rows, tokenizer, 16)
    assert [len(f["sequences"]) for f in feats] == [2, 5] and [f["label"] for f in feats] == [0, 2]
    batch = collate(task, feats, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 7                      # one backbone row per (context, choice)
    assert batch["labels"].tolist() == [[RIGHT, WRONG, MISSING, MISSING, MISSING],
                                        [WRONG, WRONG, RIGHT, WRONG, WRONG]]
    second = tokenizer.decode(batch["input_ids"][4][batch["attention_mask"][4].bool()])
    assert second == "[CLS] stock market [SEP] bank profit [SEP]"
    logits = torch.randn(7, 1, requires_grad=True)
    loss = task.loss(logits, {"labels": batch["labels"]})
    want = (F.cross_entropy(logits[:2, 0][None], torch.tensor([0])) +
            F.cross_entropy(logits[2:, 0][None], torch.tensor([2]))) / 2
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert [len(p) for p in task.predictions(logits.detach(), feats)] == [2, 5]


def test_labels_by_index_or_text_several_columns_and_bad_rows():
    task = mc_task()
    choices = ["yes", "no", "maybe"]
    assert [task._label({"label": v}, choices) for v in (2, "1", 0.0, "maybe", " no ")] == [2, 1, 0, 2, 1]
    assert task.check_row({"context": "q", "choices": choices, "label": "perhaps"}) == \
        [("label", "'perhaps' is neither the text of a choice nor an index in 0..2")]
    assert task.check_row({"context": "q", "choices": choices, "label": 3})[0][0] == "label"
    assert task.check_row({"context": "q", "choices": ["only one"], "label": 0})[0][0] == "choices"
    assert task.check_row({"context": "q", "choices": ["a", ""], "label": 0})[0][0] == "choices"
    assert task.check_row({"context": " ", "choices": choices, "label": 0})[0][0] == "context"
    cols = mc_task(columns={"context": "startphrase", "choices": ["ending0", "ending1"]})
    row = {"startphrase": "a man", "ending0": "sits", "ending1": "flies", "label": 1}
    assert cols.check_row(row) == [] and cols._choices(row) == ["sits", "flies"]
    raw = {"name": "x", "tasks": {"t": {"type": "classification", "data": {"train": "a.csv"},
                                        "columns": {"text": ["a", "b"]}}}}
    with pytest.raises(RecipeError, match=r"tasks\.t\.columns\.text: give one column name, not a list"):
        parse_recipe(raw, pathlib.Path("."))


def test_metrics_hand_computed():
    m = mc_task().metrics([[0.1, 0.9], [0.5, 0.2, 0.3, 0.0, 0.1], [1.0, 1.0, 0.0]], [1, 2, 0])
    # ranks: 1; 2 (0.5 above 0.3); 2 (a tie ranks the right choice below)
    assert m == pytest.approx({"accuracy": 1 / 3, "mrr": (1 + 0.5 + 0.5) / 3, "recall_at_2": 1.0})


@pytest.fixture(scope="module")
def mc_run(tiny_backbone, toy_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("mc")
    rng = random.Random(0)
    with open(d / "mc.jsonl", "w") as f:
        for _ in range(80):
            f.write(json.dumps(mc_row(rng, rng.randint(2, 5))) + "\n")
    recipe = {"name": "mc-toy", "backbone": tiny_backbone, "max_length": 32, "output_dir": str(d / "run"),
              "tasks": {"reply": {"type": "multiple_choice", "data": {"train": str(d / "mc.jsonl")}},
                        "topic": {"type": "classification", "data": {"train": str(toy_data / "topic.jsonl")}}},
              "train": {"batch_size": 8, "max_steps": 6, "eval_every": 3, "lr": 1e-3, "warmup_ratio": 0.0}}
    return mtlm.fit(load_recipe(write_recipe(d / "recipe.yaml", recipe)), progress=False)


def test_mc_trains_saves_loads_and_predicts(mc_run):
    from mtlm.evaluate import evaluate_bundle
    history = json.loads((mc_run / "metrics.json").read_text())["eval"]
    assert {"reply/accuracy", "reply/mrr", "reply/recall_at_2", "topic/accuracy"} <= set(history[-1])
    metrics, _, _ = evaluate_bundle(mc_run, "test")
    # evaluation (training features, collate, model forward) and prediction (encode_inputs, engine, decode)
    # agree on every test row: accuracy and recall@2 recomputed from the predicted choice probabilities
    recipe = load_recipe(mc_run.parent / "recipe.yaml")
    rows = prepare_rows(recipe, {n: build_task(n, recipe.tasks[n]) for n in recipe.tasks}).rows["reply"]["test"].records
    gold = [mc_task()._label(r, r["choices"]) for r in rows]
    predicted = mtlm.load(mc_run, device="cpu").predict([{"text": r["context"], "choices": r["choices"]} for r in rows],
                                                        tasks=["reply"])
    ranks = [sorted(range(len(p["reply"]["scores"])), key=lambda k: -p["reply"]["scores"][k]).index(g) + 1
             for p, g in zip(predicted, gold)]
    assert len(ranks) == len(rows) > 0
    assert metrics["reply/accuracy"] == pytest.approx(sum(r == 1 for r in ranks) / len(ranks))
    assert metrics["reply/recall_at_2"] == pytest.approx(sum(r <= 2 for r in ranks) / len(ranks))
    assert metrics["reply/mrr"] == pytest.approx(sum(1 / r for r in ranks) / len(ranks), abs=1e-6)
    inputs = [{"text": "stock market bank", "choices": ["team goal", "shares profit"]},
              {"text": "the movie plot", "choices": ["paris", "acting story", "bank", "match", "season"]}]
    predictor = mtlm.load(mc_run, device="cpu")
    out = predictor.predict(inputs, tasks=["reply"])
    for item, res in zip(inputs, out):
        r = res["reply"]
        assert len(r["scores"]) == len(item["choices"]) and sum(r["scores"]) == pytest.approx(1.0)
        assert r["label"] == item["choices"][r["index"]] and r["score"] == max(r["scores"])
    again = mtlm.load(mc_run, device="cpu").predict(inputs[::-1], tasks=["reply"])[::-1]
    for a, b in zip(out, again):
        assert a["reply"]["index"] == b["reply"]["index"]
        assert a["reply"]["scores"] == pytest.approx(b["reply"]["scores"], abs=1e-5)
    (both,) = predictor.predict([inputs[0]])                     # topic reads the same text
    assert set(both) == {"reply", "topic"}
    with pytest.raises(InputError, match=r"inputs\[0\]: task\(s\) reply need 'choices'"):
        predictor.predict(["stock market"], tasks=["reply"])
    for choices in ([], ["only one"]):
        with pytest.raises(InputError, match=r"inputs\[0\]\.choices: \d choice\(s\), at least 2"):
            predictor.predict([{"text": "x", "choices": choices}], tasks=["reply"])
    with pytest.raises(InputError, match=r"inputs\[0\]\.choices: expected a list of non-empty strings"):
        predictor.predict([{"text": "x", "choices": "a b"}], tasks=["reply"])
    with pytest.raises(InputError, match=r"inputs\[0\]\.context: a multiple-choice input gives its context as 'text'"):
        predictor.predict([{"context": "x", "choices": ["a", "b"]}])
    (plain,) = predictor.predict(["stock market"])                # no choices: only the text task
    assert list(plain) == ["topic"]
    # a micro-batch over the per-call token budget runs in row chunks with the same results
    predictor.max_pass_tokens = 8
    chunked = predictor.predict(inputs, tasks=["reply"])
    for a, b in zip(out, chunked):
        assert a["reply"]["scores"] == pytest.approx(b["reply"]["scores"], abs=1e-5)


def test_chatterbot_responses_builtin(tmp_path):
    if importlib.util.find_spec("chatterbot_corpus") is None:
        pytest.skip("package 'chatterbot_corpus' not installed")
    from mtlm.sources import read_source
    rows = read_source("builtin:chatterbot_responses", pathlib.Path("."))
    assert rows.columns == ["context", "choices", "label", "topic"] and 2000 < len(rows) < 2600
    for r in rows.records:
        assert len(r["choices"]) == 5 and len({c.casefold() for c in r["choices"]}) == 5
        assert 0 <= r["label"] < 5
    ai = next(r for r in rows.records if r["context"] == "What is AI?")
    assert ai["topic"] == "ai" and ai["choices"][ai["label"]].startswith("Artificial Intelligence")
    assert read_source("builtin:chatterbot_responses", pathlib.Path(".")).records == rows.records   # seeded
    raw = {"name": "rs", "tasks": {"reply": {"type": "multiple_choice", "data": {"train": "builtin:chatterbot_responses"}}}}
    recipe = parse_recipe(raw, tmp_path)
    data = prepare_rows(recipe, {"reply": build_task("reply", recipe.tasks["reply"])}).rows["reply"]
    n = sum(len(s.records) for s in data.values())
    assert abs(len(data["dev"].records) - 0.1 * n) <= 2 and abs(len(data["test"].records) - 0.1 * n) <= 2
