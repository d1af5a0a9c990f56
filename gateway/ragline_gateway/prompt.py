"""Step 5's prompt: numbered passages to cite as [n], the conversation so far, the question."""

from __future__ import annotations

from ragline_common.passages import Passage, render_sources
from ragline_gateway.memory import Turn

SYSTEM_PROMPT = (
    "You answer questions using only the numbered sources given with each question. "
    "Cite every statement with the number of its source in square brackets, like [1]. "
    "If the sources do not contain the answer, say that you could not find it in the documents."
)


def build_messages(
    question: str, passages: list[Passage], history: list[Turn]
) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for turn in history:
        messages.append({"role": "user", "content": turn.question})
        messages.append({"role": "assistant", "content": turn.answer})
    messages.append({"role": "user", "content": render_sources(passages, question)})
    return messages


def estimate_tokens(text: str) -> int:
    """About four characters per token for English with the usual BPE vocabularies; the
    gateway has no tokenizer (it never loads models), so budgets are estimates with room."""
    return len(text) // 4 + 1


def fit_history(history: list[Turn], budget_tokens: int) -> list[Turn]:
    """The newest turns that fit the budget, oldest dropped first; the newest turn alone is
    cut short rather than dropped, since a follow-up leans on it most."""
    kept: list[Turn] = []
    used = 0
    for turn in reversed(history):
        cost = estimate_tokens(turn.question) + estimate_tokens(turn.answer)
        if used + cost > budget_tokens:
            if not kept and budget_tokens > estimate_tokens(turn.question):
                room = (budget_tokens - estimate_tokens(turn.question)) * 4
                kept.append(Turn(turn.question, turn.answer[:room]))
            break
        kept.append(turn)
        used += cost
    return kept[::-1]
