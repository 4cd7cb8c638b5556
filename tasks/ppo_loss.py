"""PPO's arithmetic, as InstructGPT used it (Ouyang et al. 2022, after Ziegler et al. 2019), in pure torch: the
per-token reward with a KL penalty to the reference, generalised advantage estimation, the clipped surrogate and
clipped value losses, the adaptive KL controller, running reward normalisation and the diagnostics (entropy,
clip fraction, explained variance). No Ray, no model: `tasks/ppo_worker.py` feeds it tensors.

Shapes: B rollouts, R response tokens (right-padded); `mask` (B, R) is 1.0 on real response tokens.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the tokens where mask is 1 (0 when there are none)."""
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of x over the masked tokens."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    return ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1.0)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked tokens, zero outside them: advantages on one scale for every batch."""
    return (x - masked_mean(x, mask)) * torch.rsqrt(masked_var(x, mask) + eps) * mask


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position: logits (B, R, V), targets (B, R) -> (B, R), in fp32."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), 2, targets.unsqueeze(-1)).squeeze(-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """The policy's entropy per position: logits (B, R, V) -> (B, R)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
               kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """InstructGPT's per-token reward: r_t = -kl_coef * (log pi(a_t) - log pi_ref(a_t)) on every response token
    (the k1 estimate of the KL to the reference), plus the sequence's score on its last token.

    Returns (rewards (B, R), kl (B, R)), both zero beyond each row's last token."""
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)  # (B,) the index of each row's last response token
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016): A_t = sum_l (gamma*lam)^l delta_{t+l} with
    delta_t = r_t + gamma V_{t+1} - V_t, where the state after a row's last token is terminal (V = 0).

    Returns (advantages, returns = advantages + values), both (B, R) and zero beyond each row's last token."""
    R = rewards.size(1)
    adv = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(R)):  # right-padded rows: beyond a row's end mask is 0, which zeroes the carry
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv[:, t] = (delta + gamma * lam * next_adv) * mask[:, t]
        next_adv, next_value = adv[:, t], values[:, t] * mask[:, t]
    return adv, (adv + values) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate (Schulman et al. 2017), per token: max(-A ratio, -A clip(ratio, 1-eps, 1+eps)),
    averaged over the minibatch's response tokens. Returns (loss, clip fraction: the share of tokens where the
    clipped term is the larger, so that their gradient is zero)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> torch.Tensor:
    """The clipped value loss: 0.5 * max((V - G)^2, (V_old + clip(V - V_old, -c, c) - G)^2), so one minibatch
    cannot move a value estimate far from where the rollout's was (as OpenAI's baselines and TRL's PPO did)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(G - V) / Var(G) over the response tokens: 1 is a perfect critic, 0 no better than a constant."""
    var = masked_var(returns, mask)
    return float("nan") if var.item() == 0 else (1.0 - masked_var(returns - values, mask) / var).item()


class AdaptiveKL:
    """Ziegler et al.'s controller: after each rollout batch of n samples with mean KL `kl`, the coefficient moves
    by a factor 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon, so the KL settles near `target`. With
    target None the coefficient stays fixed."""

    def __init__(self, coef: float, target: float | None, horizon: int):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n / self.horizon


class RunningMoments:
    """Running mean and variance of the reward model's scores over every rollout so far (Chan et al.'s parallel
    update), so scores are normalised to unit scale as they drift; the state travels in checkpoints."""

    def __init__(self, mean: float = 0.0, var: float = 1.0, count: float = 0.0):
        self.mean, self.var, self.count = mean, var, count

    def update(self, batch_mean: float, batch_var: float, n: int) -> None:
        """Merge a batch of n scores with population variance batch_var."""
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    def normalise(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores - self.mean) / math.sqrt(self.var + 1e-8)

    def state(self) -> list[float]:
        return [self.mean, self.var, self.count]
