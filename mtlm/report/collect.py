"""What `mtlm report` reads from a run folder, without running a model: the recipe, the environment, dev
evaluations and the training log (metrics.json; TensorBoard events when metrics.json has no training log),
eval_<split>.json, baseline_<split>.json, and the derived runs found beside the run (their parent.json
points back to it) with their compress_report.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mtlm.contract import read_parent


class ReportError(ValueError):
    """A folder that is not a run `mtlm report` can describe; the message names the file."""


@dataclass
class RunRecord:
    run_dir: Path
    recipe_text: str
    environment: dict | None
    evals: list[dict]                       # metrics.json "eval": {step, "task/metric": value, ...}
    train_log: list[dict]                   # {step, lr, "loss/task", "weight/task"}
    best_step: int | None
    eval_files: dict[str, dict] = field(default_factory=dict)      # split -> eval_<split>.json
    baselines: dict[str, dict] = field(default_factory=dict)       # split -> baseline_<split>.json
    derived: list[dict] = field(default_factory=list)              # compress_report.json of derived runs
    task_best: dict[str, dict] = field(default_factory=dict)       # metrics.json: task -> {metric, value, step}


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ReportError(f"{path}: cannot read: {e}") from None


def tensorboard_log(logs: Path) -> list[dict]:
    """The training log from TensorBoard events under `logs`: [{step, "loss/task": v, "weight/task": w, "lr"}]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(logs))
    acc.Reload()
    by_step: dict[int, dict] = {}
    for tag in acc.Tags().get("scalars", []):
        if tag.startswith(("loss/", "weight/")) or tag == "lr":
            for ev in acc.Scalars(tag):
                by_step.setdefault(ev.step, {"step": ev.step})[tag] = ev.value
    return [by_step[s] for s in sorted(by_step)]


def derived_runs(run_dir: Path) -> list[dict]:
    """The compression / distillation report of every folder beside `run_dir` whose parent.json names `run_dir`:
    compress_report.json as it is; distill_report.json (`mtlm distill`) in the same shape (tasks' dev_before /
    dev_after = teacher / student, engines "torch" = the teacher and "student", both on torch)."""
    out = []
    here = run_dir.resolve()
    for sib in sorted(run_dir.resolve().parent.iterdir()):
        if sib == here or not (sib / "parent.json").is_file():
            continue
        parent = read_parent(sib)
        if parent is None or parent[0].resolve() != here:
            continue
        if (sib / "compress_report.json").is_file():
            out.append({"run": sib.name, **_json(sib / "compress_report.json")})
        elif (sib / "distill_report.json").is_file():
            out.append({"run": sib.name, **distill_as_compress(_json(sib / "distill_report.json"))})
    return out


def distill_as_compress(report: dict) -> dict:
    """A distill_report.json ({"tasks": {t: {metric, teacher_dev, student_dev}}, "speed": {teacher|student:
    {texts_per_s}}}) in compress_report.json's shape, so the trade-off figure shows students beside compressed
    variants. Tasks without both dev values are left out."""
    speed = report.get("speed") or {}
    tasks = {n: {"metric": t.get("metric"), "dev_before": t["teacher_dev"], "dev_after": t["student_dev"]}
             for n, t in (report.get("tasks") or {}).items() if "teacher_dev" in t and "student_dev" in t}
    engines = {name: {"texts_per_s": speed[who]["texts_per_s"]}
               for name, who in (("torch", "teacher"), ("student", "student")) if who in speed}
    return {"method": "distill", "engine": "student", "tasks": tasks, "engines": engines}


def collect(run_dir: str | Path) -> RunRecord:
    """Read everything the report shows from `run_dir` (a run folder: recipe.yaml and metrics.json).
    Raises ReportError naming a missing or unreadable file."""
    run_dir = Path(run_dir)
    if (run_dir / "tasks.json").is_file() and run_dir.name == "model":
        run_dir = run_dir.parent
    for name in ("recipe.yaml", "metrics.json"):
        if not (run_dir / name).is_file():
            raise ReportError(f"{run_dir}: no {name}: `mtlm report` needs a run folder made by `mtlm train`")
    metrics = _json(run_dir / "metrics.json")
    train_log = metrics.get("train") or []
    if not train_log and (run_dir / "logs").is_dir():
        train_log = tensorboard_log(run_dir / "logs")
    env_path = run_dir / "environment.json"
    rec = RunRecord(run_dir, (run_dir / "recipe.yaml").read_text(encoding="utf-8"),
                    _json(env_path) if env_path.is_file() else None, metrics.get("eval") or [], train_log,
                    metrics.get("best_step"), task_best=metrics.get("task_best") or {})
    for path in sorted(run_dir.glob("eval_*.json")):
        rec.eval_files[path.stem.removeprefix("eval_")] = _json(path)
    for path in sorted(run_dir.glob("baseline_*.json")):
        rec.baselines[path.stem.removeprefix("baseline_")] = _json(path)
    rec.derived = derived_runs(run_dir)
    return rec
