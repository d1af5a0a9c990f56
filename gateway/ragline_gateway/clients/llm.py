"""llm-svc client: OpenAI-compatible streaming chat completions, so a stock `vllm serve`
can stand in for llm-svc (docs/llm-upstreams.md: what differs and which settings).

The stream is opened (status checked, first event read) before the gateway sends its own
response headers, so that an upstream failure or refusal before the first token can still
be a plain 503 or 4xx.

Errors come back in ragline's envelope whichever server answered: llm-svc's codes as they
are, and vLLM's own bodies (`{"error": {"message", "type", "param", "code": 400}}`, or the
flat `{"object": "error", "message", ...}` of older releases) mapped to the code llm-svc
gives for the same refusal (`upstream_error`), so a client sees the same 400 either way.
"""

from __future__ import annotations

import re
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
        self._raw = response.aiter_raw()
        self._pending = b""  # read by `first_event`, not yet split by `deltas`

    async def first_event(self) -> None:
        """Reads the body up to the end of its first event with data, which `deltas` then
        yields as usual. A refusal sent as that event is raised here, as the error status
        it names: vLLM checks some parameters (a `logit_bias` token outside the vocabulary)
        only once the stream has begun, and answers a streamed request with a 200 and
        `data: {"error": {..., "code": 400}}`, where llm-svc answers a plain 400."""
        start = 0
        while True:
            end = self._pending.find(b"\n\n", start)
            if end < 0:
                try:
                    self._pending += await anext(self._raw)
                except StopAsyncIteration:
                    raise _cut_off("before its first event") from None
                if b"\r" in self._pending:
                    self._pending = _to_lf(self._pending)
                continue
            lines = self._pending[start:end].split(b"\n")
            start = end + 2
            data = next((line[5:].strip() for line in lines if line.startswith(b"data:")), None)
            if data is None:
                continue  # a comment (`: ping`) or an event without data
            if data == b"[DONE]":
                return
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError:
                return  # `deltas` fails on it as on any bad event
            if _is_error(chunk):
                raise _stream_error(chunk, "refused the request in its stream")
            return

    async def deltas(self) -> AsyncIterator[Delta]:
        pending, self._pending = self._pending, b""
        raw = self._raw
        while True:
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
            try:
                pending += await anext(raw)
            except StopAsyncIteration:
                raise _cut_off("mid-stream") from None

    @staticmethod
    def _delta(chunk: dict[str, Any]) -> Delta:
        if _is_error(chunk):
            raise _stream_error(chunk, "failed mid-stream")
        delta = Delta(usage=chunk.get("usage"))
        for choice in chunk.get("choices") or ():
            delta.text = (choice.get("delta") or {}).get("content") or ""
            delta.finish_reason = choice.get("finish_reason")
        return delta

    async def aclose(self) -> None:
        await self.response.aclose()


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _cut_off(where: str) -> UpstreamError:
    """A body that ended without `data: [DONE]`: llm-svc and vLLM always send it, so the
    answer was cut (the upstream or a proxy between closed the response early), and must
    not pass for a whole one."""
    return UpstreamError("llm", f"the stream ended without [DONE] {where}")


def _is_error(chunk: Any) -> bool:
    """An error event in place of a chunk: llm-svc's and vLLM's `{"error": {...}}`, or
    older vLLM's flat `{"object": "error", ...}`."""
    return isinstance(chunk, dict) and ("error" in chunk or chunk.get("object") == "error")


def _stream_error(chunk: dict[str, Any], what: str) -> UpstreamError:
    """The UpstreamError for an error event: its status is the one vLLM's event names
    (`code`: 400 for a refused parameter), else 500."""
    error = chunk.get("error")
    code = (error if isinstance(error, dict) else chunk).get("code")
    given = code if isinstance(code, int) and 400 <= code < 600 else 500
    status, body = upstream_error(given, chunk)
    return UpstreamError("llm", f"{what}: {body['error'].get('message')}", status, body)


# vLLM's refusals of a prompt that leaves no room in the context: its character and token
# pre-checks (`param` input_text / input_tokens), the engine's own, and a prompt that fills
# the context exactly (vLLM cuts max_tokens to the room left, 0, then refuses that).
_PROMPT_TOO_LONG = re.compile(
    r"maximum context length|longer than the maximum model length", re.IGNORECASE
)
_NO_ROOM = re.compile(r"max_tokens must be at least 1, got 0\b")
_MAX_TOKENS_TOO_LARGE = re.compile(r"max_tokens=\d+ cannot be greater than", re.IGNORECASE)


def upstream_error(status: int, payload: Any) -> tuple[int, dict[str, Any]]:
    """(status, `{"error": {"code", "message"}}`) for an error answer of llm-svc or vLLM.

    llm-svc's envelope passes as it is. vLLM's numeric `code` becomes llm-svc's code for
    the same refusal: `prompt_too_long`, `max_tokens_too_large`, else `invalid_request`
    (any other 4xx: vLLM checked a parameter; its message says which). vLLM's 404 (the
    model named is not served) is the gateway's own misconfiguration (`LLM_MODEL`), not
    the client's: it becomes 502, which the pipeline answers as 503
    `generation_unavailable`. 5xx keep their status."""
    if not isinstance(payload, dict):
        payload = {}
    error = payload.get("error")
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        return status, payload  # llm-svc: ragline's envelope already
    info: dict[str, Any] = error if isinstance(error, dict) else payload
    message = str(info.get("message") or error or f"answered {status}")
    param = info.get("param")
    if status == 404:
        return 502, {"error": {"code": "model_not_served", "message": message}}
    if status >= 500:
        code = "overloaded" if status == 503 else "engine_error"
    elif param in ("input_text", "input_tokens") or _PROMPT_TOO_LONG.search(message):
        code = "prompt_too_long"
    elif _NO_ROOM.search(message):
        code = "prompt_too_long"
        message = f"the prompt fills the model's context: no room is left for an answer ({message})"
    elif _MAX_TOKENS_TOO_LARGE.search(message):
        code = "max_tokens_too_large"
    else:
        code = "invalid_request"
    return status, {"error": {"code": code, "message": message}}


class LlmClient(UpstreamClient):
    name = "llm"

    def __init__(
        self,
        base_url: str,
        pool_size: int,
        connect_timeout: float = 2.0,
        health_path: str = "",
        upstream_http: str = "httptools",
    ) -> None:
        super().__init__(
            base_url, pool_size, connect_timeout=connect_timeout, upstream_http=upstream_http
        )
        # llm-svc answers /readyz; `vllm serve` answers /health (LLM_HEALTH_PATH).
        self.health_path = health_path or "/readyz"

    @classmethod
    def from_settings(cls, settings: Any, pool_size: int) -> LlmClient:
        return cls(
            settings.llm_url,
            pool_size,
            connect_timeout=settings.llm_connect_timeout_s,
            health_path=settings.llm_health_path,
            upstream_http=settings.upstream_http,
        )

    def _checked(self, response: httpx.Response) -> Any:
        try:
            payload = response.json()
        except ValueError:
            payload = {}
        if response.status_code >= 400:
            status, body = upstream_error(response.status_code, payload)
            raise UpstreamError(self.name, f"answered {response.status_code}", status, body)
        return payload

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
        stream = LlmStream(response)
        try:
            await stream.first_event()
        except httpx.HTTPError as exc:
            await response.aclose()
            message = f"failed before its first event ({type(exc).__name__})"
            raise UpstreamError(self.name, message) from exc
        except BaseException:  # refused in its stream, or the caller gave up: abort there
            await response.aclose()
            raise
        return stream

    async def model_name(self, timeout: float = 5.0) -> str:
        payload = await self.call("GET", "/v1/models", timeout)
        return str(payload["data"][0]["id"])
