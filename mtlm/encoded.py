"""Typed encoded inputs for prediction: what the model reads, kept apart from what decoding reads.

`Encoded` is one prediction input encoded for one field group by its task type's `encode_inputs`: the
backbone rows of that input (unpadded token ids) and the per-input metadata its heads' `decode` needs
(character offsets, word ids, the context, the choices). `ModelInputs` is a padded micro-batch of such rows:
tensors only, what an engine (`mtlm.engine`) runs and what `MultiTaskModel.infer` takes.

This module imports nothing of mtlm: task types, engines, the predictor and the server all build on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor


@dataclass
class Encoded:
    """One prediction input, encoded for one field group.

    sequences: its backbone rows, in order, each {"input_ids": int array, "token_type_ids"?: int array},
        unpadded (one row for a text or text pair; one per window of a long QA context; one per choice of a
        multiple-choice input). Nothing else: the model reads these and only these.
    meta: what decoding needs, per task type: text groups {"text", and for word tagging "word_ids" (per
        token of the row, None for special tokens) and "spans" (per word, character [start, end) in the
        text)}; extractive QA {"context", "offsets": per window an int32 (length, 2) array of the context
        characters of each token, -1 outside the context}; multiple choice {"choices"}.
    truncated: the input did not fit max_length tokens and was cut (for QA: the question; a long context is
        read window by window, never cut).
    new_tokens: the tokens the input grows by while it is served (a generation prompt: its most new tokens),
        counted in `length`, so the server's batch and queue budgets bound prompt + generated tokens."""

    sequences: list[dict[str, np.ndarray]]
    meta: dict[str, Any] = field(default_factory=dict)
    truncated: bool = False
    new_tokens: int = 0

    @property
    def rows(self) -> int:
        """Backbone rows this input takes."""
        return len(self.sequences)

    @property
    def length(self) -> int:
        """Padded tokens of this input alone: rows x (its longest row + new_tokens) (what the server's batcher
        budgets)."""
        return self.rows * (max(len(s["input_ids"]) for s in self.sequences) + self.new_tokens)


@dataclass
class ModelInputs:
    """A padded micro-batch of backbone rows: int64 tensors of shape (rows, seq_len).

    attention_mask is 1 on real tokens and 0 on padding; token_type_ids is None for tokenizers without
    segment ids."""

    input_ids: Tensor
    attention_mask: Tensor
    token_type_ids: Tensor | None = None

    @classmethod
    def from_dict(cls, batch: dict[str, Tensor]) -> ModelInputs:
        """From `mtlm.tasks.base.pad_inputs`' dict (input_ids, attention_mask, optional token_type_ids)."""
        return cls(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, seq_len)."""
        return tuple(self.input_ids.shape)

    def as_dict(self) -> dict[str, Tensor]:
        """The non-None tensors by name (keyword arguments for `MultiTaskModel.infer`)."""
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.token_type_ids is not None:
            out["token_type_ids"] = self.token_type_ids
        return out

    def rows(self, start: int, stop: int) -> ModelInputs:
        """Rows [start, stop) of the batch (same seq_len)."""
        return ModelInputs(*(None if t is None else t[start:stop]
                             for t in (self.input_ids, self.attention_mask, self.token_type_ids)))

    def to(self, device) -> ModelInputs:
        return ModelInputs(*(None if t is None else t.to(device)
                             for t in (self.input_ids, self.attention_mask, self.token_type_ids)))
