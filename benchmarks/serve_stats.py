"""serve_bench's numbers: load-run records -> throughput / latency / rejection stats, and the issue's
comparisons between scenarios (ratios against the single-task and batch-1 servers, GEMM utilisation)."""

from __future__ import annotations

import collections
import math


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))]


def summarize(records: list[dict], start: float, flops: list[float] | None = None) -> dict:
    ok = [r for r in records if r["status"] == "ok"]
    end = max((r["done"] for r in records), default=start)
    elapsed = max(end - start, 1e-9)
    lat = [(r["done"] - r["scheduled"]) * 1e3 for r in ok]
    rej = [(r["done"] - r["sent"]) * 1e3 for r in records if r["status"] == "429"]
    out = {"texts": len(records), "ok": len(ok), "elapsed_s": round(elapsed, 3),
           "throughput_texts_per_s": len(ok) / elapsed,
           "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "max_ms": max(lat, default=None),
           "rate_429": sum(r["status"] == "429" for r in records) / max(1, len(records)),
           "n_5xx": sum(r["status"] == "5xx" for r in records), "n_4xx": sum(r["status"] == "4xx" for r in records),
           "n_error": sum(r["status"] == "error" for r in records),
           "errors": dict(collections.Counter(r["error"] for r in records if r["status"] == "error")),
           "latency_429_p99_ms": pct(rej, 99), "latency_429_max_ms": max(rej, default=None)}
    if flops is not None:
        out["useful_flops_per_s"] = sum(flops[r["i"]] for r in ok) / elapsed
    return out


def best_under_p99(result: dict, p99_ms: float) -> float:
    """Highest open-loop throughput with p99 <= p99_ms and < 1% rejected (0 if none)."""
    ok = [p["throughput_texts_per_s"] for p in result["open_loop"]
          if p["p99_ms"] is not None and p["p99_ms"] <= p99_ms and p["rate_429"] < 0.01 and p["n_5xx"] == 0]
    return max(ok, default=0.0)


def make_summary(results: dict, cfg, peak: float, engine: float) -> dict:
    """The issue's comparisons, from whichever scenarios ran ("mtlm" is required)."""
    m, st, nb = results["mtlm"], results.get("single_task"), results.get("no_batching")
    sat_flops = m["closed_loop"]["useful_flops_per_s"]
    summary = {
        "gemm_utilisation_at_saturation": {"useful_flops_per_s": sat_flops, "gemm_peak_flops_per_s": peak,
                                           "fraction": sat_flops / peak, "aim": 0.6},
        "overload_checks": m.get("overload", {}).get("checks"),
        "mtlm_peak_rss_mb": m["peak_rss_mb"][0], "rss_aim_mb": 1536,
        "server_vs_in_process_engine": {"engine_texts_per_s": engine,
                                        "ratio": m["closed_loop"]["throughput_texts_per_s"] / engine},
    }
    if st:
        summary["throughput_vs_single_task_at_p99"] = {
            "p99_ms": cfg.p99_ms, "mtlm": best_under_p99(m, cfg.p99_ms), "single_task": best_under_p99(st, cfg.p99_ms),
            "ratio": best_under_p99(m, cfg.p99_ms) / max(best_under_p99(st, cfg.p99_ms), 1e-9), "aim": 2.7}
        summary["saturation_vs_single_task"] = (m["closed_loop"]["throughput_texts_per_s"]
                                                / max(st["closed_loop"]["throughput_texts_per_s"], 1e-9))
    if nb:
        summary["batching_vs_batch1_at_concurrency"] = {
            "concurrency": cfg.concurrency, "ratio": m["closed_loop"]["throughput_texts_per_s"]
                                                     / max(nb["closed_loop"]["throughput_texts_per_s"], 1e-9),
            "aim": 3.0}
    return summary
