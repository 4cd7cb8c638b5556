"""PPO stage, as InstructGPT did it: the SFT policy fine-tuned against a reward on its own samples, with a
per-token KL penalty to the frozen SFT model, on Ray Train workers.

In: the SFT model, the tokenizer, prompts (the first user turn of SFT-format chat data) and a reward: the reward
model's folder (`models/reward.py`), or, for tests and demos, a toy reward of one token. Out: `model/` (the policy
as a plain GPT, safetensors + config, so eval, registry and chat load it unchanged), `value_head.safetensors`,
`history.json` (losses, and reward/KL per rollout batch), `ppo_curves.png`, `prompts.json`, Ray checkpoints under
`ray/`. Run alone: `gptflow ppo --model SFT_DIR --reward-model RM_DIR`.

One PPO iteration: every worker samples `batch_size * minibatches` responses with the KV cache, scores them,
computes rewards (score minus KL), values and GAE advantages, then takes `ppo_epochs * minibatches` optimizer
steps, one per minibatch (`tasks/ppo_worker.py`; the arithmetic is `tasks/ppo_loss.py`). Rollouts are a function
of (seed, iteration, rank) and checkpoints fall on iteration boundaries, so a killed run resumes exactly.

torch is imported inside the functions: the CLI, the presets and Prefect's parameter schemas import `PPOConfig`.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pydantic import Field, model_validator

from tasks.chat import IGNORE, render
from tasks.conversations import SFTSource, SFTSources, load_mixture
from tasks.refs import ModelRef, RunLink, TokenizerRef
from tasks.stage import GptflowError
from tasks.train_config import TrainOptions

if TYPE_CHECKING:
    import torch

    from tasks.pretrain import FitClock

Scorer = Callable[[list[list[int]], list[list[int]]], "torch.Tensor"]


class PPOConfig(TrainOptions):
    sources: SFTSources = Field(
        (SFTSource(path="data/sft/alpaca_en_demo.json.gz"),), min_length=1,
        description="Where the prompts come from: chat data in any SFT format; each conversation's turns up to its "
                    "first assistant turn are one prompt (its answer is not used).")
    max_prompts: int = Field(500, ge=2, description="Use at most this many conversations for prompts (seeded draw).")
    val_prompts: int = Field(16, ge=1, description="Prompts held out: reward and KL on them at each evaluation.")
    reward_token: str | None = Field(
        None, description="A toy reward instead of a reward model: +1 per occurrence of this token in the response "
                          "(a single token of the tokenizer, e.g. '<|end|>'). Tests and demos only.")
    response_len: int = Field(32, ge=1, description="Most tokens sampled per response (a response also ends at <|end|>).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of rollouts (InstructGPT: 1, on-policy).")
    batch_size: int = Field(8, ge=1, description="Rollouts per minibatch per worker: one optimizer step's rows.")
    minibatches: int = Field(2, ge=1, description="Minibatches per rollout batch: each worker samples batch_size * "
                                                  "minibatches responses per PPO iteration.")
    steps: int = Field(16, ge=1, description="Optimizer steps (minibatch updates); iterations = steps / (ppo_epochs * minibatches).")
    ppo_epochs: int = Field(2, ge=1, description="Passes over each rollout batch (InstructGPT/Ziegler: 4; fewer for tiny runs).")
    lr: float = Field(1e-5, gt=0, description="Peak learning rate (InstructGPT 1.3B: 9.65e-6).")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    min_lr_ratio: float = Field(1.0, ge=0, le=1, description="Final learning rate share: 1 keeps it constant, as InstructGPT.")
    clip: float = Field(0.2, gt=0, description="PPO ratio clip epsilon (Schulman et al. 2017: 0.2).")
    clip_value: float = Field(0.2, gt=0, description="Value clip: a value moves at most this far from the rollout's per minibatch.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss in the shared policy/critic loss (TRL: 0.1).")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus weight; 0 as InstructGPT (the KL penalty keeps the policy spread).")
    gamma: float = Field(1.0, gt=0, le=1, description="Discount; 1 for episodes of one response (Ziegler et al.).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda (Ziegler et al.: 0.95).")
    kl_coef: float = Field(0.05, ge=0, description="Initial coefficient of the per-token KL penalty to the SFT model "
                                                   "(InstructGPT: 0.02; Ziegler et al.: 0.1 adaptive).")
    kl_target: float | None = Field(
        None, gt=0, description="Adaptive KL (Ziegler et al.): the coefficient steers the KL per response toward this "
                                "value (their 6 nats). None: a fixed coefficient.")
    kl_horizon: int = Field(10000, ge=1, description="Adaptive KL horizon in samples (Ziegler et al.: 10000).")
    ptx_coef: float = Field(
        0.0, ge=0, description="PPO-ptx (InstructGPT section 3.6): weight of a language-modelling loss on whole "
                               "conversations of `sources` added to every minibatch's loss, against the alignment tax "
                               "(InstructGPT: 27.8, on pretraining data). 0: plain PPO.")
    ptx_batch: int = Field(4, ge=1, description="PPO-ptx rows per optimizer step per worker, drawn by (seed, step, rank).")
    normalize_reward: bool = Field(True, description="Scores to zero mean, unit variance with running statistics over every rollout so far.")
    whiten_advantages: bool = Field(True, description="Advantages to zero mean, unit variance per rollout batch.")
    eval_every: int = Field(1000, ge=1, description="Held-out reward and KL every N steps (and at the end).")
    ckpt_every: int = Field(1200, ge=1, description="Checkpoint every N steps (and at the end): a multiple of "
                                                    "ppo_epochs * minibatches, so that checkpoints fall between iterations.")
    log_every: int = Field(2, ge=1, description="Log metrics every N steps.")

    @model_validator(mode="after")
    def _check(self) -> PPOConfig:
        per_iteration = self.steps_per_iteration
        if self.ckpt_every % per_iteration:
            raise ValueError(f"ppo.ckpt_every ({self.ckpt_every}) must be a multiple of ppo_epochs * minibatches "
                             f"({per_iteration}): a checkpoint inside an iteration would lose its rollouts")
        if self.grad_accum != 1:
            raise ValueError("ppo: one optimizer step is one minibatch; raise batch_size instead of grad_accum")
        if self.strategy != "ddp":
            raise ValueError("ppo: strategy must be ddp (FSDP's forwards are collective; rollouts differ in length per rank)")
        return self

    @property
    def steps_per_iteration(self) -> int:
        return self.ppo_epochs * self.minibatches


# ---------------------------------------------------------------- rewards


def token_scorer(token_id: int) -> Scorer:
    """A toy reward: +1 per occurrence of `token_id` in each response."""
    import torch

    def score(prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        return torch.tensor([float(r.count(token_id)) for r in responses])

    return score


def reward_model_scorer(model_dir: Path, device: str | torch.device = "cpu") -> Scorer:
    """The reward model in `model_dir` (`models.reward`), read at each (prompt + response)'s last token."""
    import torch

    from models.reward import load_reward_model

    rm = load_reward_model(Path(model_dir), device)
    rm.eval()

    @torch.no_grad()
    def score(prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        rows = [p + r for p, r in zip(prompts, responses, strict=True)]
        idx = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
        for i, row in enumerate(rows):
            idx[i, : len(row)] = torch.tensor(row)
        lengths = torch.tensor([len(row) for row in rows])
        return rm(idx.to(device), lengths.to(device)).float().cpu()

    return score


def make_scorer(spec: dict[str, Any], device: str | torch.device = "cpu") -> Scorer:
    """The scorer the driver described: {"token_id": id} or {"reward_model": folder}."""
    if "token_id" in spec:
        return token_scorer(spec["token_id"])
    return reward_model_scorer(Path(spec["reward_model"]), device)


def _reward_spec(cfg: PPOConfig, reward: ModelRef | None, tok) -> dict[str, Any]:
    if reward is not None:
        return {"reward_model": str(Path(reward.path).resolve())}
    if cfg.reward_token is None:
        raise GptflowError("ppo needs a reward: a reward model (reward=...) or ppo.reward_token for a toy reward")
    ids = [tok.token_to_id(cfg.reward_token)] if tok.token_to_id(cfg.reward_token) is not None \
        else tok.encode(cfg.reward_token, add_special_tokens=False).ids
    if len(ids) != 1:
        raise GptflowError(f"ppo.reward_token {cfg.reward_token!r} is {len(ids)} tokens, not one")
    return {"token_id": ids[0]}


# ---------------------------------------------------------------- prompts


def load_prompts(cfg: PPOConfig, tok, block_size: int) -> tuple[list[list[int]], list[list[int]], list[list[int]], dict[str, Any]]:
    """Each conversation's ids up to and with its first `<|assistant|>` (system and user turns before it): the
    train and held-out prompts, the train conversations whole (cut to the context: PPO-ptx's rows), and counts.
    A prompt that leaves less than `response_len` tokens of context is skipped and counted (`prompts_too_long`);
    so is a conversation without an assistant turn."""
    convos, data_counts = load_mixture(list(cfg.sources), cfg.max_prompts, cfg.seed)
    prompts, rows, counts = [], [], {"prompts_too_long": 0, "prompts_no_assistant": 0}
    for c in convos:
        ids, labels = render(c, tok, sys.maxsize)
        start = next((i for i, label in enumerate(labels) if label != IGNORE), None)
        if start is None:
            counts["prompts_no_assistant"] += 1
        elif start + cfg.response_len > block_size:
            counts["prompts_too_long"] += 1
        else:
            prompts.append(ids[:start])
            rows.append(ids[: block_size + 1])
    names = ", ".join(s.path for s in cfg.sources)
    if len(prompts) <= cfg.val_prompts:
        raise GptflowError(f"{names}: {len(prompts)} usable prompts, need more than ppo.val_prompts={cfg.val_prompts} "
                           f"(counts: {counts})")
    counts |= {f"data/{k}": v for k, v in data_counts.items()}
    counts |= {"prompts_train": len(prompts) - cfg.val_prompts, "prompts_val": cfg.val_prompts}
    v = cfg.val_prompts
    return prompts[v:], prompts[:v], rows[v:], counts


# ---------------------------------------------------------------- the driver


def train_ppo(cfg: PPOConfig, model: ModelRef, tokenizer: TokenizerRef, out_dir: Path, run: RunLink | None = None,
              progress_file: IO[str] | None = None, reward: ModelRef | None = None) -> ModelRef:
    """Fine-tune the SFT `model` with PPO against `reward` (or the toy `cfg.reward_token`) on Ray Train workers.

    Args:
        cfg: the stage's config.
        model: the SFT model folder: the policy's start and the frozen KL reference.
        tokenizer: the tokenizer folder (chat tokens, `<|end|>`).
        out_dir: the stage folder: `model/`, `value_head.safetensors`, `history.json`, `ppo_curves.png`,
            `prompts.json`, `ray/`.
        run: the MLflow run rank 0 logs its per-step metrics to; None logs nothing.
        progress_file: where the progress bar is drawn (None: stderr, when it is a terminal).
        reward: the reward model folder; None uses `cfg.reward_token`.

    Returns:
        The policy's model folder, with the prompt counts, reward and KL at the first and last rollout batch and
        on the held-out prompts, and the fit's seconds.
    """
    from models.checkpoint import load_config
    from models.tokens import END, PAD
    from tasks.bpe import load_tokenizer
    from tasks.ppo_worker import ppo_loop_per_worker
    from tasks.pretrain import fit_and_export

    sft = Path(model.path).resolve()
    tok = load_tokenizer(Path(tokenizer.path))
    spec = _reward_spec(cfg, reward, tok)
    train, val, ptx, counts = load_prompts(cfg, tok, load_config(sft).block_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = out_dir / "prompts.json"
    prompts.write_text(json.dumps({"train": train, "val": val, "ptx": ptx if cfg.ptx_coef > 0 else [],
                                   "end_id": tok.token_to_id(END), "pad_id": tok.token_to_id(PAD)}))
    config = {"cfg": cfg.model_dump(mode="json"), "sft": str(sft), "prompts": str(prompts.resolve()),
              "reward": spec, "run": (run or RunLink()).model_dump()}
    history, _, fit = fit_and_export(ppo_loop_per_worker, config, cfg, "ppo", out_dir, progress_file,
                                         lambda d: export_policy(d, out_dir))
    plot_ppo(history, out_dir / "ppo_curves.png")
    return _model_ref(cfg, out_dir, history, counts, fit)


def export_policy(checkpoint: Path, out_dir: Path) -> dict[str, list]:
    """The policy as a plain GPT into `model/` and the value head beside it, from the last checkpoint; returns the
    history (also written to `history.json`)."""
    from safetensors.torch import save_file

    from models.checkpoint import load_config, load_state_dict, save_state_dict
    from models.value import split_value_head

    gpt, head = split_value_head(load_state_dict(checkpoint))
    save_state_dict(gpt, load_config(checkpoint), out_dir / "model")
    save_file({k: v.contiguous() for k, v in head.items()}, str(out_dir / "value_head.safetensors"))
    history = json.loads((checkpoint / "train_state.json").read_text())["history"]
    (out_dir / "history.json").write_text(json.dumps(history))
    return history


def plot_ppo(history: dict[str, list], png: Path) -> None:
    """Mean reward (raw score) and KL to the reference per rollout batch, held-out values as dots."""
    import matplotlib

    matplotlib.use("Agg")  # no display on Ray workers or CI
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    rollouts = history["rollout"]
    steps = [r["step"] for r in rollouts]
    left.plot(steps, [r["reward"] for r in rollouts], "-", label="rollouts")
    right.plot(steps, [r["kl"] for r in rollouts], "-", label="rollouts")
    held = history.get("held_out", [])
    if held:
        left.plot([h["step"] for h in held], [h["reward"] for h in held], "o", label="held-out prompts")
        right.plot([h["step"] for h in held], [h["kl"] for h in held], "o", label="held-out prompts")
    for ax, name in ((left, "mean reward (score)"), (right, "KL to the SFT model (nats/response)")):
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.legend()
    fig.suptitle("PPO")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _model_ref(cfg: PPOConfig, out_dir: Path, history: dict[str, list], counts: dict[str, Any],
               fit: FitClock) -> ModelRef:
    first, last = history["rollout"][0], history["rollout"][-1]
    held = history.get("held_out") or [{"reward": math.nan, "kl": math.nan}]
    metrics = {"ppo/reward_first": first["reward"], "ppo/reward_last": last["reward"], "ppo/kl_last": last["kl"],
               "ppo/kl_coef_last": last["kl_coef"], "ppo/val_reward": held[-1]["reward"],
               "ppo/val_kl": held[-1]["kl"], **fit.metrics("ppo")}
    files = {"model": out_dir / "model", "curves": out_dir / "ppo_curves.png", "history": out_dir / "history.json",
             "value_head": out_dir / "value_head.safetensors"}
    return ModelRef(path=str(out_dir / "model"), counts={**counts, "steps": cfg.steps,
                                                         "iterations": math.ceil(cfg.steps / cfg.steps_per_iteration)},
                    metrics=metrics, files={k: str(v) for k, v in files.items()}, artifacts=["curves", "history"])
