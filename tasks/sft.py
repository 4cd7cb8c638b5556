"""SFT stage: supervised fine-tuning of the pretrained GPT on chat data, loss on assistant tokens only.

In: a pretrained `model/` folder, the tokenizer, a chat file (Alpaca, OpenAssistant or `messages` JSONL).
Out: `model/` (safetensors + config), `history.json`, `loss_curve.png`. Runs in the driver process on one
device (the small models of the presets need no more). Run alone: `gptflow sft --model DIR --tokenizer DIR`.

torch is imported inside the functions: the CLI, the presets and Prefect's parameter schemas import `SFTConfig`.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from infra.env import resolve_path
from tasks.chat import IGNORE, read_sft, render
from tasks.plots import plot_loss
from tasks.refs import ModelRef, TokenizerRef
from tasks.stage import GptflowError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class SFTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    data: str = Field("data/sft/alpaca_en_demo.json.gz", description="Chat data: Alpaca JSON, OpenAssistant trees or 'messages' JSONL (repo-relative or absolute).")
    max_examples: int = Field(1000, ge=1, description="Use at most this many conversations (after a seeded shuffle).")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="Conversations held out to measure validation loss.")
    steps: int = Field(100, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Conversations per step.")
    lr: float = Field(3e-4, gt=0, description="Learning rate (constant after a 10% warmup).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (0 for fine-tuning).")
    seed: int = Field(1337, description="Shuffles and samples the data.")
    log_every: int = Field(10, ge=1, description="Print and record the loss every N steps.")


def pad_batch(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (ids, labels) rows into inputs x = ids[:-1] and targets y = labels[1:] (pad targets ignored)."""
    import torch

    T = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for i, (ids, labels) in enumerate(rows):
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1])
        y[i, :n] = torch.tensor(labels[1:])
    return x, y


def load_examples(cfg: SFTConfig, data: Path, tok, block_size: int) -> tuple[list, list, dict]:
    convos = read_sft(data)
    rng = random.Random(cfg.seed)
    rng.shuffle(convos)
    convos = convos[: cfg.max_examples]
    rows = [render(c, tok, block_size) for c in convos]
    kept = [r for r in rows if any(label != IGNORE for label in r[1][1:])]
    n_val = max(1, int(len(kept) * cfg.val_fraction))
    counts = {"conversations": len(convos), "kept": len(kept), "dropped_no_assistant_tokens": len(rows) - len(kept),
              "train": len(kept) - n_val, "val": n_val}
    if len(kept) - n_val < 1:
        raise GptflowError(f"{data}: too few usable conversations ({len(kept)})")
    return kept[n_val:], kept[:n_val], counts


def mean_loss(model, rows, pad_id: int, batch_size: int) -> float:
    """Loss per assistant token over `rows`, in evaluation mode and without gradients."""
    import torch

    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            x, y = pad_batch(rows[i : i + batch_size], pad_id)
            k = int((y != IGNORE).sum())
            total += model(x, y)[1].item() * k
            n += k
    model.train()
    return total / max(n, 1)


def finetune_sft(cfg: SFTConfig, model: ModelRef, tokenizer: TokenizerRef, out_dir: Path) -> ModelRef:
    """Fine-tune `model` on `cfg.data` rendered with the chat template; save the model and its loss curve.

    Args:
        cfg: the stage's config; `cfg.data` is resolved as `infra.env.resolve_path` resolves a user path.
        model: the pretrained model folder.
        tokenizer: the tokenizer folder (its `<|pad|>` and chat tokens).
        out_dir: the stage folder: `model/`, `history.json`, `loss_curve.png`.

    Returns:
        The fine-tuned model folder, with the data's counts and the losses before and after.
    """
    import torch

    from models.checkpoint import load_model, save_model
    from tasks.bpe import load_tokenizer

    torch.manual_seed(cfg.seed)
    gpt = load_model(Path(model.path))
    tok = load_tokenizer(Path(tokenizer.path))
    pad_id = tok.token_to_id("<|pad|>")
    train, val, counts = load_examples(cfg, resolve_path(cfg.data), tok, gpt.config.block_size)
    history = _train(cfg, gpt, train, val, pad_id)
    save_model(gpt, out_dir / "model")
    (out_dir / "history.json").write_text(json.dumps(history))
    plot_loss(history, out_dir / "loss_curve.png", "SFT (assistant tokens)")
    metrics = {"sft/val_loss_before": history["val"][0][1], "sft/val_loss_after": history["val"][-1][1],
               "sft/final_train_loss": history["train"][-1][1]}
    return ModelRef(path=str(out_dir / "model"), counts=counts, metrics=metrics, artifacts=["loss_curve", "history"],
                    files={"model": str(out_dir / "model"), "loss_curve": str(out_dir / "loss_curve.png"),
                           "history": str(out_dir / "history.json")})


def _train(cfg: SFTConfig, model, train: list, val: list, pad_id: int) -> dict[str, list]:
    """AdamW with a linear warmup over the first 10% of steps; returns the loss history."""
    import torch

    opt = model.configure_optimizer(cfg.lr, cfg.weight_decay)
    rng = random.Random(cfg.seed)
    history: dict[str, list] = {"train": [], "val": [[0, mean_loss(model, val, pad_id, cfg.batch_size)]]}
    warmup = max(1, cfg.steps // 10)
    model.train()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / warmup)
        x, y = pad_batch(rng.sample(train, min(cfg.batch_size, len(train))), pad_id)
        loss = model(x, y)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        history["train"].append([step + 1, loss.item()])
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            log.info("sft step %d/%d loss %.4f", step + 1, cfg.steps, loss.item())
            print(f"[sft] step {step + 1}/{cfg.steps} loss {loss.item():.4f}", flush=True)
    history["val"].append([cfg.steps, mean_loss(model, val, pad_id, cfg.batch_size)])
    return history
