"""`mtlm compress RUN --method layers --budget X`: the fewest encoder layers that keep EVERY task within the
budget on dev, after recovery training with distillation from the parent (`mtlm.compress` writes the run).

For a layer count N and a choice of layers (Sajjad et al. 2020/2023, "On the Effect of Dropping Layers of
Pre-trained Transformer Models": `top`, dropping the top layers, and `alternate`, keeping layers spread over
the stack; `mtlm.distill.layers`), a student of N of the parent's own layers (its embeddings and heads too)
is trained `recovery_steps` steps on the parent's recipe and stored rows through `mtlm.distill.run`, with
the parent as teacher (`mtlm.distill`: (1 - alpha) x task loss + alpha x the head type's distillation term
at temperature T), one teacher-output cache shared by every try. The recovered bundle, read back from its
files, is scored on dev; it fits when every task's relative drop is within the budget.

Search: bisection over N in 1..L-1 for the smallest N where some choice fits (the choices tried in order at
each N until one fits). It assumes fewer layers never help; every returned model has itself been measured
within budget, and `mtlm.compress` scores the written files once more. The task that bound the choice is
the worst violator of the best try at the largest N below the chosen one that was tried and failed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mtlm.distill.layers import STRATEGIES, layer_count
from mtlm.quantize import Trial

log = logging.getLogger("mtlm")


@dataclass
class LayerSettings:
    """strategies: layer choices tried at each N, in order (`mtlm.distill.layers.STRATEGIES`);
    recovery_steps: optimizer steps of each try's recovery training (> 0; small, so a CPU manages);
    alpha / temperature: the distillation from the parent during recovery (alpha 0: hard labels only);
    overrides: more `key.path=value` settings of the recovery recipe (e.g. train.lr=5e-5)."""

    strategies: tuple[str, ...] = ("top", "alternate")
    recovery_steps: int = 100
    alpha: float = 0.5
    temperature: float = 2.0
    overrides: tuple[str, ...] = field(default_factory=tuple)

    def check(self) -> list[str]:
        """Problems with the settings, one line each (empty: fine)."""
        bad = [s for s in self.strategies if s not in STRATEGIES]
        return ([f"layer choices must be among {', '.join(STRATEGIES)}, got {bad or 'none'}"]
                if bad or not self.strategies else []) + \
            ([f"recovery steps must be 1 or more, got {self.recovery_steps}"] if self.recovery_steps < 1 else []) + \
            ([f"distill alpha must be in [0, 1], got {self.alpha}"] if not 0 <= self.alpha <= 1 else []) + \
            ([f"distill temperature must be > 0, got {self.temperature}"] if not self.temperature > 0 else [])

    def recipe_overrides(self, strategy: str) -> list[str]:
        steps = self.recovery_steps
        return [f"distill.layer_choice={strategy}", f"distill.alpha={self.alpha}",
                f"distill.temperature={self.temperature}", f"train.max_steps={steps}", "train.epochs=null",
                f"train.eval_every={steps}", f"train.checkpoint_every={steps}", "train.early_stopping_patience=null",
                *self.overrides]


def search_layers(model, parent: Path, scorer, base: dict, budget: float, settings: LayerSettings, work: Path):
    """The bisection of the module docstring on parent run `parent` (its loaded `model`: the teacher).
    `scorer` (`mtlm.compress.Scorer`) scores engines on dev; `base`: the parent's dev metric per task.
    Returns (the chosen {"trial", "bundle", "details"} or None when nothing fits, every try as a dict, the
    task that bound the choice or None). Raises LayerError for a backbone whose layers cannot be found."""
    from mtlm.checkpoint import load_bundle
    from mtlm.distill.run import distill_run
    from mtlm.distill.teacher import TeacherCache
    from mtlm.engine import TorchEngine

    total = layer_count(model.backbone)
    cache = TeacherCache(model)                  # the parent's outputs, computed once per row for every try
    tries: dict[int, list[tuple[Trial, dict]]] = {}
    lo, hi = 1, total - 1
    while lo <= hi:
        n = (lo + hi) // 2
        tries[n] = []
        for strategy in settings.strategies:
            out, _ = distill_run(parent, f"layers:{n}", settings.recipe_overrides(strategy), work / f"layers-{n}-{strategy}",
                                 progress=False, measure=False, cache=cache)
            student, *_ = load_bundle(out, "cpu")           # read back from the files
            metrics = scorer.metrics(TorchEngine(student, "cpu"))
            trial = Trial(f"layers {total}->{n} ({strategy})", [], metrics, scorer.drops(base, metrics), budget)
            log.info("%-28s %s", trial.name, "  ".join(f"{t} {d:+.2f}%" for t, d in trial.drops.items())
                     + ("  fits" if trial.fits else f"  violates ({', '.join(trial.violators)})"))
            kept = json.loads((out / "parent.json").read_text(encoding="utf-8"))["details"]["kept_layers"]
            tries[n].append((trial, {"bundle": out / "model", "details": {
                "layers": n, "teacher_layers": total, "layer_choice": strategy, "kept_layers": kept,
                "recovery": {**asdict(settings), "distillation": settings.alpha > 0}}}))
            if trial.fits:
                break
        if tries[n][-1][0].fits:
            hi = n - 1
        else:
            lo = n + 1
    tried = [t.as_dict() | {"layers": n, "layer_choice": d["details"]["layer_choice"]}
             for n in sorted(tries) for t, d in tries[n]]
    fitting = [n for n, ts in tries.items() if ts[-1][0].fits]
    if not fitting:
        return None, tried, _bound(tries[max(tries)])
    best = min(fitting)
    failed = [n for n in tries if n < best]
    bound = _bound(tries[max(failed)]) if failed else None
    trial, found = tries[best][-1]
    return {"trial": trial, **found}, tried, bound


def _bound(attempts: list[tuple[Trial, dict]]) -> str | None:
    """The worst violator of the try (at one N) that came closest to the budget."""
    trial = min((t for t, _ in attempts), key=lambda t: max(t.drops.values(), default=0.0))
    return trial.violators[0] if trial.violators else None
