"""A light English stemmer for the extractive engine's word matching.

Porter-like, but lighter and tuned for matching a question against passages rather than
for indexing: inflections (keeps, kept, keeping), agent nouns (keeper, governor),
comparatives and superlatives (larger, largest) and a few derivations (development,
location, happiness) meet the same stem; the commonest irregular verbs and plurals come
from a table. A stem is a matching key, not a word ("locat", "famy"). The rules are
conservative where a cut would merge unrelated words: a stem keeps a vowel and at least
three or four letters, so "king", "water" and "early" stay what they are.

No dependency: the stack has no stemmer (snowball or NLTK), and this is all the engine needs.
"""

from __future__ import annotations

from functools import lru_cache

# Irregular forms -> base form (then stemmed like any word).
_IRREGULAR = {
    "began": "begin", "begun": "begin", "bought": "buy", "brought": "bring",
    "built": "build", "caught": "catch", "chose": "choose", "chosen": "choose",
    "came": "come", "drew": "draw", "drawn": "draw", "drove": "drive", "driven": "drive",
    "ate": "eat", "eaten": "eat", "fell": "fall", "fallen": "fall", "felt": "feel",
    "fought": "fight", "flew": "fly", "flown": "fly", "forgot": "forget",
    "forgotten": "forget", "gave": "give", "given": "give", "went": "go", "gone": "go",
    "grew": "grow", "grown": "grow", "held": "hold", "kept": "keep", "knew": "know",
    "known": "know", "laid": "lay", "led": "lead", "lost": "lose", "made": "make",
    "meant": "mean", "met": "meet", "paid": "pay", "ran": "run", "rose": "rise",
    "risen": "rise", "said": "say", "saw": "see", "seen": "see", "sold": "sell",
    "sent": "send", "sang": "sing", "sung": "sing", "spoke": "speak", "spoken": "speak",
    "spent": "spend", "stood": "stand", "struck": "strike", "taught": "teach",
    "took": "take", "taken": "take", "told": "tell", "thought": "think", "threw": "throw",
    "thrown": "throw", "won": "win", "wrote": "write", "written": "write", "wore": "wear",
    "worn": "wear", "died": "die", "dies": "die", "dying": "die", "lying": "lie",
    "born": "birth", "children": "child", "men": "man", "women": "woman",
    "people": "person", "feet": "foot", "teeth": "tooth", "mice": "mouse",
    "goes": "go", "news": "news", "better": "good", "best": "good", "worse": "bad",
    "worst": "bad",
}  # fmt: skip

_VOWELS = frozenset("aeiouy")


def _has_vowel(s: str) -> bool:
    return any(c in _VOWELS for c in s)


def _undouble(s: str) -> str:
    """running -> runn -> run; but fall, miss and buzz keep their pair."""
    if len(s) > 3 and s[-1] == s[-2] and s[-1] not in "lsz" and s[-1] not in _VOWELS:
        return s[:-1]
    return s


# (suffix, replacement, shortest stem left): the first that applies is taken.
_DERIVATIONAL = (
    ("izations", "ize", 3), ("ization", "ize", 3), ("ational", "ate", 3),
    ("fulness", "", 4), ("ousness", "", 4), ("iveness", "", 4), ("ments", "", 4),
    ("ment", "", 4), ("ness", "", 4), ("ations", "ate", 3), ("ation", "ate", 3),
    ("ities", "", 4), ("ity", "", 4), ("ful", "", 4), ("ously", "", 4), ("ous", "", 4),
)  # fmt: skip


@lru_cache(maxsize=65536)
def stem(word: str) -> str:
    """The matching key of a lowercase word; digits and short words are left alone."""
    base = _IRREGULAR.get(word)
    if base is not None:
        return word if base == word else stem(base)
    if len(word) <= 3 or not word.isalpha():
        return word
    # Plurals and third person: countries, classes, keeps; not status, analysis, glass.
    if word.endswith("ies") and len(word) > 4:
        word = word[:-3] + "y"
    elif word.endswith("sses"):
        word = word[:-2]
    elif word.endswith("s") and not word.endswith(("ss", "us", "is")) and len(word) > 3:
        word = word[:-1]
    for suffix, replacement, least in _DERIVATIONAL:  # location -> locate, danger-ous
        if word.endswith(suffix) and len(word) - len(suffix) >= least:
            word = word[: -len(suffix)] + replacement
            break
    else:
        if word.endswith("ition") and len(word) >= 8:  # definition, addition, competition
            word = word[:-5]
        elif word.endswith(("sion", "tion")) and len(word) >= 7:  # invention, election
            word = word[:-3]
    # Past, progressive, comparative, superlative, agent: kept in that order of trust.
    for suffix, least in (("ied", 1), ("iest", 1), ("ier", 1)):
        if word.endswith(suffix) and len(word) - len(suffix) >= least + 2:
            word = word[: -len(suffix)] + "y"
            break
    else:
        for suffix, least in (("ing", 3), ("edly", 3), ("ed", 3), ("est", 4), ("er", 4)):
            base = word[: -len(suffix)]
            if word.endswith(suffix) and len(base) >= least and _has_vowel(base):
                word = _undouble(base)
                break
        else:
            for suffix in ("tor", "sor", "nor"):  # governor, inventor, successor
                if word.endswith(suffix) and len(word) - 2 >= 5:
                    word = word[:-2]
                    break
    if word.endswith("ly") and len(word) - 2 >= 4:
        word = word[:-2]
    if word.endswith("e") and len(word) > 3:  # locate/located, give/giving
        word = word[:-1]
    return word
