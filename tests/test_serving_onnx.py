"""Tests for serving/backends.py + serving/onnx_backend.py: ONNX Runtime decodes exactly like the torch backend."""

from __future__ import annotations

import pytest
import sacrebleu
import torch

from nmt.cli import main
from nmt.errors import NMTError
from nmt.search import State
from serving.backends import choose_precision, open_backend, open_translator
from serving.onnx_backend import OnnxRuntimeStep, providers_for
from tests.test_export import export_once

LINES = 40  # test sentences compared (kept small: two cores shared)


@pytest.fixture(scope="session")
def exported(toy_run, tmp_path_factory):
    return export_once(toy_run, tmp_path_factory)


@pytest.fixture(scope="module")
def test_lines(toy_corpus) -> list[str]:
    return (toy_corpus / "test.src").read_text().splitlines()[:LINES]


@pytest.fixture(scope="module")
def torch_translator(toy_run):
    return open_translator(str(toy_run), "torch", "cpu")


@pytest.mark.parametrize("beam", [1, 5])
def test_onnxruntime_translations_and_scores_equal_torch(exported, torch_translator, test_lines, beam):
    onnx_translator = open_translator(str(exported), "onnxruntime", "cpu")
    want = [n[0] for n in torch_translator.translate(test_lines, beam_size=beam)]
    got = [n[0] for n in onnx_translator.translate(test_lines, beam_size=beam)]
    assert [g.text for g in got] == [w.text for w in want]
    assert max(abs(g.score - w.score) for g, w in zip(got, want)) < 1e-3


def test_step_state_keeps_rows_and_sentences_apart(exported):
    decoder, vocab, decode = open_backend(str(exported), "onnxruntime", "cpu")
    src = torch.tensor([[5, 6, 7, 3], [8, 3, 0, 0]])
    state = decoder.encode(src, torch.tensor([4, 2]))
    assert set(state.rows) == {"hidden", "att_vec"} and set(state.sentences) == {"memory", "keys", "src_mask"}
    assert state.sentences["src_mask"].tolist() == [[True] * 4, [True, True, False, False]]
    beams = state.select(torch.tensor([0, 0, 0, 1, 1, 1]))  # N = 2 × 3
    log_probs, new = decoder.step(torch.full((6,), 2), beams)
    assert log_probs.shape == (6, vocab.tgt_size) and log_probs.dtype == torch.float32
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(6), atol=1e-4)
    assert isinstance(new, State) and new.rows["hidden"].shape[0] == 6 and decode.beam_size == 5


def test_int8_model_still_translates_the_toy_task(exported, toy_corpus, test_lines, monkeypatch):
    refs = (toy_corpus / "test.tgt").read_text().splitlines()[:LINES]
    fp32 = open_translator(str(exported), "onnxruntime", "cpu", beam_size=1)
    monkeypatch.setenv("NMT_PRECISION", "int8")
    int8 = open_translator(str(exported), "onnxruntime", "cpu", beam_size=1)
    assert "int8" in int8.decoder.sessions["encoder"]._model_path
    bleu = {name: sacrebleu.corpus_bleu([n[0].text for n in t.translate(test_lines)], [refs]).score
            for name, t in (("fp32", fp32), ("int8", int8))}
    assert bleu["fp32"] > 50 and bleu["int8"] >= bleu["fp32"] - 2


def test_cli_translate_with_onnxruntime_matches_torch_output(exported, toy_run, toy_corpus, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("a b c\n\nl k j i\n")
    for backend, model in (("torch", toy_run), ("onnxruntime", exported)):
        assert main(["translate", "--model", str(model), "--backend", backend, "--input", str(source),
                     "--output", str(tmp_path / f"{backend}.txt"), "--scores", "--beam-size", "3"]) == 0
    torch_out = (tmp_path / "torch.txt").read_text().splitlines()
    onnx_out = (tmp_path / "onnxruntime.txt").read_text().splitlines()
    assert len(onnx_out) == 3 and onnx_out[1] == "0.0000\t"
    assert [line.split("\t")[1] for line in onnx_out] == [line.split("\t")[1] for line in torch_out]


def test_user_errors_are_one_line(exported, tmp_path, capsys):
    with pytest.raises(NMTError, match="not an export folder"):
        open_backend(str(tmp_path), "onnxruntime", "cpu")
    with pytest.raises(NMTError, match="CUDA execution provider"):
        providers_for("cuda", ["CPUExecutionProvider"])
    with pytest.raises(NMTError, match="expected one of"):
        choose_precision("int4", "onnxruntime", {})
    info = {"files": {"fp32": {}}}
    with pytest.raises(NMTError, match="no int8 graphs"):
        OnnxRuntimeStep(exported, info, "int8")
    assert main(["translate", "--model", str(tmp_path), "--backend", "onnxruntime"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_fp16_precision_is_chosen_for_tensorrt_when_exported():
    assert choose_precision(None, "tensorrt", {"fp16": True}) == "fp16"
    assert choose_precision(None, "onnxruntime", {"fp16": True}) == "fp32"
    with pytest.raises(NMTError, match="int8"):
        choose_precision("int8", "tensorrt", {})


def test_tampered_model_json_and_foreign_graphs_are_refused_with_one_line(exported, tmp_path, capsys):
    import json
    import shutil

    import onnx
    from onnx import TensorProto, helper

    def copy_with(change=None, encoder: bytes | None = None):
        folder = tmp_path / f"export{len(list(tmp_path.iterdir()))}"
        shutil.copytree(exported, folder)
        info = json.loads((folder / "model.json").read_text())
        if change:
            change(info)
        (folder / "model.json").write_text(json.dumps(info))
        if encoder is not None:
            (folder / "encoder.onnx").write_bytes(encoder)
        return str(folder)

    cases = [
        (lambda info: info.update(decoder_hidden=info["decoder_hidden"] + 1), "output new_hidden has shape"),
        (lambda info: info.update(tgt_vocab_size=info["tgt_vocab_size"] + 5), "output log_probs has shape"),
        (lambda info: info.pop("memory_size"), "memory_size must be a positive integer"),
        (lambda info: info.update(attention_dim="64"), "attention_dim must be a positive integer"),
        (lambda info: info.update(step_outputs=["log_probs"]), "step_outputs must be"),
        (lambda info: info.update(files={"fp32": {"encoder": 1}}), "files must map"),
        (lambda info: info["files"]["fp32"].update(encoder="../../encoder.onnx"), "files must map"),
    ]
    for change, message in cases:
        with pytest.raises(NMTError, match=message):
            open_backend(copy_with(change), "onnxruntime", "cpu")
    identity = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "foreign",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]))
    with pytest.raises(NMTError, match=r"not the encoder graph of this export \(inputs \['x'\]"):
        open_backend(copy_with(encoder=identity.SerializeToString()), "onnxruntime", "cpu")
    junk = copy_with(encoder=b"\x00 not a graph \xff" * 10)
    with pytest.raises(NMTError, match="not an ONNX graph ONNX Runtime can load"):
        open_backend(junk, "onnxruntime", "cpu")
    assert main(["translate", "--model", junk, "--backend", "onnxruntime"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
