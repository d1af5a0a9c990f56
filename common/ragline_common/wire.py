"""Pydantic models of the internal wire contracts (ARCHITECTURE.md, "Wire contracts").

Both sides of each call import these, so a contract change is one edit that the type
checker follows. Bounds live here too: every input is bounded.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import quote

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    StrictFloat,
    StrictInt,
    StringConstraints,
    Tag,
    ValidationError,
    WithJsonSchema,
    model_serializer,
    model_validator,
)

COLLECTION_PATTERN = r"^[a-z][a-z0-9_]{0,62}$"
# Conversation ids (`conversation_id`, Open WebUI's chat id header) keep the narrow rule
# document ids had before issue 20: they become parts of Redis keys and log fields.
CONVERSATION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,255}$"

# --- document ids ----------------------------------------------------------------------
#
# A document id is the user's own name for a document: any Unicode text of 1 to 512 bytes
# of UTF-8 (file names, titles, `Sky (United Kingdom)-3`, `reports/2024 Q1.pdf`), but for
# what cannot be safe:
# - control characters: C0 (newline, tab, ...), DEL and C1 (U+0000-001F, U+007F-009F);
#   the line and paragraph separators U+2028/U+2029; the bidirectional embeddings,
#   overrides and isolates U+202A-202E and U+2066-2069 (they reorder the text shown after
#   them in a log line or a terminal); lone surrogates (not Unicode text: no UTF-8 holds
#   them);
# - whitespace at either end (str.isspace: space, NBSP, U+2000-200A, U+3000, ...);
#   whitespace inside is fine;
# - a `.` or `..` segment between slashes (`a/../b`, `./a`, `a/.`): URL normalisation in
#   nginx and httpx would turn it into another document, or another route.
# In a URL path the id is one percent-encoded segment: `doc_id_path`.

MAX_DOC_ID_BYTES = 512
_UNSAFE_IN_ID = re.compile(
    "[\\x00-\\x1f\\x7f-\\x9f"  # C0 controls, DEL, C1 controls
    "\\u2028\\u2029"  # line and paragraph separators
    "\\u202a-\\u202e\\u2066-\\u2069"  # bidirectional embeddings, overrides, isolates
    "\\ud800-\\udfff]"  # lone surrogates
)
_DOT_SEGMENTS = frozenset({".", ".."})


def doc_id_problem(value: str) -> str | None:
    """Why `value` is not a valid document id (a sentence for the 422), or None."""
    if not value:
        return "a document id must not be empty"
    unsafe = _UNSAFE_IN_ID.search(value)
    if unsafe and 0xD800 <= ord(unsafe[0]) <= 0xDFFF:
        where = unsafe.start()
        return f"a document id must be Unicode text (a lone surrogate at character {where})"
    if unsafe:
        return (
            f"a document id must not contain control characters (U+{ord(unsafe[0]):04X} at "
            f"character {unsafe.start()})"
        )
    size = len(value.encode("utf-8"))
    if size > MAX_DOC_ID_BYTES:
        return f"a document id is at most {MAX_DOC_ID_BYTES} bytes of UTF-8; this one has {size}"
    if value.strip() != value:
        return "a document id must not begin or end with whitespace"
    if _DOT_SEGMENTS.intersection(value.split("/")):
        return "a document id must not contain '.' or '..' path segments (as in 'a/../b')"
    return None


def is_doc_id(value: str) -> bool:
    return doc_id_problem(value) is None


def check_doc_id(value: str) -> str:
    """The validator of `DocId` (and of ids in a URL path or query)."""
    problem = doc_id_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def check_optional_doc_id(value: str | None) -> str | None:
    return None if value is None else check_doc_id(value)


def doc_id_path(doc_id: str) -> str:
    """The id as one segment of a URL path: percent-encoded as UTF-8, every character but
    ASCII letters, digits and `-._~` (so `/`, `%`, `?`, `#`, space and `+` are encoded).
    Routes take it so (`/documents/{doc_id:path}` decodes it once), and the gateway builds
    the retriever's URL so."""
    return quote(doc_id, safe="")


def _cut_utf8(text: str, limit: int) -> str:
    """The longest prefix of `text` of at most `limit` bytes of UTF-8."""
    return text.encode("utf-8")[:limit].decode("utf-8", errors="ignore")


def doc_id_from_name(name: str) -> str:
    """A document id from a file name or relative path, so re-sending the same file
    replaces the document: the name itself where it is a valid id (`Report (v2).pdf` and
    `Report [v2].pdf` stay two documents). Otherwise the nearest valid id: control
    characters become '-', the id is cut to 512 bytes, whitespace at its ends and `.`/`..`
    segments are dropped; "document" when nothing is left."""
    if is_doc_id(name):
        return name
    cleaned = _UNSAFE_IN_ID.sub("-", name)
    cleaned = _cut_utf8(cleaned, MAX_DOC_ID_BYTES)
    while True:  # each pass only shortens it, so this ends
        parts = [part for part in cleaned.strip().split("/") if part not in _DOT_SEGMENTS]
        shorter = "/".join(parts).strip()
        if shorter == cleaned:
            break
        cleaned = shorter
    return cleaned if is_doc_id(cleaned) else "document"


DocId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_DOC_ID_BYTES),
    AfterValidator(check_doc_id),
    WithJsonSchema(
        {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_DOC_ID_BYTES,
            "description": (
                "1 to 512 bytes of UTF-8; no control characters, no whitespace at either "
                "end, no '.' or '..' segment between slashes"
            ),
        }
    ),
]

CollectionName = Annotated[str, StringConstraints(pattern=COLLECTION_PATTERN)]
MetadataValue = str | int | float | bool

MAX_QUERY_CHARS = 4000
MAX_DOCUMENT_CHARS = 2_000_000
MAX_TITLE_CHARS = 1000
MAX_DOCUMENTS_PER_BATCH = 256
MAX_RETRIEVE_TOP_K = 200
MAX_RERANK_DOCUMENTS = 256
MAX_RERANK_DOCUMENT_CHARS = 20_000


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


# --- filters (retrieve requests, gateway and retriever alike) -----------------------------
#
# `{field: value}` is equality, `{field: [v1, v2]}` membership, and
# `{field: {"gte"?, "gt"?, "lte"?, "lt"?}}` a range. A field is `doc_id`, `source`, `title`
# or a key of the document's metadata; ranges apply to metadata keys only. Comparisons are
# typed: "1", 1 and true are three different values; 1 and 1.0 are the same number.
# A numeric range matches numeric values only, a date range (ISO-8601 bounds) matches string
# values that are ISO-8601 dates, compared as instants. A document without the key never
# matches. Every backend implements exactly this (tests/test_retriever_contract.py).

FILTER_FIELD_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
# Filter fields that are document attributes rather than metadata keys.
DOCUMENT_FILTER_FIELDS = frozenset({"doc_id", "source", "title"})

# The extended calendar form only, so that identifiers such as `20240501` or `2024-W18`
# are never taken for dates: a date, optionally a time, optionally an offset.
_ISO_INSTANT = re.compile(
    r"\d{4}-\d{2}-\d{2}(?:T\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?(?:Z|[+-]\d{2}:\d{2})?)?",
    re.ASCII,
)


def iso_instant(value: str) -> float | None:
    """Epoch seconds of an ISO-8601 date or date-time string; None when it is not one.

    A date alone means midnight UTC and a date-time without an offset is UTC, so every
    store compares the same instants whatever offset each value was written with.
    """
    if not _ISO_INSTANT.fullmatch(value):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:  # a well-formed impossible date: 2024-02-30, 25:00
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def finite_number(value: int | float) -> float | None:
    """A number as the float every store compares (None if it has no finite float).

    Stores compare numbers as IEEE doubles (Elasticsearch maps them to `double`), so
    integers are exact up to 2**53 everywhere; -0.0 is folded into 0.0, which some
    engines would otherwise order below it.
    """
    try:
        number = float(value)
    except OverflowError:
        return None
    return number + 0.0 if math.isfinite(number) else None


RangeBound = StrictInt | StrictFloat | str


class Range(StrictModel):
    """`{"gte": 2020, "lt": 2024}` or `{"gte": "2024-05-01", "lt": "2024-06-01T00:00:00Z"}`.

    Bounds are all numbers or all ISO-8601 dates; at least one is given, never both of
    gt/gte or lt/lte, and the range is not empty. Validation happens here so a bad range is
    a 422 at the edge rather than a different failure in each backend.
    """

    gt: RangeBound | None = None
    gte: RangeBound | None = None
    lt: RangeBound | None = None
    lte: RangeBound | None = None

    @property
    def kind(self) -> Literal["number", "date"]:
        bound = next(b for b in (self.gt, self.gte, self.lt, self.lte) if b is not None)
        return "date" if isinstance(bound, str) else "number"

    def lower(self) -> tuple[float, bool] | None:
        """(value, inclusive) of the lower bound as the stores compare it; None if open."""
        if self.gte is not None:
            return _comparable(self.gte), True
        if self.gt is not None:
            return _comparable(self.gt), False
        return None

    def upper(self) -> tuple[float, bool] | None:
        """(value, inclusive) of the upper bound as the stores compare it; None if open."""
        if self.lte is not None:
            return _comparable(self.lte), True
        if self.lt is not None:
            return _comparable(self.lt), False
        return None

    @model_validator(mode="after")
    def _check(self) -> Range:
        bounds = [b for b in (self.gt, self.gte, self.lt, self.lte) if b is not None]
        if not bounds:
            raise ValueError("a range needs at least one of gt, gte, lt, lte")
        if self.gt is not None and self.gte is not None:
            raise ValueError("give gt or gte, not both")
        if self.lt is not None and self.lte is not None:
            raise ValueError("give lt or lte, not both")
        if len({isinstance(b, str) for b in bounds}) > 1:
            raise ValueError("range bounds must be all numbers or all ISO-8601 dates")
        for bound in bounds:
            _comparable(bound)  # raises for a non-date string or a non-finite number
        lower, upper = self.lower(), self.upper()
        if (
            lower
            and upper
            and (lower[0] > upper[0] or (lower[0] == upper[0] and not (lower[1] and upper[1])))
        ):
            raise ValueError("the range is empty: no value lies between its bounds")
        return self

    @model_serializer(mode="wrap")
    def _without_open_bounds(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """`{"gte": 2020}` on the wire, not four keys with nulls."""
        return {key: value for key, value in handler(self).items() if value is not None}


def _comparable(bound: int | float | str) -> float:
    if isinstance(bound, str):
        instant = iso_instant(bound)
        if instant is None:
            raise ValueError(
                f"{bound!r} is not an ISO-8601 date (2024-05-01, 2024-05-01T10:00:00Z, "
                "2024-05-01T12:00:00+02:00)"
            )
        return instant
    number = finite_number(bound)
    if number is None:
        raise ValueError(f"range bound {str(bound)[:40]} is not a finite number")
    return number


def _checked_range(bounds: dict[str, Any]) -> dict[str, Any]:
    """Validate a range with `Range` but keep it a plain dict, so that validated filters
    stay plain JSON data that any caller can forward, log or hash."""
    try:
        checked = Range.model_validate(bounds)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            where = ".".join(map(str, error["loc"]))
            problems.append(f"{where}: {message}" if where else message)
        raise ValueError("; ".join(problems)) from None
    return checked.model_dump()


def _filter_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "range"
    return "any_of" if isinstance(value, list) else "equals"


_RANGE_SCHEMA = {
    "type": "object",
    "description": "A range on a metadata key: all numbers or all ISO-8601 dates.",
    "properties": {
        bound: {"anyOf": [{"type": "number"}, {"type": "string", "examples": ["2024-05-01"]}]}
        for bound in ("gt", "gte", "lt", "lte")
    },
    "additionalProperties": False,
    "minProperties": 1,
}

# The discriminator picks one branch, so a bad range reports the range's own error rather
# than one line per union member.
FilterValue = Annotated[
    Annotated[MetadataValue, Tag("equals")]
    | Annotated[list[MetadataValue], Tag("any_of")]
    | Annotated[
        dict[str, Any], AfterValidator(_checked_range), WithJsonSchema(_RANGE_SCHEMA), Tag("range")
    ],
    Discriminator(_filter_kind),
]


def _ranges_on_metadata_only(filters: dict[str, Any]) -> dict[str, Any]:
    for name, value in filters.items():
        if isinstance(value, dict) and name in DOCUMENT_FILTER_FIELDS:
            raise ValueError(f"{name!r} takes a value or a list of values; ranges are for metadata")
    return filters


Filters = Annotated[
    dict[Annotated[str, StringConstraints(pattern=FILTER_FIELD_PATTERN)], FilterValue],
    AfterValidator(_ranges_on_metadata_only),
]


# --- retriever-svc ---------------------------------------------------------------------


class DocumentIn(StrictModel):
    id: DocId
    text: Annotated[str, StringConstraints(min_length=1, max_length=MAX_DOCUMENT_CHARS)]
    title: Annotated[str, StringConstraints(max_length=MAX_TITLE_CHARS)] = ""
    url: Annotated[str, StringConstraints(max_length=2000)] = ""
    source: Annotated[str, StringConstraints(max_length=1000)] = ""
    metadata: dict[str, MetadataValue] = Field(default_factory=dict, max_length=64)
    # How to read `text`: Markdown loses front matter and link targets, HTML its markup;
    # headings of both become chunk boundaries. PDF and other files go to the files route.
    format: Literal["text", "markdown", "html"] = "text"


class IngestRequest(StrictModel):
    documents: list[DocumentIn] = Field(min_length=1, max_length=MAX_DOCUMENTS_PER_BATCH)


class IngestResponse(BaseModel):
    collection: str
    documents: int
    chunks: int
    timings: dict[str, float] = Field(default_factory=dict)


class DeleteResponse(BaseModel):
    collection: str
    doc_id: str
    deleted: bool


class CollectionInfo(BaseModel):
    name: str
    chunks: int


class CollectionsResponse(BaseModel):
    collections: list[CollectionInfo]


class RetrieveRequest(StrictModel):
    query: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_QUERY_CHARS)
    ]
    collection: CollectionName = "default"
    top_k: int = Field(default=50, ge=1, le=MAX_RETRIEVE_TOP_K)
    filters: Filters = Field(default_factory=dict, max_length=16)


class Hit(BaseModel):
    chunk_id: str
    doc_id: str
    text: str
    title: str = ""
    url: str = ""
    source: str = ""
    metadata: dict[str, MetadataValue] = Field(default_factory=dict)
    score: float
    # 1-based rank in each backend's list; None where that backend did not return it.
    ranks: dict[Literal["lexical", "dense"], int | None] = Field(default_factory=dict)
    # Each backend's own score: `lexical` the BM25 score (None where the lexical search did
    # not return the chunk), `dense` the cosine of the query embedding and the chunk's
    # stored vector (for a hit only the lexical search found, its vector is looked up, not
    # embedded again; None when that failed or the dense backend is down). What the
    # gateway ranks by when no cross-encoder is configured (ranking.py there).
    scores: dict[Literal["lexical", "dense"], float | None] = Field(default_factory=dict)


class RetrieveResponse(BaseModel):
    hits: list[Hit]
    degraded: list[Literal["lexical", "dense"]] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)


# --- reranker-svc (the widely used rerank shape) ----------------------------------------


class RerankRequest(StrictModel):
    model: str | None = None
    query: Annotated[str, StringConstraints(min_length=1, max_length=MAX_QUERY_CHARS)]
    documents: list[
        Annotated[str, StringConstraints(min_length=1, max_length=MAX_RERANK_DOCUMENT_CHARS)]
    ] = Field(min_length=1, max_length=MAX_RERANK_DOCUMENTS)
    top_n: int | None = Field(default=None, ge=1, le=MAX_RERANK_DOCUMENTS)
    return_documents: bool = False


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: dict[str, str] | None = None


class RerankResponse(BaseModel):
    model: str
    results: list[RerankResult]


# --- llm-svc (OpenAI Chat Completions subset) ------------------------------------------


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Annotated[str, StringConstraints(max_length=200_000)]


# --- OpenAI generation options that the gateway forwards to llm-svc ---------------------

# The values vLLM 0.32's ChatCompletionRequest takes; chat templates read them.
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


class JsonSchemaSpec(BaseModel):
    """`response_format.json_schema` as OpenAI defines it; `schema` is what constrains."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: Annotated[str, StringConstraints(max_length=64)] = "response"
    description: str | None = None
    # `schema` would shadow BaseModel.schema: held under another name, spelt `schema` on
    # the wire.
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: `text` (no constraint), `json_object` (any JSON object)
    or `json_schema` (JSON matching `json_schema.schema`). vLLM turns the last two into
    structured-output decoding; the extractive engine refuses them (it writes no JSON)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format type 'json_schema' needs a `json_schema` object")
        return self

    def wire(self) -> dict[str, Any]:
        """As sent on to llm-svc (and to a stock `vllm serve` standing in for it)."""
        return self.model_dump(by_alias=True, exclude_none=True)


def check_logit_bias(bias: dict[str, float]) -> dict[str, float]:
    """OpenAI's shape: token ids (as JSON object keys) to a bias in [-100, 100]. The
    vocabulary size is the engine's to check."""
    for token, value in bias.items():
        if not token.isascii() or not token.isdigit():
            raise ValueError(f"logit_bias keys are token ids; {token[:20]!r} is not one")
        if not -100 <= value <= 100:
            raise ValueError("logit_bias values lie between -100 and 100")
    return bias


LogitBias = Annotated[dict[str, float], Field(max_length=1024), AfterValidator(check_logit_bias)]
