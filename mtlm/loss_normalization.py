"""`train.loss_normalization: initial`: each task's loss divided by its own first value, so task types whose
losses live on other scales (a 77-class cross-entropy starts near ln 77 = 4.3, a 9-tag token cross-entropy
near ln 9 = 2.2 averaged per token, a standardised regression MSE near 1) enter the update with the same
starting weight 1. This is the normalisation behind loss-ratio methods (the L_i(t) / L_i(0) of GradNorm, Chen
et al. 2018, and of DWA), applied as a fixed rescaling: L_i' = L_i / L_i(0), with L_i(0) the task's loss on
the first micro-batch it is trained on (mean over processes), kept for the rest of the run.

It is a loss hook of `fit` (after the adversarial and user hooks, so it scales their terms too) and a
callback whose state (the initial values) is saved in every checkpoint and restored by --resume.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from mtlm.callbacks import Callback

MIN_INITIAL = 1e-6      # a task whose first loss is (almost) 0 is not blown up by the division


class InitialLossNormalization(Callback):
    """Loss hook + callback: {task: L_i} -> {task: L_i / L_i(0)} (module docstring). `accelerator` (optional)
    averages each task's first loss over processes, which all see a task's first micro-batch at the same step."""

    key: ClassVar[str] = "loss_normalization"

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.initial: dict[str, float] = {}

    def __call__(self, ctx) -> dict[str, torch.Tensor]:
        for name, loss in ctx.losses.items():
            if name not in self.initial:
                first = loss.detach().float().reshape(1)
                if self.accelerator is not None and self.accelerator.num_processes > 1:
                    first = self.accelerator.reduce(first, reduction="mean")
                self.initial[name] = max(float(first), MIN_INITIAL)
        return {name: loss / self.initial[name] for name, loss in ctx.losses.items()}

    def state_dict(self) -> dict:
        return {"initial": dict(self.initial)}

    def load_state_dict(self, state: dict) -> None:
        self.initial = {k: float(v) for k, v in state.get("initial", {}).items()}
