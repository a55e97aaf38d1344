"""HTTP serving: every task of a bundle from one backbone pass per input, with dynamic micro-batching.

app.py (routes, `serve`) -> service.py (load, warm up, request path, drain) -> batcher.py (bounded queue,
micro-batches) -> runner.py (tokenizer and model threads); schemas.py (API models, limits), metrics.py;
ray.py: the same app in Ray Serve replicas (`mtlm serve --ray`, optional: imports ray).
`create_app(path)` returns the FastAPI app; `mtlm serve RUN` runs it under uvicorn."""

from __future__ import annotations


def create_app(source, settings=None, handle_signals: bool = False, api_keys=None):
    """The FastAPI app for a bundle path (see `mtlm.serve.app.create_app`)."""
    from mtlm.serve.app import create_app as _create_app
    return _create_app(source, settings, handle_signals, api_keys)
