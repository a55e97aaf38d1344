"""Head learning rates (`train.head_lr`, `tasks.<name>.head_lr`) and the head warm-up (`train.head_warmup_steps`)
on a tiny random backbone: optimizer groups, what moves during the warm-up, and resume."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mtlm.callbacks import Callback
from mtlm.config import RecipeError
from mtlm.recipe import load_recipe
from mtlm.train import build, fit, param_groups


def test_groups_without_head_lr_are_the_two_weight_decay_groups(make_recipe):
    run = build(load_recipe(make_recipe(tasks=("sentiment", "ner"))))
    groups = run.optimizer.param_groups
    assert len(groups) == 2 and [g["weight_decay"] for g in groups] == [0.01, 0.0]
    assert sum(len(g["params"]) for g in groups) == len([p for p in run.unwrapped.parameters() if p.requires_grad])


def test_head_lr_is_absolute_and_a_task_overrides_it(make_recipe):
    recipe = load_recipe(make_recipe(tasks=("sentiment", "topic", "ner"), lr=1e-4),
                         ["train.head_lr=3e-3", "tasks.ner.head_lr=1e-2"])
    run = build(recipe)
    model = run.unwrapped
    lr_of = {id(p): g["lr"] for g in run.optimizer.param_groups for p in g["params"]}
    assert {lr_of[id(p)] for p in model.backbone.parameters()} == {1e-4}
    assert {lr_of[id(p)] for p in model.heads["sentiment"].parameters()} == {3e-3}
    assert {lr_of[id(p)] for p in model.heads["ner"].parameters()} == {1e-2}
    assert len(lr_of) == len([p for p in model.parameters() if p.requires_grad])   # every parameter, once
    # the schedule scales each group from its own peak: after 10 of 20 linear-decay steps, half of each
    for _ in range(10):
        run.optimizer.step()
        run.scheduler.step()
    lrs = sorted({round(g["lr"], 9) for g in run.optimizer.param_groups})
    assert lrs == [5e-5, 1.5e-3, 5e-3]


def test_param_groups_keep_weight_decay_off_head_biases():
    model = torch.nn.Module()
    model.heads = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 2)})
    model.body = torch.nn.Linear(3, 3)
    groups = param_groups(model, 0.1, {"a": 1e-2})
    assert [(len(g["params"]), g["weight_decay"], g.get("lr")) for g in groups] == \
        [(1, 0.1, None), (1, 0.0, None), (1, 0.1, 1e-2), (1, 0.0, 1e-2)]


class Snapshots(Callback):
    """The first backbone layer's and the sentiment head's weights after every step."""

    def __init__(self):
        self.backbone, self.head = {}, {}

    def on_step_end(self, run, step, losses, weights):
        m = run.unwrapped
        self.backbone[step] = m.backbone.encoder.layer[0].attention.self.query.weight.detach().clone()
        self.head[step] = next(m.heads["sentiment"].parameters()).detach().clone()


def test_head_warmup_freezes_everything_but_the_heads_then_trains_all(make_recipe):
    recipe = load_recipe(make_recipe(tasks=("sentiment", "ner"), max_steps=6, eval_every=6),
                         ["train.head_warmup_steps=3", "tasks.ner.private_layers=1"])
    start = build(recipe).unwrapped
    initial = start.backbone.encoder.layer[0].attention.self.query.weight.detach().clone()
    private = start.private["ner"][0].output.dense.weight.detach().clone()
    snaps = Snapshots()
    run = fit(recipe, progress=False, callbacks=[snaps], overwrite=True)
    for step in (1, 2, 3):
        assert torch.equal(snaps.backbone[step], initial), step
    assert not torch.equal(snaps.head[1], snaps.head[3])
    assert not torch.equal(snaps.backbone[4], initial)
    trained = load_file(run / "model" / "private_layers.safetensors")["ner.0.output.dense.weight"]
    assert not torch.equal(trained, private)


def test_resume_with_head_lr_and_warmup_continues_identically(make_recipe):
    over = ["train.head_lr=1e-2", "train.head_warmup_steps=2"]
    straight = fit(load_recipe(make_recipe(tasks=("sentiment", "ner"), name="a", max_steps=8, eval_every=4,
                                           early_stopping_patience=None), over), progress=False)
    path = make_recipe(tasks=("sentiment", "ner"), name="b", max_steps=8, eval_every=4, early_stopping_patience=None)
    fit(load_recipe(path, over), progress=False, stop_after=4)
    resumed = fit(load_recipe(path, over), progress=False, resume=True)
    for file in ("heads.safetensors", "backbone/model.safetensors"):
        a, b = load_file(straight / "model" / file), load_file(resumed / "model" / file)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_bad_head_settings_are_recipe_errors(make_recipe):
    with pytest.raises(RecipeError, match=r"train: .*head_warmup_steps \(20\) must be less than max_steps \(20\)"):
        load_recipe(make_recipe(), ["train.head_warmup_steps=20"])
    with pytest.raises(RecipeError, match=r"tasks\.topic\.head_lr"):
        load_recipe(make_recipe(), ["tasks.topic.head_lr=0"])


def test_initial_loss_normalization_divides_by_the_first_loss_and_resumes(make_recipe):
    from mtlm.loss_normalization import InitialLossNormalization

    class Ctx:
        def __init__(self, losses):
            self.losses = losses
    hook = InitialLossNormalization()
    first = hook(Ctx({"ner": torch.tensor(2.0), "topic": torch.tensor(4.0)}))
    assert {k: float(v) for k, v in first.items()} == {"ner": 1.0, "topic": 1.0}
    later = hook(Ctx({"ner": torch.tensor(1.0, requires_grad=True)}))
    assert float(later["ner"]) == 0.5 and later["ner"].requires_grad      # gradients flow, scaled by 1/L(0)

    over = ["train.loss_normalization=initial"]
    straight = fit(load_recipe(make_recipe(tasks=("sentiment", "ner"), name="a", max_steps=8, eval_every=4,
                                           early_stopping_patience=None), over), progress=False)
    path = make_recipe(tasks=("sentiment", "ner"), name="b", max_steps=8, eval_every=4, early_stopping_patience=None)
    fit(load_recipe(path, over), progress=False, stop_after=4)
    resumed = fit(load_recipe(path, over), progress=False, resume=True)
    import json
    evals = [json.loads((r / "metrics.json").read_text())["eval"] for r in (straight, resumed)]
    assert [{k: v for k, v in e.items() if "/" in k} for e in evals[0]] == \
        [{k: v for k, v in e.items() if "/" in k} for e in evals[1]]
    from mtlm.checkpoint import latest_checkpoint
    saved = json.loads((latest_checkpoint(resumed) / "trainer_state.json").read_text())["callbacks"]
    assert set(saved["loss_normalization"]["initial"]) == {"sentiment", "ner"}
    a, b = load_file(straight / "model" / "heads.safetensors"), load_file(resumed / "model" / "heads.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
