"""Adversarial training (mtlm.adversarial): FGM's perturbation and restore, SMART's regulariser, and short
real fits with every task type, a joint group and every weighting method. Tiny random backbone on CPU."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

import mtlm
from mtlm.adversarial import FGM, SMART, added_to_output, divergence, smoothness, word_embeddings
from mtlm.config import RecipeError
from mtlm.data import encode_rows, prepare_rows
from mtlm.batches import collate_source, masked_losses
from mtlm.model import build_model, load_backbone
from mtlm.tasks import build_task
from mtlm.tasks.multiple_choice import MISSING, RIGHT, WRONG
from mtlm.train import LossContext, fit
from mtlm.weighting import WEIGHTINGS

TYPES = ("sentiment", "score", "emotions", "ner")    # classification, regression, multilabel, tokens


@pytest.fixture
def contexts(make_recipe):
    """{task: LossContext} of one 8-row micro-batch per task, model in eval mode (no dropout)."""
    recipe = mtlm.load_recipe(make_recipe(tasks=TYPES, name="ctx"))
    tasks = {n: build_task(n, recipe.tasks[n]) for n in recipe.tasks}
    data = prepare_rows(recipe, tasks)
    torch.manual_seed(0)
    backbone, tokenizer = load_backbone(recipe.backbone, dropout=0.0)
    train = {n: f["train"] for n, f in encode_rows(tasks, data.rows, tokenizer, 32).items()}
    model = build_model(backbone, tasks, "mean", 0.0).eval()
    out = {}
    for name in tasks:
        items = [{"inputs": f, "labels": {name: f}} for f in train[name][:8]]     # SourceDataset items
        inputs, targets = collate_source(tasks, items, tokenizer.pad_token_id)
        logits = model(tasks=list(targets), **inputs)
        out[name] = LossContext(model, tasks, name, inputs, targets, logits, masked_losses(tasks, logits, targets), 0)
    return out


@pytest.mark.parametrize("task", TYPES)
def test_fgm_moves_embeddings_epsilon_along_the_gradient_and_restores_them(contexts, task):
    ctx = contexts[task]
    emb = word_embeddings(ctx.model)
    before = emb.weight.detach().clone()
    (grad,) = torch.autograd.grad(sum(ctx.losses.values()), emb.weight, retain_graph=True)
    seen = []
    handle = emb.register_forward_hook(lambda m, args, out: seen.append(m.weight.detach().clone()))
    clean = {t: float(v.detach()) for t, v in ctx.losses.items()}
    losses = FGM(epsilon=0.5)(ctx)
    handle.remove()
    (during,) = seen                                         # one extra forward, on perturbed embeddings
    r = during - before
    assert r.norm().item() == pytest.approx(0.5, rel=1e-4)
    assert torch.nn.functional.cosine_similarity(r.flatten(), grad.flatten(), dim=0).item() == pytest.approx(1.0,
                                                                                                            abs=1e-4)
    assert torch.equal(emb.weight, before)                   # restored exactly
    for t, loss in losses.items():                           # clean + adversarial, the latter above clean
        assert float(loss.detach()) - clean[t] > clean[t]
    sum(losses.values()).backward()
    assert torch.isfinite(emb.weight.grad).all() and emb.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("task", TYPES)
def test_smart_regulariser_is_zero_without_perturbation_and_positive_with_one(contexts, task):
    ctx = contexts[task]
    emb = word_embeddings(ctx.model)
    shape = (*ctx.inputs["input_ids"].shape, emb.embedding_dim)
    with added_to_output(emb, torch.zeros(shape)):
        same = ctx.forward()
    assert float(smoothness(ctx.tasks, ctx.logits, same, ctx.targets)[task].detach()) == 0.0
    with added_to_output(emb, 0.05 * torch.randn(shape)):
        moved = ctx.forward()
    assert float(smoothness(ctx.tasks, ctx.logits, moved, ctx.targets)[task].detach()) > 1e-8


def test_smart_perturbation_stays_in_the_epsilon_ball_on_real_tokens(contexts):
    ctx = contexts["ner"]
    smart = SMART(epsilon=1e-3, step_size=1e-2, noise=1e-4)
    delta = smart.perturbation(ctx, word_embeddings(ctx.model))
    pad = ctx.inputs["attention_mask"] == 0
    assert pad.any() and delta[pad].abs().max() == 0
    assert delta.abs().max().item() == pytest.approx(1e-3)   # the ascent step (1e-2) is cut at epsilon
    losses = smart(ctx)
    assert float(losses["ner"]) > float(ctx.losses["ner"])


def test_divergence_of_spans_and_choices():
    torch.manual_seed(0)
    span = torch.randn(3, 10, 2)
    assert float(divergence("span", span, span, {})) == 0.0
    assert float(divergence("span", span, span + torch.randn(3, 10, 2), {})) > 0
    # 2 examples with 3 and 2 choices: 5 backbone rows
    layout = {"labels": torch.tensor([[RIGHT, WRONG, WRONG], [WRONG, RIGHT, MISSING]])}
    a = torch.randn(5, 1, requires_grad=True)
    assert float(divergence("choices", a, a.detach(), layout)) == 0.0
    d = divergence("choices", a, torch.randn(5, 1), layout)
    d.backward()
    assert float(d) > 0 and torch.isfinite(a.grad).all()
    with pytest.raises(ValueError, match="no divergence"):
        divergence("graph", a, a, layout)


def _joint_recipe(make_recipe, tmp_path, name, **train):
    """sentiment (classification) + stars (regression) labelled on one file, some rows for one task only,
    plus ner alone."""
    rng = random.Random(0)
    rows = []
    for i in range(160):
        k = rng.randint(0, 4)
        words = ["good"] * k + ["bad"] * (4 - k) + rng.sample(["movie", "film", "plot", "story", "acting", "the"], 3)
        rng.shuffle(words)
        row = {"text": " ".join(words), "sentiment": "pos" if k > 2 else "neg",
               "stars": float(k)}
        if i % 5 == 0:
            del row["stars"]
        elif i % 7 == 0:
            del row["sentiment"]
        rows.append(row)
    (tmp_path / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import yaml
    path = make_recipe(tasks=("ner",), name=name, **train)
    raw = yaml.safe_load(path.read_text())
    data = {"train": str(tmp_path / "reviews.jsonl")}
    raw["tasks"]["sentiment"] = {"type": "classification", "data": data, "columns": {"label": "sentiment"}}
    raw["tasks"]["stars"] = {"type": "regression", "data": dict(data), "columns": {"score": "stars"}}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("method", ["fgm", "smart"])
def test_a_short_fit_with_each_method_differs_from_none(make_recipe, tmp_path, method):
    common = dict(max_steps=4, eval_every=4, dropout=0.0, early_stopping_patience=None, step_mode="all_tasks")
    none = fit(mtlm.load_recipe(_joint_recipe(make_recipe, tmp_path, "adv-none", **common)), progress=False)
    recipe = mtlm.load_recipe(_joint_recipe(make_recipe, tmp_path, f"adv-{method}", **common),
                              [f"train.adversarial={{method: {method}, epsilon: 0.01}}"]
                              + (["train.adversarial.step_size=0.01"] if method == "smart" else []))
    adv = fit(recipe, progress=False)
    a, b = load_file(none / "model" / "heads.safetensors"), load_file(adv / "model" / "heads.safetensors")
    assert a.keys() == b.keys()
    diff = {k.split(".")[0] for k in a if not torch.allclose(a[k], b[k], atol=1e-7)}
    assert diff == {"ner", "sentiment", "stars"}            # every head's training changed
    log = json.loads((adv / "metrics.json").read_text())["train"][-1]
    assert all(torch.isfinite(torch.tensor(log[f"loss/{t}"])) for t in ("ner", "sentiment", "stars"))


@pytest.mark.parametrize("weighting", sorted(WEIGHTINGS))
@pytest.mark.parametrize("method", ["fgm", "smart"])
def test_every_weighting_trains_with_adversarial_losses(make_recipe, tmp_path, method, weighting):
    path = _joint_recipe(make_recipe, tmp_path, f"w-{method}-{weighting}", max_steps=2, eval_every=2,
                         early_stopping_patience=None, step_mode="all_tasks")
    recipe = mtlm.load_recipe(path, [f"train.weighting={weighting}", f"train.adversarial.method={method}"])
    run = fit(recipe, progress=False)
    log = json.loads((run / "metrics.json").read_text())["train"][-1]
    assert sorted(k for k in log if k.startswith("loss/")) == ["loss/ner", "loss/sentiment", "loss/stars"]
    assert all(torch.isfinite(torch.tensor(v)) for k, v in log.items() if k.startswith("loss/"))


def test_unknown_method_is_a_recipe_error(make_recipe):
    with pytest.raises(RecipeError, match="train.adversarial.method"):
        mtlm.load_recipe(make_recipe(tasks=("sentiment",), name="bad"), ["train.adversarial.method=vat"])


@pytest.mark.parametrize("method", ["fgm", "smart"])
def test_qa_and_multiple_choice_train_adversarially(tiny_backbone, tmp_path, method):
    """The two task types whose logits are not one row per example: spans over windows, choice rows."""
    from conftest import write_recipe
    from test_multiple_choice import mc_row
    from test_qa import qa_row
    rng = random.Random(0)
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(qa_row(rng, rng.randint(10, 60))) + "\n" for _ in range(48)))
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(mc_row(rng, rng.randint(2, 5))) + "\n" for _ in range(48)))
    recipe = {"name": f"qa-mc-{method}", "backbone": tiny_backbone, "max_length": 32,
              "output_dir": str(tmp_path / "run"),
              "tasks": {"qa": {"type": "extractive_qa", "data": {"train": str(tmp_path / "qa.jsonl")}, "doc_stride": 8},
                        "reply": {"type": "multiple_choice", "data": {"train": str(tmp_path / "mc.jsonl")}}},
              "train": {"batch_size": 8, "max_steps": 2, "eval_every": 2, "lr": 1e-3, "step_mode": "all_tasks",
                        "adversarial": {"method": method, "epsilon": 0.01,
                                        **({"step_size": 0.01} if method == "smart" else {})}}}
    run = fit(mtlm.load_recipe(write_recipe(tmp_path / "r.yaml", recipe)), progress=False)
    log = json.loads((run / "metrics.json").read_text())["train"][-1]
    assert all(torch.isfinite(torch.tensor(log[f"loss/{t}"])) for t in ("qa", "reply"))


@pytest.mark.parametrize("spec, message", [
    ("{method: none, epsilon: 1.0}", "epsilon: not an option of method 'none'"),
    ("{method: fgm, step_size: 0.1}", "step_size: not an option of method 'fgm'"),
    ("{method: fgm, epsilon: 0}", "greater than 0"),
])
def test_options_the_method_does_not_read_are_recipe_errors(make_recipe, spec, message):
    with pytest.raises(RecipeError) as e:
        mtlm.load_recipe(make_recipe(tasks=("sentiment",), name="opts"), [f"train.adversarial={spec}"])
    assert any(p.startswith("train.adversarial") and message in p for p in e.value.problems), e.value.problems
