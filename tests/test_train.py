"""Training: learning the toy task, determinism, exact resume, kill-and-resume, AMP, DDP, early stopping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import toy_config
from nmt.checkpoint import load_checkpoint, load_model
from nmt.errors import NMTError
from nmt.evaluate import bleu
from nmt.train import LRSchedule, Trainer, sequence_loss
from nmt.translate import Translator

REPO = Path(__file__).resolve().parents[1]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_toy_reversal_is_learned_to_high_bleu_on_held_out_data(toy_run, toy_corpus):
    model, vocab, config = load_model(toy_run)
    src = (toy_corpus / "test.src").read_text().splitlines()
    ref = (toy_corpus / "test.tgt").read_text().splitlines()
    translator = Translator(model, vocab, config.decode)
    for beam in (1, 5):
        hyps = [n[0].text for n in translator.translate(src, beam_size=beam)]
        assert bleu(hyps, ref) >= 90.0
    metrics = [json.loads(line) for line in (toy_run / "metrics.jsonl").read_text().splitlines()]
    assert any("valid_bleu" in m for m in metrics) and any("train_loss" in m for m in metrics)
    assert (toy_run / "checkpoints" / "best.pt").is_file() and (toy_run / "vocab" / "spm.model").is_file()
    assert yaml.safe_load((toy_run / "config.yaml").read_text())["model"]["embed_dim"] == 32
    assert list((toy_run / "tensorboard").glob("events.*"))


def test_same_seed_and_data_on_cpu_give_the_same_checkpoint(toy_corpus, tmp_path):
    train = {"max_steps": 12, "valid_every": 6}
    for name in ("a", "b"):
        Trainer(toy_config(toy_corpus, tmp_path / name, train=train, model={"dropout": 0.3}), quiet=True).train()
    a, b = _weights(tmp_path / "a/checkpoints/last.pt"), _weights(tmp_path / "b/checkpoints/last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    Trainer(toy_config(toy_corpus, tmp_path / "c", train={**train, "seed": 2}), quiet=True).train()
    c = _weights(tmp_path / "c/checkpoints/last.pt")
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resume_continues_exactly_as_an_uninterrupted_run(toy_corpus, tmp_path):
    """6 + 6 steps across a stop (mid-epoch, dropout on) equal 12 uninterrupted steps, weights and optimizer."""
    common = {"valid_every": 6, "batch_tokens": 400}
    model = {"dropout": 0.3}
    Trainer(toy_config(toy_corpus, tmp_path / "full", train={**common, "max_steps": 12}, model=model), quiet=True).train()
    Trainer(toy_config(toy_corpus, tmp_path / "split", train={**common, "max_steps": 6}, model=model), quiet=True).train()
    resumed = Trainer(toy_config(toy_corpus, tmp_path / "split", train={**common, "max_steps": 12}, model=model),
                      resume=True, quiet=True)
    assert resumed.progress.step == 6 and resumed.progress.batch_in_epoch == 6
    resumed.train()
    full, split = load_checkpoint(tmp_path / "full/checkpoints/last.pt"), load_checkpoint(tmp_path / "split/checkpoints/last.pt")
    assert all(torch.equal(full["model"][k], split["model"][k]) for k in full["model"])
    assert full["progress"] == split["progress"]


def test_killed_training_resumes_from_its_last_checkpoint_and_finishes(toy_corpus, tmp_path):
    config = tmp_path / "config.yaml"
    values = toy_config(toy_corpus, tmp_path / "run", train={"max_steps": 400, "valid_every": 10}).to_dict()
    config.write_text(yaml.safe_dump(values))
    proc = subprocess.Popen([sys.executable, "-m", "nmt.cli", "train", str(config)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "run/checkpoints/last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = load_checkpoint(last)["progress"]["step"]  # loadable: written atomically
    assert 10 <= killed_at < 400
    finish = subprocess.run([sys.executable, "-m", "nmt.cli", "train", str(config), "--resume",
                             "--set", "train.max_steps=" + str(killed_at + 20)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert finish.returncode == 0, finish.stderr
    assert load_checkpoint(last)["progress"]["step"] == killed_at + 20
    assert not list(last.parent.glob("*.tmp"))  # a write cut short by the kill is cleaned up by the next one
    load_model(tmp_path / "run")


def test_sigterm_saves_a_checkpoint_and_exits_with_one_line(toy_corpus, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(toy_config(toy_corpus, tmp_path / "run", train={"max_steps": 100000, "valid_every": 1000}).to_dict()))
    proc = subprocess.Popen([sys.executable, "-m", "nmt.cli", "train", str(config)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "run/metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)  # training has started once the first log line is written
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.strip().splitlines()[-1].startswith("error: interrupted at step")
    assert "Traceback" not in err
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["progress"]["step"] > 0


def test_existing_run_needs_resume_and_resume_needs_a_run(toy_corpus, tmp_path):
    config = toy_config(toy_corpus, tmp_path / "run", train={"max_steps": 2, "valid_every": 2})
    with pytest.raises(NMTError, match="nothing to resume"):
        Trainer(config, resume=True, quiet=True)
    Trainer(config, quiet=True).train()
    with pytest.raises(NMTError, match="--resume"):
        Trainer(config, quiet=True)


def test_early_stopping_after_patience_validations_without_better_bleu(toy_corpus, tmp_path):
    # lr so small that BLEU cannot move: training stops after `patience` validations past the first.
    config = toy_config(toy_corpus, tmp_path / "run", train={"lr": 1e-9, "min_lr": 1e-12, "max_steps": 1000,
                                                             "valid_every": 2, "patience": 3, "lr_patience": 100})
    summary = Trainer(config, quiet=True).train()
    assert summary["steps"] == 8


def test_lr_schedule_warms_up_then_decays_on_plateau():
    schedule = LRSchedule(1.0, warmup_steps=4, decay=0.5, patience=2)
    assert [schedule.lr(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    for metric in (10, 9, 9):
        schedule.observe(metric)
    assert schedule.lr(10) == 0.5
    restored = LRSchedule(1.0, 4, 0.5, 2)
    restored.load_state_dict(schedule.state_dict())
    assert restored.lr(10) == 0.5 and restored.best == 10


def test_label_smoothed_loss_ignores_padding():
    logits = torch.randn(2, 3, 5)
    target = torch.tensor([[4, 2, 0], [3, 0, 0]])
    loss, nll = sequence_loss(logits, target, 0.1)
    loss_more_pad, nll_more_pad = sequence_loss(torch.cat([logits, torch.randn(2, 2, 5)], 1),
                                                torch.cat([target, torch.zeros(2, 2, dtype=torch.long)], 1), 0.1)
    assert torch.allclose(loss, loss_more_pad) and torch.allclose(nll, nll_more_pad)
    assert loss > nll * 0  # smoothing adds a positive term
    plain = torch.nn.functional.cross_entropy(logits.view(-1, 5), target.view(-1), ignore_index=0, reduction="sum")
    assert torch.allclose(nll, plain)


@pytest.mark.parametrize("model", [{"rnn_type": "lstm"}, {"layer_norm": True}, {"tie_embeddings": True, "encoder_layers": 2, "decoder_layers": 2}])
def test_model_variants_train_and_lower_the_loss(toy_corpus, tmp_path, model):
    trainer = Trainer(toy_config(toy_corpus, tmp_path / "run", model=model, train={"max_steps": 30}), quiet=True)
    batch = trainer.train_data.batch(trainer.train_data.batcher.epoch(0)[0])
    first = trainer.step(batch)[0]
    for _ in range(30):
        last = trainer.step(batch)[0]
    assert last < first * 0.7


def test_bf16_autocast_training_steps_run_on_cpu(toy_corpus, tmp_path):
    trainer = Trainer(toy_config(toy_corpus, tmp_path / "run", train={"amp": "bf16"}), quiet=True)
    batch = trainer.train_data.batch(trainer.train_data.batcher.epoch(0)[0])
    losses = [trainer.step(batch)[0] for _ in range(15)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_cuda_device_without_cuda_is_a_one_line_error(toy_corpus, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(NMTError, match="no CUDA device"):
        Trainer(toy_config(toy_corpus, tmp_path / "run", train={"device": "cuda"}), quiet=True)


def test_ddp_under_torchrun_trains_two_processes_with_one_checkpoint(toy_corpus, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(toy_config(toy_corpus, tmp_path / "run", train={"max_steps": 6, "valid_every": 3}).to_dict()))
    env = {**os.environ, "NMT_DDP_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29517", "-m", "nmt.cli", "train", str(config)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "world size 2" in (tmp_path / "run/train.log").read_text()
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["progress"]["step"] == 6


def test_a_checkpoint_write_cut_short_leaves_the_old_file_and_is_cleaned_up_later(tmp_path):
    from nmt.checkpoint import save_checkpoint

    target = tmp_path / "last.pt"
    save_checkpoint(target, {"config": {}, "vocab": {}, "model": {"w": torch.ones(2)}})
    stale = tmp_path / ".last.pt.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")  # what a SIGKILL during a write leaves behind
    assert torch.equal(load_checkpoint(target)["model"]["w"], torch.ones(2))
    save_checkpoint(target, {"config": {}, "vocab": {}, "model": {"w": torch.zeros(2)}})
    assert not stale.exists() and torch.equal(load_checkpoint(target)["model"]["w"], torch.zeros(2))
