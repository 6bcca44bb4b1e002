"""The chat page at `/` in a real browser: Debian's Chromium driven by Playwright, against a
real `ember serve` with an API key and the default model.

`EMBER_SCREENSHOT=docs/chat-page.png` also saves the page after a streamed reply (the
README's picture).
"""

from __future__ import annotations

import json
import os
import shutil
import time

import httpx
import pytest
from conftest import ONE_THREAD
from playwright.sync_api import Page, expect, sync_playwright

from server_utils import ServerProcess

KEY = "sk-page-test-key"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess("--max-model-len", "1024", "--kv-cache-memory", "60000000",
                         "--enforce-eager", api_key=KEY, env=ONE_THREAD)
    yield proc.wait_ready()
    proc.stop()


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM, "no chromium on PATH: `make install` installs Debian's (apt-get)"
    with sync_playwright() as p:
        # As root, Chromium's sandbox cannot start; the page is our own.
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server) -> Page:
    context = browser.new_context(viewport={"width": 1100, "height": 720})
    page = context.new_page()
    page.goto(server.url + "/")  # the page itself needs no key
    yield page
    context.close()


def use_key(page: Page, key: str) -> None:
    page.fill("#api-key", key)
    page.dispatch_event("#api-key", "change")


def model_name(server: ServerProcess) -> str:
    r = httpx.get(f"{server.url}/v1/models", headers=server.headers, timeout=10)
    return r.json()["data"][0]["id"]


def test_streamed_reply_with_its_figures(page, server):
    use_key(page, KEY)
    expect(page.locator("#model")).to_have_text(model_name(server))
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "40")
    page.fill("#system", "You are a concise assistant.")
    page.fill("#prompt", "Name three colours.")
    page.press("#prompt", "Enter")
    reply = page.locator(".message.assistant").last
    # Seen while streaming: some text, the reply not finished yet.
    page.wait_for_function("""() => {
        const r = document.querySelector('.message.assistant.streaming .content');
        return r && r.textContent.length > 0;
    }""", timeout=120_000)
    partial = reply.locator(".content").text_content()
    stats = reply.locator(".stats")
    expect(stats).to_contain_text("tok/s", timeout=120_000)
    final = reply.locator(".content").text_content()
    assert len(final) > len(partial) and final.startswith(partial)
    text = stats.text_content()
    for part in ("tokens", "TTFT", " J (", "CPU", "$", "gCO2e"):
        assert part in text, text
    assert "to the first token" not in text  # the stream's closing figures arrived
    # The key is kept in this browser's storage.
    assert page.evaluate("localStorage.getItem('ember.apiKey')") == KEY
    if os.environ.get("EMBER_SCREENSHOT"):
        page.screenshot(path=os.environ["EMBER_SCREENSHOT"])


def test_stop_aborts_the_request_on_the_server(page, server):
    aborted = server.metric("ember:request_aborted_total")
    use_key(page, KEY)
    page.fill("#max-tokens", "600")
    page.fill("#prompt", "Write a long story about a dragon who learns to bake bread.")
    page.click("#send")
    page.wait_for_function("""() => {
        const r = document.querySelector('.message.assistant.streaming .content');
        return r && r.textContent.length > 0;
    }""", timeout=120_000)
    page.click("#stop")
    expect(page.locator(".message.assistant .stats").last).to_contain_text("stopped")
    expect(page.locator("#stop")).to_be_hidden()
    deadline = time.monotonic() + 60
    while server.metric("ember:request_aborted_total") == aborted:
        assert time.monotonic() < deadline, "the server did not abort the request"
        time.sleep(0.2)
    assert "finish reason abort" in server.log()


def test_wrong_key_shows_the_401(page, server):
    use_key(page, "sk-wrong")
    expect(page.locator("#model")).to_contain_text("HTTP 401")
    page.fill("#prompt", "Hello?")
    page.press("#prompt", "Enter")
    error = page.locator(".message.error")
    expect(error).to_contain_text("HTTP 401: invalid or missing API key")
    expect(page.locator("#prompt")).to_have_value("Hello?")  # given back to retry


def test_markup_in_messages_is_text(page, server):
    """A reply with HTML and script in it (the stream is the server's shape, served by the
    browser's network layer so that the reply says exactly this) and the user's own message
    are shown as text: no element is created, no script runs."""
    evil = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'
    chunk = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0,
             "model": "m", "choices": [{"index": 0, "delta": {"content": evil},
                                        "finish_reason": "stop"}]}
    body = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, body=body, headers={"Content-Type": "text/event-stream"}))
    use_key(page, KEY)
    page.fill("#prompt", "<b>bold?</b><script>window.pwned = 3</script>")
    page.press("#prompt", "Enter")
    reply = page.locator(".message.assistant .content").last
    expect(reply).to_have_text(evil)
    expect(page.locator(".message.user .content").last).to_have_text(
        "<b>bold?</b><script>window.pwned = 3</script>")
    assert page.locator("#conversation script, #conversation img, #conversation b").count() == 0
    assert page.evaluate("window.pwned") is None
