"""Per-task evaluation: run a task's encoded split through the model, then the task's metrics.

Results are flat dicts keyed "task/metric" (e.g. "topic/accuracy"), plus "mean" (the mean of each task's
selection metric; metrics where lower is better enter negated)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from mtlm.data import collate, length_sorted_batches
from mtlm.tasks import LOWER_IS_BETTER, default_metric


@torch.inference_mode()
def task_outputs(model, task, features: list[dict], batch_size: int, pad_token_id: int,
                 device: torch.device, autocast_dtype: torch.dtype | None = None) -> tuple[list[Any], list[Any]]:
    """(predictions, references) for one task over `features`, in the input order.

    Batches are length-sorted to cut padding. A task whose features are parts of examples (extractive QA
    windows) has a `postprocess(per_feature_predictions, features)` hook: then predictions and references
    are one per example."""
    model.eval()
    preds: list[Any] = [None] * len(features)
    for idx in length_sorted_batches([f["length"] for f in features], batch_size):
        chunk = [features[i] for i in idx]
        batch = {k: v.to(device) for k, v in collate(task, chunk, pad_token_id).items() if k != "labels"}
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with ctx:
            logits = model(task=task.name, **batch)
        for i, p in zip(idx, task.predictions(logits.float(), chunk)):
            preds[i] = p
    postprocess = getattr(task, "postprocess", None)
    if postprocess is not None:
        preds = postprocess(preds, features)
    return preds, task.references(features)


def evaluate(model, tasks: dict, features: dict[str, list[dict]], batch_size: int, pad_token_id: int,
             device: torch.device, autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Metrics of every task that has features: {"task/metric": value, ..., "mean": selection mean}."""
    out: dict[str, float] = {}
    selection = []
    for name, feats in features.items():
        if not feats:
            continue
        task = tasks[name]
        preds, refs = task_outputs(model, task, feats, batch_size, pad_token_id, device, autocast_dtype)
        for metric, value in task.metrics(preds, refs).items():
            out[f"{name}/{metric}"] = value
        m = default_metric(task)
        selection.append(-out[f"{name}/{m}"] if m in LOWER_IS_BETTER else out[f"{name}/{m}"])
    if selection:
        out["mean"] = sum(selection) / len(selection)
    return out


def format_table(rows: dict[str, dict[str, float]], tasks: dict) -> str:
    """A plain-text table: one line per task with its selection metric first, then the others."""
    lines = []
    for name, task in tasks.items():
        metrics = rows.get(name, {})
        if not metrics:
            continue
        m = default_metric(task)
        rest = "  ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != m)
        lines.append(f"{name:<20} {task.cfg.type:<22} {m}={metrics[m]:.4f}  {rest}")
    return "\n".join(lines)


def by_task(flat: dict[str, float]) -> dict[str, dict[str, float]]:
    """{"task/metric": v} -> {task: {metric: v}} (drops "mean")."""
    out: dict[str, dict[str, float]] = {}
    for key, value in flat.items():
        if "/" in key:
            task, metric = key.split("/", 1)
            out.setdefault(task, {})[metric] = value
    return out


def evaluate_bundle(path, split: str = "test", batch_size: int = 64) -> tuple[dict[str, float], dict, Path]:
    """Evaluate a run or bundle on `split` of the data named in its recipe (the splits are re-made with
    the recipe's seed, so they are the ones used in training). Writes eval_<split>.json beside the bundle's
    run folder and returns (metrics, tasks, that path). Raises BundleError, RecipeError."""
    import json

    import yaml

    from mtlm.checkpoint import find_bundle, load_bundle
    from mtlm.config import RecipeError
    from mtlm.recipe import parse_recipe
    from mtlm.data import prepare_rows
    from mtlm.tasks import build_task

    bundle = find_bundle(path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, tasks, meta = load_bundle(bundle, device)
    raw = yaml.safe_load((bundle / "recipe.yaml").read_text(encoding="utf-8"))
    recipe = parse_recipe(raw, Path(meta["recipe_dir"]))
    data = prepare_rows(recipe, {n: build_task(n, t.cfg) for n, t in tasks.items()})
    features = {n: tasks[n].encode(data.rows[n][split].records, tokenizer, recipe.max_length)
                for n in tasks if split in data.rows[n]}
    if not features:
        raise RecipeError([f"no task has a {split} split (set tasks.<name>.data.{split} or data.split.{split})"])
    metrics = evaluate(model, tasks, features, batch_size, tokenizer.pad_token_id, device)
    run_dir = bundle.parent if bundle.name == "model" else bundle
    out_path = run_dir / f"eval_{split}.json"
    sizes = {n: len(data.rows[n][split].records) for n in features}   # examples (a QA example has windows)
    out_path.write_text(json.dumps({"split": split, "bundle": str(bundle), "rows": sizes, "metrics": metrics},
                                   indent=2), encoding="utf-8")
    return metrics, tasks, out_path
