"""Prometheus metrics of one server process (`GET /metrics`). Durations in seconds, as Prometheus expects.

Each app owns its own `CollectorRegistry`, so several apps in one process (tests) do not collide. With
`mtlm serve --workers N`, `serve()` sets PROMETHEUS_MULTIPROC_DIR and `/metrics` then sums every worker.
"""

from __future__ import annotations

import os

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)

_TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class ServeMetrics:
    """The server's counters, gauges and histograms; also the batcher's `Observer`."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("mtlm_requests", "Requests by requested task and HTTP status "
                                "(a request asking for 3 tasks counts once per task; task=none before "
                                "the task list was valid)", ["task", "status"], registry=r)
        self.predictions = Counter("mtlm_predictions", "Inputs answered, per task", ["task"], registry=r)
        self.request_seconds = Histogram("mtlm_request_seconds", "Arrival -> response of prediction requests, "
                                         "by HTTP status", ["status"], buckets=_TIME_BUCKETS, registry=r)
        self.queue_inputs = Gauge("mtlm_queue_inputs", "Inputs waiting for a batch", registry=r,
                                  multiprocess_mode="livesum")
        self.queue_tokens = Gauge("mtlm_queue_tokens", "Tokens waiting for a batch", registry=r,
                                  multiprocess_mode="livesum")
        self.queue_wait_seconds = Histogram("mtlm_queue_wait_seconds", "Enqueue -> batch start, per input",
                                            buckets=_TIME_BUCKETS, registry=r)
        self.tokenize_seconds = Histogram("mtlm_tokenize_seconds", "Tokenisation time per request",
                                          buckets=_TIME_BUCKETS, registry=r)
        self.forward_seconds = Histogram("mtlm_forward_seconds", "Backbone pass + heads + decoding, per batch",
                                         buckets=_TIME_BUCKETS, registry=r)
        self.batch_size = Histogram("mtlm_batch_size", "Inputs per backbone pass", buckets=_SIZE_BUCKETS,
                                    registry=r)
        self.batch_tokens = Histogram("mtlm_batch_tokens", "Padded tokens per backbone pass "
                                      "(inputs x longest input)", buckets=_TOKEN_BUCKETS, registry=r)
        self.real_tokens = Counter("mtlm_batch_real_tokens", "Real (unpadded) tokens run", registry=r)
        self.padded_tokens = Counter("mtlm_batch_padded_tokens", "Padded tokens run", registry=r)
        self.auth_rejected_total = Counter("mtlm_auth_rejected", "Requests refused with 401 for want of a valid API "
                                           "key, by reason: missing, malformed, invalid", ["reason"], registry=r)
        self.ready = Gauge("mtlm_ready", "1 once loaded and warmed up, 0 while loading or draining",
                           registry=r, multiprocess_mode="min")

    # ---- batcher Observer ----------------------------------------------------------------------
    def queue_depth(self, inputs: int, tokens: int) -> None:
        self.queue_inputs.set(inputs)
        self.queue_tokens.set(tokens)

    def queue_wait(self, seconds: float) -> None:
        self.queue_wait_seconds.observe(seconds)

    def batch(self, size: int, padded_tokens: int, real_tokens: int, forward_s: float) -> None:
        self.batch_size.observe(size)
        self.batch_tokens.observe(padded_tokens)
        self.real_tokens.inc(real_tokens)
        self.padded_tokens.inc(padded_tokens)
        self.forward_seconds.observe(forward_s)

    # ---- requests ------------------------------------------------------------------------------
    def request(self, tasks: list[str] | None, status: int, inputs: int = 0, seconds: float | None = None) -> None:
        """Count one finished prediction request (status: the HTTP status answered)."""
        for task in tasks or ["none"]:
            self.requests.labels(task=task, status=str(status)).inc()
            if status == 200 and inputs:
                self.predictions.labels(task=task).inc(inputs)
        if seconds is not None:
            self.request_seconds.labels(status=str(status)).observe(seconds)

    def auth_rejected(self, reason: str) -> None:
        """Count one 401 (reason: one of mtlm.serve.auth.REASONS; never the key)."""
        self.auth_rejected_total.labels(reason=reason).inc()

    def render(self) -> tuple[bytes, str]:
        """(exposition text, content type); all workers' values when PROMETHEUS_MULTIPROC_DIR is set."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
