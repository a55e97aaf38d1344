"""Structured pruning of a BERT-like encoder: attention heads and FFN neurons, scored over every task.

Importance (`importance`): a gate of ones is multiplied into the input of each layer's attention output
projection (`BertSelfOutput.dense`: the heads' contexts, concatenated) per head, and into the input of the
FFN output projection (`BertOutput.dense`: the intermediate activations) per neuron. The score of a head is
|dL/d gate_h| accumulated over batches: the head importance of Michel et al. 2019 ("Are Sixteen Heads
Really Better than One?", their `head_mask` gradient, which transformers 5 removed; the same value as the
first-order Taylor score of the head's slice of the output projection's input). A neuron's score is the
same first-order Taylor score (Molchanov et al. 2017) of its activation. Each task's scores are computed
on its own loss and scaled to sum to 1 (heads and neurons separately) before the tasks are summed, so no
task dominates by the size of its loss; then every layer's vector is divided by its L2 norm (Michel et
al.'s per-layer normalisation) so scores compare across layers.

Pruning (`plan`, `prune_backbone`): the lowest-scored heads / neurons over all layers go first, keeping at
least one of each per layer; `transformers.pytorch_utils.prune_linear_layer` removes the rows of query,
key, value and the intermediate projection, and the columns of the attention and FFN output projections.
The per-layer sizes are recorded in the backbone config (`PRUNING_KEY`: {"heads": [..], "intermediate_size":
[..], "kept_heads": [[..]]}); `load_pruned_backbone` rebuilds those shapes before loading saved weights,
so a pruned bundle loads, serves, exports to ONNX and quantises like any other.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import prune_linear_layer

from mtlm.batches import collate_source, masked_losses
from mtlm.data import length_sorted_batches

PRUNING_KEY = "mtlm_pruning"       # attribute of the backbone config (saved in config.json)


class PruningError(ValueError):
    """A backbone whose layout pruning does not know (not BERT-like), or a bad pruning request."""


def encoder_layers(backbone: nn.Module) -> list[nn.Module]:
    """The encoder's layers, each with .attention.self (query/key/value), .attention.output.dense,
    .intermediate.dense and .output.dense (BERT, RoBERTa, MiniLM, ...). Raises PruningError otherwise."""
    layers = getattr(getattr(backbone, "encoder", None), "layer", None)
    if layers is None or not all(hasattr(l, "attention") and hasattr(l, "intermediate") for l in layers):
        raise PruningError(f"{type(backbone).__name__}: structured pruning needs a BERT-like encoder "
                           f"(encoder.layer[i].attention / intermediate / output)")
    return list(layers)


def structure(backbone: nn.Module) -> dict[str, list[int]]:
    """{"heads": attention heads per layer, "intermediate_size": FFN neurons per layer} as the weights are now."""
    layers = encoder_layers(backbone)
    return {"heads": [l.attention.self.query.out_features // l.attention.self.attention_head_size for l in layers],
            "intermediate_size": [l.intermediate.dense.out_features for l in layers]}


def _prune_layer(layer: nn.Module, heads: list[int], neurons: list[int]) -> None:
    """Keep only heads `heads` and FFN neurons `neurons` (indices into the layer's current ones, sorted)."""
    att = layer.attention.self
    d = att.attention_head_size
    index = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads]).long()
    att.query, att.key, att.value = (prune_linear_layer(m, index) for m in (att.query, att.key, att.value))
    layer.attention.output.dense = prune_linear_layer(layer.attention.output.dense, index, dim=1)
    att.num_attention_heads, att.all_head_size = len(heads), len(heads) * d
    keep = torch.tensor(neurons, dtype=torch.long)
    layer.intermediate.dense = prune_linear_layer(layer.intermediate.dense, keep)
    layer.output.dense = prune_linear_layer(layer.output.dense, keep, dim=1)


def prune_backbone(backbone: nn.Module, heads: list[list[int]], neurons: list[list[int]]) -> dict:
    """Prune `backbone` in place to keep, per layer i, heads `heads[i]` and FFN neurons `neurons[i]` (indices
    into the unpruned layer, at least one of each). Records the new structure in the config (PRUNING_KEY)
    and returns it. Raises PruningError on an empty or out-of-range keep list, or an already pruned backbone."""
    layers = encoder_layers(backbone)
    before = structure(backbone)
    if getattr(backbone.config, PRUNING_KEY, None):
        raise PruningError("the backbone is already pruned: prune the unpruned parent again instead")
    if len(heads) != len(layers) or len(neurons) != len(layers):
        raise PruningError(f"keep lists for {len(heads)} / {len(neurons)} layers, the encoder has {len(layers)}")
    for i, (layer, h, n) in enumerate(zip(layers, heads, neurons)):
        h, n = sorted(set(h)), sorted(set(n))
        if not h or not n or h[-1] >= before["heads"][i] or n[-1] >= before["intermediate_size"][i] or min(h + n) < 0:
            raise PruningError(f"layer {i}: keep 1..{before['heads'][i]} heads and 1..{before['intermediate_size'][i]} "
                               f"neurons by index, got heads {h[:8]} and {len(n)} neurons")
        _prune_layer(layer, h, n)
    record = {**structure(backbone), "kept_heads": [sorted(set(h)) for h in heads]}
    setattr(backbone.config, PRUNING_KEY, record)
    return record


def restore_structure(backbone: nn.Module, record: dict) -> None:
    """Shrink a freshly built (unpruned) backbone to the per-layer sizes of `record` (PRUNING_KEY), so saved
    pruned weights fit; the kept rows are placeholders until the weights are loaded."""
    for layer, h, n in zip(encoder_layers(backbone), record["heads"], record["intermediate_size"]):
        _prune_layer(layer, list(range(h)), list(range(n)))


def load_pruned_backbone(folder: Path, config) -> nn.Module:
    """The pruned encoder saved in `folder` (config.json carrying PRUNING_KEY; model.safetensors or sharded
    with model.safetensors.index.json), in float32. Raises ValueError when tensors are missing, unexpected
    or of the wrong shape, OSError when a file cannot be read."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    try:
        backbone = AutoModel.from_config(config, add_pooling_layer=False)
    except TypeError:
        backbone = AutoModel.from_config(config)
    restore_structure(backbone, getattr(config, PRUNING_KEY))
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    state: dict[str, Tensor] = {}
    for name in files:
        state.update(load_file(folder / name))
    own = backbone.state_dict()
    prefix = f"{backbone.base_model_prefix}."
    state = {k[len(prefix):] if k.startswith(prefix) and k[len(prefix):] in own else k: v for k, v in state.items()}
    missing = [k for k in own if k not in state and "pooler" not in k and not k.endswith("position_ids")]
    extra = [k for k in state if k not in own and "pooler" not in k]
    wrong = [f"{k}: expected {tuple(own[k].shape)}, found {tuple(v.shape)}" for k, v in state.items()
             if k in own and own[k].shape != v.shape]
    if missing or extra or wrong:
        raise ValueError(f"pruned weights do not match config.json's {PRUNING_KEY}: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}, wrong shapes {wrong[:5]}")
    backbone.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return backbone.float()


def importance(model, tasks: dict, features: dict[str, list[dict]], pad_token_id: int, batch_size: int = 32
               ) -> tuple[list[Tensor], list[Tensor]]:
    """Head and FFN-neuron importance of `model` (a MultiTaskModel on the CPU) summed over every task in
    `features` ({task: encoded labelled rows}, e.g. train rows): ([per layer: (heads,) scores], [per layer:
    (intermediate_size,) scores]), normalised as the module docstring says (each task scaled to sum 1, then
    each layer to unit L2 norm). Dropout is off while scoring. Raises PruningError for a non-BERT-like
    backbone or when no task has rows."""
    layers = encoder_layers(model.backbone)
    if not any(features.values()):
        raise PruningError("importance needs labelled rows of at least one task")
    n_heads = structure(model.backbone)["heads"]
    head_gates = [torch.ones(h, requires_grad=True) for h in n_heads]
    neuron_gates = [torch.ones(l.intermediate.dense.out_features, requires_grad=True) for l in layers]
    hooks = []
    for layer, hg, ng in zip(layers, head_gates, neuron_gates):
        d = layer.attention.self.attention_head_size
        hooks.append(layer.attention.output.dense.register_forward_pre_hook(
            lambda m, args, g=hg, d=d: (args[0] * g.repeat_interleave(d),)))
        hooks.append(layer.output.dense.register_forward_pre_hook(lambda m, args, g=ng: (args[0] * g,)))
    gates = head_gates + neuron_gates
    total = [torch.zeros_like(g) for g in gates]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for name, feats in features.items():
                if not feats:
                    continue
                scores = [torch.zeros_like(g) for g in gates]
                for idx in length_sorted_batches([f["length"] for f in feats], batch_size):
                    items = [{"inputs": feats[i], "labels": {name: feats[i]}} for i in idx]
                    inputs, targets = collate_source({name: tasks[name]}, items, pad_token_id)
                    loss = masked_losses(tasks, model(tasks=[name], **inputs), targets)[name]
                    for s, g in zip(scores, torch.autograd.grad(loss, gates, allow_unused=True)):
                        if g is not None:
                            s += g.abs()
                for part in (slice(0, len(layers)), slice(len(layers), None)):     # heads, neurons
                    norm = float(sum(s.sum() for s in scores[part])) or 1.0
                    for t, s in zip(total[part], scores[part]):
                        t += s / norm
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    total = [t / (t.norm() if float(t.norm()) > 0 else 1.0) for t in total]
    return total[:len(layers)], total[len(layers):]


def plan(scores: list[Tensor], fraction: float) -> list[list[int]]:
    """Which units to keep per layer when the `fraction` (0..1) of all units with the lowest scores (over all
    layers; ties: the later layer first) is pruned, at least one unit kept per layer -> per layer, the kept
    indices, sorted. Raises PruningError for a fraction outside [0, 1)."""
    if not 0 <= fraction < 1:
        raise PruningError(f"a pruning fraction must be in [0, 1), got {fraction}")
    order = sorted(((float(s), -i, j) for i, layer in enumerate(scores) for j, s in enumerate(layer)))
    target = math.floor(fraction * sum(len(s) for s in scores) + 1e-9)
    left = [len(s) for s in scores]
    dropped: set[tuple[int, int]] = set()
    for _, neg_i, j in order:
        if len(dropped) >= target:
            break
        if left[-neg_i] > 1:
            dropped.add((-neg_i, j))
            left[-neg_i] -= 1
    return [[j for j in range(len(s)) if (i, j) not in dropped] for i, s in enumerate(scores)]
