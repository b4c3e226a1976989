"""profile_step.py — where a training step's time goes, and a decoding step's: the breakdown by part of the model.

Not part of the test suite. Trains a few steps of a config (default bench/peer.yaml, the size beside OpenNMT-py)
on its data, on the threads you give it, timing each part of the step in order: encoder, decoder (target
embeddings, token gates, loop), output layer + loss (forward and backward: nmt.loss computes both), decoder
loop (backward), encoder and embeddings (backward), gradient clipping, optimizer; then torch.profiler over the
same steps for the top operators and the share of the time outside them (Python and dispatch overhead). With
--model it profiles greedy and beam-5 decoding of the test sentences too.

    OMP_NUM_THREADS=1 python bench/profile_step.py --config bench/peer.yaml --vocab-from RUN [--model RUN]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from nmt.allocator import keep_freed_memory
from nmt.bptt import Packing
from nmt.checkpoint import load_model
from nmt.config import load_config
from nmt.loss import output_loss
from nmt.train import Trainer
from nmt.translate import Translator
from nmt.vocab import PAD_ID

REPO = Path(__file__).resolve().parents[1]


class Clock:
    """Seconds per named part, summed over steps; `mark(name)` closes the part that ran since the last mark."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}
        self.last = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.parts[name] = self.parts.get(name, 0.0) + now - self.last
        self.last = now


def timed_step(trainer: Trainer, batch, clock: Clock) -> int:
    """One training step, the same computation as Trainer.step, cut into parts (backward parts by hooks)."""
    model, cfg = trainer.model, trainer.cfg
    model.train()
    clock.mark("(between steps)")
    packing = Packing((batch.tgt_out != PAD_ID).sum(1))
    memory, keys, src_mask, hidden, _ = model.encode_tensors(batch.src, batch.src_lengths)
    clock.mark("encoder (forward, with embeddings, keys, bridge)")
    memory.register_hook(lambda grad: clock.mark("decoder loop (backward)"))
    outputs = model.decoder.teacher_forced(batch.tgt_in, packing, list(hidden.unbind(1)), keys, memory, src_mask)
    outputs.register_hook(lambda grad: clock.mark("output layer and loss (backward: scaling)"))
    clock.mark("decoder: target embeddings, token gates, loop (forward)")
    loss, _ = output_loss(outputs, *model.decoder.output_layer(), packing.pack(batch.tgt_out), cfg.label_smoothing)
    clock.mark("output layer and loss (forward and backward)")
    trainer.optimizer.zero_grad(set_to_none=True)
    (loss / batch.n_tgt_tokens).backward()
    clock.mark("encoder, embeddings, token gates, bridge (backward)")
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
    clock.mark("gradient clipping")
    trainer.optimizer.step()
    clock.mark("optimizer (Adam)")
    return batch.n_tgt_tokens


def operator_table(run, rows: int = 12) -> dict:
    """torch.profiler over `run()`: the top operators by own time, and the time outside all operators."""
    began = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    wall = time.perf_counter() - began
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    inside = sum(e.self_cpu_time_total for e in events) / 1e6
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]
    return {"wall_s": round(wall, 3), "outside_operators_share": round(1 - inside / wall, 3),
            "top_operators": {e.key: round(e.self_cpu_time_total / 1e6 / wall, 3) for e in top}}


def main() -> None:
    keep_freed_memory()  # as the nmt command does (NMT_MALLOC=system: glibc's defaults)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "bench" / "peer.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--vocab-from", help="a run folder whose vocab/spm*.model to reuse (no training of one)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--model", help="a trained run/checkpoint (same vocabulary) for the decoding profile")
    parser.add_argument("--sentences", type=int, default=200)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="profile_step_"))
    config = load_config(args.config, [f"train.out_dir={work / 'run'}", "train.progress=false", *args.set])
    if args.vocab_from:
        (work / "run" / "vocab").mkdir(parents=True)
        for file in (Path(args.vocab_from) / "vocab").glob("spm*.model"):
            (work / "run" / "vocab" / file.name).write_bytes(file.read_bytes())
    trainer = Trainer(config, quiet=True)
    batches = [trainer.train_data.batch(i) for i in trainer.train_data.batcher.epoch(0)[: 2 * args.steps + 2]]
    clock = Clock()
    for batch in batches[:2]:
        timed_step(trainer, batch, clock)
    clock.parts, tokens = {}, 0
    clock.last = time.perf_counter()
    for batch in batches[2: args.steps + 2]:
        tokens += timed_step(trainer, batch, clock)
    clock.mark("(between steps)")
    total = sum(clock.parts.values())
    report = {"config": args.config, "threads": torch.get_num_threads(), "steps": args.steps,
              "train_target_tokens_per_s": round(tokens / total),
              "train_parts_share": {name: round(seconds / total, 3) for name, seconds in clock.parts.items()},
              "train_parts_ms_per_step": {name: round(1000 * s / args.steps, 1) for name, s in clock.parts.items()},
              "train_operators": operator_table(lambda: [trainer.step(b) for b in batches[args.steps + 2:]])}
    if args.model:
        model, vocab, _ = load_model(args.model)
        sources = Path(config.data.test.src).read_text(encoding="utf-8").splitlines()[: args.sentences]
        translator = Translator(model, vocab, config.decode)
        for beam in (1, 5):
            translator.translate(sources[:32], beam_size=beam)
            began = time.perf_counter()
            translator.translate(sources, beam_size=beam)
            speed = len(sources) / (time.perf_counter() - began)
            report[f"decode_beam{beam}"] = {"sentences_per_s": round(speed, 1),
                                            **operator_table(lambda: translator.translate(sources, beam_size=beam))}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
