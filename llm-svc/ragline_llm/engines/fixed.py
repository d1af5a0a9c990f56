"""A benchmark engine: a fixed number of fixed tokens at a fixed interval, and no work.

`RAGLINE_LLM_ENGINE=fixed` answers every request with `RAGLINE_LLM_FIXED_TOKENS` copies of
one word (fewer when the request's `max_tokens` is lower: `finish_reason` is then
`length`), whatever the prompt. The first token comes at once; token i is due
`i x RAGLINE_LLM_TOKEN_INTERVAL_MS` after the first, on a fixed schedule, so one late
wake-up does not push every later token back. With an interval of 0 it still yields to
the event loop between tokens.

It reads nothing but the request's `max_tokens`, so a stream costs only what serving and
relaying it cost: what the gateway benchmarks (`benchmarks/gateway_bench.py`) measure.
It is not for answering anyone.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ragline_llm.engines.base import GenerationDelta, GenerationRequest, LocalEngine

WORD = "token"


class FixedEngine(LocalEngine):
    name = "fixed"

    def __init__(
        self, model_name: str = "ragline-fixed", tokens: int = 64, token_interval_ms: float = 15.0
    ) -> None:
        super().__init__()
        self.model_name = model_name
        self.tokens = tokens
        self.interval = token_interval_ms / 1000.0

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """`min(tokens, max_tokens)` words; sampling fields and `stop` are ignored."""
        self._active += 1
        try:
            count = min(self.tokens, request.max_tokens)
            prompt_tokens = sum(len(m.content) for m in request.messages) // 4
            loop = asyncio.get_running_loop()
            start = loop.time()
            for i in range(count):
                if i:
                    delay = start + i * self.interval - loop.time()
                    await asyncio.sleep(delay if delay > 0 else 0)
                yield GenerationDelta(WORD if i == 0 else " " + WORD, None, prompt_tokens, i + 1)
            reason = "length" if count < self.tokens else "stop"
            yield GenerationDelta("", reason, prompt_tokens, count)
        finally:
            self._active -= 1
