"""Which dev evaluation is the best model: a scale-free score over tasks, and each task's own best.

The mean of raw selection metrics is not comparable across tasks: an MSE is unbounded and in the units of
its target, so with `metric: mse` one regression task would outweigh every other. The score here is the
mean over tasks of each task's *relative error reduction since the run's first dev evaluation*:

    gap_i(e) = |perfect_i - M_i(e)|          perfect_i = 0 for lower-is-better metrics (MSE), else 1
    r_i(e)   = (gap_i(first) - gap_i(e)) / gap_i(first)
    score(e) = mean_i r_i(e)                 0 at the first evaluation; 1 = every task perfect

r_i is the fraction of the first evaluation's distance to a perfect score that has been closed (for MSE:
1 - mse / mse_first), so it does not change when a metric is rescaled (a target in cents instead of euros)
and every task counts the same. It relies on the task-type contract (`mtlm.tasks.base.TaskType`): metrics
in `lower_is_better` are errors >= 0 with 0 perfect; every other metric is at most 1, with 1 perfect.
For metrics with 1 perfect the divisor is at least MIN_GAP, so a task that starts (nearly) perfect does
not divide by zero; an error that starts at exactly 0 uses MIN_GAP too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mtlm.tasks import default_metric

MIN_GAP = 0.01


def _gap(value: float, lower_is_better: bool) -> float:
    return abs(value) if lower_is_better else abs(1.0 - value)


@dataclass
class Selection:
    """The running model selection of one training run (its state is part of every checkpoint).

    `update(step, metrics)` scores a dev evaluation ({"task/metric": value}) and says whether it is the best
    so far; `best_step` / `best_score` name the model kept, `task_best[task]` each task's own best
    {"metric", "value", "step"} (which may be another step than the kept model's)."""

    metrics: dict[str, str]                    # task -> its selection metric
    lower: dict[str, bool]                     # task -> whether smaller is better
    reference: dict[str, float] = field(default_factory=dict)   # task -> gap at its first evaluation
    best_step: int | None = None
    best_score: float | None = None
    task_best: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def for_tasks(cls, tasks: dict) -> "Selection":
        return cls({n: default_metric(t) for n, t in tasks.items()},
                   {n: default_metric(t) in t.lower_is_better for n, t in tasks.items()})

    def score(self, metrics: dict[str, float]) -> float | None:
        """The scale-free score of one evaluation (module docstring); None when no task was evaluated.
        The first evaluation of a task fixes its reference."""
        parts = []
        for name, metric in self.metrics.items():
            value = metrics.get(f"{name}/{metric}")
            if value is None:
                continue
            gap = _gap(value, self.lower[name])
            ref = self.reference.setdefault(name, gap)
            # an error's own first value is its scale (any unit); a bounded metric's gap is floored
            scale = ref if self.lower[name] and ref > 0 else max(ref, MIN_GAP)
            parts.append((ref - gap) / scale)
        return sum(parts) / len(parts) if parts else None

    def update(self, step: int, metrics: dict[str, float]) -> tuple[float | None, bool]:
        """(score, improved) for the evaluation at `step`; records it as best when improved. With no task
        evaluated (no dev split anywhere) every evaluation counts as improved: the latest model is kept."""
        for name, metric in self.metrics.items():
            value = metrics.get(f"{name}/{metric}")
            if value is None:
                continue
            best = self.task_best.get(name)
            if best is None or (value < best["value"] if self.lower[name] else value > best["value"]):
                self.task_best[name] = {"metric": metric, "value": value, "step": step}
        score = self.score(metrics)
        improved = score is None or self.best_score is None or score > self.best_score
        if improved:
            self.best_step, self.best_score = step, score
        return score, improved

    def state_dict(self) -> dict:
        return {"reference": self.reference, "best_step": self.best_step, "best_score": self.best_score,
                "task_best": self.task_best}

    def load_state_dict(self, state: dict) -> None:
        self.reference = dict(state.get("reference", {}))
        self.best_step, self.best_score = state.get("best_step"), state.get("best_score")
        self.task_best = dict(state.get("task_best", {}))
