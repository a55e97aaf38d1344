"""Task-private top layers (`tasks.<name>.private_layers: K`) with one shared pass of the lower layers.

A backbone of L layers runs its embeddings and lower layers once per input; each task with K > 0 runs its own
copy of the top K layers (initialised from the pretrained top K) on the states after layer L - K, and tasks
with K = 0 read the shared stack's output. Tasks with equal K each get their own copy. This is the "shared
lower layers, task-specific top layers" form of multi-task capacity (cf. Stickland & Murray 2019 and
AdapterDrop, Rueckle et al. 2021, who find the top layers the most task-specific); it costs, per input and
per task with K > 0, K extra layer passes (out of L for the shared pass).

The backbone is run in pieces through a `Stack`: how to find its list of layers, prepare the hidden states
and the attention mask the layers take, and call one layer. `EncoderStack` covers the BERT family in
transformers 5 (`backbone.embeddings`, `backbone.encoder.layer`, `create_bidirectional_mask`, as
`BertModel.forward` does); `DecoderStack` the Llama family (causal mask, rotary position embeddings, final
norm, applied by `finish` after the last layer). Every split run is checked once against the backbone's own forward (`check_split`), so an
architecture a Stack does not actually reproduce is refused rather than served wrong.

Bundles store the copies in `private_layers.safetensors`, keys "<task>.<layer index within the copy>.<param>"
(e.g. "ner.0.attention.self.query.weight"); tasks.json's task config holds K.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from mtlm.config import RecipeError

FILE = "private_layers.safetensors"


class EncoderStack:
    """A BERT-family encoder in transformers 5 run layer by layer, as `BertModel.forward` runs it:
    embeddings(input_ids, token_type_ids) -> `create_bidirectional_mask` (the format the config's attention
    implementation wants: None, a boolean or an additive mask) -> each `layer(hidden, mask)`."""

    @staticmethod
    def layers(backbone: nn.Module) -> nn.ModuleList | None:
        """The backbone's transformer layers in order, or None when it has no such list."""
        encoder = getattr(backbone, "encoder", None)
        layers = getattr(encoder, "layer", None)
        ok = isinstance(layers, nn.ModuleList) and len(layers) > 0 and hasattr(backbone, "embeddings")
        return layers if ok else None

    @staticmethod
    def embed(backbone: nn.Module, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None
              ) -> tuple[Tensor, Tensor | None]:
        """(hidden states after the embeddings (batch, seq_len, hidden), the mask every layer takes)."""
        from transformers.masking_utils import create_bidirectional_mask
        hidden = backbone.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        mask = create_bidirectional_mask(config=backbone.config, inputs_embeds=hidden, attention_mask=attention_mask)
        return hidden, mask

    @staticmethod
    def layer(layer: nn.Module, hidden: Tensor, mask: Tensor | None) -> Tensor:
        out = layer(hidden, mask)
        return out[0] if isinstance(out, tuple) else out


    @staticmethod
    def finish(backbone: nn.Module, hidden: Tensor) -> Tensor:
        return hidden


class DecoderStack:
    """A Llama-family decoder (Llama, SmolLM2, Qwen2, Mistral in transformers 5) run layer by layer, as
    `LlamaModel.forward` runs it without a cache: embed_tokens -> `create_causal_mask` and the rotary
    position embeddings of positions 0..seq_len-1 (right padding) -> each `layer(hidden, attention_mask=,
    position_embeddings=, position_ids=)` -> the final `norm`."""

    @staticmethod
    def layers(backbone: nn.Module) -> nn.ModuleList | None:
        layers = getattr(backbone, "layers", None)
        ok = isinstance(layers, nn.ModuleList) and len(layers) > 0 and all(
            hasattr(backbone, a) for a in ("embed_tokens", "rotary_emb", "norm"))
        return layers if ok else None

    @staticmethod
    def embed(backbone: nn.Module, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None
              ) -> tuple[Tensor, tuple]:
        """(embeddings (batch, seq_len, hidden), (causal mask, (cos, sin), position_ids)) for every layer."""
        from transformers.masking_utils import create_causal_mask
        hidden = backbone.embed_tokens(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        mask = create_causal_mask(config=backbone.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  cache=None, position_ids=positions)
        return hidden, (mask, backbone.rotary_emb(hidden, position_ids=positions), positions)

    @staticmethod
    def layer(layer: nn.Module, hidden: Tensor, context: tuple) -> Tensor:
        mask, rotary, positions = context
        out = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions)
        return out[0] if isinstance(out, tuple) else out

    @staticmethod
    def finish(backbone: nn.Module, hidden: Tensor) -> Tensor:
        return backbone.norm(hidden)


STACKS = (EncoderStack, DecoderStack)


def repeat_rows(context, times: int, batch: int):
    """A layer context (tensor, tuple of tensors, or None) for `times` copies of a batch of `batch` rows
    stacked along dim 0: tensors whose first dim is `batch` (> 1) are repeated, others (None, batch 1,
    broadcast shapes) kept."""
    if isinstance(context, tuple):
        return tuple(repeat_rows(c, times, batch) for c in context)
    if isinstance(context, Tensor) and context.dim() > 0 and context.shape[0] == batch and batch > 1:
        return context.repeat(times, *([1] * (context.dim() - 1)))
    return context


def select_rows(context, index: Tensor, batch: int):
    """A layer context (tensor, tuple of tensors, or None) for the rows `index` (a LongTensor, repeats
    allowed) of a batch of `batch` rows: tensors whose first dim is `batch` (> 1) are indexed, others (None,
    batch 1, broadcast shapes) kept. `repeat_rows` is the case index = 0..batch-1 `times` times over."""
    if isinstance(context, tuple):
        return tuple(select_rows(c, index, batch) for c in context)
    if isinstance(context, Tensor) and context.dim() > 0 and context.shape[0] == batch and batch > 1:
        return context[index]
    return context


def stack_for(backbone: nn.Module):
    """The Stack that runs `backbone` in pieces, or None."""
    return next((s for s in STACKS if s.layers(backbone) is not None), None)


def private_copies(backbone: nn.Module, depths: dict[str, int]) -> nn.ModuleDict:
    """{task: nn.ModuleList of copies of the backbone's top K layers} for every task with K = depths[task] > 0
    (empty when none). The copies share the backbone's config object, so switching its attention
    implementation (e.g. to eager for ONNX export) switches theirs. Raises RecipeError naming
    `tasks.<name>.private_layers` for K < 0, K > the number of layers, or a backbone without a layer list."""
    problems, out = [], nn.ModuleDict()
    wanted = {n: k for n, k in depths.items() if k != 0}
    if not wanted:
        return out
    stack = stack_for(backbone)
    for name, k in wanted.items():
        key = f"tasks.{name}.private_layers"
        if not isinstance(k, int) or k < 0:
            problems.append(f"{key}: must be an integer >= 0 (got {k!r})")
        elif stack is None:
            problems.append(f"{key}: the backbone ({type(backbone).__name__}) has no list of layers this version "
                            f"can run in pieces (supported: BERT-family encoders, Llama-family decoders); set it to 0")
        elif k > len(stack.layers(backbone)):
            problems.append(f"{key}: {k} is more than the backbone's {len(stack.layers(backbone))} layers")
    if problems:
        raise RecipeError(problems)
    layers = stack.layers(backbone)
    memo = {id(backbone.config): backbone.config}
    for name, k in wanted.items():
        out[name] = nn.ModuleList(copy.deepcopy(layers[i], dict(memo)) for i in range(len(layers) - k, len(layers)))
    return out


def split_states(backbone: nn.Module, private: nn.ModuleDict, names: list[str], input_ids: Tensor,
                 attention_mask: Tensor, token_type_ids: Tensor | None) -> dict[str, Tensor]:
    """{task: its final token states (batch, seq_len, hidden)} for `names`: the shared layers run once, up to
    the highest layer a task in `names` reads (L for a task without private layers, L - K for one with K),
    then each task with K > 0 runs its own K layers from the states after shared layer L - K.
    Tasks that read the same states get the same tensor. Raises ValueError for a backbone no Stack runs."""
    stack = stack_for(backbone)
    if stack is None:
        raise ValueError(f"{type(backbone).__name__}: no list of layers to run in pieces")
    layers = stack.layers(backbone)
    total = len(layers)
    start = {n: total - (len(private[n]) if n in private else 0) for n in names}   # first layer not shared
    hidden, mask = stack.embed(backbone, input_ids, attention_mask, token_type_ids)
    at = {0: hidden}
    for i in range(max(start.values())):
        hidden = stack.layer(layers[i], hidden, mask)
        at[i + 1] = hidden
    out, finished = {}, {}
    for n in names:
        h = at[start[n]]
        for layer in (private[n] if n in private else ()):
            h = stack.layer(layer, h, mask)
        out[n] = finished.setdefault(id(h), stack.finish(backbone, h)) if n not in private else stack.finish(backbone, h)
    return out


def task_backbone_state(backbone: nn.Module, private: nn.ModuleDict, task: str) -> dict[str, Tensor]:
    """The backbone's state_dict as task `task` sees it: its top K layers' tensors replaced by the task's
    private copy (a task without private layers: the backbone's own). Running the plain backbone with these
    weights gives exactly the task's states (the lower layers are the shared ones): what a one-task export
    (`mtlm export --format hf`) writes."""
    state = dict(backbone.state_dict())
    if task not in private:
        return state
    layers = stack_for(backbone).layers(backbone)
    prefix = next(name for name, module in backbone.named_modules() if module is layers)
    first = len(layers) - len(private[task])
    for j, layer in enumerate(private[task]):
        for k, v in layer.state_dict().items():
            key = f"{prefix}.{first + j}.{k}"
            if key not in state:
                raise KeyError(f"{key}: not a tensor of the backbone")
            state[key] = v
    return state


def check_split(backbone: nn.Module, atol: float = 1e-5) -> None:
    """Run a small input through the backbone's own forward and through `split_states` (no private layers)
    and require the same last hidden states. Raises RecipeError when the split run does not reproduce the
    backbone (an architecture `EncoderStack` does not describe)."""
    was_training = backbone.training
    backbone.eval()
    try:
        vocab = int(getattr(backbone.config, "vocab_size", 100))
        ids = (torch.arange(12).reshape(2, 6) % max(2, vocab - 1) + 1).to(next(backbone.parameters()).device)
        mask = torch.ones_like(ids)
        mask[1, 4:] = 0
        with torch.no_grad():
            want = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
            got = split_states(backbone, nn.ModuleDict(), ["x"], ids, mask, None)["x"]
        diff = float((want - got).abs().max())
    finally:
        backbone.train(was_training)
    if not diff <= atol:
        raise RecipeError([f"private_layers: running {type(backbone).__name__} layer by layer does not reproduce "
                           f"its forward (max difference {diff:.2e}); private_layers is not supported for this "
                           f"backbone: set every task's private_layers to 0"])


def private_state(private: nn.ModuleDict) -> dict[str, Tensor]:
    """The copies' weights for `FILE`: {"<task>.<index>.<param>": tensor on the CPU}."""
    return {f"{task}.{k}": v.detach().cpu().contiguous() for task, layers in private.items()
            for k, v in layers.state_dict().items()}


def load_private(private: nn.ModuleDict, bundle: Path) -> None:
    """Load bundle/`FILE` into `private` strictly. Raises ValueError naming the file and the tasks whose
    tensors are missing, unexpected or of the wrong shape (the caller turns it into a BundleError)."""
    from safetensors.torch import load_file

    file = Path(bundle) / FILE
    if not len(private):
        if file.exists():
            raise ValueError(f"{file}: holds private layers but no task in tasks.json has private_layers > 0")
        return
    try:
        weights = load_file(file)
    except Exception as e:      # absent, truncated or not safetensors
        raise ValueError(f"{file}: cannot read the private layers of tasks {', '.join(private)}: "
                         f"{str(e).splitlines()[0]}") from None
    problems = []
    for task, layers in private.items():
        mine = {k.split(".", 1)[1]: v for k, v in weights.items() if k.split(".", 1)[0] == task}
        want = layers.state_dict()
        missing = sorted(set(want) - set(mine))
        wrong = [f"{k} {tuple(mine[k].shape)} (expected {tuple(want[k].shape)})" for k in want
                 if k in mine and mine[k].shape != want[k].shape]
        extra = sorted(set(mine) - set(want))
        if missing or wrong or extra:
            problems.append(f"task '{task}' (private_layers {len(layers)}): " + "; ".join(
                ([f"missing {', '.join(missing[:3])}"] if missing else []) + wrong[:3]
                + ([f"unexpected {', '.join(extra[:3])}"] if extra else [])))
        else:
            layers.load_state_dict(mine, strict=True)
    others = sorted({k.split(".", 1)[0] for k in weights} - set(private))
    if others:
        problems.append(f"private layers of task(s) {', '.join(others)} that tasks.json gives none")
    if problems:
        raise ValueError(f"{file} does not match tasks.json: " + " | ".join(problems))
