"""Token shards: documents encoded on all cores and packed into `{split}_{i:04d}.bin` flat token arrays.

Each document is followed by `<|endoftext|>`; a document goes to `val` or `train` by a hash of its content, so
the same document always lands in the same split. `index.json` records the dtype, vocabulary size, separator
id, the shards of each split (tokens, documents) and, when the records carry `metadata.source`, the counts
per source. The tokenizer stage (`tasks/tokenizer.py`) writes them; the trainers memory-map them.

A shard is written under a temporary name and renamed when it is whole, and `index.json` is written last, the
same way (`infra.atomic`): a crash or a full disk leaves no file that looks complete, and a full disk is one
error naming the shard and the free space.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Encoding, Tokenizer

from infra.atomic import disk_full_error, is_disk_full, write_text
from models.tokens import EOT
from tasks.bpe import all_cores, text_encoder, valid_unicode
from tasks.stage import GptflowError

if TYPE_CHECKING:
    from tasks.tokenizer import TokenizerConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
# texts, (text, source) pairs, or (text, source, split) triples whose split ("train" or "val") is already chosen
Docs = Iterable[str | tuple[str, str | None] | tuple[str, str | None, str]]


def is_val(text: str, val_fraction: float) -> bool:
    """Deterministic split by content hash: the same document always lands in the same split."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return (h % 1_000_000) < val_fraction * 1_000_000


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class ShardWriter:
    """Appends documents to `{split}_{i:04d}.bin`, starting a new shard at the first document boundary at or past
    `shard_tokens` (shards always end with a whole document)."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._fh = None
        self.tokens = self.docs = 0

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):04d}.bin"
        self._path, self._tmp = self.out_dir / name, self.out_dir / f".{name}.tmp"  # renamed by close() when whole
        self._fh = open(self._tmp, "wb")  # noqa: SIM115 (kept open across writes, closed by close())
        self.shards.append({"file": name, "tokens": 0, "docs": 0})

    def _write(self, data: bytes) -> None:
        try:
            self._fh.write(data)
        except OSError as e:
            if is_disk_full(e):
                raise disk_full_error(self._path, e) from e
            raise

    def write(self, ids: np.ndarray) -> None:
        """Append one document."""
        self.write_docs(np.asarray(ids), [len(ids)])

    def write_docs(self, tokens: np.ndarray, lengths: Sequence[int]) -> None:
        """Append documents given concatenated in `tokens`, with their lengths."""
        lengths = np.asarray(lengths, dtype=np.int64)
        ends = np.cumsum(lengths)
        starts = ends - lengths
        i = 0
        while i < len(lengths):
            if self._fh is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self.close()
                self._open()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            # documents i..j-1 start before this shard is full (document i always does)
            j = i + max(1, int(np.searchsorted(starts[i:] - starts[i], room, side="left")))
            a, b = int(starts[i]), int(ends[j - 1])
            self._write(tokens[a:b].astype(self.dtype, copy=False).tobytes())
            self.shards[-1]["tokens"] += b - a
            self.shards[-1]["docs"] += j - i
            self.tokens += b - a
            self.docs += j - i
            i = j

    def close(self) -> None:
        """Finish the open shard: flushed to disk, then renamed to its final name."""
        if self._fh is None:
            return
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
        except OSError as e:
            self.abort()
            if is_disk_full(e):
                raise disk_full_error(self._path, e) from e
            raise
        self._fh = None
        os.replace(self._tmp, self._path)

    def abort(self) -> None:
        """Drop the open shard's partial file (after an error): nothing is left that looks like a whole shard."""
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:
                pass  # the error being handled is the one to report
            self._fh = None
            self._tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- the two splits


@dataclass(slots=True)
class _Doc:
    text: str  # valid_unicode(original)
    nbytes: int
    split: str
    source: str


def _batches(docs: Docs, cfg: TokenizerConfig, counter: list[int]) -> Iterator[list[_Doc]]:
    """Documents in batches of `cfg.batch_docs`, each with its split and UTF-8 size; `counter[0]` counts repairs."""
    batch: list[_Doc] = []
    for d in docs:
        text, source, *chosen = (d, None) if isinstance(d, str) else d
        split = chosen[0] if chosen else "val" if is_val(text, cfg.val_fraction) else "train"
        clean = valid_unicode(text)
        if clean is not text:
            counter[0] += 1
        nbytes = len(clean) if clean.isascii() else len(clean.encode("utf-8"))
        batch.append(_Doc(clean, nbytes, split, "unknown" if source is None else source))
        if len(batch) >= cfg.batch_docs:
            yield batch
            batch = []
    if batch:
        yield batch


class _Splits:
    """The train and val shard writers, with UTF-8 bytes and per-source counts, fed one encoded batch at a time."""

    def __init__(self, out_dir: Path, dtype: np.dtype, shard_tokens: int, eot: int):
        self.writers = {s: ShardWriter(out_dir, s, dtype, shard_tokens) for s in SPLITS}
        self.n_bytes = {s: 0 for s in SPLITS}
        self.by_source: dict[str, dict[str, dict[str, int]]] = {s: {} for s in SPLITS}
        self.dtype, self.eot_ids = dtype, [eot]

    def add(self, batch: list[_Doc], encodings: list[Encoding]) -> None:
        """Append `ids + [eot]` of each document to its split."""
        parts: dict[str, list] = {s: [] for s in SPLITS}
        lengths: dict[str, list[int]] = {s: [] for s in SPLITS}
        for doc, e in zip(batch, encodings, strict=True):
            ids = e.ids
            n = len(ids) + 1
            parts[doc.split] += (ids, self.eot_ids)
            lengths[doc.split].append(n)
            self.n_bytes[doc.split] += doc.nbytes
            stats = self.by_source[doc.split].get(doc.source)
            if stats is None:
                stats = self.by_source[doc.split][doc.source] = {"docs": 0, "tokens": 0, "bytes": 0}
            stats["docs"] += 1
            stats["tokens"] += n
            stats["bytes"] += doc.nbytes
        for split, lens in lengths.items():
            if lens:
                flat = np.fromiter(chain.from_iterable(parts[split]), dtype=self.dtype, count=sum(lens))
                self.writers[split].write_docs(flat, lens)

    def close(self) -> None:
        for w in self.writers.values():
            w.close()

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()

    def splits(self) -> dict[str, dict[str, Any]]:
        """The `splits` part of `index.json`; `sources` only when some document named its source."""
        has_sources = any(src != "unknown" for split in self.by_source.values() for src in split)
        return {
            s: {
                "tokens": w.tokens,
                "docs": w.docs,
                "bytes": self.n_bytes[s],
                "shards": w.shards,
                **({"sources": dict(sorted(self.by_source[s].items()))} if has_sources else {}),
            }
            for s, w in self.writers.items()
        }


def _encode_into(enc: Tokenizer, docs: Docs, cfg: TokenizerConfig, splits: _Splits, repaired: list[int]) -> None:
    """One thread reads and post-processes a batch while tokenizers encodes the next one on every core."""
    with all_cores(), ThreadPoolExecutor(1, thread_name_prefix="bpe-encode") as pool:
        pending = None
        for batch in _batches(docs, cfg, repaired):
            future = pool.submit(enc.encode_batch_fast, [d.text for d in batch], add_special_tokens=False)
            if pending is not None:
                splits.add(pending[0], pending[1].result())
            pending = (batch, future)
        if pending is not None:
            splits.add(pending[0], pending[1].result())


def write_shards(tok: Tokenizer, docs: Docs, cfg: TokenizerConfig, out_dir: Path) -> dict:
    """Encode documents (texts or `(text, source)`) on all cores; append `ids + [eot]` to the train or val shards.

    The pipelined encoding runs close to the speed of a bare `encode_batch`. Returns (and writes) `index.json`.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    eot = tok.token_to_id(EOT)
    if eot is None:
        raise GptflowError(f"the tokenizer has no {EOT} token")
    dtype = token_dtype(tok.get_vocab_size())
    splits = _Splits(out_dir, dtype, cfg.shard_tokens, eot)
    repaired = [0]
    try:
        _encode_into(text_encoder(tok), docs, cfg, splits, repaired)
    except BaseException:
        splits.abort()
        raise
    splits.close()
    n_docs = {s: w.docs for s, w in splits.writers.items()}
    if n_docs["val"] == 0 or n_docs["train"] == 0:
        raise GptflowError(f"corpus too small to split: {n_docs['train']} train and {n_docs['val']} validation documents")
    if repaired[0]:
        log.warning("%d documents had lone surrogates, encoded as U+FFFD", repaired[0])
    index = {
        "dtype": dtype.name,
        "vocab_size": tok.get_vocab_size(),
        "eot_id": eot,
        "repaired_docs": repaired[0],
        "splits": splits.splits(),
    }
    write_text(out_dir / "index.json", json.dumps(index, indent=2))  # last: the shards are complete
    return index
