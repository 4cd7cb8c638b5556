"""Tokenizer stage: training, special tokens, round trip, shards and the deterministic split."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infra.env import DATA_DIR
from tasks.bpe import EOT, SPECIAL_TOKENS, TokenizerConfig, build_tokenizer, iter_texts, load_tokenizer, train_bpe
from tasks.stage import GptflowError

CORPUS = DATA_DIR / "text" / "c4_demo.jsonl.gz"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return out, build_tokenizer(TokenizerConfig(vocab_size=1024), CORPUS, out)


def test_vocab_specials_and_counts(built):
    out, result = built
    tok = load_tokenizer(out / "tokenizer")
    assert tok.get_vocab_size() == 1024
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    c = result["counts"]
    assert c["train_docs"] + c["val_docs"] == sum(1 for _ in iter_texts(CORPUS))
    assert 2.0 < result["metrics"]["tokenizer/bytes_per_token_val"] < 6.0


def test_shards_hold_every_document_once_separated_by_eot(built):
    out, result = built
    tok = load_tokenizer(out / "tokenizer")
    index = json.loads((out / "shards" / "index.json").read_text())
    assert index["dtype"] == "uint16"
    eot = tok.token_to_id(EOT)
    arrays = {s: np.concatenate([np.fromfile(out / "shards" / sh["file"], dtype=np.uint16)
                                 for sh in index["splits"][s]["shards"]]) for s in ("train", "val")}
    assert len(arrays["train"]) == result["counts"]["train_tokens"]
    assert int((arrays["val"] == eot).sum()) == result["counts"]["val_docs"]
    decoded = [tok.decode(list(map(int, d))) for d in np.split(arrays["val"], np.where(arrays["val"] == eot)[0] + 1) if len(d)]
    texts = set(iter_texts(CORPUS))
    assert all(d.removesuffix(EOT) in texts or d in texts for d in decoded)


def test_split_is_deterministic(tmp_path, built):
    out, result = built
    again = build_tokenizer(TokenizerConfig(vocab_size=1024), CORPUS, tmp_path)
    assert again["counts"] == result["counts"]
    assert (tmp_path / "tokenizer" / "tokenizer.json").read_text() == (out / "tokenizer" / "tokenizer.json").read_text()


def test_autotokenizer_loads_with_chat_template(built):
    from transformers import AutoTokenizer

    out, _ = built
    at = AutoTokenizer.from_pretrained(out / "tokenizer")
    text = at.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>hi<|end|><|assistant|>"
    assert at.eos_token == EOT


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_text(text):
    tok = _small_tok()
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_ordinary_text_never_produces_special_tokens(text):
    tok = _small_tok()
    ids = tok.encode(text.replace("<|", ""), add_special_tokens=False).ids
    assert not set(ids) & set(range(len(SPECIAL_TOKENS)))


def test_special_token_is_never_split():
    tok = _small_tok()
    ids = tok.encode(f"end{EOT}start", add_special_tokens=False).ids
    assert tok.token_to_id(EOT) in ids


_TOK = []


def _small_tok():
    if not _TOK:
        with gzip.open(CORPUS, "rt") as f:
            texts = [json.loads(line)["text"] for _, line in zip(range(50), f)]
        _TOK.append(train_bpe(iter(texts), TokenizerConfig(vocab_size=400)))
    return _TOK[0]


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(GptflowError, match="does not exist"):
        list(iter_texts(tmp_path / "none"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(GptflowError, match=r"bad\.jsonl:2"):
        list(iter_texts(bad))
