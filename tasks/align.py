"""Alignment stage: Direct Preference Optimization (DPO) of the SFT model on ranked reply pairs.

In: the SFT `model/`, the tokenizer, preference pairs (HH-RLHF or ShareGPT-style chosen/rejected).
Out: `model/`, `history.json`, `loss_curve.png`, and held-out preference accuracy before and after.
DPO (Rafailov et al., 2023): loss = -log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r))))
with the SFT model, frozen, as the reference. Run alone: `gptflow align --model DIR --tokenizer DIR`.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from models.checkpoint import load_model, save_model
from tasks.bpe import load_tokenizer
from tasks.chat import IGNORE, read_preferences, render
from tasks.configs import AlignConfig
from tasks.pretrain import plot_loss
from tasks.sft import pad_batch
from tasks.stage import GptflowError

log = logging.getLogger(__name__)


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


def align_dpo(cfg: AlignConfig, model_dir: Path, tokenizer_dir: Path, data: Path, out_dir: Path) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    policy, ref = load_model(model_dir), load_model(model_dir)
    ref.eval().requires_grad_(False)
    tok = load_tokenizer(tokenizer_dir)
    pad_id = tok.token_to_id("<|pad|>")
    pairs = read_preferences(data)
    random.Random(cfg.seed).shuffle(pairs)
    pairs = pairs[: cfg.max_pairs]
    encoded = encode_pairs(pairs, tok, policy.config.block_size)
    n_val = max(1, int(len(encoded) * cfg.val_fraction))
    val, train = encoded[:n_val], encoded[n_val:]
    if not train:
        raise GptflowError(f"{data}: too few usable preference pairs ({len(encoded)})")
    before = preference_metrics(policy, ref, val, pad_id, cfg.beta, cfg.batch_size)
    opt = policy.configure_optimizer(cfg.lr, 0.0)
    rng = random.Random(cfg.seed)
    history: dict[str, list] = {"train": [], "val": []}
    policy.train()
    for step in range(cfg.steps):
        loss, acc, margin = dpo_batch(policy, ref, rng.sample(train, min(cfg.batch_size, len(train))), pad_id, cfg.beta)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        history["train"].append([step + 1, loss.item()])
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            print(f"[align] step {step + 1}/{cfg.steps} dpo_loss {loss.item():.4f} acc {acc.item():.2f} "
                  f"margin {margin.item():.4f}", flush=True)
    after = preference_metrics(policy, ref, val, pad_id, cfg.beta, cfg.batch_size)
    history["val"].append([cfg.steps, after["dpo_loss"]])
    save_model(policy, out_dir / "model")
    (out_dir / "history.json").write_text(json.dumps(history))
    plot_loss(history, out_dir / "loss_curve.png", "DPO")
    return {
        "counts": {"pairs": len(pairs), "kept": len(encoded), "dropped_truncated": len(pairs) - len(encoded),
                   "train": len(train), "val": len(val)},
        "metrics": {**{f"align/val_{k}_before": v for k, v in before.items()},
                    **{f"align/val_{k}_after": v for k, v in after.items()},
                    "align/final_train_loss": history["train"][-1][1]},
        "outputs": {"model": out_dir / "model", "loss_curve": out_dir / "loss_curve.png"},
    }
