"""train.packing (mtlm.packing): packed micro-batches give the same per-task losses as unpacked ones."""

from __future__ import annotations

import json

import pytest
import torch

import mtlm
from mtlm.batches import collate_source, masked_losses
from mtlm.config import RecipeError, TaskConfig
from mtlm.packing import block_diagonal_mask, choose_rows, first_fit, first_fit_decreasing, pack_inputs
from mtlm.tasks import build_task
from mtlm.train import build


def test_first_fit_places_items_in_the_first_row_with_room():
    assert first_fit([5, 4, 3, 2, 6], capacity=8) == [0, 1, 0, 1, 2]
    with pytest.raises(ValueError, match="9 tokens"):
        first_fit([9], capacity=8)


def test_first_fit_decreasing_places_longest_first_and_keeps_item_order():
    assert first_fit([4, 4, 6, 6], capacity=10) == [0, 0, 1, 2]
    assert first_fit_decreasing([4, 4, 6, 6], capacity=10) == [0, 1, 0, 1]     # plain first-fit: 3 rows


def test_choose_rows_pads_similar_lengths_and_packs_mixed_ones():
    """Similar lengths (a length-grouped batch): one item per row is cheapest -> None (plain padding, no
    mask). Mixed lengths: packed, rows no longer than a multiple of the longest item, far fewer rows."""
    assert choose_rows([10, 11, 12, 12, 11, 10] * 5, max_capacity=128) is None
    lengths = [60, 5, 6, 8, 7, 9, 12, 40, 5, 11, 20, 6] * 3
    rows = choose_rows(lengths, max_capacity=128)
    used = [sum(n for n, r in zip(lengths, rows) if r == row) for row in range(max(rows) + 1)]
    assert max(rows) + 1 <= len(lengths) // 3 and max(used) <= 120    # 2 x longest at most
    assert choose_rows([58, 5], max_capacity=64) == [0, 0]            # both fit one row of <= 64
    with pytest.raises(ValueError, match="does not fit"):
        choose_rows([130], max_capacity=128)


def test_collate_source_with_packing_keeps_similar_lengths_unpacked(make_recipe):
    run = build(mtlm.load_recipe(make_recipe(tasks=("sentiment",), name="pack-collate", mixed_precision="no")))
    ds = run.batches["sentiment"].dataset
    same = [ds[i] for i in range(len(ds)) if len(ds[i]["inputs"]["input_ids"]) == len(ds[0]["inputs"]["input_ids"])]
    assert len(same) >= 2
    inputs, _ = collate_source(run.tasks, same[:8], run.tokenizer.pad_token_id, capacity=128)
    assert "example_ids" not in inputs and inputs["input_ids"].shape[0] == len(same[:8])


def test_pack_inputs_positions_and_example_ids():
    feats = [{"input_ids": [2, 7, 3]}, {"input_ids": [2, 8, 8, 8, 3]}, {"input_ids": [2, 9, 3]}]
    out = pack_inputs(feats, pad_token_id=0, capacity=6)
    assert out["input_ids"].tolist() == [[2, 7, 3, 2, 9, 3], [2, 8, 8, 8, 3, 0]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 0]]
    assert out["example_ids"].tolist() == [[0, 0, 0, 2, 2, 2], [1, 1, 1, 1, 1, -1]]
    assert out["attention_mask"].sum().item() == 11
    mask = block_diagonal_mask(out["example_ids"])
    assert mask.shape == (2, 1, 6, 6)
    assert mask[0, 0, 0, 2] == 0 and mask[0, 0, 0, 3] < -1e30 and mask[1, 0, 5, 5] == 0 and mask[1, 0, 4, 5] < -1e30


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("task", ["sentiment", "paraphrase", "score", "emotions", "ner"])
def test_packed_batch_loss_equals_unpacked(make_recipe, tmp_path, task, pooling):
    """Pooled (classification, pairs, regression, multilabel) and token (tagging) heads: the loss of a
    packed micro-batch equals the unpacked one's within 1e-5 (fp32), and so do the backbone's gradients."""
    import yaml
    path = make_recipe(tasks=(task,), name=f"pack-{task}-{pooling}", mixed_precision="no")
    raw = yaml.safe_load(path.read_text())
    raw["pooling"] = pooling
    path.write_text(yaml.safe_dump(raw))
    run = build(mtlm.load_recipe(path))
    model = run.unwrapped.eval()                   # no dropout: the two forwards must see the same function
    items = [run.batches[task].dataset[i] for i in range(12)]
    results = []
    for capacity in (None, 32):
        inputs, targets = collate_source(run.tasks, items, run.tokenizer.pad_token_id)
        if capacity:       # always packed here (collate_source packs only where its cost model says it pays)
            inputs = pack_inputs([it["inputs"] for it in items], run.tokenizer.pad_token_id, capacity)
        model.zero_grad()
        loss = masked_losses(run.tasks, model(tasks=list(targets), **inputs), targets)[task]
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.backbone.parameters() if p.grad is not None])
        results.append((inputs, loss.item(), grads))
    (plain, loss_plain, g_plain), (packed, loss_packed, g_packed) = results
    assert packed["input_ids"].shape[0] < plain["input_ids"].shape[0]      # several examples per row
    assert packed["attention_mask"].sum() == plain["attention_mask"].sum()
    assert loss_packed == pytest.approx(loss_plain, abs=1e-5, rel=1e-5)
    assert torch.allclose(g_packed, g_plain, atol=1e-5, rtol=1e-4)


def test_packing_refuses_task_types_that_cannot_pack():
    qa = build_task("qa", TaskConfig(type="extractive_qa", data={"train": "x.jsonl"}))
    mc = build_task("mc", TaskConfig(type="multiple_choice", data={"train": "x.jsonl"}))
    with pytest.raises(RecipeError, match="packing with a task type that cannot pack") as e:
        mtlm.packing.check_packable({"qa": qa, "mc": mc})
    assert "tasks.qa" in str(e.value) and "tasks.mc" in str(e.value)


def test_packing_refuses_adversarial_and_private_layers(make_recipe):
    with pytest.raises(RecipeError, match="adversarial"):
        mtlm.fit(mtlm.load_recipe(make_recipe(tasks=("sentiment",), name="adv", packing=True,
                                              adversarial={"method": "fgm"})), progress=False)


def test_packed_training_runs_and_evaluates(make_recipe):
    """A packed run trains (losses fall), evaluates unpacked on dev and saves a bundle that predicts; with
    random batches (mixed lengths) packed rows reach the model (several examples in some row)."""
    packed_rows = []

    def watch(model):
        def hook(module, args, kwargs):
            if module.training and kwargs.get("example_ids") is not None:
                packed_rows.append(kwargs["input_ids"].shape[0] < int(kwargs["example_ids"].max()) + 1)
        model.register_forward_pre_hook(hook, with_kwargs=True)
        return model

    run = mtlm.fit(mtlm.load_recipe(make_recipe(tasks=("sentiment", "ner"), name="packed", packing=True,
                                                group_by_length=False, max_steps=20, eval_every=20,
                                                mixed_precision="no")),
                   progress=False, model_fn=watch)
    assert any(packed_rows)
    metrics = json.loads((run / "metrics.json").read_text())
    last = metrics["eval"][-1]
    assert last["sentiment/accuracy"] > 0.5 and "ner/f1" in last
    first, end = metrics["train"][0], metrics["train"][-1]
    assert end["loss/sentiment"] < first["loss/sentiment"]
    out = mtlm.load(run / "model").predict([{"text": "great fun"}])
    assert set(out[0]) >= {"sentiment", "ner"}


def test_distill_student_recipe_unpacks_and_refuses_packing(tmp_path):
    from mtlm.distill.run import student_recipe
    raw = {"name": "t", "tasks": {"s": {"type": "classification", "data": {"train": "a.csv"}}},
           "train": {"packing": True}}
    files = {"s": {"train": "a.csv"}}
    assert student_recipe(raw, "s1", "minilm-l6", files, tmp_path, []).train.packing is False
    with pytest.raises(RecipeError, match="distillation reads unpacked rows"):
        student_recipe(raw, "s1", "minilm-l6", files, tmp_path, ["train.packing=true"])


def test_chunked_encoding_equals_one_call(tiny_backbone, monkeypatch):
    """Training rows are tokenized ENCODE_CHUNK at a time (resident memory); the features are those of one
    call, for text tasks and word tagging alike."""
    import numpy as np
    from transformers import AutoTokenizer
    import mtlm.tasks.base as base
    tok = AutoTokenizer.from_pretrained(tiny_backbone)
    texts = [{"text": "great fun movie " * (i % 5 + 1), "label": "a", "tokens": ["good", "bad"][: i % 2 + 1],
              "tags": ["O", "O"][: i % 2 + 1]} for i in range(7)]
    cls = build_task("c", TaskConfig(type="classification", data={"train": "x"}))
    ner = build_task("n", TaskConfig(type="token_classification", data={"train": "x"}))
    cls.fit(texts), ner.fit(texts)
    whole = [cls.encode(texts, tok, 16), ner.encode(texts, tok, 16)]
    monkeypatch.setattr(base, "ENCODE_CHUNK", 3)
    monkeypatch.setattr(mtlm.tasks.token_classification, "ENCODE_CHUNK", 3)
    chunked = [cls.encode(texts, tok, 16), ner.encode(texts, tok, 16)]
    for a, b in zip(whole, chunked):
        assert len(a) == len(b) == 7
        for fa, fb in zip(a, b):
            assert fa.keys() == fb.keys()
            assert all(np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])) for k in fa)


def test_packing_and_compile_may_change_on_resume(tmp_path):
    """Packing changes only how a micro-batch's examples are laid out (the sampler, its order and the
    examples per step stay), compile only how the backbone runs: a resumed run may switch them."""
    import yaml
    from mtlm.recipe import parse_recipe
    from mtlm.run_folder import check_resumable
    raw = {"name": "r", "tasks": {"s": {"type": "classification", "data": {"train": "a.csv"}}}}
    saved = yaml.safe_load(parse_recipe(raw, tmp_path).to_yaml())
    now = parse_recipe(raw, tmp_path, ["train.packing=true", "train.compile=true"])
    assert sorted(c.split(":")[0] for c in check_resumable(saved, now, tmp_path)) == ["train.compile", "train.packing"]
    with pytest.raises(RecipeError, match="train.batch_size"):
        check_resumable(saved, parse_recipe(raw, tmp_path, ["train.batch_size=4"]), tmp_path)
