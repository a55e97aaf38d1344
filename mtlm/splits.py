"""Splitting rows into train / dev / test (de-duplicated, stratified, seeded) and seeded subsampling."""

from __future__ import annotations

import random
from typing import Callable, Hashable

from mtlm.sources import DataError, Rows


def split_rows(rows: Rows, *, key: Callable[[dict], Hashable], label: Callable[[dict], Hashable] | None,
               fractions: dict[str, float], seed: int) -> dict[str, Rows]:
    """De-duplicate `rows` by `key`, then split them into "train" plus one part per `fractions` entry.

    Duplicates keep their first occurrence; a key seen with different labels is dropped entirely (see
    `_dedup` for tuple labels, one entry per task).
    Each fraction is of the de-duplicated total; splits are stratified by `label` when every class
    has at least 2 members, else random; all seeded. Returns {"train": ..., **{name: ...}}, each in
    file order. Raises DataError when the fractions are invalid or there are too few rows.
    """
    if "train" in fractions or any(not 0 < f < 1 for f in fractions.values()) or sum(fractions.values()) >= 1:
        raise DataError(f"split fractions {fractions} must each be in (0, 1), sum below 1, "
                        "and not name 'train' (train gets the remainder)")
    keep = _dedup(rows, key, label)
    labels = [label(rows.records[i]) for i in keep] if label else None
    pool, out, total = list(range(len(keep))), {}, len(keep)
    for name, frac in fractions.items():
        size = max(1, round(frac * total))
        if size >= len(pool):
            raise DataError(f"{rows.origin}: only {total} distinct rows, too few to split off "
                            f"{', '.join(f'{k} ({v:g})' for k, v in fractions.items())}")
        pool, taken = _split_off(pool, size, labels, seed)
        out[name] = taken
    return {"train": rows.select(sorted(keep[i] for i in pool)),
            **{n: rows.select(sorted(keep[i] for i in t)) for n, t in out.items()}}


def subsample(rows: Rows, n: int, seed: int) -> Rows:
    """Return a seeded random subset of `n` rows in file order (all rows if n >= len(rows))."""
    if n >= len(rows.records):
        return rows
    return rows.select(sorted(random.Random(seed).sample(range(len(rows.records)), max(n, 0))))


# ---------------------------------------------------------------- splitting helpers

def _dedup(rows: Rows, key: Callable, label: Callable | None) -> list[int]:
    """First occurrence of each key; keys seen with conflicting labels are left out. A tuple label holds one
    entry per task (None: the row lacks that task's label); two tuples conflict where both have an entry and
    the entries differ."""
    first: dict = {}
    seen_labels: dict = {}
    for i, rec in enumerate(rows.records):
        k = key(rec)
        first.setdefault(k, i)
        if label is not None:
            value = label(rec)
            for pos, v in enumerate(value if isinstance(value, tuple) else (value,)):
                if v is not None:
                    seen_labels.setdefault(k, {}).setdefault(pos, set()).add(v)
    return [i for k, i in first.items() if label is None or all(len(v) == 1 for v in seen_labels.get(k, {}).values())]


def _split_off(pool: list[int], size: int, labels: list | None, seed: int) -> tuple[list[int], list[int]]:
    from sklearn.model_selection import train_test_split

    strat = None
    if labels is not None:
        codes: dict = {}
        strat = [codes.setdefault(labels[i], len(codes)) for i in pool]
        counts = [strat.count(c) for c in range(len(codes))]
        if min(counts) < 2 or size < len(codes) or len(pool) - size < len(codes):
            strat = None
    rest, taken = train_test_split(pool, test_size=size, random_state=seed, stratify=strat)
    return list(rest), list(taken)
