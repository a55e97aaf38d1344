"""Teacher outputs cached once per training row: a teacher (large, or simply a second model) runs on a row
the first time a micro-batch holds it, and every later epoch reads its stored logits.

A row is keyed by the digest of its real tokens (input_ids and token_type_ids up to its attention mask's
length): its teacher outputs depend on nothing else (the teacher runs in eval mode, no dropout), so the
key is the same whatever batch, padding or epoch serves the row. Stored per row and task: the head's
logits in float16, token heads trimmed to the row's length (cut at 2-byte floats a 6,000-row tagging set
with 9 tags and 40 tokens takes ~4 MB); with `pooled`, also the teacher's pooled vector (hidden-state
distillation). Past `max_bytes` new rows are computed without being stored (a warning says so once).
"""

from __future__ import annotations

import hashlib
import logging

import torch
from torch import Tensor, nn

log = logging.getLogger("mtlm")
POOLED = "\0pooled"         # the key of a row's pooled vector among its stored tensors


def row_keys(inputs: dict[str, Tensor]) -> list[bytes]:
    """One 16-byte blake2b digest per row of (rows, seq_len) inputs over its real tokens (input_ids and
    token_type_ids where the attention mask is 1; rows are right-padded, as `pad_inputs` makes them)."""
    ids, mask = inputs["input_ids"].cpu(), inputs["attention_mask"].cpu()
    types = inputs.get("token_type_ids")
    types = types.cpu() if types is not None else None
    keys = []
    for i, n in enumerate(mask.sum(1).tolist()):
        h = hashlib.blake2b(ids[i, :n].numpy().tobytes(), digest_size=16)
        if types is not None:
            h.update(types[i, :n].numpy().tobytes())
        keys.append(h.digest())
    return keys


class TeacherCache:
    """The teacher's logits (and optionally its pooled vector) per training row, computed on first sight.

    teacher: a `mtlm.model.MultiTaskModel` (put in eval mode; its weights are not trained). dtype: the
    stored precision (float16 by default). max_bytes: stop storing new rows beyond this (default 2 GiB).
    `computed_rows` counts rows the teacher has run on (a test can check each row runs once)."""

    def __init__(self, teacher: nn.Module, dtype: torch.dtype = torch.float16, max_bytes: int = 2 << 30):
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.dtype, self.max_bytes = dtype, max_bytes
        self.store: dict[bytes, dict[str, Tensor]] = {}
        self.bytes, self.computed_rows, self._full_warned = 0, 0, False

    def _run(self, inputs: dict[str, Tensor], rows: list[int], tasks: list[str], pooled: bool
             ) -> list[dict[str, Tensor]]:
        """The teacher on `rows` of the batch, trimmed to their longest: per row {task: logits[, POOLED]}."""
        index = torch.tensor(rows, device=inputs["input_ids"].device)
        lengths = inputs["attention_mask"][index].sum(1)
        width = int(lengths.max())
        sub = {k: v[index, :width] for k, v in inputs.items()}
        device = next(self.teacher.parameters()).device
        sub = {k: v.to(device) for k, v in sub.items()}
        with torch.no_grad():
            hidden, vec = self.teacher.encode(**sub)
            out = {t: self.teacher.heads[t](vec if self.teacher.head_inputs[t] == "pooled" else hidden)
                   for t in tasks}
        self.computed_rows += len(rows)
        per_row = []
        for j, n in enumerate(lengths.tolist()):
            entry = {t: (o[j, :n] if self.teacher.head_inputs[t] == "tokens" else o[j]).to(self.dtype).cpu()
                     for t, o in out.items()}
            if pooled:
                entry[POOLED] = vec[j].to(self.dtype).cpu()
            per_row.append(entry)
        return per_row

    def outputs(self, inputs: dict[str, Tensor], tasks: list[str], pooled: bool = False
                ) -> tuple[dict[str, Tensor], Tensor | None]:
        """The teacher's outputs for a micro-batch: ({task: logits shaped as the student's, float32, on the
        inputs' device: (rows, ...) pooled heads, (rows, seq_len, ...) token heads with 0 past each row's
        length}, the pooled vectors (rows, teacher hidden) or None). Rows not seen before run through the
        teacher (one pass for all of them) and are stored. Raises KeyError for a task the teacher has no
        head for."""
        missing = [t for t in tasks if t not in self.teacher.heads]
        if missing:
            raise KeyError(f"the teacher has no head for task(s) {', '.join(missing)} "
                           f"(its heads: {', '.join(self.teacher.heads)})")
        keys = row_keys(inputs)
        want = list(tasks) + ([POOLED] if pooled else [])
        entries: list[dict[str, Tensor] | None] = [self.store.get(k) for k in keys]
        todo = [i for i, e in enumerate(entries) if e is None or any(w not in e for w in want)]
        if todo:
            fresh = self._run(inputs, todo, list(tasks), pooled)
            for i, entry in zip(todo, fresh):
                merged = {**(entries[i] or {}), **entry}
                entries[i] = merged
                self._keep(keys[i], merged)
        device, seq_len = inputs["input_ids"].device, inputs["input_ids"].shape[1]
        logits = {}
        for t in tasks:
            rows = [e[t].float() for e in entries]
            if self.teacher.head_inputs[t] == "tokens":
                block = torch.zeros((len(rows), seq_len, rows[0].shape[-1]))
                for i, r in enumerate(rows):
                    block[i, :r.shape[0]] = r
                logits[t] = block.to(device)
            else:
                logits[t] = torch.stack(rows).to(device)
        vec = torch.stack([e[POOLED].float() for e in entries]).to(device) if pooled else None
        return logits, vec

    def _keep(self, key: bytes, entry: dict[str, Tensor]) -> None:
        old = self.store.get(key)
        size = sum(v.numel() * v.element_size() for v in entry.values())
        grown = size - (sum(v.numel() * v.element_size() for v in old.values()) if old else 0)
        if self.bytes + grown > self.max_bytes:
            if not self._full_warned:
                log.warning("teacher cache full (%.0f MiB): outputs of further rows are computed each time they "
                            "are seen", self.bytes / 2**20)
                self._full_warned = True
            return
        self.store[key] = entry
        self.bytes += grown
