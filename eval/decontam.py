"""Benchmark contamination: GPT-3-style word n-gram overlap between benchmark items and training text.

GPT-3 (Brown et al. 2020, appendix C) called a test item dirty when any of its word 13-grams (lowercased,
punctuation stripped) occurs in the training data. We do the same:

- Text is normalised with datatrove's `simplify_text` (the normalisation of its `NGramsDecontFilter`): lowercase,
  punctuation to spaces, digits runs to `0`, diacritics stripped, whitespace collapsed; words are what is left
  between spaces.
- An item is the text a model sees and is scored on, as one or more *segments* (`item_segments`): the context
  joined with each choice (so n-grams span the context/answer boundary, as in a document that holds the item,
  and never two choices). An item's n-grams are those of its segments.
- Short segments: a segment with fewer than `n` words but at least `min_words` is one n-gram of all its words
  (GPT-3 did the same with its minimum of 8 words); a segment under `min_words` words can never match, and an item
  with no segment of `min_words` words is counted as `too_short`.
- Matching hashes n-grams (a 64-bit polynomial hash of per-word xxhash64 values, vectorised with numpy): the
  benchmark side is a sorted array, each training document is hashed once for every n-gram length in the index.

`BenchmarkIndex.find(text)` answers for one training document; `check_texts` runs every source through it and
builds the report; `clean_scores` recomputes a task's metrics on its clean documents from the eval's per-sample
files. Pure: no tracking, no orchestration.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import regex
from datatrove.utils.text import TextNormConfig, simplify_text

from eval.benchmarks import TASKS, data_file
from infra.jsonl import JsonlError, read_jsonl

N_GRAM = 13  # GPT-3's n
MIN_WORDS = 8  # GPT-3's minimum n-gram length for short items
EXAMPLES = 3  # matches kept per task in the report
BATCH = 256  # training documents hashed together
_P = np.uint64(0x100000001B3)  # multiplier of the rolling n-gram hash (FNV-64's prime)
# Perplexity-like metrics are aggregated from (loglikelihood, length) pairs, not as a mean of per-document values.
_NOT_MEANS = ("perplexity", "bits_per_byte")
_NO_DIACRITICS = TextNormConfig(norm_unicode_diacritics=False, norm_whitespace=False)  # split() does whitespace
_MARKS = regex.compile(r"\p{Mn}+")  # what datatrove's diacritics step drops (unicode category Mn)
_BITS = 24  # the membership table: 16 MB, ~1 in 5 false positives with the full nine benchmarks indexed
_SHIFT = np.uint64(64 - _BITS)


class ContaminationError(ValueError):
    """A benchmark file or record that cannot be read; the message names the file, record and task."""


# ----------------------------------------------------------------------------------------------------------
# items: what the model sees of each benchmark document


def _choices(rec: dict[str, Any]) -> list[str]:
    c = rec["choices"]
    return list(c["text"]) if isinstance(c, dict) else list(c)


def _hellaswag(rec: dict[str, Any]) -> list[str]:
    if "query" in rec:  # our converter's layout (lm-eval's process_docs output)
        return [f"{rec['query']} {c}" for c in rec["choices"]]
    ctx = rec.get("ctx") or f"{rec['ctx_a']} {rec['ctx_b']}"  # the Hugging Face layout
    return [f"{rec['activity_label']}: {ctx} {e}" for e in rec["endings"]]


def _winogrande(rec: dict[str, Any]) -> list[str]:
    if "context_options" in rec:  # the requests lm-eval builds
        return [f"{o} {rec['continuation']}" for o in rec["context_options"]]
    return [rec["sentence"].replace("_", rec[k]) for k in ("option1", "option2")]  # the Hugging Face layout


SEGMENTS = {
    "hellaswag": _hellaswag,
    "arc_easy": lambda r: [f"{r['question']} {c}" for c in _choices(r)],
    "arc_challenge": lambda r: [f"{r['question']} {c}" for c in _choices(r)],
    "piqa": lambda r: [f"{r['goal']} {r['sol1']}", f"{r['goal']} {r['sol2']}"],
    "winogrande": _winogrande,
    "boolq": lambda r: [f"{r['passage']} {r['question']}"],
    "openbookqa": lambda r: [f"{r['question_stem']} {c}" for c in _choices(r)],
    "lambada_openai": lambda r: [r["text"]],
    "wikitext": lambda r: [r["page"]],
}


def item_segments(task: str, rec: dict[str, Any], where: str) -> list[str]:
    """The texts of one benchmark document, one per request the model is scored on (context + each choice)."""
    try:
        segments = SEGMENTS[task](rec)
    except (KeyError, TypeError, AttributeError) as e:
        raise ContaminationError(f"{where}: task {task!r} record in no known layout (missing {e})") from None
    if not all(isinstance(s, str) for s in segments):
        raise ContaminationError(f"{where}: task {task!r} record has a non-text field")
    return segments


def check_tasks(tasks: Iterable[str]) -> list[str]:
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in SEGMENTS]
    if unknown:
        raise ContaminationError(f"unknown benchmark task(s) {unknown}; known: {', '.join(TASKS)}")
    return tasks


def read_items(data_dir: Path, task: str) -> list[list[str]]:
    """Every document of `<data_dir>/<task>.jsonl.gz` as its segments; doc_id = the line's index."""
    path = data_file(data_dir, task)
    if not path.is_file():
        raise ContaminationError(f"{path}: benchmark file of task {task!r} not found")
    try:
        return [item_segments(task, rec, f"{path} record {i}") for i, rec in enumerate(read_jsonl(path))]
    except JsonlError as e:
        raise ContaminationError(f"task {task!r}: {e}") from None


# ----------------------------------------------------------------------------------------------------------
# n-gram hashing


def words(text: str) -> list[str]:
    """Normalised words: datatrove's `simplify_text` (lowercase, no punctuation, digits as 0), split on spaces.
    Whitespace is left to `split()`, and the diacritics step (NFD, drop combining marks; a Python loop over
    characters there) is one regex here, run only on text that is not ASCII: the same words, faster."""
    s = simplify_text(text, _NO_DIACRITICS)
    if not s.isascii():
        s = _MARKS.sub("", unicodedata.normalize("NFD", s))
    return s.split()


def word_hashes(ws: list[str]) -> np.ndarray:
    """A 64-bit hash per word: Python's own string hash (cached on each string, salted per process). Hashes are
    compared only within the process that made them, never stored."""
    return np.fromiter(map(hash, ws), dtype=np.int64, count=len(ws)).view(np.uint64)


def span_ngrams(word_hashes: np.ndarray, sizes: np.ndarray, lengths: Iterable[int]) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(length, hashes, start positions) of every run of `length` consecutive words that lies inside one span, for
    each of `lengths`. The words of several spans (documents, segments) are concatenated in `word_hashes`, `sizes`
    words each, so one pass of numpy serves them all. The hash of a run is the polynomial sum(w_i * P^(L-1-i))
    mod 2^64, built from the runs one word shorter (uint64 arithmetic wraps, which is what we want)."""
    wanted = set(lengths)
    if not wanted or len(word_hashes) == 0:
        return
    span_end = np.repeat(np.cumsum(sizes), sizes)  # the end of the span each word is in
    h = word_hashes
    for length in range(1, max(wanted) + 1):
        if length > 1:
            h = h[:-1] * _P + word_hashes[length - 1 :]  # h[i]: the run of `length` words from i
        if length in wanted:
            starts = np.flatnonzero(np.arange(len(h)) + length <= span_end[: len(h)])
            yield length, h[starts], starts
        if len(h) <= 1:
            return


def _concat(word_lists: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    sizes = np.array([len(ws) for ws in word_lists], dtype=np.int64)
    return word_hashes([w for ws in word_lists for w in ws]), sizes


@dataclass
class Match:
    """One benchmark document found in one training document."""

    task: str
    doc_id: int
    ngram: str


@dataclass
class BenchmarkIndex:
    """Every n-gram of every benchmark document, sorted by hash, with the (task, doc_id) it belongs to."""

    n: int = N_GRAM
    min_words: int = MIN_WORDS
    tasks: list[str] = field(default_factory=list)
    items: dict[str, list[list[str]]] = field(default_factory=dict)
    too_short: dict[str, int] = field(default_factory=dict)
    hashes: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))
    owners: np.ndarray = field(default_factory=lambda: np.empty((0, 2), dtype=np.int64))  # (task index, doc_id)
    lengths: list[int] = field(default_factory=list)  # n-gram lengths present: n and the short segments' lengths
    present: np.ndarray = field(default_factory=lambda: np.zeros(1 << _BITS, dtype=bool))  # by the top bits of a hash

    @classmethod
    def build(cls, data_dir: Path, tasks: Iterable[str] = TASKS, n: int = N_GRAM, min_words: int = MIN_WORDS) -> BenchmarkIndex:
        """Read every task's prepared file (all of them first: a bad file fails before any hashing) and index it."""
        if not 1 <= min_words <= n:
            raise ValueError(f"need 1 <= min_words <= n, got min_words={min_words}, n={n}")
        tasks = check_tasks(tasks)
        items = {t: read_items(Path(data_dir), t) for t in tasks}
        index = cls(n=n, min_words=min_words, tasks=tasks, items=items)
        parts, owners, lengths = [], [], set()
        for ti, task in enumerate(tasks):
            seg_words = [words(s) for segments in items[task] for s in segments]
            seg_doc = np.repeat(np.arange(len(items[task])), [len(segments) for segments in items[task]])
            wh, sizes = _concat(seg_words)
            seg_of = np.repeat(np.arange(len(sizes)), sizes)  # the segment of each word
            want = np.minimum(sizes, n)  # a segment's n-gram length: n, or all its words when it is shorter
            found = np.zeros(len(items[task]), dtype=bool)
            for length, h, starts in span_ngrams(wh, sizes, range(min_words, n + 1)):
                keep = want[seg_of[starts]] == length
                parts.append(h[keep])
                docs = seg_doc[seg_of[starts[keep]]]
                owners.append(np.stack([np.full(len(docs), ti), docs], axis=1))
                found[docs] = True
                if keep.any():
                    lengths.add(length)
            index.too_short[task] = int((~found).sum())
        hashes = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)
        own = np.concatenate(owners) if owners else np.empty((0, 2), dtype=np.int64)
        order = np.argsort(hashes, kind="stable")
        index.hashes, index.owners, index.lengths = hashes[order], own[order], sorted(lengths)
        index.present[hashes >> _SHIFT] = True
        return index

    def find_many(self, texts: list[str]) -> list[list[Match]]:
        """For each text, the benchmark documents that share an n-gram with it (each once, with the first such
        n-gram). Texts are hashed together: one batch of numpy work instead of one per text."""
        word_lists = [words(t) for t in texts]
        found: list[dict[tuple[int, int], Match]] = [{} for _ in texts]
        if len(self.hashes) == 0:
            return [[] for _ in texts]
        wh, sizes = _concat(word_lists)
        text_start = np.cumsum(sizes) - sizes
        for length, h, starts in span_ngrams(wh, sizes, self.lengths):
            # a table of the hashes' top bits rules out most n-grams; binary search only for the rest
            maybe = np.flatnonzero(self.present[h >> _SHIFT])
            lo = np.zeros(len(h), dtype=np.int64)
            lo[maybe] = np.searchsorted(self.hashes, h[maybe], side="left")
            hits = maybe[self.hashes[np.minimum(lo[maybe], len(self.hashes) - 1)] == h[maybe]]
            if len(hits) == 0:
                continue
            # every (hit, owner) pair: a hash several benchmark documents share has several owners
            n_owners = np.searchsorted(self.hashes, h[hits], side="right") - lo[hits]
            hit = np.repeat(hits, n_owners)
            row = np.repeat(lo[hits] - np.cumsum(n_owners) + n_owners, n_owners) + np.arange(len(hit))
            text = np.searchsorted(text_start, starts[hit], side="right") - 1
            # the first hit of each (text, task, doc_id)
            keys = np.stack([text, self.owners[row, 0], self.owners[row, 1]], axis=1)
            _, first = np.unique(keys, axis=0, return_index=True)
            for j in sorted(first.tolist()):
                t, ti, doc_id = keys[j].tolist()
                if (ti, doc_id) not in found[t]:
                    pos = int(starts[hit[j]] - text_start[t])
                    found[t][ti, doc_id] = Match(self.tasks[ti], doc_id, " ".join(word_lists[t][pos : pos + length]))
        return [list(f.values()) for f in found]

    def find(self, text: str) -> list[Match]:
        """The benchmark documents that share an n-gram with `text`."""
        return self.find_many([text])[0]


# ----------------------------------------------------------------------------------------------------------
# the report


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def check_texts(index: BenchmarkIndex, sources: Mapping[str, Iterable[tuple[str, str]]]) -> dict[str, Any]:
    """Run every training document through the index. `sources`: {source name: (training doc id, text) pairs}.

    Returns {"n", "min_words", "sources": {name: documents read}, "tasks": {task: {items, contaminated, fraction,
    too_short, examples: [{doc_id, ngram, source, training_doc}], doc_ids}}}."""
    hits: dict[str, dict[int, dict[str, Any]]] = {t: {} for t in index.tasks}
    read: dict[str, int] = {}
    for source, docs in sources.items():
        read[source] = 0
        for batch in batched(docs, BATCH):
            read[source] += len(batch)
            for (train_id, _), matches in zip(batch, index.find_many([text for _, text in batch]), strict=True):
                for m in matches:
                    hits[m.task].setdefault(m.doc_id, {"doc_id": m.doc_id, "ngram": m.ngram, "source": source,
                                                       "training_doc": train_id})
    tasks = {}
    for t in index.tasks:
        ids = sorted(hits[t])
        n_items = len(index.items[t])
        tasks[t] = {"items": n_items, "contaminated": len(ids), "fraction": len(ids) / n_items if n_items else 0.0,
                    "too_short": index.too_short[t], "examples": [hits[t][i] for i in ids[:EXAMPLES]], "doc_ids": ids}
    return {"n": index.n, "min_words": index.min_words, "sources": read, "tasks": tasks}


def report_table(report: Mapping[str, Any]) -> str:
    """The report as a Markdown table: a row per task, the first match as an example."""
    lines = [f"Contamination: word {report['n']}-grams (segments of {report['min_words']}-{report['n'] - 1} words "
             f"as one n-gram) against {', '.join(f'{s} ({k} docs)' for s, k in report['sources'].items())}.", "",
             "| task | items | contaminated | fraction | too short | example (doc_id, source: n-gram) |",
             "|---|---:|---:|---:|---:|---|"]
    for task, r in report["tasks"].items():
        ex = r["examples"][0] if r["examples"] else None
        cell = f"{ex['doc_id']}, {ex['source']}: \"{ex['ngram']}\"" if ex else ""
        lines.append(f"| {task} | {r['items']} | {r['contaminated']} | {r['fraction']:.4f} | {r['too_short']} | {cell} |")
    return "\n".join(lines) + "\n"


def write_report(report: Mapping[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """`contamination.json` and `contamination.md` in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "contamination.json", out_dir / "contamination.md"
    js.write_text(json.dumps(report, indent=2) + "\n")
    md.write_text(report_table(report))
    return js, md


# ----------------------------------------------------------------------------------------------------------
# scores on the clean subset


def _samples(path: Path) -> Iterator[dict[str, Any]]:
    try:
        for i, rec in enumerate(read_jsonl(path)):
            if not isinstance(rec.get("doc_id"), int) or not isinstance(rec.get("metrics"), dict):
                raise ContaminationError(f"{path} record {i}: needs an int 'doc_id' and a 'metrics' object")
            yield rec
    except JsonlError as e:
        raise ContaminationError(str(e)) from None


def clean_scores(samples_dir: Path, contaminated: Mapping[str, Iterable[int]]) -> dict[str, dict[str, float]]:
    """Each task's metrics on its clean documents: the mean of the per-document metric over documents whose doc_id
    is not in `contaminated[task]`, with "n" the clean count. Read from `<samples_dir>/<task>.jsonl` for every task
    in `contaminated`. Perplexity-like metrics (not a mean of per-document values) are left out."""
    out: dict[str, dict[str, float]] = {}
    for task, ids in contaminated.items():
        path = Path(samples_dir) / f"{task}.jsonl"
        if not path.is_file():
            raise ContaminationError(f"{path}: no per-sample file for task {task!r}")
        dirty = set(ids)
        sums: dict[str, list[float]] = {}  # metric -> [sum, documents]
        n = 0
        for rec in _samples(path):
            if rec["doc_id"] in dirty:
                continue
            n += 1
            for name, v in rec["metrics"].items():
                if isinstance(v, int | float) and not any(s in name for s in _NOT_MEANS):
                    acc = sums.setdefault(name, [0.0, 0])
                    acc[0] += float(v)
                    acc[1] += 1
        out[task] = {**{name: total / k for name, (total, k) in sums.items()}, "n": n}
    return out
