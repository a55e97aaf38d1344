"""fit(): the multi-task training loop, on Accelerate (one process, or several via `accelerate launch`).

`build` constructs a run (all recipe/data errors before any model loads): rows -> backbone -> encode ->
batches and task sampler -> model + heads -> `model_fn` (LoRA, pruning masks, QAT) -> weighting -> AdamW +
warmup/decay schedule -> `accelerator.prepare`. `fit` then runs the loop, readable top to bottom: each
optimizer step is `grad_accum` rounds; a round is one micro-batch of the source the sampler picks (step_mode
sampled) or one micro-batch of every source (all_tasks); a source is a task or a joint group (several tasks
labelled on one file, one backbone pass). Per micro-batch: forward -> masked per-task losses -> loss hooks
(`train.adversarial`, then `loss_fn`: each returns {task: loss} with the same keys) -> the weighting turns
the round's per-task losses into gradients and updates itself once per step. Callbacks (`mtlm.callbacks`)
log, keep the best bundle (scale-free selection, `mtlm.selection`) and stop early; every `checkpoint_every`
steps the whole state (callbacks' included) is checkpointed for `--resume`. Heads may have their own peak
lr (`train.head_lr`, `tasks.<name>.head_lr`: `param_groups`), and during the first `train.head_warmup_steps`
steps only the heads are updated (every other parameter's gradient is dropped before the optimizer step).
With `train.fsdp` the model is sharded across the processes (FSDP2 through Accelerate, `mtlm.sharding`):
FSDP syncs the gradients, and the bundle is gathered from the shards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator, DistributedDataParallelKwargs, PartialState
from accelerate.utils import set_seed
from transformers import get_scheduler

from mtlm.adversarial import adversarial_hooks
from mtlm.backbones import check_generation, check_pooling, no_decay
from mtlm.batches import TaskSampler, collate_source, masked_losses, steps_for_epochs, train_batches
from mtlm.callbacks import BestBundle, Checkpoints, EarlyStopping
from mtlm.checkpoint import latest_checkpoint
from mtlm.compiled import compile_backbone
from mtlm.config import Recipe, RecipeError
from mtlm.contract import check_rows_unchanged, write_contract
from mtlm.data import encode_rows, prepare_rows
from mtlm.environment import describe_environment
from mtlm.evaluate import evaluate
from mtlm.loss_normalization import InitialLossNormalization
from mtlm.hooks import LossContext, LossHook, ModelHook, Run   # noqa: F401  (fit's public hook types)
from mtlm.model import build_model, load_backbone
from mtlm.packing import check_packable, pack_inputs
from mtlm.precision import Precision, native_bf16, resolve_precision
from mtlm.progress import progress as progress_bar
from mtlm.run_folder import check_resumable, clear_run
from mtlm.sharding import enable_on_cpu, fsdp_plugin, is_sharded, reshard
from mtlm.tasks import build_task
from mtlm.tracking import tracking_callbacks
from mtlm.weighting import build_weighting, resolve_step_mode

log = logging.getLogger("mtlm")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def param_groups(model: torch.nn.Module, weight_decay: float, head_lrs: dict[str, float | None] | None = None
                 ) -> list[dict]:
    """AdamW groups: decoupled weight decay on weights, none on biases and LayerNorm (Loshchilov & Hutter 2019).

    head_lrs: {task: peak lr of its head, or None for the optimizer's lr}. Without any (the default) there
    are two groups (decay, no decay) over every trainable parameter; with some, the heads of those tasks get
    their own two groups each, with "lr" set (the schedule scales every group's lr alike), after the two
    shared ones. The group layout thus follows the recipe alone, so a checkpoint's optimizer state fits it."""
    head_lrs = {n: lr for n, lr in (head_lrs or {}).items() if lr is not None}
    heads = getattr(model, "heads", {})
    owner = {id(p): n for n in head_lrs if n in heads for p in heads[n].parameters()}
    groups: dict[tuple, list] = {(None, True): [], (None, False): []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((owner.get(id(p)), not no_decay(name)), []).append(p)
    out = [{"params": groups[(None, True)], "weight_decay": weight_decay},
           {"params": groups[(None, False)], "weight_decay": 0.0}]
    for task, lr in head_lrs.items():
        out += [{"params": groups[(task, decay)], "weight_decay": weight_decay if decay else 0.0, "lr": lr}
                for decay in (True, False) if groups.get((task, decay))]
    return out


def head_parameters(model: torch.nn.Module) -> set[int]:
    """ids of the parameters of the task heads (`model.heads`): what trains during `train.head_warmup_steps`.
    Raises RecipeError for a model (from a `model_fn`) without `heads`."""
    if not isinstance(getattr(model, "heads", None), torch.nn.Module):
        raise RecipeError([f"train.head_warmup_steps: the model ({type(model).__name__}) has no `heads` module"])
    return {id(p) for p in model.heads.parameters()}


def make_accelerator(recipe: Recipe) -> tuple[Accelerator, Precision]:
    """The Accelerator of a run and the precision it trains in (`mtlm.precision`: `auto` picks bf16 where
    the GPU / CPU has native bf16); sharded (FSDP2, `mtlm.sharding`) with `train.fsdp` or an FSDP launch.
    Raises RecipeError (fp16 without a GPU; FSDP1; FSDP with one process)."""
    # Ask for the CPU explicitly when there is no GPU: under torchrun/accelerate launch without it,
    # every rank would train alone (see shared/ENGINES.md). Heads of tasks absent from a micro-batch get
    # no gradient, so DDP must look for unused parameters.
    cuda = torch.cuda.is_available()
    plugin = fsdp_plugin(recipe.train.fsdp, cuda)
    precision = resolve_precision(recipe.train.mixed_precision, cuda, native_bf16())
    if recipe.train.mixed_precision == "bf16" and precision.mode != "bf16":
        log.warning("train.mixed_precision: %s; training in fp32", precision.reason)
    # checked before the Accelerator exists: given a plugin, it exports ACCELERATE_USE_FSDP to this process
    if plugin is not None and PartialState(cpu=not cuda).num_processes < 2:
        raise RecipeError(["train.fsdp: sharded training needs several processes (one process holds every "
                           "parameter anyway): launch with accelerate launch --multi_gpu --num_processes N "
                           "(CPU or GPUs), or drop train.fsdp"])
    # Accumulation is done by the loop (it knows which micro-batch ends a step), not by accelerator.accumulate.
    accelerator = Accelerator(cpu=not cuda, mixed_precision=precision.mode, fsdp_plugin=plugin,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    if plugin is not None:
        enable_on_cpu(accelerator, plugin)
    return accelerator, precision


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


def global_means(accelerator: Accelerator, values: dict[str, float]) -> dict[str, float]:
    """{name: mean over processes} of per-process values with the same keys everywhere (one all-reduce;
    the values themselves with one process): the logged training losses are the global batch's, not the
    main process's share of it."""
    if accelerator.num_processes == 1 or not values:
        return values
    means = accelerator.reduce(torch.tensor(list(values.values()), dtype=torch.float64,
                                            device=accelerator.device), reduction="mean")
    return dict(zip(values, means.tolist()))


def build(recipe: Recipe, resume: bool = False, overwrite: bool = False, model_fn: ModelHook | None = None) -> Run:
    """Construct a run: check the recipe and data, clear (--overwrite) or resume the run folder, then data,
    backbone, heads, `model_fn`, weighting, optimizer, schedule, Accelerate. Raises RecipeError (before any
    model loads for recipe and data problems), BackboneError."""
    cfg = recipe.train
    run_dir = recipe.run_dir()
    if resume and overwrite:
        raise RecipeError(["--resume continues the run in the folder, --overwrite deletes it: give one of them"])
    existing = latest_checkpoint(run_dir)
    if existing is not None and not (resume or overwrite):
        raise RecipeError([f"{run_dir} already holds a run (checkpoint {existing.name}): pass --resume to continue "
                           f"it, --overwrite to start again, or choose another name / output_dir"])
    tasks = {name: build_task(name, tcfg) for name, tcfg in recipe.tasks.items()}
    if cfg.packing:
        check_packable(tasks, cfg.adversarial.method, recipe.adapters is not None)
    data = prepare_rows(recipe, tasks)
    accelerator, precision = make_accelerator(recipe)
    main = accelerator.is_main_process
    ckpt = existing if resume else None
    if overwrite and not resume and main:          # the recipe and data are valid: the old run may go
        clear_run(run_dir)
    accelerator.wait_for_everyone()
    if resume and ckpt is None and main:
        log.warning("no checkpoint in %s: starting from scratch", run_dir)
    if ckpt is not None:           # every process reads and refuses alike: no rank waits in a collective
        check_rows_unchanged(run_dir, data.rows)
    if ckpt is not None and (run_dir / "recipe.yaml").is_file():
        allowed = check_resumable(yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8")) or {},
                                  recipe, ckpt)
        if allowed and main:
            log.warning("--resume with changed settings, in effect from the checkpoint on: %s", "; ".join(allowed))
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
        log.info("train.mixed_precision %s -> %s", precision.requested, precision.reason)
        (run_dir / "environment.json").write_text(json.dumps({**describe_environment(),
                                                              "mixed_precision": precision.as_dict()}, indent=1),
                                                  encoding="utf-8")
        write_contract(run_dir, recipe, data.rows)      # the rows of every split, for `mtlm eval`
        for note in data.notes:
            log.info(note)
    set_seed(cfg.seed)

    # --- data: encode, join, batch, sample (one block) ---
    backbone, tokenizer = load_backbone(recipe.backbone, dropout=cfg.dropout)
    check_pooling(recipe.pooling, backbone.config)
    check_generation({n: t.cfg.type for n, t in tasks.items()}, backbone.config)
    features = encode_rows(tasks, data.rows, tokenizer, recipe.max_length)
    world = accelerator.num_processes
    # source -> this process's micro-batches of it (a source: a task alone, or a joint group), from a DataLoader
    batches = train_batches(data, tasks, {n: f["train"] for n, f in features.items()}, cfg, world,
                            accelerator.process_index, tokenizer.pad_token_id, recipe.max_length)
    sources = list(batches)
    step_mode = resolve_step_mode(cfg)             # sampled | all_tasks
    sizes = {s: len(b) for s, b in batches.items()}     # train items (features; a joint group's rows)
    rounds_per_step = len(sources) if step_mode == "all_tasks" else 1
    max_steps = cfg.max_steps or steps_for_epochs(cfg.epochs, sizes,
                                                  cfg.batch_size * world * cfg.grad_accum * rounds_per_step)
    sampler = TaskSampler(sizes, cfg.sampling, cfg.temperature, cfg.seed, total=max_steps * cfg.grad_accum)

    def next_batch(source: str) -> tuple[dict, dict]:
        inputs, targets = batches[source].next()       # this process's share of the source's next batch
        to = accelerator.device
        return ({k: v.to(to) for k, v in inputs.items()},
                {t: (None if rows is None else rows.to(to), {k: v.to(to) for k, v in labels.items()})
                 for t, (rows, labels) in targets.items()})

    dev = {n: f.get("dev", []) for n, f in features.items()}
    # --- end of the data block ---

    model = build_model(backbone, tasks, recipe.pooling, cfg.dropout, recipe.adapters)
    if model_fn is not None:
        model = model_fn(model)
    if cfg.compile:                  # compiled and checked on two train items of the first source
        first = batches[sources[0]]
        items = [first.dataset[i] for i in range(min(2, len(first.dataset)))]
        sample, _ = collate_source(tasks, items, tokenizer.pad_token_id)
        if cfg.packing:              # the packed form (4D mask), which collate_source picks when it pays
            sample = pack_inputs([it["inputs"] for it in items], tokenizer.pad_token_id, recipe.max_length)
        compile_backbone(model, sample)
    weighting = build_weighting(cfg, {n: t.cfg.weight for n, t in tasks.items()}, model, accelerator.device)
    # fused AdamW: one kernel for all parameters (on CPU ~6x faster per step than the per-parameter loop);
    # a learned weighting (uncertainty) adds its parameters as its own group
    head_lrs = {n: t.cfg.head_lr if t.cfg.head_lr is not None else cfg.head_lr for n, t in tasks.items()}
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, head_lrs) + weighting.param_groups(),
                                  lr=cfg.lr, fused=True)
    # The scheduler stays outside accelerator.prepare: Accelerate would step it once per process.
    scheduler = get_scheduler(cfg.scheduler if cfg.scheduler != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=int(cfg.warmup_ratio * max_steps),
                              num_training_steps=max_steps)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_for_checkpointing(weighting)    # loss history, learned weights, their Adam moments
    return Run(recipe, run_dir, accelerator, tasks, tokenizer, prepared, accelerator.unwrap_model(prepared),
               optimizer, scheduler, weighting, sources, step_mode, max_steps, sampler, batches, next_batch, dev,
               ckpt, state={"step": 0, "history": [], "train_log": [], "weighting": cfg.weighting.name})


def restore(run: Run, callbacks: list) -> None:
    """Load the run's checkpoint (--resume): model, optimizer, schedule, RNG, samplers, callbacks' state.
    Raises RecipeError when the checkpoint was trained with other tasks or another weighting."""
    ckpt, cfg = run.checkpoint, run.recipe.train
    state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    saved_tasks = sorted(state.get("batches", {}))
    if saved_tasks != sorted(run.sources):
        raise RecipeError([f"tasks: the checkpoint {ckpt} was trained with tasks {saved_tasks}, the recipe has "
                           f"{sorted(run.sources)}; --resume needs the same tasks (or use --overwrite)"])
    if state.get("weighting", "static") != cfg.weighting.name:
        raise RecipeError([f"train.weighting: the checkpoint {ckpt} was trained with {state.get('weighting')!r}, "
                           f"the recipe has {cfg.weighting.name!r}; --resume needs the same weighting"])
    run.accelerator.load_state(str(ckpt))
    run.sampler.load_state_dict(state["sampler"])
    for n, b in run.batches.items():
        b.load_state_dict(state["batches"][n])
    for cb in callbacks:
        if cb.key is not None and cb.key in state.get("callbacks", {}):
            cb.load_state_dict(state["callbacks"][cb.key])
    run.state = state
    if run.is_main:
        log.info("resumed from %s (step %d)", ckpt, state["step"])


def fit(recipe: Recipe, resume: bool = False, progress: bool = True, stop_after: int | None = None,
        overwrite: bool = False, *, loss_fn: LossHook | list[LossHook] | None = None,
        model_fn: ModelHook | None = None, callbacks: list | tuple = ()) -> Path:
    """Train one backbone with one head per task; return the run folder (best bundle in run_dir/model).

    resume: continue from the newest checkpoint in the run folder (same schedule, optimizer, sampler state).
    stop_after: stop after this many optimizer steps in this call, as if killed (tests, time-boxed runs).
    overwrite: start again in a run folder that holds an earlier run (its outputs are deleted first).
    loss_fn: one or more loss hooks (LossHook), applied in order after the recipe's adversarial training.
    model_fn: a ModelHook applied to the built model before the optimizer and `accelerator.prepare`.
    callbacks: `mtlm.callbacks.Callback`s, called after the built-in ones (logging, selection, early stop).
    Raises RecipeError (bad recipe or data, or an existing run without resume/overwrite, before any model
    loads), BackboneError, ValueError (a loss hook that changes the task keys)."""
    run = build(recipe, resume=resume, overwrite=overwrite, model_fn=model_fn)
    cfg, accelerator, model, weighting = recipe.train, run.accelerator, run.model, run.weighting
    # train.loss_normalization: a loss hook (last: it scales every term) with state in the checkpoints
    normalization = [InitialLossNormalization(accelerator)] if cfg.loss_normalization == "initial" else []
    loss_hooks = adversarial_hooks(cfg.adversarial) + \
        (list(loss_fn) if isinstance(loss_fn, (list, tuple)) else [loss_fn] if loss_fn is not None else []) + \
        normalization
    run.callbacks = [*tracking_callbacks(cfg), BestBundle(run.tasks), EarlyStopping(cfg.early_stopping_patience),
                     *callbacks, *normalization, Checkpoints(cfg.checkpoint_every or cfg.eval_every,
                                                             cfg.keep_checkpoints)]
    callbacks = run.callbacks
    if run.checkpoint is not None:
        restore(run, callbacks)
    state, main, max_steps = run.state, run.is_main, run.max_steps
    sharded = is_sharded(accelerator)      # train.fsdp: parameters, gradients and AdamW moments sharded
    shared_ids = {id(p) for p in run.unwrapped.backbone.parameters()}
    all_params = [p for p in run.unwrapped.parameters() if p.requires_grad]
    head_params = [p for p in all_params if id(p) not in shared_ids]
    heads_only = head_parameters(run.unwrapped) if cfg.head_warmup_steps else set()
    frozen = [p for p in all_params if id(p) not in heads_only]      # during train.head_warmup_steps
    autocast_dtype = AUTOCAST.get(str(accelerator.mixed_precision))
    running: dict[str, float] = {}
    run.bar = progress_bar(max_steps, "train", enabled=progress and main, initial=state["step"], unit="step")
    for cb in callbacks:
        cb.on_train_begin(run)
    steps_this_call, t0, tokens_seen = 0, time.perf_counter(), 0

    while state["step"] < max_steps and run.stop is None:
        model.train()
        rounds = [[run.sampler.next()] if run.step_mode == "sampled" else list(run.sources)
                  for _ in range(cfg.grad_accum)]
        step_losses: dict[str, list[float]] = {}
        for r, round_sources in enumerate(rounds):      # the same sources on every process
            # sampled: DDP all-reduces in the backward of the step's last micro-batch. all_tasks: several
            # forwards feed one backward, which DDP cannot sync; gradients are averaged below instead.
            # FSDP reduce-scatters in the step's last backward in both modes (a sharded gradient cannot be
            # averaged by hand).
            sync = (run.step_mode == "sampled" or sharded) and r == len(rounds) - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                losses = {}
                for source in round_sources:
                    inputs, targets = run.next_batch(source)
                    tokens_seen += int(inputs["attention_mask"].sum())
                    logits = model(tasks=list(targets), **inputs)  # one backbone pass for the source's tasks
                    source_losses = masked_losses(run.tasks, logits, targets)  # mean over labelled rows per task
                    for hook in loss_hooks:
                        ctx = LossContext(run.unwrapped, run.tasks, source, inputs, targets, logits, source_losses,
                                          state["step"])
                        source_losses = _checked(hook(ctx), source_losses, hook)
                    losses.update(source_losses)
                weighting.backward(losses, accelerator, scale=1.0 / cfg.grad_accum)
            for name, loss in losses.items():
                step_losses.setdefault(name, []).append(float(loss.detach()))
        # all_tasks (not sharded): pcgrad/cagrad average the backbone's per-task gradients themselves
        if run.step_mode == "all_tasks" and not sharded:
            average_gradients(accelerator, head_params if weighting.combines_shared_gradients else all_params)
        weighting.step(accelerator)    # update weights / combine per-task gradients (same on every process)
        if state["step"] < cfg.head_warmup_steps:   # head warm-up: every parameter but the heads' stays as is
            for p in frozen:
                p.grad = None
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        weights = weighting.current()
        run.scheduler.step()
        state["step"] += 1
        steps_this_call += 1
        step = state["step"]
        losses_now = global_means(accelerator, {n: sum(v) / len(v) for n, v in step_losses.items()})
        for name, value in losses_now.items():
            running[name] = value if name not in running else 0.9 * running[name] + 0.1 * value
        run.bar.set_postfix({n: f"{v:.3f}" for n, v in running.items()}, refresh=False)
        run.bar.update(1)
        if step % 10 == 0 or step == max_steps:
            state["train_log"].append({"step": step, "lr": run.scheduler.get_last_lr()[0],
                                       **{f"loss/{n}": round(v, 5) for n, v in running.items()},
                                       **{f"weight/{n}": round(w, 5) for n, w in weights.items()}})
        if step % cfg.eval_every == 0 or step == max_steps:
            elapsed = time.perf_counter() - t0        # training time so far (earlier evaluations included)
            # each process runs its shard of the dev set; the predictions are gathered (same metrics everywhere)
            metrics = evaluate(run.unwrapped, run.tasks, run.dev, cfg.eval_batch_size, run.tokenizer.pad_token_id,
                               accelerator.device, autocast_dtype, accelerator=accelerator)
            if sharded:
                reshard(run.model)           # the root unit stays gathered after a forward without backward
            state["history"].append({"step": step, **metrics, "train_tokens_per_s": tokens_seen / elapsed,
                                     "train_s": elapsed})
            run.improved = False
            for cb in callbacks:
                cb.on_evaluate(run, step, metrics)
        if stop_after is not None and steps_this_call >= stop_after:
            run.stop = run.stop or "stop_after"
        for cb in callbacks:                 # the last one, Checkpoints, saves the state they leave
            cb.on_step_end(run, step, losses_now, weights)
    run.bar.close()
    for cb in callbacks:
        cb.on_train_end(run)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run.run_dir


def _checked(new: dict, old: dict, hook) -> dict:
    if set(new) != set(old):
        raise ValueError(f"loss hook {hook!r} returned losses for {sorted(new)}, expected {sorted(old)}: a loss "
                         f"hook keeps the task names (weighting, logging and selection are keyed by them)")
    return new
