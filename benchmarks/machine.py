"""What the benchmarks measure about the machine itself: GEMM peak, CPU model and flags, memory high-water
mark, CPU contention. Shared by train_throughput.py and serve_bench.py (run as scripts from this folder)."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path


def gemm_peak(n: int = 2048, repeats: int = 10, device: str = "cpu") -> dict:
    """fp32 n^3 matmul throughput in GFLOP/s: median and best of `repeats` timed runs after 3 warm-ups."""
    import torch
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)

    def once() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for _ in range(3):
        once()
    times = [once() for _ in range(repeats)]
    flops = 2.0 * n ** 3
    return {"n": n, "device": device, "median_gflops": flops / statistics.median(times) / 1e9,
            "best_gflops": flops / min(times) / 1e9, "repeats": repeats}


def vm_hwm_kb() -> int:
    """Peak resident memory of this process, kB (VmHWM; ru_maxrss where /proc is missing)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_hwm() -> bool:
    """Reset VmHWM to the current resident size (Linux clear_refs 5). Returns whether it worked."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def contention() -> dict:
    """Load average and CPU pressure (PSI 'some': share of time runnable tasks waited for a CPU)."""
    out = {"loadavg_1m": os.getloadavg()[0]}
    try:
        for line in Path("/proc/pressure/cpu").read_text().splitlines():
            if line.startswith("some"):
                fields = dict(f.split("=") for f in line.split()[1:])
                out["cpu_pressure_avg10"] = float(fields["avg10"]) / 100
                out["cpu_pressure_avg60"] = float(fields["avg60"]) / 100
    except (OSError, KeyError, ValueError):
        pass
    return out


def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The vector / matrix ISA flags that decide fp32 and bf16 speed (avx2, fma, avx512*, amx*)."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2", "fma")))
