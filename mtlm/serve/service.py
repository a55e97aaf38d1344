"""One model in one server process: load -> warm up -> ready -> (draining) -> stopped.

`Service.predict` is the request path without HTTP: validate (on the loop, microseconds) -> reserve queue
room -> tokenise (tokenizer thread) -> submit to the batcher -> await every input's result -> merge the
field groups back into one {task: result} dict per input. The model never runs on the event loop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

from mtlm.predict import InputError, Plan, Predictor, min_tokens, normalize_input
from mtlm.serve.batcher import Batcher, TooLarge
from mtlm.serve.metrics import ServeMetrics
from mtlm.serve.runner import Runner
from mtlm.serve.schemas import ServeSettings

log = logging.getLogger("mtlm.serve")

WARMUP_INPUT = {"text": "Warm-up sentence for the first batch.", "text_pair": "A second warm-up sentence.",
                "question": "What is this?", "context": "This is a warm-up context for the first batch.",
                "choices": ["A first warm-up choice.", "A second one."]}


def deadline_floors(settings: ServeSettings, input_cost_ms: float) -> list[tuple[int, float]]:
    """The least timeout_ms per request size: [(up to this many inputs, least timeout_ms)], ascending.

    A request of n inputs is given n x `input_cost_ms` (ms; one input alone through tokenizer and model,
    which costs more than one input of a batch: a conservative estimate of the time an idle server needs),
    never less than `min_timeout_ms`. Sizes are tiers
    of 1, 4, 16, 64, ... inputs up to `max_inputs_per_request` (JSON Schema can state a minimum per tier,
    not a product), floors rounded up to 10 ms and capped at `max_timeout_ms`; tiers with the same floor
    merge. Deterministic for a given `input_cost_ms`."""
    top, out, n = settings.max_inputs_per_request, [], 1
    while True:
        n = min(n, top)
        floor = min(settings.max_timeout_ms,
                    max(settings.min_timeout_ms, math.ceil(n * input_cost_ms / 10 - 1e-9) * 10))
        if out and out[-1][1] == floor:
            out[-1] = (n, floor)
        else:
            out.append((n, floor))
        if n == top:
            return out
        n *= 4


def least_timeout_ms(floors: list[tuple[int, float]], inputs: int) -> float:
    """The least timeout_ms (ms) of a request of `inputs` inputs under `deadline_floors`."""
    return next((floor for most, floor in floors if inputs <= most), floors[-1][1])


class NotReady(Exception):
    """The model is still loading or warming up, or failed to load (then the message says why)."""


class Service:
    """Owns the predictor, the runner threads, the batcher and the metrics of one process.

    `source`: a run folder / bundle path, or a zero-argument callable returning a `Predictor` (tests).
    `state`: "loading" (model loading or warming up), "ready", "draining", "stopped" or "failed"."""

    def __init__(self, source: str | Path | Callable[[], Predictor], settings: ServeSettings):
        self.source, self.settings = source, settings
        self.metrics = ServeMetrics()
        self.state = "loading"
        self.error: str | None = None
        self.drain_requested = False       # set by the signal handler; the event loop then drains
        self.predictor: Predictor | None = None
        self.runner: Runner | None = None
        self.batcher: Batcher | None = None
        self._load_task: asyncio.Task | None = None
        self.input_cost_ms: float | None = settings.input_cost_ms   # measured at warm-up when not set
        self.floors: list[tuple[int, float]] | None = None          # `deadline_floors`, once warmed up

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def _batcher_failed(self, error: Exception) -> None:
        """The batching loop died: /ready and /health answer 503 with the reason (an orchestrator restarts
        the process), predict answers 503 rather than letting every request time out."""
        if self.state in ("loading", "ready"):
            self.state, self.error = "failed", f"batching loop failed: {type(error).__name__}: {error}"
        self.metrics.ready.set(0)

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Begin loading in the background and return at once (so /health answers while loading). Once
        only: a second call (the app's lifespan after `mtlm.serve.ray` started the service) does nothing."""
        if self._load_task is not None:
            return
        self._load_task = asyncio.get_running_loop().create_task(self._load(), name="mtlm-load")

    async def wait_ready(self, timeout_s: float) -> None:
        """Wait until ready. Raises NotReady when loading failed, asyncio.TimeoutError after `timeout_s`."""
        await asyncio.wait_for(asyncio.shield(self._load_task), timeout_s)
        if not self.ready:
            raise NotReady(self.error or self.state)

    async def _load(self) -> None:
        try:
            t0 = time.perf_counter()
            if callable(self.source):
                predictor = await asyncio.to_thread(self.source)
            else:
                from mtlm.predict import load
                if self.settings.torch_threads:      # an ONNX Runtime session takes its threads when created
                    import torch
                    torch.set_num_threads(self.settings.torch_threads)
                predictor = await asyncio.to_thread(load, self.source, None, self.settings.engine)
            predictor.max_pass_tokens = self.settings.max_batch_tokens   # a many-window input runs in chunks
            self.predictor = predictor
            self.runner = Runner(predictor, self.settings.torch_threads)
            self.batcher = Batcher(self.runner.forward, self.settings, self.metrics)
            self.batcher.on_failure = self._batcher_failed
            self.batcher.start()
            t1 = time.perf_counter()
            await self._warm_up()
            if self.input_cost_ms is None:
                self.input_cost_ms = await self._input_cost_ms()
            self.floors = deadline_floors(self.settings, self.input_cost_ms)
            # the model, tokenizer and modules live as long as the server: move them out of the garbage
            # collector's generations, so its full collections stop rescanning them (8% of a saturated int8
            # server's samples were the collector: benchmarks/results/serve_profile_onnx-int8_int8.json)
            gc.collect()
            gc.freeze()
            log.info("model %s (engine %s) loaded in %.1f s, warmed up in %.2f s; tasks: %s; least timeout_ms: %s "
                     "(%.1f ms per input)", predictor.name, predictor.engine.name, t1 - t0, time.perf_counter() - t1,
                     ", ".join(predictor.tasks), ", ".join(f"{f:g} up to {n} inputs" for n, f in self.floors),
                     self.input_cost_ms)
        except Exception as e:   # keep serving /health and answer /ready 503 with the reason
            log.exception("loading the model failed")
            self.state, self.error = "failed", f"{type(e).__name__}: {e}"
            return
        if self.state == "loading":       # not draining already
            self.state = "ready"
            self.metrics.ready.set(1)

    async def _warm_up(self) -> None:
        """One real batch through the whole path (tokenizer, batcher, every head), so the first client
        does not pay for lazy initialisation."""
        items = [dict(WARMUP_INPUT)]
        await self.predict(items, self.predictor.plan(items, None), timeout_s=600.0, arrival=time.monotonic())

    async def _input_cost_ms(self, repeats: int = 3) -> float:
        """ms one warm-up input takes alone: tokenised and run through every field group the bundle has,
        one pass each (the least of `repeats` runs after the warm-up, so lazy initialisation is not
        counted). Runs on the runner's threads, outside the batcher (no metrics, no queue)."""
        items = [dict(WARMUP_INPUT)]
        plan = self.predictor.plan(items, None)
        jobs = {fields: [items[i] for i in plan.members[fields]] for fields in plan.groups}
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            feats = await self.runner.tokenize(jobs)
            for fields, names in plan.groups.items():
                await self.runner.forward(feats[fields], list(names))
            best = min(best, time.perf_counter() - t0)
        return best * 1e3

    def least_timeout_ms(self, inputs: int) -> float:
        """The least timeout_ms (ms) this server accepts for a request of `inputs` inputs: under it, the
        server expects to miss the deadline even when idle (`deadline_floors`, conservative) and answers
        422 before queueing. `min_timeout_ms` until warmed up."""
        if self.floors is None:
            return self.settings.min_timeout_ms
        return least_timeout_ms(self.floors, inputs)

    def begin_drain(self) -> None:
        """Stop taking requests (ready -> 503) but keep answering accepted ones. Signal-handler safe."""
        if self.state in ("loading", "ready"):
            self.state = "draining"
        if self.batcher is not None:
            self.batcher.begin_drain()
        self.metrics.ready.set(0)

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Drain: finish every accepted input (up to `timeout_s`), then stop the threads."""
        self.begin_drain()
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self.batcher is not None:
            await self.batcher.stop(timeout_s)
        if self.runner is not None:
            await asyncio.to_thread(self.runner.close)
        self.state = "stopped"

    # ---- the request path ----------------------------------------------------------------------
    def validate(self, inputs: list[Any], tasks: list[str] | None) -> tuple[list[dict], Plan]:
        """JSON inputs and task names -> (normalised inputs, `Predictor.plan`: the tasks each input gets;
        default: the tasks whose fields it carries).

        Raises NotReady, or InputError naming the problem: unknown task (listing the valid ones), empty
        input list, too many inputs, non-string or empty text, more than max_choices choices, a field a
        requested task needs missing (text_pair for a pair task, question / context for QA, choices for
        multiple choice), an input no task reads."""
        if self.predictor is None:
            raise NotReady(self.error or "model is loading")
        if not inputs:
            raise InputError("inputs: give at least one input")
        if len(inputs) > self.settings.max_inputs_per_request:
            raise InputError(f"inputs: {len(inputs)} inputs, at most {self.settings.max_inputs_per_request} "
                             "per request")
        items = []
        for i, x in enumerate(inputs):
            if hasattr(x, "model_dump"):
                x = x.model_dump(exclude_none=True)
            item = normalize_input(x, i, self.predictor.generation_fields)
            if len(item.get("choices", ())) > self.settings.max_choices:
                raise InputError(f"inputs[{i}].choices: {len(item['choices'])} choices, at most "
                                 f"{self.settings.max_choices} per input")
            items.append(item)
        return items, self.predictor.plan(items, tasks)

    async def predict(self, items: list[dict], plan: Plan, timeout_s: float, arrival: float
                      ) -> tuple[list[dict[str, dict]], dict[str, float]]:
        """(one {task: result} per input, in `plan.names` order, timing in ms) for validated inputs.

        `arrival`: time.monotonic() when the request arrived; the deadline is arrival + timeout_s.
        Raises QueueFull (429), TooLarge (413: before tokenising when a lower bound of the request's tokens
        is over the queue's token budget; after it, for a QA context of more than max_windows windows or
        padded tokens over the budget), Stopped (503), asyncio.TimeoutError (504: inputs not yet
        computed are dropped), or the model's exception (500)."""
        batcher, deadline = self.batcher, arrival + timeout_s
        jobs = {fields: [items[i] for i in plan.members[fields]] for fields in plan.groups}
        least = sum(min_tokens(it, fields, self.predictor.max_length) for fields, its in jobs.items() for it in its)
        ticket = batcher.reserve(sum(map(len, jobs.values())), least)
        try:
            t0 = time.perf_counter()
            feats = await self.runner.tokenize(jobs)
            tokenize_s = time.perf_counter() - t0
        except BaseException:
            batcher.release(ticket)
            raise
        self.metrics.tokenize_seconds.observe(tokenize_s)
        cap = self.settings.max_new_tokens
        for fields in plan.groups:          # generation inputs: the server's cap on new tokens per input
            for feat in feats[fields]:
                if cap is not None and feat.new_tokens > cap:
                    feat.new_tokens = cap
                    feat.meta["max_new_tokens"] = cap
        for fields in plan.groups:
            for i, feat in zip(plan.members[fields], feats[fields]):
                if "context" in fields and feat.rows > self.settings.max_windows:
                    batcher.release(ticket)
                    raise TooLarge(f"inputs[{i}].context: {feat.rows} windows of up to "
                                   f"{self.predictor.max_length} tokens, at most {self.settings.max_windows} per "
                                   f"input (max_windows)")
        entries, owners = [], []
        for fields, group in plan.groups.items():
            for i, feat in zip(plan.members[fields], feats[fields]):
                entries.append((feat, fields, tuple(n for n in group if n in plan.row_tasks[i])))
                owners.append(i)
        queued = batcher.submit(ticket, entries, deadline)
        results = await batcher.wait(queued, deadline)
        merged: list[dict[str, dict]] = [{} for _ in items]
        for i, res in zip(owners, results):
            merged[i].update(res)
        timing = {
            "tokenize_ms": tokenize_s * 1e3,
            "queue_ms": max((it.started - it.enqueued) * 1e3 for it in queued),
            "forward_ms": max(it.forward_s for it in queued) * 1e3,
            "total_ms": (time.monotonic() - arrival) * 1e3,
            "batch_size": max(it.batch_size for it in queued),
        }
        return [{n: r[n] for n in plan.names if n in r} for r in merged], timing

    def task_info(self) -> list[dict]:
        """Every task: name, type, input fields and labels (None for regression)."""
        if self.predictor is None:
            raise NotReady(self.error or "model is loading")
        return [{"name": n, "type": t.cfg.type, "input_fields": list(t.input_fields()),
                 "labels": list(t.labels) if hasattr(t, "labels") else None}
                for n, t in self.predictor.tasks.items()]
