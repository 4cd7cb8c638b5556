"""Tokenizer stage: train a byte-level BPE on the clean corpus (or take GPT-2's) and pack the corpus into token shards.

In: a folder (or file) of JSONL documents with a `text` field (`.jsonl`, `.jsonl.gz`; the data stage's
`metadata.source` is used for per-source counts when present) or plain `.txt`.
Out: `tokenizer/` (`tokenizer.json` plus the files `transformers.AutoTokenizer` loads, with a chat template)
and `shards/` (`{split}_{i:04d}.bin` flat token arrays, documents separated by `<|endoftext|>`, and
`index.json`). Run alone: `gptflow tokenizer --input DIR`.

The BPE is GPT-2's: the GPT-2 pre-tokenization regex and byte-to-unicode mapping (tokenizers' `ByteLevel`),
so every string round-trips. Two details are decided here rather than left to chance:

- Lone surrogates. A Python `str` may hold code points U+D800-U+DFFF (JSON `"\\ud800"` escapes decode to
  them), which have no UTF-8 encoding, so no byte-level tokenizer can take them (GPT-2's own `encoder.py`
  raises, tokenizers raises TypeError). `valid_unicode` does what tiktoken does: surrogate pairs become the
  character they encode and each lone surrogate becomes U+FFFD. Training and sharding apply it, so a stray
  surrogate costs one replacement character instead of the run; `index.json` counts the documents repaired.
- Special tokens in document text. In shards, a document's text is ordinary text: a literal `<|endoftext|>`
  inside a document is encoded as ordinary bytes, so the separator id only ever comes from us. The saved
  tokenizer (used for chat templates in SFT) still maps special-token strings to their ids.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from infra.env import DATA_DIR
from tasks.stage import GptflowError

log = logging.getLogger(__name__)

EOT = "<|endoftext|>"
# Reserved from the start so the base model's vocabulary never changes when SFT needs chat roles.
SPECIAL_TOKENS = [EOT, "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# OpenAI's GPT-2 vocabulary and merges, bundled (see data/SOURCES.md).
GPT2_VOCAB = DATA_DIR / "tokenizer" / "gpt2_vocab.json.gz"
GPT2_MERGES = DATA_DIR / "tokenizer" / "gpt2_merges.txt.gz"
GPT2_EOT_ID = 50256


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
    val_fraction: float = Field(0.05, gt=0, lt=1, description="Share of documents (by content hash) held out for validation.")
    shard_tokens: int = Field(50_000_000, ge=1000, description="Tokens per shard file (shards are memory-mapped by the trainer).")
    batch_docs: int = Field(1024, ge=1, description="Documents per encode_batch call.")


# ---------------------------------------------------------------------------------------------- reading input


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
        opener = gzip.open if f.suffix == ".gz" else open
        with opener(f, "rt", encoding="utf-8") as fh:
            if ".jsonl" not in f.name:
                yield fh.read(), None
                continue
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    text = record["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise GptflowError(f"{f}:{n}: not a JSON object with a 'text' field ({e})") from e
                if not isinstance(text, str):
                    raise GptflowError(f"{f}:{n}: 'text' is {type(text).__name__}, not a string")
                meta = record.get("metadata")
                source = meta.get("source") if isinstance(meta, dict) else None
                yield text, None if source is None else str(source)


def iter_texts(path: Path) -> Iterator[str]:
    """Yield document texts from a JSONL(.gz) or .txt file, or from every such file under a folder."""
    for text, _ in iter_docs(path):
        yield text


def valid_unicode(text: str) -> str:
    """`text` made encodable as UTF-8: surrogate pairs joined, lone surrogates replaced by U+FFFD (as tiktoken does).

    Identity on every string without surrogates, so the round trip `decode(encode(t)) == t` holds for all
    valid Unicode; for a string with lone surrogates it holds for `valid_unicode(t)`.
    """
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


# ---------------------------------------------------------------------------------------------- tokenizers


@contextmanager
def all_cores(enabled: bool = True) -> Iterator[None]:
    """Let tokenizers' Rust thread pool (rayon, one thread per core) work inside the block (one core if not `enabled`).

    `infra.env` sets TOKENIZERS_PARALLELISM=false for the whole process, because forked DataLoader workers
    would otherwise inherit a live thread pool. tokenizers reads the variable at every batch call, so we turn it
    on only around our own training and batch encoding and put the old value back after. (In a process forked
    after the pool was used, tokenizers forces parallelism off; such a process encodes on one core.)
    """
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if enabled else "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _byte_level(tok: Tokenizer) -> Tokenizer:
    # GPT-2: its pre-tokenization regex, its byte-to-unicode alphabet, no prefix space, offsets kept as is.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def new_bpe() -> Tokenizer:
    return _byte_level(Tokenizer(models.BPE()))


def train_bpe(
    texts: Iterable[str], cfg: TokenizerConfig, special_tokens: Sequence[str] = SPECIAL_TOKENS, parallel: bool = True
) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE, streaming the texts, on all cores.

    The special tokens get ids 0, 1, ... and are never merged with text. Ties between equally frequent pairs are
    broken the way tokenizers does (the pair of smaller token ids first), not the way GPT-2 or CS336's
    reference does (the lexicographically greater pair), so merges can come in a different order.
    """
    tok = new_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    with all_cores(parallel):
        tok.train_from_iterator((valid_unicode(t) for t in texts), trainer=trainer)
    return tok


def _read_text(path: Path) -> str:
    path = Path(path)
    if not path.exists():
        raise GptflowError(f"tokenizer file does not exist: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return fh.read()


def read_merges(path: Path) -> list[tuple[str, str]]:
    """Merges from a GPT-2 style `merges.txt` (optionally gzipped, with or without the `#version` line)."""
    merges = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line or line.startswith("#version"):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise GptflowError(f"{path}:{n}: a merge is two tokens separated by one space, got {line!r}")
        merges.append((pair[0], pair[1]))
    return merges


def load_gpt2(vocab_gz: Path = GPT2_VOCAB, merges_gz: Path = GPT2_MERGES) -> Tokenizer:
    """GPT-2's tokenizer from its `vocab.json` and `merges.txt` (gzipped or not), with our special tokens.

    `<|endoftext|>` keeps GPT-2's id (50256); the other special tokens are appended after the vocabulary.
    Ordinary text encodes exactly as GPT-2's reference encoder does.
    """
    vocab = json.loads(_read_text(vocab_gz))
    if EOT not in vocab:
        raise GptflowError(f"{vocab_gz}: no {EOT} in the vocabulary")
    tok = _byte_level(Tokenizer(models.BPE(vocab=vocab, merges=read_merges(merges_gz))))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: Path) -> Path:
    """Write `tokenizer.json` and the files `AutoTokenizer.from_pretrained(out_dir)` needs."""
    from transformers import PreTrainedTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOT, bos_token=EOT, unk_token=EOT, pad_token="<|pad|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    tok.save(str(out_dir / "tokenizer.json"))  # keep our exact file (save_pretrained rewrites it)
    return out_dir / "tokenizer.json"


def load_tokenizer(path: Path) -> Tokenizer:
    path = Path(path)
    f = path / "tokenizer.json" if path.is_dir() else path
    if not f.exists():
        raise GptflowError(f"tokenizer file does not exist: {f}")
    return Tokenizer.from_file(str(f))


def text_encoder(tok: Tokenizer) -> Tokenizer:
    """A copy of `tok` that treats special-token strings in its input as ordinary text (used for documents)."""
    enc = Tokenizer.from_str(tok.to_str())
    enc.encode_special_tokens = True
    return enc


def tokenizer_merges(tok: Tokenizer) -> list[tuple[str, str]]:
    """The merges of a BPE tokenizer, in rank order."""
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]


def compare_merges(ours: Sequence[tuple[str, str]], reference: Sequence[tuple[str, str]]) -> dict:
    """How many reference merges `ours` reproduces, and in what order."""
    rank = {m: i for i, m in enumerate(ours)}
    prefix = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), min(len(ours), len(reference)))
    shifts = [abs(rank[m] - i) for i, m in enumerate(reference) if m in rank]
    return {
        "reference": len(reference),
        "ours": len(ours),
        "common": len(shifts),
        "same_rank": sum(1 for a, b in zip(ours, reference) if a == b),
        "identical_prefix": prefix,
        "max_rank_shift": max(shifts, default=0),
        "only_reference": [m for m in reference if m not in rank],
        "only_ours": [m for m in ours if m not in set(reference)],
    }


# ---------------------------------------------------------------------------------------------- shards


def is_val(text: str, val_fraction: float) -> bool:
    """Deterministic split by content hash: the same document always lands in the same split."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return (h % 1_000_000) < val_fraction * 1_000_000


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
        self._fh = open(self.out_dir / name, "wb")  # noqa: SIM115 (kept open across writes, closed by close())
        self.shards.append({"file": name, "tokens": 0, "docs": 0})

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
            self._fh.write(tokens[a:b].astype(self.dtype, copy=False).tobytes())
            self.shards[-1]["tokens"] += b - a
            self.shards[-1]["docs"] += j - i
            self.tokens += b - a
            self.docs += j - i
            i = j

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


@dataclass(slots=True)
class _Doc:
    text: str  # valid_unicode(original)
    nbytes: int
    split: str
    source: str


def _batches(
    docs: Iterable[str | tuple[str, str | None]], cfg: TokenizerConfig, counter: list[int]
) -> Iterator[list[_Doc]]:
    batch: list[_Doc] = []
    for d in docs:
        text, source = (d, None) if isinstance(d, str) else d
        split = "val" if is_val(text, cfg.val_fraction) else "train"
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


def write_shards(
    tok: Tokenizer, docs: Iterable[str | tuple[str, str | None]], cfg: TokenizerConfig, out_dir: Path
) -> dict:
    """Encode documents (texts or `(text, source)`) on all cores; append `ids + [eot]` to the train or val shards.

    One thread reads and post-processes while tokenizers encodes the next batch on every core, so the writer
    runs close to the speed of a bare `encode_batch`. Returns (and writes) `index.json`.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    eot = tok.token_to_id(EOT)
    if eot is None:
        raise GptflowError(f"the tokenizer has no {EOT} token")
    enc = text_encoder(tok)
    dtype = token_dtype(tok.get_vocab_size())
    writers = {s: ShardWriter(out_dir, s, dtype, cfg.shard_tokens) for s in ("train", "val")}
    n_bytes = {"train": 0, "val": 0}
    by_source: dict[str, dict[str, dict[str, int]]] = {"train": {}, "val": {}}
    repaired = [0]
    eot_ids = [eot]

    def consume(batch: list[_Doc], encodings: list) -> None:
        parts: dict[str, list] = {"train": [], "val": []}
        lengths: dict[str, list[int]] = {"train": [], "val": []}
        for doc, e in zip(batch, encodings):
            ids = e.ids
            n = len(ids) + 1
            parts[doc.split] += (ids, eot_ids)
            lengths[doc.split].append(n)
            n_bytes[doc.split] += doc.nbytes
            stats = by_source[doc.split].get(doc.source)
            if stats is None:
                stats = by_source[doc.split][doc.source] = {"docs": 0, "tokens": 0, "bytes": 0}
            stats["docs"] += 1
            stats["tokens"] += n
            stats["bytes"] += doc.nbytes
        for split, lens in lengths.items():
            if lens:
                flat = np.fromiter(chain.from_iterable(parts[split]), dtype=dtype, count=sum(lens))
                writers[split].write_docs(flat, lens)

    try:
        with all_cores(), ThreadPoolExecutor(1, thread_name_prefix="bpe-encode") as pool:
            pending = None
            for batch in _batches(docs, cfg, repaired):
                future = pool.submit(enc.encode_batch_fast, [d.text for d in batch], add_special_tokens=False)
                if pending is not None:
                    consume(pending[0], pending[1].result())
                pending = (batch, future)
            if pending is not None:
                consume(pending[0], pending[1].result())
    finally:
        for w in writers.values():
            w.close()
    if writers["val"].docs == 0 or writers["train"].docs == 0:
        raise GptflowError(
            f"corpus too small to split: {writers['train'].docs} train and {writers['val'].docs} validation documents"
        )
    if repaired[0]:
        log.warning("%d documents had lone surrogates, encoded as U+FFFD", repaired[0])
    has_sources = any(src != "unknown" for split in by_source.values() for src in split)
    index = {
        "dtype": dtype.name,
        "vocab_size": tok.get_vocab_size(),
        "eot_id": eot,
        "repaired_docs": repaired[0],
        "splits": {
            s: {
                "tokens": w.tokens,
                "docs": w.docs,
                "bytes": n_bytes[s],
                "shards": w.shards,
                **({"sources": dict(sorted(by_source[s].items()))} if has_sources else {}),
            }
            for s, w in writers.items()
        },
    }
    (out_dir / "index.json").write_text(json.dumps(index, indent=2))
    return index


def count_tokens(tok: Tokenizer, texts: Iterable[str], batch_docs: int = 1024) -> tuple[int, int]:
    """(tokens, UTF-8 bytes) of the texts as ordinary text, without separators; on all cores."""
    enc = text_encoder(tok)
    n_tokens = n_bytes = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal n_tokens, n_bytes
        n_tokens += sum(len(e.ids) for e in enc.encode_batch_fast(batch, add_special_tokens=False))
        n_bytes += sum(len(t.encode("utf-8")) for t in batch)
        batch.clear()

    with all_cores():
        for text in texts:
            batch.append(valid_unicode(text))
            if len(batch) >= batch_docs:
                flush()
        flush()
    return n_tokens, n_bytes


def _metric_key(name: str) -> str:
    return re.sub(r"[^\w.\-]+", "_", name).strip("._") or "unknown"


def build_tokenizer(cfg: TokenizerConfig, corpus: Path, out_dir: Path) -> dict:
    """Core of the stage: train (or load GPT-2's), save, shard. Returns counts, metrics and output paths.

    Bytes per token are UTF-8 bytes of document text over its tokens, separators not counted, so they compare
    with `tokenizer/bytes_per_token_gpt2`: GPT-2's tokenizer on the same held-out (validation) documents,
    reported when the GPT-2 files are available.
    """
    tok = load_gpt2() if cfg.source == "gpt2" else train_bpe(iter_texts(corpus), cfg)
    tok_dir = out_dir / "tokenizer"
    save_tokenizer(tok, tok_dir)
    index = write_shards(tok, iter_docs(corpus), cfg, out_dir / "shards")
    splits = index["splits"]
    bpt = {s: splits[s]["bytes"] / max(splits[s]["tokens"] - splits[s]["docs"], 1) for s in splits}
    metrics = {"tokenizer/bytes_per_token_val": bpt["val"], "tokenizer/bytes_per_token_train": bpt["train"]}
    if cfg.source == "gpt2":
        metrics["tokenizer/bytes_per_token_gpt2"] = bpt["val"]
    elif GPT2_VOCAB.exists() and GPT2_MERGES.exists():
        held_out = (t for t in iter_texts(corpus) if is_val(t, cfg.val_fraction))
        n_tokens, n_bytes = count_tokens(load_gpt2(), held_out, cfg.batch_docs)
        metrics["tokenizer/bytes_per_token_gpt2"] = n_bytes / max(n_tokens, 1)
    by_source: dict[str, dict[str, int]] = {}
    for s in ("train", "val"):
        for source, stats in splits[s].get("sources", {}).items():
            entry = by_source.setdefault(_metric_key(source), {"train": 0, "val": 0})
            entry[s] += stats["tokens"]
    counts = {
        "vocab_size": tok.get_vocab_size(),
        "train_tokens": splits["train"]["tokens"],
        "val_tokens": splits["val"]["tokens"],
        "train_docs": splits["train"]["docs"],
        "val_docs": splits["val"]["docs"],
        "train_bytes": splits["train"]["bytes"],
        "val_bytes": splits["val"]["bytes"],
        "repaired_docs": index["repaired_docs"],
        "shards": {sh["file"]: sh["tokens"] for s in ("train", "val") for sh in splits[s]["shards"]},
    }
    if by_source:
        counts["tokens_by_source"] = by_source
    shard_files = {f"shard/{sh['file']}": out_dir / "shards" / sh["file"] for s in ("train", "val") for sh in splits[s]["shards"]}
    # every shard is its own output, so the manifest lists each with its sha256
    return {"counts": counts, "metrics": metrics,
            "outputs": {"tokenizer": tok_dir, "shards": out_dir / "shards", **shard_files}}
