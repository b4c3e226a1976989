"""Tests for word alignments and attention plots (nmt.search.forced_attention, Translation.alignment, nmt.plots,
`nmt translate --alignments / --attention-plot`): the toy reversal model aligns word i with word n-1-i."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from nmt.translate import Translation, word_index
from serving.backends import open_translator
from tests.test_export import export_once

LINES = 40


@pytest.fixture(scope="module")
def test_pairs(toy_corpus) -> list[tuple[str, str]]:
    sources = (toy_corpus / "test.src").read_text().splitlines()[:LINES]
    return list(zip(sources, (toy_corpus / "test.tgt").read_text().splitlines()[:LINES]))


def test_pieces_are_grouped_into_the_whitespace_words():
    assert word_index(["\u2581Sal", "om", "ón", "\u2581,", "\u2581", "¿", "\u2581hijo"]) == [0, 0, 0, 1, 2, 2, 3]
    attention = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.1, 0.4], [0.0, 0.1, 0.9]])
    translation = Translation("one two", 0.0, [5, 6, 7], attention, ["\u2581a", "b", "\u2581c"],
                              ["\u2581one", "\u2581tw", "o"])
    # "two" = "tw" + "o": 0.7 of their mass on source word 0 and 1.3 on word 1 ("tw" alone leans to word 0)
    assert translation.alignment() == [(0, 0), (1, 1)]


def test_the_reversal_model_aligns_word_i_with_word_n_minus_1_minus_i(toy_run, test_pairs):
    translator = open_translator(str(toy_run), "torch", "cpu")
    results = translator.translate([s for s, _ in test_pairs], alignments=True, beam_size=5)
    links = reversal = 0
    for (source, reference), (best, *_) in zip(test_pairs, results):
        assert best.attention.shape == (len(best.tokens), len(best.source_pieces))
        assert (best.attention.sum(1) <= 1 + 1e-4).all()  # the rest is on the source's eos, left out
        if best.text != reference:
            continue
        n = len(source.split())
        alignment = best.alignment()
        assert sorted(target for _, target in alignment) == list(range(n))  # one link per target word
        links += len(alignment)
        reversal += sum(source_word == n - 1 - target for source_word, target in alignment)
    print(f"alignment links on the reversal: {reversal} of {links}")
    assert links >= 100 and reversal / links >= 0.8, (reversal, links)


def test_torch_and_onnxruntime_give_the_same_alignments(toy_run, tmp_path_factory, test_pairs):
    lines = [s for s, _ in test_pairs]
    torch_side = open_translator(str(toy_run), "torch", "cpu").translate(lines, alignments=True, beam_size=3, nbest=2)
    onnx = open_translator(str(export_once(toy_run, tmp_path_factory)), "onnxruntime", "cpu")
    onnx_side = onnx.translate(lines, alignments=True, beam_size=3, nbest=2)
    for want, got in zip(torch_side, onnx_side):
        assert [t.alignment() for t in got] == [t.alignment() for t in want]
        assert all(torch.allclose(g.attention, w.attention, atol=1e-4) for g, w in zip(got, want))


def test_translate_writes_pharaoh_alignments_and_one_png_per_line(toy_run, tmp_path, test_pairs):
    source = tmp_path / "in.txt"
    lines = [s for s, _ in test_pairs[:5]] + [""]
    source.write_text("\n".join(lines) + "\n")
    plots = tmp_path / "plots"
    done = subprocess.run([sys.executable, "-m", "nmt.cli", "translate", "--model", str(toy_run), "--input",
                           str(source), "--alignments", "--attention-plot", str(plots), "--scores"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert len(out) == len(lines)
    for line, (src, _) in zip(out, test_pairs):
        text, alignment = line.split("\t", 1)[1].split(" ||| ")
        n = len(src.split())
        pairs = [tuple(map(int, link.split("-"))) for link in alignment.split()]
        assert all(0 <= s < n and 0 <= t < len(text.split()) for s, t in pairs)
    assert out[-1].endswith(" ||| ")  # the empty line: no words, no links
    pngs = sorted(plots.glob("*.png"))
    assert [p.name for p in pngs] == [f"line-{i:06d}.png" for i in range(1, 6)]  # none for the empty line
    from matplotlib.image import imread

    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and imread(png).ndim == 3
