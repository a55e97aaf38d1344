"""`mtlm compress RUN --method prune --budget X`: the strongest structured pruning of heads and FFN neurons
that keeps EVERY task within the budget on dev, after recovery fine-tuning (`mtlm.compress` writes the run).

1. Importance of every head and FFN neuron, summed over all tasks (`mtlm.pruning.importance`: Michel et al.
   2019 for heads, first-order Taylor scores for neurons, each task's scores normalised), on each task's
   stored train rows (the first `PruneSettings.importance_rows`; a task without train rows: its dev rows).
2. For a level f of the ladder (`PruneSettings.levels`), the fraction f of all heads and the fraction f of
   all FFN neurons with the lowest importance are removed (`mtlm.pruning.plan` / `prune_backbone`).
3. Recovery: `mtlm.train.fit` on the parent's own recipe and stored rows (as `mtlm distill` trains a
   student: `mtlm.distill.run.teacher_rows`), `recovery_steps` optimizer steps at `recovery_lr`, the pruned model put in place by
   fit's `model_fn` hook, distilling the unpruned parent through fit's loss hook (`mtlm.distill`:
   (1 - a) x task loss + a x the head type's distillation term at temperature T; a = `distill_alpha`, 0 for
   the plain task loss). One hook serves every level, so the parent's outputs are computed once per row.
4. The recovered bundle, read back from its files, is scored on dev: a level fits when every task's
   relative drop is within the budget. The ladder is searched by bisection (strongest first; it assumes that
   pruning more never helps, and each returned level has itself been measured within budget). The task that
   bound the choice is the worst violator of the weakest rejected level stronger than it.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from mtlm.callbacks import Callback
from mtlm.pruning import importance, plan, prune_backbone, structure
from mtlm.quantize import Trial

log = logging.getLogger("mtlm")


@dataclass
class PruneSettings:
    """levels: fractions of heads and of FFN neurons pruned, tried strongest first; recovery_steps /
    recovery_lr / recovery_batch_size: the recovery fine-tuning (batch size default: the recipe's);
    importance_rows: train rows per task the importance is computed on; distill_alpha / distill_temperature:
    the distillation from the parent during recovery (`mtlm.distill.distillation_loss`; alpha 0: none)."""

    levels: tuple[float, ...] = (0.5, 0.4, 0.3, 0.2, 0.1)
    recovery_steps: int = 100
    recovery_lr: float = 5e-5
    recovery_batch_size: int | None = None
    importance_rows: int = 256
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0

    def check(self) -> list[str]:
        """Problems with the settings, one line each (empty: fine)."""
        bad = [f for f in self.levels if not 0 < f < 1]
        return ([f"prune levels must be fractions in (0, 1), got {bad}"] if bad or not self.levels else []) + \
            ([f"recovery steps must be 0 or more, got {self.recovery_steps}"] if self.recovery_steps < 0 else []) + \
            ([f"importance rows must be positive, got {self.importance_rows}"] if self.importance_rows <= 0 else []) + \
            ([f"distill alpha must be in [0, 1], got {self.distill_alpha}"] if not 0 <= self.distill_alpha <= 1 else [])


class SameLabels(Callback):
    """Refuses (at train begin) a recovery run whose tasks were fitted to other labels than the parent's:
    its heads' outputs would mean other classes."""

    def __init__(self, parent_tasks: dict) -> None:
        self.parent = parent_tasks

    def on_train_begin(self, run) -> None:
        for name, task in run.tasks.items():
            want = getattr(self.parent.get(name), "labels", None)
            if want is not None and list(getattr(task, "labels", None) or []) != list(want):
                raise ValueError(f"recovery: task {name}'s labels now read {getattr(task, 'labels', None)}, the "
                                 f"parent was trained with {want} (the data changed?)")


def importance_features(bundle: Path, tasks: dict, tokenizer, max_length: int, rows: int) -> dict[str, list[dict]]:
    """{task: encoded features of its first `rows` stored train rows (dev rows for a task without train
    rows)}. Raises ContractError when the stored rows cannot be read."""
    from mtlm.engine_check import dev_features
    train = dev_features(bundle, tasks, tokenizer, max_length, rows=rows, split="train")
    missing = [n for n in tasks if not train.get(n)]
    if missing:
        train.update(dev_features(bundle, {n: tasks[n] for n in missing}, tokenizer, max_length, rows=rows))
    return train


def recovery_recipe(bundle: Path, tasks: dict, output_dir: Path, settings: PruneSettings):
    """The parent's recipe (bundle/recipe.yaml) set up for recovery on the parent's stored rows (written to
    output_dir/rows by `mtlm.distill.run.teacher_rows`, digests checked; the student recipe of `mtlm distill`),
    output in `output_dir`, `recovery_steps` steps at `recovery_lr`, one evaluation at the end, no early
    stopping. Raises RecipeError, ContractError, DistillError (no stored contract)."""
    from mtlm.distill.run import student_recipe, teacher_rows

    raw = yaml.safe_load((bundle / "recipe.yaml").read_text(encoding="utf-8"))
    run_dir = bundle.parent if bundle.name == "model" else bundle
    files = teacher_rows(run_dir, tasks, output_dir / "rows")
    steps = max(1, settings.recovery_steps)
    overrides = [f"train.max_steps={steps}", "train.epochs=null", f"train.eval_every={steps}",
                 f"train.checkpoint_every={steps}", "train.keep_checkpoints=1", "train.early_stopping_patience=null",
                 f"train.lr={settings.recovery_lr}", "train.warmup_ratio=0.1"]
    if settings.recovery_batch_size:
        overrides.append(f"train.batch_size={settings.recovery_batch_size}")
    return student_recipe(raw, raw["name"], raw["backbone"], files, output_dir, overrides)


def recover(model, bundle: Path, tasks: dict, work: Path, settings: PruneSettings, distiller=None) -> Path:
    """Fine-tune the pruned `model` (a MultiTaskModel; trained in place) on the parent bundle's recipe and
    data through `mtlm.train.fit` (`model_fn` puts it in place of the freshly built model; `distiller`, a
    `mtlm.distill.Distiller` of the parent, is fit's loss hook and a callback). Returns the recovered bundle
    folder (work/model).
    With recovery_steps 0 the pruned model is saved as it is."""
    from mtlm.checkpoint import save_bundle
    from mtlm.train import fit

    recipe = recovery_recipe(bundle, tasks, work, settings)
    if settings.recovery_steps == 0:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(bundle / "backbone")
        return save_bundle(model, tokenizer, tasks, recipe, work / "model")
    fit(recipe, progress=False, model_fn=lambda built: model, loss_fn=distiller,
        callbacks=[SameLabels(tasks)] + ([distiller] if distiller is not None else []))
    return work / "model"


def pruned_model(model, heads: list, neurons: list, fraction: float):
    """A deep copy of `model` with the `fraction` of heads and of FFN neurons of lowest importance pruned ->
    (the copy, its structure record)."""
    pruned = copy.deepcopy(model)
    record = prune_backbone(pruned.backbone, plan(heads, fraction), plan(neurons, fraction))
    return pruned, record


def search_pruning(model, bundle: Path, tasks: dict, tokenizer, meta: dict, scorer, base: dict, budget: float,
                   settings: PruneSettings, work: Path):
    """The bisection of the module docstring. `scorer` (`mtlm.compress.Scorer`) scores engines on dev, `base`
    is the parent's dev metric per task. Returns (the chosen {"trial", "bundle", "details"} or None when no
    level fits, every Trial tried, the task that bound the choice or None)."""
    from mtlm.checkpoint import load_bundle
    from mtlm.distill import distillation_loss
    from mtlm.engine import TorchEngine

    features = importance_features(bundle, tasks, tokenizer, int(meta["max_length"]), settings.importance_rows)
    heads, neurons = importance(model, tasks, features, tokenizer.pad_token_id)
    before = structure(model.backbone)
    # labels are checked by SameLabels (the Distiller's own check also compares tuned multilabel thresholds)
    distiller = (distillation_loss(model, settings.distill_temperature, settings.distill_alpha)
                 if settings.distill_alpha > 0 and settings.recovery_steps > 0 else None)
    levels = sorted(set(settings.levels), reverse=True)
    trials: dict[int, Trial] = {}
    kept: dict[int, dict] = {}
    lo, hi = 0, len(levels) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        fraction = levels[mid]
        pruned, record = pruned_model(model, heads, neurons, fraction)
        folder = recover(pruned, bundle, tasks, work / f"level-{mid}", settings, distiller)
        metrics = scorer.metrics(TorchEngine(load_bundle(folder, "cpu")[0], "cpu"))   # read back from the files
        name = (f"prune {fraction:.0%}: heads {sum(before['heads'])}->{sum(record['heads'])}, "
                f"FFN {sum(before['intermediate_size'])}->{sum(record['intermediate_size'])}")
        trial = trials[mid] = Trial(name, [], metrics, scorer.drops(base, metrics), budget)
        log.info("%-44s %s", name, "  ".join(f"{t} {d:+.2f}%" for t, d in trial.drops.items())
                 + ("  fits" if trial.fits else f"  violates ({', '.join(trial.violators)})"))
        kept[mid] = {"trial": trial, "bundle": folder,
                     "details": {"fraction_pruned": fraction, "structure_before": before, "structure": record,
                                 "importance": "heads: Michel et al. 2019 |dL/d gate|; FFN: first-order Taylor; "
                                               "summed over tasks, each normalised",
                                 "importance_rows": {n: len(f) for n, f in features.items()},
                                 "recovery": {**asdict(settings), "levels": list(levels),
                                              "distillation": distiller is not None}}}
        if trial.fits:
            hi = mid - 1
        else:
            lo = mid + 1
    fitting = [i for i, t in trials.items() if t.fits]
    tried = [trials[i].as_dict() | {"fraction_pruned": levels[i]} for i in sorted(trials)]
    if not fitting:
        weakest = trials[max(trials)]
        return None, tried, weakest.violators[0] if weakest.violators else None
    best = min(fitting)
    stronger = [i for i in trials if i < best and not trials[i].fits]
    bound = trials[max(stronger)].violators[0] if stronger else None
    return kept[best], tried, bound
