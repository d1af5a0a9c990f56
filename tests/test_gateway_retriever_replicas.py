"""The retriever in a cluster (issue 17): one gateway over several retriever-svc replicas
(`RAGLINE_GATEWAY_RETRIEVER_URL` a comma-separated list; clients/retriever.py).

1. Two real retriever-svc replicas (each its own data dir, the same samples ingested into
   both) behind one gateway: concurrent answers are spread over both.
2. One replica SIGKILLed while 20 callers keep asking: every answer is a whole 200 stream,
   not degraded; the retrievals that met the dead replica were retried on the other, and
   the health watch leaves it out of the rotation.
3. The retry rule itself, against stand-in replicas on loopback (a 503, a refused port, a
   connection closed unanswered, a 404/422/500, a slow one): retried once on the next
   replica, never on a 4xx, another 5xx or a timeout, and within the caller's timeout.

No reranker runs (`ranking=blend` never calls one): the subject is retrieval.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from answer_load import BackgroundLoad, Outcome, native_chat
from prometheus_client import REGISTRY

from ragline_cli.processes import free_port, python_service
from ragline_gateway.clients.base import UpstreamError
from ragline_gateway.clients.retriever import RetrieverClient, replica_urls
from ragline_gateway.metrics import UPSTREAM_UP

from conftest import SAMPLES
from service_helpers import Service, metric, poll

QUESTIONS = [
    "How do honeybees tell each other where flowers are?",
    "What is a tardigrade's tun?",
    "How long does a sourdough starter take to become active?",
    "Who built the lighthouse of Alexandria?",
]
READY_TIMEOUT = 180  # two retrievers loading their model at once on 2 busy cores
KILL_CALLERS = 20
RETRIED = "retriever call failed on a replica: retried once on the next"
LEFT_OUT = "retriever replica left out of the rotation until it answers"


# --- 1 and 2: real processes ------------------------------------------------------------


def started(name: str, module: str, env: dict[str, str], log_dir: Path) -> Service:
    """`python -m MODULE` on a free port, started but not waited on (as running_service,
    which waits; here the four processes load side by side)."""
    port = free_port()
    prefix = f"RAGLINE_{module.removeprefix('ragline_').upper()}"
    full_env = {
        f"{prefix}_PORT": str(port),
        f"{prefix}_SHUTDOWN_DRAIN_S": "0",
        "HF_HUB_OFFLINE": "1",
        **env,
    }
    proc = python_service(name, module, port, full_env, log_dir)
    proc.start()
    return Service(proc, f"http://127.0.0.1:{port}", port)


@dataclass
class Cluster:
    a: Service
    b: Service
    gateway: Service

    def log(self, msg: str, since: float) -> list[dict[str, Any]]:
        """The gateway's log entries whose message is `msg`, logged at `since` (time.time())
        or later (at start-up the gateway saw the replicas down, and retried its /readyz)."""
        lines = self.gateway.proc.log_path.read_text().splitlines()
        entries = map(orjson.loads, (x for x in lines if msg in x))
        return [e for e in entries if e["msg"] == msg and e["ts"] >= since - 0.01]


def retrievals(replica: Service) -> float:
    return metric(replica.url, "http_requests_total", handler="/v1/retrieve", status="200")


def retries(gateway: Service) -> float:
    return metric(gateway.url, "ragline_upstream_retries_total", upstream="retriever")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("retriever-replicas")
    logs = tmp / "logs"
    services: list[Service] = []
    try:
        for name in ("a", "b"):
            env = {"RAGLINE_RETRIEVER_DATA_DIR": str(tmp / f"retriever-{name}")}
            services.append(started(f"retriever-{name}", "ragline_retriever", env, logs))
        a, b = services
        llm_env = {"RAGLINE_LLM_TOKEN_INTERVAL_MS": "5"}
        services.append(started("llm-replicas", "ragline_llm", llm_env, logs))
        gateway_env = {
            "RAGLINE_GATEWAY_RETRIEVER_URL": f"{a.url},{b.url}",
            "RAGLINE_GATEWAY_RERANKER_URL": f"http://127.0.0.1:{free_port()}",  # none
            "RAGLINE_GATEWAY_RANKING": "blend",
            "RAGLINE_GATEWAY_LLM_URL": services[2].url,
            "RAGLINE_GATEWAY_ALLOW_ANONYMOUS": "true",
            "RAGLINE_GATEWAY_CACHE_TTL_S": "0",  # every answer retrieves
            "RAGLINE_GATEWAY_REQUESTS_PER_MINUTE": "0",
            "RAGLINE_GATEWAY_MAX_STREAMS_PER_KEY": "0",
        }
        gateway = started("gateway-replicas", "ragline_gateway", gateway_env, logs)
        services.append(gateway)
        for service in services:  # the gateway last: its /readyz needs the others
            service.proc.wait_ready(READY_TIMEOUT)
        docs = [
            {"id": p.name, "title": p.stem, "text": p.read_text()}
            for p in sorted(SAMPLES.glob("*.md"))
        ]
        for replica in (a, b):  # the same documents in both: either can answer
            response = httpx.post(
                f"{replica.url}/v1/collections/default/documents",
                json={"documents": docs},
                timeout=300,
            )
            assert response.status_code == 200, response.text
        yield Cluster(a, b, gateway)
    finally:
        for service in services:
            service.proc.terminate()
        for service in services:
            service.proc.stop()


def test_the_gateway_spreads_retrievals_over_the_replicas(cluster: Cluster) -> None:
    replicas = {"a": cluster.a, "b": cluster.b}
    before = {name: retrievals(r) for name, r in replicas.items()}
    asked, callers = 24, 8

    def ask(n: int) -> tuple[int, tuple[str, ...]]:
        body = {"model": "ragline", "messages": [{"role": "user", "content": QUESTIONS[n % 4]}]}
        response = httpx.post(f"{cluster.gateway.url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        payload = response.json()
        assert payload["choices"][0]["message"]["content"]
        return response.status_code, tuple(payload["ragline"]["degraded"])

    with ThreadPoolExecutor(callers) as pool:
        answers = list(pool.map(ask, range(asked)))
    assert Counter(answers) == Counter({(200, ()): asked})
    served = {name: retrievals(r) - before[name] for name, r in replicas.items()}
    print(f"retrievals served per replica: {served}")
    # Round robin: each takes its share (exactly alternating, unless a retry came in).
    assert sum(served.values()) >= asked
    assert min(served.values()) >= asked // 4, served


def questions(client: httpx.Client, i: int, n: int) -> Outcome:
    return native_chat(client, QUESTIONS[(i + n) % len(QUESTIONS)])


def test_answers_keep_flowing_while_a_replica_is_killed(cluster: Cluster) -> None:
    """Kills replica a: the last test of the module that uses the cluster."""
    retries_before = retries(cluster.gateway)
    b_before = retrievals(cluster.b)
    with BackgroundLoad(cluster.gateway.url, KILL_CALLERS, questions, limit_s=120) as load:
        started_at = time.monotonic()
        poll(lambda: load.since(started_at) >= KILL_CALLERS, 60, "answers under load")
        killed_at, killed_ts = time.monotonic(), time.time()
        os.kill(cluster.a.proc.pid, signal.SIGKILL)
        # The health watch notices (3 probes a second apart) and leaves it out ...
        poll(
            lambda: any(e["replica"] == cluster.a.url for e in cluster.log(LEFT_OUT, killed_ts)),
            30, "the gateway to leave the killed replica out of the rotation",
        )  # fmt: skip
        left_out_at = time.monotonic()
        # ... and answers go on, from replica b alone.
        poll(lambda: load.since(left_out_at) >= KILL_CALLERS, 60, "answers after the kill")
    outcomes = Counter(o for _, o in load.outcomes)
    during = sum(killed_at <= t <= left_out_at for t, _ in load.outcomes)
    retried = retries(cluster.gateway) - retries_before
    logged = cluster.log(RETRIED, killed_ts)
    errors = Counter(e["error"].split("(")[0] for e in logged)
    print(
        f"\n{len(load.outcomes)} answers, {during} between the kill and the replica being left "
        f"out ({left_out_at - killed_at:.1f} s); {retried:.0f} retrievals retried "
        f"({dict(errors)}); {outcomes}"
    )
    # What users got: every answer a 200 stream that ended with `done`, nothing degraded.
    assert outcomes == Counter({Outcome(200, "done"): len(load.outcomes)})
    assert during > 0
    # The retrievals that met the dead replica (in flight on it, or sent to it before the
    # watch noticed) were retried on b; each retry is counted and logged with the replica.
    assert retried >= 1
    assert logged and all(e["retry_on"] == cluster.b.url for e in logged)
    assert {e["replica"] for e in logged} == {cluster.a.url}
    assert retrievals(cluster.b) > b_before
    # One replica down is not the retriever down: the gateway stays ready.
    assert metric(cluster.gateway.url, "ragline_upstream_up", upstream="retriever") == 1
    ready = httpx.get(f"{cluster.gateway.url}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["upstreams"]["retriever"] is True


# --- 3. the retry rule, against stand-in replicas ---------------------------------------

RETRIEVED = {"hits": [], "degraded": [], "timings": {}}


@dataclass
class StandIn:
    """A replica stand-in: answers every request with `status` after `delay` seconds; with
    `status` 0 it closes the connection without answering."""

    status: int = 200
    delay: float = 0.0
    url: str = ""
    requests: list[str] = field(default_factory=list)


def _handler(state: StandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _answer(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            state.requests.append(f"{self.command} {self.path}")
            time.sleep(state.delay)
            if state.status == 0:
                self.close_connection = True
                return
            body = RETRIEVED if state.status == 200 else {"error": {"code": "x", "message": "x"}}
            data = json.dumps(body).encode()
            try:
                self.send_response(state.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except ConnectionError:  # the client timed out and left: nothing to answer
                self.close_connection = True

        do_GET = do_POST = do_DELETE = _answer

    return Handler


@pytest.fixture
def stand_ins() -> Iterator[Any]:
    servers: list[ThreadingHTTPServer] = []

    def make(status: int = 200, delay: float = 0.0) -> StandIn:
        state = StandIn(status, delay)
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
        state.url = f"http://127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return state

    yield make
    for server in servers:
        server.shutdown()
        server.server_close()


def refused() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def retrieve(urls: list[str], timeout: float = 5.0) -> tuple[Any, float]:
    """One retrieval by a fresh client over `urls` (its first call goes to the first URL):
    the response, or the UpstreamError raised; and the seconds it took."""

    async def go() -> Any:
        client = RetrieverClient(",".join(urls), pool_size=4)
        try:
            return await client.retrieve("q", "default", 5, {}, timeout=timeout)
        except UpstreamError as exc:
            return exc
        finally:
            await client.aclose()

    start = time.monotonic()
    result = asyncio.run(go())
    return result, time.monotonic() - start


def retry_count() -> float:
    return REGISTRY.get_sample_value("ragline_upstream_retries_total", {"upstream": "retriever"})


@pytest.mark.parametrize("first", ["503", "refused", "closed unanswered"])
def test_gone_or_not_serving_is_retried_once_on_the_next_replica(
    stand_ins: Any, first: str, caplog: pytest.LogCaptureFixture
) -> None:
    ok = stand_ins()
    failing = {"503": lambda: stand_ins(503).url, "refused": refused,
               "closed unanswered": lambda: stand_ins(0).url}[first]()  # fmt: skip
    before = retry_count()
    with caplog.at_level(logging.WARNING, logger="ragline.upstreams"):
        result, _ = retrieve([failing, ok.url])
    assert not isinstance(result, UpstreamError), result
    assert result.hits == []
    assert ok.requests == ["POST /v1/retrieve"]
    assert retry_count() == before + 1
    [warning] = [r for r in caplog.records if r.getMessage() == RETRIED]
    assert (warning.replica, warning.retry_on) == (failing, ok.url)  # type: ignore[attr-defined]


@pytest.mark.parametrize("status", [404, 422, 500])
def test_other_errors_are_not_retried(stand_ins: Any, status: int) -> None:
    failing, ok = stand_ins(status), stand_ins()
    before = retry_count()
    result, _ = retrieve([failing.url, ok.url])
    assert isinstance(result, UpstreamError) and result.status == status
    assert (failing.requests, ok.requests) == (["POST /v1/retrieve"], [])
    assert retry_count() == before


def test_a_timeout_is_not_retried(stand_ins: Any) -> None:
    slow, ok = stand_ins(delay=2.0), stand_ins()
    result, took = retrieve([slow.url, ok.url], timeout=0.5)
    assert isinstance(result, UpstreamError) and "timed out" in str(result)
    assert ok.requests == [] and took < 1.5


def test_only_one_retry(stand_ins: Any) -> None:
    replicas = [stand_ins(503) for _ in range(3)]
    result, _ = retrieve([r.url for r in replicas])
    assert isinstance(result, UpstreamError) and result.status == 503
    assert sorted(len(r.requests) for r in replicas) == [0, 1, 1]


def test_one_url_retries_on_itself(stand_ins: Any) -> None:
    """One URL (a Kubernetes Service): the retry goes to it again (kube-proxy picks the pod
    of a new connection)."""
    draining = stand_ins(503)
    result, _ = retrieve([draining.url])
    assert isinstance(result, UpstreamError) and result.status == 503
    assert draining.requests == ["POST /v1/retrieve"] * 2


def test_the_retry_keeps_to_the_callers_deadline(stand_ins: Any) -> None:
    # 0.6 s to a 503, then a replica that would take 3 s: the retry gets the 0.4 s left.
    first, slow = stand_ins(503, delay=0.6), stand_ins(delay=3.0)
    result, took = retrieve([first.url, slow.url], timeout=1.0)
    assert isinstance(result, UpstreamError) and "timed out" in str(result)
    assert len(slow.requests) == 1
    assert 0.9 <= took < 1.4, took


def test_forwarded_document_requests_are_not_retried(stand_ins: Any) -> None:
    draining, ok = stand_ins(503), stand_ins()

    async def go() -> list[int]:
        client = RetrieverClient(f"{draining.url},{ok.url}", pool_size=4)
        try:
            ingest = await client.forward("POST", "/v1/jobs", [], b"{}", "application/json", 5)
            listing = await client.forward("GET", "/v1/collections", [], b"", None, 5)
            return [ingest.status_code, listing.status_code]
        finally:
            await client.aclose()

    # The 503 reaches the caller as it came; the next request takes the next replica.
    assert asyncio.run(go()) == [503, 200]
    assert (draining.requests, ok.requests) == (["POST /v1/jobs"], ["GET /v1/collections"])


async def until(check: Any, within: float, what: str) -> None:
    """`poll` (service_helpers) inside an event loop: the watch runs while it waits."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within:.0f}s")
        await asyncio.sleep(0.02)


def test_the_health_watch_leaves_a_dead_replica_out(stand_ins: Any) -> None:
    ok, dead = stand_ins(), refused()

    async def go() -> tuple[bool, bool, float]:
        client = RetrieverClient(f"{dead},{ok.url}", pool_size=4)
        watch = asyncio.create_task(client.watch(0.05, 0.5, 2))
        try:
            await until(lambda: client.replicas[0].known_down, 10, "the dead replica left out")
            before = retry_count()
            for _ in range(4):
                await client.retrieve("q", "default", 5, {}, timeout=5)
            return client.replicas[0].known_down, client.known_down, retry_count() - before
        finally:
            watch.cancel()
            await client.aclose()

    dead_left_out, all_down, retried = asyncio.run(go())
    assert dead_left_out and not all_down
    # Every call went straight to the live replica: none met the dead one, none retried.
    assert ok.requests.count("POST /v1/retrieve") == 4 and retried == 0
    assert REGISTRY.get_sample_value("ragline_upstream_up", {"upstream": "retriever"}) == 1


def test_every_replica_down_fails_at_once() -> None:
    async def go() -> tuple[bool, str, float]:
        client = RetrieverClient(f"{refused()},{refused()}", pool_size=4)
        watch = asyncio.create_task(client.watch(0.05, 0.5, 2))
        try:
            await until(lambda: client.known_down, 10, "the retriever known down")
            gauge = REGISTRY.get_sample_value("ragline_upstream_up", {"upstream": "retriever"})
            with pytest.raises(UpstreamError) as failed:
                await client.retrieve("q", "default", 5, {}, timeout=5)
            return client.known_down, str(failed.value), gauge
        finally:
            watch.cancel()
            await client.aclose()
            UPSTREAM_UP.labels("retriever").set(1)  # this process's gauge, as it was

    known_down, error, gauge = asyncio.run(go())
    assert known_down and "health probes go unanswered" in error
    assert gauge == 0


def test_the_url_setting_takes_one_url_or_a_list() -> None:
    assert replica_urls("http://r:8001") == ["http://r:8001"]
    assert replica_urls(" http://a:1/, http://b:2 ,") == ["http://a:1", "http://b:2"]
    for bad in ("", " , ", "a:1,b:2", "ftp://r:1"):
        with pytest.raises(ValueError):
            replica_urls(bad)
