"""The web chat (web/) in a real browser: headless Chromium driven by Playwright, on the
page nginx serves at `/`, talking to the gateway through the same nginx.

Chromium is the Debian package (`scripts/bootstrap.sh --system` installs it; Playwright's
own browser download cannot run here); without it these tests fail with that message.
Nothing waits a fixed time to synchronise: the page is polled with deadlines, and what
the answer looked like while it streamed is recorded in the page by a MutationObserver.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from ragline_cli.processes import free_port, http_ready, nginx
from ragline_cli.stack import REPO_ROOT, Stack

from browser import CHROMIUM_ARGS, chromium_path
from service_helpers import gateway_env, metric, poll, running_service, write_keys

QUESTION = "How long does a sourdough starter take to double in volume after feeding?"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
WEB_ROOT = REPO_ROOT / "web"
TIMEOUT_MS = 60_000  # generous: CI machines have two cores and run the whole stack

# Records, at every change of the page, the last turn's answer length and state and how
# many sources the panel shows (performance.now() in ms).
RECORDER = """() => {
  window.__records = [];
  const record = () => {
    const turns = document.querySelectorAll('#conversation .turn');
    const turn = turns[turns.length - 1];
    if (!turn) return;
    window.__records.push({
      t: performance.now(),
      len: turn.querySelector('.answer').textContent.length,
      state: turn.dataset.state,
      sources: document.querySelectorAll('#sources li').length,
    });
  };
  new MutationObserver(record).observe(document.body,
    {subtree: true, childList: true, characterData: true, attributes: true});
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is not installed: run `make test` (it installs it)")
    executable = chromium_path()
    if executable is None:
        pytest.fail(
            "chromium not installed (looked for RAGLINE_TEST_CHROMIUM, chromium on PATH and "
            "/usr/bin/chromium): run `make test` (it installs the Debian package)"
        )
    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


class Chat:
    """One browser tab on the chat page, with what went wrong in it."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.page_errors: list[str] = []
        self.console: list[str] = []
        self.dialogs: list[str] = []
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))

        def on_dialog(dialog: Any) -> None:
            self.dialogs.append(dialog.message)
            dialog.dismiss()

        page.on("dialog", on_dialog)
        page.set_default_timeout(TIMEOUT_MS)

    def open(self, url: str) -> Any:
        response = self.page.goto(url)
        assert response is not None and response.status == 200
        self.page.wait_for_function("() => window.ragline !== undefined")
        return response

    def ask(self, question: str) -> None:
        self.page.fill("#question", question)
        self.page.press("#question", "Enter")

    def turn(self, index: int = -1) -> Any:
        turns = self.page.locator("#conversation .turn")
        return turns.nth(turns.count() - 1 if index == -1 else index)

    def wait_turn(self, *states: str, count: int | None = None) -> Any:
        """The last turn, once it is in one of `states` (and there are `count` turns)."""
        self.page.wait_for_function(
            """([states, count]) => {
                const turns = document.querySelectorAll('#conversation .turn');
                if (count !== null && turns.length !== count) return false;
                const last = turns[turns.length - 1];
                return !!last && states.includes(last.dataset.state);
            }""",
            arg=[list(states), count],
        )
        return self.turn()

    def answer_length(self) -> int:
        return int(
            self.page.evaluate(
                "() => { const a = document.querySelectorAll('#conversation .turn .answer');"
                " return a.length ? a[a.length - 1].textContent.length : 0; }"
            )
        )

    def assert_clean(self) -> None:
        """No uncaught error, no dialog, nothing refused by the CSP or Trusted Types (which
        would mean something tried to inject)."""
        assert self.page_errors == []
        assert self.dialogs == []
        refused = [m for m in self.console if "Content Security Policy" in m or "Trusted" in m]
        assert refused == []


@pytest.fixture()
def chat(browser: Any) -> Iterator[Chat]:
    context = browser.new_context(viewport={"width": 1200, "height": 850})
    try:
        yield Chat(context.new_page())
    finally:
        context.close()


def ingest(public_url: str, collection: str, documents: list[dict[str, Any]]) -> None:
    response = httpx.post(
        f"{public_url}/api/collections/{collection}/documents",
        json={"documents": documents},
        timeout=120,
    )
    assert response.status_code == 200, response.text


@contextmanager
def own_nginx(gateway: str, prefix: Path) -> Iterator[tuple[str, Any]]:
    """The repo's nginx serving web/, proxying to `gateway` (host:port), ready once the
    page itself answers (its /healthz is the gateway's, which may be down on purpose)."""
    port = free_port()
    proc = nginx(port, gateway, prefix, WEB_ROOT)
    url = f"http://127.0.0.1:{port}"
    proc.ready = http_ready(f"{url}/")
    proc.start()
    try:
        proc.wait_ready(30)
        yield url, proc
    finally:
        proc.stop()


def test_page_is_served_with_a_strict_policy(chat: Chat, public_url: str) -> None:
    response = chat.open(f"{public_url}/")
    headers = response.all_headers()
    csp = headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "require-trusted-types-for 'script'" in csp
    assert headers["x-content-type-options"] == "nosniff"
    for path, kind in (("/app.js", "text/javascript"), ("/app.css", "text/css")):
        r = httpx.get(f"{public_url}{path}", timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
    # Labels and live regions for assistive technology; focus starts in the question box.
    assert chat.page.get_attribute("#conversation", "aria-live") == "polite"
    assert chat.page.get_attribute("#status", "role") == "status"
    assert chat.page.locator("label[for=question]").count() == 1
    assert chat.page.evaluate("() => document.activeElement.id") == "question"
    assert chat.page.is_disabled("#stop")
    chat.assert_clean()


def test_answer_streams_with_sources_and_citations(chat: Chat, public_url: str) -> None:
    chat.open(f"{public_url}/")
    chat.page.evaluate(RECORDER)
    chat.ask(QUESTION)
    turn = chat.wait_turn("done", "error")
    assert turn.get_attribute("data-state") == "done", turn.inner_text()

    answer = turn.locator(".answer").inner_text()
    assert "four to eight hours" in answer
    records = chat.page.evaluate("() => window.__records")
    final = len(turn.locator(".answer").text_content())
    streaming = [r for r in records if r["state"] == "streaming" and r["len"] > 0]
    lengths = [r["len"] for r in streaming]
    # The answer grew in many steps while it streamed, never shrank, and ended complete.
    assert len(set(lengths)) >= 5, lengths
    assert lengths == sorted(lengths) and lengths[0] < final
    assert streaming[-1]["t"] - streaming[0]["t"] > 100, streaming
    # The sources were in the panel before the first word of the answer.
    assert all(r["sources"] > 0 for r in streaming)
    assert chat.page.locator("#sources li").count() >= 1

    # Citation [1] is a button: it highlights source 1 and brings it into view.
    cite = turn.locator("button.cite[data-n='1']").first
    assert cite.inner_text() == "1"
    cite.click()
    source = chat.page.locator("#source-1")
    chat.page.wait_for_function(
        """() => {
            const li = document.getElementById('source-1');
            const r = li.getBoundingClientRect();
            return li.classList.contains('highlight') && document.activeElement === li
                && r.top >= 0 && r.top < window.innerHeight;
        }"""
    )
    assert "Keeping a sourdough starter" in source.inner_text()
    assert "sourdough-starter.md" in source.inner_text()
    assert chat.page.locator("#sources li.highlight").count() == 1
    assert chat.page.locator("#status").inner_text() == "Answered."

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "web-chat-answer.png"
    chat.page.screenshot(path=str(shot))
    chat.page.set_viewport_size({"width": 390, "height": 844})  # a phone
    assert chat.page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    phone = ARTIFACTS / "web-chat-answer-phone.png"
    chat.page.screenshot(path=str(phone))
    assert shot.stat().st_size > 10_000 and phone.stat().st_size > 10_000
    chat.assert_clean()


def test_follow_up_keeps_the_conversation_and_new_chat_forgets_it(
    chat: Chat, public_url: str
) -> None:
    bodies: list[dict[str, Any]] = []
    chat.page.on(
        "request",
        lambda r: bodies.append(r.post_data_json) if r.url.endswith("/api/chat") else None,
    )
    chat.open(f"{public_url}/")
    chat.ask("What was the Pharos?")
    chat.wait_turn("done", count=1)
    chat.ask("When was it completed?")
    chat.wait_turn("done", count=2)
    assert "conversation_id" not in bodies[0]
    first_id = bodies[1]["conversation_id"]
    assert first_id and bodies[1]["message"] == "When was it completed?"

    chat.page.click("#new-chat")
    assert chat.page.locator("#conversation .turn").count() == 0
    assert chat.page.locator("#sources li").count() == 0
    assert chat.page.evaluate("() => document.activeElement.id") == "question"
    chat.ask("What is a tardigrade's tun?")
    chat.wait_turn("done", count=1)
    assert "conversation_id" not in bodies[2]
    # Shift+Enter is a new line, not a question.
    chat.page.fill("#question", "first line")
    chat.page.press("#question", "Shift+Enter")
    chat.page.keyboard.type("second line")
    assert chat.page.input_value("#question") == "first line\nsecond line"
    assert len(bodies) == 3
    chat.assert_clean()


def test_stop_aborts_the_answer_and_the_generation(
    chat: Chat, public_url: str, stack: Stack
) -> None:
    # One long sentence: about 150 words, 3 s at the stack's pace, so Stop lands mid-answer.
    words = " ".join(["and paper lanterns drift slowly past the old harbour walls"] * 15)
    text = f"The lantern festival of Quillon begins at sunset {words} until midnight."
    ingest(public_url, "webstop", [{"id": "quillon", "title": "Quillon", "text": text}])
    llm_url = f"http://127.0.0.1:{stack.config.llm_port}"
    before = metric(llm_url, "ragline_generation_aborts_total")

    chat.open(f"{public_url}/?collection=webstop")
    assert chat.page.locator("#collection-badge").inner_text() == "collection: webstop"
    chat.ask("What happens at the lantern festival of Quillon?")
    chat.page.wait_for_function(
        "() => { const a = document.querySelector('#conversation .turn .answer');"
        " return a && a.textContent.length > 0; }"
    )
    assert chat.page.is_enabled("#stop") and chat.page.is_disabled("#send")
    chat.page.keyboard.press("Escape")  # focus is still in the question box
    turn = chat.wait_turn("stopped", "done", "error")
    assert turn.get_attribute("data-state") == "stopped", turn.inner_text()
    assert "Stopped." in turn.locator(".notice-stopped").inner_text()
    assert chat.page.locator("#status").inner_text() == "Stopped."
    assert chat.page.is_disabled("#stop") and chat.page.is_enabled("#send")

    poll(
        lambda: metric(llm_url, "ragline_generation_aborts_total") >= before + 1,
        30,
        "llm-svc counted the aborted generation",
    )
    assert metric(llm_url, "ragline_generation_aborts_total") == before + 1
    # The text stopped growing and is well short of the whole answer.
    stopped_at = chat.answer_length()
    assert 0 < stopped_at < len(text) // 2
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        assert chat.answer_length() == stopped_at
        time.sleep(0.05)
    chat.assert_clean()


XSS_IMG = '<img src=x onerror="window.__pwned=1">'
XSS_SCRIPT = "<script>window.__pwned=1</script>"
XSS_DOCS = [
    {
        "id": "zephyr-hostile",
        "title": f"Zephyr {XSS_IMG}{XSS_SCRIPT} valve",
        "url": "javascript:window.__pwned=1",
        "text": (
            # One sentence, so that the answer (the sentence that best answers) holds it all.
            f"The zephyr valve opens at dawn {XSS_IMG} and closes at dusk {XSS_SCRIPT}; "
            "its manual is at [zephyr manual](javascript:window.__pwned=1) "
            "and at [the zephyr site](https://example.com/zephyr-valve) for everyone."
        ),
    },
    {
        "id": "zephyr-plain",
        "title": "Zephyr valve history",
        "url": "https://example.com/zephyr-history",
        "text": "The zephyr valve was designed in 1931 by a clockmaker from Lyon.",
    },
]


def test_documents_and_answers_cannot_inject_html(chat: Chat, public_url: str) -> None:
    ingest(public_url, "webxss", XSS_DOCS)
    chat.open(f"{public_url}/?collection=webxss")
    chat.ask("When does the zephyr valve open and close, and where is the zephyr valve manual?")
    turn = chat.wait_turn("done", "error")
    assert turn.get_attribute("data-state") == "done", turn.inner_text()
    page = chat.page

    assert page.evaluate("() => typeof window.__pwned") == "undefined"
    # The markup is shown as text, in the sources panel and in the answer.
    sources = page.locator("#sources").inner_text()
    assert XSS_IMG in sources and XSS_SCRIPT in sources
    answer = turn.locator(".answer").inner_text()
    assert XSS_IMG in answer and XSS_SCRIPT in answer
    assert page.locator("img, iframe, object, embed").count() == 0
    assert page.evaluate("() => document.scripts.length") == 1
    # Links: only http(s), with rel=noopener noreferrer; a javascript: link stays text.
    assert "[zephyr manual](javascript:window.__pwned=1)" in answer
    hrefs = page.eval_on_selector_all("a[href]", "els => els.map(e => e.getAttribute('href'))")
    assert hrefs and all(h.startswith(("https://", "http://", "#")) for h in hrefs), hrefs
    site = turn.locator("a", has_text="the zephyr site")
    assert site.get_attribute("href") == "https://example.com/zephyr-valve"
    assert site.get_attribute("rel") == "noopener noreferrer"
    hostile = page.locator("#sources li", has_text="Zephyr <img")
    assert hostile.locator("a").count() == 0  # its url is javascript:
    turn.get_by_text("zephyr manual", exact=False).first.click()
    hostile.click()
    assert page.evaluate("() => typeof window.__pwned") == "undefined"
    assert page.url == f"{public_url}/?collection=webxss"
    # A source with an http(s) URL is a link (asked for on its own: the relevance cut-off
    # leaves it out of the first answer, whose top source is far ahead of it).
    chat.ask("Who designed the zephyr valve in 1931?")
    poll(lambda: page.locator("#sources li", has_text="Zephyr valve history").count() > 0,
         60, "the history document among the sources")  # fmt: skip
    plain = page.locator("#sources li", has_text="Zephyr valve history").locator("a")
    assert plain.get_attribute("href") == "https://example.com/zephyr-history"
    assert plain.get_attribute("rel") == "noopener noreferrer"
    assert page.evaluate("() => typeof window.__pwned") == "undefined"
    chat.assert_clean()


MARKDOWN_CASES = [
    "**bold** and *italic* and `code <b>` [1]",
    "- one\n- two **2**\n\n1. first\n2. second",
    "```\n<script>window.__pwned=1</script>\n```",
    "[x](javascript:window.__pwned=1) [y](JAVASCRIPT:alert(1)) [z](data:text/html,<b>)",
    '[a](https://ok.example/?q="><img/src=x/onerror=window.__pwned=1>)',
    '[b](https://ok.example/x"onmouseover="window.__pwned=1)',
    "<svg onload=window.__pwned=1>",
    "<a href=javascript:window.__pwned=1>click</a>",
    "**<img src=x onerror=window.__pwned=1>** `<script>` *<iframe>*",
    "[<img src=x onerror=window.__pwned=1>](https://ok.example/)",
    "&lt;script&gt; &amp; \ue0000\ue001 [99] [1, 2]",
    "```\nunclosed fence <b>",
    "snake_case_name and x__y__z and __bold__ and a_b_c",
    "### Steps <i>\n1. mix [1]\n[x](https://a.example/`<c>`)",
]


def test_markdown_renderer_allows_only_a_safe_subset(chat: Chat, public_url: str) -> None:
    chat.open(f"{public_url}/")
    results = chat.page.evaluate(
        """(cases) => cases.map((text) => {
            const div = document.createElement('div');
            document.body.appendChild(div);
            window.ragline.renderInto(div, text, 2);
            const allowed = new Set(['P', 'STRONG', 'EM', 'CODE', 'PRE', 'UL', 'OL', 'LI', 'A',
                                     'BR', 'BUTTON', 'SPAN']);
            const bad = [];
            for (const node of div.querySelectorAll('*')) {
                if (!allowed.has(node.tagName)) bad.push(node.tagName);
                for (const attr of node.attributes) {
                    if (!['href', 'rel', 'target', 'class', 'type', 'data-n', 'aria-label',
                          'start'].includes(attr.name)) bad.push(attr.name);
                    if (attr.name === 'href' && !/^https?:\\/\\//i.test(attr.value))
                        bad.push(attr.value);
                }
            }
            const out = {text: div.textContent, html: div.innerHTML, bad,
                         links: [...div.querySelectorAll('a')].map((a) => a.href),
                         cites: [...div.querySelectorAll('button.cite')].map((b) => b.dataset.n)};
            div.remove();
            return out;
        })""",
        MARKDOWN_CASES,
    )
    for case, out in zip(MARKDOWN_CASES, results, strict=True):
        assert out["bad"] == [], (case, out)
    (
        basic,
        lists,
        fence,
        schemes,
        quote,
        quote2,
        svg,
        anchor,
        mixed,
        linked,
        amp,
        open_,
        snake,
        heading,
    ) = results
    assert "<strong>bold</strong>" in basic["html"] and "<em>italic</em>" in basic["html"]
    assert "<code>code &lt;b&gt;</code>" in basic["html"] and basic["cites"] == ["1"]
    assert "<ul><li>one</li><li>two <strong>2</strong></li></ul>" in lists["html"]
    assert "<ol><li>first</li><li>second</li></ol>" in lists["html"]
    assert fence["text"] == "<script>window.__pwned=1</script>"
    assert schemes["links"] == [] and schemes["text"] == MARKDOWN_CASES[3]
    assert [h.startswith("https://ok.example/") for h in quote["links"]] == [True]
    assert all('"' not in h for h in quote["links"] + quote2["links"])
    assert svg["text"] == MARKDOWN_CASES[6] and anchor["text"] == MARKDOWN_CASES[7]
    assert "<img" in mixed["text"] and "<iframe>" in mixed["text"]
    assert linked["links"] == ["https://ok.example/"] and "<img" in linked["text"]
    assert amp["text"].startswith("&lt;script&gt; &amp;") and amp["cites"] == ["1", "2"]
    assert "[99]" in amp["text"]
    assert open_["html"].startswith("<pre><code>") and "<b>" in open_["text"]
    assert snake["html"] == (
        "<p>snake_case_name and x__y__z and <strong>bold</strong> and a_b_c</p>"
    )
    assert heading["html"].startswith('<p class="heading"><strong>Steps &lt;i&gt;</strong></p><ol>')
    assert heading["links"] == [] and heading["cites"] == ["1"]
    assert chat.page.evaluate("() => typeof window.__pwned") == "undefined"
    chat.assert_clean()


SSE = "text/event-stream"


def sse(name: str, data: Any) -> str:
    return f"event: {name}\r\ndata: {orjson.dumps(data).decode()}\r\n\r\n"


SOURCES = {
    "sources": [
        {"n": 1, "doc_id": "a.md", "chunk_id": "a.md#0", "title": "Alpha", "url": "",
         "text": "Alpha passage.", "score": 0.9},
    ]
}  # fmt: skip
META = {"request_id": "rid-canned", "conversation_id": "conv-canned"}


@pytest.mark.parametrize(
    ("body", "state", "expected"),
    [
        (
            ": ping\r\n\r\n" + sse("meta", META) + sse("sources", SOURCES)
            + sse("token", {"text": "A **degraded** answer"}) + ": ping\r\n\r\n"
            + sse("token", {"text": " [1]."})
            + sse("done", {"usage": {}, "timings": {}, "degraded": ["rerank", "memory"],
                           "cached": True, "search_query": "alpha query"}),
            "done",
            ["Degraded answer", "reranker was unavailable", "memory was unavailable",
             "cached", "searched for: alpha query", "A degraded answer [1]."],
        ),
        (
            sse("meta", META) + sse("sources", SOURCES) + sse("token", {"text": "Half an"})
            + sse("error", {"code": "generation_failed", "message": "the model stopped"}),
            "error",
            ["Half an", "The answer failed: the model stopped (generation_failed)"],
        ),
        (
            sse("meta", META) + sse("sources", SOURCES) + sse("token", {"text": "Cut"}),
            "error",
            ["Cut", "closed before the answer was complete"],
        ),
    ],
    ids=["degraded-cached", "sse-error", "cut-off"],
)  # fmt: skip
def test_stream_outcomes_are_shown(
    chat: Chat, public_url: str, body: str, state: str, expected: list[str]
) -> None:
    """The page's handling of `done` (degraded, cached), an SSE `error` and a stream that
    ends early, on answers the browser is handed whole (the real stack does not fail on
    demand; test_degradation covers the gateway's side)."""
    chat.page.route(
        "**/api/chat",
        lambda route: route.fulfill(status=200, headers={"content-type": SSE}, body=body),
    )
    chat.open(f"{public_url}/")
    chat.ask("anything")
    turn = chat.wait_turn(state)
    text = turn.inner_text()
    for piece in expected:
        assert piece in text, (piece, text)
    if state == "error":
        assert turn.locator("[role=alert]").count() == 1
    assert chat.page.is_enabled("#send") and chat.page.is_disabled("#stop")
    chat.assert_clean()


def test_gateway_down_and_network_failure_are_shown(chat: Chat, tmp_path: Path) -> None:
    dead_gateway = f"127.0.0.1:{free_port()}"  # nothing listens there
    with own_nginx(dead_gateway, tmp_path / "nginx") as (url, proc):
        chat.open(f"{url}/")
        chat.ask(QUESTION)
        turn = chat.wait_turn("error")
        notice = turn.locator(".notice-error").inner_text()
        # nginx answers for the gateway it cannot reach: 503 with the envelope and a wait.
        assert "unavailable" in notice and "503" in notice and "Try again in" in notice, notice
        assert turn.get_attribute("data-status") == "503"
        assert "unavailable" in chat.page.locator("#status").inner_text()
        assert chat.page.is_enabled("#send") and chat.page.is_disabled("#stop")
        proc.stop()  # now nothing answers at all
        chat.ask(QUESTION)
        turn = chat.wait_turn("error", count=2)
        assert "Could not reach the chat service" in turn.locator(".notice-error").inner_text()
    assert chat.page_errors == [] and chat.dialogs == []


def test_api_key_from_settings(chat: Chat, stack: Stack, tmp_path: Path) -> None:
    """Against a gateway with keys: no key is a 401 that says to set one; the key saved in
    Settings is kept in localStorage and sent as a bearer token."""
    keys = write_keys(
        tmp_path / "keys.json",
        [{"id": "web", "tenant": "web", "scopes": ["chat"], "collections": ["default"]}],
    )
    env = gateway_env(
        stack.config, api_keys_file=str(tmp_path / "keys.json"), requests_per_minute="0"
    )
    with (
        running_service("gateway-web-keys", "ragline_gateway", env, tmp_path / "logs") as gw,
        own_nginx(f"127.0.0.1:{gw.port}", tmp_path / "nginx") as (url, _),
    ):
        chat.open(f"{url}/")
        chat.ask(QUESTION)
        turn = chat.wait_turn("error")
        notice = turn.locator(".notice-error").inner_text()
        assert "API key" in notice and "Settings" in notice and "401" in notice, notice

        chat.page.click("#settings-toggle")
        assert chat.page.evaluate("() => document.activeElement.id") == "api-key"
        chat.page.fill("#api-key", keys["web"])
        chat.page.press("#api-key", "Enter")  # submits the settings form
        assert chat.page.is_hidden("#settings")
        stored = chat.page.evaluate("() => localStorage.getItem('ragline.apiKey')")
        assert stored == keys["web"]

        chat.page.reload()
        chat.page.wait_for_function("() => window.ragline !== undefined")
        chat.ask(QUESTION)
        turn = chat.wait_turn("done", "error")
        assert turn.get_attribute("data-state") == "done", turn.inner_text()
        assert "four to eight hours" in turn.inner_text()
    chat.assert_clean()
