"""serve_bench.py's engine axis (`--scenarios engines --engines torch,onnx,onnx-int8,torch-bf16`): per engine,
how much of its in-process speed the HTTP server passes through, and how the engines compare over HTTP.

Per engine E (an engine the machine cannot run, e.g. torch-bf16 without native bf16, or a graph the bundle
lacks, is recorded as refused with the reason):
  1. one `mtlm serve BUNDLE --engine E` subprocess, and `mtlm.load(BUNDLE, engine=E)` in this process, both
     with `cores` threads (ONNX Runtime and torch), OMP_WAIT_POLICY=PASSIVE as the server runs;
  2. `--rounds` rounds, each an in-process slice then an HTTP slice of `--slice-s` seconds, INTERLEAVED so both
     see the same load from other processes:
       in-process: `Predictor.predict(chunk, batch_size=--batch)` over consecutive chunks of 4 x --batch texts
                   (as serve_bench's ceiling: each chunk is sorted by length into passes of --batch texts);
       HTTP:       `--engine-concurrency` closed-loop clients (default 2 x batch: one batch runs while the
                   next one fills), one text per request, all tasks: saturation throughput, p50 / p99;
     the ratio HTTP / in-process per round, and its median over rounds (os.getloadavg() per slice recorded);
  3. an overload run: Poisson arrivals at 2 x the median HTTP saturation for `--overload-s` s: 5xx count
     (must be 0), 429 share, unanswered requests.
The same texts in the same order for every engine and slice. The load generator (this process's asyncio
client) shares the machine's CPUs with the server; it is idle during the in-process slices.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from machine import contention, cpu_flags, cpu_model
from serve_stats import summarize


def in_process_rate(predictor, tasks: list[str], texts: list[str], batch: int, seconds: float, start: int
                    ) -> tuple[float, int]:
    """(texts/s, next start index) of `predictor.predict(chunk, batch_size=batch)` on consecutive chunks of
    4 x `batch` texts for `seconds` (as serve_bench's in-process ceiling: `predict` sorts each chunk by length,
    so its passes pad less than a server's, which picks from what is queued)."""
    done, t0, i = 0, time.perf_counter(), start
    while time.perf_counter() - t0 < seconds:
        chunk = [texts[(i + k) % len(texts)] for k in range(4 * batch)]
        predictor.predict(chunk, tasks, batch_size=batch)
        done, i = done + len(chunk), i + len(chunk)
    return done / (time.perf_counter() - t0), i


def server_batches(url: str) -> dict:
    """Mean inputs per backbone pass and passes so far, from the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families
    values = {s.name: s.value for f in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text)
              for s in f.samples if s.name in ("mtlm_batch_size_sum", "mtlm_batch_size_count")}
    count = values.get("mtlm_batch_size_count", 0.0)
    return {"passes": count, "mean_batch": values.get("mtlm_batch_size_sum", 0.0) / count if count else None}


def bench_engine(engine: str, bundle: Path, tasks: list[str], texts: list[str], cfg, log_dir: Path) -> dict:
    """One engine's interleaved in-process / HTTP rounds and its overload run (see the module docstring)."""
    from serve_bench import Server, closed_loop, open_loop

    from mtlm.engine import EngineError, precheck_engine
    from mtlm.predict import load
    try:
        precheck_engine(engine, bundle)
    except EngineError as e:
        print(f"[{engine}] refused: {e}", flush=True)
        return {"refused": str(e)}
    cores = os.cpu_count() or 1
    predictor = load(bundle, None, engine)
    predictor.predict(texts[:cfg.batch], tasks, batch_size=cfg.batch)                     # warm-up
    server = Server(bundle, ["--engine", engine, "--max-queue", str(cfg.max_queue),
                             "--max-batch-size", str(cfg.batch)], cores, log_dir, f"mtlm-{engine}")
    out: dict = {"engine": predictor.engine.name, "rounds": []}
    try:
        server.wait_ready()
        targets = [(server.url, "/v1/predict", {"tasks": tasks})]
        asyncio.run(closed_loop(targets, texts, 8, 64, 10, cfg.timeout_ms))             # warm-up
        at = 0
        for r in range(cfg.rounds):
            load_before = contention()
            rate, at = in_process_rate(predictor, tasks, texts, cfg.batch, cfg.slice_s, at)
            before = server_batches(server.url)
            recs, start = asyncio.run(closed_loop(targets, texts, cfg.engine_concurrency, 10 ** 7, cfg.slice_s,
                                                  cfg.timeout_ms))
            after = server_batches(server.url)
            http = summarize(recs, start)
            passes = after["passes"] - before["passes"]
            row = {"in_process_texts_per_s": rate, "http_texts_per_s": http["throughput_texts_per_s"],
                   "ratio": http["throughput_texts_per_s"] / rate, "p50_ms": http["p50_ms"], "p99_ms": http["p99_ms"],
                   "http_n_5xx": http["n_5xx"], "http_n_error": http["n_error"],
                   "server_mean_batch": http["ok"] / passes if passes else None,
                   "load_before": load_before, "load_after": contention()}
            out["rounds"].append(row)
            print(f"[{engine}] round {r}: in-process {rate:6.1f}/s  HTTP {row['http_texts_per_s']:6.1f}/s  ratio "
                  f"{row['ratio']:.2f}  p50 {http['p50_ms'] or 0:.0f} ms  p99 {http['p99_ms'] or 0:.0f} ms  "
                  f"batch {row['server_mean_batch'] or 0:.1f}  load {load_before['loadavg_1m']:.1f}", flush=True)
        med = lambda key: statistics.median(x[key] for x in out["rounds"] if x[key] is not None)  # noqa: E731
        out.update({"in_process_texts_per_s": med("in_process_texts_per_s"), "http_texts_per_s": med("http_texts_per_s"),
                    "ratio": med("ratio"), "p50_ms": med("p50_ms"), "p99_ms": med("p99_ms")})
        rate = 2 * out["http_texts_per_s"]
        recs, start = asyncio.run(open_loop(targets, texts, rate, 10 ** 7, cfg.overload_s, cfg.timeout_ms,
                                            seed=cfg.seed + 100))
        ov = summarize(recs, start)
        out["overload_2x"] = {"offered_texts_per_s": rate, "duration_s": cfg.overload_s,
                              **{k: ov[k] for k in ("texts", "ok", "throughput_texts_per_s", "rate_429", "n_5xx",
                                                    "n_4xx", "n_error", "p50_ms", "p99_ms", "latency_429_p99_ms")}}
        print(f"[{engine}] overload 2x ({rate:.0f}/s): ok {ov['ok']}  429 {ov['rate_429']:.1%}  5xx {ov['n_5xx']}  "
              f"errors {ov['n_error']}", flush=True)
    finally:
        out["exit_code"] = server.stop()
    return out


def run_engines(bundle: Path, tasks: list[str], texts: list[str], cfg, log_dir: Path) -> dict:
    """Every engine of `cfg.engines`, one after another; the summary compares them with torch fp32."""
    import torch
    torch.set_num_threads(os.cpu_count() or 1)          # the server's threads; ONNX sessions copy it at load
    results = {e: bench_engine(e, bundle, tasks, texts, cfg, log_dir) for e in cfg.engines}
    ran = {e: r for e, r in results.items() if "ratio" in r}
    summary: dict = {"ratio_http_over_in_process": {e: round(r["ratio"], 3) for e, r in ran.items()},
                     "aim_ratio": 0.8, "zero_5xx_at_2x": {e: r["overload_2x"]["n_5xx"] == 0 for e, r in ran.items()},
                     "refused": {e: r["refused"] for e, r in results.items() if "refused" in r}}
    if ran:
        fastest = max(ran, key=lambda e: ran[e]["http_texts_per_s"])
        summary["fastest_over_http"] = fastest
        if "torch" in ran:
            summary["fastest_vs_torch_over_http"] = ran[fastest]["http_texts_per_s"] / ran["torch"]["http_texts_per_s"]
            summary["fastest_vs_torch_in_process"] = (ran[fastest]["in_process_texts_per_s"]
                                                      / ran["torch"]["in_process_texts_per_s"])
            summary["aim_fastest_vs_torch"] = 2.0
    return {"summary": summary, "engines": results,
            "machine": {"cpus": os.cpu_count(), "cpu": cpu_model(), "cpu_flags": cpu_flags(),
                        "load_generator_shares_cpus": True, "loadavg_end": os.getloadavg()}}


def run_engine_axis(bundle: Path, tasks: list[str], texts: list[str], cfg, out_path: Path) -> None:
    """Run `run_engines` and write its JSON report (with load averages and settings) to `out_path`."""
    t0, load0 = time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mtlm-serve-engines-") as tmp:
        result = run_engines(bundle, tasks, texts, cfg, Path(tmp))
    report = {"benchmark": "serve_bench:engines", "quick": cfg.quick, "bundle": str(bundle), "tasks": tasks,
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)), "loadavg_start": load0,
              "settings": {k: v for k, v in vars(cfg).items() if k not in ("bundle", "out")},
              "texts": len(texts), **result}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2))
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {out_path}")
