"""The run folder's life cycle around `fit`: what --resume may change (`check_resumable`) and what
--overwrite deletes (`clear_run`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from pydantic import ValidationError

from mtlm.config import Recipe, RecipeError, recipe_changes
from mtlm.precision import as_trained


# Settings a resumed run may change: they are read anew at every step or evaluation. max_steps / epochs
# re-make the learning-rate schedule over the new total from the current step.
RESUMABLE = ("name", "output_dir", "train.max_steps", "train.epochs", "train.eval_every", "train.checkpoint_every",
             "train.keep_checkpoints", "train.early_stopping_patience", "train.eval_batch_size",
             "train.tracking", "train.tracking_uri", "train.experiment",
             # how a micro-batch is laid out / run, not which examples or in what order
             "train.packing", "train.compile")


def check_resumable(saved: dict, recipe: Recipe, ckpt: Path) -> list[str]:
    """The changes from the run's saved recipe dict to `recipe` that a resumed run can honour (RESUMABLE);
    raises RecipeError listing every other change (the checkpoint's optimizer, schedule, sampler and data
    order belong to the old settings, so e.g. a new lr would be silently ignored), and for other tasks."""
    now = yaml.safe_load(recipe.to_yaml())
    try:    # settings added to mtlm since the run started (e.g. train.adversarial) count at their defaults
        saved = yaml.safe_load(Recipe.model_validate(saved).to_yaml())
    except ValidationError:
        pass
    if sorted(saved.get("tasks") or {}) != sorted(now["tasks"]):
        raise RecipeError([f"tasks: the checkpoint {ckpt} was trained with tasks {sorted(saved.get('tasks') or {})}, "
                           f"the recipe has {sorted(now['tasks'])}; --resume needs the same tasks (or use --overwrite)"])
    changes = recipe_changes(as_trained(saved), as_trained(now))
    fixed = [c for c in changes if c.split(":", 1)[0] not in RESUMABLE]
    if fixed:
        raise RecipeError([f"{c} (--resume needs the run's value: the checkpoint's optimizer, schedule and data order "
                           f"belong to it; start again with --overwrite, or train into another output_dir)"
                           for c in fixed])
    return changes


# What a run writes into its folder; --overwrite deletes all of it (recipe.yaml is rewritten).
RUN_OUTPUTS = ("model", "model.tmp", "model.old", "checkpoints", "logs", "metrics.json")


def clear_run(run_dir: Path) -> None:
    """Delete an earlier run's outputs (RUN_OUTPUTS and eval_<split>.json), so nothing of it can be read
    as this run's: not its bundle before the first improving evaluation, nor its thresholds or metrics."""
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for path in run_dir.glob("eval_*.json"):
        path.unlink()
