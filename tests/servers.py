"""A real `mtlm serve` subprocess on loopback for tests: started, waited for until /ready, stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(bundle: Path, log_dir: Path, *args: str, verbose: bool = False, env: dict | None = None,
                   scheme: str = "http", verify: bool | str = True, host: str = "127.0.0.1"):
    """Yields the base URL ("http://127.0.0.1:PORT") once /ready answers 200 (at most 90 s). The server's
    log (stdout + stderr) is `log_dir / "serve.log"`; `args` go after `serve BUNDLE`."""
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
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "server never became ready:\n" + log_path.read_text()
                try:
                    if httpx.get(f"{base}/ready", verify=verify, timeout=5).status_code == 200:
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
