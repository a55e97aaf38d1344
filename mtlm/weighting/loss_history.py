"""Weights from the trajectory of the training losses: `dwa` (Liu, Johns & Davison 2019) and `famo`
(Liu et al. 2023). Both use per-task losses only (no per-task gradients); their state (loss history,
weight logits and their Adam moments) is saved in checkpoints and restored by --resume.

The loss statistics are averaged over processes before they set any weight, so every process applies the
same weights (and several processes give the update of one process over the same global batch).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mtlm.weighting.loss_weights import StepLosses, global_sum

EPS = 1e-8


def dwa_weights(last: Tensor, before: Tensor, temperature: float) -> Tensor:
    """DWA weights w_i = K * softmax_i(r_i / T), r_i = last_i / before_i (K tasks; weights sum to K).

    last, before: (K,) mean losses of the two latest windows. A ratio that is not finite (a task missing
    from a window) counts as 1. Returns (K,)."""
    ratio = last / before
    ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))
    return len(ratio) * torch.softmax(ratio / temperature, dim=0)


class DWAOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(2.0, gt=0)   # T: large T -> uniform weights (the paper uses 2)
    window: int = Field(50, gt=0)           # optimizer steps per loss average (the paper: one epoch)


class DWA:
    """Dynamic Weight Average (Liu, Johns & Davison 2019, "End-to-end multi-task learning with attention",
    CVPR): w_i = K * softmax_i(r_i / T) with r_i = Lbar_i(t-1) / Lbar_i(t-2), the ratio of task i's mean
    training loss over the last two windows. The paper averages over epochs; a multi-task "epoch" differs per
    task, so here a window is `window` optimizer steps. Weights are 1 until two windows are complete; a task
    whose loss falls slowly gets more weight.

    Needs: per-task losses only (sampled or all_tasks steps). Cost: one backward per micro-batch; k loss
    sums per step, summed over processes once per step (one all-reduce of 2k floats)."""

    needs_all_tasks: ClassVar[bool] = False
    combines_shared_gradients: ClassVar[bool] = False
    Options: ClassVar[type[BaseModel]] = DWAOptions

    def __init__(self, weights: dict[str, float], model: nn.Module | None = None, device="cpu", seed: int = 0,
                 **options):
        self.options = self.Options(**options)
        self.names = list(weights)
        self.index = {n: i for i, n in enumerate(self.names)}
        k = len(self.names)
        self.meter = StepLosses(self.names, device)
        self.weights = torch.ones(k, device=device)
        self.window_sum = torch.zeros(k, dtype=torch.float64, device=device)
        self.window_count = torch.zeros(k, dtype=torch.float64, device=device)
        self.steps_in_window = 0
        self.history: list[Tensor] = []          # mean losses of the latest two complete windows

    def backward(self, losses: dict[str, Tensor], accelerator, scale: float = 1.0) -> Tensor | None:
        """Backpropagate scale * sum_i w_i L_i with the current weights; record the losses."""
        if not losses:
            return None
        self.meter.add(losses)
        total = sum(self.weights[self.index[n]] * loss for n, loss in losses.items())
        accelerator.backward(total * scale)
        return total.detach()

    def step(self, accelerator) -> None:
        """Add this step's (process-averaged) losses to the window; at a window's end, update the weights."""
        means, present = self.meter.pop(accelerator)
        self.window_sum += torch.where(present, means, torch.zeros_like(means))
        self.window_count += present.double()
        self.steps_in_window += 1
        if self.steps_in_window < self.options.window:
            return
        avg = self.window_sum / self.window_count          # nan for a task absent from the whole window
        if self.history:
            avg = torch.where(torch.isfinite(avg), avg, self.history[-1])
        self.history = (self.history + [avg])[-2:]
        if len(self.history) == 2:
            self.weights = dwa_weights(self.history[1], self.history[0], self.options.temperature).float()
        self.window_sum.zero_()
        self.window_count.zero_()
        self.steps_in_window = 0

    def current(self) -> dict[str, float]:
        w = self.weights.tolist()
        return {n: w[i] for n, i in self.index.items()}

    def param_groups(self) -> list[dict]:
        return []

    def state_dict(self) -> dict:
        return {"weights": self.weights.cpu(), "window_sum": self.window_sum.cpu(),
                "window_count": self.window_count.cpu(), "steps_in_window": self.steps_in_window,
                "history": [h.cpu() for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        device = self.weights.device
        self.weights = state["weights"].to(device)
        self.window_sum = state["window_sum"].to(device)
        self.window_count = state["window_count"].to(device)
        self.steps_in_window = int(state["steps_in_window"])
        self.history = [h.to(device) for h in state["history"]]


def famo_loss_weights(logits: Tensor, losses: Tensor) -> Tensor:
    """FAMO's loss weights: the gradient of sum_i z_i log L_i / c (z = softmax(logits), c = sum_j z_j / L_j,
    held constant) is sum_i w_i grad L_i with w_i = (z_i / L_i) / sum_j (z_j / L_j). logits, losses: (K,)
    (losses > 0). Returns (K,) weights summing to 1."""
    w = torch.softmax(logits, dim=0) / (losses + EPS)
    return w / w.sum()


def famo_logit_grad(logits: Tensor, delta: Tensor) -> Tensor:
    """The vector-Jacobian product J_softmax(logits)^T delta = z * (delta - z . delta), z = softmax(logits):
    FAMO's update direction for its logits, delta_i = log L_i(before) - log L_i(after). (K,) -> (K,)."""
    z = torch.softmax(logits, dim=0)
    return z * (delta - (z * delta).sum())


class FAMOOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float = Field(0.025, gt=0)      # Adam lr of the weight logits (paper and LibMTL default)
    gamma: float = Field(0.001, ge=0)   # Adam weight decay of the logits (pulls weights back to uniform)


class FAMO:
    """Fast Adaptive Multitask Optimization (Liu, Liu, Jin, Stone & Liu 2023, "FAMO: Fast adaptive
    multitask optimization", NeurIPS).

    Task weights z = softmax(xi). Each step descends sum_i z_i log L_i, which is the loss gradient
    sum_i w_i grad L_i with w_i = (z_i / L_i) / sum_j (z_j / L_j) (`famo_loss_weights`; weights sum to 1).
    After the step xi takes an Adam step (lr, weight decay gamma) along J_softmax(xi)^T delta,
    delta_i = log L_i(t-1) - log L_i(t): a task whose loss fell less than the others gains weight. As in
    LibMTL, L(t) is the next step's loss (another batch), so FAMO needs no extra forward: O(k) work per step.

    Needs: every task's loss in every step (step_mode all_tasks). Cost: one backward per micro-batch; the k
    losses of each accumulation round are averaged over processes before they set the weights (one
    all-reduce of 2k floats per round), so all processes apply the same weights."""

    needs_all_tasks: ClassVar[bool] = True
    combines_shared_gradients: ClassVar[bool] = False
    Options: ClassVar[type[BaseModel]] = FAMOOptions

    def __init__(self, weights: dict[str, float], model: nn.Module | None = None, device="cpu", seed: int = 0,
                 **options):
        self.options = self.Options(**options)
        self.names = list(weights)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.logits = torch.zeros(len(self.names), device=device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.logits], lr=self.options.lr, weight_decay=self.options.gamma)
        self.meter = StepLosses(self.names, device)
        self.prev: Tensor | None = None          # last step's mean losses (k,)
        self.last_weights = torch.full((len(self.names),), 1.0 / len(self.names), device=device)

    def backward(self, losses: dict[str, Tensor], accelerator, scale: float = 1.0) -> Tensor | None:
        """Backpropagate scale * sum_i w_i L_i with FAMO's weights from this round's losses (averaged over
        processes); record the losses."""
        k = len(self.names)
        values = torch.zeros(2 * k, dtype=torch.float64, device=self.logits.device)
        for n, loss in losses.items():
            values[self.index[n]] = loss.detach().double()
            values[k + self.index[n]] = 1
        values = global_sum(accelerator, values)     # every process takes part, also one without losses
        if not losses:
            return None
        present = [self.index[n] for n in losses]
        mean = (values[:k] / values[k:].clamp(min=1)).float()
        w = famo_loss_weights(self.logits.detach()[present], mean[present])
        self.last_weights = torch.zeros_like(self.last_weights).index_put((torch.tensor(present, device=w.device),), w)
        self.meter.add(losses)
        total = sum(w[j] * losses[n] for j, n in enumerate(losses))
        accelerator.backward(total * scale)
        return total.detach()

    def step(self, accelerator) -> None:
        """Move the logits by the change of log losses since the previous step (tasks seen in both)."""
        curr, present = self.meter.pop(accelerator)
        if self.prev is not None:
            delta = torch.log(self.prev + EPS) - torch.log(curr + EPS)
            delta = torch.where(torch.isfinite(delta), delta, torch.zeros_like(delta)).float()
            self.optimizer.zero_grad(set_to_none=False)
            self.logits.grad = famo_logit_grad(self.logits.detach(), delta)
            self.optimizer.step()
        self.prev = torch.where(present, curr, self.prev if self.prev is not None else curr)

    def current(self) -> dict[str, float]:
        w = self.last_weights.tolist()
        return {n: w[i] for n, i in self.index.items()}

    def param_groups(self) -> list[dict]:
        return []

    def state_dict(self) -> dict:
        return {"logits": self.logits.detach().cpu().clone(), "optimizer": self.optimizer.state_dict(),
                "prev": None if self.prev is None else self.prev.cpu(), "last_weights": self.last_weights.cpu()}

    def load_state_dict(self, state: dict) -> None:
        device = self.logits.device
        with torch.no_grad():
            self.logits.copy_(state["logits"].to(device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.prev = None if state["prev"] is None else state["prev"].to(device)
        self.last_weights = state["last_weights"].to(device)
