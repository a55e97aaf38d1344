"""Sharded training (`train.fsdp`, FSDP2 through Accelerate, `mtlm.sharding`) on 2 CPU processes (gloo):
the weights are sharded during training, the per-step losses and the saved bundle are those of one process over
the same global batch, and a stopped run resumes from its sharded checkpoint with the losses of an uninterrupted
one. Recipe checks: what FSDP cannot shard is refused by name. Tiny random backbone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import mtlm
from mtlm.config import RecipeError
from mtlm.recipe import parse_recipe

FIT_SCRIPT = r"""
import json, sys
import mtlm
from mtlm.callbacks import Callback
from mtlm.train import fit
from torch.distributed.tensor import DTensor

recipe_path, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]


class Record(Callback):
    '''Per-step global losses; after the last step of this call, each parameter's full shape, its local
    shape on this process (a DTensor's shard) and its AdamW moment's local shape (None before its first
    gradient: the head of a task not sampled yet).'''

    def __init__(self):
        self.losses, self.shards = {}, None

    def on_step_end(self, run, step, losses, weights):
        self.losses[step] = losses
        if step == run.max_steps or run.stop is not None:
            state = run.optimizer.optimizer.state
            local = lambda t: list((t.to_local() if isinstance(t, DTensor) else t).shape)
            self.shards = {n: {"full": list(p.shape), "local": local(p), "dtensor": isinstance(p, DTensor),
                               "exp_avg": local(state[p]["exp_avg"]) if "exp_avg" in state.get(p, {}) else None}
                           for n, p in run.model.named_parameters()}

    def on_train_end(self, run):
        with open(f"{out}.{run.accelerator.process_index}.json", "w") as f:
            json.dump({"losses": self.losses, "shards": self.shards, "type": str(run.accelerator.distributed_type),
                       "world": run.accelerator.num_processes}, f)


fit(mtlm.load_recipe(recipe_path), progress=False, resume=mode == "resume",
         stop_after=int(mode[5:]) if mode.startswith("stop:") else None, callbacks=[Record()])
"""

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


# FSDP asked of the launcher instead of the recipe (no train.fsdp): what a config file with
# distributed_type: FSDP and fsdp_version: 2 exports too
USE_FSDP = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
            "--fsdp_state_dict_type", "SHARDED_STATE_DICT"]


def run_script(tmp_path, recipe, out: str, mode: str = "full", processes: int = 2,
               launch_flags: tuple = ("--multi_gpu",)) -> list[dict]:
    """FIT_SCRIPT under `accelerate launch` with `processes` CPU processes (or plain python for 1) ->
    each rank's record."""
    script = tmp_path / "fit_script.py"
    script.write_text(FIT_SCRIPT)
    launch = ["accelerate", "launch", *launch_flags, "--num_processes", str(processes), "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"] if processes > 1 else [sys.executable]
    proc = subprocess.run([*launch, str(script), str(recipe), str(tmp_path / out), mode], env=ENV,
                          capture_output=True, text=True, timeout=600)
    rank0 = [line for line in proc.stderr.splitlines() if line.startswith("[rank0]")]   # its traceback
    assert proc.returncode == 0, "\n".join(rank0[-40:]) or (proc.stdout + proc.stderr)[-4000:]
    return [json.loads((tmp_path / f"{out}.{r}.json").read_text()) for r in range(processes)]


def _bundle(run_dir):
    return {**load_file(run_dir / "model" / "heads.safetensors"),
            **load_file(run_dir / "model" / "backbone" / "model.safetensors")}


def assert_sharded(record: dict, world: int = 2) -> None:
    """Every parameter is a DTensor holding 1/world of dim 0 (rounded up), and so is its AdamW moment (every
    backbone parameter has one after the first step)."""
    assert record["type"] == "DistributedType.FSDP" and record["world"] == world
    shards = record["shards"]
    assert len(shards) > 20 and any(n.startswith("backbone.encoder.layer.1.") for n in shards)
    for name, s in shards.items():
        assert s["dtensor"], name
        assert s["local"][0] <= -(-s["full"][0] // world) and s["local"][1:] == s["full"][1:], (name, s)
        assert s["exp_avg"] == s["local"] or (s["exp_avg"] is None and name.startswith("heads.")), name


@pytest.mark.requires(executable="accelerate", hint="pip install accelerate")
@pytest.mark.parametrize("mode", ["sampled", "all_tasks"])
def test_two_sharded_processes_match_one_process(make_recipe, tmp_path, mode):
    """Batch 8 on each of 2 FSDP processes = batch 16 on one process: the same per-step losses (1e-4), the
    same trained bundle (gathered from the shards: rtol 1e-3) and dev metrics (the split evaluation runs as
    many sharded forwards on both ranks); every parameter and AdamW moment is sharded in half on each rank.
    sampled: accumulation over 2 micro-batches (sync at the last) and 2 head warm-up steps (the sharded
    backbone's gradients dropped), FSDP asked of the launcher (`--use_fsdp --fsdp_version 2`); all_tasks: one
    backward over both tasks' forwards, reduce-scattered by FSDP (not averaged by hand), with FAMO's weights
    and packed rows, FSDP asked by the recipe (`train.fsdp: true`)."""
    train = dict(tasks=("sentiment", "paraphrase"), max_steps=6, eval_every=3, dropout=0.0,
                 early_stopping_patience=None, eval_batch_size=16)
    train.update({"grad_accum": 2, "head_warmup_steps": 2} if mode == "sampled" else
                 {"step_mode": "all_tasks", "weighting": "famo", "packing": True})
    one = make_recipe(name="one", batch_size=16, **train)
    (r1,) = run_script(tmp_path, one, "one", processes=1)
    if mode == "sampled":      # FSDP from the launcher's flags
        ranks = run_script(tmp_path, make_recipe(name="two", batch_size=8, **train), "two", launch_flags=USE_FSDP)
    else:                      # FSDP from the recipe
        ranks = run_script(tmp_path, make_recipe(name="two", batch_size=8, fsdp=True, **train), "two")
    for rank in ranks:
        assert_sharded(rank)
        assert rank["losses"].keys() == r1["losses"].keys() and len(r1["losses"]) == 6
        for step, losses in r1["losses"].items():
            assert rank["losses"][step] == pytest.approx(losses, abs=1e-4), step
    assert not r1["shards"]["backbone.embeddings.word_embeddings.weight"]["dtensor"]
    run_one, run_two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    a, b = _bundle(run_one), _bundle(run_two)
    assert a.keys() == b.keys() and len(a) > 20
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)
    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (run_one, run_two))
    assert [e["step"] for e in m2["eval"]] == [3, 6]
    for e1, e2 in zip(m1["eval"], m2["eval"], strict=True):
        assert e2["mean"] == pytest.approx(e1["mean"], abs=1e-6)


@pytest.mark.requires(executable="accelerate", hint="pip install accelerate")
def test_a_stopped_sharded_run_resumes_with_the_losses_of_an_uninterrupted_one(make_recipe, tmp_path):
    """2 FSDP processes: stopped after 3 steps, the checkpoint holds one model and one optimizer shard per
    rank (torch.distributed.checkpoint); resumed under the same sharding, steps 4-6 give the uninterrupted
    run's losses and bundle."""
    train = dict(tasks=("sentiment", "topic"), max_steps=6, eval_every=3, dropout=0.1, batch_size=8,
                 early_stopping_patience=None, fsdp={"reshard_after_forward": False})
    full = run_script(tmp_path, make_recipe(name="full", **train), "full")
    path = make_recipe(name="cut", **train)
    run_script(tmp_path, path, "cut1", mode="stop:3")
    ckpt = tmp_path / "runs" / "cut" / "checkpoints" / "step_3"
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (ckpt / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"], part
    assert not (ckpt / "model.safetensors").exists()
    resumed = run_script(tmp_path, path, "cut2", mode="resume")
    for before, after in zip(full, resumed):
        assert_sharded(after)
        assert sorted(after["losses"], key=int) == ["4", "5", "6"]
        for step in ("4", "5", "6"):
            assert after["losses"][step] == pytest.approx(before["losses"][step], abs=1e-5), step
    a, b = _bundle(tmp_path / "runs" / "full"), _bundle(tmp_path / "runs" / "cut")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_fsdp_settings_parse_and_what_fsdp_cannot_shard_is_refused_by_name(make_recipe):
    """`fsdp: true` = the defaults, `false` = off, a dict sets options; weightings that need the backbone's
    per-task gradients or share its optimizer, adversarial training, compile, adapters, private layers and
    generation tasks are refused with the reason."""
    from mtlm.config import FsdpConfig
    load = mtlm.load_recipe
    assert load(make_recipe(name="a", fsdp=True)).train.fsdp == FsdpConfig()
    assert load(make_recipe(name="b", fsdp=False)).train.fsdp is None
    cfg = load(make_recipe(name="c", fsdp={"reshard_after_forward": False, "min_num_params": 1000})).train.fsdp
    assert (cfg.reshard_after_forward, cfg.min_num_params, cfg.cpu_offload) == (False, 1000, False)
    with pytest.raises(RecipeError, match=r"train.fsdp.shard: unknown key"):
        load(make_recipe(name="d", fsdp={"shard": 1}))
    for bad in ("maybe", 1):          # a fresh user's `train.fsdp=maybe`: the message names what it takes
        with pytest.raises(RecipeError, match=r"train.fsdp: .*must be true, false or a mapping"):
            load(make_recipe(name="d2", fsdp=bad))
    for train, why in [({"weighting": "pcgrad"}, "not with weighting pcgrad .it combines the backbone's per-task gradients"),
                       ({"weighting": "gradnorm"}, "not with weighting gradnorm"),
                       ({"weighting": "uncertainty"}, "not with weighting uncertainty .its log-variances"),
                       ({"adversarial": {"method": "fgm"}}, "not with adversarial.method fgm"),
                       ({"compile": True}, "not with compile")]:
        with pytest.raises(RecipeError, match=why):
            load(make_recipe(name="e", fsdp=True, **train))
    for extra, why in [({"adapters": {"r": 4}}, "train.fsdp: not with adapters"),
                       ({"tasks": {"sentiment": {"private_layers": 1}}}, r"not with private_layers \(tasks sentiment")]:
        raw = yaml.safe_load(make_recipe(name="f", tasks=("sentiment",), fsdp=True).read_text())
        for key, value in extra.items():
            raw[key] = value if key != "tasks" else {"sentiment": {**raw["tasks"]["sentiment"], **value["sentiment"]}}
        with pytest.raises(RecipeError, match=why):
            parse_recipe(raw, Path("."))
    raw = yaml.safe_load(make_recipe(name="g", tasks=("sentiment",), fsdp=True).read_text())
    raw["tasks"]["sentiment"]["type"] = "generation"
    with pytest.raises(RecipeError, match=r"not with generation tasks \(sentiment"):
        parse_recipe(raw, Path("."))


def test_the_fsdp_plugin_follows_the_recipe():
    """train.fsdp -> Accelerate's FSDP2 plugin: one unit per backbone layer by default, size-based units with
    min_num_params, sharded checkpoints; cpu_offload without a GPU is refused."""
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy

    from mtlm.config import FsdpConfig
    from mtlm.sharding import fsdp_plugin

    plugin = fsdp_plugin(FsdpConfig(), cuda=False)
    assert (plugin.fsdp_version, plugin.reshard_after_forward) == (2, True)
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    assert "SHARDED_STATE_DICT" in str(plugin.state_dict_type)
    plugin = fsdp_plugin(FsdpConfig(min_num_params=1000, reshard_after_forward=False), cuda=False)
    assert (plugin.auto_wrap_policy, plugin.min_num_params) == (size_based_auto_wrap_policy, 1000)
    assert plugin.reshard_after_forward is False
    with pytest.raises(RecipeError, match="cpu_offload: no GPU"):
        fsdp_plugin(FsdpConfig(cpu_offload=True), cuda=False)
    assert fsdp_plugin(None, cuda=False) is None


def test_fsdp_in_one_process_is_refused_without_leaking_the_fsdp_switch(make_recipe, monkeypatch):
    """train.fsdp without several processes: a clear error before any model loads, and Accelerate's
    ACCELERATE_USE_FSDP (which an Accelerator given a plugin exports) is not left set for later runs."""
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    with pytest.raises(RecipeError, match="train.fsdp: sharded training needs several processes"):
        mtlm.fit(mtlm.load_recipe(make_recipe(tasks=("sentiment",), name="one", fsdp=True)), progress=False)
    assert "ACCELERATE_USE_FSDP" not in os.environ


def test_an_fsdp1_launch_is_refused_and_an_fsdp2_launch_needs_several_processes(make_recipe, monkeypatch):
    """`accelerate launch --use_fsdp` exports ACCELERATE_USE_FSDP and FSDP_VERSION (1 unless --fsdp_version 2):
    FSDP1 is refused with what to pass instead; FSDP2 is taken, and one process is refused."""
    recipe = mtlm.load_recipe(make_recipe(tasks=("sentiment",), name="launch"))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    with pytest.raises(RecipeError, match="FSDP version 1 .* mtlm shards with FSDP2 only; pass --fsdp_version 2"):
        mtlm.fit(recipe, progress=False)
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(RecipeError, match="sharded training needs several processes"):
        mtlm.fit(recipe, progress=False)


class _Ranks:
    """Just what `task_outputs` reads of an Accelerator: 2 processes, this one `rank`."""

    def __init__(self, rank: int):
        self.num_processes, self.process_index = 2, rank


def test_the_split_evaluation_runs_as_many_forwards_on_every_rank(make_recipe, monkeypatch):
    """5 dev features, batch 2, 2 ranks: shards of 3 and 2 features, 2 and 1 batches; a sharded model's forward
    is a collective, so rank 1 runs a second forward too (and drops its predictions). Before the fix rank 1
    ran 1 forward while rank 0 ran 2: FSDP's all-gathers would hang."""
    import accelerate.utils

    from mtlm.data import encode_rows, prepare_rows
    from mtlm.evaluate import task_outputs
    from mtlm.model import build_model, load_backbone
    from mtlm.tasks import build_task

    recipe = mtlm.load_recipe(make_recipe(tasks=("sentiment",), name="ev"))
    tasks = {n: build_task(n, t) for n, t in recipe.tasks.items()}
    data = prepare_rows(recipe, tasks)
    backbone, tok = load_backbone(recipe.backbone, dropout=0.0)
    dev = encode_rows(tasks, data.rows, tok, recipe.max_length)["sentiment"]["dev"][:5]
    model = build_model(backbone, tasks, recipe.pooling, 0.0)
    whole, _ = task_outputs(model, tasks["sentiment"], dev, 2, tok.pad_token_id, torch.device("cpu"))
    gathered = []
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda done: gathered.extend(done) or list(gathered))
    forwards = []
    model.register_forward_hook(lambda m, a, kw, out: forwards.append(kw["input_ids"].shape[0]), with_kwargs=True)
    counts = []
    for rank in (0, 1):
        before = len(forwards)
        preds, _ = task_outputs(model, tasks["sentiment"], dev, 2, tok.pad_token_id, torch.device("cpu"),
                                accelerator=_Ranks(rank))
        counts.append(len(forwards) - before)
    assert counts == [2, 2] and forwards == [2, 1, 2, 1]     # rank 1's second batch: one repeated feature
    assert len(gathered) == 5 and preds == whole                    # the repeat's predictions were dropped
