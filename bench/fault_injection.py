"""fault_injection.py — SIGKILL training, distillation and a tiny recipe at random moments; resume; compare.

Not part of the test suite. Each job (the toy reversal task of tests/conftest.py, tiny models) runs once
uninterrupted; then `--kills N` seeded moments uniform within that run's duration each SIGKILL the attempt they
meet, that many seconds after its start, and the job is resumed (`nmt train CONFIG --resume`, `nmt distill CONFIG`,
`nmt recipe FILE`). A resume that finishes before its moment ends the run; the moments left start a new run from
scratch. Every finished run is compared with the uninterrupted one: checkpoints tensor by tensor (torch.equal),
corpora and translations byte by byte, and for the recipe no stage that state.json recorded as done may start
again. A full-disk check trains on a tiny tmpfs (root: mount) and expects exit status 2, one `error:` line and the
previous last.pt intact. Prints JSON; takes about 8 minutes on 2 cores:
    .venv/bin/python bench/fault_injection.py --kills 5 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from conftest import TINY_MODEL, toy_config, write_reversal_corpus  # noqa: E402  (the tests' tiny fixtures)
from nmt.checkpoint import load_checkpoint  # noqa: E402
from nmt.errors import NMTError  # noqa: E402

STUDENT_MODEL = {"embed_dim": 16, "encoder_hidden": 32, "decoder_hidden": 48, "attention_dim": 16, "dropout": 0.0}
ATTEMPT_LIMIT_S = 600  # an attempt left to finish that runs longer than this has hung
NMT = [sys.executable, "-m", "nmt.cli"]


# --- running and killing the command -----------------------------------------------------------------------------


@dataclass
class Attempt:
    returncode: int
    killed: bool
    seconds: float
    stderr: str


def job_env(home: Path) -> dict[str, str]:
    """One thread per process (2 shared cores); a private, offline `datasets` cache per run folder, so a kill can
    also land while the cache is being built."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(home / "hf"), "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def run_attempt(argv: list[str], home: Path, log_name: str, kill_after: float | None) -> Attempt:
    """Run the command in `home`; SIGKILL its process group after `kill_after` seconds unless it ended before."""
    logs = home / "attempts"
    logs.mkdir(parents=True, exist_ok=True)
    stderr_path = logs / f"{log_name}.stderr"
    began = time.monotonic()
    with open(logs / f"{log_name}.stdout", "wb") as out, open(stderr_path, "wb") as err:
        process = subprocess.Popen(argv, cwd=home, env=job_env(home), stdout=out, stderr=err,
                                   start_new_session=True)
        try:
            returncode, killed = process.wait(timeout=ATTEMPT_LIMIT_S if kill_after is None else kill_after), False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            returncode, killed = process.wait(), kill_after is not None
    return Attempt(returncode, killed, time.monotonic() - began, stderr_path.read_text(errors="replace"))


# --- a job: its command, what a kill must not change, and the runs ---------------------------------------------


@dataclass
class Job:
    name: str
    prepare: Callable[[Path], None]  # writes the config (or recipe) into a fresh folder
    command: Callable[[Path], list[str]]  # the command for the folder's state: the first run or a resume
    compare: Callable[[Path, Path], list[str]]  # (uninterrupted folder, killed folder) -> what differs
    progress: Callable[[Path], str]  # how far the folder's run got, in words


@dataclass
class Chain:
    """One folder: a first run killed, its resume killed, ..., until an attempt ends by itself."""

    home: Path
    attempts: list[Attempt] = field(default_factory=list)
    kills: list[tuple[float, str]] = field(default_factory=list)  # (seconds after the attempt's start, progress)
    missed: int = 0  # kill moments after the end of a first run (a faster run than the uninterrupted one)
    failure: str | None = None
    redone_stages: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return bool(self.attempts) and not self.attempts[-1].killed and self.attempts[-1].returncode == 0


def redone(attempt: Attempt, done_before: set[str], name: str) -> list[str]:
    """Stages that state.json recorded as done before the attempt and that it started again."""
    return [f"{stage} ({name})" for stage in started_stages(attempt.stderr) if stage in done_before]


def run_uninterrupted(job: Job, home: Path) -> tuple[Attempt, Attempt]:
    """The job run once without kills, then once more when finished: a rerun that must find nothing to do (for
    the recipe: redo no stage)."""
    job.prepare(home)
    runs = [run_attempt(job.command(home), home, name, None) for name in ("uninterrupted", "rerun")]
    for name, attempt in zip(("uninterrupted", "rerun"), runs):
        if attempt.returncode != 0:
            raise SystemExit(f"{job.name}: the {name} run failed ({attempt.returncode}):\n{attempt.stderr[-3000:]}")
    return runs[0], runs[1]


def run_chain(job: Job, home: Path, moments: list[float]) -> Chain:
    """Kill each attempt at the next of `moments` (seconds after its start; taken off the list when used) and
    resume, until an attempt ends before its moment: a resume's moment is left for the next chain."""
    job.prepare(home)
    chain = Chain(home)
    while True:
        moment = moments[0] if moments else None
        number, done_before = len(chain.attempts), finished_stages(home)
        attempt = run_attempt(job.command(home), home, f"attempt-{number}", moment)
        chain.attempts.append(attempt)
        chain.redone_stages += redone(attempt, done_before, f"{home.name} attempt {number}")
        if attempt.killed:
            chain.kills.append((moments.pop(0), job.progress(home)))
            continue
        if attempt.returncode != 0:
            tail = " | ".join(attempt.stderr.strip().splitlines()[-6:])
            chain.failure = f"{home.name} attempt {number} exited {attempt.returncode}: {tail}"
        if number == 0 and moment is not None:  # a first run ended before the moment: that kill is lost
            moments.pop(0)
            chain.missed = int(attempt.returncode == 0)
        return chain


def chain_differences(job: Job, reference_home: Path, chain: Chain) -> list[str]:
    if chain.failure:
        return [chain.failure]
    if not chain.finished:
        return [f"{chain.home.name}: did not finish"]
    return [f"{chain.home.name}: {difference}" for difference in job.compare(reference_home, chain.home)]


def job_report(job: Job, work: Path, kills: int, rng: random.Random) -> dict[str, Any]:
    """Kill moments uniform within the uninterrupted run's duration, each one `kills` the attempt it meets."""
    began = time.monotonic()
    reference_home = work / job.name / "uninterrupted"
    reference, rerun = run_uninterrupted(job, reference_home)
    moments = [rng.uniform(0.0, reference.seconds) for _ in range(kills)]
    chains = []
    while moments:
        chains.append(run_chain(job, work / job.name / f"killed-{len(chains)}", moments))
    differences = [difference for chain in chains for difference in chain_differences(job, reference_home, chain)]
    redone_stages = [*redone(rerun, finished_stages(reference_home), "rerun of the finished run"),
                     *(stage for chain in chains for stage in chain.redone_stages)]
    delivered = [kill for chain in chains for kill in chain.kills]
    return {
        "kills": len(delivered),
        "kills_planned": kills,
        "kills_missed": sum(chain.missed for chain in chains),
        "kills_survived": sum(len(chain.kills) - (0 if chain.finished or not chain.kills else 1) for chain in chains),
        "runs_from_scratch": len(chains),
        "kill_moments_s": [round(moment, 2) for moment, _ in delivered],
        "kills_landed": [where for _, where in delivered],
        "differences": len(differences),
        "what_differed": differences,
        **({"redone_stages": len(redone_stages), "redone": redone_stages} if job.name == "recipe" else {}),
        "uninterrupted_s": round(reference.seconds, 1),
        "seconds": round(time.monotonic() - began, 1),
    }


# --- comparisons ---------------------------------------------------------------------------------------------------


def value_differences(reference: Any, candidate: Any, where: str) -> list[str]:
    """Where two nested containers of tensors and plain values differ (tensors: dtype, shape and torch.equal)."""
    if isinstance(reference, torch.Tensor):
        same = (isinstance(candidate, torch.Tensor) and reference.dtype == candidate.dtype
                and reference.shape == candidate.shape and torch.equal(reference, candidate))
        return [] if same else [where]
    if isinstance(reference, dict):
        if not isinstance(candidate, dict) or set(reference) != set(candidate):
            return [f"{where} (keys)"]
        return [d for key in reference for d in value_differences(reference[key], candidate[key], f"{where}.{key}")]
    if isinstance(reference, (list, tuple)):
        if not isinstance(candidate, (list, tuple)) or len(reference) != len(candidate):
            return [f"{where} (length)"]
        return [d for i, pair in enumerate(zip(reference, candidate)) for d in value_differences(*pair, f"{where}.{i}")]
    both_nan = all(isinstance(value, float) and math.isnan(value) for value in (reference, candidate))
    return [] if reference == candidate or both_nan else [f"{where} ({reference!r} vs {candidate!r})"]


def checkpoint_differences(reference_home: Path, killed_home: Path, relative: str) -> list[str]:
    """Every tensor and number of a checkpoint (weights, optimizer, schedule, progress); the config only up to the
    run folder's own path."""
    try:
        reference, candidate = (load_checkpoint(home / relative) for home in (reference_home, killed_home))
    except NMTError as err:
        return [f"{relative}: {err}"]
    for payload, home in ((reference, reference_home), (candidate, killed_home)):
        payload["config"] = json.loads(json.dumps(payload["config"]).replace(str(home), "<run>"))
    return value_differences(reference, candidate, relative)


def file_differences(reference_home: Path, killed_home: Path, relatives: list[str]) -> list[str]:
    differences = []
    for relative in relatives:
        reference, candidate = reference_home / relative, killed_home / relative
        if not reference.is_file() or not candidate.is_file():
            differences.append(f"{relative}: missing ({reference.is_file()=}, {candidate.is_file()=})")
        elif reference.read_bytes() != candidate.read_bytes():
            differences.append(f"{relative}: bytes differ")
    return differences


def relative_files(home: Path, folder: str, pattern: str = "*") -> list[str]:
    return sorted(str(path.relative_to(home)) for path in (home / folder).glob(pattern) if path.is_file())


# --- the three jobs ------------------------------------------------------------------------------------------------


def write_config(home: Path, values: dict[str, Any]) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.yaml").write_text(yaml.safe_dump(values), encoding="utf-8")


def checkpoint_step(path: Path) -> int | None:
    """The step a last.pt was saved at, or None before the first one."""
    return load_checkpoint(path)["progress"]["step"] if path.is_file() else None


def last_and_best_differences(reference: Path, killed: Path, run: str) -> list[str]:
    return [d for name in ("last.pt", "best.pt") for d in checkpoint_differences(
        reference, killed, f"{run}/checkpoints/{name}")]


def train_job(corpus: Path) -> Job:
    """Training with dropout on (a resume must draw the same masks) and a checkpoint every 25 steps."""

    def prepare(home: Path) -> None:
        write_config(home, toy_config(corpus, home / "run", model={"dropout": 0.2},
                                      train={"max_steps": 250, "valid_every": 25, "log_every": 25}).to_dict())

    def command(home: Path) -> list[str]:
        resume = ["--resume"] if (home / "run/checkpoints/last.pt").is_file() else []  # else killed before one
        return [*NMT, "train", "config.yaml", *resume]

    def progress(home: Path) -> str:
        return f"last.pt at step {checkpoint_step(home / 'run/checkpoints/last.pt')}"

    return Job("train", prepare, command, lambda reference, killed: last_and_best_differences(reference, killed, "run"),
               progress)


def distill_job(corpus: Path, teacher: Path) -> Job:
    """Distillation in many small shards (each written atomically), then the student."""

    def prepare(home: Path) -> None:
        write_config(home, toy_config(corpus, home / "run", model=STUDENT_MODEL,
                                      train={"max_steps": 150, "valid_every": 25, "log_every": 25, "lr": 0.005},
                                      distill={"teacher": str(teacher), "beam_size": 3, "shard_size": 200}).to_dict())

    def compare(reference: Path, killed: Path) -> list[str]:
        corpus_files = ["run/distill/train.src", "run/distill/train.tgt",
                        *relative_files(reference, "run/distill/shards")]
        return file_differences(reference, killed, corpus_files) + last_and_best_differences(reference, killed, "run")

    def progress(home: Path) -> str:
        shards = len(list((home / "run/distill/shards").glob("shard-*.txt")))
        return (f"{shards} shards, corpus {'written' if (home / 'run/distill/train.tgt').is_file() else 'not yet'}, "
                f"student last.pt at step {checkpoint_step(home / 'run/checkpoints/last.pt')}")

    return Job("distill", prepare, lambda home: [*NMT, "distill", "config.yaml"], compare, progress)


def recipe_values(corpus: Path) -> dict[str, Any]:
    """A tiny recipe on prepared files: every stage that can run here (no Apertium, no TensorRT) runs."""
    return {
        "description": "fault injection: toy reversal task",
        "run_dir": "run",
        "corpus": {"kind": "files", "dir": str(corpus), "src_lang": "src", "tgt_lang": "tgt"},
        "teacher": {"vocab": {"size": 20}, "model": dict(TINY_MODEL),
                    "train": {"batch_tokens": 1000, "lr": 0.004, "max_steps": 80, "valid_every": 20, "log_every": 20,
                              "label_smoothing": 0.0, "progress": False},
                    "decode": {"batch_size": 50}},
        "student": {"model": STUDENT_MODEL, "train": {"max_steps": 100, "valid_every": 25}},
        "distill": {"beam_size": 2, "shard_size": 100},
        "evaluate": {"max_sentences": 40, "speed_repeats": 1},
        "export": {"tensorrt": False},
    }


def summary_scores(home: Path) -> dict[str, Any]:
    summary = json.loads((home / "run/summary.json").read_text(encoding="utf-8"))
    return {f"{model}.{decode}": (values["bleu"], values["chrf"])
            for model, result in summary["models"].items() for decode, values in result["decodes"].items()}


def recipe_job(corpus: Path) -> Job:
    def prepare(home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        (home / "recipe.yaml").write_text(yaml.safe_dump(recipe_values(corpus)), encoding="utf-8")

    def compare(reference: Path, killed: Path) -> list[str]:
        outputs = [*relative_files(reference, "run/eval", "*.tgt"), "run/sample.txt", "run/student/distill/train.tgt"]
        differences = file_differences(reference, killed, outputs)
        differences += [d for role in ("teacher", "student") for d in checkpoint_differences(
            reference, killed, f"run/{role}/checkpoints/best.pt")]
        try:
            differences += value_differences(summary_scores(reference), summary_scores(killed), "summary scores")
        except (OSError, KeyError, ValueError) as err:
            differences.append(f"summary.json: {err!r}")
        statuses = [{name: record["status"] for name, record in stage_records(home).items()}
                    for home in (reference, killed)]
        return differences + value_differences(*statuses, "stage statuses")

    def progress(home: Path) -> str:
        records = stage_records(home)
        started = [name for name, record in records.items() if record.get("status") == "started"]
        where = f", in {started[0]}" if started else ""
        if started and started[0] in ("teacher", "student"):
            where += f" (last.pt at step {checkpoint_step(home / 'run' / started[0] / 'checkpoints/last.pt')})"
        return f"{len(finished_stages(home))} stages done{where}"

    return Job("recipe", prepare, lambda home: [*NMT, "recipe", "recipe.yaml"], compare, progress)


def stage_records(home: Path) -> dict[str, dict[str, Any]]:
    state = home / "run" / "state.json"
    return json.loads(state.read_text(encoding="utf-8"))["stages"] if state.is_file() else {}


def finished_stages(home: Path) -> set[str]:
    """Stages state.json records as done (skipped ones are run again by design: a feature may appear)."""
    return {name for name, record in stage_records(home).items() if record.get("status") == "done"}


def started_stages(stderr: str) -> list[str]:
    """Stages the runner started doing work for: it says `[stage] running` (or resuming, extending)."""
    said = [line[1:].partition("] ") for line in stderr.splitlines() if line.startswith("[")]
    return [name for name, _, rest in said if rest in ("running", "resuming", "extending")]


# --- a full disk -----------------------------------------------------------------------------------------------------


def full_disk_check(corpus: Path, work: Path) -> dict[str, Any]:
    """Train 6 steps on a tmpfs, shrink it to hold less than one more checkpoint, resume for 6 more: the write of
    the checkpoint at step 12 meets ENOSPC."""
    mount_point = work / "full_disk" / "tmpfs"
    mount_point.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        return {"skipped": f"mount -t tmpfs not permitted: {mounted.stderr.strip()}"}
    try:
        home = work / "full_disk"
        train = {"max_steps": 6, "valid_every": 6, "batch_tokens": 400, "progress": False}
        write_config(home, toy_config(corpus, mount_point / "run", train=train).to_dict())
        first = run_attempt([*NMT, "train", "config.yaml"], home, "first", None)
        if first.returncode != 0:
            return {"error": f"the first 6 steps failed: {first.stderr.strip().splitlines()[-1:]}"}
        last = mount_point / "run/checkpoints/last.pt"
        before = last.read_bytes()
        margin = (mount_point / "run/checkpoints/best.pt").stat().st_size // 2  # room for logs, not a checkpoint
        size = -(-(shutil.disk_usage(mount_point).used + margin) // 4096) * 4096
        shrunk = subprocess.run(["mount", "-o", f"remount,size={size}", str(mount_point)], capture_output=True,
                                text=True)
        if shrunk.returncode != 0:
            return {"skipped": f"remounting the tmpfs smaller failed: {shrunk.stderr.strip()}"}
        full = run_attempt([*NMT, "train", "config.yaml", "--resume", "--set", "train.max_steps=12"], home, "full",
                           None)
        error_lines = [line for line in full.stderr.splitlines() if line.startswith("error:")]
        try:
            loadable = load_checkpoint(last)["progress"]["step"] == 6 and last.read_bytes() == before
        except NMTError:
            loadable = False
        ok = (full.returncode == 2 and len(error_lines) == 1 and "No space left on device" in error_lines[0]
              and loadable and "Traceback" not in full.stderr)
        return {"ok": ok, "exit_code": full.returncode, "error_lines": error_lines,
                "previous_last_pt_loadable_and_unchanged": loadable, "traceback": "Traceback" in full.stderr,
                "tmpfs_bytes": size}
    finally:
        subprocess.run(["umount", str(mount_point)], capture_output=True)


# --- entry point -----------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5, help="SIGKILLs per job")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", nargs="+", default=["train", "distill", "recipe", "full_disk"],
                        choices=["train", "distill", "recipe", "full_disk"])
    parser.add_argument("--work-dir", help="keep the run folders here (default: a temporary folder, removed)")
    args = parser.parse_args()
    if args.work_dir and Path(args.work_dir).is_dir() and any(Path(args.work_dir).iterdir()):
        parser.error(f"--work-dir {args.work_dir}: not empty (runs left there would be resumed, not redone)")
    rng = random.Random(args.seed)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="fault_injection-")).resolve()
    try:
        corpus = write_reversal_corpus(work / "corpus")
        small_corpus = write_reversal_corpus(work / "small_corpus", (("train", 1000), ("dev", 60), ("test", 40)))
        report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "kills_per_job": args.kills,
                                  "seed": args.seed}
        if "train" in args.jobs or "distill" in args.jobs:
            report["train"] = job_report(train_job(corpus), work, args.kills, rng)
        if "distill" in args.jobs:
            teacher = work / "train" / "uninterrupted" / "run"
            report["distill"] = job_report(distill_job(corpus, teacher), work, args.kills, rng)
        if "recipe" in args.jobs:
            report["recipe"] = job_report(recipe_job(small_corpus), work, args.kills, rng)
        if "full_disk" in args.jobs:
            report["enospc"] = full_disk_check(corpus, work)
        print(json.dumps(report, indent=2))
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
