"""Training: learning the toy task, determinism, exact resume, kill-and-resume, AMP, DDP, early stopping."""

from __future__ import annotations

import dataclasses
import json
import math
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
from nmt.config import load_config
from nmt.atomic import write_atomic
from nmt.errors import NMTError
from nmt.evaluate import bleu
from nmt.train import LRSchedule, Trainer
from nmt.translate import Translator
from nmt.vocab import PAD_ID, UNK_ID

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


def full_disk(monkeypatch) -> None:
    """Every atomic write (nmt.atomic: checkpoints, vocabularies, shards, manifests) goes to /dev/full: the
    kernel's ENOSPC, as on a full disk."""
    import builtins

    import nmt.atomic

    def open_full(path, mode="r", *args, **kwargs):
        return builtins.open("/dev/full" if "w" in mode else path, mode, *args, **kwargs)

    monkeypatch.setattr(nmt.atomic, "open", open_full, raising=False)


def test_a_full_disk_keeps_the_previous_checkpoint_and_is_one_error_line(toy_corpus, tmp_path, monkeypatch):
    train = {"valid_every": 6, "batch_tokens": 400, "max_steps": 6}
    Trainer(toy_config(toy_corpus, tmp_path / "run", train=train), quiet=True).train()
    last = tmp_path / "run/checkpoints/last.pt"
    before = last.read_bytes()
    full_disk(monkeypatch)
    resumed = Trainer(toy_config(toy_corpus, tmp_path / "run", train={**train, "max_steps": 12}), resume=True,
                      quiet=True)
    with pytest.raises(NMTError, match=r"could not write .*last\.pt: No space left on device; the previous file"):
        resumed.train()
    assert last.read_bytes() == before and load_checkpoint(last)["progress"]["step"] == 6
    assert not list(last.parent.glob(".*tmp")) and not (tmp_path / "run/.lock").exists()
    shard = tmp_path / "shard-00000.txt"
    monkeypatch.undo()
    write_atomic(shard, b"old\n")
    full_disk(monkeypatch)
    with pytest.raises(NMTError, match="No space left on device"):
        write_atomic(shard, b"new\n" * 1000)
    assert shard.read_bytes() == b"old\n"


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
    assert not (tmp_path / "run/.lock").exists()  # released: a resume may start at once


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


def _plain_loss_and_gradients(model, batch, label_smoothing):
    """The step as written before any rewrite: the search's `step` one position at a time under autograd (token
    embedding and input projection per step, padding included), two cross-entropies over all [B·T, V] logits."""
    flat = model.logits(batch.src, batch.src_lengths, batch.tgt_in).reshape(-1, model.tgt_vocab_size)
    target = batch.tgt_out.reshape(-1)
    loss = torch.nn.functional.cross_entropy(flat, target, ignore_index=PAD_ID, label_smoothing=label_smoothing,
                                             reduction="sum")
    nll = torch.nn.functional.cross_entropy(flat, target, ignore_index=PAD_ID, reduction="sum")
    model.zero_grad()
    (loss / batch.n_tgt_tokens).backward()
    return loss.item(), nll.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("model", [{}, {"rnn_type": "lstm"}, {"layer_norm": True},
                                   {"layer_norm": True, "rnn_type": "lstm", "encoder_layers": 2, "decoder_layers": 2},
                                   {"tie_embeddings": True, "encoder_layers": 2, "decoder_layers": 2},
                                   {"attentional_tanh": True, "bridge": "tanh", "rnn_init": "xavier"},
                                   {"tie_embeddings": True, "share_embeddings": True}])
def test_the_training_step_gives_the_plain_step_s_loss_and_gradients(toy_corpus, tmp_path, model):
    trainer = Trainer(toy_config(toy_corpus, tmp_path / "run", model=model, train={"label_smoothing": 0.1}),
                      quiet=True)
    trainer.model.double()  # float64: the comparison is of the two computations, not of rounding
    batch = trainer.train_data.batch(list(range(16)))  # pairs in corpus order: of several lengths
    assert (batch.tgt_out == PAD_ID).any()  # padding is part of what is compared
    plain_loss, plain_nll, plain_grads = _plain_loss_and_gradients(trainer.model, batch, 0.1)
    with torch.no_grad():
        loss, nll = trainer.model(batch.src, batch.src_lengths, batch.tgt_in, batch.tgt_out, 0.1)
    assert loss.item() == pytest.approx(plain_loss, rel=1e-9) and nll.item() == pytest.approx(plain_nll, rel=1e-9)
    trainer.cfg = dataclasses.replace(trainer.cfg, clip_norm=0.0)
    mean_nll, tokens = trainer.step(batch)
    assert tokens == batch.n_tgt_tokens
    assert mean_nll == pytest.approx(plain_nll / tokens, rel=1e-9)
    for name, param in trainer.model.named_parameters():
        scale = plain_grads[name].abs().max().clamp(min=1e-300)
        assert (param.grad - plain_grads[name]).abs().max() <= 1e-9 * scale, name


def test_three_way_tying_keeps_one_embedding_matrix_for_source_target_and_output(toy_corpus, tmp_path):
    trainer = Trainer(toy_config(toy_corpus, tmp_path / "run", model={"tie_embeddings": True, "share_embeddings": True},
                                 train={"max_steps": 3, "valid_every": 3}), quiet=True)
    model = trainer.model
    shared = model.encoder.embed.weight
    assert model.decoder.embed.source.weight is shared and not hasattr(model.decoder, "output")
    assert torch.equal(model.decoder.output_layer()[0], shared[torch.tensor(trainer.vocab.output_ids)])
    names = [name for name, _ in model.named_parameters()]
    assert sum("embed" in name for name in names) == 1
    trainer.train()
    loaded, vocab, _ = load_model(tmp_path / "run")
    assert torch.equal(loaded.decoder.embed.weight, loaded.encoder.embed.weight[torch.tensor(vocab.output_ids)])


def test_inverse_square_root_schedule_warms_up_then_falls_and_ignores_plateaus():
    schedule = LRSchedule(1.0, warmup_steps=4, decay=0.5, patience=1, kind="inverse_sqrt")
    assert [schedule.lr(s) for s in (0, 1, 3, 15, 63)] == pytest.approx([0.25, 0.5, 1.0, 0.5, 0.25])
    for metric in (5, 4, 3):
        schedule.observe(metric)
    assert schedule.lr(15) == pytest.approx(0.5)


def test_cosine_schedule_warms_up_then_falls_along_a_half_cosine_to_its_floor_and_ignores_plateaus():
    schedule = LRSchedule(1.0, warmup_steps=4, decay=0.5, patience=1, kind="cosine", total_steps=12, final_lr=0.1)
    # warmup 0.25 ... 1 over steps 0-3; then 0.1 + 0.9 * (1 + cos(pi * (step + 1 - 4) / 8)) / 2
    assert [schedule.lr(s) for s in (0, 1, 3, 7, 11, 20)] == pytest.approx([0.25, 0.5, 1.0, 0.55, 0.1, 0.1])
    assert schedule.lr(5) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    for metric in (5, 4, 3):
        schedule.observe(metric)
    assert schedule.lr(7) == pytest.approx(0.55)


def test_the_trainer_runs_its_cosine_schedule_down_to_min_lr_at_max_steps(toy_corpus, tmp_path):
    train = {"lr_schedule": "cosine", "lr": 0.01, "min_lr": 0.001, "warmup_steps": 2, "max_steps": 10}
    trainer = Trainer(toy_config(toy_corpus, tmp_path / "run", train=train), quiet=True)
    assert [trainer.schedule.lr(s) for s in (1, 5, 9)] == pytest.approx([0.01, 0.0055, 0.001])


def test_the_decoder_predicts_only_the_training_targets_pieces_unless_told_otherwise(tmp_path):
    from conftest import write_reversal_corpus

    corpus = write_reversal_corpus(tmp_path / "corpus")
    for name in ("src", "tgt"):  # the source side has words the target side never has
        lines = (corpus / f"train.{name}").read_text().splitlines()
        extra = [" ".join(["xyzzy", "plugh"] * 3)] * 50 if name == "src" else lines[:50]
        (corpus / f"train.{name}").write_text("\n".join(lines + extra) + "\n")
    restricted = Trainer(toy_config(corpus, tmp_path / "target", vocab={"size": 24},
                                    train={"max_steps": 4, "valid_every": 4}), quiet=True)
    full = Trainer(toy_config(corpus, tmp_path / "full", vocab={"size": 24, "output": "full"}), quiet=True)
    assert full.vocab.output_ids is None and full.model.tgt_vocab_size == full.vocab.src_size
    assert restricted.model.tgt_vocab_size == restricted.vocab.tgt_size < full.model.tgt_vocab_size
    assert restricted.model.src_vocab_size == full.model.src_vocab_size
    pieces = {p for ids in restricted.vocab.encode_tgt((corpus / "train.tgt").read_text().splitlines()) for p in ids}
    assert UNK_ID not in pieces  # every training target piece is predictable
    restricted.train()
    model, vocab, _ = load_model(tmp_path / "target")
    assert vocab.output_ids == restricted.vocab.output_ids and model.tgt_vocab_size == len(vocab.output_ids)


def test_a_checkpoint_from_before_the_rewrites_loads_and_translates_as_it_did(tmp_path):
    """tests/data/checkpoint-v1: a tiny reversal model saved by the code of 2026-11-28 (torch's GRUCell, no
    output map) with its translations, scores and forced-decoding scores as that code computed them."""
    folder = REPO / "tests" / "data" / "checkpoint-v1"
    expected = json.loads((folder / "expected.json").read_text())
    model, vocab, config = load_model(folder / "best.pt")
    assert vocab.output_ids is None and model.tgt_vocab_size == vocab.tgt_size
    translator = Translator(model, vocab, config.decode)
    for beam in (1, 3):
        got = [n[0] for n in translator.translate(expected["src"], beam_size=beam)]
        assert [t.text for t in got] == [text for text, _ in expected[f"beam{beam}"]]
        assert [t.score for t in got] == pytest.approx([score for _, score in expected[f"beam{beam}"]], abs=1e-4)
    targets = [" ".join(reversed(line.split())) for line in expected["src"]]
    assert translator.score(expected["src"], targets) == pytest.approx(expected["scores"], abs=1e-4)


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
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "nmt.cli", "train", str(config)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "world size 2" in (tmp_path / "run/train.log").read_text()
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["progress"]["step"] == 6


def test_a_checkpoint_write_cut_short_leaves_the_old_file_and_is_cleaned_up_later(tmp_path):
    from nmt.checkpoint import save_checkpoint

    target = tmp_path / "last.pt"
    save_checkpoint(target, {"config": {}, "vocab": {}, "model": {"w": torch.ones(2)}})
    stale = tmp_path / ".last.pt.tmp"
    stale.write_bytes(b"half a checkpoint")  # what a SIGKILL during a write leaves behind
    assert torch.equal(load_checkpoint(target)["model"]["w"], torch.ones(2))
    save_checkpoint(target, {"config": {}, "vocab": {}, "model": {"w": torch.zeros(2)}})
    assert not stale.exists() and torch.equal(load_checkpoint(target)["model"]["w"], torch.zeros(2))


def test_an_empty_dev_set_is_a_one_line_error(toy_corpus, tmp_path):
    for side in ("src", "tgt"):
        (tmp_path / f"dev.{side}").write_text("")
    config = toy_config(toy_corpus, tmp_path / "run")
    config = dataclasses.replace(config, data=dataclasses.replace(
        config.data, dev=dataclasses.replace(config.data.dev, src=str(tmp_path / "dev.src"), tgt=str(tmp_path / "dev.tgt"))))
    with pytest.raises(NMTError, match="data.dev: .* has no sentences"):
        Trainer(config, quiet=True)


def test_a_second_training_in_a_folder_in_use_refuses_and_a_stale_lock_is_taken_over(toy_corpus, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(toy_config(toy_corpus, run, train={"max_steps": 2, "valid_every": 2}).to_dict()))
    holder = subprocess.Popen(["sleep", "60"])  # stands for a training that holds the folder
    try:
        (run / ".lock").write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename}))
        second = subprocess.run([sys.executable, "-m", "nmt.cli", "train", str(config)], cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert second.stderr.strip().splitlines() == [
            f"error: {run} is in use by training process {holder.pid} on {os.uname().nodename} "
            f"(lock file {run / '.lock'}; remove it if that process is gone)"]
        assert not (run / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (killed): its lock is stale, the next training takes it over and releases it at the end
    summary = Trainer(load_config(str(config)), quiet=True).train()
    assert summary["steps"] == 2 and not (run / ".lock").exists()


def test_a_tagged_extra_corpus_is_trained_on_beside_the_training_pairs(toy_corpus, tmp_path):
    # the toy targets in upper case as a second "reference", tagged: the trainer reads both, the tag as one piece
    (tmp_path / "upper.tgt").write_text((toy_corpus / "train.tgt").read_text().upper())
    extra = {"src": str(toy_corpus / "train.src"), "tgt": str(tmp_path / "upper.tgt"), "src_prefix": "<up>"}
    config = toy_config(toy_corpus, tmp_path / "run")
    plain = Trainer(config, quiet=True)
    tagged = Trainer(toy_config(toy_corpus, tmp_path / "tagged", data={"extra_train": [extra]}, vocab={"size": 40}),
                     quiet=True)
    assert len(tagged.train_data) == 2 * len(plain.train_data)
    vocab = tagged.vocab
    assert "<up>" in vocab.src_pieces(vocab.encode_src(["<up> a b"])[0])
    uppercase = [piece for piece in vocab.tgt_pieces(list(range(vocab.tgt_size))) if piece.strip("▁").isupper()]
    assert uppercase  # the output layer covers the extra corpus's target pieces too
