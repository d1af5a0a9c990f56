"""A recording generation model for gateway tests: a small HTTP server that speaks the
OpenAI stream the gateway reads from its LLM upstream (llm-svc or `vllm serve`), keeps
every request body, and answers with pieces a test chooses.

It stands in for a *model*, not for llm-svc's code: the tests that use it check what the
gateway sends a model (the prompt, the passages kept, sampling options) and what it does
with what a model writes that no real engine here can be made to write on demand
(citations of sources that do not exist, split across tokens). llm-svc itself is tested
on its real engines (test_llm_service.py, test_llm_vllm.py).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

# The answer, piece by piece (one stream chunk each), for a request body.
Answer = Callable[[dict[str, Any]], list[str]]
# The bytes of the streamed body, from the model name and the pieces.
Body = Callable[[str, list[str]], bytes]


@dataclass
class RecordingLlm:
    model: str
    url: str = ""
    bodies: list[dict[str, Any]] = field(default_factory=list)


def stream_body(model: str, pieces: list[str]) -> bytes:
    """A whole streamed completion: role, one chunk per piece, stop, usage, [DONE]."""
    head = {"id": "chatcmpl-rec", "object": "chat.completion.chunk", "created": 0,
            "model": model}  # fmt: skip

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    frames = [chunk({"role": "assistant", "content": ""})]
    frames += [chunk({"content": piece}) for piece in pieces]
    frames.append(chunk({}, "stop"))
    usage = {"prompt_tokens": 10, "completion_tokens": len(pieces),
             "total_tokens": 10 + len(pieces)}  # fmt: skip
    frames.append({**head, "choices": [], "usage": usage})
    return b"".join(b"data: " + orjson.dumps(f) + b"\n\n" for f in frames) + b"data: [DONE]\n\n"


@contextmanager
def recording_llm(model: str, answer: Answer, body: Body | None = None) -> Iterator[RecordingLlm]:
    """The server on a free loopback port for the length of the block. `body` replaces
    the whole, well-formed stream (`stream_body`): a stream cut short, say."""
    make_body = body or stream_body
    record = RecordingLlm(model)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as llm-svc

        def _send(self, body: bytes, content_type: str) -> None:
            self.send_response(200)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/v1/models":
                models = {"object": "list", "data": [{"id": model, "object": "model"}]}
                self._send(orjson.dumps(models), "application/json")
            else:  # /readyz, the gateway's health probe
                self._send(b'{"status": "ready"}', "application/json")

        def do_POST(self) -> None:
            asked = json.loads(self.rfile.read(int(self.headers["content-length"])))
            record.bodies.append(asked)
            self._send(make_body(model, answer(asked)), "text/event-stream")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    record.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield record
    finally:
        server.shutdown()
        server.server_close()
