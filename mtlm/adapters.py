"""LoRA adapters on the backbone (`adapters:` in a recipe), through PEFT (Hu et al. 2022, "LoRA").

`add_adapters` injects one adapter ("shared") or one per task (`per_task: true`, adapter name = task name)
into the backbone's `target_modules` (`inject_adapter_in_model`), in every layer or only the top K
(`layers: top:K`), and freezes the backbone's own weights (unless `train_backbone`).

`adapter_states` runs the backbone for several tasks at once. With one adapter it is one plain pass. With
one adapter per task, each task needs its own states: each adapter takes the rows its tasks are asked for
(all rows when every input wants every task; only its own inputs in a server micro-batch of requests for
different tasks) and the adapted layers run on all of them in ONE batched pass, each row through its own
adapter (PEFT's `adapter_names` mixed batches, `adapter_rows`). Layers below the adapted ones are identical for every task,
so with `layers: top:K` they run once on the plain rows and only the top K layers run per adapter
(AdapterDrop-style sharing, Rueckle et al. 2021), using the layer-by-layer `Stack`s of
`mtlm.private_layers`.

Bundles store the adapters' weights in `adapters.safetensors` (keys as in the backbone's state_dict, e.g.
"layers.29.self_attn.q_proj.lora_A.sst2.weight"); the backbone folder keeps the plain pretrained layout
(`plain_backbone_state`) so `from_pretrained` still reads it; tasks.json holds the adapter config.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import torch
from torch import Tensor, nn

from mtlm.backbones import backbone_layers
from mtlm.config import AdapterConfig, RecipeError
from mtlm.private_layers import check_split, repeat_rows, select_rows, stack_for

FILE = "adapters.safetensors"
SHARED = "shared"
# adapter_rows' hooks live on the shared LoRA modules: one block at a time (the server's batcher thread and a
# streaming generation thread would otherwise see each other's row names)
_ROWS_LOCK = threading.RLock()


class Adapters:
    """The adapters of one model: config, {task: adapter name}, and how many top layers carry them."""

    def __init__(self, cfg: AdapterConfig, tasks: list[str], total_layers: int):
        self.cfg = cfg
        self.of = {t: (t if cfg.per_task else SHARED) for t in tasks}
        self.top = cfg.top_layers(total_layers)
        self.total = total_layers

    def names(self) -> list[str]:
        return list(dict.fromkeys(self.of.values()))


def _targets(backbone: nn.Module, cfg: AdapterConfig, first: int) -> list[str]:
    """Full names of the backbone modules to adapt: a Linear whose last name part is in target_modules,
    inside layers first..L-1. Raises RecipeError naming adapters.target_modules when none match."""
    layers = backbone_layers(backbone)
    prefix = next(name for name, module in backbone.named_modules() if module is layers)
    wanted = set(cfg.target_modules)
    out, seen = [], set()
    for name, module in backbone.named_modules():
        last = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear):
            seen.add(last)
        if last in wanted and isinstance(module, nn.Linear) and name.startswith(prefix + "."):
            if int(name[len(prefix) + 1:].split(".", 1)[0]) >= first:
                out.append(name)
    missing = sorted(wanted - seen)
    if missing or not out:
        raise RecipeError([f"adapters.target_modules: {', '.join(missing or sorted(wanted))} not a linear layer of "
                           f"the backbone ({type(backbone).__name__}; its linear layers: {', '.join(sorted(seen))})"])
    return out


def add_adapters(backbone: nn.Module, cfg: AdapterConfig, tasks: list[str]) -> Adapters:
    """Inject LoRA adapters into `backbone` in place (PEFT `inject_adapter_in_model`), freeze its own weights
    unless cfg.train_backbone, and return the `Adapters` description. Raises RecipeError for a backbone
    without a layer list, target modules it does not have, or per-task top:K on a backbone the layer-by-layer
    Stack does not reproduce."""
    from peft import LoraConfig, inject_adapter_in_model

    layers = backbone_layers(backbone)
    if layers is None:
        raise RecipeError([f"adapters: the backbone ({type(backbone).__name__}) has no list of layers"])
    spec = Adapters(cfg, tasks, len(layers))
    targets = _targets(backbone, cfg, spec.total - spec.top)
    if len(spec.names()) > 1:
        if stack_for(backbone) is None:
            raise RecipeError([f"adapters.per_task: the backbone ({type(backbone).__name__}) cannot run layer by "
                               f"layer here; use per_task: false"])
        check_split(backbone)
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, bias="none")
    for name in spec.names():
        inject_adapter_in_model(lora, backbone, adapter_name=name)
    for pname, p in backbone.named_parameters():
        p.requires_grad = "lora_" in pname or cfg.train_backbone
    return spec


def _lora_layers(backbone: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer
    return [m for m in backbone.modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def adapter_rows(backbone: nn.Module, names: list[str]):
    """Within the block, every LoRA layer of `backbone` applies adapter names[i] to batch row i (PEFT's
    mixed-batch forward: `adapter_names` passed to each LoRA layer by a forward pre-hook, as
    `LoraModel._enable_peft_forward_hooks` does). Works in training too (the update is an indexed add).
    Blocks of different threads run one after the other (the hooks are shared state)."""
    def hook(module, args, kwargs):
        kwargs["adapter_names"] = names
        return args, kwargs

    with _ROWS_LOCK:
        handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in _lora_layers(backbone)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def _adapter_rows(spec: Adapters, adapters: list[str], names: list[str], rows: dict[str, Tensor] | None,
                  batch: int) -> dict[str, Tensor | None]:
    """{adapter: the sorted batch rows it must run (a LongTensor), or None for all `batch` rows}: the union
    of the rows of the tasks in `names` that use it (all rows when `rows` is None)."""
    if rows is None:
        return {a: None for a in adapters}
    out = {}
    for a in adapters:
        wanted = torch.unique(torch.cat([torch.as_tensor(rows[n], dtype=torch.long).reshape(-1)
                                         for n in names if spec.of[n] == a]))
        out[a] = None if len(wanted) == batch else wanted
    return out


def _task_view(states: Tensor, have: Tensor | None, want: Tensor | None) -> Tensor:
    """The rows `want` (None: all) of `states`, which holds the rows `have` (None: all) of the batch."""
    if want is None or (have is not None and len(have) == len(want) and bool((have == want).all())):
        return states
    want = torch.as_tensor(want, dtype=torch.long)
    return states[want if have is None else torch.searchsorted(have, want)]


def adapter_states(backbone: nn.Module, spec: Adapters, names: list[str], input_ids: Tensor,
                   attention_mask: Tensor, token_type_ids: Tensor | None,
                   rows: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """{task: final token states (rows, seq_len, hidden)} for the tasks `names`, each through its adapter:
    the unadapted lower layers once on the `batch` rows, the adapted top layers once on the rows each
    adapter needs, stacked (a mixed-adapter batch: each block of rows through its own adapter).

    rows: {task: LongTensor of the batch rows it is asked for, ascending} (None: every task, every row);
    a task's states then hold only those rows, and an adapter runs only the rows its tasks ask for, so a
    micro-batch of requests for different tasks costs one adapted pass per request, not per request and
    task. Raises KeyError when `rows` lacks a task of `names`."""
    adapters = list(dict.fromkeys(spec.of[n] for n in names))
    batch = input_ids.shape[0]
    need = _adapter_rows(spec, adapters, names, rows, batch)
    want = {n: None if rows is None else torch.as_tensor(rows[n], dtype=torch.long) for n in names}
    if len(adapters) == 1 and spec.top == spec.total:      # one adapter everywhere: the plain forward
        sel = need[adapters[0]]
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if sel is not None:
            kwargs = {k: v[sel] for k, v in kwargs.items()}
        with adapter_rows(backbone, adapters * (batch if sel is None else len(sel))):
            hidden = backbone(**kwargs).last_hidden_state
        return {n: _task_view(hidden, sel, want[n]) for n in names}
    stack = stack_for(backbone)
    layers = stack.layers(backbone)
    hidden, context = stack.embed(backbone, input_ids, attention_mask, token_type_ids)
    for layer in layers[:spec.total - spec.top]:           # no adapter below: shared by every task
        hidden = stack.layer(layer, hidden, context)
    if all(sel is None for sel in need.values()):
        index = None
        stacked = hidden.repeat(len(adapters), 1, 1) if len(adapters) > 1 else hidden
        context = repeat_rows(context, len(adapters), batch)
    else:
        index = torch.cat([torch.arange(batch) if sel is None else sel for sel in need.values()])
        stacked = hidden[index.to(hidden.device)]
        context = select_rows(context, index.to(hidden.device), batch)
    sizes = [batch if sel is None else len(sel) for sel in need.values()]
    with adapter_rows(backbone, [a for a, size in zip(adapters, sizes) for _ in range(size)]):
        for layer in layers[spec.total - spec.top:]:
            stacked = stack.layer(layer, stacked, context)
    stacked = stack.finish(backbone, stacked)
    per_adapter = dict(zip(adapters, stacked.split(sizes)))
    return {n: _task_view(per_adapter[spec.of[n]], need[spec.of[n]], want[n]) for n in names}


def plain_backbone_state(backbone: nn.Module) -> dict[str, Tensor]:
    """The backbone's state_dict in its pretrained layout: adapter tensors dropped, PEFT's "base_layer."
    unwrapped (what `save_pretrained(state_dict=...)` writes so `from_pretrained` reads it back)."""
    return {k.replace(".base_layer.", "."): v for k, v in backbone.state_dict().items() if "lora_" not in k}


def adapter_state(backbone: nn.Module) -> dict[str, Tensor]:
    """The adapters' weights for `FILE`: {backbone state_dict key: tensor on the CPU}."""
    return {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items() if "lora_" in k}


def load_adapters(backbone: nn.Module, bundle: Path) -> None:
    """Load bundle/`FILE` into the injected adapters strictly. Raises ValueError naming the file and the
    tensors missing, unexpected or of the wrong shape (the caller turns it into a BundleError)."""
    from safetensors.torch import load_file

    file = Path(bundle) / FILE
    try:
        weights = load_file(file)
    except Exception as e:      # absent, truncated or not safetensors
        raise ValueError(f"{file}: cannot read the adapters tasks.json lists: {str(e).splitlines()[0]}") from None
    want = adapter_state(backbone)
    missing, extra = sorted(set(want) - set(weights)), sorted(set(weights) - set(want))
    wrong = [f"{k} {tuple(weights[k].shape)} (expected {tuple(want[k].shape)})" for k in want
             if k in weights and weights[k].shape != want[k].shape]
    if missing or extra or wrong:
        raise ValueError(f"{file} does not match tasks.json's adapters: " + "; ".join(
            ([f"missing {', '.join(missing[:3])}"] if missing else []) + wrong[:3]
            + ([f"unexpected {', '.join(extra[:3])}"] if extra else [])))
    with torch.no_grad():
        params = dict(backbone.named_parameters())
        for k, v in weights.items():
            params[k].copy_(v)
