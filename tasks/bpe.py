"""Tokenizer stage: train a byte-level BPE on the clean corpus and pack the corpus into token shards.

In: a folder (or file) of JSONL documents with a `text` field (`.jsonl`, `.jsonl.gz`) or plain `.txt`.
Out: `tokenizer/` (`tokenizer.json` plus the files `transformers.AutoTokenizer` loads, with a chat template)
and `shards/` (`{split}_{i:04d}.bin` flat token arrays, documents separated by `<|endoftext|>`, and
`index.json`). Run alone: `gptflow tokenizer --input DIR`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from tasks.stage import GptflowError

log = logging.getLogger(__name__)

EOT = "<|endoftext|>"
# Reserved from the start so the base model's vocabulary never changes when SFT needs chat roles.
SPECIAL_TOKENS = [EOT, "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class TokenizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(8192, ge=256 + len(SPECIAL_TOKENS), description="Vocabulary size including the 256 byte tokens and the special tokens.")
    min_frequency: int = Field(2, ge=1, description="A pair must occur this often to be merged.")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="Share of documents (by content hash) held out for validation.")
    shard_tokens: int = Field(50_000_000, ge=1000, description="Tokens per shard file (shards are memory-mapped by the trainer).")
    batch_docs: int = Field(1024, ge=1, description="Documents per encode_batch call.")


def iter_texts(path: Path) -> Iterator[str]:
    """Yield document texts from a JSONL(.gz) or .txt file, or from every such file under a folder."""
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
            if ".jsonl" in f.name:
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)["text"]
                        except (json.JSONDecodeError, KeyError) as e:
                            raise GptflowError(f"{f}:{n}: not a JSON object with a 'text' field ({e})") from e
            else:
                yield fh.read()


def new_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def train_bpe(texts: Iterator[str], cfg: TokenizerConfig) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE, streaming the texts (tokenizers trains on all cores)."""
    tok = new_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
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


def is_val(text: str, val_fraction: float) -> bool:
    """Deterministic split by content hash: the same document always lands in the same split."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return (h % 1_000_000) < val_fraction * 1_000_000


class ShardWriter:
    """Appends token arrays to `{split}_{i:04d}.bin`, starting a new shard every `shard_tokens`."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._fh = None
        self.tokens = self.docs = 0

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):04d}.bin"
        self._fh = open(self.out_dir / name, "wb")
        self.shards.append({"file": name, "tokens": 0, "docs": 0})

    def write(self, ids: np.ndarray) -> None:
        if self._fh is None or self.shards[-1]["tokens"] >= self.shard_tokens:
            self.close()
            self._open()
        self._fh.write(ids.astype(self.dtype, copy=False).tobytes())
        self.shards[-1]["tokens"] += len(ids)
        self.shards[-1]["docs"] += 1
        self.tokens += len(ids)
        self.docs += 1

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def write_shards(tok: Tokenizer, texts: Iterator[str], cfg: TokenizerConfig, out_dir: Path) -> dict:
    """Encode documents in batches and append `ids + [eot]` to the train or validation shards."""
    out_dir.mkdir(parents=True, exist_ok=True)
    eot = tok.token_to_id(EOT)
    dtype = token_dtype(tok.get_vocab_size())
    writers = {s: ShardWriter(out_dir, s, dtype, cfg.shard_tokens) for s in ("train", "val")}
    n_bytes = {"train": 0, "val": 0}
    batch: list[str] = []

    def flush() -> None:
        for text, enc in zip(batch, tok.encode_batch(batch, add_special_tokens=False)):
            split = "val" if is_val(text, cfg.val_fraction) else "train"
            writers[split].write(np.append(np.asarray(enc.ids, dtype=np.int64), eot))
            n_bytes[split] += len(text.encode("utf-8", "surrogatepass"))
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) >= cfg.batch_docs:
            flush()
    flush()
    for w in writers.values():
        w.close()
    if writers["val"].docs == 0 or writers["train"].docs == 0:
        raise GptflowError(
            f"corpus too small to split: {writers['train'].docs} train and {writers['val'].docs} validation documents"
        )
    index = {
        "dtype": dtype.name,
        "vocab_size": tok.get_vocab_size(),
        "eot_id": eot,
        "splits": {
            s: {"tokens": w.tokens, "docs": w.docs, "bytes": n_bytes[s], "shards": w.shards} for s, w in writers.items()
        },
    }
    (out_dir / "index.json").write_text(json.dumps(index, indent=2))
    return index


def build_tokenizer(cfg: TokenizerConfig, corpus: Path, out_dir: Path) -> dict:
    """Core of the stage: train, save, shard. Returns counts, metrics and output paths."""
    tok = train_bpe(iter_texts(corpus), cfg)
    tok_dir = out_dir / "tokenizer"
    save_tokenizer(tok, tok_dir)
    index = write_shards(tok, iter_texts(corpus), cfg, out_dir / "shards")
    splits = index["splits"]
    bpt = {s: splits[s]["bytes"] / max(splits[s]["tokens"], 1) for s in splits}
    return {
        "counts": {
            "vocab_size": tok.get_vocab_size(),
            "train_tokens": splits["train"]["tokens"],
            "val_tokens": splits["val"]["tokens"],
            "train_docs": splits["train"]["docs"],
            "val_docs": splits["val"]["docs"],
        },
        "metrics": {"tokenizer/bytes_per_token_val": bpt["val"], "tokenizer/bytes_per_token_train": bpt["train"]},
        "outputs": {"tokenizer": tok_dir, "shards": out_dir / "shards"},
    }


def load_tokenizer(path: Path) -> Tokenizer:
    path = Path(path)
    f = path / "tokenizer.json" if path.is_dir() else path
    if not f.exists():
        raise GptflowError(f"tokenizer file does not exist: {f}")
    return Tokenizer.from_file(str(f))
