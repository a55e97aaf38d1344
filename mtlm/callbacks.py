"""Callbacks: what `fit` does around its steps that is not the step itself (TensorBoard logging, model
selection and the best bundle, early stopping, checkpoints). `fit(recipe, callbacks=[...])` adds more after
the first three and before Checkpoints.

The loop calls, on the main and on every other process alike (rank-aware I/O is the callback's job, with
`run.is_main`):

    on_train_begin(run)                          after construction and --resume, before the first step
    on_evaluate(run, step, metrics)              after a step's dev evaluation ({"task/metric": value});
                                                 `run.improved` says whether it is the best so far
    on_step_end(run, step, losses, weights)      after each optimizer step (and its evaluation); losses
                                                 {task: mean loss of the step's micro-batches}, weights
                                                 {task: weighting's weight}
    on_train_end(run)                            after the last step of this call

A callback stops training by setting `run.stop` to a reason. One with a `key` has its `state_dict()` saved
in every checkpoint (trainer_state.json "callbacks"[key]) and restored by `--resume` before
`on_train_begin`, so a resumed run continues as the killed one would have.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

from mtlm.checkpoint import save_bundle, save_checkpoint
from mtlm.selection import Selection
from mtlm.sharding import full_state_dict

if TYPE_CHECKING:
    from mtlm.hooks import Run

log = logging.getLogger("mtlm")


class Callback:
    """Base class: every hook is a no-op, the state is empty."""

    key: ClassVar[str | None] = None

    def on_train_begin(self, run: Run) -> None:
        pass

    def on_step_end(self, run: Run, step: int, losses: dict[str, float], weights: dict[str, float]) -> None:
        pass

    def on_evaluate(self, run: Run, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_train_end(self, run: Run) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class TensorBoardLog(Callback):
    """Per-task loss and weight and the learning rate every step, dev metrics at every evaluation, under
    run_dir/logs (main process only; nothing when tensorboard is not installed)."""

    def __init__(self) -> None:
        self.writer = None

    def on_train_begin(self, run: Run) -> None:
        if not run.is_main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:   # tensorboard not installed: logging to metrics.json only
            return
        self.writer = SummaryWriter(log_dir=str(run.run_dir / "logs"))

    def on_step_end(self, run: Run, step: int, losses: dict[str, float], weights: dict[str, float]) -> None:
        if self.writer:
            for n, v in losses.items():
                self.writer.add_scalar(f"loss/{n}", v, step)
            self.writer.add_scalar("lr", run.scheduler.get_last_lr()[0], step)
            for n, w in weights.items():
                self.writer.add_scalar(f"weight/{n}", w, step)

    def on_evaluate(self, run: Run, step: int, metrics: dict[str, float]) -> None:
        if self.writer:
            for k, v in metrics.items():
                self.writer.add_scalar(f"dev/{k}", v, step)

    def on_train_end(self, run: Run) -> None:
        if self.writer:
            self.writer.close()


class BestBundle(Callback):
    """Model selection (`mtlm.selection`: scale-free score, each task's own best) and the best bundle in
    run_dir/model, rewritten at every improving evaluation; at the end, multilabel thresholds are tuned on
    dev with the best bundle's weights. Sets `run.improved`; adds "score" to the evaluation's history entry."""

    key = "selection"

    def __init__(self, tasks: dict) -> None:
        self.selection = Selection.for_tasks(tasks)

    def on_evaluate(self, run: Run, step: int, metrics: dict[str, float]) -> None:
        score, run.improved = self.selection.update(step, metrics)
        run.best_step = self.selection.best_step
        if score is not None:
            run.state["history"][-1]["score"] = score
        if run.improved:
            state = full_state_dict(run.accelerator, run.model)   # sharded (train.fsdp): gathered, by every process
            if run.is_main:
                save_bundle(run.unwrapped, run.tokenizer, run.tasks, run.recipe, run.run_dir / "model", state)
        run.say(f"step {step}: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items())
                + (f"  score={score:.4f}" if score is not None else "")
                + ("  (best)" if run.improved and score is not None else ""))

    def on_train_end(self, run: Run) -> None:
        if run.is_main and (run.run_dir / "model").is_dir():
            tune_thresholds(run.run_dir / "model", run.dev, run.recipe.train.eval_batch_size)

    def state_dict(self) -> dict:
        return self.selection.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.selection.load_state_dict(state)

    def on_train_begin(self, run: Run) -> None:
        run.best_step = self.selection.best_step


class EarlyStopping(Callback):
    """Stop when `patience` evaluations in a row did not improve the selection score (`run.improved`).
    Its count and whether it stopped are checkpointed: resuming a run that stopped early does not train on
    (unless the resumed recipe raises early_stopping_patience above the count)."""

    key = "early_stopping"

    def __init__(self, patience: int | None) -> None:
        self.patience, self.bad_evals, self.stopped_at = patience, 0, None

    def _exhausted(self) -> bool:
        return self.patience is not None and self.bad_evals >= self.patience

    def on_train_begin(self, run: Run) -> None:
        if self.stopped_at is not None and self._exhausted():
            run.stop = "early"
            run.say(f"the run stopped early at step {self.stopped_at} (no dev improvement in {self.bad_evals} "
                    f"evaluations): nothing to train; raise train.early_stopping_patience to continue it")
        else:
            self.stopped_at = None

    def on_evaluate(self, run: Run, step: int, metrics: dict[str, float]) -> None:
        self.bad_evals = 0 if run.improved else self.bad_evals + 1
        if self._exhausted() and step < run.max_steps:
            self.stopped_at, run.stop = step, "early"
            run.say(f"early stopping at step {step}: no dev improvement in {self.patience} evaluations "
                    f"(best at step {run.best_step})")

    def state_dict(self) -> dict:
        return {"bad_evals": self.bad_evals, "stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict) -> None:
        self.bad_evals, self.stopped_at = state.get("bad_evals", 0), state.get("stopped_at")


class Checkpoints(Callback):
    """Resumable state under run_dir/checkpoints/step_N every `every` steps, at the last step and whenever
    training stops (`run.stop`: early stopping, a callback, `stop_after`): Accelerate's state (model,
    optimizer, scheduler, weighting, RNG) + trainer_state.json (step, history, samplers, and the state of
    every callback with a `key`); the newest `keep` are kept. Then metrics.json (`write_metrics`). `fit`
    calls it after every other callback, so their state of this step is in the checkpoint."""

    def __init__(self, every: int, keep: int) -> None:
        self.every, self.keep = every, keep

    def on_step_end(self, run: Run, step: int, losses: dict[str, float], weights: dict[str, float]) -> None:
        if step % self.every and step != run.max_steps and run.stop is None:
            return
        state = run.state
        state["sampler"] = run.sampler.state_dict()
        state["batches"] = {n: b.state_dict() for n, b in run.batches.items()}
        state["callbacks"] = {cb.key: cb.state_dict() for cb in run.callbacks if cb.key is not None}
        save_checkpoint(run.accelerator, run.run_dir, step, state, self.keep)
        if run.is_main:
            write_metrics(run)


def write_metrics(run: Run) -> None:
    """run_dir/metrics.json: steps, the kept model (best_step, its selection score, `mtlm.selection`), each
    task's own best {"metric", "value", "step"}, early stopping, dev evaluations, training log."""
    cbs = run.state.get("callbacks", {})
    selection, early = cbs.get("selection", {}), cbs.get("early_stopping", {})
    out = {"max_steps": run.max_steps, "step": run.state["step"], "best_step": selection.get("best_step"),
           "best_score": selection.get("best_score"),
           "selection": "mean over tasks of the relative error reduction since the first dev evaluation",
           "task_best": selection.get("task_best", {}), "stopped_early": early.get("stopped_at") is not None,
           "eval": run.state["history"], "train": run.state["train_log"]}
    write_atomic(run.run_dir / "metrics.json", json.dumps(out, indent=1))


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temp file in the same folder and `os.replace`: a crash leaves the
    old file or the new one, never a partial one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def tune_thresholds(bundle: Path, dev: dict[str, list[dict]], batch_size: int) -> None:
    """Tune the per-label thresholds of multilabel tasks on dev with the best bundle's weights and write them
    into its tasks.json atomically (the dev metrics logged during training used the initial thresholds)."""
    from mtlm.checkpoint import load_bundle
    from mtlm.evaluate import task_outputs

    names = [n for n, info in json.loads((bundle / "tasks.json").read_text())["tasks"].items()
             if info["type"] == "multilabel" and dev.get(n)]
    if not names:
        return
    model, tokenizer, tasks, meta = load_bundle(bundle)
    for n in names:
        preds, refs = task_outputs(model, tasks[n], dev[n], batch_size, tokenizer.pad_token_id, torch.device("cpu"))
        tasks[n].tune_thresholds(preds, refs)
        meta["tasks"][n]["state"] = tasks[n].state()
    write_atomic(bundle / "tasks.json", json.dumps(meta, indent=2))
