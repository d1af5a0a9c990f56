"""The offline extractive engine's answers on squad-dev, before and after a change.

For each of the 473 questions of `shared/data/squad-dev`, the gateway's prompt
(`ragline_gateway.prompt.build_messages`, the same system prompt and numbered passages a
live answer gets) is built from five passages: the question's gold paragraph and four
other paragraphs of the same article (drawn with a fixed seed, so they are on the same
subject: harder than random ones, and what a retriever returns), in a seeded random order.
Each prompt goes through llm-svc's `ExtractiveEngine.stream` (no pacing) of two versions
of `extractive.py`: "before", the file at a git revision (default HEAD, read with
`git show`, nothing checked out), and "after", the working tree. No running stack.

Two layouts of the same passages:
- plain: the corpus paragraphs as they are.
- structured: each passage as the chunk of a parsed document arrives: its title as a
  Markdown heading ("# T", "## T"; HTML and PDF headings become these too) or as a PDF
  title line ("T" alone on a line), and in one passage of four the sentences as a
  bulleted list. Chosen per passage with the seed.
And one control, "unrelated": each question asked of five paragraphs of the other
articles, which cannot answer it: the share of honest "don't know" answers.

Per answer (a "cited segment" is the text between one [n] marker and the one before):
- citation precision: cited segments found in the passage they cite (whitespace and the
  source's own footnote marks such as "[note 1]" left out of the comparison)
- uncited: answers with no [n] that are not a "don't know"
- declined: answers with no [n] that say the documents don't say / nothing was found
- gold sentence: answers with a cited segment of 4 or more words found in the gold paragraph
- first sentence from gold: answers whose first cited segment is in the gold paragraph
- heading marks: answers holding a Markdown heading mark ("# ", "## " ...)
- glued title/list marker: answers holding a passage title followed by its text, or a
  list marker ("- ") inside
- sentences, words: mean answer length

    .venv/bin/python benchmarks/extractive_squad.py            # before = HEAD
    .venv/bin/python benchmarks/extractive_squad.py --before da53418 --json
    .venv/bin/python benchmarks/extractive_squad.py --before none   # the working tree only
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import random
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ragline_common.passages import Passage
from ragline_common.wire import ChatMessage
from ragline_gateway.prompt import build_messages
from ragline_llm.engines.base import GenerationRequest

REPO_ROOT = Path(__file__).resolve().parent.parent
ENGINE_PATH = "llm-svc/ragline_llm/engines/extractive.py"
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "squad-dev"
MARKER = re.compile(r"\[(\d{1,3}(?:\s*,\s*\d{1,3})*)\]")
HEADING_MARK = re.compile(r"(?:^|\s)#{1,6}\s")
LIST_MARK = re.compile(r"(?:^|\s)[-*\u2022]\s")
# The source's own footnote marks, which an answer may leave out.
FOOTNOTE = re.compile(r"\s*\[(?:\d{1,3}|citation needed|note \d+)\]")
DECLINE = re.compile(r"don't know|don't say|could not find|found nothing", re.I)


def load_engine(source: str, name: str) -> ModuleType:
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, f"<{name}>", "exec"), module.__dict__)
    return module


def engines(before: str) -> dict[str, ModuleType]:
    new = (REPO_ROOT / ENGINE_PATH).read_text()
    if before == "none":
        return {"after": load_engine(new, "extractive_after")}
    old = subprocess.run(
        ["git", "show", f"{before}:{ENGINE_PATH}"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return {"before": load_engine(old, "extractive_before"),
            "after": load_engine(new, "extractive_after")}  # fmt: skip


@dataclass
class Case:
    question: str
    passages: list[Passage]
    gold: int  # n of the gold passage; 0 when none answers


def read_data(root: Path) -> tuple[dict[str, dict[str, str]], dict[str, str], dict[str, str]]:
    corpus = {d["_id"]: d for d in map(json.loads, (root / "corpus.jsonl").open())}
    queries = {q["_id"]: q["text"] for q in map(json.loads, (root / "queries.jsonl").open())}
    qrels: dict[str, str] = {}
    for line in (root / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        qid, doc, score = line.split("\t")
        if int(score) > 0:
            qrels[qid] = doc
    return corpus, queries, qrels


def structured(doc: dict[str, str], rng: random.Random) -> str:
    """The paragraph as a parsed document's chunk: a heading or title line, maybe a list."""
    text = doc["text"]
    if rng.random() < 0.25:
        sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z])", text)
        text = "\n".join(f"- {s}" for s in sentences)
    head = rng.choice(["# {}\n\n", "## {}\n\n", "{}\n"]).format(doc["title"])
    return head + text


def cases(root: Path, layout: str, others: int, seed: int) -> list[Case]:
    corpus, queries, qrels = read_data(root)
    rng = random.Random(seed)
    by_title: dict[str, list[str]] = {}
    for doc_id, doc in corpus.items():
        by_title.setdefault(doc["title"], []).append(doc_id)
    out = []
    for qid, question in queries.items():
        gold_id = qrels[qid]
        title = corpus[gold_id]["title"]
        if layout == "unrelated":
            pool = [d for d in corpus if corpus[d]["title"] != title]
            chosen = rng.sample(pool, others + 1)
        else:
            pool = [d for d in by_title[title] if d != gold_id]
            chosen = [gold_id, *rng.sample(pool, min(others, len(pool)))]
            rng.shuffle(chosen)
        passages = []
        for n, doc_id in enumerate(chosen, start=1):
            doc = corpus[doc_id]
            text = structured(doc, rng) if layout == "structured" else doc["text"]
            passages.append(Passage(n, doc["title"], text))
        gold = chosen.index(gold_id) + 1 if gold_id in chosen else 0
        out.append(Case(question, passages, gold))
    return out


async def answer(module: ModuleType, case: Case) -> str:
    engine = module.ExtractiveEngine(token_interval_ms=0)
    messages = [ChatMessage(**m) for m in build_messages(case.question, case.passages, [])]
    request = GenerationRequest("bench", messages, max_tokens=4096)
    return "".join([d.text async for d in engine.stream(request)])


def norm(text: str) -> str:
    return " ".join(FOOTNOTE.sub("", text).split())


def segments(text: str) -> list[tuple[str, list[int]]]:
    out, start = [], 0
    for match in MARKER.finditer(text):
        out.append(
            (text[start : match.start()].strip(), [int(x) for x in match.group(1).split(",")])
        )
        start = match.end()
    return out


def score(case: Case, text: str) -> dict[str, float]:
    by_n = {p.n: norm(p.text) for p in case.passages}
    cited = segments(text)
    pairs = [(seg, n) for seg, ns in cited for n in ns]
    correct = sum(1 for seg, n in pairs if seg and norm(seg) in by_n.get(n, ""))
    gold_text = by_n.get(case.gold, "")
    declined = not cited and bool(DECLINE.search(text))
    glued = bool(LIST_MARK.search(text)) or any(
        re.search(re.escape(p.title) + r"\s+(?:[-*]\s+)?" + re.escape(" ".join(
            re.sub(r"^[-*]\s+", "", p.text.split("\n", 2)[-1]).split()[:2])), text)
        for p in case.passages
    )  # fmt: skip
    return {
        "citations": len(pairs),
        "correct": correct,
        "uncited": float(not cited and not declined),
        "declined": float(declined),
        "gold": float(
            bool(gold_text) and any(len(s.split()) >= 4 and norm(s) in gold_text for s, _ in cited)
        ),
        "first_gold": float(bool(cited) and bool(gold_text) and norm(cited[0][0]) in gold_text),
        "heading": float(bool(HEADING_MARK.search(text))),
        "glued": float(glued),
        "sentences": float(len(re.findall(r"[.!?](?:\s|$)", MARKER.sub("", text))) or 1),
        "words": float(len(text.split())),
    }


def summarise(rows: list[dict[str, float]]) -> dict[str, float]:
    total = len(rows)
    citations = sum(r["citations"] for r in rows)
    out = {"citation precision": sum(r["correct"] for r in rows) / citations if citations else 1.0}
    for key, label in (("uncited", "uncited answers"), ("declined", "declined (don't know)"),
                       ("gold", "answers with a gold sentence"),
                       ("first_gold", "first sentence from gold"), ("heading", "heading marks"),
                       ("glued", "glued title/list marker"), ("sentences", "sentences/answer"),
                       ("words", "words/answer")):  # fmt: skip
        out[label] = sum(r[key] for r in rows) / total
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    versions = engines(args.before)
    report: dict[str, Any] = {}
    for layout in ("plain", "structured", "unrelated"):
        batch = cases(args.data, layout, args.others, args.seed)
        report[layout] = {}
        for name, module in versions.items():
            answers = [await answer(module, c) for c in batch]
            report[layout][name] = summarise(
                [score(c, a) for c, a in zip(batch, answers, strict=True)]
            )
            if args.show and name == "after":
                for c, a in zip(batch[: args.show], answers, strict=False):
                    print(f"Q: {c.question} (gold [{c.gold}])\nA: {a}\n", file=sys.stderr)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument(
        "--before", default="HEAD", help="git revision of the 'before' engine; none: no 'before'"
    )
    parser.add_argument("--others", type=int, default=4, help="passages beside the gold one")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--show", type=int, default=0, help="print the first N answers (after)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = asyncio.run(run(args))
    if args.json:
        print(json.dumps(report, indent=2))
        return
    n = sum(1 for _ in (args.data / "queries.jsonl").open())
    print(f"squad-dev, {n} questions, gold + {args.others} passages of the same article "
          f"(unrelated: {args.others + 1} of other articles), seed {args.seed}; "
          f"before = {args.before}")  # fmt: skip
    for layout, versions in report.items():
        print(f"\n{layout:<32}" + "".join(f" {name:>8}" for name in versions))
        for metric in versions["after"]:
            figures = "".join(f" {versions[name][metric]:>8.3f}" for name in versions)
            print(f"  {metric:<30}{figures}")


if __name__ == "__main__":
    main()
