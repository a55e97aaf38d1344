"""Per-task LoRA adapters at serving time (tiny random Llama): a micro-batch of inputs asking for different
tasks runs each input's rows only through the adapter of the task it asked for (not every adapter the batch
holds), and every input gets what it gets alone; benchmarks/adapter_serving.py builds and serves its
layouts."""

from __future__ import annotations


import pytest

from benchscripts import load_bench

from mtlm.config import AdapterConfig

TEXTS = ["the movie was great fun", "bad", "stock market shares rose", "john smith went to paris",
         "a very long and boring film about the market", "fun"]
TASKS = {"sentiment": ["negative", "positive"], "topic": ["a", "b", "c", "d"], "nli": ["x", "y", "z"]}


def _bench(monkeypatch):
    return load_bench("adapter_serving", monkeypatch)


@pytest.fixture
def per_task(monkeypatch, tiny_llama):
    def make(layers="all"):
        bench = _bench(monkeypatch)
        return bench, bench.build_predictor(tiny_llama, AdapterConfig(r=4, dropout=0.0, per_task=True, layers=layers),
                                            TASKS, 32)
    return make


def _rows_seen(predictor):
    """A list that collects the row count of every call of one LoRA layer (the top layer's q_proj)."""
    from peft.tuners.lora import LoraLayer
    seen = []
    layer = [m for m in predictor.model.backbone.modules() if isinstance(m, LoraLayer)][-1]
    return seen, layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))


@pytest.mark.parametrize("layers", ["all", "top:1"])
def test_mixed_task_batch_runs_each_row_through_its_own_adapter_only(per_task, layers):
    bench, predictor = per_task(layers)
    names = list(TASKS)
    feats = predictor.encode([{"text": t} for t in TEXTS], ("text",))
    asked = [[names[i % 3]] for i in range(len(TEXTS))]
    seen, handle = _rows_seen(predictor)
    try:
        mixed = predictor.run(feats, names, asked)
    finally:
        handle.remove()
    assert seen == [len(TEXTS)]          # one row per input (was one per input and adapter: 18)
    for i, feat in enumerate(feats):
        alone = predictor.run([feat], asked[i])[0]
        assert list(mixed[i]) == asked[i]
        for n in asked[i]:
            assert mixed[i][n]["label"] == alone[n]["label"]
            for label, p in alone[n]["scores"].items():
                assert abs(mixed[i][n]["scores"][label] - p) < 1e-5, (i, n, label)
    full = predictor.run(feats, names)  # the adapters differ: some input's score moves with the task's adapter
    every = bench.serve(predictor, feats, [list(range(len(TEXTS)))], [names] * len(TEXTS))
    assert all(abs(every[i][n]["score"] - full[i][n]["score"]) < 1e-5 for i in range(len(TEXTS)) for n in names)


def test_mixed_subsets_route_the_union_of_an_inputs_tasks(per_task):
    _, predictor = per_task()
    names = list(TASKS)
    feats = predictor.encode([{"text": t} for t in TEXTS[:3]], ("text",))
    asked = [["sentiment", "topic"], ["nli"], ["topic"]]
    seen, handle = _rows_seen(predictor)
    try:
        mixed = predictor.run(feats, names, asked)
    finally:
        handle.remove()
    assert seen == [4]                   # 2 + 1 + 1 rows, not 3 x 3
    for i, feat in enumerate(feats):
        alone = predictor.run([feat], asked[i])[0]
        for n in asked[i]:
            assert abs(mixed[i][n]["score"] - alone[n]["score"]) < 1e-5, (i, n)


def test_routing_survives_chunked_passes(per_task):
    _, predictor = per_task()
    names = list(TASKS)
    feats = predictor.encode([{"text": t} for t in TEXTS], ("text",))
    asked = [[names[i % 3]] for i in range(len(TEXTS))]
    whole = predictor.run(feats, names, asked)
    predictor.max_pass_tokens = 1            # one row per engine call
    chunked = predictor.run(feats, names, asked)
    for a, b in zip(whole, chunked):
        for n in a:
            assert abs(a[n]["score"] - b[n]["score"]) < 1e-5
