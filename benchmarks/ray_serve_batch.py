"""The alternative serve_ray.py measures against: Ray's own `@serve.batch` instead of mtlm's batcher.

Usage (started by benchmarks/serve_ray.py, stopped with SIGTERM):
    python benchmarks/ray_serve_batch.py BUNDLE --host 127.0.0.1 --port 8000 [--replicas N] [--tasks a,b]

Each replica loads the bundle with `mtlm.load` and answers POST /v1/predict {"inputs": [text, ...]} with every
task in --tasks from one backbone pass per text; concurrent requests are batched by `@serve.batch`
(`max_batch_size`, `batch_wait_timeout_s`) and one `Predictor.predict` call (length-sorted passes) per batch,
in a thread. `max_ongoing_requests` is raised to the batch size (Ray's default 5 would cap every batch at 5;
/work/shared/ENGINES.md). It is a benchmark baseline only: no limits, no 429, no API schema checks."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
from pathlib import Path

import orjson
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@serve.deployment
class ServeBatch:
    def __init__(self, bundle: str, tasks: list[str], threads: int, max_batch_size: int, wait_s: float):
        import torch

        import mtlm
        torch.set_num_threads(threads)
        self.predictor, self.tasks = mtlm.load(bundle), tasks
        self.predict_batch.set_max_batch_size(max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(wait_s)
        self.predictor.predict(["Warm-up sentence for the first batch."], tasks)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def predict_batch(self, texts: list[str]) -> list[dict]:
        return await asyncio.to_thread(self.predictor.predict, texts, self.tasks, len(texts))

    async def __call__(self, request: Request) -> Response:
        if request.url.path == "/ready":
            return Response(b'{"status":"ready"}', media_type="application/json")
        body = await request.json()
        results = await asyncio.gather(*(self.predict_batch(t) for t in body["inputs"]))
        return Response(orjson.dumps({"predictions": results}, option=orjson.OPT_SERIALIZE_NUMPY),
                        media_type="application/json")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("bundle")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--tasks", required=True, help="comma-separated tasks every text gets")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    cfg = p.parse_args()
    from mtlm.checkpoint import find_bundle
    from mtlm.serve.ray import start_ray, stop_ray
    threads = max(1, (os.cpu_count() or 1) // cfg.replicas)
    app = ServeBatch.options(
        num_replicas=cfg.replicas, max_ongoing_requests=cfg.max_batch_size,
        ray_actor_options={"num_cpus": threads, "runtime_env": {"env_vars": {
            "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
            **{k: os.environ[k] for k in ("HF_HUB_OFFLINE", "PYTHONPATH") if k in os.environ}}}},
    ).bind(str(find_bundle(cfg.bundle).resolve()), cfg.tasks.split(","), threads, cfg.max_batch_size,
           cfg.max_wait_ms / 1000)
    start_ray()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        from ray.serve._private import api as serve_api       # as mtlm.serve.ray.serve_ray: a slow proxy start
        serve_api.HTTP_PROXY_TIMEOUT = max(serve_api.HTTP_PROXY_TIMEOUT, 600)
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(app, name="serve_batch", route_prefix="/", blocking=False)
        print("ready", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        stop_ray()


if __name__ == "__main__":
    main()
