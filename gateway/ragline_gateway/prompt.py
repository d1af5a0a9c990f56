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


def standalone_query(question: str, history: list[Turn]) -> str:
    """Make a follow-up searchable on its own: the previous question plus this one.

    Simple concatenation; an LLM rewrite is a later option behind the same function.
    """
    if not history:
        return question
    return f"{history[-1].question} {question}"
