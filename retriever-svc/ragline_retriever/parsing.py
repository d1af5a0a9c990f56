"""Turn an uploaded document (plain text, Markdown, HTML or PDF) into text ready for chunking.

Every format comes out as the same plain, Markdown-flavoured text: headings are ATX lines
("# Title", "## Section") because the chunker treats those as its strongest boundaries
(see chunking.py), paragraphs are separated by one blank line, newlines are "\\n", and
inline markup that carries no words (link targets, HTML tags) is gone. What is left is
meant for BM25 and embeddings, not for display.

Each parser is defensive about its input, because an upload is untrusted: undecodable or
binary text, corrupt or encrypted PDFs and documents with no text all end in
`UnsupportedDocument`, whose message is written for the person who uploaded the file.
Parsing is synchronous and CPU-bound (a long PDF takes seconds): call it off the event loop.
"""

from __future__ import annotations

import codecs
import io
import logging
import re
import unicodedata
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import PurePosixPath

from pypdf import PageObject, PdfReader
from pypdf.errors import DependencyError

from ragline_retriever.chunking import code_fence_flags

log = logging.getLogger("ragline.retriever.parsing")

FORMATS = ("text", "markdown", "html", "pdf")
# A longer PDF is refused before any text is extracted: extraction costs time per page.
MAX_PDF_PAGES = 2000

_CONTENT_TYPES = {
    "text/plain": "text",
    "text/x-rst": "text",
    "text/markdown": "markdown",
    "text/x-markdown": "markdown",
    "text/html": "html",
    "application/xhtml+xml": "html",
    "application/pdf": "pdf",
    "application/x-pdf": "pdf",
}
_SUFFIXES = {
    ".txt": "text",
    ".text": "text",
    ".rst": "text",
    ".md": "markdown",
    ".markdown": "markdown",
    ".html": "html",
    ".htm": "html",
    ".xhtml": "html",
    ".pdf": "pdf",
}
_SUPPORTED = "plain text (.txt), Markdown (.md), HTML (.html) and PDF (.pdf)"
# A first line longer than this is a paragraph, not a title.
_TITLE_MAX_CHARS = 200


class UnsupportedDocument(ValueError):
    """The upload cannot be turned into text; the message says why, for the uploader."""


@dataclass(frozen=True)
class ParsedDocument:
    text: str  # normalized; headings as Markdown ATX lines ("# Title", "## Section")
    title: str  # the best title found, "" if none


def detect_format(filename: str = "", content_type: str = "") -> str:
    """The format of an upload: by its content type first, then by its file name's suffix.

    A generic or unknown content type (application/octet-stream, what curl sends) defers
    to the suffix. One exception: text/plain with a Markdown suffix is Markdown, because
    many clients label .md files text/plain and Markdown parsing is the better reading.
    """
    mime = content_type.split(";", 1)[0].strip().lower()
    # Old browsers send the whole Windows path ("C:\\docs\\notes.md").
    suffix = PurePosixPath(filename.replace("\\", "/")).suffix.lower()
    by_type = _CONTENT_TYPES.get(mime)
    by_suffix = _SUFFIXES.get(suffix)
    if by_type == "text" and by_suffix == "markdown":
        return "markdown"
    fmt = by_type or by_suffix
    if fmt:
        return fmt
    given = [
        f"{what} {part[:100]!r}"
        for what, part in (("content type", content_type), ("file name", filename))
        if part
    ]
    raise UnsupportedDocument(
        f"unsupported document type ({', '.join(given) or 'no content type or file name'}); "
        f"supported are {_SUPPORTED}"
    )


def parse_document(data: bytes | str, fmt: str) -> ParsedDocument:
    """Text and title of a document in one of FORMATS; UnsupportedDocument if it has none."""
    if fmt == "text":
        text = _normalize(_decode_text(data))
        parsed = ParsedDocument(text, _first_line_title(text))
    elif fmt == "markdown":
        parsed = _parse_markdown(_normalize(_decode_text(data)))
    elif fmt == "html":
        parsed = _parse_html(_decode_html(data))
    elif fmt == "pdf":
        parsed = _parse_pdf(data)
    else:
        raise UnsupportedDocument(f"unknown document format {fmt!r}; expected one of {FORMATS}")
    if not parsed.text.strip():
        raise UnsupportedDocument("no text found in the document")
    return parsed


# --- text and decoding -------------------------------------------------------------------

_BOMS = (
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),  # what Windows Notepad calls "Unicode"
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
# C0 controls (tab, newline and, by now, form feed and CR aside) and DEL: binary debris.
_CONTROL = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f]")
# Soft hyphen, zero-width space and a stray BOM: invisible, but they split words for BM25.
_INVISIBLE = re.compile("[\u00ad\u200b\ufeff]")


def _decode_bom(data: bytes) -> str | None:
    for bom, codec in _BOMS:
        if data.startswith(bom):
            return data[len(bom) :].decode(codec, errors="replace")
    return None


def _decode_text(data: bytes | str) -> str:
    """UTF-8 (or UTF-16 with a BOM); anything else is refused rather than guessed.

    A guessed legacy encoding indexes mojibake that no query will ever match; a clear
    "save it as UTF-8" costs the uploader one step.
    """
    if isinstance(data, str):
        text = data
    else:
        decoded = _decode_bom(data)
        if decoded is None:
            try:
                decoded = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UnsupportedDocument(
                    f"the document is not UTF-8 text (invalid byte at offset {exc.start}); "
                    "save it as UTF-8 and upload it again"
                ) from None
        text = decoded
    if "\x00" in text:
        raise UnsupportedDocument("the document contains NUL bytes: it is binary, not text")
    return text


def _normalize(text: str) -> str:
    """One newline convention, no control or invisible characters, at most one blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\f", "\n\n").replace("\u2029", "\n\n").replace("\u2028", "\n")
    text = _INVISIBLE.sub("", _CONTROL.sub("", text))
    text = unicodedata.normalize("NFC", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def _first_line_title(text: str) -> str:
    """The first non-empty line, when it is short enough to be a title."""
    for line in text.split("\n"):
        line = line.strip().lstrip("#").strip()
        if line:
            return line if len(line) <= _TITLE_MAX_CHARS else ""
    return ""


# --- Markdown ----------------------------------------------------------------------------

# YAML (---) or TOML (+++) front matter at the very top, as Jekyll, Hugo and MkDocs write it.
_FRONT_MATTER = re.compile(
    r"\A(---|\+\+\+)[ \t]*\n(.*?\n)?(?:---|\.\.\.|\+\+\+)[ \t]*(?:\n|\Z)", re.S
)
_FRONT_MATTER_TITLE = re.compile(r"^title[ \t]*[:=][ \t]*(.+?)[ \t]*$", re.M)
# Its first line must be a key, or a leading "---" and a later "---" are thematic breaks.
_FRONT_MATTER_KEY = re.compile(r"\s*[A-Za-z_][\w-]*[ \t]*[:=]")
_SETEXT_UNDERLINE = re.compile(r" {0,3}(=+|-+)[ \t]*")
# A line that cannot be a setext heading's text: blank, heading, quote, list item, code.
_NOT_SETEXT_TEXT = re.compile(r"\s*$| {0,3}(?:#|>|[-*+](?:\s|$)|\d{1,9}[.)](?:\s|$))| {4}")
# [text](target) and ![alt](target) keep their words; reference definitions go entirely.
_INLINE_LINK = re.compile(r"!?\[([^\[\]\n]*)\]\([^()\n]*(?:\([^()\n]*\)[^()\n]*)*\)")
_REFERENCE_LINK = re.compile(r"!?\[([^\[\]\n]+)\]\[[^\[\]\n]*\]")
_REFERENCE_DEFINITION = re.compile(r" {0,3}\[[^\]\n]+\]:[ \t]+\S+.*")
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
_LEVEL1_HEADING = re.compile(r" {0,3}#[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*")


def _parse_markdown(text: str) -> ParsedDocument:
    """Markdown stays Markdown; only what carries no words for search is rewritten.

    Front matter is dropped (its title kept as the title), setext headings become ATX
    headings (the form the chunker knows), link and image targets and HTML comments go.
    Fenced code is left exactly as written.
    """
    title = ""
    front = _FRONT_MATTER.match(text)
    if front and _FRONT_MATTER_KEY.match(front.group(2) or ""):
        found = _FRONT_MATTER_TITLE.search(front.group(2) or "")
        if found:
            title = found.group(1).strip("\"'").strip()
        text = text[front.end() :]
    lines = text.split("\n")
    out: list[str] = []
    prose: list[str] = []  # consecutive lines outside fenced code
    for line, in_code in zip(lines, code_fence_flags(lines), strict=True):
        if in_code:
            out.extend(_markdown_prose(prose))
            prose.clear()
            out.append(line)
        else:
            prose.append(line)
    out.extend(_markdown_prose(prose))
    text = _normalize("\n".join(out))
    return ParsedDocument(text, title or _first_h1(text))


def _first_h1(text: str) -> str:
    """The text of the first "# " heading outside fenced code, "" if there is none."""
    lines = text.split("\n")
    for line, in_code in zip(lines, code_fence_flags(lines), strict=True):
        heading = None if in_code else _LEVEL1_HEADING.fullmatch(line)
        if heading:
            return heading.group(1)
    return ""


def _markdown_prose(lines: list[str]) -> list[str]:
    """Rewrite a run of non-code lines: comments, links, setext headings."""
    if not lines:
        return []
    text = _HTML_COMMENT.sub("", "\n".join(lines))
    text = _INLINE_LINK.sub(r"\1", text)
    text = _REFERENCE_LINK.sub(r"\1", text)
    out: list[str] = []
    for line in text.split("\n"):
        if _REFERENCE_DEFINITION.fullmatch(line):
            continue
        underline = _SETEXT_UNDERLINE.fullmatch(line)
        # Only a one-line paragraph becomes a heading: after a multi-line paragraph a
        # "---" may as well be a thematic break, and leaving it alone is harmless.
        if (
            underline
            and out
            and not _NOT_SETEXT_TEXT.match(out[-1])
            and (len(out) == 1 or not out[-2].strip())
        ):
            level = "#" if underline.group(1)[0] == "=" else "##"
            out[-1] = f"{level} {out[-1].strip()}"
            continue
        out.append(line)
    return out


# --- HTML --------------------------------------------------------------------------------

_META_CHARSET = re.compile(rb"<meta[^>]*?charset\s*=\s*[\"']?\s*([a-z0-9_.:-]+)", re.I)
_XML_ENCODING = re.compile(rb"<\?xml[^>]*?encoding\s*=\s*[\"']([a-z0-9_.:-]+)", re.I)


def _decode_html(data: bytes | str) -> str:
    """Decode as a browser would: BOM, then a declared charset, then UTF-8, then windows-1252."""
    if isinstance(data, str):
        text = data
    elif (decoded := _decode_bom(data)) is not None:
        text = decoded
    elif codec := _declared_charset(data[:4096]):
        text = data.decode(codec, errors="replace")
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            # The HTML standard's fallback for undeclared legacy pages.
            text = data.decode("cp1252", errors="replace")
    if "\x00" in text:
        raise UnsupportedDocument("the document contains NUL bytes: it is binary, not HTML")
    return text


def _declared_charset(head: bytes) -> str | None:
    found = _META_CHARSET.search(head) or _XML_ENCODING.search(head)
    if not found:
        return None
    try:
        name = codecs.lookup(found.group(1).decode("ascii")).name
        b"a".decode(name, errors="replace")  # "base64" is a codec, not a text encoding
    except LookupError:
        return None
    # As the HTML standard says: a byte stream that declares UTF-16 in ASCII is not
    # UTF-16, and latin-1 / ascii labels mean windows-1252.
    if name.startswith("utf-16"):
        return "utf-8"
    if name in ("iso8859-1", "ascii"):
        return "cp1252"
    return name


# Never text for a reader: code, styling, page chrome and what is hidden.
_SKIPPED = frozenset(
    {"script", "style", "noscript", "template", "svg", "canvas", "iframe", "object"}
    | {"nav", "footer", "select", "button", "datalist"}
)
_VOID = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source"}
    | {"track", "wbr", "param"}
)
_BLOCKS = frozenset(
    {"p", "div", "section", "article", "main", "header", "aside", "blockquote", "address"}
    | {"ul", "ol", "dl", "table", "thead", "tbody", "tfoot", "figure", "figcaption", "hr"}
    | {"details", "summary", "form", "fieldset", "caption", "center", "body", "html"}
)
_LINES = frozenset({"li", "dt", "dd", "tr", "br", "legend"})
# What may stand in <head>; any other tag starts the body, closed </head> or not.
_HEAD_CONTENT = frozenset(
    {"head", "title", "meta", "link", "base", "style", "script", "noscript", "template"}
)
_HEADINGS = {f"h{level}": level for level in range(1, 7)}


class _HTMLText(HTMLParser):
    """Collects the readable text of a page as Markdown-flavoured lines.

    There is no tree: HTMLParser reports tags as they come, and real pages leave many
    unclosed. A skipped element is followed by counting its own tag name only (nested
    <div>s in a hidden <div>), which keeps hostile nesting linear; everything else just
    turns its start and end tags into line or paragraph breaks.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []  # finished lines, and the newlines between them
        self.title = ""
        self.first_h1 = ""
        self._line: list[str] = []  # inline text of the line being built
        self._prefix = ""  # "## " or "- " for that line
        self._skip_tag = ""  # the skipped element we are in
        self._skip_depth = 0  # how many of that tag are open; 0: not skipping
        self._in_head = False
        self._in_title = False
        self._title: list[str] = []
        self._heading = 0  # level of the open heading, 0 outside one
        self._pre: list[str] | None = None  # raw text of an open <pre>
        self._lists = 0  # depth of open ul/ol
        self._tables = 0  # depth of open tables
        self._cells = 0  # cells seen in the current table row
        self._newlines = 0  # owed before the next line: 1 after a line, 2 after a paragraph

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        hidden = any(
            name == "hidden" or (name == "aria-hidden" and value == "true") for name, value in attrs
        )
        if self._skip_depth:
            if tag == self._skip_tag:
                self._skip_depth += 1
            return
        if (tag in _SKIPPED or hidden) and tag not in _VOID:
            self._skip_tag, self._skip_depth = tag, 1
            return
        if self._in_title and (tag in _BLOCKS or tag in _HEADINGS):
            self._end_title()  # "<title>x<p>": an unclosed title must not swallow the page
        if tag == "head":
            self._in_head = True
        elif tag not in _HEAD_CONTENT:
            self._in_head = False  # as in browsers: body content ends an unclosed head
        if tag == "title":
            self._in_title = True
        elif self._in_head:
            return
        elif tag in _HEADINGS:
            self._break(blank=True)
            self._heading = _HEADINGS[tag]
            self._prefix = "#" * self._heading + " "
        elif self._heading:
            if tag in _BLOCKS or tag in _LINES:
                self._line.append(" ")  # a heading stays one line
        elif self._pre is not None:
            if tag == "br":
                self._pre.append("\n")
        elif tag == "pre":
            self._break(blank=True)
            self._pre = []
        elif tag == "br":
            self._break(blank=False, again=True)
        elif tag in ("ul", "ol"):
            self._break(blank=not self._lists)  # a nested list goes on the next line
            self._lists += 1
        elif tag == "li":
            self._break(blank=False)
            self._prefix = "  " * max(self._lists - 1, 0) + "- "
        elif tag == "tr":
            self._break(blank=False)
            self._cells = 0
        elif tag in ("td", "th"):
            self._cells += 1
            if self._cells > 1 and "".join(self._line).strip():
                self._line.append(" | ")
        elif tag in _BLOCKS:
            # Within a list item or a table, a paragraph is a line: the list stays a list.
            self._break(blank=not (self._lists or self._tables))
            if tag == "table":
                self._tables += 1
        elif tag in _LINES:
            self._break(blank=False)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        # <br/>, <img/>: a start tag that is never closed.
        self.handle_starttag(tag, attrs)
        if self._skip_depth and tag == self._skip_tag:
            self._skip_depth -= 1

    def handle_endtag(self, tag: str) -> None:
        if self._skip_depth:
            if tag == self._skip_tag:
                self._skip_depth -= 1
            return
        if tag == "head":
            self._in_head = False
        elif tag == "title":
            self._end_title()
        elif tag in _HEADINGS and self._heading:
            if self._heading == 1 and not self.first_h1:
                self.first_h1 = " ".join("".join(self._line).split())
            self._break(blank=True)
            self._heading = 0
            self._prefix = ""  # an empty heading leaves no "## " behind
        elif tag == "pre" and self._pre is not None:
            code = "".join(self._pre).strip("\n")
            self._pre = None
            if code.strip():
                # Fenced, so that a "# comment" in it is not taken for a heading.
                self._emit(f"```\n{code}\n```")
            self._newlines = 2
        elif self._heading:
            if tag in _BLOCKS or tag in _LINES:
                self._line.append(" ")
        elif self._pre is not None:
            return
        elif tag in ("ul", "ol"):
            self._lists = max(self._lists - 1, 0)
            self._break(blank=not self._lists)
            self._prefix = ""  # nor does an empty item
        elif tag in _BLOCKS:
            if tag == "table":
                self._tables = max(self._tables - 1, 0)
            self._break(blank=not (self._lists or self._tables))
        elif tag in _LINES:
            self._break(blank=False)

    def handle_data(self, data: str) -> None:
        if self._skip_depth:
            return
        if self._in_title:
            self._title.append(data)
        elif self._in_head:
            return
        elif self._pre is not None:
            self._pre.append(data)
        else:
            self._line.append(data)

    def close(self) -> None:
        super().close()
        if self._pre is not None:  # an unclosed <pre>: keep its text
            self._line.append("".join(self._pre))
            self._pre = None
        self._break(blank=True)

    def _end_title(self) -> None:
        self._in_title = False
        self.title = self.title or " ".join("".join(self._title).split())

    def _break(self, *, blank: bool, again: bool = False) -> None:
        """End the current line (whitespace collapsed, heading or list prefix added).

        Breaks between two lines do not add up (</p><p> is one blank line, not two),
        except `again` ones: <br><br> is a blank line. An empty line keeps its prefix:
        in <li><p>text</p></li> the bullet waits for the text.
        """
        line = " ".join("".join(self._line).split())
        self._line.clear()
        if line:
            self._emit(self._prefix + line)
            self._prefix = ""
        wanted = 2 if blank else 1
        if again and not line:
            wanted = self._newlines + 1
        self._newlines = min(max(self._newlines, wanted), 2)

    def _emit(self, block: str) -> None:
        if self.out:
            self.out.append("\n" * max(self._newlines, 1))
        self.out.append(block)
        self._newlines = 0


def _parse_html(html: str) -> ParsedDocument:
    parser = _HTMLText()
    try:
        parser.feed(html)
        parser.close()
    except (AssertionError, ValueError) as exc:  # HTMLParser gives up on some broken markup
        raise UnsupportedDocument("the HTML could not be parsed") from exc
    text = _normalize("".join(parser.out))
    return ParsedDocument(text, parser.title or parser.first_h1)


# --- PDF ---------------------------------------------------------------------------------

# Typographic ligatures, as PDF fonts often encode them: "ﬁnd" must match "find".
_LIGATURES = str.maketrans(
    {"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl"}
    | {"\ufb05": "st", "\ufb06": "st"}
)


def _parse_pdf(data: bytes | str) -> ParsedDocument:
    """Text per page (pages separated by a blank line) and the metadata title.

    pypdf is pure Python and bounds its own decompression; the page limit bounds the
    rest. On hostile or broken files it can raise nearly any exception, so every failure
    of the library becomes UnsupportedDocument instead of a 500.
    """
    if isinstance(data, str):
        raise UnsupportedDocument("a PDF must be uploaded as a binary file")
    if b"%PDF-" not in data[:1024]:
        raise UnsupportedDocument("the file is not a PDF (no %PDF header)")
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted and not reader.decrypt(""):
            # An empty user password opens "restricted" PDFs; anything else needs one.
            raise UnsupportedDocument("the PDF is password-protected; upload it unencrypted")
        if len(reader.pages) > MAX_PDF_PAGES:
            raise UnsupportedDocument(
                f"the PDF has {len(reader.pages)} pages; at most {MAX_PDF_PAGES} are accepted"
            )
        pages = [_page_text(page, number) for number, page in enumerate(reader.pages, 1)]
    except UnsupportedDocument:
        raise
    except DependencyError as exc:  # AES needs the optional `cryptography` package
        raise UnsupportedDocument("the PDF's encryption cannot be opened by this server") from exc
    except Exception as exc:
        raise UnsupportedDocument("the PDF could not be read: it is damaged or malformed") from exc
    if pages and all(page is None for page in pages):
        raise UnsupportedDocument("the PDF could not be read: no page could be extracted")
    text = _normalize("\n\n".join(page for page in pages if page).translate(_LIGATURES))
    if not text:
        raise UnsupportedDocument(
            "no text found in the PDF: it has no extractable text (a scan needs OCR first)"
        )
    return ParsedDocument(text, _metadata_title(reader) or _first_line_title(text))


def _metadata_title(reader: PdfReader) -> str:
    """The document information's /Title; "" when absent or unreadable (it is optional)."""
    try:
        metadata = reader.metadata
        return " ".join(str(metadata.title or "").split()) if metadata else ""
    except Exception:
        return ""


def _page_text(page: PageObject, number: int) -> str | None:
    """A page's text; None when this page alone is broken, so one bad page costs one page."""
    try:
        return page.extract_text()
    except DependencyError:
        raise
    except Exception as exc:
        log.warning("skipping unreadable PDF page %d: %s", number, exc)
        return None
