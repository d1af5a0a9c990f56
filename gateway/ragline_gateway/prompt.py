"""Step 5's prompt: numbered passages to cite as [n], the conversation so far, the question."""

from __future__ import annotations

from ragline_common.passages import DONT_KNOW, Passage, render_sources
from ragline_gateway.memory import Turn

# What a generation model (vLLM) is asked to do with the numbered passages. The extractive
# engine follows the same rules without reading it: `[n]` after what it quotes, and the
# same "I don't know" when the passages do not answer. The gateway drops citations of
# passages that do not exist (citations.CitationFilter), so a miscount never reaches a UI.
SYSTEM_PROMPT = (
    "You answer questions using only the numbered sources given with each question. "
    "Cite the source of every statement with its number in square brackets right after "
    "it, like [1], or [1, 2] for two sources; cite only numbers of the sources given, "
    "never make up a source. "
    f'If the sources do not contain the answer, reply "{DONT_KNOW}" and nothing else; '
    "do not answer from your own knowledge."
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
