"""Training throughput: mtlm's loop vs a plain Hugging Face `Trainer` fine-tune, same data, same model.

    python benchmarks/train_throughput.py                     # full run: 60 steps x 3 repeats x 4 variants
    python benchmarks/train_throughput.py --steps 8 --repeats 1   # quick check that everything runs

Variants (each run in its own subprocess, interleaved, order rotated every repeat):
  hf_grouped    `Trainer` + `AutoModelForSequenceClassification` from the same MiniLM-L6 weights with
                `train_sampling_strategy="group_by_length"` (the v5 name of `group_by_length=True`, the
                Trainer's own answer to padding), `DataCollatorWithPadding`, the default optimizer (fused
                AdamW), same lr / weight decay / warmup / clipping. The baseline of the aims.
  hf            the same with the default random sampler, as a typical user runs it (reported too).
  mtlm          `mtlm.train.fit` on a 1-task recipe (classification, SST-2 train, batch 32, max_length 128,
                its defaults: length-grouped batches, dynamic padding, mixed_precision auto = bf16 only where
                the CPU has native bf16, else fp32; the precision each run used is recorded)
  mtlm_packed   mtlm with `train.packing: true` (the same 32 examples per step, packed into rows of 128)
  mtlm_compile  (optional) mtlm with `train.compile: true` (compile time falls before the window)
  mtlm_nogroup  (optional) mtlm with `train.group_by_length=false`: loop against loop.
After training (outside the window) every variant scores SST-2 dev accuracy: the same examples were seen
(steps x batch), so it shows whether a variant learns as much per example (`--dev ''` skips it).

What is measured, the same way for every variant:
  * Window: the interval between the end of optimizer step W (`--warmup-steps`) and the end of the last
    step, taken from a global `torch.optim` step post-hook. It holds W+1..S whole loop iterations (data
    fetch/collate, forward, backward, clipping, optimizer, scheduler, logging), and excludes process start,
    model loading, tokenisation, the first W steps (allocator / optimizer-state warm-up) and everything
    after the last step (evaluation, saving).
  * Tokens: a forward pre-hook on the model sums `attention_mask` of each training micro-batch actually
    fed to it (real = non-pad tokens) and its padded size.
  * FLOPs (per sequence of real length l): 6*N*l + 12*n_layers*d*l^2, N = encoder parameters (embeddings,
    pooler and heads excluded; identical for both models), the second term the attention score/value
    matmuls (forward 4*l^2*d per layer, backward twice that). MFU = those FLOPs on real tokens per second /
    fp32 GEMM peak. The simpler 6*N*tokens MFU and the padded ("hardware") utilisation are reported too.
  * GEMM peak: median time of a 2048^3 fp32 `torch.mm` (2 threads), measured right before each run (in a
    separate short process) and right after its training window (in the run's process); MFU is against
    their mean, so every MFU is
    against the machine's speed at that moment. Their ratio (gemm_drift) and the CPU pressure (PSI) at
    the end of the window are recorded: a run far from 1.0 / with high pressure shared the CPU.
  * Memory: VmHWM (peak RSS) of the child process. `setup` = peak before the first step; the counter is
    then reset (/proc/self/clear_refs 5) so `train` = peak during the steps; `total` = whole-process peak
    up to the end of the run (before the closing GEMM probe).
Ratios are mtlm / Trainer, computed per repeat between runs interleaved in that repeat, then the median:
this machine's speed drifts, so never read a lone absolute number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import contention, cpu_flags, cpu_model, gemm_peak, reset_hwm, vm_hwm_kb

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "sst2" / "train.jsonl"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "train_throughput.json"
DEFAULT_DEV = ROOT.parent / "shared" / "data" / "sst2" / "dev.jsonl"
VARIANTS = ("hf_grouped", "hf", "mtlm", "mtlm_packed", "mtlm_compile", "mtlm_nogroup")
DEFAULT_VARIANTS = ("hf_grouped", "hf", "mtlm", "mtlm_packed")
BASELINE = "hf_grouped"
THREADS = 2
AIM_SPEEDUP_BF16, AIM_SPEEDUP_FP32, AIM_MFU = 1.5, 1.2, 0.30   # vs hf_grouped: native bf16 / AVX2 machines


# --------------------------------------------------------------------------------------------- child side

class Probe:
    """Timestamps of optimizer steps, token counts of training forwards, and peak-RSS readings."""

    def __init__(self, steps: int, warmup: int):
        self.steps, self.warmup = steps, warmup
        self.step_end: list[float] = []          # perf_counter after each optimizer.step()
        self.batches: list[tuple[int, int, int, int]] = []  # (real tokens, padded tokens, rows, sum of
                                                             #  squared real lengths) per training forward
        self.hwm_setup_kb = None
        self.hwm_train_kb = None
        self.threads_seen = None
        self.contention = None
        self.t_first_forward = None

    def on_forward(self, module, args, kwargs):
        if not module.training:
            return None
        mask = kwargs.get("attention_mask")
        if mask is None:
            raise RuntimeError("training forward without attention_mask keyword: cannot count tokens")
        if not self.batches:                     # first training step: setup is over
            import torch
            self.threads_seen = torch.get_num_threads()
            self.t_first_forward = time.perf_counter()
            self.hwm_setup_kb = vm_hwm_kb()
            reset_hwm()
        example_ids = kwargs.get("example_ids")
        if example_ids is None:
            lengths = mask.sum(1)
        else:                                    # packed rows (train.packing): per-example lengths
            import torch
            lengths = torch.bincount(example_ids[example_ids >= 0])
        self.batches.append((int(lengths.sum()), int(mask.numel()), int(lengths.shape[0]),
                             int((lengths * lengths).sum())))
        return None

    def on_optimizer_step(self, optimizer, args, kwargs):
        self.step_end.append(time.perf_counter())
        if len(self.step_end) == self.steps:
            self.hwm_train_kb = vm_hwm_kb()
            self.contention = contention()

    def window(self) -> dict:
        s, w = self.steps, self.warmup
        if len(self.step_end) != s or len(self.batches) != s:
            raise RuntimeError(f"expected {s} optimizer steps and {s} training forwards, saw "
                               f"{len(self.step_end)} and {len(self.batches)} (grad_accum must be 1)")
        used = self.batches[w:]
        return {"seconds": self.step_end[-1] - self.step_end[w - 1], "steps": s - w,
                "real_tokens": sum(b[0] for b in used), "padded_tokens": sum(b[1] for b in used),
                "samples": sum(b[2] for b in used), "batches": used,
                "step_seconds": [b - a for a, b in zip(self.step_end[w - 1:], self.step_end[w:])]}


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def child_mtlm(args, probe: Probe, tmp: Path) -> dict:
    import yaml
    import mtlm.train as mt
    from mtlm.recipe import load_recipe

    recipe = {
        "name": "bench-throughput", "backbone": "minilm-l6", "pooling": "mean", "max_length": args.max_length,
        "output_dir": str(tmp / "run"),
        # split: {} -> no dev/test carved out: the whole train file is used, as by the Trainer variants,
        # and the single end-of-run evaluation has nothing to score (it is outside the window anyway).
        "tasks": {"sst2": {"type": "classification",
                           "data": {"train": str(args.data), "split": {}, **({"dev": str(args.dev)} if args.dev else {})},
                           "columns": {"text": "text", "label": "label"}}},
        "train": {"batch_size": args.batch_size, "max_steps": args.steps, "lr": 5e-5, "weight_decay": 0.01,
                  "warmup_ratio": 0.06, "dropout": 0.1, "grad_accum": 1, "max_grad_norm": 1.0,
                  "mixed_precision": "auto", "eval_every": 10 ** 9, "early_stopping_patience": None,
                  "group_by_length": args.variant != "mtlm_nogroup", "seed": args.seed,
                  "packing": args.variant == "mtlm_packed", "compile": args.variant == "mtlm_compile"},
    }
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    if not hasattr(mt, "build_model"):
        raise RuntimeError("mtlm.train no longer calls build_model: update the benchmark's token probe")
    original = mt.build_model

    def build_and_probe(*a, **k):
        model = original(*a, **k)
        model.register_forward_pre_hook(probe.on_forward, with_kwargs=True)
        return model

    mt.build_model = build_and_probe
    run_dir = mt.fit(load_recipe(tmp / "recipe.yaml"), progress=False, overwrite=True)
    extra = {}
    metrics = Path(run_dir) / "metrics.json"
    if metrics.is_file():   # mtlm's own figure: all steps from loop start, incl. warm-up steps
        hist = json.loads(metrics.read_text()).get("eval", [])
        if hist and "train_tokens_per_s" in hist[-1]:
            extra["self_reported_tokens_per_s"] = hist[-1]["train_tokens_per_s"]
        if hist and "sst2/accuracy" in hist[-1]:
            extra["dev_accuracy"] = hist[-1]["sst2/accuracy"]
    env = json.loads((Path(run_dir) / "environment.json").read_text())
    extra["mixed_precision"] = env.get("mixed_precision", {}).get("mode")
    return extra


def child_hf(args, probe: Probe, tmp: Path) -> dict:
    import transformers
    from datasets import Dataset
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              Trainer, TrainingArguments)
    from mtlm.model import resolve_backbone

    transformers.logging.set_verbosity_error()
    path = resolve_backbone("minilm-l6")
    rows = read_jsonl(args.data)
    names = sorted({str(r["label"]) for r in rows})
    label2id = {n: i for i, n in enumerate(names)}
    tokenizer = AutoTokenizer.from_pretrained(path)
    ds = Dataset.from_dict({"text": [r["text"] for r in rows], "label": [label2id[str(r["label"])] for r in rows]})
    ds = ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=args.max_length),
                batched=True, remove_columns=["text"])
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(names), id2label=dict(enumerate(names)), label2id=label2id)
    model.register_forward_pre_hook(probe.on_forward, with_kwargs=True)
    targs = TrainingArguments(
        output_dir=str(tmp / "hf"), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=5e-5, weight_decay=0.01, warmup_steps=0.06, lr_scheduler_type="linear",
        max_grad_norm=1.0, logging_steps=10, save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, use_cpu=True, seed=args.seed, dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if args.variant == "hf_grouped" else "random")

    trainer = Trainer(model=model, args=targs, train_dataset=ds, processing_class=tokenizer,
                      data_collator=DataCollatorWithPadding(tokenizer))
    trainer.train()
    extra = {"optimizer": str(targs.optim), "mixed_precision": "no"}
    if args.dev:             # after the window: accuracy on SST-2 dev after the same examples
        dev = read_jsonl(args.dev)
        dev_ds = Dataset.from_dict({"text": [r["text"] for r in dev], "label": [label2id[str(r["label"])] for r in dev]})
        dev_ds = dev_ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=args.max_length),
                            batched=True, remove_columns=["text"])
        pred = trainer.predict(dev_ds)
        extra["dev_accuracy"] = float((pred.predictions.argmax(-1) == pred.label_ids).mean())
    return extra


def run_child(args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_start = time.perf_counter()
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    torch.set_num_threads(THREADS)
    probe = Probe(args.steps, args.warmup_steps)
    register_optimizer_step_post_hook(probe.on_optimizer_step)
    # The probe before the run is taken by the parent in its own process: freeing its large matrices here
    # would raise glibc's mmap threshold and change this process's memory behaviour.
    gemm_before = json.loads(Path(args.gemm_before).read_text())
    with tempfile.TemporaryDirectory(prefix="mtlm-bench-") as tmp:
        extra = (child_mtlm if args.variant.startswith("mtlm") else child_hf)(args, probe, Path(tmp))
        hwm_total_kb = max(probe.hwm_setup_kb or 0, vm_hwm_kb())
    win = probe.window()
    gemm_after = gemm_peak()
    # The window lies between the two probes: MFU is taken against their mean; a large drift between them
    # (or a high CPU pressure) means other work shared the CPU during this run.
    gemm = {"median_gflops": (gemm_before["median_gflops"] + gemm_after["median_gflops"]) / 2,
            "before": gemm_before, "after": gemm_after,
            "drift": gemm_after["median_gflops"] / gemm_before["median_gflops"]}
    out = {"variant": args.variant, "seed": args.seed, "torch": torch.__version__,
           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "threads": probe.threads_seen, "setup_seconds": probe.t_first_forward - t_start,
           "window": win, "gemm": gemm, "contention": probe.contention,
           "rss_mb": {"setup": probe.hwm_setup_kb / 1024, "train": probe.hwm_train_kb / 1024,
                      "total": hwm_total_kb / 1024},
           **extra}
    Path(args.child_out).write_text(json.dumps(out), encoding="utf-8")


# -------------------------------------------------------------------------------------------- parent side

def model_dims() -> dict:
    """Encoder shape of minilm-l6 from its config.json (no torch import in the parent)."""
    sys.path.insert(0, str(ROOT))
    from mtlm.model import resolve_backbone
    cfg = json.loads((Path(resolve_backbone("minilm-l6")) / "config.json").read_text())
    d, ff, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    per_layer = 4 * (d * d + d) + 2 * d * ff + ff + d + 4 * d     # attention q,k,v,o + FFN + 2 LayerNorms
    return {"hidden": d, "intermediate": ff, "layers": layers, "encoder_params": per_layer * layers}


def summarize(res: dict, dims: dict) -> dict:
    w = res["window"]
    n, layers, d = dims["encoder_params"], dims["layers"], dims["hidden"]
    flops_real = flops_padded = 0.0
    for real, padded, rows, real_sq in w["batches"]:
        seq = padded / rows
        flops_real += 6 * n * real + 12 * layers * d * real_sq
        flops_padded += 6 * n * padded + 12 * layers * d * rows * seq ** 2
    sec, peak = w["seconds"], res["gemm"]["median_gflops"] * 1e9
    return {
        "tokens_per_s": w["real_tokens"] / sec,
        "padded_tokens_per_s": w["padded_tokens"] / sec,
        "samples_per_s": w["samples"] / sec,
        "steps_per_s": w["steps"] / sec,
        "pad_fraction": 1 - w["real_tokens"] / w["padded_tokens"],
        "mean_real_len": w["real_tokens"] / w["samples"],
        "model_gflops": flops_real / sec / 1e9,
        "mfu": flops_real / sec / peak,
        "mfu_6n": 6 * n * w["real_tokens"] / sec / peak,
        "hfu_padded": flops_padded / sec / peak,
        "gemm_gflops": res["gemm"]["median_gflops"],
        "gemm_drift": res["gemm"]["drift"],
        "cpu_pressure_avg60": (res.get("contention") or {}).get("cpu_pressure_avg60"),
        "peak_rss_mb": res["rss_mb"]["total"],
        "train_rss_mb": res["rss_mb"]["train"],
        "setup_rss_mb": res["rss_mb"]["setup"],
        "setup_s": res["setup_seconds"],
        "window_s": sec,
    }


def median(xs):
    return statistics.median(xs) if xs else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default 60)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="leading steps left out of the window (default min(5, steps // 4), at least 1)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0, help="round r uses seed+r for every variant")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma list from {', '.join(VARIANTS)} (default {','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--dev", type=lambda v: Path(v) if v else None, default=DEFAULT_DEV,
                   help="dev file scored after training ('' to skip)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--gemm-before", help=argparse.SUPPRESS)
    p.add_argument("--gemm-probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup_steps is None:
        args.warmup_steps = max(1, min(5, args.steps // 4))
    if not 1 <= args.warmup_steps < args.steps:
        p.error("need 1 <= --warmup-steps < --steps")

    if args.gemm_probe:
        import torch
        torch.set_num_threads(THREADS)
        Path(args.gemm_probe).write_text(json.dumps(gemm_peak()), encoding="utf-8")
        return 0
    if args.child:
        args.variant = args.child
        run_child(args)
        return 0

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}; choose from {VARIANTS}")
    if not args.data.is_file():
        print(f"SKIP: {args.data} not found (SST-2 train from ../shared/data relative to the repo root); "
              f"nothing measured, no result written.")
        return 0
    try:
        dims = model_dims()
    except Exception as e:   # BackboneError: weights package missing
        print(f"SKIP: backbone minilm-l6 unavailable: {e}")
        return 0

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    t_all = time.perf_counter()
    print(f"{len(variants)} variants x {args.repeats} repeats, {args.steps} steps "
          f"({args.warmup_steps} warm-up steps left out), batch {args.batch_size}, max_length {args.max_length}, "
          f"Trainer fp32, mtlm mixed_precision auto, {THREADS} threads; baseline {BASELINE}", flush=True)
    with tempfile.TemporaryDirectory(prefix="mtlm-bench-out-") as tmp:
        for r in range(args.repeats):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for v in order:
                out, before = Path(tmp) / f"{v}-{r}.json", Path(tmp) / f"{v}-{r}-gemm.json"
                t = time.perf_counter()
                probe = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--gemm-probe", str(before)],
                                       cwd=ROOT, env=env, capture_output=True, text=True)
                if probe.returncode != 0:
                    sys.stderr.write(probe.stderr[-4000:])
                    print("FAILED: GEMM probe")
                    return 1
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", v, "--child-out", str(out),
                       "--gemm-before", str(before),
                       "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps),
                       "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                       "--seed", str(args.seed + r), "--data", str(args.data), "--dev", str(args.dev or "")]
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                if proc.returncode != 0 or not out.is_file():
                    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
                    print(f"FAILED: variant {v} (repeat {r}), exit {proc.returncode}")
                    return 1
                res = json.loads(out.read_text())
                res["summary"] = summarize(res, dims)
                res["round"] = r
                res["wall_s"] = time.perf_counter() - t
                runs[v].append(res)
                s = res["summary"]
                print(f"  round {r} {v:<13} {s['tokens_per_s']:8.0f} real tok/s  {s['samples_per_s']:6.1f} samples/s"
                      f"  MFU {s['mfu']:.1%}  GEMM {s['gemm_gflops']:.0f} GFLOP/s  peak RSS {s['peak_rss_mb']:.0f} MB"
                      f"  ({res['wall_s']:.0f} s; CPU pressure {s['cpu_pressure_avg60'] or 0:.0%},"
                      f" GEMM drift {s['gemm_drift']:.2f})", flush=True)

    keys = list(next(iter(runs.values()))[0]["summary"])
    medians = {v: {k: median([x["summary"][k] for x in rs]) for k in keys} for v, rs in runs.items()}
    for v, rs in runs.items():
        if v.startswith("mtlm"):
            vals = [x["self_reported_tokens_per_s"] for x in rs if "self_reported_tokens_per_s" in x]
            if vals:
                medians[v]["self_reported_tokens_per_s"] = median(vals)

    def paired(a: str, b: str, key: str) -> dict:
        by_round = {x["round"]: x["summary"][key] for x in runs[b]}
        per = [x["summary"][key] / by_round[x["round"]] for x in runs[a] if x["round"] in by_round]
        return {"median": median(per), "per_round": per}

    ratio_keys = ("tokens_per_s", "samples_per_s", "mfu", "peak_rss_mb", "train_rss_mb")
    ratios = {}
    for a in [v for v in variants if v.startswith("mtlm")]:
        for b in [v for v in variants if v.startswith("hf")]:
            ratios[f"{a}/{b}"] = {k: paired(a, b, k) for k in ratio_keys}
    for v, rs in runs.items():
        accs = [x["dev_accuracy"] for x in rs if x.get("dev_accuracy") is not None]
        if accs:
            medians[v]["dev_accuracy"] = median(accs)
            medians[v]["dev_accuracy_per_round"] = accs
        medians[v]["mixed_precision"] = sorted({str(x.get("mixed_precision")) for x in rs})

    aims = {}
    bf16 = any("bf16" in m.get("mixed_precision", []) for m in medians.values())
    aim_speedup = AIM_SPEEDUP_BF16 if bf16 else AIM_SPEEDUP_FP32
    for a in [v for v in variants if v.startswith("mtlm")]:
        if BASELINE not in runs:
            break
        sp = ratios[f"{a}/{BASELINE}"]["tokens_per_s"]["median"]
        mem = ratios[f"{a}/{BASELINE}"]["peak_rss_mb"]["median"]
        aims[a] = {
            "tokens_per_s_vs_hf_grouped": {"aim": f">= {aim_speedup}x ({'bf16' if bf16 else 'fp32, AVX2'})",
                                           "value": sp, "met": sp >= aim_speedup},
            "peak_rss_vs_hf_grouped": {"aim": "<= 1.0x", "value": mem, "met": mem <= 1.0},
            "mfu_real_tokens": {"aim": f">= {AIM_MFU:.0%}", "value": medians[a]["mfu"],
                                "met": medians[a]["mfu"] >= AIM_MFU},
        }
        if "dev_accuracy" in medians[a] and "dev_accuracy" in medians[BASELINE]:
            d = medians[a]["dev_accuracy"] - medians[BASELINE]["dev_accuracy"]
            aims[a]["dev_accuracy_minus_hf_grouped"] = {"aim": "within noise (|d| <= 0.02)", "value": d,
                                                        "met": abs(d) <= 0.02}
    # Runs that shared the CPU: high CPU pressure at the end of the window, or the machine's GEMM speed
    # changed a lot between the probes before and after the run.
    busy = [[v, x["round"]] for v, rs in runs.items() for x in rs
            if (x["summary"]["cpu_pressure_avg60"] or 0) > 0.2 or not 0.8 <= x["summary"]["gemm_drift"] <= 1.25]
    first = next(iter(runs.values()))[0]
    result = {
        "benchmark": "train_throughput",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {"data": str(args.data), "backbone": "minilm-l6", "batch_size": args.batch_size,
                   "max_length": args.max_length, "precision": "Trainer fp32; mtlm mixed_precision auto",
                   "steps": args.steps, "baseline": BASELINE, "dev": str(args.dev) if args.dev else None,
                   "warmup_steps_excluded": args.warmup_steps, "repeats": args.repeats, "seed": args.seed,
                   "variants": variants, "threads": THREADS,
                   "model": dims,
                   "flops_per_sequence": "6*N*l + 12*layers*hidden*l^2 (l = real length; N = encoder params)",
                   "window": "end of optimizer step W -> end of last step (global optimizer step post-hook)",
                   "memory": "VmHWM of each variant's own process; train = peak during the steps (reset via "
                             "/proc/self/clear_refs); total = whole-process peak"},
        "machine": {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "logical_cpus": os.cpu_count(),
                    "torch": first["torch"], "torch_cpu_capability": first.get("cpu_capability"),
                    "torch_threads": first["threads"], "python": platform.python_version(),
                    "load_avg_at_end": os.getloadavg()},
        "gemm_peak_gflops": {"median": median([x["gemm"]["median_gflops"] for rs in runs.values() for x in rs]),
                             "per_run": {v: [round(x["gemm"]["median_gflops"], 1) for x in rs] for v, rs in runs.items()}},
        "medians": medians,
        "ratios": ratios,
        "aims": aims,
        "disturbed_runs": busy,
        "runs": runs,
        "total_wall_s": time.perf_counter() - t_all,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")

    print()
    print(f"{'variant':<13} {'real tok/s':>10} {'samples/s':>9} {'pad %':>6} {'MFU':>6} {'MFU 6N':>7} "
          f"{'HFU pad':>7} {'peak RSS MB':>11} {'train RSS MB':>12}")
    for v, m in medians.items():
        print(f"{v:<13} {m['tokens_per_s']:>10.0f} {m['samples_per_s']:>9.1f} {m['pad_fraction']:>6.1%} "
              f"{m['mfu']:>6.1%} {m['mfu_6n']:>7.1%} {m['hfu_padded']:>7.1%} {m['peak_rss_mb']:>11.0f} "
              f"{m['train_rss_mb']:>12.0f}")
    print(f"GEMM peak (fp32 2048^3, {THREADS} threads): median {result['gemm_peak_gflops']['median']:.0f} GFLOP/s")
    for name, rr in ratios.items():
        print(f"{name:<20} tokens/s x{rr['tokens_per_s']['median']:.2f}  samples/s x{rr['samples_per_s']['median']:.2f}"
              f"  peak RSS x{rr['peak_rss_mb']['median']:.2f}  train RSS x{rr['train_rss_mb']['median']:.2f}")
    for v, m in medians.items():
        if "dev_accuracy" in m:
            print(f"{v:<13} dev accuracy {m['dev_accuracy']:.3f} after {args.steps * args.batch_size} examples "
                  f"(per round {', '.join(f'{x:.3f}' for x in m['dev_accuracy_per_round'])}); "
                  f"precision {', '.join(m['mixed_precision'])}")
    for v, va in aims.items():
        for name, a in va.items():
            val = f"{a['value']:.1%}" if name.startswith("mfu") else (
                f"{a['value']:+.3f}" if name.startswith("dev") else f"{a['value']:.2f}x")
            print(f"aim {v:<13} {name:<30} {a['aim']:>26}: {val:>7}  {'MET' if a['met'] else 'NOT met'}")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if busy:
        print(f"WARNING: {len(busy)} of {sum(len(rs) for rs in runs.values())} runs shared the CPU with other work "
              f"(CPU pressure > 20% or GEMM drift outside 0.8-1.25): numbers are unreliable; rerun on a quiet machine.")
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out} "
          f"({result['total_wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
