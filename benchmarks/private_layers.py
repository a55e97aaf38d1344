"""Serving cost of `tasks.<name>.private_layers: K`: in-process texts/s at batch 32 with every head computed.

Usage (from the repository root; about 2 minutes on 2 busy cores):
    OMP_NUM_THREADS=1 python benchmarks/private_layers.py [--texts 256] [--rounds 3] [--threads 1]

One MiniLM-L6 model (6 layers) with three heads over real texts from ../shared/data (banking77 intents,
CoNLL-2003 sentences, STS-B first sentences): ner (token classification), intent (77 classes), sts
(regression). Variants: every task K=0 (the baseline), K=1 and K=2 for ner only, K=1 and K=2 for every
task. All variants are measured in this one process, interleaved round by round (`mtlm.measure.speed`,
torch fp32 engine, the same length-sorted batches), and reported as texts/s and the ratio to K=0. Expected
from the layer count alone: a task with K private layers adds K layer passes to the shared L, so one task
with K=1 costs (L+1)/L = 1.17x the compute, three tasks with K=2 (6+6)/6 = 2x. The private copies' weights
are copies of the pretrained top layers and the heads are untrained (speed does not depend on trained values).

Writes benchmarks/results/private_layers.json with the CPU's flags and load average (the machine is shared:
compare ratios, not absolute rates).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = {"k0": {}, "ner_k1": {"ner": 1}, "ner_k2": {"ner": 2}, "all_k1": {"ner": 1, "intent": 1, "sts": 1},
            "all_k2": {"ner": 2, "intent": 2, "sts": 2}}


def read_texts(n: int) -> list[str]:
    per = n // 3 + 1
    out = []
    for name, field in (("banking77", "text"), ("conll2003", "tokens"), ("stsb", "text_a")):
        with open(DATA / name / "dev.jsonl", encoding="utf-8") as f:
            for line, _ in zip(f, range(per)):
                value = json.loads(line)[field]
                out.append(" ".join(value) if isinstance(value, list) else value)
    return out[:n]


def build(backbone, depths: dict[str, int]):
    import copy

    from mtlm.config import TaskConfig
    from mtlm.model import build_model
    from mtlm.tasks import build_task
    states = {"ner": ("token_classification", {"labels": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG",
                                                          "B-MISC", "I-MISC"]}),
              "intent": ("classification", {"labels": [f"intent{i}" for i in range(77)]}),
              "sts": ("regression", {"mean": 2.5, "std": 1.5})}
    tasks = {}
    for name, (kind, state) in states.items():
        task = build_task(name, TaskConfig(type=kind, data={"train": "x"}, private_layers=depths.get(name, 0)))
        task.load_state(state)
        tasks[name] = task
    return build_model(copy.deepcopy(backbone), tasks, "mean", 0.0).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "private_layers.json"))
    args = p.parse_args()

    import torch

    from machine import contention, cpu_model
    from mtlm.engine import TorchEngine
    from mtlm.measure import cpu_flags, speed
    from mtlm.model import count_parameters, load_backbone

    torch.set_num_threads(args.threads)
    backbone, tokenizer = load_backbone("minilm-l6")
    texts = read_texts(args.texts)
    rows = [{"input_ids": ids} for ids in tokenizer(texts, truncation=True, max_length=128)["input_ids"]]
    models = {v: build(backbone, d) for v, d in VARIANTS.items()}
    tasks = list(models["k0"].heads)
    before = contention()
    t0 = time.perf_counter()
    measured = speed({v: TorchEngine(m, "cpu") for v, m in models.items()}, tasks, rows, tokenizer.pad_token_id,
                     rounds=args.rounds, batch_size=32)
    layers = backbone.config.num_hidden_layers
    base = measured["k0"]["texts_per_s"]
    result = {
        "what": "texts/s at batch 32, all heads, torch fp32, one process, variants interleaved per round",
        "backbone": "minilm-l6", "layers": layers, "texts": len(rows), "rounds": args.rounds,
        "torch_threads": args.threads,
        "variants": {v: {"private_layers": VARIANTS[v], **measured[v],
                         "ratio_to_k0": measured[v]["texts_per_s"] / base,
                         "expected_ratio_from_layers": layers / (layers + sum(VARIANTS[v].values())),
                         "parameters_m": count_parameters(models[v]) / 1e6} for v in VARIANTS},
        "seconds": time.perf_counter() - t0, "contention_before": before, "contention_after": contention(),
        "loadavg": os.getloadavg(), "cpu": cpu_model(), "cpu_flags": cpu_flags(),
        "command": "OMP_NUM_THREADS=1 python benchmarks/private_layers.py",
    }
    print(f"{'variant':<8} {'texts/s':>8} {'x K=0':>6} {'expected':>8} {'params':>7}  (load {os.getloadavg()[0]:.1f})")
    for v, r in result["variants"].items():
        print(f"{v:<8} {r['texts_per_s']:>8.1f} {r['ratio_to_k0']:>6.2f} {r['expected_ratio_from_layers']:>8.2f} "
              f"{r['parameters_m']:>6.1f}M")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
