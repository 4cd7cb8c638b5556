"""Tokenizer stage: train a byte-level BPE on the clean corpus (or take GPT-2's) and pack the corpus into token shards.

In: a `CorpusRef`, a folder (or file) of JSONL documents with a `text` field (`.jsonl`, `.jsonl.gz`; the data
stage's `metadata.source` is used for per-source counts when present) or plain `.txt`.
Out: a `TokenizerRef` to `tokenizer/` (`tokenizer.json` plus the files `transformers.AutoTokenizer` loads, with
a chat template), holding a `ShardsRef` to `shards/` (`{split}_{i:04d}.bin` flat token arrays, documents
separated by `<|endoftext|>`, and `index.json`). Run alone: `gptflow tokenizer --input DIR`.

The BPE itself is `tasks/bpe.py`, the shard writer `tasks/shards.py`. A stray lone surrogate in a document
costs one U+FFFD rather than the run, and `index.json` counts the documents repaired; a special-token string
inside a document is encoded as ordinary text, so the separator id in the shards only ever comes from us.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from infra.jsonl import JsonlError, numbered_jsonl, open_text
from models.tokens import SPECIAL_TOKENS
from tasks.bpe import GPT2_MERGES, GPT2_VOCAB, count_tokens, load_gpt2, save_tokenizer, train_bpe
from tasks.refs import CorpusRef, ShardsRef, TokenizerRef
from tasks.shards import SPLITS, is_val, write_shards
from tasks.stage import GptflowError


class TokenizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["train", "gpt2"] = Field(
        "train",
        description="'train': learn a byte-level BPE on the corpus. 'gpt2': use GPT-2's vocabulary and merges "
        "(bundled in data/tokenizer/) with <|endoftext|> = 50256 as in GPT-2 and our other special tokens "
        "appended as 50257-50261 (50,262 tokens); vocab_size and min_frequency are then not used.",
    )
    vocab_size: int = Field(8192, ge=256 + len(SPECIAL_TOKENS), description="Vocabulary size including the 256 byte tokens and the special tokens.")
    min_frequency: int = Field(2, ge=1, description="A pair must occur this often to be merged.")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="Share held out for validation: of documents (by content hash), or of characters with val_split='tail'.")
    val_split: Literal["hash", "tail"] = Field(
        "hash",
        description="hash: whole documents by content hash, the same document always in the same split. tail: the "
        "last val_fraction of the corpus's characters, in file order, as one held-out stretch (nanoGPT's "
        "shakespeare split); the tokenizer then trains on the rest only.",
    )
    shard_tokens: int = Field(50_000_000, ge=1000, description="Tokens per shard file (shards are memory-mapped by the trainer).")
    batch_docs: int = Field(1024, ge=1, description="Documents per encode_batch call.")


# ---------------------------------------------------------------------------------------------- reading the corpus


def _jsonl_docs(path: Path) -> Iterator[tuple[str, str | None]]:
    try:
        for n, record in numbered_jsonl(path):
            if "text" not in record:
                raise GptflowError(f"{path}:{n}: no 'text' field")
            text = record["text"]
            if not isinstance(text, str):
                raise GptflowError(f"{path}:{n}: 'text' is {type(text).__name__}, not a string")
            meta = record.get("metadata")
            source = meta.get("source") if isinstance(meta, dict) else None
            yield text, None if source is None else str(source)
    except JsonlError as e:
        raise GptflowError(str(e)) from e


def iter_docs(path: Path) -> Iterator[tuple[str, str | None]]:
    """Yield `(text, source)` from a JSONL(.gz) or .txt file, or from every such file under a folder.

    `source` is the record's `metadata.source` (set by the data stage), None when absent or for .txt files.
    """
    path = Path(path)
    if not path.exists():
        raise GptflowError(f"tokenizer input does not exist: {path}")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    files = [f for f in files if f.name.endswith((".jsonl", ".jsonl.gz", ".txt", ".txt.gz"))]
    if not files:
        raise GptflowError(f"no .jsonl, .jsonl.gz or .txt files under {path}")
    for f in files:
        if ".jsonl" in f.name:
            yield from _jsonl_docs(f)
        else:
            with open_text(f) as fh:
                yield fh.read(), None


def iter_texts(path: Path) -> Iterator[str]:
    """Yield document texts from a JSONL(.gz) or .txt file, or from every such file under a folder."""
    for text, _ in iter_docs(path):
        yield text


def tail_split(docs: Iterable[tuple[str, str | None]], val_fraction: float) -> list[tuple[str, str | None, str]]:
    """`(text, source, split)`: the last `val_fraction` of all characters, in order, is "val"; a document that
    straddles the cut is split there into a train part and a val part."""
    docs = list(docs)
    cut = round(sum(len(text) for text, _ in docs) * (1 - val_fraction))
    out: list[tuple[str, str | None, str]] = []
    pos = 0
    for text, source in docs:
        head = min(max(cut - pos, 0), len(text))
        if head:
            out.append((text[:head], source, "train"))
        if head < len(text):
            out.append((text[head:], source, "val"))
        pos += len(text)
    return out


# ---------------------------------------------------------------------------------------------- the stage


def _metric_key(name: str) -> str:
    return re.sub(r"[^\w.\-]+", "_", name).strip("._") or "unknown"


def _counts(index: dict[str, Any]) -> dict[str, Any]:
    """Tokens, documents and bytes per split, tokens per shard and (when the corpus names them) per source."""
    splits = index["splits"]
    counts = {
        "vocab_size": index["vocab_size"],
        **{f"{s}_{what}": splits[s][what] for what in ("tokens", "docs", "bytes") for s in SPLITS},
        "repaired_docs": index["repaired_docs"],
        "shards": {sh["file"]: sh["tokens"] for s in SPLITS for sh in splits[s]["shards"]},
    }
    by_source: dict[str, dict[str, int]] = {}
    for s in SPLITS:
        for source, stats in splits[s].get("sources", {}).items():
            by_source.setdefault(_metric_key(source), {"train": 0, "val": 0})[s] += stats["tokens"]
    return counts | ({"tokens_by_source": by_source} if by_source else {})


def _metrics(cfg: TokenizerConfig, held_out: Iterable[str], index: dict[str, Any]) -> dict[str, float]:
    """Bytes per token: UTF-8 bytes of document text over its tokens, separators not counted, so they compare
    with `tokenizer/bytes_per_token_gpt2`, GPT-2's tokenizer on the same held-out (validation) documents,
    reported when the GPT-2 files are available."""
    splits = index["splits"]
    bpt = {s: splits[s]["bytes"] / max(splits[s]["tokens"] - splits[s]["docs"], 1) for s in splits}
    metrics = {"tokenizer/bytes_per_token_val": bpt["val"], "tokenizer/bytes_per_token_train": bpt["train"]}
    if cfg.source == "gpt2":
        metrics["tokenizer/bytes_per_token_gpt2"] = bpt["val"]
    elif GPT2_VOCAB.exists() and GPT2_MERGES.exists():
        n_tokens, n_bytes = count_tokens(load_gpt2(), held_out, cfg.batch_docs)
        metrics["tokenizer/bytes_per_token_gpt2"] = n_bytes / max(n_tokens, 1)
    return metrics


def build_tokenizer(cfg: TokenizerConfig, corpus: CorpusRef, out_dir: Path) -> TokenizerRef:
    """Core of the stage: train (or load GPT-2's) tokenizer, save it to `out_dir/tokenizer`, shard the corpus
    into `out_dir/shards`.

    Returns the tokenizer folder's ref, with the shards' ref in `.shards`. Its `files` name the tokenizer, the
    shards folder, `index.json` and every shard (`shard/<file>`), so the manifest lists each with its sha256.
    """
    src = Path(corpus.path)
    if cfg.val_split == "tail":
        docs = tail_split(iter_docs(src), cfg.val_fraction)
        texts: Iterable[str] = (text for text, _, split in docs if split == "train")
        held_out = (text for text, _, split in docs if split == "val")  # lazy: read only for GPT-2's count
    else:
        docs, texts = iter_docs(src), iter_texts(src)
        held_out = (t for t in iter_texts(src) if is_val(t, cfg.val_fraction))
    tok = load_gpt2() if cfg.source == "gpt2" else train_bpe(texts, cfg)
    tok_dir, shards_dir = out_dir / "tokenizer", out_dir / "shards"
    save_tokenizer(tok, tok_dir)
    index = write_shards(tok, docs, cfg, shards_dir)
    counts = _counts(index)
    shard_files = {f"shard/{f}": str(shards_dir / f) for f in counts["shards"]}
    shards = ShardsRef(path=str(shards_dir), counts={k: counts[k] for k in ("train_tokens", "val_tokens", "vocab_size")})
    return TokenizerRef(
        path=str(tok_dir),
        counts=counts,
        metrics=_metrics(cfg, held_out, index),
        files={"tokenizer": str(tok_dir), "shards": str(shards_dir), "index": str(shards_dir / "index.json"), **shard_files},
        artifacts=["tokenizer", "index"],
        shards=shards,
    )
