"""Dynamic int8 quantisation of an exported graph with onnxruntime's quantiser, and the search for the
strongest setting that keeps every task within an accuracy budget.

Quantisation is onnxruntime's dynamic quantisation (`onnxruntime.quantization.quantize_dynamic`): weights
int8 per output channel (per-tensor drops MiniLM's embedding cosine to ~0.95, /work/shared/ENGINES.md),
activations quantised per batch at run time. What can stay fp32 is named by *groups* of graph nodes that
carry weights (`node_groups`): "embeddings" (the embedding tables' Gather nodes), "layer.N" (the MatMuls of
encoder layer N), "private.TASK" (a task's private top layers, `mtlm.private_layers`) and "head.TASK" (a task
head's MatMul / Gemm).

`search` walks a ladder from strongest to weakest and keeps the first setting within the budget for EVERY
task on dev (Trial.fits); a setting that violates it is never returned:
  1. every group int8;
  2. embeddings and heads fp32, every encoder layer int8;
  3. additionally the k most sensitive encoder layers fp32, k = 1 .. L-2, sensitivity of a layer being the
     largest relative drop over the tasks when that layer alone is int8 (measured only when step 2 fails);
  4. the least sensitive layer alone int8 (its sensitivity trial), when it fits.
The task that bound the result is the one that made the last rejected (stronger) setting fail.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger("mtlm")

WEIGHT_OPS = ("MatMul", "Gemm", "Gather")
# a shared layer: "/model/backbone/encoder/layer.N/..." from the backbone's forward, "/model/layer.N/..." when
# private layers run the stack in pieces; a task's private copy: "/model/<task>.<i>/..." (mtlm.private_layers)
LAYER = re.compile(r"^/model/(?:backbone/)?(?:encoder/)?layer\.(\d+)/|/encoder/layer\.(\d+)/")
PRIVATE = re.compile(r"^/model/([^/]+)\.\d+/")


def node_groups(path: Path) -> dict[str, list[str]]:
    """{group: names of the nodes of the graph at `path` whose weights it quantises}: "embeddings",
    "layer.0" .. "layer.L-1", "private.<task>" (a task's private top layers), "head.<task>" (nodes whose weight
    is a graph initializer), in graph order."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {i.name for i in model.graph.initializer}
    groups: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS or not any(i in weights for i in node.input):
            continue
        layer, private = LAYER.search(node.name), PRIVATE.search(node.name)
        if layer:
            group = f"layer.{layer.group(1) or layer.group(2)}"
        elif private:
            group = f"private.{private.group(1)}"
        elif "/embeddings/" in node.name:
            group = "embeddings"
        else:                                    # "/model/<task>/..." : a head
            group = "head." + node.name.strip("/").split("/")[1]
        groups.setdefault(group, []).append(node.name)
    return groups


def quantize_int8(source: Path, target: Path, exclude_nodes: list[str]) -> Path:
    """Write `source`'s graph quantised to dynamic int8 (per-channel QInt8 weights for MatMul / Gemm / Gather)
    to `target`, leaving `exclude_nodes` in fp32. Raises EngineError when onnxruntime is missing."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        from mtlm.engine import EngineError
        raise EngineError("int8 quantisation needs onnxruntime: pip install onnxruntime") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)        # the quantiser logs a line per tensor through the root logger
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=list(WEIGHT_OPS), nodes_to_exclude=list(exclude_nodes))
    finally:
        root.setLevel(level)
    return target


def relative_drop(before: float, after: float, lower_is_better: bool) -> float:
    """The relative worsening from `before` to `after` in percent (negative: it improved). A metric that was
    0 counts any worsening as an infinite drop."""
    worse = (after - before) if lower_is_better else (before - after)
    if before == 0:
        return 0.0 if worse <= 0 else float("inf")
    return 100.0 * worse / abs(before)


@dataclass
class Trial:
    """One setting tried: the groups kept fp32, the dev metric per task, its relative drop (%) per task,
    and whether every drop is within the budget."""

    name: str
    fp32_groups: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    drops: dict[str, float] = field(default_factory=dict)
    budget: float = 0.0

    @property
    def violators(self) -> list[str]:
        """Tasks whose drop exceeds the budget, worst first."""
        return sorted((t for t, d in self.drops.items() if d > self.budget + 1e-9), key=lambda t: -self.drops[t])

    @property
    def fits(self) -> bool:
        return bool(self.drops) and not self.violators

    def as_dict(self) -> dict:
        return {"name": self.name, "fp32_groups": self.fp32_groups, "dev_metrics": self.metrics,
                "dev_drop_pct": self.drops, "fits": self.fits, "violators": self.violators}


def search(groups: dict[str, list[str]], measure: Callable[[list[str]], tuple[dict[str, float], dict[str, float]]],
           budget: float) -> tuple[Trial | None, list[Trial], str | None]:
    """The strongest int8 setting within `budget` (% relative drop per task on dev) by the ladder in the
    module docstring. `measure(fp32_groups)` quantises with those groups kept fp32 and returns (dev metrics
    per task, relative drops per task). Returns (the chosen Trial or None when no setting fits, every Trial
    tried in order, the task that bound the choice: the worst violator of the last rejected setting, None
    when the strongest setting fit)."""
    layers = sorted((g for g in groups if g.startswith("layer.")), key=lambda g: int(g.split(".")[1]))
    others = [g for g in groups if not g.startswith("layer.")]
    trials: list[Trial] = []

    def attempt(name: str, fp32: list[str]) -> Trial:
        metrics, drops = measure(fp32)
        trial = Trial(name, fp32, metrics, drops, budget)
        trials.append(trial)
        log.info("int8 %-32s %s", name, "  ".join(f"{t} {d:+.2f}%" for t, d in drops.items())
                 + ("  fits" if trial.fits else f"  violates ({', '.join(trial.violators)})"))
        return trial

    def bound() -> str | None:
        rejected = [t for t in trials if not t.fits and t.violators]
        return rejected[-1].violators[0] if rejected else None

    if attempt("all int8", []).fits:
        return trials[-1], trials, None
    if not layers:
        return None, trials, bound()
    if others and attempt("encoder int8, embeddings+heads fp32", others).fits:
        return trials[-1], trials, bound()
    sensitivity = {}
    for layer in layers:                       # this layer alone int8
        alone = attempt(f"only {layer} int8", [g for g in groups if g != layer])
        sensitivity[layer] = max(alone.drops.values())
    ranked = sorted(layers, key=lambda g: (-sensitivity[g], -int(g.split(".")[1])))
    for k in range(1, len(layers) - 1):        # k = L-1 is the least sensitive layer's own trial above
        kept = ranked[:k]
        trial = attempt(f"{'+'.join(kept)} fp32", others + kept)
        if trial.fits:
            return trial, trials, bound()
    singles = [t for t in trials if t.name.startswith("only ") and t.fits]
    if singles:                                # weaker than every ladder step, still int8 somewhere
        best = min(singles, key=lambda t: max(t.drops.values()))
        return best, trials, bound()
    return None, trials, bound()
