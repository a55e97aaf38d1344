"""Structured pruning (`mtlm.pruning`) and `mtlm compress --method prune` (`mtlm.prune`) on a tiny random
backbone: pruning nothing changes nothing, pruning heads / neurons equals zeroing their contribution,
importance finds a dead head, a pruned bundle saves, loads, exports to ONNX and quantises, and the budget
search never returns a model outside the budget."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

from conftest import write_recipe
from mtlm.compress import CompressError, compress_run
from mtlm.pruning import PRUNING_KEY, PruningError, importance, plan, prune_backbone, structure
from mtlm.prune import PruneSettings

TEXTS = ["john smith went to paris", "the movie was great fun", "terrible plot , bad acting"]


def encoder(heads: int = 4, layers: int = 2) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=64, max_position_embeddings=64)
    return BertModel(config, add_pooling_layer=False).eval()


def states(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.fixture
def inputs():
    torch.manual_seed(1)
    ids = torch.randint(5, 60, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


def test_pruning_nothing_leaves_outputs_unchanged(inputs):
    model = encoder()
    pruned = copy.deepcopy(model)
    record = prune_backbone(pruned, [list(range(4))] * 2, [list(range(64))] * 2)
    assert record["heads"] == [4, 4] and record["intermediate_size"] == [64, 64]
    assert torch.allclose(states(pruned, *inputs), states(model, *inputs), atol=1e-6)


def test_pruning_equals_zeroing_the_pruned_units_contribution(inputs):
    """Removing heads 1 of layer 0 and 0, 2, 3 of layer 1 (and every odd FFN neuron of layer 0) gives the
    unpruned model's outputs with those heads' slices of the attention output projection (and those neurons'
    columns of the FFN output projection) zeroed: the same function, smaller matrices."""
    model = encoder()
    pruned = copy.deepcopy(model)
    prune_backbone(pruned, [[0, 2, 3], [1]], [list(range(0, 64, 2)), list(range(64))])
    assert structure(pruned) == {"heads": [3, 1], "intermediate_size": [32, 64]}
    assert pruned.encoder.layer[1].attention.self.query.weight.shape == (8, 32)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zeroed.encoder.layer[0].attention.output.dense.weight[:, 8:16] = 0
        for h in (0, 2, 3):
            zeroed.encoder.layer[1].attention.output.dense.weight[:, 8 * h:8 * (h + 1)] = 0
        zeroed.encoder.layer[0].output.dense.weight[:, 1::2] = 0
    got, want = states(pruned, *inputs), states(zeroed, *inputs)
    assert torch.allclose(got, want, atol=1e-5)
    assert (got - states(model, *inputs)).abs().max() > 1e-3          # and it did change the model


def test_bad_pruning_requests_are_refused():
    model = encoder()
    with pytest.raises(PruningError, match="layer 1"):
        prune_backbone(copy.deepcopy(model), [[0], []], [[0], [0]])
    with pytest.raises(PruningError, match="fractions|fraction"):
        plan([torch.ones(4)], 1.0)
    pruned = copy.deepcopy(model)
    prune_backbone(pruned, [[0], [0]], [[0], [0]])
    with pytest.raises(PruningError, match="already pruned"):
        prune_backbone(pruned, [[0], [0]], [[0], [0]])


def test_plan_prunes_the_lowest_scores_globally_keeping_one_per_layer():
    scores = [torch.tensor([0.1, 0.9, 0.2]), torch.tensor([0.05, 0.01, 0.3])]
    assert plan(scores, 0.5) == [[1, 2], [2]]            # 3 of 6: 0.01, 0.05, 0.1
    assert plan(scores, 0.9) == [[1], [2]]               # 5 asked, one kept per layer
    assert plan(scores, 0.0) == [[0, 1, 2], [0, 1, 2]]


@pytest.fixture(scope="module")
def run(tiny_backbone, toy_data, tmp_path_factory) -> Path:
    """A trained tiny run (sentiment classification + NER) with 4 heads per layer, and its stored contract."""
    from transformers import AutoConfig
    from mtlm.recipe import load_recipe
    from mtlm.train import fit
    d = tmp_path_factory.mktemp("prune")
    backbone = d / "bert4"
    config = AutoConfig.from_pretrained(tiny_backbone)
    config.num_attention_heads = 4
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(backbone)
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(tiny_backbone).save_pretrained(backbone)
    recipe = {"name": "prune", "backbone": str(backbone), "max_length": 32, "output_dir": str(d / "run"),
              "tasks": {"sentiment": {"type": "classification", "data": {"train": str(toy_data / "sentiment.csv")}},
                        "ner": {"type": "token_classification", "data": {"train": str(toy_data / "ner.jsonl")}}},
              "train": {"batch_size": 8, "max_steps": 40, "eval_every": 40, "lr": 1e-3, "warmup_ratio": 0.0}}
    return fit(load_recipe(write_recipe(d / "r.yaml", recipe)), progress=False)


def test_importance_ranks_a_head_with_zero_output_weights_lowest(run):
    from mtlm.checkpoint import load_bundle
    from mtlm.prune import importance_features
    model, tokenizer, tasks, meta = load_bundle(run)
    with torch.no_grad():
        model.backbone.encoder.layer[1].attention.output.dense.weight[:, 16:24] = 0     # head 2 of layer 1
    features = importance_features(run / "model", tasks, tokenizer, 32, rows=48)
    assert set(features) == {"sentiment", "ner"} and all(len(f) == 48 for f in features.values())
    heads, neurons = importance(model, tasks, features, tokenizer.pad_token_id)
    assert [h.shape[0] for h in heads] == [4, 4] and [n.shape[0] for n in neurons] == [64, 64]
    flat = torch.cat(heads)
    assert int(flat.argmin()) == 4 + 2 and float(flat[6]) == 0.0 and float(flat.max()) > 0
    assert plan(heads, 0.125) == [[0, 1, 2, 3], [0, 1, 3]]       # the first head pruned is the dead one


@pytest.fixture(scope="module")
def pruned_run(run, tmp_path_factory):
    """`mtlm compress RUN --method prune` with a generous budget: the strongest level, 30 recovery steps."""
    out = tmp_path_factory.mktemp("pruned") / "run-prune"
    settings = PruneSettings(levels=(0.5, 0.25, 0.125), recovery_steps=30, recovery_lr=1e-3, importance_rows=64)
    return compress_run(run, "prune", 100.0, out, measure_memory=True, rounds=1, prune=settings)


def test_prune_within_budget_writes_a_derived_run_that_loads_serves_and_exports(pruned_run, run, tmp_path):
    from mtlm.contract import read_parent
    from mtlm.export import PARITY_ATOL, export_run
    from mtlm.predict import load
    derived, report = pruned_run
    assert report["model"] == "torch-pruned" and report["engine"] == "torch"
    # bisection over 0.5 > 0.25 > 0.125: the middle first, it fits, then the stronger 0.5 (chosen); 0.125 untried
    assert [t["fraction_pruned"] for t in report["trials"]] == [0.5, 0.25] and report["trials"][0]["fits"]
    config = json.loads((derived / "model" / "backbone" / "config.json").read_text())
    assert sum(config[PRUNING_KEY]["heads"]) == 4 and config[PRUNING_KEY]["heads"] != [4, 4]    # half of 8
    assert set(report["engines"]) == {"torch", "torch-pruned"}
    assert report["engines"]["torch-pruned"]["size_mb"] < report["engines"]["torch"]["size_mb"]
    assert report["engines"]["torch-pruned"]["peak_rss_mb"] > 0
    assert read_parent(derived)[1]["method"] == "prune"
    assert read_parent(derived)[1]["details"]["structure"]["heads"] == config[PRUNING_KEY]["heads"]
    assert read_parent(derived)[1]["details"]["recovery"]["distillation"] is True       # from the parent, via fit
    assert all("test_before" in t for t in report["tasks"].values())
    from mtlm.evaluate import evaluate_bundle
    metrics = evaluate_bundle(derived, "dev")[0]                # `mtlm eval`: the parent's dev rows, same scores
    for name, t in report["tasks"].items():
        assert metrics[f"{name}/{t['metric']}"] == pytest.approx(t["dev_after"])

    predictor = load(derived)                                   # mtlm.load / serve path: torch on the files
    assert predictor.engine.name == "torch"
    assert structure(predictor.model.backbone)["heads"] == config[PRUNING_KEY]["heads"]
    assert len(predictor.predict(TEXTS)) == 3

    bundle, export = export_run(derived, tmp_path / "pruned-onnx")     # ONNX parity of the pruned graph
    assert max(export["max_abs_diff"].values()) <= PARITY_ATOL
    onnx = load(bundle.parent, engine="onnx")
    got, want = onnx.predict(TEXTS), predictor.predict(TEXTS)
    assert [g["sentiment"]["label"] for g in got] == [w["sentiment"]["label"] for w in want]


def test_a_pruned_run_quantises_to_int8(pruned_run, tmp_path):
    derived, _ = pruned_run
    again, report = compress_run(derived, "int8", 100.0, tmp_path / "pruned-int8", measure_memory=False, rounds=1)
    assert report["engine"] == "onnx-int8" and (again / "model" / "onnx" / "model.int8.onnx").is_file()


def test_the_search_never_returns_a_model_outside_the_budget(run, tmp_path):
    """Budget 0 with no recovery: every level that changes a decision violates it; whatever is returned
    (or the error) keeps every task within budget on dev, re-evaluated from the written files."""
    settings = PruneSettings(levels=(0.75, 0.5), recovery_steps=0, importance_rows=32)
    try:
        derived, report = compress_run(run, "prune", 0.0, tmp_path / "strict", measure_memory=False, rounds=1,
                                       prune=settings)
    except CompressError as e:
        assert "nothing fits a 0.0% budget" in str(e) and "prune 75%" in str(e) and "prune 50%" in str(e)
        assert not (tmp_path / "strict" / "model").exists()
    else:
        assert all(t["dev_drop_pct"] <= 0.0 for t in report["tasks"].values())
        rejected = [t for t in report["trials"] if not t["fits"]]
        assert report["bound_by"] == (rejected[0]["violators"][0] if rejected else None)


def test_prune_bad_input(run, tmp_path):
    import shutil
    shutil.copytree(run / "model", tmp_path / "no-contract" / "model")       # a bundle without its run's rows
    with pytest.raises(CompressError, match="dev rows"):
        compress_run(tmp_path / "no-contract", "prune", 1.0)
    with pytest.raises(CompressError, match="must be 0 or more"):
        compress_run(run, "prune", -1.0)
    with pytest.raises(CompressError, match="fractions in"):
        compress_run(run, "prune", 1.0, prune=PruneSettings(levels=(1.5,)))
    from mtlm.cli import main
    assert main(["compress", str(run), "--method", "int8", "--recovery-steps", "3"]) == 2
    assert main(["compress", str(run), "--method", "prune", "--prune-levels", "half"]) == 2


def test_mtlm_serve_serves_a_pruned_run(pruned_run, tmp_path):
    import httpx
    from servers import running_server
    from mtlm.predict import load
    derived, _ = pruned_run
    want = load(derived).predict(TEXTS)
    with running_server(derived, tmp_path) as base:
        r = httpx.post(f"{base}/v1/predict", json={"inputs": [{"text": t} for t in TEXTS]}, timeout=30)
    assert r.status_code == 200, r.text
    got = r.json()["predictions"]
    assert [g["sentiment"]["label"] for g in got] == [w["sentiment"]["label"] for w in want]
    assert [[e["text"] for e in g["ner"]["entities"]] for g in got] == \
        [[e["text"] for e in w["ner"]["entities"]] for w in want]
