"""Students made of a teacher's own layers: which encoder layers to keep, and dropping the others.

Two choices of the N layers kept out of L (Sajjad et al. 2023, "On the Effect of Dropping Layers of
Pre-trained Transformer Models", Computer Speech & Language; arXiv 2004.03844, 2020):
- top: top-layer dropping, keep the bottom N (layers 0..N-1); the paper's most reliable strategy.
- alternate: keep N layers spread evenly over the stack, first and last included: layer
  round_half_down(i * (L - 1) / (N - 1)) for i = 0..N-1 (N = 1: the first). For 12 -> 6 this is DistilBERT's
  initialisation (Sanh et al. 2019: layers 0, 2, 4, 7, 9, 11); for 6 -> 3 it keeps 0, 2, 5.
The kept layers keep their weights (and the embeddings and heads theirs); the model's config says N layers,
so `save_pretrained` / `from_pretrained` round-trip the smaller model.
"""

from __future__ import annotations

import math

from torch import nn

STRATEGIES = ("alternate", "top")


class LayerError(ValueError):
    """A layer count or strategy that does not fit the model; the message says which."""


def kept_layers(total: int, n: int, strategy: str = "alternate") -> list[int]:
    """The 0-based indices of the `n` layers kept out of `total` by `strategy` (module docstring), ascending.
    Raises LayerError unless 1 <= n < total and the strategy is known."""
    if strategy not in STRATEGIES:
        raise LayerError(f"unknown layer choice {strategy!r} (known: {', '.join(STRATEGIES)})")
    if not 1 <= n < total:
        raise LayerError(f"layers:{n}: a student keeps between 1 and {total - 1} of the teacher's {total} layers")
    if strategy == "top":
        return list(range(n))
    if n == 1:
        return [0]
    return [math.ceil(i * (total - 1) / (n - 1) - 0.5) for i in range(n)]


def encoder_layers(backbone: nn.Module) -> tuple[nn.Module, str]:
    """(the module holding the encoder's nn.ModuleList of layers, its attribute name): `encoder.layer`
    (BERT, RoBERTa, MPNet, ...) or `transformer.layer` (DistilBERT). Raises LayerError for another layout."""
    for path in ("encoder", "transformer"):
        holder = getattr(backbone, path, None)
        if holder is not None and isinstance(getattr(holder, "layer", None), nn.ModuleList):
            return holder, "layer"
    raise LayerError(f"cannot find the encoder layers of a {type(backbone).__name__} (expected encoder.layer or "
                     f"transformer.layer)")


def layer_count(backbone: nn.Module) -> int:
    """How many encoder layers `backbone` has. Raises LayerError (see `encoder_layers`)."""
    holder, name = encoder_layers(backbone)
    return len(getattr(holder, name))


def keep_layers(backbone: nn.Module, keep: list[int]) -> nn.Module:
    """Drop every encoder layer of `backbone` but `keep` (0-based, ascending), in place; the config's layer
    count follows. Returns the backbone. Raises LayerError for an index out of range or repeated."""
    holder, name = encoder_layers(backbone)
    layers = getattr(holder, name)
    if not keep or sorted(set(keep)) != list(keep) or keep[0] < 0 or keep[-1] >= len(layers):
        raise LayerError(f"layers {keep}: expected ascending distinct indices in 0..{len(layers) - 1}")
    setattr(holder, name, nn.ModuleList([layers[i] for i in keep]))
    for new, layer in enumerate(getattr(holder, name)):
        for module in layer.modules():          # attention caches are indexed by layer position
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    config = backbone.config
    for attr in ("num_hidden_layers", "n_layers"):
        if hasattr(config, attr):
            setattr(config, attr, len(keep))
    return backbone
