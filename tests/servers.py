"""For server tests: a small bundle (`fit_bundle`) and a real `mtlm serve` subprocess on loopback
(`running_server`: started, waited for until /ready, stopped)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx


def fit_bundle(d: Path, backbone: str, tasks: dict) -> Path:
    """Train `tasks` (recipe task entries) for 2 steps on `backbone` in folder `d`; returns the bundle."""
    import mtlm
    from conftest import write_recipe
    recipe = {"name": d.name, "backbone": backbone, "max_length": 32, "output_dir": str(d / "run"), "tasks": tasks,
              "train": {"batch_size": 8, "max_steps": 2, "eval_every": 2, "lr": 1e-3, "warmup_ratio": 0.0}}
    return Path(mtlm.fit(mtlm.load_recipe(write_recipe(d / "recipe.yaml", recipe)), progress=False)) / "model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(bundle: Path, log_dir: Path, *args: str, verbose: bool = False, env: dict | None = None,
                   scheme: str = "http", verify=True, host: str = "127.0.0.1", headers: dict | None = None,
                   ready_timeout_s: float = 90):
    """Yields the base URL ("http://127.0.0.1:PORT") once every worker is ready: /ready answers 200 and
    /metrics' mtlm_ready (the minimum over workers) is 1; at most `ready_timeout_s`. The server's log (stdout + stderr)
    is `log_dir / "serve.log"`; `args` go after `serve BUNDLE`; `verify`: httpx's (an ssl.SSLContext for a
    self-signed certificate); `headers` go with the /metrics request (an API key)."""
    port = free_port()
    base = f"{scheme}://127.0.0.1:{port}"
    log_path = log_dir / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           **(env or {})}
    cmd = [sys.executable, "-m", "mtlm.cli", *(["-v"] if verbose else []), "serve", str(bundle),
           "--host", host, "--port", str(port), *args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + ready_timeout_s
            while True:
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "server never became ready:\n" + log_path.read_text()
                try:
                    if (httpx.get(f"{base}/ready", verify=verify, timeout=5).status_code == 200
                            and re.search(r"^mtlm_ready 1\.0$", httpx.get(f"{base}/metrics", verify=verify, timeout=5,
                                                                        headers=headers).text, re.M)):
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            yield base
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text output (0.0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0
