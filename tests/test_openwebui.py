"""Open WebUI, the chat UI people already run, on ragline's `/v1`, driven in Chromium.

Open WebUI (OPENWEBUI_PACKAGE in scripts/bootstrap.sh; `make test` installs it into
.venv-openwebui, with the local CPU torch) runs offline with its default settings, built-in
tools on, and is connected as the README's "Use with Open WebUI" says: the `/v1` URL, a key,
the `X-Ragline-Source-Events: true` header, and the generation model as its task model.
It talks to a gateway of this test's own on the session stack's backends, so that gateway's
access log holds only Open WebUI's requests (and this test's readiness polls).

Nothing waits a fixed time: the page is polled with deadlines, and what the answer looked
like while it streamed is recorded in the page by a MutationObserver.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ragline_cli.processes import ManagedProcess, free_port, http_ready
from ragline_cli.stack import REPO_ROOT, Stack

from browser import CHROMIUM_ARGS, chromium_path
from service_helpers import gateway_env, metric, running_service

pytestmark = pytest.mark.slow

OPENWEBUI = REPO_ROOT / ".venv-openwebui" / "bin" / "open-webui"
QUESTION = "How do honeybees tell each other where flowers are?"
FOLLOW_UP = "And what does a round dance tell them?"
TIMEOUT_MS = 90_000  # two cores run the stack, Open WebUI and Chromium at once
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"

# Records, at every change of the page, the length of the last answer's text.
RECORDER = """() => {
  window.__lengths = [];
  new MutationObserver(() => {
    const answers = document.querySelectorAll('#response-content-container');
    const last = answers[answers.length - 1];
    if (last) window.__lengths.push(last.innerText.length);
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def gateway(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    logs = tmp_path_factory.mktemp("openwebui-gateway")
    # No relevance cut-off: the test reads how Open WebUI lists several sources (the
    # default keeps only the honeybee article for this question).
    env = gateway_env(
        stack.config, allow_anonymous="true", cache_ttl_s="0", requests_per_minute="0",
        blend_max_drop="off",
    )  # fmt: skip
    with running_service("gateway", "ragline_gateway", env, logs) as service:
        yield service


@pytest.fixture(scope="module")
def generation_model(gateway: Any) -> str:
    models = [m["id"] for m in httpx.get(f"{gateway.url}/v1/models", timeout=10).json()["data"]]
    assert models[0] == "ragline" and len(models) >= 2, models
    return str(models[-1])  # the generation model is listed last


@pytest.fixture(scope="module")
def openwebui(
    gateway: Any, generation_model: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    if not OPENWEBUI.exists():
        pytest.fail(f"{OPENWEBUI} missing: run `make test` (it installs Open WebUI)")
    data = tmp_path_factory.mktemp("openwebui")
    port = free_port()
    env = {
        # Offline, no login, OpenAI connections only: the settings of the README.
        "OFFLINE_MODE": "true",
        "HF_HUB_OFFLINE": "1",
        "WEBUI_AUTH": "False",
        "ENABLE_OLLAMA_API": "false",
        "DATA_DIR": str(data),
        "WEBUI_SECRET_KEY": "test-only",  # else it writes .webui_secret_key into the cwd
        "OPENAI_API_BASE_URL": f"{gateway.url}/v1",
        "OPENAI_API_KEY": "unused",
        "OPENAI_API_CONFIGS": json.dumps({"0": {"headers": {"X-Ragline-Source-Events": "true"}}}),
        "TASK_MODEL_EXTERNAL": generation_model,
    }
    proc = ManagedProcess(
        "open-webui",
        [str(OPENWEBUI), "serve", "--host", "127.0.0.1", "--port", str(port)],
        data / "open-webui.log",
        env=env,
        ready=http_ready(f"http://127.0.0.1:{port}/health"),
    )
    proc.start()
    try:
        proc.wait_ready(240)  # ~50 s here: it migrates its database on first start
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def page(openwebui: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    if executable is None:
        pytest.fail("chromium not installed: run `make test` (it installs the Debian package)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(openwebui)
        page.wait_for_selector("#chat-input")
        release_notes = page.get_by_role("button", name="Okay, Let's Go!")
        if release_notes.count():
            release_notes.click()
        page.evaluate(RECORDER)
        try:
            yield page
        finally:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "openwebui.png"), full_page=True)
            browser.close()


def ask(page: Any, question: str, answers_before: int) -> Any:
    """Sends `question` and waits for its answer to finish: Open WebUI shows the Sources
    button as soon as the source events arrive, and the Regenerate button under the last
    answer only once it is complete."""
    page.locator("#chat-input").click()
    page.keyboard.type(question)
    page.keyboard.press("Enter")
    answer = page.locator("#response-content-container").nth(answers_before)
    answer.wait_for()
    page.get_by_role("button", name=re.compile(r"Toggle \d+ sources")).nth(
        answers_before
    ).wait_for()
    page.get_by_role("button", name="Regenerate").wait_for()
    # The Regenerate button of an earlier answer may still be on the page while this one
    # streams: the answer is complete when its text stops growing.
    settled(answer)
    return answer


def settled(answer: Any, quiet_s: float = 1.5, within_s: float = 90.0) -> str:
    """The answer's text once it has not changed for `quiet_s` (the extractive engine
    sends a token every few milliseconds), polled; fails after `within_s`."""
    deadline = time.monotonic() + within_s
    text, since = answer.inner_text(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)  # a poll interval, not a synchronisation: the loop checks the state
        now = answer.inner_text()
        if now != text:
            text, since = now, time.monotonic()
        elif text.strip() and time.monotonic() - since >= quiet_s:
            return text
    raise AssertionError(f"the answer kept changing for {within_s} s: {text[-200:]!r}")


def ragline_answer(gateway: Any, messages: list[dict[str, str]]) -> dict[str, Any]:
    """The same question asked of the same gateway by a plain OpenAI client."""
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": "ragline", "messages": messages},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def normalise(text: str) -> str:
    return " ".join(text.split())


def test_open_webui_answers_cites_and_follows_up_with_default_settings(
    page: Any, gateway: Any, stack: Stack
) -> None:
    retriever = f"http://127.0.0.1:{stack.config.retriever_port}"
    retrievals_before = metric(retriever, "http_requests_total", handler="/v1/retrieve")

    # The answer streams: the page showed it at many lengths on its way.
    answer = ask(page, QUESTION, answers_before=0)
    lengths = [n for n in page.evaluate("window.__lengths") if n > 0]
    final = len(answer.inner_text())
    assert len(set(lengths)) >= 5 and min(lengths) < final / 2, lengths

    # The source list, numbered as ragline numbered its sources.
    expected = ragline_answer(gateway, [{"role": "user", "content": QUESTION}])
    sources = expected["sources"]
    toggle = page.get_by_role("button", name=re.compile(r"Toggle \d+ sources")).first
    assert toggle.inner_text().strip() == f"{len(sources)} Sources"
    toggle.click()
    listed = page.locator("button[id^='source-']")
    listed.nth(len(sources) - 1).wait_for()
    labels = [listed.nth(i).get_attribute("aria-label") for i in range(listed.count())]
    assert labels == [f"View source: {s['n']} {s['title']}" for s in sources], labels

    # Each source opens on its own passage (two passages of one article stay two).
    second = listed.nth(1)
    second.click()
    dialog = page.get_by_role("dialog")
    dialog.wait_for()
    assert normalise(sources[1]["text"]) in normalise(dialog.inner_text())
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden")

    # The first citation in the answer opens the passage it cites, with its text.
    content = expected["choices"][0]["message"]["content"]
    first_marker = int(re.search(r"\[(\d+)", content).group(1))  # type: ignore[union-attr]
    cited = next(s for s in sources if s["n"] == first_marker)
    chip = answer.locator("button[aria-label^='View source:']").first
    assert chip.get_attribute("aria-label") == f"View source: {cited['title']}"
    chip.click()
    dialog.wait_for()
    assert normalise(cited["text"]) in normalise(dialog.inner_text())
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden")

    # A follow-up in the same chat is answered, with its own sources.
    follow_up = ask(page, FOLLOW_UP, answers_before=1)
    assert "round dance" in settled(follow_up).lower()

    # Nothing Open WebUI sent got a 4xx or 5xx; its title, tag and follow-up tasks went to
    # the generation model (no retrieval): two questions, plus the reference answer above.
    requests = access_log(gateway)
    chats = [r for r in requests if r["path"] == "/v1/chat/completions"]
    assert len(chats) >= 3, requests
    failed = [r for r in requests if r["status"] >= 400]
    assert not failed, failed
    retrievals = metric(retriever, "http_requests_total", handler="/v1/retrieve")
    assert retrievals - retrievals_before == 3, "task requests were answered from documents"


def access_log(gateway: Any) -> list[dict[str, Any]]:
    lines = []
    for line in gateway.proc.log_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "status" in record and "path" in record:
            lines.append(record)
    return lines
