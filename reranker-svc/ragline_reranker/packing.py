"""How pairs are cut into forward passes under a token budget.

A padded forward pass computes `longest pair x number of pairs` tokens, whatever the
order of the pairs inside it: padding is set by the longest pair. Sorting pays off when
work is *cut* into passes: pairs of similar length then share a pass, and short pairs are
not padded to the length of a long one. So a request's pairs are sorted by length before
they are cut, and each piece is later scattered back to the caller's order.
"""

from __future__ import annotations


def padded_tokens(lengths: list[int]) -> int:
    """Tokens one padded forward pass over pairs of these lengths computes."""
    return max(lengths, default=0) * len(lengths)


def plan_chunks(lengths: list[int], max_tokens: int, max_pairs: int) -> list[list[int]]:
    """Indices into `lengths`, longest first, cut into chunks that each fit one pass.

    A chunk holds at most `max_pairs` pairs and at most `max_tokens` padded tokens. Going
    from the longest pair down, the first pair of a chunk is its longest, so a chunk is
    closed as soon as one more pair would break either bound. A single pair longer than
    `max_tokens` still gets a chunk of its own: it must be scored, and truncation to the
    model's max length already bounds it.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    chunks: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in order:
        if current and (len(current) + 1 > max_pairs or width * (len(current) + 1) > max_tokens):
            chunks.append(current)
            current = []
        if not current:
            width = lengths[i]
        current.append(i)
    if current:
        chunks.append(current)
    return chunks
