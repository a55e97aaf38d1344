"""Loss weighting on real tasks of very different sizes: every method in mtlm.weighting against single-task
baselines, at an equal step budget, on MiniLM-L6.

    python benchmarks/weighting.py            # full: 3 tasks x 7 methods x 2 seeds, 600 steps (GPU: ~5 min on an H200, estimated)
    python benchmarks/weighting.py --quick    # smoke test: 6 steps on 256-row slices, 1 seed (CPU: < 3 min)
    python benchmarks/weighting.py --methods static,pcgrad,famo --seeds 0 --steps 400

Tasks (../shared/data, see SOURCES.md): rte (2,488 sentence pairs, accuracy), conll2003 NER (12,503
sentences, entity F1) and sst2 (20,000 of its 66,983 sentences, accuracy): a small pair task, a token task
and a large single-sentence task. Batch 32 per task, max_length 128, AdamW lr 1e-4, linear decay, 6% warmup.

Protocol:
  * Every multi-task run uses step_mode all_tasks: each optimizer step takes one batch of every task, so all
    methods see exactly the same batches (static included) and differ only in how they combine them.
  * Each single-task baseline trains its task alone for the same number of steps (the per-task budget of
    an all_tasks run, as `mtlm baseline` computes it) with the same hyper-parameters and seed.
  * Metrics: each task's selection metric on its dev split, evaluated once after the last step (no model
    selection on dev, no early stopping).
  * Delta_m (Maninis et al. 2019, as in Vandenhende et al. 2021): mean over tasks of
    (-1)^l_i (M_method,i - M_single,i) / M_single,i x 100, l_i = 1 where lower is better; per seed against
    that seed's baselines, then mean and standard deviation over seeds.
  * Step time: training seconds / steps (metrics.json `train_s`: the loop's wall time up to the final
    evaluation), relative to static with the same seed.
The result file (benchmarks/results/weighting.json) is rewritten after every run, so a time-out keeps what
is done; the printed estimate of the remaining time is updated after every run.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "weighting.json"


def task_specs(quick: bool) -> dict[str, dict]:
    """The recipe `tasks:` block. Only dev splits are used (split: {} makes no test split from train)."""
    small = {"train": 256, "dev": 64} if quick else {}
    return {
        "rte": {"type": "classification", "columns": {"text": "text_a", "text_pair": "text_b"}, "metric": "accuracy",
                "data": {"train": str(DATA / "rte/train.jsonl"), "dev": str(DATA / "rte/dev.jsonl"), "split": {},
                         "limit": small}},
        "ner": {"type": "token_classification", "metric": "f1",
                "data": {"train": str(DATA / "conll2003/train.jsonl"), "dev": str(DATA / "conll2003/dev.jsonl"),
                         "split": {}, "limit": small or {"dev": 1000}}},
        "sst2": {"type": "classification", "metric": "accuracy",
                 "data": {"train": str(DATA / "sst2/train.jsonl"), "dev": str(DATA / "sst2/dev.jsonl"), "split": {},
                          "limit": small or {"train": 20000}}},
    }


def make_recipe(args, method: str, seed: int, work: Path):
    from mtlm.recipe import parse_recipe
    raw = {"name": f"w-{method}-s{seed}", "backbone": args.backbone, "max_length": args.max_length,
           "output_dir": str(work / f"{method}-s{seed}"), "tasks": task_specs(args.quick),
           "train": {"batch_size": args.batch_size, "max_steps": args.steps, "eval_every": args.steps,
                     "lr": args.lr, "warmup_ratio": 0.06, "scheduler": "linear", "early_stopping_patience": None,
                     "seed": seed, "step_mode": "all_tasks", "weighting": {"name": method},
                     "mixed_precision": args.mixed_precision, "eval_batch_size": 128}}
    return parse_recipe(raw, ROOT)


def read_run(run_dir: Path, tasks: dict) -> dict:
    m = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    last = m["eval"][-1]
    metrics = {n: last.get(f"{n}/{spec['metric']}") for n, spec in tasks.items() if f"{n}/{spec['metric']}" in last}
    weights = {k.split("/", 1)[1]: v for k, v in m["train"][-1].items() if k.startswith("weight/")}
    return {"metrics": metrics, "steps": m["step"], "train_s": last["train_s"],
            "step_s": last["train_s"] / max(1, m["step"]), "final_weights": weights}


def delta_m(method: dict[str, float], single: dict[str, float], tasks: dict) -> float | None:
    """Maninis et al. 2019: mean_i (-1)^l_i (M_m,i - M_b,i) / M_b,i x 100 over tasks present in both."""
    from mtlm.tasks import TASK_TYPES
    terms = []
    for n, spec in tasks.items():
        if method.get(n) is None or not single.get(n):
            continue
        sign = -1.0 if spec["metric"] in TASK_TYPES[spec["type"]].lower_is_better else 1.0
        terms.append(sign * (method[n] - single[n]) / single[n] * 100.0)
    return sum(terms) / len(terms) if len(terms) == len(tasks) else None


def _stats(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarize(result: dict, tasks: dict) -> dict:
    single = {}
    for r in result["runs"]:
        if r["kind"] == "single":
            single.setdefault(r["seed"], {})[r["task"]] = r["metric"]
    out = {"single_task": {n: _stats([s.get(n) for s in single.values()]) for n in tasks}}
    static_step = {r["seed"]: r["step_s"] for r in result["runs"] if r["kind"] == "multi" and r["method"] == "static"}
    for method in result["config"]["methods"]:
        runs = [r for r in result["runs"] if r["kind"] == "multi" and r["method"] == method]
        if not runs:
            continue
        out[method] = {
            "per_task": {n: _stats([r["metrics"].get(n) for r in runs]) for n in tasks},
            "average": _stats([statistics.fmean(r["metrics"].values()) if len(r["metrics"]) == len(tasks) else None
                               for r in runs]),
            "delta_m_percent": _stats([delta_m(r["metrics"], single.get(r["seed"], {}), tasks) for r in runs]),
            "step_s": _stats([r["step_s"] for r in runs]),
            "step_time_vs_static": _stats([r["step_s"] / static_step[r["seed"]] for r in runs
                                           if r["seed"] in static_step]),
        }
    return out


def table(summary: dict, tasks: dict) -> str:
    def fmt(s, digits=4):
        if not s or s["mean"] is None:
            return "-"
        return f"{s['mean']:.{digits}f}" + (f" ± {s['std']:.{digits}f}" if s["n"] > 1 else "")
    head = ["method"] + [f"{n} {spec['metric']}" for n, spec in tasks.items()] + ["average", "Δm %", "step time vs static"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    single = summary.get("single_task", {})
    if any(s["n"] for s in single.values()):
        avg = [s["mean"] for s in single.values() if s["mean"] is not None]
        lines.append(f"| single-task ({len(tasks)} models) | " + " | ".join(fmt(single[n]) for n in tasks)
                     + f" | {statistics.fmean(avg):.4f} | 0 | - |")
    for method, s in summary.items():
        if method == "single_task":
            continue
        lines.append(f"| {method} | " + " | ".join(fmt(s["per_task"][n]) for n in tasks)
                     + f" | {fmt(s['average'])} | {fmt(s['delta_m_percent'], 2)} | {fmt(s['step_time_vs_static'], 2)} |")
    return "\n".join(lines)


def write_json(path: Path, result: dict) -> None:
    """Write via a temporary file and a rename, so a kill mid-write leaves the previous file (for --resume)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
    tmp.replace(path)


def run_key(kind: str, method: str, seed: int, task: str | None) -> tuple:
    return (kind, method if kind == "multi" else "static", seed, task if kind == "single" else None)


def resumed(out: Path, fresh: dict, plan: list[tuple]) -> tuple[dict, list[tuple]]:
    """(result, plan) continuing `out`: its runs are kept when its configuration equals `fresh`'s but for
    the seeds and methods (which become the union); `plan` loses the runs already there. Raises SystemExit
    when `out` holds another configuration."""
    if not out.is_file():
        return fresh, plan
    old = json.loads(out.read_text(encoding="utf-8"))
    mine = {k: v for k, v in fresh["config"].items() if k not in ("seeds", "methods")}
    theirs = {k: v for k, v in old.get("config", {}).items() if k not in ("seeds", "methods")}
    if mine != theirs:
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise SystemExit(f"{out} was written with other settings ({', '.join(diff)}): choose another --out")
    done = {run_key(r["kind"], r["method"], r["seed"], r.get("task")) for r in old["runs"]}
    config = {**fresh["config"],
              "seeds": sorted(set(old["config"]["seeds"]) | set(fresh["config"]["seeds"])),
              "methods": list(dict.fromkeys(old["config"]["methods"] + fresh["config"]["methods"]))}
    result = {**old, "config": config, "machine": fresh["machine"]}
    result.setdefault("resumed", []).append(time.strftime("%Y-%m-%d %H:%M:%S"))
    left = [x for x in plan if run_key(*x) not in done]
    print(f"resuming {out}: {len(old['runs'])} runs kept, {len(left)} to run", flush=True)
    return result, left


def device_info() -> dict:
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return info


def main(argv: list[str] | None = None) -> int:
    from mtlm.weighting import WEIGHTINGS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per run (each: one batch per task)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    p.add_argument("--methods", default=",".join(WEIGHTINGS), help="comma-separated weighting names")
    p.add_argument("--backbone", default="minilm-l6", help="short name, local HF folder or hub id")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--no-baselines", action="store_true", help="skip the single-task runs (no Delta_m)")
    p.add_argument("--quick", action="store_true", help="6 steps on 256-row slices, seed 0, batch 16, max_length 64")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--resume", action="store_true",
                   help="keep the runs --out already holds for the same steps, tasks and hyper-parameters (e.g. "
                        "add a seed or a method); run only the missing ones")
    p.add_argument("--keep-runs", type=Path, default=None, help="keep run folders here (default: a temp dir, deleted)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.batch_size, args.max_length = 6, "0", 16, 64
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in WEIGHTINGS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; known: {', '.join(WEIGHTINGS)}")
    if "static" not in methods:
        methods.insert(0, "static")      # the reference of the step-time ratio
    methods = ["static"] + [m for m in methods if m != "static"]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not (DATA / "rte" / "train.jsonl").is_file():
        p.error(f"{DATA} not found (the benchmark reads ../shared/data beside the repo)")

    import transformers

    from mtlm.baseline import single_task_recipe
    from mtlm.train import fit
    transformers.utils.logging.set_verbosity_error()     # load reports and save progress bars, per run
    transformers.utils.logging.disable_progress_bar()

    tasks = task_specs(args.quick)
    work = args.keep_runs or Path(tempfile.mkdtemp(prefix="mtlm-weighting-"))
    work.mkdir(parents=True, exist_ok=True)
    plan = [("multi", m, s, None) for s in seeds for m in methods[:1]]
    if not args.no_baselines:
        plan += [("single", "static", s, t) for s in seeds for t in tasks]
    plan += [("multi", m, s, None) for s in seeds for m in methods[1:]]
    plan.sort(key=lambda x: (x[2] != seeds[0], x[0] == "multi" and x[1] != "static"))   # seed 0's static first
    units = {"multi": len(tasks), "single": 1}          # micro-batches per step, a proxy for cost
    total_units = sum(units[k] for k, *_ in plan)
    result = {"config": {"steps": args.steps, "seeds": seeds, "methods": methods, "batch_size": args.batch_size,
                         "max_length": args.max_length, "lr": args.lr, "mixed_precision": args.mixed_precision,
                         "quick": args.quick, "backbone": args.backbone, "step_mode": "all_tasks",
                         "tasks": {n: {"metric": s["metric"], "train": s["data"]["train"], "limit": s["data"]["limit"]}
                                   for n, s in tasks.items()}},
              "machine": device_info(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": [], "summary": {}}
    if args.resume:
        result, plan = resumed(args.out, result, plan)
        total_units = sum(units[k] for k, *_ in plan)
    print(f"device: {result['machine']['device']}; {len(plan)} runs ({sum(k == 'multi' for k, *_ in plan)} multi-task "
          f"x {len(tasks)} batches per step, {sum(k == 'single' for k, *_ in plan)} single-task) of {args.steps} "
          f"steps; the time estimate follows the first run", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # warm-up (not recorded): the first run in a process pays one-off costs (CUDA context and kernels, oneDNN
    # primitives, the datasets cache) that would otherwise inflate static's step time, the ratios' reference
    warm = make_recipe(argparse.Namespace(**{**vars(args), "steps": min(args.steps, 10)}), "static", seeds[0],
                       work / "warmup")
    t0 = time.perf_counter()
    shutil.rmtree(fit(warm, progress=False, overwrite=True), ignore_errors=True)
    print(f"warm-up run: {time.perf_counter() - t0:.0f} s", flush=True)
    t_start, done_units = time.perf_counter(), 0
    for i, (kind, method, seed, task) in enumerate(plan, 1):
        recipe = make_recipe(args, method, seed, work)
        if kind == "single":
            recipe = single_task_recipe(recipe, task, args.steps, work / f"baseline-s{seed}")
        t0 = time.perf_counter()
        run_dir = fit(recipe, progress=False, overwrite=True)
        wall = time.perf_counter() - t0
        info = read_run(run_dir, {task: tasks[task]} if kind == "single" else tasks)
        entry = {"kind": kind, "method": method, "seed": seed, "wall_s": round(wall, 2), **info,
                 "device": result["machine"]["device"]}
        if kind == "single":
            entry.update(task=task, metric=info["metrics"].get(task))
        result["runs"].append(entry)
        result["summary"] = summarize(result, tasks)
        result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        write_json(args.out, result)
        if args.keep_runs is None:
            shutil.rmtree(run_dir, ignore_errors=True)
        done_units += units[kind]
        elapsed = time.perf_counter() - t_start
        eta = elapsed / done_units * (total_units - done_units)
        what = f"{method}" if kind == "multi" else f"single {task}"
        shown = " ".join(f"{n}={v:.4f}" for n, v in info["metrics"].items() if v is not None)
        print(f"[{i}/{len(plan)}] {what} seed {seed}: {shown} step {info['step_s'] * 1000:.0f} ms, run {wall:.0f} s; "
              f"elapsed {elapsed / 60:.1f} min, about {eta / 60:.1f} min left", flush=True)
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_json(args.out, result)
    if args.keep_runs is None:
        shutil.rmtree(work, ignore_errors=True)
    print(table(result["summary"], tasks))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
