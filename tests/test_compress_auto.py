"""`mtlm compress RUN` (auto): the trained tries (layers, prune; alone and + int8) under a time bound, and the
verdict that says what stops the 1.8x goal (a task, or a missing instruction set). Tiny random backbone."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import write_recipe

pytestmark = [pytest.mark.requires(module="onnxruntime", hint="pip install onnxruntime"),
              pytest.mark.requires(module="onnx", hint="pip install onnx")]

import mtlm
from mtlm.cli import main
from mtlm.compress import compress_run, format_report
from mtlm.compress_auto import AutoSettings, Clock, verdict


@pytest.fixture(scope="module")
def run(tiny_backbone, toy_data, tmp_path_factory) -> Path:
    from mtlm.train import fit
    d = tmp_path_factory.mktemp("auto")
    recipe = {"name": "auto", "backbone": tiny_backbone, "max_length": 32, "output_dir": str(d / "run"),
              "tasks": {"sentiment": {"type": "classification", "data": {"train": str(toy_data / "sentiment.csv")}},
                        "ner": {"type": "token_classification", "data": {"train": str(toy_data / "ner.jsonl")}}},
              "train": {"batch_size": 8, "max_steps": 30, "eval_every": 30, "lr": 1e-3, "warmup_ratio": 0.0}}
    return fit(mtlm.load_recipe(write_recipe(d / "r.yaml", recipe)), progress=False)


def test_auto_tries_layers_and_prune_alone_and_with_int8_and_keeps_the_fastest(run, tmp_path):
    settings = AutoSettings(search_minutes=10, recovery_steps=4, prune_levels=(0.5,))
    derived, report = compress_run(run, "auto", 1000.0, tmp_path / "auto", measure_memory=False, rounds=1,
                                   auto=settings)
    methods = {t.get("method") for t in report["trials"]}
    assert {"layers", "prune", "layers+int8", "prune+int8"} <= methods
    fitting = {n for n, e in report["engines"].items() if e.get("fits")}
    assert {"onnx-int8", "torch-layers", "torch-pruned", "onnx-int8-layers", "onnx-int8-pruned"} <= fitting
    fastest = max(fitting, key=lambda n: report["engines"][n]["texts_per_s"])
    assert report["model"] == fastest and report["engine"] == report["engines"][fastest]["runs_on"]
    assert report["skipped"] == []
    lines = report["verdict"]["lines"]
    assert len(lines) == 1 + len(report["engines"]) - 1 + (not {"avx512_bf16", "amx_bf16"} & set(report["cpu_flags"]))
    assert all(any(line.startswith(f"{n}: ") for line in lines) for n in fitting)
    text = format_report(report)
    assert "goal: >= 1.8x torch fp32" in text and "onnx-int8-pruned" in text
    model = mtlm.load(derived)                         # the written run loads with its engine and predicts
    assert set(model.predict(["john went to paris"])[0]) == {"sentiment", "ner"}


def test_auto_without_search_time_tries_no_training_and_says_so(run, tmp_path):
    derived, report = compress_run(run, "auto", 1000.0, tmp_path / "quick", measure_memory=False, rounds=1,
                                   auto=AutoSettings(search_minutes=0))
    assert not any(t.get("method") for t in report["trials"])
    assert report["skipped"] == [{"try": "layers, prune (alone and + int8)", "reason": "--search-minutes 0"}]
    assert "skipped layers, prune (alone and + int8): --search-minutes 0" in report["verdict"]["lines"]


def test_the_clock_starts_no_try_that_would_overrun():
    t = [0.0]
    clock = Clock(1.0, now=lambda: t[0])
    assert clock.allows()
    began = clock.begin()
    t[0] = 25.0
    assert clock.end(began) == 25.0 and clock.allows()          # 25 s spent + a 25 s try <= 60 s
    began = clock.begin()
    t[0] = 40.0
    clock.end(began)
    assert not clock.allows()                                    # 40 s spent + a 25 s try > 60 s
    assert not Clock(0.0).allows()


def test_the_ladder_interleaves_methods_mildest_first():
    assert AutoSettings(prune_levels=(0.5, 0.2)).ladder(6) == [("layers", 5), ("prune", 0.2), ("layers", 4),
                                                               ("prune", 0.5), ("layers", 3)]
    assert AutoSettings().check() == []
    assert AutoSettings(search_minutes=-1).check() == ["--search-minutes must be 0 or more and finite, got -1"]


def _report(flags, engines, test_drops=(0.1, 0.2)):
    return {"budget_pct": 1.0, "model": "onnx-int8", "cpu_flags": flags, "engines": engines, "skipped": [
        {"try": "prune 50%", "reason": "the search time is spent (30 min, --search-minutes)"}],
            "tasks": {"sentiment": {"test_drop_pct": test_drops[0]}, "ner": {"test_drop_pct": test_drops[1]}}}


AVX2 = ["avx2", "fma"]
INT8_FITS = {"torch": {"ratio_vs_torch": 1.0},
             "onnx-int8": {"ratio_vs_torch": 1.71, "fits": True, "runs_on": "onnx-int8",
                           "dev_drop_pct": {"sentiment": 0.93, "ner": -0.87}},
             "torch-pruned": {"ratio_vs_torch": 1.62, "fits": False, "runs_on": "torch",
                              "dev_drop_pct": {"sentiment": 4.97, "ner": 5.99}}}


def test_the_verdict_names_the_task_and_the_missing_instruction_set():
    v = verdict(_report(AVX2, INT8_FITS), AutoSettings())
    assert not v["reached"]
    assert v["stopped_by"] == ["no VNNI / AMX int8 instructions", "task ner", "no native bf16"]
    assert v["lines"][0] == ("goal: >= 1.8x torch fp32, every task within 1% on dev and 2% on test: not reached "
                             "(onnx-int8 1.71x)")
    assert "onnx-int8: 1.71x, dev drops sentiment +0.93%, ner -0.87%: fits, but 1.71x < 1.8x (int8 runs on AVX2 " \
           "here: no AVX512-VNNI / AVX-VNNI / AMX-INT8)" in v["lines"]
    assert "torch-pruned: 1.62x, dev drops sentiment +4.97%, ner +5.99%: task ner is over the budget on dev" in v["lines"]
    assert "skipped prune 50%: the search time is spent (30 min, --search-minutes)" in v["lines"]


def test_the_verdict_is_reached_only_within_the_test_tolerance_too():
    fast = {**INT8_FITS, "onnx-int8": {**INT8_FITS["onnx-int8"], "ratio_vs_torch": 2.1}}
    flags = AVX2 + ["avx512_vnni", "amx_bf16"]
    assert verdict(_report(flags, fast), AutoSettings()) | {"lines": []} == {
        "target_speedup": 1.8, "reached": True, "lines": [], "stopped_by": []}
    v = verdict(_report(flags, fast, test_drops=(2.5, 0.0)), AutoSettings())
    assert not v["reached"] and v["stopped_by"] == ["task ner", "task sentiment on test"]
    assert "onnx-int8: task sentiment drops 2.50% on test (> 2%)" in v["lines"]


def test_cli_search_minutes_errors(run, capsys):
    assert main(["compress", str(run), "--search-minutes", "-1"]) == 2
    assert "--search-minutes must be 0 or more and finite, got -1.0" in capsys.readouterr().err
    assert main(["compress", str(run), "--method", "int8", "--search-minutes", "5"]) == 2
    assert "--search-minutes applies to --method auto only" in capsys.readouterr().err
