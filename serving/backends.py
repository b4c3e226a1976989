"""backends.py — opens a model as a `DecoderStep` on the backend asked for (torch: a run folder or checkpoint;
ONNX Runtime or TensorRT: an export folder) with its vocabulary and decode defaults, and as a `Translator`
(`open_translator`: what the command line, the server and the recipes decode with; several models make an
ensemble). No search logic here.

Precision: `precision=` or the environment variable NMT_PRECISION picks the graphs: fp32 (default), int8 (ONNX
Runtime on CPU, from `nmt export --int8`) or fp16 (from `nmt export --fp16`; TensorRT uses fp16 when present).
"""

from __future__ import annotations

import dataclasses
import os

from nmt.config import DecodeConfig
from nmt.errors import NMTError
from nmt.inference import check_precision, decoding_step
from nmt.search import DecoderStep
from nmt.translate import Translator
from nmt.vocab import Vocab
from serving.graphs import read_model_json

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


def open_model(model: str, backend: str = "torch", device: str = "cpu",
               precision: str | None = None) -> tuple[DecoderStep, Vocab, DecodeConfig]:
    """One model as (decoder, vocabulary, decode defaults): a run folder or checkpoint for torch (under torchrun,
    `cuda` is this process's GPU; precision fp32 or bf16), an export folder for the others."""
    if backend == "torch":
        from nmt import parallel
        from nmt.checkpoint import load_model

        chosen = check_precision(precision or os.environ.get("NMT_PRECISION") or "fp32")  # before the loading
        device = parallel.device_for(device, parallel.ranks().local_rank, "--device", "use --device cpu")
        net, vocab, config = load_model(model, device)
        return decoding_step(net, device, chosen), vocab, config.decode
    return open_backend(model, backend, device, precision)


def open_translator(model: str | list[str], backend: str = "torch", device: str = "cpu",
                    precision: str | None = None, **decode_overrides) -> Translator:
    """A Translator over the chosen backend and precision (default: NMT_PRECISION, else fp32; fp16 for TensorRT
    exports with fp16 graphs); several models make an ensemble (nmt.ensemble) with the first one's decode
    defaults; `decode_overrides` replace DecodeConfig fields (None = keep)."""
    from nmt import parallel
    from nmt.ensemble import combine

    models = [model] if isinstance(model, str) else list(model)
    opened = [open_model(name, backend, device, precision) for name in models]
    net, vocab = combine([(f"--model {name}", step, vocab) for name, (step, vocab, _) in zip(models, opened)])
    overrides = {k: v for k, v in decode_overrides.items() if v is not None}
    try:
        decode = dataclasses.replace(opened[0][2], **overrides)
    except TypeError as err:
        raise NMTError(str(err)) from None
    if backend == "torch":
        device = parallel.device_for(device, parallel.ranks().local_rank, "--device", "use --device cpu")
    return Translator(net, vocab, decode, device)
