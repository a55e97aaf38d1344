"""How per-task losses become one update (`train.weighting: {name: ..., <options>}` in the recipe).

The training loop calls, per accumulation round, `weighting.backward(losses, accelerator, scale)` with
{task: scalar loss} of that round, then once per optimizer step `weighting.step(accelerator)` before
clipping and the optimizer step. Every method implements:

    needs_all_tasks            True: it needs every task's loss/gradient in every step (step_mode all_tasks)
    combines_shared_gradients  True: it owns the backbone's gradients (all-reduces and writes them itself)
    Options                    pydantic model of its options (defaults and limits; unknown keys are errors)
    backward(losses, accelerator, scale)   backpropagate scale * its objective (scale = 1 / grad_accum)
    step(accelerator)          update weights / combine gradients, identically on every process
    current() -> {task: w}     the weight of each task's loss gradient now (logged every step)
    param_groups()             learnable parameters for the model's optimizer (uncertainty), else []
    state_dict() / load_state_dict()   saved in every checkpoint, restored by --resume

| name        | needs                        | extra cost per optimizer step                          | module         |
|-------------|------------------------------|--------------------------------------------------------|----------------|
| static      | losses                       | none                                                   | loss_weights   |
| uncertainty | losses                       | k parameters in the optimizer                          | loss_weights   |
| dwa         | losses                       | k loss sums, one all-reduce of 2k floats               | loss_history   |
| famo        | all tasks' losses every step | O(k); one all-reduce of 2k floats per round            | loss_history   |
| gradnorm    | all tasks, last-layer grads  | k partial backwards to the last layer, k x |W| floats   | gradnorm       |
| pcgrad      | all tasks' backbone grads    | one backward per task, k x P floats, O(k^2 P)          | surgery        |
| cagrad      | all tasks' backbone grads    | as pcgrad + a k x k SLSQP solve                        | surgery        |

Step modes (`train.step_mode`): `sampled` (each micro-batch serves one source drawn by `train.sampling`;
DDP all-reduces during the backward of a step's last micro-batch) or `all_tasks` (each accumulation round
takes one micro-batch of every source, so every task contributes to every step, as in LibMTL; every forward
runs under `no_sync` and the loop averages the gradients once per step, while methods that combine
per-task gradients all-reduce those first, see `surgery`). `auto` picks all_tasks exactly when the method
needs it. Adaptive methods set the weights themselves, so tasks.<name>.weight must stay 1 with them.
"""

from __future__ import annotations

from pydantic import ValidationError

from mtlm.weighting.gradnorm import GradNorm
from mtlm.weighting.loss_history import DWA, FAMO
from mtlm.weighting.loss_weights import Static, Uncertainty
from mtlm.weighting.surgery import CAGrad, PCGrad

WEIGHTINGS = {
    "static": Static,
    "uncertainty": Uncertainty,
    "dwa": DWA,
    "gradnorm": GradNorm,
    "pcgrad": PCGrad,
    "cagrad": CAGrad,
    "famo": FAMO,
}


def resolve_step_mode(train) -> str:
    """`sampled` or `all_tasks` for a TrainConfig (`auto` -> all_tasks when the weighting needs it)."""
    if train.step_mode != "auto":
        return train.step_mode
    return "all_tasks" if WEIGHTINGS[train.weighting.name].needs_all_tasks else "sampled"


def _option_problems(name: str, options: dict) -> list[str]:
    cls = WEIGHTINGS[name]
    try:
        cls.Options.model_validate(options)
    except ValidationError as e:
        known = ", ".join(cls.Options.model_fields) or "none"
        out = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                out.append(f"train.weighting.{key}: unknown option for {name} (options: {known})")
            else:
                out.append(f"train.weighting.{key}: {err['msg']} (got {err.get('input')!r})")
        return out
    return []


def weighting_problems(raw: dict) -> list[str]:
    """Problems of a raw recipe dict's train.weighting / step_mode / sampling / task weights, one
    `path: message` line each (reported by `mtlm.recipe.parse_recipe` with every other problem)."""
    train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    spec = train.get("weighting", "static")
    spec = {"name": spec} if isinstance(spec, str) else spec
    if not isinstance(spec, dict):
        return []                                   # pydantic reports the wrong type
    name = spec.get("name", "static")
    if not isinstance(name, str) or name not in WEIGHTINGS:
        return [f"train.weighting.name: unknown weighting {name!r} (known: {', '.join(WEIGHTINGS)})"]
    problems = _option_problems(name, {k: v for k, v in spec.items() if k != "name"})
    cls = WEIGHTINGS[name]
    tasks = raw.get("tasks") if isinstance(raw.get("tasks"), dict) else {}
    if name != "static":
        for task, t in tasks.items():
            weight = t.get("weight") if isinstance(t, dict) else None
            if weight is not None and weight != 1:
                problems.append(f"tasks.{task}.weight: {weight} is a static loss weight, but weighting {name!r} "
                                f"sets the weights itself (remove it, or use train.weighting: static)")
    mode = train.get("step_mode", "auto")
    if mode == "sampled" and cls.needs_all_tasks:
        problems.append(f"train.step_mode: {name} needs every task's loss in every optimizer step; use step_mode "
                        f"all_tasks (or auto)")
    all_tasks = mode == "all_tasks" or (mode == "auto" and cls.needs_all_tasks)
    sampling = train.get("sampling")
    if all_tasks and sampling not in (None, "proportional"):
        why = "step_mode all_tasks" if mode == "all_tasks" else f"weighting {name} (step_mode all_tasks)"
        problems.append(f"train.sampling: {sampling!r} has no effect with {why}: every optimizer step takes one "
                        f"micro-batch of every task; remove it, or use step_mode sampled with a weighting that "
                        f"allows it (static, uncertainty, dwa)")
    return problems


def build_weighting(train, alphas: dict[str, float], model, device):
    """The recipe's weighting for tasks `alphas` ({task: tasks.<name>.weight}, in task order) over `model`
    (a MultiTaskModel: gradient methods read `model.backbone`), with its state on `device`.

    Raises RecipeError for an unknown method, bad options, or a backbone the method cannot use."""
    from mtlm.config import RecipeError

    name = train.weighting.name
    if name not in WEIGHTINGS:
        raise RecipeError([f"train.weighting.name: unknown weighting {name!r} (known: {', '.join(WEIGHTINGS)})"])
    options = train.weighting.options()
    problems = _option_problems(name, options)
    if problems:
        raise RecipeError(problems)
    try:
        return WEIGHTINGS[name](alphas, model=model, device=device, seed=train.seed, **options)
    except ValueError as e:
        raise RecipeError([f"train.weighting: {e}"]) from None
