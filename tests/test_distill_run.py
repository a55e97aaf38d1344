"""`mtlm distill` end to end on a tiny random backbone, layer choice and copying, and its bad input."""

from __future__ import annotations

import json

import pytest
import torch

import mtlm
from mtlm.checkpoint import load_bundle
from mtlm.cli import main
from mtlm.distill import DistillError
from mtlm.distill.layers import LayerError, keep_layers, kept_layers
from mtlm.distill.run import distill_run, parse_student
from mtlm.train import fit


def test_alternate_layers_are_distilberts_for_12_to_6_and_spread_otherwise():
    assert kept_layers(12, 6, "alternate") == [0, 2, 4, 7, 9, 11]
    assert kept_layers(6, 3, "alternate") == [0, 2, 5]
    assert kept_layers(6, 1, "alternate") == [0]
    assert kept_layers(6, 3, "top") == [0, 1, 2]
    for n, strategy in ((0, "top"), (6, "alternate"), (3, "middle")):
        with pytest.raises(LayerError):
            kept_layers(6, n, strategy)


def test_keep_layers_keeps_the_chosen_layers_weights_and_round_trips(tiny_backbone, tmp_path):
    from transformers import AutoModel
    original = AutoModel.from_pretrained(tiny_backbone)
    small = keep_layers(AutoModel.from_pretrained(tiny_backbone), [1])
    assert small.config.num_hidden_layers == 1 and len(small.encoder.layer) == 1
    want = original.encoder.layer[1].state_dict()
    for k, v in small.encoder.layer[0].state_dict().items():
        assert torch.equal(v, want[k]), k
    assert torch.equal(small.embeddings.word_embeddings.weight, original.embeddings.word_embeddings.weight)
    small.save_pretrained(tmp_path / "small")
    again = AutoModel.from_pretrained(tmp_path / "small")
    assert len(again.encoder.layer) == 1
    assert torch.equal(again.encoder.layer[0].attention.self.query.weight, want["attention.self.query.weight"])
    with pytest.raises(LayerError, match="ascending distinct"):
        keep_layers(AutoModel.from_pretrained(tiny_backbone), [1, 1])


@pytest.fixture(scope="module")
def teacher(tiny_backbone, toy_data, tmp_path_factory):
    """A trained 2-layer teacher with a classification and a tagging task."""
    from tests.conftest import write_recipe
    folder = tmp_path_factory.mktemp("teacher")
    recipe = {"name": "teacher", "backbone": tiny_backbone, "max_length": 32, "output_dir": str(folder / "run"),
              "tasks": {"sentiment": {"type": "classification", "data": {"train": str(toy_data / "sentiment.csv")}},
                        "ner": {"type": "token_classification", "data": {"train": str(toy_data / "ner.jsonl")}}},
              "train": {"batch_size": 8, "max_steps": 16, "eval_every": 8, "lr": 1e-3, "warmup_ratio": 0.0}}
    return fit(mtlm.load_recipe(write_recipe(folder / "teacher.yaml", recipe)), progress=False)


def test_distill_layers_1_end_to_end(teacher, tmp_path):
    out, report = distill_run(teacher, "layers:1", ["train.max_steps=6", "train.eval_every=3", "distill.alpha=0.7",
                                                    "distill.anneal=true", "distill.hidden=0.5"],
                              tmp_path / "student", progress=False, rounds=1)
    parent = json.loads((out / "parent.json").read_text())
    assert parent["method"] == "distill" and parent["details"]["kept_layers"] == [0]
    assert parent["details"]["options"]["alpha"] == 0.7 and parent["details"]["options"]["anneal"] is True
    assert parent["details"]["options"]["hidden"] == 0.5
    assert parent["details"]["teacher_rows_computed"] > 0
    assert not (out / "distill-train").exists() and (out / "distill_metrics.json").is_file()
    student, _, tasks, _ = load_bundle(out, "cpu")          # the projection is not part of the bundle
    t_model, *_ = load_bundle(teacher, "cpu")
    assert len(student.backbone.encoder.layer) == 1
    # the embeddings started from the teacher's and moved in 6 steps; the heads are the teacher's label spaces
    assert student.heads["sentiment"].out.weight.shape == t_model.heads["sentiment"].out.weight.shape
    assert set(report["tasks"]) == {"sentiment", "ner"}
    assert {"teacher_dev", "student_dev", "teacher_test", "student_test"} <= set(report["tasks"]["ner"])
    assert report["speed"]["student"]["texts_per_s"] > 0 and report["speed_ratio"] > 0
    assert json.loads((out / "distill_report.json").read_text())["average"]["ratio_dev"] == report["average"]["ratio_dev"]
    # judged on the teacher's rows: mtlm eval follows parent.json
    assert main(["eval", str(out), "--split", "dev"]) == 0


def test_layer_copy_starts_from_the_teachers_weights(teacher, tmp_path, monkeypatch):
    # 1 step at lr ~0: the student is the teacher's layer 0 (layers:1 of 2 keeps the first); a relative
    # --output (the data files written there must resolve from the student's recipe)
    monkeypatch.chdir(tmp_path)
    out, _ = distill_run(teacher, "layers:1", ["train.max_steps=1", "train.lr=1e-12", "train.eval_every=1"],
                         "copy", progress=False, measure=False)
    assert out == tmp_path / "copy"
    student, *_ = load_bundle(out, "cpu")
    t_model, *_ = load_bundle(teacher, "cpu")
    for k, v in student.backbone.encoder.layer[0].state_dict().items():
        assert torch.allclose(v, t_model.backbone.encoder.layer[0].state_dict()[k], atol=1e-6), k
    for name in ("sentiment", "ner"):
        assert torch.allclose(student.heads[name].out.weight, t_model.heads[name].out.weight, atol=1e-6)


@pytest.mark.parametrize("spec, message", [("layers:0", "between 1 and 1"), ("layers:2", "between 1 and 1"),
                                           ("layers:x", "whole number"), ("bert-huge", "unknown student")])
def test_bad_student_specs_are_refused(spec, message):
    with pytest.raises(DistillError, match=message):
        parse_student(spec, 2)


def test_bad_input_gets_clear_errors(teacher, tmp_path, tiny_backbone, capsys):
    assert main(["distill", str(tmp_path), "--student", "layers:1"]) == 2
    assert "not an mtlm run or bundle" in capsys.readouterr().err
    assert main(["distill", str(teacher), "--student", "layers:3"]) == 2
    assert "between 1 and 1" in capsys.readouterr().err
    assert main(["distill", str(teacher), "--student", "layers:1", "distill.alpha=1.5",
                 "--output", str(tmp_path / "x")]) == 2
    assert "distill.alpha" in capsys.readouterr().err
    assert main(["distill", str(teacher), "--student", "layers:1", "distill.temperature=0",
                 "--output", str(tmp_path / "x")]) == 2
    assert "distill.temperature" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    (tmp_path / "pictures").mkdir()
    (tmp_path / "pictures" / "a.png").write_bytes(b"\x89PNG")
    assert main(["distill", str(teacher), "--student", str(tmp_path / "pictures"), "--output", str(tmp_path / "y")]) == 2
    assert "not a model folder or backbone name" in capsys.readouterr().err


def test_compare_runs_measures_each_run_on_its_engine_and_the_bench_plots_it(teacher, tmp_path, monkeypatch, capsys):
    """compare_runs with `engines`: the teacher's exported graph (onnx engine) scores as the teacher does on
    dev and test, is timed beside it, and benchmarks/compress_bench.py's plot draws one point per run."""
    pytest.importorskip("onnxruntime", reason="the onnx engine needs onnxruntime")
    from benchscripts import load_bench
    from mtlm.distill.run import compare_runs
    from mtlm.export import export_run
    graph = tmp_path / "graph"
    export_run(teacher, graph)
    report = compare_runs(teacher, {"graph": graph}, rounds=1, engines={"graph": "onnx"})
    assert report["engines"] == {"teacher": "torch", "graph": "onnx"}
    for task, entry in report["tasks"].items():
        for split in ("dev", "test"):
            assert entry[f"graph_{split}"] == pytest.approx(entry[f"teacher_{split}"], abs=1e-6), (task, split)
    assert set(report["speed"]) == {"teacher", "graph"} and report["speed_ratio"]["graph"] > 0
    bench = load_bench("compress_bench", monkeypatch)
    assert bench.engine_of(graph) == "onnx"             # a variant made but not recorded is read back
    for argv, message in (([str(tmp_path / "nope")], "not a run folder"), ([str(teacher), "--rounds", "0"], "--rounds"),
                          ([str(teacher), "--variants", ","], "name one or more")):
        monkeypatch.setattr("sys.argv", ["compress_bench.py", *argv])
        with pytest.raises(SystemExit) as stop:        # refused before anything is made or measured
            bench.main()
        assert stop.value.code == 2 and message in capsys.readouterr().err, argv
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (pip install -e '.[report]')")
    figure = bench.plot(report, tmp_path / "plot.png")
    assert figure == tmp_path / "plot.png" and figure.stat().st_size > 1000
