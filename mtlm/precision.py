"""Which training precision `train.mixed_precision` means on this machine (`auto`, the default: native bf16
where it pays, fp32 otherwise).

bf16 autocast pays only where the hardware computes in bf16: a CUDA GPU with bf16 support (Ampere or later),
or a CPU whose oneDNN has native bf16 kernels (AVX512-BF16 or AMX; `mtlm.engine.cpu_has_bf16`, the one
place that probes the CPU). Elsewhere PyTorch emulates bf16 matmuls, measured 6-9x slower than fp32 on an
AVX2 CPU (../shared/ENGINES.md), so `auto` trains in fp32 there and an explicit `bf16` falls back to fp32
with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtlm.config import RecipeError


@dataclass(frozen=True)
class Precision:
    """The resolved setting. mode: what Accelerate gets ("no" = fp32, "bf16", "fp16"); reason: one line for
    the log and the run's environment.json."""

    requested: str
    mode: str
    reason: str

    def as_dict(self) -> dict:
        return {"requested": self.requested, "mode": self.mode, "reason": self.reason}


def native_bf16() -> bool:
    """Whether the device training runs on here computes bf16 natively: the GPU when there is one
    (torch.cuda.is_bf16_supported), else this CPU (`mtlm.engine.cpu_has_bf16`: AVX512-BF16 or AMX)."""
    import torch
    from mtlm.engine import cpu_has_bf16
    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    return cpu_has_bf16()


def resolve_precision(requested: str, cuda: bool, bf16_native: bool) -> Precision:
    """`train.mixed_precision` (auto | no | bf16 | fp16) -> the Precision to train with.

    cuda: whether training runs on a GPU; bf16_native: whether that GPU / this CPU has native bf16
    (`native_bf16`). auto -> bf16 when native, else fp32 ("no"); bf16 without native support -> fp32 (with
    the reason: emulated bf16 is several times slower); fp16 needs a GPU. Raises RecipeError for fp16 on CPU."""
    device = "the GPU" if cuda else "this CPU"
    if requested == "fp16":
        if not cuda:
            raise RecipeError(["train.mixed_precision: fp16 needs a GPU; use bf16 (or auto) on CPU"])
        return Precision(requested, "fp16", "fp16 autocast with loss scaling, as asked")
    if requested == "no":
        return Precision(requested, "no", "fp32, as asked")
    if bf16_native:
        return Precision(requested, "bf16", f"bf16 autocast: {device} has native bf16")
    why = (f"{device} has no native bf16 ({'GPU older than Ampere' if cuda else 'AVX512-BF16 / AMX'}): "
           f"emulated bf16 would run several times slower than fp32")
    return Precision(requested, "no", f"fp32: {why}")


def as_trained(raw: dict) -> dict:
    """A recipe dict (yaml of `Recipe.to_yaml()`) with `train.mixed_precision` replaced by the mode training
    uses on this machine ("auto" -> "no" or "bf16"; "bf16" without native bf16 -> "no"), for comparing a
    stored recipe with today's: a run trained before `auto` existed (stored "no") and the same recipe now
    (default "auto") are the same training on a machine where auto means fp32. A copy; other keys unchanged;
    a setting that does not resolve here (fp16 on CPU) is left as written."""
    train = raw.get("train")
    if not isinstance(train, dict) or train.get("mixed_precision") not in ("auto", "bf16", "no"):
        return raw
    import torch
    mode = resolve_precision(train["mixed_precision"], torch.cuda.is_available(), native_bf16()).mode
    return {**raw, "train": {**train, "mixed_precision": mode}}
