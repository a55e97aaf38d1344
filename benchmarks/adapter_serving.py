"""Serving speed of LoRA adapter layouts on SmolLM2-135M: one shared adapter vs one adapter per task in
every layer vs per-task adapters in the top K layers only, and mixed-adapter micro-batches vs one adapter.

Usage (from the repository root; ~5 minutes on one quiet core at the defaults):
    OMP_NUM_THREADS=1 python benchmarks/adapter_serving.py [--texts 128] [--rounds 3] [--top 4]

What runs: three classification heads (2, 4 and 3 labels: an SST-2-, AG News- and NLI-sized head) on one
SmolLM2-135M backbone (`backbone: smollm2-135m`, pooling last, max_length 64), LoRA r 16 on q/k/v/o_proj,
built in process with UNTRAINED adapters whose B matrices are random (so each adapter really changes the
states; speed does not depend on the values). Inputs: the first `--texts` SST-2 dev sentences
(../shared/data/sst2/dev.jsonl), tokenised once; micro-batches of `--batch` inputs in length order, each
through `Predictor.run` (the server's model call). Layouts are interleaved micro-batch by micro-batch (order
rotated), each round sums each layout's time over all micro-batches, medians over rounds are reported. Rates
use this process's CPU seconds (one thread), which the machine's other jobs barely change (they take the
core away: wall time then grows, CPU time not); wall-time rates are written beside them:

- shared:       `adapters: {per_task: false}`, every input asks for all 3 tasks (one pass);
- per_task:     `per_task: true, layers: all`, all 3 tasks (each input's rows run through 3 adapters);
- top_k:        `per_task: true, layers: top:K`, all 3 tasks (30 - K layers once, K layers per adapter);
- single:       the per_task model, every input asks for task 1 only (one adapter in the batch);
- mixed:        the per_task model, input i asks for task i mod 3 (three adapters in each micro-batch);
- mixed_unrouted: `mixed` with row routing off (every row through every adapter a micro-batch holds:
                what `Predictor.run` did before rows were routed to their own adapter).

Prints texts/s and ratios (mixed / single: the issue's ">= 0.9x" line; top_k / per_task: what top:K sharing
buys; per_task / shared) and checks that each mixed row's result equals the per_task layout's result for
the task it asked (max |score difference|). Writes benchmarks/results/adapter_serving.json with the load
average before and after (the machine is shared: ratios are measured interleaved in one run) and the
CPU's flags.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

TASKS = {"sentiment": ["negative", "positive"], "topic": ["World", "Sports", "Business", "Sci/Tech"],
         "nli": ["entailment", "neutral", "contradiction"]}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build_predictor(backbone: str, adapters, tasks: dict[str, list[str]], max_length: int, seed: int = 0):
    """A `Predictor` over `backbone` with one untrained classification head per task ({task: labels}) and
    LoRA adapters (`adapters`: an AdapterConfig) whose B matrices are drawn from N(0, 0.02) (LoRA
    initialises B to zero, which would make every adapter the identity). Nothing is trained or saved."""
    import torch

    from mtlm.config import TaskConfig
    from mtlm.model import build_model, load_backbone
    from mtlm.predict import Predictor
    from mtlm.tasks import build_task

    net, tokenizer = load_backbone(backbone)
    objs = {}
    for name, labels in tasks.items():
        task = build_task(name, TaskConfig(type="classification", data={"train": "untrained"}))
        task.fit([{"label": label} for label in labels])
        objs[name] = task
    torch.manual_seed(seed)
    model = build_model(net, objs, "last", 0.0, adapters)
    with torch.no_grad():
        for pname, p in model.backbone.named_parameters():
            if "lora_B" in pname:
                p.normal_(0, 0.02)
    return Predictor(model.eval(), tokenizer, objs, {"max_length": max_length, "name": "adapter_serving"},
                     torch.device("cpu"))


def serve(predictor, feats, batches: list[list[int]], row_tasks: list[list[str]]) -> list[dict]:
    """Every micro-batch through `Predictor.run` -> one {task: result} per input, in input order."""
    out: list[dict] = [{} for _ in feats]
    for idx in batches:
        names = list(dict.fromkeys(n for i in idx for n in row_tasks[i]))
        for i, res in zip(idx, predictor.run([feats[i] for i in idx], names, [row_tasks[i] for i in idx])):
            out[i] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--texts", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32, help="inputs per micro-batch")
    ap.add_argument("--top", type=int, default=4, help="K of the top:K layout")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--backbone", default="smollm2-135m")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "adapter_serving.json"))
    args = ap.parse_args()

    import torch

    from machine import cpu_flags, cpu_model
    from mtlm.config import AdapterConfig
    from mtlm.data import length_sorted_batches

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    load_before = os.getloadavg()
    with open(DATA / "sst2" / "dev.jsonl", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()][:args.texts]
    lora = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": TARGETS}
    predictors = {
        "shared": build_predictor(args.backbone, AdapterConfig(**lora), TASKS, args.max_length),
        "per_task": build_predictor(args.backbone, AdapterConfig(**lora, per_task=True), TASKS, args.max_length),
        "top_k": build_predictor(args.backbone, AdapterConfig(**lora, per_task=True, layers=f"top:{args.top}"),
                                 TASKS, args.max_length),
    }
    names = list(TASKS)
    feats = predictors["shared"].encode([{"text": t} for t in texts], ("text",))
    batches = length_sorted_batches([e.length for e in feats], args.batch)
    every = [names] * len(texts)
    runs = {   # layout -> (predictor, tasks per input, route rows to their adapters)
        "shared": (predictors["shared"], every, True),
        "per_task": (predictors["per_task"], every, True),
        "top_k": (predictors["top_k"], every, True),
        "single": (predictors["per_task"], [[names[1]]] * len(texts), True),
        "mixed": (predictors["per_task"], [[names[i % 3]] for i in range(len(texts))], True),
        "mixed_unrouted": (predictors["per_task"], [[names[i % 3]] for i in range(len(texts))], False),
    }
    engine = predictors["per_task"].engine
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    results: dict[str, list[dict]] = {k: [{} for _ in texts] for k in runs}
    with torch.inference_mode():
        serve(predictors["shared"], feats, batches[:1], every)        # warm-up (first-call allocations)
        for r in range(args.rounds):
            spent = {k: [0.0, 0.0] for k in runs}
            for b, idx in enumerate(batches):       # layouts interleaved batch by batch, order rotated
                keys = list(runs)
                keys = keys[(r + b) % len(keys):] + keys[:(r + b) % len(keys)]
                for key in keys:
                    predictor, row_tasks, routed = runs[key]
                    predictor.engine.takes_rows = routed
                    w0, c0 = time.perf_counter(), time.process_time()
                    out = serve(predictor, feats, [idx], row_tasks)
                    spent[key][0] += time.perf_counter() - w0
                    spent[key][1] += time.process_time() - c0
                    engine.takes_rows = True
                    for i in idx:
                        results[key][i] = out[i]
            for k in runs:
                wall[k].append(spent[k][0])
                cpu[k].append(spent[k][1])
            print(f"round {r + 1} (CPU s): " + ", ".join(f"{k} {cpu[k][-1]:.2f}" for k in runs), flush=True)
    mixed_diff = max(abs(results["mixed"][i][n]["score"] - results["per_task"][i][n]["score"])
                     for i in range(len(texts)) for n in results["mixed"][i])
    # CPU seconds of this process (1 thread): what a layout costs, unlike wall time hardly changed when the
    # shared machine's other jobs take the core away; wall-time rates are reported beside them
    rate = {k: len(texts) / statistics.median(v) for k, v in cpu.items()}
    wall_rate = {k: len(texts) / statistics.median(v) for k, v in wall.items()}

    def ratios_of(rate: dict[str, float]) -> dict[str, float]:
        return {
            "mixed_vs_single": rate["mixed"] / rate["single"],
            "mixed_unrouted_vs_single": rate["mixed_unrouted"] / rate["single"],
            "top_k_vs_per_task": rate["top_k"] / rate["per_task"],
            "per_task_vs_shared": rate["per_task"] / rate["shared"],
            "top_k_vs_shared": rate["top_k"] / rate["shared"],
            # one LoRA model per task: each text through 3 single-adapter passes (3 x `single`'s time)
            "one_model_per_task_vs_shared": rate["single"] / 3 / rate["shared"],
        }
    ratios = ratios_of(rate)
    result = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/adapter_serving.py " + " ".join(sys.argv[1:]),
        "settings": vars(args), "tasks": TASKS, "lora": lora,
        "texts_per_s_cpu": rate, "texts_per_s_wall": wall_rate, "ratios": ratios, "ratios_wall": ratios_of(wall_rate),
        "cpu_seconds": cpu, "wall_seconds": wall,
        "holds": {"mixed >= 0.9x single": ratios["mixed_vs_single"] >= 0.9,
                  "top_k faster than per_task": ratios["top_k_vs_per_task"] > 1.0},
        "mixed_max_score_difference": mixed_diff,
        "load_before": load_before, "load_after": os.getloadavg(), "cpu": cpu_model(), "cpu_flags": cpu_flags(),
        "threads": torch.get_num_threads(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("texts_per_s_cpu", "texts_per_s_wall", "ratios", "ratios_wall", "holds", "mixed_max_score_difference",
                                             "load_before", "load_after")}, indent=1))


if __name__ == "__main__":
    main()
