"""Is the gateway nearly free, and are the models fed well? Five measurements on a live stack.

It starts the whole local stack (`ragline_cli.stack.Stack`: redis-server, nginx, the four
services as their own processes) on free loopback ports, with llm-svc on the `fixed`
engine (`RAGLINE_LLM_ENGINE=fixed`: N fixed tokens at a fixed interval, no work) and
reranker-svc on a tiny random-weight cross-encoder, ingests a small synthetic collection,
and measures, each figure beside its baseline from the same run:

1. `overhead`: time to first token (TTFT) through nginx + gateway, straight to the gateway,
   and done by the client itself against the services the gateway waits on (retriever
   `/v1/retrieve`, reranker `/v1/rerank`, the same prompt, llm-svc streaming), at each
   `--concurrency` (closed loop: every stream is followed at once by the next; starts
   are spread over one stream's length). TTFT runs from just before the first request
   byte to the arrival of the first token in the body. Paths alternate by rounds.
2. `relay`: CPU the gateway spends per token relayed (utime + stime from /proc, before
   and after), with many concurrent streams through nginx, at two answer lengths: the
   difference between them is the cost of a token without the per-request part.
   With `--peers`, the same streams also go through relays of llm-svc's own API
   (peers.py): a bare nginx (the floor of a relay) and LiteLLM's proxy (installed into
   `.venv-litellm` where missing, though never by `--smoke`: its row is skipped then),
   each sent the body the gateway sends llm-svc. The relays take turns in `--rounds`
   rounds; per relay, µs CPU per token, its ratio to the gateway's, and the RSS its
   processes grew by per open stream (over themselves idle; the gateway is restarted for
   it), beside llm-svc's CPU per token over all of them.
3. `streams`: open streams held by one gateway worker (clients straight to the gateway),
   stepped up through `--streams`, each a token every 100 ms; per step the added
   inter-token delay (gap minus the interval) p50/p99, errors, and RSS growth per open
   stream of a freshly started gateway; beside it the same steps straight to llm-svc (the
   control: what the fixed engine, the client and the machine add without the gateway).
4. `cache`: with the answer cache on (the gateway restarted with `CACHE_TTL_S=3600`), the
   same question asked again and again through nginx, timed to the `done` event.
5. `workers`: the open streams of `streams`, stepped up through `--streams`, held by one
   gateway process and by two (a second one started beside it with the same settings; the
   client takes them in turn, as a Service spreads connections over a Deployment's pods),
   in alternating rounds; per step the added delay and each process's CPU. On a machine
   whose cores the whole stack shares, this says what a second worker buys there.

Everything but `cache` runs with the answer cache off (`CACHE_TTL_S=0`), no rate limits
(`REQUESTS_PER_MINUTE=0`, `MAX_STREAMS_PER_KEY=0`) and anonymous access (a Stack without a
keys file sets `ALLOW_ANONYMOUS=true`); the stream bounds (`MAX_INFLIGHT_STREAMS`,
`UPSTREAM_POOL_SIZE`, llm-svc's `MAX_CONCURRENCY`, the reranker's queue) are raised above
the largest step so that nothing is refused. The client is this process (Python, uvloop,
raw asyncio streams, see streamclient.py); it shares the cores with the stack, so its
own CPU is reported beside the services'.

Run from the repository root (progress on stderr, tables or `--json` on stdout):

    .venv/bin/python benchmarks/gateway_bench.py
    .venv/bin/python benchmarks/gateway_bench.py --only overhead --concurrency 1,100
    .venv/bin/python benchmarks/gateway_bench.py --smoke      # seconds: CI's check that it runs
    .venv/bin/python benchmarks/gateway_bench.py --only relay --peers   # beside nginx, LiteLLM
    .venv/bin/python benchmarks/gateway_bench.py --smoke --only relay --peers nginx

A full run takes about 16 minutes on 2 cores. Do not run it beside other heavy work (a
test suite, another benchmark): the services and the client share the cores, and the
figures would measure the neighbour.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers
from procstat import CpuMeter, machine, rss_bytes
from streamclient import (
    Pool,
    Result,
    Upstreams,
    ask_direct,
    ask_native,
    call_json,
    stream_llm,
)

from ragline_cli.processes import ManagedProcess, ProcessFailed, free_port, http_ready
from ragline_cli.stack import Stack, StackConfig
from ragline_common.passages import Passage
from ragline_gateway.prompt import build_messages

COLLECTION = "bench"
MAX_TOKENS = 8192  # the gateway's MAX_TOKENS: the fixed engine's count decides the length
LLM_MODEL = "ragline-fixed"  # the fixed engine's own name, set so peers know it beforehand
SERVICES = ("nginx", "gateway", "retriever", "reranker", "llm", "redis")
PARTS = ("overhead", "relay", "streams", "workers", "cache")

TOPICS = [
    ("Honeybee dances", "Forager honeybees dance on the comb to tell nestmates the direction "
     "and distance of flowers: the angle of the waggle run against vertical is the angle of "
     "the food source against the sun, and its length grows with the distance."),
    ("Tardigrade tuns", "Tardigrades survive drying by curling into a tun: they lose almost "
     "all their water, slow their metabolism to near zero, and protect their cells with "
     "sugars and disordered proteins until water returns."),
    ("Sourdough starters", "A sourdough starter is a culture of wild yeasts and lactic acid "
     "bacteria in flour and water; fed daily it doubles within hours, and its acids give "
     "the bread its sour taste and keep it fresh longer."),
    ("The lighthouse of Alexandria", "The Pharos of Alexandria, built in the third century "
     "BC, stood about a hundred metres tall and guided ships into the harbour with a fire "
     "and mirrors until earthquakes toppled it in the Middle Ages."),
    ("Rust ownership", "In Rust every value has one owner; moving a value transfers "
     "ownership, borrowing lends it without transfer, and the borrow checker rejects "
     "programs in which a reference could outlive the value it points to."),
    ("Tides", "Tides rise and fall twice a day because the Moon's gravity pulls the ocean "
     "into two bulges, one facing the Moon and one opposite, that the Earth turns under."),
    ("Espresso", "Espresso forces water at about nine bars through finely ground coffee in "
     "twenty to thirty seconds, which extracts oils and makes the crema on top."),
    ("Glaciers", "Glaciers flow because ice under its own weight deforms and slides on "
     "meltwater at its base, carving U-shaped valleys as it moves downhill."),
]  # fmt: skip
QUESTIONS = [
    "How do honeybees tell each other where flowers are?",
    "How does a tardigrade survive drying out?",
    "What is in a sourdough starter?",
    "How tall was the lighthouse of Alexandria?",
    "What does the borrow checker in Rust do?",
    "Why are there two tides a day?",
    "How is espresso made?",
    "Why do glaciers flow?",
    "What does the angle of the waggle run mean?",
    "What protects tardigrade cells?",
    "Why does sourdough bread taste sour?",
    "What toppled the Pharos of Alexandria?",
    "What happens when a value is moved in Rust?",
    "What pulls the ocean into bulges?",
    "What makes the crema on espresso?",
    "What shape of valley does a glacier carve?",
]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1), linear between closest ranks; None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def per(cpu: dict[str, float], scale: float) -> dict[str, float]:
    """CPU seconds per process (not the wall clock), times `scale`."""
    return {k: v * scale for k, v in cpu.items() if k != "wall"}


def summary(values: list[float]) -> dict[str, float | int | None]:
    return {"n": len(values), "p50": pct(values, 0.5), "p99": pct(values, 0.99),
            "max": max(values) if values else None}  # fmt: skip


# --- the stack ---------------------------------------------------------------------------


@dataclass
class Plan:
    """Sizes; `--smoke` shrinks them to seconds."""

    concurrency: tuple[int, ...] = (1, 100, 1000)
    rate: float = 50.0  # answers started per second aimed at, under load (sets stream length)
    overhead_tokens: int = 20
    single_requests: int = 200  # at one stream: answers per path and round
    requests_per_worker: int = 3
    rounds: int = 2  # at 1,000 streams and more: one round (a phase lasts a minute)
    relay_streams: int = 200
    relay_interval_ms: float = 40.0
    relay_tokens: tuple[int, int] = (10, 250)
    relay_requests: tuple[int, int] = (5, 1)  # per worker, short and long answers
    stream_steps: tuple[int, ...] = (250, 500, 750, 1000, 1500, 2000)
    worker_steps: tuple[int, ...] = (750, 1000, 1500)
    stream_interval_ms: float = 100.0
    open_rate: float = 100.0  # streams opened per second while stepping up
    settle_s: float = 3.0
    hold_s: float = 10.0
    drain_s: float = 5.0  # after closing the held streams, before the next part
    warmup: int = len(QUESTIONS)  # answers per path before measuring
    cache_asks: int = 300
    # reranker-svc's scorer: a 2-layer random-weight cross-encoder built for the run
    # (cheap, so the stages stay small beside the gateway), or the packaged bi-encoder
    # fallback (nothing to build: the smoke run starts sooner).
    tiny_reranker: bool = True


SMOKE = Plan(
    concurrency=(1, 4),
    rate=200.0,
    overhead_tokens=4,
    single_requests=10,
    requests_per_worker=2,
    rounds=1,
    relay_streams=4,
    relay_interval_ms=5.0,
    relay_tokens=(4, 20),
    relay_requests=(2, 1),
    stream_steps=(5, 10),
    worker_steps=(4, 8),
    open_rate=50.0,
    settle_s=0.3,
    hold_s=0.8,
    drain_s=0.3,
    warmup=2,
    cache_asks=10,
    tiny_reranker=False,
)


class BenchStack:
    """The Stack, plus restarting one service with other settings (nginx and the other
    services keep running; the gateway's pools reconnect)."""

    def __init__(self, work: Path, plan: Plan) -> None:
        self.work = work
        biggest = max([*plan.concurrency, *plan.stream_steps, plan.relay_streams])
        headroom = str(max(4096, 2 * biggest + 64))
        reranker_model = work / "tiny-cross-encoder"
        if plan.tiny_reranker and not reranker_model.exists():
            subprocess.run(
                [sys.executable, "-c",
                 "import sys, pathlib; from ragline_reranker.tiny import "
                 "build_tiny_cross_encoder as b; b(pathlib.Path(sys.argv[1]))",
                 str(reranker_model)],
                check=True, capture_output=True,
            )  # fmt: skip
        self.config = StackConfig.on_free_ports(
            work,
            {
                "llm": {
                    "RAGLINE_LLM_ENGINE": "fixed",
                    "RAGLINE_LLM_MODEL_NAME": LLM_MODEL,
                    "RAGLINE_LLM_FIXED_TOKENS": "16",
                    "RAGLINE_LLM_TOKEN_INTERVAL_MS": "5",
                    "RAGLINE_LLM_MAX_CONCURRENCY": headroom,
                    "RAGLINE_LLM_MAX_TOKENS_LIMIT": str(MAX_TOKENS),
                },
                "gateway": {
                    "RAGLINE_GATEWAY_CACHE_TTL_S": "0",
                    "RAGLINE_GATEWAY_REQUESTS_PER_MINUTE": "0",
                    "RAGLINE_GATEWAY_MAX_STREAMS_PER_KEY": "0",
                    "RAGLINE_GATEWAY_MAX_INFLIGHT_STREAMS": headroom,
                    "RAGLINE_GATEWAY_UPSTREAM_POOL_SIZE": headroom,
                    "RAGLINE_GATEWAY_MAX_TOKENS": str(MAX_TOKENS),
                },
                "reranker": {
                    "RAGLINE_RERANKER_MODEL": str(reranker_model) if plan.tiny_reranker else "",
                    "RAGLINE_RERANKER_MAX_QUEUE_PAIRS": str(int(headroom) * 64),
                },
            },
        )
        missing = self.config.missing_binaries()
        if missing:
            raise SystemExit(f"{' and '.join(missing)} not installed (`make test` installs them)")
        self.stack = Stack(self.config)
        self.engine: tuple[int, float] | None = None

    def start(self) -> None:
        self.stack.start()
        c = self.config
        docs = [{"id": f"doc{i}", "title": title, "text": text}
                for i, (title, text) in enumerate(TOPICS)]  # fmt: skip
        httpx.post(
            f"http://127.0.0.1:{c.nginx_port}/api/collections/{COLLECTION}/documents",
            json={"documents": docs},
            timeout=120,
        ).raise_for_status()

    def stop(self) -> None:
        self.stack.stop()

    def pid(self, name: str) -> int:
        proc = self.stack.processes[name].proc
        assert proc is not None
        return proc.pid

    def pids(self) -> dict[str, int]:
        return {name: self.pid(name) for name in SERVICES if name in self.stack.processes}

    def restart(self, name: str, env: dict[str, str]) -> None:
        self.stack.restart(name, env)
        if name in ("llm", "retriever", "reranker"):
            self.wait_gateway_sees_up(name)

    def wait_gateway_sees_up(self, upstream: str, within: float = 30.0) -> None:
        """Until the gateway's health watch counts `upstream` up again. A restart that
        outlasts its probes (three missed, on a busy machine) leaves the upstream marked
        down, and the gateway fails its requests fast until the next probe is answered:
        measuring in that window would count 503s that no steady state has."""
        url = f"http://127.0.0.1:{self.config.gateway_port}/metrics"
        line = f'ragline_upstream_up{{upstream="{upstream}"}} 1.0'
        deadline = time.monotonic() + within
        while line not in httpx.get(url, timeout=5).text.splitlines():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not see {upstream} up within {within} s")
            time.sleep(0.1)

    def fixed_engine(self, tokens: int, interval_ms: float) -> None:
        if self.engine == (tokens, interval_ms):
            return
        self.engine = (tokens, interval_ms)
        log(f"llm-svc: fixed engine, {tokens} tokens every {interval_ms:g} ms")
        self.restart(
            "llm",
            {"RAGLINE_LLM_FIXED_TOKENS": str(tokens),
             "RAGLINE_LLM_TOKEN_INTERVAL_MS": f"{interval_ms:g}"},
        )  # fmt: skip

    def pool(self, name: str) -> Pool:
        port = {
            "nginx": self.config.nginx_port,
            "gateway": self.config.gateway_port,
            "retriever": self.config.retriever_port,
            "reranker": self.config.reranker_port,
            "llm": self.config.llm_port,
        }[name]
        return Pool("127.0.0.1", port)


# --- running load --------------------------------------------------------------------------

Ask = Callable[[int], Awaitable[Result]]


@dataclass
class Phase:
    results: list[Result]
    window: list[Result]  # those sent while every worker was busy (steady state)
    window_s: float
    cpu: dict[str, float]


async def closed_loop(ask: Ask, workers: int, per_worker: int, spread_s: float,
                      meter: CpuMeter) -> Phase:  # fmt: skip
    """`workers` loops of `per_worker` answers each, started `spread_s / workers` apart."""
    per_worker_results: list[list[Result]] = [[] for _ in range(workers)]

    async def worker(i: int) -> None:
        await asyncio.sleep(i * spread_s / workers)
        for j in range(per_worker):
            per_worker_results[i].append(await ask(i + j))

    meter.start()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(workers)))
    cpu = meter.stop()
    results = [r for rs in per_worker_results for r in rs]
    # Steady state: from the last worker's start to the first worker's last start.
    start = t0 + spread_s * (workers - 1) / workers if workers > 1 else t0
    end = min(rs[-1].sent for rs in per_worker_results)
    if workers == 1:
        return Phase(results, results, cpu["wall"], cpu)
    return Phase(results, [r for r in results if start <= r.sent <= end], end - start, cpu)


def ttft_ms(results: list[Result]) -> list[float]:
    return [r.ttft_ms for r in results if r.error is None and r.ttft_ms is not None]


def errors(results: list[Result]) -> int:
    return sum(1 for r in results if r.error is not None or r.first_token is None)


def first_error(results: list[Result]) -> str | None:
    return next((r.error for r in results if r.error), None)


# --- 1. overhead on time to first token --------------------------------------------------

PATHS = {
    "direct": "client → retriever, reranker, llm-svc",
    "gateway": "client → gateway",
    "nginx": "client → nginx → gateway",
}


def asker(path: str, up: Upstreams, pools: dict[str, Pool]) -> Ask:
    if path == "direct":
        return lambda i: ask_direct(up, QUESTIONS[i % len(QUESTIONS)], COLLECTION)
    pool = pools[path]
    return lambda i: ask_native(pool, QUESTIONS[i % len(QUESTIONS)], COLLECTION)


async def bench_overhead(bs: BenchStack, plan: Plan) -> list[dict[str, Any]]:
    model = (await call_json(bs.pool("llm"), "GET", "/v1/models"))["data"][0]["id"]
    rows = []
    for n in plan.concurrency:
        # One answer lasts n / rate seconds under load, so that answers start at about
        # `rate` per second whatever n is; a single stream runs short answers back to back.
        if n == 1:
            tokens, interval = 4, 2.0
        else:
            tokens = plan.overhead_tokens
            interval = 1000.0 * n / plan.rate / tokens
        bs.fixed_engine(tokens, interval)
        pools = {name: bs.pool(name) for name in ("nginx", "gateway")}
        up = Upstreams(bs.pool("retriever"), bs.pool("reranker"), bs.pool("llm"), model,
                       max_tokens=MAX_TOKENS)  # fmt: skip

        # Warm-up, all at once (one answer's time): every question on every path.
        warm = await asyncio.gather(
            *(asker(path, up, pools)(i) for path in PATHS for i in range(plan.warmup))
        )
        if errors(warm):
            raise RuntimeError(f"warm-up failed: {first_error(warm)}")
        spread = 0.0 if n == 1 else n / plan.rate
        per_worker = plan.single_requests if n == 1 else plan.requests_per_worker
        phases: dict[str, list[Phase]] = {p: [] for p in PATHS}
        order = list(PATHS)
        rounds = plan.rounds if n < 1000 else 1
        for round_no in range(rounds):
            for path in order if round_no % 2 == 0 else order[::-1]:
                log(f"overhead: {n} streams, {path}, round {round_no + 1}/{rounds}")
                meter = CpuMeter(bs.pids())
                ask = asker(path, up, pools)
                phases[path].append(await closed_loop(ask, n, per_worker, spread, meter))
        for pools_ in (pools.values(), (up.retriever, up.reranker, up.llm)):
            for pool in pools_:
                pool.close()
        for path, runs in phases.items():
            results = [r for ph in runs for r in ph.results]
            window = [r for ph in runs for r in ph.window]
            cpu = {k: sum(ph.cpu[k] for ph in runs) for k in runs[0].cpu}
            rows.append(
                {
                    "streams": n,
                    "path": path,
                    "tokens": tokens,
                    "interval_ms": round(interval, 2),
                    "answers": len(results),
                    "measured": len(window),
                    "errors": errors(results),
                    "first_error": first_error(results),
                    "degraded": sum(1 for r in results if r.degraded),
                    # Answers started per second while every stream was open.
                    "answers_per_s": len(window) / sum(ph.window_s for ph in runs),
                    "ttft_ms": summary(ttft_ms(window)),
                    "cpu_ms_per_answer": per(cpu, 1000 / len(results)),
                    "cpu_busy": per(cpu, 1 / cpu["wall"]),
                }
            )
    return rows


# --- 2. relay cost per token ---------------------------------------------------------------


@dataclass
class Relay:
    """One way llm-svc's tokens reach the client: how an answer is asked for, and which of
    the measured processes are the relay (their CPU and memory are its cost)."""

    name: str
    label: str
    ask: Ask
    processes: tuple[str, ...]
    pids: Callable[[], dict[str, int]]  # the relay's processes and llm-svc, looked up anew
    close: Callable[[], None]


def gateway_relay(bs: BenchStack) -> Relay:
    pool = bs.pool("nginx")
    return Relay(
        "gateway", "ragline: nginx → gateway",
        lambda i: ask_native(pool, QUESTIONS[i % len(QUESTIONS)], COLLECTION),
        ("gateway", "nginx"), bs.pids, pool.close,
    )  # fmt: skip


def openai_relay(
    name: str, label: str, pool: Pool, up: Upstreams, pids: Callable[[], dict[str, int]]
) -> Relay:
    """A relay of llm-svc's own API: the client sends it what the gateway sends llm-svc
    (a question of the list with five passages, streamed, usage included)."""
    passages = [Passage(n, title, text) for n, (title, text) in enumerate(TOPICS[:5], 1)]
    bodies = [up.llm_body(build_messages(q, passages, [])) for q in QUESTIONS]
    via = replace(up, llm=pool)
    return Relay(name, label, lambda i: stream_llm(via, bodies[i % len(bodies)]),
                 (name,), pids, pool.close)  # fmt: skip


async def relay_phase(relay: Relay, plan: Plan, per_worker: int, spread: float,
                      peaks: dict[str, int]) -> Phase:  # fmt: skip
    """`closed_loop` on the relay, noting in `peaks` the highest RSS of each of its
    processes (and their children) while the streams are open, four times a second."""
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            pids = relay.pids()
            for name in relay.processes:
                peaks[name] = max(peaks.get(name, 0), rss_bytes(pids[name], tree=True))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.25)

    sampler = asyncio.create_task(sample())
    try:
        return await closed_loop(relay.ask, plan.relay_streams, per_worker, spread,
                                 CpuMeter(relay.pids()))  # fmt: skip
    finally:
        done.set()
        await sampler


def relay_run(tokens: int, phases: list[Phase]) -> dict[str, Any]:
    """One answer length on one relay, its rounds added up."""
    results = [r for ph in phases for r in ph.results]
    # Processes measured in every phase (llm-svc, the client, the wall clock, when they
    # are phases of several relays).
    keys = [k for k in phases[0].cpu if all(k in ph.cpu for ph in phases)]
    cpu = {k: sum(ph.cpu[k] for ph in phases) for k in keys}
    relayed = sum(r.tokens for r in results)
    return {
        "tokens_per_answer": tokens,
        "answers": len(results),
        "errors": errors(results),
        "first_error": first_error(results),
        "tokens_relayed": relayed,
        "tokens_per_s": relayed / cpu["wall"],
        "cpu_s": cpu,
        "us_per_token": per(cpu, 1e6 / max(relayed, 1)),
        "ms_per_answer": per(cpu, 1e3 / max(len(results), 1)),
    }


def marginal_us(short: dict[str, Any], long: dict[str, Any]) -> dict[str, float]:
    """The per-token part: the difference in CPU per answer over the difference in tokens."""
    extra_tokens = (long["tokens_relayed"] / max(long["answers"], 1)
                    - short["tokens_relayed"] / max(short["answers"], 1))  # fmt: skip
    return {
        k: 1000 * (long["ms_per_answer"][k] - short["ms_per_answer"][k]) / extra_tokens
        for k in long["ms_per_answer"]
    }


async def measure_relays(bs: BenchStack, plan: Plan, relays: list[Relay],
                         rounds: int) -> dict[str, Any]:  # fmt: skip
    """Every relay at both answer lengths, the relays in turn within each round (the order
    reversed every other round, as in `overhead`); per relay its runs, the per-token part,
    and the RSS its processes grew by over their idle selves, per open stream."""
    phases: dict[tuple[str, int], list[Phase]] = {}
    idle: dict[str, int] = {}
    peaks: dict[str, int] = {}
    for tokens, per_worker in zip(plan.relay_tokens, plan.relay_requests, strict=True):
        bs.fixed_engine(tokens, plan.relay_interval_ms)
        for relay in relays:
            warm = await asyncio.gather(*(relay.ask(i) for i in range(plan.warmup)))
            if errors(warm):
                log(f"relay: warm-up via {relay.name}: {errors(warm)} errors "
                    f"({first_error(warm)})")  # fmt: skip
            for name, pid in relay.pids().items():
                if name in relay.processes:
                    idle.setdefault(name, rss_bytes(pid, tree=True))
        spread = tokens * plan.relay_interval_ms / 1000
        for round_no in range(rounds):
            for relay in relays if round_no % 2 == 0 else relays[::-1]:
                log(f"relay: {plan.relay_streams} streams of {tokens} tokens via {relay.name}"
                    + (f", round {round_no + 1}/{rounds}" if rounds > 1 else ""))  # fmt: skip
                phase = await relay_phase(relay, plan, per_worker, spread, peaks)
                phases.setdefault((relay.name, tokens), []).append(phase)
    out = {}
    for relay in relays:
        runs = [relay_run(tokens, phases[(relay.name, tokens)]) for tokens in plan.relay_tokens]
        out[relay.name] = {
            "label": relay.label,
            "processes": list(relay.processes),
            "runs": runs,
            "marginal_us_per_token": marginal_us(*runs),
            "rss_per_stream_kib": {
                name: (peaks[name] - idle[name]) / plan.relay_streams / 1024
                for name in relay.processes
            },
        }
    # llm-svc made every relay's tokens: its CPU over all of them.
    every = [relay_run(t, [ph for r in relays for ph in phases[(r.name, t)]])
             for t in plan.relay_tokens]  # fmt: skip
    out["all"] = {"runs": every, "marginal_us_per_token": marginal_us(*every)}
    return out


async def bench_relay(bs: BenchStack, plan: Plan, peer_plan: PeerPlan | None) -> dict[str, Any]:
    relays = [gateway_relay(bs)]
    try:
        if peer_plan is not None:
            # A fresh gateway: RSS never shrinks, and the other parts may have grown it.
            bs.restart("gateway", {})
            relays += await start_peers(bs, peer_plan)
        measured = await measure_relays(bs, plan, relays, plan.rounds if peer_plan else 1)
    finally:
        for relay in relays:
            relay.close()
        if peer_plan is not None:
            stop_peers(peer_plan)
    gateway = measured["gateway"]
    out = {
        "streams": plan.relay_streams,
        "interval_ms": plan.relay_interval_ms,
        "runs": gateway["runs"],
        "marginal_us_per_token": gateway["marginal_us_per_token"],
    }
    if peer_plan is not None:
        out["peers"] = peer_report(plan, peer_plan, measured)
    return out


# --- 2b. peers of the relay (--peers) --------------------------------------------------------


@dataclass
class PeerPlan:
    """Which peers `--peers` asked for, and what is known of LiteLLM before the run."""

    nginx: bool
    litellm: bool
    litellm_version: str | None = None
    litellm_install_s: float | None = None  # None: nothing was installed by this run
    litellm_skipped: str | None = None  # why there is no LiteLLM row
    launched: bool = False
    processes: list[PeerProcess] = field(default_factory=list)


def prepare_peers(names: set[str], may_install: bool) -> PeerPlan:
    """Before the stack starts: LiteLLM installed into `.venv-litellm` where it is missing
    and `may_install` (a `--smoke` run never installs: the row is skipped instead)."""
    plan = PeerPlan(nginx="nginx" in names, litellm="litellm" in names)
    if not plan.litellm:
        return plan
    plan.litellm_version = peers.litellm_version()
    if plan.litellm_version is None and not may_install:
        plan.litellm_skipped = (f"LiteLLM not installed in {peers.LITELLM_VENV.name} "
                                "(`--peers` without `--smoke` installs it)")  # fmt: skip
    elif plan.litellm_version is None:
        log(f"installing {peers.LITELLM_PACKAGE} into {peers.LITELLM_VENV.name} with uv")
        seconds, why = peers.install_litellm()
        plan.litellm_install_s = seconds
        plan.litellm_version = peers.litellm_version()
        if why is not None:
            plan.litellm_skipped = f"LiteLLM install failed after {seconds:.0f} s: {why}"
        else:
            log(f"installed litellm {plan.litellm_version} in {seconds:.1f} s")
    if plan.litellm_skipped:
        log(f"the LiteLLM row is skipped: {plan.litellm_skipped}")
    else:
        log(f"LiteLLM {plan.litellm_version} from {peers.LITELLM_VENV.name}")
    return plan


@dataclass
class PeerProcess:
    name: str  # the relay's name, and its process's in the CPU and memory figures
    label: str
    port: int
    proc: ManagedProcess
    start_timeout_s: float


def launch_peers(bs: BenchStack, plan: PeerPlan) -> None:
    """Starts the peers asked for on free ports, each relaying to the stack's llm-svc
    (its port and model are known before it starts), without waiting for them."""
    if plan.launched:
        return
    plan.launched = True
    llm_port = bs.config.llm_port
    if plan.nginx:
        port = free_port()
        proc = peers.nginx_peer(port, llm_port, bs.work / "peer-nginx")
        plan.processes.append(PeerProcess("nginx-peer", "nginx → llm-svc (bare relay)", port,
                                          proc, 30.0))  # fmt: skip
    if plan.litellm and not plan.litellm_skipped:
        port = free_port()
        proc = peers.litellm_peer(port, llm_port, LLM_MODEL, bs.work / "peer-litellm")
        plan.processes.append(PeerProcess("litellm", "LiteLLM proxy → llm-svc", port, proc,
                                          peers.START_TIMEOUT_S))  # fmt: skip
    for peer in plan.processes:
        log(f"relay: starting {peer.label} on port {peer.port}")
        peer.proc.start()


async def start_peers(bs: BenchStack, plan: PeerPlan) -> list[Relay]:
    """The peers as relays, once ready (started now if `launch_peers` has not yet). A
    LiteLLM that does not start is a skipped row; an nginx that does not, an error."""
    launch_peers(bs, plan)
    model = (await call_json(bs.pool("llm"), "GET", "/v1/models"))["data"][0]["id"]
    assert model == LLM_MODEL, f"llm-svc serves {model!r}, the peers were told {LLM_MODEL!r}"
    up = Upstreams(bs.pool("retriever"), bs.pool("reranker"), bs.pool("llm"), model,
                   max_tokens=MAX_TOKENS)  # fmt: skip
    relays = []
    for peer in plan.processes:
        try:
            peer.proc.wait_ready(peer.start_timeout_s)
        except ProcessFailed as exc:
            if peer.name != "litellm":
                raise
            peer.proc.stop()
            plan.litellm_skipped = f"LiteLLM did not start: {exc}"[:2000]
            log(f"the LiteLLM row is skipped: {plan.litellm_skipped}")
            continue
        log(f"relay: {peer.label} ready")
        pid = peer.proc.pid
        assert pid is not None
        pids = lambda n=peer.name, p=pid: {n: p, "llm": bs.pid("llm")}  # noqa: E731
        relays.append(openai_relay(peer.name, peer.label, Pool("127.0.0.1", peer.port), up, pids))
    return relays


def stop_peers(plan: PeerPlan) -> None:
    for peer in plan.processes:
        peer.proc.stop()


def git_describe() -> str:
    try:
        done = subprocess.run(
            ["git", "describe", "--tags", "--always", "--dirty"],
            cwd=peers.REPO_ROOT, capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip()


# The summary's rows: (label, relay measured, process of it).
PEER_ROWS = (
    ("ragline gateway (behind ragline's nginx)", "gateway", "gateway"),
    ("ragline's nginx, in front of the gateway", "gateway", "nginx"),
    ("nginx, bare relay of llm-svc", "nginx-peer", "nginx-peer"),
    ("LiteLLM proxy", "litellm", "litellm"),
    # llm-svc's own figure while the gateway relays, as in the relay table (it spends
    # more per token while LiteLLM relays: each relay's llm-svc column shows it).
    ("llm-svc, making the gateway's tokens", "gateway", "llm"),
)


def ratio(x: float, base: float) -> float | None:
    """x / base; None where base is no CPU at all (toy sizes: below a clock tick, or a
    difference of equal tick counts, which is zero give or take a rounding error)."""
    return x / base if base > 1e-6 else None


def peer_report(plan: Plan, peer_plan: PeerPlan, measured: dict[str, Any]) -> dict[str, Any]:
    """Per relay process: µs CPU per token at the long answers and without the per-answer
    part, the per-answer part itself, both µs figures over the gateway's, and RSS per open
    stream."""
    gateway = measured["gateway"]
    base_long = gateway["runs"][-1]["us_per_token"]["gateway"]
    base_marginal = gateway["marginal_us_per_token"]["gateway"]
    rows = []
    for label, relay, process in PEER_ROWS:
        if relay not in measured:
            continue
        m = measured[relay]
        short, long = m["runs"]
        marginal = m["marginal_us_per_token"][process]
        short_tokens = short["tokens_relayed"] / max(short["answers"], 1)
        per_answer_ms = short["ms_per_answer"][process] - marginal * short_tokens / 1000
        rows.append(
            {
                "relay": label,
                "measured": relay,
                "process": process,
                "us_per_token": long["us_per_token"][process],
                "ratio": ratio(long["us_per_token"][process], base_long),
                "marginal_us_per_token": marginal,
                "marginal_ratio": ratio(marginal, base_marginal),
                "per_answer_ms": per_answer_ms,
                "rss_per_stream_kib": m.get("rss_per_stream_kib", {}).get(process),
                "errors": sum(run["errors"] for run in m["runs"]),
            }
        )
    return {
        "rounds": plan.rounds,
        "versions": {
            "ragline": git_describe(),
            "nginx": machine()["nginx"],
            "litellm": peer_plan.litellm_version if peer_plan.litellm else None,
        },
        "litellm": {
            "asked": peer_plan.litellm,
            "install_s": peer_plan.litellm_install_s,
            "skipped": peer_plan.litellm_skipped,
        },
        "relays": {k: v for k, v in measured.items() if k != "all"},
        "llm_all": measured["all"],
        "rows": rows,
    }


# --- 3. open streams -----------------------------------------------------------------------


async def hold_streams(
    bs: BenchStack,
    plan: Plan,
    open_one: Callable[[Result], Awaitable[Result]],
    watched: tuple[str, ...],
    steps_of: tuple[int, ...] | None = None,
    extra: dict[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Steps up to each of `steps_of` (default `plan.stream_steps`) open streams and
    watches them for a while; RSS growth is that of the processes `watched` together.
    `extra`: processes measured besides the stack's (name: pid)."""

    def pids() -> dict[str, int]:
        return {**bs.pids(), **(extra or {})}

    def watched_rss() -> int:
        return sum(rss_bytes(pids()[name]) for name in watched)

    interval = plan.stream_interval_ms / 1000
    streams: list[tuple[Result, asyncio.Task[Result]]] = []
    steps = []
    baseline_rss = watched_rss()
    for n in steps_of or plan.stream_steps:
        log(f"streams via {' + '.join(watched)}: opening up to {n}")
        while len(streams) < n:
            result = Result(token_times=[])
            streams.append((result, asyncio.create_task(open_one(result))))
            await asyncio.sleep(1 / plan.open_rate)
        await asyncio.sleep(plan.settle_s)
        meter = CpuMeter(pids())
        meter.start()
        a = time.perf_counter()
        await asyncio.sleep(plan.hold_s / 2)
        rss = {name: rss_bytes(pid, tree=name == "nginx") for name, pid in pids().items()}
        rss_watched = sum(rss[name] for name in watched)
        await asyncio.sleep(plan.hold_s / 2)
        b = time.perf_counter()
        cpu = meter.stop()
        added: list[float] = []
        delivered = 0
        for result, _ in streams:
            times = result.token_times or []
            inside = [t for t in times if a <= t <= b]
            delivered += len(inside)
            added.extend(1000 * (y - x - interval) for x, y in itertools.pairwise(inside))
        failed = [r for r, task in streams if task.done() or r.error]
        expected = len(streams) * (b - a) / interval
        steps.append(
            {
                "streams": len(streams),
                "errors": len(failed),
                "first_error": next((r.error or "ended early" for r in failed), None),
                "added_delay_ms": summary(added),
                "tokens_delivered_vs_due": delivered / expected if expected else None,
                "rss_mib": {k: v / 2**20 for k, v in rss.items()},
                # Growth over the idle, warmed-up process, per open stream; and since the
                # first step, which leaves out what the first streams cost once (pools,
                # buffers, allocator arenas).
                "rss_per_stream_kib": (rss_watched - baseline_rss) / len(streams) / 1024,
                "rss_per_added_stream_kib": (
                    (rss_watched - steps[0]["rss_bytes"])
                    / (len(streams) - steps[0]["streams"])
                    / 1024
                    if steps
                    else None
                ),
                "rss_bytes": rss_watched,
                "cpu_busy": {k: v / cpu["wall"] for k, v in cpu.items() if k != "wall"},
            }
        )
        log(f"  {len(streams)} open: added delay p99 "
            f"{steps[-1]['added_delay_ms']['p99'] or 0:.1f} ms, errors {len(failed)}")  # fmt: skip
    for _, task in streams:
        task.cancel()
    await asyncio.gather(*(task for _, task in streams), return_exceptions=True)
    return steps


async def bench_streams(bs: BenchStack, plan: Plan) -> dict[str, Any]:
    tokens = stream_tokens(plan, plan.stream_steps)
    bs.fixed_engine(tokens, plan.stream_interval_ms)
    # A fresh gateway: RSS never shrinks, so one that held streams earlier in the run
    # would show less growth per stream than it costs.
    bs.restart("gateway", {})
    model = (await call_json(bs.pool("llm"), "GET", "/v1/models"))["data"][0]["id"]
    gateway = bs.pool("gateway")
    up = Upstreams(bs.pool("retriever"), bs.pool("reranker"), bs.pool("llm"), model,
                   max_tokens=MAX_TOKENS)  # fmt: skip
    passages = [Passage(n, title, text) for n, (title, text) in enumerate(TOPICS[:5], 1)]
    body = up.llm_body(build_messages(QUESTIONS[0], passages, []))
    counter = iter(range(10**9))
    await warm_up([gateway], plan)

    def via_gateway(result: Result) -> Awaitable[Result]:
        return ask_native(gateway, QUESTIONS[next(counter) % len(QUESTIONS)], COLLECTION, result)

    out = {"interval_ms": plan.stream_interval_ms, "tokens_per_stream": tokens,
           "gateway": await hold_streams(bs, plan, via_gateway, ("gateway",))}  # fmt: skip
    await asyncio.sleep(plan.drain_s)  # let the gateway and llm-svc finish the aborts
    bs.restart("llm", {})  # a fresh llm-svc for the same reason
    out["llm"] = await hold_streams(bs, plan, lambda result: stream_llm(up, body, result), ("llm",))
    gateway.close()
    up.close()
    return out


async def warm_up(gateways: list[Pool], plan: Plan) -> None:
    """Answers begun and dropped on each gateway, so that an RSS baseline taken next has
    the pools, caches and code paths in it."""
    for i in range(plan.warmup):
        short = [asyncio.create_task(ask_native(g, QUESTIONS[i], COLLECTION)) for g in gateways]
        await asyncio.sleep(0.3)
        for task in short:
            task.cancel()
    await asyncio.sleep(plan.drain_s)


def stream_tokens(plan: Plan, steps: tuple[int, ...]) -> int:
    """Tokens per answer for held streams: more than the whole part lasts, so that none
    ends before the streams are closed at its end."""
    run_s = steps[-1] / plan.open_rate + len(steps) * (plan.settle_s + plan.hold_s) + 30
    return int(run_s * 1000 / plan.stream_interval_ms)


# --- 5. one gateway worker or two ------------------------------------------------------------


def second_gateway(bs: BenchStack) -> ManagedProcess:
    """Another gateway process with the stack's gateway's settings, on a port of its own:
    a second pod of the Deployment (or a second `--workers` process)."""
    first = bs.stack.processes["gateway"]
    port = free_port()
    return dataclasses.replace(
        first,
        name="gateway2",
        env={**first.env, "RAGLINE_GATEWAY_PORT": str(port)},
        log_path=first.log_path.with_name("gateway2.log"),
        ready=http_ready(f"http://127.0.0.1:{port}/readyz"),
        proc=None,
    )


def in_turn(pools: list[Pool]) -> Callable[[Result], Awaitable[Result]]:
    """Opens each stream on the next gateway of `pools`, the questions in turn."""
    turn = itertools.count()

    def open_one(result: Result) -> Awaitable[Result]:
        i = next(turn)
        question = QUESTIONS[i % len(QUESTIONS)]
        return ask_native(pools[i % len(pools)], question, COLLECTION, result)

    return open_one


async def bench_workers(bs: BenchStack, plan: Plan) -> dict[str, Any]:
    steps = plan.worker_steps
    bs.fixed_engine(stream_tokens(plan, steps), plan.stream_interval_ms)
    second = second_gateway(bs)
    port2 = int(second.env["RAGLINE_GATEWAY_PORT"])
    runs: list[dict[str, Any]] = []
    order = [1, 2]
    try:
        for round_no in range(plan.rounds):
            for workers in order if round_no % 2 == 0 else order[::-1]:
                # Fresh processes: RSS never shrinks, and each run starts from the same place.
                bs.restart("gateway", {})
                second.stop()
                pools = [bs.pool("gateway")]
                extra: dict[str, int] = {}
                if workers == 2:
                    second.start()
                    second.wait_ready(60)
                    assert second.pid is not None
                    extra["gateway2"] = second.pid
                    pools.append(Pool("127.0.0.1", port2))
                await warm_up(pools, plan)
                log(f"workers: {workers} gateway process(es), round {round_no + 1}")
                watched = ("gateway", *extra)
                held = await hold_streams(bs, plan, in_turn(pools), watched, steps, extra)
                runs.append({"workers": workers, "round": round_no + 1, "steps": held})
                for pool in pools:
                    pool.close()
                await asyncio.sleep(plan.drain_s)
    finally:
        second.stop()
    return {"interval_ms": plan.stream_interval_ms, "runs": runs}


# --- 4. cache hits -------------------------------------------------------------------------


async def bench_cache(bs: BenchStack, plan: Plan) -> dict[str, Any]:
    bs.fixed_engine(20, 5.0)
    log("cache: gateway restarted with RAGLINE_GATEWAY_CACHE_TTL_S=3600")
    bs.restart("gateway", {"RAGLINE_GATEWAY_CACHE_TTL_S": "3600"})
    out: dict[str, Any] = {}
    for path in ("nginx", "gateway"):
        pool = bs.pool(path)
        question = QUESTIONS[0] if path == "nginx" else QUESTIONS[1]
        miss = await ask_native(pool, question, COLLECTION)
        if miss.error:
            raise RuntimeError(f"cache bench: {miss.error}")
        hits = [await ask_native(pool, question, COLLECTION) for _ in range(plan.cache_asks)]
        out[path] = {
            "miss_done_ms": (miss.end - miss.sent) * 1000,
            "hit_done_ms": summary([(r.end - r.sent) * 1000 for r in hits if not r.error]),
            "errors": errors(hits),
            "not_cached": sum(1 for r in hits if r.timings and not r.cached),
        }
        pool.close()
    return out  # the last part: the gateway stays as it is


# --- report --------------------------------------------------------------------------------


def _f(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def print_report(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"machine: {m['cpu']}, {m['cpu_count']} cores, {m['memory_gib']} GiB; "
          f"Python {m['python']}; nginx {m['nginx']}; "
          f"load average before {m['load_average']}, after {report['load_after']}")  # fmt: skip
    if "overhead" in report:
        print("\n1. Time to first token: nginx + gateway vs the stages they wait on (ms)")
        print(f"{'streams':>7}  {'path':<40}{'answers':>8}{'err':>5}{'ans/s':>7}"
              f"{'p50':>8}{'p99':>8}   CPU ms/answer: gateway nginx client")  # fmt: skip
        by: dict[tuple[int, str], dict[str, Any]] = {(r["streams"], r["path"]): r
                                                     for r in report["overhead"]}  # fmt: skip
        for r in report["overhead"]:
            c = r["cpu_ms_per_answer"]
            print(f"{r['streams']:>7}  {PATHS[r['path']]:<40}{r['measured']:>8}{r['errors']:>5}"
                  f"{r['answers_per_s']:>7.1f}{_f(r['ttft_ms']['p50'], '.2f'):>8}"
                  f"{_f(r['ttft_ms']['p99'], '.2f'):>8}   "
                  f"{c['gateway']:.2f} {c['nginx']:.2f} {c['client']:.2f}")  # fmt: skip
            if r["path"] == "nginx":
                d = by[(r["streams"], "direct")]["ttft_ms"]
                g = by[(r["streams"], "gateway")]["ttft_ms"]
                for label, other in (("nginx + gateway", d), ("gateway alone", None)):
                    base = d if other is None else other
                    top = g if other is None else r["ttft_ms"]
                    if base["p50"] is None or top["p50"] is None:
                        continue
                    print(
                        f"{'':>7}  {'added by ' + label:<40}{'':>20}"
                        f"{top['p50'] - base['p50']:>+8.2f}{top['p99'] - base['p99']:>+8.2f}"
                    )
    if "relay" in report:
        rl = report["relay"]
        print(f"\n2. Relay cost: {rl['streams']} concurrent streams through nginx, "
              f"a token every {rl['interval_ms']:g} ms")  # fmt: skip
        print(f"{'tokens/answer':>13}{'answers':>8}{'err':>5}{'tokens':>9}{'tok/s':>8}"
              f"   µs CPU per token: gateway  llm-svc  nginx  client")  # fmt: skip
        for run in rl["runs"]:
            u = run["us_per_token"]
            print(
                f"{run['tokens_per_answer']:>13}{run['answers']:>8}{run['errors']:>5}"
                f"{run['tokens_relayed']:>9}{run['tokens_per_s']:>8.0f}"
                f"   {u['gateway']:>24.1f}{u['llm']:>9.1f}{u['nginx']:>7.1f}{u['client']:>8.1f}"
            )
        mg = rl["marginal_us_per_token"]
        print(
            f"{'per token, without the per-answer part (difference of the two)':<62}"
            f"{mg['gateway']:>5.1f}{mg['llm']:>9.1f}{mg['nginx']:>7.1f}{mg['client']:>8.1f}"
        )
        if "peers" in rl:
            print_peers(rl)
    if "streams" in report:
        st = report["streams"]
        print(f"\n3. Open streams, a token every {st['interval_ms']:g} ms "
              f"(added delay = gap between tokens minus the interval)")  # fmt: skip
        print(
            f"{'via':<9}{'open':>6}{'err':>5}{'added p50':>10}{'p99':>8}{'max':>8}"
            f"{'delivered':>10}{'RSS KiB/stream':>15}{'/added':>7}"
            f"   CPU busy: gateway llm-svc client"
        )
        for via in ("gateway", "llm"):
            for s in st[via]:
                a = s["added_delay_ms"]
                busy = s["cpu_busy"]
                print(f"{via:<9}{s['streams']:>6}{s['errors']:>5}{_f(a['p50']):>10}"
                      f"{_f(a['p99']):>8}{_f(a['max']):>8}"
                      f"{_f(s['tokens_delivered_vs_due'], '.3f'):>10}"
                      f"{s['rss_per_stream_kib']:>15.1f}"
                      f"{_f(s['rss_per_added_stream_kib']):>7}"
                      f"   {busy.get('gateway', 0):.2f} {busy.get('llm', 0):.2f} "
                      f"{busy['client']:.2f}")  # fmt: skip
            held = [s["streams"] for s in st[via]
                    if not s["errors"] and (s["added_delay_ms"]["p99"] or 0) < 50]  # fmt: skip
            print(f"{'':<9}held with no error and p99 added delay < 50 ms: "
                  f"{max(held) if held else 'none'} of the steps")  # fmt: skip
    if "workers" in report:
        print_workers(report["workers"])
    if "cache" in report:
        print("\n4. Cache hits: the same question again, time to `done` (ms)")
        for path, c in report["cache"].items():
            h = c["hit_done_ms"]
            print(f"{PATHS[path]:<28} first ask (miss) {c['miss_done_ms']:.1f}; "
                  f"{h['n']} hits p50 {_f(h['p50'], '.2f')} p99 {_f(h['p99'], '.2f')} "
                  f"max {_f(h['max'], '.2f')}; errors {c['errors']}, "
                  f"not from the cache {c['not_cached']}")  # fmt: skip


def print_workers(wk: dict[str, Any]) -> None:
    print(f"\n5. One gateway worker or two: open streams, a token every "
          f"{wk['interval_ms']:g} ms, the client taking the workers in turn")  # fmt: skip
    print(f"{'workers':>7}{'round':>6}{'open':>6}{'err':>5}{'added p50':>10}{'p99':>8}"
          f"{'max':>8}{'delivered':>10}{'KiB/stream':>11}"
          f"   CPU busy: gateways (each) llm-svc client")  # fmt: skip
    for run in wk["runs"]:
        for s in run["steps"]:
            a, busy = s["added_delay_ms"], s["cpu_busy"]
            gateways = [busy.get(name, 0.0) for name in ("gateway", "gateway2") if name in busy]
            each = "+".join(f"{g:.2f}" for g in gateways)
            print(f"{run['workers']:>7}{run['round']:>6}{s['streams']:>6}{s['errors']:>5}"
                  f"{_f(a['p50']):>10}{_f(a['p99']):>8}{_f(a['max']):>8}"
                  f"{_f(s['tokens_delivered_vs_due'], '.3f'):>10}"
                  f"{s['rss_per_stream_kib']:>11.1f}"
                  f"   {sum(gateways):.2f} ({each}) {busy.get('llm', 0):.2f} "
                  f"{busy['client']:.2f}")  # fmt: skip


def print_peers(rl: dict[str, Any]) -> None:
    pr = rl["peers"]
    v = pr["versions"]
    print(f"\n2b. Relay peers: the same {rl['streams']} streams, a token every "
          f"{rl['interval_ms']:g} ms, the relays in turn, {pr['rounds']} round(s); "
          f"ragline {v['ragline']}, nginx {v['nginx']}, LiteLLM {v['litellm'] or '-'}")  # fmt: skip
    if pr["litellm"]["skipped"]:
        print(f"(no LiteLLM row: {pr['litellm']['skipped'].splitlines()[0]})")
    print(f"{'tokens/answer':>13}  {'relay':<30}{'answers':>8}{'err':>5}{'tokens':>9}"
          f"{'tok/s':>8}   µs CPU per token: relay  llm-svc  client")  # fmt: skip
    for i in range(len(rl["runs"])):
        for relay in pr["relays"].values():
            run = relay["runs"][i]
            u = run["us_per_token"]
            mine = sum(u[p] for p in relay["processes"])
            print(f"{run['tokens_per_answer']:>13}  {relay['label']:<30}{run['answers']:>8}"
                  f"{run['errors']:>5}{run['tokens_relayed']:>9}{run['tokens_per_s']:>8.0f}"
                  f"   {mine:>22.1f}{u['llm']:>9.1f}{u['client']:>8.1f}")  # fmt: skip
    long = rl["runs"][-1]["tokens_per_answer"]
    print(f"\n{'relay':<42}{'µs/token':>9}{'ratio':>7}{'µs/token':>10}{'ratio':>7}"
          f"{'ms/answer':>10}{'KiB/open':>10}")  # fmt: skip
    print(f"{'':<42}{f'({long}-token)':>9}{'':>7}{'(marginal)':>10}{'':>7}"
          f"{'besides':>10}{'stream':>10}")  # fmt: skip
    for r in pr["rows"]:
        print(f"{r['relay']:<42}{r['us_per_token']:>9.1f}{_f(r['ratio'], '.2f'):>7}"
              f"{r['marginal_us_per_token']:>10.1f}{_f(r['marginal_ratio'], '.2f'):>7}"
              f"{r['per_answer_ms']:>10.2f}{_f(r['rss_per_stream_kib']):>10}")  # fmt: skip
    for relay in pr["relays"].values():
        failed = [run for run in relay["runs"] if run["errors"]]
        if failed:
            print(f"!! {relay['label']}: {sum(run['errors'] for run in failed)} of "
                  f"{sum(run['answers'] for run in relay['runs'])} answers failed; "
                  f"first: {failed[0]['first_error']}")  # fmt: skip


async def run(bs: BenchStack, plan: Plan, only: set[str],
              peer_plan: PeerPlan | None = None) -> dict[str, Any]:  # fmt: skip
    report: dict[str, Any] = {"machine": machine(), "plan": plan.__dict__}
    if "overhead" in only:
        report["overhead"] = await bench_overhead(bs, plan)
    if "relay" in only:
        report["relay"] = await bench_relay(bs, plan, peer_plan)
    if "streams" in only:
        report["streams"] = await bench_streams(bs, plan)
    if "workers" in only:
        report["workers"] = await bench_workers(bs, plan)
    if "cache" in only:
        report["cache"] = await bench_cache(bs, plan)
    report["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated: {', '.join(PARTS)}")  # fmt: skip
    parser.add_argument("--concurrency", help="overhead: streams, e.g. 1,100,1000")
    parser.add_argument("--streams", help="open streams and workers: steps, e.g. 500,1000,2000")
    parser.add_argument("--rate", type=float, help="overhead: answers started per second")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: seconds, not minutes")
    parser.add_argument(
        "--peers", nargs="?", const="nginx,litellm", metavar="nginx,litellm",
        help="relay: other relays of llm-svc beside the gateway, a bare nginx and LiteLLM's "
             "proxy (installed into .venv-litellm if missing, except with --smoke)",
    )  # fmt: skip
    parser.add_argument("--work-dir", type=Path, help="default: a temporary directory")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    plan = SMOKE if args.smoke else Plan()
    if args.concurrency:
        plan = replace(plan, concurrency=tuple(int(x) for x in args.concurrency.split(",")))
    if args.streams:
        steps = tuple(int(x) for x in args.streams.split(","))
        plan = replace(plan, stream_steps=steps, worker_steps=steps)
    if args.rate:
        plan = replace(plan, rate=args.rate)
    if args.rounds:
        plan = replace(plan, rounds=args.rounds)
    # `kill` stops the stack too (the processes run in sessions of their own).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    unknown = only - set(PARTS)
    if unknown:
        parser.error(f"unknown --only parts: {', '.join(sorted(unknown))}")
    peer_plan = None
    if args.peers is not None:
        names = {x.strip() for x in args.peers.split(",") if x.strip()}
        if names - {"nginx", "litellm"}:
            parser.error(f"unknown --peers: {', '.join(sorted(names - {'nginx', 'litellm'}))}")
        if "relay" not in only:
            parser.error("--peers adds to the relay part: --only must include relay")
        peer_plan = prepare_peers(names, may_install=not args.smoke)

    with tempfile.TemporaryDirectory(prefix="ragline-bench-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        log(f"starting the stack in {work}")
        bs = BenchStack(work, plan)
        started = time.perf_counter()
        try:
            if peer_plan is not None and "overhead" not in only:
                # The relay part comes first: the peers (LiteLLM imports for seconds) start
                # beside the stack, while nothing is measured yet.
                launch_peers(bs, peer_plan)
            bs.start()
            log(f"stack ready in {time.perf_counter() - started:.1f} s")
            report = uvloop.run(run(bs, plan, only, peer_plan))
        finally:
            if peer_plan is not None:
                stop_peers(peer_plan)
            bs.stop()
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_report(report)


if __name__ == "__main__":
    main()
