"""Sources as OpenAI `url_citation` annotations that every client maps right.

- One stable URL per passage, not per document: chat UIs (Open WebUI) merge citations
  that share a URL, so two passages of one article would become one citation and shift
  the numbering of the rest. The URL is the document's own with a fragment naming the
  chunk (`https://example.com/article#chunk-3`; a fragment the document's URL already
  had is replaced), or `ragline:doc/<doc id>#chunk-3` for a document ingested without
  one. Stable: the same passage of the same document version always has the same URL.
- The title is the document's title, without the "[n] " the answer cites it by (a UI
  shows its own number in front).
- `start_index`/`end_index` are the span of a citation marker in the answer's content,
  as OpenAI places them: `content[start_index:end_index]` is "[n]" (or "[1, 2]", which
  cites both). One annotation per marker and passage it cites, ordered by passage number
  (then position), so a UI that numbers citations by arrival numbers them as the answer
  does. Offsets count Unicode code points. Passages the answer never cites have no marker
  and so no annotation; every passage is in the response's `sources`.
"""

from __future__ import annotations

import re
from typing import Any

from ragline_gateway.pipeline import Source

# "[3]" or "[1, 2]"; three digits at most, so that "[2024]" in a text is no citation.
MARKER = re.compile(r"\[(\d{1,3}(?:\s*,\s*\d{1,3})*)\]")


def passage_url(source: Source) -> str:
    doc_id, sep, position = source.chunk_id.rpartition("#")
    chunk = f"chunk-{position}" if sep and doc_id == source.doc_id else source.chunk_id
    base = source.url.partition("#")[0] if source.url else f"ragline:doc/{source.doc_id}"
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
