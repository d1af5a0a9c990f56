"""The retrieval benchmark runs end to end at a small size, so that it cannot rot unnoticed.

It runs as a subprocess, exactly as documented, and only checks that the report has its
parts and that the figures are sane; it asserts nothing about speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "retrieval_scale.py"
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
