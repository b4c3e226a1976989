"""Benchmark of the core: training target tokens/s and decoding sentences/s (greedy, beam 5) for a model size.

Not part of the test suite. Uses the prepared Bible corpus when given (`--corpus DIR` with train/dev/test .es/.en),
otherwise a synthetic Zipfian corpus. Run with the thread count you want to report, e.g.
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_core.py --corpus runs/bible-es-en/corpus
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from nmt.checkpoint import load_model
from nmt.config import config_from_dict
from nmt.train import Trainer
from nmt.translate import Translator

SIZES = {
    "teacher": {"embed_dim": 256, "encoder_hidden": 256, "decoder_hidden": 512, "attention_dim": 256},
    "student": {"embed_dim": 128, "encoder_hidden": 128, "decoder_hidden": 256, "attention_dim": 128},
}


def synthetic_corpus(folder: Path, pairs: int = 6000, seed: int = 0) -> tuple[str, str]:
    """Zipfian 'words' (lengths 10-40) and a deterministic word-by-word 'translation' of them."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(20000)]
    weights = [1 / (i + 1) for i in range(len(words))]
    for split, count in (("train", pairs), ("dev", 200), ("test", 500)):
        src, tgt = [], []
        for _ in range(count):
            sentence = rng.choices(words, weights, k=rng.randint(10, 40))
            src.append(" ".join(sentence))
            tgt.append(" ".join(w.replace("w", "v") for w in reversed(sentence)))
        (folder / f"{split}.es").write_text("\n".join(src) + "\n")
        (folder / f"{split}.en").write_text("\n".join(tgt) + "\n")
    return "es", "en"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", help="folder with train/dev/test.{es,en} (default: synthetic)")
    parser.add_argument("--size", choices=SIZES, default="teacher")
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--steps", type=int, default=30, help="timed training steps (after 3 warm-up steps)")
    parser.add_argument("--batch-tokens", type=int, default=3000)
    parser.add_argument("--sentences", type=int, default=300, help="test sentences decoded (0: training only)")
    parser.add_argument("--amp", choices=("bf16", "fp16"), help="train under autocast (bf16 uses AMX on recent Xeons)")
    parser.add_argument("--model", help="decode with this trained run/checkpoint (same vocabulary) instead of the "
                                        "untrained model, whose outputs run to the maximum length")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_core_"))
    corpus = Path(args.corpus) if args.corpus else work
    if not args.corpus:
        synthetic_corpus(work)
    split = {s: {"src": str(corpus / f"{s}.es"), "tgt": str(corpus / f"{s}.en")} for s in ("train", "dev", "test")}
    config = config_from_dict({
        "data": {**split, "max_len": 100}, "vocab": {"size": args.vocab},
        "model": {**SIZES[args.size], "dropout": 0.2},
        "train": {"out_dir": str(work / "run"), "batch_tokens": args.batch_tokens, "progress": False,
                  "amp": args.amp or False},
        "decode": {"batch_size": 64},
    })
    trainer = Trainer(config, quiet=True)
    batches = trainer.train_data.batcher.epoch(0)[: args.steps + 3]
    for indices in batches[:3]:
        trainer.step(trainer.train_data.batch(indices))
    tokens, began = 0, time.perf_counter()
    for indices in batches[3:]:
        tokens += trainer.step(trainer.train_data.batch(indices))[1]
    train_seconds = time.perf_counter() - began

    model, vocab = trainer.model.eval(), trainer.vocab
    if args.model:
        model, vocab, _ = load_model(args.model)
    sources = Path(split["test"]["src"]).read_text().splitlines()[: args.sentences]
    translator = Translator(model, vocab, config.decode)
    speeds = {}
    for beam in (1, 5) if sources else ():
        began = time.perf_counter()
        translator.translate(sources, beam_size=beam)
        speeds[f"beam{beam}_sentences_per_s"] = round(len(sources) / (time.perf_counter() - began), 1)
    print(json.dumps({
        "size": args.size, "parameters": trainer.model.parameter_count(), "vocab": trainer.vocab.tgt_size,
        "decoded_with": args.model or "the untrained model",
        "decoded_parameters": model.parameter_count(), "decoded_vocab": vocab.tgt_size,
        "corpus": args.corpus or "synthetic", "threads": torch.get_num_threads(),
        "amp": args.amp, "train_target_tokens_per_s": round(tokens / train_seconds),
        "train_steps_timed": len(batches) - 3,
        **speeds, "sentences_decoded": len(sources),
    }, indent=2))


if __name__ == "__main__":
    main()
