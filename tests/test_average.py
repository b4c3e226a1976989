"""Weight averaging: the exponential moving average during training, and `nmt average` of checkpoints."""

from __future__ import annotations

import torch

from conftest import toy_config
from nmt.average import ExponentialAverage, run_average
from nmt.checkpoint import load_checkpoint
from nmt.train import Trainer


def test_exponential_average_equals_the_hand_computed_average():
    model = torch.nn.Linear(3, 2)
    average = ExponentialAverage(model, decay=0.5)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    for t in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        average.update(model)
        rate = min(0.5, (1 + t) / (10 + t))
        for name, p in model.named_parameters():
            expected[name] = rate * expected[name] + (1 - rate) * p.detach()
    current = {n: p.detach().clone() for n, p in model.named_parameters()}
    with average.applied(model):
        assert all(torch.allclose(p, expected[n]) for n, p in model.named_parameters())
    assert all(torch.equal(p, current[n]) for n, p in model.named_parameters())  # its own weights again


def test_training_with_an_average_keeps_it_in_best_pt_and_resumes_it_exactly(toy_corpus, tmp_path):
    common = {"valid_every": 4, "batch_tokens": 400, "ema_decay": 0.9}
    Trainer(toy_config(toy_corpus, tmp_path / "full", train={**common, "max_steps": 8}), quiet=True).train()
    Trainer(toy_config(toy_corpus, tmp_path / "split", train={**common, "max_steps": 4}), quiet=True).train()
    Trainer(toy_config(toy_corpus, tmp_path / "split", train={**common, "max_steps": 8}), resume=True,
            quiet=True).train()
    full, split = (load_checkpoint(tmp_path / run / "checkpoints/last.pt") for run in ("full", "split"))
    averaged = full["ema"]["weights"]
    assert all(torch.equal(averaged[k], split["ema"]["weights"][k]) for k in averaged)
    assert full["ema"]["updates"] == 8
    best = load_checkpoint(tmp_path / "full/checkpoints/best.pt")["model"]
    step = load_checkpoint(tmp_path / "full/checkpoints/best.pt")["step"]
    if step == 8:  # best.pt holds the average, not the raw weights
        assert all(torch.equal(best[k], averaged[k]) for k in averaged)
        assert not all(torch.equal(best[k], full["model"][k]) for k in averaged)


def test_average_of_copies_of_one_checkpoint_is_that_checkpoint(toy_run, tmp_path):
    out = tmp_path / "avg.pt"
    run_average([str(toy_run), str(toy_run / "checkpoints" / "best.pt"), str(toy_run)], str(out))
    original, averaged = load_checkpoint(toy_run / "checkpoints/best.pt"), load_checkpoint(out)
    assert all(torch.allclose(original["model"][k], averaged["model"][k], atol=1e-7) for k in original["model"])
    assert averaged["vocab"] == original["vocab"] and averaged["config"] == original["config"]
