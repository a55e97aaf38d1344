"""Generation tasks (`type: generation`) on a tiny random Llama: prompt-masked loss, metrics, bad input
naming file/line/field, and a recipe mixing generation with a classification head in one backbone."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
import yaml

import mtlm
from mtlm.config import RecipeError, TaskConfig
from mtlm.model import load_backbone
from mtlm.tasks import build_task

from conftest import WORDS


def _task(**cfg):
    return build_task("reply", TaskConfig(type="generation", data={"train": "x"}, **cfg))


@pytest.fixture(scope="module")
def copy_data(tmp_path_factory):
    """Rows {"question", "topic", "answer"}: the answer is the question's first word (learnable by copying)."""
    rng = random.Random(0)
    d = tmp_path_factory.mktemp("gen")
    with open(d / "copy.jsonl", "w") as f:
        for _ in range(160):
            words = [rng.choice(WORDS[:20]) for _ in range(rng.randint(2, 5))]
            f.write(json.dumps({"question": " ".join(words), "topic": "first", "answer": words[0]}) + "\n")
    return d


def test_only_target_tokens_count_in_the_loss(tiny_llama):
    _, tok = load_backbone(tiny_llama)
    task = _task(columns={"prompt": "q", "target": "a"})
    feats = task.encode([{"q": "the movie was", "a": "great fun"}, {"q": "bad", "a": "film"}], tok, 32)
    prompt_len = len(tok("the movie was")["input_ids"])
    assert feats[0]["prompt_length"] == prompt_len and feats[0]["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(feats[0]["input_ids"][prompt_len:-1]) == " great fun"
    labels = task.collate_labels(feats, 12)["labels"]
    assert (labels[0, :prompt_len] == -100).all() and (labels[0, prompt_len:feats[0]["length"]] >= 0).all()
    logits = torch.randn(2, 12, len(tok))
    want = []
    for row, f in enumerate(feats):       # by hand: position t predicts token t + 1, target tokens only
        for t in range(f["prompt_length"] - 1, f["length"] - 1):
            want.append(F.cross_entropy(logits[row, t][None], torch.tensor([int(f["input_ids"][t + 1])])))
    assert torch.allclose(task.loss(logits, {"labels": labels}), torch.stack(want).mean(), atol=1e-6)


def test_metrics_against_hand_computed_values():
    task = _task()
    preds = [{"text": "The cat sat.", "nll": 2.0, "tokens": 2}, {"text": "a dog", "nll": 4.0, "tokens": 2}]
    m = task.metrics(preds, ["the cat sat", "a red dog"])
    assert m["exact_match"] == 0.5                      # "The cat sat." normalises to "cat sat"
    assert m["rouge_l"] == pytest.approx((1.0 + 0.8) / 2)  # LCS 2 of 2 and 3 tokens: P 1, R 2/3 -> F 0.8
    assert m["perplexity"] == pytest.approx(float(torch.tensor(6.0 / 4).exp()))
    assert task.metrics([{"text": "the cat sat on the mat", "nll": 0.0, "tokens": 1}],
                        ["the cat sat on the mat"])["bleu"] == pytest.approx(1.0)


def test_bad_options_and_templates_are_recipe_errors():
    with pytest.raises(RecipeError, match="tasks.reply.generate: beams not a decoding option"):
        _task(generate={"beams": 4})
    with pytest.raises(RecipeError, match="template.*fields must name columns"):
        _task(template="Q: {} A:")
    assert _task(template="Q: {question}\nC: {context}\nA:").input_fields() == ("question", "context")


def _recipe(tmp_path, tiny_llama, copy_data, toy_data, gen: dict, max_length=24, **top):
    recipe = {"name": "gen", "backbone": tiny_llama, "pooling": "last", "max_length": max_length,
              "output_dir": str(tmp_path / "run"),
              "tasks": {"reply": {"type": "generation", "data": {"train": str(copy_data / "copy.jsonl")},
                                  "max_new_tokens": 4, "metric": "exact_match", **gen},
                        "sentiment": {"type": "classification", "data": {"train": str(toy_data / "sentiment.csv")}}},
              "train": {"batch_size": 8, "max_steps": 60, "eval_every": 60, "lr": 3e-3, "warmup_ratio": 0.0},
              **top}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    return mtlm.load_recipe(tmp_path / "r.yaml")


def test_bad_rows_name_file_line_and_field(tmp_path, tiny_llama, toy_data):
    d = tmp_path / "bad"
    d.mkdir()
    rows = [{"question": f"the movie {w}", "answer": "the"} for w in WORDS[:30]]
    rows[3] = {"question": "the film", "answer": "  "}
    (d / "copy.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(RecipeError, match=r"copy.jsonl, line 4, field 'answer': empty target"):
        mtlm.fit(_recipe(tmp_path, tiny_llama, d, toy_data, {"columns": {"prompt": "question", "target": "answer"}}),
                 progress=False)
    with pytest.raises(RecipeError, match=r"tasks.reply.columns.template: column 'subject' not in .*copy.jsonl"):
        mtlm.fit(_recipe(tmp_path, tiny_llama, d, toy_data, {"template": "{subject}: {question}",
                                                              "columns": {"target": "answer"}}), progress=False)
    rows[3] = {"question": " ".join(["movie"] * 40), "answer": "the"}
    (d / "copy.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(RecipeError, match=r"copy.jsonl, line 4, field 'question': the prompt is \d+ tokens; "
                                          r"max_length 24"):
        mtlm.fit(_recipe(tmp_path, tiny_llama, d, toy_data, {"columns": {"prompt": "question", "target": "answer"}}),
                 progress=False)


@pytest.mark.parametrize("adapters", [None, {"r": 8, "per_task": True, "dropout": 0.0, "alpha": 16, "target_modules":
                                             ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]}])
def test_generation_and_a_head_train_in_one_recipe_and_round_trip(tmp_path, tiny_llama, copy_data, toy_data,
                                                                   adapters):
    top = {"adapters": adapters} if adapters else {}
    recipe = _recipe(tmp_path, tiny_llama, copy_data, toy_data,
                     {"template": "first: {question} ->", "columns": {"target": "answer"}}, max_length=48, **top)
    if adapters:        # the adapters alone on a frozen random model learn slowly: a larger step
        recipe.train.lr = 3e-2
    run = mtlm.fit(recipe, progress=False)
    metrics = json.loads((run / "metrics.json").read_text())
    last = metrics["eval"][-1]
    assert {"reply/rouge_l", "reply/exact_match", "reply/bleu", "reply/perplexity", "sentiment/accuracy"} <= set(last)
    if adapters:     # both tasks' adapters trained and saved (on a frozen random model they learn slowly)
        from safetensors.torch import load_file
        saved = load_file(run / "model" / "adapters.safetensors")
        for task in ("reply", "sentiment"):
            assert any(float(v.abs().sum()) > 0 for k, v in saved.items() if f"lora_B.{task}." in k), task
    else:
        assert last["reply/perplexity"] < 120          # uniform over the 400-token vocabulary: 400
    assert (run / "model" / "heads.safetensors").is_file()
    predictor = mtlm.load(run)
    out = predictor.predict([{"text": "the movie was great fun", "question": "film story plot"}])
    assert out[0]["sentiment"]["label"] in ("positive", "negative")
    assert isinstance(out[0]["reply"]["text"], str)


def test_generation_on_an_encoder_backbone_is_a_recipe_error(tiny_backbone, tiny_llama):
    """An encoder has no next-token output layer nor an end-of-sequence token: a clear error, not a traceback."""
    from mtlm.backbones import check_generation
    encoder, _ = load_backbone(tiny_backbone)
    with pytest.raises(RecipeError, match="tasks.reply: type generation needs a decoder backbone"):
        check_generation({"reply": "generation", "topic": "classification"}, encoder.config)
    check_generation({"topic": "classification"}, encoder.config)            # encoders keep every other type
    decoder, _ = load_backbone(tiny_llama)
    check_generation({"reply": "generation"}, decoder.config)
