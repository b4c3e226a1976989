"""backends.py — opens a model as a `DecoderStep` on the backend asked for (torch: a run folder or checkpoint;
ONNX Runtime or TensorRT: an export folder) with its vocabulary and decode defaults, and as a `Translator`
(`open_translator`: what the command line, the server and the recipes decode with; several models make an
ensemble). No search logic here.

Precision: `precision=` or the environment variable NMT_PRECISION picks the graphs: fp32 (default), int8 (ONNX
Runtime on CPU, from `nmt export --int8`) or fp16 (from `nmt export --fp16`; TensorRT uses fp16 when present).
"""

from __future__ import annotations

import copy
import dataclasses
import os

import torch

from nmt.config import DecodeConfig
from nmt.errors import NMTError
from nmt.search import DecoderStep, State
from nmt.translate import Translator
from nmt.vocab import Vocab
from serving.graphs import read_model_json

PRECISIONS = ("fp32", "fp16", "int8")
TORCH_PRECISIONS = ("fp32", "bf16")


class BFloat16Step:
    """The torch model as a DecoderStep in bf16 (AMX on recent Xeons, tensor cores on GPUs): a bf16 copy of its
    weights, made once (under autocast alone, casting the weights at every step costs as much as the products at
    decoding's batch sizes), matrix products under torch.autocast (on CPU the decoder step's with prepacked
    weights, and the attention keys in float32), the recurrent states and the log-probabilities in float32."""

    def __init__(self, model: DecoderStep, device: str) -> None:
        self.model, self.device_type = copy.deepcopy(model).to(torch.bfloat16), torch.device(device).type
        if self.device_type == "cpu":
            pack_decoder_products(self.model)

    def parameter_count(self) -> int:
        return self.model.parameter_count()

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> State:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            state = self.model.encode(src, src_lengths)
        sentences = dict(state.sentences)
        if self.device_type == "cpu":  # the attention's tanh(q + keys) then runs in float32: 3x faster there
            sentences["keys"] = sentences["keys"].float()
        return State({name: rows.float() for name, rows in state.rows.items()}, sentences)

    def step(self, prev_tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            log_probs, state = self.model.step(prev_tokens, state)
        return log_probs.float(), state


def pack_decoder_products(model: torch.nn.Module) -> None:
    """The decoder step's products of a model that only decodes from now on (its weights are copied into
    oneDNN's layout once: never one under training), where oneDNN runs them on CPU in the weights' dtype: the
    output layer, the cells' input and recurrent projections, the attention's query and the attentional layer
    (eval mode: no dropout to skip)."""
    decoder = model.decoder
    products = [(decoder, "logits", decoder.output_layer()),
                (decoder.attention.query_layer, "forward", (decoder.attention.query_layer.weight, None)),
                (decoder.att_layer, "forward", (decoder.att_layer.weight, decoder.att_layer.bias))]
    for cell in decoder.cells:
        products += [(cell, "project", (cell.input_weight, cell.input_bias)),
                     (cell, "recurrent", (cell.recurrent_weight, cell.recurrent_bias))]
    for owner, name, (weight, bias) in products:
        packed = packed_linear(weight, bias)
        if packed is None:
            return
        setattr(owner, name, packed)


def unpack_decoder_products(model: torch.nn.Module) -> None:
    """Undo `pack_decoder_products`: the classes' plain products again (bench/bench_speedup.py's -unpacked)."""
    for module in model.decoder.modules():
        for name in ("logits", "forward", "project", "recurrent"):  # the methods pack_decoder_products replaces
            vars(module).pop(name, None)


def packed_linear(weight: torch.Tensor, bias: torch.Tensor | None):
    """x [N, in] → x @ weight.T + bias [N, out] by oneDNN with the weight reordered once into its blocked layout,
    in the weight's dtype (a plain product re-blocks the weight on every call; at decoding's batch sizes of 32 rows
    the packed output layer takes 0.74x the time in fp32 and about 0.7x in bf16; bench/bench_speedup.py measures
    it: PRECISION fp32-unpacked / bf16-unpacked); None where this torch has no such kernel."""
    mkldnn = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_reorder_linear_weight")):
        return None
    try:
        blocked = mkldnn._reorder_linear_weight(weight.detach(), None)
        bias = bias.detach() if bias is not None else None

        def packed_product(x: torch.Tensor) -> torch.Tensor:
            return mkldnn._linear_pointwise(x.to(weight.dtype), blocked, bias, "none", [], "")

        packed_product(torch.zeros(1, weight.size(1), dtype=weight.dtype))
    except RuntimeError:  # a CPU oneDNN cannot run this dtype on
        return None
    return packed_product


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

        chosen = precision or os.environ.get("NMT_PRECISION") or "fp32"
        if chosen not in TORCH_PRECISIONS:
            raise NMTError(f"precision {chosen!r}: the torch backend runs {' or '.join(TORCH_PRECISIONS)}")
        device = parallel.device_for(device, parallel.ranks().local_rank, "--device", "use --device cpu")
        net, vocab, config = load_model(model, device)
        if chosen == "bf16":
            return BFloat16Step(net, device), vocab, config.decode
        if torch.device(device).type == "cpu":
            pack_decoder_products(net)
        return net, vocab, config.decode
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
