"""Document ids as users have them (issue 20), for the tests that send them everywhere: a
fixed list of awkward ones and a seeded generator of random valid ones over a Unicode
alphabet (astral characters, combining marks, right-to-left scripts, the characters that
mean something in a URL or a query language).

The seed is `RAGLINE_TEST_ID_SEED` where set, else a fixed one, and the tests print it:
a failure is replayed with the same ids.
"""

from __future__ import annotations

import os
import random

from ragline_common.wire import MAX_DOC_ID_BYTES, is_doc_id

SEED = int(os.environ.get("RAGLINE_TEST_ID_SEED", "20"))

AWKWARD_IDS = [
    "Sky_(United_Kingdom)-3",
    "Report (v2).pdf",
    "Report [v2].pdf",
    "reports/2024/Q1 summary.md",
    "100% sure?",
    "a#b",
    "why?x=1&y=2#top",
    "C&A + Söhne",
    "Crème brûlée/recette n°1",
    "日本語のテスト",
    "שלום (עולם)",
    "مرحبا/بالعالم",
    "emoji \U0001f600 and \U0001d401old",
    "e\u0301te\u0301",  # combining acute accents
    "back\\slash",
    "quote\"d and 'single'",
    "a//b",
    "/leading/slash",
    "trailing/slash/",
    "%2F..%2F%25",  # percent signs of its own: decoded once, never twice
    "a/%2e%2e/b",  # not a dot segment: its percent signs are its own
    "a/..?/b",
    "..hidden/..x/...",
    "old-rule:id@host/path.v1",
    "nbsp\u00a0inside",
    'x" or doc_id != "',
    "x" * 500 + "é" * 6,  # 512 bytes exactly
]

_PIECES = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
    "/%?#&+ ()[]{}<>\"'\\|^`~!$*,;=:@._-",
    "àáâãäåæçèéêëìíîïñòóôõöøùúûüýÿßœŠŽ",
    "\u0300\u0301\u0302\u0303\u0308\u0327\u0338",  # combining marks
    "אבגדהוזחטיכלמנסעפצקרשת\u200f",  # Hebrew, RIGHT-TO-LEFT MARK
    "ابتثجحخدذرزسشصضطظعغفقكلمنهوي\u200e",  # Arabic, LEFT-TO-RIGHT MARK
    "日本語中文한국어ひらがなカタカナ",
    # astral: emoji, a flag, mathematical bold, CJK extension B; ZERO WIDTH JOINER
    "\U0001f600\U0001f44d\U0001f1eb\U0001f1f7\U0001d400\U00020000\U0001f469\u200d\U0001f4bb",
    "\u00a0\u2009\u3000",  # spaces, fine inside an id
]


def random_doc_id(rng: random.Random) -> str:
    """One random valid id: mostly short, now and then close to the 512-byte limit."""
    while True:
        long = rng.random() < 0.1
        length = rng.randint(150, 512) if long else rng.randint(1, 24)
        text = "".join(rng.choice(rng.choice(_PIECES)) for _ in range(length))
        text = text.encode()[:MAX_DOC_ID_BYTES].decode(errors="ignore")
        if is_doc_id(text):
            return text


def random_doc_ids(count: int, seed: int = SEED) -> list[str]:
    """`count` distinct random valid ids, the same ones for the same seed."""
    rng = random.Random(seed)
    ids: dict[str, None] = {}
    while len(ids) < count:
        ids[random_doc_id(rng)] = None
    return list(ids)
