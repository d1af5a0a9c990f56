"""Split documents into overlapping chunks that end on sentence boundaries where possible.

Chunks are windows of words over the original text (its own spacing and line breaks are
kept). A window that would cut a sentence is shortened to the last sentence end in its
second half; the next window starts at the first sentence start inside the overlap, so
the overlap is whole sentences when they fit and plain words when they do not.

Chunk ids come from (doc_id, position) alone, so ingesting the same document again
produces the same ids and overwrites instead of duplicating.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Runs of up to 40 non-space characters: a longer "word" (a URL, base64) is cut into
# pieces so that a chunk's length in characters stays bounded by chunk_size * 41.
_WORD = re.compile(r"\S{1,40}")
# . ! ? … and the CJK full stop / exclamation / question marks, then closing quotes or brackets.
_SENTENCE_END = re.compile("[.!?\u2026\u3002\uff01\uff1f][\"'\u201d\u2019)\\]]*$")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")


@dataclass(frozen=True)
class TextChunk:
    position: int
    text: str


def chunk_id(doc_id: str, position: int) -> str:
    """A stable id: document ids exclude '#', so the split back is unambiguous."""
    return f"{doc_id}#{position}"


def _sentence_ends(text: str, spans: list[tuple[int, int]]) -> list[bool]:
    """ends[i] is true when a sentence (or paragraph) ends after word i."""
    ends = []
    for i, (start, end) in enumerate(spans):
        if i + 1 == len(spans):
            ends.append(True)
            continue
        is_end = bool(_SENTENCE_END.search(text[start:end]))
        if not is_end:
            is_end = bool(_PARAGRAPH_BREAK.search(text, end, spans[i + 1][0]))
        ends.append(is_end)
    return ends


def split_text(text: str, size: int, overlap: int) -> list[TextChunk]:
    if size < 1 or not 0 <= overlap < size:
        raise ValueError("need size >= 1 and 0 <= overlap < size")
    spans = [(m.start(), m.end()) for m in _WORD.finditer(text)]
    if not spans:
        return []
    ends = _sentence_ends(text, spans)
    n = len(spans)
    chunks: list[TextChunk] = []
    start = 0
    while True:
        stop = min(start + size, n)  # exclusive
        if stop < n:
            # Prefer to stop after the last sentence end in the window's second half.
            floor = start + max(1, size // 2) - 1
            for last in range(stop - 1, floor - 1, -1):
                if ends[last]:
                    stop = last + 1
                    break
        chunks.append(TextChunk(len(chunks), text[spans[start][0] : spans[stop - 1][1]]))
        if stop >= n:
            return chunks
        # Next start: the earliest sentence start within the overlap, else plain words.
        nxt = stop - overlap
        for first in range(max(stop - overlap, start + 1), stop):
            if ends[first - 1]:
                nxt = first
                break
        start = max(nxt, start + 1)
