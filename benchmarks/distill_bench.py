"""A multi-task teacher distilled into a student of its own layers, against the same student trained on the
same rows, steps and schedule without a teacher (`distill.alpha=0`: hard labels only), measured side by side.

    # the teacher (MiniLM-L6, SST-2 + AG News + CoNLL-2003, 240 steps; ~10 min on a quiet 2-core CPU):
    mtlm train recipes/sst2-agnews-conll-small.yaml output_dir=runs/teacher-l6
    python benchmarks/distill_bench.py runs/teacher-l6                     # layers:3 students, then the table
    python benchmarks/distill_bench.py runs/teacher-l6 --measure-only      # students already trained: remeasure

Both students start from the same N of the teacher's own layers (`mtlm.distill.layers`, alternate: 0, 2, 5
of 6) and its heads, and train on the teacher's stored rows with the teacher's recipe (steps, schedule,
sampling, seed). The distilled one adds the teacher's soft targets (`distill.*`: T=2, alpha=0.5 by default).
Reported per task on the teacher's dev and test rows: the selection metric of the teacher, the distilled and
the plain student; the task averages and their ratio to the teacher's; in-process throughput (torch fp32,
batch 32, every head, the dev texts) and p50 batch-1 latency of all three interleaved in one run
(`mtlm.measure.speed`), with the load average (the machine is shared: the ratios, not the absolute rates,
are what carries over) and the CPU flags. Writes benchmarks/results/distill_<teacher>_<student>.json.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("teacher", help="the teacher's run folder")
    p.add_argument("--student", default="layers:3")
    p.add_argument("overrides", nargs="*", help="recipe overrides for both students (e.g. train.max_steps=240)")
    p.add_argument("--measure-only", action="store_true", help="reuse the students in <teacher>-kd / -plain")
    p.add_argument("--rounds", type=int, default=5, help="timed passes per model (median)")
    p.add_argument("--also", action="append", default=[], metavar="NAME=OVERRIDE[,OVERRIDE...]",
                   help="one more distilled student with these overrides, e.g. bam=distill.alpha=1,distill.anneal=true "
                        "(its run: <teacher>-<student>-NAME)")
    p.add_argument("--tag", default="", help="suffix for the students' run folders and the results file, so a "
                   "second setting (e.g. more steps) does not reuse the first one's students")
    p.add_argument("--output", help="results JSON (default: benchmarks/results/distill_<teacher>_<student><tag>.json)")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import machine
    from mtlm.distill.run import compare_runs, distill_run

    teacher = Path(args.teacher).resolve()
    slug = args.student.replace(":", "") + args.tag
    runs = {"distilled": teacher.with_name(f"{teacher.name}-{slug}-kd"),
            "no_teacher": teacher.with_name(f"{teacher.name}-{slug}-plain")}
    variants = [("distilled", []), ("no_teacher", ["distill.alpha=0"])]
    for item in args.also:
        name, _, spec = item.partition("=")
        variants.append((name, [o for o in spec.split(",") if o]))
        runs[name] = teacher.with_name(f"{teacher.name}-{slug}-{name}")
    if not args.measure_only:
        for name, extra in variants:
            if not (runs[name] / "model").exists():
                distill_run(teacher, args.student, list(args.overrides) + extra, runs[name], progress=False,
                            measure=False)
    load_before = list(os.getloadavg())
    report = compare_runs(teacher, runs, rounds=args.rounds)
    report.update({"student": args.student, "overrides": args.overrides, "loadavg_before": load_before,
                   "variants": {n: extra for n, extra in variants},
                   "machine": {"cpu": machine.cpu_model(), "flags": machine.cpu_flags(),
                               "threads": int(os.environ["OMP_NUM_THREADS"])},
                   "students": {n: json.loads((r / "parent.json").read_text())["details"] for n, r in runs.items()}})
    wins = [t for t, e in report["tasks"].items() if e["distilled_test" if "distilled_test" in e else "distilled_dev"]
            > e["no_teacher_test" if "no_teacher_test" in e else "no_teacher_dev"]]
    report["distillation_wins_on"] = wins
    out = Path(args.output) if args.output else ROOT / "benchmarks" / "results" / f"distill_{teacher.name}_{slug}.json"
    out.write_text(json.dumps(report, indent=2), encoding="utf-8")

    print(f"{'task':<12}{'metric':<10}" + "".join(f"{w + ' ' + s:>22}" for s in ("dev", "test")
                                                  for w in ("teacher", "distilled", "no_teacher")))
    for task, e in report["tasks"].items():
        print(f"{task:<12}{e['metric']:<10}" + "".join(f"{e.get(f'{w}_{s}', float('nan')):>22.4f}"
                                                       for s in ("dev", "test") for w in ("teacher", "distilled", "no_teacher")))
    a = report["average"]
    for s in ("dev", "test"):
        if f"teacher_{s}" in a:
            print(f"task average on {s}: teacher {a[f'teacher_{s}']:.4f}; " + ", ".join(
                f"{w} {a[f'{w}_{s}']:.4f} ({a[f'{w}_ratio_{s}']:.1%})" for w in runs))
    sp = report["speed"]
    print("throughput (texts/s, batch 32): " + ", ".join(f"{w} {sp[w]['texts_per_s']:.1f}" for w in sp)
          + "; vs teacher: " + ", ".join(f"{w} {r:.2f}x" for w, r in report["speed_ratio"].items()))
    print(f"distillation beats no teacher on: {', '.join(wins) or 'no task'} ({len(wins)}/{len(report['tasks'])}); "
          f"load average {report['loadavg'][0]:.1f}; wrote {out}")


if __name__ == "__main__":
    main()
