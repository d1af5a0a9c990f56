"""Render an evaluation: a plain-text table for people, one JSON object for scripts.

The JSON shape is fixed (`{mode: {metric: value}}`, every mode and metric present, null
for a mode that was not measured) so a script or a test can compare runs without
knowing which optional parts ran.
"""

from __future__ import annotations

import json

from ragline_retriever.evaluation.harness import (
    MODES,
    SWEEP_METRICS,
    EvalResult,
    Sweep,
    SweepRow,
)
from ragline_retriever.evaluation.metrics import METRICS

JSON_METRICS = (*METRICS, "p50_ms", "p99_ms")


def as_json_object(result: EvalResult) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for mode in MODES:
        found = result.modes.get(mode)
        values: dict[str, float | None] = dict.fromkeys(JSON_METRICS)
        if found is not None and found.metrics is not None:
            values.update({name: round(found.metrics[name], 4) for name in METRICS})
            values["p50_ms"] = None if found.p50_ms is None else round(found.p50_ms, 2)
            values["p99_ms"] = None if found.p99_ms is None else round(found.p99_ms, 2)
        out[mode] = values
    return out


def render_json(result: EvalResult) -> str:
    return json.dumps(as_json_object(result), indent=2)


def _weights(w: tuple[float, float]) -> str:
    return f"{w[0]:g}:{w[1]:g}"


def render_header(result: EvalResult) -> str:
    s = result.settings
    lines = [
        f"Retrieval quality: {result.dataset} — {result.documents} documents "
        f"({result.chunks} chunks), {result.queries} queries with qrels; "
        f"ingest {result.ingest_s:.1f} s",
        f"embedding {s['embedding_model']} on {s['embedding_device']}; chunks "
        f"{s['chunk_size']}/{s['chunk_overlap']} words; hybrid = search.retrieve top_k "
        f"{s['hybrid_top_k']}, rrf_k {s['rrf_k']}, candidates lexical "
        f"{s['lexical_candidates']} / dense {s['dense_candidates']}, weights "
        f"{_weights((s['rrf_weight_lexical'], s['rrf_weight_dense']))} (lexical:dense)",
        "latency: per query, sequential, after warm-up; query-embedding cache off "
        "(query_cache_size=0)",
    ]
    lines.extend(f"warning: {w}" for w in result.warnings)
    return "\n".join(lines)


def render_table(result: EvalResult) -> str:
    head = f"{'mode':<14}" + "".join(f"{m:>11}" for m in (*METRICS, "p50 ms", "p99 ms"))
    lines = [head, "-" * len(head)]
    for mode in MODES:
        found = result.modes.get(mode)
        if found is None or found.metrics is None:
            note = found.note if found is not None else "not run"
            lines.append(f"{mode:<14}  not measured: {note}")
            continue
        row = f"{mode:<14}" + "".join(f"{found.metrics[m]:>11.3f}" for m in METRICS)
        row += f"{found.p50_ms or 0.0:>11.1f}{found.p99_ms or 0.0:>11.1f}"
        lines.append(row)
    for mode in MODES:
        found = result.modes.get(mode)
        if found is not None and found.degraded:
            lines.append(
                f"warning: {mode}: {found.degraded} of {found.queries} queries were answered "
                "degraded (a backend failed or timed out); its numbers understate the mode"
            )
    return "\n".join(lines)


def best_row(sweep: Sweep) -> SweepRow | None:
    """Best nDCG@10 (then MRR@10) among settings whose recall@20 reaches the best single
    backend's; None when no setting does."""
    floor = max(m["recall@20"] for m in sweep.single.values())
    eligible = [r for r in sweep.rows if r.metrics["recall@20"] >= floor]
    if not eligible:
        return None
    return max(eligible, key=lambda r: (r.metrics["ndcg@10"], r.metrics["mrr@10"]))


def _is_current(row: SweepRow, sweep: Sweep) -> bool:
    k, lexical_depth, dense_depth, weights = sweep.current
    return (
        row.k == k and row.depth == lexical_depth == dense_depth and row.weights == tuple(weights)
    )


def render_sweep(sweep: Sweep) -> str:
    depth = max(r.depth for r in sweep.rows)
    lines = [
        f"Fusion sweep (hybrid, computed offline from each backend's list fetched once at "
        f"depth {depth}; the same depth for both backends)",
    ]
    for role, metrics in sweep.single.items():
        lines.append(
            f"  {role} alone: " + ", ".join(f"{name} {metrics[name]:.3f}" for name in SWEEP_METRICS)
        )
    best = best_row(sweep)
    head = (
        f"{'depth':>6}{'k':>6}{'lex:dense':>11}"
        + "".join(f"{m:>11}" for m in SWEEP_METRICS)
        + f"{'nDCG vs =':>12}"
    )
    lines += ["", head, "-" * (len(head) + 3)]
    for row in sweep.rows:
        mark = " *" if row is best else ""
        mark += " =" if _is_current(row, sweep) else ""
        lines.append(
            f"{row.depth:>6}{row.k:>6}{_weights(row.weights):>11}"
            + "".join(f"{row.metrics[m]:>11.3f}" for m in SWEEP_METRICS)
            + f"{f'+{row.better}/-{row.worse}':>12}"
            + mark
        )
    lines.append("")
    lines.append(
        "= current settings; 'nDCG vs =': queries whose nDCG@10 is higher/lower than with them"
    )
    if best is None:
        lines.append("* none: no setting reaches the best single backend's recall@20")
    else:
        lines.append(
            f"* best nDCG@10 with recall@20 >= the best single backend's: k {best.k}, "
            f"depth {best.depth}, weights {_weights(best.weights)} (lexical:dense)"
        )
    return "\n".join(lines)


def render_text(result: EvalResult) -> str:
    parts = [render_header(result), "", render_table(result)]
    if result.sweep is not None:
        parts += ["", render_sweep(result.sweep)]
    return "\n".join(parts)
