"""A conversation with a chat model: the prompt in our chat template, cut to the context, and the answer streamed
as text. Shared by `gptflow chat` (`flows/chat.py`) and the registered model's `predict_stream`
(`tasks/pyfunc_model.py`); no MLflow, no terminal.

The prompt is the conversation rendered as SFT renders it (`tasks/chat.py`), then `<|assistant|>`; the answer
ends at `<|end|>` (or `<|endoftext|>`), which is not shown. The answer always has room for
min(`max_tokens`, block_size / 2) tokens: while the prompt leaves less, the oldest messages are dropped (the
system message is kept); if the system message and the newest message alone leave less, that is an error naming
the numbers. The answer then gets `max_tokens`, or what is left of the context if that is less.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from tokenizers import Tokenizer

from models.tokens import END, EOT, role_token
from tasks.chat import Message, render
from tasks.stage import GptflowError


@dataclass(frozen=True)
class Sampling:
    """How an answer is sampled: greedy at temperature 0; `seed` makes sampling repeatable."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = 0


def stop_ids(tok: Tokenizer) -> list[int]:
    """The tokens that end an answer: `<|end|>` closes a turn; `<|endoftext|>` ends a base model's document."""
    ids = [tok.token_to_id(t) for t in (END, EOT)]
    return [i for i in ids if i is not None]


def check_chat_tokenizer(tok: Tokenizer, vocab_size: int, where: str) -> None:
    """A one-line error, before the first message, for a tokenizer that cannot talk with this model."""
    missing = [t for t in (role_token("user"), role_token("assistant"), END) if tok.token_to_id(t) is None]
    if missing:
        raise GptflowError(f"{where}: the tokenizer has no {', '.join(missing)}: not a gptflow chat tokenizer")
    if tok.get_vocab_size() > vocab_size:
        raise GptflowError(f"{where}: the tokenizer has {tok.get_vocab_size()} tokens, the model {vocab_size}")


def prompt_ids(messages: list[Message], tok: Tokenizer, budget: int) -> list[int]:
    """Token ids of `messages` plus `<|assistant|>`, at most `budget` long, by the cut rule in the module doc."""
    opener = tok.token_to_id(role_token("assistant"))
    if opener is None:
        raise GptflowError("the tokenizer has no <|assistant|> token: it is not a gptflow chat tokenizer")
    parts = [render([m], tok, block_size=1 << 30)[0] for m in messages]
    system = parts[0] if messages and messages[0]["role"] == "system" else []
    turns = parts[1:] if system else parts
    while len(turns) > 1 and len(system) + sum(map(len, turns)) + 1 > budget:
        turns = turns[1:]  # the oldest turn goes first
    ids = system + [i for t in turns for i in t] + [opener]
    if len(ids) > budget:
        raise GptflowError(f"the system prompt and the last message are {len(ids)} tokens; with room for the "
                           f"answer they must fit in {budget}")
    return ids


class TextStream:
    """Token ids in, printable text out. Byte-level BPE splits a multi-byte UTF-8 character over several tokens;
    decoding a half shows U+FFFD, so text is released only once it decodes cleanly (the read window of
    Hugging Face's streamers). Special tokens are not shown."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.ids, self.prefix, self.read = tok, [], 0, 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        done = self.tok.decode(self.ids[self.prefix : self.read])
        text = self.tok.decode(self.ids[self.prefix :])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(done) :]
        return ""

    def flush(self) -> str:
        """What is left at the end of the answer (an incomplete character shows as U+FFFD)."""
        done = self.tok.decode(self.ids[self.prefix : self.read])
        text = self.tok.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(done) :]


def stream_answer(model, tok: Tokenizer, messages: list[Message], opts: Sampling) -> Iterator[str]:
    """The assistant's answer to `messages`, in chunks of text as the tokens are sampled."""
    from models.generate import stream

    T = model.config.block_size
    ids = prompt_ids(messages, tok, budget=T + 1 - min(opts.max_tokens, T // 2))
    max_new = min(opts.max_tokens, T + 1 - len(ids))  # the last sampled token is never fed back
    text = TextStream(tok)
    for token in stream(model, ids, max_new, temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p,
                        stop_ids=stop_ids(tok), seed=opts.seed):
        if chunk := text.push(token):
            yield chunk
    if rest := text.flush():
        yield rest


def as_conversations(data) -> tuple[list[list[Message]], bool]:
    """The pyfunc's inputs as conversations, and whether there was one (a single answer, not a list):
    a string, a list of strings (each one user message), a `{"messages": [...]}` dict, one conversation (a list of
    `{"role", "content"}` dicts) or a list of conversations."""
    if isinstance(data, str):
        return [[_user(data)]], True
    if isinstance(data, dict):
        if "messages" not in data:
            raise GptflowError(f"a dict input needs a 'messages' list; got keys {sorted(data)}")
        return [_messages(data["messages"], 0)], True
    data = list(data)
    if data and all(isinstance(m, dict) for m in data) and "messages" not in data[0]:
        return [_messages(data, 0)], True
    out = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            out.append([_user(item)])
        elif isinstance(item, dict):
            out.append(_messages(item.get("messages"), i))
        else:
            out.append(_messages(item, i))
    return out, False


def _user(text: str) -> Message:
    return {"role": "user", "content": text}


def _messages(items, i: int) -> list[Message]:
    if not isinstance(items, list | tuple) or not items:
        raise GptflowError(f"input {i}: expected a non-empty list of {{'role', 'content'}} messages, got {items!r:.80}")
    for j, m in enumerate(items):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise GptflowError(f"input {i}, message {j}: needs string 'role' and 'content', got {m!r:.80}")
    return [{"role": m["role"], "content": m["content"]} for m in items]
