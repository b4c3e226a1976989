"""bench_serving.py — CPU throughput of the torch backend vs ONNX Runtime fp32 vs int8 (greedy and beam 5), and the
HTTP server's throughput and p50/p99 latency under a bounded loopback load. One run each; no tuning here.

  OMP_NUM_THREADS=1 python bench/bench_serving.py --model RUN_DIR --input test.src [--export DIR] [--json F]
Threads follow torch.get_num_threads() (OMP_NUM_THREADS), for torch and ONNX Runtime alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


def decode_speed(translator, lines: list[str], beam: int) -> float:
    """Sentences per second for one pass over `lines`."""
    translator.translate(lines[:4], beam_size=beam)  # warm-up
    start = time.perf_counter()
    translator.translate(lines, beam_size=beam)
    return len(lines) / (time.perf_counter() - start)


def backend_table(run_dir: str, export_dir: str, lines: list[str]) -> list[dict]:
    from serving.backends import open_translator
    from nmt.translate import Translator
    from serving.backends import open_backend

    rows = []
    torch_t = open_translator(run_dir, "torch", "cpu")
    decoders = {"torch": torch_t}
    for precision in ("fp32", "int8"):
        decoder, vocab, decode = open_backend(export_dir, "onnxruntime", "cpu", precision=precision)
        decoders[f"onnxruntime-{precision}"] = Translator(decoder, vocab, decode, "cpu")
    for name, translator in decoders.items():
        for beam in (1, 5):
            rows.append({"backend": name, "beam": beam, "threads": torch.get_num_threads(),
                         "sentences_per_s": round(decode_speed(translator, lines, beam), 1)})
    return rows


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LoadResult:
    """What a load run saw: each request's translations (None where it failed), the answered ones' latencies."""

    answers: list[list[str] | None]
    latencies_s: list[float] = field(default_factory=list)
    failures: dict[int, str] = field(default_factory=dict)  # request index -> why it got no answer
    retries_429: int = 0


async def load_server(url: str, payloads: list[dict], clients: int, timeout_s: float) -> LoadResult:
    """POST each payload to url/translate from `clients` concurrent clients (client w sends payloads w, w + clients,
    ...). A 429 is resent after its Retry-After; any other non-200, a transport error or an answer of the wrong shape
    fails the request, and so does no answer within timeout_s (for the whole run). A latency spans a request's first
    send to its answer, waits for 429s included."""
    import httpx

    result = LoadResult(answers=[None] * len(payloads))

    async def translate(http: httpx.AsyncClient, payload: dict) -> list[str]:
        while True:
            response = await http.post("/translate", json=payload)
            if response.status_code != 429:
                break
            result.retries_429 += 1
            await asyncio.sleep(_retry_after_s(response.headers.get("retry-after")))
        if response.status_code != 200:
            raise ValueError(f"HTTP {response.status_code}: {response.text[:120]}")
        body = response.json()
        translations = body.get("translations") if isinstance(body, dict) else None
        if not (isinstance(translations, list) and len(translations) == len(payload["text"])
                and all(isinstance(t, str) for t in translations)):
            raise ValueError(f"answer is not {len(payload['text'])} translations: {response.text[:120]}")
        return translations

    async def client(worker: int, http: httpx.AsyncClient) -> None:
        for i in range(worker, len(payloads), clients):
            start = time.perf_counter()
            try:
                result.answers[i] = await translate(http, payloads[i])
            except (httpx.HTTPError, ValueError) as err:  # JSONDecodeError is a ValueError
                result.failures[i] = f"{type(err).__name__}: {err}"
                continue
            result.latencies_s.append(time.perf_counter() - start)

    async with httpx.AsyncClient(base_url=url, timeout=timeout_s) as http:
        try:
            await asyncio.wait_for(asyncio.gather(*(client(w, http) for w in range(clients))), timeout_s)
        except TimeoutError:
            for i, answer in enumerate(result.answers):
                if answer is None and i not in result.failures:
                    result.failures[i] = f"no answer within {timeout_s:g} s"
    return result


def _retry_after_s(header: str | None) -> float:
    """Retry-After in seconds (our server sends whole seconds; an HTTP date or nothing counts as 1 s)."""
    try:
        return max(0.0, float(header or "1"))
    except ValueError:
        return 1.0


def latency_ms(latencies_s: list[float]) -> dict:
    """p50 and p99 in milliseconds (None when fewer than two requests were answered)."""
    if len(latencies_s) < 2:
        return {"p50_ms": None, "p99_ms": None}
    quantiles = statistics.quantiles(latencies_s, n=100)
    return {"p50_ms": round(1000 * quantiles[49], 1), "p99_ms": round(1000 * quantiles[98], 1)}


def server_row(export_dir: str, lines: list[str], requests: int, clients: int) -> dict:
    """Serve the ONNX Runtime fp32 backend on loopback and load it with `clients` concurrent clients."""
    import uvicorn

    from serving.backends import open_translator
    from serving.server import Limits, create_app

    translator = open_translator(export_dir, "onnxruntime", "cpu")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(translator, Limits(max_batch=32, max_wait_ms=5)),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    payloads = [{"text": [lines[i % len(lines)]], "beam_size": 1} for i in range(requests)]
    try:
        start = time.perf_counter()
        result = asyncio.run(load_server(f"http://127.0.0.1:{port}", payloads, clients, timeout_s=600))
        elapsed = time.perf_counter() - start
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    return {"backend": "server onnxruntime-fp32", "threads": torch.get_num_threads(), "requests": requests,
            "clients": clients, "errors": len(result.failures), "retries_429": result.retries_429,
            "sentences_per_s": round(len(result.latencies_s) / elapsed, 1), **latency_ms(result.latencies_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="run folder or checkpoint")
    parser.add_argument("--input", required=True, help="source sentences, one per line")
    parser.add_argument("--export", help="export folder with --int8 graphs (default: exported to a temp folder)")
    parser.add_argument("--lines", type=int, default=200)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    lines = [line for line in Path(args.input).read_text(encoding="utf-8").splitlines() if line.strip()][: args.lines]
    export_dir = args.export
    if export_dir is None or not (Path(export_dir) / "encoder.int8.onnx").is_file():
        from serving.export import run_export

        export_dir = export_dir or tempfile.mkdtemp(prefix="nmt-bench-")
        run_export(args.model, export_dir, int8=True)
    rows = backend_table(args.model, export_dir, lines)
    rows.append(server_row(export_dir, lines, args.requests, args.clients))
    for row in rows:
        print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
