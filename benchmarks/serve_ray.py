"""`mtlm serve` vs `mtlm serve --ray` (1 and 2 replicas) vs Ray's own `@serve.batch`, on the same texts.

Usage:
    python benchmarks/serve_ray.py --bundle runs/quickstart                # 3 rounds x 4 servers, ~6 minutes
    python benchmarks/serve_ray.py --bundle runs/quickstart --quick        # smoke run, 1 round, ~3 minutes

Servers (every one a real subprocess on 127.0.0.1 that this script starts, waits for and stops; all are up
together and measured in interleaved slices, the order rotated each round, so the machine's drift hits
every server alike):
  mtlm              `mtlm serve BUNDLE` (one process, torch threads = all cores)
  ray1, ray2        `mtlm serve BUNDLE --ray --replicas 1|2` (each replica: cores / replicas threads)
  ray1_serve_batch  benchmarks/ray_serve_batch.py: 1 Ray Serve replica batching with `@serve.batch`
                    (max_ongoing_requests raised to the batch size) instead of mtlm's batcher
Each slice is a closed loop of `--concurrency` clients sending one text each (every single-text task of the
bundle asked for: one backbone pass per text) for `--slice-s` seconds, starting at the same text for every
server in a round. Per server: texts/s, p50 and p99 latency (ms), 5xx and 429 counts, medians over rounds;
ratios against `mtlm` (and ray2 / ray1, serve_batch / ray1) from the same rounds. Records the CPU flags
(benchmarks/machine.py), the load average before and after every slice (others' jobs distort timings on
a shared machine: compare ratios) and each server's idle CPU while the others run.

Writes JSON (default benchmarks/results/serve_ray.json; --quick: serve_ray_quick.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

from machine import contention, cpu_flags, cpu_model
from serve_bench import Server, closed_loop, load_texts, text_tasks
from serve_stats import summarize

ROOT = Path(__file__).resolve().parents[1]
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60"}


def idle_cpu(server: Server, seconds: float = 3.0) -> float:
    """CPU seconds per second the server's process tree uses while no request reaches it."""
    procs = [psutil.Process(server.proc.pid)]
    procs += procs[0].children(recursive=True)

    def total() -> float:
        out = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                out += t.user + t.system
            except psutil.Error:
                pass
        return out
    before = total()
    time.sleep(seconds)
    return (total() - before) / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="trained multi-task bundle or run folder")
    p.add_argument("--quick", action="store_true", help="one short round: a smoke test, not a measurement")
    p.add_argument("--out", help="JSON path (default benchmarks/results/serve_ray[_quick].json)")
    p.add_argument("--texts", help="texts file (one per line, or JSONL with 'text'); default: the bundle's data")
    p.add_argument("--servers", default="mtlm,ray1,ray2,ray1_serve_batch", help="comma-separated subset")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; quick 1)")
    p.add_argument("--slice-s", type=float, default=None, help="seconds per server per round (default 15; quick 5)")
    p.add_argument("--max-queue", type=int, default=1024)
    p.add_argument("--timeout-ms", type=float, default=30000.0)
    p.add_argument("--seed", type=int, default=0)
    cfg = p.parse_args()
    cfg.rounds = cfg.rounds or (1 if cfg.quick else 3)
    cfg.slice_s = cfg.slice_s or (5.0 if cfg.quick else 15.0)
    out_path = Path(cfg.out or ROOT / "benchmarks" / "results" / f"serve_ray{'_quick' if cfg.quick else ''}.json")
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)

    from mtlm.checkpoint import find_bundle
    bundle = find_bundle(cfg.bundle).resolve()
    tasks = text_tasks(bundle)
    if not tasks:
        raise SystemExit(f"{bundle}: no single-text tasks to benchmark")
    texts = load_texts(bundle, tasks, 5000, cfg.seed, cfg.texts)
    cores = os.cpu_count() or 1
    queue = ["--max-queue", str(cfg.max_queue)]
    specs = {
        "mtlm": ([*queue], None),
        "ray1": ([*queue, "--ray", "--replicas", "1"], None),
        "ray2": ([*queue, "--ray", "--replicas", "2"], None),
        "ray1_serve_batch": (["--replicas", "1", "--tasks", ",".join(tasks)],
                             [sys.executable, str(ROOT / "benchmarks" / "ray_serve_batch.py")]),
    }
    names = [n for n in cfg.servers.split(",") if n]
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise SystemExit(f"--servers: unknown {unknown}; known: {', '.join(specs)}")
    print(f"bundle {bundle}: tasks {tasks}; {len(texts)} texts; servers {names}", flush=True)
    slices: dict[str, list[dict]] = {n: [] for n in names}
    idle: dict[str, float] = {}
    servers: dict[str, Server] = {}
    with tempfile.TemporaryDirectory(prefix="mtlm-serve-ray-") as tmp:
        try:
            for name in names:         # one at a time: startups do not compete for the CPU
                args, command = specs[name]
                t0 = time.monotonic()
                servers[name] = Server(bundle, args, cores, Path(tmp), name, command=command, env=RAY_ENV)
                servers[name].wait_ready(timeout_s=900)
                print(f"[{name}] ready in {time.monotonic() - t0:.1f} s", flush=True)
            for name, s in servers.items():
                target = [(s.url, "/v1/predict", {"tasks": tasks})]
                asyncio.run(closed_loop(target, texts, 8, 64, 15, cfg.timeout_ms))          # warm-up
                idle[name] = idle_cpu(s)
            for r in range(cfg.rounds):
                order = names[r % len(names):] + names[:r % len(names)]
                offset = (r * 997) % len(texts)
                round_texts = texts[offset:] + texts[:offset]
                for name in order:
                    s = servers[name]
                    before = contention()
                    recs, start = asyncio.run(closed_loop([(s.url, "/v1/predict", {"tasks": tasks})], round_texts,
                                                          cfg.concurrency, 10 ** 6, cfg.slice_s, cfg.timeout_ms))
                    out = {"round": r, **summarize(recs, start), "load_before": before, "load_after": contention()}
                    slices[name].append(out)
                    print(f"  round {r} {name:17s} {out['throughput_texts_per_s']:7.1f} texts/s  p50 "
                          f"{out['p50_ms'] or 0:6.0f} ms  p99 {out['p99_ms'] or 0:6.0f} ms  5xx {out['n_5xx']}  "
                          f"429 {out['rate_429']:.1%}  load {before['loadavg_1m']:.2f}", flush=True)
        finally:
            exits = {name: s.stop() for name, s in servers.items()}

    med = {n: {k: statistics.median(x[k] or 0.0 for x in v) for k in ("throughput_texts_per_s", "p50_ms", "p99_ms")}
           for n, v in slices.items() if v}

    def ratio(a: str, b: str, key: str = "throughput_texts_per_s") -> float | None:
        """Median over rounds of a's / b's value in the same round (None if either did not run)."""
        if a not in slices or b not in slices:
            return None
        return statistics.median(x[key] / y[key] for x, y in zip(slices[a], slices[b]) if y[key])

    summary = {"median": med,
               "texts_per_s_vs_mtlm": {n: ratio(n, "mtlm") for n in names if n != "mtlm"},
               "p99_vs_mtlm": {n: ratio(n, "mtlm", "p99_ms") for n in names if n != "mtlm"},
               "ray2_vs_ray1_texts_per_s": ratio("ray2", "ray1"),
               "mtlm_batcher_vs_serve_batch_texts_per_s": ratio("ray1", "ray1_serve_batch"),
               "n_5xx": {n: sum(x["n_5xx"] for x in v) for n, v in slices.items()},
               "idle_cpu_per_s": idle}
    report = {
        "benchmark": "serve_ray", "quick": cfg.quick, "bundle": str(bundle), "tasks": tasks,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {"cpus": cores, "cpu": cpu_model(), "cpu_flags": cpu_flags(), "platform": platform.platform(),
                    "python": platform.python_version(), "load_generator_shares_cpus": True,
                    "servers_up_together": True},
        "settings": {k: v for k, v in vars(cfg).items() if k not in ("bundle", "out")},
        "summary": summary, "slices": slices, "exit_codes": exits,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
