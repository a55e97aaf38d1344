"""Sharded training (`train.fsdp`): FSDP2 (`torch.distributed.fsdp.fully_shard`, per-parameter sharding as
DTensors) through Accelerate's `FullyShardedDataParallelPlugin(fsdp_version=2)`, on GPUs and on CPU (gloo).

What it changes, and where:
- `fsdp_plugin` builds the plugin from the recipe's `train.fsdp` (or takes Accelerate's own, made from
  `accelerate launch --use_fsdp --fsdp_version 2 ...` or a config file with `distributed_type: FSDP`);
  `make_accelerator` (mtlm.train) passes it to the Accelerator and `enable_on_cpu` turns it on where
  Accelerate's backend chooser never does: several CPU processes (Accelerate 1.16 picks FSDP only for
  GPU-like devices and trains plain DDP on CPU; its FSDP2 preparation, `save_state`/`load_state` through
  torch.distributed.checkpoint and `get_state_dict` are device-agnostic and run on CPU with gloo, which the
  2-process tests check).
- `accelerator.prepare` shards the model in place: every transformer layer of the backbone (its
  `_no_split_modules`) is one FSDP unit (or every module past `min_num_params`), the rest (embeddings, heads)
  the root unit; each process holds 1/world of every parameter, its gradient and its AdamW moments.
- the loop (mtlm.train): the model's forward runs on every process in the same order (the same sources per
  round; the split dev evaluation runs as many forward passes on every process, `mtlm.evaluate`); gradients
  are reduce-scattered by FSDP at the step's last backward (`accelerator.no_sync` before it), never averaged
  by hand.
- after an evaluation (forwards without backward) `reshard` frees the gathered root unit.
- the bundle: `full_state_dict` gathers the parameters (a collective: every process calls it) onto the main
  process's CPU, which writes them (`mtlm.checkpoint.save_bundle(state_dict=...)`).
- checkpoints: `accelerator.save_state` writes each process's shard (torch.distributed.checkpoint, one
  `__<rank>_0.distcp` file per process for the model and for the optimizer); `--resume` reads them back under
  the same sharding.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.state import PartialState
from accelerate.utils import DistributedType

from mtlm.config import FsdpConfig, RecipeError


def requested_by_launcher() -> bool:
    """Whether `accelerate launch` was asked for FSDP (--use_fsdp, or a config file with distributed_type FSDP):
    it exports ACCELERATE_USE_FSDP=true and the plugin's settings as FSDP_* variables."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_plugin(cfg: FsdpConfig | None, cuda: bool) -> FullyShardedDataParallelPlugin | None:
    """The FSDP2 plugin of a run: from the recipe's `train.fsdp` when set, else from the launcher's FSDP_*
    variables when it asked for FSDP, else None (no sharding). cuda: whether the run trains on GPUs.

    Raises RecipeError when the launcher asks for FSDP1 (`--fsdp_version 1`, Accelerate's default): the loop
    is written for FSDP2's per-parameter sharding, and FSDP1 does not run on CPU (sync_module_states fails);
    and for cpu_offload without a GPU (the shards are in CPU memory already)."""
    if cfg is not None and cfg.cpu_offload and not cuda:
        raise RecipeError(["train.fsdp.cpu_offload: no GPU, the shards are in CPU memory already: drop it"])
    if cfg is not None:
        wrap = ({"auto_wrap_policy": "size_based_wrap", "min_num_params": cfg.min_num_params}
                if cfg.min_num_params else {"auto_wrap_policy": "transformer_based_wrap"})
        return FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=cfg.reshard_after_forward,
                                              cpu_offload=cfg.cpu_offload, state_dict_type="SHARDED_STATE_DICT",
                                              **wrap)
    if not requested_by_launcher():
        return None
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise RecipeError([f"FSDP version {version} (accelerate launch --use_fsdp without --fsdp_version 2, or a "
                           f"config file without fsdp_version: 2): mtlm shards with FSDP2 only; pass "
                           f"--fsdp_version 2, or set train.fsdp in the recipe and launch with --multi_gpu"])
    return FullyShardedDataParallelPlugin()          # reads the launcher's FSDP_* settings


def enable_on_cpu(accelerator: Accelerator, plugin: FullyShardedDataParallelPlugin) -> None:
    """Turn FSDP on for several CPU processes, where Accelerate chose plain DDP (MULTI_CPU) although it was
    given an FSDP plugin. The distributed type lives in Accelerate's shared state (PartialState's, which every
    new AcceleratorState copies), so it is set there. A no-op for any other distributed type (GPUs: Accelerate
    already chose FSDP)."""
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether the run trains with FSDP (Accelerate's distributed type FSDP)."""
    return accelerator.distributed_type == DistributedType.FSDP


def reshard(model: torch.nn.Module) -> None:
    """Free the gathered weights a forward without backward leaves (an evaluation): FSDP2 keeps the root
    unit's parameters gathered after its forward, expecting the backward, so until the next training step they
    would take the whole root unit's memory and `model.parameters()` would be full tensors, not shards. A
    no-op for a model that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) state dict of a sharded model on the main process's CPU, keyed as
    `model.state_dict()`; None without FSDP (the module's own tensors are whole). Under FSDP it is a
    collective: every process must call it (the others get an empty dict)."""
    if not is_sharded(accelerator):
        return None
    return accelerator.get_state_dict(model)
