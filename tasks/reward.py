"""Reward model stage (InstructGPT, Ouyang et al. 2022): the SFT model with a scalar head, trained on ranked reply
pairs with the pairwise Bradley-Terry loss -log sigmoid(r_chosen - r_rejected), on Ray Train workers.

In: the SFT `model/`, the tokenizer, preference pairs (HH-RLHF, the DPO pairs, OpenAssistant sibling ranks; any
layout `tasks/conversations.py` reads). Out: `model/` (`models/reward.py`: the trunk in our checkpoint format plus
`reward_head.safetensors`), `history.json`, `reward_curve.png`, the encoded pairs in `pairs/` and Ray Train
checkpoints under `ray/`. The workers run the shared loop (`tasks/train_worker.py`, here through
`tasks/reward_worker.py`): DDP or FSDP, accumulation, warmup + cosine, clipping, checkpoints with exact resume.
Held-out pairwise accuracy is measured before and after, beside the baseline that prefers the longer reply.
Run alone: `gptflow reward --model DIR --tokenizer DIR`.

A row is `<|user|>prompt<|end|><|assistant|>reply<|end|>` (the chat template); the score is read at the reply's
closing `<|end|>`. Too long for the context: the prompt loses its oldest tokens (`too_long="truncate"`, the same
cut for both replies) or the pair is skipped; a reply that alone does not fit is always skipped (a cut reply
would be scored on text whose end the model never saw). Every drop is counted by reason.

torch is imported inside the functions: the CLI, the presets and Prefect's parameter schemas import `RewardConfig`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from tasks.conversations import Pair, PreferenceSource, PreferenceSources, load_preference_mixture
from tasks.refs import ModelRef, RunLink, TokenizerRef
from tasks.stage import GptflowError
from tasks.train_config import TrainOptions

if TYPE_CHECKING:
    from tasks.pretrain import FitClock

DEFAULT_SOURCES = (PreferenceSource(path="data/preference/hh_rlhf_harmless_sample.jsonl.gz"),
                   PreferenceSource(path="data/preference/dpo_en_demo.json.gz"))


class RewardConfig(TrainOptions):
    sources: PreferenceSources = Field(
        DEFAULT_SOURCES, min_length=1,
        description="Ranked reply pairs, mixed by weight: HH-RLHF chosen/rejected dialogues, ShareGPT or TRL-style "
        "chosen/rejected, OpenAssistant trees (every better/worse pair of ranked siblings). Default: the bundled "
        "HH-RLHF harmless sample and the DPO demo pairs.")
    max_pairs: int = Field(1000, ge=2, description="Use at most this many pairs (drawn by weight, seeded).")
    val_fraction: float = Field(0.15, gt=0, lt=1, description="Pairs held out for pairwise accuracy before and after.")
    too_long: Literal["truncate", "skip"] = Field(
        "truncate", description="A pair longer than the context: truncate cuts the prompt's oldest tokens (the same "
        "for both replies; the replies are never cut), skip leaves the pair out. Counted either way.")
    model_name: str = Field("gpt-reward", description="Registered model name of the reward model in the MLflow registry.")
    steps: int = Field(40, ge=1, description="Optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Pairs per micro-batch per worker (2x as many rows: chosen, rejected).")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate (InstructGPT used 9e-6 at 6B; tiny models take more).")
    warmup_steps: int = Field(4, ge=0, description="Linear warmup steps.")
    log_every: int = Field(5, ge=1, description="Log metrics every N steps.")
    eval_every: int = Field(20, ge=1, description="Held-out accuracy every N steps (and before and at the end).")
    ckpt_every: int = Field(40, ge=1, description="Checkpoint every N steps (and at the end).")


# ---------------------------------------------------------------- pairs as token rows


def encode_pairs(pairs: list[Pair], tok, block_size: int, too_long: str) -> tuple[list[tuple], dict[str, int]]:
    """(chosen row, rejected row, chosen reply tokens, rejected reply tokens) of each pair that fits the context
    by the module's rule, and the counts: `truncated_prompt`, `dropped/too_long`, `dropped/reply_too_long`."""
    from tasks.chat import render

    out, counts = [], {"truncated_prompt": 0, "dropped/too_long": 0, "dropped/reply_too_long": 0}
    for prompt, chosen, rejected in pairs:
        p = render(prompt, tok, sys.maxsize)[0]
        c, r = (render([{"role": "assistant", "content": a}], tok, sys.maxsize)[0] for a in (chosen, rejected))
        over = len(p) + max(len(c), len(r)) - block_size
        if over > 0 and max(len(c), len(r)) >= block_size:
            counts["dropped/reply_too_long"] += 1
            continue
        if over > 0 and too_long == "skip":
            counts["dropped/too_long"] += 1
            continue
        if over > 0:
            p = p[over:]
            counts["truncated_prompt"] += 1
        out.append((p + c, p + r, len(c), len(r)))
    return out, counts


def save_pairs(encoded: list[tuple], path: Path) -> None:
    """Rows as flat int32 arrays with their lengths (npz, no pickles): what the workers read."""
    c, r, lc, lr = zip(*encoded, strict=True)
    np.savez(path, chosen=np.concatenate(c).astype(np.int32), chosen_len=np.array([len(x) for x in c]),
             rejected=np.concatenate(r).astype(np.int32), rejected_len=np.array([len(x) for x in r]),
             chosen_reply_len=np.array(lc), rejected_reply_len=np.array(lr))


def longer_baseline(encoded: list[tuple]) -> float:
    """Pairwise accuracy of preferring the longer reply (in tokens); a tie counts half."""
    return float(np.mean([1.0 if lc > lr else 0.5 if lc == lr else 0.0 for _, _, lc, lr in encoded]))


def prepare_pairs(cfg: RewardConfig, tok, block_size: int, folder: Path) -> dict[str, Any]:
    """Draw, encode and split the pairs into `folder/{train,val}.npz` (+ `meta.json`); returns the counts."""
    from models.tokens import PAD

    pairs, data_counts = load_preference_mixture(list(cfg.sources), cfg.max_pairs, cfg.seed)
    encoded, fit_counts = encode_pairs(pairs, tok, block_size, cfg.too_long)
    n_val = max(1, int(len(encoded) * cfg.val_fraction))
    names = ", ".join(s.path for s in cfg.sources)
    if len(encoded) - n_val < 1:
        raise GptflowError(f"{names}: too few preference pairs fit the context of {block_size} tokens "
                           f"({len(encoded)} of {len(pairs)}; {fit_counts})")
    folder.mkdir(parents=True, exist_ok=True)
    val, train = encoded[:n_val], encoded[n_val:]
    save_pairs(train, folder / "train.npz")
    save_pairs(val, folder / "val.npz")
    (folder / "meta.json").write_text(json.dumps({"pad_id": tok.token_to_id(PAD), "block_size": block_size}))
    counts = {f"data/{k}": v for k, v in data_counts.items()} | fit_counts
    return counts | {"pairs": len(pairs), "kept": len(encoded), "train": len(train), "val": len(val),
                     "val_longer_baseline": longer_baseline(val)}


# ---------------------------------------------------------------- the driver


def train_reward_model(cfg: RewardConfig, model: ModelRef, tokenizer: TokenizerRef, out_dir: Path,
                       run: RunLink | None = None, progress_file: IO[str] | None = None) -> ModelRef:
    """Train a reward model from the SFT `model` on `cfg.sources`' ranked pairs, on Ray Train workers.

    Args:
        cfg: the stage's config; local source paths are resolved as `infra.env.resolve_path` resolves a user path.
        model: the SFT model folder: the trunk's start.
        tokenizer: the tokenizer folder (its `<|pad|>` and chat tokens).
        out_dir: the stage folder: `model/`, `history.json`, `reward_curve.png`, `pairs/`, `ray/`.
        run: the MLflow run rank 0 logs its per-step metrics to; None logs nothing.
        progress_file: where the progress bar is drawn (None: stderr, when it is a terminal).

    Returns:
        The reward model folder, with the pairs' counts (drops by reason) and the held-out pairwise accuracy before
        and after beside the longer-reply baseline.
    """
    from models.checkpoint import load_config
    from tasks.bpe import load_tokenizer
    from tasks.pretrain import fit_and_export
    from tasks.reward_worker import reward_loop_per_worker

    base = Path(model.path)
    block_size = load_config(base).block_size
    tok = load_tokenizer(Path(tokenizer.path))
    counts = prepare_pairs(cfg, tok, block_size, out_dir / "pairs")
    meta = {"template": "<|user|>prompt<|end|><|assistant|>reply<|end|>", "block_size": block_size,
            "too_long": cfg.too_long, "pad": "<|pad|>"}
    config = {"cfg": cfg.model_dump(mode="json"), "base": str(base.resolve()),
              "pairs": str((out_dir / "pairs").resolve()), "run": (run or RunLink()).model_dump()}
    history, final, fit = fit_and_export(reward_loop_per_worker, config, cfg, "reward", out_dir, progress_file,
                                             lambda d: _export(d, out_dir, meta))
    _plot(history, counts["val_longer_baseline"], out_dir / "reward_curve.png")
    return _model_ref(cfg, out_dir, history, counts, final, fit)


def _export(checkpoint: Path, out_dir: Path, meta: dict[str, Any]) -> dict[str, list]:
    """The reward model of the last checkpoint into `out_dir/model`, and the history, whose held-out metrics get
    the steps they were measured at (`history["held_out"]`); returns the history."""
    from models.checkpoint import load_config, load_state_dict
    from models.reward import RewardModel, load_tied, save_reward_model

    rm = RewardModel(load_config(checkpoint), meta)
    load_tied(rm, load_state_dict(checkpoint), checkpoint)
    save_reward_model(rm, out_dir / "model")
    history = json.loads((checkpoint / "train_state.json").read_text())["history"]
    # evaluate() appends its metrics as run_loop appends the loss to history["val"]: one each, in the same order
    history["held_out"] = [{"step": s, **m} for (s, _), m in zip(history["val"], history.pop("val_reward"), strict=True)]
    (out_dir / "history.json").write_text(json.dumps(history))
    return history


def _model_ref(cfg: RewardConfig, out_dir: Path, history: dict[str, list], counts: dict[str, Any],
               final: dict[str, Any], fit: FitClock) -> ModelRef:
    before, after = history["held_out"][0], history["held_out"][-1]
    metrics = {"reward/val_accuracy": after["val/accuracy"], "reward/val_accuracy_before": before["val/accuracy"],
               "reward/val_accuracy_longer_baseline": counts["val_longer_baseline"],
               "reward/val_loss": after["val/loss"], "reward/val_loss_before": before["val/loss"],
               "reward/val_margin": after["val/margin"], "reward/final_train_loss": history["train"][-1][1],
               "reward/tokens_per_s": final.get("perf_tokens_per_s", math.nan), **fit.metrics("reward")}
    files = {"model": out_dir / "model", "reward_curve": out_dir / "reward_curve.png", "history": out_dir / "history.json"}
    counts = {k: v for k, v in counts.items() if k != "val_longer_baseline"} | {"steps": cfg.steps}
    return ModelRef(path=str(out_dir / "model"), counts=counts, metrics=metrics,
                    files={k: str(v) for k, v in files.items()}, artifacts=["reward_curve", "history"])


def _plot(history: dict[str, list], baseline: float, png: Path) -> None:
    """Bradley-Terry loss (train, held-out) on the left; held-out pairwise accuracy beside the longer-reply
    baseline and chance on the right."""
    import matplotlib

    matplotlib.use("Agg")  # no display on Ray workers or CI
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    held = history["held_out"]
    left.plot(*zip(*history["train"], strict=True), "-", label="train", alpha=0.6)
    left.plot([h["step"] for h in held], [h["val/loss"] for h in held], "o-", label="held-out", markersize=3)
    left.set(xlabel="step", ylabel="-log sigmoid(r_chosen - r_rejected)")
    left.legend()
    right.plot([h["step"] for h in held], [h["val/accuracy"] for h in held], "o-", label="held-out accuracy", markersize=3)
    right.axhline(baseline, color="gray", linestyle="--", label=f"prefer the longer reply ({baseline:.3f})")
    right.axhline(0.5, color="lightgray", linestyle=":", label="chance")
    right.set(xlabel="step", ylabel="pairwise accuracy", ylim=(0, 1))
    right.legend()
    fig.suptitle("reward model (Bradley-Terry)")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
