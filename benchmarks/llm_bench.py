"""SmolLM2-135M multi-task (two classification heads + one generation task, one shared LoRA adapter) vs
zero-shot prompting of the same model, on real data, in a bounded CPU run.

Usage (from the repository root; 15-40 minutes on 2 shared cores, depending on their load):
    OMP_NUM_THREADS=2 python benchmarks/llm_bench.py [--steps 48] [--train-rows 400] [--test-rows 60] [--top 6]

Tasks (rows read from ../shared/data, written to a temporary folder, never into the repository):
- sst2: SST-2 sentiment (train from train.jsonl; dev rows 0-15 and test rows 16.. of dev.jsonl, the
  labelled split at hand), accuracy;
- agnews: AG News topic, 4 classes (train.jsonl / dev.jsonl / test.jsonl), accuracy;
- squad_gen: SQuAD answers as generation: "Context: <the sentence holding the answer>\\nQuestion: <q>
  \\nAnswer:" -> the answer text (the context is cut to that one sentence to keep prompts within
  max_length 128 on a CPU), exact match and ROUGE-L.

Multi-task: `backbone: smollm2-135m`, pooling last, `adapters: {r: 16, alpha: 32, target_modules: [q_proj,
k_proj, v_proj, o_proj], layers: top:<K>}` (the lower layers frozen and run without a backward), `--steps`
optimizer steps of batch 8, proportional sampling; evaluated with `mtlm.evaluate.evaluate_bundle` on the
test rows. Zero-shot: the same pretrained weights through their chat template: classification by the
label whose first token gets the highest next-token probability after an instruction listing the labels;
generation by greedy decoding (at most 16 new tokens), scored with the same metrics
(`mtlm.tasks.generation.Generation.metrics`).

Writes benchmarks/results/llm_bench.json: per task the zero-shot and multi-task metrics and whether
multi-task wins, training time and tokens/s, the load average before and after (the machine is shared),
the CPU's flags.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

AGNEWS = ["World", "Sports", "Business", "Sci/Tech"]
ZERO_SHOT = {
    "sst2": ("Is the sentiment of this movie review positive or negative? Answer with one word.\n\nReview: {text}",
             {"negative": "negative", "positive": "positive"}),
    "agnews": ("What is the topic of this news article: World, Sports, Business or Science? Answer with one word."
               "\n\nArticle: {text}", {"World": "World", "Sports": "Sports", "Business": "Business",
                                        "Sci/Tech": "Science"}),
}
TEMPLATE = "Context: {context}\nQuestion: {question}\nAnswer:"


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def answer_sentence(row: dict) -> dict | None:
    """A SQuAD row -> {"context": the sentence holding its first answer, "question", "answer"}, or None when
    the answer crosses a sentence boundary."""
    text, start = row["answers"]["text"][0], row["answers"]["answer_start"][0]
    pos = 0
    for sentence in re.split(r"(?<=[.!?])\s+", row["context"]):
        at = row["context"].find(sentence, pos)
        if at <= start and start + len(text) <= at + len(sentence):
            return {"context": sentence, "question": row["question"], "answer": text}
        pos = at + len(sentence)
    return None


def write_data(folder: Path, train_rows: int, test_rows: int, seed: int) -> dict[str, dict[str, str]]:
    """The three tasks' train/dev/test files in `folder` -> {task: {split: path}}."""
    rng = random.Random(seed)

    def dump(name: str, split: str, rows: list[dict]) -> str:
        path = folder / f"{name}_{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return str(path)

    out = {}
    sst_train = read_jsonl(DATA / "sst2" / "train.jsonl")
    rng.shuffle(sst_train)
    sst_dev = read_jsonl(DATA / "sst2" / "dev.jsonl")
    out["sst2"] = {"train": dump("sst2", "train", sst_train[:train_rows]), "dev": dump("sst2", "dev", sst_dev[:16]),
                   "test": dump("sst2", "test", sst_dev[16:16 + test_rows])}
    ag_train, ag_test = read_jsonl(DATA / "agnews" / "train.jsonl"), read_jsonl(DATA / "agnews" / "test.jsonl")
    rng.shuffle(ag_train)
    rng.shuffle(ag_test)
    out["agnews"] = {"train": dump("agnews", "train", ag_train[:train_rows]),
                     "dev": dump("agnews", "dev", read_jsonl(DATA / "agnews" / "dev.jsonl")[:16]),
                     "test": dump("agnews", "test", ag_test[:test_rows])}
    sq = {}
    for split in ("train", "dev", "test"):
        rows = [r for r in map(answer_sentence, read_jsonl(DATA / "squad" / f"{split}.jsonl")) if r]
        rows = [r for r in rows if len(r["context"].split()) + len(r["question"].split()) <= 55]  # < 128 tokens
        rng.shuffle(rows)
        sq[split] = rows[:{"train": train_rows, "dev": 16, "test": test_rows}[split]]
    out["squad_gen"] = {s: dump("squad_gen", s, r) for s, r in sq.items()}
    return out


def recipe(files: dict, folder: Path, steps: int, top: int) -> dict:
    return {
        "name": "llm_bench", "backbone": "smollm2-135m", "pooling": "last", "max_length": 128,
        "output_dir": str(folder / "run"),
        "adapters": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                     "layers": f"top:{top}"},
        "tasks": {
            "sst2": {"type": "classification", "data": files["sst2"]},
            "agnews": {"type": "classification", "data": files["agnews"]},
            "squad_gen": {"type": "generation", "data": files["squad_gen"], "template": TEMPLATE,
                          "columns": {"target": "answer"}, "max_new_tokens": 16, "metric": "rouge_l"},
        },
        "train": {"batch_size": 8, "max_steps": steps, "eval_every": steps, "lr": 2e-3, "head_lr": 5e-3,
                  "warmup_ratio": 0.05, "tracking": [], "early_stopping_patience": None, "eval_batch_size": 16},
    }


def zero_shot(files: dict, batch_size: int = 16) -> dict[str, dict[str, float]]:
    """Zero-shot metrics of the pretrained instruct model on each task's test rows (see the module doc)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mtlm.backbones import gguf_backbone
    from mtlm.config import TaskConfig
    from mtlm.tasks import build_task

    path = gguf_backbone("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    def chat(text: str) -> str:
        return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)

    out = {}
    for task, (instruction, labels) in ZERO_SHOT.items():
        rows = read_jsonl(Path(files[task]["test"]))
        first = {lab: tok(word, add_special_tokens=False)["input_ids"][0] for lab, word in labels.items()}
        correct = 0
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            enc = tok([chat(instruction.format(text=r["text"][:600])) for r in chunk], return_tensors="pt", padding=True)
            with torch.inference_mode():
                logits = lm(**enc).logits[:, -1]
            ids = torch.tensor(list(first.values()))
            pick = logits[:, ids].argmax(-1).tolist()
            names = list(first)
            correct += sum(names[p] == str(r["label"]) for p, r in zip(pick, chunk))
        out[task] = {"accuracy": correct / len(rows)}
    gen = build_task("squad_gen", TaskConfig(type="generation", data={"train": "x"}, template=TEMPLATE,
                                             columns={"target": "answer"}))
    rows = read_jsonl(Path(files["squad_gen"]["test"]))
    preds = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        prompts = [chat("Answer the question with a short phrase copied from the context.\n\n"
                        + TEMPLATE.format(**r).removesuffix("\nAnswer:")) for r in chunk]
        enc = tok(prompts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            ids = lm.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
        preds += [{"text": tok.decode(s[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip().rstrip("."),
                   "nll": 0.0, "tokens": 1} for s in ids]
    m = gen.metrics(preds, [r["answer"] for r in rows])
    out["squad_gen"] = {"exact_match": m["exact_match"], "rouge_l": m["rouge_l"], "examples": [p["text"] for p in preds[:5]]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--train-rows", type=int, default=400)
    ap.add_argument("--test-rows", type=int, default=60)
    ap.add_argument("--top", type=int, default=6, help="LoRA in the top K of the 30 layers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-zero-shot", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "llm_bench.json"))
    args = ap.parse_args()

    import torch

    from machine import cpu_flags, cpu_model
    import mtlm
    from mtlm.evaluate import evaluate_bundle

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="llm_bench_") as tmp:
        folder = Path(tmp)
        files = write_data(folder, args.train_rows, args.test_rows, args.seed)
        t0 = time.perf_counter()
        zs = {} if args.skip_zero_shot else zero_shot(files)
        zero_shot_s = time.perf_counter() - t0
        print("zero-shot:", json.dumps({k: {m: v for m, v in d.items() if m != "examples"} for k, d in zs.items()}),
              flush=True)
        (folder / "r.json").write_text(json.dumps(recipe(files, folder, args.steps, args.top)))
        r = mtlm.load_recipe(folder / "r.json")
        t0 = time.perf_counter()
        run = mtlm.fit(r, progress=False)
        train_s = time.perf_counter() - t0
        trained = json.loads((run / "metrics.json").read_text())
        t0 = time.perf_counter()
        metrics, _, _ = evaluate_bundle(run, "test", batch_size=16)
        eval_s = time.perf_counter() - t0
    mt = {task: {m: metrics[f"{task}/{m}"] for m in ("accuracy", "exact_match", "rouge_l") if f"{task}/{m}" in metrics}
          for task in ("sst2", "agnews", "squad_gen")}
    main_metric = {"sst2": "accuracy", "agnews": "accuracy", "squad_gen": "rouge_l"}
    result = {
        "command": "OMP_NUM_THREADS=2 python benchmarks/llm_bench.py " + " ".join(sys.argv[1:]),
        "settings": vars(args), "recipe": recipe({t: {} for t in ("sst2", "agnews", "squad_gen")}, Path("."),
                                                 args.steps, args.top),
        "zero_shot": zs, "multitask": mt,
        "beats_zero_shot": {t: (mt[t][m] > zs[t][m]) if t in zs else None for t, m in main_metric.items()},
        "train_s": train_s, "eval_s": eval_s, "zero_shot_s": zero_shot_s,
        "train_tokens_per_s": trained["eval"][-1].get("train_tokens_per_s"),
        "load_before": load_before, "load_after": os.getloadavg(), "cpu": cpu_model(), "cpu_flags": cpu_flags(),
        "threads": torch.get_num_threads(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("zero_shot", "multitask", "beats_zero_shot", "train_s", "load_after")},
                     indent=1))


if __name__ == "__main__":
    main()
