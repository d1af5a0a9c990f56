"""Two retriever replicas, as the Kubernetes Deployment runs them: one write log in Redis,
one real Milvus server, a gateway spreading retrieval over both. One replica is SIGKILLed
under load; answers keep flowing, an ingest job it had accepted and was running is
finished by the other, `verify` is consistent, and the answer cache follows writes made
through either replica.

What is not covered here: the lexical side. Elasticsearch cannot run on this machine, and
the embedded tantivy index lives in one process, so replicas cannot share it; without
`RAGLINE_TEST_ES_URL` the replicas run dense-only (`LEXICAL_BACKEND=none`). With it, they
share that Elasticsearch and the same assertions cover both stores.

The figures (answers sent and failed around the kill, time for the job to finish on the
survivor) are printed; nothing here times an assertion.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from answer_load import WHOLE, BackgroundLoad, Outcome, native_chat
from milvus_server import drop_prefixed, milvus_server_uri  # noqa: F401

from ragline_cli.processes import ManagedProcess, free_port, python_service, redis_server
from ragline_cli.stack import Stack

from service_helpers import Service, event, gateway_env, poll, running_service
from sse_client import read_events

pytestmark = pytest.mark.slow

COLLECTION = "replicas"
LEASE_TTL_S = 3
FACTS = [
    ("lighthouse", "The Varrow lighthouse was built in 1871 from granite blocks."),
    ("bridge", "The Ostrel bridge spans the river with seven stone arches."),
    ("market", "The covered market of Penmore opens at dawn every Saturday."),
]


@dataclass
class Shared:
    """What both replicas point at."""

    redis_url: str
    prefix: str
    env: dict[str, str]
    milvus_uri: str
    logs: Path


@pytest.fixture(scope="module")
def shared(
    milvus_server_uri: str,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Shared]:
    tmp = tmp_path_factory.mktemp("replicas")
    port = free_port()
    server = redis_server(port, tmp / "redis").start()
    run = uuid.uuid4().hex[:8]
    milvus_prefix = f"ragline_replicas_{run}_"
    es_url = os.environ.get("RAGLINE_TEST_ES_URL", "")
    lexical = (
        {
            "RAGLINE_RETRIEVER_LEXICAL_BACKEND": "elasticsearch",
            "RAGLINE_RETRIEVER_ES_URL": es_url,
            "RAGLINE_RETRIEVER_ES_INDEX_PREFIX": f"ragline-replicas-{run}-",
        }
        if es_url
        else {"RAGLINE_RETRIEVER_LEXICAL_BACKEND": "none"}
    )
    redis_url = f"redis://127.0.0.1:{port}/0"
    prefix = f"ragline:replicas:{run}:"
    env = {
        **lexical,
        "RAGLINE_RETRIEVER_MILVUS_URI": milvus_server_uri,
        "RAGLINE_RETRIEVER_MILVUS_COLLECTION_PREFIX": milvus_prefix,
        "RAGLINE_RETRIEVER_WRITE_LOG_URL": redis_url,
        "RAGLINE_RETRIEVER_WRITE_LOG_PREFIX": prefix,
        "RAGLINE_RETRIEVER_LEASE_TTL_S": str(LEASE_TTL_S),
        "RAGLINE_RETRIEVER_JOB_BATCH_DOCUMENTS": "8",
        "RAGLINE_RETRIEVER_SHUTDOWN_DRAIN_S": "0",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    try:
        server.wait_ready(30)
        yield Shared(redis_url, prefix, env, milvus_server_uri, tmp / "logs")
    finally:
        server.stop()
        drop_prefixed(milvus_server_uri, milvus_prefix)


@dataclass
class Replica:
    name: str
    proc: ManagedProcess
    url: str


def start_replicas(shared: Shared, names: list[str]) -> list[Replica]:
    replicas = []
    for name in names:  # started together: each spends its seconds loading the model
        port = free_port()
        env = {
            **shared.env,
            "RAGLINE_RETRIEVER_PORT": str(port),
            "RAGLINE_RETRIEVER_DATA_DIR": str(shared.logs.parent / name),
        }
        proc = python_service(name, "ragline_retriever", port, env, shared.logs).start()
        replicas.append(Replica(name, proc, f"http://127.0.0.1:{port}"))
    for replica in replicas:
        replica.proc.wait_ready(180)
    return replicas


@pytest.fixture()
def replicas(shared: Shared) -> Iterator[list[Replica]]:
    started = start_replicas(shared, [f"retriever-{uuid.uuid4().hex[:4]}-{i}" for i in (0, 1)])
    try:
        yield started
    finally:
        for replica in started:
            replica.proc.stop()


@pytest.fixture()
def gateway(stack: Stack, replicas: list[Replica], shared: Shared) -> Iterator[Service]:
    env = gateway_env(
        stack.config,
        retriever_url=",".join(r.url for r in replicas),
        allow_anonymous="true",
        default_collection=COLLECTION,
        requests_per_minute="0",
        max_streams_per_key="0",
        max_tokens="16",
        blend_max_drop="off",
    )
    with running_service(f"gateway-{replicas[0].name}", "ragline_gateway", env, shared.logs) as g:
        yield g


def ingest(url: str, documents: list[dict[str, str]]) -> None:
    r = httpx.post(
        f"{url}/v1/collections/{COLLECTION}/documents", json={"documents": documents}, timeout=120
    )
    assert r.status_code == 200, r.text


def seed(url: str) -> None:
    ingest(url, [{"id": d, "title": d, "text": t} for d, t in FACTS])


def kill(replica: Replica) -> float:
    pid = replica.proc.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    return time.monotonic()


def about_a_fact(client: httpx.Client, i: int, n: int) -> Outcome:
    subject = FACTS[(i + n) % len(FACTS)][0]
    return native_chat(client, f"What do we know about the {subject}? ({i}-{n})")


def test_answers_keep_flowing_while_a_replica_is_killed(
    replicas: list[Replica], gateway: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    seed(replicas[0].url)
    with BackgroundLoad(gateway.url, 8, about_a_fact, limit_s=240) as load:
        poll(lambda: load.since(0) >= 16, 120, "answers before the kill")
        killed_at = kill(replicas[0])
        poll(lambda: load.since(killed_at) >= 48, 180, "answers after the kill")
    outcomes = list(load.outcomes)
    failed = [(t, o) for t, o in outcomes if o != WHOLE]
    after = [t for t, _ in outcomes if t >= killed_at]
    within_5s = [t for t in after if t < killed_at + 5]
    with capsys.disabled():
        print(
            f"\n[replicas] one of two retriever replicas SIGKILLed under 8 answer streams: "
            f"{len(outcomes)} answers, {len(failed)} failed or degraded; {len(within_5s)} "
            f"answered in the 5 s after the kill"
        )
    assert failed == [], failed[:5]  # every answer a 200 stream ending in `done`, undegraded
    assert len(after) >= 48
    survivor = replicas[1]
    report = httpx.get(f"{survivor.url}/v1/collections/{COLLECTION}/verify", timeout=60).json()
    assert report["consistent"] is True and report["dense_chunks"] == len(FACTS), report


def test_an_ingest_job_accepted_by_a_killed_replica_is_finished_by_the_other(
    replicas: list[Replica], shared: Shared, capsys: pytest.CaptureFixture[str]
) -> None:
    accepting, survivor = replicas
    documents = [
        {"id": f"doc-{i:03d}", "text": f"Record {i} of the harbour ledger lists cargo {i * 7}."}
        for i in range(240)
    ]
    r = httpx.post(
        f"{accepting.url}/v1/collections/{COLLECTION}/jobs",
        json={"documents": documents},
        timeout=60,
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]

    def job(url: str) -> dict[str, Any]:
        return httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()

    # Killed while it runs the job: some batches done, not all, its lease in Redis.
    running = poll(
        lambda: (j := job(accepting.url))["documents_done"] >= 8 and j, 120, "the job to start"
    )
    client = redis.Redis.from_url(shared.redis_url)
    holder = client.get(f"{shared.prefix}lease:job:{job_id}")
    client.close()
    killed_at = kill(accepting)
    assert running["status"] == "running" and running["documents_done"] < len(documents)
    assert holder is not None and f":{accepting.proc.pid}:" in holder.decode()

    finished = poll(lambda: (j := job(survivor.url))["status"] != "running" and j, 180, "the job")
    took = time.monotonic() - killed_at
    assert finished["status"] == "succeeded", finished
    assert finished["documents_done"] == len(documents) and finished["error"] is None
    report = httpx.get(f"{survivor.url}/v1/collections/{COLLECTION}/verify", timeout=60).json()
    assert report["consistent"] is True and report["pending_writes"] == 0, report
    assert report["dense_chunks"] >= len(documents), report
    with capsys.disabled():
        print(
            f"\n[replicas] ingest job ({len(documents)} documents) killed with "
            f"{running['documents_done']} done; finished by the other replica "
            f"{took:.1f} s after the kill (lease {LEASE_TTL_S} s)"
        )


def test_the_answer_cache_follows_a_write_made_through_either_replica(
    replicas: list[Replica], gateway: Service
) -> None:
    first, second = replicas
    seed(first.url)
    question = {"message": "When was the Varrow lighthouse built?"}

    def ask() -> list[Any]:
        with httpx.stream("POST", f"{gateway.url}/api/chat", json=question, timeout=60) as r:
            assert r.status_code == 200, r.read()
            return read_events(r)

    def version(replica: Replica) -> str:
        url = f"{replica.url}/v1/collections/{COLLECTION}/version"
        return str(httpx.get(url, timeout=10).json()["version"])

    assert event(ask(), "done")["cached"] is False
    assert event(ask(), "done")["cached"] is True
    assert version(first) == version(second)  # one version, whichever replica answers

    before = version(first)
    ingest(
        second.url,
        [
            {
                "id": "lighthouse-2",
                "title": "Varrow survey",
                "text": "The Varrow lighthouse was rebuilt in 1902 after the storm.",
            }
        ],
    )
    assert version(first) == version(second) != before
    # The other replica sees the write at once (it reads Strong after any replica's write),
    # so no answer computed there can be cached under the new version without it.
    r = httpx.post(
        f"{first.url}/v1/retrieve",
        json={"query": "Varrow lighthouse rebuilt", "collection": COLLECTION, "top_k": 5},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert "lighthouse-2" in [hit["doc_id"] for hit in r.json()["hits"]]
    after = ask()
    assert event(after, "done")["cached"] is False
    sources = [s["doc_id"] for s in event(after, "sources")["sources"]]
    assert "lighthouse-2" in sources
