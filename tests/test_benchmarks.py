"""The benchmarks run end to end at a small size, so that they cannot rot unnoticed.

They run as subprocesses, exactly as documented, and only check that the reports have
their parts and that the figures are sane; nothing here asserts anything about speed.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ragline_common.wire import ChatMessage
from ragline_llm.engines.base import GenerationDelta, GenerationRequest
from ragline_llm.engines.fixed import FixedEngine

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "retrieval_scale.py"
SQUAD_DEV = REPO_ROOT.parent / "shared" / "data" / "squad-dev"
CHUNKS = 2000
QUERIES = 30


def run_benchmark(work_dir: Path) -> dict[str, Any]:
    command = [
        sys.executable,
        str(SCRIPT),
        "--chunks",
        str(CHUNKS),
        "--queries",
        str(QUERIES),
        "--embed-queries",
        "5",
        "--work-dir",
        str(work_dir),
        "--json",
    ]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"benchmark failed:\n{done.stderr[-6000:]}"
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def check_latency(stats: dict[str, Any], n: int) -> None:
    assert stats["n"] == n
    assert 0 < stats["p50_ms"] <= stats["p99_ms"] <= stats["max_ms"]


def test_retrieval_scale_benchmark_reports_sane_figures(tmp_path: Path) -> None:
    report = run_benchmark(tmp_path / "work")

    assert report["config"]["chunks"] == CHUNKS
    versions = report["environment"]["versions"]
    assert versions["tantivy"] and versions["pymilvus"] and versions["milvus-lite"]
    assert report["environment"]["cpu_count"] >= 1
    assert report["corpus"]["chunks"] == CHUNKS
    assert 60 <= report["corpus"]["words_per_chunk"]["mean"] <= 160
    assert "synthetic" in report["corpus"]["vectors"]

    for store in ("lexical", "dense", "both"):
        ingest = report["ingest"][store]
        assert ingest["chunks"] == CHUNKS
        assert ingest["chunks_per_s"] > 0
        assert ingest["seconds"] > 0
        assert ingest["batch_ms"]["p50_ms"] <= ingest["batch_ms"]["p99_ms"]
    assert report["ingest"]["both"]["write_only_chunks_per_s"] > 0

    search = report["search"]
    for mode in ("lexical", "dense", "hybrid"):
        check_latency(search[mode], QUERIES)
    assert search["degraded_answers"] == 0
    assert search["overlap"]["alone_max_p50_ms"] <= search["overlap"]["alone_sum_p50_ms"]
    first = search["first_after_ingest"]
    assert all(first[f"{mode}_ms"] > 0 for mode in ("lexical", "dense", "hybrid"))

    quality = report["quality"]
    assert quality["dense_recall_at_10_vs_exact"] >= 0.8
    assert 0 <= quality["passage_source_in_top10"]["hybrid"] <= 1

    reopen = report["reopen"]
    assert reopen["open_s"] > 0
    for mode in ("lexical", "dense", "hybrid"):
        assert reopen["after_first"][mode]["p50_ms"] <= reopen["after_first"][mode]["p99_ms"]

    embedding = report["query_embedding"]
    assert embedding["queries"] == 5
    assert embedding["cached"]["p50_ms"] < embedding["cold"]["p50_ms"]

    assert report["memory"]["peak_rss_mib"] > 0
    assert report["disk_mib"]["tantivy"] > 0 and report["disk_mib"]["milvus_lite"] > 0


GATEWAY_BENCH = REPO_ROOT / "benchmarks" / "gateway_bench.py"


def printed_report(report_json: str) -> subprocess.CompletedProcess[str]:
    """`gateway_bench.print_report` of a `--json` report, as the text output prints it."""
    text = subprocess.run(
        [sys.executable, "-c", "import json, sys; sys.path.insert(0, sys.argv[1]); "
         "import gateway_bench as g; g.print_report(json.load(sys.stdin))",
         str(GATEWAY_BENCH.parent)],
        input=report_json, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert text.returncode == 0, text.stderr[-3000:]
    return text


def test_gateway_benchmark_smoke_runs_and_prints_its_tables(tmp_path: Path) -> None:
    """`gateway_bench.py --smoke` starts its own small stack (fixed engine) and runs every
    part at toy sizes; speed is not judged here, only that each part ran cleanly."""
    command = [sys.executable, str(GATEWAY_BENCH), "--smoke", "--work-dir", str(tmp_path), "--json"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"benchmark failed:\n{done.stderr[-6000:]}"
    report: dict[str, Any] = json.loads(done.stdout)

    assert report["machine"]["cpu_count"] >= 1
    rows = report["overhead"]
    assert {(r["streams"], r["path"]) for r in rows} == {
        (n, path) for n in (1, 4) for path in ("direct", "gateway", "nginx")
    }
    for row in rows:
        assert row["errors"] == 0 and row["degraded"] == 0, row
        assert 0 < row["ttft_ms"]["p50"] <= row["ttft_ms"]["p99"]
    relay = report["relay"]
    for run in relay["runs"]:
        assert run["errors"] == 0
        assert run["tokens_relayed"] == run["answers"] * run["tokens_per_answer"]
        assert run["us_per_token"]["gateway"] >= 0
    for via in ("gateway", "llm"):
        steps = report["streams"][via]
        assert [s["streams"] for s in steps] == [5, 10]
        assert all(s["errors"] == 0 and s["added_delay_ms"]["n"] > 0 for s in steps)
    workers = report["workers"]["runs"]
    assert [run["workers"] for run in workers] == [1, 2]
    for run in workers:
        assert [s["streams"] for s in run["steps"]] == [4, 8]
        assert all(s["errors"] == 0 and s["added_delay_ms"]["n"] > 0 for s in run["steps"])
    assert "gateway2" not in workers[0]["steps"][0]["cpu_busy"]
    assert {"gateway", "gateway2"} <= set(workers[1]["steps"][0]["cpu_busy"])
    for path in ("nginx", "gateway"):
        cache = report["cache"][path]
        assert cache["errors"] == 0 and cache["not_cached"] == 0
        assert cache["hit_done_ms"]["n"] == 10

    # The text report of the same run prints every table.
    text = printed_report(done.stdout)
    titles = ("1. Time to first token", "2. Relay cost", "3. Open streams", "4. Cache hits",
              "5. One gateway worker or two")  # fmt: skip
    for title in titles:
        assert title in text.stdout


def test_gateway_benchmark_relay_peers_smoke_has_the_bare_nginx_row(tmp_path: Path) -> None:
    """`--smoke --only relay --peers nginx`: a bare nginx in front of llm-svc relays the
    same streams as the gateway, in the same run, and gets its row beside the gateway's
    and llm-svc's (LiteLLM's row is left out: installing it takes too long for CI)."""
    command = [sys.executable, str(GATEWAY_BENCH), "--smoke", "--only", "relay",
               "--peers", "nginx", "--work-dir", str(tmp_path), "--json"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"benchmark failed:\n{done.stderr[-6000:]}"
    report: dict[str, Any] = json.loads(done.stdout)

    peers = report["relay"]["peers"]
    assert set(peers["relays"]) == {"gateway", "nginx-peer"}
    for relay in peers["relays"].values():
        for run in relay["runs"]:
            assert run["errors"] == 0, run
            assert run["tokens_relayed"] == run["answers"] * run["tokens_per_answer"]
            assert all(run["us_per_token"][p] >= 0 for p in relay["processes"])
    assert [r["process"] for r in peers["rows"]] == ["gateway", "nginx", "nginx-peer", "llm"]
    assert peers["rows"][0]["ratio"] in (1.0, None)  # None: no CPU tick at toy sizes
    assert peers["versions"]["nginx"] and peers["versions"]["ragline"]
    assert peers["litellm"] == {"asked": False, "install_s": None, "skipped": None}
    assert "nginx → llm-svc" in done.stderr  # the peer was started, and stopped with the run

    text = printed_report(done.stdout)
    assert "2b. Relay peers" in text.stdout and "nginx, bare relay of llm-svc" in text.stdout


def test_gateway_benchmark_smoke_never_installs_litellm(tmp_path: Path) -> None:
    """With LiteLLM missing, `--smoke --peers` skips its row with a message instead of
    installing it (a few hundred MB); only a full `--peers` run installs it."""
    code = (
        "import pathlib, sys; sys.path.insert(0, sys.argv[1]); import peers, gateway_bench as g; "
        "peers.LITELLM_VENV = pathlib.Path(sys.argv[2]); "
        "p = g.prepare_peers({'nginx', 'litellm'}, may_install=False); "
        "print(p.litellm_version, p.litellm_install_s, p.litellm_skipped, sep='|')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(GATEWAY_BENCH.parent), str(tmp_path / "no-venv")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    version, install_s, skipped = done.stdout.strip().split("|")
    assert (version, install_s) == ("None", "None")
    assert "not installed" in skipped and "without `--smoke` installs it" in skipped
    assert not (tmp_path / "no-venv").exists()


def test_fixed_engine_streams_n_words_on_a_fixed_schedule() -> None:
    """The benchmarks' engine: `tokens` words whatever the prompt, token i due i intervals
    after the first, fewer (`length`) when max_tokens is lower."""

    async def run(max_tokens: int) -> tuple[list[GenerationDelta], list[float]]:
        engine = FixedEngine("bench", tokens=5, token_interval_ms=20)
        await engine.start()
        request = GenerationRequest(
            "id", [ChatMessage(role="user", content="anything at all")], max_tokens
        )
        deltas, times = [], []
        async for delta in engine.stream(request):
            deltas.append(delta)
            times.append(time.perf_counter())
        assert engine.unfinished_requests() == 0
        return deltas, times

    deltas, times = asyncio.run(run(100))
    assert "".join(d.text for d in deltas) == "token token token token token"
    assert [d.finish_reason for d in deltas] == [None] * 5 + ["stop"]
    assert deltas[-1].completion_tokens == 5
    assert times[4] - times[0] >= 4 * 0.020 - 0.002  # on schedule, never early

    deltas, _ = asyncio.run(run(2))
    assert [d.text for d in deltas] == ["token", " token", ""]
    assert deltas[-1].finish_reason == "length"


@pytest.mark.skipif(
    not SQUAD_DEV.is_dir(), reason=f"{SQUAD_DEV} is absent (CI puts shared/ beside the clone)"
)
def test_extractive_squad_benchmark_meets_the_answer_goals() -> None:
    """benchmarks/extractive_squad.py on the working tree's engine (seconds, no stack):
    the goals the extractive answers were rebuilt for hold on all 473 questions."""
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "extractive_squad.py"),
               "--data", str(SQUAD_DEV), "--before", "none", "--json"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    for layout in ("plain", "structured"):
        after = report[layout]["after"]
        assert after["citation precision"] >= 0.98, (layout, after)
        assert after["answers with a gold sentence"] >= 0.899, (layout, after)
        assert after["uncited answers"] == 0 and after["declined (don't know)"] <= 0.02, after
        assert after["heading marks"] == 0 and after["glued title/list marker"] == 0, after
        assert 1 <= after["sentences/answer"] <= 2, after
    # Asked of passages about something else, it mostly says the documents don't say.
    assert report["unrelated"]["after"]["declined (don't know)"] >= 0.7, report["unrelated"]
