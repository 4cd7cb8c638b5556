"""GRPO's share of `python -m bench.rlhf`: seconds per optimizer step, split into sampling and the update.

`grpo_step_seconds` runs the stage's own code in this process, without Ray: a one-rank `Worker`, the stage's
`GRPOBatches` (rollouts with the KV cache, the checker, old and reference log-probabilities) and the shared
`train_step` with GRPO's loss, so the numbers are what a Ray worker spends per step, less Ray. The first
`warmup` steps are not timed. Measures and prints, asserts nothing.

`trl_grpo_step_seconds` runs the same model (exported to `transformers`), prompts, checker and batch through TRL
1.16's `GRPOTrainer`: the measurement behind running our own loop on Ray Train rather than TRL's trainer.

Run alone: `python -m bench.rlhf_grpo [--steps 3] [--layers 2 --embd 64]` (a random model on a BPE trained on
the task's texts; with a random model the responses run to max_new_tokens, the slowest case).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from tasks.grpo import GRPOConfig


def grpo_step_seconds(model_dir: Path, tokenizer_dir: Path, cfg: GRPOConfig, steps: int = 3, warmup: int = 1) -> dict:
    """Mean seconds per GRPO optimizer step of `model_dir` (our model folder) on the task of `cfg`, and how much of
    it is sampling; also the rollout tokens/s and samples per step."""
    from models.checkpoint import load_config
    from tasks.bpe import load_tokenizer
    from tasks.grpo_worker import GRPOBatches, policy_model
    from tasks.train_worker import Worker, train_step

    device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    raw = policy_model(model_dir, device)
    opt = raw.configure_optimizer(cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    w = Worker(cfg, 0, 1, device, raw, raw, opt, amp, cfg.grad_accum, load_config(model_dir), "grpo")
    with tempfile.TemporaryDirectory() as tmp:
        from tasks.grpo import write_prompts

        write_prompts(cfg, load_tokenizer(tokenizer_dir), raw.config.block_size, Path(tmp) / "prompts.json")
        data = GRPOBatches(cfg, model_dir, Path(tmp) / "prompts.json", tokenizer_dir, device)
    total = rollout = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            data.stats.zero_()
        start = time.perf_counter()
        batches = data.micro_batches(w, step)  # sampling and scoring
        sampled = time.perf_counter()
        train_step(w.model, opt, batches, w.accum, cfg.grad_clip, device, amp, False, data.loss)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            total, rollout = total + time.perf_counter() - start, rollout + sampled - start
    metrics = data.step_metrics(w)
    return {"method": "grpo", "seconds_per_step": total / steps, "rollout_share": rollout / total,
            "samples_per_step": cfg.batch_size * cfg.group_size * cfg.grad_accum,
            "rollout_tokens_per_s": metrics["grpo/rollout_tokens_per_s"], "reward": metrics["grpo/reward"]}


def trl_grpo_step_seconds(model_dir: Path, tokenizer_dir: Path, cfg: GRPOConfig, steps: int = 3, warmup: int = 1) -> dict:
    """The same model (exported to `transformers`' Llama/GPT-2), prompts, checker and batch through TRL 1.16's
    `GRPOTrainer` on this process's CPU (or GPU): mean seconds per optimizer step after `warmup` steps, timed by a
    callback around each step."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    from models.export import export_hf
    from models.tokens import END
    from tasks.verifiable import VerifiablePrompt, make_prompts, reward

    train, _ = make_prompts(cfg.task, cfg.max_operand, cfg.val_prompts, cfg.seed)

    def check(prompts, completions, answer, **_):
        return [reward(VerifiablePrompt(question="q", answer=a), c[0]["content"], cfg.format_reward)
                for c, a in zip(completions, answer, strict=True)]

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model_dir, tokenizer_dir / "tokenizer.json", Path(tmp) / "hf")
        tok = AutoTokenizer.from_pretrained(Path(tmp) / "hf")
        tok.pad_token = "<|pad|>"
        data = Dataset.from_list([{"prompt": [{"role": "user", "content": p.question}], "answer": p.answer} for p in train])
        args = TRLConfig(output_dir=str(Path(tmp) / "out"), per_device_train_batch_size=cfg.batch_size * cfg.group_size,
                         num_generations=cfg.group_size, max_completion_length=cfg.max_new_tokens, beta=cfg.beta,
                         epsilon=cfg.clip_eps, learning_rate=cfg.lr, max_steps=warmup + steps, report_to=[],
                         save_strategy="no", logging_steps=1000, use_cpu=not cfg.use_gpu, seed=cfg.seed,
                         generation_kwargs={"eos_token_id": tok.convert_tokens_to_ids(END)})
        trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf"), reward_funcs=[check],
                              args=args, train_dataset=data, processing_class=tok, callbacks=[Clock()])
        trainer.train()
    return {"method": "grpo (TRL GRPOTrainer)", "seconds_per_step": sum(times[warmup:]) / steps,
            "samples_per_step": cfg.batch_size * cfg.group_size}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--embd", type=int, default=64)
    p.add_argument("--group-size", type=int, default=8)
    args = p.parse_args(argv)
    from models.checkpoint import save_model
    from models.gpt import GPT, GPTConfig
    from tasks.bpe import save_tokenizer, train_bpe
    from tasks.tokenizer import TokenizerConfig
    from tasks.verifiable import make_prompts

    cfg = GRPOConfig(group_size=args.group_size)
    torch.set_num_threads(cfg.cpus_per_worker)
    with tempfile.TemporaryDirectory() as tmp:
        train, val = make_prompts(cfg.task, cfg.max_operand, cfg.val_prompts, cfg.seed)
        tok = train_bpe(iter([f"{q.question} {q.answer}" for q in train + val] * 5), TokenizerConfig(vocab_size=300),
                        parallel=False)
        save_tokenizer(tok, Path(tmp) / "tok")
        save_model(GPT(GPTConfig(arch="llama", vocab_size=300, block_size=64, n_layer=args.layers, n_head=4,
                                 n_embd=args.embd)), Path(tmp) / "model")
        ours = grpo_step_seconds(Path(tmp) / "model", Path(tmp) / "tok", cfg, args.steps)
        trl = trl_grpo_step_seconds(Path(tmp) / "model", Path(tmp) / "tok", cfg, args.steps)
    result = {"ours": ours, "trl": trl, "trl_over_ours": trl["seconds_per_step"] / ours["seconds_per_step"]}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
