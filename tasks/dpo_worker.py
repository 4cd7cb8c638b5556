"""What DPO adds to the shared Ray Train worker loop (`tasks/train_worker.py`): the pair loss, its per-step
metrics (implicit rewards of the chosen and rejected answers, their margin, the reward accuracy) and the
held-out preference metrics; and the one pass of the frozen reference over the pairs, run in the driver.

Data order: the pairs of step s on rank r are a function of (seed, s, r) through one permutation per epoch, so a
resumed run draws exactly what the killed one would have drawn. A micro-batch is 2B rows, the B chosen answers
then the B rejected ones, padded to the longest of them.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tasks.chat import IGNORE
from tasks.dpo import DPOConfig
from tasks.refs import RunLink
from tasks.stage import GptflowError
from tasks.train_worker import Worker, run_loop, setup_worker

# ---------------------------------------------------------------- the loss


def sequence_logps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the log-probabilities of each row's labelled (answer) tokens, and their number: (B,), (B,)."""
    logits = model(x)[0]  # (B, T, vocab)
    mask = y != IGNORE
    logp = torch.gather(F.log_softmax(logits.float(), dim=-1), 2, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (logp * mask).sum(-1), mask.sum(-1)


def dpo_loss(policy: torch.Tensor, ref: torch.Tensor, n_tokens: torch.Tensor, beta: float, kind: str = "sigmoid",
             length_normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss and the implicit rewards beta * s of the chosen and rejected answers, from (B, 2) summed
    log-probabilities of the policy and the reference (column 0 chosen, 1 rejected) and (B, 2) answer lengths.

    s = log pi - log ref, per token when `length_normalize`; delta = s_chosen - s_rejected.
    sigmoid: -log sigmoid(beta * delta); ipo: (delta - 1 / (2 beta))^2.
    """
    s = policy - ref  # (B, 2)
    if length_normalize:
        s = s / n_tokens.clamp(min=1)
    delta = s[:, 0] - s[:, 1]
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif kind == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss '{kind}': sigmoid or ipo")
    rewards = beta * s.detach()
    return losses, rewards[:, 0], rewards[:, 1]


# ---------------------------------------------------------------- the pairs


class PairArrays:
    """One split's encoded pairs (`tasks.dpo.save_pairs`) and the reference's summed log-probs, memory-mapped."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.ids = np.load(folder / "ids.npy", mmap_mode="r")  # (N, 2, L)
        self.labels = np.load(folder / "labels.npy", mmap_mode="r")
        self.lengths = np.load(folder / "lengths.npy")  # (N, 2)
        self.n = len(self.lengths)
        ref = folder / "ref_logps.npy"
        self.ref = np.load(ref) if ref.exists() else None  # (N, 2)

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, ...]:
        """x, y (2B, T): the chosen rows then the rejected rows, trimmed to the longest; the reference's
        log-probs (B, 2) (zeros before they are stored); the answers' token counts (B, 2)."""
        T = int(self.lengths[rows].max())
        ids = np.concatenate([self.ids[rows, 0, :T], self.ids[rows, 1, :T]])  # (2B, T)
        labels = np.concatenate([self.labels[rows, 0, :T], self.labels[rows, 1, :T]])
        x, y = torch.from_numpy(ids[:, :-1].astype(np.int64)), torch.from_numpy(labels[:, 1:].astype(np.int64))
        n_tokens = (y != IGNORE).sum(-1).view(2, -1).T  # (B, 2)
        ref = torch.from_numpy(self.ref[rows]) if self.ref is not None else torch.zeros(len(rows), 2, dtype=torch.float64)
        return x, y, ref.float(), n_tokens


@torch.no_grad()
def store_reference_logps(model_dir: Path, folder: Path, batch_size: int, device: str = "cpu",
                          threads: int | None = None) -> np.ndarray:
    """The reference model's summed log-probabilities of every pair's two answers (bf16 autocast on GPU, as the
    workers run), saved as
    `folder/ref_logps.npy` (N, 2); the workers read them instead of holding the reference. `threads`: torch's CPU
    threads for the pass (a worker's share; on a busy machine more threads than cores spin: 12 s instead of 1.4 s
    for the tiny preset's pairs on 2 shared cores)."""
    from models.checkpoint import load_model

    device = device if device != "cuda" or torch.cuda.is_available() else "cpu"
    model = load_model(model_dir, device).eval()
    pairs = PairArrays(folder)
    out = np.zeros((pairs.n, 2), dtype=np.float64)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        for start in range(0, pairs.n, batch_size):
            rows = np.arange(start, min(start + batch_size, pairs.n))
            x, y, _, _ = pairs.batch(rows)
            with amp:  # the workers' precision: the policy's step-0 log-probs equal these
                logps, _ = sequence_logps(model, x.to(device), y.to(device))
            out[rows] = logps.view(2, -1).T.double().cpu().numpy()
    finally:
        torch.set_num_threads(before)
    if not np.isfinite(out).all():
        bad = int(np.argwhere(~np.isfinite(out))[0][0])
        raise GptflowError(f"{folder}: the reference's log-probability of pair {bad} is not finite: the model at "
                           f"{model_dir} gives NaN or inf")
    np.save(folder / "ref_logps.npy", out)
    return out


# ---------------------------------------------------------------- the worker's batches


def _stats(*values: torch.Tensor | int) -> torch.Tensor:
    """Sums to accumulate, as one float64 vector on the device of the first (one all-reduce for them all)."""
    device = values[0].device
    return torch.stack([torch.as_tensor(v, device=device).double() for v in values])


class DPOBatches:
    """Micro-batches of pairs, the DPO loss on them, and the metrics the loop logs and evaluates."""

    def __init__(self, folder: Path, cfg: DPOConfig):
        self.train, self.val = PairArrays(folder / "train"), PairArrays(folder / "val")
        self.cfg = cfg
        self._perms: dict[int, np.ndarray] = {}
        self.accum = 1  # micro-batches per step on this worker
        self.step = 0  # the step the loop is in (from 1 once it started): names the evaluation in the history
        self.sums: torch.Tensor | None = None  # since the last log step: (chosen, rejected, margin, correct, pairs)

    def _row(self, g: int) -> int:
        """The g-th pair drawn over the whole run: epoch g // n, shuffled by (seed, epoch)."""
        epoch = g // self.train.n
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.cfg.seed, epoch]).permutation(self.train.n)}
        return int(self._perms[epoch][g % self.train.n])

    def micro_batches(self, w: Worker, step: int) -> list[tuple[torch.Tensor, ...]]:
        self.step, self.accum = step + 1, w.accum
        B = self.cfg.batch_size
        first = (step * w.world + w.rank) * w.accum * B  # this rank's first draw in step `step`
        return [tuple(t.to(w.device) for t in self.train.batch(np.array([self._row(first + m * B + i) for i in range(B)])))
                for m in range(w.accum)]

    def _pair_loss(self, model: torch.nn.Module, micro: tuple[torch.Tensor, ...]):
        x, y, ref, n_tokens = micro
        logps, _ = sequence_logps(model, x, y)
        policy = logps.view(2, -1).T  # (B, 2): chosen, rejected
        losses, chosen, rejected = dpo_loss(policy, ref, n_tokens, self.cfg.beta, self.cfg.loss, self.cfg.length_normalize)
        if not torch.isfinite(losses).all():
            raise GptflowError(f"DPO loss is not finite at step {self.step} (policy log-probs {policy.tolist()}): "
                               "lower the learning rate or raise beta")
        return losses, policy, chosen, rejected

    def loss(self, model: torch.nn.Module, micro: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The micro-batch's share of the step's loss: its mean over pairs / accum (DDP averages over ranks)."""
        losses, _, chosen, rejected = self._pair_loss(model, micro)
        sums = _stats(chosen.sum(), rejected.sum(), (chosen - rejected).sum(), (chosen > rejected).sum(), len(losses))
        self.sums = sums if self.sums is None else self.sums + sums
        return losses.mean() / self.accum

    def step_metrics(self, w: Worker) -> dict[str, float]:
        """Means since the last log step over every rank (a collective call), also kept in the history."""
        sums = self.sums if self.sums is not None else torch.zeros(5, dtype=torch.float64, device=w.device)
        if w.world > 1:
            torch.distributed.all_reduce(sums)
        self.sums = None
        chosen, rejected, margin, acc = (sums[:4] / sums[4].clamp(min=1)).tolist()
        w.history.setdefault("dpo", []).append([self.step, chosen, rejected, margin, acc])
        return {"dpo/chosen_reward": chosen, "dpo/rejected_reward": rejected, "dpo/margin": margin, "dpo/reward_acc": acc}

    def evaluate(self, w: Worker) -> dict[str, float]:
        """Loss, reward accuracy, margin and the policy's own preference (its score of the chosen answer above
        the rejected one's) over every held-out pair; each rank takes every world-th pair, and all ranks run the
        same number of forwards (DDP and FSDP forwards are collective)."""
        B = self.cfg.batch_size
        mine = np.arange(w.rank, self.val.n, w.world)
        n_batches = math.ceil(math.ceil(self.val.n / w.world) / B)
        sums = torch.zeros(5, dtype=torch.float64, device=w.device)  # loss, correct, margin, prefers, pairs
        w.model.eval()
        with torch.no_grad(), w.amp:
            for j in range(n_batches):
                rows = mine[j * B : (j + 1) * B]
                micro = tuple(t.to(w.device) for t in self.val.batch(rows if len(rows) else np.array([0])))
                losses, policy, chosen, rejected = self._pair_loss(w.model, micro)
                if len(rows):  # a rank short of pairs runs a dummy forward and counts nothing
                    score = policy / micro[3].clamp(min=1) if self.cfg.length_normalize else policy
                    sums += _stats(losses.sum(), (chosen > rejected).sum(), (chosen - rejected).sum(),
                                   (score[:, 0] > score[:, 1]).sum(), len(rows))
        w.model.train()
        if w.world > 1:
            torch.distributed.all_reduce(sums)
        loss, acc, margin, prefers = (sums[:4] / sums[4].clamp(min=1)).tolist()
        w.history.setdefault("val_dpo", []).append({"step": self.step, "loss": loss, "reward_acc": acc,
                                                    "margin": margin, "prefers_chosen": prefers})
        return {"val/loss": loss, "val/reward_acc": acc, "val/margin": margin, "val/prefers_chosen": prefers}


def policy_model(base: Path, device: torch.device) -> torch.nn.Module:
    """The SFT model on `device` with dropout off: the policy's log-probs at step 0 equal the reference's, as the
    loss assumes (the saved model keeps the SFT model's own dropout setting)."""
    from models.checkpoint import load_config, load_weights
    from models.gpt import GPT

    model = GPT(load_config(base).model_copy(update={"dropout": 0.0}))
    load_weights(model, base)
    return model.to(device)


def dpo_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's function on every DPO worker. `config`: {"cfg": the DPOConfig as JSON, "base": the SFT model
    folder, "pairs": the folder of encoded pairs, "run": a `RunLink` as a dict, "progress": the driver's queue}."""
    from models.checkpoint import load_config

    cfg = DPOConfig.model_validate(config["cfg"])
    base = Path(config["base"])
    data = DPOBatches(Path(config["pairs"]), cfg)
    w = setup_worker(cfg, "dpo", lambda device: policy_model(base, device), load_config(base), cfg.grad_accum)
    data.step = w.start_step
    run_loop(w, data, RunLink.model_validate(config.get("run") or {}), config.get("progress"), eval_first=True)
