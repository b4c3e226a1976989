"""backends.py — opens an export folder as a `DecoderStep` (ONNX Runtime or TensorRT), with its vocabulary and
decode defaults. The torch backend is not here (nmt.cli loads checkpoints itself); no search logic either.

Precision: `precision=` or the environment variable NMT_PRECISION picks the graphs: fp32 (default), int8 (ONNX
Runtime on CPU, from `nmt export --int8`) or fp16 (from `nmt export --fp16`; TensorRT uses fp16 when present).
"""

from __future__ import annotations

import dataclasses
import os

from nmt.config import DecodeConfig
from nmt.errors import NMTError
from nmt.search import DecoderStep
from nmt.vocab import Vocab
from serving.export import read_model_json

PRECISIONS = ("fp32", "fp16", "int8")


def decode_config(info: dict) -> DecodeConfig:
    """The checkpoint's decode section as saved in model.json (unknown keys from newer versions ignored)."""
    names = {f.name for f in dataclasses.fields(DecodeConfig)}
    return DecodeConfig(**{k: v for k, v in info.get("decode", {}).items() if k in names})


def choose_precision(precision: str | None, backend: str, info: dict) -> str:
    """Explicit argument, else NMT_PRECISION, else fp16 for TensorRT when exported with --fp16, else fp32."""
    chosen = precision or os.environ.get("NMT_PRECISION") or (
        "fp16" if backend == "tensorrt" and info.get("fp16") else "fp32")
    if chosen not in PRECISIONS:
        raise NMTError(f"precision {chosen!r}: expected one of {', '.join(PRECISIONS)} (NMT_PRECISION)")
    if backend == "tensorrt" and chosen == "int8":
        raise NMTError("precision int8 is for ONNX Runtime on CPU; TensorRT runs fp32 or fp16 graphs")
    return chosen


def open_backend(model_dir: str, backend: str, device: str, precision: str | None = None,
                 threads: int | None = None) -> tuple[DecoderStep, Vocab, DecodeConfig]:
    """An export folder as (decoder, vocabulary, decode defaults) for backend "onnxruntime" or "tensorrt"."""
    if backend == "tensorrt":
        from serving.tensorrt_backend import require_tensorrt

        require_tensorrt()  # first: one line saying what to install
    info = read_model_json(model_dir)
    chosen = choose_precision(precision, backend, info)
    if backend == "onnxruntime":
        from serving.onnx_backend import OnnxRuntimeStep

        decoder: DecoderStep = OnnxRuntimeStep(model_dir, info, chosen, device, threads)
    elif backend == "tensorrt":
        from serving.tensorrt_backend import TensorRTStep

        decoder = TensorRTStep(model_dir, info, chosen, device)
    else:
        raise NMTError(f"backend {backend!r}: expected onnxruntime or tensorrt (torch loads checkpoints)")
    return decoder, Vocab.load(model_dir), decode_config(info)
