"""The `nmt` command line: translate/score/evaluate contracts, line alignment, and one-line errors."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nmt.cli import main


def nmt(*args: str, stdin: bytes | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nmt.cli", *args], input=stdin, capture_output=True, cwd=cwd,
                          timeout=300)


def test_scores_printed_by_translate_equal_nmt_score(toy_run, toy_corpus, tmp_path):
    for beam in ("1", "5"):
        out = nmt("translate", "--model", str(toy_run), "--input", str(toy_corpus / "test.src"), "--scores",
                  "--beam-size", beam, "--nbest", "1")
        assert out.returncode == 0, out.stderr
        lines = out.stdout.decode().splitlines()
        assert len(lines) == 100
        printed = [float(line.split("\t")[0]) for line in lines]
        hyp = tmp_path / f"hyp{beam}.txt"
        hyp.write_text("\n".join(line.split("\t", 1)[1] for line in lines) + "\n")
        scored = nmt("score", "--model", str(toy_run), "--src", str(toy_corpus / "test.src"), "--tgt", str(hyp))
        assert scored.returncode == 0, scored.stderr
        assert [float(x) for x in scored.stdout.decode().split()] == pytest.approx(printed, abs=1e-3)


def test_one_output_line_per_input_line_whatever_the_input(toy_run):
    long_line = " ".join(["a", "b", "c", "d"] * 500)  # 2,000 words
    lines = ["a b c", "", "   ", "\t", long_line, "k l", "é ü ∑ 中文", "x" * 50, ""]
    data = ("\n".join(lines) + "\n").encode() + b"b c \xff\xfe d\n"  # and a line that is not UTF-8
    out = nmt("translate", "--model", str(toy_run), "--beam-size", "3", stdin=data)
    assert out.returncode == 0, out.stderr
    result = out.stdout.decode().split("\n")
    assert result[-1] == "" and len(result) - 1 == len(lines) + 1
    assert result[0] == "c b a"
    assert result[1] == result[2] == result[3] == result[8] == ""
    assert b"1 input line(s) longer than 250 pieces were translated in parts" in out.stderr  # the 2,000 words


def test_translate_from_a_pipe_answers_each_line_as_it_arrives(toy_run):
    proc = subprocess.Popen([sys.executable, "-m", "nmt.cli", "translate", "--model", str(toy_run), "--beam-size", "2"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def answer(line: bytes) -> bytes:
        proc.stdin.write(line)
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready, "no translation while the input stays open"
        return proc.stdout.readline()

    try:
        assert answer(b"a b c\n") == b"c b a\n"  # the pipe is still open: translated on arrival
        assert answer(b"d e f g\n") == b"g f e d\n"
        proc.stdin.write(b"h i\n\nj k")  # a last line without a newline
        proc.stdin.close()
        assert proc.stdout.read() == b"i h\n\nk j\n" and proc.wait(timeout=60) == 0
    finally:
        proc.kill()


def test_nbest_prints_n_lines_per_input_in_order(toy_run):
    out = nmt("translate", "--model", str(toy_run), "--beam-size", "4", "--nbest", "3", "--scores",
              stdin=b"a b c\n\nd e f g\n")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.decode().splitlines()
    assert len(lines) == 9
    assert lines[0].split("\t")[1] == "c b a" and lines[6].split("\t")[1] == "g f e d"
    assert lines[3:6] == ["0.0000\t"] * 3
    first = [float(x.split("\t")[0]) for x in lines[:3]]
    assert first[0] >= first[1] and first[0] >= first[2]


def test_translate_reads_and_writes_files(toy_run, toy_corpus, tmp_path):
    out_file = tmp_path / "sub" / "out.txt"
    assert main(["translate", "--model", str(toy_run / "checkpoints/best.pt"), "--input",
                 str(toy_corpus / "dev.src"), "--output", str(out_file), "--beam-size", "2"]) == 0
    assert len(out_file.read_text().splitlines()) == 100


def test_evaluate_reports_bleu_chrf_with_signatures_and_multiple_references(tmp_path, capsys):
    hyp, ref1, ref2 = tmp_path / "h", tmp_path / "r1", tmp_path / "r2"
    hyp.write_text("the cat sat on the mat\nhello world\n")
    ref1.write_text("the cat sat on the mat\nhello there world\n")
    ref2.write_text("a cat sat on a mat\nhello world\n")
    assert main(["evaluate", "--hyp", str(hyp), "--ref", str(ref1), "--ref", str(ref2), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bleu"] == 100.0 and report["sentences"] == 2
    assert "nrefs:2" in report["bleu_signature"] and "nrefs:2" in report["chrf_signature"]
    assert main(["evaluate", "--hyp", str(hyp), "--ref", str(ref1)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("BLEU = ") and "chrF = " in text and "version:" in text


@pytest.mark.parametrize("args, message", [
    (["train", "missing.yaml"], "config file not found"),
    (["translate", "--model", "missing_run"], "checkpoint not found"),
    (["translate"], "required"),
    (["translate", "--model", "x", "--beam-size", "0"], "must be at least 1"),
    (["evaluate", "--hyp", "nope", "--ref", "nope"], "file not found"),
    (["bogus"], "invalid choice"),
])
def test_usage_and_input_errors_are_one_line_with_status_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_bad_configs_give_one_line_errors_naming_the_key(toy_corpus, tmp_path, capsys):
    good = (f"data:\n  train: {{src: {toy_corpus}/train.src, tgt: {toy_corpus}/train.tgt}}\n"
            f"  dev: {{src: {toy_corpus}/dev.src, tgt: {toy_corpus}/dev.tgt}}\n")
    cases = {
        good + "model: {embed_size: 3}\n": "model.embed_size: unknown key (valid: embed_dim",
        good + "model: {embed_dim: big}\n": "model.embed_dim: must be int",
        good + "train: {amp: maybe}\n": "train.amp: must be",
        good + "decode: {beam_size: 0}\n": "decode.beam_size: invalid value 0",
        good + "model: {rnn_type: transformer}\n": "model.rnn_type: must be 'gru' or 'lstm'",
        good + "train: {lr_schedule: cosine, warmup_steps: 10}\n": "train.max_steps: the cosine schedule ends",
        "data:\n  train: {src: nowhere.es, tgt: nowhere.en}\n": "data.train.src: file not found",
        "data: [1, 2\n": "not valid YAML",
        "- just\n- a list\n": "top level must be a mapping",
        good + "vocab: 12\n": "vocab: must be a mapping",
    }
    for text, message in cases.items():
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        assert main(["train", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (text, err)
    path.write_text(good)
    assert main(["train", str(path), "--set", "train.max_steps"]) == 2
    assert "expected section.key=value" in capsys.readouterr().err


def test_corrupt_and_hostile_checkpoints_are_refused_with_one_line(tmp_path, toy_run, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    hostile = tmp_path / "hostile.pt"
    torch.save({"format": "nmt-checkpoint-v1", "config": {}, "vocab": {}, "model": Evil()}, hostile)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((toy_run / "checkpoints/best.pt").read_bytes()[:5000])
    wrong = tmp_path / "wrong.pt"
    torch.save({"format": "nmt-checkpoint-v1", "config": {"model": {"embed_dim": 5}},
                "vocab": torch.load(toy_run / "checkpoints/best.pt", weights_only=True)["vocab"],
                "model": {"x": torch.zeros(1)}}, wrong)
    for path, message in ((hostile, "refused to load"), (garbage, "not a readable checkpoint"),
                          (truncated, "not a readable checkpoint"), (wrong, "weights do not fit")):
        assert main(["translate", "--model", str(path)]) == 2
        captured = capsys.readouterr()
        assert "pwned" not in captured.out
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`nmt` in two gloo processes on the CPU under torch.distributed.run (--standalone: a free port each time)."""
    env = {**os.environ, "NMT_DDP_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "nmt.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_translate_under_torchrun_gives_one_process_s_output_line_for_line(toy_run, toy_corpus, tmp_path):
    source = tmp_path / "in.txt"
    lines = (toy_corpus / "test.src").read_text().splitlines()[:41] + ["", "a b"]  # an odd count, an empty line
    source.write_text("\n".join(lines) + "\n")
    single = nmt("translate", "--model", str(toy_run), "--input", str(source), "--beam-size", "3", "--scores")
    assert single.returncode == 0, single.stderr
    ranked = torchrun("translate", "--model", str(toy_run), "--input", str(source), "--output", "out.txt",
                      "--beam-size", "3", "--scores", cwd=tmp_path)
    assert ranked.returncode == 0, ranked.stderr[-2000:]
    assert (tmp_path / "out.txt").read_text() == single.stdout.decode()
    to_stdout = torchrun("translate", "--model", str(toy_run), "--input", str(source), "--beam-size", "3",
                         "--scores", cwd=tmp_path)
    assert to_stdout.stdout == single.stdout.decode()  # rank 0 alone prints, in input order


@pytest.mark.parametrize("with_bias", [True, False])
def test_packed_products_give_the_plain_product(with_bias):
    from nmt.inference import packed_linear

    torch.manual_seed(0)
    weight, bias = torch.randn(300, 64).bfloat16(), torch.randn(300).bfloat16() if with_bias else None
    product = packed_linear(weight, bias)
    if product is None:
        pytest.skip("this torch has no oneDNN bf16 linear")
    for rows in (1, 7, 40):
        x = torch.randn(rows, 64)
        plain = torch.nn.functional.linear(x.bfloat16(), weight, bias).float()
        assert torch.allclose(product(x).float(), plain, rtol=2e-2, atol=0.1)


def test_fp32_decoding_on_cpu_packs_the_products_and_translates_as_the_plain_model(toy_run, toy_corpus):
    from nmt.checkpoint import load_model
    from nmt.translate import Translator
    from nmt.inference import packed_linear
    from serving.backends import open_translator

    if packed_linear(torch.zeros(4, 4), None) is None:
        pytest.skip("this torch has no oneDNN linear")
    lines = (toy_corpus / "test.src").read_text().splitlines()[:40]
    packed = open_translator(str(toy_run))
    assert getattr(packed.decoder.decoder.logits, "__name__", "") == "packed_product"
    model, vocab, config = load_model(toy_run)
    for beam in (1, 4):
        ours = packed.translate(lines, beam_size=beam)
        plain = Translator(model, vocab, config.decode).translate(lines, beam_size=beam)
        assert [t[0].text for t in ours] == [t[0].text for t in plain]
        assert [t[0].score for t in ours] == pytest.approx([t[0].score for t in plain], abs=1e-3)


@pytest.mark.parametrize("layer_norm", [None, "gru", "lstm"])
def test_bf16_step_packs_every_product_of_the_decoder_step(toy_run, layer_norm):
    from nmt.checkpoint import load_model
    from nmt.inference import BFloat16Step, packed_linear
    from tests.conftest import tiny_random_model

    if packed_linear(torch.zeros(4, 4).bfloat16(), None) is None:
        pytest.skip("this torch has no oneDNN bf16 linear")
    model = load_model(toy_run)[0] if layer_norm is None else tiny_random_model(layer_norm=True, rnn_type=layer_norm)
    decoder = BFloat16Step(model, "cpu").model.decoder
    packed = [decoder.logits, decoder.attention.query_layer.forward, decoder.att_layer.forward]
    packed += [f for cell in decoder.cells for f in (cell.project, cell.recurrent)]
    assert all(getattr(f, "__name__", "") == "packed_product" for f in packed)


def test_bf16_precision_keeps_float32_states_and_translates_as_float32_does(toy_run, toy_corpus):
    from serving.backends import open_translator

    lines = (toy_corpus / "test.src").read_text().splitlines()[:40]
    plain = open_translator(str(toy_run)).translate(lines, beam_size=3)
    bf16 = open_translator(str(toy_run), precision="bf16")
    state = bf16.decoder.encode(torch.tensor([[5, 6, 3]]), torch.tensor([3]))
    _, state = bf16.decoder.step(torch.tensor([2]), state)
    assert state.rows["hidden"].dtype == torch.float32
    same = sum(a[0].text == b[0].text for a, b in zip(plain, bf16.translate(lines, beam_size=3)))
    assert same >= 36  # bf16 products round differently, rarely enough to change a translation
    with pytest.raises(Exception, match="torch backend runs fp32 or bf16"):
        open_translator(str(toy_run), precision="int8")
