"""Tests for serving/export.py: the two ONNX graphs, model.json, the SentencePiece files, fp16 and int8 copies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from nmt.checkpoint import load_model
from nmt.config import ModelConfig
from nmt.errors import NMTError
from nmt.model import Seq2Seq
from serving.backends import open_translator
from serving.export import example_inputs, export_graphs, gemm_to_matmul, run_export, verify_graphs
from serving.graphs import OPSET, graph_file, io_names, output_shapes, read_model_json
from tests.conftest import tiny_random_model


def export_once(toy_run: Path, tmp_path_factory) -> Path:
    """The toy model exported with fp16 and int8 copies, once per session (shared by the serving tests)."""
    out = tmp_path_factory.getbasetemp() / "toy_export"
    if not (out / "model.json").is_file():
        run_export(str(toy_run), str(out), fp16=True, int8=True)
    return out


@pytest.fixture(scope="session")
def exported(toy_run, tmp_path_factory) -> Path:
    return export_once(toy_run, tmp_path_factory)


def test_export_writes_graphs_vocab_and_model_json(exported, toy_run):
    info = json.loads((exported / "model.json").read_text())
    for precision in ("fp32", "fp16", "int8"):
        for kind in ("encoder", "decoder_step"):
            assert (exported / graph_file(kind, precision)).is_file()
    assert (exported / "spm.model").is_file()
    assert info["opset"] == OPSET and info["fp16"] and info["int8"]
    assert info["reserved_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    _, vocab, config = load_model(toy_run)
    assert info["tgt_vocab_size"] == vocab.tgt_size and info["rnn_type"] == "gru"
    assert info["decode"]["beam_size"] == config.decode.beam_size == 5
    assert info["step_inputs"] == ["prev_tokens", "hidden", "att_vec", "memory", "keys", "src_mask"]
    assert read_model_json(exported) == info


def test_exported_graphs_pass_the_onnx_checker_at_the_chosen_opset(exported):
    for name in ("encoder.onnx", "decoder_step.onnx", "encoder.fp16.onnx", "decoder_step.fp16.onnx"):
        model = onnx.load(str(exported / name))
        onnx.checker.check_model(model, full_check=True)
        assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {OPSET}


def test_fp16_graphs_take_float16_states_and_give_float32_log_probs(exported):
    graph = onnx.load(str(exported / "decoder_step.fp16.onnx")).graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.output)}
    assert types["hidden"] == types["memory"] == types["new_hidden"] == onnx.TensorProto.FLOAT16
    assert types["log_probs"] == onnx.TensorProto.FLOAT


def test_int8_graphs_hold_quantized_matmuls(exported):
    ops = {node.op_type for node in onnx.load(str(exported / "decoder_step.int8.onnx")).graph.node}
    assert "MatMulInteger" in ops and "Gemm" not in ops


@pytest.mark.parametrize("model_kwargs", [{}, {"rnn_type": "lstm", "decoder_layers": 2, "encoder_layers": 2},
                                          {"tie_embeddings": True}, {"dropout": 0.3},
                                          {"tie_embeddings": True, "share_embeddings": True},
                                          {"layer_norm": True},
                                          {"layer_norm": True, "rnn_type": "lstm", "encoder_layers": 2}])
def test_graphs_match_torch_at_untraced_batch_length_and_beam(tmp_path, model_kwargs):
    model = tiny_random_model(vocab_size=13, **model_kwargs)
    export_graphs(model, tmp_path)
    assert not model.training  # exporting leaves dropout off
    assert verify_graphs(model, tmp_path) < 1e-4
    info = {"decoder_layers": model.config.decoder_layers, "decoder_hidden": model.config.decoder_hidden,
            "memory_size": model.encoder.output_size, "attention_dim": model.config.attention_dim,
            "att_vec_size": model.decoder.att_size, "tgt_vocab_size": 13, **io_names(model.lstm)}
    _, step_args = example_inputs(model, batch=4, steps=9, beam=2)
    session = ort.InferenceSession(str(tmp_path / "decoder_step.onnx"))
    outputs = session.run(None, {n: a.numpy() for n, a in zip(info["step_inputs"], step_args)})
    expected = output_shapes(info, "decoder_step", 4, 9, 8)
    assert [tuple(o.shape) for o in outputs] == list(expected.values())


def test_gemm_rewrite_keeps_results(tmp_path):
    model = tiny_random_model(vocab_size=11)
    export_graphs(model, tmp_path)
    rewritten = gemm_to_matmul(onnx.load(str(tmp_path / "decoder_step.onnx")))
    assert not any(node.op_type == "Gemm" for node in rewritten.graph.node)
    _, step_args = example_inputs(model, batch=2, steps=6, beam=3)
    feeds = {n: a.numpy() for n, a in zip(io_names(False)["step_inputs"], step_args)}
    before = ort.InferenceSession(str(tmp_path / "decoder_step.onnx")).run(None, feeds)
    after = ort.InferenceSession(rewritten.SerializeToString()).run(None, feeds)
    for b, a in zip(before, after):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_export_refuses_bad_paths(tmp_path):
    with pytest.raises(NMTError, match="checkpoint not found|no checkpoints"):
        run_export(str(tmp_path / "missing.pt"), str(tmp_path / "out"))
    with pytest.raises(NMTError, match="not an export folder"):
        read_model_json(tmp_path)


def test_a_layer_normalized_model_exports_and_translates_as_in_torch_with_one_encoder_loop_per_direction(
        tmp_path, toy_run, toy_corpus):
    payload = torch.load(toy_run / "checkpoints" / "best.pt", weights_only=True)
    payload["config"]["model"]["layer_norm"] = True
    sizes = [payload["model"][f"{side}.embed.weight"].shape[0] for side in ("encoder", "decoder")]
    payload["model"] = Seq2Seq(ModelConfig(**payload["config"]["model"]), *sizes).state_dict()
    torch.save(payload, tmp_path / "ln.pt")
    run_export(str(tmp_path / "ln.pt"), str(tmp_path / "out"), fp16=True, int8=True)  # verified against torch
    encoder = onnx.load(str(tmp_path / "out" / "encoder.onnx")).graph
    ops = [node.op_type for node in encoder.node]
    assert ops.count("Loop") == 2 and not any(op.startswith("Sequence") for op in ops)  # one per direction
    lines = (toy_corpus / "test.src").read_text().splitlines()[:8]
    want = [[t.text for t in n] for n in open_translator(str(tmp_path / "ln.pt")).translate(lines, beam_size=3)]
    got = open_translator(str(tmp_path / "out"), "onnxruntime").translate(lines, beam_size=3)
    assert [[t.text for t in n] for n in got] == want
    int8 = open_translator(str(tmp_path / "out"), "onnxruntime", precision="int8").translate(lines, beam_size=3)
    assert len(int8) == len(lines) and all(len(n) == 1 for n in int8)
