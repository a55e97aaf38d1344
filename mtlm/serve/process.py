"""Running the app: `mtlm serve` under uvicorn (one process, or --workers N processes that each build the
app from the environment through `app_from_env`), with the bundle loaded before the server listens."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
from typing import TYPE_CHECKING

from fastapi import FastAPI

from mtlm.serve.app import create_app
from mtlm.serve.auth import ENV_AUTH, APIKeys, access_from_args
from mtlm.serve.schemas import ServeSettings

if TYPE_CHECKING:     # torch is imported only when an app is created: serve() must set OMP_* first
    from mtlm.predict import Predictor

log = logging.getLogger("mtlm.serve")

ENV_BUNDLE = "MTLM_SERVE_BUNDLE"       # bundle path for app_from_env (set by serve() for its workers)
ENV_SETTINGS = "MTLM_SERVE_SETTINGS"   # ServeSettings as JSON

_PRELOADED: dict[str, Predictor] = {}   # bundle path -> the Predictor serve() loaded in this process


def app_from_env() -> FastAPI:
    """uvicorn factory for `serve()`'s worker processes: the bundle, settings and API key digests come from
    the environment (MTLM_SERVE_BUNDLE, MTLM_SERVE_SETTINGS as JSON, MTLM_SERVE_AUTH). With one worker the app
    serves the Predictor that `serve()` already loaded in this process."""
    settings = ServeSettings.model_validate_json(os.environ.get(ENV_SETTINGS) or "{}")
    bundle = os.environ[ENV_BUNDLE]
    predictor = _PRELOADED.pop(bundle, None)
    return create_app(bundle if predictor is None else (lambda: predictor), settings, handle_signals=True,
                      api_keys=APIKeys.from_env(os.environ.get(ENV_AUTH)))


def serve(args) -> None:
    """`mtlm serve`: run the app under uvicorn until SIGTERM/SIGINT, then drain and exit.

    args: run, host, port, workers and `setting_<name>` for each ServeSettings field (argparse; None = the
    default); optional: api_keys (list), api_key_file, open_metrics, open_docs, ssl_certfile, ssl_keyfile,
    verbose. The bundle is loaded before the server listens, so one that cannot load (not a bundle, heads
    that do not match tasks.json, ...) raises mtlm.checkpoint.BundleError here (`mtlm serve` exits 2 with the
    reason) instead of a server whose /ready stays 503; with --workers N each worker then loads its own copy.
    Raises pydantic.ValidationError for a setting out of range, mtlm.serve.auth.AccessConfigError for a bad
    key source or TLS file."""
    # OpenMP threads that spin-wait between ops steal the CPU the event loop and tokenizer need (measured
    # here: 6x the server CPU per request). Set before torch is first imported, i.e. before mtlm.checkpoint.
    if "torch" in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
        log.warning("torch was imported before serve(): OMP_WAIT_POLICY=PASSIVE cannot apply")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import uvicorn

    from mtlm.checkpoint import find_bundle
    from mtlm.predict import load

    api_keys = access_from_args(args)        # a bad key file or TLS file fails before the model loads
    certfile, keyfile = getattr(args, "ssl_certfile", None), getattr(args, "ssl_keyfile", None)
    bundle = find_bundle(args.run).resolve()
    workers = max(1, int(args.workers))
    settings = ServeSettings(**{name: getattr(args, f"setting_{name}") for name in ServeSettings.model_fields
                                if getattr(args, f"setting_{name}", None) is not None})
    if workers > 1:
        settings.torch_threads = max(1, (os.cpu_count() or 1) // workers)
    if settings.torch_threads:          # before the load: an ONNX Runtime session takes its threads when created
        import torch
        torch.set_num_threads(settings.torch_threads)
    predictor = load(bundle, None, settings.engine)     # the engine asked for (default: the fastest that passes)
    if workers == 1:                    # uvicorn runs the app in this process: serve this copy
        _PRELOADED[str(bundle)] = predictor
    del predictor
    metrics_dir = None
    if workers > 1:
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):    # /metrics then sums every worker
            metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="mtlm-prometheus-")
    os.environ[ENV_BUNDLE], os.environ[ENV_SETTINGS] = str(bundle), settings.model_dump_json()
    os.environ.pop(ENV_AUTH, None)
    if api_keys is not None:       # only digests reach the workers' environment
        os.environ[ENV_AUTH] = api_keys.to_env()
    scheme = "https" if certfile else "http"
    log.info("serving %s on %s://%s:%d with %d worker(s)", bundle, scheme, args.host, args.port, workers)
    # uvicorn re-raises the SIGTERM it drained on once it is done; exit 0 then, as after any clean stop
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        verbose = bool(getattr(args, "verbose", False))
        uvicorn.run("mtlm.serve.process:app_from_env", factory=True, host=args.host, port=args.port,
                    workers=workers, access_log=verbose, log_level="debug" if verbose else "info",
                    ssl_certfile=certfile, ssl_keyfile=keyfile)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
