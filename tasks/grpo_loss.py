"""GRPO's arithmetic in plain torch (Shao et al. 2024, DeepSeekMath): group-normalised advantages, the per-token
clipped surrogate and the k3 KL estimate to the frozen reference. No model, no Ray: `tasks/grpo_worker.py` calls
these, and `tests/unit/test_grpo.py` checks them against TRL 1.16's `GRPOTrainer` on the same tensors.

Layout: N = prompts x group_size sequences, the G samples of a prompt consecutive; per-token tensors are (N, T)
with `mask` 1 on the tokens the policy sampled (the response and its `<|end|>`), 0 on the prompt and padding.
"""

from __future__ import annotations

from typing import Literal

import torch

Aggregation = Literal["sequence", "token"]


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Each sample's reward minus its group's mean, divided by the group's std (Bessel-corrected) + eps when
    `scale`; without it (Dr. GRPO, Liu et al. 2025) the difference alone, so groups that nearly agree are not
    blown up to unit scale. rewards (N,) -> advantages (N,). eps 1e-4 as TRL, so a test can compare."""
    assert rewards.numel() % group_size == 0 and group_size > 1, (rewards.shape, group_size)
    r = rewards.view(-1, group_size)  # (prompts, G)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)  # torch.std is Bessel-corrected, as TRL's nanstd
    return adv.view(-1)


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at every position: logits (N, T, V), targets (N, T) -> (N, T), in float32."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float, beta: float,
              aggregation: Aggregation = "sequence") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of one batch of samples and its statistics.

    Per token: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + beta * KL, with ratio = p / p_old (1 on the
    first pass over fresh samples, so the clip only acts on later passes) and KL the k3 estimate
    exp(ref - logp) - (ref - logp) - 1 (Schulman 2020: unbiased, always >= 0).

    Aggregation: "sequence" (the GRPO paper, TRL's loss_type="grpo") averages each sample's tokens, then the
    samples, so every sample weighs the same whatever its length; "token" (TRL's "bnpo") averages every token of
    the batch, so long samples weigh more.

    Returns:
        The loss, and detached sums over the masked tokens: "kl", "clipped" (tokens whose clipped side was taken,
        TRL's clip_ratio/region), "tokens".
    """
    ratio = torch.exp(logps - old_logps)  # (N, T)
    adv = advantages.unsqueeze(1)  # (N, 1)
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    delta = ref_logps - logps
    kl = torch.exp(delta) - delta - 1  # (N, T)
    per_token = -surrogate + beta * kl if beta else -surrogate
    if aggregation == "sequence":
        loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    else:
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + clip_eps) & (adv > 0))
    stats = {"kl": (kl * mask).sum().detach(), "clipped": (clipped * mask).sum().detach(),
             "tokens": mask.sum().detach()}
    return loss, stats
