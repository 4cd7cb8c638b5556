"""The configs of the stages that train (pretrain, SFT, alignment), apart from their cores: the CLI, the presets
and Prefect's parameter schemas read them without importing torch. Each stage module re-exports its own."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.config import GPTConfig


class PretrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: GPTConfig = Field(description="The GPT architecture; vocab_size must hold the tokenizer's vocabulary.")
    steps: int = Field(200, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Sequences per micro-batch per worker.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step; tokens/step = workers*batch*accum*block.")
    batch_tokens: int | None = Field(
        None,
        ge=1,
        description="Tokens per optimizer step (GPT-3 at 125M: 524,288); grad_accum then follows from it as "
        "batch_tokens / (num_workers * batch_size * block_size), which must be a whole number. None: use grad_accum.",
    )
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a share of the peak (Chinchilla: 0.1).")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps.")
    schedule: Literal["cosine", "wsd"] = Field("cosine", description="Cosine decay, or warmup-stable-decay (decay over the last 20%).")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay on matrices (GPT-3: 0.1).")
    beta1: float = Field(0.9, description="AdamW beta1.")
    beta2: float = Field(0.95, description="AdamW beta2 (GPT-3: 0.95).")
    grad_clip: float = Field(1.0, ge=0, description="Global gradient-norm clip; 0 disables it.")
    seed: int = Field(1337, description="Seeds the weights and the data windows: same seed, same run.")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel ranks).")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every worker holds the whole model and optimizer. fsdp: weights, gradients and AdamW "
        "states sharded over the workers (PyTorch FSDP2, one unit per block), for models that do not fit one device.",
    )
    cpus_per_worker: int = Field(1, ge=1, description="CPUs reserved per worker (torch threads on CPU).")
    use_gpu: bool = Field(False, description="One GPU per worker; bf16 autocast on GPU.")
    compile: bool = Field(False, description="torch.compile the model.")
    log_every: int = Field(10, ge=1, description="Log metrics every N steps.")
    eval_every: int = Field(50, ge=1, description="Validation loss every N steps (and at the end).")
    eval_batches: int = Field(4, ge=1, description="Validation micro-batches per evaluation.")
    ckpt_every: int = Field(100, ge=1, description="Checkpoint every N steps (and at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk.")

    @model_validator(mode="after")
    def _check_batch_tokens(self) -> PretrainConfig:
        if self.batch_tokens is None:
            return self
        per_micro = self.num_workers * self.batch_size * self.model.block_size
        if self.batch_tokens % per_micro:
            raise ValueError(
                f"batch_tokens ({self.batch_tokens:,}) must be a multiple of num_workers * batch_size * block_size "
                f"({self.num_workers} * {self.batch_size} * {self.model.block_size} = {per_micro:,})"
            )
        if self.grad_accum not in (1, self.batch_tokens // per_micro):
            raise ValueError(f"batch_tokens ({self.batch_tokens:,}) asks for {self.batch_tokens // per_micro} "
                             f"micro-batches per step but grad_accum is {self.grad_accum}: set one of the two")
        return self

    @property
    def accum_steps(self) -> int:
        """Micro-batches per optimizer step on each worker: from batch_tokens when it is set, else grad_accum."""
        if self.batch_tokens is None:
            return self.grad_accum
        return self.batch_tokens // (self.num_workers * self.batch_size * self.model.block_size)

    @property
    def tokens_per_step(self) -> int:
        return self.num_workers * self.batch_size * self.accum_steps * self.model.block_size


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


class AlignConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["dpo"] = Field("dpo", description="Alignment method.")
    data: str = Field("data/preference/dpo_en_demo.json.gz", description="Preference pairs: HH-RLHF JSONL or ShareGPT chosen/rejected JSON.")
    max_pairs: int = Field(300, ge=2, description="Use at most this many pairs (after a seeded shuffle).")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Pairs held out to measure preference accuracy.")
    beta: float = Field(0.1, gt=0, description="DPO temperature: how far the policy may move from the reference (paper: 0.1).")
    steps: int = Field(50, ge=1, description="Optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Pairs per step.")
    lr: float = Field(1e-4, gt=0, description="Learning rate (small models tolerate more than the paper's 5e-7).")
    seed: int = Field(1337, description="Shuffles and samples the pairs.")
    log_every: int = Field(10, ge=1, description="Print and record the loss every N steps.")
