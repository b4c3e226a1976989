"""Greedy and beam search over the DecoderStep interface: equivalences, optimality, lengths, n-best, scores."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from conftest import tiny_random_model
from nmt.checkpoint import load_model
from nmt.data import pad
from nmt.search import State, beam_search, forced_scores, greedy_search, length_penalty, row_max, row_topk
from nmt.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID


def random_sources(count: int, vocab: int, seed: int, max_len: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(4, vocab, (int(torch.randint(1, max_len + 1, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(count)]
    return pad(seqs, suffix=EOS_ID)


@pytest.fixture(scope="module")
def toy_model(toy_run):
    model, vocab, _ = load_model(toy_run)
    return model, vocab


@pytest.fixture(scope="module")
def toy_sources(toy_model, toy_corpus):
    _, vocab = toy_model
    lines = (toy_corpus / "test.src").read_text().splitlines()[:40]
    return pad(vocab.encode_src(lines), suffix=EOS_ID)


def test_beam_of_one_equals_greedy_on_trained_and_random_models(toy_model, toy_sources):
    cases = [(toy_model[0], *toy_sources)] + [
        (tiny_random_model(vocab_size=9, seed=s), *random_sources(12, 9, seed=s)) for s in range(3)]
    for model, src, lengths in cases:
        greedy = greedy_search(model, src, lengths, max_len_ratio=2.0)
        for alpha in (0.0, 1.0):
            beam = beam_search(model, src, lengths, beam_size=1, alpha=alpha, max_len_ratio=2.0)
            for g, (b,) in zip(greedy, beam):
                assert b.tokens == g.tokens
                assert b.score == pytest.approx(g.score, abs=1e-5)


def test_wider_beam_never_scores_below_greedy_without_length_penalty(toy_model, toy_sources):
    cases = [(toy_model[0], *toy_sources)] + [
        (tiny_random_model(vocab_size=9, seed=s), *random_sources(12, 9, seed=s + 10)) for s in range(4)]
    for model, src, lengths in cases:
        greedy = greedy_search(model, src, lengths, max_len_ratio=2.0)
        for k in (2, 5, 10):
            beam = beam_search(model, src, lengths, beam_size=k, alpha=0.0, max_len_ratio=2.0)
            for g, (b,) in zip(greedy, beam):
                assert b.score >= g.score - 1e-5


def _exhaustive_best(model, src, lengths, max_tokens: int, vocab: int) -> tuple[list[int], float]:
    """Score every output (up to max_tokens tokens, then eos) by forced decoding; return the best."""
    symbols = [t for t in range(vocab) if t not in (PAD_ID, BOS_ID, EOS_ID)]
    candidates = [list(seq) for n in range(max_tokens + 1) for seq in itertools.product(symbols, repeat=n)]
    scores = forced_scores(model, src.expand(len(candidates), -1), lengths.expand(len(candidates)), candidates)
    best = int(scores.argmax())
    return candidates[best], float(scores[best])


@pytest.mark.parametrize("seed", range(4))
def test_beam_as_wide_as_the_search_space_finds_the_exhaustive_best(seed):
    vocab = 6  # pad, unk, bos, eos + 2 symbols: unk and the symbols can be generated
    model = tiny_random_model(vocab_size=vocab, seed=seed)
    src, lengths = random_sources(1, vocab, seed=seed, max_len=2)
    ratio = 3.0 / (int(lengths[0]) - 1)  # exactly 3 tokens at most before eos
    best_tokens, best_score = _exhaustive_best(model, src, lengths, 3, vocab)
    (hyp,) = beam_search(model, src, lengths, beam_size=200, alpha=0.0, max_len_ratio=ratio)[0]
    assert hyp.tokens == best_tokens
    assert hyp.score == pytest.approx(best_score, abs=1e-4)


def test_nbest_is_sorted_and_distinct(toy_model, toy_sources):
    model, _ = toy_model
    src, lengths = toy_sources
    for hyps in beam_search(model, src, lengths, beam_size=5, nbest=3, alpha=1.0):
        assert len(hyps) == 3
        norms = [h.normalized for h in hyps]
        assert norms == sorted(norms, reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == 3
        for h in hyps:
            assert h.normalized == pytest.approx(h.score / length_penalty(len(h.tokens) + 1, 1.0))


def test_scores_printed_by_search_equal_forced_decoding_scores(toy_model, toy_sources):
    model, _ = toy_model
    src, lengths = toy_sources
    for hyps in (beam_search(model, src, lengths, beam_size=5, nbest=2), [[h] for h in greedy_search(model, src, lengths)]):
        for rank in range(len(hyps[0])):
            targets = [h[rank].tokens for h in hyps]
            forced = forced_scores(model, src, lengths, targets)
            assert [h[rank].score for h in hyps] == pytest.approx(forced.tolist(), abs=1e-3)


def test_max_and_min_length_are_respected():
    model = tiny_random_model(vocab_size=9, seed=3)
    src, lengths = random_sources(8, 9, seed=5, max_len=4)
    limits = torch.ceil((lengths - 1).float() * 1.5).long()
    for hyp, limit in zip(greedy_search(model, src, lengths, max_len_ratio=1.5), limits.tolist()):
        assert len(hyp.tokens) <= limit
    for hyps in beam_search(model, src, lengths, beam_size=3, max_len_ratio=3.0, min_len=2):
        assert len(hyps[0].tokens) >= 2
    for hyp in greedy_search(model, src, lengths, max_len_ratio=3.0, min_len=2):
        assert len(hyp.tokens) >= 2


def test_search_never_emits_pad_or_bos_but_may_emit_unk():
    model = tiny_random_model(vocab_size=6, seed=1)
    with torch.no_grad():  # make pad, bos and unk the most likely outputs
        model.decoder.output.bias[[PAD_ID, BOS_ID, UNK_ID]] = 20.0
    src, lengths = random_sources(4, 6, seed=2)
    for hyps in beam_search(model, src, lengths, beam_size=3, max_len_ratio=2.0):
        assert PAD_ID not in hyps[0].tokens and BOS_ID not in hyps[0].tokens
        assert UNK_ID in hyps[0].tokens


def test_batched_search_equals_one_sentence_at_a_time(toy_model, toy_sources):
    model, _ = toy_model
    src, lengths = toy_sources
    batched = beam_search(model, src, lengths, beam_size=4)
    for i in range(0, src.size(0), 7):
        alone = beam_search(model, src[i: i + 1, : int(lengths[i])], lengths[i: i + 1], beam_size=4)
        assert alone[0][0].tokens == batched[i][0].tokens
        assert alone[0][0].score == pytest.approx(batched[i][0].score, abs=1e-4)


class CountingStep:
    """A DecoderStep that records the rows of every step and the sentences of every encode."""

    def __init__(self, model) -> None:
        self.model, self.step_rows, self.encoded = model, [], []

    def encode(self, src, src_lengths):
        self.encoded.append(src.size(0))
        return self.model.encode(src, src_lengths)

    def step(self, prev_tokens, state, normalize=True):
        self.step_rows.append(prev_tokens.size(0))
        return self.model.step(prev_tokens, state, normalize)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_greedy_keeps_its_batch_full_and_equals_one_sentence_at_a_time(toy_model, toy_sources, batch_size):
    model, _ = toy_model
    src, lengths = toy_sources
    order = torch.argsort(lengths, descending=True, stable=True)  # longest first, as the Translator gives them
    src, lengths = src[order], lengths[order]
    counting = CountingStep(model)
    flowing = greedy_search(counting, src, lengths, batch_size=batch_size)
    alone = [greedy_search(model, src[i: i + 1, : int(lengths[i])], lengths[i: i + 1])[0] for i in range(len(src))]
    assert [h.tokens for h in flowing] == [h.tokens for h in alone]
    assert [h.score for h in flowing] == pytest.approx([h.score for h in alone], abs=1e-4)
    # simulated: free places are taken at the next step, once an eighth of the batch is free
    queue, flying, expected_rows = [len(h.tokens) + 1 for h in alone], [], []  # steps per sentence: tokens, eos
    while queue or flying:
        free = batch_size - len(flying)
        if free >= max(1, batch_size // 8):
            flying, queue = flying + queue[:free], queue[free:]
        expected_rows.append(len(flying))
        flying = [left - 1 for left in flying if left > 1]
    assert counting.step_rows == expected_rows
    assert counting.encoded == [min(batch_size, len(src) - start) for start in range(0, len(src), batch_size)]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_beam_search_with_places_refilled_equals_one_sentence_at_a_time(toy_model, toy_sources, batch_size):
    model, _ = toy_model
    src, lengths = toy_sources
    order = torch.argsort(lengths, descending=True, stable=True)
    src, lengths = src[order], lengths[order]
    counting = CountingStep(model)
    flowing = beam_search(counting, src, lengths, beam_size=4, nbest=2, batch_size=batch_size)
    for i in range(len(src)):
        alone = beam_search(model, src[i: i + 1, : int(lengths[i])], lengths[i: i + 1], beam_size=4, nbest=2)[0]
        assert [h.tokens for h in flowing[i]] == [h.tokens for h in alone]
        assert [h.score for h in flowing[i]] == pytest.approx([h.score for h in alone], abs=1e-4)
    assert max(counting.step_rows) == 4 * min(batch_size, len(src))
    assert counting.encoded == [min(batch_size, len(src) - start) for start in range(0, len(src), batch_size)]
    unrefilled = CountingStep(model)
    for start in range(0, len(src), batch_size):
        rows = slice(start, start + batch_size)
        beam_search(unrefilled, src[rows], lengths[rows], beam_size=4, nbest=2)
    assert len(counting.step_rows) < len(unrefilled.step_rows) or batch_size == 1


def test_state_select_reorders_rows_and_sentences():
    rows = {"h": torch.arange(6).view(6, 1)}
    sentences = {"m": torch.arange(3).view(3, 1)}
    picked = State(rows, sentences).select(torch.tensor([5, 5, 0]), torch.tensor([2]))
    assert picked.rows["h"].view(-1).tolist() == [5, 5, 0]
    assert picked.sentences["m"].view(-1).tolist() == [2]
    assert State(rows, sentences).select(torch.tensor([1])).sentences["m"] is sentences["m"]


def test_length_penalty_is_gnmt():
    assert length_penalty(1, 0.0) == 1.0
    assert length_penalty(7, 1.0) == pytest.approx(2.0)
    assert length_penalty(7, 0.6) == pytest.approx(2.0 ** 0.6)
    assert math.isclose(length_penalty(torch.tensor(1.0), 2.0).item(), 1.0)


@pytest.mark.parametrize("vocab", [16000, 300, 5])
def test_row_max_equals_torch_max_with_ties_and_masked_entries(vocab):
    scores = torch.randn(7, vocab, generator=torch.Generator().manual_seed(vocab)).log_softmax(-1)
    scores[:, :2] = -math.inf
    scores[1, vocab - 1] = scores[1, 3] = scores[1].max() + 1  # a tie: the first index wins, as with torch.max
    scores[2] = -math.inf
    scores[2, vocab - 1] = 0.0  # the best entry is in the padded last block
    values, indices = row_max(scores)
    expected = scores.max(dim=-1)
    assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)
    assert indices[1] == 3 and indices[2] == vocab - 1
    assert row_max(scores[:0])[1].shape == (0,)


@pytest.mark.parametrize("vocab", [7892, 1283, 40])
@pytest.mark.parametrize("k", [1, 2, 10])
def test_row_topk_equals_torch_topk_with_masked_entries_and_a_short_last_block(vocab, k):
    scores = torch.randn(9, vocab, generator=torch.Generator().manual_seed(vocab + k)).log_softmax(-1)
    scores[:, :2] = -math.inf
    scores[2] = -math.inf
    scores[2, vocab - 1] = 0.0  # the best entry is in the short last block
    scores[3, 5:] = -math.inf  # fewer finite entries than k
    values, indices = row_topk(scores, k)
    assert torch.equal(values, scores.topk(min(k, vocab), dim=-1).values)
    assert torch.equal(scores.gather(1, indices), values) and bool((indices < vocab).all())
    for row, finite in zip(indices, values > -math.inf):
        assert len(set(row[finite].tolist())) == int(finite.sum())  # finite entries found once each


def test_an_over_long_line_is_translated_in_parts_and_no_word_is_lost(toy_run):
    from dataclasses import replace

    from nmt.checkpoint import load_model
    from nmt.translate import Translator

    model, vocab, config = load_model(toy_run)
    translator = Translator(model, vocab, replace(config.decode, max_input_len=8))  # 7 pieces and eos
    words = ("a b c d e f g " "h i j k l a b " "c d e").split()
    [[long]] = translator.translate([" ".join(words)], beam_size=3)
    groups = [[]]  # the words of each part: as many as fit in 7 pieces
    for word in words:
        if sum(len(vocab.encode_src([w])[0]) for w in groups[-1] + [word]) > 7:
            groups.append([])
        groups[-1].append(word)
    assert len(groups) >= 3
    # each part reversed by the toy model, the parts joined in order: no word lost
    assert long.text == " ".join(" ".join(reversed(group)) for group in groups) and translator.split == 1
    # whole sentences are packed into a part where they fit, a sentence is never cut when it fits alone
    parts = translator._parts("a b c. d e. f g h", 10)
    sentences = [vocab.encode_src([s])[0] for s in ("a b c.", "d e.", "f g h")]
    assert len(sentences[0]) + len(sentences[1]) <= 10 < len(sentences[0]) + len(sentences[1]) + len(sentences[2])
    assert parts == [sentences[0] + sentences[1], sentences[2]]
    assert translator.translate(["a b c"])[0][0].text == "c b a" and translator.split == 1
