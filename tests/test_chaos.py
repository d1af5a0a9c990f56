"""Chaos and soak: a stack built as `make up` builds it (supervised, nginx in front), under
concurrent load, with each of its children SIGKILLed in turn.

1. Load: many callers at once on each service's hot endpoint; not one 5xx.
2. Each child killed under load: every answer during the outage is what the README's
   degradation table promises (degraded, or a 503 with the envelope, or an SSE `error`
   event), never a 500 or a stream that just stops; the supervisor brings the child back
   and answers are whole again without anyone restarting anything.

The figures (requests, outcomes, 5xx, recovery time per child) are printed and written to
tests/artifacts/chaos.json. Client disconnects aborting generation, streamed and not, are
in test_gateway_upstream_faults.py.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import answer_load
import httpx
import orjson
import pytest
from answer_load import BackgroundLoad, Outcome, error_code

from ragline_cli.main import ingest
from ragline_cli.stack import REPO_ROOT, RestartPolicy, Stack, StackConfig

from service_helpers import poll

SAMPLES = REPO_ROOT / "samples"
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
QUESTIONS = [
    "How do honeybees tell each other where flowers are?",
    "What is a tardigrade's tun?",
    "How long does a sourdough starter take to become active?",
    "Who built the lighthouse of Alexandria?",
]
# Sized for 2 busy cores, next to the session stack: the cross-encoder on CPU costs about
# 20 ms a candidate, so answers rerank 10 candidates rather than 50.
CHAT_CALLERS, CHAT_ROUNDS = 8, 3
DIRECT_CALLERS, DIRECT_ROUNDS = 16, 30
KILL_LOAD_CALLERS = 3
RECOVERY_DEADLINE_S = 120


@dataclass
class Figures:
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)


FIGURES = Figures()


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("chaos")
    config = StackConfig.on_free_ports(
        base,
        {
            "llm": {"RAGLINE_LLM_TOKEN_INTERVAL_MS": "5"},
            "gateway": {
                # Every answer a live one, and no per-key limit: the load is one anonymous
                # key, as on `make up`, and the subject here is outages, not limits.
                "RAGLINE_GATEWAY_CACHE_TTL_S": "0",
                "RAGLINE_GATEWAY_REQUESTS_PER_MINUTE": "0",
                "RAGLINE_GATEWAY_MAX_STREAMS_PER_KEY": "0",
                "RAGLINE_GATEWAY_RETRIEVE_CANDIDATES": "10",
            },
        },
    )
    # `ragline up`'s policy, with a quicker first restart so the suite stays short.
    policy = RestartPolicy(initial_backoff_s=0.2)
    events: list[str] = []
    with Stack(config, supervise=True, policy=policy, report=events.append) as stack:
        ingest(config.public_url, SAMPLES, "default")
        yield stack
    if FIGURES.rows:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "chaos.json").write_bytes(
            orjson.dumps(
                {"figures": FIGURES.rows, "supervisor": events}, option=orjson.OPT_INDENT_2
            )
        )


# --- callers ---------------------------------------------------------------------------


def native_chat(client: httpx.Client, n: int) -> Outcome:
    return answer_load.native_chat(client, QUESTIONS[n % len(QUESTIONS)])


def openai_chat(client: httpx.Client, n: int) -> Outcome:
    body = {"model": "ragline", "stream": True,
            "messages": [{"role": "user", "content": QUESTIONS[n % len(QUESTIONS)]}]}  # fmt: skip
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            return Outcome(response.status_code, error_code(response))
        end, degraded = "cut", ()
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return Outcome(200, end if end != "cut" else "done", degraded)
            chunk = orjson.loads(data)
            if "error" in chunk:
                return Outcome(200, f"error:{chunk['error']['code']}")
            if chunk.get("ragline"):
                end, degraded = "done", tuple(chunk["ragline"]["degraded"])
        return Outcome(200, "cut")


def openai_completion(client: httpx.Client, n: int) -> Outcome:
    body = {"model": "ragline",
            "messages": [{"role": "user", "content": QUESTIONS[n % len(QUESTIONS)]}]}  # fmt: skip
    response = client.post("/v1/chat/completions", json=body)
    if response.status_code != 200:
        return Outcome(response.status_code, error_code(response))
    payload = response.json()
    assert payload["choices"][0]["message"]["content"]
    return Outcome(200, "done", tuple(payload["ragline"]["degraded"]))


def guarded(call: Callable[[httpx.Client, int], Outcome], client: httpx.Client, n: int) -> Outcome:
    return answer_load.guarded(lambda: call(client, n))


def hammer(
    url: str, call: Callable[[httpx.Client, int], Outcome], callers: int, rounds: int
) -> list[Outcome]:
    """`callers` threads at once, each making `rounds` calls back to back."""

    def caller(i: int) -> list[Outcome]:
        with httpx.Client(base_url=url, timeout=120) as client:
            return [guarded(call, client, i * rounds + r) for r in range(rounds)]

    with ThreadPoolExecutor(callers) as pool:
        return [o for outcomes in pool.map(caller, range(callers)) for o in outcomes]


def background_load(url: str, callers: int) -> BackgroundLoad:
    """Callers asking through nginx, each taking the three APIs in turn, until stopped."""
    calls = (native_chat, openai_chat, openai_completion)
    return BackgroundLoad(url, callers, lambda client, i, n: calls[(i + n) % len(calls)](client, n))


# --- 1. load ---------------------------------------------------------------------------


def record(name: str, outcomes: list[Outcome], **extra: Any) -> None:
    FIGURES.rows[name] = {
        "requests": len(outcomes),
        "5xx": sum(o.status >= 500 for o in outcomes),  # 503s included, when the table says so
        "500": sum(o.status == 500 for o in outcomes),
        "outcomes": {
            f"{o.status} {o.end}" + (f" degraded={','.join(o.degraded)}" if o.degraded else ""): n
            for o, n in Counter(outcomes).most_common()
        },
        **extra,
    }


@pytest.mark.parametrize(
    ("path", "call"),
    [
        ("/api/chat", native_chat),
        ("/v1/chat/completions stream", openai_chat),
        ("/v1/chat/completions", openai_completion),
    ],
)
def test_concurrent_answers_through_nginx_have_no_5xx(
    chaos: Stack, path: str, call: Callable[[httpx.Client, int], Outcome]
) -> None:
    outcomes = hammer(chaos.config.public_url, call, CHAT_CALLERS, CHAT_ROUNDS)
    record(f"load {path}", outcomes)
    assert Counter(outcomes) == Counter({Outcome(200, "done"): len(outcomes)})


def test_concurrent_reranks_have_no_5xx(chaos: Stack) -> None:
    url = f"http://127.0.0.1:{chaos.config.reranker_port}"
    docs = [" ".join(["bees dance"] * (1 + i * 40)) for i in range(6)]  # some past 256 tokens

    def rerank(client: httpx.Client, n: int) -> Outcome:
        body = {"query": QUESTIONS[n % 4], "documents": docs[n % 3 :], "top_n": 3}
        response = client.post("/v1/rerank", json=body)
        if response.status_code != 200:
            return Outcome(response.status_code, error_code(response))
        assert len(response.json()["results"]) == 3
        return Outcome(200, "done")

    outcomes = hammer(url, rerank, DIRECT_CALLERS, DIRECT_ROUNDS)
    record("load /v1/rerank (reranker-svc)", outcomes)
    assert Counter(outcomes) == Counter({Outcome(200, "done"): len(outcomes)})


def test_concurrent_retrievals_have_no_5xx(chaos: Stack) -> None:
    url = f"http://127.0.0.1:{chaos.config.retriever_port}"

    def retrieve(client: httpx.Client, n: int) -> Outcome:
        body = {"query": QUESTIONS[n % 4], "collection": "default", "top_k": 10}
        response = client.post("/v1/retrieve", json=body)
        if response.status_code != 200:
            return Outcome(response.status_code, error_code(response))
        payload = response.json()
        assert payload["hits"] and not payload["degraded"]
        return Outcome(200, "done")

    outcomes = hammer(url, retrieve, DIRECT_CALLERS, DIRECT_ROUNDS)
    record("load /v1/retrieve (retriever-svc)", outcomes)
    assert Counter(outcomes) == Counter({Outcome(200, "done"): len(outcomes)})


# --- 2. each child killed under load ---------------------------------------------------

# What the README's degradation table allows while each child is down. An answer that
# completes undegraded is always allowed (before the kill is noticed, or after it is back).
WHOLE = {(200, "done")}
ALLOWED: dict[str, set[tuple[int, str]]] = {
    # The fused order instead of the reranked one.
    "reranker": WHOLE,  # and `degraded: ["rerank"]`, checked below
    # Refused before streaming.
    "retriever": WHOLE | {(503, "retrieval_unavailable")},
    # Refused before the first token; mid-answer an SSE error event, or (not streamed,
    # nothing sent yet) a 503 with Retry-After.
    "llm": WHOLE
    | {
        (503, "generation_unavailable"),
        (200, "error:generation_failed"),
        (503, "generation_failed"),
    },
    # Cache and memory are skipped; without per-key limits nothing else needs Redis.
    "redis": WHOLE,
    # nginx answers for a gateway it cannot reach. Streams the dead gateway was serving end
    # short: no process is left to write an `error` event for them (clients see the
    # chunked body end early, which every HTTP client reports as an error).
    "gateway": WHOLE | {(503, "gateway_unavailable"), (0, "cut")},
    # The front door itself: connections are refused until it is back.
    "nginx": WHOLE | {(0, "refused"), (0, "cut")},
}
DEGRADATION = {"reranker": {"rerank"}}


def whole_answer(url: str) -> bool:
    with httpx.Client(base_url=url, timeout=60) as client:
        return guarded(native_chat, client, 0) == Outcome(200, "done")


@pytest.mark.parametrize("name", list(ALLOWED))
def test_a_child_killed_under_load_comes_back(chaos: Stack, name: str, capsys: Any) -> None:
    child = chaos.children[name]
    restarts, old_pid = child.restarts, child.proc.pid
    url = chaos.config.public_url
    with background_load(url, KILL_LOAD_CALLERS) as load:
        poll(lambda: len(load.outcomes) >= KILL_LOAD_CALLERS, 60, "answers under load")
        killed_at = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        poll(lambda: child.restarts > restarts and child.state == "up",
             RECOVERY_DEADLINE_S, f"the supervisor to bring {name} back")  # fmt: skip
        back_at = time.monotonic()
        # Whole answers again, with nobody restarting anything by hand.
        poll(lambda: whole_answer(url), RECOVERY_DEADLINE_S, f"whole answers after {name}")
        recovered_at = time.monotonic()
        # And a little more load on the recovered stack.
        poll(lambda: sum(t > recovered_at for t, _ in load.outcomes) >= KILL_LOAD_CALLERS,
             60, "answers after recovery")  # fmt: skip
    outcomes = [o for _, o in load.outcomes]
    during = [o for t, o in load.outcomes if killed_at <= t <= recovered_at]
    record(
        f"kill {name}",
        outcomes,
        answers_during_outage=len(during),
        restarted_in_s=round(back_at - killed_at, 2),
        whole_answers_again_in_s=round(recovered_at - killed_at, 2),
    )
    with capsys.disabled():
        print(f"\nchaos: {name}: {orjson.dumps(FIGURES.rows[f'kill {name}']).decode()}")
    assert child.proc.pid != old_pid
    unexpected = [o for o in outcomes if (o.status, o.end) not in ALLOWED[name]]
    assert unexpected == [], f"not in the README's table for {name}: {Counter(unexpected)}"
    allowed_degraded = DEGRADATION.get(name, set())
    assert all(set(o.degraded) <= allowed_degraded for o in outcomes)
    assert not any(o.server_error for o in outcomes)


def test_print_the_figures(chaos: Stack, capsys: Any) -> None:
    """Last in the module: every figure of this run, in one table."""
    with capsys.disabled():
        print("\nchaos figures (requests, 5xx, outcomes, recovery):")
        for name, row in FIGURES.rows.items():
            print(f"  {name}: {orjson.dumps(row).decode()}")
    assert FIGURES.rows
