"""Serving benchmark: K tasks from one backbone pass vs K single-task servers vs no dynamic batching.

Usage:
    python benchmarks/serve_bench.py --bundle runs/quickstart/model            # full run, ~10 minutes
    python benchmarks/serve_bench.py --bundle PATH --quick                     # smoke run, ~3 minutes
    python benchmarks/serve_bench.py --bundle RUN --scenarios engines          # the engine axis, ~6 minutes

The engine axis (`--scenarios engines`, `serve_engines.py`) serves the bundle once per `--engines` entry and
measures, interleaved in one run, each engine in-process vs over HTTP (their ratio), p50/p99 and the 5xx
count at 2x overload; writes serve_bench_engines[_quick].json.

Every server is a real `mtlm serve` subprocess on 127.0.0.1 that this script starts, waits for (/ready)
and stops (SIGTERM). One scenario runs at a time. Scenarios, all over the bundle's K single-text tasks:

  mtlm         one request per text asking for all K tasks (one backbone pass per text)
  single_task  the baseline users have today: K servers, each over a copy of the bundle that keeps ONE
               head (the same backbone, so its inference cost equals a single-task model's), every text
               sent to all K; a text counts once all K answered. Each gets cores // K torch threads
               (--baseline-threads), so the K together use the machine as the one mtlm server does
  no_batching  mtlm with --max-batch-size 1
All servers run the same server code with the same --max-queue (default 256, so overload fills it).

Measurements, in this order, per scenario:
  closed loop  `--concurrency` (64) clients sending back-to-back: the saturation throughput X;
  open loop    Poisson arrivals (exponential gaps, seeded) at fractions of X: throughput, p50/p99 latency
               (from the scheduled send time, so queueing in the client counts), 429 rate;
then for mtlm an overload run at 2 X for `--overload-s` seconds: 5xx count, unanswered requests, 429
latency (client-side from the actual send, and server-side from its /metrics: the difference is socket
and event-loop queueing), resident memory over time. `Predictor.predict` in this process at batch 64
gives the engine's own throughput, the ceiling the server chases. The GEMM peak (square fp32 matmul, torch,
this process, before any server starts) and useful FLOP/s (real tokens only, encoder FLOPs
L * (8 n h^2 + 4 n h i + 4 n^2 h) per text of n tokens) give the utilisation. Throughput is texts/s with
all K tasks answered. The load generator shares the machine's CPUs with the servers (recorded).

Writes JSON (default benchmarks/results/serve_bench.json; --quick: serve_bench_quick.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

from http_load import HttpPool, Target, send_text
from machine import gemm_peak
from serve_stats import make_summary, summarize

ROOT = Path(__file__).resolve().parents[1]


# ---- bundles and texts -------------------------------------------------------------------------
def text_tasks(bundle: Path) -> list[str]:
    meta = json.loads((bundle / "tasks.json").read_text())
    return [n for n, t in meta["tasks"].items() if t["input_fields"] == ["text"]]


def single_task_bundle(bundle: Path, task: str, dest: Path) -> Path:
    """A copy of `bundle` keeping only `task`'s head; backbone/ is a symlink (same weights, same cost)."""
    from safetensors.torch import load_file, save_file
    dest.mkdir(parents=True)
    (dest / "backbone").symlink_to((bundle / "backbone").resolve(), target_is_directory=True)
    meta = json.loads((bundle / "tasks.json").read_text())
    meta["tasks"] = {task: meta["tasks"][task]}
    meta["name"] = f"{meta.get('name', 'mtlm')}-{task}"
    (dest / "tasks.json").write_text(json.dumps(meta, indent=2))
    heads = {k: v for k, v in load_file(bundle / "heads.safetensors").items() if k.split(".", 1)[0] == task}
    save_file(heads, dest / "heads.safetensors")
    if (bundle / "recipe.yaml").exists():
        shutil.copy(bundle / "recipe.yaml", dest / "recipe.yaml")
    return dest


def load_texts(bundle: Path, tasks: list[str], limit: int, seed: int, texts_file: str | None) -> list[str]:
    """Real texts: --texts FILE (one per line, or JSONL with "text"), else the bundle's own train sources."""
    texts: list[str] = []
    if texts_file:
        for line in Path(texts_file).read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts.append(json.loads(line)["text"] if line.lstrip().startswith("{") else line.strip())
    else:      # the train rows stored in the run's evaluation contract (paths relative to the run folder)
        from mtlm.contract import find_contract, load_split_rows
        meta = json.loads((bundle / "tasks.json").read_text())
        found = find_contract(bundle.parent)
        if found is None:
            raise SystemExit(f"{bundle.parent}: no contract.json (an old run): pass --texts FILE")
        rows = load_split_rows(*found, "train", tasks)
        for name in tasks:
            col = meta["tasks"][name]["config"].get("columns", {}).get("text", "text")
            texts += [r[col] for r in rows[name].records if isinstance(r.get(col), str) and r[col].strip()]
    random.Random(seed).shuffle(texts)
    if not texts:
        raise SystemExit("no texts found: pass --texts FILE")
    return texts[:limit]


def encoder_flops(bundle: Path, texts: list[str]) -> tuple[list[float], list[int]]:
    """Useful forward FLOPs and real token counts (truncated to max_length) per text."""
    from transformers import AutoConfig, AutoTokenizer
    meta = json.loads((bundle / "tasks.json").read_text())
    cfg = AutoConfig.from_pretrained(bundle / "backbone")
    tok = AutoTokenizer.from_pretrained(bundle / "backbone")
    lengths = [len(ids) for ids in tok(texts, truncation=True, max_length=int(meta["max_length"]))["input_ids"]]
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    return [L * (8 * n * h * h + 4 * n * h * i + 4 * n * n * h) for n in lengths], lengths


def engine_throughput(bundle: Path, tasks: list[str], texts: list[str], batch_size: int, max_s: float) -> float:
    """Texts/s of `Predictor.predict` in this process (no HTTP, no queue): the ceiling the server chases."""
    import mtlm
    predictor = mtlm.load(bundle)
    predictor.predict(texts[:batch_size], tasks, batch_size=batch_size)          # warm-up
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < max_s and done < len(texts):
        chunk = texts[done:done + 4 * batch_size]
        predictor.predict(chunk, tasks, batch_size=batch_size)
        done += len(chunk)
    return done / (time.perf_counter() - t0)


# ---- servers -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `mtlm serve` subprocess on loopback; samples its resident memory (incl. children) every 0.25 s."""

    def __init__(self, bundle: Path, args: list[str], threads: int, log_dir: Path, name: str,
                 command: list[str] | None = None, env: dict | None = None):
        """command: the program before BUNDLE (default `python -m mtlm.cli serve`); env: added variables."""
        self.port, self.name = free_port(), name
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "OMP_NUM_THREADS": str(threads), **(env or {})}
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "w")
        command = command or [sys.executable, "-m", "mtlm.cli", "serve"]
        self.proc = subprocess.Popen([*command, str(bundle), "--host",
                                      "127.0.0.1", "--port", str(self.port), *args],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.rss: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        ps = psutil.Process(self.proc.pid)
        while not self._stop.wait(0.25):
            try:
                rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            except psutil.Error:
                return
            self.rss.append((time.monotonic(), rss))

    def wait_ready(self, timeout_s: float = 180) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout_s} s")

    def stop(self) -> int | None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(timeout=10)
        self._stop.set()
        self._sampler.join(timeout=5)
        self._log.close()
        return rc

    def peak_rss_mb(self, since: float = 0.0) -> float:
        vals = [r for t, r in self.rss if t >= since]
        return max(vals) / 2 ** 20 if vals else float("nan")


# ---- load generation ---------------------------------------------------------------------------
def pools(targets: list[tuple[str, str, dict]], timeout_ms: float) -> list[Target]:
    return [(HttpPool(url, timeout_ms / 1000 + 10), path, extra) for url, path, extra in targets]


async def closed_loop(targets: list[tuple[str, str, dict]], texts: list[str], concurrency: int, max_texts: int,
                      max_s: float, timeout_ms: float) -> tuple[list[dict], float]:
    """`concurrency` clients, each sending its next text as soon as the previous one is answered."""
    records, counter, conns = [], iter(range(max_texts)), pools(targets, timeout_ms)
    start = time.monotonic()

    async def worker():
        for i in counter:
            if time.monotonic() - start > max_s:
                return
            t = time.monotonic()
            records.append({**await send_text(conns, texts[i % len(texts)], timeout_ms),
                            "scheduled": t, "i": i % len(texts)})
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    for pool, _, _ in conns:
        pool.close()
    return records, start


async def open_loop(targets: list[tuple[str, str, dict]], texts: list[str], rate: float, max_texts: int,
                    max_s: float, timeout_ms: float, seed: int) -> tuple[list[dict], float]:
    """Poisson arrivals at `rate` texts/s for at most `max_s` seconds / `max_texts` texts; a late sender
    fires at once (the gap is not skipped), so latency counts from the scheduled time."""
    rng, records, tasks, conns = random.Random(seed), [], [], pools(targets, timeout_ms)
    start, t = time.monotonic(), 0.0

    async def fire(i: int, scheduled: float):
        records.append({**await send_text(conns, texts[i % len(texts)], timeout_ms),
                        "scheduled": scheduled, "i": i % len(texts)})
    for i in range(max_texts):
        t += rng.expovariate(rate)
        if t > max_s:
            break
        delay = start + t - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(fire(i, start + t)))
    await asyncio.gather(*tasks)
    for pool, _, _ in conns:
        pool.close()
    return records, start


# ---- scenarios ---------------------------------------------------------------------------------
def start_servers(specs: list[tuple[Path, list[str], int, str]], log_dir: Path) -> list[Server]:
    servers = [Server(b, a, th, log_dir, name) for b, a, th, name in specs]
    try:
        for s in servers:
            s.wait_ready()
    except Exception:
        for s in servers:
            s.stop()
        raise
    return servers


def run_scenario(name: str, servers: list[Server], targets: list[tuple[str, str, dict]], texts: list[str],
                 flops: list[float], cfg: argparse.Namespace, overload: bool) -> dict:
    print(f"[{name}] closed loop, concurrency {cfg.concurrency}", flush=True)
    asyncio.run(closed_loop(targets, texts, 8, 32, 10, cfg.timeout_ms))          # client warm-up
    recs, start = asyncio.run(closed_loop(targets, texts, cfg.concurrency, cfg.max_texts, cfg.duration_s,
                                          cfg.timeout_ms))
    closed = summarize(recs, start, flops)
    sat = closed["throughput_texts_per_s"]
    print(f"  {sat:.1f} texts/s, p50 {closed['p50_ms']:.0f} ms, p99 {closed['p99_ms']:.0f} ms", flush=True)
    sweep = []
    for k, frac in enumerate(cfg.fractions):
        rate = max(0.5, frac * sat)
        recs, start = asyncio.run(open_loop(targets, texts, rate, cfg.max_texts, cfg.duration_s, cfg.timeout_ms,
                                            seed=cfg.seed + k))
        point = {"offered_texts_per_s": rate, "fraction_of_saturation": frac, **summarize(recs, start, flops)}
        sweep.append(point)
        print(f"  open loop {rate:7.1f}/s -> {point['throughput_texts_per_s']:7.1f}/s  p50 {point['p50_ms'] or 0:6.0f}"
              f" ms  p99 {point['p99_ms'] or 0:6.0f} ms  429 {point['rate_429']:.1%}", flush=True)
    out = {"servers": [s.name for s in servers], "closed_loop": {"concurrency": cfg.concurrency, **closed},
           "open_loop": sweep}
    if overload:
        rate = 2 * sat
        print(f"[{name}] overload at {rate:.1f} texts/s for {cfg.overload_s} s", flush=True)
        t_start = time.monotonic()
        recs, start = asyncio.run(open_loop(targets, texts, rate, 10 ** 7, cfg.overload_s, cfg.timeout_ms,
                                            seed=cfg.seed + 100))
        s = servers[0]
        series = [(t - t_start, r / 2 ** 20) for t, r in s.rss if t >= t_start]
        cut = min(60.0, cfg.overload_s / 3)           # growth after the first minute (or third of the run)
        early = max((r for t, r in series if t <= cut), default=float("nan"))
        late = max((r for t, r in series if t > cut), default=float("nan"))
        ov = {"offered_texts_per_s": rate, "duration_s": cfg.overload_s, **summarize(recs, start, flops),
              "unanswered": sum(r["status"] == "error" for r in recs),
              "rss_mb_first_part": early, "rss_mb_rest": late, "rss_growth_mb": late - early,
              "rss_series_mb": [(round(t, 2), round(r, 1)) for t, r in series[::4]]}
        ov["server_side_429"] = server_429_latency(s.url)
        ov["checks"] = {"zero_5xx": ov["n_5xx"] == 0, "all_accepted_answered": ov["n_error"] == 0,
                        "rejections_under_50ms": (ov["latency_429_p99_ms"] or 0) < 50,
                        "rss_flat": (late - early) < 50}
        out["overload"] = ov
        print(f"  ok {ov['ok']}  429 {ov['rate_429']:.1%}  5xx {ov['n_5xx']}  errors {ov['n_error']}  429 p99 "
              f"{ov['latency_429_p99_ms'] or 0:.1f} ms  rss {early:.0f} -> {late:.0f} MB", flush=True)
    out["peak_rss_mb"] = [round(s.peak_rss_mb(), 1) for s in servers]
    return out


def server_429_latency(url: str) -> dict:
    """From the server's /metrics: how many 429s, their mean arrival->response time and the share answered
    within 50 ms, as the server saw them (the client-side figure adds socket and event-loop queueing)."""
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(f"{url}/metrics", timeout=10).text
    samples = [x for f in text_string_to_metric_families(text) for x in f.samples
               if x.name.startswith("mtlm_request_seconds") and x.labels.get("status") == "429"]
    get = lambda name, **kw: next((x.value for x in samples if x.name == name  # noqa: E731
                                   and all(x.labels.get(k) == v for k, v in kw.items())), 0.0)
    count = get("mtlm_request_seconds_count")
    return {"count": count, "mean_ms": 1e3 * get("mtlm_request_seconds_sum") / count if count else None,
            "share_under_50ms": get("mtlm_request_seconds_bucket", le="0.05") / count if count else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="trained multi-task bundle or run folder")
    p.add_argument("--quick", action="store_true", help="seconds-long runs: a smoke test, not a measurement")
    p.add_argument("--out", help="JSON path (default benchmarks/results/serve_bench[_quick].json)")
    p.add_argument("--texts", help="texts file (one per line, or JSONL with 'text'); default: the bundle's data")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration-s", type=float, default=None, help="max seconds per load run (default 20; quick 3)")
    p.add_argument("--max-texts", type=int, default=None, help="max texts per load run (default 4000; quick 300)")
    p.add_argument("--overload-s", type=float, default=None, help="overload run length (default 30; quick 4)")
    p.add_argument("--p99-ms", type=float, default=1000.0, help="latency target for 'throughput at the same p99'")
    p.add_argument("--timeout-ms", type=float, default=30000.0)
    p.add_argument("--baseline-threads", type=int, default=None,
                   help="torch threads per single-task server (default: cores // K, at least 1)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="every server's --max-queue (inputs): small enough that the overload run fills it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scenarios", default="mtlm,single_task,no_batching",
                   help="comma-separated subset to run (the summary compares only what ran), or engines")
    p.add_argument("--engines", default="torch,onnx,onnx-int8,torch-bf16",
                   help="engine axis: engines to serve (one the machine or bundle cannot run is recorded as refused)")
    p.add_argument("--rounds", type=int, default=None, help="engine axis: interleaved rounds (default 3; quick 2)")
    p.add_argument("--slice-s", type=float, default=None, help="engine axis: seconds per slice (default 8; quick 3)")
    p.add_argument("--batch", type=int, default=64, help="engine axis: in-process batch = server --max-batch-size")
    p.add_argument("--engine-concurrency", type=int, default=None,
                   help="engine axis: closed-loop clients (default 2 x --batch)")
    cfg = p.parse_args()
    cfg.duration_s = cfg.duration_s or (3.0 if cfg.quick else 20.0)
    cfg.max_texts = cfg.max_texts or (300 if cfg.quick else 4000)
    cfg.overload_s = cfg.overload_s or (4.0 if cfg.quick else 30.0)
    cfg.fractions = [0.5, 1.0, 1.3] if cfg.quick else [0.25, 0.5, 0.75, 0.9, 1.0, 1.2]
    out_path = Path(cfg.out or ROOT / "benchmarks" / "results" / f"serve_bench{'_quick' if cfg.quick else ''}.json")
    cfg.engines = [e for e in cfg.engines.split(",") if e]
    cfg.rounds = cfg.rounds or (2 if cfg.quick else 3)
    cfg.slice_s = cfg.slice_s or (3.0 if cfg.quick else 8.0)
    cfg.engine_concurrency = cfg.engine_concurrency or 2 * cfg.batch

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # as the servers run (mtlm.serve.app); before torch
    from mtlm.checkpoint import find_bundle
    bundle = find_bundle(cfg.bundle).resolve()
    tasks = text_tasks(bundle)
    if not tasks:
        raise SystemExit(f"{bundle}: no single-text tasks to benchmark")
    texts = load_texts(bundle, tasks, 5000, cfg.seed, cfg.texts)
    wanted = cfg.scenarios.split(",")
    if "engines" in wanted:
        from serve_engines import run_engine_axis
        default = ROOT / "benchmarks" / "results" / f"serve_bench_engines{'_quick' if cfg.quick else ''}.json"
        run_engine_axis(bundle, tasks, texts, cfg, Path(cfg.out) if cfg.out and wanted == ["engines"] else default)
        if wanted == ["engines"]:
            return
    flops, lengths = encoder_flops(bundle, texts)
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cores = os.cpu_count() or 1
    peak = gemm_peak(repeats=5, device=device)["best_gflops"] * 1e9
    engine = engine_throughput(bundle, tasks, texts, 64, cfg.duration_s)
    print(f"bundle {bundle}: tasks {tasks}; {len(texts)} texts, mean {sum(lengths) / len(lengths):.1f} tokens; "
          f"GEMM peak {peak / 1e9:.0f} GFLOP/s ({device})", flush=True)
    base_threads = cfg.baseline_threads or max(1, cores // len(tasks))
    print(f"in-process Predictor.predict, batch 64: {engine:.1f} texts/s", flush=True)
    queue = ["--max-queue", str(cfg.max_queue)]

    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="mtlm-serve-bench-") as tmp:
        tmp = Path(tmp)
        singles = [single_task_bundle(bundle, t, tmp / f"single-{t}") for t in tasks]
        scenarios = [
            ("mtlm", [(bundle, queue, cores, "mtlm")], lambda s: [(s[0].url, "/v1/predict", {"tasks": tasks})], True),
            ("single_task", [(b, queue, base_threads, f"single-{t}") for b, t in zip(singles, tasks)],
             lambda s: [(srv.url, f"/v1/tasks/{t}/predict", {}) for srv, t in zip(s, tasks)], False),
            ("no_batching", [(bundle, [*queue, "--max-batch-size", "1"], cores, "mtlm-batch1")],
             lambda s: [(s[0].url, "/v1/predict", {"tasks": tasks})], False),
        ]
        for name, specs, make_targets, overload in [s for s in scenarios if s[0] in wanted]:
            t0 = time.monotonic()
            servers = start_servers(specs, tmp)
            print(f"[{name}] {len(servers)} server(s) ready in {time.monotonic() - t0:.1f} s", flush=True)
            try:
                results[name] = run_scenario(name, servers, make_targets(servers), texts, flops, cfg, overload)
            finally:
                results.setdefault(name, {})["exit_codes"] = [s.stop() for s in servers]

    summary = make_summary(results, cfg, peak, engine) if "mtlm" in results else {}
    report = {
        "benchmark": "serve_bench", "quick": cfg.quick, "bundle": str(bundle), "tasks": tasks,
        "machine": {"cpus": cores, "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "device": device, "load_generator_shares_cpus": True},
        "settings": {k: v for k, v in vars(cfg).items() if k not in ("bundle", "out")},
        "baseline_threads_per_server": base_threads, "mtlm_threads": cores,
        "texts": {"n": len(texts), "mean_tokens": sum(lengths) / len(lengths), "max_tokens": max(lengths)},
        "gemm_peak_flops_per_s": peak, "summary": summary, "scenarios": results,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
