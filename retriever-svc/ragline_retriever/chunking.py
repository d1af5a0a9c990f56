"""Split documents into overlapping chunks that follow the document's sections and sentences.

Chunks are windows of at most `size` words over the original text (its own spacing and
line breaks are kept), so every chunk is a slice of the document. A window is cut at the
best boundary it holds, strongest first:

1. A section boundary: the start of a Markdown ATX heading ("# Title" ... "###### Sub";
   `parsing.py` turns the headings of every format into these) or the end of the document.
   The window is cut at the *last* one it reaches, so a chunk holds only whole sections
   (plus the tail of the section it started in): small neighbouring sections share a
   chunk, and no chunk runs on into a section it cannot finish. The next chunk starts
   exactly at that heading, with no overlap, so the heading leads its section's chunk.
2. Otherwise (the window lies inside one long section) after the last sentence end in
   the window's second half;
3. otherwise after exactly `size` words.

After a cut inside a section (2 or 3) the next window starts at the first sentence start
inside the overlap, so the overlap is whole sentences when they fit and plain words when
they do not. The overlap never crosses a heading: by rule 1 such a window holds no
heading after its first word, and the overlap never starts inside the heading lines that
open the chunk (the next chunk does not begin with half a heading).

Consecutive heading lines ("# Guide" then "## Install") count as one boundary, and a
heading is never a cut-after point, so no chunk ends with a dangling heading line apart
from two unavoidable cases: a document that ends with one, and a run of heading lines
longer than `size` words. Lines inside fenced code blocks (``` or ~~~) are never headings:
a "# comment" in a shell snippet is not a section.

Chunk ids come from (doc_id, position) alone, so ingesting the same document again
produces the same ids and overwrites instead of duplicating.
"""

from __future__ import annotations

import bisect
import hashlib
import re
from dataclasses import dataclass

# Runs of up to 40 non-space characters: a longer "word" (a URL, base64) is cut into
# pieces so that a chunk's length in characters stays bounded by chunk_size * 41.
_WORD = re.compile(r"\S{1,40}")
# . ! ? … and the CJK full stop / exclamation / question marks, then closing quotes or brackets.
_SENTENCE_END = re.compile("[.!?\u2026\u3002\uff01\uff1f][\"'\u201d\u2019)\\]]*$")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")
# CommonMark ATX heading: up to 3 spaces, 1-6 '#', then a space, a tab or the line's end.
_ATX_HEADING = re.compile(r" {0,3}#{1,6}(?:[ \t]|\r?$)")
_FENCE_OPEN = re.compile(r" {0,3}(`{3,}|~{3,})")


@dataclass(frozen=True)
class TextChunk:
    position: int
    text: str


# Elasticsearch's limit on `_id` (the chunk id there), and the width of Milvus' chunk_id.
MAX_CHUNK_ID_BYTES = 512


def chunk_id(doc_id: str, position: int) -> str:
    """A stable id, `<doc id>#<position>`: the position follows the last '#' (a document id
    may hold '#' itself).

    Where that would pass MAX_CHUNK_ID_BYTES (document ids of up to 512 bytes are valid, so
    only those near the limit), it is `<the id's start>/./<SHA-256 of the id, 32 hex
    digits>#<position>`, cut to fit on a character boundary: the `.` segment, which no
    valid document id holds, keeps it from ever equalling another document's plain chunk
    id, and the digest keeps two long ids with one start apart.
    """
    plain = f"{doc_id}#{position}"
    if len(plain.encode("utf-8")) <= MAX_CHUNK_ID_BYTES:
        return plain
    digest = hashlib.sha256(doc_id.encode("utf-8")).hexdigest()[:32]
    tail = f"/./{digest}#{position}"
    room = MAX_CHUNK_ID_BYTES - len(tail)
    head = doc_id.encode("utf-8")[:room].decode("utf-8", errors="ignore")
    return head + tail


def code_fence_flags(lines: list[str]) -> list[bool]:
    """flags[i] is true when line i opens, closes or lies inside a fenced code block.

    Shared with the Markdown parser so that both agree on what is code: neither a
    "# comment" nor a "[x](y)" inside a fence is Markdown structure.
    """
    flags = []
    fence = ""  # the opening run of ` or ~ while inside a block
    for line in lines:
        if fence:
            flags.append(True)
            closing = line.strip()
            if len(closing) >= len(fence) and closing == fence[0] * len(closing):
                fence = ""
            continue
        opening = _FENCE_OPEN.match(line)
        if opening:
            fence = opening.group(1)
        flags.append(bool(opening))
    return flags


def _heading_words(text: str, spans: list[tuple[int, int]]) -> list[bool]:
    """heading[i] is true when word i lies on a heading line."""
    headings: list[tuple[int, int]] = []  # (first char, end char) of each heading line
    lines = text.split("\n")
    offset = 0
    for line, in_code in zip(lines, code_fence_flags(lines), strict=True):
        if not in_code and _ATX_HEADING.match(line):
            headings.append((offset, offset + len(line)))
        offset += len(line) + 1
    found = [False] * len(spans)
    h = 0
    for i, (start, _) in enumerate(spans):
        while h < len(headings) and headings[h][1] <= start:
            h += 1
        found[i] = h < len(headings) and headings[h][0] <= start
    return found


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
    """Chunks of at most `size` words, cut at headings, then sentence ends, then anywhere.

    The module docstring gives the rule; `overlap` words (fewer when whole sentences do
    not fit, none after a heading cut) are repeated at the start of the next chunk.
    """
    if size < 1 or not 0 <= overlap < size:
        raise ValueError("need size >= 1 and 0 <= overlap < size")
    spans = [(m.start(), m.end()) for m in _WORD.finditer(text)]
    if not spans:
        return []
    n = len(spans)
    heading = _heading_words(text, spans)
    ends = _sentence_ends(text, spans)
    # Where a section may begin: the first word of a run of heading lines; and the end.
    boundaries = [i for i in range(1, n) if heading[i] and not heading[i - 1]] + [n]
    chunks: list[TextChunk] = []
    start = 0
    while True:
        # 1. The last section boundary that the window reaches, if any.
        reach = bisect.bisect_right(boundaries, start + size) - 1
        if reach >= 0 and boundaries[reach] > start:
            stop = boundaries[reach]
            chunks.append(TextChunk(len(chunks), text[spans[start][0] : spans[stop - 1][1]]))
            if stop == n:
                return chunks
            start = stop
            continue
        # 2. Inside one section: the last sentence end in the window's second half
        # that is not a heading's end; 3. else the full window (stop < n: rule 1 took n).
        stop = start + size
        floor = start + max(1, size // 2) - 1
        for last in range(stop - 1, floor - 1, -1):
            if ends[last] and not heading[last]:
                stop = last + 1
                break
        chunks.append(TextChunk(len(chunks), text[spans[start][0] : spans[stop - 1][1]]))
        # Next start: the earliest sentence start within the overlap, else plain words;
        # never inside the heading lines that open this chunk.
        body = start
        while body < stop and heading[body]:
            body += 1
        lowest = max(stop - overlap, start + 1, body)
        start = next((i for i in range(lowest, stop) if ends[i - 1]), lowest)
