"""Presets: plain functions returning a `PipelineConfig`; variants call a base and change a few fields.

- `tiny`: the test and debug flavour. The whole pipeline on the bundled sample crawl in about 2-3 minutes on
  2 CPU cores. ~0.5M-parameter LLaMA-style GPT, context 128; 2 Ray workers x 8 sequences x 128 tokens =
  2,048 tokens per step, 80 steps = 164k tokens.
- `small`: a 13.8M-parameter model, context 256, for a workstation, on 50 WET files of a Common Crawl snapshot.
- `gpt2-124m`: GPT-2 small (12 layers, d_model 768, 12 heads, context 1024, vocab padded to 50,304) on GPUs, on
  14,100 WET files of the same snapshot.
- `shakespeare`: the pretraining quality recipe: 10 minutes of training on tiny-shakespeare's first 90 % on 2 CPU
  cores, scored in bits per byte on the last 10 % (the tokenizer and pretrain stages only).

Data for `small` and `gpt2-124m` is sized from the data stage's measured yield (flows/plan.py, CRAWL_YIELD): on the
bundled crawl sample, 86 pages kept 9,018 bytes of English text after every filter and dedup, 105 bytes a page;
at ~30,000 pages per Common Crawl file and GPT-2's 4.2 bytes per token that is ~750k tokens per WARC/WET file,
95% of them in the train split. Without access to data.commoncrawl.org, point `data.inputs` at a local copy of
the listing or your own WARC/WET files (`--set 'data.inputs=["..."]'`); the data stage stops at its first step
with that advice. The pretrain stage checks the budget before training: the schedule's tokens over the shards'
train tokens must stay within pretrain.max_passes (4).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from flows.config import PipelineConfig, TimeoutsConfig
from models.config import GPTConfig
from tasks.align import AlignConfig
from tasks.data.config import DataConfig
from tasks.dpo import DPOConfig
from tasks.evaluate import EvalConfig
from tasks.ppo import PPOConfig
from tasks.pretrain import PretrainConfig
from tasks.reward import RewardConfig
from tasks.sft import SFTConfig
from tasks.tokenizer import TokenizerConfig

PresetName = Literal["tiny", "small", "gpt2-124m", "shakespeare"]


# Common Crawl's May 2024 snapshot: its WET listing (plain text, ~0.1 GB a file, ~10x smaller than the WARC).
CC_SNAPSHOT_WET = "https://data.commoncrawl.org/crawl-data/CC-MAIN-2024-22/wet.paths.gz"


def tiny() -> PipelineConfig:
    # The bundled crawl sample + 300 C4 documents: 184,863 train tokens with the 2,048 BPE; 80 steps x 2,048 =
    # 163,840 tokens, 0.9 passes.
    vocab = 2048
    return PipelineConfig(
        preset="tiny",
        tokenizer=TokenizerConfig(vocab_size=vocab),
        pretrain=PretrainConfig(
            model=GPTConfig(arch="llama", vocab_size=vocab, block_size=128, n_layer=2, n_head=4, n_embd=128),
            steps=80, batch_size=8, lr=3e-3, warmup_steps=8, num_workers=2,
            log_every=10, eval_every=40, eval_batches=4, ckpt_every=40,
        ),
        # 2 workers x 4 packed windows x 128 tokens = 1,024 tokens (~15 conversations) per step. Conversations
        # longer than the 128-token context are skipped, not truncated: a truncated answer never shows the model
        # its closing <|end|>, and with truncation the tiny model never learned to end its turn (samples.md).
        sft=SFTConfig(max_examples=1000, steps=150, batch_size=4, lr=1e-3, warmup_steps=10, log_every=25,
                      eval_every=50, ckpt_every=150, too_long="skip"),
        # DPO: 2 workers x 4 pairs (8 rows of <= 129 tokens) per step, 20 steps over 108 training pairs (~1.5 epochs).
        # Reward model: 40 steps of 2 workers x 4 pairs; PPO against it: 16 minibatch updates = 4 rollout batches of
        # 2 workers x 16 responses of <= 32 tokens, 2 epochs of 2 minibatches each.
        align=AlignConfig(methods=("dpo", "ppo"),
                          dpo=DPOConfig(max_pairs=120, steps=20, batch_size=4, lr=1e-4, warmup_steps=2, log_every=5,
                                        eval_every=20, ckpt_every=20),
                          reward=RewardConfig(model_name="gpt-tiny-reward"),
                          ppo=PPOConfig(steps=16, log_every=4, eval_every=8, ckpt_every=8)),
        eval=EvalConfig(limit=20, batch_size=32),
        # each stage takes seconds to ~2 minutes on 2 cores, ~10x that on a machine shared by many: an hour is a
        # hang, not a slow machine
        timeouts=TimeoutsConfig(**dict.fromkeys(TimeoutsConfig.model_fields, 3600.0)),
    )


def small() -> PipelineConfig:
    # 13.8M parameters; 2 workers x 16 x 256 x 2 accum = 16,384 tokens per step, 2,000 steps = 32.8M tokens:
    # 2.4 tokens per parameter (Chinchilla's 20 would be 275M: raise steps for a compute-optimal run).
    # Data: 32.8M / (750k tokens per file x 0.95 train share) = 46 files -> 50 (~5 GB of WET), ~1 pass.
    # Compute: 89.7M FLOPs per token x 32.8M = 2.9e15 FLOPs: ~8 h at 100 GFLOP/s (a 16-core workstation CPU),
    # seconds on one H100.
    base = tiny()
    vocab = 8192
    return base.model_copy(update={
        "preset": "small",
        "data": DataConfig(inputs=[CC_SNAPSHOT_WET], max_files=50, text_sources={}),
        "tokenizer": TokenizerConfig(vocab_size=vocab),
        "pretrain": PretrainConfig(
            model=GPTConfig(arch="llama", vocab_size=vocab, block_size=256, n_layer=6, n_head=6, n_embd=384),
            steps=2000, batch_size=16, grad_accum=2, lr=1e-3, warmup_steps=100, num_workers=2,
            log_every=20, eval_every=200, ckpt_every=200,
        ),
        "sft": SFTConfig(steps=300, batch_size=8, lr=3e-4, warmup_steps=30),  # 2 x 8 x 256 = 4,096 tokens/step
        "align": AlignConfig(methods=("dpo", "ppo"),
                             dpo=DPOConfig(steps=200, batch_size=8, lr=5e-5, warmup_steps=10, eval_every=50, ckpt_every=100),
                             reward=RewardConfig(model_name="gpt-small-reward", steps=200, eval_every=50, ckpt_every=100),
                             ppo=PPOConfig(steps=200, log_every=10, eval_every=40, ckpt_every=40)),
        "eval": EvalConfig(limit=None),
        "timeouts": TimeoutsConfig(),  # a day a stage: pretraining's ~8 h on a CPU workstation with a 3x margin
    })


def gpt2_124m() -> PipelineConfig:
    # 124.5M parameters; 8 workers x 16 x 1024 x 4 accum = 524,288 tokens per step (GPT-3's 0.5M batch for this
    # size), 19,073 steps = 10.0B tokens: 80 per parameter (Chinchilla's 20: 2.5B; nanoGPT/llm.c train 10B).
    # Data: 10.0B / (750k x 0.95) = 14,035 files -> 14,100 (~1.4 TB of WET; ~16% of the snapshot), ~1 pass.
    # Compute: 855M FLOPs per token x 10B = 8.6e18 FLOPs: 0.75 h on 8 x H100 at 40% MFU (6 GPU-hours).
    base = small()
    vocab = 50304  # 50,257 rounded up to a multiple of 64 for fast matmuls
    return base.model_copy(update={
        "preset": "gpt2-124m",
        "data": base.data.model_copy(update={"max_files": 14_100}),
        "tokenizer": TokenizerConfig(source="gpt2"),  # GPT-2's own vocabulary and merges (bundled)
        "pretrain": PretrainConfig(
            model=GPTConfig(arch="gpt2", vocab_size=vocab, block_size=1024, n_layer=12, n_head=12, n_embd=768),
            steps=19073, batch_size=16, batch_tokens=524_288, lr=6e-4, warmup_steps=715, num_workers=8, use_gpu=True,
            log_every=50, eval_every=500, ckpt_every=1000, eval_batches=20,
        ),
        "align": base.align.model_copy(update={"reward": base.align.reward.model_copy(
            update={"model_name": "gpt-gpt2-124m-reward"})}),
    })


def shakespeare() -> PipelineConfig:
    # The pretraining quality recipe: 10 minutes of training on 2 CPU cores, scored in bits per byte on the held-out
    # last 10% of tiny-shakespeare (every byte once; pretrain.heldout_bpb). Two stages, not the whole pipeline:
    #   gptflow tokenizer --preset shakespeare --input data/text/tinyshakespeare.txt.gz
    #   gptflow pretrain --preset shakespeare --input <the tokenizer's shards folder>
    # 1,003,854 train characters -> ~412k tokens with a 1,024 BPE trained on them alone (val_split="tail"; 512 and
    # 2,048 measured worse). One worker with both cores (a second would halve each one's threads and add an
    # all-reduce). The clock ends the run: `steps` is set above what 10 minutes reach (~9-16k tokens/s compiled x
    # 600 s / 2,048 = ~2,600-4,700 steps), so it only sets the schedule's resolution (warmup 60/10,000 of the time);
    # ~17-20 passes over the train tokens, hence allow_repeats. torch.compile: ~28% more steps in the 10 minutes
    # (its compile time, ~15-40 s cold, counts). The best depth follows the machine's speed: compiled, 5 layers x 128
    # edged 4 (2.062 vs 2.065); eager at ~14k tokens/s 4 beat 3 and 5, at ~8.7k 3 beat 4; width 192 was far worse.
    # Muon lr 7e-3 (1e-2 and 5e-3 measured worse), the embeddings at 30x that (AdamW; 10x was 0.012 better than
    # 1x at 4 layers, 30x 0.009 better than 10x at 5 layers).
    # Dropout 0.2 on the residuals and embeddings (0.15 and 0.3 measured worse), none on the attention weights
    # (which would leave the fused attention kernel: ~30 % slower); untied embeddings (no extra compute);
    # warmup-stable-decay to 0 over the last half. The GPT-2 speedruns' qk_norm, ReLU^2 MLP and logit soft-cap 15:
    # 2.037 against 2.057 at a fixed 3,300 steps (0.005, 0.011 and 0.007 each alone), at ~3 % of the step's time;
    # transformers cannot load them (no hf/ export). And x0_mix (each block reads a learned mix of the stream and
    # the embedding, as the speedruns): 2.052 against 2.055 at a fixed 2,700 steps (what 10 minutes reach on a
    # slow day); zero-initialised projections (2.064) and value embeddings (2.065) measured worse. bf16 autocast
    # where the CPU has AMX (cpu_bf16="auto"; attention stays fp32): 2.057 at 2,700 steps (0.005 worse), but ~1.3x
    # the steps in 10 minutes: 2.039 at 3,663 steps on the clock against 2.053-2.063 at 2,352-2,759 in fp32.
    # Scored in windows every 128 tokens, so every token has at least 128 before it (64 and 32 changed the score
    # by < 0.001). Measured: README.
    vocab = 1024
    base = tiny()
    return base.model_copy(update={
        "preset": "shakespeare",
        "tokenizer": TokenizerConfig(vocab_size=vocab, val_fraction=0.1, val_split="tail"),
        "pretrain": PretrainConfig(
            model=GPTConfig(arch="llama", vocab_size=vocab, block_size=256, n_layer=5, n_head=4, n_embd=128,
                            dropout=0.2, attn_dropout=0.0, tie_embeddings=False,
                            qk_norm=True, mlp="relu2", logit_softcap=15.0, x0_mix=True),
            steps=10000, batch_size=8, lr=7e-3, embed_lr_mult=30.0, warmup_steps=60, schedule="wsd", decay_frac=0.5,
            min_lr_ratio=0.0, weight_decay=0.1, optimizer="muon", compile=True, cpu_bf16="auto", num_workers=1,
            cpus_per_worker=2,
            time_budget_s=600,
            heldout_bpb=True, heldout_stride=128, allow_repeats=True,
            log_every=25, eval_every=250, ckpt_every=250, eval_batches=8,
        ),
    })


PRESETS: dict[str, Callable[[], PipelineConfig]] = {"tiny": tiny, "small": small, "gpt2-124m": gpt2_124m,
                                                    "shakespeare": shakespeare}


def resolve(preset: str, overrides: dict | None = None) -> PipelineConfig:
    """Preset + dotted overrides, validated. Unknown presets and keys are errors that say what exists."""
    from flows.config import apply_overrides, validate
    from tasks.stage import GptflowError

    if preset not in PRESETS:
        raise GptflowError(f"unknown preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    base = PRESETS[preset]().model_dump(mode="json")
    return validate(PipelineConfig, apply_overrides(base, overrides or {}), f"config for preset '{preset}'")
