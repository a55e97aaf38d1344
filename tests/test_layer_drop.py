"""`mtlm compress --method layers`: the layer-count search, the written run, and the budget guard."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import mtlm
from mtlm.checkpoint import load_bundle
from mtlm.cli import main
from mtlm.compress import CompressError, Scorer, compress_run
from mtlm.layer_drop import LayerSettings, search_layers
from mtlm.quantize import Trial
from mtlm.train import fit
from tests.conftest import write_recipe


def _teacher(backbone, toy_data, folder, steps=16):
    recipe = {"name": "teacher", "backbone": backbone, "max_length": 32, "output_dir": str(folder / "run"),
              "tasks": {"sentiment": {"type": "classification", "data": {"train": str(toy_data / "sentiment.csv")}},
                        "ner": {"type": "token_classification", "data": {"train": str(toy_data / "ner.jsonl")}}},
              "train": {"batch_size": 8, "max_steps": steps, "eval_every": steps, "lr": 1e-3, "warmup_ratio": 0.0}}
    return fit(mtlm.load_recipe(write_recipe(folder / "teacher.yaml", recipe)), progress=False)


@pytest.fixture(scope="module")
def teacher(tiny_backbone, toy_data, tmp_path_factory):
    return _teacher(tiny_backbone, toy_data, tmp_path_factory.mktemp("teacher2"), steps=40)


@pytest.fixture(scope="module")
def teacher4(tiny_backbone, toy_data, tmp_path_factory):
    """A 4-layer teacher (the tiny BERT's tokenizer, 4 random layers)."""
    from transformers import BertConfig, BertModel
    folder = tmp_path_factory.mktemp("teacher4")
    backbone = folder / "bert4"
    shutil.copytree(tiny_backbone, backbone)
    config = BertConfig.from_pretrained(backbone)
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    BertModel(config).save_pretrained(backbone)
    return _teacher(str(backbone), toy_data, folder, steps=8)


def _dev_scorer(run):
    from mtlm.engine_check import dev_features
    model, tokenizer, tasks, meta = load_bundle(run, "cpu")
    dev = dev_features(run / "model", tasks, tokenizer, int(meta["max_length"]), rows=None)
    return model, tasks, dev, tokenizer


class ScriptedScorer(Scorer):
    """Real dev metrics, but relative drops scripted by the student's layer count (tests the search alone)."""

    def __init__(self, *args, drops_by_layers):
        super().__init__(*args)
        self.script, self.layers = drops_by_layers, None

    def metrics(self, engine):
        self.layers = len(engine.model.backbone.encoder.layer)
        return super().metrics(engine)

    def drops(self, base, metrics):
        return dict(self.script[self.layers])


def test_the_search_finds_the_fewest_layers_and_names_the_binding_task(teacher4, tmp_path):
    model, tasks, dev, tokenizer = _dev_scorer(teacher4)
    scorer = ScriptedScorer(tasks, dev, tokenizer.pad_token_id,
                            drops_by_layers={1: {"sentiment": 0.5, "ner": 5.0}, 2: {"sentiment": 0.2, "ner": 0.9},
                                             3: {"sentiment": 0.0, "ner": 0.0}})
    base = Scorer(tasks, dev, tokenizer.pad_token_id).metrics(mtlm.engine.TorchEngine(model, "cpu"))
    best, tried, bound = search_layers(model, teacher4, scorer, base, 1.0, LayerSettings(recovery_steps=1), tmp_path)
    assert best["details"]["layers"] == 2 and best["details"]["layer_choice"] == "top"
    assert best["details"]["kept_layers"] == [0, 1]
    assert bound == "ner"
    # bisection over 1..3: N=2 (fits with top), then N=1 (top and alternate both fail)
    assert [(t["layers"], t["layer_choice"], t["fits"]) for t in tried] == \
        [(1, "top", False), (1, "alternate", False), (2, "top", True)]
    assert len(load_bundle(best["bundle"], "cpu")[0].backbone.encoder.layer) == 2


def test_compress_layers_writes_a_derived_run_within_budget(teacher, tmp_path):
    out, report = compress_run(teacher, "layers", budget=1000.0, output=tmp_path / "small", measure_memory=False,
                               rounds=1, layers=LayerSettings(recovery_steps=2))
    assert report["model"] == "torch-layers" and report["engine"] == "torch"
    assert all(t["dev_drop_pct"] <= 1000.0 for t in report["tasks"].values())
    assert {"test_before", "test_after"} <= set(report["tasks"]["ner"])
    assert set(report["engines"]) == {"torch", "torch-layers"} and report["engines"]["torch-layers"]["size_mb"] > 0
    assert report["trials"][0]["layers"] == 1
    parent = json.loads((out / "parent.json").read_text())
    assert parent["method"] == "layers" and parent["details"]["kept_layers"] == [0]
    student, *_ = load_bundle(out, "cpu")
    assert len(student.backbone.encoder.layer) == 1 and student.backbone.config.num_hidden_layers == 1
    assert main(["eval", str(out), "--split", "dev"]) == 0


def test_a_model_outside_the_budget_is_never_returned(teacher, tmp_path, monkeypatch):
    # a search that (wrongly) claims a fit for a model whose heads are negated: the written files are
    # scored again and refused
    model, tasks, dev, tokenizer = _dev_scorer(teacher)
    base = Scorer(tasks, dev, tokenizer.pad_token_id).metrics(mtlm.engine.TorchEngine(model, "cpu"))
    assert base["sentiment"] > 0.55, "the test needs a teacher better than chance"
    broken = tmp_path / "broken"
    shutil.copytree(teacher / "model", broken)
    heads = load_file(broken / "heads.safetensors")
    save_file({k: -v for k, v in heads.items()}, broken / "heads.safetensors")

    def lying_search(model, parent, scorer, base, budget, settings, work):
        trial = Trial("layers 2->1 (top)", [], dict(base), {n: 0.0 for n in base}, budget)
        return {"trial": trial, "bundle": broken, "details": {"layers": 1}}, [trial.as_dict()], None

    monkeypatch.setattr("mtlm.layer_drop.search_layers", lying_search)
    with pytest.raises(CompressError, match="outside the budget on dev"):
        compress_run(teacher, "layers", budget=1.0, output=tmp_path / "bad", measure_memory=False, rounds=1)
    assert not (tmp_path / "bad").exists()


def test_nothing_within_budget_is_an_error_naming_the_drops(teacher, tmp_path, monkeypatch):
    def failing_search(model, parent, scorer, base, budget, settings, work):
        trial = Trial("layers 2->1 (top)", [], dict(base), {"sentiment": 3.0, "ner": 12.5}, budget)
        return None, [trial.as_dict()], "ner"

    monkeypatch.setattr("mtlm.layer_drop.search_layers", failing_search)
    with pytest.raises(CompressError, match=r"(?s)nothing fits.*stops it: ner.*ner \+12.50%"):
        compress_run(teacher, "layers", budget=1.0, output=tmp_path / "none", measure_memory=False, rounds=1)


def test_bad_layer_settings_are_refused(teacher, tmp_path, capsys):
    with pytest.raises(CompressError, match="recovery steps must be 1 or more"):
        compress_run(teacher, "layers", layers=LayerSettings(recovery_steps=0))
    with pytest.raises(CompressError, match="layer choices must be among"):
        compress_run(teacher, "layers", layers=LayerSettings(strategies=("middle",)))
    assert main(["compress", str(teacher), "--method", "int8", "--recovery-steps", "5"]) == 2
    assert "--recovery-steps applies to --method auto, layers and prune only" in capsys.readouterr().err
    assert main(["compress", str(teacher), "--method", "layers", "--layer-choice", "bottom"]) == 2
    assert "layer choices must be among" in capsys.readouterr().err
