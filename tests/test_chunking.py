"""Chunking (retriever-svc): sentence and heading boundaries, size, overlap, stable ids."""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

import pytest

from ragline_retriever.chunking import TextChunk, chunk_id, split_text

SENTENCES = " ".join(f"Sentence number {i} has exactly seven words." for i in range(40))


def words(text: str) -> list[str]:
    return text.split()


# --- plain text ----------------------------------------------------------------------------


def test_short_document_is_one_chunk_with_its_text_unchanged() -> None:
    text = "A short note.\n\nWith a second paragraph."
    chunks = split_text(text, size=100, overlap=10)
    assert [(c.position, c.text) for c in chunks] == [(0, text)]
    assert split_text("   \n ", size=100, overlap=10) == []


def test_chunks_respect_size_overlap_and_cover_every_word() -> None:
    chunks = split_text(SENTENCES, size=50, overlap=14)
    assert len(chunks) > 4
    assert all(len(words(c.text)) <= 50 for c in chunks)
    assert [c.position for c in chunks] == list(range(len(chunks)))
    for before, after in itertools.pairwise(chunks):
        # Overlap: the next chunk starts with the last two whole sentences of this one.
        assert before.text.endswith(".")
        assert after.text.startswith("Sentence number")
        assert before.text.endswith(" ".join(words(after.text)[:14]))
    # Every word of the document appears in some chunk, in order.
    seen = {w for c in chunks for w in words(c.text)}
    assert seen == set(words(SENTENCES))
    assert chunks[-1].text.endswith("39 has exactly seven words.")


def test_chunks_prefer_sentence_ends_over_exact_size() -> None:
    text = "Alpha beta gamma delta. " + "word " * 30
    chunks = split_text(text, size=8, overlap=0)
    assert chunks[0].text == "Alpha beta gamma delta."
    assert len(words(chunks[1].text)) == 8  # no sentence end: a plain 8-word window


def test_chunking_is_deterministic_and_ids_derive_from_doc_and_position() -> None:
    first = split_text(SENTENCES, size=40, overlap=8)
    assert first == split_text(SENTENCES, size=40, overlap=8)
    assert chunk_id("doc-1", 3) == "doc-1#3"
    assert chunk_id("doc-1", 3) != chunk_id("doc-1", 4)


def test_overlong_words_are_split_so_chunks_stay_bounded() -> None:
    chunks = split_text("x" * 1000, size=10, overlap=2)
    assert all(len(c.text) <= 10 * 41 for c in chunks)
    assert "".join(c.text for c in split_text("y" * 1000, size=10, overlap=0)) == "y" * 1000


def test_size_and_overlap_are_checked() -> None:
    with pytest.raises(ValueError):
        split_text("some words", size=0, overlap=0)
    with pytest.raises(ValueError):
        split_text("some words", size=5, overlap=5)


# --- headings: worked examples -------------------------------------------------------------

USAGE = " ".join(f"Usage step {i} is described here." for i in range(12))


def test_small_sections_share_a_chunk_cut_before_the_last_heading_reached() -> None:
    text = (
        "# Guide\n\nShort intro here.\n\n## Install\n\nRun make. Then run it.\n\n"
        f"## Usage\n\n{USAGE}"
    )
    chunks = split_text(text, size=20, overlap=6)
    # Guide and Install fit in one window with the start of Usage: cut before "## Usage".
    assert chunks[0].text == (
        "# Guide\n\nShort intro here.\n\n## Install\n\nRun make. Then run it."
    )
    # No overlap across the heading: the Usage chunk starts at its heading.
    assert chunks[1].text.startswith("## Usage\n\nUsage step 0 is")
    # Inside the long Usage section chunks end on sentences and overlap by whole sentences.
    for before, after in itertools.pairwise(chunks[1:]):
        assert before.text.endswith("here.")
        assert after.text.startswith("Usage step")
        assert before.text.endswith(" ".join(words(after.text)[:6]))
    assert chunks[-1].text.endswith("Usage step 11 is described here.")


def test_a_section_that_cannot_be_finished_starts_a_new_chunk() -> None:
    text = f"Opening words of the page.\n\n## Usage\n\n{USAGE}"
    chunks = split_text(text, size=30, overlap=5)
    # The window reaches into Usage but cannot finish it: stop before its heading.
    assert chunks[0].text == "Opening words of the page."
    assert chunks[1].text.startswith("## Usage")


def test_consecutive_headings_stay_together_and_with_their_text() -> None:
    text = f"{USAGE}\n\n# Part Two\n## Details\n\nThe details follow. {USAGE}"
    chunks = split_text(text, size=25, overlap=4)
    starts = [c.text for c in chunks if "Part Two" in c.text]
    assert len(starts) == 1
    assert starts[0].startswith("# Part Two\n## Details\n\nThe details follow.")
    for chunk in chunks:
        assert not re.search(r"(^|\n)#{1,6} [^\n]*$", chunk.text), chunk.text


def test_overlap_does_not_start_inside_the_headings_that_open_a_chunk() -> None:
    # One long section under two heading lines, with no sentence end to cut at.
    text = "# Manual\n## Long Section\n\n" + "word " * 40
    chunks = split_text(text, size=10, overlap=8)
    assert chunks[0].text.startswith("# Manual\n## Long Section\n\nword")
    assert len(chunks) > 2
    assert all("#" not in c.text for c in chunks[1:])


def test_hash_lines_in_fenced_code_and_hashtags_are_not_headings() -> None:
    fenced = "Intro sentence here.\n\n```sh\n# install it\nmake install\n```\n\nMore text after."
    assert split_text(fenced, size=100, overlap=0) == [TextChunk(0, fenced)]
    # Same words, but "# install it" as a real heading: the 9-word window cuts before it.
    real = fenced.replace("```sh\n", "").replace("```\n", "")
    assert split_text(real, size=9, overlap=0)[1].text.startswith("# install it")
    assert len(split_text("#hashtag " * 20, size=10, overlap=0)) == 2


def test_crlf_headings_are_headings() -> None:
    text = "Intro text here.\r\n\r\n## Next\r\n\r\nBody of the next section."
    chunks = split_text(text, size=8, overlap=2)
    assert [c.text for c in chunks] == [
        "Intro text here.",
        "## Next\r\n\r\nBody of the next section.",
    ]


# --- headings: properties over generated documents -----------------------------------------


@dataclass
class Generated:
    text: str
    heading_line: list[int]  # per word: the number of its heading line, -1 for body text


def generate_document(seed: int) -> Generated:
    """Random sections: 1-2 heading lines, paragraphs, sometimes a fenced "# comment".

    Every body word is unique ("w17") so that each chunk can be located in the text.
    """
    rng = random.Random(seed)
    counter = itertools.count()
    blocks: list[str] = []
    heading_line: list[int] = []
    headings = itertools.count()

    def fresh(k: int) -> list[str]:
        return [f"w{next(counter)}" for _ in range(k)]

    for _ in range(rng.randint(2, 9)):
        for _ in range(rng.choice((0, 1, 1, 1, 2))):
            line = ["#" * rng.randint(1, 3), *fresh(rng.randint(1, 3))]
            blocks.append(" ".join(line))
            heading_line += [next(headings)] * len(line)
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.15:
                code = ["```sh", "#", *fresh(2), "make", *fresh(1), "```"]
                blocks.append(f"```sh\n# {code[2]} {code[3]}\nmake {code[5]}\n```")
                heading_line += [-1] * len(code)
                continue
            sentences = []
            for _ in range(rng.randint(1, 6)):
                body = fresh(rng.randint(1, 14))
                sentences.append(" ".join(body) + rng.choice((".", ".", "!", "", ",")))
            paragraph = rng.choice((" ", "\n")).join(sentences).rstrip(",") + "."
            blocks.append(paragraph)
            heading_line += [-1] * len(paragraph.split())
    text = "\n\n".join(blocks)
    assert len(heading_line) == len(text.split())
    return Generated(text, heading_line)


def locate(doc_words: list[str], chunks: list[TextChunk]) -> list[tuple[int, int]]:
    """The word range [start, stop) of each chunk, assuming chunks never leave a gap."""
    ranges: list[tuple[int, int]] = []
    for chunk in chunks:
        chunk_words = words(chunk.text)
        prev_start, prev_stop = ranges[-1] if ranges else (-1, 0)
        found = [
            s
            for s in range(prev_start + 1, prev_stop + 1)
            if doc_words[s : s + len(chunk_words)] == chunk_words
        ]
        assert len(found) == 1, (chunk, ranges[-1:])  # found: no gap and forward progress
        ranges.append((found[0], found[0] + len(chunk_words)))
    return ranges


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize(("size", "overlap"), [(10, 0), (12, 5), (25, 8), (40, 12), (60, 0)])
def test_chunks_follow_headings_and_sentences(seed: int, size: int, overlap: int) -> None:
    doc = generate_document(seed)
    doc_words = words(doc.text)
    n = len(doc_words)
    line = doc.heading_line
    heading = [number >= 0 for number in line]
    sections = {i for i in range(1, n) if heading[i] and not heading[i - 1]}
    spans = [m.span() for m in re.finditer(r"\S+", doc.text)]
    sentence_end = [
        w.endswith((".", "!"))
        or i + 1 == n
        or "\n\n" in doc.text[spans[i][1] : spans[i + 1][0]]
        or (heading[i] and line[i + 1] != line[i])
        for i, w in enumerate(doc_words)
    ]

    chunks = split_text(doc.text, size, overlap)
    assert chunks == split_text(doc.text, size, overlap)  # deterministic, so ids are stable
    assert [c.position for c in chunks] == list(range(len(chunks)))
    ranges = locate(doc_words, chunks)
    assert ranges[0][0] == 0
    assert ranges[-1][1] == n  # with no gaps between chunks: every word is covered
    for chunk, (start, stop) in zip(chunks, ranges, strict=True):
        assert 1 <= stop - start <= size
        # A slice of the document, spacing and line breaks kept.
        assert chunk.text == doc.text[spans[start][0] : spans[stop - 1][1]]
        # Never ends with a heading line, never starts halfway through one.
        assert not heading[stop - 1]
        assert not heading[start] or start == 0 or line[start - 1] != line[start]
        if stop == n:
            continue
        reachable = {s for s in sections if start < s <= start + size}
        if stop in sections:
            assert stop == max(reachable)  # cut before the last heading the window reaches
            assert start + size < n  # (had it reached the end, the rest would be one chunk)
        else:
            assert not reachable  # a cut inside a section: the window held no heading
            half = range(start + max(1, size // 2) - 1, start + size)
            if any(sentence_end[i] and not heading[i] for i in half):
                assert sentence_end[stop - 1]
            else:
                assert stop - start == size
    for (_, stop), (next_start, _) in itertools.pairwise(ranges):
        if stop in sections:
            assert next_start == stop  # a heading cut leaves no overlap
        else:
            # The overlap is at most `overlap` words and crosses no heading...
            assert stop - overlap <= next_start <= stop
            assert not any(next_start < s <= stop for s in sections)
            # ...nor starts in the heading lines that open the previous chunk.
            assert not heading[next_start]
