"""The inference seam: `MultiTaskModel.infer` (tensors in, every head out) exported to ONNX as one graph,
engines in a name registry that the Predictor runs through, and `pooling: cls`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import write_recipe
from mtlm.encoded import ModelInputs
from mtlm.engine import ENGINES, TorchEngine, make_engine
from mtlm.model import InferenceGraph, build_model, load_backbone, pool
from mtlm.predict import Predictor
from test_task_matrix import CASES, MAX_LENGTH, assert_same, fitted_task


@pytest.fixture(scope="module")
def every_head(tiny_backbone):
    """(model in eval mode, tokenizer, tasks): one head of every task type on the tiny random backbone."""
    backbone, tokenizer = load_backbone(tiny_backbone)
    tasks = {key.replace("_", "-"): fitted_task(key.replace("_", "-"), case)[0] for key, case in CASES.items()}
    torch.manual_seed(0)
    return build_model(backbone, tasks, "mean", 0.1).eval(), tokenizer, tasks


def batch_of(tokenizer, texts: list[str], pairs: list[str]) -> ModelInputs:
    return ModelInputs.from_dict(dict(tokenizer(texts, pairs, padding=True, return_tensors="pt")))


def test_infer_returns_every_head_from_one_pass(every_head):
    model, tokenizer, tasks = every_head
    inputs = batch_of(tokenizer, ["john went to paris", "a"], ["the film", "stock market fell today"])
    out = model.infer(**inputs.as_dict())
    rows, seq_len = inputs.shape
    assert list(out) == list(tasks)
    for name, task in tasks.items():
        per_row = (rows, seq_len) if task.head_input == "tokens" else (rows,)
        assert out[name].shape[:-1] == per_row, name
        assert torch.equal(out[name], model(**inputs.as_dict(), task=name)), name   # same as the training forward
    assert list(model.infer(**inputs.as_dict(), tasks=["regression"])) == ["regression"]


def export(model, tokenizer, tasks, path) -> tuple[InferenceGraph, ModelInputs]:
    """`InferenceGraph(model)` exported to `path` with the legacy exporter (dynamo=False) and eager attention
    (/work/shared/ENGINES.md), dynamic batch and sequence axes. Returns (graph, the export example)."""
    model.backbone.set_attn_implementation("eager")          # SDPA's mask path does not trace to ONNX cleanly
    graph = InferenceGraph(model).eval()
    example = batch_of(tokenizer, ["john went to paris"], ["the film"])
    axes = {k: {0: "batch", 1: "seq"} for k in ("input_ids", "attention_mask", "token_type_ids")}
    axes.update({n: {0: "batch", 1: "seq"} if t.head_input == "tokens" else {0: "batch"} for n, t in tasks.items()})
    torch.onnx.export(graph, (example.input_ids, example.attention_mask, example.token_type_ids), str(path),
                      input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=graph.names,
                      dynamic_axes=axes, opset_version=17, dynamo=False)
    return graph, example


def test_onnx_export_is_one_graph_matching_torch_for_every_head(every_head, tmp_path):
    """onnxruntime, on a batch of another size and length than the export example, gives every head's
    torch outputs."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model, tokenizer, tasks = every_head
    path = tmp_path / "model.onnx"
    graph, example = export(model, tokenizer, tasks, path)
    onnx.checker.check_model(str(path))
    assert [o.name for o in onnx.load(str(path)).graph.output] == list(tasks)     # one graph, every head

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = batch_of(tokenizer, ["the movie was great fun , loved it", "a", "stock market"],
                      ["the film", "john smith went to london on the plot of a story", "b"])
    assert inputs.shape[0] != example.shape[0] and inputs.shape[1] != example.shape[1]
    got = session.run(graph.names, {k: v.numpy() for k, v in inputs.as_dict().items()})
    with torch.inference_mode():
        want = model.infer(**inputs.as_dict())
    for name, value in zip(graph.names, got):
        assert value.shape == tuple(want[name].shape), name
        np.testing.assert_allclose(value, want[name].numpy(), atol=1e-4, rtol=1e-4, err_msg=name)


class OrtEngine:
    """An ONNX Runtime session of the exported graph behind the Engine interface (what the next issue adds)."""

    name = "onnx-test"

    def __init__(self, session, names):
        self.session, self.names = session, names

    def run(self, inputs: ModelInputs, tasks):
        feed = inputs.as_dict()
        feed.setdefault("token_type_ids", torch.zeros_like(inputs.input_ids))
        out = self.session.run(self.names, {k: v.numpy() for k, v in feed.items()})
        return {n: torch.from_numpy(v) for n, v in zip(self.names, out) if n in tasks}


def test_predictor_runs_the_model_only_through_its_engine(every_head, tmp_path):
    """A Predictor with no torch model at all, only an ONNX Runtime engine, predicts what the torch engine
    does for every task type."""
    ort = pytest.importorskip("onnxruntime")
    model, tokenizer, tasks = every_head
    graph, _ = export(model, tokenizer, tasks, tmp_path / "m.onnx")
    meta = {"max_length": MAX_LENGTH}
    torch_predictor = Predictor(model, tokenizer, tasks, meta, torch.device("cpu"))
    assert isinstance(torch_predictor.engine, TorchEngine)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    onnx_predictor = Predictor(None, tokenizer, tasks, meta, torch.device("cpu"), engine=OrtEngine(session, graph.names))
    inputs = [case.inputs[0] for case in CASES.values()]
    for got, want in zip(onnx_predictor.predict(inputs, batch_size=2), torch_predictor.predict(inputs, batch_size=2)):
        assert list(got) == list(want)
        for name in want:
            assert_same(want[name], got[name], name)


def test_engine_registry_by_name(every_head):
    model, _, _ = every_head
    assert set(ENGINES) >= {"torch"} and isinstance(make_engine("torch", model), TorchEngine)
    with pytest.raises(ValueError, match=r"unknown engine 'tensorrt'; known engines: torch"):
        make_engine("tensorrt", model)


def test_model_inputs_rows_and_dict():
    ids = torch.arange(12).reshape(3, 4)
    inputs = ModelInputs(ids, torch.ones_like(ids))
    assert inputs.shape == (3, 4) and set(inputs.as_dict()) == {"input_ids", "attention_mask"}
    part = inputs.rows(1, 3)
    assert part.shape == (2, 4) and torch.equal(part.input_ids, ids[1:3]) and part.token_type_ids is None


# ---------------------------------------------------------------- pooling: cls

def test_cls_pooling_is_the_first_token_state_and_trains(tiny_backbone, make_recipe, tmp_path):
    import yaml

    from mtlm.recipe import load_recipe
    from mtlm.train import fit

    hidden = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert torch.equal(pool(hidden, mask, "cls"), hidden[:, 0])
    assert torch.allclose(pool(hidden, mask, "mean")[0], hidden[0, :3].mean(0))

    path = make_recipe(tasks=("sentiment", "ner"), name="cls-pool", max_steps=4, eval_every=2)
    raw = yaml.safe_load(path.read_text())
    raw["pooling"] = "cls"
    write_recipe(path, raw)
    run = fit(load_recipe(path), progress=False)
    meta = json.loads((run / "model" / "tasks.json").read_text())
    assert meta["pooling"] == "cls"
    import mtlm
    predictor = mtlm.load(run, device="cpu")
    assert predictor.model.pooling == "cls"
    # the sentiment head reads exactly the [CLS] state: the same logits from the first token by hand
    inputs = batch_of(predictor.tokenizer, ["the movie was great", "bad"], None)
    with torch.inference_mode():
        states = predictor.model.backbone(**inputs.as_dict()).last_hidden_state
        by_hand = predictor.model.heads["sentiment"](states[:, 0])
        assert torch.allclose(predictor.model.infer(**inputs.as_dict())["sentiment"], by_hand, atol=1e-6)
    history = json.loads((run / "metrics.json").read_text())["eval"]
    assert [e["step"] for e in history] == [2, 4] and "sentiment/accuracy" in history[-1]
