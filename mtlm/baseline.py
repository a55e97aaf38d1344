"""`mtlm baseline`: the same recipe as one single-task model per task, next to the multi-task model.

Each single-task run gets the step budget its task had inside the multi-task run (max_steps x the sampling
probability of the task's source), the same hyper-parameters and the same rows: the task's labelled rows of
each split of the multi-task run (for a task of a joint group, the rows that carry its label), written to
run_dir/baseline/<task>/data/. The table shows, per task, the selection metric of both, the task average,
and what K single-task models cost: parameters and backbone passes per input relative to the one multi-task
model. A model already in a run folder is reused only when it was trained from the same recipe (its
bundle's recipe.yaml): the multi-task run is otherwise an error (pass --retrain), a single-task run is
trained again."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml
from pydantic import ValidationError

from mtlm.batches import mean_probabilities, source_dataset
from mtlm.checkpoint import find_bundle, load_bundle
from mtlm.config import Recipe, RecipeError, recipe_changes
from mtlm.evaluate import by_task, evaluate_bundle
from mtlm.model import count_parameters
from mtlm.precision import as_trained
from mtlm.sources import Rows
from mtlm.tasks import default_metric
from mtlm.transfer_check import DEFAULT_THRESHOLD, format_warnings, task_steps, warnings

# settings that do not change the trained model: a model trained with other values is reused
NOT_MODEL = ("name", "output_dir", "train.eval_batch_size", "train.checkpoint_every", "train.keep_checkpoints")


def trained_recipe_changes(recipe: Recipe) -> list[str] | None:
    """None when recipe.run_dir() holds no model; else the settings ("path: old -> new", see
    `recipe_changes`) in which `recipe` differs from the recipe its model was trained from, NOT_MODEL aside.
    A setting the stored recipe lacks (added to mtlm after that model was trained) counts at its default."""
    bundle = recipe.run_dir() / "model"
    if not (bundle / "tasks.json").is_file():
        return None
    path = bundle / "recipe.yaml"
    stored = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    try:    # settings added to mtlm since that model was trained count at their defaults
        stored = yaml.safe_load(Recipe.model_validate(stored or {}).to_yaml())
    except ValidationError:
        pass
    return [c for c in recipe_changes(as_trained(stored or {}), as_trained(yaml.safe_load(recipe.to_yaml())))
            if c.split(":", 1)[0] not in NOT_MODEL]


def write_task_rows(task, rows: dict[str, Rows], folder: Path) -> dict[str, str]:
    """Write a task's rows of each split (its columns only) to folder/<split>.jsonl; returns split -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    columns = [c for col in task.columns().values() for c in ([col] if isinstance(col, str) else col)]
    out = {}
    for split, r in rows.items():
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps({c: rec.get(c) for c in columns}) + "\n" for rec in r.records),
                        encoding="utf-8")
        out[split] = str(path)
    return out


def single_task_recipe(recipe: Recipe, name: str, steps: int, run_dir: Path, files: dict[str, str]) -> Recipe:
    """A copy of `recipe` with only task `name`, reading `files` (split -> path: its rows of the multi-task
    run's splits, nothing split or capped again), `steps` optimizer steps, writing to run_dir/baseline/<name>."""
    raw = recipe.model_dump(mode="python")
    raw["name"] = f"{recipe.name}-single-{name}"
    raw["output_dir"] = str(run_dir / "baseline" / name)
    raw["tasks"] = {name: {**raw["tasks"][name], "private_layers": 0}}   # one task: nothing to keep private from
    raw["tasks"][name]["data"] = {**files, "split": {}, "limit": {}}
    train = raw["train"]
    train["max_steps"], train["epochs"] = steps, None
    # one task: nothing to weigh or sample; same micro-batches per optimizer step as the multi-task run
    train["weighting"], train["step_mode"], train["sampling"] = {"name": "static"}, "sampled", "proportional"
    train["eval_every"] = max(1, min(train["eval_every"], steps))
    if train.get("checkpoint_every"):
        train["checkpoint_every"] = max(1, min(train["checkpoint_every"], steps))
    single = Recipe.model_validate(raw)
    single._base_dir = recipe.base_dir
    return single


def step_budgets(recipe: Recipe, sizes: dict[str, int], sources: dict[str, list[str]], max_steps: int
                 ) -> dict[str, int]:
    """Optimizer steps each task received in the multi-task run, in expectation: its source's (`sizes`:
    source -> train items, `sources`: source -> tasks; all_tasks steps: every source is in every step;
    annealed sampling: its mean share over the schedule)."""
    from mtlm.weighting import resolve_step_mode
    if resolve_step_mode(recipe.train) == "all_tasks":
        return {t: max_steps for names in sources.values() for t in names}
    probs = mean_probabilities(sizes, recipe.train.sampling, recipe.train.temperature)
    return {t: max(1, math.ceil(p * max_steps)) for s, p in probs.items() for t in sources[s]}


def run_baseline(recipe: Recipe, split: str = "test", retrain: bool = False, progress: bool = True,
                 threshold: float = DEFAULT_THRESHOLD) -> dict:
    """Train (or reuse) the multi-task run and one single-task run per task; evaluate all on `split`;
    print the table and write baseline_<split>.json in the run folder. Returns that dict. Its "warnings"
    list every task that trails its single-task model by more than `threshold` (`mtlm.transfer_check`: points
    on the 0-1 scale, relative for error metrics) with the options that help; each task row carries its
    own best dev step and value beside the kept step's ("dev_best_step", "dev_best", "selected_step",
    "dev_selected")."""
    from mtlm.train import fit

    run_dir = recipe.run_dir()
    changes = trained_recipe_changes(recipe)
    if changes and not retrain:
        raise RecipeError([f"{run_dir / 'model'} was trained from another recipe: {c}" for c in changes]
                          + ["pass --retrain to train it again from this recipe (it replaces that model), or set "
                             "another output_dir"])
    if retrain or changes is None:
        fit(recipe, progress=progress, overwrite=True)
    history = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    mt_metrics, tasks, _ = evaluate_bundle(run_dir, split)
    mt = by_task(mt_metrics)

    data, sizes = train_sizes(recipe, tasks)
    budgets = step_budgets(recipe, sizes, {s: src.tasks for s, src in data.sources.items()}, history["max_steps"])
    st: dict[str, dict[str, float]] = {}
    params_single = 0
    for name in tasks:
        files = write_task_rows(tasks[name], data.rows[name], run_dir / "baseline" / name / "data")
        single = single_task_recipe(recipe, name, budgets[name], run_dir, files)
        if retrain or trained_recipe_changes(single) != []:      # no model, or one trained from other settings
            fit(single, progress=progress, overwrite=True)
        metrics, _, _ = evaluate_bundle(single.run_dir(), split, contract_from=run_dir)   # the same rows
        st[name] = by_task(metrics).get(name, {})
        model, *_ = load_bundle(find_bundle(single.run_dir()))
        params_single += count_parameters(model)

    model, _, _, meta = load_bundle(find_bundle(run_dir))
    params_multi = count_parameters(model)
    groups = {tuple(t.input_fields()) for t in tasks.values()}
    passes = len(groups) + sum(len(layers) for layers in model.private.values()) / model.backbone.config.num_hidden_layers
    rows = []
    for name, task in tasks.items():
        m = default_metric(task)
        rows.append({"task": name, "metric": m, "steps_single": budgets[name],
                     "lower_is_better": m in task.lower_is_better,
                     "multi_task": mt.get(name, {}).get(m), "single_task": st.get(name, {}).get(m)})
    steps = task_steps(history, rows)
    for r in rows:
        r.update(steps[r["task"]])
    result = {
        "split": split, "max_steps_multi": history["max_steps"], "tasks": rows, **average_rows(rows),
        "parameters": {"multi_task": params_multi, "single_task_total": params_single,
                       "ratio": params_single / params_multi},
        # a task's K private layers add K / L of a backbone pass (mtlm.private_layers)
        "backbone_passes_per_input": {"multi_task": passes, "single_task": len(tasks), "ratio": len(tasks) / passes},
        "multi_task_metrics": mt, "single_task_metrics": st,
    }
    result["warnings"] = warnings(rows, recipe, steps, threshold)
    (run_dir / f"baseline_{split}.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(format_baseline(result))
    if result["warnings"]:
        print(format_warnings(result["warnings"]))
    return result


def average_rows(rows: list[dict]) -> dict:
    """The table's summary of per-task rows ({"metric", "lower_is_better", "multi_task", "single_task"}).

    "average": the mean of each model kind's metric over the tasks whose metric is higher-is-better (scores
    on [0, 1] or [-1, 1]); an error metric (mse: unbounded, lower is better) would enter the mean on another
    scale and in the wrong direction, so it is left out and named in "average_excludes". "relative_gain":
    the mean over ALL tasks of (multi - single) / |single|, sign-flipped for lower-is-better metrics, so
    positive means the multi-task model is better (scale-free; tasks with single == 0 are skipped).
    Each row gains "gain": multi - single, sign-flipped the same way."""
    both = [r for r in rows if r["multi_task"] is not None and r["single_task"] is not None]
    for r in both:
        r["gain"] = (r["single_task"] - r["multi_task"]) if r["lower_is_better"] else r["multi_task"] - r["single_task"]
    scored = [r for r in both if not r["lower_is_better"]]
    relative = [r["gain"] / abs(r["single_task"]) for r in both if r["single_task"]]
    return {"average": {"multi_task": sum(r["multi_task"] for r in scored) / max(1, len(scored)),
                        "single_task": sum(r["single_task"] for r in scored) / max(1, len(scored))},
            "average_excludes": [r["task"] for r in both if r["lower_is_better"]],
            "relative_gain": sum(relative) / len(relative) if relative else None}


def train_sizes(recipe: Recipe, tasks: dict):
    """(the recipe's PreparedData, source -> train items as the multi-task run counted them for task sampling:
    a task's features (an extractive QA example has one per window of its context), a joint group's rows).
    `tasks`: the fitted tasks of the bundle."""
    from transformers import AutoTokenizer

    from mtlm.data import encode_rows, prepare_rows
    from mtlm.tasks import build_task
    data = prepare_rows(recipe, {n: build_task(n, t.cfg) for n, t in tasks.items()})
    tokenizer = AutoTokenizer.from_pretrained(find_bundle(recipe.run_dir()) / "backbone")
    train = {n: rows["train"] for n, rows in data.rows.items()}
    features = {n: f["train"] for n, f in encode_rows(tasks, {n: {"train": r} for n, r in train.items()},
                                                       tokenizer, recipe.max_length).items()}
    return data, {s: len(source_dataset(src, features)) for s, src in data.sources.items()}


def format_baseline(result: dict) -> str:
    lines = [f"{'task':<18} {'metric':<16} {'multi-task':>10} {'single-task':>11} {'delta':>8}  "
             f"{'dev: kept step':>14} {'own best step':>15}  (split: {result['split']})"]
    for r in result["tasks"]:
        mt, st = r["multi_task"], r["single_task"]
        delta = f"{mt - st:+.4f}" if mt is not None and st is not None else "-"
        metric = r["metric"] + (" (lower=better)" if r.get("lower_is_better") else "")
        kept = f"{r.get('selected_step')} ({_fmt(r.get('dev_selected'))})" if r.get("selected_step") else "-"
        own = f"{r.get('dev_best_step')} ({_fmt(r.get('dev_best'))})" if r.get("dev_best_step") else "-"
        lines.append(f"{r['task']:<18} {metric:<16} {_fmt(mt):>10} {_fmt(st):>11} {delta:>8}  {kept:>14} {own:>15}")
    a = result["average"]
    excluded = result.get("average_excludes") or []
    lines.append(f"{'average':<18} {'':<16} {a['multi_task']:>10.4f} {a['single_task']:>11.4f} "
                 f"{a['multi_task'] - a['single_task']:>+8.4f}"
                 + (f"  (without {', '.join(excluded)}: an error metric)" if excluded else ""))
    if result.get("relative_gain") is not None:
        lines.append(f"multi-task vs single-task, mean relative gain over all tasks: {result['relative_gain']:+.2%} "
                     "(positive: multi-task better)")
    p, b = result["parameters"], result["backbone_passes_per_input"]
    lines.append(f"parameters: {p['multi_task'] / 1e6:.1f}M multi-task vs {p['single_task_total'] / 1e6:.1f}M for "
                 f"{len(result['tasks'])} single-task models ({p['ratio']:.2f}x)")
    lines.append(f"inference: {b['multi_task']:g} backbone pass(es) per input vs {b['single_task']} "
                 f"({b['ratio']:.2f}x the compute for single-task)")
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"
