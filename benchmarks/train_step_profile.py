"""Where one training step's time goes, on SST-2's length-grouped micro-batches of 32 (short texts).

Phases of a step, timed with perf_counter, variants interleaved batch by batch in one process:
  mtlm_unpacked  mtlm's model (minilm-l6, mean pooling), rows padded to the batch's longest
  mtlm_packed    train.packing as it trains (`collate_source` with max_length 128: the cheapest layout by
                 `mtlm.packing.choose_rows`, plain rows when one example per row is cheapest)
  mtlm_packed128 the same examples always packed first-fit into rows of up to 128 (the first packing)
  hf             `AutoModelForSequenceClassification` from the same weights, `DataCollatorWithPadding`
Each step: collate, forward (+loss), backward, clip_grad_norm_ (1.0), fused AdamW step, zero_grad(set_to_none).
Prints median ms per phase and variant and the ops that take the most time (torch.profiler, one batch).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/train_step_profile.py      # ~3 min quiet
Writes benchmarks/results/train_step_profile.json (load average and CPU flags with it): ratios only.
"""
import json, os, statistics, time
from pathlib import Path

import torch
from machine import cpu_flags

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
from mtlm.batches import collate_source, masked_losses
from mtlm.model import resolve_backbone
from mtlm.packing import pack_inputs
from sst2_run import sst2_run

N_BATCHES = int(os.environ.get("PROFILE_BATCHES", "21"))
run = sst2_run()
model, ds, tasks = run.unwrapped.train(), run.batches["sst2"].dataset, run.tasks
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding
hf = AutoModelForSequenceClassification.from_pretrained(resolve_backbone("minilm-l6"), num_labels=2).train()
hf_collate = DataCollatorWithPadding(run.tokenizer)
opts = {"mtlm": torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True),
        "hf": torch.optim.AdamW(hf.parameters(), lr=1e-5, fused=True)}
idx = run.batches["sst2"].sampler.global_batches(0)[:N_BATCHES]
PAD = run.tokenizer.pad_token_id
VARIANTS = {"mtlm_unpacked": None, "mtlm_packed": 128, "mtlm_packed128": 128, "hf": None}


def step(name, items, times):
    t = [time.perf_counter()]
    if name == "hf":
        batch = hf_collate([{"input_ids": [int(x) for x in it["inputs"]["input_ids"]], "label": int(it["labels"]["sst2"]["label"])} for it in items])
        t.append(time.perf_counter())
        loss = hf(**batch).loss
        mdl, opt, ntok = hf, opts["hf"], int(batch["attention_mask"].sum())
    else:
        inputs, targets = collate_source(tasks, items, PAD, VARIANTS[name])
        if name == "mtlm_packed128":
            inputs = pack_inputs([it["inputs"] for it in items], PAD, 128)
        t.append(time.perf_counter())
        loss = masked_losses(tasks, model(tasks=["sst2"], **inputs), targets)["sst2"]
        mdl, opt, ntok = model, opts["mtlm"], int(inputs["attention_mask"].sum())
    t.append(time.perf_counter())
    loss.backward(); t.append(time.perf_counter())
    torch.nn.utils.clip_grad_norm_(mdl.parameters(), 1.0); t.append(time.perf_counter())
    opt.step(); t.append(time.perf_counter())
    opt.zero_grad(set_to_none=True); t.append(time.perf_counter())
    if times is not None:
        for ph, a, b in zip(("collate", "forward", "backward", "clip", "adamw", "zero_grad"), t, t[1:]):
            times.setdefault(ph, []).append(b - a)
        times.setdefault("tokens", []).append(ntok)


times = {v: {} for v in VARIANTS}
for r, b in enumerate(idx):
    items = [ds[i] for i in b]
    order = list(VARIANTS)
    order = order[r % len(order):] + order[:r % len(order)]
    for v in order:
        step(v, items, times[v] if r else None)
result = {"loadavg": os.getloadavg(), "threads": torch.get_num_threads(), "cpu_flags": cpu_flags(),
          "batches": N_BATCHES - 1, "ms_median": {}, "tokens_per_s": {}}
for v, ph in times.items():
    total = [sum(x) for x in zip(*(ph[k] for k in ph if k != "tokens"))]
    result["ms_median"][v] = {k: 1000 * statistics.median(x) for k, x in ph.items() if k != "tokens"}
    result["ms_median"][v]["step"] = 1000 * statistics.median(total)
    result["tokens_per_s"][v] = sum(ph["tokens"]) / sum(total)
base = result["tokens_per_s"]["mtlm_unpacked"]
result["ratio_vs_mtlm_unpacked"] = {v: x / base for v, x in result["tokens_per_s"].items()}
print(f"{'phase ms':<10}" + "".join(f"{v:>16}" for v in VARIANTS))
for k in ("collate", "forward", "backward", "clip", "adamw", "zero_grad", "step"):
    print(f"{k:<10}" + "".join(f"{result['ms_median'][v][k]:>16.1f}" for v in VARIANTS))
print("tokens/s vs mtlm_unpacked: " + ", ".join(f"{v} x{x:.3f}" for v, x in result["ratio_vs_mtlm_unpacked"].items()))
if os.environ.get("PROFILE_OPS", "1") == "1":
    items = [ds[i] for i in idx[1]]
    result["top_ops"] = {}
    for v in VARIANTS:
        with torch.profiler.profile() as prof:
            step(v, items, None)
        table = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
        result["top_ops"][v] = [(e.key, round(e.self_cpu_time_total / 1000, 2), e.count) for e in table]
        print(f"\n{v}: top ops by self CPU ms (one batch)")
        for k, ms, n in result["top_ops"][v]:
            print(f"  {k:<45} {ms:8.2f} ms  x{n}")
print(f"load average {os.getloadavg()}")
out = Path(__file__).resolve().parent / "results" / "train_step_profile.json"
out.write_text(json.dumps(result, indent=1), encoding="utf-8")
