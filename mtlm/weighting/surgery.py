"""Gradient surgery on the shared parameters: `pcgrad` (Yu et al. 2020) and `cagrad` (Liu et al. 2021).

Both need each task's gradient of the shared (backbone) parameters separately, so they run one backward per
task (`TaskGradients`) instead of one per micro-batch, and keep k gradient vectors of the backbone's size.

Several processes: DDP does not sync these steps (every forward of an all_tasks step runs under `no_sync`).
`TaskGradients.reduce` all-reduces the per-task gradients (k x P floats, once per optimizer step) *before*
the combination, so every process combines the same global per-task gradients and applies the same
update: the update of one process over the same global batch, which combining before the sync (a
projection of each process's local gradients) would not give. The task-specific parameters (heads) are
averaged by the training loop.

fp16 (GradScaler): every backward of one optimizer step runs at the same loss scale S (it only changes in
`scaler.update()` after the optimizer step). The per-task gradients are divided by S before they are
combined (so norms, dot products and CAGrad's c * ||g0|| are in real units), and the combined gradient is
multiplied by S when it is written to `.grad`, so Accelerate's unscale / inf check / skipped step apply to
it exactly as to the heads' gradients. A non-finite per-task gradient makes the written gradient non-finite,
so the GradScaler skips that step and lowers S.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mtlm.weighting.loss_weights import NoOptions, global_sum, loss_scale


class TaskGradients:
    """Per-task gradients of `shared` parameters, accumulated over an optimizer step's micro-batches.

    `backward` runs one backward per task (keeping the graph for tasks that share a forward), moves the shared
    parameters' .grad into row i of a (k, P) float32 buffer and leaves every other parameter's .grad (heads)
    accumulating as usual. `reduce` returns the step's (present task rows, (k', P) gradients) averaged over
    processes and divided by the loss scale; `write` puts a combined (P,) gradient back into .grad."""

    def __init__(self, names: list[str], shared: list[nn.Parameter], device):
        self.names, self.shared = list(names), list(shared)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.size = sum(p.numel() for p in self.shared)
        self.device = device
        self.buffer: Tensor | None = None            # (k, P), allocated on first use
        self.seen = torch.zeros(len(self.names), device=device)

    def backward(self, losses: dict[str, Tensor], accelerator, weights: dict[str, float], scale: float) -> None:
        if self.buffer is None:
            self.buffer = torch.zeros(len(self.names), self.size, device=self.device)
        names = list(losses)
        for j, name in enumerate(names):
            accelerator.backward(weights[name] * losses[name] * scale, retain_graph=j < len(names) - 1)
            # one concatenation and one add per task (not one kernel per parameter)
            self.buffer[self.index[name]] += torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p))
                                                        .reshape(-1).float() for p in self.shared])
            for p in self.shared:
                p.grad = None
            self.seen[self.index[name]] += 1

    def reduce(self, accelerator) -> tuple[list[int], Tensor]:
        """(rows of tasks seen on any process, their (k', P) gradients: mean over processes, in real units).
        Resets the buffer."""
        world = accelerator.num_processes if accelerator is not None else 1
        seen = global_sum(accelerator, self.seen)
        buffer = self.buffer if self.buffer is not None else torch.zeros(len(self.names), self.size,
                                                                        device=self.device)
        grads = global_sum(accelerator, buffer) / (world * loss_scale(accelerator))
        rows = seen.nonzero().flatten().tolist()
        if self.buffer is not None:
            self.buffer.zero_()
        self.seen.zero_()
        return rows, grads[rows]

    def write(self, combined: Tensor, accelerator) -> None:
        """Set the shared parameters' .grad to `combined` (P,) times the loss scale."""
        combined = combined * loss_scale(accelerator)
        offset = 0
        for p in self.shared:
            p.grad = combined[offset:offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()


def pcgrad(grads: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """PCGrad's combined gradient (Yu et al. 2020, Algorithm 1): for each task i, for the other tasks j in
    random order, if g_i' . g_j < 0 then g_i' -= (g_i' . g_j / ||g_j||^2) g_j; return sum_i g_i'.

    grads: (K, P) per-task gradients. generator: the order's random source (seeded, so every process
    projects in the same order). Returns (P,). Branch-free (no host sync): the coefficient is clamped."""
    projected = grads.clone()
    sq_norms = (grads * grads).sum(dim=1).clamp(min=1e-20)
    k = len(grads)
    for i in range(k):
        for j in torch.randperm(k, generator=generator).tolist():
            if j != i:
                dot = projected[i] @ grads[j]
                projected[i] -= dot.clamp(max=0) / sq_norms[j] * grads[j]
    return projected.sum(dim=0)


def cagrad(grads: Tensor, c: float, rescale: int = 1) -> tuple[Tensor, Tensor]:
    """CAGrad's update direction (Liu, Liu, Jin, Stone & Liu 2021, as in their code and LibMTL).

    g0 = mean_i g_i; w = argmin over the simplex of g_w . g0 + c ||g0|| ||g_w||, g_w = sum_i w_i g_i (solved on
    the K x K Gram matrix with scipy's SLSQP); d = g0 + (c ||g0|| / ||g_w||) g_w, divided by 1 (rescale 0),
    1 + c^2 (rescale 1) or 1 + c (rescale 2). grads: (K, P). Returns (d (P,), coefficients (K,)) with
    d = coefficients @ grads."""
    from scipy.optimize import minimize

    k = len(grads)
    gram = (grads.double() @ grads.double().T).cpu().numpy()
    g0_norm = math.sqrt(gram.mean() + 1e-8)
    x0 = np.ones(k) / k
    cc = c * g0_norm + 1e-8

    def objective(x):
        return float(x @ gram @ x0 + cc * math.sqrt(max(float(x @ gram @ x), 0.0) + 1e-8))

    w = minimize(objective, x0, bounds=[(0.0, 1.0)] * k,
                 constraints=({"type": "eq", "fun": lambda x: 1.0 - x.sum()},)).x
    gw_norm = math.sqrt(max(float(w @ gram @ w), 0.0))
    lam = cc / (gw_norm + 1e-8)
    coefficients = (x0 + lam * w) / {0: 1.0, 1: 1.0 + c ** 2, 2: 1.0 + c}[rescale]
    coef = torch.tensor(coefficients, dtype=grads.dtype, device=grads.device)
    return coef @ grads, coef


class GradientCombiner:
    """What PCGrad and CAGrad share: per-task gradients of the backbone collected by one backward per task
    (`TaskGradients`), all-reduced and combined in `step` by the subclass. Needs the model."""

    needs_all_tasks: ClassVar[bool] = True
    combines_shared_gradients: ClassVar[bool] = True
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, weights: dict[str, float], model: nn.Module | None = None, device="cpu", seed: int = 0,
                 **options):
        self.options = self.Options(**options)
        if model is None:
            raise ValueError(f"{type(self).__name__.lower()} needs the model (its backbone's parameters)")
        self.weights = dict(weights)
        self.names = list(weights)
        shared = [p for p in model.backbone.parameters() if p.requires_grad]
        self.grads = TaskGradients(self.names, shared, device)

    def backward(self, losses: dict[str, Tensor], accelerator, scale: float = 1.0) -> Tensor | None:
        """One backward per task; the shared gradients go to per-task buffers."""
        if not losses:
            return None
        self.grads.backward(losses, accelerator, self.weights, scale)
        return sum(losses.values()).detach()

    def param_groups(self) -> list[dict]:
        return []


class PCGrad(GradientCombiner):
    """Projecting conflicting gradients (Yu, Kumar, Gupta, Levine, Hausman & Finn 2020, "Gradient surgery for
    multi-task learning", NeurIPS): each task's gradient of the shared parameters loses its component along
    every other task's gradient it conflicts with (negative dot product), in random order; the update is the
    sum of the projected gradients. Task-specific parameters (heads) get their own task's gradient.

    Needs: every task's gradient of the backbone in every step (step_mode all_tasks). Cost: one backward per
    task (separate forwards already cost k backbone backward passes; a joint micro-batch costs k instead of
    one), k x P float32 gradient buffers (P = backbone parameters), O(k^2 P) projections, and one all-reduce
    of k x P floats per optimizer step with several processes (see the module docstring)."""

    def __init__(self, weights: dict[str, float], model: nn.Module | None = None, device="cpu", seed: int = 0,
                 **options):
        super().__init__(weights, model, device, seed, **options)
        self.generator = torch.Generator().manual_seed(seed)

    def step(self, accelerator) -> None:
        """All-reduce the per-task gradients, project, and write the sum into the backbone's .grad."""
        rows, grads = self.grads.reduce(accelerator)
        if not rows:
            return
        combined = pcgrad(grads, self.generator) if torch.isfinite(grads).all() else grads.sum(dim=0)
        self.grads.write(combined, accelerator)

    def current(self) -> dict[str, float]:
        return dict(self.weights)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class CAGradOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    c: float = Field(0.4, ge=0)          # conflict aversion: 0 = plain average gradient (paper: 0.4 on NYUv2)
    rescale: int = Field(1, ge=0, le=2)  # 0: none, 1: divide by 1 + c^2 (the paper's code), 2: by 1 + c


class CAGrad(GradientCombiner):
    """Conflict-averse gradient descent (Liu, Liu, Jin, Stone & Liu 2021, "Conflict-averse gradient descent
    for multi-task learning", NeurIPS): the update d maximises the worst task's improvement within a ball of
    radius c ||g0|| around the average gradient g0 (see `cagrad`). Heads get their own task's gradient. Like
    the paper, d is built around the *average* task gradient (1/k of static's sum).

    Needs: every task's gradient of the backbone in every step (step_mode all_tasks). Cost: as `pcgrad` (one
    backward per task, k x P buffers, one all-reduce of k x P floats per step with several processes) plus a
    k x k Gram matrix and a k-variable SLSQP solve on the CPU per step. Logged weights: the coefficient of
    each task's gradient in d."""

    Options: ClassVar[type[BaseModel]] = CAGradOptions

    def __init__(self, weights: dict[str, float], model: nn.Module | None = None, device="cpu", seed: int = 0,
                 **options):
        super().__init__(weights, model, device, seed, **options)
        self.coefficients = {n: 1.0 / len(self.names) for n in self.names}

    def step(self, accelerator) -> None:
        """All-reduce the per-task gradients, solve for d, and write it into the backbone's .grad."""
        rows, grads = self.grads.reduce(accelerator)
        if not rows:
            return
        if not torch.isfinite(grads).all():
            self.grads.write(grads.sum(dim=0), accelerator)
            return
        combined, coef = cagrad(grads, self.options.c, self.options.rescale)
        self.coefficients = {self.names[r]: float(v) for r, v in zip(rows, coef.tolist())}
        self.grads.write(combined, accelerator)

    def current(self) -> dict[str, float]:
        return dict(self.coefficients)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
