"""The benchmarks' --resume: a killed or staged run keeps what it measured and runs only what is missing."""

import json

import pytest

from benchscripts import load_bench



load = load_bench


def weighting_result(seeds, methods, steps=150):
    return {"config": {"steps": steps, "seeds": seeds, "methods": methods, "batch_size": 16, "tasks": {"a": {}}},
            "machine": {"device": "cpu"}, "runs": [], "summary": {}}


def test_weighting_resume_adds_a_seed_and_a_method(tmp_path, monkeypatch):
    bench = load("weighting", monkeypatch)
    out = tmp_path / "w.json"
    old = weighting_result([0], ["static", "dwa"])
    old["runs"] = [{"kind": "multi", "method": "static", "seed": 0},
                   {"kind": "single", "method": "static", "seed": 0, "task": "a"},
                   {"kind": "multi", "method": "dwa", "seed": 0}]
    out.write_text(json.dumps(old))
    plan = [("multi", m, s, None) for s in (0, 1) for m in ("static", "dwa", "famo")]
    plan += [("single", "static", s, "a") for s in (0, 1)]
    result, left = bench.resumed(out, weighting_result([0, 1], ["static", "dwa", "famo"]), plan)
    assert sorted(left) == sorted([("multi", "famo", 0, None), ("multi", "static", 1, None), ("multi", "dwa", 1, None),
                                   ("multi", "famo", 1, None), ("single", "static", 1, "a")])
    assert result["runs"] == old["runs"]
    assert result["config"]["seeds"] == [0, 1] and result["config"]["methods"] == ["static", "dwa", "famo"]


def test_weighting_resume_refuses_other_settings(tmp_path, monkeypatch):
    bench = load("weighting", monkeypatch)
    out = tmp_path / "w.json"
    out.write_text(json.dumps(weighting_result([0], ["static"], steps=600)))
    with pytest.raises(SystemExit, match="steps"):
        bench.resumed(out, weighting_result([0], ["static"], steps=150), [])
    assert json.loads(out.read_text())["config"]["steps"] == 600        # nothing overwritten


def test_weighting_resume_without_a_file_runs_everything(tmp_path, monkeypatch):
    bench = load("weighting", monkeypatch)
    fresh, plan = weighting_result([0], ["static"]), [("multi", "static", 0, None)]
    assert bench.resumed(tmp_path / "none.json", fresh, plan) == (fresh, plan)


def qa_result(overrides, multi=None, single=None):
    return {"benchmark": "qa_bench", "status": "running", "quick": False, "split": "test", "recipe": "/r.yaml",
            "overrides": overrides, "machine": {"device": "cpu"}, "multi_task": multi, "single_task": single or {}}


def test_qa_bench_resume_keeps_finished_stages(tmp_path, monkeypatch):
    bench = load("qa_bench", monkeypatch)
    out = tmp_path / "qa.json"
    old = qa_result(["train.max_steps=10"], multi={"metrics": {"squad": {"f1": 0.5}}}, single={"squad": {"x": 1}})
    out.write_text(json.dumps({**old, "status": "done"}))
    got = bench.resumed(out, qa_result(["train.max_steps=10"]))
    assert got["multi_task"] == old["multi_task"] and got["single_task"] == {"squad": {"x": 1}}
    assert got["status"] == "running"
    with pytest.raises(SystemExit, match="another configuration"):
        bench.resumed(out, qa_result(["train.max_steps=20"]))
