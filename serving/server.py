"""server.py — `nmt serve`: an HTTP translation server (FastAPI + uvicorn) over any backend's `Translator`.

Requests are queued and decoded together (dynamic batching up to `max_batch` sentences or `max_wait_ms`), in one
inference thread. Oversize bodies (before parsing), requests and sentences get 413, slow bodies 408, a full queue
429 with Retry-After, shutdown 503, all with a JSON error, never a crash or a stack trace; a client that
disconnects has its sentences left out of their batch. `GET /` is a translation page (serving/page.html: one
self-contained file, no CDN) drawing each sentence's attention map from `"alignments": true` answers. `/health`,
Prometheus `/metrics`, `/openapi.json`; shutdown finishes the requests in flight. No model or search here."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from nmt.errors import NMTError
from nmt.translate import Translation, Translator

PAGE = Path(__file__).with_name("page.html")


@dataclass(frozen=True)
class Limits:
    max_batch: int = 32  # sentences decoded together
    max_wait_ms: float = 10.0  # how long the first request of a batch waits for company
    max_request_sentences: int = 64
    max_chars: int = 2000  # longest sentence accepted
    max_queue: int = 256  # sentences admitted (waiting or decoding) before 429
    max_beam: int = 32
    max_body_bytes: int = 1 << 20  # larger request bodies get 413 before they are parsed
    body_timeout_s: float = 30.0  # a client that has not sent its whole body by then gets 408


class RequestError(Exception):
    """A request the server refuses: HTTP status and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    lines: list[str]
    beam_size: int | None
    alignments: bool
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


class Metrics:
    """Prometheus metrics in a registry of their own (several apps may live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("nmt_requests", "HTTP translation requests by status", ["status"],
                                registry=self.registry)
        self.sentences = Counter("nmt_sentences", "sentences translated", registry=self.registry)
        self.latency = Histogram("nmt_request_seconds", "request latency (queue + decoding)", registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.batch = Histogram("nmt_batch_sentences", "sentences per decoding batch", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.queue = Gauge("nmt_queue_sentences", "sentences admitted and not yet answered", registry=self.registry)
        self.dropped = Counter("nmt_dropped_sentences", "sentences left out of their batch: the client had gone",
                               registry=self.registry)


class TranslateRequest(BaseModel):
    """POST /translate's body (what /openapi.json describes; parsed strictly: no type coercion, no extra keys)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    text: list[str] = Field(min_length=1, description="the sentences to translate, one translation each")
    beam_size: int | None = Field(None, ge=1, description="beam width, 1 = greedy search; default: the model's")
    alignments: bool = Field(False, description="also return each sentence's attention weights and word alignment")

    @field_validator("beam_size", mode="before")
    @classmethod
    def _integral_number(cls, value: Any) -> Any:
        """5.0 is a JSON Schema "integer" (what /openapi.json promises); strict parsing alone would refuse it."""
        return int(value) if isinstance(value, float) and value.is_integer() else value


class SentenceAlignment(BaseModel):
    alignment: list[tuple[int, int]] = Field(description="(source word, output word) pairs, whitespace words")
    source_pieces: list[str] = Field(description="the source's SentencePiece pieces (attention columns)")
    target_pieces: list[str] = Field(description="the output's pieces (attention rows)")
    attention: list[list[float]] = Field(description="weights [output piece][source piece]")


class TranslateResponse(BaseModel):
    translations: list[str] = Field(description="one translation per sentence, in order")
    alignments: list[SentenceAlignment] | None = Field(None, description='with "alignments": true, per sentence')


def alignment_json(translation: Translation) -> dict[str, Any]:
    """A SentenceAlignment of one translation (weights rounded to 4 decimals: what a heat map needs)."""
    attention = translation.attention
    return {"alignment": translation.alignment(), "source_pieces": translation.source_pieces or [],
            "target_pieces": translation.target_pieces or [],
            "attention": [] if attention is None else attention.float().mul(1e4).round().div(1e4).tolist()}


class ErrorResponse(BaseModel):
    error: str = Field(description="what was wrong, in one line")


def request_schema(limits: Limits) -> dict[str, Any]:
    """TranslateRequest's JSON schema with this server's limits in it, so that /openapi.json describes exactly the
    bodies that are accepted."""
    schema = TranslateRequest.model_json_schema()
    text, beam = schema["properties"]["text"], schema["properties"]["beam_size"]
    text["maxItems"] = limits.max_request_sentences
    text["items"]["maxLength"] = limits.max_chars
    next(option for option in beam["anyOf"] if option.get("type") == "integer")["maximum"] = limits.max_beam
    return schema


def parse_request(body: bytes, limits: Limits) -> TranslateRequest:
    """The request, or RequestError: 400 not JSON, 422 bad fields, 413 too large."""
    try:
        request = TranslateRequest.model_validate_json(body)
    except ValidationError as err:
        first = err.errors()[0]
        if first["type"] == "json_invalid":  # also invalid UTF-8 and nesting too deep for the parser
            raise RequestError(400, f"request body is not valid JSON ({first['msg']})") from None
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise RequestError(422, f"{where}: {first['msg']} (expected {{\"text\": [...], \"beam_size\": K, "
                                f"\"alignments\": false}})") from None
    text, beam = request.text, request.beam_size
    if beam is not None and beam > limits.max_beam:
        raise RequestError(422, f'"beam_size" must be an integer from 1 to {limits.max_beam}')
    if len(text) > limits.max_request_sentences:
        raise RequestError(413, f"{len(text)} sentences in one request; at most {limits.max_request_sentences}")
    longest = max(len(t) for t in text)
    if longest > limits.max_chars:
        raise RequestError(413, f"a sentence has {longest} characters; at most {limits.max_chars}")
    return request


async def read_body(request: Request, limits: Limits) -> bytes:
    """The request body, or RequestError: 413 when it is (or declares itself) over max_body_bytes, before any of it
    is parsed; 408 when it has not all arrived within body_timeout_s."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise RequestError(413, f"request body of {int(declared)} bytes; at most {limits.max_body_bytes}")

    async def receive() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise RequestError(413, f"request body over {limits.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(receive(), limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise RequestError(408, f"request body not received within {limits.body_timeout_s:g} s") from None


class Batcher:
    """Admits jobs, groups queued jobs into batches, decodes them in one inference thread, answers each job."""

    def __init__(self, translator: Translator, limits: Limits, metrics: Metrics) -> None:
        self.translator, self.limits, self.metrics = translator, limits, metrics
        self.waiting: deque[Job] = deque()
        self.wakeup = asyncio.Event()
        self.pending = 0  # sentences admitted and not yet answered
        self.closing = False
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nmt-decode")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    def submit(self, lines: list[str], beam_size: int | None, alignments: bool = False) -> asyncio.Future:
        if self.closing:
            raise RequestError(503, "the server is shutting down")
        if len(lines) > self.limits.max_queue:  # would never fit: a 429 would be retried forever
            raise RequestError(413, f"{len(lines)} sentences in one request; the queue holds {self.limits.max_queue}")
        if self.pending + len(lines) > self.limits.max_queue:
            raise RequestError(429, f"queue full ({self.pending} sentences waiting; at most {self.limits.max_queue})")
        job = Job(lines, beam_size, alignments, asyncio.get_running_loop().create_future())
        self.pending += len(lines)
        self.metrics.queue.set(self.pending)
        self.waiting.append(job)
        self.wakeup.set()
        return job.future

    async def _next_batch(self) -> list[Job]:
        """Wait for a job, then up to max_wait_ms for more, until max_batch sentences."""
        while not self.waiting:
            self.wakeup.clear()
            await self.wakeup.wait()
        deadline = time.perf_counter() + self.limits.max_wait_ms / 1000
        batch = [self.waiting.popleft()]
        size = len(batch[0].lines)
        while size < self.limits.max_batch:
            if self.waiting:
                if size + len(self.waiting[0].lines) > self.limits.max_batch:
                    break
                job = self.waiting.popleft()
                batch.append(job)
                size += len(job.lines)
                continue
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            self.wakeup.clear()
            try:
                await asyncio.wait_for(self.wakeup.wait(), left)
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            groups: dict[tuple[int | None, bool], list[Job]] = {}
            for job in batch:
                if job.future.cancelled():  # its client has gone: nothing to decode
                    self.pending -= len(job.lines)
                    self.metrics.dropped.inc(len(job.lines))
                    continue
                groups.setdefault((job.beam_size, job.alignments), []).append(job)
            self.metrics.queue.set(self.pending)
            for (beam, alignments), jobs in groups.items():
                await self._decode(jobs, beam, alignments)

    async def _decode(self, jobs: list[Job], beam: int | None, alignments: bool) -> None:
        lines = [line for job in jobs for line in job.lines]
        self.metrics.batch.observe(len(lines))
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self.executor, self._translate, lines, beam, alignments)
        except Exception as err:  # noqa: BLE001 — answer every job (500), keep serving
            results, error = None, err
        start = 0
        for job in jobs:
            if not job.future.done():
                if results is None:
                    job.future.set_exception(error)
                else:
                    job.future.set_result(results[start: start + len(job.lines)])
            start += len(job.lines)
            self.pending -= len(job.lines)
        self.metrics.queue.set(self.pending)

    def _translate(self, lines: list[str], beam: int | None, alignments: bool) -> list[Translation]:
        return [nbest[0] for nbest in self.translator.translate(lines, alignments, beam_size=beam, nbest=1)]

    async def drain(self) -> None:
        """Refuse new jobs, let admitted ones finish, then stop the worker and the inference thread."""
        self.closing = True
        while self.pending:
            await asyncio.sleep(0.01)
        if self.task is not None:
            self.task.cancel()
        self.executor.shutdown(wait=True)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def answer_or_cancel(request: Request, future: asyncio.Future) -> Any:
    """The job's result; if the client disconnects first, the job is cancelled (left out of its batch when that has
    not been decoded yet) and ClientGone raised."""
    while not future.done():
        await asyncio.wait({future}, timeout=0.1)
        if not future.done() and await request.is_disconnected():
            future.cancel()
            raise ClientGone
    return future.result()


def _error(status: int, message: str) -> JSONResponse:
    """A JSON error; a 429 also says when to retry."""
    return JSONResponse({"error": message}, status_code=status, headers={"Retry-After": "1"} if status == 429 else None)


def create_app(translator: Translator, limits: Limits | None = None, backend: str = "") -> FastAPI:
    """The FastAPI app: GET / (the page), POST /translate, GET /health, GET /metrics; batching starts with the app's
    lifespan."""
    limits = limits or Limits()
    metrics = Metrics()
    page_html = PAGE.read_text(encoding="utf-8")
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["batcher"] = Batcher(translator, limits, metrics)
        state["batcher"].start()
        yield
        await state["batcher"].drain()

    app = FastAPI(title="nmt", lifespan=lifespan)

    @app.post("/translate", response_model=TranslateResponse,
              responses={status: {"model": ErrorResponse} for status in (400, 408, 413, 422, 429, 500, 503)},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": request_schema(limits)}}}})
    async def translate(request: Request) -> Response:
        """Translate the sentences of `text` (decoded together with other requests' sentences)."""
        start = time.perf_counter()
        try:
            asked = parse_request(await read_body(request, limits), limits)
            lines = asked.text
            translations = await answer_or_cancel(request, state["batcher"].submit(lines, asked.beam_size,
                                                                                   asked.alignments))
        except ClientGone:
            metrics.requests.labels("499").inc()  # nginx's "client closed request"; nobody reads the answer
            return Response(status_code=499)
        except RequestError as err:
            metrics.requests.labels(str(err.status)).inc()
            return _error(err.status, str(err))
        except NMTError as err:
            metrics.requests.labels("400").inc()
            return _error(400, str(err))
        except Exception as err:  # noqa: BLE001 — a bug in decoding: answer 500, keep serving
            metrics.requests.labels("500").inc()
            return _error(500, f"translation failed: {type(err).__name__}: {err}")
        metrics.requests.labels("200").inc()
        metrics.sentences.inc(len(lines))
        metrics.latency.observe(time.perf_counter() - start)
        answer: dict[str, Any] = {"translations": [t.text for t in translations]}
        if asked.alignments:
            answer["alignments"] = [alignment_json(t) for t in translations]
        return JSONResponse(answer)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> Response:
        """The translation page: a text box, a beam size, the translations and their attention maps."""
        return HTMLResponse(page_html)

    @app.get("/health")
    async def health() -> Response:
        batcher = state.get("batcher")
        if batcher is None or batcher.closing:
            return _error(503, "not serving")
        return JSONResponse({"status": "ok", "backend": backend, "queued_sentences": batcher.pending})

    @app.get("/metrics", response_class=PlainTextResponse)  # documents text/plain, Prometheus' exposition format
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def run_serve(model: str, backend: str = "onnxruntime", device: str = "cpu", host: str = "127.0.0.1",
              port: int = 8000, max_batch: int = 32, max_wait_ms: float = 10.0, max_request_sentences: int = 64,
              max_chars: int = 2000, max_queue: int = 256) -> None:
    """`nmt serve`: load the model on the backend, serve until SIGINT/SIGTERM, finishing requests in flight."""
    import uvicorn

    from serving.backends import open_translator

    if max_wait_ms < 0:
        raise NMTError(f"--max-wait-ms must be >= 0, got {max_wait_ms}")
    translator = open_translator(model, backend, device)
    limits = Limits(max_batch, max_wait_ms, max_request_sentences, max_chars, max_queue)
    app = create_app(translator, limits, backend)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=60)
