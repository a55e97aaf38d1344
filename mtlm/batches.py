"""Training micro-batches: which source serves each micro-batch, and which of its rows.

`TaskSampler` picks the source (a task alone, or a joint group: `mtlm.data`) of each micro-batch. Each
source's train rows are a `SourceDataset`; a `torch.utils.data.DataLoader` draws this process's share of
each global batch from it through a `LengthGroupedBatchSampler` (seeded, length-grouped, resumable,
sharded across processes so that every process gets rows of every batch) and `collate_source` pads it
into model inputs plus, per task, the labels of the rows that carry them. `masked_losses` turns the
heads' logits into one loss per task over its labelled rows only. `train_batches` builds it all.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from mtlm.config import RecipeError, TrainConfig
from mtlm.data import PreparedData, Source
from mtlm.packing import choose_rows, pack_inputs
from mtlm.tasks.base import pad_inputs


class SourceDataset(Dataset):
    """A source's encoded train rows. Item i is {"inputs": a feature holding input_ids (token_type_ids,
    length), "labels": {task: that task's feature of the item}} with only the tasks the item is labelled
    for. `label_index[task][i]`: the item's position in the task's features, -1 where it lacks the label."""

    def __init__(self, tasks: list[str], inputs: list[dict], label_index: dict[str, np.ndarray],
                 features: dict[str, list[dict]]):
        self.tasks, self.inputs, self.label_index, self.features = tasks, inputs, label_index, features

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> dict:
        return {"inputs": self.inputs[i],
                "labels": {t: self.features[t][self.label_index[t][i]] for t in self.tasks
                           if self.label_index[t][i] >= 0}}

    def lengths(self) -> list[int]:
        return [f["length"] for f in self.inputs]


def source_dataset(source: Source, features: dict[str, list[dict]]) -> SourceDataset:
    """A source's train items from its tasks' train features (each task's encoded from its labelled rows, in
    row order). A task alone: its features are the items, however many it makes per row (extractive QA:
    one per window). A joint group (joinable types: one feature per row): its rows are the items, aligned
    over the tasks.

    Raises RecipeError when a task of a group makes other than one feature per row, or when two tasks
    encode a row to different tokens (they must read the same inputs)."""
    if len(source.tasks) == 1:
        (name,) = source.tasks
        return SourceDataset([name], features[name], {name: np.arange(len(features[name]))}, features)
    train = source.splits["train"]
    n = len(train.records)
    inputs: list[dict | None] = [None] * n
    owner: list[str | None] = [None] * n
    label_index = {}
    for name in source.tasks:
        positions, feats = source.labelled[name]["train"], features[name]
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
    return SourceDataset(list(source.tasks), inputs, label_index, {t: features[t] for t in source.tasks})


def collate_source(tasks: dict, items: list[dict], pad_token_id: int, capacity: int | None = None
                   ) -> tuple[dict[str, Tensor], dict[str, tuple]]:
    """One micro-batch of `SourceDataset` items -> (inputs, targets).

    inputs: input_ids, attention_mask[, token_type_ids], each (rows, seq_len), padded to the longest
    (a feature with "sequences", as multiple choice makes, adds one row per sequence). With `capacity`
    (train.packing) the items are packed into rows of at most that many tokens, the layout of least estimated
    cost (`mtlm.packing.choose_rows`, `pack_inputs`: adds position_ids and example_ids; the model returns
    one logits row per item, as unpacked); when that layout is one item per row, the plain padded rows. targets:
    {task: (rows, labels)} for each task some item is labelled for, in the source's task order: rows is
    None when every item carries the task's label, else a (n_task,) long tensor of the items that do;
    labels are the task's `collate_labels` for those items, padded to the longest item. Raises ValueError
    on an empty list."""
    if not items:
        raise ValueError("collate_source: an empty micro-batch (every process must get rows of every batch)")
    features = [it["inputs"] for it in items]
    rows = None if capacity is None else choose_rows([len(f["input_ids"]) for f in features], capacity)
    if rows is None:
        inputs = pad_inputs(features, pad_token_id)
        seq_len = inputs["input_ids"].shape[1]
    else:
        inputs = pack_inputs(features, pad_token_id, capacity, rows)
        seq_len = max(len(f["input_ids"]) for f in features)
    targets = {}
    names = dict.fromkeys(t for it in items for t in it["labels"])
    for name in (n for n in tasks if n in names):
        rows = [k for k, it in enumerate(items) if name in it["labels"]]
        labels = tasks[name].collate_labels([items[k]["labels"][name] for k in rows], seq_len)
        targets[name] = (None if len(rows) == len(items) else torch.tensor(rows, dtype=torch.long), labels)
    return inputs, targets


def masked_losses(tasks: dict, logits: dict[str, Tensor], targets: dict[str, tuple]) -> dict[str, Tensor]:
    """{task: its loss on the rows that carry its label}: the task's own loss (a mean) over
    logits[task][rows] and the labels of those rows, so unlabelled rows contribute nothing and the mean is
    over labelled rows only. logits: {task: (batch, ...)}; targets as returned by `collate_source`."""
    return {name: tasks[name].loss(logits[name] if rows is None else logits[name][rows], labels)
            for name, (rows, labels) in targets.items()}


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Endless, seeded, resumable index batches over one source, this process's share of each global batch.

    Each epoch is a permutation of the items; with `group_by_length` it is cut into mega-batches of 50
    global batches, each sorted by length, so a micro-batch holds similar lengths (less padding), as the
    Hugging Face `LengthGroupedSampler` does; the batch order is shuffled again. A global batch holds
    batch_size * num_replicas items and process `rank` takes every num_replicas-th of them. With several
    processes the epoch's short last batch is padded to a multiple of num_replicas with the epoch's first items
    (as torch's `DistributedSampler` pads), so every batch gives each process the same number of rows (>= 1):
    no process waits in the all-reduce for one with nothing to do; every other global batch is the one a
    single process with the same global batch draws.

    `state_dict()` is the position of the next batch ({"epoch", "cursor"}); it counts batches taken from the
    iterator, so the DataLoader must not prefetch (num_workers=0)."""

    MEGA = 50

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool = True,
                 num_replicas: int = 1, rank: int = 0):
        if not lengths:
            raise ValueError("LengthGroupedBatchSampler: no items")
        self.lengths, self.seed, self.group_by_length = lengths, seed, group_by_length
        self.num_replicas, self.rank = num_replicas, rank
        self.global_batch = batch_size * num_replicas
        self.epoch, self.cursor = 0, 0
        self._batches: tuple[int, list[list[int]]] | None = None

    def global_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's batches over all processes, in the order they are served."""
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self.lengths)).tolist()
        if self.group_by_length:
            mega = self.global_batch * self.MEGA
            perm = [i for k in range(0, len(perm), mega)
                    for i in sorted(perm[k:k + mega], key=lambda j: -self.lengths[j])]
        batches = [perm[k:k + self.global_batch] for k in range(0, len(perm), self.global_batch)]
        # only the short last batch is padded (after grouping): every other batch is the one a single process
        # with the same global batch draws, whatever the number of processes
        pad = -len(batches[-1]) % self.num_replicas
        batches[-1] += (perm * math.ceil(pad / len(perm)))[:pad] if pad else []
        rng.shuffle(batches)
        return batches

    def __iter__(self):
        while True:       # state is read anew at every batch: load_state_dict takes effect mid-iteration
            if self._batches is None or self._batches[0] != self.epoch:
                self._batches = (self.epoch, self.global_batches(self.epoch))
            batches = self._batches[1]
            if self.cursor >= len(batches):
                self.epoch, self.cursor = self.epoch + 1, 0
                continue
            batch = batches[self.cursor]
            self.cursor += 1
            yield batch[self.rank::self.num_replicas]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


class SourceBatches:
    """This process's endless micro-batches of one source: a DataLoader over its SourceDataset with a
    LengthGroupedBatchSampler and `collate_source`. `next()` -> (inputs, targets) on the CPU."""

    def __init__(self, dataset: SourceDataset, tasks: dict, batch_size: int, seed: int, group_by_length: bool,
                 num_replicas: int, rank: int, pad_token_id: int, capacity: int | None = None):
        self.dataset = dataset
        self.sampler = LengthGroupedBatchSampler(dataset.lengths(), batch_size, seed, group_by_length,
                                                 num_replicas, rank)
        # num_workers=0: no prefetching, so the sampler's position is the batches consumed (resume). Its own
        # generator: making an iterator draws a seed, which must not move the global RNG (dropout masks)
        self.loader = DataLoader(dataset, batch_sampler=self.sampler, num_workers=0,
                                 collate_fn=partial(collate_source, tasks, pad_token_id=pad_token_id, capacity=capacity),
                                 generator=torch.Generator().manual_seed(seed))
        self._iter = None

    def __len__(self) -> int:
        return len(self.dataset)

    def next(self) -> tuple[dict[str, Tensor], dict[str, tuple]]:
        if self._iter is None:
            self._iter = iter(self.loader)
        return next(self._iter)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def train_batches(data: PreparedData, tasks: dict, features: dict[str, list[dict]], cfg: TrainConfig,
                  num_replicas: int, rank: int, pad_token_id: int, max_length: int | None = None
                  ) -> dict[str, SourceBatches]:
    """{source name: its SourceBatches} in source order, from each task's train features; source i is
    seeded with cfg.seed * 1000 + i. With cfg.packing, micro-batches are packed into rows of max_length."""
    return {name: SourceBatches(source_dataset(source, features), tasks, cfg.batch_size, cfg.seed * 1000 + i,
                                cfg.group_by_length, num_replicas, rank, pad_token_id,
                                max_length if cfg.packing else None)
            for i, (name, source) in enumerate(data.sources.items())}


# ---------------------------------------------------------------- which source serves a micro-batch

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
