"""Offline extractive engine: answers from the numbered passages in the prompt.

No model, no download. It parses the last user message with `parse_sources` and answers
with the sentence (or two) of the passages that best answers the question, cited `[n]` to
the passage it came from. The answer streams word by word, paced at `token_interval_ms`,
as an offline stand-in for a model's cadence.

How a sentence is chosen (`pick_sentences`):
- Passages are read line by line (the prompt keeps their lines, see
  `ragline_common.passages`): Markdown headings (HTML and PDF headings arrive as such),
  rules, table rows and code blocks are left out, list markers are cut off, and a short
  line with no sentence end that opens a paragraph (a PDF's title line) is left out too.
  So no heading, list marker or title is ever glued to an answer.
- Words are lowercased, accents and possessives dropped, stop words left out, and stemmed
  (`stemmer.py`: keeps/kept/keeper meet; located/location meet).
- A sentence scores the share of the question's weight that it matches (rarer words
  weigh more; the noun of "what country"/"which year", which names the kind of answer
  rather than its topic, weighs less), plus a bonus when it holds what the question asks
  for and the question does not already say: a year or date for "when", a number for
  "how many", a name for "who"/"where"/"what country". A small share of the score comes
  from its passage as a whole, since a passage about the question holds the answer more
  often than a stray sentence elsewhere.
- The best sentence answers; a second is added only when it is nearly as good, or is the
  next sentence of the same paragraph carrying on the first. Two neighbours of one
  paragraph share one citation.
- When no sentence matches enough of the question (`MIN_COVERAGE`), the answer is
  `NO_MATCH`, saying the documents don't say, rather than a sentence that merely shares a
  word with the question.

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
import unicodedata
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from ragline_common.errors import ApiError
from ragline_common.passages import DONT_KNOW, Passage, is_sources_prompt, parse_sources
from ragline_llm.engines.base import GenerationDelta, GenerationRequest, LocalEngine
from ragline_llm.engines.stemmer import stem

__all__ = [
    "NOTHING_FOUND", "NO_GENERATION", "NO_MATCH", "ExtractiveEngine", "Pick",
    "compose_answer", "content_terms", "pick_sentences", "split_sentences", "stem",
]  # fmt: skip

NOTHING_FOUND = "I don't know, no passage of the documents was found for that question."
NO_MATCH = DONT_KNOW  # the sentence the gateway's system prompt asks a model for
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
    very was we were what when where which while who whom whose why will with would you
    your yours yourself yourselves tell give show explain describe please much many one
    also may might must shall get got use used s t d ll re ve""".split()
)

# The smallest share of the question's weight the best sentence must match; below it the
# answer is NO_MATCH. Measured on squad-dev (benchmarks/extractive_squad.py): it keeps
# answering where the passages hold the answer and declines most questions asked of
# passages about something else.
MIN_COVERAGE = 0.12
# Scoring, see the module docstring: the weight of a word that names the kind of answer
# ("country" in "what country"), of the passage's match, of holding the kind of answer
# asked for, and the factor for a sentence that says nothing the question does not.
FRAME_WEIGHT = 0.3
CONTEXT_WEIGHT = 0.15
KIND_BONUS = 0.2
NOTHING_NEW = 0.5
LONG = 40
# A second sentence is added when it scores at least this share of the best one.
SECOND_SHARE = 0.9

_WORD = re.compile(r"[a-z0-9]+")
_POSSESSIVE = re.compile(r"(?<=[a-z0-9])'s?\b")
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})

# --- the passage text: lines -> paragraphs -> sentences --------------------------------

_HEADING = re.compile(r"^#{1,6}(?:\s|$)")
_RULE = re.compile(r"^(?:[-*_=~]\s*){3,}$")  # thematic break, setext underline
_FENCE = re.compile(r"^(?:```|~~~)")
_LIST_MARKER = re.compile(
    r"^(?:[-*+\u2022\u2023\u25e6\u25aa\u25cf\u2013]|\(?\d{1,3}[.)]|\(?[a-z]\))\s+"
)
_QUOTE_MARKER = re.compile(r"^(?:>\s*)+")
_ENDS_SENTENCE = re.compile(r"[.!?:;\u2026][\"'\u201d\u2019)\]]*$")
_CARRIES_ON = re.compile(r"[,\-\u2013\u2014(/&]$")
# A candidate sentence end: . ! ? or an ellipsis, closing quotes or brackets, space, then
# something a sentence starts with.
_BREAK = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr prof rev gen col lt sgt capt mt ft vs e.g i.e cf ca c approx "
    "fig no vol pp inc ltd co corp dept univ est jan feb mar apr jun jul aug sep sept oct "
    "nov dec".split()
)
# The source's own footnote marks ("[12]"): read as citations of ours, they would mislead.
_FOOTNOTE = re.compile(r"\s*\[(?:\d{1,3}(?:\s*,\s*\d{1,3})*|citation needed|note \d+)\]")
_TITLE_MAX_WORDS = 10
# A sentence that goes on about what the one before it named.
_GOES_ON = re.compile(r"(?:It|Its|This|These|They|Their|He|His|She|Her|There)\b")


@dataclass(frozen=True)
class Sentence:
    n: int  # the passage it came from
    paragraph: int  # index of its paragraph within all the passages
    position: int  # index within the paragraph
    text: str


def _is_title_line(line: str, previous_ended: bool, following: str | None) -> bool:
    """A short line with no sentence end that opens a paragraph and is followed by a line
    that does not carry it on: a heading in all but name, as PDFs give them."""
    tokens = line.split()
    if not previous_ended or len(tokens) > _TITLE_MAX_WORDS:
        return False
    if _ENDS_SENTENCE.search(line) or _CARRIES_ON.search(line):
        return False
    if not (line[0].isupper() or line[0].isdigit()):
        return False
    if tokens[-1].lower() in STOP_WORDS:  # "grew its revenue by" goes on on the next line
        return False
    if following is None:  # a chunk never ends on a heading: a sentence without its stop
        return False
    return not following[0].islower()


def paragraphs(text: str) -> list[str]:
    """The prose of a passage as paragraphs, without headings, rules, tables, code, list
    markers and title lines; consecutive prose lines are one paragraph."""
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    out: list[list[str]] = []
    current: list[str] | None = None
    current_item = False  # the current paragraph is a list item
    previous_ended = True  # the line before opened nothing that this one carries on
    in_fence = False
    for i, line in enumerate(lines):
        if _FENCE.match(line):
            in_fence = not in_fence
            current, previous_ended = None, True
            continue
        if in_fence or _HEADING.match(line) or _RULE.match(line) or line.startswith("|"):
            current, previous_ended = None, True
            continue
        line = _QUOTE_MARKER.sub("", line)
        item = _LIST_MARKER.match(line)
        if item:
            line = line[item.end() :]
        following = lines[i + 1] if i + 1 < len(lines) else None
        if not line:
            continue
        if not item and _is_title_line(line, previous_ended, following):
            current, previous_ended = None, True
            continue
        # A list item ends at the next item, or at a line that does not carry it on.
        if item or current is None or (current_item and (previous_ended or line[0].isupper())):
            current = [line]
            current_item = bool(item)
            out.append(current)
        else:
            current.append(line)
        previous_ended = bool(_ENDS_SENTENCE.search(line))
    return [" ".join(p) for p in out]


def split_sentences(text: str) -> list[str]:
    """Sentences of one paragraph, verbatim; no cut after "Dr.", "e.g." or an initial."""
    text = " ".join(text.split())
    sentences: list[str] = []
    start = 0
    for match in _BREAK.finditer(text):
        before = text[start : match.start() + 1].rsplit(None, 1)[-1].lower()
        before = before.lstrip("\"'(\u201c\u2018[").rstrip(".")
        if before in _ABBREVIATIONS or (len(before) == 1 and before.isalpha()):
            continue
        if text[match.start()] == "." and before[-2:-1] == "." and len(before) <= 4:
            continue  # "U.S." and the like
        sentences.append(text[start : match.end()].strip())
        start = match.end()
    sentences.append(text[start:].strip())
    return [s for s in sentences if s]


def sentences_of(passages: list[Passage]) -> list[Sentence]:
    out: list[Sentence] = []
    paragraph = 0
    for p in passages:
        for para in paragraphs(p.text):
            for position, sentence in enumerate(split_sentences(para)):
                out.append(Sentence(p.n, paragraph, position, sentence))
            paragraph += 1
    return out


# --- the question ----------------------------------------------------------------------


def _fold(text: str) -> str:
    """Lowercase, no accents, no possessive 's: "Normandy's" matches "Normandy"."""
    text = unicodedata.normalize("NFKD", text.translate(_QUOTES))
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    return _POSSESSIVE.sub("", text)


def words(text: str) -> list[str]:
    return _WORD.findall(_fold(text))


def content_terms(text: str) -> set[str]:
    return {stem(w) for w in words(text) if w not in STOP_WORDS}


# What the question asks for, read from its wh-phrase.
_TIME_NOUNS = frozenset(
    "year years century centuries decade date day month time period era age".split()
)
_NUMBER_NOUNS = frozenset(
    "number percentage percent amount size population proportion rate total cost price "
    "length distance height weight".split()
)
_PLACE_NOUNS = frozenset(
    "country countries city cities region place area location continent state river town "
    "island nation province territory county kingdom village capital".split()
)
_PERSON_NOUNS = frozenset("person people man woman king queen leader ruler".split())
_KIND_NOUNS = (("time", _TIME_NOUNS), ("number", _NUMBER_NOUNS), ("place", _PLACE_NOUNS),
               ("person", _PERSON_NOUNS))  # fmt: skip
# Nouns of the wh-phrase that name no kind and no topic: "what is the name of ...".
_GENERIC_NOUNS = frozenset("name names term kind type sort word called".split())
_HOW_NUMBER = frozenset("many much long far old large big tall high often fast wide deep".split())


def answer_kind(question: str) -> tuple[str | None, set[str]]:
    """("time" | "number" | "person" | "place" | None, the question's words that only name
    the kind of answer, like "country" in "in what country" or "name" in "what is the
    name of")."""
    ws = words(question)
    for i, w in enumerate(ws):
        following = ws[i + 1 : i + 6]
        if w == "when":
            return "time", set()
        if w in ("who", "whom", "whose"):
            return "person", set()
        if w == "where":
            return "place", set()
        if w == "how" and following and following[0] in _HOW_NUMBER:
            return "number", {following[0]}
        if w in ("what", "which"):
            generic = set()
            for noun in following:
                for kind, nouns in _KIND_NOUNS:
                    if noun in nouns:
                        return kind, {noun, *generic}
                if noun in _GENERIC_NOUNS:
                    generic.add(noun)
                elif noun not in STOP_WORDS:
                    break
            return None, generic
    return None, set()


_MONTHS = "january february march april may june july august september october november december"
_TIME = re.compile(
    r"\b(?:\d{3,4}s?|\d{1,2}(?:st|nd|rd|th)|centur(?:y|ies)|decades?|bc|ad|bce|ce|"
    + "|".join(_MONTHS.split())
    + r")\b"
)
_NUMBER = re.compile(
    r"\d|\b(?:one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|twenty|thirty|"
    r"forty|fifty|hundreds?|thousands?|millions?|billions?|dozens?|half|percent)\b"
)
_NAME = re.compile(r"(?<=[\s(\"'\u201c,;-])[A-Z][\w\u00c0-\u024f'-]*")
# A name after a preposition of place: "a region in France", "born at Rouen".
_PLACE = re.compile(
    r"\b(?:in|at|from|near|to|into|across|outside|inside|within|throughout)\s+"
    r"([A-Z][\w\u00c0-\u024f'-]*)"
)


def _new_word(found: str, q_terms: set[str]) -> bool:
    w = words(found)
    return bool(w) and w[0] not in STOP_WORDS and stem(w[0]) not in q_terms


def _has_kind(kind: str | None, sentence: str, folded: str, q_terms: set[str]) -> bool:
    """Whether the sentence holds something of the asked-for kind that the question does
    not already say."""
    if kind == "time":
        return any(stem(m) not in q_terms for m in _TIME.findall(folded))
    if kind == "number":
        return bool(_NUMBER.search(folded))
    if kind == "person":
        return any(_new_word(found, q_terms) for found in _NAME.findall(sentence))
    if kind == "place":
        return any(_new_word(found, q_terms) for found in _PLACE.findall(sentence))
    return False


# --- picking ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pick:
    sentence: str
    n: int
    score: float
    paragraph: int = 0
    position: int = 0


def pick_sentences(passages: list[Passage], question: str, limit: int = 2) -> list[Pick]:
    """The sentence that best answers `question`, and a second one when it helps; best
    first. [] when nothing matches enough of the question (`MIN_COVERAGE`)."""
    kind, kind_words = answer_kind(question)
    frame = {stem(w) for w in kind_words}
    q_terms = content_terms(question)
    if not q_terms:
        return []
    sentences = sentences_of(passages)
    if not sentences:
        return []
    terms = [content_terms(s.text) for s in sentences]
    total = len(sentences)
    weight: dict[str, float] = {}
    for t in sorted(q_terms):
        df = sum(1 for ts in terms if t in ts)
        weight[t] = math.log(1 + total / (df + 0.5)) * (FRAME_WEIGHT if t in frame else 1.0)
    mass = sum(weight.values())
    by_passage: dict[int, set[str]] = {}
    for s, ts in zip(sentences, terms, strict=True):
        by_passage.setdefault(s.n, set()).update(ts & q_terms)
    titles = {p.n: content_terms(p.title) & q_terms for p in passages}

    scored: list[tuple[float, float, int]] = []  # (score, coverage, index)
    for i, (s, ts) in enumerate(zip(sentences, terms, strict=True)):
        matched = ts & q_terms
        if not matched or len(s.text.split()) < 3:
            continue
        coverage = sum(weight[t] for t in sorted(matched)) / mass  # sorted: one sum, any seed
        context = sum(weight[t] for t in sorted(by_passage[s.n] | titles.get(s.n, set()))) / mass
        score = coverage + CONTEXT_WEIGHT * context
        if _has_kind(kind, s.text, _fold(s.text), q_terms):
            score *= 1 + KIND_BONUS
        if not (ts - q_terms):  # says nothing the question does not
            score *= NOTHING_NEW
        length = len(s.text.split())
        if length > LONG:
            score /= 1 + (length - LONG) / 80
        scored.append((score, coverage, i))
    if not scored:
        return []
    scored.sort(key=lambda x: (-x[0], x[2]))
    if max(coverage for _, coverage, _ in scored) < MIN_COVERAGE:
        return []
    best_score, _, best = scored[0]

    def pick(i: int, score: float) -> Pick:
        s = sentences[i]
        return Pick(_FOOTNOTE.sub("", s.text), s.n, score, s.paragraph, s.position)

    picks = [pick(best, best_score)]
    if limit < 2:
        return picks
    first = sentences[best]
    for score, _, i in scored[1:]:
        if score < SECOND_SHARE * best_score:
            break
        if sentences[i].text != first.text:
            picks.append(pick(i, score))
            return picks
    # The next sentence of the paragraph, when it goes on about the same thing ("It was
    # built ...") and matches the question too.
    after = best + 1
    if (
        after < len(sentences)
        and sentences[after].paragraph == first.paragraph
        and _GOES_ON.match(sentences[after].text)
        and terms[after] & q_terms
    ):
        picks.append(pick(after, 0.0))
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
    if len(picks) == 2:
        a, b = picks
        if a.n == b.n and a.paragraph == b.paragraph and abs(a.position - b.position) == 1:
            first, second = (a, b) if a.position < b.position else (b, a)
            return f"{first.sentence} {second.sentence} [{a.n}]"
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
