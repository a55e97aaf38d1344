"""Per-task gradients on the shared backbone during training: a `fit` callback that measures, every `every`
optimizer steps, each task's loss and the gradient of that loss w.r.t. the backbone parameters (norm per
layer, total norm) and w.r.t. its head, and the cosine between every two tasks' backbone gradients.

This is the measurement behind the "which task dominates the shared layers" question (issue 17): the
gradient-magnitude and conflict diagnostics of GradNorm (Chen et al. 2018, per-task gradient norms on the
shared layers) and PCGrad (Yu et al. 2020, cosine between task gradients). It does not change training: each
task's probe batch (`rows` train items drawn once, seeded) is run in eval mode (no dropout, no RNG drawn)
through `torch.autograd.grad`, which leaves every `.grad` untouched; the model's train/eval mode is restored.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

import numpy as np
import torch

from mtlm.batches import collate_source, masked_losses
from mtlm.callbacks import Callback

if TYPE_CHECKING:
    from mtlm.hooks import Run

_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.")


def layer_group(name: str) -> str:
    """The backbone layer a parameter belongs to: "layer.<i>" for transformer block i, "embeddings" for the
    embedding parameters, else "other" (a pooler). `name`: as `named_parameters()` of the backbone gives it."""
    m = _LAYER.search(name)
    if m:
        return f"layer.{int(m.group(1))}"
    return "embeddings" if "embed" in name else "other"


class TaskGradients(Callback):
    """Record per-task backbone gradient statistics every `every` steps (and before the first step).

    records: one dict per measurement: {"step", "tasks": {task: {"loss": float, "backbone_norm": float
    (L2 over every backbone parameter), "layer_norms": {group: L2 norm}, "head_norm": float}}, "cosine":
    {"a|b": cosine of the two tasks' flattened backbone gradients}}. `path`: where on_train_end writes
    {"every", "rows", "records"} as JSON (None: kept in memory only). `last_gradients`: {task: [gradient of
    each backbone parameter, in `backbone.named_parameters()` order]} of the latest measurement (e.g. to
    precondition with an optimizer's state). Raises ValueError for every < 1 or rows < 1."""

    def __init__(self, every: int = 25, rows: int = 32, seed: int = 0, path=None) -> None:
        if every < 1 or rows < 1:
            raise ValueError(f"TaskGradients: every and rows must be >= 1 (got every={every}, rows={rows})")
        self.every, self.rows, self.seed, self.path = every, rows, seed, path
        self.records: list[dict] = []
        self.probes: dict[str, tuple[dict, dict]] = {}
        self.last_gradients: dict[str, list[torch.Tensor]] = {}

    def on_train_begin(self, run: Run) -> None:
        rng = np.random.default_rng(self.seed)
        for source, batches in run.batches.items():
            data = batches.dataset
            idx = rng.choice(len(data), size=min(self.rows, len(data)), replace=False)
            inputs, targets = collate_source(run.tasks, [data[int(i)] for i in idx], run.tokenizer.pad_token_id)
            to = run.accelerator.device
            self.probes[source] = ({k: v.to(to) for k, v in inputs.items()},
                                   {t: (None if r is None else r.to(to), {k: v.to(to) for k, v in lab.items()})
                                    for t, (r, lab) in targets.items()})
        if run.step == 0:
            self.measure(run, 0)

    def on_step_end(self, run: Run, step: int, losses: dict, weights: dict) -> None:
        if step % self.every == 0:
            self.measure(run, step)

    def measure(self, run: Run, step: int) -> dict:
        """One measurement at the current weights; appended to `records` and returned."""
        model = run.unwrapped
        named = [(n, p) for n, p in model.backbone.named_parameters() if p.requires_grad]
        groups = [layer_group(n) for n, _ in named]
        params = [p for _, p in named]
        was_training = model.training
        model.eval()
        out, flat = {}, {}
        try:
            for source, (inputs, targets) in self.probes.items():
                logits = model(tasks=list(targets), **inputs)
                for task, loss in masked_losses(run.tasks, logits, targets).items():
                    head = [p for p in model.heads[task].parameters() if p.requires_grad]
                    grads = torch.autograd.grad(loss, params + head, retain_graph=True, allow_unused=True)
                    g_back = [torch.zeros_like(p) if g is None else g for g, p in zip(grads[:len(params)], params)]
                    by_group: dict[str, float] = {}
                    for grp, g in zip(groups, g_back):
                        by_group[grp] = by_group.get(grp, 0.0) + float(g.pow(2).sum())
                    flat[task] = torch.cat([g.reshape(-1) for g in g_back])
                    self.last_gradients[task] = g_back
                    head_sq = sum(float(g.pow(2).sum()) for g in grads[len(params):] if g is not None)
                    out[task] = {"loss": float(loss.detach()), "backbone_norm": float(flat[task].norm()),
                                 "layer_norms": {k: v ** 0.5 for k, v in by_group.items()},
                                 "head_norm": head_sq ** 0.5}
        finally:
            model.train(was_training)
        names = list(flat)
        cosine = {f"{a}|{b}": float(torch.nn.functional.cosine_similarity(flat[a], flat[b], dim=0))
                  for i, a in enumerate(names) for b in names[i + 1:]}
        record = {"step": step, "tasks": out, "cosine": cosine}
        self.records.append(record)
        return record

    def on_train_end(self, run: Run) -> None:
        if self.path is not None and run.is_main:
            with open(self.path, "w", encoding="utf-8") as f:
                json.dump({"every": self.every, "rows": self.rows, "records": self.records}, f, indent=1)
