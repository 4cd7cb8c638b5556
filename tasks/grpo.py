"""GRPO stage: reinforcement learning with a verifiable reward (Shao et al. 2024), on Ray Train workers.

In: the SFT `model/` folder, the tokenizer. Out: `model/` (safetensors + config, the SFT model's architecture),
`history.json`, `grpo_curve.png` (reward and accuracy of the sampled groups, held-out greedy accuracy),
`prompts.json` (the rendered train and held-out prompts) and Ray Train checkpoints under `ray/`. Run alone:
`gptflow grpo --model DIR --tokenizer DIR`.

The driver makes the task's prompts (`tasks/verifiable.py`: generated from the seed, or read from a JSONL file),
renders them with the chat template, skips (and counts) those too long to answer within the context, and writes
them to `prompts.json`; the workers (`tasks/grpo_worker.py`) sample groups, score them and step the policy
through the loop every training stage shares (`tasks/train_worker.py`). The math is in `tasks/grpo_loss.py`.

torch is imported inside the functions: the CLI, the presets and Prefect's parameter schemas import `GRPOConfig`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from tasks.refs import ModelRef, RunLink, TokenizerRef
from tasks.stage import GptflowError
from tasks.train_config import TrainOptions

if TYPE_CHECKING:
    from tasks.pretrain import FitClock


class GRPOConfig(TrainOptions):
    task: Literal["add", "larger"] = Field(
        "larger", description="The generated task (tasks/verifiable.py): add ('What is 3 + 4?' -> 7) or larger "
        "('Which is larger, 3 or 8?' -> 8), which a ~1M-parameter model can learn to generalise.")
    max_operand: int = Field(9, ge=1, le=999, description="Operands run over 0..max_operand; every pair is one prompt.")
    prompts_file: str | None = Field(
        None, description="A JSONL file of {'question', 'answer': <int>} records used instead of the generated task; "
        "a record without an integer answer is an error naming the file and the line.")
    val_prompts: int = Field(20, ge=1, description="Prompts held out (never trained on) for the greedy accuracy before and after.")
    group_size: int = Field(8, ge=2, description="Samples per prompt; the advantages are normalised within each group "
                            "(DeepSeekMath: 64; a small model on an easy task needs far fewer).")
    batch_size: int = Field(4, ge=1, description="Prompts per micro-batch per worker (each sampled group_size times).")
    max_new_tokens: int = Field(6, ge=1, description="Longest response sampled; one that does not end with <|end|> by then is cut (and trained on as cut).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts (1: the policy itself, as the loss assumes).")
    beta: float = Field(0.04, ge=0, description="Weight of the KL penalty to the frozen SFT model, k3 estimator per token (DeepSeekMath: 0.04).")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="Clip range of the probability ratio (PPO's 0.2).")
    scale_rewards: bool = Field(True, description="Divide each group's advantages by its std (GRPO); False: only subtract the mean (Dr. GRPO, Liu et al. 2025).")
    aggregation: Literal["sequence", "token"] = Field(
        "sequence", description="sequence: mean over each sample's tokens, then over samples (the GRPO paper, TRL's "
        "loss_type='grpo'); token: mean over every token of the micro-batch (TRL's 'bnpo'), long samples weigh more.")
    iterations: int = Field(1, ge=1, description="Optimizer steps on each batch of samples (GRPO's mu; the clip only acts "
                            "from the second); ckpt_every must be a multiple so a resumed run samples afresh.")
    format_reward: float = Field(0.0, ge=0, lt=1, description="Reward for a wrong number given alone (the format asked "
                                 "for); 1 is for the right number. 0: correctness only.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (tiny models; ~1e-6 for large ones).")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    min_lr_ratio: float = Field(1.0, ge=0, le=1, description="Final learning rate as a share of the peak (1: constant, as GRPO is usually run).")
    steps: int = Field(20, ge=1, description="Optimizer steps (tiny: 20 steps x 32 samples).")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel ranks); each samples its own groups.")
    log_every: int = Field(5, ge=1, description="Log metrics every N steps.")
    eval_every: int = Field(20, ge=1, description="Held-out greedy accuracy every N steps (also before the first and after the last).")
    ckpt_every: int = Field(20, ge=1, description="Checkpoint every N steps (and at the end).")

    @model_validator(mode="after")
    def _check(self) -> GRPOConfig:
        if self.strategy == "fsdp":
            raise ValueError("grpo runs with strategy ddp: each rank samples its own rollouts, a different number of "
                             "forwards, which FSDP's collective forwards do not allow")
        if self.ckpt_every % self.iterations:
            raise ValueError(f"ckpt_every ({self.ckpt_every}) must be a multiple of iterations ({self.iterations})")
        return self


def write_prompts(cfg: GRPOConfig, tok, block_size: int, out: Path) -> dict[str, int]:
    """The task's train and held-out prompts, rendered, into `out` (JSON); returns the counts. A prompt that leaves
    fewer than max_new_tokens of the context to answer in is skipped and counted."""
    from infra.env import resolve_path
    from models.tokens import END, PAD
    from tasks.verifiable import answer_ids, load_prompts, make_prompts, prompt_ids

    if cfg.prompts_file:
        train, val = load_prompts(resolve_path(cfg.prompts_file), cfg.val_prompts, cfg.seed)
    else:
        train, val = make_prompts(cfg.task, cfg.max_operand, cfg.val_prompts, cfg.seed)
    counts, data = {}, {"end_id": tok.token_to_id(END), "pad_id": tok.token_to_id(PAD)}
    for split, prompts in (("train", train), ("val", val)):
        rows = [{"question": p.question, "answer": p.answer, "ids": prompt_ids(p, tok), "answer_ids": answer_ids(p, tok)}
                for p in prompts]
        kept = [r for r in rows if len(r["ids"]) + max(cfg.max_new_tokens, len(r["answer_ids"])) <= block_size]
        counts |= {f"{split}_prompts": len(kept), f"{split}_skipped_too_long": len(rows) - len(kept)}
        if not kept:
            raise GptflowError(f"grpo: no {split} prompt leaves {cfg.max_new_tokens} new tokens within the context of "
                               f"{block_size} ({cfg.prompts_file or cfg.task})")
        data[split] = kept
    out.write_text(json.dumps(data))
    return counts


def train_grpo(cfg: GRPOConfig, model: ModelRef, tokenizer: TokenizerRef, out_dir: Path, run: RunLink | None = None,
               progress_file: IO[str] | None = None) -> ModelRef:
    """Train `model` (the SFT model) with GRPO on the verifiable task, on Ray Train workers.

    Args:
        cfg: the stage's config.
        model: the SFT model folder: the policy's start and the frozen reference.
        tokenizer: the tokenizer folder (chat tokens, `<|pad|>`).
        out_dir: the stage folder: `model/`, `history.json`, `grpo_curve.png`, `prompts.json`, `ray/`.
        run: the MLflow run rank 0 logs its per-step metrics to; None logs nothing.
        progress_file: where the progress bar is drawn (None: stderr, when it is a terminal).

    Returns:
        The trained model folder, with the prompt counts, the held-out accuracy and answer loss before and after,
        the last logged reward and KL, and the fit's seconds.
    """
    from models.checkpoint import load_config
    from tasks.bpe import load_tokenizer
    from tasks.grpo_worker import grpo_loop_per_worker
    from tasks.pretrain import export_checkpoint, fit_and_export

    base = Path(model.path)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = write_prompts(cfg, load_tokenizer(Path(tokenizer.path)), load_config(base).block_size, out_dir / "prompts.json")
    config = {"cfg": cfg.model_dump(mode="json"), "base": str(base.resolve()), "prompts": str((out_dir / "prompts.json").resolve()),
              "tokenizer": str(Path(tokenizer.path).resolve()), "run": (run or RunLink()).model_dump()}
    history, _, fit = fit_and_export(grpo_loop_per_worker, config, cfg, "grpo", out_dir, progress_file,
                                         lambda d: export_checkpoint(d, out_dir))
    plot_grpo(history, out_dir / "grpo_curve.png")
    return _model_ref(cfg, out_dir, history, counts, fit)


def plot_grpo(history: dict[str, Any], png: Path) -> None:
    """Reward and accuracy of the sampled groups per log step, and the held-out greedy accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    rows = history.get("grpo", [])
    if rows:
        ax.plot([r["step"] for r in rows], [r["grpo/reward"] for r in rows], "-", label="mean reward (samples)")
        ax.plot([r["step"] for r in rows], [r["grpo/accuracy"] for r in rows], "--", label="accuracy (samples)")
    if history.get("val_accuracy"):
        steps, acc = zip(*history["val_accuracy"], strict=True)
        ax.plot(steps, acc, "o-", label="held-out accuracy (greedy)", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("GRPO (verifiable reward)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _model_ref(cfg: GRPOConfig, out_dir: Path, history: dict[str, Any], counts: dict[str, int], fit: FitClock) -> ModelRef:
    acc, last = history["val_accuracy"], (history.get("grpo") or [{}])[-1]
    metrics = {"grpo/val_accuracy_before": acc[0][1], "grpo/val_accuracy_after": acc[-1][1],
               "grpo/val_loss_before": history["val"][0][1], "grpo/val_loss_after": history["val"][-1][1],
               "grpo/final_reward": last.get("grpo/reward", math.nan), "grpo/final_kl": last.get("grpo/kl", math.nan),
               "grpo/rollout_tokens_per_s": last.get("grpo/rollout_tokens_per_s", math.nan), **fit.metrics("grpo")}
    files = {"model": out_dir / "model", "grpo_curve": out_dir / "grpo_curve.png", "history": out_dir / "history.json",
             "prompts": out_dir / "prompts.json"}
    return ModelRef(path=str(out_dir / "model"), counts=counts | {"steps": cfg.steps}, metrics=metrics,
                    files={k: str(v) for k, v in files.items()}, artifacts=["grpo_curve", "history", "prompts"])
