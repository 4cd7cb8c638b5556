"""A reward model (InstructGPT, Ouyang et al. 2022, section 3.5): the SFT GPT with its output head unused and a
scalar head, Linear(n_embd, 1), read at the last token of the response. Trained on ranked pairs with the
Bradley-Terry loss by `tasks/reward.py`; PPO scores its rollouts with it.

Rows are right-padded: row i holds its `lengths[i]` real tokens first (prompt, then the response ending with its
`<|end|>`), then anything (pad tokens). Attention is causal, so what follows position `lengths[i] - 1` cannot change
the score read there: a row scores the same alone or padded in a batch.

`RewardModel` subclasses `GPT`, so its parameters keep the GPT's names (`wte.weight`, `blocks.0...`) beside the
head's (`score.weight`, `score.bias`): the shared training loop's checkpoints, FSDP sharding (per block), optimizer
groups and FLOP count work on it unchanged. Its `forward(idx, lengths)` returns scores, not logits.

Saved as one folder: the GPT exactly as `models.checkpoint.save_model` writes it (`model.safetensors` +
`config.json`, so `load_model` reads the trunk alone), the head in `reward_head.safetensors` (`weight` (1, C),
`bias` (1,)) and `reward_head.json` (what the caller stored about the input format). Safetensors only.

Shapes: B batch, T time, C = n_embd.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from models.checkpoint import EMBED_KEY, TIED_KEY, load_config, load_state_dict, save_state_dict
from models.gpt import GPT, GPTConfig

HEAD_WEIGHTS = "reward_head.safetensors"
HEAD_CONFIG = "reward_head.json"
HEAD = "score"  # the head's module name: its keys are score.weight, score.bias


class RewardModel(GPT):
    """GPT trunk + scalar head at the last real token of each row; `meta` travels with the saved head."""

    def __init__(self, config: GPTConfig, meta: dict[str, Any] | None = None):
        super().__init__(config)
        self.meta = dict(meta or {})
        self.score = nn.Linear(config.n_embd, 1)
        nn.init.normal_(self.score.weight, mean=0.0, std=0.02)  # as the GPT's own linear layers
        nn.init.zeros_(self.score.bias)
        if not config.tie_embeddings:
            # unused, and a parameter without a gradient stops DDP; a tied head is the embedding, which is used
            self.lm_head.requires_grad_(False)

    @classmethod
    def from_gpt(cls, gpt: GPT, meta: dict[str, Any] | None = None) -> RewardModel:
        """A reward model whose trunk is a copy of `gpt`'s weights (the InstructGPT start: the SFT model) and whose
        head is new (normal(0, 0.02) weight, zero bias; seed torch first for the same head every time)."""
        device = next(gpt.parameters()).device
        rm = cls(gpt.config, meta).to(device)
        missing, unexpected = rm.load_state_dict(gpt.state_dict(), strict=False)
        assert not unexpected and sorted(missing) == [f"{HEAD}.bias", f"{HEAD}.weight"], (missing, unexpected)
        return rm

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """idx (B, T) right-padded ids, lengths (B,) real tokens per row (1..T) -> scores (B,) in fp32, read at
        each row's last real token (position lengths - 1)."""
        B, T = idx.shape
        assert lengths.shape == (B,), f"lengths must be ({B},), got {tuple(lengths.shape)}"
        assert int(lengths.min()) >= 1 and int(lengths.max()) <= T, f"lengths must lie in 1..{T}, got {lengths.tolist()}"
        h = self.hidden_states(idx)  # (B, T, C)
        last = h[torch.arange(B, device=idx.device), lengths.to(idx.device) - 1]  # (B, C)
        return self.score(last).squeeze(-1).float()  # (B,)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected) over the pairs: the negative log-likelihood that people prefer
    the chosen reply when P(chosen > rejected) = sigmoid(r_chosen - r_rejected) (Bradley and Terry 1952)."""
    return -torch.nn.functional.logsigmoid(chosen.float() - rejected.float()).mean()


def pad_rows(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows into idx (B, T = the longest row) and lengths (B,): the reward model's input."""
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return idx, torch.tensor([len(r) for r in rows], dtype=torch.long)


def save_reward_model(model: RewardModel, out_dir: Path) -> Path:
    """Write the trunk (`model.safetensors`, `config.json`), `reward_head.safetensors` and `reward_head.json` into
    out_dir; returns out_dir."""
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(f"{HEAD}.")}
    out_dir = save_state_dict(sd, model.config, Path(out_dir))
    head = {"weight": model.score.weight.detach().cpu().contiguous(), "bias": model.score.bias.detach().cpu().contiguous()}
    save_file(head, str(out_dir / HEAD_WEIGHTS), metadata={"format": "pt"})
    info = {"read_at": "the last real token of each right-padded row (the response's <|end|>)", "meta": model.meta}
    (out_dir / HEAD_CONFIG).write_text(json.dumps(info, indent=2) + "\n")
    return out_dir


def load_reward_model(model_dir: Path, device: str | torch.device = "cpu") -> RewardModel:
    """Rebuild the reward model saved by `save_reward_model`, in eval mode (strict shapes; a missing or
    mismatched file is a ValueError naming it)."""
    model_dir = Path(model_dir)
    for name in (HEAD_WEIGHTS, HEAD_CONFIG):
        if not (model_dir / name).is_file():
            raise ValueError(f"not a reward model folder, missing {model_dir / name}")
    info = json.loads((model_dir / HEAD_CONFIG).read_text())
    rm = RewardModel(load_config(model_dir), info.get("meta"))
    sd = load_state_dict(model_dir, device)
    sd |= {f"{HEAD}.{k}": v for k, v in load_file(str(model_dir / HEAD_WEIGHTS), device=str(device)).items()}
    load_tied(rm, sd, model_dir)
    return rm.to(device).eval()


def load_tied(rm: RewardModel, sd: dict[str, torch.Tensor], where: Path) -> None:
    """Load a full state dict (trunk + head) into `rm`, strict, re-tying the output head to the embedding."""
    if rm.config.tie_embeddings and EMBED_KEY in sd:
        sd[TIED_KEY] = sd[EMBED_KEY]
    try:
        rm.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"weights in {where} do not fit its config.json and reward head: {e}") from e
    if rm.config.tie_embeddings:
        rm.lm_head.weight = rm.wte.weight
