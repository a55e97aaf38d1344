"""Multiple choice and response selection: score every (context, choice) pair, softmax over the choices.

Each example expands to one backbone row per choice: the text pair (context, choice), pooled -> dropout ->
linear -> one logit. An example's logits form a softmax over its own choices (any number per example, padded
with -inf in a batch) and the loss is the cross-entropy of the right one: the SWAG set-up of Devlin et al.
2019 (section 4.4) and Hugging Face's `BertForMultipleChoice`, with a variable number of choices.

Columns: `context` (text), `choices` (a list column, or a list of columns each holding one choice) and
`label` (the index of the right choice, or its text).

Metrics: accuracy (the right choice ranked first; in response selection this is recall@1 of N, "R_N@1",
Lowe et al. 2015), mrr (mean reciprocal rank of the right choice), recall_at_2 (the right choice in the top
two). Ties rank the right choice below the choices it ties with.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlm.encoded import Encoded
from mtlm.tasks.base import LinearHead, NothingToFit, compact_inputs

MISSING, WRONG, RIGHT = -1, 0, 1     # label-matrix entries: no choice in this slot, a wrong one, the right one


def encode_choices(tokenizer, contexts: list[str], choices: list[list[str]], max_length: int) -> list[dict]:
    """One feature per example whose "sequences" are its (context, choice) pairs, tokenized in one call
    (truncation longest-first), with "length" = choices x the longest pair (the example's padded tokens)
    and "truncated" when any pair was cut."""
    firsts = [c for c, ch in zip(contexts, choices) for _ in ch]
    seconds = [x for ch in choices for x in ch]
    enc = tokenizer(firsts, seconds, truncation=True, max_length=max_length)
    out, k = [], 0
    for ch in choices:
        seqs = [compact_inputs(enc, k + j) for j in range(len(ch))]
        truncated = any(enc.encodings[k + j].overflowing for j in range(len(ch)))
        out.append({"sequences": seqs, "length": len(seqs) * max(s["length"] for s in seqs),
                    "truncated": bool(truncated)})
        k += len(ch)
    return out


def grouped_scores(logits: Tensor, sizes: list[int]) -> list[Tensor]:
    """(rows, 1) logits, examples' choices consecutive, `sizes` choices each -> one (n_choices,) tensor per
    example."""
    return list(logits.float().reshape(-1).split(sizes))


class MultipleChoice(NothingToFit):
    roles: ClassVar[dict[str, bool]] = {"context": True, "choices": True, "label": True}
    default_columns: ClassVar[dict[str, str]] = {"context": "context", "choices": "choices", "label": "label"}
    list_roles: ClassVar[tuple[str, ...]] = ("choices",)   # roles that may name several columns
    class_role: ClassVar[None] = None                       # the label is a choice, not a class to stratify by
    joinable: ClassVar[bool] = False                        # one backbone row per choice
    metric_names: ClassVar[tuple[str, ...]] = ("accuracy", "mrr", "recall_at_2")
    lower_is_better: ClassVar[frozenset[str]] = frozenset()
    outputs: ClassVar[str] = "choices"
    head_input: ClassVar[str] = "pooled"

    def __init__(self, name: str, cfg):
        self.name, self.cfg = name, cfg

    def columns(self) -> dict[str, str | list[str]]:
        return {**self.default_columns, **self.cfg.columns}

    def input_fields(self) -> tuple[str, ...]:
        return ("text", "choices")

    def _choices(self, row: dict) -> Any:
        col = self.columns()["choices"]
        return [row.get(c) for c in col] if isinstance(col, list) else row.get(col)

    def _label(self, row: dict, choices: list[str]) -> int | None:
        """The right choice's index: the label is a choice's text, else an index (int or digit string)."""
        value = row.get(self.columns()["label"])
        if isinstance(value, str) and value.strip() in [c.strip() for c in choices]:
            return [c.strip() for c in choices].index(value.strip())
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(choices):
            return value
        return None

    def check_row(self, row: dict) -> list[tuple[str, str]]:
        cols, problems = self.columns(), []
        context = row.get(cols["context"])
        if context is None:
            problems.append((cols["context"], "missing"))
        elif not isinstance(context, str) or not context.strip():
            problems.append((cols["context"], f"expected a non-empty text, got {context!r}"[:120]))
        choices = self._choices(row)
        where = cols["choices"] if isinstance(cols["choices"], str) else ", ".join(cols["choices"])
        if not isinstance(choices, list) or len(choices) < 2 or \
                not all(isinstance(c, str) and c.strip() for c in choices):
            problems.append((where, f"expected at least 2 choices, each a non-empty text, got {choices!r}"[:160]))
            return problems
        label = row.get(cols["label"])
        if label is None:
            problems.append((cols["label"], "missing label"))
        elif self._label(row, choices) is None:
            problems.append((cols["label"], f"{label!r} is neither the text of a choice nor an index in "
                                            f"0..{len(choices) - 1}"))
        return problems

    def make_head(self, hidden_size: int, dropout: float) -> nn.Module:
        return LinearHead(hidden_size, 1, dropout)

    def encode(self, rows: list[dict], tokenizer, max_length: int) -> list[dict]:
        """One feature per example (see `encode_choices`) with "label": the right choice's index."""
        ctx_col = self.columns()["context"]
        choices = [self._choices(r) for r in rows]
        feats = encode_choices(tokenizer, [r[ctx_col] for r in rows], choices, max_length)
        for f, r, ch in zip(feats, rows, choices):
            f["label"] = self._label(r, ch)
        return feats

    def encode_inputs(self, items: list[dict], tokenizer, max_length: int) -> list[Encoded]:
        """Prediction inputs {"text": context, "choices": [...]} -> one Encoded per input, one row per choice
        (`encode_choices`, as in training); meta: the "choices"."""
        feats = encode_choices(tokenizer, [it["text"] for it in items], [it["choices"] for it in items], max_length)
        return [Encoded([{k: v for k, v in s.items() if k != "length"} for s in f["sequences"]],
                        {"choices": it["choices"]}, f["truncated"]) for f, it in zip(feats, items)]

    def collate_labels(self, features: list[dict], seq_len: int) -> dict[str, Tensor]:
        """labels (batch, max_choices): RIGHT / WRONG per choice, MISSING past an example's last choice.
        Row-major order of the non-MISSING entries is the order of the backbone rows."""
        labels = np.full((len(features), max(len(f["sequences"]) for f in features)), MISSING, dtype=np.int64)
        for i, f in enumerate(features):
            labels[i, :len(f["sequences"])] = WRONG
            labels[i, f["label"]] = RIGHT
        return {"labels": torch.from_numpy(labels)}

    def loss(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Mean cross-entropy of the right choice over each example's choices.

        logits (rows, 1): one per (context, choice) pair, examples' choices consecutive; batch["labels"]
        (batch, max_choices) from `collate_labels`. Missing choices get -inf, so they take no probability."""
        labels = batch["labels"]
        scores = torch.full(labels.shape, float("-inf"), device=logits.device)
        scores[labels != MISSING] = logits.float().reshape(-1)
        return F.cross_entropy(scores, (labels == RIGHT).long().argmax(-1))

    def predictions(self, logits: Tensor, features: list[dict]) -> list[Any]:
        """One list of choice logits per example."""
        return [s.tolist() for s in grouped_scores(logits, [len(f["sequences"]) for f in features])]

    def postprocess(self, predictions: list[Any], features: list[dict]) -> list[Any]:
        """One feature per example (its choices are its rows): the predictions as they are."""
        return predictions

    def references(self, features: list[dict]) -> list[Any]:
        return [f["label"] for f in features]

    def metrics(self, predictions: list[Any], references: list[Any]) -> dict[str, float]:
        ranks = [1 + sum(s >= scores[gold] for k, s in enumerate(scores) if k != gold)
                 for scores, gold in zip(predictions, references)]
        n = max(1, len(ranks))
        return {"accuracy": sum(r == 1 for r in ranks) / n, "mrr": sum(1 / r for r in ranks) / n,
                "recall_at_2": sum(r <= 2 for r in ranks) / n}

    def decode(self, logits: Tensor, inputs: list[Encoded]) -> list[dict]:
        """logits (rows, 1), each input's choices consecutive -> [{"label": the best choice's text, "index": its
        position, "score": its probability, "scores": probabilities of all choices in input order}]."""
        out = []
        for scores, encoded in zip(grouped_scores(logits, [e.rows for e in inputs]), inputs):
            meta = encoded.meta
            probs = scores.softmax(-1).tolist()
            best = max(range(len(probs)), key=probs.__getitem__)
            out.append({"label": meta["choices"][best], "index": best, "score": probs[best], "scores": probs})
        return out
