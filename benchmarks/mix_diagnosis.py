"""Why does the token-level task trail its single-task model on a mix (issue 17)? Measurements, one mix.

    python benchmarks/mix_diagnosis.py probe       # per-task loss and backbone gradients at step 0 and on the trained models
    python benchmarks/mix_diagnosis.py trajectory  # the default multi-task run again, gradients every 25 steps (costly)
    python benchmarks/mix_diagnosis.py selection   # the tagger's own best step vs the step the mean selected (test)
    python benchmarks/mix_diagnosis.py refit       # a fresh tagger head on a frozen backbone: pretrained / multi / single
    python benchmarks/mix_diagnosis.py lr --lrs 5e-5,2e-4    # multi vs single at other learning rates
    python benchmarks/mix_diagnosis.py all         # probe, selection, refit, lr (in that order; not trajectory)

Mix and budget are benchmarks/mixes.py's (default: ner3k-banking-stsb, seed 0, 300 steps of batch 16).
`refit` and the single-task side read the models `python benchmarks/mixes.py --mixes MIX --seeds SEED` trained
(runs/mixes/...); they are trained here when missing. Results: benchmarks/results/mix_diagnosis.json, one
section per measurement, each rewritten when it is run again; the load average is recorded with each.

probe: `mtlm.task_gradients.TaskGradients` (each task's loss and backbone-gradient norm, per layer, on a fixed
64-row probe batch of its train rows, and the cosine between tasks' backbone gradients) at the start (the
pretrained backbone, new heads), on the benchmark's trained multi-task model, and on each single-task model
(its own task only). trajectory: the same probe every 25 steps in a rerun of the benchmark's default
multi-task run (same recipe and seed; the probe does not change training), plus
a callback that keeps the bundle of the tagger's own best dev step, evaluated on test beside the selected one.
refit: the tagger's train rows of the benchmark, a new linear head trained on a frozen backbone taken from
(a) the pretrained MiniLM, (b) the multi-task model, (c) the single-task tagger; the same steps and lr for
each. If (b) reaches (c), the shared representation still holds what the tagger needs and the loss is in the
head or its optimisation; if (b) stays at the multi-task tagger's score, the shared layers lost it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mixes  # noqa: E402  (benchmarks/ is not a package)

ROOT = mixes.ROOT
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "mix_diagnosis.json"
WORK = ROOT / "runs" / "mix_diagnosis"


def _args(ns) -> argparse.Namespace:
    """The mixes.py settings the recipes are built from (its defaults, this script's --steps etc.)."""
    return argparse.Namespace(backbone="minilm-l6", batch_size=ns.batch_size, steps=ns.steps,
                              eval_every=ns.eval_every, lr=1e-4, split="test", work=ns.work)


def token_task(recipe) -> str:
    """The mix's token-level (or span) task: the one whose type is token_classification or extractive_qa.
    Raises SystemExit when the mix has none."""
    for name, t in recipe.tasks.items():
        if t.type in ("token_classification", "extractive_qa"):
            return name
    raise SystemExit(f"{recipe.name}: no token-level task in this mix")


def benchmark_default(ns):
    """The benchmark's default recipe of the mix and seed (models under runs/mixes), trained by
    `run_baseline` when missing; returns (recipe, its baseline result)."""
    from mtlm.baseline import run_baseline, trained_recipe_changes
    bench = argparse.Namespace(backbone="minilm-l6", split="test", work=mixes.WORK, **mixes.BUDGET)
    recipe = mixes.make_recipe(ns.mix, ns.seed, "default", [], bench)
    stored = recipe.run_dir() / "baseline_test.json"
    if stored.is_file() and trained_recipe_changes(recipe) == []:
        return recipe, json.loads(stored.read_text(encoding="utf-8"))
    return recipe, run_baseline(recipe, split="test", progress=False)


# ------------------------------------------------------------------------------------------- probe

def probe(ns) -> dict:
    """TaskGradients at three states of the benchmark's mix and seed (module docstring), no training."""
    from mtlm.checkpoint import find_bundle, load_bundle
    from mtlm.task_gradients import TaskGradients
    from mtlm.train import build

    base, baseline = benchmark_default(ns)
    recipe = mixes.make_recipe(ns.mix, ns.seed, "probe", [], _args(ns))
    run = build(recipe, overwrite=True)             # data, pretrained backbone, new heads: step 0
    grads = TaskGradients(every=10**9, rows=ns.rows, seed=ns.seed)
    grads.on_train_begin(run)
    states = {"start: pretrained backbone, new heads": grads.records[-1]}
    trained, *_ = load_bundle(find_bundle(base.run_dir()))
    run.unwrapped.load_state_dict(trained.state_dict())
    states["multi-task model (benchmark, selected step)"] = grads.measure(run, base.train.max_steps)
    adam = {"multi_task": adam_step_norms(trained, base.run_dir(), grads.last_gradients)}
    single, adam["single_task"] = {}, {}
    for task in recipe.tasks:
        model, *_ = load_bundle(find_bundle(base.run_dir() / "baseline" / task))
        run.unwrapped.backbone.load_state_dict(model.backbone.state_dict())
        run.unwrapped.heads[task].load_state_dict(model.heads[task].state_dict())
        single[task] = grads.measure(run, -1)["tasks"][task]
        adam["single_task"].update(adam_step_norms(model, base.run_dir() / "baseline" / task,
                                                   {task: grads.last_gradients[task]}))
    states["single-task models (each its own task)"] = {"step": None, "tasks": single, "cosine": {}}
    shares = _sampling_shares(base, base.run_dir())
    table = {name: {t: {"loss": round(v["loss"], 4), "backbone_norm": round(v["backbone_norm"], 4),
                        "head_norm": round(v["head_norm"], 4),
                        "top_layer_norm": round(v["layer_norms"].get(f"layer.{_top(v)}", 0.0), 4)}
                    for t, v in st["tasks"].items()} for name, st in states.items()}
    adam["multi_vs_single"] = {t: adam["multi_task"][t] / adam["single_task"][t] for t in adam["single_task"]}
    return {"mix": ns.mix, "seed": ns.seed, "rows": ns.rows, "sampling_share": shares, "table": table,
            "adam_preconditioned_step_norm": adam,
            "cosine": {name: st["cosine"] for name, st in states.items()}, "states": states,
            "benchmark": {r["task"]: {k: r[k] for k in ("metric", "multi_task", "single_task", "gain")}
                          for r in baseline["tasks"]}}


def adam_step_norms(model, run_dir: Path, gradients: dict[str, list]) -> dict[str, float]:
    """How far one probe batch of each task moves the shared layers under the run's AdamW state: the L2 norm
    over the transformer blocks' parameters (not the embeddings: rows of tokens the run never saw have
    v = 0) of g / (sqrt(v_hat) + eps), v_hat = exp_avg_sq / (1 - beta2^t) from the run's
    last checkpoint (Kingma & Ba 2015; the lr factor left out). `model`: the run's MultiTaskModel (its
    parameters in the order `mtlm.train.param_groups` gave the optimizer); `gradients`: {task: backbone
    gradients in backbone.named_parameters() order}. A task whose gradients are small next to the others'
    (whose v dominate the shared second moment) gets a small step here, however low its loss."""
    import torch

    from mtlm.checkpoint import latest_checkpoint
    from mtlm.task_gradients import layer_group
    from mtlm.train import param_groups
    ckpt = latest_checkpoint(run_dir)
    state = torch.load(ckpt / "optimizer.bin", map_location="cpu", weights_only=False)
    order = [p for g in param_groups(model, 0.0) for p in g["params"]]
    index = {id(p): i for i, p in enumerate(order)}
    beta2 = state["param_groups"][0]["betas"][1]
    eps = state["param_groups"][0]["eps"]
    out = {}
    for task, grads in gradients.items():
        sq = 0.0
        for (name, p), g in zip(model.backbone.named_parameters(), grads):
            st = state["state"].get(index[id(p)])
            if st is None or not layer_group(name).startswith("layer."):
                continue
            v_hat = st["exp_avg_sq"] / (1 - beta2 ** float(st["step"]))
            sq += float((g / (v_hat.sqrt() + eps)).pow(2).sum())
        out[task] = sq ** 0.5
    return out


def _top(task_record: dict) -> int:
    return max(int(g.split(".")[1]) for g in task_record["layer_norms"] if g.startswith("layer."))


def trajectory(ns) -> dict:
    from mtlm.callbacks import Callback
    from mtlm.checkpoint import save_bundle
    from mtlm.evaluate import by_task, evaluate_bundle
    from mtlm.task_gradients import TaskGradients
    from mtlm.train import fit

    recipe = mixes.make_recipe(ns.mix, ns.seed, "trajectory", [], _args(ns))
    tagger = token_task(recipe)
    run_dir = recipe.run_dir()

    class TaggerBest(Callback):
        """Keep the bundle of the tagger's own best dev evaluation in run_dir/tagger_best."""
        best = None

        def on_evaluate(self, run, step, metrics):
            value = metrics.get(f"{tagger}/{recipe.tasks[tagger].metric}")
            if value is not None and (self.best is None or value > self.best):
                self.best = value
                save_bundle(run.unwrapped, run.tokenizer, run.tasks, run.recipe, run.run_dir / "tagger_best")

    grads = TaskGradients(every=ns.every, rows=ns.rows, seed=ns.seed)
    fit(recipe, progress=False, overwrite=True, callbacks=[grads, TaggerBest()])
    m = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    selected = by_task(evaluate_bundle(run_dir, "test")[0])
    own = by_task(evaluate_bundle(run_dir / "tagger_best", "test", contract_from=run_dir)[0])
    metric = recipe.tasks[tagger].metric
    shares = _sampling_shares(recipe, run_dir)
    return {"mix": ns.mix, "seed": ns.seed, "tagger": tagger, "every": ns.every, "records": grads.records,
            "summary": summarize_gradients(grads.records, shares),
            "loss_log": [{k: v for k, v in e.items() if k == "step" or k.startswith("loss/")} for e in m["train"]],
            "selection": {"selected_step": m["best_step"], "tagger_best": m["task_best"].get(tagger),
                          "test_selected": selected, "test_tagger_best": own,
                          f"test_{tagger}_{metric}_selected": selected.get(tagger, {}).get(metric),
                          f"test_{tagger}_{metric}_own_best": own.get(tagger, {}).get(metric)}}


def _sampling_shares(recipe, run_dir) -> dict[str, float]:
    """Each task's share of the micro-batches (proportional sampling: train items / all items)."""
    from mtlm.baseline import train_sizes
    from mtlm.batches import mean_probabilities
    from mtlm.checkpoint import load_bundle
    _, _, tasks, _ = load_bundle(run_dir / "model")
    data, sizes = train_sizes(recipe, tasks)
    probs = mean_probabilities(sizes, recipe.train.sampling, recipe.train.temperature)
    return {t: p for s, p in probs.items() for t in data.sources[s].tasks}


def summarize_gradients(records: list[dict], shares: dict[str, float]) -> dict:
    """Medians over the measurements after step 0: per task its loss, backbone and head gradient norm,
    the top and bottom layers' norms; the ratio of each task's backbone norm to the smallest one; each
    task's expected share of the backbone update direction (sampling share x gradient norm, normalised);
    the median cosine of each pair; and the first measurement (step 0) on its own."""
    later = [r for r in records if r["step"] > 0] or records
    tasks = list(later[0]["tasks"])
    med = {t: {"loss": statistics.median(r["tasks"][t]["loss"] for r in later),
               "backbone_norm": statistics.median(r["tasks"][t]["backbone_norm"] for r in later),
               "head_norm": statistics.median(r["tasks"][t]["head_norm"] for r in later),
               "layer_norms": {g: statistics.median(r["tasks"][t]["layer_norms"][g] for r in later)
                               for g in later[0]["tasks"][t]["layer_norms"]}} for t in tasks}
    low = min(v["backbone_norm"] for v in med.values())
    pushed = {t: shares.get(t, 0.0) * med[t]["backbone_norm"] for t in tasks}
    total = sum(pushed.values()) or 1.0
    for t in tasks:
        med[t]["norm_vs_smallest"] = med[t]["backbone_norm"] / low
        med[t]["sampling_share"] = shares.get(t)
        med[t]["update_share"] = pushed[t] / total
    return {"per_task": med, "cosine_median": {k: statistics.median(r["cosine"][k] for r in later)
                                               for k in later[0]["cosine"]},
            "step0": records[0] if records and records[0]["step"] == 0 else None}


# --------------------------------------------------------------------------------------- selection

def selection(ns) -> dict:
    """Per seed of the benchmark (mixes.json): the step the mean selected, the token task's own best dev
    step and value, and its dev value at the selected step."""
    result = json.loads(ns.mixes_results.read_text(encoding="utf-8")) if ns.mixes_results.is_file() else {"runs": []}
    out = []
    for r in result["runs"]:
        if r["mix"] != ns.mix:
            continue
        facts = r["multi_run"]
        for name, best in facts["task_best"].items():
            at = next((e for e in facts["dev_curve"] if e["step"] == facts["best_step"]), {})
            out.append({"seed": r["seed"], "variant": r["variant"], "task": name, "selected_step": facts["best_step"],
                        "own_best_step": best["step"], "own_best_dev": best["value"],
                        "dev_at_selected": at.get(f"{name}/{best['metric']}")})
    return {"mix": ns.mix, "rows": out}


# ------------------------------------------------------------------------------------------- refit

def refit(ns) -> dict:
    """A new tagger head on each frozen backbone (module docstring), evaluated on the benchmark's test rows."""
    from safetensors.torch import load_file

    from mtlm.baseline import single_task_recipe
    from mtlm.evaluate import by_task, evaluate_bundle
    from mtlm.train import fit

    base, baseline = benchmark_default(ns)
    tagger = token_task(base)
    default_dir = base.run_dir()
    files = {s: str(default_dir / "baseline" / tagger / "data" / f"{s}.jsonl") for s in ("train", "dev", "test")}
    sources = {"pretrained": None, "multi_task": default_dir / "model" / "backbone",
               "single_task": default_dir / "baseline" / tagger / "model" / "backbone"}
    out = {"mix": ns.mix, "seed": ns.seed, "tagger": tagger, "steps": ns.refit_steps, "lr": ns.refit_lr,
           "benchmark": {k: next(r[k] for r in baseline["tasks"] if r["task"] == tagger)
                         for k in ("metric", "multi_task", "single_task")}, "frozen_backbone": {}}
    for name, folder in sources.items():
        recipe = single_task_recipe(base, tagger, ns.refit_steps, ns.work / "refit" / name, files)
        recipe.train.lr = ns.refit_lr

        def freeze(model, folder=folder):
            if folder is not None:
                missing, unexpected = model.backbone.load_state_dict(load_file(str(folder / "model.safetensors")),
                                                                     strict=False)
                if missing:
                    raise RuntimeError(f"{folder}: backbone weights missing {missing[:3]}")
            for p in model.backbone.parameters():
                p.requires_grad_(False)
            return model

        t0 = time.perf_counter()
        fit(recipe, progress=False, overwrite=True, model_fn=freeze)
        metrics = by_task(evaluate_bundle(recipe.run_dir(), "test", contract_from=default_dir)[0])
        out["frozen_backbone"][name] = {**metrics.get(tagger, {}), "wall_s": round(time.perf_counter() - t0, 1)}
        print(f"refit on the {name} backbone: {metrics.get(tagger)}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- lr

def lr_sensitivity(ns) -> dict:
    """Multi vs single (run_baseline: equal per-task steps) at each learning rate of --lrs, next to the
    benchmark's default lr."""
    from mtlm.baseline import run_baseline

    _, default = benchmark_default(ns)
    rows = {"1e-4 (default)": _per_task(default)}
    for lr in ns.lrs.split(","):
        recipe = mixes.make_recipe(ns.mix, ns.seed, f"lr{lr}", [f"train.lr={lr}"], _args(ns))
        rows[lr] = _per_task(run_baseline(recipe, split="test", progress=False))
        print(f"lr {lr}: {rows[lr]}", flush=True)
    return {"mix": ns.mix, "seed": ns.seed, "by_lr": rows}


def _per_task(result: dict) -> dict:
    return {"tasks": {r["task"]: {"multi_task": r["multi_task"], "single_task": r["single_task"],
                                  "delta": r.get("gain"), "steps_single": r["steps_single"]} for r in result["tasks"]},
            "average": result["average"]}


# -------------------------------------------------------------------------------------------- main

STEPS = {"probe": probe, "selection": selection, "refit": refit, "lr": lr_sensitivity}
COSTLY = {"trajectory": trajectory}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=[*STEPS, *COSTLY, "all"])
    p.add_argument("--mix", default="ner3k-banking-stsb", choices=list(mixes.MIXES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=mixes.BUDGET["steps"])
    p.add_argument("--batch-size", type=int, default=mixes.BUDGET["batch_size"])
    p.add_argument("--eval-every", type=int, default=mixes.BUDGET["eval_every"])
    p.add_argument("--every", type=int, default=25, help="trajectory: steps between gradient measurements")
    p.add_argument("--rows", type=int, default=64, help="probe: train rows per task in the probe batch")
    p.add_argument("--lrs", default="5e-5,2e-4")
    p.add_argument("--refit-steps", type=int, default=150)
    p.add_argument("--refit-lr", type=float, default=1e-3)
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--mixes-results", type=Path, default=mixes.DEFAULT_OUT)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ns = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import cpu_flags, cpu_model

    result = json.loads(ns.out.read_text(encoding="utf-8")) if ns.out.is_file() else {}
    result["machine"] = {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "logical_cpus": os.cpu_count()}
    for what in (list(STEPS) if ns.what == "all" else [ns.what]):
        t0 = time.perf_counter()
        section = {**STEPS, **COSTLY}[what](ns)
        section.update({"wall_s": round(time.perf_counter() - t0, 1), "loadavg": list(os.getloadavg()),
                        "config": {k: str(v) for k, v in vars(ns).items()}})
        result[what] = section
        mixes.write_json(ns.out, result)
        print(json.dumps({k: v for k, v in section.items() if k not in ("records", "loss_log", "config")},
                         indent=1)[:4000], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
