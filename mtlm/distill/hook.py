"""Multi-task knowledge distillation as a loss hook of `fit` (`mtlm.hooks.LossHook`):

    hook = distillation_loss(teacher, temperature=2.0, alpha=0.5)
    fit(recipe, loss_fn=hook, model_fn=hook.model_fn, callbacks=[hook])

For every task of a micro-batch, on the rows labelled for it: loss = (1 - a) x the task's own (hard-label)
loss + a x the distillation term of its head type (`mtlm.distill.losses`) against the teacher's logits of
the same rows (cached once per row: `mtlm.distill.teacher`). a = alpha, or with teacher annealing (BAM!,
Clark et al. 2019, "BAM! Born-Again Multi-Task Networks", Sec. 3.2) a = alpha x (1 - step / max_steps),
from mostly teacher at the start to the gold labels alone at the end. With `hidden` > 0 every task's loss
also gets hidden x MSE(W s + b, t) between the student's pooled vector s and the teacher's t, through a
learned projection W (student hidden -> teacher hidden; identity at the start when the sizes agree), as
TinyBERT's hidden-state loss (Jiao et al. 2020) on the pooled vector every pooled head reads (per-token
states are not cached: too large to keep per row).

The hook is also a `mtlm.callbacks.Callback`: at the start of training it reads the run's length (for
annealing) and checks that the teacher has a head of the same size for every task, with the same labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlm.callbacks import Callback
from mtlm.distill.losses import distillation_term
from mtlm.distill.teacher import TeacherCache
from mtlm.model import pool


class DistillError(ValueError):
    """Distillation that cannot run (a setting out of range, a teacher that does not fit the student's
    tasks); the message says which."""


def check_options(temperature: float, alpha: float, hidden: float) -> None:
    """Raises DistillError unless temperature > 0, 0 <= alpha <= 1 and hidden >= 0."""
    problems = []
    if not temperature > 0:
        problems.append(f"distill.temperature: {temperature} must be > 0")
    if not 0 <= alpha <= 1:
        problems.append(f"distill.alpha: {alpha} must be in [0, 1] (the weight of the teacher's term)")
    if not hidden >= 0:
        problems.append(f"distill.hidden: {hidden} must be >= 0 (0: no hidden-state loss)")
    if problems:
        raise DistillError("; ".join(problems))


class Distiller(Callback):
    """The distillation loss hook (module docstring). teacher: a `MultiTaskModel` with a head per task of
    the student (its tasks' fitted state in `teacher_tasks`, {name: task}, checked against the student's
    when given). temperature T > 0; alpha in [0, 1]: the teacher term's weight; hidden >= 0: the pooled
    hidden-state MSE's weight (needs `model_fn` applied to the student); anneal: teacher annealing.
    cache: an existing `TeacherCache` of `teacher` to reuse (several students of one teacher). Raises DistillError for options out of range."""

    def __init__(self, teacher: nn.Module, temperature: float = 2.0, alpha: float = 0.5, hidden: float = 0.0,
                 anneal: bool = False, teacher_tasks: dict | None = None, cache_bytes: int = 2 << 30,
                 cache: TeacherCache | None = None):
        check_options(temperature, alpha, hidden)
        self.temperature, self.alpha, self.hidden, self.anneal = float(temperature), float(alpha), float(hidden), anneal
        self.teacher_tasks = teacher_tasks
        # a cache of the same teacher may be shared by several students (one search's tries)
        self.cache = cache if cache is not None else TeacherCache(teacher, max_bytes=cache_bytes)
        self.total_steps: int | None = None
        self.projection: nn.Linear | None = None
        self._pooled: Tensor | None = None

    # ------------------------------------------------------------------ hooks of fit
    def model_fn(self, model: nn.Module) -> nn.Module:
        """ModelHook: with hidden > 0, add the learned projection (as `model.distill_projection`, trained with
        the model, not saved in the bundle) and capture the student's pooled vector of each training
        forward. Returns the model."""
        if self.hidden > 0:
            s, t = model.hidden_size, self.cache.teacher.hidden_size
            self.projection = nn.Linear(s, t)
            if s == t:
                with torch.no_grad():
                    self.projection.weight.copy_(torch.eye(s))
                    self.projection.bias.zero_()
            model.add_module("distill_projection", self.projection)

            def capture(module, args, kwargs, out):
                if module.training and torch.is_grad_enabled() and self._pooled is None:
                    self._pooled = pool(out.last_hidden_state, kwargs["attention_mask"], model.pooling)
            model.backbone.register_forward_hook(capture, with_kwargs=True)
        return model

    def on_train_begin(self, run) -> None:
        self.total_steps = run.max_steps
        self.check_tasks(run.tasks)

    def check_tasks(self, tasks: dict) -> None:
        """Raises DistillError when the teacher lacks a student task's head, or its head or labels differ."""
        teacher, problems = self.cache.teacher, []
        for name, task in tasks.items():
            if name not in teacher.heads:
                problems.append(f"task {name}: the teacher has no head for it (its tasks: {', '.join(teacher.heads)})")
                continue
            mine = self.teacher_tasks.get(name) if self.teacher_tasks else None
            if mine is not None and (mine.cfg.type != task.cfg.type or _fitted(mine) != _fitted(task)):
                problems.append(f"task {name}: the student's {task.cfg.type} task (labels / fitted state "
                                f"{_short(_fitted(task))}) differs from the teacher's ({_short(_fitted(mine))})")
        if problems:
            raise DistillError("the teacher does not fit the student's tasks: " + "; ".join(problems))

    def weight(self, step: int) -> float:
        """The teacher term's weight at optimizer step `step` (0-based): alpha, annealed linearly to 0."""
        if not self.anneal or not self.total_steps:
            return self.alpha
        return self.alpha * max(0.0, 1.0 - step / self.total_steps)

    def __call__(self, ctx) -> dict[str, Tensor]:
        pooled, self._pooled = self._pooled, None
        if self.hidden > 0 and (self.projection is None or pooled is None):
            raise DistillError("distill.hidden > 0 needs the student built through Distiller.model_fn "
                               "(fit(..., model_fn=hook.model_fn))")
        teacher, teacher_vec = self.cache.outputs(ctx.inputs, list(ctx.targets), pooled=self.hidden > 0)
        w, mask = self.weight(ctx.step), ctx.inputs["attention_mask"]
        out = {}
        for name, (rows, labels) in ctx.targets.items():
            s, t, m = ctx.logits[name], teacher[name], mask
            if rows is not None:
                s, t, m = s[rows], t[rows], m[rows]
            term = distillation_term(ctx.tasks[name].outputs, s, t, labels, m, self.temperature)
            loss = (1 - w) * ctx.losses[name] + w * term
            if self.hidden > 0:
                sv, tv = (pooled, teacher_vec) if rows is None else (pooled[rows], teacher_vec[rows])
                loss = loss + self.hidden * F.mse_loss(self.projection(sv.float()), tv)
            out[name] = loss
        return out


def _fitted(task) -> dict:
    """What a task learnt from its train rows (labels, target statistics): dev-tuned thresholds left out."""
    return {k: v for k, v in task.state().items() if k != "thresholds"}


def _short(state: dict) -> str:
    text = repr(state)
    return text if len(text) <= 80 else text[:77] + "..."


def distillation_loss(teacher: nn.Module, temperature: float = 2.0, alpha: float = 0.5, hidden: float = 0.0,
                      anneal: bool = False, teacher_tasks: dict | None = None) -> Distiller:
    """A loss hook for `fit(loss_fn=...)` that distils `teacher` (a `MultiTaskModel`, e.g. the parent run's
    `load_bundle(...)[0]`) into the model being trained; pass it as `callbacks=[hook]` too (annealing, task
    checks) and as `model_fn=hook.model_fn` when hidden > 0. See `Distiller`. Raises DistillError."""
    return Distiller(teacher, temperature, alpha, hidden, anneal, teacher_tasks)
