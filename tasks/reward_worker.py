"""What the reward model stage adds to the shared Ray Train worker loop (`tasks/train_worker.py`): the SFT model
with a new scalar head as the start (`models/reward.py`), micro-batches of pairs (chosen rows, then rejected rows,
right-padded), the Bradley-Terry loss, its per-step metrics and held-out pairwise accuracy.

Data order: the pairs of step s on rank r are a function of (seed, s, r) through one permutation per epoch, so
every pair is seen once per epoch and a resumed run draws exactly what the killed one would have drawn.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.reward import bradley_terry_loss, pad_rows
from tasks.refs import RunLink
from tasks.reward import RewardConfig
from tasks.stage import GptflowError
from tasks.train_worker import Worker, run_loop, setup_worker


class Pairs:
    """The encoded pairs of one split (`tasks.reward.save_pairs`)."""

    def __init__(self, path: Path):
        with np.load(path, allow_pickle=False) as z:
            self.chosen = np.split(z["chosen"], np.cumsum(z["chosen_len"])[:-1])
            self.rejected = np.split(z["rejected"], np.cumsum(z["rejected_len"])[:-1])

    def __len__(self) -> int:
        return len(self.chosen)

    def batch(self, rows: np.ndarray, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """idx (2n, T) and lengths (2n,): the n chosen rows, then their n rejected rows."""
        return pad_rows([self.chosen[i].tolist() for i in rows] + [self.rejected[i].tolist() for i in rows], pad_id)


class PairBatches:
    """Micro-batches of `batch_size` pairs, the Bradley-Terry loss of each and its running metrics."""

    def __init__(self, folder: Path, device: torch.device):
        self.train, self.val = Pairs(folder / "train.npz"), Pairs(folder / "val.npz")
        self.pad_id = json.loads((folder / "meta.json").read_text())["pad_id"]
        self.n = len(self.train)
        self._perms: dict[int, np.ndarray] = {}
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)  # pairs, correct, margin, r_chosen, r_rejected

    def _row(self, g: int, seed: int) -> int:
        """The g-th pair drawn over the whole run: epoch g // n, shuffled by (seed, epoch)."""
        epoch = g // self.n
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([seed, epoch]).permutation(self.n)}
        return int(self._perms[epoch][g % self.n])

    def micro_batches(self, w: Worker, step: int) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        B = w.cfg.batch_size
        first = (step * w.world + w.rank) * w.accum * B  # this rank's first draw in step `step`
        out = []
        for m in range(w.accum):
            rows = np.array([self._row(first + m * B + i, w.cfg.seed) for i in range(B)])
            idx, lengths = self.train.batch(rows, self.pad_id)
            out.append((idx.to(w.device), lengths.to(w.device), 1.0 / w.accum))  # equal micro-batches: 1/accum each
        return out

    def scores(self, model: torch.nn.Module, idx: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) scores; a NaN or infinite score stops the stage (never a silently corrupt model)."""
        r = model(idx, lengths)
        if not torch.isfinite(r).all():
            raise GptflowError(f"reward model: non-finite scores {r.tolist()} (diverged: lower lr or check the data)")
        return r.chunk(2)

    def loss(self, model: torch.nn.Module, micro: tuple[torch.Tensor, torch.Tensor, float]) -> torch.Tensor:
        idx, lengths, scale = micro
        chosen, rejected = self.scores(model, idx, lengths)
        with torch.no_grad():
            d = (chosen - rejected).double()
            self.sums += torch.stack([torch.tensor(float(len(d)), dtype=torch.float64, device=d.device),
                                      (d > 0).double().sum(), d.sum(), chosen.double().sum(), rejected.double().sum()])
        return bradley_terry_loss(chosen, rejected) * scale

    def step_metrics(self, w: Worker) -> dict[str, float]:
        """Pairwise accuracy, margin and mean chosen/rejected reward over every rank since the last log step."""
        sums, self.sums = self.sums, torch.zeros_like(self.sums)
        if w.world > 1:
            torch.distributed.all_reduce(sums)
        n, correct, margin, chosen, rejected = (sums / sums[0].clamp(min=1)).tolist()
        return {"train/accuracy": correct, "train/margin": margin, "train/reward_chosen": chosen,
                "train/reward_rejected": rejected}

    def evaluate(self, w: Worker) -> dict[str, float]:
        """Bradley-Terry loss, pairwise accuracy, margin and mean rewards over every held-out pair; each rank takes
        every world-th pair and all ranks run the same number of forwards (DDP and FSDP forwards are collective).
        The metrics are also appended to `w.history["val_reward"]` (checkpointed with it)."""
        mine = np.arange(w.rank, len(self.val), w.world)
        n_batches = math.ceil(math.ceil(len(self.val) / w.world) / w.cfg.batch_size)
        sums = torch.zeros(6, dtype=torch.float64, device=w.device)  # pairs, correct, margin, loss, r_c, r_r
        w.model.eval()
        with torch.no_grad(), w.amp:
            for j in range(n_batches):
                rows = mine[j * w.cfg.batch_size : (j + 1) * w.cfg.batch_size]
                idx, lengths = self.val.batch(rows if len(rows) else np.array([0]), self.pad_id)
                chosen, rejected = self.scores(w.model, idx.to(w.device), lengths.to(w.device))
                if len(rows):  # a rank short of pairs runs a dummy forward and counts nothing
                    d = (chosen - rejected).double()
                    loss = -torch.nn.functional.logsigmoid(d)
                    sums += torch.stack([torch.tensor(float(len(d)), dtype=torch.float64, device=w.device),
                                         (d > 0).double().sum(), d.sum(), loss.sum(), chosen.double().sum(),
                                         rejected.double().sum()])
        w.model.train()
        if w.world > 1:
            torch.distributed.all_reduce(sums)
        n, correct, margin, loss, chosen, rejected = (sums / sums[0].clamp(min=1)).tolist()
        metrics = {"val/loss": loss, "val/accuracy": correct, "val/margin": margin, "val/reward_chosen": chosen,
                   "val/reward_rejected": rejected}
        w.history.setdefault("val_reward", []).append(metrics)
        return metrics


def reward_model(base: Path, device: torch.device) -> torch.nn.Module:
    """The SFT model's weights under a new scalar head (seeded by `setup_worker`: the same head on every rank)."""
    from models.checkpoint import load_model
    from models.reward import RewardModel

    return RewardModel.from_gpt(load_model(base, device))


def reward_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's function on every reward-model worker. `config`: {"cfg": the RewardConfig as JSON, "base": the
    SFT model folder, "pairs": the folder of encoded pairs, "run": a `RunLink` as a dict, "progress": the driver's
    progress queue}."""
    from models.checkpoint import load_config

    cfg = RewardConfig.model_validate(config["cfg"])
    base = Path(config["base"])
    w = setup_worker(cfg, "reward", lambda device: reward_model(base, device), load_config(base), cfg.grad_accum)
    data = PairBatches(Path(config["pairs"]), w.device)
    run_loop(w, data, RunLink.model_validate(config.get("run") or {}), config.get("progress"), eval_first=True)
