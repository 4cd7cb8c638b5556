"""Byte-level BPE: train one (GPT-2's recipe), load GPT-2's, save and load tokenizers, encode on all cores.

The BPE is GPT-2's: the GPT-2 pre-tokenization regex and byte-to-unicode mapping (tokenizers' `ByteLevel`),
so every string round-trips. Two details are decided here rather than left to chance:

- Lone surrogates. A Python `str` may hold code points U+D800-U+DFFF (JSON `"\\ud800"` escapes decode to
  them), which have no UTF-8 encoding, so no byte-level tokenizer can take them (GPT-2's own `encoder.py`
  raises, tokenizers raises TypeError). `valid_unicode` does what tiktoken does: surrogate pairs become the
  character they encode and each lone surrogate becomes U+FFFD. Training and sharding apply it, so a stray
  surrogate costs one replacement character instead of the run.
- Special tokens in document text. `text_encoder` treats a literal `<|endoftext|>` inside a document as
  ordinary bytes, so in the shards the separator id only ever comes from us. The saved tokenizer (used for
  chat templates in SFT) still maps special-token strings to their ids.

The stage that uses them is `tasks/tokenizer.py`; the shard writer is `tasks/shards.py`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from infra.env import DATA_DIR
from infra.jsonl import open_text
from models.tokens import CHAT_TEMPLATE, EOT, PAD, SPECIAL_TOKENS
from tasks.stage import GptflowError

if TYPE_CHECKING:
    from tasks.tokenizer import TokenizerConfig

# OpenAI's GPT-2 vocabulary and merges, bundled (see data/SOURCES.md).
GPT2_VOCAB = DATA_DIR / "tokenizer" / "gpt2_vocab.json.gz"
GPT2_MERGES = DATA_DIR / "tokenizer" / "gpt2_merges.txt.gz"
GPT2_EOT_ID = 50256


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


# ---------------------------------------------------------------------------------------------- training


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


# ---------------------------------------------------------------------------------------------- GPT-2's files


def _read_text(path: Path) -> str:
    path = Path(path)
    if not path.exists():
        raise GptflowError(f"tokenizer file does not exist: {path}")
    with open_text(path) as fh:
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


# ---------------------------------------------------------------------------------------------- saving and loading


def save_tokenizer(tok: Tokenizer, out_dir: Path) -> Path:
    """Write `tokenizer.json` and the files `AutoTokenizer.from_pretrained(out_dir)` needs."""
    from transformers import PreTrainedTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT, unk_token=EOT, pad_token=PAD)
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


# ---------------------------------------------------------------------------------------------- encoding and merges


def text_encoder(tok: Tokenizer) -> Tokenizer:
    """A copy of `tok` that treats special-token strings in its input as ordinary text (used for documents)."""
    enc = Tokenizer.from_str(tok.to_str())
    enc.encode_special_tokens = True
    return enc


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


def tokenizer_merges(tok: Tokenizer) -> list[tuple[str, str]]:
    """The merges of a BPE tokenizer, in rank order."""
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]


def compare_merges(ours: Sequence[tuple[str, str]], reference: Sequence[tuple[str, str]]) -> dict:
    """How many reference merges `ours` reproduces, and in what order."""
    rank = {m: i for i, m in enumerate(ours)}
    prefix = next((i for i, (a, b) in enumerate(zip(ours, reference, strict=False)) if a != b), min(len(ours), len(reference)))
    shifts = [abs(rank[m] - i) for i, m in enumerate(reference) if m in rank]
    return {
        "reference": len(reference),
        "ours": len(ours),
        "common": len(shifts),
        "same_rank": sum(1 for a, b in zip(ours, reference, strict=False) if a == b),
        "identical_prefix": prefix,
        "max_rank_shift": max(shifts, default=0),
        "only_reference": [m for m in reference if m not in rank],
        "only_ours": [m for m in ours if m not in set(reference)],
    }
