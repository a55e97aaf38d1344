"""SmolLM2-135M multi-task (two classification heads + one generation task, one shared LoRA adapter) vs
zero-shot prompting of the same model, on real data, in a bounded CPU run.

Usage (from the repository root; ~11 min for the multitask part on a quiet 2-core CPU, more per_task):
    OMP_NUM_THREADS=2 python benchmarks/llm_bench.py [--steps 400] [--train-rows 1200] [--test-rows 60] [--top 12]
    OMP_NUM_THREADS=2 python benchmarks/llm_bench.py --part per_task [same options]   # then the baseline

`--part multitask` (the default): zero-shot and the multi-task run. `--part per_task` (after it, same
options and --work folder): (b) one LoRA model per task, each trained alone for the same --steps, evaluated
on the same test rows, and serving speed: texts/s of all three tasks for the same inputs from the
multi-task bundle (one `Predictor`: one pass for both heads and one batched generate) vs the three
single-task bundles (one adapter per task, each predicting its own task), CPU seconds of this process,
interleaved rounds. The `top:K` sharing gain is benchmarks/adapter_serving.py's.

Tasks (rows read from ../shared/data, written to a temporary folder, never into the repository):
- sst2: SST-2 sentiment (train from train.jsonl; dev rows 0-15 and test rows 16.. of dev.jsonl, the
  labelled split at hand), accuracy;
- agnews: AG News topic, 4 classes (train.jsonl / dev.jsonl / test.jsonl), accuracy;
- squad_gen: SQuAD answers as generation: "Context: <the sentence holding the answer>\\nQuestion: <q>
  \\nAnswer:" -> the answer text (the context is cut to that one sentence to keep prompts within
  max_length 128 on a CPU), exact match and ROUGE-L.

Multi-task: `backbone: smollm2-135m`, pooling last, `adapters: {r: 16, alpha: 32, target_modules: [q_proj,
k_proj, v_proj, o_proj], layers: top:<K>}` (the lower layers frozen and run without a backward), `--steps`
optimizer steps of batch 8, lr 1e-3 (LoRA and heads: SmolLM2's last-token states have norm ~45, so
the heads' updates are large per step; 2e-3 / 5e-3 left SST-2 at chance), proportional sampling; evaluated with `mtlm.evaluate.evaluate_bundle` on the
test rows. Zero-shot: the same pretrained weights through their chat template: classification by the
label whose first token gets the highest next-token probability after an instruction listing the labels;
generation by greedy decoding (at most 16 new tokens), scored with the same metrics
(`mtlm.tasks.generation.Generation.metrics`).

Writes benchmarks/results/llm_bench.json (the per_task part adds to the multitask part's file): per task the
zero-shot, multi-task and single-task metrics, whether multi-task beats zero-shot, multi-task minus
single-task, training time and tokens/s, serving texts/s, the load average before and after (the machine is
shared), the CPU's flags.
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
        "train": {"batch_size": 8, "max_steps": steps, "eval_every": steps, "lr": 1e-3, "head_lr": 1e-3,
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


MAIN_METRIC = {"sst2": "accuracy", "agnews": "accuracy", "squad_gen": "rouge_l"}
TASKS = tuple(MAIN_METRIC)


def train_and_evaluate(files: dict, folder: Path, steps: int, top: int, tasks: tuple[str, ...], name: str
                       ) -> dict:
    """Fit the recipe restricted to `tasks` into folder/<name>, evaluate its bundle on the test rows ->
    {"metrics": {task: {metric: value}}, "train_s", "eval_s", "train_tokens_per_s", "run": path}."""
    import mtlm
    from mtlm.evaluate import evaluate_bundle

    spec = recipe(files, folder, steps, top)
    spec["name"], spec["output_dir"] = f"llm_bench_{name}", str(folder / name)
    spec["tasks"] = {t: c for t, c in spec["tasks"].items() if t in tasks}
    (folder / f"{name}.json").write_text(json.dumps(spec))
    t0 = time.perf_counter()
    run = mtlm.fit(mtlm.load_recipe(folder / f"{name}.json"), progress=False, overwrite=True)
    train_s = time.perf_counter() - t0
    trained = json.loads((run / "metrics.json").read_text())
    t0 = time.perf_counter()
    metrics, _, _ = evaluate_bundle(run, "test", batch_size=16)
    return {"metrics": {t: {m: metrics[f"{t}/{m}"] for m in ("accuracy", "exact_match", "rouge_l")
                            if f"{t}/{m}" in metrics} for t in tasks},
            "train_s": train_s, "eval_s": time.perf_counter() - t0,
            "train_tokens_per_s": trained["eval"][-1].get("train_tokens_per_s"), "run": str(run)}


def serving_inputs(files: dict, n: int) -> list[dict]:
    """`n` inputs that every task reads: SQuAD test rows as {"text": the context sentence, "context",
    "question"} (the classification heads read the text, the generation task its template's fields)."""
    rows = read_jsonl(Path(files["squad_gen"]["test"]))[:n]
    return [{"text": r["context"], "context": r["context"], "question": r["question"]} for r in rows]


def serving_speed(multi_run: str, single_runs: dict[str, str], inputs: list[dict], rounds: int) -> dict:
    """texts/s (CPU seconds of this process; wall beside) of every task for `inputs`: the multi-task bundle
    in one `Predictor` (one pass for both heads, one batched generate) vs one single-task LoRA bundle per
    task, each predicting its own task for the same inputs. Rounds interleaved, medians."""
    import statistics

    import mtlm

    multi = mtlm.load(multi_run, engine="torch")
    singles = {t: mtlm.load(r, engine="torch") for t, r in single_runs.items()}
    cpu = {"multi_task": [], "one_adapter_per_task": []}
    wall = {"multi_task": [], "one_adapter_per_task": []}
    multi.predict(inputs[:2])                          # warm-up
    for p in singles.values():
        p.predict(inputs[:2])
    for r in range(rounds):
        for key in (["multi_task", "one_adapter_per_task"] if r % 2 == 0 else ["one_adapter_per_task", "multi_task"]):
            w0, c0 = time.perf_counter(), time.process_time()
            if key == "multi_task":
                multi.predict(inputs, batch_size=16)
            else:
                for p in singles.values():
                    p.predict(inputs, batch_size=16)
            cpu[key].append(time.process_time() - c0)
            wall[key].append(time.perf_counter() - w0)
    rate = {k: len(inputs) / statistics.median(v) for k, v in cpu.items()}
    return {"texts_per_s_cpu": rate, "texts_per_s_wall": {k: len(inputs) / statistics.median(v) for k, v in wall.items()},
            "multi_task_vs_one_adapter_per_task": rate["multi_task"] / rate["one_adapter_per_task"],
            "inputs": len(inputs), "rounds": rounds, "cpu_seconds": cpu, "wall_seconds": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--train-rows", type=int, default=1200)
    ap.add_argument("--test-rows", type=int, default=60)
    ap.add_argument("--top", type=int, default=12, help="LoRA in the top K of the 30 layers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--part", choices=["multitask", "per_task", "all"], default="multitask",
                    help="multitask: zero-shot + the multi-task run; per_task: one LoRA model per task (same "
                         "--steps each) and serving speed against the multi-task bundle of a previous "
                         "multitask part in the same --work folder; all: both")
    ap.add_argument("--serve-inputs", type=int, default=32, help="inputs timed for serving speed (per_task part)")
    ap.add_argument("--serve-rounds", type=int, default=3)
    ap.add_argument("--skip-zero-shot", action="store_true")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "llm_bench"),
                    help="data and runs (outside the repository; the per_task part reads the multitask part's)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "llm_bench.json"))
    args = ap.parse_args()

    import torch

    from machine import cpu_flags, cpu_model

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() and args.part == "per_task" else {}
    result.update({"load_before": os.getloadavg(), "cpu": cpu_model(), "cpu_flags": cpu_flags(),
                   "threads": torch.get_num_threads()})
    result.setdefault("commands", {})[args.part] = ("OMP_NUM_THREADS=2 python benchmarks/llm_bench.py "
                                                    + " ".join(sys.argv[1:]))
    folder = Path(args.work)
    folder.mkdir(parents=True, exist_ok=True)
    files = write_data(folder, args.train_rows, args.test_rows, args.seed)
    if args.part in ("multitask", "all"):
        t0 = time.perf_counter()
        zs = {} if args.skip_zero_shot else zero_shot(files)
        zero_shot_s = time.perf_counter() - t0
        print("zero-shot:", json.dumps({k: {m: v for m, v in d.items() if m != "examples"} for k, d in zs.items()}),
              flush=True)
        mt = train_and_evaluate(files, folder, args.steps, args.top, TASKS, "multitask")
        result.update({
            "settings": vars(args), "recipe": recipe({t: {} for t in TASKS}, Path("."), args.steps, args.top),
            "zero_shot": zs, "multitask": mt["metrics"], "multitask_run": mt["run"],
            "beats_zero_shot": {t: (mt["metrics"][t][m] > zs[t][m]) if t in zs else None
                                for t, m in MAIN_METRIC.items()},
            "train_s": mt["train_s"], "eval_s": mt["eval_s"], "zero_shot_s": zero_shot_s,
            "train_tokens_per_s": mt["train_tokens_per_s"],
        })
        print(json.dumps({k: result[k] for k in ("zero_shot", "multitask", "beats_zero_shot", "train_s")}, indent=1),
              flush=True)
    if args.part in ("per_task", "all"):
        multi_run = folder / "multitask"
        if not (multi_run / "model").is_dir():
            raise SystemExit(f"--part per_task: no multi-task bundle in {multi_run}; run --part multitask with the "
                             f"same --work first")
        per = {t: train_and_evaluate(files, folder, args.steps, args.top, (t,), f"single_{t}") for t in TASKS}
        mt = result.get("multitask", {})
        result["per_task"] = {t: {**r["metrics"][t], "train_s": r["train_s"],
                                  "train_tokens_per_s": r["train_tokens_per_s"]} for t, r in per.items()}
        result["multitask_vs_per_task"] = {t: (mt[t][m] - per[t]["metrics"][t][m]) if t in mt else None
                                           for t, m in MAIN_METRIC.items()}
        result["serving"] = serving_speed(str(multi_run), {t: r["run"] for t, r in per.items()},
                                          serving_inputs(files, args.serve_inputs), args.serve_rounds)
        print(json.dumps({k: result[k] for k in ("per_task", "multitask_vs_per_task", "serving")}, indent=1),
              flush=True)
    result["load_after"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
