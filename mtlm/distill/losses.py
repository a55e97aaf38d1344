"""Distillation losses, one per head output kind (`mtlm.tasks.base.TaskType.outputs`): how far a student's
logits are from a teacher's on the same rows. Each is 0 when the student's logits equal the teacher's.

- categorical (classification; token classification / tagging when the logits have a sequence axis):
  temperature-scaled softmax KL, KL(softmax(t / T) || softmax(s / T)) x T^2 (Hinton et al. 2015,
  "Distilling the Knowledge in a Neural Network": the T^2 keeps the soft-target gradients' scale as T
  changes). Tagging: per token, averaged over the positions that carry a tag (labels != IGNORE): pads,
  special tokens and continuation sub-tokens are left out.
- choices (multiple choice): the same KL over each example's choices (absent choices take no probability).
- span (extractive QA): the same KL over sequence positions, for start and for end (averaged); positions
  past a row's attention mask (pads) take no probability in either distribution.
- bernoulli (multilabel): per-label sigmoid cross-entropy against the teacher's probabilities
  sigmoid(t / T), minus the teacher's entropy (the Bernoulli KL: same gradient as BCE, 0 at equality),
  x T^2, averaged over rows and labels.
- real (regression): MSE between the logits (standardised targets); no temperature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mtlm.tasks.multiple_choice import MISSING
from mtlm.tasks.token_classification import IGNORE

FILL = -1e4      # logit of an absent choice / pad position: exp() underflows to 0 without the NaNs of -inf
KINDS = ("categorical", "choices", "span", "bernoulli", "real")


def softmax_kl(student: Tensor, teacher: Tensor, temperature: float, dim: int = -1) -> Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) x T^2 along `dim`, elementwise over the other dims
    (shape: the input's without `dim`), in float32. student, teacher: logits of one shape."""
    log_q = F.log_softmax(student.float() / temperature, dim)
    log_p = F.log_softmax(teacher.float() / temperature, dim)
    return (log_p.exp() * (log_p - log_q)).sum(dim) * temperature ** 2


def bernoulli_kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Per-label KL(Bernoulli(sigmoid(t / T)) || Bernoulli(sigmoid(s / T))) x T^2, elementwise (the sigmoid
    cross-entropy against the teacher's probabilities minus the teacher's entropy)."""
    s, t = student.float() / temperature, teacher.float() / temperature
    p = torch.sigmoid(t)
    kl = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return kl * temperature ** 2


def choice_scores(logits: Tensor, layout: Tensor) -> Tensor:
    """Multiple choice logits (rows, 1), each example's choices consecutive -> (batch, max_choices) scores
    laid out by `layout` (the task's labels, MISSING where an example has no such choice: FILL there)."""
    present = layout != MISSING
    return torch.full(layout.shape, FILL, device=logits.device).masked_scatter(present, logits.float().reshape(-1))


def distillation_term(outputs: str, student: Tensor, teacher: Tensor, labels: dict[str, Tensor],
                      attention_mask: Tensor | None, temperature: float) -> Tensor:
    """The distillation loss (a scalar, a mean over rows / tagged tokens) of one task's student logits
    against its teacher's logits on the same rows.

    outputs: the task type's output kind (module docstring). student, teacher: the head's logits, the same
    shape: (batch, classes) categorical, (batch, seq_len, tags) tagging, (batch, labels) bernoulli,
    (batch, 1) real, (batch, seq_len, 2) span, (rows, 1) choices. labels: the task's collated labels for the
    rows (tagging: "labels" (batch, seq_len) with IGNORE; choices: "labels" (batch, max_choices) with
    MISSING). attention_mask: (batch, seq_len), needed for span. temperature: T > 0.
    Raises ValueError for an unknown kind or mismatched shapes."""
    if student.shape != teacher.shape:
        raise ValueError(f"distillation: student logits {tuple(student.shape)} and teacher logits "
                         f"{tuple(teacher.shape)} differ in shape")
    if outputs == "categorical":
        kl = softmax_kl(student, teacher, temperature)
        if student.dim() == 2:
            return kl.mean()
        keep = (labels["labels"] != IGNORE).to(kl.dtype)          # tagging: tagged positions only
        return (kl * keep).sum() / keep.sum().clamp(min=1)
    if outputs == "choices":
        layout = labels["labels"]
        return softmax_kl(choice_scores(student, layout), choice_scores(teacher, layout), temperature).mean()
    if outputs == "span":
        if attention_mask is None:
            raise ValueError("distillation: span outputs need the attention mask")
        pad = (attention_mask == 0).unsqueeze(-1)
        s, t = student.float().masked_fill(pad, FILL), teacher.float().masked_fill(pad, FILL)
        return softmax_kl(s, t, temperature, dim=1).mean()
    if outputs == "bernoulli":
        return bernoulli_kl(student, teacher, temperature).mean()
    if outputs == "real":
        return F.mse_loss(student.float(), teacher.float())
    raise ValueError(f"distillation: no loss for task outputs {outputs!r} (known: {', '.join(KINDS)})")
