"""Measure engines side by side on the same real texts: throughput, latency, size on disk, peak memory, and
the CPU instruction-set flags the results depend on.

Throughput and latency of every engine are measured in one process, interleaved round by round (the speed
of a shared machine drifts), on the encoded rows of real texts (a bundle's dev rows): texts/s at batch 32
with every head computed, and the median (p50) seconds of a batch-1 call. Peak resident memory is measured
in a fresh process per engine (VmHWM of a process that loads only that engine and runs the batch-32 pass),
so one engine's weights do not count for another.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from mtlm.data import length_sorted_batches
from mtlm.encoded import ModelInputs
from mtlm.engine import Engine, ONNX_DIR, ONNX_FILES
from mtlm.tasks.base import pad_inputs

ISA_PREFIXES = ("avx2", "fma", "avx512", "amx", "avx_vnni")


def cpu_flags() -> list[str]:
    """The vector / matrix instruction-set flags of this CPU that decide int8 and bf16 speed (avx2, fma,
    avx512* incl. avx512_vnni / avx512_bf16, amx*), from /proc/cpuinfo ([] where it is missing)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(ISA_PREFIXES))
    except OSError:
        pass
    return []


def model_rows(features: dict[str, list[dict]], limit: int | None = None) -> list[dict]:
    """The backbone rows ({input_ids, token_type_ids?}) of encoded features of every task, in task order, at
    most `limit` (multi-row features such as multiple choice contribute their rows)."""
    rows = []
    for feats in features.values():
        for f in feats:
            seqs = f.get("sequences") or [f]
            rows.extend({k: s[k] for k in ("input_ids", "token_type_ids") if k in s} for s in seqs)
    return rows[:limit] if limit else rows


def batches(rows: list[dict], batch_size: int, pad_token_id: int) -> list[ModelInputs]:
    """Length-sorted padded batches of `rows` (as the predictor forms them)."""
    return [ModelInputs.from_dict(pad_inputs([rows[i] for i in idx], pad_token_id))
            for idx in length_sorted_batches([len(r["input_ids"]) for r in rows], batch_size)]


def speed(engines: dict[str, Engine], tasks: list[str], rows: list[dict], pad_token_id: int, rounds: int = 3,
          latency_rows: int = 48, batch_size: int = 32) -> dict[str, dict]:
    """{engine: {"texts_per_s": median over `rounds` passes over `rows` at `batch_size`, every head in
    `tasks`; "p50_latency_ms": median batch-1 call over the first `latency_rows` rows}}. Engines alternate
    within each round, after one warm-up pass each."""
    big, one = batches(rows, batch_size, pad_token_id), batches(rows[:latency_rows], 1, pad_token_id)
    rates: dict[str, list[float]] = {n: [] for n in engines}
    lat: dict[str, list[float]] = {n: [] for n in engines}
    for engine in engines.values():
        for b in big[:2] + one[:2]:
            engine.run(b, tasks)
    for _ in range(rounds):
        for name, engine in engines.items():
            t = time.perf_counter()
            for b in big:
                engine.run(b, tasks)
            rates[name].append(len(rows) / (time.perf_counter() - t))
            for b in one:
                t = time.perf_counter()
                engine.run(b, tasks)
                lat[name].append(time.perf_counter() - t)
    return {n: {"texts_per_s": statistics.median(rates[n]), "p50_latency_ms": 1000 * statistics.median(lat[n]),
                "texts": len(rows), "batch_size": batch_size, "rounds": rounds} for n in engines}


def size_on_disk(bundle: Path, engine: str) -> int:
    """Bytes an engine's weights take in `bundle`: the ONNX graph file for ONNX engines; the backbone
    safetensors plus heads (and private layers, when any) for torch engines (tokenizer and config files are
    shared and left out)."""
    bundle = Path(bundle)
    if engine in ONNX_FILES:
        path = bundle / ONNX_DIR / ONNX_FILES[engine]
        return path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))
    files = [bundle / "backbone" / "model.safetensors", bundle / "heads.safetensors", bundle / "private_layers.safetensors"]
    return sum(p.stat().st_size for p in files if p.is_file())


def peak_memory_mb(bundle: Path, engine: str, rows: list[dict], pad_token_id: int, batch_size: int = 32,
                   timeout_s: float = 600) -> float | None:
    """Peak resident memory (MiB, VmHWM) of a fresh Python process that loads only `engine` from `bundle`
    (no torch model for ONNX engines) and runs `rows` once at `batch_size`. None when it cannot be measured
    (no /proc, or the process failed)."""
    if not Path("/proc/self/status").is_file():
        return None
    ids = json.dumps({"rows": [{k: np.asarray(v).tolist() for k, v in r.items()} for r in rows],
                      "pad": pad_token_id, "batch_size": batch_size})
    code = ("import sys; from mtlm.measure import _memory_worker; _memory_worker(sys.argv[1], sys.argv[2])")
    done = subprocess.run([sys.executable, "-c", code, str(bundle), engine], input=ids, capture_output=True,
                          text=True, timeout=timeout_s)
    if done.returncode != 0:
        return None
    return float(done.stdout.strip().splitlines()[-1]) / 1024


def _memory_worker(bundle: str, engine: str) -> None:
    """Child of `peak_memory_mb`: read rows from stdin, load the engine, run, print VmHWM in kB."""
    import torch

    from mtlm.engine import make_engine
    spec = json.loads(sys.stdin.read())
    model = None
    tasks = list(json.loads((Path(bundle) / "tasks.json").read_text(encoding="utf-8"))["tasks"])
    if engine not in ONNX_FILES:
        from mtlm.checkpoint import load_bundle
        model = load_bundle(bundle, "cpu")[0]
    runner = make_engine(engine, model, torch.device("cpu"), Path(bundle))
    rows = [{k: np.asarray(v, dtype=np.int64) for k, v in r.items()} for r in spec["rows"]]
    for b in batches(rows, spec["batch_size"], spec["pad"]):
        runner.run(b, tasks)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            print(line.split()[1])
