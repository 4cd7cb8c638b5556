"""Alignment stage: Direct Preference Optimization (DPO) of the SFT model on ranked reply pairs.

In: the SFT `model/`, the tokenizer, preference pairs (HH-RLHF or ShareGPT-style chosen/rejected).
Out: `model/`, `history.json`, `loss_curve.png`, and held-out preference accuracy before and after.
DPO (Rafailov et al., 2023): loss = -log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r))))
with the SFT model, frozen, as the reference; the loss lives in `tasks/dpo.py`. Run alone:
`gptflow align --model DIR --tokenizer DIR`.

torch is imported inside `align_dpo`: the CLI, the presets and Prefect's parameter schemas import `AlignConfig`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from infra.env import resolve_path
from tasks.conversations import PreferenceSource, load_pairs
from tasks.plots import plot_loss
from tasks.refs import ModelRef, TokenizerRef
from tasks.stage import GptflowError


class AlignConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    methods: tuple[Literal["dpo"], ...] = Field(
        ("dpo",), min_length=1,
        description="Alignment methods to run, each a branch from the same SFT model, evaluated side by side; the "
        "first one's model gets the registry's `candidate` alias, every one an alias of its own name.")
    data: str = Field("data/preference/dpo_en_demo.json.gz", description="Preference pairs: HH-RLHF JSONL or ShareGPT chosen/rejected JSON.")
    max_pairs: int = Field(300, ge=2, description="Use at most this many pairs (after a seeded shuffle).")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Pairs held out to measure preference accuracy.")
    beta: float = Field(0.1, gt=0, description="DPO temperature: how far the policy may move from the reference (paper: 0.1).")
    steps: int = Field(50, ge=1, description="Optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Pairs per step.")
    lr: float = Field(1e-4, gt=0, description="Learning rate (small models tolerate more than the paper's 5e-7).")
    seed: int = Field(1337, description="Shuffles and samples the pairs.")
    log_every: int = Field(10, ge=1, description="Print and record the loss every N steps.")


def align_dpo(cfg: AlignConfig, model: ModelRef, tokenizer: TokenizerRef, out_dir: Path) -> ModelRef:
    """Train `model` with DPO on `cfg.data`, itself frozen as the reference; save the model and its loss curve.

    Args:
        cfg: the stage's config; `cfg.data` is resolved as `infra.env.resolve_path` resolves a user path.
        model: the SFT model folder: the policy's start and the reference.
        tokenizer: the tokenizer folder (its `<|pad|>` and chat tokens).
        out_dir: the stage folder: `model/`, `history.json`, `loss_curve.png`.

    Returns:
        The aligned model folder, with the pairs' counts and the held-out metrics before and after.
    """
    import torch

    from models.checkpoint import load_model, save_model
    from tasks.bpe import load_tokenizer
    from tasks.dpo import encode_pairs, preference_metrics

    torch.manual_seed(cfg.seed)
    policy, ref = load_model(Path(model.path)), load_model(Path(model.path))
    ref.eval().requires_grad_(False)
    tok = load_tokenizer(Path(tokenizer.path))
    pad_id = tok.token_to_id("<|pad|>")
    data = resolve_path(cfg.data)
    pairs, data_counts = load_pairs(PreferenceSource(path=str(data)))  # drops by reason, for the manifest
    random.Random(cfg.seed).shuffle(pairs)
    pairs = pairs[: cfg.max_pairs]
    encoded = encode_pairs(pairs, tok, policy.config.block_size)
    n_val = max(1, int(len(encoded) * cfg.val_fraction))
    val, train = encoded[:n_val], encoded[n_val:]
    if not train:
        raise GptflowError(f"{data}: too few usable preference pairs ({len(encoded)})")
    before = preference_metrics(policy, ref, val, pad_id, cfg.beta, cfg.batch_size)
    history = _train(cfg, policy, ref, train, pad_id)
    after = preference_metrics(policy, ref, val, pad_id, cfg.beta, cfg.batch_size)
    history["val"].append([cfg.steps, after["dpo_loss"]])
    save_model(policy, out_dir / "model")
    (out_dir / "history.json").write_text(json.dumps(history))
    plot_loss(history, out_dir / "loss_curve.png", "DPO")
    counts = {"pairs": len(pairs), "kept": len(encoded), "dropped_truncated": len(pairs) - len(encoded),
              "train": len(train), "val": len(val), **{f"data/{k}": v for k, v in data_counts.items()}}
    metrics = {**{f"align/val_{k}_before": v for k, v in before.items()},
               **{f"align/val_{k}_after": v for k, v in after.items()},
               "align/final_train_loss": history["train"][-1][1]}
    return ModelRef(path=str(out_dir / "model"), counts=counts, metrics=metrics, artifacts=["loss_curve", "history"],
                    files={"model": str(out_dir / "model"), "loss_curve": str(out_dir / "loss_curve.png"),
                           "history": str(out_dir / "history.json")})


def _train(cfg: AlignConfig, policy, ref, train: list, pad_id: int) -> dict[str, list]:
    """`cfg.steps` DPO steps on pairs sampled from `train`; returns the loss history (no val yet)."""
    import torch

    from tasks.dpo import dpo_batch

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
    return history
