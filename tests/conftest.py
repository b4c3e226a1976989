"""Shared fixtures: a toy reversal corpus, a model trained on it once per session, tiny random models."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from nmt.config import Config, ModelConfig, config_from_dict
from nmt.model import Seq2Seq

# Tiny models gain nothing from more threads, and several processes (torchrun, CLI subprocesses) would fight
# over the cores: one thread each keeps the suite fast and its timings steady.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

ALPHABET = "a b c d e f g h i j k l".split()

TINY_MODEL = {"embed_dim": 32, "encoder_hidden": 64, "decoder_hidden": 64, "attention_dim": 32, "dropout": 0.0}


def write_reversal_corpus(folder: Path, sizes=(("train", 3000), ("dev", 100), ("test", 100)), seed: int = 7) -> Path:
    """The toy task: a random sequence of letters, translated to the same letters reversed."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in sizes:
        src, tgt = [], []
        for _ in range(count):
            words = [rng.choice(ALPHABET) for _ in range(rng.randint(3, 9))]
            src.append(" ".join(words))
            tgt.append(" ".join(reversed(words)))
        (folder / f"{split}.src").write_text("\n".join(src) + "\n", encoding="utf-8")
        (folder / f"{split}.tgt").write_text("\n".join(tgt) + "\n", encoding="utf-8")
    return folder


def toy_config(corpus: Path, out_dir: Path, **sections) -> Config:
    """A config for the toy task; keyword arguments update whole sections' keys, e.g. train={"max_steps": 5}."""
    values = {
        "data": {"train": {"src": str(corpus / "train.src"), "tgt": str(corpus / "train.tgt")},
                 "dev": {"src": str(corpus / "dev.src"), "tgt": str(corpus / "dev.tgt")},
                 "test": {"src": str(corpus / "test.src"), "tgt": str(corpus / "test.tgt")}},
        "vocab": {"size": 20},
        "model": dict(TINY_MODEL),
        "train": {"out_dir": str(out_dir), "batch_tokens": 1000, "lr": 0.003, "max_epochs": 30, "max_steps": 500,
                  "valid_every": 100, "patience": 5, "label_smoothing": 0.0, "progress": False, "seed": 1},
        "decode": {"beam_size": 5, "batch_size": 50},
    }
    for section, updates in sections.items():
        values.setdefault(section, {}).update(updates)
    return config_from_dict(values)


@pytest.fixture(scope="session")
def toy_corpus(tmp_path_factory) -> Path:
    return write_reversal_corpus(tmp_path_factory.mktemp("toy_corpus"))


@pytest.fixture(scope="session")
def toy_run(toy_corpus, tmp_path_factory) -> Path:
    """A run folder with a model trained on the reversal task (about 15 s on 2 cores)."""
    from nmt.train import Trainer

    out = tmp_path_factory.mktemp("toy_run") / "run"
    Trainer(toy_config(toy_corpus, out), quiet=True).train()
    return out


def tiny_random_model(vocab_size: int = 7, seed: int = 0, **model) -> Seq2Seq:
    """An untrained model with small sizes (random weights, dropout off) for search tests."""
    torch.manual_seed(seed)
    config = ModelConfig(**{"embed_dim": 8, "encoder_hidden": 8, "decoder_hidden": 16, "attention_dim": 8,
                            "dropout": 0.0, **model})
    return Seq2Seq(config, vocab_size, vocab_size).eval()
