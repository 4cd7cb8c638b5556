"""Chat data: render messages into token ids and labels; `read_sft` / `read_preferences` read one file.

Loading, the format adapters, counted drops and mixtures of sources live in `tasks/conversations.py`.

The format uses the special tokens the tokenizer reserved from the start:
`<|user|>question<|end|><|assistant|>answer<|end|>`. Only assistant tokens (and their `<|end|>`) are
trained on; every other label is -100, the ignore index of the model's loss.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from models.tokens import END, role_token
from tasks.conversations import Message, PreferenceSource, SFTSource, load_pairs, load_sft
from tasks.stage import GptflowError

IGNORE = -100
__all__ = ["IGNORE", "Message", "read_preferences", "read_sft", "render"]


def read_sft(path: Path) -> list[list[Message]]:
    """The usable conversations of a chat file in any SFT layout (`tasks.conversations`), drops counted there."""
    return load_sft(SFTSource(path=str(path)))[0]


def read_preferences(path: Path) -> list[tuple[list[Message], str, str]]:
    """(prompt messages, chosen reply, rejected reply) of a preference file in any layout (`tasks.conversations`)."""
    return load_pairs(PreferenceSource(path=str(path)))[0]


def render(messages: list[Message], tok: Tokenizer, block_size: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (assistant tokens only) of a conversation, cut to `block_size + 1` tokens."""
    ids: list[int] = []
    labels: list[int] = []
    end = tok.token_to_id(END)
    for m in messages:
        role_id = tok.token_to_id(role_token(m["role"]))
        if role_id is None:
            raise GptflowError(f"the tokenizer has no token for role '{m['role']}'")
        body = tok.encode(m["content"], add_special_tokens=False).ids + [end]
        ids += [role_id] + body
        labels += [IGNORE] + (body if m["role"] == "assistant" else [IGNORE] * len(body))
    return ids[: block_size + 1], labels[: block_size + 1]
