"""What the gateway does with each OpenAI Chat Completions parameter: use it, accept and
ignore it, or refuse it (400 `unsupported_parameter`, naming every refused one).

Decided by what vLLM's own server (0.32, `ChatCompletionRequest`) does, because a stock
`vllm serve` is the generation engine llm-svc stands for, and clients are written against
it and OpenAI:

- used: what vLLM uses to generate reaches llm-svc (and vLLM), in both modes (with and
  without the knowledge base), so sampling and output-format options work as they do on
  `vllm serve`;
- accepted and ignored: what vLLM accepts and ignores, and every field this gateway does
  not declare (vLLM's request models allow extra fields and only log them): a client is
  never refused for a field merely unknown here. Tools are ignored unless a call is
  demanded: chat UIs (Open WebUI) send their built-in tools with every chat, and ragline
  answers from documents and calls no tool;
- refused: only what asks for an answer ragline does not give, which a client would
  otherwise take for granted: several choices, token log-probabilities, a forced tool or
  function call.

The README's OpenAI section holds the same table for clients.
"""

from __future__ import annotations

from typing import Any

from ragline_gateway.protocol import OpenAIChatRequest

# Forwarded to llm-svc under the same names (None: llm-svc's and the model's defaults).
GENERATION_FIELDS = (
    "temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty",
    "logit_bias", "reasoning_effort", "min_p", "repetition_penalty", "min_tokens",
)  # fmt: skip

# Accepted and ignored, and why. Fields not declared at all are ignored likewise.
IGNORED: dict[str, str] = {
    "tools": "ragline answers from documents and calls no tool (tool_choice absent, auto, none)",
    "tool_choice": "`auto` and `none` leave the choice to the server, which calls none",
    "function_call": "the legacy `tools`: `auto` and `none` are ignored likewise",
    "functions": "the legacy `tools`",
    "parallel_tool_calls": "no tool is called",
    "user": "an end-user id for abuse monitoring at OpenAI; vLLM ignores it too",
    "store": "OpenAI's stored completions: nothing is stored for later retrieval",
    "metadata": "tags for OpenAI's stored completions",
    "service_tier": "OpenAI's processing tiers",
    "prompt_cache_key": "OpenAI's prompt-cache routing; vLLM caches prefixes by itself",
    "safety_identifier": "an end-user id for abuse monitoring at OpenAI",
    "modalities": "text is the only output (as on vLLM, which ignores it)",
    "audio": "text is the only output (as on vLLM, which ignores it)",
    "prediction": "a latency hint: the answer is the same without it",
    "web_search_options": "ragline searches its own documents",
    "verbosity": "not a vLLM parameter; the answer's length follows max_tokens",
    "ignore_eos": "a benchmarking switch of vLLM: an answer must end where the model ends it",
}


def refusals(body: OpenAIChatRequest) -> list[str]:
    """One `field: why` per refused parameter in `body`; empty when it may be answered."""
    found = []
    if body.n not in (None, 1):
        found.append("n: one answer is made per request (n=1)")
    if body.logprobs:
        found.append("logprobs: llm-svc returns the answer's text, not token log-probabilities")
    if body.top_logprobs:
        found.append("top_logprobs: llm-svc returns no token log-probabilities")
    if body.tool_choice == "required" or isinstance(body.tool_choice, dict):
        found.append(
            "tool_choice: ragline answers from documents and calls no tool, so it cannot "
            "honour a required or named tool call (leave it out, or send auto or none)"
        )
    if isinstance(body.function_call, dict):
        found.append("function_call: ragline calls no function (leave it out, or send auto)")
    return found


def generation_options(body: OpenAIChatRequest) -> dict[str, Any]:
    """What llm-svc receives besides the model and the messages (None: not set)."""
    options = {name: getattr(body, name) for name in GENERATION_FIELDS}
    options["max_tokens"] = body.max_completion_tokens or body.max_tokens
    options["response_format"] = body.response_format.wire() if body.response_format else None
    return options


def ignored_fields(body: OpenAIChatRequest) -> list[str]:
    """The fields of `body` that are accepted and ignored (for the log, as vLLM logs them)."""
    named = {name for name in IGNORED if getattr(body, name, None) is not None}
    return sorted(named | set(body.model_extra or ()))
