"""A GPT with a value head: PPO's policy and critic in one network (a shared trunk, as Ziegler et al. and TRL's
`AutoModelForCausalLMWithValueHead`), started from the SFT model with a fresh zero head.

The head is a linear layer on the final hidden state of every position, read as the value of the state "prompt
and response so far". Its parameters are named `value_head.*` beside the GPT's own, so a checkpoint is the GPT's
state dict plus two tensors; `split_value_head` takes them out again so that the exported policy is a plain GPT.

Shapes: B batch, T time, C = n_embd, V = vocab size.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from models.checkpoint import EMBED_KEY, TIED_KEY, load_config, load_state_dict
from models.gpt import GPT, GPTConfig

VALUE_PREFIX = "value_head."


class ValueGPT(GPT):
    """`GPT` plus `value_head`: forward(idx, values=True) -> (logits (B, T, V), values (B, T))."""

    def __init__(self, config: GPTConfig):
        super().__init__(config)
        self.value_head = nn.Linear(config.n_embd, 1)
        nn.init.zeros_(self.value_head.weight)  # values start at 0: the critic learns from the first returns
        nn.init.zeros_(self.value_head.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache=None,  # noqa: ANN001
                values: bool = False):
        """As `GPT.forward`; with values=True, the logits and the value of every position from one trunk pass
        (one call through DDP/FSDP, so both heads' gradients are synchronised)."""
        if not values:
            return super().forward(idx, targets, kv_cache)
        h = self.hidden_states(idx)  # (B, T, C)
        return self.lm_head(h), self.value_head(h).squeeze(-1)  # (B, T, V), (B, T)


def load_value_gpt(model_dir: Path, device: str | torch.device = "cpu") -> ValueGPT:
    """The model in `model_dir` with a fresh value head, dropout off (PPO's ratio is 1 on its own rollouts only
    without dropout). Strict on the GPT's tensors."""
    config = load_config(model_dir).model_copy(update={"dropout": 0.0})
    model = ValueGPT(config).to(device)
    sd = load_state_dict(model_dir, device)
    if config.tie_embeddings and EMBED_KEY in sd:
        sd[TIED_KEY] = sd[EMBED_KEY]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or set(missing) - {VALUE_PREFIX + "weight", VALUE_PREFIX + "bias"}:
        raise ValueError(f"weights in {model_dir} do not fit its config.json: missing {missing}, unexpected {unexpected}")
    if config.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    return model


def split_value_head(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A ValueGPT state dict -> (the GPT's tensors, the value head's tensors without the prefix)."""
    gpt = {k: v for k, v in sd.items() if not k.startswith(VALUE_PREFIX)}
    head = {k.removeprefix(VALUE_PREFIX): v for k, v in sd.items() if k.startswith(VALUE_PREFIX)}
    return gpt, head
