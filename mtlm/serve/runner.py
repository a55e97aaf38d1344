"""The model's side of the server: tokenise and run micro-batches off the event loop.

Two single-thread executors: one tokenises requests (a fast tokenizer must not be called from two
threads at once: it raises "Already borrowed"), one runs `Predictor.run` under `torch.inference_mode()`.
A single model thread means batches run one at a time, which is what the batcher wants: while a batch
runs, the next one gathers. torch's own intra-op threads still use every core given to it.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import torch

from mtlm.predict import Predictor

Fields = tuple[str, ...]


class Runner:
    """Wraps a loaded `Predictor`. `await tokenize(...)` and `await forward(...)` never block the loop."""

    def __init__(self, predictor: Predictor, torch_threads: int | None = None):
        self.predictor = predictor
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="mtlm-tokenize")
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="mtlm-model")

    async def tokenize(self, items: list[dict], groups: list[Fields]) -> dict[Fields, list[dict]]:
        """Normalised inputs -> {fields: one feature dict per input} for each field group.

        Feature dicts are `Predictor.encode`'s (input ids, offsets, word_ids, "length" in tokens,
        "truncated"). Inputs must already be validated (pair groups need "text_pair" on every item)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_thread, self._tokenize, items, groups)

    def _tokenize(self, items: list[dict], groups: list[Fields]) -> dict[Fields, list[dict]]:
        return {fields: self.predictor.encode(items, fields) for fields in groups}

    async def forward(self, feats: list[dict], names: list[str]) -> list[dict[str, dict]]:
        """One backbone pass over `feats` (one field group), every head in `names` -> per-input {task: result}.

        Exceptions from the model (out of memory, a bug) propagate to the awaiting batcher."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._model_thread, self._forward, feats, names)

    def _forward(self, feats: list[dict], names: list[str]) -> list[dict[str, dict]]:
        with torch.inference_mode():
            return self.predictor.run(feats, names)

    def close(self) -> None:
        """Wait for running work, then stop both threads."""
        self._tokenizer_thread.shutdown(wait=True)
        self._model_thread.shutdown(wait=True)
