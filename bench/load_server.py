"""load_server.py — end-to-end load benchmark of `nmt serve` (ONNX Runtime backend, subprocess on loopback): N requests
of 1–4 sentences from C concurrent clients, every answer checked against `nmt translate` on the same export, then a
schemathesis run against /openapi.json. Prints one JSON object. Not part of the test suite; writes only to a
temporary folder.

  OMP_NUM_THREADS=1 .venv/bin/python bench/load_server.py [--requests 1000 --clients 50] [--export DIR | --model RUN]
Without --model/--export it trains the toy reversal model of the tests (about 15 s on 2 cores) and exports it.
The schemathesis part needs `.venv/bin/pip install schemathesis` (4.x, CLI `st`; not a project dependency); without
it the JSON says "skipped". A 429 is retried after its Retry-After (counted apart); any other non-200 is an error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO), str(REPO / "tests")]

from bench_serving import free_port, latency_ms, load_server  # noqa: E402
from conftest import toy_config, write_reversal_corpus  # noqa: E402  (the tests' toy task, as in fault_injection.py)

NMT = [sys.executable, "-m", "nmt.cli"]
# schemathesis' default statuses for rejecting invalid data, plus 413: the server refuses a request over its limits
# (too many sentences, a sentence too long; both in /openapi.json) with 413 Content Too Large, by design
SCHEMATHESIS_CONFIG = """[checks.negative_data_rejection]
expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429, "5xx"]
"""


def train_toy_model(corpus: Path, out_dir: Path) -> Path:
    """A run folder with the toy model trained as the tests' `toy_run` fixture trains it."""
    from nmt.train import Trainer

    Trainer(toy_config(corpus, out_dir), quiet=True).train()
    return out_dir


def prepare_export(args: argparse.Namespace, work: Path, corpus: Path) -> Path:
    """The export folder to serve: --export as given, else --model (or the freshly trained toy model) exported."""
    if args.export:
        return Path(args.export)
    from serving.export import run_export

    model = args.model or str(train_toy_model(corpus, work / "run"))
    run_export(model, str(work / "export"))
    return work / "export"


def draw_payloads(lines: list[str], requests: int, beam_size: int | None, seed: int) -> list[dict]:
    """`requests` bodies for POST /translate, each of 1–4 distinct sentences drawn from `lines`."""
    rng = random.Random(seed)
    payloads = []
    for _ in range(requests):
        payload: dict = {"text": rng.sample(lines, rng.randint(1, min(4, len(lines))))}
        if beam_size is not None:
            payload["beam_size"] = beam_size
        payloads.append(payload)
    return payloads


def reference_translations(export: Path, lines: list[str], beam_size: int | None, work: Path) -> dict[str, str]:
    """What `nmt translate` on the same export and backend says for each line (one run over all of them)."""
    source, target = work / "distinct.src", work / "distinct.hyp"
    source.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    beam = ["--beam-size", str(beam_size)] if beam_size is not None else []
    subprocess.run([*NMT, "translate", "--model", str(export), "--backend", "onnxruntime", *beam,
                    "--input", str(source), "--output", str(target)], check=True)
    return dict(zip(lines, target.read_text(encoding="utf-8").splitlines(), strict=True))


def start_server(export: Path, port: int, max_queue: int | None, log: Path) -> subprocess.Popen:
    queue = ["--max-queue", str(max_queue)] if max_queue is not None else []
    with log.open("wb") as out:  # the server writes to its own copy of the file descriptor
        return subprocess.Popen([*NMT, "serve", "--model", str(export), "--backend", "onnxruntime",
                                 "--host", "127.0.0.1", "--port", str(port), *queue],
                                stdout=out, stderr=subprocess.STDOUT)


def wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    """Return once GET /health answers 200; exit with the server's log tail if it dies or takes too long."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    tail = log.read_text(encoding="utf-8", errors="replace")[-2000:]
    sys.exit(f"error: the server did not become healthy (exit status {server.poll()}):\n{tail}")


def stop_server(server: subprocess.Popen) -> None:
    """SIGINT, as Ctrl-C would: the server finishes what is in flight and exits."""
    server.send_signal(signal.SIGINT)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def mismatches(payloads: list[dict], answers: list[list[str] | None], reference: dict[str, str]) -> list[dict]:
    """Sentences whose served translation differs from `nmt translate`'s (unanswered requests are errors, not this)."""
    found = []
    for payload, answer in zip(payloads, answers):
        for line, served in zip(payload["text"], answer or []):
            if served != reference[line]:
                found.append({"source": line, "served": served, "nmt_translate": reference[line]})
    return found


def run_schemathesis(url: str, max_examples: int, seed: int, work: Path, timeout_s: float = 900) -> dict:
    """`st run URL/openapi.json --checks all` with at most `max_examples` test cases per operation and phase; what it
    found is read from its NDJSON event log, where every case's response and checks are recorded."""
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    if st is None:
        return {"skipped": "schemathesis not installed (.venv/bin/pip install schemathesis)"}
    events, config = work / "schemathesis.ndjson", work / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG, encoding="utf-8")
    command = [st, "--config-file", str(config), "run", f"{url}/openapi.json", "--checks", "all",
               "--max-examples", str(max_examples), "--seed", str(seed), "--workers", "1", "--request-timeout", "60",
               "--continue-on-failure", "--generation-database", "none", "--no-color",
               "--report", "ndjson", "--report-ndjson-path", str(events)]
    try:  # in `work`: nothing of schemathesis' is left in the caller's folder
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=work)
    except subprocess.TimeoutExpired:
        return {"exit_status": None, "error": f"schemathesis ran over {timeout_s:g} s"}
    if not events.is_file():  # it stopped before testing, e.g. the schema did not load
        return {"exit_status": done.returncode, "error": (done.stdout + done.stderr)[-1000:]}
    return {"exit_status": done.returncode, **schemathesis_findings(events)}


def schemathesis_findings(events: Path) -> dict:
    """Responses by status (5xx counted apart) and failed checks by code and operation, from the NDJSON events."""
    statuses: Counter[int] = Counter()
    failures: Counter[str] = Counter()
    for line in events.read_text(encoding="utf-8").splitlines():
        recorder = json.loads(line).get("ScenarioFinished", {}).get("recorder", {})
        for interaction in recorder.get("interactions", {}).values():
            if interaction.get("response"):
                statuses[interaction["response"]["status_code"]] += 1
        for checks in recorder.get("checks", {}).values():
            for check in checks:
                if check["status"] == "failure":
                    failure = check.get("failure_info", {}).get("failure", {})
                    failures[f"{failure.get('code', check['name'])} {failure.get('title', '')} "
                             f"({failure.get('operation', recorder.get('label'))})"] += 1
    return {"requests": sum(statuses.values()), "server_errors_5xx": sum(n for s, n in statuses.items() if s >= 500),
            "statuses": {str(s): n for s, n in sorted(statuses.items())}, "failures": dict(failures)}


def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", help="an `nmt export` folder to serve (default: export --model or the toy model)")
    parser.add_argument("--model", help="a run folder or checkpoint to export (default: train the toy model)")
    parser.add_argument("--input", help="sentences to draw requests from (default: the toy test set)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--beam-size", type=int, help="sent with every request (default: the model's)")
    parser.add_argument("--max-queue", type=int, help="the server's --max-queue (small values provoke 429s)")
    parser.add_argument("--timeout-s", type=float, default=300, help="for all requests together")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--schemathesis-examples", type=int, default=50, help="per operation; 0 = no schemathesis")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="nmt-load-") as tmp:
        work = Path(tmp)
        corpus = write_reversal_corpus(work / "corpus")
        source = Path(args.input) if args.input else corpus / "test.src"
        lines = sorted({line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()})
        export = prepare_export(args, work, corpus)
        payloads = draw_payloads(lines, args.requests, args.beam_size, args.seed)
        reference = reference_translations(export, sorted({t for p in payloads for t in p["text"]}), args.beam_size,
                                           work)

        url, log = f"http://127.0.0.1:{free_port()}", work / "server.log"
        server = start_server(export, int(url.rsplit(":", 1)[1]), args.max_queue, log)
        try:
            wait_healthy(url, server, log)
            start = time.perf_counter()
            load = asyncio.run(load_server(url, payloads, args.clients, args.timeout_s))
            wall_s = time.perf_counter() - start
            schema = (run_schemathesis(url, args.schemathesis_examples, args.seed, work)
                      if args.schemathesis_examples > 0 else {"skipped": "--schemathesis-examples 0"})
        finally:
            stop_server(server)

    wrong = mismatches(payloads, load.answers, reference)
    answered = sum(len(p["text"]) for p, a in zip(payloads, load.answers) if a is not None)
    print(json.dumps({
        "requests": args.requests, "clients": args.clients, "errors": len(load.failures),
        "error_kinds": dict(Counter(load.failures.values()).most_common(5)), "retries_429": load.retries_429,
        "sentences": answered, "mismatches": len(wrong), "mismatch_examples": wrong[:3],
        **latency_ms(load.latencies_s), "sentences_per_s": round(answered / wall_s, 1), "wall_s": round(wall_s, 2),
        "beam_size": args.beam_size, "schemathesis": schema, "server_exit_status": server.returncode,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_model(),
    }, indent=2))


if __name__ == "__main__":
    main()
