"""Structured pruning at fixed levels on one real multi-task run: per level, `mtlm compress RUN --method prune`
with that level alone and a budget wide enough to return it (100%), so each level's per-task drops on dev and
test and its speed are reported side by side. Speed is the throughput ratio against the unpruned parent on
torch fp32, measured interleaved in the same process on the same dev texts (batch 32, all heads), plus p50
batch-1 latency, weights on disk and peak RSS of a fresh process.

    cd benchmarks && OMP_NUM_THREADS=1 nice python prune_bench.py ../runs/sst2-small --levels 0.2,0.35,0.5

The run: `mtlm train recipes/sst2-agnews-conll-small.yaml` (MiniLM-L6, SST-2 + AG News + CoNLL-2003). The
machine's flags, CPU model and load average go into the JSON: on a shared machine the absolute numbers drift,
the ratios within one level's run much less.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from machine import contention, cpu_flags, cpu_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "prune_minilm_3task.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a trained multi-task run folder (with its stored dev/test rows)")
    p.add_argument("--levels", default="0.2,0.35,0.5", help="fractions of heads and FFN neurons pruned")
    p.add_argument("--recovery-steps", type=int, default=100)
    p.add_argument("--recovery-lr", type=float, default=5e-5)
    p.add_argument("--rounds", type=int, default=3, help="timed passes per engine (median)")
    p.add_argument("--output", default=str(DEFAULT_OUT))
    args = p.parse_args()

    import logging
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from mtlm.cli import _quiet_libraries
    _quiet_libraries()
    from mtlm.compress import compress_run
    from mtlm.prune import PruneSettings

    levels = [float(x) for x in args.levels.split(",")]
    result = {"command": "cd benchmarks && OMP_NUM_THREADS=1 nice python prune_bench.py " + " ".join(sys.argv[1:]),
              "run": str(Path(args.run).resolve()), "cpu_flags": cpu_flags(), "cpu_model": cpu_model(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "levels": []}
    with tempfile.TemporaryDirectory(prefix="prune-bench-") as tmp:
        for level in levels:
            settings = PruneSettings(levels=(level,), recovery_steps=args.recovery_steps, recovery_lr=args.recovery_lr)
            before, t0 = contention(), time.perf_counter()
            _, report = compress_run(args.run, "prune", 100.0, Path(tmp) / f"level-{level}", rounds=args.rounds,
                                     prune=settings)
            engines = report["engines"]
            entry = {"fraction_pruned": level, "seconds": time.perf_counter() - t0,
                     "contention_before": before, "contention_after": contention(),
                     "structure": report["trials"][0]["name"], "tasks": report["tasks"],
                     "ratio_vs_torch_fp32": engines["torch-pruned"]["ratio_vs_torch"], "engines": engines,
                     "recovery": {"steps": args.recovery_steps, "lr": args.recovery_lr, "distillation_alpha":
                                  settings.distill_alpha, "temperature": settings.distill_temperature}}
            result["levels"].append(entry)
            print(f"prune {level:.0%}: {engines['torch-pruned']['ratio_vs_torch']:.2f}x torch fp32; dev drops "
                  + ", ".join(f"{n} {t['dev_drop_pct']:+.2f}%" for n, t in report["tasks"].items())
                  + "; test drops " + ", ".join(f"{n} {t.get('test_drop_pct', float('nan')):+.2f}%"
                                                for n, t in report["tasks"].items()), flush=True)
            Path(args.output).write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
