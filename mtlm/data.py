"""Training sources: read and check rows, make the missing splits, fit the tasks, encode and collate.

A *source* is a group of one or more tasks read from one data block; each row is labelled for some of them.
A task alone is a source of one. Tasks of joinable types (`TaskType.joinable`) with the same data block
(the same train source and the same dev/test/split/limit: a YAML anchor keeps them so), the same
`on_bad_rows` and the same input columns form one source, named "<task>+<task>" in recipe order; each
names its own label column. Tasks that share a file but differ in those settings stay separate sources (a
note says so)::

    tasks:
      sentiment: {type: classification, data: &reviews {train: reviews.jsonl}, columns: {label: sentiment}}
      source:    {type: classification, data: *reviews, columns: {label: source}}

A source's rows are read, checked, de-duplicated and split once, so a row is in the same split for every
task. A row is *unlabelled* for a task when every one of that task's label columns is missing (absent key,
null, or an empty CSV cell); a row must be labelled for at least one task of its source (for a task alone:
its label is required), else it is a bad row. Unlabelled rows are never imputed: a task's rows, fit and
metrics use only its labelled rows (`PreparedData.rows`). Training batches are made by `mtlm.batches`.

`prepare_rows` reports every problem of every task at once (RecipeError); `encode_rows` tokenizes; `collate`
pads one task's micro-batch (dynamic padding).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from mtlm.config import Recipe, RecipeError
from mtlm.sources import DataError, Rows, read_source
from mtlm.splits import split_rows, subsample
from mtlm.tasks.base import RowProblems, pad_inputs

SPLITS = ("train", "dev", "test")
MAX_ROW_ERRORS = 10        # bad rows listed per file before "... and N more"
INPUT_ROLES = ("text", "text_pair", "tokens", "question", "context", "choices", "prompt", "template")


@dataclass
class Source:
    """One source's rows: `splits` (split -> Rows shared by its tasks) and, per task and split, the positions
    of the rows that carry the task's label (`labelled[task][split]`)."""

    name: str                                   # the task's name, or "<task>+<task>" for a joint group
    tasks: list[str]
    splits: dict[str, Rows]
    labelled: dict[str, dict[str, list[int]]]

    def task_rows(self, task: str) -> dict[str, Rows]:
        """split -> the rows labelled for `task` (splits where it has none are left out)."""
        return {split: rows.select(self.labelled[task][split]) for split, rows in self.splits.items()
                if self.labelled[task][split]}


@dataclass
class PreparedData:
    sources: dict[str, Source]                                  # source name -> rows, in recipe order
    rows: dict[str, dict[str, Rows]] = field(default_factory=dict)   # task -> split -> its labelled rows
    notes: list[str] = field(default_factory=list)              # skipped-row counts, split sizes


def label_columns(task) -> list[str]:
    """The columns holding a task's targets: every role that is not an input role (INPUT_ROLES)."""
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


def find_sources(recipe: Recipe, tasks: dict, notes: list[str]) -> dict[str, list[str]]:
    """{source name: [task names]} in recipe order (a group where its first task stands): tasks of joinable
    types with the same train source, data block (dev, test, split, limit), on_bad_rows and input columns
    form one source; every other task is a source of one."""
    by_setup: dict[tuple, list[str]] = {}
    shared: dict[str, set[tuple]] = {}
    for name, task in tasks.items():
        cfg = task.cfg
        if not task.joinable:
            by_setup[(name,)] = [name]
            continue
        train = source_key(cfg.data.train, recipe.base_dir)
        setup = (train, json.dumps([cfg.data.model_dump(mode="json", exclude={"train"}), cfg.on_bad_rows,
                                    sorted(input_columns(task).items())]))
        by_setup.setdefault(setup, []).append(name)
        shared.setdefault(train, set()).add(setup)
    for train, setups in shared.items():
        if len(setups) > 1:
            names = [n for s in setups for n in by_setup[s]]
            names.sort(key=list(tasks).index)
            notes.append(f"tasks {', '.join(names)} read the same train data ({tasks[names[0]].cfg.data.train}) with "
                         f"different data settings or input columns, so they are not all one joint group (joint "
                         f"batches need identical data blocks, on_bad_rows and inputs)")
    return {"+".join(names): names for names in by_setup.values()}


def _row_key(task, row: dict) -> tuple:
    """The input of a row, used to de-duplicate before splitting (so no text lands in two splits)."""
    cols = task.columns()
    return tuple(str([row.get(c) for c in cols[r]] if isinstance(cols[r], list) else row.get(cols[r]))
                 for r in INPUT_ROLES if r in cols)


def _strata(tasks: list, row: dict) -> tuple:
    """What a row's split is stratified by: per task with a `class_role`, its class (None where unlabelled)."""
    return tuple(None if row.get(t.columns()[t.class_role]) is None else str(row.get(t.columns()[t.class_role]))
                 for t in tasks)


def _check_rows(source: str, tasks: dict, rows: Rows, problems: list[str], notes: list[str]) -> Rows | None:
    """Columns present, then every row well formed: its inputs, and its labels for the tasks it is labelled
    for; a row labelled for none of them reports every task's label problems ("missing label"). Returns the
    usable rows, or None on errors (bad rows are left out with a note under on_bad_rows: skip)."""
    missing = False
    for name, task in tasks.items():
        for role, col in task.columns().items():
            for c in [col] if isinstance(col, str) else col:
                if c not in rows.columns and (task.roles[role] or role in task.cfg.columns):
                    problems.append(f"tasks.{name}.columns.{role}: column '{c}' not in {rows.origin} "
                                    f"(columns: {', '.join(rows.columns)})")
                    missing = True
    if missing:
        return None
    bad: list[tuple[int, list]] = []
    for i, record in enumerate(rows.records):
        labelled = [t for t in tasks.values() if is_labelled(t, record)]
        found: list[tuple[str, str]] = []
        for task in tasks.values():
            here = task.check_row(record)
            if labelled and task not in labelled:     # its inputs must be fine, its labels may be missing
                targets = set(label_columns(task))
                here = [(col, msg) for col, msg in here if col not in targets]
            found += [p for p in here if p not in found]
        if found:
            bad.append((i, found))
    if not bad:
        return rows
    if next(iter(tasks.values())).cfg.on_bad_rows == "skip":
        notes.append(f"{source}: skipped {len(bad)} bad row(s) of {len(rows.records)} in {rows.origin}")
        skip = {i for i, _ in bad}
        return rows.select([i for i in range(len(rows.records)) if i not in skip])
    report_bad_rows(rows, bad, problems, "or set " + ", ".join(f"tasks.{n}.on_bad_rows" for n in tasks) + ": skip")
    return None


def report_bad_rows(rows: Rows, bad: list[tuple[int, list[tuple[str, str]]]], problems: list[str], hint: str) -> None:
    """Append "<file>, line N, field 'col': problem" for the first MAX_ROW_ERRORS bad rows (index, [(column,
    problem)]), then a count of the rest with `hint`."""
    for i, found in bad[:MAX_ROW_ERRORS]:
        where = f"{rows.origin}, {rows.line_kind} {rows.lines[i]}"
        problems.extend(f"{where}, field '{col}': {msg}" for col, msg in found)
    if len(bad) > MAX_ROW_ERRORS:
        problems.append(f"{rows.origin}: ... and {len(bad) - MAX_ROW_ERRORS} more bad rows ({hint})")


def _keep_classes_in_train(tasks: dict, splits: dict[str, Rows], made: list[str]) -> None:
    """Rows of a made dev/test split that a task cannot be scored on given its train rows (its
    `check_eval_rows` rejects them: a class, label or tag no train row has) go back to train, so "not seen in
    train" cannot fail on a split the user never wrote. Fits each task on its labelled train rows."""
    for task in tasks.values():
        for split in made:
            train = splits["train"]
            labelled = [r for r in train.records if is_labelled(task, r)]
            if not labelled:                  # reported by prepare_source: no train row carries its label
                break
            task.fit(labelled)
            rows = splits[split]
            back = [i for i, r in enumerate(rows.records) if is_labelled(task, r) and task.check_eval_rows([r])]
            if back:
                skip, moved = set(back), rows.select(back)
                splits["train"] = Rows(train.origin, train.columns, train.records + moved.records,
                                       train.lines + moved.lines, train.line_kind)
                splits[split] = rows.select([i for i in range(len(rows.records)) if i not in skip])


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


def prepare_source(recipe: Recipe, name: str, tasks: dict, problems: list[str], notes: list[str]) -> Source | None:
    """Read, check, split and cap one source's rows, then fit each task on its labelled train rows.

    Made splits are de-duplicated by input and stratified by the tasks' classes (`_strata`). Appends problems
    (unreadable files, missing columns, malformed rows, a task without any labelled train row, labels in
    dev/test unseen in train); returns None when the source cannot be used."""
    first = next(iter(tasks.values()))
    dcfg, prefix = first.cfg.data, f"tasks.{first.name}.data"
    splits = read_splits(recipe, dcfg, prefix, problems, lambda raw, where: _check_rows(name, tasks, raw, problems, notes),
                         skip_bad=first.cfg.on_bad_rows == "skip", notes=notes)
    if "train" not in splits:
        return None
    wanted = {s: f for s, f in dcfg.split.items() if getattr(dcfg, s) is None and f > 0}
    if wanted:
        classed = [t for t in tasks.values() if t.class_role]
        splits.update(split_rows(splits["train"], key=lambda r: _row_key(first, r),
                                 label=(lambda r: _strata(classed, r)) if classed else None,
                                 fractions=wanted, seed=recipe.train.seed))
        _keep_classes_in_train(tasks, splits, list(wanted))
    for split, n in dcfg.limit.items():
        if split in splits:
            splits[split] = subsample(splits[split], n, recipe.train.seed)
    if wanted and "train" in dcfg.limit:     # the cap may have dropped a rare class's last train rows: the made
        _keep_classes_in_train(tasks, splits, list(wanted))   # splits' rows of it go back (train ends a few over)
    if not splits["train"].records:
        problems.append(f"{prefix}.train: no usable rows in {splits['train'].origin}")
        return None
    labelled = {t: {split: [i for i, r in enumerate(rows.records) if is_labelled(task, r)]
                    for split, rows in splits.items()} for t, task in tasks.items()}
    usable = True
    for t, task in tasks.items():
        train = [splits["train"].records[i] for i in labelled[t]["train"]]
        if not train:
            problems.append(f"tasks.{t}.data.train: no train row of {splits['train'].origin} carries a label "
                            f"for {t} (columns {', '.join(label_columns(task))})")
            usable = False
            continue
        task.fit(train)
        for split in ("dev", "test"):
            if split in splits:
                rows = [splits[split].records[i] for i in labelled[t][split]]
                problems.extend(f"tasks.{t}.data.{split}: {p}" for p in task.check_eval_rows(rows))
    if not usable:
        return None
    note = f"{name}: " + ", ".join(f"{s} {len(r.records)}" for s, r in splits.items())
    if len(tasks) > 1:
        note += " rows (one backbone pass per row); labelled " + "; ".join(
            f"{t}: " + ", ".join(f"{s} {len(ix)}" for s, ix in labelled[t].items()) for t in tasks)
    notes.append(note)
    return Source(name, list(tasks), splits, labelled)


def prepare_rows(recipe: Recipe, tasks: dict) -> PreparedData:
    """Group the tasks into sources (`find_sources`), then read, check, split and cap every source's rows and
    fit each task (label maps) on its labelled train rows (`prepare_source`).

    Returns PreparedData: `sources` (name -> Source) and `rows` (task -> split -> its labelled Rows), in
    recipe order. Raises RecipeError listing every problem of every task (unreadable files, missing
    columns, malformed rows with file/line/field, labels in dev/test unseen in train)."""
    problems: list[str] = []
    out = PreparedData(sources={})
    for name, members in find_sources(recipe, tasks, out.notes).items():
        source = prepare_source(recipe, name, {t: tasks[t] for t in members}, problems, out.notes)
        if source is not None:
            out.sources[name] = source
    if problems:
        raise RecipeError(problems)
    rows = {t: source.task_rows(t) for source in out.sources.values() for t in source.tasks}
    out.rows = {n: rows[n] for n in tasks if n in rows}     # recipe order
    return out


def encode_rows(tasks: dict, rows: dict[str, dict[str, Rows]], tokenizer, max_length: int
                ) -> dict[str, dict[str, list[dict]]]:
    """task -> split -> unpadded feature dicts (see mtlm.tasks.base). Raises RecipeError naming the file, line
    and field of every row a task cannot encode (`mtlm.tasks.base.RowProblems`)."""
    out: dict[str, dict[str, list[dict]]] = {}
    problems: list[str] = []
    for name, splits in rows.items():
        for split, r in splits.items():
            try:
                out.setdefault(name, {})[split] = tasks[name].encode(r.records, tokenizer, max_length)
            except RowProblems as e:
                bad: dict[int, list[tuple[str, str]]] = {}
                for i, col, msg in e.problems:
                    bad.setdefault(i, []).append((col, msg))
                report_bad_rows(r, sorted(bad.items()), problems, f"tasks.{name}")
    if problems:
        raise RecipeError(problems, header="data that cannot be encoded")
    return out


def collate(task, features: list[dict], pad_token_id: int) -> dict[str, Tensor]:
    """Pad one micro-batch to its longest member and add the task's label tensors."""
    batch = pad_inputs(features, pad_token_id)
    batch.update(task.collate_labels(features, batch["input_ids"].shape[1]))
    return batch


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Index batches over examples sorted by length (longest first), for evaluation and inference."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
