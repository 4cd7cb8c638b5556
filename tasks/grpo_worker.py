"""What GRPO adds to the shared Ray Train worker loop (`tasks/train_worker.py`): batches that are sampled, not read.

Each optimizer step, every rank draws `batch_size` prompts per micro-batch, samples `group_size` responses to
each with the KV cache (`models.generate`) from its own copy of the policy, scores them with the checker
(`tasks.verifiable.reward`) and turns the rewards into group-normalised advantages; the log-probabilities of the
policy that sampled them ("old") and of the frozen reference are computed then, once. `loss` is the GRPO loss
(`tasks.grpo_loss`) of one micro-batch under the current policy. With `iterations` > 1 the same samples serve that
many optimizer steps (the clip then matters).

Exact resume: the prompts and the sampling seeds of step s on rank r are a function of (seed, s, r), and a
resumed run starts at a multiple of `iterations` (GRPOConfig checks `ckpt_every`), so it samples what the killed
run would have sampled. Rollouts run on `w.raw` (no DDP hooks, no collective), the loss on `w.model`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.grpo import GRPOConfig
from tasks.grpo_loss import group_advantages, grpo_loss, token_logps
from tasks.refs import RunLink
from tasks.stage import GptflowError
from tasks.train_worker import Worker, run_loop, setup_worker
from tasks.verifiable import VerifiablePrompt, reward

# sums kept between log steps, all-reduced over ranks at the log step
_STATS = ("reward", "correct", "samples", "response_tokens", "kl", "clipped", "tokens", "rollout_tokens",
          "rollout_seconds")


def policy_model(base: Path, device: torch.device) -> torch.nn.Module:
    """The SFT model with dropout off: old, reference and current log-probabilities must come from the same
    function for the ratio to be 1 on fresh samples (the saved config keeps the model's own dropout)."""
    from models.checkpoint import load_config, load_weights
    from models.gpt import GPT

    model = GPT(load_config(base).model_copy(update={"dropout": 0.0}))
    load_weights(model, base)
    return model.to(device)


def right_pad(seqs: list[list[int]], starts: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs x (N, T-1), targets y (N, T-1) and a mask (N, T-1) that is 1 where the target is a sampled token
    (from `starts[i]`, the prompt's length, on); right padding keeps every row's positions from 0."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T - 1)
    for i, (s, start) in enumerate(zip(seqs, starts, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, start - 1 : len(s) - 1] = 1.0
    return ids[:, :-1], ids[:, 1:], mask


class GRPOBatches:
    """Groups of sampled responses to the task's prompts, scored by code; held-out greedy accuracy."""

    def __init__(self, cfg: GRPOConfig, base: Path, prompts_file: Path, tokenizer: Path, device: torch.device):
        from tasks.bpe import load_tokenizer

        data = json.loads(prompts_file.read_text())
        self.train, self.val = data["train"], data["val"]  # {"question", "answer", "ids", "answer_ids"}
        self.end_id, self.pad_id = data["end_id"], data["pad_id"]
        self.tok = load_tokenizer(tokenizer)
        self.cfg = cfg
        self.ref = policy_model(base, device).eval().requires_grad_(False)
        self.stats = torch.zeros(len(_STATS), dtype=torch.float64, device=device)
        self.rollouts: tuple[int, list[dict[str, torch.Tensor]]] | None = None  # (the step they were sampled at, micro-batches)
        self.done = 0  # steps done: the step an evaluation belongs to
        self.rank = 0

    def _add(self, **values: float | torch.Tensor) -> None:
        for k, v in values.items():
            self.stats[_STATS.index(k)] += v

    # ------------------------------------------------------------ rollouts

    def micro_batches(self, w: Worker, step: int) -> list[dict[str, torch.Tensor]]:
        first = step - step % self.cfg.iterations  # the step whose samples this step trains on
        if self.rollouts is None or self.rollouts[0] != first:
            self.rollouts = (first, [self._rollout(w, first, m) for m in range(w.accum)])
        self.done, self.rank = step + 1, w.rank
        return self.rollouts[1]

    def _rollout(self, w: Worker, step: int, micro: int) -> dict[str, torch.Tensor]:
        """One micro-batch: `batch_size` prompts x `group_size` samples, their rewards and advantages, and the
        old and reference log-probabilities of every sampled token."""
        from models.generate import generate

        cfg, G = self.cfg, self.cfg.group_size
        rng = np.random.default_rng([cfg.seed, step, w.rank, micro])
        picked = [self.train[i] for i in rng.integers(0, len(self.train), cfg.batch_size)]
        prompts = [p["ids"] for p in picked for _ in range(G)]  # a prompt's G samples consecutive
        start = time.perf_counter()
        responses = generate(w.raw, prompts, cfg.max_new_tokens, temperature=cfg.temperature, stop_ids=[self.end_id],
                             seed=int(rng.integers(2**31)))
        seconds = time.perf_counter() - start
        rewards = torch.tensor([reward(VerifiablePrompt(question=p["question"], answer=p["answer"]),
                                       self.tok.decode(r), cfg.format_reward)
                                for p, r in zip([p for p in picked for _ in range(G)], responses, strict=True)])
        if not torch.isfinite(rewards).all():
            raise GptflowError(f"grpo: a non-finite reward at step {step} on rank {w.rank}: {rewards.tolist()}")
        # a response that stopped at <|end|> (fewer tokens than the limit) is trained on with its <|end|>
        seqs = [p + r + ([self.end_id] if len(r) < cfg.max_new_tokens else []) for p, r in zip(prompts, responses, strict=True)]
        x, y, mask = (t.to(w.device) for t in right_pad(seqs, [len(p) for p in prompts], self.pad_id))
        with torch.no_grad(), w.amp:
            old = token_logps(w.raw(x)[0], y)
            ref = token_logps(self.ref(x)[0], y)
        correct = float((rewards == 1.0).sum())
        self._add(reward=float(rewards.sum()), correct=correct, samples=len(seqs), response_tokens=float(mask.sum()),
                  rollout_tokens=sum(len(r) for r in responses), rollout_seconds=seconds)
        adv = group_advantages(rewards, G, cfg.scale_rewards).to(w.device)
        return {"x": x, "y": y, "mask": mask, "old": old, "ref": ref, "adv": adv}

    def loss(self, model: torch.nn.Module, micro: dict[str, torch.Tensor]) -> torch.Tensor:
        """This micro-batch's share of the step's loss (1 / micro-batches; DDP averages the ranks)."""
        cfg = self.cfg
        logps = token_logps(model(micro["x"])[0], micro["y"])
        loss, stats = grpo_loss(logps, micro["old"], micro["ref"], micro["adv"], micro["mask"], cfg.clip_eps,
                                cfg.beta, cfg.aggregation)
        if not torch.isfinite(loss):
            raise GptflowError(f"grpo: the loss is {loss.item()} at step {self.done} on rank {self.rank}; stopping "
                               "before it corrupts the policy")
        self._add(kl=stats["kl"], clipped=stats["clipped"], tokens=stats["tokens"])
        return loss / len(self.rollouts[1])

    def step_metrics(self, w: Worker) -> dict[str, float]:
        """Means since the last log step over every rank's samples (a collective call); kept in the history."""
        s = self.stats.clone()
        if w.world > 1:
            torch.distributed.all_reduce(s)
        s = dict(zip(_STATS, s.tolist(), strict=True))
        self.stats.zero_()
        n, tokens = max(s["samples"], 1), max(s["tokens"], 1)
        metrics = {"grpo/reward": s["reward"] / n, "grpo/accuracy": s["correct"] / n, "grpo/kl": s["kl"] / tokens,
                   "grpo/clip_fraction": s["clipped"] / tokens, "grpo/response_length": s["response_tokens"] / n,
                   "grpo/rollout_tokens_per_s": s["rollout_tokens"] / max(s["rollout_seconds"] / w.world, 1e-9)}
        w.history.setdefault("grpo", []).append({"step": self.done, **metrics})
        return metrics

    # ------------------------------------------------------------ held-out

    def evaluate(self, w: Worker) -> dict[str, float]:
        """Greedy accuracy on the held-out prompts, and the loss of their right answers (nats per answer token):
        each rank takes every world-th prompt; the sums are all-reduced (a collective call)."""
        from models.generate import generate

        mine = self.val[w.rank :: w.world]
        sums = torch.zeros(4, dtype=torch.float64, device=w.device)  # correct, prompts, answer nll, answer tokens
        if mine:
            answers = generate(w.raw, [p["ids"] for p in mine], self.cfg.max_new_tokens, temperature=0.0,
                               stop_ids=[self.end_id])
            sums[0] = sum(reward(VerifiablePrompt(question=p["question"], answer=p["answer"]), self.tok.decode(a)) == 1.0
                          for p, a in zip(mine, answers, strict=True))
            sums[1] = len(mine)
            x, y, mask = (t.to(w.device) for t in right_pad([p["ids"] + p["answer_ids"] for p in mine],
                                                            [len(p["ids"]) for p in mine], self.pad_id))
            with torch.no_grad(), w.amp:
                logps = token_logps(w.raw(x)[0], y)
            sums[2], sums[3] = -(logps * mask).sum(), mask.sum()
        if w.world > 1:
            torch.distributed.all_reduce(sums)
        acc, loss = (sums[0] / sums[1]).item(), (sums[2] / sums[3]).item()
        w.history.setdefault("val_accuracy", []).append([self.done, acc])
        return {"val/loss": loss, "val/accuracy": acc}


def grpo_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's function on every GRPO worker. `config`: {"cfg": the GRPOConfig as JSON, "base": the SFT model
    folder, "prompts": the prompts file the driver wrote, "tokenizer": its folder, "run": a `RunLink` as a dict,
    "progress": the driver's progress queue}."""
    from models.checkpoint import load_config

    cfg = GRPOConfig.model_validate(config["cfg"])
    base = Path(config["base"])
    w = setup_worker(cfg, "grpo", lambda device: policy_model(base, device), load_config(base), cfg.grad_accum)
    data = GRPOBatches(cfg, base, Path(config["prompts"]), Path(config["tokenizer"]), w.device)
    run_loop(w, data, RunLink.model_validate(config.get("run") or {}), config.get("progress"), eval_first=True)

