"""Inference bundles and resumable run state.

A bundle is a folder::

    backbone/           config.json, weights (model.safetensors, or sharded model-0000N-of-0000M.safetensors
                        with model.safetensors.index.json), tokenizer files: loadable by `AutoModel.from_pretrained`
    heads.safetensors   every head's weights, keys "<task>.<param>"
    private_layers.safetensors   only when a task has private_layers > 0: its copies of the backbone's top
                        layers, keys "<task>.<index>.<param>" (`mtlm.private_layers`)
    adapters.safetensors   only with `adapters:` (LoRA): the adapters' weights (`mtlm.adapters`); backbone/
                        then holds the plain pretrained layout
    tasks.json          format version, pooling, adapters (their config, when any), max_length, and per task: type, config, fitted state
                        (label names, thresholds, target stats), input fields, selection metric
    recipe.yaml         the recipe the model was trained from

Loading reads safetensors only (no pickle), and strictly: a head tensor missing, of the wrong shape, or
of a task tasks.json does not list is a BundleError naming the task and tensors, never a random head.

Crash safety: `save_bundle` writes `<bundle>.tmp/`, renames the old bundle to `<bundle>.old/`, renames the
new one into place, then deletes the old one. A crash between the two renames leaves only `<bundle>.old/`:
`find_bundle` then loads it (with a warning) and the next `save_bundle` puts it back first. `write_tasks_json`
rewrites tasks.json through a temp file and `os.replace`, so a reader sees the old or the new file, whole.

Resumable checkpoints (`checkpoints/step_N/`) hold Accelerate's state (model, optimizer, scheduler, RNG)
plus `trainer_state.json` (step, samplers, early stopping).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mtlm.adapters import FILE as ADAPTER_FILE, adapter_state, add_adapters, load_adapters, plain_backbone_state
from mtlm.config import AdapterConfig, Recipe, RecipeError, TaskConfig
from mtlm.model import MultiTaskModel, with_private_layers
from mtlm.private_layers import FILE as PRIVATE_FILE, load_private, private_state
from mtlm.tasks import build_task, default_metric

FORMAT_VERSION = 1
log = logging.getLogger("mtlm")


class BundleError(Exception):
    """A folder that is not a readable mtlm bundle; the message says what is missing or does not match."""


def write_tasks_json(bundle: Path, meta: dict) -> Path:
    """Write `meta` as `bundle`/tasks.json atomically: a temp file in the same folder, flushed and fsync'd,
    then `os.replace` (atomic on POSIX and Windows), so a crash leaves the old file or the new one, whole.
    Returns the path. Raises OSError when the folder cannot be written."""
    bundle = Path(bundle)
    tmp = bundle / f".tasks.json.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"   # mode from the umask, as any file
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(json.dumps(meta, indent=2))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, bundle / "tasks.json")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return bundle / "tasks.json"


def _recover(path: Path) -> None:
    """Put back `<path>.old` when a crash between save_bundle's two renames left no `path`."""
    old = path.with_name(path.name + ".old")
    if not path.exists() and (old / "tasks.json").is_file():
        log.warning("%s is missing but %s is complete (an interrupted save): restoring it", path, old)
        old.rename(path)


def save_bundle(model: MultiTaskModel, tokenizer, tasks: dict, recipe: Recipe, path: Path,
                state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the inference bundle for `model` at `path`, replacing any bundle there (see the module
    docstring for what a crash at any point leaves). Returns `path`.

    state_dict: the model's full tensors keyed as `model.state_dict()`, written instead of the module's own:
    a sharded model's (train.fsdp), gathered by `mtlm.sharding.full_state_dict` (no adapters or private
    layers then: the recipe refuses them with FSDP). Raises ValueError when it lacks a backbone or head tensor."""
    path = Path(path)
    _recover(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "backbone").mkdir(parents=True)
    if state_dict is not None:
        _save_gathered(model, state_dict, tmp)
    elif model.adapters is None:
        model.backbone.save_pretrained(tmp / "backbone", safe_serialization=True)
    else:   # the pretrained layout in backbone/, the LoRA weights beside it
        model.backbone.save_pretrained(tmp / "backbone", safe_serialization=True,
                                       state_dict=plain_backbone_state(model.backbone))
        save_file(adapter_state(model.backbone), tmp / ADAPTER_FILE)
    tokenizer.save_pretrained(tmp / "backbone")
    if state_dict is None:
        heads = {f"{name}.{k}": v.detach().cpu().contiguous() for name, head in model.heads.items()
                 for k, v in head.state_dict().items()}
        save_file(heads, tmp / "heads.safetensors")
    if len(model.private):
        save_file(private_state(model.private), tmp / PRIVATE_FILE)
    meta = {
        "format": FORMAT_VERSION,
        "name": recipe.name,
        "pooling": model.pooling,
        "max_length": recipe.max_length,
        **({"adapters": model.adapters.cfg.model_dump(mode="json")} if model.adapters is not None else {}),
        "tasks": {name: {"type": t.cfg.type, "config": t.cfg.model_dump(mode="json"),
                         "input_fields": list(t.input_fields()), "head_input": t.head_input,
                         "metric": default_metric(t), "state": t.state()}
                  for name, t in tasks.items()},
    }
    write_tasks_json(tmp, meta)
    (tmp / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def _save_gathered(model: MultiTaskModel, state_dict: dict[str, torch.Tensor], tmp: Path) -> None:
    """backbone/ and heads.safetensors from a full state dict ("backbone.<k>", "heads.<task>.<k>")."""
    parts: dict[str, dict[str, torch.Tensor]] = {"backbone": {}, "heads": {}}
    for key, value in state_dict.items():
        part, _, rest = key.partition(".")
        if part in parts:
            parts[part][rest] = value.detach().cpu().contiguous()
    wanted = [f"heads.{n}.{k}" for n, head in model.heads.items() for k in head.state_dict()]
    missing = [k for k in wanted if k.partition(".")[2] not in parts["heads"]] + \
        ([] if parts["backbone"] else ["backbone.*"])
    if missing:
        raise ValueError(f"save_bundle: the state dict lacks {', '.join(missing[:5])}")
    model.backbone.save_pretrained(tmp / "backbone", safe_serialization=True, state_dict=parts["backbone"])
    save_file(parts["heads"], tmp / "heads.safetensors")


def find_bundle(path: str | Path) -> Path:
    """A run folder (uses its model/) or a bundle folder -> the bundle folder. When the bundle is missing
    but its `.old` copy is complete (a save interrupted between its renames), returns that copy and logs a
    warning. Raises BundleError."""
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / "tasks.json").is_file():
            return candidate
    for candidate in (path, path / "model"):
        old = candidate.with_name(candidate.name + ".old")
        if not candidate.exists() and (old / "tasks.json").is_file():
            log.warning("%s is missing: loading %s, left by an interrupted save", candidate, old)
            return old
    raise BundleError(f"{path}: not an mtlm run or bundle (no tasks.json in it or in {path / 'model'})")


def _load_backbone(folder: Path):
    """The saved encoder through `AutoModel.from_pretrained` (single-file or sharded safetensors, never
    pickle), in float32; a pruned one (config.json carrying `mtlm.pruning.PRUNING_KEY`) through
    `mtlm.pruning.load_pruned_backbone`, which rebuilds its per-layer head and FFN sizes first.
    Raises BundleError when weights are missing, unreadable or of the wrong shape."""
    from transformers import AutoConfig, AutoModel

    from mtlm.pruning import PRUNING_KEY, load_pruned_backbone

    kwargs = dict(use_safetensors=True, output_loading_info=True, dtype=torch.float32)
    try:
        config = AutoConfig.from_pretrained(folder)
        if getattr(config, PRUNING_KEY, None):       # per-layer heads / FFN sizes (mtlm.pruning)
            return load_pruned_backbone(folder, config)
        try:   # the pooler is unused (we pool ourselves); the bundle holds none
            backbone, info = AutoModel.from_pretrained(folder, add_pooling_layer=False, **kwargs)
        except TypeError:
            backbone, info = AutoModel.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise BundleError(f"{folder}: cannot load the backbone: {str(e).splitlines()[0]}") from None
    missing = [k for k in info.get("missing_keys", ()) if "pooler" not in k]
    mismatched = [f"{k}: expected {tuple(want)}, found {tuple(got)}"
                  for k, got, want in info.get("mismatched_keys", ())]
    if missing or mismatched:
        parts = ([f"{len(missing)} tensor(s) missing ({', '.join(sorted(missing)[:5])})"] if missing else []) + \
                ([f"wrong shapes: {'; '.join(mismatched[:5])}"] if mismatched else [])
        raise BundleError(f"{folder}: backbone weights do not match its config.json: {'; '.join(parts)}")
    return backbone


def check_heads(path: Path, heads: torch.nn.ModuleDict, tasks: dict) -> dict[str, torch.Tensor]:
    """heads.safetensors checked against the heads tasks.json describes -> its tensors.

    Raises one BundleError listing every problem, per task: tensors missing, tensors of the wrong shape
    (expected vs found, and for a task with labels the label count tasks.json gives vs the one the weights
    hold), unexpected tensors, and heads of tasks tasks.json does not list."""
    file = path / "heads.safetensors"
    try:
        with safe_open(str(file), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:   # absent, truncated or not safetensors
        raise BundleError(f"{file}: cannot read head weights: {str(e).splitlines()[0]}") from None
    found: dict[str, dict[str, tuple]] = {}
    for key, shape in shapes.items():
        task, _, param = key.partition(".")
        found.setdefault(task, {})[param] = shape
    problems = []
    for name, head in heads.items():
        want = {k: tuple(v.shape) for k, v in head.state_dict().items()}
        got = found.pop(name, {})
        missing = [f"{name}.{k}" for k in want if k not in got]
        extra = [f"{name}.{k}" for k in got if k not in want]
        wrong = [(k, want[k], got[k]) for k in want if k in got and got[k] != want[k]]
        what = []
        if missing:
            what.append(f"tensor(s) missing: {', '.join(missing)}")
        for k, w, g in wrong:
            what.append(f"{name}.{k} has shape {g}, expected {w}")
        labels = getattr(tasks[name], "labels", None)
        counts = {g[0] for k, w, g in wrong if w and g and w[0] == len(labels or ()) != g[0]}
        if labels is not None and counts:
            what.append(f"tasks.json lists {len(labels)} labels, the weights hold {', '.join(map(str, counts))}")
        if extra:
            what.append(f"unexpected tensor(s): {', '.join(extra)}")
        if what:
            problems.append(f"task '{name}': " + "; ".join(what))
    for name, params in found.items():
        problems.append(f"task '{name}': heads.safetensors holds a head ({', '.join(f'{name}.{k}' for k in params)}) "
                        f"for a task tasks.json does not list (tasks: {', '.join(heads)})")
    if problems:
        raise BundleError(f"{path}: heads.safetensors does not match tasks.json: " + " | ".join(problems))
    try:
        return load_file(file)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:   # a header that reads, data that does not
        raise BundleError(f"{file}: cannot read head weights: {str(e).splitlines()[0]}") from None


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> tuple[MultiTaskModel, object, dict, dict]:
    """Load (model in eval mode, tokenizer, tasks {name: fitted task}, tasks.json dict).

    Raises BundleError for a folder that is not a bundle, an unsupported format, an unreadable tasks.json,
    backbone weights that do not match their config, heads that do not match tasks.json (`check_heads`),
    private layers that do not match the tasks' private_layers (`mtlm.private_layers.load_private`), or
    weights holding NaN or infinite values."""
    from transformers import AutoTokenizer

    path = find_bundle(path)
    try:
        meta = json.loads((path / "tasks.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BundleError(f"{path / 'tasks.json'}: cannot read: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise BundleError(f"{path}: bundle format {found} is not supported (expected {FORMAT_VERSION})")
    tasks = {}
    for name, info in meta["tasks"].items():
        task = build_task(name, TaskConfig.model_validate(info["config"]))
        task.load_state(info["state"])
        tasks[name] = task
    backbone = _load_backbone(path / "backbone")
    tokenizer = AutoTokenizer.from_pretrained(path / "backbone")
    hidden = backbone.config.hidden_size
    heads = torch.nn.ModuleDict({n: t.make_head(hidden, 0.0) for n, t in tasks.items()})
    weights = check_heads(path, heads, tasks)
    for name, head in heads.items():
        head.load_state_dict({k.split(".", 1)[1]: v for k, v in weights.items() if k.split(".", 1)[0] == name},
                             strict=True)
    try:
        private = with_private_layers(backbone, tasks)
        load_private(private, path)
        adapters = None
        if meta.get("adapters") is not None:
            adapters = add_adapters(backbone, AdapterConfig.model_validate(meta["adapters"]), list(tasks))
            load_adapters(backbone, path)
    except (RecipeError, ValueError) as e:
        raise BundleError(f"{path}: {e}") from None
    model = MultiTaskModel(backbone, heads, {n: t.head_input for n, t in tasks.items()}, meta["pooling"], private,
                           adapters)
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:     # a diverged run or a damaged file: every answer of these tensors' tasks would be NaN
        raise BundleError(f"{path}: weights hold NaN or infinite values: {', '.join(bad[:5])}"
                          + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    return model.to(device).eval(), tokenizer, tasks, meta


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder under run_dir/checkpoints, or None."""
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    ckpts = [c for c in ckpts if (c / "trainer_state.json").is_file()]
    return ckpts[-1] if ckpts else None


def save_checkpoint(accelerator, run_dir: Path, step: int, trainer_state: dict, keep: int) -> Path:
    """Accelerate state + trainer_state.json under run_dir/checkpoints/step_N; keep the newest `keep`.

    trainer_state.json is written last, so a checkpoint without it is incomplete and ignored."""
    ckpt = run_dir / "checkpoints" / f"step_{step}"
    accelerator.save_state(str(ckpt))
    if accelerator.is_main_process:
        (ckpt / "trainer_state.json").write_text(json.dumps(trainer_state), encoding="utf-8")
        done = sorted((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return ckpt
