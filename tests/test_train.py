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


def test_overwrite_removes_the_old_run_before_training(make_recipe):
    """--overwrite used to delete only checkpoints and logs: the old model/, metrics.json and eval files
    stayed until the first improving evaluation (and the old bundle's thresholds were re-tuned)."""
    from mtlm.train import fit
    path = make_recipe(tasks=("sentiment", "emotions"), name="again", max_steps=4, eval_every=2)
    run = fit(mtlm.load_recipe(path), progress=False)
    (run / "eval_test.json").write_text("{}")
    assert (run / "model" / "tasks.json").is_file()
    fit(mtlm.load_recipe(path, ["train.eval_every=100", "train.max_steps=10"]), overwrite=True, progress=False,
        stop_after=1)                                        # killed before its first evaluation
    assert not (run / "model").exists() and not (run / "eval_test.json").exists()
    m = json.loads((run / "metrics.json").read_text())
    assert m["step"] == 1 and m["eval"] == [] and m["max_steps"] == 10
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_1"]


def test_resuming_an_early_stopped_run_does_not_train_on(make_recipe):
    from mtlm.train import fit
    path = make_recipe(tasks=("sentiment",), name="early-resume", max_steps=50, eval_every=2, lr=1e-12,
                       early_stopping_patience=2)
    run = fit(mtlm.load_recipe(path), progress=False)
    assert json.loads((run / "metrics.json").read_text())["step"] == 6
    fit(mtlm.load_recipe(path), resume=True, progress=False)
    m = json.loads((run / "metrics.json").read_text())
    assert m["step"] == 6 and m["stopped_early"] is True and latest_checkpoint(run).name == "step_6"
    # a larger patience lets it continue: the stop is state, not a permanent mark
    fit(mtlm.load_recipe(path, ["train.early_stopping_patience=3"]), resume=True, progress=False)
    m = json.loads((run / "metrics.json").read_text())
    assert m["step"] == 8 and m["stopped_early"] is True


def _scripted_evaluations(monkeypatch, evaluations):
    """Make fit's dev evaluations return `evaluations` in turn (each with the old "mean" key)."""
    import mtlm.train
    it = iter(evaluations)

    def scripted(*args, **kwargs):
        m = dict(next(it))
        m["mean"] = (m["sentiment/accuracy"] - m["score/mse"]) / 2
        return m
    monkeypatch.setattr(mtlm.train, "evaluate", scripted)


@pytest.mark.parametrize("unit", [1.0, 100.0, 1e-4])
def test_selection_is_scale_free(make_recipe, monkeypatch, unit):
    """Step 2: accuracy 0.90, mse 10; step 4: accuracy 0.50, mse 9. The old mean of accuracy and -mse
    preferred step 4 (the unbounded mse dominated); the scale-free score keeps step 2 whatever the mse's
    units, and each task's own best is recorded."""
    from mtlm.train import fit
    _scripted_evaluations(monkeypatch, [{"sentiment/accuracy": 0.9, "score/mse": 10.0 * unit},
                                        {"sentiment/accuracy": 0.5, "score/mse": 9.0 * unit}])
    path = make_recipe(tasks=("sentiment", "score"), name=f"select-{unit:g}", max_steps=4, eval_every=2,
                       early_stopping_patience=None)
    run = fit(mtlm.load_recipe(path, ["tasks.score.metric=mse"]), progress=False)
    m = json.loads((run / "metrics.json").read_text())
    assert m["best_step"] == 2
    assert m["task_best"] == {"sentiment": {"metric": "accuracy", "value": 0.9, "step": 2},
                              "score": {"metric": "mse", "value": 9.0 * unit, "step": 4}}
    assert m["eval"][1]["score"] == pytest.approx(((0.1 - 0.5) / 0.1 + 0.1) / 2)


def test_threshold_tuning_rewrites_tasks_json_atomically(make_recipe, monkeypatch):
    """A crash while tasks.json is written leaves the previous file, not a truncated one."""
    from pathlib import Path as P

    from mtlm.callbacks import tune_thresholds
    from mtlm.checkpoint import load_bundle
    from mtlm.data import encode_rows, prepare_rows
    from mtlm.tasks import build_task
    from mtlm.train import fit
    recipe = mtlm.load_recipe(make_recipe(tasks=("emotions",), name="atomic", max_steps=2, eval_every=2))
    run = fit(recipe, progress=False)
    before = (run / "model" / "tasks.json").read_text()
    _, tokenizer, _, _ = load_bundle(run / "model")
    tasks = {"emotions": build_task("emotions", recipe.tasks["emotions"])}
    dev = {n: f["dev"] for n, f in encode_rows(tasks, prepare_rows(recipe, tasks).rows, tokenizer, 32).items()}
    real_write = P.write_text

    def crash_midway(self, text, *args, **kwargs):
        if self.name.startswith("tasks.json"):
            real_write(self, text[: len(text) // 2], *args, **kwargs)
            raise OSError("no space left on device")
        return real_write(self, text, *args, **kwargs)
    monkeypatch.setattr(P, "write_text", crash_midway)
    with pytest.raises(OSError, match="no space"):
        tune_thresholds(run / "model", dev, 16)
    monkeypatch.undo()
    assert (run / "model" / "tasks.json").read_text() == before


def test_resume_of_a_run_whose_recipe_predates_a_new_setting(make_recipe):
    """recipe.yaml of a run started before train.adversarial existed: the new setting at its default is no
    change, so --resume continues."""
    import yaml

    from mtlm.train import fit
    path = make_recipe(tasks=("sentiment",), name="older", max_steps=4, eval_every=4)
    run = fit(mtlm.load_recipe(path), progress=False, stop_after=2)
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    del saved["train"]["adversarial"]
    (run / "recipe.yaml").write_text(yaml.safe_dump(saved))
    fit(mtlm.load_recipe(path), resume=True, progress=False)
    assert json.loads((run / "metrics.json").read_text())["step"] == 4


def test_resume_and_overwrite_together_is_an_error(make_recipe):
    from mtlm.config import RecipeError
    from mtlm.train import fit
    with pytest.raises(RecipeError, match="give one of them"):
        fit(mtlm.load_recipe(make_recipe(name="both")), resume=True, overwrite=True, progress=False)
