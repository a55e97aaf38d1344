"""Several processes: two "machines" on loopback (two launchers, `accelerate launch --num_machines 2
--machine_rank R` or torchrun's `--nnodes 2 --node_rank R`, one process each, gloo on CPU) give the update of
one process over the same global batch; the dev evaluation is split across ranks with the metrics of one
process; the train shards of 2 ranks make up one process's global batches. Tiny random backbone."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_machines(launcher: str, args: list[str], timeout: int = 300) -> None:
    """Start rank 0 and rank 1 as two launcher processes (two "machines") on 127.0.0.1 and wait for both;
    fails with both logs when either exits non-zero (or kills both on timeout)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs = []
    for rank in (0, 1):
        if launcher == "accelerate":
            cmd = ["accelerate", "launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
                   "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                   "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mtlm.cli", *args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                   "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
                   "-m", "mtlm.cli", *args]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(o[-3000:] for o in outs)


def _weights(run_dir):
    return {**load_file(run_dir / "model" / "heads.safetensors"),
            **load_file(run_dir / "model" / "backbone" / "model.safetensors")}


@pytest.mark.requires(executable="accelerate", hint="pip install accelerate")
@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_two_machines_on_loopback_match_one_process(make_recipe, tmp_path, launcher):
    """Batch 8 on each of 2 machines = batch 16 on one process: the same global batches, so per-step losses
    and the trained weights (backbone and heads) agree within float tolerance."""
    common = dict(tasks=("sentiment", "paraphrase"), max_steps=10, eval_every=5, dropout=0.0,
                  early_stopping_patience=None)
    one = make_recipe(name="one", batch_size=16, **common)
    two = make_recipe(name="two", batch_size=8, **common)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "mtlm.cli", "train", str(one), "--no-progress"], check=True, env=env,
                   capture_output=True, timeout=300)
    two_machines(launcher, ["train", str(two), "--no-progress"])
    run_one, run_two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (run_one, run_two))
    assert m2["step"] == 10
    for a, b in zip(m1["train"], m2["train"], strict=True):       # the step-10 log: running losses
        for k in a:
            assert b[k] == pytest.approx(a[k], abs=1e-4), k
    a, b = _weights(run_one), _weights(run_two)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)
    for e1, e2 in zip(m1["eval"], m2["eval"], strict=True):
        assert e1["mean"] == pytest.approx(e2["mean"], abs=1e-6)


EVAL_SCRIPT = r"""
import json, sys, torch
import mtlm
from accelerate import Accelerator
from mtlm.data import encode_rows, prepare_rows
from mtlm.evaluate import evaluate
from mtlm.model import build_model, load_backbone
from mtlm.tasks import build_task
recipe = mtlm.load_recipe(sys.argv[1])
tasks = {n: build_task(n, t) for n, t in recipe.tasks.items()}
data = prepare_rows(recipe, tasks)
backbone, tok = load_backbone(recipe.backbone, dropout=0.0)
dev = {n: f["dev"] for n, f in encode_rows(tasks, data.rows, tok, recipe.max_length).items()}
torch.manual_seed(0)
model = build_model(backbone, tasks, recipe.pooling, 0.0)
acc = Accelerator(cpu=True) if sys.argv[3] == "split" else None
rows = []
model.register_forward_hook(lambda m, a, kw, out: rows.append(int(kw["input_ids"].shape[0])), with_kwargs=True)
metrics = evaluate(model, tasks, dev, 8, tok.pad_token_id, torch.device("cpu"), accelerator=acc)
rank = acc.process_index if acc else 0
json.dump({"metrics": metrics, "rows": sum(rows), "total": sum(len(v) for v in dev.values())},
          open(f"{sys.argv[2]}.{rank}.json", "w"))
"""


@pytest.mark.requires(executable="accelerate", hint="pip install accelerate")
def test_the_dev_evaluation_is_split_across_ranks_with_the_metrics_of_one_process(make_recipe, tmp_path):
    """2 processes each run the forward passes of half the dev features (classification and NER, whose
    predictions are merged per sentence); the gathered predictions give both ranks one process's metrics."""
    path = make_recipe(tasks=("sentiment", "ner"), name="ev")
    script = tmp_path / "eval_script.py"
    script.write_text(EVAL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(script), str(path), str(tmp_path / "one"), "whole"], check=True, env=env,
                   timeout=300)
    proc = subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(path),
                           str(tmp_path / "two"), "split"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one.0.json").read_text())
    ranks = [json.loads((tmp_path / f"two.{r}.json").read_text()) for r in (0, 1)]
    assert one["rows"] == one["total"] > 40
    assert sorted(r["rows"] for r in ranks) in ([one["total"] // 2, -(-one["total"] // 2)],)  # half each
    for r in ranks:
        assert r["metrics"].keys() == one["metrics"].keys()
        for k, v in one["metrics"].items():
            assert r["metrics"][k] == pytest.approx(v, abs=1e-9), k


@pytest.mark.parametrize("n", [96, 103])
def test_the_shards_of_two_ranks_make_up_one_process_global_batches(n):
    """Rank r of 2 with batch b takes every 2nd item of the global batch of 2b; one process with batch 2b
    draws the same global batches (an odd epoch differs only in its short batch, padded by one item). Before
    the fix the odd epoch was padded before length grouping, which shifted every later batch."""
    from mtlm.batches import LengthGroupedBatchSampler
    lengths = [(7 * i) % 31 + 2 for i in range(n)]
    one = LengthGroupedBatchSampler(lengths, 16, seed=5).global_batches(0)
    shards = [LengthGroupedBatchSampler(lengths, 8, seed=5, num_replicas=2, rank=r) for r in (0, 1)]
    got = [[b for b, _ in zip(iter(s), range(len(one)))] for s in shards]
    assert all(set(a).isdisjoint(b) or len(a + b) < 16 for a, b in zip(*got))
    merged = [sorted(a + b) for a, b in zip(*got)]
    differ = [(sorted(b), m) for b, m in zip(one, merged) if sorted(b) != m]
    if n % 2 == 0:
        assert not differ
    else:                               # the short batch, padded by one item (the epoch's first)
        ((b, m),) = differ
        assert len(b) == n % 16 and len(m) == len(b) + 1 and set(b) <= set(m)


METHODS = {"uncertainty": {"name": "uncertainty"}, "dwa": {"name": "dwa", "window": 1},
           "famo": {"name": "famo"}, "gradnorm": {"name": "gradnorm"}, "cagrad": {"name": "cagrad"}}


@pytest.mark.requires(executable="accelerate", hint="pip install accelerate")
@pytest.mark.parametrize("method", list(METHODS))
def test_a_weighting_method_under_two_processes_matches_one(make_recipe, tmp_path, method):
    """uncertainty, dwa (sampled steps), famo, gradnorm, cagrad (all_tasks steps), with accumulation: 2
    processes x batch 8 give one process x batch 16's trained model and the method's logged task weights
    (which differ between the tasks, so the method was in effect). pcgrad: tests/test_weighting.py."""
    import mtlm
    common = dict(tasks=("sentiment", "paraphrase"), max_steps=4, eval_every=4, dropout=0.0, grad_accum=2,
                  early_stopping_patience=None, weighting=METHODS[method])
    one = make_recipe(name="one", batch_size=16, **common)
    two = make_recipe(name="two", batch_size=8, **common)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    mtlm.fit(mtlm.load_recipe(one), progress=False)          # one process, here
    proc = subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mtlm.cli", "train", str(two),
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_one, run_two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    a, b = _weights(run_one), _weights(run_two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)
    log1, log2 = (json.loads((r / "metrics.json").read_text())["train"][-1] for r in (run_one, run_two))
    w1 = {k: v for k, v in log1.items() if k.startswith("weight/")}
    assert len(w1) == 2 and max(w1.values()) - min(w1.values()) > 1e-5, w1
    for k, v in w1.items():
        assert log2[k] == pytest.approx(v, abs=1e-4), k
