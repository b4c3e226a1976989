"""The fused kernels (nmt.kernels): the same attention energies and gradients, and the same greedy choice of token,
as the eager code within float32 rounding; the same training step and translations; the eager fallback where they
cannot be built."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import toy_config
from nmt import kernels
from nmt.checkpoint import load_model
from nmt.inference import decoding_step
from nmt.search import NEVER_GENERATED
from nmt.train import Trainer
from nmt.translate import Translator
from nmt.vocab import BOS_ID, EOS_ID, PAD_ID

needs_kernels = pytest.mark.skipif(kernels.library() is None, reason=f"kernels not built: {kernels.status()}")


def run_eagerly(monkeypatch) -> None:
    """Every caller on its eager path from here on (as where no compiler is found)."""
    monkeypatch.setattr(kernels, "usable", lambda *tensors: False)


@needs_kernels
def test_fused_energies_equal_the_eager_ones_and_mask_the_padding():
    torch.manual_seed(0)
    batch, hypotheses, steps, size = 4, 3, 9, 40
    query, keys, v = torch.randn(batch * hypotheses, size), torch.randn(batch, steps, size), torch.randn(size)
    lengths = torch.tensor([9, 4, 1, 7])
    fused = kernels.attention_energies(query, keys, v, lengths)
    eager = (torch.tanh(query.view(batch, hypotheses, 1, size) + keys.unsqueeze(1)) @ v).view(-1, steps)
    live = torch.arange(steps) < lengths.repeat_interleave(hypotheses).unsqueeze(1)
    assert torch.allclose(fused[live], eager[live], rtol=1e-5, atol=1e-5 * eager.abs().max().item())
    assert (fused[~live] == torch.finfo(torch.float32).min).all()


@needs_kernels
def test_fused_energies_backward_equals_autograd():
    torch.manual_seed(1)
    rows, steps, size = 5, 6, 24
    query, keys = torch.randn(rows, size, requires_grad=True), torch.randn(rows + 2, steps, size, requires_grad=True)
    v, lengths, grad_energy = torch.randn(size, requires_grad=True), torch.tensor([6, 6, 3, 2, 1]), torch.randn(rows, steps)
    live = torch.arange(steps) < lengths.unsqueeze(1)
    energy = (torch.tanh(query.unsqueeze(1) + keys[:rows]) @ v).masked_fill(~live, 0)
    energy.backward(grad_energy * live)
    grad_v, keys_minus = torch.zeros(size), torch.zeros(rows + 2, steps, size)
    query_minus = kernels.attention_energies_backward(query.detach(), keys.detach(), lengths, grad_energy * live,
                                                      grad_v, keys_minus)
    d = (grad_energy * live).unsqueeze(2)  # d(q + k) = d·(1 - u²)·v: the kernel's parts recombined
    close = lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    assert close(grad_v, v.grad)
    assert close((d.sum(1) - query_minus) * v.detach(), query.grad)
    assert close((d - keys_minus[:rows]) * v.detach(), keys.grad[:rows]) and (keys_minus[rows:] == 0).all()


@needs_kernels
def test_greedy_choice_equals_the_masked_log_softmax_maximum():
    torch.manual_seed(2)
    rows, vocab = 12, 1000  # the vocabulary not a multiple of the kernel's blocks of 64
    scores = torch.randn(rows, vocab) * 4
    early, only_eos = torch.zeros(rows, dtype=torch.bool), torch.zeros(rows, dtype=torch.bool)
    early[[1, 7]], only_eos[[3, 8]] = True, True
    scores[1, EOS_ID] = scores[0, PAD_ID] = scores[4, BOS_ID] = 50.0  # maxima that are not allowed there
    scores[5, [700, 300, 999]] = 30.0  # equal maxima: the first one
    scores[6, -1] = 30.0  # the maximum in the last, short block
    values, tokens = kernels.greedy_choice(scores, early, only_eos, NEVER_GENERATED, EOS_ID)
    log_probs = torch.log_softmax(scores, dim=-1)
    allowed = torch.ones(rows, vocab, dtype=torch.bool)
    allowed[:, list(NEVER_GENERATED)] = False
    allowed[early, EOS_ID] = False
    allowed[only_eos] = False
    allowed[only_eos, EOS_ID] = True
    expected = log_probs.masked_fill(~allowed, -math.inf).argmax(dim=-1)  # torch's argmax: the first maximum
    assert tokens.tolist() == expected.tolist()
    assert tokens[[3, 5, 6, 8]].tolist() == [EOS_ID, 300, vocab - 1, EOS_ID] and tokens[1] != EOS_ID
    assert torch.allclose(values, log_probs.gather(1, expected.unsqueeze(1)).squeeze(1), atol=1e-5)


def _step_gradients(corpus: Path, out: Path, model: dict) -> tuple[float, dict[str, torch.Tensor]]:
    trainer = Trainer(toy_config(corpus, out, model={"dropout": 0.0, **model}, train={"label_smoothing": 0.1}),
                      quiet=True)
    batch = trainer.train_data.batch(list(range(16)))  # several source and target lengths: padding on both sides
    mean_nll, _ = trainer.step(batch)
    return mean_nll, {name: p.grad.clone() for name, p in trainer.model.named_parameters()}


@needs_kernels
@pytest.mark.parametrize("model", [{}, {"layer_norm": True, "decoder_layers": 2}])
def test_the_fused_training_step_equals_the_eager_one_in_float32(toy_corpus, tmp_path, monkeypatch, model):
    fused_nll, fused = _step_gradients(toy_corpus, tmp_path / "fused", model)
    run_eagerly(monkeypatch)
    eager_nll, eager = _step_gradients(toy_corpus, tmp_path / "eager", model)
    assert fused_nll == pytest.approx(eager_nll, rel=1e-6)
    for name, grad in eager.items():
        assert (fused[name] - grad).abs().max() <= 1e-4 * grad.abs().max().clamp(min=1e-30), name


@needs_kernels
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_decoding_translates_as_the_eager_one(toy_run, toy_corpus, monkeypatch, precision):
    model, vocab, config = load_model(toy_run)
    step = decoding_step(model, "cpu", precision)  # bf16: queries in bf16, keys and energies in float32
    sources = (toy_corpus / "test.src").read_text().splitlines()[:60]
    translate = lambda: [Translator(step, vocab, config.decode).translate(sources, beam_size=beam)
                         for beam in (1, 5)]
    calls, energies, choice = [], kernels.attention_energies, kernels.greedy_choice
    monkeypatch.setattr(kernels, "attention_energies", lambda *args: calls.append("energies") or energies(*args))
    monkeypatch.setattr(kernels, "greedy_choice", lambda *args: calls.append("choice") or choice(*args))
    fused = translate()
    assert {"energies", "choice"} <= set(calls)  # the search's steps ran the kernels
    run_eagerly(monkeypatch)
    for fused_lines, eager_lines in zip(fused, translate()):
        assert [n[0].tokens for n in fused_lines] == [n[0].tokens for n in eager_lines]
        assert [n[0].score for n in fused_lines] == pytest.approx([n[0].score for n in eager_lines], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("environment, reason", [({"NMT_KERNELS": "0"}, "off (NMT_KERNELS=0)"),
                                                 ({"CC": "no-such-compiler"}, "no C compiler")])
def test_without_the_kernels_training_and_decoding_run_eagerly(toy_corpus, tmp_path, monkeypatch, environment,
                                                               reason):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    kernels.library.cache_clear()
    try:
        assert kernels.library() is None and reason in kernels.status()
        trainer = Trainer(toy_config(toy_corpus, tmp_path / "run", train={"max_steps": 3, "valid_every": 3}),
                          quiet=True)
        trainer.train()
        lines = Translator(trainer.model.eval(), trainer.vocab, trainer.config.decode).translate(["a b c", ""])
        assert len(lines) == 2
    finally:
        monkeypatch.undo()
        kernels.library.cache_clear()
