"""What PPO adds to the shared Ray Train worker loop (`tasks/train_worker.py`): a policy with a value head
(`models/value.py`) started from the SFT model, a frozen copy of the SFT model as the KL reference, rollouts
sampled with the KV cache, and the clipped PPO loss on minibatches of them (`tasks/ppo_loss.py`).

Step s belongs to iteration s // (ppo_epochs * minibatches). At an iteration's first step each rank samples its
`batch_size * minibatches` prompts and responses with a generator seeded by (seed, iteration, rank), scores them,
and fixes the rollout's log-probs, values, rewards and advantages; the iteration's steps then walk its minibatches
in an order drawn from (seed, iteration, epoch, rank). Checkpoints fall between iterations only (PPOConfig checks
it) and hold the adaptive KL coefficient and the reward statistics in the history, so a resumed run samples what
the killed one would have sampled.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.ppo import PPOConfig, Scorer, make_scorer
from tasks.ppo_loss import (
    AdaptiveKL,
    RunningMoments,
    entropy,
    explained_variance,
    gae,
    kl_rewards,
    masked_mean,
    policy_loss,
    token_logprobs,
    value_loss,
    whiten,
)
from tasks.refs import RunLink
from tasks.stage import GptflowError
from tasks.train_worker import Worker, run_loop, setup_worker


@dataclass
class Rollouts:
    """One rank's rollout batch: prompt + response rows (B, T) right-padded, and per response token (B, R) where
    its logits sit in the row (`pos`), the token, the mask and what PPO fixes at sampling time."""

    seq: torch.Tensor
    pos: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    old_logp: torch.Tensor | None = None
    old_values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def rows(self, idx: torch.Tensor) -> Rollouts:
        return Rollouts(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device: torch.device) -> Rollouts:
    """Rows prompt + response, right-padded; the logits that predict response token j sit at len(prompt) - 1 + j."""
    rows = [p + r for p, r in zip(prompts, responses, strict=True)]
    B, T, R = len(rows), max(map(len, rows)) - 1, max(map(len, responses))
    seq = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros(B, R, dtype=torch.long)
    tokens = torch.full((B, R), pad_id, dtype=torch.long)
    mask = torch.zeros(B, R)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        seq[i, : len(p) + len(r) - 1] = torch.tensor((p + r)[:-1])  # the last token is predicted, never fed
        pos[i, : len(r)] = torch.arange(len(p) - 1, len(p) - 1 + len(r))
        tokens[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1.0
    return Rollouts(*(t.to(device) for t in (seq, pos, tokens, mask)))


def response_logits(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The logits (B, T, V) at each response token's position (B, R) -> (B, R, V)."""
    return torch.take_along_dim(logits, pos.unsqueeze(-1), dim=1)


def _global_sum(values: list[float], w: Worker) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=w.device)
    if w.world > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


class PPOBatches:
    """The PPO stage's `Batches`: rollouts at each iteration's start, one minibatch per step, the PPO loss."""

    def __init__(self, cfg: PPOConfig, prompts: dict[str, Any], ref: torch.nn.Module, score: Scorer):
        self.cfg, self.ref, self.score = cfg, ref, score
        self.train, self.val, self.ptx = prompts["train"], prompts["val"], prompts.get("ptx", [])
        if cfg.ptx_coef > 0 and not self.ptx:
            raise GptflowError("ppo.ptx_coef > 0 but there are no PPO-ptx rows")
        self.end_id, self.pad_id = prompts["end_id"], prompts["pad_id"]
        self.iteration: int | None = None
        self.done = 0  # steps finished once the current one is: the step an evaluation belongs to
        self.rollouts: Rollouts | None = None
        self.kl: AdaptiveKL | None = None
        self.moments: RunningMoments | None = None
        self.last_rollout: dict[str, float] = {}
        self.updates: list[list[float]] = []  # per step: policy loss, value loss, entropy, clip fraction, approx KL

    # -- rollouts

    def _state(self, w: Worker) -> None:
        """The KL coefficient and reward statistics: from the checkpoint's history on resume, else fresh."""
        coef, mean, var, count = w.history.get("ppo_state", [self.cfg.kl_coef, 0.0, 1.0, 0.0])
        self.kl = AdaptiveKL(coef, self.cfg.kl_target, self.cfg.kl_horizon)
        self.moments = RunningMoments(mean, var, count)

    def sample(self, w: Worker, prompts: list[list[int]], seed: int) -> tuple[Rollouts, torch.Tensor, float]:
        """Responses to `prompts` from the policy (KV cache), closed by <|end|> when they stopped before
        `response_len`; returns the packed rollouts, the raw scores and the sampling seconds."""
        from models.generate import generate

        start = time.perf_counter()
        with w.amp:
            out = generate(w.raw, prompts, self.cfg.response_len, temperature=self.cfg.temperature,
                           stop_ids=[self.end_id], seed=seed)
        seconds = time.perf_counter() - start
        responses = [r + [self.end_id] if len(r) < self.cfg.response_len else r for r in out]
        scores = self.score(prompts, responses).to(device=w.device, dtype=torch.float32)
        if not torch.isfinite(scores).all():
            bad = int((~torch.isfinite(scores)).nonzero()[0, 0])
            raise GptflowError(f"ppo: the reward of rollout {bad} on rank {w.rank} is {scores[bad].item()} "
                               f"(prompt {prompts[bad]!r}, response {responses[bad]!r}); stopping before it reaches the policy")
        return pack(prompts, responses, self.pad_id, w.device), scores, seconds

    @torch.no_grad()
    def _logprobs(self, w: Worker, ro: Rollouts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The policy's log-probs and values, and the reference's log-probs, of the sampled tokens."""
        with w.amp:
            logits, values = w.raw(ro.seq, values=True)
            ref_logits = self.ref(ro.seq)[0]
        logp = token_logprobs(response_logits(logits, ro.pos), ro.tokens)
        ref_logp = token_logprobs(response_logits(ref_logits, ro.pos), ro.tokens)
        return logp, torch.take_along_dim(values.float(), ro.pos, dim=1), ref_logp

    def rollout(self, w: Worker, iteration: int, step: int) -> None:
        """Sample, score and fix this iteration's rollouts: rewards with the KL penalty, GAE advantages."""
        cfg = self.cfg
        if self.kl is None:
            self._state(w)
        rng = np.random.default_rng([cfg.seed, iteration, w.rank])
        n = cfg.batch_size * cfg.minibatches
        picks = rng.choice(len(self.train), size=n, replace=len(self.train) < n)
        ro, scores, seconds = self.sample(w, [self.train[i] for i in picks], int(rng.integers(2**31)))
        ro.old_logp, ro.old_values, ref_logp = self._logprobs(w, ro)
        tot = _global_sum([scores.sum().item(), (scores**2).sum().item(), n], w)  # over every rank's rollouts
        mean = tot[0] / tot[2]
        if cfg.normalize_reward:
            self.moments.update(mean, max(tot[1] / tot[2] - mean**2, 0.0), int(tot[2]))
            scores_n = self.moments.normalise(scores)
        else:
            scores_n = scores
        rewards, kl = kl_rewards(scores_n, ro.old_logp, ref_logp, ro.mask, self.kl.coef)
        adv, ro.returns = gae(rewards, ro.old_values, ro.mask, cfg.gamma, cfg.lam)
        ro.advantages = whiten(adv, ro.mask) if cfg.whiten_advantages else adv
        tokens = ro.mask.sum().item()
        kl_sum, tok_sum, ev = _global_sum([kl.sum().item(), tokens, explained_variance(ro.old_values, ro.returns, ro.mask)], w)
        entry = {"step": step, "reward": mean, "kl": kl_sum / tot[2], "kl_coef": self.kl.coef,
                 "response_len": tok_sum / tot[2], "explained_variance": ev / w.world}
        self.kl.update(entry["kl"], int(tot[2]))
        w.history.setdefault("rollout", []).append(entry)
        w.history["ppo_state"] = [self.kl.coef, *self.moments.state()]
        self.last_rollout = {**entry, "tokens_per_s": tokens * w.world / seconds}
        self.rollouts, self.iteration = ro, iteration

    # -- the Batches protocol

    def micro_batches(self, w: Worker, step: int) -> list[tuple[Rollouts, tuple[torch.Tensor, torch.Tensor] | None]]:
        """The step's minibatch of this iteration's rollouts, and PPO-ptx's (x, y) rows when ptx_coef > 0."""
        cfg = self.cfg
        iteration, k = divmod(step, cfg.steps_per_iteration)
        self.done = step + 1
        if self.iteration != iteration:
            self.rollout(w, iteration, step)
        epoch, mb = divmod(k, cfg.minibatches)
        order = np.random.default_rng([cfg.seed, iteration, epoch, w.rank]).permutation(cfg.batch_size * cfg.minibatches)
        rows = torch.from_numpy(order[mb * cfg.batch_size : (mb + 1) * cfg.batch_size]).to(w.device)
        ptx = None
        if cfg.ptx_coef > 0:
            from tasks.sft import pad_batch

            picks = np.random.default_rng([cfg.seed, step, w.rank, 1]).choice(len(self.ptx), size=cfg.ptx_batch)
            x, y = pad_batch([(self.ptx[i], self.ptx[i]) for i in picks], self.pad_id)
            ptx = x.to(w.device), y.to(w.device)
        return [(self.rollouts.rows(rows), ptx)]

    def loss(self, model: torch.nn.Module, micro: tuple[Rollouts, tuple[torch.Tensor, torch.Tensor] | None]
             ) -> torch.Tensor:
        """The minibatch's PPO loss: clipped surrogate + vf_coef * clipped value loss - entropy_coef * entropy,
        + ptx_coef * the LM loss of the PPO-ptx rows, which join the rollouts in one forward (one DDP call); the
        extra right padding changes no earlier position's logits (causal attention)."""
        cfg = self.cfg
        ro, ptx = micro
        B, seq = ro.seq.size(0), ro.seq
        if ptx is not None:
            T = max(seq.size(1), ptx[0].size(1))
            pad = lambda t: torch.nn.functional.pad(t, (0, T - t.size(1)), value=self.pad_id)  # noqa: E731
            seq = torch.cat([pad(seq), pad(ptx[0])])  # (B + ptx_batch, T)
        all_logits, all_values = model(seq, values=True)
        logits = response_logits(all_logits[:B], ro.pos)  # (B, R, V)
        values = torch.take_along_dim(all_values[:B].float(), ro.pos, dim=1)  # (B, R)
        logp = token_logprobs(logits, ro.tokens)
        pg, clip_frac = policy_loss(logp, ro.old_logp, ro.advantages, ro.mask, cfg.clip)
        vf = value_loss(values, ro.old_values, ro.returns, ro.mask, cfg.clip_value)
        ent = masked_mean(entropy(logits), ro.mask)
        log_ratio = (logp - ro.old_logp).detach()
        approx_kl = masked_mean(log_ratio.exp() - 1 - log_ratio, ro.mask)  # k3: how far this epoch has moved
        loss = pg + cfg.vf_coef * vf - cfg.entropy_coef * ent
        lm = torch.zeros(())
        if ptx is not None:
            from models.gpt import GPT

            lm = GPT.loss(all_logits[B:, : ptx[1].size(1)], ptx[1])
            loss = loss + cfg.ptx_coef * lm
        self.updates.append([t.item() for t in (pg, vf, ent, clip_frac, approx_kl, lm)])
        if not torch.isfinite(loss):
            raise GptflowError(f"ppo: the loss is {loss.item()} (policy {pg.item()}, value {vf.item()}); stopping")
        return loss

    def step_metrics(self, w: Worker) -> dict[str, float]:
        """Means since the last log step over every rank, and the latest rollout batch's numbers."""
        means = np.mean(self.updates, axis=0).tolist() if self.updates else [math.nan] * 6
        self.updates = []
        means = [v / w.world for v in _global_sum(means, w)]
        names = ("policy_loss", "value_loss", "entropy", "clip_frac", "approx_kl", "ptx_loss")
        ro = self.last_rollout
        updates = dict(zip(names, means, strict=True))
        if self.cfg.ptx_coef == 0:
            del updates["ptx_loss"]
        return {**{f"ppo/{k}": v for k, v in updates.items()},
                **{f"ppo/{k}": ro[k] for k in ("reward", "kl", "kl_coef", "response_len", "explained_variance")},
                "perf/rollout_tokens_per_s": ro["tokens_per_s"]}

    @torch.no_grad()
    def evaluate(self, w: Worker) -> dict[str, float]:
        """Mean score and KL (nats per response) on the held-out prompts, sampled with a fixed seed; each rank
        takes every world-th prompt. "val/loss" is minus the KL-penalised objective, score - kl_coef * KL."""
        mine = self.val[w.rank :: w.world] or self.val[:1]
        ro, scores, _ = self.sample(w, mine, w.cfg.seed + 7777)
        logp, _, ref_logp = self._logprobs(w, ro)
        kl = ((logp - ref_logp) * ro.mask).sum(1)
        reward, kl_sum, n = _global_sum([scores.sum().item(), kl.sum().item(), len(mine)], w)
        coef = self.kl.coef if self.kl is not None else self.cfg.kl_coef
        metrics = {"val/reward": reward / n, "val/kl": kl_sum / n}
        w.history.setdefault("held_out", []).append({"step": self.done, "reward": metrics["val/reward"], "kl": metrics["val/kl"]})
        return {**metrics, "val/loss": -(metrics["val/reward"] - coef * metrics["val/kl"])}


def ppo_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's function on every PPO worker. `config`: {"cfg": the PPOConfig as JSON, "sft": the SFT model
    folder, "prompts": prompts.json, "reward": the scorer's spec (`tasks.ppo.make_scorer`), "run": a `RunLink`
    as a dict, "progress": the driver's progress queue}."""
    from models.checkpoint import load_config, load_model
    from models.value import load_value_gpt

    cfg = PPOConfig.model_validate(config["cfg"])
    sft = Path(config["sft"])
    w = setup_worker(cfg, "ppo", lambda device: load_value_gpt(sft, device), load_config(sft), 1)
    ref = load_model(sft, w.device).eval().requires_grad_(False)
    score = make_scorer(config["reward"], w.device)
    data = PPOBatches(cfg, json.loads(Path(config["prompts"]).read_text()), ref, score)
    run_loop(w, data, RunLink.model_validate(config.get("run") or {}), config.get("progress"))
