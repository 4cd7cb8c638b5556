"""Tokenizer throughput on this machine, in one run: `python -m bench.tokenizer [--input PATH ...] [--json FILE]`.

Prints
- training MB/s (byte-level BPE, `tasks.bpe.train_bpe`) on all cores and on one core;
- encoding MB/s of a bare `encode_batch` (and `encode_batch_fast`) on one core and on all cores;
- the shard writer's MB/s (`tasks.shards.write_shards`: encode, split, pack, write) and its ratio to the bare
  all-core `encode_batch` on the same documents (target: at least 0.8);
- bytes per token of the trained tokenizer and of GPT-2's on the held-out documents (the stage's validation
  split, which the benchmark's tokenizer is not trained on);
- how many of CS336's reference merges (vocab 500 on `corpus.en`) our trainer reproduces.

Default input: the bundled text in data/ (C4 demo documents, the GPT-2 check sample, CS336's corpus.en), about
1 MB; `.txt` files are cut into documents of about 4 KB at line breaks. Each encoding variant runs `--rounds`
times, interleaved, on a fresh copy of the tokenizer (tokenizers caches words per tokenizer object); the best
round counts. Throughput is MB of UTF-8 text per second.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from infra.env import DATA_DIR, setup_env

DEFAULT_INPUTS = [
    DATA_DIR / "text" / "c4_demo.jsonl.gz",
    DATA_DIR / "tokenizer" / "gpt2_check_sample.txt.gz",
    DATA_DIR / "tokenizer" / "cs336_corpus.en.gz",
]


def load_docs(paths: list[Path], chunk_bytes: int = 4096) -> list[str]:
    from tasks.tokenizer import iter_texts

    docs: list[str] = []
    for p in paths:
        p = Path(p)
        if p.name.endswith((".jsonl", ".jsonl.gz")) or p.is_dir():
            docs.extend(iter_texts(p))
            continue
        if p.suffix == ".gz" and not p.name.endswith(".txt.gz"):  # e.g. corpus.en.gz: plain text
            texts = [gz_text(p)]
        else:
            texts = list(iter_texts(p))
        for text in texts:
            chunk: list[str] = []
            size = 0
            for line in text.splitlines(keepends=True):
                chunk.append(line)
                size += len(line)
                if size >= chunk_bytes:
                    docs.append("".join(chunk))
                    chunk, size = [], 0
            if chunk:
                docs.append("".join(chunk))
    return docs


def gz_text(path: Path) -> str:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read()


def mb(n_bytes: int, seconds: float) -> float:
    return n_bytes / 1e6 / seconds


def best_of(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.tokenizer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, action="append", help="JSONL(.gz)/.txt file or folder (repeatable)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--batch-docs", type=int, default=64, help="documents per encode call (bare and writer)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per encoding variant (best counts)")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    setup_env()

    from models.tokens import EOT
    from tasks.bpe import (
        GPT2_MERGES,
        GPT2_VOCAB,
        all_cores,
        compare_merges,
        count_tokens,
        load_gpt2,
        read_merges,
        text_encoder,
        tokenizer_merges,
        train_bpe,
    )
    from tasks.shards import is_val, write_shards
    from tasks.tokenizer import TokenizerConfig

    docs = load_docs(args.input or DEFAULT_INPUTS)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    cores = os.cpu_count()
    load = os.getloadavg()[0]
    res: dict = {"machine": {"cpus": cores, "load_1min": load, "python": platform.python_version()},
                 "docs": len(docs), "mb": n_bytes / 1e6}
    print(f"corpus: {len(docs)} documents, {n_bytes / 1e6:.2f} MB; {cores} CPUs, load average {load:.1f} "
          "(other processes on the machine skew the all-core numbers)")

    # training
    cfg = TokenizerConfig(vocab_size=args.vocab_size, batch_docs=args.batch_docs)
    held_out = [d for d in docs if is_val(d, cfg.val_fraction)] or docs[-1:]
    train_docs = [d for d in docs if not is_val(d, cfg.val_fraction)]
    for label, parallel in (("all cores", True), ("1 core", False)):
        t = time.perf_counter()
        tok = train_bpe(iter(train_docs), cfg, parallel=parallel)
        dt = time.perf_counter() - t
        train_bytes = sum(len(d.encode("utf-8")) for d in train_docs)
        res[f"train_mb_s_{'all' if parallel else 'one'}"] = mb(train_bytes, dt)
        print(f"train  vocab {args.vocab_size:>6} {label:>9}: {mb(train_bytes, dt):7.2f} MB/s ({dt:.2f} s)")

    # encoding: bare encode_batch / encode_batch_fast, one core and all cores, and the shard writer
    batch = cfg.batch_docs
    batches = [docs[i : i + batch] for i in range(0, len(docs), batch)]

    def bare(method: str, parallel: bool):
        def run():
            enc = text_encoder(tok)
            with all_cores(parallel):
                for b in batches:
                    getattr(enc, method)(b, add_special_tokens=False)
        return run

    out_dir = Path(tempfile.mkdtemp(prefix="bench-tokenizer-"))

    def writer():
        write_shards(tok, iter(docs), cfg, out_dir)

    variants = {
        "encode_batch_one": bare("encode_batch", False),
        "encode_batch_fast_one": bare("encode_batch_fast", False),
        "encode_batch_all": bare("encode_batch", True),
        "encode_batch_fast_all": bare("encode_batch_fast", True),
        "shard_writer_all": writer,
    }
    times = {k: [] for k in variants}
    bare("encode_batch", True)()  # warm-up: thread pool, allocator
    for _ in range(args.rounds):
        for k, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    for k, ts in times.items():
        res[f"{k}_mb_s"] = mb(n_bytes, min(ts))
        print(f"{k:>22}: {mb(n_bytes, min(ts)):7.2f} MB/s (best of {len(ts)}: {min(ts):.3f} s)")
    shutil.rmtree(out_dir, ignore_errors=True)
    res["speedup_all_vs_one"] = res["encode_batch_all_mb_s"] / res["encode_batch_one_mb_s"]
    res["writer_vs_encode_batch"] = res["shard_writer_all_mb_s"] / res["encode_batch_all_mb_s"]
    res["writer_vs_encode_batch_fast"] = res["shard_writer_all_mb_s"] / res["encode_batch_fast_all_mb_s"]
    print(f"encode_batch all cores / one core: {res['speedup_all_vs_one']:.2f}x")
    print(f"shard writer / bare encode_batch (all cores): {res['writer_vs_encode_batch']:.2f} "
          f"(/ encode_batch_fast: {res['writer_vs_encode_batch_fast']:.2f}); target >= 0.80")

    # compression on the held-out documents (not trained on), ours vs GPT-2
    t_ours, b = count_tokens(tok, held_out)
    res["bytes_per_token"] = b / t_ours
    line = f"bytes/token on {len(held_out)} held-out docs: ours (vocab {args.vocab_size}) {b / t_ours:.3f}"
    if GPT2_VOCAB.exists() and GPT2_MERGES.exists():
        t_gpt2, _ = count_tokens(load_gpt2(), held_out)
        res["bytes_per_token_gpt2"] = b / t_gpt2
        line += f", GPT-2 {b / t_gpt2:.3f}"
    print(line)

    # CS336 reference merges
    corpus = DATA_DIR / "tokenizer" / "cs336_corpus.en.gz"
    ref = DATA_DIR / "tokenizer" / "cs336_train-bpe-reference-merges.txt"
    if corpus.exists() and ref.exists():
        text = gz_text(corpus)
        small = train_bpe([text], TokenizerConfig(vocab_size=500, min_frequency=1), special_tokens=[EOT])
        cmp = compare_merges(tokenizer_merges(small), read_merges(ref))
        res["cs336_merges"] = {k: v for k, v in cmp.items() if not k.startswith("only_")}
        print(f"CS336 reference merges reproduced: {cmp['common']}/{cmp['reference']} "
              f"({cmp['same_rank']} at the same rank, first {cmp['identical_prefix']} identical, "
              f"largest rank shift {cmp['max_rank_shift']}); only in reference: {cmp['only_reference']}")

    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
