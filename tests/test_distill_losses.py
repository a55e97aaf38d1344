"""Distillation losses against hand computations, the teacher cache, and the loss hook (no training)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mtlm.distill import DistillError, Distiller, distillation_term
from mtlm.distill.teacher import TeacherCache
from mtlm.hooks import LossContext
from mtlm.model import MultiTaskModel
from mtlm.tasks.base import LinearHead
from mtlm.tasks.multiple_choice import MISSING
from mtlm.tasks.token_classification import IGNORE


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def _softmax(xs, t=1.0):
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def test_categorical_is_the_hand_computed_kl_times_t_squared():
    s, t = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 0.5]])
    for T in (1.0, 2.0, 4.0):
        want = _kl(_softmax([0.0, 2.0, 0.5], T), _softmax([1.0, 0.0, -1.0], T)) * T * T
        assert float(distillation_term("categorical", s, t, {}, None, T)) == pytest.approx(want, rel=1e-5)


def test_every_kind_is_zero_when_the_student_equals_the_teacher():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    cases = {"categorical": (torch.randn(2, 3), {}), "bernoulli": (torch.randn(2, 4), {}),
             "real": (torch.randn(2, 1), {}), "span": (torch.randn(2, 4, 2), {}),
             "choices": (torch.randn(5, 1), {"labels": torch.tensor([[1, 0, 0], [0, 1, MISSING]])})}
    for kind, (x, labels) in cases.items():
        assert float(distillation_term(kind, x, x.clone(), labels, mask, 3.0)) == pytest.approx(0.0, abs=1e-6), kind
        assert float(distillation_term(kind, x + torch.randn_like(x), x, labels, mask, 3.0)) > 1e-4, kind


def test_bernoulli_is_bce_against_teacher_probabilities_minus_their_entropy():
    s, t, T = torch.tensor([[0.5, -1.0]]), torch.tensor([[2.0, 0.0]]), 2.0
    want = 0.0
    for a, b in ((0.5, 2.0), (-1.0, 0.0)):
        p, q = 1 / (1 + math.exp(-b / T)), 1 / (1 + math.exp(-a / T))
        want += (p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))) * T * T
    assert float(distillation_term("bernoulli", s, t, {}, None, T)) == pytest.approx(want / 2, rel=1e-5)


def test_regression_is_mse_without_temperature():
    s, t = torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [1.0]])
    assert float(distillation_term("real", s, t, {}, None, 5.0)) == pytest.approx((1 + 4) / 2)


def test_tagging_kl_ignores_pads_and_untagged_positions():
    torch.manual_seed(1)
    s, t = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    labels = {"labels": torch.tensor([[IGNORE, 1, 2, IGNORE], [IGNORE, 0, IGNORE, IGNORE]])}
    base = float(distillation_term("categorical", s, t, labels, None, 1.0))
    changed = s.clone()
    changed[0, 0], changed[0, 3], changed[1, 2:] = 50.0, -50.0, 9.0
    assert float(distillation_term("categorical", changed, t, labels, None, 1.0)) == pytest.approx(base, rel=1e-6)
    tagged = [(0, 1), (0, 2), (1, 1)]
    want = sum(_kl(_softmax(t[i, j].tolist()), _softmax(s[i, j].tolist())) for i, j in tagged) / 3
    assert base == pytest.approx(want, rel=1e-5)


def test_span_kl_leaves_pad_positions_out():
    torch.manual_seed(2)
    s, t = torch.randn(1, 5, 2), torch.randn(1, 5, 2)
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    base = float(distillation_term("span", s, t, {}, mask, 1.0))
    s2, t2 = s.clone(), t.clone()
    s2[0, 3:], t2[0, 4:] = 30.0, -7.0
    assert float(distillation_term("span", s2, t2, {}, mask, 1.0)) == pytest.approx(base, rel=1e-6)
    want = sum(_kl(_softmax(t[0, :3, k].tolist()), _softmax(s[0, :3, k].tolist())) for k in (0, 1)) / 2
    assert base == pytest.approx(want, rel=1e-5)


def test_choices_kl_is_over_each_examples_own_choices():
    s, t = torch.tensor([[0.0], [1.0], [2.0], [0.5], [0.0]]), torch.tensor([[1.0], [0.0], [0.0], [0.0], [2.0]])
    layout = {"labels": torch.tensor([[1, 0, 0], [0, 1, MISSING]])}
    want = (_kl(_softmax([1.0, 0.0, 0.0]), _softmax([0.0, 1.0, 2.0])) + _kl(_softmax([0.0, 2.0]), _softmax([0.5, 0.0]))) / 2
    assert float(distillation_term("choices", s, t, layout, None, 1.0)) == pytest.approx(want, rel=1e-5)


def test_mismatched_shapes_and_unknown_kinds_are_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        distillation_term("categorical", torch.zeros(2, 3), torch.zeros(2, 4), {}, None, 1.0)
    with pytest.raises(ValueError, match="no loss for task outputs 'ranking'"):
        distillation_term("ranking", torch.zeros(2, 3), torch.zeros(2, 3), {}, None, 1.0)


# ---------------------------------------------------------------- the teacher cache and the hook

class _Backbone(nn.Module):
    """A deterministic toy encoder: embedding -> (hidden states,), as HF models return them."""

    def __init__(self, vocab=50, hidden=8):
        super().__init__()
        torch.manual_seed(3)
        self.emb = nn.Embedding(vocab, hidden)
        self.config = type("Config", (), {"hidden_size": hidden})()

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return type("Out", (), {"last_hidden_state": torch.tanh(self.emb(input_ids))})()


def _model():
    torch.manual_seed(4)
    heads = nn.ModuleDict({"cls": LinearHead(8, 3, 0.0), "tags": LinearHead(8, 4, 0.0)})
    return MultiTaskModel(_Backbone(), heads, {"cls": "pooled", "tags": "tokens"}, "mean")


def _batch(rows):
    width = max(len(r) for r in rows) + 1            # one pad column more than needed
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return {"input_ids": ids, "attention_mask": mask}


def test_the_cache_runs_the_teacher_once_per_row_whatever_the_batch():
    teacher = _model()
    cache = TeacherCache(teacher)
    a, b, c = [5, 6, 7], [8, 9], [10, 11, 12, 13]
    first, _ = cache.outputs(_batch([a, b]), ["cls", "tags"])
    assert cache.computed_rows == 2
    again, _ = cache.outputs(_batch([c, a, b]), ["cls", "tags"])     # other padding, other order
    assert cache.computed_rows == 3
    cache.outputs(_batch([b, c]), ["cls"])
    assert cache.computed_rows == 3
    direct = teacher(**_batch([c, a, b]), tasks=["cls", "tags"])
    assert torch.allclose(again["cls"], direct["cls"], atol=1e-2)
    assert torch.allclose(again["tags"][1, :3], direct["tags"][1, :3], atol=1e-2)
    assert torch.equal(again["tags"][2, 2:], torch.zeros(3, 4))      # past the row's length: zeros
    assert torch.allclose(first["cls"], again["cls"][1:])
    with pytest.raises(KeyError, match="no head for task"):
        cache.outputs(_batch([a]), ["other"])


def _context(student, inputs, step=0):
    logits = student(**inputs, tasks=["cls"])
    labels = {"labels": torch.tensor([0, 2])}
    hard = {"cls": nn.functional.cross_entropy(logits["cls"], labels["labels"])}
    return LossContext(student, {"cls": type("T", (), {"outputs": "categorical"})()}, "cls", inputs,
                       {"cls": (None, labels)}, logits, hard, step), hard


def test_the_hook_mixes_hard_and_teacher_losses_by_alpha():
    teacher, student = _model(), _model()
    with torch.no_grad():
        student.heads["cls"].out.weight[0].add_(1.0)
    inputs = _batch([[5, 6, 7], [8, 9]])
    ctx, hard = _context(student, inputs)
    with torch.no_grad():
        term = float(distillation_term("categorical", ctx.logits["cls"], teacher(**inputs, task="cls"), {}, None, 2.0))
    assert term > 1e-3
    for alpha in (0.0, 0.3, 1.0):
        got = Distiller(teacher, temperature=2.0, alpha=alpha)(ctx)["cls"]
        assert float(got) == pytest.approx((1 - alpha) * float(hard["cls"]) + alpha * term, rel=1e-3)
    same, _ = _context(teacher, inputs)
    assert float(Distiller(teacher, alpha=1.0)(same)["cls"]) == pytest.approx(0.0, abs=1e-5)


def test_teacher_annealing_moves_the_weight_from_alpha_to_zero():
    hook = Distiller(_model(), alpha=0.8, anneal=True)
    hook.total_steps = 100
    assert [hook.weight(s) for s in (0, 50, 100)] == pytest.approx([0.8, 0.4, 0.0])
    assert Distiller(_model(), alpha=0.8).weight(50) == 0.8


@pytest.mark.parametrize("options, field", [({"temperature": 0}, "temperature"), ({"alpha": 1.5}, "alpha"),
                                            ({"alpha": -0.1}, "alpha"), ({"hidden": -1}, "hidden")])
def test_options_out_of_range_are_refused(options, field):
    with pytest.raises(DistillError, match=f"distill.{field}"):
        Distiller(_model(), **options)


def test_hidden_state_loss_needs_the_model_hook():
    teacher, student = _model(), _model()
    ctx, _ = _context(student, _batch([[5, 6], [7]]))
    with pytest.raises(DistillError, match="model_fn"):
        Distiller(teacher, hidden=1.0)(ctx)


def test_hidden_state_loss_is_zero_for_an_identical_student_through_the_identity_projection():
    teacher, student = _model(), _model()
    hook = Distiller(teacher, alpha=1.0, hidden=1.0)
    student = hook.model_fn(student).train()
    ctx, _ = _context(student, _batch([[5, 6], [7]]))
    assert float(hook(ctx)["cls"]) == pytest.approx(0.0, abs=1e-5)
    assert hook.projection is student.distill_projection
