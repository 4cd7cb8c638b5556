"""Chat rendering, loss masking and the SFT/preference readers on the bundled and shared formats."""

from __future__ import annotations

import gzip
import json

import pytest

from infra.env import DATA_DIR
from models.tokens import SPECIAL_TOKENS
from tasks.bpe import train_bpe
from tasks.chat import IGNORE, read_preferences, read_sft, render
from tasks.stage import GptflowError
from tasks.tokenizer import TokenizerConfig


@pytest.fixture(scope="module")
def tok():
    texts = ["Hello there, how are you?", "I am fine, thank you.", "What is two plus two?", "Four."] * 20
    return train_bpe(iter(texts), TokenizerConfig(vocab_size=300, min_frequency=1))


def test_only_assistant_tokens_are_labelled(tok):
    convo = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."},
             {"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "I am fine"}]
    ids, labels = render(convo, tok, block_size=512)
    assert len(ids) == len(labels)
    trained = [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE]
    assert tok.decode(trained, skip_special_tokens=False) == "Four.<|end|>I am fine<|end|>"
    assert ids[0] == tok.token_to_id("<|user|>")
    assert all(lab == IGNORE or lab == i for i, lab in zip(ids, labels, strict=True))


def test_render_truncates_to_the_context(tok):
    ids, labels = render([{"role": "user", "content": "Hello there " * 100}], tok, block_size=16)
    assert len(ids) == len(labels) == 17


def test_unknown_role_is_an_error(tok):
    with pytest.raises(GptflowError, match="no token for role 'narrator'"):
        render([{"role": "narrator", "content": "x"}], tok, 32)


def test_bundled_alpaca_reads_as_user_assistant_pairs():
    convos = read_sft(DATA_DIR / "sft" / "alpaca_en_demo.json.gz")
    assert len(convos) == 999
    assert all([m["role"] for m in c] == ["user", "assistant"] for c in convos)


def test_oasst_trees_follow_the_best_ranked_reply(tmp_path):
    tree = {"prompt": {"role": "prompter", "text": "Q", "replies": [
        {"role": "assistant", "text": "worse", "rank": 1, "replies": []},
        {"role": "assistant", "text": "best", "rank": 0, "replies": [
            {"role": "prompter", "text": "follow-up", "replies": [{"role": "assistant", "text": "A2", "rank": 0}]}]}]}}
    f = tmp_path / "oasst.jsonl"
    f.write_text(json.dumps(tree) + "\n")
    assert read_sft(f) == [[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "best"},
                            {"role": "user", "content": "follow-up"}, {"role": "assistant", "content": "A2"}]]


def test_hh_rlhf_pairs_split_prompt_and_replies(tmp_path):
    rec = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me\n\nAssistant: sure, gladly",
           "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me\n\nAssistant: no"}
    f = tmp_path / "hh.jsonl.gz"
    with gzip.open(f, "wt") as fh:
        fh.write(json.dumps(rec) + "\n")
    ((prompt, chosen, rejected),) = read_preferences(f)
    assert [m["content"] for m in prompt] == ["hi", "hello", "help me"]
    assert (chosen, rejected) == ("sure, gladly", "no")


def test_bundled_dpo_pairs_read():
    pairs = read_preferences(DATA_DIR / "preference" / "dpo_en_demo.json.gz")
    assert len(pairs) == 300 and all(p[0][-1]["role"] == "user" and p[1] != p[2] for p in pairs)


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(GptflowError, match="does not exist"):
        read_sft(tmp_path / "nope.json")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": 1}\n')
    with pytest.raises(GptflowError, match=r"bad\.jsonl: record 0"):
        read_sft(bad)
    assert SPECIAL_TOKENS[0] == "<|endoftext|>"


@pytest.mark.parametrize("source", ["trained", "gpt2"])
def test_render_equals_apply_chat_template_of_the_saved_and_exported_tokenizer(source, tmp_path):
    """One chat template everywhere: SFT's rendering, `transformers`' `apply_chat_template` on the tokenizer the
    tokenizer stage saves, and on the Hugging Face export (what lm-eval's `--apply_chat_template` uses)."""
    from transformers import AutoTokenizer

    from models.checkpoint import save_model
    from models.export import export_hf
    from models.gpt import GPT, GPTConfig
    from tasks.bpe import load_gpt2, save_tokenizer

    texts = ["You are terse. What is two plus two? Four. And three? Three, of course."] * 20
    tok = load_gpt2() if source == "gpt2" else train_bpe(iter(texts), TokenizerConfig(vocab_size=300, min_frequency=1))
    save_tokenizer(tok, tmp_path / "tok")
    convo = [{"role": "system", "content": "You are terse."},
             {"role": "user", "content": "What is two plus two?"},
             {"role": "assistant", "content": "Four."},
             {"role": "user", "content": " And three?"},
             {"role": "assistant", "content": "Three, of course.\n"}]
    ours, _ = render(convo, tok, block_size=1024)
    save_model(GPT(GPTConfig(vocab_size=tok.get_vocab_size(), block_size=16, n_layer=1, n_head=1, n_embd=8)),
               tmp_path / "model")
    export_hf(tmp_path / "model", tmp_path / "tok" / "tokenizer.json", tmp_path / "hf")
    for folder in (tmp_path / "tok", tmp_path / "hf"):
        theirs = AutoTokenizer.from_pretrained(folder).apply_chat_template(convo, tokenize=True, return_dict=True)
        assert list(theirs["input_ids"]) == ours, folder.name
    prompt = AutoTokenizer.from_pretrained(tmp_path / "hf").apply_chat_template(convo[:2], tokenize=False,
                                                                                 add_generation_prompt=True)
    assert prompt == "<|system|>You are terse.<|end|><|user|>What is two plus two?<|end|><|assistant|>"
