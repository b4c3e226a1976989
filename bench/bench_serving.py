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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _load(url: str, lines: list[str], requests: int, clients: int) -> list[float]:
    import httpx

    latencies: list[float] = []

    async def client(worker: int, http: httpx.AsyncClient) -> None:
        for i in range(worker, requests, clients):
            start = time.perf_counter()
            response = await http.post("/translate", json={"text": [lines[i % len(lines)]], "beam_size": 1})
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)

    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        await asyncio.gather(*(client(w, http) for w in range(clients)))
    return latencies


def server_row(export_dir: str, lines: list[str], requests: int, clients: int) -> dict:
    """Serve the ONNX Runtime fp32 backend on loopback and load it with `clients` concurrent clients."""
    import uvicorn

    from serving.backends import open_translator
    from serving.server import Limits, create_app

    translator = open_translator(export_dir, "onnxruntime", "cpu")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(translator, Limits(max_batch=32, max_wait_ms=5)),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        start = time.perf_counter()
        latencies = asyncio.run(asyncio.wait_for(_load(f"http://127.0.0.1:{port}", lines, requests, clients), 600))
        elapsed = time.perf_counter() - start
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    quantiles = statistics.quantiles(latencies, n=100)
    return {"backend": "server onnxruntime-fp32", "threads": torch.get_num_threads(), "requests": requests,
            "clients": clients, "sentences_per_s": round(requests / elapsed, 1),
            "p50_ms": round(1000 * quantiles[49], 1), "p99_ms": round(1000 * quantiles[98], 1)}


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
