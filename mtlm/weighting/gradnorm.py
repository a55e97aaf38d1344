"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich 2018): loss weights that balance the tasks' gradient
norms on the last shared layer, pulled towards equal relative training rates."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mtlm.weighting.loss_weights import StepLosses, global_sum, loss_scale


def last_shared_layer(backbone: nn.Module, private: int = 0) -> list[nn.Parameter]:
    """The trainable parameters of the backbone's last layer that every task runs: the last block of its
    longest nn.ModuleList (BERT's encoder.layer, DistilBERT's transformer.layer, ...), or with `private` > 0
    (the largest `tasks.<name>.private_layers`, `mtlm.private_layers`) the block below the top `private` ones.
    Raises ValueError when there is none."""
    lists = [m for m in backbone.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"gradnorm: {type(backbone).__name__} has no nn.ModuleList of layers to take the last "
                         "shared layer from")
    layers = max(lists, key=len)
    if private >= len(layers):
        raise ValueError(f"gradnorm: a task has private_layers {private}, all of the backbone's {len(layers)} "
                         f"layers: no layer is shared by every task to balance gradient norms on")
    params = [p for p in layers[len(layers) - 1 - private].parameters() if p.requires_grad]
    if not params:
        raise ValueError("gradnorm: the backbone's last layer has no trainable parameters")
    return params


def gradnorm_logit_grad(logits: Tensor, norms: Tensor, loss_ratios: Tensor, alpha: float) -> Tensor:
    """Gradient of L_grad = sum_i |G_i - Gbar * r_i^alpha| w.r.t. the weight logits, where w = K softmax(logits),
    G_i = w_i * norms_i (norms_i = ||grad_W L_i||), Gbar = mean_i G_i, r_i = loss_ratios_i / mean(loss_ratios)
    and the target Gbar * r_i^alpha is held constant (as in the paper). logits, norms, loss_ratios: (K,).
    Returns (K,)."""
    logits = logits.detach().float().requires_grad_(True)
    w = len(logits) * torch.softmax(logits, dim=0)
    g = w * norms.float()
    r = loss_ratios.float() / loss_ratios.float().mean()
    target = (g.mean() * r ** alpha).detach()
    (grad,) = torch.autograd.grad((g - target).abs().sum(), logits)
    return grad


class GradNormOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(1.5, ge=0)     # restoring force towards equal training rates (paper: 0.12-3; LibMTL 1.5)
    lr: float = Field(0.025, gt=0)      # Adam lr of the weight logits


class GradNorm:
    """GradNorm (Chen, Badrinarayanan, Lee & Rabinovich 2018, "GradNorm: Gradient normalization for adaptive
    loss balancing in deep multitask networks", ICML).

    Weights w = K softmax(xi) (positive, summing to K: the paper's renormalisation, parameterised as in
    LibMTL); the model descends sum_i w_i L_i. Each step, G_i = w_i ||grad_W L_i|| on W = the backbone's last
    layer (the paper's last shared layer), Gbar = mean_i G_i, r_i = Ltilde_i / mean_j Ltilde_j with
    Ltilde_i = L_i(t) / L_i(0) (L(0): the first step's losses); xi takes an Adam step (lr) down
    L_grad = sum_i |G_i - Gbar r_i^alpha| with the target held constant. A task that trains slowly (large r_i)
    or whose gradient is small gains weight.

    Needs: every task's loss in every step (step_mode all_tasks) and per-task gradients of the last layer.
    Cost: per micro-batch, k partial backward passes from each loss to the last backbone layer
    (`torch.autograd.grad`, cheap next to the full backward) besides the one full backward; k x |W| floats
    kept per step and summed over processes once per step (with fp16 the per-task gradients are taken at the
    GradScaler's scale, like the main backward, and divided by it before their norms are taken)."""

    needs_all_tasks: ClassVar[bool] = True
    combines_shared_gradients: ClassVar[bool] = False
    Options: ClassVar[type[BaseModel]] = GradNormOptions

    def __init__(self, weights: dict[str, float], model: nn.Module | None = None, device="cpu", seed: int = 0,
                 **options):
        self.options = self.Options(**options)
        if model is None:
            raise ValueError("gradnorm needs the model (its backbone's last layer)")
        self.names = list(weights)
        self.index = {n: i for i, n in enumerate(self.names)}
        private = max((len(v) for v in getattr(model, "private", {}).values()), default=0)
        self.layer = last_shared_layer(model.backbone, private)
        k, size = len(self.names), sum(p.numel() for p in self.layer)
        self.logits = torch.zeros(k, device=device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.logits], lr=self.options.lr)
        self.meter = StepLosses(self.names, device)
        self.grads = torch.zeros(k, size, device=device)      # per-task grad_W L_i of this step (loss-scaled)
        self.initial: Tensor | None = None                    # L_i(0)

    def weights(self) -> Tensor:
        return len(self.names) * torch.softmax(self.logits.detach(), dim=0)

    def backward(self, losses: dict[str, Tensor], accelerator, scale: float = 1.0) -> Tensor | None:
        """Record each task's gradient on the last layer, then backpropagate scale * sum_i w_i L_i."""
        if not losses:
            return None
        scaler = getattr(accelerator, "scaler", None)
        for name, loss in losses.items():
            scaled = scaler.scale(loss * scale) if scaler is not None else loss * scale
            grads = torch.autograd.grad(scaled, self.layer, retain_graph=True, allow_unused=True)
            self.grads[self.index[name]] += torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                                       for g, p in zip(grads, self.layer)]).float()
        self.meter.add(losses)
        w = self.weights()
        total = sum(w[self.index[n]] * loss for n, loss in losses.items())
        accelerator.backward(total * scale)
        return total.detach()

    def step(self, accelerator) -> None:
        """Sum the last-layer gradients over processes, take their norms and update the weight logits."""
        losses, present = self.meter.pop(accelerator)
        world = accelerator.num_processes if accelerator is not None else 1
        grads = global_sum(accelerator, self.grads) / (world * loss_scale(accelerator))
        self.grads.zero_()
        if self.initial is None:
            self.initial = losses.clone()
        self.initial = torch.where(torch.isfinite(self.initial), self.initial, losses)   # a task first seen now
        idx = present.nonzero().flatten()
        norms = grads[idx].norm(dim=1)
        ratios = (losses[idx] / self.initial[idx]).float()
        if len(idx) < 2 or not (torch.isfinite(norms).all() and torch.isfinite(ratios).all()):
            return      # nothing to balance, or an fp16 overflow: the GradScaler skips this step too
        grad = torch.zeros_like(self.logits)
        grad[idx] = gradnorm_logit_grad(self.logits.detach()[idx], norms, ratios, self.options.alpha)
        self.optimizer.zero_grad(set_to_none=False)
        self.logits.grad = grad
        self.optimizer.step()

    def current(self) -> dict[str, float]:
        w = self.weights().tolist()
        return {n: w[i] for n, i in self.index.items()}

    def param_groups(self) -> list[dict]:
        return []

    def state_dict(self) -> dict:
        return {"logits": self.logits.detach().cpu().clone(), "optimizer": self.optimizer.state_dict(),
                "initial": None if self.initial is None else self.initial.cpu()}

    def load_state_dict(self, state: dict) -> None:
        device = self.logits.device
        with torch.no_grad():
            self.logits.copy_(state["logits"].to(device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.initial = None if state["initial"] is None else state["initial"].to(device)
