"""Chat data: read SFT and preference files into messages, and render messages into token ids and labels.

The format uses the special tokens the tokenizer reserved from the start:
`<|user|>question<|end|><|assistant|>answer<|end|>`. Only assistant tokens (and their `<|end|>`) are
trained on; every other label is -100, the ignore index of the model's loss.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer

from infra.jsonl import JsonlError, open_text, read_jsonl
from models.tokens import END, role_token
from tasks.stage import GptflowError

IGNORE = -100
Message = dict[str, str]


def _records(path: Path) -> list[dict]:
    """The records of a JSON array file (Alpaca's) or a JSONL file, gzipped or not."""
    path = Path(path)
    if not path.exists():
        raise GptflowError(f"chat data file does not exist: {path}")
    try:
        with open_text(path) as f:
            head = f.read(4096).lstrip()
            if head.startswith("["):
                return json.loads(head + f.read())
        return list(read_jsonl(path))
    except (json.JSONDecodeError, JsonlError) as e:
        raise GptflowError(f"{path}: not JSON or JSONL ({e})") from e


def _alpaca(r: dict) -> list[Message]:
    prompt = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": r["output"]}]


def _oasst_paths(node: dict, prefix: list[Message]) -> Iterator[list[Message]]:
    """Every conversation in an OpenAssistant tree, following the best-ranked assistant reply at each turn."""
    role = "user" if node["role"] == "prompter" else "assistant"
    convo = prefix + [{"role": role, "content": node["text"]}]
    replies = sorted(node.get("replies", []), key=lambda n: (n.get("rank") is None, n.get("rank") or 0))
    if not replies:
        if role == "assistant":
            yield convo
        return
    yield from _oasst_paths(replies[0], convo)


def read_sft(path: Path) -> list[list[Message]]:
    """Alpaca (`instruction`/`input`/`output`), OpenAssistant trees (`prompt`/`replies`) or `messages` lists."""
    out: list[list[Message]] = []
    for i, r in enumerate(_records(path)):
        if "instruction" in r and "output" in r:
            out.append(_alpaca(r))
        elif "prompt" in r and isinstance(r["prompt"], dict):
            out.extend(_oasst_paths(r["prompt"], []))
        elif "messages" in r:
            out.append([{"role": m["role"], "content": m["content"]} for m in r["messages"]])
        else:
            raise GptflowError(f"{path}: record {i} is neither Alpaca, OpenAssistant nor a 'messages' list")
    return out


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _hh_messages(text: str) -> list[Message]:
    parts = _HH_TURN.split(text if text.startswith("\n\n") else "\n\n" + text)[1:]
    return [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
            for who, body in zip(parts[::2], parts[1::2], strict=False)]


def read_preferences(path: Path) -> list[tuple[list[Message], str, str]]:
    """(prompt messages, chosen reply, rejected reply) from HH-RLHF or ShareGPT-style DPO pairs."""
    pairs = []
    for i, r in enumerate(_records(path)):
        if "conversations" in r:
            prompt = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                      for t in r["conversations"]]
            pairs.append((prompt, r["chosen"]["value"], r["rejected"]["value"]))
        elif isinstance(r.get("chosen"), str) and isinstance(r.get("rejected"), str):
            chosen, rejected = _hh_messages(r["chosen"]), _hh_messages(r["rejected"])
            if not chosen or chosen[-1]["role"] != "assistant" or not rejected or rejected[-1]["role"] != "assistant":
                continue  # a dialogue that does not end with an assistant turn has no reply to compare
            pairs.append((chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]))
        else:
            raise GptflowError(f"{path}: record {i} is neither HH-RLHF nor ShareGPT preference data")
    return pairs


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
