"""Packing alone, interleaved in one process: one training step (forward, backward, fused AdamW) of mtlm's
model on the same SST-2 micro-batches of 32 (4,000 train rows, 11 timed batches per order, variants in
rotating order), for length-grouped batches (mtlm's default) and random ones (packing instead of grouping):
  unpacked   rows padded to the batch's longest example
  packed     train.packing as it trains: `collate_source` with max_length 128, the layout of least estimated
             cost (`mtlm.packing.choose_rows`; plain rows when one example per row is cheapest)
  packed128  every batch packed first-fit into rows of up to 128 tokens (the first packing, for reference)
Prints real tokens/s ratios against unpacked on the same batches and the load average; writes
benchmarks/results/packing_ratio.json with the CPU flags.

    OMP_NUM_THREADS=1 python benchmarks/packing_ratio.py        # ~4 min on a quiet 2-core machine
"""
import json, os, time
from pathlib import Path

import torch
from machine import cpu_flags

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
from mtlm.batches import collate_source, masked_losses
from mtlm.packing import pack_inputs
from sst2_run import sst2_run
N = int(os.environ.get("PACKING_BATCHES", "12"))
run = sst2_run()
model, ds, tasks, pad = run.unwrapped.train(), run.batches["sst2"].dataset, run.tasks, run.tokenizer.pad_token_id
opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
grouped = run.batches["sst2"].sampler.global_batches(0)[:N]
g = torch.Generator().manual_seed(0)
random = torch.randperm(len(ds), generator=g)[:32 * N].view(N, 32).tolist()
VARIANTS = ("unpacked", "packed", "packed128")


def inputs_of(name, items):
    inputs, targets = collate_source(tasks, items, pad, 128 if name == "packed" else None)
    if name == "packed128":
        inputs = pack_inputs([it["inputs"] for it in items], pad, 128)
    return inputs, targets


result = {"loadavg_start": os.getloadavg()}
for kind, batches in (("grouped", grouped), ("random", random)):
    t = {v: 0.0 for v in VARIANTS}; toks = {v: 0 for v in VARIANTS}; rows = {v: 0 for v in VARIANTS}
    for r, b in enumerate(batches):
        items = [ds[i] for i in b]
        for name in VARIANTS[r % 3:] + VARIANTS[:r % 3]:
            s = time.perf_counter()
            inputs, targets = inputs_of(name, items)
            loss = masked_losses(tasks, model(tasks=["sst2"], **inputs), targets)["sst2"]
            loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
            if r:   # the first batch warms up
                t[name] += time.perf_counter() - s; toks[name] += int(inputs["attention_mask"].sum())
                rows[name] += inputs["input_ids"].numel()
    rate = {v: toks[v] / t[v] for v in VARIANTS}
    result[kind] = {"tokens_per_s": rate, "ratio_vs_unpacked": {v: rate[v] / rate["unpacked"] for v in VARIANTS},
                    "pad_fraction": {v: 1 - toks[v] / rows[v] for v in VARIANTS}}
    print(kind, json.dumps({k: {v: round(x, 3) for v, x in d.items()} for k, d in result[kind].items()}), flush=True)
result.update({"loadavg_end": os.getloadavg(), "threads": torch.get_num_threads(), "cpu_flags": cpu_flags(),
               "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "batches_timed": N - 1,
               "note": "ratios only: measured on the shared machine; see loadavg"})
print("load average", result["loadavg_end"])
out = Path(__file__).resolve().parent / "results" / "packing_ratio.json"
out.write_text(json.dumps(result, indent=1), encoding="utf-8")
