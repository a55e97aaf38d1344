"""Per-task evaluation: run a task's encoded split through the model, then the task's metrics.

Results are flat dicts keyed "task/metric" (e.g. "topic/accuracy"), plus "mean" (the mean of each task's
selection metric; metrics where lower is better enter negated)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from mtlm.contract import (ContractError, bundle_sha256, check_parent_model, find_contract, load_split_rows,
                           metric_deltas, read_parent, split_sha256)
from mtlm.data import collate, length_sorted_batches
from mtlm.tasks import default_metric

log = logging.getLogger("mtlm")


@torch.inference_mode()
def task_outputs(model, task, features: list[dict], batch_size: int, pad_token_id: int,
                 device: torch.device, autocast_dtype: torch.dtype | None = None, bar=None, accelerator=None
                 ) -> tuple[list[Any], list[Any]]:
    """(predictions, references) for one task over `features`, in the input order. `bar`: a progress
    object (`mtlm.progress`) advanced by one per batch.

    Batches are length-sorted to cut padding. The task's `postprocess(per_feature_predictions, features)`
    merges features that are parts of one example (extractive QA windows), so predictions and references are
    one per example.

    accelerator: with several processes, each runs the forward passes of its shard of the features (every
    world-th feature in length order, so shards have alike lengths), and the per-feature predictions are
    gathered (`accelerate.utils.gather_object`) so that every process postprocesses and scores the whole
    split, as one process would. Every process must call it with the same features (a collective), and each
    runs as many forward passes (a sharded model's forward is a collective too)."""
    model.eval()
    preds: list[Any] = [None] * len(features)
    lengths = [f["length"] for f in features]
    world = accelerator.num_processes if accelerator is not None else 1
    mine = list(range(len(features)))
    shards = [mine]
    if world > 1:
        shards = [sorted(mine, key=lambda i: -lengths[i])[r::world] for r in range(world)]
        mine = shards[accelerator.process_index]
    batches = [[mine[j] for j in b] for b in length_sorted_batches([lengths[i] for i in mine], batch_size)]
    real = len(batches)
    # every process runs as many forward passes (a sharded model's forward, train.fsdp, is a collective): one
    # with fewer batches runs a one-feature batch again and drops its predictions
    extra = max(-(-len(s) // batch_size) for s in shards) - real
    batches += [[shards[0][0]]] * extra if extra > 0 else []
    done: list[tuple[int, Any]] = []
    for n, idx in enumerate(batches):
        chunk = [features[i] for i in idx]
        if hasattr(task, "run_batch"):     # generation: predictions need decoding, not one pass's logits
            if n < real:                   # (never sharded: the recipe refuses generation with train.fsdp)
                for i, p in zip(idx, task.run_batch(model, chunk, pad_token_id, device)):
                    preds[i] = p
                if bar is not None:
                    bar.update(1)
            continue
        batch = {k: v.to(device) for k, v in collate(task, chunk, pad_token_id).items() if k != "labels"}
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with ctx:
            logits = model(task=task.name, **batch)
        if n < real:
            done += zip(idx, task.predictions(logits.float(), chunk))
            if bar is not None:
                bar.update(1)
    if world > 1:
        from accelerate.utils import gather_object
        done = gather_object(done)
    for i, p in done:
        preds[i] = p
    return task.postprocess(preds, features), task.references(features)


def evaluate(model, tasks: dict, features: dict[str, list[dict]], batch_size: int, pad_token_id: int,
             device: torch.device, autocast_dtype: torch.dtype | None = None, bar=None,
             accelerator=None) -> dict[str, float]:
    """Metrics of every task that has features: {"task/metric": value, ..., "mean": selection mean}.
    `bar`: a progress object advanced by one per batch (`task_outputs`). `accelerator`: split the forward
    passes across its processes and gather the predictions; every process gets the same metrics."""
    out: dict[str, float] = {}
    selection = []
    for name, feats in features.items():
        if not feats:
            continue
        task = tasks[name]
        preds, refs = task_outputs(model, task, feats, batch_size, pad_token_id, device, autocast_dtype, bar,
                                   accelerator)
        for metric, value in task.metrics(preds, refs).items():
            out[f"{name}/{metric}"] = value
        m = default_metric(task)
        selection.append(-out[f"{name}/{m}"] if m in task.lower_is_better else out[f"{name}/{m}"])
    if selection:
        out["mean"] = sum(selection) / len(selection)
    return out


def format_table(rows: dict[str, dict[str, float]], tasks: dict) -> str:
    """A plain-text table: one line per task with its selection metric first, then the others."""
    lines = []
    for name, task in tasks.items():
        metrics = rows.get(name, {})
        if not metrics:
            continue
        m = default_metric(task)
        rest = "  ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != m)
        lines.append(f"{name:<20} {task.cfg.type:<22} {m}={metrics[m]:.4f}  {rest}")
    return "\n".join(lines)


def format_deltas(report: dict, tasks: dict) -> str:
    """For a derived run's eval report: one line per task with its selection metric, the parent's value and
    the difference (this run - parent). Empty when the report has no parent."""
    parent = report.get("parent")
    if not parent:
        return ""
    lines = [f"vs parent {parent['run']} ({parent.get('method') or 'derived'}):"]
    for name, task in tasks.items():
        key = f"{name}/{default_metric(task)}"
        if key in parent["delta"]:
            lines.append(f"{name:<20} {key.split('/', 1)[1]:<22} {report['metrics'][key]:.4f}  parent "
                         f"{parent['metrics'][key]:.4f}  delta {parent['delta'][key]:+.4f}")
    if "mean" in parent["delta"]:
        lines.append(f"{'mean':<20} {'':<22} {report['metrics']['mean']:.4f}  parent {parent['metrics']['mean']:.4f}"
                     f"  delta {parent['delta']['mean']:+.4f}")
    return "\n".join(lines)


def by_task(flat: dict[str, float]) -> dict[str, dict[str, float]]:
    """{"task/metric": v} -> {task: {metric: v}} (drops "mean")."""
    out: dict[str, dict[str, float]] = {}
    for key, value in flat.items():
        if "/" in key:
            task, metric = key.split("/", 1)
            out.setdefault(task, {})[metric] = value
    return out


def evaluate_bundle(path, split: str = "test", batch_size: int = 64, data_dir=None,
                    contract_from=None, engine: str | None = None, progress: bool = False
                    ) -> tuple[dict[str, float], dict, Path]:
    """Evaluate a run or bundle on the `split` rows stored in its evaluation contract (`mtlm.contract`): the
    exact rows it was trained and selected with, re-read from its data files after checking their digests.

    data_dir: a folder standing in for the recipe folder when the data moved (see `contract.resolve_source`).
    contract_from: evaluate on another run's stored rows (`mtlm baseline`: the multi-task run's).
    engine: what runs the model (`mtlm.engine.ENGINES`); default: the bundle's default engine, as `mtlm.load`
    chooses it (a compressed run: its int8 / bf16 engine), recorded in the report as "engine".
    A derived run (parent.json) is evaluated on its parent's rows; its report adds the parent's metrics and
    per-task deltas (this run - parent), evaluating the parent first when its eval_<split>.json is missing or
    was made on other rows. progress: show batches done (`mtlm.progress`). A run without a contract (trained
    before mtlm stored one) is evaluated the old way, re-splitting the recipe's data, with a warning. Writes
    eval_<split>.json in the run folder and returns (metrics, tasks, that path). Raises BundleError,
    RecipeError, ContractError (a data file changed or is missing, naming it; a parent run missing or
    retrained), EngineError (an engine that cannot run here)."""
    from mtlm.checkpoint import find_bundle, load_bundle
    from mtlm.config import RecipeError

    bundle = find_bundle(path)
    run_dir = bundle.parent if bundle.name == "model" else bundle
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, tasks, meta = load_bundle(bundle, device)
    found = find_contract(Path(contract_from) if contract_from is not None else run_dir)
    if found is None:
        rows, digests, contract_dir = _resplit_rows(bundle, meta, tasks, split), None, None
    else:
        contract, contract_dir = found
        rows = load_split_rows(contract, contract_dir, split, list(tasks), Path(data_dir) if data_dir else None)
        digests = split_sha256(contract, split, list(rows))
    features = {n: tasks[n].encode(rows[n].records, tokenizer, meta["max_length"]) for n in rows}
    if not features:
        raise RecipeError([f"no task has a {split} split (set tasks.<name>.data.{split} or data.split.{split})"])
    from mtlm.engine_check import EngineModel, choose_engine
    runner = choose_engine(bundle, model, tokenizer, tasks, meta, device, requested=engine)
    scored = model if runner.name == "torch" else EngineModel(runner)
    from mtlm.progress import progress as progress_bar
    bar = progress_bar(sum(-(-len(f) // batch_size) for f in features.values()), f"eval {split}", enabled=progress,
                       unit="batch")
    metrics = evaluate(scored, tasks, features, batch_size, tokenizer.pad_token_id, device, bar=bar)
    bar.close()
    report = {"split": split, "bundle": _relative(bundle, run_dir), "engine": runner.name,
              "contract": None if contract_dir is None else _relative(contract_dir, run_dir),
              "rows": {n: len(rows[n].records) for n in features},   # examples (a QA example has windows)
              "rows_sha256": digests, "model_sha256": bundle_sha256(bundle), "metrics": metrics}
    parent = read_parent(run_dir) if contract_from is None else None
    if parent is not None:
        parent_dir, info = parent
        check_parent_model(run_dir, parent_dir, info)
        parent_metrics = _parent_metrics(parent_dir, split, digests, batch_size, data_dir)
        report["parent"] = {"run": _relative(parent_dir, run_dir), "method": info.get("method"),
                            "metrics": parent_metrics, "delta": metric_deltas(metrics, parent_metrics)}
    out_path = run_dir / f"eval_{split}.json"
    out_path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return metrics, tasks, out_path


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()


def _parent_metrics(parent: Path, split: str, digests: dict[str, str], batch_size: int, data_dir) -> dict[str, float]:
    """The parent run's metrics on the same rows: its eval_<split>.json when that was made with its current model
    (model_sha256) on every row the derived run was evaluated on (rows_sha256 per task), else a fresh
    evaluation of the parent (which rewrites that file)."""
    from mtlm.checkpoint import find_bundle

    saved = parent / f"eval_{split}.json"
    if saved.is_file():
        report = json.loads(saved.read_text(encoding="utf-8"))
        theirs = report.get("rows_sha256") or {}
        if report.get("model_sha256") == bundle_sha256(find_bundle(parent)) and \
                all(theirs.get(n) == d for n, d in digests.items()):
            return report["metrics"]
    return evaluate_bundle(parent, split, batch_size, data_dir)[0]


def _resplit_rows(bundle: Path, meta: dict, tasks: dict, split: str) -> dict:
    """{task: `split` Rows} re-made from the recipe stored in an old bundle (no contract): the data re-read from
    its absolute recipe folder and re-split with the recipe's seed, as mtlm did before contracts."""
    import yaml

    from mtlm.data import prepare_rows
    from mtlm.recipe import parse_recipe
    from mtlm.tasks import build_task

    if "recipe_dir" not in meta:
        raise ContractError([f"{bundle}: no stored evaluation contract (contract.json in its run folder) and no "
                             f"recipe folder in tasks.json: evaluate the run folder, not a copy of its model/"])
    log.warning("%s: no stored evaluation contract (trained before mtlm stored one): re-reading and re-splitting "
                "the data from %s; a data file changed since training would silently change the %s split",
                bundle, meta["recipe_dir"], split)
    raw = yaml.safe_load((bundle / "recipe.yaml").read_text(encoding="utf-8"))
    recipe = parse_recipe(raw, Path(meta["recipe_dir"]))
    data = prepare_rows(recipe, {n: build_task(n, t.cfg) for n, t in tasks.items()})
    return {n: data.rows[n][split] for n in tasks if split in data.rows.get(n, {})}
