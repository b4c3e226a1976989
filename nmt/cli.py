"""cli.py — the `nmt` command: parses arguments and dispatches to the module that owns each command.

Nothing here does the work. `data/`, `serving/` and `recipes/` are imported lazily, inside the command that
needs them, so `nmt train` never loads ONNX or a web framework. A user's mistake (NMTError) becomes one line,
`error: ...`, and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from nmt.allocator import keep_freed_memory
from nmt.errors import NMTError

BACKENDS = ("torch", "onnxruntime", "tensorrt")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + line
        raise NMTError(f"{message} (see `{self.prog} --help`)")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_decoding(parser: argparse.ArgumentParser, search: bool = True) -> None:
    parser.add_argument("--model", required=True, action="append",
                        help="run folder or checkpoint (torch), export folder (others); repeat for an ensemble")
    parser.add_argument("--backend", choices=BACKENDS, default="torch")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=_positive, help="sentences decoded together")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16", "int8"),
                        help="torch: fp32 or bf16 (matrix products in bf16, states float32); ONNX Runtime: fp32 or "
                             "int8; TensorRT: fp32 or fp16 (default: NMT_PRECISION, else fp32)")
    if search:
        parser.add_argument("--beam-size", type=_positive, help="1 = greedy search")
        parser.add_argument("--nbest", type=_positive, help="hypotheses printed per input line")
        parser.add_argument("--length-penalty", type=float, help="GNMT alpha (0 = none)")
        parser.add_argument("--max-len-ratio", type=float, help="maximum output pieces per source piece")
        parser.add_argument("--min-len", type=int, help="minimum output pieces")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nmt", description="RNN neural machine translation: train, translate, evaluate, serve.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config")
    p.add_argument("--resume", action="store_true", help="continue from checkpoints/last.pt")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")

    p = sub.add_parser("translate", help="translate raw text, one line out per line in")
    _add_decoding(p)
    p.add_argument("--input", help="input file (default: stdin)")
    p.add_argument("--output", help="output file (default: stdout)")
    p.add_argument("--scores", action="store_true", help="prefix lines with the total log-probability and a tab")
    p.add_argument("--alignments", action="store_true",
                   help="append ' ||| ' and the word alignment in Pharaoh format (source-target, from attention)")
    p.add_argument("--attention-plot", metavar="DIR", help="write one attention heat map (PNG) per input line")

    p = sub.add_parser("score", help="forced-decoding log-probability of each target given its source")
    _add_decoding(p, search=False)
    p.add_argument("--src", required=True)
    p.add_argument("--tgt", required=True)
    p.add_argument("--output", help="output file (default: stdout)")

    p = sub.add_parser("evaluate", help="sacrebleu BLEU and chrF")
    p.add_argument("--hyp", required=True)
    p.add_argument("--ref", required=True, action="append", help="reference file (repeat for several)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("distill", help="sequence-level knowledge distillation: teacher → distilled corpus → student")
    p.add_argument("config", help="the student's YAML config (distill.teacher names the teacher)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--corpus-only", action="store_true", help="stop after writing the distilled corpus")

    p = sub.add_parser("average", help="average the weights of checkpoints of one model into a checkpoint")
    p.add_argument("checkpoints", nargs="+", help="run folders (their best.pt) or checkpoint files")
    p.add_argument("--out", required=True, help="the averaged checkpoint to write")

    p = sub.add_parser("export", help="export a model to ONNX (and TensorRT engines)")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tensorrt", action="store_true", help="also build TensorRT engine plans")
    p.add_argument("--fp16", action="store_true", help="float16 graphs (for TensorRT strongly typed networks)")
    p.add_argument("--int8", action="store_true", help="also a dynamically quantized int8 copy for CPU")

    p = sub.add_parser("serve", help="HTTP translation server with dynamic batching")
    p.add_argument("--model", required=True)
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    p.add_argument("--device", default="cpu")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=_positive, default=32, help="sentences decoded together")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a batch waits to fill")
    p.add_argument("--max-request-sentences", type=_positive, default=64)
    p.add_argument("--max-chars", type=_positive, default=2000, help="longest sentence accepted")
    p.add_argument("--max-queue", type=_positive, default=256, help="sentences queued before 429 Too Many Requests")

    p = sub.add_parser("recipe", help="run a recipe's stages end to end (resumable)")
    p.add_argument("recipe")
    p.add_argument("--from", dest="start", help="first stage to run")
    p.add_argument("--to", dest="end", help="last stage to run")
    p.add_argument("--force", action="store_true", help="rerun stages even when they are current")

    p = sub.add_parser("prepare", help="prepare a parallel corpus as plain files + manifest")
    kinds = p.add_subparsers(dest="kind", required=True, parser_class=_Parser)
    k = kinds.add_parser("bible", help="the Bible Spanish→English corpus from SWORD modules")
    k.add_argument("--out", required=True)
    k.add_argument("--modules", help="SWORD folder (default: /usr/share/sword)")
    k.add_argument("--extra-tgt-module", action="append", default=[],
                   help="another English Bible (e.g. engKJV2006eb): a second reference of the training books")
    k = kinds.add_parser("hub", help="a Hugging Face dataset (hub name or saved folder)")
    k.add_argument("--name", required=True)
    k.add_argument("--config")
    k.add_argument("--src-lang", required=True)
    k.add_argument("--tgt-lang", required=True)
    k.add_argument("--out", required=True)
    k.add_argument("--max-train", type=int, default=0, help="keep at most this many training pairs")
    return parser


def dispatch(args: argparse.Namespace) -> None:
    command = args.command
    if command == "train":
        from nmt.train import run_train

        run_train(args.config, resume=args.resume, overrides=args.set)
    elif command in ("translate", "score"):
        from nmt.translate import LineFormat, run_score, run_translate

        search = {} if command == "score" else dict(
            beam_size=args.beam_size, nbest=args.nbest, length_penalty=args.length_penalty,
            max_len_ratio=args.max_len_ratio, min_len=args.min_len)
        from serving.backends import open_translator

        translator = open_translator(args.model, args.backend, args.device, args.precision,
                                     batch_size=args.batch_size, **search)
        if command == "translate":
            run_translate(translator, args.input, args.output,
                          LineFormat(args.scores, args.alignments, args.attention_plot))
        else:
            run_score(translator, args.src, args.tgt, args.output)
    elif command == "evaluate":
        from nmt.evaluate import run_evaluate

        run_evaluate(args.hyp, args.ref, as_json=args.json)
    elif command == "distill":
        from nmt.distill import run_distill

        run_distill(args.config, overrides=args.set, corpus_only=args.corpus_only)
    elif command == "average":
        from nmt.average import run_average

        run_average(args.checkpoints, args.out)
    elif command == "export":
        from serving.export import run_export

        run_export(args.model, args.out, tensorrt=args.tensorrt, fp16=args.fp16, int8=args.int8)
    elif command == "serve":
        from serving.server import run_serve

        run_serve(args.model, backend=args.backend, device=args.device, host=args.host, port=args.port,
                  max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                  max_request_sentences=args.max_request_sentences, max_chars=args.max_chars,
                  max_queue=args.max_queue)
    elif command == "recipe":
        from recipes.runner import run_recipe

        run_recipe(args.recipe, start=args.start, end=args.end, force=args.force)
    elif command == "prepare" and args.kind == "bible":
        from data.bible import prepare_bible

        prepare_bible(args.out, modules_dir=args.modules, extra_tgt_modules=tuple(args.extra_tgt_module))
    elif command == "prepare" and args.kind == "hub":
        from data.hub import prepare_hub

        prepare_hub(args.name, args.config, args.src_lang, args.tgt_lang, args.out, max_train=args.max_train)


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    try:
        dispatch(build_parser().parse_args(argv))
    except NMTError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # `nmt translate | head` is fine
        return 0
    except OSError as err:  # a full disk, a folder not writable, ...: what and where, not a traceback
        where = f": {err.filename}" if err.filename else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
