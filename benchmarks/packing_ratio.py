"""Packing alone, interleaved in one process: one training step (forward, backward, fused AdamW) of mtlm's
model on the same SST-2 length-grouped micro-batches of 32 (4,000 train rows, 11 timed batches, order
alternating), unpacked vs packed into rows of 128 (train.packing). Prints real tokens/s of each, their
ratio and the load average; writes benchmarks/results/packing_ratio.json with the CPU flags.

    python benchmarks/packing_ratio.py        # ~2 min on a quiet 2-core machine
"""
import json, os, statistics, tempfile, time
from pathlib import Path

import torch
import yaml
from machine import cpu_flags

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
import mtlm
from mtlm.train import build
from mtlm.batches import collate_source, masked_losses
DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "sst2" / "train.jsonl"
if not DATA.is_file():
    raise SystemExit(f"SKIP: {DATA} not found; nothing measured")
tmp = Path(tempfile.mkdtemp())
(tmp / "r.yaml").write_text(yaml.safe_dump({"name": "pr", "backbone": "minilm-l6", "max_length": 128, "output_dir": str(tmp / "run"),
    "tasks": {"sst2": {"type": "classification", "data": {"train": str(DATA), "split": {}, "limit": {"train": 4000}}}},
    "train": {"batch_size": 32, "max_steps": 100, "mixed_precision": "no"}}))
run = build(mtlm.load_recipe(tmp / "r.yaml"))
model, ds, tasks = run.unwrapped.train(), run.batches["sst2"].dataset, run.tasks
opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
idx = run.batches["sst2"].sampler.global_batches(0)[:12]
t = {"unpacked": [], "packed": []}; toks = {"unpacked": 0, "packed": 0}
for r, b in enumerate(idx):
    items = [ds[i] for i in b]
    for name, cap in (("unpacked", None), ("packed", 128)) if r % 2 else (("packed", 128), ("unpacked", None)):
        inputs, targets = collate_source(tasks, items, 0, cap)
        s = time.perf_counter()
        loss = masked_losses(tasks, model(tasks=["sst2"], **inputs), targets)["sst2"]
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        if r: t[name].append(time.perf_counter() - s); toks[name] += int(inputs["attention_mask"].sum())
rate = {k: toks[k] / sum(v) for k, v in t.items()}
result = {"tokens_per_s": rate, "packed/unpacked": rate["packed"] / rate["unpacked"],
          "per_batch_ratio_median": statistics.median(a / b for a, b in zip(t["unpacked"], t["packed"])),
          "loadavg": os.getloadavg(), "threads": torch.get_num_threads(), "cpu_flags": cpu_flags(),
          "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
print(json.dumps(result))
out = Path(__file__).resolve().parent / "results" / "packing_ratio.json"
out.write_text(json.dumps(result, indent=1), encoding="utf-8")
