"""Property-based tests (hypothesis): whatever text comes in, translation keeps one line out per line in and never
raises; whatever bytes are posted to the server, the answer is never a 5xx."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.backends import open_translator
from serving.server import Limits
from tests.test_server import exported, running  # noqa: F401 — the export fixture and the server helper

# every code point, lone surrogates (what surrogateescape makes of bad bytes), controls and bidi marks included
ANY_CHARACTER = st.characters(codec=None, exclude_categories=())
LINES = st.lists(st.text(ANY_CHARACTER, max_size=60), max_size=6)
PROPERTY = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def toy_translator(toy_run):
    return open_translator(str(toy_run))


@PROPERTY
@given(lines=LINES, beam=st.sampled_from([1, 3]))
def test_any_text_gives_one_translation_per_line(toy_translator, lines, beam):
    lines = [line.replace("\n", " ") for line in lines]  # lines as a file would hold them
    results = toy_translator.translate(lines, beam_size=beam)
    assert len(results) == len(lines) and all(len(nbest) == 1 for nbest in results)
    assert all(isinstance(nbest[0].text, str) for nbest in results)


@pytest.fixture(scope="module")
def small_server(exported):  # noqa: F811
    with running(open_translator(str(exported), "onnxruntime", "cpu"), Limits(max_chars=200)) as (url, _):
        yield url


@PROPERTY
@given(body=st.one_of(st.binary(max_size=300),  # JSON of any strings, lone surrogates as \\udcff escapes
                      st.builds(lambda texts, beam: json.dumps({"text": texts, "beam_size": beam}).encode(),
                                LINES, st.integers(-3, 40))))
def test_any_bytes_posted_get_no_server_error(small_server, body):
    response = httpx.post(f"{small_server}/translate", content=body, headers={"content-type": "application/json"},
                          timeout=60)
    assert response.status_code < 500, response.text
    assert ("translations" if response.status_code == 200 else "error") in response.json()
