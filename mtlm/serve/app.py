"""The HTTP face of the server (FastAPI) and `serve(args)`, which runs it under uvicorn.

Routes (OpenAPI at /docs):
    POST /v1/predict                 {"inputs": [...], "tasks": [...]?, "timeout_ms": ...?} -> PredictResponse
    POST /v1/tasks/{task}/predict    the same for one task
    GET  /v1/tasks                   every task with its type, labels and input fields
    GET  /health                     200 while the process is alive (also while loading); 503 if loading failed
    GET  /ready                      200 once loaded and warmed up; 503 while loading, draining or failed
    GET  /metrics                    Prometheus text format
Status codes: 413 body over max_body_bytes; 422 bad input (the reason in `detail`), also a timeout_ms under
the least time a request of this many inputs needs on this server (`mtlm.serve.service.deadline_floors`);
429 queue full (with Retry-After, seconds); 503 not ready or draining (Retry-After); 504 timeout_ms passed
before the inputs ran (load, or texts longer than the warm-up's); 500 a model failure. Every response
carries X-Request-ID (the client's when it sent a sane one).
With API keys (`mtlm.serve.auth`), every route but /health and /ready (and /metrics, /docs when opened)
answers 401 without `Authorization: Bearer <key>`. /openapi.json describes the loaded bundle
(`mtlm.serve.openapi`): what it calls valid is accepted, what it calls invalid gets a 4xx.

Scaling out: `--workers N` runs N processes on one port, each with its own model (uvicorn's supervisor
shares the socket; each worker gets cpu_count / N torch threads). Across machines, run one `mtlm serve`
per machine and put any HTTP load balancer in front (nginx `upstream`, HAProxy, a cloud LB) with
`/ready` as the health check: a draining server answers 503 there, so the balancer stops sending it
traffic while it finishes what it accepted. `mtlm serve --ray` (`mtlm.serve.ray`) runs this same app
as the ingress of each Ray Serve replica (the API-key check is part of the app, so it comes along).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import signal
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from mtlm.serve.auth import APIKeys, www_authenticate
from mtlm.serve.batcher import QueueFull, Stopped, TooLarge
from mtlm.serve.generate import add_generate_route
from mtlm.serve.openapi import install_openapi
from mtlm.serve.playground import install_playground
from mtlm.serve.schemas import (ErrorResponse, PredictRequest, PredictResponse, ServeSettings,
                                TaskPredictRequest, TasksResponse)

_TASK_PATH = re.compile(r"/v1/tasks/([^/]+)/predict")

if TYPE_CHECKING:     # torch is imported only when an app is created: serve() must set OMP_* first
    from mtlm.predict import Predictor
    from mtlm.serve.service import Service

log = logging.getLogger("mtlm.serve")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_ERRORS = {s: {"model": ErrorResponse} for s in (413, 422, 429, 503, 504)}
_TASK_ERRORS = {**_ERRORS, 404: {"model": ErrorResponse}}
UNAUTHORIZED = {"missing": "this endpoint needs an API key: send 'Authorization: Bearer <key>'",
                "malformed": "send the API key as 'Authorization: Bearer <key>'",
                "invalid": "the API key is not valid"}


def _printable(value):
    """Strings with lone surrogates (from the request, echoed in a reason) escaped, so the JSON encodes."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, (list, tuple)):
        return [_printable(v) for v in value]
    if isinstance(value, dict):
        return {_printable(k): _printable(v) for k, v in value.items()}
    return value


def _json_default(value):
    """numpy scalars and arrays in results -> plain JSON values (orjson's hook for types it does not know)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class FastJSONResponse(Response):
    """A JSON response encoded by orjson (several times faster than the standard library's json on the
    predictions' nested dicts of floats; same JSON text up to float formatting)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, default=_json_default, option=orjson.OPT_SERIALIZE_NUMPY)


def _error(status: int, detail: str, request_id: str | None, headers: dict | None = None,
           errors: list | None = None) -> JSONResponse:
    body = {"detail": detail, "request_id": request_id}
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(_printable(body), status_code=status, headers=headers)


class RequestMiddleware:
    """Pure ASGI: stamps X-Request-ID on every response and answers 413 for bodies over `max_body_bytes`
    (by Content-Length, or while reading a chunked body) before any route sees them. Stores
    scope["state"]["request_id"] and ["arrival"] (time.monotonic() seconds).

    `shed(scope, body, request_id)` may return a response to send instead of routing (the overload 429:
    under overload most requests are rejected, so rejecting must cost far less than routing + validation).
    `fast(scope, headers, body, request_id)` (async) may answer a request itself, without FastAPI's routing
    (the predict routes' happy path); None hands it to the app.
    `on_reject(status)` is told about the 413s. `guard(scope, headers, request_id)` may return a response
    (the API keys' 401) before the body is read."""

    def __init__(self, app, max_body_bytes: int, on_reject: Callable[[int], None] | None = None,
                 shed: Callable[[dict, bytes, str], Response | None] | None = None,
                 guard: Callable[[dict, dict, str], Response | None] | None = None,
                 fast: Callable[[dict, dict, bytes, str], Any] | None = None):
        self.app, self.max_body_bytes, self.on_reject, self.shed = app, max_body_bytes, on_reject, shed
        self.guard, self.fast = guard, fast
        self._prefix, self._count = uuid.uuid4().hex[:16], itertools.count()   # no syscall per request

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")
        if not _REQUEST_ID.fullmatch(rid):
            rid = f"{self._prefix}-{next(self._count):x}"
        state = scope.setdefault("state", {})
        state["request_id"], state["arrival"] = rid, time.monotonic()
        rid_header = (b"x-request-id", rid.encode("latin-1"))

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), rid_header]
            await send(message)

        refused = self.guard(scope, headers, rid) if self.guard else None
        if refused is not None:
            return await refused(scope, receive, send_with_id)
        length = headers.get(b"content-length")
        too_large = length is not None and (not length.isdigit() or int(length) > self.max_body_bytes)
        chunks, size, more = [], 0, not too_large
        while more:       # buffer the body (at most max_body_bytes) so a chunked upload is bounded too
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            too_large, more = size > self.max_body_bytes, message.get("more_body", False)
            if too_large:
                break
        if too_large:
            if self.on_reject:
                self.on_reject(413)
            response = _error(413, f"request body over {self.max_body_bytes} bytes", rid)
            return await response(scope, receive, send_with_id)
        body, replayed = b"".join(chunks), False
        early = self.shed(scope, body, rid) if self.shed else None
        if early is not None:
            return await early(scope, receive, send_with_id)
        answered = await self.fast(scope, headers, body, rid) if self.fast else None
        if answered is not None:
            return await answered(scope, receive, send_with_id)

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send_with_id)


def _readable(errors) -> list[dict]:
    """pydantic errors for `inputs: list[str | InputObject]` name both union branches; keep the one that
    applies (the object's fields for an object, one plain message for anything else)."""
    out = []
    objects = {tuple(e["loc"][:3]) for e in errors      # inputs that are objects: the str branch saw a dict
               if len(e.get("loc", ())) == 4 and e["loc"][3] == "str" and isinstance(e.get("input"), dict)}
    for e in errors:
        loc, msg = list(e.get("loc", ())), e.get("msg", "")
        if len(loc) >= 4 and loc[:2] == ["body", "inputs"] and loc[3] in ("str", "InputObject"):
            is_object = tuple(loc[:3]) in objects or isinstance(e.get("input"), dict) or len(loc) > 4
            if (loc[3] == "str") == is_object:
                continue                                  # the other branch's complaint
            loc = loc[:3] + loc[4:]
            if not is_object:
                msg = ("expected a string or an object with 'text' (and 'text_pair' or 'choices'), "
                       "or 'question' and 'context'")
        out.append({"loc": loc, "msg": msg, "type": e.get("type", "")})
    return out


def _path(loc: list) -> str:
    """A pydantic error location as the field path `predict` uses: ["inputs", 0, "text"] -> "inputs[0].text"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _floor_reason(service: Service) -> str:
    """Why a request's least timeout_ms is what it is (the 422's explanation)."""
    floors = "; ".join(f"up to {n} inputs: {f:g} ms" for n, f in service.floors or [])
    if service.input_cost_ms is None:
        return f"no request is computed in under --min-timeout-ms ({service.settings.min_timeout_ms:g} ms)"
    how = "set by --input-cost-ms" if service.settings.input_cost_ms else "one input alone, measured at warm-up"
    return (f"each input needs about {service.input_cost_ms:.3g} ms on this server ({how}), at least "
            f"--min-timeout-ms; the minimum per request size ({floors}) is in /openapi.json")


def _chain_signal_handlers(service: Service) -> None:
    """Make SIGTERM/SIGINT flip /ready to 503 before uvicorn's own handler starts its graceful shutdown
    (stop listening, finish open requests, then lifespan shutdown drains the batcher). uvicorn restores
    the original handlers when it exits, which removes these too.

    The handler only sets `service.drain_requested` and wakes the event loop (`call_soon_threadsafe`:
    lock-free), which then runs `begin_drain`. It takes no lock: a signal interrupts the main thread
    anywhere, also while it holds a lock the handler would need (prometheus_client's process-wide lock in
    multiprocess mode, `--workers N`), which would deadlock."""
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(signum, frame, previous=previous):
            service.drain_requested = True
            if not loop.is_closed():
                loop.call_soon_threadsafe(service.begin_drain)
            previous(signum, frame)
        signal.signal(sig, handler)


async def answer(service: Service, settings: ServeSettings, rid: str, arrival: float, inputs: list[Any],
                 tasks: list[str] | None, timeout_ms: float | None) -> Response:
    """One predict request, after its body validated: readiness, the deadline's limits (over the maximum, or
    under what even an idle server needs for this many inputs: 422 before queueing), input checks, then the
    batched prediction. Every outcome is one response (200, 413, 422, 429, 503, 504, 500) and one count in
    /metrics. rid: the request id; arrival: time.monotonic() seconds when it arrived."""
    from mtlm.predict import InputError
    from mtlm.serve.service import NotReady
    names, status, n_inputs = None, 500, 0
    try:
        if not service.ready:
            status = 503
            return _error(503, f"not ready: {service.state}" + (f" ({service.error})" if service.error else ""),
                          rid, {"Retry-After": "1"})
        timeout_ms = settings.default_timeout_ms if timeout_ms is None else timeout_ms
        if timeout_ms > settings.max_timeout_ms:
            raise InputError(f"timeout_ms: {timeout_ms:g} is over the limit of {settings.max_timeout_ms:g}")
        least = service.least_timeout_ms(len(inputs))
        if timeout_ms < least:     # a deadline even an idle server cannot meet: refuse it before queueing
            raise InputError(f"timeout_ms: {timeout_ms:g} is under the minimum of {least:g} ms for "
                             f"{len(inputs)} input(s): {_floor_reason(service)}")
        items, plan = service.validate(inputs, tasks)
        names = plan.names
        predictions, timing = await service.predict(items, plan, timeout_ms / 1000.0, arrival)
        status, n_inputs = 200, len(items)
        return FastJSONResponse({"model": service.predictor.name, "request_id": rid, "tasks": names,
                                 "predictions": predictions, "timing": timing})
    except InputError as e:
        status = 422
        return _error(422, str(e), rid)
    except QueueFull as e:
        status = 429
        return _error(429, str(e), rid, {"Retry-After": str(e.retry_after_s)})
    except TooLarge as e:
        status = 413
        return _error(413, str(e), rid)
    except (Stopped, NotReady) as e:
        status = 503
        return _error(503, str(e), rid, {"Retry-After": "1"})
    except asyncio.TimeoutError:
        status = 504
        return _error(504, f"not computed within timeout_ms={timeout_ms:g}", rid)
    except Exception as e:
        log.exception("request %s failed", rid)
        return _error(500, f"internal error: {type(e).__name__}", rid)
    finally:
        service.metrics.request(names, status, n_inputs, time.monotonic() - arrival)


def create_app(source: str | Path | Callable[[], Predictor], settings: ServeSettings | None = None,
               handle_signals: bool = False, api_keys: APIKeys | None = None) -> FastAPI:
    """The FastAPI app serving one bundle (a path, or a callable returning a Predictor).

    `api_keys`: when given, every request but /health, /ready (and /metrics, docs when opened) needs
    `Authorization: Bearer <key>`, else 401 (`mtlm.serve.auth`). The OpenAPI document describes the loaded
    bundle (`mtlm.serve.openapi`).

    Its lifespan starts loading in the background and, on shutdown, drains accepted requests. Without a
    lifespan-running server (httpx's ASGITransport), run `async with app.router.lifespan_context(app):`."""
    from mtlm.serve.service import Service

    settings = settings or ServeSettings()
    service = Service(source, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        if handle_signals:
            _chain_signal_handlers(service)
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="mtlm", summary="Every task of a multi-task model from one backbone pass.",
                  lifespan=lifespan)
    app.state.service = service

    def shed(scope: dict, body: bytes, rid: str) -> Response | None:
        """429 before routing when the queue has no room for even one more input."""
        batcher, path = service.batcher, scope["path"]
        if batcher is None or not batcher.full() or scope["method"] != "POST" or not path.endswith("/predict"):
            return None
        known = service.predictor.tasks
        if path.startswith("/v1/tasks/"):
            tasks = [path.split("/")[3]]
        else:
            try:
                tasks = json.loads(body).get("tasks") or list(known)
            except (ValueError, AttributeError):
                tasks = []
        tasks = [t for t in tasks if isinstance(t, str) and t in known] or None   # bounded label values
        service.metrics.request(tasks, 429, 0, time.monotonic() - scope["state"]["arrival"])
        return _error(429, f"queue full ({batcher.queued_inputs} inputs queued)", rid,
                      {"Retry-After": str(batcher.retry_after())})

    def guard(scope: dict, headers: dict, rid: str) -> Response | None:
        """401 for a request without a valid API key (the key itself is never logged nor echoed)."""
        reason = api_keys.reject(scope["path"], headers.get(b"authorization"))
        if reason is None:
            return None
        service.metrics.auth_rejected(reason)
        return _error(401, UNAUTHORIZED[reason], rid, {"WWW-Authenticate": www_authenticate(reason)})

    async def fast(scope: dict, headers: dict, body: bytes, rid: str) -> Response | None:
        """A predict request whose body validates, answered without FastAPI's routing, dependency and
        validation layers (measured: most of the event loop's time per request besides tokenising). Any
        other request, and every body that does not validate, goes to the FastAPI routes below, which
        answer exactly as before (the same 4xx bodies)."""
        if scope["method"] != "POST" or not headers.get(b"content-type", b"").lower().startswith(b"application/json"):
            return None
        path, task = scope["path"], None
        if path != "/v1/predict":
            match = _TASK_PATH.fullmatch(path)
            if match is None or not service.ready or match.group(1) not in service.predictor.tasks:
                return None
            task = match.group(1)
        try:
            request = (PredictRequest if task is None else TaskPredictRequest).model_validate_json(body)
        except ValueError:
            return None
        return await answer(service, settings, rid, scope["state"]["arrival"], request.inputs,
                            [task] if task else request.tasks, request.timeout_ms)

    app.add_middleware(RequestMiddleware, max_body_bytes=settings.max_body_bytes,
                       on_reject=lambda status: service.metrics.request(None, status), shed=shed,
                       guard=guard if api_keys else None, fast=fast)
    install_openapi(app, service, settings, api_keys)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        errors = _readable(exc.errors())
        detail = "; ".join(f"{_path(e['loc'][1:]) or 'body'}: {e['msg']}" for e in errors)
        service.metrics.request(None, 422)
        return _error(422, detail or "invalid request body", request.state.request_id, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        """FastAPI's own 4xx (400: a body that is not UTF-8 JSON; 404 / 405: no such route) in the
        ErrorResponse shape, and counted in /metrics like the other rejections on the predict routes."""
        detail = exc.detail
        if exc.status_code == 400 and detail == "There was an error parsing the body":
            detail = "malformed request body: not JSON text in UTF-8"
        if request.url.path.endswith("/predict"):
            service.metrics.request(None, exc.status_code)
        return _error(exc.status_code, str(detail), getattr(request.state, "request_id", None),
                      getattr(exc, "headers", None))

    @app.post("/v1/predict", response_model=PredictResponse, responses=_ERRORS)
    async def predict(body: PredictRequest, request: Request):
        """The requested tasks for each input (default: every task whose fields the input carries), from one
        backbone pass per field group."""
        return await answer(service, settings, request.state.request_id, request.state.arrival, body.inputs,
                            body.tasks, body.timeout_ms)

    @app.post("/v1/tasks/{task}/predict", response_model=PredictResponse, responses=_TASK_ERRORS)
    async def predict_task(task: str, body: TaskPredictRequest, request: Request):
        """One task for each input (the same response shape as /v1/predict); 404 for a task the model lacks."""
        if service.ready and task not in service.predictor.tasks:
            service.metrics.request(None, 404)
            return _error(404, f"unknown task {task!r}; valid tasks: {', '.join(service.predictor.tasks)}",
                          request.state.request_id)
        return await answer(service, settings, request.state.request_id, request.state.arrival, body.inputs,
                            [task], body.timeout_ms)

    add_generate_route(app, service, settings, _error)

    @app.get("/v1/tasks", response_model=TasksResponse, responses={503: {"model": ErrorResponse}})
    async def tasks(request: Request):
        if service.predictor is None:
            return _error(503, f"not ready: {service.state}", request.state.request_id, {"Retry-After": "1"})
        return {"model": service.predictor.name, "max_length": service.predictor.max_length,
                "tasks": service.task_info()}

    if settings.playground:
        install_playground(app, api_keys is not None)

    @app.get("/health")
    async def health():
        """200 while the process can serve or is getting there; 503 once loading the model failed."""
        if service.state == "failed":
            return JSONResponse({"status": "failed", "state": service.state, "error": service.error}, 503)
        return {"status": "alive", "state": service.state}

    @app.get("/ready")
    async def ready():
        if service.ready:
            return {"status": "ready", "state": service.state}
        return JSONResponse({"status": "not ready", "state": service.state, "error": service.error},
                            status_code=503, headers={"Retry-After": "1"})

    @app.get("/metrics")
    async def metrics():
        content, content_type = service.metrics.render()
        return Response(content, media_type=content_type)

    return app
