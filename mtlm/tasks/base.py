"""The task-type contract every task type implements, and the pieces several types share.

A task type turns raw rows into features, owns its head, its loss, its metrics and the decoding of its
logits into user-facing results. The training loop, evaluation, bundle and server only talk to this
contract, keyed by task name.

Feature dicts (one per example) hold ``input_ids`` and optional ``token_type_ids`` (unpadded int arrays;
the attention mask is implied by ``length`` and made when padding), ``length`` (tokens) and task-specific
label fields. `pad_inputs` pads a micro-batch of them. Compact numpy arrays keep a 67k-row training set
~3x smaller in memory than Python int lists.

A feature may instead hold ``sequences``: a list of such input dicts that each take one backbone row
(multiple choice: one (context, choice) pair per choice). `pad_inputs` flattens them in order, so a task's logits have one row per sequence and the
task splits them back by ``len(feature["sequences"])``.

Prediction inputs are encoded by the type's `encode_inputs` into typed `mtlm.encoded.Encoded` inputs
(backbone rows apart from decode metadata), through the same tokenization function as `encode`, so a
model sees at prediction time exactly the encoding it was trained on. `decode` reads them.

Hooks every type declares (the defaults below are what most types use):
- ``postprocess(per_feature_predictions, features) -> per_example_predictions``: merges the predictions of
  features that are parts of one example (extractive QA windows); identity for one feature per example.
  `mtlm.evaluate.task_outputs` calls it after `predictions`; `references(features)` returns one reference
  per example, in the same order.
- ``encode_inputs(items, tokenizer, max_length) -> one Encoded per item``: how `mtlm.predict.Predictor`
  encodes prediction inputs of the type's field group (text tasks: `encode_texts`' tokenization).
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from mtlm.config import TaskConfig
from mtlm.encoded import Encoded

INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
STORED_KEYS = ("input_ids", "token_type_ids")     # kept per feature; attention_mask follows from length


class TaskType(Protocol):
    """What a task type provides. Instances are per task name and hold fitted state (labels, stats)."""

    roles: ClassVar[dict[str, bool]]          # column role -> required
    default_columns: ClassVar[dict[str, str]]  # role -> default column name
    metric_names: ClassVar[tuple[str, ...]]    # metrics this type reports; the first is the default selection
    head_input: ClassVar[str]                  # "pooled" (batch, hidden) or "tokens" (batch, seq_len, hidden)
    # the role holding a row's one class: splits made from train are stratified by it (mtlm.data); None when
    # the type has no classes or several per row
    class_role: ClassVar[str | None]
    # whether tasks of this type can share a micro-batch with other tasks labelled on the same rows (a joint
    # group, mtlm.data): one backbone row and one feature per data row
    joinable: ClassVar[bool]
    lower_is_better: ClassVar[frozenset[str]]  # metrics where smaller is better (>= 0, 0 perfect); the others
    #                                            lie in [-1, 1] or [0, 1] with 1 perfect (mtlm.selection relies on it)
    outputs: ClassVar[str]  # what the logits are: categorical (softmax over the last dim), bernoulli (sigmoid
    #                         per label), real, span (softmax over positions per start/end), choices (softmax
    #                         over an example's choice rows); mtlm.adversarial compares outputs by it

    name: str
    cfg: TaskConfig

    def columns(self) -> dict[str, str]: ...
    def input_fields(self) -> tuple[str, ...]: ...            # request fields needed at predict time
    def check_row(self, row: dict) -> list[tuple[str, str]]: ...  # (column, problem) for a malformed row
    def fit(self, rows: list[dict]) -> None: ...                # build label maps / stats from train rows
    def check_eval_rows(self, rows: list[dict]) -> list[str]: ...  # e.g. labels unseen in train
    def state(self) -> dict: ...                                 # JSON-able fitted state for tasks.json
    def make_head(self, hidden_size: int, dropout: float) -> nn.Module: ...
    def encode(self, rows: list[dict], tokenizer, max_length: int) -> list[dict]: ...
    def collate_labels(self, features: list[dict], seq_len: int) -> dict[str, Tensor]: ...
    def loss(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor: ...
    def predictions(self, logits: Tensor, features: list[dict]) -> list[Any]: ...
    def references(self, features: list[dict]) -> list[Any]: ...
    def postprocess(self, predictions: list[Any], features: list[dict]) -> list[Any]: ...  # features -> examples
    def metrics(self, predictions: list[Any], references: list[Any]) -> dict[str, float]: ...
    def encode_inputs(self, items: list[dict], tokenizer, max_length: int) -> list[Encoded]: ...
    def decode(self, logits: Tensor, inputs: list[Encoded]) -> list[dict]: ...  # one result per input


class RowProblems(Exception):
    """Rows a task type cannot encode (found only with the tokenizer, e.g. a prompt longer than max_length):
    ``problems`` holds (row index, column, problem); `mtlm.data.encode_rows` names the file and line."""

    def __init__(self, problems: list[tuple[int, str, str]]):
        self.problems = problems
        super().__init__(f"{len(problems)} row(s) cannot be encoded")


class LinearHead(nn.Module):
    """dropout -> linear. Input (batch, hidden) for pooled heads or (batch, seq_len, hidden) for token heads;
    output (..., num_outputs) logits."""

    def __init__(self, hidden_size: int, num_outputs: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.dropout(x))


def text_columns(task: Any) -> tuple[str, str | None]:
    cols = task.columns()
    return cols["text"], cols.get("text_pair")


def check_texts(task: Any, row: dict) -> list[tuple[str, str]]:
    """Problems with the text / text_pair fields of a raw row."""
    problems = []
    for role in ("text", "text_pair"):
        col = task.columns().get(role)
        if col is None:
            continue
        problems += text_problems(col, row.get(col))
    return problems


def text_problems(col: str, value: Any, what: str = "text") -> list[tuple[str, str]]:
    """[(column, reason)] for a raw row's text field: missing, not a string, or blank ("empty <what>")."""
    if value is None:
        return [(col, "missing" if what == "text" else f"missing {what}")]
    if not isinstance(value, str):
        return [(col, f"expected text, got {type(value).__name__}")]
    return [] if value.strip() else [(col, f"empty {what}")]


def tokenize_texts(tokenizer, texts: list[str], pairs: list[str] | None, max_length: int):
    """The one tokenization of text (and text pair) inputs, for training rows and prediction inputs alike:
    truncation longest-first to max_length tokens. Returns the tokenizer's BatchEncoding."""
    return tokenizer(texts, pairs, truncation=True, max_length=max_length)


# Rows tokenized per call when encoding a training set: one call over 67k SST-2 rows holds a BatchEncoding
# whose many small Python objects, once freed, leave ~220 MB of resident memory the allocator keeps (measured:
# +266 MB RSS in one call, +44 MB in chunks of this size; same features).
ENCODE_CHUNK = 2048


def encode_texts(task: Any, rows: list[dict], tokenizer, max_length: int) -> list[dict]:
    """Tokenize the text (and text_pair) column of each row, ENCODE_CHUNK rows per tokenizer call. Returns
    unpadded feature dicts."""
    text_col, pair_col = text_columns(task)
    out = []
    for start in range(0, len(rows), ENCODE_CHUNK):
        chunk = rows[start:start + ENCODE_CHUNK]
        enc = tokenize_texts(tokenizer, [r[text_col] for r in chunk],
                             [r[pair_col] for r in chunk] if pair_col else None, max_length)
        out += [compact_inputs(enc, i) for i in range(len(chunk))]
    return out


def model_inputs(enc, i: int) -> dict[str, np.ndarray]:
    """Row i of a BatchEncoding as backbone inputs only: input_ids (and token_type_ids), unpadded."""
    out = compact_inputs(enc, i)
    del out["length"]
    return out


def compact_inputs(enc, i: int) -> dict:
    """Example i of a tokenizer BatchEncoding as a compact feature: int32 input_ids, int8 token_type_ids."""
    out = {"input_ids": np.asarray(enc["input_ids"][i], dtype=np.int32), "length": len(enc["input_ids"][i])}
    if "token_type_ids" in enc:
        out["token_type_ids"] = np.asarray(enc["token_type_ids"][i], dtype=np.int8)
    return out


def pad_inputs(features: list[dict], pad_token_id: int) -> dict[str, Tensor]:
    """Pad input_ids / attention_mask / token_type_ids to the longest in the micro-batch (dynamic padding).

    Features hold lists or arrays; a missing attention_mask is all ones over the example's length. A feature
    with ``sequences`` contributes one row per sequence, in order. Returns (rows, seq_len) int64 tensors,
    rows = the number of features plus the extra sequences."""
    features = [s for f in features for s in f.get("sequences", (f,))]
    seq_len = max(len(f["input_ids"]) for f in features)
    keys = [k for k in STORED_KEYS if k in features[0]]
    out = {k: np.full((len(features), seq_len), pad_token_id if k == "input_ids" else 0, dtype=np.int64)
           for k in keys}
    mask = np.zeros((len(features), seq_len), dtype=np.int64)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        for k in keys:
            out[k][row, :n] = f[k]
        if "attention_mask" in f:
            mask[row, :n] = f["attention_mask"]
        else:
            mask[row, :n] = 1
    out["attention_mask"] = mask
    return {k: torch.from_numpy(out[k]) for k in INPUT_KEYS if k in out}


def label_sort_key(label: str):
    """Numeric labels sort numerically ('2' < '10'); others alphabetically."""
    try:
        return (0, float(label), "")
    except ValueError:
        return (1, 0.0, label)


def as_label(value: Any) -> str | None:
    """A class label as a string, or None when the value cannot be a class label (list, float 0.5, ...)."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


class TextTask:
    """Shared plumbing of task types whose input is a text (or text pair): column mapping, text checks,
    tokenization. Concrete types add labels, head, loss, metrics and decoding."""

    roles: ClassVar[dict[str, bool]] = {"text": True, "text_pair": False}
    default_columns: ClassVar[dict[str, str]] = {"text": "text"}
    head_input: ClassVar[str] = "pooled"

    def __init__(self, name: str, cfg: TaskConfig):
        self.name, self.cfg = name, cfg

    def columns(self) -> dict[str, str]:
        return {**self.default_columns, **self.cfg.columns}

    def input_fields(self) -> tuple[str, ...]:
        return ("text", "text_pair") if "text_pair" in self.cfg.columns else ("text",)

    def check_eval_rows(self, rows: list[dict]) -> list[str]:
        return []

    def encode(self, rows: list[dict], tokenizer, max_length: int) -> list[dict]:
        features = encode_texts(self, rows, tokenizer, max_length)
        for f, r in zip(features, rows):
            f.update(self.label_fields(r))
        return features

    def encode_inputs(self, items: list[dict], tokenizer, max_length: int) -> list[Encoded]:
        """Prediction inputs {"text", "text_pair"?} -> one single-row Encoded each (meta: the "text"),
        tokenized as in training (`tokenize_texts`)."""
        texts = [it["text"] for it in items]
        pairs = [it["text_pair"] for it in items] if "text_pair" in self.input_fields() else None
        enc = tokenize_texts(tokenizer, texts, pairs, max_length)
        return [Encoded([model_inputs(enc, i)], {"text": it["text"]}, bool(enc.encodings[i].overflowing))
                for i, it in enumerate(items)]

    def postprocess(self, predictions: list[Any], features: list[dict]) -> list[Any]:
        """One feature per example: the predictions as they are."""
        return predictions

    def label_fields(self, row: dict) -> dict:
        raise NotImplementedError


class NothingToFit:
    """The fitted-state half of the contract for task types that learn nothing from train rows beyond the
    head (answer spans, choice scoring): no label map, no eval-label checks, empty state in tasks.json."""

    def fit(self, rows: list[dict]) -> None:
        pass

    def check_eval_rows(self, rows: list[dict]) -> list[str]:
        return []

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass
