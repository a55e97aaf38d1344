"""The one-task SST-2 MiniLM-L6 run that the step-level training benchmarks (train_step_profile.py,
packing_ratio.py, train_memory.py) measure: `mtlm.train.build` on a recipe of SST-2's first `limit` training
rows (../shared/data), max_length 128, batch 32, fp32, in a temporary folder. Exits with "SKIP: ..." (status 0
message, nothing measured) when the data is absent."""

from __future__ import annotations

import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "sst2" / "train.jsonl"


def sst2_run(max_steps: int = 100, limit: int = 4000):
    """mtlm's built run (`mtlm.train.build`: model, tokenizer, tasks, batches) of SST-2 classification.
    Raises SystemExit("SKIP: ...") when ../shared/data/sst2/train.jsonl is missing."""
    import yaml

    import mtlm
    from mtlm.train import build
    if not DATA.is_file():
        raise SystemExit(f"SKIP: {DATA} not found; nothing measured")
    tmp = Path(tempfile.mkdtemp())
    (tmp / "r.yaml").write_text(yaml.safe_dump({
        "name": "sst2-step", "backbone": "minilm-l6", "max_length": 128, "output_dir": str(tmp / "run"),
        "tasks": {"sst2": {"type": "classification", "data": {"train": str(DATA), "split": {}, "limit": {"train": limit}}}},
        "train": {"batch_size": 32, "max_steps": max_steps, "mixed_precision": "no"}}))
    return build(mtlm.load_recipe(tmp / "r.yaml"))
