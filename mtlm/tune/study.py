"""`mtlm tune RECIPE --trials N`: hyperparameter search with Optuna over real `fit` runs.

Each trial draws its settings from the search space (`mtlm.tune.space`) on top of the recipe and trains it
with `fit` into <tune folder>/trials/<number>. At every dev evaluation a callback (`TrialReport`) reports
the trial's *study score* to Optuna and stops the run when the pruner (Optuna's MedianPruner, or
HyperbandPruner with `--pruner hyperband`) says the trial is worse than the others at that step; the trial
is then recorded as pruned. A finished trial's value is the study score of the evaluation whose model the
run kept (`run.best_step`, chosen by `mtlm.selection`), so retraining the best recipe gives that score back.

The study score is `mtlm.selection`'s scale-free score (mean over tasks of the relative error reduction)
with one reference for the whole study instead of one per run: the gaps of the first dev evaluation the
study saw (written once to reference.json), so every trial is scored on the same scale.

The tune folder (default: the recipe's run folder + "-tune") holds study.db (Optuna's SQLite storage: the
search resumes where it stopped when run again; a trial that was running when the process died is run
again with the same settings), search.json (the recipe and space searched: another one is an error),
trials/<n>/ (each trial's run: metrics.json, recipe.yaml; the best bundle of finished trials; checkpoints
are deleted), trials.csv (one row per trial) and best_recipe.yaml (the recipe with the best trial's
settings, data paths made absolute, output_dir <tune folder>/best: `mtlm train best_recipe.yaml`).
`--jobs K` runs K trials at a time, in K processes sharing study.db (torch threads split between them).
"""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from mtlm.callbacks import Callback
from mtlm.config import RecipeError, apply_overrides
from mtlm.recipe import load_recipe, parse_recipe
from mtlm.selection import Selection
from mtlm.tune.space import Param, load_space, override, sample

log = logging.getLogger("mtlm")
STUDY = "mtlm-tune"
PRUNERS = ("median", "hyperband")


@dataclass(frozen=True)
class Search:
    """What one `mtlm tune` searches: the base recipe dict (CLI overrides applied), its folder, the space."""

    raw: dict
    base_dir: Path
    params: list[Param]
    folder: Path
    trials: int
    pruner: str = "median"
    seed: int = 0
    deadline: float | None = None     # time.time() after which no trial starts


class StudyScore:
    """`mtlm.selection.Selection` with the study's reference (reference.json in the tune folder): the gaps
    of the first dev evaluation of the study, written by whichever trial evaluates first (atomically: the
    file is linked into place, so parallel trials agree on one)."""

    def __init__(self, path: Path, tasks: dict) -> None:
        self.path, self.tasks = path, tasks
        self.selection = Selection.for_tasks(tasks)

    def __call__(self, metrics: dict[str, float]) -> float | None:
        if not self.selection.reference:
            if not self.path.is_file():
                first = Selection.for_tasks(self.tasks)
                first.score(metrics)                       # fixes its reference from these metrics
                tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(first.reference), encoding="utf-8")
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    pass                                   # another trial was first: use its reference
                tmp.unlink()
            self.selection.reference = json.loads(self.path.read_text(encoding="utf-8"))
        return self.selection.score(metrics)


class TrialReport(Callback):
    """Reports the study score of every dev evaluation to the Optuna trial (step = optimizer step) and
    stops the run (`run.stop = "pruned"`) when the trial should be pruned. `scores` keeps {step: score}."""

    def __init__(self, trial, score: StudyScore) -> None:
        self.trial, self.score, self.scores, self.pruned = trial, score, {}, False

    def on_evaluate(self, run, step: int, metrics: dict[str, float]) -> None:
        value = self.score(metrics)
        if value is None:
            raise RecipeError(["mtlm tune needs a dev split for at least one task (the score it optimises)"])
        self.scores[step] = value
        self.trial.report(value, step)
        if self.trial.should_prune():
            self.pruned, run.stop = True, "pruned"
            run.say(f"trial {self.trial.number} pruned at step {step} (study score {value:.4f})")


def objective(search: Search, trial) -> float:
    """Train one trial; its value is the study score of the kept model. Raises optuna.TrialPruned."""
    import optuna

    from mtlm.tasks import build_task
    from mtlm.train import fit

    raw, drawn = sample(trial, search.params, search.raw)
    run_dir = search.folder / "trials" / f"{trial.number:04d}"
    raw = {**raw, "output_dir": str(run_dir)}
    raw["train"] = {**raw.get("train", {}), "checkpoint_every": 10**9}   # only the final checkpoint (deleted)
    recipe = parse_recipe(raw, search.base_dir)
    trial.set_user_attr("settings", drawn)
    trial.set_user_attr("run_dir", str(run_dir))
    tasks = {n: build_task(n, t) for n, t in recipe.tasks.items()}
    report = TrialReport(trial, StudyScore(search.folder / "reference.json", tasks))
    t0 = time.perf_counter()
    fit(recipe, overwrite=True, progress=False, callbacks=[report])
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    trial.set_user_attr("seconds", round(time.perf_counter() - t0, 1))
    trial.set_user_attr("steps", metrics["step"])
    trial.set_user_attr("best_step", metrics["best_step"])
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if report.pruned:
        shutil.rmtree(run_dir / "model", ignore_errors=True)
        raise optuna.TrialPruned(f"pruned at step {metrics['step']}")
    return report.scores[metrics["best_step"]]


def open_study(search: Search):
    """The study in <folder>/study.db (created or loaded), with the pruner and a seeded TPE sampler."""
    import optuna

    storage = optuna.storages.RDBStorage(f"sqlite:///{search.folder / 'study.db'}",
                                         engine_kwargs={"connect_args": {"timeout": 120}})
    train = parse_recipe(search.raw, search.base_dir).train
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0) if search.pruner == "median" else
              optuna.pruners.HyperbandPruner(min_resource=train.eval_every, max_resource=train.max_steps or "auto"))
    return optuna.create_study(study_name=STUDY, storage=storage, load_if_exists=True, direction="maximize",
                               pruner=pruner, sampler=optuna.samplers.TPESampler(seed=search.seed))


def _counted(study) -> int:
    """Trials that count towards --trials: finished, pruned or running (a failed one does not; a queued one
    is run by the next trial asked for)."""
    from optuna.trial import TrialState
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                         TrialState.RUNNING)))


def optimize(search: Search, n: int, threads: int | None = None) -> None:
    """Run `n` trials of the study, or fewer when the deadline passes (no trial starts after it). One worker;
    several share study.db (`run_tune(jobs=K)`), each with its share of the trials."""
    import optuna
    if threads:
        import torch
        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(search)
    for _ in range(n):
        if search.deadline is not None and time.time() >= search.deadline:
            break
        study.optimize(lambda t: objective(search, t), n_trials=1, catch=())


def _worker(search: Search, n: int, threads: int) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    optimize(search, n, threads)


def recover(study) -> int:
    """Trials left running by a process that died: mark them failed and queue their settings again.
    Returns how many. Call before any worker starts (one `mtlm tune` per folder at a time)."""
    from optuna.trial import TrialState
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"rerun_of": t.number})
    return len(stale)


def prepare(recipe_path: str | Path, overrides: list[str], trials: int, space: str | Path | None = None,
            timeout_min: float | None = None, folder: str | Path | None = None, pruner: str = "median",
            seed: int = 0) -> Search:
    """Check everything before any trial: the recipe, the space, the flags, and that the tune folder holds
    no search over another recipe or space. Raises RecipeError."""
    problems = []
    if trials <= 0:
        problems.append(f"--trials: must be a positive number of trials, got {trials}")
    if timeout_min is not None and timeout_min <= 0:
        problems.append(f"--timeout-min: must be positive minutes, got {timeout_min}")
    if pruner not in PRUNERS:
        problems.append(f"--pruner: {pruner!r} is not one of {', '.join(PRUNERS)}")
    if problems:
        raise RecipeError(problems, header="invalid mtlm tune flags")
    recipe = load_recipe(recipe_path, overrides)               # RecipeError for a bad recipe or override
    raw = apply_overrides(yaml.safe_load(Path(recipe_path).read_text(encoding="utf-8")), list(overrides))
    base_dir = Path(recipe_path).resolve().parent
    params = load_space(space, raw, base_dir)
    out = Path(folder) if folder else recipe.run_dir().with_name(recipe.run_dir().name + "-tune")
    out = out.resolve()
    what = {"recipe": raw, "space": [p.__dict__ for p in params], "pruner": pruner, "seed": seed}
    what = json.loads(json.dumps(what, default=list))
    saved = out / "search.json"
    if saved.is_file() and json.loads(saved.read_text(encoding="utf-8")) != what:
        raise RecipeError([f"{out} holds a search over another recipe, space, pruner or seed (search.json): "
                           f"give another --out, or delete the folder to start again"], header="cannot resume")
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(what, indent=1), encoding="utf-8")
    deadline = time.time() + 60 * timeout_min if timeout_min else None
    return Search(raw, base_dir, params, out, trials, pruner, seed, deadline)


def run_tune(search: Search, jobs: int = 1) -> dict:
    """Run the search (`jobs` worker processes; 1 = in this process), then write trials.csv and
    best_recipe.yaml. Returns {"folder", "best_recipe" (path or None), "best": {number, value, settings} or
    None, "rows": the table's rows}."""
    study = open_study(search)
    rerun = recover(study)
    if rerun:
        log.warning("%d trial(s) were running when the last `mtlm tune` stopped: running them again", rerun)
    left = max(0, search.trials - _counted(study))       # a resumed study counts the trials it holds
    if jobs <= 1 or left <= 1:
        optimize(search, left)
    else:
        shares = [left // jobs + (i < left % jobs) for i in range(min(jobs, left))]
        threads = max(1, (os.cpu_count() or 1) // len(shares))
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(search, n, threads)) for n in shares]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        bad = [p.exitcode for p in procs if p.exitcode]
        if bad:
            raise RuntimeError(f"{len(bad)} tune worker(s) failed (exit codes {bad}); see their output above")
    return write_outputs(search, open_study(search))


def write_outputs(search: Search, study) -> dict:
    """trials.csv and best_recipe.yaml (module docstring)."""
    from optuna.trial import TrialState
    trials = study.get_trials(deepcopy=False)
    paths = list(dict.fromkeys(k for t in trials for k in t.user_attrs.get("settings", {})))
    rows = []
    for t in trials:
        settings = t.user_attrs.get("settings", {})
        last = max(t.intermediate_values) if t.intermediate_values else None
        rows.append({"trial": t.number, "state": t.state.name.lower(),
                     "score": t.value if t.value is not None else
                     (t.intermediate_values[last] if last is not None else None),
                     "steps": t.user_attrs.get("steps"), "best_step": t.user_attrs.get("best_step"),
                     "seconds": t.user_attrs.get("seconds"), **{p: settings.get(p, "") for p in paths}})
    with open(search.folder / "trials.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["trial", "state", "score", "steps", "best_step", "seconds", *paths])
        writer.writeheader()
        writer.writerows(rows)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if not done:
        return {"folder": search.folder, "best_recipe": None, "best": None, "rows": rows}
    best = max(done, key=lambda t: t.value)
    raw = search.raw
    for path, value in best.user_attrs["settings"].items():
        raw = override(raw, path, value)
    raw = {**absolute_data_paths(raw, search.base_dir), "output_dir": str(search.folder / "best")}
    out = search.folder / "best_recipe.yaml"
    out.write_text(f"# mtlm tune: trial {best.number} of {len(trials)}, study score {best.value:.6f} (dev, model "
                   f"kept at step {best.user_attrs.get('best_step')})\n" + yaml.safe_dump(raw, sort_keys=False),
                   encoding="utf-8")
    return {"folder": search.folder, "best_recipe": out, "rows": rows,
            "best": {"number": best.number, "value": best.value, "settings": best.user_attrs["settings"]}}


def absolute_data_paths(raw: dict, base_dir: Path) -> dict:
    """A copy of a recipe dict whose relative data files (existing under `base_dir`) are absolute, so the
    recipe works from another folder."""
    out = json.loads(json.dumps(raw))
    for task in (out.get("tasks") or {}).values():
        data = task.get("data") if isinstance(task, dict) else None
        for split in ("train", "dev", "test"):
            spec = data.get(split) if isinstance(data, dict) else None
            if isinstance(spec, str) and not Path(spec).is_absolute() and (base_dir / spec).exists():
                data[split] = str((base_dir / spec).resolve())
    return out


def format_trials(result: dict) -> str:
    """The trials table as aligned text (what trials.csv holds), the best trial last."""
    rows = result["rows"]
    if not rows:
        return "no trials"
    cols = list(rows[0])
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    best = result["best"]
    lines.append(f"best: trial {best['number']}, study score {best['value']:.4f}" if best else
                 "best: none (no trial finished)")
    return "\n".join(lines)


def _cell(v) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
