"""Sources as OpenAI `url_citation` annotations that every client maps right.

- One stable URL per passage, not per document: chat UIs (Open WebUI) merge citations
  that share a URL, so two passages of one article would become one citation and shift
  the numbering of the rest. The URL is the document's own with a fragment naming the
  chunk (`https://example.com/article#chunk-3`; a fragment the document's URL already
  had is replaced), or `ragline:doc/<doc id>#chunk-3` for a document ingested without
  one (the id percent-encoded where it holds more than letters, digits and `-._~:/@`).
  Stable: the same passage of the same document version always has the same URL.
- The title is the document's title, without the "[n] " the answer cites it by (a UI
  shows its own number in front).
- `start_index`/`end_index` are the span of a citation marker in the answer's content,
  as OpenAI places them: `content[start_index:end_index]` is "[n]" (or "[1, 2]", which
  cites both). One annotation per marker and passage it cites, ordered by passage number
  (then position), so a UI that numbers citations by arrival numbers them as the answer
  does. Offsets count Unicode code points. Passages the answer never cites have no marker
  and so no annotation; every passage is in the response's `sources`.

Citations of sources that do not exist ("[7]" when three passages were sent: a model
miscounting, or citing a number from the conversation's history) are dropped from the
answer before it reaches the client, by `CitationFilter`, as the tokens are relayed: in
"[1, 7]" only the 7 goes, a marker that cites nothing that exists goes whole with the
spaces before it ("in France [7]." becomes "in France."). Dropped rather than marked: a UI
turns "[n]" into a link to source n, and a marked "[7?]" is a broken link or noise that
the reader can do nothing with, while the sentence reads the same without it; the sources
that do exist keep their numbers, so nothing else shifts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

from ragline_gateway.pipeline import Source

# "[3]" or "[1, 2]"; three digits at most, so that "[2024]" in a text is no citation.
MARKER = re.compile(r"\[(\d{1,3}(?:\s*,\s*\d{1,3})*)\]")


_CITATION = re.compile(r"([ \t]*)" + MARKER.pattern)
# What may still become a marker when more text comes: spaces, "[", digits, commas.
_PARTIAL = re.compile(r"[ \t]*(?:\[(?:\d{1,3}(?:\s*,\s*\d{1,3})*\s*,?\s*)?)?$")


class CitationFilter:
    """Drops citations of sources that do not exist from an answer streamed in pieces.

    `feed` takes each token's text and returns what may be sent now; a tail that may yet
    turn into a marker ("[", "[1", " [1," or spaces that would go with a dropped marker)
    is held back until the next piece decides it, so that a marker split across tokens
    is handled like a whole one. Only such a tail waits: any other text passes at once.
    `flush` returns what is held at the end of the answer.
    """

    def __init__(self, numbers: Iterable[int]) -> None:
        # A tuple: a handful of numbers, searched as fast as a set at a tenth of its
        # memory, which an open stream holds for its whole length.
        self.numbers = tuple(sorted(set(numbers)))
        self._held = ""

    def _rewrite(self, match: re.Match[str]) -> str:
        cited = [int(part) for part in match.group(2).split(",")]
        kept = [n for n in cited if n in self.numbers]
        if len(kept) == len(cited):
            return match.group(0)
        if not kept:
            return ""
        return f"{match.group(1)}[{', '.join(map(str, kept))}]"

    def feed(self, text: str) -> str:
        if not self._held and "[" not in text and not text.endswith((" ", "\t")):
            return text  # the common token: nothing to look at
        text = _CITATION.sub(self._rewrite, self._held + text)
        tail = _PARTIAL.search(text)
        cut = tail.start() if tail else len(text)
        self._held = text[cut:]
        return text[:cut]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def drop_unknown_citations(text: str, numbers: Iterable[int]) -> str:
    """`text` without citations of sources outside `numbers` (a whole answer at once)."""
    citations = CitationFilter(numbers)
    return citations.feed(text) + citations.flush()


# Left as they are in a `ragline:doc/` URL, so an id of letters, digits and `-._~:/@`
# keeps the URL it always had; anything else (space, `#`, `?`, `%`, accents) is
# percent-encoded as UTF-8, so the URL stays one valid URL.
_URL_SAFE = ":/@"


def passage_url(source: Source) -> str:
    doc_id, sep, position = source.chunk_id.rpartition("#")
    if sep and doc_id == source.doc_id:
        chunk = f"chunk-{position}"
    else:  # a chunk id of another form (a long id's hashed one): it names the passage
        chunk = quote(source.chunk_id, safe=_URL_SAFE)
    if source.url:
        base = source.url.partition("#")[0]
    else:
        base = f"ragline:doc/{quote(source.doc_id, safe=_URL_SAFE)}"
    return f"{base}#{chunk}"


def title(source: Source) -> str:
    return source.title or source.doc_id


def url_citations(sources: list[Source], content: str) -> list[dict[str, Any]]:
    by_number = {s.n: s for s in sources}
    spans: list[tuple[int, int, int]] = []  # (n, start, end)
    for match in MARKER.finditer(content):
        for number in {int(part) for part in match.group(1).split(",")}:
            if number in by_number:
                spans.append((number, match.start(), match.end()))
    return [
        {
            "type": "url_citation",
            "url_citation": {
                "url": passage_url(by_number[n]),
                "title": title(by_number[n]),
                "start_index": start,
                "end_index": end,
                "content": by_number[n].text,
            },
        }
        for n, start, end in sorted(spans)
    ]
