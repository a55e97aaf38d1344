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
  mtlm_packed   mtlm with `train.packing: true` (the same 32 examples per step, packed where the cost model
                of `mtlm.packing.choose_rows` says it pays: on length-grouped batches mostly plain rows)
  mtlm_packed_nogroup (optional) packing instead of length grouping (random batches, packed)
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

from machine import cpu_flags, cpu_model, gemm_peak
from train_children import THREADS, run_child

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "sst2" / "train.jsonl"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "train_throughput.json"
DEFAULT_DEV = ROOT.parent / "shared" / "data" / "sst2" / "dev.jsonl"
VARIANTS = ("hf_grouped", "hf", "mtlm", "mtlm_packed", "mtlm_compile", "mtlm_nogroup", "mtlm_packed_nogroup")
DEFAULT_VARIANTS = ("hf_grouped", "hf", "mtlm", "mtlm_packed")
BASELINE = "hf_grouped"
AIM_SPEEDUP_BF16, AIM_SPEEDUP_FP32, AIM_MFU = 1.5, 1.2, 0.30   # vs hf_grouped: native bf16 / AVX2 machines


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
            aims[a]["dev_accuracy_minus_hf_grouped"] = {"aim": "not below it beyond noise (d >= -0.02)",
                                                        "value": d, "met": d >= -0.02}
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
