"""Loss weighting: each method against hand-computed values on tiny problems, the recipe checks, learned
state saved and restored by --resume, loss scaling (CPU with a real GradScaler; fp16 on CUDA when present),
every method under bf16 and fp16 (+ GradScaler) autocast against fp32, and 2 processes == 1 process for a
gradient-level method."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mtlm
from mtlm.config import RecipeError
from mtlm.recipe import parse_recipe
from mtlm.weighting import WEIGHTINGS, build_weighting
from mtlm.weighting.gradnorm import gradnorm_logit_grad, last_shared_layer
from mtlm.weighting.loss_history import DWA, FAMO, dwa_weights, famo_logit_grad, famo_loss_weights
from mtlm.weighting.loss_weights import Uncertainty
from mtlm.weighting.surgery import PCGrad, cagrad, pcgrad


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator
    return Accelerator(cpu=True)


# ---------------------------------------------------------------- hand-computed values

def test_pcgrad_projects_two_conflicting_gradients():
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])       # g1 . g2 = -1 < 0
    # g1' = g1 - (-1 / 2) g2 = (0.5, 0.5); g2' = g2 - (-1 / 1) g1 = (0, 1); sum = (0.5, 1.5)
    torch.testing.assert_close(pcgrad(g, torch.Generator().manual_seed(0)), torch.tensor([0.5, 1.5]))
    # each projected gradient no longer conflicts with the other task's original gradient
    assert (pcgrad(g[:1].clone(), None) == g[0]).all()
    agreeing = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(pcgrad(agreeing, None), agreeing.sum(0))   # no conflict: the plain sum


def test_pcgrad_order_is_seeded():
    g = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [-0.5, -1.0, 1.0]])
    a = pcgrad(g, torch.Generator().manual_seed(3))
    b = pcgrad(g, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, g.sum(0))            # conflicts were projected away


def test_cagrad_orthogonal_gradients():
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # g0 = (.5, .5), |g0| = sqrt(.5); by symmetry w = (.5, .5), g_w = g0, lambda = c|g0| / |g_w| = c;
    # d = (1 + c) g0 = (.75, .75) for c = .5, divided by 1 + c^2 = 1.25 -> (.6, .6)
    d, coef = cagrad(g, c=0.5, rescale=1)
    torch.testing.assert_close(d, torch.tensor([0.6, 0.6]), atol=1e-4, rtol=0)
    torch.testing.assert_close(coef, torch.tensor([0.6, 0.6]), atol=1e-4, rtol=0)
    d0, _ = cagrad(g, c=0.0, rescale=1)                 # c = 0: the average gradient
    torch.testing.assert_close(d0, torch.tensor([0.5, 0.5]), atol=1e-4, rtol=0)


def test_cagrad_weights_match_a_grid_search():
    g = torch.tensor([[2.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    c = 0.5
    d, coef = cagrad(g, c=c, rescale=0)
    g0 = g.mean(0)
    radius = c * float(g0.norm())
    grid = np.linspace(0, 1, 20001)
    values = [float((x * g[0] + (1 - x) * g[1]) @ g0) + radius * float((x * g[0] + (1 - x) * g[1]).norm())
              for x in grid]
    x = grid[int(np.argmin(values))]
    gw = x * g[0] + (1 - x) * g[1]
    expected = g0 + radius / float(gw.norm()) * gw
    torch.testing.assert_close(d, expected, atol=2e-3, rtol=0)
    torch.testing.assert_close(coef @ g, d)
    # the conflict-averse direction improves the worse task more than the plain average does
    assert min(float(d @ gi) for gi in g) > min(float(g0 @ gi) for gi in g)


def test_dwa_weights_from_a_known_history():
    # r = (1/2, 2/2) = (.5, 1); T = 2: softmax(.25, .5) = (e^.25, e^.5) / (e^.25 + e^.5); times K = 2
    w = dwa_weights(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.0]), 2.0)
    e1, e2 = math.exp(0.25), math.exp(0.5)
    torch.testing.assert_close(w, torch.tensor([2 * e1 / (e1 + e2), 2 * e2 / (e1 + e2)]))
    assert w[1] > w[0]                # the task whose loss did not fall gains weight


def test_dwa_updates_after_two_windows(accelerator):
    dwa = DWA({"a": 1.0, "b": 1.0}, window=2, temperature=2.0)
    history = [(4.0, 2.0), (4.0, 2.0), (2.0, 2.0), (2.0, 2.0)]    # window means: (4, 2) then (2, 2)
    x = torch.zeros((), requires_grad=True)
    for i, (la, lb) in enumerate(history):
        assert dwa.current() == {"a": 1.0, "b": 1.0}                  # 1 until two windows are complete
        dwa.backward({"a": x + la, "b": x + lb}, accelerator)
        dwa.step(accelerator)
    expected = dwa_weights(torch.tensor([2.0, 2.0]), torch.tensor([4.0, 2.0]), 2.0)
    assert list(dwa.current().values()) == pytest.approx(expected.tolist())


def test_uncertainty_gradient(accelerator):
    u = Uncertainty({"a": 1.0, "b": 1.0}, init=0.0)
    with torch.no_grad():
        u.log_var.copy_(torch.tensor([0.0, math.log(2.0)]))
    w = torch.ones((), requires_grad=True)
    losses = {"a": w * 3.0, "b": w * 0.5}
    u.backward(losses, accelerator, scale=0.5)
    # d/ds_i of scale * (exp(-s_i) L_i + s_i) / 2 = scale * (1 - exp(-s_i) L_i) / 2
    expected = torch.tensor([0.5 * (1 - 3.0) / 2, 0.5 * (1 - 0.5 / 2) / 2])
    torch.testing.assert_close(u.log_var.grad, expected)
    # the model's gradient: scale * sum_i exp(-s_i) L_i' / 2 = 0.5 * (3 + 0.5 / 2) / 2
    torch.testing.assert_close(w.grad, torch.tensor(0.5 * (3.0 + 0.25) / 2))
    assert u.current() == pytest.approx({"a": 0.5, "b": 0.25})
    assert u.param_groups()[0]["params"] == [u.log_var]


def test_famo_weights_and_update(accelerator):
    # z uniform, L = (1, 3): w_i = (z_i / L_i) / sum_j (z_j / L_j) = (.75, .25)
    torch.testing.assert_close(famo_loss_weights(torch.zeros(2), torch.tensor([1.0, 3.0])), torch.tensor([0.75, 0.25]))
    # J_softmax^T delta at z = (.5, .5), delta = (log 2, 0): (.25 log 2, -.25 log 2)
    torch.testing.assert_close(famo_logit_grad(torch.zeros(2), torch.tensor([math.log(2.0), 0.0])),
                               torch.tensor([0.25 * math.log(2.0), -0.25 * math.log(2.0)]))
    famo = FAMO({"a": 1.0, "b": 1.0}, lr=0.1, gamma=0.0)
    x = torch.ones((), requires_grad=True)
    famo.backward({"a": x * 2.0, "b": x * 4.0}, accelerator)
    assert x.grad == pytest.approx(2 * (2 / 3) + 4 * (1 / 3))          # w = (1/2, 1/4) / (3/4)
    famo.step(accelerator)
    assert famo.logits.tolist() == [0.0, 0.0]                           # no previous step yet
    famo.backward({"a": x * 1.0, "b": x * 4.0}, accelerator)            # a's loss halved, b's unchanged
    famo.step(accelerator)
    # Adam's first step moves each logit by lr against the sign of its gradient: a -> -0.1, b -> +0.1
    torch.testing.assert_close(famo.logits.detach(), torch.tensor([-0.1, 0.1]), atol=1e-6, rtol=0)


def test_gradnorm_logit_gradient():
    # w = (1, 1), norms (1, 3) -> G = (1, 3), Gbar = 2; ratios (1, .5) -> r = (4/3, 2/3); alpha 1:
    # target = (8/3, 4/3); dL/dw = sign(G - target) * norms = (-1, 3); dw/dlogits = 2 z (I - z^T) with
    # z = (.5, .5) = [[.5, -.5], [-.5, .5]] -> (-2, 2): the slower task (a) gains weight
    grad = gradnorm_logit_grad(torch.zeros(2), torch.tensor([1.0, 3.0]), torch.tensor([1.0, 0.5]), alpha=1.0)
    torch.testing.assert_close(grad, torch.tensor([-2.0, 2.0]))


def test_gradnorm_finds_the_last_layer(tiny_backbone):
    from transformers import AutoModel
    backbone = AutoModel.from_pretrained(tiny_backbone, add_pooling_layer=False)
    layer = last_shared_layer(backbone)
    assert [id(p) for p in layer] == [id(p) for p in backbone.encoder.layer[-1].parameters()]
    with pytest.raises(ValueError, match="no nn.ModuleList"):
        last_shared_layer(nn.Linear(2, 2))


# ---------------------------------------------------------------- loss scaling

class TwoTasks(nn.Module):
    """A linear 'backbone' and two linear heads: per-task gradients are easy to compute by hand."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Linear(3, 4)
        self.heads = nn.ModuleDict({"a": nn.Linear(4, 1), "b": nn.Linear(4, 1)})

    def losses(self, x, ya, yb):
        h = self.backbone(x)
        return {"a": F.mse_loss(self.heads["a"](h).squeeze(-1), ya), "b": F.mse_loss(self.heads["b"](h).squeeze(-1), yb)}


def test_pcgrad_under_loss_scaling_equals_unscaled(accelerator):
    """With a GradScaler (scale 1024), PCGrad divides the per-task gradients by the scale before projecting
    and writes scale * combined: after unscaling, shared and head gradients equal the unscaled computation."""
    x, ya, yb = torch.randn(8, 3), torch.randn(8), -torch.randn(8)
    ref_model = TwoTasks()
    losses = ref_model.losses(x, ya, yb)
    shared = list(ref_model.backbone.parameters())
    per_task = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[n], shared, retain_graph=True)])
                            for n in ("a", "b")])
    expected = pcgrad(per_task, torch.Generator().manual_seed(0))
    expected_head = torch.autograd.grad(losses["a"], list(ref_model.heads["a"].parameters()))

    model = TwoTasks()
    scaled = copy.copy(accelerator)
    scaled.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    method = PCGrad({"a": 1.0, "b": 1.0}, model=model, seed=0)
    method.backward(model.losses(x, ya, yb), scaled)
    method.step(scaled)
    got = torch.cat([p.grad.reshape(-1) for p in model.backbone.parameters()]) / 1024.0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for g, e in zip(model.heads["a"].parameters(), expected_head):
        torch.testing.assert_close(g.grad / 1024.0, e, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- recipe checks

def _recipe(train: dict, weight: float | None = None) -> dict:
    task = {"type": "classification", "data": {"train": "x.csv"}}
    if weight is not None:
        task["weight"] = weight
    return {"name": "r", "tasks": {"a": task, "b": {"type": "classification", "data": {"train": "y.csv"}}},
            "train": train}


def _problems(raw: dict) -> list[str]:
    with pytest.raises(RecipeError) as e:
        parse_recipe(raw, __import__("pathlib").Path("."))
    return e.value.problems


def test_weighting_recipe_forms(tmp_path):
    r = parse_recipe(_recipe({"weighting": "pcgrad"}), tmp_path)
    assert r.train.weighting.name == "pcgrad" and r.train.weighting.options() == {}
    r = parse_recipe(_recipe({"weighting": {"name": "dwa", "temperature": 3.0}}), tmp_path)
    assert r.train.weighting.options() == {"temperature": 3.0}
    again = parse_recipe(__import__("yaml").safe_load(r.to_yaml()), tmp_path)     # round trip
    assert again.train.weighting == r.train.weighting
    r = parse_recipe(_recipe({}), tmp_path, ["train.weighting.name=famo", "train.weighting.lr=0.05"])
    assert r.train.weighting.name == "famo" and r.train.weighting.options() == {"lr": 0.05}
    assert set(WEIGHTINGS) == {"static", "uncertainty", "dwa", "gradnorm", "pcgrad", "cagrad", "famo"}


def test_weighting_recipe_errors_all_at_once():
    problems = _problems(_recipe({"weighting": {"name": "dwa", "temprature": 2.0, "window": 0}}, weight=0.5))
    assert "train.weighting.temprature: unknown option for dwa (options: temperature, window)" in problems
    assert any(p.startswith("train.weighting.window: Input should be greater than 0") for p in problems)
    assert any(p.startswith("tasks.a.weight: 0.5 is a static loss weight, but weighting 'dwa'") for p in problems)
    assert _problems(_recipe({"weighting": "gradsurgery"})) == [
        "train.weighting.name: unknown weighting 'gradsurgery' (known: static, uncertainty, dwa, gradnorm, pcgrad, "
        "cagrad, famo)"]
    assert any("train.step_mode: pcgrad needs every task's loss" in p
               for p in _problems(_recipe({"weighting": "pcgrad", "step_mode": "sampled"})))
    assert any(p.startswith("train.sampling: 'temperature' has no effect with weighting famo")
               for p in _problems(_recipe({"weighting": "famo", "sampling": "temperature"})))
    assert any("unknown option for static" in p for p in _problems(_recipe({"weighting": {"lr": 0.1}})))


def test_build_weighting_raises_recipe_error(tmp_path):
    recipe = parse_recipe(_recipe({}), tmp_path)
    recipe.train.weighting = {"name": "cagrad", "c": -1}
    with pytest.raises(RecipeError, match="train.weighting.c"):
        build_weighting(recipe.train, {"a": 1.0, "b": 1.0}, None, "cpu")


# ---------------------------------------------------------------- in the training loop

def _weighting_state(run, step):
    return torch.load(run / "checkpoints" / f"step_{step}" / "custom_checkpoint_1.pkl", weights_only=False)


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("method,options,moved", [
    ("uncertainty", {"lr": 0.05}, "log_var"),
    ("dwa", {"window": 2}, "weights"),
    ("famo", {}, "logits"),
    ("gradnorm", {}, "logits"),
])
def test_learned_weights_train_and_resume_identically(make_recipe, method, options, moved):
    """The method's state moves during training, is checkpointed, and --resume continues exactly."""
    from safetensors.torch import load_file
    from mtlm.train import fit
    common = dict(tasks=("sentiment", "topic"), max_steps=6, eval_every=6, early_stopping_patience=None,
                  weighting={"name": method, **options})
    straight = fit(mtlm.load_recipe(make_recipe(name=f"{method}-straight", **common)), progress=False)
    recipe = mtlm.load_recipe(make_recipe(name=f"{method}-killed", checkpoint_every=3, **common))
    run = fit(recipe, progress=False, stop_after=3)                  # dwa: killed in the middle of a window
    fit(recipe, resume=True, progress=False)
    a, b = _weighting_state(straight, 6), _weighting_state(run, 6)
    _assert_same(a, b)
    initial = {"log_var": 0.0, "weights": 1.0, "logits": 0.0}[moved]
    assert (a[moved] - initial).abs().max() > 1e-4, f"{method}: {moved} never moved: {a[moved]}"
    heads_a, heads_b = load_file(straight / "model" / "heads.safetensors"), load_file(run / "model" / "heads.safetensors")
    for k in heads_a:
        torch.testing.assert_close(heads_a[k], heads_b[k], rtol=0, atol=1e-6, msg=k)
    log = json.loads((run / "metrics.json").read_text())["train"]
    assert {"weight/sentiment", "weight/topic"} <= set(log[-1])
    assert (run / "logs").is_dir()


def test_cagrad_trains(make_recipe):
    run = mtlm.fit(mtlm.load_recipe(make_recipe(tasks=("sentiment", "topic", "ner"), name="cagrad", max_steps=3,
                                                eval_every=3, weighting={"name": "cagrad", "c": 0.4})),
                   progress=False)
    log = json.loads((run / "metrics.json").read_text())
    coef = [log["train"][-1][f"weight/{n}"] for n in ("sentiment", "topic", "ner")]
    # CAGrad moves the update off the plain average of the task gradients: the coefficients it logs are not
    # the static weights (1 each) and differ between tasks whose gradients conflict
    assert max(abs(c - 1.0) for c in coef) > 1e-3 and max(coef) - min(coef) > 1e-4, coef
    assert math.isfinite(log["eval"][-1]["mean"])


@pytest.mark.requires(executable="accelerate", hint="pip install accelerate")
def test_pcgrad_two_processes_match_one(make_recipe, tmp_path):
    """PCGrad under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo), with accumulation:
    per-task gradients are all-reduced before projecting, so 2 x batch 8 gives the update of 1 x batch 16."""
    from safetensors.torch import load_file
    common = dict(tasks=("sentiment", "paraphrase"), max_steps=3, eval_every=3, dropout=0.0, grad_accum=2,
                  early_stopping_patience=None, weighting="pcgrad")
    one = make_recipe(name="pc-one", batch_size=16, **common)
    two = make_recipe(name="pc-two", batch_size=8, **common)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    mtlm.fit(mtlm.load_recipe(one), progress=False)          # one process, here
    proc = subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "mtlm.cli", "train", str(two), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_one, run_two = tmp_path / "runs" / "pc-one", tmp_path / "runs" / "pc-two"
    assert json.loads((run_two / "metrics.json").read_text())["step"] == 3
    for name in ("heads.safetensors", "backbone/model.safetensors"):
        a, b = load_file(run_one / "model" / name), load_file(run_two / "model" / name)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)


CUDA_SCRIPT = r'''
import copy, sys
import torch, torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import GradScalerKwargs
from torch import nn
from transformers import AutoModel
from mtlm.model import MultiTaskModel
from mtlm.tasks.base import LinearHead
from mtlm.weighting.surgery import PCGrad, pcgrad

torch.manual_seed(0)
backbone = AutoModel.from_pretrained(sys.argv[1], add_pooling_layer=False)
heads = nn.ModuleDict({"a": LinearHead(32, 2, 0.0), "b": LinearHead(32, 3, 0.0)})
model = MultiTaskModel(backbone, heads, {"a": "pooled", "b": "pooled"}, "mean").eval()
reference = copy.deepcopy(model).cuda()
acc = Accelerator(mixed_precision="fp16", kwargs_handlers=[GradScalerKwargs(init_scale=1024.0)])
method = PCGrad({"a": 1.0, "b": 1.0}, model=model, device=acc.device, seed=0)
model, opt = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0))
ids = torch.randint(5, 60, (8, 12), device="cuda")
mask = torch.ones_like(ids)
la, lb = torch.randint(0, 2, (8,), device="cuda"), torch.randint(0, 3, (8,), device="cuda")

def losses(m):
    out = m(input_ids=ids, attention_mask=mask, tasks=["a", "b"])
    return {"a": F.cross_entropy(out["a"].float(), la), "b": F.cross_entropy(out["b"].float(), lb)}

method.backward(losses(model), acc)              # fp16 autocast (Accelerate), scaled by 1024
method.step(acc)
assert acc.scaler.get_scale() == 1024.0
acc.unscale_gradients()
got = torch.cat([p.grad.reshape(-1).float() for p in acc.unwrap_model(model).backbone.parameters()])
got_head = torch.cat([p.grad.reshape(-1).float() for p in acc.unwrap_model(model).heads["a"].parameters()])

ref = losses(reference)                         # fp32, no scaling
shared = list(reference.backbone.parameters())
per_task = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(ref[n], shared, retain_graph=True)])
                        for n in ("a", "b")])
expected = pcgrad(per_task, torch.Generator().manual_seed(0))
expected_head = torch.cat([g.reshape(-1) for g in torch.autograd.grad(ref["a"], list(reference.heads["a"].parameters()))])
for g, e in ((got, expected), (got_head, expected_head)):
    cos = float(F.cosine_similarity(g, e, dim=0))
    ratio = float(g.norm() / e.norm())
    print(f"cosine {cos:.5f} norm ratio {ratio:.4f}")
    assert cos > 0.995 and abs(ratio - 1) < 0.03, (cos, ratio)
print("ok")
'''


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 loss scaling needs CUDA")
def test_pcgrad_fp16_loss_scaling_on_cuda(tiny_backbone, make_recipe, tmp_path):
    """fp16 autocast + GradScaler: the gradients PCGrad writes, once unscaled, are the fp32 PCGrad gradients
    (not 1024x them); then fit() trains with fp16 + pcgrad and stays finite."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", CUDA_SCRIPT, tiny_backbone], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    path = make_recipe(tasks=("sentiment", "topic"), name="fp16", max_steps=4, eval_every=4,
                       mixed_precision="fp16", weighting="pcgrad")
    proc = subprocess.run([sys.executable, "-m", "mtlm.cli", "train", str(path), "--no-progress"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "runs" / "fp16" / "metrics.json").read_text())
    assert all(math.isfinite(v) for k, v in m["train"][-1].items() if k.startswith("loss/"))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name", list(WEIGHTINGS))
def test_every_method_under_autocast_matches_fp32(name, precision, accelerator, tiny_backbone):
    """Mixed precision as the training loop runs it (`torch.autocast` around the forwards; fp16 also with a
    GradScaler, here at scale 1024 on the CPU, the same code path as CUDA's): each method's backbone and
    head gradients, unscaled, point where its fp32 gradients point (cosine > 0.99, norm within 5%), i.e. no
    method reads scaled or half-precision gradients as if they were fp32, or loses a task's share."""
    from transformers import AutoModel

    from mtlm.config import TrainConfig
    from mtlm.model import MultiTaskModel
    from mtlm.tasks.base import LinearHead

    torch.manual_seed(0)
    backbone = AutoModel.from_pretrained(tiny_backbone, add_pooling_layer=False)
    hidden = backbone.config.hidden_size
    heads = nn.ModuleDict({"a": LinearHead(hidden, 2, 0.0), "b": LinearHead(hidden, 3, 0.0)})
    base = MultiTaskModel(backbone, heads, {"a": "pooled", "b": "pooled"}, "mean").eval()
    ids, labels = torch.randint(5, 60, (8, 12)), {"a": torch.randint(0, 2, (8,)), "b": torch.randint(0, 3, (8,))}
    train = TrainConfig(weighting={"name": name}, seed=0)

    def grads(dtype, scale):
        model = copy.deepcopy(base)
        method = build_weighting(train, {"a": 1.0, "b": 1.0}, model, torch.device("cpu"))
        acc = copy.copy(accelerator)
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale != 1.0 else None
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), tasks=["a", "b"])
        assert out["a"].dtype == (dtype or torch.float32)           # the forward really ran in half precision
        losses = {n: F.cross_entropy(out[n].float(), labels[n]) for n in ("a", "b")}
        method.backward(losses, acc)
        method.step(acc)
        return [torch.cat([p.grad.reshape(-1).float() for p in part.parameters() if p.grad is not None]) / scale
                for part in (model.backbone, model.heads["a"], model.heads["b"])]

    half = grads(torch.bfloat16, 1.0) if precision == "bf16" else grads(torch.float16, 1024.0)
    for got, want in zip(half, grads(None, 1.0)):
        cos = float(F.cosine_similarity(got, want, dim=0))
        assert cos > 0.99 and abs(float(got.norm() / want.norm()) - 1) < 0.05, (name, cos)
