"""serve_bench.py's engine axis (`--scenarios engines --engines torch,onnx,onnx-int8,torch-bf16`): per engine,
how much of its in-process speed the HTTP server passes through, and how the engines compare over HTTP.

Per engine E (an engine the machine cannot run, e.g. torch-bf16 without native bf16, or a graph the bundle
lacks, is recorded as refused with the reason):
  1. one `mtlm serve BUNDLE --engine E` subprocess, and `mtlm.load(BUNDLE, engine=E)` in this process, both
     with `cores` threads (ONNX Runtime and torch), OMP_WAIT_POLICY=PASSIVE as the server runs; every
     engine's server is up at once (idle ones take no CPU);
  2. `--rounds` rounds, each running every engine's in-process slice then its HTTP slice of `--slice-s`
     seconds, INTERLEAVED so in-process and HTTP, and the engines, see the same load from other processes:
       in-process: `Predictor.predict(chunk, batch_size=--batch)` over consecutive chunks of 4 x --batch texts
                   (as serve_bench's ceiling: each chunk is sorted by length into passes of --batch texts);
       HTTP:       `--engine-concurrency` closed-loop clients (default 2 x batch: one batch runs while the
                   next one fills), one text per request, all tasks: saturation throughput, p50 / p99;
     the ratio HTTP / in-process per round, and its median over rounds (os.getloadavg() per slice recorded);
  3. an overload run: Poisson arrivals at 2 x the median HTTP saturation for `--overload-s` s: 5xx count
     (must be 0), 429 share, unanswered requests.
An entry `ENGINE@RUN` serves another bundle with that engine: a run derived from this one by `mtlm compress`
(same tasks), e.g. `onnx-int8@runs/x-auto` for a pruned or layer-dropped + int8 bundle, compared with the torch
fp32 server of the parent in the same rounds.
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


def measure_round(engine: str, predictor, server, tasks: list[str], texts: list[str], cfg, at: int) -> tuple[dict, int]:
    """One in-process slice then one HTTP slice of `engine` -> (its row, the next in-process text index)."""
    from serve_bench import closed_loop
    load_before = contention()
    rate, at = in_process_rate(predictor, tasks, texts, cfg.batch, cfg.slice_s, at)
    before = server_batches(server.url)
    recs, start = asyncio.run(closed_loop([(server.url, "/v1/predict", {"tasks": tasks})], texts,
                                          cfg.engine_concurrency, 10 ** 7, cfg.slice_s, cfg.timeout_ms))
    passes = server_batches(server.url)["passes"] - before["passes"]
    http = summarize(recs, start)
    row = {"in_process_texts_per_s": rate, "http_texts_per_s": http["throughput_texts_per_s"],
           "ratio": http["throughput_texts_per_s"] / rate, "p50_ms": http["p50_ms"], "p99_ms": http["p99_ms"],
           "http_n_5xx": http["n_5xx"], "http_n_error": http["n_error"],
           "server_mean_batch": http["ok"] / passes if passes else None,
           "load_before": load_before, "load_after": contention()}
    print(f"[{engine}] in-process {rate:6.1f}/s  HTTP {row['http_texts_per_s']:6.1f}/s  ratio {row['ratio']:.2f}  "
          f"p50 {http['p50_ms'] or 0:.0f} ms  p99 {http['p99_ms'] or 0:.0f} ms  batch {row['server_mean_batch'] or 0:.1f}"
          f"  load {load_before['loadavg_1m']:.1f}", flush=True)
    return row, at


def overload(engine: str, server, tasks: list[str], texts: list[str], cfg, saturation: float) -> dict:
    """Poisson arrivals at 2 x `saturation` texts/s for cfg.overload_s seconds: 5xx, 429 share, errors."""
    from serve_bench import open_loop
    rate = 2 * saturation
    recs, start = asyncio.run(open_loop([(server.url, "/v1/predict", {"tasks": tasks})], texts, rate, 10 ** 7,
                                        cfg.overload_s, cfg.timeout_ms, seed=cfg.seed + 100))
    ov = summarize(recs, start)
    print(f"[{engine}] overload 2x ({rate:.0f}/s): ok {ov['ok']}  429 {ov['rate_429']:.1%}  5xx {ov['n_5xx']}  "
          f"errors {ov['n_error']}", flush=True)
    return {"offered_texts_per_s": rate, "duration_s": cfg.overload_s,
            **{k: ov[k] for k in ("texts", "ok", "throughput_texts_per_s", "rate_429", "n_5xx", "n_4xx", "n_error",
                                  "p50_ms", "p99_ms", "latency_429_p99_ms")}}


def run_engines(bundle: Path, tasks: list[str], texts: list[str], cfg, log_dir: Path) -> dict:
    """Every engine of `cfg.engines`: all servers up at once, rounds interleaved over engines (round r runs
    every engine's in-process and HTTP slices before round r + 1), so the engines compare under the same
    load too; then each one's overload run. The summary compares them with torch fp32."""
    import torch
    from serve_bench import Server, closed_loop

    from mtlm.checkpoint import find_bundle
    from mtlm.engine import EngineError, precheck_engine
    from mtlm.predict import load
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)          # the server's threads; ONNX sessions copy it when created
    results: dict[str, dict] = {}
    live: dict[str, tuple] = {}
    try:
        for entry in cfg.engines:
            engine, _, other = entry.partition("@")
            where = find_bundle(other).resolve() if other else bundle
            try:
                precheck_engine(engine, where)
            except EngineError as e:
                print(f"[{entry}] refused: {e}", flush=True)
                results[entry] = {"refused": str(e)}
                continue
            predictor = load(where, None, engine)
            predictor.predict(texts[:cfg.batch], tasks, batch_size=cfg.batch)                # warm-up
            server = Server(where, ["--engine", engine, "--max-queue", str(cfg.max_queue), "--max-batch-size",
                                    str(cfg.batch)], cores, log_dir, f"mtlm-{engine}-{len(live)}")
            live[entry] = (predictor, server)
            results[entry] = {"engine": predictor.engine.name, "bundle": str(where), "rounds": []}
            server.wait_ready()
            asyncio.run(closed_loop([(server.url, "/v1/predict", {"tasks": tasks})], texts, 8, 64, 10, cfg.timeout_ms))
        at = dict.fromkeys(live, 0)
        for r in range(cfg.rounds):
            print(f"round {r}", flush=True)
            for engine, (predictor, server) in live.items():
                row, at[engine] = measure_round(engine, predictor, server, tasks, texts, cfg, at[engine])
                results[engine]["rounds"].append(row)
        for engine, (predictor, server) in live.items():
            out = results[engine]
            med = lambda key: statistics.median(x[key] for x in out["rounds"] if x[key] is not None)  # noqa: E731
            out.update({k: med(k) for k in ("in_process_texts_per_s", "http_texts_per_s", "ratio", "p50_ms", "p99_ms")})
            out["overload_2x"] = overload(engine, server, tasks, texts, cfg, out["http_texts_per_s"])
    finally:
        for engine, (_, server) in live.items():
            results[engine]["exit_code"] = server.stop()
    ran = {e: r for e, r in results.items() if "overload_2x" in r}
    summary: dict = {"ratio_http_over_in_process": {e: round(r["ratio"], 3) for e, r in ran.items()},
                     "aim_ratio": 0.8, "zero_5xx_at_2x": {e: r["overload_2x"]["n_5xx"] == 0 for e, r in ran.items()},
                     "refused": {e: r["refused"] for e, r in results.items() if "refused" in r}}
    if ran:
        fastest = max(ran, key=lambda e: ran[e]["http_texts_per_s"])
        summary["fastest_over_http"] = fastest
        if "torch" in ran:
            paired = lambda key: statistics.median(f[key] / t[key] for f, t in  # noqa: E731  (same round)
                                                   zip(ran[fastest]["rounds"], ran["torch"]["rounds"]))
            summary["fastest_vs_torch_over_http"] = paired("http_texts_per_s")
            summary["fastest_vs_torch_in_process"] = paired("in_process_texts_per_s")
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
