"""The gateway's pure pieces: the keys file rules, the history budget, the cache key, the
in-process limiter that serves a single replica without Redis, and the blend ranking with
its relevance cut-off."""

from __future__ import annotations

import asyncio

import pytest

from ragline_common.errors import ApiError
from ragline_common.wire import Hit
from ragline_gateway.auth import Caller, KeyRing, hash_key, new_key, parse_keys
from ragline_gateway.cache import cache_key, normalise
from ragline_gateway.limits import LocalLimiter
from ragline_gateway.memory import Turn
from ragline_gateway.prompt import estimate_tokens, fit_history
from ragline_gateway.ranking import Cutoff, blend, resolve


def entry(id_: str, tenant: str, collections: list[str], **extra: object) -> dict[str, object]:
    return {"id": id_, "tenant": tenant, "sha256": hash_key(id_), "scopes": ["chat"],
            "collections": collections, **extra}  # fmt: skip


def keys_json(*entries: dict[str, object]) -> str:
    import orjson

    return orjson.dumps({"keys": list(entries)}).decode()


@pytest.mark.parametrize(
    ("a", "b"),
    [(["acme_*"], ["acme_docs"]), (["acme_*"], ["acme_x*"]), (["docs"], ["docs"]),
     (["a*"], ["acme_docs"])],
)  # fmt: skip
def test_two_tenants_may_not_claim_one_collection(a: list[str], b: list[str]) -> None:
    with pytest.raises(ValueError, match="belongs to one tenant"):
        parse_keys(keys_json(entry("k1", "acme", a), entry("k2", "globex", b)))


def test_keys_file_rules() -> None:
    # One tenant may list a collection on several keys; prefixes that do not overlap are fine.
    parse_keys(keys_json(entry("k1", "acme", ["acme_*"]), entry("k2", "acme", ["acme_docs"]),
                         entry("k3", "globex", ["globex_*"])))  # fmt: skip
    with pytest.raises(ValueError, match="duplicate key id"):
        parse_keys(keys_json(entry("k1", "acme", ["a"]), entry("k1", "acme", ["b"])))
    with pytest.raises(ValueError, match="invalid API keys"):
        parse_keys(keys_json({**entry("k1", "acme", ["a"]), "sha256": "not-a-hash"}))
    with pytest.raises(ValueError, match="invalid API keys"):
        parse_keys(keys_json({**entry("k1", "acme", ["a"]), "scopes": ["root"]}))
    # The error names where, never the values (which are secrets' hashes).
    try:
        parse_keys(keys_json({**entry("k1", "acme", ["a"]), "sha256": "ab" * 31 + "zz"}))
    except ValueError as exc:
        assert "ab" * 31 not in str(exc)


def test_a_key_reaches_its_collections_only() -> None:
    key = new_key()
    keys = keys_json({**entry("k", "acme", ["acme_*", "shared_acme"]), "sha256": hash_key(key)})
    ring = KeyRing(
        parse_keys(keys), default_collection="default", requests_per_minute=10, max_streams=2
    )
    caller = ring.lookup(key)
    assert isinstance(caller, Caller) and ring.lookup(key + "x") is None
    assert caller.collection("acme_docs") == "acme_docs"
    assert caller.collection(None) == "shared_acme"  # the first exact name: "default" is not its
    for other in ("acme", "globex_docs", "shared_acme2", "default"):
        with pytest.raises(ApiError) as exc:
            caller.collection(other)
        assert exc.value.status == 403
    assert caller.visible(["acme_a", "globex_b", "shared_acme"]) == ["acme_a", "shared_acme"]
    assert (caller.requests_per_minute, caller.max_streams) == (10, 2)


def test_history_fits_the_token_budget() -> None:
    turns = [Turn(f"question {i}", "answer " * 100) for i in range(5)]
    one = estimate_tokens(turns[0].question) + estimate_tokens(turns[0].answer)
    assert fit_history(turns, one * 5) == turns
    assert fit_history(turns, one * 2 + 1) == turns[-2:]  # the oldest go first
    cut = fit_history(turns, one // 2)  # the newest alone does not fit: it is cut short
    assert len(cut) == 1 and cut[0].question == "question 4"
    assert 0 < len(cut[0].answer) < len(turns[4].answer)
    assert fit_history(turns, 0) == []


def test_cache_key_holds_what_the_answer_depends_on() -> None:
    base = {"tenant": "t", "collection": "c", "question": "How tall is it?", "filters": {},
            "generation": {"model": "m", "temperature": 0.2}, "index_version": "e-1"}  # fmt: skip
    key = cache_key(**base)  # type: ignore[arg-type]
    assert normalise("  HOW   tall is it \uff1f") == normalise("how tall is it")
    assert cache_key(**{**base, "question": " how TALL is it"}) == key  # type: ignore[arg-type]
    for field, value in [("tenant", "u"), ("collection", "d"), ("filters", {"a": 1}),
                         ("generation", {"model": "m", "temperature": 0.3}),
                         ("index_version", "e-2"), ("question", "How wide is it?")]:  # fmt: skip
        assert cache_key(**{**base, field: value}) != key, field  # type: ignore[arg-type]


def test_local_limiter_counts_requests_and_streams() -> None:
    async def run() -> None:
        limiter = LocalLimiter()
        caller = Caller("k", "t", frozenset({"chat"}), ("c",), requests_per_minute=3, max_streams=1)
        lease = await limiter.acquire(caller, stream=True)
        assert lease is not None
        with pytest.raises(ApiError) as exc:
            await limiter.acquire(caller, stream=True)
        assert exc.value.status == 429 and exc.value.headers == {"Retry-After": "1"}
        await limiter.release(lease)
        # A request refused for its streams did not count: two more fit in the minute.
        assert await limiter.acquire(caller, stream=False) is None
        assert await limiter.acquire(caller, stream=False) is None
        with pytest.raises(ApiError) as exc:
            await limiter.acquire(caller, stream=False)  # the fourth request in the minute
        assert exc.value.headers and 1 <= int(exc.value.headers["Retry-After"]) <= 60

    asyncio.run(run())


def test_ragline_keys_new_writes_only_the_digest(
    tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    from pathlib import Path

    import orjson

    from ragline_cli.main import main

    keys_file = Path(str(tmp_path)) / "keys.json"
    args = ["keys", "new", "--tenant", "acme", "--collection", "acme_*", "--file", str(keys_file)]
    assert main([*args, "--id", "web"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("rl-") and key not in keys_file.read_text()
    stored = orjson.loads(keys_file.read_bytes())["keys"]
    assert stored == [{"id": "web", "tenant": "acme", "sha256": hash_key(key),
                       "scopes": ["chat"], "collections": ["acme_*"]}]  # fmt: skip
    # Another tenant cannot be given acme's collections: the file is left as it was.
    with pytest.raises(SystemExit, match="one tenant"):
        main(["keys", "new", "--id", "x", "--tenant", "globex", "--collection", "acme_docs",
              "--file", str(keys_file)])  # fmt: skip
    assert orjson.loads(keys_file.read_bytes())["keys"] == stored


def hit(chunk_id: str, lexical: float | None, dense: float | None) -> Hit:
    return Hit(chunk_id=chunk_id, doc_id=chunk_id, text=chunk_id, score=0.0,
               scores={"lexical": lexical, "dense": dense})  # fmt: skip


def test_blend_mixes_bm25_over_the_top_one_with_the_cosine() -> None:
    hits = [hit("a", 10.0, 0.2), hit("b", 5.0, 0.9), hit("c", None, 0.5)]
    ranked = blend(hits, 0.4)
    assert [(h.chunk_id, round(s, 6)) for h, s in ranked] == [
        ("b", round(0.4 * 0.5 + 0.6 * 0.9, 6)),
        ("a", round(0.4 * 1.0 + 0.6 * 0.2, 6)),
        ("c", round(0.6 * 0.5, 6)),  # not among the lexical hits: BM25 counts 0
    ]
    # A backend down: the other's scores alone rank, whatever the weight.
    no_lexical = [hit("a", None, 0.2), hit("b", None, 0.9)]
    assert [(h.chunk_id, s) for h, s in blend(no_lexical, 0.4)] == [("b", 0.9), ("a", 0.2)]
    no_dense = [hit("a", 2.0, None), hit("b", 8.0, None)]
    assert [(h.chunk_id, s) for h, s in blend(no_dense, 0.4)] == [("b", 1.0), ("a", 0.25)]
    assert blend([], 0.4) == []


def test_cutoff_keeps_the_top_source_and_those_near_it() -> None:
    ranked = [(hit(c, 1.0, 0.5), s) for c, s in (("a", 0.8), ("b", 0.7), ("c", 0.5), ("d", 0.2))]

    def kept(cut: Cutoff) -> list[str]:
        return [h.chunk_id for h, _ in cut.apply(ranked)]

    assert kept(Cutoff()) == ["a", "b", "c", "d"]
    assert kept(Cutoff(max_drop=0.15)) == ["a", "b"]
    assert kept(Cutoff(max_drop=0.3)) == ["a", "b", "c"]
    assert kept(Cutoff(min_score=0.6)) == ["a", "b"]
    assert kept(Cutoff(max_drop=0.5, min_score=0.55)) == ["a", "b"]
    assert kept(Cutoff(min_score=5.0)) == ["a"]  # always one
    assert Cutoff(max_drop=0.1).apply([]) == []


def test_auto_ranking_skips_a_reranker_without_a_cross_encoder() -> None:
    assert resolve("auto", "bi-encoder") == "blend"
    for scorer in ("cross-encoder", "external", None):  # None: not known yet
        assert resolve("auto", scorer) == "reranker"
    assert resolve("fused", "cross-encoder") == "fused"
    assert resolve("reranker", "bi-encoder") == "reranker"


def test_a_follow_up_query_stays_within_the_retrievers_limit() -> None:
    from ragline_common.wire import MAX_QUERY_CHARS
    from ragline_gateway.memory import Turn
    from ragline_gateway.rewrite import concatenated

    assert concatenated("and then?", []) == "and then?"
    assert concatenated("and then?", [Turn("Who was Rollo?", "x")]) == "Who was Rollo? and then?"
    long = "w" * (MAX_QUERY_CHARS - 10)
    query = concatenated(long, [Turn("Who was Rollo? " * 50, "x")])
    assert len(query) <= MAX_QUERY_CHARS and query.endswith(long)
    assert concatenated("q" * MAX_QUERY_CHARS, [Turn("earlier", "x")]) == "q" * MAX_QUERY_CHARS
