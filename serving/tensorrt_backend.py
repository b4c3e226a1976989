"""tensorrt_backend.py — TensorRT engines from the two exported graphs, and the decoder-step interface over them.

Engines are built with `build_serialized_network` (TensorRT 10 and 11; strongly typed networks, so fp16 comes
from the fp16 graphs, never from builder flags), with one optimization profile covering N = batch × beam and
the source length, and cached next to the ONNX files under names holding the TensorRT version and GPU name.
At run time torch CUDA tensors are the I/O buffers (`set_tensor_address`, `execute_async_v3` on torch's
stream). The pure helpers (shapes, profiles, names, dtypes) need no TensorRT; no search logic here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nmt.errors import NMTError
from nmt.search import State
from serving.graphs import graph_file

INSTALL_HINT = ("TensorRT is not installed: `pip install tensorrt` (10.x or 11.x, with an NVIDIA GPU and CUDA "
                "driver), or use --backend onnxruntime")
TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                "INT64": torch.int64, "BOOL": torch.bool, "INT8": torch.int8, "UINT8": torch.uint8}
ROW_KEYS = {"hidden": "new_hidden", "att_vec": "new_att_vec", "cell": "new_cell"}
WORKSPACE_BYTES = 1 << 30


def require_tensorrt() -> Any:
    """The `tensorrt` module, or one NMTError line saying what to install."""
    try:
        import tensorrt
    except ImportError:
        raise NMTError(INSTALL_HINT) from None
    return tensorrt


# --- pure helpers (unit-tested without TensorRT) ----------------------------------------------------------------

@dataclass(frozen=True)
class EngineLimits:
    """The optimization profile's range: sentences per batch, beam size, source pieces (opt = typical load)."""

    max_batch: int = 64
    max_beam: int = 8
    max_src_len: int = 256
    opt_batch: int = 16
    opt_src_len: int = 32

    @classmethod
    def for_decode(cls, decode: dict[str, Any]) -> EngineLimits:
        """Limits that cover a model's decode defaults (its batch size, beam size, input cropping length)."""
        max_batch = int(decode.get("batch_size", 64))
        max_src = int(decode.get("max_input_len", 250))
        return cls(max_batch=max_batch, max_beam=max(8, int(decode.get("beam_size", 5))), max_src_len=max_src,
                   opt_batch=min(16, max_batch), opt_src_len=min(32, max_src))

    @property
    def tag(self) -> str:
        return f"b{self.max_batch}k{self.max_beam}s{self.max_src_len}"

    def check(self, batch: int, rows: int, src_len: int) -> None:
        """Refuse shapes outside the profile with one line naming the limit (TensorRT would fail less clearly)."""
        if batch > self.max_batch or rows > self.max_batch * self.max_beam or src_len > self.max_src_len:
            raise NMTError(f"TensorRT engines were built for at most {self.max_batch} sentences × beam "
                           f"{self.max_beam} of {self.max_src_len} pieces (got {batch} sentences, {rows} rows, "
                           f"{src_len} pieces); lower --batch-size / --beam-size")


def safe_name(text: str) -> str:
    """A file-name-safe form of a version or GPU name: 'NVIDIA H200' → 'NVIDIA-H200'."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "unknown"


def plan_path(folder: str | Path, kind: str, precision: str, trt_version: str, gpu_name: str,
              limits: EngineLimits) -> Path:
    """Where an engine plan is cached: next to the ONNX files, named by TensorRT version, GPU and profile."""
    return Path(folder) / (f"{kind}.{precision}.trt{safe_name(trt_version)}.{safe_name(gpu_name)}."
                           f"{limits.tag}.plan")


def _pick(*dims: tuple[int, int, int] | int) -> tuple[tuple, tuple, tuple]:
    """(min, opt, max) shapes from per-dimension ranges (a tuple) or fixed sizes (an int)."""
    return tuple(tuple(d[i] if isinstance(d, tuple) else d for d in dims) for i in range(3))


def profile_shapes(info: dict[str, Any], kind: str, limits: EngineLimits) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) shape of every input of a graph: B sentences of S pieces, N = B × beam rows."""
    layers, hidden = info["decoder_layers"], info["decoder_hidden"]
    b = (1, limits.opt_batch, limits.max_batch)
    s = (1, limits.opt_src_len, limits.max_src_len)
    n = (1, limits.opt_batch * min(5, limits.max_beam), limits.max_batch * limits.max_beam)
    if kind == "encoder":
        table = {"src": _pick(b, s), "src_lengths": _pick(b)}
        names = info["encoder_inputs"]
    else:
        table = {"prev_tokens": _pick(n), "hidden": _pick(n, layers, hidden), "att_vec": _pick(n, info["att_vec_size"]),
                 "cell": _pick(n, layers, hidden), "memory": _pick(b, s, info["memory_size"]),
                 "keys": _pick(b, s, info["attention_dim"]), "src_mask": _pick(b, s)}
        names = info["step_inputs"]
    return {name: table[name] for name in names}


def torch_dtype(trt_dtype: Any) -> torch.dtype:
    """torch dtype of a TensorRT DataType (by its name: FLOAT, HALF, INT64, BOOL, ...)."""
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    if name not in TORCH_DTYPES:
        raise RuntimeError(f"TensorRT tensor type {name} has no torch equivalent here")
    return TORCH_DTYPES[name]


def network_flags(trt: Any) -> int:
    """Strongly typed network flag where the enum has it (TensorRT 10); 11 is always strongly typed."""
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if torch.cuda.is_available() else "no-gpu"


# --- building ---------------------------------------------------------------------------------------------------

def build_plan(trt: Any, onnx_path: Path, shapes: dict[str, tuple[tuple, tuple, tuple]]) -> bytes:
    """Parse one ONNX graph into a strongly typed network and build a serialized engine with one profile."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise NMTError(f"{onnx_path}: TensorRT could not parse it ({errors[:300]})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise NMTError(f"{onnx_path}: TensorRT failed to build an engine (see its log above)")
    return bytes(plan)


def build_engines(folder: str | Path, info: dict[str, Any], precision: str | None = None,
                  device: str = "cuda", limits: EngineLimits | None = None) -> list[Path]:
    """Build (or reuse cached) plans for both graphs; fp16 graphs when exported, else fp32. Returns the paths."""
    trt = require_tensorrt()
    if not torch.cuda.is_available():
        raise NMTError("TensorRT engines need a CUDA GPU, and torch sees none here")
    precision = precision or ("fp16" if info.get("fp16") else "fp32")
    limits = limits or EngineLimits.for_decode(info.get("decode", {}))
    name = gpu_name(torch.device(device))
    paths = []
    for kind in ("encoder", "decoder_step"):
        path = plan_path(folder, kind, precision, trt.__version__, name, limits)
        if not path.is_file():
            plan = build_plan(trt, Path(folder) / graph_file(kind, precision), profile_shapes(info, kind, limits))
            temp = path.with_suffix(".tmp")
            temp.write_bytes(plan)
            temp.replace(path)
        paths.append(path)
    return paths


# --- running ----------------------------------------------------------------------------------------------------

class _Engine:
    """One deserialized engine and its execution context; runs on torch CUDA tensors."""

    def __init__(self, trt: Any, plan: bytes, device: torch.device) -> None:
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise NMTError("TensorRT could not load a cached engine plan (delete the .plan files to rebuild)")
        self.context = self.engine.create_execution_context()
        self.device = device
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        kept = []
        for name in self.inputs:
            tensor = inputs[name].to(self.device, self.dtypes[name]).contiguous()
            kept.append(tensor)  # alive until the call returns; later torch work is ordered on the same stream
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return outputs


class TensorRTStep:
    """`DecoderStep` over TensorRT engines built from an export folder (built on first use, then cached)."""

    def __init__(self, model_dir: str | Path, info: dict[str, Any], precision: str = "fp32",
                 device: str = "cuda") -> None:
        trt = require_tensorrt()
        if not device.startswith("cuda") or not torch.cuda.is_available():
            raise NMTError(f"--backend tensorrt needs --device cuda and a CUDA GPU (got --device {device})")
        if precision not in info["files"]:
            raise NMTError(f"{model_dir}: no {precision} graphs in this export (`nmt export --{precision}`)")
        self.info, self.device = info, torch.device(device)
        self.limits = EngineLimits.for_decode(info.get("decode", {}))
        with torch.cuda.device(self.device):
            plans = build_engines(model_dir, info, precision, device, self.limits)
            self.encoder, self.stepper = (_Engine(trt, path.read_bytes(), self.device) for path in plans)

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> State:
        self.limits.check(src.size(0), src.size(0), src.size(1))
        out = self.encoder.run({"src": src, "src_lengths": src_lengths})
        rows = {key: out[key] for key in ("hidden", "att_vec", "cell") if key in out}
        return State(rows=rows, sentences={key: out[key] for key in ("memory", "keys", "src_mask")})

    def step(self, prev_tokens: torch.Tensor, state: State, normalize: bool = True) -> tuple[torch.Tensor, State]:
        """The graph's log-probabilities, whatever `normalize` asks (they are their own log-softmax)."""
        memory = state.sentences["memory"]
        self.limits.check(memory.size(0), prev_tokens.size(0), memory.size(1))
        out = self.stepper.run({"prev_tokens": prev_tokens, **state.rows, **state.sentences})
        rows = {key: out[new] for key, new in ROW_KEYS.items() if new in out}
        return out["log_probs"].float(), State(rows=rows, sentences=state.sentences, attention=out.get("weights"))
