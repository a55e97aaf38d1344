"""`POST /v1/generate`: one generation task's continuation of one input, streamed as server-sent events.

Body: {"task": name, "input": a string or an input object, "max_new_tokens": optional cap (at most the
task's own `max_new_tokens`)}. Events: `data: {"text": <new text>}` per decoded piece, then
`event: done` with `data: {"text": <the whole continuation>}` (or `event: error` with a "detail").

The model runs in a worker thread (`transformers.TextIteratorStreamer` hands the pieces over), never on
the event loop; at most `ServeSettings.max_streams` streams run at once (one more -> 429 with Retry-After);
each stream stops after the request's deadline (`timeout_ms`, default `default_timeout_ms`; `generate`'s
max_time). Errors before the stream starts are plain JSON errors: 404 unknown task, 422 a task that is not
a generation task or a bad input, 503 not ready.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

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


def add_generate_route(app, service, settings, error) -> None:
    """Register `POST /v1/generate` on `app`. error(status, detail, request_id, headers) builds a 4xx/5xx."""
    from mtlm.predict import InputError, normalize_input
    from mtlm.tasks.generation import causal_lm

    streams = threading.BoundedSemaphore(settings.max_streams)

    @app.post("/v1/generate", response_class=StreamingResponse,
              responses={200: {"content": {"text/event-stream": {}}}})
    async def generate(body: GenerateRequest, request: Request):
        """Stream one generation task's continuation of one input (server-sent events)."""
        rid = request.state.request_id
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
        if body.max_new_tokens is not None and body.max_new_tokens > task.cfg.max_new_tokens:
            return error(422, f"max_new_tokens: {body.max_new_tokens} is over the task's limit of "
                              f"{task.cfg.max_new_tokens}", rid)
        timeout_ms = body.timeout_ms or settings.default_timeout_ms
        if timeout_ms > settings.max_timeout_ms:
            return error(422, f"timeout_ms: {timeout_ms:g} is over the limit of {settings.max_timeout_ms:g}", rid)
        raw = body.input.model_dump(exclude_none=True) if hasattr(body.input, "model_dump") else body.input
        try:
            item = normalize_input(raw, 0, predictor.generation_fields)
            missing = [f for f in task.input_fields() if not str(item.get(f) or "").strip()]
            if missing:
                raise InputError(f"input.{missing[0]}: task {body.task!r} needs it")
            encoded = task.encode_inputs([item], predictor.tokenizer, predictor.max_length)[0]
        except InputError as e:
            return error(422, str(e).replace("inputs[0]", "input"), rid)
        if not streams.acquire(blocking=False):
            return error(429, f"{settings.max_streams} generation streams are running (max_streams)", rid,
                         {"Retry-After": "1"})
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(predictor.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                        timeout=timeout_ms / 1000.0 + 5.0)
        causal_lm(predictor.model.backbone)
        outcome: dict[str, Any] = {}

        def work():
            try:
                extra = {"streamer": streamer, "max_time": timeout_ms / 1000.0}
                if body.max_new_tokens is not None:
                    extra["max_new_tokens"] = body.max_new_tokens
                outcome["text"] = task.generate(predictor.model, [encoded.meta["prompt_ids"]],
                                                predictor.tokenizer.pad_token_id,
                                                predictor.tokenizer.eos_token_id, **extra)[0]
            except Exception as e:      # reported as an error event; the streamer must still end
                outcome["error"] = f"{type(e).__name__}: {e}"
                streamer.end()
            finally:
                streams.release()

        worker = threading.Thread(target=work, name=f"generate-{rid}", daemon=True)
        worker.start()

        async def events():
            pieces = iter(streamer)
            while True:
                piece = await asyncio.to_thread(next, pieces, None)
                if piece is None:
                    break
                if piece:
                    yield f"data: {json.dumps({'text': piece})}\n\n"
            await asyncio.to_thread(worker.join)       # the streamer ends before generate() returns the text
            if "error" in outcome:
                yield f"event: error\ndata: {json.dumps({'detail': outcome['error']})}\n\n"
            else:
                yield f"event: done\ndata: {json.dumps({'text': outcome.get('text', '')})}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
