"""What `fit`'s extension points see: the loss-hook context, the hook types, and the `Run` that `build`
constructs and callbacks read (a module of its own, so callbacks and hooks need not import the loop)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator

from mtlm.batches import SourceBatches, TaskSampler, masked_losses
from mtlm.config import Recipe
from mtlm.model import MultiTaskModel

log = logging.getLogger("mtlm")


@dataclass
class LossContext:
    """What a loss hook sees for one micro-batch of one source (a task, or a joint group's tasks).

    model: the unwrapped MultiTaskModel (a hook may run it again, e.g. on perturbed embeddings: `forward()`);
    inputs: input_ids, attention_mask[, token_type_ids], each (batch, seq_len); targets: {task: (rows,
    labels)} as `mtlm.batches.collate_source` returns them; logits: {task: head output} of the loop's forward;
    losses: {task: scalar loss} so far (the masked task losses, plus what earlier hooks added)."""

    model: torch.nn.Module
    tasks: dict
    source: str
    inputs: dict[str, torch.Tensor]
    targets: dict[str, tuple]
    logits: dict[str, torch.Tensor]
    losses: dict[str, torch.Tensor]
    step: int

    def forward(self) -> dict[str, torch.Tensor]:
        """The model's outputs for this micro-batch again (one backbone pass): {task: logits}."""
        return self.model(tasks=list(self.targets), **self.inputs)

    def task_losses(self, logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each task's own loss of `logits` against this micro-batch's labels (labelled rows only)."""
        return masked_losses(self.tasks, logits, self.targets)


# loss_fn(ctx) -> {task: loss}, the same keys as ctx.losses: e.g. distillation adds a teacher term per task.
LossHook = Callable[[LossContext], dict[str, torch.Tensor]]
# model_fn(model) -> model, between building and accelerator.prepare (and before the optimizer is made, so
# it may freeze, replace or add parameters): LoRA, pruning masks, quantisation-aware training.
ModelHook = Callable[[MultiTaskModel], torch.nn.Module]


@dataclass
class Run:
    """Everything `build` constructs for one call of `fit`, and the loop's state (`state`: step, history,
    train log, samplers; saved in every checkpoint). `stop` (a reason) ends the loop; `improved` says
    whether the latest evaluation was the best so far (set by the BestBundle callback)."""

    recipe: Recipe
    run_dir: Path
    accelerator: Accelerator
    tasks: dict
    tokenizer: object
    model: torch.nn.Module                          # as prepared by Accelerate (DDP-wrapped with 2+ processes,
    #                                                 or sharded in place with train.fsdp: mtlm.sharding)
    unwrapped: MultiTaskModel
    optimizer: torch.optim.Optimizer
    scheduler: object
    weighting: object
    sources: dict[str, list[str]]                  # source -> its tasks: a task alone, or a joint group
    step_mode: str                                  # sampled | all_tasks
    max_steps: int
    sampler: TaskSampler
    batches: dict[str, SourceBatches]
    next_batch: Callable[[str], tuple[dict, dict]]  # source -> (inputs, targets) of this process's share
    dev: dict[str, list[dict]]
    checkpoint: Path | None
    state: dict = field(default_factory=lambda: {"step": 0, "history": [], "train_log": []})
    stop: str | None = None
    improved: bool = False
    best_step: int | None = None                    # the kept model's step (set by the BestBundle callback)
    callbacks: list = field(default_factory=list)   # fit's, in call order (built-ins first, Checkpoints last)
    bar: object = None

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def step(self) -> int:
        return self.state["step"]

    def say(self, message: str) -> None:
        """A line for the user (main process; above the progress bar)."""
        if self.is_main:
            (self.bar.write if self.bar is not None else log.info)(message)
