"""bench_speedup.py — decoding speed of several models side by side: their decodes of the same sentences take
turns (A, B, A, B, ...), so a machine that slows down for minutes slows every model alike; each model's figure is
the median of its runs, and each ratio is against the first model. For distillation: the teacher's beam 5 first,
then the student's greedy search. A third field picks the precision: fp32 (default), bf16, fp32-unpacked or
bf16-unpacked (the decoder step's plain products instead of oneDNN's prepacked weights: what the packing gains).

  python bench/bench_speedup.py --input test.src --decode RUN_DIR:BEAM[:PRECISION] [--decode ...] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json

import torch

from nmt.inference import unpack_decoder_products
from serving.backends import open_translator
from nmt.allocator import keep_freed_memory
from nmt.data import read_lines
from nmt.errors import NMTError
from recipes.run import timed_translation


PRECISIONS = ("fp32", "bf16", "fp32-unpacked", "bf16-unpacked")


def parse_decode(text: str) -> tuple[str, int, str]:
    head, _, last = text.rpartition(":")
    model, beam, precision = (head.rpartition(":")[0], head.rpartition(":")[2], last) if last in PRECISIONS else (
        head, last, "fp32")
    if not model or not beam.isdigit() or int(beam) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected RUN_DIR:BEAM[:PRECISION], e.g. runs/x/teacher:5:bf16")
    return model, int(beam), precision


def open_decoder(model: str, precision: str):
    translator = open_translator(model, "torch", "cpu", precision.removesuffix("-unpacked"))
    if precision.endswith("-unpacked"):
        unpack_decoder_products(getattr(translator.decoder, "model", translator.decoder))  # BFloat16Step or model
    return translator


def main() -> None:
    keep_freed_memory()  # as the nmt command does (NMT_MALLOC=system: glibc's defaults)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="source sentences, one per line")
    parser.add_argument("--decode", type=parse_decode, action="append", required=True, help="RUN_DIR:BEAM[:PRECISION]")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    try:
        lines = read_lines(args.input)
        translators = [open_decoder(model, precision) for model, _, precision in args.decode]
    except (NMTError, OSError) as err:
        parser.exit(1, f"error: {err}\n")
    if not lines:
        parser.exit(1, f"error: {args.input}: no sentences to decode\n")
    runs: list[list[float]] = [[] for _ in args.decode]
    for _ in range(args.repeats):
        for (_, beam, _), translator, times in zip(args.decode, translators, runs):
            times.append(timed_translation(translator, lines, beam)[1]["wall_s"])
    speeds = [len(lines) / sorted(times)[len(times) // 2] for times in runs]
    print(json.dumps({
        "sentences": len(lines), "threads": torch.get_num_threads(), "repeats": args.repeats,
        "decodes": [{"model": model, "beam": beam, "precision": precision, "sentences_per_s": round(speed, 1),
                     "runs_s": [round(t, 2) for t in times], "ratio_to_first": round(speed / speeds[0], 2)}
                    for (model, beam, precision), speed, times in zip(args.decode, speeds, runs)],
    }, indent=2))


if __name__ == "__main__":
    main()
