"""Dynamic micro-batching on the event loop: a bounded queue of tokenised inputs -> backbone passes.

Each input of a request becomes one `Item` per field group (single-text tasks share one, pair tasks
another; see `Predictor.groups`), carrying the task names it wants. The loop forms a batch when the model
is free:

- anchor: the oldest queued item (so nothing starves); the batch holds only items of its field group;
- length grouping: the other items are taken closest-in-length first, while the batch stays within
  `max_batch_size` inputs and `max_batch_tokens` padded tokens (inputs x longest input);
- a batch that is not full waits for more items until its anchor has been queued `max_wait_ms` (so at
  most max_wait_ms once the model is free, and not at all under load, when the anchor arrived while the
  previous batch ran: the model never idles with work queued longer than that); draining never waits;
- items wanting different task subsets share the pass: the runner computes the union of their heads and
  each item gets back only the tasks it asked for.

Backpressure: `reserve` + `submit` admit a request whole or not at all, against `max_queue` inputs and
`max_queue_tokens` tokens; when full they raise `QueueFull` at once (-> 429 with Retry-After). An item
whose request deadline passes while queued is dropped, never computed (-> 504).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol

from mtlm.encoded import Encoded
from mtlm.predict import Abandoned
from mtlm.serve.schemas import ServeSettings

log = logging.getLogger("mtlm.serve")

Fields = tuple[str, ...]
# feats, heads, tasks per row, the batch's last deadline (time.monotonic()) -> per-row {task: result}
Forward = Callable[[list[dict], list[str], list[list[str]], float], Awaitable[list[dict[str, dict]]]]


class QueueFull(Exception):
    """The queue cannot take the request now. `retry_after_s`: whole seconds (>= 1) until it likely can."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TooLarge(Exception):
    """The request alone is larger than the whole queue (inputs or tokens); retrying cannot help."""


class Stopped(Exception):
    """The batcher is draining or stopped and takes no new work."""


class Observer(Protocol):
    """Where the batcher reports what it does (see `mtlm.serve.metrics.ServeMetrics`). Times in seconds."""

    def queue_depth(self, inputs: int, tokens: int) -> None: ...
    def queue_wait(self, seconds: float) -> None: ...
    def batch(self, size: int, padded_tokens: int, real_tokens: int, forward_s: float) -> None: ...


class _NoObserver:
    def queue_depth(self, inputs: int, tokens: int) -> None: pass
    def queue_wait(self, seconds: float) -> None: pass
    def batch(self, size: int, padded_tokens: int, real_tokens: int, forward_s: float) -> None: pass


@dataclass(eq=False)
class Item:
    """One input of one request, for one field group. Times are `time.monotonic()` seconds."""

    feat: Encoded               # `Predictor.encode`'s typed input; feat.length is its padded token count
    group: Fields
    tasks: tuple[str, ...]      # heads this input wants from this group
    deadline: float
    future: asyncio.Future
    seq: int = 0
    enqueued: float = 0.0
    started: float | None = None     # when its batch started (None: never ran)
    forward_s: float = 0.0           # its batch's forward time
    batch_size: int = 0

    @property
    def tokens(self) -> int:
        return self.feat.length


@dataclass(eq=False)
class Ticket:
    """Queue room reserved for `inputs` inputs while a request is tokenised; `submit` or `release` it."""

    inputs: int
    open: bool = field(default=True)


class Batcher:
    """Owns the queue and the batching loop. Use from one event loop: `start()`, `reserve()` ->
    `submit()` -> `wait()`, `begin_drain()`, `await stop()`."""

    def __init__(self, forward: Forward, settings: ServeSettings, observer: Observer | None = None):
        self.forward, self.settings = forward, settings
        self.observer: Observer = observer or _NoObserver()
        self._pending: dict[Fields, dict[int, Item]] = {}    # per group, insertion (= arrival) order
        self._queued_inputs = self._queued_tokens = self._reserved = 0
        self._seq = 0
        self._tokens_per_s = 0.0          # EWMA of forward throughput, for Retry-After
        self._draining = self._stopping = False
        self._running: list[Item] = []    # the batch in the model thread now
        self._wakeup: asyncio.Event | None = None
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self.failed: Exception | None = None   # set when the batching loop ended on an error
        self.on_failure: Callable[[Exception], None] | None = None   # told once, on the event loop

    # ---- state -------------------------------------------------------------------------------
    @property
    def queued_inputs(self) -> int:
        return self._queued_inputs

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    @property
    def draining(self) -> bool:
        return self._draining

    def full(self) -> bool:
        """No room for even one more input (so any request would get QueueFull); False while draining."""
        return not self._draining and (self._queued_inputs + self._reserved >= self.settings.max_queue
                                       or self._queued_tokens >= self.settings.queue_tokens)

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._wakeup = asyncio.Event()
        self._event_loop = asyncio.get_running_loop()
        self._task = self._event_loop.create_task(self._loop(), name="mtlm-batcher")

    def begin_drain(self) -> None:
        """Take no new requests; stop waiting for batch company. Safe to call from a signal handler or
        another thread."""
        self._draining = True
        if self._event_loop is not None and not self._event_loop.is_closed():
            self._event_loop.call_soon_threadsafe(self._wake)

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Drain: finish every queued item (up to `timeout_s`), then end the loop. Items still queued after
        the timeout fail with `Stopped`."""
        self._draining = self._stopping = True
        if self._task is None:
            return
        self._wake()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except asyncio.TimeoutError:
            log.error("batcher: drain timed out after %.1f s; failing %d queued inputs", timeout_s,
                      self._queued_inputs)
            self._task.cancel()
            left = self._running + [it for g in self._pending.values() for it in g.values()]
            for it in left:
                self._remove(it)
                if not it.future.done():
                    it.future.set_exception(Stopped("server stopped before this input was answered"))

    # ---- admission ---------------------------------------------------------------------------
    def reserve(self, inputs: int, min_tokens: int = 0) -> Ticket:
        """Room for `inputs` inputs, checked before tokenising so a full server answers in microseconds.
        `min_tokens`: a lower bound of the request's tokens (`mtlm.predict.min_tokens`).
        Raises Stopped (draining), TooLarge (more than max_queue inputs, or at least min_tokens tokens over
        the queue's token budget: refused without tokenising) or QueueFull."""
        if self._draining:
            raise Stopped("server is draining")
        if inputs > self.settings.max_queue:
            raise TooLarge(f"{inputs} inputs exceed the queue size ({self.settings.max_queue})")
        if min_tokens > self.settings.queue_tokens:
            raise TooLarge(f"at least {min_tokens} tokens (one per word), over the queue's token budget "
                           f"({self.settings.queue_tokens})")
        if self._queued_inputs + self._reserved + inputs > self.settings.max_queue:
            raise QueueFull(f"queue full ({self._queued_inputs} inputs queued and {self._reserved} being admitted, "
                            f"limit {self.settings.max_queue})", self.retry_after())
        self._reserved += inputs
        return Ticket(inputs)

    def release(self, ticket: Ticket) -> None:
        """Give back a reservation that will not be submitted (idempotent)."""
        if ticket.open:
            ticket.open = False
            self._reserved -= ticket.inputs

    def submit(self, ticket: Ticket, entries: list[tuple[Encoded, Fields, tuple[str, ...]]], deadline: float
               ) -> list[Item]:
        """Queue (encoded input, field group, task names) entries of one request, all or none.

        `deadline`: time.monotonic() seconds after which queued entries are dropped. Consumes `ticket`.
        Raises Stopped, TooLarge (more tokens than the whole queue holds) or QueueFull (tokens)."""
        self.release(ticket)
        if self._draining:
            raise Stopped("server is draining")
        tokens = sum(feat.length for feat, _, _ in entries)
        limit = self.settings.queue_tokens
        if tokens > limit:
            raise TooLarge(f"{tokens} padded tokens (a QA context or multiple-choice input counts its sequences x "
                           f"the longest) exceed the queue's token budget ({limit})")
        if self._queued_tokens + tokens > limit:
            raise QueueFull(f"queue full ({self._queued_tokens} tokens queued, limit {limit})", self.retry_after())
        loop, now = asyncio.get_running_loop(), time.monotonic()
        items = []
        for feat, group, tasks in entries:
            self._seq += 1
            it = Item(feat, group, tasks, deadline, loop.create_future(), self._seq, now)
            self._pending.setdefault(group, {})[it.seq] = it
            items.append(it)
        self._queued_inputs += len(items)
        self._queued_tokens += tokens
        self.observer.queue_depth(self._queued_inputs, self._queued_tokens)
        self._wake()
        return items

    async def wait(self, items: list[Item], deadline: float) -> list[dict[str, dict]]:
        """Each item's {task: result}, in order. Raises asyncio.TimeoutError at `deadline` (queued items are
        dropped uncomputed), or the batch's exception. If the caller is cancelled, its items are dropped."""
        futures = [it.future for it in items]
        try:
            done, pending = await asyncio.wait(futures, timeout=max(0.0, deadline - time.monotonic()),
                                               return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:
            self.cancel(items)
            raise
        failed = [f for f in done if not f.cancelled() and f.exception() is not None]
        if failed or pending:
            self.cancel(items)
            if failed:
                raise failed[0].exception()
            raise asyncio.TimeoutError(f"{len(pending)} of {len(items)} inputs not computed by the deadline")
        return [f.result() for f in futures]

    def cancel(self, items: list[Item]) -> None:
        """Drop items that have not run yet; results of running ones will be discarded."""
        for it in items:
            if it.started is None:
                self._remove(it)
            if not it.future.done():
                it.future.cancel()
        self.observer.queue_depth(self._queued_inputs, self._queued_tokens)

    def retry_after(self) -> int:
        """Whole seconds until the queued tokens would have run at the recent throughput (1..60)."""
        if self._tokens_per_s <= 0:
            return 1
        return max(1, min(60, math.ceil(self._queued_tokens / self._tokens_per_s)))

    # ---- the loop ----------------------------------------------------------------------------
    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _remove(self, it: Item) -> None:
        group = self._pending.get(it.group)
        if group is not None and group.pop(it.seq, None) is not None:
            self._queued_inputs -= 1
            self._queued_tokens -= it.tokens
            if not group:
                del self._pending[it.group]

    def _expire(self, items: list[Item], now: float) -> list[Item]:
        """Drop (504, uncomputed) the items whose deadline passed; return the others. Handlers also drop
        their own items at their deadline, so this only catches the few that expire in between."""
        alive = []
        for it in items:
            if it.deadline <= now:
                self._remove(it)
                if not it.future.done():
                    it.future.set_exception(asyncio.TimeoutError("deadline passed while queued"))
            else:
                alive.append(it)
        return alive

    def _oldest(self) -> Item:
        return min((next(iter(g.values())) for g in self._pending.values()), key=lambda it: it.seq)

    def _pick(self, anchor: Item, now: float) -> tuple[list[Item], bool]:
        """The anchor plus the closest-in-length items of its group that fit; (batch, full).

        Only the group's oldest 4 x max_batch_size items are considered: bounded work per batch and
        bounded overtaking, however long the queue."""
        s = self.settings
        window = self._expire(list(itertools.islice(self._pending[anchor.group].values(), 4 * s.max_batch_size)),
                              now)
        window.sort(key=lambda it: (abs(it.tokens - anchor.tokens), it.seq))
        batch, longest, full = [], 0, False
        for it in window:
            if len(batch) == s.max_batch_size:
                return batch, True
            new_longest = max(longest, it.tokens)
            if batch and new_longest * (len(batch) + 1) > s.max_batch_tokens:
                full = True          # a shorter item further down may still fit
                continue
            batch.append(it)
            longest = new_longest
        return batch, full or len(batch) == s.max_batch_size

    async def _next_batch(self) -> list[Item] | None:
        max_wait = self.settings.max_wait_ms / 1000.0
        while True:
            if not self._pending:
                if self._stopping:
                    return None
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            now = time.monotonic()
            anchor = self._oldest()
            if anchor.deadline <= now:
                self._expire([anchor], now)
                continue
            batch, full = self._pick(anchor, now)
            wait_until = anchor.enqueued + max_wait
            if full or self._draining or now >= wait_until:
                return batch
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), wait_until - now)
            except asyncio.TimeoutError:
                pass

    async def _loop(self) -> None:
        """Form and run batches until stopped. An exception while running a batch (in the model, an
        observer, or results that do not fit the batch) is logged and fails that batch's inputs at once
        (-> 500); the loop goes on. An exception outside any batch fails every queued input and ends the
        loop with `failed` set, so the server turns /ready to 503 instead of timing every request out."""
        while True:
            try:
                batch = await self._next_batch()
            except Exception as e:
                log.exception("batcher: the batching loop failed; failing %d queued inputs and stopping",
                              self._queued_inputs)
                self._fail_all(e)
                return
            if batch is None:
                return
            try:
                await self._run(batch)
            except Exception as e:
                log.exception("batcher: a batch of %d inputs failed outside the model (its unanswered "
                              "inputs get 500); the loop goes on", len(batch))
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(e)

    def _fail_all(self, error: Exception) -> None:
        self.failed = error
        self._draining = self._stopping = True
        for it in [*self._running, *(it for g in self._pending.values() for it in g.values())]:
            self._remove(it)
            if not it.future.done():
                it.future.set_exception(error)
        if self.on_failure is not None:
            self.on_failure(error)

    async def _run(self, batch: list[Item]) -> None:
        now = time.monotonic()
        for it in batch:
            self._remove(it)
            it.started = now
        for it in batch:
            self.observer.queue_wait(now - it.enqueued)
        self.observer.queue_depth(self._queued_inputs, self._queued_tokens)
        names = list(dict.fromkeys(n for it in batch for n in it.tasks))   # union of heads, stable order
        t0 = time.perf_counter()
        self._running = batch
        try:
            results = await self.forward([it.feat for it in batch], names, [it.tasks for it in batch],
                                         max(it.deadline for it in batch))
        except Abandoned as e:   # every deadline passed mid-batch: the handlers have answered 504 already
            log.info("batch of %d abandoned past its deadline (%s)", len(batch), e)
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(asyncio.TimeoutError("deadline passed while computing"))
            return
        except Exception as e:   # a model failure answers this batch's requests with 500, not the server
            log.exception("batch of %d failed", len(batch))
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(e)
            return
        finally:
            self._running = []
        dt = time.perf_counter() - t0
        if len(results) != len(batch):
            raise RuntimeError(f"the model returned {len(results)} results for a batch of {len(batch)} inputs")
        answers = [{n: res[n] for n in it.tasks} for it, res in zip(batch, results)]
        for it, answer in zip(batch, answers):
            it.forward_s, it.batch_size = dt, len(batch)
            if not it.future.done():
                it.future.set_result(answer)
        real = sum(it.tokens for it in batch)
        if dt > 0:
            rate = real / dt
            self._tokens_per_s = rate if self._tokens_per_s == 0 else 0.8 * self._tokens_per_s + 0.2 * rate
        self.observer.batch(len(batch), len(batch) * max(it.tokens for it in batch), real, dt)
