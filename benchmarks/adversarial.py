"""Adversarial training (`train.adversarial`: none vs fgm vs smart) on one real three-task recipe, MiniLM-L6.

    python benchmarks/adversarial.py --quick           # smoke test: 4 steps on 64-row slices (CPU: ~2 min)
    python benchmarks/adversarial.py --steps 300       # the measurement (sizes: see the README table)

Tasks (../shared/data, see SOURCES.md): MRPC paraphrase (3,668 sentence pairs, accuracy), STS-B similarity
(5,697 pairs, regression, pearson) and CoNLL-2003 NER (12,503 sentences, entity F1): three task types, so
both methods' per-type terms are exercised (SMART's regression term is MSE). Official dev and test files;
dev and test capped at --eval-rows rows each (seeded).

Protocol: the same recipe, seed and batches for every method (static weighting, temperature sampling,
AdamW, linear decay, 6% warmup); one evaluation on dev after the last step (no model selection, no early
stopping), then the final model on test. Step time: training seconds / steps (metrics.json `train_s`, the
loop's wall time up to that one evaluation), reported relative to `none` run in the same invocation.
Methods run in the order none, fgm, smart, so one seed's comparison is done before the next seed starts.
Writes benchmarks/results/adversarial.json (rewritten after every run) with the CPU model, its vector/matrix
flags (AVX-512, AMX: they decide fp32 and bf16 speed) and CPU contention at the end of each run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from machine import contention, cpu_flags, cpu_model

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "adversarial.json"
METHODS = ("none", "fgm", "smart")
METRIC = {"mrpc": "accuracy", "stsb": "pearson", "ner": "f1"}


def task_specs(train_rows: int | None, eval_rows: int) -> dict:
    def data(name: str) -> dict:
        limit = {"dev": eval_rows, "test": eval_rows, **({"train": train_rows} if train_rows else {})}
        return {"train": str(DATA / name / "train.jsonl"), "dev": str(DATA / name / "dev.jsonl"),
                "test": str(DATA / name / "test.jsonl"), "split": {}, "limit": limit}
    pair = {"text": "text_a", "text_pair": "text_b"}
    return {"mrpc": {"type": "classification", "metric": "accuracy", "columns": pair, "data": data("mrpc")},
            "stsb": {"type": "regression", "metric": "pearson", "columns": pair, "data": data("stsb")},
            "ner": {"type": "token_classification", "metric": "f1", "data": data("conll2003")}}


def make_recipe(args, method: str, seed: int, work: Path):
    from mtlm.recipe import parse_recipe
    adversarial = {"method": method}
    if method == "fgm" and args.fgm_epsilon is not None:
        adversarial["epsilon"] = args.fgm_epsilon
    if method == "smart" and args.smart_epsilon is not None:
        adversarial["epsilon"] = args.smart_epsilon
    raw = {"name": f"adv-{method}-s{seed}", "backbone": args.backbone, "max_length": args.max_length,
           "output_dir": str(work / f"{method}-s{seed}"),
           "tasks": task_specs(args.train_rows, args.eval_rows),
           "train": {"batch_size": args.batch_size, "max_steps": args.steps, "eval_every": args.steps, "lr": args.lr,
                     "warmup_ratio": 0.06, "scheduler": "linear", "early_stopping_patience": None, "seed": seed,
                     "sampling": "temperature", "temperature": 2.0, "eval_batch_size": 128,
                     "adversarial": adversarial}}
    return parse_recipe(raw, ROOT)


def measure(recipe) -> dict:
    from mtlm.evaluate import by_task, evaluate_bundle
    from mtlm.train import fit
    run = fit(recipe, progress=False, overwrite=True)
    m = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    last = m["eval"][-1]
    test, _, _ = evaluate_bundle(run, "test")
    dev = {n: {k: v for k, v in ms.items()} for n, ms in by_task(last).items()}
    return {"steps": m["step"], "train_s": last["train_s"], "step_s": last["train_s"] / max(1, m["step"]),
            "dev": dev, "test": by_task(test), "contention": contention()}


def summarize(runs: list[dict]) -> dict:
    """Per method: mean over seeds of each task's dev/test selection metric and of the step-time ratio to
    `none` with the same seed."""
    none = {r["seed"]: r for r in runs if r["method"] == "none"}
    out = {}
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        out[method] = {
            split: {t: statistics.fmean(r[split][t][METRIC[t]] for r in mine) for t in METRIC} for split in ("dev", "test")}
        ratios = [r["step_s"] / none[r["seed"]]["step_s"] for r in mine if r["seed"] in none]
        out[method]["step_time_vs_none"] = statistics.fmean(ratios) if ratios else None
        out[method]["seeds"] = len(mine)
    return out


def table(summary: dict) -> str:
    head = ["method"] + [f"{t} {METRIC[t]} dev / test" for t in METRIC] + ["step time vs none"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, s in summary.items():
        cells = [f"{s['dev'][t]:.4f} / {s['test'][t]:.4f}" for t in METRIC]
        ratio = s["step_time_vs_none"]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {'-' if ratio is None else f'{ratio:.2f}x'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated: none, fgm, smart")
    p.add_argument("--backbone", default="minilm-l6")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--train-rows", type=int, default=None, help="cap each task's train rows (seeded)")
    p.add_argument("--eval-rows", type=int, default=500, help="cap each task's dev and test rows (seeded)")
    p.add_argument("--fgm-epsilon", type=float, default=None, help="default: mtlm's (1.0)")
    p.add_argument("--smart-epsilon", type=float, default=None, help="default: mtlm's (1e-5)")
    p.add_argument("--quick", action="store_true", help="4 steps, 64 train / 32 dev / 32 test rows, batch 8")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.train_rows, args.eval_rows, args.batch_size, args.max_length = 4, 64, 32, 8, 48
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if set(methods) - set(METHODS):
        p.error(f"unknown method(s) {sorted(set(methods) - set(METHODS))}; known: {', '.join(METHODS)}")
    methods = ["none"] + [m for m in METHODS[1:] if m in methods]      # none: the step-time reference
    if not (DATA / "mrpc" / "train.jsonl").is_file():
        p.error(f"{DATA} not found (the benchmark reads ../shared/data beside the repo)")
    sys.path.insert(0, str(ROOT))
    import torch
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "tasks": {t: METRIC[t] for t in METRIC},
              "machine": {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "logical_cpus": os.cpu_count(),
                          "omp_threads": torch.get_num_threads(), "torch": torch.__version__,
                          "python": platform.python_version(), "cuda": torch.cuda.is_available()},
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": [], "summary": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mtlm-adversarial-"))
    try:
        # warm-up (not recorded): the first fit in a process pays one-off costs (oneDNN primitives, caches)
        # that would otherwise inflate `none`'s step time, the ratios' reference
        warm = argparse.Namespace(**{**vars(args), "steps": min(args.steps, 5)})
        measure(make_recipe(warm, "none", seeds[0], work / "warmup"))
        for seed in seeds:
            for method in methods:
                t0 = time.perf_counter()
                row = {"method": method, "seed": seed, **measure(make_recipe(args, method, seed, work))}
                result["runs"].append(row)
                result["summary"] = summarize(result["runs"])
                tmp = args.out.with_suffix(".json.tmp")
                tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
                tmp.replace(args.out)
                print(f"{method} seed {seed}: {row['step_s']:.3f} s/step, run {time.perf_counter() - t0:.0f} s, "
                      f"test " + ", ".join(f"{t} {row['test'][t][METRIC[t]]:.4f}" for t in METRIC), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(result["summary"]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
