"""SQuAD + two classification tasks: one multi-task MiniLM-L6 vs one single-task model per task.

    python benchmarks/qa_bench.py                      # the full recipe (recipes/squad-sst2-agnews.yaml); a GPU helps
    python benchmarks/qa_bench.py --max-steps 1000     # a smaller budget (the single-task budgets follow it)
    python benchmarks/qa_bench.py --quick              # smoke run: 8 steps on 200-row samples, max_length 192

Protocol (`mtlm baseline`'s): train the recipe's multi-task model; then one single-task model per task from
the same recipe with the optimizer steps that task received in the multi-task run (max_steps x its sampling
probability, counted in train features: a SQuAD question has one per window of its context), the same
hyper-parameters and splits. Every model is the best one on dev (mean selection metric) and is scored on
`--split` (default test: shared/data/squad/test.jsonl, a held-out part of the official SQuAD v1.1 dev set;
dev.jsonl, the other part, selects the model). SQuAD scores are exact match / F1 with the official
normalisation (fractions; x100 for the published scale). Runs on CUDA when there is one, else the CPU.

Writes `benchmarks/results/qa_bench.json` (or --out) after every stage, so a killed run leaves what it had.
Published anchors (full SQuAD v1.1 train, 88k questions): BERT-base F1 88.5; 6-layer distilled students 80-86.
This recipe trains on 9,979 questions, so expect less; the issue's aims: F1 > 60, multi-task within 2 F1
points of single-task.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RECIPE = ROOT / "recipes" / "squad-sst2-agnews.yaml"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "qa_bench.json"
QUICK = ["train.max_steps=8", "train.eval_every=4", "train.batch_size=8", "train.eval_batch_size=32",
         "train.warmup_ratio=0.0", "max_length=192", "tasks.squad.doc_stride=64",
         "tasks.squad.data.limit={train: 200, dev: 50, test: 50}",
         "tasks.sentiment.data.limit={train: 200, dev: 50, test: 50}",
         "tasks.topic.data.limit={train: 200, dev: 50, test: 50}"]


def device_info() -> dict:
    import torch
    import transformers
    info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info.update(device="cuda", name=torch.cuda.get_device_name(0))
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from machine import cpu_model
        info.update(device="cpu", name=cpu_model(), cores=os.cpu_count())
    return info


def write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def train_and_score(recipe, split: str, progress: bool) -> dict:
    """fit() then evaluate_bundle() on `split`: {"metrics": {task: {metric: v}}, "train_s", "eval_s", "steps"}."""
    from mtlm.evaluate import by_task, evaluate_bundle
    from mtlm.train import fit
    t0 = time.perf_counter()
    run_dir = fit(recipe, progress=progress, overwrite=True)
    t1 = time.perf_counter()
    metrics, _, _ = evaluate_bundle(run_dir, split)
    history = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    return {"metrics": by_task(metrics), "train_s": round(t1 - t0, 1), "eval_s": round(time.perf_counter() - t1, 1),
            "max_steps": history["max_steps"], "steps_run": history["step"], "best_step": history["best_step"],
            "run_dir": str(run_dir)}


def summarize(result: dict) -> dict:
    """Per task: the selection metric of both models and their difference; SQuAD EM/F1 x100; the aims."""
    from mtlm.recipe import load_recipe
    from mtlm.tasks import build_task, default_metric
    recipe = load_recipe(result["recipe"], result["overrides"])
    rows = {}
    for name, cfg in recipe.tasks.items():
        metric = default_metric(build_task(name, cfg))
        mt = result["multi_task"]["metrics"].get(name, {})
        st = result["single_task"].get(name, {}).get("metrics", {}).get(name, {})
        row = {"metric": metric, "multi_task": mt.get(metric), "single_task": st.get(metric)}
        if row["multi_task"] is not None and row["single_task"] is not None:
            row["delta"] = row["multi_task"] - row["single_task"]
        if cfg.type == "extractive_qa":
            for key in ("exact_match", "f1"):
                row[f"{key}_x100"] = {"multi_task": _x100(mt.get(key)), "single_task": _x100(st.get(key))}
        rows[name] = row
    qa = [r for n, r in rows.items() if recipe.tasks[n].type == "extractive_qa" and "delta" in r]
    aims = {}
    if qa:
        aims = {"squad_f1_above_0.60": {"multi_task": qa[0]["multi_task"] > 0.60, "single_task": qa[0]["single_task"] > 0.60},
                "multi_task_within_0.02_f1_of_single": qa[0]["delta"] >= -0.02}
    single_train = sum(r["train_s"] for r in result["single_task"].values())
    return {"tasks": rows, "aims": aims,
            "wall_s": {"multi_task_train": result["multi_task"]["train_s"], "single_task_train_total": round(single_train, 1),
                       "multi_task_eval": result["multi_task"]["eval_s"],
                       "single_task_eval_total": round(sum(r["eval_s"] for r in result["single_task"].values()), 1)}}


def resumed(out: Path, fresh: dict) -> dict:
    """The stages `out` already holds when it was written for the same recipe, overrides (--run-dir and
    --max-steps are overrides too) and split, else `fresh`. Raises SystemExit naming what differs when `out`
    holds another configuration (it is never overwritten)."""
    if not out.is_file():
        return fresh
    old = json.loads(out.read_text(encoding="utf-8"))
    differ = [k for k in ("benchmark", "quick", "split", "recipe") if old.get(k) != fresh[k]]
    added = [o for o in fresh["overrides"] if o not in old.get("overrides", [])]
    dropped = [o for o in old.get("overrides", []) if o not in fresh["overrides"]]
    if differ or added or dropped:
        raise SystemExit(f"{out} was written for another configuration ("
                         + "; ".join(differ + [f"now {o}" for o in added] + [f"was {o}" for o in dropped])
                         + "): give the same options, or another --out")
    print(f"resuming {out}: multi-task {'done' if old.get('multi_task') else 'to run'}, "
          f"single-task done: {', '.join(old.get('single_task') or {}) or 'none'}", flush=True)
    return {**old, "status": "running"}


def _x100(v):
    return None if v is None else round(100 * v, 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=str(DEFAULT_RECIPE))
    p.add_argument("--max-steps", type=int, help="multi-task optimizer steps (default: the recipe's)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (8 steps, 200-row samples, max_length 192)")
    p.add_argument("--split", choices=["dev", "test"], default="test")
    p.add_argument("--run-dir", default=str(ROOT / "runs" / "qa_bench"), help="where the models are trained")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--stage", choices=["all", "multi", "single"], default="all",
                   help="multi: train/score the multi-task model only; single: the single-task models only "
                        "(needs --out to hold this configuration's multi-task stage)")
    p.add_argument("--resume", action="store_true",
                   help="keep the stages --out already holds for the same recipe, overrides and split; run the rest")
    p.add_argument("overrides", nargs="*", help="extra recipe overrides, key.path=value")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from mtlm.baseline import single_task_recipe, step_budgets, train_sizes
    from mtlm.checkpoint import load_bundle
    from mtlm.cli import _quiet_libraries
    from mtlm.recipe import load_recipe
    _quiet_libraries()

    overrides = (QUICK if args.quick else []) + list(args.overrides) + [f"output_dir={Path(args.run_dir) / 'multi'}"]
    if args.max_steps:
        overrides += [f"train.max_steps={args.max_steps}"]
    recipe = load_recipe(args.recipe, overrides)
    if recipe.train.max_steps and recipe.train.eval_every > recipe.train.max_steps:
        overrides.append(f"train.eval_every={recipe.train.max_steps}")
        recipe = load_recipe(args.recipe, overrides)
    out = Path(args.out)
    result = {"benchmark": "qa_bench", "status": "running", "quick": args.quick, "split": args.split,
              "recipe": str(Path(args.recipe).resolve()), "overrides": overrides, "machine": device_info(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "multi_task": None, "single_task": {}}
    if args.resume or args.stage == "single":
        result = resumed(out, result)
    if result["multi_task"] is None and args.stage == "single":
        print(f"{out} holds no multi-task stage for this configuration: run --stage multi first", file=sys.stderr)
        return 2
    write(out, result)
    t_all = time.perf_counter()

    if result["multi_task"] is None:
        print(f"multi-task: {', '.join(recipe.tasks)} ({recipe.train.max_steps} steps) on {result['machine']['device']}",
              flush=True)
        result["multi_task"] = {**train_and_score(recipe, args.split, not args.no_progress), "machine": device_info()}
        write(out, result)
    if args.stage == "multi":
        print(f"wrote {out} (multi-task stage; the single-task models: --stage single)")
        return 0

    _, _, tasks, _ = load_bundle(Path(result["multi_task"]["run_dir"]) / "model")
    sizes = train_sizes(recipe, tasks)
    budgets = step_budgets(recipe, sizes, result["multi_task"]["max_steps"])
    result["train_features"], result["single_task_steps"] = sizes, budgets
    for name in recipe.tasks:
        if name in result["single_task"]:
            continue
        single = single_task_recipe(recipe, name, budgets[name], Path(args.run_dir))
        print(f"single-task {name}: {budgets[name]} steps", flush=True)
        result["single_task"][name] = {**train_and_score(single, args.split, not args.no_progress),
                                       "machine": device_info()}
        write(out, result)

    result.update(summarize(result), status="done", wall_s_this_invocation=round(time.perf_counter() - t_all, 1))
    write(out, result)
    for name, row in result["tasks"].items():
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        delta = f"{row['delta']:+.4f}" if "delta" in row else "-"
        print(f"{name:<12} {row['metric']:<10} multi {fmt(row['multi_task'])}  single {fmt(row['single_task'])}  {delta}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
