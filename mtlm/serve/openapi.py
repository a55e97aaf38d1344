"""The served OpenAPI document (`/openapi.json`, `/docs`) says exactly what the server does.

A request the document calls valid is accepted (200, or 429 / 503 / 504 under load), and one it calls
invalid is refused with a 4xx: schema-driven fuzzers (schemathesis `--checks all`) and generated clients
can trust it. FastAPI's document from the pydantic models (`mtlm.serve.schemas`) is the base; this module
adds what those models cannot say:
- every status each route can answer (400, 401 with API keys, 404, 413, 422, 429, 500, 503, 504) with
  its body schema and headers (X-Request-ID always, Retry-After on 429 / 503, WWW-Authenticate on 401),
  and `/metrics` as Prometheus text;
- the server's limits as schema constraints: 1..max_inputs_per_request inputs, 2..max_choices choices,
  timeout_ms from the least time a request of that many inputs needs on this server (one branch per size
  tier of `mtlm.serve.service.deadline_floors`, measured at warm-up; at least min_timeout_ms) to
  max_timeout_ms, texts that are not blank (`NON_BLANK`: a character that Python's
  `str.isspace` does not call whitespace, the test `mtlm.predict.normalize_input` applies);
- once the bundle is loaded: its task names as enums, and the input fields each task reads. Which fields
  an input must carry depends on the requested tasks, so `POST /v1/predict` takes one `anyOf` branch per
  set of field groups the tasks may span (2^groups - 1, at most 15, plus the branch without `tasks`), and
  `/v1/tasks/{task}/predict` is listed once per task (`/v1/tasks/sentiment/predict`, ...) with that
  task's own input schema; each task's result has its own schema (`result_schema`: label enums, offsets,
  scores). Examples are made from the bundle's tasks.
While the bundle loads, the document is the generic one (any task name) and is not cached.

Not expressible, so documented in the descriptions instead: `max_body_bytes`, `max_queue_tokens` and
`max_windows` (413, they depend on bytes and tokens, not on JSON structure).
"""

from __future__ import annotations

import copy
import itertools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from mtlm.serve.auth import APIKeys
    from mtlm.serve.schemas import ServeSettings
    from mtlm.serve.service import Service

# the characters str.isspace() is true for (tests/test_openapi.py checks the list against Python's)
WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
              "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
# unanchored: "contains one character that is not whitespace" (same meaning in ECMA 262 and Python re)
NON_BLANK = r"[^\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
STRING_FIELDS = ("text", "text_pair", "question", "context")
QA_FIELDS = frozenset({"question", "context"})
EXAMPLE_FIELDS = {"text": "A man is eating an apple.", "text_pair": "Someone is eating.",
                  "question": "Who wrote the book?", "context": "The book was written by Ann Lee in 1990.",
                  "choices": ["I am fine, thanks.", "Paris is in France."]}
ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
STATUS_TEXT = {
    400: "The request could not be read.",
    401: "No valid API key: send `Authorization: Bearer <key>`.",
    404: "The model has no such task.",
    413: "Too large: the body is over max_body_bytes, its tokens over the queue's token budget "
         "(max_queue_tokens), or a QA context needs more than max_windows windows.",
    422: "Invalid input; `detail` says what to fix (and `errors` lists field-level problems). Also a "
         "timeout_ms under the least time a request of this many inputs needs on this server (the schema's "
         "minimum for that many inputs; `detail` gives it and the measured cost per input).",
    429: "The queue is full; retry after `Retry-After` seconds.",
    500: "The model failed on this request.",
    503: "Not ready: loading, draining or failed to load; retry after `Retry-After` seconds.",
    504: "The request's timeout_ms passed before its inputs ran: a deadline the schema allows that load "
         "(a queue ahead of it) or texts longer than the warm-up's made unmeetable.",
}


def _header(description: str, required: bool = True) -> dict:
    return {"description": description, "required": required, "schema": {"type": "string"}}


REQUEST_ID = _header("The client's X-Request-ID when it sent a sane one, else a generated id.")


def _error_response(status: int, retry_after: bool) -> dict:
    headers = {"X-Request-ID": REQUEST_ID}
    if retry_after:
        headers["Retry-After"] = _header("Seconds to wait before retrying.")
    if status == 401:
        headers["WWW-Authenticate"] = _header("`Bearer realm=\"mtlm\"` (RFC 6750).")
    return {"description": STATUS_TEXT[status], "headers": headers,
            "content": {"application/json": {"schema": ERROR_REF}}}


def _statuses(path: str, method: str) -> dict[int, bool]:
    """The error statuses of one route -> whether the answer carries Retry-After."""
    if method == "post":
        out = {400: False, 413: False, 422: False, 429: True, 500: False, 503: True, 504: False}
        if path.startswith("/v1/tasks/") or path == "/v1/generate":
            out[404] = False
        return out
    if path == "/v1/tasks":
        return {503: True}
    if path == "/ready":
        return {503: True}
    return {}


def _non_blank() -> dict:
    return {"type": "string", "pattern": NON_BLANK, "description": "not blank (not only whitespace)"}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


def _item_variants(fields: frozenset[str], settings: ServeSettings) -> list[dict]:
    """Object schemas of an input that carries every field in `fields` and that `normalize_input` accepts:
    a QA-shaped input (question and context) or a text-shaped one (text; no question / context). Absent
    and null fields are the same to the server."""
    choices = {"type": "array", "items": _non_blank(), "minItems": 2, "maxItems": settings.max_choices}
    out = []
    for qa in (True, False):
        if not qa and fields & QA_FIELDS:
            continue
        required = set(fields) | (set(QA_FIELDS) if qa else {"text"})
        props = {}
        for name in (*STRING_FIELDS, "choices"):
            strict = choices if name == "choices" else _non_blank()
            if name in required:
                props[name] = strict
            elif not qa and name in QA_FIELDS:
                props[name] = {"type": "null"}
            else:
                props[name] = _nullable(strict)
        out.append({"type": "object", "properties": props, "required": sorted(required),
                    "additionalProperties": False})
    return out


def _inputs(field_sets: list[frozenset[str]], settings: ServeSettings) -> dict:
    """`inputs`: each item carries the fields of at least one of `field_sets`."""
    items: list[dict] = []
    if any(fs == {"text"} for fs in field_sets):
        items.append(_non_blank())               # a plain string is {"text": ...}
    for fs in field_sets:
        items += [v for v in _item_variants(fs, settings) if v not in items]
    return {"type": "array", "minItems": 1, "maxItems": settings.max_inputs_per_request,
            "items": {"anyOf": items}, "description": "Strings, or objects with the fields the tasks read."}


def _timeout(settings: ServeSettings, least: float | None = None) -> dict:
    """`timeout_ms` of a request whose least timeout_ms is `least` (default: min_timeout_ms); required when
    the default timeout is under it."""
    least = settings.min_timeout_ms if least is None else least
    schema = {"type": "number", "minimum": least, "maximum": settings.max_timeout_ms,
              "description": f"answer 504 when not computed within this many ms of arrival (default "
                             f"{settings.default_timeout_ms:g}); under {least:g} (the least time a request of "
                             f"this many inputs needs on this server) -> 422"}
    return schema if least > settings.default_timeout_ms else _nullable(schema)


def _tiered(branch: dict, settings: ServeSettings, floors: list[tuple[int, float]] | None) -> list[dict]:
    """One copy of a request branch per request-size tier of `floors` (`mtlm.serve.service.deadline_floors`):
    inputs minItems..maxItems and that tier's least timeout_ms. Without floors (loading), the branch as is."""
    if not floors:
        return [branch]
    out, low = [], 1
    for most, least in floors:
        b = copy.deepcopy(branch)
        props = b["properties"]
        props["inputs"].update(minItems=low, maxItems=most)
        props["timeout_ms"] = _timeout(settings, least)
        if least > settings.default_timeout_ms:        # the default deadline is too short for this size
            b["required"] = [*b["required"], "timeout_ms"]
        if len(floors) > 1:
            b["title"] = f"{b.get('title', 'request')}; {low}..{most} inputs, timeout_ms >= {least:g}"
        out.append(b)
        low = most + 1
    return out


def _example_input(fields: frozenset[str]) -> Any:
    if fields == {"text"}:
        return EXAMPLE_FIELDS["text"]
    return {f: EXAMPLE_FIELDS[f] for f in (*STRING_FIELDS, "choices") if f in fields}


def _groups(tasks: list[dict]) -> dict[frozenset[str], list[str]]:
    out: dict[frozenset[str], list[str]] = {}
    for t in tasks:
        out.setdefault(frozenset(t["input_fields"]), []).append(t["name"])
    return out


def predict_request(tasks: list[dict], settings: ServeSettings,
                    floors: list[tuple[int, float]] | None = None) -> dict:
    """The `POST /v1/predict` body schema for a bundle's tasks (`Service.task_info()`): without `tasks`,
    every input must carry the fields of some task; with `tasks`, the fields of every named task. `floors`:
    the least timeout_ms per request size (`Service.floors`), one branch per size tier (none: min_timeout_ms)."""
    groups = _groups(tasks)
    branches = _tiered({"type": "object", "title": "every task each input's fields feed",
                        "properties": {"inputs": _inputs(list(groups), settings), "tasks": {"type": "null"},
                                       "timeout_ms": _timeout(settings)},
                        "required": ["inputs"], "additionalProperties": False}, settings, floors)
    for r in range(1, len(groups) + 1):
        for chosen in itertools.combinations(groups, r):
            names = [n for g in chosen for n in groups[g]]
            fields = frozenset().union(*chosen)
            branches += _tiered({"type": "object", "title": "tasks among: " + ", ".join(names),
                                 "properties": {"inputs": _inputs([fields], settings),
                                                "tasks": {"type": "array", "minItems": 1, "items": {"enum": names}},
                                                "timeout_ms": _timeout(settings)},
                                 "required": ["inputs", "tasks"], "additionalProperties": False}, settings, floors)
    examples = [{"inputs": [_example_input(g)], "tasks": groups[g][:2]} for g in groups]
    examples.append({"inputs": [_example_input(g) for g in groups], "timeout_ms": 2000})
    return {"anyOf": branches, "examples": examples}


def task_request(fields: frozenset[str], settings: ServeSettings,
                 floors: list[tuple[int, float]] | None = None) -> dict:
    """The `POST /v1/tasks/{task}/predict` body schema for one task reading `fields` (`floors`: as in
    `predict_request`)."""
    branches = _tiered({"type": "object", "properties": {"inputs": _inputs([fields], settings),
                                                         "timeout_ms": _timeout(settings)},
                        "required": ["inputs"], "additionalProperties": False}, settings, floors)
    examples = [{"inputs": [_example_input(fields)]}]
    return {**branches[0], "examples": examples} if len(branches) == 1 else {"anyOf": branches, "examples": examples}


def _body(schema: dict) -> dict:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _object(required: dict[str, dict], optional: dict[str, dict] | None = None) -> dict:
    props = {**required, **(optional or {}), "truncated": {"type": "boolean", "description": "the input was cut"}}
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": False}


def result_schema(task: dict) -> dict:
    """The schema of one task's result (`Predictor.predict`), from its `task_info()` entry (type, labels).
    Raises KeyError for a task type this module does not know (a new type must add its schema here)."""
    number, labels = {"type": "number"}, task.get("labels") or []
    scores = _object({label: number for label in labels})
    scores["properties"].pop("truncated")
    kind = task["type"]
    if kind == "classification":
        return _object({"label": {"enum": labels}, "score": number, "scores": scores})
    if kind == "multilabel":
        return _object({"labels": {"type": "array", "items": {"enum": labels}}, "scores": scores})
    if kind == "regression":
        return _object({"value": number})
    if kind == "token_classification":
        entity = _object({"entity": {"type": "string"}, "text": {"type": "string"},
                          "start": {"type": "integer", "minimum": 0}, "end": {"type": "integer", "minimum": 0},
                          "score": number})
        entity["properties"].pop("truncated")
        return _object({"entities": {"type": "array", "items": entity}})
    if kind == "extractive_qa":
        offset = {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "null"}]}
        return _object({"answer": {"type": "string"}, "start": offset, "end": offset, "score": number,
                        "no_answer": {"type": "boolean"}})
    if kind == "multiple_choice":
        return _object({"label": {"type": "string"}, "index": {"type": "integer", "minimum": 0}, "score": number,
                        "scores": {"type": "array", "items": number, "minItems": 2}})
    raise KeyError(f"no result schema for task type {kind!r}")


def _predict_response(tasks: list[dict]) -> dict:
    names = [t["name"] for t in tasks]
    return {"type": "object", "required": ["model", "request_id", "tasks", "predictions", "timing"],
            "properties": {"model": {"type": "string"}, "request_id": {"type": "string"},
                           "tasks": {"type": "array", "items": {"enum": names}},
                           "predictions": {"type": "array", "items": {
                               "type": "object", "additionalProperties": False,
                               "properties": {t["name"]: result_schema(t) for t in tasks}}},
                           "timing": {"$ref": "#/components/schemas/Timing"}}}


def _ok(op: dict, schema: dict) -> None:
    op["responses"]["200"]["content"] = {"application/json": {"schema": schema}}


def build_document(base: dict, settings: ServeSettings, api_keys: APIKeys | None,
                   tasks: list[dict] | None, floors: list[tuple[int, float]] | None = None) -> dict:
    """FastAPI's generated document `base` -> the served one (a new dict). `tasks`: `Service.task_info()`
    once the bundle is loaded, else None (the generic document). `floors`: `Service.floors` (the least
    timeout_ms per request size), once warmed up."""
    doc = copy.deepcopy(base)
    paths = doc["paths"]
    if tasks is not None:
        op = paths["/v1/predict"]["post"]
        op["requestBody"] = _body(predict_request(tasks, settings, floors))
        _ok(op, _predict_response(tasks))
        template = paths.pop("/v1/tasks/{task}/predict")["post"]
        for t in tasks:
            fields = frozenset(t["input_fields"])
            op = copy.deepcopy(template)
            op["parameters"] = [p for p in op.get("parameters", []) if p.get("name") != "task"]
            op["operationId"] = f"predict_{t['name']}"
            op["summary"] = f"{t['name']} ({t['type']}; reads {', '.join(t['input_fields'])})"
            op["requestBody"] = _body(task_request(fields, settings, floors))
            _ok(op, _predict_response([t]))
            paths[f"/v1/tasks/{t['name']}/predict"] = {"post": op}
        generation = [t["name"] for t in tasks if t["type"] == "generation"]
        if not generation:                  # /v1/generate answers 404 / 422 to everything: not offered
            paths.pop("/v1/generate", None)
        elif "/v1/generate" in paths:
            schema = _generate_body(doc, paths["/v1/generate"]["post"])
            if schema is not None:
                schema["properties"]["task"] = {"enum": generation}
    for path, ops in paths.items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            for code in list(responses):
                if code != "200":
                    del responses[code]                 # FastAPI's HTTPValidationError 422 among them
            for code, retry_after in _statuses(path, method).items():
                responses[str(code)] = _error_response(code, retry_after)
            if path == "/health":
                responses["503"] = {"description": "Loading the model failed (`error` says why).",
                                    "headers": {"X-Request-ID": REQUEST_ID},
                                    "content": {"application/json": {"schema": _health()}}}
                _ok(op, _health())
            if path == "/ready":
                _ok(op, _health())
                responses["503"]["content"] = {"application/json": {"schema": _health()}}
            if path == "/metrics":
                responses["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
                responses["200"]["description"] = "Prometheus text exposition format."
            responses["200"].setdefault("headers", {})["X-Request-ID"] = REQUEST_ID
            if api_keys is not None and api_keys.protects(path):
                op["security"] = [{"bearer": []}]
                responses["401"] = _error_response(401, False)
    doc.setdefault("components", {}).setdefault("schemas", {}).pop("HTTPValidationError", None)
    doc["components"]["schemas"].pop("ValidationError", None)
    if api_keys is not None:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                                           "description": "an API key of this server"}}
    return doc


def _generate_body(doc: dict, op: dict) -> dict | None:
    """The GenerateRequest schema object that /v1/generate's request body refers to (resolved), or None."""
    schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
    ref = schema.get("$ref", "")
    if ref.startswith("#/components/schemas/"):
        schema = doc.get("components", {}).get("schemas", {}).get(ref.rsplit("/", 1)[1])
    return schema if isinstance(schema, dict) and "properties" in schema else None


def _health() -> dict:
    return {"type": "object", "required": ["status", "state"],
            "properties": {"status": {"type": "string"},
                           "state": {"enum": ["loading", "ready", "draining", "stopped", "failed"]},
                           "error": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}


def install_openapi(app: FastAPI, service: Service, settings: ServeSettings, api_keys: APIKeys | None) -> None:
    """Serve `build_document` at /openapi.json: generic while loading, for the bundle once loaded and warmed
    up (cached: the least timeout_ms per request size is fixed at warm-up, so the document and the server's
    422s agree)."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        base = get_openapi(title=app.title, version=app.version, summary=app.summary,
                           description=app.description, routes=app.routes)
        loaded = service.predictor is not None and service.floors is not None    # loaded and warmed up
        doc = build_document(base, settings, api_keys, service.task_info() if loaded else None,
                             service.floors if loaded else None)
        if loaded:
            app.openapi_schema = doc
        return doc

    app.openapi = openapi
