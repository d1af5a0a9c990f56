"""Reranker throughput: pairs/s unbatched versus micro-batched, side by side, in one run.

Three ways to score the same synthetic requests (each a query and `--docs` passages of
`--words` words), all through reranker-svc's own code and timed wall clock including
tokenization:

- `pair by pair`: one forward pass per (query, passage) pair: no batching at all;
- `request by request`: one request at a time, its pairs sorted by length and cut by the
  token budget (`CrossEncoderScorer.score`): batching inside a request only;
- `micro-batched`: `--concurrency` callers at once through `MicroBatcher`, the service's
  batcher: passes are shared across requests under the token budget. A comma-separated
  list (`--concurrency 1,8,32`) runs it once per value, all the same requests.

Ratios are against `pair by pair`. Also printed: forward passes, pairs and padded/real
tokens per pass, and the micro-batched request latency (p50/p95).

Models: `--model tiny` (a 2-layer random-weight BERT built on the fly), `--model minilm`
(all-MiniLM-L6-v2's encoder with a random head: the size of a small production
reranker), or any sentence-transformers cross-encoder by hub id (from the HF cache) or
path. Random-weight models measure speed only, never quality.

Run from the repository root:

    .venv/bin/python benchmarks/rerank_throughput.py --model minilm --requests 16
    .venv/bin/python benchmarks/rerank_throughput.py --model BAAI/bge-reranker-base \\
        --device cuda --dtype float16 --requests 256 --concurrency 64 --max-batch-tokens 65536

On a GPU host, raise `--requests` and `--concurrency` (and try `--max-batch-tokens`) until
the micro-batched figure stops growing; `pair by pair` is capped at `--unbatched-pairs`
pairs so that it does not dominate the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ragline_reranker.batching import MicroBatcher
from ragline_reranker.scorers import (
    CrossEncoderScorer,
    Pair,
    default_max_batch_tokens,
    quiet_tokenizer_threads,
    resolve_device,
)
from ragline_reranker.tiny import build_minilm_cross_encoder, build_tiny_cross_encoder

VOCAB = (
    "water boils at sea level degrees celsius pressure altitude mountain river city "
    "history empire trade market stock price energy solar plant light carbon protein "
    "cell gene virus vaccine network protocol server request latency cache memory disk "
    "the of and to in a is that for on with as by at from it this be are was"
).split()


def make_requests(n: int, docs: int, words: tuple[int, int], seed: int) -> list[list[Pair]]:
    rng = random.Random(seed)
    requests = []
    for i in range(n):
        query = " ".join(rng.choices(VOCAB, k=rng.randint(4, 12))) + f"? {i}"
        passages = [" ".join(rng.choices(VOCAB, k=rng.randint(*words))) for _ in range(docs)]
        requests.append([(query, p) for p in passages])
    return requests


def load_model(name: str, workdir: Path, args: argparse.Namespace) -> CrossEncoderScorer:
    device = resolve_device(args.device)
    quiet_tokenizer_threads(device)  # as the service does
    if name == "tiny":
        name = str(build_tiny_cross_encoder(workdir / "tiny"))
    elif name == "minilm":
        name = str(build_minilm_cross_encoder(workdir / "minilm"))
    return CrossEncoderScorer(
        name,
        device=device,
        dtype=args.dtype,
        max_length=args.max_length,
        max_batch_tokens=args.max_batch_tokens or default_max_batch_tokens(device),
        local_files_only=not args.allow_download,
    )


def pair_by_pair(scorer: CrossEncoderScorer, pairs: list[Pair]) -> dict[str, Any]:
    start = time.perf_counter()
    for pair in pairs:
        scorer.forward(scorer.encode([pair]).features)
    elapsed = time.perf_counter() - start
    return {"pairs": len(pairs), "seconds": elapsed, "passes": len(pairs)}


def request_by_request(scorer: CrossEncoderScorer, requests: list[list[Pair]]) -> dict[str, Any]:
    passes = 0
    forward = scorer.forward

    def counting(features: list[Any]) -> list[float]:
        nonlocal passes
        passes += 1
        return forward(features)

    scorer.forward = counting  # type: ignore[method-assign]
    try:
        start = time.perf_counter()
        for request in requests:
            scorer.score(request)
        elapsed = time.perf_counter() - start
    finally:
        del scorer.forward  # back to the class's method
    return {"pairs": sum(map(len, requests)), "seconds": elapsed, "passes": passes}


def micro_batched(
    scorer: CrossEncoderScorer,
    requests: list[list[Pair]],
    args: argparse.Namespace,
    concurrency: int,
) -> dict[str, Any]:
    lengths: list[list[int]] = []
    forward = scorer.forward

    def recording(features: list[Any]) -> list[float]:
        lengths.append([len(f["input_ids"]) for f in features] if scorer.tokenize_once else [])
        return forward(features)

    async def main() -> tuple[float, list[float]]:
        batcher = MicroBatcher(
            scorer,
            max_batch_tokens=scorer.max_batch_tokens,
            max_batch_pairs=args.max_batch_pairs,
            max_queue_pairs=sum(map(len, requests)),
            max_wait_ms=args.max_wait_ms,
        )
        batcher.start()
        gate = asyncio.Semaphore(concurrency)
        latencies: list[float] = []

        async def one(request: list[Pair]) -> None:
            async with gate:
                t0 = time.perf_counter()
                await batcher.score(request)
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        await asyncio.gather(*(one(r) for r in requests))
        elapsed = time.perf_counter() - start
        await batcher.close()
        return elapsed, latencies

    scorer.forward = recording  # type: ignore[method-assign]
    try:
        elapsed, latencies = asyncio.run(main())
    finally:
        del scorer.forward
    result: dict[str, Any] = {
        "pairs": sum(map(len, requests)),
        "seconds": elapsed,
        "passes": len(lengths),
        "latency_p50_ms": 1000 * statistics.median(latencies),
        "latency_p95_ms": 1000 * statistics.quantiles(latencies, n=20)[-1]
        if len(latencies) >= 2
        else 1000 * latencies[0],
    }
    if scorer.tokenize_once:
        result["padded_tokens_per_pass"] = statistics.mean(max(x) * len(x) for x in lengths)
        result["real_tokens_per_pass"] = statistics.mean(sum(x) for x in lengths)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm", help="tiny, minilm, a hub id or a path")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"]
    )
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--docs", type=int, default=50, help="passages per request")
    parser.add_argument("--words", default="20-120", help="passage length range in words")
    parser.add_argument(
        "--concurrency", default="16", help="callers at once; a list (1,8,32) runs each"
    )
    parser.add_argument(
        "--max-batch-tokens", type=int, default=None, help="default: the service's for the device"
    )
    parser.add_argument("--max-batch-pairs", type=int, default=128)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--unbatched-pairs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allow-download", action="store_true", help="let the hub be used")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    low, high = (int(x) for x in args.words.split("-"))
    concurrencies = [int(x) for x in str(args.concurrency).split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        print(f"loading {args.model} ...", file=sys.stderr)
        scorer = load_model(args.model, Path(tmp), args)
    requests = make_requests(args.requests, args.docs, (low, high), args.seed)
    all_pairs = [p for r in requests for p in r]
    scorer.score(all_pairs[: args.max_batch_pairs])  # warm-up: kernels, allocator, caches

    print("pair by pair ...", file=sys.stderr)
    runs = {"pair by pair": pair_by_pair(scorer, all_pairs[: args.unbatched_pairs])}
    print("request by request ...", file=sys.stderr)
    runs["request by request"] = request_by_request(scorer, requests)
    for concurrency in concurrencies:
        name = (
            "micro-batched"
            if len(concurrencies) == 1
            else f"batched, {concurrency} caller{'s' * (concurrency > 1)}"
        )
        print(f"{name} ...", file=sys.stderr)
        runs[name] = micro_batched(scorer, requests, args, concurrency)
        runs[name]["concurrency"] = concurrency
    base = runs["pair by pair"]["pairs"] / runs["pair by pair"]["seconds"]
    for run in runs.values():
        run["pairs_per_s"] = run["pairs"] / run["seconds"]
        run["ratio"] = run["pairs_per_s"] / base
        run["pairs_per_pass"] = run["pairs"] / run["passes"]

    setup = {
        "model": args.model,
        "device": scorer.device,
        "device_name": torch.cuda.get_device_name(0) if scorer.device.startswith("cuda") else "cpu",
        "dtype": str(scorer.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "tokenize_once": scorer.tokenize_once,
        "max_length": scorer.max_length,
        "requests": args.requests,
        "docs": args.docs,
        "words": args.words,
        "concurrency": concurrencies,
        "max_batch_tokens": scorer.max_batch_tokens,
        "max_batch_pairs": args.max_batch_pairs,
        "max_wait_ms": args.max_wait_ms,
    }
    if args.json:
        print(json.dumps({"setup": setup, "runs": runs}, indent=2))
        return
    print(" ".join(f"{k}={v}" for k, v in setup.items()))
    print(
        f"{'mode':<26}{'pairs':>7}{'pairs/s':>10}{'x unbatched':>13}{'passes':>8}"
        f"{'pairs/pass':>12}{'request p50/p95 ms':>20}"
    )
    for name, run in runs.items():
        latency = (
            f"{run['latency_p50_ms']:.0f} / {run['latency_p95_ms']:.0f}"
            if "latency_p50_ms" in run
            else ""
        )
        print(
            f"{name:<26}{run['pairs']:>7}{run['pairs_per_s']:>10.1f}{run['ratio']:>13.2f}"
            f"{run['passes']:>8}{run['pairs_per_pass']:>12.1f}{latency:>20}"
        )
    for name, mb in runs.items():
        if "padded_tokens_per_pass" in mb:
            print(
                f"{name}: tokens per pass {mb['real_tokens_per_pass']:.0f} real / "
                f"{mb['padded_tokens_per_pass']:.0f} padded"
            )


if __name__ == "__main__":
    main()
