"""`mtlm compress RUN --method auto|int8|bf16 --budget X`: a faster model that keeps EVERY task within an
accuracy budget on dev, written as a derived run (`mtlm.contract.derive_run`: judged on the parent's rows).

`--budget X` is the relative drop in percent of each task's selection metric on its dev rows, allowed for
every task. Methods:
- int8: onnxruntime dynamic int8, per-channel (`mtlm.quantize`); the search keeps the strongest setting of
  which node groups stay fp32 that fits, and names the task that bound it.
- bf16: torch with bf16 weights under bf16 autocast (engine torch-bf16), measured on the CPU: only with native bf16 (AVX512-BF16 /
  AMX). (A GPU runs the torch-bf16 engine through `mtlm.load(path, "cuda", "torch-bf16")`.)
- auto: every method this machine runs without training (int8, the fp32 ONNX graph, bf16 where native), then,
  within `--search-minutes`, layer dropping and pruning alone and each combined with int8
  (`mtlm.compress_auto`); the fastest within budget, measured side by side with torch fp32 in this run. Its
  report adds a verdict: the 1.8x goal reached or not, and what stops each method (a task or a missing
  instruction set).
- layers: layer dropping (Sajjad et al. 2020: top / alternate layers) with recovery training distilled from the
  parent (`mtlm.layer_drop`); the search keeps the fewest layers that fit and names the task that bound it.
- prune: structured pruning of attention heads and FFN neurons, importance summed over every task, then
  recovery fine-tuning distilled from the parent through `fit` (`mtlm.prune`); the search keeps the strongest
  pruning level that fits and names the task that bound it.
The chosen model is re-evaluated from the files written before it is returned: a setting that violates the
budget on dev is never returned; when none fits, CompressError says what each try lost.

The report (`compress_report.json` in the derived run, also printed): per task the selection metric of the
parent and of the result on dev and test with relative drops; per engine, measured in one run on the same
real texts (the dev rows): texts/s at batch 32 (all heads), p50 batch-1 latency, size on disk, peak resident
memory; the CPU's instruction-set flags.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

import mtlm.engine
from mtlm.engine import ONNX_DIR, ONNX_FILES, OnnxEngine, OnnxInt8Engine, TorchBf16Engine, TorchEngine
from mtlm.engine_check import EngineModel, dev_features
from mtlm.quantize import Trial, node_groups, quantize_int8, relative_drop, search

log = logging.getLogger("mtlm")

METHODS = ("auto", "int8", "bf16", "prune", "layers")
NOT_BUILT: tuple[str, ...] = ()
DROPPED = "torch-layers"        # the report's name for the layer-dropped model (it runs on the torch engine)
PRUNED = "torch-pruned"         # the report's name for the pruned model (it runs on the torch engine)
OWN_WEIGHTS = (DROPPED, PRUNED)   # models of their own weights (a recovered bundle), run by the torch engine
REPORT_FILE = "compress_report.json"


class CompressError(ValueError):
    """A compression that cannot be done or found nothing within budget; the message says why."""


def _check_arguments(method: str, budget: float) -> None:
    if method not in METHODS:
        raise CompressError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
    if method in NOT_BUILT:
        raise CompressError(f"--method {method}: not built yet (it needs recovery training with distillation "
                            f"through fit's loss hook); use --method int8, bf16, prune, layers or auto")
    if not 0 <= budget < float("inf"):
        raise CompressError(f"--budget {budget}: must be 0 or more and finite (the relative drop in percent allowed "
                            f"per task)")


class Scorer:
    """Dev (or test) metrics of any engine on fixed encoded rows, and relative drops from a baseline."""

    def __init__(self, tasks: dict, features: dict[str, list[dict]], pad_token_id: int, batch_size: int = 64):
        from mtlm.tasks import default_metric
        self.tasks, self.features, self.pad, self.batch_size = tasks, features, pad_token_id, batch_size
        self.keys = {n: f"{n}/{default_metric(tasks[n])}" for n in features}
        self.lower = {n: default_metric(tasks[n]) in tasks[n].lower_is_better for n in features}

    def metrics(self, engine) -> dict[str, float]:
        """{task: selection metric} of `engine` on the rows."""
        from mtlm.evaluate import evaluate
        flat = evaluate(EngineModel(engine), self.tasks, self.features, self.batch_size, self.pad, torch.device("cpu"))
        return {n: flat[k] for n, k in self.keys.items()}

    def drops(self, base: dict[str, float], metrics: dict[str, float]) -> dict[str, float]:
        return {n: relative_drop(base[n], metrics[n], self.lower[n]) for n in base}


def _method_settings(method: str, given):
    """The checked settings of method layers / prune / auto: `given`, or the method's defaults
    (`LayerSettings`, `PruneSettings`, `AutoSettings`). Raises CompressError listing their problems."""
    if method == "layers":
        from mtlm.layer_drop import LayerSettings as defaults
    elif method == "prune":
        from mtlm.prune import PruneSettings as defaults
    else:
        from mtlm.compress_auto import AutoSettings as defaults
    settings = given or defaults()
    if settings.check():
        raise CompressError(f"--method {method}: " + "; ".join(settings.check()))
    return settings


def _output_folder(parent: Path, method: str, output: str | Path | None) -> Path:
    """The derived run folder: `output`, or <parent>-<method> beside the parent. Raises CompressError, before
    any search, when it holds a model, or is a file or a non-empty folder (a written model that fails its
    re-score is removed with its folder, which must hold nothing else)."""
    out = Path(output) if output is not None else parent.with_name(f"{parent.name}-{method}")
    if (out / "model").exists():
        raise CompressError(f"{out} already holds a model: pass --output NEW_FOLDER")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CompressError(f"{out} exists and is not an empty folder: pass --output NEW_FOLDER")
    return out


def compress_run(run: str | Path, method: str = "auto", budget: float = 1.0, output: str | Path | None = None,
                 measure_memory: bool = True, rounds: int = 3, layers=None, prune=None,
                 auto=None) -> tuple[Path, dict]:
    """Compress run `run` by `method` within `budget` (% relative drop per task on dev) into a derived run
    (`output`, default `<run>-<method>` beside it). Returns (the derived run folder, the report dict).
    `layers`: `mtlm.layer_drop.LayerSettings` for --method layers (choices, recovery steps; default settings).
    `prune`: `mtlm.prune.PruneSettings` for --method prune (levels, recovery steps; default settings).
    `auto`: `mtlm.compress_auto.AutoSettings` for --method auto (search time, recovery steps; default settings).

    Raises CompressError (unknown or unbuilt method, budget < 0, a task without dev rows, output exists,
    nothing within budget), EngineError (bf16 on a CPU without native bf16), ContractError (no stored
    evaluation contract, or its data cannot be read), BundleError."""
    from mtlm.checkpoint import find_bundle, load_bundle
    from mtlm.contract import ContractError, derive_run
    from mtlm.measure import cpu_flags, model_rows, peak_memory_mb, size_on_disk, speed

    _check_arguments(method, budget)
    load_start = os.getloadavg()        # the machine may be shared: the ratios carry over, not the rates
    layers, prune, auto = (_method_settings(name, given) if name == method else given
                           for name, given in (("layers", layers), ("prune", prune), ("auto", auto)))
    bundle = find_bundle(run)
    parent = bundle.parent if bundle.name == "model" else bundle
    out = _output_folder(parent, method, output)
    bf16_ok = mtlm.engine.cpu_has_bf16()          # compress measures on the CPU; a GPU runs torch-bf16 via `mtlm.load`
    if method == "bf16" and not bf16_ok:
        TorchBf16Engine(None, "cpu")                       # raises EngineError with the reason
    model, tokenizer, tasks, meta = load_bundle(bundle, "cpu")
    if method in ("layers", "prune") and len(model.private):   # they rebuild the shared stack only
        raise CompressError(f"--method {method}: not built for a model with private layers (tasks "
                            f"{', '.join(model.private)}: tasks.<name>.private_layers); use int8, bf16 or auto")
    trains = method == "auto" and auto.search_minutes > 0 and not len(model.private)
    try:
        dev = dev_features(bundle, tasks, tokenizer, int(meta["max_length"]), rows=None)
    except ContractError as e:
        raise CompressError(f"{run}: the budget is judged on the stored dev rows, which cannot be read: {e}") from None
    missing = [n for n in tasks if not dev.get(n)]
    if missing:
        raise CompressError(f"{run}: task(s) {', '.join(missing)} have no dev rows; the budget is judged on dev "
                            f"(set tasks.<name>.data.dev or data.split.dev and retrain)")
    scorer = Scorer(tasks, dev, tokenizer.pad_token_id)
    reference = TorchEngine(model, "cpu")
    base = scorer.metrics(reference)
    log.info("torch fp32 on dev: %s", "  ".join(f"{n} {v:.4f}" for n, v in base.items()))

    work = Path(tempfile.mkdtemp(prefix="mtlm-compress-"))
    try:
        # name -> {"trial", "engine", "details", "runs_on", "bundle" (own weights) or None, "graph_dir" or None,
        # "bound_by"}; over: tries over budget, measured for the report only
        found: dict[str, dict] = {}
        over: dict[str, dict] = {}
        skipped: list[dict] = []
        trials: list[dict] = []
        bound = None
        if method in ("int8", "auto"):
            found_int8, int8_trials, bound = _search_int8(model, work, scorer, base, budget)
            trials += [t.as_dict() for t in int8_trials]
            if found_int8 is not None:
                found["onnx-int8"] = {**found_int8, "runs_on": "onnx-int8", "graph_dir": work, "bound_by": bound}
            if method == "auto" and (work / ONNX_DIR / ONNX_FILES["onnx"]).is_file():
                engine = OnnxEngine(None, "cpu", work)
                metrics = scorer.metrics(engine)
                trial = Trial("onnx fp32", [], metrics, scorer.drops(base, metrics), budget)
                trials.append(trial.as_dict())
                if trial.fits:
                    found["onnx"] = {"trial": trial, "engine": engine, "details": {}, "runs_on": "onnx",
                                     "graph_dir": work}
        if method in ("bf16", "auto") and bf16_ok:
            engine = TorchBf16Engine(model, "cpu")
            metrics = scorer.metrics(engine)
            trial = Trial("torch bf16 (weights + autocast)", [], metrics, scorer.drops(base, metrics), budget)
            trials.append(trial.as_dict())
            if trial.fits:
                found["torch-bf16"] = {"trial": trial, "engine": engine, "details": {"weights": "bfloat16", "autocast": "bfloat16"},
                                       "runs_on": "torch-bf16"}
        if trains:
            from mtlm.compress_auto import trained_tries
            more, over, auto_trials, skipped = trained_tries(
                model, bundle, tasks, tokenizer, meta, scorer, base, budget, auto, work / "trained",
                lambda student, folder: _search_int8(student, folder, scorer, base, budget))
            found.update(more)
            trials += auto_trials
        elif method == "auto":
            skipped.append({"try": "layers, prune (alone and + int8)",
                            "reason": "--search-minutes 0" if auto.search_minutes <= 0 else
                            "not built for a model with private layers"})
        if method == "layers":
            from mtlm.layer_drop import search_layers
            best, layer_trials, bound = search_layers(model, parent, scorer, base, budget, layers, work / "layers")
            trials += layer_trials
            if best is not None:
                found[DROPPED] = {**best, "engine": _reopen(DROPPED, model, best["bundle"]), "runs_on": "torch",
                                  "bound_by": bound}
        if method == "prune":
            from mtlm.prune import search_pruning
            best, pruned_trials, bound = search_pruning(model, bundle, tasks, tokenizer, meta, scorer, base, budget,
                                                        prune, work / "prune")
            trials += pruned_trials
            if best is not None:
                found[PRUNED] = {**best, "engine": _reopen(PRUNED, model, best["bundle"]), "runs_on": "torch",
                                 "bound_by": bound}
        if not found:
            lines = [f"  {t['name']}: " + ", ".join(f"{n} {d:+.2f}%" for n, d in t["dev_drop_pct"].items())
                     for t in trials]
            bf16_note = "" if bf16_ok or method != "auto" else " (bf16 not tried: this CPU has no native bf16)"
            stopped = f" (the task that stops it: {bound})" if method in ("layers", "prune") and bound else ""
            raise CompressError(f"nothing fits a {budget}% budget on dev for every task{bf16_note}{stopped}; relative "
                                f"drops per try:\n" + "\n".join(lines))
        candidates = {**found, **over}

        rows = model_rows(dev)
        speeds = speed({"torch": reference, **{n: f["engine"] for n, f in candidates.items()}}, list(tasks), rows,
                       tokenizer.pad_token_id, rounds=rounds)
        chosen = max(found, key=lambda n: speeds[n]["texts_per_s"])
        entry = found[chosen]
        runs_on = entry["runs_on"]
        details = {"budget_pct": budget, "engine": runs_on, "bound_by": entry.get("bound_by"), **entry["details"]}
        derived = derive_run(parent, out, entry.get("bundle"), method=method if method != "auto"
                             else f"auto:{chosen}", details=details)
        target = derived / "model"
        if entry.get("bundle"):        # the parent's recipe, not the recovery run's (details hold its settings)
            shutil.copy2(bundle / "recipe.yaml", target / "recipe.yaml")
        if runs_on in ONNX_FILES:
            (target / ONNX_DIR).mkdir(exist_ok=True)
            shutil.copy2(entry["graph_dir"] / ONNX_DIR / ONNX_FILES[runs_on], target / ONNX_DIR / ONNX_FILES[runs_on])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    final = _reopen(runs_on, model, target)          # the files as written, scored again: never over budget
    dev_after = scorer.metrics(final)
    dev_drops = scorer.drops(base, dev_after)
    if any(d > budget + 1e-9 for d in dev_drops.values()):
        shutil.rmtree(derived, ignore_errors=True)
        raise CompressError(f"the written model {target} scores outside the budget on dev ({dev_drops}); removed")
    from mtlm.engine_check import CHECK_ROWS, compare
    from mtlm.export import write_manifest
    checks = compare(final, reference, tasks, {n: f[:CHECK_ROWS] for n, f in dev.items()}, tokenizer.pad_token_id)
    details["check"] = {n: c.as_dict() for n, c in checks.items()}     # what `mtlm.load`'s check compares with
    flags = cpu_flags()
    if runs_on != "torch":             # a torch model of its own weights: no engine manifest
        write_manifest(target, {runs_on: {"file": f"{ONNX_DIR}/{ONNX_FILES[runs_on]}" if runs_on in ONNX_FILES
                                          else None, **details}},
                       measured={"texts_per_s": {"torch": speeds["torch"]["texts_per_s"],
                                                 runs_on: speeds[chosen]["texts_per_s"]}, "cpu_flags": flags})
    test = _test_scores(bundle, tasks, tokenizer, meta, reference, final)
    report = {"parent": str(parent), "run": str(derived), "method": method, "engine": runs_on, "model": chosen,
              "budget_pct": budget, "bound_by": details["bound_by"], "cpu_flags": flags,
              "tasks": {n: {"metric": scorer.keys[n].split("/", 1)[1], "dev_before": base[n], "dev_after": dev_after[n],
                            "dev_drop_pct": dev_drops[n], **test.get(n, {})} for n in tasks},
              "trials": trials,
              "engines": {n: {**speeds[n], "ratio_vs_torch": speeds[n]["texts_per_s"] / speeds["torch"]["texts_per_s"],
                              **({"runs_on": candidates[n]["runs_on"], "fits": candidates[n]["trial"].fits,
                                  "dev_drop_pct": candidates[n]["trial"].drops} if n in candidates else {})}
                          for n in speeds},
              "measured_on_rows": len(rows), "loadavg": {"start": load_start, "end": os.getloadavg()}}
    if method == "auto":
        from mtlm.compress_auto import verdict
        report["skipped"] = skipped
        report["verdict"] = verdict(report, auto)
    for name, where, engine in (("torch", bundle, "torch"), (chosen, target, runs_on)):
        entry = report["engines"][name]
        entry["size_mb"] = size_on_disk(where, engine) / 2**20
        if measure_memory:
            entry["peak_rss_mb"] = peak_memory_mb(where, engine, rows, tokenizer.pad_token_id)
    (derived / REPORT_FILE).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return derived, report


def _search_int8(model, work: Path, scorer: Scorer, base: dict, budget: float):
    """Export the fp32 graph into work/onnx, search the int8 ladder; the chosen setting's graph is left at
    work/onnx/model.int8.onnx. Returns ({"trial", "engine", "details"} or None, trials, binding task)."""
    from mtlm.export import export_onnx
    source = work / ONNX_DIR / ONNX_FILES["onnx"]
    export_onnx(model, source)
    groups = node_groups(source)
    target = work / ONNX_DIR / ONNX_FILES["onnx-int8"]

    def quantized(fp32_groups: list[str]) -> OnnxInt8Engine:
        quantize_int8(source, target, [n for g in fp32_groups for n in groups[g]])
        return OnnxInt8Engine(None, "cpu", work)

    def measure(fp32_groups: list[str]):
        metrics = scorer.metrics(quantized(fp32_groups))
        return metrics, scorer.drops(base, metrics)

    best, trials, bound = search(groups, measure, budget)
    if best is None:
        return None, trials, bound
    engine = quantized(best.fp32_groups)                 # the search may have quantised another setting last
    details = {"quantization": "onnxruntime dynamic int8, per-channel QInt8 weights", "fp32_groups": best.fp32_groups,
               "int8_groups": [g for g in groups if g not in best.fp32_groups], "setting": best.name}
    return {"trial": best, "engine": engine, "details": details}, trials, bound


def _reopen(name: str, model, bundle: Path):
    """Engine `name` (an engine name, or DROPPED / PRUNED) for the files in `bundle`; torch on a layer-dropped
    or pruned model runs its own weights, loaded from them."""
    from mtlm.engine import make_engine
    if name in OWN_WEIGHTS or name == "torch":
        from mtlm.checkpoint import load_bundle
        return TorchEngine(load_bundle(bundle, "cpu")[0], "cpu")
    return make_engine(name, model, "cpu", bundle)


def _test_scores(bundle: Path, tasks: dict, tokenizer, meta: dict, reference, final) -> dict[str, dict]:
    """{task: {"test_before", "test_after", "test_drop_pct"}} on the stored test rows (tasks without a test
    split are left out; {} when the test rows cannot be read, with a warning)."""
    from mtlm.contract import ContractError
    try:
        test = dev_features(bundle, tasks, tokenizer, int(meta["max_length"]), rows=None, split="test")
    except ContractError as e:
        log.warning("test rows cannot be read, the report has dev only: %s", e)
        return {}
    test = {n: f for n, f in test.items() if f}
    if not test:
        return {}
    scorer = Scorer(tasks, test, tokenizer.pad_token_id)
    before, after = scorer.metrics(reference), scorer.metrics(final)
    drops = scorer.drops(before, after)
    return {n: {"test_before": before[n], "test_after": after[n], "test_drop_pct": drops[n]} for n in test}


def format_report(report: dict) -> str:
    """The report as text: per-task metrics and drops, then per-engine speed, size and memory."""
    lines = [f"{report['method']} -> {report.get('model', report['engine'])} (budget {report['budget_pct']}% per task on dev"
             + (f"; bound by {report['bound_by']})" if report.get("bound_by") else ")"),
             f"{'task':<16}{'metric':<10}{'dev before':>11}{'after':>9}{'drop %':>8}{'test before':>13}{'after':>9}{'drop %':>8}"]
    for name, t in report["tasks"].items():
        test = (f"{t['test_before']:>13.4f}{t['test_after']:>9.4f}{t['test_drop_pct']:>+8.2f}" if "test_before" in t
                else f"{'-':>13}{'-':>9}{'-':>8}")
        lines.append(f"{name:<16}{t['metric']:<10}{t['dev_before']:>11.4f}{t['dev_after']:>9.4f}"
                     f"{t['dev_drop_pct']:>+8.2f}{test}")
    width = max(12, *(len(n) + 2 for n in report["engines"]))
    lines.append(f"{'engine':<{width}}{'texts/s':>9}{'x torch':>9}{'p50 ms':>8}{'size MB':>9}{'peak MB':>9}")
    for name, e in report["engines"].items():
        size = f"{e['size_mb']:>9.1f}" if "size_mb" in e else f"{'-':>9}"
        peak = f"{e['peak_rss_mb']:>9.0f}" if e.get("peak_rss_mb") else f"{'-':>9}"
        lines.append(f"{name:<{width}}{e['texts_per_s']:>9.1f}{e['ratio_vs_torch']:>9.2f}{e['p50_latency_ms']:>8.1f}"
                     f"{size}{peak}")
    load = report.get("loadavg", {}).get("end")
    lines.append(f"cpu flags: {' '.join(report['cpu_flags']) or 'unknown'}; {report['measured_on_rows']} dev texts"
                 + (f"; load average {load[0]:.1f} (shared machine: compare the ratios)" if load else ""))
    if "verdict" in report:
        lines += report["verdict"]["lines"]
        if report["verdict"]["stopped_by"]:
            lines.append("stopped by: " + "; ".join(report["verdict"]["stopped_by"]))
    slower = slower_than_torch(report)
    if slower:
        lines.append(f"WARNING: {slower} measured {report['engines'][slower]['ratio_vs_torch']:.2f}x torch fp32 here: "
                     f"it is no faster on this machine, so `mtlm eval` / `mtlm serve` default to the faster torch "
                     f"engine (pass --engine {slower} to use it)")
    return "\n".join(lines)


def slower_than_torch(report: dict) -> str | None:
    """The chosen engine's name when it measured slower than torch fp32 in the report's own run, else None."""
    name = report.get("model", report.get("engine"))
    engine = report.get("engines", {}).get(name)
    return name if name != "torch" and engine is not None and engine["ratio_vs_torch"] < 1.0 else None
