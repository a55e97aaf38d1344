"""`train.compile: true`: the backbone under `torch.compile(dynamic=True)` (Inductor), checked before training.

Dynamic shapes from the start: every micro-batch has another sequence length, and the default (static
first) recompiles on the second shape and gains nothing here (../shared/ENGINES.md). `nn.Module.compile`
compiles in place, so parameter names, checkpoints and saved bundles are those of the eager model.
Compilation happens lazily at the first call; `compile_backbone` makes that call itself (a forward and
backward on a two-example sample, RNG state restored, gradients cleared) so that a machine where it
fails (no C++ compiler, an unsupported op) gets a clear RecipeError before training starts, not a trace
mid-run. Opt-in: measured in benchmarks/train_throughput.py (variant mtlm_compile).
"""

from __future__ import annotations

import logging
import time

import torch

from mtlm.config import RecipeError

log = logging.getLogger("mtlm")


def compile_backbone(model, sample: dict[str, torch.Tensor]) -> None:
    """Compile `model.backbone` (a `MultiTaskModel`'s) in place with dynamic shapes and run `sample` (model
    inputs, as `collate_source` makes them) through the whole model forward and backward once. Raises
    RecipeError naming the failure when torch.compile cannot compile or run it here."""
    rng = torch.get_rng_state()
    t0 = time.perf_counter()
    try:
        model.backbone.compile(dynamic=True)
        out = model.forward(**sample)     # not __call__: hooks watching training forwards skip this check
        sum(v.float().sum() for v in out.values()).backward()
    except Exception as e:          # torch._dynamo / inductor raise many types (BackendCompilerFailed, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise RecipeError([f"train.compile: torch.compile failed on this machine ({type(e).__name__}: {first}); "
                           f"set train.compile: false"]) from e
    finally:
        model.zero_grad(set_to_none=True)
        torch.set_rng_state(rng)
    log.info("train.compile: backbone compiled (dynamic shapes) in %.0f s", time.perf_counter() - t0)
