"""The model's side of the server: tokenise requests and run micro-batches, the model off the event loop.

Tokenising happens in one tokenizer thread, batched: the requests that queue while it works are tokenised
together in one call per field group (with its own copy of the tokenizer: one fast tokenizer used from two
threads can raise "Already borrowed"). `Predictor.run` (which
runs the backbone and heads through the predictor's engine, `mtlm.engine`) runs in a single model thread
under `torch.inference_mode()`: batches run one at a time, which is what the batcher wants (while a batch
runs, the next one gathers); torch's intra-op threads still use every core.
"""

from __future__ import annotations

import asyncio
import copy
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from mtlm.encoded import Encoded
from mtlm.predict import Abandoned, Predictor

Fields = tuple[str, ...]


PASS_COST_TOKENS = 64     # the fixed cost of one engine pass, in padded tokens' worth of work (`length_passes`)


def length_passes(feats: list[Encoded], pass_cost_tokens: int = PASS_COST_TOKENS) -> list[list[int]]:
    """A micro-batch's inputs split into engine passes of similar length: index lists, inputs sorted by their
    longest row, cut where it minimises the padded tokens run (each pass pads its rows to its longest) plus
    `pass_cost_tokens` per pass (exact, by dynamic programming over the sorted order: O(n^2), n <= the
    batch size). A batch of mixed lengths (short SST-2 sentences next to long news items) then runs as a
    few homogeneous passes, as `Predictor.predict` gets by sorting its inputs; a homogeneous batch stays
    one pass. Measured here on 640 real texts in arrival-order batches of 64 (SST-2, AG News, CoNLL; 1
    thread): CPU per text 22.0 -> 10.5 ms (torch), 12.4 -> 5.7 ms (onnx-int8) at a cost of 64 (5.5 passes
    per batch); 12.0 / 6.9 ms at 256. Returns [] for no inputs."""
    order = sorted(range(len(feats)), key=lambda i: max(len(s["input_ids"]) for s in feats[i].sequences))
    longest = [max(len(s["input_ids"]) for s in feats[i].sequences) for i in order]
    rows = [0]
    for i in order:
        rows.append(rows[-1] + feats[i].rows)
    best, cut = [0.0] + [float("inf")] * len(order), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):           # best[end]: the cheapest split of the first `end` inputs
        for start in range(end):                   # the last pass holds order[start:end]
            cost = best[start] + (rows[end] - rows[start]) * longest[end - 1] + pass_cost_tokens
            if cost < best[end]:
                best[end], cut[end] = cost, start
    passes, end = [], len(order)
    while end:
        passes.append(order[cut[end]:end])
        end = cut[end]
    return passes[::-1]


class Runner:
    """Wraps a loaded `Predictor`. `await forward(...)` and `await tokenize(...)` never run the model or the
    tokenizer on the event loop."""

    def __init__(self, predictor: Predictor, torch_threads: int | None = None,
                 pass_cost_tokens: int = PASS_COST_TOKENS):
        """pass_cost_tokens: see `length_passes`."""
        self.predictor, self.pass_cost_tokens = predictor, pass_cost_tokens
        self._waiting: list[tuple[dict[Fields, list[dict]], asyncio.Future]] = []   # requests for the next group
        self._tokenizing = False                   # a group is in the tokenizer thread (or about to be)
        self._thread_predictor = copy.copy(predictor)          # shares the model, not the tokenizer
        self._thread_predictor.tokenizer = copy.deepcopy(predictor.tokenizer)
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="mtlm-tokenize")
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="mtlm-model")

    async def tokenize(self, jobs: dict[Fields, list[dict]]) -> dict[Fields, list[Encoded]]:
        """{field group: normalised inputs} -> {field group: one `Encoded` per input}.

        `Predictor.encode`'s typed inputs: backbone rows (one per text; one per QA window or choice), decode
        metadata, truncation; `.length` is the input's padded tokens. Inputs must already be validated
        (`Predictor.plan`: every input carries its group's fields).

        Batch tokenisation: the requests waiting when the tokenizer thread becomes free (and those arriving
        in the same event-loop turn) are tokenised together, one `Predictor.encode` call per field group
        for all of them (one tokenizer call for many requests instead of one each; measured here 0.16 vs
        0.22 ms of CPU per text), in the tokenizer thread, never on the event loop. Each input's encoding
        is the one it gets alone (tests/test_serve_speed.py). Raises what `Predictor.encode` raises for
        this request's inputs."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append((jobs, future))
        if not self._tokenizing:
            self._tokenizing = True
            loop.call_soon(self._next_group, loop)     # requests of this loop turn join the group
        return await future

    def _next_group(self, loop: asyncio.AbstractEventLoop) -> None:
        group = [(jobs, f) for jobs, f in self._waiting if not f.done()]    # done: the request was cancelled
        self._waiting = []
        if not group:
            self._tokenizing = False
            return
        work = loop.run_in_executor(self._tokenizer_thread, self._tokenize_group, self._thread_predictor,
                                    [jobs for jobs, _ in group])

        def deliver(work: asyncio.Future) -> None:
            try:
                answers = work.result()
            except BaseException as e:           # the executor itself failed (shut down): fail the group
                answers = [e] * len(group)
            for (_, f), answer in zip(group, answers):
                if not f.done():
                    if isinstance(answer, BaseException):
                        f.set_exception(answer)
                    else:
                        f.set_result(answer)
            self._next_group(loop)               # whatever arrived meanwhile is the next group
        work.add_done_callback(deliver)

    @staticmethod
    def _tokenize_group(predictor: Predictor, requests: list[dict[Fields, list[dict]]]
                        ) -> list[dict[Fields, list[Encoded]] | Exception]:
        """Every request's {field group: Encoded per input}, one `encode` call per field group over all of them.
        If a joint call raises, each request is tokenised alone, so only the request at fault gets the error."""
        try:
            out: list[dict[Fields, list[Encoded]]] = [{} for _ in requests]
            for fields in dict.fromkeys(f for jobs in requests for f in jobs):
                owners = [(k, len(jobs[fields])) for k, jobs in enumerate(requests) if fields in jobs]
                encoded = predictor.encode([it for k, _ in owners for it in requests[k][fields]], fields)
                at = 0
                for k, n in owners:
                    out[k][fields], at = encoded[at:at + n], at + n
            return out
        except Exception:
            if len(requests) == 1:
                raise
        answers: list[dict[Fields, list[Encoded]] | Exception] = []
        for jobs in requests:
            try:
                answers.append({fields: predictor.encode(items, fields) for fields, items in jobs.items()})
            except Exception as e:
                answers.append(e)
        return answers

    async def forward(self, feats: list[Encoded], names: list[str], row_tasks: list[list[str]] | None = None,
                      deadline: float | None = None) -> list[dict[str, dict]]:
        """`feats` (one field group) through the engine, every head in `names` -> per-input {task: result}
        for the tasks that input asked for (`row_tasks`, default all), in `feats` order. The micro-batch runs
        as `length_passes`: passes of similar lengths, so short inputs are not padded to the longest (a generation
        task's micro-batch runs as one batched `generate`: its cost is per decoding step, not per padded token).

        deadline: time.monotonic() after which nobody waits for the result: a batch run in several backbone
        chunks (a long QA context) stops between chunks and raises mtlm.predict.Abandoned. Exceptions from
        the model (out of memory, a bug) propagate to the awaiting batcher."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._model_thread, self._forward, feats, names, row_tasks, deadline)

    def _forward(self, feats: list[Encoded], names: list[str], row_tasks: list[list[str]] | None,
                 deadline: float | None) -> list[dict[str, dict]]:
        should_stop = None if deadline is None else (lambda: time.monotonic() > deadline)
        out: list[dict[str, dict] | None] = [None] * len(feats)
        with torch.inference_mode():
            tasks = self.predictor.tasks
            if any(hasattr(tasks[n], "decode_with") for n in names):    # generation: one batched generate call
                passes = [list(range(len(feats)))]
            else:
                passes = length_passes(feats, self.pass_cost_tokens)
            for k, members in enumerate(passes):
                if k and should_stop is not None and should_stop():
                    raise Abandoned(f"stopped after {k} passes of a micro-batch of {len(feats)} inputs")
                results = self.predictor.run([feats[i] for i in members], names,
                                             None if row_tasks is None else [row_tasks[i] for i in members],
                                             should_stop=should_stop)
                if len(results) != len(members):
                    raise RuntimeError(f"the model returned {len(results)} results for a batch of {len(members)} inputs")
                for i, result in zip(members, results):
                    out[i] = result
        return out

    def close(self) -> None:
        """Wait for running work, then stop both threads."""
        self._tokenizer_thread.shutdown(wait=True)
        self._model_thread.shutdown(wait=True)
