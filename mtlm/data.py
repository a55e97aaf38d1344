"""Per-task data: read and check rows, make the missing splits, encode, and feed micro-batches.

`prepare_rows` reads every task's sources and reports all problems at once (RecipeError);
`encode_rows` tokenizes; `TaskBatches` yields length-grouped index batches per task (resumable);
`TaskSampler` decides which task each micro-batch serves; `collate` pads one micro-batch (dynamic padding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor

from mtlm.config import Recipe, RecipeError
from mtlm.sources import DataError, Rows, read_source
from mtlm.splits import split_rows, subsample
from mtlm.tasks.base import pad_inputs

SPLITS = ("train", "dev", "test")
MAX_ROW_ERRORS = 10        # bad rows listed per file before "... and N more"


@dataclass
class PreparedData:
    rows: dict[str, dict[str, Rows]]                            # task -> split -> rows (labelled rows only)
    notes: list[str] = field(default_factory=list)              # skipped-row counts, split sizes
    groups: dict = field(default_factory=dict)                  # joint group -> mtlm.joint.JointRows

    def sources(self) -> dict[str, list[str]]:
        """What the sampler draws from: each task alone, except tasks in a joint group, which come together
        as one source named after the group (in recipe order)."""
        grouped = {t: g for g, joint in self.groups.items() for t in joint.tasks}
        out: dict[str, list[str]] = {}
        for name in self.rows:
            if name not in grouped:
                out[name] = [name]
            elif grouped[name] not in out:
                out[grouped[name]] = list(self.groups[grouped[name]].tasks)
        return out


INPUT_ROLES = ("text", "text_pair", "tokens", "question", "context", "choices")


def _row_key(task, row: dict) -> tuple:
    """The input of a row, used to de-duplicate before splitting (so no text lands in two splits)."""
    cols = task.columns()
    return tuple(str([row.get(c) for c in cols[r]] if isinstance(cols[r], list) else row.get(cols[r]))
                 for r in INPUT_ROLES if r in cols)


def _class_role(task) -> str | None:
    """The role holding a class label to stratify splits by: "label", unless the type says its label is
    no class (multiple choice: the label is a choice index or text)."""
    return getattr(task, "class_role", "label" if "label" in task.roles else None)


def _strat_label(task, row: dict):
    col = task.columns().get(_class_role(task) or "")
    return str(row.get(col)) if col is not None else None


def _check_rows(task, rows: Rows, prefix: str, problems: list[str], notes: list[str]) -> Rows | None:
    """Columns present, then every row well formed. Returns the usable rows, or None on errors."""
    cols = task.columns()
    missing = [(role, c) for role, col in cols.items() for c in ([col] if isinstance(col, str) else col)
               if c not in rows.columns and (task.roles[role] or role in task.cfg.columns)]
    for role, col in missing:
        problems.append(f"{prefix.rsplit('.data', 1)[0]}.columns.{role}: column '{col}' not in {rows.origin} "
                        f"(columns: {', '.join(rows.columns)})")
    if missing:
        return None
    bad: list[tuple[int, list]] = []
    for i, record in enumerate(rows.records):
        found = task.check_row(record)
        if found:
            bad.append((i, found))
    if not bad:
        return rows
    if task.cfg.on_bad_rows == "skip":
        notes.append(f"{task.name}: skipped {len(bad)} bad row(s) of {len(rows.records)} in {rows.origin}")
        skip = {i for i, _ in bad}
        return rows.select([i for i in range(len(rows.records)) if i not in skip])
    report_bad_rows(rows, bad, problems, f"or set tasks.{task.name}.on_bad_rows: skip")
    return None


def report_bad_rows(rows: Rows, bad: list[tuple[int, list[tuple[str, str]]]], problems: list[str], hint: str) -> None:
    """Append "<file>, line N, field 'col': problem" for the first MAX_ROW_ERRORS bad rows (index, [(column,
    problem)]), then a count of the rest with `hint`."""
    for i, found in bad[:MAX_ROW_ERRORS]:
        where = f"{rows.origin}, {rows.line_kind} {rows.lines[i]}"
        problems.extend(f"{where}, field '{col}': {msg}" for col, msg in found)
    if len(bad) > MAX_ROW_ERRORS:
        problems.append(f"{rows.origin}: ... and {len(bad) - MAX_ROW_ERRORS} more bad rows ({hint})")


def _keep_rare_classes_in_train(task, splits: dict[str, Rows], made: list[str]) -> None:
    """Rows of a made dev/test split whose class has no train row go back to train (a class too rare to
    split would otherwise fail "label not seen in train" on a split the user never wrote)."""
    seen = {_strat_label(task, r) for r in splits["train"].records}
    for split in made:
        rows = splits[split]
        back = [i for i, r in enumerate(rows.records) if _strat_label(task, r) not in seen]
        if back:
            skip = set(back)
            moved = rows.select(back)
            train = splits["train"]
            splits["train"] = Rows(train.origin, train.columns, train.records + moved.records,
                                   train.lines + moved.lines, train.line_kind)
            splits[split] = rows.select([i for i in range(len(rows.records)) if i not in skip])
            seen |= {_strat_label(task, r) for r in moved.records}


def read_splits(recipe: Recipe, dcfg, prefix: str, problems: list[str], check, skip_bad: bool = False,
                notes: list[str] | None = None) -> dict[str, Rows]:
    """Read every split a data block names. `check(raw, where)` validates a split's rows (where: e.g.
    "tasks.topic.data.dev") and returns the usable Rows or None; unreadable sources are appended to
    `problems` as "<prefix>.<split>: <reason>" and left out. `skip_bad` (on_bad_rows: skip): lines that
    cannot be parsed are left out too, with a line in `notes` counting them and naming the first ones."""
    splits: dict[str, Rows] = {}
    for split in SPLITS:
        spec = getattr(dcfg, split)
        if spec is None:
            continue
        try:
            raw = read_source(spec, recipe.base_dir, skip_bad_lines=skip_bad)
        except DataError as e:
            problems.append(f"{prefix}.{split}: {e}")
            continue
        if raw.skipped and notes is not None:
            shown = "; ".join(raw.skipped[:MAX_ROW_ERRORS]) + ("; ..." if len(raw.skipped) > MAX_ROW_ERRORS else "")
            notes.append(f"{prefix}.{split}: skipped {len(raw.skipped)} unreadable line(s) of {raw.origin} ({shown})")
        checked = check(raw, f"{prefix}.{split}")
        if checked is not None:
            splits[split] = checked
    return splits


def prepare_rows(recipe: Recipe, tasks: dict) -> PreparedData:
    """Read, check, split and cap every task's rows, then fit each task (label maps) on its train rows.

    Tasks with identical data blocks and inputs form a joint group (`mtlm.joint`): read and split once, rows
    may lack some tasks' labels. Raises RecipeError listing every problem of every task (unreadable files, missing
    columns, malformed rows with file/line/field, labels in dev/test unseen in train)."""
    from mtlm.joint import find_groups, prepare_group

    problems: list[str] = []
    out = PreparedData(rows={})
    seed = recipe.train.seed
    groups = find_groups(recipe, tasks, out.notes)          # tasks that share one data block: joint batches
    group_of = {t: g for g, names in groups.items() for t in names}
    for name, task in tasks.items():
        if name in group_of:         # a joint group is read once, where its first task stands
            group = group_of[name]
            if name == groups[group][0]:
                joint = prepare_group(recipe, group, {n: tasks[n] for n in groups[group]}, problems, out.notes)
                if joint is not None:
                    out.groups[group] = joint
                    out.rows.update({n: joint.task_rows(n) for n in groups[group]})
            continue
        dcfg, prefix = task.cfg.data, f"tasks.{name}.data"
        splits = read_splits(recipe, dcfg, prefix, problems,
                             lambda raw, where: _check_rows(task, raw, where, problems, out.notes),
                             skip_bad=task.cfg.on_bad_rows == "skip", notes=out.notes)
        if "train" not in splits:
            continue
        wanted = {s: f for s, f in dcfg.split.items() if getattr(dcfg, s) is None and f > 0}
        if wanted:
            made = split_rows(splits["train"], key=lambda r, t=task: _row_key(t, r),
                              label=(lambda r, t=task: _strat_label(t, r)) if _class_role(task) else None,
                              fractions=wanted, seed=seed)
            splits.update(made)
            if _class_role(task):
                _keep_rare_classes_in_train(task, splits, list(wanted))
        for split, n in dcfg.limit.items():
            if split in splits:
                splits[split] = subsample(splits[split], n, seed)
        if not splits["train"].records:
            problems.append(f"{prefix}.train: no usable rows in {splits['train'].origin}")
            continue
        task.fit(splits["train"].records)
        for split in ("dev", "test"):
            if split in splits:
                problems.extend(f"{prefix}.{split}: {p}" for p in task.check_eval_rows(splits[split].records))
        out.rows[name] = splits
        out.notes.append(f"{name}: " + ", ".join(f"{s} {len(r.records)}" for s, r in splits.items()))
    if problems:
        raise RecipeError(problems)
    out.rows = {n: out.rows[n] for n in tasks if n in out.rows}     # recipe order
    return out


def encode_rows(tasks: dict, rows: dict[str, dict[str, Rows]], tokenizer, max_length: int
                ) -> dict[str, dict[str, list[dict]]]:
    """task -> split -> unpadded feature dicts (see mtlm.tasks.base)."""
    return {name: {split: tasks[name].encode(r.records, tokenizer, max_length) for split, r in splits.items()}
            for name, splits in rows.items()}


def collate(task, features: list[dict], pad_token_id: int) -> dict[str, Tensor]:
    """Pad one micro-batch to its longest member and add the task's label tensors."""
    batch = pad_inputs(features, pad_token_id)
    batch.update(task.collate_labels(features, batch["input_ids"].shape[1]))
    return batch


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Index batches over examples sorted by length (longest first), for evaluation and inference."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class TaskBatches:
    """Endless, seeded, resumable stream of global index batches for one task's train split.

    Each epoch is a permutation; with `group_by_length`, the permutation is cut into mega-batches of
    50 global batches, each sorted by length, so a micro-batch holds similar lengths (less padding), as
    the Hugging Face `LengthGroupedSampler` does. Batch order is shuffled again. A global batch holds
    batch_size * world_size examples; process `rank` takes every world_size-th of them."""

    MEGA = 50

    def __init__(self, lengths: list[int], global_batch: int, seed: int, group_by_length: bool = True):
        self.lengths, self.global_batch, self.seed = lengths, global_batch, seed
        self.group_by_length = group_by_length
        self.epoch, self.cursor = 0, 0
        self._batches = self._epoch_batches(0)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self.lengths)).tolist()
        if self.group_by_length:
            mega = self.global_batch * self.MEGA
            perm = [i for k in range(0, len(perm), mega)
                    for i in sorted(perm[k:k + mega], key=lambda j: -self.lengths[j])]
        batches = [perm[k:k + self.global_batch] for k in range(0, len(perm), self.global_batch)]
        rng.shuffle(batches)
        return batches

    def next(self) -> list[int]:
        if self.cursor >= len(self._batches):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._batches = self._epoch_batches(self.epoch)
        batch = self._batches[self.cursor]
        self.cursor += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._batches = self._epoch_batches(self.epoch)


ANNEAL_END = 0.2     # annealed sampling's final exponent (Stickland & Murray 2019: alpha = 1 - 0.8 * progress)


def task_probabilities(sizes: dict[str, int], mode: str, temperature: float, progress: float = 0.0
                       ) -> dict[str, float]:
    """Task sampling distribution: proportional p_i ∝ n_i; temperature p_i ∝ n_i^(1/T)
    (Arivazhagan et al. 2019); round_robin (uniform in expectation, cycled in order); annealed
    p_i ∝ n_i^alpha with alpha = 1 - (1 - ANNEAL_END) * progress, from proportional at the start of training
    (progress 0) towards uniform at its end (progress 1) (Stickland & Murray 2019, "BERT and PALs", who
    anneal per epoch; here per micro-batch). Raises ValueError for an unknown mode."""
    if mode == "round_robin":
        weights = {n: 1.0 for n in sizes}
    elif mode == "temperature":
        weights = {n: s ** (1.0 / temperature) for n, s in sizes.items()}
    elif mode == "annealed":
        alpha = 1.0 - (1.0 - ANNEAL_END) * min(max(progress, 0.0), 1.0)
        weights = {n: float(s) ** alpha for n, s in sizes.items()}
    elif mode == "proportional":
        weights = {n: float(s) for n, s in sizes.items()}
    else:
        raise ValueError(f"unknown sampling mode {mode!r}")
    total = sum(weights.values())
    return {n: w / total for n, w in weights.items()}


def mean_probabilities(sizes: dict[str, int], mode: str, temperature: float) -> dict[str, float]:
    """Each source's share of the draws over a whole run (annealed: the mean over its schedule)."""
    if mode != "annealed":
        return task_probabilities(sizes, mode, temperature)
    grid = [task_probabilities(sizes, mode, temperature, (i + 0.5) / 100) for i in range(100)]
    return {n: sum(p[n] for p in grid) / len(grid) for n in sizes}


class TaskSampler:
    """Picks the source (task or joint group) of each micro-batch. Seeded; the same sequence on every
    process; resumable. `total`: the number of draws in the run (annealed sampling's schedule length)."""

    def __init__(self, sizes: dict[str, int], mode: str, temperature: float, seed: int,
                 total: int | None = None):
        self.names, self.mode, self.sizes, self.temperature = list(sizes), mode, dict(sizes), temperature
        self.total = total
        self.probs = task_probabilities(sizes, mode, temperature)
        self._p = np.array([self.probs[n] for n in self.names])
        self.rng = np.random.default_rng(seed)
        self.count = 0

    def next(self) -> str:
        self.count += 1
        if self.mode == "round_robin":
            return self.names[(self.count - 1) % len(self.names)]
        p = self._p
        if self.mode == "annealed":     # without a known run length the schedule stays at its start
            progress = (self.count - 1) / (self.total - 1) if self.total and self.total > 1 else 0.0
            probs = task_probabilities(self.sizes, self.mode, self.temperature, progress)
            p = np.array([probs[n] for n in self.names])
        return self.names[int(self.rng.choice(len(self.names), p=p))]

    def state_dict(self) -> dict:
        return {"count": self.count, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])
        self.rng.bit_generator.state = state["rng"]


def steps_for_epochs(epochs: float, sizes: dict[str, int], global_batch: int) -> int:
    """Optimizer steps that cover `epochs` passes over all tasks' train rows (one micro-batch per step
    and process when grad_accum is 1)."""
    return max(1, math.ceil(epochs * sum(sizes.values()) / global_batch))
