"""Offline extractive engine: answers from the numbered passages in the prompt.

No model, no download. It parses the last user message with `parse_sources`, scores the
passages' sentences by overlap with the question's content words (lowercased, stop words
dropped, light suffix stripping, rarer words weigh more), and answers with the best one
to three sentences, each followed by its passage's citation `[n]`. The answer streams word
by word, paced at `token_interval_ms`, as an offline stand-in for a model's cadence.

It cannot write: a prompt that is not laid out by the gateway's knowledge-base path (a
chat UI's title, tag or follow-up task, a chat with the generation model itself) gets
`NO_GENERATION`, a fixed reply that says so, rather than an error. A reply, because a
person chatting with the generation model (picked from a UI's model list) then reads what
is wrong in the conversation itself, and a background task that cannot parse it as the
JSON it asked for keeps its default (Open WebUI titles the chat with its first question);
the reply holds no braces or brackets, so no such parser mistakes it for JSON or a
citation. A JSON `response_format` is refused with 400: there the client asked for a form
the engine cannot produce, and must be told.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from ragline_common.errors import ApiError
from ragline_common.passages import Passage, is_sources_prompt, parse_sources
from ragline_llm.engines.base import GenerationDelta, GenerationRequest, LocalEngine

NOTHING_FOUND = "I found nothing in the documents to answer that."
NO_MATCH = "I could not find an answer to that in the documents."
NO_GENERATION = (
    "This server answers from its documents only: its offline extractive engine quotes "
    "passages and cannot write titles, tags, summaries or other new text. Ask with the "
    "knowledge base, or run llm-svc on a generation model (RAGLINE_LLM_ENGINE=vllm)."
)

STOP_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for
    from further had has have having he her here hers herself him himself his how i if in
    into is it its itself just me more most my myself no nor not now of off on once only or
    other our ours ourselves out over own same she should so some such than that the their
    theirs them themselves then there these they this those through to too under until up
    very was we were what when where which while who whom why will with would you your
    yours yourself yourselves tell give show explain describe please much many one also
    may might must shall get got use used""".split()
)
_WORD = re.compile(r"[a-z0-9]+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
_SUFFIXES = ("ational", "ization", "fulness", "ousness", "ities", "ingly", "ments", "ness",
             "ment", "ings", "ing", "ies", "ied", "edly", "ed", "es", "ly", "s")  # fmt: skip


def stem(word: str) -> str:
    """Light suffix stripping so that double/doubles/doubled/doubling meet."""
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)] + ("y" if suffix in ("ies", "ied") else "")
            break
    if word.endswith("e") and len(word) > 3:
        word = word[:-1]
    return word


def content_terms(text: str) -> set[str]:
    return {stem(w) for w in _WORD.findall(text.lower()) if w not in STOP_WORDS}


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(" ".join(text.split())) if s.strip()]


@dataclass(frozen=True)
class Pick:
    sentence: str
    n: int
    score: float


def pick_sentences(passages: list[Passage], question: str, limit: int = 3) -> list[Pick]:
    """The best 1..`limit` sentences for `question`, best first; [] when nothing overlaps."""
    q_terms = content_terms(question)
    if not q_terms:
        return []
    candidates = [
        (p.n, sentence, content_terms(sentence))
        for p in passages
        for sentence in split_sentences(p.text)
    ]
    if not candidates:
        return []
    df = {t: sum(1 for _, _, terms in candidates if t in terms) for t in q_terms}
    total = len(candidates)
    scored = []
    for order, (n, sentence, terms) in enumerate(candidates):
        matched = q_terms & terms
        if not matched:
            continue
        score = sum(math.log(1 + total / df[t]) for t in matched) / math.sqrt(len(q_terms))
        scored.append((score, -order, n, sentence))
    if not scored:
        return []
    scored.sort(reverse=True)
    best = scored[0][0]
    picks: list[Pick] = []
    seen: set[str] = set()
    for score, _, n, sentence in scored:
        if len(picks) >= limit or score < 0.5 * best:
            break
        if sentence in seen:
            continue
        seen.add(sentence)
        picks.append(Pick(sentence, n, score))
    return picks


def compose_answer(messages_last_user: str) -> str:
    if not is_sources_prompt(messages_last_user):
        return NO_GENERATION
    passages, question = parse_sources(messages_last_user)
    if not passages:
        return NOTHING_FOUND
    picks = pick_sentences(passages, question)
    if not picks:
        return NO_MATCH
    return " ".join(f"{p.sentence} [{p.n}]" for p in picks)


class ExtractiveEngine(LocalEngine):
    name = "extractive"

    def __init__(self, model_name: str = "ragline-extractive", token_interval_ms: float = 15.0):
        super().__init__()
        self.model_name = model_name
        self.interval = token_interval_ms / 1000.0

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """The answer word by word; sampling fields other than max_tokens and stop do not
        apply to an extractive answer and are ignored. A JSON response_format is refused
        before the first delta (400), so the client gets a status, not prose."""
        form = request.response_format
        if form is not None and form.type != "text":
            raise ApiError(
                400, "unsupported_parameter",
                f"response_format {form.type!r}: the extractive engine writes no JSON; "
                "run llm-svc on a generation model (RAGLINE_LLM_ENGINE=vllm) for it",
            )  # fmt: skip
        self._active += 1
        try:
            async with aclosing(self._stream(request)) as deltas:
                async for delta in deltas:
                    yield delta
        finally:
            self._active -= 1

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        last_user = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
        prompt_tokens = sum(len(m.content.split()) for m in request.messages)
        words = compose_answer(last_user).split()
        emitted = ""
        count = 0
        for i, word in enumerate(words):
            if count >= request.max_tokens:
                yield GenerationDelta("", "length", prompt_tokens, count)
                return
            if i and self.interval:
                await asyncio.sleep(self.interval)  # pacing, see the module docstring
            piece = word if i == 0 else " " + word
            cut = _stop_index(emitted + piece, request.stop)
            if cut is not None:
                piece = (emitted + piece)[len(emitted) : cut]
                if piece:
                    count += 1
                    yield GenerationDelta(piece, None, prompt_tokens, count)
                yield GenerationDelta("", "stop", prompt_tokens, count)
                return
            emitted += piece
            count += 1
            yield GenerationDelta(piece, None, prompt_tokens, count)
        yield GenerationDelta("", "stop", prompt_tokens, count)


def _stop_index(text: str, stop: list[str] | None) -> int | None:
    if not stop:
        return None
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else None
