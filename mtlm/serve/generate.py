"""`POST /v1/generate`: one generation task's continuation of one input, streamed as server-sent events.

Body: {"task": name, "input": a string or an input object, "max_new_tokens": optional cap (at most the
task's own `max_new_tokens` and the server's `max_new_tokens`), "timeout_ms": optional deadline}. Events:
`data: {"text": <new text>}` per decoded piece, then `event: done` with `data: {"text": <the whole
continuation>}` (or `event: error` with a "detail").

A stream is one input of the server's batcher (`mtlm.serve.batcher`), like a /v1/predict input: it waits in
the same bounded queue (full -> 429 with Retry-After), is batched with the other queued inputs of its task
(/v1/generate and /v1/predict alike: one `generate` call, left padding, KV cache) within `max_batch_size`
inputs and `max_batch_tokens` tokens, where an input counts its prompt plus its new tokens
(`Encoded.new_tokens`), and runs in the model thread, never on the event loop. Each row of a batch stops at
its own eos, its own max_new_tokens, its deadline or when its client leaves (`Generation.generate`'s
per-row stops); the pieces reach the handler through a thread-safe sink. At most
`ServeSettings.max_streams` streams are open at once (one more -> 429). A stream past its deadline ends
with the text generated so far (done) or, when it never ran, an error event. Errors before the stream
starts are plain JSON errors: 404 unknown task, 422 a task that is not a generation task, a bad input or
limit, 413 / 429 / 503 as for /v1/predict.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from mtlm.serve.schemas import InputObject


class GenerateRequest(BaseModel):
    """`POST /v1/generate` body."""

    model_config = ConfigDict(extra="forbid")

    task: StrictStr
    input: StrictStr | InputObject
    max_new_tokens: int | None = Field(None, gt=0, strict=True)
    timeout_ms: float | None = Field(None, gt=0, strict=True)


class Sink:
    """Pieces of one stream's text, from the model thread to the event loop (`put` is thread-safe);
    `gone` is set when nobody reads them any more (client left, deadline), which stops the row."""

    def __init__(self, loop: asyncio.AbstractEventLoop, deadline: float):
        self.loop, self.deadline = loop, deadline
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.gone = False

    def put(self, piece: str) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, piece)

    def stop(self) -> bool:
        return self.gone or time.monotonic() > self.deadline


def add_generate_route(app, service, settings, error) -> None:
    """Register `POST /v1/generate` on `app`. error(status, detail, request_id, headers) builds a 4xx/5xx."""
    from mtlm.predict import InputError, min_tokens, normalize_input
    from mtlm.serve.batcher import QueueFull, Stopped, TooLarge

    streams = threading.BoundedSemaphore(settings.max_streams)

    @app.post("/v1/generate", response_class=StreamingResponse,
              responses={200: {"content": {"text/event-stream": {}}}})
    async def generate(body: GenerateRequest, request: Request):
        """Stream one generation task's continuation of one input (server-sent events)."""
        rid, arrival = request.state.request_id, time.monotonic()
        if not service.ready:
            return error(503, f"not ready: {service.state}", rid, {"Retry-After": "1"})
        predictor = service.predictor
        task = predictor.tasks.get(body.task)
        if task is None:
            return error(404, f"unknown task {body.task!r}; valid tasks: {', '.join(predictor.tasks)}", rid)
        if not hasattr(task, "decode_with"):
            gen = [n for n, t in predictor.tasks.items() if hasattr(t, "decode_with")]
            return error(422, f"task {body.task!r} is a {task.cfg.type} task; /v1/generate streams generation "
                              f"tasks ({', '.join(gen) or 'this model has none'}); use /v1/predict", rid)
        limit = min(task.cfg.max_new_tokens, settings.max_new_tokens or task.cfg.max_new_tokens)
        if body.max_new_tokens is not None and body.max_new_tokens > limit:
            whose = "the task's" if limit == task.cfg.max_new_tokens else "the server's (max_new_tokens)"
            return error(422, f"max_new_tokens: {body.max_new_tokens} is over {whose} limit of {limit}", rid)
        limit = body.max_new_tokens or limit
        timeout_ms = body.timeout_ms or settings.default_timeout_ms
        if timeout_ms > settings.max_timeout_ms:
            return error(422, f"timeout_ms: {timeout_ms:g} is over the limit of {settings.max_timeout_ms:g}", rid)
        raw = body.input.model_dump(exclude_none=True) if hasattr(body.input, "model_dump") else body.input
        try:
            item = normalize_input(raw, 0, predictor.generation_fields)
            missing = [f for f in task.input_fields() if not str(item.get(f) or "").strip()]
            if missing:
                raise InputError(f"input.{missing[0]}: task {body.task!r} needs it")
        except InputError as e:
            return error(422, str(e).replace("inputs[0]", "input"), rid)
        if not streams.acquire(blocking=False):
            return error(429, f"{settings.max_streams} generation streams are open (max_streams)", rid,
                         {"Retry-After": "1"})
        try:
            items, sink = await _queue(service, body.task, item, limit, arrival + timeout_ms / 1000.0)
        except BaseException as e:
            streams.release()
            if isinstance(e, InputError):
                return error(422, str(e).replace("inputs[0]", "input"), rid)
            if isinstance(e, QueueFull):
                return error(429, str(e), rid, {"Retry-After": str(e.retry_after_s)})
            if isinstance(e, TooLarge):
                return error(413, str(e), rid)
            if isinstance(e, Stopped):
                return error(503, str(e), rid, {"Retry-After": "1"})
            raise
        return StreamingResponse(_events(service, items, sink, streams), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _queue(service, name: str, item: dict, limit: int, deadline: float):
        """Tokenise (tokenizer thread) and queue one input for `name`'s batch -> (batcher items, sink).
        Raises InputError, QueueFull, TooLarge, Stopped."""
        predictor, batcher = service.predictor, service.batcher
        group = next(iter(predictor.groups([name])))
        ticket = batcher.reserve(1, min_tokens(item, group, predictor.max_length) + limit)
        try:
            feat = (await service.runner.tokenize({group: [item]}))[group][0]
        except BaseException:
            batcher.release(ticket)
            raise
        sink = Sink(asyncio.get_running_loop(), deadline)
        feat.new_tokens = limit
        feat.meta.update({"max_new_tokens": limit, "sink": sink.put, "stop": sink.stop})
        return batcher.submit(ticket, [(feat, group, (name,))], deadline), sink

    async def _events(service, items, sink: Sink, streams):
        """The SSE body: pieces as they come, then done (the whole text) or error. Leaving early (the
        client closed the connection) drops the input if queued and stops its row if running."""
        future = items[0].future
        try:
            while True:
                getter = asyncio.ensure_future(sink.queue.get())
                left = sink.deadline + 1.0 - time.monotonic()    # a running row stops at the deadline itself
                done, _ = await asyncio.wait({getter, future}, timeout=max(0.0, left),
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield f"data: {json.dumps({'text': getter.result()})}\n\n"
                    continue
                getter.cancel()
                if future not in done:
                    yield f"event: error\ndata: {json.dumps({'detail': 'deadline passed (timeout_ms)'})}\n\n"
                    return
                while not sink.queue.empty():      # pieces put before the batch returned
                    yield f"data: {json.dumps({'text': sink.queue.get_nowait()})}\n\n"
                if future.cancelled() or future.exception() is not None:
                    e = None if future.cancelled() else future.exception()
                    detail = ("deadline passed while queued" if isinstance(e, asyncio.TimeoutError) or e is None
                              else f"{type(e).__name__}: {e}")
                    yield f"event: error\ndata: {json.dumps({'detail': detail})}\n\n"
                else:
                    text = next(iter(future.result().values()))["text"]
                    yield f"event: done\ndata: {json.dumps({'text': text})}\n\n"
                return
        finally:
            sink.gone = True
            service.batcher.cancel(items)
            streams.release()
