"""export.py — `nmt export`: a trained model as two ONNX graphs (encoder, one decoder step), model.json, SentencePiece.

The graphs are traced from `Seq2Seq.encode_tensors(packed=False)` and `Seq2Seq.step_tensors`, the same functions
the torch backend runs; they are checked with `onnx.checker` and against torch with ONNX Runtime. No search
logic here: the step graph is one step for N = batch × beam rows, and `nmt.search` drives it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import warnings
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from nmt.checkpoint import load_model
from nmt.config import Config
from nmt.errors import NMTError
from nmt.model import Seq2Seq
from nmt.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Vocab
from serving.graphs import FORMAT, OPSET, graph_file, io_names

class EncoderGraph(nn.Module):
    """src [B, S] int64, src_lengths [B] int64 → the initial state (see Seq2Seq.encode_tensors)."""

    def __init__(self, model: Seq2Seq) -> None:
        super().__init__()
        self.model = model

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model.encode_tensors(src, src_lengths, packed=False)


class StepGraph(nn.Module):
    """One decoder step for N rows against B sentences (see Seq2Seq.step_tensors)."""

    def __init__(self, model: Seq2Seq) -> None:
        super().__init__()
        self.model = model

    def forward(self, prev_tokens: torch.Tensor, hidden: torch.Tensor, att_vec: torch.Tensor, memory: torch.Tensor,
                keys: torch.Tensor, src_mask: torch.Tensor,
                cell: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        return self.model.step_tensors(prev_tokens, hidden, att_vec, memory, keys, src_mask, cell)


def example_inputs(model: Seq2Seq, batch: int, steps: int, beam: int,
                   dtype: torch.dtype = torch.float32) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Encoder inputs and step inputs of the given sizes (lengths from `steps` down), for tracing and checks."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([max(1, steps - i) for i in range(batch)], dtype=torch.long)  # [B]
    src = torch.randint(4, model.src_vocab_size, (batch, steps), generator=generator)  # [B, S]
    src = src.masked_fill(torch.arange(steps).unsqueeze(0) >= lengths.unsqueeze(1), PAD_ID)
    src[torch.arange(batch), lengths - 1] = EOS_ID
    with torch.no_grad():
        memory, keys, src_mask, hidden, att_vec, *cell = model.encode_tensors(src, lengths, packed=False)
    rows = torch.arange(batch).repeat_interleave(beam)  # [N]
    prev = torch.randint(4, model.tgt_vocab_size, (batch * beam,), generator=generator)  # [N]
    att_vec = att_vec[rows] + 0.1 * torch.randn(att_vec[rows].shape, generator=generator).to(att_vec.dtype)
    step = (prev, hidden[rows].to(dtype), att_vec.to(dtype), memory.to(dtype), keys.to(dtype), src_mask)
    if cell:
        step = step + (cell[0][rows].to(dtype),)
    return (src, lengths), step


def _export_graph(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, inputs: list[str],
                  outputs: list[str], dynamic: dict[str, dict[int, str]]) -> None:
    """Trace with the TorchScript exporter (dynamic axes by name), then run onnx.checker on the file."""
    module.eval()  # the exporter restores the wrapper's mode afterwards: a fresh wrapper would turn dropout on
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=dynamic,
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    onnx.checker.check_model(str(path), full_check=True)


def _dynamic_axes(names: dict[str, list[str]]) -> tuple[dict, dict]:
    """Dynamic batch B and source length S for the encoder; N, B and S for the step graph."""
    per_sentence = {0: "batch", 1: "src_len"}
    encoder = {"src": per_sentence, "src_lengths": {0: "batch"}, "memory": per_sentence, "keys": per_sentence,
               "src_mask": per_sentence, "hidden": {0: "batch"}, "att_vec": {0: "batch"}, "cell": {0: "batch"}}
    step = {"prev_tokens": {0: "rows"}, "hidden": {0: "rows"}, "att_vec": {0: "rows"}, "cell": {0: "rows"},
            "memory": per_sentence, "keys": per_sentence, "src_mask": per_sentence, "log_probs": {0: "rows"},
            "new_hidden": {0: "rows"}, "new_att_vec": {0: "rows"}, "new_cell": {0: "rows"},
            "weights": {0: "rows", 1: "src_len"}}
    encoder_names = names["encoder_inputs"] + names["encoder_outputs"]
    step_names = names["step_inputs"] + names["step_outputs"]
    return ({k: v for k, v in encoder.items() if k in encoder_names},
            {k: v for k, v in step.items() if k in step_names})


def export_graphs(model: Seq2Seq, out: Path, precision: str = "fp32") -> None:
    """Write encoder and decoder_step graphs for fp32 or fp16 (float16 weights and states, float32 log_probs)."""
    names = io_names(model.lstm)
    dtype = torch.float16 if precision == "fp16" else torch.float32
    net = model.to(dtype)
    encoder_args, step_args = example_inputs(net, batch=2, steps=5, beam=2, dtype=dtype)
    encoder_axes, step_axes = _dynamic_axes(names)
    _export_graph(EncoderGraph(net), encoder_args, out / graph_file("encoder", precision), names["encoder_inputs"],
                  names["encoder_outputs"], encoder_axes)
    _export_graph(StepGraph(net), step_args, out / graph_file("decoder_step", precision), names["step_inputs"],
                  names["step_outputs"], step_axes)
    model.float()


def verify_graphs(model: Seq2Seq, out: Path, tolerance: float = 1e-3) -> float:
    """Run both fp32 graphs with ONNX Runtime at sizes other than the traced ones; the largest difference from
    torch. Raises RuntimeError (a bug, not a user error) above `tolerance`."""
    import onnxruntime as ort

    encoder_args, step_args = example_inputs(model, batch=3, steps=7, beam=3)
    names = io_names(model.lstm)
    worst = 0.0
    for kind, args, inputs in (("encoder", encoder_args, names["encoder_inputs"]),
                               ("decoder_step", step_args, names["step_inputs"])):
        session = ort.InferenceSession(str(out / graph_file(kind)), providers=["CPUExecutionProvider"])
        got = session.run(None, {name: arg.numpy() for name, arg in zip(inputs, args)})
        with torch.no_grad():
            want = EncoderGraph(model)(*args) if kind == "encoder" else StepGraph(model)(*args)
        for g, w in zip(got, want):
            worst = max(worst, float(np.abs(g.astype(np.float64) - w.numpy().astype(np.float64)).max()))
    if worst > tolerance:
        raise RuntimeError(f"exported graphs differ from torch by {worst:.2e} (> {tolerance})")
    return worst


def gemm_to_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite Gemm(x, W, b) with constant W as MatMul + Add, so dynamic quantization (which handles MatMul,
    not Gemm) reaches the linear layers."""
    weights = {init.name: init for init in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in weights or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(weights[node.input[1]])
        if attrs.get("transB", 0):
            weight = weight.T
        name = f"{node.name or node.output[0]}_matmul_weight"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), name))
        product = node.output[0] if len(node.input) < 3 else f"{node.output[0]}_product"
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product], name=f"{node.name}_matmul"))
        if len(node.input) >= 3:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_add"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def sort_nodes(graph: onnx.GraphProto) -> None:
    """Reorder a graph's nodes so that each follows the producers of what it reads, counting the outer names that
    its subgraphs read (a Loop's body reads the encoder's values; onnxruntime's quantizer orders without them)."""
    producer = {name: node for node in graph.node for name in node.output}

    def reads(node: onnx.NodeProto) -> set[str]:
        names = set(node.input)
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                names.update(name for inner in attribute.g.node for name in reads(inner))
        return names

    ordered, placed = [], set()

    def place(node: onnx.NodeProto) -> None:
        stack = [(node, False)]
        while stack:
            current, ready = stack.pop()
            if id(current) in placed:
                continue
            if ready:
                placed.add(id(current))
                ordered.append(current)
                continue
            stack.append((current, True))
            stack.extend((producer[name], False) for name in reads(current)
                         if name in producer and id(producer[name]) not in placed)

    for node in graph.node:
        place(node)
    nodes = [onnx.NodeProto() for _ in ordered]
    for copy, node in zip(nodes, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(nodes)


def quantize_graphs(out: Path) -> None:
    """Dynamically quantized (int8 weights, per-tensor) copies of both fp32 graphs for CPU inference."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic warns on the root logger about optional pre-processing
    try:
        for kind in ("encoder", "decoder_step"):
            prepared = gemm_to_matmul(onnx.load(str(out / graph_file(kind))))
            path = out / graph_file(kind, "int8")
            quantize_dynamic(prepared, str(path), weight_type=QuantType.QInt8)
            quantized = onnx.load(str(path))
            sort_nodes(quantized.graph)
            onnx.save(quantized, str(path))
            onnx.checker.check_model(str(path))
    finally:
        root.setLevel(level)


def model_json(model: Seq2Seq, vocab: Vocab, config: Config, checkpoint: str, fp16: bool, int8: bool) -> dict[str, Any]:
    """What a backend needs to run the graphs and decode with the model's own defaults."""
    cfg = model.config
    return {
        "format": FORMAT, "opset": OPSET, "checkpoint": checkpoint,
        "src_vocab_size": vocab.src_size, "tgt_vocab_size": vocab.tgt_size, "joint_vocab": vocab.joint,
        "reserved_ids": {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID},
        "rnn_type": cfg.rnn_type, "embed_dim": cfg.embed_dim, "encoder_hidden": cfg.encoder_hidden,
        "encoder_layers": cfg.encoder_layers, "decoder_layers": cfg.decoder_layers,
        "decoder_hidden": cfg.decoder_hidden, "attention_dim": cfg.attention_dim,
        "memory_size": model.encoder.output_size, "att_vec_size": model.decoder.att_size,
        **io_names(model.lstm),
        "files": {precision: {kind: graph_file(kind, precision) for kind in ("encoder", "decoder_step")}
                  for precision, on in (("fp32", True), ("fp16", fp16), ("int8", int8)) if on},
        "fp16": fp16, "int8": int8,
        "decode": dataclasses.asdict(config.decode),
    }


def run_export(model: str, out: str, tensorrt: bool = False, fp16: bool = False, int8: bool = False) -> dict:
    """`nmt export`: write DIR/encoder.onnx, DIR/decoder_step.onnx (+ .fp16 / .int8 copies), the SentencePiece
    model(s) and DIR/model.json; with `tensorrt`, engine plans too. Returns model.json's content."""
    if tensorrt:
        from serving.tensorrt_backend import require_tensorrt

        require_tensorrt()  # before any work: one line saying what to install
    net, vocab, config = load_model(model, "cpu")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    export_graphs(net, folder, "fp32")
    verify_graphs(net, folder)
    if fp16:
        export_graphs(net, folder, "fp16")
    if int8:
        quantize_graphs(folder)
    vocab.save(folder)
    info = model_json(net, vocab, config, str(model), fp16, int8)
    (folder / "model.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    if tensorrt:
        from serving.tensorrt_backend import build_engines

        info["tensorrt_plans"] = [str(p.name) for p in build_engines(folder, info)]
        (folder / "model.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info
