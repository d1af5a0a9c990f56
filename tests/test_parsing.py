"""Document parsing (retriever-svc): formats, text and headings; bad files refused."""

from __future__ import annotations

import io

import pytest
from pypdf import PdfReader, PdfWriter

from ragline_retriever.chunking import split_text
from ragline_retriever.parsing import (
    FORMATS,
    MAX_PDF_PAGES,
    ParsedDocument,
    UnsupportedDocument,
    detect_format,
    parse_document,
)

# --- format detection --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "content_type", "expected"),
    [
        ("notes.txt", "text/plain", "text"),
        ("", "text/markdown; charset=utf-8", "markdown"),
        ("page", "application/xhtml+xml", "html"),
        ("report.bin", "application/pdf", "pdf"),  # the content type wins
        ("report.PDF", "application/octet-stream", "pdf"),  # a generic type: the suffix
        ("C:\\Users\\me\\guide.Markdown", "", "markdown"),
        ("index.htm", "", "html"),
        ("README.rst", "", "text"),
        ("README.md", "text/plain", "markdown"),  # .md files are often sent as text/plain
    ],
)
def test_format_comes_from_the_content_type_then_the_suffix(
    filename: str, content_type: str, expected: str
) -> None:
    assert detect_format(filename, content_type) == expected
    assert expected in FORMATS


def test_an_unknown_format_is_refused_with_what_is_supported() -> None:
    with pytest.raises(UnsupportedDocument, match=r"'image/png'.*'photo\.png'.*PDF"):
        detect_format("photo.png", "image/png")
    with pytest.raises(UnsupportedDocument, match="no content type or file name"):
        detect_format()
    with pytest.raises(UnsupportedDocument, match="unknown document format 'docx'"):
        parse_document(b"x", "docx")


# --- plain text ----------------------------------------------------------------------------


def test_text_is_decoded_and_normalized() -> None:
    data = "\ufeffMy Notes\r\n\r\n\r\n\r\nCafé  costs\x07 5€.   \rLast line\n".encode()
    parsed = parse_document(data, "text")
    assert parsed == ParsedDocument("My Notes\n\nCafé  costs 5€.\nLast line", "My Notes")
    utf16 = parse_document("\ufeffHallo Welt".encode("utf-16-le"), "text")
    assert utf16.text == "Hallo Welt"
    # A first line too long for a title is not one.
    assert parse_document("word " * 100, "text").title == ""


def test_text_that_is_not_utf8_or_is_binary_is_refused() -> None:
    with pytest.raises(UnsupportedDocument, match=r"not UTF-8 text.*offset 3"):
        parse_document("Café".encode("latin-1"), "text")
    with pytest.raises(UnsupportedDocument, match="binary"):
        parse_document(b"abc\x00\x01\x02def", "text")
    with pytest.raises(UnsupportedDocument, match="no text found"):
        parse_document(b" \r\n\t\n", "text")


# --- Markdown ------------------------------------------------------------------------------

MARKDOWN = """---
title: "Getting Started"
tags: [guide]
---
Welcome
=======

Read the [installation guide](https://example.com/install_(v2)) first.
![architecture diagram](img/arch.png)

Installation
------------

- Run `make` ([details][make-ref]).
- Then start it.

[make-ref]: https://example.com/make
<!-- TODO: document
Windows -->

```sh
# this is a shell comment, not a heading
make install
```

## Usage

Ask a question.
"""


def test_markdown_drops_front_matter_and_link_targets_and_converts_setext_headings() -> None:
    parsed = parse_document(MARKDOWN.encode(), "markdown")
    assert parsed.title == "Getting Started"
    assert parsed.text == (
        "# Welcome\n\n"
        "Read the installation guide first.\n"
        "architecture diagram\n\n"
        "## Installation\n\n"
        "- Run `make` (details).\n"
        "- Then start it.\n\n"
        "```sh\n# this is a shell comment, not a heading\nmake install\n```\n\n"
        "## Usage\n\n"
        "Ask a question."
    )


def test_markdown_title_falls_back_to_the_first_level_one_heading() -> None:
    text = "```\n# not this\n```\n\nIntro.\n\n# Real Title #\n\nBody.\n"
    assert parse_document(text, "markdown").title == "Real Title"
    assert parse_document("Just text.\n\n## Sub\n", "markdown").title == ""


def test_markdown_thematic_breaks_are_not_front_matter_or_headings() -> None:
    text = "---\n\nFirst part.\n\n---\n\nSecond part.\n"
    parsed = parse_document(text, "markdown")
    assert parsed.text == "---\n\nFirst part.\n\n---\n\nSecond part."
    # Under a list item or a multi-line paragraph, "---" is left alone too.
    assert parse_document("- item\n---\n", "markdown").text == "- item\n---"
    assert parse_document("one\ntwo\n---\n", "markdown").text == "one\ntwo\n---"


def test_markdown_sections_become_chunks_that_start_at_their_headings() -> None:
    sentences = " ".join(f"Step {i} of the usage is explained here." for i in range(20))
    text = f"{MARKDOWN}{sentences}\n\n## Troubleshooting\n\nRestart it."
    chunks = split_text(parse_document(text, "markdown").text, size=40, overlap=8)
    starts = [c.text.split("\n", 1)[0] for c in chunks]
    # Welcome and Installation are small and share the first chunk; Usage is long.
    assert starts[0] == "# Welcome"
    assert "## Installation" in chunks[0].text
    assert starts[1] == "## Usage"
    assert starts[-1] == "## Troubleshooting"
    assert chunks[-1].text == "## Troubleshooting\n\nRestart it."
    assert all("# this is a shell comment" not in s for s in starts)


# --- HTML ----------------------------------------------------------------------------------

HTML = """<!DOCTYPE html>
<html lang="fr"><head>
<meta charset="iso-8859-1">
<title>Caf\xe9 &amp; Guide</title>
<style>p { color: red }</style>
<script>var s = "<p>not text</p>";</script>
</head>
<body>
<nav><ul><li><a href="/">Home</a></li><li>Menu</li></ul></nav>
<header><h1>The <em>Caf\xe9</em> Guide<small>book</small></h1></header>
<main>
<p>Opening   hours are
   long &mdash; \x93very\x94&nbsp;long.<br>Closed on Mondays.</p>
<noscript>Enable JavaScript</noscript>
<div hidden>secret offer</div>
<h2>Menu</h2>
<ul><li>Coffee</li><li><p>Tea &lt;green&gt;</p></li><li>Cake<ol><li>Lemon</li></ol></li></ul>
<h3></h3>
<table><tr><th>Item</th><th>Price</th></tr><tr><td>Coffee</td><td>2&euro;</td></tr></table>
<pre># not a heading
  indented line</pre>
<template><p>template text</p></template>
<svg><title>icon</title><text>svg text</text></svg>
</main>
<footer>Copyright 2024</footer>
</body></html>
"""


def test_html_keeps_the_readable_text_with_markdown_headings_and_lists() -> None:
    # The charset comes from the meta tag; "iso-8859-1" means windows-1252, as in browsers.
    parsed = parse_document(HTML.encode("latin-1"), "html")
    assert parsed.title == "Café & Guide"
    assert parsed.text == (
        "# The Café Guidebook\n\n"
        "Opening hours are long — “very” long.\n"
        "Closed on Mondays.\n\n"
        "## Menu\n\n"
        "- Coffee\n"
        "- Tea <green>\n"
        "- Cake\n"
        "  - Lemon\n\n"
        "Item | Price\n"
        "Coffee | 2€\n\n"
        "```\n# not a heading\n  indented line\n```"
    )


def test_html_decoding_and_title_fallbacks() -> None:
    # No declared charset: UTF-8 when it decodes, else windows-1252 as browsers do.
    assert parse_document("<p>naïve</p>".encode(), "html").text == "naïve"
    assert parse_document("<p>naïve “quoted”</p>".encode("cp1252"), "html").text == (
        "naïve “quoted”"
    )
    # No <title>: the first h1; an unclosed <head> ends where the body content starts.
    parsed = parse_document("<head><meta x=y><h2>Sub</h2><h1>Main</h1><p>Body", "html")
    assert parsed == ParsedDocument("## Sub\n\n# Main\n\nBody", "Main")
    with pytest.raises(UnsupportedDocument, match="no text found"):
        parse_document("<html><head><title>Empty</title></head><body> </body></html>", "html")


@pytest.mark.parametrize(
    ("html", "expected"),
    [
        ("<title>Unclosed<p>Body text", ParsedDocument("Body text", "Unclosed")),
        ("<ul><li>a<li>b</ul><p>after", ParsedDocument("- a\n- b\n\nafter", "")),
        ("<table><tr><td><p>x</p><td>y</table>after", ParsedDocument("x\ny\n\nafter", "")),
        ("<p>one<br/>two<br><br>three</p>", ParsedDocument("one\ntwo\n\nthree", "")),
        ("<nav>" * 50_000 + "</nav>" * 50_000 + "<p>kept</p>", ParsedDocument("kept", "")),
        ('<meta charset="base64"><p>caf\u00e9</p>', ParsedDocument("caf\u00e9", "")),
    ],
)
def test_html_from_careless_or_hostile_markup(html: str, expected: ParsedDocument) -> None:
    assert parse_document(html.encode(), "html") == expected


def test_html_sections_become_chunks_that_start_at_their_headings() -> None:
    story = "".join(f"<p>Paragraph {i} tells a longer story here.</p>" for i in range(12))
    after = "".join(f"<div>Afterword {i} closes the story here.</div>" for i in range(12))
    html = f"<h1>Story</h1>{story}<h2>Epilogue</h2>{after}"
    chunks = split_text(parse_document(html, "html").text, size=30, overlap=7)
    starts = [i for i, c in enumerate(chunks) if c.text.startswith("#")]
    assert [chunks[i].text.split("\n")[0] for i in starts] == ["# Story", "## Epilogue"]
    epilogue = starts[1]
    # The story's last chunk stops at the end of the story, before the Epilogue heading.
    assert chunks[epilogue - 1].text.endswith("Paragraph 11 tells a longer story here.")
    # Inside each long section: sentence-aligned chunks whose overlap stays in the section.
    for chunk in chunks[1:epilogue]:
        assert chunk.text.startswith("Paragraph") and chunk.text.endswith("here.")
    for chunk in chunks[epilogue + 1 :]:
        assert chunk.text.startswith("Afterword") and chunk.text.endswith("here.")


# --- PDF -----------------------------------------------------------------------------------


def pdf_string(text: str) -> str:
    return "(" + text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ")"


def minimal_pdf(pages: list[list[str]], title: str | None = None) -> bytes:
    """A valid PDF written out by hand: one page per list, one Helvetica text line per string.

    Independent of pypdf's writer, so the reader is tested on bytes it did not produce.
    """
    kids = " ".join(f"{5 + 2 * i} 0 R" for i in range(len(pages)))
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
        f"<< /Title {pdf_string(title)} >>" if title is not None else "<< >>",
    ]
    for i, lines in enumerate(pages):
        shown = " T* ".join(f"{pdf_string(line)} Tj" for line in lines)
        content = f"BT /F1 12 Tf 14 TL 72 720 Td {shown} ET"
        objects.append(
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {6 + 2 * i} 0 R >>"
        )
        objects.append(f"<< /Length {len(content)} >>\nstream\n{content}\nendstream")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode("cp1252")
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{offset:010d} 00000 n \n" for offset in offsets).encode()
    out += (
        f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R /Info 4 0 R >>\n"
        f"startxref\n{xref}\n%%EOF\n"
    ).encode()
    return bytes(out)


TWO_PAGES = [
    ["Quarterly Report (Q3)", "Revenue grew by 12 percent.", "Costs fell."],
    ["Outlook", "The café opens in May."],
]


def encrypted(pdf: bytes, user_password: str) -> bytes:
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf)))
    writer.encrypt(user_password, "owner-secret", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def test_pdf_text_comes_page_by_page_with_the_metadata_title() -> None:
    parsed = parse_document(minimal_pdf(TWO_PAGES, title="Q3 Report 2024"), "pdf")
    assert parsed == ParsedDocument(
        "Quarterly Report (Q3)\nRevenue grew by 12 percent.\nCosts fell.\n\n"
        "Outlook\nThe café opens in May.",
        "Q3 Report 2024",
    )
    # Without a metadata title: the first line.
    assert parse_document(minimal_pdf(TWO_PAGES), "pdf").title == "Quarterly Report (Q3)"


def test_an_owner_password_alone_does_not_stop_reading_but_a_user_password_does() -> None:
    pdf = minimal_pdf(TWO_PAGES, title="Q3 Report 2024")
    restricted = encrypted(pdf, user_password="")
    assert b"Revenue" not in restricted  # really encrypted
    assert parse_document(restricted, "pdf") == parse_document(pdf, "pdf")
    with pytest.raises(UnsupportedDocument, match="password-protected"):
        parse_document(encrypted(pdf, user_password="open-sesame"), "pdf")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GIF89a not a pdf at all", "not a PDF"),
        (b"%PDF-1.7\n" + bytes(range(256)) * 8, "damaged or malformed"),
        (minimal_pdf(TWO_PAGES)[:400], "damaged or malformed"),  # truncated
        (minimal_pdf([[], []]), "no extractable text.*OCR"),  # like a scan: pages, no text
        (minimal_pdf([[]] * (MAX_PDF_PAGES + 1)), f"2001 pages; at most {MAX_PDF_PAGES}"),
    ],
)
def test_unreadable_pdfs_are_refused_with_a_reason(data: bytes, message: str) -> None:
    with pytest.raises(UnsupportedDocument, match=message):
        parse_document(data, "pdf")


def test_pdf_must_be_bytes() -> None:
    with pytest.raises(UnsupportedDocument, match="binary file"):
        parse_document("%PDF-1.4 ...", "pdf")
