"""The web page at GET / in a real browser: Debian's chromium, headless, driven by Playwright (setup.sh installs
both). A sentence typed into the box comes back as `nmt translate` gives it, with a heat map of one row per
output piece; empty and over-long input show the server's message; keyboard use works. The page's screenshot is
saved under test-artifacts/."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from serving.server import Limits
from tests.test_server import running

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="module")
def browser_page(translator):
    from playwright.sync_api import sync_playwright

    assert shutil.which(CHROMIUM), f"{CHROMIUM} is missing: apt-get install chromium (setup.sh does)"
    with running(translator, Limits(max_chars=60, max_wait_ms=5)) as (url, _), sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1000, "height": 800})
        page.set_default_timeout(20_000)
        page.goto(url + "/")
        yield page
        browser.close()


@pytest.fixture(scope="module")
def translator(toy_run):
    from serving.backends import open_translator

    return open_translator(str(toy_run), "torch", "cpu")


def test_typed_sentences_come_back_as_nmt_translate_gives_them_with_their_heat_maps(browser_page, translator,
                                                                                   toy_corpus):
    lines = (toy_corpus / "test.src").read_text().splitlines()[:3]
    want = [n[0] for n in translator.translate(lines, beam_size=3)]
    page = browser_page
    assert page.title().startswith("nmt")
    page.get_by_label("Text to translate").fill("\n".join(lines))
    page.get_by_label("Beam size").select_option("3")
    page.get_by_role("button", name="Translate").click()
    page.locator("article.sentence").nth(2).wait_for()
    assert page.locator(".translation").all_inner_texts() == [t.text for t in want]
    tables = page.locator("table.heat")
    assert tables.count() == len(lines)
    for i, translation in enumerate(want):
        assert tables.nth(i).locator("tbody tr").count() == len(translation.tokens)  # one row per output piece
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-page.png"), full_page=True)
    assert (ARTIFACTS / "web-page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_empty_and_over_long_input_show_the_server_s_message(browser_page):
    page, error = browser_page, browser_page.locator("#error")
    page.get_by_label("Text to translate").fill("")
    page.get_by_role("button", name="Translate").click()
    error.filter(has_text="HTTP 422").wait_for()
    assert "at least 1 item" in error.inner_text()
    page.get_by_label("Text to translate").fill("a " * 40)  # 80 characters; the server takes 60
    page.get_by_role("button", name="Translate").click()
    error.filter(has_text="HTTP 413").wait_for()
    assert "at most 60" in error.inner_text()


def test_the_keyboard_alone_translates(browser_page, toy_corpus):
    line = (toy_corpus / "test.src").read_text().splitlines()[5]
    page = browser_page
    page.get_by_label("Text to translate").focus()
    page.keyboard.press("Control+A")
    page.keyboard.type(line)
    page.keyboard.press("Control+Enter")
    page.locator(".source", has_text=line).wait_for()
    assert page.locator("#error").inner_text() == ""
