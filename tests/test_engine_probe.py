"""benchmarks/engine_probe.py's quantisers on a tiny random BERT with a sentence and a token head: the static
QDQ graph (calibrated on real rows) and the fused-then-quantised graph load in onnxruntime, keep every head's
outputs close to the fp32 graph's, and hold what they claim (Q/DQ pairs with the heads left fp32; fused
Attention quantised as QAttention). The OpenVINO rows need `openvino` (not a test dependency): skipped there."""

from __future__ import annotations

import importlib

import pytest
import torch

from benchscripts import load_bench
from conftest import sentence_and_token_model

pytestmark = [pytest.mark.requires(module="onnxruntime", hint="pip install onnxruntime"),
              pytest.mark.requires(module="onnx", hint="pip install onnx")]

TEXTS = ["john smith went to paris", "the movie was great fun", "terrible plot , bad acting",
         "a really boring film about london", "mary lives in berlin", "great acting and a fine plot"]


@pytest.fixture(scope="module")
def graph(tiny_backbone, tmp_path_factory):
    """(folder holding onnx/model.onnx, fp32 ONNX engine, its inputs, the tokenizer, the model config)."""
    from mtlm.encoded import ModelInputs
    from mtlm.engine import OnnxEngine
    from mtlm.export import export_onnx
    from mtlm.model import load_backbone
    # onnxruntime.transformers puts its own folder on sys.path when first imported: import it here, not inside
    # a test whose monkeypatch restores sys.path afterwards (the optimizer's sibling imports would then fail)
    importlib.import_module("onnxruntime.transformers.optimizer")

    backbone, tokenizer = load_backbone(tiny_backbone)
    model = sentence_and_token_model(backbone)
    folder = tmp_path_factory.mktemp("probe")
    export_onnx(model, folder / "onnx" / "model.onnx")
    inputs = ModelInputs.from_dict(dict(tokenizer(TEXTS, padding=True, return_tensors="pt")))
    return folder, OnnxEngine(None, "cpu", folder), inputs, tokenizer, backbone.config


def close_to_fp32(fp32, folder, inputs, cosine_min=0.95):
    from mtlm.engine import OnnxInt8Engine
    want, got = fp32.run(inputs, ["sentiment", "ner"]), OnnxInt8Engine(None, "cpu", folder).run(inputs, ["sentiment", "ner"])
    for name in want:
        assert got[name].shape == want[name].shape, name
        cosine = torch.nn.functional.cosine_similarity(got[name].flatten(), want[name].flatten(), dim=0)
        assert cosine > cosine_min, (name, float(cosine))


def test_static_qdq_int8_is_calibrated_and_leaves_excluded_heads_fp32(graph, monkeypatch, tmp_path):
    import onnx
    from mtlm.quantize import node_groups
    probe = load_bench("engine_probe", monkeypatch)
    folder, fp32, inputs, tokenizer, _ = graph
    source = folder / "onnx" / "model.onnx"
    heads = [n for g, nodes in node_groups(source).items() if g.startswith("head.") for n in nodes]
    rows = [{"input_ids": torch.tensor(ids)} for ids in tokenizer(TEXTS)["input_ids"]]
    target = tmp_path / "onnx" / "model.int8.onnx"
    probe.quantize_static_qdq(source, target, rows, tokenizer.pad_token_id, heads)
    nodes = onnx.load(str(target)).graph.node
    quantized = {n.input[0] for n in nodes if n.op_type == "DequantizeLinear"}
    assert sum(n.op_type == "QuantizeLinear" for n in nodes) > 0 and quantized
    matmuls = {n.name: n for n in nodes if n.op_type in ("MatMul", "Gemm")}
    for head in heads:           # an excluded head's MatMul reads no dequantised input
        assert head in matmuls and not any(i.endswith("_DequantizeLinear_Output") for i in matmuls[head].input)
    close_to_fp32(fp32, tmp_path, inputs)


def test_fused_graph_quantises_attention(graph, monkeypatch, tmp_path):
    import onnx
    probe = load_bench("engine_probe", monkeypatch)
    folder, fp32, inputs, _, config = graph
    target = tmp_path / "onnx" / "model.int8.onnx"
    fused = probe.quantize_fused(folder / "onnx" / "model.onnx", target, config)
    assert fused["Attention"] == config.num_hidden_layers
    ops = {n.op_type for n in onnx.load(str(target)).graph.node}
    assert "QAttention" in ops and "Attention" not in ops
    close_to_fp32(fp32, tmp_path, inputs, cosine_min=0.9)   # embeddings and heads int8 too (a broken graph: ~0)


def test_openvino_engine_matches_the_fp32_graph(graph, monkeypatch):
    pytest.importorskip("openvino", reason="openvino is optional (pip install openvino)")
    probe = load_bench("engine_probe", monkeypatch)
    folder, fp32, inputs, _, _ = graph
    want = fp32.run(inputs, ["sentiment", "ner"])
    got = probe.OpenVinoEngine(folder / "onnx" / "model.onnx", threads=1).run(inputs, ["ner"])
    assert list(got) == ["ner"]
    torch.testing.assert_close(got["ner"], want["ner"], atol=1e-4, rtol=0)
