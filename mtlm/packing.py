"""Sequence packing (`train.packing: true`): several short examples of one source in one backbone row.

A packed micro-batch holds the same `batch_size` examples as an unpacked one, placed first-fit (longest
first) into rows of at most `max_length` tokens (fewer rows, little padding). The row length is chosen per
micro-batch (`choose_rows`): a multiple of the batch's longest example that minimises an estimated cost,
per token a fixed part plus a part that grows with the row length (attention scores, their softmax and
dropout: measured on a 2-core AVX2 CPU, a token in a 128-token row costs ~2.1x one in a 19-token row). When
the cheapest layout puts one example per row (length-grouped batches of similar lengths), the micro-batch is
the plain padded one: no mask to build, nothing to unpack. Attention stays within each example: the
backbone gets a block-diagonal 4D additive mask (the form transformers 5 passes through as-is to its eager
and sdpa attention, on CPU and GPU) and each example's own position ids 0..len-1, so every example's token
states are those of the example alone. `unpack_states` then scatters them back to the unpacked layout
(examples, longest example, hidden), where pooling, heads, labels and losses work exactly as unpacked: a
packed batch's per-task losses equal the unpacked batch's (up to float summation order). Following the
packed-sequence training of Krell et al. 2021 ("Efficient Sequence Packing without Cross-contamination").

Packing applies to training batches of task types with one backbone row per example (`joinable` types:
classification, text pairs, regression, multilabel, tagging); evaluation and prediction run unpacked.
Extractive QA (windows) and multiple choice (a row per choice) cannot pack: `check_packable` refuses them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mtlm.config import RecipeError
from mtlm.tasks.base import STORED_KEYS

PACKED_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "example_ids")


def check_packable(tasks: dict, adversarial: str = "none", adapters: bool = False) -> None:
    """Raise RecipeError unless every task's type can pack (one backbone row per example) and nothing else
    in the recipe reads the rows unpacked: private layers (run the backbone in pieces), adversarial
    training (perturbs the padded rows' embeddings), LoRA adapters (`adapters:` given; routed per row)."""
    problems = [f"tasks.{n}: train.packing with a task type that cannot pack ({t.cfg.type}: several backbone "
                f"rows per example); packing needs one row per example (classification, pairs, regression, "
                f"multilabel, token_classification): set train.packing: false"
                for n, t in tasks.items() if not getattr(t, "joinable", False)]
    problems += [f"tasks.{n}.private_layers: train.packing cannot run private layers (set one of them off)"
                 for n, t in tasks.items() if getattr(t.cfg, "private_layers", 0)]
    if adapters:
        problems.append("adapters: train.packing cannot run LoRA adapters (their rows are routed per task, one "
                        "example per row); set train.packing: false or drop adapters")
    if adversarial != "none":
        problems.append(f"train.adversarial.method {adversarial!r}: not with train.packing (it perturbs unpacked "
                        f"rows); set one of them off")
    if problems:
        raise RecipeError(problems)


def first_fit(lengths: list[int], capacity: int) -> list[int]:
    """The row of each item, placing items in order into the first row with room (rows of `capacity`
    tokens). Raises ValueError for an item longer than capacity."""
    free: list[int] = []
    rows = []
    for n in lengths:
        if n > capacity:
            raise ValueError(f"first_fit: an item of {n} tokens does not fit rows of {capacity}")
        row = next((r for r, f in enumerate(free) if f >= n), None)
        if row is None:
            row = len(free)
            free.append(capacity)
        free[row] -= n
        rows.append(row)
    return rows


# Estimated cost of a token in a row of L tokens, relative to its fixed (linear-layer) part: 1 + L * this.
# From one SST-2 step of minilm-l6 (benchmarks/train_step_profile.py, 1 thread, AVX2): rows of 128 tokens
# cost ~2.1x per real token what rows of 19 cost, so 88 * c = 1.1 -> c ~ 1/80.
ROW_LENGTH_COST = 1 / 80


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[int]:
    """The row of each item (in the items' order) when placed longest first, each into the first row with
    room (rows of `capacity` tokens): fewer rows than plain first-fit on mixed lengths. Raises ValueError for
    an item longer than capacity."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    placed = first_fit([lengths[i] for i in order], capacity)
    rows = [0] * len(lengths)
    for i, r in zip(order, placed):
        rows[i] = r
    return rows


def choose_rows(lengths: list[int], max_capacity: int) -> list[int] | None:
    """The row of each item for the cheapest packing into rows of at most `max_capacity` tokens, or None
    when the cheapest puts one item per row (then plain padding is the same layout, without the mask).

    Candidate row lengths: k * longest (k = 1, 2, ...) up to max_capacity, and max_capacity itself; each is
    packed first-fit decreasing and priced rows * L * (1 + L * ROW_LENGTH_COST), L its longest row. Raises
    ValueError on no items or an item longer than max_capacity."""
    if not lengths:
        raise ValueError("choose_rows: no items")
    longest = max(lengths)
    if longest > max_capacity:
        raise ValueError(f"choose_rows: an item of {longest} tokens does not fit rows of {max_capacity}")
    best, best_cost = None, len(lengths) * longest * (1 + longest * ROW_LENGTH_COST)   # unpacked: one per row
    for capacity in sorted({*range(2 * longest, max_capacity + 1, longest), max_capacity} - {longest}):
        rows = first_fit_decreasing(lengths, capacity)
        used = np.zeros(max(rows) + 1, dtype=np.int64)
        np.add.at(used, rows, lengths)
        seq_len = int(used.max())
        cost = len(used) * seq_len * (1 + seq_len * ROW_LENGTH_COST)
        if cost < best_cost:
            best, best_cost = rows, cost
    return best


def pack_inputs(features: list[dict], pad_token_id: int, capacity: int, rows: list[int] | None = None
                ) -> dict[str, Tensor]:
    """Pack unpadded features (input_ids, token_type_ids?) first-fit into rows of <= capacity tokens (or
    into the given `rows`, one row index per feature, e.g. from `choose_rows`).

    Returns (rows, seq_len) int64 tensors, seq_len the longest packed row: input_ids (pad_token_id after
    the last example), attention_mask (1 on real tokens: counts tokens, as unpacked), token_type_ids (when
    the features have them), position_ids (0..len-1 within each example, 0 on padding), example_ids (the
    feature's index in `features`, -1 on padding). Raises ValueError on an empty list or a feature longer
    than capacity."""
    if not features:
        raise ValueError("pack_inputs: no features")
    lengths = [len(f["input_ids"]) for f in features]
    rows = first_fit(lengths, capacity) if rows is None else rows
    n_rows = max(rows) + 1
    used = np.zeros(n_rows, dtype=np.int64)
    np.add.at(used, rows, lengths)
    seq_len = int(used.max())
    keys = [k for k in STORED_KEYS if k in features[0]]
    out = {k: np.full((n_rows, seq_len), pad_token_id if k == "input_ids" else 0, dtype=np.int64) for k in keys}
    out["attention_mask"] = np.zeros((n_rows, seq_len), dtype=np.int64)
    out["position_ids"] = np.zeros((n_rows, seq_len), dtype=np.int64)
    out["example_ids"] = np.full((n_rows, seq_len), -1, dtype=np.int64)
    cursor = np.zeros(n_rows, dtype=np.int64)
    for i, (f, row, n) in enumerate(zip(features, rows, lengths)):
        start = cursor[row]
        for k in keys:
            out[k][row, start:start + n] = f[k]
        out["attention_mask"][row, start:start + n] = 1
        out["position_ids"][row, start:start + n] = np.arange(n)
        out["example_ids"][row, start:start + n] = i
        cursor[row] += n
    return {k: torch.from_numpy(out[k]) for k in PACKED_KEYS if k in out}


def block_diagonal_mask(example_ids: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """(rows, seq_len) example ids (-1 on padding) -> (rows, 1, seq_len, seq_len) additive attention mask:
    0 where query and key belong to the same example, the dtype's most negative value elsewhere. Padding
    attends to padding only (no fully masked row, so no NaN); its states are never read."""
    same = example_ids.unsqueeze(-1) == example_ids.unsqueeze(-2)
    mask = torch.zeros(same.shape, dtype=dtype, device=example_ids.device)
    return mask.masked_fill_(~same, torch.finfo(dtype).min).unsqueeze(1)


def unpack_states(hidden: Tensor, example_ids: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Packed token states (rows, seq_len, hidden) -> (states (examples, longest example, hidden), their
    attention mask (examples, longest example) int64): example e's token p at [e, p], zeros after its end
    (differentiable: a scatter of the real tokens)."""
    real = example_ids >= 0
    ex, pos = example_ids[real], position_ids[real]
    n, longest = int(ex.max()) + 1, int(pos.max()) + 1
    out = hidden.new_zeros((n, longest, hidden.shape[-1])).index_put((ex, pos), hidden[real])
    mask = torch.zeros((n, longest), dtype=torch.long, device=hidden.device).index_put_((ex, pos),
                                                                                       torch.ones_like(ex))
    return out, mask
