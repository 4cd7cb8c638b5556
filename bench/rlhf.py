"""RLHF benchmark: rollout tokens/s with and without the KV cache, and seconds per optimizer step of each
alignment method on the same model, in one run.

Each method is one function in `METHODS` that takes the shared `Setup` (model folder, tokenizer, prompts, sizes)
and returns its numbers. Everything runs in this process on one device, without Ray (the stages' per-step work,
not Ray Train's start-up), on one random GPT (llama style, `--layers`, `--embd`, context 256) over GPT-2's
vocabulary with our chat tokens (bundled), so that DPO reads real pairs and GRPO its generated prompts with the
same tokenizer. PPO's rollouts start from random prompts of `--prompt-len` tokens and every response runs to
`--response-len` tokens (no stop token is drawn on purpose).

Measured:
  - rollout tokens/s: new tokens of `--batch` responses over the wall time of `models.generate.generate`, with the
    KV cache (one batched forward per token) and without it (each prompt alone, the whole sequence re-run per
    token), and their ratio;
  - PPO seconds per optimizer step: one PPO iteration (rollouts with the cache, scoring, reference and value
    passes, GAE) plus its `ppo_epochs * minibatches` minibatch updates, divided by those steps; and the update
    alone (forward, backward, AdamW of one minibatch);
  - DPO seconds per optimizer step (`bench/rlhf_dpo.py`): `--batch` real pairs per step, the reference's
    log-probabilities stored beforehand as the stage does, and with a live reference model for comparison;
  - GRPO seconds per optimizer step (`bench/rlhf_grpo.py`): `--batch` / 2 generated prompts x a group of 8
    samples, and the share of it spent sampling.
Measures and prints, asserts nothing.

Run: `python -m bench.rlhf [--layers 4 --embd 128] [--out bench/results/rlhf_cpu.json]`. Measured
(`bench/results/rlhf_cpu.json`: 2 layers x 128, 16 prompts of 40 + 32 tokens, 1 thread, 2 CPU cores shared at
load ~30): 1,272 rollout tokens/s with the cache, 68 without (18.7x); PPO 0.51 s per optimizer step with its
rollouts, 0.27 s for the update alone.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from models.checkpoint import load_config, load_model, save_model
from models.generate import generate
from models.gpt import GPT, GPTConfig


@dataclass
class Setup:
    model_dir: Path
    tokenizer_dir: Path
    model_cfg: GPTConfig
    prompts: list[list[int]]
    response_len: int
    batch: int
    device: torch.device


def rollout_tokens_per_s(s: Setup, use_cache: bool) -> float:
    model = load_model(s.model_dir, s.device)
    start = time.perf_counter()
    out = generate(model, s.prompts[: s.batch], s.response_len, temperature=1.0, use_cache=use_cache, seed=0)
    return sum(map(len, out)) / (time.perf_counter() - start)


def bench_ppo(s: Setup) -> dict[str, float]:
    """One PPO iteration on a toy reward (`tasks.ppo_worker.PPOBatches`, as a Ray worker runs it), timed."""
    from models.value import load_value_gpt
    from tasks.ppo import PPOConfig, token_scorer
    from tasks.ppo_worker import PPOBatches
    from tasks.train_worker import Worker, train_step

    cfg = PPOConfig(reward_token="x", response_len=s.response_len, batch_size=s.batch // 2, minibatches=2,
                    ppo_epochs=2, num_workers=1)
    raw = load_value_gpt(s.model_dir, s.device)
    w = Worker(cfg, 0, 1, s.device, raw, raw, raw.configure_optimizer(cfg.lr, 0.0), nullcontext(), 1,
               load_config(s.model_dir))
    prompts = {"train": s.prompts, "val": s.prompts[:2], "end_id": -1, "pad_id": 0}  # -1: never stops
    data = PPOBatches(cfg, prompts, load_model(s.model_dir, s.device).eval(), token_scorer(7))
    n = cfg.steps_per_iteration
    start = time.perf_counter()
    update = 0.0
    for step in range(n):
        micro = data.micro_batches(w, step)  # the first step samples the iteration's rollouts
        t = time.perf_counter()
        train_step(w.model, w.opt, micro, 1, cfg.grad_clip, s.device, w.amp, False, data.loss)
        update += time.perf_counter() - t
    return {"ppo_s_per_step": (time.perf_counter() - start) / n, "ppo_update_s_per_step": update / n}


def bench_dpo(s: Setup) -> dict[str, float]:
    from bench.rlhf_dpo import dpo_step_seconds

    stored = dpo_step_seconds(s.model_cfg, batch_size=s.batch, steps=3, device=s.device.type)
    live = dpo_step_seconds(s.model_cfg, batch_size=s.batch, steps=3, device=s.device.type, live_reference=True)
    return {"dpo_s_per_step": stored["seconds_per_step"], "dpo_live_reference_s_per_step": live["seconds_per_step"]}


def bench_grpo(s: Setup) -> dict[str, float]:
    from bench.rlhf_grpo import grpo_step_seconds
    from tasks.grpo import GRPOConfig

    cfg = GRPOConfig(batch_size=max(1, s.batch // 2), group_size=8, num_workers=1)
    r = grpo_step_seconds(s.model_dir, s.tokenizer_dir, cfg, steps=3)
    return {"grpo_s_per_step": r["seconds_per_step"], "grpo_rollout_share": r["rollout_share"]}


METHODS: dict[str, Callable[[Setup], dict[str, float]]] = {"ppo": bench_ppo, "dpo": bench_dpo, "grpo": bench_grpo}


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--embd", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="responses per rollout batch")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--response-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    from bench.rlhf_dpo import GPT2_VOCAB_PADDED
    from tasks.bpe import load_gpt2, save_tokenizer

    cfg = GPTConfig(arch="llama", vocab_size=GPT2_VOCAB_PADDED, block_size=256, n_layer=args.layers, n_head=4,
                    n_embd=args.embd)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(8, 50000, (64, args.prompt_len), generator=g).tolist()
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_model(GPT(cfg), Path(tmp) / "model")
        save_tokenizer(load_gpt2(), Path(tmp) / "tok")
        s = Setup(Path(tmp) / "model", Path(tmp) / "tok", cfg, prompts, args.response_len, args.batch, device)
        rollout_tokens_per_s(s, True)  # warm-up
        results["rollout_tokens_per_s_cache"] = rollout_tokens_per_s(s, True)
        results["rollout_tokens_per_s_no_cache"] = rollout_tokens_per_s(s, False)
        results["kv_cache_speedup"] = results["rollout_tokens_per_s_cache"] / results["rollout_tokens_per_s_no_cache"]
        for method in METHODS.values():
            results |= method(s)
    print(f"rlhf bench: {args.layers} layers x {args.embd}, {args.batch} prompts of {args.prompt_len} + "
          f"{args.response_len} new tokens, {device}")
    for k, v in results.items():
        print(f"  {k:32s} {v:10.3f}")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **results}, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
