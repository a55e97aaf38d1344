"""`mtlm distill TEACHER_RUN --student minilm-l6|layers:N [overrides] [--output DIR]`: train a student on the
teacher's recipe with the teacher's outputs as soft targets (`mtlm.distill.hook`), written as a run derived
from the teacher (`mtlm.contract.derive_run`: judged on the teacher's stored rows).

The student trains on exactly the teacher's rows: every task's train / dev / test rows are re-read from the
teacher's evaluation contract (digests checked) and written to the work folder (as `mtlm baseline` does), so
a changed data file is an error, never a silent re-split; each task becomes its own source (a joint group of
the teacher trains as separate tasks). Its recipe is the teacher's (same tasks, steps, schedule, sampling)
with the student's backbone, `distill:` options (`mtlm.config.DistillConfig`) and the overrides on top.

Students: a backbone name (`minilm-l6`, a local model folder) starts from that pretrained encoder with new
heads; it must share the teacher's tokenizer (the teacher's cached outputs are keyed by the student's
tokens). `layers:N` starts from N of the teacher's own layers (`mtlm.distill.layers`, `distill.layer_choice`:
alternate by default) with the teacher's embeddings and heads.

The derived run holds model/ (the student's best bundle on dev), parent.json, distill_metrics.json (the
student's training log and dev history) and distill_report.json: per task the teacher's and the student's
selection metric on dev and test, the task averages and their ratio, and the in-process speed of both
(`mtlm.measure.speed`, measured side by side on the dev texts) with the CPU's flags.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import yaml

from mtlm.config import RecipeError
from mtlm.distill.hook import DistillError, Distiller
from mtlm.distill.layers import LayerError, keep_layers, kept_layers, layer_count

log = logging.getLogger("mtlm")
REPORT_FILE = "distill_report.json"
WORK = "distill-train"          # the student's own fit run inside the derived run, removed at the end


def parse_student(spec: str, teacher_layers: int) -> tuple[str, int | None]:
    """`--student` -> ("layers", N) or ("backbone", name). Raises DistillError for an empty spec, a
    layers:N whose N is not a whole number in 1..teacher_layers - 1, or a backbone that is neither a known
    short name nor a local folder."""
    from mtlm.model import BACKBONES
    spec = (spec or "").strip()
    if spec.startswith("layers:"):
        value = spec.split(":", 1)[1]
        if not value.isdigit():
            raise DistillError(f"--student {spec}: expected layers:N with N a whole number of layers "
                               f"(1..{teacher_layers - 1})")
        n = int(value)
        if not 1 <= n < teacher_layers:
            raise DistillError(f"--student {spec}: N must be between 1 and {teacher_layers - 1} (the teacher has "
                               f"{teacher_layers} layers)")
        return "layers", n
    if spec in BACKBONES or (spec and Path(spec).is_dir()):
        return "backbone", None
    raise DistillError(f"--student {spec!r}: unknown student; give layers:N (N of the teacher's {teacher_layers} "
                       f"layers), a backbone short name ({', '.join(BACKBONES)}) or a local model folder")


def teacher_rows(parent: Path, tasks: dict, folder: Path, data_dir: Path | None = None) -> dict[str, dict[str, str]]:
    """Write every task's stored rows of each split (from the teacher's contract, digests checked) to
    folder/<task>/<split>.jsonl; returns {task: {split: path}}. Raises DistillError without a contract,
    ContractError when the data changed or moved (pass data_dir)."""
    from mtlm.baseline import write_task_rows
    from mtlm.contract import find_contract, load_split_rows
    found = find_contract(parent)
    if found is None:
        raise DistillError(f"{parent}: no stored evaluation contract (contract.json): the student trains on the "
                           f"teacher's stored rows; retrain the teacher with this mtlm version")
    contract, where = found
    rows = {split: load_split_rows(contract, where, split, list(tasks), data_dir) for split in ("train", "dev", "test")}
    missing = [n for n in tasks if n not in rows["train"]]
    if missing:
        raise DistillError(f"{parent}: the contract stores no train rows for task(s) {', '.join(missing)}")
    return {n: write_task_rows(t, {s: rows[s][n] for s in rows if n in rows[s]}, folder / n) for n, t in tasks.items()}


def student_recipe(raw: dict, name: str, backbone: str, files: dict[str, dict[str, str]], work: Path,
                   overrides: list[str]):
    """The teacher's recipe dict -> the student's Recipe: reading `files`, training into `work`, on
    `backbone`, then `overrides`. Raises RecipeError (a bad override or option, listed)."""
    from mtlm.recipe import parse_recipe
    raw = json.loads(json.dumps(raw))
    raw["name"], raw["output_dir"], raw["backbone"] = name, str(work), backbone
    for task, paths in files.items():
        raw["tasks"][task]["data"] = {**paths, "split": {}, "limit": {}}
    raw.setdefault("distill", {})
    # the teacher's outputs are cached per unpacked row: a teacher trained with packing gives a student without
    raw.setdefault("train", {})["packing"] = False
    recipe = parse_recipe(raw, work, overrides)
    if recipe.train.packing:
        raise RecipeError(["train.packing: distillation reads unpacked rows (the teacher's outputs per row); "
                           "leave it off for `mtlm distill`"])
    return recipe


def _same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and type(a).__name__ == type(b).__name__


def distill_run(teacher_run: str | Path, student: str, overrides: list[str] = (), output: str | Path | None = None,
                data_dir: str | Path | None = None, progress: bool = True, measure: bool = True,
                rounds: int = 3, cache=None) -> tuple[Path, dict]:
    """Distil run `teacher_run` into `student` (module docstring); returns (the derived run, the report).
    cache: a `mtlm.distill.teacher.TeacherCache` of this teacher's model to reuse (its outputs computed once
    for several students); measure: write the teacher-vs-student report (speed included).

    Raises DistillError (unknown student spec, N out of range, options out of range, another tokenizer, no
    contract, output exists), BundleError (a teacher run without a bundle), RecipeError (bad overrides),
    ContractError (the teacher's data changed or moved)."""
    from transformers import AutoTokenizer

    from mtlm.checkpoint import find_bundle, load_bundle
    from mtlm.contract import derive_run
    from mtlm.train import fit

    bundle = find_bundle(teacher_run)
    parent = bundle.parent if bundle.name == "model" else bundle
    teacher, tokenizer, tasks, meta = load_bundle(bundle, "cpu")
    teacher = cache.teacher if cache is not None else teacher
    try:
        total = layer_count(teacher.backbone)
    except LayerError as e:
        total = 0
        if student.startswith("layers:"):
            raise DistillError(f"--student {student}: {e}") from None
    kind, n = parse_student(student, total)
    slug = f"layers{n}" if kind == "layers" else Path(student).name
    out = (Path(output) if output is not None else parent.with_name(f"{parent.name}-distill-{slug}")).resolve()
    if (out / "model").exists():
        raise DistillError(f"{out} already holds a model: pass --output NEW_FOLDER")
    raw = yaml.safe_load((bundle / "recipe.yaml").read_text(encoding="utf-8"))
    work = out / WORK
    backbone = str(bundle / "backbone") if kind == "layers" else student
    # validate the recipe and options before reading data or loading the student
    student_recipe(raw, f"{raw['name']}-distill-{slug}", backbone, {t: {"train": "-"} for t in tasks}, work,
                   list(overrides))
    if kind == "backbone":
        from mtlm.model import resolve_backbone
        try:
            student_tokenizer = AutoTokenizer.from_pretrained(resolve_backbone(student))
        except (OSError, ValueError) as e:
            raise DistillError(f"--student {student}: not a model folder or backbone name this can load "
                               f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        if not _same_tokenizer(student_tokenizer, tokenizer):
            raise DistillError(f"--student {student}: its tokenizer differs from the teacher's; the teacher's "
                               f"outputs are matched to the student's tokens, so a student must share the "
                               f"teacher's tokenizer (or use layers:N)")
    shutil.rmtree(work, ignore_errors=True)
    files = teacher_rows(parent, tasks, work / "data", Path(data_dir) if data_dir else None)
    recipe = student_recipe(raw, f"{raw['name']}-distill-{slug}", backbone, files, work, list(overrides))
    opts = recipe.distill
    keep = kept_layers(total, n, opts.layer_choice) if kind == "layers" else None
    hook = Distiller(teacher, opts.temperature, opts.alpha, opts.hidden, opts.anneal, teacher_tasks=tasks,
                     cache=cache)

    def init_student(model):
        if keep is not None:         # the teacher's fine-tuned encoder (loaded as the backbone): N of its layers
            keep_layers(model.backbone, keep)
            model.heads.load_state_dict(teacher.heads.state_dict())
        return hook.model_fn(model)

    # alpha = hidden = 0: no teacher term, the same student trained on the hard labels alone
    uses_teacher = opts.alpha > 0 or opts.hidden > 0
    fit(recipe, progress=progress, overwrite=True, loss_fn=hook if uses_teacher else None, model_fn=init_student,
        callbacks=[hook])
    details = {"student": student, "kept_layers": keep, "teacher_layers": total or None,
               "options": opts.model_dump(), "teacher_rows_computed": hook.cache.computed_rows,
               "teacher_cache_mb": round(hook.cache.bytes / 2**20, 2)}
    try:
        derive_run(parent, out, bundle=work / "model", method="distill", details=details)
    except FileExistsError as e:
        raise DistillError(str(e)) from None
    if (work / "metrics.json").is_file():
        shutil.copy2(work / "metrics.json", out / "distill_metrics.json")
    shutil.rmtree(work, ignore_errors=True)
    if not measure:
        return out, {}
    report = compare_report(parent, out, rounds=rounds)
    report["details"] = details
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return out, report


def compare_runs(teacher_run: Path, runs: dict[str, Path], rounds: int = 3, engines: dict[str, str] | None = None
                 ) -> dict:
    """The teacher and other runs of its tasks (students, compressed runs: `runs`, name -> run folder) on the
    teacher's stored rows, each run by its engine (`engines`: name -> engine name, `mtlm.engine.ENGINES`;
    default torch fp32; the teacher always torch): {"tasks": {task: {metric, teacher_dev, <name>_dev, ...
    (test alike)}}, "average": {teacher_dev, <name>_dev, <name>_ratio_dev (the name's average / the
    teacher's), (test alike)}, "engines": {name: engine}, "speed": measure.speed of every run on its engine
    (batch 32, all heads, on the dev texts, interleaved in one run),
    "speed_ratio": {name: its texts/s / the teacher's}, "cpu_flags", "loadavg" (1, 5, 15 min: the load the
    speeds were measured under)}. Averages are over higher-is-better metrics (an error metric such as mse
    is left out). Raises ContractError when the teacher's rows cannot be read, BundleError."""
    import os

    import torch

    from mtlm.checkpoint import find_bundle, load_bundle
    from mtlm.engine import ONNX_FILES, TorchEngine, make_engine
    from mtlm.engine_check import EngineModel, dev_features
    from mtlm.evaluate import evaluate
    from mtlm.measure import cpu_flags, model_rows, speed
    from mtlm.tasks import default_metric

    t_model, tokenizer, tasks, meta = load_bundle(find_bundle(teacher_run), "cpu")
    chosen = {"teacher": "torch", **{who: (engines or {}).get(who, "torch") for who in runs}}
    runners = {"teacher": TorchEngine(t_model, "cpu")}
    for who, path in runs.items():
        bundle = find_bundle(path)
        runners[who] = make_engine(chosen[who], load_bundle(bundle, "cpu")[0] if chosen[who] not in ONNX_FILES
                                   else None, "cpu", bundle)
    models = {who: EngineModel(r) for who, r in runners.items()}
    metric = {n: default_metric(t) for n, t in tasks.items()}
    report = {"teacher": str(teacher_run), "runs": {who: str(p) for who, p in runs.items()}, "tasks": {},
              "average": {}, "engines": chosen}
    dev = None
    for split in ("dev", "test"):
        feats = {n: f for n, f in dev_features(find_bundle(teacher_run), tasks, tokenizer, int(meta["max_length"]),
                                               rows=None, split=split).items() if f}
        dev = feats if split == "dev" else dev
        if not feats:
            continue
        scores = {}
        for who, m in models.items():
            flat = evaluate(m, tasks, feats, 64, tokenizer.pad_token_id, torch.device("cpu"))
            scores[who] = {n: flat[f"{n}/{metric[n]}"] for n in feats}
        for name in feats:
            entry = report["tasks"].setdefault(name, {"metric": metric[name]})
            entry.update({f"{who}_{split}": scores[who][name] for who in models})
        higher = [n for n in feats if metric[n] not in tasks[n].lower_is_better]
        if higher:
            avg = {who: sum(scores[who][n] for n in higher) / len(higher) for who in models}
            report["average"].update({f"{who}_{split}": a for who, a in avg.items()})
            report["average"].update({f"{who}_ratio_{split}": avg[who] / avg["teacher"] if avg["teacher"] else None
                                      for who in runs})
    rows = model_rows(dev)
    report["speed"] = speed(runners, list(tasks), rows, tokenizer.pad_token_id, rounds=rounds)
    report["speed_ratio"] = {who: report["speed"][who]["texts_per_s"] / report["speed"]["teacher"]["texts_per_s"]
                             for who in runs}
    report["cpu_flags"], report["loadavg"] = cpu_flags(), list(os.getloadavg())
    return report


def compare_report(teacher_run: Path, student_run: Path, rounds: int = 3) -> dict:
    """`compare_runs` of the teacher and one student (named "student"), with "ratio_dev" / "ratio_test"
    (the student's task average / the teacher's) and "speed_ratio" as plain numbers."""
    report = compare_runs(teacher_run, {"student": student_run}, rounds)
    for split in ("dev", "test"):
        if f"student_ratio_{split}" in report["average"]:
            report["average"][f"ratio_{split}"] = report["average"][f"student_ratio_{split}"]
    report["speed_ratio"] = report["speed_ratio"]["student"]
    return report


def format_report(report: dict) -> str:
    """The report as text: per task teacher vs student (dev, test), averages, speed."""
    lines = [f"{'task':<14}{'metric':<10}{'teacher dev':>12}{'student':>9}{'teacher test':>13}{'student':>9}"]
    for name, t in report["tasks"].items():
        test = (f"{t['teacher_test']:>13.4f}{t['student_test']:>9.4f}" if "teacher_test" in t else f"{'-':>13}{'-':>9}")
        lines.append(f"{name:<14}{t['metric']:<10}{t['teacher_dev']:>12.4f}{t['student_dev']:>9.4f}{test}")
    a = report["average"]
    for split in ("dev", "test"):
        if f"ratio_{split}" in a and a[f"ratio_{split}"] is not None:
            lines.append(f"task average on {split}: teacher {a[f'teacher_{split}']:.4f}, student "
                         f"{a[f'student_{split}']:.4f} ({a[f'ratio_{split}']:.1%} of the teacher)")
    sp = report["speed"]
    lines.append(f"speed (torch fp32, batch 32, all heads): teacher {sp['teacher']['texts_per_s']:.1f} texts/s, student "
                 f"{sp['student']['texts_per_s']:.1f} texts/s ({report['speed_ratio']:.2f}x); p50 batch-1 "
                 f"{sp['teacher']['p50_latency_ms']:.1f} vs {sp['student']['p50_latency_ms']:.1f} ms")
    return "\n".join(lines)
