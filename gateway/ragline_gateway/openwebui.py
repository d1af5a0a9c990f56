"""Open WebUI: how it is recognised, and the `source` events it shows passage text from.

Open WebUI (measured with 0.12.4) reads only `url` and `title` of a `url_citation`, so
its citation dialog shows no passage text for them; it shows passage text from a
chunk's top-level `event` of type `source`, which its backend hands to the browser and
which no OpenAI SDK knows. A client recognised as Open WebUI therefore gets one such
chunk per passage (`choices: []`) before the answer's text, in passage order (its
citation numbers), and no annotations: both would merge into one citation per URL whose
dialog lists the title as a second passage. `distances` is left out: Open WebUI colours
it as a relevance badge with fixed thresholds, and reranker scores are not calibrated
to them.

Recognised by the headers Open WebUI's backend adds to every call to an OpenAI
connection when ENABLE_FORWARD_USER_INFO_HEADERS is on (`X-OpenWebUI-User-Id`,
`-User-Name`, `-User-Email`, `-User-Role`, and `-Chat-Id` in a chat), which no other
client sends. Not by its User-Agent: the backend calls with aiohttp and sets none, so it
sends aiohttp's default (`Python/3.x aiohttp/3.x`), as does any aiohttp client. Where the
headers are off, `X-Ragline-Source-Events: true` asks for the events (Open WebUI: the
connection's Headers setting); `false` turns them off for a recognised client. The
gateway setting `OPENAI_SOURCE_EVENTS` (`auto`, `always`, `never`) decides over both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ragline_common.errors import ApiError
from ragline_gateway.citations import passage_url, title
from ragline_gateway.pipeline import Source

OPT_IN_HEADER = "x-ragline-source-events"
IDENTITY_HEADERS = (
    "x-openwebui-user-id",
    "x-openwebui-chat-id",
    "x-openwebui-user-name",
    "x-openwebui-user-email",
    "x-openwebui-user-role",
)
_SWITCH = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def is_open_webui(headers: Mapping[str, str]) -> bool:
    return any(headers.get(name) for name in IDENTITY_HEADERS)


def wants_source_events(headers: Mapping[str, str], setting: str) -> bool:
    """Whether a streamed answer carries `source` events (see the module docstring)."""
    if setting != "auto":
        return setting == "always"
    asked = headers.get(OPT_IN_HEADER)
    if asked is None:
        return is_open_webui(headers)
    switch = _SWITCH.get(asked.strip().lower())
    if switch is None:
        raise ApiError(400, "invalid_request", "X-Ragline-Source-Events must be true or false")
    return switch


def source_event(source: Source) -> dict[str, Any]:
    """One passage as Open WebUI's `source` event; `id` is the passage's own URL, which
    Open WebUI keys citations by; `url`, which it links to, only when that is a web one."""
    url, name = passage_url(source), title(source)
    link = {"url": url} if url.startswith(("http://", "https://")) else {}
    return {
        "type": "source",
        "data": {
            "source": {"name": name, "id": url, **link},
            "document": [source.text],
            "metadata": [{"source": url, "name": name}],
        },
    }
