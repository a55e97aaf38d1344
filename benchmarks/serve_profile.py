"""Where a saturated `mtlm serve` spends its CPU: py-spy samples of the server process (all its threads, on-CPU
only) while closed-loop clients keep it busy, each sample put in one category by its innermost mtlm / library
frame, as shares of all samples.

    python benchmarks/serve_profile.py --bundle runs/x-int8 --engine onnx-int8 --seconds 20

Categories (first match from the innermost frame outwards): engine (the engine's forward: onnxruntime's
`run`, torch modules), tokenize (tokenizers, `Runner.tokenize`), decode (the task types' decoding of logits),
http_json (uvicorn, starlette / fastapi, pydantic, json / orjson), batcher (`mtlm/serve/batcher.py`), other.
Writes benchmarks/results/serve_profile_<engine>[_<name>].json with the load average before and after (the
machine is shared: the load generator runs on the same cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CATEGORIES = (   # (category, substrings of a frame "function (file:line)"), tried per frame, innermost first
    ("engine", ("onnxruntime", "torch/nn/", "mtlm/engine.py", "transformers/")),
    ("tokenize", ("tokenizers", "tokenization_utils", "runner.py:tokenize", "(mtlm/encoded.py")),
    ("decode", ("mtlm/tasks/",)),
    ("http_json", ("uvicorn", "starlette", "fastapi", "pydantic", "json", "h11", "httptools")),
    ("batcher", ("mtlm/serve/batcher.py",)),
)


def category(stack: str) -> str:
    """The category of one collapsed stack ("frame;frame;...;innermost")."""
    for frame in reversed(stack.split(";")):
        for name, keys in CATEGORIES:
            if any(k in frame for k in keys):
                return name
    return "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--engine", default=None, help="the server's --engine (default: the bundle's default)")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--concurrency", type=int, default=128)
    p.add_argument("--name", default="", help="suffix of the results file")
    cfg = p.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from serve_bench import Server, closed_loop, load_texts, text_tasks
    from serve_stats import summarize

    from mtlm.checkpoint import find_bundle
    bundle = find_bundle(cfg.bundle).resolve()
    tasks = text_tasks(bundle)
    texts = load_texts(bundle, tasks, 5000, 0, None)
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mtlm-profile-") as tmp:
        server = Server(bundle, ["--engine", cfg.engine] if cfg.engine else [], os.cpu_count() or 1, Path(tmp), "prof")
        try:
            server.wait_ready()
            target = [(server.url, "/v1/predict", {"tasks": tasks})]
            asyncio.run(closed_loop(target, texts, 8, 64, 10, 30000))                     # warm-up
            raw = Path(tmp) / "stacks.txt"
            spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(server.proc.pid),
                                    "--duration", str(int(cfg.seconds)), "--format", "raw", "--output", str(raw),
                                    "--subprocesses", "--native"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)
            recs, start = asyncio.run(closed_loop(target, texts, cfg.concurrency, 10 ** 7, cfg.seconds, 30000))
            err = spy.communicate(timeout=120)[1].decode()
        finally:
            server.stop()
        if not raw.is_file():
            raise SystemExit(f"py-spy wrote nothing: {err.strip()}")
        counts: Counter = Counter()
        frames: Counter = Counter()
        for line in raw.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            counts[category(stack)] += int(n)
            frames[stack.split(";")[-1]] += int(n)
    total = sum(counts.values()) or 1
    http = summarize(recs, start)
    result = {"benchmark": "serve_profile", "bundle": str(bundle), "engine": cfg.engine or "default",
              "http_texts_per_s": http["throughput_texts_per_s"], "samples": total,
              "share": {k: round(v / total, 4) for k, v in counts.most_common()},
              "top_frames": [[f, round(n / total, 4)] for f, n in frames.most_common(15)],
              "loadavg": {"start": load0, "end": os.getloadavg()}, "concurrency": cfg.concurrency,
              "seconds": cfg.seconds}
    out = ROOT / "benchmarks" / "results" / f"serve_profile_{cfg.engine or 'default'}{'_' + cfg.name if cfg.name else ''}.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("http_texts_per_s", "samples", "share", "loadavg")}, indent=2))
    print("\n".join(f"{n:7.2%}  {f}" for f, n in result["top_frames"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
