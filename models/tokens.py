"""The special tokens every gptflow tokenizer reserves, and the one chat template that uses them.

The tokenizer stage (`tasks/tokenizer.py`) gives them the first ids when it trains a BPE (GPT-2's vocabulary keeps
`<|endoftext|>` = 50256 and gets the others appended); chat rendering (`tasks/chat.py`), the lm-eval adapter
(`eval/lm.py`) and the Hugging Face export (`models/export.py`) look them up by these strings.
"""

from __future__ import annotations

EOT = "<|endoftext|>"  # separates documents in the token shards; the end-of-text token of lm-eval and HF
PAD = "<|pad|>"
END = "<|end|>"  # closes every chat turn


def role_token(role: str) -> str:
    """`<|user|>` for "user": the token that opens a chat turn of `role`."""
    return f"<|{role}|>"


# Reserved from the start so the base model's vocabulary never changes when SFT needs chat roles.
SPECIAL_TOKENS = [EOT, PAD, role_token("system"), role_token("user"), role_token("assistant"), END]

# Jinja for `transformers` `apply_chat_template`: `<|user|>question<|end|><|assistant|>answer<|end|>`.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
