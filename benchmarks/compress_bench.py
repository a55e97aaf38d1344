"""One multi-task run compressed every way, plus a distilled student, measured side by side in one run.

    # the parent (MiniLM-L6: SST-2 classification, CoNLL-2003 tagging, MRPC sentence pairs; ~9 min quiet):
    mtlm train recipes/sst2-conll-mrpc-small.yaml output_dir=runs/scm
    python benchmarks/compress_bench.py runs/scm                     # ~27 min on a quiet 2-core CPU
    python benchmarks/compress_bench.py runs/scm --measure-only      # variants already made: remeasure

Variants, each a run derived from the parent (made once, beside it as <parent>-bench-<variant>, reused on a
rerun), by the commands a user would run (`mtlm.compress.compress_run`, `mtlm.export.export_run`,
`mtlm.distill.run.distill_run`):
  onnx            the fp32 graph (`mtlm export --format onnx`)
  int8            `mtlm compress --method int8 --budget B` (dynamic int8, per-channel, searched within B)
  bf16            `mtlm compress --method bf16` (only on a CPU with native bf16; else listed as not run)
  layers          `mtlm compress --method layers --budget T` (top layers dropped + recovery distilled from
                  the parent; T = --trained-budget, looser than B so the trained methods give a point)
  prune           `mtlm compress --method prune --budget T` (heads + FFN neurons by importance over all
                  tasks, levels 0.3, 0.2, 0.1, + recovery)
  student         `mtlm distill --student layers:3` trained as long as the parent (its recipe's steps)
  student-int8    the student, then `mtlm compress --method int8 --budget B` (B relative to the student)
A variant whose method finds nothing within its budget is listed with the reason. Then, in one process,
every variant on its engine (`mtlm.distill.run.compare_runs`): each task's metric on the parent's dev and
test rows, the task average as % of the parent's, throughput at batch 32 (every head, the dev texts,
interleaved rounds) as a ratio to torch fp32, p50 latency at batch 1; then each variant's weights on disk
and peak resident memory (a fresh process per variant, `mtlm.measure.peak_memory_mb`), with the CPU's
flags and the load average. Writes benchmarks/results/compress_bench_<parent>.json and a plot (test task
average vs throughput, one point per variant) beside it (needs matplotlib: pip install -e '.[report]').
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = ("onnx", "int8", "bf16", "layers", "prune", "student", "student-int8")


def make_variant(name: str, parent: Path, out: Path, budget: float, trained_budget: float, student: str,
                 recovery_steps: int) -> str:
    """Write variant `name` of run `parent` into the new run folder `out`; returns the engine it runs on.
    Raises CompressError (nothing within budget, no native bf16 ...), DistillError, EngineError."""
    from mtlm.compress import compress_run
    from mtlm.layer_drop import LayerSettings
    from mtlm.prune import PruneSettings

    quick = {"measure_memory": False, "rounds": 1}          # measured below, side by side
    if name == "onnx":
        from mtlm.export import export_run
        export_run(parent, out)
        return "onnx"
    if name in ("int8", "student-int8"):
        source = out.with_name(out.name.replace("-student-int8", "-student")) if name == "student-int8" else parent
        return compress_run(source, "int8", budget, out, **quick)[1]["engine"]
    if name == "bf16":
        return compress_run(parent, "bf16", budget, out, **quick)[1]["engine"]
    if name == "layers":
        settings = LayerSettings(strategies=("top",), recovery_steps=recovery_steps)
        return compress_run(parent, "layers", trained_budget, out, layers=settings, **quick)[1]["engine"]
    if name == "prune":
        settings = PruneSettings(levels=(0.3, 0.2, 0.1), recovery_steps=recovery_steps)
        return compress_run(parent, "prune", trained_budget, out, prune=settings, **quick)[1]["engine"]
    if name == "student":
        from mtlm.distill.run import distill_run
        distill_run(parent, student, [], out, progress=False, measure=False)
        return "torch"
    raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")


def engine_of(folder: Path) -> str:
    """The engine a variant run made by `make_variant` runs on, read back from its parent.json (a variant left
    without an entry in <parent>-bench.json by an interrupted run). Raises FileNotFoundError, KeyError."""
    record = json.loads((folder / "parent.json").read_text())
    details = record.get("details") or {}
    return "onnx" if details.get("format") == "onnx" else details.get("engine", "torch")


def plot(report: dict, path: Path) -> Path | None:
    """Test (else dev) task average as % of the parent's against throughput x torch fp32, one labelled point
    per variant, saved to `path`; None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    split = "test" if any(k.endswith("_ratio_test") for k in report["average"]) else "dev"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, who in enumerate(["teacher", *report["runs"]]):
        ratio = 1.0 if who == "teacher" else report["average"].get(f"{who}_ratio_{split}")
        speed = 1.0 if who == "teacher" else report["speed_ratio"][who]
        if ratio is None:
            continue
        ax.scatter(speed, 100 * ratio, s=40)
        ax.annotate("torch fp32" if who == "teacher" else f"{who} ({report['engines'][who]})", (speed, 100 * ratio),
                    textcoords="offset points", xytext=(5, 4 - 9 * (i % 3)), fontsize=8)   # staggered: points close
    ax.set_xlabel("throughput, x torch fp32 (batch 32, every head)")
    ax.set_ylabel(f"task average on {split}, % of the parent")
    ax.set_title(f"{Path(report['teacher']).name}: accuracy vs throughput ({' '.join(report['cpu_flags'])})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="the parent run folder (with its stored dev and test rows)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--budget", type=float, default=1.0, help="int8 / bf16: relative drop %% allowed per task on dev")
    p.add_argument("--trained-budget", type=float, default=3.0, help="layers / prune: the same, for the trained methods")
    p.add_argument("--recovery-steps", type=int, default=200, help="layers / prune: recovery steps per try")
    p.add_argument("--student", default="layers:3")
    p.add_argument("--measure-only", action="store_true", help="only measure the variants already made")
    p.add_argument("--rounds", type=int, default=3, help="timed passes per variant (median); 1 is noisy on a "
                   "shared machine: compare the printed load average")
    p.add_argument("--output", help="results JSON (default: benchmarks/results/compress_bench_<parent>.json)")
    args = p.parse_args()
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in wanted if v not in VARIANTS]
    if unknown or not wanted:
        p.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}" if unknown else "--variants: name one or more")
    if args.rounds < 1:
        p.error(f"--rounds must be 1 or more, got {args.rounds}")
    if not (Path(args.run) / "model").is_dir() and not (Path(args.run) / "recipe.yaml").is_file():
        p.error(f"{args.run}: not a run folder (no model/ inside); train one first, e.g. "
                f"mtlm train recipes/sst2-conll-mrpc-small.yaml output_dir={args.run}")
    if "student-int8" in wanted and "student" not in wanted:
        wanted.insert(wanted.index("student-int8"), "student")

    import machine
    from mtlm.checkpoint import find_bundle, load_bundle
    from mtlm.distill.run import compare_runs
    from mtlm.engine_check import dev_features
    from mtlm.measure import model_rows, peak_memory_mb, size_on_disk

    parent = Path(args.run).resolve()
    folders = {v: parent.with_name(f"{parent.name}-bench-{v}") for v in wanted}
    engines_file = parent.with_name(f"{parent.name}-bench.json")        # variant -> engine, for --measure-only
    engines = json.loads(engines_file.read_text()) if engines_file.is_file() else {}
    not_run: dict[str, str] = {}
    for v in wanted:
        if (folders[v] / "model").exists():
            if v not in engines:                     # made, but the run stopped before recording it
                engines[v] = engine_of(folders[v])
                engines_file.write_text(json.dumps(engines, indent=2))
            continue
        if args.measure_only:
            not_run[v] = "not made yet (run without --measure-only)"
            continue
        try:
            engines[v] = make_variant(v, parent, folders[v], args.budget, args.trained_budget, args.student,
                                      args.recovery_steps)
            engines_file.write_text(json.dumps(engines, indent=2))
            print(f"made {v}: {folders[v]} ({engines[v]})", flush=True)
        except (ValueError, FileExistsError) as e:            # CompressError, DistillError, EngineError ...
            not_run[v] = str(e).splitlines()[0]
            print(f"{v}: not made: {not_run[v]}", flush=True)
    made = {v: folders[v] for v in wanted if v not in not_run}
    load_before = list(os.getloadavg())
    report = compare_runs(parent, made, rounds=args.rounds, engines={v: engines[v] for v in made})
    bundle = find_bundle(parent)
    _, tokenizer, tasks, meta = load_bundle(bundle, "cpu")
    rows = model_rows(dev_features(bundle, tasks, tokenizer, int(meta["max_length"]), rows=None))
    report["footprint"] = {}
    for who, path, engine in [("teacher", parent, "torch"), *((v, made[v], engines[v]) for v in made)]:
        where = find_bundle(path)
        report["footprint"][who] = {"size_mb": size_on_disk(where, engine) / 2**20,
                                    "peak_rss_mb": peak_memory_mb(where, engine, rows, tokenizer.pad_token_id)}
    report.update({"benchmark": "compress_bench", "budget_pct": args.budget, "trained_budget_pct": args.trained_budget,
                   "recovery_steps": args.recovery_steps, "student": args.student, "not_run": not_run,
                   "loadavg_before": load_before, "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
                   "machine": {"cpu": machine.cpu_model(), "flags": machine.cpu_flags()},
                   "derived": {v: json.loads((made[v] / "parent.json").read_text()).get("details", {}) for v in made}})
    out = Path(args.output) if args.output else ROOT / "benchmarks" / "results" / f"compress_bench_{parent.name}.json"
    out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    figure = plot(report, out.with_suffix(".png"))

    names = ["teacher", *made]
    print(f"{'variant':<14}{'engine':<12}" + "".join(f"{t + ' ' + s:>18}" for t in report["tasks"] for s in ("dev", "test"))
          + f"{'avg % test':>11}{'x torch':>8}{'p50 ms':>8}{'MB':>7}{'RSS MB':>8}")
    for who in names:
        cells = "".join(f"{report['tasks'][t].get(f'{who}_{s}', float('nan')):>18.4f}" for t in report["tasks"]
                        for s in ("dev", "test"))
        ratio = 1.0 if who == "teacher" else report["average"].get(f"{who}_ratio_test") or float("nan")
        speed = 1.0 if who == "teacher" else report["speed_ratio"][who]
        fp = report["footprint"][who]
        print(f"{('torch fp32' if who == 'teacher' else who):<14}{report['engines'][who]:<12}{cells}{100 * ratio:>10.1f}%"
              f"{speed:>8.2f}{report['speed'][who]['p50_latency_ms']:>8.1f}{fp['size_mb']:>7.1f}"
              f"{(fp['peak_rss_mb'] or float('nan')):>8.0f}")
    for v, why in not_run.items():
        print(f"{v}: not run: {why}")
    print(f"cpu flags: {' '.join(report['cpu_flags'])}; load average {report['loadavg'][0]:.1f}; wrote {out}"
          + (f" and {figure}" if figure else ""))


if __name__ == "__main__":
    main()
