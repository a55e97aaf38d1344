"""The model's side of the server: tokenise requests and run micro-batches, the model off the event loop.

Tokenising a small request (a few sentences: ~0.1 ms) happens on the event loop: a thread hop costs more
than that in GIL hand-offs. Larger requests go to a tokenizer thread, which uses its own copy of the
tokenizer (one fast tokenizer used from two threads can raise "Already borrowed"). `Predictor.run` (which
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
from mtlm.predict import Predictor

Fields = tuple[str, ...]


class Runner:
    """Wraps a loaded `Predictor`. `await forward(...)` never runs the model on the event loop;
    `await tokenize(...)` runs on it only for requests of at most `inline_chars` characters."""

    def __init__(self, predictor: Predictor, torch_threads: int | None = None, inline_chars: int = 2000):
        """inline_chars: requests with at most this many characters in all are tokenised on the loop."""
        self.predictor, self.inline_chars = predictor, inline_chars
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
        (`Predictor.plan`: every input carries its group's fields)."""
        chars = sum(len(v) if isinstance(v, str) else sum(map(len, v))
                    for items in jobs.values() for it in items for v in it.values())
        if chars <= self.inline_chars:
            return self._tokenize(self.predictor, jobs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_thread, self._tokenize, self._thread_predictor, jobs)

    @staticmethod
    def _tokenize(predictor: Predictor, jobs: dict[Fields, list[dict]]) -> dict[Fields, list[Encoded]]:
        return {fields: predictor.encode(items, fields) for fields, items in jobs.items()}

    async def forward(self, feats: list[Encoded], names: list[str], row_tasks: list[list[str]] | None = None,
                      deadline: float | None = None) -> list[dict[str, dict]]:
        """One engine pass over `feats` (one field group), every head in `names` -> per-input {task: result}
        for the tasks that input asked for (`row_tasks`, default all).

        deadline: time.monotonic() after which nobody waits for the result: a batch run in several backbone
        chunks (a long QA context) stops between chunks and raises mtlm.predict.Abandoned. Exceptions from
        the model (out of memory, a bug) propagate to the awaiting batcher."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._model_thread, self._forward, feats, names, row_tasks, deadline)

    def _forward(self, feats: list[Encoded], names: list[str], row_tasks: list[list[str]] | None,
                 deadline: float | None) -> list[dict[str, dict]]:
        should_stop = None if deadline is None else (lambda: time.monotonic() > deadline)
        with torch.inference_mode():
            return self.predictor.run(feats, names, row_tasks, should_stop=should_stop)

    def close(self) -> None:
        """Wait for running work, then stop both threads."""
        self._tokenizer_thread.shutdown(wait=True)
        self._model_thread.shutdown(wait=True)
