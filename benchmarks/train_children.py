"""The child side of train_throughput.py: one variant's training run in its own process, with the probes
(optimizer-step timestamps, token counts of training forwards, peak RSS) that the parent turns into the
report. Run through `train_throughput.py --child VARIANT` (see that file for what is measured)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from machine import contention, gemm_peak, reset_hwm, vm_hwm_kb

THREADS = int(os.environ.get("BENCH_THREADS", "2"))   # the 2 cores; BENCH_THREADS=1 for a smoke run on a shared machine

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
                  "group_by_length": args.variant not in ("mtlm_nogroup", "mtlm_packed_nogroup"), "seed": args.seed,
                  "packing": args.variant in ("mtlm_packed", "mtlm_packed_nogroup"), "compile": args.variant == "mtlm_compile"},
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
