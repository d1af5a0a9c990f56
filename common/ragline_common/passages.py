"""How numbered passages travel inside a chat prompt.

The gateway writes the retrieved passages into the user message in this layout; any LLM
reads it as plain text, and llm-svc's offline extractive engine parses it back, so both
sides use these two functions:

    Sources:
    [1] Title one
    text of passage one

    [2] Title two
    text of passage two

    Question: the user's question

A passage keeps its lines (each with its spaces collapsed; blank lines dropped, since a
blank line ends the passage): a heading, a list item or a PDF title line stays on a line
of its own, where a model reads it as structure and the extractive engine can leave it
out of an answer, instead of being glued to the sentence after it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SOURCES_HEADER = "Sources:"
# The answer when the passages do not say: what the gateway's system prompt asks a model
# to reply, and what llm-svc's extractive engine replies.
DONT_KNOW = "I don't know, the documents don't say."
QUESTION_PREFIX = "Question:"
_PASSAGE_START = re.compile(r"^\[(\d+)\] ?(.*)$")


@dataclass(frozen=True)
class Passage:
    n: int
    title: str
    text: str


def passage_lines(text: str) -> str:
    """`text` as the prompt carries it: its non-blank lines, spaces collapsed in each."""
    return "\n".join(line for line in (" ".join(raw.split()) for raw in text.splitlines()) if line)


def render_sources(passages: list[Passage], question: str) -> str:
    blocks = [
        f"[{p.n}] {' '.join(p.title.split())}".rstrip() + "\n" + passage_lines(p.text)
        for p in passages
    ]
    return f"{SOURCES_HEADER}\n" + "\n\n".join(blocks) + f"\n\n{QUESTION_PREFIX} {question}"


def is_sources_prompt(content: str) -> bool:
    """Whether `content` is laid out by `render_sources` (with passages or none), i.e. a
    question the gateway asks with the knowledge base; anything else came to the generation
    model straight from a client."""
    return content.startswith(SOURCES_HEADER + "\n") and f"\n{QUESTION_PREFIX} " in content


def parse_sources(content: str) -> tuple[list[Passage], str]:
    """Inverse of `render_sources`; text that does not follow the layout yields no passages."""
    head, sep, question = content.rpartition(f"\n{QUESTION_PREFIX} ")
    if not sep:
        return [], content.strip()
    _, found, body = head.partition(SOURCES_HEADER)
    if not found:
        return [], question.strip()
    passages: list[Passage] = []
    for block in body.strip().split("\n\n"):
        first, _, text = block.partition("\n")
        match = _PASSAGE_START.match(first.strip())
        if match:
            passages.append(Passage(int(match.group(1)), match.group(2).strip(), text.strip()))
    return passages, question.strip()
