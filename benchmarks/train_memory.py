"""Peak training memory on the same batch: mtlm's model vs the Trainer's (`AutoModelForSequenceClassification`
from the same MiniLM-L6 weights), each in its own process, three steps (forward, backward, clipping, fused
AdamW, zero_grad) on SST-2's 32 longest texts of 4,000 (the batch that sets a run's peak). Reports the
resident memory before the steps and the peak during them (VmHWM after /proc/self/clear_refs 5), and their
ratio mtlm / Trainer. A run's whole-process peak (`train_throughput.py`) also depends on which batches it
drew: the Trainer's length-grouped sampler puts the longest batch first.

    python benchmarks/train_memory.py          # ~1 min; writes benchmarks/results/train_memory.json
"""
import json, os, subprocess, sys
from pathlib import Path

from machine import cpu_flags
from sst2_run import DATA


def status_mb(key: str) -> int:
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) // 1024


def child(variant: str) -> dict:
    import torch
    torch.set_num_threads(1)
    from mtlm.batches import collate_source, masked_losses
    from mtlm.model import resolve_backbone
    from sst2_run import sst2_run
    run = sst2_run(max_steps=10)
    ds = run.batches["sst2"].dataset
    longest = sorted(range(len(ds)), key=lambda i: -len(ds[i]["inputs"]["input_ids"]))[:32]
    inputs, targets = collate_source(run.tasks, [ds[i] for i in longest], run.tokenizer.pad_token_id)
    if variant == "mtlm":
        model = run.unwrapped.train()
        loss = lambda: masked_losses(run.tasks, model(tasks=["sst2"], **inputs), targets)["sst2"]
    else:
        from transformers import AutoModelForSequenceClassification
        model = AutoModelForSequenceClassification.from_pretrained(resolve_backbone("minilm-l6"), num_labels=2).train()
        del run
        loss = lambda: model(**inputs, labels=targets["sst2"][1]["labels"]).loss
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    before = status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    for _ in range(3):
        loss().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"batch": list(inputs["input_ids"].shape), "rss_before_mb": before, "peak_mb": status_mb("VmHWM")}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2])))
        sys.exit(0)
    if not DATA.is_file():
        raise SystemExit(f"SKIP: {DATA} not found; nothing measured")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    res = {}
    for v in ("mtlm", "trainer_model"):
        out = subprocess.run([sys.executable, __file__, "--child", v], env=env, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"FAILED {v}: {out.stderr[-2000:]}")
        res[v] = json.loads(out.stdout.strip().splitlines()[-1])
        res[v]["step_peak_over_before_mb"] = res[v]["peak_mb"] - res[v]["rss_before_mb"]
        print(v, res[v], flush=True)
    result = {"variants": res, "peak_ratio_mtlm_over_trainer": res["mtlm"]["peak_mb"] / res["trainer_model"]["peak_mb"],
              "loadavg": os.getloadavg(), "cpu_flags": cpu_flags()}
    print(f"peak mtlm / Trainer's model: x{result['peak_ratio_mtlm_over_trainer']:.3f}")
    (Path(__file__).resolve().parent / "results" / "train_memory.json").write_text(json.dumps(result, indent=1))
