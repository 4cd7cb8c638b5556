"""Per-benchmark record converters: one raw record in, one record in the layout of the Hugging Face dataset
that lm-eval's own task reads out (pure functions; `eval.prepare` reads the files and writes the results).

The raw records are llm-foundry's JSONL (`query`/`choices`/`gold`, `context`/`continuation`), the HellaSwag
text file (6 lines per item) and `wiki.test.raw`; see `eval/prepare.py` for the table of fields and the
documented approximations (HellaSwag's ctx_a/ctx_b split, WinoGrande's blank, WikiText's whitespace).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

LETTERS = "ABCDEFGHIJ"


class BenchmarkDataError(ValueError):
    """A source record does not have the shape this converter expects."""


def _need(rec: dict[str, Any], keys: Iterable[str], where: str) -> None:
    missing = [k for k in keys if k not in rec]
    if missing:
        raise BenchmarkDataError(f"{where}: missing field(s) {missing} in record {str(rec)[:200]}")


def _gold(rec: dict[str, Any], n_choices: int, where: str) -> int:
    gold = rec["gold"]
    if not isinstance(gold, int) or not 0 <= gold < n_choices:
        raise BenchmarkDataError(f"{where}: gold {gold!r} is not an index into {n_choices} choices")
    return gold


# ----------------------------------------------------------------------------------------------------------
# HellaSwag (the 6-line text file)

_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+")


def split_hellaswag_context(ctx: str) -> tuple[str, str]:
    """The text file's `ctx` (= ctx_a + " " + ctx_b) back into HF's (ctx_a, ctx_b).

    ctx_b is the unfinished ActivityNet sentence that the endings complete (lm-eval capitalises it). It is
    recovered as the fragment after the last sentence end when ctx does not end a sentence itself; WikiHow
    items (ctx_b empty in HF) end with punctuation and keep everything in ctx_a.
    """
    ctx = ctx.strip()
    if not ctx or ctx[-1] in ".!?\"')]":
        return ctx, ""
    ends = list(_SENTENCE_END.finditer(ctx))
    start = ends[-1].end() if ends else 0
    return ctx[:start].rstrip(), ctx[start:]


def convert_hellaswag_item(lines: list[str], where: str = "hellaswag") -> dict[str, Any]:
    """6 lines ("activity_label: ctx", gold label, 4 endings) -> HF Rowan/hellaswag's fields
    {activity_label, ctx_a, ctx_b, ctx, endings, label} (label a string, as in HF; HF's `ind` and source ids
    are not in the file); lm-eval's own process_docs then builds the query, the cleaned choices and gold."""
    if len(lines) != 6:
        raise BenchmarkDataError(f"{where}: expected 6 lines per item, got {len(lines)}")
    label = lines[1].strip()
    if not label.isdigit() or not 0 <= int(label) < 4:
        raise BenchmarkDataError(f"{where}: gold label line {label!r} is not 0-3")
    activity, sep, ctx = lines[0].strip().partition(": ")
    if not sep:
        raise BenchmarkDataError(f"{where}: context line has no 'activity_label: ' prefix: {lines[0][:80]!r}")
    ctx_a, ctx_b = split_hellaswag_context(ctx)
    return {
        "activity_label": activity,
        "ctx_a": ctx_a,
        "ctx_b": ctx_b,
        "ctx": ctx,
        "endings": [e.rstrip("\r\n") for e in lines[2:6]],
        "label": label,
    }


# ----------------------------------------------------------------------------------------------------------
# llm-foundry JSONL: multiple choice, Winogrande, LAMBADA


def _mc_choices(rec: dict[str, Any], where: str) -> tuple[list[str], int]:
    _need(rec, ("choices", "gold"), where)
    choices = rec["choices"]
    if not isinstance(choices, list) or not choices or len(choices) > len(LETTERS):
        raise BenchmarkDataError(f"{where}: bad choices {choices!r}")
    return [str(c) for c in choices], _gold(rec, len(choices), where)


def convert_arc(rec: dict[str, Any], idx: int, prefix: str = "arc", where: str = "arc") -> dict[str, Any]:
    """llm-foundry {query: "Question: q", choices, gold} -> HF ai2_arc {id, question, choices, answerKey}."""
    _need(rec, ("query",), where)
    query = rec["query"]
    if not query.startswith("Question: "):
        raise BenchmarkDataError(f"{where}: query does not start with 'Question: ': {query[:80]!r}")
    choices, gold = _mc_choices(rec, where)
    labels = list(LETTERS[: len(choices)])
    return {
        "id": f"{prefix}-{idx}",
        "question": query[len("Question: ") :],
        "choices": {"text": choices, "label": labels},
        "answerKey": labels[gold],
    }


def convert_openbookqa(rec: dict[str, Any], idx: int, where: str = "openbookqa") -> dict[str, Any]:
    """llm-foundry {query: stem, choices, gold} -> HF openbookqa {id, question_stem, choices, answerKey}."""
    _need(rec, ("query",), where)
    choices, gold = _mc_choices(rec, where)
    labels = list(LETTERS[: len(choices)])
    return {
        "id": f"openbookqa-{idx}",
        "question_stem": rec["query"],
        "choices": {"text": choices, "label": labels},
        "answerKey": labels[gold],
    }


def convert_piqa(rec: dict[str, Any], where: str = "piqa") -> dict[str, Any]:
    """llm-foundry {query: "Question: goal\\n", choices: [sol1, sol2], gold} -> HF piqa {goal, sol1, sol2, label}."""
    _need(rec, ("query",), where)
    query = rec["query"]
    if not (query.startswith("Question: ") and query.endswith("\n")):
        raise BenchmarkDataError(f"{where}: query is not 'Question: ...\\n': {query[:80]!r}")
    choices, gold = _mc_choices(rec, where)
    if len(choices) != 2:
        raise BenchmarkDataError(f"{where}: PIQA needs 2 choices, got {len(choices)}")
    return {"goal": query[len("Question: ") : -1], "sol1": choices[0], "sol2": choices[1], "label": gold}


def convert_boolq(rec: dict[str, Any], where: str = "boolq") -> dict[str, Any]:
    """llm-foundry {query: "Passage: p\\nQuestion: q?", choices: [no, yes], gold} -> {passage, question, label}."""
    _need(rec, ("query",), where)
    query = rec["query"]
    choices, gold = _mc_choices(rec, where)
    if choices != ["no", "yes"]:
        raise BenchmarkDataError(f"{where}: BoolQ choices must be ['no', 'yes'], got {choices}")
    if not query.startswith("Passage: ") or "\nQuestion: " not in query or not query.endswith("?"):
        raise BenchmarkDataError(f"{where}: query is not 'Passage: ...\\nQuestion: ...?': {query[:80]!r}")
    passage, _, question = query[len("Passage: ") :].rpartition("\nQuestion: ")
    return {"passage": passage, "question": question[:-1], "label": gold}


def winogrande_blank(options: list[str]) -> int:
    """Where the blank was in the two partial contexts `sentence[:blank] + option_i`: their common prefix,
    cut back to just after its last space (or to 0), so an option is whole words ("the bed" / "the blanket"
    share "the b", the blank goes after "the "). Any cut gives back the same contexts; this one keeps the
    options words, as in HF's records."""
    a, b = options
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a.rfind(" ", 0, n) + 1


def convert_winogrande(rec: dict[str, Any], where: str = "winogrande") -> dict[str, Any]:
    """llm-foundry {context_options, continuation, gold} -> HF winogrande {sentence, option1, option2, answer}.

    lm-eval builds context_i = sentence[:blank] + option_i and continuation = sentence[blank + 1:].strip(),
    gold = int(answer) - 1. We invert that: blank from `winogrande_blank`, sentence = prefix + "_" + " " +
    continuation (no space before a continuation that starts with punctuation, as in "_'s" or "_."). lm-eval
    strips the continuation, so the space is invisible to it; the requests come out identical.
    """
    _need(rec, ("context_options", "continuation", "gold"), where)
    options = rec["context_options"]
    if not isinstance(options, list) or len(options) != 2 or not all(isinstance(o, str) for o in options):
        raise BenchmarkDataError(f"{where}: expected 2 context_options strings, got {options!r}")
    gold = _gold(rec, 2, where)
    blank = winogrande_blank(options)
    prefix = options[0][:blank]
    continuation = str(rec["continuation"]).strip()
    if "_" in prefix or not options[0][blank:] or not options[1][blank:]:
        raise BenchmarkDataError(f"{where}: cannot place the blank in context_options {options!r}")
    gap = " " if continuation[:1].isalnum() else ""
    return {
        "sentence": f"{prefix}_{gap}{continuation}",
        "option1": options[0][blank:],
        "option2": options[1][blank:],
        "answer": str(gold + 1),
    }


def convert_lambada(rec: dict[str, Any], where: str = "lambada_openai") -> dict[str, Any]:
    """llm-foundry {context, continuation} -> HF lambada_openai {text}; lm-eval splits text at its last ' '."""
    _need(rec, ("context", "continuation"), where)
    context, word = rec["context"], rec["continuation"]
    if not word.strip() or " " in word:  # lm-eval's target is text.split(" ")[-1], so no " " inside
        raise BenchmarkDataError(f"{where}: continuation must be one word, got {word!r}")
    text = f"{context} {word}"
    return {"text": text}


# ----------------------------------------------------------------------------------------------------------
# WikiText (`wiki.test.raw`)


def wikitext_pages(raw: str) -> list[str]:
    """Split wiki.test.raw into articles the way `EleutherAI/wikitext_document_level` does.

    A new page starts at each top-level heading line (` = Title = `; ` = = Section = = ` is not top level).
    Each page is its lines joined with "\\n", heading line included; whitespace-only pages are dropped.
    """
    lines = raw.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    pages: list[str] = []
    current: list[str] = []
    for line in lines:
        if is_top_heading(line):
            page = "\n".join(current)
            if page.strip():
                pages.append(page)
            current = []
        current.append(line)
    page = "\n".join(current)
    if page.strip():
        pages.append(page)
    return pages


def is_top_heading(line: str) -> bool:
    s = line.strip()
    return len(s) > 4 and s.startswith("= ") and s.endswith(" =") and not s.startswith("= =")
