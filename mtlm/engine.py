"""Engines: what runs the backbone and heads at prediction time.

An engine takes a padded micro-batch (`mtlm.encoded.ModelInputs`) and returns every asked head's output by
task name. `mtlm.predict.Predictor`, the server and `mtlm eval` run the model only through one, chosen by name:

    ENGINES = {"torch": TorchEngine,            # torch eager, fp32 as loaded: the reference
               "torch-bf16": TorchBf16Engine,   # torch eager, bf16 weights + autocast (native-bf16 CPUs, GPUs)
               "onnx": OnnxEngine,              # ONNX Runtime, the bundle's fp32 graph (model/onnx/model.onnx)
               "onnx-int8": OnnxInt8Engine}     # ONNX Runtime, its dynamic int8 graph (model/onnx/model.int8.onnx)

A factory is called as factory(model, device, bundle): `model` the loaded `MultiTaskModel` (torch engines),
`bundle` the bundle folder (ONNX engines read only their graph file from it). Outputs are torch tensors on
the CPU or the model's device, one per task: the head's logits, (rows, ...) with one row per backbone row.
Which engines a bundle holds, and which is its default, is `mtlm.engines_manifest`'s job; checking an engine
against torch fp32 before use is `mtlm.engine_check`'s.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor

from mtlm.encoded import ModelInputs

ONNX_DIR = "onnx"                       # inside a bundle
ONNX_FILES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}
GRAPH_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class EngineError(ValueError):
    """An engine that cannot run here: unknown name, a graph the bundle does not hold, an instruction set
    the CPU lacks, or a failed check against torch fp32. The message says what to do instead."""


class Engine(Protocol):
    """Runs the backbone once and the asked heads on its states."""

    name: str

    def run(self, inputs: ModelInputs, tasks: Sequence[str]) -> dict[str, Tensor]:
        """{task: logits (rows, ...)} for every task in `tasks` (an engine may compute more heads, e.g. an
        exported graph computes all of them, but returns at least these). Raises KeyError on an unknown task."""
        ...


def cpu_has_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX); without them PyTorch emulates
    bf16 matmuls (measured 6-9x slower than fp32 on an AVX2 CPU)."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(probe()) if probe is not None else True


class TorchEngine:
    """Torch eager on `device` (fp32 as loaded), under `torch.inference_mode()`: one backbone pass, then
    only the asked heads."""

    name = "torch"
    takes_rows = True     # run(..., rows=): only the asked rows of each task (`MultiTaskModel.infer`)

    def __init__(self, model, device: torch.device | str = "cpu", bundle: Path | None = None):
        self.model, self.device = model, torch.device(device)

    def _context(self):
        return contextlib.nullcontext()

    @torch.inference_mode()
    def run(self, inputs: ModelInputs, tasks: Sequence[str], rows: dict[str, Tensor] | None = None
            ) -> dict[str, Tensor]:
        """rows: {task: LongTensor of the rows it is asked for} (None: all): see `MultiTaskModel.infer`."""
        with self._context():
            if rows is not None:
                rows = {n: r.to(self.device) for n, r in rows.items()}
            out = self.model.infer(**inputs.to(self.device).as_dict(), tasks=list(tasks), rows=rows)
        return {n: v.float() for n, v in out.items()}


class TorchBf16Engine(TorchEngine):
    """Torch eager with the weights in bf16: a bf16 copy of the model (half the fp32 model's memory; the fp32
    model stays, as the reference `mtlm.engine_check` compares with), run under
    `torch.autocast(dtype=torch.bfloat16)` so LayerNorm and softmax still compute in fp32 while matmuls read the
    bf16 weights directly (autocast over fp32 weights would re-cast every weight on every call); outputs cast
    back to fp32. On a CPU it needs native bf16 (AVX512-BF16 or AMX): raises EngineError otherwise, since
    emulated bf16 is several times slower than fp32."""

    name = "torch-bf16"

    def __init__(self, model, device: torch.device | str = "cpu", bundle: Path | None = None):
        super().__init__(model, device, bundle)
        if self.device.type == "cpu" and not cpu_has_bf16():
            raise EngineError("engine torch-bf16: this CPU has no native bf16 (AVX512-BF16 or AMX; see the flags in "
                              "/proc/cpuinfo), so bf16 would run emulated, several times slower than fp32; use "
                              "--engine onnx-int8 (after `mtlm compress RUN --method int8`) or torch")
        if model is not None:
            self.model = copy.deepcopy(model).to(dtype=torch.bfloat16)

    def _context(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


def onnx_path(bundle: Path | None, name: str) -> Path:
    """The graph file of ONNX engine `name` in `bundle`. Raises EngineError when the bundle does not hold it
    (saying which command writes it)."""
    if bundle is None:
        raise EngineError(f"engine {name}: needs a bundle folder holding {ONNX_DIR}/{ONNX_FILES[name]}")
    path = Path(bundle) / ONNX_DIR / ONNX_FILES[name]
    if not path.is_file():
        how = ("mtlm export RUN --format onnx" if name == "onnx"
               else "mtlm compress RUN --method int8 (it writes a new run whose bundle holds it)")
        raise EngineError(f"engine {name}: the bundle {bundle} holds no {ONNX_DIR}/{ONNX_FILES[name]}; make it with "
                          f"`{how}`")
    return path


def ort_session(path: Path, threads: int | None = None):
    """An ONNX Runtime CPU session of `path` with every graph optimisation on and `threads` intra-op threads
    (default: torch's thread count, so engines compare at the same parallelism); its threads do not spin-wait
    between ops when OMP_WAIT_POLICY=PASSIVE (as OpenMP's). Raises EngineError when onnxruntime is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise EngineError("the ONNX engines need onnxruntime: pip install onnxruntime") from None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        # as torch's OpenMP threads under the same variable (`mtlm serve` sets it): intra-op threads that
        # spin-wait between ops take the CPU the server's event loop, tokenizer and other processes need
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def graph_feed(inputs: ModelInputs) -> dict:
    """An exported graph's inputs (`GRAPH_INPUTS`) for a padded micro-batch: int64 numpy arrays (rows, seq),
    token_type_ids as zeros when the tokenizer has none."""
    feed = inputs.as_dict()
    feed.setdefault("token_type_ids", torch.zeros_like(inputs.input_ids))
    return {k: feed[k].cpu().numpy().astype("int64") for k in GRAPH_INPUTS}


class OnnxEngine:
    """ONNX Runtime (CPU) running the bundle's exported graph of backbone + every head (`mtlm.export`):
    every call computes all heads and returns the asked ones. Needs no torch weights: `model` is unused.
    Inputs are fed as int64; token_type_ids as zeros when the tokenizer has none."""

    name = "onnx"

    def __init__(self, model=None, device: torch.device | str = "cpu", bundle: Path | None = None):
        if torch.device(device).type != "cpu":
            raise EngineError(f"engine {self.name}: runs on the CPU only (onnxruntime's CPU package); use torch "
                              f"or torch-bf16 on {device}")
        self.path = onnx_path(bundle, self.name)
        self.session = ort_session(self.path)
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: ModelInputs, tasks: Sequence[str]) -> dict[str, Tensor]:
        unknown = [t for t in tasks if t not in self.outputs]
        if unknown:
            raise KeyError(f"unknown task(s) {unknown}; the graph's heads: {', '.join(self.outputs)}")
        values = self.session.run(self.outputs, graph_feed(inputs))
        return {n: torch.from_numpy(v) for n, v in zip(self.outputs, values) if n in tasks}


class OnnxInt8Engine(OnnxEngine):
    """ONNX Runtime running the bundle's dynamic int8 graph (`mtlm.compress`: onnxruntime's dynamic
    quantisation, per-channel weights; activations quantised per batch at run time)."""

    name = "onnx-int8"


ENGINES: dict[str, Callable[..., Engine]] = {
    "torch": TorchEngine,
    "torch-bf16": TorchBf16Engine,
    "onnx": OnnxEngine,
    "onnx-int8": OnnxInt8Engine,
}


def make_engine(name: str, model, device: torch.device | str = "cpu", bundle: Path | None = None) -> Engine:
    """The engine called `name` for a loaded `MultiTaskModel` (torch engines) or the bundle folder `bundle`
    (ONNX engines). Raises EngineError (a ValueError) listing the known names on an unknown one, or saying
    why a known one cannot run here."""
    if name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}; known engines: {', '.join(ENGINES)}")
    return ENGINES[name](model, device, bundle)


def read_manifest(bundle: Path) -> dict:
    """The bundle's engines.json ({} when absent): {"format", "engines": {name: {...}}, "measured": {...}}."""
    path = Path(bundle) / "engines.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def precheck_engine(name: str, bundle: Path) -> None:
    """What can be told about engine `name` for `bundle` without loading the model: a known name, a graph
    file the bundle holds, native bf16 for torch-bf16 on a CPU-only machine. Raises EngineError."""
    if name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}; known engines: {', '.join(ENGINES)}")
    if name in ONNX_FILES:
        onnx_path(bundle, name)
    if name == "torch-bf16" and not torch.cuda.is_available():
        TorchBf16Engine(None, "cpu")
