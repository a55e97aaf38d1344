"""The training loop: resume continues identically, 2-process DDP matches 1 process, accumulation,
early stopping, logs. Tiny random backbone on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mtlm
from mtlm.checkpoint import latest_checkpoint


def _heads(run_dir):
    return load_file(run_dir / "model" / "heads.safetensors")


def _backbone(run_dir):
    return load_file(run_dir / "model" / "backbone" / "model.safetensors")


def test_resume_continues_identically(make_recipe):
    path = make_recipe(tasks=("sentiment", "topic", "ner"), name="straight", max_steps=12, eval_every=4,
                       early_stopping_patience=None)
    straight = mtlm.fit(mtlm.load_recipe(path, ["train.eval_every=12"]), progress=False)

    path = make_recipe(tasks=("sentiment", "topic", "ner"), name="killed", max_steps=12, eval_every=4,
                       early_stopping_patience=None)
    recipe = mtlm.load_recipe(path, ["train.eval_every=12", "train.checkpoint_every=5"])
    from mtlm.train import fit
    run = fit(recipe, progress=False, stop_after=7)          # as if killed after step 7
    assert latest_checkpoint(run).name == "step_7"
    assert not (run / "model").exists()                      # no evaluation happened yet
    fit(recipe, resume=True, progress=False)
    a, b = _backbone(straight), _backbone(run)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    for k, v in _heads(straight).items():
        torch.testing.assert_close(v, _heads(run)[k], rtol=0, atol=1e-6, msg=k)
    m = json.loads((run / "metrics.json").read_text())
    assert m["step"] == 12 and m["eval"][-1]["step"] == 12


def test_grad_accum_and_epochs(make_recipe):
    path = make_recipe(tasks=("sentiment",), name="accum", max_steps=None, epochs=1.0, grad_accum=2,
                       eval_every=1000)
    recipe = mtlm.load_recipe(path)
    run = mtlm.fit(recipe, progress=False)
    m = json.loads((run / "metrics.json").read_text())
    # sentiment train rows / (batch 8 * accumulation 2), rounded up
    from mtlm.data import prepare_rows
    from mtlm.tasks import build_task
    rows = prepare_rows(recipe, {"sentiment": build_task("sentiment", recipe.tasks["sentiment"])}).rows
    n = len(rows["sentiment"]["train"].records)
    assert m["max_steps"] == -(-n // 16)
    assert m["step"] == m["max_steps"]
    assert (run / "logs").is_dir() and any((run / "logs").iterdir())   # TensorBoard events


def test_early_stopping(make_recipe):
    # lr 0 never improves the dev metric after the first evaluation
    path = make_recipe(tasks=("sentiment",), name="early", max_steps=50, eval_every=2, lr=1e-12,
                       early_stopping_patience=2)
    run = mtlm.fit(mtlm.load_recipe(path), progress=False)
    m = json.loads((run / "metrics.json").read_text())
    assert m["stopped_early"] is True
    assert m["step"] == 6 and m["best_step"] == 2


@pytest.mark.requires(executable="accelerate", hint="pip install accelerate")
def test_two_processes_match_one(make_recipe, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): batch b per process equals one
    process with batch 2b (same global batches), so the trained weights agree closely."""
    common = dict(tasks=("sentiment", "paraphrase"), max_steps=6, eval_every=6, dropout=0.0,
                  early_stopping_patience=None)
    one = make_recipe(name="one", batch_size=16, **common)
    two = make_recipe(name="two", batch_size=8, **common)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "mtlm.cli", "train", str(one), "--no-progress"], check=True, env=env,
                   capture_output=True, timeout=300)
    proc = subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "mtlm.cli", "train", str(two), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_one, run_two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    m2 = json.loads((run_two / "metrics.json").read_text())
    assert m2["step"] == 6
    a, b = _heads(run_one), _heads(run_two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)
    m1 = json.loads((run_one / "metrics.json").read_text())
    assert m1["eval"][-1]["mean"] == pytest.approx(m2["eval"][-1]["mean"], abs=0.02)


@pytest.mark.requires(executable="accelerate", hint="pip install accelerate")
def test_two_processes_with_a_last_batch_shorter_than_the_process_count(tmp_path, tiny_backbone):
    """17 train rows, batch 8 per process, 2 processes: an epoch is one global batch of 16 rows and one of 1
    row. Every process must get rows of that last batch (it takes a padded share, as torch's DistributedSampler
    pads an epoch), else one process has an empty micro-batch while the other waits in the all-reduce."""
    from conftest import write_recipe
    rows = [{"text": f"{'good fun' if i % 2 else 'bad boring'} film {i}", "label": "pos" if i % 2 else "neg"}
            for i in range(21)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:17]))
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[17:]))
    path = write_recipe(tmp_path / "short.yaml", {
        "name": "short", "backbone": tiny_backbone, "max_length": 16, "output_dir": str(tmp_path / "runs" / "short"),
        "tasks": {"s": {"type": "classification",
                        "data": {"train": str(tmp_path / "train.jsonl"), "dev": str(tmp_path / "dev.jsonl"),
                                 "split": {}}}},
        "train": {"batch_size": 8, "max_steps": 4, "eval_every": 4, "lr": 1e-3, "warmup_ratio": 0.0}})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "mtlm.cli", "train", str(path), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "runs" / "short" / "metrics.json").read_text())
    assert m["step"] == 4                       # two epochs: both short last batches were trained on


def test_resume_with_a_changed_recipe(make_recipe, caplog):
    """A setting the checkpoint fixes (lr, max_length, ...) is an error naming each change, not a silent
    no-op; one read anew (max_steps, eval_every, ...) is a warning; an unchanged recipe says nothing."""
    from mtlm.config import RecipeError
    from mtlm.train import fit
    path = make_recipe(tasks=("sentiment",), name="retuned", max_steps=4, eval_every=4)
    fit(mtlm.load_recipe(path), progress=False, stop_after=2)
    with pytest.raises(RecipeError) as e:
        fit(mtlm.load_recipe(path, ["train.lr=0.0007", "max_length=24", "train.eval_every=2"]), resume=True,
            progress=False)
    assert [p.split(" (")[0] for p in e.value.problems] == ["max_length: 32 -> 24", "train.lr: 0.001 -> 0.0007"]
    assert "--resume needs the run's value" in e.value.problems[0]
    with caplog.at_level("WARNING", logger="mtlm"):
        fit(mtlm.load_recipe(path, ["train.max_steps=6", "train.eval_every=3"]), resume=True, progress=False)
    (line,) = [r.getMessage() for r in caplog.records if "--resume with changed settings" in r.getMessage()]
    assert line.endswith("train.eval_every: 4 -> 3; train.max_steps: 4 -> 6")
    assert json.loads((Path(path).parent / "runs" / "retuned" / "metrics.json").read_text())["step"] == 6
    caplog.clear()
    with caplog.at_level("WARNING", logger="mtlm"):                 # the same recipe again: nothing to say
        fit(mtlm.load_recipe(path, ["train.max_steps=6", "train.eval_every=3"]), resume=True, progress=False)
    assert not [r for r in caplog.records if "changed settings" in r.getMessage()]


def test_resume_with_other_tasks_is_a_clear_error(make_recipe):
    from mtlm.config import RecipeError
    from mtlm.train import fit
    path = make_recipe(tasks=("sentiment", "topic"), name="changed", max_steps=4, eval_every=4)
    fit(mtlm.load_recipe(path), progress=False, stop_after=2)
    path = make_recipe(tasks=("sentiment",), name="changed", max_steps=4, eval_every=4)
    with pytest.raises(RecipeError, match="--resume needs the same tasks"):
        fit(mtlm.load_recipe(path), resume=True, progress=False)


def test_folder_that_is_not_a_model_is_a_backbone_error(tmp_path):
    from mtlm.model import BackboneError, load_backbone
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(BackboneError, match="cannot load backbone"):
        load_backbone(str(tmp_path))
