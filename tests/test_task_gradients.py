"""The per-task gradient probe (mtlm.task_gradients): it measures what autograd gives on its probe batch and
does not change training. Tiny random backbone on CPU."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import mtlm
from mtlm.batches import masked_losses
from mtlm.callbacks import Callback
from mtlm.task_gradients import TaskGradients, layer_group
from mtlm.train import fit


def test_layer_group_names_blocks_and_embeddings():
    assert layer_group("encoder.layer.3.attention.self.query.weight") == "layer.3"
    assert layer_group("embeddings.word_embeddings.weight") == "embeddings"
    assert layer_group("pooler.dense.weight") == "other"


def test_probe_does_not_change_training(make_recipe):
    common = dict(tasks=("sentiment", "ner"), max_steps=6, eval_every=6, early_stopping_patience=None)
    plain = fit(mtlm.load_recipe(make_recipe(name="plain", **common)), progress=False)
    probe = TaskGradients(every=2, rows=8)
    probed = fit(mtlm.load_recipe(make_recipe(name="probed", **common)), progress=False, callbacks=[probe])
    a = load_file(plain / "model" / "backbone" / "model.safetensors")
    b = load_file(probed / "model" / "backbone" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert [r["step"] for r in probe.records] == [0, 2, 4, 6]
    assert set(probe.records[-1]["tasks"]) == {"sentiment", "ner"}
    assert set(probe.records[-1]["cosine"]) == {"sentiment|ner"}


class _Check(Callback):
    """After the last step: recompute the sentiment probe's gradient by hand and compare with the probe."""

    def __init__(self, probe):
        self.probe, self.expected = probe, None

    def on_train_end(self, run):
        record = self.probe.measure(run, run.step)
        model = run.unwrapped
        model.eval()
        inputs, targets = self.probe.probes["sentiment"]
        loss = masked_losses(run.tasks, model(tasks=["sentiment"], **inputs), targets)["sentiment"]
        params = dict(model.backbone.named_parameters())
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        layer0 = sum(float(g.pow(2).sum()) for n, g in zip(params, grads)
                     if g is not None and layer_group(n) == "layer.0") ** 0.5
        total = sum(float(g.pow(2).sum()) for g in grads if g is not None) ** 0.5
        self.expected = (record, float(loss.detach()), layer0, total)


def test_probe_norms_equal_autograd_on_the_probe_batch(make_recipe):
    probe = TaskGradients(every=100, rows=8)
    check = _Check(probe)
    fit(mtlm.load_recipe(make_recipe(name="check", tasks=("sentiment", "topic"), max_steps=3, eval_every=3,
                                     early_stopping_patience=None)), progress=False, callbacks=[probe, check])
    record, loss, layer0, total = check.expected
    s = record["tasks"]["sentiment"]
    assert s["loss"] == pytest.approx(loss, rel=1e-5)
    assert s["layer_norms"]["layer.0"] == pytest.approx(layer0, rel=1e-4)
    assert s["backbone_norm"] == pytest.approx(total, rel=1e-4)
    assert s["head_norm"] > 0 and layer0 > 0
    assert -1.0 <= record["cosine"]["sentiment|topic"] <= 1.0


def test_probe_rejects_bad_settings():
    with pytest.raises(ValueError, match="every and rows"):
        TaskGradients(every=0)
