"""Turn the raw benchmark files into one normalised `<task>.jsonl.gz` per task.

Each output record uses the field layout of the Hugging Face dataset that lm-eval's own task reads, so the
task YAMLs in `eval/tasks/` can keep lm-eval's `doc_to_text` / `doc_to_target` / `doc_to_choice` as they are:

| task | source file | output fields (as in lm-eval's dataset) |
|---|---|---|
| hellaswag | `hellaswag_val_full.txt.bz2` (6 lines per item) | `query`, `choices`, `gold` (what lm-eval's `process_docs` makes) |
| arc_easy, arc_challenge | `arc_*.jsonl.gz` (`query`/`choices`/`gold`) | `id`, `question`, `choices{text,label}`, `answerKey` |
| piqa | `piqa.jsonl.gz` | `goal`, `sol1`, `sol2`, `label` |
| winogrande | `winogrande.jsonl.gz` (`context_options`/`continuation`/`gold`) | same three fields (the requests lm-eval builds) |
| boolq | `boolq.jsonl.gz` | `passage`, `question` (no trailing "?"), `label` |
| openbookqa | `openbook_qa.jsonl.gz` | `id`, `question_stem`, `choices{text,label}`, `answerKey` |
| lambada_openai | `lambada_openai.jsonl.gz` (`context`/`continuation`) | `text` = context + " " + last word |
| wikitext | `wikitext-2-raw_wiki.test.raw.gz` | `page`: one article, split at top-level ` = Title = ` lines |

Two known, documented approximations (the original HF files are not available offline):

- HellaSwag: lm-eval builds `activity_label + ": " + ctx_a + " " + ctx_b.capitalize()`, but the text file only
  holds `ctx = ctx_a + " " + ctx_b`. ctx_b (the unfinished ActivityNet sentence) is recovered as the trailing
  fragment after the last sentence end when the context does not itself end a sentence; WikiHow items (ctx_b
  empty) end with punctuation and are left alone.
- WikiText: the shared copy of `wiki.test.raw` has CRLF line ends and no blank separator lines (2,891 lines
  instead of 4,358). Pages are rebuilt from it with LF line ends; the words are the same as in
  `EleutherAI/wikitext_document_level`, the whitespace is not (so byte counts differ slightly).

CLI: `python -m eval.prepare --src <dir with the shared files> --out <dir> [--limit N] [--wikitext-limit M]`.
`--src` may be the folder holding the files, or a parent with `benchmarks/` and `pretrain/` sub-folders.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import io
import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

TASKS: tuple[str, ...] = (
    "hellaswag",
    "arc_easy",
    "arc_challenge",
    "piqa",
    "winogrande",
    "boolq",
    "openbookqa",
    "lambada_openai",
    "wikitext",
)

SOURCE_FILES: dict[str, str] = {
    "hellaswag": "hellaswag_val_full.txt.bz2",
    "arc_easy": "arc_easy.jsonl.gz",
    "arc_challenge": "arc_challenge.jsonl.gz",
    "piqa": "piqa.jsonl.gz",
    "winogrande": "winogrande.jsonl.gz",
    "boolq": "boolq.jsonl.gz",
    "openbookqa": "openbook_qa.jsonl.gz",
    "lambada_openai": "lambada_openai.jsonl.gz",
    "wikitext": "wikitext-2-raw_wiki.test.raw.gz",
}

SEARCH_SUBDIRS: tuple[str, ...] = (".", "benchmarks", "pretrain")
MANIFEST = "MANIFEST.json"
LETTERS = "ABCDEFGHIJ"


class BenchmarkDataError(ValueError):
    """A source record does not have the shape this converter expects."""


# ----------------------------------------------------------------------------------------------------------
# file helpers


def output_path(out_dir: Path, task: str) -> Path:
    return Path(out_dir) / f"{task}.jsonl.gz"


def find_source(src_dir: Path, task: str) -> Path:
    """The raw file for `task` under src_dir (or its benchmarks/ or pretrain/ sub-folder)."""
    name = SOURCE_FILES[task]
    candidates = [(Path(src_dir) / sub / name) for sub in SEARCH_SUBDIRS]
    for path in candidates:
        if path.is_file():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(f"benchmark source file {name!r} for task {task!r} not found (looked at: {tried})")


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def read_text(path: Path) -> str:
    with _open_text(Path(path)) as f:
        return f.read()


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with _open_text(Path(path)) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchmarkDataError(f"{path}:{lineno}: not valid JSON: {e}") from e


def write_jsonl_gz(records: Iterable[dict[str, Any]], path: Path) -> int:
    """Write records as gzipped JSON lines with a fixed gzip header (byte-identical re-runs). Returns count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(rec, ensure_ascii=False) + "\n" for rec in records]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
        gz.write("".join(lines).encode("utf-8"))
    tmp.replace(path)
    return len(lines)


def count_jsonl_gz(path: Path) -> int:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
# per-task record converters (pure functions: one source record in, one normalised record out)

_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+")


def hellaswag_query(raw_context: str) -> str:
    """lm-eval's HellaSwag query from the text file's `activity_label: ctx` line (ctx_b re-capitalised)."""
    text = raw_context.strip()
    label, sep, ctx = text.partition(": ")
    if not sep:
        label, ctx = "", text
    if ctx and ctx[-1] not in ".!?\"')]":  # ends mid-sentence: the fragment after the last sentence end is ctx_b
        ends = list(_SENTENCE_END.finditer(ctx))
        start = ends[-1].end() if ends else 0
        ctx = ctx[:start] + ctx[start:].capitalize()
    return f"{label}: {ctx}" if sep else ctx


def hellaswag_clean(text: str) -> str:
    """The cleanup lm-eval's HellaSwag task applies to the query and to every ending: WikiHow ` [title]` markers
    turn into sentence breaks, any other `[...]` span is dropped, then double spaces become single ones.

    The text file was mostly cleaned already, but 14 items still carry `[...]` links (e.g. `[www.kiddio.org]`).
    """
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def convert_hellaswag_item(lines: list[str], where: str = "hellaswag") -> dict[str, Any]:
    """6 lines (context, gold label, 4 endings) -> {query, choices, gold} as lm-eval's process_docs makes."""
    if len(lines) != 6:
        raise BenchmarkDataError(f"{where}: expected 6 lines per item, got {len(lines)}")
    label = lines[1].strip()
    if not label.isdigit() or not 0 <= int(label) < 4:
        raise BenchmarkDataError(f"{where}: gold label line {label!r} is not 0-3")
    return {
        "query": hellaswag_clean(hellaswag_query(lines[0])),
        "choices": [hellaswag_clean(e) for e in lines[2:6]],
        "gold": int(label),
    }


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


def convert_winogrande(rec: dict[str, Any], where: str = "winogrande") -> dict[str, Any]:
    """Keep {context_options, continuation, gold}: exactly lm-eval's partial-scoring requests.

    lm-eval: context_i = sentence[:blank] + option_i, continuation = sentence[blank + 1:].strip(), gold = answer - 1.
    """
    _need(rec, ("context_options", "continuation", "gold"), where)
    options = rec["context_options"]
    if not isinstance(options, list) or len(options) != 2:
        raise BenchmarkDataError(f"{where}: expected 2 context_options, got {options!r}")
    return {
        "context_options": [str(o) for o in options],
        "continuation": str(rec["continuation"]).strip(),
        "gold": _gold(rec, 2, where),
    }


def convert_lambada(rec: dict[str, Any], where: str = "lambada_openai") -> dict[str, Any]:
    """llm-foundry {context, continuation} -> HF lambada_openai {text}; lm-eval splits text at its last ' '."""
    _need(rec, ("context", "continuation"), where)
    context, word = rec["context"], rec["continuation"]
    if not word.strip() or " " in word:  # lm-eval's target is text.split(" ")[-1], so no " " inside
        raise BenchmarkDataError(f"{where}: continuation must be one word, got {word!r}")
    text = f"{context} {word}"
    return {"text": text}


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


# ----------------------------------------------------------------------------------------------------------
# per-task readers: source file -> iterator of normalised records


def _iter_hellaswag(path: Path) -> Iterator[dict[str, Any]]:
    lines = read_text(path).replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise BenchmarkDataError(f"{path}: {len(lines)} lines is not a multiple of 6 (6 lines per item)")
    for i in range(0, len(lines), 6):
        yield convert_hellaswag_item(lines[i : i + 6], where=f"{path} item {i // 6}")


def _iter_jsonl(fn: Callable[..., dict[str, Any]], with_index: bool = False, **kw) -> Callable[[Path], Iterator]:
    def it(path: Path) -> Iterator[dict[str, Any]]:
        for i, rec in enumerate(read_jsonl(path)):
            where = f"{path} record {i}"
            yield fn(rec, i, where=where, **kw) if with_index else fn(rec, where=where, **kw)

    return it


def _iter_wikitext(path: Path) -> Iterator[dict[str, Any]]:
    for page in wikitext_pages(read_text(path)):
        yield {"page": page}


READERS: dict[str, Callable[[Path], Iterator[dict[str, Any]]]] = {
    "hellaswag": _iter_hellaswag,
    "arc_easy": _iter_jsonl(convert_arc, with_index=True, prefix="arc_easy"),
    "arc_challenge": _iter_jsonl(convert_arc, with_index=True, prefix="arc_challenge"),
    "piqa": _iter_jsonl(convert_piqa),
    "winogrande": _iter_jsonl(convert_winogrande),
    "boolq": _iter_jsonl(convert_boolq),
    "openbookqa": _iter_jsonl(convert_openbookqa, with_index=True),
    "lambada_openai": _iter_jsonl(convert_lambada),
    "wikitext": _iter_wikitext,
}


def iter_task_records(task: str, src_path: Path) -> Iterator[dict[str, Any]]:
    if task not in READERS:
        raise ValueError(f"unknown benchmark task {task!r}; known: {', '.join(TASKS)}")
    return READERS[task](Path(src_path))


def source_count(task: str, src_path: Path) -> int:
    """Items in the raw source: JSON lines, 6-line HellaSwag blocks, or WikiText articles."""
    src_path = Path(src_path)
    if task == "hellaswag":
        lines = read_text(src_path).replace("\r\n", "\n").rstrip("\n").split("\n")
        return len(lines) // 6
    if task == "wikitext":
        return len(wikitext_pages(read_text(src_path)))
    with _open_text(src_path) as f:
        return sum(1 for line in f if line.strip())


# ----------------------------------------------------------------------------------------------------------
# main entry points


def prepare_task(task: str, src_dir: Path, out_dir: Path, limit: int | None = None) -> dict[str, Any]:
    """Convert one task; returns its manifest entry {file, source, source_sha256, count}."""
    src = find_source(src_dir, task)
    records = iter_task_records(task, src)
    if limit is not None:
        records = (r for i, r in zip(range(limit), records))
    out = output_path(out_dir, task)
    n = write_jsonl_gz(records, out)
    if n == 0:
        raise BenchmarkDataError(f"{src}: no records for task {task!r}")
    return {"file": out.name, "source": src.name, "source_sha256": _sha256(src), "count": n}


def prepare_benchmarks(
    src_dir: Path,
    out_dir: Path,
    limit: int | None = None,
    tasks: Iterable[str] | None = None,
    wikitext_limit: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Write `<task>.jsonl.gz` for each task (all nine by default) plus MANIFEST.json; returns the manifest.

    `limit` keeps the first N items of each task; `wikitext_limit` (default: `limit`) the first N articles.
    Every source is checked to exist before anything is written.
    """
    tasks = list(tasks) if tasks is not None else list(TASKS)
    unknown = [t for t in tasks if t not in SOURCE_FILES]
    if unknown:
        raise ValueError(f"unknown benchmark task(s) {unknown}; known: {', '.join(TASKS)}")
    for t in tasks:
        find_source(src_dir, t)  # fail before writing anything
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, dict[str, Any]] = {}
    for t in tasks:
        lim = (wikitext_limit if wikitext_limit is not None else limit) if t == "wikitext" else limit
        manifest[t] = {**prepare_task(t, src_dir, out_dir, lim), "limit": lim}
    mpath = out_dir / MANIFEST
    old = json.loads(mpath.read_text()) if mpath.is_file() else {}
    old.update(manifest)
    mpath.write_text(json.dumps(dict(sorted(old.items())), indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.prepare", description=__doc__.split("\n")[0])
    p.add_argument("--src", type=Path, required=True, help="folder with the raw files (or benchmarks/, pretrain/)")
    p.add_argument("--out", type=Path, required=True, help="output folder for <task>.jsonl.gz")
    p.add_argument("--limit", type=int, default=None, help="keep the first N items of each task")
    p.add_argument("--wikitext-limit", type=int, default=None, help="keep the first N WikiText articles")
    p.add_argument("--tasks", nargs="+", default=None, choices=TASKS, help="subset of tasks (default: all)")
    a = p.parse_args(argv)
    try:
        manifest = prepare_benchmarks(a.src, a.out, a.limit, a.tasks, a.wikitext_limit)
    except (FileNotFoundError, BenchmarkDataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for task, m in manifest.items():
        print(f"{task:15s} {m['count']:6d} -> {Path(a.out) / m['file']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
