"""Reading a recipe: YAML with duplicate keys refused, dotted overrides, the schema (`mtlm.config`) and the
registries (task types, weighting methods), every problem reported at once as one RecipeError.

`mtlm.config` holds the recipe types and `RecipeError` and imports nothing of mtlm; the checks that need the
registries live here, above config, tasks and weighting, so no import cycle runs through config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mtlm.config import Recipe, RecipeError, apply_overrides, validation_problems
from mtlm.tasks import TASK_TYPES
from mtlm.weighting import weighting_problems


def _task_problems(raw: dict) -> list[str]:
    """Task type, column roles and metric names, checked on the raw dict so they are reported together
    with every structural problem pydantic finds."""
    problems = []
    tasks = raw.get("tasks")
    for name, t in (tasks.items() if isinstance(tasks, dict) else ()):
        if not isinstance(t, dict) or not isinstance(t.get("type"), str):
            continue
        kind = TASK_TYPES.get(t["type"])
        if kind is None:
            problems.append(f"tasks.{name}.type: unknown task type '{t['type']}' (known: {', '.join(TASK_TYPES)})")
            continue
        for role, col in (t.get("columns").items() if isinstance(t.get("columns"), dict) else ()):
            if role not in kind.roles:
                problems.append(f"tasks.{name}.columns.{role}: unknown role for {t['type']} "
                                f"(roles: {', '.join(kind.roles)})")
            elif isinstance(col, list) and role not in getattr(kind, "list_roles", ()):
                problems.append(f"tasks.{name}.columns.{role}: give one column name, not a list")
        metric = t.get("metric")
        if isinstance(metric, str) and metric not in kind.metric_names:
            problems.append(f"tasks.{name}.metric: '{metric}' is not a {t['type']} metric "
                            f"(choose from: {', '.join(kind.metric_names)})")
    train = raw.get("train")
    if isinstance(train, dict) and train.get("max_steps") is not None and train.get("epochs") is not None:
        problems.append("train: give max_steps or epochs, not both")
    problems += weighting_problems(raw)
    return problems


def parse_recipe(raw: Any, base_dir: Path, overrides: list[str] = ()) -> Recipe:
    """Validate a recipe dict (after overrides) against the schema and the task-type registry.

    Raises RecipeError with every problem found (structure, types, unknown keys, task types, roles, metrics)."""
    if not isinstance(raw, dict):
        raise RecipeError([f"recipe: expected a mapping of keys, got {type(raw).__name__}"])
    raw = apply_overrides(raw, list(overrides))
    problems = _task_problems(raw)
    recipe = None
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        problems += validation_problems(e)
    if problems:
        raise RecipeError(list(dict.fromkeys(problems)))
    recipe._base_dir = base_dir.resolve()
    return recipe


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (YAML would silently keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe file and validate it. Raises RecipeError (also for unreadable YAML)."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise RecipeError([f"{path}: file not found"]) from None
    except IsADirectoryError:
        raise RecipeError([f"{path}: is a folder, expected a YAML recipe file"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError([f"{path}: cannot read: {e}"]) from None
    except yaml.YAMLError as e:
        raise RecipeError([f"{path}: not valid YAML: {e}"]) from None
    return parse_recipe(raw, path.parent, overrides)
