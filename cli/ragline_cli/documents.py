"""Reading files into ingestible documents: the id is the path relative to what was named,
so re-ingesting the same folder replaces documents instead of duplicating them.

The path is the id as it is wherever it is a valid document id (ragline_common.wire:
spaces, parentheses, brackets, accents are all fine), so `Report (v2).pdf` and
`Report [v2].pdf` stay two documents; only a name no id can be (a control character,
whitespace at an end of it, over 512 bytes) is changed, by `doc_id_from_name`. Ids made
by earlier versions, which replaced every character outside `A-Za-z0-9._:/@-` with `-`,
are still valid ids: those documents stay reachable (and deletable) under them, but a
re-ingest of a renamed-by-the-old-rule file now writes it under its own name.

Text files (.md, .txt, .rst) are read here and sent as JSON documents in batches; HTML
and PDF are uploaded as they are and parsed by the retriever, which knows those formats.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ragline_common.wire import doc_id_from_name

MARKDOWN_SUFFIXES = {".md", ".markdown"}
TEXT_SUFFIXES = {*MARKDOWN_SUFFIXES, ".txt", ".rst"}
UPLOAD_SUFFIXES = {".html": "text/html", ".htm": "text/html", ".pdf": "application/pdf"}


def doc_id_for(path: Path, root: Path) -> str:
    """The file's path relative to `root` (its name for a single file), `/`-separated."""
    rel = path.relative_to(root) if path != root else Path(path.name)
    return doc_id_from_name(rel.as_posix())


def split_title(path: Path, text: str) -> tuple[str, str]:
    """A leading `# Heading` is the title (and leaves the body, so answers don't quote it);
    otherwise the file name is."""
    first, _, rest = text.partition("\n")
    if first.startswith("# ") and rest.strip():
        return first[2:].strip(), rest.strip()
    return path.stem.replace("-", " ").replace("_", " "), text


def _files(target: Path) -> tuple[Path, list[Path]]:
    root = target if target.is_dir() else target.parent
    files = sorted(target.rglob("*")) if target.is_dir() else [target]
    return root, [p for p in files if p.is_file()]


def iter_documents(target: Path) -> Iterator[dict[str, Any]]:
    root, files = _files(target)
    for path in files:
        if path.suffix.lower() not in TEXT_SUFFIXES:
            continue
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if not text:
            continue
        title, body = split_title(path, text)
        yield {
            "id": doc_id_for(path, root),
            "title": title,
            "text": body,
            "source": path.name,
            "metadata": {"path": str(path.relative_to(root))},
            "format": "markdown" if path.suffix.lower() in MARKDOWN_SUFFIXES else "text",
        }


def iter_uploads(target: Path) -> Iterator[tuple[Path, str, str]]:
    """(path, document id, content type) of every file the retriever parses itself."""
    root, files = _files(target)
    for path in files:
        content_type = UPLOAD_SUFFIXES.get(path.suffix.lower())
        if content_type:
            yield path, doc_id_for(path, root), content_type
