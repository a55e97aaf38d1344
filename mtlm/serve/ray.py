"""Ray Serve: `mtlm serve RUN --ray` and `deployment(run, ...)`, the same app as `mtlm serve` in each replica.

Each replica builds the very FastAPI app `mtlm.serve.app.create_app` returns (routes, schemas, limits,
error codes, API keys, /metrics), with its own `Service`: one backbone pass per input for all its tasks,
and mtlm's own batcher across the requests the replica holds (measured faster than Ray's `@serve.batch`
here: benchmarks/serve_ray.py). Ray's proxy routes requests to replicas; the app is the replica's
ingress through `@serve.ingress` with a late-built app (`__serve_build_asgi_app__`, Ray >= 2.50), so the
app is built, loaded and warmed up inside the replica before Ray routes it any traffic.

Overload: Ray answers 503 when its own queue in front of the replicas is full (`max_queued_requests`),
so the replicas must be the ones to refuse. Ray's `max_ongoing_requests` is set `ADMISSION_MARGIN` above
the replica's own limit, every request reaches a replica, and the replica answers 429 with Retry-After
when its batcher's queue is full (`max_queue`) or it already holds `max_ongoing` requests.
/ready is the answering replica's state; `check_health` fails a replica whose model failed to load or
whose batching loop died, and Ray replaces it. Follows the Ray Serve guide, "Set Up FastAPI and HTTP"
and "Configure Ray Serve deployments" (docs.ray.io, Ray 2.60).

This module imports ray: only `mtlm serve --ray` and users of `deployment` import it."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

from ray import serve

from mtlm.serve.app import _error
from mtlm.serve.auth import APIKeys
from mtlm.serve.schemas import ServeSettings

log = logging.getLogger("mtlm.serve")

# Keep Ray on loopback and quiet (/work/shared/ENGINES.md: the node-ip argument alone is not enough).
# On this shared 2-core machine at load average 7-9, a local Ray started at `nice` needed minutes: the
# controller's proxy readiness check (5 s by default) killed the proxy before it ever answered, and
# `serve.start` gave up on it after 60 s (a constant in ray.serve._private.api). Give both 10 minutes.
PROXY_START_TIMEOUT_S = 600
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60"}
ADMISSION_MARGIN = 64     # Ray's max_ongoing_requests over the replica's own limit: the excess gets its 429
APP_NAME = "mtlm"


class DeployError(RuntimeError):
    """The replicas did not start (the bundle failed to load in a replica, or Ray could not place them)."""


class Admission:
    """Pure ASGI in front of the app in a replica: counts the replica's in-flight predict requests and answers
    429 (Retry-After: the batcher's estimate, seconds) beyond `max_ongoing`; drops the app's X-Request-ID
    response header, which Ray's proxy adds itself (the same id: the proxy passes it in the request)."""

    def __init__(self, app, max_ongoing: int, api_keys: APIKeys | None = None):
        """api_keys: a request these refuse goes to the app (its 401) rather than learning of the load."""
        self.app, self.max_ongoing, self.api_keys, self.ongoing = app, max_ongoing, api_keys, 0
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_once(message):
            if message["type"] == "http.response.start":
                message["headers"] = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
            await send(message)

        if scope["method"] != "POST" or not scope["path"].endswith("/predict"):
            return await self.app(scope, receive, send_once)
        if self.ongoing >= self.max_ongoing and (
                self.api_keys is None
                or self.api_keys.reject(scope["path"], dict(scope["headers"]).get(b"authorization")) is None):
            service = self.app.state.service
            service.metrics.request(None, 429)
            retry = service.batcher.retry_after() if service.batcher is not None else 1
            rid = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1") or None
            response = _error(429, f"replica busy ({self.ongoing} requests in flight, limit {self.max_ongoing})",
                              rid, {"Retry-After": str(retry)})
            return await response(scope, receive, send_once)
        self.ongoing += 1
        try:
            await self.app(scope, receive, send_once)
        finally:
            self.ongoing -= 1


@serve.deployment
@serve.ingress()
class MtlmReplica:
    """One replica: the bundle's app, loaded and warmed up before Ray routes traffic to it.

    bundle: the bundle folder (every replica's node must see it at this path); settings: ServeSettings as
    JSON; auth: `APIKeys.to_env()` (key digests) or None; max_ongoing: predict requests in flight before
    429; ready_timeout_s: load + warm-up limit (the replica fails and Ray retries after it)."""

    async def __init__(self, bundle: str, settings: str, auth: str | None, max_ongoing: int,
                       ready_timeout_s: float = 600.0):
        self.bundle, self.settings = bundle, ServeSettings.model_validate_json(settings)
        self.api_keys, self.max_ongoing, self.ready_timeout_s = APIKeys.from_env(auth), max_ongoing, ready_timeout_s
        self.service = None

    async def __serve_build_asgi_app__(self):
        from mtlm.serve.app import create_app
        if self.settings.torch_threads:
            import torch
            torch.set_num_threads(self.settings.torch_threads)
        app = create_app(self.bundle, self.settings, api_keys=self.api_keys)
        self.service = app.state.service
        await self.service.start()             # the app's lifespan start (run by Ray next) is then a no-op
        await self.service.wait_ready(self.ready_timeout_s)
        return Admission(app, self.max_ongoing, self.api_keys)

    def check_health(self) -> None:
        """Ray's health check (every `health_check_period_s`): raises once the model failed or the batching
        loop died, so Ray replaces this replica."""
        if self.service is not None and self.service.state == "failed":
            raise RuntimeError(f"mtlm replica failed: {self.service.error}")


def deployment(run: str | Path, *, replicas: int = 1, autoscale: tuple[int, int] | None = None,
               max_ongoing: int | None = None, settings: ServeSettings | None = None,
               api_keys: APIKeys | None = None, torch_threads: int | None = None, name: str = "MtlmReplica"):
    """A bound Ray Serve application serving the bundle of `run` (a run or bundle folder): pass it to
    `serve.run(app, route_prefix="/")` or return it from your own Serve config's import path.

    replicas: fixed replica count; autoscale: (min, max) replicas instead, scaled on ongoing requests
    (target: `max_batch_size` requests per replica); max_ongoing: predict requests one replica holds
    before it answers 429 (default: settings.max_queue); settings: the same ServeSettings as `mtlm serve`;
    torch_threads: per replica (default: settings.torch_threads, else CPUs / replicas), also the Ray CPUs
    each replica reserves. Raises mtlm.checkpoint.BundleError when `run` holds no bundle, ValueError for a
    bad replica count."""
    from mtlm.checkpoint import find_bundle
    settings = (settings or ServeSettings()).model_copy()
    bundle = str(find_bundle(run).resolve())
    if autoscale is not None:
        low, high = autoscale
        if not 0 <= low <= high or high < 1:
            raise ValueError(f"autoscale: want MIN:MAX with 0 <= MIN <= MAX and MAX >= 1, got {low}:{high}")
    elif replicas < 1:
        raise ValueError(f"replicas: want at least 1, got {replicas}")
    most = autoscale[1] if autoscale else replicas
    threads = torch_threads or settings.torch_threads or max(1, (os.cpu_count() or 1) // most)
    settings.torch_threads = threads
    max_ongoing = max_ongoing or settings.max_queue
    scaling = ({"num_replicas": replicas} if autoscale is None else
               {"autoscaling_config": {"min_replicas": autoscale[0], "max_replicas": autoscale[1],
                                       "target_ongoing_requests": settings.max_batch_size}})
    env = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           **{k: os.environ[k] for k in ("HF_HUB_OFFLINE", "PYTHONPATH") if k in os.environ}}
    return MtlmReplica.options(
        name=name, max_ongoing_requests=max_ongoing + ADMISSION_MARGIN, health_check_period_s=2.0,
        ray_actor_options={"num_cpus": threads, "runtime_env": {"env_vars": env}}, **scaling,
    ).bind(bundle, settings.model_dump_json(), None if api_keys is None else api_keys.to_env(), max_ongoing)


def start_ray(verbose: bool = False) -> None:
    """Connect to the cluster at RAY_ADDRESS, or start a local one whose traffic stays on 127.0.0.1.
    Raises DeployError (Ray's reason, and what to do) when Ray cannot connect or its local node fails to start,
    e.g. "The current node timed out during startup" on a CPU busy with other work."""
    import ray
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    address = os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(log_to_driver=verbose)
        else:
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=verbose,
                     num_cpus=os.cpu_count() or 1)
    except Exception as e:      # Ray raises plain Exception / ConnectionError / RuntimeError here
        where = (f"the Ray cluster at RAY_ADDRESS={address}" if address else "a local Ray node (127.0.0.1)")
        raise DeployError(f"{where} failed to start: {type(e).__name__}: {e}. Ray's processes start slowly on a CPU "
                          f"busy with other work: retry when it is quieter, or start the node once yourself "
                          f"(`ray start --head --node-ip-address 127.0.0.1`) and set RAY_ADDRESS=127.0.0.1:6379; "
                          f"`mtlm serve` without --ray needs no Ray") from None


def stop_ray() -> None:
    """Shut down Serve (drains: each replica's lifespan stop finishes accepted requests) and Ray."""
    import ray
    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def serve_ray(args) -> None:
    """`mtlm serve RUN --ray`: start Ray (local on 127.0.0.1, or RAY_ADDRESS), deploy `deployment(...)` with
    Ray's HTTP proxy on args.host:args.port, serve until SIGTERM/SIGINT, then shut Serve and Ray down.

    args: as `mtlm.serve.process.serve`, plus replicas, autoscale ((MIN, MAX) or None), max_ongoing.
    Raises pydantic.ValidationError for a setting out of range, AccessConfigError for a bad key source or
    TLS file, BundleError for a run without a bundle, DeployError when the replicas fail to start (the
    replica's error in the message)."""
    from mtlm.serve.auth import access_from_args
    api_keys = access_from_args(args)
    settings = ServeSettings(**{name: getattr(args, f"setting_{name}") for name in ServeSettings.model_fields
                                if getattr(args, f"setting_{name}", None) is not None})
    autoscale = getattr(args, "autoscale", None)
    app = deployment(args.run, replicas=getattr(args, "replicas", None) or 1, autoscale=autoscale,
                     max_ongoing=getattr(args, "max_ongoing", None), settings=settings, api_keys=api_keys)
    verbose = bool(getattr(args, "verbose", False))
    start_ray(verbose)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        http = {"host": args.host, "port": args.port}
        for key in ("ssl_certfile", "ssl_keyfile"):
            if getattr(args, key, None):
                http[key] = str(getattr(args, key))
        t0 = time.perf_counter()
        from ray.serve._private import api as serve_api       # no public setting for this wait (Ray 2.60)
        if getattr(serve_api, "HTTP_PROXY_TIMEOUT", PROXY_START_TIMEOUT_S) < PROXY_START_TIMEOUT_S:
            serve_api.HTTP_PROXY_TIMEOUT = PROXY_START_TIMEOUT_S
        try:
            serve.start(http_options=http)
        except Exception as e:     # the proxy did not start (port taken, or too slow on a loaded machine)
            raise DeployError(f"Ray Serve's HTTP proxy on {args.host}:{args.port} failed to start: "
                              f"{type(e).__name__}: {e}") from None
        try:
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        except Exception as e:     # a replica that cannot load: Ray's message holds the replica's traceback
            raise DeployError(f"the Ray Serve replicas failed to start: {e}") from None
        log.info("serving %s over Ray Serve on http%s://%s:%d (%s), ready in %.1f s", args.run,
                 "s" if "ssl_certfile" in http else "", args.host, args.port,
                 f"autoscale {autoscale[0]}-{autoscale[1]} replicas" if autoscale else
                 f"{getattr(args, 'replicas', None) or 1} replica(s)", time.perf_counter() - t0)
        while not stop.wait(0.5):
            pass
        log.info("stopping: draining the replicas")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop_ray()


def replica_states(app_name: str = APP_NAME) -> dict[str, int]:
    """{replica state: count} of the app's deployment (Ray's controller view), e.g. {"RUNNING": 2}."""
    status = serve.status().applications.get(app_name)
    if status is None:
        return {}
    counts: dict[str, int] = {}
    for dep in status.deployments.values():
        for state, n in dep.replica_states.items():
            counts[str(state)] = counts.get(str(state), 0) + n
    return counts
