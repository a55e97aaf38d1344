"""Adversarial training on the word embeddings, as loss hooks of `fit` (`train.adversarial` in the recipe):

    train:
      adversarial: {method: fgm, epsilon: 1.0}    # none (default) | fgm | smart

Both add a term to every task's loss of a micro-batch and return the same task keys, so they work with
every task type, joint groups and every weighting method (the weighting backpropagates clean + adversarial
loss per task). Cost per micro-batch, against 1 forward + 1 backward without them:

- fgm (Fast Gradient Method, Miyato et al. 2017, "Adversarial Training Methods for Semi-Supervised Text
  Classification", in the form widely used for BERT models: the word-embedding matrix is perturbed). With
  g = dL/dE the gradient of the micro-batch's summed task losses w.r.t. the word-embedding matrix E,
  r = epsilon * g / ||g||_2 (one L2 norm over the matrix; only rows of tokens in the batch are non-zero);
  the batch runs again on E + r and each task's loss becomes L_i + weight * L_i(E + r). E is restored right
  after that forward. +1 forward, +2 backwards (one for g, one through the perturbed graph).
- smart (smoothness-inducing adversarial regulariser, Jiang et al. 2020, "SMART", Eq. 2-3 and Alg. 1; the
  Bregman proximal point step is not included). A perturbation delta of the word-embedding *outputs*
  (rows, seq_len, hidden) starts as N(0, noise^2) on real tokens, takes one projected gradient-ascent step
  delta <- Proj_{||.||_inf <= epsilon}(delta + step_size * g / ||g||_inf) on the divergence, and each task's
  loss becomes L_i + weight * D_i(f(x), f(x + delta)): the symmetric KL between clean and perturbed output
  distributions (softmax classes, per-label Bernoulli, start/end positions, each example's choices), MSE for
  regression. +2 forwards, +2 backwards.

Defaults for epsilon: fgm 1.0, smart 1e-5 (the paper's; noise 1e-5, step_size 1e-3 as well).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlm.tasks.multiple_choice import MISSING
from mtlm.tasks.token_classification import IGNORE

DEFAULT_EPSILON = {"fgm": 1.0, "smart": 1e-5}
FILL = -1e4          # logit of an absent choice: exp() underflows to 0 without the NaN gradients of -inf


def word_embeddings(model: nn.Module) -> nn.Embedding:
    """The backbone's word-embedding module (`get_input_embeddings`). Raises ValueError without one."""
    emb = model.backbone.get_input_embeddings() if hasattr(model.backbone, "get_input_embeddings") else None
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"adversarial training needs the backbone's word embeddings (get_input_embeddings() "
                         f"returned {type(emb).__name__})")
    return emb


def fgm_perturbation(grad: Tensor, epsilon: float) -> Tensor:
    """r = epsilon * grad / ||grad||_2 (one norm over the whole tensor), same shape as grad; zeros when the
    gradient is zero or not finite (nothing to follow)."""
    norm = grad.float().norm()
    if not torch.isfinite(norm) or norm == 0:
        return torch.zeros_like(grad)
    return (epsilon * grad.float() / norm).to(grad.dtype)


class FGM:
    """Loss hook: each task's loss plus `weight` x its loss on word embeddings moved by epsilon along the
    loss gradient (module docstring)."""

    def __init__(self, epsilon: float = 1.0, weight: float = 1.0):
        self.epsilon, self.weight = epsilon, weight

    def __call__(self, ctx) -> dict[str, Tensor]:
        matrix = word_embeddings(ctx.model).weight
        if not matrix.requires_grad:
            raise ValueError("adversarial method fgm needs trainable word embeddings (they are frozen)")
        (grad,) = torch.autograd.grad(sum(ctx.losses.values()), matrix, retain_graph=True)
        r = fgm_perturbation(grad, self.epsilon)
        backup = matrix.detach().clone()
        # .data: the clean graph does not read E's values in its backward (the embedding backward needs only
        # token ids), so E may change under it without autograd's version check refusing the backward.
        matrix.data.add_(r)
        try:
            adversarial = ctx.task_losses(ctx.forward())
        finally:
            matrix.data.copy_(backup)
        return {t: loss + self.weight * adversarial[t] for t, loss in ctx.losses.items()}


@contextlib.contextmanager
def added_to_output(module: nn.Module, delta: Tensor):
    """Within the block, `module`'s output is output + delta (a forward hook, removed on exit)."""
    handle = module.register_forward_hook(lambda m, args, out: out + delta.to(out.dtype))
    try:
        yield
    finally:
        handle.remove()


def _kl(x: Tensor, y: Tensor, dim: int) -> Tensor:
    """KL(softmax(y) || softmax(x)) along `dim`, elementwise over the other dims (x, y logits)."""
    log_q, log_p = F.log_softmax(x.float(), dim), F.log_softmax(y.float(), dim)
    return (log_p.exp() * (log_p - log_q)).sum(dim)


def divergence(outputs: str, x: Tensor, y: Tensor, labels: dict[str, Tensor]) -> Tensor:
    """How far the output distribution of logits `x` is from that of `y` (a scalar, mean over examples):
    KL(P_y || P_x) for the task-type output kinds of `mtlm.tasks.base.TaskType.outputs`, MSE for `real`.

    categorical: x, y (batch[, seq_len], classes), positions labelled IGNORE in labels["labels"] left out;
    bernoulli: (batch, labels), per-label Bernoulli KL; real: (batch, 1); span: (batch, seq_len, 2), a
    distribution over positions for start and for end; choices: (rows, 1), one distribution over each
    example's choices laid out by labels["labels"] (batch, max_choices), MISSING slots excluded.
    Raises ValueError for an unknown kind."""
    if outputs == "categorical":
        kl, keep = _kl(x, y, -1), labels["labels"] != IGNORE
        return (kl * keep).sum() / keep.sum().clamp(min=1)
    if outputs == "bernoulli":
        lx, ly = x.float(), y.float()
        p = torch.sigmoid(ly)
        kl = p * (F.logsigmoid(ly) - F.logsigmoid(lx)) + (1 - p) * (F.logsigmoid(-ly) - F.logsigmoid(-lx))
        return kl.mean()
    if outputs == "real":
        return F.mse_loss(x.float(), y.float())
    if outputs == "span":
        return _kl(x, y, 1).mean()
    if outputs == "choices":
        layout = labels["labels"]
        present = layout != MISSING
        sx = torch.full(layout.shape, FILL, device=x.device).masked_scatter(present, x.float().reshape(-1))
        sy = torch.full(layout.shape, FILL, device=y.device).masked_scatter(present, y.float().reshape(-1))
        return _kl(sx, sy, -1).mean()
    raise ValueError(f"no divergence for task outputs {outputs!r}")


def symmetric_divergence(outputs: str, a: Tensor, b: Tensor, labels: dict[str, Tensor]) -> Tensor:
    """D(a, b.detach()) + D(b, a.detach()): symmetric, with gradients reaching both forwards (as SMART's
    reference implementation, mt-dnn, trains it)."""
    return divergence(outputs, a, b.detach(), labels) + divergence(outputs, b, a.detach(), labels)


def smoothness(tasks: dict, clean: dict[str, Tensor], perturbed: dict[str, Tensor],
               targets: dict[str, tuple]) -> dict[str, Tensor]:
    """{task: symmetric divergence between its clean and perturbed outputs} on the rows labelled for it
    (targets as `mtlm.batches.collate_source` returns them). 0 when the outputs are equal."""
    out = {}
    for name, (rows, labels) in targets.items():
        a, b = clean[name], perturbed[name]
        if rows is not None:
            a, b = a[rows], b[rows]
        out[name] = symmetric_divergence(tasks[name].outputs, a, b, labels)
    return out


class SMART:
    """Loss hook: each task's loss plus `weight` x the smoothness regulariser at an adversarial perturbation
    of the word-embedding outputs (module docstring)."""

    def __init__(self, epsilon: float = 1e-5, weight: float = 1.0, step_size: float = 1e-3, noise: float = 1e-5):
        self.epsilon, self.weight, self.step_size, self.noise = epsilon, weight, step_size, noise

    def perturbation(self, ctx, emb: nn.Embedding) -> Tensor:
        """delta (rows, seq_len, hidden): random start on real tokens, one projected ascent step."""
        mask = ctx.inputs["attention_mask"].unsqueeze(-1).float()
        shape = (*ctx.inputs["input_ids"].shape, emb.embedding_dim)
        delta = (torch.randn(shape, device=mask.device) * self.noise * mask).requires_grad_()
        clean = {t: logits.detach() for t, logits in ctx.logits.items()}
        with added_to_output(emb, delta):
            perturbed = ctx.forward()
        ascent = sum(smoothness(ctx.tasks, clean, perturbed, ctx.targets).values())
        (grad,) = torch.autograd.grad(ascent, delta)
        scale = grad.abs().amax(dim=(1, 2), keepdim=True).clamp(min=1e-12)   # ||g||_inf per row
        return ((delta + self.step_size * grad / scale).clamp(-self.epsilon, self.epsilon) * mask).detach()

    def __call__(self, ctx) -> dict[str, Tensor]:
        emb = word_embeddings(ctx.model)
        delta = self.perturbation(ctx, emb)
        with added_to_output(emb, delta):
            perturbed = ctx.forward()
        reg = smoothness(ctx.tasks, ctx.logits, perturbed, ctx.targets)
        return {t: loss + self.weight * reg[t] for t, loss in ctx.losses.items()}


def adversarial_hooks(cfg) -> list[Callable]:
    """The loss hooks for a recipe's `train.adversarial` (an AdversarialConfig): [] for method none."""
    if cfg.method == "none":
        return []
    epsilon = cfg.epsilon if cfg.epsilon is not None else DEFAULT_EPSILON[cfg.method]
    if cfg.method == "fgm":
        return [FGM(epsilon, cfg.weight)]
    return [SMART(epsilon, cfg.weight, cfg.step_size, cfg.noise)]
