"""The options every Ray Train stage shares (pretraining, SFT, and the alignment methods after them).

A stage's config subclasses `TrainOptions` and redeclares a field only to change its default or its text.
`lr_at` is the schedule they all follow. No torch here: the CLI, the presets and Prefect's schemas read it.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TrainOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(100, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Rows per micro-batch per worker.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step; tokens/step = workers*batch*accum*block.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a share of the peak (Chinchilla: 0.1).")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps.")
    schedule: Literal["cosine", "wsd"] = Field("cosine", description="Cosine decay, or warmup-stable-decay (linear decay over the last decay_frac).")
    decay_frac: float = Field(0.2, gt=0, le=1, description="wsd: share of the steps in the final linear decay.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay on matrices.")
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw",
        description="adamw: AdamW on every weight. muon: Muon on the blocks' weight matrices (their momentum "
        "orthogonalised, update scaled to AdamW's RMS so lr is shared) and AdamW on embeddings, head and norms; "
        "needs whole matrices, so not with strategy=fsdp.",
    )
    embed_lr_mult: float = Field(
        1.0, gt=0, description="The embeddings' learning rate as a multiple of lr (the head's too when tied).")
    beta1: float = Field(0.9, description="AdamW beta1.")
    beta2: float = Field(0.95, description="AdamW beta2 (GPT-3: 0.95).")
    grad_clip: float = Field(1.0, ge=0, description="Global gradient-norm clip; 0 disables it.")
    seed: int = Field(1337, description="Seeds the weights and the data order: same seed, same run.")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel ranks).")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every worker holds the whole model and optimizer. fsdp: weights, gradients and AdamW "
        "states sharded over the workers (PyTorch FSDP2, one unit per block), for models that do not fit one device.",
    )
    cpus_per_worker: int = Field(1, ge=1, description="CPUs reserved per worker (torch threads on CPU).")
    use_gpu: bool = Field(False, description="One GPU per worker; bf16 autocast on GPU.")
    cpu_bf16: Literal["off", "on", "auto"] = Field(
        "off",
        description="bf16 autocast on CPU workers (fp32 weights, optimizer and attention; Muon iterates in bf16). "
        "Pays off only on CPUs with bf16 matrix units (Intel AMX: Sapphire Rapids and later), where the shakespeare "
        "compiled step ran 1.29x faster (bench.step); elsewhere bf16 matmuls are slower than fp32. auto: on where "
        "torch finds AMX.",
    )
    compile: bool = Field(False, description="torch.compile the model.")
    log_every: int = Field(10, ge=1, description="Log metrics every N steps.")
    eval_every: int = Field(50, ge=1, description="Validation every N steps (and at the end).")
    ckpt_every: int = Field(100, ge=1, description="Checkpoint every N steps (and at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    max_failures: int = Field(
        2,
        ge=-1,
        description="Times Ray Train restarts the worker group from the last checkpoint after a worker dies (a "
        "killed process, a lost node) before the fit fails; -1: without limit, 0: never (the stage rerun resumes).",
    )

    @model_validator(mode="after")
    def _check_optimizer(self) -> TrainOptions:
        if self.optimizer == "muon" and self.strategy == "fsdp" and self.num_workers > 1:
            raise ValueError("optimizer=muon orthogonalises whole matrices, which fsdp shards: use strategy=ddp")
        return self


def lr_at(step: float, cfg: TrainOptions) -> float:
    """The learning rate of step `step` (from 0): linear warmup, then cosine or warmup-stable-decay to the floor.

    `step` may be fractional: a run on a time budget passes `elapsed / budget * steps` (`lr_at_time`).
    """
    if step < cfg.warmup_steps:
        return min(cfg.lr, cfg.lr * (step + 1) / cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_start = int(cfg.steps * (1 - cfg.decay_frac))
        if step < decay_start:
            return cfg.lr
        frac = (step - decay_start) / max(cfg.steps - decay_start, 1)
        return cfg.lr - (cfg.lr - floor) * frac
    frac = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(frac, 1.0)))


def lr_at_time(elapsed_s: float, budget_s: float, cfg: TrainOptions) -> float:
    """The learning rate on a wall-clock budget: the schedule's position is the share of the budget spent, so
    warmup takes warmup_steps/steps of the time and the decay reaches its floor when the budget runs out."""
    return lr_at(min(elapsed_s / budget_s, 1.0) * cfg.steps, cfg)
