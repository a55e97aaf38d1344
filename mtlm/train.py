"""fit(): the multi-task training loop, on Accelerate (one process, or several via `accelerate launch`).

Read top to bottom: prepare rows (all recipe/data errors before any model loads) -> load backbone ->
encode -> build model + heads -> weighting -> AdamW + warmup/decay schedule -> loop over optimizer steps,
each made of `grad_accum` rounds; a round is one micro-batch of the source the sampler picks (step_mode
sampled) or one micro-batch of every source (step_mode all_tasks); a source is a task or a joint group
(several tasks labelled on one file, one backbone pass) -> the weighting turns each round's per-task losses
into gradients and updates itself once per step -> evaluate on dev every `eval_every` steps, keep the best
bundle (mean selection metric), checkpoint for `--resume`, stop early when dev stops improving.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from mtlm.checkpoint import latest_checkpoint, save_bundle, save_checkpoint
from mtlm.config import Recipe, RecipeError, recipe_changes
from mtlm.batches import TaskSampler, masked_losses, steps_for_epochs, train_batches
from mtlm.contract import write_contract
from mtlm.data import encode_rows, prepare_rows
from mtlm.evaluate import evaluate
from mtlm.model import build_model, load_backbone
from mtlm.tasks import build_task
from mtlm.weighting import build_weighting, resolve_step_mode

log = logging.getLogger("mtlm")
NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decoupled weight decay on weights, none on biases and LayerNorm (Loshchilov & Hutter 2019)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(name.endswith(s) for s in NO_DECAY) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_accelerator(recipe: Recipe) -> Accelerator:
    # Ask for the CPU explicitly when there is no GPU: under torchrun/accelerate launch without it,
    # every rank would train alone (see shared/ENGINES.md). Heads of tasks absent from a micro-batch get
    # no gradient, so DDP must look for unused parameters.
    mp = recipe.train.mixed_precision
    if mp == "fp16" and not torch.cuda.is_available():
        raise RecipeError(["train.mixed_precision: fp16 needs a GPU; use bf16 on CPU"])
    if mp == "bf16" and not torch.cuda.is_available() and not cpu_has_bf16():
        # Without AVX512-BF16/AMX, PyTorch emulates bf16 matmuls: measured 6-9x slower than fp32 here.
        log.warning("train.mixed_precision: this CPU has no native bf16 (AVX512-BF16/AMX); bf16 would run "
                    "several times slower than fp32, so training in fp32")
        mp = "no"
    # Accumulation is done by the loop (it knows which micro-batch ends a step), not by accelerator.accumulate.
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mp,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def average_gradients(accelerator: Accelerator, params: list[torch.nn.Parameter]) -> None:
    """Average `params`' .grad over processes in one flat all-reduce (a missing grad counts as zeros). Used
    for all_tasks steps, whose forwards all ran under `no_sync`; a no-op with one process."""
    if accelerator.num_processes == 1:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    flat = accelerator.reduce(flat, reduction="mean")
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()


def cpu_has_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX)."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(probe()) if probe is not None else True


# Settings a resumed run may change: they are read anew at every step or evaluation. max_steps / epochs
# re-make the learning-rate schedule over the new total from the current step.
RESUMABLE = ("name", "output_dir", "train.max_steps", "train.epochs", "train.eval_every", "train.checkpoint_every",
             "train.keep_checkpoints", "train.early_stopping_patience", "train.eval_batch_size")


def check_resumable(saved: dict, recipe: Recipe, ckpt: Path) -> list[str]:
    """The changes from the run's saved recipe dict to `recipe` that a resumed run can honour (RESUMABLE);
    raises RecipeError listing every other change (the checkpoint's optimizer, schedule, sampler and data
    order belong to the old settings, so e.g. a new lr would be silently ignored), and for other tasks."""
    now = yaml.safe_load(recipe.to_yaml())
    if sorted(saved.get("tasks") or {}) != sorted(now["tasks"]):
        raise RecipeError([f"tasks: the checkpoint {ckpt} was trained with tasks {sorted(saved.get('tasks') or {})}, "
                           f"the recipe has {sorted(now['tasks'])}; --resume needs the same tasks (or use --overwrite)"])
    changes = recipe_changes(saved, now)
    fixed = [c for c in changes if c.split(":", 1)[0] not in RESUMABLE]
    if fixed:
        raise RecipeError([f"{c} (--resume needs the run's value: the checkpoint's optimizer, schedule and data order "
                           f"belong to it; start again with --overwrite, or train into another output_dir)"
                           for c in fixed])
    return changes


def fit(recipe: Recipe, resume: bool = False, progress: bool = True, stop_after: int | None = None,
        overwrite: bool = False) -> Path:
    """Train one backbone with one head per task; return the run folder (best bundle in run_dir/model).

    resume: continue from the newest checkpoint in the run folder (same schedule, optimizer, sampler state).
    stop_after: stop after this many optimizer steps in this call, as if killed (tests, time-boxed runs).
    overwrite: start again in a run folder that already holds checkpoints (they are deleted).
    Raises RecipeError (bad recipe or data, or an existing run without resume/overwrite, before any model
    loads), BackboneError."""
    cfg = recipe.train
    run_dir = recipe.run_dir()
    existing = latest_checkpoint(run_dir)
    if existing is not None and not (resume or overwrite):
        raise RecipeError([f"{run_dir} already holds a run (checkpoint {existing.name}): pass --resume to continue "
                           f"it, --overwrite to start again, or choose another name / output_dir"])
    tasks = {name: build_task(name, tcfg) for name, tcfg in recipe.tasks.items()}
    data = prepare_rows(recipe, tasks)
    accelerator = make_accelerator(recipe)
    main = accelerator.is_main_process
    ckpt = existing if resume else None
    if overwrite and not resume and main and existing is not None:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(run_dir / "logs", ignore_errors=True)
    accelerator.wait_for_everyone()
    if resume and ckpt is None and main:
        log.warning("no checkpoint in %s: starting from scratch", run_dir)
    if ckpt is not None and (run_dir / "recipe.yaml").is_file():
        allowed = check_resumable(yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8")) or {},
                                  recipe, ckpt)
        if allowed and main:
            log.warning("--resume with changed settings, in effect from the checkpoint on: %s", "; ".join(allowed))
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
        write_contract(run_dir, recipe, data.rows)      # the rows of every split, for `mtlm eval`
        for note in data.notes:
            log.info(note)
    set_seed(cfg.seed)

    backbone, tokenizer = load_backbone(recipe.backbone, dropout=cfg.dropout)
    features = encode_rows(tasks, data.rows, tokenizer, recipe.max_length)
    model = build_model(backbone, tasks, recipe.pooling, cfg.dropout)
    world = accelerator.num_processes
    # source -> this process's micro-batches of it (a source: a task alone, or a joint group)
    batches = train_batches(data, tasks, {n: f["train"] for n, f in features.items()}, cfg, world,
                            accelerator.process_index, tokenizer.pad_token_id)
    sources = list(batches)
    step_mode = resolve_step_mode(cfg)             # sampled | all_tasks
    sizes = {s: len(b) for s, b in batches.items()}     # train items (features; a joint group's rows)
    rounds_per_step = len(sources) if step_mode == "all_tasks" else 1
    max_steps = cfg.max_steps or steps_for_epochs(cfg.epochs, sizes,
                                                  cfg.batch_size * world * cfg.grad_accum * rounds_per_step)
    sampler = TaskSampler(sizes, cfg.sampling, cfg.temperature, cfg.seed, total=max_steps * cfg.grad_accum)
    weighting = build_weighting(cfg, {n: t.cfg.weight for n, t in tasks.items()}, model, accelerator.device)

    # fused AdamW: one kernel for all parameters (on CPU ~6x faster per step than the per-parameter loop);
    # a learned weighting (uncertainty) adds its parameters as its own group
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay) + weighting.param_groups(), lr=cfg.lr,
                                  fused=True)
    # The scheduler stays outside accelerator.prepare: Accelerate would step it once per process.
    scheduler = get_scheduler(cfg.scheduler if cfg.scheduler != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=int(cfg.warmup_ratio * max_steps),
                              num_training_steps=max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_for_checkpointing(weighting)    # loss history, learned weights, their Adam moments
    unwrapped = accelerator.unwrap_model(model)
    shared_ids = {id(p) for p in unwrapped.backbone.parameters()}
    all_params = [p for p in unwrapped.parameters() if p.requires_grad]
    head_params = [p for p in all_params if id(p) not in shared_ids]

    state = {"step": 0, "best": None, "best_step": None, "bad_evals": 0, "history": [], "train_log": [],
             "weighting": cfg.weighting.name}
    if ckpt is not None:
        state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
        saved_tasks = sorted(state.get("batches", {}))
        if saved_tasks != sorted(sources):
            raise RecipeError([f"tasks: the checkpoint {ckpt} was trained with tasks {saved_tasks}, the recipe has "
                               f"{sorted(sources)}; --resume needs the same tasks (or use --overwrite)"])
        if state.get("weighting", "static") != cfg.weighting.name:
            raise RecipeError([f"train.weighting: the checkpoint {ckpt} was trained with {state.get('weighting')!r}, "
                               f"the recipe has {cfg.weighting.name!r}; --resume needs the same weighting"])
        accelerator.load_state(str(ckpt))
        sampler.load_state_dict(state["sampler"])
        for n, b in batches.items():
            b.load_state_dict(state["batches"][n])
        if main:
            log.info("resumed from %s (step %d)", ckpt, state["step"])

    def micro_batch(source: str) -> tuple[dict, dict]:
        inputs, targets = batches[source].next()       # this process's share of the source's next batch
        to = accelerator.device
        return ({k: v.to(to) for k, v in inputs.items()},
                {t: (None if rows is None else rows.to(to), {k: v.to(to) for k, v in labels.items()})
                 for t, (rows, labels) in targets.items()})

    writer = _tensorboard(run_dir) if main else None
    dev = {n: f.get("dev", []) for n, f in features.items()}
    autocast_dtype = AUTOCAST.get(str(accelerator.mixed_precision))
    running: dict[str, float] = {}
    bar = tqdm(total=max_steps, initial=state["step"], disable=not (progress and main), desc="train",
               dynamic_ncols=True)
    steps_this_call, stopped_early = 0, False
    t0, tokens_seen = time.perf_counter(), 0

    while state["step"] < max_steps:
        model.train()
        rounds = [[sampler.next()] if step_mode == "sampled" else list(sources) for _ in range(cfg.grad_accum)]
        for r, round_sources in enumerate(rounds):      # the same sources on every process
            # sampled: DDP all-reduces in the backward of the step's last micro-batch. all_tasks: several
            # forwards feed one backward, which DDP cannot sync; gradients are averaged below instead.
            sync = step_mode == "sampled" and r == len(rounds) - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                losses = {}
                for source in round_sources:
                    inputs, targets = micro_batch(source)
                    tokens_seen += int(inputs["attention_mask"].sum())
                    logits = model(tasks=list(targets), **inputs)  # one backbone pass for the source's tasks
                    losses.update(masked_losses(tasks, logits, targets))   # mean over labelled rows per task
                weighting.backward(losses, accelerator, scale=1.0 / cfg.grad_accum)
            for name, loss in losses.items():
                value = float(loss.detach())
                running[name] = value if name not in running else 0.9 * running[name] + 0.1 * value
                if writer:
                    writer.add_scalar(f"loss/{name}", value, state["step"])
        if step_mode == "all_tasks":   # pcgrad/cagrad average the backbone's per-task gradients themselves
            average_gradients(accelerator, head_params if weighting.combines_shared_gradients else all_params)
        weighting.step(accelerator)    # update weights / combine per-task gradients (same on every process)
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        weights = weighting.current()
        scheduler.step()
        state["step"] += 1
        steps_this_call += 1
        step = state["step"]
        bar.update(1)
        bar.set_postfix({n: f"{v:.3f}" for n, v in running.items()}, refresh=False)
        if writer:
            writer.add_scalar("lr", scheduler.get_last_lr()[0], step)
            for n, w in weights.items():
                writer.add_scalar(f"weight/{n}", w, step)
        if step % 10 == 0 or step == max_steps:
            state["train_log"].append({"step": step, "lr": scheduler.get_last_lr()[0],
                                       **{f"loss/{n}": round(v, 5) for n, v in running.items()},
                                       **{f"weight/{n}": round(w, 5) for n, w in weights.items()}})

        if step % cfg.eval_every == 0 or step == max_steps:
            metrics = evaluate(unwrapped, tasks, dev, cfg.eval_batch_size, tokenizer.pad_token_id,
                               accelerator.device, autocast_dtype)
            elapsed = time.perf_counter() - t0
            state["history"].append({"step": step, **metrics, "train_tokens_per_s": tokens_seen / elapsed,
                                     "train_s": elapsed})
            score = metrics.get("mean")   # None when no task has a dev split: keep the latest model
            improved = score is None or state["best"] is None or score > state["best"]
            if improved:
                state.update(best=score, best_step=step, bad_evals=0)
                if main:
                    save_bundle(unwrapped, tokenizer, tasks, recipe, run_dir / "model")
            else:
                state["bad_evals"] += 1
            if main:
                shown = "  ".join(f"{k}={v:.4f}" for k, v in metrics.items())
                bar.write(f"step {step}: {shown}" + ("  (best)" if improved and score is not None else ""))
                for k, v in metrics.items():
                    if writer:
                        writer.add_scalar(f"dev/{k}", v, step)
            patience = cfg.early_stopping_patience
            stopped_early = patience is not None and state["bad_evals"] >= patience and step < max_steps
        if step % (cfg.checkpoint_every or cfg.eval_every) == 0 or step == max_steps or stopped_early \
                or (stop_after is not None and steps_this_call >= stop_after):
            state["sampler"] = sampler.state_dict()
            state["batches"] = {n: b.state_dict() for n, b in batches.items()}
            save_checkpoint(accelerator, run_dir, step, state, cfg.keep_checkpoints)
            if main:
                _write_metrics(run_dir, state, max_steps, stopped_early)
        if stopped_early:
            if main:
                bar.write(f"early stopping at step {step}: no dev improvement in {cfg.early_stopping_patience} "
                          f"evaluations (best at step {state['best_step']})")
            break
        if stop_after is not None and steps_this_call >= stop_after:
            break
    bar.close()
    if writer:
        writer.close()
    if main and (run_dir / "model").is_dir():
        tune_thresholds(run_dir / "model", dev, cfg.eval_batch_size)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir


def tune_thresholds(bundle: Path, dev: dict[str, list[dict]], batch_size: int) -> None:
    """Tune the per-label thresholds of multilabel tasks on dev with the best bundle's weights and write them
    into its tasks.json (the dev metrics logged during training used the initial thresholds)."""
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
    (bundle / "tasks.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")


def _write_metrics(run_dir: Path, state: dict, max_steps: int, stopped_early: bool) -> None:
    out = {"max_steps": max_steps, "step": state["step"], "best_step": state["best_step"],
           "best_mean": state["best"], "stopped_early": stopped_early,
           "eval": state["history"], "train": state["train_log"]}
    (run_dir / "metrics.json").write_text(json.dumps(out, indent=1), encoding="utf-8")


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:   # tensorboard not installed: logging to metrics.json only
        return None
    return SummaryWriter(log_dir=str(run_dir / "logs"))
