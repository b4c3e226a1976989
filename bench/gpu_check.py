"""The GPU checks in one run, for a lent CUDA machine (the `device` tool; a few minutes on an H100/H200):

    PYTHONPATH=. python3 bench/gpu_check.py --out $OUT [--corpus runs/corpus] [--model RUN_DIR]

1. what is there: torch and CUDA, the GPU and its bf16 support, TensorRT, ONNX Runtime's providers;
2. the toy reversal task trained on the GPU in fp32 and under bf16 autocast (`nmt.train.Trainer`), each model
   translated there with greedy and beam-5 search: BLEU and sentences/s;
3. `nmt translate --device cuda` on the command line: the same lines as in-process;
4. TensorRT, where it is installed: the toy model's engines built by `nmt export --tensorrt` and translating as
   torch does;
5. bench/bench_core.py on the GPU at the teacher's size, fp32 and bf16 autocast, on the Bible corpus when given
   (else a synthetic one): training target tokens/s, cuBLAS's rate at the model's shapes, greedy and beam-5
   sentences/s (of `--model`, a trained run with the corpus's vocabulary, when given).
One JSON line per check, printed and appended to OUT/gpu_check.jsonl. `--device cpu` runs the same checks on CPU,
which is how this script is tried on a machine without a GPU:
    .venv/bin/python bench/gpu_check.py --device cpu --bench "--size student --vocab 2000 --steps 2 --sentences 5"
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import TINY_MODEL, toy_config, write_reversal_corpus  # noqa: E402 — the suite's toy task
from nmt.evaluate import corpus_scores  # noqa: E402
from nmt.train import Trainer  # noqa: E402
from serving.backends import open_translator  # noqa: E402


def report(out: Path, check: str, **values) -> None:
    line = json.dumps({"check": check, **values})
    print(line, flush=True)
    with open(out / "gpu_check.jsonl", "a", encoding="utf-8") as log:
        log.write(line + "\n")


def environment(device: str) -> dict:
    found = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if device.startswith("cuda"):
        found.update(gpu=torch.cuda.get_device_name(device), bf16=torch.cuda.is_bf16_supported())
    for name in ("tensorrt", "onnxruntime", "sentencepiece", "sacrebleu"):
        try:
            found[name] = getattr(importlib.import_module(name), "__version__", "present")
        except ImportError as err:
            found[name] = f"missing ({err})"
    if not found["onnxruntime"].startswith("missing"):
        found["onnxruntime_providers"] = importlib.import_module("onnxruntime").get_available_providers()
    return found


def timed(translator, sources: list[str], beam: int) -> tuple[list[str], float]:
    began = time.perf_counter()
    hypotheses = [nbest[0].text for nbest in translator.translate(sources, beam_size=beam)]
    return hypotheses, len(sources) / (time.perf_counter() - began)  # results are on the host: the GPU is done


def toy_task(work: Path, device: str, amp: str | bool, out: Path) -> Path:
    """Train the reversal task on `device` and score it; returns the run folder."""
    corpus = work / "corpus"
    if not corpus.is_dir():
        write_reversal_corpus(corpus)
    run = work / f"toy-{amp or 'fp32'}"
    config = toy_config(corpus, run, model=dict(TINY_MODEL), train={"device": device, "amp": amp, "max_steps": 500})
    began = time.perf_counter()
    result = Trainer(config, quiet=True).train()
    train_s = time.perf_counter() - began
    sources = (corpus / "test.src").read_text(encoding="utf-8").splitlines()
    references = (corpus / "test.tgt").read_text(encoding="utf-8").splitlines()
    translator = open_translator(str(run), "torch", device)
    scores = {}
    for beam in (1, 5):
        hypotheses, speed = timed(translator, sources, beam)
        scores[f"beam{beam}"] = {"bleu": round(corpus_scores(hypotheses, [references])["bleu"], 2),
                                 "sentences_per_s": round(speed, 1)}
    report(out, "toy task", device=device, amp=amp, train_s=round(train_s, 1), best_bleu=result.get("best_bleu"),
           steps=result.get("steps"), **scores)
    return run


def command_line(run: Path, corpus: Path, device: str, out: Path) -> None:
    """`nmt translate --device DEVICE` gives the lines the in-process translator gives."""
    sources = (corpus / "test.src").read_text(encoding="utf-8").splitlines()
    done = subprocess.run([sys.executable, "-m", "nmt.cli", "translate", "--model", str(run), "--device", device,
                           "--beam-size", "5", "--input", str(corpus / "test.src")],
                          capture_output=True, text=True, cwd=ROOT)
    expected, _ = timed(open_translator(str(run), "torch", device), sources, 5)
    report(out, "nmt translate", device=device, rc=done.returncode, lines=len(done.stdout.splitlines()),
           same_as_in_process=done.stdout.splitlines() == expected, stderr_tail=done.stderr[-300:])


def tensorrt(run: Path, corpus: Path, device: str, out: Path) -> None:
    """Engines of the toy model, translating as torch does (where TensorRT and a GPU are there)."""
    if importlib.util.find_spec("tensorrt") is None or not device.startswith("cuda"):
        report(out, "tensorrt", skipped="TensorRT is not installed" if device.startswith("cuda") else "no GPU")
        return
    from serving.export import run_export

    engines = run.parent / "engines"
    began = time.perf_counter()
    try:
        run_export(str(run), str(engines), tensorrt=True)
    except Exception as err:  # the check reports what failed instead of stopping the others
        report(out, "tensorrt", built=False, error=f"{type(err).__name__}: {err}"[:500])
        return
    build_s = time.perf_counter() - began
    sources = (corpus / "test.src").read_text(encoding="utf-8").splitlines()
    ours, speed = timed(open_translator(str(engines), "tensorrt", device), sources, 5)
    torch_lines, _ = timed(open_translator(str(run), "torch", device), sources, 5)
    report(out, "tensorrt", built=True, build_s=round(build_s, 1), beam5_sentences_per_s=round(speed, 1),
           same_lines_as_torch=sum(a == b for a, b in zip(ours, torch_lines)), lines=len(sources))


def bench_core(corpus: str | None, model: str | None, device: str, amp: str | None, extra: list[str],
               out: Path) -> None:
    command = [sys.executable, str(ROOT / "bench" / "bench_core.py"), "--device", device, "--steps", "30", *extra]
    command += ["--corpus", corpus] if corpus else []
    command += ["--vocab-from", model, "--model", model] if model else []
    command += ["--amp", amp] if amp else []
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    try:
        figures = json.loads(done.stdout[done.stdout.index("{"):])
    except ValueError:
        figures = {"rc": done.returncode, "stderr_tail": done.stderr[-500:]}
    report(out, "bench_core", **{"amp": amp or False, **figures})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check", help="folder for gpu_check.jsonl")
    parser.add_argument("--corpus", help="prepared Bible corpus folder (train/dev/test .es/.en) for bench_core")
    parser.add_argument("--model", help="a trained run on that corpus, decoded by bench_core")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--bench", default="", help="more bench_core.py arguments, e.g. '--size student --steps 2'")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report(out, "environment", **environment(args.device))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        report(out, "stopped", reason="torch sees no CUDA device")
        return
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    run = toy_task(work, args.device, False, out)
    toy_task(work, args.device, "bf16", out)
    command_line(run, work / "corpus", args.device, out)
    tensorrt(run, work / "corpus", args.device, out)
    for amp in (None, "bf16"):
        bench_core(args.corpus, args.model, args.device, amp, shlex.split(args.bench), out)


if __name__ == "__main__":
    main()
