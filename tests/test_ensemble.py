"""Ensembles: one DecoderStep over several models, in the one search and in forced scoring."""

from __future__ import annotations

import pytest
import torch

from nmt.checkpoint import load_model
from nmt.cli import main
from nmt.ensemble import Ensemble, combine
from nmt.errors import NMTError
from nmt.search import beam_search, forced_scores, greedy_search
from serving.backends import open_translator


def test_an_ensemble_of_one_model_is_that_model(toy_run, toy_corpus):
    model, vocab, _ = load_model(toy_run)
    src_lines = (toy_corpus / "test.src").read_text().splitlines()[:12]
    from nmt.data import pad
    from nmt.vocab import EOS_ID

    src, lengths = pad(vocab.encode_src(src_lines), suffix=EOS_ID)
    for single, ensemble in ((beam_search(model, src, lengths, 4, 2), beam_search(Ensemble([model]), src, lengths, 4, 2)),
                             ([[h] for h in greedy_search(model, src, lengths)],
                              [[h] for h in greedy_search(Ensemble([model]), src, lengths)])):
        for a, b in zip(single, ensemble):
            assert [h.tokens for h in a] == [h.tokens for h in b]
            assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-5)
    targets = [h[0].tokens for h in beam_search(model, src, lengths, 4)]
    assert torch.allclose(forced_scores(model, src, lengths, targets),
                          forced_scores(Ensemble([model, model]), src, lengths, targets), atol=1e-5)


def test_an_ensemble_s_printed_scores_equal_nmt_score_with_the_same_members(toy_run, toy_corpus, tmp_path, capsys):
    second = tmp_path / "second.pt"
    payload = torch.load(toy_run / "checkpoints" / "best.pt", weights_only=True)
    torch.manual_seed(0)
    payload["model"] = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
                        for k, v in payload["model"].items()}
    torch.save(payload, second)
    source = tmp_path / "src.txt"
    source.write_text("\n".join((toy_corpus / "test.src").read_text().splitlines()[:10]) + "\n")
    models = ["--model", str(toy_run), "--model", str(second)]
    assert main(["translate", *models, "--input", str(source), "--scores", "--beam-size", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    hyp = tmp_path / "hyp.txt"
    hyp.write_text("\n".join(line.split("\t", 1)[1] for line in lines) + "\n")
    assert main(["score", *models, "--src", str(source), "--tgt", str(hyp)]) == 0
    scored = [float(x) for x in capsys.readouterr().out.split()]
    assert scored == pytest.approx([float(line.split("\t")[0]) for line in lines], abs=1e-3)
    single = open_translator(str(toy_run)).translate(source.read_text().splitlines(), beam_size=3)
    assert [n[0].score for n in single] != pytest.approx([float(line.split("\t")[0]) for line in lines], abs=1e-3)


def test_members_with_another_vocabulary_are_refused_in_one_line(toy_run):
    model, vocab, _ = load_model(toy_run)
    from nmt.vocab import Vocab

    other = Vocab(vocab.src_model, vocab.tgt_model, None)  # the same pieces, but every one of them predicted
    with pytest.raises(NMTError, match="another vocabulary"):
        combine([("a", model, vocab), ("b", model, other)])
