"""LoRA adapters (`adapters:`): mixed-adapter batches exact per row, top:K sharing exact, options checked,
backbone frozen, adapters saved in and loaded from the bundle (tiny random Llama)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import mtlm
from mtlm.adapters import adapter_rows, adapter_states, add_adapters
from mtlm.backbones import pool
from mtlm.config import AdapterConfig, RecipeError
from mtlm.model import load_backbone


def _randomise(backbone):
    """LoRA's B starts at zero (the adapter is the identity): give every adapter its own random update."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)


@pytest.fixture
def adapted(tiny_llama):
    def make(**options):
        backbone, tok = load_backbone(tiny_llama)
        spec = add_adapters(backbone, AdapterConfig(per_task=True, **options), ["sst", "topic"])
        _randomise(backbone)
        return backbone.eval(), tok, spec
    return make


TEXTS = ["the movie was great fun", "bad", "stock market shares rose", "john smith went to paris"]


def test_mixed_adapter_batch_gives_each_row_what_it_gets_alone(adapted):
    backbone, tok, _ = adapted()
    names = ["sst", "topic", "topic", "sst"]
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad(), adapter_rows(backbone, names):
        mixed = pool(backbone(**batch).last_hidden_state, batch["attention_mask"], "last")
    for i, (text, name) in enumerate(zip(TEXTS, names)):
        alone = tok([text], return_tensors="pt")
        with torch.no_grad(), adapter_rows(backbone, [name]):
            one = pool(backbone(**alone).last_hidden_state, alone["attention_mask"], "last")
        assert torch.allclose(mixed[i], one[0], atol=1e-4), text
    with torch.no_grad(), adapter_rows(backbone, ["topic"] * 4):   # the adapters really differ
        other = pool(backbone(**batch).last_hidden_state, batch["attention_mask"], "last")
    assert not torch.allclose(mixed[0], other[0], atol=1e-3)


@pytest.mark.parametrize("layers", ["all", "top:1"])
def test_one_pass_for_every_task_equals_each_task_alone(adapted, layers):
    backbone, tok, spec = adapted(layers=layers)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        both = adapter_states(backbone, spec, ["sst", "topic"], batch["input_ids"], batch["attention_mask"], None)
        for name in ("sst", "topic"):
            with adapter_rows(backbone, [name] * len(TEXTS)):
                alone = backbone(**batch).last_hidden_state
            assert torch.allclose(both[name], alone, atol=1e-4)


def test_top_k_puts_adapters_in_the_top_layers_only(adapted):
    backbone, _, spec = adapted(layers="top:1")
    adapted_layers = {n.split(".")[1] for n, _ in backbone.named_parameters() if "lora_" in n}
    assert adapted_layers == {"1"} and spec.top == 1 and spec.names() == ["sst", "topic"]
    assert all(not p.requires_grad for n, p in backbone.named_parameters() if "lora_" not in n)


def test_bad_adapter_options_are_clear_recipe_errors(make_recipe, tiny_llama):
    path = make_recipe()
    with pytest.raises(RecipeError, match="adapters.rank: unknown key"):
        mtlm.load_recipe(path, ["adapters.rank=4"])
    with pytest.raises(RecipeError, match="adapters.layers: must be 'all' or 'top:K'"):
        mtlm.load_recipe(path, ["adapters.layers=bottom:2"])
    backbone, _ = load_backbone(tiny_llama)
    with pytest.raises(RecipeError, match="adapters.target_modules: query not a linear layer.*q_proj"):
        add_adapters(backbone, AdapterConfig(target_modules=["query"]), ["sst"])


def test_adapter_run_trains_only_adapters_and_heads_and_round_trips(tiny_llama, toy_data, tmp_path):
    from mtlm.checkpoint import load_bundle

    recipe = {"name": "lora", "backbone": tiny_llama, "pooling": "last", "max_length": 32,
              "output_dir": str(tmp_path / "run"),
              "adapters": {"r": 4, "per_task": True, "layers": "top:1", "dropout": 0.0},
              "tasks": {"sentiment": {"type": "classification", "data": {"train": str(toy_data / "sentiment.csv")}},
                        "topic": {"type": "classification", "data": {"train": str(toy_data / "topic.jsonl")}}},
              "train": {"batch_size": 8, "max_steps": 30, "eval_every": 30, "lr": 1e-2, "warmup_ratio": 0.0}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    run = mtlm.fit(mtlm.load_recipe(tmp_path / "r.yaml"), progress=False)
    assert (run / "model" / "adapters.safetensors").is_file()
    model, tok, tasks, meta = load_bundle(run)
    assert meta["adapters"]["per_task"] is True and model.adapters.names() == ["sentiment", "topic"]
    pretrained, _ = load_backbone(tiny_llama)
    frozen = dict(pretrained.named_parameters())
    for name, p in model.backbone.named_parameters():      # the backbone's own weights did not move
        if "lora_" not in name:
            assert torch.equal(p, frozen[name.replace(".base_layer.", ".")]), name
    assert any(float(p.abs().sum()) > 0 for n, p in model.backbone.named_parameters() if "lora_B" in n)
    best = json.loads((run / "metrics.json").read_text())["task_best"]
    assert best["sentiment"]["value"] > 0.7 and best["topic"]["value"] > 0.7
    out = mtlm.load(run).predict(["the movie was great fun"])
    assert set(out[0]) == {"sentiment", "topic"}


def test_packing_with_adapters_is_a_recipe_error_naming_both_keys(make_recipe):
    recipe = mtlm.load_recipe(make_recipe(tasks=("sentiment",), name="packlora", packing=True), ["adapters.r=4"])
    with pytest.raises(RecipeError, match=r"adapters: train\.packing cannot run LoRA adapters"):
        mtlm.fit(recipe, progress=False)     # was a ValueError from the first packed batch
