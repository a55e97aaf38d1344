"""Inference bundles and resumable run state.

A bundle is a folder::

    backbone/           config.json, model.safetensors, tokenizer files (loadable by `AutoModel.from_pretrained`)
    heads.safetensors   every head's weights, keys "<task>.<param>"
    tasks.json          format version, pooling, max_length, and per task: type, config, fitted state
                        (label names, thresholds, target stats), input fields, selection metric
    recipe.yaml         the recipe the model was trained from

Loading reads safetensors only (no pickle). Resumable checkpoints (`checkpoints/step_N/`) hold Accelerate's
state (model, optimizer, scheduler, RNG) plus `trainer_state.json` (step, samplers, early stopping).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mtlm.config import Recipe, TaskConfig
from mtlm.model import MultiTaskModel, backbone_from_config
from mtlm.tasks import build_task, default_metric

FORMAT_VERSION = 1


class BundleError(Exception):
    """A folder that is not a readable mtlm bundle; the message says what is missing."""


def save_bundle(model: MultiTaskModel, tokenizer, tasks: dict, recipe: Recipe, path: Path) -> Path:
    """Write the inference bundle for `model` atomically (to a temp folder, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "backbone").mkdir(parents=True)
    model.backbone.save_pretrained(tmp / "backbone", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "backbone")
    heads = {f"{name}.{k}": v.detach().cpu().contiguous() for name, head in model.heads.items()
             for k, v in head.state_dict().items()}
    save_file(heads, tmp / "heads.safetensors")
    meta = {
        "format": FORMAT_VERSION,
        "name": recipe.name,
        "pooling": model.pooling,
        "max_length": recipe.max_length,
        "tasks": {name: {"type": t.cfg.type, "config": t.cfg.model_dump(mode="json"),
                         "input_fields": list(t.input_fields()), "head_input": t.head_input,
                         "metric": default_metric(t), "state": t.state()}
                  for name, t in tasks.items()},
    }
    (tmp / "tasks.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    (tmp / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def find_bundle(path: str | Path) -> Path:
    """A run folder (uses its model/) or a bundle folder -> the bundle folder. Raises BundleError."""
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / "tasks.json").is_file():
            return candidate
    raise BundleError(f"{path}: not an mtlm run or bundle (no tasks.json in it or in {path / 'model'})")


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> tuple[MultiTaskModel, object, dict, dict]:
    """Load (model in eval mode, tokenizer, tasks {name: fitted task}, tasks.json dict). Raises BundleError."""
    from transformers import AutoTokenizer

    path = find_bundle(path)
    meta = json.loads((path / "tasks.json").read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format {meta.get('format')} is not supported (expected {FORMAT_VERSION})")
    tasks = {}
    for name, info in meta["tasks"].items():
        task = build_task(name, TaskConfig.model_validate(info["config"]))
        task.load_state(info["state"])
        tasks[name] = task
    backbone = backbone_from_config(path / "backbone")
    weights = load_file(path / "backbone" / "model.safetensors")
    missing, unexpected = backbone.load_state_dict(weights, strict=False)
    if [k for k in missing if "pooler" not in k]:
        raise BundleError(f"{path}: backbone weights missing {missing[:5]}")
    tokenizer = AutoTokenizer.from_pretrained(path / "backbone")
    hidden = backbone.config.hidden_size
    heads = torch.nn.ModuleDict({n: t.make_head(hidden, 0.0) for n, t in tasks.items()})
    head_weights = load_file(path / "heads.safetensors")
    for name, head in heads.items():
        head.load_state_dict({k.split(".", 1)[1]: v for k, v in head_weights.items() if k.split(".", 1)[0] == name})
    model = MultiTaskModel(backbone, heads, {n: t.head_input for n, t in tasks.items()}, meta["pooling"])
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
