"""Negative transfer in `mtlm baseline`: which tasks trail their single-task model, the options that help,
and each task's own best dev step beside the step the run kept.

A task trails when its multi-task metric is worse than its single-task model's by more than `threshold`:
for bounded metrics (accuracy, F1, pearson: higher is better, at most 1) in points on the metric's 0-1 scale
(0.02 = 2 points); for error metrics (lower is better, unbounded: mse) relatively, (multi - single) /
single > threshold. The advice names the recipe options that give a drowned task more of the model: its
own top layers (`tasks.<name>.private_layers`, `mtlm.private_layers`), a larger share of the batches
(temperature sampling), a faster head (`head_lr`, `head_warmup_steps`: named first, the option that closed
the gaps measured on benchmarks/mixes.py); and, when the task's own best dev
step is not the kept one, that the mean-based selection chose for the other tasks.
"""

from __future__ import annotations

DEFAULT_THRESHOLD = 0.02


def trailing(rows: list[dict], threshold: float = DEFAULT_THRESHOLD) -> list[dict]:
    """Rows of `mtlm.baseline` ({"task", "metric", "lower_is_better", "multi_task", "single_task"}) ->
    one dict per task that trails: {"task", "metric", "multi_task", "single_task", "gap", "scale"} with
    gap > threshold: points (single - multi) for bounded metrics, (multi - single) / single for errors
    (scale "relative"). Tasks without both values are skipped. Raises ValueError for threshold < 0."""
    if not threshold >= 0:
        raise ValueError(f"threshold {threshold}: must be 0 or more")
    out = []
    for r in rows:
        mt, st = r.get("multi_task"), r.get("single_task")
        if mt is None or st is None:
            continue
        if r.get("lower_is_better"):
            gap, scale = ((mt - st) / abs(st) if st else (float("inf") if mt > st else 0.0)), "relative"
        else:
            gap, scale = st - mt, "points"
        if gap > threshold:
            out.append({"task": r["task"], "metric": r["metric"], "multi_task": mt, "single_task": st,
                        "gap": gap, "scale": scale})
    return out


def options_for(task: str, recipe, task_steps: dict | None = None) -> list[str]:
    """The recipe options that help task `task` against the mix, as `key=value` suggestions with why, given
    its current recipe (a `mtlm.config.Recipe`) and its `task_steps` row (see `task_steps`)."""
    cfg, train = recipe.tasks[task], recipe.train
    out = []
    if cfg.head_lr is None and train.head_lr is None:
        out.append(f"tasks.{task}.head_lr={10 * train.lr:g} (10x train.lr for its head: closed the gap of a span / "
                   f"token task on benchmarks/mixes.py) and/or train.head_warmup_steps="
                   f"{max(1, (train.max_steps or 1000) // 10)} (heads trained alone first)")
    if train.sampling in ("proportional", "round_robin") or (train.sampling == "temperature" and train.temperature < 3):
        out.append("train.sampling=temperature train.temperature=3 (a small task gets a larger share of the batches: "
                   "closed the gap of a small pair task on benchmarks/mixes.py, where a faster head did not)")
    if cfg.private_layers < 2:
        out.append(f"tasks.{task}.private_layers={cfg.private_layers + 1} (its own copy of the backbone's top "
                   f"layer(s); serving cost: benchmarks/results/private_layers.json)")
    if task_steps and task_steps.get("dev_best_step") not in (None, task_steps.get("selected_step")):
        out.append(f"its own best dev step was {task_steps['dev_best_step']}, not the kept step "
                   f"{task_steps['selected_step']}: the selection averages over tasks")
    return out


def task_steps(history: dict, rows: list[dict]) -> dict[str, dict]:
    """{task: {"selected_step", "dev_selected", "dev_best_step", "dev_best"}} from a run's metrics.json
    (`best_step`, `task_best`, `eval`): the task's dev metric at the kept step and at its own best step."""
    selected = history.get("best_step")
    at = next((e for e in history.get("eval", []) if e.get("step") == selected), {})
    out = {}
    for r in rows:
        best = (history.get("task_best") or {}).get(r["task"], {})
        out[r["task"]] = {"selected_step": selected, "dev_selected": at.get(f"{r['task']}/{r['metric']}"),
                          "dev_best_step": best.get("step"), "dev_best": best.get("value")}
    return out


def average_trails(rows: list[dict]) -> dict | None:
    """When the multi-task mean over the bounded (higher-is-better) metrics is below the single-task mean:
    {"task", "metric", "multi_task", "single_task", "gap", "scale": "points", "average": {"multi_task",
    "single_task"}} for the task that trails most (the one to give more of the model); else None. A mix can
    lose on average while no task trails by more than the threshold (issue 17: "the multi-task average >= the
    single-task average")."""
    scored = [r for r in rows if r.get("multi_task") is not None and r.get("single_task") is not None
              and not r.get("lower_is_better")]
    if not scored:
        return None
    mean_mt = sum(r["multi_task"] for r in scored) / len(scored)
    mean_st = sum(r["single_task"] for r in scored) / len(scored)
    worst = max(scored, key=lambda r: r["single_task"] - r["multi_task"])
    if mean_mt >= mean_st or worst["single_task"] <= worst["multi_task"]:
        return None
    return {"task": worst["task"], "metric": worst["metric"], "multi_task": worst["multi_task"],
            "single_task": worst["single_task"], "gap": worst["single_task"] - worst["multi_task"],
            "scale": "points", "average": {"multi_task": mean_mt, "single_task": mean_st}}


def warnings(rows: list[dict], recipe, steps: dict[str, dict], threshold: float = DEFAULT_THRESHOLD) -> list[dict]:
    """`trailing` rows, each with "options" (`options_for`) and a one-line "message"; when no task trails by
    more than `threshold` but the multi-task average is below the single-task average (`average_trails`), one
    warning for the task that trails most (its "average" holds both means)."""
    out = []
    for t in trailing(rows, threshold):
        how = (f"{t['gap']:.1%} worse" if t["scale"] == "relative" else f"{100 * t['gap']:.1f} points below")
        t["threshold"] = threshold
        t["options"] = options_for(t["task"], recipe, steps.get(t["task"]))
        t["message"] = (f"task {t['task']} trails its single-task model: {t['metric']} {t['multi_task']:.4f} vs "
                        f"{t['single_task']:.4f} ({how}; threshold {threshold:g}{'' if t['scale'] == 'points' else ' relative'})")
        out.append(t)
    avg = None if out else average_trails(rows)
    if avg is not None:
        a = avg["average"]
        avg["threshold"] = threshold
        avg["options"] = options_for(avg["task"], recipe, steps.get(avg["task"]))
        avg["message"] = (f"the multi-task average trails the single-task average ({a['multi_task']:.4f} vs "
                          f"{a['single_task']:.4f}); task {avg['task']} trails most: {avg['metric']} "
                          f"{avg['multi_task']:.4f} vs {avg['single_task']:.4f} ({100 * avg['gap']:.1f} points below)")
        out.append(avg)
    return out


def format_warnings(items: list[dict]) -> str:
    """The printed block: one message per trailing task, then its options, indented."""
    lines = []
    for w in items:
        lines.append(f"WARNING: {w['message']}. Options that help:")
        lines += [f"    {o}" for o in w["options"]]
    return "\n".join(lines)
