"""Predict every task for new inputs from one backbone pass per input.

`mtlm.load(path)` returns a `Predictor`. Inputs are strings or dicts of input fields: {"text", "text_pair"?}
for text tasks, {"question", "context"} for extractive QA, {"text", "choices"} for multiple choice (one input
may carry the fields of several kinds). Tasks that read the same input fields share one backbone pass: all
single-text tasks (classification, multilabel, regression, tagging) run on one encoding of the text; pair
tasks on one encoding of the pair; a QA input runs all windows of its context, a multiple-choice input one
row per choice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mtlm.checkpoint import load_bundle
from mtlm.data import length_sorted_batches
from mtlm.tasks.base import INPUT_KEYS, pad_inputs

TEXT_FIELDS = ("text", "text_pair", "question", "context")   # string fields of an input
FIELDS = TEXT_FIELDS + ("choices",)                           # every field an input may have


class InputError(ValueError):
    """A prediction input that cannot be served (unknown task, missing text_pair, empty text, ...)."""


def normalize_input(item: Any, index: int) -> dict:
    """A str or a dict of input fields -> dict. Raises InputError naming the input index and field.

    Fields: text, text_pair, question, context (strings), choices (a non-empty list of non-empty strings).
    An input needs a non-empty text, or a non-empty question and context; which fields each task needs
    is checked by `check_fields`."""
    if isinstance(item, str):
        item = {"text": item}
    if not isinstance(item, dict):
        raise InputError(f"inputs[{index}]: expected a string or an object with 'text', got {type(item).__name__}")
    for key, value in item.items():
        if key not in FIELDS:
            raise InputError(f"inputs[{index}].{key}: unknown field (expected {', '.join(FIELDS)})")
        if key == "choices":
            if not isinstance(value, list) or not value or not all(isinstance(c, str) and c.strip() for c in value):
                raise InputError(f"inputs[{index}].choices: expected a non-empty list of non-empty strings")
        elif not isinstance(value, str):
            raise InputError(f"inputs[{index}].{key}: expected a string, got {type(value).__name__}")
    qa = [k for k in ("question", "context") if k in item]
    for key in (("question", "context") if qa else ("text",)):
        if not item.get(key, "").strip():
            raise InputError(f"inputs[{index}].{key}: missing or empty")
    return item


def check_fields(items: list[dict], groups: dict[tuple[str, ...], list[str]]) -> None:
    """Every input has every field that the tasks of each field group read. Raises InputError naming the
    inputs (first five) and the tasks, e.g. "inputs[0, 2]: task(s) paraphrase need 'text_pair'"."""
    for fields, group in groups.items():
        for field in fields:
            missing = [i for i, it in enumerate(items) if not it.get(field) or
                       (isinstance(it[field], str) and not it[field].strip())]
            if missing:
                raise InputError(f"inputs{missing[:5]}: task(s) {', '.join(group)} need '{field}'")


class Predictor:
    """A loaded bundle: `predict(inputs, tasks=None)` -> one {task: result} dict per input.

    Results: classification {"label", "score", "scores"}; multilabel {"labels", "scores"}; regression
    {"value"}; token_classification {"entities": [{"entity", "text", "start", "end", "score"}]} with character
    offsets into the text; extractive_qa {"answer", "start", "end", "score", "no_answer"} with character
    offsets into the context; multiple_choice {"label": the best choice, "index", "score", "scores"}. A result
    carries "truncated": true when the input exceeded max_length tokens (for QA: the question was cut; a
    long context is read window by window, never cut)."""

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
        """Tokenize items for one group -> one feature dict per item with a truncation flag and "length".

        Text groups: input ids, offsets, word_ids. A group whose task type has `encode_inputs` (QA,
        multiple choice) is encoded by it: features hold several "sequences" (backbone rows)."""
        owner = next((t for t in self.tasks.values()
                      if tuple(t.input_fields()) == fields and hasattr(t, "encode_inputs")), None)
        if owner is not None:
            return owner.encode_inputs(items, self.tokenizer, self.max_length)
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
        """One backbone pass over a micro-batch of encoded inputs (one field group), every head in `names`.
        A feature with "sequences" takes one row per sequence; its task's `decode` regroups them.

        row_tasks: the tasks each row asked for (default: all of `names`); a head's logits are decoded
        only for the rows that asked for it (the server mixes requests for different task subsets)."""
        batch = {k: v.to(self.device) for k, v in pad_inputs(feats, self.tokenizer.pad_token_id).items()}
        logits = self.model(tasks=names, **batch)
        out: list[dict[str, dict]] = [{} for _ in feats]
        expanded = any("sequences" in f for f in feats)   # logits rows != features: decode all, keep asked
        for n in names:
            rows = [i for i in range(len(feats)) if row_tasks is None or n in row_tasks[i]]
            if not rows:
                continue
            if expanded:
                rows = list(range(len(feats)))
            head_logits = logits[n] if len(rows) == len(feats) else logits[n][rows]
            for i, result in zip(rows, self.tasks[n].decode(head_logits.float(), [feats[i] for i in rows])):
                if row_tasks is not None and n not in row_tasks[i]:
                    continue
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
        groups = self.groups(names)
        check_fields(items, groups)
        for fields, group in groups.items():
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
