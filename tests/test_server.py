"""Tests for serving/server.py: a real uvicorn server on a free loopback port over the ONNX Runtime backend."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import torch
import uvicorn

from serving.backends import open_translator
from serving.server import Limits, RequestError, create_app, parse_request
from tests.test_export import export_once

CLIENTS, REQUESTS = 20, 200


@pytest.fixture(scope="session")
def exported(toy_run, tmp_path_factory):
    return export_once(toy_run, tmp_path_factory)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def translator(exported):
    return open_translator(str(exported), "onnxruntime", "cpu")


@contextlib.contextmanager
def running(translator, limits: Limits) -> Iterator[tuple[str, uvicorn.Server]]:
    """The app under uvicorn in a thread on a free 127.0.0.1 port: (base URL, server); stopped (gracefully) at the
    end unless the test stopped it."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(translator, limits, "onnxruntime"), host="127.0.0.1", port=port,
                                           log_level="warning", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def server(translator) -> Iterator[str]:
    limits = Limits(max_batch=16, max_wait_ms=5, max_request_sentences=8, max_chars=100, max_queue=200,
                    max_body_bytes=64 * 1024, body_timeout_s=2)
    with running(translator, limits) as (url, _):
        yield url


def test_concurrent_requests_get_the_same_answers_as_nmt_translate(server, translator, toy_corpus):
    lines = (toy_corpus / "test.src").read_text().splitlines()[:50]
    expected = {line: n[0].text for line, n in zip(lines, translator.translate(lines, beam_size=1))}
    requests = [[lines[(i * 3 + j) % len(lines)] for j in range(1 + i % 3)] for i in range(REQUESTS)]

    async def client(worker: int, http: httpx.AsyncClient) -> list[tuple[list[str], dict]]:
        answers = []
        for texts in requests[worker::CLIENTS]:
            response = await http.post("/translate", json={"text": texts, "beam_size": 1})
            assert response.status_code == 200, response.text
            answers.append((texts, response.json()))
        return answers

    async def load() -> list[tuple[list[str], dict]]:
        async with httpx.AsyncClient(base_url=server, timeout=60) as http:
            results = await asyncio.gather(*(client(w, http) for w in range(CLIENTS)))
        return [answer for worker in results for answer in worker]

    start = time.monotonic()
    answers = asyncio.run(asyncio.wait_for(load(), timeout=120))
    assert len(answers) == REQUESTS and time.monotonic() - start < 120
    for texts, body in answers:
        assert body["translations"] == [expected[t] for t in texts]


def test_beam_requests_match_the_translator(server, translator):
    texts = ["a b c d", "l k j", ""]
    response = httpx.post(f"{server}/translate", json={"text": texts, "beam_size": 5}, timeout=30)
    assert response.status_code == 200
    assert response.json()["translations"] == [n[0].text for n in translator.translate(texts, beam_size=5)]


@pytest.mark.parametrize("body, status", [
    (b"{not json", 400),
    (b'["a"]', 422),
    (b'{"text": "a b c"}', 422),
    (b'{"text": [1, 2]}', 422),
    (b'{"text": []}', 422),
    (b'{"text": ["a"], "beam_size": "5"}', 422),
    (b'{"text": ["a"], "beam_size": 0}', 422),
    (b'{"text": ["a"], "extra": 1}', 422),
    (b'{"text": ["' + b"a " * 60 + b'"]}', 413),
    (b'{"text": ["a", "b", "c", "d", "e", "f", "g", "h", "i"]}', 413),
    (b"[" * 30000 + b"]" * 30000, 400),  # nested too deeply for the parser
    (b'{"text": ["a b"], "pad": "' + b"x" * 70000 + b'"}', 413),  # over max_body_bytes: refused unparsed
    (b'{"text": ["a \xff\xfe b"]}', 400),  # not UTF-8
])
def test_bad_requests_get_4xx_with_a_json_error(server, body, status):
    response = httpx.post(f"{server}/translate", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert isinstance(response.json()["error"], str)


def test_health_and_metrics(server):
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    httpx.post(f"{server}/translate", json={"text": ["a b"]}, timeout=30)
    metrics = httpx.get(f"{server}/metrics").text
    assert 'nmt_requests_total{status="200"}' in metrics and "nmt_request_seconds_bucket" in metrics
    assert "nmt_batch_sentences_count" in metrics


def test_alignments_come_back_when_asked_and_match_nmt_translate(server, translator, toy_corpus):
    lines = (toy_corpus / "test.src").read_text().splitlines()[:3]
    plain = httpx.post(f"{server}/translate", json={"text": lines, "beam_size": 2}, timeout=30).json()
    assert "alignments" not in plain
    answer = httpx.post(f"{server}/translate", json={"text": lines, "beam_size": 2, "alignments": True},
                        timeout=30).json()
    assert answer["translations"] == plain["translations"]
    for sentence, want in zip(answer["alignments"], [n[0] for n in translator.translate(lines, True, beam_size=2)]):
        assert [tuple(pair) for pair in sentence["alignment"]] == want.alignment()
        assert sentence["target_pieces"] == want.target_pieces and sentence["source_pieces"] == want.source_pieces
        assert torch.allclose(torch.tensor(sentence["attention"]), want.attention, atol=1e-4)
    refused = httpx.post(f"{server}/translate", json={"text": lines, "alignments": "yes"}, timeout=30)
    assert refused.status_code == 422 and "alignments" in refused.json()["error"]


def test_full_queue_refuses_with_429(translator):
    limits = Limits(max_queue=4)
    with pytest.raises(RequestError) as err:
        parse_request(b'{"text": ["a"], "beam_size": 99}', limits)
    assert err.value.status == 422

    async def overflow() -> tuple[int, list[str]]:
        from serving.server import Batcher, Metrics

        batcher = Batcher(translator, Limits(max_queue=4, max_wait_ms=50), Metrics())
        batcher.start()
        first = batcher.submit(["a b", "c d", "e f"], None)
        try:
            batcher.submit(["g h", "i j"], None)
        except RequestError as refused:
            status = refused.status
        result = await first
        await batcher.drain()
        return status, result

    status, result = asyncio.run(overflow())
    assert status == 429 and [t.text for t in result] == ["b a", "d c", "f e"]

    async def never_fits() -> int:
        from serving.server import Batcher, Metrics

        try:
            Batcher(translator, Limits(max_queue=4), Metrics()).submit(["a"] * 5, None)
        except RequestError as refused:
            return refused.status
        return 200

    assert asyncio.run(never_fits()) == 413  # not 429: no wait would let it in


def test_shutdown_finishes_requests_in_flight(translator):
    limits = Limits(max_wait_ms=400)  # the request is still waiting for its batch when shutdown begins
    with running(translator, limits) as (url, server):
        answer: dict = {}
        client = threading.Thread(target=lambda: answer.update(response=httpx.post(
            f"{url}/translate", json={"text": ["a b c"]}, timeout=30)))
        client.start()
        deadline = time.monotonic() + 20
        while httpx.get(f"{url}/health").json()["queued_sentences"] < 1:  # admitted, not yet decoded
            assert time.monotonic() < deadline, "the request was never admitted"
            time.sleep(0.01)
        server.should_exit = True
        client.join(timeout=30)
    assert answer["response"].status_code == 200 and answer["response"].json() == {"translations": ["c b a"]}


def test_a_client_that_stops_sending_its_body_gets_408_and_the_server_goes_on(server):
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as slow:
        slow.sendall(b"POST /translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"text\": [")  # then nothing more
        began, answer = time.monotonic(), b""
        while b"not received" not in answer and time.monotonic() - began < 20:  # headers and body may come apart
            chunk = slow.recv(65536)
            if not chunk:
                break
            answer += chunk
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 408") and "not received within 2 s" in answer
    assert time.monotonic() - began < 20
    assert httpx.post(f"{server}/translate", json={"text": ["a b"]}, timeout=30).json() == {"translations": ["b a"]}


def test_429_says_when_to_retry():
    from serving.server import _error

    assert _error(429, "queue full").headers["retry-after"] == "1"
    assert "retry-after" not in _error(413, "too large").headers


def test_openapi_describes_the_request_the_answer_and_the_errors(server):
    schema = httpx.get(f"{server}/openapi.json").json()
    operation = schema["paths"]["/translate"]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["text"] and set(body["properties"]) == {"text", "beam_size", "alignments"}
    assert body["additionalProperties"] is False
    answer = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].split("/")[-1]
    assert set(schema["components"]["schemas"][answer]["properties"]) == {"translations", "alignments"}
    assert "SentenceAlignment" in schema["components"]["schemas"]
    assert httpx.get(f"{server}/").headers["content-type"].startswith("text/html")
    assert {"400", "408", "413", "422", "429", "500", "503"} <= set(operation["responses"])


def test_a_client_that_disconnects_has_its_sentences_left_out_of_the_batch(translator):
    limits = Limits(max_wait_ms=1500)  # the request waits in the queue long enough for its client to leave
    with running(translator, limits) as (url, _):
        body = b'{"text": ["a b c", "d e"]}'
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as leaving:
            leaving.sendall(b"POST /translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            time.sleep(0.3)  # admitted, waiting for its batch; then the client goes
        answer = httpx.post(f"{url}/translate", json={"text": ["f g"]}, timeout=30)
        assert answer.json() == {"translations": ["g f"]}  # the others are served as before
        metrics = httpx.get(f"{url}/metrics").text
        assert "nmt_dropped_sentences_total 2.0" in metrics and 'nmt_requests_total{status="499"} 1.0' in metrics
