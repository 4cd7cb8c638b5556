"""Decontamination speed: our n-gram index (`eval/decontam.py`) against datatrove's `NGramsDecontFilter` on the same
benchmark items and the same corpus, in one process (one core).

    python -m bench.decontam [--benchmarks DIR | --src DIR] [--corpus FILE ...] [--mb 30] [--baseline-mb 2]

- `--benchmarks`: prepared `<task>.jsonl.gz` files (default: the bundled 200-item subsets); `--src` prepares the
  full sets first (`python -m eval.prepare --src DIR`, into a temporary folder), ~26k items.
- The corpus: the documents of `--corpus` (JSONL with a `text` field, or plain text split at blank lines; default
  the bundled C4 demo), repeated until `--mb` megabytes of text.
- ours: `BenchmarkIndex.build` (all tasks) then `check_texts` over the whole corpus.
- datatrove: its filter with n=13 and an index in its own format (xxhash64 of the space-joined 13-gram of spaCy
  words of `simplify_text`, what its indexer writes), built here from the same segments because its indexer
  needs lighteval; timed per document on the first `--baseline-mb` megabytes only (it is much slower).

Prints seconds, megabytes per second and documents flagged for both, and the speed ratio. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from itertools import cycle
from pathlib import Path

import numpy as np

from infra.env import setup_env
from infra.jsonl import open_text, read_jsonl


def read_docs(paths: list[str]) -> list[str]:
    docs: list[str] = []
    for p in paths:
        if ".jsonl" in p:
            docs += [r["text"] for r in read_jsonl(p)]
        else:
            with open_text(p) as f:
                docs += [d for d in f.read().split("\n\n") if d.strip()]
    return docs


def corpus_of(docs: list[str], mb: float) -> list[tuple[str, str]]:
    out, size = [], 0
    for i, text in enumerate(cycle(docs)):
        if size >= mb * 1e6:
            break
        out.append((str(i), text))
        size += len(text.encode())
    return out


def datatrove_filter(index, folder: Path):
    """datatrove's NGramsDecontFilter (n=13) over an index of the same items in its own file format."""
    from datatrove.pipeline.decont.n_grams import NGramsDecontConfig, NGramsDecontFilter
    from datatrove.utils.text import ngrams, simplify_text

    filt = NGramsDecontFilter(str(folder), config=NGramsDecontConfig(n_grams=13))
    for task, items in index.items.items():
        hashes = {filt.hash_func(" ".join(g)) for segments in items for s in segments
                  for g in ngrams(filt.tokenizer.word_tokenize(simplify_text(s)), 13)}
        np.array(sorted(hashes), dtype=np.uint64).tofile(folder / f"{task}.index.hashes")
    return filt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--benchmarks", default="data/benchmarks")
    p.add_argument("--src", default=None, help="raw benchmark files: prepare the full sets first")
    p.add_argument("--corpus", nargs="+", default=["data/text/c4_demo.jsonl.gz"])
    p.add_argument("--mb", type=float, default=30.0)
    p.add_argument("--baseline-mb", type=float, default=2.0)
    a = p.parse_args()
    setup_env()
    from datatrove.data import Document

    from eval.decontam import BenchmarkIndex, check_texts
    from eval.prepare import prepare_benchmarks

    with tempfile.TemporaryDirectory() as tmp:
        bench_dir = Path(a.benchmarks)
        if a.src:
            bench_dir = Path(tmp) / "benchmarks"
            prepare_benchmarks(Path(a.src), bench_dir)
        corpus = corpus_of(read_docs(a.corpus), a.mb)
        mb = sum(len(t.encode()) for _, t in corpus) / 1e6
        t0 = time.process_time()
        index = BenchmarkIndex.build(bench_dir)
        t1 = time.process_time()
        report = check_texts(index, {"corpus": corpus})
        t2 = time.process_time()
        items = sum(len(v) for v in index.items.values())
        flagged = sum(r["contaminated"] for r in report["tasks"].values())
        print(f"load {os.getloadavg()[0]:.1f}; {items} items, {len(index.hashes)} n-grams; corpus {mb:.1f} MB, "
              f"{len(corpus)} docs")
        print(f"ours: index {t1 - t0:.1f} s, scan {t2 - t1:.1f} s ({mb / (t2 - t1):.2f} MB/s), total {t2 - t0:.1f} s "
              f"CPU; items flagged {flagged}")

        slice_ = corpus_of([t for _, t in corpus], a.baseline_mb)
        smb = sum(len(t.encode()) for _, t in slice_) / 1e6
        folder = Path(tmp) / "dt_index"
        folder.mkdir()
        t3 = time.process_time()
        filt = datatrove_filter(index, folder)
        filt.load_index_hashes()
        t4 = time.process_time()
        dt_dropped = sum(filt.filter(Document(text=t, id=i)) is not True for i, t in slice_)
        t5 = time.process_time()
        ours_slice = sum(bool(m) for m in index.find_many([t for _, t in slice_]))
        t6 = time.process_time()
        print(f"datatrove: index {t4 - t3:.1f} s, scan of {smb:.1f} MB {t5 - t4:.1f} s ({smb / (t5 - t4):.2f} MB/s); "
              f"docs flagged {dt_dropped} (ours on the same slice: {ours_slice} in {t6 - t5:.1f} s)")
        print(json.dumps({"ours_mb_per_s": round(mb / (t2 - t1), 3), "datatrove_mb_per_s": round(smb / (t5 - t4), 3),
                          "scan_speedup": round((mb / (t2 - t1)) / (smb / (t5 - t4)), 1)}))


if __name__ == "__main__":
    main()
