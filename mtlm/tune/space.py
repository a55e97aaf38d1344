"""The search space of `mtlm tune`: which recipe settings a trial changes, and how each is drawn.

A space is a YAML mapping of dotted recipe paths (the `key.path=value` overrides of `mtlm train`) to a
distribution, drawn in file order with Optuna's define-by-run API (`trial.suggest_*`):

    train.lr:            {low: 1.0e-5, high: 3.0e-4, log: true}    # float (log-uniform)
    train.warmup_ratio:  {low: 0.0, high: 0.2}                     # float (uniform)
    train.grad_accum:    {low: 1, high: 4}                         # int: low and high are both integers
    train.batch_size:    {choices: [8, 16, 32]}                    # categorical
    train.temperature:   {low: 1.0, high: 5.0, when: {train.sampling: temperature}}
    tasks.*.weight:      {low: 0.5, high: 2.0, when: {train.weighting.name: static}}

`step` (float/int) quantises a range. `when: {path: value | [values]}` draws the setting only when the
trial's recipe so far (the base recipe with the settings drawn before it) has that value there: task
weights only mean something with static weighting (adaptive methods set the weights, and refuse a
tasks.<name>.weight other than 1), a temperature only with temperature sampling. `tasks.*.X` stands for
`tasks.<name>.X` of every task of the recipe. `train.weighting: {choices: [...]}` picks the method by name
(with its default options).

`load_space` checks a space before any trial runs: its shape, and every bound and choice against the
recipe schema (the base recipe with that one value must validate), so `train.lr: {low: 0, ...}` or an
unknown weighting name is a RecipeError naming the space file and key, not a failed trial later.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mtlm.config import RecipeError
from mtlm.recipe import parse_recipe

# The default space (README "Hyperparameter search"): lr, warmup, batch size, sampling and its
# temperature, the weighting method and, with static weighting, the task weights.
DEFAULT_SPACE: dict[str, dict] = {
    "train.lr": {"low": 1.0e-5, "high": 3.0e-4, "log": True},
    "train.warmup_ratio": {"low": 0.0, "high": 0.2},
    "train.batch_size": {"choices": [8, 16, 32]},
    "train.sampling": {"choices": ["proportional", "temperature"]},
    "train.temperature": {"low": 1.0, "high": 5.0, "when": {"train.sampling": "temperature"}},
    "train.weighting": {"choices": ["static", "uncertainty", "dwa"]},
    "tasks.*.weight": {"low": 0.5, "high": 2.0, "when": {"train.weighting.name": "static"}},
}
SPEC_KEYS = {"low", "high", "log", "step", "choices", "when"}


@dataclass(frozen=True)
class Param:
    """One searched setting: `path` (dotted, concrete task name), `kind` float | int | categorical."""

    path: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()
    when: tuple = ()                 # ((path, (allowed values...)), ...)

    def suggest(self, trial) -> Any:
        """Draw this setting for an Optuna trial."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.path, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.path, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.path, self.low, self.high, step=self.step, log=self.log)

    def applies(self, raw: dict) -> bool:
        """Whether the `when` conditions hold in the recipe dict drawn so far."""
        return all(lookup(raw, path) in allowed for path, allowed in self.when)

    def values(self) -> list:
        """The values `load_space` validates against the schema: the choices, or both bounds."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]


def lookup(raw: dict, path: str) -> Any:
    """The value at a dotted path of a recipe dict; `train.weighting.name` also reads `weighting: name`."""
    node: Any = raw
    for part in path.split("."):
        if isinstance(node, str) and part == "name":     # `weighting: pcgrad` is `weighting: {name: pcgrad}`
            return node
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def override(raw: dict, path: str, value: Any) -> dict:
    """A copy of `raw` with `path` set to `value` (`train.weighting` takes a method name)."""
    out = copy.deepcopy(raw)
    node = out
    parts = path.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = {"name": value} if path == "train.weighting" else value
    return out


def _param(source: str, path: str, spec: Any, problems: list[str]) -> Param | None:
    where = f"{source}: {path}"
    if not isinstance(spec, dict):
        problems.append(f"{where}: expected a mapping like {{low: ..., high: ...}} or {{choices: [...]}}, "
                        f"got {spec!r}")
        return None
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        problems.append(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(SPEC_KEYS))})")
        return None
    when = spec.get("when", {})
    if not isinstance(when, dict) or not all(isinstance(k, str) for k in when):
        problems.append(f"{where}.when: expected a mapping of dotted paths to a value or a list of values")
        return None
    when_t = tuple((k, tuple(v) if isinstance(v, list) else (v,)) for k, v in when.items())
    if "choices" in spec:
        choices = spec["choices"]
        if set(spec) - {"choices", "when"}:
            problems.append(f"{where}: give choices, or low/high, not both")
        elif not isinstance(choices, list) or not choices:
            problems.append(f"{where}.choices: expected a non-empty list, got {choices!r}")
        elif len({repr(c) for c in choices}) != len(choices):
            problems.append(f"{where}.choices: a value is listed twice")
        elif not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
            problems.append(f"{where}.choices: values must be numbers, strings, booleans or null")
        else:
            return Param(path, "categorical", choices=tuple(choices), when=when_t)
        return None
    low, high, log, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        problems.append(f"{where}: low and high must be numbers (got low={low!r}, high={high!r}); or give choices")
        return None
    if not low < high:
        problems.append(f"{where}: low ({low}) must be less than high ({high})")
    elif not isinstance(log, bool):
        problems.append(f"{where}.log: expected true or false, got {log!r}")
    elif log and low <= 0:
        problems.append(f"{where}: log: true needs low > 0 (got {low})")
    elif step is not None and (not isinstance(step, (int, float)) or step <= 0 or log):
        problems.append(f"{where}.step: expected a positive number, without log: true (got {step!r})")
    else:
        kind = "int" if all(isinstance(v, int) for v in (low, high)) and (step is None or isinstance(step, int)) \
            else "float"
        return Param(path, kind, float(low), float(high), log, step, when=when_t)
    return None


def parse_space(spec: Any, raw_recipe: dict, base_dir: Path, source: str = "space") -> list[Param]:
    """The Params of a space mapping over a recipe dict (`tasks.*` expanded to the recipe's tasks).
    Raises RecipeError naming `source` and the key, for every problem at once (module docstring)."""
    if not isinstance(spec, dict) or not spec:
        raise RecipeError([f"{source}: expected a non-empty mapping of recipe paths to distributions"],
                          header="invalid search space")
    problems: list[str] = []
    params: list[Param] = []
    for key, value in spec.items():
        if not isinstance(key, str) or not key or any(not p for p in key.split(".")):
            problems.append(f"{source}: {key!r}: expected a dotted recipe path like train.lr")
            continue
        parts = key.split(".")
        if parts[0] == "tasks" and len(parts) > 2 and parts[1] == "*":
            paths = [".".join(["tasks", t, *parts[2:]]) for t in raw_recipe.get("tasks", {})]
        else:
            paths = [key]
        for path in paths:
            p = _param(source, key, value, problems)
            if p is not None:
                params.append(Param(path, p.kind, p.low, p.high, p.log, p.step, p.choices, p.when))
    if not problems:                     # every bound / choice must make a valid recipe
        for p in params:
            base = override(raw_recipe, "train.weighting", "static") if p.path.startswith("tasks.") else raw_recipe
            for v in p.values():
                value = int(v) if p.kind == "int" else v
                try:
                    parse_recipe(override(base, p.path, value), base_dir)
                except RecipeError as e:
                    problems += [f"{source}: {p.path} = {value!r}: {q}" for q in e.problems]
    if problems:
        raise RecipeError(list(dict.fromkeys(problems)), header="invalid search space")
    return params


def load_space(path: str | Path | None, raw_recipe: dict, base_dir: Path) -> list[Param]:
    """Read a space YAML file (None: DEFAULT_SPACE) and check it against the recipe dict. Raises RecipeError."""
    if path is None:
        return parse_space(DEFAULT_SPACE, raw_recipe, base_dir, "default space")
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError([f"{path}: file not found"], header="invalid search space") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise RecipeError([f"{path}: cannot read as YAML: {e}"], header="invalid search space") from None
    return parse_space(spec, raw_recipe, base_dir, str(path))


def sample(trial, params: list[Param], raw_recipe: dict) -> tuple[dict, dict]:
    """Draw a trial's settings in order -> (the trial's recipe dict, {path: value drawn})."""
    raw, drawn = copy.deepcopy(raw_recipe), {}
    for p in params:
        if p.applies(raw):
            drawn[p.path] = p.suggest(trial)
            raw = override(raw, p.path, drawn[p.path])
    return raw, drawn
