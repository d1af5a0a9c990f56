"""Making a follow-up question searchable on its own ("and its population?" means nothing
to a search index).

Two ways, chosen by `query_rewrite`:
- `concat` (default): the previous question and this one, joined. Free, and good enough
  for BM25 and dense search alike when follow-ups stay on topic.
- `llm`: llm-svc rewrites the question into a standalone query, at the price of one short
  generation before retrieval. If it fails or times out, concatenation is used and the
  answer says `degraded: ["rewrite"]`.
"""

from __future__ import annotations

import logging
from typing import Literal

import anyio

from ragline_common.wire import MAX_QUERY_CHARS
from ragline_gateway.clients.base import UpstreamError
from ragline_gateway.clients.llm import LlmClient
from ragline_gateway.memory import Turn

log = logging.getLogger("ragline.rewrite")

REWRITE_PROMPT = (
    "Rewrite the user's last question as one standalone search query, using the "
    "conversation only to resolve what it refers to. Reply with the query alone."
)
_MAX_CONTEXT_CHARS = 600  # per earlier answer: the gist is enough to resolve references
_MAX_QUERY_CHARS = 1000


def concatenated(question: str, history: list[Turn]) -> str:
    """The previous question, then this one, within the retriever's query limit: this
    question whole, the previous one cut to the room left (a long follow-up must not turn
    into a 422 from the retriever)."""
    if not history:
        return question
    room = MAX_QUERY_CHARS - len(question) - 1
    previous = history[-1].question[: max(room, 0)].strip()
    return f"{previous} {question}" if previous else question


class QueryRewriter:
    def __init__(
        self, mode: Literal["concat", "llm"], llm: LlmClient, timeout_s: float, max_tokens: int
    ) -> None:
        self.mode = mode
        self.llm = llm
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens

    async def standalone(
        self, question: str, history: list[Turn], model: str, degraded: list[str]
    ) -> str:
        if not history:
            return question
        if self.mode == "concat":
            return concatenated(question, history)
        try:
            with anyio.fail_after(self.timeout_s):
                rewritten = await self._ask_llm(question, history, model)
        except (UpstreamError, TimeoutError, ValueError, KeyError) as exc:
            log.warning("query rewrite failed; concatenating", extra={"error": repr(exc)})
            degraded.append("rewrite")
            return concatenated(question, history)
        return rewritten

    async def _ask_llm(self, question: str, history: list[Turn], model: str) -> str:
        messages = [{"role": "system", "content": REWRITE_PROMPT}]
        for turn in history:
            messages.append({"role": "user", "content": turn.question})
            messages.append({"role": "assistant", "content": turn.answer[:_MAX_CONTEXT_CHARS]})
        messages.append({"role": "user", "content": question})
        stream = await self.llm.open_stream(
            messages,
            model=model,
            sampling={"max_tokens": self.max_tokens, "temperature": 0.0},
            connect_timeout=self.timeout_s,
            read_timeout=self.timeout_s,
        )
        parts: list[str] = []
        try:
            async for delta in stream.deltas():
                parts.append(delta.text)
        finally:
            await stream.aclose()
        query = " ".join("".join(parts).split())[:_MAX_QUERY_CHARS]
        if not query:
            raise ValueError("the rewrite came back empty")
        return query
