"""`mtlm compress RUN --budget X` (auto)'s trained tries and its verdict: layer dropping and structured pruning,
each alone and combined with int8 (the recovered model exported and quantised), under a wall-clock bound.

The tries that need no training (int8, the fp32 graph, bf16 where native) run first in `mtlm.compress`; then,
while `search_minutes` allow, the ladder of trained tries, mildest first and the two methods interleaved
(each try costs about the same recovery training, and a mild one is the likeliest to fit):
  layers L-1 (top), prune `prune_levels[0]`, layers L-2, prune `prune_levels[1]`, ... down to L/2 layers.
A layer-dropped try keeps the bottom N of the parent's layers (Sajjad et al. 2020: dropping the top layers
was their best choice) and recovers `recovery_steps` steps distilled from the parent (`mtlm.layer_drop`);
a pruned try removes the fraction f of heads and FFN neurons of lowest importance summed over all tasks and
recovers the same way (`mtlm.prune`). A try whose model fits the budget on dev is then exported and searched
for int8 (`mtlm.quantize`'s ladder, drops measured against the PARENT's dev metrics, so the combination
has to fit as a whole). A try that violates the budget ends its method (a stronger one would lose more: the
same monotonicity `mtlm.layer_drop` and `mtlm.prune` assume); those and the tries the time bound stops are
listed as skipped, with the reason.

Time bound: a trained try starts only while the time spent since the first one plus the longest try so far
stays within `search_minutes` (the first try starts whenever the bound is above 0; 0 means no trained try).

`verdict` states whether the chosen model reaches `target_speedup` x torch fp32 in-process with every task
within the budget on dev and within `test_factor` x the budget on test (issue 11: 1.8x, 1% dev, 2% test)
and, when not, what stops each method: the task over budget, or the speed short of the target (for int8 on
a CPU without VNNI / AMX int8 instructions, or bf16 without AVX512-BF16 / AMX, the missing instruction set).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("mtlm")

INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")     # onnxruntime's fast int8 GEMM paths (VPDPBUSD / AMX)
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass
class AutoSettings:
    """search_minutes: wall-clock bound of auto's trained tries (module docstring; 0: none, only the
    untrained methods); recovery_steps: recovery training steps per trained try (distilled from the parent,
    alpha 0.5, T 2); prune_levels: pruning fractions tried, mildest first; min_layers_fraction: the fewest
    layers a layer-dropped try keeps, as a fraction of the parent's; target_speedup / test_factor: the
    verdict's goal (x torch fp32 in-process throughput; test drops allowed = test_factor x the budget)."""

    search_minutes: float = 30.0
    recovery_steps: int = 100
    prune_levels: tuple[float, ...] = (0.2, 0.35, 0.5)
    min_layers_fraction: float = 0.5
    target_speedup: float = 1.8
    test_factor: float = 2.0

    def check(self) -> list[str]:
        """Problems with the settings, one line each (empty: fine)."""
        bad = [f for f in self.prune_levels if not 0 < f < 1]
        return ([f"--search-minutes must be 0 or more and finite, got {self.search_minutes}"]
                if not 0 <= self.search_minutes < math.inf else []) + \
            ([f"recovery steps must be 1 or more, got {self.recovery_steps}"] if self.recovery_steps < 1 else []) + \
            ([f"prune levels must be fractions in (0, 1), got {bad}"] if bad else [])

    def ladder(self, layers: int) -> list[tuple[str, float]]:
        """The trained tries in order: ("layers", N) and ("prune", fraction), interleaved, mildest first."""
        counts = list(range(layers - 1, max(1, math.ceil(layers * self.min_layers_fraction)) - 1, -1))
        levels = sorted(self.prune_levels)
        out: list[tuple[str, float]] = []
        for i in range(max(len(counts), len(levels))):
            out += [("layers", counts[i])] if i < len(counts) else []
            out += [("prune", levels[i])] if i < len(levels) else []
        return out


class Clock:
    """The search's wall-clock bound: `allows()` while the time spent plus the longest try so far fits."""

    def __init__(self, minutes: float, now=time.monotonic):
        self.limit, self.now, self.start, self.longest = 60.0 * minutes, now, None, 0.0

    def allows(self) -> bool:
        if self.limit <= 0:
            return False
        return self.start is None or (self.now() - self.start) + self.longest <= self.limit

    def begin(self) -> float:
        t = self.now()
        self.start = t if self.start is None else self.start
        return t

    def end(self, began: float) -> float:
        took = self.now() - began
        self.longest = max(self.longest, took)
        return took


def trained_tries(model, bundle: Path, tasks: dict, tokenizer, meta: dict, scorer, base: dict, budget: float,
                  settings: AutoSettings, work: Path, int8_search, clock: Clock | None = None):
    """Run the ladder (module docstring) on the parent `model` (loaded from `bundle`). `scorer` is
    `mtlm.compress.Scorer` on the dev rows, `base` the parent's dev metric per task; `int8_search(model,
    folder)` is `mtlm.compress`'s int8 search on another model (returns (entry or None, trials, bound)).

    Returns (found: {name: entry} for the last fitting try of each kind ("torch-layers", "torch-pruned",
    "onnx-int8-layers", "onnx-int8-pruned"); entries hold "trial", "engine", "details", "runs_on",
    "bundle", "graph_dir" (the folder holding onnx/, or None), "bound_by"; over: {name: entry} of the tries over budget, for
    the speed table; trials as dicts; skipped: [{"try", "reason"}])."""
    from mtlm.checkpoint import load_bundle
    from mtlm.distill import distillation_loss
    from mtlm.distill.layers import layer_count
    from mtlm.distill.run import distill_run
    from mtlm.distill.teacher import TeacherCache
    from mtlm.engine import TorchEngine
    from mtlm.layer_drop import LayerSettings
    from mtlm.prune import PruneSettings, importance, importance_features, pruned_model, recover, structure
    from mtlm.quantize import Trial

    clock = clock or Clock(settings.search_minutes)
    total = layer_count(model.backbone)
    found, over, trials, skipped, failed = {}, {}, [], [], {}
    layer_settings = LayerSettings(strategies=("top",), recovery_steps=settings.recovery_steps)
    prune_settings = PruneSettings(recovery_steps=settings.recovery_steps)
    cache = scores = distiller = None
    for method, level in settings.ladder(total):
        label = f"layers {total}->{level} (top)" if method == "layers" else f"prune {level:.0%}"
        if method in failed:
            skipped.append({"try": label, "reason": f"a milder {method} try already violates the budget "
                                                    f"({failed[method]})"})
            continue
        if not clock.allows():
            skipped.append({"try": label, "reason": f"the search time is spent ({settings.search_minutes:g} min, "
                                                    f"--search-minutes)"})
            continue
        began = clock.begin()
        folder = work / f"{method}-{level}"
        if method == "layers":
            cache = cache or TeacherCache(model)
            out, _ = distill_run(bundle.parent if bundle.name == "model" else bundle, f"layers:{int(level)}",
                                 layer_settings.recipe_overrides("top"), folder, progress=False, measure=False,
                                 cache=cache)
            recovered = out / "model"
            details = {"layers": int(level), "teacher_layers": total, "layer_choice": "top",
                       "recovery_steps": settings.recovery_steps}
        else:
            if scores is None:
                features = importance_features(bundle, tasks, tokenizer, int(meta["max_length"]),
                                               prune_settings.importance_rows)
                scores = importance(model, tasks, features, tokenizer.pad_token_id)
                distiller = distillation_loss(model, prune_settings.distill_temperature, prune_settings.distill_alpha)
            pruned, record = pruned_model(model, *scores, level)
            recovered = recover(pruned, bundle, tasks, folder, prune_settings, distiller)
            details = {"fraction_pruned": level, "structure_before": structure(model.backbone), "structure": record,
                       "recovery_steps": settings.recovery_steps}
        student = load_bundle(recovered, "cpu")[0]                    # read back from the files
        engine = TorchEngine(student, "cpu")
        metrics = scorer.metrics(engine)
        trial = Trial(label, [], metrics, scorer.drops(base, metrics), budget)
        trials.append(trial.as_dict() | {"method": method})
        log.info("auto %-28s %s", label, "  ".join(f"{t} {d:+.2f}%" for t, d in trial.drops.items())
                 + ("  fits" if trial.fits else f"  violates ({', '.join(trial.violators)})"))
        kind = "torch-layers" if method == "layers" else "torch-pruned"
        entry = {"trial": trial, "engine": engine, "details": {**details, "setting": label}, "runs_on": "torch",
                 "bundle": recovered, "graph_dir": None, "bound_by": None}
        if not trial.fits:
            failed[method] = f"{trial.violators[0]} {trial.drops[trial.violators[0]]:+.2f}% at {label}"
            over[f"{label} (over budget)"] = entry
            for name in (kind, "onnx-int8-" + kind.split("-")[1]):       # a stronger try failed: bound by it
                if name in found:
                    found[name]["bound_by"] = trial.violators[0]
            clock.end(began)
            continue
        found[kind] = entry
        int8, int8_trials, bound = int8_search(student, folder / "int8")
        trials += [t.as_dict() | {"name": f"{label} + int8 {t.name}", "method": f"{method}+int8"} for t in int8_trials]
        if int8 is not None:
            found["onnx-int8-" + kind.split("-")[1]] = {**int8, "details": {**details, **int8["details"],
                                                                              "setting": f"{label} + int8"},
                                                       "runs_on": "onnx-int8", "bundle": recovered,
                                                       "graph_dir": folder / "int8", "bound_by": bound}
        log.info("auto %s took %.0f s", label, clock.end(began))
    return found, over, trials, skipped


def verdict(report: dict, settings: AutoSettings) -> dict:
    """{"target_speedup", "reached": bool, "lines": [...], "stopped_by": [...]}: does the chosen model reach
    `target_speedup` x torch fp32 with every task within the budget on dev and test_factor x budget on test,
    and if not, per measured model what stops it (module docstring). `report`: `mtlm.compress`'s report
    ("engines" with "ratio_vs_torch", "fits", "dev_drop_pct"; "tasks"; "cpu_flags"; "skipped")."""
    flags, budget, target = set(report.get("cpu_flags", [])), report["budget_pct"], settings.target_speedup
    chosen = report["model"]
    ratio = report["engines"][chosen]["ratio_vs_torch"]
    test_over = {n: t["test_drop_pct"] for n, t in report["tasks"].items()
                 if t.get("test_drop_pct", 0.0) > settings.test_factor * budget + 1e-9}
    reached = ratio >= target and not test_over
    lines = [f"goal: >= {target:g}x torch fp32, every task within {budget:g}% on dev and "
             f"{settings.test_factor * budget:g}% on test: " + ("reached" if reached else "not reached")
             + f" ({chosen} {ratio:.2f}x)"]
    stopped: list[str] = []
    for name, e in report["engines"].items():
        if name == "torch":
            continue
        drops = ", ".join(f"{t} {d:+.2f}%" for t, d in e.get("dev_drop_pct", {}).items())
        if not e.get("fits", True):
            worst = max(e["dev_drop_pct"], key=e["dev_drop_pct"].get)
            why = f"task {worst} is over the budget on dev"
            stopped.append(f"task {worst}")
        elif e["ratio_vs_torch"] < target:
            why = f"fits, but {e['ratio_vs_torch']:.2f}x < {target:g}x"
            if e.get("runs_on", name).startswith("onnx-int8") and not flags & set(INT8_FLAGS):
                why += " (int8 runs on AVX2 here: no AVX512-VNNI / AVX-VNNI / AMX-INT8)"
                stopped.append("no VNNI / AMX int8 instructions")
            else:
                stopped.append(f"{name}'s speed")
        else:
            why = "fits and is fast enough"
        lines.append(f"{name}: {e['ratio_vs_torch']:.2f}x, dev drops {drops or '-'}: {why}")
    if not flags & set(BF16_FLAGS):
        lines.append("bf16: not tried: no AVX512-BF16 / AMX-BF16 (emulated bf16 is several times slower)")
        stopped.append("no native bf16")
    for task, drop in test_over.items():
        lines.append(f"{chosen}: task {task} drops {drop:.2f}% on test (> {settings.test_factor * budget:g}%)")
        stopped.append(f"task {task} on test")
    lines += [f"skipped {s['try']}: {s['reason']}" for s in report.get("skipped", [])]
    return {"target_speedup": target, "reached": reached, "lines": lines,
            "stopped_by": [] if reached else list(dict.fromkeys(stopped))}
