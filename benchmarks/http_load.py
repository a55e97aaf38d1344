"""The load generator of serve_bench.py: a keep-alive HTTP/1.1 client on asyncio streams, and one text
sent to every target server at once."""

from __future__ import annotations

import asyncio
import json
import time

import httpx


class HttpPool:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams, for the load only (httpx does the control
    calls). httpx cost 1.8 ms of CPU per request at concurrency 1 and 5.9 ms at 64 on this 2-core machine,
    which would measure the client instead of the server; this costs a small fraction of that."""

    def __init__(self, base_url: str, timeout_s: float):
        url = httpx.URL(base_url)
        self.host, self.port, self.timeout_s = url.host, url.port, timeout_s
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, payload: dict) -> int:
        """POST JSON; returns the status. Raises OSError / asyncio.TimeoutError / ConnectionError."""
        body = json.dumps(payload).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        for attempt in range(2):
            # A reused connection may have been closed by the server's keep-alive timeout (5 s in uvicorn)
            # before the request reached it: the server never saw that request, so retry once on a NEW
            # connection (a second idle one can be just as stale once latencies pass 5 s under overload).
            reused = bool(self.idle) and attempt == 0
            conn = self.idle.pop() if reused else await asyncio.open_connection(self.host, self.port)
            try:
                return await asyncio.wait_for(self._exchange(conn, head + body), self.timeout_s)
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                conn[1].close()
                if not reused or attempt:
                    raise ConnectionError(str(e)) from None
        raise AssertionError("unreachable")

    async def _exchange(self, conn, request: bytes) -> int:
        reader, writer = conn
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status, length, close = int(head[9:12]), 0, False
        for line in head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            key = key.strip().lower()
            if key == b"content-length":
                length = int(value)
            elif key == b"connection" and value.strip().lower() == b"close":
                close = True
        await reader.readexactly(length)
        if close:
            writer.close()
        else:
            self.idle.append(conn)
        return status

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


Target = tuple[HttpPool, str, dict]     # (connection pool of a server, path, extra JSON fields)


async def send_text(targets: list[Target], text: str, timeout_ms: float) -> dict:
    """Send one text to every target at once. status: ok | 429 | 5xx | 4xx | error (transport/timeout)."""
    t0 = time.monotonic()

    async def one(pool: HttpPool, path: str, extra: dict) -> str:
        try:
            code = await pool.post(path, {"inputs": [text], "timeout_ms": timeout_ms, **extra})
        except asyncio.TimeoutError:
            return "error:timeout"
        except (OSError, ConnectionError) as e:
            return f"error:{type(e).__name__}: {e}"[:120]
        return "ok" if code == 200 else "429" if code == 429 else f"{code // 100}xx"

    statuses = await asyncio.gather(*(one(*t) for t in targets))
    errors = [s for s in statuses if s.startswith("error:")]
    if errors:
        return {"status": "error", "error": errors[0][6:], "sent": t0, "done": time.monotonic()}
    for s in ("5xx", "4xx", "429"):
        if s in statuses:
            return {"status": s, "sent": t0, "done": time.monotonic()}
    return {"status": "ok", "sent": t0, "done": time.monotonic()}
