"""`gptflow chat` and the pieces it shares with the registered model: streaming generation, incremental UTF-8
decoding, the cut to the context, `--model` sources (our folder, a Hugging Face folder, `models:/NAME@ALIAS`) and
the MLflow pyfunc's chat messages and `predict_stream`, against a throwaway sqlite MLflow.

Run: `.venv/bin/python -m pytest tests/unit/test_chat_cli.py -q` (~30 s; the MLflow registration and the
`gptflow chat` subprocess on a Hugging Face folder are marked `slow`).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from flows.chat import ASSISTANT, YOU, chat
from infra.env import REPO_ROOT
from models.checkpoint import load_model, save_model
from models.generate import generate, stream
from models.gpt import GPT, GPTConfig
from tasks import tracking
from tasks.bpe import train_bpe
from tasks.chat import render
from tasks.chat_session import Sampling, TextStream, prompt_ids, stop_ids, stream_answer
from tasks.model_source import resolve_model
from tasks.refs import ModelRef, TokenizerRef
from tasks.registry import RegistryConfig
from tasks.stage import GptflowError
from tasks.tokenizer import TokenizerConfig

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["Hello there, how are you?", "I am fine, thank you.", "What is two plus two?", "Four.",
         "naïve café, crème brûlée", "日本語のテキスト"] * 20
SAMPLED = Sampling(max_tokens=12, temperature=1.0, seed=3)


@pytest.fixture(scope="module")
def tok():
    return train_bpe(iter(TEXTS), TokenizerConfig(vocab_size=300, min_frequency=1))


@pytest.fixture(scope="module")
def folder(tok, tmp_path_factory):
    """Our model folder with its tokenizer.json inside: a tiny GPT with large random weights (varied outputs)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.get_vocab_size(), block_size=128, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("chat") / "model"
    save_model(model, out)
    tok.save(str(out / "tokenizer.json"))
    return out


@pytest.fixture(scope="module")
def model(folder):
    return load_model(folder).eval()


def expected_answer(model, tok, messages, opts: Sampling) -> str:
    """The reference: `generate` (no streaming) on the whole rendered conversation, then one decode."""
    ids = render(messages, tok, 10**6)[0] + [tok.token_to_id("<|assistant|>")]
    out = generate(model, [ids], opts.max_tokens, temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p,
                   stop_ids=stop_ids(tok), seed=opts.seed)[0]
    return tok.decode(out)


def user(text):
    return {"role": "user", "content": text}


# ---------------------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_stream_yields_the_tokens_generate_returns(model, temperature):
    prompt = [5, 17, 42, 9]
    want = generate(model, [prompt], 20, temperature=temperature, top_k=40, seed=7)[0]
    assert list(stream(model, prompt, 20, temperature=temperature, top_k=40, seed=7)) == want
    assert len(want) == 20  # no stop id given: all 20 tokens


def test_utf8_split_across_tokens_decodes_whole(tok):
    text = "crème brûlée, 日本語 🙂!"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert any("\ufffd" in tok.decode([i]) for i in ids), "no character is split over tokens: the test is moot"
    text_stream = TextStream(tok)
    chunks = [text_stream.push(i) for i in ids] + [text_stream.flush()]
    assert "".join(chunks) == text
    assert not any("\ufffd" in c for c in chunks)


def test_streamed_answer_equals_plain_generation(model, tok):
    messages = [{"role": "system", "content": "Be brief."}, user("What is two plus two?")]
    assert "".join(stream_answer(model, tok, messages, SAMPLED)) == expected_answer(model, tok, messages, SAMPLED)


def test_context_cut_drops_oldest_turns_and_keeps_the_system_turn(tok):
    system = {"role": "system", "content": "Be brief."}
    turns = [user("Hello there"), {"role": "assistant", "content": "I am fine"}, user("What is two plus two?")]
    full = prompt_ids([system, *turns], tok, budget=10**6)
    parts = [render([m], tok, 10**6)[0] for m in (system, *turns)]
    assert full == [i for p in parts for i in p] + [tok.token_to_id("<|assistant|>")]
    cut = prompt_ids([system, *turns], tok, budget=len(full) - 1)  # one token short: the oldest turn goes
    assert cut == parts[0] + parts[2] + parts[3] + [tok.token_to_id("<|assistant|>")]
    with pytest.raises(GptflowError, match="must fit in 3"):
        prompt_ids([system, *turns], tok, budget=3)


# ---------------------------------------------------------------------------------------------- the chat loop


def test_chat_second_answer_is_conditioned_on_the_first_and_reset_clears(model, tok):
    stdin = io.StringIO("What is two plus two?\nAnd then?\n/reset\nWhat is two plus two?\n")
    stdout = io.StringIO()
    first, second = chat(model, tok, SAMPLED, system="Be brief.", stdin=stdin, stdout=stdout)
    assert [m["role"] for m in first] == ["system", "user", "assistant", "user", "assistant"]
    assert first[2]["content"] == expected_answer(model, tok, first[:2], SAMPLED)
    turn2 = Sampling(**{**SAMPLED.__dict__, "seed": SAMPLED.seed + 1})
    assert first[4]["content"] == expected_answer(model, tok, first[:4], turn2)
    without_history = expected_answer(model, tok, [first[0], first[3]], turn2)
    assert first[4]["content"] != without_history, "history makes no difference here: the test could not fail"
    assert second == first[:3]  # after /reset: the same first turn, with no earlier history
    assert stdout.getvalue().count(ASSISTANT) == 3 and first[4]["content"] in stdout.getvalue()


def test_chat_says_when_a_message_cannot_fit(model, tok):
    stdout = io.StringIO()
    (convo,) = chat(model, tok, Sampling(max_tokens=120), stdin=io.StringIO("Hello there " * 40 + "\n"), stdout=stdout)
    assert convo == [] and "(not sent:" in stdout.getvalue()


@pytest.mark.slow
def test_gptflow_chat_through_stdin_with_a_hugging_face_folder(tok, tmp_path):
    """The real command, on a random `transformers` GPT-2 folder (imported once into the workspace cache)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=64,
                                                             n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                                                             eos_token_id=0)).eval()
    hf.save_pretrained(tmp_path / "hf")
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    ours, tok_dir = resolve_model(str(tmp_path / "hf"))
    assert tok_dir == tmp_path / "hf" and resolve_model(str(tmp_path / "hf"))[0] == ours  # imported once
    x = torch.randint(0, tok.get_vocab_size(), (1, 10))
    torch.testing.assert_close(load_model(ours)(x)[0], hf(x).logits, atol=1e-5, rtol=1e-5)

    cmd = [sys.executable, "-m", "flows.cli", "chat", "--model", str(tmp_path / "hf"), "--temperature", "0",
           "--max-tokens", "8"]
    out = subprocess.run(cmd, input="Hello there\nWhat is two plus two?\n/quit\n", capture_output=True, text=True,
                         cwd=REPO_ROOT, env=os.environ, timeout=120)
    assert out.returncode == 0, out.stderr
    model = load_model(ours).eval()
    greedy = Sampling(max_tokens=8, temperature=0.0, seed=0)
    first = expected_answer(model, tok, [user("Hello there")], greedy)
    second = expected_answer(model, tok, [user("Hello there"), {"role": "assistant", "content": first},
                                          user("What is two plus two?")], greedy)
    assert f"{ASSISTANT}{first}\n" in out.stdout and f"{ASSISTANT}{second}\n" in out.stdout


# ---------------------------------------------------------------------------------------------- MLflow


@pytest.fixture(scope="module")
def registered(folder, tmp_path_factory):
    """`folder` registered as `gpt-chat-test` with alias `candidate`, in a fresh sqlite store."""
    before = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        with tracking.stage_run("registry", None) as run_id:
            tracking.register_model(run_id, ModelRef(path=str(folder)), TokenizerRef(path=str(folder)),
                                    RegistryConfig(model_name="gpt-chat-test"), {})
        yield "models:/gpt-chat-test@candidate"
    mlflow.set_tracking_uri(before)


@pytest.mark.slow
def test_model_source_downloads_a_registered_model(registered, model):
    model_dir, tok_dir = resolve_model(registered)
    assert (tok_dir / "tokenizer.json").is_file()
    assert resolve_model("models:/gpt-chat-test/1") == (model_dir, tok_dir)
    for a, b in zip(load_model(model_dir).parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(GptflowError, match="models:/gpt-chat-test@nope"):
        resolve_model("models:/gpt-chat-test@nope")


@pytest.mark.slow
def test_pyfunc_answers_messages_and_streams(registered, model, tok):
    pyfunc = mlflow.pyfunc.load_model(registered)
    messages = [{"role": "system", "content": "Be brief."}, user("Hello there"),
                {"role": "assistant", "content": "I am fine"}, user("What is two plus two?")]
    params = {"max_new_tokens": 12, "temperature": 1.0, "seed": 3}
    want = expected_answer(model, tok, messages, SAMPLED)
    assert pyfunc.predict(messages, params=params) == want
    assert pyfunc.predict([messages, [user("Hello there")]], params=params)[0] == want
    chunks = list(pyfunc.predict_stream({"messages": messages}, params=params))
    assert len(chunks) > 1 and "".join(chunks) == want
    (short,) = pyfunc.predict(["Hello there"], params={"max_new_tokens": 2})
    assert short == expected_answer(model, tok, [user("Hello there")], Sampling(max_tokens=2, temperature=0.0))


@pytest.mark.slow
def test_stage_commands_take_any_model_source(registered, folder, tmp_path):
    """`gptflow sft|align|eval --model`: a registered model brings its tokenizer; a bare folder needs --tokenizer."""
    from flows.cli import build_parser, model_source

    model_dir, tok_dir = map(Path, model_source(build_parser().parse_args(["sft", "--model", registered])))
    assert (tok_dir / "tokenizer.json").is_file() and (model_dir / "model.safetensors").is_file()
    bare = tmp_path / "bare"
    save_model(load_model(folder), bare)
    with pytest.raises(GptflowError, match="pass --tokenizer"):
        model_source(build_parser().parse_args(["eval", "--model", str(bare)]))
    args = build_parser().parse_args(["dpo", "--model", str(bare), "--tokenizer", str(folder)])
    assert model_source(args) == (str(bare), str(folder))
    with pytest.raises(GptflowError, match="not a model folder"):
        model_source(build_parser().parse_args(["sft", "--model", str(tmp_path)]))


def test_gptflow_chat_in_a_terminal(folder, model, tok):
    """Through a pseudo-terminal (line editing with readline): a turn, /reset, then Ctrl-D ends with status 0."""
    import pty
    import select

    master, slave = pty.openpty()
    cmd = [sys.executable, "-m", "flows.cli", "chat", "--model", str(folder), "--temperature", "0", "--max-tokens", "6"]
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=subprocess.PIPE, cwd=REPO_ROOT, env=os.environ)
    os.close(slave)
    seen, typed = b"", [b"Hello there\n", b"/reset\n", b"\x04"]  # \x04: Ctrl-D at an empty prompt
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if select.select([master], [], [], 1)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the child has gone: the terminal is closed
                break
            if not chunk:
                break
            seen += chunk
        if typed and seen.count(YOU.encode()) > 3 - len(typed):
            os.write(master, typed.pop(0))
    os.close(master)
    assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()
    text = seen.decode().replace("\r\n", "\n")
    greedy = Sampling(max_tokens=6, temperature=0.0)
    assert f"{ASSISTANT}{expected_answer(model, tok, [user('Hello there')], greedy)}\n" in text
    assert "(new conversation)" in text


def test_a_long_conversation_is_answered_on_its_newest_turns(model, tok):
    """block_size 128 and max_tokens 1000: the prompt keeps 65 tokens at most, the answer fills the rest."""
    turns = [user("Hello there, how are you? " * 2), {"role": "assistant", "content": "I am fine, thank you. " * 2}] * 3
    messages = [{"role": "system", "content": "Be brief."}, *turns, user("What is two plus two?")]
    cut = prompt_ids(messages, tok, budget=65)
    assert len(prompt_ids(messages, tok, budget=10**6)) > 65 >= len(cut)
    opts = Sampling(max_tokens=1000, temperature=1.0, seed=1)
    want = generate(model, [cut], 129 - len(cut), temperature=1.0, stop_ids=stop_ids(tok), seed=1)[0]
    assert "".join(stream_answer(model, tok, messages, opts)) == tok.decode(want)


def test_chat_refuses_a_tokenizer_without_chat_tokens(folder, tmp_path, capsys):
    import tokenizers

    from flows.cli import main

    plain = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"t{i}": i for i in range(50)}, unk_token="t0"))
    plain.save(str(tmp_path / "tokenizer.json"))
    assert main(["chat", "--model", str(folder), "--tokenizer", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "has no <|user|>, <|assistant|>, <|end|>: not a gptflow chat tokenizer" in err and "Traceback" not in err
    assert main(["chat", "--model", str(folder), "--top-p", "0"]) == 2


@pytest.mark.slow
def test_gptflow_chat_loads_a_registered_model(registered, model, tok, monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\n/quit\n"))
    assert main(["chat", "--model", registered, "--temperature", "0", "--max-tokens", "5", "--system", "Be brief."]) == 0
    want = expected_answer(model, tok, [{"role": "system", "content": "Be brief."}, user("Hello there")],
                           Sampling(max_tokens=5, temperature=0.0))
    assert f"{YOU}Hello there\n{ASSISTANT}{want}\n{YOU}/quit\n" in capsys.readouterr().out
