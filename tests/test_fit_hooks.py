"""fit's extension points (loss hook, model hook, callbacks) and the loop settings that had no test
(cosine / constant schedules, keep_checkpoints, bf16). Tiny random backbone on CPU."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import mtlm
from mtlm.callbacks import Callback
from mtlm.train import fit


def _train_log(run):
    return json.loads((run / "metrics.json").read_text())["train"]


def test_loss_hook_doubling_a_task_doubles_its_logged_loss(make_recipe):
    # all_tasks: both tasks in the one step; dropout 0 and the same seed: the same batches and forward
    common = dict(tasks=("sentiment", "topic"), max_steps=1, eval_every=1, dropout=0.0, step_mode="all_tasks",
                  early_stopping_patience=None)
    plain = fit(mtlm.load_recipe(make_recipe(name="plain", **common)), progress=False)
    seen = []

    def double_sentiment(ctx):
        seen.append((ctx.source, sorted(ctx.losses), ctx.step))
        return {t: loss * 2 if t == "sentiment" else loss for t, loss in ctx.losses.items()}

    doubled = fit(mtlm.load_recipe(make_recipe(name="doubled", **common)), progress=False, loss_fn=double_sentiment)
    a, b = _train_log(plain)[-1], _train_log(doubled)[-1]
    assert b["loss/sentiment"] == pytest.approx(2 * a["loss/sentiment"], rel=1e-4)
    assert b["loss/topic"] == pytest.approx(a["loss/topic"], rel=1e-6)
    assert seen == [("sentiment", ["sentiment"], 0), ("topic", ["topic"], 0)]


def test_loss_hook_must_keep_the_task_names(make_recipe):
    path = make_recipe(tasks=("sentiment",), name="renamed", max_steps=2)
    with pytest.raises(ValueError, match="keeps the task names"):
        fit(mtlm.load_recipe(path), progress=False, loss_fn=lambda ctx: {"other": ctx.losses["sentiment"]})


def test_model_hook_freezing_the_backbone_leaves_it_unchanged(make_recipe, tiny_backbone):
    calls = []

    def freeze_backbone(model):
        calls.append(type(model).__name__)
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        return model

    run = fit(mtlm.load_recipe(make_recipe(tasks=("sentiment",), name="frozen", max_steps=4, eval_every=4)),
              progress=False, model_fn=freeze_backbone)
    assert calls == ["MultiTaskModel"]
    before = load_file(f"{tiny_backbone}/model.safetensors")
    after = load_file(run / "model" / "backbone" / "model.safetensors")
    for k, v in after.items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    # the heads did train (lr 1e-3): the hook froze only what it froze
    unfrozen = fit(mtlm.load_recipe(make_recipe(tasks=("sentiment",), name="unfrozen", max_steps=4, eval_every=4)),
                   progress=False)
    moved = load_file(unfrozen / "model" / "backbone" / "model.safetensors")
    assert any(not torch.equal(moved[k], before[k]) for k in moved)


class Recorder(Callback):
    def __init__(self, stop_at=None):
        self.events, self.lrs, self.stop_at = [], {}, stop_at

    def on_train_begin(self, run):
        self.events.append(("begin", run.step))

    def on_step_end(self, run, step, losses, weights):
        self.events.append(("step", step, sorted(losses)))
        self.lrs[step] = run.scheduler.get_last_lr()[0]
        if step == self.stop_at:
            run.stop = "test"

    def on_evaluate(self, run, step, metrics):
        self.events.append(("eval", step, "sentiment/accuracy" in metrics))

    def on_train_end(self, run):
        self.events.append(("end", run.step))


def test_callbacks_are_called_and_can_stop_training(make_recipe):
    rec = Recorder(stop_at=3)
    run = fit(mtlm.load_recipe(make_recipe(tasks=("sentiment",), name="cb", max_steps=10, eval_every=2,
                                           early_stopping_patience=None)), progress=False, callbacks=[rec])
    assert rec.events == [("begin", 0), ("step", 1, ["sentiment"]), ("eval", 2, True), ("step", 2, ["sentiment"]),
                          ("step", 3, ["sentiment"]), ("end", 3)]
    m = json.loads((run / "metrics.json").read_text())
    assert m["step"] == 3 and (run / "checkpoints" / "step_3").is_dir()   # a stop is checkpointed


@pytest.mark.parametrize("scheduler", ["cosine", "constant"])
def test_schedules_give_the_documented_lr(make_recipe, scheduler):
    """20 steps, 10% warmup (2 steps), peak 1e-3: linear warmup, then cosine decay to 0 / constant.
    lrs[s] is the rate after s optimizer steps (the one step s+1 uses)."""
    rec = Recorder()
    fit(mtlm.load_recipe(make_recipe(tasks=("sentiment",), name=f"lr-{scheduler}", max_steps=20, eval_every=100,
                                     warmup_ratio=0.1, scheduler=scheduler, early_stopping_patience=None)),
        progress=False, callbacks=[rec])
    assert rec.lrs[1] == pytest.approx(0.5e-3)                     # half-way through warmup
    assert rec.lrs[2] == pytest.approx(1e-3)
    if scheduler == "cosine":
        assert rec.lrs[11] == pytest.approx(0.5e-3)                # half-way through the decay: (11 - 2) / 18
        assert rec.lrs[5] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 18)))
        assert rec.lrs[20] == pytest.approx(0.0, abs=1e-12)
    else:
        assert rec.lrs[11] == pytest.approx(1e-3) and rec.lrs[20] == pytest.approx(1e-3)


def test_keep_checkpoints_rotation(make_recipe):
    run = fit(mtlm.load_recipe(make_recipe(tasks=("sentiment",), name="rotate", max_steps=8, eval_every=100,
                                           checkpoint_every=2, keep_checkpoints=2, early_stopping_patience=None)),
              progress=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_6", "step_8"]


def test_bf16_through_fit_is_close_to_fp32(make_recipe, monkeypatch):
    """bf16 autocast on the CPU (forced on: this CPU may lack native bf16, see mtlm.precision) trains
    to nearly the same model as fp32, and differently (so bf16 was in effect)."""
    import mtlm.train
    from accelerate.state import AcceleratorState
    monkeypatch.setattr(mtlm.train, "native_bf16", lambda: True)
    # Accelerate keeps one process-wide state whose mixed precision cannot change: reset it around the
    # bf16 run (one process, nothing distributed to tear down)
    common = dict(tasks=("sentiment", "ner"), max_steps=6, eval_every=6, dropout=0.0, early_stopping_patience=None)
    fp32 = fit(mtlm.load_recipe(make_recipe(name="fp32", mixed_precision="no", **common)), progress=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        bf16 = fit(mtlm.load_recipe(make_recipe(name="bf16", mixed_precision="bf16", **common)), progress=False)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    a, b = _train_log(fp32)[-1], _train_log(bf16)[-1]
    for key in ("loss/sentiment", "loss/ner"):
        assert b[key] == pytest.approx(a[key], rel=0.05), key
        # (the loop's losses are fp32 in both: bf16 shows in the last bits)
    assert a != b
    ha, hb = (load_file(r / "model" / "heads.safetensors") for r in (fp32, bf16))
    diff = max((ha[k] - hb[k]).abs().max().item() for k in ha)
    assert 0 < diff < 5e-3
