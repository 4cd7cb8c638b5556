"""Direct Preference Optimization (Rafailov et al., 2023), the loss and its held-out metrics:
loss = -log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r)))), with the SFT model, frozen,
as the reference `ref`. The alignment stage (`tasks/align.py`) runs it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tasks.chat import IGNORE, render
from tasks.sft import pad_batch


def seq_logprob(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum of log-probabilities of the labelled (reply) tokens of each row: (B,)."""
    logits = model(x)[0]  # (B, T, vocab)
    mask = y != IGNORE
    logp = torch.gather(F.log_softmax(logits.float(), dim=-1), 2, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


def encode_pairs(pairs, tok, block_size: int) -> list[tuple]:
    """Render prompt+chosen and prompt+rejected; keep pairs where both replies keep some tokens."""
    out = []
    for prompt, chosen, rejected in pairs:
        c = render(prompt + [{"role": "assistant", "content": chosen}], tok, block_size)
        r = render(prompt + [{"role": "assistant", "content": rejected}], tok, block_size)
        if any(v != IGNORE for v in c[1][1:]) and any(v != IGNORE for v in r[1][1:]):
            out.append((c, r))
    return out


def dpo_batch(policy, ref, batch, pad_id: int, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = [c for c, _ in batch] + [r for _, r in batch]
    x, y = pad_batch(rows, pad_id)
    lp = seq_logprob(policy, x, y)
    with torch.no_grad():
        lr = seq_logprob(ref, x, y)
    n = len(batch)
    margin = beta * ((lp[:n] - lr[:n]) - (lp[n:] - lr[n:]))  # implicit reward of chosen minus rejected
    return -F.logsigmoid(margin).mean(), (margin > 0).float().mean(), margin.mean()


@torch.no_grad()
def preference_metrics(policy, ref, pairs, pad_id: int, beta: float, batch_size: int) -> dict[str, float]:
    """On held-out pairs: DPO loss, reward accuracy (the policy moved towards the chosen reply more than
    towards the rejected one, relative to the reference) and the policy's own preference for the chosen reply."""
    policy.eval()
    losses, accs, prefers = [], [], []
    for i in range(0, len(pairs), batch_size):
        batch = pairs[i : i + batch_size]
        loss, acc, _ = dpo_batch(policy, ref, batch, pad_id, beta)
        x, y = pad_batch([c for c, _ in batch] + [r for _, r in batch], pad_id)
        lp = seq_logprob(policy, x, y)
        prefers.append((lp[: len(batch)] > lp[len(batch):]).float().mean().item())
        losses.append(loss.item())
        accs.append(acc.item())
    policy.train()
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return {"dpo_loss": mean(losses), "reward_acc": mean(accs), "prefers_chosen": mean(prefers)}
