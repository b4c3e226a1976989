"""peer_side_by_side.py — our trainer and OpenNMT-py 3.5.1 (../shared/peers) side by side: the same training pairs
and SentencePiece model, one thread and one core each, both at once for the same wall-clock budget; then both
decode the test books at once (beam 5 and greedy, batch 32, one thread each) and are scored with sacrebleu.

    python bench/peer_side_by_side.py --corpus runs/corpus --work runs/peer --seconds 2700 [--set key=value ...]
    python bench/peer_side_by_side.py --corpus runs/corpus --work runs/peer --decode-only --precision bf16 \
        [--our-core 1]

--corpus: a prepared corpus folder ({train,dev,test}.{es,en}, e.g. `nmt prepare bible`). WORK gets the joint
16k SentencePiece model (vocab/), the peer's prepared data and run (onmt/), our run (ours/) and summary.json.
Our side trains bench/peer.yaml (OpenNMT-py's settings) unless --config names another (e.g. our recommended
settings); --set overrides its keys. The peer is installed into --venv on first use (`opennmt.sh install`).
Prints both sides' figures and the ratios: training target tokens/s (median of the logged windows, and the
effective rate: tokens consumed / budget), updates, dev perplexity per update, BLEU / chrF and sentences/s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run(command: list[str], log: Path, core: int | None = None, **kwargs) -> subprocess.Popen:
    """Start a command pinned to one core (taskset) with one thread, its output into `log`."""
    pinned = (["taskset", "-c", str(core)] if core is not None and shutil.which("taskset") else []) + command
    handle = open(log, "w", encoding="utf-8")
    return subprocess.Popen(pinned, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **THREADS}, **kwargs)


def wait_all(*processes: subprocess.Popen) -> None:
    for process in processes:
        process.wait()


def our_training_stats(run_dir: Path, budget: float) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    windows = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    tokens = max((r["target_tokens"] for r in rows if "target_tokens" in r), default=0)
    log = (run_dir / "train.log").read_text(encoding="utf-8")
    steps = [int(m) for m in re.findall(r"interrupted at step (\d+)|done: \{\"steps\": (\d+)", log) for m in m if m]
    params = re.search(r"model: ([\d,]+) parameters", log)
    return {"steps": max(steps + [max((r["step"] for r in rows), default=0)]),
            "parameters": int(params.group(1).replace(",", "")) if params else None,
            "logged_tgt_tok_s_median": round(statistics.median(windows), 1) if windows else None,
            "tgt_tokens_consumed_logged": tokens, "effective_tgt_tok_s": round(tokens / budget, 1),
            "dev": [{"step": r["step"], "ppl": round(2.718281828459045 ** min(r["valid_loss"], 50), 2),
                     "bleu": round(r["valid_bleu"], 2)} for r in rows if "valid_loss" in r]}


def decode_ours(work: Path, checkpoint: Path, source: Path, reference: Path, log: Path, precision: str,
                core: int, before: dict | None = None) -> dict:
    """Beam 5 then greedy, batch 32, one thread, each whole command timed (as opennmt.sh times the peer's);
    `before[mode]()`, where given, is waited for before that mode starts."""
    results = {}
    for mode, beam in (("beam5", "5"), ("greedy", "1")):
        if before and mode in before:
            before[mode]()
        hyp = work / "hyps" / f"ours.{mode}.en"
        hyp.parent.mkdir(exist_ok=True)
        began = time.perf_counter()
        subprocess.run(["taskset", "-c", str(core), sys.executable, "-m", "nmt.cli", "translate",
                        "--model", str(checkpoint), "--input", str(source), "--output", str(hyp), "--beam-size", beam, "--length-penalty", "1.0",
                        "--batch-size", "32", "--precision", precision], check=True, env={**os.environ, **THREADS},
                       stdout=open(log, "a"), stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - began
        scores = subprocess.run([sys.executable, "-m", "nmt.cli", "evaluate", "--hyp", str(hyp), "--ref",
                                 str(reference), "--json"], check=True, capture_output=True, text=True)
        score = json.loads(scores.stdout)
        lines = len(source.read_text(encoding="utf-8").splitlines())
        results[mode] = {"wall_s": round(seconds, 2), "sentences_per_s": round(lines / seconds, 1),
                         "bleu": score["bleu"], "chrf": score["chrf"]}
    return results


def decode_both(work: Path, opennmt: list[str], venv: str, precision: str, our_core: int) -> tuple[dict, dict]:
    """The peer's decodes (on the other core) and ours (on `our_core`) at once: the peer's scores.json and our
    figures."""
    data, times = work / "onmt" / "data", work / "onmt" / "logs" / "decode_times.tsv"
    times.unlink(missing_ok=True)
    peer_decode = run(opennmt + ["decode", venv, str(work / "onmt")], work / "onmt-decode.log", 1 - our_core)

    def peer_beam_done() -> None:
        """Our greedy decode starts when the peer's does (opennmt.sh decodes beam 5, then greedy), so that
        each mode of ours runs beside the same mode of the peer's."""
        while peer_decode.poll() is None and not (times.is_file() and "\nbeam5\t" in times.read_text()):
            time.sleep(0.2)

    our_decodes = decode_ours(work, work / "ours" / "checkpoints" / "last.pt", data / "test.es", data / "test.en",
                              work / "ours-decode.log", precision, our_core, {"greedy": peer_beam_done})
    wait_all(peer_decode)
    return json.loads((work / "onmt" / "logs" / "scores.json").read_text()), our_decodes


def cpu_model() -> str | None:
    model_name = re.search(r"Model name:\s*(.+)", subprocess.run(["lscpu"], capture_output=True, text=True).stdout)
    return model_name.group(1).strip() if model_name else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--seconds", type=int, default=2700)
    parser.add_argument("--config", default=str(REPO / "bench" / "peer.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--peers", default=str(REPO.parent / "shared" / "peers"))
    parser.add_argument("--venv", default=str(REPO.parent / "onmt-venv"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="our decoding precision (bf16: matrix products on AMX or AVX512-BF16)")
    parser.add_argument("--decode-only", action="store_true",
                        help="decode again with the models WORK holds (both at once), into summary-decode-PRECISION.json")
    parser.add_argument("--our-core", type=int, choices=(0, 1), default=0,
                        help="the core our commands run on; the peer's run on the other (the two cores of a "
                             "shared machine can differ in speed at a given moment: run both ways)")
    args = parser.parse_args()

    work, corpus, peers = Path(args.work).resolve(), Path(args.corpus).resolve(), Path(args.peers).resolve()
    opennmt = [str(peers / "opennmt.sh")]
    work.mkdir(parents=True, exist_ok=True)
    spm = work / "vocab" / "spm.model"
    if not spm.is_file():
        from nmt.config import VocabConfig
        from nmt.data import read_lines
        from nmt.vocab import train_vocab

        train_vocab(VocabConfig(size=16000), read_lines(corpus / "train.es"), read_lines(corpus / "train.en")
                    ).save(spm.parent)
    subprocess.run(opennmt + ["install", args.venv], check=True, stdout=subprocess.DEVNULL)
    if not (work / "onmt" / "opennmt.yaml").is_file():
        subprocess.run(opennmt + ["prepare", args.venv, str(corpus), str(spm), str(work / "onmt")], check=True)
    if args.decode_only:
        peer_scores, our_decodes = decode_both(work, opennmt, args.venv, args.precision, args.our_core)
        summary = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": cpu_model(), "precision": args.precision,
                   "cores": {"ours": args.our_core, "opennmt": 1 - args.our_core},
                   "ours": our_decodes, "opennmt": peer_scores,
                   "sentences_per_s_ratio": {
                       mode: round(our_decodes[mode]["sentences_per_s"] / peer_scores[mode]["sent_s"], 2)
                       for mode in our_decodes}}
        (work / f"summary-decode-{args.precision}.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary, indent=2))
        return
    shutil.rmtree(work / "ours", ignore_errors=True)
    (work / "ours" / "vocab").mkdir(parents=True)
    shutil.copy(spm, work / "ours" / "vocab" / "spm.model")  # our trainer reuses the model it finds there
    shutil.copy(args.config, work / "ours.yaml")
    sets = [item for key in args.set for item in ("--set", key)]

    began = time.strftime("%Y-%m-%d %H:%M:%S")
    ours = run(["timeout", "--signal=INT", "--kill-after=180", str(args.seconds), sys.executable, "-m", "nmt.cli",
                "train", str(work / "ours.yaml"), "--set", "train.progress=false", *sets], work / "ours-train.log",
               args.our_core, cwd=work)
    peer = run(opennmt + ["train", args.venv, str(work / "onmt"), str(args.seconds)], work / "onmt-train.log",
               1 - args.our_core)
    wait_all(ours, peer)

    peer_scores, our_decodes = decode_both(work, opennmt, args.venv, args.precision, args.our_core)
    peer_train = json.loads((work / "onmt" / "logs" / "train_stats.json").read_text())
    summary = {"date": began, "cpu": cpu_model(), "budget_s": args.seconds,
               "ours": {"config": args.config, "set": args.set, **our_training_stats(work / "ours", args.seconds),
                        "decode": our_decodes},
               "opennmt": {"train": peer_train, "decode": peer_scores}}
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
