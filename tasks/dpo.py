"""DPO stage: Direct Preference Optimization (Rafailov et al., 2023) of the SFT model on ranked reply pairs, on
Ray Train workers.

In: the SFT `model/`, the tokenizer, preference sources (HH-RLHF, ShareGPT chosen/rejected, TRL message lists,
OpenAssistant sibling ranks; `tasks/conversations.py`). Out: `model/` (safetensors + config, the SFT model's
architecture), `history.json`, `loss_curve.png`, `margins.png`, the encoded pairs with the reference's
log-probabilities in `pairs/`, and Ray Train checkpoints under `ray/`. Run alone: `gptflow dpo --model DIR`.

The loss of a pair, with s(y) = log pi(y|x) - log ref(y|x) (summed over the answer's tokens, or averaged with
`length_normalize`) and delta = s(chosen) - s(rejected):
  sigmoid (DPO): -log sigmoid(beta * delta);   ipo (Azar et al., 2023, eq. 17): (delta - 1 / (2 beta))^2.
The reference is the SFT model, frozen; it never changes, so its log-probabilities are computed once per pair in
the driver before training and stored beside the encoded pairs (`pairs/<split>/ref_logps.npy`): the workers
hold only the policy. The workers run the loop every training stage runs (`tasks/train_worker.py`, here through
`tasks/dpo_worker.py`): DDP or FSDP, accumulation, warmup + cosine, checkpoints with exact resume.

Too long: a pair whose rendered prompt + answer is longer than the context (block_size + 1 tokens) is cut
(`too_long="truncate"`, `fit_pair`: the answers keep their first tokens, at least half the context when they are
that long, the prompt its last tokens; the answers lose their ends) or left out (`"skip"`); either way counted.
A pair whose two sides become identical once cut is left out and counted by reason, as the loader counts
identical and empty replies.

torch is imported inside the functions: the CLI, the presets and Prefect's parameter schemas import `DPOConfig`.
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from tasks.chat import IGNORE, render
from tasks.conversations import Pair, PreferenceSource, PreferenceSources, load_preference_mixture
from tasks.plots import plot_dpo, plot_loss
from tasks.refs import ModelRef, RunLink, TokenizerRef
from tasks.stage import GptflowError
from tasks.train_config import TrainOptions

if TYPE_CHECKING:
    from tasks.pretrain import FitClock


class DPOConfig(TrainOptions):
    sources: PreferenceSources = Field(
        (PreferenceSource(path="data/preference/dpo_en_demo.json.gz"),), min_length=1,
        description="Preference pairs, mixed by weight: HH-RLHF chosen/rejected dialogues, ShareGPT conversations + "
        "chosen/rejected, chosen/rejected message lists, OpenAssistant trees (sibling ranks). A path, or a list of "
        "paths, stands for sources of weight 1.")
    max_pairs: int = Field(300, ge=2, description="Use at most this many pairs (drawn by weight, seeded).")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Pairs held out to measure preference accuracy before and after.")
    beta: float = Field(0.1, gt=0, description="DPO: how far the policy may move from the reference (paper: 0.1). IPO: "
                        "the regulariser tau, the target margin being 1 / (2 tau).")
    loss: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="sigmoid: DPO's -log sigmoid(beta * delta). ipo: IPO's squared loss (delta - 1/(2 beta))^2, "
        "which does not push the margin to infinity on pairs it already ranks right (TRL's IPO averages per token: "
        "pair it with length_normalize).")
    length_normalize: bool = Field(
        False, description="Average the answer's log-probabilities over its tokens instead of summing them (SimPO/"
        "R-DPO's remedy for DPO's drift towards long answers; TRL's sigmoid_norm and ipo).")
    too_long: Literal["truncate", "skip"] = Field(
        "truncate", description="A prompt + answer longer than the context: truncate cuts the prompt's start and the "
        "answers' ends, leaving the answers at least half the context (when they are that long), skip leaves the "
        "pair out. Counted either way.")
    steps: int = Field(50, ge=1, description="Optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Pairs per micro-batch per worker (each a chosen and a rejected row).")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (small models tolerate more than the paper's 5e-7).")
    warmup_steps: int = Field(5, ge=0, description="Linear warmup steps.")
    log_every: int = Field(5, ge=1, description="Log the loss, rewards, margin and accuracy every N steps.")
    eval_every: int = Field(25, ge=1, description="Held-out loss and preference accuracy every N steps (and before and at the end).")
    ckpt_every: int = Field(50, ge=1, description="Checkpoint every N steps (and at the end).")


# ---------------------------------------------------------------- pairs


def encode_pairs(pairs: list[Pair], tok, block_size: int, too_long: str) -> tuple[list[tuple], dict[str, int]]:
    """Render prompt + chosen and prompt + rejected with the chat template (labels on the answer only), fitted to
    `block_size + 1` tokens by `too_long` (`fit_pair`); returns ((chosen ids, labels), (rejected ids, labels))
    pairs and the counts: truncated, dropped/too_long, dropped/no_answer_in_context,
    dropped/identical_after_truncation."""
    limit = block_size + 1
    counts: Counter[str] = Counter()
    out = []
    for prompt, chosen, rejected in pairs:
        n_prompt = len(render(prompt, tok, sys.maxsize)[0])
        sides = [render(prompt + [{"role": "assistant", "content": a}], tok, sys.maxsize) for a in (chosen, rejected)]
        if any(len(ids) > limit for ids, _ in sides):
            if too_long == "skip":
                counts["dropped/too_long"] += 1
                continue
            counts["truncated"] += 1
            sides = fit_pair(sides, n_prompt, limit)
        if any(all(v == IGNORE for v in labels[1:]) for _, labels in sides):
            counts["dropped/no_answer_in_context"] += 1
        elif sides[0] == sides[1]:
            counts["dropped/identical_after_truncation"] += 1  # the answers differ only past the context
        else:
            out.append(tuple(sides))
    return out, dict(counts)


def fit_pair(sides: list[tuple[list[int], list[int]]], n_prompt: int, limit: int) -> list[tuple[list[int], list[int]]]:
    """Both sides of a pair cut to `limit` tokens alike: the answers keep their first tokens, at least half the
    context when they are that long, and the shared prompt its last tokens (its start goes first: the turn the
    answers reply to stays beside them); whatever answer is still too long loses its end."""
    longest_answer = max(len(ids) for ids, _ in sides) - n_prompt
    answer_room = min(longest_answer, max(limit - n_prompt, limit // 2))
    keep = min(n_prompt, limit - answer_room)  # the prompt's last `keep` tokens
    return [(ids[n_prompt - keep :][:limit], labels[n_prompt - keep :][:limit]) for ids, labels in sides]


def save_pairs(rows: list[tuple], folder: Path, pad_id: int) -> None:
    """Encoded pairs as arrays: ids and labels (N, 2, L), right-padded (pad id, IGNORE), and lengths (N, 2);
    side 0 is the chosen answer, side 1 the rejected one."""
    L = max(len(ids) for pair in rows for ids, _ in pair)
    ids = np.full((len(rows), 2, L), pad_id, dtype=np.int32)
    labels = np.full((len(rows), 2, L), IGNORE, dtype=np.int32)
    lengths = np.zeros((len(rows), 2), dtype=np.int32)
    for i, pair in enumerate(rows):
        for side, (row_ids, row_labels) in enumerate(pair):
            ids[i, side, : len(row_ids)], labels[i, side, : len(row_labels)] = row_ids, row_labels
            lengths[i, side] = len(row_ids)
    folder.mkdir(parents=True, exist_ok=True)
    for name, a in (("ids", ids), ("labels", labels), ("lengths", lengths)):
        np.save(folder / f"{name}.npy", a)


def prepare_pairs(cfg: DPOConfig, tok, block_size: int, out: Path) -> dict[str, Any]:
    """Draw the pairs, encode them, split off the held-out ones and save both splits under `out/{train,val}`;
    returns the counts (the sources' drops by reason as `data/*`, this stage's own as the rest)."""
    from models.tokens import PAD

    pairs, data_counts = load_preference_mixture(list(cfg.sources), cfg.max_pairs, cfg.seed)
    rows, fit_counts = encode_pairs(pairs, tok, block_size, cfg.too_long)
    n_val = max(1, int(len(rows) * cfg.val_fraction))
    if len(rows) - n_val < 1:
        names = ", ".join(s.path for s in cfg.sources)
        raise GptflowError(f"{names}: too few usable preference pairs ({len(rows)} of {len(pairs)} fit the "
                           f"context of {block_size} tokens)")
    for split, part in (("val", rows[:n_val]), ("train", rows[n_val:])):
        save_pairs(part, out / split, tok.token_to_id(PAD))
    return {**{f"data/{k}": v for k, v in data_counts.items()}, "pairs": len(pairs), "kept": len(rows),
            "train": len(rows) - n_val, "val": n_val, "truncated": 0, **fit_counts}


# ---------------------------------------------------------------- the driver


def train_dpo(cfg: DPOConfig, model: ModelRef, tokenizer: TokenizerRef, out_dir: Path, run: RunLink | None = None,
              progress_file: IO[str] | None = None) -> ModelRef:
    """Train `model` with DPO (or IPO) on `cfg.sources`, itself frozen as the reference, on Ray Train workers.

    Args:
        cfg: the stage's config; local source paths are resolved as `infra.env.resolve_path` resolves a user path.
        model: the SFT model folder: the policy's start and the reference.
        tokenizer: the tokenizer folder (its `<|pad|>` and chat tokens).
        out_dir: the stage folder: `model/`, `history.json`, `loss_curve.png`, `margins.png`, `pairs/`, `ray/`.
        run: the MLflow run rank 0 logs its per-step metrics to; None logs nothing.
        progress_file: where the progress bar is drawn (None: stderr, when it is a terminal).

    Returns:
        The aligned model folder, with the pairs' counts and the held-out loss, reward accuracy, margin and the
        policy's own preference for the chosen answer, before and after.
    """
    from models.checkpoint import load_config
    from tasks.bpe import load_tokenizer
    from tasks.dpo_worker import dpo_loop_per_worker, store_reference_logps
    from tasks.pretrain import export_checkpoint, fit_and_export

    base = Path(model.path)
    tok = load_tokenizer(Path(tokenizer.path))
    counts = prepare_pairs(cfg, tok, load_config(base).block_size, out_dir / "pairs")
    start = time.perf_counter()
    for split in ("train", "val"):
        store_reference_logps(base, out_dir / "pairs" / split, cfg.batch_size, "cuda" if cfg.use_gpu else "cpu",
                              cfg.cpus_per_worker)
    ref_seconds = time.perf_counter() - start
    config = {"cfg": cfg.model_dump(mode="json"), "base": str(base.resolve()),
              "pairs": str((out_dir / "pairs").resolve()), "run": (run or RunLink()).model_dump()}
    history, final, fit = fit_and_export(dpo_loop_per_worker, config, cfg, "dpo", out_dir, progress_file,
                                             lambda d: export_checkpoint(d, out_dir))
    plot_loss(history, out_dir / "loss_curve.png", f"DPO ({cfg.loss} loss)")
    plot_dpo(history, out_dir / "margins.png", f"DPO implicit rewards (beta={cfg.beta})")
    return _model_ref(cfg, out_dir, history, counts, final, fit, ref_seconds)


def _model_ref(cfg: DPOConfig, out_dir: Path, history: dict[str, list], counts: dict[str, Any],
               final: dict[str, Any], fit: FitClock, ref_seconds: float) -> ModelRef:
    before, after = history["val_dpo"][0], history["val_dpo"][-1]
    metrics = {f"dpo/val_{k}_{when}": v for when, m in (("before", before), ("after", after))
               for k, v in m.items() if k != "step"}
    metrics |= {"dpo/final_train_loss": history["train"][-1][1], **fit.metrics("dpo"),
                "dpo/reference_seconds": ref_seconds, "dpo/tokens_per_s": final.get("perf_tokens_per_s", math.nan)}
    files = {"model": out_dir / "model", "loss_curve": out_dir / "loss_curve.png", "margins": out_dir / "margins.png",
             "history": out_dir / "history.json"}
    return ModelRef(path=str(out_dir / "model"), counts={**counts, "steps": cfg.steps}, metrics=metrics,
                    files={k: str(v) for k, v in files.items()}, artifacts=["loss_curve", "margins", "history"])
