"""Turn the raw benchmark files into one normalised `<task>.jsonl.gz` per task.

Each output record uses the field layout of the Hugging Face dataset that lm-eval's own task reads, so the
task YAMLs in `eval/tasks/` can keep lm-eval's `doc_to_text` / `doc_to_target` / `doc_to_choice` as they are:

| task | source file | output fields (as in lm-eval's dataset) |
|---|---|---|
| hellaswag | `hellaswag_val_full.txt.bz2` (6 lines per item) | `activity_label`, `ctx_a`, `ctx_b`, `ctx`, `endings`, `label` ("0"-"3") |
| arc_easy, arc_challenge | `arc_*.jsonl.gz` (`query`/`choices`/`gold`) | `id`, `question`, `choices{text,label}`, `answerKey` |
| piqa | `piqa.jsonl.gz` | `goal`, `sol1`, `sol2`, `label` |
| winogrande | `winogrande.jsonl.gz` (`context_options`/`continuation`/`gold`) | `sentence` (with `_`), `option1`, `option2`, `answer` ("1"/"2") |
| boolq | `boolq.jsonl.gz` | `passage`, `question` (no trailing "?"), `label` |
| openbookqa | `openbook_qa.jsonl.gz` | `id`, `question_stem`, `choices{text,label}`, `answerKey` |
| lambada_openai | `lambada_openai.jsonl.gz` (`context`/`continuation`) | `text` = context + " " + last word |
| wikitext | `wikitext-2-raw_wiki.test.raw.gz` | `page`: one article, split at top-level ` = Title = ` lines |

The shared files hold only the split lm-eval evaluates, written as `<task>.jsonl.gz`. A few-shot split (e.g. the
real `train` split) can be added from HF-layout JSONL files with `--fewshot-src DIR`: `DIR/<task>.<split>.jsonl`
(or `.jsonl.gz`) for any split the task's YAML declares becomes `<out>/<task>.<split>.jsonl.gz`, checked record
by record, and listed under `splits` in MANIFEST.json.

Known, documented approximations (the original HF files are not available offline):

- HellaSwag: the text file only holds `ctx = ctx_a + " " + ctx_b`. ctx_b (the unfinished ActivityNet sentence,
  which lm-eval capitalises) is recovered as the trailing fragment after the last sentence end when the
  context does not itself end a sentence; WikiHow items (ctx_b empty) end with punctuation and are left alone.
- WinoGrande: the source holds lm-eval's partial contexts, not the sentence; the blank goes at the two
  contexts' common prefix cut back to a word start (`eval.convert.winogrande_blank`), so an option that shares
  a first word with the other ("the bed" / "the blanket") loses it to the sentence. The requests are the same.
- WikiText: the shared copy of `wiki.test.raw` has CRLF line ends and no blank separator lines (2,891 lines
  instead of 4,358). Pages are rebuilt from it with LF line ends; the words are the same as in
  `EleutherAI/wikitext_document_level`, the whitespace is not (so byte counts differ slightly).

The converters themselves are in `eval/convert.py`, the task list in `eval/benchmarks.py`.

CLI: `python -m eval.prepare --src <dir with the shared files> --out <dir> [--limit N] [--wikitext-limit M]
[--fewshot-src DIR]`.
`--src` may be the folder holding the files, or a parent with `benchmarks/` and `pretrain/` sub-folders.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from eval.benchmarks import EVAL_SPLIT, TASKS, data_file, split_file
from eval.convert import (
    BenchmarkDataError,
    convert_arc,
    convert_boolq,
    convert_hellaswag_item,
    convert_lambada,
    convert_openbookqa,
    convert_piqa,
    convert_winogrande,
    wikitext_pages,
)
from eval.records import check_file
from eval.taskgen import declared_splits
from infra.jsonl import JsonlError, open_text, read_jsonl

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


# ----------------------------------------------------------------------------------------------------------
# file helpers


def find_source(src_dir: Path, task: str) -> Path:
    """The raw file for `task` under src_dir (or its benchmarks/ or pretrain/ sub-folder)."""
    name = SOURCE_FILES[task]
    candidates = [(Path(src_dir) / sub / name) for sub in SEARCH_SUBDIRS]
    for path in candidates:
        if path.is_file():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(f"benchmark source file {name!r} for task {task!r} not found (looked at: {tried})")


def read_text(path: Path) -> str:
    """The whole file, line ends as they are (WikiText's pages are rebuilt from its CRLF lines)."""
    with open_text(path, newline="") as f:
        return f.read()


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
    with open_text(path) as f:
        return sum(1 for line in f if line.strip())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
        try:
            for i, rec in enumerate(read_jsonl(path)):
                where = f"{path} record {i}"
                yield fn(rec, i, where=where, **kw) if with_index else fn(rec, where=where, **kw)
        except JsonlError as e:  # a line that is not JSON: the same error as a record of the wrong shape
            raise BenchmarkDataError(str(e)) from e

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
    with open_text(src_path, newline="") as f:
        return sum(1 for line in f if line.strip())


# ----------------------------------------------------------------------------------------------------------
# main entry points


def prepare_task(task: str, src_dir: Path, out_dir: Path, limit: int | None = None) -> dict[str, Any]:
    """Convert one task; returns its manifest entry {file, source, source_sha256, count}."""
    src = find_source(src_dir, task)
    records = iter_task_records(task, src)
    if limit is not None:
        records = (r for _, r in zip(range(limit), records, strict=False))
    out = data_file(out_dir, task)
    n = write_jsonl_gz(records, out)
    if n == 0:
        raise BenchmarkDataError(f"{src}: no records for task {task!r}")
    return {"file": out.name, "split": EVAL_SPLIT[task], "source": src.name, "source_sha256": _sha256(src), "count": n}


def find_fewshot_sources(fewshot_src: Path, task: str) -> dict[str, Path]:
    """{split: file} of `DIR/<task>.<split>.jsonl[.gz]` for the task's declared splits other than the eval split."""
    splits = [s for s in declared_splits(task).values() if s and s != EVAL_SPLIT[task]]
    found = {}
    for split in dict.fromkeys(splits):
        for suffix in (".jsonl", ".jsonl.gz"):
            path = Path(fewshot_src) / f"{task}.{split}{suffix}"
            if path.is_file():
                found[split] = path
    return found


def prepare_fewshot_splits(fewshot_src: Path, out_dir: Path, tasks: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Copy the HF-layout few-shot split files found in fewshot_src to `<out>/<task>.<split>.jsonl.gz`, every
    record checked first; returns {task: {split: manifest entry}} for the tasks that have any."""
    found = {t: find_fewshot_sources(fewshot_src, t) for t in tasks}
    counts = {t: {s: check_file(t, p) for s, p in by_split.items()} for t, by_split in found.items()}
    out: dict[str, dict[str, Any]] = {}
    for t, by_split in found.items():
        for split, src in by_split.items():
            dst = split_file(out_dir, t, split)
            n = write_jsonl_gz(read_jsonl(src), dst)
            assert n == counts[t][split], f"{src}: {n} records written, {counts[t][split]} checked"
            entry = {"file": dst.name, "source": src.name, "source_sha256": _sha256(src), "count": n}
            out.setdefault(t, {})[split] = entry
    return out


def prepare_benchmarks(
    src_dir: Path,
    out_dir: Path,
    limit: int | None = None,
    tasks: Iterable[str] | None = None,
    wikitext_limit: int | None = None,
    fewshot_src: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Write `<task>.jsonl.gz` for each task (all nine by default) plus MANIFEST.json; returns the manifest.

    `limit` keeps the first N items of each task; `wikitext_limit` (default: `limit`) the first N articles.
    `fewshot_src` adds the few-shot split files found there (no limit: they are a pool to draw from).
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
    if fewshot_src is not None:
        for t, splits in prepare_fewshot_splits(fewshot_src, out_dir, tasks).items():
            manifest[t]["splits"] = splits
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
    p.add_argument("--fewshot-src", type=Path, default=None, help="folder of HF-layout <task>.<split>.jsonl[.gz]")
    p.add_argument("--tasks", nargs="+", default=None, choices=TASKS, help="subset of tasks (default: all)")
    a = p.parse_args(argv)
    try:
        manifest = prepare_benchmarks(a.src, a.out, a.limit, a.tasks, a.wikitext_limit, a.fewshot_src)
    except (FileNotFoundError, BenchmarkDataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for task, m in manifest.items():
        print(f"{task:15s} {m['count']:6d} -> {Path(a.out) / m['file']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
