"""Benchmark of the core: training target tokens/s against the one-thread SGEMM roofline, decoding sentences/s.

Not part of the test suite. Trains a few steps of a model size (or of a config's model, `--config`, e.g. the one
beside OpenNMT-py in ../shared/peers) on the prepared Bible corpus when given (`--corpus DIR` with
train/dev/test .es/.en), otherwise on a synthetic Zipfian corpus, and prints
- training target tokens/s (real target tokens and eos, per second of training steps);
- the model's matmul FLOPs per target token, forward + backward (3x forward), counted from the shapes of the
  timed batches (elementwise work not counted);
- SGEMM GFLOP/s on one thread at the model's own matmul shapes (FLOP-weighted), the roofline tokens/s it allows
  and the fraction of it reached;
- greedy and beam-5 sentences/s on the test sentences (`--model` decodes a trained run instead of the untrained
  model, whose outputs run to the maximum length). Run with the thread count you want to report, e.g.
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_core.py --corpus runs/bible-es-en/corpus
`--device cuda` trains and decodes on the GPU (add `--amp bf16` for autocast); the roofline is then cuBLAS's
float32 rate at the model's shapes (TF32 off, PyTorch's default), not one thread's.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nmt import kernels
from nmt.allocator import keep_freed_memory
from nmt.checkpoint import load_model
from nmt.config import Config, config_from_dict, load_config
from nmt.data import Batch
from nmt.model import Seq2Seq
from nmt.train import Trainer
from nmt.translate import Translator
from nmt.vocab import PAD_ID

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


def matmul_shapes(model: Seq2Seq, batch: Batch) -> list[tuple[int, int, int, int, bool]]:
    """The forward matmuls of a training step on `batch` as (count, M, K, N, per_step): M rows of K inputs to N
    outputs; per_step: it runs once per time step on that step's rows (about the batch size at a time)."""
    cfg, dec = model.config, model.decoder
    src_len = (batch.src != PAD_ID).sum(1)  # pieces + eos
    tgt_len = (batch.tgt_out != PAD_ID).sum(1)
    src_tokens, tgt_tokens = int(src_len.sum()), int(tgt_len.sum())
    attended = int((src_len * tgt_len).sum())  # (target position, source position) pairs
    gates = 4 if cfg.rnn_type == "lstm" else 3
    enc, hid, mem = cfg.encoder_hidden, cfg.decoder_hidden, model.encoder.output_size
    shapes = []
    for layer in range(cfg.encoder_layers):  # two directions: input projection, recurrence
        inputs = cfg.embed_dim if layer == 0 else mem
        shapes += [(2, src_tokens, inputs, gates * enc, False), (2, src_tokens, enc, gates * enc, True)]
    shapes += [(1, src_tokens, mem, cfg.attention_dim, False),  # keys
               (1, batch.src.size(0), mem, cfg.decoder_layers * hid, False),  # bridge
               (1, tgt_tokens, cfg.embed_dim, gates * hid, False),  # the first layer's token gates
               (1, tgt_tokens, dec.att_size, gates * hid, True)]  # ... and its input feeding
    for layer in range(cfg.decoder_layers):
        shapes.append((1, tgt_tokens, hid, gates * hid, True))  # recurrence
        if layer:
            shapes.append((1, tgt_tokens, hid, gates * hid, True))  # input of the upper layers
    shapes += [(1, tgt_tokens, hid, cfg.attention_dim, True),  # query
               (1, attended, cfg.attention_dim, 1, True), (1, attended, mem, 1, True),  # energies v·u, context
               (1, tgt_tokens, hid + mem, dec.att_size, True),  # attentional layer
               (1, tgt_tokens, dec.att_size, model.tgt_vocab_size, False)]  # output layer
    return shapes


def training_flops(model: Seq2Seq, batch: Batch) -> float:
    """Forward + backward matmul FLOPs of a training step: 3 x the forward's (backward: the input and the weight
    gradients, each as costly as the forward)."""
    return 3 * sum(2 * count * m * k * n for count, m, k, n, _ in matmul_shapes(model, batch))


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a wall-clock reading covers it (nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sgemm_gflops(m: int, k: int, n: int, seconds: float = 0.3, device: torch.device = torch.device("cpu")) -> float:
    """float32 GFLOP/s of an [m, k] x [k, n] product on the configured threads or the GPU (best of the runs in
    `seconds`)."""
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    a @ b
    synchronize(device)
    best, began = float("inf"), time.perf_counter()
    while time.perf_counter() - began < seconds:
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best / 1e9


def roofline_gflops(model: Seq2Seq, batch: Batch, device: torch.device = torch.device("cpu")) -> float:
    """SGEMM GFLOP/s at the model's own shapes, FLOP-weighted (the harmonic mean of the rates): each forward
    product and its two backward ones (input gradient [M, N] x [N, K], weight gradient [K, M] x [M, N]) at its
    measured rate. Products inside the loops run on one step's rows (the batch size); their weight gradients
    are one product over all rows (nmt.bptt). The attention's matrix-vector products are memory-bound and
    left out of the rate (not of the FLOPs)."""
    seconds = flops = 0.0
    for count, m, k, n, per_step in matmul_shapes(model, batch):
        if n == 1:
            continue
        rows = batch.src.size(0) if per_step else m
        for shape in ((rows, k, n), (rows, n, k), (k, m, n)):
            work = 2 * count * m * k * n
            seconds += work / (sgemm_gflops(*shape, device=device) * 1e9)
            flops += work
    return flops / seconds / 1e9


def timed_training(trainer: Trainer, steps: int) -> tuple[float, float, Batch]:
    """(target tokens/s, FLOPs per target token) over `steps` steps after 3 warm-up steps; and a typical batch."""
    batches = [trainer.train_data.batch(i) for i in trainer.train_data.batcher.epoch(0)[: steps + 3]]
    for batch in batches[:3]:
        trainer.step(batch)
    synchronize(trainer.device)
    tokens, flops, began = 0, 0.0, time.perf_counter()
    for batch in batches[3:]:
        tokens += trainer.step(batch)[1]
        flops += training_flops(trainer.model, batch)
    synchronize(trainer.device)
    seconds = time.perf_counter() - began
    typical = sorted(batches[3:], key=lambda b: b.n_tgt_tokens)[len(batches[3:]) // 2]
    return tokens / seconds, flops / tokens, typical


def bench_config(args: argparse.Namespace, work: Path) -> Config:
    if args.config:
        amp = [f"train.amp={args.amp}"] if args.amp else []
        return load_config(args.config, [f"train.out_dir={work / 'run'}", "train.progress=false",
                                         f"train.device={args.device}", *amp, *args.set])
    corpus = Path(args.corpus) if args.corpus else work
    if not args.corpus:
        synthetic_corpus(work)
    split = {s: {"src": str(corpus / f"{s}.es"), "tgt": str(corpus / f"{s}.en")} for s in ("train", "dev", "test")}
    return config_from_dict({
        "data": {**split, "max_len": 100}, "vocab": {"size": args.vocab},
        "model": {**SIZES[args.size], "dropout": 0.2},
        "train": {"out_dir": str(work / "run"), "batch_tokens": args.batch_tokens, "progress": False,
                  "amp": args.amp or False, "device": args.device},
        "decode": {"batch_size": 64},
    })


def main() -> None:
    keep_freed_memory()  # as the nmt command does (NMT_MALLOC=system: glibc's defaults)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", help="folder with train/dev/test.{es,en} (default: synthetic)")
    parser.add_argument("--config", help="benchmark this training config (its data, vocabulary, model, batches)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="with --config")
    parser.add_argument("--vocab-from", help="a run folder whose vocab/ the benchmark reuses (no training of one)")
    parser.add_argument("--size", choices=SIZES, default="teacher")
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--steps", type=int, default=30, help="timed training steps (after 3 warm-up steps)")
    parser.add_argument("--batch-tokens", type=int, default=3000)
    parser.add_argument("--sentences", type=int, default=300, help="test sentences decoded (0: training only)")
    parser.add_argument("--amp", choices=("bf16", "fp16"), help="train under autocast (bf16 uses AMX on recent Xeons)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--model", help="decode with this trained run/checkpoint (same vocabulary) instead of the "
                                        "untrained model, whose outputs run to the maximum length")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_core_"))
    config = bench_config(args, work)
    if args.vocab_from:
        (work / "run" / "vocab").mkdir(parents=True)
        for file in (Path(args.vocab_from) / "vocab").glob("spm*.model"):
            (work / "run" / "vocab" / file.name).write_bytes(file.read_bytes())
    trainer = Trainer(config, quiet=True)
    tokens_per_s, flops_per_token, batch = timed_training(trainer, args.steps)
    device = trainer.device
    rate = roofline_gflops(trainer.model, batch, device)
    roofline = rate * 1e9 / flops_per_token

    model, vocab = trainer.model.eval(), trainer.vocab
    if args.model:
        model, vocab, _ = load_model(args.model, device)
    test = config.data.test
    sources = Path(test.src).read_text(encoding="utf-8").splitlines()[: args.sentences] if test and test.src else []
    translator = Translator(model, vocab, config.decode, device)
    speeds = {}
    for beam in (1, 5) if sources else ():
        runs = []
        for _ in range(3):
            began = time.perf_counter()
            translator.translate(sources, beam_size=beam)  # its results are on the host: the GPU is done
            runs.append(len(sources) / (time.perf_counter() - began))
        speeds[f"beam{beam}_sentences_per_s"] = round(statistics.median(runs), 1)
    print(json.dumps({
        "config": args.config or args.size, "device": str(device), "parameters": trainer.model.parameter_count(),
        "vocab": {"src": trainer.vocab.src_size, "tgt": trainer.vocab.tgt_size}, "threads": torch.get_num_threads(),
        "attention": kernels.status(),
        "amp": config.train.amp, "train_target_tokens_per_s": round(tokens_per_s),
        "train_steps_timed": args.steps, "mflop_per_target_token": round(flops_per_token / 1e6, 2),
        "sgemm_gflops_at_model_shapes": round(rate, 1), "roofline_target_tokens_per_s": round(roofline),
        "fraction_of_roofline": round(tokens_per_s / roofline, 3),
        "decoded_with": args.model or "the untrained model", "decoded_parameters": model.parameter_count(),
        **speeds, "sentences_decoded": len(sources),
    }, indent=2))


if __name__ == "__main__":
    main()
