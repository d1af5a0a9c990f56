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


class LlmStream:
    def __init__(self, response: httpx.Response) -> None:
        self.response = response

    async def deltas(self) -> AsyncIterator[Delta]:
        async for line in self.response.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, comments, `event:` lines
            data = line[5:].strip()
            if data == "[DONE]":
                return
            chunk = orjson.loads(data)
            if "error" in chunk:
                raise UpstreamError("llm", str(chunk["error"]))
            delta = Delta(usage=chunk.get("usage"))
            for choice in chunk.get("choices") or ():
                delta.text = (choice.get("delta") or {}).get("content") or ""
                delta.finish_reason = choice.get("finish_reason")
            yield delta

    async def aclose(self) -> None:
        await self.response.aclose()


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
        request = self.http.build_request(
            "POST",
            "/v1/chat/completions",
            content=orjson.dumps(body),
            headers={**request_headers(), "content-type": "application/json"},
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
