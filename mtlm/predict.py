"""Predict every task for new inputs from one backbone pass per input.

`mtlm.load(path)` returns a `Predictor`. Inputs are strings or {"text": ..., "text_pair": ...} dicts.
Tasks that read the same input fields share one backbone pass: all single-text tasks (classification,
multilabel, regression, tagging) run on one encoding of the text; pair tasks on one encoding of the pair.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mtlm.checkpoint import load_bundle
from mtlm.data import length_sorted_batches
from mtlm.tasks.base import INPUT_KEYS, pad_inputs


class InputError(ValueError):
    """A prediction input that cannot be served (unknown task, missing text_pair, empty text, ...)."""


def normalize_input(item: Any, index: int) -> dict:
    """A str or {"text", "text_pair"?} -> dict. Raises InputError naming the input index."""
    if isinstance(item, str):
        item = {"text": item}
    if not isinstance(item, dict):
        raise InputError(f"inputs[{index}]: expected a string or an object with 'text', got {type(item).__name__}")
    for key, value in item.items():
        if key not in ("text", "text_pair"):
            raise InputError(f"inputs[{index}].{key}: unknown field (expected text, text_pair)")
        if not isinstance(value, str):
            raise InputError(f"inputs[{index}].{key}: expected a string, got {type(value).__name__}")
    if not item.get("text", "").strip():
        raise InputError(f"inputs[{index}].text: missing or empty")
    return item


class Predictor:
    """A loaded bundle: `predict(inputs, tasks=None)` -> one {task: result} dict per input.

    Results: classification {"label", "score", "scores"}; multilabel {"labels", "scores"}; regression
    {"value"}; token_classification {"entities": [{"entity", "text", "start", "end", "score"}]} with character
    offsets into the text. A result carries "truncated": true when the input exceeded max_length tokens."""

    def __init__(self, model, tokenizer, tasks: dict, meta: dict, device: torch.device):
        self.model, self.tokenizer, self.tasks, self.meta, self.device = model, tokenizer, tasks, meta, device
        self.max_length = int(meta["max_length"])

    @property
    def name(self) -> str:
        return self.meta.get("name", "mtlm")

    def check_tasks(self, tasks: list[str] | None) -> list[str]:
        """The requested task names (all when None). Raises InputError listing the valid ones."""
        if tasks is None:
            return list(self.tasks)
        unknown = [t for t in tasks if t not in self.tasks]
        if unknown or not tasks:
            raise InputError(f"unknown task(s) {unknown or tasks}; valid tasks: {', '.join(self.tasks)}")
        return list(dict.fromkeys(tasks))

    def groups(self, names: list[str]) -> dict[tuple[str, ...], list[str]]:
        """Requested tasks grouped by the input fields they read (one backbone pass per group)."""
        out: dict[tuple[str, ...], list[str]] = {}
        for n in names:
            out.setdefault(tuple(self.tasks[n].input_fields()), []).append(n)
        return out

    def encode(self, items: list[dict], fields: tuple[str, ...]) -> list[dict]:
        """Tokenize items for one group -> feature dicts with offsets, word_ids and a truncation flag."""
        texts = [it["text"] for it in items]
        pairs = [it["text_pair"] for it in items] if "text_pair" in fields else None
        enc = self.tokenizer(texts, pairs, truncation=True, max_length=self.max_length,
                             return_offsets_mapping=True, return_overflowing_tokens=False)
        feats = []
        for i, it in enumerate(items):
            e = enc.encodings[i]
            feats.append({**{k: enc[k][i] for k in INPUT_KEYS if k in enc}, "length": len(enc["input_ids"][i]),
                          "offsets": enc["offset_mapping"][i], "word_ids": e.word_ids, "text": it["text"],
                          "sequence_ids": e.sequence_ids, "truncated": bool(e.overflowing)})
        return feats

    @torch.inference_mode()
    def run(self, feats: list[dict], names: list[str], row_tasks: list[list[str]] | None = None
            ) -> list[dict[str, dict]]:
        """One backbone pass over a micro-batch of encoded inputs, every head in `names`.

        row_tasks: the tasks each row asked for (default: all of `names`); a head's logits are decoded
        only for the rows that asked for it (the server mixes requests for different task subsets)."""
        batch = {k: v.to(self.device) for k, v in pad_inputs(feats, self.tokenizer.pad_token_id).items()}
        logits = self.model(tasks=names, **batch)
        out: list[dict[str, dict]] = [{} for _ in feats]
        for n in names:
            rows = list(range(len(feats))) if row_tasks is None else \
                [i for i, wanted in enumerate(row_tasks) if n in wanted]
            if not rows:
                continue
            head_logits = logits[n] if len(rows) == len(feats) else logits[n][rows]
            for i, result in zip(rows, self.tasks[n].decode(head_logits.float(), [feats[i] for i in rows])):
                if feats[i]["truncated"]:
                    result["truncated"] = True
                out[i][n] = result
        return out

    def predict(self, inputs: list[Any] | str, tasks: list[str] | None = None, batch_size: int = 32
                ) -> list[dict[str, dict]]:
        """Predict `tasks` (default: all) for each input. Raises InputError on bad inputs or task names."""
        if isinstance(inputs, (str, dict)):
            inputs = [inputs]
        if isinstance(tasks, str):
            tasks = [tasks]
        if not inputs:
            raise InputError("no inputs to predict")
        items = [normalize_input(x, i) for i, x in enumerate(inputs)]
        names = self.check_tasks(tasks)
        results: list[dict[str, dict]] = [{} for _ in items]
        for fields, group in self.groups(names).items():
            if "text_pair" in fields:
                missing = [i for i, it in enumerate(items) if not it.get("text_pair", "").strip()]
                if missing:
                    raise InputError(f"inputs{missing[:5]}: task(s) {', '.join(group)} need 'text_pair'")
            feats = self.encode(items, fields)
            for idx in length_sorted_batches([f["length"] for f in feats], batch_size):
                for i, res in zip(idx, self.run([feats[i] for i in idx], group)):
                    results[i].update(res)
        return [{n: r[n] for n in names} for r in results]


def load(path: str | Path, device: str | None = None) -> Predictor:
    """Load a run folder or bundle for prediction. Raises mtlm.checkpoint.BundleError."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer, tasks, meta = load_bundle(path, dev)
    return Predictor(model, tokenizer, tasks, meta, dev)
