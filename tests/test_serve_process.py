"""`mtlm serve` as real processes on 127.0.0.1: uvicorn drains on SIGTERM, --workers 2 answers and sums its
/metrics, a bundle that cannot load exits 2 (split from test_serve.py, whose in-process tests share the bundle)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from servers import free_port, metric
from test_serve import TEXTS, bundle  # noqa: F401  (the session's tiny bundle fixture)


def test_uvicorn_subprocess_drains_on_sigterm(bundle, tmp_path):
    """A real `mtlm serve` on loopback: requests in flight when SIGTERM arrives are all answered, then the
    process exits 0 and the port is closed."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "mtlm.cli", "serve", str(bundle), "--host", "127.0.0.1",
                             "--port", str(port), "--max-wait-ms", "600"], stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    try:
        async def main():
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                deadline = time.monotonic() + 60
                while True:
                    assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                    assert time.monotonic() < deadline, "server never became ready"
                    try:
                        if (await client.get("/ready")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.2)
                posts = [asyncio.create_task(client.post("/v1/predict", json={"inputs": [t], "tasks": ["topic"]}))
                         for t in TEXTS]
                await asyncio.sleep(0.25)                 # in the batcher's 600 ms wait
                proc.send_signal(signal.SIGTERM)
                responses = await asyncio.gather(*posts)
                assert [r.status_code for r in responses] == [200] * len(TEXTS)
                assert all(r.json()["timing"]["batch_size"] == len(TEXTS) for r in responses)

        asyncio.run(main())
        assert proc.wait(timeout=30) == 0, (tmp_path / "serve.log").read_text()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def _start_server(bundle, tmp_path, *args):
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "mtlm.cli", "serve", str(bundle), "--host", "127.0.0.1",
                             "--port", str(port), *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    return proc, f"http://127.0.0.1:{port}", log


def test_two_workers_answer_and_metrics_sum_both(bundle, tmp_path):
    """`mtlm serve --workers 2`: two processes, each loads and warms up its own model (2 warm-up batches
    each); /metrics from any worker sums both, so it counts 4 warm-up batches and every request."""
    proc, base, log = _start_server(bundle, tmp_path, "--workers", "2", "--max-wait-ms", "0")
    try:
        async def main():
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                deadline = time.monotonic() + 120
                # both workers warmed up (2 batches each, summed) AND ready: a worker sets ready only after its
                # warm-up, input-cost measurement and gc.collect/freeze, so the batch count alone raced it
                while True:
                    assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                    assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                    try:
                        m = (await client.get("/metrics")).text
                        if metric(m, "mtlm_batch_size_count") == 4 and metric(m, "mtlm_ready") == 1:
                            break
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.3)
                workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                assert len(workers) >= 2
                for t in TEXTS:
                    r = await client.post("/v1/predict", json={"inputs": [t], "tasks": ["topic"]})
                    assert r.status_code == 200, r.text
                m = (await client.get("/metrics")).text
                assert metric(m, "mtlm_requests_total", task="topic", status="200") == len(TEXTS)
                assert metric(m, "mtlm_batch_size_count") == 4 + len(TEXTS)
                assert metric(m, "mtlm_ready") == 1

        asyncio.run(main())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def test_serve_exits_on_a_bundle_that_cannot_load(bundle, tmp_path):
    """`mtlm serve` on a bundle whose heads do not match tasks.json exits 2 with the reason (naming the
    task and tensors), no traceback, instead of running with /ready 503 forever."""
    import shutil
    from safetensors.torch import load_file, save_file
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    save_file({k: v for k, v in load_file(broken / "heads.safetensors").items() if not k.startswith("topic.")},
              broken / "heads.safetensors")
    proc, base, log = _start_server(broken, tmp_path)
    try:
        assert proc.wait(timeout=60) == 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
    out = (tmp_path / "serve.log").read_text()
    assert "error:" in out and "task 'topic'" in out and "topic.out.weight" in out and "Traceback" not in out, out
