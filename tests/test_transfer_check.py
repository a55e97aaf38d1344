"""`mtlm baseline`'s negative-transfer warning (mtlm.transfer_check): which tasks trail, on which scale, the
options named, and each task's own best dev step beside the kept one; end to end on a tiny backbone."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mtlm.recipe import load_recipe
from mtlm.transfer_check import average_trails, format_warnings, options_for, task_steps, trailing, warnings


def row(task, metric, mt, st, lower=False):
    return {"task": task, "metric": metric, "lower_is_better": lower, "multi_task": mt, "single_task": st}


def test_trailing_uses_points_for_bounded_metrics_and_relative_gaps_for_errors():
    rows = [row("ner", "f1", 0.273, 0.355), row("intent", "accuracy", 0.761, 0.763),
            row("sts", "mse", 0.55, 0.5, lower=True), row("price", "mse", 10.1, 10.0, lower=True),
            row("missing", "accuracy", None, 0.9)]
    out = trailing(rows, 0.02)
    assert [(t["task"], t["scale"]) for t in out] == [("ner", "points"), ("sts", "relative")]
    assert out[0]["gap"] == pytest.approx(0.082) and out[1]["gap"] == pytest.approx(0.1)
    assert [t["task"] for t in trailing(rows, 0.0)] == ["ner", "intent", "sts", "price"]
    with pytest.raises(ValueError, match="threshold -1"):
        trailing(rows, -1)


def test_a_mix_that_loses_on_average_names_the_task_that_trails_most(make_recipe):
    """The mixes benchmark's mix 2 (seed 0): no task 2 points below, but the average 0.4 points below."""
    rows = [row("ner", "f1", 0.669, 0.687), row("topic", "accuracy", 0.863, 0.857),
            row("paraphrase", "accuracy", 0.679, 0.680), row("sts", "mse", 0.9, 0.5, lower=True)]
    assert trailing(rows[:3], 0.02) == []
    avg = average_trails(rows)
    assert avg["task"] == "ner" and avg["gap"] == pytest.approx(0.018)
    assert avg["average"]["multi_task"] == pytest.approx((0.669 + 0.863 + 0.679) / 3)    # mse left out
    recipe = load_recipe(make_recipe(tasks=("sentiment", "ner")))
    out = warnings(rows[:3], recipe, {}, 0.02)
    assert [w["task"] for w in out] == ["ner"]
    assert "average trails" in out[0]["message"] and out[0]["options"][0].startswith("tasks.ner.head_lr=")
    # a mix that holds on average, or whose worst task does not trail, gets no warning
    assert average_trails([row("ner", "f1", 0.70, 0.687), row("topic", "accuracy", 0.863, 0.857)]) is None
    assert warnings([row("ner", "f1", 0.70, 0.687)], recipe, {}, 0.02) == []


def test_options_name_what_the_recipe_does_not_use_yet(make_recipe):
    recipe = load_recipe(make_recipe(tasks=("sentiment", "ner")))
    steps = {"selected_step": 20, "dev_best_step": 10}
    text = "\n".join(options_for("ner", recipe, steps))
    for key in ("tasks.ner.private_layers=1", "train.sampling=temperature", "tasks.ner.head_lr=0.01",
                "train.head_warmup_steps=2", "its own best dev step was 10, not the kept step 20"):
        assert key in text
    tuned = load_recipe(make_recipe(tasks=("sentiment", "ner")),
                        ["tasks.ner.private_layers=2", "train.sampling=temperature", "train.temperature=3",
                         "train.head_lr=1e-2"])
    assert options_for("ner", tuned, {"selected_step": 20, "dev_best_step": 20}) == []


def test_task_steps_reads_the_kept_step_and_each_tasks_own_best():
    history = {"best_step": 20, "task_best": {"ner": {"metric": "f1", "value": 0.5, "step": 10}},
               "eval": [{"step": 10, "ner/f1": 0.5}, {"step": 20, "ner/f1": 0.4}]}
    assert task_steps(history, [row("ner", "f1", 0.4, 0.5)]) == {
        "ner": {"selected_step": 20, "dev_selected": 0.4, "dev_best_step": 10, "dev_best": 0.5}}


def test_baseline_warns_about_a_task_that_lost_to_the_mix(make_recipe, capsys):
    from mtlm.baseline import run_baseline
    recipe = load_recipe(make_recipe(tasks=("sentiment", "topic"), max_steps=20, eval_every=5))
    result = run_baseline(recipe, split="test", progress=False, threshold=1.0)     # nothing trails by 100 points
    assert result["warnings"] == []
    history = json.loads((recipe.run_dir() / "metrics.json").read_text())
    for r in result["tasks"]:
        assert r["selected_step"] == history["best_step"]
        assert r["dev_best_step"] == history["task_best"][r["task"]]["step"]
        assert r["dev_best"] == history["task_best"][r["task"]]["value"]

    # a multi-task model that lost its sentiment head (all zeros: one class for every text) must be named
    heads = recipe.run_dir() / "model" / "heads.safetensors"
    weights = load_file(heads)
    save_file({k: (torch.zeros_like(v) if k.startswith("sentiment.") else v) for k, v in weights.items()}, heads)
    capsys.readouterr()
    result = run_baseline(recipe, split="test", progress=False)
    saved = json.loads((recipe.run_dir() / "baseline_test.json").read_text())
    assert [w["task"] for w in saved["warnings"]] == ["sentiment"]
    assert saved["warnings"] == warnings(result["tasks"], recipe, task_steps(history, result["tasks"]), 0.02)
    printed = capsys.readouterr().out
    assert format_warnings(saved["warnings"]) in printed
    assert "tasks.sentiment.private_layers=1" in printed and "own best step" in printed


def test_a_model_trained_before_new_settings_existed_counts_as_the_same_recipe(make_recipe):
    """A bundle's recipe.yaml written before private_layers / head_warmup_steps existed lacks them: baseline
    must reuse it (the settings' defaults are what it was trained with), not refuse it as another recipe."""
    import yaml

    from mtlm.baseline import trained_recipe_changes
    from mtlm.train import fit
    recipe = load_recipe(make_recipe(tasks=("sentiment", "ner"), max_steps=2, eval_every=2))
    run = fit(recipe, progress=False)
    path = run / "model" / "recipe.yaml"
    stored = yaml.safe_load(path.read_text())
    for task in stored["tasks"].values():
        del task["private_layers"]
    del stored["train"]["head_warmup_steps"]
    stored["train"]["mixed_precision"] = "no"      # the default before `auto`: the same training without native bf16
    path.write_text(yaml.safe_dump(stored))
    from mtlm.precision import native_bf16
    assert trained_recipe_changes(recipe) == ([] if not native_bf16() else ["train.mixed_precision: 'no' -> 'bf16'"])
    assert trained_recipe_changes(load_recipe(make_recipe(tasks=("sentiment", "ner"), max_steps=2, eval_every=2),
                                              ["tasks.ner.private_layers=1"])) == ["tasks.ner.private_layers: 0 -> 1"]
