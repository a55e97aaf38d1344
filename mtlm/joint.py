"""Jointly-labelled data: one data file feeds several tasks, and some rows lack some tasks' labels.

In the recipe, tasks whose `data` blocks are identical (the same train source - file, builtin or hub id -
and the same dev/test/split/limit; a YAML anchor keeps them so: `data: &reviews {...}` then
`data: *reviews`) and that read the same input columns form a *joint group*, keyed "<task>+<task>" in
recipe order; each names its own label column. Tasks that share a file but differ in those settings stay
separate tasks, as before (a note says so)::

    tasks:
      sentiment: {type: classification, data: &reviews {train: reviews.jsonl}, columns: {label: sentiment}}
      source:    {type: classification, data: *reviews, columns: {label: source}}

The group's rows are read, checked, de-duplicated and split once, so a row is in the same split for every
task. A row is *unlabelled* for a task when every one of that task's label columns is missing (absent key,
null, or an empty CSV cell); rows with no task's label are dropped. Unlabelled rows are never imputed: a
task's metrics use only its labelled rows, and each joint micro-batch runs the backbone once and computes
every task's loss on the rows that carry its label (`masked_losses`: the mean over labelled rows only, so
rows missing a label contribute nothing). The task sampler treats a group as one source, mixed with the
single-task sources.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mtlm.config import RecipeError
from mtlm.data import INPUT_ROLES, _row_key, collate, read_splits, report_bad_rows
from mtlm.sources import Rows
from mtlm.splits import split_rows, subsample
from mtlm.tasks.base import INPUT_KEYS, pad_inputs

# Task types whose examples are one backbone row each, with one feature per data row: they can share a
# micro-batch. (Extractive QA makes several windows per row; multiple choice one backbone row per choice.)
JOINABLE_TYPES = ("classification", "multilabel", "regression", "token_classification")


def label_columns(task) -> list[str]:
    """The columns holding a task's targets: every role that is not an input role (mtlm.data.INPUT_ROLES)."""
    return [col for role, col in task.columns().items() if role not in INPUT_ROLES]


def input_columns(task) -> dict[str, str]:
    """role -> column of a task's inputs."""
    return {role: col for role, col in task.columns().items() if role in INPUT_ROLES}


def is_labelled(task, row: dict) -> bool:
    """Whether `row` carries the task's label: some label column holds a value (not None)."""
    return any(row.get(col) is not None for col in label_columns(task))


def source_key(spec: str, base_dir: Path) -> str:
    """What identifies a data source: builtin/hub names as written, file paths resolved."""
    spec = spec.strip()
    if spec.startswith("builtin:"):
        return spec
    path = Path(spec).expanduser()
    return str((path if path.is_absolute() else Path(base_dir) / path).resolve())


def find_groups(recipe, tasks: dict, notes: list[str]) -> dict[str, list[str]]:
    """{group key: [task names]}: tasks of a JOINABLE_TYPES type with the same train source, the same data
    block (dev, test, split, limit), the same on_bad_rows and the same input columns. Tasks that share a
    train source but differ in any of these stay separate tasks (each reads the file itself, as when they are
    alone); a note says why."""
    by_source: dict[str, list[str]] = {}
    for name, task in tasks.items():
        if task.cfg.type not in JOINABLE_TYPES:
            continue
        by_source.setdefault(source_key(task.cfg.data.train, recipe.base_dir), []).append(name)
    groups = {}
    for names in by_source.values():
        if len(names) < 2:
            continue
        by_setup: dict[str, list[str]] = {}
        for name in names:
            cfg = tasks[name].cfg
            setup = json.dumps([cfg.data.model_dump(mode="json", exclude={"train"}), cfg.on_bad_rows,
                                sorted(input_columns(tasks[name]).items())])
            by_setup.setdefault(setup, []).append(name)
        for members in by_setup.values():
            if len(members) > 1:
                groups["+".join(members)] = members
        if len(by_setup) > 1:
            notes.append(f"tasks {', '.join(names)} read the same train data ({tasks[names[0]].cfg.data.train}) with "
                         f"different data settings or input columns, so they are not all one joint group (joint "
                         f"batches need identical data blocks, on_bad_rows and inputs)")
    return groups


@dataclass
class JointRows:
    """A joint group's rows: `splits` (split -> Rows shared by the group's tasks) and, per task and split,
    the positions of the rows that carry its label."""

    tasks: list[str]
    splits: dict[str, Rows]
    labelled: dict[str, dict[str, list[int]]]

    def task_rows(self, name: str) -> dict[str, Rows]:
        """split -> the rows labelled for task `name` (splits where it has none are left out)."""
        return {split: rows.select(self.labelled[name][split]) for split, rows in self.splits.items()
                if self.labelled[name][split]}


def _check_joint_rows(group: str, tasks: dict, rows: Rows, problems: list[str], notes: list[str]) -> Rows | None:
    """Columns present; every row's inputs well formed, and its labels for the tasks it is labelled for.
    Rows that carry no task's label are dropped. Returns the usable rows, or None on errors."""
    missing = False
    for name, task in tasks.items():
        for role, col in task.columns().items():
            if col not in rows.columns and (task.roles[role] or role in task.cfg.columns):
                problems.append(f"tasks.{name}.columns.{role}: column '{col}' not in {rows.origin} "
                                f"(columns: {', '.join(rows.columns)})")
                missing = True
    if missing:
        return None
    bad: list[tuple[int, list]] = []
    unlabelled: list[int] = []
    for i, record in enumerate(rows.records):
        found, labelled_any = [], False
        for task in tasks.values():
            problems_here = task.check_row(record)
            if is_labelled(task, record):
                labelled_any = True
            else:       # an unlabelled row is fine for this task as long as its inputs are
                targets = set(label_columns(task))
                problems_here = [(col, msg) for col, msg in problems_here if col not in targets]
            found += [p for p in problems_here if p not in found]
        if found:
            bad.append((i, found))
        elif not labelled_any:
            unlabelled.append(i)
    skip_bad = next(iter(tasks.values())).cfg.on_bad_rows == "skip"
    if bad and not skip_bad:
        report_bad_rows(rows, bad, problems, f"or set on_bad_rows: skip for the tasks of {group}")
        return None
    if bad:
        notes.append(f"{group}: skipped {len(bad)} bad row(s) of {len(rows.records)} in {rows.origin}")
    if unlabelled:
        notes.append(f"{group}: dropped {len(unlabelled)} row(s) of {rows.origin} that carry no task's label")
    drop = set(unlabelled) | {i for i, _ in bad}
    return rows.select([i for i in range(len(rows.records)) if i not in drop]) if drop else rows


def _keep_labels_seen_in_train(tasks: dict, splits: dict[str, Rows], made: list[str]) -> None:
    """Rows of a made dev/test split whose class (for some task with a `label` column) has no train row go
    back to train, so "label not seen in train" cannot fail on a split the user never wrote."""
    for task in tasks.values():
        col = task.columns().get("label")
        if col is None:
            continue
        seen = {str(r[col]) for r in splits["train"].records if r.get(col) is not None}
        for split in made:
            rows = splits[split]
            back = [i for i, r in enumerate(rows.records) if r.get(col) is not None and str(r[col]) not in seen]
            if back:
                skip, moved, train = set(back), rows.select(back), splits["train"]
                splits["train"] = Rows(train.origin, train.columns, train.records + moved.records,
                                       train.lines + moved.lines, train.line_kind)
                splits[split] = rows.select([i for i in range(len(rows.records)) if i not in skip])
                seen |= {str(r[col]) for r in moved.records}


def prepare_group(recipe, group: str, tasks: dict, problems: list[str], notes: list[str]) -> JointRows | None:
    """Read, check, split and cap a joint group's rows once, then fit each task on its labelled train rows.
    Appends problems (unreadable files, missing columns, malformed rows, a task without any label, labels in
    dev/test unseen in train); returns None when the group cannot be used."""
    first = next(iter(tasks.values()))
    dcfg, prefix = first.cfg.data, f"tasks.{first.name}.data"
    splits = read_splits(recipe, dcfg, prefix, problems,
                         lambda raw, where: _check_joint_rows(group, tasks, raw, problems, notes),
                         skip_bad=first.cfg.on_bad_rows == "skip", notes=notes)
    if "train" not in splits:
        return None
    wanted = {s: f for s, f in dcfg.split.items() if getattr(dcfg, s) is None and f > 0}
    if wanted:
        splits.update(split_rows(splits["train"], key=lambda r: _row_key(first, r), label=None,
                                 fractions=wanted, seed=recipe.train.seed))
        _keep_labels_seen_in_train(tasks, splits, list(wanted))
    for split, n in dcfg.limit.items():
        if split in splits:
            splits[split] = subsample(splits[split], n, recipe.train.seed)
    labelled = {name: {split: [i for i, r in enumerate(rows.records) if is_labelled(task, r)]
                       for split, rows in splits.items()} for name, task in tasks.items()}
    usable = True
    for name, task in tasks.items():
        train = [splits["train"].records[i] for i in labelled[name]["train"]]
        if not train:
            problems.append(f"tasks.{name}.data.train: no train row of {splits['train'].origin} carries a label "
                            f"for {name} (columns {', '.join(label_columns(task))})")
            usable = False
            continue
        task.fit(train)
        for split in ("dev", "test"):
            if split in splits:
                rows = [splits[split].records[i] for i in labelled[name][split]]
                problems.extend(f"tasks.{name}.data.{split}: {p}" for p in task.check_eval_rows(rows))
    if not usable:
        return None
    sizes = ", ".join(f"{s} {len(r.records)}" for s, r in splits.items())
    counts = "; ".join(f"{n}: " + ", ".join(f"{s} {len(ix)}" for s, ix in labelled[n].items()) for n in tasks)
    notes.append(f"{group} (joint, one backbone pass per row): {sizes} rows; labelled {counts}")
    return JointRows(list(tasks), splits, labelled)


@dataclass
class JointFeatures:
    """A joint group's encoded train rows: `inputs[i]` is a feature holding row i's input_ids (and
    token_type_ids, length); `label_index[task][i]` is row i's position in that task's train features, or
    -1 where the row lacks the task's label."""

    tasks: list[str]
    inputs: list[dict]
    label_index: dict[str, np.ndarray]

    def lengths(self) -> list[int]:
        return [f["length"] for f in self.inputs]


def join_features(joint: JointRows, features: dict[str, list[dict]]) -> JointFeatures:
    """Align each task's train features (encoded from its labelled rows, in row order) on the group's rows.

    Raises RecipeError when a task type makes other than one feature per row, or when two tasks encode a row
    to different tokens (they must read the same inputs)."""
    train = joint.splits["train"]
    n = len(train.records)
    inputs: list[dict | None] = [None] * n
    owner: list[str | None] = [None] * n
    label_index = {}
    for name in joint.tasks:
        positions, feats = joint.labelled[name]["train"], features[name]
        if len(feats) != len(positions):
            raise RecipeError([f"tasks.{name}: its task type made {len(feats)} features from {len(positions)} rows; "
                               f"tasks that share a data file need one feature per row"])
        index = np.full(n, -1, dtype=np.int64)
        index[positions] = np.arange(len(positions))
        label_index[name] = index
        for j, i in enumerate(positions):
            if inputs[i] is None:
                inputs[i], owner[i] = feats[j], name
            elif not np.array_equal(inputs[i]["input_ids"], feats[j]["input_ids"]):
                raise RecipeError([f"tasks.{name}: {train.origin}, {train.line_kind} {train.lines[i]} encodes to "
                                   f"other tokens than for tasks.{owner[i]}; tasks that share a data file must "
                                   f"read the same inputs"])
    return JointFeatures(list(joint.tasks), inputs, label_index)


def collate_source(tasks: dict, names: list[str], joint: JointFeatures | None, features: dict[str, list[dict]],
                   idx: list[int], pad_token_id: int) -> tuple[dict[str, Tensor], dict[str, tuple]]:
    """One micro-batch of a source: a single task (`joint` None, `names` = [task]) or a joint group.

    `features`: task -> its train features; `idx`: positions in the task's features (single task) or in the
    group's rows. Returns (inputs: input_ids, attention_mask[, token_type_ids], each (batch, seq_len);
    targets: {task: (rows, labels)}) with rows a (n_task,) long tensor of the micro-batch rows that carry
    the task's label (None: every row) and labels the task's label tensors for those rows (batch-first).
    A task none of whose rows here is labelled has no entry."""
    if joint is None:
        name = names[0]
        batch = collate(tasks[name], [features[name][i] for i in idx], pad_token_id)
        inputs = {k: batch.pop(k) for k in INPUT_KEYS if k in batch}
        return inputs, {name: (None, batch)}
    inputs = pad_inputs([joint.inputs[i] for i in idx], pad_token_id)
    seq_len = inputs["input_ids"].shape[1]
    targets = {}
    for name in joint.tasks:
        index = joint.label_index[name]
        rows = [k for k, i in enumerate(idx) if index[i] >= 0]
        if rows:
            labels = tasks[name].collate_labels([features[name][index[idx[k]]] for k in rows], seq_len)
            targets[name] = (torch.tensor(rows, dtype=torch.long), labels)
    return inputs, targets


def masked_losses(tasks: dict, logits: dict[str, Tensor], targets: dict[str, tuple]) -> dict[str, Tensor]:
    """{task: its loss on the rows that carry its label}: the task's own loss (a mean) over
    logits[task][rows] and the labels of those rows, so unlabelled rows contribute nothing and the mean is
    over labelled rows only. logits: {task: (batch, ...)}; targets as returned by `collate_source`."""
    return {name: tasks[name].loss(logits[name] if rows is None else logits[name][rows], labels)
            for name, (rows, labels) in targets.items()}
