"""Per-loss weights applied in one backward pass: fixed (`static`) or learned by backprop (`uncertainty`).

Both need per-task losses only, so they work in sampled steps (one task or joint group per micro-batch) as
well as in all_tasks steps. Helpers shared by the other families (`global_mean`, `StepLosses`, `NoOptions`,
`loss_scale`) live here because these are the simplest methods that use them.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn


class NoOptions(BaseModel):
    """A method without options: any key but `name` is an error."""

    model_config = ConfigDict(extra="forbid")


def global_mean(accelerator, tensor: Tensor) -> Tensor:
    """Mean of `tensor` over processes (one all-reduce); the tensor itself with a single process."""
    if accelerator is None or accelerator.num_processes == 1:
        return tensor
    return accelerator.reduce(tensor.contiguous(), reduction="mean")


def global_sum(accelerator, tensor: Tensor) -> Tensor:
    """Sum of `tensor` over processes (one all-reduce); the tensor itself with a single process."""
    if accelerator is None or accelerator.num_processes == 1:
        return tensor
    return accelerator.reduce(tensor.contiguous(), reduction="sum")


def loss_scale(accelerator) -> float:
    """The fp16 GradScaler's current scale (1.0 without one). It only changes in `scaler.update()`, after
    the optimizer step, so every backward of one optimizer step used this same scale."""
    scaler = getattr(accelerator, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None else 1.0


class StepLosses:
    """Per-task training losses of the current optimizer step: the mean over its micro-batches and over
    processes. Detached; kept on the device (no host sync per micro-batch)."""

    def __init__(self, names: list[str], device):
        self.index = {n: i for i, n in enumerate(names)}
        self.sums = torch.zeros(len(names), device=device, dtype=torch.float64)
        self.counts = torch.zeros(len(names), device=device, dtype=torch.float64)

    def add(self, losses: dict[str, Tensor]) -> None:
        for name, loss in losses.items():
            self.sums[self.index[name]] += loss.detach().double()
            self.counts[self.index[name]] += 1

    def pop(self, accelerator) -> tuple[Tensor, Tensor]:
        """(means (k,) float64, present (k,) bool) over this step on every process; then reset. A task no
        process saw this step has mean nan and present False."""
        both = global_sum(accelerator, torch.cat([self.sums, self.counts]))
        sums, counts = both[: len(self.index)], both[len(self.index):]
        present = counts > 0
        means = torch.where(present, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))
        self.sums.zero_()
        self.counts.zero_()
        return means, present


class Static:
    """Fixed loss weights (the default): L = sum_i alpha_i * L_i, alpha_i = the recipe's tasks.<name>.weight.

    Needs: per-task losses. Cost: one backward per micro-batch, nothing else."""

    needs_all_tasks: ClassVar[bool] = False
    combines_shared_gradients: ClassVar[bool] = False
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, weights: dict[str, float], model: nn.Module | None = None, device="cpu", seed: int = 0,
                 **options):
        self.options = self.Options(**options)
        self.weights = dict(weights)

    def backward(self, losses: dict[str, Tensor], accelerator, scale: float = 1.0) -> Tensor | None:
        """Backpropagate scale * sum_i alpha_i * L_i over the tasks in `losses` (scalars); returns the
        weighted total (detached), or None when `losses` is empty."""
        if not losses:
            return None
        total = sum(self.weights[name] * loss for name, loss in losses.items())
        accelerator.backward(total * scale)
        return total.detach()

    def step(self, accelerator) -> None:
        """Nothing to update."""

    def current(self) -> dict[str, float]:
        return dict(self.weights)

    def param_groups(self) -> list[dict]:
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class UncertaintyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float = Field(0.01, gt=0)   # AdamW lr of the log-variances (LibMTL uses the model's, too small to move them in a fine-tune)
    init: float = 0.0               # initial s_i = log sigma_i^2 (weight exp(-s)/2 = 0.5)


class Uncertainty:
    """Homoscedastic-uncertainty weights (Kendall, Gal & Cipolla 2018, "Multi-task learning using
    uncertainty to weigh losses for scene geometry and semantics", CVPR).

    L = sum_i (exp(-s_i) * L_i + s_i) / 2 with learned s_i = log sigma_i^2 (LibMTL's form); dL/ds_i =
    (1 - exp(-s_i) * L_i) / 2, zero at exp(s_i) = L_i, so a task with a large loss gets a small weight.
    Needs: per-task losses only (sampled or all_tasks steps; a micro-batch's term involves only its tasks).
    Cost: one backward per micro-batch; k extra parameters optimised by the model's AdamW (own lr, no weight
    decay, the same warmup/decay schedule); with several processes their gradients are averaged in `step`
    (k floats). Logged weight: exp(-s_i) / 2."""

    needs_all_tasks: ClassVar[bool] = False
    combines_shared_gradients: ClassVar[bool] = False
    Options: ClassVar[type[BaseModel]] = UncertaintyOptions

    def __init__(self, weights: dict[str, float], model: nn.Module | None = None, device="cpu", seed: int = 0,
                 **options):
        self.options = self.Options(**options)
        self.index = {n: i for i, n in enumerate(weights)}
        self.log_var = nn.Parameter(torch.full((len(self.index),), float(self.options.init), device=device))

    def backward(self, losses: dict[str, Tensor], accelerator, scale: float = 1.0) -> Tensor | None:
        """Backpropagate scale * sum_i (exp(-s_i) L_i + s_i) / 2 into the model and s; returns that total."""
        if not losses:
            return None
        total = sum(0.5 * (torch.exp(-self.log_var[self.index[n]]) * loss + self.log_var[self.index[n]])
                    for n, loss in losses.items())
        accelerator.backward(total * scale)
        return total.detach()

    def step(self, accelerator) -> None:
        """Average the log-variances' gradients over processes (the model's own are averaged by DDP or the
        loop); the model's optimizer then updates them."""
        if accelerator is not None and accelerator.num_processes > 1:
            grad = self.log_var.grad if self.log_var.grad is not None else torch.zeros_like(self.log_var)
            self.log_var.grad = global_mean(accelerator, grad)

    def current(self) -> dict[str, float]:
        w = (0.5 * torch.exp(-self.log_var.detach())).tolist()
        return {n: w[i] for n, i in self.index.items()}

    def param_groups(self) -> list[dict]:
        return [{"params": [self.log_var], "lr": self.options.lr, "weight_decay": 0.0}]

    def state_dict(self) -> dict:
        return {"log_var": self.log_var.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.log_var.copy_(state["log_var"].to(self.log_var.device))
