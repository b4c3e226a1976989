"""inference.py — a trained model made ready for decoding only: the decoder step's matrix products on weights
prepacked once in oneDNN's blocked layout (CPU), or a bf16 copy of the model (AMX CPUs, GPUs); `decoding_step`
is what every torch decoding path (nmt translate, the server, the recipes, distillation) calls after loading.
"""

from __future__ import annotations

import copy

import torch

from nmt.errors import NMTError
from nmt.search import DecoderStep, State

TORCH_PRECISIONS = ("fp32", "bf16")


def has_native_bf16(device: torch.device | str) -> bool:
    """Whether bf16 products run natively on `device` (CPUs with AMX or AVX512-BF16, CUDA GPUs with bf16),
    where the bf16 step decodes faster than fp32; elsewhere bf16 is emulated and slower."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def check_precision(precision: str) -> str:
    """`precision` if the torch backend runs it, else one NMTError line."""
    if precision not in TORCH_PRECISIONS:
        raise NMTError(f"precision {precision!r}: the torch backend runs {' or '.join(TORCH_PRECISIONS)}")
    return precision


def decoding_step(model: torch.nn.Module, device: torch.device | str, precision: str = "fp32") -> DecoderStep:
    """A loaded model (eval mode, on `device`) as the DecoderStep that decodes it in `precision`: fp32 (on CPU
    with prepacked products; the model is not to be trained after this) or bf16 (a copy)."""
    if check_precision(precision) == "bf16":
        return BFloat16Step(model, str(device))
    if torch.device(device).type == "cpu":
        pack_decoder_products(model)
    return model


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

    def step(self, prev_tokens: torch.Tensor, state: State, normalize: bool = True) -> tuple[torch.Tensor, State]:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            log_probs, state = self.model.step(prev_tokens, state, normalize)
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
