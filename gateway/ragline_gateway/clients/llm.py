"""llm-svc client: OpenAI-compatible streaming chat completions, so a stock `vllm serve`
can stand in for llm-svc.

The stream is opened (status checked) before the gateway sends its own response headers,
so that an llm-svc failure before the first token can still be a plain 503.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from ragline_common.middleware import request_headers
from ragline_gateway.clients.base import UpstreamClient, UpstreamError


@dataclass(slots=True)
class Delta:
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None


def _to_lf(data: bytes) -> bytes:
    """CRLF and CR line ends as LF; a CR at the end waits for what follows it."""
    held = data.endswith(b"\r")
    data = (data[:-1] if held else data).replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return data + b"\r" if held else data


class LlmStream:
    """The deltas of one streamed completion.

    Server-sent events are split out of the raw body here rather than through httpx's
    text and line decoders: a token is one small event, and each decoding layer would be
    paid once per token (the request asks for an unencoded body, so raw is decoded).
    """

    def __init__(self, response: httpx.Response) -> None:
        self.response = response

    async def deltas(self) -> AsyncIterator[Delta]:
        pending = b""
        async for chunk in self.response.aiter_raw():
            pending += chunk
            if b"\r" in pending:  # SSE also allows CRLF and CR line ends; vLLM sends LF
                pending = _to_lf(pending)
            while (end := pending.find(b"\n\n")) >= 0:
                block, pending = pending[:end], pending[end + 2 :]
                for line in block.split(b"\n"):
                    if not line.startswith(b"data:"):
                        continue  # comments, `event:` and `id:` lines
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        return
                    yield self._delta(orjson.loads(data))

    @staticmethod
    def _delta(chunk: dict[str, Any]) -> Delta:
        if "error" in chunk:
            raise UpstreamError("llm", str(chunk["error"]))
        delta = Delta(usage=chunk.get("usage"))
        for choice in chunk.get("choices") or ():
            delta.text = (choice.get("delta") or {}).get("content") or ""
            delta.finish_reason = choice.get("finish_reason")
        return delta

    async def aclose(self) -> None:
        await self.response.aclose()


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


class LlmClient(UpstreamClient):
    name = "llm"

    async def open_stream(
        self,
        messages: list[dict[str, str]],
        *,
        model: str,
        sampling: dict[str, Any],
        connect_timeout: float,
        read_timeout: float,
    ) -> LlmStream:
        body = {
            "model": model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            **sampling,
        }
        self.check_reachable()
        content = orjson.dumps(body)
        request = self.http.build_request(
            "POST",
            "/v1/chat/completions",
            # As an iterator with its length given, so that the prompt (passages and all)
            # is sent with a Content-Length and then dropped, not held by the request for
            # the whole answer: it was an eighth of the memory of an open stream.
            content=_once(content),
            headers={
                **request_headers(),
                "content-type": "application/json",
                "content-length": str(len(content)),
                "accept-encoding": "identity",
            },
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
        )
        try:
            response = await self.http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise UpstreamError(self.name, f"unreachable ({type(exc).__name__})") from exc
        if response.status_code >= 400:
            await response.aread()
            await response.aclose()
            self._checked(response)
        return LlmStream(response)

    async def model_name(self, timeout: float = 5.0) -> str:
        payload = await self.call("GET", "/v1/models", timeout)
        return str(payload["data"][0]["id"])
